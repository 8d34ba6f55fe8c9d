//! Alerts and the failover policy against a real nats-server, the command service, a
//! projector and a `handoff monitor` process. The daemons here are registered by the
//! test, which also writes their heartbeats into the heartbeat bucket (as a daemon does)
//! and stops writing one to lose that daemon.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, Result};
use handoff_dataplane::store::{Heartbeat, Stores};
use handoff_domain::alert::AlertKind;
use handoff_domain::auth::Role;
use handoff_domain::command::ConfigureDaemon;
use handoff_domain::{Command, DaemonId, Event};
use handoff_eventlog::Recorded;
use handoff_protocol::now_ms;
use handoff_protocol::views::AlertView;
use handoff_tests::*;

/// Writes a heartbeat for each daemon in the set every 200 ms, until dropped.
pub(crate) struct Heartbeats {
    beating: Arc<Mutex<BTreeSet<DaemonId>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Heartbeats {
    pub(crate) fn start(stores: Stores, daemons: &[DaemonId]) -> Heartbeats {
        let beating = Arc::new(Mutex::new(daemons.iter().cloned().collect::<BTreeSet<_>>()));
        let set = beating.clone();
        let task = tokio::spawn(async move {
            loop {
                let now: Vec<DaemonId> =
                    set.lock().expect("not poisoned").iter().cloned().collect();
                for d in now {
                    let hb = Heartbeat {
                        daemon: d.clone(),
                        at_ms: now_ms(),
                        started_at_ms: 0,
                        pid: std::process::id(),
                        jobs: 0,
                        rebuilding: 0,
                    };
                    let key = handoff_protocol::subjects::daemon_key(&d);
                    // Ignored: a missed heartbeat is what the monitor is there to notice.
                    let _ = stores.put_heartbeat(&key, &hb).await;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        Heartbeats { beating, task }
    }

    /// The daemon stops sending heartbeats (its server is lost).
    pub(crate) fn lose(&self, d: &DaemonId) {
        self.beating.lock().expect("not poisoned").remove(d);
    }
}

impl Drop for Heartbeats {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A stack with a projector and a monitor started with `args`.
async fn start(
    args: &[&str],
) -> Result<(Stack, Stores, ProjectorProcess, Proc, tempfile::TempDir)> {
    let stack = Stack::start().await?;
    let dir = tempfile::tempdir()?;
    let stores = Stores::open(stack.client.clone(), 1).await?;
    let projector = ProjectorProcess::spawn(&stack.url(), &dir.path().join("views"), &[])?;
    let monitor = monitor(&stack, dir.path(), args).await?;
    Ok((stack, stores, projector, monitor, dir))
}

/// `handoff monitor ARGS` as the monitor's user.
pub(crate) async fn monitor(stack: &Stack, dir: &std::path::Path, args: &[&str]) -> Result<Proc> {
    let creds = stack.user("monitor", &[Role::BackupMonitor], None).await?.1;
    let mut full = vec!["monitor"];
    full.extend_from_slice(args);
    Proc::spawn(&stack.url(), dir, "monitor", &creds, &full)
}

/// The first event that `pred` accepts, waiting up to [`TIMEOUT`].
async fn first(stack: &Stack, what: &str, pred: impl Fn(&Event) -> bool) -> Result<Recorded> {
    first_event(stack, what, TIMEOUT, |r| pred(&r.envelope.event)).await
}

/// `handoff alerts` once the projector has folded everything appended so far.
async fn alerts(stack: &Stack, all: bool) -> Result<Vec<AlertView>> {
    wait_for_checkpoint(&stack.client, stack.last_seq().await?).await?;
    let mut args = vec!["--json", "alerts", "--all"];
    if all {
        args.push("--closed");
    }
    Ok(serde_json::from_value(
        handoff_ok(&stack.url(), &args)?.json()?["items"].take(),
    )?)
}

fn find(alerts: &[AlertView], kind: AlertKind, about: &str) -> Option<AlertView> {
    alerts
        .iter()
        .find(|a| a.kind == kind && a.about == about)
        .cloned()
}

#[tokio::test]
async fn bind_failure_and_low_head_free_space_open_and_close_with_their_events() -> Result<()> {
    let (stack, stores, _projector, _monitor, _dir) =
        start(&["--down-after", "60s", "--low-head-free", "50"]).await?;
    let _beats = Heartbeats::start(stores, &[daemon(1)]);
    stack.apply(register(1, settings(10))).await?;
    stack.apply(configure_project("p")).await?;
    // BIND_FAILURE: no daemon has room; asked twice, raised once.
    for _ in 0..2 {
        let refused = stack.send(replica_set("p", "big", 20)).await?;
        let e = refused.expect_err("a 20 GiB job on a 10 GiB daemon");
        assert_eq!(e.reason, "bind_failure", "{e:?}");
    }
    let raised = of_type(&stack.events().await?, "BindFailed").len();
    assert_eq!(raised, 1, "BIND_FAILURE raised {raised} times");
    let open = alerts(&stack, false).await?;
    let bind = find(&open, AlertKind::BindFailure, "p/big").ok_or_else(|| anyhow!("{open:?}"))?;
    assert!(bind.is_open() && bind.detail.contains("p/big"), "{bind:?}");
    // LOW_HEAD_FREE_SPACE: 6 of 10 GiB used leaves 40%, under 50%.
    stack.apply(replica_set("p", "mid", 6)).await?;
    first(
        &stack,
        "LOW_HEAD_FREE_SPACE",
        |e| matches!(e, Event::HeadSpaceLow { daemon: d, .. } if *d == daemon(1)),
    )
    .await?;
    let open = alerts(&stack, false).await?;
    assert!(
        find(&open, AlertKind::LowHeadFreeSpace, daemon(1).as_str()).is_some(),
        "{open:?}"
    );
    // A bigger disk resolves both: the space recovers, and the job can be created.
    stack
        .apply(Command::ConfigureDaemon(ConfigureDaemon {
            daemon: daemon(1),
            settings: settings(100),
        }))
        .await?;
    first(&stack, "the head space to recover", |e| {
        matches!(e, Event::HeadSpaceRecovered { .. })
    })
    .await?;
    stack.apply(replica_set("p", "big", 20)).await?;
    let open = alerts(&stack, false).await?;
    assert!(open.is_empty(), "still open: {open:?}");
    let all = alerts(&stack, true).await?;
    let bind = find(&all, AlertKind::BindFailure, "p/big").ok_or_else(|| anyhow!("{all:?}"))?;
    assert_eq!(bind.closed_by.as_deref(), Some("BackupJobCreated"));
    let space = find(&all, AlertKind::LowHeadFreeSpace, daemon(1).as_str())
        .ok_or_else(|| anyhow!("{all:?}"))?;
    assert_eq!(space.closed_by.as_deref(), Some("HeadSpaceRecovered"));
    Ok(())
}

#[tokio::test]
async fn an_operators_move_wins_over_a_pending_automatic_move() -> Result<()> {
    let (stack, stores, _projector, _monitor, _dir) = start(&[
        "--down-after",
        "2s",
        "--failover",
        "--failover-delay",
        "3s",
        "--move-stuck-after",
        "5s",
    ])
    .await?;
    let daemons: Vec<DaemonId> = (1..=3).map(daemon).collect();
    let beats = Heartbeats::start(stores.clone(), &daemons);
    stack.apply(register(1, settings(100))).await?;
    stack.apply(configure_project("p")).await?;
    stack.apply(replica_set("p", "a", 1)).await?;
    stack.apply(register(2, settings(100))).await?;
    stack.apply(register(3, settings(100))).await?;
    beats.lose(&daemon(1));
    let down = first(
        &stack,
        "DAEMON_DOWN",
        |e| matches!(e, Event::DaemonDown { daemon: d } if *d == daemon(1)),
    )
    .await?;
    // While the policy waits out its delay, the operator moves the jobs.
    stack.apply(move_jobs(1, 3)).await?;
    // No daemon process runs here: the command service itself raised the moved job's
    // fence to the destination's epoch.
    let a = job("p/a");
    until("the moved job's fence to rise", TIMEOUT, || async {
        Ok((stores.fences.read(&a).await?.epoch == 2).then_some(()))
    })
    .await?;
    // The move never completes (no daemon process here): MOVE_STUCK comes after the
    // delay ran out, so by then the policy had its chance.
    let stuck = first(&stack, "MOVE_STUCK", |e| {
        matches!(e, Event::MoveStuck { .. })
    })
    .await?;
    assert!(stuck.envelope.at >= down.envelope.at + 3000);
    let events = stack.events().await?;
    assert!(of_type(&events, "FailoverDecided").is_empty());
    let started: Vec<_> = events
        .iter()
        .filter(|r| matches!(r.envelope.event, Event::MoveStarted { .. }))
        .collect();
    assert_eq!(started.len(), 1);
    assert!(matches!(
        &started[0].envelope.event,
        Event::MoveStarted { automatic: false, to, .. } if *to == daemon(3)
    ));
    assert_eq!(started[0].envelope.actor.as_str(), owner().0.user.as_str());
    Ok(())
}

#[tokio::test]
async fn a_restarted_monitor_gives_every_daemon_a_fresh_grace_period() -> Result<()> {
    let stack = Stack::start().await?;
    let dir = tempfile::tempdir()?;
    let stores = Stores::open(stack.client.clone(), 1).await?;
    let beats = Heartbeats::start(stores.clone(), &[daemon(1), daemon(2)]);
    stack.apply(register(1, settings(10))).await?;
    stack.apply(register(2, settings(10))).await?;
    // Daemon 2 falls silent while no monitor runs, for longer than the threshold.
    beats.lose(&daemon(2));
    let key = handoff_protocol::subjects::daemon_key(&daemon(2));
    until("daemon 2's heartbeat to be 4 s old", TIMEOUT, || async {
        let e = stores.heartbeats.entry(key.as_str()).await?;
        let created = e.ok_or_else(|| anyhow!("no heartbeat"))?.created;
        let age = now_ms().saturating_sub(handoff_dataplane::store::time_ms(created));
        Ok((age > 4000).then_some(()))
    })
    .await?;
    // A monitor that starts now must hear nothing for its own threshold first.
    let started = now_ms();
    let _monitor = monitor(&stack, dir.path(), &["--down-after", "2s"]).await?;
    let down = first(
        &stack,
        "DAEMON_DOWN of daemon 2",
        |e| matches!(e, Event::DaemonDown { daemon: d } if *d == daemon(2)),
    )
    .await?;
    assert!(
        down.envelope.at >= started + 2000,
        "declared down {} ms after the monitor started",
        down.envelope.at.saturating_sub(started)
    );
    let events = stack.events().await?;
    assert!(
        !events.iter().any(|r| matches!(&r.envelope.event,
            Event::DaemonDown { daemon: d } if *d == daemon(1))),
        "daemon 1 kept sending heartbeats"
    );
    Ok(())
}

//! An operator drains a daemon holding four jobs, with real daemon processes (the agent
//! writing, three daemons): the dry run plans every job, then the command service moves
//! them two at a time, each rebuilt on another daemon with its head verified against the
//! source, and the drain completes with the daemon empty and its assignment disabled.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use anyhow::{anyhow, Result};
use handoff_dataplane::oplog::Ts;
use handoff_domain::auth::Role;
use handoff_domain::state::Assignment;
use handoff_domain::{CommandId, DaemonId, Event, JobId, State};
use handoff_tests::*;

/// An hour of schedule lasts this long here: a 6-hour interval is 3.6 s.
const HOUR_MS: u64 = 600;

fn daemon_id(root: &Path, n: usize) -> Result<DaemonId> {
    let head = root.join(format!("heads{n}"));
    Ok(DaemonId::new(format!("d{n}.test:{}/", head.display()))?)
}

// The command service runs in this process while `handoff` runs blocking: two threads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_moves_every_job_two_at_a_time_with_every_head_verified() -> Result<()> {
    let (stack, stores) = data_stack(HOUR_MS).await?;
    let url = stack.url();
    let dir = tempfile::tempdir()?;
    let daemons: Vec<DaemonId> = (1..=3)
        .map(|n| daemon_id(dir.path(), n))
        .collect::<Result<_>>()?;
    let mut creds = Vec::new();
    for (n, d) in daemons.iter().enumerate() {
        let name = format!("d{}", n + 1);
        creds.push(
            stack
                .user(&name, &[Role::BackupDaemon], Some(d.clone()))
                .await?
                .1,
        );
    }
    let agent_creds = stack.user("agent", &[Role::BackupAgent], None).await?.1;
    let mut keep = Keep::default();
    keep.process(Proc::spawn(
        &url,
        dir.path(),
        "agent",
        &agent_creds,
        &[
            "agent",
            "--ops-per-sec",
            "150",
            "--slice-ms",
            "200",
            "--initial-size",
            "2MiB",
            "--doc-size",
            "256",
        ],
    )?);
    let registered = |id: DaemonId| move |r: &handoff_eventlog::Recorded| matches!(&r.envelope.event, Event::DaemonRegistered { daemon, .. } if *daemon == id);
    let start = |keep: &mut Keep, n: usize| -> Result<()> {
        keep.process(Proc::daemon(
            &url,
            dir.path(),
            &format!("daemon{}", n + 1),
            &creds[n],
            &daemons[n],
            "2",
            "500",
        )?);
        Ok(())
    };
    // Every job is created while daemon 1 is the only one.
    start(&mut keep, 0)?;
    first_event(
        &stack,
        "daemon 1 to register",
        TIMEOUT,
        registered(daemons[0].clone()),
    )
    .await?;
    stack.apply(configure_project("p")).await?;
    let jobs: Vec<JobId> = (1..=4).map(|n| job(&format!("p/rs{n}"))).collect();
    for n in 1..=4 {
        stack.apply(replica_set("p", &format!("rs{n}"), 1)).await?;
    }
    for n in [1, 2] {
        start(&mut keep, n)?;
        first_event(
            &stack,
            "daemon to register",
            TIMEOUT,
            registered(daemons[n].clone()),
        )
        .await?;
    }
    until(
        "every job's first snapshot",
        std::time::Duration::from_secs(30),
        || async {
            let snaps = stores.snapshots(None).await?;
            Ok(jobs
                .iter()
                .all(|j| snaps.iter().any(|s| s.job == *j && s.daemon.is_some()))
                .then_some(()))
        },
    )
    .await?;
    let d1 = daemons[0].as_str();

    // The dry run: every job placed on another daemon, nothing appended.
    let before = stack.events().await?.len();
    let dry = handoff_ok(
        &url,
        &[
            "--json",
            "daemon",
            "drain",
            d1,
            "--max-concurrent",
            "2",
            "--dry-run",
        ],
    )?
    .json()?;
    let planned: BTreeSet<&str> = dry["plan"]["jobs"]
        .as_array()
        .ok_or_else(|| anyhow!("no plan in {dry}"))?
        .iter()
        .inspect(|p| assert_ne!(p["to"].as_str(), Some(d1), "{p}"))
        .filter_map(|p| p["job"].as_str())
        .collect();
    assert_eq!(planned.len(), 4, "{dry}");
    assert_eq!(stack.events().await?.len(), before, "a dry run appended");

    // Followed to its end: the reply first, then one JSON document per event.
    let mut wait = Background::spawn(
        Some(&url),
        &[
            "--json",
            "daemon",
            "drain",
            d1,
            "--max-concurrent",
            "2",
            "--reason",
            "retiring the host",
            "--wait",
        ],
    )?;
    let started: serde_json::Value = serde_json::from_str(&wait.wait_for_line("{")?)?;
    let drain_id = CommandId::new(
        started["command"]
            .as_str()
            .ok_or_else(|| anyhow!("no drain id in {started}"))?,
    )?;
    wait.wait_for_line_within("DrainCompleted", std::time::Duration::from_secs(180))?;
    let (code, lines) = wait.finish()?;
    assert_eq!(code, 0, "{lines:?}");
    let documents: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).map_err(|e| anyhow!("not one JSON document: {l}: {e}")))
        .collect::<Result<_>>()?;
    let completed = documents
        .iter()
        .filter(|d| d["event"]["type"] == "JobMoveCompleted")
        .count();
    assert_eq!(completed, 4, "{documents:?}");
    let done: Event = serde_json::from_value(
        documents.last().ok_or_else(|| anyhow!("no lines"))?["event"].clone(),
    )?;
    assert!(
        matches!(done, Event::DrainCompleted { moved: 4, left: 0, drain_id: ref id, .. } if *id == drain_id),
        "{done:?}"
    );

    // What the events say: one move per job, each of the drain, never more than two
    // moving away from daemon 1 at once, each completed elsewhere with its head.
    let events = stack.events().await?;
    let mut state = State::default();
    let mut drain_moves = BTreeSet::new();
    let mut moving: BTreeSet<JobId> = BTreeSet::new();
    let mut most = 0;
    let mut heads = BTreeMap::new();
    for r in &events {
        let e = &r.envelope.event;
        state.apply(e);
        match e {
            Event::MoveStarted {
                move_id,
                drain: Some(id),
                ..
            } if *id == drain_id => {
                drain_moves.insert(move_id.clone());
            }
            Event::JobMoveStarted {
                job, move_id, from, ..
            } if drain_moves.contains(move_id) => {
                assert_eq!(from, &daemons[0]);
                moving.insert(job.clone());
                most = most.max(moving.len());
            }
            Event::JobMoveCompleted {
                job,
                move_id,
                daemon,
                head,
                ..
            } if drain_moves.contains(move_id) => {
                assert_ne!(daemon, &daemons[0]);
                moving.remove(job);
                heads.insert(job.clone(), head.clone());
            }
            Event::JobMoveFailed { job, move_id, .. } if drain_moves.contains(move_id) => {
                panic!("{job}: its drain move failed: {e:?}")
            }
            _ => {}
        }
    }
    assert_eq!(drain_moves.len(), 4, "one move per job");
    assert_eq!(most, 2, "the drain ran {most} moves at once");
    assert!(state.daemons[&daemons[0]].jobs.is_empty());
    assert!(!state.daemons[&daemons[0]].settings.assignment_enabled);
    assert!(state.drains.is_empty());
    for j in &jobs {
        assert!(
            matches!(&state.jobs[j].assignment, Assignment::Assigned { daemon } if *daemon != daemons[0]),
            "{j}: {:?}",
            state.jobs[j].assignment
        );
        let head = heads
            .get(j)
            .and_then(|h| h.as_ref())
            .ok_or_else(|| anyhow!("{j}: completed without a head point"))?;
        let ts: Ts = head
            .ts
            .parse()
            .map_err(|e| anyhow!("{j}: head ts {}: {e:?}", head.ts))?;
        let scan = scan_oplog(&stores, j).await?;
        let source = scan
            .source_at
            .get(&ts)
            .ok_or_else(|| anyhow!("{j}: no oplog entry at {ts}"))?;
        assert_eq!(
            head.checksum,
            source.to_string(),
            "{j}: the rebuilt head differs from the source at {ts}"
        );
    }
    // The daemon's history tells the drain, and its view says it is over.
    let history = handoff_ok(&url, &["history", "--daemon", d1])?.stdout;
    assert!(
        history.contains("drain") && history.contains("completed: 4 job(s) moved"),
        "{history}"
    );
    keep.stack(stack).dir(dir);
    Ok(())
}

/// The command service's own steps of a drain: it starts the next move when one ends;
/// when no daemon can take what is left it raises BIND_FAILURE once (`DrainBlocked`) and
/// records no refusal, however often the step is refused (here sent by an operator too);
/// it starts the move as soon as a daemon can take the job, closing the alert, and ends
/// the drain without recording anything more.
#[tokio::test]
async fn a_blocked_drain_raises_one_alert_records_no_refusal_and_goes_on() -> Result<()> {
    use handoff_domain::command::{
        CompleteJobMove, ContinueDrain, DrainDaemon, ReportDaemonLiveness,
    };
    use handoff_domain::Command;

    let stack = Stack::start().await?;
    stack.apply(register(1, settings(100))).await?;
    stack.apply(configure_project("p")).await?;
    for name in ["rs1", "rs2"] {
        stack.apply(replica_set("p", name, 10)).await?;
    }
    stack.apply(register(2, settings(100))).await?;
    let liveness = |up| {
        Command::ReportDaemonLiveness(ReportDaemonLiveness {
            daemon: daemon(2),
            up,
        })
    };
    let drain_id = stack
        .apply(Command::DrainDaemon(DrainDaemon {
            daemon: daemon(1),
            max_concurrent: 1,
            reason: None,
            dry_run: false,
        }))
        .await?
        .command;
    let started = |job: &'static str| move |r: &handoff_eventlog::Recorded| matches!(&r.envelope.event, Event::JobMoveStarted { job: j, .. } if j.as_str() == job);
    let first = first_event(&stack, "the drain's first move", TIMEOUT, started("p/rs1")).await?;
    let Event::JobMoveStarted { move_id, epoch, .. } = first.envelope.event else {
        unreachable!()
    };
    // Daemon 2 goes down, then completes the move: nobody can take rs2 now.
    stack.apply(liveness(false)).await?;
    stack
        .report(
            2,
            Command::CompleteJobMove(CompleteJobMove {
                job: job("p/rs1"),
                move_id,
                epoch,
                head: rebuilt_head(),
            }),
        )
        .await?;
    first_event(
        &stack,
        "BIND_FAILURE on the drain",
        TIMEOUT,
        |r| matches!(&r.envelope.event, Event::DrainBlocked { job, .. } if job.as_str() == "p/rs2"),
    )
    .await?;
    // An operator's steps are refused the same way, and recorded nowhere.
    for _ in 0..3 {
        let refused = stack
            .send(Command::ContinueDrain(ContinueDrain {
                daemon: daemon(1),
                drain_id: drain_id.clone(),
            }))
            .await?
            .expect_err("nobody can take rs2");
        assert_eq!(refused.reason, "bind_failure", "{refused:?}");
    }
    stack.apply(liveness(true)).await?;
    let second = first_event(&stack, "the drain's second move", TIMEOUT, started("p/rs2")).await?;
    let Event::JobMoveStarted { move_id, epoch, .. } = second.envelope.event else {
        unreachable!()
    };
    stack
        .report(
            2,
            Command::CompleteJobMove(CompleteJobMove {
                job: job("p/rs2"),
                move_id,
                epoch,
                head: rebuilt_head(),
            }),
        )
        .await?;
    first_event(&stack, "the drain to complete", TIMEOUT, |r| {
        matches!(
            &r.envelope.event,
            Event::DrainCompleted {
                moved: 2,
                left: 0,
                ..
            }
        )
    })
    .await?;
    // Anything the service appended in the pass that ended the drain is in the stream
    // before this command's events (it serves one thing at a time).
    stack.apply(configure_project("after")).await?;
    let events = stack.events().await?;
    let count =
        |pred: &dyn Fn(&Event) -> bool| events.iter().filter(|r| pred(&r.envelope.event)).count();
    assert_eq!(
        count(&|e| matches!(e, Event::CommandRejected { .. })),
        0,
        "a drain's refused steps were recorded"
    );
    assert_eq!(count(&|e| matches!(e, Event::DrainBlocked { .. })), 1);
    let state = events.iter().fold(State::default(), |mut s, r| {
        s.apply(&r.envelope.event);
        s
    });
    assert!(state.alerts.is_empty(), "{:?}", state.alerts);
    Ok(())
}

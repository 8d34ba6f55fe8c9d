//! A move's destination in trouble, end to end: its reports on the move, refused, are sent
//! again until the command service takes them, and what they report (a rebuilt head, a
//! failed rebuild) is kept meanwhile; a head it kept from before, too old for the oplog
//! still stored, is restored from the latest snapshot. Each test runs a small fleet of
//! real processes: the agent, daemon 1 (the job's first owner) and daemon 2.
//!
//! A report is refused on purpose by removing daemon 2's user before the move and adding
//! it back (same key) once the refusal is on record: a refusal that says nothing about the
//! move, like a server's full disk or a clock out of the signature's window.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use futures::StreamExt;
use handoff_dataplane::daemon::Progress;
use handoff_dataplane::store::Stores;
use handoff_domain::auth::Role;
use handoff_domain::command::{AddUser, MoveJob, RemoveUser};
use handoff_domain::model::MovePhase;
use handoff_domain::{Command, CommandId, DaemonId, Event, JobId};
use handoff_eventlog::Recorded;
use handoff_protocol::auth::Credentials;
use handoff_testkit::Child;
use handoff_tests::*;

/// An hour of schedule lasts this long here: a 6-hour interval is 1.8 s.
const HOUR_MS: u64 = 300;

/// The agent, daemons 1 and 2, and the job `p/rs` on daemon 1 with a snapshot.
struct Fleet {
    stack: Stack,
    stores: Stores,
    dir: tempfile::TempDir,
    /// Daemon `n`'s user and its credentials file at `n - 1`.
    users: Vec<(Credentials, PathBuf)>,
    _agent: Proc,
    daemons: Vec<Option<Proc>>,
}

impl Fleet {
    /// Daemon 1 takes `p/rs` alone; daemon 2 starts once it has, owning nothing.
    async fn start() -> Result<Fleet> {
        let (stack, stores) = data_stack(HOUR_MS).await?;
        let dir = tempfile::tempdir()?;
        let mut users = Vec::new();
        for n in 1..=2 {
            let id = daemon_id(dir.path(), n);
            users.push(
                stack
                    .user(&format!("d{n}"), &[Role::BackupDaemon], Some(id))
                    .await?,
            );
        }
        let agent_creds = stack.user("agent", &[Role::BackupAgent], None).await?.1;
        let agent = Proc::spawn(
            &stack.url(),
            dir.path(),
            "agent",
            &agent_creds,
            &[
                "agent",
                "--ops-per-sec",
                "150",
                "--slice-ms",
                "200",
                "--groom-ms",
                "500",
                "--initial-size",
                "128KiB",
                "--doc-size",
                "256",
            ],
        )?;
        let mut fleet = Fleet {
            stack,
            stores,
            dir,
            users,
            _agent: agent,
            daemons: vec![None, None],
        };
        fleet.start_daemon(1, "d1").await?;
        fleet.stack.apply(configure_project("p")).await?;
        fleet.stack.apply(replica_set("p", "rs", 1)).await?;
        fleet.start_daemon(2, "d2").await?;
        until("a snapshot of p/rs by daemon 1", TIMEOUT, || async {
            let snaps = fleet.stores.snapshots(Some(&rs())).await?;
            Ok(snaps.iter().any(|s| s.daemon.is_some()).then_some(()))
        })
        .await?;
        Ok(fleet)
    }

    fn id(&self, n: usize) -> DaemonId {
        daemon_id(self.dir.path(), n)
    }

    /// Starts daemon `n` (its log in `<log>.log`) and waits until it has registered.
    async fn start_daemon(&mut self, n: usize, log: &str) -> Result<()> {
        let daemon = Proc::daemon(
            &self.stack.url(),
            self.dir.path(),
            log,
            &self.users[n - 1].1,
            &self.id(n),
            "1",
            "500",
        )?;
        self.daemons[n - 1] = Some(daemon);
        let id = self.id(n);
        first_event(&self.stack, &format!("daemon {n} to register"), TIMEOUT, |r| {
            matches!(&r.envelope.event, Event::DaemonRegistered { daemon, .. } if *daemon == id)
        })
        .await?;
        Ok(())
    }

    fn daemon(&mut self, n: usize) -> Result<Proc> {
        self.daemons[n - 1]
            .take()
            .ok_or_else(|| anyhow!("daemon {n} is not running"))
    }

    /// Removes daemon `n`'s user: every report it sends is refused until it is back.
    async fn remove_user(&self, n: usize) -> Result<()> {
        let user = self.users[n - 1].0.user.clone();
        self.stack
            .apply(Command::RemoveUser(RemoveUser { user }))
            .await?;
        Ok(())
    }

    /// Adds daemon `n`'s user back, with the key the daemon signs with.
    async fn restore_user(&self, n: usize) -> Result<()> {
        let creds = &self.users[n - 1].0;
        self.stack
            .apply(Command::AddUser(AddUser {
                user: creds.user.clone(),
                roles: vec![Role::BackupDaemon],
                key: creds.public_key(),
                daemon: Some(self.id(n)),
            }))
            .await?;
        Ok(())
    }

    /// Moves `p/rs` to daemon `n`; the move's id.
    async fn move_rs_to(&self, n: usize) -> Result<CommandId> {
        let id = new_id();
        let command = Command::MoveJob(MoveJob {
            job: rs(),
            to: self.id(n),
            reason: None,
            dry_run: false,
        });
        self.stack
            .send_as(&id, &command)
            .await?
            .map_err(|e| anyhow!("the move was refused: {}", e.message))?;
        Ok(id)
    }

    /// Waits until a `command` of daemon `n` has been refused, on record.
    async fn refused(&self, n: usize, command: &str) -> Result<Recorded> {
        let user = self.users[n - 1].0.user.clone();
        first_event(
            &self.stack,
            &format!("daemon {n}'s {command} to be refused"),
            TIMEOUT,
            |r| {
                matches!(&r.envelope.event,
                    Event::CommandRefused { user: u, command: c, .. } if *u == user && c == command)
            },
        )
        .await
    }

    /// Waits for the first event of the move that `pred` picks.
    async fn move_event(&self, what: &str, pred: impl Fn(&Event) -> bool) -> Result<Recorded> {
        first_event(&self.stack, what, TIMEOUT, |r| pred(&r.envelope.event)).await
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default()
    }
}

/// Daemon `n`'s id, `d<n>.test:<its head directory under root>/`.
fn daemon_id(root: &Path, n: usize) -> DaemonId {
    let head = root.join(format!("heads{n}"));
    DaemonId::new(format!("d{n}.test:{}/", head.display())).expect("a valid daemon id")
}

fn rs() -> JobId {
    job("p/rs")
}

/// A completion refused for a reason that is not about the move (here: the daemon's user
/// is unknown for a while) is sent again until it is applied; the rebuilt head is kept,
/// so the move completes with daemon 2 and does not fail.
#[tokio::test]
async fn a_refused_completion_is_sent_again_and_the_rebuilt_head_kept() -> Result<()> {
    let fleet = Fleet::start().await?;
    fleet.remove_user(2).await?;
    let move_id = fleet.move_rs_to(2).await?;
    fleet.refused(2, "CompleteJobMove").await?;
    fleet.restore_user(2).await?;
    let d2 = fleet.id(2);
    let done = fleet
        .move_event("the move to complete or fail", |e| {
            matches!(e, Event::JobMoveCompleted { move_id: m, .. }
                | Event::JobMoveFailed { move_id: m, .. } if *m == move_id)
        })
        .await
        .map_err(|e| anyhow!("{e}; daemon 2's log:\n{}", fleet.log("d2")))?;
    match &done.envelope.event {
        Event::JobMoveCompleted { daemon, head, .. } => {
            assert_eq!(daemon, &d2);
            assert!(head.is_some(), "completed without its head's point");
        }
        other => panic!("the move did not complete: {other:?}"),
    }
    Ok(())
}

/// A failed rebuild whose FailJobMove is refused is reported again until it is applied:
/// the move fails (THEFT_FAILED) and the job goes back to daemon 1, instead of staying
/// moving with nobody working on it.
#[tokio::test]
async fn a_refused_failure_is_sent_again_until_the_move_fails() -> Result<()> {
    let mut fleet = Fleet::start().await?;
    // Daemon 1 is lost, so nothing takes a good snapshot after the latest is spoiled.
    fleet.daemon(1)?.kill()?;
    let latest = fleet
        .stores
        .snapshots(Some(&rs()))
        .await?
        .last()
        .cloned()
        .ok_or_else(|| anyhow!("no snapshot of p/rs"))?;
    fleet
        .stores
        .put_snapshot_unfenced(
            &latest,
            &mut &b"{\"id\":\"d1\",\"doc\":{\"not\":\"the data\"}}\n"[..],
        )
        .await?;
    fleet.remove_user(2).await?;
    let move_id = fleet.move_rs_to(2).await?;
    fleet.refused(2, "FailJobMove").await?;
    fleet.restore_user(2).await?;
    let d1 = fleet.id(1);
    let done = fleet
        .move_event(
            "the move to fail",
            |e| matches!(e, Event::JobMoveFailed { move_id: m, .. } if *m == move_id),
        )
        .await
        .map_err(|e| anyhow!("{e}; daemon 2's log:\n{}", fleet.log("d2")))?;
    let Event::JobMoveFailed {
        reason,
        returned_to,
        ..
    } = &done.envelope.event
    else {
        unreachable!()
    };
    assert!(reason.contains("corrupt"), "{reason}");
    assert_eq!(returned_to, &d1);
    Ok(())
}

/// A head kept on a daemon that was down (daemon 1, killed) is reused when the job moves
/// back to it; when the oplog it needs next has been purged meanwhile, it is restored from
/// the latest snapshot instead of failing the move (THEFT_FAILED).
#[tokio::test]
async fn a_kept_head_whose_oplog_is_gone_is_restored_from_the_latest_snapshot() -> Result<()> {
    let mut fleet = Fleet::start().await?;
    fleet.daemon(1)?.kill()?;
    let away = fleet.move_rs_to(2).await?;
    fleet
        .move_event(
            "the move to daemon 2 to complete",
            |e| matches!(e, Event::JobMoveCompleted { move_id: m, .. } if *m == away),
        )
        .await?;
    let d2 = fleet.id(2);
    let snapshot = until("a snapshot of p/rs by daemon 2", TIMEOUT, || async {
        let snaps = fleet.stores.snapshots(Some(&rs())).await?;
        Ok(snaps.into_iter().find(|s| s.daemon.as_ref() == Some(&d2)))
    })
    .await?;
    // Everything before daemon 2's snapshot goes, daemon 1's next entries with it.
    fleet.stores.purge_oplog(&rs(), snapshot.oplog_seq).await?;
    let back = fleet.move_rs_to(1).await?;
    fleet.start_daemon(1, "d1-again").await?;
    let done = fleet
        .move_event("the move back to complete or fail", |e| {
            matches!(e, Event::JobMoveCompleted { move_id: m, .. }
                | Event::JobMoveFailed { move_id: m, .. } if *m == back)
        })
        .await
        .map_err(|e| anyhow!("{e}; daemon 1's log:\n{}", fleet.log("d1-again")))?;
    match &done.envelope.event {
        Event::JobMoveCompleted { daemon, .. } => assert_eq!(daemon, &fleet.id(1)),
        other => panic!("the move back did not complete: {other:?}"),
    }
    Ok(())
}

/// With the command service away, a rebuild is not held by its phase reports (best effort,
/// a few seconds at most): the destination restores and replays, and waits only to
/// complete. Told to stop while its completion waits, it stops at once rather than after
/// the completion's retries; started again with the command service back, it completes
/// the move from the head it kept.
#[tokio::test]
async fn a_rebuild_goes_on_and_stops_at_once_while_the_command_service_is_away() -> Result<()> {
    let mut fleet = Fleet::start().await?;
    let mut d2 = fleet.daemon(2)?;
    d2.signal(Signal::Stop)?;
    let move_id = fleet.move_rs_to(2).await?;
    let mut progress = fleet
        .stack
        .client
        .subscribe(handoff_protocol::subjects::progress(move_id.as_str()))
        .await?;
    fleet
        .stack
        .commands
        .take()
        .ok_or_else(|| anyhow!("no command service"))?
        .stop()
        .await?;
    d2.signal(Signal::Cont)?;
    let replaying = tokio::time::timeout(TIMEOUT, async {
        while let Some(m) = progress.next().await {
            let p: Progress = serde_json::from_slice(&m.payload)?;
            if p.phase == MovePhase::ReplayingOplog {
                return Ok(p);
            }
        }
        Err(anyhow!("the progress subscription ended"))
    })
    .await
    .map_err(|_| {
        anyhow!(
            "no replay within {TIMEOUT:?}; daemon 2's log:\n{}",
            fleet.log("d2")
        )
    })??;
    assert_eq!(replaying.job, rs());
    until("daemon 2 to send its completion", TIMEOUT, || async {
        Ok(fleet
            .log("d2")
            .contains("completing the move")
            .then_some(()))
    })
    .await?;
    let stopped = Instant::now();
    let status = Child::from(d2).terminate(TIMEOUT)?;
    assert!(status.success(), "daemon 2 stopped with {status}");
    assert!(
        stopped.elapsed() < Duration::from_secs(5),
        "daemon 2 took {:?} to stop",
        stopped.elapsed()
    );
    fleet.stack.commands =
        Some(CommandService::start(&fleet.stack.url(), Default::default()).await?);
    fleet.start_daemon(2, "d2-again").await?;
    fleet
        .move_event(
            "the move to complete",
            |e| matches!(e, Event::JobMoveCompleted { move_id: m, .. } if *m == move_id),
        )
        .await
        .map_err(|e| anyhow!("{e}; daemon 2's log:\n{}", fleet.log("d2-again")))?;
    Ok(())
}

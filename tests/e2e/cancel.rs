//! An operator cancels a move while the destination rebuilds, with real daemon processes
//! (the agent writing, two daemons): every job ends on exactly one daemon with its head
//! intact, no THEFT_FAILED is raised, and the destination drops what it had rebuilt.

use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, Result};
use handoff_domain::auth::Role;
use handoff_domain::model::{AlertKind, MovePhase};
use handoff_domain::state::Assignment;
use handoff_domain::{DaemonId, Event, JobId, State};
use handoff_tests::*;

/// An hour of schedule lasts this long here: a 6-hour interval is 3.6 s.
const HOUR_MS: u64 = 600;

fn daemon_id(root: &Path, n: usize) -> Result<DaemonId> {
    let head = root.join(format!("heads{n}"));
    Ok(DaemonId::new(format!("c{n}.test:{}/", head.display()))?)
}

// The command service runs in this process while `handoff` runs blocking: two threads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_cancelled_mid_rebuild_leaves_every_job_on_one_daemon_with_its_head() -> Result<()> {
    let (stack, stores) = data_stack(HOUR_MS).await?;
    let url = stack.url();
    let dir = tempfile::tempdir()?;
    let (d1, d2) = (daemon_id(dir.path(), 1)?, daemon_id(dir.path(), 2)?);
    let c1 = stack
        .user("c1", &[Role::BackupDaemon], Some(d1.clone()))
        .await?;
    let c2 = stack
        .user("c2", &[Role::BackupDaemon], Some(d2.clone()))
        .await?;
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
            "4MiB",
            "--doc-size",
            "256",
        ],
    )?);
    let registered = |id: DaemonId| move |r: &handoff_eventlog::Recorded| matches!(&r.envelope.event, Event::DaemonRegistered { daemon, .. } if *daemon == id);
    keep.process(Proc::daemon(
        &url,
        dir.path(),
        "daemon1",
        &c1.1,
        &d1,
        "2",
        "500",
    )?);
    first_event(
        &stack,
        "daemon 1 to register",
        TIMEOUT,
        registered(d1.clone()),
    )
    .await?;
    stack.apply(configure_project("p")).await?;
    let jobs = [job("p/rs1"), job("p/rs2")];
    for j in &jobs {
        let name = j.as_str().rsplit('/').next().unwrap_or_default();
        stack.apply(replica_set("p", name, 1)).await?;
    }
    // One rebuild at a time: the second job waits for the first.
    keep.process(Proc::daemon(
        &url,
        dir.path(),
        "daemon2",
        &c2.1,
        &d2,
        "1",
        "500",
    )?);
    first_event(
        &stack,
        "daemon 2 to register",
        TIMEOUT,
        registered(d2.clone()),
    )
    .await?;
    until(
        "every job's first snapshot",
        Duration::from_secs(30),
        || async {
            let snaps = stores.snapshots(None).await?;
            Ok(jobs
                .iter()
                .all(|j| snaps.iter().any(|s| s.job == *j && s.daemon.is_some()))
                .then_some(()))
        },
    )
    .await?;

    let moved = handoff_ok(
        &url,
        &[
            "--json",
            "move-jobs",
            "--from",
            d1.as_str(),
            "--to",
            d2.as_str(),
            "--reason",
            "rebalance",
        ],
    )?
    .json()?;
    let move_id = moved["command"]
        .as_str()
        .ok_or_else(|| anyhow!("no move id in {moved}"))?
        .to_owned();
    // Mid-rebuild: the destination has said it is restoring or replaying.
    first_event(&stack, "daemon 2 to rebuild", TIMEOUT, |r| {
        matches!(&r.envelope.event, Event::JobMovePhaseReported { move_id: m, phase, .. }
            if m.as_str() == move_id
                && matches!(phase, MovePhase::RestoringSnapshot | MovePhase::ReplayingOplog))
    })
    .await?;
    let cancel = handoff_ok(
        &url,
        &[
            "--json",
            "cancel-move",
            &move_id,
            "--reason",
            "wrong destination",
        ],
    )?
    .json()?;
    let kinds: Vec<&str> = cancel["events"]
        .as_array()
        .map(|e| e.iter().filter_map(|e| e["type"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(kinds.first(), Some(&"MoveCancelled"), "{cancel}");

    // What the events say: each job ended its move once, cancelled or (rebuilt before
    // the cancel) completed; at least one was cancelled; the fold holds each job on one
    // daemon, not moving, and no THEFT_FAILED.
    let events = stack.events().await?;
    let mut state = State::default();
    for r in &events {
        state.apply(&r.envelope.event);
    }
    let mut cancelled = Vec::new();
    for j in &jobs {
        let ends: Vec<&Event> = events
            .iter()
            .map(|r| &r.envelope.event)
            .filter(|e| match e {
                Event::JobMoveCompleted {
                    job, move_id: m, ..
                }
                | Event::JobMoveFailed {
                    job, move_id: m, ..
                } => job == j && m.as_str() == move_id,
                _ => false,
            })
            .collect();
        assert_eq!(ends.len(), 1, "{j}: {ends:?}");
        let held = &state.jobs[j];
        match ends[0] {
            Event::JobMoveFailed {
                cancelled: true,
                returned_to,
                epoch: 3,
                ..
            } if *returned_to == d1 => {
                assert_eq!(held.assignment, Assignment::Assigned { daemon: d1.clone() });
                assert_eq!(held.epoch, 3);
                cancelled.push(j.clone());
            }
            Event::JobMoveCompleted { daemon, .. } if *daemon == d2 => {
                assert_eq!(held.assignment, Assignment::Assigned { daemon: d2.clone() });
            }
            other => panic!("{j}: unexpected end of its move {other:?}"),
        }
        let holders = state
            .daemons
            .values()
            .filter(|d| d.jobs.contains(j))
            .count();
        assert_eq!(holders, 1, "{j} held by {holders} daemons");
    }
    assert!(!cancelled.is_empty(), "the cancel came after every rebuild");
    assert!(
        state
            .alerts
            .iter()
            .all(|a| a.kind != AlertKind::TheftFailed),
        "{:?}",
        state.alerts
    );

    // The destination, told on its subject that the jobs went (released), stops its
    // work on them and drops the partial heads.
    let log = dir.path().join("daemon2.log");
    until("daemon 2 to drop the cancelled heads", TIMEOUT, || async {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let said = |j: &JobId, what: &str| {
            text.lines()
                .any(|l| l.contains(j.as_str()) && l.contains(what))
        };
        // Released on its subject (no fence or refused completion needed), then dropped.
        Ok(cancelled
            .iter()
            .all(|j| said(j, "job released to a move") && said(j, "dropping its head"))
            .then_some(()))
    })
    .await?;
    // The source keeps each cancelled job with the head it never dropped: its next
    // snapshot, at the new epoch, is the source's data at its timestamp.
    for j in &cancelled {
        let snap = until(
            "daemon 1 to snapshot the job again at its new epoch",
            Duration::from_secs(30),
            || async {
                Ok(stores
                    .snapshots(Some(j))
                    .await?
                    .into_iter()
                    .find(|s| s.epoch == 3 && s.daemon.as_ref() == Some(&d1)))
            },
        )
        .await?;
        let scan = scan_oplog(&stores, j).await?;
        assert_eq!(
            scan.source_at.get(&snap.ts),
            Some(&snap.checksum),
            "{j}: the snapshot after the cancel differs from the source at {}",
            snap.ts
        );
        let after: Vec<JobId> = stores
            .snapshots(Some(j))
            .await?
            .into_iter()
            .filter(|s| s.daemon.as_ref() == Some(&d2))
            .map(|s| s.job)
            .collect();
        assert!(after.is_empty(), "{j}: daemon 2 took snapshots of it");
    }
    keep.stack(stack).dir(dir);
    Ok(())
}

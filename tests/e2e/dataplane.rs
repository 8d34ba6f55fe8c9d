//! The data plane end to end, as the story of a lost daemon: three daemons, two replica
//! sets and a sharded cluster, writes running; daemon 1 is killed; all its jobs move to
//! daemon 2 while writes continue. The story runs once (real processes: the agent and
//! the daemons are `handoff` binaries) and records what happened; each test asserts one
//! rule on the record.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{anyhow, Result};
use async_nats::jetstream;
use futures::StreamExt;
use handoff_dataplane::daemon::Progress;
use handoff_dataplane::oplog::{self, Ts};
use handoff_dataplane::schedule::Schedule;
use handoff_dataplane::store::{now_ms, SnapshotMeta, Stores};
use handoff_domain::auth::Role;
use handoff_domain::model::HeadPoint;
use handoff_domain::{DaemonId, Event, JobId};
use handoff_tests::*;
use serde_json::Value;

/// An hour of schedule lasts this long here: a 6-hour interval is 3.6 s.
const HOUR_MS: u64 = 600;

/// A restore run during the move.
#[derive(Debug)]
struct RestoreRun {
    what: String,
    code: i32,
    output: Value,
    stderr: String,
}

/// What happened in the story.
#[derive(Debug)]
struct Story {
    schedule: Schedule,
    moved: Vec<JobId>,
    still: JobId,
    destination: DaemonId,
    move_started_ms: u64,
    completed: BTreeMap<JobId, (u64, Option<HeadPoint>)>,
    snapshots: Vec<SnapshotMeta>,
    oplog: BTreeMap<JobId, OplogScan>,
    restores: Vec<RestoreRun>,
    /// The `--at` of the point-in-time restore (seconds).
    pit_at: u64,
    moving_after_restores: usize,
    completed_when_killed: usize,
    rebuild_seen_before_kill: bool,
    /// The jobs of the progress reports after the restart, repeats folded.
    progress_after_restart: Vec<JobId>,
    /// The filter subjects of the event stream's consumers.
    consumer_filters: Vec<String>,
    daemon_subjects: Vec<String>,
    events_after_kill: Vec<String>,
    failed_reason: Option<String>,
    failed_back_to: Option<(DaemonId, u64)>,
    snapshot_after_failure: Option<SnapshotMeta>,
    logs: PathBuf,
}

static STORY: OnceLock<Result<Story, String>> = OnceLock::new();

/// The story, run once for every test of this module.
fn story() -> &'static Story {
    story_once(&STORY, || async {
        let mut keep = Keep::new();
        let record = run_story(&mut keep).await;
        (record, keep)
    })
}

fn events_of(events: &[handoff_eventlog::Recorded], kind: &str) -> usize {
    events
        .iter()
        .filter(|r| r.envelope.event.type_name() == kind)
        .count()
}

/// `handoff --json restore --job JOB --out OUT ARGS...`: its JSON answer.
fn restore_json(url: &str, job: &str, out: &Path, args: &[&str]) -> Result<Value> {
    let out = out.to_str().unwrap_or_default();
    let mut full = vec!["--json", "restore", "--job", job, "--out", out];
    full.extend_from_slice(args);
    handoff_ok(url, &full)?.json()
}

async fn run_story(keep: &mut Keep) -> Result<Story> {
    let (stack, stores) = data_stack(HOUR_MS).await?;
    let (url, client) = (stack.url(), stack.client.clone());
    let dir = tempfile::tempdir()?;
    let logs = dir.path().to_path_buf();
    let schedule = Schedule {
        hour_ms: HOUR_MS,
        ..Schedule::default()
    };
    let root = dir.path().to_path_buf();
    let head = |n: usize| root.join(format!("heads{n}"));
    let id = |n: usize| {
        DaemonId::new(format!("d{n}.test:{}/", head(n).display())).expect("a valid daemon id")
    };
    let mut daemon_creds = Vec::new();
    for n in 1..=3 {
        let user = stack
            .user(&format!("d{n}"), &[Role::BackupDaemon], Some(id(n)))
            .await?;
        daemon_creds.push(user.1);
    }
    let agent_creds = stack.user("agent", &[Role::BackupAgent], None).await?.1;
    let spawn_daemon = |n: usize, workers: &str| {
        Proc::daemon(
            &url,
            dir.path(),
            &format!("daemon{n}"),
            &daemon_creds[n - 1],
            &id(n),
            workers,
            "500",
        )
    };
    let agent = Proc::spawn(
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
            "--groom-ms",
            "500",
            "--initial-size",
            "512KiB",
            "--doc-size",
            "256",
        ],
    )?;
    let registered = |n: usize| {
        let stack = &stack;
        async move {
            let events = stack.events().await?;
            Ok(events.iter().any(|r| matches!(&r.envelope.event, Event::DaemonRegistered { daemon, .. } if *daemon == id(n))))
        }
    };
    // Daemon 1 alone takes the first replica set and the sharded cluster.
    let d1 = spawn_daemon(1, "2")?;
    until("daemon 1 to register", TIMEOUT, || registered(1)).await?;
    stack.apply(configure_project("p")).await?;
    stack.apply(replica_set("p", "rs1", 1)).await?;
    handoff_ok(
        &url,
        &[
            "job",
            "create",
            "--project",
            "p",
            "--sharded-cluster",
            "sc",
            "--shards",
            "s0,s1",
            "--head-size",
            "1GiB",
        ],
    )?;
    // Daemon 3 takes the second replica set; daemon 2 comes last and owns nothing.
    let d3 = spawn_daemon(3, "2")?;
    until("daemon 3 to register", TIMEOUT, || registered(3)).await?;
    stack.apply(replica_set("p", "rs2", 1)).await?;
    let mut d2 = spawn_daemon(2, "1")?;
    until("daemon 2 to register", TIMEOUT, || registered(2)).await?;
    let moved: Vec<JobId> = ["p/rs1", "p/sc/s0", "p/sc/s1", "p/sc/config"]
        .into_iter()
        .map(job)
        .collect();
    let still = job("p/rs2");

    // Every job has a snapshot cut by its daemon: heads are built and current.
    until(
        "every job's first scheduled snapshot",
        Duration::from_secs(30),
        || async {
            let snaps = stores.snapshots(None).await?;
            Ok(moved
                .iter()
                .chain([&still])
                .all(|j| snaps.iter().any(|s| s.job == *j && s.daemon.is_some())))
        },
    )
    .await?;

    // Daemon 1 dies. Daemon 2 is paused so the move stays in flight for a while.
    d1.kill()?;
    handoff_ok(&url, &["daemon", "down", id(1).as_str()])?;
    d2.signal("-STOP")?;
    let move_started_ms = now_ms();
    let out = handoff_ok(
        &url,
        &[
            "--json",
            "move-jobs",
            "--from",
            id(1).as_str(),
            "--to",
            id(2).as_str(),
            "--reason",
            "daemon 1 lost",
        ],
    )?
    .json()?;
    let move_id = out["command"]
        .as_str()
        .ok_or_else(|| anyhow!("no move id in {out}"))?
        .to_owned();

    // While it moves: the other job keeps its snapshots, a scheduled slot passes for the
    // moving ones, and restores run from the stores alone.
    let interval = schedule.interval_ms();
    until(
        "a slot to pass and daemon 3 to snapshot during the move",
        Duration::from_secs(30),
        || async {
            let snaps = stores.snapshots(Some(&still)).await?;
            Ok(now_ms() > move_started_ms + interval + 500
                && snaps.iter().any(|s| s.taken_at_ms > move_started_ms))
        },
    )
    .await?;
    let mut restores = Vec::new();
    let latest = stores
        .snapshots(Some(&moved[0]))
        .await?
        .last()
        .cloned()
        .ok_or_else(|| anyhow!("no snapshot"))?;
    let at = (now_ms() / 1000).to_string();
    for (what, args) in [
        (
            "snapshot of p/rs1",
            vec!["--job", "p/rs1", "--snapshot", latest.id.as_str()],
        ),
        (
            "point in time of p/sc",
            vec!["--job", "p/sc", "--at", at.as_str()],
        ),
        (
            "oplog timestamp of p/rs1",
            vec!["--job", "p/rs1", "--oplog-ts", &format!("{at}:1")],
        ),
    ] {
        let out_dir = dir.path().join(format!("restore-{}", restores.len()));
        let mut full = vec![
            "--json",
            "restore",
            "--out",
            out_dir.to_str().unwrap_or_default(),
        ];
        full.extend(args.iter().copied());
        let run = handoff(&url, &full)?;
        restores.push(RestoreRun {
            what: what.to_owned(),
            code: run.code,
            output: run.json().unwrap_or(Value::Null),
            stderr: run.stderr.clone(),
        });
    }
    let events = stack.events().await?;
    let moving_after_restores = moved.len() - events_of(&events, "JobMoveCompleted");

    // Daemon 2 wakes up, starts rebuilding, and is killed in the middle.
    let mut progress = client
        .subscribe(handoff_dataplane::store::progress_subject(&move_id))
        .await?;
    d2.signal("-CONT")?;
    let mut rebuild_seen_before_kill = false;
    while let Ok(Some(m)) = tokio::time::timeout(TIMEOUT, progress.next()).await {
        let p: Progress = serde_json::from_slice(&m.payload)?;
        if p.snapshot_bytes > 0 || p.entries_applied > 0 {
            rebuild_seen_before_kill = true;
            break;
        }
    }
    d2.kill()?;
    let killed_at = stack.last_seq().await?;
    let completed_when_killed = events_of(&stack.events().await?, "JobMoveCompleted");
    // Progress after the restart, in order, to see how many rebuilds ran at once: a new
    // subscription (the old one may still hold reports of the killed process), in place
    // before the daemon starts (a round trip on the same connection orders it).
    drop(progress);
    let mut progress = client
        .subscribe(handoff_dataplane::store::progress_subject(&move_id))
        .await?;
    stack.last_seq().await?;
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel();
    let follower = tokio::spawn(async move {
        while let Some(m) = progress.next().await {
            if let Ok(p) = serde_json::from_slice::<Progress>(&m.payload) {
                let _ = seen_tx.send(p.job);
            }
        }
    });
    d2 = spawn_daemon(2, "1")?;
    until(
        "every moved job to complete on daemon 2",
        Duration::from_secs(60),
        || async { Ok(events_of(&stack.events().await?, "JobMoveCompleted") == moved.len()) },
    )
    .await?;
    follower.abort();
    let mut progress_after_restart = Vec::new();
    while let Ok(job) = seen_rx.try_recv() {
        if progress_after_restart.last() != Some(&job) {
            progress_after_restart.push(job);
        }
    }
    // Every daemon reads its own subject only: the server filters for it.
    let mut consumer_filters = Vec::new();
    let events_stream = jetstream::new(client.clone())
        .get_stream(handoff_protocol::subjects::STREAM)
        .await?;
    let mut consumers = events_stream.consumers();
    while let Some(c) = consumers.next().await {
        let c = c?;
        consumer_filters.push(c.config.filter_subject.clone());
        consumer_filters.extend(c.config.filter_subjects.clone());
    }
    let events = stack.events().await?;
    let mut completed = BTreeMap::new();
    for r in &events {
        if let Event::JobMoveCompleted { job, head, .. } = &r.envelope.event {
            completed.insert(job.clone(), (r.envelope.at, head.clone()));
        }
    }
    let events_after_kill = events
        .iter()
        .filter(|r| r.seq > killed_at)
        .map(|r| format!("{} by {}", r.envelope.event.type_name(), r.envelope.actor))
        .collect();
    let mut oplog = BTreeMap::new();
    for j in &moved {
        oplog.insert(j.clone(), scan_oplog(&stores, j).await?);
    }

    // The moved jobs' next snapshots come at their next regular slot.
    let done_at = completed.values().map(|(at, _)| *at).max().unwrap_or(0);
    until(
        "a snapshot of each moved job after the move",
        Duration::from_secs(30),
        || async {
            let snaps = stores.snapshots(None).await?;
            Ok(moved
                .iter()
                .all(|j| snaps.iter().any(|s| s.job == *j && s.taken_at_ms > done_at)))
        },
    )
    .await?;

    // A move that cannot finish: the latest snapshot of rs2 is corrupt.
    d3.signal("-STOP")?;
    let mut bad = stores
        .snapshots(Some(&still))
        .await?
        .last()
        .cloned()
        .ok_or_else(|| anyhow!("no snapshot of rs2"))?;
    stores
        .put_snapshot_unfenced(&bad, b"{\"id\":\"d1\",\"doc\":{\"not\":\"the data\"}}\n")
        .await?;
    bad.size_bytes = 0;
    let failed_move = handoff_ok(
        &url,
        &["--json", "move-job", still.as_str(), "--to", id(2).as_str()],
    )?
    .json()?;
    let failed_id = failed_move["command"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    until("the move of rs2 to fail", TIMEOUT, || async {
        Ok(events_of(&stack.events().await?, "JobMoveFailed") > 0)
    })
    .await?;
    d3.signal("-CONT")?;
    let events = stack.events().await?;
    let mut failed_reason = None;
    let mut failed_back_to = None;
    for r in &events {
        match &r.envelope.event {
            Event::JobMoveFailed {
                reason,
                returned_to,
                epoch,
                move_id,
                ..
            } if move_id.as_str() == failed_id => {
                failed_reason = Some(reason.clone());
                failed_back_to = Some((returned_to.clone(), *epoch));
            }
            _ => {}
        }
    }
    let back_epoch = failed_back_to.as_ref().map_or(0, |(_, e)| *e);
    until(
        "daemon 3 to snapshot rs2 again with its new epoch",
        Duration::from_secs(30),
        || async {
            let snaps = stores.snapshots(Some(&still)).await?;
            Ok(snaps
                .iter()
                .any(|s| s.epoch == back_epoch && s.daemon.is_some()))
        },
    )
    .await?;
    let snapshot_after_failure = stores
        .snapshots(Some(&still))
        .await?
        .into_iter()
        .find(|s| s.epoch == back_epoch && s.daemon.is_some());
    let snapshots = stores.snapshots(None).await?;
    keep.push(Box::new(stack));
    keep.push(Box::new(agent));
    keep.push(Box::new(d2));
    keep.push(Box::new(d3));
    keep.push(Box::new(dir));
    Ok(Story {
        schedule,
        moved,
        still,
        destination: id(2),
        move_started_ms,
        completed,
        snapshots,
        oplog,
        restores,
        pit_at: at.parse()?,
        moving_after_restores,
        completed_when_killed,
        rebuild_seen_before_kill,
        progress_after_restart,
        consumer_filters,
        daemon_subjects: [2, 3]
            .map(|n| handoff_protocol::subjects::daemon(&id(n)))
            .to_vec(),
        events_after_kill,
        failed_reason,
        failed_back_to,
        snapshot_after_failure,
        logs,
    })
}

/// Rule 4: no snapshot of a moving job while it moves; the other job keeps its own.
#[test]
fn no_snapshot_of_a_moving_job_during_the_move_while_others_keep_theirs() {
    let s = story();
    for j in &s.moved {
        let (done, _) = s.completed[j];
        let during: Vec<&SnapshotMeta> = s
            .snapshots
            .iter()
            .filter(|x| x.job == *j && x.taken_at_ms >= s.move_started_ms && x.taken_at_ms < done)
            .collect();
        assert!(
            during.is_empty(),
            "{j} was snapshotted while moving: {during:?}"
        );
    }
    let end = s.completed.values().map(|(at, _)| *at).max().unwrap_or(0);
    let kept = s
        .snapshots
        .iter()
        .filter(|x| x.job == s.still && x.taken_at_ms >= s.move_started_ms && x.taken_at_ms < end)
        .count();
    assert!(
        kept >= 1,
        "the job that did not move took no snapshot during the move"
    );
}

/// Rule 5: the oplog written while the jobs moved (and their source was dead) is all there.
#[test]
fn no_oplog_entry_is_lost() {
    let s = story();
    for j in &s.moved {
        let scan = &s.oplog[j];
        assert!(
            scan.gaps.is_empty(),
            "{j}: entries missing between {:?} (logs in {})",
            scan.gaps,
            s.logs.display()
        );
        assert_eq!(
            scan.first_n, 1,
            "{j}: the oplog no longer starts at its first entry"
        );
        let during = scan
            .source_at
            .keys()
            .filter(|ts| u64::from(ts.t) * 1000 >= s.move_started_ms)
            .count();
        assert!(
            during > 100,
            "{j}: only {during} entries were saved during the move"
        );
    }
}

/// Rule 6: each rebuilt head equals the source at the same oplog timestamp.
#[test]
fn each_rebuilt_head_has_the_source_checksum_at_its_timestamp() {
    let s = story();
    for j in &s.moved {
        let (_, head) = &s.completed[j];
        let head = head
            .as_ref()
            .unwrap_or_else(|| panic!("{j}: completed without a head point"));
        let ts: Ts = head.ts.parse().unwrap();
        let source = s.oplog[j]
            .source_at
            .get(&ts)
            .unwrap_or_else(|| panic!("{j}: no oplog entry at {ts}"));
        assert_eq!(
            head.checksum,
            source.to_string(),
            "{j}: the rebuilt head differs from the source at {ts}"
        );
        assert!(
            u64::from(ts.t) * 1000 + 1000 >= s.move_started_ms,
            "{j}: the head stopped before the move at {ts}"
        );
    }
}

/// Rule 8: snapshot and point-in-time restores work during the move, daemon dead.
#[test]
fn snapshot_and_point_in_time_restores_succeed_during_the_move() {
    let s = story();
    assert_eq!(
        s.moving_after_restores,
        s.moved.len(),
        "the move was over before the restores ran"
    );
    for r in &s.restores {
        assert_eq!(r.code, 0, "{} failed: {}", r.what, r.stderr);
        let jobs = r
            .output
            .as_array()
            .unwrap_or_else(|| panic!("{}: no result: {}", r.what, r.output));
        assert!(!jobs.is_empty());
        for j in jobs {
            assert_eq!(
                j["checksum"], j["source_checksum"],
                "{}: not verified against the source: {j}",
                r.what
            );
            assert!(
                j["documents"].as_u64().unwrap_or(0) > 0,
                "{}: empty restore",
                r.what
            );
        }
    }
    let cluster = s.restores.iter().find(|r| r.what.contains("p/sc")).unwrap();
    let jobs: BTreeSet<&str> = cluster
        .output
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|j| j["job"].as_str())
        .collect();
    assert_eq!(
        jobs,
        BTreeSet::from(["p/sc/config", "p/sc/s0", "p/sc/s1"]),
        "every shard and the config servers"
    );
    // One common point: every job's last operation is before the chosen time.
    for j in cluster.output.as_array().unwrap() {
        let t = j["ts"]["t"].as_u64().unwrap();
        assert!(
            t < s.pit_at,
            "{}: restored up to {t}, at or past {}",
            j["job"],
            s.pit_at
        );
    }
}

/// Rule 7: after the move, the next snapshot comes at the next regular slot, not a burst.
#[test]
fn the_next_snapshot_comes_at_the_regular_interval() {
    let s = story();
    for j in &s.moved {
        let (done, _) = s.completed[j];
        let after: Vec<&SnapshotMeta> = s
            .snapshots
            .iter()
            .filter(|x| x.job == *j && x.taken_at_ms >= done)
            .collect();
        let first = after
            .first()
            .unwrap_or_else(|| panic!("{j}: no snapshot after the move"));
        let slot = first.slot_ms.expect("a scheduled snapshot");
        assert!(
            slot >= done,
            "{j}: a missed slot ({slot}) was taken after the move ({done})"
        );
        assert!(
            slot <= done + s.schedule.interval_ms() + 1000,
            "{j}: slot {slot} is not the next one after {done}"
        );
        assert!(
            first.taken_at_ms >= slot && first.taken_at_ms < slot + 2000,
            "{j}: taken at {} for slot {slot}",
            first.taken_at_ms
        );
        let same_slot = after.iter().filter(|x| x.slot_ms == Some(slot)).count();
        assert_eq!(same_slot, 1, "{j}: a burst of snapshots for one slot");
    }
}

/// The destination killed in the middle of its rebuild finishes after its restart, with no
/// command from anyone but itself.
#[test]
fn the_destination_killed_mid_rebuild_finishes_after_restart() {
    let s = story();
    assert!(
        s.rebuild_seen_before_kill,
        "the rebuild had not started when the daemon was killed"
    );
    assert!(
        s.completed_when_killed < s.moved.len(),
        "the rebuild was over before the kill"
    );
    for e in &s.events_after_kill {
        assert!(
            e.ends_with("by d2"),
            "someone else acted after the kill: {e}"
        );
    }
    assert_eq!(s.completed.len(), s.moved.len());
    assert!(s.destination.as_str().starts_with("d2.test:"));
}

/// Rule 9: a rebuild that cannot finish ends as a failed move with its reason, and the job
/// stays with its previous owner, which keeps backing it up.
#[test]
fn a_rebuild_from_a_corrupt_snapshot_fails_the_move_and_the_job_is_not_lost() {
    let s = story();
    let reason = s.failed_reason.as_deref().expect("the move failed");
    assert!(reason.contains("corrupt"), "unclear reason: {reason}");
    let (owner, epoch) = s.failed_back_to.clone().expect("returned");
    assert!(
        owner.as_str().starts_with("d3.test:"),
        "returned to {owner}"
    );
    let snap = s
        .snapshot_after_failure
        .as_ref()
        .expect("a snapshot after the failure");
    assert_eq!(snap.epoch, epoch);
    assert_eq!(snap.daemon.as_ref(), Some(&owner));
}

/// Oplog retention: entries past the window that nothing needs are purged and expired
/// snapshots go; when the only daemon dies, the entries after its last snapshot are kept
/// past the window and the retention grows with OPLOG_TTL_RESIZE events.
#[tokio::test]
async fn retention_purges_what_nothing_needs_and_grows_for_what_is_needed() -> Result<()> {
    let stack = Stack::start().await?;
    let url = stack.url();
    let dir = tempfile::tempdir()?;
    let stores = Stores::open(stack.client.clone(), 1).await?;
    // An hour of 100 ms: snapshots every 0.6 s, a 2.4 s window, snapshots kept 4.8 s.
    handoff_ok(
        &url,
        &[
            "schedule",
            "--hour-ms",
            "100",
            "--daily-days",
            "0",
            "--weekly-weeks",
            "0",
            "--monthly-months",
            "0",
        ],
    )?;
    let agent_creds = stack.user("agent", &[Role::BackupAgent], None).await?.1;
    let _agent = Proc::spawn(
        &url,
        dir.path(),
        "agent",
        &agent_creds,
        &[
            "agent",
            "--ops-per-sec",
            "200",
            "--slice-ms",
            "100",
            "--groom-ms",
            "200",
            "--initial-size",
            "64KiB",
            "--doc-size",
            "128",
        ],
    )?;
    let id = format!("r1.test:{}/", dir.path().join("heads").display());
    let d1_creds = stack
        .user(
            "r1",
            &[Role::BackupDaemon],
            Some(DaemonId::new(id.clone())?),
        )
        .await?
        .1;
    let d1 = Proc::spawn(
        &url,
        dir.path(),
        "daemon1",
        &d1_creds,
        &["daemon", "--id", &id, "--head-space", "10GiB"],
    )?;
    wait_for("the daemon to register", || async {
        Ok(of_type(&stack.events().await?, "DaemonRegistered")
            .first()
            .map(|_| ()))
    })
    .await?;
    stack.apply(configure_project("p")).await?;
    stack.apply(replica_set("p", "rs", 1)).await?;
    let rs = job("p/rs");
    // Alive: the head keeps up, old entries are purged and the initial snapshot expires.
    until(
        "old oplog purged and the initial snapshot expired",
        Duration::from_secs(30),
        || async {
            let first = stores.oplog_first(&rs).await?.map(|(s, _)| s).unwrap_or(0);
            let snaps = stores.snapshots(Some(&rs)).await?;
            Ok(first > 1 && !snaps.is_empty() && snaps.iter().all(|s| s.daemon.is_some()))
        },
    )
    .await?;
    assert!(
        of_type(&stack.events().await?, "OplogTtlResized").is_empty(),
        "a current head needs no resize"
    );

    // Dead: nothing applies the oplog any more; what a rebuild needs stays.
    d1.kill()?;
    let latest = stores
        .snapshots(Some(&rs))
        .await?
        .last()
        .cloned()
        .ok_or_else(|| anyhow!("no snapshot"))?;
    wait_for("OPLOG_TTL_RESIZE", || async {
        let events = stack.events().await?;
        Ok(events.iter().find_map(|r| match &r.envelope.event {
            Event::OplogTtlResized {
                job,
                hours,
                previous_hours,
                reason,
            } if *job == rs => Some((*hours, *previous_hours, reason.clone())),
            _ => None,
        }))
    })
    .await
    .map(|(hours, previous, reason)| {
        assert!(hours > previous && previous >= 24, "{previous} -> {hours}");
        assert!(reason.contains("still needs"), "{reason}");
    })?;
    // Well past the original window (the retention has grown a second time), the entries
    // after the last snapshot are all there: a restore to the end of the oplog replays
    // them and matches the source.
    wait_for("a second OPLOG_TTL_RESIZE", || async {
        let events = stack.events().await?;
        Ok(events.iter().find_map(|r| match &r.envelope.event {
            Event::OplogTtlResized {
                job,
                previous_hours,
                ..
            } if *job == rs && *previous_hours > 24 => Some(()),
            _ => None,
        }))
    })
    .await?;
    let first = stores.oplog_first(&rs).await?.map(|(s, _)| s).unwrap_or(0);
    assert!(
        first <= latest.oplog_seq.max(1),
        "purged entries the last snapshot needs: first {first}, snapshot at {}",
        latest.oplog_seq
    );
    let until_now = format!("{}:0", now_ms() / 1000);
    let restored = restore_json(
        &url,
        "p/rs",
        &dir.path().join("restore"),
        &["--oplog-ts", &until_now],
    )?;
    let r = &restored[0];
    assert_eq!(r["checksum"], r["source_checksum"]);
    assert!(r["entries_applied"].as_u64().unwrap_or(0) > 0);
    Ok(())
}

/// A daemon runs at most its number of workers rebuilds at once: with one worker, the
/// progress reports come one job after another, never interleaved.
#[test]
fn a_daemon_runs_at_most_its_workers_rebuilds_at_once() {
    let s = story();
    let jobs = &s.progress_after_restart;
    assert!(
        jobs.len() >= 2,
        "too few rebuilds reported to tell: {jobs:?}"
    );
    let distinct: BTreeSet<&JobId> = jobs.iter().collect();
    assert_eq!(
        distinct.len(),
        jobs.len(),
        "rebuilds ran side by side on one worker: {jobs:?}"
    );
}

/// Each daemon's assignments are filtered by the server: its consumer reads its subject.
#[test]
fn daemons_read_only_their_own_subject() {
    let s = story();
    for subject in &s.daemon_subjects {
        assert!(
            s.consumer_filters.contains(subject),
            "no consumer filtered on {subject}: {:?}",
            s.consumer_filters
        );
    }
}

/// The agent needs no daemon: with none running, it syncs a new job and saves its oplog.
/// Killed and started again, it carries the source on from the stores: the oplog goes on
/// with no gap and still adds up to the source's checksums.
#[tokio::test]
async fn the_agent_needs_no_daemon_and_resumes_after_a_kill() -> Result<()> {
    let stack = Stack::start().await?;
    let url = stack.url();
    let dir = tempfile::tempdir()?;
    let stores = Stores::open(stack.client.clone(), 1).await?;
    // A registered daemon that never runs.
    stack.apply(register(1, settings(100))).await?;
    stack.apply(configure_project("p")).await?;
    stack.apply(replica_set("p", "rs", 1)).await?;
    let rs = job("p/rs");
    let args = [
        "agent",
        "--ops-per-sec",
        "300",
        "--slice-ms",
        "100",
        "--initial-size",
        "64KiB",
        "--doc-size",
        "128",
    ];
    let last_n = || async {
        Ok::<u64, anyhow::Error>(match stores.oplog_last(&rs).await? {
            Some((_, headers)) => headers
                .get(oplog::LAST_N)
                .and_then(|v| v.as_str().parse().ok())
                .unwrap_or(0),
            None => 0,
        })
    };
    let agent_creds = stack.user("agent", &[Role::BackupAgent], None).await?.1;
    let agent = Proc::spawn(&url, dir.path(), "agent", &agent_creds, &args)?;
    until("oplog saved with no daemon running", TIMEOUT, || async {
        Ok(last_n().await? >= 300)
    })
    .await?;
    agent.kill()?;
    let at_kill = last_n().await?;
    let _agent = Proc::spawn(&url, dir.path(), "agent-again", &agent_creds, &args)?;
    until("the oplog to go on after the restart", TIMEOUT, || async {
        Ok(last_n().await? >= at_kill + 300)
    })
    .await?;
    let scan = scan_oplog(&stores, &rs).await?;
    assert!(scan.gaps.is_empty(), "gaps: {:?}", scan.gaps);
    assert_eq!(scan.first_n, 1);
    assert!(scan.last_n >= at_kill + 300);
    let until_now = format!("{}:0", now_ms() / 1000);
    let restored = restore_json(
        &url,
        "p/rs",
        &dir.path().join("restore"),
        &["--oplog-ts", &until_now],
    )?;
    let r = &restored[0];
    assert_eq!(r["checksum"], r["source_checksum"], "{r}");
    assert!(r["n"].as_u64().unwrap_or(0) > at_kill, "{r}");
    assert_eq!(
        stores.snapshots(Some(&rs)).await?.len(),
        1,
        "one initial sync, not one per start"
    );
    // An oplog timestamp is inclusive; a point in time excludes its own second.
    let points: Vec<(&Ts, &handoff_dataplane::Checksum)> = scan.source_at.iter().collect();
    let (mid, mid_c) = points[points.len() / 2];
    let run = |args: &[&str]| {
        let out = dir.path().join(format!("r{}", args.len()));
        restore_json(&url, "p/rs", &out, args)
    };
    let (mid_ts, mid_t) = (mid.to_string(), mid.t.to_string());
    let r = run(&["--oplog-ts", &mid_ts])?;
    assert_eq!(
        r[0]["ts"],
        serde_json::to_value(mid)?,
        "inclusive: {}",
        r[0]
    );
    assert_eq!(r[0]["checksum"], mid_c.to_string());
    let r = run(&["--at", &mid_t, "--snapshot-less"]);
    assert!(r.is_err(), "an unknown flag is refused");
    let r = run(&["--at", &mid_t])?;
    let before = points
        .iter()
        .rev()
        .find(|(ts, _)| ts.t < mid.t)
        .map(|(ts, _)| **ts)
        .expect("an entry before");
    assert_eq!(
        r[0]["ts"],
        serde_json::to_value(before)?,
        "exclusive of {}: {}",
        mid.t,
        r[0]
    );
    Ok(())
}

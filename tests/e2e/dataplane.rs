//! The data plane end to end, as the story of a lost daemon: three daemons, two replica
//! sets and a sharded cluster, writes running; daemon 1 is killed; all its jobs move to
//! daemon 2 while writes continue. The story runs once (real processes: the agent and
//! the daemons are `handoff` binaries) and records what happened; each test asserts one
//! rule on the record. Its steps, one function each in [`run_story`]:
//!
//! 1. The fleet starts and the jobs are placed: daemon 1 takes rs1 and the sharded
//!    cluster, daemon 3 takes rs2, daemon 2 owns nothing; every job gets a snapshot.
//! 2. Daemon 1 is killed and its jobs move to daemon 2, which is frozen meanwhile so the
//!    move stays in flight; restores run from the stores during the move.
//! 3. Daemon 2 is thawed, killed mid-rebuild, and restarted: it finishes by itself.
//! 4. The moved jobs' next snapshots come at their next slot.
//! 5. A move of rs2 from a corrupt snapshot fails, and daemon 3 keeps backing rs2 up.

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
use handoff_dataplane::store::{SnapshotMeta, Stores};
use handoff_domain::auth::Role;
use handoff_domain::model::HeadPoint;
use handoff_domain::{DaemonId, Event, JobId};
use handoff_protocol::now_ms;
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
        let mut keep = Keep::default();
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

/// The story's running parts: the stack and its stores, the agent, and where the daemons'
/// heads and every process's log go.
struct Fleet {
    stack: Stack,
    stores: Stores,
    dir: tempfile::TempDir,
    /// Daemon `n`'s credentials file is at `n - 1`.
    daemon_creds: Vec<PathBuf>,
    agent: Proc,
}

impl Fleet {
    fn url(&self) -> String {
        self.stack.url()
    }

    fn id(&self, n: usize) -> DaemonId {
        daemon_id(self.dir.path(), n)
    }

    /// Starts daemon `n` with `workers` rebuild workers.
    fn spawn_daemon(&self, n: usize, workers: &str) -> Result<Proc> {
        Proc::daemon(
            &self.url(),
            self.dir.path(),
            &format!("daemon{n}"),
            &self.daemon_creds[n - 1],
            &self.id(n),
            workers,
            "500",
        )
    }

    /// Starts daemon `n` and waits until it has registered.
    async fn start_daemon(&self, n: usize, workers: &str) -> Result<Proc> {
        let daemon = self.spawn_daemon(n, workers)?;
        let id = self.id(n);
        first_event(&self.stack, &format!("daemon {n} to register"), TIMEOUT, |r| {
            matches!(&r.envelope.event, Event::DaemonRegistered { daemon, .. } if *daemon == id)
        })
        .await?;
        Ok(daemon)
    }

    /// How many events of `kind` the stream holds.
    async fn count(&self, kind: &str) -> Result<usize> {
        Ok(events_of(&self.stack.events().await?, kind))
    }
}

/// Daemon `n`'s id, `d<n>.test:<its head directory under root>/`.
fn daemon_id(root: &Path, n: usize) -> DaemonId {
    let head = root.join(format!("heads{n}"));
    DaemonId::new(format!("d{n}.test:{}/", head.display())).expect("a valid daemon id")
}

/// The jobs of daemon 1, which all move: a replica set and the sharded cluster's.
fn moving_jobs() -> Vec<JobId> {
    ["p/rs1", "p/sc/s0", "p/sc/s1", "p/sc/config"]
        .into_iter()
        .map(job)
        .collect()
}

/// The job of daemon 3, which stays where it is until its own move fails.
fn staying_job() -> JobId {
    job("p/rs2")
}

/// The move of daemon 1's jobs, once sent.
struct Move {
    id: String,
    started_ms: u64,
}

async fn run_story(keep: &mut Keep) -> Result<Story> {
    let schedule = Schedule {
        hour_ms: HOUR_MS,
        ..Schedule::default()
    };
    let (moved, still) = (moving_jobs(), staying_job());
    let fleet = start_the_fleet().await?;
    let [d1, d2, mut d3] = place_the_jobs(&fleet).await?;
    wait_for_every_first_snapshot(&fleet).await?;
    let (d2, mv) = lose_daemon_1_and_move_its_jobs(&fleet, d1, d2)?;
    let restores = restore_during_the_move(&fleet, &schedule, &mv).await?;
    let killed = kill_the_destination_mid_rebuild(&fleet, d2, &mv).await?;
    let (d2, progress_after_restart) = restart_the_destination(&fleet, &mv).await?;
    let after = read_what_the_move_left(&fleet, killed.at_seq).await?;
    wait_for_the_next_snapshots(&fleet, &after.completed).await?;
    let failure = fail_a_move_from_a_corrupt_snapshot(&fleet, &mut d3).await?;
    let snapshots = fleet.stores.snapshots(None).await?;
    let (destination, logs) = (fleet.id(2), fleet.dir.path().to_path_buf());
    let daemon_subjects = [2, 3]
        .map(|n| handoff_protocol::subjects::daemon(&fleet.id(n)))
        .to_vec();
    let Fleet {
        stack, dir, agent, ..
    } = fleet;
    keep.process(agent).process(d2).process(d3);
    keep.stack(stack).dir(dir);
    Ok(Story {
        schedule,
        moved,
        still,
        destination,
        move_started_ms: mv.started_ms,
        completed: after.completed,
        snapshots,
        oplog: after.oplog,
        restores: restores.runs,
        pit_at: restores.pit_at,
        moving_after_restores: restores.moving_after,
        completed_when_killed: killed.completed,
        rebuild_seen_before_kill: killed.rebuild_seen,
        progress_after_restart,
        consumer_filters: after.consumer_filters,
        daemon_subjects,
        events_after_kill: after.events_after_kill,
        failed_reason: failure.reason,
        failed_back_to: failure.back_to,
        snapshot_after_failure: failure.snapshot_after,
        logs,
    })
}

/// A stack with the schedule's short hours, the daemons' and the agent's users, and the
/// agent writing to every job's source.
async fn start_the_fleet() -> Result<Fleet> {
    let (stack, stores) = data_stack(HOUR_MS).await?;
    let dir = tempfile::tempdir()?;
    let mut daemon_creds = Vec::new();
    for n in 1..=3 {
        let id = daemon_id(dir.path(), n);
        let user = stack
            .user(&format!("d{n}"), &[Role::BackupDaemon], Some(id))
            .await?;
        daemon_creds.push(user.1);
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
            "512KiB",
            "--doc-size",
            "256",
        ],
    )?;
    Ok(Fleet {
        stack,
        stores,
        dir,
        daemon_creds,
        agent,
    })
}

/// Daemon 1 alone takes the first replica set and the sharded cluster; daemon 3 takes
/// the second replica set; daemon 2 comes last and owns nothing. The three daemons.
async fn place_the_jobs(fleet: &Fleet) -> Result<[Proc; 3]> {
    let stack = &fleet.stack;
    let d1 = fleet.start_daemon(1, "2").await?;
    stack.apply(configure_project("p")).await?;
    stack.apply(replica_set("p", "rs1", 1)).await?;
    handoff_ok(
        &fleet.url(),
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
    let d3 = fleet.start_daemon(3, "2").await?;
    stack.apply(replica_set("p", "rs2", 1)).await?;
    let d2 = fleet.start_daemon(2, "1").await?;
    Ok([d1, d2, d3])
}

/// Every job has a snapshot cut by its daemon: heads are built and current.
async fn wait_for_every_first_snapshot(fleet: &Fleet) -> Result<()> {
    let jobs: Vec<JobId> = moving_jobs().into_iter().chain([staying_job()]).collect();
    until(
        "every job's first scheduled snapshot",
        Duration::from_secs(30),
        || async {
            let snaps = fleet.stores.snapshots(None).await?;
            Ok(jobs
                .iter()
                .all(|j| snaps.iter().any(|s| s.job == *j && s.daemon.is_some()))
                .then_some(()))
        },
    )
    .await
}

/// Daemon 1 dies, and its jobs move to daemon 2. Daemon 2 is paused first, so the move
/// stays in flight for a while; it comes back paused.
fn lose_daemon_1_and_move_its_jobs(fleet: &Fleet, d1: Proc, mut d2: Proc) -> Result<(Proc, Move)> {
    let url = fleet.url();
    d1.kill()?;
    handoff_ok(&url, &["daemon", "down", fleet.id(1).as_str()])?;
    d2.signal(Signal::Stop)?;
    let started_ms = now_ms();
    let out = handoff_ok(
        &url,
        &[
            "--json",
            "move-jobs",
            "--from",
            fleet.id(1).as_str(),
            "--to",
            fleet.id(2).as_str(),
            "--reason",
            "daemon 1 lost",
        ],
    )?
    .json()?;
    let id = out["command"]
        .as_str()
        .ok_or_else(|| anyhow!("no move id in {out}"))?
        .to_owned();
    Ok((d2, Move { id, started_ms }))
}

/// The restores run while the jobs move.
struct Restores {
    runs: Vec<RestoreRun>,
    /// The `--at` of the point-in-time restore (seconds).
    pit_at: u64,
    /// How many jobs were still moving once the restores were done.
    moving_after: usize,
}

/// While it moves: the other job keeps its snapshots, a scheduled slot passes for the
/// moving ones, and restores run from the stores alone.
async fn restore_during_the_move(
    fleet: &Fleet,
    schedule: &Schedule,
    mv: &Move,
) -> Result<Restores> {
    let (stores, still) = (&fleet.stores, staying_job());
    let interval = schedule.interval_ms();
    until(
        "a slot to pass and daemon 3 to snapshot during the move",
        Duration::from_secs(30),
        || async {
            let snaps = stores.snapshots(Some(&still)).await?;
            Ok((now_ms() > mv.started_ms + interval + 500
                && snaps.iter().any(|s| s.taken_at_ms > mv.started_ms))
            .then_some(()))
        },
    )
    .await?;
    let latest = stores
        .snapshots(Some(&job("p/rs1")))
        .await?
        .last()
        .cloned()
        .ok_or_else(|| anyhow!("no snapshot"))?;
    let at = (now_ms() / 1000).to_string();
    let mut runs = Vec::new();
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
        let out_dir = fleet.dir.path().join(format!("restore-{}", runs.len()));
        let mut full = vec![
            "--json",
            "restore",
            "--out",
            out_dir.to_str().unwrap_or_default(),
        ];
        full.extend(args.iter().copied());
        let run = handoff(&fleet.url(), &full)?;
        runs.push(RestoreRun {
            what: what.to_owned(),
            code: run.code,
            output: run.json().unwrap_or(Value::Null),
            stderr: run.stderr.clone(),
        });
    }
    let moving_after = moving_jobs().len() - fleet.count("JobMoveCompleted").await?;
    Ok(Restores {
        runs,
        pit_at: at.parse()?,
        moving_after,
    })
}

/// What was true when the destination was killed.
struct Killed {
    /// It had reported progress of a rebuild.
    rebuild_seen: bool,
    /// The stream's last sequence.
    at_seq: u64,
    /// Moves completed by then.
    completed: usize,
}

/// Daemon 2 wakes up, starts rebuilding, and is killed in the middle.
async fn kill_the_destination_mid_rebuild(
    fleet: &Fleet,
    mut d2: Proc,
    mv: &Move,
) -> Result<Killed> {
    let mut progress = fleet
        .stack
        .client
        .subscribe(handoff_protocol::subjects::progress(&mv.id))
        .await?;
    d2.signal(Signal::Cont)?;
    let mut rebuild_seen = false;
    while let Ok(Some(m)) = tokio::time::timeout(TIMEOUT, progress.next()).await {
        let p: Progress = serde_json::from_slice(&m.payload)?;
        if p.snapshot_bytes > 0 || p.entries_applied > 0 {
            rebuild_seen = true;
            break;
        }
    }
    d2.kill()?;
    Ok(Killed {
        rebuild_seen,
        at_seq: fleet.stack.last_seq().await?,
        completed: fleet.count("JobMoveCompleted").await?,
    })
}

/// Daemon 2 starts again and finishes every rebuild by itself. The daemon, and the jobs
/// of its progress reports in order (repeats folded), to see how many rebuilds ran at
/// once.
async fn restart_the_destination(fleet: &Fleet, mv: &Move) -> Result<(Proc, Vec<JobId>)> {
    // A new subscription (the old one may still hold reports of the killed process), in
    // place before the daemon starts (a round trip on the same connection orders it).
    let mut progress = fleet
        .stack
        .client
        .subscribe(handoff_protocol::subjects::progress(&mv.id))
        .await?;
    fleet.stack.last_seq().await?;
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel();
    let follower = tokio::spawn(async move {
        while let Some(m) = progress.next().await {
            if let Ok(p) = serde_json::from_slice::<Progress>(&m.payload) {
                // Ignored: the receiver outlives the follower, which is aborted first.
                let _ = seen_tx.send(p.job);
            }
        }
    });
    let d2 = fleet.spawn_daemon(2, "1")?;
    let moving = moving_jobs().len();
    until(
        "every moved job to complete on daemon 2",
        Duration::from_secs(60),
        || async { Ok((fleet.count("JobMoveCompleted").await? == moving).then_some(())) },
    )
    .await?;
    follower.abort();
    let mut jobs = Vec::new();
    while let Ok(job) = seen_rx.try_recv() {
        if jobs.last() != Some(&job) {
            jobs.push(job);
        }
    }
    Ok((d2, jobs))
}

/// What the stores and the stream hold once the move is over.
struct AfterTheMove {
    /// The filter subjects of the event stream's consumers.
    consumer_filters: Vec<String>,
    completed: BTreeMap<JobId, (u64, Option<HeadPoint>)>,
    events_after_kill: Vec<String>,
    oplog: BTreeMap<JobId, OplogScan>,
}

/// Reads the consumers' filters (every daemon reads its own subject only: the server
/// filters for it), each job's completion, who acted after the kill (at `killed_at`), and
/// each moved job's oplog.
async fn read_what_the_move_left(fleet: &Fleet, killed_at: u64) -> Result<AfterTheMove> {
    let mut consumer_filters = Vec::new();
    let events_stream = jetstream::new(fleet.stack.client.clone())
        .get_stream(handoff_protocol::subjects::STREAM)
        .await?;
    let mut consumers = events_stream.consumers();
    while let Some(c) = consumers.next().await {
        let c = c?;
        consumer_filters.push(c.config.filter_subject.clone());
        consumer_filters.extend(c.config.filter_subjects.clone());
    }
    let events = fleet.stack.events().await?;
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
    for j in moving_jobs() {
        let scan = scan_oplog(&fleet.stores, &j).await?;
        oplog.insert(j, scan);
    }
    Ok(AfterTheMove {
        consumer_filters,
        completed,
        events_after_kill,
        oplog,
    })
}

/// The moved jobs' next snapshots come at their next regular slot, after the last
/// completion in `completed`.
async fn wait_for_the_next_snapshots(
    fleet: &Fleet,
    completed: &BTreeMap<JobId, (u64, Option<HeadPoint>)>,
) -> Result<()> {
    let done_at = completed.values().map(|(at, _)| *at).max().unwrap_or(0);
    let moved = moving_jobs();
    until(
        "a snapshot of each moved job after the move",
        Duration::from_secs(30),
        || async {
            let snaps = fleet.stores.snapshots(None).await?;
            Ok(moved
                .iter()
                .all(|j| snaps.iter().any(|s| s.job == *j && s.taken_at_ms > done_at))
                .then_some(()))
        },
    )
    .await
}

/// How the move of rs2 failed.
struct Failure {
    reason: Option<String>,
    back_to: Option<(DaemonId, u64)>,
    snapshot_after: Option<SnapshotMeta>,
}

/// A move that cannot finish: the latest snapshot of rs2 is corrupt. Daemon 3 is paused
/// meanwhile, so it takes no newer snapshot; thawed, it backs rs2 up again.
async fn fail_a_move_from_a_corrupt_snapshot(fleet: &Fleet, d3: &mut Proc) -> Result<Failure> {
    let (stores, still) = (&fleet.stores, staying_job());
    d3.signal(Signal::Stop)?;
    let bad = stores
        .snapshots(Some(&still))
        .await?
        .last()
        .cloned()
        .ok_or_else(|| anyhow!("no snapshot of rs2"))?;
    stores
        .put_snapshot_unfenced(
            &bad,
            &mut &b"{\"id\":\"d1\",\"doc\":{\"not\":\"the data\"}}\n"[..],
        )
        .await?;
    let failed_move = handoff_ok(
        &fleet.url(),
        &[
            "--json",
            "move-job",
            still.as_str(),
            "--to",
            fleet.id(2).as_str(),
        ],
    )?
    .json()?;
    let failed_id = failed_move["command"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    until("the move of rs2 to fail", TIMEOUT, || async {
        Ok((fleet.count("JobMoveFailed").await? > 0).then_some(()))
    })
    .await?;
    d3.signal(Signal::Cont)?;
    let mut reason = None;
    let mut back_to = None;
    for r in &fleet.stack.events().await? {
        match &r.envelope.event {
            Event::JobMoveFailed {
                reason: why,
                returned_to,
                epoch,
                move_id,
                ..
            } if move_id.as_str() == failed_id => {
                reason = Some(why.clone());
                back_to = Some((returned_to.clone(), *epoch));
            }
            _ => {}
        }
    }
    let back_epoch = back_to.as_ref().map_or(0, |(_, e)| *e);
    let snapshot_after = until(
        "daemon 3 to snapshot rs2 again with its new epoch",
        Duration::from_secs(30),
        || async {
            let snaps = stores.snapshots(Some(&still)).await?;
            Ok(snaps
                .into_iter()
                .find(|s| s.epoch == back_epoch && s.daemon.is_some()))
        },
    )
    .await?;
    Ok(Failure {
        reason,
        back_to,
        snapshot_after: Some(snapshot_after),
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

/// The retention test's fleet on `stack`: an hour of 100 ms (snapshots every 0.6 s, a
/// 2.4 s window, snapshots kept 4.8 s, no daily, weekly or monthly tier), the agent, and
/// one daemon, registered. The agent and the daemon, their logs in `dir`.
async fn start_a_fleet_of_short_retention(stack: &Stack, dir: &Path) -> Result<(Proc, Proc)> {
    let url = stack.url();
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
    let agent = Proc::spawn(
        &url,
        dir,
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
    let id = format!("r1.test:{}/", dir.join("heads").display());
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
        dir,
        "daemon1",
        &d1_creds,
        &["daemon", "--id", &id, "--head-space", "10GiB"],
    )?;
    until("the daemon to register", TIMEOUT, || async {
        Ok(of_type(&stack.events().await?, "DaemonRegistered")
            .first()
            .map(|_| ()))
    })
    .await?;
    Ok((agent, d1))
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
    let (_agent, d1) = start_a_fleet_of_short_retention(&stack, dir.path()).await?;
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
            let expired = !snaps.is_empty() && snaps.iter().all(|s| s.daemon.is_some());
            Ok((first > 1 && expired).then_some(()))
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
    until("OPLOG_TTL_RESIZE", TIMEOUT, || async {
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
    until("a second OPLOG_TTL_RESIZE", TIMEOUT, || async {
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
        Ok((last_n().await? >= 300).then_some(()))
    })
    .await?;
    agent.kill()?;
    let at_kill = last_n().await?;
    let _agent = Proc::spawn(&url, dir.path(), "agent-again", &agent_creds, &args)?;
    until("the oplog to go on after the restart", TIMEOUT, || async {
        Ok((last_n().await? >= at_kill + 300).then_some(()))
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

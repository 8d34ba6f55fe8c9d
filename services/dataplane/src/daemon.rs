//! A backup daemon: registers, sends heartbeats, follows the assignment events addressed to
//! it (its own subject only, filtered by the server), keeps one head per job in sled under
//! its head directory, applies the oplog continuously, takes the scheduled snapshots, and
//! rebuilds the heads of jobs moved to it: latest snapshot, then the oplog from the
//! snapshot's timestamp, then CompleteJobMove with the head's checksum and timestamp.
//!
//! Everything a rebuild has done is in the head's sled tree (documents and position in one
//! batch), so a daemon killed in the middle finishes the rebuild after its restart.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use handoff_domain::command::{CompleteJobMove, FailJobMove, RegisterDaemon, ReportJobMovePhase};
use handoff_domain::event::AssignmentCause;
use handoff_domain::model::{DaemonSettings, HeadPoint, MovePhase};
use handoff_domain::{Command, CommandId, DaemonId, Event, JobId};
use handoff_protocol::subjects;
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Semaphore};

use crate::agent::new_id;
use crate::commands::Commands;
use crate::head::{Head, HeadError, HeadMeta, HeadStatus, Heads};
use crate::oplog;
use crate::rebuild::{Observer, Outcome};
use crate::store::{self, now_ms, HeadRecord, Heartbeat, SnapshotMeta, Stores};

#[derive(Clone, Debug)]
pub struct DaemonConfig {
    pub id: DaemonId,
    /// Where the heads live (the id's head root directory unless given).
    pub head_dir: PathBuf,
    /// Registered with these settings if the daemon is new.
    pub settings: DaemonSettings,
    pub heartbeat_ms: u64,
    /// The daemon's user (BACKUP_DAEMON, bound to `id`), which signs its reports.
    pub creds: handoff_protocol::auth::Credentials,
}

/// Progress of one job's rebuild, published on `handoff.progress.<move>`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Progress {
    pub move_id: String,
    pub job: JobId,
    pub daemon: DaemonId,
    /// The daemon's epoch for the job: a report with an older epoch than the job's is
    /// from a daemon that lost it, and is ignored.
    #[serde(default)]
    pub epoch: u64,
    pub phase: MovePhase,
    pub snapshot_bytes: u64,
    pub snapshot_total: u64,
    pub entries_applied: u64,
    /// How far the head is behind the newest stored oplog, in milliseconds.
    pub lag_ms: u64,
    /// Set on the last report: the head's point, or why the rebuild failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub done: Option<String>,
}

/// What the daemon's subject says it should hold.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Assigned {
    epoch: u64,
    cause: AssignmentCause,
}

fn fold(desired: &mut BTreeMap<JobId, Assigned>, event: &Event) {
    match event {
        Event::JobsAssigned { cause, jobs, .. } => {
            for j in jobs {
                desired.insert(
                    j.job.clone(),
                    Assigned {
                        epoch: j.epoch,
                        cause: cause.clone(),
                    },
                );
            }
        }
        Event::JobsReleased { jobs, .. } => {
            for j in jobs {
                desired.remove(j);
            }
        }
        _ => {}
    }
}

struct Shared {
    id: DaemonId,
    stores: Stores,
    heads: Heads,
    commands: Commands,
    workers: Semaphore,
    rebuilding: std::sync::atomic::AtomicUsize,
}

struct Running {
    epoch: u64,
    cancel: watch::Sender<bool>,
    handle: tokio::task::JoinHandle<()>,
}

/// Runs the daemon until `stop` turns true.
pub async fn run(
    stores: Stores,
    config: DaemonConfig,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let commands = Commands::new(
        stores.client.clone(),
        config.creds.clone(),
        format!("handoff-daemon {}", config.id),
    );
    match commands
        .send(
            &new_id(),
            &Command::RegisterDaemon(RegisterDaemon {
                daemon: config.id.clone(),
                settings: config.settings.clone(),
            }),
        )
        .await
    {
        Ok(_) => tracing::info!(daemon = %config.id, "registered"),
        Err(e) if e.reason == "already_exists" => {}
        Err(e) => anyhow::bail!("cannot register {}: {}", config.id, e.message),
    }
    let heads = Heads::open(&config.head_dir)?;
    let shared = Arc::new(Shared {
        id: config.id.clone(),
        stores: stores.clone(),
        heads,
        commands,
        workers: Semaphore::new(config.settings.num_workers.max(1) as usize),
        rebuilding: Default::default(),
    });
    let running: Arc<tokio::sync::Mutex<HashMap<JobId, Running>>> = Arc::default();
    let heartbeat = {
        let (shared, running, mut stop) = (shared.clone(), running.clone(), stop.clone());
        let every = Duration::from_millis(config.heartbeat_ms.max(50));
        tokio::spawn(async move {
            let started = now_ms();
            let token = subjects::daemon_key(&shared.id);
            loop {
                let hb = Heartbeat {
                    daemon: shared.id.clone(),
                    at_ms: now_ms(),
                    started_at_ms: started,
                    pid: std::process::id(),
                    jobs: running.lock().await.len(),
                    rebuilding: shared.rebuilding.load(std::sync::atomic::Ordering::Relaxed),
                };
                if let Err(e) = shared.stores.put_heartbeat(&token, &hb).await {
                    tracing::warn!(error = %e, "heartbeat not sent");
                }
                tokio::select! {
                    _ = stop.changed() => return,
                    _ = tokio::time::sleep(every) => {}
                }
            }
        })
    };

    // Read the daemon's own subject up to its end, then reconcile, then follow it.
    let log = handoff_eventlog::EventLog::attach(
        stores.client.clone(),
        handoff_eventlog::Config::default(),
    )
    .await?;
    let subject = subjects::daemon(&config.id);
    let end = log.last_sequence_of(&subject).await?;
    let mut reader = log.read_filtered(1, &subject).await?;
    let mut desired = BTreeMap::new();
    let mut seq = 0;
    while seq < end {
        let r = reader.next().await?;
        seq = r.seq;
        fold(&mut desired, &r.envelope.event);
    }
    for job in shared.heads.jobs() {
        if !desired.contains_key(&job) {
            tracing::info!(%job, "no longer assigned here; dropping its head");
            shared.heads.drop_head(&job)?;
        }
    }
    for (job, a) in &desired {
        start(&shared, &running, job, a).await;
    }
    tracing::info!(daemon = %config.id, jobs = desired.len(), "daemon running");
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            next = reader.next() => {
                let r = next?;
                let before = desired.clone();
                fold(&mut desired, &r.envelope.event);
                for job in before.keys().filter(|j| !desired.contains_key(*j)) {
                    if let Some(t) = running.lock().await.remove(job) {
                        let _ = t.cancel.send(true);
                        let _ = t.handle.await;
                    }
                    // No more snapshots of it; the head stays until the move completes, in
                    // case the move fails and the job comes back.
                    tracing::info!(%job, "job released to a move; its snapshots stop");
                    tokio::spawn(drop_when_moved(shared.clone(), running.clone(), log.clone(), job.clone()));
                }
                for (job, a) in &desired {
                    if before.get(job) != Some(a) {
                        start(&shared, &running, job, a).await;
                    }
                }
            }
        }
    }
    for (_, t) in running.lock().await.drain() {
        let _ = t.cancel.send(true);
        let _ = t.handle.await;
    }
    heartbeat.abort();
    shared.heads.flush().await?;
    Ok(())
}

/// Drops a released job's head once its move has completed elsewhere.
async fn drop_when_moved(
    shared: Arc<Shared>,
    running: Arc<tokio::sync::Mutex<HashMap<JobId, Running>>>,
    log: handoff_eventlog::EventLog,
    job: JobId,
) {
    let subject = subjects::aggregate(&handoff_domain::event::Aggregate::Job(job.clone()));
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let Ok(Some(last)) = log.last_event_of(&subject).await else {
            continue;
        };
        match last.envelope.event {
            Event::JobMoveCompleted { daemon, .. } if daemon != shared.id => {
                if running.lock().await.contains_key(&job) {
                    return; // It came back meanwhile.
                }
                tracing::info!(%job, to = %daemon, "job moved away; dropping its head");
                if let Err(e) = shared.heads.drop_head(&job) {
                    tracing::warn!(%job, error = %e, "could not drop a head");
                }
                return;
            }
            Event::JobMoveCompleted { .. } | Event::JobMoveFailed { .. } => return,
            _ => {}
        }
    }
}

async fn start(
    shared: &Arc<Shared>,
    running: &Arc<tokio::sync::Mutex<HashMap<JobId, Running>>>,
    job: &JobId,
    a: &Assigned,
) {
    let mut running = running.lock().await;
    if let Some(old) = running.remove(job) {
        if old.epoch == a.epoch {
            running.insert(job.clone(), old);
            return;
        }
        let _ = old.cancel.send(true);
        let _ = old.handle.await;
    }
    let (cancel, cancelled) = watch::channel(false);
    let (shared2, job2, a2) = (shared.clone(), job.clone(), a.clone());
    let handle = tokio::spawn(async move {
        let mut cancelled = cancelled;
        loop {
            match keep_job(&shared2, &job2, &a2, &mut cancelled).await {
                Ok(()) => return,
                Err(e) if is_fenced(&e) => {
                    // A store refused our epoch: the job has a newer owner.
                    tracing::warn!(job = %job2, epoch = a2.epoch, error = %e, "fenced: the job is no longer ours; dropping its head");
                    if let Err(e) = shared2.heads.drop_head(&job2) {
                        tracing::warn!(job = %job2, error = %e, "could not drop a head");
                    }
                    return;
                }
                Err(e) => {
                    tracing::warn!(job = %job2, error = %e, "job work interrupted; starting again");
                    tokio::select! {
                        _ = cancelled.changed() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        }
    });
    running.insert(
        job.clone(),
        Running {
            epoch: a.epoch,
            cancel,
            handle,
        },
    );
}

/// Whether a store refused a write for its stale epoch.
fn is_fenced(e: &anyhow::Error) -> bool {
    matches!(
        e.downcast_ref::<store::StoreError>(),
        Some(store::StoreError::Fenced(_))
    )
}

/// Why a rebuild cannot finish: the move fails with this reason.
struct Unrecoverable(String);

/// Builds (or rebuilds) the head if needed, then keeps it current and takes its
/// snapshots, until cancelled. Returns an error for a retry.
async fn keep_job(
    shared: &Shared,
    job: &JobId,
    a: &Assigned,
    cancelled: &mut watch::Receiver<bool>,
) -> anyhow::Result<()> {
    // The fence rises to our epoch before we touch anything: from here on, the job's
    // previous owner can no longer write its snapshots or its head position.
    let fence = shared.stores.fences.raise(job, a.epoch).await?;
    if fence > a.epoch {
        return Err(store::StoreError::Fenced(format!(
            "job {job} is at epoch {fence}, this daemon holds {}",
            a.epoch
        ))
        .into());
    }
    let head = shared.heads.head(job)?;
    let move_id = match &a.cause {
        AssignmentCause::Move { move_id } => Some(move_id.clone()),
        _ => None,
    };
    let mut meta = head.meta()?;
    if let Some(m) = &meta {
        if let (
            HeadStatus::Failed {
                move_id: failed, ..
            },
            Some(id),
        ) = (&m.status, &move_id)
        {
            if failed == id.as_str() {
                return Ok(()); // This daemon failed that move; the job went back.
            }
        }
    }
    // A head restored here holds consistent data at its position, whatever happened
    // since: it only needs the oplog after it (a job back after a failed move, a move
    // after a restart, a rebuild cut off by a kill).
    let reusable = meta.as_ref().is_some_and(|m| {
        m.restored_from.is_some()
            && m.epoch <= a.epoch
            && !matches!(m.status, HeadStatus::Failed { .. })
    });
    if !reusable {
        head.clear()?;
        meta = None;
    }
    if let Some(m) = &mut meta {
        let completed = m.status == HeadStatus::Active && m.epoch == a.epoch;
        if let (Some(id), false) = (&move_id, completed) {
            m.status = HeadStatus::Rebuilding {
                move_id: id.to_string(),
            };
        }
        m.epoch = a.epoch;
        head.set_meta(m)?;
    }
    let mut meta = match meta {
        Some(m) => m,
        None => HeadMeta::new(
            job.clone(),
            a.epoch,
            match &move_id {
                Some(id) => HeadStatus::Rebuilding {
                    move_id: id.to_string(),
                },
                None => HeadStatus::Building,
            },
        ),
    };
    let mut progress = ProgressState::new(shared, job, a.epoch, move_id.as_ref());
    if meta.status != HeadStatus::Active {
        shared
            .rebuilding
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let _guard = Decrement(&shared.rebuilding);
        let _permit = tokio::select! {
            _ = cancelled.changed() => return Ok(()),
            p = shared.workers.acquire() => p?,
        };
        let result = rebuild(shared, job, a, &head, &mut meta, &mut progress, cancelled).await?;
        if let Err(Unrecoverable(reason)) = result {
            fail(shared, job, a, &head, &mut meta, &mut progress, reason).await?;
            return Ok(());
        }
        if *cancelled.borrow() || matches!(meta.status, HeadStatus::Failed { .. }) {
            return Ok(());
        }
    }
    follow(shared, job, &head, &mut meta, cancelled).await
}

struct Decrement<'a>(&'a std::sync::atomic::AtomicUsize);
impl Drop for Decrement<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Observer for ProgressState<'_> {
    async fn restored(&mut self, done: u64, total: u64) {
        self.update(done == total, |p| {
            p.snapshot_bytes = done;
            p.snapshot_total = total;
        })
        .await;
    }

    async fn applied(&mut self, entries: u64, lag_ms: u64) {
        self.update(false, |p| {
            p.entries_applied += entries;
            p.lag_ms = lag_ms;
        })
        .await;
    }
}

struct ProgressState<'a> {
    shared: &'a Shared,
    p: Option<Progress>,
    last: Instant,
}

impl<'a> ProgressState<'a> {
    fn new(shared: &'a Shared, job: &JobId, epoch: u64, move_id: Option<&CommandId>) -> Self {
        ProgressState {
            shared,
            p: move_id.map(|m| Progress {
                move_id: m.to_string(),
                job: job.clone(),
                daemon: shared.id.clone(),
                epoch,
                phase: MovePhase::Requested,
                snapshot_bytes: 0,
                snapshot_total: 0,
                entries_applied: 0,
                lag_ms: 0,
                done: None,
            }),
            last: Instant::now() - Duration::from_secs(1),
        }
    }

    async fn update(&mut self, force: bool, change: impl FnOnce(&mut Progress)) {
        let Some(p) = &mut self.p else { return };
        change(p);
        if force || self.last.elapsed() >= Duration::from_millis(200) {
            self.last = Instant::now();
            let body = serde_json::to_vec(&*p).expect("json");
            if let Err(e) = self
                .shared
                .stores
                .client
                .publish(store::progress_subject(&p.move_id), body.into())
                .await
            {
                tracing::debug!(error = %e, "progress not published");
            }
        }
    }
}

async fn report_phase(shared: &Shared, job: &JobId, a: &Assigned, phase: MovePhase) {
    let AssignmentCause::Move { move_id } = &a.cause else {
        return;
    };
    let command = Command::ReportJobMovePhase(ReportJobMovePhase {
        job: job.clone(),
        move_id: move_id.clone(),
        epoch: a.epoch,
        phase,
    });
    if let Err(e) = shared.commands.send(&new_id(), &command).await {
        tracing::debug!(%job, reason = %e.reason, "phase not recorded");
    }
}

/// Restores the latest snapshot (unless already restored) and replays the oplog until
/// caught up; then completes the move (or marks a new head active).
async fn rebuild(
    shared: &Shared,
    job: &JobId,
    a: &Assigned,
    head: &Head,
    meta: &mut HeadMeta,
    progress: &mut ProgressState<'_>,
    cancelled: &mut watch::Receiver<bool>,
) -> anyhow::Result<Result<(), Unrecoverable>> {
    let moving = matches!(a.cause, AssignmentCause::Move { .. });
    if meta.restored_from.is_none() {
        report_phase(shared, job, a, MovePhase::RestoringSnapshot).await;
        progress
            .update(true, |p| p.phase = MovePhase::RestoringSnapshot)
            .await;
        let snaps = loop {
            let snaps = shared.stores.snapshots(Some(job)).await?;
            match snaps.is_empty() {
                false => break snaps,
                true if moving => {
                    return Ok(Err(Unrecoverable(format!(
                        "no snapshot of {job} in the snapshot store"
                    ))))
                }
                // A new job: the agent's initial sync has not stored it yet.
                true => tokio::select! {
                    _ = cancelled.changed() => return Ok(Ok(())),
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                },
            }
        };
        // A move rebuilds from the latest snapshot or fails; a job that is already this
        // daemon's falls back to older snapshots rather than stay without a head.
        let mut problems = Vec::new();
        for snapshot in snaps.iter().rev() {
            match crate::rebuild::restore_snapshot(&shared.stores, head, meta, snapshot, progress)
                .await?
            {
                Outcome::Done => break,
                Outcome::Cancelled => return Ok(Ok(())),
                Outcome::Failed(reason) if moving => return Ok(Err(Unrecoverable(reason))),
                Outcome::Failed(reason) => {
                    tracing::warn!(%job, reason, "snapshot unusable; trying an older one");
                    problems.push(reason);
                }
            }
        }
        if meta.restored_from.is_none() {
            return Ok(Err(Unrecoverable(problems.join("; "))));
        }
    }
    report_phase(shared, job, a, MovePhase::ReplayingOplog).await;
    progress
        .update(true, |p| p.phase = MovePhase::ReplayingOplog)
        .await;
    // Replay until the head holds every stored entry.
    match crate::rebuild::replay(&shared.stores, job, head, meta, cancelled, progress).await? {
        Outcome::Done => {}
        Outcome::Cancelled => return Ok(Ok(())),
        Outcome::Failed(reason) => return Ok(Err(Unrecoverable(reason))),
    }
    finish(shared, job, a, head, meta, progress).await
}

async fn finish(
    shared: &Shared,
    job: &JobId,
    a: &Assigned,
    head: &Head,
    meta: &mut HeadMeta,
    progress: &mut ProgressState<'_>,
) -> anyhow::Result<Result<(), Unrecoverable>> {
    if let AssignmentCause::Move { move_id } = &a.cause {
        let point = HeadPoint {
            ts: meta.ts.to_string(),
            checksum: meta.checksum.to_string(),
        };
        let command = Command::CompleteJobMove(CompleteJobMove {
            job: job.clone(),
            move_id: move_id.clone(),
            epoch: a.epoch,
            head: Some(point.clone()),
        });
        // The same id on a retry after a restart: one completion.
        let id = CommandId::new(ulid_for(move_id, job)).expect("a ULID");
        if let Err(e) = shared.commands.send(&id, &command).await {
            if e.code == handoff_protocol::ErrorCode::Unavailable {
                anyhow::bail!("completing the move of {job}: {}", e.message);
            }
            // Completed before (a rebuild again after a crash or a divergence): the job is ours.
            if owner(shared, job).await? == Some(shared.id.clone()) {
                meta.status = HeadStatus::Active;
                head.set_meta(meta)?;
                return Ok(Ok(()));
            }
            // The move is over without us (failed, or the job moved on): let the head go.
            tracing::warn!(%job, move_id = %move_id, reason = %e.message, "completion refused; dropping the head");
            head.clear()?;
            meta.status = HeadStatus::Failed {
                move_id: move_id.to_string(),
                reason: e.message,
            };
            head.set_meta(meta)?;
            return Ok(Ok(()));
        }
        tracing::info!(%job, move_id = %move_id, ts = %point.ts, checksum = %point.checksum, "move completed");
        progress
            .update(true, |p| {
                p.phase = MovePhase::Completed;
                p.done = Some(format!("head at {} checksum {}", point.ts, point.checksum));
            })
            .await;
    }
    meta.status = HeadStatus::Active;
    head.set_meta(meta)?;
    Ok(Ok(()))
}

/// The job's owner as its events say, unless it is moving.
async fn owner(shared: &Shared, job: &JobId) -> anyhow::Result<Option<DaemonId>> {
    let log = handoff_eventlog::EventLog::attach(
        shared.stores.client.clone(),
        handoff_eventlog::Config::default(),
    )
    .await?;
    let subject = subjects::aggregate(&handoff_domain::event::Aggregate::Job(job.clone()));
    let mut owner = None;
    for r in log.events_of(&subject).await? {
        owner = match r.envelope.event {
            Event::BackupJobCreated { daemon, .. } | Event::JobMoveCompleted { daemon, .. } => {
                Some(daemon)
            }
            Event::JobMoveFailed { returned_to, .. } => Some(returned_to),
            Event::JobMoveStarted { .. } => None,
            _ => owner,
        };
    }
    Ok(owner)
}

/// A command id derived from a move and a job, so the completion of one job's move has
/// the same id however often it is sent.
fn ulid_for(move_id: &CommandId, job: &JobId) -> String {
    let base = ulid::Ulid::from_string(move_id.as_str()).unwrap_or_default();
    let h = crate::checksum::doc_hash(job.as_str(), move_id.as_str().as_bytes());
    ulid::Ulid::from_parts(base.timestamp_ms(), u128::from(h) << 16 | 0xc0de).to_string()
}

async fn fail(
    shared: &Shared,
    job: &JobId,
    a: &Assigned,
    head: &Head,
    meta: &mut HeadMeta,
    progress: &mut ProgressState<'_>,
    reason: String,
) -> anyhow::Result<()> {
    let AssignmentCause::Move { move_id } = &a.cause else {
        anyhow::bail!("building the head of {job} failed: {reason}");
    };
    tracing::error!(%job, move_id = %move_id, reason, "rebuild failed (THEFT_FAILED)");
    let command = Command::FailJobMove(FailJobMove {
        job: job.clone(),
        move_id: move_id.clone(),
        epoch: a.epoch,
        reason: reason.chars().take(1000).collect(),
    });
    if let Err(e) = shared.commands.send(&new_id(), &command).await {
        tracing::warn!(%job, reason = %e.message, "failing the move was refused");
    }
    head.clear()?;
    meta.status = HeadStatus::Failed {
        move_id: move_id.to_string(),
        reason: reason.clone(),
    };
    head.set_meta(meta)?;
    progress
        .update(true, |p| {
            p.phase = MovePhase::Failed;
            p.done = Some(reason);
        })
        .await;
    Ok(())
}

/// Keeps an active head current and takes its scheduled snapshots, until cancelled.
async fn follow(
    shared: &Shared,
    job: &JobId,
    head: &Head,
    meta: &mut HeadMeta,
    cancelled: &mut watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut messages = shared.stores.read_oplog(job, meta.applied_seq + 1).await?;
    let mut schedule = shared.stores.schedule(job).await?;
    let last_slot = shared
        .stores
        .snapshots(Some(job))
        .await?
        .iter()
        .filter_map(|s| s.slot_ms)
        .max()
        .unwrap_or(0);
    // The next regular slot: never a burst of the ones missed while moving or down.
    let mut next_due = schedule.next_slot_after(now_ms().max(last_slot));
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut reported = None;
    let mut last_report = Instant::now();
    let mut schedule_read = Instant::now();
    loop {
        tokio::select! {
            _ = cancelled.changed() => return Ok(()),
            m = messages.next() => {
                let m = match m {
                    Some(Ok(m)) => m,
                    Some(Err(e)) => { tracing::debug!(error = %e, "oplog reader hiccup"); continue; }
                    None => anyhow::bail!("the oplog reader ended"),
                };
                let seq = m.info().map_err(|e| anyhow::anyhow!("{e}"))?.stream_sequence;
                let entries = oplog::decode(&m.payload)?;
                if let Err(e) = head.apply(meta, seq, &entries) {
                    if matches!(e, HeadError::Gap { .. }) {
                        // The oplog it needs is gone: start again from a snapshot.
                        head.clear()?;
                    }
                    return Err(e.into());
                }
            }
            _ = tick.tick() => {
                let now = now_ms();
                if schedule_read.elapsed() > Duration::from_secs(5) {
                    let fresh = shared.stores.schedule(job).await?;
                    if fresh != schedule {
                        next_due = fresh.next_slot_after(now);
                        schedule = fresh;
                    }
                    schedule_read = Instant::now();
                }
                if now >= next_due {
                    take_snapshot(shared, job, head, meta, next_due).await?;
                    next_due = schedule.next_slot_after(now);
                }
                let point = (meta.applied_seq, meta.epoch);
                if reported != Some(point) || last_report.elapsed() > Duration::from_secs(5) {
                    let record = HeadRecord {
                        daemon: shared.id.clone(),
                        epoch: meta.epoch,
                        applied_seq: meta.applied_seq,
                        n: meta.n,
                        ts: meta.ts,
                        checksum: meta.checksum,
                        at_ms: now,
                    };
                    shared.stores.put_head(job, &record).await?;
                    reported = Some(point);
                    last_report = Instant::now();
                }
            }
        }
    }
}

async fn take_snapshot(
    shared: &Shared,
    job: &JobId,
    head: &Head,
    meta: &HeadMeta,
    slot: u64,
) -> anyhow::Result<()> {
    let (data, sum) = head.export()?;
    if sum != meta.checksum {
        // The head no longer matches the source: rebuild it rather than store a bad copy.
        head.clear()?;
        anyhow::bail!(
            "the head of {job} has checksum {sum} but the source had {} at {}; rebuilding it",
            meta.checksum,
            meta.ts
        );
    }
    let snapshot = SnapshotMeta {
        id: ulid::Ulid::new().to_string(),
        job: job.clone(),
        epoch: meta.epoch,
        ts: meta.ts,
        n: meta.n,
        oplog_seq: meta.applied_seq,
        checksum: meta.checksum,
        size_bytes: data.len() as u64,
        taken_at_ms: now_ms(),
        slot_ms: Some(slot),
        daemon: Some(shared.id.clone()),
    };
    shared.stores.put_snapshot(&snapshot, &data).await?;
    tracing::info!(%job, snapshot = %snapshot.id, ts = %snapshot.ts, checksum = %snapshot.checksum, "snapshot taken");
    Ok(())
}

//! The agent: runs the simulated sources of the jobs it backs up, performs each new job's
//! initial sync (its first snapshot), ships the oplog in slices to the oplog store, and
//! grooms the stores (oplog retention with OPLOG_TTL_RESIZE, snapshot expiry by tier).
//! It never talks to a daemon: the oplog is saved while a job moves or its daemon is dead.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::message::PublishMessage;
use handoff_domain::command::ResizeOplogTtl;
use handoff_domain::{Command, CommandId, Event, JobId, ProjectId};
use tokio::sync::watch;

use crate::commands::Commands;
use crate::oplog::{self, Ts};
use crate::retention::{self, Hold};
use crate::source::{Source, Workload};
use crate::store::{self, now_ms, SnapshotMeta, Stores};

/// How the agent runs.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// Projects to back up (empty: all).
    pub projects: Vec<ProjectId>,
    pub seed: u64,
    /// Data of a new job before its initial sync, in bytes.
    pub initial_bytes: u64,
    pub doc_bytes: usize,
    /// Writes per second on each job's source.
    pub ops_per_sec: u32,
    /// A slice is shipped when it holds this many bytes...
    pub slice_bytes: usize,
    /// ...or when its oldest entry is this old.
    pub slice_ms: u64,
    /// How often the stores are groomed.
    pub groom_ms: u64,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            projects: Vec::new(),
            seed: 1,
            initial_bytes: 1 << 20,
            doc_bytes: 512,
            ops_per_sec: 200,
            slice_bytes: 10 << 20,
            slice_ms: 1000,
            groom_ms: 10_000,
        }
    }
}

/// One cluster-wide clock, so that every job's entries (the shards of a cluster and its
/// config servers too) are ordered on one time line: a common point is one timestamp.
#[derive(Clone, Default)]
pub struct Clock(Arc<Mutex<Ts>>);

impl Clock {
    /// Never gives `ts` or anything before it.
    pub fn floor(&self, ts: Ts) {
        let mut last = self.0.lock().expect("clock lock");
        *last = (*last).max(ts);
    }

    pub fn next(&self) -> Ts {
        let now = (now_ms() / 1000) as u32;
        let mut last = self.0.lock().expect("clock lock");
        *last = if now > last.t {
            Ts { t: now, i: 1 }
        } else {
            Ts {
                t: last.t,
                i: last.i + 1,
            }
        };
        *last
    }
}

fn job_seed(seed: u64, job: &JobId) -> u64 {
    crate::checksum::doc_hash(job.as_str(), &seed.to_le_bytes())
}

/// Runs until `stop` turns true.
/// Runs the agent until `stop` turns true; `creds` (a BACKUP_AGENT user) sign its
/// reports.
pub async fn run(
    stores: Stores,
    config: AgentConfig,
    creds: handoff_protocol::auth::Credentials,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let log = handoff_eventlog::EventLog::attach(
        stores.client.clone(),
        handoff_eventlog::Config::default(),
    )
    .await?;
    let mut reader = log.read_filtered(1, "handoff.evt.job.>").await?;
    let clock = Clock::default();
    let jobs: Arc<Mutex<BTreeSet<JobId>>> = Arc::default();
    let ttl: Ttl = Arc::default();
    let mut tasks = tokio::task::JoinSet::new();
    {
        let (stores, config, jobs, ttl, stop) = (
            stores.clone(),
            config.clone(),
            jobs.clone(),
            ttl.clone(),
            stop.clone(),
        );
        tasks.spawn(async move { groom_loop(stores, config, creds, jobs, ttl, stop).await });
    }
    // The jobs that exist already, and the retention each was grown to.
    let end = log.last_sequence_of("handoff.evt.job.>").await?;
    tracing::debug!(end, "reading the jobs that exist");
    let mut known = Vec::new();
    let mut seen = 0;
    while seen < end {
        let r = tokio::select! {
            _ = stop.changed() => return Ok(()),
            r = reader.next() => r?,
        };
        seen = r.seq;
        note(&r.envelope.event, &config, &ttl, &mut known);
    }
    // A restarted agent's clock goes on after every timestamp already stored, so the
    // timestamps of all jobs stay one time line.
    for (job, _) in &known {
        if let Some((_, headers)) = stores.oplog_last(job).await? {
            if let Some(ts) = headers
                .get(oplog::LAST_TS)
                .and_then(|v| v.as_str().parse().ok())
            {
                clock.floor(ts);
            }
        }
    }
    let stopped = stop.clone();
    let start = |job: JobId, epoch: u64, tasks: &mut tokio::task::JoinSet<anyhow::Result<()>>| {
        if !jobs.lock().expect("jobs lock").insert(job.clone()) {
            return;
        }
        let (stores, config, clock, stop) = (
            stores.clone(),
            config.clone(),
            clock.clone(),
            stopped.clone(),
        );
        tasks.spawn(async move {
            if let Err(e) = run_source(&stores, &config, &clock, &job, epoch, stop).await {
                tracing::error!(%job, error = %e, "the source of a job stopped");
            }
            Ok(())
        });
    };
    for (job, epoch) in known.drain(..) {
        start(job, epoch, &mut tasks);
    }
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            next = reader.next() => {
                let r = next?;
                note(&r.envelope.event, &config, &ttl, &mut known);
                for (job, epoch) in known.drain(..) {
                    start(job, epoch, &mut tasks);
                }
            }
        }
    }
    tasks.shutdown().await;
    Ok(())
}

/// Each job's oplog retention, in hours, once it has grown.
type Ttl = Arc<Mutex<HashMap<JobId, u32>>>;

/// Takes note of a job event: a new job to back up, or a retention that grew.
fn note(event: &Event, config: &AgentConfig, ttl: &Ttl, new: &mut Vec<(JobId, u64)>) {
    match event {
        Event::BackupJobCreated {
            job,
            project,
            epoch,
            ..
        } if config.projects.is_empty() || config.projects.contains(project) => {
            new.push((job.clone(), *epoch));
        }
        Event::OplogTtlResized { job, hours, .. } => {
            ttl.lock().expect("ttl lock").insert(job.clone(), *hours);
        }
        _ => {}
    }
}

/// A message cut from the slice being built.
struct Part {
    payload: Vec<u8>,
    first: Ts,
    last: Ts,
    last_n: u64,
    checksum: crate::Checksum,
}

async fn run_source(
    stores: &Stores,
    config: &AgentConfig,
    clock: &Clock,
    job: &JobId,
    epoch: u64,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let workload = Workload {
        seed: job_seed(config.seed, job),
        initial_bytes: config.initial_bytes,
        doc_bytes: config.doc_bytes,
    };
    let mut last_seq = stores.oplog_last(job).await?.map_or(0, |(s, _)| s);
    let mut source = match crate::restore::latest(stores, job).await? {
        Some((docs, n, ts)) => {
            clock.floor(ts);
            tracing::info!(%job, n, "resuming the source from the stores");
            Source::resume(&workload, docs, n)
        }
        None => {
            let source = Source::new(&workload);
            initial_sync(stores, job, epoch, &source, clock.next()).await?;
            source
        }
    };
    let subject = store::oplog_subject(job);
    let mut parts: Vec<Part> = Vec::new();
    let mut current: Option<Part> = None;
    let mut slice_bytes = 0usize;
    let mut slice_started: Option<Instant> = None;
    let mut ticker = tokio::time::interval(Duration::from_millis(20));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let started = Instant::now();
    let mut done_ops: u64 = 0;
    loop {
        tokio::select! {
            _ = stop.changed() => return Ok(()),
            _ = ticker.tick() => {}
        }
        let due = (started.elapsed().as_millis() as u64 * u64::from(config.ops_per_sec)) / 1000;
        while done_ops < due {
            let ts = clock.next();
            let part = current.get_or_insert_with(|| Part {
                payload: Vec::new(),
                first: ts,
                last: ts,
                last_n: 0,
                checksum: Default::default(),
            });
            let before = part.payload.len();
            part.last_n = source.step(ts, &mut part.payload);
            part.last = ts;
            part.checksum = source.checksum();
            slice_bytes += part.payload.len() - before;
            slice_started.get_or_insert_with(Instant::now);
            if part.payload.len() >= store::MAX_MESSAGE_BYTES {
                parts.extend(current.take());
            }
            done_ops += 1;
        }
        let old =
            slice_started.is_some_and(|s| s.elapsed() >= Duration::from_millis(config.slice_ms));
        if slice_bytes >= config.slice_bytes || old {
            parts.extend(current.take());
            for part in parts.drain(..) {
                last_seq = ship(stores, &subject, job, &part, last_seq).await?;
            }
            slice_bytes = 0;
            slice_started = None;
        }
    }
}

async fn initial_sync(
    stores: &Stores,
    job: &JobId,
    epoch: u64,
    source: &Source,
    ts: Ts,
) -> anyhow::Result<()> {
    let mut data = Vec::with_capacity(source.data_bytes() as usize + 1024);
    for (id, doc) in source.documents() {
        crate::snapshot::write_line(&mut data, id, doc.as_bytes());
    }
    let meta = SnapshotMeta {
        id: ulid::Ulid::new().to_string(),
        job: job.clone(),
        epoch,
        ts,
        n: source.last_n(),
        oplog_seq: 0,
        checksum: source.checksum(),
        size_bytes: data.len() as u64,
        taken_at_ms: now_ms(),
        slot_ms: None,
        daemon: None,
    };
    // The source's own copy, not a daemon's: no owner's epoch to fence.
    stores.put_snapshot_unfenced(&meta, &data).await?;
    tracing::info!(%job, bytes = data.len(), checksum = %meta.checksum, "initial sync done");
    Ok(())
}

/// Publishes one message of a slice, exactly once: its id is the job and last entry, and
/// it expects the job's last message to be the one shipped before it.
async fn ship(
    stores: &Stores,
    subject: &str,
    job: &JobId,
    part: &Part,
    last_seq: u64,
) -> anyhow::Result<u64> {
    let mut wait = Duration::from_millis(50);
    loop {
        let message = PublishMessage::build()
            .payload(part.payload.clone().into())
            .message_id(format!("{job}:{}", part.last_n))
            .expected_last_subject_sequence(last_seq)
            .header(oplog::FIRST_TS, part.first.to_string().as_str())
            .header(oplog::LAST_TS, part.last.to_string().as_str())
            .header(oplog::LAST_N, part.last_n.to_string().as_str())
            .header(oplog::CHECKSUM, part.checksum.to_string().as_str());
        let result = async {
            stores
                .js
                .send_publish(subject.to_owned(), message)
                .await?
                .await
        }
        .await;
        match result {
            Ok(ack) => return Ok(ack.sequence),
            Err(e) => {
                // A lost ack: the message may be stored already. Our last message then
                // carries this part's last entry.
                if let Some((seq, headers)) = stores.oplog_last(job).await? {
                    let n = headers.get(oplog::LAST_N).map(|v| v.as_str().to_owned());
                    if n.as_deref() == Some(part.last_n.to_string().as_str()) {
                        return Ok(seq);
                    }
                }
                tracing::warn!(%job, error = %e, "oplog slice not stored yet; retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(2));
            }
        }
    }
}

async fn groom_loop(
    stores: Stores,
    config: AgentConfig,
    creds: handoff_protocol::auth::Credentials,
    jobs: Arc<Mutex<BTreeSet<JobId>>>,
    ttl: Ttl,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let commands = Commands::new(stores.client.clone(), creds, "handoff-agent".into());
    let mut ticker = tokio::time::interval(Duration::from_millis(config.groom_ms.max(50)));
    loop {
        tokio::select! {
            _ = stop.changed() => return Ok(()),
            _ = ticker.tick() => {}
        }
        let list: Vec<JobId> = jobs.lock().expect("jobs lock").iter().cloned().collect();
        let (leases, settings) = match (stores.leases().await, stores.settings().await) {
            (Ok(l), Ok(s)) => (l, s),
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!(error = %e, "groom skipped");
                continue;
            }
        };
        for job in list {
            let hours = ttl.lock().expect("ttl lock").get(&job).copied();
            match groom(&stores, &commands, &settings, &job, hours, &leases).await {
                Ok(Some(grown)) => {
                    ttl.lock().expect("ttl lock").insert(job.clone(), grown);
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(%job, error = %e, "groom of a job failed; trying again later");
                }
            }
        }
    }
}

/// Grooms one job: purges the oplog that nothing needs and expires snapshots. `grown`:
/// the job's retention if it grew before. Returns the retention if it grows now.
pub async fn groom(
    stores: &Stores,
    commands: &Commands,
    settings: &store::Settings,
    job: &JobId,
    grown: Option<u32>,
    leases: &[store::Lease],
) -> anyhow::Result<Option<u32>> {
    let hour = settings.hour_ms();
    let now = now_ms();
    let hours = grown
        .unwrap_or(settings.retention.ttl_hours)
        .max(settings.retention.ttl_hours);
    let mut resized = None;
    let snaps = stores.snapshots(Some(job)).await?;
    let cutoff = now.saturating_sub(u64::from(hours) * hour);
    let pit_base = snaps.iter().rev().find(|s| s.taken_at_ms <= cutoff);
    if let Some((first, first_at)) = stores.oplog_first(job).await? {
        let last = stores.oplog_last(job).await?.map_or(first, |(s, _)| s);
        let last_at = stores.oplog_time(last).await?.unwrap_or(now);
        let expired_below = if first_at >= cutoff {
            first
        } else if last_at < cutoff {
            last + 1
        } else {
            // Some message is inside the window; if it cannot be found now, purge
            // nothing this round rather than guess.
            stores
                .oplog_first_since(job, cutoff)
                .await?
                .unwrap_or(first)
        };
        let at =
            |seq: u64| async move { stores.oplog_time(seq).await.ok().flatten().unwrap_or(now) };
        let mut holds = Vec::new();
        if let Some(latest) = snaps.last() {
            let seq = latest.oplog_seq.max(first);
            holds.push(Hold {
                seq,
                at_ms: at(seq).await,
                why: "the latest snapshot (where a rebuild starts)".into(),
                grows: true,
            });
        }
        if let Some(base) = pit_base {
            holds.push(Hold {
                seq: base.oplog_seq.max(first),
                at_ms: 0,
                why: "the point-in-time window".into(),
                grows: false,
            });
        }
        if let Some(head) = stores.head(job).await? {
            let seq = (head.applied_seq + 1).max(first);
            if seq <= last {
                holds.push(Hold {
                    seq,
                    at_ms: at(seq).await,
                    why: format!("the head on {}", head.daemon),
                    grows: true,
                });
            }
        }
        for l in leases.iter().filter(|l| l.job == *job) {
            let seq = l.from_seq.max(first);
            holds.push(Hold {
                seq,
                at_ms: at(seq).await,
                why: "a restore in progress".into(),
                grows: true,
            });
        }
        let plan = retention::plan(
            now,
            hour,
            hours,
            &settings.retention,
            first,
            expired_below,
            &holds,
        );
        if let Some((new_hours, reason)) = plan.resize {
            commands
                .send(
                    &new_id(),
                    &Command::ResizeOplogTtl(ResizeOplogTtl {
                        job: job.clone(),
                        previous_hours: hours,
                        hours: new_hours,
                        reason: reason.clone(),
                    }),
                )
                .await
                .map_err(|e| anyhow::anyhow!("OPLOG_TTL_RESIZE not recorded: {}", e.message))?;
            tracing::warn!(%job, hours = new_hours, reason, "oplog retention grown (OPLOG_TTL_RESIZE)");
            resized = Some(new_hours);
        }
        if let Some(below) = plan.purge_below {
            let purged = stores.purge_oplog(job, below).await?;
            tracing::debug!(%job, below, purged, "oplog purged");
        }
    }
    // Snapshots past their tiers' retention go; never the latest nor the window's base.
    let schedule = match stores.own_schedule(job).await? {
        Some(s) => s,
        None => settings.schedule.clone(),
    };
    let keep: BTreeMap<&str, ()> = snaps
        .last()
        .into_iter()
        .chain(pit_base)
        .map(|s| (s.id.as_str(), ()))
        .collect();
    for s in &snaps {
        if keep.contains_key(s.id.as_str()) {
            continue;
        }
        if schedule.expires_at(s.slot_ms.unwrap_or(s.taken_at_ms)) <= now {
            stores.delete_snapshot(s).await?;
            tracing::info!(%job, snapshot = %s.id, "snapshot expired");
        }
    }
    Ok(resized)
}

/// A fresh command id.
pub fn new_id() -> CommandId {
    CommandId::new(ulid::Ulid::new().to_string()).expect("a ULID is a command id")
}

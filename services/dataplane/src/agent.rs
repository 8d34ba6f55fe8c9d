//! The agent: reads each job's source through the [`Source`] seam (the simulated MongoDB
//! so far, see [`crate::source`]), performs each new job's initial sync (its first
//! snapshot), ships the oplog in slices to the oplog store, and grooms the stores (oplog
//! retention with OPLOG_TTL_RESIZE, snapshot expiry by tier: [`crate::groom`]). It never talks to a daemon:
//! the oplog is saved while a job moves or its daemon is dead.
//!
//! A job flows: its `BackupJobCreated` event starts one task → the task carries the job's
//! source on from the stores (the latest snapshot plus the oplog after it) or, for a new
//! job, starts one and writes its documents as the initial snapshot → about every 20 ms
//! it takes the entries the source has ready, cuts them into messages, and ships a slice
//! once it is big or old enough, each message exactly once.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::message::PublishMessage;
use std::future::Future;

use futures::StreamExt;
use handoff_client::SendError;
use handoff_domain::{Event, JobId, ProjectId};
use handoff_protocol::now_ms;
use handoff_protocol::subjects::JOB_EVENTS;
use tokio::sync::watch;

use crate::checksum::Checksum;
use crate::oplog::{self, Ts};
use crate::restore::{self, RestoreError};
use crate::source::{sim, Factory, Resume, Source, SourceError};
use crate::store::{SnapshotMeta, StoreError, Stores};

/// How the agent runs.
#[derive(Clone, Debug)]
pub struct Config {
    /// Projects to back up (empty: all).
    pub projects: Vec<ProjectId>,
    /// Where the jobs' data is read from.
    pub source: SourceConfig,
    /// A slice is shipped when it holds this many bytes...
    pub slice_bytes: usize,
    /// ...or when its oldest entry is this old.
    pub slice_ms: u64,
    /// How often the stores are groomed.
    pub groom_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            projects: Vec::new(),
            source: SourceConfig::default(),
            slice_bytes: 10 << 20,
            slice_ms: 1000,
            groom_ms: 10_000,
        }
    }
}

/// The kind of source the agent reads every job from, with its settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceConfig {
    /// The simulated MongoDB ([`sim`]).
    Sim(sim::Config),
}

impl Default for SourceConfig {
    fn default() -> Self {
        SourceConfig::Sim(sim::Config::default())
    }
}

/// Why the agent, or one job's task, stopped.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The event log's stream is not there or not reachable: start the agent again once
    /// NATS and the command service are up.
    #[error("cannot attach to the event log: {0}")]
    Attach(#[from] handoff_eventlog::OpenError),
    /// The job events cannot be read: start the agent again.
    #[error("cannot read the job events: {0}")]
    Events(#[from] handoff_eventlog::ReadError),
    /// A store failed. A job's task stops (the agent started again carries the job on
    /// from its stores); a groom tries again at its next round.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A job's data cannot be rebuilt from its stores to carry its source on: the stores
    /// need looking at (a corrupt snapshot, an oplog that does not match its checksum).
    #[error("cannot carry the source on from the stores: {0}")]
    Resume(#[from] RestoreError),
    /// A job's source cannot go on; the error says what it needs.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// The grown retention was not recorded: the oplog is not purged past it, and the
    /// next groom tries again.
    #[error("OPLOG_TTL_RESIZE of {job} not recorded: {source}")]
    Resize {
        job: JobId,
        #[source]
        source: SendError,
    },
}

/// Runs the agent until `shutdown` completes; `creds` (a BACKUP_AGENT user) sign its
/// reports.
pub async fn run(
    stores: Stores,
    config: Config,
    creds: handoff_protocol::auth::Credentials,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AgentError> {
    let stop = crate::shutdown_flag(shutdown);
    match config.source.clone() {
        SourceConfig::Sim(sim) => {
            run_with(stores, config, sim::Cluster::new(sim), creds, stop).await
        }
    }
}

type Tasks = tokio::task::JoinSet<Result<(), AgentError>>;

async fn run_with<F: Factory>(
    stores: Stores,
    config: Config,
    factory: F,
    creds: handoff_protocol::auth::Credentials,
    mut stop: watch::Receiver<bool>,
) -> Result<(), AgentError> {
    let log = handoff_eventlog::EventLog::attach(
        stores.client.clone(),
        handoff_eventlog::Config::default(),
    )
    .await?;
    // Before any snapshot expires: those stored before the index existed are listed too.
    let indexed = stores.index_unindexed().await?;
    if indexed > 0 {
        tracing::info!(
            indexed,
            "snapshots stored before the snapshot index, indexed"
        );
    }
    let mut reader = log.read_filtered(1, JOB_EVENTS).await?;
    let factory = Arc::new(factory);
    let jobs: Arc<Mutex<BTreeSet<JobId>>> = Arc::default();
    let ttl: Ttl = Arc::default();
    let mut tasks = Tasks::new();
    {
        let (stores, config, jobs, ttl, stop) = (
            stores.clone(),
            config.clone(),
            jobs.clone(),
            ttl.clone(),
            stop.clone(),
        );
        tasks.spawn(async move {
            crate::groom::groom_loop(stores, config, creds, jobs, ttl, stop).await
        });
    }
    // The jobs that exist already, and the retention each was grown to.
    let end = log.last_sequence_of(JOB_EVENTS).await?;
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
    // Sources made from now on go on after every timestamp already stored, so the
    // timestamps of all jobs stay one time line.
    for (job, _) in &known {
        if let Some((_, headers)) = stores.oplog_last(job).await? {
            if let Some(ts) = headers
                .get(oplog::LAST_TS)
                .and_then(|v| v.as_str().parse().ok())
            {
                factory.seen(ts);
            }
        }
    }
    let stopped = stop.clone();
    let start = |job: JobId, epoch: u64, tasks: &mut Tasks| {
        if !jobs.lock().expect("jobs lock").insert(job.clone()) {
            return;
        }
        let (stores, config, factory, stop) = (
            stores.clone(),
            config.clone(),
            factory.clone(),
            stopped.clone(),
        );
        tasks.spawn(async move {
            if let Err(e) = run_source(&stores, &config, &*factory, &job, epoch, stop).await {
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
/// Each job's oplog TTL in hours, as grown by the agent. Its lock (like the jobs set's)
/// is held for a map operation only, never across an await; it is poisoned only if a
/// holder panicked, which already ended the agent, hence the `expect`s.
pub(crate) type Ttl = Arc<Mutex<HashMap<JobId, u32>>>;

/// Takes note of a job event: a new job to back up, or a retention that grew.
fn note(event: &Event, config: &Config, ttl: &Ttl, new: &mut Vec<(JobId, u64)>) {
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

/// A message cut from the slice being built; empty until its first entry.
#[derive(Default)]
struct Part {
    payload: Vec<u8>,
    first: Ts,
    last: Ts,
    last_n: u64,
    checksum: Checksum,
}

/// The job's source: carried on from the stores, or new, and then synced into them.
async fn open<F: Factory>(
    stores: &Stores,
    factory: &F,
    job: &JobId,
    epoch: u64,
) -> Result<F::Source, AgentError> {
    match restore::latest(stores, job).await? {
        Some((docs, n, ts)) => {
            tracing::info!(%job, n, "resuming the source from the stores");
            Ok(factory.resume(job, Resume { ts, n, docs }).await?)
        }
        None => {
            let source = factory.start(job).await?;
            initial_sync(stores, job, epoch, &source).await?;
            Ok(source)
        }
    }
}

async fn run_source<F: Factory>(
    stores: &Stores,
    config: &Config,
    factory: &F,
    job: &JobId,
    epoch: u64,
    mut stop: watch::Receiver<bool>,
) -> Result<(), AgentError> {
    let mut last_seq = stores.oplog_last(job).await?.map_or(0, |(s, _)| s);
    let mut source = open(stores, factory, job, epoch).await?;
    let subject = handoff_protocol::subjects::oplog(job);
    let mut parts: Vec<Part> = Vec::new();
    let mut part = Part::default();
    let mut slice_bytes = 0usize;
    let mut slice_started: Option<Instant> = None;
    let mut ticker = tokio::time::interval(Duration::from_millis(20));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = stop.changed() => return Ok(()),
            _ = ticker.tick() => {}
        }
        while let Some(entry) = source.next_entry().await? {
            let before = part.payload.len();
            if before == 0 {
                part.first = entry.ts;
            }
            oplog::encode_into(&mut part.payload, &entry);
            part.last = entry.ts;
            part.last_n = entry.n;
            part.checksum = entry.c;
            slice_bytes += part.payload.len() - before;
            slice_started.get_or_insert_with(Instant::now);
            if part.payload.len() >= handoff_protocol::dataplane::MAX_MESSAGE_BYTES {
                parts.push(std::mem::take(&mut part));
            }
        }
        let old =
            slice_started.is_some_and(|s| s.elapsed() >= Duration::from_millis(config.slice_ms));
        if slice_bytes >= config.slice_bytes || old {
            if !part.payload.is_empty() {
                parts.push(std::mem::take(&mut part));
            }
            for message in parts.drain(..) {
                last_seq = ship(stores, &subject, job, &message, last_seq).await?;
            }
            slice_bytes = 0;
            slice_started = None;
        }
    }
}

/// Writes the source's documents as the job's first snapshot, at the source's point.
async fn initial_sync<S: Source>(
    stores: &Stores,
    job: &JobId,
    epoch: u64,
    source: &S,
) -> Result<(), AgentError> {
    let point = source.point();
    let mut data = Vec::new();
    let mut documents = std::pin::pin!(source.documents());
    while let Some(doc) = documents.next().await {
        let doc = doc?;
        crate::snapshot::write_line(&mut data, &doc.id, doc.json.as_bytes());
    }
    let meta = SnapshotMeta {
        id: ulid::Ulid::new().to_string(),
        job: job.clone(),
        epoch,
        ts: point.ts,
        n: point.n,
        oplog_seq: 0,
        checksum: point.checksum,
        size_bytes: data.len() as u64,
        taken_at_ms: now_ms(),
        slot_ms: None,
        daemon: None,
    };
    // The source's own copy, not a daemon's: no owner's epoch to fence.
    stores
        .put_snapshot_unfenced(&meta, &mut data.as_slice())
        .await?;
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
) -> Result<u64, AgentError> {
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

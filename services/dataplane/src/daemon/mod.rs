//! A backup daemon: registers, sends heartbeats, follows the assignment events addressed to
//! it (its own subject only, filtered by the server), keeps one head per job in sled under
//! its head directory, applies the oplog continuously, takes the scheduled snapshots, and
//! rebuilds the heads of jobs moved to it: latest snapshot, then the oplog from the
//! snapshot's timestamp, then CompleteJobMove with the head's checksum and timestamp.
//!
//! Everything a rebuild has done is in the head's sled tree (documents and position in one
//! batch), so a daemon killed in the middle finishes the rebuild after its restart.
//!
//! # Layout
//! - `mod.rs`: [`Config`], [`run`] (register, heartbeats, drive the core, shut down) and
//!   the errors.
//! - [`core`]: the decisions, without I/O: which job's work starts or stops at which
//!   epoch, which released job's move to watch, which head to drop.
//! - `assignments.rs`: reading the daemon's subject up to its end, then following it; each
//!   event becomes the core's inputs.
//! - `job.rs`: one job's work: raise the fence, decide whether the head on disk can be
//!   reused, then rebuild it or follow.
//! - `moving.rs`: the rebuild of a moved job (restore the snapshot, replay, complete or
//!   fail the move) and the watch on a job moving away.
//! - `progress.rs`: the progress a rebuild publishes.
//! - `follow.rs`: keeping an active head current, its scheduled snapshots and its head
//!   record.
//!
//! # How an assignment flows
//! A `JobsAssigned` on the daemon's subject becomes [`core::Input::Assigned`] per job. The
//! core answers [`core::Action::Start`] (after [`core::Action::Stop`] of older work and
//! that work's end, if any); the shell spawns the job's work, which ends, whether done,
//! fenced, failed or stopped, by sending [`core::Input::WorkEnded`] back to the loop that
//! drives the core. A `JobsReleased` stops the work, then watches the move: when the move
//! completes with another daemon, the core drops the head. The loop owns the core and the
//! running tasks, so no lock is held while it waits for anything.

pub mod core;

mod assignments;
mod follow;
mod job;
mod moving;
mod progress;

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use handoff_client::{Client, SendError};
use handoff_domain::command::RegisterDaemon;
use handoff_domain::model::DaemonSettings;
use handoff_domain::{Command, DaemonId, JobId, Rejection};
use handoff_eventlog::{EventLog, OpenError, ReadError};
use handoff_protocol::subjects;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinSet;

use self::core::{Action, Core, Input};
use crate::head::{HeadError, Heads};
use crate::rebuild::{OplogError, RebuildError};
use crate::store::{Heartbeat, StoreError, Stores};
use handoff_protocol::now_ms;

pub use handoff_protocol::dataplane::{Done, Progress};

/// A daemon's settings.
#[derive(Clone, Debug)]
pub struct Config {
    pub id: DaemonId,
    /// Where the heads live (the id's head root directory unless given).
    pub head_dir: PathBuf,
    /// Registered with these settings if the daemon is new.
    pub settings: DaemonSettings,
    pub heartbeat_ms: u64,
    /// The daemon's user (BACKUP_DAEMON, bound to `id`), which signs its reports.
    pub creds: handoff_protocol::auth::Credentials,
}

/// Why a daemon stopped before it was told to.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The command service refused the registration or could not be reached.
    #[error("cannot register {daemon}: {source}")]
    Register {
        daemon: DaemonId,
        #[source]
        source: SendError,
    },
    /// The head directory cannot be opened or flushed.
    #[error("the heads: {0}")]
    Heads(#[from] HeadError),
    /// The event stream cannot be attached.
    #[error("the event log: {0}")]
    Attach(#[from] OpenError),
    /// The daemon's subject cannot be read.
    #[error("the daemon's assignments: {0}")]
    Log(#[from] ReadError),
    /// The heads' store failed underneath a job's work (a full disk, corruption): it takes
    /// no write until opened again, so the daemon stops to be started again rather than
    /// retry every job against it forever, heartbeating all the while.
    #[error("the heads' store is broken ({0}); a restart opens it again")]
    HeadsBroken(String),
}

/// Why one attempt at a job's work broke off. Every variant but `Fenced` is worth another
/// attempt.
#[derive(Debug, thiserror::Error)]
pub(crate) enum JobError {
    /// A store refused a write at this daemon's epoch, or the job's fence is above it: the
    /// job has a newer owner. Do not retry; the head is of no use any more.
    #[error("fenced: {reason}")]
    Fenced { reason: String },
    /// A store could not be reached or read (never its fencing: that is `Fenced`).
    #[error(transparent)]
    Store(StoreError),
    #[error(transparent)]
    Head(#[from] HeadError),
    #[error(transparent)]
    Oplog(#[from] OplogError),
    /// The job's events could not be read.
    #[error("the job's events: {0}")]
    Log(#[source] ReadError),
    /// The command service did not answer a report that must be made.
    #[error("command not delivered: {0}")]
    Send(#[source] SendError),
    /// A new head cannot be built (no usable snapshot); not a move, so nobody to tell.
    #[error("building the head failed: {reason}")]
    Build { reason: String },
}

impl From<StoreError> for JobError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Fenced(reason) => JobError::Fenced { reason },
            other => JobError::Store(other),
        }
    }
}

impl From<RebuildError> for JobError {
    fn from(e: RebuildError) -> Self {
        match e {
            RebuildError::Store(e) => e.into(),
            RebuildError::Head(e) => e.into(),
            RebuildError::Oplog(e) => e.into(),
        }
    }
}

/// What every job's work shares.
struct Shared {
    id: DaemonId,
    stores: Stores,
    log: EventLog,
    heads: Heads,
    client: Client,
    /// The same client with the short retries of a best-effort report (a move's phase).
    phases: Client,
    /// Rebuilds at once: the daemon's number of workers.
    workers: Semaphore,
    /// Heads being built now, for the heartbeat.
    rebuilding: AtomicUsize,
    /// Jobs assigned here, as the core last counted, for the heartbeat.
    jobs: AtomicUsize,
    /// Set by a job's work that found the heads' store broken ([`HeadError::store_broken`]).
    broken: watch::Sender<Option<String>>,
}

/// Runs the daemon until `shutdown` completes.
pub async fn run(
    stores: Stores,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), DaemonError> {
    crate::telemetry::daemon_started();
    let mut shutdown = crate::shutdown_flag(shutdown);
    let client = Client::new(
        stores.client.clone(),
        config.creds.clone(),
        format!("handoff-daemon {}", config.id),
    );
    register(&client, &config).await?;
    let heads = Heads::open(&config.head_dir)?;
    let log = EventLog::attach(stores.client.clone(), handoff_eventlog::Config::default()).await?;
    let shared = Arc::new(Shared {
        id: config.id.clone(),
        stores,
        log,
        heads,
        phases: client.clone().with_retry(moving::PHASE_RETRY),
        client,
        workers: Semaphore::new(config.settings.num_workers.max(1) as usize),
        rebuilding: AtomicUsize::new(0),
        jobs: AtomicUsize::new(0),
        broken: watch::channel(None).0,
    });
    let mut broken = shared.broken.subscribe();
    let heartbeat = tokio::spawn(heartbeat(
        shared.clone(),
        Duration::from_millis(config.heartbeat_ms.max(50)),
        shutdown.clone(),
    ));

    let mut core = Core::new();
    let mut assignments = assignments::Assignments::open(&shared.log, &config.id).await?;
    assignments.catch_up(&mut core).await?;
    let (reports, mut ended) = mpsc::unbounded_channel();
    let mut shell = Shell {
        shared: shared.clone(),
        tasks: HashMap::new(),
        watchers: JoinSet::new(),
        reports,
    };
    let heads_found = shared.heads.jobs();
    shell.perform(core.handle(Input::CaughtUp { heads: heads_found }, Instant::now()));
    shared.jobs.store(core.held(), Ordering::Relaxed);
    tracing::info!(daemon = %config.id, jobs = core.held(), "daemon running");

    let result = loop {
        let wake = core.next_due();
        let actions = tokio::select! {
            _ = shutdown.changed() => break Ok(()),
            Ok(()) = broken.changed() => {
                let why = broken.borrow().clone().unwrap_or_default();
                break Err(DaemonError::HeadsBroken(why));
            }
            inputs = assignments.next() => match inputs {
                Ok(inputs) => inputs
                    .into_iter()
                    .flat_map(|i| core.handle(i, Instant::now()))
                    .collect(),
                Err(e) => break Err(DaemonError::Log(e)),
            },
            Some(input) = ended.recv() => {
                shell.ended(&input);
                core.handle(input, Instant::now())
            }
            _ = sleep_until(wake), if wake.is_some() => core.due(Instant::now()),
            // A watch that ended has reported already; this only frees its slot.
            Some(_) = shell.watchers.join_next(), if !shell.watchers.is_empty() => Vec::new(),
        };
        shell.perform(actions);
        shared.jobs.store(core.held(), Ordering::Relaxed);
    };
    shell.stop().await;
    heartbeat.abort();
    let flushed = shared.heads.flush().await;
    result?;
    Ok(flushed?)
}

async fn sleep_until(at: Option<Instant>) {
    if let Some(at) = at {
        tokio::time::sleep_until(at.into()).await;
    }
}

async fn register(client: &Client, config: &Config) -> Result<(), DaemonError> {
    let command = Command::RegisterDaemon(RegisterDaemon {
        daemon: config.id.clone(),
        settings: config.settings.clone(),
    });
    match client
        .send(&handoff_client::new_command_id(), &command)
        .await
    {
        Ok(_) => {
            tracing::info!(daemon = %config.id, "registered");
            Ok(())
        }
        Err(SendError::Rejected(Rejection::AlreadyExists { .. })) => Ok(()),
        Err(source) => Err(DaemonError::Register {
            daemon: config.id.clone(),
            source,
        }),
    }
}

async fn heartbeat(shared: Arc<Shared>, every: Duration, mut shutdown: watch::Receiver<bool>) {
    let started = now_ms();
    let token = subjects::daemon_key(&shared.id);
    // A beat every `every` from the last one's start, however long its put took.
    let mut beats = tokio::time::interval(every);
    beats.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // A put the server does not answer (its bucket electing a leader, a node gone) is not
    // waited for past the next beat: one stuck for the client's whole timeout would be a
    // silence of the daemon's own making.
    let patience = every.clamp(Duration::from_millis(250), Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = beats.tick() => {}
        }
        let hb = Heartbeat {
            daemon: shared.id.clone(),
            at_ms: now_ms(),
            started_at_ms: started,
            pid: std::process::id(),
            jobs: shared.jobs.load(Ordering::Relaxed),
            rebuilding: shared.rebuilding.load(Ordering::Relaxed),
        };
        match tokio::time::timeout(patience, shared.stores.put_heartbeat(&token, &hb)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "heartbeat not sent"),
            Err(_) => tracing::warn!(
                ?patience,
                "heartbeat not acknowledged in time; sending the next"
            ),
        }
    }
}

/// Performs the core's actions and keeps what they started.
struct Shell {
    shared: Arc<Shared>,
    /// Each job's running work, until it reports its end.
    tasks: HashMap<JobId, job::Task>,
    /// The watches on moves away; they end by themselves, or at shutdown.
    watchers: JoinSet<()>,
    /// Where work and watches report their ends.
    reports: mpsc::UnboundedSender<Input>,
}

impl Shell {
    fn perform(&mut self, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::Start { job, assignment } => {
                    let task = job::spawn(
                        self.shared.clone(),
                        job.clone(),
                        assignment,
                        self.reports.clone(),
                    );
                    self.tasks.insert(job, task);
                }
                Action::Stop { job } => {
                    if let Some(task) = self.tasks.get(&job) {
                        task.cancel();
                    }
                }
                Action::WatchMove { job, release } => {
                    tracing::info!(%job, move_id = %release.move_id, "job released to a move; its snapshots stop");
                    self.watchers.spawn(moving::watch_move(
                        self.shared.clone(),
                        job,
                        release,
                        self.reports.clone(),
                    ));
                }
                Action::DropHead { job } => {
                    tracing::info!(%job, "no longer this daemon's; dropping its head");
                    if let Err(e) = self.shared.heads.drop_head(&job) {
                        tracing::warn!(%job, error = %e, "could not drop a head");
                    }
                }
            }
        }
    }

    /// Forgets the task whose end `input` reports.
    fn ended(&mut self, input: &Input) {
        if let Input::WorkEnded { job, epoch, .. } = input {
            if self.tasks.get(job).is_some_and(|t| t.epoch() == *epoch) {
                self.tasks.remove(job);
            }
        }
    }

    /// Stops every task and waits for each; the watches are dropped.
    async fn stop(mut self) {
        self.watchers.abort_all();
        for task in self.tasks.values() {
            task.cancel();
        }
        for (_, task) in self.tasks.drain() {
            task.join().await;
        }
    }
}

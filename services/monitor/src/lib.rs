//! The monitor: turns the daemons' heartbeats (JetStream key-value bucket
//! `handoff_heartbeats`, not the event stream) into DAEMON_DOWN and DAEMON_UP, watches
//! moves for MOVE_STUCK and head space for LOW_HEAD_FREE_SPACE, and runs the automatic
//! failover policy when it is enabled.
//!
//! It folds the event stream into the domain state, hears heartbeats and progress as
//! they arrive, and every tick hands the commands [`watch::Watch`] finds due to a sender
//! task, which signs them as the monitor's own user (BACKUP_MONITOR); the policy's moves
//! are signed as the policy's user, so every automatic decision names the policy as its
//! actor. The command service decides each one against the state, so a report that is
//! late or repeated changes nothing, and an operator's move always wins over the policy's
//! pending one.
//!
//! The loop itself never waits for the command service: a command retried for minutes
//! would leave the heartbeats unread meanwhile, and the next tick would take their
//! silence for the daemons'. It reads whatever is ready before it judges (the tick comes
//! last), and a tick that comes late (the process or the loop stalled) tells the watch
//! how long it was deaf, which counts as nobody's silence. The sender's queue is bounded,
//! and the watch hands out one command per thing at a time. When no heartbeat comes from
//! any daemon for a while, the loop watches the heartbeat bucket again (a watch whose
//! server died may stall without ending), and the watch takes a silence every daemon
//! shares for the bucket's, not theirs, up to a cap.
//!
//! [`start`] binds to what the monitor reads and never creates it (its NATS permissions
//! allow no create): the event stream is the command service's, the heartbeat bucket the
//! agent's. One that is missing is [`Error::Missing`]: like every failure
//! [`Error::is_transient`] says passes, a reason to start again later, not to give up.
//!
//! Any number of monitors may run: what they send is decided by the state, so two
//! monitors appending the same DAEMON_DOWN append it once.
//!
//! # Layout
//! - [`watch`]: the pure core. The state, the clock and what was heard come in; the
//!   commands that are due go out. Property-tested without a server.
//! - this file: the shell. [`start`] binds to the stream and the heartbeat bucket and
//!   folds the stream to its end; [`Monitor::run`] goes on folding, watches the heartbeat
//!   bucket and the progress subjects, ticks, and passes what the core finds due to the
//!   sender task, which sends it through the command client and reports each command
//!   back when it has landed (and the fold has caught up with what it appended).

pub mod telemetry;
pub mod watch;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv};
use futures::StreamExt;
use handoff_client::{new_command_id, Client};
use handoff_domain::{Command, State};
use handoff_eventlog::{EventLog, EventReader};
use handoff_protocol::auth::Credentials;
use handoff_protocol::dataplane::{Progress, HEARTBEATS_BUCKET};
use handoff_protocol::subjects;
use thiserror::Error;
use tokio::sync::{mpsc, Semaphore};

/// How often the monitor sets its gauges.
const GAUGES_EVERY: Duration = Duration::from_secs(1);
use tokio::task::JoinSet;

pub use watch::{Due, Policy, Settings, Watch};

/// Commands waiting for the sender at most; one found due when the queue is full waits
/// for a later tick.
const QUEUE: usize = 256;
/// Commands the sender sends at once.
const SENDING: usize = 8;

/// What the monitor runs with.
#[derive(Clone, Debug)]
pub struct Config {
    /// The thresholds and the failover policy.
    pub settings: Settings,
    /// The monitor's own user (BACKUP_MONITOR), which signs its reports.
    pub creds: Credentials,
    /// The failover policy's user, which signs its moves (the monitor's own when none).
    pub policy_creds: Option<Credentials>,
    /// Unused: the monitor binds to the heartbeat bucket, which the agent creates. Kept
    /// until the callers that still set it stop doing so.
    pub replicas: usize,
}

/// Why the monitor could not start, or stopped.
#[derive(Debug, Error)]
pub enum Error {
    /// Its source says whether it passes.
    #[error("cannot open the event stream: {0}")]
    Open(#[from] handoff_eventlog::OpenError),
    /// Passes when the stream is unavailable; an event that cannot be decoded does not.
    #[error("cannot read the event stream: {0}")]
    Read(#[from] handoff_eventlog::ReadError),
    /// Passes when the stream is unavailable.
    #[error("cannot find the end of the event stream: {0}")]
    End(#[from] handoff_eventlog::AppendError),
    /// Passes: the stream was slow.
    #[error("the event stream did not deliver sequence {0} in time")]
    Behind(u64),
    /// Passes: what the monitor binds to does not exist yet; `owner` creates it.
    #[error("{store} does not exist yet ({owner} creates it)")]
    Missing {
        store: &'static str,
        owner: &'static str,
    },
    /// Passes: JetStream did not answer, or not now.
    #[error("JetStream is unavailable: {0}")]
    Unavailable(String),
    /// Passes: the heartbeat bucket could not be watched.
    #[error("cannot watch the heartbeat bucket: {0}")]
    Heartbeats(String),
    /// Passes: the connection is gone for now.
    #[error("cannot hear rebuild progress: {0}")]
    Progress(#[from] async_nats::SubscribeError),
}

impl Error {
    /// Whether the failure may pass by itself (try again later), or `None` when only the
    /// source can tell ([`Error::Open`]: the JetStream error inside).
    pub fn is_transient(&self) -> Option<bool> {
        match self {
            Error::Open(_) => None,
            Error::Read(e) => Some(matches!(e, handoff_eventlog::ReadError::Unavailable(_))),
            Error::End(e) => Some(matches!(e, handoff_eventlog::AppendError::Unavailable(_))),
            Error::Behind(_)
            | Error::Missing { .. }
            | Error::Unavailable(_)
            | Error::Heartbeats(_)
            | Error::Progress(_) => Some(true),
        }
    }
}

/// Folds the stream into the state the monitor judges on.
struct Fold {
    reader: EventReader,
    state: State,
    applied: u64,
}

impl Fold {
    async fn until(&mut self, seq: u64) -> Result<(), Error> {
        while self.applied < seq {
            let r = tokio::time::timeout(Duration::from_secs(10), self.reader.next())
                .await
                .map_err(|_| Error::Behind(seq))??;
            self.state.apply(&r.envelope.event);
            self.applied = r.seq;
        }
        Ok(())
    }
}

/// Whether the server says a stream does not exist (10059).
fn not_found(e: &jetstream::context::GetStreamError) -> bool {
    matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(j)
        if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND)
}

/// The event stream must exist before it is attached to: attaching to a missing one
/// would create it, which is the command service's to do.
async fn bind_events(js: &jetstream::Context) -> Result<(), Error> {
    match js.get_stream(subjects::STREAM).await {
        Ok(_) => Ok(()),
        Err(e) if not_found(&e) => Err(Error::Missing {
            store: "the event stream",
            owner: "the command service",
        }),
        Err(e) => Err(Error::Unavailable(e.to_string())),
    }
}

/// The heartbeat bucket, which the agent creates.
async fn heartbeat_bucket(js: &jetstream::Context) -> Result<kv::Store, Error> {
    match js.get_key_value(HEARTBEATS_BUCKET).await {
        Ok(store) => Ok(store),
        Err(e) => {
            let missing = std::error::Error::source(&e)
                .and_then(|s| s.downcast_ref::<jetstream::context::GetStreamError>())
                .is_some_and(not_found);
            Err(if missing {
                Error::Missing {
                    store: "the heartbeat bucket",
                    owner: "the agent",
                }
            } else {
                Error::Unavailable(e.to_string())
            })
        }
    }
}

async fn watch_heartbeats(bucket: &kv::Store) -> Result<kv::Watch, Error> {
    bucket
        .watch_all()
        .await
        .map_err(|e| Error::Heartbeats(e.to_string()))
}

/// The next heartbeat entry, or never while there is no watch.
async fn next_heartbeat(
    watch: &mut Option<kv::Watch>,
) -> Option<Result<kv::Entry, kv::WatcherError>> {
    match watch {
        Some(w) => w.next().await,
        None => std::future::pending().await,
    }
}

/// A started monitor: bound to the stream and the heartbeat bucket, its state folded to
/// the stream's end, its watch started.
pub struct Monitor {
    monitor: Client,
    policy: Client,
    bucket: kv::Store,
    fold: Fold,
    watch: Watch,
    heartbeats: kv::Watch,
    progress: async_nats::Subscriber,
}

/// Binds to the event stream and the heartbeat bucket (never creating either) and folds
/// the stream to its end. Every daemon gets a fresh grace period from here.
pub async fn start(client: async_nats::Client, config: Config) -> Result<Monitor, Error> {
    let Config {
        settings,
        creds,
        policy_creds,
        replicas: _,
    } = config;
    let name = format!(
        "handoff-monitor {}",
        std::env::var("HOSTNAME").unwrap_or_default()
    );
    let monitor = Client::new(client.clone(), creds.clone(), name.clone());
    let policy = Client::new(client.clone(), policy_creds.unwrap_or(creds), name);
    let js = jetstream::new(client.clone());
    bind_events(&js).await?;
    let bucket = heartbeat_bucket(&js).await?;
    let log = EventLog::attach(client.clone(), handoff_eventlog::Config::default()).await?;
    let mut fold = Fold {
        reader: log.read_from(1).await?,
        state: State::default(),
        applied: 0,
    };
    let end = log.last_sequence().await?;
    fold.until(end).await?;
    let mut watch = Watch::new(settings);
    // Every daemon gets a fresh grace period from now: nothing read back from history
    // says a daemon is silent.
    watch.observe(&fold.state, Instant::now());
    let heartbeats = watch_heartbeats(&bucket).await?;
    let progress = client.subscribe(subjects::PROGRESS).await?;
    Ok(Monitor {
        monitor,
        policy,
        bucket,
        fold,
        watch,
        heartbeats,
        progress,
    })
}

/// Starts the monitor over `client` and runs it until `shutdown` completes.
pub async fn run(
    client: async_nats::Client,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    start(client, config).await?.run(shutdown).await
}

impl Monitor {
    /// Runs until `shutdown` completes.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        tokio::pin!(shutdown);
        let Monitor {
            monitor,
            policy,
            bucket,
            mut fold,
            mut watch,
            heartbeats,
            mut progress,
        } = self;
        let mut heartbeats = Some(heartbeats);
        // The last revision of each daemon's heartbeat key seen: one per daemon of the
        // fleet, so bounded by the fleet.
        let mut last_revision: std::collections::HashMap<String, u64> =
            std::collections::HashMap::new();
        // A new watch being made, off the loop: the bucket may take seconds to answer.
        let mut rewatching: Option<tokio::task::JoinHandle<Result<kv::Watch, Error>>> = None;
        let every = watch.tick();
        let mut gauges_at = Instant::now()
            .checked_sub(GAUGES_EVERY)
            .unwrap_or_else(Instant::now);
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (queue, queued) = mpsc::channel(QUEUE);
        let (landed_tx, mut landed) = mpsc::unbounded_channel();
        let sender = Sender {
            monitor,
            policy,
            landed: landed_tx,
        };
        let sending = tokio::spawn(sender.run(queued));
        // Sent, applied at a sequence the fold has not reached yet: landed once it has.
        let mut settling: Vec<(String, u64)> = Vec::new();
        tracing::info!(
            threshold_ms = watch.settings().threshold.as_millis() as u64,
            failover = watch.settings().failover.is_some(),
            daemons = fold.state.daemons.len(),
            "monitor running"
        );
        let result = loop {
            // Biased: whatever is ready (events, heartbeats, progress, landed commands) is
            // taken in before a tick judges on it.
            tokio::select! {
                biased;
                _ = &mut shutdown => break Ok(()),
                r = fold.reader.next() => {
                    let r = match r {
                        Ok(r) => r,
                        Err(e) => break Err(e.into()),
                    };
                    // Observed at the next tick, which is precise enough for every clock here.
                    fold.state.apply(&r.envelope.event);
                    fold.applied = r.seq;
                    settle(&mut watch, &mut settling, fold.applied);
                }
                e = next_heartbeat(&mut heartbeats) => match e {
                    Some(Ok(e)) if e.operation == kv::Operation::Put => {
                        // A new watch delivers every key's last value first: only a
                        // revision newer than the last one seen is a heartbeat heard now.
                        let newer = last_revision
                            .get(&e.key)
                            .is_none_or(|seen| e.revision > *seen);
                        if newer {
                            last_revision.insert(e.key.clone(), e.revision);
                            if let Some(d) = subjects::daemon_from_key(&e.key) {
                                watch.heartbeat(d, Instant::now());
                            }
                        }
                    }
                    Some(_) => {}
                    None => {
                        tracing::warn!("the heartbeat watch ended; watching again at the next tick");
                        heartbeats = None;
                    }
                },
                Some(m) = progress.next() => {
                    if let Ok(p) = serde_json::from_slice::<Progress>(&m.payload) {
                        watch.progress(&fold.state, &p, Instant::now());
                    }
                }
                made = async { rewatching.as_mut().expect("guarded by the condition").await }, if rewatching.is_some() => {
                    rewatching = None;
                    match made {
                        Ok(Ok(h)) => heartbeats = Some(h),
                        Ok(Err(e)) => tracing::warn!(error = %e, "cannot watch the heartbeat bucket; trying again"),
                        Err(e) => tracing::warn!(error = %e, "watching the heartbeat bucket failed; trying again"),
                    }
                }
                Some(l) = landed.recv() => match l.through {
                    Some(seq) if seq > fold.applied => settling.push((l.key, seq)),
                    _ => watch.landed(&l.key, Instant::now()),
                },
                scheduled = tick.tick() => {
                    let (scheduled, now) = (scheduled.into_std(), Instant::now());
                    // A tick this late means nothing ran here meanwhile: deaf, not silence.
                    if now.saturating_duration_since(scheduled) > every {
                        tracing::warn!(
                            stalled_ms = now.saturating_duration_since(scheduled).as_millis() as u64,
                            "the monitor stalled; that time counts as nobody's silence"
                        );
                        watch.deaf(scheduled, now);
                    }
                    let stalled = watch.rewatch(now);
                    if (heartbeats.is_none() || stalled) && rewatching.is_none() {
                        if stalled {
                            tracing::warn!("no heartbeat from any daemon for a while; watching the heartbeat bucket again");
                        }
                        let bucket = bucket.clone();
                        rewatching = Some(tokio::spawn(async move { watch_heartbeats(&bucket).await }));
                    }
                    if now.saturating_duration_since(gauges_at) >= GAUGES_EVERY {
                        gauges_at = now;
                        telemetry::heard(&watch, &fold.state, now);
                    }
                    for due in watch.due(&fold.state, now) {
                        if let Err(e) = queue.try_send(due) {
                            let due = e.into_inner();
                            tracing::warn!(command = due.command.name(), "the send queue is full; due again later");
                            watch.landed(&due.key, now);
                        }
                    }
                }
            }
        };
        sending.abort();
        if let Some(r) = rewatching {
            r.abort();
        }
        result
    }
}

/// Tells the watch about the commands whose events the fold has reached.
fn settle(watch: &mut Watch, settling: &mut Vec<(String, u64)>, applied: u64) {
    if settling.is_empty() {
        return;
    }
    let now = Instant::now();
    settling.retain(|(key, seq)| {
        let reached = *seq <= applied;
        if reached {
            watch.landed(key, now);
        }
        !reached
    });
}

/// A command that has been sent, applied or not.
struct Landed {
    key: String,
    /// The last sequence it appended, if it was applied and appended anything.
    through: Option<u64>,
}

/// Sends what the monitor's loop hands over, off that loop, a few at a time.
struct Sender {
    monitor: Client,
    policy: Client,
    landed: mpsc::UnboundedSender<Landed>,
}

impl Sender {
    async fn run(self, mut queued: mpsc::Receiver<Due>) {
        let slots = Arc::new(Semaphore::new(SENDING));
        let mut sends = JoinSet::new();
        loop {
            tokio::select! {
                // Reaped only to free memory: each send reports by itself.
                Some(_) = sends.join_next(), if !sends.is_empty() => {}
                due = queued.recv() => {
                    let Some(due) = due else { return };
                    let Ok(slot) = slots.clone().acquire_owned().await else { return };
                    let client = if due.by_policy { self.policy.clone() } else { self.monitor.clone() };
                    let landed = self.landed.clone();
                    sends.spawn(async move {
                        let through = send(&client, &due.command).await;
                        // Ignored: the monitor's loop is gone, and with it any interest.
                        let _ = landed.send(Landed { key: due.key, through });
                        drop(slot);
                    });
                }
            }
        }
    }
}

/// Sends one command (retried by the client under its policy); the last sequence it
/// appended, if any.
async fn send(commands: &Client, command: &Command) -> Option<u64> {
    let id = new_command_id();
    match commands.send(&id, command).await {
        Ok(applied) => {
            let last = applied.events.iter().map(|e| e.seq).max();
            if last.is_some() {
                tracing::info!(
                    command = command.name(),
                    events = applied.events.len(),
                    "reported"
                );
            }
            last
        }
        Err(e) => {
            tracing::info!(command = command.name(), reason = %e.body().reason, message = %e, "not applied");
            None
        }
    }
}

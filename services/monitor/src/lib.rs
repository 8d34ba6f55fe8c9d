//! The monitor: turns the daemons' heartbeats (JetStream key-value bucket
//! `handoff_heartbeats`, not the event stream) into DAEMON_DOWN and DAEMON_UP, watches
//! moves for MOVE_STUCK and head space for LOW_HEAD_FREE_SPACE, and runs the automatic
//! failover policy when it is enabled.
//!
//! It folds the event stream into the domain state, hears heartbeats and progress as
//! they arrive, and every tick sends the commands [`watch::Watch`] finds due, signed as
//! its own user (BACKUP_MONITOR); the policy's moves are signed as the policy's user, so
//! every automatic decision names the policy as its actor. The command service decides
//! each one against the state, so a report that is late or repeated changes nothing, and
//! an operator's move always wins over the policy's pending one.
//!
//! Any number of monitors may run: what they send is decided by the state, so two
//! monitors appending the same DAEMON_DOWN append it once.
//!
//! # Layout
//! - [`watch`]: the pure core. The state, the clock and what was heard come in; the
//!   commands that are due go out. Property-tested without a server.
//! - this file: the shell. It folds the stream, watches the heartbeat bucket and the
//!   progress subjects, ticks, and sends what the core finds due through the command
//!   client.

pub mod watch;

use std::future::Future;
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

pub use watch::{Due, Policy, Settings, Watch};

/// What the monitor runs with.
#[derive(Clone, Debug)]
pub struct Config {
    /// The thresholds and the failover policy.
    pub settings: Settings,
    /// The monitor's own user (BACKUP_MONITOR), which signs its reports.
    pub creds: Credentials,
    /// The failover policy's user, which signs its moves (the monitor's own when none).
    pub policy_creds: Option<Credentials>,
    /// Replicas of the heartbeat bucket, if the monitor is the first to need it.
    pub replicas: usize,
}

/// Why the monitor stopped.
#[derive(Debug, Error)]
pub enum Error {
    #[error("cannot open the event stream: {0}")]
    Open(#[from] handoff_eventlog::OpenError),
    #[error("cannot read the event stream: {0}")]
    Read(#[from] handoff_eventlog::ReadError),
    #[error("cannot find the end of the event stream: {0}")]
    End(#[from] handoff_eventlog::AppendError),
    #[error("the event stream did not deliver sequence {0} in time")]
    Behind(u64),
    #[error("cannot watch the heartbeat bucket: {0}")]
    Heartbeats(String),
    #[error("cannot hear rebuild progress: {0}")]
    Progress(#[from] async_nats::SubscribeError),
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

/// The heartbeat bucket, created if no daemon has made it yet.
async fn heartbeat_bucket(
    client: &async_nats::Client,
    replicas: usize,
) -> Result<kv::Store, Error> {
    let js = jetstream::new(client.clone());
    if let Ok(store) = js.get_key_value(HEARTBEATS_BUCKET).await {
        return Ok(store);
    }
    js.create_key_value(kv::Config {
        bucket: HEARTBEATS_BUCKET.into(),
        history: 1,
        storage: jetstream::stream::StorageType::File,
        num_replicas: replicas,
        ..Default::default()
    })
    .await
    .map_err(|e| Error::Heartbeats(e.to_string()))
}

async fn watch_heartbeats(bucket: &kv::Store) -> Result<kv::Watch, Error> {
    bucket
        .watch_all()
        .await
        .map_err(|e| Error::Heartbeats(e.to_string()))
}

/// Runs the monitor over `client` until `shutdown` completes.
pub async fn run(
    client: async_nats::Client,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    tokio::pin!(shutdown);
    let Config {
        settings,
        creds,
        policy_creds,
        replicas,
    } = config;
    let name = format!(
        "handoff-monitor {}",
        std::env::var("HOSTNAME").unwrap_or_default()
    );
    let monitor = Client::new(client.clone(), creds.clone(), name.clone());
    let policy = Client::new(client.clone(), policy_creds.unwrap_or(creds), name);
    let bucket = heartbeat_bucket(&client, replicas).await?;
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
    let mut heartbeats = watch_heartbeats(&bucket).await?;
    let mut progress = client.subscribe(subjects::PROGRESS).await?;
    let every =
        (watch.settings().threshold / 5).clamp(Duration::from_millis(50), Duration::from_secs(1));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tracing::info!(
        threshold_ms = watch.settings().threshold.as_millis() as u64,
        failover = watch.settings().failover.is_some(),
        daemons = fold.state.daemons.len(),
        "monitor running"
    );
    loop {
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            r = fold.reader.next() => {
                let r = r?;
                // Observed at the next tick, which is precise enough for every clock here.
                fold.state.apply(&r.envelope.event);
                fold.applied = r.seq;
            }
            e = heartbeats.next() => match e {
                Some(Ok(e)) if e.operation == async_nats::jetstream::kv::Operation::Put => {
                    if let Some(d) = subjects::daemon_from_key(&e.key) {
                        watch.heartbeat(d, Instant::now());
                    }
                }
                Some(_) => {}
                None => {
                    tracing::warn!("the heartbeat watch ended; watching again");
                    heartbeats = watch_heartbeats(&bucket).await?;
                }
            },
            Some(m) = progress.next() => {
                if let Ok(p) = serde_json::from_slice::<Progress>(&m.payload) {
                    watch.progress(&fold.state, &p.job, p.epoch, Instant::now());
                }
            }
            _ = tick.tick() => {
                for due in watch.due(&fold.state, Instant::now()) {
                    let sender = if due.by_policy { &policy } else { &monitor };
                    send(sender, &mut fold, &due.command).await;
                }
            }
        }
    }
}

/// Sends one command and, once applied, folds its events so the next decision sees them.
async fn send(commands: &Client, fold: &mut Fold, command: &Command) {
    let id = new_command_id();
    match commands.send(&id, command).await {
        Ok(applied) => {
            if let Some(last) = applied.events.iter().map(|e| e.seq).max() {
                tracing::info!(
                    command = command.name(),
                    events = applied.events.len(),
                    "reported"
                );
                // Not fatal: the stream delivers them later, and the state catches up then.
                if let Err(e) = fold.until(last).await {
                    tracing::warn!(error = %e, "the state is behind what was appended");
                }
            }
        }
        Err(e) => {
            tracing::info!(command = command.name(), reason = %e.body().reason, message = %e, "not applied");
        }
    }
}

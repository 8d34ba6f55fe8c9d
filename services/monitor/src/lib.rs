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

pub mod watch;

use std::time::{Duration, Instant};

use futures::StreamExt;
use handoff_dataplane::commands::Commands;
use handoff_dataplane::daemon::Progress;
use handoff_dataplane::store::Stores;
use handoff_domain::{Command, CommandId, State};
use handoff_eventlog::{EventLog, EventReader};
use handoff_protocol::auth::Credentials;
use handoff_protocol::subjects;
use tokio::sync::watch as signal;

pub use watch::{Due, Policy, Settings, Watch};

/// Folds the stream into the state the monitor judges on.
struct Fold {
    reader: EventReader,
    state: State,
    applied: u64,
}

impl Fold {
    async fn until(&mut self, seq: u64) -> anyhow::Result<()> {
        while self.applied < seq {
            let r = tokio::time::timeout(Duration::from_secs(10), self.reader.next())
                .await
                .map_err(|_| anyhow::anyhow!("the event stream did not deliver {seq}"))??;
            self.state.apply(&r.envelope.event);
            self.applied = r.seq;
        }
        Ok(())
    }
}

/// Runs the monitor until `stop` turns true. `policy_creds` signs the failover policy's
/// moves (the monitor's own credentials when none).
pub async fn run(
    stores: Stores,
    settings: Settings,
    creds: Credentials,
    policy_creds: Option<Credentials>,
    mut stop: signal::Receiver<bool>,
) -> anyhow::Result<()> {
    let client = stores.client.clone();
    let name = format!(
        "handoff-monitor {}",
        std::env::var("HOSTNAME").unwrap_or_default()
    );
    let monitor = Commands::new(client.clone(), creds.clone(), name.clone());
    let policy = Commands::new(client.clone(), policy_creds.unwrap_or(creds), name);
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
    let mut heartbeats = stores.heartbeats.watch_all().await?;
    let mut progress = client.subscribe("handoff.progress.>").await?;
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
            _ = stop.changed() => return Ok(()),
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
                    heartbeats = stores.heartbeats.watch_all().await?;
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
async fn send(commands: &Commands, fold: &mut Fold, command: &Command) {
    let id = CommandId::new(ulid::Ulid::new().to_string()).expect("a ULID is a command id");
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
            tracing::info!(command = command.name(), reason = %e.reason, message = %e.message, "not applied");
        }
    }
}

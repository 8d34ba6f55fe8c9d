//! The projector: folds the event stream into views in sled and answers queries from them.
//!
//! # How an event flows
//! 1. A durable pull consumer (`handoff-projector-<name>`) delivers events from the
//!    store's checkpoint + 1. The checkpoint in sled, not the consumer, decides where to
//!    resume: sled may lose its last unflushed batches in a crash, so at every start the
//!    consumer is created again from the checkpoint.
//! 2. Each event must be checkpoint + 1. A gap is never skipped: the consumer is created
//!    again from the checkpoint, and if the stream no longer holds the missing event the
//!    projector stops with [`Error::Missing`].
//! 3. A reader task decodes events ahead of the fold. The [`views`] fold the events the
//!    consumer has ready (up to a batch; full batches while catching up) and the records
//!    they touched are written with the new checkpoint in one atomic batch ([`store`]) by
//!    a writer thread, in order, while the next batch is folded. Killed at any point,
//!    the store holds the views of a prefix of the stream, and the projector goes on from
//!    there: its views equal a rebuild. (A crash test can hold the writer between a
//!    batch's write and its acknowledgement: `HANDOFF_FAILPOINT`, see `Committer`.)
//! 4. The [`query`] micro service (`handoff-query`, endpoints under `handoff.query.`)
//!    answers from the store.
//!
//! `rebuild` clears the store first and folds the whole stream again.
//!
//! # Layout
//! - this file: [`Config`], [`start`], the consumer, the reader task and the fold loop.
//! - [`views`]: the pure fold of events into view records (what each event touches); its
//!   keys (`views/keys.rs`) and the lists each record is in (`views/lists.rs`).
//! - [`store`]: the sled trees, the checkpoint and the writer thread's atomic batches.
//! - [`query`]: the `handoff-query` micro service answering from the store; paging and
//!   the payload limit in `query/page.rs`.

pub mod query;
pub mod store;
pub mod telemetry;
pub mod views;

use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use async_nats::Client;
use futures::StreamExt;
use handoff_eventlog::{EventLog, Recorded};
use handoff_protocol::EventEnvelope;
use thiserror::Error;
use tokio::sync::watch;

pub use store::{SledStore, StoreError, ViewStore};
pub use views::Views;

/// How many events a sled batch gathers: pulls are added until it holds this many, so it
/// holds at most this plus `PULL_BATCH` - 1. While the projector is behind (a rebuild,
/// a restart) batches fill up, so a record touched by many events is written once; when
/// it is live, each batch holds what has arrived. sled frees nothing a batch replaced
/// until the batch is written, so the batch bounds the projector's peak memory: a rebuild
/// over 1,043,261 events peaked at 900 MiB with 10,000 (`scripts/bench f`).
pub const MAX_BATCH: usize = 1_000;
/// The most events one pull request asks for.
const PULL_BATCH: usize = 1000;

/// The projector's settings.
#[derive(Clone, Debug)]
pub struct Config {
    /// Names this projector's consumer; each projector has its own store.
    pub name: String,
    /// The sled directory.
    pub store_dir: PathBuf,
    /// Clear the views and fold the whole stream again.
    pub rebuild: bool,
    pub event_log: handoff_eventlog::Config,
    /// Serve queries (off for a rebuild-only run).
    pub serve_queries: bool,
}

impl Config {
    pub fn new(store_dir: impl Into<PathBuf>) -> Self {
        Config {
            name: "main".to_owned(),
            store_dir: store_dir.into(),
            rebuild: false,
            event_log: handoff_eventlog::Config::default(),
            serve_queries: true,
        }
    }
}

#[derive(Debug, Error)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Open(#[from] handoff_eventlog::OpenError),
    #[error("cannot consume the event stream: {0}")]
    Consumer(String),
    #[error("event {seq} cannot be decoded: {source}")]
    Decode {
        seq: u64,
        #[source]
        source: handoff_protocol::DecodeError,
    },
    #[error("cannot start the query service: {0}")]
    Query(String),
    /// An event the views need is not in the stream (deleted, or the stream replaced):
    /// the views cannot go past it. Never skipped.
    #[error("event {missing} is missing from the event stream; the views stop at {checkpoint}")]
    Missing { missing: u64, checkpoint: u64 },
}

/// A started projector.
pub struct Projector {
    config: Config,
    log: EventLog,
    store: SledStore,
    views: Views,
    checkpoint: watch::Sender<u64>,
    /// The last sequence folded into the in-memory views; the store catches up with it
    /// as the committer writes.
    applied: u64,
    queries: Option<query::QueryService>,
}

/// Writes batches to the store in order on a blocking thread, so the fold of the next
/// batch overlaps the write of this one; publishes the checkpoint once a batch is stored.
struct Committer {
    tx: Option<tokio::sync::mpsc::Sender<(Vec<views::Change>, u64)>>,
    task: tokio::task::JoinHandle<Result<(), StoreError>>,
}

/// The fault-injection point of crash tests: with `HANDOFF_FAILPOINT` set to
/// `projector-after-write-past:<seq>`, the writer stops right after it has written (and
/// flushed) the first batch whose checkpoint is past `<seq>`, before it acknowledges that
/// batch (publishes its checkpoint), says so on stderr, and waits there until the process
/// is killed. A test kills it there and knows the kill fell between a view write and its
/// acknowledgement.
fn failpoint_after_write_past() -> Option<u64> {
    std::env::var("HANDOFF_FAILPOINT")
        .ok()?
        .strip_prefix("projector-after-write-past:")?
        .parse()
        .ok()
}

impl Committer {
    fn start(store: SledStore, checkpoint: watch::Sender<u64>) -> Self {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<(Vec<views::Change>, u64)>(2);
        let failpoint = failpoint_after_write_past();
        let task = tokio::task::spawn_blocking(move || {
            while let Some((changes, seq)) = rx.blocking_recv() {
                store.commit(views::encode(changes), seq)?;
                if failpoint.is_some_and(|past| seq > past) {
                    store.flush()?;
                    eprintln!("failpoint projector-after-write-past: views written through {seq}, not acknowledged");
                    loop {
                        std::thread::park();
                    }
                }
                checkpoint.send_replace(seq);
            }
            store.flush()
        });
        Committer { tx: Some(tx), task }
    }

    async fn commit(&mut self, writes: Vec<views::Change>, seq: u64) -> Result<(), Error> {
        let sent = match &self.tx {
            Some(tx) => tx.send((writes, seq)).await.is_ok(),
            None => false,
        };
        if sent {
            return Ok(());
        }
        // The committer stopped: its error says why.
        self.tx = None;
        match (&mut self.task).await {
            Ok(Err(e)) => Err(e.into()),
            _ => Err(Error::Consumer("the view store writer stopped".into())),
        }
    }

    /// Writes what is queued, flushes, and stops.
    async fn finish(mut self) -> Result<(), Error> {
        self.tx = None;
        match self.task.await {
            Ok(r) => Ok(r?),
            Err(e) => Err(Error::Consumer(format!(
                "the view store writer failed: {e}"
            ))),
        }
    }
}

/// Opens the store (clearing it for a rebuild), loads the views and, unless told not to,
/// starts answering queries.
pub async fn start(client: Client, config: Config) -> Result<Projector, Error> {
    let log = EventLog::attach(client.clone(), config.event_log.clone()).await?;
    let store = SledStore::open_or_reset(&config.store_dir)?;
    if config.rebuild {
        store.clear()?;
    } else if store::other_format(&store)? {
        tracing::warn!(
            format = store::VIEWS_FORMAT,
            "the views were written by another layout; rebuilding them from the stream"
        );
        store.clear()?;
    }
    let views = match Views::load(&store) {
        Ok(v) => v,
        Err(StoreError::Corrupt { detail, .. }) => {
            tracing::warn!(%detail, "views unreadable; rebuilding from the stream");
            store.clear()?;
            Views::default()
        }
        Err(e) => return Err(e.into()),
    };
    store::mark_format(&store)?;
    let (checkpoint, _) = watch::channel(store.checkpoint()?);
    let queries = if config.serve_queries {
        Some(
            query::QueryService::start(client, store.clone(), checkpoint.subscribe())
                .await
                .map_err(|e| Error::Query(e.to_string()))?,
        )
    } else {
        None
    };
    let applied = *checkpoint.borrow();
    Ok(Projector {
        config,
        log,
        store,
        views,
        checkpoint,
        applied,
        queries,
    })
}

/// One event as the reader task hands it over.
struct Delivered {
    recorded: Recorded,
    payload: bytes::Bytes,
    /// How many more the consumer holds for us.
    pending: u64,
}

/// Decodes one consumer message; `None` for a consumer hiccup (missed heartbeat, ...),
/// which the pull consumer recovers from by itself.
fn deliver(
    message: Result<
        async_nats::jetstream::Message,
        async_nats::jetstream::consumer::pull::MessagesError,
    >,
) -> Option<Result<Delivered, Error>> {
    let message = match message {
        Ok(m) => m,
        Err(e) => {
            tracing::debug!(error = %e, "consumer hiccup");
            return None;
        }
    };
    let info = match message.info() {
        Ok(i) => i,
        Err(e) => return Some(Err(Error::Consumer(e.to_string()))),
    };
    let (seq, pending) = (info.stream_sequence, info.pending);
    Some(
        EventEnvelope::decode(&message.payload)
            .map_err(|source| Error::Decode { seq, source })
            .map(|envelope| Delivered {
                recorded: Recorded {
                    seq,
                    subject: message.subject.to_string(),
                    envelope,
                },
                payload: message.payload.clone(),
                pending,
            }),
    )
}

/// Aborts a task when dropped.
/// How often the projector measures how far behind the stream it is.
const LAG_EVERY: Duration = Duration::from_secs(5);
/// How often, at most, the fold sets the state's gauges.
const STATE_GAUGES_EVERY: Duration = Duration::from_secs(1);

/// Every [`LAG_EVERY`], the stream's last sequence against the stored views': on a task of
/// its own, so a fold that stalls still shows its lag growing.
async fn measure_lag(log: EventLog, checkpoint: watch::Receiver<u64>) {
    let mut every = tokio::time::interval(LAG_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        match log.last_sequence().await {
            Ok(last) => telemetry::behind(last, *checkpoint.borrow()),
            Err(e) => tracing::debug!(error = %e, "cannot measure the lag"),
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Why the fold of a consumer's messages stopped.
enum Stop {
    Shutdown,
    Gap {
        expected: u64,
        got: u64,
    },
    /// Rebuild finished: caught up with the stream's end as it was at start.
    CaughtUp,
}

impl Projector {
    /// The checkpoint as it advances.
    pub fn checkpoint(&self) -> watch::Receiver<u64> {
        self.checkpoint.subscribe()
    }

    /// Folds events until `shutdown` completes.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        self.fold(shutdown, None).await
    }

    /// Folds events until the views include the stream's last event as it is now.
    pub async fn run_until_caught_up(self) -> Result<u64, Error> {
        let end = self
            .log
            .last_sequence()
            .await
            .map_err(|e| Error::Consumer(e.to_string()))?;
        let rx = self.checkpoint.subscribe();
        self.fold(std::future::pending(), Some(end)).await?;
        let at = *rx.borrow();
        Ok(at)
    }

    async fn fold(
        mut self,
        shutdown: impl Future<Output = ()>,
        until: Option<u64>,
    ) -> Result<(), Error> {
        tokio::pin!(shutdown);
        let mut committer = Committer::start(self.store.clone(), self.checkpoint.clone());
        telemetry::state(self.views.state());
        let _lag = AbortOnDrop(tokio::spawn(measure_lag(
            self.log.clone(),
            self.checkpoint.subscribe(),
        )));
        let result = async {
            loop {
                if until.is_some_and(|end| self.applied >= end) {
                    return Ok(());
                }
                match self.consume(&mut shutdown, until, &mut committer).await? {
                    Stop::Shutdown | Stop::CaughtUp => return Ok(()),
                    Stop::Gap { expected, got } => {
                        if !self.exists(expected).await? {
                            return Err(Error::Missing {
                                missing: expected,
                                checkpoint: expected - 1,
                            });
                        }
                        tracing::warn!(
                            expected,
                            got,
                            "gap in the delivery; consuming again from the checkpoint"
                        );
                    }
                }
            }
        }
        .await;
        let finished = committer.finish().await;
        if let Some(q) = self.queries.take() {
            q.stop().await;
        }
        result.and(finished)
    }

    async fn stream(&self) -> Result<async_nats::jetstream::stream::Stream, Error> {
        self.log
            .jetstream()
            .get_stream(self.log.stream_name())
            .await
            .map_err(|e| Error::Consumer(e.to_string()))
    }

    /// Whether the stream holds event `seq`.
    async fn exists(&self, seq: u64) -> Result<bool, Error> {
        match self.stream().await?.get_raw_message(seq).await {
            Ok(_) => Ok(true),
            Err(e)
                if e.kind()
                    == async_nats::jetstream::stream::RawMessageErrorKind::NoMessageFound =>
            {
                Ok(false)
            }
            Err(e) => Err(Error::Consumer(e.to_string())),
        }
    }

    async fn consume(
        &mut self,
        shutdown: &mut (impl Future<Output = ()> + Unpin),
        until: Option<u64>,
        committer: &mut Committer,
    ) -> Result<Stop, Error> {
        // The in-memory views are at `applied`; whatever the committer has queued up to
        // there will be stored, so the consumer starts after it.
        let from = self.applied + 1;
        let stream = self.stream().await?;
        let durable = format!("handoff-projector-{}", self.config.name);
        // The store's checkpoint, not the consumer's position, says where to resume.
        if let Err(e) = stream.delete_consumer(&durable).await {
            tracing::debug!(error = %e, "no consumer to delete");
        }
        let consumer = stream
            .create_consumer(pull::Config {
                durable_name: Some(durable),
                description: Some("handoff projector: folds events into sled views".into()),
                deliver_policy: DeliverPolicy::ByStartSequence {
                    start_sequence: from,
                },
                ack_policy: AckPolicy::None,
                // Every subject of the event stream: it holds nothing but events.
                ..Default::default()
            })
            .await
            .map_err(|e| Error::Consumer(e.to_string()))?;
        let messages = consumer
            .stream()
            .max_messages_per_batch(PULL_BATCH)
            .heartbeat(Duration::from_secs(5))
            .messages()
            .await
            .map_err(|e| Error::Consumer(e.to_string()))?;
        // Reading and decoding run in a task of their own, ahead of the fold, so the
        // network, JSON and sled work overlap.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<Result<Delivered, Error>>>(8);
        let reader = tokio::spawn(async move {
            let mut chunks = messages.ready_chunks(PULL_BATCH);
            while let Some(chunk) = chunks.next().await {
                let decoded: Vec<_> = chunk.into_iter().filter_map(deliver).collect();
                if tx.send(decoded).await.is_err() {
                    break;
                }
            }
        });
        let _abort_reader = AbortOnDrop(reader);
        let mut gauges_at = Instant::now();
        // A batch folded since the state's gauges were last set.
        let mut gauges_stale = false;
        loop {
            // Gather while the consumer says more is pending, up to a full batch.
            let mut batch = Vec::new();
            loop {
                let due = tokio::time::Instant::from_std(gauges_at + STATE_GAUGES_EVERY);
                let chunk = tokio::select! {
                    biased;
                    _ = &mut *shutdown => return Ok(Stop::Shutdown),
                    chunk = rx.recv() => match chunk {
                        Some(c) => c,
                        None => return Err(Error::Consumer("the consumer ended".into())),
                    },
                    // The last batch's state, once a second has passed, even when nothing
                    // follows it.
                    _ = tokio::time::sleep_until(due), if gauges_stale && batch.is_empty() => {
                        gauges_at = Instant::now();
                        gauges_stale = false;
                        telemetry::state(self.views.state());
                        continue;
                    }
                };
                let pending = chunk
                    .iter()
                    .rev()
                    .find_map(|d| d.as_ref().ok().map(|d| d.pending))
                    .unwrap_or(0);
                batch.extend(chunk);
                if pending == 0 || batch.len() >= MAX_BATCH {
                    break;
                }
            }
            let mut checkpoint = self.applied;
            let mut writes = Vec::new();
            let mut gap = None;
            for delivered in batch {
                let Delivered {
                    recorded, payload, ..
                } = delivered?;
                let seq = recorded.seq;
                if seq <= checkpoint {
                    continue; // Delivered again; already in the views.
                }
                if seq != checkpoint + 1 {
                    gap = Some(Stop::Gap {
                        expected: checkpoint + 1,
                        got: seq,
                    });
                    break;
                }
                self.views.apply(&recorded, &payload);
                checkpoint = seq;
            }
            if checkpoint > self.applied {
                self.views.drain(&mut writes);
                telemetry::folded(checkpoint - self.applied);
                self.applied = checkpoint;
                committer.commit(writes, checkpoint).await?;
                gauges_stale = true;
                if gauges_at.elapsed() >= STATE_GAUGES_EVERY {
                    gauges_at = Instant::now();
                    gauges_stale = false;
                    telemetry::state(self.views.state());
                }
            }
            if let Some(stop) = gap {
                return Ok(stop);
            }
            if until.is_some_and(|end| checkpoint >= end) {
                return Ok(Stop::CaughtUp);
            }
        }
    }
}

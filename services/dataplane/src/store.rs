//! The data plane's places on JetStream: the oplog store (a stream with one subject per
//! job), the snapshot store (an object store) and its index by job (a key-value bucket,
//! so that a job's snapshots are listed without reading the whole store), and key-value
//! buckets for the data plane's settings, restore leases and daemon heartbeats; the heads' positions live beside the
//! jobs' fences, in the fence bucket, so that a position is written in one step with its
//! fence check.
//!
//! Who creates what (the NATS permissions allow no one else): the agent creates the data
//! plane's stores ([`Stores::open`]), the command service the fences; every other process
//! binds ([`Stores::bind`]) and never creates. A store that is not there yet is
//! [`StoreError::Missing`], which a service waits out by retrying its start-up.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv, object_store, stream};
use futures::StreamExt;
use handoff_domain::JobId;

use handoff_eventlog::fence::{stream_not_found, FenceError, Fences};

use crate::schedule::Schedule;
use handoff_protocol::subjects;

use handoff_protocol::dataplane::{
    object_stream, CONFIG_BUCKET, HEARTBEATS_BUCKET, LEASES_BUCKET, OPLOG_STREAM, SNAPSHOT_BUCKET,
    SNAPSHOT_INDEX_BUCKET,
};
pub use handoff_protocol::dataplane::{HeadRecord, Heartbeat, Lease, Settings, SnapshotMeta};

mod snapshots;

/// The most bytes reserved up front for a snapshot read into memory: a wrong size in its
/// metadata (2^64 - 1 aborted the daemon) costs no more than this.
pub const RESERVE_AT_MOST: usize = 16 << 20;

/// The name of a job's head record beside its fence (key `head.<job>` in the fence bucket).
const HEAD_RECORD: &str = "head";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No answer, or not now (a node down, a stream's leader being elected): try again.
    #[error("the data plane's stores are unavailable: {0}")]
    Unavailable(String),
    /// A store does not exist yet, and this process does not create it: `owner` does
    /// when it starts. Try again.
    #[error("the data plane's store {store} does not exist yet ({owner} creates it)")]
    Missing {
        store: &'static str,
        owner: &'static str,
    },
    /// The agent could not create a missing store. The source says whether that passes
    /// (a timeout, a cluster without a leader or without enough peers) or not (a store of
    /// the same name with another configuration, more replicas than the server can have).
    #[error("cannot create the data plane's store {store}: {source}")]
    Create {
        store: &'static str,
        #[source]
        source: async_nats::Error,
    },
    #[error("snapshot {0} is not in the snapshot store")]
    MissingSnapshot(String),
    #[error("{0}")]
    Invalid(String),
    /// The writer's epoch is older than the job's: it lost the job (fencing).
    #[error("refused: {0}")]
    Fenced(String),
}

impl From<FenceError> for StoreError {
    fn from(e: FenceError) -> Self {
        match e {
            FenceError::Stale { .. } => StoreError::Fenced(e.to_string()),
            // Not fenced: the job's epoch is unknown, so the write waits (refused, to be
            // tried again) until the fence holds an epoch again.
            FenceError::Corrupt { .. } => StoreError::Invalid(e.to_string()),
            FenceError::Unavailable(m) => StoreError::Unavailable(m),
            FenceError::Missing => StoreError::Missing {
                store: handoff_eventlog::fence::BUCKET,
                owner: "the command service",
            },
            FenceError::Create { source } => StoreError::Create {
                store: handoff_eventlog::fence::BUCKET,
                source: source.into(),
            },
        }
    }
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

use handoff_protocol::now_ms;

/// Handles to every store.
#[derive(Clone)]
pub struct Stores {
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub oplog: stream::Stream,
    pub snapshots: object_store::ObjectStore,
    /// The stream behind `snapshots`, to purge what a delete leaves.
    snapshot_stream: stream::Stream,
    /// Opened by the agent, which may purge the stores (no one else may).
    may_purge: bool,
    /// Each snapshot's metadata by job ([`snapshot_key`]).
    pub snapshot_index: kv::Store,
    pub config: kv::Store,
    pub leases: kv::Store,
    pub heartbeats: kv::Store,
    /// Each job's epoch: snapshots and head positions from an older one are refused. The
    /// heads' positions are kept here too, beside each job's fence (see [`Stores::put_head`]).
    pub fences: Fences,
}

/// How a process reaches the stores: the agent creates those that are missing, every
/// other process only binds.
#[derive(Clone, Copy)]
enum Reach {
    Create { replicas: usize },
    Bind,
}

/// The agent, which creates the data plane's stores.
const AGENT: &str = "the agent";

/// Gets the store `name` with `get`; only when the server says it is not there, creates
/// it with `create` if `how` allows, else it is [`StoreError::Missing`]. Any other
/// failure to get it is [`StoreError::Unavailable`]: never a reason to create.
async fn reach_store<T, G, GE, C, CE>(
    name: &'static str,
    how: Reach,
    get: impl FnOnce() -> G,
    create: impl FnOnce(usize) -> C,
) -> Result<T, StoreError>
where
    G: std::future::Future<Output = Result<T, GE>>,
    GE: std::error::Error + 'static,
    C: std::future::Future<Output = Result<T, CE>>,
    CE: std::error::Error + Send + Sync + 'static,
{
    match get().await {
        Ok(store) => Ok(store),
        Err(e) if stream_not_found(&e) => match how {
            Reach::Create { replicas } => create(replicas).await.map_err(|e| StoreError::Create {
                store: name,
                source: e.into(),
            }),
            Reach::Bind => Err(StoreError::Missing {
                store: name,
                owner: AGENT,
            }),
        },
        Err(e) => Err(StoreError::Unavailable(format!("{name}: {e}"))),
    }
}

impl Stores {
    /// Opens the stores as the agent, their owner: creates those that do not exist yet
    /// with `replicas` copies. The fences are the command service's: bound, never
    /// created ([`StoreError::Missing`] until it has started).
    pub async fn open(client: async_nats::Client, replicas: usize) -> Result<Stores, StoreError> {
        Self::reach(client, Reach::Create { replicas }).await
    }

    /// Binds to the stores as every process but the agent (a daemon, the monitor, the
    /// operator's restores): never creates one. A store not there yet is
    /// [`StoreError::Missing`]; a service waits for it by retrying its start-up.
    pub async fn bind(client: async_nats::Client) -> Result<Stores, StoreError> {
        Self::reach(client, Reach::Bind).await
    }

    async fn reach(client: async_nats::Client, how: Reach) -> Result<Stores, StoreError> {
        let js = jetstream::new(client.clone());
        let oplog = reach_store(
            OPLOG_STREAM,
            how,
            || js.get_stream(OPLOG_STREAM),
            |replicas| {
                js.create_stream(stream::Config {
                    name: OPLOG_STREAM.into(),
                    subjects: vec![subjects::OPLOG.into()],
                    storage: stream::StorageType::File,
                    num_replicas: replicas,
                    // Retention purges per job up to a sequence; never an age or size
                    // limit, which could drop entries a head or a restore still needs.
                    deny_delete: true,
                    deny_purge: false,
                    allow_direct: true,
                    duplicate_window: Duration::from_secs(120),
                    ..Default::default()
                })
            },
        )
        .await?;
        let snapshots = reach_store(
            SNAPSHOT_BUCKET,
            how,
            || js.get_object_store(SNAPSHOT_BUCKET),
            |replicas| {
                js.create_object_store(object_store::Config {
                    bucket: SNAPSHOT_BUCKET.into(),
                    storage: stream::StorageType::File,
                    num_replicas: replicas,
                    ..Default::default()
                })
            },
        )
        .await?;
        let js_ref = &js;
        let bucket = |name: &'static str, history: i64| {
            let js = js_ref;
            reach_store(
                name,
                how,
                move || js.get_key_value(name),
                move |replicas| {
                    js.create_key_value(kv::Config {
                        bucket: name.into(),
                        history,
                        storage: stream::StorageType::File,
                        num_replicas: replicas,
                        ..Default::default()
                    })
                },
            )
        };
        Ok(Stores {
            snapshot_stream: js
                .get_stream(object_stream(SNAPSHOT_BUCKET))
                .await
                .map_err(|e| StoreError::Unavailable(format!("{SNAPSHOT_BUCKET}: {e}")))?,
            snapshot_index: bucket(SNAPSHOT_INDEX_BUCKET, 1).await?,
            may_purge: matches!(how, Reach::Create { .. }),
            config: bucket(CONFIG_BUCKET, 5).await?,
            leases: bucket(LEASES_BUCKET, 1).await?,
            heartbeats: bucket(HEARTBEATS_BUCKET, 1).await?,
            fences: Fences::bind(&js).await?,
            client,
            js,
            oplog,
            snapshots,
        })
    }

    /// The data plane's settings (the defaults when none were set).
    pub async fn settings(&self) -> Result<Settings, StoreError> {
        match self.config.get("config").await.map_err(unavailable)? {
            Some(v) => serde_json::from_slice(&v)
                .map_err(|e| StoreError::Invalid(format!("stored settings are unreadable: {e}"))),
            None => Ok(Settings::default()),
        }
    }

    pub async fn set_settings(&self, s: &Settings) -> Result<(), StoreError> {
        s.validate().map_err(StoreError::Invalid)?;
        self.config
            .put("config", serde_json::to_vec(s).expect("json").into())
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    /// A job's snapshot schedule: its own, else the default.
    pub async fn schedule(&self, job: &JobId) -> Result<Schedule, StoreError> {
        match self.own_schedule(job).await? {
            Some(s) => Ok(s),
            None => Ok(self.settings().await?.schedule),
        }
    }

    /// A job's own schedule, if it has one.
    pub async fn own_schedule(&self, job: &JobId) -> Result<Option<Schedule>, StoreError> {
        match self
            .config
            .get(format!("schedule/{job}"))
            .await
            .map_err(unavailable)?
        {
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| StoreError::Invalid(format!("stored schedule is unreadable: {e}"))),
            None => Ok(None),
        }
    }

    pub async fn set_schedule(&self, job: &JobId, s: &Schedule) -> Result<(), StoreError> {
        s.validate().map_err(StoreError::Invalid)?;
        self.config
            .put(
                format!("schedule/{job}"),
                serde_json::to_vec(s).expect("json").into(),
            )
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    /// Reads a job's oplog in order from stream sequence `from` (1: from the start).
    pub async fn read_oplog(
        &self,
        job: &JobId,
        from: u64,
    ) -> Result<consumer::pull::Ordered, StoreError> {
        let deliver_policy = if from <= 1 {
            consumer::DeliverPolicy::All
        } else {
            consumer::DeliverPolicy::ByStartSequence {
                start_sequence: from,
            }
        };
        let consumer = self
            .oplog
            .create_consumer(consumer::pull::OrderedConfig {
                deliver_policy,
                filter_subject: subjects::oplog(job),
                ..Default::default()
            })
            .await
            .map_err(unavailable)?;
        consumer.messages().await.map_err(unavailable)
    }

    /// The stream sequence of a job's first oplog message stored at or after
    /// `at_ms`, if any.
    pub async fn oplog_first_since(
        &self,
        job: &JobId,
        at_ms: u64,
    ) -> Result<Option<u64>, StoreError> {
        let start = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(at_ms) * 1_000_000)
            .map_err(|e| StoreError::Invalid(e.to_string()))?;
        let consumer = self
            .oplog
            .create_consumer(consumer::pull::OrderedConfig {
                deliver_policy: consumer::DeliverPolicy::ByStartTime { start_time: start },
                filter_subject: subjects::oplog(job),
                ..Default::default()
            })
            .await
            .map_err(unavailable)?;
        let mut messages = consumer.messages().await.map_err(unavailable)?;
        // A consumer starting past the last message delivers nothing: no message since.
        match tokio::time::timeout(Duration::from_millis(500), messages.next()).await {
            Ok(Some(Ok(m))) => Ok(Some(m.info().map_err(unavailable)?.stream_sequence)),
            Ok(Some(Err(e))) => Err(unavailable(e)),
            Ok(None) | Err(_) => Ok(None),
        }
    }

    /// A job's first stored oplog message: its sequence and stored time.
    pub async fn oplog_first(&self, job: &JobId) -> Result<Option<(u64, u64)>, StoreError> {
        match self
            .oplog
            .direct_get_first_for_subject(subjects::oplog(job))
            .await
        {
            Ok(m) => Ok(Some((m.sequence, time_ms(m.time)))),
            Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => Ok(None),
            Err(e) => Err(unavailable(e)),
        }
    }

    /// A job's last stored oplog message: its sequence and headers.
    pub async fn oplog_last(
        &self,
        job: &JobId,
    ) -> Result<Option<(u64, async_nats::HeaderMap)>, StoreError> {
        match self
            .oplog
            .direct_get_last_for_subject(subjects::oplog(job))
            .await
        {
            Ok(m) => Ok(Some((m.sequence, m.headers))),
            Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => Ok(None),
            Err(e) => Err(unavailable(e)),
        }
    }

    /// The stored time of one oplog message.
    pub async fn oplog_time(&self, seq: u64) -> Result<Option<u64>, StoreError> {
        match self.oplog.direct_get(seq).await {
            Ok(m) => Ok(Some(time_ms(m.time))),
            Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => Ok(None),
            Err(e) => Err(unavailable(e)),
        }
    }

    /// Purges a job's oplog below stream sequence `below`.
    pub async fn purge_oplog(&self, job: &JobId, below: u64) -> Result<u64, StoreError> {
        let r = self
            .oplog
            .purge()
            .filter(subjects::oplog(job))
            .sequence(below)
            .await
            .map_err(unavailable)?;
        Ok(r.purged)
    }

    /// Records where a job's head stands. Fenced, in one step: the record is kept beside
    /// the job's fence and written only if the fence holds the record's epoch at the
    /// moment of the write (raised to it first if it is lower), so a daemon that lost the
    /// job never overwrites its new owner's position, however long it was frozen between
    /// reading the fence and writing.
    pub async fn put_head(&self, job: &JobId, head: &HeadRecord) -> Result<(), StoreError> {
        let value: bytes::Bytes = serde_json::to_vec(head).expect("json").into();
        self.fences
            .put_beside(job, head.epoch, HEAD_RECORD, value)
            .await
            .map_err(|e| match e {
                FenceError::Stale { current, .. } => StoreError::Fenced(format!(
                    "stale epoch for job {job}: the head record of {} carries epoch {}, the job is at {current}",
                    head.daemon, head.epoch
                )),
                other => other.into(),
            })
    }

    pub async fn head(&self, job: &JobId) -> Result<Option<HeadRecord>, StoreError> {
        Ok(self
            .fences
            .read_beside(job, HEAD_RECORD)
            .await?
            .and_then(|v| serde_json::from_slice(&v).ok()))
    }

    /// Records a restore reading `job`'s oplog from `from_seq`; returns its key.
    pub async fn take_lease(&self, job: &JobId, from_seq: u64) -> Result<String, StoreError> {
        let key = ulid::Ulid::new().to_string();
        let lease = Lease {
            job: job.clone(),
            from_seq,
            at_ms: now_ms(),
        };
        self.leases
            .put(&key, serde_json::to_vec(&lease).expect("json").into())
            .await
            .map_err(unavailable)?;
        Ok(key)
    }

    pub async fn drop_lease(&self, key: &str) {
        if let Err(e) = self.leases.purge(key).await {
            tracing::warn!(lease = key, error = %e, "could not drop a restore lease");
        }
    }

    /// Restores in progress.
    pub async fn leases(&self) -> Result<Vec<Lease>, StoreError> {
        let mut keys = self.leases.keys().await.map_err(unavailable)?;
        let mut out = Vec::new();
        while let Some(k) = keys.next().await {
            let k = k.map_err(unavailable)?;
            if let Some(v) = self.leases.get(&k).await.map_err(unavailable)? {
                if let Ok(l) = serde_json::from_slice(&v) {
                    out.push(l);
                }
            }
        }
        Ok(out)
    }

    pub async fn put_heartbeat(&self, token: &str, hb: &Heartbeat) -> Result<(), StoreError> {
        self.heartbeats
            .put(token, serde_json::to_vec(hb).expect("json").into())
            .await
            .map_err(unavailable)?;
        Ok(())
    }
}

pub fn time_ms(t: time::OffsetDateTime) -> u64 {
    (t.unix_timestamp_nanos() / 1_000_000).max(0) as u64
}

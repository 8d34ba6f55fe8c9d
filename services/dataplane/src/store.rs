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

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv, object_store, stream};
use futures::StreamExt;
use handoff_domain::JobId;
use tokio::io::AsyncReadExt;

use handoff_eventlog::fence::{stream_not_found, FenceError, Fences};

use crate::schedule::Schedule;
use handoff_protocol::subjects;

use handoff_protocol::dataplane::SNAPSHOT_META_KEY as META_KEY;
use handoff_protocol::dataplane::{
    object_stream, snapshot_key, snapshot_keys, CONFIG_BUCKET, HEARTBEATS_BUCKET, LEASES_BUCKET,
    OPLOG_STREAM, SNAPSHOT_BUCKET, SNAPSHOT_INDEX_BUCKET, SNAPSHOT_INDEX_BUILT,
};
pub use handoff_protocol::dataplane::{HeadRecord, Heartbeat, Lease, Settings, SnapshotMeta};

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

    /// Stores a snapshot. The metadata goes with the object, so the store alone says what
    /// each snapshot is, and into the index by job once it is committed. Fenced: refused
    /// (and nothing kept) if the job's epoch is newer than the snapshot's, before the
    /// upload or when it is committed after it.
    pub async fn put_snapshot(
        &self,
        meta: &SnapshotMeta,
        data: &mut (impl tokio::io::AsyncRead + Unpin),
    ) -> Result<(), StoreError> {
        let held = self.fences.check(&meta.job, meta.epoch).await?;
        self.put_object(meta, data).await?;
        if let Err(e) = self.fences.commit(&meta.job, meta.epoch, held).await {
            // The job moved on while the data was uploaded: take it back out.
            self.take_back(meta).await;
            return Err(e.into());
        }
        self.index(meta).await
    }

    /// Stores a snapshot without looking at the fence (the agent's initial sync, which
    /// happens before any daemon owns the job, and tests).
    pub async fn put_snapshot_unfenced(
        &self,
        meta: &SnapshotMeta,
        data: &mut (impl tokio::io::AsyncRead + Unpin),
    ) -> Result<(), StoreError> {
        self.put_object(meta, data).await?;
        self.index(meta).await
    }

    async fn put_object(
        &self,
        meta: &SnapshotMeta,
        data: &mut (impl tokio::io::AsyncRead + Unpin),
    ) -> Result<(), StoreError> {
        let mut metadata = HashMap::new();
        metadata.insert(
            META_KEY.to_owned(),
            serde_json::to_string(meta).expect("json"),
        );
        let object = object_store::ObjectMetadata {
            name: meta.object_name(),
            description: Some(format!("snapshot of {} at {}", meta.job, meta.ts)),
            metadata,
            ..Default::default()
        };
        self.snapshots
            .put(object, data)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    /// Lists a stored snapshot under its job; one that cannot be is taken back out (an
    /// object nobody lists would only take room).
    async fn index(&self, meta: &SnapshotMeta) -> Result<(), StoreError> {
        let key = snapshot_key(&meta.job, &meta.id);
        let value = serde_json::to_vec(meta).expect("json");
        let Err(e) = self.snapshot_index.put(key.clone(), value.into()).await else {
            return Ok(());
        };
        // A put that timed out may have landed: then the entry lists the object, which
        // must stay. Only an entry known to be absent lets the object go.
        match self.snapshot_index.entry(key).await {
            Ok(Some(entry)) if entry.operation == kv::Operation::Put => Ok(()),
            Ok(_) => {
                self.take_back(meta).await;
                Err(unavailable(e))
            }
            Err(read) => {
                tracing::warn!(snapshot = %meta.id, error = %read, "unknown whether a snapshot was indexed; its object stays");
                Err(unavailable(e))
            }
        }
    }

    /// Removes the object of a snapshot that was never indexed (refused, or its index
    /// entry not written): nobody lists it, so only the object is there to remove.
    async fn take_back(&self, meta: &SnapshotMeta) {
        if let Err(d) = self.delete_object(meta).await {
            tracing::warn!(snapshot = %meta.id, error = %d, "could not remove a refused snapshot");
        }
    }

    /// Indexes the snapshots stored before the index existed: once per deployment (the
    /// key [`SNAPSHOT_INDEX_BUILT`] says it was done), in one listing of the object store.
    /// Indexing twice is harmless, so a run cut off is run again. How many it indexed.
    pub async fn index_unindexed(&self) -> Result<u64, StoreError> {
        if self
            .config
            .get(SNAPSHOT_INDEX_BUILT)
            .await
            .map_err(unavailable)?
            .is_some()
        {
            return Ok(0);
        }
        let mut list = self.snapshots.list().await.map_err(unavailable)?;
        let mut indexed = 0;
        while let Some(info) = list.next().await {
            let info = info.map_err(unavailable)?;
            let Some(raw) = info.metadata.get(META_KEY).filter(|_| !info.deleted) else {
                continue;
            };
            let Ok(meta) = serde_json::from_str::<SnapshotMeta>(raw) else {
                tracing::warn!(object = %info.name, "snapshot metadata unreadable; not indexed");
                continue;
            };
            self.snapshot_index
                .put(snapshot_key(&meta.job, &meta.id), raw.clone().into())
                .await
                .map_err(unavailable)?;
            indexed += 1;
        }
        self.config
            .put(SNAPSHOT_INDEX_BUILT, "true".into())
            .await
            .map_err(unavailable)?;
        Ok(indexed)
    }

    /// The snapshots of one job (or all), oldest first: that job's index keys only.
    pub async fn snapshots(&self, job: Option<&JobId>) -> Result<Vec<SnapshotMeta>, StoreError> {
        let keys = match job {
            // A job id is always a valid scope.
            Some(j) => snapshot_keys(j.as_str(), true).expect("a job is a scope"),
            None => ">".to_owned(),
        };
        self.indexed(&keys).await
    }

    /// The snapshots of every job in `scope` (a job, a sharded cluster `project/cluster`
    /// or a project), oldest first: the scope's index keys only.
    pub async fn snapshots_in(&self, scope: &str) -> Result<Vec<SnapshotMeta>, StoreError> {
        let keys = snapshot_keys(scope, false).ok_or_else(|| {
            StoreError::Invalid(format!(
                "{scope:?} is not a job, a cluster or a project (parts of A-Z, a-z, 0-9, _ and -)"
            ))
        })?;
        self.indexed(&keys).await
    }

    /// The index entries under `keys`, read from their last values only.
    async fn indexed(&self, keys: &str) -> Result<Vec<SnapshotMeta>, StoreError> {
        let index = &self.snapshot_index.stream;
        let name = format!("snapshots-{}", ulid::Ulid::new());
        let mut consumer = index
            .create_consumer(consumer::pull::Config {
                name: Some(name.clone()),
                deliver_policy: consumer::DeliverPolicy::LastPerSubject,
                filter_subject: format!("$KV.{SNAPSHOT_INDEX_BUCKET}.{keys}"),
                ack_policy: consumer::AckPolicy::None,
                memory_storage: true,
                // Gone by itself if this reader is (it is deleted when done).
                inactive_threshold: Duration::from_secs(10),
                ..Default::default()
            })
            .await
            .map_err(unavailable)?;
        let read = self.read_index(&mut consumer).await;
        if let Err(e) = index.delete_consumer(&name).await {
            tracing::debug!(consumer = %name, error = %e, "index reader left to expire");
        }
        let mut out = read?;
        out.sort_by_key(|m| (m.ts, m.taken_at_ms));
        Ok(out)
    }

    /// Every entry `consumer` has to deliver: it stops at the last (none pending), or when
    /// nothing comes and the server says none is pending (purged meanwhile).
    async fn read_index(
        &self,
        consumer: &mut consumer::PullConsumer,
    ) -> Result<Vec<SnapshotMeta>, StoreError> {
        let mut out = Vec::new();
        if consumer.cached_info().num_pending == 0 {
            return Ok(out);
        }
        let mut messages = consumer.messages().await.map_err(unavailable)?;
        let mut idle = 0;
        loop {
            let m = match tokio::time::timeout(Duration::from_secs(2), messages.next()).await {
                Ok(Some(Ok(m))) => m,
                Ok(Some(Err(e))) => {
                    tracing::debug!(error = %e, "snapshot index reader hiccup");
                    continue;
                }
                Ok(None) => {
                    return Err(StoreError::Unavailable(
                        "the snapshot index reader ended".into(),
                    ))
                }
                Err(_) => match consumer.info().await {
                    Ok(info) if info.num_pending == 0 => return Ok(out),
                    Ok(_) if idle < 5 => {
                        idle += 1;
                        continue;
                    }
                    Ok(_) => {
                        return Err(StoreError::Unavailable(
                            "the snapshot index sent nothing for 12 s".into(),
                        ))
                    }
                    Err(e) => return Err(unavailable(e)),
                },
            };
            idle = 0;
            let pending = m.info().map_err(unavailable)?.pending;
            let removed = m
                .headers
                .as_ref()
                .and_then(|h| h.get("KV-Operation"))
                .is_some_and(|op| matches!(op.as_str(), "DEL" | "PURGE"));
            if !removed {
                match serde_json::from_slice::<SnapshotMeta>(&m.payload) {
                    Ok(meta) => out.push(meta),
                    Err(e) => {
                        tracing::warn!(subject = %m.subject, error = %e, "snapshot index entry unreadable; skipped")
                    }
                }
            }
            if pending == 0 {
                return Ok(out);
            }
        }
    }

    /// A snapshot's data as it streams from the store. Its size is the store's business:
    /// the metadata's `size_bytes` is a claim by whoever stored it.
    pub async fn open_snapshot(
        &self,
        meta: &SnapshotMeta,
    ) -> Result<object_store::Object, StoreError> {
        self.snapshots
            .get(meta.object_name())
            .await
            .map_err(|e| match e.kind() {
                object_store::GetErrorKind::NotFound => {
                    StoreError::MissingSnapshot(meta.object_name())
                }
                _ => unavailable(e),
            })
    }

    /// A snapshot's data, as stored, in memory (a restore to a file keeps every document
    /// anyway; a rebuild streams with [`Stores::open_snapshot`] instead). The buffer
    /// grows with the data; the metadata's size only hints at it, up to [`RESERVE_AT_MOST`].
    pub async fn read_snapshot(&self, meta: &SnapshotMeta) -> Result<Vec<u8>, StoreError> {
        let mut object = self.open_snapshot(meta).await?;
        let hint = usize::try_from(meta.size_bytes)
            .unwrap_or(usize::MAX)
            .min(RESERVE_AT_MOST);
        let mut data = Vec::with_capacity(hint);
        object
            .read_to_end(&mut data)
            .await
            .map_err(|e| StoreError::Invalid(format!("snapshot {} unreadable: {e}", meta.id)))?;
        Ok(data)
    }

    /// Removes a snapshot: its object, then its index entry, so that a removal cut off
    /// half-way is found (and finished) by the next that lists it; a listed snapshot whose
    /// object is gone is one a restore already refuses as missing. The agent, which may
    /// purge, leaves nothing behind; anyone else leaves the stores' small delete markers.
    pub async fn delete_snapshot(&self, meta: &SnapshotMeta) -> Result<(), StoreError> {
        self.delete_object(meta).await?;
        let key = snapshot_key(&meta.job, &meta.id);
        if self.may_purge {
            let entry = format!("$KV.{SNAPSHOT_INDEX_BUCKET}.{key}");
            self.snapshot_index
                .stream
                .purge()
                .filter(&entry)
                .await
                .map_err(unavailable)?;
        } else {
            self.snapshot_index.purge(&key).await.map_err(unavailable)?;
        }
        Ok(())
    }

    /// Deletes a snapshot's object; one already gone is done.
    async fn delete_object(&self, meta: &SnapshotMeta) -> Result<(), StoreError> {
        match self.snapshots.delete(meta.object_name()).await {
            Ok(()) => {}
            Err(e) if e.kind() == object_store::DeleteErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(unavailable(e)),
        }
        if self.may_purge {
            // The deleted object's metadata (its delete marker), which would stay forever.
            use base64::Engine;
            let name = base64::engine::general_purpose::URL_SAFE.encode(meta.object_name());
            let marker = format!("$O.{SNAPSHOT_BUCKET}.M.{name}");
            self.snapshot_stream
                .purge()
                .filter(&marker)
                .await
                .map_err(unavailable)?;
        }
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

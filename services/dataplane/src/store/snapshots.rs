//! The snapshot store and its index by job: storing a snapshot (fenced, then indexed),
//! listing a job's or a cluster's snapshots from the index, reading and removing them.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::{consumer, kv, object_store};
use futures::StreamExt;
use handoff_domain::JobId;
use tokio::io::AsyncReadExt;

use handoff_protocol::dataplane::SNAPSHOT_META_KEY as META_KEY;
use handoff_protocol::dataplane::{
    snapshot_key, snapshot_keys, SNAPSHOT_BUCKET, SNAPSHOT_INDEX_BUCKET, SNAPSHOT_INDEX_BUILT,
};

use super::{unavailable, SnapshotMeta, StoreError, Stores, RESERVE_AT_MOST};

impl Stores {
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
    /// entry not written): nobody lists it, so only the object is there to remove. The
    /// agent removes it at once; anyone else may not purge (which removing an object
    /// does), so it marks the snapshot's index key deleted and the agent's grooming of the
    /// job removes the object ([`Stores::clear_taken_back`]).
    async fn take_back(&self, meta: &SnapshotMeta) {
        let taken = if self.may_purge {
            self.delete_object(&meta.object_name()).await
        } else {
            let key = snapshot_key(&meta.job, &meta.id);
            self.snapshot_index.delete(key).await.map_err(unavailable)
        };
        if let Err(d) = taken {
            tracing::warn!(snapshot = %meta.id, error = %d, "could not take back a refused snapshot");
        }
    }

    /// The agent's part of [`Stores::take_back`], for the job's index keys marked deleted
    /// (`ids`, from [`Stores::groomed_snapshots`]). The object says what it is: one the
    /// job's fence refuses (an older epoch) is removed; one it allows (its index entry
    /// was lost, or a daemon marked a good snapshot) is listed again, never destroyed on
    /// a mark's word; one already deleted, or whose metadata nothing can read (so nothing
    /// can restore it), leaves only its mark to remove. Each id on its own: one that
    /// fails is tried at the next grooming. How many objects it removed.
    pub async fn clear_taken_back(&self, job: &JobId, ids: &[String]) -> Result<u64, StoreError> {
        if !self.may_purge {
            return Ok(0);
        }
        let mut removed = 0;
        for id in ids {
            match self.clear_one(job, id).await {
                Ok(true) => removed += 1,
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(%job, snapshot = %id, error = %e, "a snapshot marked deleted not cleared")
                }
            }
        }
        Ok(removed)
    }

    /// Clears one id of [`Stores::clear_taken_back`]: whether it removed the object.
    async fn clear_one(&self, job: &JobId, id: &str) -> Result<bool, StoreError> {
        let name = format!("{job}/{id}");
        let stored = match self.snapshots.info(&name).await {
            Ok(info) if info.deleted => None,
            Ok(info) => info
                .metadata
                .get(META_KEY)
                .and_then(|m| serde_json::from_str::<SnapshotMeta>(m).ok())
                .filter(|m| m.job == *job && m.id == *id),
            Err(e) if e.kind() == object_store::InfoErrorKind::NotFound => None,
            Err(e) => return Err(unavailable(e)),
        };
        if let Some(meta) = stored {
            match self.fences.check(job, meta.epoch).await {
                Ok(_) => {
                    let value = serde_json::to_vec(&meta).expect("json");
                    let key = snapshot_key(job, id);
                    self.snapshot_index
                        .put(key, value.into())
                        .await
                        .map_err(unavailable)?;
                    tracing::warn!(%job, snapshot = %id, "a snapshot marked deleted but allowed by the fence is listed again");
                    return Ok(false);
                }
                Err(handoff_eventlog::fence::FenceError::Stale { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.delete_object(&name).await?;
        self.purge_index_entry(&snapshot_key(job, id)).await?;
        tracing::info!(%job, snapshot = %id, "a refused snapshot's object removed");
        Ok(true)
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
        Ok(self.indexed(&keys).await?.0)
    }

    /// What grooming a job reads: its snapshots, oldest first, and the ids of those taken
    /// back (their index keys marked deleted, their objects maybe still stored).
    pub async fn groomed_snapshots(
        &self,
        job: &JobId,
    ) -> Result<(Vec<SnapshotMeta>, Vec<String>), StoreError> {
        let keys = snapshot_keys(job.as_str(), true).expect("a job is a scope");
        let (listed, removed) = self.indexed(&keys).await?;
        let prefix = format!("$KV.{SNAPSHOT_INDEX_BUCKET}.{}", snapshot_key(job, ""));
        let ids = removed
            .iter()
            .filter_map(|subject| subject.strip_prefix(&prefix))
            .filter(|id| !id.is_empty() && !id.contains('.'))
            .map(str::to_owned)
            .collect();
        Ok((listed, ids))
    }

    /// The snapshots of every job in `scope` (a job, a sharded cluster `project/cluster`
    /// or a project), oldest first: the scope's index keys only.
    pub async fn snapshots_in(&self, scope: &str) -> Result<Vec<SnapshotMeta>, StoreError> {
        let keys = snapshot_keys(scope, false).ok_or_else(|| {
            StoreError::Invalid(format!(
                "{scope:?} is not a job, a cluster or a project (parts of A-Z, a-z, 0-9, _ and -)"
            ))
        })?;
        Ok(self.indexed(&keys).await?.0)
    }

    /// The index entries under `keys`, read from their last values only, and the subjects
    /// of the keys whose last value is a delete marker.
    async fn indexed(&self, keys: &str) -> Result<(Vec<SnapshotMeta>, Vec<String>), StoreError> {
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
        let (mut out, removed) = read?;
        out.sort_by_key(|m| (m.ts, m.taken_at_ms));
        Ok((out, removed))
    }

    /// Every entry `consumer` has to deliver: it stops at the last (none pending), or when
    /// nothing comes and the server says none is pending (purged meanwhile).
    async fn read_index(
        &self,
        consumer: &mut consumer::PullConsumer,
    ) -> Result<(Vec<SnapshotMeta>, Vec<String>), StoreError> {
        let mut out = Vec::new();
        let mut removed = Vec::new();
        if consumer.cached_info().num_pending == 0 {
            return Ok((out, removed));
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
                    Ok(info) if info.num_pending == 0 => return Ok((out, removed)),
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
            let gone = m
                .headers
                .as_ref()
                .and_then(|h| h.get("KV-Operation"))
                .is_some_and(|op| matches!(op.as_str(), "DEL" | "PURGE"));
            if gone {
                removed.push(m.subject.to_string());
            } else {
                match serde_json::from_slice::<SnapshotMeta>(&m.payload) {
                    Ok(meta) => out.push(meta),
                    Err(e) => {
                        tracing::warn!(subject = %m.subject, error = %e, "snapshot index entry unreadable; skipped")
                    }
                }
            }
            if pending == 0 {
                return Ok((out, removed));
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
        self.delete_object(&meta.object_name()).await?;
        let key = snapshot_key(&meta.job, &meta.id);
        if self.may_purge {
            self.purge_index_entry(&key).await?;
        } else {
            self.snapshot_index.purge(&key).await.map_err(unavailable)?;
        }
        Ok(())
    }

    /// Purges every value of an index key, its delete marker too (the agent only).
    async fn purge_index_entry(&self, key: &str) -> Result<(), StoreError> {
        let entry = format!("$KV.{SNAPSHOT_INDEX_BUCKET}.{key}");
        self.snapshot_index
            .stream
            .purge()
            .filter(&entry)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    /// Deletes a snapshot's object (`job/id`); one already gone is done.
    async fn delete_object(&self, name: &str) -> Result<(), StoreError> {
        match self.snapshots.delete(name).await {
            Ok(()) => {}
            Err(e) if e.kind() == object_store::DeleteErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(unavailable(e)),
        }
        if self.may_purge {
            // The deleted object's metadata (its delete marker), which would stay forever.
            use base64::Engine;
            let name = base64::engine::general_purpose::URL_SAFE.encode(name);
            let marker = format!("$O.{SNAPSHOT_BUCKET}.M.{name}");
            self.snapshot_stream
                .purge()
                .filter(&marker)
                .await
                .map_err(unavailable)?;
        }
        Ok(())
    }
}

//! Rebuilding a head: restore a snapshot into it, then replay the oplog from the
//! snapshot's point until the head holds every stored entry. The daemon runs these for
//! moves and new jobs; the benchmark runs the very same functions.

use std::time::Duration;

use futures::StreamExt;
use handoff_domain::JobId;
use tokio::io::{AsyncBufReadExt, AsyncReadExt};
use tokio::sync::watch;

use crate::head::{Head, HeadError, HeadMeta};
use crate::oplog;
use crate::store::{self, SnapshotMeta, StoreError, Stores};
use handoff_protocol::now_ms;

/// How long a replay waits for the next oplog message it knows is stored.
const SILENCE: Duration = Duration::from_secs(30);

/// Why a rebuild stopped before it could say whether it can finish. A caller tries again
/// later; a rebuild that cannot finish is [`Outcome::Failed`] instead.
#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Head(#[from] HeadError),
    #[error(transparent)]
    Oplog(#[from] OplogError),
}

/// Why reading a job's oplog broke off (the reader, not the entries in it).
#[derive(Debug, thiserror::Error)]
pub enum OplogError {
    /// The oplog store closed the reader.
    #[error("the oplog reader ended")]
    Ended,
    /// Nothing arrived although more was stored when the reader started.
    #[error("no oplog message within {0:?}")]
    Silent(Duration),
    /// A message came without its stream position.
    #[error("an oplog message has no stream position: {0}")]
    Info(#[source] async_nats::Error),
    /// A message is not an oplog slice (a follower stops; a rebuild fails instead).
    #[error("oplog message {seq} is unreadable: {source}")]
    Unreadable {
        seq: u64,
        #[source]
        source: oplog::SliceError,
    },
}

/// Told how a rebuild progresses (a daemon publishes it; a benchmark ignores it).
#[allow(async_fn_in_trait)]
pub trait Observer {
    /// Snapshot bytes restored so far, of `total`.
    async fn restored(&mut self, done: u64, total: u64);
    /// `entries` more oplog entries applied; the head is `lag_ms` behind the newest stored.
    async fn applied(&mut self, entries: u64, lag_ms: u64);
}

/// Observes nothing.
pub struct Quiet;

impl Observer for Quiet {
    async fn restored(&mut self, _: u64, _: u64) {}
    async fn applied(&mut self, _: u64, _: u64) {}
}

/// How a rebuild ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Done: restored, or caught up with the oplog.
    Done,
    /// Cancelled before the end; the head keeps what it has (consistent, resumable).
    Cancelled,
    /// It cannot finish, for this reason (a missing or corrupt snapshot, lost oplog).
    Failed(String),
}

/// The most documents loaded into the head in one batch while a snapshot streams in.
const LOAD_BATCH: usize = 4096;
/// The longest line (one document) a snapshot may hold; a longer one is corruption.
const MAX_LINE: usize = 64 << 20;

/// Restores `snapshot` into an emptied `head`, checking its checksum; on success `meta`
/// stands at the snapshot's point and records it as restored.
///
/// The data streams from the store in batches of documents: memory does not grow with
/// the snapshot, and no size written in the snapshot's metadata sizes a buffer.
pub async fn restore_snapshot(
    stores: &Stores,
    head: &Head,
    meta: &mut HeadMeta,
    snapshot: &SnapshotMeta,
    observer: &mut impl Observer,
) -> Result<Outcome, RebuildError> {
    let object = match stores.open_snapshot(snapshot).await {
        Ok(o) => o,
        Err(StoreError::MissingSnapshot(name)) => {
            return Ok(Outcome::Failed(format!(
                "snapshot {name} is missing from the snapshot store"
            )))
        }
        Err(e) => return Err(e.into()),
    };
    // For the progress only.
    let total = object.info.size as u64;
    let corrupt = |reason: String| {
        Ok(Outcome::Failed(format!(
            "snapshot {} of {} is corrupt: {reason}",
            snapshot.id, snapshot.job
        )))
    };
    let unreadable = |e: std::io::Error| {
        StoreError::Invalid(format!("snapshot {} unreadable: {e}", snapshot.id))
    };
    head.clear()?;
    meta.restored_from = None;
    let mut reader = tokio::io::BufReader::new(object);
    let mut sum = crate::Checksum::default();
    let mut loaded = 0u64;
    // Whole lines, up to a batch of them, and how many lines came before.
    let mut batch = Vec::new();
    let (mut in_batch, mut lines_before) = (0usize, 0usize);
    loop {
        let start = batch.len();
        let n = (&mut reader)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut batch)
            .await
            .map_err(unreadable)?;
        let end = n == 0;
        if n > MAX_LINE && batch.last() != Some(&b'\n') {
            return corrupt(format!(
                "line {} is longer than {MAX_LINE} bytes",
                lines_before + in_batch + 1
            ));
        }
        if !end && batch.len() > start {
            in_batch += 1;
        }
        if in_batch == LOAD_BATCH || (end && in_batch > 0) {
            let docs = match crate::snapshot::parse(&batch) {
                Ok(d) => d,
                Err(e) => return corrupt(format!("after line {lines_before}: {e}")),
            };
            head.load(meta, &mut sum, &docs)?;
            loaded += batch.len() as u64;
            observer.restored(loaded.min(total), total).await;
            lines_before += in_batch;
            in_batch = 0;
            batch.clear();
            tokio::task::yield_now().await;
        }
        if end {
            break;
        }
    }
    if sum != snapshot.checksum {
        return Ok(Outcome::Failed(format!(
            "snapshot {} of {} is corrupt: its data has checksum {sum} but it was taken with {}",
            snapshot.id, snapshot.job, snapshot.checksum
        )));
    }
    meta.checksum = sum;
    meta.restored_from = Some(snapshot.id.clone());
    meta.n = snapshot.n;
    meta.ts = snapshot.ts;
    meta.applied_seq = snapshot.oplog_seq.saturating_sub(1);
    head.set_meta(meta)?;
    observer.restored(total, total).await;
    Ok(Outcome::Done)
}

/// Applies the job's stored oplog after the head's point until the head holds every
/// entry stored when it looked (writes going on meanwhile are caught up to as they
/// come, until nothing is pending), then checks the head's documents against the
/// source's checksum at that point.
pub async fn replay(
    stores: &Stores,
    job: &JobId,
    head: &Head,
    meta: &mut HeadMeta,
    cancelled: &mut watch::Receiver<bool>,
    observer: &mut impl Observer,
) -> Result<Outcome, RebuildError> {
    let Some((last_seq, _)) = stores.oplog_last(job).await? else {
        return verified(head, meta);
    };
    if meta.applied_seq >= last_seq {
        return verified(head, meta);
    }
    let mut messages = stores.read_oplog(job, meta.applied_seq + 1).await?;
    loop {
        let m = tokio::select! {
            _ = cancelled.changed() => return Ok(Outcome::Cancelled),
            m = tokio::time::timeout(SILENCE, messages.next()) => m,
        };
        let m = match m {
            Ok(Some(Ok(m))) => m,
            Ok(Some(Err(e))) => {
                tracing::debug!(error = %e, "oplog reader hiccup");
                continue;
            }
            Ok(None) => return Err(OplogError::Ended.into()),
            Err(_) => return Err(OplogError::Silent(SILENCE).into()),
        };
        let info = m.info().map_err(OplogError::Info)?;
        let (seq, pending, published) = (
            info.stream_sequence,
            info.pending,
            store::time_ms(info.published),
        );
        let entries = match oplog::decode(&m.payload) {
            Ok(e) => e,
            Err(source) => {
                return Ok(Outcome::Failed(
                    OplogError::Unreadable { seq, source }.to_string(),
                ))
            }
        };
        match head.apply(meta, seq, &entries) {
            Ok(applied) => {
                observer
                    .applied(applied as u64, now_ms().saturating_sub(published))
                    .await;
            }
            Err(e @ (HeadError::Gap { .. } | HeadError::Diverged { .. })) => {
                return Ok(Outcome::Failed(e.to_string()))
            }
            Err(e) => return Err(e.into()),
        }
        if pending == 0 {
            return verified(head, meta);
        }
    }
}

/// Done if the head's documents add up to the source's checksum at its point.
pub fn verified(head: &Head, meta: &HeadMeta) -> Result<Outcome, RebuildError> {
    match head.verify(meta) {
        Ok(()) => Ok(Outcome::Done),
        Err(e @ HeadError::Diverged { .. }) => Ok(Outcome::Failed(e.to_string())),
        Err(e) => Err(e.into()),
    }
}

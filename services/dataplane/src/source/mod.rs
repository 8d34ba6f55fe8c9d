//! What the agent reads a job's data from: a source is one replica set (a replica set
//! job, one shard of a sharded cluster, or its config servers). The agent needs three
//! things of it: the documents at one point in time (the initial sync), the oplog entries
//! after that point in order, and the checksum at every point, so that heads and restores
//! can be checked against the source itself. After a restart the agent does not ask the
//! source where it was: the stores say (the latest snapshot plus the oplog shipped after
//! it), and the source carries on from there.
//!
//! # Layout
//! - [`Source`]: one job's source: its [`Point`], its [`Document`]s for the initial sync,
//!   and its next oplog [`Entry`].
//! - [`Factory`]: makes a job's source, new (for the initial sync) or resumed from the
//!   stores ([`Resume`]).
//! - [`SourceError`]: why a source cannot go on.
//! - [`sim`]: the simulated MongoDB, the only implementation so far.
//!
//! # A real MongoDB source
//! A MongoDB implementation would connect to the job's replica set (for a sharded cluster,
//! to each shard's replica set and to the config servers directly, not through mongos)
//! and map the contract like this:
//! - **Timestamps.** [`Ts`] is MongoDB's oplog timestamp (`{t, i}`: seconds and an
//!   increment). The cluster time is one hybrid logical clock across the shards and the
//!   config servers, so a common point of a sharded cluster is one timestamp, as the
//!   simulator's one clock models. [`Factory::seen`] has nothing to do: the cluster time
//!   is always past everything the cluster wrote.
//! - **Initial sync** ([`Factory::start`], [`Source::documents`]). Read the cluster time
//!   (`operationTime` of a `hello`), then scan every collection with read concern
//!   `snapshot` and `atClusterTime` at it, in `_id` order; that time is the source's
//!   first [`Point`]. A scan that outlives the server's snapshot history window
//!   (`minSnapshotHistoryWindowInSeconds`) does what `mongodump --oplog` does instead:
//!   note the last oplog timestamp, scan without a snapshot, and replay the oplog from
//!   the noted point over the scan (entries are whole documents, so replay is
//!   idempotent).
//! - **The oplog** ([`Source::next_entry`]). Either a tailable, awaitable cursor on
//!   `local.oplog.rs` filtered on `{ts: {$gt: <point>}}`, or a change stream opened with
//!   `startAtOperationTime` (skipping what is not after the point) and
//!   `fullDocument: "required"` on collections with `changeStreamPreAndPostImages`:
//!   an [`Entry`] carries the whole document after an insert or an update, where the
//!   oplog itself holds a diff. Each entry keeps its MongoDB `ts`; `n` counts on by one
//!   from the point's.
//! - **Restarts** ([`Factory::resume`]). The point to carry on from is the stores' last
//!   timestamp ([`Resume::ts`]); MongoDB's own resume token could be kept alongside it,
//!   but a timestamp is enough for both cursors. When the oplog no longer reaches back to
//!   it (the first entry of `local.oplog.rs` is after it, or the change stream answers
//!   `ChangeStreamHistoryLost`), the source fails with [`SourceError::HistoryLost`].
//! - **The checksum at a point.** MongoDB has no such thing (its `dbHash` is another
//!   definition), so the source keeps it, as defined in [`crate::checksum`]: the count
//!   and the wrapping sum of [`doc_hash`](crate::checksum::doc_hash)`(id, document)`.
//!   At the initial sync it is summed over the scan; after a restart over
//!   [`Resume::docs`] (or over a scan at `atClusterTime` [`Resume::ts`], which checks the
//!   stores against the source). From there it is kept by entry: add the new document's
//!   hash, subtract the old one's. The old one comes from a table of one hash per `_id`
//!   held by the source (a few bytes per document), or from the change stream's
//!   pre-image (`fullDocumentBeforeChange`). Documents are hashed as the same bytes every
//!   time they are read: canonical Extended JSON of the stored BSON, fields in stored
//!   order.

pub mod sim;

use std::borrow::Cow;
use std::collections::HashMap;
use std::future::Future;

use futures::Stream;
use handoff_domain::JobId;

use crate::checksum::Checksum;
use crate::oplog::{Entry, Ts};

/// A place in a source's history: its oplog up to and including entry `n` at `ts`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Point {
    /// Timestamp of the last entry (or of the initial sync's scan when there is none).
    pub ts: Ts,
    /// Number of the last entry: 1, 2, 3, ... with no gap; 0 before any.
    pub n: u64,
    /// Checksum of the source's data at this point.
    pub checksum: Checksum,
}

/// One document of the initial sync, borrowed from the source where it can be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Document<'a> {
    pub id: Cow<'a, str>,
    /// The document as JSON text: the very bytes its hash in the checksum is taken over.
    pub json: Cow<'a, str>,
}

/// Where the stores end for a job: what a source carries on from after a restart.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resume {
    /// Timestamp of the last entry stored (of the initial sync when none is).
    pub ts: Ts,
    /// Number of that entry.
    pub n: u64,
    /// The job's data at `ts`, rebuilt from the stores (latest snapshot plus the oplog
    /// after it) and checked against the checksum stored with the last entry.
    pub docs: HashMap<String, String>,
}

/// One job's source, read by one task of the agent (which may move it between threads
/// while it awaits).
pub trait Source: Send + Sync {
    /// Where the source is: after the last entry [`next_entry`](Source::next_entry) gave,
    /// or at the initial sync (from [`Factory::start`]) or the stores' end (from
    /// [`Factory::resume`]) before any. Its checksum is the data's exactly there.
    fn point(&self) -> Point;

    /// The documents at [`point`](Source::point), each once, in id order, for the initial
    /// sync. Asked of a source from [`Factory::start`] only, before any entry. It streams:
    /// an implementation must not need the whole data set in memory to produce it.
    fn documents(&self) -> impl Stream<Item = Result<Document<'_>, SourceError>> + Send + '_;

    /// The next oplog entry after [`point`](Source::point), which it then moves to; `None`
    /// when no entry is ready yet. Entries come in the source's order: timestamps
    /// increase, numbers count on by one, each document is whole (none for a delete) and
    /// `c` is the checksum right after the entry. It must not wait for new writes, and
    /// must answer `None` within a bounded number of calls even under a steady flow of
    /// writes: the agent asks until `None`, then ships what it holds, and asks again
    /// about every 20 ms.
    fn next_entry(
        &mut self,
    ) -> impl Future<Output = Result<Option<Entry<'_>>, SourceError>> + Send + '_;
}

/// Makes one [`Source`] per job, all of one deployment (a MongoDB cluster, or the
/// simulator's).
pub trait Factory: Send + Sync + 'static {
    type Source: Source + 'static;

    /// The stores hold entries up to `ts` from an earlier run of the agent (of any job).
    /// A source made after this call never gives an entry or an initial sync at or before
    /// `ts`, so every job's timestamps stay one time line.
    fn seen(&self, ts: Ts);

    /// A source for a job the stores know nothing of, at the point of its initial sync:
    /// [`Source::documents`] are its data there and [`Source::point`] has `n` 0.
    fn start(&self, job: &JobId) -> impl Future<Output = Result<Self::Source, SourceError>> + Send;

    /// A source that carries a job on from where its stores end: its
    /// [`point`](Source::point) is `from.ts` and `from.n`, its checksum that of
    /// `from.docs`, and its first entry is the one after `from.ts` in the source's oplog,
    /// numbered `from.n + 1`.
    fn resume(
        &self,
        job: &JobId,
        from: Resume,
    ) -> impl Future<Output = Result<Self::Source, SourceError>> + Send;
}

/// Why a job's source cannot go on. The agent stops backing up that job and says why;
/// the job's stores stay as they are.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The source cannot be reached or read now (network, election, authentication).
    /// Started again, the agent carries the job on from its stores.
    #[error("the source of {job} cannot be read: {source}")]
    Unavailable {
        job: JobId,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The source's oplog no longer reaches back to `ts` (it rolled over while the agent
    /// was away): the job's oplog would have a gap. The job needs a new initial sync.
    #[error("the oplog of the source of {job} no longer reaches back to {ts}")]
    HistoryLost { job: JobId, ts: Ts },
}

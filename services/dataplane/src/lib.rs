//! The data plane of handoff. A job's data lives in two stores on JetStream: the oplog
//! store (a stream, one subject per job) and the snapshot store (an object store). The
//! agent fills both from the job's source; a daemon keeps each of its jobs' head current
//! from the oplog, cuts the scheduled snapshots from it, and rebuilds a moved job's head
//! from the latest snapshot plus the oplog. Restores read the two stores alone.
//!
//! # Sources
//! The agent reads every job through the [`source::Source`] seam: the documents at one
//! point (the initial sync), the oplog entries after it in order, and the checksum at
//! every point; a [`source::Factory`] makes one source per job, new or carried on from
//! the stores after a restart. The only implementation is [`source::sim`], a simulated
//! MongoDB: a deterministic workload from a seed, on one cluster-wide clock.
//!
//! A real MongoDB source would implement the same seam, per replica set (each shard and
//! the config servers of a sharded cluster are jobs of their own):
//! - the initial sync as a collection scan at one cluster time (read concern `snapshot`,
//!   `atClusterTime`), that time being the snapshot's timestamp;
//! - the oplog as a tail from a timestamp: a tailable cursor on `local.oplog.rs` from
//!   `{ts: {$gt: <point>}}`, or a change stream from `startAtOperationTime` with whole
//!   documents after each change (post-images);
//! - restarts from the last timestamp in the stores (a resume token could ride along),
//!   failing when the oplog no longer reaches back to it;
//! - the checksum at a point kept by the source itself, as [`checksum`] defines it:
//!   summed over the scan (or over the data rebuilt from the stores after a restart),
//!   then moved by each entry, the old document's hash taken from a table of one hash per
//!   `_id` or from the change's pre-image.
//!
//! The [`source`] module says how each method maps onto MongoDB.

pub mod agent;
pub mod daemon;
pub mod groom;
pub mod head;
pub mod rebuild;
pub mod restore;
pub mod snapshot;
pub mod source;
pub mod store;
pub mod telemetry;

// The wire formats live in the protocol crate; they are the data plane's vocabulary.
pub use handoff_protocol::dataplane::{checksum, oplog, retention, schedule};

pub use checksum::Checksum;
pub use oplog::Ts;

/// A flag that turns true once `shutdown` completes: every task of a service watches
/// its own copy, while the service's `run` takes the shutdown as a future, like every
/// other service of handoff.
pub(crate) fn shutdown_flag(
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> tokio::sync::watch::Receiver<bool> {
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        // Ignored: nobody left to tell means the service has stopped already.
        let _ = tx.send(true);
    });
    rx
}

//! The data plane of handoff. A job's data lives in two stores on JetStream: the oplog
//! store (a stream, one subject per job) and the snapshot store (an object store). The
//! agent fills both from the source; a daemon keeps each of its jobs' head current from
//! the oplog, cuts the scheduled snapshots from it, and rebuilds a moved job's head from
//! the latest snapshot plus the oplog. Restores read the two stores alone.

pub mod agent;
pub mod checksum;
pub mod commands;
pub mod daemon;
pub mod head;
pub mod oplog;
pub mod rebuild;
pub mod restore;
pub mod retention;
pub mod schedule;
pub mod schemas;
pub mod snapshot;
pub mod source;
pub mod store;

pub use checksum::Checksum;
pub use oplog::Ts;

//! The data plane's metrics, through the `metrics` facade (the binary installs the
//! Prometheus exporter: `--metrics`): a daemon's rebuilds, and the agent's view of each
//! job's snapshots and oplog.

use std::time::Instant;

use handoff_domain::JobId;
use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Unit,
};

/// Snapshot bytes a daemon restored into heads it rebuilds.
pub const REBUILD_BYTES: &str = "handoff_rebuild_bytes_total";
/// Oplog entries a daemon applied to heads it rebuilds.
pub const REBUILD_ENTRIES: &str = "handoff_rebuild_oplog_entries_total";
/// A rebuild from its start (a worker free) to its end, by `outcome`: `completed`,
/// `failed`, `cancelled` (the job left), `error` (it stops here; it starts again).
pub const REBUILD_SECONDS: &str = "handoff_rebuild_duration_seconds";
/// Rebuilds running on the daemon now.
pub const REBUILDS: &str = "handoff_rebuilds_in_progress";
/// Seconds since each job's latest snapshot, by `job` (the agent's).
pub const SNAPSHOT_AGE: &str = "handoff_snapshot_age_seconds";
/// The oldest of those, over every job the agent grooms.
pub const SNAPSHOT_AGE_MAX: &str = "handoff_snapshot_age_max_seconds";
/// Jobs the agent grooms that have no snapshot yet (their initial sync not done).
pub const SNAPSHOT_MISSING: &str = "handoff_snapshot_missing_jobs";
/// The time the oplog store covers for each job, first entry to last, by `job`.
pub const OPLOG_WINDOW: &str = "handoff_oplog_window_seconds";

/// Describes the metrics (their HELP lines).
pub fn describe() {
    describe_counter!(
        REBUILD_BYTES,
        Unit::Bytes,
        "Snapshot bytes restored into heads being rebuilt."
    );
    describe_counter!(
        REBUILD_ENTRIES,
        Unit::Count,
        "Oplog entries applied to heads being rebuilt."
    );
    describe_histogram!(
        REBUILD_SECONDS,
        Unit::Seconds,
        "Rebuild of a head, from a free worker to its end, by outcome."
    );
    describe_gauge!(REBUILDS, Unit::Count, "Rebuilds running on this daemon.");
    describe_gauge!(
        SNAPSHOT_AGE,
        Unit::Seconds,
        "Seconds since the job's latest snapshot."
    );
    describe_gauge!(
        SNAPSHOT_AGE_MAX,
        Unit::Seconds,
        "Seconds since the latest snapshot of the job whose latest is the oldest."
    );
    describe_gauge!(
        SNAPSHOT_MISSING,
        Unit::Count,
        "Jobs without any snapshot yet."
    );
    describe_gauge!(
        OPLOG_WINDOW,
        Unit::Seconds,
        "The time the oplog store covers for the job, first entry to last."
    );
}

/// One rebuild, counted while it runs; its duration is recorded with its outcome when
/// it is dropped (`error` unless [`Rebuild::ended`] said otherwise).
pub struct Rebuild {
    started: Instant,
    outcome: &'static str,
}

impl Rebuild {
    pub fn start() -> Self {
        gauge!(REBUILDS).increment(1.0);
        Rebuild {
            started: Instant::now(),
            outcome: "error",
        }
    }

    pub fn ended(&mut self, outcome: &'static str) {
        self.outcome = outcome;
    }
}

impl Drop for Rebuild {
    fn drop(&mut self) {
        gauge!(REBUILDS).decrement(1.0);
        histogram!(REBUILD_SECONDS, "outcome" => self.outcome)
            .record(self.started.elapsed().as_secs_f64());
    }
}

/// A daemon's metrics exist from its start (at 0), before its first rebuild.
pub(crate) fn daemon_started() {
    gauge!(REBUILDS).set(0.0);
    counter!(REBUILD_BYTES).increment(0);
    counter!(REBUILD_ENTRIES).increment(0);
}

pub(crate) fn restored(bytes: u64) {
    counter!(REBUILD_BYTES).increment(bytes);
}

pub(crate) fn applied(entries: u64) {
    counter!(REBUILD_ENTRIES).increment(entries);
}

pub(crate) fn snapshot_age(job: &JobId, ms: u64) {
    gauge!(SNAPSHOT_AGE, "job" => job.to_string()).set(ms as f64 / 1000.0);
}

/// After a groom round: the oldest latest snapshot (if any job has one) and how many
/// jobs have none.
pub(crate) fn snapshots(oldest_ms: Option<u64>, missing: u64) {
    if let Some(ms) = oldest_ms {
        gauge!(SNAPSHOT_AGE_MAX).set(ms as f64 / 1000.0);
    }
    gauge!(SNAPSHOT_MISSING).set(missing as f64);
}

pub(crate) fn oplog_window(job: &JobId, ms: u64) {
    gauge!(OPLOG_WINDOW, "job" => job.to_string()).set(ms as f64 / 1000.0);
}

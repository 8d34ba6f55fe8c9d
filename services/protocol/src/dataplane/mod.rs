//! The data plane's wire contract: the names of its stores on JetStream, the records kept
//! in them, the oplog and snapshot formats, and the progress a rebuild publishes. The
//! agent, the daemons, restores, the monitor, the CLI and the permissions all read these
//! names from here, so a store is named in one place.
//!
//! | store | kind | key or subject | record |
//! |-------|------|----------------|--------|
//! | [`OPLOG_STREAM`] | stream | `handoff.oplog.<job>` | [`oplog`] JSON lines |
//! | [`SNAPSHOT_BUCKET`] | object store | `<job>/<snapshot id>` | JSON lines, [`SnapshotMeta`] in the metadata |
//! | [`CONFIG_BUCKET`] | key-value | `config`, `schedule/<job>` | [`Settings`], [`schedule::Schedule`] |
//! | [`HEADS_BUCKET`] | key-value | (unused: head records live beside the fences) | — |
//! | [`LEASES_BUCKET`] | key-value | restore id | [`Lease`] |
//! | [`HEARTBEATS_BUCKET`] | key-value | daemon key | [`Heartbeat`] |
//! | [`FENCES_BUCKET`] | key-value | job; `head.<job>` | the job's highest epoch (`{"epoch": N}`); [`HeadRecord`], written under the fence |
//! | — | core NATS | `handoff.progress.<move>` | [`Progress`] |

pub mod checksum;
pub mod oplog;
pub mod retention;
pub mod schedule;
pub mod schemas;

use handoff_domain::model::MovePhase;
use handoff_domain::{DaemonId, JobId};
use serde::{Deserialize, Serialize};

use checksum::Checksum;
use oplog::Ts;
use retention::Retention;
use schedule::Schedule;

/// The oplog store.
pub const OPLOG_STREAM: &str = "HANDOFF_OPLOG";
/// The snapshot store.
pub const SNAPSHOT_BUCKET: &str = "handoff_snapshots";
/// Each snapshot's metadata, keyed by its job's parts and its id
/// ([`snapshot_key`]): a job's snapshots are listed by reading its keys only.
pub const SNAPSHOT_INDEX_BUCKET: &str = "handoff_snapshot_index";
/// The key, in [`CONFIG_BUCKET`], saying every snapshot stored before the index existed
/// was indexed (the agent does it once).
pub const SNAPSHOT_INDEX_BUILT: &str = "snapshot-index";
/// Data plane settings: `config`, `schedule/<job>` and [`SNAPSHOT_INDEX_BUILT`].
pub const CONFIG_BUCKET: &str = "handoff_dataplane";
/// Where each job's head stands, by job.
pub const HEADS_BUCKET: &str = "handoff_heads";
/// Restores in progress, each holding the oplog it reads.
pub const LEASES_BUCKET: &str = "handoff_leases";
/// Daemon heartbeats, by daemon key (`subjects::daemon_key`).
pub const HEARTBEATS_BUCKET: &str = "handoff_heartbeats";
/// Each job's fence: the highest epoch any owner has held. It only rises.
pub const FENCES_BUCKET: &str = "handoff_fences";
/// Largest oplog message; a slice larger than this is sent as several.
pub const MAX_MESSAGE_BYTES: usize = 512 * 1024;
/// The snapshot metadata key in an object's metadata.
pub const SNAPSHOT_META_KEY: &str = "handoff-snapshot";

/// The JetStream stream behind a key-value bucket.
pub fn kv_stream(bucket: &str) -> String {
    format!("KV_{bucket}")
}

/// The JetStream stream behind an object store.
pub fn object_stream(bucket: &str) -> String {
    format!("OBJ_{bucket}")
}

/// A snapshot's key in [`SNAPSHOT_INDEX_BUCKET`]: `<project>.<deployment>[.<shard>].<id>`.
pub fn snapshot_key(job: &handoff_domain::JobId, id: &str) -> String {
    format!("{}.{id}", job.as_str().replace('/', "."))
}

/// The keys of the snapshots of `scope`, a job, a sharded cluster (`project/cluster`:
/// its shards' and config servers' jobs) or a project: `exact` for the job's own only.
/// None when `scope` is not one (a part outside `[A-Za-z0-9_-]`, empty, or over three).
pub fn snapshot_keys(scope: &str, exact: bool) -> Option<String> {
    let parts: Vec<&str> = scope.split('/').collect();
    let token = |p: &&str| {
        !p.is_empty()
            && p.len() <= 64
            && p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    };
    if parts.len() > 3 || !parts.iter().all(token) {
        return None;
    }
    Some(format!(
        "{}.{}",
        parts.join("."),
        if exact { "*" } else { ">" }
    ))
}

/// Every key-value bucket of the data plane.
pub const BUCKETS: [&str; 6] = [
    SNAPSHOT_INDEX_BUCKET,
    CONFIG_BUCKET,
    HEADS_BUCKET,
    LEASES_BUCKET,
    HEARTBEATS_BUCKET,
    FENCES_BUCKET,
];

/// The streams of every data plane store (the oplog, the object store's, the buckets').
pub fn streams() -> Vec<String> {
    let mut out = vec![OPLOG_STREAM.to_owned(), object_stream(SNAPSHOT_BUCKET)];
    out.extend(BUCKETS.iter().map(|b| kv_stream(b)));
    out
}

/// The data plane's settings, shared by the agent, the daemons and restores.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// The default snapshot schedule (a job may have its own).
    pub schedule: Schedule,
    /// Oplog retention.
    pub retention: Retention,
}

impl Settings {
    pub fn validate(&self) -> Result<(), String> {
        self.schedule.validate()?;
        self.retention.validate()
    }

    pub fn hour_ms(&self) -> u64 {
        self.schedule.hour_ms
    }
}

/// What the snapshot store records with each snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct SnapshotMeta {
    /// A ULID; the object is `<job>/<id>`.
    pub id: String,
    pub job: JobId,
    /// The epoch of the job's owner that cut it (the agent's initial sync uses the job's
    /// first epoch).
    pub epoch: u64,
    /// The oplog timestamp and entry number the data is at.
    pub ts: Ts,
    pub n: u64,
    /// The oplog message holding entry `n` (0: before any oplog); replay starts there.
    pub oplog_seq: u64,
    pub checksum: Checksum,
    pub size_bytes: u64,
    pub taken_at_ms: u64,
    /// The scheduled slot it was taken for (none for the initial sync).
    pub slot_ms: Option<u64>,
    /// Who cut it: a daemon, or none for the agent's initial sync.
    pub daemon: Option<DaemonId>,
}

impl SnapshotMeta {
    pub fn object_name(&self) -> String {
        format!("{}/{}", self.job, self.id)
    }
}

/// Where a job's head stands, as its daemon last said.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct HeadRecord {
    pub daemon: DaemonId,
    pub epoch: u64,
    /// Every oplog message up to this stream sequence is applied.
    pub applied_seq: u64,
    pub n: u64,
    pub ts: Ts,
    pub checksum: Checksum,
    pub at_ms: u64,
}

/// A restore reading a job's oplog from `from_seq`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Lease {
    pub job: JobId,
    pub from_seq: u64,
    pub at_ms: u64,
}

/// A daemon's heartbeat.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Heartbeat {
    pub daemon: DaemonId,
    pub at_ms: u64,
    pub started_at_ms: u64,
    pub pid: u32,
    pub jobs: usize,
    pub rebuilding: usize,
}

/// Progress of one job's rebuild, published on `handoff.progress.<move>`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Progress {
    pub move_id: String,
    pub job: JobId,
    pub daemon: DaemonId,
    /// The daemon's epoch for the job: a report with an older epoch than the job's is
    /// from a daemon that lost it, and is ignored.
    #[serde(default)]
    pub epoch: u64,
    pub phase: MovePhase,
    pub snapshot_bytes: u64,
    pub snapshot_total: u64,
    pub entries_applied: u64,
    /// How far the head is behind the newest stored oplog, in milliseconds.
    pub lag_ms: u64,
    /// Set on the last report: how the rebuild ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub done: Option<Done>,
}

/// How a rebuild ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case", tag = "outcome")]
pub enum Done {
    /// The head is rebuilt and checked: it stands at `ts` with the source's checksum.
    Completed { ts: Ts, checksum: Checksum },
    /// The rebuild failed; the move fails with this reason.
    Failed { reason: String },
}

impl std::fmt::Display for Done {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Done::Completed { ts, checksum } => write!(f, "head at {ts} checksum {checksum}"),
            Done::Failed { reason } => write!(f, "failed: {reason}"),
        }
    }
}

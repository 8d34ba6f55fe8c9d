//! The JSON Schema of the data plane's wire formats, kept in `schemas/dataplane/` and
//! checked against the code by a test (`UPDATE_SCHEMAS=1` rewrites them).

use schemars::{schema_for, JsonSchema, Schema};
use serde::Serialize;

use super::checksum::Checksum;
use super::oplog::{Op, Ts};
use super::{HeadRecord, Heartbeat, Lease, Progress, Settings, SnapshotMeta};

/// One line of an oplog message (`handoff.oplog.<job>`): JSON lines, one entry each.
#[derive(Serialize, JsonSchema)]
#[allow(dead_code)]
struct OplogEntry {
    ts: Ts,
    /// The entry's number in the job's oplog: 1, 2, 3, ... with no gap.
    n: u64,
    op: Op,
    /// The document's id.
    id: String,
    /// The whole document after the operation (absent for a delete).
    doc: Option<serde_json::Map<String, serde_json::Value>>,
    /// The source's checksum right after this entry.
    c: Checksum,
}

/// One line of a snapshot object: JSON lines, one document each, in id order.
#[derive(Serialize, JsonSchema)]
#[allow(dead_code)]
struct SnapshotLine {
    id: String,
    doc: serde_json::Map<String, serde_json::Value>,
}

/// Every data plane schema, by its path under `schemas/`.
pub fn all() -> Vec<(String, Schema)> {
    vec![
        ("dataplane/oplog-entry.json".into(), schema_for!(OplogEntry)),
        (
            "dataplane/snapshot-line.json".into(),
            schema_for!(SnapshotLine),
        ),
        (
            "dataplane/snapshot-meta.json".into(),
            schema_for!(SnapshotMeta),
        ),
        ("dataplane/head.json".into(), schema_for!(HeadRecord)),
        ("dataplane/lease.json".into(), schema_for!(Lease)),
        ("dataplane/heartbeat.json".into(), schema_for!(Heartbeat)),
        ("dataplane/settings.json".into(), schema_for!(Settings)),
        (
            "dataplane/schedule.json".into(),
            schema_for!(super::schedule::Schedule),
        ),
        ("dataplane/progress.json".into(), schema_for!(Progress)),
    ]
}

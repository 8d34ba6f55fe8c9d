//! The JSON Schema (draft 2020-12) of everything on the wire, generated from the Rust
//! types. `schemas/` holds them as files for clients in other languages; a test fails
//! when the files and the types disagree (`UPDATE_SCHEMAS=1 cargo test -p
//! handoff-protocol` rewrites them).

use schemars::{schema_for, Schema};

use crate::api::query::*;
use crate::api::{request_schemas, Reply};
use crate::envelope::EventEnvelope;
use crate::views::*;

/// Every schema, by its path under `schemas/`.
pub fn all() -> Vec<(String, Schema)> {
    let mut out: Vec<(String, Schema)> = vec![
        ("event.json".into(), schema_for!(EventEnvelope)),
        ("reply.json".into(), schema_for!(Reply)),
    ];
    for (endpoint, schema) in request_schemas() {
        out.push((format!("commands/{endpoint}.json"), schema));
    }
    let queries: Vec<(&str, Schema, Schema)> = vec![
        (
            "status",
            schema_for!(Empty),
            schema_for!(QueryReply<Status>),
        ),
        (
            "daemons",
            schema_for!(Daemons),
            schema_for!(QueryReply<Page<DaemonView>>),
        ),
        (
            "daemon",
            schema_for!(ByDaemon),
            schema_for!(QueryReply<DaemonView>),
        ),
        (
            "assignments",
            schema_for!(Assignments),
            schema_for!(QueryReply<Page<AssignmentView>>),
        ),
        (
            "projects",
            schema_for!(Projects),
            schema_for!(QueryReply<Page<ProjectView>>),
        ),
        (
            "jobs",
            schema_for!(Jobs),
            schema_for!(QueryReply<Page<JobView>>),
        ),
        ("job", schema_for!(ByJob), schema_for!(QueryReply<JobView>)),
        (
            "moves",
            schema_for!(Moves),
            schema_for!(QueryReply<Page<MoveSummary>>),
        ),
        (
            "move",
            schema_for!(ByMove),
            schema_for!(QueryReply<MoveView>),
        ),
        (
            "history",
            schema_for!(History),
            schema_for!(QueryReply<Page<HistoryEntry>>),
        ),
        (
            "alerts",
            schema_for!(Alerts),
            schema_for!(QueryReply<Page<AlertView>>),
        ),
    ];
    for (name, request, reply) in queries {
        out.push((format!("queries/{name}.request.json"), request));
        out.push((format!("queries/{name}.reply.json"), reply));
    }
    out
}

//! The nats-server side of security: which process may publish and subscribe where.
//!
//! Every process connects with an nkey of its own; the generated `authorization` block
//! gives each the permissions of its role:
//!
//! | role | may |
//! |------|-----|
//! | command service | everything: it alone appends to the event stream |
//! | projector | read the event stream, answer `handoff.query.*` |
//! | operator (the CLI) | call `handoff.cmd.*` and `handoff.query.*`, read the event stream and the data plane stores, take restore leases, set the schedule |
//! | agent | `handoff.cmd.resize-oplog-ttl`, write the oplog and snapshot stores, read the event stream |
//! | monitor | read the event stream and the heartbeats, hear progress, send its reports (`report-daemon-liveness`, `report-head-space`, `report-move-stuck`, `report-failover-guard`, `failover-job`) |
//! | daemon | read only its own subject of the event stream (its assignments) and the jobs' subjects (whether a job it rebuilt is its own), send its own reports (`register-daemon`, `report-job-move-phase`, `complete-job-move`, `fail-job-move`), publish progress, heartbeats and heads, read and write snapshots |
//!
//! No role but the command service may publish on `handoff.evt.>` or change, purge or
//! delete the event stream. Which *user* may send which command is decided again by the
//! command service from the signed request (see [`crate::auth`] and
//! `handoff_domain::auth`): these permissions are the outer wall, not the only one.

use handoff_domain::DaemonId;

use crate::dataplane::{
    self as dp, CONFIG_BUCKET, FENCES_BUCKET, HEADS_BUCKET, HEARTBEATS_BUCKET, LEASES_BUCKET,
    SNAPSHOT_BUCKET,
};
use crate::subjects;

/// Publishing to a key-value bucket's keys.
fn kv(bucket: &str) -> String {
    format!("$KV.{bucket}.>")
}

/// Using an object store's chunks and metadata.
fn object_store(bucket: &str) -> String {
    format!("$O.{bucket}.>")
}

/// A process role, and so a set of permissions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProcessRole {
    CommandService,
    Projector,
    Operator,
    Agent,
    Monitor,
    Daemon(DaemonId),
}

impl ProcessRole {
    /// A short name, for files and comments.
    pub fn name(&self) -> String {
        match self {
            ProcessRole::CommandService => "command-service".into(),
            ProcessRole::Projector => "projector".into(),
            ProcessRole::Operator => "operator".into(),
            ProcessRole::Agent => "agent".into(),
            ProcessRole::Monitor => "monitor".into(),
            ProcessRole::Daemon(d) => format!("daemon-{}", subjects::daemon_token(d)),
        }
    }
}

/// One NATS user: the public nkey a process connects with, and its role.
#[derive(Clone, Debug)]
pub struct NatsUser {
    pub nkey: String,
    pub role: ProcessRole,
}

/// Publishing these would write to or destroy the event stream.
fn event_log_writes() -> Vec<String> {
    let s = subjects::STREAM;
    let mut deny = vec![subjects::ALL_EVENTS.to_owned()];
    for op in ["CREATE", "UPDATE", "DELETE", "PURGE", "RESTORE"] {
        deny.push(format!("$JS.API.STREAM.{op}.{s}"));
    }
    deny.push(format!("$JS.API.STREAM.MSG.DELETE.{s}"));
    deny
}

/// Reading the whole event stream: its info, ordered consumers, direct gets.
fn event_log_reads() -> Vec<String> {
    let s = subjects::STREAM;
    vec![
        format!("$JS.API.STREAM.INFO.{s}"),
        format!("$JS.API.CONSUMER.CREATE.{s}"),
        format!("$JS.API.CONSUMER.CREATE.{s}.>"),
        format!("$JS.API.CONSUMER.DURABLE.CREATE.{s}.>"),
        format!("$JS.API.CONSUMER.*.{s}.>"),
        format!("$JS.API.CONSUMER.MSG.NEXT.{s}.>"),
        format!("$JS.API.DIRECT.GET.{s}"),
        format!("$JS.API.DIRECT.GET.{s}.>"),
        format!("$JS.API.STREAM.MSG.GET.{s}"),
        format!("$JS.ACK.{s}.>"),
    ]
}

/// Using the data plane's streams, buckets and object store.
fn data_plane() -> Vec<String> {
    let mut allow = Vec::new();
    for s in dp::streams() {
        allow.push(format!("$JS.API.*.*.{s}"));
        allow.push(format!("$JS.API.*.*.{s}.>"));
        allow.push(format!("$JS.API.CONSUMER.MSG.NEXT.{s}.*"));
        allow.push(format!("$JS.ACK.{s}.>"));
        allow.push(format!("$JS.FC.{s}.>"));
    }
    allow
}

fn list(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|i| format!("\"{i}\"")).collect();
    format!("[{}]", quoted.join(", "))
}

/// The permissions block of a role.
fn permissions(role: &ProcessRole) -> String {
    let js_info = "$JS.API.INFO".to_owned();
    let (publish, deny, subscribe): (Vec<String>, Vec<String>, Vec<String>) = match role {
        ProcessRole::CommandService => {
            return "{ publish: \">\", subscribe: \">\" }".to_owned();
        }
        ProcessRole::Projector => (
            [vec![js_info, "$SRV.>".into()], event_log_reads()].concat(),
            event_log_writes(),
            vec![
                format!("{}.>", subjects::QUERIES),
                "$SRV.>".into(),
                "_INBOX.>".into(),
            ],
        ),
        ProcessRole::Operator => (
            [
                vec![
                    js_info,
                    format!("{}.>", subjects::COMMANDS),
                    format!("{}.>", subjects::QUERIES),
                    "$SRV.>".into(),
                    kv(LEASES_BUCKET),
                    kv(CONFIG_BUCKET),
                ],
                event_log_reads(),
                data_plane(),
            ]
            .concat(),
            event_log_writes(),
            vec!["_INBOX.>".into(), subjects::PROGRESS.into()],
        ),
        ProcessRole::Agent => (
            [
                vec![
                    js_info,
                    subjects::command("resize-oplog-ttl"),
                    subjects::OPLOG.into(),
                    "$KV.>".into(),
                    object_store(SNAPSHOT_BUCKET),
                ],
                event_log_reads(),
                data_plane(),
            ]
            .concat(),
            event_log_writes(),
            vec!["_INBOX.>".into()],
        ),
        ProcessRole::Monitor => (
            [
                vec![
                    js_info,
                    subjects::command("report-daemon-liveness"),
                    subjects::command("report-head-space"),
                    subjects::command("report-move-stuck"),
                    subjects::command("report-failover-guard"),
                    subjects::command("failover-job"),
                ],
                event_log_reads(),
                data_plane(),
            ]
            .concat(),
            [event_log_writes(), vec!["$KV.>".into(), "$O.>".into()]].concat(),
            vec!["_INBOX.>".into(), subjects::PROGRESS.into()],
        ),
        ProcessRole::Daemon(d) => {
            let s = subjects::STREAM;
            let own = subjects::daemon(d);
            (
                [
                    vec![
                        js_info,
                        subjects::command("register-daemon"),
                        subjects::command("report-job-move-phase"),
                        subjects::command("complete-job-move"),
                        subjects::command("fail-job-move"),
                        subjects::PROGRESS.into(),
                        kv(HEARTBEATS_BUCKET),
                        kv(HEADS_BUCKET),
                        kv(FENCES_BUCKET),
                        object_store(SNAPSHOT_BUCKET),
                        format!("$JS.API.STREAM.INFO.{s}"),
                        format!("$JS.API.CONSUMER.CREATE.{s}.*.{own}"),
                        format!("$JS.API.CONSUMER.CREATE.{s}.*.{}.job.>", subjects::EVENTS),
                        format!("$JS.API.DIRECT.GET.{s}.{}.job.>", subjects::EVENTS),
                        format!("$JS.API.CONSUMER.MSG.NEXT.{s}.*"),
                        format!("$JS.API.CONSUMER.DELETE.{s}.*"),
                        format!("$JS.API.CONSUMER.INFO.{s}.*"),
                        format!("$JS.API.DIRECT.GET.{s}.{own}"),
                    ],
                    data_plane(),
                ]
                .concat(),
                event_log_writes(),
                vec!["_INBOX.>".into()],
            )
        }
    };
    let responses = matches!(role, ProcessRole::Projector).then_some(", allow_responses: true");
    format!(
        "{{\n      publish: {{ allow: {}, deny: {} }},\n      subscribe: {{ allow: {} }}{}\n    }}",
        list(&publish),
        list(&deny),
        list(&subscribe),
        responses.unwrap_or("")
    )
}

/// The `authorization` block of a nats-server configuration for these users. With it, a
/// connection without one of the nkeys is refused.
pub fn authorization(users: &[NatsUser]) -> String {
    let mut out = String::from("authorization {\n  users = [\n");
    for u in users {
        out.push_str(&format!(
            "    # {}\n    {{ nkey: \"{}\", permissions: {} }}\n",
            u.role.name(),
            u.nkey,
            permissions(&u.role)
        ));
    }
    out.push_str("  ]\n}\n");
    out
}

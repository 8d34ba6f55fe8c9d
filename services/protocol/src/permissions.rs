//! The nats-server side of security: which process may publish and subscribe where.
//!
//! Every process connects with an nkey of its own; the generated `authorization` block
//! gives each role the subjects its code uses and nothing more. On JetStream a permission
//! is a subject: each API call names its stream (and for some its consumer, filter or
//! key) in the request subject, and only that subject is checked, never the request's
//! body. So a grant is as narrow as the subject allows:
//!
//! - **stream calls** `$JS.API.STREAM.<op>.<stream>`: create, update, info, purge, delete,
//!   message get and delete, each granted per stream.
//! - **direct gets** `$JS.API.DIRECT.GET.<stream>.<subject>` read the last message of a
//!   subject (a key-value get is `$JS.API.DIRECT.GET.KV_<bucket>.$KV.<bucket>.<key>`), so
//!   they are granted per subject; `$JS.API.DIRECT.GET.<stream>` names its subject in the
//!   body and reads anything.
//! - **consumers** `$JS.API.CONSUMER.CREATE.<stream>.<name>.<filter>` name their filter,
//!   so a reader's filters are checked; `$JS.API.CONSUMER.CREATE.<stream>` (the ordered
//!   consumers of async-nats without a name, key-value watches, object reads) carries its
//!   filter in the body and reads the whole stream. Pulls
//!   (`$JS.API.CONSUMER.MSG.NEXT.<stream>.<name>`), infos and deletes name the consumer
//!   only.
//! - **writes** are plain publishes: `handoff.evt.>` (the event stream), `handoff.oplog.>`,
//!   `$KV.<bucket>.<key>`, `$O.<bucket>.C.>` (object chunks) and `$O.<bucket>.M.>` (object
//!   metadata). Push consumers (key-value watches, object reads) need their flow-control
//!   replies, `$JS.FC.<stream>.>`.
//!
//! | role | JetStream | core NATS |
//! |------|-----------|-----------|
//! | command service | owns the event stream: creates and updates it (never purges or deletes it), appends (`handoff.evt.>`), reads it every way; creates the fence bucket, reads and raises fences; creates, reads and writes the command archive and the model's snapshots (purging a replaced snapshot's chunks) | serves `handoff.cmd.*` and `$SRV` |
//! | projector | its durable consumer on the event stream (any name: `--name`), stream info, message get | serves `handoff.query.*` and `$SRV` |
//! | operator (the CLI) | reads the event stream every way; binds every data plane store; reads the oplog and snapshots (restores), the settings and the heartbeats; writes the settings and schedules (`handoff_dataplane`) and restore leases | calls `handoff.cmd.*`, `handoff.query.*`, hears `handoff.progress.>` |
//! | agent | reads the job events only; creates the data plane's stores but the fences; writes the oplog, snapshots and the `config` key; purges the oplog (retention) and the snapshot store (an object delete purges its chunks); reads the fences and the head records beside them (`head.<job>`), leases, settings | `handoff.cmd.resize-oplog-ttl` |
//! | monitor | reads the whole event stream; watches the heartbeat bucket | its reports (`report-daemon-liveness`, `report-head-space`, `report-move-stuck`, `report-failover-guard`, `failover-job`), hears `handoff.progress.>` |
//! | daemon | reads its own subject of the event stream and the jobs' subjects; binds the data plane stores; reads the oplog and snapshots; writes snapshots, fences and the head records beside them, and its own heartbeat key | its reports (`register-daemon`, `report-job-move-phase`, `complete-job-move`, `fail-job-move`), publishes `handoff.progress.>` |
//!
//! Nobody may delete a stream or a stored message, update a store other than the event
//! stream, or purge anything but the agent's three (every such call is denied as well as
//! left out, so a broader grant added later cannot reach it). Who creates what: the
//! command service the event stream and the fences, the agent every other store; every
//! other process binds to the existing ones, so it must start after them (`handoff up`
//! does so).
//!
//! What a subject cannot say, and so these permissions do not restrict:
//! - A purge's filter and sequence are in its body: the agent may purge its three stores
//!   whole, not only a job's expired oplog.
//! - A pull names a consumer by one token, and the event log names its readers by ULID
//!   (async-nats renames a recreated one `<name>_<n>`): every reader of the event stream
//!   may pull from any of its consumers, the projector's durable included. Deleting
//!   consumers of the event stream is left to the command service and the projector (an
//!   ordered reader's recreation tries to delete its old consumer and goes on without).
//! - Object names are base64 in `$O.<bucket>.M.<name>`, and the fences and head records
//!   are keyed by job: a daemon may write any job's snapshot metadata, fence and head
//!   record (the stores' fencing is the code's compare-and-set, not the server's).
//! - Replies come to `_INBOX.>`, which every role subscribes to.
//!
//! Which *user* may send which command is decided again by the command service from the
//! signed request (see [`crate::auth`] and `handoff_domain::auth`): these permissions are
//! the outer wall, not the only one.

use handoff_domain::DaemonId;

use crate::dataplane::{
    self as dp, CONFIG_BUCKET, FENCES_BUCKET, HEADS_BUCKET, HEARTBEATS_BUCKET, LEASES_BUCKET,
    OPLOG_STREAM, SNAPSHOT_BUCKET, SNAPSHOT_INDEX_BUCKET,
};
use crate::subjects;

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

/// A stream call: `$JS.API.STREAM.<op>.<stream>`.
fn stream_call(op: &str, stream: &str) -> String {
    format!("$JS.API.STREAM.{op}.{stream}")
}

/// The calls that change or destroy a stream's settings or data.
const DESTRUCTIVE: [&str; 4] = ["UPDATE", "DELETE", "PURGE", "MSG.DELETE"];

/// The data plane's stores in use: every one but the heads' bucket, whose records now
/// live beside the fences (`head.<job>` in the fence bucket).
fn data_plane_stores() -> Vec<String> {
    let heads = dp::kv_stream(HEADS_BUCKET);
    dp::streams().into_iter().filter(|s| *s != heads).collect()
}

/// The command service's own stores beside the event stream: the command archive and
/// the model's snapshots.
fn command_stores() -> [String; 2] {
    [
        dp::kv_stream(subjects::COMMAND_ARCHIVE_BUCKET),
        dp::object_stream(subjects::MODEL_BUCKET),
    ]
}

/// Every stream handoff keeps or kept.
fn all_streams() -> Vec<String> {
    let mut out = vec![subjects::STREAM.to_owned()];
    out.extend(command_stores());
    out.extend(dp::streams());
    out
}

/// A grant under construction.
#[derive(Default)]
struct Grant {
    publish: Vec<String>,
    subscribe: Vec<String>,
    allow_responses: bool,
}

impl Grant {
    fn publish(&mut self, subject: impl Into<String>) -> &mut Self {
        self.publish.push(subject.into());
        self
    }

    fn subscribe(&mut self, subject: impl Into<String>) -> &mut Self {
        self.subscribe.push(subject.into());
        self
    }

    fn stream(&mut self, op: &str, stream: &str) -> &mut Self {
        self.publish(stream_call(op, stream))
    }

    /// Binding to an existing store (`get_stream`, `get_key_value`, `get_object_store`).
    fn binds(&mut self, stream: &str) -> &mut Self {
        self.stream("INFO", stream)
    }

    /// Binding to a store, creating it when it is missing.
    fn creates(&mut self, stream: &str) -> &mut Self {
        self.binds(stream).stream("CREATE", stream)
    }

    /// The last message of the subjects matching `filter`, by direct get.
    fn last_of(&mut self, stream: &str, filter: &str) -> &mut Self {
        self.publish(format!("$JS.API.DIRECT.GET.{stream}.{filter}"))
    }

    /// Direct gets whose subject is in the body: by sequence, the first of a subject.
    fn gets_anything(&mut self, stream: &str) -> &mut Self {
        self.publish(format!("$JS.API.DIRECT.GET.{stream}"))
    }

    /// Infos of consumers of `stream`.
    fn consumer_infos(&mut self, stream: &str) -> &mut Self {
        self.publish(format!("$JS.API.CONSUMER.INFO.{stream}.*"))
    }

    /// Pulling from consumers of `stream`, and their infos (a pull consumer asks for its
    /// info after a reconnect).
    fn pulls(&mut self, stream: &str) -> &mut Self {
        self.publish(format!("$JS.API.CONSUMER.MSG.NEXT.{stream}.*"))
            .consumer_infos(stream)
    }

    /// Ordered readers of `stream` with any filter: an unnamed consumer (its filter in
    /// the body), its recreation under a name (with or without a filter), pulls.
    fn reads_all(&mut self, stream: &str) -> &mut Self {
        self.publish(format!("$JS.API.CONSUMER.CREATE.{stream}"))
            .publish(format!("$JS.API.CONSUMER.CREATE.{stream}.*"))
            .publish(format!("$JS.API.CONSUMER.CREATE.{stream}.*.>"))
            .pulls(stream)
    }

    /// Named ordered readers of `stream` filtered on `filter` only, and pulls.
    fn reads_only(&mut self, stream: &str, filter: &str) -> &mut Self {
        self.publish(format!("$JS.API.CONSUMER.CREATE.{stream}.*.{filter}"))
            .pulls(stream)
    }

    /// Deleting consumers of `stream`: an ordered reader deletes its old consumer when it
    /// recreates it.
    fn deletes_consumers(&mut self, stream: &str) -> &mut Self {
        self.publish(format!("$JS.API.CONSUMER.DELETE.{stream}.*"))
    }

    /// Push consumers of `stream` (key-value watches and key lists, object lists and
    /// reads): unnamed ones, their named recreation, deletes, and flow control.
    fn watches(&mut self, stream: &str) -> &mut Self {
        self.publish(format!("$JS.API.CONSUMER.CREATE.{stream}"))
            .publish(format!("$JS.API.CONSUMER.CREATE.{stream}.*.>"))
            .deletes_consumers(stream)
            .publish(format!("$JS.FC.{stream}.>"))
    }

    /// Getting keys of a key-value bucket (`key`: one key, or `>` for all).
    fn kv_get(&mut self, bucket: &str, key: &str) -> &mut Self {
        self.last_of(&dp::kv_stream(bucket), &format!("$KV.{bucket}.{key}"))
    }

    /// Putting, creating, updating and purging keys of a key-value bucket (all publishes).
    fn kv_put(&mut self, bucket: &str, key: &str) -> &mut Self {
        self.publish(format!("$KV.{bucket}.{key}"))
    }

    /// Reading the snapshot store: object infos by name, lists and reads; a job's
    /// snapshots listed from the index (an ordered reader of its keys).
    fn reads_snapshots(&mut self) -> &mut Self {
        let stream = dp::object_stream(SNAPSHOT_BUCKET);
        let index = dp::kv_stream(SNAPSHOT_INDEX_BUCKET);
        self.last_of(&stream, &format!("$O.{SNAPSHOT_BUCKET}.M.>"))
            .watches(&stream)
            .reads_only(&index, &format!("$KV.{SNAPSHOT_INDEX_BUCKET}.>"))
            .deletes_consumers(&index)
    }

    /// Putting objects into the snapshot store: chunks, then the metadata; then the
    /// index entry (a delete of either is a put of a marker), read back when its put's
    /// answer was lost.
    fn writes_snapshots(&mut self) -> &mut Self {
        let index = dp::kv_stream(SNAPSHOT_INDEX_BUCKET);
        self.publish(format!("$O.{SNAPSHOT_BUCKET}.C.>"))
            .publish(format!("$O.{SNAPSHOT_BUCKET}.M.>"))
            .kv_put(SNAPSHOT_INDEX_BUCKET, ">")
            .last_of(&index, &format!("$KV.{SNAPSHOT_INDEX_BUCKET}.>"))
    }

    /// Reading the oplog store: ordered readers of a job's subject, its last message.
    fn reads_oplog(&mut self) -> &mut Self {
        self.reads_all(OPLOG_STREAM)
            .deletes_consumers(OPLOG_STREAM)
            .last_of(OPLOG_STREAM, subjects::OPLOG)
    }

    /// Binding to every data plane store in use (`Stores::open` on existing stores).
    fn binds_data_plane(&mut self) -> &mut Self {
        for s in data_plane_stores() {
            self.binds(&s);
        }
        self
    }

    /// Replies to the requests it serves (a micro service).
    fn serves(&mut self, endpoints: &str) -> &mut Self {
        self.allow_responses = true;
        self.publish("$SRV.>")
            .subscribe(format!("{endpoints}.>"))
            .subscribe("$SRV.>")
    }
}

/// What one role gets, as the server checks it.
struct Permissions {
    publish: Vec<String>,
    deny: Vec<String>,
    subscribe: Vec<String>,
    allow_responses: bool,
}

/// The grant of a role.
fn grant(role: &ProcessRole) -> Grant {
    let events = subjects::STREAM;
    let fences = dp::kv_stream(FENCES_BUCKET);
    let mut g = Grant::default();
    g.subscribe("_INBOX.>");
    match role {
        ProcessRole::CommandService => {
            g.serves(subjects::COMMANDS)
                // The account info: creating a bucket asks for it, and so does the
                // readiness check of a server started with this configuration.
                .publish("$JS.API.INFO")
                .creates(events)
                .stream("UPDATE", events)
                .stream("MSG.GET", events)
                .gets_anything(events)
                .last_of(events, ">")
                .reads_all(events)
                .deletes_consumers(events)
                .publish(subjects::ALL_EVENTS)
                .creates(&fences)
                .kv_get(FENCES_BUCKET, ">")
                .kv_put(FENCES_BUCKET, ">");
            // The answers of old command ids, and the model's snapshots: saving one
            // replaces the last (its old chunks purged), loading reads it back.
            let [archive, model] = command_stores();
            let bucket = subjects::MODEL_BUCKET;
            // The archive is read through its stream's leader (a replica's direct get
            // may lag): MSG.GET, never DIRECT.GET.
            g.creates(&archive)
                .stream("MSG.GET", &archive)
                .kv_put(subjects::COMMAND_ARCHIVE_BUCKET, ">")
                .creates(&model)
                .publish(format!("$O.{bucket}.C.>"))
                .publish(format!("$O.{bucket}.M.>"))
                .last_of(&model, &format!("$O.{bucket}.M.>"))
                .watches(&model)
                .stream("PURGE", &model);
        }
        ProcessRole::Projector => {
            // Its durable consumer is `handoff-projector-<name>`, named without a filter;
            // it deletes it and creates it again from its checkpoint.
            g.serves(subjects::QUERIES)
                .binds(events)
                .stream("MSG.GET", events)
                .publish(format!("$JS.API.CONSUMER.CREATE.{events}.*"))
                .pulls(events)
                .deletes_consumers(events);
        }
        ProcessRole::Operator => {
            g.publish(format!("{}.>", subjects::COMMANDS))
                .publish(format!("{}.>", subjects::QUERIES))
                .subscribe(subjects::PROGRESS)
                .binds(events)
                .last_of(events, ">")
                .reads_all(events)
                .binds_data_plane()
                .reads_oplog()
                .reads_snapshots()
                .kv_get(CONFIG_BUCKET, ">")
                .kv_put(CONFIG_BUCKET, ">")
                .kv_put(LEASES_BUCKET, ">")
                .kv_get(HEARTBEATS_BUCKET, ">");
        }
        ProcessRole::Agent => {
            g.publish(subjects::command("resize-oplog-ttl"))
                .publish("$JS.API.INFO")
                .binds(events)
                .last_of(events, subjects::JOB_EVENTS)
                .reads_only(events, subjects::JOB_EVENTS)
                .binds(&fences);
            for s in data_plane_stores().iter().filter(|s| **s != fences) {
                g.creates(s);
            }
            g.publish(subjects::OPLOG)
                .reads_oplog()
                .gets_anything(OPLOG_STREAM)
                .stream("PURGE", OPLOG_STREAM)
                .reads_snapshots()
                .writes_snapshots()
                // An expired snapshot leaves nothing behind: its chunks, its object's
                // and its index entry's delete markers are purged.
                .stream("PURGE", &dp::object_stream(SNAPSHOT_BUCKET))
                .stream("PURGE", &dp::kv_stream(SNAPSHOT_INDEX_BUCKET))
                .kv_get(CONFIG_BUCKET, ">")
                .kv_put(CONFIG_BUCKET, "config")
                .kv_put(CONFIG_BUCKET, dp::SNAPSHOT_INDEX_BUILT)
                // Where each head stands (retention holds the oplog it still needs), and
                // the fences (a snapshot marked deleted goes only if its epoch is older).
                .kv_get(FENCES_BUCKET, ">")
                .kv_get(LEASES_BUCKET, ">")
                // Listing the leases' keys asks for its consumer's info to tell the end.
                .watches(&dp::kv_stream(LEASES_BUCKET))
                .consumer_infos(&dp::kv_stream(LEASES_BUCKET));
        }
        ProcessRole::Monitor => {
            let heartbeats = dp::kv_stream(HEARTBEATS_BUCKET);
            for c in [
                "report-daemon-liveness",
                "report-head-space",
                "report-move-stuck",
                "report-failover-guard",
                "failover-job",
            ] {
                g.publish(subjects::command(c));
            }
            g.subscribe(subjects::PROGRESS)
                .binds(events)
                .reads_all(events)
                .binds(&heartbeats)
                .watches(&heartbeats);
        }
        ProcessRole::Daemon(d) => {
            let own = subjects::daemon(d);
            for c in [
                "register-daemon",
                "report-job-move-phase",
                "complete-job-move",
                "fail-job-move",
            ] {
                g.publish(subjects::command(c));
            }
            g.publish(subjects::PROGRESS)
                .binds(events)
                .last_of(events, &own)
                .last_of(events, subjects::JOB_EVENTS)
                .reads_only(events, &own)
                .reads_only(events, subjects::JOB_EVENTS)
                .binds_data_plane()
                .reads_oplog()
                .reads_snapshots()
                .writes_snapshots()
                .kv_get(CONFIG_BUCKET, ">")
                // The fences and the head records beside them.
                .kv_get(FENCES_BUCKET, ">")
                .kv_put(FENCES_BUCKET, ">")
                .kv_put(HEARTBEATS_BUCKET, &subjects::daemon_key(d));
        }
    }
    g
}

/// The permissions of a role: its grant, and every destructive call it was not granted
/// denied outright.
fn permissions(role: &ProcessRole) -> Permissions {
    let mut g = grant(role);
    let mut seen = std::collections::HashSet::new();
    g.publish.retain(|s| seen.insert(s.clone()));
    let mut deny: Vec<String> = all_streams()
        .iter()
        .flat_map(|s| DESTRUCTIVE.iter().map(move |op| stream_call(op, s)))
        .collect();
    deny.push(subjects::ALL_EVENTS.to_owned());
    deny.retain(|d| !g.publish.contains(d));
    Permissions {
        publish: g.publish,
        deny,
        subscribe: g.subscribe,
        allow_responses: g.allow_responses,
    }
}

fn list(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|i| format!("\"{i}\"")).collect();
    format!("[{}]", quoted.join(", "))
}

/// The permissions block of a role, in nats-server's configuration syntax.
fn permissions_block(role: &ProcessRole) -> String {
    let p = permissions(role);
    format!(
        "{{\n      publish: {{ allow: {}, deny: {} }},\n      subscribe: {{ allow: {} }}{}\n    }}",
        list(&p.publish),
        list(&p.deny),
        list(&p.subscribe),
        if p.allow_responses {
            ",\n      allow_responses: true"
        } else {
            ""
        }
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
            permissions_block(&u.role)
        ));
    }
    out.push_str("  ]\n}\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roles() -> Vec<ProcessRole> {
        vec![
            ProcessRole::CommandService,
            ProcessRole::Projector,
            ProcessRole::Operator,
            ProcessRole::Agent,
            ProcessRole::Monitor,
            ProcessRole::Daemon(DaemonId::new("backup1.example.net:/data/backup/").unwrap()),
        ]
    }

    /// No grant names a whole API or every stream at once, and nothing granted is also
    /// denied (a deny would win and silently take the grant back).
    #[test]
    fn grants_name_their_streams_and_are_not_denied() {
        for role in roles() {
            let p = permissions(&role);
            for s in &p.publish {
                assert!(
                    !s.starts_with("$JS.API.*")
                        && !s.starts_with("$JS.API.STREAM.*")
                        && !s.starts_with("$JS.API.CONSUMER.*")
                        && s != ">"
                        && s != "$JS.API.>"
                        && s != "$KV.>"
                        && s != "$O.>",
                    "{} is granted {s}",
                    role.name()
                );
                assert!(!p.deny.contains(s), "{} denied its own {s}", role.name());
            }
        }
    }

    /// Only the agent purges the oplog, the snapshot store and its index, and only the command service
    /// its model's snapshots, only the command service updates (the event stream), and
    /// nobody deletes a stream or a message.
    #[test]
    fn destruction_is_the_owners_alone() {
        for role in roles() {
            let p = permissions(&role);
            let granted = |op: &str| -> Vec<&String> {
                p.publish
                    .iter()
                    .filter(|s| s.starts_with(&format!("$JS.API.STREAM.{op}.")))
                    .collect()
            };
            assert!(granted("DELETE").is_empty() && granted("MSG.DELETE").is_empty());
            let purges = granted("PURGE");
            let updates = granted("UPDATE");
            match role {
                ProcessRole::Agent => assert_eq!(
                    purges,
                    [
                        &stream_call("PURGE", OPLOG_STREAM),
                        &stream_call("PURGE", &dp::object_stream(SNAPSHOT_BUCKET)),
                        &stream_call("PURGE", &dp::kv_stream(SNAPSHOT_INDEX_BUCKET))
                    ]
                ),
                // A replaced snapshot of its model: never the event stream.
                ProcessRole::CommandService => assert_eq!(
                    purges,
                    [&stream_call(
                        "PURGE",
                        &dp::object_stream(subjects::MODEL_BUCKET)
                    )]
                ),
                _ => assert!(purges.is_empty(), "{} purges {purges:?}", role.name()),
            }
            match role {
                ProcessRole::CommandService => {
                    assert_eq!(updates, [&stream_call("UPDATE", subjects::STREAM)])
                }
                _ => assert!(updates.is_empty(), "{} updates {updates:?}", role.name()),
            }
        }
    }
}

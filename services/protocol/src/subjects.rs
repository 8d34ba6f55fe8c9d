//! Subjects. Events live on `handoff.evt.<aggregate>.<token>`; each aggregate has one
//! subject, so its history is one subject filter and its optimistic concurrency one
//! expected sequence.
//!
//! | aggregate | subject |
//! |-----------|---------|
//! | daemon    | `handoff.evt.daemon.<encoded daemon id>` |
//! | project   | `handoff.evt.project.<project>` |
//! | job       | `handoff.evt.job.<project>/<deployment>[/<shard>]` |
//! | move      | `handoff.evt.move.<move id>` |
//! | user      | `handoff.evt.user.<encoded user name>` |
//! | audit     | `handoff.evt.audit.<reason>` (the refused requests of one reason: `unsigned`, `unknown_user`, `bad_signature`, `expired`, `replayed`, `forbidden`) |
//! | alert     | `handoff.evt.alert.<ALERT_TYPE>.<encoded daemon or job>` (those that are not a daemon's or a job's own events) |
//! | failover  | `handoff.evt.failover.<move id>` (one automatic decision each) |
//! | answer    | `handoff.evt.answer.<n>`, `n` = [`answer_bucket`] of the command id: each command's `CommandAccepted` or `CommandRejected`, [`ANSWER_SUBJECTS`] subjects for all of them |
//!
//! A daemon id (`host.example.net:/data/backup/`) holds dots, which separate subject
//! tokens, so it is percent-encoded: every byte outside `[A-Za-z0-9_-]` becomes `%XX`.

use handoff_domain::{Aggregate, CommandId, DaemonId};

/// The event stream.
pub const STREAM: &str = "HANDOFF_EVENTS";
/// Every event subject starts with this.
pub const EVENTS: &str = "handoff.evt";
/// Every event, as a filter.
pub const ALL_EVENTS: &str = "handoff.evt.>";
/// The command service's endpoints are `handoff.cmd.<command>`.
pub const COMMANDS: &str = "handoff.cmd";
/// The query service's endpoints are `handoff.query.<query>`.
pub const QUERIES: &str = "handoff.query";

/// Every user's events, as a filter.
pub const USERS: &str = "handoff.evt.user.>";
/// Every refused request, as a filter.
pub const AUDIT: &str = "handoff.evt.audit.>";
/// Every command's answer (accepted or rejected), as a filter.
pub const ANSWERS: &str = "handoff.evt.answer.>";
/// How many subjects the commands' answers are spread over.
pub const ANSWER_SUBJECTS: u64 = 256;
/// Every automatic failover decision, as a filter.
pub const FAILOVERS: &str = "handoff.evt.failover.>";
/// Every job's events, as a filter.
pub const JOB_EVENTS: &str = "handoff.evt.job.>";
/// Every daemon's events, as a filter.
pub const DAEMON_EVENTS: &str = "handoff.evt.daemon.>";
/// A job's event subject is this prefix and the job id.
pub const JOB_EVENTS_PREFIX: &str = "handoff.evt.job.";
/// Every rebuild's progress (core NATS, not stored), as a filter.
pub const PROGRESS: &str = "handoff.progress.>";
/// Every job's oplog subject, as a filter (the oplog store's subjects).
pub const OPLOG: &str = "handoff.oplog.>";

/// The command archive (key-value): the answer of every command id no longer recent in
/// the command service's memory, by id.
pub const COMMAND_ARCHIVE_BUCKET: &str = "handoff_commands";
/// The command service's model snapshots (object store).
pub const MODEL_BUCKET: &str = "handoff_model";
/// The latest snapshot of the command model, in [`MODEL_BUCKET`].
pub const MODEL_OBJECT: &str = "command-model";

/// A job's oplog subject in the oplog store.
pub fn oplog(job: &handoff_domain::JobId) -> String {
    format!("handoff.oplog.{job}")
}

/// Where a move's rebuild progress is published.
pub fn progress(move_id: &str) -> String {
    format!("handoff.progress.{move_id}")
}

/// Encodes a daemon id into one subject token.
pub fn daemon_token(id: &DaemonId) -> String {
    token(id.as_str())
}

/// A daemon's key in a key-value bucket (its heartbeat): the token with `=` for `%`,
/// which keys may not hold.
pub fn daemon_key(id: &DaemonId) -> String {
    daemon_token(id).replace('%', "=")
}

/// Decodes a [`daemon_key`] back into the id, if it is one.
pub fn daemon_from_key(key: &str) -> Option<DaemonId> {
    daemon_from_token(&key.replace('=', "%"))
}

/// Percent-encodes every byte outside `[A-Za-z0-9_-]`, making one subject token.
fn token(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 16);
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Decodes a daemon token back into the id, if it is one.
pub fn daemon_from_token(token: &str) -> Option<DaemonId> {
    let bytes = token.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = token.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    DaemonId::new(String::from_utf8(out).ok()?).ok()
}

/// The subject of an aggregate's events.
pub fn aggregate(aggregate: &Aggregate) -> String {
    match aggregate {
        Aggregate::Daemon(d) => daemon(d),
        Aggregate::Project(p) => format!("{EVENTS}.project.{p}"),
        Aggregate::Job(j) => format!("{EVENTS}.job.{j}"),
        Aggregate::Move(m) => format!("{EVENTS}.move.{m}"),
        Aggregate::User(u) => format!("{EVENTS}.user.{}", token(u.as_str())),
        Aggregate::Audit(reason) => format!("{EVENTS}.audit.{}", token(reason)),
        Aggregate::Alert(a) => format!("{EVENTS}.alert.{}.{}", a.kind, token(&a.about)),
        Aggregate::Failover(m) => format!("{EVENTS}.failover.{m}"),
        Aggregate::Answer(id) => format!("{EVENTS}.answer.{}", answer_bucket(id)),
    }
}

/// Which of the [`ANSWER_SUBJECTS`] answer subjects holds command `id`'s answer: FNV-1a
/// (64 bits) of the id's text, modulo their number. Part of the stream's layout: every
/// instance and every build must compute the same, so it never changes.
pub fn answer_bucket(id: &CommandId) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.as_str().bytes() {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash % ANSWER_SUBJECTS
}

/// The subject of a daemon's events: its settings, liveness and the jobs assigned to it.
/// A daemon consumes only this subject.
pub fn daemon(id: &DaemonId) -> String {
    format!("{EVENTS}.daemon.{}", daemon_token(id))
}

/// The endpoint subject of a command, e.g. `handoff.cmd.move-jobs`.
pub fn command(endpoint: &str) -> String {
    format!("{COMMANDS}.{endpoint}")
}

/// The endpoint subject of a query, e.g. `handoff.query.jobs`.
pub fn query(endpoint: &str) -> String {
    format!("{QUERIES}.{endpoint}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn daemon_tokens_round_trip_and_hold_no_separator() {
        let id = DaemonId::new("backup-1.example.net:/data/backup_2/").unwrap();
        let token = daemon_token(&id);
        assert!(!token.contains('.') && !token.contains('*') && !token.contains('>'));
        assert_eq!(daemon_from_token(&token), Some(id.clone()));
        assert_eq!(daemon_from_token("%zz"), None);
        let key = daemon_key(&id);
        assert!(key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_=".contains(c)));
        assert_eq!(daemon_from_key(&key), Some(id));
    }

    /// The answer subject of an id is fixed for good (instances and builds must agree on
    /// it), and ids spread over all of them.
    #[test]
    fn answer_subjects_are_stable_and_bounded() {
        let id = CommandId::new("01ARZ3NDEKTSV4RRFFQ69G5FAV").unwrap();
        assert_eq!(
            aggregate(&Aggregate::Answer(id.clone())),
            format!("handoff.evt.answer.{}", answer_bucket(&id))
        );
        assert_eq!(answer_bucket(&id), 64);
        let buckets: std::collections::BTreeSet<u64> = (0..4096u32)
            .map(|n| {
                let id = CommandId::new(format!("01ARZ3NDEKTSV4RRFFQ69{n:05}")).unwrap();
                answer_bucket(&id)
            })
            .collect();
        assert_eq!(buckets.len() as u64, ANSWER_SUBJECTS);
    }
}

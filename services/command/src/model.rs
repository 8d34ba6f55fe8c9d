//! The command service's picture of the world: the domain state folded from the event
//! stream, the last sequence of every subject (the expectations of the next append), and
//! what every command id appended (to answer a retried command without deciding again).

use std::collections::HashMap;

use handoff_domain::{CommandId, State};
use handoff_eventlog::Recorded;
use handoff_protocol::api::AppendedEvent;

/// What one command id appended so far.
#[derive(Clone, Debug, Default)]
pub struct CommandRecord {
    pub digest: String,
    pub events: Vec<AppendedEvent>,
    /// Its last event (marked `last`) is stored: the command is fully applied.
    pub complete: bool,
    /// The fingerprints of the signed requests that appended its events: the same
    /// signed request again is a replay.
    pub signatures: Vec<String>,
}

/// The fold of the stream up to `applied`.
#[derive(Default)]
pub struct Model {
    pub state: State,
    last_seq: HashMap<String, u64>,
    commands: HashMap<CommandId, CommandRecord>,
    /// The last stream sequence folded in.
    pub applied: u64,
    /// Whether a user was ever added (even if removed since).
    pub has_users: bool,
}

impl Model {
    /// Folds the next event of the stream in.
    pub fn apply(&mut self, r: &Recorded) {
        self.state.apply(&r.envelope.event);
        self.has_users |= matches!(r.envelope.event, handoff_domain::Event::UserAdded { .. });
        self.last_seq.insert(r.subject.clone(), r.seq);
        let record = self.commands.entry(r.envelope.command.clone()).or_default();
        record.digest.clone_from(&r.envelope.digest);
        record.events.push(AppendedEvent {
            seq: r.seq,
            subject: r.subject.clone(),
            kind: r.envelope.event.type_name().to_owned(),
        });
        record.complete |= r.envelope.last;
        if let Some(fp) = &r.envelope.signature {
            if !record.signatures.contains(fp) {
                record.signatures.push(fp.clone());
            }
        }
        self.applied = r.seq;
    }

    /// The last sequence of `subject`, 0 if it has none.
    pub fn last_seq(&self, subject: &str) -> u64 {
        self.last_seq.get(subject).copied().unwrap_or(0)
    }

    pub fn command(&self, id: &CommandId) -> Option<&CommandRecord> {
        self.commands.get(id)
    }
}

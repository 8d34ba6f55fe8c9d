//! The command service's picture of the world: the domain state folded from the event
//! stream, the last sequence of every subject (the expectations of the next append), what
//! every command id appended (to answer a retried command without deciding again), and
//! which command ids were answered with a rejection (to answer them so again, decision
//! 0010).

use std::collections::{BTreeSet, HashMap};

use handoff_domain::{Actor, CommandId, Event, Rejection, State};
use handoff_eventlog::Recorded;
use handoff_protocol::api::AppendedEvent;
use handoff_protocol::subjects;
use thiserror::Error;

/// The stream delivered an event that is not the next one: folding it would leave a
/// hole in the model, which every later decision would be made on.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("the stream delivered event {got} after event {applied}: the events between are missing")]
pub struct Gap {
    pub applied: u64,
    pub got: u64,
}

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
    /// Who asked for it.
    pub actor: Option<Actor>,
    /// When its latest event was decided (the deciding service's clock, ms).
    pub last_at: u64,
}

/// A command id answered with a domain rejection: its `CommandRejected`.
#[derive(Clone, Debug)]
pub struct Rejected {
    /// The rejected request's digest: the same id with another command is not a retry.
    pub digest: String,
    pub rejection: Rejection,
}

/// The subject filters whose last sequence the model keeps: what the rules that read
/// many aggregates guard (see `executor::guard_of`).
pub const GUARDED: [&str; 3] = [
    subjects::USERS,
    subjects::JOB_EVENTS,
    subjects::DAEMON_EVENTS,
];

/// The fold of the stream up to `applied`.
#[derive(Default)]
pub struct Model {
    pub state: State,
    last_seq: HashMap<String, u64>,
    /// The last sequence over every subject of each [`GUARDED`] filter.
    last_seq_of_filter: HashMap<&'static str, u64>,
    /// The commands appended in part: some events stored, not the last.
    incomplete: BTreeSet<CommandId>,
    commands: HashMap<CommandId, CommandRecord>,
    /// The command ids answered with a rejection, by the rejected id.
    rejected: HashMap<CommandId, Rejected>,
    /// The last stream sequence folded in.
    pub applied: u64,
    /// Whether a user was ever added (even if removed since).
    pub has_users: bool,
}

impl Model {
    /// Folds the next event of the stream in. The stream has no holes (nothing is ever
    /// deleted from it), so the next event is the one after [`Model::applied`]: one
    /// already folded (a redelivery) changes nothing, a later one is a [`Gap`] and is not
    /// folded.
    pub fn apply(&mut self, r: &Recorded) -> Result<(), Gap> {
        if r.seq <= self.applied {
            return Ok(());
        }
        if r.seq != self.applied + 1 {
            return Err(Gap {
                applied: self.applied,
                got: r.seq,
            });
        }
        self.state.apply(&r.envelope.event);
        self.has_users |= matches!(r.envelope.event, Event::UserAdded { .. });
        if let Event::CommandRejected {
            command_id,
            rejection,
            ..
        } = &r.envelope.event
        {
            // The first is the answer; the executor never stores a second (the answer
            // subject's expected sequence), but a fold does not rely on it.
            self.rejected
                .entry(command_id.clone())
                .or_insert_with(|| Rejected {
                    digest: r.envelope.digest.clone(),
                    rejection: rejection.clone(),
                });
        }
        self.last_seq.insert(r.subject.clone(), r.seq);
        for filter in GUARDED {
            if r.subject.starts_with(filter.trim_end_matches('>')) {
                self.last_seq_of_filter.insert(filter, r.seq);
            }
        }
        let record = self.commands.entry(r.envelope.command.clone()).or_default();
        record.digest.clone_from(&r.envelope.digest);
        record.events.push(AppendedEvent {
            seq: r.seq,
            subject: r.subject.clone(),
            kind: r.envelope.event.type_name().to_owned(),
        });
        record.complete |= r.envelope.last;
        record.actor = Some(r.envelope.actor.clone());
        record.last_at = r.envelope.at;
        if record.complete {
            self.incomplete.remove(&r.envelope.command);
        } else {
            self.incomplete.insert(r.envelope.command.clone());
        }
        if let Some(fp) = &r.envelope.signature {
            if !record.signatures.contains(fp) {
                record.signatures.push(fp.clone());
            }
        }
        self.applied = r.seq;
        Ok(())
    }

    /// The last sequence of `subject`, 0 if it has none.
    pub fn last_seq(&self, subject: &str) -> u64 {
        self.last_seq.get(subject).copied().unwrap_or(0)
    }

    /// The last sequence over every subject of `filter`, one of [`GUARDED`]; 0 if none.
    pub fn last_seq_of_filter(&self, filter: &str) -> u64 {
        debug_assert!(GUARDED.contains(&filter), "{filter} is not kept");
        self.last_seq_of_filter.get(filter).copied().unwrap_or(0)
    }

    pub fn command(&self, id: &CommandId) -> Option<&CommandRecord> {
        self.commands.get(id)
    }

    /// The rejection command `id` was answered with, if it was.
    pub fn rejected(&self, id: &CommandId) -> Option<&Rejected> {
        self.rejected.get(id)
    }

    /// The commands appended in part (a move of several units cut between two), oldest
    /// id first.
    pub fn incomplete(&self) -> impl Iterator<Item = (&CommandId, &CommandRecord)> {
        self.incomplete
            .iter()
            .filter_map(|id| self.commands.get(id).map(|r| (id, r)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use handoff_domain::{Actor, DaemonId};
    use handoff_protocol::EventEnvelope;

    fn rejected(seq: u64, id: &CommandId, digest: &str, rejection: Rejection) -> Recorded {
        let event = Event::CommandRejected {
            command_id: id.clone(),
            command: "MoveJob".into(),
            rejection,
        };
        Recorded {
            seq,
            subject: subjects::aggregate(&event.aggregate()),
            envelope: EventEnvelope {
                event,
                version: Event::VERSION,
                command: handoff_protocol::new_command_id(),
                actor: Actor::new("admin").unwrap(),
                at: 0,
                last: true,
                digest: digest.into(),
                signature: None,
            },
        }
    }

    fn recorded(seq: u64, n: usize) -> Recorded {
        let daemon = DaemonId::new(format!("backup{n}.example.net:/data/backup/")).unwrap();
        Recorded {
            seq,
            subject: format!("{}.daemon.{n}", handoff_protocol::subjects::EVENTS),
            envelope: EventEnvelope {
                event: Event::DaemonDown { daemon },
                version: Event::VERSION,
                command: handoff_protocol::new_command_id(),
                actor: Actor::new("admin").unwrap(),
                at: 0,
                last: true,
                digest: String::new(),
                signature: None,
            },
        }
    }

    /// Events are folded one after the other: a redelivered one changes nothing, one
    /// after a hole is refused and leaves the model as it was.
    #[test]
    fn the_fold_takes_only_the_next_event() {
        let mut model = Model::default();
        model.apply(&recorded(1, 1)).unwrap();
        model.apply(&recorded(2, 2)).unwrap();
        model.apply(&recorded(2, 2)).unwrap();
        assert_eq!(model.applied, 2);
        assert_eq!(
            model.apply(&recorded(4, 3)),
            Err(Gap { applied: 2, got: 4 })
        );
        assert_eq!(model.applied, 2);
        let subject = format!("{}.daemon.3", handoff_protocol::subjects::EVENTS);
        assert_eq!(model.last_seq(&subject), 0);
    }

    /// A rejection is indexed by the rejected id with the request's digest, and the first
    /// one stays the answer; the rejected id has no events of its own.
    #[test]
    fn a_rejection_is_the_answer_of_its_id() {
        let id = handoff_protocol::new_command_id();
        let down = |n: usize| Rejection::DestinationDown {
            daemon: DaemonId::new(format!("backup{n}.example.net:/data/backup/")).unwrap(),
        };
        let mut model = Model::default();
        model.apply(&rejected(1, &id, "d1", down(1))).unwrap();
        model.apply(&rejected(2, &id, "d2", down(2))).unwrap();
        let r = model.rejected(&id).expect("indexed");
        assert_eq!((r.digest.as_str(), &r.rejection), ("d1", &down(1)));
        assert!(model.command(&id).is_none());
        let subject = subjects::aggregate(&handoff_domain::Aggregate::Answer(id));
        assert_eq!(model.last_seq(&subject), 2);
    }
}

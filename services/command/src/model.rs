//! The command service's picture of the world: the domain state folded from the event
//! stream, the last sequence of every subject (the expectations of the next append), what
//! every recent command id appended (to answer a retried command without deciding again),
//! and which recent command ids were answered with a rejection (to answer them so again,
//! decision 0010).
//!
//! Its size does not grow with the history: the state holds the fleet and the moves in
//! progress; a command's record stays in memory until [`Config::window`] events have
//! been folded after its last one (a command appended in part stays until it completes),
//! then leaves for the archive (`archiving`, until the executor has stored it in the
//! command archive: see `crate::archive`). The model is serialisable: the service starts
//! from a snapshot of it and folds only the events after.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use handoff_domain::{Actor, CommandId, Event, Rejection, State};
use handoff_eventlog::Recorded;
use handoff_protocol::api::AppendedEvent;
use handoff_protocol::subjects;
use serde::{Deserialize, Serialize};
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
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
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
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
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

/// How far ahead of the service's clock a new command id's time (its ULID's) may be: the
/// command service refuses ids made further ahead, and an id that leaves the window
/// further ahead of the event at which it leaves does not count towards the newest time
/// of [`Model::may_be_archived`].
pub const ID_AHEAD_MS: u64 = 10 * 60 * 1000;

/// The answer a command id got, as the archive keeps it once the id is no longer recent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Archived {
    /// Its events (it completed).
    Applied {
        digest: String,
        events: Vec<AppendedEvent>,
    },
    /// Its rejection.
    Rejected(Rejected),
}

/// How long records stay in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Config {
    /// A command's record leaves memory once this many events were folded after its
    /// last one.
    pub window: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config { window: 100_000 }
    }
}

/// The fold of the stream up to `applied`.
#[derive(Default, Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Model {
    pub state: State,
    last_seq: HashMap<String, u64>,
    /// The last sequence over every subject of each [`GUARDED`] filter, in its order.
    last_seq_of_filter: [u64; GUARDED.len()],
    /// The commands appended in part: some events stored, not the last.
    incomplete: BTreeSet<CommandId>,
    commands: HashMap<CommandId, CommandRecord>,
    /// The command ids answered with a rejection, by the rejected id.
    rejected: HashMap<CommandId, Rejected>,
    /// Each record by the sequence it was last touched at, oldest first, and whether it
    /// is a rejection's (a command's id appears again each time its record changes; a
    /// stale entry is skipped).
    recent: VecDeque<(u64, CommandId, bool)>,
    /// Records out of the window, until the archive has them ([`Model::archived`]).
    archiving: BTreeMap<CommandId, Archived>,
    /// The newest time (of its ULID) of any id that ever left the window; `None` while
    /// none has. An id made later cannot be in the archive, so a new command costs no
    /// lookup there.
    archived_newest_ms: Option<u64>,
    /// Ids that left the window made more than [`ID_AHEAD_MS`] after the event at which
    /// they left (a client's clock far ahead, an id taken before such ids were refused):
    /// looked up by name, so they do not push the newest time years ahead.
    archived_ahead: BTreeSet<CommandId>,
    /// Ids that joined `archiving` since [`Model::take_evicted`].
    #[serde(skip)]
    evicted: Vec<CommandId>,
    pub config: Config,
    /// The last stream sequence folded in.
    pub applied: u64,
    /// The last event folded in ([`event_mark`]): a saved model is checked against the
    /// stream's event at `applied`.
    pub last_event: String,
    /// Whether a user was ever added (even if removed since).
    pub has_users: bool,
    /// The cancels of moves still in progress, by move: a cancel appended in part ends
    /// when its move does, however the move's last jobs ended.
    #[serde(default)]
    cancels: BTreeMap<CommandId, CommandId>,
}

/// What tells one event from another at the same sequence: its subject and its command.
pub fn event_mark(subject: &str, command: &CommandId) -> String {
    format!("{subject}#{command}")
}

impl Model {
    pub fn new(config: Config) -> Self {
        Model {
            config,
            ..Model::default()
        }
    }

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
            if !self.rejected.contains_key(command_id) && !self.archiving.contains_key(command_id) {
                self.rejected.insert(
                    command_id.clone(),
                    Rejected {
                        digest: r.envelope.digest.clone(),
                        rejection: rejection.clone(),
                    },
                );
                self.recent.push_back((r.seq, command_id.clone(), true));
            }
        }
        self.last_seq.insert(r.subject.clone(), r.seq);
        for (i, filter) in GUARDED.iter().enumerate() {
            if r.subject.starts_with(filter.trim_end_matches('>')) {
                self.last_seq_of_filter[i] = r.seq;
            }
        }
        let id = &r.envelope.command;
        let record = self.commands.entry(id.clone()).or_default();
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
            self.incomplete.remove(id);
        } else {
            self.incomplete.insert(id.clone());
        }
        if let Some(fp) = &r.envelope.signature {
            if !record.signatures.contains(fp) {
                record.signatures.push(fp.clone());
            }
        }
        self.recent.push_back((r.seq, id.clone(), false));
        // A move appended in part and cancelled is over: its command gets no more events,
        // and its answer is what it appended. It leaves the window from here.
        if let Event::MoveCancelled { move_id, .. } = &r.envelope.event {
            self.end(move_id, r.seq);
            if self.state.moves.contains_key(move_id) {
                self.cancels.insert(move_id.clone(), id.clone());
            }
        }
        if !self.cancels.is_empty() {
            let over: Vec<(CommandId, CommandId)> = self
                .cancels
                .iter()
                .filter(|(m, _)| !self.state.moves.contains_key(*m))
                .map(|(m, c)| (m.clone(), c.clone()))
                .collect();
            for (m, cancel) in over {
                self.cancels.remove(&m);
                self.end(&cancel, r.seq);
            }
        }
        self.applied = r.seq;
        self.last_event = event_mark(&r.subject, id);
        self.evict(r.envelope.at);
        Ok(())
    }

    /// Ends a command appended in part that another command finished (a move cancelled,
    /// a cancel whose move is over): its answer is what it appended; it leaves the window
    /// from `seq`.
    fn end(&mut self, id: &CommandId, seq: u64) {
        if let Some(record) = self.commands.get_mut(id) {
            if !record.complete {
                record.complete = true;
                self.incomplete.remove(id);
                self.recent.push_back((seq, id.clone(), false));
            }
        }
    }

    /// Moves the records out of the window to `archiving`. A command appended in part
    /// stays: its next events come later, and the service finishes it from its record.
    fn evict(&mut self, at: u64) {
        let horizon = self.applied.saturating_sub(self.config.window);
        while let Some((seq, _, _)) = self.recent.front() {
            if *seq > horizon {
                break;
            }
            let Some((seq, id, rejection)) = self.recent.pop_front() else {
                break;
            };
            if rejection {
                // A rejection's entry is the only one it gets.
                if let Some(r) = self.rejected.remove(&id) {
                    self.archive(id, Archived::Rejected(r), at);
                }
                continue;
            }
            let last_event = self
                .commands
                .get(&id)
                .and_then(|r| r.events.last())
                .map(|e| e.seq);
            // Its last event, or later (a cancelled move's command, ended by another's).
            if last_event.is_some_and(|last| last <= seq) && !self.incomplete.contains(&id) {
                if let Some(r) = self.commands.remove(&id) {
                    self.archive(
                        id,
                        Archived::Applied {
                            digest: r.digest,
                            events: r.events,
                        },
                        at,
                    );
                }
            }
        }
    }

    /// Sends a record to the archive, at the event made at `at` (ms).
    fn archive(&mut self, id: CommandId, answer: Archived, at: u64) {
        let ms = id.timestamp_ms();
        if ms > at.saturating_add(ID_AHEAD_MS) {
            self.archived_ahead.insert(id.clone());
        } else {
            self.archived_newest_ms = Some(self.archived_newest_ms.map_or(ms, |n| n.max(ms)));
        }
        self.evicted.push(id.clone());
        self.archiving.insert(id, answer);
    }

    /// Whether `id` may be in the archive: an id at least as old left the window, or `id`
    /// itself did, made far ahead. An id made ahead of the clocks makes the ids of at most
    /// [`ID_AHEAD_MS`] be looked up.
    pub fn may_be_archived(&self, id: &CommandId) -> bool {
        self.archived_ahead.contains(id)
            || self
                .archived_newest_ms
                .is_some_and(|newest| id.timestamp_ms() <= newest)
    }

    /// The ids that left the window since the last call, to store in the archive.
    pub fn take_evicted(&mut self) -> Vec<CommandId> {
        std::mem::take(&mut self.evicted)
    }

    /// Every record waiting for the archive (after a start from a snapshot, all of them
    /// are stored again).
    pub fn archiving(&self) -> impl Iterator<Item = (&CommandId, &Archived)> {
        self.archiving.iter()
    }

    /// A record that left the window, not yet in the archive.
    pub fn leaving(&self, id: &CommandId) -> Option<&Archived> {
        self.archiving.get(id)
    }

    /// The archive holds `id`'s record: it leaves memory.
    pub fn archived(&mut self, id: &CommandId) {
        self.archiving.remove(id);
    }

    /// Whether two models decide alike: everything but the records on their way to the
    /// archive (which depend on when the archive answered).
    pub fn decides_as(&self, other: &Model) -> bool {
        let strip = |m: &Model| Model {
            archiving: BTreeMap::new(),
            evicted: Vec::new(),
            ..m.clone()
        };
        strip(self) == strip(other)
    }

    /// The recent command ids, and their records.
    pub fn recent_commands(&self) -> impl Iterator<Item = (&CommandId, &CommandRecord)> {
        self.commands.iter()
    }

    /// Records in memory (recent, and leaving for the archive).
    pub fn records(&self) -> usize {
        self.commands.len() + self.rejected.len() + self.archiving.len()
    }

    /// The last sequence of `subject`, 0 if it has none.
    pub fn last_seq(&self, subject: &str) -> u64 {
        self.last_seq.get(subject).copied().unwrap_or(0)
    }

    /// The last sequence over every subject of `filter`, one of [`GUARDED`]; 0 if none.
    pub fn last_seq_of_filter(&self, filter: &str) -> u64 {
        debug_assert!(GUARDED.contains(&filter), "{filter} is not kept");
        GUARDED
            .iter()
            .position(|f| *f == filter)
            .map_or(0, |i| self.last_seq_of_filter[i])
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
#[path = "model_tests.rs"]
mod tests;

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
    /// Whether any record ever left the window: until one has, no id can be in the
    /// archive, and nothing needs to ask it.
    #[serde(default)]
    pub archived_any: bool,
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
        self.evict();
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
    fn evict(&mut self) {
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
                    self.archive(id, Archived::Rejected(r));
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
                    );
                }
            }
        }
    }

    fn archive(&mut self, id: CommandId, answer: Archived) {
        self.archived_any = true;
        self.evicted.push(id.clone());
        self.archiving.insert(id, answer);
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
mod tests {
    use super::*;
    use handoff_domain::{Actor, Command, DaemonId};
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

    fn cancelled(seq: u64, move_id: &CommandId) -> Recorded {
        let mut r = recorded(seq, 1);
        let event = Event::MoveCancelled {
            move_id: move_id.clone(),
            cancel_id: r.envelope.command.clone(),
            reason: "not now".into(),
            cancelled: 0,
        };
        r.subject = subjects::aggregate(&event.aggregate());
        r.envelope.event = event;
        r
    }

    /// Folds what `command` decides on the model's state as command `id`, its last
    /// event marked last when `complete`.
    fn fold_decision(model: &mut Model, id: &CommandId, command: Command, complete: bool) {
        let ctx = handoff_domain::Context {
            command: id.clone(),
            actor: Actor::new("admin").unwrap(),
            at_ms: 0,
        };
        let decision = handoff_domain::decide(&command, &ctx, &model.state).expect("accepted");
        let events: Vec<Event> = decision.events().cloned().collect();
        let n = events.len();
        for (i, event) in events.into_iter().enumerate() {
            let seq = model.applied + 1;
            model
                .apply(&Recorded {
                    seq,
                    subject: subjects::aggregate(&event.aggregate()),
                    envelope: EventEnvelope {
                        event,
                        version: Event::VERSION,
                        command: id.clone(),
                        actor: ctx.actor.clone(),
                        at: 0,
                        last: complete && i + 1 == n,
                        digest: String::new(),
                        signature: None,
                    },
                })
                .unwrap();
        }
    }

    /// A cancel cut off before its last event ends once its move is over: the service
    /// does not try to finish it for ever, and it leaves memory with the window.
    #[test]
    fn a_cancel_appended_in_part_ends_with_its_move() {
        use handoff_domain::command::{
            CancelMove, ConfigureProject, CreateBackupJobs, MoveJob, RegisterDaemon,
        };
        use handoff_domain::model::{DaemonSettings, Deployment, JobSize};
        let mut model = Model::new(Config { window: 3 });
        let daemon = |n: usize| DaemonId::new(format!("backup{n}.example.net:/data/")).unwrap();
        let new = handoff_protocol::new_command_id;
        for n in [1, 2] {
            let settings = DaemonSettings {
                head_space_bytes: 1 << 40,
                ..DaemonSettings::default()
            };
            let register = Command::RegisterDaemon(RegisterDaemon {
                daemon: daemon(n),
                settings,
            });
            fold_decision(&mut model, &new(), register, true);
        }
        let project = handoff_domain::ProjectId::new("p").unwrap();
        let configure = Command::ConfigureProject(ConfigureProject {
            project: project.clone(),
            daemon_filter: vec![],
            label_filter: vec![],
        });
        fold_decision(&mut model, &new(), configure, true);
        let create = Command::CreateBackupJobs(CreateBackupJobs {
            project,
            deployment: Deployment::ReplicaSet {
                name: handoff_domain::ids::DeploymentName::new("rs").unwrap(),
                size: JobSize {
                    head_size_bytes: 1 << 30,
                    oplog_bytes_per_hour: 0,
                },
            },
        });
        fold_decision(&mut model, &new(), create, true);
        let job = handoff_domain::JobId::new("p/rs").unwrap();
        let to = if model.state.jobs[&job].owner() == &daemon(1) {
            2
        } else {
            1
        };
        let move_id = new();
        let move_job = Command::MoveJob(MoveJob {
            job,
            to: daemon(to),
            reason: None,
            dry_run: false,
        });
        fold_decision(&mut model, &move_id, move_job, true);
        let cancel_id = new();
        let cancel = Command::CancelMove(CancelMove {
            move_id: move_id.clone(),
            reason: "not now".into(),
        });
        fold_decision(&mut model, &cancel_id, cancel, false);
        assert!(
            !model.state.moves.contains_key(&move_id),
            "the move is over"
        );
        assert!(model.command(&cancel_id).is_some_and(|r| r.complete));
        assert_eq!(model.incomplete().count(), 0);
        for _ in 0..5 {
            let seq = model.applied + 1;
            model.apply(&recorded(seq, 3)).unwrap();
        }
        assert!(model.command(&cancel_id).is_none(), "still in memory");
    }

    /// A move appended in part, then cancelled by another command: its command is over
    /// (answered with what it appended, never finished by the service), and it leaves
    /// memory with the window like any other.
    #[test]
    fn a_cancel_ends_the_command_of_a_move_appended_in_part() {
        let mut model = Model::new(Config { window: 3 });
        let move_id = handoff_protocol::new_command_id();
        let mut part = recorded(1, 1);
        part.envelope.command = move_id.clone();
        part.envelope.last = false;
        model.apply(&part).unwrap();
        assert_eq!(model.incomplete().count(), 1);
        model.apply(&cancelled(2, &move_id)).unwrap();
        assert!(model.command(&move_id).is_some_and(|r| r.complete));
        assert_eq!(model.incomplete().count(), 0);
        for seq in 3..10 {
            model.apply(&recorded(seq, 2)).unwrap();
        }
        assert!(model.command(&move_id).is_none(), "still in memory");
        assert!(model.take_evicted().contains(&move_id));
    }

    use proptest::prelude::*;

    /// A random history: commands of one or several events (some left in part),
    /// rejections, ids reused across the history.
    fn history(ops: &[(u8, u8, bool)]) -> Vec<Recorded> {
        let ids: Vec<CommandId> = (0..40)
            .map(|_| handoff_protocol::new_command_id())
            .collect();
        ops.iter()
            .enumerate()
            .map(|(i, (kind, n, last))| {
                let seq = i as u64 + 1;
                let id = ids[usize::from(*n) % ids.len()].clone();
                match kind % 4 {
                    3 => cancelled(seq, &id),
                    0 => {
                        let mut r = recorded(seq, usize::from(*n) % 5);
                        r.envelope.command = handoff_protocol::new_command_id();
                        r
                    }
                    1 => {
                        let mut r = recorded(seq, usize::from(*n) % 5);
                        r.envelope.command = id;
                        r.envelope.last = *last;
                        r
                    }
                    _ => rejected(
                        seq,
                        &id,
                        "d",
                        Rejection::DestinationDown {
                            daemon: DaemonId::new("backup1.example.net:/data/backup/").unwrap(),
                        },
                    ),
                }
            })
            .collect()
    }

    proptest! {
        /// A model saved after any prefix, read back and given the rest equals the model
        /// that folded everything; between them they sent the same records to the
        /// archive; and the records in memory stay within the window.
        #[test]
        fn a_snapshot_and_its_tail_fold_to_the_whole_fold(
            ops in proptest::collection::vec((any::<u8>(), any::<u8>(), any::<bool>()), 1..300),
            window in 1u64..40,
            cut in any::<prop::sample::Index>(),
        ) {
            let events = history(&ops);
            let cut = cut.index(events.len() + 1);
            let config = Config { window };
            let mut whole = Model::new(config);
            for r in &events {
                whole.apply(r).unwrap();
            }
            let mut head = Model::new(config);
            for r in &events[..cut] {
                head.apply(r).unwrap();
            }
            let mut evicted = head.take_evicted();
            let saved = serde_json::to_vec(&head).unwrap();
            let mut resumed: Model = serde_json::from_slice(&saved).unwrap();
            for r in &events[cut..] {
                resumed.apply(r).unwrap();
            }
            evicted.extend(resumed.take_evicted());
            prop_assert_eq!(evicted, whole.take_evicted());
            prop_assert_eq!(&resumed, &whole);
            prop_assert!(
                whole.commands.len() + whole.rejected.len()
                    <= 2 * window as usize + whole.incomplete.len(),
                "{} records for a window of {}", whole.commands.len() + whole.rejected.len(), window
            );
        }
    }
}

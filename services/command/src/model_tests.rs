//! The model's fold, its answers and its snapshots, on hand-made histories.
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
    // Made at the events' time (0), as a client's ids are.
    history_with(ops, &mut |k| id_at(k as u64, k))
}

/// [`history`] with its ids made by `make` (the `k`th id).
fn history_with(ops: &[(u8, u8, bool)], make: &mut dyn FnMut(usize) -> CommandId) -> Vec<Recorded> {
    let ids: Vec<CommandId> = (0..40).map(&mut *make).collect();
    ops.iter()
        .enumerate()
        .map(|(i, (kind, n, last))| {
            let seq = i as u64 + 1;
            let id = ids[usize::from(*n) % ids.len()].clone();
            match kind % 4 {
                3 => {
                    let mut r = cancelled(seq, &id);
                    let cancel = make(40 + i);
                    if let Event::MoveCancelled { cancel_id, .. } = &mut r.envelope.event {
                        *cancel_id = cancel.clone();
                    }
                    r.envelope.command = cancel;
                    r
                }
                0 => {
                    let mut r = recorded(seq, usize::from(*n) % 5);
                    r.envelope.command = make(40 + i);
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

/// An id made at `ms` (a client's clock is its own), the `n`th of that time.
fn id_at(ms: u64, n: usize) -> CommandId {
    CommandId::new(ulid::Ulid::from_parts(ms, n as u128).to_string()).unwrap()
}

proptest! {
    /// Ids made at any times (a client's clock is its own; some far ahead of the events'
    /// time), in any history of commands (some appended in part, some cancelled) and
    /// rejections, with any window, the model saved and read back anywhere: every id it
    /// has answered is either still in memory or was sent to the archive, and every id
    /// sent there is looked up, so none is ever decided as new again; and an id made after
    /// every id that left the window (but those made far ahead) is not looked up.
    #[test]
    fn no_answered_id_is_taken_for_a_new_one(
        ops in proptest::collection::vec((any::<u8>(), any::<u8>(), any::<bool>()), 1..300),
        window in 1u64..40,
        times in proptest::collection::vec(0u64..1 << 20, 340),
        cut in any::<prop::sample::Index>(),
    ) {
        let events = history_with(&ops, &mut |k| id_at(times[k], k));
        let cut = cut.index(events.len());
        let mut model = Model::new(Config { window });
        let mut answered = std::collections::BTreeSet::new();
        let mut archived = std::collections::BTreeSet::new();
        for (i, r) in events.iter().enumerate() {
            model.apply(r).unwrap();
            answered.insert(match &r.envelope.event {
                Event::CommandRejected { command_id, .. } => command_id.clone(),
                _ => r.envelope.command.clone(),
            });
            // The archive stores each at once: the model lets go of it.
            for id in model.take_evicted() {
                model.archived(&id);
                archived.insert(id);
            }
            if i == cut {
                model = serde_json::from_slice(&serde_json::to_vec(&model).unwrap()).unwrap();
            }
        }
        for id in &answered {
            let held = model.command(id).is_some()
                || model.rejected(id).is_some()
                || model.leaving(id).is_some();
            prop_assert!(held || archived.contains(id), "{id} was let go of unarchived");
        }
        for id in &archived {
            prop_assert!(model.may_be_archived(id), "{id} is archived, not looked up");
        }
        // The events here are all made at time 0.
        let newest = archived
            .iter()
            .map(CommandId::timestamp_ms)
            .filter(|t| *t <= ID_AHEAD_MS)
            .max();
        let later = id_at(newest.map_or(0, |n| n + 1), 9_999);
        prop_assert!(!model.may_be_archived(&later));
    }
}

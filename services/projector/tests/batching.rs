//! The views are a function of the events alone: however the events are cut into
//! batches (a live projector commits small ones, a rebuild large ones), the store ends up
//! with the same keys and values.

use std::collections::BTreeMap;

use handoff_domain::command::*;
use handoff_domain::model::{DaemonSettings, Deployment, JobSize, Shard};
use handoff_domain::{decide, Actor, Command, CommandId, Context, DaemonId, ProjectId, State};
use handoff_eventlog::Recorded;
use handoff_projector::views::{
    block_of_key, counter_key, key, prefix, project_jobs, unpack_seqs, HISTORY_BLOCK,
};
use handoff_projector::Views;
use handoff_protocol::EventEnvelope;
use proptest::prelude::*;

/// The first event's sequence: the history crosses from one block of histories to the
/// next after its first 595 events.
const FIRST_SEQ: u64 = HISTORY_BLOCK - 595;

/// A history of about 1,500 events: a daemon with 750 jobs, moved away, so many event
/// chunks fill up, and each job's history has several events, in one block of histories
/// or in two.
fn history() -> Vec<(Recorded, Vec<u8>)> {
    let d = |n: u8| DaemonId::new(format!("d{n}:/h/")).unwrap();
    let p = ProjectId::new("p").unwrap();
    let settings = DaemonSettings {
        head_space_bytes: 1 << 40,
        ..DaemonSettings::default()
    };
    let size = JobSize {
        head_size_bytes: 1,
        oplog_bytes_per_hour: 0,
    };
    let name = |s: &str| handoff_domain::ids::DeploymentName::new(s).unwrap();
    let mut commands = vec![
        Command::RegisterDaemon(RegisterDaemon {
            daemon: d(1),
            settings: settings.clone(),
        }),
        Command::ConfigureProject(ConfigureProject {
            project: p.clone(),
            daemon_filter: vec![],
            label_filter: vec![],
        }),
    ];
    for c in 0..3 {
        commands.push(Command::CreateBackupJobs(CreateBackupJobs {
            project: p.clone(),
            deployment: Deployment::ShardedCluster {
                name: name(&format!("c{c}")),
                shards: (0..249)
                    .map(|i| Shard {
                        name: name(&format!("s{i}")),
                        size,
                    })
                    .collect(),
                config_servers: size,
            },
        }));
    }
    commands.push(Command::RegisterDaemon(RegisterDaemon {
        daemon: d(2),
        settings,
    }));
    commands.push(Command::MoveJobs(MoveJobs {
        from: d(1),
        to: d(2),
        reason: None,
        dry_run: false,
    }));

    let mut state = State::default();
    let mut out = Vec::new();
    let actor = Actor::new("t").unwrap();
    let run = |command: Command, state: &mut State, out: &mut Vec<(Recorded, Vec<u8>)>| {
        let n = out.len();
        let ctx = Context {
            command: CommandId::new(format!("01J{:023}", n)).unwrap(),
            actor: actor.clone(),
            at_ms: n as u64,
        };
        let decision = decide(&command, &ctx, state).expect("the history is valid");
        for event in decision.events() {
            state.apply(event);
            let envelope = EventEnvelope {
                event: event.clone(),
                version: handoff_domain::Event::VERSION,
                command: ctx.command.clone(),
                actor: actor.clone(),
                at: ctx.at_ms,
                last: false,
                digest: "0".into(),
                signature: None,
            };
            let payload = envelope.encode();
            let seq = FIRST_SEQ + out.len() as u64;
            out.push((
                Recorded {
                    seq,
                    subject: String::new(),
                    envelope,
                },
                payload,
            ));
        }
        ctx.command
    };
    let mut move_id = None;
    for command in commands {
        let id = run(command, &mut state, &mut out);
        move_id = Some(id);
    }
    let move_id = move_id.expect("the move is the last command");
    // Daemon 1 goes down (an alert) while its jobs complete their move, but for one
    // that fails (THEFT_FAILED), so the move ends partly failed; then it comes back.
    let liveness = |up| Command::ReportDaemonLiveness(ReportDaemonLiveness { daemon: d(1), up });
    run(liveness(false), &mut state, &mut out);
    let moving: Vec<_> = state
        .jobs
        .iter()
        .filter(|(_, j)| {
            matches!(
                j.assignment,
                handoff_domain::state::Assignment::Moving { .. }
            )
        })
        .map(|(id, j)| (id.clone(), j.epoch))
        .collect();
    for (n, (job, epoch)) in moving.into_iter().enumerate() {
        let command = if n == 0 {
            Command::FailJobMove(FailJobMove {
                job,
                move_id: move_id.clone(),
                epoch,
                reason: "destination lost".into(),
            })
        } else {
            Command::CompleteJobMove(CompleteJobMove {
                job,
                move_id: move_id.clone(),
                epoch,
                head: Some(handoff_domain::model::HeadPoint {
                    ts: "1:1".into(),
                    checksum: "1-ab".into(),
                }),
            })
        };
        run(command, &mut state, &mut out);
    }
    run(liveness(true), &mut state, &mut out);
    out
}

/// Folds the history in batches of the given sizes (cycled) into a map standing for the
/// store.
fn fold(history: &[(Recorded, Vec<u8>)], sizes: &[usize]) -> BTreeMap<Vec<u8>, Vec<u8>> {
    match fold_checking(history, sizes, |_, _| Ok::<_, std::convert::Infallible>(())) {
        Ok(store) => store,
        Err(never) => match never {},
    }
}

/// [`fold`], calling `check` after each batch with how many events it holds so far.
fn fold_checking<E>(
    history: &[(Recorded, Vec<u8>)],
    sizes: &[usize],
    mut check: impl FnMut(usize, &BTreeMap<Vec<u8>, Vec<u8>>) -> Result<(), E>,
) -> Result<BTreeMap<Vec<u8>, Vec<u8>>, E> {
    let mut views = Views::default();
    let mut store = BTreeMap::new();
    let mut i = 0;
    for size in sizes.iter().cycle() {
        if i >= history.len() {
            break;
        }
        let end = (i + size.max(&1)).min(history.len());
        for (r, payload) in &history[i..end] {
            views.apply(r, payload);
        }
        let mut changes = Vec::new();
        views.drain(&mut changes);
        for (k, v) in handoff_projector::views::encode(changes) {
            match v {
                Some(v) => store.insert(k, v),
                None => store.remove(&k),
            };
        }
        i = end;
        check(end, &store)?;
    }
    Ok(store)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Any batching gives the store one batch of everything gives.
    #[test]
    fn any_batching_gives_the_same_store(sizes in proptest::collection::vec(1..400usize, 1..8)) {
        let history = history();
        assert!(history.len() > 1500, "{} events", history.len());
        let whole = fold(&history, &[usize::MAX]);
        let batched = fold(&history, &sizes);
        prop_assert_eq!(whole.len(), batched.len());
        prop_assert!(whole == batched, "the store depends on the batching");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    /// After every batch, not only at the end, the store is the one a single batch of
    /// the same events gives: a checkpoint never holds a record behind its events (a
    /// daemon's jobs and bytes as a job is created on it or moves to it, in another batch
    /// than the events that name the daemon).
    #[test]
    fn every_batch_leaves_the_store_of_its_events(sizes in proptest::collection::vec(40..400usize, 1..8)) {
        let history = history();
        fold_checking(&history, &sizes, |end, store| {
            let whole = fold(&history[..end], &[usize::MAX]);
            let differ: Vec<String> = whole
                .iter()
                .filter(|(k, v)| store.get(*k) != Some(*v))
                .map(|(k, _)| String::from_utf8_lossy(k).into_owned())
                .take(3)
                .collect();
            prop_assert!(differ.is_empty() && whole.len() == store.len(), "after event {}: {:?}", end, differ);
            Ok(())
        })?;
    }
}

/// Every counter says how many keys its list holds, and the lists hold what the state
/// says: a daemon's jobs, the moving jobs, each job's history.
#[test]
fn counters_and_indexes_agree_with_the_records() {
    let history = history();
    let store = fold(&history, &[97]);
    let mut counters = 0;
    for (k, v) in store.range(b"n\0".to_vec()..b"n\x01".to_vec()) {
        let listed = &k[2..];
        // A project's jobs are the records under its name.
        let listed = match listed.strip_prefix(&prefix(&["ix", "project"])[..]) {
            Some(project) => {
                let name = std::str::from_utf8(&project[..project.len() - 1]).unwrap();
                project_jobs(&ProjectId::new(name).unwrap())
            }
            None => listed.to_vec(),
        };
        let n = store.keys().filter(|key| key.starts_with(&listed)).count() as u64;
        assert_eq!(
            u64::from_be_bytes(v.as_slice().try_into().unwrap()),
            n,
            "counter of {:?}",
            String::from_utf8_lossy(&listed)
        );
        counters += 1;
    }
    let mut state = State::default();
    for (r, _) in &history {
        state.apply(&r.envelope.event);
    }
    let count = |p: &[&str]| {
        store.get(&counter_key(&prefix(p))).map_or(Some(0), |v| {
            Some(u64::from_be_bytes(v.as_slice().try_into().unwrap()))
        })
    };
    assert_eq!(count(&["job"]), Some(state.jobs.len() as u64));
    assert_eq!(count(&["daemon"]), Some(2));
    let d2 = &state.daemons[&DaemonId::new("d2:/h/").unwrap()];
    assert_eq!(
        count(&["ix", "daemon", "d2:/h/"]),
        Some(d2.jobs.len() as u64)
    );
    assert_eq!(count(&["ix", "moving"]), Some(u64::from(state.moving())));
    assert_eq!(state.moving(), 0, "every move ended");
    assert_eq!(count(&["move"]), Some(1));
    assert_eq!(count(&["ix", "move", "partly_failed"]), Some(1));
    assert_eq!(count(&["ix", "move", "in_progress"]), Some(0));
    // DAEMON_DOWN, DAEMON_UP and THEFT_FAILED: all listed; DAEMON_UP is a notice and
    // DAEMON_DOWN closed, so THEFT_FAILED alone is open.
    assert_eq!(count(&["ix", "alert", "all"]), Some(3));
    assert_eq!(count(&["ix", "alert", "open"]), Some(1));
    assert_eq!(
        count(&["ix", "alert", "kind", "THEFT_FAILED", "open"]),
        Some(1)
    );
    let d1 = &state.daemons[&DaemonId::new("d1:/h/").unwrap()];
    assert_eq!(
        count(&["ix", "daemon", "d1:/h/"]),
        Some(d1.jobs.len() as u64 + u64::from(state.moving()))
    );
    // Each history's length, in its job's or daemon's record, is what its keys and the
    // events say.
    let stored_length = |record: &[&str], history: &[&str]| {
        let v = store.get(&key(record)).expect("a record");
        let view: serde_json::Value = serde_json::from_slice(v).unwrap();
        let length = view["history_events"].as_u64().unwrap();
        let blocks = store
            .iter()
            .filter(|(k, _)| k.starts_with(&prefix(history)));
        let held: usize = blocks
            .map(|(k, v)| {
                let block = block_of_key(&prefix(history), k).expect("a block's key");
                unpack_seqs(block, v).expect("whole sequences").len()
            })
            .sum();
        assert_eq!(length, held as u64, "{record:?}");
        length
    };
    for job in state.jobs.keys() {
        let events = history
            .iter()
            .filter(|(r, _)| r.envelope.event.jobs().contains(&job))
            .count();
        let length = stored_length(&["job", job.as_str()], &["jh", job.as_str()]);
        assert_eq!(length, events as u64, "{job}");
    }
    for d in state.daemons.keys() {
        let events = history
            .iter()
            .filter(|(r, _)| r.envelope.event.daemons().contains(&d))
            .count();
        let length = stored_length(&["daemon", d.as_str()], &["dh", d.as_str()]);
        assert!(length > 0);
        assert_eq!(length, events as u64, "{d}");
    }
    assert!(counters > 10, "{counters} counters");
}

/// Folds `history` up to `stop` into a real store, loads the views back from it as a
/// restarted projector does, folds the rest, and says how the store differs from one fold
/// of every event.
fn restart_at(history: &[(Recorded, Vec<u8>)], stop: usize) -> Vec<String> {
    use handoff_projector::{SledStore, ViewStore};
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    for part in [&history[..stop], &history[stop..]] {
        // A fresh start each time: the views are only what the store holds.
        let mut views = Views::load(&store).unwrap();
        for (r, payload) in part {
            views.apply(r, payload);
        }
        let mut changes = Vec::new();
        views.drain(&mut changes);
        let seq = part.last().map_or(0, |(r, _)| r.seq);
        store
            .commit(handoff_projector::views::encode(changes), seq)
            .unwrap();
    }
    let whole = fold(history, &[usize::MAX]);
    let stored: BTreeMap<Vec<u8>, Vec<u8>> = store
        .scan(b"")
        .unwrap()
        .into_iter()
        .filter(|(k, _)| !k.starts_with(b"meta\0"))
        .collect();
    let mut differ: Vec<String> = whole
        .iter()
        .filter(|(k, v)| stored.get(*k) != Some(*v))
        .chain(stored.iter().filter(|(k, _)| !whole.contains_key(*k)))
        .map(|(k, _)| String::from_utf8_lossy(k).into_owned())
        .take(3)
        .collect();
    differ.dedup();
    differ
}

/// A projector that stops at the edges of a block of histories, or anywhere (below), and
/// loads its views back from its store, then folds the rest, leaves the store one fold of
/// every event leaves: what the views keep in memory (the state, counters, histories'
/// lengths and open block, moves in progress, the last chunk of events) comes back whole
/// from the records.
#[test]
fn a_restart_at_a_block_edge_folds_on_as_one_fold() {
    let history = history();
    let edge = (HISTORY_BLOCK - FIRST_SEQ) as usize;
    assert_eq!(history[edge].0.seq, HISTORY_BLOCK);
    for stop in [1, edge - 1, edge, edge + 1, edge + 2, history.len() - 1] {
        let differ = restart_at(&history, stop);
        assert!(differ.is_empty(), "stopped after {stop}: {differ:?}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(8))]

    #[test]
    fn a_restart_anywhere_folds_on_as_one_fold(stop in 1..1500usize) {
        let differ = restart_at(&history(), stop);
        prop_assert!(differ.is_empty(), "stopped after {}: {:?}", stop, differ);
    }
}

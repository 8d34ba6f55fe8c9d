//! The views are a function of the events alone: however the events are cut into
//! batches (a live projector commits small ones, a rebuild large ones), the store ends up
//! with the same keys and values.

use std::collections::BTreeMap;

use handoff_domain::command::*;
use handoff_domain::model::{DaemonSettings, Deployment, JobSize, Shard};
use handoff_domain::{decide, Actor, Command, CommandId, Context, DaemonId, ProjectId, State};
use handoff_eventlog::Recorded;
use handoff_projector::views::{counter_key, prefix};
use handoff_projector::Views;
use handoff_protocol::EventEnvelope;
use proptest::prelude::*;

/// A history of about 1,500 events: a daemon with 750 jobs, moved away, so
/// event chunks and a daemon's history chunks both fill up.
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
    // Then ten of the moved jobs complete their move: they leave the moving list.
    let move_id = CommandId::new(format!("01J{:023}", commands.len() - 1)).unwrap();
    let completions = (0..10).map(|i| {
        let job = handoff_domain::JobId::new(format!("p/c0/s{i}")).unwrap();
        Command::CompleteJobMove(CompleteJobMove {
            job,
            move_id: move_id.clone(),
            epoch: 0,
            head: Some(handoff_domain::model::HeadPoint {
                ts: "1:1".into(),
                checksum: "1-ab".into(),
            }),
        })
    });
    let commands: Vec<Command> = commands.into_iter().chain(completions).collect();
    for (n, command) in commands.iter().enumerate() {
        let mut command = command.clone();
        if let Command::CompleteJobMove(c) = &mut command {
            c.epoch = state.jobs[&c.job].epoch;
        }
        let command = &command;
        let ctx = Context {
            command: CommandId::new(format!("01J{:023}", n)).unwrap(),
            actor: actor.clone(),
            at_ms: n as u64,
        };
        let decision = decide(command, &ctx, &state).expect("the history is valid");
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
            let seq = out.len() as u64 + 1;
            out.push((
                Recorded {
                    seq,
                    subject: String::new(),
                    envelope,
                },
                payload,
            ));
        }
    }
    out
}

/// Folds the history in batches of the given sizes (cycled) into a map standing for the
/// store.
fn fold(history: &[(Recorded, Vec<u8>)], sizes: &[usize]) -> BTreeMap<Vec<u8>, Vec<u8>> {
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
    }
    store
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Any batching gives the store one batch of everything gives.
    #[test]
    fn any_batching_gives_the_same_store(sizes in proptest::collection::vec(1..400usize, 1..8)) {
        let history = history();
        assert!(history.len() > 1024, "the history crosses a history chunk");
        let whole = fold(&history, &[usize::MAX]);
        let batched = fold(&history, &sizes);
        prop_assert_eq!(whole.len(), batched.len());
        prop_assert!(whole == batched, "the store depends on the batching");
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
        let n = store.keys().filter(|key| key.starts_with(listed)).count() as u64;
        assert_eq!(
            u64::from_be_bytes(v.as_slice().try_into().unwrap()),
            n,
            "counter of {:?}",
            String::from_utf8_lossy(listed)
        );
        counters += 1;
    }
    let mut state = State::default();
    for (r, _) in &history {
        state.apply(&r.envelope.event);
    }
    let count = |p: &[&str]| {
        store
            .get(&counter_key(&prefix(p)))
            .map(|v| u64::from_be_bytes(v.as_slice().try_into().unwrap()))
    };
    assert_eq!(count(&["job"]), Some(state.jobs.len() as u64));
    assert_eq!(count(&["daemon"]), Some(2));
    let d2 = &state.daemons[&DaemonId::new("d2:/h/").unwrap()];
    assert_eq!(
        count(&["ix", "daemon", "d2:/h/"]),
        Some(d2.jobs.len() as u64)
    );
    assert_eq!(count(&["ix", "moving"]), Some(u64::from(state.moving())));
    assert!(
        state.moving() < state.jobs.len() as u32,
        "some moves completed"
    );
    let d1 = &state.daemons[&DaemonId::new("d1:/h/").unwrap()];
    assert_eq!(
        count(&["ix", "daemon", "d1:/h/"]),
        Some(d1.jobs.len() as u64 + u64::from(state.moving()))
    );
    let job = state.jobs.keys().next().unwrap();
    let events = history
        .iter()
        .filter(|(r, _)| r.envelope.event.jobs().contains(&job))
        .count();
    assert_eq!(count(&["jh", job.as_str()]), Some(events as u64));
    assert!(counters > 10, "{counters} counters");
}

//! The views are a function of the events alone: however the events are cut into
//! batches (a live projector commits small ones, a rebuild large ones), the store ends up
//! with the same keys and values.

use std::collections::BTreeMap;

use handoff_domain::command::*;
use handoff_domain::model::{DaemonSettings, Deployment, JobSize, Shard};
use handoff_domain::{decide, Actor, Command, CommandId, Context, DaemonId, ProjectId, State};
use handoff_eventlog::Recorded;
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
    for (n, command) in commands.iter().enumerate() {
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

//! `schemas/` agrees with the code: the files are exactly what the types generate, and
//! real requests, events and replies validate against them.

use std::collections::BTreeSet;
use std::path::PathBuf;

use handoff_domain::command::*;
use handoff_domain::ids::DeploymentName;
use handoff_domain::model::{DaemonSettings, Deployment, JobSize};
use handoff_domain::{
    decide, Actor, Command, CommandId, Context, DaemonId, JobId, ProjectId, State,
};
use handoff_protocol::api::{encode_request, endpoint_of, AppendedEvent, Applied};
use handoff_protocol::{schemas, ErrorBody, EventEnvelope, Reply};
use serde_json::Value;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../schemas")
}

fn schema(path: &str) -> Value {
    let text =
        std::fs::read_to_string(dir().join(path)).unwrap_or_else(|e| panic!("schemas/{path}: {e}"));
    serde_json::from_str(&text).expect("a schema file is JSON")
}

fn assert_valid(path: &str, instance: &Value) {
    let validator = jsonschema::validator_for(&schema(path)).expect("a valid schema");
    let errors: Vec<String> = validator
        .iter_errors(instance)
        .map(|e| format!("{e} at {}", e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "{instance} does not match schemas/{path}: {errors:?}"
    );
}

/// The files under `schemas/` are exactly the generated schemas: none missing, none
/// stale, none different. `UPDATE_SCHEMAS=1` rewrites them.
#[test]
fn schema_files_match_the_code() {
    let update = std::env::var_os("UPDATE_SCHEMAS").is_some();
    let mut expected = BTreeSet::new();
    for (path, schema) in schemas::all() {
        let generated = serde_json::to_value(&schema).expect("schemas serialize");
        let file = dir().join(&path);
        if update {
            std::fs::create_dir_all(file.parent().expect("a parent"))
                .expect("schemas/ is writable");
            let text = serde_json::to_string_pretty(&generated).expect("json") + "\n";
            std::fs::write(&file, text).expect("schemas/ is writable");
        }
        let on_disk: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap_or_else(|_| {
            panic!("schemas/{path} is missing: run UPDATE_SCHEMAS=1 cargo test -p handoff-protocol --test schemas")
        }))
        .expect("json");
        assert_eq!(on_disk, generated, "schemas/{path} is out of date: run UPDATE_SCHEMAS=1 cargo test -p handoff-protocol --test schemas");
        expected.insert(path);
    }
    let mut found = BTreeSet::new();
    for sub in ["", "commands", "queries"] {
        for entry in std::fs::read_dir(dir().join(sub)).expect("schemas/ exists") {
            let entry = entry.expect("readable");
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".json") {
                found.insert(if sub.is_empty() {
                    name
                } else {
                    format!("{sub}/{name}")
                });
            }
        }
    }
    let stale: Vec<_> = found.difference(&expected).collect();
    assert!(
        stale.is_empty(),
        "schemas with no type behind them: {stale:?}"
    );
}

fn key() -> handoff_domain::UserKey {
    handoff_protocol::auth::Credentials::generate(Actor::new("k").unwrap(), None).public_key()
}

fn d(n: u8) -> DaemonId {
    DaemonId::new(format!("backup{n}.example.net:/data/backup/")).unwrap()
}

fn id(n: u8) -> CommandId {
    CommandId::new(format!("01J{:023}", n)).unwrap()
}

/// A small story: every command kind, decided for real, with its events.
fn story() -> Vec<(CommandId, Command)> {
    let p = ProjectId::new("p1").unwrap();
    let size = JobSize {
        head_size_bytes: 10,
        oplog_bytes_per_hour: 1,
    };
    let settings = DaemonSettings {
        head_space_bytes: 1000,
        ..DaemonSettings::default()
    };
    let job = JobId::new("p1/rs0").unwrap();
    let commands = vec![
        Command::RegisterDaemon(RegisterDaemon {
            daemon: d(1),
            settings: settings.clone(),
        }),
        Command::ConfigureProject(ConfigureProject {
            project: p.clone(),
            daemon_filter: vec![],
            label_filter: vec![],
        }),
        Command::CreateBackupJobs(CreateBackupJobs {
            project: p.clone(),
            deployment: Deployment::ReplicaSet {
                name: DeploymentName::new("rs0").unwrap(),
                size,
            },
        }),
        Command::CreateBackupJobs(CreateBackupJobs {
            project: p.clone(),
            deployment: Deployment::ShardedCluster {
                name: DeploymentName::new("c1").unwrap(),
                shards: vec![handoff_domain::model::Shard {
                    name: DeploymentName::new("s0").unwrap(),
                    size,
                }],
                config_servers: size,
            },
        }),
        Command::RegisterDaemon(RegisterDaemon {
            daemon: d(2),
            settings: settings.clone(),
        }),
        Command::ConfigureDaemon(ConfigureDaemon {
            daemon: d(2),
            settings,
        }),
        Command::ReportDaemonLiveness(ReportDaemonLiveness {
            daemon: d(1),
            up: false,
        }),
        Command::MoveJob(MoveJob {
            job: job.clone(),
            to: d(2),
            reason: Some("lost".into()),
            dry_run: false,
        }),
        Command::ReportJobMovePhase(ReportJobMovePhase {
            job: job.clone(),
            move_id: id(8),
            epoch: 2,
            phase: handoff_domain::model::MovePhase::RestoringSnapshot,
        }),
        Command::FailJobMove(FailJobMove {
            job: job.clone(),
            move_id: id(8),
            epoch: 2,
            reason: "snapshot missing".into(),
        }),
        Command::MoveJobs(MoveJobs {
            from: d(1),
            to: d(2),
            reason: None,
            dry_run: false,
        }),
        Command::CompleteJobMove(CompleteJobMove {
            head: Some(handoff_domain::model::HeadPoint {
                ts: "1700000000:7".into(),
                checksum: "120-9f3a00c1".into(),
            }),
            job: job.clone(),
            move_id: id(11),
            epoch: 4,
        }),
        Command::ResizeOplogTtl(ResizeOplogTtl {
            job,
            previous_hours: 24,
            hours: 27,
            reason: "a head still needs entries from 23 h ago".into(),
        }),
        Command::ReportDaemonLiveness(ReportDaemonLiveness {
            daemon: d(1),
            up: true,
        }),
        Command::RegisterDaemon(RegisterDaemon {
            daemon: d(3),
            settings: DaemonSettings::default(),
        }),
        Command::RemoveDaemon(RemoveDaemon { daemon: d(3) }),
        Command::AddUser(AddUser {
            user: Actor::new("alice").unwrap(),
            roles: vec![handoff_domain::auth::Role::GlobalOwner],
            key: key(),
            daemon: None,
        }),
        Command::AddUser(AddUser {
            user: Actor::new("daemon-3").unwrap(),
            roles: vec![handoff_domain::auth::Role::BackupDaemon],
            key: handoff_protocol::auth::Credentials::generate(Actor::new("x").unwrap(), None)
                .public_key(),
            daemon: Some(d(3)),
        }),
        Command::RemoveUser(RemoveUser {
            user: Actor::new("daemon-3").unwrap(),
        }),
    ];
    commands
        .into_iter()
        .enumerate()
        .map(|(i, c)| (id(i as u8 + 1), c))
        .collect()
}

/// Every command request, every event and every reply of a real story validates against
/// its schema.
#[test]
fn real_messages_match_their_schemas() {
    let actor = Actor::new("admin").unwrap();
    let mut state = State::default();
    let mut kinds = BTreeSet::new();
    for (n, (command_id, command)) in story().into_iter().enumerate() {
        let request: Value =
            serde_json::from_slice(&encode_request(&command_id, &actor, &command)).unwrap();
        assert_valid(
            &format!("commands/{}.json", endpoint_of(&command)),
            &request,
        );
        let ctx = Context {
            command: command_id.clone(),
            actor: actor.clone(),
            at_ms: n as u64,
        };
        let decision = decide(&command, &ctx, &state)
            .unwrap_or_else(|r| panic!("{} refused: {r}", command.name()));
        let mut appended = vec![];
        for (i, event) in decision.events().enumerate() {
            state.apply(event);
            kinds.insert(event.type_name());
            let envelope = EventEnvelope {
                event: event.clone(),
                version: handoff_domain::Event::VERSION,
                command: command_id.clone(),
                actor: actor.clone(),
                at: n as u64,
                last: i == 0,
                digest: "0123456789abcdef".into(),
                signature: Some("fedcba9876543210".into()),
            };
            assert_valid(
                "event.json",
                &serde_json::from_slice(&envelope.encode()).unwrap(),
            );
            appended.push(AppendedEvent {
                seq: i as u64 + 1,
                subject: "handoff.evt.x".into(),
                kind: event.type_name().into(),
            });
        }
        let reply = Reply::Ok(Applied {
            command: command_id,
            events: appended,
            duplicate: false,
            dry_run: false,
            plan: decision.plan,
        });
        assert_valid("reply.json", &serde_json::to_value(&reply).unwrap());
    }
    // The command service's own event: a refused request.
    let refusal = EventEnvelope {
        event: handoff_domain::Event::CommandRefused {
            refusal: id(98),
            user: Actor::new("mallory").unwrap(),
            command: "MoveJobs".into(),
            command_id: id(97),
            reason: "bad_signature".into(),
            message: "the signature does not match".into(),
            client: Some("handoff-cli 0.1.0 on host".into()),
        },
        version: handoff_domain::Event::VERSION,
        command: id(98),
        actor: Actor::new("handoff").unwrap(),
        at: 1,
        last: true,
        digest: "bootstrap".into(),
        signature: None,
    };
    assert_valid(
        "event.json",
        &serde_json::from_slice(&refusal.encode()).unwrap(),
    );
    kinds.insert("CommandRefused");
    // The answers the command service records: a command's first unit holds its
    // CommandAccepted, a rejection is recorded as CommandRejected.
    for (event, command) in [
        (
            handoff_domain::Event::CommandAccepted { command_id: id(96) },
            id(96),
        ),
        (
            handoff_domain::Event::CommandRejected {
                command_id: id(95),
                command: "MoveJob".into(),
                rejection: handoff_domain::Rejection::DestinationDown { daemon: d(2) },
            },
            id(94),
        ),
    ] {
        kinds.insert(event.type_name());
        let envelope = EventEnvelope {
            event,
            version: handoff_domain::Event::VERSION,
            command,
            actor: Actor::new("alice").unwrap(),
            at: 1,
            last: true,
            digest: "0123456789abcdef".into(),
            signature: Some("fedcba9876543210".into()),
        };
        assert_valid(
            "event.json",
            &serde_json::from_slice(&envelope.encode()).unwrap(),
        );
        let decoded = EventEnvelope::decode(&envelope.encode()).unwrap();
        assert_eq!(decoded.event, envelope.event, "round trip");
    }
    assert_eq!(
        kinds.len(),
        20,
        "the story covers every event type: {kinds:?}"
    );
    let refused = decide(
        &Command::MoveJobs(MoveJobs {
            from: d(2),
            to: d(2),
            reason: None,
            dry_run: false,
        }),
        &Context {
            command: id(99),
            actor,
            at_ms: 0,
        },
        &state,
    )
    .unwrap_err();
    assert_valid(
        "reply.json",
        &serde_json::to_value(Reply::Error(ErrorBody::from(refused))).unwrap(),
    );
}

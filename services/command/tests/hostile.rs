//! Hostile input, generated: random bytes and valid requests of every endpoint mutated
//! (fields removed, wrong types, control and subject-unsafe characters, negative and huge
//! numbers, unknown fields, oversize bodies). Each is screened by the command service's
//! own `screen`, then decided on a real fleet state. Nothing panics, every refusal is a
//! specific validation error or a domain rejection, and no input is an internal error.

use std::sync::atomic::{AtomicUsize, Ordering};

use handoff_command::screen;
use handoff_domain::command::*;
use handoff_domain::model::{DaemonSettings, Deployment, JobSize, MovePhase};
use handoff_domain::{
    decide, Actor, Command, CommandId, Context, DaemonId, JobId, ProjectId, State,
};
use handoff_protocol::api::{encode_request, endpoint_of, ENDPOINTS};
use handoff_protocol::ErrorCode;
use proptest::prelude::*;
use serde_json::Value;

static TRIED: AtomicUsize = AtomicUsize::new(0);
static DECIDED: AtomicUsize = AtomicUsize::new(0);

fn d(n: u8) -> DaemonId {
    DaemonId::new(format!("backup{n}.example.net:/data/backup/")).unwrap()
}

fn id(n: u8) -> CommandId {
    CommandId::new(format!("01J{:023}", n)).unwrap()
}

fn settings() -> DaemonSettings {
    DaemonSettings {
        head_space_bytes: 100 << 30,
        num_workers: 2,
        ..DaemonSettings::default()
    }
}

/// A valid request of every endpoint.
fn samples() -> Vec<Command> {
    let job = JobId::new("p1/rs0").unwrap();
    let size = JobSize {
        head_size_bytes: 1 << 30,
        oplog_bytes_per_hour: 1,
    };
    vec![
        Command::RegisterDaemon(RegisterDaemon {
            daemon: d(9),
            settings: settings(),
        }),
        Command::ConfigureDaemon(ConfigureDaemon {
            daemon: d(1),
            settings: settings(),
        }),
        Command::RemoveDaemon(RemoveDaemon { daemon: d(3) }),
        Command::ReportDaemonLiveness(ReportDaemonLiveness {
            daemon: d(1),
            up: false,
        }),
        Command::ConfigureProject(ConfigureProject {
            project: ProjectId::new("p2").unwrap(),
            daemon_filter: vec![d(1)],
            label_filter: vec![],
        }),
        Command::CreateBackupJobs(CreateBackupJobs {
            project: ProjectId::new("p1").unwrap(),
            deployment: Deployment::ReplicaSet {
                name: handoff_domain::ids::DeploymentName::new("rs9").unwrap(),
                size,
            },
        }),
        Command::MoveJobs(MoveJobs {
            from: d(1),
            to: d(2),
            reason: Some("lost".into()),
            dry_run: false,
        }),
        Command::MoveJob(MoveJob {
            job: job.clone(),
            to: d(2),
            reason: None,
            dry_run: true,
        }),
        Command::ReportJobMovePhase(ReportJobMovePhase {
            job: job.clone(),
            move_id: id(1),
            epoch: 2,
            phase: MovePhase::ReplayingOplog,
        }),
        Command::CompleteJobMove(CompleteJobMove {
            job: job.clone(),
            move_id: id(1),
            epoch: 2,
            head: Some(handoff_domain::model::HeadPoint {
                ts: "1:2".into(),
                checksum: "3-ff".into(),
            }),
        }),
        Command::FailJobMove(FailJobMove {
            job: job.clone(),
            move_id: id(1),
            epoch: 2,
            reason: "snapshot missing".into(),
        }),
        Command::SpreadJobs(SpreadJobs {
            from: d(1),
            to: vec![d(2), d(3)],
            reason: Some("rebalance".into()),
            dry_run: false,
        }),
        Command::CancelMove(CancelMove {
            move_id: id(1),
            reason: "not during the sale".into(),
        }),
        Command::DrainDaemon(DrainDaemon {
            daemon: d(1),
            max_concurrent: 2,
            reason: Some("retiring the host".into()),
            dry_run: false,
        }),
        Command::ContinueDrain(ContinueDrain {
            daemon: d(1),
            drain_id: id(2),
        }),
        Command::CancelDrain(CancelDrain {
            daemon: d(1),
            reason: "peak hours".into(),
        }),
        Command::ReportHeadSpace(ReportHeadSpace {
            daemon: d(1),
            threshold_percent: 10,
        }),
        Command::ReportMoveStuck(ReportMoveStuck {
            job: job.clone(),
            move_id: id(1),
            idle_ms: 60_000,
        }),
        Command::ReportFailoverGuard(ReportFailoverGuard {
            max_down_percent: 50,
        }),
        Command::FailoverJob(FailoverJob {
            job: job.clone(),
            from: d(1),
            down_for_ms: 60_000,
            delay_ms: 60_000,
            max_concurrent_rebuilds: 2,
            max_down_percent: 50,
        }),
        Command::ResizeOplogTtl(ResizeOplogTtl {
            job,
            previous_hours: 24,
            hours: 27,
            reason: "a head needs it".into(),
        }),
        Command::AddUser(AddUser {
            user: Actor::new("alice").unwrap(),
            roles: vec![handoff_domain::auth::Role::GlobalBackupAdmin],
            key: handoff_domain::UserKey::new(format!("U{}", "B".repeat(55))).unwrap(),
            daemon: None,
        }),
        Command::RemoveUser(RemoveUser {
            user: Actor::new("alice").unwrap(),
        }),
    ]
}

/// Daemons 1-3, project p1 with a replica set on daemon 1.
fn fleet() -> State {
    let mut state = State::default();
    let mut run = |n: u8, c: Command| {
        let ctx = Context {
            command: id(100 + n),
            actor: Actor::new("admin").unwrap(),
            at_ms: 1,
        };
        let decision = decide(&c, &ctx, &state).expect("the fleet builds");
        for e in decision.events() {
            state.apply(e);
        }
    };
    run(
        1,
        Command::RegisterDaemon(RegisterDaemon {
            daemon: d(1),
            settings: settings(),
        }),
    );
    run(
        2,
        Command::ConfigureProject(ConfigureProject {
            project: ProjectId::new("p1").unwrap(),
            daemon_filter: vec![],
            label_filter: vec![],
        }),
    );
    run(3, samples().swap_remove(5));
    run(
        4,
        Command::CreateBackupJobs(CreateBackupJobs {
            project: ProjectId::new("p1").unwrap(),
            deployment: Deployment::ReplicaSet {
                name: handoff_domain::ids::DeploymentName::new("rs0").unwrap(),
                size: JobSize {
                    head_size_bytes: 1 << 30,
                    oplog_bytes_per_hour: 1,
                },
            },
        }),
    );
    run(
        5,
        Command::RegisterDaemon(RegisterDaemon {
            daemon: d(2),
            settings: settings(),
        }),
    );
    run(
        6,
        Command::RegisterDaemon(RegisterDaemon {
            daemon: d(3),
            settings: settings(),
        }),
    );
    state
}

/// Values a hostile client would try in place of any field.
fn hostile_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        Just(Value::Bool(true)),
        Just(serde_json::json!(-1)),
        Just(serde_json::json!(0)),
        Just(serde_json::json!(u64::MAX)),
        Just(serde_json::json!(1e308)),
        Just(serde_json::json!("")),
        Just(serde_json::json!("a\u{0000}b")),
        Just(serde_json::json!("x.>")),
        Just(serde_json::json!("*")),
        Just(serde_json::json!("backup1.example.net:/data/backup/")),
        Just(serde_json::json!("p1/rs0\n")),
        Just(serde_json::json!("x".repeat(5000))),
        Just(serde_json::json!([])),
        Just(serde_json::json!({})),
        Just(
            serde_json::from_str::<Value>(&format!("{}1{}", "[".repeat(100), "]".repeat(100)))
                .unwrap()
        ),
        "\\PC{0,40}".prop_map(Value::String),
        any::<i64>().prop_map(|n| serde_json::json!(n)),
    ]
}

#[derive(Clone, Debug)]
enum Mutation {
    Remove,
    Replace(Value),
    AddUnknown(Value),
}

/// Well-formed values that name the wrong things: unknown, removed or the same daemons,
/// other jobs, zero and huge sizes, old epochs. These reach the domain's checks.
fn plausible_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        (1u8..10).prop_map(|n| serde_json::json!(d(n))),
        prop::sample::select(vec!["p1/rs0", "p1/rs9", "p9/x", "p1/c/s0"])
            .prop_map(|j| serde_json::json!(j)),
        prop::sample::select(vec![0u64, 1, 2, 3, 1 << 40, 1 << 62, u64::MAX])
            .prop_map(|n| serde_json::json!(n)),
        any::<bool>().prop_map(Value::Bool),
        (1u8..5).prop_map(|n| serde_json::json!(id(n))),
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        1 => Just(Mutation::Remove),
        2 => hostile_value().prop_map(Mutation::Replace),
        1 => hostile_value().prop_map(Mutation::AddUnknown),
        4 => plausible_value().prop_map(Mutation::Replace),
    ]
}

/// Applies `m` at the object reached by following `path` (indices into keys).
fn mutate(v: &mut Value, path: &[usize], m: &Mutation) {
    let Value::Object(map) = v else {
        if let Mutation::Replace(x) = m {
            *v = x.clone();
        }
        return;
    };
    if map.is_empty() {
        return;
    }
    let key = map
        .keys()
        .nth(path.first().copied().unwrap_or(0) % map.len())
        .cloned()
        .unwrap();
    let child_is_object = map.get(&key).is_some_and(Value::is_object);
    if path.len() > 1 && child_is_object {
        return mutate(map.get_mut(&key).unwrap(), &path[1..], m);
    }
    match m {
        Mutation::Remove => {
            map.remove(&key);
        }
        Mutation::Replace(x) => {
            map.insert(key, x.clone());
        }
        Mutation::AddUnknown(x) => {
            map.insert("sudo".into(), x.clone());
        }
    }
}

fn check(endpoint: usize, payload: &[u8], state: &State) -> Result<(), TestCaseError> {
    TRIED.fetch_add(1, Ordering::Relaxed);
    let ep = &ENDPOINTS[endpoint];
    match screen(ep, payload) {
        Err(e) => {
            prop_assert_eq!(e.code, ErrorCode::Validation);
            prop_assert!(
                matches!(e.reason.as_str(), "malformed" | "too_large" | "invalid"),
                "{}",
                e.reason
            );
            prop_assert!(!e.message.is_empty());
        }
        Ok(request) => {
            prop_assert_eq!(endpoint_of(&request.command), ep.name);
            DECIDED.fetch_add(1, Ordering::Relaxed);
            let ctx = Context {
                command: request.id.clone(),
                actor: request.actor.clone(),
                at_ms: 2,
            };
            // A domain answer either way; never a panic.
            if let Err(r) = decide(&request.command, &ctx, state) {
                prop_assert!(!r.to_string().is_empty());
            }
        }
    }
    Ok(())
}

/// Valid requests of every endpoint mutated up to three times, and arbitrary bytes on any
/// endpoint: every one gets a specific answer. Prints how many were tried.
#[test]
fn hostile_requests_get_a_specific_answer_and_never_an_internal_error() {
    use proptest::test_runner::{Config, TestRunner};
    let state = fleet();
    let config = Config {
        cases: 3000,
        failure_persistence: None,
        ..Config::default()
    };
    let mut runner = TestRunner::new(config.clone());
    let mutated = (
        0..samples().len(),
        proptest::collection::vec(
            (proptest::collection::vec(0usize..8, 1..4), mutation()),
            1..4,
        ),
    );
    runner
        .run(&mutated, |(which, mutations)| {
            let command = &samples()[which];
            let endpoint = ENDPOINTS
                .iter()
                .position(|e| e.name == endpoint_of(command))
                .unwrap();
            let mut v: Value = serde_json::from_slice(&encode_request(
                &id(7),
                &Actor::new("admin").unwrap(),
                command,
            ))
            .unwrap();
            for (path, m) in &mutations {
                mutate(&mut v, path, m);
            }
            check(endpoint, &serde_json::to_vec(&v).unwrap(), &state)
        })
        .unwrap();
    let mut runner = TestRunner::new(config);
    runner
        .run(
            &(
                0..samples().len(),
                proptest::collection::vec(any::<u8>(), 0..300),
            ),
            |(endpoint, bytes)| check(endpoint, &bytes, &state),
        )
        .unwrap();
    for ep in ENDPOINTS {
        TRIED.fetch_add(1, Ordering::Relaxed);
        let e = screen(ep, &vec![b'{'; 65 * 1024]).unwrap_err();
        assert_eq!(
            (e.code, e.reason.as_str()),
            (ErrorCode::Validation, "too_large")
        );
    }
    assert_eq!(
        ENDPOINTS.len(),
        samples().len(),
        "a sample for every endpoint"
    );
    let (tried, decided) = (
        TRIED.load(Ordering::Relaxed),
        DECIDED.load(Ordering::Relaxed),
    );
    assert!(
        decided > 100,
        "the mutations should also reach the domain's checks ({decided})"
    );
    println!("{tried} hostile inputs tried: {} refused as malformed or too large, {decided} well formed and decided by the domain", tried - decided);
}

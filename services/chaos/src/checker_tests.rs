//! The checker's rules, each broken by a history made for it.

use super::*;
use handoff_domain::event::{AssignedJob, AssignmentCause};
use handoff_domain::Actor;
use handoff_protocol::{subjects, EventEnvelope};

fn id(n: u32) -> CommandId {
    CommandId::new(format!("01J{n:023}")).unwrap()
}

fn daemon(n: u32) -> DaemonId {
    DaemonId::new(format!("d{n}.example.net:/heads/")).unwrap()
}

fn job() -> JobId {
    JobId::new("p/rs1").unwrap()
}

fn rec(seq: u64, command: u32, event: Event, at: u64) -> Recorded {
    Recorded {
        seq,
        subject: subjects::aggregate(&event.aggregate()),
        envelope: EventEnvelope {
            event,
            version: 1,
            command: id(command),
            actor: Actor::new("admin").unwrap(),
            at,
            last: true,
            digest: String::new(),
            signature: None,
        },
    }
}

fn assigned(d: u32, epoch: u64) -> Event {
    Event::JobsAssigned {
        daemon: daemon(d),
        cause: AssignmentCause::Placement,
        jobs: vec![AssignedJob { job: job(), epoch }],
    }
}

fn released(d: u32) -> Event {
    Event::JobsReleased {
        daemon: daemon(d),
        move_id: id(9),
        jobs: vec![job()],
    }
}

fn op(command: u32, outcome: Outcome) -> Op {
    Op {
        client: 0,
        id: id(command),
        command: "MoveJob",
        outcome,
    }
}

/// Applied with the events the stream holds: fine; a refused command with events, an
/// applied one whose events differ, and an event appended twice are each reported.
#[test]
fn rule_1_catches_refused_but_stored_and_doubles() {
    let events = vec![rec(1, 1, assigned(1, 1), 0), rec(2, 2, released(1), 0)];
    let ok = [op(1, Outcome::Applied { seqs: vec![1] })];
    assert!(commands(&ok, &events).is_empty());
    let refused = [op(2, Outcome::Refused { reason: "x".into() })];
    assert_eq!(commands(&refused, &events).len(), 1);
    let wrong = [op(1, Outcome::Applied { seqs: vec![1, 2] })];
    assert_eq!(commands(&wrong, &events).len(), 1);
    let unknown = [op(2, Outcome::Unknown { why: "t".into() })];
    assert!(commands(&unknown, &events).is_empty());
    let twice = vec![rec(1, 1, assigned(1, 1), 0), rec(2, 1, assigned(1, 1), 0)];
    assert_eq!(commands(&[], &twice).len(), 1);
}

/// A drain's steps decided in turn keep its limit; a step decided on a state that
/// missed the move before it starts one more than the limit, and is reported.
#[test]
fn rule_8_catches_a_drain_over_its_limit() {
    use handoff_domain::command::*;
    use handoff_domain::ids::DeploymentName;
    use handoff_domain::model::{DaemonSettings, Deployment, JobSize};
    use handoff_domain::{decide, Command, Context, ProjectId};
    let settings = DaemonSettings {
        head_space_bytes: 100 << 30,
        num_workers: 2,
        ..DaemonSettings::default()
    };
    let mut state = State::default();
    let mut events = Vec::new();
    let run = |events: &mut Vec<Recorded>, state: &mut State, n: u32, c: Command, apply: bool| {
        let ctx = Context {
            command: id(n),
            actor: Actor::new("admin").unwrap(),
            at_ms: 1,
        };
        let decision = decide(&c, &ctx, state).expect("accepted");
        for e in decision.events() {
            if apply {
                state.apply(e);
            }
            events.push(rec(events.len() as u64 + 1, n, e.clone(), 1));
        }
    };
    let project = ProjectId::new("p").unwrap();
    let register = |n| {
        Command::RegisterDaemon(RegisterDaemon {
            daemon: daemon(n),
            settings: settings.clone(),
        })
    };
    run(&mut events, &mut state, 1, register(1), true);
    run(
        &mut events,
        &mut state,
        2,
        Command::ConfigureProject(ConfigureProject {
            project: project.clone(),
            daemon_filter: vec![],
            label_filter: vec![],
        }),
        true,
    );
    for (n, name) in [(3, "rs1"), (4, "rs2")] {
        let deployment = Deployment::ReplicaSet {
            name: DeploymentName::new(name).unwrap(),
            size: JobSize {
                head_size_bytes: 1 << 30,
                oplog_bytes_per_hour: 0,
            },
        };
        let c = Command::CreateBackupJobs(CreateBackupJobs {
            project: project.clone(),
            deployment,
        });
        run(&mut events, &mut state, n, c, true);
    }
    run(&mut events, &mut state, 5, register(2), true);
    run(
        &mut events,
        &mut state,
        6,
        Command::DrainDaemon(DrainDaemon {
            daemon: daemon(1),
            max_concurrent: 1,
            reason: None,
            dry_run: false,
        }),
        true,
    );
    let step = Command::ContinueDrain(ContinueDrain {
        daemon: daemon(1),
        drain_id: id(6),
    });
    let before = state.clone();
    run(&mut events, &mut state, 7, step.clone(), true);
    assert!(drains(&events).is_empty(), "{:?}", drains(&events));
    // Decided on the state before step 7: a second move while one runs.
    let mut stale = before;
    run(&mut events, &mut stale, 8, step, false);
    let found = drains(&events);
    assert!(found.iter().any(|v| v.rule == 8), "{found:?}");
}

/// A job assigned to a second daemon without a release of the first is held twice.
#[test]
fn rule_2_catches_two_holders() {
    let events = vec![rec(1, 1, assigned(1, 1), 0), rec(2, 2, assigned(2, 2), 0)];
    let found = owners(&events, &State::default());
    assert!(found.iter().any(|v| v.rule == 2), "{found:?}");
    let moved = vec![
        rec(1, 1, assigned(1, 1), 0),
        rec(2, 2, released(1), 0),
        rec(3, 2, assigned(2, 2), 0),
    ];
    assert!(owners(&moved, &State::default()).is_empty());
}

/// DAEMON_DOWN inside a silence the nemesis made is fine; outside it is reported.
#[test]
fn rule_7_catches_a_down_without_a_silence() {
    let down = |at| rec(1, 1, Event::DaemonDown { daemon: daemon(1) }, at);
    let silences = [Silence {
        daemon: 0,
        from_ms: 1_000,
        to_ms: 9_000,
    }];
    let daemons = [daemon(1)];
    // Silent from 1 s to 9 s; the threshold is 6 s.
    assert!(downs(&[down(7_000)], &daemons, &silences, 6_000, 500, &[]).is_empty());
    // Reported late, after the daemon came back: still earned.
    assert!(downs(&[down(20_000)], &daemons, &silences, 6_000, 500, &[]).is_empty());
    // Before the silence lasted the threshold, or long after it: not earned.
    assert_eq!(
        downs(&[down(3_000)], &daemons, &silences, 6_000, 500, &[]).len(),
        1
    );
    assert_eq!(
        downs(&[down(90_000)], &daemons, &silences, 6_000, 500, &[]).len(),
        1
    );
    // A silence shorter than the threshold earns none.
    let short = [Silence {
        daemon: 0,
        from_ms: 1_000,
        to_ms: 3_000,
    }];
    assert_eq!(
        downs(&[down(2_500)], &daemons, &short, 6_000, 500, &[]).len(),
        1
    );
}

/// A snapshot of an older epoch holding a later point than a newer epoch's is a
/// write by an owner that had lost the job.
#[test]
fn rule_5_catches_a_stale_snapshot() {
    let held: BTreeSet<_> = [(job(), daemon(1), 1), (job(), daemon(2), 2)].into();
    let s = |id: &str, t, epoch, d| Stored {
        id: id.into(),
        ts: (t, 0),
        epoch,
        daemon: Some(daemon(d)),
    };
    let fine = [s("a", 1, 1, 1), s("b", 2, 2, 2)];
    assert!(snapshots(&job(), &fine, &held).is_empty());
    let stale = [s("a", 1, 1, 1), s("b", 2, 2, 2), s("c", 3, 1, 1)];
    assert_eq!(snapshots(&job(), &stale, &held).len(), 1);
    let stranger = [s("a", 1, 2, 1)];
    assert_eq!(snapshots(&job(), &stranger, &held).len(), 1);
}

/// Views that differ in one key are reported; equal ones are not.
#[test]
fn rule_3_compares_key_for_key() {
    let a = vec![(b"k".to_vec(), b"1".to_vec())];
    let b = vec![(b"k".to_vec(), b"2".to_vec())];
    assert!(compare_views("p", &a, &a).is_empty());
    assert_eq!(compare_views("p", &a, &b).len(), 1);
}

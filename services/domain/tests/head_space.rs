//! Head space is counted in bytes of u64; a daemon's heads can add up to more than that
//! (a failed move returns a job to its source without a space check), so every sum of
//! head sizes is checked: a move whose heads cannot be counted is refused, never
//! accepted on a wrapped sum, and the state's `used_bytes` stays the exact sum or,
//! when that does not fit, `u64::MAX`.

mod common;

use std::collections::BTreeSet;

use common::*;
use handoff_domain::command::*;
use handoff_domain::event::{AssignedJob, AssignmentCause, Event};
use handoff_domain::ids::DeploymentName;
use handoff_domain::model::{DaemonSettings, JobSize, JobTarget, MoveScope, MAX_BYTES};
use handoff_domain::{decide, Command, Context, JobId, Rejection, State};
use proptest::prelude::*;

const HALF: u64 = MAX_BYTES / 2;

fn with_space(bytes: u64) -> DaemonSettings {
    DaemonSettings {
        head_space_bytes: bytes,
        ..DaemonSettings::default()
    }
}

fn half_job(name: &str) -> Command {
    Command::CreateBackupJobs(CreateBackupJobs {
        project: p("p"),
        deployment: handoff_domain::model::Deployment::ReplicaSet {
            name: DeploymentName::new(name).unwrap(),
            size: JobSize {
                head_size_bytes: HALF,
                oplog_bytes_per_hour: 0,
            },
        },
    })
}

/// Through commands alone: move every job of daemon 1 away, fill it with new jobs, fail
/// the moves (the jobs come back whatever the space), again and again, until its heads
/// add up to 2^64 bytes. A move of them all is then refused for want of space (a
/// wrapped sum of 0 would have passed the check; a debug build panicked).
#[test]
fn heads_that_add_up_past_u64_are_refused_a_move_not_summed_with_overflow() {
    let mut w = World::new();
    w.ok(register_with(1, with_space(MAX_BYTES)));
    w.ok(project("p"));
    let mut created = 0;
    let mut next_daemon = 2;
    loop {
        let held: Vec<JobId> = w.state.daemons[&d(1)].jobs.iter().cloned().collect();
        let mut moves = Vec::new();
        let mut helpers = Vec::new();
        for job in &held {
            // A destination with just enough room for one job: no placement picks it.
            w.ok(register_with(next_daemon, with_space(HALF + 1)));
            let plan = w.ok(move_job(job.as_str(), next_daemon)).plan.unwrap();
            moves.push((job.clone(), plan.move_id, plan.jobs[0].epoch));
            helpers.push(next_daemon);
            next_daemon += 1;
        }
        for _ in 0..2 {
            w.ok(half_job(&format!("rs{created}")));
            created += 1;
        }
        for (job, move_id, epoch) in moves {
            w.ok(Command::FailJobMove(FailJobMove {
                job,
                move_id,
                epoch,
                reason: "given up".into(),
            }));
        }
        for n in helpers {
            w.ok(Command::RemoveDaemon(RemoveDaemon { daemon: d(n) }));
        }
        if w.state.daemons[&d(1)].jobs.len() as u128 * u128::from(HALF) > u128::from(u64::MAX) {
            break;
        }
    }
    let held = w.state.daemons[&d(1)].jobs.len();
    assert_eq!(held, 32, "32 heads of 2^59 bytes: 2^64 bytes");
    assert_eq!(w.state.daemons[&d(1)].used_bytes, u64::MAX);
    w.ok(register_with(next_daemon, with_space(MAX_BYTES)));
    let before = w.state.clone();
    let r = w
        .run(move_jobs(1, next_daemon))
        .expect_err("2^64 bytes cannot fit in 2^60");
    assert!(
        matches!(r, Rejection::InsufficientHeadSpace { needed_bytes, .. } if needed_bytes == u64::MAX),
        "{r}"
    );
    assert_eq!(w.state, before);
}

fn ctx(n: u64) -> Context {
    Context {
        command: id(n),
        actor: handoff_domain::Actor::new("admin").unwrap(),
        at_ms: n,
    }
}

/// A state folded from events (the stream is the truth, whatever its numbers): daemon 1
/// with `space1` holding a job of each size, an empty daemon 2 with `space2`.
fn fleet_of(space1: u64, space2: u64, sizes: &[u64]) -> State {
    let mut state = State::default();
    let mut events = vec![
        Event::DaemonRegistered {
            daemon: d(1),
            settings: with_space(space1),
        },
        Event::DaemonRegistered {
            daemon: d(2),
            settings: with_space(space2),
        },
        Event::ProjectConfigured {
            project: p("p"),
            daemon_filter: BTreeSet::new(),
            label_filter: BTreeSet::new(),
        },
    ];
    for (i, size) in sizes.iter().enumerate() {
        let name = DeploymentName::new(format!("rs{i}")).unwrap();
        events.push(Event::BackupJobCreated {
            job: j(&format!("p/rs{i}")),
            project: p("p"),
            target: JobTarget::ReplicaSet { name },
            size: JobSize {
                head_size_bytes: *size,
                oplog_bytes_per_hour: 0,
            },
            daemon: d(1),
            epoch: 1,
        });
    }
    for e in &events {
        state.apply(e);
    }
    state
}

/// What the state must say a daemon uses: the exact sum, or `u64::MAX` when it does not
/// fit.
fn exact_used(state: &State, n: usize) -> u64 {
    let sum: u128 = state.daemons[&d(n)]
        .jobs
        .iter()
        .map(|j| u128::from(state.jobs[j].size.head_size_bytes))
        .sum();
    u64::try_from(sum).unwrap_or(u64::MAX)
}

fn size() -> impl Strategy<Value = u64> {
    prop_oneof![
        0..=MAX_BYTES,
        (u64::MAX / 4)..=u64::MAX,
        Just(u64::MAX),
        Just(MAX_BYTES),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Whatever the head sizes, a move of all of a daemon's jobs is accepted exactly
    /// when the destination has more free space than their exact sum, and never panics;
    /// `used_bytes` stays the exact sum (saturated), also after jobs move away from a
    /// daemon whose count had saturated.
    #[test]
    fn a_move_is_accepted_only_when_the_exact_sum_fits(
        sizes in proptest::collection::vec(size(), 1..24),
        space2 in prop_oneof![0..=u64::MAX, Just(u64::MAX)],
        away in 0usize..24,
    ) {
        let mut state = fleet_of(MAX_BYTES, space2, &sizes);
        prop_assert_eq!(state.daemons[&d(1)].used_bytes, exact_used(&state, 1));
        // Some jobs move away to daemon 3 and back: the count must follow exactly.
        let away = away.min(sizes.len());
        state.apply(&Event::DaemonRegistered { daemon: d(3), settings: with_space(u64::MAX) });
        let move_id = id(900);
        state.apply(&Event::MoveStarted {
            move_id: move_id.clone(),
            scope: MoveScope::AllJobsOf { daemon: d(1) },
            from: d(1),
            to: d(3),
            reason: None,
            jobs: away as u32,
            automatic: false,
            spread: None,
            drain: None,
        });
        for i in 0..away {
            state.apply(&Event::JobMoveStarted {
                job: j(&format!("p/rs{i}")),
                move_id: move_id.clone(),
                from: d(1),
                to: d(3),
                epoch: 2,
                reason: None,
            });
        }
        for n in [1, 3] {
            prop_assert_eq!(state.daemons[&d(n)].used_bytes, exact_used(&state, n));
        }
        for i in 0..away {
            let job = j(&format!("p/rs{i}"));
            state.apply(&Event::JobMoveFailed {
                job: job.clone(),
                move_id: move_id.clone(),
                reason: "given up".into(),
                returned_to: d(1),
                epoch: 3,
                cancelled: false,
            });
            state.apply(&Event::JobsAssigned {
                daemon: d(1),
                cause: AssignmentCause::MoveFailed { move_id: move_id.clone() },
                jobs: vec![AssignedJob { job, epoch: 3 }],
            });
        }
        for n in [1, 3] {
            prop_assert_eq!(state.daemons[&d(n)].used_bytes, exact_used(&state, n));
        }

        let needed: u128 = sizes.iter().map(|s| u128::from(*s)).sum();
        let free = u128::from(state.daemons[&d(2)].free_bytes());
        match decide(&move_jobs(1, 2), &ctx(1), &state) {
            Ok(decision) => {
                prop_assert!(free > needed, "accepted {} bytes into {} free", needed, free);
                let plan = decision.plan.expect("a plan");
                prop_assert_eq!(u128::from(plan.needed_bytes), needed);
            }
            Err(Rejection::InsufficientHeadSpace { needed_bytes, free_bytes, .. }) => {
                prop_assert!(free <= needed);
                prop_assert_eq!(u128::from(free_bytes), free);
                prop_assert_eq!(needed_bytes, u64::try_from(needed).unwrap_or(u64::MAX));
            }
            Err(other) => prop_assert!(false, "refused for another reason: {}", other),
        }
    }
}

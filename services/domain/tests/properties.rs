//! Properties of the domain over random command sequences (proptest): MISSION's
//! guarantees hold whatever operators and daemons send, in any order.

mod common;

use std::collections::BTreeMap;

use common::*;
use handoff_domain::command::*;
use handoff_domain::model::{HeadDiskType, MovePhase};
use handoff_domain::state::Assignment;
use handoff_domain::{
    decide, evolve, initial, Command, Context, Event, Label, State, MAX_EVENTS_PER_UNIT,
};
use proptest::prelude::*;

const DAEMONS: usize = 4;

/// One random step, resolved against the current state when it runs.
#[derive(Clone, Debug)]
enum Op {
    Register {
        daemon: usize,
        gib: u64,
        ssd: bool,
        label: bool,
    },
    Configure {
        daemon: usize,
        gib: u64,
        assignment: bool,
        label: bool,
    },
    Remove {
        daemon: usize,
    },
    Liveness {
        daemon: usize,
        up: bool,
    },
    Project {
        project: usize,
        label: bool,
        only: Option<usize>,
    },
    ReplicaSet {
        project: usize,
        name: u8,
        gib: u64,
    },
    Cluster {
        project: usize,
        name: u8,
        shards: usize,
    },
    MoveJobs {
        from: usize,
        to: usize,
        dry_run: bool,
    },
    MoveJob {
        job: usize,
        to: usize,
    },
    Phase {
        job: usize,
        phase: u8,
        stale: bool,
    },
    Complete {
        job: usize,
        stale: bool,
    },
    Fail {
        job: usize,
        stale: bool,
    },
    /// Cancels the move of the job (an unknown move when the job is not moving).
    Cancel {
        job: usize,
    },
    Drain {
        daemon: usize,
        max_concurrent: u32,
    },
    /// The next step of the daemon's drain (an unknown drain when it has none).
    DrainStep {
        daemon: usize,
    },
    CancelDrain {
        daemon: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let d = 0..DAEMONS;
    prop_oneof![
        (d.clone(), 1..200u64, any::<bool>(), any::<bool>()).prop_map(
            |(daemon, gib, ssd, label)| Op::Register {
                daemon,
                gib,
                ssd,
                label
            }
        ),
        (d.clone(), 1..200u64, any::<bool>(), any::<bool>()).prop_map(
            |(daemon, gib, assignment, label)| Op::Configure {
                daemon,
                gib,
                assignment,
                label
            }
        ),
        d.clone().prop_map(|daemon| Op::Remove { daemon }),
        (d.clone(), any::<bool>()).prop_map(|(daemon, up)| Op::Liveness { daemon, up }),
        (0..2usize, any::<bool>(), proptest::option::of(d.clone())).prop_map(
            |(project, label, only)| Op::Project {
                project,
                label,
                only
            }
        ),
        (0..2usize, 0..6u8, 1..40u64).prop_map(|(project, name, gib)| Op::ReplicaSet {
            project,
            name,
            gib
        }),
        (0..2usize, 0..3u8, 1..4usize).prop_map(|(project, name, shards)| Op::Cluster {
            project,
            name,
            shards
        }),
        (d.clone(), d.clone(), any::<bool>()).prop_map(|(from, to, dry_run)| Op::MoveJobs {
            from,
            to,
            dry_run
        }),
        (0..32usize, d.clone()).prop_map(|(job, to)| Op::MoveJob { job, to }),
        (0..32usize, 0..3u8, any::<bool>()).prop_map(|(job, phase, stale)| Op::Phase {
            job,
            phase,
            stale
        }),
        (0..32usize, any::<bool>()).prop_map(|(job, stale)| Op::Complete { job, stale }),
        (0..32usize, any::<bool>()).prop_map(|(job, stale)| Op::Fail { job, stale }),
        (0..32usize).prop_map(|job| Op::Cancel { job }),
        (d.clone(), 1..3u32).prop_map(|(daemon, max_concurrent)| Op::Drain {
            daemon,
            max_concurrent
        }),
        d.clone().prop_map(|daemon| Op::DrainStep { daemon }),
        d.clone().prop_map(|daemon| Op::DrainStep { daemon }),
        d.clone().prop_map(|daemon| Op::CancelDrain { daemon }),
    ]
}

fn daemon_settings(
    gib: u64,
    ssd: bool,
    label: bool,
    assignment: bool,
) -> handoff_domain::model::DaemonSettings {
    let mut s = hdd_ssd(
        gib,
        if ssd {
            HeadDiskType::Ssd
        } else {
            HeadDiskType::Hdd
        },
    );
    s.assignment_enabled = assignment;
    if label {
        s.labels.insert(Label::new("tier1").unwrap());
    }
    s
}

/// The job with index `i` among the existing ones, with its current move and epoch.
fn pick_job(
    state: &State,
    i: usize,
) -> Option<(
    handoff_domain::JobId,
    Option<handoff_domain::CommandId>,
    u64,
)> {
    if state.jobs.is_empty() {
        return None;
    }
    let (id, job) = state.jobs.iter().nth(i % state.jobs.len())?;
    let move_id = match &job.assignment {
        Assignment::Moving { move_id, .. } => Some(move_id.clone()),
        Assignment::Assigned { .. } => None,
    };
    Some((id.clone(), move_id, job.epoch))
}

fn to_command(op: &Op, state: &State) -> Option<Command> {
    Some(match op.clone() {
        Op::Register {
            daemon,
            gib,
            ssd,
            label,
        } => Command::RegisterDaemon(RegisterDaemon {
            daemon: d(daemon),
            settings: daemon_settings(gib, ssd, label, true),
        }),
        Op::Configure {
            daemon,
            gib,
            assignment,
            label,
        } => Command::ConfigureDaemon(ConfigureDaemon {
            daemon: d(daemon),
            settings: daemon_settings(gib, false, label, assignment),
        }),
        Op::Remove { daemon } => Command::RemoveDaemon(RemoveDaemon { daemon: d(daemon) }),
        Op::Liveness { daemon, up } => Command::ReportDaemonLiveness(ReportDaemonLiveness {
            daemon: d(daemon),
            up,
        }),
        Op::Project {
            project,
            label,
            only,
        } => Command::ConfigureProject(ConfigureProject {
            project: p(&format!("p{project}")),
            daemon_filter: only.map(d).into_iter().collect(),
            label_filter: if label {
                vec![Label::new("tier1").unwrap()]
            } else {
                vec![]
            },
        }),
        Op::ReplicaSet { project, name, gib } => {
            rs(&format!("p{project}"), &format!("rs{name}"), gib)
        }
        Op::Cluster {
            project,
            name,
            shards,
        } => cluster(&format!("p{project}"), &format!("c{name}"), shards, 2),
        Op::MoveJobs { from, to, dry_run } => Command::MoveJobs(MoveJobs {
            from: d(from),
            to: d(to),
            reason: None,
            dry_run,
        }),
        Op::MoveJob { job, to } => {
            let (job, ..) = pick_job(state, job)?;
            Command::MoveJob(MoveJob {
                job,
                to: d(to),
                reason: None,
                dry_run: false,
            })
        }
        Op::Phase { job, phase, stale } => {
            let (job, move_id, epoch) = pick_job(state, job)?;
            Command::ReportJobMovePhase(ReportJobMovePhase {
                job,
                move_id: move_id.unwrap_or_else(|| id(999_999)),
                epoch: if stale {
                    epoch.saturating_sub(1)
                } else {
                    epoch
                },
                phase: [
                    MovePhase::Requested,
                    MovePhase::RestoringSnapshot,
                    MovePhase::ReplayingOplog,
                ][phase as usize],
            })
        }
        Op::Complete { job, stale } => {
            let (job, move_id, epoch) = pick_job(state, job)?;
            Command::CompleteJobMove(CompleteJobMove {
                head: rebuilt_head(),
                job,
                move_id: move_id.unwrap_or_else(|| id(999_999)),
                epoch: if stale { epoch + 1 } else { epoch },
            })
        }
        Op::Fail { job, stale } => {
            let (job, move_id, epoch) = pick_job(state, job)?;
            Command::FailJobMove(FailJobMove {
                job,
                move_id: move_id.unwrap_or_else(|| id(999_999)),
                epoch: if stale {
                    epoch.saturating_sub(1)
                } else {
                    epoch
                },
                reason: "rebuild failed".into(),
            })
        }
        Op::Cancel { job } => {
            let (_, move_id, _) = pick_job(state, job)?;
            Command::CancelMove(CancelMove {
                move_id: move_id.unwrap_or_else(|| id(999_999)),
                reason: "not now".into(),
            })
        }
        Op::Drain {
            daemon,
            max_concurrent,
        } => Command::DrainDaemon(DrainDaemon {
            daemon: d(daemon),
            max_concurrent,
            reason: None,
            dry_run: false,
        }),
        Op::DrainStep { daemon } => Command::ContinueDrain(ContinueDrain {
            daemon: d(daemon),
            drain_id: state
                .drains
                .get(&d(daemon))
                .map_or_else(|| id(999_998), |x| x.id.clone()),
        }),
        Op::CancelDrain { daemon } => Command::CancelDrain(CancelDrain {
            daemon: d(daemon),
            reason: "not now".into(),
        }),
    })
}

/// Every invariant of the state.
fn check_invariants(state: &State) -> Result<(), TestCaseError> {
    // The moves in progress name every moving job: counting from them is counting all.
    let moving = state
        .jobs
        .values()
        .filter(|j| matches!(j.assignment, Assignment::Moving { .. }))
        .count();
    prop_assert_eq!(state.moving() as usize, moving);
    // The state holds only the moves in progress: it does not grow with the history.
    for (id, m) in &state.moves {
        prop_assert!(!m.is_over(), "move {} is over but kept", id);
    }
    // Never two owners: each job is in exactly one daemon's set, its owner's.
    for (id, job) in &state.jobs {
        let holders: Vec<_> = state
            .daemons
            .iter()
            .filter(|(_, d)| d.jobs.contains(id))
            .map(|(n, _)| n)
            .collect();
        prop_assert_eq!(holders.len(), 1, "job {} held by {:?}", id, holders);
        prop_assert_eq!(holders[0], job.owner());
        if let Assignment::Moving {
            move_id,
            phase,
            from,
            to,
        } = &job.assignment
        {
            prop_assert!(!phase.is_final());
            prop_assert!(from != to);
            prop_assert_eq!(state.moves[move_id].jobs.get(id), Some(phase));
        }
    }
    // A daemon draining takes no new jobs, and no more of its drain's moves run at once
    // than its limit.
    for (daemon, drain) in &state.drains {
        prop_assert!(!state.daemons[daemon].settings.assignment_enabled);
        let running = state
            .moving_jobs()
            .filter(|(j, _, _)| match &state.jobs[*j].assignment {
                Assignment::Moving { move_id, .. } => {
                    state.moves[move_id].drain.as_ref() == Some(&drain.id)
                }
                Assignment::Assigned { .. } => false,
            })
            .count();
        prop_assert!(
            running as u32 <= drain.max_concurrent,
            "drain of {} runs {} moves",
            daemon,
            running
        );
    }
    for (id, daemon) in &state.daemons {
        let used: u64 = daemon
            .jobs
            .iter()
            .map(|j| state.jobs[j].size.head_size_bytes)
            .sum();
        prop_assert_eq!(daemon.used_bytes, used, "daemon {} used bytes", id);
        for j in &daemon.jobs {
            prop_assert!(state.jobs.contains_key(j));
        }
    }
    Ok(())
}

/// A fleet to start from, so random steps mostly act on daemons and jobs that exist:
/// four 200 GiB daemons, two projects, four replica sets.
fn base() -> State {
    let mut state = initial();
    let mut setup = vec![];
    for n in 0..DAEMONS {
        setup.push(register(n, 200));
    }
    setup.push(project("p0"));
    setup.push(project("p1"));
    for (i, name) in ["a", "b", "c", "d"].iter().enumerate() {
        setup.push(rs(&format!("p{}", i % 2), name, 10));
    }
    for (n, command) in setup.iter().enumerate() {
        let decision =
            decide(command, &ctx(1_000_000 + n as u64), &state).expect("the base fleet is valid");
        for e in decision.events() {
            state.apply(e);
        }
    }
    state
}

/// Runs the steps whose commands are accepted.
fn run_all(state: &mut State, ops: &[Op]) {
    for (n, op) in ops.iter().enumerate() {
        if let Some(command) = to_command(op, state) {
            if let Ok(decision) = decide(&command, &ctx(n as u64 + 1), state) {
                for e in decision.events() {
                    state.apply(e);
                }
            }
        }
    }
}

fn ctx(n: u64) -> Context {
    Context {
        command: id(n),
        actor: handoff_domain::Actor::new("admin").unwrap(),
        at_ms: n,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Random command sequences keep every invariant; a rejected command changes
    /// nothing; every unit is atomic-sized with one event per aggregate; the state is
    /// the fold of the events, also after they went through JSON.
    #[test]
    fn random_sequences_keep_the_invariants(ops in proptest::collection::vec(op(), 1..60)) {
        let mut state = base();
        let start = state.clone();
        let mut events: Vec<Event> = Vec::new();
        for (n, op) in ops.iter().enumerate() {
            let Some(command) = to_command(op, &state) else { continue };
            let c = ctx(n as u64 + 1);
            let first = decide(&command, &c, &state);
            prop_assert_eq!(&first, &decide(&command, &c, &state), "decide is not deterministic");
            if let Ok(decision) = first {
                    for unit in &decision.units {
                        prop_assert!(!unit.is_empty() && unit.len() <= MAX_EVENTS_PER_UNIT);
                        let mut aggregates: Vec<_> = unit.iter().map(Event::aggregate).collect();
                        aggregates.sort();
                        let len = aggregates.len();
                        aggregates.dedup();
                        prop_assert_eq!(aggregates.len(), len);
                    }
                    for e in decision.events() {
                        state.apply(e);
                        events.push(e.clone());
                    }
            }
            check_invariants(&state)?;
        }
        let json: Vec<Event> = events
            .iter()
            .map(|e| serde_json::from_str(&serde_json::to_string(e).unwrap()).unwrap())
            .collect();
        prop_assert_eq!(&json, &events);
        prop_assert_eq!(json.iter().fold(start, evolve), state);
    }

    /// Two moves of the same job decided on the same state: once the first is applied,
    /// the second is refused (exactly one wins).
    #[test]
    fn conflicting_moves_have_one_winner(
        setup in proptest::collection::vec(op(), 0..30),
        first in (0..32usize, 0..DAEMONS),
        second in (0..32usize, 0..DAEMONS),
        all in any::<bool>(),
    ) {
        let mut state = base();
        run_all(&mut state, &setup);
        let Some((job, ..)) = pick_job(&state, first.0) else { return Ok(()) };
        let owner = state.jobs[&job].owner().clone();
        let a = Command::MoveJob(MoveJob { job: job.clone(), to: d(first.1), reason: None, dry_run: false });
        let b = if all {
            Command::MoveJobs(MoveJobs { from: owner, to: d(second.1), reason: None, dry_run: false })
        } else {
            Command::MoveJob(MoveJob { job: job.clone(), to: d(second.1), reason: None, dry_run: false })
        };
        let (ca, cb) = (ctx(10_000), ctx(10_001));
        let (Ok(da), Ok(_)) = (decide(&a, &ca, &state), decide(&b, &cb, &state)) else { return Ok(()) };
        for e in da.events() { state.apply(e); }
        let again = decide(&b, &cb, &state);
        prop_assert!(again.is_err(), "both moves of {} won: {:?}", job, again);
    }

    /// A move decided again with its own id after it was applied changes nothing.
    #[test]
    fn a_retried_move_changes_nothing(setup in proptest::collection::vec(op(), 0..30), mv in (0..DAEMONS, 0..DAEMONS)) {
        let mut state = base();
        run_all(&mut state, &setup);
        let command = Command::MoveJobs(MoveJobs { from: d(mv.0), to: d(mv.1), reason: None, dry_run: false });
        let c = ctx(20_000);
        let Ok(decision) = decide(&command, &c, &state) else { return Ok(()) };
        for e in decision.events() { state.apply(e); }
        let again = decide(&command, &c, &state).expect("a retry is not refused");
        prop_assert!(again.units.is_empty());
    }
}

/// The owners of every job, for a quick look when a property fails.
#[allow(dead_code)]
fn owners(state: &State) -> BTreeMap<String, String> {
    state
        .jobs
        .iter()
        .map(|(j, job)| (j.to_string(), job.owner().to_string()))
        .collect()
}

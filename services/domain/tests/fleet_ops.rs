//! Fleet operations on the pure domain: an operator cancels a move, spreads a daemon's
//! jobs over several destinations.

mod common;

use common::*;
use handoff_domain::alert::AlertKind;
use handoff_domain::command::*;
use handoff_domain::event::Event;
use handoff_domain::model::MovePhase;
use handoff_domain::rejection::Kind;
use handoff_domain::state::Assignment;
use handoff_domain::{decide, Command, DaemonId, JobId, Rejection};

fn refused(w: &mut World, c: Command) -> Rejection {
    let before = w.state.clone();
    let r = w.run(c).expect_err("the command should be refused");
    assert_eq!(w.state, before, "a refused command changed the state");
    r
}

fn cancel(move_id: &handoff_domain::CommandId) -> Command {
    Command::CancelMove(CancelMove {
        move_id: move_id.clone(),
        reason: "not during the sale".into(),
    })
}

/// An operator cancels a move: its jobs not completed go back to their previous owner
/// with a new epoch, the completed one stays, no THEFT_FAILED is raised, the move is
/// over, a late report of the destination is refused, and the jobs can move again.
#[test]
fn a_cancelled_move_sends_back_its_unfinished_jobs_without_theft_failed() {
    let mut w = fleet();
    let move_id = w.ok(move_jobs(1, 2)).plan.unwrap().move_id;
    w.ok(Command::CompleteJobMove(CompleteJobMove {
        job: j("p1/rs0"),
        move_id: move_id.clone(),
        epoch: 2,
        head: rebuilt_head(),
    }));
    let decision = w.ok(cancel(&move_id));
    let back: Vec<&JobId> = decision
        .events()
        .filter_map(|e| match e {
            Event::JobMoveFailed {
                job,
                cancelled: true,
                returned_to,
                epoch: 3,
                ..
            } if *returned_to == d(1) => Some(job),
            _ => None,
        })
        .collect();
    assert_eq!(back, [&j("p1/rs1"), &j("p1/rs2")]);
    assert!(decision.events().any(|e| matches!(e,
        Event::JobsAssigned { daemon, jobs, .. } if *daemon == d(1) && jobs.len() == 2)));
    // The destination is told to let them go, before their return (what a daemon
    // watching a released job reads after its release).
    let events: Vec<&Event> = decision.events().collect();
    let released = events
        .iter()
        .position(|e| matches!(e, Event::JobsReleased { daemon, jobs, .. } if *daemon == d(2) && jobs.len() == 2))
        .expect("the destination released");
    let first_back = events
        .iter()
        .position(|e| matches!(e, Event::JobMoveFailed { .. }))
        .unwrap();
    assert!(released < first_back);
    assert!(matches!(
        events.first(),
        Some(Event::MoveCancelled { cancelled: 2, .. })
    ));
    for (job, owner, epoch) in [("p1/rs0", 2, 2), ("p1/rs1", 1, 3), ("p1/rs2", 1, 3)] {
        let job = &w.state.jobs[&j(job)];
        assert_eq!(job.assignment, Assignment::Assigned { daemon: d(owner) });
        assert_eq!(job.epoch, epoch);
    }
    assert_eq!(w.state.daemons[&d(1)].used_bytes, 20 * GIB);
    assert_eq!(w.state.daemons[&d(2)].used_bytes, 10 * GIB);
    assert!(!w.state.moves.contains_key(&move_id), "the move is over");
    assert!(
        w.state
            .alerts
            .iter()
            .all(|a| a.kind != AlertKind::TheftFailed),
        "{:?}",
        w.state.alerts
    );
    let late = refused(
        &mut w,
        Command::ReportJobMovePhase(ReportJobMovePhase {
            job: j("p1/rs1"),
            move_id: move_id.clone(),
            epoch: 2,
            phase: MovePhase::ReplayingOplog,
        }),
    );
    assert!(matches!(late, Rejection::MoveNotInProgress { .. }));
    assert!(matches!(
        refused(&mut w, cancel(&move_id)),
        Rejection::NotFound {
            kind: Kind::Move,
            ..
        }
    ));
    w.ok(move_job("p1/rs1", 3));
}

/// A cancel that would send jobs back to a daemon that is down (the move of a failover)
/// is refused, and changes nothing.
#[test]
fn a_cancel_never_sends_jobs_back_to_a_daemon_that_is_down() {
    let mut w = fleet();
    let move_id = w.ok(move_jobs(1, 2)).plan.unwrap().move_id;
    w.ok(Command::ReportDaemonLiveness(ReportDaemonLiveness {
        daemon: d(1),
        up: false,
    }));
    let r = refused(&mut w, cancel(&move_id));
    assert!(matches!(r, Rejection::DestinationDown { daemon } if daemon == d(1)));
}

/// A move appended in part whose started jobs are all over is cancelled with an empty
/// release on its source (a continuation decided before conflicts there), and is over.
#[test]
fn a_move_is_cancelled_by_one_command() {
    let mut w = large_fleet(1);
    let ctx = w.ctx();
    let decision = decide(&move_jobs(1, 2), &ctx, &w.state).unwrap();
    for e in &decision.units[0] {
        w.state.apply(e);
    }
    let started: Vec<JobId> = w.state.moves[&ctx.command].jobs.keys().cloned().collect();
    for job in &started {
        w.ok(Command::CompleteJobMove(CompleteJobMove {
            job: job.clone(),
            move_id: ctx.command.clone(),
            epoch: 2,
            head: rebuilt_head(),
        }));
    }
    let cancel_ctx = w.ctx();
    let first = decide(&cancel(&ctx.command), &cancel_ctx, &w.state).unwrap();
    let events: Vec<&Event> = first.events().collect();
    assert!(
        matches!(
            events[..],
            [
                Event::MoveCancelled { cancelled: 0, .. },
                Event::JobsReleased { daemon, jobs, .. }
            ] if *daemon == d(1) && jobs.is_empty()
        ),
        "{events:?}"
    );
    for e in first.events() {
        w.state.apply(e);
    }
    assert!(
        w.state.moves.is_empty(),
        "nothing more starts: the move is over"
    );
}

/// While a cancel's jobs go back (a cancel appended in part), another cancel is refused
/// with who cancelled; the same cancel decided again sends back the rest.
#[test]
fn a_second_cancel_is_refused_while_the_first_goes_on() {
    let mut w = large_fleet(1);
    let move_id = w.ok(move_jobs(1, 2)).plan.unwrap().move_id;
    let ctx = w.ctx();
    let decision = decide(&cancel(&move_id), &ctx, &w.state).unwrap();
    for e in &decision.units[0] {
        w.state.apply(e);
    }
    let second = decide(&cancel(&move_id), &w.ctx(), &w.state).unwrap_err();
    assert!(
        matches!(&second, Rejection::AlreadyCancelled { by, .. } if *by == ctx.command),
        "{second:?}"
    );
    assert!(!decide(&cancel(&move_id), &ctx, &w.state)
        .unwrap()
        .units
        .is_empty());
    // Whatever else stands in its way, a second cancel hears that one is under way.
    w.ok(Command::ReportDaemonLiveness(ReportDaemonLiveness {
        daemon: d(1),
        up: false,
    }));
    assert!(matches!(
        decide(&cancel(&move_id), &w.ctx(), &w.state),
        Err(Rejection::AlreadyCancelled { .. })
    ));
}

/// A move appended in part (its rest not started) is cancelled: what started goes back,
/// the rest never starts, and the move is over.
#[test]
fn a_cancelled_interrupted_move_starts_nothing_more() {
    let mut w = large_fleet(1);
    let ctx = w.ctx();
    let decision = decide(&move_jobs(1, 2), &ctx, &w.state).unwrap();
    for e in &decision.units[0] {
        w.state.apply(e);
    }
    let started = w.state.moves[&ctx.command].jobs.len();
    assert!(started < 5 * 256);
    let cancelled = w.ok(cancel(&ctx.command));
    assert!(cancelled.events().any(|e| matches!(e,
        Event::MoveCancelled { cancelled, .. } if *cancelled as usize == started)));
    assert!(w.state.moves.is_empty(), "the move is over");
    assert_eq!(w.state.daemons[&d(1)].jobs.len(), 5 * 256);
}

/// A cancel of more jobs than fit one atomic unit is split into units, each touching an
/// aggregate once; decided again after the first unit it sends back the rest, and the
/// move is cancelled once.
#[test]
fn a_large_cancel_is_split_into_atomic_units_and_can_continue() {
    let mut w = large_fleet(1);
    let move_id = w.ok(move_jobs(1, 2)).plan.unwrap().move_id;
    let ctx = w.ctx();
    let decision = decide(&cancel(&move_id), &ctx, &w.state).unwrap();
    assert!(decision.units.len() > 1);
    assert_units_fit(&decision);
    for e in &decision.units[0] {
        w.state.apply(e);
    }
    let rest = decide(&cancel(&move_id), &ctx, &w.state).unwrap();
    assert_eq!(rest.units.len(), decision.units.len() - 1);
    let cancelled: Vec<&Event> = decision.units[0]
        .iter()
        .chain(rest.events())
        .filter(|e| matches!(e, Event::MoveCancelled { .. }))
        .collect();
    assert!(
        matches!(
            cancelled[..],
            [Event::MoveCancelled {
                cancelled: 1280,
                ..
            }]
        ),
        "{cancelled:?}"
    );
    for e in rest.events() {
        w.state.apply(e);
    }
    assert_eq!(w.state.daemons[&d(1)].jobs.len(), 5 * 256);
    assert!(w.state.daemons[&d(2)].jobs.is_empty());
    assert!(w.state.moves.is_empty());
}

fn spread(from: usize, to: &[usize], dry_run: bool) -> Command {
    Command::SpreadJobs(SpreadJobs {
        from: d(from),
        to: to.iter().map(|n| d(*n)).collect(),
        reason: Some("rebalance".into()),
        dry_run,
    })
}

/// A spread places each job by the failover policy's rules, counting what it placed
/// before: the fewest rebuilds first, then the most free space. One move, one id; each
/// destination is told its own jobs; a dry run plans the same and changes nothing.
#[test]
fn a_spread_places_each_job_by_the_policy_rules() {
    let mut w = fleet();
    let before = w.state.clone();
    let dry = w.ok(spread(1, &[], true));
    assert!(dry.units.is_empty());
    assert_eq!(w.state, before, "a dry run changed the state");
    let plan = dry.plan.expect("a plan");
    let per: Vec<(DaemonId, u32)> = plan
        .destinations
        .iter()
        .map(|d| (d.daemon.clone(), d.jobs))
        .collect();
    assert_eq!(per, [(d(2), 2), (d(3), 1)]);
    assert_eq!(plan.destinations[0].free_after, 80 * GIB);
    assert!(plan.checks.iter().any(|c| c.name.ends_with("head_space")));

    let decision = w.ok(spread(1, &[], false));
    let placed: Vec<(JobId, DaemonId)> = decision
        .events()
        .filter_map(|e| match e {
            Event::JobMoveStarted { job, to, .. } => Some((job.clone(), to.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(
        placed,
        [
            (j("p1/rs0"), d(2)),
            (j("p1/rs1"), d(3)),
            (j("p1/rs2"), d(2))
        ]
    );
    assert_eq!(
        decision
            .events()
            .filter(|e| matches!(e, Event::MoveStarted { spread: Some(to), .. } if to.is_empty()))
            .count(),
        1
    );
    for (n, jobs) in [(2, 2), (3, 1)] {
        assert!(decision.events().any(|e| matches!(e,
            Event::JobsAssigned { daemon, jobs: j, .. } if *daemon == d(n) && j.len() == jobs)));
    }
    assert_eq!(w.state.rebuilding_on(&d(2)), 2);
    assert_eq!(w.state.rebuilding_on(&d(3)), 1);
}

/// Named destinations: only they take jobs, and each must be able to (a specific
/// refusal otherwise); no room anywhere is a bind failure naming the job.
#[test]
fn a_spread_over_named_destinations_refuses_what_cannot_take_jobs() {
    let mut w = fleet();
    let only3 = w.ok(spread(1, &[3], true)).plan.unwrap();
    assert!(only3.jobs.iter().all(|p| p.to.as_ref() == Some(&d(3))));
    assert!(matches!(
        refused(&mut w, spread(1, &[1, 2], false)),
        Rejection::MoveToSelf { .. }
    ));
    assert!(matches!(
        refused(&mut w, spread(1, &[2, 2], false)),
        Rejection::Invalid(_)
    ));
    w.ok(Command::ReportDaemonLiveness(ReportDaemonLiveness {
        daemon: d(3),
        up: false,
    }));
    assert!(matches!(
        refused(&mut w, spread(1, &[2, 3], false)),
        Rejection::DestinationDown { daemon } if daemon == d(3)
    ));
    w.ok(register(4, 15));
    assert!(matches!(
        refused(&mut w, spread(1, &[4], false)),
        Rejection::BindFailure { .. }
    ));
    assert!(matches!(
        refused(&mut w, spread(4, &[], false)),
        Rejection::NothingToMove { .. }
    ));
}

/// A spread of more jobs than fit one atomic unit is split into units, each touching an
/// aggregate once; decided again after the first unit it starts the rest, once.
#[test]
fn a_large_spread_is_split_into_atomic_units_and_can_continue() {
    let mut w = large_fleet(2);
    let ctx = w.ctx();
    let decision = decide(&spread(1, &[], false), &ctx, &w.state).unwrap();
    assert!(decision.units.len() > 1);
    assert_units_fit(&decision);
    for e in &decision.units[0] {
        w.state.apply(e);
    }
    let rest = decide(&spread(1, &[], false), &ctx, &w.state).unwrap();
    assert!(!rest
        .events()
        .any(|e| matches!(e, Event::MoveStarted { .. })));
    for e in rest.events() {
        w.state.apply(e);
    }
    assert_eq!(w.state.moves[&ctx.command].jobs.len(), 5 * 256);
    let (on2, on3) = (w.state.rebuilding_on(&d(2)), w.state.rebuilding_on(&d(3)));
    assert_eq!(on2 + on3, 5 * 256);
    assert!(on2.abs_diff(on3) <= 1, "{on2} and {on3}");
}

/// With no destination named, a spread goes only where the failover policy may: a
/// daemon that runs no backup jobs, or whose filters the job's project does not pass,
/// takes none.
#[test]
fn a_spread_to_any_daemon_goes_only_where_the_policy_may() {
    let mut w = fleet();
    w.ok(Command::ConfigureDaemon(ConfigureDaemon {
        daemon: d(3),
        settings: handoff_domain::model::DaemonSettings {
            backup_jobs_enabled: false,
            ..settings(100)
        },
    }));
    let plan = w.ok(spread(1, &[], true)).plan.unwrap();
    assert!(
        plan.jobs.iter().all(|p| p.to.as_ref() == Some(&d(2))),
        "{plan:?}"
    );
    w.ok(register(4, 100));
    w.ok(Command::ConfigureProject(ConfigureProject {
        project: p("p1"),
        daemon_filter: vec![d(4)],
        label_filter: vec![],
    }));
    let plan = w.ok(spread(1, &[], true)).plan.unwrap();
    assert!(
        plan.jobs.iter().all(|p| p.to.as_ref() == Some(&d(4))),
        "{plan:?}"
    );
}

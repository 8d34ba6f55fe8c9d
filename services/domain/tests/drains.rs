//! Drains on the pure domain: a daemon's assignment disabled, its jobs moved away one
//! move per job, never more than the limit at a time, placed by the failover policy's
//! rules; the drain ends when nothing is left, or when it is cancelled.

mod common;

use common::*;
use handoff_domain::alert::{AlertKey, AlertKind};
use handoff_domain::command::*;
use handoff_domain::decide::alert_of_rejection;
use handoff_domain::event::Event;
use handoff_domain::rejection::Kind;
use handoff_domain::{Command, CommandId, DaemonId, Decision, JobId, Rejection};

fn drain(daemon: usize, max_concurrent: u32, dry_run: bool) -> Command {
    Command::DrainDaemon(DrainDaemon {
        daemon: d(daemon),
        max_concurrent,
        reason: Some("retiring the host".into()),
        dry_run,
    })
}

fn step(daemon: usize, drain_id: &CommandId) -> Command {
    Command::ContinueDrain(ContinueDrain {
        daemon: d(daemon),
        drain_id: drain_id.clone(),
    })
}

fn refused(w: &mut World, c: Command) -> Rejection {
    let before = w.state.clone();
    let r = w.run(c).expect_err("the command should be refused");
    assert_eq!(w.state, before, "a refused command changed the state");
    r
}

/// The job a step started, with its move and destination.
fn started(decision: &Decision) -> Option<(JobId, CommandId, DaemonId)> {
    decision.events().find_map(|e| match e {
        Event::JobMoveStarted {
            job, move_id, to, ..
        } => Some((job.clone(), move_id.clone(), to.clone())),
        _ => None,
    })
}

fn complete(w: &mut World, job: &JobId, move_id: &CommandId) {
    let epoch = w.state.jobs[job].epoch;
    w.ok(Command::CompleteJobMove(CompleteJobMove {
        job: job.clone(),
        move_id: move_id.clone(),
        epoch,
        head: rebuilt_head(),
    }));
}

fn moving_from(w: &World, daemon: usize) -> usize {
    w.state.jobs_moving_from(&d(daemon)).count()
}

/// A drain disables assignment at once, starts one move per job while fewer than its
/// limit are moving, each to the daemon the failover policy would choose, and ends with
/// `DrainCompleted` once every job is gone.
#[test]
fn a_drain_moves_every_job_at_most_its_limit_at_a_time_then_completes() {
    let mut w = fleet();
    let decision = w.ok(drain(1, 2, false));
    let drain_id = match decision.events().collect::<Vec<_>>()[..] {
        [Event::DrainStarted {
            drain_id,
            max_concurrent: 2,
            jobs: 3,
            ..
        }] => drain_id.clone(),
        ref other => panic!("a drain starts with DrainStarted alone, got {other:?}"),
    };
    assert!(!w.state.daemons[&d(1)].settings.assignment_enabled);
    let plan = decision.plan.expect("the drain's plan");
    assert_eq!(plan.jobs.len(), 3, "the plan names every job");
    assert!(plan.jobs.iter().all(|p| p.to.is_some()));
    // Two moves start, then nothing while both run.
    let first = started(&w.ok(step(1, &drain_id))).expect("a first move");
    let second = started(&w.ok(step(1, &drain_id))).expect("a second move");
    assert_eq!(moving_from(&w, 1), 2);
    assert!(w.ok(step(1, &drain_id)).units.is_empty(), "over the limit");
    // Fewest rebuilds first: the two moves go to different daemons.
    assert_ne!(first.2, second.2);
    for m in [&first, &second] {
        let started = w.state.moves.get(&m.1).expect("the move is in progress");
        assert_eq!(started.drain.as_ref(), Some(&drain_id));
        assert!(!started.automatic);
    }
    complete(&mut w, &first.0, &first.1);
    let third = started(&w.ok(step(1, &drain_id))).expect("a third move");
    assert!(
        w.ok(step(1, &drain_id)).units.is_empty(),
        "nothing left to start"
    );
    complete(&mut w, &second.0, &second.1);
    assert!(
        w.ok(step(1, &drain_id)).units.is_empty(),
        "a move is still running"
    );
    complete(&mut w, &third.0, &third.1);
    let done = w.ok(step(1, &drain_id));
    assert!(
        matches!(done.events().collect::<Vec<_>>()[..], [Event::DrainCompleted { moved: 3, left: 0, drain_id: ref id, .. }] if *id == drain_id),
        "{:?}",
        done.units
    );
    assert!(w.state.daemons[&d(1)].jobs.is_empty());
    assert!(w.state.drains.is_empty());
    assert!(
        !w.state.daemons[&d(1)].settings.assignment_enabled,
        "a drained daemon takes no new jobs"
    );
    assert_eq!(
        refused(&mut w, step(1, &drain_id)),
        Rejection::NotDraining {
            daemon: d(1),
            drain_id: Some(drain_id)
        }
    );
}

/// A job whose drain move fails goes back and stays: the drain does not try it again,
/// and completes saying one job was left.
#[test]
fn a_job_whose_drain_move_fails_is_left_and_counted() {
    let mut w = fleet();
    let drain_id = w.ok(drain(1, 3, false)).plan.unwrap().move_id;
    let moves: Vec<_> = (0..3)
        .map(|_| started(&w.ok(step(1, &drain_id))).unwrap())
        .collect();
    let (job, move_id, _) = &moves[0];
    w.ok(Command::FailJobMove(FailJobMove {
        job: job.clone(),
        move_id: move_id.clone(),
        epoch: w.state.jobs[job].epoch,
        reason: "disk full".into(),
    }));
    assert!(
        w.state.daemons[&d(1)].jobs.contains(job),
        "back on the source"
    );
    assert!(
        w.ok(step(1, &drain_id)).units.is_empty(),
        "a failed job is not tried again"
    );
    for (job, move_id, _) in &moves[1..] {
        complete(&mut w, job, move_id);
    }
    let done = w.ok(step(1, &drain_id));
    assert!(matches!(
        done.events().collect::<Vec<_>>()[..],
        [Event::DrainCompleted {
            moved: 2,
            left: 1,
            ..
        }]
    ));
}

/// Each refusal names its reason, and changes nothing.
#[test]
fn drain_refusals_are_specific_and_change_nothing() {
    let mut w = fleet();
    assert!(matches!(
        refused(&mut w, drain(9, 2, false)),
        Rejection::NotFound {
            kind: Kind::Daemon,
            ..
        }
    ));
    assert!(matches!(
        refused(&mut w, drain(1, 0, false)),
        Rejection::Invalid(_)
    ));
    assert!(matches!(
        refused(
            &mut w,
            Command::CancelDrain(CancelDrain {
                daemon: d(1),
                reason: "x".into()
            })
        ),
        Rejection::NotDraining { drain_id: None, .. }
    ));
    // A dry run plans every job and appends nothing.
    let before = w.state.clone();
    let dry = w.ok(drain(1, 2, true));
    assert!(dry.units.is_empty());
    assert_eq!(dry.plan.unwrap().jobs.len(), 3);
    assert_eq!(w.state, before);
    let drain_id = w.ok(drain(1, 2, false)).plan.unwrap().move_id;
    assert_eq!(
        refused(&mut w, drain(1, 2, false)),
        Rejection::Draining {
            daemon: d(1),
            drain_id: drain_id.clone()
        }
    );
    // Assignment stays disabled while it drains.
    let mut enabled = settings(100);
    enabled.assignment_enabled = true;
    assert!(matches!(
        refused(
            &mut w,
            Command::ConfigureDaemon(ConfigureDaemon {
                daemon: d(1),
                settings: enabled
            })
        ),
        Rejection::Draining { .. }
    ));
    assert!(matches!(
        refused(&mut w, step(1, &id(999))),
        Rejection::NotDraining {
            drain_id: Some(_),
            ..
        }
    ));
    assert!(matches!(
        refused(&mut w, step(2, &drain_id)),
        Rejection::NotDraining { .. }
    ));
}

/// A drain no other daemon can take is refused before it starts.
#[test]
fn a_drain_nobody_can_take_is_refused() {
    let mut w = World::new();
    w.ok(register(1, 100));
    w.ok(project("p1"));
    w.ok(rs("p1", "rs0", 10));
    w.ok(register(2, 5));
    assert!(matches!(
        refused(&mut w, drain(1, 2, false)),
        Rejection::BindFailure { .. }
    ));
}

/// A step no daemon can take now is refused; the service raises BIND_FAILURE on the
/// daemon for it (`DrainBlocked`, once while open); once a daemon can take a job, the
/// next step starts its move, which closes the alert. A cancel closes it too.
#[test]
fn a_blocked_drain_raises_bind_failure_and_goes_on_when_it_can() {
    let mut w = fleet();
    let drain_id = w.ok(drain(1, 2, false)).plan.unwrap().move_id;
    for n in [2, 3] {
        w.ok(Command::ReportDaemonLiveness(ReportDaemonLiveness {
            daemon: d(n),
            up: false,
        }));
    }
    let command = step(1, &drain_id);
    let rejection = refused(&mut w, command.clone());
    let Rejection::BindFailure { job, .. } = &rejection else {
        panic!("{rejection:?}");
    };
    let alert = alert_of_rejection(&command, &rejection, &w.state).expect("BIND_FAILURE");
    assert!(
        matches!(&alert, Event::DrainBlocked { job: j, daemon, drain_id: id, .. }
            if j == job && *daemon == d(1) && *id == drain_id),
        "{alert:?}"
    );
    w.state.apply(&alert);
    let key = AlertKey::new(AlertKind::BindFailure, d(1));
    assert!(w.state.alerts.contains(&key));
    assert!(
        alert_of_rejection(&command, &rejection, &w.state).is_none(),
        "raised once while open"
    );
    w.ok(Command::ReportDaemonLiveness(ReportDaemonLiveness {
        daemon: d(2),
        up: true,
    }));
    let (moved, _, to) = started(&w.ok(step(1, &drain_id))).expect("the move starts");
    assert_eq!(&moved, job, "the largest head first, then by id");
    assert_eq!(to, d(2));
    assert!(
        !w.state.alerts.contains(&key),
        "the move closes BIND_FAILURE"
    );
    // Blocked again (2 down again), then cancelled: closed.
    w.ok(Command::ReportDaemonLiveness(ReportDaemonLiveness {
        daemon: d(2),
        up: false,
    }));
    let rejection = refused(&mut w, command.clone());
    let alert = alert_of_rejection(&command, &rejection, &w.state).expect("raised again");
    w.state.apply(&alert);
    assert!(w.state.alerts.contains(&key));
    w.ok(Command::CancelDrain(CancelDrain {
        daemon: d(1),
        reason: "later".into(),
    }));
    assert!(
        !w.state.alerts.contains(&key),
        "the cancel closes BIND_FAILURE"
    );
}

/// A daemon removed while its drain is in progress (it held nothing) ends the drain: a
/// daemon registered again under its id takes jobs as any new one.
#[test]
fn a_removed_daemon_has_no_drain_left() {
    let mut w = World::new();
    w.ok(register(1, 100));
    w.ok(register(2, 100));
    w.ok(drain(1, 1, false));
    w.ok(Command::RemoveDaemon(RemoveDaemon { daemon: d(1) }));
    assert!(w.state.drains.is_empty());
    w.ok(register(1, 100));
    assert!(w.state.daemons[&d(1)].settings.assignment_enabled);
}

/// With no destination named, the plan never puts a job back on the daemon an operator
/// moved it away from, as the moves themselves never do.
#[test]
fn the_plan_never_sends_a_job_back_where_an_operator_moved_it_from() {
    let mut w = World::new();
    w.ok(register(1, 100));
    w.ok(project("p1"));
    w.ok(rs("p1", "rs0", 10));
    w.ok(register(2, 100));
    w.ok(register(3, 15));
    let move_id = w.ok(move_job("p1/rs0", 2)).plan.unwrap().move_id;
    complete(&mut w, &j("p1/rs0"), &move_id);
    // 2 now holds rs0, moved there from 1; 1 has the most room, 3 just enough.
    let plan = w.ok(drain(2, 1, true)).plan.expect("a plan");
    assert_eq!(plan.jobs.len(), 1);
    assert_eq!(plan.jobs[0].to, Some(d(3)), "{plan:?}");
}

/// A cancelled drain starts nothing more; the moves in progress go on.
#[test]
fn a_cancelled_drain_starts_nothing_more() {
    let mut w = fleet();
    let drain_id = w.ok(drain(1, 1, false)).plan.unwrap().move_id;
    let (job, move_id, _) = started(&w.ok(step(1, &drain_id))).unwrap();
    let cancel = w.ok(Command::CancelDrain(CancelDrain {
        daemon: d(1),
        reason: "peak hours".into(),
    }));
    assert!(matches!(
        cancel.events().collect::<Vec<_>>()[..],
        [Event::DrainCancelled { moved: 0, waiting: 2, drain_id: ref id, .. }] if *id == drain_id
    ));
    assert!(matches!(
        refused(&mut w, step(1, &drain_id)),
        Rejection::NotDraining { .. }
    ));
    assert_eq!(moving_from(&w, 1), 1, "the move in progress goes on");
    complete(&mut w, &job, &move_id);
    assert_eq!(w.state.daemons[&d(1)].jobs.len(), 2);
    assert!(!w.state.daemons[&d(1)].settings.assignment_enabled);
    // Another drain may start now.
    w.ok(drain(1, 1, false));
}

/// A daemon with no job drains at once; one with a job arriving waits for it to land,
/// then moves it away too.
#[test]
fn a_drain_waits_for_a_job_arriving_then_moves_it() {
    let mut w = fleet();
    // rs0 moves from 1 to 2; then 2 is drained.
    let move_id = w.ok(move_job("p1/rs0", 2)).plan.unwrap().move_id;
    let drain_id = w.ok(drain(2, 2, false)).plan.map(|p| p.move_id);
    assert!(drain_id.is_none(), "nothing assigned to 2 yet: no plan");
    let drain_id = w.state.drains[&d(2)].id.clone();
    assert!(w.ok(step(2, &drain_id)).units.is_empty(), "rs0 is arriving");
    complete(&mut w, &j("p1/rs0"), &move_id);
    let (job, again, to) = started(&w.ok(step(2, &drain_id))).expect("rs0 moves on");
    assert_eq!(job, j("p1/rs0"));
    assert_ne!(to, d(1), "never back where an operator moved it from");
    complete(&mut w, &job, &again);
    assert!(matches!(
        w.ok(step(2, &drain_id)).events().collect::<Vec<_>>()[..],
        [Event::DrainCompleted {
            moved: 1,
            left: 0,
            ..
        }]
    ));
}

//! Liveness, alerts and the automatic failover policy, on the pure domain: which events
//! open and close each alert, and what the policy may and may not move.

mod common;

use common::*;
use handoff_domain::alert::{AlertKey, AlertKind, FLEET};
use handoff_domain::command::*;
use handoff_domain::decide::failover_candidates;
use handoff_domain::event::Event;
use handoff_domain::model::MovePhase;
use handoff_domain::state::Assignment;
use handoff_domain::{Command, Rejection};
use proptest::prelude::*;

fn liveness(n: usize, up: bool) -> Command {
    Command::ReportDaemonLiveness(ReportDaemonLiveness { daemon: d(n), up })
}

fn failover(job: &str, from: usize) -> Command {
    Command::FailoverJob(FailoverJob {
        job: j(job),
        from: d(from),
        down_for_ms: 5_000,
        delay_ms: 5_000,
        max_concurrent_rebuilds: 10,
        max_down_percent: 50,
    })
}

/// The move id and the destination's epoch of a move's first job.
fn started(decision: &handoff_domain::Decision) -> (handoff_domain::CommandId, u64) {
    match decision
        .events()
        .find(|e| matches!(e, Event::JobMoveStarted { .. }))
    {
        Some(Event::JobMoveStarted { move_id, epoch, .. }) => (move_id.clone(), *epoch),
        _ => panic!("no JobMoveStarted"),
    }
}

fn open(w: &World, kind: AlertKind, about: impl std::fmt::Display) -> bool {
    w.state.alerts.contains(&AlertKey::new(kind, about))
}

/// Daemons 1 to `n` with 100 GiB each; daemon 1 holds two 10 GiB jobs.
fn fleet_of(n: usize) -> World {
    let mut w = World::new();
    w.ok(register(1, 100));
    w.ok(project("p"));
    w.ok(rs("p", "a", 10));
    w.ok(rs("p", "b", 10));
    for i in 2..=n {
        w.ok(register(i, 100));
    }
    w
}

#[test]
fn daemon_down_opens_its_alert_and_daemon_up_closes_it() {
    let mut w = fleet_of(3);
    w.ok(liveness(1, false));
    assert!(open(&w, AlertKind::DaemonDown, d(1)));
    // Reported again: nothing new.
    assert!(w.ok(liveness(1, false)).units.is_empty());
    w.ok(liveness(1, true));
    assert!(!open(&w, AlertKind::DaemonDown, d(1)));
    assert!(
        !open(&w, AlertKind::DaemonUp, d(1)),
        "DAEMON_UP is informational"
    );
}

#[test]
fn the_policy_moves_a_down_daemons_jobs_spread_over_the_others() {
    let mut w = fleet_of(3);
    w.ok(liveness(1, false));
    let first = w.ok(failover("p/a", 1));
    let unit = &first.units[0];
    let Some(Event::FailoverDecided { to, inputs, .. }) = unit.first() else {
        panic!("the decision comes first: {unit:?}");
    };
    assert_eq!(inputs.candidates.len(), 2);
    assert_eq!(&inputs.candidates[0].daemon, to);
    assert_eq!((inputs.down, inputs.active), (1, 3));
    assert!(unit.iter().any(|e| matches!(
        e,
        Event::MoveStarted {
            automatic: true,
            ..
        }
    )));
    let to_a = w.state.jobs[&j("p/a")].owner().clone();
    w.ok(failover("p/b", 1));
    let to_b = w.state.jobs[&j("p/b")].owner().clone();
    assert_ne!(to_a, to_b, "the second job goes to the less busy daemon");
}

#[test]
fn the_policy_leaves_an_up_daemon_and_a_job_an_operator_moved() {
    let mut w = fleet_of(3);
    assert!(matches!(
        w.run(failover("p/a", 1)),
        Err(Rejection::NotDown { .. })
    ));
    w.ok(liveness(1, false));
    w.ok(move_job("p/a", 3));
    assert!(matches!(
        w.run(failover("p/a", 1)),
        Err(Rejection::NotOnDaemon { .. })
    ));
    // Back up before the delay ran out: nothing moves.
    w.ok(liveness(1, true));
    assert!(matches!(
        w.run(failover("p/b", 1)),
        Err(Rejection::NotDown { .. })
    ));
}

#[test]
fn the_policy_never_moves_a_job_back_where_an_operator_moved_it_from() {
    let mut w = fleet_of(3);
    // The operator moves job a from daemon 1 to daemon 2; it completes there.
    let m = w.ok(move_job("p/a", 2));
    let (move_id, epoch) = started(&m);
    w.ok(Command::CompleteJobMove(CompleteJobMove {
        job: j("p/a"),
        move_id,
        epoch,
        head: rebuilt_head(),
    }));
    w.ok(liveness(2, false));
    let candidates = failover_candidates(&w.state, &j("p/a"));
    assert_eq!(
        candidates
            .iter()
            .map(|c| c.daemon.clone())
            .collect::<Vec<_>>(),
        vec![d(3)],
        "daemon 1, which the operator moved it away from, is never a candidate"
    );
    w.ok(failover("p/a", 2));
    assert_eq!(w.state.jobs[&j("p/a")].owner(), &d(3));
}

#[test]
fn the_guard_pauses_the_policy_when_too_many_daemons_are_down() {
    let mut w = fleet_of(3);
    w.ok(liveness(1, false));
    w.ok(liveness(2, false));
    let guard = Command::ReportFailoverGuard(ReportFailoverGuard {
        max_down_percent: 50,
    });
    let paused = w.ok(guard.clone());
    assert!(matches!(
        paused.events().next(),
        Some(Event::FailoverPaused { active: 3, .. })
    ));
    assert!(open(&w, AlertKind::FailoverPaused, FLEET));
    assert!(matches!(
        w.run(failover("p/a", 1)),
        Err(Rejection::FailoverPaused {
            down: 2,
            active: 3,
            ..
        })
    ));
    assert!(w.ok(guard.clone()).units.is_empty(), "paused once");
    w.ok(liveness(2, true));
    assert!(matches!(
        w.ok(guard).events().next(),
        Some(Event::FailoverResumed { .. })
    ));
    assert!(!open(&w, AlertKind::FailoverPaused, FLEET));
    w.ok(failover("p/a", 1));
}

#[test]
fn the_policy_starts_no_more_than_its_concurrent_rebuilds() {
    let mut w = fleet_of(3);
    w.ok(liveness(1, false));
    let limited = |job: &str| {
        Command::FailoverJob(FailoverJob {
            max_concurrent_rebuilds: 1,
            ..match failover(job, 1) {
                Command::FailoverJob(f) => f,
                _ => unreachable!(),
            }
        })
    };
    w.ok(limited("p/a"));
    assert!(matches!(
        w.run(limited("p/b")),
        Err(Rejection::RebuildLimit {
            moving: 1,
            limit: 1
        })
    ));
}

#[test]
fn move_stuck_opens_once_and_closes_with_the_next_phase() {
    let mut w = fleet_of(2);
    let m = w.ok(move_job("p/a", 2));
    let (move_id, epoch) = started(&m);
    let stuck = Command::ReportMoveStuck(ReportMoveStuck {
        job: j("p/a"),
        move_id: move_id.clone(),
        idle_ms: 60_000,
    });
    assert_eq!(w.ok(stuck.clone()).units.len(), 1);
    assert!(open(&w, AlertKind::MoveStuck, j("p/a")));
    assert!(w.ok(stuck).units.is_empty());
    w.ok(Command::ReportJobMovePhase(ReportJobMovePhase {
        job: j("p/a"),
        move_id: move_id.clone(),
        epoch,
        phase: MovePhase::ReplayingOplog,
    }));
    assert!(!open(&w, AlertKind::MoveStuck, j("p/a")));
    // A job that is not moving is never stuck.
    assert!(matches!(
        w.run(Command::ReportMoveStuck(ReportMoveStuck {
            job: j("p/b"),
            move_id,
            idle_ms: 1,
        })),
        Err(Rejection::MoveNotInProgress { .. })
    ));
}

#[test]
fn low_head_free_space_follows_the_state_not_the_report() {
    let mut w = World::new();
    w.ok(register(1, 100));
    w.ok(project("p"));
    let report = Command::ReportHeadSpace(ReportHeadSpace {
        daemon: d(1),
        threshold_percent: 20,
    });
    assert!(w.ok(report.clone()).units.is_empty());
    w.ok(rs("p", "big", 85));
    assert!(matches!(
        w.ok(report.clone()).events().next(),
        Some(Event::HeadSpaceLow {
            threshold_percent: 20,
            ..
        })
    ));
    assert!(open(&w, AlertKind::LowHeadFreeSpace, d(1)));
    assert!(w.ok(report.clone()).units.is_empty());
    w.ok(Command::ConfigureDaemon(ConfigureDaemon {
        daemon: d(1),
        settings: settings(200),
    }));
    assert!(matches!(
        w.ok(report).events().next(),
        Some(Event::HeadSpaceRecovered { .. })
    ));
    assert!(!open(&w, AlertKind::LowHeadFreeSpace, d(1)));
}

proptest! {
    /// Whatever the fleet and whoever is down, an accepted automatic move takes a job of
    /// a down daemon to its best candidate (up, room for the head), within the limit and
    /// the guard; a refused one changes nothing.
    #[test]
    fn an_automatic_move_obeys_every_rule(
        n in 2usize..6,
        down in proptest::collection::vec(any::<bool>(), 6),
        sizes in proptest::collection::vec(1u64..20, 1..6),
        limit in 1u32..4,
        guard in 1u32..=100,
    ) {
        let mut w = World::new();
        w.ok(register(1, 100));
        w.ok(project("p"));
        for (i, gib) in sizes.iter().enumerate() {
            w.ok(rs("p", &format!("r{i}"), *gib));
        }
        for i in 2..=n {
            w.ok(register(i, 100));
        }
        for (i, is_down) in down.iter().take(n).enumerate() {
            if *is_down {
                w.ok(liveness(i + 1, false));
            }
        }
        for (i, gib) in sizes.iter().enumerate() {
            let job = j(&format!("p/r{i}"));
            let from = w.state.jobs[&job].owner().clone();
            let before = w.state.clone();
            let candidates = failover_candidates(&w.state, &job);
            let command = Command::FailoverJob(FailoverJob {
                job: job.clone(),
                from: from.clone(),
                down_for_ms: 1,
                delay_ms: 1,
                max_concurrent_rebuilds: limit,
                max_down_percent: guard,
            });
            match w.run(command) {
                Ok(decision) => {
                    prop_assert!(!before.daemons[&from].is_up());
                    prop_assert!(before.moving() < limit);
                    let (d, a) = before.down_of_active();
                    prop_assert!(d.len() as u64 * 100 <= u64::from(a) * u64::from(guard));
                    let to = w.state.jobs[&job].owner().clone();
                    prop_assert_eq!(&to, &candidates[0].daemon);
                    prop_assert!(before.daemons[&to].is_up());
                    prop_assert!(before.daemons[&to].free_bytes() > gib * GIB);
                    let moving = matches!(&w.state.jobs[&job].assignment, Assignment::Moving { .. });
                    prop_assert!(moving, "the job moves");
                    let decided = decision.events().any(|e| matches!(e, Event::FailoverDecided { .. }));
                    prop_assert!(decided, "the decision is an event");
                }
                Err(_) => prop_assert_eq!(&w.state, &before),
            }
        }
    }
}

//! The rules of the Ops Manager procedure and the guarantees handoff adds, as
//! given/when/then examples on the pure domain.

mod common;

use common::*;
use handoff_domain::command::*;
use handoff_domain::event::{AssignmentCause, Event};
use handoff_domain::model::{HeadDiskType, Liveness, MovePhase};
use handoff_domain::state::{Assignment, DaemonStatus};
use handoff_domain::{decide, Command, Label, Rejection};

fn refused(w: &mut World, c: Command) -> Rejection {
    let before = w.state.clone();
    let r = w.run(c).expect_err("the command should be refused");
    assert_eq!(w.state, before, "a refused command changed the state");
    r
}

/// New jobs go to the least loaded eligible daemon.
#[test]
fn placement_prefers_the_least_loaded_daemon() {
    let mut w = World::new();
    w.ok(register(1, 100));
    w.ok(register(2, 100));
    w.ok(project("p1"));
    w.ok(rs("p1", "a", 10));
    w.ok(rs("p1", "b", 10));
    assert_eq!(w.state.jobs[&j("p1/a")].owner(), &d(1));
    assert_eq!(w.state.jobs[&j("p1/b")].owner(), &d(2));
}

/// HDD daemons are preferred unless the job's oplog runs at 1 GB/h or more.
#[test]
fn placement_prefers_hdd_for_slow_jobs_and_ssd_for_fast_ones() {
    let mut w = World::new();
    w.ok(register_with(1, hdd_ssd(100, HeadDiskType::Ssd)));
    w.ok(register_with(2, hdd_ssd(100, HeadDiskType::Hdd)));
    w.ok(project("p1"));
    w.ok(rs_rate("p1", "slow", 1, 10));
    w.ok(rs_rate("p1", "fast", 1, 2_000_000_000));
    assert_eq!(w.state.jobs[&j("p1/slow")].owner(), &d(2));
    assert_eq!(w.state.jobs[&j("p1/fast")].owner(), &d(1));
}

/// A sharded cluster gives a job per shard and one for the config servers; when no
/// daemon has room for all of them, nothing is created (bind failure).
#[test]
fn a_sharded_cluster_binds_whole_or_not_at_all() {
    let mut w = World::new();
    w.ok(register(1, 35));
    w.ok(project("p1"));
    let r = refused(&mut w, cluster("p1", "c1", 3, 10));
    assert!(matches!(r, Rejection::BindFailure { .. }), "{r}");
    let decision = w.ok(cluster("p1", "c1", 2, 10));
    let created: Vec<_> = decision
        .events()
        .filter(|e| matches!(e, Event::BackupJobCreated { .. }))
        .collect();
    assert_eq!(created.len(), 3);
    assert!(w.state.jobs.contains_key(&j("p1/c1/config")));
}

/// A daemon that is down, has assignment disabled or fails the label filter gets no job.
#[test]
fn placement_skips_ineligible_daemons() {
    let mut w = World::new();
    w.ok(register(1, 100));
    w.ok(Command::ReportDaemonLiveness(ReportDaemonLiveness {
        daemon: d(1),
        up: false,
    }));
    w.ok(project("p1"));
    let r = refused(&mut w, rs("p1", "a", 1));
    assert!(matches!(r, Rejection::BindFailure { .. }), "{r}");
    let mut labelled = settings(100);
    labelled.labels.insert(Label::new("tier1").unwrap());
    w.ok(register_with(2, labelled));
    w.ok(register(3, 100));
    w.ok(Command::ConfigureProject(ConfigureProject {
        project: p("p1"),
        daemon_filter: vec![],
        label_filter: vec![Label::new("tier1").unwrap()],
    }));
    w.ok(rs("p1", "a", 1));
    assert_eq!(w.state.jobs[&j("p1/a")].owner(), &d(2));
}

/// MoveJobs moves every job of the source to the destination, each with a new epoch,
/// and tells the destination in one JobsAssigned.
#[test]
fn move_jobs_moves_every_job_with_a_new_epoch() {
    let mut w = fleet();
    let decision = w.ok(move_jobs(1, 2));
    assert_eq!(decision.units.len(), 1);
    let plan = decision.plan.clone().expect("a move has a plan");
    assert_eq!(plan.jobs.len(), 3);
    assert_eq!(plan.needed_bytes, 30 * GIB);
    assert_eq!(plan.destination_free_after, 70 * GIB);
    for job in ["p1/rs0", "p1/rs1", "p1/rs2"] {
        let state = &w.state.jobs[&j(job)];
        assert_eq!(state.epoch, 2);
        assert!(
            matches!(&state.assignment, Assignment::Moving { to, phase: MovePhase::Requested, .. } if *to == d(2))
        );
    }
    assert!(w.state.daemons[&d(1)].jobs.is_empty());
    assert_eq!(w.state.daemons[&d(2)].used_bytes, 30 * GIB);
    let assigned: Vec<_> = decision
        .events()
        .filter(|e| {
            matches!(
                e,
                Event::JobsAssigned {
                    cause: AssignmentCause::Move { .. },
                    ..
                }
            )
        })
        .collect();
    assert_eq!(assigned.len(), 1);
    // The source is told too, on its own subject, so it stops snapshotting the jobs.
    let released: Vec<_> = decision
        .events()
        .filter_map(|e| match e {
            Event::JobsReleased { daemon, jobs, .. } => Some((daemon.clone(), jobs.len())),
            _ => None,
        })
        .collect();
    assert_eq!(released, vec![(d(1), 3)]);
}

/// OPLOG_TTL_RESIZE is recorded for a known job when the retention grows, up to 14 days.
#[test]
fn oplog_ttl_resize_must_grow_within_fourteen_days() {
    let mut w = fleet();
    let resize = |hours: u32, job: &str| {
        Command::ResizeOplogTtl(ResizeOplogTtl {
            job: j(job),
            previous_hours: 24,
            hours,
            reason: "the head on d2 still needs entries".into(),
        })
    };
    let d = w.ok(resize(27, "p1/rs0"));
    assert!(matches!(
        d.events().next(),
        Some(Event::OplogTtlResized { hours: 27, .. })
    ));
    assert!(matches!(
        refused(&mut w, resize(24, "p1/rs0")),
        Rejection::Invalid(_)
    ));
    assert!(matches!(
        refused(&mut w, resize(337, "p1/rs0")),
        Rejection::Invalid(_)
    ));
    assert!(matches!(
        refused(&mut w, resize(27, "p1/nope")),
        Rejection::NotFound { .. }
    ));
}

/// A dry run returns the plan and changes nothing.
#[test]
fn a_dry_run_plans_and_changes_nothing() {
    let mut w = fleet();
    let before = w.state.clone();
    let decision = w
        .run(Command::MoveJobs(MoveJobs {
            from: d(1),
            to: d(2),
            reason: None,
            dry_run: true,
        }))
        .unwrap();
    assert!(decision.units.is_empty());
    let plan = decision.plan.unwrap();
    assert_eq!(plan.jobs.len(), 3);
    let names: Vec<_> = plan.checks.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "distinct_daemons",
            "destination_registered",
            "destination_up",
            "assignment_enabled",
            "no_job_moving",
            "project_filters",
            "head_space"
        ]
    );
    assert_eq!(w.state, before);
}

/// Rule 3: each way a destination can be unfit is refused with its own reason.
#[test]
fn rule_3_refusals() {
    let mut w = fleet();
    assert!(matches!(
        refused(&mut w, move_jobs(1, 1)),
        Rejection::MoveToSelf { .. }
    ));
    assert!(matches!(
        refused(&mut w, move_jobs(1, 9)),
        Rejection::NotFound { .. }
    ));
    assert!(matches!(
        refused(&mut w, move_jobs(9, 1)),
        Rejection::NotFound { .. }
    ));
    assert!(matches!(
        refused(&mut w, move_jobs(2, 3)),
        Rejection::NothingToMove { .. }
    ));

    w.ok(register(4, 100));
    w.ok(Command::RemoveDaemon(RemoveDaemon { daemon: d(4) }));
    assert!(matches!(
        refused(&mut w, move_jobs(1, 4)),
        Rejection::DaemonRemoved { .. }
    ));

    w.ok(Command::ReportDaemonLiveness(ReportDaemonLiveness {
        daemon: d(2),
        up: false,
    }));
    assert!(matches!(
        refused(&mut w, move_jobs(1, 2)),
        Rejection::DestinationDown { .. }
    ));

    let mut off = settings(100);
    off.assignment_enabled = false;
    w.ok(Command::ConfigureDaemon(ConfigureDaemon {
        daemon: d(3),
        settings: off,
    }));
    assert!(matches!(
        refused(&mut w, move_jobs(1, 3)),
        Rejection::AssignmentDisabled { .. }
    ));

    // Exactly as much free space as the jobs use is not enough: it must be more.
    w.ok(register(5, 30));
    let r = refused(&mut w, move_jobs(1, 5));
    assert!(
        matches!(r, Rejection::InsufficientHeadSpace { free_bytes, needed_bytes, .. } if free_bytes == needed_bytes),
        "{r}"
    );

    w.ok(register(6, 100));
    w.ok(Command::ConfigureProject(ConfigureProject {
        project: p("p1"),
        daemon_filter: vec![],
        label_filter: vec![Label::new("tier1").unwrap()],
    }));
    assert!(matches!(
        refused(&mut w, move_jobs(1, 6)),
        Rejection::LabelMismatch { .. }
    ));
    w.ok(Command::ConfigureProject(ConfigureProject {
        project: p("p1"),
        daemon_filter: vec![d(1)],
        label_filter: vec![],
    }));
    assert!(matches!(
        refused(&mut w, move_jobs(1, 6)),
        Rejection::DaemonFilterMismatch { .. }
    ));
}

/// A job already moving cannot be moved again, by MoveJob or by MoveJobs of either end.
#[test]
fn a_moving_job_cannot_move_again() {
    let mut w = fleet();
    w.ok(move_job("p1/rs0", 2));
    assert!(matches!(
        refused(&mut w, move_job("p1/rs0", 3)),
        Rejection::JobAlreadyMoving { .. }
    ));
    assert!(matches!(
        refused(&mut w, move_jobs(1, 3)),
        Rejection::JobAlreadyMoving { .. }
    ));
    assert!(matches!(
        refused(&mut w, move_jobs(2, 3)),
        Rejection::JobAlreadyMoving { .. }
    ));
}

/// Completing a move leaves the job on the destination, with the destination's epoch.
#[test]
fn a_completed_move_leaves_the_job_on_the_destination() {
    let mut w = fleet();
    let plan = w.ok(move_job("p1/rs0", 2)).plan.unwrap();
    let move_id = plan.move_id.clone();
    w.ok(Command::ReportJobMovePhase(ReportJobMovePhase {
        job: j("p1/rs0"),
        move_id: move_id.clone(),
        epoch: 2,
        phase: MovePhase::ReplayingOplog,
    }));
    w.ok(Command::CompleteJobMove(CompleteJobMove {
        head: rebuilt_head(),
        job: j("p1/rs0"),
        move_id: move_id.clone(),
        epoch: 2,
    }));
    let job = &w.state.jobs[&j("p1/rs0")];
    assert_eq!(job.assignment, Assignment::Assigned { daemon: d(2) });
    assert!(
        !w.state.moves.contains_key(&move_id),
        "a move that is over leaves the state"
    );
    let r = refused(
        &mut w,
        Command::CompleteJobMove(CompleteJobMove {
            head: rebuilt_head(),
            job: j("p1/rs0"),
            move_id,
            epoch: 2,
        }),
    );
    assert!(matches!(r, Rejection::MoveNotInProgress { .. }));
}

/// A destination completes a move by saying where the rebuilt head stands (its
/// timestamp and checksum, checked against the source): a completion without it is
/// refused and the job stays moving; a reporter that lost the job hears that first.
#[test]
fn a_completion_without_the_heads_point_is_refused() {
    let mut w = fleet();
    let move_id = w.ok(move_job("p1/rs0", 2)).plan.unwrap().move_id;
    let complete = |epoch, head| {
        Command::CompleteJobMove(CompleteJobMove {
            job: j("p1/rs0"),
            move_id: move_id.clone(),
            epoch,
            head,
        })
    };
    let r = refused(&mut w, complete(2, None));
    assert!(
        matches!(&r, Rejection::HeadMissing { job, .. } if *job == j("p1/rs0")),
        "{r}"
    );
    assert_eq!(r.class(), handoff_domain::RejectionClass::Validation);
    let stale = refused(&mut w, complete(1, None));
    assert!(matches!(stale, Rejection::StaleEpoch { .. }), "{stale}");
    w.ok(complete(2, rebuilt_head()));
    assert_eq!(
        w.state.jobs[&j("p1/rs0")].assignment,
        Assignment::Assigned { daemon: d(2) }
    );
}

/// Rule 9: a failed move (THEFT_FAILED) returns the job to its previous owner with a
/// new epoch, tells that daemon, and the job can be moved again.
#[test]
fn a_failed_move_returns_the_job_and_it_can_move_again() {
    let mut w = fleet();
    let move_id = w.ok(move_job("p1/rs0", 2)).plan.unwrap().move_id;
    let stale = refused(
        &mut w,
        Command::FailJobMove(FailJobMove {
            job: j("p1/rs0"),
            move_id: move_id.clone(),
            epoch: 1,
            reason: "snapshot missing".into(),
        }),
    );
    assert!(matches!(
        stale,
        Rejection::StaleEpoch {
            reported: 1,
            current: 2,
            ..
        }
    ));
    let decision = w.ok(Command::FailJobMove(FailJobMove {
        job: j("p1/rs0"),
        move_id,
        epoch: 2,
        reason: "snapshot missing".into(),
    }));
    assert!(decision.events().any(|e| matches!(e, Event::JobsAssigned { daemon, cause: AssignmentCause::MoveFailed { .. }, .. } if *daemon == d(1))));
    let job = &w.state.jobs[&j("p1/rs0")];
    assert_eq!(job.assignment, Assignment::Assigned { daemon: d(1) });
    assert_eq!(job.epoch, 3);
    assert_eq!(w.state.daemons[&d(2)].used_bytes, 0);
    w.ok(move_job("p1/rs0", 3));
}

/// A daemon that owns jobs, or whose jobs are moving away, cannot be removed.
#[test]
fn a_daemon_with_jobs_cannot_be_removed() {
    let mut w = fleet();
    let r = refused(&mut w, Command::RemoveDaemon(RemoveDaemon { daemon: d(1) }));
    assert!(matches!(r, Rejection::DaemonHasJobs { jobs: 3, .. }));
    w.ok(move_jobs(1, 2));
    let r = refused(&mut w, Command::RemoveDaemon(RemoveDaemon { daemon: d(1) }));
    assert!(matches!(r, Rejection::DaemonHasJobs { .. }));
}

/// Liveness reports change the state only when the liveness changes.
#[test]
fn liveness_reports_are_idempotent() {
    let mut w = fleet();
    let down = Command::ReportDaemonLiveness(ReportDaemonLiveness {
        daemon: d(1),
        up: false,
    });
    assert_eq!(w.ok(down.clone()).units.len(), 1);
    assert_eq!(w.ok(down).units.len(), 0);
    assert_eq!(
        w.state.daemons[&d(1)].status,
        DaemonStatus::Active(Liveness::Down)
    );
}

/// A move of more jobs than fit one atomic unit is split into units, each naming its
/// jobs to the destination; decided again after the first unit, it goes on with the rest
/// and does not start the move twice.
#[test]
fn a_large_move_is_split_into_atomic_units_and_can_continue() {
    let mut w = large_fleet(1);
    let ctx = w.ctx();
    let decision = decide(&move_jobs(1, 2), &ctx, &w.state).unwrap();
    assert_eq!(decision.units.len(), 2);
    assert_units_fit(&decision);
    // The first unit is stored, then the service stops.
    for e in &decision.units[0] {
        w.state.apply(e);
    }
    let rest = decide(&move_jobs(1, 2), &ctx, &w.state).unwrap();
    assert_eq!(rest.units.len(), 1);
    assert!(!rest
        .events()
        .any(|e| matches!(e, Event::MoveStarted { .. })));
    for e in rest.events() {
        w.state.apply(e);
    }
    assert_eq!(w.state.moves[&ctx.command].jobs.len(), 5 * 256);
    assert_eq!(
        decide(&move_jobs(1, 2), &ctx, &w.state)
            .unwrap()
            .units
            .len(),
        0
    );
}

/// Bad values are refused before anything else.
#[test]
fn invalid_values_are_refused() {
    let mut w = fleet();
    let mut bad = settings(1);
    bad.num_workers = 0;
    assert!(matches!(
        refused(&mut w, register_with(7, bad)),
        Rejection::Invalid(_)
    ));
    let mut huge = settings(1);
    huge.head_space_bytes = u64::MAX;
    assert!(matches!(
        refused(&mut w, register_with(7, huge)),
        Rejection::Invalid(_)
    ));
    let r = refused(
        &mut w,
        Command::MoveJobs(MoveJobs {
            from: d(1),
            to: d(2),
            reason: Some("a\u{0}b".into()),
            dry_run: false,
        }),
    );
    assert!(matches!(r, Rejection::Invalid(_)));
    let r = refused(
        &mut w,
        Command::FailJobMove(FailJobMove {
            job: j("p1/rs0"),
            move_id: id(1),
            epoch: 1,
            reason: " ".into(),
        }),
    );
    assert!(matches!(r, Rejection::Invalid(_)));
}

//! Moves over the bus: MISSION rule 3's refusals (each appends nothing of the move, only
//! its record), dry runs, and a move carried to completion or failure.

use anyhow::Result;
use handoff_domain::command::*;
use handoff_domain::event::AssignmentCause;
use handoff_domain::model::DaemonSettings;
use handoff_domain::{Command, Event};
use handoff_protocol::ErrorCode;
use handoff_tests::*;

/// Daemon 1 with three 10 GiB replica sets of project p1; daemons 2 and 3 empty.
pub async fn fleet(stack: &Stack) -> Result<()> {
    stack.apply(register(1, settings(100))).await?;
    stack.apply(configure_project("p1")).await?;
    for name in ["rs0", "rs1", "rs2"] {
        stack.apply(replica_set("p1", name, 10)).await?;
    }
    stack.apply(register(2, settings(100))).await?;
    stack.apply(register(3, settings(100))).await?;
    Ok(())
}

/// Sends `command`, expects the refusal `reason`, and checks that nothing was appended
/// but the record of the refusal (`CommandRejected`, decision 0010).
async fn refused(stack: &Stack, command: Command, code: ErrorCode, reason: &str) -> Result<()> {
    let before = stack.last_seq().await?;
    let id = new_id();
    let error = stack
        .send_as(&id, &command)
        .await?
        .expect_err("the command should be refused");
    assert_eq!(
        (error.code, error.reason.as_str()),
        (code, reason),
        "{}",
        error.message
    );
    assert!(!error.message.is_empty());
    let events = stack.events().await?;
    let after: Vec<_> = events.iter().filter(|r| r.seq > before).collect();
    assert!(
        matches!(&after[..], [r] if matches!(&r.envelope.event,
            Event::CommandRejected { command_id, rejection, .. }
                if *command_id == id && rejection.reason_code() == reason)),
        "a refused command appended events other than its record: {after:?}"
    );
    Ok(())
}

/// Each refusal of rule 3 arrives with its own code and appends nothing but its record.
#[tokio::test]
async fn every_refusal_of_rule_3_is_specific_and_appends_nothing() -> Result<()> {
    let stack = Stack::start().await?;
    fleet(&stack).await?;
    refused(&stack, move_jobs(1, 9), ErrorCode::NotFound, "not_found").await?;
    refused(&stack, move_jobs(1, 1), ErrorCode::Refused, "move_to_self").await?;
    refused(
        &stack,
        move_job("p1/rs0", 1),
        ErrorCode::Refused,
        "move_to_self",
    )
    .await?;

    stack.apply(register(4, settings(100))).await?;
    stack
        .apply(Command::RemoveDaemon(RemoveDaemon { daemon: daemon(4) }))
        .await?;
    refused(
        &stack,
        move_jobs(1, 4),
        ErrorCode::Refused,
        "daemon_removed",
    )
    .await?;

    let disabled = DaemonSettings {
        assignment_enabled: false,
        ..settings(100)
    };
    stack
        .apply(Command::ConfigureDaemon(ConfigureDaemon {
            daemon: daemon(2),
            settings: disabled,
        }))
        .await?;
    refused(
        &stack,
        move_jobs(1, 2),
        ErrorCode::Refused,
        "assignment_disabled",
    )
    .await?;

    stack
        .apply(Command::ReportDaemonLiveness(ReportDaemonLiveness {
            daemon: daemon(3),
            up: false,
        }))
        .await?;
    refused(
        &stack,
        move_jobs(1, 3),
        ErrorCode::Refused,
        "destination_down",
    )
    .await?;

    // 30 GiB of jobs need more than 30 GiB free.
    stack.apply(register(5, settings(30))).await?;
    refused(
        &stack,
        move_jobs(1, 5),
        ErrorCode::Refused,
        "insufficient_head_space",
    )
    .await?;

    stack.apply(register(6, settings(100))).await?;
    stack
        .apply(Command::ConfigureProject(ConfigureProject {
            project: project("p1"),
            daemon_filter: vec![],
            label_filter: vec![label("tier1")],
        }))
        .await?;
    refused(
        &stack,
        move_jobs(1, 6),
        ErrorCode::Refused,
        "label_mismatch",
    )
    .await?;
    stack
        .apply(Command::ConfigureProject(ConfigureProject {
            project: project("p1"),
            daemon_filter: vec![daemon(1)],
            label_filter: vec![],
        }))
        .await?;
    refused(
        &stack,
        move_jobs(1, 6),
        ErrorCode::Refused,
        "daemon_filter_mismatch",
    )
    .await?;
    stack.apply(configure_project("p1")).await?;

    stack.apply(move_job("p1/rs0", 6)).await?;
    refused(
        &stack,
        move_jobs(1, 6),
        ErrorCode::Conflict,
        "job_already_moving",
    )
    .await?;
    refused(
        &stack,
        move_job("p1/rs0", 6),
        ErrorCode::Conflict,
        "job_already_moving",
    )
    .await?;
    refused(
        &stack,
        move_jobs(2, 6),
        ErrorCode::Refused,
        "nothing_to_move",
    )
    .await?;
    Ok(())
}

/// A dry run returns each job, the checks passed and the head space before and after,
/// and appends nothing.
#[tokio::test]
async fn a_dry_run_returns_the_plan_and_appends_nothing() -> Result<()> {
    let stack = Stack::start().await?;
    fleet(&stack).await?;
    let before = stack.last_seq().await?;
    let applied = stack
        .apply(Command::MoveJobs(MoveJobs {
            from: daemon(1),
            to: daemon(2),
            reason: None,
            dry_run: true,
        }))
        .await?;
    assert!(applied.dry_run && applied.events.is_empty());
    let plan = applied.plan.expect("a dry run has a plan");
    assert_eq!(plan.jobs.len(), 3);
    assert_eq!(plan.checks.len(), 7);
    assert_eq!(plan.destination_free_before, 100 << 30);
    assert_eq!(plan.destination_free_after, 70 << 30);
    assert_eq!(stack.last_seq().await?, before);
    Ok(())
}

/// MoveJobs appends one atomic unit: the move, each job's start, the source's release and
/// the destination's assignment; completing and failing jobs finish it, a failed job returns to its
/// previous owner with a new epoch (THEFT_FAILED) and can be moved again.
#[tokio::test]
async fn a_move_runs_to_completion_and_failure() -> Result<()> {
    let stack = Stack::start().await?;
    fleet(&stack).await?;
    let applied = stack.apply(move_jobs(1, 2)).await?;
    let seqs: Vec<u64> = applied.events.iter().map(|e| e.seq).collect();
    assert_eq!(
        seqs.len(),
        7,
        "MoveStarted, three JobMoveStarted, JobsReleased, JobsAssigned, CommandAccepted"
    );
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "one contiguous batch"
    );
    let plan = applied.plan.expect("a move has a plan");
    let move_id = plan.move_id.clone();
    let epoch = plan.jobs[0].epoch;

    // The destination, daemon 2, reports.
    stack
        .report(
            2,
            Command::CompleteJobMove(CompleteJobMove {
                head: rebuilt_head(),
                job: job("p1/rs0"),
                move_id: move_id.clone(),
                epoch,
            }),
        )
        .await?;
    let stale = send_command(
        &stack.client,
        &stack.daemon_user(2).await?,
        &new_id(),
        &Command::CompleteJobMove(CompleteJobMove {
            head: None,
            job: job("p1/rs1"),
            move_id: move_id.clone(),
            epoch: epoch - 1,
        }),
    )
    .await?
    .expect_err("a stale epoch is refused");
    assert_eq!(stale.reason, "stale_epoch");
    stack
        .apply(Command::FailJobMove(FailJobMove {
            job: job("p1/rs1"),
            move_id: move_id.clone(),
            epoch,
            reason: "snapshot missing".into(),
        }))
        .await?;

    let events = stack.events().await?;
    let failed = of_type(&events, "JobMoveFailed");
    assert!(
        matches!(failed[..], [Event::JobMoveFailed { returned_to, epoch: e, .. }] if *returned_to == daemon(1) && *e == epoch + 1)
    );
    let returned = of_type(&events, "JobsAssigned")
        .into_iter()
        .filter(|e| matches!(e, Event::JobsAssigned { daemon: d, cause: AssignmentCause::MoveFailed { .. }, jobs } if *d == daemon(1) && jobs[0].epoch == epoch + 1))
        .count();
    assert_eq!(
        returned, 1,
        "the previous owner is told it has the job back"
    );
    // Rule 9: moved again.
    stack.apply(move_job("p1/rs1", 3)).await?;
    Ok(())
}

/// A move of more jobs than one atomic batch holds lands whole, in several batches,
/// each naming its jobs to the destination.
#[tokio::test]
async fn a_move_of_over_a_thousand_jobs_lands_whole() -> Result<()> {
    let stack = Stack::start().await?;
    let jobs = big_fleet(&stack).await?;
    let applied = stack.apply(move_jobs(1, 2)).await?;
    // Two units, each with the source's release and the destination's assignment, the
    // first with the command's CommandAccepted.
    assert_eq!(applied.events.len(), 1 + jobs + 4 + 1);
    let events = stack.events().await?;
    assert_eq!(of_type(&events, "JobMoveStarted").len(), jobs);
    let assigned: usize = of_type(&events, "JobsAssigned")
        .into_iter()
        .filter_map(|e| match e {
            Event::JobsAssigned {
                daemon: d, jobs, ..
            } if *d == daemon(2) => Some(jobs.len()),
            _ => None,
        })
        .sum();
    assert_eq!(assigned, jobs);
    let released: usize = of_type(&events, "JobsReleased")
        .into_iter()
        .filter_map(|e| match e {
            Event::JobsReleased {
                daemon: d, jobs, ..
            } if *d == daemon(1) => Some(jobs.len()),
            _ => None,
        })
        .sum();
    assert_eq!(released, jobs);
    Ok(())
}

/// Four clusters of 256 shards (1,028 jobs) on daemon 1; daemon 2 empty.
pub async fn big_fleet(stack: &Stack) -> Result<usize> {
    use handoff_domain::ids::DeploymentName;
    use handoff_domain::model::{Deployment, JobSize, Shard};
    stack.apply(register(1, settings(10_000))).await?;
    stack.apply(configure_project("p1")).await?;
    let size = JobSize {
        head_size_bytes: 1 << 20,
        oplog_bytes_per_hour: 0,
    };
    for c in 0..4 {
        stack
            .apply(Command::CreateBackupJobs(CreateBackupJobs {
                project: project("p1"),
                deployment: Deployment::ShardedCluster {
                    name: DeploymentName::new(format!("c{c}")).expect("valid"),
                    shards: (0..256)
                        .map(|i| Shard {
                            name: DeploymentName::new(format!("s{i}")).expect("valid"),
                            size,
                        })
                        .collect(),
                    config_servers: size,
                },
            }))
            .await?;
    }
    stack.apply(register(2, settings(10_000))).await?;
    Ok(4 * 257)
}

//! Conflicting commands from several command service instances: exactly one wins per
//! job, the others get a clear conflict.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Result;
use handoff_command::Executor;
use handoff_domain::Event;
use handoff_eventlog::EventLog;
use handoff_protocol::api::CommandRequest;
use handoff_protocol::ErrorCode;
use handoff_tests::*;

use crate::moves::fleet;

/// Two instances, many concurrent MoveJobs of the same daemon and MoveJob of the same
/// jobs: each job is started exactly once, and every loser is told why.
#[tokio::test]
async fn concurrent_moves_of_the_same_jobs_have_exactly_one_winner() -> Result<()> {
    let stack = Stack::start().await?;
    let _second = CommandService::start(&stack.url(), Default::default()).await?;
    fleet(&stack).await?;
    let mut sends = Vec::new();
    for round in 0..4 {
        for (to, command) in [
            (2, move_jobs(1, 2)),
            (3, move_jobs(1, 3)),
            (2, move_job("p1/rs0", 2)),
            (3, move_job("p1/rs1", 3)),
        ] {
            let client = async_nats::connect(stack.url()).await?;
            let creds = stack.creds.clone();
            sends.push(tokio::spawn(async move {
                (
                    round,
                    to,
                    send_command(&client, &creds, &new_id(), &command).await,
                )
            }));
        }
    }
    let mut winners = 0;
    for s in sends {
        let (_, _, reply) = s.await?;
        match reply? {
            Ok(applied) => winners += usize::from(!applied.events.is_empty()),
            Err(e) => assert!(
                matches!(
                    (e.code, e.reason.as_str()),
                    (ErrorCode::Conflict, "job_already_moving")
                        | (ErrorCode::Refused, "nothing_to_move")
                ),
                "unexpected refusal: {e:?}"
            ),
        }
    }
    assert!(winners >= 1);
    let events = stack.events().await?;
    let mut starts: BTreeMap<String, usize> = BTreeMap::new();
    for e in of_type(&events, "JobMoveStarted") {
        if let Event::JobMoveStarted { job, .. } = e {
            *starts.entry(job.to_string()).or_default() += 1;
        }
    }
    assert_eq!(starts.len(), 3, "every job moved: {starts:?}");
    assert!(
        starts.values().all(|n| *n == 1),
        "a job was started twice: {starts:?}"
    );
    Ok(())
}

/// An instance that decided on a stale model loses at the append (the stream's
/// optimistic concurrency), catches up and answers with the conflict.
#[tokio::test]
async fn a_stale_decision_is_caught_by_the_stream() -> Result<()> {
    let stack = Stack::start().await?;
    fleet(&stack).await?;
    // An executor that will not see the next command before it decides.
    let log = EventLog::open(stack.client.clone(), Default::default()).await?;
    let mut stale = Executor::start(log, Duration::from_secs(10)).await?;
    stack.apply(move_jobs(1, 2)).await?;
    let seq = stack.last_seq().await?;
    let error = stale
        .execute(
            CommandRequest {
                id: new_id(),
                actor: stack.creds.user.clone(),
                at: 0,
                client: None,
                command: move_jobs(1, 3),
            },
            None,
        )
        .await
        .expect_err("the stale decision must lose");
    assert_eq!(
        (error.code, error.reason.as_str()),
        (ErrorCode::Conflict, "job_already_moving")
    );
    assert_eq!(stack.last_seq().await?, seq);
    Ok(())
}

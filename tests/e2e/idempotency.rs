//! A command retried with the same id changes nothing the second time, whether its
//! reply or JetStream's acknowledgement was lost.

use std::time::Duration;

use anyhow::Result;
use handoff_domain::Event;
use handoff_protocol::ErrorCode;
use handoff_testkit::proxy::AckDropper;
use handoff_testkit::NatsServer;
use handoff_tests::*;

use crate::moves::{big_fleet, fleet};

/// Sent twice, a command is applied once; the second reply lists the first's events.
#[tokio::test]
async fn the_same_command_sent_twice_is_applied_once() -> Result<()> {
    let stack = Stack::start().await?;
    fleet(&stack).await?;
    let id = new_id();
    let first = stack
        .send_as(&id, &move_jobs(1, 2))
        .await?
        .expect("applied");
    let seq = stack.last_seq().await?;
    let second = stack
        .send_as(&id, &move_jobs(1, 2))
        .await?
        .expect("answered");
    assert!(!first.duplicate && second.duplicate);
    assert_eq!(first.events, second.events);
    assert_eq!(stack.last_seq().await?, seq);

    // The same id with another command is refused, not mistaken for a retry.
    let reused = stack
        .send_as(&id, &move_jobs(1, 3))
        .await?
        .expect_err("refused");
    assert_eq!(
        (reused.code, reused.reason.as_str()),
        (ErrorCode::Validation, "id_reused")
    );
    assert_eq!(stack.last_seq().await?, seq);

    // A restarted service still knows the id: it rebuilds its model from the stream.
    let mut stack = stack;
    stack.commands.take().expect("running").stop().await?;
    stack.commands = Some(CommandService::start(&stack.url(), Default::default()).await?);
    let third = stack
        .send_as(&id, &move_jobs(1, 2))
        .await?
        .expect("answered");
    assert!(third.duplicate);
    assert_eq!(third.events, first.events);
    assert_eq!(stack.last_seq().await?, seq);
    Ok(())
}

/// A command service whose connection loses JetStream acknowledgements.
async fn lossy_stack() -> Result<(Stack, AckDropper)> {
    let server = NatsServer::start().await?;
    let proxy = AckDropper::start(server.port()).await?;
    let mut config = handoff_command::Config::default();
    config.event_log.ack_timeout = Duration::from_millis(500);
    let commands = CommandService::start(&proxy.url(), config).await?;
    let client = server.connect().await?;
    let stack = Stack::on(server, client, Some(commands))?;
    Ok((stack, proxy))
}

/// The acknowledgement of a stored append is lost: the service answers that the log is
/// unavailable; the caller retries with the same id and gets the applied events, and
/// nothing is stored twice.
#[tokio::test]
async fn a_lost_acknowledgement_retried_is_recognised_as_applied() -> Result<()> {
    let (stack, proxy) = lossy_stack().await?;
    fleet(&stack).await?;
    let before = stack.last_seq().await?;
    let id = new_id();
    proxy.drop_next_acks_of(handoff_protocol::subjects::STREAM, 1);
    let lost = stack
        .send_as(&id, &move_jobs(1, 2))
        .await?
        .expect_err("the ack was lost");
    assert_eq!(lost.code, ErrorCode::Unavailable);
    assert_eq!(proxy.dropped(), 1);
    let stored = stack.last_seq().await?;
    assert_eq!(
        stored,
        before + 6,
        "the append was stored although its ack was lost"
    );

    let retried = stack
        .send_as(&id, &move_jobs(1, 2))
        .await?
        .expect("applied");
    assert!(retried.duplicate);
    assert_eq!(retried.events.len(), 6);
    assert_eq!(stack.last_seq().await?, stored);
    let events = stack.events().await?;
    assert_eq!(of_type(&events, "JobMoveStarted").len(), 3);
    Ok(())
}

/// The acknowledgement of the first batch of a large move is lost, so the service stops
/// half-way: every job is either wholly started (with its assignment) or untouched, and
/// the retry appends the rest without starting the move or any job twice.
#[tokio::test]
async fn a_large_move_cut_half_way_is_finished_by_its_retry() -> Result<()> {
    let (stack, proxy) = lossy_stack().await?;
    let jobs = big_fleet(&stack).await?;
    let id = new_id();
    proxy.drop_next_acks_of(handoff_protocol::subjects::STREAM, 1);
    let cut = stack
        .send_as(&id, &move_jobs(1, 2))
        .await?
        .expect_err("the ack was lost");
    assert_eq!(cut.code, ErrorCode::Unavailable);

    let events = stack.events().await?;
    let started: Vec<_> = of_type(&events, "JobMoveStarted")
        .into_iter()
        .filter_map(|e| match e {
            Event::JobMoveStarted { job, .. } => Some(job.clone()),
            _ => None,
        })
        .collect();
    let mut assigned: Vec<_> = of_type(&events, "JobsAssigned")
        .into_iter()
        .filter_map(|e| match e {
            Event::JobsAssigned {
                daemon: d, jobs, ..
            } if *d == daemon(2) => Some(jobs.iter().map(|j| j.job.clone()).collect::<Vec<_>>()),
            _ => None,
        })
        .flatten()
        .collect();
    assert!(
        !started.is_empty() && started.len() < jobs,
        "cut half-way: {} of {jobs}",
        started.len()
    );
    let mut started_sorted = started.clone();
    started_sorted.sort();
    assigned.sort();
    assert_eq!(
        started_sorted, assigned,
        "a job started without its assignment, or the reverse"
    );

    let done = stack
        .send_as(&id, &move_jobs(1, 2))
        .await?
        .expect("finished");
    assert_eq!(
        done.events.len(),
        1 + jobs + 4,
        "the reply lists every event of the move (two units, each with its release and assignment)"
    );
    let all = stack.events().await?;
    let stored: Vec<u64> = all
        .iter()
        .filter(|r| r.envelope.command == id)
        .map(|r| r.seq)
        .collect();
    let replied: Vec<u64> = done.events.iter().map(|e| e.seq).collect();
    assert_eq!(replied, stored);
    let events = stack.events().await?;
    assert_eq!(of_type(&events, "MoveStarted").len(), 1);
    assert_eq!(of_type(&events, "JobMoveStarted").len(), jobs);
    Ok(())
}

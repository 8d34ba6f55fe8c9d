//! A command retried with the same id changes nothing the second time, whether its
//! reply or JetStream's acknowledgement was lost.

use std::time::Duration;

use anyhow::Result;
use handoff_domain::command::ReportDaemonLiveness;
use handoff_domain::{Command, CommandId, Event};
use handoff_eventlog::Recorded;
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
    lossy_stack_with(handoff_command::Config::default()).await
}

/// The same, with these settings (and a short acknowledgement timeout).
async fn lossy_stack_with(mut config: handoff_command::Config) -> Result<(Stack, AckDropper)> {
    let server = NatsServer::start().await?;
    let proxy = AckDropper::start(server.port()).await?;
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
        before + 7,
        "the append was stored although its ack was lost"
    );

    let retried = stack
        .send_as(&id, &move_jobs(1, 2))
        .await?
        .expect("applied");
    assert!(retried.duplicate);
    assert_eq!(retried.events.len(), 7);
    assert_eq!(stack.last_seq().await?, stored);
    let events = stack.events().await?;
    assert_eq!(of_type(&events, "JobMoveStarted").len(), 3);
    Ok(())
}

/// The acknowledgement of the first batch of a large move is lost, so the service stops
/// half-way: every job is either wholly started (with its assignment) or untouched, and
/// the retry appends the rest, ending with `MoveResumed`, without starting the move or
/// any job twice.
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
        1 + jobs + 4 + 1 + 1,
        "the reply lists every event of the move (two units, each with its release and assignment, the first with CommandAccepted, and the resumption)"
    );
    assert_eq!(
        done.events.last().map(|e| e.kind.as_str()),
        Some("MoveResumed")
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

/// The first `kind` event of the stream after `after` whose data says `move_id`.
async fn move_event(
    stack: &Stack,
    kind: &str,
    move_id: &CommandId,
    after: u64,
) -> Result<Recorded> {
    first_event(stack, &format!("{kind} of {move_id}"), TIMEOUT, |r| {
        r.seq > after
            && r.envelope.event.type_name() == kind
            && serde_json::to_value(&r.envelope.event)
                .is_ok_and(|v| v["data"]["move_id"] == move_id.as_str())
    })
    .await
}

/// A large move cut after its first unit whose caller never comes back (a CLI killed, an
/// operator gone home): the command service finishes it by itself once it has been left
/// for `interrupted_after`. While it cannot (its destination went down), the move is
/// MOVE_INTERRUPTED, `handoff moves` says it is interrupted and how many jobs started,
/// and the service keeps trying; once the destination is back it starts the rest,
/// closing the alert. Every job is started once, the move once, and a retry with the
/// same id is answered with all of it.
#[tokio::test]
async fn a_large_move_cut_and_left_is_finished_by_the_command_service() -> Result<()> {
    let (stack, proxy) = lossy_stack_with(handoff_command::Config {
        interrupted_after: Duration::from_secs(3),
        ..Default::default()
    })
    .await?;
    let views = tempfile::tempdir()?;
    let _projector = ProjectorProcess::spawn(&stack.url(), views.path(), &[])?;
    let jobs = big_fleet(&stack).await?;
    let id = new_id();
    proxy.drop_next_acks_of(handoff_protocol::subjects::STREAM, 1);
    let cut = stack
        .send_as(&id, &move_jobs(1, 2))
        .await?
        .expect_err("the ack was lost");
    assert_eq!(cut.code, ErrorCode::Unavailable);
    // Left alone, and before the service looks again, the destination goes down.
    let liveness = |up| {
        Command::ReportDaemonLiveness(ReportDaemonLiveness {
            daemon: daemon(2),
            up,
        })
    };
    stack.apply(liveness(false)).await?;

    let interrupted = move_event(&stack, "MoveInterrupted", &id, 0).await?;
    let data = serde_json::to_value(&interrupted.envelope.event)?["data"].clone();
    assert_eq!(
        (data["planned"].as_u64(), data["started"].as_u64()),
        (Some(jobs as u64), Some(996)),
        "{data}"
    );
    assert!(
        data["reason"].as_str().is_some_and(|r| r.contains("down")),
        "says why the rest cannot start: {data}"
    );
    wait_for_checkpoint(&stack.client, interrupted.seq).await?;
    let moves = handoff_ok(&stack.url(), &["moves"])?.stdout;
    assert!(
        moves.contains("interrupted") && moves.contains(&format!("996 of {jobs}")),
        "{moves}"
    );
    let alerts = handoff_ok(&stack.url(), &["alerts"])?.stdout;
    assert!(
        alerts.contains("MOVE_INTERRUPTED") && alerts.contains(id.as_str()),
        "{alerts}"
    );

    stack.apply(liveness(true)).await?;
    let resumed = move_event(&stack, "MoveResumed", &id, interrupted.seq).await?;
    let events = stack.events().await?;
    assert_eq!(of_type(&events, "MoveStarted").len(), 1);
    assert_eq!(of_type(&events, "JobMoveStarted").len(), jobs);
    assert_eq!(of_type(&events, "MoveInterrupted").len(), 1);
    assert_eq!(of_type(&events, "MoveResumed").len(), 1);
    let last = events.last().expect("events");
    assert_eq!(
        (last.seq, last.envelope.command.clone(), last.envelope.last),
        (resumed.seq, id.clone(), true),
        "the resumption is the move's last event"
    );
    let answer = stack
        .send_as(&id, &move_jobs(1, 2))
        .await?
        .expect("answered");
    assert!(answer.duplicate);
    let stored: Vec<u64> = events
        .iter()
        .filter(|r| r.envelope.command == id)
        .map(|r| r.seq)
        .collect();
    assert_eq!(
        answer.events.iter().map(|e| e.seq).collect::<Vec<_>>(),
        stored
    );

    wait_for_checkpoint(&stack.client, resumed.seq).await?;
    let alerts = handoff_ok(&stack.url(), &["alerts"])?.stdout;
    assert!(!alerts.contains("MOVE_INTERRUPTED"), "closed: {alerts}");
    let moves = handoff_ok(&stack.url(), &["moves", "--json"])?.stdout;
    let moves: serde_json::Value = serde_json::from_str(&moves)?;
    let view = moves["items"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["move_id"] == id.as_str()))
        .expect("the move's view");
    assert_eq!(
        (view["status"].as_str(), view["planned"].as_u64()),
        (Some("in_progress"), Some(jobs as u64)),
        "{view}"
    );
    let started: u64 = view["phases"]
        .as_object()
        .map(|p| p.values().filter_map(|n| n.as_u64()).sum())
        .unwrap_or(0);
    assert_eq!(started, jobs as u64);
    Ok(())
}

//! A command id's answer is final across command service instances (decision 0010): once
//! refused, it is refused to every later attempt and never applied; once applied, no
//! refusal of it is recorded.

use std::time::Duration;

use anyhow::Result;
use handoff_command::Executor;
use handoff_domain::command::FailJobMove;
use handoff_domain::{Command, Event, Rejection};
use handoff_eventlog::{EventLog, Outgoing, Recorded};
use handoff_protocol::api::CommandRequest;
use handoff_protocol::{now_ms, subjects, ErrorBody, ErrorCode, EventEnvelope};
use handoff_tests::*;

use crate::moves::fleet;

/// The events stored with `id` as their command.
fn events_of<'a>(events: &'a [Recorded], id: &handoff_domain::CommandId) -> Vec<&'a Recorded> {
    events
        .iter()
        .filter(|r| r.envelope.command == *id)
        .collect()
}

/// The rejections of `id` on record.
fn rejections_of<'a>(events: &'a [Recorded], id: &handoff_domain::CommandId) -> Vec<&'a Rejection> {
    events
        .iter()
        .filter_map(|r| match &r.envelope.event {
            Event::CommandRejected {
                command_id,
                rejection,
                ..
            } if command_id == id => Some(rejection),
            _ => None,
        })
        .collect()
}

/// The chaos run's story, with two command service instances on one stream: a MoveJob's
/// first attempt is held back (signed, not delivered: an instance frozen with it), and the
/// client's second attempt of the same id is refused because another move holds the job.
/// That move then fails, so the job may move, and the held attempt arrives, within its
/// signature's freshness. It is refused with the same answer, as is every attempt after
/// it, whichever instance takes it; nothing of the command is stored, and the same id
/// with another command is still `id_reused`.
#[tokio::test]
async fn a_command_refused_once_is_refused_for_good_by_every_instance() -> Result<()> {
    let stack = Stack::start().await?;
    let _second = CommandService::start(&stack.url(), Default::default()).await?;
    fleet(&stack).await?;
    let holder = stack.apply(move_job("p1/rs0", 2)).await?;
    let epoch = holder.plan.as_ref().expect("a move has a plan").jobs[0].epoch;

    let id = new_id();
    let command = move_job("p1/rs0", 3);
    // Signed a second before the attempt the client sends next (its timeout).
    let held = stack
        .creds
        .sign_command_at(&id, &command, now_ms() - 1_000, Some("handoff-tests"));
    let refused = stack
        .send_as(&id, &command)
        .await?
        .expect_err("another move holds the job");
    assert_eq!(
        (refused.code, refused.reason.as_str()),
        (ErrorCode::Conflict, "job_already_moving"),
        "{}",
        refused.message
    );

    stack
        .apply(Command::FailJobMove(FailJobMove {
            job: job("p1/rs0"),
            move_id: holder.command.clone(),
            epoch,
            reason: "rebuild failed".into(),
        }))
        .await?;
    let mut dry_run = move_job("p1/rs0", 3);
    if let Command::MoveJob(m) = &mut dry_run {
        m.dry_run = true;
    }
    stack
        .apply(dry_run)
        .await
        .expect("the job may move now, under another id");

    let late = handoff_client::exchange(
        &stack.client,
        &held.subject,
        held.payload,
        Some(&held.signature),
        TIMEOUT,
    )
    .await?
    .into_result()
    .expect_err("the held attempt gets the answer already given");
    assert_eq!(late, refused);
    // Each attempt signed anew, as the client does (a millisecond apart here, so no two
    // signatures are alike), and taken by either instance.
    for k in 1..=6 {
        let attempt =
            stack
                .creds
                .sign_command_at(&id, &command, now_ms() + k, Some("handoff-tests"));
        let again = request_signed(
            &stack.client,
            &attempt.subject,
            attempt.payload,
            Some(&attempt.signature),
        )
        .await?
        .expect_err("every later attempt gets it too");
        assert_eq!(again, refused);
    }
    let reused = stack
        .send_as(&id, &move_job("p1/rs1", 3))
        .await?
        .expect_err("another command under the same id");
    assert_eq!(
        (reused.code, reused.reason.as_str()),
        (ErrorCode::Validation, "id_reused")
    );

    let events = stack.events().await?;
    assert!(
        events_of(&events, &id).is_empty(),
        "the refused command has events: {:?}",
        events_of(&events, &id)
    );
    assert!(
        !of_type(&events, "JobMoveStarted")
            .iter()
            .any(|e| matches!(e, Event::JobMoveStarted { move_id, .. } if *move_id == id)),
        "the refused move started"
    );
    assert_eq!(
        of_type(&events, "CommandRejected")
            .iter()
            .filter(|e| matches!(e, Event::CommandRejected { command_id, .. } if *command_id == id))
            .count(),
        1,
        "one record of the refusal, however many attempts"
    );
    Ok(())
}

/// A rejection of the id recorded (by another instance, answering another attempt) after
/// this instance last caught up, with nothing the decision writes changed meanwhile: the
/// decision's first unit holds the id's `CommandAccepted`, expecting the answer subject
/// as the instance saw it, so its append conflicts; the instance catches up and answers
/// the recorded rejection, and nothing of the command is stored.
#[tokio::test]
async fn a_rejection_recorded_after_the_instance_caught_up_wins_over_its_decision() -> Result<()> {
    let stack = Stack::start().await?;
    fleet(&stack).await?;
    // Folded to here, and folding nothing more unless a command makes it.
    let log = EventLog::open(stack.client.clone(), Default::default()).await?;
    let mut instance = Executor::start(log, Duration::from_secs(10)).await?;

    let request = CommandRequest {
        id: new_id(),
        actor: stack.creds.user.clone(),
        at: now_ms(),
        client: None,
        command: move_job("p1/rs0", 3),
    };
    let rejection = Rejection::DestinationDown { daemon: daemon(3) };
    let record = Event::CommandRejected {
        command_id: request.id.clone(),
        command: request.command.name().to_owned(),
        rejection: rejection.clone(),
    };
    let subject = subjects::aggregate(&record.aggregate());
    let envelope = EventEnvelope {
        version: Event::VERSION,
        command: new_id(),
        actor: request.actor.clone(),
        at: now_ms(),
        last: true,
        digest: handoff_command::executor::digest(&request),
        signature: None,
        event: record,
    };
    let log = stack.log().await?;
    log.append(&[Outgoing {
        expected_last_subject_seq: log.last_sequence_of(&subject).await?,
        expected_subject: None,
        expected_last_seq: None,
        msg_id: format!("{}:answer:rejected", request.id),
        payload: envelope.encode().into(),
        subject,
    }])
    .await?;

    let id = request.id.clone();
    let answer = instance
        .execute(request, None)
        .await
        .expect_err("the recorded rejection is the answer");
    assert_eq!(answer, ErrorBody::from(rejection));
    let events = stack.events().await?;
    assert!(
        events_of(&events, &id).is_empty(),
        "the rejected command was applied: {:?}",
        events_of(&events, &id)
    );
    assert_eq!(rejections_of(&events, &id).len(), 1);
    Ok(())
}

/// The other order: an instance whose model still has the job held by another move
/// (it would refuse) gets an attempt of a command another instance has applied since.
/// It does not record a refusal: it looks at the stream's end before refusing, finds the
/// command applied and answers with its events.
#[tokio::test]
async fn a_command_applied_elsewhere_is_not_refused_by_a_lagging_instance() -> Result<()> {
    let stack = Stack::start().await?;
    fleet(&stack).await?;
    let holder = stack.apply(move_job("p1/rs0", 2)).await?;
    let epoch = holder.plan.as_ref().expect("a move has a plan").jobs[0].epoch;
    let log = EventLog::open(stack.client.clone(), Default::default()).await?;
    let mut lagging = Executor::start(log, Duration::from_secs(10)).await?;

    stack
        .apply(Command::FailJobMove(FailJobMove {
            job: job("p1/rs0"),
            move_id: holder.command.clone(),
            epoch,
            reason: "rebuild failed".into(),
        }))
        .await?;
    let id = new_id();
    let command = move_job("p1/rs0", 3);
    let applied = stack.send_as(&id, &command).await?.expect("applied");

    let answer = lagging
        .execute(
            CommandRequest {
                id: id.clone(),
                actor: stack.creds.user.clone(),
                at: now_ms(),
                client: None,
                command,
            },
            None,
        )
        .await
        .expect("answered as applied");
    assert!(answer.duplicate);
    assert_eq!(answer.events, applied.events);
    let events = stack.events().await?;
    assert!(rejections_of(&events, &id).is_empty());
    Ok(())
}

/// A service's report that is refused (here a daemon registering again, as it does at
/// every restart) is not recorded: its service sends it again while the condition lasts,
/// and a record per resend would only grow the stream. An operator's refused command is
/// recorded, once.
#[tokio::test]
async fn refused_reports_are_not_recorded_refused_commands_are() -> Result<()> {
    let stack = Stack::start().await?;
    stack.apply(register(1, settings(100))).await?;
    for _ in 0..3 {
        let again = stack
            .send_as(&new_id(), &register(1, settings(100)))
            .await?;
        assert!(again.is_err(), "a second registration is refused");
    }
    let rejected = |events: &[Recorded]| of_type(events, "CommandRejected").len();
    assert_eq!(rejected(&stack.events().await?), 0, "no record of a report");
    // Daemon 2 is not registered: the move is refused, and that is recorded.
    let refused = stack.send_as(&new_id(), &move_jobs(1, 2)).await?;
    assert!(refused.is_err(), "a move to an unknown daemon is refused");
    assert_eq!(
        rejected(&stack.events().await?),
        1,
        "one record of a command"
    );
    Ok(())
}

/// A new command id made far ahead of the service's clock (its ULID's time) is refused,
/// and nothing is stored: such an id, once out of the model's window, would make every
/// later id be looked up in the command archive until that time. An id made a minute
/// ahead (a client's clock a little fast) is taken.
#[tokio::test]
async fn a_new_id_made_far_in_the_future_is_refused() -> Result<()> {
    let stack = Stack::start().await?;
    let end = stack.last_seq().await?;
    let at = |ahead_ms: u64| {
        let ulid = ulid::Ulid::from_parts(now_ms() + ahead_ms, rand_bits());
        handoff_domain::CommandId::new(ulid.to_string()).expect("a ULID")
    };
    let ahead = at(3_600_000);
    // The same signed request twice: refused alike, nothing remembered of the first (it
    // would be a replay) and nothing recorded.
    let signed = stack.creds.sign_command_at(
        &ahead,
        &register(1, settings(10)),
        now_ms(),
        Some("handoff-tests"),
    );
    for _ in 0..2 {
        let refused = request_signed(
            &stack.client,
            &signed.subject,
            signed.payload.clone(),
            Some(&signed.signature),
        )
        .await?
        .expect_err("an id an hour ahead");
        assert_eq!(
            (refused.code, refused.reason.as_str()),
            (ErrorCode::Validation, "id_in_the_future"),
            "{refused:?}"
        );
    }
    assert_eq!(stack.last_seq().await?, end, "nothing stored");
    stack
        .send_as(&at(60_000), &register(1, settings(10)))
        .await?
        .map_err(|e| anyhow::anyhow!("an id a minute ahead: {}", e.message))?;
    Ok(())
}

/// Random low bits of a ULID, so no two ids of the same millisecond collide.
fn rand_bits() -> u128 {
    ulid::Ulid::new().random()
}

//! Conflicting commands from several command service instances: exactly one wins per
//! job, the others get a clear conflict.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{Context as _, Result};
use handoff_command::{executor::Signed, Executor};
use handoff_domain::auth::Role;
use handoff_domain::command::{ConfigureProject, FailoverJob, RemoveUser, ReportDaemonLiveness};
use handoff_domain::{Command, CommandId, Event};
use handoff_eventlog::EventLog;
use handoff_protocol::api::{endpoint_of, CommandRequest, ENDPOINTS};
use handoff_protocol::{Applied, ErrorBody, ErrorCode};
use handoff_tests::*;

use crate::moves::fleet;

/// How many move requests (`move-jobs`, `move-job`) each of the `instances` command
/// service instances handled, from their micro service stats: `$SRV.STATS` is answered
/// by every instance, each with its own counts.
async fn move_requests_per_instance(
    client: &async_nats::Client,
    instances: usize,
) -> Result<Vec<u64>> {
    use futures::StreamExt;
    let inbox = client.new_inbox();
    let mut replies = client.subscribe(inbox.clone()).await?;
    client
        .publish_with_reply(
            format!("$SRV.STATS.{}", handoff_command::SERVICE_NAME),
            inbox,
            Default::default(),
        )
        .await?;
    let mut handled = BTreeMap::new();
    while handled.len() < instances {
        let reply = tokio::time::timeout(TIMEOUT, replies.next())
            .await?
            .context("the stats replies ended")?;
        let stats: serde_json::Value = serde_json::from_slice(&reply.payload)?;
        let moves: u64 = stats["endpoints"]
            .as_array()
            .context("stats list the endpoints")?
            .iter()
            .filter(|e| {
                ["move-jobs", "move-job"]
                    .map(handoff_protocol::subjects::command)
                    .iter()
                    .any(|s| e["subject"].as_str() == Some(s))
            })
            .filter_map(|e| e["num_requests"].as_u64())
            .sum();
        handled.insert(stats["id"].to_string(), moves);
    }
    Ok(handled.into_values().collect())
}

/// A second command service instance on the stack's stream, loaded, that folds only when
/// a command makes it: an instance whose background fold is starved (a flood of
/// requests) or slow, so its model lags what the other instance appended.
async fn lagging_instance(stack: &Stack) -> Result<Executor> {
    let log = EventLog::open(stack.client.clone(), Default::default()).await?;
    Ok(Executor::start(log, Duration::from_secs(10)).await?)
}

/// `command` signed by `user` under a new id, and the request the service screens from it.
fn signed_by(
    user: &handoff_protocol::auth::Credentials,
    command: Command,
) -> (
    CommandRequest<Command>,
    handoff_protocol::auth::SignedRequest,
) {
    let id: CommandId = new_id();
    let signed = user.sign_command(&id, &command, None);
    (screened(&signed, &command), signed)
}

/// The request the service screens from a signed `command`.
fn screened(
    signed: &handoff_protocol::auth::SignedRequest,
    command: &Command,
) -> CommandRequest<Command> {
    let endpoint = ENDPOINTS
        .iter()
        .find(|e| e.name == endpoint_of(command))
        .expect("every command has an endpoint");
    handoff_command::screen(endpoint, &signed.payload).expect("well formed")
}

/// A signed request as the service receives it.
fn as_received(signed: &handoff_protocol::auth::SignedRequest) -> Signed<'_> {
    Signed {
        subject: &signed.subject,
        payload: &signed.payload,
        signature: Some(&signed.signature),
    }
}

/// Executes `command` as the owner on `instance`, past the signature check.
async fn execute(
    instance: &mut Executor,
    stack: &Stack,
    command: Command,
) -> Result<Applied, ErrorBody> {
    let request = CommandRequest {
        id: new_id(),
        actor: stack.creds.user.clone(),
        at: 0,
        client: None,
        command,
    };
    instance.execute(request, None).await
}

/// Two instances, many concurrent MoveJobs of the same daemon and MoveJob of the same
/// jobs: each job is started exactly once, every winner's move is in the stream, every
/// loser is told why, and both instances answered some of them.
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
    let sends_count = sends.len() as u64;
    let mut winners = BTreeSet::new();
    for s in sends {
        let (_, _, reply) = s.await?;
        match reply? {
            Ok(applied) if !applied.events.is_empty() => {
                winners.insert(applied.command);
            }
            Ok(_) => {}
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
    let events = stack.events().await?;
    let mut starts: BTreeMap<String, usize> = BTreeMap::new();
    let mut moves = BTreeSet::new();
    for e in of_type(&events, "JobMoveStarted") {
        if let Event::JobMoveStarted { job, move_id, .. } = e {
            *starts.entry(job.to_string()).or_default() += 1;
            moves.insert(move_id.clone());
        }
    }
    assert_eq!(winners, moves, "the moves applied are the moves stored");
    let handled = move_requests_per_instance(&stack.client, 2).await?;
    assert!(
        handled.iter().all(|n| *n > 0),
        "both instances answered move requests: {handled:?}"
    );
    assert_eq!(handled.iter().sum::<u64>(), sends_count);
    assert_eq!(starts.len(), 3, "every job moved: {starts:?}");
    assert!(
        starts.values().all(|n| *n == 1),
        "a job was started twice: {starts:?}"
    );
    Ok(())
}

/// An instance that decided on a stale model loses at the append (the stream's
/// optimistic concurrency), catches up and answers with the conflict, recorded as the
/// command's answer and nothing else.
#[tokio::test]
async fn a_stale_decision_is_caught_by_the_stream() -> Result<()> {
    let stack = Stack::start().await?;
    fleet(&stack).await?;
    // An executor that will not see the next command before it decides.
    let log = EventLog::open(stack.client.clone(), Default::default()).await?;
    let mut stale = Executor::start(log, Duration::from_secs(10)).await?;
    stack.apply(move_jobs(1, 2)).await?;
    let seq = stack.last_seq().await?;
    let id = new_id();
    let error = stale
        .execute(
            CommandRequest {
                id: id.clone(),
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
    let events = stack.events().await?;
    assert!(
        matches!(&events[seq as usize..], [r] if matches!(&r.envelope.event,
            Event::CommandRejected { command_id, .. } if *command_id == id)),
        "{:?}",
        &events[seq as usize..]
    );
    Ok(())
}

/// The last two owners removed at once, each through another instance: each instance
/// sees two owners, but the second removal must not leave none. The rule reads every
/// user, so a removal expects the last sequence of all users' subjects: the second
/// append conflicts, the instance catches up, and refuses it as the last owner's.
#[tokio::test]
async fn the_last_two_owners_removed_through_two_instances_leave_one() -> Result<()> {
    let stack = Stack::start().await?;
    let (second, _) = stack.user("owner2", &[Role::GlobalOwner], None).await?;
    let mut a = lagging_instance(&stack).await?;
    let mut b = lagging_instance(&stack).await?;
    let remove =
        |user: &handoff_domain::Actor| Command::RemoveUser(RemoveUser { user: user.clone() });
    execute(&mut a, &stack, remove(&second.user))
        .await
        .expect("one of two owners removed");
    let last = execute(&mut b, &stack, remove(&stack.creds.user))
        .await
        .expect_err("the last owner stays");
    assert_eq!(
        (last.code, last.reason.as_str()),
        (ErrorCode::Refused, "last_owner"),
        "{}",
        last.message
    );
    let events = stack.events().await?;
    assert_eq!(of_type(&events, "UserRemoved").len(), 1);
    Ok(())
}

/// Two failover moves with a limit of one rebuild at a time, through two instances, of
/// jobs that share no aggregate (two down daemons, two projects whose filters send each
/// job to a destination of its own): the limit counts every moving job, so a failover
/// decision expects the last sequence of all jobs' subjects, and the second is refused.
#[tokio::test]
async fn the_failover_rebuild_limit_holds_across_two_instances() -> Result<()> {
    let stack = Stack::start().await?;
    for (project, source, destination) in [("p1", 1, 2), ("p2", 4, 3)] {
        stack.apply(register(source, settings(100))).await?;
        stack
            .apply(Command::ConfigureProject(ConfigureProject {
                project: handoff_tests::project(project),
                daemon_filter: vec![daemon(source), daemon(destination)],
                label_filter: vec![],
            }))
            .await?;
        stack.apply(replica_set(project, "rs0", 10)).await?;
    }
    for n in [2, 3] {
        stack.apply(register(n, settings(100))).await?;
    }
    for n in [1, 4] {
        stack
            .apply(Command::ReportDaemonLiveness(ReportDaemonLiveness {
                daemon: daemon(n),
                up: false,
            }))
            .await?;
    }
    let mut a = lagging_instance(&stack).await?;
    let mut b = lagging_instance(&stack).await?;
    let failover = |j: &str, from: usize| {
        Command::FailoverJob(FailoverJob {
            job: job(j),
            from: daemon(from),
            down_for_ms: 60_000,
            delay_ms: 60_000,
            max_concurrent_rebuilds: 1,
            max_down_percent: 100,
        })
    };
    execute(&mut a, &stack, failover("p1/rs0", 1))
        .await
        .expect("the first failover");
    let second = execute(&mut b, &stack, failover("p2/rs0", 4))
        .await
        .expect_err("one rebuild at a time");
    assert_eq!(second.reason, "rebuild_limit", "{}", second.message);
    let events = stack.events().await?;
    assert_eq!(of_type(&events, "FailoverDecided").len(), 1);
    assert_eq!(of_type(&events, "JobMoveStarted").len(), 1);
    Ok(())
}

/// A user removed through one instance is no longer authorized by another one that has
/// not folded the removal yet: authorization reads the stream to its end first.
#[tokio::test]
async fn a_user_removed_through_one_instance_is_refused_by_a_lagging_one() -> Result<()> {
    let stack = Stack::start().await?;
    fleet(&stack).await?;
    let (ops, _) = stack.user("ops", &[Role::GlobalBackupAdmin], None).await?;
    let mut lagging = lagging_instance(&stack).await?;
    stack
        .apply(Command::RemoveUser(RemoveUser {
            user: ops.user.clone(),
        }))
        .await?;

    let (request, signed) = signed_by(&ops, move_jobs(1, 2));
    let signed = as_received(&signed);
    // Decided on the lagging model, the append expecting the stream's end is refused:
    // nothing is stored, and the full way is taken.
    let log = stack.log().await?;
    let end = log.last_sequence().await?;
    let fast = lagging
        .execute_fast(&request, &signed, Duration::from_secs(120))
        .await;
    assert!(fast.is_none(), "decided on a lagging model: {fast:?}");
    assert_eq!(log.last_sequence().await?, end, "nothing appended");
    let refused = lagging
        .authenticate(&request, &signed, Duration::from_secs(120))
        .await
        .expect_err("a removed user is refused");
    assert_eq!(
        (refused.code, refused.reason.as_str()),
        (ErrorCode::Forbidden, "unknown_user"),
        "{}",
        refused.message
    );
    Ok(())
}

/// A new allowed command on an instance whose model is at the stream's end is decided and
/// appended without asking the server where the stream ends (no `STREAM.INFO`); the same
/// signed request again is then refused as replayed.
#[tokio::test]
async fn a_new_command_is_decided_without_reading_the_streams_end() -> Result<()> {
    use futures::StreamExt;
    let stack = Stack::start().await?;
    fleet(&stack).await?;
    let (ops, _) = stack.user("ops", &[Role::GlobalBackupAdmin], None).await?;
    let mut instance = lagging_instance(&stack).await?;
    let mut infos = stack.client.subscribe("$JS.API.STREAM.INFO.>").await?;
    stack.client.flush().await?;

    let (request, signed) = signed_by(&ops, move_jobs(1, 2));
    let signed = as_received(&signed);
    let applied = instance
        .execute_fast(&request, &signed, Duration::from_secs(120))
        .await
        .expect("decided at once")
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    assert!(
        !applied.events.is_empty() && !applied.duplicate,
        "{applied:?}"
    );
    stack.client.flush().await?;
    let mut asked = 0;
    while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(50), infos.next()).await {
        asked += 1;
    }
    assert_eq!(asked, 0, "the stream's end was read");

    assert!(instance
        .execute_fast(&request, &signed, Duration::from_secs(120))
        .await
        .is_none());
    let replayed = instance
        .authenticate(&request, &signed, Duration::from_secs(120))
        .await
        .expect_err("the same signed request again");
    assert_eq!(replayed.reason, "replayed", "{}", replayed.message);
    Ok(())
}

/// A command applied through one instance reaches a lagging one: the same signed bytes
/// are refused as replayed (not answered from the stored batch), and the same id signed
/// again gets the stored answer, marked duplicate, with nothing appended twice.
#[tokio::test]
async fn a_command_applied_elsewhere_is_replayed_or_answered_by_a_lagging_instance() -> Result<()> {
    let stack = Stack::start().await?;
    fleet(&stack).await?;
    let (ops, _) = stack.user("ops", &[Role::GlobalBackupAdmin], None).await?;
    let mut lagging = lagging_instance(&stack).await?;
    let command = move_jobs(1, 2);
    let (request, signed) = signed_by(&ops, command.clone());
    let first = request_signed(
        &stack.client,
        &signed.subject,
        signed.payload.clone(),
        Some(&signed.signature),
    )
    .await?
    .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let log = stack.log().await?;
    let end = log.last_sequence().await?;

    let freshness = Duration::from_secs(120);
    let again = lagging
        .execute_fast(&request, &as_received(&signed), freshness)
        .await;
    assert!(again.is_none(), "answered on the fast path: {again:?}");
    let replayed = lagging
        .authenticate(&request, &as_received(&signed), freshness)
        .await
        .expect_err("the same signed bytes again");
    assert_eq!(replayed.reason, "replayed", "{}", replayed.message);

    let resigned = ops.sign_command_at(&request.id, &command, request.at + 1, None);
    let request = screened(&resigned, &command);
    let retry = as_received(&resigned);
    assert!(lagging
        .execute_fast(&request, &retry, freshness)
        .await
        .is_none());
    let fingerprint = lagging.authenticate(&request, &retry, freshness).await;
    let fingerprint = fingerprint.map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let answer = lagging
        .execute(request, Some(fingerprint))
        .await
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    assert!(answer.duplicate, "{answer:?}");
    assert_eq!(answer.events, first.events);
    assert_eq!(log.last_sequence().await?, end, "nothing appended twice");
    Ok(())
}

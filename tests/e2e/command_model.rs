//! The command service's fold of the stream is whole or stopped: an event it cannot
//! decode stops it, and from then on every command is answered with the reason, never
//! decided on a model with a gap.

use std::time::Duration;

use anyhow::Result;
use handoff_command::Executor;
use handoff_domain::{Command, CommandId};
use handoff_eventlog::EventLog;
use handoff_protocol::api::CommandRequest;
use handoff_protocol::{Applied, ErrorBody, ErrorCode};
use handoff_tests::*;
use serde_json::json;

use crate::moves::fleet;

/// Executes `command` as the owner on `executor`, skipping the signature (checked
/// elsewhere): what the executor decides.
async fn execute(
    executor: &mut Executor,
    stack: &Stack,
    id: &CommandId,
    command: Command,
) -> Result<Applied, ErrorBody> {
    let request = CommandRequest {
        id: id.clone(),
        actor: stack.creds.user.clone(),
        at: 0,
        client: None,
        command,
    };
    executor.execute(request, None).await
}

/// A command service instance of the stack's stream, loaded, which folds only when a
/// command makes it.
async fn executor(stack: &Stack) -> Result<Executor> {
    let log = EventLog::open(stack.client.clone(), Default::default()).await?;
    Ok(Executor::start(log, Duration::from_secs(10)).await?)
}

/// A `DaemonRemoved` of daemon 2 written by a newer build (data version 2), stored with
/// a good event after it: an instance that reaches it stops and says why, to this
/// command and to every later one (a retry included), and appends nothing. It never
/// skips the event and goes on deciding as if daemon 2 were still there. The running
/// service and one started afterwards answer the same, rather than die or not start.
#[tokio::test]
async fn an_event_that_cannot_be_decoded_stops_the_model() -> Result<()> {
    let stack = Stack::start().await?;
    fleet(&stack).await?;
    let mut instance = executor(&stack).await?;
    // Another instance, which appends after the event without reading it.
    let mut writer = executor(&stack).await?;

    let newer = json!({
        "type": "DaemonRemoved",
        "version": 2,
        "data": { "daemon": daemon(2), "why": "a field this build does not know" },
        "command": new_id(),
        "actor": "admin",
        "at": 0,
        "last": true,
        "digest": "0000000000000000",
    });
    let subject = handoff_protocol::subjects::daemon(&daemon(2));
    async_nats::jetstream::new(stack.client.clone())
        .publish(subject, serde_json::to_vec(&newer)?.into())
        .await?
        .await?;
    execute(&mut writer, &stack, &new_id(), register(4, settings(100)))
        .await
        .expect("daemon 4 registered");
    let before = stack.last_seq().await?;

    // Daemon 4 is unknown to the instance: the rejection sends it to the stream's end,
    // through the event it cannot decode.
    let id = new_id();
    for attempt in ["first", "retry"] {
        let stopped = execute(&mut instance, &stack, &id, move_jobs(1, 4))
            .await
            .expect_err("the model stopped");
        assert_eq!(
            (stopped.code, stopped.reason.as_str()),
            (ErrorCode::Unavailable, "model_stopped"),
            "{attempt}: {}",
            stopped.message
        );
        assert!(
            stopped.message.contains("newer"),
            "the reason is told: {}",
            stopped.message
        );
    }
    let other = execute(&mut instance, &stack, &new_id(), move_job("p1/rs0", 2))
        .await
        .expect_err("the model stopped");
    assert_eq!(other.reason, "model_stopped");

    // A running service stops too, and so does one started on this stream: both answer,
    // neither decides.
    let _restarted = CommandService::start(&stack.url(), Default::default()).await?;
    for _ in 0..4 {
        let stopped = stack
            .send(move_job("p1/rs1", 3))
            .await?
            .expect_err("the model stopped");
        assert_eq!(stopped.reason, "model_stopped", "{}", stopped.message);
    }
    assert_eq!(stack.last_seq().await?, before, "nothing was decided");
    Ok(())
}

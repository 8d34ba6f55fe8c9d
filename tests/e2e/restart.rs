//! The command service's memory and start-up do not grow with the history: it starts
//! from its saved model and folds only the events after; a saved model that does not
//! verify is ignored (and the service says so); an id older than the model's window is
//! answered from the command archive, `duplicate: true` with its first events.

use std::time::Duration;

use anyhow::{ensure, Result};
use handoff_command::executor::Origin;
use handoff_domain::command::*;
use handoff_domain::{Command, CommandId};
use handoff_protocol::subjects;
use handoff_testkit::NatsServer;
use handoff_tests::*;
use tokio::io::AsyncReadExt;

/// A window of 20 events, and a snapshot whenever there is anything new.
fn bounded() -> handoff_command::Config {
    handoff_command::Config {
        window: 20,
        snapshot_after_events: 1,
        snapshot_interval: Duration::from_millis(200),
        ..Default::default()
    }
}

/// What the history's first commands were, to retry them once they are old.
struct Early {
    applied_id: CommandId,
    applied: Command,
    first_events: Vec<u64>,
    rejected_id: CommandId,
    rejected: Command,
    reason: String,
}

/// A history of about a hundred events: daemons, a project, jobs, moves completed and
/// failed, rejections.
async fn history(stack: &Stack) -> Result<Early> {
    let applied_id = new_id();
    let applied = register(1, settings(100));
    let first = stack.send_as(&applied_id, &applied).await?;
    let first_events = first
        .map_err(|e| anyhow::anyhow!("{}", e.message))?
        .events
        .iter()
        .map(|e| e.seq)
        .collect();
    let rejected_id = new_id();
    let rejected = move_job("p1/nope", 1);
    let refusal = stack
        .send_as(&rejected_id, &rejected)
        .await?
        .expect_err("no such job");
    for n in 2..=4 {
        stack.apply(register(n, settings(100))).await?;
    }
    stack.apply(configure_project("p1")).await?;
    for k in 0..8 {
        stack.apply(replica_set("p1", &format!("rs{k}"), 1)).await?;
    }
    let moved = stack.apply(move_jobs(1, 2)).await?;
    let plan = moved.plan.expect("a plan");
    for (i, j) in plan.jobs.iter().enumerate() {
        let done = if i % 2 == 0 {
            Command::CompleteJobMove(CompleteJobMove {
                head: rebuilt_head(),
                job: j.job.clone(),
                move_id: plan.move_id.clone(),
                epoch: j.epoch,
            })
        } else {
            Command::FailJobMove(FailJobMove {
                job: j.job.clone(),
                move_id: plan.move_id.clone(),
                epoch: j.epoch,
                reason: "destination lost".into(),
            })
        };
        stack.report(2, done).await?;
    }
    stack.apply(move_jobs(3, 4)).await?;
    for _ in 0..40 {
        let r = stack.send(move_job("p1/nope", 2)).await?;
        ensure!(r.is_err(), "refused");
    }
    Ok(Early {
        applied_id,
        applied,
        first_events,
        rejected_id,
        rejected,
        reason: refusal.reason,
    })
}

/// Waits until the service has saved a model that folded `seq`.
async fn saved_through(client: &async_nats::Client, seq: u64) -> Result<()> {
    let js = async_nats::jetstream::new(client.clone());
    until("the model to be saved", TIMEOUT, || {
        let js = js.clone();
        async move {
            let store = js.get_object_store(subjects::MODEL_BUCKET).await?;
            let info = match store.info(subjects::MODEL_OBJECT).await {
                Ok(i) => i,
                Err(_) => return Ok(None),
            };
            let header: serde_json::Value =
                serde_json::from_str(info.description.as_deref().unwrap_or("{}"))?;
            Ok((header["applied"].as_u64().unwrap_or(0) >= seq).then_some(()))
        }
    })
    .await
}

async fn start(
    server: &NatsServer,
    config: handoff_command::Config,
) -> Result<handoff_command::CommandService> {
    Ok(handoff_command::start(server.connect().await?, config).await?)
}

#[tokio::test]
async fn a_restart_from_the_saved_model_decides_as_a_fold_from_the_start() -> Result<()> {
    let server = NatsServer::start().await?;
    let commands = CommandService::start(&server.url(), bounded()).await?;
    let client = server.connect().await?;
    let mut stack = Stack::on(server, client, Some(commands))?;
    let early = history(&stack).await?;
    let end = stack.last_seq().await?;
    ensure!(end > 90, "a history of {end} events");
    // Stopped cleanly, it saves its model on the way out.
    stack.commands.take().expect("running").stop().await?;
    saved_through(&stack.client, end).await?;

    let from_snapshot = start(&stack.server, bounded()).await?;
    assert_eq!(
        from_snapshot.executor().origin(),
        &Origin::Snapshot { applied: end }
    );
    let model = from_snapshot.executor().model();
    assert_eq!(model.applied, end);
    assert!(
        model.records() < 60,
        "{} records in memory for {end} events",
        model.records()
    );

    // The early ids left memory for the archive long ago.
    for id in [&early.applied_id, &early.rejected_id] {
        assert!(model.command(id).is_none() && model.rejected(id).is_none());
        assert!(
            model.leaving(id).is_none(),
            "{id} still on its way to the archive"
        );
    }
    let archive = handoff_command::archive::Archive::open(
        &async_nats::jetstream::new(stack.client.clone()),
        1,
    )
    .await?;
    assert!(archive.get(&early.applied_id).await?.is_some());

    // The same service with its snapshot gone folds everything, and decides alike.
    let js = async_nats::jetstream::new(stack.client.clone());
    let store = js.get_object_store(subjects::MODEL_BUCKET).await?;
    let mut saved = store.get(subjects::MODEL_OBJECT).await?;
    let description = saved.info().description.clone();
    let mut bytes = Vec::new();
    saved.read_to_end(&mut bytes).await?;
    store.delete(subjects::MODEL_OBJECT).await?;
    let from_start = start(&stack.server, bounded()).await?;
    assert_eq!(from_start.executor().origin(), &Origin::Stream);
    assert!(from_start.executor().model().decides_as(model));
    // And as one that keeps every id in memory, but for those records.
    let unbounded = start(
        &stack.server,
        handoff_command::Config {
            bounded: false,
            ..Default::default()
        },
    )
    .await?;
    assert_eq!(unbounded.executor().model().state, model.state);
    drop((from_snapshot, from_start, unbounded));

    // An id long out of the window: answered from the archive, exactly as the first time
    // (the service starts from the saved model, which no longer holds it).
    let meta = async_nats::jetstream::object_store::ObjectMetadata {
        name: subjects::MODEL_OBJECT.into(),
        description,
        ..Default::default()
    };
    store.put(meta, &mut bytes.as_slice()).await?;
    stack.commands = Some(CommandService::start(&stack.server.url(), bounded()).await?);
    let again = stack
        .send_as(&early.applied_id, &early.applied)
        .await?
        .map_err(|e| anyhow::anyhow!("{}", e.message))?;
    assert!(again.duplicate, "{again:?}");
    assert_eq!(
        again.events.iter().map(|e| e.seq).collect::<Vec<_>>(),
        early.first_events
    );
    let refused = stack
        .send_as(&early.rejected_id, &early.rejected)
        .await?
        .expect_err("the same rejection");
    assert_eq!(refused.reason, early.reason);
    let reused = stack
        .send_as(&early.applied_id, &register(9, settings(1)))
        .await?
        .expect_err("another command under an old id");
    assert_eq!(reused.reason, "id_reused");
    assert_eq!(
        stack.last_seq().await?,
        end,
        "nothing appended by the retries"
    );

    // With the archive unreadable, a retry of an old id cannot be answered, but a new
    // id, made after every id that left the window, never asks the archive.
    js.delete_stream(handoff_protocol::dataplane::kv_stream(
        subjects::COMMAND_ARCHIVE_BUCKET,
    ))
    .await?;
    let lost = stack
        .send_as(&early.applied_id, &early.applied)
        .await?
        .expect_err("the archive is gone");
    assert_eq!(
        lost.code,
        handoff_protocol::ErrorCode::Unavailable,
        "{lost:?}"
    );
    stack
        .send_as(&new_id(), &register(9, settings(1)))
        .await?
        .map_err(|e| anyhow::anyhow!("a new id asked the archive: {}", e.message))?;
    Ok(())
}

#[tokio::test]
async fn a_saved_model_that_does_not_verify_is_ignored_and_said_so() -> Result<()> {
    let server = NatsServer::start().await?;
    let commands = CommandService::start(&server.url(), bounded()).await?;
    let client = server.connect().await?;
    let mut stack = Stack::on(server, client, Some(commands))?;
    history(&stack).await?;
    let end = stack.last_seq().await?;
    stack.commands.take().expect("running").stop().await?;
    saved_through(&stack.client, end).await?;

    // One byte of the saved model changed, its description (and digest) kept.
    let js = async_nats::jetstream::new(stack.client.clone());
    let store = js.get_object_store(subjects::MODEL_BUCKET).await?;
    let mut object = store.get(subjects::MODEL_OBJECT).await?;
    let description = object.info().description.clone();
    let mut bytes = Vec::new();
    object.read_to_end(&mut bytes).await?;
    let at = bytes.len() / 2;
    bytes[at] = if bytes[at] == b'1' { b'2' } else { b'1' };
    let meta = async_nats::jetstream::object_store::ObjectMetadata {
        name: subjects::MODEL_OBJECT.into(),
        description,
        ..Default::default()
    };
    store.put(meta, &mut bytes.as_slice()).await?;

    let started = start(&stack.server, bounded()).await?;
    let Origin::Ignored { reason } = started.executor().origin() else {
        panic!("started from {:?}", started.executor().origin());
    };
    assert!(
        reason.contains("does not verify") && reason.contains("digest"),
        "{reason}"
    );
    assert_eq!(
        started.executor().model().applied,
        end,
        "it folded the whole stream"
    );
    let unbounded = start(
        &stack.server,
        handoff_command::Config {
            bounded: false,
            ..Default::default()
        },
    )
    .await?;
    assert_eq!(
        unbounded.executor().model().state,
        started.executor().model().state
    );
    Ok(())
}

/// A saved model whose archive was lost (the bucket created again, empty) would leave the
/// ids it let go of unanswered: it is not used, and the stream is folded from the start.
#[tokio::test]
async fn a_saved_model_of_another_archive_is_ignored() -> Result<()> {
    let server = NatsServer::start().await?;
    let commands = CommandService::start(&server.url(), bounded()).await?;
    let client = server.connect().await?;
    let mut stack = Stack::on(server, client, Some(commands))?;
    let early = history(&stack).await?;
    let end = stack.last_seq().await?;
    stack.commands.take().expect("running").stop().await?;
    saved_through(&stack.client, end).await?;
    let js = async_nats::jetstream::new(stack.client.clone());
    js.delete_key_value(subjects::COMMAND_ARCHIVE_BUCKET)
        .await?;

    let started = start(&stack.server, bounded()).await?;
    let Origin::Ignored { reason } = started.executor().origin() else {
        panic!("started from {:?}", started.executor().origin());
    };
    assert!(reason.contains("other stores"), "{reason}");
    drop(started);
    // Folded from the start, it archives the old ids again, and answers them.
    stack.commands = Some(CommandService::start(&stack.server.url(), bounded()).await?);
    let again = stack
        .send_as(&early.applied_id, &early.applied)
        .await?
        .map_err(|e| anyhow::anyhow!("{}", e.message))?;
    assert!(again.duplicate);
    assert_eq!(stack.last_seq().await?, end);
    Ok(())
}

/// A save that fails (its store gone) is not taken for done: the model is saved again
/// once the store is back, on the way out at the latest.
#[tokio::test]
async fn a_model_whose_save_failed_is_saved_again() -> Result<()> {
    let server = NatsServer::start().await?;
    let commands = CommandService::start(&server.url(), bounded()).await?;
    let client = server.connect().await?;
    let mut stack = Stack::on(server, client, Some(commands))?;
    history(&stack).await?;
    let end = stack.last_seq().await?;
    stack.commands.take().expect("running").stop().await?;
    saved_through(&stack.client, end).await?;

    // An executor that folds the whole stream (its saved model deleted)...
    let js = async_nats::jetstream::new(stack.client.clone());
    js.get_object_store(subjects::MODEL_BUCKET)
        .await?
        .delete(subjects::MODEL_OBJECT)
        .await?;
    let stores = || async {
        let archive = handoff_command::archive::Archive::open(&js, 1).await?;
        anyhow::Ok(handoff_command::executor::Stores {
            lineage: handoff_command::archive::Lineage::of(&archive),
            archive,
            snapshots: handoff_command::archive::Snapshots::open(&js, 1).await?,
            model: handoff_command::model::Config { window: 20 },
        })
    };
    let log = handoff_eventlog::EventLog::open(stack.client.clone(), Default::default()).await?;
    let mut executor =
        handoff_command::Executor::start_with(log, Duration::from_secs(5), Some(stores().await?))
            .await?;
    assert_eq!(executor.origin(), &Origin::Stream);
    assert_eq!(executor.saved_at(), Some(0));

    // ... whose store is gone: every try fails, and none counts as saved.
    js.delete_object_store(subjects::MODEL_BUCKET).await?;
    executor.save_snapshot(1);
    executor.save_on_stop(Duration::from_secs(1)).await;
    assert_eq!(executor.saved_at(), Some(0), "a failed save taken for done");

    // The store back, the model is saved on the way out.
    stores().await?;
    executor.save_on_stop(Duration::from_secs(30)).await;
    assert_eq!(executor.saved_at(), Some(end));
    saved_through(&stack.client, end).await
}

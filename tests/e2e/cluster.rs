//! On a three-node JetStream cluster, with the event stream on three replicas.

use std::time::Duration;

use anyhow::Result;
use handoff_domain::Command;
use handoff_eventlog::EventLog;
use handoff_protocol::{Applied, ErrorBody, ErrorCode};
use handoff_testkit::proxy::AckDropper;
use handoff_testkit::NatsCluster;
use handoff_tests::*;

async fn send(
    client: &async_nats::Client,
    id: &handoff_domain::CommandId,
    command: &Command,
) -> Result<Result<Applied, ErrorBody>> {
    send_command(client, &owner().0, id, command).await
}

/// Events are stored on three replicas; a lost acknowledgement, retried, is recognised
/// as applied (a cluster answers the retry as a duplicate) and nothing is stored twice.
#[tokio::test]
async fn on_a_cluster_a_lost_acknowledgement_retried_is_recognised() -> Result<()> {
    let cluster = NatsCluster::start(3).await?;
    let proxy = AckDropper::start(cluster.port(0)).await?;
    let mut config = handoff_command::Config::default();
    config.event_log.replicas = 3;
    config.event_log.ack_timeout = Duration::from_secs(1);
    let _commands = CommandService::start(&proxy.url(), config).await?;
    let client = cluster.connect().await?;

    let mut fleet = vec![register(1, settings(100)), configure_project("p1")];
    fleet.extend(["rs0", "rs1", "rs2"].map(|n| replica_set("p1", n, 10)));
    fleet.push(register(2, settings(100)));
    for c in &fleet {
        send(&client, &new_id(), c)
            .await?
            .map_err(|e| anyhow::anyhow!(e.message))?;
    }
    let log = EventLog::attach(client.clone(), Default::default()).await?;
    let info = log
        .jetstream()
        .get_stream(log.stream_name())
        .await?
        .info()
        .await?
        .clone();
    assert_eq!(info.config.num_replicas, 3);
    assert_eq!(
        info.cluster.map(|c| c.replicas.len()),
        Some(2),
        "a leader and two replicas"
    );

    let id = new_id();
    let before = log.last_sequence().await?;
    proxy.drop_next_acks_of(handoff_protocol::subjects::STREAM, 1);
    let lost = send(&client, &id, &move_jobs(1, 2))
        .await?
        .expect_err("the ack was lost");
    assert_eq!(lost.code, ErrorCode::Unavailable);
    assert_eq!(log.last_sequence().await?, before + 7);
    let retried = send(&client, &id, &move_jobs(1, 2))
        .await?
        .expect("applied");
    assert!(retried.duplicate);
    assert_eq!(
        log.last_sequence().await?,
        before + 7,
        "nothing stored twice"
    );
    Ok(())
}

/// A follower of the stream rides through the loss of the node its client is connected
/// to: every event appended before, during and after the loss comes once, in order, and
/// `history` and `watch`-style reads go on (the CLI's readers are followers).
#[tokio::test]
async fn a_follower_rides_through_the_loss_of_its_node() -> Result<()> {
    let mut cluster = NatsCluster::start(3).await?;
    let mut config = handoff_command::Config::default();
    config.event_log.replicas = 3;
    // The command service's node is never the one lost here.
    let _commands = CommandService::start(&cluster.url(2), config).await?;
    let writer = cluster.connect().await?;
    for n in 1..=3 {
        send(&writer, &new_id(), &register(n, settings(100)))
            .await?
            .map_err(|e| anyhow::anyhow!(e.message))?;
    }
    let reader_client = cluster.connect().await?;
    let log = EventLog::attach(reader_client.clone(), Default::default()).await?;
    let mut follower = handoff_eventlog::Follower::new(log, 1, None);
    let mut seen = vec![follower.next().await?.seq];
    // The node the reader is connected to goes away while events keep coming.
    let port = reader_client.server_info().port;
    let node = (0..2).find(|i| cluster.port(*i) == port).unwrap_or(0);
    cluster.kill(node);
    for n in 4..=6 {
        // While the stream's leader is elected again the service answers unavailable:
        // the same id again, as every client does.
        // No answer in time is the same: the append may be stored; the retry finds out.
        let id = new_id();
        until("the register to be applied", TIMEOUT * 4, || async {
            match send(&writer, &id, &register(n, settings(100))).await {
                Ok(Ok(_)) => Ok(Some(())),
                Ok(Err(e)) if e.code == ErrorCode::Unavailable => Ok(None),
                Ok(Err(e)) => Err(anyhow::anyhow!(e.message)),
                Err(_) => Ok(None),
            }
        })
        .await?;
    }
    cluster.restart(node).await?;
    let end = EventLog::attach(writer, Default::default())
        .await?
        .last_sequence()
        .await?;
    // Its node back, the follower's client reconnects and its reader is created again:
    // on a loaded machine that takes a while, so one deadline for the whole catch-up.
    let deadline = tokio::time::Instant::now() + TIMEOUT * 4;
    while seen.last().is_some_and(|s| *s < end) {
        let r = tokio::time::timeout_at(deadline, follower.next()).await??;
        seen.push(r.seq);
    }
    let expected: Vec<u64> = (1..=end).collect();
    assert_eq!(seen, expected, "every event once, in order");
    Ok(())
}

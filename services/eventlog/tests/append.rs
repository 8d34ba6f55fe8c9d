//! The event log's contract against a real nats-server: atomic batches, optimistic
//! concurrency per subject, and recognising a retried append.

use anyhow::Result;
use handoff_eventlog::{AppendError, Config, EventLog, Outgoing};
use handoff_testkit::NatsServer;

fn msg(subject: &str, id: &str, expected: u64) -> Outgoing {
    Outgoing {
        subject: format!("{}.{subject}", handoff_protocol::subjects::EVENTS),
        payload: bytes::Bytes::from(format!("{{\"id\":\"{id}\"}}")),
        msg_id: id.to_owned(),
        expected_last_subject_seq: expected,
        expected_subject: None,
        expected_last_seq: None,
    }
}

async fn open(server: &NatsServer) -> Result<EventLog> {
    Ok(EventLog::open(server.connect().await?, Config::default()).await?)
}

/// An expectation on a subject filter holds the last sequence over every matching
/// subject: a write to any of them since the decision refuses the append, alone or as
/// the first message of a batch.
#[tokio::test]
async fn an_expectation_on_a_filter_guards_every_subject_under_it() -> Result<()> {
    let server = NatsServer::start().await?;
    let log = open(&server).await?;
    let users = |subject: &str, id: &str, expected: u64| Outgoing {
        expected_subject: Some(format!("{}.user.>", handoff_protocol::subjects::EVENTS)),
        ..msg(subject, id, expected)
    };
    log.append(&[msg("user.a", "c1:a", 0), msg("user.b", "c1:b", 0)])
        .await?;
    log.append(&[msg("job.x", "c2:x", 0)]).await?;
    // user.b is untouched, but user.a moved past what the decision saw (1).
    let err = log.append(&[users("user.b", "c3:b", 1)]).await.unwrap_err();
    assert!(matches!(err, AppendError::Conflict { .. }), "{err:?}");
    let err = log
        .append(&[users("user.b", "c4:b", 1), msg("job.y", "c4:y", 0)])
        .await
        .unwrap_err();
    assert!(matches!(err, AppendError::Conflict { .. }), "{err:?}");
    assert_eq!(log.last_sequence().await?, 3);
    // The last of all users' subjects is 2; other subjects do not count.
    let a = log
        .append(&[users("user.b", "c5:b", 2), msg("job.y", "c5:y", 0)])
        .await?;
    assert_eq!((a.first_seq, a.last_seq), (4, 5));
    Ok(())
}

/// A batch is stored contiguously, and one stale expectation refuses all of it.
#[tokio::test]
async fn a_batch_is_all_or_nothing() -> Result<()> {
    let server = NatsServer::start().await?;
    let log = open(&server).await?;
    let a = log
        .append(&[msg("job.a", "c1:a", 0), msg("job.b", "c1:b", 0)])
        .await?;
    assert_eq!((a.first_seq, a.last_seq, a.duplicate), (1, 2, false));

    // job.a is at 1; expecting 0 is stale, so job.c must not be stored either.
    let err = log
        .append(&[msg("job.c", "c2:c", 0), msg("job.a", "c2:a", 0)])
        .await
        .unwrap_err();
    assert!(matches!(err, AppendError::Conflict { .. }), "{err:?}");
    assert_eq!(log.last_sequence().await?, 2);

    let b = log
        .append(&[msg("job.c", "c3:c", 0), msg("job.a", "c3:a", 1)])
        .await?;
    assert_eq!((b.first_seq, b.last_seq), (3, 4));
    Ok(())
}

/// Appends a message and a batch, each twice: the second time stores nothing new and is
/// reported as a duplicate of the first.
async fn retries_are_recognised(log: &EventLog) -> Result<()> {
    let one = [msg("daemon.d", "c1:d", 0)];
    let first = log.append(&one).await?;
    let again = log.append(&one).await?;
    assert!(again.duplicate);
    assert_eq!(again.first_seq, first.first_seq);

    let batch = [
        msg("job.x", "c2:x", 0),
        msg("job.y", "c2:y", 0),
        msg("daemon.d", "c2:d", 1),
    ];
    let first = log.append(&batch).await?;
    let again = log.append(&batch).await?;
    assert!(again.duplicate);
    assert_eq!(
        (again.first_seq, again.last_seq),
        (first.first_seq, first.last_seq)
    );
    assert_eq!(log.last_sequence().await?, 4);
    Ok(())
}

/// Sending the same append again (its acknowledgement lost) stores nothing new and is
/// reported as a duplicate, for a single message and for a batch: a single server
/// answers the retry with an error (10071 or 10201), which the log resolves.
#[tokio::test]
async fn a_retried_append_is_recognised() -> Result<()> {
    let server = NatsServer::start().await?;
    retries_are_recognised(&open(&server).await?).await
}

/// A batch of the largest allowed size is stored whole.
#[tokio::test]
async fn a_full_batch_is_stored() -> Result<()> {
    let server = NatsServer::start().await?;
    let log = open(&server).await?;
    let batch: Vec<Outgoing> = (0..handoff_eventlog::MAX_BATCH)
        .map(|i| msg(&format!("job.j{i}"), &format!("c1:{i}"), 0))
        .collect();
    let a = log.append(&batch).await?;
    assert_eq!((a.first_seq, a.last_seq), (1, 1000));
    Ok(())
}

/// The stream refuses deletes: history cannot be removed.
#[tokio::test]
async fn history_cannot_be_deleted() -> Result<()> {
    let server = NatsServer::start().await?;
    let log = open(&server).await?;
    log.append(&[msg("job.a", "c1:a", 0)]).await?;
    let stream = log.jetstream().get_stream(log.stream_name()).await?;
    assert!(stream.delete_message(1).await.is_err());
    assert!(stream.purge().await.is_err());
    assert_eq!(log.last_sequence().await?, 1);
    Ok(())
}

/// A retry that shares its first message with a stored batch but is not that batch is a
/// conflict, not a duplicate: nothing of it is stored.
#[tokio::test]
async fn a_different_batch_sharing_a_first_message_is_not_a_duplicate() -> Result<()> {
    let server = NatsServer::start().await?;
    let log = open(&server).await?;
    log.append(&[msg("job.a", "c1:a", 0), msg("job.b", "c1:b", 0)])
        .await?;
    let err = log
        .append(&[msg("job.a", "c1:a", 0), msg("job.c", "c1:c", 0)])
        .await
        .unwrap_err();
    assert!(matches!(err, AppendError::Conflict { .. }), "{err:?}");
    assert_eq!(log.last_sequence().await?, 2);
    Ok(())
}

/// On a three-node cluster (three replicas) a retried append is recognised too: the
/// cluster answers it as a duplicate.
#[tokio::test]
async fn a_retried_append_is_recognised_on_a_cluster() -> Result<()> {
    let cluster = handoff_testkit::NatsCluster::start(3).await?;
    let config = Config {
        replicas: 3,
        ..Config::default()
    };
    let log = EventLog::open(cluster.connect().await?, config).await?;
    retries_are_recognised(&log).await
}

/// An append expecting the stream's last sequence is refused once anything was appended
/// since, on any subject, alone or as a batch, and stores nothing; at the end it is stored.
#[tokio::test]
async fn an_expectation_on_the_streams_end_guards_every_subject() -> Result<()> {
    let server = NatsServer::start().await?;
    let log = open(&server).await?;
    let at = |subject: &str, id: &str, end: u64| Outgoing {
        expected_last_seq: Some(end),
        ..msg(subject, id, 0)
    };
    log.append(&[msg("job.a", "c1:a", 0)]).await?;
    log.append(&[msg("daemon.d", "c2:d", 0)]).await?;
    // job.b was never written, but the stream moved past 1.
    let err = log.append(&[at("job.b", "c3:b", 1)]).await.unwrap_err();
    assert!(matches!(err, AppendError::Conflict { .. }), "{err:?}");
    let err = log
        .append(&[at("job.b", "c4:b", 1), msg("job.c", "c4:c", 0)])
        .await
        .unwrap_err();
    assert!(matches!(err, AppendError::Conflict { .. }), "{err:?}");
    assert_eq!(log.last_sequence().await?, 2);
    let a = log
        .append(&[at("job.b", "c5:b", 2), msg("job.c", "c5:c", 0)])
        .await?;
    assert_eq!((a.first_seq, a.last_seq), (3, 4));
    Ok(())
}

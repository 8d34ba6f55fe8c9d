//! What the event log cannot store now is an outage: the command service answers
//! `unavailable` (retry with the same id), never a final refusal, and the retry applies
//! the command once the server can store again.

use anyhow::{bail, Result};
use async_nats::HeaderMap;
use handoff_protocol::ErrorCode;
use handoff_tests::*;

use crate::moves::fleet;

/// How many atomic batches one stream holds open at once (nats-server's default).
const OPEN_BATCHES_PER_STREAM: usize = 50;

/// Another client holds the stream's every open atomic batch: the command's batch is not
/// stored (nats-server answers 10210 to its first message and 10176, batch incomplete,
/// to its last), the caller hears `unavailable` and nothing is appended; once the server
/// abandons the idle batches (10 s), the retry with the same id is applied.
#[tokio::test]
async fn a_stream_with_every_batch_slot_taken_is_unavailable_then_applies_the_retry() -> Result<()>
{
    let stack = Stack::start().await?;
    fleet(&stack).await?;
    let before = stack.last_seq().await?;
    let hog = stack.server.connect().await?;
    let open = |i: usize| {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Batch-Id", format!("hog-{i}").as_str());
        headers.insert("Nats-Batch-Sequence", "1");
        (format!("handoff.evt.test.{i}"), headers)
    };
    for i in 0..OPEN_BATCHES_PER_STREAM {
        let (subject, headers) = open(i);
        hog.publish_with_headers(subject, headers, "{}".into())
            .await?;
    }
    // One more, with a reply: its refusal says the stream processed the others and
    // holds every slot.
    let (subject, headers) = open(OPEN_BATCHES_PER_STREAM);
    let full = hog
        .request_with_headers(subject, headers, "{}".into())
        .await?;
    let full: serde_json::Value = serde_json::from_slice(&full.payload)?;
    if full["error"]["err_code"] != 10210 {
        bail!("the stream should refuse a 51st open batch: {full}");
    }

    let id = new_id();
    let busy = stack
        .send_as(&id, &move_jobs(1, 2))
        .await?
        .expect_err("no batch slot is free");
    assert_eq!(
        (busy.code, busy.reason.as_str()),
        (ErrorCode::Unavailable, "event_log_unavailable"),
        "{}",
        busy.message
    );
    assert_eq!(stack.last_seq().await?, before, "nothing is stored");

    let applied = until("the retry to be applied", TIMEOUT, || async {
        Ok(match stack.send_as(&id, &move_jobs(1, 2)).await? {
            Ok(applied) => Some(applied),
            Err(e) if e.code == ErrorCode::Unavailable => None,
            Err(e) => bail!("the retry was refused: {e:?}"),
        })
    })
    .await?;
    assert!(!applied.duplicate);
    assert_eq!(stack.last_seq().await?, before + 7);
    Ok(())
}

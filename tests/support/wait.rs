//! Waiting for what the stack does in its own time, on the test kit's one poller
//! ([`until`]).

use std::time::Duration;

use anyhow::Result;
use handoff_eventlog::Recorded;
use handoff_testkit::until;

use crate::client::query;
use crate::stack::Stack;
use crate::TIMEOUT;

/// Waits until the projector's views include sequence `seq`; the checkpoint reached.
pub async fn wait_for_checkpoint(client: &async_nats::Client, seq: u64) -> Result<u64> {
    until(
        &format!("the projector to reach {seq}"),
        TIMEOUT,
        || async move {
            Ok(match query(client, "status", serde_json::json!({})).await {
                Ok(Ok(v)) => v["checkpoint"].as_u64().filter(|c| *c >= seq),
                _ => None,
            })
        },
    )
    .await
}

/// The first event of the stream (from the start) that `pred` accepts, waiting up to
/// `limit` for one to be appended.
pub async fn first_event(
    stack: &Stack,
    what: &str,
    limit: Duration,
    pred: impl Fn(&Recorded) -> bool,
) -> Result<Recorded> {
    until(what, limit, || async {
        Ok(stack.events().await?.into_iter().find(|r| pred(r)))
    })
    .await
}

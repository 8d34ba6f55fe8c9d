//! Commands and queries over NATS. Commands go through `handoff_client`, the one command
//! client (it alone builds the signature header); each is tried once, so a test sees
//! exactly what the service answered.
//!
//! Every sender answers `Result<Result<Applied, ErrorBody>>`: the outer error is a
//! failure of the test's plumbing (no answer in time, an unreadable reply), the inner one
//! the service's refusal (a rejection, an authorization failure, or its own
//! `unavailable`), which tests assert on.

use anyhow::{Context as _, Result};
use handoff_client::{Client, Outage, Retry, SendError};
use handoff_domain::{Command, CommandId};
use handoff_protocol::auth::Credentials;
use handoff_protocol::{Applied, ErrorBody};
use serde_json::Value;

use crate::stack::owner;
use crate::TIMEOUT;

/// What the tests tell the audit trail they are.
const CLIENT_NAME: &str = "handoff-tests";

/// Sends `command` signed by `creds` with the given id over `client`; the service's reply.
pub async fn send_command(
    client: &async_nats::Client,
    creds: &Credentials,
    id: &CommandId,
    command: &Command,
) -> Result<Result<Applied, ErrorBody>> {
    let sent = Client::new(client.clone(), creds.clone(), CLIENT_NAME)
        .with_retry(Retry::once(TIMEOUT))
        .send(id, command)
        .await;
    match sent {
        Ok(applied) => Ok(Ok(applied)),
        Err(e @ (SendError::Rejected(_) | SendError::Refused(_))) => Ok(Err(e.body())),
        // The service answered that it cannot now: that answer is the test's to check.
        Err(SendError::Unavailable {
            last: Outage::Service(body),
            ..
        }) => Ok(Err(body)),
        Err(e) => Err(e).with_context(|| format!("sending {}", command.name())),
    }
}

/// Sends raw bytes to a command endpoint over `client`, signed by the [`owner`] (what
/// was signed is exactly what is sent).
pub async fn request(
    client: &async_nats::Client,
    endpoint: &str,
    body: Vec<u8>,
) -> Result<Result<Applied, ErrorBody>> {
    let subject = handoff_protocol::subjects::command(endpoint);
    let signature = owner().0.sign(&subject, &body);
    request_signed(client, &subject, body, Some(&signature)).await
}

/// Sends `body` on `subject` with `signature` as its signature header (none: unsigned).
pub async fn request_signed(
    client: &async_nats::Client,
    subject: &str,
    body: Vec<u8>,
    signature: Option<&str>,
) -> Result<Result<Applied, ErrorBody>> {
    let reply = handoff_client::exchange(client, subject, body, signature, TIMEOUT)
        .await
        .with_context(|| format!("request on {subject}"))?;
    Ok(reply.into_result())
}

/// Asks the projector's query service.
pub async fn query(
    client: &async_nats::Client,
    name: &str,
    body: Value,
) -> Result<Result<Value, Value>> {
    let subject = handoff_protocol::subjects::query(name);
    let reply = tokio::time::timeout(
        TIMEOUT,
        client.request(subject, serde_json::to_vec(&body)?.into()),
    )
    .await
    .context("query timed out")??;
    let mut v: Value = serde_json::from_slice(&reply.payload)?;
    if let Some(ok) = v.get_mut("ok") {
        return Ok(Ok(ok.take()));
    }
    Ok(Err(v["error"].take()))
}

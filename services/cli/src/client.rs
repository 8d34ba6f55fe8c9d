//! Talking to handoff over NATS: commands to the command service, queries to the
//! projector, and the event stream itself for history and watch.

use std::time::Duration;

use handoff_domain::{Actor, Command, CommandId};
use handoff_eventlog::EventLog;
use handoff_protocol::api::{encode_request, endpoint_of};
use handoff_protocol::{subjects, Applied, ErrorBody, Reply};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::Failure;

/// How long a command or query may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Api {
    pub client: async_nats::Client,
    pub actor: Actor,
    pub url: String,
}

impl Api {
    pub async fn connect(url: &str, actor: Actor) -> Result<Self, Failure> {
        let client = async_nats::ConnectOptions::new()
            .name("handoff-cli")
            .connection_timeout(Duration::from_secs(5))
            .connect(url)
            .await
            .map_err(|e| Failure::Usage(format!("cannot connect to NATS at {url}: {e}")))?;
        Ok(Api {
            client,
            actor,
            url: url.to_owned(),
        })
    }

    /// Sends a command; a refusal is a [`Failure::Refused`].
    pub async fn command(&self, id: &CommandId, command: &Command) -> Result<Applied, Failure> {
        let subject = subjects::command(endpoint_of(command));
        let body = encode_request(id, &self.actor, command);
        let reply = self.request(subject, body).await?;
        let reply: Reply = serde_json::from_slice(&reply).map_err(|e| {
            Failure::Usage(format!("unreadable reply from the command service: {e}"))
        })?;
        reply.into_result().map_err(Failure::Refused)
    }

    /// Asks the projector; a `not_found` or `validation` answer is a refusal.
    pub async fn query<T: DeserializeOwned>(&self, name: &str, body: Value) -> Result<T, Failure> {
        let subject = subjects::query(name);
        let reply = self
            .request(subject, serde_json::to_vec(&body).expect("json"))
            .await?;
        let mut v: Value = serde_json::from_slice(&reply).map_err(|e| {
            Failure::Usage(format!("unreadable answer from the query service: {e}"))
        })?;
        if let Some(ok) = v.get_mut("ok") {
            return serde_json::from_value(ok.take())
                .map_err(|e| Failure::Usage(format!("unexpected answer to {name}: {e}")));
        }
        let error: ErrorBody = serde_json::from_value(v["error"].take())
            .map_err(|e| Failure::Usage(format!("unreadable error from the query service: {e}")))?;
        Err(Failure::Refused(error))
    }

    async fn request(&self, subject: String, body: Vec<u8>) -> Result<bytes::Bytes, Failure> {
        let request = async_nats::Request::new()
            .payload(body.into())
            .timeout(Some(REQUEST_TIMEOUT));
        match self.client.send_request(subject.clone(), request).await {
            Ok(m) => Ok(m.payload),
            Err(e) => Err(Failure::Usage(match e.kind() {
                async_nats::RequestErrorKind::NoResponders => format!(
                    "nothing answers on {subject}: is handoff running? (start it with `handoff up`)"
                ),
                _ => format!("request on {subject} failed: {e}"),
            })),
        }
    }

    /// The event log, for reading history.
    pub async fn log(&self) -> Result<EventLog, Failure> {
        EventLog::attach(self.client.clone(), Default::default())
            .await
            .map_err(|e| Failure::Usage(e.to_string()))
    }
}

//! Sending commands to the command service from the data plane (a daemon reporting its
//! rebuilds, the agent reporting OPLOG_TTL_RESIZE).

use std::time::Duration;

use handoff_domain::{Actor, Command, CommandId};
use handoff_protocol::api::{encode_request, endpoint_of};
use handoff_protocol::{subjects, Applied, ErrorBody, ErrorCode, Reply};

#[derive(Clone)]
pub struct Commands {
    client: async_nats::Client,
    actor: Actor,
}

impl Commands {
    pub fn new(client: async_nats::Client, actor: Actor) -> Self {
        Commands { client, actor }
    }

    /// Sends `command` with id `id`, retrying while the command service is unreachable
    /// (the same id makes retries safe). A refusal is returned as is.
    pub async fn send(&self, id: &CommandId, command: &Command) -> Result<Applied, ErrorBody> {
        let subject = subjects::command(endpoint_of(command));
        let body = bytes::Bytes::from(encode_request(id, &self.actor, command));
        let mut wait = Duration::from_millis(100);
        for attempt in 0.. {
            let request = async_nats::Request::new()
                .payload(body.clone())
                .timeout(Some(Duration::from_secs(10)));
            let problem = match self.client.send_request(subject.clone(), request).await {
                Ok(m) => match serde_json::from_slice::<Reply>(&m.payload) {
                    Ok(r) => match r.into_result() {
                        Err(e) if e.code == ErrorCode::Unavailable => e.message,
                        other => return other,
                    },
                    Err(e) => format!("unreadable reply: {e}"),
                },
                Err(e) => e.to_string(),
            };
            if attempt >= 50 {
                return Err(ErrorBody::new(
                    ErrorCode::Unavailable,
                    "unavailable",
                    problem,
                ));
            }
            tracing::debug!(
                command = command.name(),
                problem,
                "command not delivered; retrying"
            );
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(2));
        }
        unreachable!("the loop returns")
    }
}

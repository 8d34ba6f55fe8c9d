//! Sending commands to the command service from the data plane (a daemon reporting its
//! rebuilds, the agent reporting OPLOG_TTL_RESIZE).

use std::time::Duration;

use handoff_domain::{Command, CommandId};
use handoff_protocol::auth::{Credentials, SIGNATURE_HEADER};
use handoff_protocol::{Applied, ErrorBody, ErrorCode, Reply};

#[derive(Clone)]
pub struct Commands {
    client: async_nats::Client,
    creds: Credentials,
    /// What the process tells the audit trail it is.
    name: String,
}

impl Commands {
    pub fn new(client: async_nats::Client, creds: Credentials, name: String) -> Self {
        Commands {
            client,
            creds,
            name,
        }
    }

    /// Sends `command` with id `id`, signed by the process's user, retrying while the
    /// command service is unreachable (the same id makes retries safe; each attempt is
    /// signed again). A refusal is returned as is.
    pub async fn send(&self, id: &CommandId, command: &Command) -> Result<Applied, ErrorBody> {
        let mut wait = Duration::from_millis(100);
        for attempt in 0.. {
            let signed = self.creds.sign_command(id, command, Some(&self.name));
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(SIGNATURE_HEADER, signed.signature.as_str());
            let request = async_nats::Request::new()
                .payload(signed.payload.into())
                .headers(headers)
                .timeout(Some(Duration::from_secs(10)));
            let problem = match self.client.send_request(signed.subject, request).await {
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

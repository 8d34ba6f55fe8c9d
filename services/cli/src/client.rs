//! Talking to handoff over NATS: commands to the command service, queries to the
//! projector, and the event stream itself for history and watch.

use std::time::Duration;

use handoff_client::{Client, Outage, Retry, SendError};
use handoff_domain::{Command, CommandId};
use handoff_eventlog::EventLog;
use handoff_protocol::api::query::Page;
use handoff_protocol::auth::Credentials;
use handoff_protocol::{subjects, Applied, ErrorBody};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::Failure;

/// How long a command or query may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Api {
    pub client: async_nats::Client,
    /// Who signs the commands; queries need none.
    pub creds: Option<Credentials>,
    pub url: String,
}

/// What the CLI tells the audit trail it is: program, version and host.
pub fn client_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default();
    format!("handoff-cli {} on {host}", env!("CARGO_PKG_VERSION"))
}

/// The servers of a `--nats-url`: one URL, or several separated by commas.
pub fn server_addrs(url: &str) -> Result<Vec<async_nats::ServerAddr>, Failure> {
    url.split(',')
        .map(|u| {
            u.trim()
                .parse::<async_nats::ServerAddr>()
                .map_err(|e| Failure::Usage(format!("--nats-url {u}: {e}")))
        })
        .collect()
}

impl Api {
    /// Connects to `url` (several servers of a cluster separated by commas, any of which
    /// may be down), as the NATS identity of `nats_seed` when given.
    pub async fn connect(
        url: &str,
        creds: Option<Credentials>,
        nats_seed: Option<String>,
    ) -> Result<Self, Failure> {
        let options = match nats_seed {
            Some(seed) => async_nats::ConnectOptions::with_nkey(seed),
            None => async_nats::ConnectOptions::new(),
        };
        let client = options
            .name("handoff-cli")
            .connection_timeout(Duration::from_secs(5))
            .connect(server_addrs(url)?)
            .await
            .map_err(|e| Failure::Usage(format!("cannot connect to NATS at {url}: {e}")))?;
        Ok(Api {
            client,
            creds,
            url: url.to_owned(),
        })
    }

    /// The caller's credentials, or a usage error saying how to give them.
    pub fn creds(&self) -> Result<&Credentials, Failure> {
        self.creds.as_ref().ok_or_else(|| {
            Failure::Usage(
                "commands are signed: give --creds FILE or set HANDOFF_CREDS (`handoff up` writes the first owner's to .handoff/owner.creds)".into(),
            )
        })
    }

    /// Sends a command signed with the caller's key, retried with the same id while
    /// handoff is briefly unavailable; a refusal is a [`Failure::Refused`].
    pub async fn command(&self, id: &CommandId, command: &Command) -> Result<Applied, Failure> {
        let client = Client::new(self.client.clone(), self.creds()?.clone(), client_name())
            .with_retry(Retry::INTERACTIVE);
        client.send(id, command).await.map_err(|e| match e {
            SendError::Unavailable {
                last: Outage::Service(body),
                ..
            } => Failure::Refused(body),
            SendError::Unavailable { .. } => Failure::Usage(e.to_string()),
            refused => Failure::Refused(refused.body()),
        })
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

    /// One page of a list query, or with `--all` every page (the largest pages the
    /// service gives). `body` holds the filters.
    pub async fn list<T: DeserializeOwned>(
        &self,
        name: &str,
        mut body: Value,
        paging: &crate::cmd::Paging,
    ) -> Result<Page<T>, Failure> {
        let limit = if paging.all {
            handoff_protocol::api::query::MAX_LIMIT
        } else {
            paging.limit
        };
        body["limit"] = limit.into();
        if let Some(c) = &paging.cursor {
            body["cursor"] = c.clone().into();
        }
        let mut page: Page<T> = self.query(name, body.clone()).await?;
        if !paging.all {
            return Ok(page);
        }
        while let Some(next) = page.next.take() {
            body["cursor"] = next.into();
            let more: Page<T> = self.query(name, body.clone()).await?;
            page.items.extend(more.items);
            page.total = more.total;
            page.next = more.next;
        }
        Ok(page)
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

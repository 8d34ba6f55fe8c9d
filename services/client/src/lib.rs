//! The one command client of handoff: every process that sends a command (the CLI, a
//! daemon, the agent, the monitor, the benchmarks and the tests) signs, sends and decodes
//! it here, and retries it the same way.
//!
//! A command flows: [`Client::send`] signs the request with the user's key (a fresh
//! signature each attempt, over the exact bytes sent) → [`exchange`] sends it on
//! `handoff.cmd.<endpoint>` with the signature header and decodes the [`Reply`] → the
//! answer is sorted into [`SendError`]: a domain [`Rejection`], the service's own refusal
//! (authorization, a malformed request), or an outage, which is retried with the **same
//! command id** (so a retry is applied at most once) under one [`Retry`] policy until its
//! deadline.
//!
//! # Layout
//! - [`Client`], [`Retry`]: signing, sending and retrying.
//! - [`exchange`]: one attempt with given bytes and signature, for callers (tests) that
//!   must send exactly what they built.
//! - [`SendError`], [`Outage`]: how a send can end other than applied.
//! - [`new_command_id`], [`now_ms`]: the one source of ids and the one clock.

use std::time::{Duration, Instant};

use handoff_domain::{Command, CommandId, Rejection};
use handoff_protocol::auth::{Credentials, SIGNATURE_HEADER};
use handoff_protocol::{Applied, ErrorBody, ErrorCode, Reply};
use thiserror::Error;

pub use handoff_protocol::{new_command_id, now_ms};

/// How a command is retried while handoff cannot answer it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retry {
    /// How long one attempt waits for its reply.
    pub attempt_timeout: Duration,
    /// No attempt starts after this much time since the first.
    pub deadline: Duration,
    /// The wait after the first failed attempt; it doubles up to `max_backoff`.
    pub first_backoff: Duration,
    pub max_backoff: Duration,
    /// Whether "nothing answers" (no command service subscribed) is retried too. A
    /// service waits for the command service to come back; a person at a terminal wants
    /// to hear at once that handoff is not running.
    pub when_nothing_answers: bool,
}

impl Retry {
    /// For a person at a terminal: a minute at most, and told at once when nothing runs.
    pub const INTERACTIVE: Retry = Retry {
        attempt_timeout: Duration::from_secs(30),
        deadline: Duration::from_secs(60),
        first_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_secs(2),
        when_nothing_answers: false,
    };

    /// For a service reporting what it did (a daemon, the agent, the monitor): it rides
    /// through a restart or a failover of the command service or of a server.
    pub const SERVICE: Retry = Retry {
        attempt_timeout: Duration::from_secs(10),
        deadline: Duration::from_secs(300),
        first_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_secs(2),
        when_nothing_answers: true,
    };

    /// One attempt, no retry.
    pub const fn once(timeout: Duration) -> Retry {
        Retry {
            attempt_timeout: timeout,
            deadline: Duration::ZERO,
            first_backoff: Duration::ZERO,
            max_backoff: Duration::ZERO,
            when_nothing_answers: false,
        }
    }
}

/// Why a command was not applied.
#[derive(Debug, Error)]
pub enum SendError {
    /// The domain refused it: the state or the input does not allow it. Retrying the same
    /// command gives the same answer; match on the rejection, never on its text.
    #[error("{0}")]
    Rejected(Rejection),
    /// The command service refused the request itself: not authorized (unsigned, forged,
    /// expired, unknown user, wrong role), malformed, too large, or an internal error.
    /// The body says which (`code`, `reason`).
    #[error("{}", .0.message)]
    Refused(ErrorBody),
    /// handoff did not answer in time, or answered that it cannot now, on every attempt
    /// until the retry deadline. The command may or may not have been applied: send it
    /// again with the same id to find out.
    #[error("not delivered after {attempts} attempt(s): {last}")]
    Unavailable {
        attempts: u32,
        #[source]
        last: Outage,
    },
}

impl SendError {
    /// The error as the wire states it, for printing or for a JSON answer.
    pub fn body(&self) -> ErrorBody {
        match self {
            SendError::Rejected(r) => r.clone().into(),
            SendError::Refused(b) => b.clone(),
            SendError::Unavailable { last, .. } => match last {
                Outage::Service(b) => b.clone(),
                other => ErrorBody::new(ErrorCode::Unavailable, "unavailable", other.to_string()),
            },
        }
    }
}

/// One attempt that got no usable answer.
#[derive(Debug, Error)]
pub enum Outage {
    #[error("nothing answers on {subject}: is handoff running? (start it with `handoff up`)")]
    NothingAnswers { subject: String },
    #[error("no answer on {subject} within {timeout:?}")]
    TimedOut { subject: String, timeout: Duration },
    #[error("request on {subject} failed: {source}")]
    Request {
        subject: String,
        #[source]
        source: async_nats::RequestError,
    },
    #[error("unreadable reply on {subject}: {source}")]
    Unreadable {
        subject: String,
        #[source]
        source: serde_json::Error,
    },
    /// The command service answered `unavailable`: its event log could not be reached.
    #[error("{}", .0.message)]
    Service(ErrorBody),
}

/// Sends commands signed by one user.
#[derive(Clone)]
pub struct Client {
    nats: async_nats::Client,
    creds: Credentials,
    /// What the process tells the audit trail it is (program, version, host or id).
    name: String,
    retry: Retry,
}

impl Client {
    /// A client of `creds`'s user over `nats`, with the [`Retry::SERVICE`] policy.
    pub fn new(nats: async_nats::Client, creds: Credentials, name: impl Into<String>) -> Self {
        Client {
            nats,
            creds,
            name: name.into(),
            retry: Retry::SERVICE,
        }
    }

    /// The same client with another retry policy.
    pub fn with_retry(mut self, retry: Retry) -> Self {
        self.retry = retry;
        self
    }

    /// Sends `command` as command `id`, retrying an outage with the same id until the
    /// policy's deadline. Each attempt is signed anew, so a long outage does not outlive
    /// the signature's freshness window.
    pub async fn send(&self, id: &CommandId, command: &Command) -> Result<Applied, SendError> {
        let started = Instant::now();
        let mut wait = self.retry.first_backoff;
        let mut attempts = 0;
        loop {
            attempts += 1;
            let signed = self.creds.sign_command(id, command, Some(&self.name));
            let outage = match exchange(
                &self.nats,
                &signed.subject,
                signed.payload,
                Some(&signed.signature),
                self.retry.attempt_timeout,
            )
            .await
            {
                Ok(reply) => match classify(reply) {
                    Ok(answer) => return answer,
                    Err(outage) => outage,
                },
                Err(outage) => outage,
            };
            let retry = match outage {
                Outage::NothingAnswers { .. } => self.retry.when_nothing_answers,
                _ => true,
            };
            if !retry || started.elapsed() + wait > self.retry.deadline {
                return Err(SendError::Unavailable {
                    attempts,
                    last: outage,
                });
            }
            tracing::debug!(command = command.name(), %id, attempts, problem = %outage, "command not delivered; retrying");
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(self.retry.max_backoff);
        }
    }
}

/// Sorts a reply: applied, a final refusal, or an outage to retry.
fn classify(reply: Reply) -> Result<Result<Applied, SendError>, Outage> {
    match reply.into_result() {
        Ok(applied) => Ok(Ok(applied)),
        Err(body) if body.code == ErrorCode::Unavailable => Err(Outage::Service(body)),
        Err(ErrorBody {
            rejection: Some(r), ..
        }) => Ok(Err(SendError::Rejected(*r))),
        Err(body) => Ok(Err(SendError::Refused(body))),
    }
}

/// One attempt: sends exactly `payload` on `subject` with `signature` as the signature
/// header (none: unsigned) and decodes the reply. This is the only place that builds the
/// header.
pub async fn exchange(
    nats: &async_nats::Client,
    subject: &str,
    payload: Vec<u8>,
    signature: Option<&str>,
    timeout: Duration,
) -> Result<Reply, Outage> {
    let mut headers = async_nats::HeaderMap::new();
    if let Some(s) = signature {
        headers.insert(SIGNATURE_HEADER, s);
    }
    let request = async_nats::Request::new()
        .payload(payload.into())
        .headers(headers)
        .timeout(Some(timeout));
    let message = nats
        .send_request(subject.to_owned(), request)
        .await
        .map_err(|source| match source.kind() {
            async_nats::RequestErrorKind::NoResponders => Outage::NothingAnswers {
                subject: subject.to_owned(),
            },
            async_nats::RequestErrorKind::TimedOut => Outage::TimedOut {
                subject: subject.to_owned(),
                timeout,
            },
            _ => Outage::Request {
                subject: subject.to_owned(),
                source,
            },
        })?;
    serde_json::from_slice(&message.payload).map_err(|source| Outage::Unreadable {
        subject: subject.to_owned(),
        source,
    })
}

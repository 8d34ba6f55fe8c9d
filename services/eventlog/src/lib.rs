//! The event log: one JetStream stream holding every handoff event, one subject per
//! aggregate (see `handoff_protocol::subjects`).
//!
//! # Guarantees
//! - **Nothing is ever dropped**: file storage, `deny_delete`, `deny_purge`, no message,
//!   byte or age limit.
//! - **Optimistic concurrency per aggregate**: every message carries
//!   `Nats-Expected-Last-Subject-Sequence`, the last sequence of its subject that the
//!   decision was made on (0 for a new aggregate), or of a filter of many subjects
//!   ([`Outgoing::expected_subject`]) for a rule that reads many aggregates. A stale
//!   decision is a [`AppendError::Conflict`].
//! - **Atomic appends**: [`EventLog::append`] writes its messages as one JetStream atomic
//!   batch (server 2.12+, `allow_atomic`): all are stored, contiguously, or none. A batch
//!   holds at most [`MAX_BATCH`] messages and each subject once.
//! - **Idempotency**: every message carries `Nats-Msg-Id`. A retry of an append whose
//!   acknowledgement was lost is recognised as already applied
//!   ([`Appended::duplicate`]): a cluster answers it with `duplicate: true`, a single
//!   server with a wrong-last-sequence error (10071) or, for a batch, a duplicate message
//!   id error (10201); after either, the first subject's last message is read and its
//!   `Nats-Msg-Id` compared with ours.
//!
//! # Layout
//! - [`EventLog`]: open (creating or updating the stream), append, read.
//! - [`reader`]: ordered reads of the stream from a sequence, for folds and replays.
//! - [`follow`]: a reader that rides through outages (a node lost, a leader moving).

pub mod fence;
pub mod follow;
pub mod reader;

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use async_nats::{Client, HeaderMap};
use bytes::Bytes;
use serde::Deserialize;
use thiserror::Error;

pub use follow::Follower;
pub use reader::{EventReader, ReadError, Recorded};

use handoff_protocol::EventEnvelope;

/// The most messages in one atomic batch (nats-server's limit).
pub const MAX_BATCH: usize = 1000;

/// JetStream's error code for a failed expected-last-subject-sequence check.
const WRONG_LAST_SEQUENCE: u64 = 10071;
/// JetStream's error code for an atomic batch holding a `Nats-Msg-Id` already stored
/// (nats-server 2.14+ checks this before the expected sequences).
const BATCH_DUPLICATE_MSG_ID: u64 = 10201;

/// How an append's JetStream error is to be taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerError {
    /// A failed expectation or an id already stored: our own earlier attempt may be
    /// stored, so read the stream back to tell a duplicate from a conflict.
    CheckStored,
    /// The server cannot store the append now (resources, storage, a batch it lost
    /// track of, too many batches at once, no leader): nothing was stored, and the same
    /// messages retried later may be.
    Transient,
    /// Anything else: a bug or a misconfiguration. The same append gets the same answer.
    Refused,
}

/// The class of a JetStream error code (`err_code`, nats-server's `server/errors.json`).
///
/// Transient: 10008 JetStream temporarily unavailable, 10023 insufficient resources,
/// 10028 insufficient memory, 10047 insufficient storage, 10077 stream store failed,
/// 10118 and 10194 stream offline, 10163 expected last sequence per subject temporarily
/// unavailable, 10167 too many requests, 10176 atomic batch incomplete (the server
/// dropped it: abandoned, or its first message refused), 10210 and 10211 too many
/// batches in flight. A timeout never reaches here: it is an outage already.
pub fn classify(code: u64) -> ServerError {
    match code {
        WRONG_LAST_SEQUENCE | BATCH_DUPLICATE_MSG_ID => ServerError::CheckStored,
        10008 | 10023 | 10028 | 10047 | 10077 | 10118 | 10163 | 10167 | 10176 | 10194 | 10210
        | 10211 => ServerError::Transient,
        _ => ServerError::Refused,
    }
}

/// How the event stream is set up.
#[derive(Clone, Debug)]
pub struct Config {
    /// Stream name.
    pub stream: String,
    /// Subjects the stream captures.
    pub subjects: Vec<String>,
    /// Copies kept in a cluster (3 in production, 1 on a single server).
    pub replicas: usize,
    /// How long `Nats-Msg-Id` values are remembered.
    pub duplicate_window: Duration,
    /// How long to wait for an acknowledgement.
    pub ack_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            stream: handoff_protocol::subjects::STREAM.to_owned(),
            subjects: vec![handoff_protocol::subjects::ALL_EVENTS.to_owned()],
            replicas: 1,
            duplicate_window: Duration::from_secs(120),
            ack_timeout: Duration::from_secs(10),
        }
    }
}

/// One message to append.
#[derive(Clone, Debug)]
pub struct Outgoing {
    pub subject: String,
    pub payload: Bytes,
    /// Unique per event: the same id is never stored twice within the duplicate window.
    pub msg_id: String,
    /// The subject's last sequence the decision saw; 0 when it must be empty.
    pub expected_last_subject_seq: u64,
    /// A subject filter the expectation applies to instead of the message's own subject
    /// (`Nats-Expected-Last-Subject-Sequence-Subject`, e.g. `handoff.evt.user.>`): its
    /// last sequence over every matching subject. A rule that reads many aggregates
    /// (the last owner, the fleet's rebuild limit) guards them all this way; it must
    /// cover the message's own subject, or that subject goes unguarded.
    pub expected_subject: Option<String>,
    /// The stream's last sequence the decision saw (`Nats-Expected-Last-Sequence`): any
    /// append since, on any subject, makes this one a conflict. Only an append's first
    /// message may carry it.
    pub expected_last_seq: Option<u64>,
}

/// Where an append landed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Appended {
    /// The first message's stream sequence; the others follow contiguously.
    pub first_seq: u64,
    pub last_seq: u64,
    /// Already stored by an earlier attempt; nothing new was written.
    pub duplicate: bool,
}

/// Why opening the log failed.
#[derive(Debug, Error)]
pub enum OpenError {
    #[error("cannot create or update stream {stream}: {source}")]
    Stream {
        stream: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Why an append failed. Nothing was stored in either case.
#[derive(Debug, Error)]
pub enum AppendError {
    /// A subject moved past the expected sequence: another command changed an aggregate
    /// since the decision. Reload the state and decide again.
    #[error("conflict: an aggregate changed since the decision ({description})")]
    Conflict { description: String },
    /// The server refused the append for a reason that does not pass (a bug or a
    /// misconfiguration, see [`classify`]): do not retry as is.
    #[error("the event log refused the append: {description} (code {code})")]
    Refused { code: u64, description: String },
    /// The server could not be reached, did not answer in time, or cannot store now (out
    /// of resources or storage, too many batches at once: see [`classify`]); the append
    /// may or may not be stored. Retry the same messages: a stored one is recognised.
    #[error("the event log is unavailable: {0}")]
    Unavailable(String),
}

/// The event log.
#[derive(Clone)]
pub struct EventLog {
    client: Client,
    js: jetstream::Context,
    stream: stream::Stream,
    config: Config,
}

#[derive(Deserialize)]
struct ApiError {
    #[serde(default)]
    err_code: u64,
    #[serde(default)]
    description: String,
}

#[derive(Deserialize)]
struct PubAckReply {
    #[serde(default)]
    error: Option<ApiError>,
    #[serde(default)]
    seq: u64,
    #[serde(default)]
    duplicate: bool,
    #[serde(default)]
    count: u64,
}

impl EventLog {
    /// Opens the log as its writer: creates the stream or brings its settings up to date.
    /// Only the command service does this; readers [`attach`](Self::attach).
    pub async fn open(client: Client, config: Config) -> Result<Self, OpenError> {
        Self::open_as(client, config, true).await
    }

    /// Opens the log as a reader: uses the stream as it is (creating it only if it does
    /// not exist yet), never changing its settings such as its replicas.
    pub async fn attach(client: Client, config: Config) -> Result<Self, OpenError> {
        Self::open_as(client, config, false).await
    }

    async fn open_as(client: Client, config: Config, writer: bool) -> Result<Self, OpenError> {
        let js = jetstream::new(client.clone());
        let stream_config = stream::Config {
            name: config.stream.clone(),
            subjects: config.subjects.clone(),
            storage: stream::StorageType::File,
            retention: stream::RetentionPolicy::Limits,
            num_replicas: config.replicas,
            duplicate_window: config.duplicate_window,
            deny_delete: true,
            deny_purge: true,
            allow_direct: true,
            allow_atomic_publish: true,
            // No max_messages/max_bytes/max_age: a limit would silently delete history.
            ..Default::default()
        };
        let err = |e: Box<dyn std::error::Error + Send + Sync>| OpenError::Stream {
            stream: config.stream.clone(),
            source: e,
        };
        let stream = match js.get_stream(&config.stream).await {
            Ok(existing) if !writer => existing,
            Ok(_) => {
                js.update_stream(&stream_config)
                    .await
                    .map_err(|e| err(e.into()))?;
                js.get_stream(&config.stream)
                    .await
                    .map_err(|e| err(e.into()))?
            }
            Err(_) => js
                .get_or_create_stream(stream_config)
                .await
                .map_err(|e| err(e.into()))?,
        };
        Ok(EventLog {
            client,
            js,
            stream,
            config,
        })
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    pub fn stream_name(&self) -> &str {
        &self.config.stream
    }

    /// The last sequence in the stream (0 when empty).
    pub async fn last_sequence(&self) -> Result<u64, AppendError> {
        let mut stream = self.stream.clone();
        let info = stream
            .info()
            .await
            .map_err(|e| AppendError::Unavailable(e.to_string()))?;
        Ok(info.state.last_sequence)
    }

    /// The last message on the subjects matching `filter`, if any. A direct get with the
    /// subject in the request's own subject, so NATS permissions can allow it per subject
    /// (a daemon may ask about its own subject and the jobs' only).
    async fn last_message_of(
        &self,
        filter: &str,
    ) -> Result<Option<jetstream::message::StreamMessage>, ReadError> {
        match self.stream.direct_get_last_for_subject(filter).await {
            Ok(m) => Ok(Some(m)),
            Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => Ok(None),
            Err(e) => Err(ReadError::Unavailable(e.to_string())),
        }
    }

    /// The sequence of the last event on the subjects matching `filter` (0 when none).
    pub async fn last_sequence_of(&self, filter: &str) -> Result<u64, ReadError> {
        Ok(self
            .last_message_of(filter)
            .await?
            .map_or(0, |m| m.sequence))
    }

    /// The last event on the subjects matching `filter`, if any.
    pub async fn last_event_of(&self, filter: &str) -> Result<Option<Recorded>, ReadError> {
        let Some(m) = self.last_message_of(filter).await? else {
            return Ok(None);
        };
        let envelope = EventEnvelope::decode(&m.payload).map_err(|source| ReadError::Decode {
            seq: m.sequence,
            subject: m.subject.to_string(),
            source,
        })?;
        Ok(Some(Recorded {
            seq: m.sequence,
            subject: m.subject.to_string(),
            envelope,
        }))
    }

    /// Every event on the subjects matching `filter`, up to the last one there now.
    pub async fn events_of(&self, filter: &str) -> Result<Vec<Recorded>, ReadError> {
        let end = self.last_sequence_of(filter).await?;
        let mut events = Vec::new();
        if end == 0 {
            return Ok(events);
        }
        let mut reader = self.read_filtered(1, filter).await?;
        loop {
            let r = reader.next().await?;
            let seq = r.seq;
            events.push(r);
            if seq >= end {
                return Ok(events);
            }
        }
    }

    /// Reads the stream in order from `start` (1 for the beginning).
    pub async fn read_from(&self, start: u64) -> Result<EventReader, ReadError> {
        EventReader::open(&self.stream, start, None).await
    }

    /// Reads in order from `start` only the subjects matching `filter`.
    pub async fn read_filtered(&self, start: u64, filter: &str) -> Result<EventReader, ReadError> {
        EventReader::open(&self.stream, start, Some(filter.to_owned())).await
    }

    /// Appends the messages atomically: all or none. At most [`MAX_BATCH`] messages,
    /// each subject at most once.
    pub async fn append(&self, messages: &[Outgoing]) -> Result<Appended, AppendError> {
        assert!(
            !messages.is_empty() && messages.len() <= MAX_BATCH,
            "an append holds 1 to {MAX_BATCH} messages"
        );
        let reply = self.publish(messages).await?;
        let n = messages.len() as u64;
        match reply.error {
            None => {
                if n > 1 && reply.count != n && !reply.duplicate {
                    return Err(AppendError::Refused {
                        code: 0,
                        description: format!(
                            "batch of {n} acknowledged with count {}",
                            reply.count
                        ),
                    });
                }
                Ok(Appended {
                    first_seq: reply.seq + 1 - n,
                    last_seq: reply.seq,
                    duplicate: reply.duplicate,
                })
            }
            Some(e) => match classify(e.err_code) {
                ServerError::CheckStored => {
                    // Either someone else wrote, or our own earlier attempt was stored and
                    // its acknowledgement lost: the stored messages tell which.
                    match self.already_stored(messages).await? {
                        Some(first_seq) => Ok(Appended {
                            first_seq,
                            last_seq: first_seq + n - 1,
                            duplicate: true,
                        }),
                        None => Err(AppendError::Conflict {
                            description: e.description,
                        }),
                    }
                }
                ServerError::Transient => Err(AppendError::Unavailable(format!(
                    "{} (code {})",
                    e.description, e.err_code
                ))),
                ServerError::Refused => Err(AppendError::Refused {
                    code: e.err_code,
                    description: e.description,
                }),
            },
        }
    }

    async fn publish(&self, messages: &[Outgoing]) -> Result<PubAckReply, AppendError> {
        let batch_id = (messages.len() > 1).then(|| ulid::Ulid::new().to_string());
        let last = messages.len() - 1;
        for (i, m) in messages.iter().enumerate() {
            let mut headers = HeaderMap::new();
            headers.insert("Nats-Msg-Id", m.msg_id.as_str());
            headers.insert(
                "Nats-Expected-Last-Subject-Sequence",
                m.expected_last_subject_seq.to_string().as_str(),
            );
            if let Some(filter) = &m.expected_subject {
                headers.insert(
                    "Nats-Expected-Last-Subject-Sequence-Subject",
                    filter.as_str(),
                );
            }
            if let Some(seq) = m.expected_last_seq {
                assert!(
                    i == 0,
                    "only an append's first message expects the stream's end"
                );
                headers.insert("Nats-Expected-Last-Sequence", seq.to_string().as_str());
            }
            if let Some(id) = &batch_id {
                headers.insert("Nats-Batch-Id", id.as_str());
                headers.insert("Nats-Batch-Sequence", (i + 1).to_string().as_str());
                if i == last {
                    headers.insert("Nats-Batch-Commit", "1");
                }
            }
            if i < last {
                self.client
                    .publish_with_headers(m.subject.clone(), headers, m.payload.clone())
                    .await
                    .map_err(|e| AppendError::Unavailable(e.to_string()))?;
            } else {
                let request = async_nats::Request::new()
                    .headers(headers)
                    .payload(m.payload.clone())
                    .timeout(Some(self.config.ack_timeout));
                let reply = self
                    .client
                    .send_request(m.subject.clone(), request)
                    .await
                    .map_err(|e| AppendError::Unavailable(e.to_string()))?;
                return serde_json::from_slice(&reply.payload).map_err(|e| {
                    AppendError::Unavailable(format!("unreadable acknowledgement: {e}"))
                });
            }
        }
        unreachable!("the loop returns on the last message")
    }

    /// The first sequence of `messages` if the stream already holds exactly them, stored
    /// together by an earlier attempt. The first subject's last message must be ours, and
    /// so must every message after it up to the batch's length: a later attempt may
    /// share its first message with an earlier, different batch.
    async fn already_stored(&self, messages: &[Outgoing]) -> Result<Option<u64>, AppendError> {
        let first = match self
            .stream
            .get_last_raw_message_by_subject(&messages[0].subject)
            .await
        {
            Ok(m) => m,
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => {
                return Ok(None)
            }
            Err(e) => return Err(AppendError::Unavailable(e.to_string())),
        };
        if msg_id(&first.headers).as_deref() != Some(messages[0].msg_id.as_str()) {
            return Ok(None);
        }
        for (i, m) in messages.iter().enumerate().skip(1) {
            let stored = match self.stream.get_raw_message(first.sequence + i as u64).await {
                Ok(s) => s,
                Err(e) if e.kind() == stream::RawMessageErrorKind::NoMessageFound => {
                    return Ok(None)
                }
                Err(e) => return Err(AppendError::Unavailable(e.to_string())),
            };
            if msg_id(&stored.headers).as_deref() != Some(m.msg_id.as_str()) {
                return Ok(None);
            }
        }
        Ok(Some(first.sequence))
    }
}

fn msg_id(headers: &HeaderMap) -> Option<String> {
    headers.get("Nats-Msg-Id").map(|v| v.as_str().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What nats-server answers when it cannot store now (checked in its
    /// `server/errors.json`) is an outage to retry, never a final refusal; a check that
    /// failed is read back; a request the server will never accept is refused.
    #[test]
    fn transient_server_errors_are_unavailable() {
        for (code, what) in [
            (10023, "insufficient resources"),
            (10047, "insufficient storage resources available"),
            (10077, "stream store failed"),
            (10176, "atomic publish batch is incomplete"),
            (10210, "atomic publish too many inflight"),
        ] {
            assert_eq!(classify(code), ServerError::Transient, "{code} {what}");
        }
        assert_eq!(classify(10071), ServerError::CheckStored);
        assert_eq!(classify(10201), ServerError::CheckStored);
        for (code, what) in [
            (10174, "atomic publish is disabled"),
            (10199, "atomic publish batch is too large"),
            (10054, "message size exceeds maximum allowed"),
        ] {
            assert_eq!(classify(code), ServerError::Refused, "{code} {what}");
        }
    }
}

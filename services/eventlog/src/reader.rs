//! Ordered reads of the event stream: an ordered consumer (ephemeral, flow controlled,
//! recreated by the client on a gap), decoded into envelopes with their sequence.

use async_nats::jetstream::consumer::{self, DeliverPolicy};
use async_nats::jetstream::stream;
use futures::StreamExt;
use handoff_protocol::{DecodeError, EventEnvelope};
use thiserror::Error;

/// One event read back, with where it is in the stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recorded {
    pub seq: u64,
    pub subject: String,
    pub envelope: EventEnvelope,
}

#[derive(Debug, Error)]
pub enum ReadError {
    #[error("cannot read the event stream: {0}")]
    Unavailable(String),
    #[error("event {seq} on {subject} cannot be decoded: {source}")]
    Decode {
        seq: u64,
        subject: String,
        #[source]
        source: DecodeError,
    },
}

/// Events in stream order.
pub struct EventReader {
    messages: consumer::pull::Ordered,
}

impl EventReader {
    pub(crate) async fn open(
        stream: &stream::Stream,
        start: u64,
        filter: Option<String>,
    ) -> Result<Self, ReadError> {
        let deliver_policy = if start <= 1 {
            DeliverPolicy::All
        } else {
            DeliverPolicy::ByStartSequence {
                start_sequence: start,
            }
        };
        // A filtered reader names its consumer, so the filter is part of the request's
        // subject and the server's permissions can allow a reader its own subjects only.
        let name = filter
            .as_ref()
            .map(|_| ulid::Ulid::new().to_string().to_lowercase());
        let consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                name,
                deliver_policy,
                filter_subject: filter.unwrap_or_default(),
                ..Default::default()
            })
            .await
            .map_err(|e| ReadError::Unavailable(e.to_string()))?;
        let messages = consumer
            .messages()
            .await
            .map_err(|e| ReadError::Unavailable(e.to_string()))?;
        Ok(EventReader { messages })
    }

    /// The next event; waits for one when the reader is at the end of the stream.
    pub async fn next(&mut self) -> Result<Recorded, ReadError> {
        loop {
            let Some(next) = self.messages.next().await else {
                return Err(ReadError::Unavailable("the ordered consumer ended".into()));
            };
            let message = match next {
                Ok(m) => m,
                Err(e) => {
                    // Missed heartbeats and consumer recreation are reported here and are
                    // not fatal: the ordered consumer resumes by itself.
                    tracing::debug!(error = %e, "event reader hiccup");
                    continue;
                }
            };
            let seq = message
                .info()
                .map_err(|e| ReadError::Unavailable(e.to_string()))?
                .stream_sequence;
            let subject = message.subject.to_string();
            let envelope =
                EventEnvelope::decode(&message.payload).map_err(|source| ReadError::Decode {
                    seq,
                    subject: subject.clone(),
                    source,
                })?;
            return Ok(Recorded {
                seq,
                subject,
                envelope,
            });
        }
    }
}

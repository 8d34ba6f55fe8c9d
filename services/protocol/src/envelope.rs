//! An event as stored in the stream: `{"type", "version", "data", "command", "actor",
//! "at", "last", "digest"}` as JSON.
//!
//! Versioning: every event type has a data version (`Event::VERSION`). A change that
//! only adds an optional field keeps the version; any other change bumps it and adds a
//! step to [`upcast`], which turns old data into the current shape before it is decoded.
//! Stored events are never rewritten.

use handoff_domain::{Actor, CommandId, Event};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use thiserror::Error;

/// One stored event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct EventEnvelope {
    #[serde(flatten)]
    pub event: Event,
    pub version: u32,
    /// The command that appended it (a ULID chosen by the caller).
    pub command: CommandId,
    /// Who asked for the command.
    pub actor: Actor,
    /// When the command service decided it, in milliseconds since the Unix epoch.
    pub at: u64,
    /// Set on the last event of its command: the command is fully applied.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub last: bool,
    /// A digest of the command, so a command id reused for another command is caught.
    pub digest: String,
    /// The fingerprint of the request's signature (`auth::fingerprint`), so the same
    /// signed request sent again is recognised as a replay. Absent on what the service
    /// appends by itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
}

/// An event that cannot be read.
#[derive(Debug, Error)]
pub enum DecodeError {
    #[error("malformed event: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error(
        "event {kind} has version {version}, newer than this build reads ({current}); upgrade"
    )]
    NewerVersion {
        kind: String,
        version: u32,
        current: u32,
    },
}

#[derive(Deserialize)]
struct Raw<'a> {
    #[serde(rename = "type", borrow)]
    kind: std::borrow::Cow<'a, str>,
    version: u32,
    #[serde(borrow)]
    data: &'a serde_json::value::RawValue,
    command: CommandId,
    actor: Actor,
    at: u64,
    #[serde(default)]
    last: bool,
    digest: String,
    #[serde(default)]
    signature: Option<String>,
}

/// Turns the data of an older version of an event into the current shape. Version 1 is
/// current for every event, so there is nothing to do yet; a future version 2 of, say,
/// `JobMoveStarted` adds `("JobMoveStarted", 1) => { ...; 2 }` here.
fn upcast(kind: &str, version: u32, data: Value) -> Result<Value, DecodeError> {
    if version > Event::VERSION {
        return Err(DecodeError::NewerVersion {
            kind: kind.to_owned(),
            version,
            current: Event::VERSION,
        });
    }
    Ok(data)
}

impl EventEnvelope {
    pub fn encode(&self) -> Vec<u8> {
        // Safe: every field serializes (no maps with non-string keys, no floats).
        serde_json::to_vec(self).expect("an event envelope always serializes")
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        // The data stays raw JSON: the current version is parsed once, straight into its
        // type (a large JobsAssigned is not copied through a JSON value); older versions
        // are upcast first.
        let raw: Raw = serde_json::from_slice(bytes)?;
        let upcast_data;
        let data = if raw.version == Event::VERSION {
            raw.data.get()
        } else {
            let old: Value = serde_json::from_str(raw.data.get())?;
            upcast_data = upcast(&raw.kind, raw.version, old)?.to_string();
            upcast_data.as_str()
        };
        let tagged = format!(
            "{{\"type\":{},\"data\":{data}}}",
            serde_json::to_string(&raw.kind)?
        );
        Ok(EventEnvelope {
            event: serde_json::from_str(&tagged)?,
            version: Event::VERSION,
            command: raw.command,
            actor: raw.actor,
            at: raw.at,
            last: raw.last,
            digest: raw.digest,
            signature: raw.signature,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use handoff_domain::DaemonId;

    fn sample() -> EventEnvelope {
        EventEnvelope {
            event: Event::DaemonRemoved {
                daemon: DaemonId::new("h:/d/").unwrap(),
            },
            version: Event::VERSION,
            command: CommandId::new("01ARZ3NDEKTSV4RRFFQ69G5FAV").unwrap(),
            actor: Actor::new("alice").unwrap(),
            at: 1,
            last: true,
            digest: "00".into(),
            signature: Some("0123456789abcdef".into()),
        }
    }

    #[test]
    fn round_trips() {
        let e = sample();
        assert_eq!(EventEnvelope::decode(&e.encode()).unwrap(), e);
    }

    #[test]
    fn refuses_a_newer_version() {
        let mut v: Value = serde_json::from_slice(&sample().encode()).unwrap();
        v["version"] = 99.into();
        let err = EventEnvelope::decode(&serde_json::to_vec(&v).unwrap()).unwrap_err();
        assert!(matches!(err, DecodeError::NewerVersion { version: 99, .. }));
    }
}

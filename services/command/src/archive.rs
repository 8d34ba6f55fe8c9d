//! What keeps the command service's memory and start-up flat however long the history:
//!
//! - [`Archive`]: the answers of command ids no longer recent (a key-value bucket,
//!   [`subjects::COMMAND_ARCHIVE_BUCKET`], one key per id), so a retry of an id from last
//!   month is still answered `duplicate: true`, and the model keeps only recent ids.
//! - [`Snapshots`]: the model saved in an object store ([`subjects::MODEL_BUCKET`]) with
//!   the stream sequence it folded and a digest of its bytes; a service starts from the
//!   latest and folds only the events after it. One that does not verify is ignored, and
//!   the service folds the stream from the start.
//!
//! The two work together: a record leaves the model's window for `archiving` (which the
//! snapshot holds), and leaves `archiving` only once the archive has it; so every id a
//! snapshot no longer holds is in the archive.

use std::time::Duration;

use async_nats::jetstream::{self, kv, object_store};
use handoff_domain::CommandId;
use handoff_eventlog::fence::stream_not_found;
use handoff_protocol::subjects;
use thiserror::Error;
use tokio::io::AsyncReadExt;

use crate::model::{Archived, Model};

/// The snapshot format this build reads and writes. Raised whenever the model's
/// serialised form or the fold itself (`State::apply`, `Model::apply`) changes: a model
/// saved by another fold is not the fold of the same events by this one.
const FORMAT: u32 = 5;

#[derive(Debug, Error)]
pub enum ArchiveError {
    #[error("the command archive is unavailable: {0}")]
    Unavailable(String),
    #[error("the command archive holds an unreadable record for {id}: {detail}")]
    Corrupt { id: CommandId, detail: String },
}

fn unavailable(e: impl std::fmt::Display) -> ArchiveError {
    ArchiveError::Unavailable(e.to_string())
}

/// The answers of old command ids.
#[derive(Clone)]
pub struct Archive {
    kv: kv::Store,
    /// The bucket's stream, read through its leader: a replica's direct get may lag, and
    /// an id it does not have yet would be decided again.
    stream: jetstream::stream::Stream,
    /// When the bucket was created: a snapshot saved with another archive is not used.
    created: String,
}

impl Archive {
    /// Binds to the archive, creating it when it is missing.
    pub async fn open(js: &jetstream::Context, replicas: usize) -> Result<Self, ArchiveError> {
        let bucket = subjects::COMMAND_ARCHIVE_BUCKET;
        let kv = match js.get_key_value(bucket).await {
            Ok(kv) => kv,
            Err(e) if !stream_not_found(&e) => return Err(unavailable(e)),
            Err(_) => js
                .create_key_value(kv::Config {
                    bucket: bucket.into(),
                    description: "handoff: the answer of every command id no longer recent".into(),
                    history: 1,
                    storage: jetstream::stream::StorageType::File,
                    num_replicas: replicas,
                    ..Default::default()
                })
                .await
                .map_err(unavailable)?,
        };
        let mut stream = js
            .get_stream(handoff_protocol::dataplane::kv_stream(bucket))
            .await
            .map_err(unavailable)?;
        let created = stream
            .info()
            .await
            .map_err(unavailable)?
            .created
            .to_string();
        Ok(Archive {
            kv,
            stream,
            created,
        })
    }

    /// The answer `id` got, if the archive has it.
    pub async fn get(&self, id: &CommandId) -> Result<Option<Archived>, ArchiveError> {
        use jetstream::stream::LastRawMessageErrorKind;
        let subject = format!("$KV.{}.{id}", subjects::COMMAND_ARCHIVE_BUCKET);
        match self.stream.get_last_raw_message_by_subject(&subject).await {
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(unavailable(e)),
            Ok(m) => {
                serde_json::from_slice(&m.payload)
                    .map(Some)
                    .map_err(|e| ArchiveError::Corrupt {
                        id: id.clone(),
                        detail: e.to_string(),
                    })
            }
        }
    }

    /// Stores `id`'s answer (the same each time: storing it again changes nothing).
    pub async fn put(&self, id: &CommandId, answer: &Archived) -> Result<(), ArchiveError> {
        let bytes = serde_json::to_vec(answer).expect("answers serialize");
        self.kv
            .put(id.as_str(), bytes.into())
            .await
            .map_err(unavailable)?;
        Ok(())
    }
}

/// Why a snapshot was not used.
#[derive(Debug, Error)]
pub enum Ignored {
    #[error("there is no snapshot")]
    None,
    #[error("the snapshot store is unavailable: {0}")]
    Unavailable(String),
    #[error("the snapshot does not verify: {0}")]
    Invalid(String),
}

/// The command model's snapshots.
#[derive(Clone)]
pub struct Snapshots {
    store: object_store::ObjectStore,
    /// The event stream, to check a snapshot's last event against it.
    events: jetstream::stream::Stream,
}

/// What a snapshot was saved against: the archive's creation time. A snapshot saved with
/// another archive (one lost and created again empty, which would no longer answer the
/// ids the snapshot left to it) is not used. (The event stream is checked by its events:
/// the one the model folded last must be the stream's at that sequence.)
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Lineage {
    pub archive_created: String,
}

impl Lineage {
    /// The lineage of the stores as they are now.
    pub fn of(archive: &Archive) -> Self {
        Lineage {
            archive_created: archive.created.clone(),
        }
    }
}

/// What a snapshot says of itself, in its object's description.
#[derive(serde::Serialize, serde::Deserialize)]
struct Header {
    format: u32,
    lineage: Lineage,
    /// The last stream sequence the model folded.
    applied: u64,
    /// FNV-1a 64 of the model's bytes.
    digest: String,
    bytes: u64,
}

/// FNV-1a 64 of `bytes`, in hex: the digest of a saved model and of a command.
pub(crate) fn fnv(bytes: &[u8]) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{hash:016x}")
}

impl Snapshots {
    /// Binds to the snapshot store, creating it when it is missing.
    pub async fn open(js: &jetstream::Context, replicas: usize) -> Result<Self, ArchiveError> {
        let bucket = subjects::MODEL_BUCKET;
        let store = match js.get_object_store(bucket).await {
            Ok(s) => s,
            Err(e) if !stream_not_found(&e) => return Err(unavailable(e)),
            Err(_) => js
                .create_object_store(object_store::Config {
                    bucket: bucket.into(),
                    description: Some("handoff: the command service's model".into()),
                    storage: jetstream::stream::StorageType::File,
                    num_replicas: replicas,
                    ..Default::default()
                })
                .await
                .map_err(unavailable)?,
        };
        let events = js.get_stream(subjects::STREAM).await.map_err(unavailable)?;
        Ok(Snapshots { store, events })
    }

    /// The model as last saved, checked: its digest, its format, and that it folded no
    /// more than the stream holds (`stream_end`).
    pub async fn load(&self, stream_end: u64, lineage: &Lineage) -> Result<Model, Ignored> {
        // Reading can stall (the chunks purged under the reader by another instance's
        // save): then it is an outage, and the start is tried again.
        tokio::time::timeout(Duration::from_secs(120), self.read(stream_end, lineage))
            .await
            .map_err(|_| Ignored::Unavailable("reading the snapshot took over 120 s".into()))?
    }

    async fn read(&self, stream_end: u64, lineage: &Lineage) -> Result<Model, Ignored> {
        let mut object = match self.store.get(subjects::MODEL_OBJECT).await {
            Ok(o) => o,
            Err(e) if e.kind() == object_store::GetErrorKind::NotFound => {
                return Err(Ignored::None)
            }
            Err(e) => return Err(Ignored::Unavailable(e.to_string())),
        };
        let header: Header = object
            .info()
            .description
            .as_deref()
            .and_then(|d| serde_json::from_str(d).ok())
            .ok_or_else(|| Ignored::Invalid("its description is not a snapshot header".into()))?;
        if header.format != FORMAT {
            return Err(Ignored::Invalid(format!(
                "format {} is not this build's {FORMAT}",
                header.format
            )));
        }
        if header.lineage != *lineage {
            return Err(Ignored::Invalid(format!(
                "it was saved against other stores ({:?}, now {:?})",
                header.lineage, lineage
            )));
        }
        let mut bytes = Vec::new();
        object
            .read_to_end(&mut bytes)
            .await
            .map_err(|e| Ignored::Unavailable(format!("reading it failed: {e}")))?;
        let digest = fnv(&bytes);
        if digest != header.digest || bytes.len() as u64 != header.bytes {
            return Err(Ignored::Invalid(format!(
                "{} bytes with digest {digest}, but {} bytes with digest {} were saved",
                bytes.len(),
                header.bytes,
                header.digest
            )));
        }
        if header.applied > stream_end {
            return Err(Ignored::Invalid(format!(
                "it folded event {}, but the stream ends at {stream_end}",
                header.applied
            )));
        }
        let model: Model = serde_json::from_slice(&bytes)
            .map_err(|e| Ignored::Invalid(format!("undecodable: {e}")))?;
        if model.applied > 0 {
            // The stream's event at that sequence is the one the model folded last: not a
            // snapshot of another stream (one recreated, or restored from a backup).
            let m = self
                .events
                .get_raw_message(model.applied)
                .await
                .map_err(|e| {
                    Ignored::Unavailable(format!("reading event {}: {e}", model.applied))
                })?;
            let found = handoff_protocol::EventEnvelope::decode(&m.payload)
                .map(|e| crate::model::event_mark(&m.subject, &e.command))
                .unwrap_or_default();
            if found != model.last_event {
                return Err(Ignored::Invalid(format!(
                    "it folded {} as event {}, but the stream holds {found} there",
                    model.last_event, model.applied
                )));
            }
        }
        if model.applied != header.applied {
            return Err(Ignored::Invalid(format!(
                "the header says {} folded, the model {}",
                header.applied, model.applied
            )));
        }
        Ok(model)
    }

    /// Saves a model's bytes (from [`Snapshots::encode`]).
    pub async fn save(&self, saved: Saved, lineage: Lineage) -> Result<(), ArchiveError> {
        let header = Header {
            format: FORMAT,
            lineage,
            applied: saved.applied,
            digest: fnv(&saved.bytes),
            bytes: saved.bytes.len() as u64,
        };
        let meta = object_store::ObjectMetadata {
            name: subjects::MODEL_OBJECT.into(),
            description: Some(serde_json::to_string(&header).expect("headers serialize")),
            ..Default::default()
        };
        let mut reader = saved.bytes.as_slice();
        tokio::time::timeout(Duration::from_secs(60), self.store.put(meta, &mut reader))
            .await
            .map_err(|_| unavailable("saving the model took over 60 s"))?
            .map_err(unavailable)?;
        Ok(())
    }

    /// A model's bytes, ready to save (serialised now, stored later: nothing holds the
    /// model while it is stored).
    pub fn encode(model: &Model) -> Saved {
        Saved {
            applied: model.applied,
            bytes: serde_json::to_vec(model).expect("the model serializes"),
        }
    }
}

/// A model serialised for [`Snapshots::save`].
pub struct Saved {
    pub applied: u64,
    pub bytes: Vec<u8>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_digest_sees_every_byte() {
        assert_ne!(fnv(b"{\"applied\":1}"), fnv(b"{\"applied\":2}"));
        assert_eq!(fnv(b""), "cbf29ce484222325");
    }
}

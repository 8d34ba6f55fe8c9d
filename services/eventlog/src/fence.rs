//! Fences: each job's current epoch, in the key-value bucket `handoff_fences`, so that
//! stores outside the event log can refuse a write from a daemon that lost the job. The
//! command service creates the bucket ([`Fences::open`]); every other process binds to it
//! ([`Fences::bind`]) and waits for it while it is missing.
//!
//! A fence only rises. The command service raises a job's fence right after it appends
//! an event that gives the job a new epoch (a move starts, a move fails); the daemon that
//! gets the job raises it too before it works on it, so a fence lost to a crash between
//! the append and the raise is raised before it matters. A write under a fence
//! ([`Fences::commit`]) is a compare-and-set on the fence's revision: if the fence rose
//! after the writer read it, the write is refused, however long the writer was frozen.
//!
//! A small record that must never be written by a daemon that lost the job (the head's
//! position) lives beside the fence, in the same bucket under `<name>.<job>` (a job id
//! has no `.`), and is written in one step with the fence check
//! ([`Fences::write_beside`]): JetStream stores the message only if the fence's key is
//! still at the revision the writer read (`Nats-Expected-Last-Subject-Sequence` with its
//! `-Subject` form naming the fence's key), which it can check within one stream only.
//!
//! A fence value that does not parse is an error ([`FenceError::Corrupt`]), never epoch
//! 0: an unknown epoch fences nothing off, so nothing is written under it until someone
//! puts the job's epoch back (`{"epoch": N}`, N from `handoff job`).

use async_nats::jetstream::context::{CreateKeyValueError, GetStreamError, GetStreamErrorKind};
use async_nats::jetstream::{self, context::PublishErrorKind, kv, ErrorCode};
use bytes::Bytes;
use handoff_domain::JobId;
use serde::{Deserialize, Serialize};

/// The bucket of fences, one key per job.
pub use handoff_protocol::dataplane::FENCES_BUCKET as BUCKET;

/// A fence as stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Fence {
    pub epoch: u64,
}

impl Fence {
    /// A stored fence: `{"epoch": N}`, or the bare decimal N.
    pub fn parse(value: &[u8]) -> Result<Fence, String> {
        if let Ok(f) = serde_json::from_slice::<Fence>(value) {
            return Ok(f);
        }
        std::str::from_utf8(value)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .map(|epoch| Fence { epoch })
            .ok_or_else(|| {
                let shown = String::from_utf8_lossy(&value[..value.len().min(64)]).into_owned();
                format!("{shown:?} is neither {{\"epoch\": N}} nor a number")
            })
    }
}

/// A fence as read: its epoch and the revision a commit must find unchanged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Held {
    pub epoch: u64,
    /// 0: no fence yet.
    pub revision: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum FenceError {
    /// The writer's epoch is older than the job's: it lost the job.
    #[error("stale epoch for job {job}: the write carries epoch {epoch}, the job is at {current}")]
    Stale {
        job: JobId,
        epoch: u64,
        current: u64,
    },
    /// The job's fence holds something that is not an epoch. The write is refused: with
    /// the epoch unknown, nobody can tell whether the writer still owns the job. Put the
    /// job's epoch back into the fence.
    #[error("the fence of job {job} is unreadable: {detail}")]
    Corrupt { job: JobId, detail: String },
    #[error("the fences are unavailable: {0}")]
    Unavailable(String),
    /// The fence bucket does not exist yet, and this process only binds to it
    /// ([`Fences::bind`]): the command service creates it when it starts. Try again.
    #[error(
        "the fence bucket {} does not exist yet (the command service creates it)",
        BUCKET
    )]
    Missing,
    /// The command service could not create the fence bucket. The source says whether
    /// that passes (a timeout, a cluster without a leader or without enough peers) or not
    /// (a bucket of the same name with another configuration).
    #[error("cannot create the fence bucket {}: {source}", BUCKET)]
    Create {
        #[source]
        source: CreateKeyValueError,
    },
}

fn unavailable(e: impl std::fmt::Display) -> FenceError {
    FenceError::Unavailable(e.to_string())
}

/// Whether getting a store failed because the server says its stream does not exist
/// (10059), rather than because no answer came: only then may its owner create it.
pub fn stream_not_found(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut link = Some(e);
    while let Some(e) = link {
        if let Some(get) = e.downcast_ref::<GetStreamError>() {
            return matches!(get.kind(), GetStreamErrorKind::JetStream(j)
                if j.error_code() == ErrorCode::STREAM_NOT_FOUND);
        }
        link = e.source();
    }
    false
}

/// The key of the record `name` kept beside `job`'s fence.
fn beside(name: &str, job: &JobId) -> String {
    format!("{name}.{job}")
}

/// The fence bucket.
#[derive(Clone)]
pub struct Fences {
    kv: kv::Store,
    js: jetstream::Context,
}

impl Fences {
    /// Opens the bucket as its owner, the command service: creates it with `replicas`
    /// copies when it does not exist. Only a bucket the server says is not there is
    /// created; any other failure to get it is [`FenceError::Unavailable`] (try again).
    pub async fn open(js: &jetstream::Context, replicas: usize) -> Result<Fences, FenceError> {
        match Self::bind(js).await {
            Err(FenceError::Missing) => {
                let kv = js
                    .create_key_value(kv::Config {
                        bucket: BUCKET.into(),
                        history: 1,
                        storage: jetstream::stream::StorageType::File,
                        num_replicas: replicas,
                        ..Default::default()
                    })
                    .await
                    .map_err(|source| FenceError::Create { source })?;
                Ok(Fences { kv, js: js.clone() })
            }
            bound => bound,
        }
    }

    /// Binds to the bucket as every process but the command service: never creates it
    /// (their NATS permissions allow no create). Not there yet: [`FenceError::Missing`].
    pub async fn bind(js: &jetstream::Context) -> Result<Fences, FenceError> {
        match js.get_key_value(BUCKET).await {
            Ok(kv) => Ok(Fences { kv, js: js.clone() }),
            Err(e) if stream_not_found(&e) => Err(FenceError::Missing),
            Err(e) => Err(unavailable(e)),
        }
    }

    /// The job's fence now.
    pub async fn read(&self, job: &JobId) -> Result<Held, FenceError> {
        match self.kv.entry(job.as_str()).await.map_err(unavailable)? {
            Some(e) if e.operation == kv::Operation::Put => {
                let fence = Fence::parse(&e.value).map_err(|detail| FenceError::Corrupt {
                    job: job.clone(),
                    detail,
                })?;
                Ok(Held {
                    epoch: fence.epoch,
                    revision: e.revision,
                })
            }
            // Deleted: no fence, but a write must still find the deletion unchanged.
            Some(e) => Ok(Held {
                epoch: 0,
                revision: e.revision,
            }),
            None => Ok(Held {
                epoch: 0,
                revision: 0,
            }),
        }
    }

    /// Refuses `epoch` if the job's fence is higher.
    pub async fn check(&self, job: &JobId, epoch: u64) -> Result<Held, FenceError> {
        let held = self.read(job).await?;
        if epoch < held.epoch {
            return Err(FenceError::Stale {
                job: job.clone(),
                epoch,
                current: held.epoch,
            });
        }
        Ok(held)
    }

    /// Writes the fence at `epoch` if it is still at `held` (the revision unchanged).
    /// Returns the fence's new revision, or none if it moved meanwhile.
    async fn swap(&self, job: &JobId, held: Held, epoch: u64) -> Result<Option<u64>, FenceError> {
        let value = serde_json::to_vec(&Fence { epoch }).expect("json").into();
        let result = if held.revision == 0 {
            self.kv.create(job.as_str(), value).await
        } else {
            self.kv
                .update(job.as_str(), value, held.revision)
                .await
                // A wrong last revision becomes AlreadyExists, as for a create.
                .map_err(kv::CreateError::from)
        };
        match result {
            Ok(revision) => Ok(Some(revision)),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(None),
            Err(e) => Err(unavailable(e)),
        }
    }

    /// Raises the job's fence to `epoch` (never lowers it). Returns the fence's epoch
    /// after: higher than `epoch` if the job moved on already.
    pub async fn raise(&self, job: &JobId, epoch: u64) -> Result<u64, FenceError> {
        loop {
            let held = self.read(job).await?;
            if held.epoch >= epoch {
                return Ok(held.epoch);
            }
            if self.swap(job, held, epoch).await?.is_some() {
                return Ok(epoch);
            }
        }
    }

    /// Commits a write made at `epoch` after reading the fence as `held`: succeeds only
    /// if the fence did not rise above `epoch` since. The write must be undone on
    /// [`FenceError::Stale`].
    pub async fn commit(&self, job: &JobId, epoch: u64, mut held: Held) -> Result<(), FenceError> {
        loop {
            if epoch < held.epoch {
                return Err(FenceError::Stale {
                    job: job.clone(),
                    epoch,
                    current: held.epoch,
                });
            }
            if self.swap(job, held, epoch).await?.is_some() {
                return Ok(());
            }
            held = self.read(job).await?;
        }
    }

    /// Writes the record `name` of `job` at `epoch`: refused if the job's fence is
    /// higher, now or at the moment of the write.
    pub async fn put_beside(
        &self,
        job: &JobId,
        epoch: u64,
        name: &str,
        value: Bytes,
    ) -> Result<(), FenceError> {
        loop {
            let held = self.check(job, epoch).await?;
            if self
                .write_beside(job, epoch, held, name, value.clone())
                .await?
            {
                return Ok(());
            }
        }
    }

    /// Writes the record `name` of `job`, made at `epoch` after reading the fence as
    /// `held`, in one step with the fence check: JetStream stores it only if the fence's
    /// key is still at `held`'s revision, however long ago the read was. A fence below
    /// `epoch` is raised to it first (by the same compare-and-set), so every record is
    /// written while the fence holds exactly its epoch, and as fences only rise, no
    /// record is ever followed by one of an older epoch.
    ///
    /// `Ok(false)`: the fence moved, but not past `epoch` (a commit touched it); read it
    /// again and retry. [`FenceError::Stale`]: it rose past `epoch`.
    pub async fn write_beside(
        &self,
        job: &JobId,
        epoch: u64,
        held: Held,
        name: &str,
        value: Bytes,
    ) -> Result<bool, FenceError> {
        let stale = |current| FenceError::Stale {
            job: job.clone(),
            epoch,
            current,
        };
        if epoch < held.epoch {
            return Err(stale(held.epoch));
        }
        let revision = if held.epoch < epoch {
            match self.swap(job, held, epoch).await? {
                Some(r) => r,
                None => return self.moved(job, epoch).await,
            }
        } else {
            held.revision
        };
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(
            "Nats-Expected-Last-Subject-Sequence",
            revision.to_string().as_str(),
        );
        headers.insert(
            "Nats-Expected-Last-Subject-Sequence-Subject",
            format!("{}{job}", self.kv.prefix).as_str(),
        );
        let subject = format!("{}{}", self.kv.prefix, beside(name, job));
        let ack = self
            .js
            .publish_with_headers(subject, headers, value)
            .await
            .map_err(unavailable)?
            .await;
        match ack {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {
                self.moved(job, epoch).await
            }
            Err(e) => Err(unavailable(e)),
        }
    }

    /// After a write found the fence moved: stale if it rose past `epoch`, else retry.
    async fn moved(&self, job: &JobId, epoch: u64) -> Result<bool, FenceError> {
        self.check(job, epoch).await.map(|_| false)
    }

    /// The record `name` kept beside `job`'s fence, if any.
    pub async fn read_beside(&self, job: &JobId, name: &str) -> Result<Option<Bytes>, FenceError> {
        self.kv.get(beside(name, job)).await.map_err(unavailable)
    }
}

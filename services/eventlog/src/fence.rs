//! Fences: each job's current epoch, in the key-value bucket `handoff_fences`, so that
//! stores outside the event log can refuse a write from a daemon that lost the job.
//!
//! A fence only rises. The command service raises a job's fence right after it appends
//! an event that gives the job a new epoch (a move starts, a move fails); the daemon that
//! gets the job raises it too before it works on it, so a fence lost to a crash between
//! the append and the raise is raised before it matters. A write under a fence
//! ([`Fences::commit`]) is a compare-and-set on the fence's revision: if the fence rose
//! after the writer read it, the write is refused, however long the writer was frozen.

use async_nats::jetstream::{self, kv};
use handoff_domain::JobId;
use serde::{Deserialize, Serialize};

/// The bucket of fences, one key per job.
pub use handoff_protocol::dataplane::FENCES_BUCKET as BUCKET;

/// A fence as stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Fence {
    pub epoch: u64,
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
    #[error("the fences are unavailable: {0}")]
    Unavailable(String),
}

fn unavailable(e: impl std::fmt::Display) -> FenceError {
    FenceError::Unavailable(e.to_string())
}

/// The fence bucket.
#[derive(Clone)]
pub struct Fences {
    kv: kv::Store,
}

impl Fences {
    /// Opens the bucket, creating it with `replicas` copies if it does not exist.
    pub async fn open(js: &jetstream::Context, replicas: usize) -> Result<Fences, FenceError> {
        let kv = match js.get_key_value(BUCKET).await {
            Ok(kv) => kv,
            Err(_) => js
                .create_key_value(kv::Config {
                    bucket: BUCKET.into(),
                    history: 1,
                    storage: jetstream::stream::StorageType::File,
                    num_replicas: replicas,
                    ..Default::default()
                })
                .await
                .map_err(unavailable)?,
        };
        Ok(Fences { kv })
    }

    /// The job's fence now.
    pub async fn read(&self, job: &JobId) -> Result<Held, FenceError> {
        match self.kv.entry(job.as_str()).await.map_err(unavailable)? {
            Some(e) if e.operation == kv::Operation::Put => {
                let fence: Fence = serde_json::from_slice(&e.value).unwrap_or_default();
                Ok(Held {
                    epoch: fence.epoch,
                    revision: e.revision,
                })
            }
            _ => Ok(Held {
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
    /// Returns false if it moved meanwhile.
    async fn swap(&self, job: &JobId, held: Held, epoch: u64) -> Result<bool, FenceError> {
        let value = serde_json::to_vec(&Fence { epoch }).expect("json").into();
        let result = if held.revision == 0 {
            self.kv.create(job.as_str(), value).await.map(|_| ())
        } else {
            self.kv
                .update(job.as_str(), value, held.revision)
                .await
                .map(|_| ())
                // A wrong last revision becomes AlreadyExists, as for a create.
                .map_err(kv::CreateError::from)
        };
        match result {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(false),
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
            if self.swap(job, held, epoch).await? {
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
            if self.swap(job, held, epoch).await? {
                return Ok(());
            }
            held = self.read(job).await?;
        }
    }
}

//! Restores, built from the snapshot store and the oplog store alone: they never need the
//! job's daemon, so they work while the job moves and while its daemon is dead.
//!
//! * `Snapshot(id)`: the snapshot as it is.
//! * `At(seconds)`: point in time, every operation before (not at) that second.
//! * `OplogTs(ts)`: every operation up to and including that timestamp.
//!
//! Every restore checks its result against the source: the checksum of the restored data
//! must equal the checksum the source had at the last operation included. A sharded
//! cluster (every job under `project/cluster/`) is restored to one common point.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::StreamExt;
use handoff_domain::JobId;
use serde::Serialize;

use crate::checksum::Checksum;
use crate::head::{Head, HeadError, HeadMeta, HeadStatus, Heads};
use crate::oplog::{self, Ts};
use crate::rebuild::{restore_snapshot, Outcome, Quiet, RebuildError};
use crate::store::{SnapshotMeta, StoreError, Stores};
use handoff_protocol::now_ms;

/// The point to restore to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Snapshot(String),
    /// Seconds since the epoch; operations strictly before it.
    At(u32),
    /// Operations up to and including this timestamp.
    OplogTs(Ts),
}

impl Target {
    fn includes(&self, ts: Ts) -> bool {
        match self {
            Target::Snapshot(_) => false,
            Target::At(t) => ts.t < *t,
            Target::OplogTs(bound) => ts <= *bound,
        }
    }
}

/// What one job's restore produced.
#[derive(Clone, Debug, Serialize)]
pub struct Restored {
    pub job: JobId,
    pub snapshot: String,
    /// The last operation included.
    pub ts: Ts,
    pub n: u64,
    pub checksum: Checksum,
    /// The source's checksum at that operation (equal: verified).
    pub source_checksum: Checksum,
    pub documents: u64,
    pub bytes: u64,
    pub entries_applied: u64,
    pub path: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("no snapshot of {0} in the snapshot store")]
    NoSnapshot(String),
    #[error("no snapshot {id} of {job}")]
    UnknownSnapshot { job: String, id: String },
    #[error("a snapshot id names one job, but {0} is a sharded cluster: restore it with --at or --oplog-ts")]
    SnapshotOfCluster(String),
    #[error("{job}: no snapshot before {target}; the earliest restorable point is {earliest}")]
    TooEarly {
        job: JobId,
        target: String,
        earliest: Ts,
    },
    #[error("{0} is in the future")]
    Future(String),
    #[error("{job}: snapshot {snapshot} is corrupt: {reason}")]
    Corrupt {
        job: JobId,
        snapshot: String,
        reason: String,
    },
    /// A snapshot missing from the store, or whose data does not match its record.
    #[error("{job}: {reason}")]
    Unusable { job: JobId, reason: String },
    #[error("{job}: the oplog cannot be replayed: {reason}")]
    Oplog { job: JobId, reason: String },
    #[error(
        "{job}: restored data has checksum {restored} but the source had {source_checksum} at {ts}"
    )]
    Mismatch {
        job: JobId,
        ts: Ts,
        restored: Checksum,
        source_checksum: Checksum,
    },
    /// The disk store the documents are gathered in failed (a full disk).
    #[error("restore work store: {0}")]
    Work(#[from] HeadError),
    #[error("cannot write the restore to {path}: {reason}")]
    Write { path: String, reason: String },
}

/// Restores `what` (a job, or a sharded cluster `project/cluster`) into `out`.
pub async fn restore(
    stores: &Stores,
    what: &str,
    target: &Target,
    out: &Path,
) -> Result<Vec<Restored>, RestoreError> {
    let all = stores.snapshots_in(what).await?;
    let mut jobs: Vec<JobId> = all.iter().map(|m| m.job.clone()).collect();
    jobs.sort();
    jobs.dedup();
    if jobs.is_empty() {
        return Err(RestoreError::NoSnapshot(what.to_owned()));
    }
    if jobs.len() > 1 && matches!(target, Target::Snapshot(_)) {
        return Err(RestoreError::SnapshotOfCluster(what.to_owned()));
    }
    let now_s = (now_ms() / 1000) as u32;
    match target {
        Target::At(t) if *t > now_s + 1 => return Err(RestoreError::Future(format!("time {t}"))),
        Target::OplogTs(ts) if ts.t > now_s + 1 => {
            return Err(RestoreError::Future(format!("oplog timestamp {ts}")))
        }
        _ => {}
    }
    let mut done = Vec::new();
    for job in jobs {
        let snaps: Vec<&SnapshotMeta> = all.iter().filter(|m| m.job == job).collect();
        done.push(restore_job(stores, &job, &snaps, target, out).await?);
    }
    let summary = out.join("restore.json");
    write(&summary, &serde_json::to_vec_pretty(&done).expect("json"))?;
    Ok(done)
}

fn write(path: &Path, data: &[u8]) -> Result<(), RestoreError> {
    let fail = |e: std::io::Error| RestoreError::Write {
        path: path.display().to_string(),
        reason: e.to_string(),
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(fail)?;
    }
    std::fs::write(path, data).map_err(fail)
}

async fn restore_job(
    stores: &Stores,
    job: &JobId,
    snaps: &[&SnapshotMeta],
    target: &Target,
    out: &Path,
) -> Result<Restored, RestoreError> {
    let base = match target {
        Target::Snapshot(id) => snaps.iter().find(|m| m.id == *id).copied().ok_or_else(|| {
            RestoreError::UnknownSnapshot {
                job: job.to_string(),
                id: id.clone(),
            }
        })?,
        _ => snaps
            .iter()
            .rev()
            .find(|m| target.includes(m.ts))
            .copied()
            .ok_or_else(|| RestoreError::TooEarly {
                job: job.clone(),
                target: format!("{target:?}"),
                earliest: snaps.first().map(|m| m.ts).unwrap_or_default(),
            })?,
    };
    let dir = out.join(job.as_str().replace('/', "__"));
    // The documents are gathered on disk (a store removed when dropped), never in memory.
    let scratch = Heads::scratch(&dir.join(".restoring"))?;
    let head = scratch.head(job)?;
    // Hold the oplog this restore reads until it is done.
    let lease = match target {
        Target::Snapshot(_) => None,
        _ => Some(stores.take_lease(job, base.oplog_seq.max(1)).await?),
    };
    let result = rebuild_into(stores, job, base, target, &head).await;
    if let Some(l) = lease {
        stores.drop_lease(&l).await;
    }
    let (at, applied) = result?;
    let (documents, bytes, checksum) = head.tally()?;
    if checksum != at.checksum {
        return Err(RestoreError::Mismatch {
            job: job.clone(),
            ts: at.ts,
            restored: checksum,
            source_checksum: at.checksum,
        });
    }
    let path = dir.join("documents.jsonl");
    write_from(&path, head.export_reader()).await?;
    drop(scratch);
    let restored = Restored {
        job: job.clone(),
        snapshot: base.id.clone(),
        ts: at.ts,
        n: at.n,
        checksum,
        source_checksum: at.checksum,
        documents,
        bytes,
        entries_applied: applied,
        path,
    };
    write(
        &dir.join("manifest.json"),
        &serde_json::to_vec_pretty(&restored).expect("json"),
    )?;
    Ok(restored)
}

/// Streams `data` into the file at `path`.
async fn write_from(
    path: &Path,
    mut data: impl tokio::io::AsyncRead + Unpin,
) -> Result<(), RestoreError> {
    let fail = |e: std::io::Error| RestoreError::Write {
        path: path.display().to_string(),
        reason: e.to_string(),
    };
    let mut file = tokio::fs::File::create(path).await.map_err(fail)?;
    tokio::io::copy(&mut data, &mut file).await.map_err(fail)?;
    tokio::io::AsyncWriteExt::flush(&mut file)
        .await
        .map_err(fail)
}

/// Restores `base` into `head` as it streams from the store, then applies the oplog
/// entries `target` includes: where the head then stands (the source's checksum there),
/// and how many entries were applied.
async fn rebuild_into(
    stores: &Stores,
    job: &JobId,
    base: &SnapshotMeta,
    target: &Target,
    head: &Head,
) -> Result<(HeadMeta, u64), RestoreError> {
    let mut meta = HeadMeta::new(job.clone(), base.epoch, HeadStatus::Building);
    let outcome = restore_snapshot(stores, head, &mut meta, base, &mut Quiet)
        .await
        .map_err(|e| match e {
            RebuildError::Store(e) => RestoreError::Store(e),
            RebuildError::Head(e) => RestoreError::Work(e),
            RebuildError::Oplog(e) => RestoreError::Oplog {
                job: job.clone(),
                reason: e.to_string(),
            },
        })?;
    match outcome {
        Outcome::Done => {}
        // Missing from the store, or corrupt: the reason says which.
        Outcome::Failed(reason) => {
            return Err(RestoreError::Unusable {
                job: job.clone(),
                reason,
            })
        }
        Outcome::Cancelled => {
            return Err(RestoreError::Unusable {
                job: job.clone(),
                reason: "the restore was cancelled".into(),
            })
        }
    }
    if matches!(target, Target::Snapshot(_)) {
        return Ok((meta, 0));
    }
    let oplog_err = |reason: String| RestoreError::Oplog {
        job: job.clone(),
        reason,
    };
    let Some((last_seq, _)) = stores.oplog_last(job).await? else {
        return Ok((meta, 0));
    };
    let mut messages = stores.read_oplog(job, base.oplog_seq.max(1)).await?;
    let mut applied = 0u64;
    loop {
        let m = match tokio::time::timeout(Duration::from_secs(10), messages.next()).await {
            Ok(Some(Ok(m))) => m,
            Ok(Some(Err(e))) => {
                tracing::debug!(error = %e, "oplog reader hiccup");
                continue;
            }
            Ok(None) | Err(_) => return Err(oplog_err("the oplog store stopped answering".into())),
        };
        let info = m.info().map_err(|e| oplog_err(e.to_string()))?;
        let seq = info.stream_sequence;
        let entries = oplog::decode(&m.payload).map_err(|e| oplog_err(e.to_string()))?;
        // Up to the first entry past the target.
        let within = entries
            .iter()
            .position(|e| e.n > meta.n && !target.includes(e.ts))
            .unwrap_or(entries.len());
        applied += match head.apply(&mut meta, seq, &entries[..within]) {
            Ok(n) => n as u64,
            Err(e @ HeadError::Gap { .. }) => return Err(oplog_err(e.to_string())),
            Err(e) => return Err(RestoreError::Work(e)),
        };
        if within < entries.len() || seq >= last_seq || info.pending == 0 {
            break;
        }
    }
    Ok((meta, applied))
}

type Replayed = (HashMap<String, String>, Checksum, Checksum, Ts, u64, u64);

/// A job's data as of the end of its oplog (latest snapshot plus every entry after it):
/// documents, entry number and timestamp. Checked against the source's checksum.
pub async fn latest(
    stores: &Stores,
    job: &JobId,
) -> Result<Option<(HashMap<String, String>, u64, Ts)>, RestoreError> {
    let snaps = stores.snapshots(Some(job)).await?;
    let Some(base) = snaps.last() else {
        return Ok(None);
    };
    let target = Target::OplogTs(Ts {
        t: u32::MAX,
        i: u32::MAX,
    });
    let (docs, sum, source, ts, n, _) = replay(stores, job, base, &target).await?;
    if sum != source {
        return Err(RestoreError::Mismatch {
            job: job.clone(),
            ts,
            restored: sum,
            source_checksum: source,
        });
    }
    Ok(Some((docs, n, ts)))
}

async fn replay(
    stores: &Stores,
    job: &JobId,
    base: &SnapshotMeta,
    target: &Target,
) -> Result<Replayed, RestoreError> {
    let data = stores.read_snapshot(base).await?;
    let corrupt = |reason: String| RestoreError::Corrupt {
        job: job.clone(),
        snapshot: base.id.clone(),
        reason,
    };
    let mut docs = HashMap::new();
    let mut sum = Checksum::default();
    for (id, doc) in crate::snapshot::parse(&data).map_err(corrupt)? {
        sum.insert(id, doc);
        docs.insert(id.to_owned(), String::from_utf8_lossy(doc).into_owned());
    }
    if sum != base.checksum {
        return Err(corrupt(format!(
            "its data has checksum {sum}, its record says {}",
            base.checksum
        )));
    }
    let (mut ts, mut n, mut source, mut applied) = (base.ts, base.n, base.checksum, 0);
    if matches!(target, Target::Snapshot(_)) {
        return Ok((docs, sum, source, ts, n, 0));
    }
    let oplog_err = |reason: String| RestoreError::Oplog {
        job: job.clone(),
        reason,
    };
    let Some((last_seq, _)) = stores.oplog_last(job).await? else {
        return Ok((docs, sum, source, ts, n, 0));
    };
    let mut messages = stores.read_oplog(job, base.oplog_seq.max(1)).await?;
    'read: loop {
        let m = match tokio::time::timeout(Duration::from_secs(10), messages.next()).await {
            Ok(Some(Ok(m))) => m,
            Ok(Some(Err(e))) => {
                tracing::debug!(error = %e, "oplog reader hiccup");
                continue;
            }
            Ok(None) | Err(_) => return Err(oplog_err("the oplog store stopped answering".into())),
        };
        let info = m.info().map_err(|e| oplog_err(e.to_string()))?;
        let seq = info.stream_sequence;
        let entries = oplog::decode(&m.payload).map_err(|e| oplog_err(e.to_string()))?;
        for e in &entries {
            if e.n <= n {
                continue;
            }
            if !target.includes(e.ts) {
                break 'read;
            }
            if e.n != n + 1 {
                return Err(oplog_err(format!(
                    "entries {} to {} are no longer in the oplog store",
                    n + 1,
                    e.n - 1
                )));
            }
            if let Some(old) = docs.remove(e.id.as_ref()) {
                sum.remove(&e.id, old.as_bytes());
            }
            if let Some(doc) = e.doc {
                sum.insert(&e.id, doc.get().as_bytes());
                docs.insert(e.id.to_string(), doc.get().to_owned());
            }
            (ts, n, source) = (e.ts, e.n, e.c);
            applied += 1;
        }
        if seq >= last_seq || info.pending == 0 {
            break;
        }
    }
    Ok((docs, sum, source, ts, n, applied))
}

/// The source's checksum right after the oplog entry at `ts`, read from the oplog store:
/// what a head or a restore at that point must equal. None when no entry has that
/// timestamp (or it was purged).
pub async fn source_checksum_at(
    stores: &Stores,
    job: &JobId,
    ts: Ts,
) -> Result<Option<Checksum>, RestoreError> {
    let snaps = stores.snapshots(Some(job)).await?;
    if let Some(s) = snaps.iter().find(|s| s.ts == ts) {
        return Ok(Some(s.checksum));
    }
    let from = snaps
        .iter()
        .rev()
        .find(|s| s.ts < ts)
        .map_or(1, |s| s.oplog_seq.max(1));
    let Some((last_seq, _)) = stores.oplog_last(job).await? else {
        return Ok(None);
    };
    let mut messages = stores.read_oplog(job, from).await?;
    let err = |reason: String| RestoreError::Oplog {
        job: job.clone(),
        reason,
    };
    loop {
        let m = match tokio::time::timeout(Duration::from_secs(10), messages.next()).await {
            Ok(Some(Ok(m))) => m,
            Ok(Some(Err(_))) => continue,
            _ => return Err(err("the oplog store stopped answering".into())),
        };
        let seq = m.info().map_err(|e| err(e.to_string()))?.stream_sequence;
        for e in oplog::decode(&m.payload).map_err(|e| err(e.to_string()))? {
            if e.ts == ts {
                return Ok(Some(e.c));
            }
            if e.ts > ts {
                return Ok(None);
            }
        }
        if seq >= last_seq {
            return Ok(None);
        }
    }
}

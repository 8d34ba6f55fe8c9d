//! Heads: a daemon's local copy of each of its jobs' data, in sled under its head
//! directory, one tree per job. The documents and the head's position (`meta`) live in
//! the same tree and change in one atomic batch, so a head killed at any point is at a
//! consistent position when it opens again.

use std::collections::HashMap;
use std::path::Path;

use handoff_domain::JobId;
use serde::{Deserialize, Serialize};

use crate::checksum::Checksum;
use crate::oplog::{Entry, Ts};

const META: &[u8] = b"\0meta";
const DOC: u8 = b'd';

/// Why the head holds this job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum HeadStatus {
    /// Being rebuilt for a move; complete it once caught up.
    Rebuilding { move_id: String },
    /// Being built for a new job or a job returned after a failed move.
    Building,
    /// Current; snapshots are taken from it.
    Active,
    /// This daemon failed the move; the job went back to its source.
    Failed { move_id: String, reason: String },
}

/// Where a head stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeadMeta {
    pub job: JobId,
    pub epoch: u64,
    pub status: HeadStatus,
    /// The snapshot it was restored from, once fully restored.
    pub restored_from: Option<String>,
    /// Every oplog message up to this stream sequence is applied.
    pub applied_seq: u64,
    /// The last applied entry's number and timestamp.
    pub n: u64,
    pub ts: Ts,
    pub checksum: Checksum,
    /// Document bytes held.
    pub bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum HeadError {
    #[error("head store: {0}")]
    Store(#[from] sled::Error),
    #[error("oplog entry {found} follows entry {applied}: entries {} to {} are missing from the oplog store", applied + 1, found - 1)]
    Gap { applied: u64, found: u64 },
    #[error("after oplog entry {n} the head's checksum is {head} but the source's was {source_checksum}")]
    Diverged {
        n: u64,
        head: Checksum,
        source_checksum: Checksum,
    },
    #[error("the head's position is unreadable: {0}")]
    Meta(String),
}

/// Every head of one daemon.
pub struct Heads {
    db: sled::Db,
}

impl Heads {
    pub fn open(dir: &Path) -> Result<Heads, HeadError> {
        std::fs::create_dir_all(dir).map_err(|e| HeadError::Meta(e.to_string()))?;
        Ok(Heads {
            db: sled::Config::new().path(dir.join("heads")).open()?,
        })
    }

    fn tree_name(job: &JobId) -> String {
        format!("job:{job}")
    }

    /// Jobs with a head here.
    pub fn jobs(&self) -> Vec<JobId> {
        self.db
            .tree_names()
            .into_iter()
            .filter_map(|n| {
                let n = std::str::from_utf8(&n).ok()?;
                JobId::new(n.strip_prefix("job:")?).ok()
            })
            .collect()
    }

    pub fn head(&self, job: &JobId) -> Result<Head, HeadError> {
        Ok(Head {
            tree: self.db.open_tree(Self::tree_name(job))?,
        })
    }

    pub fn drop_head(&self, job: &JobId) -> Result<(), HeadError> {
        self.db.drop_tree(Self::tree_name(job))?;
        Ok(())
    }

    pub async fn flush(&self) -> Result<(), HeadError> {
        self.db.flush_async().await?;
        Ok(())
    }
}

/// One job's head.
#[derive(Clone)]
pub struct Head {
    tree: sled::Tree,
}

impl Head {
    pub fn meta(&self) -> Result<Option<HeadMeta>, HeadError> {
        match self.tree.get(META)? {
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| HeadError::Meta(e.to_string())),
            None => Ok(None),
        }
    }

    pub fn set_meta(&self, meta: &HeadMeta) -> Result<(), HeadError> {
        self.tree
            .insert(META, serde_json::to_vec(meta).expect("json"))?;
        Ok(())
    }

    /// Empties the head (documents and position).
    pub fn clear(&self) -> Result<(), HeadError> {
        self.tree.clear()?;
        Ok(())
    }

    fn doc_key(id: &str) -> Vec<u8> {
        let mut k = Vec::with_capacity(id.len() + 1);
        k.push(DOC);
        k.extend_from_slice(id.as_bytes());
        k
    }

    /// Loads documents from a snapshot (`id`, `doc` pairs), adding to the checksum and
    /// byte count in `meta`; the batch and the new meta are written together.
    pub fn load(&self, meta: &mut HeadMeta, docs: &[(&str, &[u8])]) -> Result<(), HeadError> {
        let mut batch = sled::Batch::default();
        for (id, doc) in docs {
            meta.checksum.insert(id, doc);
            meta.bytes += doc.len() as u64;
            batch.insert(Self::doc_key(id), *doc);
        }
        batch.insert(META, serde_json::to_vec(&*meta).expect("json"));
        self.tree.apply_batch(batch)?;
        Ok(())
    }

    /// Applies the entries of one oplog message (stream sequence `seq`) that the head has
    /// not applied yet, checking each against the source's checksum, and records the new
    /// position in the same batch. Returns how many entries were applied.
    pub fn apply(
        &self,
        meta: &mut HeadMeta,
        seq: u64,
        entries: &[Entry<'_>],
    ) -> Result<usize, HeadError> {
        let mut batch = sled::Batch::default();
        let mut overlay: HashMap<&str, Option<&[u8]>> = HashMap::new();
        let mut next = meta.clone();
        let mut applied = 0;
        for e in entries.iter().filter(|e| e.n > meta.n) {
            if e.n != next.n + 1 {
                return Err(HeadError::Gap {
                    applied: next.n,
                    found: e.n,
                });
            }
            let id: &str = &e.id;
            let old: Option<Vec<u8>> = match overlay.get(id) {
                Some(v) => v.map(|b| b.to_vec()),
                None => self.tree.get(Self::doc_key(id))?.map(|v| v.to_vec()),
            };
            if let Some(old) = &old {
                next.checksum.remove(id, old);
                next.bytes = next.bytes.saturating_sub(old.len() as u64);
            }
            match e.doc {
                Some(doc) => {
                    let bytes = doc.get().as_bytes();
                    next.checksum.insert(id, bytes);
                    next.bytes += bytes.len() as u64;
                    batch.insert(Self::doc_key(id), bytes);
                    overlay.insert(id, Some(bytes));
                }
                None => {
                    batch.remove(Self::doc_key(id));
                    overlay.insert(id, None);
                }
            }
            if next.checksum != e.c {
                return Err(HeadError::Diverged {
                    n: e.n,
                    head: next.checksum,
                    source_checksum: e.c,
                });
            }
            next.n = e.n;
            next.ts = e.ts;
            applied += 1;
        }
        next.applied_seq = next.applied_seq.max(seq);
        batch.insert(META, serde_json::to_vec(&next).expect("json"));
        self.tree.apply_batch(batch)?;
        *meta = next;
        Ok(applied)
    }

    /// The documents as snapshot lines (`{"id":..,"doc":..}` per line), in id order.
    pub fn export(&self) -> Result<Vec<u8>, HeadError> {
        let mut out = Vec::new();
        for kv in self.tree.scan_prefix([DOC]) {
            let (k, v) = kv?;
            crate::snapshot::write_line(&mut out, &String::from_utf8_lossy(&k[1..]), &v);
        }
        Ok(out)
    }
}

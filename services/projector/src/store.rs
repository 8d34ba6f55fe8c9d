//! Where views are kept: a small trait, so sled (0.34, effectively unmaintained) stays
//! replaceable, and its sled implementation.
//!
//! Everything lives in one sled tree, so one `apply_batch` writes the views and the
//! stream checkpoint atomically: after any crash the store holds the views of exactly the
//! events up to its checkpoint.

use std::path::{Path, PathBuf};

use thiserror::Error;

/// The most sled keeps of the views in memory. sled's resident memory is about twice
/// this plus what it always holds: at 100,000 jobs the projector measured 361 MiB with
/// 64 MiB, 267 with 16 and 237 with 8, its first pages still under 6 ms at p99 and its
/// rebuild 4% slower (`scripts/bench f`, `c`). 4 MiB saved nothing more at a million
/// events (294 MiB against 296) and made a rebuild 35% slower.
const CACHE_BYTES: u64 = 8 << 20;

/// The key of the stream checkpoint: the last sequence folded into the views.
const CHECKPOINT: &[u8] = b"meta\0checkpoint";

/// The views' layout. Raised whenever the views of the same events change (a key added
/// or dropped, a record's shape): a store written by another layout is rebuilt from the
/// stream, never left holding views of two. 2: a daemon's history no longer holds each
/// job's creation and move steps. 3: a history is kept in blocks of sequences and its
/// length in its job's or daemon's record; a project's jobs are no longer indexed apart.
/// 4: 2 bytes a sequence in a block, and an event naming a job or a daemon twice counted
/// once.
pub const VIEWS_FORMAT: u32 = 4;
const FORMAT: &[u8] = b"meta\0format";

/// Whether the store holds anything not marked as this build's layout (views of another,
/// of one that did not say, or what a clear cut short left): rebuilt from the stream.
pub fn other_format(store: &impl ViewStore) -> Result<bool, StoreError> {
    if store.get(FORMAT)?.as_deref() == Some(&VIEWS_FORMAT.to_be_bytes()[..]) {
        return Ok(false);
    }
    Ok(store.range(&[], None, false).next().transpose()?.is_some())
}

/// Records that the store's views are of this build's layout.
pub fn mark_format(store: &impl ViewStore) -> Result<(), StoreError> {
    let format = (FORMAT.to_vec(), Some(VIEWS_FORMAT.to_be_bytes().to_vec()));
    store.commit(vec![format], store.checkpoint()?)
}

#[derive(Debug, Error)]
pub enum StoreError {
    /// The store's files are damaged: rebuild the views from the stream.
    #[error("the view store at {path} is corrupt: {detail}")]
    Corrupt { path: PathBuf, detail: String },
    #[error("view store i/o failed: {0}")]
    Io(String),
}

/// A write of one key: a value, or `None` to delete it.
pub type Write = (Vec<u8>, Option<Vec<u8>>);
/// A stored key and its value.
pub type Entry = (Vec<u8>, Vec<u8>);

/// The view store's contract.
pub trait ViewStore: Clone + Send + Sync + 'static {
    /// The last stream sequence the views include (0 for none).
    fn checkpoint(&self) -> Result<u64, StoreError>;
    /// Writes the views and the new checkpoint atomically.
    fn commit(&self, writes: Vec<Write>, checkpoint: u64) -> Result<(), StoreError>;
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    /// Every key starting with `prefix`, in key order.
    fn scan(&self, prefix: &[u8]) -> Result<Vec<Entry>, StoreError>;
    /// The keys under `prefix` after `after` (before it, `reverse`), in key order (its
    /// reverse), as far as the caller reads.
    fn range<'a>(
        &'a self,
        prefix: &[u8],
        after: Option<&[u8]>,
        reverse: bool,
    ) -> Box<dyn Iterator<Item = Result<Entry, StoreError>> + 'a>;
    /// The last entry whose key is below `key`, if any.
    fn last_below(&self, key: &[u8]) -> Result<Option<Entry>, StoreError>;
    /// Removes everything, checkpoint included.
    fn clear(&self) -> Result<(), StoreError>;
    /// Makes every commit so far durable.
    fn flush(&self) -> Result<(), StoreError>;
}

/// The sled view store.
#[derive(Clone)]
pub struct SledStore {
    db: sled::Db,
    path: PathBuf,
}

impl SledStore {
    /// Opens (or creates) the store in `dir`. One process per directory.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        // sled caches up to 1 GiB by default: the views' hot keys fit in far less, and
        // the projector's memory should not be the cache's.
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(CACHE_BYTES)
            .open()
            .map_err(|e| classify(dir, e))?;
        Ok(SledStore {
            db,
            path: dir.to_owned(),
        })
    }

    /// Opens the store, or, when it is corrupt, moves it aside and starts empty so the
    /// views are rebuilt from the stream.
    pub fn open_or_reset(dir: &Path) -> Result<Self, StoreError> {
        match Self::open(dir) {
            Err(StoreError::Corrupt { detail, .. }) => {
                let aside = dir.with_extension(format!("corrupt-{}", std::process::id()));
                tracing::warn!(%detail, aside = %aside.display(), "view store corrupt; rebuilding from the stream");
                std::fs::rename(dir, &aside).map_err(|e| StoreError::Io(e.to_string()))?;
                Self::open(dir)
            }
            other => other,
        }
    }

    fn err(&self, e: sled::Error) -> StoreError {
        classify(&self.path, e)
    }
}

/// Frees what sled left behind writing `written` keys.
///
/// sled replaces a tree node on every write and hands the old one to its epoch collector
/// (crossbeam-epoch's global one), which frees a few hundred objects each time some
/// thread pins it 128 times. One `apply_batch` pins once however many keys it writes, so
/// while a rebuild writes batches back to back the garbage piles up faster than it is
/// freed: a rebuild over 1,043,261 events reached 16 GiB resident with a cache of 8 MiB
/// (`scripts/bench f`). Each flush of a pin collects up to 512 objects; one per 8 keys
/// written keeps up with any batch, and costs next to nothing once nothing is left.
fn reclaim(written: usize) {
    for _ in 0..written.div_ceil(8) {
        crossbeam_epoch::pin().flush();
    }
}

/// The first key after every key starting with `prefix`; none if there is no such key
/// (a prefix of 0xff bytes only).
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

fn classify(path: &Path, e: sled::Error) -> StoreError {
    match e {
        sled::Error::Corruption { .. } => StoreError::Corrupt {
            path: path.to_owned(),
            detail: e.to_string(),
        },
        other => StoreError::Io(other.to_string()),
    }
}

impl ViewStore for SledStore {
    fn checkpoint(&self) -> Result<u64, StoreError> {
        match self.db.get(CHECKPOINT).map_err(|e| self.err(e))? {
            None => Ok(0),
            Some(b) => <[u8; 8]>::try_from(b.as_ref())
                .map(u64::from_be_bytes)
                .map_err(|_| StoreError::Corrupt {
                    path: self.path.clone(),
                    detail: format!("checkpoint has {} bytes, not 8", b.len()),
                }),
        }
    }

    fn commit(&self, writes: Vec<Write>, checkpoint: u64) -> Result<(), StoreError> {
        let written = writes.len() + 1;
        let mut batch = sled::Batch::default();
        for (k, v) in writes {
            match v {
                Some(v) => batch.insert(k, v),
                None => batch.remove(k),
            }
        }
        batch.insert(CHECKPOINT, &checkpoint.to_be_bytes());
        self.db.apply_batch(batch).map_err(|e| self.err(e))?;
        reclaim(written);
        Ok(())
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .db
            .get(key)
            .map_err(|e| self.err(e))?
            .map(|v| v.to_vec()))
    }

    fn scan(&self, prefix: &[u8]) -> Result<Vec<Entry>, StoreError> {
        self.db
            .scan_prefix(prefix)
            .map(|r| {
                r.map(|(k, v)| (k.to_vec(), v.to_vec()))
                    .map_err(|e| self.err(e))
            })
            .collect()
    }

    fn range<'a>(
        &'a self,
        prefix: &[u8],
        after: Option<&[u8]>,
        reverse: bool,
    ) -> Box<dyn Iterator<Item = Result<Entry, StoreError>> + 'a> {
        use std::ops::Bound::{Excluded, Included, Unbounded};
        // Every key under the prefix is below the prefix with its last byte raised.
        let end = prefix_end(prefix);
        let low = match (after, reverse) {
            (Some(a), false) => Excluded(a.to_vec()),
            _ => Included(prefix.to_vec()),
        };
        let high = match (after, reverse, end) {
            (Some(a), true, _) => Excluded(a.to_vec()),
            (_, _, Some(e)) => Excluded(e),
            (_, _, None) => Unbounded,
        };
        let iter = self.db.range::<Vec<u8>, _>((low, high));
        let map = move |r: Result<(sled::IVec, sled::IVec), sled::Error>| {
            r.map(|(k, v)| (k.to_vec(), v.to_vec()))
                .map_err(|e| classify(&self.path, e))
        };
        if reverse {
            Box::new(iter.rev().map(map))
        } else {
            Box::new(iter.map(map))
        }
    }

    fn last_below(&self, key: &[u8]) -> Result<Option<Entry>, StoreError> {
        Ok(self
            .db
            .get_lt(key)
            .map_err(|e| self.err(e))?
            .map(|(k, v)| (k.to_vec(), v.to_vec())))
    }

    fn clear(&self) -> Result<(), StoreError> {
        // The layout's mark and the checkpoint go first, in a batch of their own: sled
        // removes the rest one key at a time, and a clear cut short leaves a store without
        // them, rebuilt at the next start ([`other_format`]).
        let mut first = sled::Batch::default();
        first.remove(FORMAT);
        first.remove(CHECKPOINT);
        self.db.apply_batch(first).map_err(|e| self.err(e))?;
        self.db.clear().map_err(|e| self.err(e))
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.db.flush().map(|_| ()).map_err(|e| self.err(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Views of no known layout, or of another, or left by a clear cut short, are to be
    /// rebuilt; those of this build's are kept; an empty store has nothing to rebuild.
    #[test]
    fn views_not_marked_as_this_layout_are_to_be_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        assert!(!other_format(&store).unwrap(), "empty");
        store
            .commit(vec![(b"job\0p/a".to_vec(), Some(b"{}".to_vec()))], 7)
            .unwrap();
        assert!(
            other_format(&store).unwrap(),
            "written before layouts were said"
        );
        mark_format(&store).unwrap();
        assert!(!other_format(&store).unwrap());
        assert_eq!(
            store.checkpoint().unwrap(),
            7,
            "the mark moves no checkpoint"
        );
        let older = (
            FORMAT.to_vec(),
            Some((VIEWS_FORMAT - 1).to_be_bytes().to_vec()),
        );
        store.commit(vec![older], 7).unwrap();
        assert!(other_format(&store).unwrap(), "another layout");
        // A clear's first step, then a crash: the mark and checkpoint gone, views left.
        mark_format(&store).unwrap();
        store.commit(vec![(FORMAT.to_vec(), None)], 0).unwrap();
        assert!(other_format(&store).unwrap(), "a clear cut short");
        store.clear().unwrap();
        assert!(
            !other_format(&store).unwrap(),
            "cleared: nothing to rebuild"
        );
    }
}

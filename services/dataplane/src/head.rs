//! Heads: a daemon's local copy of each of its jobs' data, in sled under its head
//! directory, one tree per job. The documents and the head's position (`meta`) live in
//! the same tree and change in one atomic batch, so a head killed at any point is at a
//! consistent position when it opens again.

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
    /// The source's checksum at entry `n`: what the head's documents must add up to
    /// (checked by [`Head::scan`] before a move completes and with every snapshot).
    pub checksum: Checksum,
}

impl HeadMeta {
    /// An empty head of `job` at `epoch`, before any snapshot is restored into it.
    pub fn new(job: JobId, epoch: u64, status: HeadStatus) -> HeadMeta {
        HeadMeta {
            job,
            epoch,
            status,
            restored_from: None,
            applied_seq: 0,
            n: 0,
            ts: Ts::ZERO,
            checksum: Checksum::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HeadError {
    #[error("head store: {0}")]
    Store(#[from] sled::Error),
    #[error("oplog entry {found} follows entry {applied}: entries {} to {} are missing from the oplog store", applied + 1, found - 1)]
    Gap { applied: u64, found: u64 },
    #[error(
        "at oplog entry {n} the head's checksum is {head} but the source's was {source_checksum}"
    )]
    Diverged {
        n: u64,
        head: Checksum,
        source_checksum: Checksum,
    },
    #[error("the head's position is unreadable: {0}")]
    Meta(#[source] serde_json::Error),
    #[error("cannot create the head directory {}: {source}", dir.display())]
    Dir {
        dir: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl HeadError {
    /// The heads' store failed underneath (an I/O error such as a full disk, or
    /// corruption): sled takes no write after that until it is opened again, so every
    /// later attempt at any head fails the same way. Only a new process recovers.
    pub fn store_broken(&self) -> bool {
        matches!(
            self,
            HeadError::Store(
                sled::Error::Io(_) | sled::Error::Corruption { .. } | sled::Error::ReportableBug(_)
            )
        )
    }
}

/// The cache of a daemon's heads: the pages kept in memory, whatever the heads hold
/// (sled's default, 1 GiB, would grow a daemon's memory with its data).
const HEADS_CACHE: u64 = 64 << 20;
/// The cache of a [`Heads::scratch`] store.
const SCRATCH_CACHE: u64 = 32 << 20;

/// Every head of one daemon.
pub struct Heads {
    db: sled::Db,
}

impl Heads {
    pub fn open(dir: &Path) -> Result<Heads, HeadError> {
        std::fs::create_dir_all(dir).map_err(|source| HeadError::Dir {
            dir: dir.to_owned(),
            source,
        })?;
        Ok(Heads {
            db: sled::Config::new()
                .path(dir.join("heads"))
                .cache_capacity(HEADS_CACHE)
                .open()?,
        })
    }

    /// A store for one piece of work (a restore to files), removed when it is dropped;
    /// its cache is capped, so its memory does not grow with the data it holds.
    pub fn scratch(dir: &Path) -> Result<Heads, HeadError> {
        Ok(Heads {
            db: sled::Config::new()
                .path(dir)
                .temporary(true)
                .cache_capacity(SCRATCH_CACHE)
                .open()?,
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
                .map_err(HeadError::Meta),
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

    /// Loads documents from a snapshot (`id`, `doc` pairs) into an empty head, adding
    /// them to `sum`; the batch and `meta` are written together.
    pub fn load(
        &self,
        meta: &HeadMeta,
        sum: &mut Checksum,
        docs: &[(&str, &[u8])],
    ) -> Result<(), HeadError> {
        let mut batch = sled::Batch::default();
        for (id, doc) in docs {
            sum.insert(id, doc);
            batch.insert(Self::doc_key(id), *doc);
        }
        batch.insert(META, serde_json::to_vec(meta).expect("json"));
        self.tree.apply_batch(batch)?;
        Ok(())
    }

    /// Applies the entries of one oplog message (stream sequence `seq`) that the head has
    /// not applied yet and records the new position in the same batch. Entries must follow
    /// each other with no gap. Returns how many entries were applied.
    ///
    /// Applying reads nothing: the documents are checked as a whole by [`Head::scan`]
    /// against the source's checksum of the last entry, which `meta` carries.
    pub fn apply(
        &self,
        meta: &mut HeadMeta,
        seq: u64,
        entries: &[Entry<'_>],
    ) -> Result<usize, HeadError> {
        let mut batch = sled::Batch::default();
        let mut next = meta.clone();
        let mut applied = 0;
        let mut key = Vec::with_capacity(64);
        for e in entries.iter().filter(|e| e.n > meta.n) {
            if e.n != next.n + 1 {
                return Err(HeadError::Gap {
                    applied: next.n,
                    found: e.n,
                });
            }
            key.clear();
            key.push(DOC);
            key.extend_from_slice(e.id.as_bytes());
            match e.doc {
                Some(doc) => batch.insert(key.as_slice(), doc.get().as_bytes()),
                None => batch.remove(key.as_slice()),
            }
            next.n = e.n;
            next.ts = e.ts;
            next.checksum = e.c;
            applied += 1;
        }
        next.applied_seq = next.applied_seq.max(seq);
        batch.insert(META, serde_json::to_vec(&next).expect("json"));
        self.tree.apply_batch(batch)?;
        *meta = next;
        Ok(applied)
    }

    /// The checksum of the documents the head holds, computed from all of them.
    pub fn scan(&self) -> Result<Checksum, HeadError> {
        let mut sum = Checksum::default();
        for kv in self.tree.scan_prefix([DOC]) {
            let (k, v) = kv?;
            sum.insert(&String::from_utf8_lossy(&k[1..]), &v);
        }
        Ok(sum)
    }

    /// How many documents the head holds, their bytes, and their checksum: one scan.
    pub fn tally(&self) -> Result<(u64, u64, Checksum), HeadError> {
        let (mut docs, mut bytes, mut sum) = (0, 0, Checksum::default());
        for kv in self.tree.scan_prefix([DOC]) {
            let (k, v) = kv?;
            sum.insert(&String::from_utf8_lossy(&k[1..]), &v);
            docs += 1;
            bytes += v.len() as u64;
        }
        Ok((docs, bytes, sum))
    }

    /// Checks the documents against the source's checksum at the head's point.
    pub fn verify(&self, meta: &HeadMeta) -> Result<(), HeadError> {
        let head = self.scan()?;
        if head != meta.checksum {
            return Err(HeadError::Diverged {
                n: meta.n,
                head,
                source_checksum: meta.checksum,
            });
        }
        Ok(())
    }

    /// The size of the documents as snapshot lines, and their checksum: one scan,
    /// nothing kept.
    pub fn export_size(&self) -> Result<(u64, Checksum), HeadError> {
        let mut size = 0u64;
        let mut sum = Checksum::default();
        let mut line = Vec::new();
        for kv in self.tree.scan_prefix([DOC]) {
            let (k, v) = kv?;
            let id = String::from_utf8_lossy(&k[1..]);
            sum.insert(&id, &v);
            line.clear();
            crate::snapshot::write_line(&mut line, &id, &v);
            size += line.len() as u64;
        }
        Ok((size, sum))
    }

    /// The documents as snapshot lines, read as they are uploaded: a buffer of a few
    /// lines, never one the size of the head.
    pub fn export_reader(&self) -> ExportReader {
        ExportReader {
            docs: self.tree.scan_prefix([DOC]),
            buf: Vec::new(),
            at: 0,
        }
    }

    /// The documents as snapshot lines (`{"id":..,"doc":..}` per line), in id order,
    /// and their checksum.
    pub fn export(&self) -> Result<(Vec<u8>, Checksum), HeadError> {
        let mut out = Vec::new();
        let mut sum = Checksum::default();
        for kv in self.tree.scan_prefix([DOC]) {
            let (k, v) = kv?;
            let id = String::from_utf8_lossy(&k[1..]);
            sum.insert(&id, &v);
            crate::snapshot::write_line(&mut out, &id, &v);
        }
        Ok((out, sum))
    }
}

/// A head's documents as snapshot lines, produced as they are read ([`Head::export_reader`]).
pub struct ExportReader {
    docs: sled::Iter,
    buf: Vec<u8>,
    at: usize,
}

/// Lines are gathered up to about this much before they are handed over.
const EXPORT_CHUNK: usize = 64 * 1024;

impl tokio::io::AsyncRead for ExportReader {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        out: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        // As much as the caller has room for (the object store cuts a chunk per read).
        while out.remaining() > 0 {
            if this.at == this.buf.len() {
                this.buf.clear();
                this.at = 0;
                while this.buf.len() < EXPORT_CHUNK {
                    match this.docs.next() {
                        None => break,
                        Some(Err(e)) => {
                            return std::task::Poll::Ready(Err(std::io::Error::other(
                                e.to_string(),
                            )))
                        }
                        Some(Ok((k, v))) => {
                            let id = String::from_utf8_lossy(&k[1..]);
                            crate::snapshot::write_line(&mut this.buf, &id, &v);
                        }
                    }
                }
                if this.buf.is_empty() {
                    break;
                }
            }
            let n = out.remaining().min(this.buf.len() - this.at);
            out.put_slice(&this.buf[this.at..this.at + n]);
            this.at += n;
        }
        std::task::Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::sim::{Config, Sim};
    use proptest::prelude::*;

    fn empty(job: &JobId) -> HeadMeta {
        HeadMeta::new(job.clone(), 1, HeadStatus::Building)
    }

    proptest! {
        /// A head loaded with the initial data and fed the oplog in messages of any size
        /// (some delivered twice) equals the source; an entry skipped is a gap.
        #[test]
        fn a_head_fed_the_oplog_equals_the_source(seed in any::<u64>(), steps in 1usize..400, cut in 1usize..50) {
            let dir = tempfile::tempdir().unwrap();
            let heads = Heads::open(dir.path()).unwrap();
            let job = JobId::new("p/rs").unwrap();
            let head = heads.head(&job).unwrap();
            let mut source = Sim::new(&Config { seed, initial_bytes: 3_000, doc_bytes: 80, ..Config::default() });
            let mut meta = empty(&job);
            let mut sum = Checksum::default();
            let docs: Vec<(String, Vec<u8>)> = source.documents().into_iter().map(|(i, d)| (i.to_owned(), d.as_bytes().to_vec())).collect();
            let refs: Vec<(&str, &[u8])> = docs.iter().map(|(i, d)| (i.as_str(), d.as_slice())).collect();
            head.load(&meta, &mut sum, &refs).unwrap();
            meta.checksum = sum;
            head.verify(&meta).unwrap();
            let mut log = Vec::new();
            for k in 0..steps {
                source.step(Ts { t: 10, i: k as u32 + 1 }, &mut log);
            }
            let lines: Vec<&[u8]> = log.split(|b| *b == b'\n').filter(|l| !l.is_empty()).collect();
            for (m, chunk) in lines.chunks(cut).enumerate() {
                let payload = chunk.join(&b'\n');
                let entries = crate::oplog::decode(&payload).unwrap();
                head.apply(&mut meta, m as u64 + 1, &entries).unwrap();
                // Delivered again: nothing changes.
                prop_assert_eq!(head.apply(&mut meta, m as u64 + 1, &entries).unwrap(), 0);
            }
            prop_assert_eq!(meta.checksum, source.checksum());
            prop_assert_eq!(head.scan().unwrap(), source.checksum());
            // An entry missing in between is refused.
            let mut more = Vec::new();
            source.step(Ts { t: 11, i: 1 }, &mut more);
            source.step(Ts { t: 11, i: 2 }, &mut more);
            let entries = crate::oplog::decode(&more).unwrap();
            let gap = head.apply(&mut meta, 10_000, &entries[1..]);
            prop_assert!(matches!(gap, Err(HeadError::Gap { .. })), "{:?}", gap);
        }
    }

    #[test]
    fn a_changed_document_is_found_by_verify() {
        let dir = tempfile::tempdir().unwrap();
        let heads = Heads::open(dir.path()).unwrap();
        let job = JobId::new("p/rs").unwrap();
        let head = heads.head(&job).unwrap();
        let mut meta = empty(&job);
        let mut sum = Checksum::default();
        head.load(
            &meta,
            &mut sum,
            &[("a", br#"{"v":1}"#), ("b", br#"{"v":2}"#)],
        )
        .unwrap();
        meta.checksum = sum;
        head.verify(&meta).unwrap();
        head.tree
            .insert(Head::doc_key("b"), &br#"{"v":3}"#[..])
            .unwrap();
        assert!(matches!(
            head.verify(&meta),
            Err(HeadError::Diverged { .. })
        ));
    }

    /// A full disk breaks the store for good (the daemon must start again); a gap or a
    /// divergence is about one head only.
    #[test]
    fn only_the_stores_own_failures_break_it() {
        let full = std::io::Error::from_raw_os_error(28);
        assert!(HeadError::Store(sled::Error::Io(full)).store_broken());
        assert!(!HeadError::Gap {
            applied: 1,
            found: 3
        }
        .store_broken());
        assert!(!HeadError::Store(sled::Error::Unsupported("x".into())).store_broken());
    }

    /// The streamed export is the export, byte for byte, over chunks of many lines; its
    /// size and checksum are known before it streams.
    #[tokio::test]
    async fn the_streamed_export_is_the_export() {
        use tokio::io::AsyncReadExt;
        let dir = tempfile::tempdir().unwrap();
        let heads = Heads::open(dir.path()).unwrap();
        let job = JobId::new("p/rs0").unwrap();
        let head = heads.head(&job).unwrap();
        let source = Sim::new(&Config {
            seed: 7,
            initial_bytes: 400_000,
            doc_bytes: 300,
            ..Config::default()
        });
        let docs: Vec<(&str, &[u8])> = source
            .documents()
            .into_iter()
            .map(|(id, d)| (id, d.as_bytes()))
            .collect();
        head.load(&empty(&job), &mut Checksum::default(), &docs)
            .unwrap();
        let (whole, sum) = head.export().unwrap();
        assert!(whole.len() > 3 * EXPORT_CHUNK, "{} bytes", whole.len());
        assert_eq!(head.export_size().unwrap(), (whole.len() as u64, sum));
        let mut streamed = Vec::new();
        head.export_reader()
            .read_to_end(&mut streamed)
            .await
            .unwrap();
        assert!(streamed == whole);
    }
}

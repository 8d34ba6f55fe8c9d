//! The simulated MongoDB: a replica set (or a shard, or a sharded cluster's config
//! servers) as a collection of JSON documents, written to by a deterministic workload from
//! a seed (inserts, updates and deletes at a steady rate), every job's entries stamped by
//! one cluster-wide clock. It is the only [`Source`] so far and stands in for MongoDB: the
//! agent reads its initial data and its oplog through the seam, and its checksum after
//! every operation is what heads and restores are checked against.
//!
//! # Layout
//! - [`Config`]: the seed, the rate and the sizes.
//! - [`Sim`]: the data and its workload, without time: the same seed gives the same
//!   documents and the same operations. Tests and benchmarks drive it directly.
//! - [`Clock`]: the one clock of the simulated cluster.
//! - [`Cluster`]: the [`Factory`]: one [`Live`] source per job, each seeded from the
//!   seed and the job's id, all on one clock.
//! - [`Live`]: a job's [`Source`]: its [`Sim`] writing at the configured rate.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures::Stream;
use handoff_domain::JobId;
use serde_json::value::RawValue;

use super::{Document, Factory, Point, Resume, Source, SourceError};
use crate::checksum::Checksum;
use crate::oplog::{self, Entry, Op, Ts};

/// The simulated workload: its shape and its pace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// The same seed, the same data. Each job's source is seeded from it and the job's id.
    pub seed: u64,
    /// Data written before the first snapshot (the initial sync), in bytes.
    pub initial_bytes: u64,
    /// Size of one document, in bytes (about; kept within 32 B and 256 KiB).
    pub doc_bytes: usize,
    /// Writes per second on each job's source.
    pub ops_per_sec: u32,
    /// The collection's working size, in bytes: below it, inserts outnumber deletes (it
    /// grows); at or above it, deletes outnumber inserts, so it stays about this size for
    /// as long as the workload runs, as a long-lived database does. Unbounded by default.
    pub max_bytes: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            seed: 1,
            initial_bytes: 1 << 20,
            doc_bytes: 512,
            ops_per_sec: 200,
            max_bytes: u64::MAX,
        }
    }
}

/// A simulated source's data and workload.
pub struct Sim {
    docs: HashMap<String, String>,
    ids: Vec<String>,
    checksum: Checksum,
    rng: u64,
    next_id: u64,
    n: u64,
    doc_bytes: usize,
    bytes: u64,
    max_bytes: u64,
    /// The document of the last entry, lent to it.
    last_doc: Option<Box<RawValue>>,
}

const PAD: &[u8; 62] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";

impl Sim {
    /// A source with its initial data.
    pub fn new(w: &Config) -> Sim {
        let mut s = Sim {
            docs: HashMap::new(),
            ids: Vec::new(),
            checksum: Checksum::default(),
            rng: w.seed ^ 0x9e37_79b9_7f4a_7c15,
            next_id: 0,
            n: 0,
            doc_bytes: w.doc_bytes.clamp(32, 256 * 1024),
            bytes: 0,
            max_bytes: w.max_bytes,
            last_doc: None,
        };
        while s.bytes < w.initial_bytes {
            let (id, doc) = s.new_doc();
            s.put(id, doc);
        }
        s
    }

    /// A source that carries on from data restored from the stores: `docs` at entry `n`.
    /// Its workload continues deterministically from the seed and `n`.
    pub fn resume(w: &Config, docs: HashMap<String, String>, n: u64) -> Sim {
        let mut s = Sim {
            ids: docs.keys().cloned().collect(),
            checksum: Checksum::default(),
            rng: (w.seed ^ 0x9e37_79b9_7f4a_7c15)
                .wrapping_add(n.wrapping_mul(0xd6e8_feb8_6659_fd93)),
            next_id: 0,
            n,
            doc_bytes: w.doc_bytes.clamp(32, 256 * 1024),
            bytes: 0,
            max_bytes: w.max_bytes,
            docs: HashMap::new(),
            last_doc: None,
        };
        s.ids.sort_unstable();
        for (id, doc) in &docs {
            s.checksum.insert(id, doc.as_bytes());
            s.bytes += doc.len() as u64;
            let number = id
                .strip_prefix('d')
                .and_then(|x| x.parse().ok())
                .unwrap_or(0);
            s.next_id = s.next_id.max(number);
        }
        // Ids of deleted documents are never reused: skip past every number used so far.
        s.next_id = s.next_id.max(n + docs.len() as u64);
        s.docs = docs;
        s
    }

    fn random(&mut self) -> u64 {
        // SplitMix64: small, fast and the same everywhere.
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn doc(&mut self, id: &str) -> String {
        let version = self.random() % 1_000_000;
        let pad_len = self.doc_bytes.saturating_sub(id.len() + 40);
        let mut pad = String::with_capacity(pad_len);
        let mut bits = 0u64;
        for k in 0..pad_len {
            if k % 10 == 0 {
                bits = self.random();
            }
            pad.push(PAD[(bits % 62) as usize] as char);
            bits /= 62;
        }
        format!(r#"{{"_id":"{id}","v":{version},"pad":"{pad}"}}"#)
    }

    fn new_doc(&mut self) -> (String, String) {
        self.next_id += 1;
        let id = format!("d{:010}", self.next_id);
        let doc = self.doc(&id);
        (id, doc)
    }

    fn put(&mut self, id: String, doc: String) {
        self.checksum.insert(&id, doc.as_bytes());
        self.bytes += doc.len() as u64;
        if let Some(old) = self.docs.insert(id.clone(), doc) {
            self.checksum.remove(&id, old.as_bytes());
            self.bytes -= old.len() as u64;
        } else {
            self.ids.push(id);
        }
    }

    /// Performs the next operation of the workload at `ts` and returns its oplog entry.
    pub fn perform(&mut self, ts: Ts) -> Entry<'_> {
        let roll = self.random() % 100;
        // Of every 100 writes: 45 inserts, 40 updates, 15 deletes while the collection is
        // under its working size; 15 inserts, 40 updates, 45 deletes once it is at it.
        let (inserts, updates) = match self.bytes < self.max_bytes {
            true => (45, 85),
            false => (15, 55),
        };
        let (op, id, doc) = if self.ids.is_empty() || roll < inserts {
            let (id, doc) = self.new_doc();
            (Op::Insert, id, Some(doc))
        } else {
            let k = (self.random() % self.ids.len() as u64) as usize;
            let id = self.ids[k].clone();
            if roll < updates {
                let doc = self.doc(&id);
                (Op::Update, id, Some(doc))
            } else {
                self.ids.swap_remove(k);
                // `ids` lists exactly the keys of `docs`: `put` and this branch keep both.
                let old = self.docs.remove(&id).expect("listed ids exist");
                self.checksum.remove(&id, old.as_bytes());
                self.bytes -= old.len() as u64;
                (Op::Delete, id, None)
            }
        };
        if let Some(doc) = &doc {
            self.put(id.clone(), doc.clone());
        }
        self.n += 1;
        // `doc` builds each document with serde_json, so it is always valid JSON.
        self.last_doc =
            doc.map(|d| RawValue::from_string(d).expect("generated documents are JSON"));
        Entry {
            ts,
            n: self.n,
            op,
            id: id.into(),
            doc: self.last_doc.as_deref(),
            c: self.checksum,
        }
    }

    /// Performs the next operation of the workload at `ts` and appends its oplog entry to
    /// `out`. Returns the entry's number.
    pub fn step(&mut self, ts: Ts, out: &mut Vec<u8>) -> u64 {
        let entry = self.perform(ts);
        oplog::encode_into(out, &entry);
        entry.n
    }

    pub fn checksum(&self) -> Checksum {
        self.checksum
    }

    /// The size of its documents, in bytes.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Number of the last oplog entry (0 before any).
    pub fn last_n(&self) -> u64 {
        self.n
    }

    /// The documents, in id order (for the initial snapshot).
    pub fn documents(&self) -> Vec<(&str, &str)> {
        let mut v: Vec<(&str, &str)> = self
            .docs
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        v.sort_unstable();
        v
    }
}

/// The one clock of the simulated cluster, so that every job's entries (the shards of a
/// cluster and its config servers too) are ordered on one time line: a common point is
/// one timestamp.
#[derive(Clone, Default)]
pub struct Clock(Arc<Mutex<Ts>>);

impl Clock {
    /// Never gives `ts` or anything before it.
    pub fn floor(&self, ts: Ts) {
        // Poisoned only if a holder panicked mid-update, which already ended the agent.
        let mut last = self.0.lock().expect("clock lock");
        *last = (*last).max(ts);
    }

    /// The next timestamp: this second's, after every one given or floored before.
    pub fn next(&self) -> Ts {
        let now = (handoff_protocol::now_ms() / 1000) as u32;
        // Poisoned only if a holder panicked mid-update, which already ended the agent.
        let mut last = self.0.lock().expect("clock lock");
        *last = if now > last.t {
            Ts { t: now, i: 1 }
        } else {
            Ts {
                t: last.t,
                i: last.i + 1,
            }
        };
        *last
    }
}

/// The simulated deployment: makes each job's [`Live`] source, all on one [`Clock`].
pub struct Cluster {
    config: Config,
    clock: Clock,
}

impl Cluster {
    pub fn new(config: Config) -> Cluster {
        Cluster {
            config,
            clock: Clock::default(),
        }
    }

    /// The job's own workload: the configured one, seeded from the seed and the job's id.
    fn workload(&self, job: &JobId) -> Config {
        Config {
            seed: crate::checksum::doc_hash(job.as_str(), &self.config.seed.to_le_bytes()),
            ..self.config.clone()
        }
    }

    fn live(&self, sim: Sim, ts: Ts) -> Live {
        Live {
            sim,
            clock: self.clock.clone(),
            ops_per_sec: self.config.ops_per_sec,
            ts,
            started: None,
            done: 0,
            due: None,
        }
    }
}

impl Factory for Cluster {
    type Source = Live;

    fn seen(&self, ts: Ts) {
        self.clock.floor(ts);
    }

    async fn start(&self, job: &JobId) -> Result<Live, SourceError> {
        let sim = Sim::new(&self.workload(job));
        Ok(self.live(sim, self.clock.next()))
    }

    async fn resume(&self, job: &JobId, from: Resume) -> Result<Live, SourceError> {
        self.clock.floor(from.ts);
        let sim = Sim::resume(&self.workload(job), from.docs, from.n);
        Ok(self.live(sim, from.ts))
    }
}

/// A job's simulated source: its [`Sim`] performing `ops_per_sec` operations a second,
/// counted from the first time it is asked for an entry.
pub struct Live {
    sim: Sim,
    clock: Clock,
    ops_per_sec: u32,
    /// Timestamp of the last entry, or of the initial sync or the stores' end before any.
    ts: Ts,
    started: Option<Instant>,
    /// Operations performed since `started`.
    done: u64,
    /// Operations due when the agent began its current round of asking; `None` between
    /// rounds. Fixed for the round, so a round ends even when the rate outruns the
    /// simulator.
    due: Option<u64>,
}

impl Source for Live {
    fn point(&self) -> Point {
        Point {
            ts: self.ts,
            n: self.sim.last_n(),
            checksum: self.sim.checksum(),
        }
    }

    fn documents(&self) -> impl Stream<Item = Result<Document<'_>, SourceError>> + Send + '_ {
        // The sorted list holds references only; the documents stay where they are.
        futures::stream::iter(self.sim.documents().into_iter().map(|(id, json)| {
            Ok(Document {
                id: id.into(),
                json: json.into(),
            })
        }))
    }

    async fn next_entry(&mut self) -> Result<Option<Entry<'_>>, SourceError> {
        let due = match self.due {
            Some(due) => due,
            None => {
                let started = *self.started.get_or_insert_with(Instant::now);
                let elapsed_ms = started.elapsed().as_millis() as u64;
                *self
                    .due
                    .insert(elapsed_ms * u64::from(self.ops_per_sec) / 1000)
            }
        };
        if self.done >= due {
            self.due = None;
            return Ok(None);
        }
        self.done += 1;
        self.ts = self.clock.next();
        Ok(Some(self.sim.perform(self.ts)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// The same seed gives the same data and oplog, and replaying the oplog over the
        /// initial documents gives the source's checksum after every entry.
        #[test]
        fn deterministic_and_replayable(seed in any::<u64>(), steps in 1usize..300) {
            let w = Config { seed, initial_bytes: 4_000, doc_bytes: 100, ..Config::default() };
            let (mut a, mut b) = (Sim::new(&w), Sim::new(&w));
            let mut replay: HashMap<String, String> = a.documents().into_iter().map(|(k, v)| (k.to_owned(), v.to_owned())).collect();
            let mut sum = a.checksum();
            let (mut out_a, mut out_b) = (Vec::new(), Vec::new());
            for k in 0..steps {
                let ts = Ts { t: 1000 + k as u32 / 10, i: k as u32 % 10 + 1 };
                a.step(ts, &mut out_a);
                b.step(ts, &mut out_b);
            }
            prop_assert_eq!(&out_a, &out_b);
            for e in oplog::decode(&out_a).unwrap() {
                if let Some(old) = replay.remove(e.id.as_ref()) { sum.remove(&e.id, old.as_bytes()); }
                if let Some(doc) = e.doc { sum.insert(&e.id, doc.get().as_bytes()); replay.insert(e.id.to_string(), doc.get().to_owned()); }
                prop_assert_eq!(sum, e.c);
            }
            prop_assert_eq!(sum, a.checksum());
        }
    }

    proptest! {
        /// Below its working size the collection grows; once there, it stays within a
        /// few documents of it however long the workload runs.
        #[test]
        fn a_collection_keeps_its_working_size(seed in any::<u64>(), grow in 0u64..20_000) {
            let max_bytes = 20_000;
            let w = Config { seed, initial_bytes: max_bytes - grow, doc_bytes: 100, max_bytes, ..Config::default() };
            let mut sim = Sim::new(&w);
            let mut reached = None;
            let mut before = sim.bytes();
            for k in 0..20_000u32 {
                sim.perform(Ts { t: 1000 + k / 10, i: k % 10 + 1 });
                if reached.is_none() && sim.bytes() >= max_bytes {
                    reached = Some(k);
                }
                if reached.is_some() {
                    prop_assert!(sim.bytes().abs_diff(max_bytes) <= 2_000, "{} bytes at write {k}", sim.bytes());
                } else if k % 1_000 == 999 {
                    // About 30 bytes more a write on average: 1,000 writes grow it.
                    prop_assert!(sim.bytes() > before, "did not grow below its working size");
                    before = sim.bytes();
                }
            }
            prop_assert!(reached.is_some(), "never grew to its working size");
        }
    }

    /// A new job's source keeps the factory's contract: its documents are its data, its
    /// point counts no entry, carries the checksum of those documents and comes after
    /// what the stores were seen to hold.
    #[tokio::test]
    async fn a_started_source_is_at_its_initial_sync() {
        use futures::StreamExt;
        let cluster = Cluster::new(Config {
            initial_bytes: 3_000,
            doc_bytes: 80,
            ..Config::default()
        });
        let seen = Ts {
            t: u32::MAX - 1,
            i: 7,
        };
        cluster.seen(seen);
        let job = JobId::new("p/rs").unwrap();
        let source = cluster.start(&job).await.unwrap();
        let docs: Vec<Document<'_>> = source.documents().map(Result::unwrap).collect().await;
        let mut sum = Checksum::default();
        for d in &docs {
            sum.insert(&d.id, d.json.as_bytes());
        }
        let point = source.point();
        assert!(!docs.is_empty());
        assert!(docs.windows(2).all(|w| w[0].id < w[1].id), "in id order");
        assert_eq!((point.n, point.checksum), (0, sum));
        assert!(point.ts > seen);
    }

    /// A source resumed from the stores' data is where the stores end: same timestamp,
    /// same entry number, and the checksum the simulator had there.
    #[tokio::test]
    async fn a_resumed_source_is_where_the_stores_end() {
        let config = Config {
            initial_bytes: 3_000,
            doc_bytes: 80,
            ..Config::default()
        };
        let cluster = Cluster::new(config.clone());
        let job = JobId::new("p/rs").unwrap();
        let mut sim = Sim::new(&cluster.workload(&job));
        for k in 0..50 {
            sim.perform(Ts { t: 1000, i: k + 1 });
        }
        let docs = sim
            .documents()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let ts = Ts { t: 1000, i: 50 };
        let source = cluster
            .resume(
                &job,
                Resume {
                    ts,
                    n: sim.last_n(),
                    docs,
                },
            )
            .await
            .unwrap();
        assert_eq!(
            source.point(),
            Point {
                ts,
                n: 50,
                checksum: sim.checksum()
            }
        );
    }
}

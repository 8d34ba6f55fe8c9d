//! The simulated source: a replica set (or a shard, or config servers) as a collection of
//! JSON documents, with a deterministic workload from a seed (inserts, updates, deletes).
//! It stands in for MongoDB: the agent reads its initial data and its oplog, and its
//! checksum after every operation is what heads and restores are checked against.

use std::collections::HashMap;

use serde_json::value::RawValue;

use crate::checksum::Checksum;
use crate::oplog::{self, Entry, Op, Ts};

/// Shape of the data and of the writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    pub seed: u64,
    /// Data written before the first snapshot (the initial sync), in bytes.
    pub initial_bytes: u64,
    /// Size of one document, in bytes (about).
    pub doc_bytes: usize,
}

/// A source database.
pub struct Source {
    docs: HashMap<String, String>,
    ids: Vec<String>,
    checksum: Checksum,
    rng: u64,
    next_id: u64,
    n: u64,
    doc_bytes: usize,
    bytes: u64,
}

const PAD: &[u8; 62] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";

impl Source {
    /// A source with its initial data.
    pub fn new(w: &Workload) -> Source {
        let mut s = Source {
            docs: HashMap::new(),
            ids: Vec::new(),
            checksum: Checksum::default(),
            rng: w.seed ^ 0x9e37_79b9_7f4a_7c15,
            next_id: 0,
            n: 0,
            doc_bytes: w.doc_bytes.clamp(32, 256 * 1024),
            bytes: 0,
        };
        while s.bytes < w.initial_bytes {
            let (id, doc) = s.new_doc();
            s.put(id, doc);
        }
        s
    }

    /// A source that carries on from data restored from the stores: `docs` at entry `n`.
    /// Its workload continues deterministically from the seed and `n`.
    pub fn resume(w: &Workload, docs: HashMap<String, String>, n: u64) -> Source {
        let mut s = Source {
            ids: docs.keys().cloned().collect(),
            checksum: Checksum::default(),
            rng: (w.seed ^ 0x9e37_79b9_7f4a_7c15)
                .wrapping_add(n.wrapping_mul(0xd6e8_feb8_6659_fd93)),
            next_id: 0,
            n,
            doc_bytes: w.doc_bytes.clamp(32, 256 * 1024),
            bytes: 0,
            docs: HashMap::new(),
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

    /// Performs the next operation of the workload at `ts` and appends its oplog entry to
    /// `out`. Returns the entry's number.
    pub fn step(&mut self, ts: Ts, out: &mut Vec<u8>) -> u64 {
        let roll = self.random() % 100;
        let (op, id, doc) = if self.ids.is_empty() || roll < 45 {
            let (id, doc) = self.new_doc();
            (Op::Insert, id, Some(doc))
        } else {
            let k = (self.random() % self.ids.len() as u64) as usize;
            let id = self.ids[k].clone();
            if roll < 85 {
                let doc = self.doc(&id);
                (Op::Update, id, Some(doc))
            } else {
                self.ids.swap_remove(k);
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
        let raw = doc.map(|d| RawValue::from_string(d).expect("generated documents are JSON"));
        oplog::encode_into(
            out,
            &Entry {
                ts,
                n: self.n,
                op,
                id: id.into(),
                doc: raw.as_deref(),
                c: self.checksum,
            },
        );
        self.n
    }

    pub fn checksum(&self) -> Checksum {
        self.checksum
    }

    /// Number of the last oplog entry (0 before any).
    pub fn last_n(&self) -> u64 {
        self.n
    }

    /// Bytes of document data held.
    pub fn data_bytes(&self) -> u64 {
        self.bytes
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// The same seed gives the same data and oplog, and replaying the oplog over the
        /// initial documents gives the source's checksum after every entry.
        #[test]
        fn deterministic_and_replayable(seed in any::<u64>(), steps in 1usize..300) {
            let w = Workload { seed, initial_bytes: 4_000, doc_bytes: 100 };
            let (mut a, mut b) = (Source::new(&w), Source::new(&w));
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
}

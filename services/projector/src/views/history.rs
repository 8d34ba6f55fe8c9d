//! Histories as the fold writes them: each job's and daemon's events in blocks of
//! [`HISTORY_BLOCK`] sequences, one key per history and block. The fold keeps only the open
//! block's sequences in memory, and rewrites a block in each batch that adds to it.

use std::collections::{BTreeSet, HashMap};

use super::keys::{
    daemon_history, events_key, framed_events, history_block, history_block_key, job_history,
    pack_seqs, unpack_seqs, EVENTS_PER_CHUNK,
};
use super::{Change, Value};
use crate::store::{StoreError, ViewStore};

#[derive(Default)]
pub(super) struct Histories {
    /// The first sequence of the open block.
    block: u64,
    /// What the open block holds of each history (by its prefix) so far.
    open: HashMap<Vec<u8>, Vec<u64>>,
    /// The histories added to since the last drain, in the open block.
    touched: BTreeSet<Vec<u8>>,
    /// Blocks passed since the last drain, as they ended.
    passed: Vec<Change>,
}

impl Histories {
    /// Adds the event at `seq` to the history under `history` (a prefix).
    pub(super) fn add(&mut self, history: Vec<u8>, seq: u64) {
        let block = history_block(seq);
        if block != self.block {
            self.pass(block);
        }
        self.open.entry(history.clone()).or_default().push(seq);
        self.touched.insert(history);
    }

    /// Moves on to the block starting at `block`: the histories added to in the block
    /// passed are written as they ended there.
    fn pass(&mut self, block: u64) {
        let passed = std::mem::replace(&mut self.block, block);
        let mut open = std::mem::take(&mut self.open);
        for history in std::mem::take(&mut self.touched) {
            let seqs = open.remove(&history).unwrap_or_default();
            let key = history_block_key(&history, passed);
            let value = Value::Bytes(pack_seqs(passed, &seqs));
            self.passed.push((key, Some(value)));
        }
    }

    /// Appends the writes of every block changed since the last drain.
    pub(super) fn drain(&mut self, writes: &mut Vec<Change>) {
        writes.append(&mut self.passed);
        for history in std::mem::take(&mut self.touched) {
            let seqs = self.open.get(&history).map_or(&[][..], Vec::as_slice);
            let key = history_block_key(&history, self.block);
            writes.push((key, Some(Value::Bytes(pack_seqs(self.block, seqs)))));
        }
    }

    /// What the block of the store's checkpoint holds of each history: the histories its
    /// stored events name, as their blocks say (no more than a block's events are read).
    pub(super) fn load(store: &impl ViewStore) -> Result<Self, StoreError> {
        let checkpoint = store.checkpoint()?;
        let block = history_block(checkpoint);
        let corrupt = |detail: String| StoreError::Corrupt {
            path: Default::default(),
            detail,
        };
        let mut named = BTreeSet::new();
        let chunks = (block / EVENTS_PER_CHUNK..=checkpoint / EVENTS_PER_CHUNK)
            .map(|n| n * EVENTS_PER_CHUNK);
        for chunk in chunks {
            let Some(framed) = store.get(&events_key(chunk))? else {
                continue;
            };
            for (seq, payload) in framed_events(&framed) {
                if seq < block || seq > checkpoint {
                    continue;
                }
                let e = handoff_protocol::EventEnvelope::decode(payload)
                    .map_err(|e| corrupt(format!("unreadable stored event {seq}: {e}")))?;
                named.extend(e.event.jobs().into_iter().map(job_history));
                named.extend(e.event.daemons().into_iter().map(daemon_history));
            }
        }
        let mut open = HashMap::new();
        for history in named {
            if let Some(v) = store.get(&history_block_key(&history, block))? {
                let seqs = unpack_seqs(block, &v)
                    .ok_or_else(|| corrupt(format!("a history block has {} bytes", v.len())))?;
                open.insert(history, seqs);
            }
        }
        Ok(Histories {
            block,
            open,
            ..Histories::default()
        })
    }
}

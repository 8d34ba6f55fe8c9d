//! The keys of the view store (see the table in the module's doc), and the framing of
//! stored events.

use handoff_domain::alert::{AlertKey, AlertKind};
use handoff_domain::{CommandId, DaemonId, JobId, ProjectId};

pub fn daemon_key(d: &DaemonId) -> Vec<u8> {
    key(&["daemon", d.as_str()])
}
pub fn project_key(p: &ProjectId) -> Vec<u8> {
    key(&["project", p.as_str()])
}
pub fn job_key(j: &JobId) -> Vec<u8> {
    key(&["job", j.as_str()])
}
/// The prefix of the records of `p`'s jobs: a job's id starts with its project's.
pub fn project_jobs(p: &ProjectId) -> Vec<u8> {
    let mut k = prefix(&["job", p.as_str()]);
    k.pop();
    k.push(b'/');
    k
}
pub fn move_key(m: &CommandId) -> Vec<u8> {
    key(&["move", m.as_str()])
}
pub fn alert_key(a: &AlertKey) -> Vec<u8> {
    key(&["alert", a.kind.as_str(), &a.about])
}
/// Events per chunk of stored events.
pub const EVENTS_PER_CHUNK: u64 = 64;

pub fn seq_text(seq: u64) -> String {
    format!("{seq:020}")
}

/// Sequences per block of a history: the events of one history within one such range of
/// sequences are one key.
pub const HISTORY_BLOCK: u64 = 4096;
const _: () = assert!(
    HISTORY_BLOCK <= 1 << 16,
    "a sequence's place in its block is 2 bytes"
);

/// The prefix of `job`'s history blocks.
pub fn job_history(job: &JobId) -> Vec<u8> {
    prefix(&["jh", job.as_str()])
}

/// The prefix of `daemon`'s history blocks.
pub fn daemon_history(daemon: &DaemonId) -> Vec<u8> {
    prefix(&["dh", daemon.as_str()])
}

/// The first sequence of the block holding `seq`.
pub fn history_block(seq: u64) -> u64 {
    seq / HISTORY_BLOCK * HISTORY_BLOCK
}

/// The key of the block of the history under `history` (a prefix) starting at `block`.
pub fn history_block_key(history: &[u8], block: u64) -> Vec<u8> {
    let mut k = history.to_vec();
    k.extend_from_slice(seq_text(block).as_bytes());
    k
}

/// A block's sequences, each as its distance from the block's first (2 bytes, big
/// endian): a block of 4,096 sequences holds at most 8 KiB.
pub fn pack_seqs(block: u64, seqs: &[u64]) -> Vec<u8> {
    seqs.iter()
        .flat_map(|s| {
            debug_assert_eq!(history_block(*s), block, "a sequence of another block");
            ((s - block) as u16).to_be_bytes()
        })
        .collect()
}

/// The sequences of the block starting at `block`; `None` if they are not whole, or not
/// of that block.
pub fn unpack_seqs(block: u64, packed: &[u8]) -> Option<Vec<u64>> {
    if !packed.len().is_multiple_of(2) {
        return None;
    }
    packed
        .chunks_exact(2)
        .map(|c| u64::from(u16::from_be_bytes([c[0], c[1]])))
        .map(|offset| {
            (offset < HISTORY_BLOCK)
                .then(|| block.checked_add(offset))
                .flatten()
        })
        .collect()
}

/// The first sequence of a history block's key (under `history`, its prefix); `None` if
/// it is not a block's.
pub fn block_of_key(history: &[u8], key: &[u8]) -> Option<u64> {
    let block = parse_number(key.strip_prefix(history)?)?;
    block.is_multiple_of(HISTORY_BLOCK).then_some(block)
}

/// The counter of the keys under `prefix` (a [`prefix`]).
pub fn counter_key(prefix: &[u8]) -> Vec<u8> {
    let mut k = b"n\0".to_vec();
    k.extend_from_slice(prefix);
    k
}

/// Whether an alert index lists every alert or the open ones.
fn alert_set(open: bool) -> &'static str {
    if open {
        "open"
    } else {
        "all"
    }
}

/// The prefix of the alerts, newest first by the event that raised them: open ones or
/// all, of one type or every type.
pub fn alert_index(open: bool, kind: Option<AlertKind>) -> Vec<u8> {
    match kind {
        None => prefix(&["ix", "alert", alert_set(open)]),
        Some(k) => prefix(&["ix", "alert", "kind", k.as_str(), alert_set(open)]),
    }
}

/// The key of the chunk holding event `seq`.
pub fn events_key(seq: u64) -> Vec<u8> {
    key(&["events", &format!("{:020}", seq / EVENTS_PER_CHUNK)])
}

pub fn parse_number(digits: &[u8]) -> Option<u64> {
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// Appends one event to a batch's framed events: sequence (8 bytes, big endian), length
/// (4 bytes, big endian), the payload.
pub(super) fn frame(out: &mut Vec<u8>, seq: u64, payload: &[u8]) {
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
}

/// The payload of event `seq` among a batch's framed events.
pub fn find_framed(framed: &[u8], seq: u64) -> Option<&[u8]> {
    framed_events(framed).find_map(|(s, payload)| (s == seq).then_some(payload))
}

/// The framed events, in order, as far as they are whole.
pub(super) fn framed_events(mut framed: &[u8]) -> impl Iterator<Item = (u64, &[u8])> {
    std::iter::from_fn(move || {
        let seq = u64::from_be_bytes(framed.get(..8)?.try_into().ok()?);
        let len = u32::from_be_bytes(framed.get(8..12)?.try_into().ok()?) as usize;
        let payload = framed.get(12..12 + len)?;
        framed = &framed[12 + len..];
        Some((seq, payload))
    })
}

/// Joins parts with NUL, which no id may contain; a prefix query ends with a NUL.
pub fn key(parts: &[&str]) -> Vec<u8> {
    parts.join("\0").into_bytes()
}

/// A prefix covering every key under `parts`.
pub fn prefix(parts: &[&str]) -> Vec<u8> {
    let mut k = key(parts);
    k.push(0);
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A block packs its sequences and reads them back; a block that is not whole, holds
    /// a place past its range or past the largest sequence, or whose key is not a block's
    /// start, reads as nothing (an error for the reader), never a wrong sequence.
    #[test]
    fn history_blocks_read_back_or_not_at_all() {
        let block = history_block(3 * HISTORY_BLOCK + 17);
        let seqs = [block, block + 1, block + HISTORY_BLOCK - 1];
        assert_eq!(
            unpack_seqs(block, &pack_seqs(block, &seqs)),
            Some(seqs.to_vec())
        );
        assert_eq!(unpack_seqs(block, &[0, 1, 2]), None, "not whole");
        let past = (HISTORY_BLOCK as u16).to_be_bytes();
        assert_eq!(unpack_seqs(block, &past), None, "past the block");
        let top = u64::MAX - 2;
        assert_eq!(unpack_seqs(top, &[0, 9]), None, "past the largest sequence");
        let history = job_history(&JobId::new("p/rs0").unwrap());
        let key = history_block_key(&history, block);
        assert_eq!(block_of_key(&history, &key), Some(block));
        let inside = history_block_key(&history, block + 1);
        assert_eq!(block_of_key(&history, &inside), None, "not a block's start");
        assert_eq!(block_of_key(&history, b"jh\0other"), None);
    }
}

//! The view store frees what sled replaces as it writes: batch after batch of rewrites
//! (a rebuild's pattern) leave the process's resident memory about where it was.
//!
//! Its own test binary, so no other test allocates while it measures. It reads
//! `/proc/self/status`: Linux only.
#![cfg(target_os = "linux")]

use handoff_projector::{SledStore, ViewStore};

/// This process's resident memory.
fn resident_mib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("Linux /proc");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status");
    kb / 1024
}

const KEYS: u64 = 20_000;

/// Every key written again with a value of a job record's size, in a shuffled order.
fn rewrite_all(round: u64) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
    (0..KEYS)
        .map(|i| {
            let job = (i * 7919 + round) % KEYS;
            (format!("job\0{job:06}").into_bytes(), Some(vec![b'x'; 400]))
        })
        .collect()
}

#[test]
fn batches_of_rewrites_do_not_pile_up_in_memory() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    // The tree and sled's cache at their working size first.
    store.commit(rewrite_all(0), 1).unwrap();
    store.commit(rewrite_all(1), 2).unwrap();
    let before = resident_mib();
    for round in 2..14 {
        store.commit(rewrite_all(round), round + 1).unwrap();
    }
    let grown = resident_mib().saturating_sub(before);
    eprintln!("12 batches of {KEYS} rewrites grew the process by {grown} MiB");
    // Without the store's reclaim, each batch left its replaced nodes behind (about
    // 13 MiB per batch here: 159 MiB over 12 batches, against 3 with it).
    assert!(
        grown < 64,
        "12 batches of {KEYS} rewrites grew the process by {grown} MiB"
    );
    assert_eq!(store.checkpoint().unwrap(), 14);
}

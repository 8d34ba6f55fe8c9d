//! A job's oplog as the oplog store holds it, read to its end: what the data-plane tests
//! check for gaps and against the source's checksums.

use std::collections::BTreeMap;

use anyhow::{anyhow, Context as _, Result};
use futures::StreamExt;
use handoff_dataplane::oplog::{self, Ts};
use handoff_dataplane::store::Stores;
use handoff_dataplane::Checksum;
use handoff_domain::JobId;

use crate::TIMEOUT;

/// One job's oplog as stored.
#[derive(Debug, Default)]
pub struct OplogScan {
    pub first_n: u64,
    pub last_n: u64,
    pub gaps: Vec<(u64, u64)>,
    pub source_at: BTreeMap<Ts, Checksum>,
}

/// Reads a job's whole oplog as stored: its entry numbers and the source's checksum at
/// each timestamp.
pub async fn scan_oplog(stores: &Stores, job: &JobId) -> Result<OplogScan> {
    let (last_seq, _) = stores
        .oplog_last(job)
        .await?
        .ok_or_else(|| anyhow!("no oplog of {job}"))?;
    let mut messages = stores.read_oplog(job, 1).await?;
    let mut scan = OplogScan::default();
    loop {
        let m = tokio::time::timeout(TIMEOUT, messages.next())
            .await
            .context("reading the oplog")?
            .ok_or_else(|| anyhow!("oplog reader ended"))??;
        let seq = m.info().map_err(|e| anyhow!("{e}"))?.stream_sequence;
        for e in oplog::decode(&m.payload)? {
            if scan.first_n == 0 {
                scan.first_n = e.n;
            } else if e.n != scan.last_n + 1 {
                scan.gaps.push((scan.last_n, e.n));
            }
            scan.last_n = e.n;
            scan.source_at.insert(e.ts, e.c);
        }
        if seq >= last_seq {
            return Ok(scan);
        }
    }
}

//! An active head: kept current from the oplog as it arrives, its position recorded in the
//! heads bucket, and its snapshots taken at the job's regular slots.

use std::time::{Duration, Instant};

use futures::StreamExt;
use handoff_domain::JobId;
use tokio::sync::watch;

use super::{JobError, Shared};
use crate::head::{Head, HeadError, HeadMeta};
use crate::oplog;
use crate::rebuild::OplogError;
use crate::store::{HeadRecord, SnapshotMeta};
use handoff_protocol::now_ms;

/// The head record is written again after this long even when the head did not move.
const REPORT_AT_LEAST_EVERY: Duration = Duration::from_secs(5);
/// The job's schedule is read again after this long, for a change to take effect.
const SCHEDULE_READ_EVERY: Duration = Duration::from_secs(5);

/// Keeps an active head current and takes its scheduled snapshots, until cancelled.
pub(super) async fn follow(
    shared: &Shared,
    job: &JobId,
    head: &Head,
    meta: &mut HeadMeta,
    cancelled: &mut watch::Receiver<bool>,
) -> Result<(), JobError> {
    let mut messages = shared.stores.read_oplog(job, meta.applied_seq + 1).await?;
    let mut schedule = shared.stores.schedule(job).await?;
    let last_slot = shared
        .stores
        .snapshots(Some(job))
        .await?
        .iter()
        .filter_map(|s| s.slot_ms)
        .max()
        .unwrap_or(0);
    // The next regular slot: never a burst of the ones missed while moving or down.
    let mut next_due = schedule.next_slot_after(now_ms().max(last_slot));
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut reported = None;
    let mut last_report = Instant::now();
    let mut schedule_read = Instant::now();
    loop {
        tokio::select! {
            _ = cancelled.changed() => return Ok(()),
            m = messages.next() => {
                let m = match m {
                    Some(Ok(m)) => m,
                    Some(Err(e)) => { tracing::debug!(error = %e, "oplog reader hiccup"); continue; }
                    None => return Err(OplogError::Ended.into()),
                };
                let seq = m.info().map_err(OplogError::Info)?.stream_sequence;
                let entries = oplog::decode(&m.payload)
                    .map_err(|source| OplogError::Unreadable { seq, source })?;
                if let Err(e) = head.apply(meta, seq, &entries) {
                    if matches!(e, HeadError::Gap { .. }) {
                        // The oplog it needs is gone: start again from a snapshot.
                        head.clear()?;
                    }
                    return Err(e.into());
                }
            }
            _ = tick.tick() => {
                let now = now_ms();
                if schedule_read.elapsed() > SCHEDULE_READ_EVERY {
                    let fresh = shared.stores.schedule(job).await?;
                    if fresh != schedule {
                        next_due = fresh.next_slot_after(now);
                        schedule = fresh;
                    }
                    schedule_read = Instant::now();
                }
                if now >= next_due {
                    take_snapshot(shared, job, head, meta, next_due).await?;
                    next_due = schedule.next_slot_after(now);
                }
                let point = (meta.applied_seq, meta.epoch);
                if reported != Some(point) || last_report.elapsed() > REPORT_AT_LEAST_EVERY {
                    put_head_record(shared, job, meta, now).await?;
                    reported = Some(point);
                    last_report = Instant::now();
                }
            }
        }
    }
}

/// Records where the head stands, for restores and the checker; fenced by its epoch.
async fn put_head_record(
    shared: &Shared,
    job: &JobId,
    meta: &HeadMeta,
    now: u64,
) -> Result<(), JobError> {
    let record = HeadRecord {
        daemon: shared.id.clone(),
        epoch: meta.epoch,
        applied_seq: meta.applied_seq,
        n: meta.n,
        ts: meta.ts,
        checksum: meta.checksum,
        at_ms: now,
    };
    shared.stores.put_head(job, &record).await?;
    Ok(())
}

/// Cuts a snapshot of the head for `slot`, after checking the head against the source.
async fn take_snapshot(
    shared: &Shared,
    job: &JobId,
    head: &Head,
    meta: &HeadMeta,
    slot: u64,
) -> Result<(), JobError> {
    // One scan for the size and the check, then the documents stream to the store.
    let (size_bytes, sum) = head.export_size()?;
    if sum != meta.checksum {
        // The head no longer matches the source: rebuild it rather than store a bad copy.
        head.clear()?;
        return Err(HeadError::Diverged {
            n: meta.n,
            head: sum,
            source_checksum: meta.checksum,
        }
        .into());
    }
    let snapshot = SnapshotMeta {
        id: ulid::Ulid::new().to_string(),
        job: job.clone(),
        epoch: meta.epoch,
        ts: meta.ts,
        n: meta.n,
        oplog_seq: meta.applied_seq,
        checksum: meta.checksum,
        size_bytes,
        taken_at_ms: now_ms(),
        slot_ms: Some(slot),
        daemon: Some(shared.id.clone()),
    };
    shared
        .stores
        .put_snapshot(&snapshot, &mut head.export_reader())
        .await?;
    tracing::info!(%job, snapshot = %snapshot.id, ts = %snapshot.ts, checksum = %snapshot.checksum, "snapshot taken");
    Ok(())
}

//! Fencing against a real nats-server: the snapshot store and the heads' positions refuse
//! a write whose epoch is older than the job's, and keep nothing of it.

use anyhow::Result;
use handoff_dataplane::store::{HeadRecord, SnapshotMeta, StoreError, Stores};
use handoff_dataplane::{Checksum, Ts};
use handoff_domain::{DaemonId, JobId};
use handoff_eventlog::fence::FenceError;
use handoff_protocol::now_ms;
use handoff_testkit::NatsServer;

fn snapshot(job: &JobId, epoch: u64, daemon: &str) -> SnapshotMeta {
    SnapshotMeta {
        id: ulid::Ulid::new().to_string(),
        job: job.clone(),
        epoch,
        ts: Ts { t: 1_000, i: 1 },
        n: 1,
        oplog_seq: 1,
        checksum: Checksum::default(),
        size_bytes: 3,
        taken_at_ms: now_ms(),
        slot_ms: None,
        daemon: Some(DaemonId::new(daemon).unwrap()),
    }
}

fn head(daemon: &str, epoch: u64, applied_seq: u64) -> HeadRecord {
    HeadRecord {
        daemon: DaemonId::new(daemon).unwrap(),
        epoch,
        applied_seq,
        n: applied_seq,
        ts: Ts { t: 1_000, i: 1 },
        checksum: Checksum::default(),
        at_ms: now_ms(),
    }
}

#[tokio::test]
async fn a_snapshot_from_an_older_epoch_is_refused_and_not_kept() -> Result<()> {
    let server = NatsServer::start().await?;
    let stores = Stores::open(server.connect().await?, 1).await?;
    let job = JobId::new("p/rs1")?;
    // The owner at epoch 1 stores a snapshot; the job moves (epoch 2).
    stores
        .put_snapshot(&snapshot(&job, 1, "old:/h/"), b"{}\n")
        .await?;
    assert_eq!(stores.fences.raise(&job, 2).await?, 2);
    let stale = stores
        .put_snapshot(&snapshot(&job, 1, "old:/h/"), b"{}\n")
        .await;
    assert!(matches!(stale, Err(StoreError::Fenced(_))), "{stale:?}");
    assert_eq!(stores.snapshots(Some(&job)).await?.len(), 1);
    // The new owner's go in; a fence never goes down.
    stores
        .put_snapshot(&snapshot(&job, 2, "new:/h/"), b"{}\n")
        .await?;
    assert_eq!(stores.fences.raise(&job, 1).await?, 2);
    assert_eq!(stores.snapshots(Some(&job)).await?.len(), 2);
    Ok(())
}

#[tokio::test]
async fn a_write_committed_after_the_fence_rose_is_refused() -> Result<()> {
    let server = NatsServer::start().await?;
    let stores = Stores::open(server.connect().await?, 1).await?;
    let job = JobId::new("p/rs2")?;
    stores.fences.raise(&job, 1).await?;
    // A writer reads the fence, is frozen, and the job moves meanwhile.
    let held = stores.fences.check(&job, 1).await?;
    stores.fences.raise(&job, 2).await?;
    let late = stores.fences.commit(&job, 1, held).await;
    assert!(
        matches!(
            late,
            Err(FenceError::Stale {
                epoch: 1,
                current: 2,
                ..
            })
        ),
        "{late:?}"
    );
    // The owner's commits go through however often the fence was touched.
    let held = stores.fences.check(&job, 2).await?;
    stores.fences.raise(&job, 2).await?;
    stores.fences.commit(&job, 2, held).await?;
    Ok(())
}

#[tokio::test]
async fn a_head_position_from_an_older_epoch_never_overwrites_the_new_owners() -> Result<()> {
    let server = NatsServer::start().await?;
    let stores = Stores::open(server.connect().await?, 1).await?;
    let job = JobId::new("p/rs3")?;
    stores.put_head(&job, &head("old:/h/", 1, 10)).await?;
    stores.put_head(&job, &head("old:/h/", 1, 11)).await?;
    // The new owner writes at epoch 2 before any fence was raised.
    stores.put_head(&job, &head("new:/h/", 2, 12)).await?;
    let stale = stores.put_head(&job, &head("old:/h/", 1, 99)).await;
    assert!(matches!(stale, Err(StoreError::Fenced(_))), "{stale:?}");
    let kept = stores.head(&job).await?.expect("a head record");
    assert_eq!(
        (kept.daemon.as_str(), kept.epoch, kept.applied_seq),
        ("new:/h/", 2, 12)
    );
    // And once the fence is at 3, epoch 2 is refused too, though the record says 2.
    stores.fences.raise(&job, 3).await?;
    let fenced = stores.put_head(&job, &head("new:/h/", 2, 13)).await;
    assert!(matches!(fenced, Err(StoreError::Fenced(_))), "{fenced:?}");
    Ok(())
}

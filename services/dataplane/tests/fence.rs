//! Fencing against a real nats-server: the snapshot store and the heads' positions refuse
//! a write whose epoch is older than the job's, and keep nothing of it.

use anyhow::Result;
use futures::StreamExt;
use handoff_dataplane::store::{HeadRecord, SnapshotMeta, StoreError, Stores};
use handoff_dataplane::{Checksum, Ts};
use handoff_domain::{DaemonId, JobId};
use handoff_eventlog::fence::{FenceError, Fences};
use handoff_protocol::now_ms;
use handoff_testkit::NatsServer;

/// The stores over `client`, the fences created first (as the command service does).
async fn stores(client: async_nats::Client) -> Result<Stores> {
    Fences::open(&async_nats::jetstream::new(client.clone()), 1).await?;
    Ok(Stores::open(client, 1).await?)
}

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
    let stores = stores(server.connect().await?).await?;
    let job = JobId::new("p/rs1")?;
    // The owner at epoch 1 stores a snapshot; the job moves (epoch 2).
    stores
        .put_snapshot(&snapshot(&job, 1, "old:/h/"), &mut &b"{}\n"[..])
        .await?;
    assert_eq!(stores.fences.raise(&job, 2).await?, 2);
    let stale = stores
        .put_snapshot(&snapshot(&job, 1, "old:/h/"), &mut &b"{}\n"[..])
        .await;
    assert!(matches!(stale, Err(StoreError::Fenced(_))), "{stale:?}");
    assert_eq!(stores.snapshots(Some(&job)).await?.len(), 1);
    // The new owner's go in; a fence never goes down.
    stores
        .put_snapshot(&snapshot(&job, 2, "new:/h/"), &mut &b"{}\n"[..])
        .await?;
    assert_eq!(stores.fences.raise(&job, 1).await?, 2);
    assert_eq!(stores.snapshots(Some(&job)).await?.len(), 2);
    Ok(())
}

#[tokio::test]
async fn a_write_committed_after_the_fence_rose_is_refused() -> Result<()> {
    let server = NatsServer::start().await?;
    let stores = stores(server.connect().await?).await?;
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
    let stores = stores(server.connect().await?).await?;
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

/// A daemon that lost a job and writes on (a frozen process thawed) has every write
/// refused, each one, and none stored even for a moment: a watch on the job's head
/// position sees only the new owner's, so a refused write is not one that went in and was
/// written over. Its snapshots are refused too and not kept.
#[tokio::test]
async fn every_write_of_the_old_owner_is_refused_not_written_over() -> Result<()> {
    let server = NatsServer::start().await?;
    let client = server.connect().await?;
    let stores = stores(client.clone()).await?;
    let job = JobId::new("p/rs4")?;
    stores.put_head(&job, &head("old:/h/", 1, 10)).await?;
    let mut writes = async_nats::jetstream::new(client)
        .get_key_value(handoff_eventlog::fence::BUCKET)
        .await?
        .watch(format!("head.{job}"))
        .await?;
    // The job moves: the command service raises the fence, the new owner writes.
    stores.fences.raise(&job, 2).await?;
    stores.put_head(&job, &head("new:/h/", 2, 11)).await?;
    let mut refused = 0;
    for seq in 12..17 {
        match stores.put_head(&job, &head("old:/h/", 1, seq)).await {
            Err(StoreError::Fenced(_)) => refused += 1,
            other => panic!("a stale head position was not refused: {other:?}"),
        }
        match stores
            .put_snapshot(&snapshot(&job, 1, "old:/h/"), &mut &b"{}\n"[..])
            .await
        {
            Err(StoreError::Fenced(_)) => refused += 1,
            other => panic!("a stale snapshot was not refused: {other:?}"),
        }
    }
    assert_eq!(refused, 10);
    assert!(stores.snapshots(Some(&job)).await?.is_empty());
    // A last write of the new owner's marks the end of what the watch must have seen.
    stores.put_head(&job, &head("new:/h/", 2, 99)).await?;
    let mut seen = Vec::new();
    while seen.last().is_none_or(|h: &HeadRecord| h.applied_seq != 99) {
        let entry = tokio::time::timeout(std::time::Duration::from_secs(10), writes.next())
            .await?
            .ok_or_else(|| anyhow::anyhow!("the watch ended"))??;
        seen.push(serde_json::from_slice::<HeadRecord>(&entry.value)?);
    }
    let stored: Vec<(&str, u64)> = seen
        .iter()
        .map(|h| (h.daemon.as_str(), h.applied_seq))
        .collect();
    assert_eq!(stored, [("new:/h/", 11), ("new:/h/", 99)]);
    Ok(())
}

/// A snapshot refused when it is committed (the job moved during the upload) is taken
/// back without a purge by a process that may not purge (a daemon): its index key is
/// marked deleted, and the agent's grooming removes the object and the marker.
#[tokio::test]
async fn a_snapshot_refused_after_its_upload_is_removed_by_the_agent_not_the_daemon() -> Result<()>
{
    let server = NatsServer::start().await?;
    let agent = stores(server.connect().await?).await?;
    let daemon = Stores::bind(server.connect().await?).await?;
    let watcher = server.connect().await?;
    let mut purges = watcher.subscribe("$JS.API.STREAM.PURGE.>").await?;
    watcher.flush().await?;
    let job = JobId::new("p/rs5")?;
    agent.fences.raise(&job, 1).await?;

    // The data comes through a pipe whose writer raises the fence before it ends.
    let (mut writer, mut reader) = tokio::io::duplex(64);
    let fences = agent.fences.clone();
    let moved = job.clone();
    let upload = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        writer.write_all(b"{}\n").await?;
        fences.raise(&moved, 2).await?;
        writer.shutdown().await?;
        anyhow::Ok(())
    });
    let meta = snapshot(&job, 1, "old:/h/");
    let refused = daemon.put_snapshot(&meta, &mut reader).await;
    upload.await??;
    assert!(matches!(refused, Err(StoreError::Fenced(_))), "{refused:?}");
    watcher.flush().await?;
    let mut sent = 0;
    while let Ok(Some(_)) =
        tokio::time::timeout(std::time::Duration::from_millis(1), purges.next()).await
    {
        sent += 1;
    }
    assert_eq!(sent, 0, "the daemon asked for a purge");
    assert!(!agent.snapshots.info(meta.object_name()).await?.deleted);
    let (listed, taken_back) = agent.groomed_snapshots(&job).await?;
    assert!(listed.is_empty(), "{listed:?}");
    assert_eq!(taken_back, std::slice::from_ref(&meta.id));

    // The daemon cannot clear it; the agent's grooming does, and leaves nothing behind.
    assert_eq!(daemon.clear_taken_back(&job, &taken_back).await?, 0);
    let creds = handoff_protocol::auth::Credentials::generate(
        handoff_domain::Actor::new("handoff-agent")?,
        None,
    );
    let client = handoff_client::Client::new(agent.client.clone(), creds, "handoff-agent");
    let settings = agent.settings().await?;
    handoff_dataplane::groom::groom(&agent, &client, &settings, &job, None, &[]).await?;
    // Nothing left behind: not even the deleted object's metadata.
    assert!(agent.snapshots.info(meta.object_name()).await.is_err());
    let (listed, taken_back) = agent.groomed_snapshots(&job).await?;
    assert!(listed.is_empty() && taken_back.is_empty(), "{taken_back:?}");

    // A mark on a snapshot the fence allows is not taken at its word: listed again.
    let good = snapshot(&job, 2, "new:/h/");
    daemon.put_snapshot(&good, &mut &b"{}\n"[..]).await?;
    let key = handoff_protocol::dataplane::snapshot_key(&job, &good.id);
    daemon.snapshot_index.delete(key).await?;
    assert!(agent.snapshots(Some(&job)).await?.is_empty());
    handoff_dataplane::groom::groom(&agent, &client, &settings, &job, None, &[]).await?;
    assert_eq!(
        agent.snapshots(Some(&job)).await?,
        std::slice::from_ref(&good)
    );
    assert!(!agent.snapshots.info(good.object_name()).await?.deleted);
    Ok(())
}

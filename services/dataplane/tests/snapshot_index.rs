//! A job's snapshots are listed from the snapshot index, by that job's keys only: never
//! a read of the whole snapshot store. A deleted snapshot leaves nothing behind in the
//! index or the store's metadata (no marker that would pile up over the years).

use anyhow::Result;
use async_nats::jetstream;
use futures::TryStreamExt;
use handoff_dataplane::store::{SnapshotMeta, StoreError, Stores};
use handoff_dataplane::{snapshot, Checksum, Ts};
use handoff_domain::JobId;
use handoff_protocol::dataplane::{
    kv_stream, object_stream, snapshot_key, SNAPSHOT_BUCKET, SNAPSHOT_INDEX_BUCKET,
};
use handoff_protocol::now_ms;
use handoff_testkit::NatsServer;

fn meta(job: &JobId, t: u32) -> SnapshotMeta {
    SnapshotMeta {
        id: ulid::Ulid::new().to_string(),
        job: job.clone(),
        epoch: 1,
        ts: Ts { t, i: 1 },
        n: 1,
        oplog_seq: 0,
        checksum: Checksum::default(),
        size_bytes: 0,
        taken_at_ms: now_ms(),
        slot_ms: None,
        daemon: None,
    }
}

async fn store(stores: &Stores, job: &JobId, t: u32) -> Result<SnapshotMeta> {
    let m = meta(job, t);
    let mut data = Vec::new();
    snapshot::write_line(&mut data, "a", b"{}");
    stores
        .put_snapshot_unfenced(&m, &mut data.as_slice())
        .await?;
    Ok(m)
}

fn ids(list: &[SnapshotMeta]) -> Vec<&str> {
    list.iter().map(|m| m.id.as_str()).collect()
}

/// Messages the stream `stream` holds on `subject`.
async fn held(js: &jetstream::Context, stream: &str, subject: &str) -> Result<u64> {
    let s = js.get_stream(stream).await?;
    let info = s
        .info_with_subjects(subject)
        .await?
        .try_collect::<std::collections::HashMap<_, _>>()
        .await?;
    Ok(info.values().sum::<usize>() as u64)
}

#[tokio::test]
async fn a_jobs_snapshots_are_listed_from_its_index_keys_only() -> Result<()> {
    let server = NatsServer::start().await?;
    let client = server.connect().await?;
    let js = jetstream::new(client.clone());
    handoff_eventlog::fence::Fences::open(&js, 1).await?;
    let stores = Stores::open(client, 1).await?;

    let rs = JobId::new("p/rs")?;
    let shard = JobId::new("p/cluster/shard0")?;
    let config = JobId::new("p/cluster/config")?;
    let other = JobId::new("q/rs")?;
    let newer = store(&stores, &rs, 20).await?;
    let older = store(&stores, &rs, 10).await?;
    let s0 = store(&stores, &shard, 5).await?;
    let c0 = store(&stores, &config, 6).await?;
    let q = store(&stores, &other, 7).await?;

    // One job's, oldest first; a cluster's, its shards' and config servers'.
    assert_eq!(
        ids(&stores.snapshots(Some(&rs)).await?),
        [&older.id, &newer.id]
    );
    assert_eq!(
        ids(&stores.snapshots_in("p/cluster").await?),
        [&s0.id, &c0.id]
    );
    assert_eq!(ids(&stores.snapshots_in("q").await?), [&q.id]);
    assert_eq!(stores.snapshots(None).await?.len(), 5);
    assert!(stores
        .snapshots(Some(&JobId::new("p/none")?))
        .await?
        .is_empty());

    // The listing is the index's: an object the index does not name is not listed.
    stores
        .snapshot_index
        .purge(snapshot_key(&rs, &older.id))
        .await?;
    assert_eq!(ids(&stores.snapshots(Some(&rs)).await?), [&newer.id]);

    // A scope that is not one is refused, never a wildcard.
    for bad in ["p.*", ">", "p/*", "", "a/b/c/d", "p//rs"] {
        match stores.snapshots_in(bad).await {
            Err(StoreError::Invalid(reason)) => {
                assert!(reason.contains("not a job"), "{bad}: {reason}")
            }
            other => panic!("{bad:?}: {other:?}"),
        }
    }

    // Deleted (as the agent does), nothing of it is left in either stream.
    stores.delete_snapshot(&newer).await?;
    assert!(stores.snapshots(Some(&rs)).await?.is_empty());
    let entry = format!(
        "$KV.{SNAPSHOT_INDEX_BUCKET}.{}",
        snapshot_key(&rs, &newer.id)
    );
    assert_eq!(
        held(&js, &kv_stream(SNAPSHOT_INDEX_BUCKET), &entry).await?,
        0
    );
    assert_eq!(
        held(
            &js,
            &object_stream(SNAPSHOT_BUCKET),
            &format!("$O.{SNAPSHOT_BUCKET}.M.>")
        )
        .await?,
        4,
        "the deleted object's metadata stayed behind"
    );
    Ok(())
}

/// Snapshots stored before the index existed are indexed once, by the agent at start:
/// then listed like any other.
#[tokio::test]
async fn snapshots_stored_before_the_index_are_indexed_once() -> Result<()> {
    let server = NatsServer::start().await?;
    let client = server.connect().await?;
    let js = jetstream::new(client.clone());
    handoff_eventlog::fence::Fences::open(&js, 1).await?;
    let stores = Stores::open(client.clone(), 1).await?;
    let job = JobId::new("p/rs")?;

    // An object as an earlier version stored it: the metadata on the object only.
    let old = meta(&job, 1);
    let mut metadata = std::collections::HashMap::new();
    metadata.insert(
        handoff_protocol::dataplane::SNAPSHOT_META_KEY.to_owned(),
        serde_json::to_string(&old)?,
    );
    let object = async_nats::jetstream::object_store::ObjectMetadata {
        name: old.object_name(),
        metadata,
        ..Default::default()
    };
    stores.snapshots.put(object, &mut &b"{}\n"[..]).await?;
    let new = store(&stores, &job, 2).await?;
    assert_eq!(ids(&stores.snapshots(Some(&job)).await?), [&new.id]);

    assert_eq!(stores.index_unindexed().await?, 2);
    assert_eq!(
        ids(&stores.snapshots(Some(&job)).await?),
        [&old.id, &new.id]
    );
    assert_eq!(stores.index_unindexed().await?, 0, "indexed once");

    // A process that may not purge (a daemon taking back a snapshot) still unlists it.
    let bound = Stores::bind(client).await?;
    bound.delete_snapshot(&old).await.ok();
    assert_eq!(ids(&stores.snapshots(Some(&job)).await?), [&new.id]);
    Ok(())
}

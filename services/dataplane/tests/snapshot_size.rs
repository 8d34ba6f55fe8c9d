//! A snapshot's size in its metadata is a claim, written by whoever stored it: it never
//! sizes an allocation. A snapshot whose metadata claims 2^64 - 1 bytes (or any other
//! wrong size) restores like any other, into a head and into a file.

use anyhow::Result;
use handoff_dataplane::head::{HeadMeta, HeadStatus, Heads};
use handoff_dataplane::rebuild::{restore_snapshot, Outcome, Quiet};
use handoff_dataplane::restore::{self, Target};
use handoff_dataplane::store::{SnapshotMeta, Stores};
use handoff_dataplane::{snapshot, Checksum, Ts};
use handoff_domain::JobId;
use handoff_protocol::now_ms;
use handoff_testkit::NatsServer;

/// Stores a snapshot of three documents whose metadata claims `claimed` bytes.
async fn store_claiming(stores: &Stores, job: &JobId, claimed: u64) -> Result<SnapshotMeta> {
    let mut data = Vec::new();
    let mut checksum = Checksum::default();
    for (id, doc) in [("a", "{\"n\":1}"), ("b", "{\"n\":2}"), ("c", "{\"n\":3}")] {
        snapshot::write_line(&mut data, id, doc.as_bytes());
        checksum.insert(id, doc.as_bytes());
    }
    let meta = SnapshotMeta {
        id: ulid::Ulid::new().to_string(),
        job: job.clone(),
        epoch: 1,
        ts: Ts { t: 1_000, i: 1 },
        n: 3,
        oplog_seq: 0,
        checksum,
        size_bytes: claimed,
        taken_at_ms: now_ms(),
        slot_ms: None,
        daemon: None,
    };
    stores
        .put_snapshot_unfenced(&meta, &mut data.as_slice())
        .await?;
    Ok(meta)
}

#[tokio::test]
async fn a_snapshot_claiming_any_size_restores_without_allocating_it() -> Result<()> {
    let server = NatsServer::start().await?;
    let client = server.connect().await?;
    // The fences are the command service's; the agent's stores bind to them.
    handoff_eventlog::fence::Fences::open(&async_nats::jetstream::new(client.clone()), 1).await?;
    let stores = Stores::open(client, 1).await?;
    let dir = tempfile::tempdir()?;
    let heads = Heads::open(&dir.path().join("heads"))?;
    for (n, claimed) in [u64::MAX, 1 << 62, 0].into_iter().enumerate() {
        let job = JobId::new(format!("p/rs{n}"))?;
        store_claiming(&stores, &job, claimed).await?;
        // As a daemon and a restore see it: from the store's listing.
        let listed = stores.snapshots(Some(&job)).await?;
        assert_eq!(listed[0].size_bytes, claimed);

        let data = stores.read_snapshot(&listed[0]).await?;
        assert_eq!(data.iter().filter(|b| **b == b'\n').count(), 3);

        let head = heads.head(&job)?;
        let mut meta = HeadMeta::new(job.clone(), 1, HeadStatus::Building);
        let outcome = restore_snapshot(&stores, &head, &mut meta, &listed[0], &mut Quiet).await?;
        assert_eq!(outcome, Outcome::Done, "claimed {claimed}");
        assert_eq!(meta.checksum, listed[0].checksum);

        let out = dir.path().join(format!("restored{n}"));
        let restored = restore::restore(
            &stores,
            job.as_str(),
            &Target::Snapshot(listed[0].id.clone()),
            &out,
        )
        .await?;
        assert_eq!(restored[0].documents, 3);
        // Gathered on disk while it ran, and nothing of that left once written.
        let job_dir = out.join(job.as_str().replace('/', "__"));
        assert!(job_dir.join("documents.jsonl").exists());
        assert!(
            !job_dir.join(".restoring").exists(),
            "the work store stayed"
        );
    }
    Ok(())
}

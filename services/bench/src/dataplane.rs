//! (d) Rebuild throughput and (e) rebuild time against data size.
//!
//! A job's data is written the way the agent writes it: an initial snapshot in the
//! snapshot store and oplog slices in the oplog store. handoff's rebuild is the daemon's
//! own code (`rebuild::restore_snapshot` then `rebuild::replay` into a sled head, every
//! entry checked against the source's checksum). The raw limit reads the same object and
//! the same messages and applies the same documents to sled with the least work that can
//! apply them: split the lines, parse each line's id and document, batch into sled.

use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use handoff_dataplane::head::{HeadMeta, HeadStatus, Heads};
use handoff_dataplane::oplog::Ts;
use handoff_dataplane::rebuild::{self, Outcome, Quiet};
use handoff_dataplane::source::sim::{Config, Sim};
use handoff_dataplane::store::{SnapshotMeta, Stores};
use handoff_domain::JobId;
use handoff_natsd::NatsProcess;
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::io::AsyncReadExt;

/// One measured rebuild: time to restore the snapshot and to replay the oplog.
#[derive(Clone, Copy, Debug)]
pub struct Times {
    pub restore: Duration,
    pub replay: Duration,
}

impl Times {
    pub fn total(&self) -> Duration {
        self.restore + self.replay
    }
}

/// What was written for one data size.
pub struct Data {
    pub snapshot_bytes: u64,
    pub entries: u64,
    pub ours: Times,
    pub raw: Times,
}

/// Writes a job of `initial` bytes with `entries` oplog entries after its snapshot on a
/// fresh server, then measures both rebuilds (median of `runs`).
pub async fn measure(initial: u64, entries: u64, runs: usize) -> Result<Data> {
    let bin = handoff_natsd::find_binary(&[
        std::env::current_dir()?,
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")),
    ])?;
    let dir = tempfile::tempdir()?;
    let mut nats = NatsProcess::start(bin, dir.path(), None).await?;
    let client = async_nats::connect(nats.url()).await?;
    // The fences are the command service's; the agent's stores bind to them.
    handoff_eventlog::fence::Fences::open(&jetstream::new(client.clone()), 1).await?;
    let stores = Stores::open(client.clone(), 1).await?;
    let job = JobId::new("bench/rs").expect("valid");
    let mut source = Sim::new(&Config {
        seed: initial ^ entries,
        initial_bytes: initial,
        doc_bytes: 256,
        ..Config::default()
    });
    let mut data = Vec::new();
    for (id, doc) in source.documents() {
        handoff_dataplane::snapshot::write_line(&mut data, id, doc.as_bytes());
    }
    let snapshot = SnapshotMeta {
        id: ulid::Ulid::new().to_string(),
        job: job.clone(),
        epoch: 1,
        ts: Ts { t: 1_000_000, i: 0 },
        n: 0,
        oplog_seq: 0,
        checksum: source.checksum(),
        size_bytes: data.len() as u64,
        taken_at_ms: handoff_protocol::now_ms(),
        slot_ms: None,
        daemon: None,
    };
    stores.put_snapshot(&snapshot, &mut data.as_slice()).await?;
    // The oplog, in messages of at most 512 KiB, published pipelined.
    let js = jetstream::new(client.clone());
    let subject = handoff_protocol::subjects::oplog(&job);
    let mut acks = Vec::new();
    let mut buf = Vec::new();
    for k in 0..entries {
        let ts = Ts {
            t: 1_000_001 + (k / 1000) as u32,
            i: (k % 1000) as u32 + 1,
        };
        source.step(ts, &mut buf);
        if buf.len() >= handoff_protocol::dataplane::MAX_MESSAGE_BYTES || k + 1 == entries {
            acks.push(
                js.publish(subject.clone(), std::mem::take(&mut buf).into())
                    .await?,
            );
        }
    }
    for a in acks {
        a.await?;
    }
    let (mut ours, mut raw) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        raw.push(raw_rebuild(&stores, &job, &snapshot, entries).await?);
        ours.push(our_rebuild(&stores, &job, &snapshot, source.checksum()).await?);
    }
    nats.kill();
    let median = |v: &mut Vec<Times>| {
        v.sort_by_key(Times::total);
        v[v.len() / 2]
    };
    Ok(Data {
        snapshot_bytes: data.len() as u64,
        entries,
        ours: median(&mut ours),
        raw: median(&mut raw),
    })
}

async fn our_rebuild(
    stores: &Stores,
    job: &JobId,
    snapshot: &SnapshotMeta,
    expected: handoff_dataplane::Checksum,
) -> Result<Times> {
    let dir = tempfile::tempdir()?;
    let heads = Heads::open(dir.path())?;
    let head = heads.head(job)?;
    let mut meta = HeadMeta::new(job.clone(), 1, HeadStatus::Building);
    let t = Instant::now();
    let outcome = rebuild::restore_snapshot(stores, &head, &mut meta, snapshot, &mut Quiet).await?;
    let restore = t.elapsed();
    if outcome != Outcome::Done {
        bail!("restore: {outcome:?}");
    }
    let (_tx, mut rx) = tokio::sync::watch::channel(false);
    let t = Instant::now();
    let outcome = rebuild::replay(stores, job, &head, &mut meta, &mut rx, &mut Quiet).await?;
    heads.flush().await?;
    let replay = t.elapsed();
    if outcome != Outcome::Done || meta.checksum != expected {
        bail!(
            "replay: {outcome:?}, checksum {} expected {expected}",
            meta.checksum
        );
    }
    Ok(Times { restore, replay })
}

#[derive(Deserialize)]
struct Line<'a> {
    id: &'a str,
    #[serde(borrow)]
    doc: &'a RawValue,
}

#[derive(Deserialize)]
struct RawEntry<'a> {
    id: &'a str,
    #[serde(borrow, default)]
    doc: Option<&'a RawValue>,
}

async fn raw_rebuild(
    stores: &Stores,
    job: &JobId,
    snapshot: &SnapshotMeta,
    entries: u64,
) -> Result<Times> {
    let dir = tempfile::tempdir()?;
    let db = sled::open(dir.path())?;
    let tree = db.open_tree("raw")?;
    let t = Instant::now();
    let mut object = stores.snapshots.get(snapshot.object_name()).await?;
    let mut data = Vec::new();
    object.read_to_end(&mut data).await?;
    let mut batch = sled::Batch::default();
    let mut n = 0;
    for line in data.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        let l: Line<'_> = serde_json::from_slice(line)?;
        batch.insert(l.id.as_bytes(), l.doc.get().as_bytes());
        n += 1;
        if n % 4096 == 0 {
            tree.apply_batch(std::mem::take(&mut batch))?;
        }
    }
    tree.apply_batch(batch)?;
    let restore = t.elapsed();
    let t = Instant::now();
    let stream = stores.oplog.clone();
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: handoff_protocol::subjects::oplog(job),
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    let mut seen = 0;
    while seen < entries {
        let m = messages.next().await.context("the raw read ended")??;
        let mut batch = sled::Batch::default();
        for line in m.payload.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let e: RawEntry<'_> = serde_json::from_slice(line)?;
            match e.doc {
                Some(doc) => batch.insert(e.id.as_bytes(), doc.get().as_bytes()),
                None => batch.remove(e.id.as_bytes()),
            }
            seen += 1;
        }
        tree.apply_batch(batch)?;
    }
    db.flush_async().await?;
    let replay = t.elapsed();
    Ok(Times { restore, replay })
}

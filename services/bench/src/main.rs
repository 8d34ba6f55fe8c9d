//! `scripts/bench`: handoff against the raw limits of the same nats-server and sled, in
//! the same run, printing both and their ratio.
//!
//! - (a) MoveJobs of 1,000 jobs, request to durable reply, against a raw pipelined
//!   JetStream publish of the same 1,003 payloads (target: within 2x).
//! - (b) MoveJob of one job, request to reply, median and p99 over 1,000, each against an
//!   awaited atomic batch of the very messages it appended, into a stream holding the same
//!   history (the server's own cost of the write; target: within 1.25x at p50); also
//!   printed: moves back to back, an awaited publish of as many bytes, and a bare
//!   request-reply round trip through the same server (what any request through a service
//!   adds).
//! - (c) A projector rebuild over 200,000 events against a raw ordered read of the same
//!   events applied to sled in batches of 1,000 (target: at least 85% of its rate); also
//!   printed: the views the rebuild wrote, by kind, and how long the view store takes to
//!   commit exactly those keys alone, in key order, with nothing read or folded.
//! - (d) A daemon's rebuild of a head (snapshot restored, then oplog replayed) against a
//!   raw read of the same object and messages applied to sled (target: at least 70%).
//! - (e) Rebuild time for three data sizes: it must grow about linearly.
//! - (f) A fleet of 1,000 daemons and 100,000 jobs and a history past 1,000,000 events:
//!   list queries, MoveJobs, a failover decision, restart time and memory (`fleet`).
//!
//! Each benchmark runs on a fresh nats-server with `sync_interval: always`, as the tests
//! and the local stack do.
//!
//! # Layout
//! - this file: the benchmarks (a) and (c) and the shared [`Bench`] setup.
//! - `dataplane`: the data plane's benchmarks (d) and (e).
//! - `fleet`: (f).
//! - `soak`: (g).
//! - `process`: a `handoff` service as a process of its own, and its memory from /proc.
//! - `single`: (b).

mod dataplane;
mod fleet;
mod process;
mod single;
mod soak;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use async_nats::jetstream::{self, stream};
use futures::StreamExt;
use handoff_client::{new_command_id, Client, Retry};
use handoff_domain::command::*;
use handoff_domain::ids::DeploymentName;
use handoff_domain::model::{DaemonSettings, Deployment, JobSize, Shard};
use handoff_domain::{Actor, Command, DaemonId, JobId, ProjectId};
use handoff_natsd::NatsProcess;
use handoff_protocol::auth::Credentials;
use handoff_protocol::Applied;
use tokio::sync::oneshot;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const RUNS: usize = 5;
const REBUILD_EVENTS: u64 = 200_000;

/// A fresh nats-server and a command service.
struct Bench {
    nats: NatsProcess,
    _dir: tempfile::TempDir,
    client: async_nats::Client,
    stop: Option<oneshot::Sender<()>>,
    /// Signs as the first owner: every command is signed, as in production.
    commands: Client,
}

impl Bench {
    async fn start() -> Result<Self> {
        Self::start_with(handoff_command::Config::default()).await
    }

    /// With the command service's `config` (its first owner set here).
    async fn start_with(config: handoff_command::Config) -> Result<Self> {
        let bin = handoff_natsd::find_binary(&[
            std::env::current_dir()?,
            PathBuf::from(env!("CARGO_MANIFEST_DIR")),
        ])?;
        let dir = tempfile::tempdir()?;
        let nats = NatsProcess::start(bin, dir.path(), None).await?;
        let client = async_nats::connect(nats.url()).await?;
        let owner = Credentials::generate(Actor::new("bench")?, None);
        let config = handoff_command::Config {
            bootstrap_owner: Some((owner.user.clone(), owner.public_key())),
            ..config
        };
        let service =
            handoff_command::start(async_nats::connect(nats.url()).await?, config).await?;
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(service.run(async {
            let _ = stopped.await;
        }));
        let commands = Client::new(client.clone(), owner, "handoff-bench")
            .with_retry(Retry::once(Duration::from_secs(30)));
        Ok(Bench {
            nats,
            _dir: dir,
            client,
            stop: Some(stop),
            commands,
        })
    }

    async fn send(&self, command: &Command) -> Result<Applied> {
        self.commands
            .send(&new_command_id(), command)
            .await
            .map_err(|e| anyhow::anyhow!("{} refused: {e}", command.name()))
    }

    /// A raw stream with the event stream's settings, for the baselines.
    async fn raw_stream(&self) -> Result<stream::Stream> {
        let js = jetstream::new(self.client.clone());
        Ok(js
            .create_stream(stream::Config {
                name: "RAW".into(),
                subjects: vec!["raw.>".into()],
                storage: stream::StorageType::File,
                duplicate_window: Duration::from_secs(120),
                allow_atomic_publish: true,
                ..Default::default()
            })
            .await?)
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.nats.kill();
    }
}

fn daemon(name: &str) -> DaemonId {
    DaemonId::new(format!("{name}.bench:/heads/")).expect("valid")
}

/// Daemon `src` with `clusters` x 250 jobs of project `project`, then an empty `dst`.
async fn fleet(
    b: &Bench,
    project: &str,
    src: &DaemonId,
    dst: &DaemonId,
    clusters: usize,
) -> Result<Vec<JobId>> {
    let settings = DaemonSettings {
        head_space_bytes: 1 << 50,
        num_workers: 8,
        ..DaemonSettings::default()
    };
    b.send(&Command::RegisterDaemon(RegisterDaemon {
        daemon: src.clone(),
        settings: settings.clone(),
    }))
    .await?;
    let p = ProjectId::new(project)?;
    b.send(&Command::ConfigureProject(ConfigureProject {
        project: p.clone(),
        daemon_filter: vec![src.clone(), dst.clone()],
        label_filter: vec![],
    }))
    .await?;
    let size = JobSize {
        head_size_bytes: 1 << 30,
        oplog_bytes_per_hour: 1 << 20,
    };
    let mut jobs = Vec::new();
    for c in 0..clusters {
        let name = DeploymentName::new(format!("cluster{c}"))?;
        let shards: Vec<Shard> = (0..249)
            .map(|s| Shard {
                name: DeploymentName::new(format!("shard{s}")).expect("valid"),
                size,
            })
            .collect();
        for s in &shards {
            jobs.push(JobId::of(&p, &name, Some(s.name.as_str())));
        }
        jobs.push(JobId::of(&p, &name, Some("config")));
        b.send(&Command::CreateBackupJobs(CreateBackupJobs {
            project: p.clone(),
            deployment: Deployment::ShardedCluster {
                name,
                shards,
                config_servers: size,
            },
        }))
        .await?;
    }
    b.send(&Command::RegisterDaemon(RegisterDaemon {
        daemon: dst.clone(),
        settings,
    }))
    .await?;
    Ok(jobs)
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn p99(v: &mut [Duration]) -> Duration {
    v.sort();
    v[(v.len() * 99 / 100).min(v.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

/// (a) MoveJobs of 1,000 jobs against a pipelined publish of the same payloads.
async fn move_jobs() -> Result<(Duration, Duration)> {
    let b = Bench::start().await?;
    let raw = b.raw_stream().await?;
    let js = jetstream::new(b.client.clone());
    let events = handoff_eventlog::EventLog::attach(b.client.clone(), Default::default()).await?;
    let (mut ours, mut base) = (Vec::new(), Vec::new());
    for run in 0..RUNS {
        let (src, dst) = (daemon(&format!("src{run}")), daemon(&format!("dst{run}")));
        let jobs = fleet(&b, &format!("p{run}"), &src, &dst, 4).await?;
        assert_eq!(jobs.len(), 1000);
        let t = Instant::now();
        let applied = b
            .send(&Command::MoveJobs(MoveJobs {
                from: src,
                to: dst,
                reason: None,
                dry_run: false,
            }))
            .await?;
        ours.push(t.elapsed());
        // The same payloads, published raw and pipelined.
        let stream = js.get_stream(events.stream_name()).await?;
        let mut payloads = Vec::new();
        for e in &applied.events {
            payloads.push(stream.get_raw_message(e.seq).await?.payload);
        }
        let t = Instant::now();
        let mut acks = Vec::with_capacity(payloads.len());
        for (i, p) in payloads.into_iter().enumerate() {
            acks.push(js.publish(format!("raw.{run}.{i}"), p).await?);
        }
        for a in acks {
            a.await?;
        }
        base.push(t.elapsed());
    }
    drop(raw);
    Ok((median(&mut ours), median(&mut base)))
}

/// Appends about `target` events through the command service: fleets of 1,000 jobs, each
/// then moved.
async fn fill(b: &Bench, target: u64) -> Result<u64> {
    let log = handoff_eventlog::EventLog::attach(b.client.clone(), Default::default()).await?;
    let mut n = 0;
    while log.last_sequence().await? < target {
        let (src, dst) = (daemon(&format!("fs{n}")), daemon(&format!("fd{n}")));
        fleet(b, &format!("fill{n}"), &src, &dst, 4).await?;
        b.send(&Command::MoveJobs(MoveJobs {
            from: src,
            to: dst,
            reason: Some("bench".into()),
            dry_run: false,
        }))
        .await?;
        n += 1;
    }
    Ok(log.last_sequence().await?)
}

/// How many keys each commit of the views alone holds: about what a rebuild's batch of
/// 1,000 events writes (a rebuild over 202,001 events wrote 815,886 keys, counted once).
const VIEWS_BATCH_KEYS: usize = 4_000;

/// What a rebuild wrote: the views' keys by kind and their bytes, and how long the
/// projector's own store takes to commit exactly those keys alone into a fresh store, in
/// key order, [`VIEWS_BATCH_KEYS`] a batch, with nothing read from the stream and nothing
/// folded.
struct ViewsAlone {
    kinds: BTreeMap<String, u64>,
    bytes: u64,
    write: Duration,
}

/// A key's kind: its first part, and the second for an index or a counter.
fn kind(key: &[u8]) -> String {
    let mut parts = key.split(|b| *b == 0);
    let first = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    match first.as_str() {
        "ix" | "n" => format!(
            "{first}/{}",
            String::from_utf8_lossy(parts.next().unwrap_or_default())
        ),
        _ => first,
    }
}

/// Opens a store the projector has just closed: sled may hold its file lock a moment
/// after its last handle is dropped.
async fn reopen(dir: &std::path::Path) -> Result<handoff_projector::SledStore> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match handoff_projector::SledStore::open(dir) {
            Ok(store) => return Ok(store),
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

async fn views_alone(dir: &std::path::Path) -> Result<ViewsAlone> {
    use handoff_projector::ViewStore as _;
    let (mut kinds, mut bytes) = (BTreeMap::<String, u64>::new(), 0);
    let views = reopen(dir).await?;
    let checkpoint = views.checkpoint()?;
    let mut entries = Vec::new();
    for kv in views.range(&[], None, false) {
        let (k, v) = kv?;
        *kinds.entry(kind(&k)).or_default() += 1;
        bytes += (k.len() + v.len()) as u64;
        entries.push((k, Some(v)));
    }
    drop(views);
    let batches: Vec<Vec<_>> = entries
        .chunks(VIEWS_BATCH_KEYS)
        .map(|c| c.to_vec())
        .collect();
    drop(entries);
    let (last, target) = (batches.len(), tempfile::tempdir()?);
    let t = Instant::now();
    let store = handoff_projector::SledStore::open(target.path())?;
    for (n, batch) in batches.into_iter().enumerate() {
        // Each commit writes a checkpoint too: the rebuild's own, with the last.
        let at = if n + 1 == last { checkpoint } else { 0 };
        store.commit(batch, at)?;
    }
    store.flush()?;
    Ok(ViewsAlone {
        kinds,
        bytes,
        write: t.elapsed(),
    })
}

/// (c) A projector rebuild against an ordered read applied raw to sled.
async fn rebuild() -> Result<(u64, Duration, Duration, ViewsAlone)> {
    let b = Bench::start().await?;
    let t = Instant::now();
    let events = fill(&b, REBUILD_EVENTS).await?;
    eprintln!(
        "  (appended {events} events in {:.1} s)",
        t.elapsed().as_secs_f64()
    );
    let (mut ours, mut base) = (Vec::new(), Vec::new());
    let mut alone = Vec::new();
    for run in 0..3 {
        // Raw: every event read in order and applied to sled, 1,000 per batch.
        let dir = tempfile::tempdir()?;
        let t = Instant::now();
        let db = sled::open(dir.path())?;
        let js = jetstream::new(b.client.clone());
        let stream = js.get_stream(handoff_protocol::subjects::STREAM).await?;
        let consumer = stream
            .create_consumer(jetstream::consumer::pull::OrderedConfig::default())
            .await?;
        let mut messages = consumer.messages().await?.ready_chunks(1000);
        let mut seen = 0u64;
        while seen < events {
            let chunk = messages.next().await.context("the raw read ended")?;
            let mut batch = sled::Batch::default();
            for m in chunk {
                let m = m?;
                let seq = m
                    .info()
                    .map_err(|e| anyhow::anyhow!("{e}"))?
                    .stream_sequence;
                batch.insert(&seq.to_be_bytes(), m.payload.as_ref());
                seen = seq;
            }
            db.apply_batch(batch)?;
        }
        db.flush()?;
        base.push(t.elapsed());

        // handoff: the projector rebuilding its views from the stream.
        let dir = tempfile::tempdir()?;
        let mut config = handoff_projector::Config::new(dir.path());
        config.name = format!("bench{run}");
        config.rebuild = true;
        config.serve_queries = false;
        let t = Instant::now();
        let projector = handoff_projector::start(b.client.clone(), config).await?;
        let at = projector.run_until_caught_up().await?;
        ours.push(t.elapsed());
        if at < events {
            bail!("the projector stopped at {at} of {events}");
        }
        alone.push(views_alone(dir.path()).await?);
    }
    alone.sort_by_key(|a| a.write);
    let alone = alone.swap_remove(alone.len() / 2);
    Ok((events, median(&mut ours), median(&mut base), alone))
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "MISSED"
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    // `handoff-bench b c` runs only those; no argument runs all.
    let only: Vec<String> = std::env::args().skip(1).collect();
    let run = |name: &str| only.is_empty() || only.iter().any(|o| o == name);
    println!("handoff benchmarks (nats-server with sync_interval: always; medians of {RUNS} runs unless said)\n");
    if run("a") {
        bench_a().await?;
    }
    if run("b") {
        single::bench_b().await?;
    }
    if run("c") {
        bench_c().await?;
    }
    if run("d") || run("e") {
        bench_de(run("d"), run("e")).await?;
    }
    if run("f") {
        fleet::run().await.context("benchmark (f)")?;
    }
    // The soak takes ten minutes: only when asked for.
    if only.iter().any(|o| o == "g") {
        soak::run().await.context("benchmark (g)")?;
    }
    Ok(())
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

async fn bench_de(d: bool, e: bool) -> Result<()> {
    // Sizes: initial data and the oplog written after the snapshot grow together.
    let sizes = [
        (8u64 << 20, 40_000u64),
        (16 << 20, 80_000),
        (32 << 20, 160_000),
    ];
    let mut results = Vec::new();
    for (initial, entries) in sizes {
        if !e && initial != sizes[2].0 {
            continue;
        }
        results.push(
            dataplane::measure(initial, entries, 3)
                .await
                .context("benchmark (d/e)")?,
        );
    }
    if d {
        let big = results.last().expect("the largest size was measured");
        let mbs = |t: Duration| mib(big.snapshot_bytes) / t.as_secs_f64();
        let eps = |t: Duration| big.entries as f64 / t.as_secs_f64();
        let restore_share = big.raw.restore.as_secs_f64() / big.ours.restore.as_secs_f64();
        let replay_share = big.raw.replay.as_secs_f64() / big.ours.replay.as_secs_f64();
        let total_share = big.raw.total().as_secs_f64() / big.ours.total().as_secs_f64();
        println!(
            "(d) rebuild of a head: {:.1} MiB snapshot + {} oplog entries (median of 3)",
            mib(big.snapshot_bytes),
            big.entries
        );
        println!(
            "    snapshot restore: handoff {:.1} MB/s   raw object read + sled {:.1} MB/s   {:.0}% of raw   target >= 70%: {}",
            mbs(big.ours.restore),
            mbs(big.raw.restore),
            restore_share * 100.0,
            verdict(restore_share >= 0.7)
        );
        println!(
            "    oplog replay:     handoff {:.0} entries/s   raw ordered read + sled {:.0} entries/s   {:.0}% of raw   target >= 70%: {}",
            eps(big.ours.replay),
            eps(big.raw.replay),
            replay_share * 100.0,
            verdict(replay_share >= 0.7)
        );
        println!(
            "    whole rebuild:    handoff {}   raw {}   {:.0}% of raw   target >= 70%: {}\n",
            ms(big.ours.total()),
            ms(big.raw.total()),
            total_share * 100.0,
            verdict(total_share >= 0.7)
        );
    }
    if e && results.len() == 3 {
        println!("(e) rebuild time against data size (median of 3)");
        for r in &results {
            println!(
                "    {:>5.1} MiB snapshot + {:>6} entries: {}  ({:.1} ms per MiB of snapshot)",
                mib(r.snapshot_bytes),
                r.entries,
                ms(r.ours.total()),
                r.ours.total().as_secs_f64() * 1000.0 / mib(r.snapshot_bytes)
            );
        }
        let growth = results[2].ours.total().as_secs_f64() / results[0].ours.total().as_secs_f64();
        let size = results[2].snapshot_bytes as f64 / results[0].snapshot_bytes as f64;
        println!(
            "    4x the data took {growth:.2}x the time (linear: {size:.1}x)   about linear (within 0.75x-1.33x of it): {}\n",
            verdict((0.75..=1.33).contains(&(growth / size)))
        );
    }
    Ok(())
}

async fn bench_a() -> Result<()> {
    let (ours, raw) = move_jobs().await.context("benchmark (a)")?;
    let ratio = ours.as_secs_f64() / raw.as_secs_f64();
    println!("(a) MoveJobs of 1,000 jobs, request to durable reply");
    println!("    handoff {}   raw pipelined publish of the same 1,003 payloads {}   ratio {ratio:.2}x   target <= 2x: {}\n", ms(ours), ms(raw), verdict(ratio <= 2.0));
    Ok(())
}

async fn bench_c() -> Result<()> {
    let (events, ours, raw, alone) = rebuild().await.context("benchmark (c)")?;
    let rate = |d: Duration| events as f64 / d.as_secs_f64();
    let share = raw.as_secs_f64() / ours.as_secs_f64();
    println!("(c) projector rebuild over {events} events (median of 3)");
    println!(
        "    handoff {:.2} s ({:.0} events/s)   raw ordered read + sled apply_batch {:.2} s ({:.0} events/s)   {:.0}% of raw   target >= 85%: {}",
        ours.as_secs_f64(),
        rate(ours),
        raw.as_secs_f64(),
        rate(raw),
        share * 100.0,
        verdict(share >= 0.85)
    );
    let keys: u64 = alone.kinds.values().sum();
    let kinds: Vec<String> = alone
        .kinds
        .iter()
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
    println!(
        "    the views it wrote: {keys} keys, {:.1} MB ({}); the view store committing those keys alone into a fresh store, in key order, {VIEWS_BATCH_KEYS} a batch: {:.2} s (median of 3), {:.0}% of raw",
        alone.bytes as f64 / 1e6,
        kinds.join(", "),
        alone.write.as_secs_f64(),
        raw.as_secs_f64() / alone.write.as_secs_f64() * 100.0
    );
    Ok(())
}

//! `scripts/chaos`: the guarantees of handoff under random faults, Jepsen's way. A
//! workload of concurrent clients records every command and its answer; a nemesis drawn
//! from the seed kills, freezes and starves the real processes of a real deployment; a
//! checker reads the history, the event stream and the stores afterwards and reports
//! every invariant that did not hold, with its evidence.
//!
//! The last line is exactly `chaos: F faults of K kinds, C commands acked, V violations`,
//! and the exit status is non-zero when V > 0. A run is reproduced by its seed.
//!
//! # Layout
//! - `topology`: the deployment (a 3-node cluster, two command services, two
//!   projectors, the monitor with failover, the agent, the daemons).
//! - `workload`: the clients and the history.
//! - `nemesis`: the faults.
//! - `checker`: the invariants.
//! - `rng`: the seeded generator everything draws from.

mod checker;
mod nemesis;
mod rng;
mod topology;
mod workload;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use clap::Parser;
use handoff_dataplane::oplog::Ts;
use handoff_dataplane::store::Stores;
use handoff_domain::{DaemonId, Event, State};
use handoff_eventlog::{EventLog, Recorded};
use handoff_protocol::dataplane::HEARTBEATS_BUCKET;
use handoff_protocol::permissions::ProcessRole;
use tokio::time::Instant;

use checker::Violation;
use nemesis::{Nemesis, SmallDisk};
use rng::Rng;
use topology::{Deployment, Part, Shape};
use workload::{Fleet, Outcome};

#[derive(Debug, Parser)]
#[command(
    name = "handoff-chaos",
    about = "Random faults against a real handoff deployment, then a check of every guarantee"
)]
struct Args {
    /// Every random choice of the run comes from this seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// How long faults are injected, in minutes (the setup and the check come on top).
    #[arg(long, conflicts_with = "seconds")]
    minutes: Option<u64>,
    /// How long faults are injected, in seconds.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    #[arg(long, default_value_t = 4)]
    daemons: usize,
    #[arg(long, default_value_t = 8)]
    jobs: usize,
    /// Concurrent clients of the workload.
    #[arg(long, default_value_t = 3)]
    clients: usize,
    /// Faults in force at once, at most.
    #[arg(long, default_value_t = 4)]
    concurrent: usize,
    /// Keep the run's directory (logs, stores) instead of removing it.
    #[arg(long)]
    keep: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args).await {
        Ok(0) => ExitCode::SUCCESS,
        Ok(_) => ExitCode::from(1),
        Err(e) => {
            eprintln!("chaos: the run could not complete: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Runs one seed; returns the number of violations.
async fn run(args: &Args) -> Result<usize> {
    let dir = tempfile::Builder::new()
        .prefix("handoff-chaos-")
        .tempdir()?;
    let root = dir.path().to_owned();
    if args.keep {
        // Ignored: the directory is only kept, never needed afterwards by the run.
        let _ = dir.keep();
    }
    let fault_time = Duration::from_secs(args.minutes.map_or(args.seconds, |m| m * 60));
    let shape = Shape {
        daemons: args.daemons,
        jobs: args.jobs,
        down_after: Duration::from_secs(6),
        heartbeat: Duration::from_millis(250),
    };
    println!(
        "chaos: seed {}, {} s of faults, {} daemons, {} jobs, in {}",
        args.seed,
        fault_time.as_secs(),
        args.daemons,
        args.jobs,
        root.display()
    );
    // The first daemon's heads on a small filesystem, for the full-disk fault.
    let disk = SmallDisk::mount(root.join("heads1"), 64);
    let mut d = Deployment::start(&root, &shape).await?;
    println!(
        "chaos: deployment up ({} processes, 3 nats nodes)",
        d.services.len()
    );
    let mut rng = Rng::new(args.seed);
    let mut nemesis = Nemesis::new(rng.fork(), shape.down_after, disk);
    let heard = Heard::default();
    let hearing = tokio::spawn(hear_heartbeats(
        d.connect(&d.keys.monitor).await?,
        d.daemons.clone(),
        heard.clone(),
    ));

    let client = d.owner_client().await?;
    let log = EventLog::attach(d.connect(&d.keys.operator).await?, Default::default()).await?;
    let history = workload::History::default();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let registered = fold(&read_all(&log).await?);
    let fleet = Fleet {
        daemons: d.daemons.clone(),
        jobs: d.jobs.clone(),
        settings: d
            .daemons
            .iter()
            .filter_map(|id| Some((id.clone(), registered.daemons.get(id)?.settings.clone())))
            .collect(),
    };
    let clients = tokio::spawn(workload::run(
        client,
        log.clone(),
        fleet,
        args.clients,
        rng.fork(),
        history.clone(),
        stopped.clone(),
    ));
    let reader = tokio::spawn(workload::follow(log.clone(), stopped));
    let admin = d.admin_connection().await?;
    let (last, end) = tokio::sync::watch::channel(None);
    let checking = tokio::spawn(completions(
        EventLog::attach(admin, Default::default()).await?,
        Stores::bind(d.store_connection().await?).await?,
        end,
    ));

    let faults = nemesis
        .run(&mut d, Instant::now() + fault_time, args.concurrent)
        .await;
    let healed = nemesis.heal_all(&mut d).await;
    // The clients and the reader stop; the rebuild checker goes on through the quiet
    // period, to the stream's last event.
    let _ = stop.send_replace(true);
    clients.await.context("the workload")?;
    let (read_to, reopened) = reader.await.context("the reader")??;
    faults.context("injecting faults")?;
    healed.context("healing")?;
    println!("chaos: a reader followed the stream to {read_to}, reopening it {reopened} time(s)");

    let history = Arc::try_unwrap(history)
        .map_err(|_| anyhow::anyhow!("the history is still shared"))?
        .into_inner()
        .expect("no client panicked holding the history");
    let silences = {
        let heard = heard.lock().expect("heard lock");
        checker::silences_heard(&nemesis.report.silences, &heard)
    };
    hearing.abort();
    let judged = Judged {
        history: &history,
        silences: &silences,
        timeline: &nemesis.report.timeline,
    };
    let mut violations = check(&mut d, &judged, &shape, &last).await?;
    violations.extend(checking.await.context("the rebuild checker")?);
    let report = &nemesis.report;
    for (kind, n) in &report.injected {
        println!("chaos:   {n:>4} x {kind}");
    }
    println!(
        "chaos: {} acknowledgement(s) lost by the proxy, the disk filled {} time(s)",
        report.acks_lost, report.disk_filled
    );
    for s in &report.skipped {
        println!("chaos: not injected here: {s}");
    }
    for (part, n) in &report.crashes {
        println!("chaos: {part} exited by itself {n} time(s) and was started again");
    }
    let timeline = root.join("faults.log");
    let lines: Vec<String> = report
        .timeline
        .iter()
        .map(|(t, what)| format!("{t} {what}"))
        .collect();
    std::fs::write(&timeline, lines.join("\n") + "\n")?;
    for v in &violations {
        println!("chaos: {v}");
    }
    let acked = history
        .iter()
        .filter(|o| matches!(o.outcome, Outcome::Applied { .. }))
        .count();
    let unknown = history
        .iter()
        .filter(|o| matches!(o.outcome, Outcome::Unknown { .. }))
        .count();
    println!(
        "chaos: {} commands sent: {acked} applied, {} refused, {unknown} unknown",
        history.len(),
        history.len() - acked - unknown
    );
    // By command: how many of each were sent and applied.
    let mut by_command: std::collections::BTreeMap<&str, (usize, usize)> = Default::default();
    for o in &history {
        let e = by_command.entry(o.command).or_default();
        e.0 += 1;
        e.1 += usize::from(matches!(o.outcome, Outcome::Applied { .. }));
    }
    for (command, (sent, applied)) in by_command {
        println!("chaos:     {sent} x {command} ({applied} applied)");
    }
    // Why the others were refused: the fleet as the faults left it, or the service.
    let mut reasons: std::collections::BTreeMap<&str, usize> = Default::default();
    for o in &history {
        if let Outcome::Refused { reason } = &o.outcome {
            *reasons.entry(reason.as_str()).or_default() += 1;
        }
    }
    for (reason, n) in reasons {
        println!("chaos:     refused {n} x {reason}");
    }
    println!(
        "chaos: {} faults of {} kinds, {acked} commands acked, {} violations",
        report.faults(),
        report.kinds(),
        violations.len()
    );
    Ok(violations.len())
}

/// When each daemon's heartbeats arrived, as heard by the run itself (the monitor's
/// identity watches the heartbeat bucket), by daemon index.
type Heard = Arc<std::sync::Mutex<BTreeMap<usize, Vec<u64>>>>;

async fn hear_heartbeats(nats: async_nats::Client, daemons: Vec<DaemonId>, heard: Heard) {
    use futures::StreamExt;
    let js = async_nats::jetstream::new(nats);
    loop {
        let watch = match js.get_key_value(HEARTBEATS_BUCKET).await {
            Ok(bucket) => bucket.watch_all().await.ok(),
            Err(_) => None,
        };
        let Some(mut watch) = watch else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        // A watch whose node died may stall rather than end: watch again after a second
        // without a heartbeat from anyone.
        while let Ok(Some(Ok(entry))) =
            tokio::time::timeout(Duration::from_secs(1), watch.next()).await
        {
            let daemon = handoff_protocol::subjects::daemon_from_key(&entry.key);
            if let Some(i) = daemon.and_then(|d| daemons.iter().position(|x| *x == d)) {
                heard
                    .lock()
                    .expect("heard lock")
                    .entry(i)
                    .or_default()
                    .push(handoff_protocol::now_ms());
            }
        }
    }
}

/// Every event of the stream, in order.
async fn read_all(log: &EventLog) -> Result<Vec<Recorded>> {
    let end = log.last_sequence().await?;
    let mut reader = log.read_from(1).await?;
    let mut out = Vec::new();
    while out.last().is_none_or(|r: &Recorded| r.seq < end) {
        let r = tokio::time::timeout(Duration::from_secs(30), reader.next())
            .await
            .context("reading the stream")??;
        out.push(r);
    }
    Ok(out)
}

fn fold(events: &[Recorded]) -> State {
    let mut state = State::default();
    for r in events {
        state.apply(&r.envelope.event);
    }
    state
}

/// The quiet period, then every check.
/// What the run recorded, for the checker.
struct Judged<'a> {
    history: &'a [workload::Op],
    silences: &'a [nemesis::Silence],
    timeline: &'a [(u64, String)],
}

async fn check(
    d: &mut Deployment,
    judged: &Judged<'_>,
    shape: &Shape,
    last: &tokio::sync::watch::Sender<Option<u64>>,
) -> Result<Vec<Violation>> {
    let admin = d.admin_connection().await?;
    let log = EventLog::attach(admin.clone(), Default::default()).await?;
    // Quiet: every move ends (or is reported stuck) once the faults are over.
    // A move whose rebuild is still being retried after the faults counts as going on
    // (rule 6): on a loaded machine that can take minutes; the wait ends as soon as none
    // is left.
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let state = fold(&read_all(&log).await?);
        if checker::moves(&state).is_empty() || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // Every owner has followed and recorded its head since.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let mut parts = d.parts();
    parts.retain(|p| matches!(p, Part::Monitor | Part::Agent | Part::Daemon(_)));
    for p in parts {
        d.service(p).stop(Duration::from_secs(10)).await;
    }
    let events = read_all(&log).await?;
    last.send_replace(Some(events.last().map_or(0, |r| r.seq)));
    let state = fold(&events);
    let mut out = Vec::new();
    out.extend(checker::commands(judged.history, &events));
    out.extend(checker::owners(&events, &state));
    out.extend(checker::moves(&state));
    out.extend(checker::drains(&events));
    out.extend(checker::downs(
        &events,
        &d.daemons,
        judged.silences,
        shape.down_after.as_millis() as u64,
        1_000,
        judged.timeline,
    ));
    let stores = Stores::bind(d.store_connection().await?).await?;
    out.extend(check_heads(&stores, &events, &state).await?);
    out.extend(check_views(d, &events).await?);
    Ok(out)
}

/// Rule 4, as the run goes (the oplog is kept for a window only): every completed
/// move's head checksum equals the source's at the head's timestamp, read back from the
/// oplog entries the agent stored.
/// Follows the stream until the sequence `end` says (once the run is over) is checked.
async fn completions(
    log: EventLog,
    stores: Stores,
    end: tokio::sync::watch::Receiver<Option<u64>>,
) -> Vec<Violation> {
    let mut out = Vec::new();
    let mut next = 1;
    let mut checked = 0;
    let done = |next: u64| end.borrow().is_some_and(|e| next > e);
    'open: while !done(next) {
        let Ok(mut reader) = log.read_from(next).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        while !done(next) {
            // A bounded wait, so the end is noticed when no event comes any more.
            let r = match tokio::time::timeout(Duration::from_millis(500), reader.next()).await {
                Err(_) => continue,
                Ok(Ok(r)) => r,
                Ok(Err(_)) => continue 'open,
            };
            next = r.seq + 1;
            if let Event::JobMoveCompleted {
                job,
                move_id,
                head: Some(point),
                ..
            } = &r.envelope.event
            {
                checked += 1;
                if let Some(v) = check_completion(&stores, r.seq, job, move_id, point).await {
                    out.push(v);
                }
            }
        }
    }
    println!("chaos: {checked} completed rebuild(s) checked against the source");
    out
}

async fn check_completion(
    stores: &Stores,
    seq: u64,
    job: &handoff_domain::JobId,
    move_id: &handoff_domain::CommandId,
    point: &handoff_domain::model::HeadPoint,
) -> Option<Violation> {
    let violation = |what: String| Violation {
        rule: 4,
        evidence: format!(
            "move {move_id} of {job} completed at sequence {seq} with checksum {} at {}; {what}",
            point.checksum, point.ts
        ),
    };
    let Ok(ts) = point.ts.parse::<Ts>() else {
        return Some(violation("its timestamp does not parse".into()));
    };
    // The stores may be out of reach for a while during the faults.
    for _ in 0..60 {
        match handoff_dataplane::restore::source_checksum_at(stores, job, ts).await {
            Ok(Some(c)) if c.to_string() == point.checksum => return None,
            Ok(Some(c)) => return Some(violation(format!("the source had {c}"))),
            Ok(None) => return Some(violation("the source has no entry at it".into())),
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
    Some(violation("the oplog could not be read for 30 s".into()))
}

/// A read of the stores, tried again until `deadline` (shared by the whole check): right
/// after the faults the cluster may still be electing leaders (a reader's consumer not
/// found, a request timing out). The last error, if the deadline passes.
async fn patiently<T, E, F, Fut>(deadline: tokio::time::Instant, mut read: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
    E: std::fmt::Display,
{
    loop {
        let error = match tokio::time::timeout_at(deadline, read()).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) => e.to_string(),
            Err(_) => "no answer".to_owned(),
        };
        if tokio::time::Instant::now() + Duration::from_millis(500) >= deadline {
            anyhow::bail!("the stores could not be read before the check's deadline: {error}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Rule 5: snapshots and head records fenced.
async fn check_heads(
    stores: &Stores,
    events: &[Recorded],
    state: &State,
) -> Result<Vec<Violation>> {
    let mut out = Vec::new();
    let held = checker::held_epochs(events);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    for (job, j) in &state.jobs {
        let stored: Vec<checker::Stored> = patiently(deadline, || stores.snapshots(Some(job)))
            .await?
            .into_iter()
            .map(|s| checker::Stored {
                id: s.id,
                ts: (s.ts.t, s.ts.i),
                epoch: s.epoch,
                daemon: s.daemon,
            })
            .collect();
        out.extend(checker::snapshots(job, &stored, &held));
        let fence = patiently(deadline, || stores.fences.read(job)).await?.epoch;
        if fence < j.epoch {
            out.push(Violation {
                rule: 5,
                evidence: format!("job {job} is at epoch {} but its fence at {fence}", j.epoch),
            });
        }
        if let Some(h) = patiently(deadline, || stores.head(job)).await? {
            if !held.contains(&(job.clone(), h.daemon.clone(), h.epoch)) || h.epoch > fence {
                out.push(Violation {
                    rule: 5,
                    evidence: format!(
                        "the head record of {job} names {} at epoch {}, the fence is at {fence}",
                        h.daemon, h.epoch
                    ),
                });
            }
        }
    }
    Ok(out)
}

/// Rule 3: each projector, stopped, equals a fresh rebuild of the same stream.
async fn check_views(d: &mut Deployment, events: &[Recorded]) -> Result<Vec<Violation>> {
    let end = events.last().map_or(0, |r| r.seq);
    // Their last events reach them first: nothing appends any more.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for i in 0..2 {
        d.service(Part::Projector(i))
            .stop(Duration::from_secs(10))
            .await;
    }
    let fresh = d.dir.join("views-fresh");
    let key = handoff::secrets::key_path(&d.keys.dir, &ProcessRole::Projector);
    let status = std::process::Command::new(std::env::current_exe()?.with_file_name("handoff"))
        .args(["--nats-url", &d.urls, "--nats-key"])
        .arg(&key)
        .args([
            "projector",
            "--name",
            "fresh",
            "--rebuild",
            "--exit-when-caught-up",
            "--data",
        ])
        .arg(&fresh)
        .env("RUST_LOG", "warn")
        .status()?;
    if !status.success() {
        anyhow::bail!("the fresh rebuild of the views failed");
    }
    let fresh = dump(&fresh)?;
    let mut out = Vec::new();
    for i in 0..2 {
        let live = dump(&d.dir.join(format!("views{}", i + 1)))?;
        out.extend(checker::compare_views(
            &format!("projector-{}", i + 1),
            &live,
            &fresh,
        ));
    }
    let _ = end;
    Ok(out)
}

fn dump(dir: &Path) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    use handoff_projector::ViewStore;
    let store = handoff_projector::SledStore::open(dir)?;
    Ok(store.scan(b"")?)
}

//! The data plane: the agent, a daemon, restores, snapshots and their schedule.

use std::path::PathBuf;

use clap::{ArgGroup, Args, ValueEnum};
use handoff_dataplane::restore::{self, Target};
use handoff_dataplane::source::sim;
use handoff_dataplane::store::Stores;
use handoff_dataplane::{agent, daemon, Ts};
use handoff_domain::model::DaemonSettings;
use handoff_domain::{DaemonId, JobId, ProjectId};

use super::fleet::{daemon_id, job_id, project_id, SettingsArgs};
use super::print_json;
use crate::output::{bytes, parse_bytes, time, Table};
use crate::startup::Startup;
use crate::{Context, Failure};

fn size(s: &str) -> Result<u64, String> {
    parse_bytes(s)
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Back up only these projects' jobs (repeat; default: every project).
    #[arg(long = "project", value_parser = project_id)]
    pub projects: Vec<ProjectId>,
    /// What every job's data is read from.
    #[arg(long, value_enum, default_value_t = SourceKind::Sim)]
    pub source: SourceKind,
    /// Ship a slice of oplog when it holds this much...
    #[arg(long, value_parser = size, default_value = "10MB")]
    pub slice_size: u64,
    /// ...or when its oldest entry is this many milliseconds old.
    #[arg(long, default_value_t = 1000)]
    pub slice_ms: u64,
    /// How often to groom the stores (oplog retention, snapshot expiry), in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    pub groom_ms: u64,
    /// Copies of the stores it creates (3 on a cluster).
    #[arg(long, default_value_t = 1)]
    pub replicas: usize,
    #[command(flatten)]
    pub sim: SimArgs,
}

/// The kinds of source the agent can read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SourceKind {
    /// The simulated MongoDB: a deterministic workload from a seed, one per job.
    Sim,
}

/// The simulated source's workload (`--source sim`).
#[derive(Debug, Args)]
#[command(next_help_heading = "Simulated source")]
pub struct SimArgs {
    /// Seed of the simulated workload (the same seed, the same data).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Data of a new job before its initial sync (e.g. 4MiB).
    #[arg(long, value_parser = size, default_value = "1MiB")]
    pub initial_size: u64,
    /// Size of one document.
    #[arg(long, value_parser = size, default_value = "512")]
    pub doc_size: u64,
    /// Writes per second on each job's source.
    #[arg(long, default_value_t = 200)]
    pub ops_per_sec: u32,
    /// A collection's working size: it grows to this, then stays about this size (at least
    /// --initial-size; default four times it).
    #[arg(long, value_parser = size)]
    pub max_size: Option<u64>,
}

impl SimArgs {
    pub fn config(&self) -> sim::Config {
        sim::Config {
            seed: self.seed,
            initial_bytes: self.initial_size,
            doc_bytes: self.doc_size as usize,
            ops_per_sec: self.ops_per_sec,
            max_bytes: self
                .max_size
                .unwrap_or(self.initial_size.saturating_mul(4))
                .max(self.initial_size),
        }
    }
}

impl AgentArgs {
    pub fn config(&self) -> agent::Config {
        let source = match self.source {
            SourceKind::Sim => agent::SourceConfig::Sim(self.sim.config()),
        };
        agent::Config {
            projects: self.projects.clone(),
            source,
            slice_bytes: self.slice_size as usize,
            slice_ms: self.slice_ms,
            groom_ms: self.groom_ms,
        }
    }
}

#[derive(Debug, Args)]
pub struct DaemonRunArgs {
    /// Run the daemon with this id (machine:/head/root/dir/).
    #[arg(long, value_parser = daemon_id)]
    pub id: Option<DaemonId>,
    /// Keep the heads here instead of the id's head root directory.
    #[arg(long)]
    pub head_dir: Option<PathBuf>,
    /// Milliseconds between heartbeats.
    #[arg(long, default_value_t = 1000)]
    pub heartbeat_ms: u64,
    #[command(flatten)]
    pub settings: SettingsArgs,
}

/// The stores for the operator's commands (restore, snapshots, schedule): bound, never
/// created, and not waited for.
async fn stores(ctx: &Context) -> Result<Stores, Failure> {
    let client = ctx.api().await?.client;
    Stores::bind(client)
        .await
        .map_err(|e| Failure::Usage(e.to_string()))
}

/// The process's own credentials: a daemon and the agent sign their reports.
fn own_creds(ctx: &Context, role: &str) -> Result<handoff_protocol::auth::Credentials, Failure> {
    ctx.creds.clone().ok_or_else(|| {
        Failure::Usage(format!(
            "the {role} signs its reports: give --creds FILE of a {} user (handoff user add)",
            if role == "agent" {
                "BACKUP_AGENT"
            } else {
                "BACKUP_DAEMON"
            }
        ))
    })
}

pub async fn run_agent(ctx: &Context, a: AgentArgs) -> Result<(), Failure> {
    let creds = own_creds(ctx, "agent")?;
    let mut start = Startup::new("agent");
    let Some(client) = start.connect(ctx).await? else {
        return Ok(());
    };
    // The agent creates the data plane's stores; it waits for the fences, which are the
    // command service's.
    let started = start
        .retry("opening the data plane's stores", || {
            let client = client.clone();
            async move { Ok(Stores::open(client, a.replicas).await?) }
        })
        .await?;
    let Some(stores) = started else {
        return Ok(());
    };
    tracing::info!(user = %creds.user, "agent running");
    agent::run(stores, a.config(), creds, start.shutdown().signalled())
        .await
        .map_err(|e| Failure::Usage(format!("agent: {e:#}")))
}

pub async fn run_daemon(ctx: &Context, a: DaemonRunArgs) -> Result<(), Failure> {
    let Some(id) = a.id else {
        return Err(Failure::Usage(
            "give --id machine:/head/root/dir/ to run a daemon, or a subcommand (see --help)"
                .into(),
        ));
    };
    let head_dir = a
        .head_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(id.as_str().split_once(':').map_or("/", |(_, d)| d)));
    let config = daemon::Config {
        id,
        head_dir,
        settings: a.settings.apply(DaemonSettings::default()),
        heartbeat_ms: a.heartbeat_ms,
        creds: own_creds(ctx, "daemon")?,
    };
    let mut start = Startup::new("daemon");
    let Some(client) = start.connect(ctx).await? else {
        return Ok(());
    };
    // A daemon binds to the stores and waits for them: the agent creates them.
    let started = start
        .retry("binding to the data plane's stores", || {
            let client = client.clone();
            async move { Ok(Stores::bind(client).await?) }
        })
        .await?;
    let Some(stores) = started else {
        return Ok(());
    };
    daemon::run(stores, config, start.shutdown().signalled())
        .await
        .map_err(|e| Failure::Usage(format!("daemon: {e:#}")))
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("point").required(true).args(["snapshot", "at", "oplog_ts"])))]
pub struct RestoreArgs {
    /// The job, or a sharded cluster (project/cluster: every shard and the config servers).
    #[arg(long)]
    pub job: String,
    /// Restore this snapshot (its id, from `handoff snapshots`).
    #[arg(long)]
    pub snapshot: Option<String>,
    /// Point in time: every operation before this time (RFC 3339 or seconds since the epoch).
    #[arg(long)]
    pub at: Option<String>,
    /// Every operation up to and including this oplog timestamp (seconds:increment).
    #[arg(long, value_parser = |s: &str| s.parse::<Ts>())]
    pub oplog_ts: Option<Ts>,
    /// Where to write the restored data.
    #[arg(long)]
    pub out: PathBuf,
}

fn parse_time(s: &str) -> Result<u32, Failure> {
    if let Ok(n) = s.parse::<u32>() {
        return Ok(n);
    }
    let t = ::time::OffsetDateTime::parse(s, &::time::format_description::well_known::Rfc3339)
        .map_err(|e| Failure::Usage(format!("--at {s:?}: not RFC 3339 nor seconds: {e}")))?;
    u32::try_from(t.unix_timestamp())
        .map_err(|_| Failure::Usage(format!("--at {s:?}: out of range")))
}

pub async fn restore(ctx: &Context, a: RestoreArgs) -> Result<(), Failure> {
    let target = match (&a.snapshot, &a.at, a.oplog_ts) {
        (Some(s), _, _) => Target::Snapshot(s.clone()),
        (_, Some(t), _) => Target::At(parse_time(t)?),
        (_, _, Some(ts)) => Target::OplogTs(ts),
        _ => unreachable!("clap requires one"),
    };
    let stores = stores(ctx).await?;
    let done = restore::restore(&stores, &a.job, &target, &a.out)
        .await
        .map_err(|e| match e {
            restore::RestoreError::Store(_)
            | restore::RestoreError::Write { .. }
            | restore::RestoreError::Work(_) => Failure::Usage(e.to_string()),
            other => Failure::Refused(handoff_protocol::ErrorBody::new(
                handoff_protocol::ErrorCode::Refused,
                "restore_failed",
                other.to_string(),
            )),
        })?;
    if ctx.json {
        print_json(&done);
        return Ok(());
    }
    let mut t = Table::new(&[
        "JOB",
        "SNAPSHOT",
        "UP TO",
        "DOCUMENTS",
        "SIZE",
        "CHECKSUM",
        "VERIFIED",
    ]);
    for r in &done {
        t.row(vec![
            r.job.to_string(),
            r.snapshot.clone(),
            r.ts.to_string(),
            r.documents.to_string(),
            bytes(r.bytes),
            r.checksum.to_string(),
            if r.checksum == r.source_checksum {
                "yes: equals the source".into()
            } else {
                "NO".into()
            },
        ]);
    }
    t.print();
    println!("written to {}", a.out.display());
    Ok(())
}

#[derive(Debug, Args)]
pub struct SnapshotsArgs {
    /// Only this job's snapshots.
    #[arg(long, value_parser = job_id)]
    pub job: Option<JobId>,
}

pub async fn snapshots(ctx: &Context, a: SnapshotsArgs) -> Result<(), Failure> {
    let stores = stores(ctx).await?;
    let list = stores
        .snapshots(a.job.as_ref())
        .await
        .map_err(|e| Failure::Usage(e.to_string()))?;
    if ctx.json {
        print_json(&list);
        return Ok(());
    }
    let mut t = Table::new(&[
        "JOB", "SNAPSHOT", "TAKEN", "OPLOG TS", "SIZE", "EPOCH", "BY", "CHECKSUM",
    ]);
    for s in &list {
        t.row(vec![
            s.job.to_string(),
            s.id.clone(),
            time(s.taken_at_ms),
            s.ts.to_string(),
            bytes(s.size_bytes),
            s.epoch.to_string(),
            s.daemon
                .as_ref()
                .map_or("initial sync".into(), |d| d.to_string()),
            s.checksum.to_string(),
        ]);
    }
    t.print();
    Ok(())
}

#[derive(Debug, Args)]
pub struct ScheduleArgs {
    /// Set this job's own schedule (default: the schedule of every job without one).
    #[arg(long, value_parser = job_id)]
    pub job: Option<JobId>,
    /// Hours between snapshots: 6, 8, 12 or 24.
    #[arg(long)]
    pub interval_hours: Option<u32>,
    /// Reference time of day the snapshots count from, HH:MM in UTC.
    #[arg(long)]
    pub reference: Option<String>,
    #[arg(long)]
    pub base_days: Option<u32>,
    #[arg(long)]
    pub daily_days: Option<u32>,
    #[arg(long)]
    pub weekly_weeks: Option<u32>,
    #[arg(long)]
    pub monthly_months: Option<u32>,
    /// Length of an hour in milliseconds (for tests and demos; 3600000 otherwise).
    #[arg(long)]
    pub hour_ms: Option<u64>,
    /// The oplog's point-in-time window, in hours (the data plane's, not per job).
    #[arg(long, conflicts_with = "job")]
    pub oplog_ttl_hours: Option<u32>,
}

pub async fn schedule(ctx: &Context, a: ScheduleArgs) -> Result<(), Failure> {
    let stores = stores(ctx).await?;
    let err = |e: handoff_dataplane::store::StoreError| Failure::Usage(e.to_string());
    let mut settings = stores.settings().await.map_err(err)?;
    let mut s = match &a.job {
        Some(j) => stores.schedule(j).await.map_err(err)?,
        None => settings.schedule.clone(),
    };
    let before = (s.clone(), settings.retention.clone());
    if let Some(v) = a.interval_hours {
        s.interval_hours = v;
    }
    if let Some(r) = &a.reference {
        let (h, m) = r
            .split_once(':')
            .and_then(|(h, m)| Some((h.parse::<u32>().ok()?, m.parse::<u32>().ok()?)))
            .filter(|(h, m)| *h < 24 && *m < 60)
            .ok_or_else(|| Failure::Usage(format!("--reference {r:?}: must be HH:MM")))?;
        s.reference_minute = h * 60 + m;
    }
    for (field, v) in [
        (&mut s.base_days, a.base_days),
        (&mut s.daily_days, a.daily_days),
        (&mut s.weekly_weeks, a.weekly_weeks),
        (&mut s.monthly_months, a.monthly_months),
    ] {
        if let Some(v) = v {
            *field = v;
        }
    }
    if let Some(v) = a.hour_ms {
        s.hour_ms = v;
    }
    if let Some(v) = a.oplog_ttl_hours {
        settings.retention.ttl_hours = v;
    }
    s.validate()
        .map_err(|e| Failure::Usage(format!("schedule: {e}")))?;
    settings
        .retention
        .validate()
        .map_err(|e| Failure::Usage(format!("oplog retention: {e}")))?;
    if (s.clone(), settings.retention.clone()) != before {
        match &a.job {
            Some(j) => stores.set_schedule(j, &s).await.map_err(err)?,
            None => {
                settings.schedule = s.clone();
                stores.set_settings(&settings).await.map_err(err)?;
            }
        }
    }
    if ctx.json {
        print_json(&serde_json::json!({ "schedule": s, "retention": settings.retention }));
    } else {
        println!(
            "{}: every {} h from {:02}:{:02} UTC; keep {} days, daily {} days, weekly {} weeks, monthly {} months; oplog window {} h{}",
            a.job.as_ref().map_or("default".to_owned(), |j| j.to_string()),
            s.interval_hours,
            s.reference_minute / 60,
            s.reference_minute % 60,
            s.base_days,
            s.daily_days,
            s.weekly_weeks,
            s.monthly_months,
            settings.retention.ttl_hours,
            if s.hour_ms == handoff_dataplane::schedule::HOUR_MS { String::new() } else { format!(" (an hour lasts {} ms)", s.hour_ms) }
        );
    }
    Ok(())
}

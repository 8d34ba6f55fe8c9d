//! The fleet: daemons, projects and backup jobs.

use std::collections::BTreeSet;

use clap::{Args, Subcommand, ValueEnum};
use handoff_domain::command::*;
use handoff_domain::ids::DeploymentName;
use handoff_domain::model::{DaemonSettings, Deployment, HeadDiskType, JobSize, Shard};
use handoff_domain::state::{Assignment, DaemonStatus};
use handoff_domain::{Command, DaemonId, JobId, Label, ProjectId};
use handoff_protocol::api::query::Page;
use handoff_protocol::views::{AssignmentView, DaemonView, JobView, ProjectView};
use serde_json::json;

use super::{command_id, print_count, print_json, Paging};
use crate::output::{bytes, parse_bytes, Table};
use crate::{Context, Failure};

pub fn daemon_id(s: &str) -> Result<DaemonId, String> {
    DaemonId::new(s).map_err(|e| e.to_string())
}
pub fn project_id(s: &str) -> Result<ProjectId, String> {
    ProjectId::new(s).map_err(|e| e.to_string())
}
pub fn job_id(s: &str) -> Result<JobId, String> {
    JobId::new(s).map_err(|e| e.to_string())
}
fn label(s: &str) -> Result<Label, String> {
    Label::new(s).map_err(|e| e.to_string())
}
fn deployment(s: &str) -> Result<DeploymentName, String> {
    DeploymentName::new(s).map_err(|e| e.to_string())
}
fn size(s: &str) -> Result<u64, String> {
    parse_bytes(s)
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Disk {
    Hdd,
    Ssd,
}

/// Daemon settings, Ops Manager's names; on `configure` every one is optional.
#[derive(Debug, Args)]
pub struct SettingsArgs {
    /// Size of the head disk (e.g. 500GiB).
    #[arg(long, value_parser = size)]
    pub head_space: Option<u64>,
    #[arg(long, value_enum)]
    pub head_disk_type: Option<Disk>,
    /// Labels, comma separated (replaces the current ones).
    #[arg(long, value_delimiter = ',', value_parser = label)]
    pub labels: Option<Vec<Label>>,
    #[arg(long)]
    pub num_workers: Option<u32>,
    #[arg(long)]
    pub assignment_enabled: Option<bool>,
    #[arg(long)]
    pub backup_jobs_enabled: Option<bool>,
    #[arg(long)]
    pub restore_jobs_enabled: Option<bool>,
    #[arg(long)]
    pub garbage_collection_enabled: Option<bool>,
}

impl SettingsArgs {
    pub fn apply(self, mut s: DaemonSettings) -> DaemonSettings {
        if let Some(v) = self.head_space {
            s.head_space_bytes = v;
        }
        if let Some(v) = self.head_disk_type {
            s.head_disk_type = match v {
                Disk::Hdd => HeadDiskType::Hdd,
                Disk::Ssd => HeadDiskType::Ssd,
            };
        }
        if let Some(v) = self.labels {
            s.labels = v.into_iter().collect();
        }
        if let Some(v) = self.num_workers {
            s.num_workers = v;
        }
        if let Some(v) = self.assignment_enabled {
            s.assignment_enabled = v;
        }
        if let Some(v) = self.backup_jobs_enabled {
            s.backup_jobs_enabled = v;
        }
        if let Some(v) = self.restore_jobs_enabled {
            s.restore_jobs_enabled = v;
        }
        if let Some(v) = self.garbage_collection_enabled {
            s.garbage_collection_enabled = v;
        }
        s
    }
}

#[derive(Debug, Subcommand)]
pub enum DaemonCmd {
    /// Register a daemon (machine:/head/root/dir/) with its settings.
    Register {
        #[arg(value_parser = daemon_id)]
        daemon: DaemonId,
        #[command(flatten)]
        settings: SettingsArgs,
    },
    /// Change some of a daemon's settings; the others stay as they are.
    Configure {
        #[arg(value_parser = daemon_id)]
        daemon: DaemonId,
        #[command(flatten)]
        settings: SettingsArgs,
    },
    /// Remove a daemon that owns no job.
    Remove {
        #[arg(value_parser = daemon_id)]
        daemon: DaemonId,
    },
    /// Show a daemon and the jobs it owns.
    Show {
        #[arg(value_parser = daemon_id)]
        daemon: DaemonId,
    },
    /// Record that a daemon stopped answering (DAEMON_DOWN).
    Down {
        #[arg(value_parser = daemon_id)]
        daemon: DaemonId,
    },
    /// Record that a daemon answers again (DAEMON_UP).
    Up {
        #[arg(value_parser = daemon_id)]
        daemon: DaemonId,
    },
    /// Drain a daemon: assignment disabled at once, then every job moved away a few at a
    /// time, each placed by the failover policy's rules (--cancel stops it).
    Drain(super::drain::DrainArgs),
}

#[derive(Debug, Subcommand)]
pub enum ProjectCmd {
    /// Create or change a project's filters (empty: every daemon allowed).
    Configure {
        #[arg(value_parser = project_id)]
        project: ProjectId,
        /// Daemons its jobs may use, comma separated.
        #[arg(long, value_delimiter = ',', value_parser = daemon_id)]
        daemon_filter: Vec<DaemonId>,
        /// Labels a daemon must all carry, comma separated.
        #[arg(long, value_delimiter = ',', value_parser = label)]
        label_filter: Vec<Label>,
    },
}

#[derive(Debug, Args)]
pub struct JobsArgs {
    /// Jobs this daemon owns or is moving away.
    #[arg(long, value_parser = daemon_id)]
    pub daemon: Option<DaemonId>,
    #[arg(long, value_parser = project_id)]
    pub project: Option<ProjectId>,
    /// Only jobs being moved.
    #[arg(long)]
    pub moving: bool,
    #[command(flatten)]
    pub paging: Paging,
}

#[derive(Debug, Subcommand)]
pub enum JobCmd {
    /// Back up a replica set (one job) or a sharded cluster (a job per shard and one for
    /// the config servers); each job is bound to a daemon.
    Create {
        #[arg(long, value_parser = project_id)]
        project: ProjectId,
        /// A replica set's name.
        #[arg(long, value_parser = deployment, conflicts_with = "sharded_cluster", required_unless_present = "sharded_cluster")]
        replica_set: Option<DeploymentName>,
        /// A sharded cluster's name (use with --shards).
        #[arg(long, value_parser = deployment, requires = "shards")]
        sharded_cluster: Option<DeploymentName>,
        /// The shards' names, comma separated.
        #[arg(long, value_delimiter = ',', value_parser = deployment)]
        shards: Vec<DeploymentName>,
        /// Head size of each job (e.g. 40GiB).
        #[arg(long, value_parser = size)]
        head_size: u64,
        /// Oplog produced per hour by each (e.g. 200MB); 1GB or more prefers SSD daemons.
        #[arg(long, value_parser = size, default_value = "0")]
        oplog_per_hour: u64,
        /// A command id (ULID) to retry safely.
        #[arg(long)]
        id: Option<String>,
    },
}

/// How long ago each daemon's last heartbeat reached the heartbeat bucket, by the
/// server's clock (none: never, or the bucket is not there).
pub(crate) async fn heartbeat_ages(
    client: &async_nats::Client,
    daemons: &[DaemonView],
) -> Vec<Option<u64>> {
    let js = async_nats::jetstream::new(client.clone());
    let Ok(kv) = js
        .get_key_value(handoff_protocol::dataplane::HEARTBEATS_BUCKET)
        .await
    else {
        return vec![None; daemons.len()];
    };
    let now = handoff_protocol::now_ms();
    let mut ages = Vec::with_capacity(daemons.len());
    for d in daemons {
        let token = handoff_protocol::subjects::daemon_key(&d.daemon);
        let age = match kv.entry(token).await {
            Ok(Some(e)) => Some(now.saturating_sub(handoff_dataplane::store::time_ms(e.created))),
            _ => None,
        };
        ages.push(age);
    }
    ages
}

#[derive(Debug, Default, Args)]
pub struct DaemonsArgs {
    /// Only daemons that are up, down or removed.
    #[arg(long, value_parser = ["up", "down", "removed"])]
    pub status: Option<String>,
    #[command(flatten)]
    pub paging: Paging,
}

pub async fn daemons(ctx: &Context, a: DaemonsArgs) -> Result<(), Failure> {
    let api = ctx.api().await?;
    let page: Page<DaemonView> = api
        .list("daemons", json!({ "status": a.status }), &a.paging)
        .await?;
    let ages = heartbeat_ages(&api.client, &page.items).await;
    if ctx.json {
        let items: Vec<serde_json::Value> = page
            .items
            .iter()
            .zip(&ages)
            .map(|(d, age)| {
                let mut v = serde_json::to_value(d).expect("views serialize");
                v["heartbeat_age_ms"] = json!(age);
                v
            })
            .collect();
        print_json(&json!({ "items": items, "total": page.total, "next": page.next }));
        return Ok(());
    }
    let mut t = Table::new(&[
        "DAEMON",
        "STATUS",
        "HEARTBEAT",
        "ASSIGN",
        "DISK",
        "WORKERS",
        "JOBS",
        "USED",
        "FREE",
        "LABELS",
    ]);
    for (d, age) in page.items.iter().zip(ages) {
        t.row(vec![
            d.daemon.to_string(),
            status(d.status),
            age.map_or("never".into(), |a| format!("{} ago", crate::output::age(a))),
            match &d.drain {
                Some(_) => "draining".into(),
                None => on_off(d.settings.assignment_enabled),
            },
            crate::output::name(&d.settings.head_disk_type),
            d.settings.num_workers.to_string(),
            d.jobs.to_string(),
            bytes(d.used_bytes),
            bytes(d.free_bytes),
            labels(&d.settings.labels),
        ]);
    }
    t.print();
    print_count(&page, "daemons");
    Ok(())
}

pub(crate) fn status(s: DaemonStatus) -> String {
    match s {
        DaemonStatus::Active(l) => crate::output::name(&l),
        DaemonStatus::Removed => "removed".into(),
    }
}

fn on_off(b: bool) -> String {
    if b { "on" } else { "off" }.into()
}

pub(crate) fn labels(l: &BTreeSet<Label>) -> String {
    if l.is_empty() {
        return "-".into();
    }
    l.iter().map(Label::as_str).collect::<Vec<_>>().join(",")
}

/// Sends a command and prints what it did.
async fn send(
    ctx: &Context,
    id: Option<String>,
    command: Command,
    done: &str,
) -> Result<(), Failure> {
    let applied = ctx.api().await?.command(&command_id(id)?, &command).await?;
    if ctx.json {
        print_json(&applied);
    } else if applied.events.is_empty() {
        println!("{done} (nothing changed)");
    } else {
        println!("{done}");
    }
    Ok(())
}

pub async fn daemon(ctx: &Context, c: DaemonCmd) -> Result<(), Failure> {
    match c {
        DaemonCmd::Drain(a) => super::drain::drain(ctx, a).await,
        DaemonCmd::Register { daemon, settings } => {
            let defaults = DaemonSettings {
                num_workers: 4,
                ..DaemonSettings::default()
            };
            let settings = settings.apply(defaults);
            let msg = format!("registered {daemon}");
            send(
                ctx,
                None,
                Command::RegisterDaemon(RegisterDaemon { daemon, settings }),
                &msg,
            )
            .await
        }
        DaemonCmd::Configure { daemon, settings } => {
            let api = ctx.api().await?;
            let current: DaemonView = api.query("daemon", json!({ "daemon": daemon })).await?;
            let settings = settings.apply(current.settings);
            let msg = format!("configured {daemon}");
            send(
                ctx,
                None,
                Command::ConfigureDaemon(ConfigureDaemon { daemon, settings }),
                &msg,
            )
            .await
        }
        DaemonCmd::Remove { daemon } => {
            let msg = format!("removed {daemon}");
            send(
                ctx,
                None,
                Command::RemoveDaemon(RemoveDaemon { daemon }),
                &msg,
            )
            .await
        }
        DaemonCmd::Down { daemon } => {
            let msg = format!("{daemon} is down (DAEMON_DOWN)");
            send(
                ctx,
                None,
                Command::ReportDaemonLiveness(ReportDaemonLiveness { daemon, up: false }),
                &msg,
            )
            .await
        }
        DaemonCmd::Up { daemon } => {
            let msg = format!("{daemon} is up (DAEMON_UP)");
            send(
                ctx,
                None,
                Command::ReportDaemonLiveness(ReportDaemonLiveness { daemon, up: true }),
                &msg,
            )
            .await
        }
        DaemonCmd::Show { daemon } => {
            let api = ctx.api().await?;
            let view: DaemonView = api.query("daemon", json!({ "daemon": daemon })).await?;
            let all = Paging {
                limit: handoff_protocol::api::query::MAX_LIMIT,
                all: true,
                cursor: None,
            };
            let jobs: Page<AssignmentView> = api
                .list("assignments", json!({ "daemon": daemon }), &all)
                .await?;
            let jobs = jobs.items;
            if ctx.json {
                print_json(&json!({ "daemon": view, "assignments": jobs }));
                return Ok(());
            }
            let s = &view.settings;
            println!("daemon              {}", view.daemon);
            println!("status              {}", status(view.status));
            println!("assignment          {}", on_off(s.assignment_enabled));
            if let Some(d) = &view.drain {
                println!(
                    "drain               {} in progress: {} job(s) moved, {} left, at most {} at a time{}",
                    d.id,
                    d.moved,
                    d.left,
                    d.max_concurrent,
                    d.reason
                        .as_deref()
                        .map(|r| format!(", reason: {r}"))
                        .unwrap_or_default()
                );
            }
            println!("backup jobs         {}", on_off(s.backup_jobs_enabled));
            println!("restore jobs        {}", on_off(s.restore_jobs_enabled));
            println!(
                "garbage collection  {}",
                on_off(s.garbage_collection_enabled)
            );
            println!(
                "head disk type      {}",
                crate::output::name(&s.head_disk_type)
            );
            println!("labels              {}", labels(&s.labels));
            println!("workers             {}", s.num_workers);
            println!(
                "head space          {} used, {} free of {}",
                bytes(view.used_bytes),
                bytes(view.free_bytes),
                bytes(s.head_space_bytes)
            );
            println!();
            let mut t = Table::new(&["JOB", "EPOCH", "STATE"]);
            for a in jobs {
                t.row(vec![
                    a.job.to_string(),
                    a.epoch.to_string(),
                    a.moving_in
                        .map_or("owned".into(), |m| format!("moving in ({m})")),
                ]);
            }
            t.print();
            Ok(())
        }
    }
}

pub async fn projects(ctx: &Context, paging: Paging) -> Result<(), Failure> {
    let page: Page<ProjectView> = ctx
        .api()
        .await?
        .list("projects", json!({}), &paging)
        .await?;
    if ctx.json {
        print_json(&page);
        return Ok(());
    }
    let mut t = Table::new(&["PROJECT", "DAEMON FILTER", "LABEL FILTER"]);
    for p in &page.items {
        let daemons: Vec<_> = p
            .state
            .daemon_filter
            .iter()
            .map(|d| d.to_string())
            .collect();
        t.row(vec![
            p.project.to_string(),
            if daemons.is_empty() {
                "-".into()
            } else {
                daemons.join(",")
            },
            labels(&p.state.label_filter),
        ]);
    }
    t.print();
    print_count(&page, "projects");
    Ok(())
}

pub async fn project(ctx: &Context, c: ProjectCmd) -> Result<(), Failure> {
    let ProjectCmd::Configure {
        project,
        daemon_filter,
        label_filter,
    } = c;
    let msg = format!("configured project {project}");
    send(
        ctx,
        None,
        Command::ConfigureProject(ConfigureProject {
            project,
            daemon_filter,
            label_filter,
        }),
        &msg,
    )
    .await
}

pub async fn jobs(ctx: &Context, a: JobsArgs) -> Result<(), Failure> {
    let mut filter = json!({});
    if let Some(d) = &a.daemon {
        filter["daemon"] = json!(d);
    }
    if let Some(p) = &a.project {
        filter["project"] = json!(p);
    }
    if a.moving {
        filter["moving"] = json!(true);
    }
    let page: Page<JobView> = ctx.api().await?.list("jobs", filter, &a.paging).await?;
    if ctx.json {
        print_json(&page);
        return Ok(());
    }
    let mut t = Table::new(&["JOB", "OWNER", "EPOCH", "HEAD", "STATE"]);
    for j in &page.items {
        let state = match &j.state.assignment {
            Assignment::Assigned { .. } => crate::output::name(&j.state.status),
            Assignment::Moving { from, phase, .. } => {
                format!("moving from {from}: {}", crate::output::name(&phase))
            }
        };
        t.row(vec![
            j.job.to_string(),
            j.owner.to_string(),
            j.state.epoch.to_string(),
            bytes(j.state.size.head_size_bytes),
            state,
        ]);
    }
    t.print();
    print_count(&page, "jobs");
    Ok(())
}

pub async fn job(ctx: &Context, c: JobCmd) -> Result<(), Failure> {
    let JobCmd::Create {
        project,
        replica_set,
        sharded_cluster,
        shards,
        head_size,
        oplog_per_hour,
        id,
    } = c;
    let size = JobSize {
        head_size_bytes: head_size,
        oplog_bytes_per_hour: oplog_per_hour,
    };
    let deployment = match (replica_set, sharded_cluster) {
        (Some(name), None) => Deployment::ReplicaSet { name, size },
        (None, Some(name)) => Deployment::ShardedCluster {
            name,
            shards: shards
                .into_iter()
                .map(|name| Shard { name, size })
                .collect(),
            config_servers: size,
        },
        _ => {
            return Err(Failure::Usage(
                "give --replica-set or --sharded-cluster".into(),
            ))
        }
    };
    let api = ctx.api().await?;
    let applied = api
        .command(
            &command_id(id)?,
            &Command::CreateBackupJobs(CreateBackupJobs {
                project,
                deployment,
            }),
        )
        .await?;
    if ctx.json {
        print_json(&applied);
        return Ok(());
    }
    let created: Vec<_> = applied
        .events
        .iter()
        .filter(|e| e.kind == "BackupJobCreated")
        .map(|e| {
            e.subject
                .trim_start_matches(handoff_protocol::subjects::JOB_EVENTS_PREFIX)
                .to_owned()
        })
        .collect();
    println!("created {} job(s): {}", created.len(), created.join(", "));
    Ok(())
}

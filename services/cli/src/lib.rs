//! The `handoff` binary: the operator's command line, the services, and a local stack.
//! `main.rs` only parses the arguments and calls [`run`].
//!
//! # Layout
//! - [`client`]: commands, queries and the event stream over NATS.
//! - [`cmd`]: one module per group of subcommands (fleet, moves, history).
//! - [`secrets`]: credentials and NATS keys on disk, and the server's authorization.
//! - [`stack`]: `handoff up`: a nats-server child, the services and a sample fleet.
//! - [`startup`]: how every service starts: connecting and opening what it needs, tried
//!   again while the failure passes (a node down, a leader being elected), until it
//!   starts or is told to stop.
//! - [`sample`]: the sample fleet.
//! - [`demo`]: `handoff demo`: the story of a lost daemon, told on a local stack.
//! - [`output`]: tables, sizes and times for people; `--json` prints the wire values.
//!
//! [`cmd::history::describe`] is a pure match table, one arm per event, and is longer than
//! 120 lines by design.
//!
//! Exit codes: 0 done, 1 refused by the service (the reason is printed), 2 usage or
//! connection error.

pub mod client;
pub mod cmd;
pub mod demo;
pub mod metrics;
pub mod output;
pub mod sample;
pub mod secrets;
pub mod stack;
pub mod startup;
pub mod web;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use handoff_protocol::ErrorBody;

/// The default NATS URL when neither --nats-url nor HANDOFF_NATS_URL is given.
pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";

const EXAMPLES: &str = "\
Examples:
  handoff up                                      # a local stack with a sample fleet
  handoff daemons                                 # every daemon, its liveness and head space
  handoff move-jobs --from backup1.example.net:/data/backup/ \\
                    --to backup3.example.net:/data/backup/ --dry-run
  handoff move-jobs --from A --to B --reason \"server lost\" --wait
  handoff move-job sales/orders --to backup2.example.net:/data/backup/
  handoff history --job sales/orders              # the audit trail, from the event stream
  handoff watch --daemon backup2.example.net:/data/backup/ --json
  handoff demo                                    # the whole story on a throwaway stack

Exit codes: 0 done, 1 refused by handoff (the reason is printed), 2 usage or connection error.";

/// Keeps MongoDB-style backup jobs on healthy backup daemons and moves a lost daemon's
/// jobs to another one, over NATS JetStream.
#[derive(Debug, Parser)]
#[command(name = "handoff", version, after_help = EXAMPLES)]
pub struct Cli {
    /// The NATS server, or several of a cluster separated by commas [default:
    /// nats://127.0.0.1:4222; `up` and `demo` start their own].
    #[arg(long, env = "HANDOFF_NATS_URL", global = true)]
    pub nats_url: Option<String>,
    /// Print JSON (the values on the wire) instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    /// Your credentials file (`handoff up` writes the first owner's to .handoff/owner.creds;
    /// `handoff user add` writes new users'). Commands are signed with its key, and it
    /// may hold the NATS identity to connect with.
    #[arg(long, env = "HANDOFF_CREDS", global = true)]
    pub creds: Option<PathBuf>,
    /// A file holding the NATS nkey seed to connect with, when the credentials hold none
    /// (the services: command service, projector).
    #[arg(long, env = "HANDOFF_NATS_KEY", global = true)]
    pub nats_key: Option<PathBuf>,
    /// Log format (logs go to stderr; RUST_LOG sets the level).
    #[arg(long, value_enum, default_value = "text", global = true)]
    pub log_format: LogFormat,
    /// Serve the process's Prometheus metrics at http://ADDR/metrics (the long-running
    /// processes: `command-service`, `projector`, `agent`, `monitor`, `daemon`, `up`,
    /// whose daemons use the ports after it). Keep it on loopback or a private network.
    #[arg(long, value_name = "ADDR", global = true)]
    pub metrics: Option<std::net::SocketAddr>,
    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// List daemons: liveness, settings, jobs and head space.
    Daemons(cmd::fleet::DaemonsArgs),
    /// Run a backup daemon (`--id`), or register, configure, remove or show one.
    Daemon(DaemonArgs),
    /// Run the monitor: DAEMON_DOWN and DAEMON_UP from heartbeats, MOVE_STUCK,
    /// LOW_HEAD_FREE_SPACE, and (with --failover) the automatic failover policy.
    Monitor(cmd::monitor::MonitorArgs),
    /// Open alerts (DAEMON_DOWN, THEFT_FAILED, MOVE_STUCK, ...); --all for closed ones too.
    Alerts(cmd::monitor::AlertsArgs),
    /// Run the agent: the simulated sources, their initial syncs and oplog, and grooming.
    Agent(cmd::data::AgentArgs),
    /// Restore a job or a sharded cluster from the snapshot and oplog stores.
    Restore(cmd::data::RestoreArgs),
    /// List snapshots in the snapshot store.
    Snapshots(cmd::data::SnapshotsArgs),
    /// Show or set the snapshot schedule and retention (and the oplog window).
    Schedule(cmd::data::ScheduleArgs),
    /// List projects and their filters.
    Projects(cmd::Paging),
    /// Configure a project's daemon and label filters.
    #[command(subcommand)]
    Project(cmd::fleet::ProjectCmd),
    /// List backup jobs.
    Jobs(cmd::fleet::JobsArgs),
    /// Create backup jobs.
    #[command(subcommand)]
    Job(cmd::fleet::JobCmd),
    /// Move every job of one daemon to another ("Move all heads").
    MoveJobs(cmd::moves::MoveJobsArgs),
    /// Move one job to another daemon ("Move head").
    MoveJob(cmd::moves::MoveJobArgs),
    /// Give up a job's move (a lost destination, MOVE_STUCK): back to where it came from.
    FailMove(cmd::moves::FailMoveArgs),
    /// Cancel a move: its jobs not yet completed go back where they came from.
    CancelMove(cmd::moves::CancelMoveArgs),
    /// Moves in progress and recent, newest first, with each job's phase.
    Moves(cmd::moves::MovesArgs),
    /// The audit trail of a job or a daemon, read from the event stream itself.
    History(cmd::history::HistoryArgs),
    /// Print events as they happen.
    Watch(cmd::history::WatchArgs),
    /// Run a local stack: nats-server, command service, projector and a sample fleet.
    Up(stack::UpArgs),
    /// Play the story of a lost daemon on a throwaway local stack.
    Demo(demo::DemoArgs),
    /// Serve the console in a browser (daemons, jobs, moves, alerts, history), as your
    /// user.
    Web(web::WebArgs),
    /// Manage users: add (writes a credentials file), list, remove.
    #[command(subcommand)]
    User(cmd::users::UserCmd),
    /// Write a nats-server authorization block and a NATS key per process role, for a
    /// deployment of your own (`handoff up` does this by itself).
    NatsConfig(cmd::users::NatsConfigArgs),
    /// Run the command service (the only writer of the event stream).
    CommandService(CommandServiceArgs),
    /// Run a projector: fold the event stream into sled views and answer queries.
    Projector(ProjectorArgs),
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct DaemonArgs {
    #[command(subcommand)]
    pub command: Option<cmd::fleet::DaemonCmd>,
    #[command(flatten)]
    pub run: cmd::data::DaemonRunArgs,
}

#[derive(Debug, Args)]
pub struct CommandServiceArgs {
    /// Copies of the event stream to keep (3 on a cluster). Sets the stream's replicas.
    #[arg(long, default_value_t = 1)]
    pub replicas: usize,
    /// The first GLOBAL_OWNER as NAME=PUBLIC_KEY, added if no user was ever added
    /// (`handoff nats-config` prints it).
    #[arg(long, value_parser = first_owner)]
    pub first_owner: Option<(handoff_domain::Actor, handoff_domain::UserKey)>,
    /// How many seconds a signed command stays valid (and clocks may differ).
    #[arg(long, default_value_t = 120)]
    pub freshness_secs: u64,
}

fn first_owner(s: &str) -> Result<(handoff_domain::Actor, handoff_domain::UserKey), String> {
    let (name, key) = s
        .split_once('=')
        .ok_or("expected NAME=PUBLIC_KEY, e.g. admin=UABC...")?;
    Ok((
        handoff_domain::Actor::new(name).map_err(|e| e.to_string())?,
        handoff_domain::UserKey::new(key).map_err(|e| e.to_string())?,
    ))
}

#[derive(Debug, Args)]
pub struct ProjectorArgs {
    /// The directory of its sled views.
    #[arg(long, default_value = ".handoff/views")]
    pub data: PathBuf,
    /// Names its consumer; run each projector with its own name and directory.
    #[arg(long, default_value = "main")]
    pub name: String,
    /// Clear the views and fold the whole stream again, then keep running.
    #[arg(long)]
    pub rebuild: bool,
    /// With --rebuild: stop once the views include the stream's last event.
    #[arg(long, requires = "rebuild")]
    pub exit_when_caught_up: bool,
}

/// Why a subcommand did not succeed, and so its exit code.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// handoff refused: exit 1.
    #[error("{}", .0.message)]
    Refused(ErrorBody),
    /// Bad arguments, or handoff could not be reached: exit 2.
    #[error("{0}")]
    Usage(String),
}

/// Errors of the parts handoff runs on: none of them is a refusal, all are exit code 2.
macro_rules! usage_from {
    ($($t:ty),*) => {
        $(impl From<$t> for Failure {
            fn from(e: $t) -> Self {
                Failure::Usage(e.to_string())
            }
        })*
    };
}

usage_from!(
    std::io::Error,
    handoff_eventlog::ReadError,
    handoff_eventlog::AppendError,
    handoff_projector::Error,
    handoff_command::Error,
    handoff_natsd::Error
);

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::Usage(format!("{e:#}"))
    }
}

/// Global settings every subcommand gets.
pub struct Context {
    pub url: String,
    pub url_given: bool,
    pub json: bool,
    /// The caller's credentials, if given.
    pub creds: Option<handoff_protocol::auth::Credentials>,
    /// Where they were read from.
    pub creds_path: Option<PathBuf>,
    /// The NATS seed to connect with (from --nats-key, else the credentials).
    pub nats_seed: Option<String>,
    /// Where this process was asked to serve its metrics (`--metrics`), and where it
    /// does (the port bound, when 0 was asked).
    pub metrics: Option<std::net::SocketAddr>,
    pub metrics_bound: Option<std::net::SocketAddr>,
}

impl Context {
    pub async fn api(&self) -> Result<client::Api, Failure> {
        client::Api::connect(&self.url, self.creds.clone(), self.nats_seed.clone()).await
    }

    /// Reads the global credentials options.
    fn load(
        cli: &Cli,
    ) -> Result<(Option<handoff_protocol::auth::Credentials>, Option<String>), Failure> {
        let creds = match &cli.creds {
            Some(p) => Some(
                handoff_protocol::auth::Credentials::load(p)
                    .map_err(|e| Failure::Usage(e.to_string()))?,
            ),
            None => None,
        };
        let nats_seed = match &cli.nats_key {
            Some(p) => Some(secrets::read_seed(p)?),
            None => creds
                .as_ref()
                .and_then(|c| c.nats_seed().map(str::to_owned)),
        };
        Ok((creds, nats_seed))
    }
}

fn init_logging(format: LogFormat, default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // Ignored: a second initialisation (in tests) keeps the first subscriber.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Completes on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler only fails outside a Tokio runtime");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Runs the command line and returns the process's exit code.
pub async fn run(cli: Cli) -> ExitCode {
    let services = matches!(
        cli.command,
        Cmd::CommandService(_)
            | Cmd::Projector(_)
            | Cmd::Up(_)
            | Cmd::Agent(_)
            | Cmd::Monitor(_)
            | Cmd::Web(_)
            | Cmd::Daemon(DaemonArgs { command: None, .. })
    );
    init_logging(cli.log_format, if services { "info" } else { "warn" });
    let json = cli.json;
    let result = match Context::load(&cli) {
        Err(e) => Err(e),
        Ok((creds, nats_seed)) => {
            let mut ctx = Context {
                url_given: cli.nats_url.is_some(),
                url: cli
                    .nats_url
                    .clone()
                    .unwrap_or_else(|| DEFAULT_NATS_URL.to_owned()),
                json,
                creds,
                creds_path: cli.creds.clone(),
                nats_seed,
                metrics: cli.metrics,
                metrics_bound: None,
            };
            match (cli.metrics, services) {
                (None, _) => dispatch(cli.command, &ctx).await,
                (Some(_), false) => Err(Failure::Usage(
                    "--metrics is for the long-running processes (command-service, projector, agent, monitor, daemon, up, web)".into(),
                )),
                (Some(addr), true) => match metrics::serve(addr).await {
                    Ok(bound) => {
                        ctx.metrics_bound = Some(bound);
                        dispatch(cli.command, &ctx).await
                    }
                    Err(e) => Err(e),
                },
            }
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Refused(e)) => {
            if json {
                println!("{}", serde_json::json!({ "error": e }));
            } else {
                eprintln!("refused: {} ({})", e.message, e.reason);
            }
            ExitCode::from(1)
        }
        Err(Failure::Usage(e)) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

async fn dispatch(command: Cmd, ctx: &Context) -> Result<(), Failure> {
    match command {
        Cmd::Daemons(a) => cmd::fleet::daemons(ctx, a).await,
        Cmd::Daemon(DaemonArgs {
            command: Some(c), ..
        }) => cmd::fleet::daemon(ctx, c).await,
        Cmd::Daemon(DaemonArgs { command: None, run }) => cmd::data::run_daemon(ctx, run).await,
        Cmd::Agent(a) => cmd::data::run_agent(ctx, a).await,
        Cmd::Monitor(a) => cmd::monitor::run_monitor(ctx, a).await,
        Cmd::Alerts(a) => cmd::monitor::alerts(ctx, a).await,
        Cmd::Restore(a) => cmd::data::restore(ctx, a).await,
        Cmd::Snapshots(a) => cmd::data::snapshots(ctx, a).await,
        Cmd::Schedule(a) => cmd::data::schedule(ctx, a).await,
        Cmd::Projects(a) => cmd::fleet::projects(ctx, a).await,
        Cmd::Project(c) => cmd::fleet::project(ctx, c).await,
        Cmd::Jobs(a) => cmd::fleet::jobs(ctx, a).await,
        Cmd::Job(c) => cmd::fleet::job(ctx, c).await,
        Cmd::MoveJobs(a) => cmd::moves::move_jobs(ctx, a).await,
        Cmd::MoveJob(a) => cmd::moves::move_job(ctx, a).await,
        Cmd::FailMove(a) => cmd::moves::fail_move(ctx, a).await,
        Cmd::CancelMove(a) => cmd::moves::cancel_move(ctx, a).await,
        Cmd::Moves(a) => cmd::moves::moves(ctx, a).await,
        Cmd::History(a) => cmd::history::history(ctx, a).await,
        Cmd::Watch(a) => cmd::history::watch(ctx, a).await,
        Cmd::Up(a) => stack::up(ctx, a).await,
        Cmd::Demo(a) => demo::demo(ctx, a).await,
        Cmd::Web(a) => web::web(ctx, a).await,
        Cmd::User(c) => cmd::users::user(ctx, c).await,
        Cmd::NatsConfig(a) => cmd::users::nats_config(ctx, a),
        Cmd::CommandService(a) => {
            let mut start = startup::Startup::new("command service");
            let Some(client) = start.connect(ctx).await? else {
                return Ok(());
            };
            let mut config = handoff_command::Config::default();
            config.event_log.replicas = a.replicas;
            config.bootstrap_owner = a.first_owner;
            config.freshness = std::time::Duration::from_secs(a.freshness_secs.max(1));
            let started = start
                .retry("starting the command service", || {
                    let (client, config) = (client.clone(), config.clone());
                    async move { Ok(handoff_command::start(client, config).await?) }
                })
                .await?;
            let Some(service) = started else {
                return Ok(());
            };
            tracing::info!("command service ready");
            service
                .run(start.shutdown().signalled())
                .await
                .map_err(|e| Failure::Usage(e.to_string()))
        }
        Cmd::Projector(a) => {
            let mut start = startup::Startup::new("projector");
            let Some(client) = start.connect(ctx).await? else {
                return Ok(());
            };
            let started = start
                .retry("starting the projector", || {
                    let client = client.clone();
                    let mut config = handoff_projector::Config::new(a.data.clone());
                    config.name = a.name.clone();
                    config.rebuild = a.rebuild;
                    async move {
                        startup::event_stream_exists(&client).await?;
                        Ok(handoff_projector::start(client, config).await?)
                    }
                })
                .await?;
            let Some(projector) = started else {
                return Ok(());
            };
            tracing::info!("projector ready");
            if a.exit_when_caught_up {
                let at = projector.run_until_caught_up().await?;
                tracing::info!(checkpoint = at, "views rebuilt");
                Ok(())
            } else {
                projector
                    .run(start.shutdown().signalled())
                    .await
                    .map_err(|e| Failure::Usage(e.to_string()))
            }
        }
    }
}

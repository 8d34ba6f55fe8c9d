//! The `handoff` binary's wiring: argument parsing, logging, and the services it runs.
//! `main.rs` only calls [`main`].

use std::path::PathBuf;

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand, ValueEnum};

/// Keeps backup jobs on healthy backup daemons and moves a lost daemon's jobs.
#[derive(Debug, Parser)]
#[command(name = "handoff", version, about)]
pub struct Cli {
    /// The NATS server to use.
    #[arg(
        long,
        env = "HANDOFF_NATS_URL",
        default_value = "nats://127.0.0.1:4222",
        global = true
    )]
    pub nats_url: String,
    /// Log format.
    #[arg(long, value_enum, default_value = "text", global = true)]
    pub log_format: LogFormat,
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
    /// Run the command service (the only writer of the event stream).
    CommandService,
    /// Run a projector: fold the event stream into sled views and answer queries.
    Projector {
        /// The directory of its sled views.
        #[arg(long, default_value = ".handoff/views")]
        data: PathBuf,
        /// Names its consumer; run each projector with its own name and directory.
        #[arg(long, default_value = "main")]
        name: String,
        /// Clear the views and fold the whole stream again, then keep running.
        #[arg(long)]
        rebuild: bool,
        /// With --rebuild: stop once the views include the stream's last event.
        #[arg(long, requires = "rebuild")]
        exit_when_caught_up: bool,
    },
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Completes on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler only fails outside a Tokio runtime");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

async fn connect(url: &str) -> Result<async_nats::Client> {
    async_nats::ConnectOptions::new()
        .name("handoff")
        .connect(url)
        .await
        .with_context(|| format!("cannot connect to NATS at {url}"))
}

/// Runs the command line.
pub async fn main(cli: Cli) -> Result<()> {
    init_logging(cli.log_format);
    match cli.command {
        Cmd::CommandService => {
            let client = connect(&cli.nats_url).await?;
            let service = handoff_command::start(client, handoff_command::Config::default())
                .await
                .context("starting the command service")?;
            tracing::info!("command service ready");
            service.run(shutdown_signal()).await?;
        }
        Cmd::Projector {
            data,
            name,
            rebuild,
            exit_when_caught_up,
        } => {
            let client = connect(&cli.nats_url).await?;
            let mut config = handoff_projector::Config::new(data);
            config.name = name;
            config.rebuild = rebuild;
            let projector = handoff_projector::start(client, config)
                .await
                .context("starting the projector")?;
            tracing::info!("projector ready");
            if exit_when_caught_up {
                let at = projector.run_until_caught_up().await?;
                tracing::info!(checkpoint = at, "views rebuilt");
            } else {
                projector.run(shutdown_signal()).await?;
            }
        }
    }
    Ok(())
}

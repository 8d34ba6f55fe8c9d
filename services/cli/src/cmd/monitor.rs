//! The monitor (liveness, alerts, the failover policy) and `handoff alerts`.

use std::time::Duration;

use clap::Args;
use handoff_monitor::{Policy, Settings};
use handoff_protocol::api::query::Page;
use handoff_protocol::views::AlertView;
use serde_json::json;

use super::print_json;
use crate::output::{parse_duration, time, Table};
use crate::startup::Startup;
use crate::{Context, Failure};

fn duration(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d.is_zero() {
        return Err("must be more than 0".into());
    }
    Ok(d)
}

fn percent(s: &str) -> Result<u32, String> {
    match s.trim_end_matches('%').parse::<u32>() {
        Ok(p) if (1..=100).contains(&p) => Ok(p),
        _ => Err(format!("{s:?} is not a percentage from 1 to 100")),
    }
}

/// What the monitor judges by; `handoff up` takes the same options.
#[derive(Debug, Args)]
pub struct MonitorSettingsArgs {
    /// DAEMON_DOWN after this long without a heartbeat, on the monitor's clock
    /// (Ops Manager: 15 minutes).
    #[arg(long, default_value = "15m", value_parser = duration)]
    pub down_after: Duration,
    /// MOVE_STUCK after a move shows no progress for this long.
    #[arg(long, default_value = "30m", value_parser = duration)]
    pub move_stuck_after: Duration,
    /// LOW_HEAD_FREE_SPACE under this percentage of a daemon's head space (1 to 99).
    #[arg(long, default_value = "10", value_parser = percent)]
    pub low_head_free: u32,
    /// Turn on automatic failover: the jobs of a daemon down for --failover-delay move to
    /// the other daemons. Off by default, as in Ops Manager.
    #[arg(long)]
    pub failover: bool,
    /// How long a daemon stays down before the policy moves its jobs.
    #[arg(long, default_value = "15m", value_parser = duration)]
    pub failover_delay: Duration,
    /// The policy starts no move while this many jobs are moving.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub max_concurrent_rebuilds: u32,
    /// The policy pauses, with a FAILOVER_PAUSED alert, while more than this percentage
    /// of the daemons is down (more likely a partition of our own than a mass failure).
    #[arg(long, default_value = "50", value_parser = percent)]
    pub max_down: u32,
}

#[derive(Debug, Args)]
pub struct MonitorArgs {
    #[command(flatten)]
    pub settings: MonitorSettingsArgs,
    /// Credentials of the policy's user (BACKUP_MONITOR), the actor of its moves
    /// (default: the monitor's own --creds).
    #[arg(long)]
    pub policy_creds: Option<std::path::PathBuf>,
    /// Ignored: the monitor binds to the heartbeat bucket, which the agent creates with
    /// the agent's --replicas. Accepted so that scripts that pass it still run.
    #[arg(long, default_value_t = 1, hide = true)]
    pub replicas: usize,
}

impl MonitorSettingsArgs {
    pub fn settings(&self) -> Result<Settings, Failure> {
        if self.low_head_free > 99 {
            return Err(Failure::Usage("--low-head-free must be 1 to 99".into()));
        }
        Ok(Settings {
            threshold: self.down_after,
            move_stuck_after: self.move_stuck_after,
            low_head_free_percent: self.low_head_free,
            failover: self.failover.then_some(Policy {
                delay: self.failover_delay,
                max_concurrent_rebuilds: self.max_concurrent_rebuilds,
                max_down_percent: self.max_down,
            }),
        })
    }
}

pub async fn run_monitor(ctx: &Context, a: MonitorArgs) -> Result<(), Failure> {
    let settings = a.settings.settings()?;
    let creds = ctx.creds.clone().ok_or_else(|| {
        Failure::Usage(
            "the monitor signs its reports: give --creds FILE of a BACKUP_MONITOR user \
             (handoff user add NAME --role BACKUP_MONITOR)"
                .into(),
        )
    })?;
    let policy_creds = match &a.policy_creds {
        Some(p) => Some(
            handoff_protocol::auth::Credentials::load(p)
                .map_err(|e| Failure::Usage(format!("--policy-creds: {e}")))?,
        ),
        None => None,
    };
    let mut start = Startup::new("monitor");
    let Some(client) = start.connect(ctx).await? else {
        return Ok(());
    };
    let config = handoff_monitor::Config {
        settings,
        creds,
        policy_creds,
        replicas: a.replicas,
    };
    // The monitor binds to the event stream and the heartbeat bucket and waits for them.
    let started = start
        .retry("starting the monitor", || {
            let (client, config) = (client.clone(), config.clone());
            async move { Ok(handoff_monitor::start(client, config).await?) }
        })
        .await?;
    let Some(monitor) = started else {
        return Ok(());
    };
    monitor
        .run(start.shutdown().signalled())
        .await
        .map_err(|e| Failure::Usage(format!("monitor: {e:#}")))
}

#[derive(Debug, Args)]
pub struct AlertsArgs {
    /// Closed alerts too (each type and subject's last one).
    #[arg(long = "closed")]
    pub closed: bool,
    /// Only alerts of this type (DAEMON_DOWN, MOVE_STUCK, ...).
    #[arg(long = "type")]
    pub kind: Option<String>,
    #[command(flatten)]
    pub paging: super::Paging,
}

pub async fn alerts(ctx: &Context, a: AlertsArgs) -> Result<(), Failure> {
    let page: Page<AlertView> = ctx
        .api()
        .await?
        .list(
            "alerts",
            json!({ "all": a.closed, "type": a.kind }),
            &a.paging,
        )
        .await?;
    if ctx.json {
        print_json(&page);
        return Ok(());
    }
    if page.items.is_empty() {
        println!("no {}alerts", if a.closed { "" } else { "open " });
        return Ok(());
    }
    let mut t = Table::new(&["TYPE", "ABOUT", "RAISED", "STATUS", "DETAIL"]);
    for alert in page.items.clone() {
        t.row(vec![
            alert.kind.to_string(),
            alert.about.clone(),
            time(alert.raised_at),
            match (&alert.closed_at, &alert.closed_by) {
                (Some(at), Some(by)) => format!("closed by {by} at {}", time(*at)),
                _ => "open".into(),
            },
            alert.detail,
        ]);
    }
    t.print();
    super::print_count(&page, "alerts");
    Ok(())
}

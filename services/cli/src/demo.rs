//! `handoff demo`: the story of ../MISSION.md told on a throwaway stack, step by step: a
//! fleet, a daemon lost, its jobs checked and moved by an administrator, the destination
//! taking them over, and the history replayed from the event stream.
//!
//! Everything is real: the agent writes to the simulated sources and saves their oplog,
//! the daemons are processes of their own, the lost one is killed outright, and the
//! destination rebuilds each head from a snapshot and the oplog, checked by checksum
//! against the source.

use clap::Args;
use handoff_domain::command::*;
use std::time::{Duration, Instant};

use handoff_dataplane::agent::{self, SourceConfig};
use handoff_dataplane::source::sim;
use handoff_dataplane::store::Stores;
use handoff_domain::model::Liveness;
use handoff_domain::state::DaemonStatus;
use handoff_domain::{Command, Event, JobId};
use handoff_protocol::now_ms;

use crate::cmd::{self, history::Filter};
use crate::sample::{sample_daemon, seed, settle};
use crate::stack::Stack;
use crate::{Context, Failure};

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Client port of the nats-server it starts (0: any free port).
    #[arg(long, default_value_t = 0)]
    pub port: u16,
    /// Where to serve the console while the story runs (port 0: any free port).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:0")]
    pub web: std::net::SocketAddr,
    /// After the story, keep the stack and its console up until Ctrl-C.
    #[arg(long)]
    pub keep: bool,
}

fn step(n: usize, title: &str) {
    println!("\n== {n}. {title}");
}

pub async fn demo(ctx: &Context, a: DemoArgs) -> Result<(), Failure> {
    let dir = tempfile::tempdir()?;
    let url = ctx.url_given.then_some(ctx.url.as_str());
    let mut stack = Stack::start(dir.path(), url, a.port).await?;
    let served = match stack.console_api().await {
        Ok(api) => crate::web::serve(api, a.web, &[]).await,
        Err(e) => Err(e),
    };
    let console = match served {
        Ok(c) => c,
        Err(e) => {
            stack.stop().await;
            return Err(e);
        }
    };
    println!(
        "the console: http://{}/ (open it to watch the story{})",
        console.addr,
        if a.keep {
            ""
        } else {
            "; --keep keeps it up after the end"
        }
    );
    let result = story(&mut stack, dir.path()).await;
    if a.keep && result.is_ok() {
        println!("the stack and its console stay up: Ctrl-C stops them");
        crate::shutdown_signal().await;
    }
    console.stop().await;
    stack.stop().await;
    result
}

/// An hour of snapshot schedule lasts this long in the demo: a 6-hour interval is 3.6 s.
const HOUR_MS: u64 = 600;

/// The demo's monitor threshold: DAEMON_DOWN after this long without a heartbeat.
const DOWN_AFTER: Duration = Duration::from_secs(2);

/// Waits until the views say `daemon` is `liveness` (the monitor reported it).
async fn wait_liveness(
    api: &crate::client::Api,
    daemon: &handoff_domain::DaemonId,
    liveness: Liveness,
) -> Result<(), Failure> {
    until(
        &format!("{daemon} to be {liveness:?}"),
        Duration::from_secs(30),
        || async {
            let view: handoff_protocol::views::DaemonView = api
                .query("daemon", serde_json::json!({ "daemon": daemon }))
                .await?;
            Ok(view.status == DaemonStatus::Active(liveness))
        },
    )
    .await
}

/// Polls `check` every 100 ms until it holds, at most `limit`.
async fn until<F, Fut>(what: &str, limit: Duration, mut check: F) -> Result<(), Failure>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool, Failure>>,
{
    let deadline = Instant::now() + limit;
    while !check().await? {
        if Instant::now() > deadline {
            return Err(Failure::Usage(format!("timed out waiting for {what}")));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

fn store_error(e: impl std::fmt::Display) -> Failure {
    Failure::Usage(e.to_string())
}

/// The jobs of the lost daemon that reached their new one, and when the last one did.
struct Moved {
    jobs: Vec<JobId>,
    done_at: u64,
}

async fn story(stack: &mut Stack, dir: &std::path::Path) -> Result<(), Failure> {
    let api = stack.api().await?;
    let ctx = owner_context(stack);
    let (lost, spare) = (sample_daemon(1), sample_daemon(3));

    let stores = build_a_fleet(stack, dir, &api, &ctx).await?;
    lose_a_daemon(stack, &api, &ctx, &lost).await?;
    freeze_and_thaw_a_daemon(stack, &api, &lost).await?;
    dry_run_the_move(&api, &lost, &spare).await?;
    let from_seq = move_its_jobs(&api, &ctx, &lost, &spare).await?;
    let moved = check_every_head(&api, &stores, from_seq).await?;
    restore_a_point_in_time(&ctx, dir).await?;
    see_snapshots_resume(&api, &ctx, &stores, &moved).await?;
    replay_its_history(&ctx, &lost).await?;
    remove_the_lost_daemon(&api, &ctx, lost).await?;
    println!("\ndone: every job is on a healthy daemon, its head verified against the source, and every step is an event.");
    Ok(())
}

/// The demo's commands run as the stack's owner, against the stack it started.
fn owner_context(stack: &Stack) -> Context {
    Context {
        url: stack.url.clone(),
        url_given: true,
        json: false,
        creds: Some(stack.owner.clone()),
        creds_path: Some(stack.owner_path.clone()),
        nats_seed: stack.keys.as_ref().map(|k| k.operator.clone()),
        metrics: None,
        metrics_bound: None,
    }
}

/// Waits for every job's first snapshot: a move later rebuilds each head from one.
async fn build_a_fleet(
    stack: &mut Stack,
    dir: &std::path::Path,
    api: &crate::client::Api,
    ctx: &Context,
) -> Result<Stores, Failure> {
    step(
        1,
        "A fleet: three backup daemons, two projects, five backup jobs",
    );
    seed(api).await?;
    let agent = agent::Config {
        source: SourceConfig::Sim(sim::Config {
            ops_per_sec: 150,
            initial_bytes: 1 << 20,
            doc_bytes: 256,
            ..sim::Config::default()
        }),
        slice_ms: 250,
        groom_ms: 1000,
        ..agent::Config::default()
    };
    stack.start_data_plane(dir, HOUR_MS, agent, 1).await?;
    stack
        .start_monitor(
            handoff_monitor::Settings {
                threshold: DOWN_AFTER,
                ..Default::default()
            },
            1,
        )
        .await?;
    let stores = Stores::open(api.client.clone(), 1)
        .await
        .map_err(store_error)?;
    let all_jobs: Vec<JobId> = [
        "sales/orders",
        "analytics/events",
        "sales/catalog/shard0",
        "sales/catalog/shard1",
        "sales/catalog/config",
    ]
    .into_iter()
    .map(|j| JobId::new(j).expect("a valid job"))
    .collect();
    until(
        "every job's first snapshot",
        Duration::from_secs(60),
        || async {
            let snaps = stores.snapshots(None).await.map_err(store_error)?;
            Ok(all_jobs
                .iter()
                .all(|j| snaps.iter().any(|s| s.job == *j && s.daemon.is_some())))
        },
    )
    .await?;
    settle(api).await?;
    println!("the agent writes to every source and saves its oplog; each daemon keeps a head per job and takes a snapshot every 6 hours (3.6 s here)");
    cmd::fleet::daemons(ctx, Default::default()).await?;
    println!();
    cmd::fleet::jobs(
        ctx,
        cmd::fleet::JobsArgs {
            daemon: None,
            project: None,
            moving: false,
            paging: Default::default(),
        },
    )
    .await?;
    Ok(stores)
}

async fn lose_a_daemon(
    stack: &mut Stack,
    api: &crate::client::Api,
    ctx: &Context,
    lost: &handoff_domain::DaemonId,
) -> Result<(), Failure> {
    step(
        2,
        &format!(
            "The server of {lost} fails (its process is killed): the monitor hears no heartbeat for {} s, DAEMON_DOWN",
            DOWN_AFTER.as_secs()
        ),
    );
    stack.kill_daemon(lost);
    wait_liveness(api, lost, Liveness::Down).await?;
    cmd::fleet::daemons(ctx, Default::default()).await?;
    println!();
    cmd::monitor::alerts(
        ctx,
        cmd::monitor::AlertsArgs {
            closed: false,
            kind: None,
            paging: Default::default(),
        },
    )
    .await?;
    Ok(())
}

/// The frozen daemon is let go again so that, for the rest of the story, only the lost one
/// is down.
async fn freeze_and_thaw_a_daemon(
    stack: &Stack,
    api: &crate::client::Api,
    lost: &handoff_domain::DaemonId,
) -> Result<(), Failure> {
    step(
        3,
        "Moving its jobs onto a daemon that is down is refused, before anything changes",
    );
    let frozen = sample_daemon(2);
    println!("{frozen} stops answering for a while (SIGSTOP)...");
    stack.signal_daemon(&frozen, libc::SIGSTOP)?;
    wait_liveness(api, &frozen, Liveness::Down).await?;
    match api
        .command(
            &cmd::command_id(None)?,
            &Command::MoveJobs(MoveJobs {
                from: lost.clone(),
                to: frozen.clone(),
                reason: None,
                dry_run: false,
            }),
        )
        .await
    {
        Err(Failure::Refused(e)) => println!("refused: {} ({})", e.message, e.reason),
        other => return Err(Failure::Usage(format!("expected a refusal, got {other:?}"))),
    }
    stack.signal_daemon(&frozen, libc::SIGCONT)?;
    wait_liveness(api, &frozen, Liveness::Up).await?;
    println!("{frozen} answers again (SIGCONT): the monitor appended DAEMON_UP");
    Ok(())
}

async fn dry_run_the_move(
    api: &crate::client::Api,
    lost: &handoff_domain::DaemonId,
    spare: &handoff_domain::DaemonId,
) -> Result<(), Failure> {
    step(
        4,
        &format!("An administrator checks the move to {spare} with a dry run"),
    );
    let dry = api
        .command(
            &cmd::command_id(None)?,
            &Command::MoveJobs(MoveJobs {
                from: lost.clone(),
                to: spare.clone(),
                reason: None,
                dry_run: true,
            }),
        )
        .await?;
    if let Some(plan) = &dry.plan {
        println!(
            "{} job(s) would move; every check of rule 3 passed; nothing changed",
            plan.jobs.len()
        );
    }
    Ok(())
}

/// Returns where the move's events start in the event log, for `check_every_head`.
async fn move_its_jobs(
    api: &crate::client::Api,
    ctx: &Context,
    lost: &handoff_domain::DaemonId,
    spare: &handoff_domain::DaemonId,
) -> Result<u64, Failure> {
    step(
        5,
        &format!("The administrator moves every job of the lost daemon; {spare} rebuilds each head from the latest snapshot and the saved oplog, while writes go on"),
    );
    let from_seq = api.log().await?.last_sequence().await? + 1;
    cmd::moves::move_jobs(
        ctx,
        cmd::moves::MoveJobsArgs {
            from: lost.clone(),
            to: vec![spare.clone()],
            spread: false,
            options: cmd::moves::MoveOptions {
                dry_run: false,
                reason: Some("server lost".into()),
                id: None,
                wait: true,
            },
        },
    )
    .await?;
    Ok(from_seq)
}

async fn check_every_head(
    api: &crate::client::Api,
    stores: &Stores,
    from_seq: u64,
) -> Result<Moved, Failure> {
    step(
        6,
        "Each rebuilt head is checked against the source at the same oplog timestamp",
    );
    let log = api.log().await?;
    let end = log.last_sequence().await?;
    let mut reader = log.read_from(from_seq).await?;
    let mut moved = Moved {
        jobs: Vec::new(),
        done_at: 0,
    };
    loop {
        let r = reader.next().await?;
        if let Event::JobMoveCompleted {
            job,
            head: Some(head),
            ..
        } = &r.envelope.event
        {
            moved.jobs.push(job.clone());
            moved.done_at = moved.done_at.max(r.envelope.at);
            let ts = head.ts.parse().map_err(Failure::Usage)?;
            let source = handoff_dataplane::restore::source_checksum_at(stores, job, ts)
                .await
                .map_err(store_error)?;
            let verdict = match source {
                Some(c) if c.to_string() == head.checksum => "equals the source",
                Some(_) => "DIFFERS from the source",
                None => "source point not found",
            };
            println!(
                "  {:<24} head at {:<16} checksum {}  {verdict}",
                job.to_string(),
                head.ts,
                head.checksum
            );
        }
        if r.seq >= end {
            break;
        }
    }
    Ok(moved)
}

async fn restore_a_point_in_time(ctx: &Context, dir: &std::path::Path) -> Result<(), Failure> {
    step(
        7,
        "Restores never needed the lost daemon: sales/catalog to one point in time",
    );
    cmd::data::restore(
        ctx,
        cmd::data::RestoreArgs {
            job: "sales/catalog".into(),
            snapshot: None,
            at: Some((now_ms() / 1000).to_string()),
            oplog_ts: None,
            out: dir.join("restore"),
        },
    )
    .await?;
    Ok(())
}

async fn see_snapshots_resume(
    api: &crate::client::Api,
    ctx: &Context,
    stores: &Stores,
    moved: &Moved,
) -> Result<(), Failure> {
    step(
        8,
        "Snapshots of the moved jobs resume at their next regular slot",
    );
    let done_at = moved.done_at;
    until(
        "a snapshot of each moved job",
        Duration::from_secs(30),
        || async {
            let snaps = stores.snapshots(None).await.map_err(store_error)?;
            Ok(moved
                .jobs
                .iter()
                .all(|j| snaps.iter().any(|s| s.job == *j && s.taken_at_ms > done_at)))
        },
    )
    .await?;
    let snaps = stores.snapshots(None).await.map_err(store_error)?;
    for j in &moved.jobs {
        if let Some(s) = snaps
            .iter()
            .find(|s| s.job == *j && s.taken_at_ms > done_at)
        {
            println!(
                "  {:<24} snapshot {} by {} (epoch {}), {} ms after the move, at its slot",
                j.to_string(),
                s.id,
                s.daemon.as_ref().map_or("-".into(), |d| d.to_string()),
                s.epoch,
                s.taken_at_ms.saturating_sub(done_at)
            );
        }
    }
    settle(api).await?;
    cmd::fleet::daemons(ctx, Default::default()).await?;
    Ok(())
}

async fn replay_its_history(ctx: &Context, lost: &handoff_domain::DaemonId) -> Result<(), Failure> {
    step(
        9,
        &format!("The audit trail of {lost}, replayed from the event stream"),
    );
    cmd::history::history(
        ctx,
        cmd::history::HistoryArgs {
            filter: Filter {
                job: None,
                daemon: Some(lost.clone()),
            },
            since: None,
        },
    )
    .await?;
    Ok(())
}

/// Only now may the lost daemon be removed: it holds no job any more.
async fn remove_the_lost_daemon(
    api: &crate::client::Api,
    ctx: &Context,
    lost: handoff_domain::DaemonId,
) -> Result<(), Failure> {
    step(10, "The lost daemon, now empty, is removed");
    api.command(
        &cmd::command_id(None)?,
        &Command::RemoveDaemon(RemoveDaemon { daemon: lost }),
    )
    .await?;
    settle(api).await?;
    cmd::fleet::daemons(ctx, Default::default()).await?;
    Ok(())
}

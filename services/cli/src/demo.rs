//! `handoff demo`: the story of ../MISSION.md told on a throwaway stack, step by step: a
//! fleet, a daemon lost, its jobs checked and moved by an administrator, the destination
//! taking them over, and the history replayed from the event stream.
//!
//! Until daemons rebuild heads themselves, the demo reports the rebuild phases and the
//! completion as the destination daemon would.

use clap::Args;
use handoff_domain::command::*;
use handoff_domain::model::MovePhase;
use handoff_domain::Command;

use crate::cmd::{self, history::Filter};
use crate::stack::{sample_daemon, seed, settle, Stack};
use crate::{Context, Failure};

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Client port of the nats-server it starts (0: any free port).
    #[arg(long, default_value_t = 0)]
    pub port: u16,
}

fn step(n: usize, title: &str) {
    println!("\n== {n}. {title}");
}

pub async fn demo(ctx: &Context, a: DemoArgs) -> Result<(), Failure> {
    let dir = tempfile::tempdir()?;
    let url = ctx.url_given.then_some(ctx.url.as_str());
    let stack = Stack::start(dir.path(), url, a.port).await?;
    let result = story(&stack).await;
    stack.stop().await;
    result
}

async fn story(stack: &Stack) -> Result<(), Failure> {
    let ctx = Context {
        url: stack.url.clone(),
        url_given: true,
        json: false,
        actor: handoff_domain::Actor::new("admin").expect("a valid actor"),
    };
    let api = ctx.api().await?;
    let (lost, spare) = (sample_daemon(1), sample_daemon(3));

    step(
        1,
        "A fleet: three backup daemons, two projects, five backup jobs",
    );
    seed(&api).await?;
    settle(&api).await?;
    cmd::fleet::daemons(&ctx).await?;
    println!();
    cmd::fleet::jobs(
        &ctx,
        cmd::fleet::JobsArgs {
            daemon: None,
            project: None,
            moving: false,
        },
    )
    .await?;

    step(2, &format!("The server of {lost} fails: DAEMON_DOWN"));
    api.command(
        &cmd::command_id(None)?,
        &Command::ReportDaemonLiveness(ReportDaemonLiveness {
            daemon: lost.clone(),
            up: false,
        }),
    )
    .await?;
    settle(&api).await?;
    cmd::fleet::daemons(&ctx).await?;

    step(
        3,
        "Moving its jobs onto a daemon that is down is refused, before anything changes",
    );
    let down = sample_daemon(2);
    api.command(
        &cmd::command_id(None)?,
        &Command::ReportDaemonLiveness(ReportDaemonLiveness {
            daemon: down.clone(),
            up: false,
        }),
    )
    .await?;
    match api
        .command(
            &cmd::command_id(None)?,
            &Command::MoveJobs(MoveJobs {
                from: lost.clone(),
                to: down.clone(),
                reason: None,
                dry_run: false,
            }),
        )
        .await
    {
        Err(Failure::Refused(e)) => println!("refused: {} ({})", e.message, e.reason),
        other => return Err(Failure::Usage(format!("expected a refusal, got {other:?}"))),
    }
    api.command(
        &cmd::command_id(None)?,
        &Command::ReportDaemonLiveness(ReportDaemonLiveness {
            daemon: down,
            up: true,
        }),
    )
    .await?;

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

    step(5, "The administrator moves every job of the lost daemon");
    let applied = api
        .command(
            &cmd::command_id(None)?,
            &Command::MoveJobs(MoveJobs {
                from: lost.clone(),
                to: spare.clone(),
                reason: Some("server lost".into()),
                dry_run: false,
            }),
        )
        .await?;
    let plan = applied
        .plan
        .clone()
        .ok_or_else(|| Failure::Usage("a move without a plan".into()))?;
    println!(
        "move {} started: {} job(s), {} events appended in one atomic batch",
        plan.move_id,
        plan.jobs.len(),
        applied.events.len()
    );
    settle(&api).await?;
    cmd::moves::moves(&ctx).await?;

    step(
        6,
        &format!("{spare} rebuilds each head from the latest snapshot and the saved oplog"),
    );
    for j in &plan.jobs {
        for phase in [MovePhase::RestoringSnapshot, MovePhase::ReplayingOplog] {
            api.command(
                &cmd::command_id(None)?,
                &Command::ReportJobMovePhase(ReportJobMovePhase {
                    job: j.job.clone(),
                    move_id: plan.move_id.clone(),
                    epoch: j.epoch,
                    phase,
                }),
            )
            .await?;
            println!("  {:<24} {}", j.job, crate::output::name(&phase));
        }
        api.command(
            &cmd::command_id(None)?,
            &Command::CompleteJobMove(CompleteJobMove {
                head: None,
                job: j.job.clone(),
                move_id: plan.move_id.clone(),
                epoch: j.epoch,
            }),
        )
        .await?;
        println!("  {:<24} completed (epoch {})", j.job, j.epoch);
    }
    settle(&api).await?;
    cmd::fleet::daemons(&ctx).await?;

    step(
        7,
        &format!("The audit trail of {lost}, replayed from the event stream"),
    );
    cmd::history::history(
        &ctx,
        cmd::history::HistoryArgs {
            filter: Filter {
                job: None,
                daemon: Some(lost.clone()),
            },
            since: None,
        },
    )
    .await?;

    step(8, "The lost daemon, now empty, is removed");
    api.command(
        &cmd::command_id(None)?,
        &Command::RemoveDaemon(RemoveDaemon { daemon: lost }),
    )
    .await?;
    settle(&api).await?;
    cmd::fleet::daemons(&ctx).await?;
    println!("\ndone: every job is on a healthy daemon, and every step is an event.");
    Ok(())
}

//! Moves: `move-jobs`, `move-job` (with `--dry-run` and `--wait`), `fail-move` and `moves`.
//! A move's command id is printed (on stderr) before it is sent, so a move cut off can
//! be sent again with the same id.

use std::collections::BTreeMap;

use clap::Args;
use futures::StreamExt;
use handoff_domain::command::{CancelMove, FailJobMove, MoveJob, MoveJobs, SpreadJobs};
use handoff_domain::model::MovePhase;
use handoff_domain::state::Assignment;
use handoff_domain::{Command, CommandId, DaemonId, Event, JobId, MovePlan};
use handoff_protocol::api::query::Page;
use handoff_protocol::views::{JobView, MoveStatus, MoveSummary, MoveView};
use handoff_protocol::{Applied, ErrorBody, ErrorCode};
use serde_json::json;

use super::fleet::{daemon_id, job_id};
use super::{command_id, print_json, Paging};
use crate::output::{bytes, time, Table};
use crate::{Context, Failure};

#[derive(Debug, Args)]
pub struct MoveOptions {
    /// Check and print the plan; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Why (recorded in the history).
    #[arg(long)]
    pub reason: Option<String>,
    /// The command id (a ULID); give the same one to retry safely.
    #[arg(long)]
    pub id: Option<String>,
    /// Follow the move until every job is completed or failed.
    #[arg(long, conflicts_with = "dry_run")]
    pub wait: bool,
}

#[derive(Debug, Args)]
pub struct MoveJobsArgs {
    /// The daemon whose jobs move (usually a lost one).
    #[arg(long, value_parser = daemon_id)]
    pub from: DaemonId,
    /// The daemon that takes them; with --spread, one of the daemons allowed to (repeat
    /// it; none: any daemon up with assignment enabled).
    #[arg(long, value_parser = daemon_id, required_unless_present = "spread")]
    pub to: Vec<DaemonId>,
    /// Spread the jobs over several daemons, each job placed by the failover policy's
    /// rules (the fewest rebuilds, then the most free head space): one move, one id.
    #[arg(long)]
    pub spread: bool,
    #[command(flatten)]
    pub options: MoveOptions,
}

#[derive(Debug, Args)]
pub struct MoveJobArgs {
    #[arg(value_parser = job_id)]
    pub job: JobId,
    #[arg(long, value_parser = daemon_id)]
    pub to: DaemonId,
    #[command(flatten)]
    pub options: MoveOptions,
}

#[derive(Debug, Args)]
pub struct FailMoveArgs {
    /// The moving job whose move to give up (a stuck move: MOVE_STUCK).
    #[arg(value_parser = job_id)]
    pub job: JobId,
    /// Why (recorded with THEFT_FAILED).
    #[arg(long)]
    pub reason: String,
    /// The command id (a ULID); give the same one to retry safely.
    #[arg(long)]
    pub id: Option<String>,
}

fn move_id(s: &str) -> Result<CommandId, String> {
    CommandId::new(s).map_err(|e| e.to_string())
}

#[derive(Debug, Args)]
pub struct CancelMoveArgs {
    /// The move to cancel (its id, from `handoff moves`).
    #[arg(value_parser = move_id)]
    pub move_id: CommandId,
    /// Why (recorded on the move and on each job sent back).
    #[arg(long)]
    pub reason: String,
    /// The command id (a ULID); give the same one to retry safely.
    #[arg(long)]
    pub id: Option<String>,
}

/// Cancels a move: each of its jobs not yet completed goes back to the daemon it came
/// from with a new epoch (the destination is fenced off and drops its partial head);
/// completed jobs stay. No THEFT_FAILED: it was asked for.
pub async fn cancel_move(ctx: &Context, a: CancelMoveArgs) -> Result<(), Failure> {
    let api = ctx.api().await?;
    let command = Command::CancelMove(CancelMove {
        move_id: a.move_id.clone(),
        reason: a.reason,
    });
    let applied = api.command(&command_id(a.id)?, &command).await?;
    if ctx.json {
        print_json(&applied);
        return Ok(());
    }
    let back = applied
        .events
        .iter()
        .filter(|e| e.kind == "JobMoveFailed")
        .count();
    if applied.duplicate {
        println!("move {} was already cancelled; nothing changed", a.move_id);
    } else {
        println!(
            "move {} cancelled: {back} job(s) going back to the daemon they came from",
            a.move_id
        );
    }
    Ok(())
}

/// Gives up a job's move (the destination is lost, or the move is stuck): the job goes
/// back to the daemon it came from with a new epoch, so the destination is fenced off.
pub async fn fail_move(ctx: &Context, a: FailMoveArgs) -> Result<(), Failure> {
    let api = ctx.api().await?;
    let view: JobView = api.query("job", json!({ "job": a.job })).await?;
    let Assignment::Moving { move_id, to, .. } = &view.state.assignment else {
        return Err(Failure::Refused(ErrorBody::new(
            ErrorCode::Conflict,
            "move_not_in_progress",
            format!("job {} is not moving", a.job),
        )));
    };
    let command = Command::FailJobMove(FailJobMove {
        job: a.job.clone(),
        move_id: move_id.clone(),
        epoch: view.state.epoch,
        reason: a.reason,
    });
    let applied = api.command(&command_id(a.id)?, &command).await?;
    if ctx.json {
        print_json(&applied);
    } else {
        println!(
            "move {move_id} of {} failed (THEFT_FAILED): the job goes back from {to} to the daemon it came from",
            a.job
        );
    }
    Ok(())
}

pub async fn move_jobs(ctx: &Context, a: MoveJobsArgs) -> Result<(), Failure> {
    let command = match (a.spread, <[DaemonId; 1]>::try_from(a.to)) {
        (false, Ok([to])) => Command::MoveJobs(MoveJobs {
            from: a.from,
            to,
            reason: a.options.reason.clone(),
            dry_run: a.options.dry_run,
        }),
        (false, Err(_)) => {
            return Err(Failure::Usage(
                "--to names one daemon, unless --spread spreads the jobs over several".into(),
            ))
        }
        (true, to) => Command::SpreadJobs(SpreadJobs {
            from: a.from,
            to: to.map_or_else(|many| many, Vec::from),
            reason: a.options.reason.clone(),
            dry_run: a.options.dry_run,
        }),
    };
    run_move(ctx, command, a.options).await
}

pub async fn move_job(ctx: &Context, a: MoveJobArgs) -> Result<(), Failure> {
    let command = Command::MoveJob(MoveJob {
        job: a.job,
        to: a.to,
        reason: a.options.reason.clone(),
        dry_run: a.options.dry_run,
    });
    run_move(ctx, command, a.options).await
}

async fn run_move(ctx: &Context, command: Command, options: MoveOptions) -> Result<(), Failure> {
    let api = ctx.api().await?;
    let id = command_id(options.id)?;
    // Before anything is sent: a move cut off half-way (this process killed, handoff
    // unreachable) is continued by sending it again with this id. On stderr, so that
    // --json output stays one document.
    eprintln!("command id {id} (to send it again safely: --id {id})");
    let applied = api.command(&id, &command).await?;
    print_reply(ctx.json, options.wait, &applied, print_applied);
    if options.wait {
        let plan = applied.plan.clone();
        let jobs: Vec<JobId> = match &plan {
            Some(p) => p.jobs.iter().map(|j| j.job.clone()).collect(),
            // A retried command is answered without its plan: follow what it started.
            None => started_jobs(&api, &id, &applied).await?,
        };
        let from = applied.events.first().map_or(1, |e| e.seq);
        return wait(ctx, &api, &id, jobs, from).await;
    }
    Ok(())
}

/// Prints a command's reply: for people with `human`, or as JSON: pretty alone, or,
/// when lines follow it (`--wait`), as the first of one JSON document per line.
pub(crate) fn print_reply(json: bool, wait: bool, applied: &Applied, human: impl FnOnce(&Applied)) {
    match (json, wait) {
        (true, false) => print_json(applied),
        (true, true) => println!(
            "{}",
            serde_json::to_string(applied).expect("wire values serialize")
        ),
        (false, _) => human(applied),
    }
}

fn print_applied(applied: &Applied) {
    if let Some(plan) = &applied.plan {
        print_plan(plan, applied.dry_run);
    }
    if applied.dry_run {
        println!("dry run: nothing changed");
    } else if applied.duplicate {
        println!(
            "move {} was already applied ({} events); nothing changed",
            applied.command,
            applied.events.len()
        );
    } else {
        println!(
            "move {} started: {} events appended",
            applied.command,
            applied.events.len()
        );
    }
}

pub(crate) fn print_plan(plan: &MovePlan, dry_run: bool) {
    println!(
        "move {}{}: {} job(s) from {} to {}",
        plan.move_id,
        if dry_run { " (dry run)" } else { "" },
        plan.jobs.len(),
        plan.from,
        plan.to
    );
    let mut t = Table::new(&["  JOB", "HEAD", "NEW EPOCH", "TO"]);
    for j in &plan.jobs {
        t.row(vec![
            format!("  {}", j.job),
            bytes(j.head_size_bytes),
            j.epoch.to_string(),
            j.to.as_ref().unwrap_or(&plan.to).to_string(),
        ]);
    }
    t.print();
    println!("checks passed:");
    for c in &plan.checks {
        println!("  ok  {:<24} {}", c.name, c.detail);
    }
    if plan.destinations.is_empty() {
        println!(
            "head space on {}: {} free before, {} after (the jobs use {})",
            plan.to,
            bytes(plan.destination_free_before),
            bytes(plan.destination_free_after),
            bytes(plan.needed_bytes)
        );
    }
    for d in &plan.destinations {
        println!(
            "head space on {}: {} free before, {} after ({} job(s) using {})",
            d.daemon,
            bytes(d.free_before),
            bytes(d.free_after),
            d.jobs,
            bytes(d.needed_bytes)
        );
    }
}

/// The jobs a move started, read from the stream.
async fn started_jobs(
    api: &crate::client::Api,
    id: &CommandId,
    applied: &Applied,
) -> Result<Vec<JobId>, Failure> {
    let from = applied.events.first().map_or(1, |e| e.seq);
    let mut reader = handoff_eventlog::Follower::new(api.log().await?, from, None);
    let mut jobs = Vec::new();
    for _ in &applied.events {
        let r = reader.next().await?;
        if let Event::JobMoveStarted { job, move_id, .. } = &r.envelope.event {
            if move_id == id {
                jobs.push(job.clone());
            }
        }
    }
    Ok(jobs)
}

/// One progress bar per job, on a terminal: bytes of snapshot restored, then oplog
/// entries applied and the head's lag. Elsewhere (pipes, logs) only the phase lines.
struct Bars {
    multi: Option<indicatif::MultiProgress>,
    bars: BTreeMap<JobId, indicatif::ProgressBar>,
}

impl Bars {
    fn new<'a>(enabled: bool, jobs: impl Iterator<Item = &'a JobId>) -> Bars {
        use std::io::IsTerminal;
        if !enabled || !std::io::stderr().is_terminal() {
            return Bars {
                multi: None,
                bars: BTreeMap::new(),
            };
        }
        let multi = indicatif::MultiProgress::new();
        let style = indicatif::ProgressStyle::with_template(
            "{prefix:<24} {bar:30.cyan/blue} {bytes:>10}/{total_bytes:<10} {msg}",
        )
        .expect("a valid template")
        .progress_chars("=> ");
        let bars = jobs
            .map(|j| {
                let bar = multi.add(indicatif::ProgressBar::new(0));
                bar.set_style(style.clone());
                bar.set_prefix(j.to_string());
                bar.set_message("requested");
                (j.clone(), bar)
            })
            .collect();
        Bars {
            multi: Some(multi),
            bars,
        }
    }

    fn println(&self, line: String) {
        match &self.multi {
            Some(m) => {
                // Ignored: only fails when the terminal is gone.
                let _ = m.println(line);
            }
            None => println!("{line}"),
        }
    }

    fn update(&self, p: &handoff_protocol::dataplane::Progress) {
        let Some(bar) = self.bars.get(&p.job) else {
            return;
        };
        bar.set_length(p.snapshot_total.max(1));
        bar.set_position(p.snapshot_bytes);
        bar.set_message(match p.phase {
            MovePhase::ReplayingOplog => format!(
                "replaying oplog: {} entries, {:.1} s behind",
                p.entries_applied,
                p.lag_ms as f64 / 1000.0
            ),
            phase => crate::output::name(&phase),
        });
    }

    fn finish(&self, job: &JobId, phase: MovePhase) {
        if let (Some(bar), true) = (self.bars.get(job), phase.is_final()) {
            bar.finish_with_message(crate::output::name(&phase));
        }
    }
}

/// Follows the move's job events on the stream until every job is final.
async fn wait(
    ctx: &Context,
    api: &crate::client::Api,
    id: &CommandId,
    jobs: Vec<JobId>,
    from_seq: u64,
) -> Result<(), Failure> {
    // Rides through a node lost in a cluster: the move goes on meanwhile.
    let mut reader = handoff_eventlog::Follower::new(
        api.log().await?,
        from_seq,
        Some(handoff_protocol::subjects::JOB_EVENTS),
    );
    let mut progress = api
        .client
        .subscribe(handoff_protocol::subjects::progress(id.as_str()))
        .await
        .map_err(|e| Failure::Usage(format!("cannot follow the rebuild's progress: {e}")))?;
    let mut phases: BTreeMap<JobId, MovePhase> = jobs
        .into_iter()
        .map(|j| (j, MovePhase::Requested))
        .collect();
    let bars = Bars::new(!ctx.json, phases.keys());
    let mut epochs: BTreeMap<JobId, u64> = BTreeMap::new();
    if !ctx.json {
        bars.println(format!(
            "waiting for {} job(s) to be rebuilt on the destination...",
            phases.len()
        ));
    }
    while phases.values().any(|p| !p.is_final()) {
        let r = tokio::select! {
            r = reader.next() => r?,
            Some(m) = progress.next() => {
                if let Ok(p) = serde_json::from_slice::<handoff_protocol::dataplane::Progress>(&m.payload) {
                    // A report with an older epoch than one already seen is from a daemon
                    // that lost the job: not this rebuild's progress.
                    let newest = epochs.entry(p.job.clone()).or_insert(p.epoch);
                    if p.epoch >= *newest {
                        *newest = p.epoch;
                        bars.update(&p);
                    }
                }
                continue;
            }
        };
        let (job, phase, detail) = match &r.envelope.event {
            Event::JobMovePhaseReported {
                job,
                move_id,
                phase,
            } if move_id == id => (job, *phase, String::new()),
            Event::JobMoveCompleted {
                job,
                move_id,
                daemon,
                epoch,
                ..
            } if move_id == id => (
                job,
                MovePhase::Completed,
                format!(" on {daemon}, epoch {epoch}"),
            ),
            Event::JobMoveFailed {
                job,
                move_id,
                reason,
                returned_to,
                cancelled,
                ..
            } if move_id == id => match cancelled {
                true => (
                    job,
                    MovePhase::Cancelled,
                    format!(" (move cancelled: {reason}); back on {returned_to}"),
                ),
                false => (
                    job,
                    MovePhase::Failed,
                    format!(" (THEFT_FAILED: {reason}); back on {returned_to}"),
                ),
            },
            _ => continue,
        };
        if let Some(p) = phases.get_mut(job) {
            *p = phase;
            if ctx.json {
                println!("{}", json!({ "seq": r.seq, "job": job, "phase": phase }));
            } else {
                bars.println(format!(
                    "  {job:<32} {}{detail}",
                    crate::output::name(&phase)
                ));
                bars.finish(job, phase);
            }
        }
    }
    let count = |phase: MovePhase| phases.values().filter(|p| **p == phase).count();
    let (failed, cancelled) = (count(MovePhase::Failed), count(MovePhase::Cancelled));
    if cancelled > 0 {
        return Err(Failure::Refused(ErrorBody::new(
            ErrorCode::Refused,
            "move_cancelled",
            format!(
                "move {id} was cancelled: {cancelled} of {} job(s) went back where they came from",
                phases.len()
            ),
        )));
    }
    if failed > 0 {
        return Err(Failure::Refused(ErrorBody::new(
            ErrorCode::Refused,
            "theft_failed",
            format!(
                "move {id} finished with {failed} of {} job(s) failed (THEFT_FAILED)",
                phases.len()
            ),
        )));
    }
    if !ctx.json {
        println!(
            "move {id} completed: {} job(s) on their new daemon",
            phases.len()
        );
    }
    Ok(())
}

#[derive(Debug, Args)]
pub struct MovesArgs {
    /// Only moves in this standing.
    #[arg(long, value_parser = ["in_progress", "interrupted", "completed", "failed", "partly_failed", "cancelled"])]
    pub status: Option<String>,
    #[command(flatten)]
    pub paging: Paging,
}

pub async fn moves(ctx: &Context, a: MovesArgs) -> Result<(), Failure> {
    let api = ctx.api().await?;
    let page: Page<MoveSummary> = api
        .list("moves", json!({ "status": a.status }), &a.paging)
        .await?;
    if ctx.json {
        print_json(&page);
        return Ok(());
    }
    let list = &page.items;
    let mut t = Table::new(&[
        "MOVE", "STARTED", "STATUS", "FROM", "TO", "JOBS", "BY", "REASON",
    ]);
    for m in list {
        let done = m.ended();
        t.row(vec![
            m.move_id.to_string(),
            time(m.started_at),
            crate::output::name(&m.status),
            m.from.to_string(),
            m.to.to_string(),
            format!("{done}/{}", m.planned),
            m.actor.clone(),
            m.reason.clone().unwrap_or_else(|| "-".into()),
        ]);
    }
    t.print();
    for m in list.iter().filter(|m| m.status == MoveStatus::Interrupted) {
        println!(
            "\nmove {} interrupted: {} of {} jobs started; the command service starts the rest as soon as it can (MOVE_INTERRUPTED in `handoff alerts` says why it waits)",
            m.move_id,
            m.started(),
            m.planned
        );
    }
    // Each move in progress, job by job (a move too large for one answer says so).
    for m in list.iter().filter(|m| m.started() > m.ended()) {
        println!("\nmove {} in progress:", m.move_id);
        match api
            .query::<MoveView>("move", json!({ "move_id": m.move_id }))
            .await
        {
            Ok(view) => {
                let mut t = Table::new(&["  JOB", "PHASE"]);
                for (job, phase) in &view.jobs {
                    t.row(vec![format!("  {job}"), crate::output::name(&phase)]);
                }
                t.print();
            }
            Err(Failure::Refused(e)) => println!("  ({})", e.message),
            Err(e) => return Err(e),
        }
    }
    super::print_count(&page, "moves");
    Ok(())
}

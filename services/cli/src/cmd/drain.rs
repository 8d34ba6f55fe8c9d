//! `handoff daemon drain D`: the daemon's assignment disabled, then its jobs moved away a
//! few at a time by the command service (`--dry-run` prints the whole plan, `--wait`
//! follows the drain to its end, `--cancel` stops it).

use clap::Args;
use handoff_domain::command::{CancelDrain, DrainDaemon};
use handoff_domain::{Command, CommandId, DaemonId, Event};
use handoff_protocol::Applied;
use serde_json::json;

use super::fleet::daemon_id;
use super::moves::{print_plan, print_reply};
use super::{command_id, print_json};
use crate::{Context, Failure};

#[derive(Debug, Args)]
pub struct DrainArgs {
    #[arg(value_parser = daemon_id)]
    pub daemon: DaemonId,
    /// At most this many of its jobs move at a time.
    #[arg(long, default_value_t = 4)]
    pub max_concurrent: u32,
    /// Check and print the plan (which job goes where, as the fleet stands now); change
    /// nothing.
    #[arg(long, conflicts_with = "cancel")]
    pub dry_run: bool,
    /// Why (recorded in the history; required with --cancel).
    #[arg(long)]
    pub reason: Option<String>,
    /// Stop the daemon's drain: no move of it starts any more (those in progress go on;
    /// assignment stays disabled).
    #[arg(long)]
    pub cancel: bool,
    /// Follow the drain until it completes or is cancelled.
    #[arg(long, conflicts_with = "dry_run")]
    pub wait: bool,
    /// The command id (a ULID); give the same one to retry safely.
    #[arg(long)]
    pub id: Option<String>,
}

pub async fn drain(ctx: &Context, a: DrainArgs) -> Result<(), Failure> {
    let api = ctx.api().await?;
    let id = command_id(a.id)?;
    if a.cancel {
        let reason = a.reason.ok_or_else(|| {
            Failure::Usage("--cancel needs --reason (recorded in the history)".into())
        })?;
        let command = Command::CancelDrain(CancelDrain {
            daemon: a.daemon.clone(),
            reason,
        });
        let applied = api.command(&id, &command).await?;
        if ctx.json {
            print_json(&applied);
        } else if applied.duplicate {
            println!(
                "the drain of {} was already cancelled by this command; nothing changed",
                a.daemon
            );
        } else {
            println!(
                "drain of {} cancelled: no move of it starts any more; the moves in progress go on (cancel-move stops one), and assignment stays disabled (`handoff history --daemon {}` shows how many moved)",
                a.daemon, a.daemon
            );
        }
        return Ok(());
    }
    let command = Command::DrainDaemon(DrainDaemon {
        daemon: a.daemon.clone(),
        max_concurrent: a.max_concurrent,
        reason: a.reason,
        dry_run: a.dry_run,
    });
    eprintln!("command id {id} (to send it again safely: --id {id})");
    let applied = api.command(&id, &command).await?;
    print_reply(ctx.json, a.wait, &applied, |applied| {
        print_started(&a.daemon, applied, a.max_concurrent)
    });
    if a.wait {
        let from = applied.events.first().map_or(1, |e| e.seq);
        return follow(ctx, &api, &a.daemon, &id, from).await;
    }
    Ok(())
}

fn print_started(daemon: &DaemonId, applied: &Applied, max_concurrent: u32) {
    match &applied.plan {
        Some(plan) => print_plan(plan, applied.dry_run),
        None => println!("{daemon} holds no job to move"),
    }
    if applied.dry_run {
        println!(
            "dry run: nothing changed (each job is placed again when its move starts, by the same rules)"
        );
    } else if applied.duplicate {
        println!(
            "drain {} was already started; nothing changed",
            applied.command
        );
    } else {
        println!(
            "drain {} of {daemon} started: assignment disabled; its jobs move at most {max_concurrent} at a time (`handoff daemon show {daemon}` shows how far it is, `--cancel` stops it)",
            applied.command
        );
    }
}

/// Follows the drain on the stream: each of its moves as it starts and ends, until the
/// drain completes or is cancelled.
async fn follow(
    ctx: &Context,
    api: &crate::client::Api,
    daemon: &DaemonId,
    drain: &CommandId,
    from_seq: u64,
) -> Result<(), Failure> {
    let mut reader = handoff_eventlog::Follower::new(api.log().await?, from_seq, None);
    // The moves of this drain, by id: only their job events are shown.
    let mut moves = std::collections::BTreeSet::new();
    loop {
        let r = reader.next().await?;
        let event = &r.envelope.event;
        let line = match event {
            Event::MoveStarted {
                move_id,
                drain: Some(of),
                ..
            } if of == drain => {
                moves.insert(move_id.clone());
                continue;
            }
            Event::JobMoveStarted {
                job, move_id, to, ..
            } if moves.contains(move_id) => format!("  {job:<32} moving to {to}"),
            Event::JobMoveCompleted {
                job,
                move_id,
                daemon: on,
                ..
            } if moves.remove(move_id) => format!("  {job:<32} completed on {on}"),
            Event::JobMoveFailed {
                job,
                move_id,
                reason,
                ..
            } if moves.remove(move_id) => {
                format!("  {job:<32} failed ({reason}); it stays on {daemon}")
            }
            Event::DrainCompleted { drain_id, .. } | Event::DrainCancelled { drain_id, .. }
                if drain_id == drain =>
            {
                if ctx.json {
                    println!("{}", json!({ "seq": r.seq, "event": event }));
                } else {
                    println!("{}", super::history::describe(event));
                }
                return Ok(());
            }
            _ => continue,
        };
        if ctx.json {
            println!("{}", json!({ "seq": r.seq, "event": event }));
        } else {
            println!("{line}");
        }
    }
}

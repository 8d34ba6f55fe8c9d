//! Drains, as Nomad drains a node: the daemon's assignment is disabled at once, then its
//! jobs move away, one move per job, each placed when it starts by the failover policy's
//! rules ([`failover_candidates`]), never more than the drain's limit moving at a time.
//!
//! - `drain` starts it (`DrainStarted`), with the whole plan as the fleet stands now:
//!   which job would go where, placed as a spread places them. It is refused when the
//!   plan cannot place every job.
//! - `next` (`ContinueDrain`, which the command service sends by itself) starts the next
//!   job's move (one per command) while fewer than the limit are moving away from the
//!   daemon: the first waiting job, largest first, that some daemon can take. It ends the
//!   drain (`DrainCompleted`) once no job is left to move and none is moving away or
//!   arriving. A job whose drain move failed or was cancelled stays (`left_by_drain`),
//!   and is not tried again by this drain. When no waiting job can be placed it is
//!   refused (`bind_failure`), which the service turns into `DrainBlocked`.
//! - `cancel` stops it (`DrainCancelled`): nothing more starts.

use std::cmp::Reverse;
use std::collections::BTreeMap;

use super::failover::failover_candidates;
use super::moves::{start_move, MoveRequest};
use super::spread::plan_spread;
use super::{active_daemon, daemon, filter_rejection, Context, Decision};
use crate::command::{CancelDrain, ContinueDrain, DrainDaemon};
use crate::event::Event;
use crate::ids::{DaemonId, JobId, ProjectId};
use crate::model::MoveScope;
use crate::rejection::Rejection;
use crate::state::{Assignment, Daemon, Drain, State};

pub(super) fn drain(c: &DrainDaemon, ctx: &Context, state: &State) -> Result<Decision, Rejection> {
    let d = active_daemon(state, &c.daemon)?;
    if let Some(drain) = state.drains.get(&c.daemon) {
        return Err(Rejection::Draining {
            daemon: c.daemon.clone(),
            drain_id: drain.id.clone(),
        });
    }
    let jobs = waiting(state, &c.daemon, None);
    let plan = if jobs.is_empty() {
        None
    } else {
        Some(plan_spread(state, &ctx.command, &c.daemon, &[], jobs, false)?.0)
    };
    if c.dry_run {
        return Ok(Decision {
            units: vec![],
            plan,
        });
    }
    let mut decision = Decision::one(vec![Event::DrainStarted {
        daemon: c.daemon.clone(),
        drain_id: ctx.command.clone(),
        max_concurrent: c.max_concurrent,
        reason: c.reason.clone(),
        jobs: d.jobs.len() as u32,
    }]);
    decision.plan = plan;
    Ok(decision)
}

pub(super) fn next(c: &ContinueDrain, ctx: &Context, state: &State) -> Result<Decision, Rejection> {
    // Decided again after its move was appended: done.
    if state.moves.contains_key(&ctx.command) {
        return Ok(Decision::default());
    }
    let drain = state
        .drains
        .get(&c.daemon)
        .filter(|d| d.id == c.drain_id)
        .ok_or_else(|| Rejection::NotDraining {
            daemon: c.daemon.clone(),
            drain_id: Some(c.drain_id.clone()),
        })?;
    // A daemon removed meanwhile (it held nothing) still ends its drain.
    let d = daemon(state, &c.daemon)?;
    let moving = state.jobs_moving_from(&c.daemon).count() as u32;
    let waiting = waiting(state, &c.daemon, Some(drain));
    if waiting.is_empty() {
        let arriving = d
            .jobs
            .iter()
            .any(|j| matches!(&state.jobs[j].assignment, Assignment::Moving { .. }));
        if moving == 0 && !arriving {
            return Ok(Decision::one(vec![Event::DrainCompleted {
                daemon: c.daemon.clone(),
                drain_id: drain.id.clone(),
                moved: drain.moved,
                left: drain.left,
            }]));
        }
        return Ok(Decision::default());
    }
    if moving >= drain.max_concurrent {
        return Ok(Decision::default());
    }
    let reason = Some(match &drain.reason {
        Some(r) => format!("drain of {}: {r}", c.daemon),
        None => format!("drain of {}", c.daemon),
    });
    // The first waiting job some daemon can take. A job larger than the most room any
    // eligible daemon passing its project's filters has is passed over at once (worked
    // out once per project), so a drain nobody can take costs the fleet once per step,
    // not the fleet for each job.
    let eligible: Vec<(&DaemonId, &Daemon)> = state
        .daemons
        .iter()
        .filter(|(id, d)| {
            **id != c.daemon
                && d.is_up()
                && d.settings.assignment_enabled
                && d.settings.backup_jobs_enabled
        })
        .collect();
    let mut most_room: BTreeMap<ProjectId, u64> = BTreeMap::new();
    for job in &waiting {
        let size = state.jobs[*job].size.head_size_bytes;
        let room = *most_room.entry(job.project()).or_insert_with(|| {
            eligible
                .iter()
                .filter(|(id, d)| filter_rejection(state, job, id, d).is_none())
                .map(|(_, d)| d.free_bytes())
                .max()
                .unwrap_or(0)
        });
        if room <= size {
            continue;
        }
        let Some(best) = failover_candidates(state, job).into_iter().next() else {
            continue;
        };
        return start_move(
            state,
            ctx,
            MoveRequest {
                scope: MoveScope::OneJob {
                    job: (*job).clone(),
                },
                from: &c.daemon,
                to: &best.daemon,
                jobs: vec![job],
                reason: &reason,
                dry_run: false,
                automatic: false,
                drain: Some(drain.id.clone()),
            },
        );
    }
    Err(Rejection::BindFailure {
        job: waiting[0].clone(),
        detail: format!(
            "the drain of {} cannot place any job it has left: no daemon is up with assignment and backup jobs enabled, room for the head and passing the project's filters (the drain goes on when one is)",
            c.daemon
        ),
    })
}

pub(super) fn cancel(c: &CancelDrain, ctx: &Context, state: &State) -> Result<Decision, Rejection> {
    let drain = state
        .drains
        .get(&c.daemon)
        .ok_or_else(|| Rejection::NotDraining {
            daemon: c.daemon.clone(),
            drain_id: None,
        })?;
    Ok(Decision::one(vec![Event::DrainCancelled {
        daemon: c.daemon.clone(),
        drain_id: drain.id.clone(),
        cancel_id: ctx.command.clone(),
        reason: c.reason.clone(),
        moved: drain.moved,
        waiting: waiting(state, &c.daemon, Some(drain)).len() as u32,
    }]))
}

/// The jobs on `daemon` a drain still has to move, the largest heads first (where the
/// most room is left), ties by id: those assigned to it (not arriving), less those the
/// drain left (`left_by_drain`).
fn waiting<'a>(state: &'a State, daemon: &DaemonId, drain: Option<&Drain>) -> Vec<&'a JobId> {
    let Some(d) = state.daemons.get(daemon) else {
        return vec![];
    };
    let mut jobs: Vec<&JobId> = d
        .jobs
        .iter()
        .filter(|j| {
            matches!(&state.jobs[*j].assignment, Assignment::Assigned { daemon: on } if on == daemon)
                && drain.is_none_or(|dr| state.jobs[*j].left_by_drain.as_ref() != Some(&dr.id))
        })
        .collect();
    jobs.sort_by_key(|j| (Reverse(state.jobs[*j].size.head_size_bytes), *j));
    jobs
}

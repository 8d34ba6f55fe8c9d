//! The automatic failover policy's moves: a job of a daemon that is down goes to the best
//! candidate, through the same checks and events as an operator's move.

use super::moves::{start_move, MoveRequest};
use super::{active_daemon, filter_rejection, guard_tripped, Context, Decision};
use crate::command::FailoverJob;
use crate::event::{Candidate, Event, FailoverInputs};
use crate::ids::JobId;
use crate::model::MoveScope;
use crate::rejection::{Kind, Rejection};
use crate::state::{Assignment, State};

/// The daemons the failover policy may move `job` to, best first: the fewest rebuilds
/// in progress, then the most free head space, then the fewest jobs. Never the job's
/// daemon, never one an operator moved the job away from.
pub fn failover_candidates(state: &State, job: &JobId) -> Vec<Candidate> {
    let Some(j) = state.jobs.get(job) else {
        return vec![];
    };
    let needed = j.size.head_size_bytes;
    let rebuilding = state.rebuilding();
    let mut candidates: Vec<Candidate> = state
        .daemons
        .iter()
        .filter(|(id, d)| {
            *id != j.owner()
                && Some(*id) != j.operator_moved_from.as_ref()
                && d.is_up()
                && d.settings.assignment_enabled
                && d.settings.backup_jobs_enabled
                && d.free_bytes() > needed
                && filter_rejection(state, job, id, d).is_none()
        })
        .map(|(id, d)| Candidate {
            daemon: id.clone(),
            free_bytes: d.free_bytes(),
            jobs: d.jobs.len() as u32,
            rebuilding: rebuilding.get(id).copied().unwrap_or(0),
        })
        .collect();
    candidates.sort_by(|a, b| {
        (
            a.rebuilding,
            std::cmp::Reverse(a.free_bytes),
            a.jobs,
            &a.daemon,
        )
            .cmp(&(
                b.rebuilding,
                std::cmp::Reverse(b.free_bytes),
                b.jobs,
                &b.daemon,
            ))
    });
    candidates
}

/// One automatic failover move: the same checks and events as an operator's `MoveJob`,
/// plus the policy's own (the source is down, the job is still on it, the guard and the
/// rebuild limit), and a `FailoverDecided` event with every input.
pub(super) fn failover_job(
    c: &FailoverJob,
    ctx: &Context,
    state: &State,
) -> Result<Decision, Rejection> {
    if state.moves.contains_key(&ctx.command) {
        return Ok(Decision::default());
    }
    let job = state.jobs.get(&c.job).ok_or_else(|| Rejection::NotFound {
        kind: Kind::Job,
        id: c.job.to_string(),
    })?;
    let source = active_daemon(state, &c.from)?;
    if source.is_up() {
        return Err(Rejection::NotDown {
            daemon: c.from.clone(),
        });
    }
    if !matches!(&job.assignment, Assignment::Assigned { daemon } if *daemon == c.from) {
        return Err(Rejection::NotOnDaemon {
            job: c.job.clone(),
            daemon: c.from.clone(),
        });
    }
    let (down, active) = state.down_of_active();
    let down = down.len() as u32;
    if guard_tripped(down, active, c.max_down_percent) {
        return Err(Rejection::FailoverPaused {
            down,
            active,
            max_down_percent: c.max_down_percent,
        });
    }
    let moving = state.moving();
    if moving >= c.max_concurrent_rebuilds {
        return Err(Rejection::RebuildLimit {
            moving,
            limit: c.max_concurrent_rebuilds,
        });
    }
    let candidates = failover_candidates(state, &c.job);
    let Some(best) = candidates.first() else {
        return Err(Rejection::BindFailure {
            job: c.job.clone(),
            detail: "no daemon is up with assignment enabled, room for the head and passing                      the project's filters"
                .to_owned(),
        });
    };
    let to = best.daemon.clone();
    let reason = Some(format!(
        "automatic failover: {} is DAEMON_DOWN for {} s",
        c.from,
        c.down_for_ms / 1000
    ));
    let mut decision = start_move(
        state,
        ctx,
        MoveRequest {
            scope: MoveScope::OneJob { job: c.job.clone() },
            from: &c.from,
            to: &to,
            jobs: vec![&c.job],
            reason: &reason,
            dry_run: false,
            automatic: true,
            drain: None,
        },
    )?;
    let decided = Event::FailoverDecided {
        move_id: ctx.command.clone(),
        job: c.job.clone(),
        from: c.from.clone(),
        to,
        inputs: FailoverInputs {
            down_for_ms: c.down_for_ms,
            delay_ms: c.delay_ms,
            rebuilding: moving,
            max_concurrent_rebuilds: c.max_concurrent_rebuilds,
            down,
            active,
            max_down_percent: c.max_down_percent,
            head_size_bytes: job.size.head_size_bytes,
            excluded: job.operator_moved_from.clone(),
            candidates,
        },
    };
    decision.units[0].insert(0, decided);
    Ok(decision)
}

//! Moves (MISSION rule 3): the checks on a destination, the plan, the events of a move
//! split into atomic units, and the destination's reports on each job's move.

use serde::{Deserialize, Serialize};

use super::{active_daemon, daemon, filter_rejection, Context, Decision, MAX_EVENTS_PER_UNIT};
use crate::command::{
    CancelMove, CompleteJobMove, FailJobMove, MoveJob, MoveJobs, ReportJobMovePhase,
};
use crate::event::{AssignedJob, AssignmentCause, Event};
use crate::ids::{CommandId, DaemonId, JobId};
use crate::model::{MovePhase, MoveScope};
use crate::rejection::{Kind, Rejection};
use crate::state::{Assignment, State};

/// One job of a move plan.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct PlannedJob {
    pub job: JobId,
    pub head_size_bytes: u64,
    /// The destination's epoch for the job once the move starts.
    pub epoch: u64,
}

/// A check of MISSION rule 3 that the move passed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Check {
    pub name: String,
    pub detail: String,
}

/// What a move will do, shown by a dry run and returned with a real one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct MovePlan {
    pub move_id: CommandId,
    pub scope: MoveScope,
    pub from: DaemonId,
    pub to: DaemonId,
    pub jobs: Vec<PlannedJob>,
    pub checks: Vec<Check>,
    /// Head space the moved jobs use on the source.
    pub needed_bytes: u64,
    pub destination_free_before: u64,
    pub destination_free_after: u64,
}

pub(super) fn move_jobs(c: &MoveJobs, ctx: &Context, state: &State) -> Result<Decision, Rejection> {
    let source = daemon(state, &c.from)?;
    // Decided again after a partial append, the move goes on with the jobs not yet moving.
    let continuing = !c.dry_run && state.moves.contains_key(&ctx.command);
    // Its jobs, and those already moving away from it (which the checks then refuse:
    // another move holds them).
    let jobs: Vec<&JobId> = source
        .jobs
        .iter()
        .chain(state.jobs_moving_from(&c.from))
        .filter(|j| {
            !(continuing
                && matches!(&state.jobs[*j].assignment,
                    Assignment::Moving { move_id, .. } if *move_id == ctx.command))
        })
        .collect();
    if continuing && jobs.is_empty() {
        return Ok(Decision::default());
    }
    if c.from == c.to {
        return Err(Rejection::MoveToSelf {
            daemon: c.to.clone(),
        });
    }
    if jobs.is_empty() {
        return Err(Rejection::NothingToMove {
            daemon: c.from.clone(),
        });
    }
    start_move(
        state,
        ctx,
        MoveRequest {
            scope: MoveScope::AllJobsOf {
                daemon: c.from.clone(),
            },
            from: &c.from,
            to: &c.to,
            jobs,
            reason: &c.reason,
            dry_run: c.dry_run,
            automatic: false,
        },
    )
}

pub(super) fn move_job(c: &MoveJob, ctx: &Context, state: &State) -> Result<Decision, Rejection> {
    let job = state.jobs.get(&c.job).ok_or_else(|| Rejection::NotFound {
        kind: Kind::Job,
        id: c.job.to_string(),
    })?;
    if !c.dry_run && state.moves.contains_key(&ctx.command) {
        return Ok(Decision::default());
    }
    if let Assignment::Moving { move_id, .. } = &job.assignment {
        return Err(Rejection::JobAlreadyMoving {
            job: c.job.clone(),
            move_id: move_id.clone(),
        });
    }
    let from = job.owner().clone();
    start_move(
        state,
        ctx,
        MoveRequest {
            scope: MoveScope::OneJob { job: c.job.clone() },
            from: &from,
            to: &c.to,
            jobs: vec![&c.job],
            reason: &c.reason,
            dry_run: c.dry_run,
            automatic: false,
        },
    )
}

pub(super) fn report_phase(c: &ReportJobMovePhase, state: &State) -> Result<Decision, Rejection> {
    let phase = moving_job(state, &c.job, &c.move_id, c.epoch)?;
    if phase == c.phase {
        return Ok(Decision::default());
    }
    Ok(Decision::one(vec![Event::JobMovePhaseReported {
        job: c.job.clone(),
        move_id: c.move_id.clone(),
        phase: c.phase,
    }]))
}

pub(super) fn complete(c: &CompleteJobMove, state: &State) -> Result<Decision, Rejection> {
    // A reporter that lost the job hears that first: it must stop working on it.
    moving_job(state, &c.job, &c.move_id, c.epoch)?;
    if c.head.is_none() {
        return Err(Rejection::HeadMissing {
            job: c.job.clone(),
            move_id: c.move_id.clone(),
        });
    }
    let job = &state.jobs[&c.job];
    Ok(Decision::one(vec![Event::JobMoveCompleted {
        job: c.job.clone(),
        move_id: c.move_id.clone(),
        daemon: job.owner().clone(),
        epoch: job.epoch,
        head: c.head.clone(),
    }]))
}

pub(super) fn fail(c: &FailJobMove, state: &State) -> Result<Decision, Rejection> {
    moving_job(state, &c.job, &c.move_id, c.epoch)?;
    let job = &state.jobs[&c.job];
    let Assignment::Moving { from, .. } = &job.assignment else {
        unreachable!("moving_job checked the job is moving");
    };
    let epoch = job.epoch + 1;
    Ok(Decision::one(vec![
        Event::JobMoveFailed {
            job: c.job.clone(),
            move_id: c.move_id.clone(),
            reason: c.reason.clone(),
            returned_to: from.clone(),
            epoch,
            cancelled: false,
        },
        Event::JobsAssigned {
            daemon: from.clone(),
            cause: AssignmentCause::MoveFailed {
                move_id: c.move_id.clone(),
            },
            jobs: vec![AssignedJob {
                job: c.job.clone(),
                epoch,
            }],
        },
    ]))
}

/// Cancels a move in progress: each job still moving in it goes back to its previous
/// owner with a new epoch, in units of at most [`MAX_EVENTS_PER_UNIT`] events, the last
/// ending with `MoveCancelled`. Decided again after a partial append, it returns the
/// jobs still moving. An interrupted move whose started jobs are all over is cancelled
/// too (`MoveCancelled` alone): the rest never starts.
pub(super) fn cancel(c: &CancelMove, state: &State) -> Result<Decision, Rejection> {
    // The state keeps a move while it is in progress: one over (or never started) is
    // not found.
    let m = state
        .moves
        .get(&c.move_id)
        .ok_or_else(|| Rejection::NotFound {
            kind: Kind::Move,
            id: c.move_id.to_string(),
        })?;
    // By previous owner, so each unit tells each one once.
    let moving: Vec<(&JobId, &DaemonId, u64)> = m
        .jobs
        .keys()
        .filter_map(|j| {
            let job = state.jobs.get(j)?;
            match &job.assignment {
                Assignment::Moving { move_id, from, .. } if *move_id == c.move_id => {
                    Some((j, from, job.epoch + 1))
                }
                _ => None,
            }
        })
        .collect();
    let mut units = Vec::new();
    // Room for one JobsAssigned per previous owner (one but for a failover's jobs) and
    // the closing MoveCancelled.
    let per_unit = (MAX_EVENTS_PER_UNIT - 1) / 2;
    let mut chunks = moving.chunks(per_unit).peekable();
    if chunks.peek().is_none() {
        units.push(Vec::new());
    }
    for chunk in chunks {
        let mut unit: Vec<Event> = chunk
            .iter()
            .map(|(job, from, epoch)| Event::JobMoveFailed {
                job: (*job).clone(),
                move_id: c.move_id.clone(),
                reason: c.reason.clone(),
                returned_to: (*from).clone(),
                epoch: *epoch,
                cancelled: true,
            })
            .collect();
        let mut back: std::collections::BTreeMap<&DaemonId, Vec<AssignedJob>> = Default::default();
        for (job, from, epoch) in chunk {
            back.entry(from).or_default().push(AssignedJob {
                job: (*job).clone(),
                epoch: *epoch,
            });
        }
        unit.extend(back.into_iter().map(|(daemon, jobs)| Event::JobsAssigned {
            daemon: daemon.clone(),
            cause: AssignmentCause::MoveFailed {
                move_id: c.move_id.clone(),
            },
            jobs,
        }));
        units.push(unit);
    }
    units
        .last_mut()
        .expect("one unit at least")
        .push(Event::MoveCancelled {
            move_id: c.move_id.clone(),
            reason: c.reason.clone(),
            cancelled: moving.len() as u32,
        });
    Ok(Decision { units, plan: None })
}

/// The job is moving in `move_id` and the reporter holds its current epoch.
fn moving_job(
    state: &State,
    job: &JobId,
    move_id: &CommandId,
    epoch: u64,
) -> Result<MovePhase, Rejection> {
    let j = state.jobs.get(job).ok_or_else(|| Rejection::NotFound {
        kind: Kind::Job,
        id: job.to_string(),
    })?;
    let phase = match &j.assignment {
        Assignment::Moving {
            move_id: current,
            phase,
            ..
        } if current == move_id => *phase,
        _ => {
            return Err(Rejection::MoveNotInProgress {
                job: job.clone(),
                move_id: move_id.clone(),
            })
        }
    };
    if epoch != j.epoch {
        return Err(Rejection::StaleEpoch {
            job: job.clone(),
            reported: epoch,
            current: j.epoch,
        });
    }
    Ok(phase)
}

/// The checks of MISSION rule 3 on a destination for some jobs. Returns the checks passed.
fn check_destination(
    state: &State,
    from: &DaemonId,
    to: &DaemonId,
    jobs: &[&JobId],
) -> Result<(Vec<Check>, u64, u64), Rejection> {
    let mut checks = Vec::new();
    let mut pass = |name: &str, detail: String| {
        checks.push(Check {
            name: name.to_owned(),
            detail,
        })
    };
    if from == to {
        return Err(Rejection::MoveToSelf { daemon: to.clone() });
    }
    pass("distinct_daemons", format!("{from} -> {to}"));
    let d = active_daemon(state, to)?;
    pass("destination_registered", format!("{to} is registered"));
    if !d.is_up() {
        return Err(Rejection::DestinationDown { daemon: to.clone() });
    }
    pass("destination_up", format!("{to} is up"));
    if !d.settings.assignment_enabled {
        return Err(Rejection::AssignmentDisabled { daemon: to.clone() });
    }
    pass("assignment_enabled", format!("{to} has assignment enabled"));
    for job in jobs {
        if let Some(Assignment::Moving { move_id, .. }) =
            state.jobs.get(*job).map(|j| &j.assignment)
        {
            return Err(Rejection::JobAlreadyMoving {
                job: (*job).clone(),
                move_id: move_id.clone(),
            });
        }
    }
    pass(
        "no_job_moving",
        format!("none of the {} job(s) is moving", jobs.len()),
    );
    for job in jobs {
        if let Some(r) = filter_rejection(state, job, to, d) {
            return Err(r);
        }
    }
    pass(
        "project_filters",
        format!("{to} passes the daemon and label filters of every job's project"),
    );
    // A daemon's heads can add up to more than a u64 holds (a failed move returns its
    // job whatever the space): such a sum counts as u64::MAX, more than any daemon has,
    // never as what is left after wrapping.
    let needed = jobs
        .iter()
        .filter_map(|j| state.jobs.get(*j))
        .try_fold(0u64, |sum, j| sum.checked_add(j.size.head_size_bytes))
        .unwrap_or(u64::MAX);
    let free = d.free_bytes();
    if free <= needed {
        return Err(Rejection::InsufficientHeadSpace {
            daemon: to.clone(),
            free_bytes: free,
            needed_bytes: needed,
        });
    }
    pass(
        "head_space",
        format!("{to} has {free} bytes free, more than the {needed} the jobs use"),
    );
    Ok((checks, needed, free))
}

/// A move to plan: which jobs, from where to where.
pub(super) struct MoveRequest<'a> {
    pub(super) scope: MoveScope,
    pub(super) from: &'a DaemonId,
    pub(super) to: &'a DaemonId,
    pub(super) jobs: Vec<&'a JobId>,
    pub(super) reason: &'a Option<String>,
    pub(super) dry_run: bool,
    pub(super) automatic: bool,
}

/// Builds the plan and the events of a move.
pub(super) fn start_move(
    state: &State,
    ctx: &Context,
    request: MoveRequest<'_>,
) -> Result<Decision, Rejection> {
    let MoveRequest {
        scope,
        from,
        to,
        jobs,
        reason,
        dry_run,
        automatic,
    } = request;
    let (checks, needed, free) = check_destination(state, from, to, &jobs)?;
    let planned: Vec<PlannedJob> = jobs
        .iter()
        .map(|j| {
            let job = &state.jobs[*j];
            PlannedJob {
                job: (*j).clone(),
                head_size_bytes: job.size.head_size_bytes,
                epoch: job.epoch + 1,
            }
        })
        .collect();
    let plan = MovePlan {
        move_id: ctx.command.clone(),
        scope: scope.clone(),
        from: from.clone(),
        to: to.clone(),
        jobs: planned,
        checks,
        needed_bytes: needed,
        destination_free_before: free,
        destination_free_after: free - needed,
    };
    if dry_run {
        return Ok(Decision {
            units: vec![],
            plan: Some(plan),
        });
    }
    // A continuation of a partly appended move does not start it again.
    let mut head = Vec::new();
    if !state.moves.contains_key(&ctx.command) {
        head.push(Event::MoveStarted {
            move_id: ctx.command.clone(),
            scope,
            from: from.clone(),
            to: to.clone(),
            reason: reason.clone(),
            jobs: plan.jobs.len() as u32,
            automatic,
        });
    }
    let mut units = Vec::new();
    let mut rest = plan.jobs.as_slice();
    while !rest.is_empty() {
        // Room for this unit's JobsAssigned and JobsReleased and, in the first unit,
        // MoveStarted.
        let room = MAX_EVENTS_PER_UNIT - 2 - head.len();
        let (chunk, tail) = rest.split_at(room.min(rest.len()));
        rest = tail;
        let mut unit = std::mem::take(&mut head);
        unit.extend(chunk.iter().map(|p| Event::JobMoveStarted {
            job: p.job.clone(),
            move_id: ctx.command.clone(),
            from: state.jobs[&p.job].owner().clone(),
            to: to.clone(),
            epoch: p.epoch,
            reason: reason.clone(),
        }));
        unit.push(Event::JobsReleased {
            daemon: from.clone(),
            move_id: ctx.command.clone(),
            jobs: chunk.iter().map(|p| p.job.clone()).collect(),
        });
        unit.push(Event::JobsAssigned {
            daemon: to.clone(),
            cause: AssignmentCause::Move {
                move_id: ctx.command.clone(),
            },
            jobs: chunk
                .iter()
                .map(|p| AssignedJob {
                    job: p.job.clone(),
                    epoch: p.epoch,
                })
                .collect(),
        });
        units.push(unit);
    }
    Ok(Decision {
        units,
        plan: Some(plan),
    })
}

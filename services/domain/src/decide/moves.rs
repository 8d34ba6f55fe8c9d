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
    /// Where it goes, in a spread (the plan's `to` otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<DaemonId>,
}

/// One destination of a spread: how many jobs it gets and its head space before and
/// after.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct DestinationPlan {
    pub daemon: DaemonId,
    pub jobs: u32,
    pub needed_bytes: u64,
    pub free_before: u64,
    pub free_after: u64,
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
    /// The first destination's head space (a spread's every destination is in
    /// `destinations`).
    pub destination_free_before: u64,
    pub destination_free_after: u64,
    /// A spread's destinations.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub destinations: Vec<DestinationPlan>,
}

/// The jobs a move of every job of `from` covers: its jobs, and those already moving
/// away from it (which the checks then refuse: another move holds them). Decided again
/// after a partial append (`continuing`), the move goes on with the jobs not yet moving
/// in it; `None` when nothing is left to start, or the move was cancelled meanwhile.
pub(super) fn jobs_of<'a>(
    state: &'a State,
    ctx: &Context,
    from: &'a DaemonId,
    dry_run: bool,
) -> Result<Option<Vec<&'a JobId>>, Rejection> {
    let source = daemon(state, from)?;
    let continuing = !dry_run && state.moves.contains_key(&ctx.command);
    let jobs: Vec<&JobId> = source
        .jobs
        .iter()
        .chain(state.jobs_moving_from(from))
        .filter(|j| {
            !(continuing
                && matches!(&state.jobs[*j].assignment,
                    Assignment::Moving { move_id, .. } if *move_id == ctx.command))
        })
        .collect();
    let cancelled = continuing && state.moves[&ctx.command].cancelled.is_some();
    if continuing && (jobs.is_empty() || cancelled) {
        return Ok(None);
    }
    if jobs.is_empty() {
        return Err(Rejection::NothingToMove {
            daemon: from.clone(),
        });
    }
    Ok(Some(jobs))
}

pub(super) fn move_jobs(c: &MoveJobs, ctx: &Context, state: &State) -> Result<Decision, Rejection> {
    let Some(jobs) = jobs_of(state, ctx, &c.from, c.dry_run)? else {
        return Ok(Decision::default());
    };
    if c.from == c.to {
        return Err(Rejection::MoveToSelf {
            daemon: c.to.clone(),
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
            drain: None,
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
            drain: None,
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

/// Cancels a move in progress: `MoveCancelled` first (nothing more starts), then each job
/// still moving goes back to its previous owner with a new epoch, the destination told
/// to let it go (`JobsReleased` on its subject, before the job's `JobMoveFailed`: what
/// a daemon watching the job reads after its release), in units of at most
/// [`MAX_EVENTS_PER_UNIT`] events. Decided again after a partial append (the move is
/// cancelled already by this command), it sends back the jobs still moving. Refused when
/// another command cancelled the move already, or when a job would go back to a daemon
/// that is down or removed (the move of a failover, say).
pub(super) fn cancel(c: &CancelMove, ctx: &Context, state: &State) -> Result<Decision, Rejection> {
    // The state keeps a move while it is in progress: one over (or never started) is
    // not found.
    let m = state
        .moves
        .get(&c.move_id)
        .ok_or_else(|| Rejection::NotFound {
            kind: Kind::Move,
            id: c.move_id.to_string(),
        })?;
    let moving: Vec<(&JobId, &DaemonId, &DaemonId, u64)> = m
        .jobs
        .keys()
        .filter_map(|j| {
            let job = state.jobs.get(j)?;
            match &job.assignment {
                Assignment::Moving {
                    move_id, from, to, ..
                } if *move_id == c.move_id => Some((j, from, to, job.epoch + 1)),
                _ => None,
            }
        })
        .collect();
    match &m.cancelled {
        Some(earlier) if earlier.by != ctx.command => {
            return Err(Rejection::AlreadyCancelled {
                move_id: c.move_id.clone(),
                by: earlier.by.clone(),
            })
        }
        _ => {}
    }
    for (_, from, _, _) in &moving {
        let back = active_daemon(state, from)?;
        if !back.is_up() {
            return Err(Rejection::DestinationDown {
                daemon: (*from).clone(),
            });
        }
    }
    let mut units = Vec::new();
    let mut head = Vec::new();
    if m.cancelled.is_none() {
        head.push(Event::MoveCancelled {
            move_id: c.move_id.clone(),
            cancel_id: ctx.command.clone(),
            reason: c.reason.clone(),
            cancelled: moving.len() as u32,
        });
        if moving.is_empty() {
            // Only the rest of an interrupted move is left, on its source: an empty
            // release there says nothing more leaves it, and makes a continuation of the
            // move decided before this cancel (its units release from the source) a
            // conflict.
            head.push(Event::JobsReleased {
                daemon: m.from.clone(),
                move_id: c.move_id.clone(),
                jobs: Vec::new(),
            });
        }
    }
    // Per job one event, plus one per destination and per previous owner it brings to
    // the unit: at most three per job.
    let per_unit = (MAX_EVENTS_PER_UNIT - 1) / 3;
    for chunk in moving.chunks(per_unit) {
        let mut unit = std::mem::take(&mut head);
        let mut released: std::collections::BTreeMap<&DaemonId, Vec<JobId>> = Default::default();
        let mut back: std::collections::BTreeMap<&DaemonId, Vec<AssignedJob>> = Default::default();
        for (job, from, to, epoch) in chunk {
            released.entry(to).or_default().push((*job).clone());
            back.entry(from).or_default().push(AssignedJob {
                job: (*job).clone(),
                epoch: *epoch,
            });
        }
        unit.extend(released.into_iter().map(|(to, jobs)| Event::JobsReleased {
            daemon: to.clone(),
            move_id: c.move_id.clone(),
            jobs,
        }));
        unit.extend(
            chunk
                .iter()
                .map(|(job, from, _, epoch)| Event::JobMoveFailed {
                    job: (*job).clone(),
                    move_id: c.move_id.clone(),
                    reason: c.reason.clone(),
                    returned_to: (*from).clone(),
                    epoch: *epoch,
                    cancelled: true,
                }),
        );
        unit.extend(back.into_iter().map(|(daemon, jobs)| Event::JobsAssigned {
            daemon: daemon.clone(),
            cause: AssignmentCause::MoveFailed {
                move_id: c.move_id.clone(),
            },
            jobs,
        }));
        units.push(unit);
    }
    if !head.is_empty() {
        units.push(head);
    }
    Ok(Decision { units, plan: None })
}

/// The events of a move's jobs, each to its destination, in atomic units of at most
/// [`MAX_EVENTS_PER_UNIT`] events: `head` (the move's start) first, then per unit each
/// job's `JobMoveStarted`, the source's `JobsReleased` and each destination's
/// `JobsAssigned` (every aggregate once per unit).
pub(super) fn units_of(
    state: &State,
    ctx: &Context,
    from: &DaemonId,
    mut head: Vec<Event>,
    jobs: &[(&PlannedJob, &DaemonId)],
    reason: &Option<String>,
) -> Vec<Vec<Event>> {
    let mut units = Vec::new();
    let mut rest = jobs;
    while !rest.is_empty() {
        // Room for this unit's JobsReleased and, in the first unit, what `head` holds;
        // each job takes one event, and one more for a destination new to the unit.
        let room = MAX_EVENTS_PER_UNIT - 1 - head.len();
        let mut destinations = std::collections::BTreeSet::new();
        let mut take = 0;
        for (_, to) in rest {
            let new = usize::from(!destinations.contains(to));
            if take + destinations.len() + 1 + new > room {
                break;
            }
            destinations.insert(*to);
            take += 1;
        }
        let (chunk, tail) = rest.split_at(take);
        rest = tail;
        let mut unit = std::mem::take(&mut head);
        unit.extend(chunk.iter().map(|(p, to)| Event::JobMoveStarted {
            job: p.job.clone(),
            move_id: ctx.command.clone(),
            from: state.jobs[&p.job].owner().clone(),
            to: (*to).clone(),
            epoch: p.epoch,
            reason: reason.clone(),
        }));
        unit.push(Event::JobsReleased {
            daemon: from.clone(),
            move_id: ctx.command.clone(),
            jobs: chunk.iter().map(|(p, _)| p.job.clone()).collect(),
        });
        let mut assigned: std::collections::BTreeMap<&DaemonId, Vec<AssignedJob>> =
            Default::default();
        for (p, to) in chunk {
            assigned.entry(*to).or_default().push(AssignedJob {
                job: p.job.clone(),
                epoch: p.epoch,
            });
        }
        unit.extend(assigned.into_iter().map(|(to, jobs)| Event::JobsAssigned {
            daemon: to.clone(),
            cause: AssignmentCause::Move {
                move_id: ctx.command.clone(),
            },
            jobs,
        }));
        units.push(unit);
    }
    units
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
pub(super) fn check_destination(
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
    /// One job's move of this drain.
    pub(super) drain: Option<CommandId>,
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
        drain,
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
                to: None,
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
        destinations: Vec::new(),
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
            spread: None,
            drain,
        });
    }
    let destined: Vec<(&PlannedJob, &DaemonId)> = plan.jobs.iter().map(|p| (p, to)).collect();
    let units = units_of(state, ctx, from, head, &destined, reason);
    Ok(Decision {
        units,
        plan: Some(plan),
    })
}

//! A spread: every job of a daemon moved over several destinations in one move, each job
//! placed by the failover policy's rules (eligible daemons only; the fewest rebuilds,
//! then the most free head space, then the fewest jobs), counting what the plan has
//! already put on each, and (no destination named) never the daemon an operator moved
//! the job away from. Each destination passes the checks of an operator's move for the
//! jobs it gets.

use std::collections::BTreeMap;

use super::moves::{check_destination, jobs_of, units_of, DestinationPlan, MovePlan, PlannedJob};
use super::{active_daemon, filter_rejection, Context, Decision};
use crate::command::SpreadJobs;
use crate::event::Event;
use crate::ids::{CommandId, DaemonId, JobId, ProjectId};
use crate::model::MoveScope;
use crate::rejection::Rejection;
use crate::state::{Assignment, State};

/// Each job of a plan with the daemon it goes to.
type Placed<'a> = Vec<(&'a JobId, &'a DaemonId)>;

/// What a destination holds as the plan fills it.
struct Room<'a> {
    daemon: &'a DaemonId,
    free: u64,
    rebuilding: u32,
    jobs: u32,
}

pub(super) fn spread_jobs(
    c: &SpreadJobs,
    ctx: &Context,
    state: &State,
) -> Result<Decision, Rejection> {
    let Some(jobs) = jobs_of(state, ctx, &c.from, c.dry_run)? else {
        return Ok(Decision::default());
    };
    for j in &jobs {
        if let Assignment::Moving { move_id, .. } = &state.jobs[*j].assignment {
            return Err(Rejection::JobAlreadyMoving {
                job: (*j).clone(),
                move_id: move_id.clone(),
            });
        }
    }
    let continuing = state.moves.contains_key(&ctx.command);
    let (plan, destined) = plan_spread(state, &ctx.command, &c.from, &c.to, jobs, continuing)?;
    if c.dry_run {
        return Ok(Decision {
            units: vec![],
            plan: Some(plan),
        });
    }
    let mut head = Vec::new();
    if !state.moves.contains_key(&ctx.command) {
        head.push(Event::MoveStarted {
            move_id: ctx.command.clone(),
            scope: plan.scope.clone(),
            from: c.from.clone(),
            to: plan.to.clone(),
            reason: c.reason.clone(),
            jobs: plan.jobs.len() as u32,
            automatic: false,
            spread: Some(c.to.clone()),
            drain: None,
        });
    }
    let jobs: Vec<(&PlannedJob, &DaemonId)> = plan
        .jobs
        .iter()
        .zip(&destined)
        .map(|(p, (_, to))| (p, *to))
        .collect();
    let units = units_of(state, ctx, &c.from, head, &jobs, &c.reason);
    Ok(Decision {
        units,
        plan: Some(plan),
    })
}

/// Places `jobs` (not empty, none moving) over `to` (empty: every eligible daemon) and
/// checks each destination as an operator's move would: the plan of a move `move_id`
/// away from `from`, and each job with where it goes. Decided again after a partial
/// append (`continuing`), a named destination that cannot take jobs any more is skipped.
pub(super) fn plan_spread<'a>(
    state: &'a State,
    move_id: &CommandId,
    from: &DaemonId,
    to: &'a [DaemonId],
    mut jobs: Vec<&'a JobId>,
    continuing: bool,
) -> Result<(MovePlan, Placed<'a>), Rejection> {
    // The destinations allowed: those named, each of which must be able to take jobs as
    // an operator's move requires (or the refusal says why; decided again after a
    // partial append, one that cannot any more is skipped), or, none named, every daemon
    // the failover policy may choose: up, with assignment and backup jobs enabled.
    let rebuilding = state.rebuilding();
    let mut rooms: Vec<Room> = Vec::new();
    if to.is_empty() {
        for (id, d) in &state.daemons {
            if id != from
                && d.is_up()
                && d.settings.assignment_enabled
                && d.settings.backup_jobs_enabled
            {
                rooms.push(Room {
                    daemon: id,
                    free: d.free_bytes(),
                    rebuilding: rebuilding.get(id).copied().unwrap_or(0),
                    jobs: d.jobs.len() as u32,
                });
            }
        }
    } else {
        for id in to {
            if id == from {
                return Err(Rejection::MoveToSelf { daemon: id.clone() });
            }
            let unfit = match active_daemon(state, id) {
                Err(r) => Some(r),
                Ok(d) if !d.is_up() => Some(Rejection::DestinationDown { daemon: id.clone() }),
                Ok(d) if !d.settings.assignment_enabled => {
                    Some(Rejection::AssignmentDisabled { daemon: id.clone() })
                }
                Ok(_) => None,
            };
            match unfit {
                Some(_) if continuing => continue,
                Some(r) => return Err(r),
                None => {}
            }
            let d = &state.daemons[id];
            let (key, _) = state.daemons.get_key_value(id).expect("an active daemon");
            rooms.push(Room {
                daemon: key,
                free: d.free_bytes(),
                rebuilding: rebuilding.get(id).copied().unwrap_or(0),
                jobs: d.jobs.len() as u32,
            });
        }
    }
    // The largest heads first, where the most room is left; ties by id.
    jobs.sort_by_key(|j| (std::cmp::Reverse(state.jobs[*j].size.head_size_bytes), *j));
    let mut placed: BTreeMap<&DaemonId, Vec<&JobId>> = BTreeMap::new();
    let mut destined: Vec<(&JobId, &DaemonId)> = Vec::new();
    // Which rooms pass each project's filters, worked out once per project.
    let mut passes: BTreeMap<ProjectId, Vec<bool>> = BTreeMap::new();
    for j in &jobs {
        let size = state.jobs[*j].size.head_size_bytes;
        let fits = passes.entry(j.project()).or_insert_with(|| {
            rooms
                .iter()
                .map(|r| filter_rejection(state, j, r.daemon, &state.daemons[r.daemon]).is_none())
                .collect()
        });
        let best = rooms
            .iter_mut()
            .zip(fits.iter())
            // Placed by the policy (none named): never where an operator moved it from.
            .filter(|(r, fits)| {
                **fits
                    && r.free > size
                    && (!to.is_empty()
                        || state.jobs[*j].operator_moved_from.as_ref() != Some(r.daemon))
            })
            .map(|(r, _)| r)
            .min_by_key(|r| (r.rebuilding, std::cmp::Reverse(r.free), r.jobs, r.daemon));
        let Some(best) = best else {
            return Err(Rejection::BindFailure {
                job: (*j).clone(),
                detail: format!(
                    "no destination of the spread ({}) is up and takes jobs, has room for its {size} bytes left by the jobs placed before it, and passes its project's filters",
                    if to.is_empty() {
                        "any daemon".to_owned()
                    } else {
                        format!("{} daemon(s) named", to.len())
                    }
                ),
            });
        };
        best.free -= size;
        best.rebuilding += 1;
        best.jobs += 1;
        placed.entry(best.daemon).or_default().push(j);
        destined.push((j, best.daemon));
    }
    // Each destination passes the checks of a move of its jobs.
    let mut checks = Vec::new();
    let mut destinations = Vec::new();
    for (to, its) in &placed {
        let (passed, needed, free) = check_destination(state, from, to, its)?;
        checks.extend(passed.into_iter().map(|mut check| {
            check.name = format!("{}: {}", to, check.name);
            check
        }));
        destinations.push(DestinationPlan {
            daemon: (*to).clone(),
            jobs: its.len() as u32,
            needed_bytes: needed,
            free_before: free,
            free_after: free - needed,
        });
    }
    let planned: Vec<PlannedJob> = destined
        .iter()
        .map(|(j, to)| PlannedJob {
            job: (*j).clone(),
            head_size_bytes: state.jobs[*j].size.head_size_bytes,
            epoch: state.jobs[*j].epoch + 1,
            to: Some((*to).clone()),
        })
        .collect();
    let first = &destinations[0];
    let plan = MovePlan {
        move_id: move_id.clone(),
        scope: MoveScope::AllJobsOf {
            daemon: from.clone(),
        },
        from: from.clone(),
        to: first.daemon.clone(),
        // As `check_destination` adds heads up: a sum past u64 counts as u64::MAX.
        needed_bytes: destinations
            .iter()
            .try_fold(0u64, |sum, d| sum.checked_add(d.needed_bytes))
            .unwrap_or(u64::MAX),
        destination_free_before: first.free_before,
        destination_free_after: first.free_after,
        jobs: planned,
        checks,
        destinations,
    };
    Ok((plan, destined))
}

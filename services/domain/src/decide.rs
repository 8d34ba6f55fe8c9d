//! `decide`: a command and the current state in, the events to append (or a rejection)
//! out. Pure and deterministic: the clock and the caller come in with the context.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::alert::{AlertKey, AlertKind, FLEET};
use crate::auth::Role;
use crate::command::*;
use crate::event::{AssignedJob, AssignmentCause, Candidate, Event, FailoverInputs};
use crate::ids::{Actor, CommandId, DaemonId, JobId};
use crate::model::HeadDiskType;
use crate::model::{
    Deployment, JobSize, JobTarget, MovePhase, MoveScope, SSD_OPLOG_RATE_BYTES_PER_HOUR,
};
use crate::rejection::{Kind, Rejection};
use crate::state::{Assignment, Daemon, DaemonStatus, State};

/// The most events one atomic unit may hold (JetStream's atomic batch limit).
pub const MAX_EVENTS_PER_UNIT: usize = 1000;

/// Who asks, and when. Supplied by the command service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Context {
    pub command: CommandId,
    pub actor: Actor,
    /// Milliseconds since the Unix epoch, from the command service's clock.
    pub at_ms: u64,
}

/// What the command leads to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Decision {
    /// Events to append, in units: each unit is appended atomically, units in order.
    /// No unit holds two events of the same aggregate or more than
    /// [`MAX_EVENTS_PER_UNIT`] events. Empty: nothing to do.
    pub units: Vec<Vec<Event>>,
    /// For moves: the plan, with the checks that passed.
    pub plan: Option<MovePlan>,
}

impl Decision {
    fn one(events: Vec<Event>) -> Self {
        Decision {
            units: if events.is_empty() {
                vec![]
            } else {
                vec![events]
            },
            plan: None,
        }
    }

    pub fn events(&self) -> impl Iterator<Item = &Event> {
        self.units.iter().flatten()
    }
}

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

/// Decides a command against the state.
pub fn decide(command: &Command, ctx: &Context, state: &State) -> Result<Decision, Rejection> {
    command.validate()?;
    match command {
        Command::RegisterDaemon(c) => match state.daemons.get(&c.daemon) {
            Some(d) if d.status != DaemonStatus::Removed => Err(Rejection::AlreadyExists {
                kind: Kind::Daemon,
                id: c.daemon.to_string(),
            }),
            _ => Ok(Decision::one(vec![Event::DaemonRegistered {
                daemon: c.daemon.clone(),
                settings: c.settings.clone(),
            }])),
        },
        Command::ConfigureDaemon(c) => {
            active_daemon(state, &c.daemon)?;
            Ok(Decision::one(vec![Event::DaemonConfigured {
                daemon: c.daemon.clone(),
                settings: c.settings.clone(),
            }]))
        }
        Command::RemoveDaemon(c) => {
            let d = active_daemon(state, &c.daemon)?;
            let jobs = d.jobs.len() + state.jobs_moving_from(&c.daemon).count();
            if jobs > 0 {
                return Err(Rejection::DaemonHasJobs {
                    daemon: c.daemon.clone(),
                    jobs,
                });
            }
            Ok(Decision::one(vec![Event::DaemonRemoved {
                daemon: c.daemon.clone(),
            }]))
        }
        Command::ReportDaemonLiveness(c) => {
            let d = active_daemon(state, &c.daemon)?;
            let event = match (d.is_up(), c.up) {
                (true, true) | (false, false) => None,
                (false, true) => Some(Event::DaemonUp {
                    daemon: c.daemon.clone(),
                }),
                (true, false) => Some(Event::DaemonDown {
                    daemon: c.daemon.clone(),
                }),
            };
            Ok(Decision::one(event.into_iter().collect()))
        }
        Command::ConfigureProject(c) => Ok(Decision::one(vec![Event::ProjectConfigured {
            project: c.project.clone(),
            daemon_filter: c.daemon_filter.iter().cloned().collect(),
            label_filter: c.label_filter.iter().cloned().collect(),
        }])),
        Command::CreateBackupJobs(c) => create_backup_jobs(c, state),
        Command::MoveJobs(c) => move_jobs(c, ctx, state),
        Command::MoveJob(c) => move_job(c, ctx, state),
        Command::ReportJobMovePhase(c) => {
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
        Command::CompleteJobMove(c) => {
            moving_job(state, &c.job, &c.move_id, c.epoch)?;
            let job = &state.jobs[&c.job];
            Ok(Decision::one(vec![Event::JobMoveCompleted {
                job: c.job.clone(),
                move_id: c.move_id.clone(),
                daemon: job.owner().clone(),
                epoch: job.epoch,
                head: c.head.clone(),
            }]))
        }
        Command::ResizeOplogTtl(c) => {
            if !state.jobs.contains_key(&c.job) {
                return Err(Rejection::NotFound {
                    kind: Kind::Job,
                    id: c.job.to_string(),
                });
            }
            Ok(Decision::one(vec![Event::OplogTtlResized {
                job: c.job.clone(),
                previous_hours: c.previous_hours,
                hours: c.hours,
                reason: c.reason.clone(),
            }]))
        }
        Command::AddUser(c) => {
            if state.users.contains_key(&c.user) {
                return Err(Rejection::AlreadyExists {
                    kind: Kind::User,
                    id: c.user.to_string(),
                });
            }
            if let Some((owner, _)) = state.users.iter().find(|(_, u)| u.key == c.key) {
                return Err(Rejection::KeyInUse {
                    user: owner.clone(),
                });
            }
            Ok(Decision::one(vec![Event::UserAdded {
                user: c.user.clone(),
                roles: c.roles.iter().copied().collect(),
                key: c.key.clone(),
                daemon: c.daemon.clone(),
            }]))
        }
        Command::RemoveUser(c) => {
            let Some(user) = state.users.get(&c.user) else {
                return Err(Rejection::NotFound {
                    kind: Kind::User,
                    id: c.user.to_string(),
                });
            };
            let owners = state
                .users
                .values()
                .filter(|u| u.roles.contains(&Role::GlobalOwner))
                .count();
            if user.roles.contains(&Role::GlobalOwner) && owners == 1 {
                return Err(Rejection::LastOwner {
                    user: c.user.clone(),
                });
            }
            Ok(Decision::one(vec![Event::UserRemoved {
                user: c.user.clone(),
            }]))
        }
        Command::ReportHeadSpace(c) => {
            let d = active_daemon(state, &c.daemon)?;
            let total = d.settings.head_space_bytes;
            let free = d.free_bytes();
            let low = total > 0
                && u128::from(free) * 100 < u128::from(total) * u128::from(c.threshold_percent);
            let open = state
                .alerts
                .contains(&AlertKey::new(AlertKind::LowHeadFreeSpace, &c.daemon));
            let event = match (low, open) {
                (true, false) => Some(Event::HeadSpaceLow {
                    daemon: c.daemon.clone(),
                    free_bytes: free,
                    head_space_bytes: total,
                    threshold_percent: c.threshold_percent,
                }),
                (false, true) => Some(Event::HeadSpaceRecovered {
                    daemon: c.daemon.clone(),
                    free_bytes: free,
                    head_space_bytes: total,
                }),
                _ => None,
            };
            Ok(Decision::one(event.into_iter().collect()))
        }
        Command::ReportMoveStuck(c) => {
            let j = state.jobs.get(&c.job).ok_or_else(|| Rejection::NotFound {
                kind: Kind::Job,
                id: c.job.to_string(),
            })?;
            let phase = match &j.assignment {
                Assignment::Moving { move_id, phase, .. } if *move_id == c.move_id => *phase,
                _ => {
                    return Err(Rejection::MoveNotInProgress {
                        job: c.job.clone(),
                        move_id: c.move_id.clone(),
                    })
                }
            };
            if state
                .alerts
                .contains(&AlertKey::new(AlertKind::MoveStuck, &c.job))
            {
                return Ok(Decision::default());
            }
            Ok(Decision::one(vec![Event::MoveStuck {
                job: c.job.clone(),
                move_id: c.move_id.clone(),
                phase,
                idle_ms: c.idle_ms,
            }]))
        }
        Command::ReportFailoverGuard(c) => {
            let (down, active) = state.down_of_active();
            let tripped = guard_tripped(down.len() as u32, active, c.max_down_percent);
            let paused = state
                .alerts
                .contains(&AlertKey::new(AlertKind::FailoverPaused, FLEET));
            let event = match (tripped, paused) {
                (true, false) => Some(Event::FailoverPaused {
                    down,
                    active,
                    max_down_percent: c.max_down_percent,
                }),
                (false, true) => Some(Event::FailoverResumed { down, active }),
                _ => None,
            };
            Ok(Decision::one(event.into_iter().collect()))
        }
        Command::FailoverJob(c) => failover_job(c, ctx, state),
        Command::FailJobMove(c) => {
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
    }
}

fn daemon<'a>(state: &'a State, id: &DaemonId) -> Result<&'a Daemon, Rejection> {
    state.daemons.get(id).ok_or_else(|| Rejection::NotFound {
        kind: Kind::Daemon,
        id: id.to_string(),
    })
}

fn active_daemon<'a>(state: &'a State, id: &DaemonId) -> Result<&'a Daemon, Rejection> {
    let d = daemon(state, id)?;
    if d.status == DaemonStatus::Removed {
        return Err(Rejection::DaemonRemoved { daemon: id.clone() });
    }
    Ok(d)
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

/// Why `daemon` may not hold a job of `project`, if it may not.
fn filter_rejection(
    state: &State,
    job: &JobId,
    daemon_id: &DaemonId,
    d: &Daemon,
) -> Option<Rejection> {
    let project = job.project();
    let p = state.projects.get(&project)?;
    if !p.daemon_filter.is_empty() && !p.daemon_filter.contains(daemon_id) {
        return Some(Rejection::DaemonFilterMismatch {
            job: job.clone(),
            project,
            daemon: daemon_id.clone(),
        });
    }
    let missing: Vec<_> = p
        .label_filter
        .difference(&d.settings.labels)
        .cloned()
        .collect();
    if !missing.is_empty() {
        return Some(Rejection::LabelMismatch {
            job: job.clone(),
            project,
            daemon: daemon_id.clone(),
            missing,
        });
    }
    None
}

fn create_backup_jobs(c: &CreateBackupJobs, state: &State) -> Result<Decision, Rejection> {
    if !state.projects.contains_key(&c.project) {
        return Err(Rejection::NotFound {
            kind: Kind::Project,
            id: c.project.to_string(),
        });
    }
    let mut wanted: Vec<(JobId, JobTarget, JobSize)> = Vec::new();
    match &c.deployment {
        Deployment::ReplicaSet { name, size } => wanted.push((
            JobId::of(&c.project, name, None),
            JobTarget::ReplicaSet { name: name.clone() },
            *size,
        )),
        Deployment::ShardedCluster {
            name,
            shards,
            config_servers,
        } => {
            for s in shards {
                wanted.push((
                    JobId::of(&c.project, name, Some(s.name.as_str())),
                    JobTarget::Shard {
                        cluster: name.clone(),
                        shard: s.name.clone(),
                    },
                    s.size,
                ));
            }
            wanted.push((
                JobId::of(&c.project, name, Some("config")),
                JobTarget::ConfigServers {
                    cluster: name.clone(),
                },
                *config_servers,
            ));
        }
    }
    if let Some((job, ..)) = wanted.iter().find(|(j, ..)| state.jobs.contains_key(j)) {
        return Err(Rejection::AlreadyExists {
            kind: Kind::Job,
            id: job.to_string(),
        });
    }

    // Head space taken by the jobs placed so far in this command.
    let mut reserved: BTreeMap<&DaemonId, (u64, usize)> = BTreeMap::new();
    let mut created = Vec::new();
    let mut assigned: BTreeMap<DaemonId, Vec<AssignedJob>> = BTreeMap::new();
    for (job, target, size) in wanted {
        let chosen = place(state, &job, &size, &reserved)?;
        let r = reserved.entry(chosen).or_default();
        r.0 += size.head_size_bytes;
        r.1 += 1;
        assigned
            .entry(chosen.clone())
            .or_default()
            .push(AssignedJob {
                job: job.clone(),
                epoch: 1,
            });
        created.push(Event::BackupJobCreated {
            job,
            project: c.project.clone(),
            target,
            size,
            daemon: chosen.clone(),
            epoch: 1,
        });
    }
    created.extend(
        assigned
            .into_iter()
            .map(|(daemon, jobs)| Event::JobsAssigned {
                daemon,
                cause: AssignmentCause::Placement,
                jobs,
            }),
    );
    Ok(Decision::one(created))
}

/// Ops Manager's binding: up, assignment and backup jobs enabled, the project's filters,
/// room for the head; HDD unless the oplog runs at 1 GB/h or more (or no HDD daemon can
/// take it); least loaded first.
fn place<'a>(
    state: &'a State,
    job: &JobId,
    size: &JobSize,
    reserved: &BTreeMap<&DaemonId, (u64, usize)>,
) -> Result<&'a DaemonId, Rejection> {
    let mut candidates: Vec<(&DaemonId, &Daemon, u64, usize)> = Vec::new();
    let mut seen_any = false;
    for (id, d) in &state.daemons {
        if !(d.is_up() && d.settings.assignment_enabled && d.settings.backup_jobs_enabled) {
            continue;
        }
        if filter_rejection(state, job, id, d).is_some() {
            continue;
        }
        seen_any = true;
        let (extra_bytes, extra_jobs) = reserved.get(id).copied().unwrap_or_default();
        let free = d.free_bytes().saturating_sub(extra_bytes);
        if free < size.head_size_bytes {
            continue;
        }
        candidates.push((id, d, free, d.jobs.len() + extra_jobs));
    }
    let preferred = if size.oplog_bytes_per_hour >= SSD_OPLOG_RATE_BYTES_PER_HOUR {
        HeadDiskType::Ssd
    } else {
        HeadDiskType::Hdd
    };
    // Preferred disk type, then fewest jobs, then most free space, then id.
    let best = candidates.iter().min_by_key(|(id, d, free, jobs)| {
        (
            d.settings.head_disk_type != preferred,
            *jobs,
            std::cmp::Reverse(*free),
            *id,
        )
    });
    match best {
        Some((id, ..)) => Ok(id),
        None => Err(Rejection::BindFailure {
            job: job.clone(),
            detail: if seen_any {
                format!(
                    "no eligible daemon has {} bytes of head space free",
                    size.head_size_bytes
                )
            } else {
                "no daemon is up with assignment and backup jobs enabled and passing the \
                 project's filters"
                    .to_owned()
            },
        }),
    }
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
    let needed: u64 = jobs
        .iter()
        .filter_map(|j| state.jobs.get(*j))
        .map(|j| j.size.head_size_bytes)
        .sum();
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
struct MoveRequest<'a> {
    scope: MoveScope,
    from: &'a DaemonId,
    to: &'a DaemonId,
    jobs: Vec<&'a JobId>,
    reason: &'a Option<String>,
    dry_run: bool,
    automatic: bool,
}

/// Builds the plan and the events of a move.
fn start_move(
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

fn move_jobs(c: &MoveJobs, ctx: &Context, state: &State) -> Result<Decision, Rejection> {
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

/// The alert a rejected command raises, if any: a backup that could not be created for
/// want of a daemon (BIND_FAILURE), unless that alert is open already. The command
/// service appends it although the command itself appends nothing.
pub fn alert_of_rejection(
    command: &Command,
    rejection: &Rejection,
    state: &State,
) -> Option<Event> {
    match (command, rejection) {
        (Command::CreateBackupJobs(c), Rejection::BindFailure { job, detail })
            if !state
                .alerts
                .contains(&AlertKey::new(AlertKind::BindFailure, job)) =>
        {
            Some(Event::BindFailed {
                job: job.clone(),
                project: c.project.clone(),
                detail: detail.clone(),
            })
        }
        _ => None,
    }
}

/// More than `max_down_percent` of the active daemons are down.
fn guard_tripped(down: u32, active: u32, max_down_percent: u32) -> bool {
    active > 0 && u64::from(down) * 100 > u64::from(active) * u64::from(max_down_percent)
}

/// The daemons the failover policy may move `job` to, best first: the fewest rebuilds
/// in progress, then the most free head space, then the fewest jobs. Never the job's
/// daemon, never one an operator moved the job away from.
pub fn failover_candidates(state: &State, job: &JobId) -> Vec<Candidate> {
    let Some(j) = state.jobs.get(job) else {
        return vec![];
    };
    let needed = j.size.head_size_bytes;
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
            rebuilding: state.rebuilding_on(id),
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
fn failover_job(c: &FailoverJob, ctx: &Context, state: &State) -> Result<Decision, Rejection> {
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

fn move_job(c: &MoveJob, ctx: &Context, state: &State) -> Result<Decision, Rejection> {
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

//! `decide`: a command and the current state in, the events to append (or a rejection)
//! out. Pure and deterministic: the clock and the caller come in with the context.
//!
//! [`decide`] checks the command's form and dispatches it to the file of the aggregate
//! it is about; this file keeps what several of them share (looking up a daemon, the
//! project filters, the failover guard).
//!
//! - `daemons`: register, configure, remove, liveness.
//! - `users`: add and remove users (the last GLOBAL_OWNER stays).
//! - `jobs`: projects and their backup jobs: creation with placement, oplog TTL reports.
//! - `moves`: the checks of a move, its plan and events, and the destination's reports.
//! - `spread`: a move of a daemon's jobs over several destinations, placed by the
//!   failover policy's rules.
//! - `drains`: a daemon's jobs moved away a few at a time, each placed as the failover
//!   policy places a job.
//! - `failover`: the automatic failover policy, which starts a move as `moves` does.
//! - `alerts`: the monitor's reports that raise and close alerts, and the alert of a
//!   rejection.

use serde::{Deserialize, Serialize};

use crate::command::Command;
use crate::event::Event;
use crate::ids::{Actor, CommandId, DaemonId, JobId};
use crate::rejection::{Kind, Rejection};
use crate::state::{Daemon, DaemonStatus, State};

mod alerts;
mod daemons;
mod drains;
mod failover;
mod jobs;
mod moves;
mod spread;
mod users;

pub use alerts::alert_of_rejection;
pub use failover::failover_candidates;
pub use moves::{Check, DestinationPlan, MovePlan, PlannedJob};

/// The most events one atomic unit may hold: JetStream's atomic batch limit (1,000) less
/// the one message the command service adds to a command's first unit, its
/// `CommandAccepted` (decision 0010).
pub const MAX_EVENTS_PER_UNIT: usize = 999;

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

/// Decides a command against the state.
pub fn decide(command: &Command, ctx: &Context, state: &State) -> Result<Decision, Rejection> {
    command.validate()?;
    match command {
        Command::RegisterDaemon(c) => daemons::register(c, state),
        Command::ConfigureDaemon(c) => daemons::configure(c, state),
        Command::RemoveDaemon(c) => daemons::remove(c, state),
        Command::ReportDaemonLiveness(c) => daemons::report_liveness(c, state),
        Command::AddUser(c) => users::add(c, state),
        Command::RemoveUser(c) => users::remove(c, state),
        Command::ConfigureProject(c) => jobs::configure_project(c),
        Command::CreateBackupJobs(c) => jobs::create_backup_jobs(c, state),
        Command::ResizeOplogTtl(c) => jobs::resize_oplog_ttl(c, state),
        Command::MoveJobs(c) => moves::move_jobs(c, ctx, state),
        Command::MoveJob(c) => moves::move_job(c, ctx, state),
        Command::SpreadJobs(c) => spread::spread_jobs(c, ctx, state),
        Command::ReportJobMovePhase(c) => moves::report_phase(c, state),
        Command::CompleteJobMove(c) => moves::complete(c, state),
        Command::FailJobMove(c) => moves::fail(c, state),
        Command::CancelMove(c) => moves::cancel(c, ctx, state),
        Command::DrainDaemon(c) => drains::drain(c, ctx, state),
        Command::ContinueDrain(c) => drains::next(c, ctx, state),
        Command::CancelDrain(c) => drains::cancel(c, ctx, state),
        Command::FailoverJob(c) => failover::failover_job(c, ctx, state),
        Command::ReportHeadSpace(c) => alerts::report_head_space(c, state),
        Command::ReportMoveStuck(c) => alerts::report_move_stuck(c, state),
        Command::ReportFailoverGuard(c) => alerts::report_failover_guard(c, state),
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

/// More than `max_down_percent` of the active daemons are down.
fn guard_tripped(down: u32, active: u32, max_down_percent: u32) -> bool {
    active > 0 && u64::from(down) * 100 > u64::from(active) * u64::from(max_down_percent)
}

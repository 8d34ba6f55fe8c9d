//! Who may do what (MISSION rule 1): Ops Manager's global roles for people, and roles for
//! the processes that report on their own work. Pure: the caller's identity comes in
//! verified (a signed command, checked by the command service), the rules live here.
//!
//! | command | who may send it |
//! |---------|-----------------|
//! | `MoveJobs`, `MoveJob` | GLOBAL_OWNER, GLOBAL_BACKUP_ADMIN |
//! | `RegisterDaemon`, `ConfigureDaemon`, `RemoveDaemon` | GLOBAL_OWNER, GLOBAL_BACKUP_ADMIN; `RegisterDaemon` also the daemon itself |
//! | `ReportDaemonLiveness` | BACKUP_MONITOR; GLOBAL_OWNER, GLOBAL_BACKUP_ADMIN |
//! | `ReportHeadSpace`, `ReportMoveStuck`, `ReportFailoverGuard`, `FailoverJob` | BACKUP_MONITOR |
//! | `ConfigureProject`, `CreateBackupJobs` | GLOBAL_OWNER, GLOBAL_BACKUP_ADMIN |
//! | `ReportJobMovePhase`, `CompleteJobMove` | the move's destination daemon |
//! | `FailJobMove` | the move's destination daemon; GLOBAL_OWNER, GLOBAL_BACKUP_ADMIN |
//! | `ResizeOplogTtl` | BACKUP_AGENT |
//! | `AddUser`, `RemoveUser` | GLOBAL_OWNER |
//! | reading (queries, history) | any role |
//!
//! GLOBAL_READ_ONLY sends no command at all.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::command::Command;
use crate::ids::{Actor, DaemonId, JobId};
use crate::state::{Assignment, State};

// Role and User sit below the commands, events and state that carry them; their old paths
// here stay for callers.
pub use crate::model::Role;

/// A verified caller: its name, roles, and for a daemon, which daemon it is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Principal {
    pub user: Actor,
    pub roles: BTreeSet<Role>,
    /// Set for a daemon's credentials: it may act only as this daemon.
    pub daemon: Option<DaemonId>,
}

/// Why a caller may not send a command.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[error("{user} may not {command}: {reason}")]
pub struct Forbidden {
    pub user: Actor,
    pub command: &'static str,
    pub reason: String,
}

const ADMINS: &[Role] = &[Role::GlobalOwner, Role::GlobalBackupAdmin];

impl Principal {
    /// The caller `user` as the state knows it, if it is a current user.
    pub fn of(state: &State, user: &Actor) -> Option<Principal> {
        state.users.get(user).map(|u| Principal {
            user: user.clone(),
            roles: u.roles.clone(),
            daemon: u.daemon.clone(),
        })
    }

    fn has_any(&self, roles: &[Role]) -> bool {
        roles.iter().any(|r| self.roles.contains(r))
    }

    fn is_daemon(&self, daemon: &DaemonId) -> bool {
        self.roles.contains(&Role::BackupDaemon) && self.daemon.as_ref() == Some(daemon)
    }
}

/// Whether `who` may send `command` in `state` (the daemon rules look at the job's move).
pub fn authorize(who: &Principal, command: &Command, state: &State) -> Result<(), Forbidden> {
    let deny = |reason: String| {
        Err(Forbidden {
            user: who.user.clone(),
            command: command.name(),
            reason,
        })
    };
    let needs_admin = || -> Result<(), Forbidden> {
        if who.has_any(ADMINS) {
            Ok(())
        } else {
            deny("it needs GLOBAL_OWNER or GLOBAL_BACKUP_ADMIN".into())
        }
    };
    let needs = |role: Role, reason: &str| -> Result<(), Forbidden> {
        if who.roles.contains(&role) {
            Ok(())
        } else {
            deny(reason.to_owned())
        }
    };
    // The daemon a job is moving to, if it is moving.
    let destination = |job: &JobId| {
        state.jobs.get(job).and_then(|j| match &j.assignment {
            Assignment::Moving { to, .. } => Some(to.clone()),
            _ => None,
        })
    };
    let destination_only = |job: &JobId| -> Result<(), Forbidden> {
        match destination(job) {
            Some(to) if who.is_daemon(&to) => Ok(()),
            Some(to) => deny(format!(
                "only {to}, the destination of the job's move, reports on it"
            )),
            // Not moving (any more): a daemon hears the domain's answer (the move is
            // over), which tells it to let the job go.
            None if who.roles.contains(&Role::BackupDaemon) => Ok(()),
            None => deny(format!("job {job} is not moving")),
        }
    };
    match command {
        Command::MoveJobs(_)
        | Command::MoveJob(_)
        | Command::SpreadJobs(_)
        | Command::CancelMove(_)
        | Command::DrainDaemon(_)
        | Command::ContinueDrain(_)
        | Command::CancelDrain(_)
        | Command::ConfigureDaemon(_)
        | Command::RemoveDaemon(_)
        | Command::ConfigureProject(_)
        | Command::CreateBackupJobs(_) => needs_admin(),
        Command::RegisterDaemon(c) => {
            if who.has_any(ADMINS) || who.is_daemon(&c.daemon) {
                Ok(())
            } else {
                deny("a daemon registers only itself; others need GLOBAL_OWNER or GLOBAL_BACKUP_ADMIN".into())
            }
        }
        Command::ReportJobMovePhase(c) => destination_only(&c.job),
        Command::CompleteJobMove(c) => destination_only(&c.job),
        Command::FailJobMove(c) => {
            if who.has_any(ADMINS) {
                Ok(())
            } else {
                destination_only(&c.job)
            }
        }
        Command::AddUser(_) | Command::RemoveUser(_) => {
            needs(Role::GlobalOwner, "managing users needs GLOBAL_OWNER")
        }
        Command::ReportDaemonLiveness(_) => {
            if who.roles.contains(&Role::BackupMonitor) {
                Ok(())
            } else {
                needs_admin()
            }
        }
        Command::ReportHeadSpace(_)
        | Command::ReportMoveStuck(_)
        | Command::ReportFailoverGuard(_)
        | Command::FailoverJob(_) => needs(
            Role::BackupMonitor,
            "only the monitor reports alerts and runs the failover policy",
        ),
        Command::ResizeOplogTtl(_) => needs(
            Role::BackupAgent,
            "only the agent reports on the oplog store",
        ),
    }
}

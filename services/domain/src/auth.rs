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
use crate::ids::{Actor, DaemonId, UserKey};
use crate::state::{Assignment, State};

/// A role, with Ops Manager's names for people's roles.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Role {
    /// Everything, users included.
    GlobalOwner,
    /// Daemons, projects, jobs and moves; not users.
    GlobalBackupAdmin,
    /// Reads everything; changes nothing.
    GlobalReadOnly,
    /// A backup daemon: registers itself and reports on the moves to it.
    BackupDaemon,
    /// The agent: reports on the oplog store (OPLOG_TTL_RESIZE).
    BackupAgent,
    /// The monitor: reports liveness and alerts, and runs the failover policy.
    BackupMonitor,
}

impl Role {
    /// The name on the wire and in Ops Manager, e.g. `GLOBAL_OWNER`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::GlobalOwner => "GLOBAL_OWNER",
            Role::GlobalBackupAdmin => "GLOBAL_BACKUP_ADMIN",
            Role::GlobalReadOnly => "GLOBAL_READ_ONLY",
            Role::BackupDaemon => "BACKUP_DAEMON",
            Role::BackupAgent => "BACKUP_AGENT",
            Role::BackupMonitor => "BACKUP_MONITOR",
        }
    }

    /// Every role.
    pub const ALL: [Role; 6] = [
        Role::GlobalOwner,
        Role::GlobalBackupAdmin,
        Role::GlobalReadOnly,
        Role::BackupDaemon,
        Role::BackupAgent,
        Role::BackupMonitor,
    ];
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                let names: Vec<_> = Role::ALL.iter().map(|r| r.as_str()).collect();
                format!("unknown role {s:?}; one of {}", names.join(", "))
            })
    }
}

/// A user as the events made it: its roles and the key its commands are signed with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct User {
    pub roles: BTreeSet<Role>,
    pub key: UserKey,
    pub daemon: Option<DaemonId>,
}

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
    let destination = |job: &crate::ids::JobId| {
        state.jobs.get(job).and_then(|j| match &j.assignment {
            Assignment::Moving { to, .. } => Some(to.clone()),
            _ => None,
        })
    };
    let destination_only = |job: &crate::ids::JobId| -> Result<(), Forbidden> {
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

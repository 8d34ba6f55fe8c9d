//! Commands: what callers ask for, in the imperative. Each is a struct of its own (the
//! body of one endpoint of the command service) and a variant of [`Command`].

use serde::{Deserialize, Serialize};

use crate::ids::{Actor, CommandId, DaemonId, Invalid, JobId, Label, ProjectId, UserKey};
use crate::model::{
    DaemonSettings, Deployment, HeadPoint, JobSize, MovePhase, Role, MAX_DAEMON_FILTER, MAX_LABELS,
    MAX_OPLOG_TTL_HOURS, MAX_REASON, MAX_SHARDS, MAX_SPREAD_TO, MAX_WORKERS,
};

/// Register a backup daemon (it takes jobs once registered and up).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RegisterDaemon {
    pub daemon: DaemonId,
    pub settings: DaemonSettings,
}

/// Replace a daemon's settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct ConfigureDaemon {
    pub daemon: DaemonId,
    pub settings: DaemonSettings,
}

/// Remove a daemon that owns no job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RemoveDaemon {
    pub daemon: DaemonId,
}

/// Record that a daemon stopped (or resumed) answering heartbeats.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct ReportDaemonLiveness {
    pub daemon: DaemonId,
    pub up: bool,
}

/// The monitor asks whether a daemon's free head space crossed `threshold_percent` of
/// its head disk (LOW_HEAD_FREE_SPACE); the state decides, so a late report changes
/// nothing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct ReportHeadSpace {
    pub daemon: DaemonId,
    /// 1 to 99.
    pub threshold_percent: u32,
}

/// The monitor saw no progress of a job's move for `idle_ms` (MOVE_STUCK).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct ReportMoveStuck {
    pub job: JobId,
    pub move_id: CommandId,
    pub idle_ms: u64,
}

/// The failover policy's guard: pause when more than `max_down_percent` of the active
/// daemons are down, resume when no longer. The state decides which.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct ReportFailoverGuard {
    /// 1 to 100.
    pub max_down_percent: u32,
}

/// The failover policy moves one job of a down daemon to the best eligible daemon (most
/// free head space among the least busy), which `decide` chooses from the state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct FailoverJob {
    pub job: JobId,
    /// The down daemon the job is on; refused if the job is elsewhere by now.
    pub from: DaemonId,
    /// How long `from` has been down, on the monitor's clock; at least `delay_ms`.
    pub down_for_ms: u64,
    pub delay_ms: u64,
    /// 1 to 1024: no new move while this many jobs are moving.
    pub max_concurrent_rebuilds: u32,
    /// 1 to 100: no move while more than this share of the daemons is down.
    pub max_down_percent: u32,
}

/// Create or change a project's job configuration: which daemons its jobs may use.
/// An empty filter allows every daemon.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct ConfigureProject {
    pub project: ProjectId,
    #[serde(default)]
    pub daemon_filter: Vec<DaemonId>,
    #[serde(default)]
    pub label_filter: Vec<Label>,
}

/// Start backing up a deployment: creates its jobs and binds each to a daemon.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateBackupJobs {
    pub project: ProjectId,
    pub deployment: Deployment,
}

/// Move every job of one daemon to another ("Move all heads").
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct MoveJobs {
    pub from: DaemonId,
    pub to: DaemonId,
    #[serde(default)]
    pub reason: Option<String>,
    /// Check and plan only; append nothing.
    #[serde(default)]
    pub dry_run: bool,
}

/// Move every job of one daemon over several destinations, each job placed by the
/// failover policy's rules (the fewest rebuilds, then the most free head space, then the
/// fewest jobs): among `to`, or among every daemon up with assignment enabled when `to`
/// is empty. One move, one id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct SpreadJobs {
    pub from: DaemonId,
    /// The destinations allowed (at most 1,000, no repeats); empty: any eligible daemon.
    #[serde(default)]
    pub to: Vec<DaemonId>,
    #[serde(default)]
    pub reason: Option<String>,
    /// Check and plan only; append nothing.
    #[serde(default)]
    pub dry_run: bool,
}

/// Move one job to another daemon ("Move head").
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct MoveJob {
    pub job: JobId,
    pub to: DaemonId,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub dry_run: bool,
}

/// The destination reports where its rebuild of a moving job stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct ReportJobMovePhase {
    pub job: JobId,
    pub move_id: CommandId,
    pub epoch: u64,
    pub phase: MovePhase,
}

/// The destination rebuilt the job's head and took it over.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct CompleteJobMove {
    pub job: JobId,
    pub move_id: CommandId,
    pub epoch: u64,
    /// Where the rebuilt head stands, as the destination checked it against the source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head: Option<HeadPoint>,
}

/// The agent's oplog store had to keep a job's oplog longer than its retention
/// (OPLOG_TTL_RESIZE): a head, a rebuild or a restore still needs the entries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct ResizeOplogTtl {
    pub job: JobId,
    /// The retention before, in hours.
    pub previous_hours: u32,
    /// The retention now, in hours (at most 14 days).
    pub hours: u32,
    pub reason: String,
}

/// The move of a job failed (THEFT_FAILED); the job goes back to its previous owner.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct FailJobMove {
    pub job: JobId,
    pub move_id: CommandId,
    pub epoch: u64,
    pub reason: String,
}

/// Give up a move in progress, as an operator asks: each of its jobs not yet completed
/// goes back to its previous owner with a new epoch (fenced as a failed move, without
/// THEFT_FAILED: it was asked for); jobs already completed stay where they are, and jobs
/// of an interrupted move not yet started are not started.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct CancelMove {
    pub move_id: CommandId,
    pub reason: String,
}

/// Drain a daemon, as Nomad drains a node: its assignment is disabled at once, then
/// every job it holds is moved away, one move per job, each placed when it starts by
/// the failover policy's rules (eligible daemons; the fewest rebuilds, then the most
/// free head space, then the fewest jobs), no more than `max_concurrent` moving at a
/// time. The command service starts the moves as earlier ones end (`ContinueDrain`);
/// the drain ends with `DrainCompleted`, or `DrainCancelled` (`CancelDrain`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct DrainDaemon {
    pub daemon: DaemonId,
    /// At most this many of its jobs move at a time (1 to 1,024).
    pub max_concurrent: u32,
    #[serde(default)]
    pub reason: Option<String>,
    /// Check and plan only (which job goes where, as the fleet stands now); append
    /// nothing.
    #[serde(default)]
    pub dry_run: bool,
}

/// Start the next job's move of a drain (one per command) if fewer than its limit are
/// moving, or end it when nothing is left. The command service sends it by itself as
/// moves end; an operator may send it to try again at once (after fixing what refused
/// the last one).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct ContinueDrain {
    pub daemon: DaemonId,
    /// The drain's id: its `DrainDaemon` command's.
    pub drain_id: CommandId,
}

/// Stop a drain: no move of it starts any more. The moves in progress go on (cancel
/// them with `CancelMove`); the daemon's assignment stays disabled.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct CancelDrain {
    pub daemon: DaemonId,
    pub reason: String,
}

/// Add a user who signs commands with `key` and holds `roles` (GLOBAL_OWNER only). A
/// BACKUP_DAEMON user is bound to the daemon it runs as.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct AddUser {
    pub user: Actor,
    pub roles: Vec<Role>,
    /// The public half of the user's key; the seed never leaves the user's machine.
    pub key: UserKey,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub daemon: Option<DaemonId>,
}

/// Remove a user: its key signs nothing any more (GLOBAL_OWNER only).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RemoveUser {
    pub user: Actor,
}

/// The name the service itself writes as the actor of what no user asked for (the first
/// owner, given when the service starts). No user may take it.
pub const SYSTEM_ACTOR: &str = "handoff";

/// Every command the domain decides on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(tag = "type")]
pub enum Command {
    RegisterDaemon(RegisterDaemon),
    ConfigureDaemon(ConfigureDaemon),
    RemoveDaemon(RemoveDaemon),
    ReportDaemonLiveness(ReportDaemonLiveness),
    ConfigureProject(ConfigureProject),
    CreateBackupJobs(CreateBackupJobs),
    MoveJobs(MoveJobs),
    MoveJob(MoveJob),
    SpreadJobs(SpreadJobs),
    ReportJobMovePhase(ReportJobMovePhase),
    CompleteJobMove(CompleteJobMove),
    FailJobMove(FailJobMove),
    CancelMove(CancelMove),
    DrainDaemon(DrainDaemon),
    ContinueDrain(ContinueDrain),
    CancelDrain(CancelDrain),
    ResizeOplogTtl(ResizeOplogTtl),
    AddUser(AddUser),
    RemoveUser(RemoveUser),
    ReportHeadSpace(ReportHeadSpace),
    ReportMoveStuck(ReportMoveStuck),
    ReportFailoverGuard(ReportFailoverGuard),
    FailoverJob(FailoverJob),
}

fn check_reason(field: &'static str, reason: &str, required: bool) -> Result<(), Invalid> {
    if required && reason.trim().is_empty() {
        return Err(Invalid::new(field, "must not be empty"));
    }
    if reason.chars().count() > MAX_REASON {
        return Err(Invalid::new(
            field,
            format!("must be at most {MAX_REASON} characters"),
        ));
    }
    if reason.chars().any(|c| c.is_control()) {
        return Err(Invalid::new(field, "must not contain control characters"));
    }
    Ok(())
}

fn check_range(field: &'static str, value: u32, min: u32, max: u32) -> Result<(), Invalid> {
    if value < min || value > max {
        return Err(Invalid::new(field, format!("must be {min} to {max}")));
    }
    Ok(())
}

impl Command {
    /// The command's name, as its endpoint is named.
    pub fn name(&self) -> &'static str {
        match self {
            Command::RegisterDaemon(_) => "RegisterDaemon",
            Command::ConfigureDaemon(_) => "ConfigureDaemon",
            Command::RemoveDaemon(_) => "RemoveDaemon",
            Command::ReportDaemonLiveness(_) => "ReportDaemonLiveness",
            Command::ConfigureProject(_) => "ConfigureProject",
            Command::CreateBackupJobs(_) => "CreateBackupJobs",
            Command::MoveJobs(_) => "MoveJobs",
            Command::SpreadJobs(_) => "SpreadJobs",
            Command::MoveJob(_) => "MoveJob",
            Command::ReportJobMovePhase(_) => "ReportJobMovePhase",
            Command::CompleteJobMove(_) => "CompleteJobMove",
            Command::FailJobMove(_) => "FailJobMove",
            Command::CancelMove(_) => "CancelMove",
            Command::DrainDaemon(_) => "DrainDaemon",
            Command::ContinueDrain(_) => "ContinueDrain",
            Command::CancelDrain(_) => "CancelDrain",
            Command::ResizeOplogTtl(_) => "ResizeOplogTtl",
            Command::AddUser(_) => "AddUser",
            Command::RemoveUser(_) => "RemoveUser",
            Command::ReportHeadSpace(_) => "ReportHeadSpace",
            Command::ReportMoveStuck(_) => "ReportMoveStuck",
            Command::ReportFailoverGuard(_) => "ReportFailoverGuard",
            Command::FailoverJob(_) => "FailoverJob",
        }
    }

    /// Checks what the types alone do not: ranges, lengths, duplicates. Ids were checked
    /// when they were built.
    pub fn validate(&self) -> Result<(), Invalid> {
        match self {
            Command::RegisterDaemon(c) => c.settings.validate(),
            Command::ConfigureDaemon(c) => c.settings.validate(),
            Command::RemoveDaemon(_) | Command::ReportDaemonLiveness(_) => Ok(()),
            Command::ConfigureProject(c) => {
                if c.daemon_filter.len() > MAX_DAEMON_FILTER {
                    return Err(Invalid::new(
                        "daemon_filter",
                        format!("at most {MAX_DAEMON_FILTER} daemons"),
                    ));
                }
                if c.label_filter.len() > MAX_LABELS {
                    return Err(Invalid::new(
                        "label_filter",
                        format!("at most {MAX_LABELS} labels"),
                    ));
                }
                Ok(())
            }
            Command::CreateBackupJobs(c) => c.validate(),
            Command::MoveJobs(c) => {
                check_reason("reason", c.reason.as_deref().unwrap_or(""), false)
            }
            Command::MoveJob(c) => check_reason("reason", c.reason.as_deref().unwrap_or(""), false),
            Command::SpreadJobs(c) => {
                check_reason("reason", c.reason.as_deref().unwrap_or(""), false)?;
                if c.to.len() > MAX_SPREAD_TO {
                    return Err(Invalid::new(
                        "to",
                        format!("at most {MAX_SPREAD_TO} destinations"),
                    ));
                }
                let distinct: std::collections::BTreeSet<&DaemonId> = c.to.iter().collect();
                if distinct.len() != c.to.len() {
                    return Err(Invalid::new("to", "names a daemon twice"));
                }
                Ok(())
            }
            Command::ReportJobMovePhase(c) => {
                if c.phase.is_final() {
                    return Err(Invalid::new(
                        "phase",
                        "final phases are reported by CompleteJobMove or FailJobMove",
                    ));
                }
                Ok(())
            }
            Command::CompleteJobMove(c) => match &c.head {
                Some(h) => h.validate(),
                None => Ok(()),
            },
            Command::FailJobMove(c) => check_reason("reason", &c.reason, true),
            Command::CancelMove(c) => check_reason("reason", &c.reason, true),
            Command::DrainDaemon(c) => {
                check_range("max_concurrent", c.max_concurrent, 1, MAX_WORKERS)?;
                check_reason("reason", c.reason.as_deref().unwrap_or(""), false)
            }
            Command::ContinueDrain(_) => Ok(()),
            Command::CancelDrain(c) => check_reason("reason", &c.reason, true),
            Command::ResizeOplogTtl(c) => {
                if c.hours <= c.previous_hours {
                    return Err(Invalid::new("hours", "must be more than previous_hours"));
                }
                if c.hours > MAX_OPLOG_TTL_HOURS {
                    return Err(Invalid::new(
                        "hours",
                        format!("must be at most {MAX_OPLOG_TTL_HOURS} (14 days)"),
                    ));
                }
                check_reason("reason", &c.reason, true)
            }
            Command::AddUser(c) => c.validate(),
            Command::RemoveUser(_) | Command::ReportMoveStuck(_) => Ok(()),
            Command::ReportHeadSpace(c) => {
                check_range("threshold_percent", c.threshold_percent, 1, 99)
            }
            Command::ReportFailoverGuard(c) => {
                check_range("max_down_percent", c.max_down_percent, 1, 100)
            }
            Command::FailoverJob(c) => {
                check_range("max_down_percent", c.max_down_percent, 1, 100)?;
                check_range(
                    "max_concurrent_rebuilds",
                    c.max_concurrent_rebuilds,
                    1,
                    MAX_WORKERS,
                )?;
                if c.down_for_ms < c.delay_ms {
                    return Err(Invalid::new(
                        "down_for_ms",
                        "the daemon must have been down for the whole delay",
                    ));
                }
                Ok(())
            }
        }
    }
}

impl CreateBackupJobs {
    fn validate(&self) -> Result<(), Invalid> {
        match &self.deployment {
            Deployment::ReplicaSet { size, .. } => size.validate(),
            Deployment::ShardedCluster {
                shards,
                config_servers,
                ..
            } => {
                if shards.is_empty() || shards.len() > MAX_SHARDS {
                    return Err(Invalid::new(
                        "shards",
                        format!("a sharded cluster has 1 to {MAX_SHARDS} shards"),
                    ));
                }
                let mut names: Vec<&str> = shards.iter().map(|s| s.name.as_str()).collect();
                names.sort_unstable();
                if names.windows(2).any(|w| w[0] == w[1]) {
                    return Err(Invalid::new("shards", "shard names must be unique"));
                }
                if names.contains(&"config") {
                    return Err(Invalid::new(
                        "shards",
                        "'config' names the config servers' job; choose another shard name",
                    ));
                }
                shards
                    .iter()
                    .map(|s| &s.size)
                    .chain(std::iter::once(config_servers))
                    .try_for_each(JobSize::validate)
            }
        }
    }
}

impl AddUser {
    fn validate(&self) -> Result<(), Invalid> {
        if self.user.as_str() == SYSTEM_ACTOR {
            return Err(Invalid::new(
                "user",
                format!("'{SYSTEM_ACTOR}' is the service's own name; choose another"),
            ));
        }
        if self.roles.is_empty() {
            return Err(Invalid::new("roles", "a user needs at least one role"));
        }
        let mut roles = self.roles.clone();
        roles.sort_unstable();
        roles.dedup();
        if roles.len() != self.roles.len() {
            return Err(Invalid::new("roles", "each role at most once"));
        }
        match (self.roles.contains(&Role::BackupDaemon), &self.daemon) {
            (true, None) => Err(Invalid::new(
                "daemon",
                "a BACKUP_DAEMON user names the daemon it runs as",
            )),
            (false, Some(_)) => Err(Invalid::new(
                "daemon",
                "only a BACKUP_DAEMON user is bound to a daemon",
            )),
            _ => Ok(()),
        }
    }
}

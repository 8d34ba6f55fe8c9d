//! Why a command was refused. A rejection is a domain answer, never an infrastructure
//! failure: the caller reads the reason, fixes the request or the fleet, and may send a
//! new command. Each variant says how a caller should react.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::ids::{Actor, CommandId, DaemonId, JobId, Label, ProjectId};

// `Invalid` sits with the ids, which are validated first and so cannot import upward; its
// old path here stays for callers.
pub use crate::ids::Invalid;

/// The kinds of thing a command may name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Daemon,
    Project,
    Job,
    Move,
    User,
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Kind::Daemon => "daemon",
            Kind::Project => "project",
            Kind::Job => "job",
            Kind::Move => "move",
            Kind::User => "user",
        })
    }
}

/// Why a command was refused. Nothing was appended.
#[derive(Clone, Debug, PartialEq, Eq, Error, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Rejection {
    /// The request is malformed. Fix it; retrying as is gives the same answer.
    #[error(transparent)]
    Invalid(Invalid),

    /// The command names something that does not exist. Check the id.
    #[error("unknown {kind} {id}")]
    NotFound { kind: Kind, id: String },

    /// The thing to create already exists. Nothing to do, or choose another id.
    #[error("{kind} {id} already exists")]
    AlreadyExists { kind: Kind, id: String },

    /// Another move of this job is in progress. Wait for it or fail it first.
    #[error("cannot move job {job}: it is already moving in move {move_id}")]
    JobAlreadyMoving { job: JobId, move_id: CommandId },

    /// The report names a move that is not the job's current move (finished, failed,
    /// or superseded). The reporter has lost the job; it must stop working on it.
    #[error("job {job} is not moving in move {move_id}")]
    MoveNotInProgress { job: JobId, move_id: CommandId },

    /// A completion must say where the rebuilt head stands (its timestamp and checksum,
    /// as checked against the source): without it nobody can tell the head is right.
    /// Send the completion again with the head's point.
    #[error("cannot complete the move of job {job} in move {move_id}: the rebuilt head's point is missing")]
    HeadMissing { job: JobId, move_id: CommandId },

    /// The reporter writes with an epoch older than the job's: it no longer owns the job.
    #[error("stale epoch for job {job}: reported {reported}, current {current}")]
    StaleEpoch {
        job: JobId,
        reported: u64,
        current: u64,
    },

    /// The source and the destination are the same daemon.
    #[error("cannot move jobs: {daemon} is both source and destination")]
    MoveToSelf { daemon: DaemonId },

    /// The source daemon owns no job.
    #[error("cannot move jobs: {daemon} has no jobs")]
    NothingToMove { daemon: DaemonId },

    /// Another command cancelled the move already; the service finishes that cancel.
    #[error("move {move_id} is already cancelled, by command {by}")]
    AlreadyCancelled { move_id: CommandId, by: CommandId },

    /// The daemon is being drained: wait for the drain to end, or cancel it
    /// (`CancelDrain`) first.
    #[error("daemon {daemon} is being drained (drain {drain_id})")]
    Draining {
        daemon: DaemonId,
        drain_id: CommandId,
    },

    /// The daemon has no drain in progress (or another one than named).
    #[error("daemon {daemon} has no drain in progress{}", drain_id.as_ref().map(|d| format!(" with id {d}")).unwrap_or_default())]
    NotDraining {
        daemon: DaemonId,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        drain_id: Option<CommandId>,
    },

    /// The daemon was removed; it takes no jobs and cannot be changed.
    #[error("daemon {daemon} was removed")]
    DaemonRemoved { daemon: DaemonId },

    /// The destination is down (no heartbeat). Choose another or wait for it.
    #[error("cannot move jobs: destination {daemon} is down")]
    DestinationDown { daemon: DaemonId },

    /// The destination has assignment disabled. Enable it or choose another.
    #[error("cannot move jobs: destination {daemon} has assignment disabled")]
    AssignmentDisabled { daemon: DaemonId },

    /// The destination lacks head space: it must have more free than the jobs use.
    #[error(
        "cannot move jobs: destination {daemon} has {free_bytes} bytes of head space free, \
         needs more than {needed_bytes}"
    )]
    InsufficientHeadSpace {
        daemon: DaemonId,
        free_bytes: u64,
        needed_bytes: u64,
    },

    /// The destination is not in the project's daemon filter.
    #[error("cannot move job {job}: project {project}'s daemon filter excludes {daemon}")]
    DaemonFilterMismatch {
        job: JobId,
        project: ProjectId,
        daemon: DaemonId,
    },

    /// The destination lacks labels the project's label filter asks for.
    #[error(
        "cannot move job {job}: {daemon} lacks label(s) {missing:?} required by project {project}"
    )]
    LabelMismatch {
        job: JobId,
        project: ProjectId,
        daemon: DaemonId,
        missing: Vec<Label>,
    },

    /// No daemon can take a new job (Ops Manager's bind failure).
    #[error("bind failure for job {job}: {detail}")]
    BindFailure { job: JobId, detail: String },

    /// A daemon that still owns jobs cannot be removed. Move its jobs first.
    #[error("cannot remove daemon {daemon}: it still owns {jobs} job(s); move them first")]
    DaemonHasJobs { daemon: DaemonId, jobs: usize },

    /// Another user already signs with this key. Generate a new key for each user.
    #[error("key is already {user}'s; every user has a key of its own")]
    KeyInUse { user: Actor },

    /// Automatic failover only moves jobs of a daemon that is down.
    #[error("{daemon} is not down: automatic failover leaves its jobs where they are")]
    NotDown { daemon: DaemonId },

    /// The job is no longer where the failover policy saw it (an operator moved it, or it
    /// is moving): the operator's move wins.
    #[error("job {job} is no longer on {daemon} alone: it was moved or is moving")]
    NotOnDaemon { job: JobId, daemon: DaemonId },

    /// Automatic failover is paused: too many daemons are down at once.
    #[error(
        "automatic failover is paused: {down} of {active} daemons are down, more than {max_down_percent}%"
    )]
    FailoverPaused {
        down: u32,
        active: u32,
        max_down_percent: u32,
    },

    /// As many jobs as the policy allows are being rebuilt; it waits for one to finish.
    #[error("{moving} jobs are moving, the failover policy's limit is {limit}")]
    RebuildLimit { moving: u32, limit: u32 },

    /// Removing the user would leave no GLOBAL_OWNER to manage users. Add another first.
    #[error("cannot remove {user}: it is the last GLOBAL_OWNER; add another owner first")]
    LastOwner { user: Actor },
}

impl From<Invalid> for Rejection {
    fn from(invalid: Invalid) -> Self {
        Rejection::Invalid(invalid)
    }
}

/// The families of rejection, which become the wire's error codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum RejectionClass {
    /// Malformed request.
    Validation,
    /// Unknown id.
    NotFound,
    /// The state changed under the command, or another command holds the job.
    Conflict,
    /// The fleet cannot take the work: a check of the move or the placement failed.
    Refused,
}

impl Rejection {
    pub fn class(&self) -> RejectionClass {
        use Rejection::*;
        match self {
            Invalid(_) | HeadMissing { .. } => RejectionClass::Validation,
            NotFound { .. } => RejectionClass::NotFound,
            AlreadyExists { .. }
            | JobAlreadyMoving { .. }
            | MoveNotInProgress { .. }
            | StaleEpoch { .. }
            | AlreadyCancelled { .. }
            | Draining { .. }
            | NotDraining { .. }
            | KeyInUse { .. }
            | NotOnDaemon { .. } => RejectionClass::Conflict,
            MoveToSelf { .. }
            | NothingToMove { .. }
            | DaemonRemoved { .. }
            | DestinationDown { .. }
            | AssignmentDisabled { .. }
            | InsufficientHeadSpace { .. }
            | DaemonFilterMismatch { .. }
            | LabelMismatch { .. }
            | BindFailure { .. }
            | DaemonHasJobs { .. }
            | LastOwner { .. }
            | NotDown { .. }
            | FailoverPaused { .. }
            | RebuildLimit { .. } => RejectionClass::Refused,
        }
    }

    /// The snake_case name of the variant, stable on the wire.
    pub fn reason_code(&self) -> &'static str {
        use Rejection::*;
        match self {
            Invalid(_) => "invalid",
            NotFound { .. } => "not_found",
            AlreadyExists { .. } => "already_exists",
            JobAlreadyMoving { .. } => "job_already_moving",
            MoveNotInProgress { .. } => "move_not_in_progress",
            HeadMissing { .. } => "head_missing",
            StaleEpoch { .. } => "stale_epoch",
            MoveToSelf { .. } => "move_to_self",
            NothingToMove { .. } => "nothing_to_move",
            AlreadyCancelled { .. } => "already_cancelled",
            Draining { .. } => "draining",
            NotDraining { .. } => "not_draining",
            DaemonRemoved { .. } => "daemon_removed",
            DestinationDown { .. } => "destination_down",
            AssignmentDisabled { .. } => "assignment_disabled",
            InsufficientHeadSpace { .. } => "insufficient_head_space",
            DaemonFilterMismatch { .. } => "daemon_filter_mismatch",
            LabelMismatch { .. } => "label_mismatch",
            BindFailure { .. } => "bind_failure",
            DaemonHasJobs { .. } => "daemon_has_jobs",
            KeyInUse { .. } => "key_in_use",
            LastOwner { .. } => "last_owner",
            NotDown { .. } => "not_down",
            NotOnDaemon { .. } => "not_on_daemon",
            FailoverPaused { .. } => "failover_paused",
            RebuildLimit { .. } => "rebuild_limit",
        }
    }
}

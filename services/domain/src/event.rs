//! Events: what happened, in the past tense. The event stream is the source of truth; the
//! state and every view are folds of it.
//!
//! Each event belongs to one aggregate (a daemon, a project, a job or a move), which
//! becomes its subject in the event log, so each aggregate can be read and guarded on its
//! own. A command that touches several aggregates appends one event to each, atomically.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::ids::{Actor, CommandId, DaemonId, JobId, Label, ProjectId, UserKey};
use crate::model::{
    AlertKey, AlertKind, DaemonSettings, HeadPoint, JobSize, JobTarget, MovePhase, MoveScope, Role,
    FLEET,
};
use crate::rejection::Rejection;

/// A job handed to a daemon, with the epoch it must attach to everything it writes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct AssignedJob {
    pub job: JobId,
    pub epoch: u64,
}

/// Why a daemon was given jobs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum AssignmentCause {
    /// A new job was bound to the daemon.
    Placement,
    /// The daemon is the destination of a move: rebuild the jobs' heads.
    Move { move_id: CommandId },
    /// A move away from the daemon failed; the jobs are its own again.
    MoveFailed { move_id: CommandId },
}

/// Everything that can happen. Version 1 of each; see `Event::VERSION`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(tag = "type", content = "data")]
pub enum Event {
    DaemonRegistered {
        daemon: DaemonId,
        settings: DaemonSettings,
    },
    DaemonConfigured {
        daemon: DaemonId,
        settings: DaemonSettings,
    },
    DaemonRemoved {
        daemon: DaemonId,
    },
    /// DAEMON_DOWN.
    DaemonDown {
        daemon: DaemonId,
    },
    /// DAEMON_UP.
    DaemonUp {
        daemon: DaemonId,
    },
    ProjectConfigured {
        project: ProjectId,
        daemon_filter: BTreeSet<DaemonId>,
        label_filter: BTreeSet<Label>,
    },
    BackupJobCreated {
        job: JobId,
        project: ProjectId,
        target: JobTarget,
        size: JobSize,
        daemon: DaemonId,
        epoch: u64,
    },
    /// Addressed to one daemon: these jobs are now its own (or being rebuilt by it).
    JobsAssigned {
        daemon: DaemonId,
        cause: AssignmentCause,
        jobs: Vec<AssignedJob>,
    },
    /// Addressed to a move's source daemon: these jobs are moving away; take no more
    /// snapshots of them and let their heads go.
    JobsReleased {
        daemon: DaemonId,
        move_id: CommandId,
        jobs: Vec<JobId>,
    },
    MoveStarted {
        move_id: CommandId,
        scope: MoveScope,
        from: DaemonId,
        to: DaemonId,
        reason: Option<String>,
        /// How many jobs the move covers.
        jobs: u32,
        /// Started by the automatic failover policy, not by an operator.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        automatic: bool,
        /// A spread (`SpreadJobs`): the destinations the operator allowed (empty: any
        /// eligible daemon). Each job's `JobMoveStarted` says where it goes; `to` is the
        /// first destination.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        spread: Option<Vec<DaemonId>>,
        /// One job's move of a drain (`ContinueDrain`): the drain's id.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        drain: Option<CommandId>,
    },
    JobMoveStarted {
        job: JobId,
        move_id: CommandId,
        from: DaemonId,
        to: DaemonId,
        /// The destination's epoch for the job.
        epoch: u64,
        /// The move's reason, as its `MoveStarted` gives it: an auditor following the
        /// job's own subject sees why it moved (who asked is the envelope's actor).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// MOVE_INTERRUPTED: a move appended in several atomic units stopped after some of
    /// them, and the rest could not be started since: `started` of its `planned` jobs
    /// are moving, the others untouched. The command service starts the rest as soon as
    /// it can.
    MoveInterrupted {
        move_id: CommandId,
        planned: u32,
        started: u32,
        /// Why the rest is not started yet.
        reason: String,
    },
    /// The rest of a move appended in part is started (or nothing was left to start):
    /// the move covers `started` jobs in all. The move command's last event.
    MoveResumed {
        move_id: CommandId,
        started: u32,
    },
    JobMovePhaseReported {
        job: JobId,
        move_id: CommandId,
        phase: MovePhase,
    },
    JobMoveCompleted {
        job: JobId,
        move_id: CommandId,
        daemon: DaemonId,
        epoch: u64,
        /// The rebuilt head's timestamp and checksum, as its daemon reported them.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        head: Option<HeadPoint>,
    },
    /// THEFT_FAILED: the job went back to its previous owner with a new epoch. Or, with
    /// `cancelled`, the same return asked for by an operator's `CancelMove` (no alert).
    JobMoveFailed {
        job: JobId,
        move_id: CommandId,
        reason: String,
        returned_to: DaemonId,
        epoch: u64,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        cancelled: bool,
    },
    /// An operator cancelled the move (`CancelMove`): none of it starts any more, and
    /// the `cancelled` jobs still moving go back to their previous owners (each its
    /// `JobMoveFailed` with `cancelled`, after it). The cancel command's first event.
    MoveCancelled {
        move_id: CommandId,
        /// The cancel command's id (as its envelope's).
        cancel_id: CommandId,
        reason: String,
        cancelled: u32,
    },
    /// An operator asked to drain the daemon (`DrainDaemon`): its assignment is disabled
    /// from now on, and its `jobs` move away, one move per job (each `MoveStarted` names
    /// the drain), at most `max_concurrent` at a time.
    DrainStarted {
        daemon: DaemonId,
        drain_id: CommandId,
        max_concurrent: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
        /// The jobs it held when the drain started.
        jobs: u32,
    },
    /// The drain ended: no job is left to move. `moved` jobs went away by its moves;
    /// `left` stayed because their move failed or was cancelled (each says why on its
    /// job's subject), and are not tried again by this drain.
    DrainCompleted {
        daemon: DaemonId,
        drain_id: CommandId,
        moved: u32,
        left: u32,
    },
    /// An operator stopped the drain (`CancelDrain`): no move of it starts any more;
    /// those in progress go on. `waiting` jobs were not started.
    DrainCancelled {
        daemon: DaemonId,
        drain_id: CommandId,
        /// The cancel command's id (as its envelope's).
        cancel_id: CommandId,
        reason: String,
        moved: u32,
        waiting: u32,
    },
    /// BIND_FAILURE of a drain: no daemon can take any job it has left to move (`job`,
    /// the largest, first). The command service goes on trying; the alert closes when a
    /// job leaves the daemon (`JobsReleased`) or the drain ends.
    DrainBlocked {
        daemon: DaemonId,
        drain_id: CommandId,
        job: JobId,
        detail: String,
    },
    /// OPLOG_TTL_RESIZE: the oplog store keeps this job's oplog longer than before.
    OplogTtlResized {
        job: JobId,
        previous_hours: u32,
        hours: u32,
        reason: String,
    },
    /// LOW_HEAD_FREE_SPACE: the daemon's free head space fell under the threshold.
    HeadSpaceLow {
        daemon: DaemonId,
        free_bytes: u64,
        head_space_bytes: u64,
        threshold_percent: u32,
    },
    /// The daemon's free head space is back over the threshold.
    HeadSpaceRecovered {
        daemon: DaemonId,
        free_bytes: u64,
        head_space_bytes: u64,
    },
    /// BIND_FAILURE: a new job could not be bound to any daemon, so its backup was not
    /// created. Closed when the job is created.
    BindFailed {
        job: JobId,
        project: ProjectId,
        detail: String,
    },
    /// MOVE_STUCK: a job's move showed no progress for the threshold.
    MoveStuck {
        job: JobId,
        move_id: CommandId,
        phase: MovePhase,
        idle_ms: u64,
    },
    /// Automatic failover paused itself: more than `max_down_percent` of the active
    /// daemons are down at once.
    FailoverPaused {
        down: Vec<DaemonId>,
        active: u32,
        max_down_percent: u32,
    },
    /// Few enough daemons are down again: automatic failover goes on.
    FailoverResumed {
        down: Vec<DaemonId>,
        active: u32,
    },
    /// The failover policy moves a job of a down daemon; the move's events follow in the
    /// same unit. Carries everything the decision was made on.
    FailoverDecided {
        move_id: CommandId,
        job: JobId,
        from: DaemonId,
        to: DaemonId,
        inputs: FailoverInputs,
    },
    UserAdded {
        user: Actor,
        roles: BTreeSet<Role>,
        key: UserKey,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        daemon: Option<DaemonId>,
    },
    UserRemoved {
        user: Actor,
    },
    /// The command service refused a request before deciding it: unsigned, forged,
    /// expired, replayed, from an unknown user or a user without the role. `user` is who
    /// the request claimed to be (unverified when the reason is about the signature).
    CommandRefused {
        /// The refusal's own id (the command id of its envelope), not the refused
        /// command's.
        refusal: CommandId,
        user: Actor,
        command: String,
        command_id: CommandId,
        reason: String,
        message: String,
        /// What the client said it is (program, host); unverified.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client: Option<String>,
    },
    /// The command service took command `command_id` and appends its events: the first
    /// atomic unit of them holds this too. It and [`Event::CommandRejected`] give a
    /// command id one answer for good (decision 0010); it changes nothing else.
    CommandAccepted {
        command_id: CommandId,
    },
    /// The command service answered command `command_id` (a `command`, e.g. `MoveJob`)
    /// with a domain rejection, and nothing of it was appended: that is its answer for
    /// good, the same to every later attempt of the id, and no instance applies it any
    /// more (decision 0010). The envelope is the record's own (its command id is not the
    /// rejected one); its actor is who signed the request, its digest the request's.
    CommandRejected {
        command_id: CommandId,
        command: String,
        rejection: Rejection,
    },
}

/// A daemon the failover policy could have chosen, as it stood.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Candidate {
    pub daemon: DaemonId,
    pub free_bytes: u64,
    pub jobs: u32,
    /// Jobs being rebuilt on it now.
    pub rebuilding: u32,
}

/// What an automatic failover decision was made on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct FailoverInputs {
    /// How long the source had been down, on the monitor's clock.
    pub down_for_ms: u64,
    /// The policy's delay.
    pub delay_ms: u64,
    /// Jobs moving in the fleet before this decision, and the policy's limit.
    pub rebuilding: u32,
    pub max_concurrent_rebuilds: u32,
    /// Down and active daemons, and the policy's guard.
    pub down: u32,
    pub active: u32,
    pub max_down_percent: u32,
    /// The head space the job needs.
    pub head_size_bytes: u64,
    /// Every eligible daemon, best first; the first was chosen.
    pub candidates: Vec<Candidate>,
    /// A daemon an operator moved the job away from: never chosen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub excluded: Option<DaemonId>,
}

/// The aggregate an event belongs to, and so its subject in the event log.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Aggregate {
    Daemon(DaemonId),
    Project(ProjectId),
    Job(JobId),
    Move(CommandId),
    User(Actor),
    /// The refused requests of one reason (`unsigned`, `forbidden`, ...): a few subjects
    /// for the whole trail, however many requests a flood brings.
    Audit(String),
    /// One alert that is not a daemon's or a job's own event.
    Alert(AlertKey),
    /// One automatic failover decision (by its move's id).
    Failover(CommandId),
    /// The answer given to one command id, accepted or rejected: many commands share a
    /// subject (`handoff_protocol::subjects::aggregate`), so rejections add events, never
    /// subjects.
    Answer(CommandId),
}

impl Event {
    /// The current version of every event's data; readers upcast older ones.
    pub const VERSION: u32 = 1;

    pub fn aggregate(&self) -> Aggregate {
        use Event::*;
        match self {
            DaemonRegistered { daemon, .. }
            | DaemonConfigured { daemon, .. }
            | DaemonRemoved { daemon }
            | DaemonDown { daemon }
            | DaemonUp { daemon }
            | JobsAssigned { daemon, .. }
            | JobsReleased { daemon, .. }
            | DrainStarted { daemon, .. }
            | DrainCompleted { daemon, .. }
            | DrainCancelled { daemon, .. } => Aggregate::Daemon(daemon.clone()),
            ProjectConfigured { project, .. } => Aggregate::Project(project.clone()),
            BackupJobCreated { job, .. }
            | JobMoveStarted { job, .. }
            | JobMovePhaseReported { job, .. }
            | JobMoveCompleted { job, .. }
            | JobMoveFailed { job, .. }
            | OplogTtlResized { job, .. } => Aggregate::Job(job.clone()),
            MoveStarted { move_id, .. }
            | MoveInterrupted { move_id, .. }
            | MoveResumed { move_id, .. }
            | MoveCancelled { move_id, .. } => Aggregate::Move(move_id.clone()),
            UserAdded { user, .. } | UserRemoved { user } => Aggregate::User(user.clone()),
            CommandRefused { reason, .. } => Aggregate::Audit(reason.clone()),
            HeadSpaceLow { daemon, .. } | HeadSpaceRecovered { daemon, .. } => {
                Aggregate::Alert(AlertKey::new(AlertKind::LowHeadFreeSpace, daemon))
            }
            BindFailed { job, .. } => Aggregate::Alert(AlertKey::new(AlertKind::BindFailure, job)),
            DrainBlocked { daemon, .. } => {
                Aggregate::Alert(AlertKey::new(AlertKind::BindFailure, daemon))
            }
            MoveStuck { job, .. } => Aggregate::Alert(AlertKey::new(AlertKind::MoveStuck, job)),
            FailoverPaused { .. } | FailoverResumed { .. } => {
                Aggregate::Alert(AlertKey::new(AlertKind::FailoverPaused, FLEET))
            }
            FailoverDecided { move_id, .. } => Aggregate::Failover(move_id.clone()),
            CommandAccepted { command_id } | CommandRejected { command_id, .. } => {
                Aggregate::Answer(command_id.clone())
            }
        }
    }

    /// The event's type name, as written on the wire.
    pub fn type_name(&self) -> &'static str {
        use Event::*;
        match self {
            DaemonRegistered { .. } => "DaemonRegistered",
            DaemonConfigured { .. } => "DaemonConfigured",
            DaemonRemoved { .. } => "DaemonRemoved",
            DaemonDown { .. } => "DaemonDown",
            DaemonUp { .. } => "DaemonUp",
            ProjectConfigured { .. } => "ProjectConfigured",
            BackupJobCreated { .. } => "BackupJobCreated",
            JobsAssigned { .. } => "JobsAssigned",
            JobsReleased { .. } => "JobsReleased",
            MoveStarted { .. } => "MoveStarted",
            JobMoveStarted { .. } => "JobMoveStarted",
            MoveInterrupted { .. } => "MoveInterrupted",
            MoveResumed { .. } => "MoveResumed",
            MoveCancelled { .. } => "MoveCancelled",
            DrainStarted { .. } => "DrainStarted",
            DrainCompleted { .. } => "DrainCompleted",
            DrainCancelled { .. } => "DrainCancelled",
            DrainBlocked { .. } => "DrainBlocked",
            JobMovePhaseReported { .. } => "JobMovePhaseReported",
            JobMoveCompleted { .. } => "JobMoveCompleted",
            JobMoveFailed { .. } => "JobMoveFailed",
            OplogTtlResized { .. } => "OplogTtlResized",
            UserAdded { .. } => "UserAdded",
            UserRemoved { .. } => "UserRemoved",
            CommandRefused { .. } => "CommandRefused",
            HeadSpaceLow { .. } => "HeadSpaceLow",
            HeadSpaceRecovered { .. } => "HeadSpaceRecovered",
            BindFailed { .. } => "BindFailed",
            MoveStuck { .. } => "MoveStuck",
            FailoverPaused { .. } => "FailoverPaused",
            FailoverResumed { .. } => "FailoverResumed",
            FailoverDecided { .. } => "FailoverDecided",
            CommandAccepted { .. } => "CommandAccepted",
            CommandRejected { .. } => "CommandRejected",
        }
    }

    /// The daemons whose history holds the event: what happens to a daemon itself (its
    /// registration, settings, liveness, drains, head space, the jobs it is told to take
    /// or let go of, failover decisions about it, the moves from or to it, a job's move
    /// failing back to it). A job's creation and the steps of its move (started,
    /// completed) are in the job's history and in its move's view, not its daemons': a
    /// daemon holds a hundred jobs, and one move of them all would otherwise put two
    /// hundred entries in two daemons' histories (and as many keys in the views).
    pub fn daemons(&self) -> Vec<&DaemonId> {
        use Event::*;
        match self {
            DaemonRegistered { daemon, .. }
            | DaemonConfigured { daemon, .. }
            | DaemonRemoved { daemon }
            | DaemonDown { daemon }
            | DaemonUp { daemon }
            | JobsAssigned { daemon, .. }
            | JobsReleased { daemon, .. }
            | DrainStarted { daemon, .. }
            | DrainCompleted { daemon, .. }
            | DrainCancelled { daemon, .. }
            | DrainBlocked { daemon, .. }
            | HeadSpaceLow { daemon, .. }
            | HeadSpaceRecovered { daemon, .. } => vec![daemon],
            MoveStarted { from, to, .. } | FailoverDecided { from, to, .. } => vec![from, to],
            FailoverPaused { down, .. } | FailoverResumed { down, .. } => down.iter().collect(),
            JobMoveFailed { returned_to, .. } => vec![returned_to],
            UserAdded { daemon, .. } => daemon.iter().collect(),
            ProjectConfigured { .. }
            | BackupJobCreated { .. }
            | JobMoveStarted { .. }
            | JobMoveCompleted { .. }
            | MoveInterrupted { .. }
            | MoveResumed { .. }
            | MoveCancelled { .. }
            | JobMovePhaseReported { .. }
            | OplogTtlResized { .. }
            | UserRemoved { .. }
            | CommandRefused { .. }
            | CommandAccepted { .. }
            | CommandRejected { .. }
            | BindFailed { .. }
            | MoveStuck { .. } => vec![],
        }
    }

    /// Every job the event concerns, for history by job.
    pub fn jobs(&self) -> Vec<&JobId> {
        use Event::*;
        match self {
            BackupJobCreated { job, .. }
            | JobMoveStarted { job, .. }
            | JobMovePhaseReported { job, .. }
            | JobMoveCompleted { job, .. }
            | JobMoveFailed { job, .. }
            | OplogTtlResized { job, .. }
            | BindFailed { job, .. }
            | MoveStuck { job, .. }
            | FailoverDecided { job, .. } => vec![job],
            JobsReleased { jobs, .. } => jobs.iter().collect(),
            JobsAssigned { jobs, .. } => jobs.iter().map(|j| &j.job).collect(),
            MoveStarted {
                scope: MoveScope::OneJob { job },
                ..
            } => vec![job],
            _ => vec![],
        }
    }

    /// What distinguishes this event among the events of one command, stable when the
    /// command is decided again (a continuation after a partial append): the aggregate,
    /// plus the first job for an event that lists jobs. Part of the idempotency key.
    pub fn key_within_command(&self) -> String {
        let base = match self.aggregate() {
            Aggregate::Daemon(d) => format!("daemon:{d}"),
            Aggregate::Project(p) => format!("project:{p}"),
            Aggregate::Job(j) => format!("job:{j}"),
            Aggregate::Move(m) => format!("move:{m}"),
            Aggregate::User(u) => format!("user:{u}"),
            Aggregate::Audit(r) => format!("audit:{r}"),
            Aggregate::Alert(a) => format!("alert:{}:{}", a.kind, a.about),
            Aggregate::Failover(m) => format!("failover:{m}"),
            // The command's own id is the rest of the key.
            Aggregate::Answer(_) => "answer".to_owned(),
        };
        match self {
            Event::JobsAssigned { jobs, .. } => match jobs.first() {
                Some(first) => format!("{base}:{}", first.job),
                None => base,
            },
            // One per unit of a large move: each unit's is its own.
            Event::JobsReleased { jobs, .. } => match jobs.first() {
                Some(first) => format!("{base}:released:{first}"),
                None => format!("{base}:released"),
            },
            // On the move's subject, as its MoveStarted of the same command is.
            Event::MoveResumed { .. } => format!("{base}:resumed"),
            Event::MoveCancelled { .. } => format!("{base}:cancelled"),
            Event::MoveInterrupted { .. } => format!("{base}:interrupted"),
            // Keyed by the rejected command's id (not its record's): a second record of
            // the same rejection within the duplicate window is not stored.
            Event::CommandRejected { .. } => format!("{base}:rejected"),
            _ => base,
        }
    }
}

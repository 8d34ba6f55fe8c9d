//! The state that decisions are made against, and `evolve`, which folds one event into it.
//! `evolve` is total: the stream is the truth, so an event never fails to apply; an event
//! that names something unknown (which `decide` never emits) changes nothing.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::alert::{self, Effect};
use crate::event::Event;
use crate::ids::{Actor, CommandId, DaemonId, JobId, Label, ProjectId, UserKey};
mod moves;
mod reads;

use crate::model::{
    AlertKey, DaemonSettings, JobSize, JobStatus, JobTarget, Liveness, MovePhase, MoveScope, Role,
};

/// A daemon is active (up or down) until it is removed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(tag = "status", content = "liveness", rename_all = "snake_case")]
pub enum DaemonStatus {
    Active(Liveness),
    Removed,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Daemon {
    pub settings: DaemonSettings,
    pub status: DaemonStatus,
    /// The jobs it owns, those being rebuilt on it included.
    pub jobs: BTreeSet<JobId>,
    /// Head space its jobs use: the sum of their head sizes, or `u64::MAX` when that sum
    /// does not fit in a u64.
    pub used_bytes: u64,
}

impl Daemon {
    pub fn free_bytes(&self) -> u64 {
        self.settings
            .head_space_bytes
            .saturating_sub(self.used_bytes)
    }

    pub fn is_up(&self) -> bool {
        self.status == DaemonStatus::Active(Liveness::Up)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Project {
    /// Empty: every daemon allowed.
    pub daemon_filter: BTreeSet<DaemonId>,
    /// Every label here must be on the daemon.
    pub label_filter: BTreeSet<Label>,
}

/// Who has a job. During a move the destination owns it (it holds the current epoch);
/// the source keeps nothing but the right to get the job back if the move fails.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Assignment {
    Assigned {
        daemon: DaemonId,
    },
    Moving {
        from: DaemonId,
        to: DaemonId,
        move_id: CommandId,
        phase: MovePhase,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Job {
    pub project: ProjectId,
    pub target: JobTarget,
    pub size: JobSize,
    pub status: JobStatus,
    /// Grows with every assignment; the owner attaches it to everything it writes.
    pub epoch: u64,
    pub assignment: Assignment,
    /// The daemon an operator last moved the job away from: the failover policy never
    /// moves it back there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operator_moved_from: Option<DaemonId>,
    /// The drain whose move of this job failed or was cancelled: that drain leaves it
    /// where it is (until the job's next move).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub left_by_drain: Option<CommandId>,
}

impl Job {
    /// The one daemon that owns the job.
    pub fn owner(&self) -> &DaemonId {
        match &self.assignment {
            Assignment::Assigned { daemon } => daemon,
            Assignment::Moving { to, .. } => to,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Move {
    pub scope: MoveScope,
    pub from: DaemonId,
    pub to: DaemonId,
    pub reason: Option<String>,
    /// The jobs it covers: as planned when it started, or as started in the end when it
    /// was interrupted and resumed.
    pub planned: u32,
    /// Started by the failover policy.
    #[serde(default)]
    pub automatic: bool,
    /// A spread over these destinations (empty: any eligible), as `MoveStarted` says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spread: Option<Vec<DaemonId>>,
    /// Cancelled (`MoveCancelled`): nothing more starts, and the jobs still moving go
    /// back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancelled: Option<Cancel>,
    /// One job's move of this drain (as `MoveStarted` says).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain: Option<CommandId>,
    /// Each started job's phase.
    pub jobs: BTreeMap<JobId, MovePhase>,
}

/// A move's cancellation: which command cancelled it, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Cancel {
    pub by: CommandId,
    pub reason: String,
}

impl Move {
    /// Every job it covers has started, and each has completed or failed.
    pub fn is_over(&self) -> bool {
        self.jobs.len() as u64 >= u64::from(self.planned)
            && self.jobs.values().all(|p| p.is_final())
    }
}

/// A drain in progress (`DrainStarted`, until `DrainCompleted` or `DrainCancelled`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Drain {
    pub id: CommandId,
    pub max_concurrent: u32,
    pub reason: Option<String>,
    /// Jobs its moves took away.
    pub moved: u32,
    /// Jobs whose move of this drain failed or was cancelled: back on the daemon, and
    /// not tried again by this drain (each marked `left_by_drain`).
    pub left: u32,
}

/// A user as the events made it: its roles and the key its commands are signed with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct User {
    pub roles: BTreeSet<Role>,
    pub key: UserKey,
    pub daemon: Option<DaemonId>,
}

/// Everything `decide` needs to know.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct State {
    pub daemons: BTreeMap<DaemonId, Daemon>,
    pub projects: BTreeMap<ProjectId, Project>,
    pub jobs: BTreeMap<JobId, Job>,
    /// The moves in progress (a move leaves once it is over).
    pub moves: BTreeMap<CommandId, Move>,
    /// Current users, by name (removed ones are gone).
    pub users: BTreeMap<Actor, User>,
    /// The open alerts.
    #[serde(default)]
    pub alerts: BTreeSet<AlertKey>,
    /// The drains in progress, by daemon (a daemon has one at most).
    #[serde(default)]
    pub drains: BTreeMap<DaemonId, Drain>,
}

/// The state before any event.
pub fn initial() -> State {
    State::default()
}

/// Folds one event into the state.
pub fn evolve(mut state: State, event: &Event) -> State {
    state.apply(event);
    state
}

impl State {
    /// Folds one event into the state, in place.
    pub fn apply(&mut self, event: &Event) {
        self.fold_alerts(event);
        match event {
            Event::DaemonRegistered { daemon, settings } => self.register_daemon(daemon, settings),
            Event::DaemonConfigured { daemon, settings } => {
                if let Some(d) = self.daemons.get_mut(daemon) {
                    d.settings = settings.clone();
                }
            }
            Event::DaemonRemoved { daemon } => {
                if let Some(d) = self.daemons.get_mut(daemon) {
                    d.status = DaemonStatus::Removed;
                }
                // Nothing more to drain; a daemon registered again under the id starts
                // afresh.
                self.drains.remove(daemon);
            }
            Event::DrainStarted {
                daemon,
                drain_id,
                max_concurrent,
                reason,
                ..
            } => {
                if let Some(d) = self.daemons.get_mut(daemon) {
                    d.settings.assignment_enabled = false;
                    self.drains.insert(
                        daemon.clone(),
                        Drain {
                            id: drain_id.clone(),
                            max_concurrent: *max_concurrent,
                            reason: reason.clone(),
                            moved: 0,
                            left: 0,
                        },
                    );
                }
            }
            Event::DrainCompleted {
                daemon, drain_id, ..
            }
            | Event::DrainCancelled {
                daemon, drain_id, ..
            } => {
                if self.drains.get(daemon).is_some_and(|d| d.id == *drain_id) {
                    self.drains.remove(daemon);
                }
            }
            Event::DaemonDown { daemon } => self.set_liveness(daemon, Liveness::Down),
            Event::DaemonUp { daemon } => self.set_liveness(daemon, Liveness::Up),
            Event::ProjectConfigured {
                project,
                daemon_filter,
                label_filter,
            } => {
                self.projects.insert(
                    project.clone(),
                    Project {
                        daemon_filter: daemon_filter.clone(),
                        label_filter: label_filter.clone(),
                    },
                );
            }
            Event::BackupJobCreated {
                job,
                project,
                target,
                size,
                daemon,
                epoch,
            } => self.create_job(job, project, target, *size, daemon, *epoch),
            Event::JobsAssigned { .. } | Event::JobsReleased { .. } => {
                // Notices addressed to a daemon; the job events carry the state.
            }
            Event::OplogTtlResized { .. }
            | Event::CommandRefused { .. }
            | Event::CommandAccepted { .. }
            | Event::CommandRejected { .. }
            | Event::HeadSpaceLow { .. }
            | Event::HeadSpaceRecovered { .. }
            | Event::BindFailed { .. }
            | Event::DrainBlocked { .. }
            | Event::MoveStuck { .. }
            | Event::FailoverPaused { .. }
            | Event::FailoverResumed { .. }
            | Event::FailoverDecided { .. }
            | Event::MoveInterrupted { .. } => {
                // Alerts (folded above), an audit record, the answer given to a command
                // id, a decision whose move events follow: no ownership changes.
            }
            Event::UserAdded {
                user,
                roles,
                key,
                daemon,
            } => {
                self.users.insert(
                    user.clone(),
                    User {
                        roles: roles.clone(),
                        key: key.clone(),
                        daemon: daemon.clone(),
                    },
                );
            }
            Event::UserRemoved { user } => {
                self.users.remove(user);
            }
            Event::MoveStarted {
                move_id,
                scope,
                from,
                to,
                reason,
                jobs,
                automatic,
                spread,
                drain,
            } => {
                self.moves.entry(move_id.clone()).or_insert_with(|| Move {
                    scope: scope.clone(),
                    from: from.clone(),
                    to: to.clone(),
                    reason: reason.clone(),
                    planned: *jobs,
                    automatic: *automatic,
                    spread: spread.clone(),
                    cancelled: None,
                    drain: drain.clone(),
                    jobs: BTreeMap::new(),
                });
            }
            Event::JobMoveStarted {
                job,
                move_id,
                from,
                to,
                epoch,
                ..
            } => self.start_job_move(job, move_id, from, to, *epoch),
            Event::MoveResumed { move_id, started } => {
                // The move covers what it started in the end: jobs that left the source
                // by other means meanwhile are not waited for.
                if let Some(m) = self.moves.get_mut(move_id) {
                    m.planned = *started;
                }
            }
            Event::MoveCancelled {
                move_id,
                cancel_id,
                reason,
                ..
            } => {
                // Nothing more starts: the move covers the jobs it started.
                if let Some(m) = self.moves.get_mut(move_id) {
                    m.planned = m.jobs.len() as u32;
                    m.cancelled = Some(Cancel {
                        by: cancel_id.clone(),
                        reason: reason.clone(),
                    });
                }
            }
            Event::JobMovePhaseReported {
                job,
                move_id,
                phase,
            } => self.set_phase(job, move_id, *phase),
            Event::JobMoveCompleted {
                job,
                move_id,
                daemon,
                ..
            } => self.complete_job_move(job, move_id, daemon),
            Event::JobMoveFailed {
                job,
                move_id,
                returned_to,
                epoch,
                cancelled,
                ..
            } => self.fail_job_move(job, move_id, returned_to, *epoch, *cancelled),
        }
        self.forget_finished_move(event);
    }

    /// A move leaves the state once it is over (every job it covers started and ended):
    /// nothing decides on it any more, and the state stays the size of the fleet and the
    /// moves in progress however long the history.
    fn forget_finished_move(&mut self, event: &Event) {
        let move_id = match event {
            Event::JobMoveCompleted { move_id, .. }
            | Event::JobMoveFailed { move_id, .. }
            | Event::MoveResumed { move_id, .. }
            | Event::MoveCancelled { move_id, .. } => move_id,
            _ => return,
        };
        if self.moves.get(move_id).is_some_and(Move::is_over) {
            self.moves.remove(move_id);
        }
    }

    fn fold_alerts(&mut self, event: &Event) {
        for effect in alert::effects(event) {
            match effect {
                Effect::Open { key, .. } => {
                    self.alerts.insert(key);
                }
                Effect::Close { key } => {
                    self.alerts.remove(&key);
                }
                Effect::Notice { .. } => {}
            }
        }
    }

    fn register_daemon(&mut self, daemon: &DaemonId, settings: &DaemonSettings) {
        self.daemons.insert(
            daemon.clone(),
            Daemon {
                settings: settings.clone(),
                status: DaemonStatus::Active(Liveness::Up),
                jobs: BTreeSet::new(),
                used_bytes: 0,
            },
        );
    }

    fn set_liveness(&mut self, daemon: &DaemonId, liveness: Liveness) {
        if let Some(d) = self.daemons.get_mut(daemon) {
            if let DaemonStatus::Active(_) = d.status {
                d.status = DaemonStatus::Active(liveness);
            }
        }
    }

    fn create_job(
        &mut self,
        job: &JobId,
        project: &ProjectId,
        target: &JobTarget,
        size: JobSize,
        daemon: &DaemonId,
        epoch: u64,
    ) {
        if self.jobs.contains_key(job) {
            return;
        }
        self.jobs.insert(
            job.clone(),
            Job {
                project: project.clone(),
                target: target.clone(),
                size,
                status: JobStatus::Active,
                epoch,
                assignment: Assignment::Assigned {
                    daemon: daemon.clone(),
                },
                operator_moved_from: None,
                left_by_drain: None,
            },
        );
        self.take(daemon, job, size.head_size_bytes);
    }
}

//! The projector's views, as the query service answers them.

use std::collections::BTreeMap;

use handoff_domain::alert::AlertKind;
use handoff_domain::model::DaemonSettings;
use handoff_domain::model::{MovePhase, MoveScope};
use handoff_domain::state::{DaemonStatus, Job, Project};
use handoff_domain::{CommandId, DaemonId, Event, JobId, ProjectId};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct DaemonView {
    pub daemon: DaemonId,
    pub settings: DaemonSettings,
    pub status: DaemonStatus,
    /// How many jobs it owns, those being rebuilt on it included (the `assignments`
    /// query lists them, page by page): a daemon's view stays small however many it has.
    pub jobs: u64,
    /// Head space its jobs use.
    pub used_bytes: u64,
    pub free_bytes: u64,
    /// Its drain in progress, if any: the limit, the jobs moved so far and those left
    /// (their drain move failed or was cancelled).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain: Option<handoff_domain::state::Drain>,
    /// How many events its history holds (the `history` query pages through them).
    #[serde(default)]
    pub history_events: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ProjectView {
    pub project: ProjectId,
    #[serde(flatten)]
    pub state: Project,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct JobView {
    pub job: JobId,
    pub owner: DaemonId,
    /// How many events its history holds (the `history` query pages through them).
    #[serde(default)]
    pub history_events: u64,
    #[serde(flatten)]
    pub state: Job,
}

/// Where a move stands as a whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum MoveStatus {
    InProgress,
    /// Appended in part: some of its jobs are moving, the rest not started yet, and the
    /// command service starts them as soon as it can (MOVE_INTERRUPTED).
    Interrupted,
    Completed,
    Failed,
    /// Finished, with some jobs completed and some failed.
    PartlyFailed,
    /// Cancelled by an operator: its jobs not completed went back (`CancelMove`).
    Cancelled,
}

impl MoveStatus {
    /// Its name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            MoveStatus::InProgress => "in_progress",
            MoveStatus::Interrupted => "interrupted",
            MoveStatus::Completed => "completed",
            MoveStatus::Failed => "failed",
            MoveStatus::PartlyFailed => "partly_failed",
            MoveStatus::Cancelled => "cancelled",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct MoveView {
    pub move_id: CommandId,
    pub scope: MoveScope,
    pub from: DaemonId,
    pub to: DaemonId,
    pub reason: Option<String>,
    pub actor: String,
    pub started_at: u64,
    pub updated_at: u64,
    pub planned: u32,
    pub jobs: BTreeMap<JobId, MovePhase>,
    pub status: MoveStatus,
    /// Started by the failover policy.
    #[serde(default)]
    pub automatic: bool,
    /// Who cancelled it, when and why (`CancelMove`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancelled: Option<Cancellation>,
    /// A spread: the destinations allowed (empty: any eligible); `to` is the first
    /// destination, and each job goes where its `JobMoveStarted` says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spread: Option<Vec<DaemonId>>,
    /// One job's move of this drain (its `DrainDaemon` command's id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain: Option<CommandId>,
}

/// An operator's cancellation of a move.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Cancellation {
    /// The cancel command's id.
    pub command: CommandId,
    pub by: String,
    pub at: u64,
    pub reason: String,
}

/// A move as a list shows it: its jobs counted by phase rather than named, so that a
/// page of moves stays small however many jobs each moves (`move` names them).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct MoveSummary {
    pub move_id: CommandId,
    pub scope: MoveScope,
    pub from: DaemonId,
    pub to: DaemonId,
    pub reason: Option<String>,
    pub actor: String,
    pub started_at: u64,
    pub updated_at: u64,
    pub planned: u32,
    /// Jobs started, by phase.
    pub phases: BTreeMap<MovePhase, u32>,
    pub status: MoveStatus,
    pub automatic: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancelled: Option<Cancellation>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spread: Option<Vec<DaemonId>>,
    /// One job's move of this drain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain: Option<CommandId>,
}

impl From<MoveView> for MoveSummary {
    fn from(m: MoveView) -> Self {
        let mut phases = BTreeMap::new();
        for p in m.jobs.values() {
            *phases.entry(*p).or_insert(0) += 1;
        }
        MoveSummary {
            move_id: m.move_id,
            scope: m.scope,
            from: m.from,
            to: m.to,
            reason: m.reason,
            actor: m.actor,
            started_at: m.started_at,
            updated_at: m.updated_at,
            planned: m.planned,
            phases,
            status: m.status,
            automatic: m.automatic,
            cancelled: m.cancelled,
            spread: m.spread,
            drain: m.drain,
        }
    }
}

impl MoveSummary {
    /// Jobs started, in any phase.
    pub fn started(&self) -> u32 {
        self.phases.values().sum()
    }

    /// Jobs completed or failed.
    pub fn ended(&self) -> u32 {
        self.phases
            .iter()
            .filter(|(p, _)| p.is_final())
            .map(|(_, n)| n)
            .sum()
    }
}

/// An alert: open until its resolving event (`closed_at` set then).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct AlertView {
    #[serde(rename = "type")]
    pub kind: AlertKind,
    /// The daemon or job it is about, or `fleet`.
    pub about: String,
    pub detail: String,
    /// The event that raised it: its sequence, time and type.
    pub raised_seq: u64,
    pub raised_at: u64,
    pub raised_by: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closed_at: Option<u64>,
    /// The event that closed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closed_by: Option<String>,
}

impl AlertView {
    pub fn is_open(&self) -> bool {
        self.closed_at.is_none()
    }
}

/// A job a daemon owns; `moving_in` while the daemon rebuilds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct AssignmentView {
    pub daemon: DaemonId,
    pub job: JobId,
    pub epoch: u64,
    pub moving_in: Option<CommandId>,
}

/// One event in a job's or a daemon's history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct HistoryEntry {
    pub seq: u64,
    pub at: u64,
    pub actor: String,
    pub command: CommandId,
    #[serde(flatten)]
    pub event: Event,
}

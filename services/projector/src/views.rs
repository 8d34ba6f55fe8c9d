//! The views, and how one event changes them.
//!
//! The projector keeps the domain state in memory (loaded from the store at start) and
//! folds each event with the domain's own `State::apply`, so the views never disagree
//! with the rules. After each event it writes the records of everything the event
//! touched:
//!
//! | key | value |
//! |-----|-------|
//! | `daemon\0<daemon>` | [`DaemonView`] |
//! | `project\0<project>` | [`ProjectView`] |
//! | `job\0<job>` | [`JobView`] |
//! | `move\0<move>` | [`MoveView`] |
//! | `assign\0<daemon>\0<job>` | [`AssignmentView`]: the jobs each daemon owns |
//! | `hist\0job\0<job>\0<seq>` | [`HistoryEntry`] |
//! | `hist\0daemon\0<daemon>\0<seq>` | [`HistoryEntry`] |
//!
//! Sequences in keys are 20-digit zero-padded decimals, so key order is stream order.

use std::collections::{BTreeMap, BTreeSet};

use handoff_domain::model::MovePhase;
use handoff_domain::state::Assignment;
use handoff_domain::{CommandId, DaemonId, Event, JobId, ProjectId, State};
use handoff_eventlog::Recorded;
pub use handoff_protocol::views::{
    AssignmentView, DaemonView, HistoryEntry, JobView, MoveStatus, MoveView, ProjectView,
};
use serde::Serialize;

use crate::store::{StoreError, ViewStore, Write};

pub fn daemon_key(d: &DaemonId) -> Vec<u8> {
    key(&["daemon", d.as_str()])
}
pub fn project_key(p: &ProjectId) -> Vec<u8> {
    key(&["project", p.as_str()])
}
pub fn job_key(j: &JobId) -> Vec<u8> {
    key(&["job", j.as_str()])
}
pub fn move_key(m: &CommandId) -> Vec<u8> {
    key(&["move", m.as_str()])
}
pub fn assignment_key(d: &DaemonId, j: &JobId) -> Vec<u8> {
    key(&["assign", d.as_str(), j.as_str()])
}
pub fn history_job_key(j: &JobId, seq: u64) -> Vec<u8> {
    key(&["hist", "job", j.as_str(), &format!("{seq:020}")])
}
pub fn history_daemon_key(d: &DaemonId, seq: u64) -> Vec<u8> {
    key(&["hist", "daemon", d.as_str(), &format!("{seq:020}")])
}

/// Joins parts with NUL, which no id may contain; a prefix query ends with a NUL.
pub fn key(parts: &[&str]) -> Vec<u8> {
    parts.join("\0").into_bytes()
}

/// A prefix covering every key under `parts`.
pub fn prefix(parts: &[&str]) -> Vec<u8> {
    let mut k = key(parts);
    k.push(0);
    k
}

fn json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("views always serialize")
}

/// The in-memory state behind the views, with the move metadata the domain state does
/// not keep, and what changed since the last [`Views::drain`].
#[derive(Default)]
pub struct Views {
    state: State,
    moves: BTreeMap<CommandId, MoveView>,
    dirty: Dirty,
}

/// Records to write at the end of a batch: each is serialized once however many events
/// of the batch touched it.
#[derive(Default)]
struct Dirty {
    daemons: BTreeSet<DaemonId>,
    projects: BTreeSet<ProjectId>,
    jobs: BTreeSet<JobId>,
    moves: BTreeSet<CommandId>,
    assignments: BTreeSet<(DaemonId, JobId)>,
}

impl Views {
    /// Rebuilds the in-memory state from the stored views.
    pub fn load(store: &impl ViewStore) -> Result<Self, StoreError> {
        let mut views = Views::default();
        let corrupt = |e: serde_json::Error| StoreError::Corrupt {
            path: Default::default(),
            detail: format!("unreadable view: {e}"),
        };
        for (_, v) in store.scan(&prefix(&["daemon"]))? {
            let d: DaemonView = serde_json::from_slice(&v).map_err(corrupt)?;
            views.state.daemons.insert(d.daemon, d.state);
        }
        for (_, v) in store.scan(&prefix(&["project"]))? {
            let p: ProjectView = serde_json::from_slice(&v).map_err(corrupt)?;
            views.state.projects.insert(p.project, p.state);
        }
        for (_, v) in store.scan(&prefix(&["job"]))? {
            let j: JobView = serde_json::from_slice(&v).map_err(corrupt)?;
            views.state.jobs.insert(j.job, j.state);
        }
        for (_, v) in store.scan(&prefix(&["move"]))? {
            let m: MoveView = serde_json::from_slice(&v).map_err(corrupt)?;
            views.state.moves.insert(
                m.move_id.clone(),
                handoff_domain::state::Move {
                    scope: m.scope.clone(),
                    from: m.from.clone(),
                    to: m.to.clone(),
                    reason: m.reason.clone(),
                    planned: m.planned,
                    jobs: m.jobs.clone(),
                },
            );
            views.moves.insert(m.move_id.clone(), m);
        }
        Ok(views)
    }

    /// Folds one event: its history entries go to `writes` now, the records it touched
    /// are written by the next [`Views::drain`].
    pub fn apply(&mut self, r: &Recorded, writes: &mut Vec<Write>) {
        let event = &r.envelope.event;
        let jobs: Vec<&JobId> = event.jobs();
        // Owners before and after: a previous owner loses the job, a new one gains it.
        let mut touched: Vec<(DaemonId, JobId)> = Vec::new();
        for j in &jobs {
            if let Some(job) = self.state.jobs.get(*j) {
                touched.push((job.owner().clone(), (*j).clone()));
            }
        }
        self.state.apply(event);
        for j in &jobs {
            if let Some(job) = self.state.jobs.get(*j) {
                touched.push((job.owner().clone(), (*j).clone()));
                self.dirty.jobs.insert((*j).clone());
            }
        }
        for (d, j) in touched {
            self.dirty.daemons.insert(d.clone());
            self.dirty.assignments.insert((d, j));
        }
        self.dirty
            .daemons
            .extend(event.daemons().into_iter().cloned());
        if let Event::ProjectConfigured { project, .. } = event {
            self.dirty.projects.insert(project.clone());
        }
        if let Some(move_id) = move_of(event) {
            if let Some(m) = self.state.moves.get(move_id) {
                let view = self
                    .moves
                    .entry(move_id.clone())
                    .or_insert_with(|| MoveView {
                        move_id: move_id.clone(),
                        scope: m.scope.clone(),
                        from: m.from.clone(),
                        to: m.to.clone(),
                        reason: m.reason.clone(),
                        actor: r.envelope.actor.to_string(),
                        started_at: r.envelope.at,
                        updated_at: r.envelope.at,
                        planned: m.planned,
                        jobs: BTreeMap::new(),
                        status: MoveStatus::InProgress,
                    });
                view.updated_at = r.envelope.at;
                self.dirty.moves.insert(move_id.clone());
            }
        }

        let entry = json(&HistoryEntry {
            seq: r.seq,
            at: r.envelope.at,
            actor: r.envelope.actor.to_string(),
            command: r.envelope.command.clone(),
            event: event.clone(),
        });
        for j in jobs {
            writes.push((history_job_key(j, r.seq), Some(entry.clone())));
        }
        for d in event.daemons() {
            writes.push((history_daemon_key(d, r.seq), Some(entry.clone())));
        }
    }

    /// Appends the writes of every record changed since the last drain.
    pub fn drain(&mut self, writes: &mut Vec<Write>) {
        let dirty = std::mem::take(&mut self.dirty);
        for (d, j) in dirty.assignments {
            let owned = self
                .state
                .daemons
                .get(&d)
                .is_some_and(|daemon| daemon.jobs.contains(&j));
            let value = owned.then(|| {
                let job = &self.state.jobs[&j];
                json(&AssignmentView {
                    daemon: d.clone(),
                    job: j.clone(),
                    epoch: job.epoch,
                    moving_in: match &job.assignment {
                        Assignment::Moving { move_id, .. } => Some(move_id.clone()),
                        Assignment::Assigned { .. } => None,
                    },
                })
            });
            writes.push((assignment_key(&d, &j), value));
        }
        for d in dirty.daemons {
            if let Some(daemon) = self.state.daemons.get(&d) {
                let view = DaemonView {
                    free_bytes: daemon.free_bytes(),
                    state: daemon.clone(),
                    daemon: d,
                };
                writes.push((daemon_key(&view.daemon), Some(json(&view))));
            }
        }
        for p in dirty.projects {
            if let Some(project) = self.state.projects.get(&p) {
                let view = ProjectView {
                    state: project.clone(),
                    project: p,
                };
                writes.push((project_key(&view.project), Some(json(&view))));
            }
        }
        for j in dirty.jobs {
            if let Some(job) = self.state.jobs.get(&j) {
                let view = JobView {
                    owner: job.owner().clone(),
                    state: job.clone(),
                    job: j,
                };
                writes.push((job_key(&view.job), Some(json(&view))));
            }
        }
        for m in dirty.moves {
            if let (Some(state), Some(view)) = (self.state.moves.get(&m), self.moves.get_mut(&m)) {
                view.jobs.clone_from(&state.jobs);
                view.status = move_status(state.planned, &state.jobs);
                writes.push((move_key(&m), Some(json(view))));
            }
        }
    }
}

fn move_of(event: &Event) -> Option<&CommandId> {
    match event {
        Event::MoveStarted { move_id, .. }
        | Event::JobMoveStarted { move_id, .. }
        | Event::JobMovePhaseReported { move_id, .. }
        | Event::JobMoveCompleted { move_id, .. }
        | Event::JobMoveFailed { move_id, .. } => Some(move_id),
        _ => None,
    }
}

fn move_status(planned: u32, jobs: &BTreeMap<JobId, MovePhase>) -> MoveStatus {
    if (jobs.len() as u32) < planned || jobs.values().any(|p| !p.is_final()) {
        return MoveStatus::InProgress;
    }
    let failed = jobs.values().filter(|p| **p == MovePhase::Failed).count();
    match failed {
        0 => MoveStatus::Completed,
        n if n == jobs.len() => MoveStatus::Failed,
        _ => MoveStatus::PartlyFailed,
    }
}

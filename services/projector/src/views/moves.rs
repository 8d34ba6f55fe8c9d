//! How a move's view follows its events, as `State::apply` follows them in the state's
//! moves (which the state forgets once a move is over).

use std::collections::BTreeMap;

use handoff_domain::model::MovePhase;
use handoff_domain::{CommandId, Event, JobId};

use super::{MoveStatus, MoveView};

pub(super) fn move_of(event: &Event) -> Option<&CommandId> {
    match event {
        Event::MoveStarted { move_id, .. }
        | Event::MoveInterrupted { move_id, .. }
        | Event::MoveResumed { move_id, .. }
        | Event::JobMoveStarted { move_id, .. }
        | Event::JobMovePhaseReported { move_id, .. }
        | Event::JobMoveCompleted { move_id, .. }
        | Event::JobMoveFailed { move_id, .. }
        | Event::MoveCancelled { move_id, .. } => Some(move_id),
        _ => None,
    }
}

/// What a move's event changes in its view's jobs, as `State::apply` does in the state's.
pub(super) fn follow_move(view: &mut MoveView, event: &Event) {
    let (job, phase) = match event {
        Event::JobMoveStarted { job, .. } => {
            view.jobs.insert(job.clone(), MovePhase::Requested);
            return;
        }
        Event::MoveResumed { started, .. } => {
            view.planned = *started;
            return;
        }
        // Nothing more starts, as in the state.
        Event::MoveCancelled { .. } => {
            view.planned = view.jobs.len() as u32;
            return;
        }
        Event::JobMovePhaseReported { job, phase, .. } => (job, *phase),
        Event::JobMoveCompleted { job, .. } => (job, MovePhase::Completed),
        Event::JobMoveFailed {
            job,
            cancelled: true,
            ..
        } => (job, MovePhase::Cancelled),
        Event::JobMoveFailed { job, .. } => (job, MovePhase::Failed),
        _ => return,
    };
    if let Some(p) = view.jobs.get_mut(job) {
        *p = phase;
    }
}

pub(super) fn move_status(planned: u32, jobs: &BTreeMap<JobId, MovePhase>) -> MoveStatus {
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

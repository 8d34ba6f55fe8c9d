//! The fold of a move's events: a job's start, completion and failure, and what each
//! daemon holds meanwhile.

use super::{Assignment, Drain, Job, State};
use crate::ids::{CommandId, DaemonId, JobId};
use crate::model::MovePhase;

impl State {
    pub(super) fn start_job_move(
        &mut self,
        job: &JobId,
        move_id: &CommandId,
        from: &DaemonId,
        to: &DaemonId,
        epoch: u64,
    ) {
        let by_operator = self.moves.get(move_id).is_some_and(|m| !m.automatic);
        let Some(j) = self.jobs.get_mut(job) else {
            return;
        };
        let size = j.size.head_size_bytes;
        let owner = j.owner().clone();
        if by_operator {
            j.operator_moved_from = Some(from.clone());
        }
        j.left_by_drain = None;
        j.assignment = Assignment::Moving {
            from: from.clone(),
            to: to.clone(),
            move_id: move_id.clone(),
            phase: MovePhase::Requested,
        };
        j.epoch = epoch;
        self.release(&owner, job, size);
        self.take(to, job, size);
        if let Some(m) = self.moves.get_mut(move_id) {
            m.jobs.insert(job.clone(), MovePhase::Requested);
        }
    }

    pub(super) fn complete_job_move(
        &mut self,
        job: &JobId,
        move_id: &CommandId,
        daemon: &DaemonId,
    ) {
        if let Some(j) = self.jobs.get_mut(job) {
            j.assignment = Assignment::Assigned {
                daemon: daemon.clone(),
            };
        }
        if let Some(drain) = self.drain_of(move_id) {
            drain.moved += 1;
        }
        self.set_move_phase(job, move_id, MovePhase::Completed);
    }

    /// The drain in progress a move belongs to.
    pub(super) fn drain_of(&mut self, move_id: &CommandId) -> Option<&mut Drain> {
        let m = self.moves.get(move_id)?;
        let id = m.drain.as_ref()?;
        self.drains.get_mut(&m.from).filter(|d| d.id == *id)
    }

    pub(super) fn fail_job_move(
        &mut self,
        job: &JobId,
        move_id: &CommandId,
        returned_to: &DaemonId,
        epoch: u64,
        cancelled: bool,
    ) {
        let Some(j) = self.jobs.get_mut(job) else {
            return;
        };
        let size = j.size.head_size_bytes;
        let owner = j.owner().clone();
        j.assignment = Assignment::Assigned {
            daemon: returned_to.clone(),
        };
        j.epoch = epoch;
        self.release(&owner, job, size);
        self.take(returned_to, job, size);
        if let Some(drain) = self.drain_of(move_id) {
            drain.left += 1;
            let id = drain.id.clone();
            if let Some(j) = self.jobs.get_mut(job) {
                j.left_by_drain = Some(id);
            }
        }
        let phase = if cancelled {
            MovePhase::Cancelled
        } else {
            MovePhase::Failed
        };
        self.set_move_phase(job, move_id, phase);
    }

    pub(super) fn take(&mut self, daemon: &DaemonId, job: &JobId, size: u64) {
        if let Some(d) = self.daemons.get_mut(daemon) {
            if d.jobs.insert(job.clone()) {
                d.used_bytes = d.used_bytes.saturating_add(size);
            }
        }
    }

    pub(super) fn release(&mut self, daemon: &DaemonId, job: &JobId, size: u64) {
        if let Some(d) = self.daemons.get_mut(daemon) {
            if d.jobs.remove(job) {
                d.used_bytes = if d.used_bytes == u64::MAX {
                    // Saturated: the true sum is unknown, so subtracting would undercount.
                    // Counted again from the jobs it still holds (rare: only heads past
                    // 16 EiB saturate).
                    let jobs = &self.jobs;
                    d.jobs
                        .iter()
                        .filter_map(|j| jobs.get(j))
                        .try_fold(0u64, |sum, j| sum.checked_add(j.size.head_size_bytes))
                        .unwrap_or(u64::MAX)
                } else {
                    d.used_bytes.saturating_sub(size)
                };
            }
        }
    }

    pub(super) fn set_phase(&mut self, job: &JobId, move_id: &CommandId, phase: MovePhase) {
        if let Some(Job {
            assignment:
                Assignment::Moving {
                    move_id: current,
                    phase: p,
                    ..
                },
            ..
        }) = self.jobs.get_mut(job)
        {
            if current == move_id {
                *p = phase;
            }
        }
        self.set_move_phase(job, move_id, phase);
    }

    pub(super) fn set_move_phase(&mut self, job: &JobId, move_id: &CommandId, phase: MovePhase) {
        if let Some(m) = self.moves.get_mut(move_id) {
            if let Some(p) = m.jobs.get_mut(job) {
                *p = phase;
            }
        }
    }
}

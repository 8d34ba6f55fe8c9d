//! One job's work at one assignment: raise the fence, decide whether the head on disk can
//! be reused, rebuild it if it is not active, then follow the oplog until told to stop.
//! However the work ends, its end goes back to the core.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use handoff_domain::JobId;
use tokio::sync::{mpsc, watch};

use super::core::{Assignment, Input, WorkEnd};
use super::progress::ProgressState;
use super::{follow, moving, JobError, Shared};
use crate::head::{HeadMeta, HeadStatus};

/// A job's running work.
pub(super) struct Task {
    epoch: u64,
    cancel: watch::Sender<bool>,
    handle: tokio::task::JoinHandle<()>,
}

impl Task {
    pub(super) fn epoch(&self) -> u64 {
        self.epoch
    }

    pub(super) fn cancel(&self) {
        // The work may have ended already; then there is nobody to tell.
        let _ = self.cancel.send(true);
    }

    /// Waits until the work has ended.
    pub(super) async fn join(self) {
        if let Err(e) = self.handle.await {
            tracing::warn!(error = %e, "a job's work panicked");
        }
    }
}

/// Starts the job's work at `assignment`; its end is sent on `reports`.
pub(super) fn spawn(
    shared: Arc<Shared>,
    job: JobId,
    assignment: Assignment,
    reports: mpsc::UnboundedSender<Input>,
) -> Task {
    let (cancel, mut cancelled) = watch::channel(false);
    let epoch = assignment.epoch;
    let handle = tokio::spawn(async move {
        let mut report = Report {
            reports,
            job: job.clone(),
            epoch,
            end: WorkEnd::Failed,
        };
        report.end = match keep_job(&shared, &job, &assignment, &mut cancelled).await {
            Ok(()) if *cancelled.borrow() => WorkEnd::Cancelled,
            Ok(()) => WorkEnd::Finished,
            Err(e @ JobError::Fenced { .. }) => {
                tracing::warn!(%job, epoch, error = %e, "fenced: the job is no longer ours");
                WorkEnd::Fenced
            }
            Err(JobError::Head(e)) if e.store_broken() => {
                tracing::error!(%job, error = %e, "the heads' store is broken; the daemon stops");
                shared.broken.send_replace(Some(e.to_string()));
                WorkEnd::Failed
            }
            Err(e) => {
                tracing::warn!(%job, error = %e, "job work interrupted; starting again");
                WorkEnd::Failed
            }
        };
    });
    Task {
        epoch,
        cancel,
        handle,
    }
}

/// Sends the work's end when dropped: also when the work panics, which counts as failed.
struct Report {
    reports: mpsc::UnboundedSender<Input>,
    job: JobId,
    epoch: u64,
    end: WorkEnd,
}

impl Drop for Report {
    fn drop(&mut self) {
        // The daemon is shutting down if nobody listens any more.
        let _ = self.reports.send(Input::WorkEnded {
            job: self.job.clone(),
            epoch: self.epoch,
            end: self.end,
        });
    }
}

/// Counts a head being built for as long as it lives.
struct Rebuilding<'a>(&'a AtomicUsize);

impl<'a> Rebuilding<'a> {
    fn count(n: &'a AtomicUsize) -> Self {
        n.fetch_add(1, Ordering::Relaxed);
        Rebuilding(n)
    }
}

impl Drop for Rebuilding<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Builds (or rebuilds) the head if needed, then keeps it current and takes its
/// snapshots, until cancelled.
async fn keep_job(
    shared: &Shared,
    job: &JobId,
    a: &Assignment,
    cancelled: &mut watch::Receiver<bool>,
) -> Result<(), JobError> {
    // The fence rises to our epoch before we touch anything: from here on, the job's
    // previous owner can no longer write its snapshots or its head position.
    let fence = shared
        .stores
        .fences
        .raise(job, a.epoch)
        .await
        .map_err(crate::store::StoreError::from)?;
    if fence > a.epoch {
        return Err(JobError::Fenced {
            reason: format!(
                "job {job} is at epoch {fence}, this daemon holds {}",
                a.epoch
            ),
        });
    }
    let head = shared.heads.head(job)?;
    let mut progress = ProgressState::new(shared, job, a.epoch, a.move_id());
    let mut meta = match plan(head.meta()?, job, a) {
        Plan::ReportFailure { reason } => {
            return moving::report_failure(shared, job, a, &mut progress, reason, cancelled).await;
        }
        Plan::Reuse(meta) => {
            head.set_meta(&meta)?;
            meta
        }
        Plan::Fresh(meta) => {
            head.clear()?;
            meta
        }
    };
    if meta.status != HeadStatus::Active {
        let _rebuilding = Rebuilding::count(&shared.rebuilding);
        let _permit = tokio::select! {
            _ = cancelled.changed() => return Ok(()),
            // The semaphore is never closed, so acquiring only waits.
            p = shared.workers.acquire() => p.expect("the workers' semaphore is never closed"),
        };
        let mut timed = crate::telemetry::Rebuild::start();
        let rebuilt =
            moving::rebuild(shared, job, a, &head, &mut meta, &mut progress, cancelled).await?;
        timed.ended(match &rebuilt {
            Err(_) => "failed",
            Ok(()) if *cancelled.borrow() => "cancelled",
            // Its completion refused: the head was dropped.
            Ok(()) if matches!(meta.status, HeadStatus::Failed { .. }) => "failed",
            Ok(()) => "completed",
        });
        drop(timed);
        if let Err(moving::Unrecoverable(reason)) = rebuilt {
            let failed = (&head, &mut meta);
            return moving::fail(shared, job, a, failed, &mut progress, reason, cancelled).await;
        }
        if *cancelled.borrow() || matches!(meta.status, HeadStatus::Failed { .. }) {
            return Ok(());
        }
    }
    follow::follow(shared, job, &head, &mut meta, cancelled).await
}

/// What the head on disk means for the work at an assignment.
#[derive(Debug, PartialEq, Eq)]
enum Plan {
    /// This daemon failed the very move the assignment is, and the command service may
    /// not have heard it: report the failure (again), never rebuild.
    ReportFailure { reason: String },
    /// Go on from the head on disk: its position, with its epoch and status set for the
    /// assignment.
    Reuse(HeadMeta),
    /// Empty the head and build it from nothing.
    Fresh(HeadMeta),
}

/// Decides what to do with the head on disk (`meta`, none if there is no head) for the
/// work at `a`.
fn plan(meta: Option<HeadMeta>, job: &JobId, a: &Assignment) -> Plan {
    let move_id = a.move_id();
    if let (Some(m), Some(id)) = (&meta, move_id) {
        if let HeadStatus::Failed {
            move_id: failed,
            reason,
        } = &m.status
        {
            if failed == id.as_str() {
                return Plan::ReportFailure {
                    reason: reason.clone(),
                };
            }
        }
    }
    // A head restored here holds consistent data at its position, whatever happened
    // since: it only needs the oplog after it (a job back after a failed move, a move
    // after a restart, a rebuild cut off by a kill).
    let reusable = meta.filter(|m| {
        m.restored_from.is_some()
            && m.epoch <= a.epoch
            && !matches!(m.status, HeadStatus::Failed { .. })
    });
    let Some(mut m) = reusable else {
        return Plan::Fresh(HeadMeta::new(
            job.clone(),
            a.epoch,
            match move_id {
                Some(id) => HeadStatus::Rebuilding {
                    move_id: id.to_string(),
                },
                None => HeadStatus::Building,
            },
        ));
    };
    let completed = m.status == HeadStatus::Active && m.epoch == a.epoch;
    if let (Some(id), false) = (move_id, completed) {
        m.status = HeadStatus::Rebuilding {
            move_id: id.to_string(),
        };
    }
    m.epoch = a.epoch;
    Plan::Reuse(m)
}

#[cfg(test)]
mod tests {
    use handoff_domain::event::AssignmentCause;
    use handoff_domain::CommandId;

    use super::*;

    fn moved(epoch: u64, move_id: &CommandId) -> Assignment {
        Assignment {
            epoch,
            cause: AssignmentCause::Move {
                move_id: move_id.clone(),
            },
        }
    }

    /// Given a head that records this daemon's failure of a move, when the work at that
    /// move starts again (a retry, a restart), then the failure is reported again, not
    /// taken as heard; at another move the head is emptied and rebuilt.
    #[test]
    fn a_failure_on_record_is_reported_again_until_heard() {
        let job = JobId::new("p/rs1").unwrap();
        let failed = CommandId::new("01ARZ3NDEKTSV4RRFFQ69G5FAV").unwrap();
        let later = CommandId::new("01ARZ3NDEKTSV4RRFFQ69G5FAW").unwrap();
        let mut meta = HeadMeta::new(
            job.clone(),
            2,
            HeadStatus::Failed {
                move_id: failed.to_string(),
                reason: "snapshot s1 of p/rs1 is corrupt".into(),
            },
        );
        meta.restored_from = Some("s1".into());
        assert_eq!(
            plan(Some(meta.clone()), &job, &moved(2, &failed)),
            Plan::ReportFailure {
                reason: "snapshot s1 of p/rs1 is corrupt".into()
            }
        );
        assert!(matches!(
            plan(Some(meta), &job, &moved(4, &later)),
            Plan::Fresh(m) if m.epoch == 4 && m.status == HeadStatus::Rebuilding {
                move_id: later.to_string()
            }
        ));
    }
}

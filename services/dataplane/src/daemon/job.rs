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
use crate::head::{Head, HeadError, HeadMeta, HeadStatus};

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
    let Some(mut meta) = head_to_use(&head, job, a)? else {
        return Ok(()); // This daemon failed that move; the job went back.
    };
    let mut progress = ProgressState::new(shared, job, a.epoch, a.move_id());
    if meta.status != HeadStatus::Active {
        let _rebuilding = Rebuilding::count(&shared.rebuilding);
        let _permit = tokio::select! {
            _ = cancelled.changed() => return Ok(()),
            // The semaphore is never closed, so acquiring only waits.
            p = shared.workers.acquire() => p.expect("the workers' semaphore is never closed"),
        };
        let rebuilt =
            moving::rebuild(shared, job, a, &head, &mut meta, &mut progress, cancelled).await?;
        if let Err(moving::Unrecoverable(reason)) = rebuilt {
            moving::fail(shared, job, a, &head, &mut meta, &mut progress, reason).await?;
            return Ok(());
        }
        if *cancelled.borrow() || matches!(meta.status, HeadStatus::Failed { .. }) {
            return Ok(());
        }
    }
    follow::follow(shared, job, &head, &mut meta, cancelled).await
}

/// The head's position to go on from, its epoch and status set for `a`; none if this
/// daemon failed the very move that `a` is (the job went back to its source).
fn head_to_use(head: &Head, job: &JobId, a: &Assignment) -> Result<Option<HeadMeta>, HeadError> {
    let move_id = a.move_id();
    let mut meta = head.meta()?;
    if let (Some(m), Some(id)) = (&meta, move_id) {
        if matches!(&m.status, HeadStatus::Failed { move_id: failed, .. } if failed == id.as_str())
        {
            return Ok(None);
        }
    }
    // A head restored here holds consistent data at its position, whatever happened
    // since: it only needs the oplog after it (a job back after a failed move, a move
    // after a restart, a rebuild cut off by a kill).
    let reusable = meta.as_ref().is_some_and(|m| {
        m.restored_from.is_some()
            && m.epoch <= a.epoch
            && !matches!(m.status, HeadStatus::Failed { .. })
    });
    if !reusable {
        head.clear()?;
        meta = None;
    }
    if let Some(m) = &mut meta {
        let completed = m.status == HeadStatus::Active && m.epoch == a.epoch;
        if let (Some(id), false) = (move_id, completed) {
            m.status = HeadStatus::Rebuilding {
                move_id: id.to_string(),
            };
        }
        m.epoch = a.epoch;
        head.set_meta(m)?;
    }
    Ok(Some(meta.unwrap_or_else(|| {
        HeadMeta::new(
            job.clone(),
            a.epoch,
            match move_id {
                Some(id) => HeadStatus::Rebuilding {
                    move_id: id.to_string(),
                },
                None => HeadStatus::Building,
            },
        )
    })))
}

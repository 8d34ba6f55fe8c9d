//! Moves, on both ends. Into this daemon: rebuild the head (restore the latest snapshot,
//! replay the oplog after it), then complete the move with the head's point, or fail it
//! with the reason (THEFT_FAILED). Away from it: watch the job's events until its move
//! ends, so the core knows whether the head may go.

use std::sync::Arc;
use std::time::Duration;

use handoff_client::{Client, SendError};
use handoff_domain::command::{CompleteJobMove, FailJobMove, ReportJobMovePhase};
use handoff_domain::event::Aggregate;
use handoff_domain::model::{HeadPoint, MovePhase};
use handoff_domain::{Command, CommandId, DaemonId, Event, JobId, Rejection};
use handoff_protocol::{subjects, Applied};
use tokio::sync::{mpsc, watch};

use super::core::{Assignment, Input, MoveEnd};
use super::progress::ProgressState;
use super::{Done, JobError, Shared};
use crate::head::{Head, HeadMeta, HeadStatus};
use crate::rebuild::{self, Outcome};

/// Why a rebuild cannot finish: the move fails with this reason.
pub(super) struct Unrecoverable(pub(super) String);

/// Restores the latest snapshot (unless already restored) and replays the oplog until
/// caught up; then completes the move (or marks a new head active).
pub(super) async fn rebuild(
    shared: &Shared,
    job: &JobId,
    a: &Assignment,
    head: &Head,
    meta: &mut HeadMeta,
    progress: &mut ProgressState<'_>,
    cancelled: &mut watch::Receiver<bool>,
) -> Result<Result<(), Unrecoverable>, JobError> {
    if meta.restored_from.is_none() {
        match restore(shared, job, a, head, meta, progress, cancelled).await? {
            Restored::Yes => {}
            Restored::Cancelled => return Ok(Ok(())),
            Restored::No(reason) => return Ok(Err(reason)),
        }
    }
    report_phase(shared, job, a, MovePhase::ReplayingOplog).await;
    progress.phase(MovePhase::ReplayingOplog).await;
    // Replay until the head holds every stored entry.
    match rebuild::replay(&shared.stores, job, head, meta, cancelled, progress).await? {
        Outcome::Done => {}
        Outcome::Cancelled => return Ok(Ok(())),
        Outcome::Failed(reason) => return Ok(Err(Unrecoverable(reason))),
    }
    finish(shared, job, a, head, meta, progress).await
}

enum Restored {
    Yes,
    Cancelled,
    No(Unrecoverable),
}

/// Restores a snapshot into the head: the latest for a move, or failing that an older one
/// for a job that is already this daemon's.
async fn restore(
    shared: &Shared,
    job: &JobId,
    a: &Assignment,
    head: &Head,
    meta: &mut HeadMeta,
    progress: &mut ProgressState<'_>,
    cancelled: &mut watch::Receiver<bool>,
) -> Result<Restored, JobError> {
    let moving = a.move_id().is_some();
    report_phase(shared, job, a, MovePhase::RestoringSnapshot).await;
    progress.phase(MovePhase::RestoringSnapshot).await;
    let snaps = loop {
        let snaps = shared.stores.snapshots(Some(job)).await?;
        match snaps.is_empty() {
            false => break snaps,
            true if moving => {
                return Ok(Restored::No(Unrecoverable(format!(
                    "no snapshot of {job} in the snapshot store"
                ))))
            }
            // A new job: the agent's initial sync has not stored it yet.
            true => tokio::select! {
                _ = cancelled.changed() => return Ok(Restored::Cancelled),
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            },
        }
    };
    // A move rebuilds from the latest snapshot or fails; a job that is already this
    // daemon's falls back to older snapshots rather than stay without a head.
    let mut problems = Vec::new();
    for snapshot in snaps.iter().rev() {
        match rebuild::restore_snapshot(&shared.stores, head, meta, snapshot, progress).await? {
            Outcome::Done => return Ok(Restored::Yes),
            Outcome::Cancelled => return Ok(Restored::Cancelled),
            Outcome::Failed(reason) if moving => return Ok(Restored::No(Unrecoverable(reason))),
            Outcome::Failed(reason) => {
                tracing::warn!(%job, reason, "snapshot unusable; trying an older one");
                problems.push(reason);
            }
        }
    }
    Ok(Restored::No(Unrecoverable(problems.join("; "))))
}

/// Tells the command service the move's phase; a refusal or an outage only loses a report.
async fn report_phase(shared: &Shared, job: &JobId, a: &Assignment, phase: MovePhase) {
    let Some(move_id) = a.move_id() else {
        return;
    };
    let command = Command::ReportJobMovePhase(ReportJobMovePhase {
        job: job.clone(),
        move_id: move_id.clone(),
        epoch: a.epoch,
        phase,
    });
    if let Err(e) = shared
        .client
        .send(&handoff_client::new_command_id(), &command)
        .await
    {
        tracing::debug!(%job, error = %e, "phase not recorded");
    }
}

/// Completes the move with the head's point (a move), and marks the head active.
async fn finish(
    shared: &Shared,
    job: &JobId,
    a: &Assignment,
    head: &Head,
    meta: &mut HeadMeta,
    progress: &mut ProgressState<'_>,
) -> Result<Result<(), Unrecoverable>, JobError> {
    if let Some(move_id) = a.move_id() {
        let point = HeadPoint {
            ts: meta.ts.to_string(),
            checksum: meta.checksum.to_string(),
        };
        let command = Command::CompleteJobMove(CompleteJobMove {
            job: job.clone(),
            move_id: move_id.clone(),
            epoch: a.epoch,
            head: Some(point.clone()),
        });
        // The same id on a retry after a restart: one completion.
        let id = report_id(move_id, job, Report::Completion);
        match shared.client.send(&id, &command).await {
            Ok(_) => {}
            Err(e) if !is_final(&e) => return Err(JobError::Send(e)),
            Err(e) => return completion_refused(shared, job, move_id, head, meta, e).await,
        }
        tracing::info!(%job, move_id = %move_id, ts = %point.ts, checksum = %point.checksum, "move completed");
        progress
            .update(true, |p| {
                p.phase = MovePhase::Completed;
                p.done = Some(Done::Completed {
                    ts: meta.ts,
                    checksum: meta.checksum,
                });
            })
            .await;
    }
    meta.status = HeadStatus::Active;
    head.set_meta(meta)?;
    Ok(Ok(()))
}

/// The command service refused the completion for good ([`is_final`]): completed before (a
/// rebuild again after a crash or a lost reply), or the move is over without us.
async fn completion_refused(
    shared: &Shared,
    job: &JobId,
    move_id: &CommandId,
    head: &Head,
    meta: &mut HeadMeta,
    refusal: SendError,
) -> Result<Result<(), Unrecoverable>, JobError> {
    if owner(shared, job).await? == Some(shared.id.clone()) {
        meta.status = HeadStatus::Active;
        head.set_meta(meta)?;
        return Ok(Ok(()));
    }
    // The move failed, or the job moved on: let the head go.
    let reason = refusal.body().message;
    tracing::warn!(%job, move_id = %move_id, reason, "completion refused; dropping the head");
    head.clear()?;
    meta.status = HeadStatus::Failed {
        move_id: move_id.to_string(),
        reason,
    };
    head.set_meta(meta)?;
    Ok(Ok(()))
}

/// The job's owner as its events say, unless it is moving.
async fn owner(shared: &Shared, job: &JobId) -> Result<Option<DaemonId>, JobError> {
    let subject = subjects::aggregate(&Aggregate::Job(job.clone()));
    let mut owner = None;
    for r in shared
        .log
        .events_of(&subject)
        .await
        .map_err(JobError::Log)?
    {
        owner = match r.envelope.event {
            Event::BackupJobCreated { daemon, .. } | Event::JobMoveCompleted { daemon, .. } => {
                Some(daemon)
            }
            Event::JobMoveFailed { returned_to, .. } => Some(returned_to),
            Event::JobMoveStarted { .. } => None,
            _ => owner,
        };
    }
    Ok(owner)
}

/// The reports on a move whose id is derived from it.
#[derive(Clone, Copy)]
enum Report {
    Completion = 0xc0de,
    Failure = 0xfa11,
}

/// A command id derived from a move, a job and the report, so one job's report on one
/// move has the same id however often it is sent, and is applied once.
fn report_id(move_id: &CommandId, job: &JobId, report: Report) -> CommandId {
    let base = ulid::Ulid::from_string(move_id.as_str()).unwrap_or_default();
    let h = crate::checksum::doc_hash(job.as_str(), move_id.as_str().as_bytes());
    let id = ulid::Ulid::from_parts(base.timestamp_ms(), u128::from(h) << 16 | report as u128);
    // A ULID's text is always a valid command id.
    CommandId::new(id.to_string()).expect("a ULID is a command id")
}

/// Fails the move (THEFT_FAILED): empties the head and records the failure in it, then
/// reports it. A job that is not moving has nobody to tell, and tries again.
pub(super) async fn fail(
    shared: &Shared,
    job: &JobId,
    a: &Assignment,
    (head, meta): (&Head, &mut HeadMeta),
    progress: &mut ProgressState<'_>,
    reason: String,
    cancelled: &mut watch::Receiver<bool>,
) -> Result<(), JobError> {
    let Some(move_id) = a.move_id() else {
        return Err(JobError::Build { reason });
    };
    tracing::error!(%job, move_id = %move_id, reason, "rebuild failed (THEFT_FAILED)");
    // On record before it is sent: until the command service has it, every new attempt at
    // this move (a retry, a restart) reports it again instead of rebuilding.
    head.clear()?;
    meta.status = HeadStatus::Failed {
        move_id: move_id.to_string(),
        reason: reason.clone(),
    };
    head.set_meta(meta)?;
    report_failure(shared, job, a, progress, reason, cancelled).await
}

/// Reports the failure of the move `a` is, with the same id each time, until the command
/// service has it or answers that the move is over ([`is_final`]). Not heard: an error,
/// so the work is started again and reports it again.
pub(super) async fn report_failure(
    shared: &Shared,
    job: &JobId,
    a: &Assignment,
    progress: &mut ProgressState<'_>,
    reason: String,
    cancelled: &mut watch::Receiver<bool>,
) -> Result<(), JobError> {
    let Some(move_id) = a.move_id() else {
        return Ok(());
    };
    let command = Command::FailJobMove(FailJobMove {
        job: job.clone(),
        move_id: move_id.clone(),
        epoch: a.epoch,
        reason: reason.chars().take(1000).collect(),
    });
    let id = report_id(move_id, job, Report::Failure);
    match send(&shared.client, &id, &command, cancelled).await {
        None => return Ok(()),
        Some(Ok(_)) => {}
        Some(Err(e)) if is_final(&e) => {
            tracing::info!(%job, move_id = %move_id, reason = %e, "the move is over already");
        }
        Some(Err(e)) => {
            tracing::warn!(%job, move_id = %move_id, error = %e, "the move's failure is not heard yet");
            return Err(JobError::Send(e));
        }
    }
    progress
        .update(true, |p| {
            p.phase = MovePhase::Failed;
            p.done = Some(Done::Failed { reason });
        })
        .await;
    Ok(())
}

/// Sends `command` as `id` unless the work is told to stop first (none then): a report
/// never holds a stop back, however long the command service takes.
async fn send(
    client: &Client,
    id: &CommandId,
    command: &Command,
    cancelled: &mut watch::Receiver<bool>,
) -> Option<Result<Applied, SendError>> {
    tokio::select! {
        _ = until_cancelled(cancelled) => None,
        r = client.send(id, command) => Some(r),
    }
}

/// Completes once the work is told to stop (at once if it was already).
async fn until_cancelled(cancelled: &mut watch::Receiver<bool>) {
    if cancelled.wait_for(|c| *c).await.is_err() {
        // The sender is gone with its task's handle: nobody can stop the work any more.
        std::future::pending::<()>().await;
    }
}

/// Watches a released job's events until its move ends, and reports how.
pub(super) async fn watch_move(
    shared: Arc<Shared>,
    job: JobId,
    reports: mpsc::UnboundedSender<Input>,
) {
    let subject = subjects::aggregate(&Aggregate::Job(job.clone()));
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let Ok(Some(last)) = shared.log.last_event_of(&subject).await else {
            continue;
        };
        let end = match last.envelope.event {
            Event::JobMoveCompleted { daemon, .. } if daemon != shared.id => {
                tracing::info!(%job, to = %daemon, "job moved away");
                MoveEnd::CompletedElsewhere
            }
            Event::JobMoveCompleted { .. } => MoveEnd::CompletedHere,
            Event::JobMoveFailed { .. } => MoveEnd::Failed,
            _ => continue,
        };
        // The daemon is shutting down if nobody listens any more.
        let _ = reports.send(Input::MoveEnded { job, end });
        return;
    }
}

/// Whether a refused report settles it: the move is not the job's current one any more
/// (`move_not_in_progress`) or the job has a newer epoch (`stale_epoch`), so the same
/// report can never be applied. Everything else (an outage, a server in trouble, a clock
/// out of the signature's window, too many conflicts, a user not known yet) may pass
/// later: the report is sent again with the same id, and what it reports is kept.
fn is_final(e: &SendError) -> bool {
    matches!(
        e,
        SendError::Rejected(Rejection::StaleEpoch { .. } | Rejection::MoveNotInProgress { .. })
    )
}

#[cfg(test)]
mod tests {
    use handoff_client::Outage;
    use handoff_protocol::{ErrorBody, ErrorCode};

    use super::*;

    fn refused(code: ErrorCode, reason: &str) -> SendError {
        SendError::Refused(ErrorBody::new(code, reason, reason))
    }

    /// Only the two answers that say the move is over without this daemon settle a
    /// report; a server's trouble (a full disk, too many batches, an incomplete batch, too
    /// many conflicts), a clock that is off, an outage or any other refusal is retried.
    #[test]
    fn only_a_stale_epoch_or_a_move_not_in_progress_is_final() {
        let job = JobId::new("p/rs1").unwrap();
        let move_id = CommandId::new("01ARZ3NDEKTSV4RRFFQ69G5FAV").unwrap();
        let finals = [
            SendError::Rejected(Rejection::StaleEpoch {
                job: job.clone(),
                reported: 2,
                current: 3,
            }),
            SendError::Rejected(Rejection::MoveNotInProgress {
                job: job.clone(),
                move_id,
            }),
        ];
        for e in &finals {
            assert!(is_final(e), "{e:?}");
        }
        let retried = [
            refused(ErrorCode::Internal, "insufficient_resources"),
            refused(ErrorCode::Internal, "too_many_batches"),
            refused(ErrorCode::Internal, "incomplete_batch"),
            refused(ErrorCode::Forbidden, "expired"),
            refused(ErrorCode::Conflict, "too_many_conflicts"),
            refused(ErrorCode::Forbidden, "unknown_user"),
            SendError::Rejected(Rejection::NotFound {
                kind: handoff_domain::rejection::Kind::Job,
                id: job.to_string(),
            }),
            SendError::Unavailable {
                attempts: 3,
                last: Outage::Service(ErrorBody::new(ErrorCode::Unavailable, "unavailable", "down")),
            },
        ];
        for e in &retried {
            assert!(!is_final(e), "{e:?}");
        }
    }
}

//! Moves, on both ends. Into this daemon: rebuild the head (restore the latest snapshot,
//! replay the oplog after it), then complete the move with the head's point, or fail it
//! with the reason (THEFT_FAILED). Away from it: watch the job's events until its move
//! ends, so the core knows whether the head may go.

use std::sync::Arc;
use std::time::Duration;

use handoff_client::{Client, Retry, SendError};
use handoff_domain::command::{CompleteJobMove, FailJobMove, ReportJobMovePhase};
use handoff_domain::event::Aggregate;
use handoff_domain::model::{HeadPoint, MovePhase};
use handoff_domain::{Command, CommandId, DaemonId, Event, JobId};
use handoff_protocol::{subjects, Applied};
use tokio::sync::{mpsc, watch};

use super::core::{Assignment, Input, MoveEnd, Release};
use super::progress::ProgressState;
use super::{Done, JobError, Shared};
use crate::head::{Head, HeadMeta, HeadStatus};
use crate::rebuild::{self, Outcome};

/// How long a watch on a move waits before it reads again after an error.
const WATCH_RETRY: Duration = Duration::from_secs(1);

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
    // A head kept from before (a restart, a job back after a failed move, a move back to a
    // daemon that was down) may be older than the oplog still stored, or no longer add up:
    // then it is built again from the latest snapshot, once.
    let mut kept = meta.restored_from.is_some();
    loop {
        if meta.restored_from.is_none() {
            match restore(shared, job, a, head, meta, progress, cancelled).await? {
                Restored::Yes => {}
                Restored::Cancelled => return Ok(Ok(())),
                Restored::No(reason) => return Ok(Err(reason)),
            }
        }
        report_phase(shared, job, a, MovePhase::ReplayingOplog, cancelled).await;
        progress.phase(MovePhase::ReplayingOplog).await;
        // Replay until the head holds every stored entry.
        match rebuild::replay(&shared.stores, job, head, meta, cancelled, progress).await? {
            Outcome::Done => break,
            Outcome::Cancelled => return Ok(Ok(())),
            Outcome::Failed(reason) if kept => {
                tracing::warn!(%job, reason, "the head kept here cannot catch up; restoring the latest snapshot");
                kept = false;
                meta.restored_from = None;
            }
            Outcome::Failed(reason) => return Ok(Err(Unrecoverable(reason))),
        }
    }
    finish(shared, job, a, (head, meta), progress, cancelled).await
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
    report_phase(shared, job, a, MovePhase::RestoringSnapshot, cancelled).await;
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

/// How a phase report is sent: a few seconds at most, and not at all when no command
/// service answers, so that it never holds a rebuild that can go on without it.
pub(super) const PHASE_RETRY: Retry = Retry {
    attempt_timeout: Duration::from_secs(2),
    deadline: Duration::from_secs(5),
    first_backoff: Duration::from_millis(100),
    max_backoff: Duration::from_secs(1),
    when_nothing_answers: false,
};

/// Tells the command service the move's phase, best effort ([`PHASE_RETRY`], given up
/// when the work is told to stop): a refusal or an outage only loses a report.
async fn report_phase(
    shared: &Shared,
    job: &JobId,
    a: &Assignment,
    phase: MovePhase,
    cancelled: &mut watch::Receiver<bool>,
) {
    let Some(move_id) = a.move_id() else {
        return;
    };
    let command = Command::ReportJobMovePhase(ReportJobMovePhase {
        job: job.clone(),
        move_id: move_id.clone(),
        epoch: a.epoch,
        phase,
    });
    let id = handoff_client::new_command_id();
    if let Some(Err(e)) = send(&shared.phases, &id, &command, cancelled).await {
        tracing::debug!(%job, error = %e, "phase not recorded");
    }
}

/// Completes the move with the head's point (a move), and marks the head active. Told to
/// stop before the command service answers, it leaves the head as it is (rebuilt, not
/// active): the next work at the move completes it.
async fn finish(
    shared: &Shared,
    job: &JobId,
    a: &Assignment,
    (head, meta): (&Head, &mut HeadMeta),
    progress: &mut ProgressState<'_>,
    cancelled: &mut watch::Receiver<bool>,
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
        tracing::info!(%job, move_id = %move_id, ts = %point.ts, "head rebuilt and verified; completing the move");
        match send(&shared.client, &id, &command, cancelled).await {
            None => return Ok(Ok(())),
            Some(Ok(_)) => {}
            Some(Err(e)) if !is_final(&e) => return Err(JobError::Send(e)),
            Some(Err(e)) => {
                return completion_refused(shared, job, move_id, head, meta, e).await;
            }
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

/// Watches the job's events after its release until the release's move ends, and
/// reports how. It reads on from where it is (never only the last event, which may be
/// anything that came after the end), and starts again after a read error.
pub(super) async fn watch_move(
    shared: Arc<Shared>,
    job: JobId,
    release: Release,
    reports: mpsc::UnboundedSender<Input>,
) {
    let subject = subjects::aggregate(&Aggregate::Job(job.clone()));
    // The move's own events on the job's subject come after the release: the release is
    // appended with the move's start, in one batch, after the job's `JobMoveStarted`.
    let mut from = release.seq + 1;
    let end = 'watch: loop {
        let mut reader = match shared.log.read_filtered(from, &subject).await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(%job, error = %e, "cannot watch the job's move; trying again");
                tokio::time::sleep(WATCH_RETRY).await;
                continue;
            }
        };
        loop {
            match reader.next().await {
                Ok(r) => {
                    from = r.seq + 1;
                    let event = &r.envelope.event;
                    if let Some(end) = move_end([event], &release.move_id, &shared.id) {
                        break 'watch end;
                    }
                }
                Err(e) => {
                    tracing::debug!(%job, error = %e, "the watch on the job's move broke off");
                    tokio::time::sleep(WATCH_RETRY).await;
                    continue 'watch;
                }
            }
        }
    };
    match end {
        MoveEnd::CompletedElsewhere => tracing::info!(%job, "job moved away"),
        MoveEnd::CompletedHere | MoveEnd::Failed => {}
    }
    // The daemon is shutting down if nobody listens any more.
    let _ = reports.send(Input::MoveEnded {
        job,
        seq: release.seq,
        end,
    });
}

/// Whether a refused report settles it: a domain rejection, such as the move not being
/// the job's current one any more (`move_not_in_progress`) or the job having a newer
/// epoch (`stale_epoch`). The command service records every domain rejection of these
/// reports under their id (decision 0010), so the same report can never be applied.
/// Everything else (an outage, a server in trouble, a clock out of the signature's
/// window, too many conflicts, a user not known yet) may pass later: the report is sent
/// again with the same id, and what it reports is kept.
fn is_final(e: &SendError) -> bool {
    matches!(e, SendError::Rejected(_))
}

/// How the move `move_id` ended for this daemon (`me`), if one of `events` (the job's,
/// in order) ends it.
fn move_end<'a>(
    events: impl IntoIterator<Item = &'a Event>,
    move_id: &CommandId,
    me: &DaemonId,
) -> Option<MoveEnd> {
    events.into_iter().find_map(|e| match e {
        Event::JobMoveCompleted {
            move_id: m, daemon, ..
        } if m == move_id => Some(match daemon == me {
            true => MoveEnd::CompletedHere,
            false => MoveEnd::CompletedElsewhere,
        }),
        // Back to its source: this daemon keeps its head; any other (the destination of
        // a cancelled move, released) lets it go.
        Event::JobMoveFailed {
            move_id: m,
            returned_to,
            ..
        } if m == move_id => Some(match returned_to == me {
            true => MoveEnd::Failed,
            false => MoveEnd::CompletedElsewhere,
        }),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use handoff_client::Outage;
    use handoff_domain::Rejection;
    use handoff_protocol::{ErrorBody, ErrorCode};

    use super::*;

    fn refused(code: ErrorCode, reason: &str) -> SendError {
        SendError::Refused(ErrorBody::new(code, reason, reason))
    }

    /// Only the two answers that say the move is over without this daemon settle a
    /// report; a server's trouble (a full disk, too many batches, an incomplete batch, too
    /// many conflicts), a clock that is off, an outage or any other refusal is retried.
    /// The end of a watched move is found among the job's events however many follow it
    /// (a retention change, the next move), and only the watched move's end counts.
    #[test]
    fn a_move_ends_with_its_own_completion_or_failure_whatever_follows() {
        let job = JobId::new("p/rs1").unwrap();
        let watched = CommandId::new("01ARZ3NDEKTSV4RRFFQ69G5FAV").unwrap();
        let other = CommandId::new("01ARZ3NDEKTSV4RRFFQ69G5FAW").unwrap();
        let (me, them) = (
            DaemonId::new("a.test:/h/").unwrap(),
            DaemonId::new("b.test:/h/").unwrap(),
        );
        let completed = |move_id: &CommandId, daemon: &DaemonId| Event::JobMoveCompleted {
            job: job.clone(),
            move_id: move_id.clone(),
            daemon: daemon.clone(),
            epoch: 3,
            head: None,
        };
        let failed = |move_id: &CommandId| Event::JobMoveFailed {
            job: job.clone(),
            move_id: move_id.clone(),
            reason: "corrupt".into(),
            returned_to: me.clone(),
            epoch: 4,
            cancelled: false,
        };
        let resized = Event::OplogTtlResized {
            job: job.clone(),
            previous_hours: 24,
            hours: 48,
            reason: "a rebuild still needs it".into(),
        };
        let phase = Event::JobMovePhaseReported {
            job: job.clone(),
            move_id: watched.clone(),
            phase: MovePhase::ReplayingOplog,
        };
        let end = |events: &[Event]| move_end(events, &watched, &me);
        assert_eq!(end(std::slice::from_ref(&phase)), None);
        assert_eq!(
            end(&[phase.clone(), completed(&watched, &them), resized.clone()]),
            Some(MoveEnd::CompletedElsewhere)
        );
        assert_eq!(
            end(&[completed(&watched, &me), completed(&other, &them)]),
            Some(MoveEnd::CompletedHere)
        );
        assert_eq!(
            end(&[failed(&watched), resized.clone(), completed(&other, &them)]),
            Some(MoveEnd::Failed)
        );
        assert_eq!(end(&[failed(&other), resized]), None);
        // Cancelled while this daemon rebuilt it (released from it): back to the source,
        // so the head here goes.
        let cancelled = Event::JobMoveFailed {
            job: job.clone(),
            move_id: watched.clone(),
            reason: "not now".into(),
            returned_to: them.clone(),
            epoch: 4,
            cancelled: true,
        };
        assert_eq!(end(&[cancelled]), Some(MoveEnd::CompletedElsewhere));
    }

    #[test]
    fn a_domain_rejection_is_final_a_refusal_or_an_outage_is_not() {
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
            SendError::Rejected(Rejection::NotFound {
                kind: handoff_domain::rejection::Kind::Job,
                id: job.to_string(),
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
            SendError::Unavailable {
                attempts: 3,
                last: Outage::Service(ErrorBody::new(
                    ErrorCode::Unavailable,
                    "unavailable",
                    "down",
                )),
            },
        ];
        for e in &retried {
            assert!(!is_final(e), "{e:?}");
        }
    }
}

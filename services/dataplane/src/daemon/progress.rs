//! The progress of a move's rebuild, published on `handoff.progress.<move>` (core NATS, not
//! stored) for `--wait` and the monitor, at most every 200 ms unless a phase changes.

use std::time::{Duration, Instant};

use handoff_domain::model::MovePhase;
use handoff_domain::{CommandId, JobId};
use handoff_protocol::subjects;

use super::{Progress, Shared};
use crate::rebuild::Observer;

const EVERY: Duration = Duration::from_millis(200);

/// The last progress of a job's rebuild; nothing for a job that is not moving.
pub(super) struct ProgressState<'a> {
    shared: &'a Shared,
    p: Option<Progress>,
    last: Instant,
    /// Snapshot bytes restored so far (reported as a running total).
    restored: u64,
}

impl<'a> ProgressState<'a> {
    pub(super) fn new(
        shared: &'a Shared,
        job: &JobId,
        epoch: u64,
        move_id: Option<&CommandId>,
    ) -> Self {
        ProgressState {
            shared,
            p: move_id.map(|m| Progress {
                move_id: m.to_string(),
                job: job.clone(),
                daemon: shared.id.clone(),
                epoch,
                phase: MovePhase::Requested,
                snapshot_bytes: 0,
                snapshot_total: 0,
                entries_applied: 0,
                lag_ms: 0,
                done: None,
            }),
            // The first report goes out at once.
            last: Instant::now()
                .checked_sub(EVERY)
                .unwrap_or_else(Instant::now),
            restored: 0,
        }
    }

    /// Changes the progress and publishes it if `force` or if the last report is old.
    pub(super) async fn update(&mut self, force: bool, change: impl FnOnce(&mut Progress)) {
        let Some(p) = &mut self.p else { return };
        change(p);
        if force || self.last.elapsed() >= EVERY {
            self.last = Instant::now();
            let body = match serde_json::to_vec(&*p) {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(error = %e, "progress cannot be encoded");
                    return;
                }
            };
            if let Err(e) = self
                .shared
                .stores
                .client
                .publish(subjects::progress(&p.move_id), body.into())
                .await
            {
                tracing::debug!(error = %e, "progress not published");
            }
        }
    }

    /// Announces a phase.
    pub(super) async fn phase(&mut self, phase: MovePhase) {
        self.update(true, |p| p.phase = phase).await;
    }
}

impl Observer for ProgressState<'_> {
    async fn restored(&mut self, done: u64, total: u64) {
        // A restore started over (another snapshot) counts again from its start.
        let before = if done < self.restored {
            0
        } else {
            self.restored
        };
        crate::telemetry::restored(done - before);
        self.restored = done;
        self.update(done == total, |p| {
            p.snapshot_bytes = done;
            p.snapshot_total = total;
        })
        .await;
    }

    async fn applied(&mut self, entries: u64, lag_ms: u64) {
        crate::telemetry::applied(entries);
        self.update(false, |p| {
            p.entries_applied += entries;
            p.lag_ms = lag_ms;
        })
        .await;
    }
}

//! Drains moved along by the service itself: while a drain is in progress, its next
//! job's move starts as soon as fewer than its limit are moving, and it ends once
//! nothing is left (`ContinueDrain`, decided as any command is, in the service's name).
//!
//! - A step is decided first without appending anything: a drain with nothing to do
//!   costs no event, and the drains are looked at again only once the model has folded
//!   something new (or a drain's retry is due).
//! - A step's refusal is never recorded (the service reports what it sees, as the
//!   monitor does): the first refusal for want of a daemon raises BIND_FAILURE on the
//!   daemon (`DrainBlocked`, once while it is open); the drain is tried again after
//!   [`BLOCKED_RETRY`], or after [`FAILED_RETRY`] when the stream could not be reached.
//! - At most [`STEPS_PER_CALL`] steps per call, taken round the drains in turn, so
//!   requests are served between calls however many drains there are.
//! - Two instances stepping the same drain at once are harmless: every move of a drain
//!   appends to the daemon's subject, as does its end, so one of them conflicts and
//!   decides again on the other's move.

use std::time::Instant;

use handoff_domain::command::ContinueDrain;

use super::*;

/// How long a drain whose next step was refused waits before it is tried again.
const BLOCKED_RETRY: Duration = Duration::from_secs(5);
/// How long a drain whose next step failed (the stream unavailable) waits.
const FAILED_RETRY: Duration = Duration::from_secs(1);
/// The most steps (each one move started, or a drain ended) one call takes.
const STEPS_PER_CALL: usize = 16;

/// Where the drains stand for the service between calls.
#[derive(Default)]
pub(super) struct Stepping {
    /// Drains not to try before the instant, by daemon (refused or failed last time).
    blocked: HashMap<DaemonId, Instant>,
    /// The model's sequence when every drain last had nothing to do: until it moves (or
    /// a retry is due), there is nothing to look at.
    idle_at: Option<u64>,
    /// The daemon stepped last, so the next call starts after it.
    last: Option<DaemonId>,
}

/// What one step did.
enum Step {
    /// A move started: the drain may have room for another.
    Started,
    /// Nothing more for this drain now (nothing to do, it ended, or it waits).
    Done,
}

impl Executor {
    /// Whether a drain is in progress: the service then calls [`Executor::step_drains`]
    /// often.
    pub fn draining(&self) -> bool {
        self.stopped.is_none() && !self.model.state.drains.is_empty()
    }

    /// Starts what the drains in progress may start now (one move per job, up to each
    /// drain's limit) and ends those with nothing left, at most [`STEPS_PER_CALL`] steps.
    pub async fn step_drains(&mut self) {
        if !self.draining() {
            return;
        }
        if let Err(e) = self.catch_up(self.appended).await {
            tracing::warn!(error = %e.message, "cannot look at the drains");
            return;
        }
        let now = Instant::now();
        let drains = &self.model.state.drains;
        self.drains.blocked.retain(|d, _| drains.contains_key(d));
        let retry_due = self.drains.blocked.values().any(|until| *until <= now);
        if self.drains.idle_at == Some(self.model.applied) && !retry_due {
            return;
        }
        // Round the drains, starting after the one stepped last.
        let mut order: Vec<(DaemonId, CommandId)> = drains
            .iter()
            .filter(|(d, _)| {
                self.drains
                    .blocked
                    .get(*d)
                    .is_none_or(|until| *until <= now)
            })
            .map(|(d, drain)| (d.clone(), drain.id.clone()))
            .collect();
        if let Some(last) = &self.drains.last {
            let after = order.partition_point(|(d, _)| d <= last);
            order.rotate_left(after);
        }
        let mut budget = STEPS_PER_CALL;
        let mut all_done = true;
        for (daemon, drain_id) in order {
            let span = tracing::info_span!("drain", %daemon, drain = %drain_id);
            loop {
                if budget == 0 {
                    all_done = false;
                    break;
                }
                budget -= 1;
                self.drains.last = Some(daemon.clone());
                match self.step(&daemon, &drain_id).instrument(span.clone()).await {
                    Step::Started => {}
                    Step::Done => break,
                }
            }
        }
        // Nothing left to do until the model moves on: the next calls cost nothing.
        self.drains.idle_at =
            (all_done && self.drains.blocked.is_empty()).then_some(self.model.applied);
    }

    /// One step of a drain.
    async fn step(&mut self, daemon: &DaemonId, drain_id: &CommandId) -> Step {
        if let Err(e) = self.catch_up(self.appended).await {
            tracing::warn!(error = %e.message, "cannot step a drain");
            self.drains
                .blocked
                .insert(daemon.clone(), Instant::now() + FAILED_RETRY);
            return Step::Done;
        }
        let command = Command::ContinueDrain(ContinueDrain {
            daemon: daemon.clone(),
            drain_id: drain_id.clone(),
        });
        let ctx = Context {
            command: new_command_id(),
            actor: system_actor(),
            at_ms: now_ms(),
        };
        let ends = match decide(&command, &ctx, &self.model.state) {
            Ok(d) if d.units.is_empty() => return Step::Done,
            Ok(d) => d
                .events()
                .any(|e| matches!(e, Event::DrainCompleted { .. })),
            Err(rejection) => {
                // Raised once while it is open; otherwise only tried again later.
                let raises = alert_of_rejection(&command, &rejection, &self.model.state);
                if raises.is_none() {
                    self.drains
                        .blocked
                        .insert(daemon.clone(), Instant::now() + BLOCKED_RETRY);
                    return Step::Done;
                }
                false
            }
        };
        let request = CommandRequest {
            id: ctx.command,
            actor: ctx.actor,
            at: ctx.at_ms,
            client: None,
            command,
        };
        let executed = self.execute(request, None).await;
        // Nobody waits for a reply here: the move's fences go out at once.
        self.raise_due_fences();
        match executed {
            Ok(applied) => {
                self.drains.blocked.remove(daemon);
                if ends || applied.events.is_empty() {
                    Step::Done
                } else {
                    Step::Started
                }
            }
            Err(error) => {
                tracing::info!(code = ?error.code, reason = %error.reason, message = %error.message, "a drain cannot go on yet");
                let wait = if error.code == ErrorCode::Unavailable {
                    FAILED_RETRY
                } else {
                    BLOCKED_RETRY
                };
                self.drains
                    .blocked
                    .insert(daemon.clone(), Instant::now() + wait);
                Step::Done
            }
        }
    }
}

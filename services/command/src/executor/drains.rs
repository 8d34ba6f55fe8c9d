//! Drains moved along by the service itself: while a drain is in progress, its next
//! job's move starts as soon as fewer than its limit are moving, and it ends once
//! nothing is left (`ContinueDrain`, decided as any command is, in the service's name).
//!
//! A step is decided first without appending anything: a drain with nothing to do costs
//! no event. A refused step is recorded once (and a job no daemon can take raises
//! BIND_FAILURE), then tried again every [`BLOCKED_RETRY`] without a new record while the
//! refusal stays the same; a step that failed for another reason (the stream
//! unavailable) is tried again after [`FAILED_RETRY`]. Two instances stepping the same
//! drain at once are harmless: every move of a drain appends to the daemon's subject,
//! so one of them conflicts and decides again on the other's move.

use std::time::Instant;

use handoff_domain::command::ContinueDrain;

use super::*;

/// How long a drain whose next step was refused waits before it is tried again.
const BLOCKED_RETRY: Duration = Duration::from_secs(5);
/// How long a drain whose next step failed (not refused) waits before it is tried again.
const FAILED_RETRY: Duration = Duration::from_secs(1);

/// Why a drain's last step did not happen, and when to try again.
pub(super) struct Blocked {
    /// The refusal recorded last (none: the step failed for another reason).
    refused: Option<Rejection>,
    until: Instant,
}

impl Executor {
    /// Whether a drain is in progress: the service then calls [`Executor::step_drains`]
    /// often.
    pub fn draining(&self) -> bool {
        self.stopped.is_none() && !self.model.state.drains.is_empty()
    }

    /// Starts what each drain in progress may start now (one move per job, up to its
    /// limit) and ends those with nothing left.
    pub async fn step_drains(&mut self) {
        if !self.draining() {
            return;
        }
        let now = Instant::now();
        self.blocked
            .retain(|daemon, _| self.model.state.drains.contains_key(daemon));
        let drains: Vec<(DaemonId, CommandId, u32)> = self
            .model
            .state
            .drains
            .iter()
            .filter(|(d, _)| self.blocked.get(*d).is_none_or(|b| b.until <= now))
            .map(|(d, drain)| (d.clone(), drain.id.clone(), drain.max_concurrent))
            .collect();
        for (daemon, drain_id, limit) in drains {
            let span = tracing::info_span!("drain", %daemon, drain = %drain_id);
            // Each step starts one move, and the last one ends the drain.
            for _ in 0..=limit {
                if !self.step(&daemon, &drain_id).instrument(span.clone()).await {
                    break;
                }
            }
        }
    }

    /// One step of a drain: true when it appended something (another may follow).
    async fn step(&mut self, daemon: &DaemonId, drain_id: &CommandId) -> bool {
        let command = Command::ContinueDrain(ContinueDrain {
            daemon: daemon.clone(),
            drain_id: drain_id.clone(),
        });
        let ctx = Context {
            command: new_command_id(),
            actor: system_actor(),
            at_ms: now_ms(),
        };
        match decide(&command, &ctx, &self.model.state) {
            Ok(d) if d.units.is_empty() => {
                self.blocked.remove(daemon);
                return false;
            }
            Ok(_) => {}
            Err(rejection) => {
                let again = self
                    .blocked
                    .get(daemon)
                    .and_then(|b| b.refused.as_ref())
                    .is_some_and(|r| *r == rejection);
                if again {
                    self.blocked.insert(
                        daemon.clone(),
                        Blocked {
                            refused: Some(rejection),
                            until: Instant::now() + BLOCKED_RETRY,
                        },
                    );
                    return false;
                }
            }
        }
        let request = CommandRequest {
            id: ctx.command,
            actor: ctx.actor,
            at: ctx.at_ms,
            client: None,
            command,
        };
        match self.execute(request, None).await {
            Ok(applied) => {
                self.blocked.remove(daemon);
                !applied.events.is_empty()
            }
            Err(error) => {
                // Refused (on the model as it stands now), or failed for another reason.
                let ctx = Context {
                    command: new_command_id(),
                    actor: system_actor(),
                    at_ms: now_ms(),
                };
                let command = Command::ContinueDrain(ContinueDrain {
                    daemon: daemon.clone(),
                    drain_id: drain_id.clone(),
                });
                let refused = decide(&command, &ctx, &self.model.state).err();
                tracing::warn!(code = ?error.code, reason = %error.reason, message = %error.message, "a drain cannot go on yet");
                let wait = if refused.is_some() {
                    BLOCKED_RETRY
                } else {
                    FAILED_RETRY
                };
                self.blocked.insert(
                    daemon.clone(),
                    Blocked {
                        refused,
                        until: Instant::now() + wait,
                    },
                );
                false
            }
        }
    }
}

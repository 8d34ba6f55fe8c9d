//! Moves appended in part, finished by the service itself (decision 0009).

use super::*;

impl Executor {
    /// A decision that resumes a move appended in part, with its last unit saying so:
    /// `MoveResumed` with how many jobs the move started in all (which closes
    /// MOVE_INTERRUPTED, and ends the command even when nothing was left to start).
    pub(super) fn resumed(&self, move_id: &CommandId, mut decision: Decision) -> Decision {
        let Some(m) = self.model.state.moves.get(move_id) else {
            return decision;
        };
        let now_started = decision
            .events()
            .filter(|e| matches!(e, Event::JobMoveStarted { move_id: m, .. } if m == move_id))
            .count();
        decision.units.push(vec![Event::MoveResumed {
            move_id: move_id.clone(),
            started: (m.jobs.len() + now_started) as u32,
        }]);
        decision
    }

    /// Finishes the commands appended in part and left alone for `after` (the caller
    /// gone: a CLI killed, a client out of retries): each is decided again with its id
    /// and appended to its end, as a retry by its caller would be. One that cannot be
    /// finished now (a rejection, an outage) stays for the next call and raises
    /// MOVE_INTERRUPTED with the reason, once. The service calls this at start and every
    /// `after`; another instance doing the same at once is harmless (the same ids and
    /// expectations: one append wins).
    pub async fn finish_interrupted(&mut self, after: Duration) {
        if self.stopped.is_some() || self.model.incomplete().next().is_none() {
            return;
        }
        if let Err(e) = self.catch_up_with_stream().await {
            tracing::warn!(error = %e.message, "cannot look for commands appended in part");
            return;
        }
        let horizon = now_ms().saturating_sub(after.as_millis() as u64);
        let due: Vec<CommandId> = self
            .model
            .incomplete()
            .filter(|(_, r)| r.last_at <= horizon)
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            let span = tracing::info_span!("finish", command = %id);
            self.finish(id).instrument(span).await;
        }
    }

    pub(super) async fn finish(&mut self, id: CommandId) {
        let Some(request) = self.continuation(&id) else {
            tracing::warn!("a command appended in part cannot be told again from its events; its caller must send it again with the same id");
            return;
        };
        let executed = self.execute(request, None).await;
        // Nobody waits for a reply here: the fences go out at once.
        self.raise_due_fences();
        let error = match executed {
            Ok(applied) => {
                tracing::info!(
                    events = applied.events.len(),
                    "finished a command appended in part"
                );
                return;
            }
            Err(error) => error,
        };
        tracing::warn!(code = ?error.code, reason = %error.reason, message = %error.message, "a command appended in part cannot be finished yet");
        let interrupted = AlertKey::new(AlertKind::MoveInterrupted, &id);
        let still_in_part = self.model.command(&id).is_some_and(|r| !r.complete);
        let Some(m) = self.model.state.moves.get(&id) else {
            return;
        };
        if !still_in_part || self.model.state.alerts.contains(&interrupted) {
            return;
        }
        let event = Event::MoveInterrupted {
            move_id: id.clone(),
            planned: m.planned,
            started: m.jobs.len() as u32,
            reason: error.message,
        };
        match self
            .append_alone(new_command_id(), system_actor(), "alert", event)
            .await
        {
            // Another instance raised it meanwhile: one is enough.
            Ok(()) | Err(AppendError::Conflict { .. }) => {}
            Err(e) => tracing::warn!(error = %e, "could not raise MOVE_INTERRUPTED"),
        }
    }

    /// The request of a command appended in part, told again from its events: a move's
    /// `MoveStarted` says what was asked, the envelopes who asked, and the digest proves
    /// it is the same command.
    pub(super) fn continuation(&self, id: &CommandId) -> Option<CommandRequest<Command>> {
        let record = self.model.command(id)?;
        // A cancel starts with its `MoveCancelled`, on the cancelled move's subject; the
        // state keeps the reason while the move's jobs go back.
        if let Some(first) = record.events.first().filter(|e| e.kind == "MoveCancelled") {
            let move_id = first
                .subject
                .strip_prefix(&format!("{}.move.", subjects::EVENTS))
                .and_then(|m| CommandId::new(m).ok())?;
            let reason = self
                .model
                .state
                .moves
                .get(&move_id)?
                .cancelled
                .clone()?
                .reason;
            let request = CommandRequest {
                id: id.clone(),
                actor: record.actor.clone()?,
                at: now_ms(),
                client: None,
                command: Command::CancelMove(CancelMove { move_id, reason }),
            };
            return (digest(&request) == record.digest).then_some(request);
        }
        let m = self.model.state.moves.get(id)?;
        let command = match (&m.scope, m.automatic) {
            (MoveScope::AllJobsOf { .. }, false) if m.spread.is_some() => {
                Command::SpreadJobs(SpreadJobs {
                    from: m.from.clone(),
                    to: m.spread.clone().unwrap_or_default(),
                    reason: m.reason.clone(),
                    dry_run: false,
                })
            }
            (MoveScope::AllJobsOf { .. }, false) => Command::MoveJobs(MoveJobs {
                from: m.from.clone(),
                to: m.to.clone(),
                reason: m.reason.clone(),
                dry_run: false,
            }),
            (MoveScope::OneJob { job }, false) => Command::MoveJob(MoveJob {
                job: job.clone(),
                to: m.to.clone(),
                reason: m.reason.clone(),
                dry_run: false,
            }),
            // A failover is one unit: never appended in part.
            (_, true) => return None,
        };
        let request = CommandRequest {
            id: id.clone(),
            actor: record.actor.clone()?,
            at: now_ms(),
            client: None,
            command,
        };
        (digest(&request) == record.digest).then_some(request)
    }
}

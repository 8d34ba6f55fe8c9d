//! One answer per command id (decision 0010): the answer given before, and the record
//! of a rejection.

use super::*;

impl Executor {
    /// The answer already given to this command id: its events if it completed, the
    /// rejection it was answered with (the same code, reason and message), or `id_reused`
    /// if the id was used for a different command. An id no longer recent is looked up
    /// in the archive; if that cannot be read, the answer is `unavailable` (never a
    /// decision made without knowing).
    pub(super) async fn earlier_answer(
        &mut self,
        request: &CommandRequest<Command>,
        digest: &str,
    ) -> Result<Option<Applied>, ErrorBody> {
        let archived = match self.model.command(&request.id) {
            Some(record) => {
                if record.digest != digest {
                    return Err(id_reused(&request.id));
                }
                if !record.complete {
                    return Ok(None);
                }
                return Ok(Some(Applied {
                    command: request.id.clone(),
                    events: record.events.clone(),
                    duplicate: true,
                    dry_run: false,
                    plan: None,
                }));
            }
            None => match self.model.rejected(&request.id) {
                Some(r) => Some(Archived::Rejected(r.clone())),
                None => match self.model.leaving(&request.id) {
                    Some(a) => Some(a.clone()),
                    // No id that left the window is as young: the archive holds none
                    // of ours that could be it.
                    None if !self.model.may_be_archived(&request.id) => None,
                    None => match self.archive.as_ref().map(|a| a.archive.clone()) {
                        None => None,
                        Some(archive) => archive.get(&request.id).await.map_err(unavailable)?,
                    },
                },
            },
        };
        match archived {
            None => Ok(None),
            Some(Archived::Rejected(r)) if r.digest != digest => Err(id_reused(&request.id)),
            Some(Archived::Rejected(r)) => Err(r.rejection.into()),
            Some(Archived::Applied { digest: d, .. }) if d != digest => Err(id_reused(&request.id)),
            Some(Archived::Applied { events, .. }) => Ok(Some(Applied {
                command: request.id.clone(),
                events,
                duplicate: true,
                dry_run: false,
                plan: None,
            })),
        }
    }

    /// The answer to a rejected command, once it is final: the rejection is recorded as
    /// `CommandRejected` on the id's answer subject, expecting its last sequence as the
    /// model saw it, then the alert it raises (if any) is appended. `None` when the record
    /// lost to another append on that subject: the caller catches up and decides again,
    /// as the id may have been applied or answered meanwhile. A rejection that cannot be
    /// recorded (an outage) is not final and is answered `unavailable` instead.
    ///
    /// Not recorded: a dry run (it appends nothing, so nothing can apply it), a command
    /// appended in part (its continuation waits for what the rejection names, and the
    /// service finishes it, decision 0009), and a service's report of what it sees
    /// ([`reports_what_it_sees`]): those are decided against the state whenever they
    /// arrive and sent again while the condition lasts, so a late one changes nothing
    /// the state does not allow, and recording each refusal would add an event per
    /// resend for as long as the condition lasts.
    pub(super) async fn reject(
        &mut self,
        request: &CommandRequest<Command>,
        digest: &str,
        signature: Option<&str>,
        rejection: Rejection,
    ) -> Option<ErrorBody> {
        let in_part = self.model.command(&request.id).is_some();
        let recorded =
            !is_dry_run(&request.command) && !in_part && !reports_what_it_sees(&request.command);
        if recorded {
            match self
                .record_rejection(request, digest, signature, &rejection)
                .await
            {
                Ok(a) if !a.duplicate => {}
                // A record of this id with the same message id is stored (another
                // instance's, within the duplicate window): its rejection is the answer.
                Ok(_) | Err(AppendError::Conflict { .. }) => return None,
                Err(e) => return Some(append_failure(e)),
            }
        }
        if let Some(alert) = alert_of_rejection(&request.command, &rejection, &self.model.state) {
            self.record_alert(&request.actor, alert).await;
        }
        Some(rejection.into())
    }

    /// Appends `CommandRejected` for `request`, signed by its actor and with its digest,
    /// so a later attempt of the id (from any instance) gets the same answer and nothing
    /// applies it.
    pub(super) async fn record_rejection(
        &mut self,
        request: &CommandRequest<Command>,
        digest: &str,
        signature: Option<&str>,
        rejection: &Rejection,
    ) -> Result<Appended, AppendError> {
        let event = Event::CommandRejected {
            command_id: request.id.clone(),
            command: request.command.name().to_owned(),
            rejection: rejection.clone(),
        };
        // The record has an id of its own: the rejected command has no events.
        let ctx = Context {
            command: new_command_id(),
            actor: request.actor.clone(),
            at_ms: now_ms(),
        };
        let mut messages =
            self.messages(&ctx, digest, std::slice::from_ref(&event), true, signature);
        // Keyed by the rejected id, so two records of it are not stored twice.
        messages[0].msg_id = format!("{}:{}", request.id, event.key_within_command());
        let a = self.log.append(&messages).await?;
        self.appended = self.appended.max(a.last_seq);
        Ok(a)
    }
}

/// A service's report of what it sees (a daemon's registration and phase, the monitor's
/// liveness, head space, stuck moves, guard and the failover policy's moves, and the
/// command service's own steps of a drain): decided against the state whenever it
/// arrives, and sent again by its service while the condition lasts.
fn reports_what_it_sees(command: &Command) -> bool {
    matches!(
        command,
        Command::RegisterDaemon(_)
            | Command::ReportJobMovePhase(_)
            | Command::ReportDaemonLiveness(_)
            | Command::ReportHeadSpace(_)
            | Command::ReportMoveStuck(_)
            | Command::ReportFailoverGuard(_)
            | Command::FailoverJob(_)
            | Command::ContinueDrain(_)
    )
}

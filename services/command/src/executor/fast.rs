//! A new command decided without reading the stream's end first.
//!
//! [`Executor::authenticate`] asks the server for the stream's last sequence before it
//! checks who signed (a round trip per command), so that a change another instance stored
//! before the request arrived (a user removed, a role taken away) is always seen. The
//! fast path checks and decides on the model as it is, and appends the decision expecting
//! the stream to end where the model does (`Nats-Expected-Last-Sequence` on its first
//! message): once stored, nothing was appended after what the checks and the decision
//! saw, so nothing stored before the request arrived was missed. Anything else (a
//! refusal, a conflict, a command id seen before, a decision in more than one unit, a
//! dry run) goes the full way, where the stream's end is read first; the fast path has
//! then stored nothing and remembered nothing.

use super::*;

impl Executor {
    /// The command's answer if the fast path could give it; `None` to take the full way
    /// ([`Executor::authenticate`], then [`Executor::execute`]).
    pub async fn execute_fast(
        &mut self,
        request: &CommandRequest<Command>,
        signed: &Signed<'_>,
        freshness: Duration,
    ) -> Option<Result<Applied, ErrorBody>> {
        if self.check_running().is_err() || self.catch_up(self.appended).await.is_err() {
            return None;
        }
        // An id applied in part is resumed the full way; one rejected or archived is found
        // by `earlier_answer` below.
        if self.model.command(&request.id).is_some() {
            return None;
        }
        let fingerprint = self.check_signature(request, signed, freshness).ok()?;
        self.check_role(request).ok()?;
        let digest = digest(request);
        if !matches!(self.earlier_answer(request, &digest).await, Ok(None))
            || id_from_the_future(&request.id, now_ms()).is_err()
        {
            return None;
        }
        let ctx = Context {
            command: request.id.clone(),
            actor: request.actor.clone(),
            at_ms: now_ms(),
        };
        let decision = decide(&request.command, &ctx, &self.model.state).ok()?;
        if decision.units.len() != 1 || is_dry_run(&request.command) {
            return None;
        }
        let end = self.model.applied;
        let written = match self
            .append_decision(
                request,
                &ctx,
                &digest,
                &decision,
                Some(&fingerprint),
                Some(end),
            )
            .await
        {
            // Something was appended since (or a subject moved): nothing was stored.
            Ok(None) => return None,
            // The id's events were stored after what this model holds (another instance
            // answered it): the full way finds that answer, or refuses these very signed
            // bytes as replayed.
            Ok(Some(written)) if written.duplicate => return None,
            Ok(Some(written)) => written,
            // The append's outcome is unknown (an outage): answered as the full way does,
            // and the signed request is now one that was received.
            Err(e) => {
                self.remember(&fingerprint, request.at, freshness);
                return Some(Err(e));
            }
        };
        self.remember(&fingerprint, request.at, freshness);
        tracing::trace!(command = %request.id, end, "decided at the stream's end");
        Some(Ok(self.applied(request, decision, written)))
    }
}

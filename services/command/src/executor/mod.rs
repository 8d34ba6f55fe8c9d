//! Executes one command at a time against the model: look up the command id, decide,
//! append each unit atomically, and on a conflict catch up with the stream and decide
//! again. Replies only after JetStream acknowledged every event.
//!
//! A command id gets one answer for good, whichever instance answers which attempt
//! (decision 0010): a rejection is recorded (`CommandRejected`) before it is answered,
//! and a command's first unit carries its `CommandAccepted`; both go on the id's answer
//! subject, expecting its last sequence as the model saw it, so of the two only the
//! first stored can ever be stored.
//!
//! # Layout
//! - this file: the executor, the fold, deciding and appending.
//! - `auth`: who signed a request; refusals recorded.
//! - `answers`: the answer given before to an id; rejections recorded.
//! - `interrupted`: moves appended in part, finished by the service.
//! - `drains`: drains moved along by the service, a move at a time.
//! - `bounded`: starting from a saved model, archiving records out of the window, saving
//!   the model (decision 0012).

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use handoff_domain::auth::{authorize, Principal};
use handoff_domain::command::{CancelMove, MoveJob, MoveJobs, SpreadJobs};
use handoff_domain::decide::alert_of_rejection;
use handoff_domain::model::{AlertKey, AlertKind, MoveScope};
use handoff_domain::{
    decide, Actor, Command, CommandId, Context, DaemonId, Decision, Event, Rejection, UserKey,
};
use handoff_eventlog::fence::Fences;
use handoff_eventlog::{AppendError, Appended, EventLog, EventReader, Outgoing, ReadError};
use handoff_protocol::api::{AppendedEvent, CommandRequest};
use handoff_protocol::{
    new_command_id, now_ms, subjects, Applied, DecodeError, ErrorBody, ErrorCode, EventEnvelope,
};
use tracing::Instrument;

use crate::archive::{Archive, Ignored, Lineage, Snapshots};
use crate::model::{self, Archived, Model};

mod answers;
mod auth;
mod bounded;
mod drains;
mod fast;
mod interrupted;
mod messages;

use bounded::{Archiver, Saving};
pub use bounded::{Origin, Stores};

/// How many times a command is decided again after conflicts before giving up.
const MAX_ATTEMPTS: usize = 8;

pub struct Executor {
    log: EventLog,
    reader: EventReader,
    model: Model,
    /// The last sequence this service appended: the model must reach it before the next
    /// decision, so every command sees the ones before it.
    appended: u64,
    read_timeout: Duration,
    /// Fingerprints of the signed requests this instance verified, with when they were
    /// signed: a request seen again within the freshness window is a replay (older
    /// ones are refused as expired anyway).
    seen: HashMap<String, u64>,
    /// Where the jobs' fences are raised, after each append that gives a job a new epoch.
    fences: Option<Fences>,
    /// The fences the decisions appended since the last [`Executor::raise_due_fences`]
    /// call: the service raises them once the command's reply is sent, so their writes
    /// go out on the connection after the reply instead of ahead of it.
    fences_due: Vec<(handoff_domain::JobId, u64)>,
    /// Set when the model met an event it cannot fold (undecodable, or after a hole):
    /// the answer to every command from then on. The model is never folded further, so
    /// nothing is decided on it.
    stopped: Option<ErrorBody>,
    /// Where records out of the model's window go, and come back from.
    archive: Option<Archiver>,
    /// Where the model is saved, and the stream sequence it was last saved at.
    snapshots: Option<Saving>,
    /// Where this model came from.
    origin: Origin,
    /// Where the drains in progress stand for this instance.
    drains: drains::Stepping,
}

/// What appending a decision wrote, or found written by an earlier attempt.
struct Written {
    /// Every event of the command so far, in stream order.
    events: Vec<AppendedEvent>,
    /// An earlier attempt whose acknowledgement was lost stored a unit already.
    duplicate: bool,
}

/// A request as it arrived, for checking its signature.
pub struct Signed<'a> {
    pub subject: &'a str,
    pub payload: &'a [u8],
    /// The signature header's value, if there was one.
    pub signature: Option<&'a str>,
}

fn refused(reason: &str, message: String) -> ErrorBody {
    ErrorBody::new(ErrorCode::Forbidden, reason, message)
}

fn unavailable(e: impl std::fmt::Display) -> ErrorBody {
    ErrorBody::new(
        ErrorCode::Unavailable,
        "event_log_unavailable",
        format!("the event log is unavailable, retry with the same id: {e}"),
    )
}

/// The answer to an append that failed other than by a conflict: an outage is
/// `unavailable` (the caller retries with the same id), the log's refusal of the append
/// `internal` (a bug; the same append gets the same answer).
fn append_failure(e: AppendError) -> ErrorBody {
    match e {
        AppendError::Refused { code, description } => ErrorBody::new(
            ErrorCode::Internal,
            "append_refused",
            format!("the event log refused the append (code {code}): {description}"),
        ),
        e => unavailable(e),
    }
}

/// The answer to a command that lost to other commands at every attempt: transient (the
/// others are done soon), so `unavailable`, which clients retry with the same id. A
/// `conflict` would read as final ("another command holds the job").
fn too_many_conflicts(id: &CommandId) -> ErrorBody {
    ErrorBody::new(
        ErrorCode::Unavailable,
        "too_many_conflicts",
        format!(
            "command {id} conflicted with other commands {MAX_ATTEMPTS} times; retry with the same id"
        ),
    )
}

/// The answer to an id already used for a different command.
fn id_reused(id: &CommandId) -> ErrorBody {
    ErrorBody::new(
        ErrorCode::Validation,
        "id_reused",
        format!("command id {id} was already used for a different command; use a new id"),
    )
}

/// The refusal of a new id made too far ahead, if it is.
fn id_from_the_future(id: &CommandId, now_ms: u64) -> Result<(), ErrorBody> {
    let ahead = id.timestamp_ms().saturating_sub(now_ms);
    if ahead <= model::ID_AHEAD_MS {
        return Ok(());
    }
    Err(ErrorBody::new(
        ErrorCode::Validation,
        "id_in_the_future",
        format!(
            "command id {id} was made {} s in the future (its time, as a ULID), more than the {} s allowed: make a new id with a correct clock",
            ahead / 1000,
            model::ID_AHEAD_MS / 1000
        ),
    ))
}

/// A dry run only plans: nothing is appended, so nothing binds its id.
fn is_dry_run(command: &Command) -> bool {
    match command {
        Command::MoveJobs(c) => c.dry_run,
        Command::MoveJob(c) => c.dry_run,
        Command::SpreadJobs(c) => c.dry_run,
        Command::DrainDaemon(c) => c.dry_run,
        _ => false,
    }
}

/// A stable digest of a command and its actor (FNV-1a over its JSON), so that an id
/// reused for a different command is refused rather than answered as a duplicate.
pub fn digest(request: &CommandRequest<Command>) -> String {
    let bytes =
        serde_json::to_vec(&(&request.actor, &request.command)).expect("commands always serialize");
    crate::archive::fnv(&bytes)
}

impl Executor {
    /// Folds the whole stream, then is ready for commands.
    pub async fn start(log: EventLog, read_timeout: Duration) -> Result<Self, ReadError> {
        Self::start_with(log, read_timeout, None).await
    }

    /// Where the model came from at start.
    pub fn origin(&self) -> &Origin {
        &self.origin
    }

    /// The model as folded so far (for tests and diagnostics).
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Whether the model stopped at an event it cannot fold; every command is then
    /// answered with [`Executor::stopped`]'s reason.
    pub fn is_stopped(&self) -> bool {
        self.stopped.is_some()
    }

    /// Why the model stopped, if it did.
    pub fn stopped(&self) -> Option<&ErrorBody> {
        self.stopped.as_ref()
    }

    fn check_running(&self) -> Result<(), ErrorBody> {
        match &self.stopped {
            Some(why) => Err(why.clone()),
            None => Ok(()),
        }
    }

    /// Reads the next event (waiting for one) and folds it in, or stops the model for
    /// good if it cannot be folded. Cancel safe: nothing changes before an event is read.
    async fn fold_one(&mut self) -> Result<(), ErrorBody> {
        self.check_running()?;
        let (code, problem) = match self.reader.next().await {
            // What left the window goes to the archive after the turn's reply
            // ([`Executor::after_turn`]).
            Ok(r) => match self.model.apply(&r) {
                Ok(()) => return Ok(()),
                Err(gap) => (ErrorCode::Internal, gap.to_string()),
            },
            Err(ReadError::Decode {
                seq,
                subject,
                source,
            }) => (
                // Written by a newer build: an upgraded instance can decide, so the
                // caller retries; anything else is a bug or a damaged stream.
                if matches!(source, DecodeError::NewerVersion { .. }) {
                    ErrorCode::Unavailable
                } else {
                    ErrorCode::Internal
                },
                format!("event {seq} on {subject} cannot be decoded: {source}"),
            ),
            Err(e @ ReadError::Unavailable(_)) => return Err(unavailable(e)),
        };
        tracing::error!(applied = self.model.applied, %problem, "the command model stopped; no command is decided from now on");
        let why = ErrorBody::new(
            code,
            "model_stopped",
            format!(
                "this command service stopped deciding after event {}: {problem}; it decides nothing on a model without that event (another instance may; retry with the same id)",
                self.model.applied
            ),
        );
        self.stopped = Some(why.clone());
        Err(why)
    }

    /// Raises the jobs' fences after each append that gives a job a new epoch: noted by
    /// the decision, raised by [`Executor::raise_due_fences`], which the caller of
    /// [`Executor::execute`] and [`Executor::execute_fast`] calls once it has sent the
    /// reply, or at once where there is none.
    pub fn with_fences(mut self, fences: Fences) -> Self {
        self.fences = Some(fences);
        self
    }

    /// Notes the fence of every job an event gave a new epoch, to raise once the reply
    /// (if any) is on its way ([`Executor::raise_due_fences`]).
    fn note_fences<'a>(&mut self, events: impl Iterator<Item = &'a Event>) {
        if self.fences.is_none() {
            return;
        }
        self.fences_due
            .extend(events.filter_map(|event| match event {
                // A new job has no previous owner to fence off: its daemon raises it.
                Event::JobMoveStarted { job, epoch, .. }
                | Event::JobMoveFailed { job, epoch, .. } => Some((job.clone(), *epoch)),
                _ => None,
            }));
    }

    /// Raises, in the background, the fences noted since the last call. Best effort: the
    /// daemon that gets a job raises its fence too before it works on it, and a fence only
    /// rises, so raises may land in any order. The service calls it after each reply, and
    /// after each command a drain or an interrupted command's finishing decides, so a
    /// reply's message goes out before these writes.
    pub fn raise_due_fences(&mut self) {
        let (Some(fences), false) = (self.fences.clone(), self.fences_due.is_empty()) else {
            return;
        };
        let raise = std::mem::take(&mut self.fences_due);
        tokio::spawn(async move {
            futures::stream::iter(raise)
                .for_each_concurrent(64, |(job, epoch)| {
                    let fences = fences.clone();
                    async move {
                        if let Err(e) = fences.raise(&job, epoch).await {
                            tracing::warn!(%job, epoch, error = %e, "could not raise the fence");
                        }
                    }
                })
                .await;
        });
    }

    /// Refuses a request whose id is new and made more than [`model::ID_AHEAD_MS`] ahead
    /// of this service's clock (called once its signature verified, before it is
    /// remembered): an id the model holds or may have archived is answered as it was.
    pub fn refuse_id_ahead(&self, request: &CommandRequest<Command>) -> Result<(), ErrorBody> {
        let id = &request.id;
        let known = self.model.command(id).is_some()
            || self.model.rejected(id).is_some()
            || self.model.leaving(id).is_some()
            || self.model.may_be_archived(id);
        if known {
            return Ok(());
        }
        id_from_the_future(id, now_ms())
    }

    /// Starts the writes a turn of the service's loop left for after its reply (if it
    /// sent one), so the reply's message goes out first: the fences its decisions raised,
    /// and the records that left the model's window, to the archive.
    pub fn after_turn(&mut self) {
        self.raise_due_fences();
        self.archive_evicted();
    }

    /// Folds events until the model has applied `target`.
    async fn catch_up(&mut self, target: u64) -> Result<(), ErrorBody> {
        self.check_running()?;
        while self.model.applied < target {
            let read_timeout = self.read_timeout;
            let next = self.model.applied + 1;
            tokio::time::timeout(read_timeout, self.fold_one())
                .await
                .map_err(|_| {
                    unavailable(format!(
                        "the event stream did not deliver sequence {next} within {read_timeout:?}"
                    ))
                })??;
        }
        Ok(())
    }

    /// Waits for the next event of the stream and folds it in (between commands, so the
    /// model stays current). Cancel safe. An event that stops the model is not an error
    /// here (commands hear it); only a stream that cannot be read is.
    pub async fn fold_next(&mut self) -> Result<(), ReadError> {
        match self.fold_one().await {
            Err(e) if self.stopped.is_none() => Err(ReadError::Unavailable(e.message)),
            _ => Ok(()),
        }
    }

    /// Catches up with the whole stream as it is now.
    async fn catch_up_with_stream(&mut self) -> Result<(), ErrorBody> {
        self.check_running()?;
        let end = self.log.last_sequence().await.map_err(unavailable)?;
        self.catch_up(end).await
    }

    /// Appends an alert a rejection raised (best effort: the caller hears the rejection
    /// either way).
    async fn record_alert(&mut self, actor: &Actor, event: Event) {
        if let Err(e) = self
            .append_alone(new_command_id(), actor.clone(), "alert", event)
            .await
        {
            tracing::warn!(error = %e, "could not record an alert");
        }
    }

    /// Appends one event that no decision made (a refusal, an alert) under its own id.
    async fn append_alone(
        &mut self,
        id: CommandId,
        actor: Actor,
        digest: &str,
        event: Event,
    ) -> Result<(), AppendError> {
        let ctx = Context {
            command: id,
            actor,
            at_ms: now_ms(),
        };
        let messages = self.messages(&ctx, digest, &[event], true, None);
        let a = self.log.append(&messages).await?;
        self.appended = self.appended.max(a.last_seq);
        Ok(())
    }

    /// Decides and appends a verified request; `signature` is its fingerprint, written on
    /// its events.
    pub async fn execute(
        &mut self,
        request: CommandRequest<Command>,
        signature: Option<String>,
    ) -> Result<Applied, ErrorBody> {
        let digest = digest(&request);
        self.catch_up(self.appended).await?;
        // Appended in part by an earlier attempt: this one resumes it.
        let resuming = self
            .model
            .command(&request.id)
            .is_some_and(|r| !r.complete && r.digest == digest);
        let mut caught_up_with_stream = false;
        for _attempt in 0..MAX_ATTEMPTS {
            if let Some(earlier) = self.earlier_answer(&request, &digest).await? {
                return Ok(earlier);
            }
            // A new id (or one appended in part, which was new when it started).
            if !resuming {
                id_from_the_future(&request.id, now_ms())?;
            }
            let ctx = Context {
                command: request.id.clone(),
                actor: request.actor.clone(),
                at_ms: now_ms(),
            };
            let decision = match decide(&request.command, &ctx, &self.model.state) {
                Ok(d) => d,
                Err(rejection) if !caught_up_with_stream => {
                    // Another instance may have changed what the rejection is about: look
                    // at the whole stream once before refusing.
                    tracing::debug!(%rejection, "rejected; checking against the latest stream");
                    self.catch_up_with_stream().await?;
                    caught_up_with_stream = true;
                    continue;
                }
                Err(rejection) => {
                    match self
                        .reject(&request, &digest, signature.as_deref(), rejection)
                        .await
                    {
                        Some(answer) => return Err(answer),
                        // Another answer to the same subject came first: it may be this
                        // id's own (applied, or rejected elsewhere), or the state moved.
                        None => {
                            self.catch_up_with_stream().await?;
                            continue;
                        }
                    }
                }
            };
            let decision = if resuming {
                self.resumed(&request.id, decision)
            } else {
                decision
            };
            let Some(written) = self
                .append_decision(
                    &request,
                    &ctx,
                    &digest,
                    &decision,
                    signature.as_deref(),
                    None,
                )
                .await?
            else {
                self.catch_up_with_stream().await?;
                caught_up_with_stream = true;
                continue;
            };
            return Ok(self.applied(&request, decision, written));
        }
        Err(too_many_conflicts(&request.id))
    }

    /// Appends the decision's units in order; the first expecting the stream to end at
    /// `stream_end` if given. `None` on a conflict: the caller catches up and decides again.
    async fn append_decision(
        &mut self,
        request: &CommandRequest<Command>,
        ctx: &Context,
        digest: &str,
        decision: &Decision,
        signature: Option<&str>,
        stream_end: Option<u64>,
    ) -> Result<Option<Written>, ErrorBody> {
        let mut written = Written {
            events: self
                .model
                .command(&request.id)
                .map(|r| r.events.clone())
                .unwrap_or_default(),
            duplicate: false,
        };
        // The first unit of a command carries its CommandAccepted, on the answer subject
        // a rejection of the id is recorded on and expecting that subject's last sequence
        // as this model saw it: a rejection recorded meanwhile (by another instance,
        // answering another attempt) makes the unit a conflict, and once the unit is
        // stored no rejection of the id can be.
        let accepted = self
            .model
            .command(&request.id)
            .is_none()
            .then(|| Event::CommandAccepted {
                command_id: request.id.clone(),
            });
        let units = decision.units.len();
        for (u, unit) in decision.units.iter().enumerate() {
            let is_last_unit = u + 1 == units;
            let with_answer: Vec<Event>;
            let unit: &[Event] = match &accepted {
                Some(answer) if u == 0 => {
                    with_answer = unit.iter().chain([answer]).cloned().collect();
                    &with_answer
                }
                _ => unit,
            };
            let mut messages = self.messages(ctx, digest, unit, is_last_unit, signature);
            if u == 0 {
                messages[0].expected_last_seq = stream_end;
            }
            match self.log.append(&messages).await {
                Ok(a) => {
                    written.duplicate |= a.duplicate;
                    self.appended = self.appended.max(a.last_seq);
                    written
                        .events
                        .extend(
                            unit.iter()
                                .zip(&messages)
                                .enumerate()
                                .map(|(i, (event, m))| AppendedEvent {
                                    seq: a.first_seq + i as u64,
                                    subject: m.subject.clone(),
                                    kind: event.type_name().to_owned(),
                                }),
                        );
                    if !is_last_unit {
                        // The next unit's expectations include this one's writes.
                        self.catch_up(a.last_seq).await?;
                    }
                }
                Err(AppendError::Conflict { description }) => {
                    tracing::debug!(command = %request.id, %description, "conflict; deciding again");
                    return Ok(None);
                }
                Err(e) => return Err(append_failure(e)),
            }
        }
        Ok(Some(written))
    }

    /// The reply to a command whose decision is appended.
    fn applied(
        &mut self,
        request: &CommandRequest<Command>,
        decision: Decision,
        written: Written,
    ) -> Applied {
        let dry_run = is_dry_run(&request.command);
        if !dry_run {
            self.note_fences(decision.events());
        }
        Applied {
            command: request.id.clone(),
            events: if dry_run { vec![] } else { written.events },
            duplicate: written.duplicate,
            dry_run,
            plan: decision.plan,
        }
    }
}

fn system_actor() -> Actor {
    Actor::new(handoff_domain::command::SYSTEM_ACTOR).expect("the system actor is valid")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What may pass by itself (an outage of the log, the server unable to store now,
    /// losing to other commands every time) is `unavailable`, which clients retry with
    /// the same id; only the log's refusal of the append itself is final.
    #[test]
    fn transient_failures_are_unavailable_and_only_a_refused_append_is_final() {
        let id = new_command_id();
        assert_eq!(too_many_conflicts(&id).code, ErrorCode::Unavailable);
        let outage = append_failure(AppendError::Unavailable("timed out".into()));
        assert_eq!(outage.code, ErrorCode::Unavailable);
        let refused = append_failure(AppendError::Refused {
            code: 10174,
            description: "atomic publish is disabled".into(),
        });
        assert_eq!(
            (refused.code, refused.reason.as_str()),
            (ErrorCode::Internal, "append_refused")
        );
    }
}

//! Executes one command at a time against the model: look up the command id, decide,
//! append each unit atomically, and on a conflict catch up with the stream and decide
//! again. Replies only after JetStream acknowledged every event.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use handoff_domain::{decide, Command, Context, Event};
use handoff_eventlog::{AppendError, EventLog, EventReader, Outgoing, ReadError};
use handoff_protocol::api::{AppendedEvent, CommandRequest};
use handoff_protocol::{subjects, Applied, ErrorBody, ErrorCode, EventEnvelope};

use crate::model::Model;

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
}

fn unavailable(e: impl std::fmt::Display) -> ErrorBody {
    ErrorBody::new(
        ErrorCode::Unavailable,
        "event_log_unavailable",
        format!("the event log is unavailable, retry with the same id: {e}"),
    )
}

/// A stable digest of a command and its actor (FNV-1a over its JSON), so that an id
/// reused for a different command is refused rather than answered as a duplicate.
pub fn digest(request: &CommandRequest<Command>) -> String {
    let bytes =
        serde_json::to_vec(&(&request.actor, &request.command)).expect("commands always serialize");
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{hash:016x}")
}

impl Executor {
    /// Folds the whole stream, then is ready for commands.
    pub async fn start(log: EventLog, read_timeout: Duration) -> Result<Self, ReadError> {
        let reader = log.read_from(1).await?;
        let mut executor = Executor {
            log,
            reader,
            model: Model::default(),
            appended: 0,
            read_timeout,
        };
        let end = executor
            .log
            .last_sequence()
            .await
            .map_err(|e| ReadError::Unavailable(e.to_string()))?;
        executor.catch_up(end).await?;
        tracing::info!(applied = executor.model.applied, "command model loaded");
        Ok(executor)
    }

    /// Folds events until the model has applied `target`.
    async fn catch_up(&mut self, target: u64) -> Result<(), ReadError> {
        while self.model.applied < target {
            let next = tokio::time::timeout(self.read_timeout, self.reader.next())
                .await
                .map_err(|_| {
                    ReadError::Unavailable(format!(
                        "the event stream did not deliver sequence {} within {:?}",
                        self.model.applied + 1,
                        self.read_timeout
                    ))
                })??;
            self.model.apply(&next);
        }
        Ok(())
    }

    /// Waits for the next event of the stream and folds it in (between commands, so the
    /// model stays current). Cancel safe.
    pub async fn fold_next(&mut self) -> Result<(), ReadError> {
        let next = self.reader.next().await?;
        self.model.apply(&next);
        Ok(())
    }

    /// Catches up with the whole stream as it is now.
    async fn catch_up_with_stream(&mut self) -> Result<(), ErrorBody> {
        let end = self.log.last_sequence().await.map_err(unavailable)?;
        self.catch_up(end).await.map_err(unavailable)
    }

    pub async fn execute(
        &mut self,
        request: CommandRequest<Command>,
    ) -> Result<Applied, ErrorBody> {
        let digest = digest(&request);
        self.catch_up(self.appended).await.map_err(unavailable)?;
        let mut caught_up_with_stream = false;
        for _attempt in 0..MAX_ATTEMPTS {
            if let Some(record) = self.model.command(&request.id) {
                if record.digest != digest {
                    return Err(ErrorBody::new(
                        ErrorCode::Validation,
                        "id_reused",
                        format!(
                            "command id {} was already used for a different command; use a new id",
                            request.id
                        ),
                    ));
                }
                if record.complete {
                    return Ok(Applied {
                        command: request.id.clone(),
                        events: record.events.clone(),
                        duplicate: true,
                        dry_run: false,
                        plan: None,
                    });
                }
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
                Err(rejection) => return Err(rejection.into()),
            };
            let dry_run = matches!(
                &request.command,
                Command::MoveJobs(c) if c.dry_run
            ) || matches!(&request.command, Command::MoveJob(c) if c.dry_run);
            let mut appended_events = self
                .model
                .command(&request.id)
                .map(|r| r.events.clone())
                .unwrap_or_default();
            let units = decision.units.len();
            let mut conflict = false;
            // An earlier attempt whose acknowledgement was lost stored this unit already.
            let mut duplicate = false;
            for (u, unit) in decision.units.iter().enumerate() {
                let is_last_unit = u + 1 == units;
                let messages = self.messages(&ctx, &digest, unit, is_last_unit);
                match self.log.append(&messages).await {
                    Ok(a) => {
                        duplicate |= a.duplicate;
                        self.appended = self.appended.max(a.last_seq);
                        appended_events.extend(unit.iter().zip(&messages).enumerate().map(
                            |(i, (event, m))| AppendedEvent {
                                seq: a.first_seq + i as u64,
                                subject: m.subject.clone(),
                                kind: event.type_name().to_owned(),
                            },
                        ));
                        if !is_last_unit {
                            // The next unit's expectations include this one's writes.
                            self.catch_up(a.last_seq).await.map_err(unavailable)?;
                        }
                    }
                    Err(AppendError::Conflict { description }) => {
                        tracing::debug!(command = %request.id, %description, "conflict; deciding again");
                        conflict = true;
                        break;
                    }
                    Err(AppendError::Unavailable(e)) => return Err(unavailable(e)),
                    Err(AppendError::Refused { code, description }) => {
                        return Err(ErrorBody::new(
                            ErrorCode::Internal,
                            "append_refused",
                            format!(
                                "the event log refused the append (code {code}): {description}"
                            ),
                        ))
                    }
                }
            }
            if conflict {
                self.catch_up_with_stream().await?;
                caught_up_with_stream = true;
                continue;
            }
            return Ok(Applied {
                command: request.id.clone(),
                events: if dry_run { vec![] } else { appended_events },
                duplicate,
                dry_run,
                plan: decision.plan,
            });
        }
        Err(ErrorBody::new(
            ErrorCode::Conflict,
            "too_many_conflicts",
            format!(
                "command {} conflicted with other commands {MAX_ATTEMPTS} times; retry with the same id",
                request.id
            ),
        ))
    }

    fn messages(
        &self,
        ctx: &Context,
        digest: &str,
        unit: &[Event],
        is_last_unit: bool,
    ) -> Vec<Outgoing> {
        let n = unit.len();
        unit.iter()
            .enumerate()
            .map(|(i, event)| {
                let subject = subjects::aggregate(&event.aggregate());
                let envelope = EventEnvelope {
                    event: event.clone(),
                    version: Event::VERSION,
                    command: ctx.command.clone(),
                    actor: ctx.actor.clone(),
                    at: ctx.at_ms,
                    last: is_last_unit && i + 1 == n,
                    digest: digest.to_owned(),
                };
                Outgoing {
                    expected_last_subject_seq: self.model.last_seq(&subject),
                    msg_id: format!("{}:{}", ctx.command, event.key_within_command()),
                    subject,
                    payload: Bytes::from(envelope.encode()),
                }
            })
            .collect()
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

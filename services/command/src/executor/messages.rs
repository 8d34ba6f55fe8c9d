//! How a decided unit becomes the messages of its atomic append: each event's envelope,
//! its subject, its id, and what the append expects of the stream.

use super::*;

impl Executor {
    /// The messages of one unit of a decision, each expecting its subject (or its rule's
    /// subjects, [`guard_of`]) where the model last saw it.
    pub(super) fn messages(
        &self,
        ctx: &Context,
        digest: &str,
        unit: &[Event],
        is_last_unit: bool,
        signature: Option<&str>,
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
                    signature: signature.map(str::to_owned),
                };
                let guard = guard_of(event);
                Outgoing {
                    expected_last_subject_seq: match guard {
                        Some(filter) => self.model.last_seq_of_filter(filter),
                        None => self.model.last_seq(&subject),
                    },
                    expected_subject: guard.map(str::to_owned),
                    expected_last_seq: None,
                    msg_id: format!("{}:{}", ctx.command, event.key_within_command()),
                    subject,
                    payload: Bytes::from(envelope.encode()),
                }
            })
            .collect()
    }
}

/// The subjects a rule that reads many aggregates was decided on, guarded by the event
/// that carries the decision: its append expects their last sequence over all of them
/// (instead of its own subject's), so a decision another instance made on them meanwhile
/// is a conflict, and the command is decided again on the caught-up model. Each guarded
/// event is one whose own subject is under the filter or new (a move's and a failover's
/// subject are the command's id, which no other command writes).
fn guard_of(event: &Event) -> Option<&'static str> {
    match event {
        // A GLOBAL_OWNER always stays, and a key belongs to one user: every user counts.
        Event::UserAdded { .. } | Event::UserRemoved { .. } => Some(subjects::USERS),
        // The rebuild limit counts the jobs moving in the whole fleet.
        Event::FailoverDecided { .. } => Some(subjects::JOB_EVENTS),
        // The mass-failure guard counts the daemons that are down.
        Event::MoveStarted {
            automatic: true, ..
        } => Some(subjects::DAEMON_EVENTS),
        _ => None,
    }
}

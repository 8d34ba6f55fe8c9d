//! The daemon's subject: the assignment events addressed to it, read up to their end at
//! start, then followed. Each event becomes the core's inputs; the core folds them into
//! what the daemon should hold.

use std::time::Instant;

use handoff_domain::{DaemonId, Event};
use handoff_eventlog::{EventLog, EventReader, ReadError};
use handoff_protocol::subjects;

use super::core::{Assignment, Core, Input, Release};

pub(super) struct Assignments {
    reader: EventReader,
    /// The subject's last sequence when the daemon started.
    end: u64,
}

impl Assignments {
    pub(super) async fn open(log: &EventLog, daemon: &DaemonId) -> Result<Self, ReadError> {
        let subject = subjects::daemon(daemon);
        let end = log.last_sequence_of(&subject).await?;
        let reader = log.read_filtered(1, &subject).await?;
        Ok(Assignments { reader, end })
    }

    /// Gives the core every event up to the subject's end as it was at start.
    pub(super) async fn catch_up(&mut self, core: &mut Core) -> Result<(), ReadError> {
        let mut seq = 0;
        while seq < self.end {
            let r = self.reader.next().await?;
            seq = r.seq;
            for input in inputs(&r.envelope.event, r.seq) {
                // Nothing acts before the core is caught up: no action to perform.
                let actions = core.handle(input, Instant::now());
                debug_assert!(actions.is_empty(), "{actions:?}");
            }
        }
        Ok(())
    }

    /// The inputs of the next event on the subject; waits for one.
    pub(super) async fn next(&mut self) -> Result<Vec<Input>, ReadError> {
        let r = self.reader.next().await?;
        Ok(inputs(&r.envelope.event, r.seq))
    }
}

/// What an event on the daemon's subject (at sequence `seq`) tells the core.
fn inputs(event: &Event, seq: u64) -> Vec<Input> {
    match event {
        Event::JobsAssigned { cause, jobs, .. } => jobs
            .iter()
            .map(|j| Input::Assigned {
                job: j.job.clone(),
                assignment: Assignment {
                    epoch: j.epoch,
                    cause: cause.clone(),
                },
            })
            .collect(),
        Event::JobsReleased { jobs, move_id, .. } => jobs
            .iter()
            .map(|job| Input::Released {
                job: job.clone(),
                release: Release {
                    move_id: move_id.clone(),
                    seq,
                },
            })
            .collect(),
        _ => Vec::new(),
    }
}

//! The workload: concurrent clients sending MoveJobs, MoveJob, FailJobMove, CancelMove,
//! DrainDaemon, CancelDrain and ConfigureDaemon (assignment enabled again, which a drain
//! in progress refuses) with daemons drawn at random, each retrying a command after a timeout or `unavailable`
//! with the same id (the command client does), and recording every command and its final
//! answer: the history the checker reads. An answer that never came is `Unknown`: the
//! checker accepts both outcomes for it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use handoff_client::{new_command_id, Client, SendError};
use handoff_domain::command::{
    CancelDrain, CancelMove, ConfigureDaemon, DrainDaemon, FailJobMove, MoveJob, MoveJobs,
};
use handoff_domain::event::Aggregate;
use handoff_domain::model::DaemonSettings;
use handoff_domain::{Command, CommandId, DaemonId, Event, JobId};
use handoff_eventlog::EventLog;
use handoff_protocol::subjects;
use tokio::sync::watch;

use crate::rng::Rng;

/// How a command ended for its client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Applied: the sequences of its events (a duplicate lists the first time's).
    Applied { seqs: Vec<u64> },
    /// Refused by the domain or the service: nothing may have been appended.
    Refused { reason: String },
    /// No answer until the client's deadline: it may or may not have been applied.
    Unknown { why: String },
}

/// One command of the history.
#[derive(Clone, Debug)]
pub struct Op {
    pub client: usize,
    pub id: CommandId,
    pub command: &'static str,
    pub outcome: Outcome,
}

pub type History = Arc<Mutex<Vec<Op>>>;

/// What the clients choose from.
#[derive(Clone)]
pub struct Fleet {
    pub daemons: Vec<DaemonId>,
    pub jobs: Vec<JobId>,
    /// Each daemon's settings as it registered: sent again to enable its assignment
    /// after a drain.
    pub settings: std::collections::BTreeMap<DaemonId, DaemonSettings>,
}

/// Runs `clients` clients until `stop` turns true; every command lands in `history`.
pub async fn run(
    client: Client,
    log: EventLog,
    fleet: Fleet,
    clients: usize,
    mut rng: Rng,
    history: History,
    stop: watch::Receiver<bool>,
) {
    let mut tasks = Vec::new();
    for n in 0..clients {
        let (client, log, fleet, history, mut stop, mut rng) = (
            client.clone(),
            log.clone(),
            fleet.clone(),
            history.clone(),
            stop.clone(),
            rng.fork(),
        );
        tasks.push(tokio::spawn(async move {
            while !*stop.borrow() {
                let Some(command) = choose(&mut rng, &fleet, &log).await else {
                    continue;
                };
                let id = new_command_id();
                let outcome = match client.send(&id, &command).await {
                    Ok(a) => Outcome::Applied {
                        seqs: a.events.iter().map(|e| e.seq).collect(),
                    },
                    Err(SendError::Unavailable { last, .. }) => Outcome::Unknown {
                        why: last.to_string(),
                    },
                    Err(e) => Outcome::Refused {
                        reason: e.body().reason,
                    },
                };
                history.lock().expect("history lock").push(Op {
                    client: n,
                    id,
                    command: command.name(),
                    outcome,
                });
                let pause = Duration::from_millis(rng.between(50, 400));
                tokio::select! {
                    _ = stop.changed() => {}
                    _ = tokio::time::sleep(pause) => {}
                }
            }
        }));
    }
    for t in tasks {
        // Ignored: a client task that panicked has recorded what it sent before.
        let _ = t.await;
    }
}

/// The next command: mostly single-job moves, some whole-daemon moves, some gives-up or
/// cancels of a move in progress (found on the job's subject), now and then a drain, its
/// cancel, or a daemon's assignment enabled again.
async fn choose(rng: &mut Rng, fleet: &Fleet, log: &EventLog) -> Option<Command> {
    let reason = Some("chaos".to_owned());
    match rng.below(40) {
        36 => Some(Command::DrainDaemon(DrainDaemon {
            daemon: rng.pick(&fleet.daemons).clone(),
            max_concurrent: 1 + rng.below(2) as u32,
            reason,
            dry_run: false,
        })),
        37 => Some(Command::CancelDrain(CancelDrain {
            daemon: rng.pick(&fleet.daemons).clone(),
            reason: "chaos cancels the drain".into(),
        })),
        38 | 39 => {
            let daemon = rng.pick(&fleet.daemons).clone();
            let mut settings = fleet.settings.get(&daemon)?.clone();
            settings.assignment_enabled = true;
            Some(Command::ConfigureDaemon(ConfigureDaemon {
                daemon,
                settings,
            }))
        }
        0..=23 => Some(Command::MoveJob(MoveJob {
            job: rng.pick(&fleet.jobs).clone(),
            to: rng.pick(&fleet.daemons).clone(),
            reason,
            dry_run: false,
        })),
        24..=29 => {
            let from = rng.pick(&fleet.daemons).clone();
            let to = rng.pick(&fleet.daemons).clone();
            Some(Command::MoveJobs(MoveJobs {
                from,
                to,
                reason,
                dry_run: false,
            }))
        }
        _ => {
            let job = rng.pick(&fleet.jobs).clone();
            let subject = subjects::aggregate(&Aggregate::Job(job.clone()));
            let last = log.last_event_of(&subject).await.ok()??;
            match last.envelope.event {
                Event::JobMoveStarted { move_id, .. } if rng.below(2) == 0 => {
                    Some(Command::CancelMove(CancelMove {
                        move_id,
                        reason: "chaos cancels".into(),
                    }))
                }
                Event::JobMoveStarted { move_id, epoch, .. } => {
                    Some(Command::FailJobMove(FailJobMove {
                        job,
                        move_id,
                        epoch,
                        reason: "chaos gives up".into(),
                    }))
                }
                _ => None,
            }
        }
    }
}

/// A reader riding through the faults: follows the whole stream from the start, and
/// counts how often it had to open it again. It fails the run only if it never gets to
/// the end.
pub async fn follow(log: EventLog, mut stop: watch::Receiver<bool>) -> Result<(u64, u32)> {
    let mut reopened = 0;
    let mut next = 1;
    'open: loop {
        let mut reader = match log.read_from(next).await {
            Ok(r) => r,
            Err(_) if !*stop.borrow() => {
                reopened += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue 'open;
            }
            Err(e) => return Err(e.into()),
        };
        loop {
            tokio::select! {
                _ = stop.changed() => return Ok((next - 1, reopened)),
                r = reader.next() => match r {
                    Ok(r) => next = r.seq + 1,
                    Err(_) => {
                        reopened += 1;
                        continue 'open;
                    }
                }
            }
        }
    }
}

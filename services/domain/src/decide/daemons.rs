//! Daemons: registering, configuring and removing them, and their liveness as the
//! monitor reports it.

use super::{active_daemon, Decision};
use crate::command::{ConfigureDaemon, RegisterDaemon, RemoveDaemon, ReportDaemonLiveness};
use crate::event::Event;
use crate::rejection::{Kind, Rejection};
use crate::state::{DaemonStatus, State};

pub(super) fn register(c: &RegisterDaemon, state: &State) -> Result<Decision, Rejection> {
    match state.daemons.get(&c.daemon) {
        Some(d) if d.status != DaemonStatus::Removed => Err(Rejection::AlreadyExists {
            kind: Kind::Daemon,
            id: c.daemon.to_string(),
        }),
        _ => Ok(Decision::one(vec![Event::DaemonRegistered {
            daemon: c.daemon.clone(),
            settings: c.settings.clone(),
        }])),
    }
}

pub(super) fn configure(c: &ConfigureDaemon, state: &State) -> Result<Decision, Rejection> {
    active_daemon(state, &c.daemon)?;
    // A drain keeps assignment disabled until it ends.
    if let Some(drain) = state.drains.get(&c.daemon) {
        if c.settings.assignment_enabled {
            return Err(Rejection::Draining {
                daemon: c.daemon.clone(),
                drain_id: drain.id.clone(),
            });
        }
    }
    Ok(Decision::one(vec![Event::DaemonConfigured {
        daemon: c.daemon.clone(),
        settings: c.settings.clone(),
    }]))
}

pub(super) fn remove(c: &RemoveDaemon, state: &State) -> Result<Decision, Rejection> {
    let d = active_daemon(state, &c.daemon)?;
    let jobs = d.jobs.len() + state.jobs_moving_from(&c.daemon).count();
    if jobs > 0 {
        return Err(Rejection::DaemonHasJobs {
            daemon: c.daemon.clone(),
            jobs,
        });
    }
    Ok(Decision::one(vec![Event::DaemonRemoved {
        daemon: c.daemon.clone(),
    }]))
}

pub(super) fn report_liveness(
    c: &ReportDaemonLiveness,
    state: &State,
) -> Result<Decision, Rejection> {
    let d = active_daemon(state, &c.daemon)?;
    let event = match (d.is_up(), c.up) {
        (true, true) | (false, false) => None,
        (false, true) => Some(Event::DaemonUp {
            daemon: c.daemon.clone(),
        }),
        (true, false) => Some(Event::DaemonDown {
            daemon: c.daemon.clone(),
        }),
    };
    Ok(Decision::one(event.into_iter().collect()))
}

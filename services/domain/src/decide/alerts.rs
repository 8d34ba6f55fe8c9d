//! The monitor's reports that raise and close alerts (LOW_HEAD_FREE_SPACE, MOVE_STUCK,
//! FAILOVER_PAUSED), each appended only when the alert changes, and the BIND_FAILURE
//! alert of a rejected command. Which event opens and closes which alert is `alert`'s.

use super::{active_daemon, guard_tripped, Decision};
use crate::command::{Command, ReportFailoverGuard, ReportHeadSpace, ReportMoveStuck};
use crate::event::Event;
use crate::model::{AlertKey, AlertKind, FLEET};
use crate::rejection::{Kind, Rejection};
use crate::state::{Assignment, State};

pub(super) fn report_head_space(c: &ReportHeadSpace, state: &State) -> Result<Decision, Rejection> {
    let d = active_daemon(state, &c.daemon)?;
    let total = d.settings.head_space_bytes;
    let free = d.free_bytes();
    let low =
        total > 0 && u128::from(free) * 100 < u128::from(total) * u128::from(c.threshold_percent);
    let open = state
        .alerts
        .contains(&AlertKey::new(AlertKind::LowHeadFreeSpace, &c.daemon));
    let event = match (low, open) {
        (true, false) => Some(Event::HeadSpaceLow {
            daemon: c.daemon.clone(),
            free_bytes: free,
            head_space_bytes: total,
            threshold_percent: c.threshold_percent,
        }),
        (false, true) => Some(Event::HeadSpaceRecovered {
            daemon: c.daemon.clone(),
            free_bytes: free,
            head_space_bytes: total,
        }),
        _ => None,
    };
    Ok(Decision::one(event.into_iter().collect()))
}

pub(super) fn report_move_stuck(c: &ReportMoveStuck, state: &State) -> Result<Decision, Rejection> {
    let j = state.jobs.get(&c.job).ok_or_else(|| Rejection::NotFound {
        kind: Kind::Job,
        id: c.job.to_string(),
    })?;
    let phase = match &j.assignment {
        Assignment::Moving { move_id, phase, .. } if *move_id == c.move_id => *phase,
        _ => {
            return Err(Rejection::MoveNotInProgress {
                job: c.job.clone(),
                move_id: c.move_id.clone(),
            })
        }
    };
    if state
        .alerts
        .contains(&AlertKey::new(AlertKind::MoveStuck, &c.job))
    {
        return Ok(Decision::default());
    }
    Ok(Decision::one(vec![Event::MoveStuck {
        job: c.job.clone(),
        move_id: c.move_id.clone(),
        phase,
        idle_ms: c.idle_ms,
    }]))
}

pub(super) fn report_failover_guard(
    c: &ReportFailoverGuard,
    state: &State,
) -> Result<Decision, Rejection> {
    let (down, active) = state.down_of_active();
    let tripped = guard_tripped(down.len() as u32, active, c.max_down_percent);
    let paused = state
        .alerts
        .contains(&AlertKey::new(AlertKind::FailoverPaused, FLEET));
    let event = match (tripped, paused) {
        (true, false) => Some(Event::FailoverPaused {
            down,
            active,
            max_down_percent: c.max_down_percent,
        }),
        (false, true) => Some(Event::FailoverResumed { down, active }),
        _ => None,
    };
    Ok(Decision::one(event.into_iter().collect()))
}

/// The alert a rejected command raises, if any: a backup that could not be created, or
/// a drain's job that could not be placed, for want of a daemon (BIND_FAILURE), unless
/// that alert is open already. The command
/// service appends it although the command itself appends nothing.
pub fn alert_of_rejection(
    command: &Command,
    rejection: &Rejection,
    state: &State,
) -> Option<Event> {
    match (command, rejection) {
        (Command::CreateBackupJobs(c), Rejection::BindFailure { job, detail })
            if !state
                .alerts
                .contains(&AlertKey::new(AlertKind::BindFailure, job)) =>
        {
            Some(Event::BindFailed {
                job: job.clone(),
                project: c.project.clone(),
                detail: detail.clone(),
            })
        }
        (Command::ContinueDrain(c), Rejection::BindFailure { job, detail })
            if !state
                .alerts
                .contains(&AlertKey::new(AlertKind::BindFailure, &c.daemon)) =>
        {
            Some(Event::DrainBlocked {
                daemon: c.daemon.clone(),
                drain_id: c.drain_id.clone(),
                job: job.clone(),
                detail: detail.clone(),
            })
        }
        _ => None,
    }
}

//! Alerts, with Ops Manager's names: which event raises one and which event closes it.
//! An alert is not stored apart from the events: the open alerts are a fold of the
//! stream, so each one closes with the event that resolves it.
//!
//! | alert | raised by | closed by |
//! |-------|-----------|-----------|
//! | DAEMON_DOWN | `DaemonDown` | `DaemonUp`, `DaemonRemoved` |
//! | DAEMON_UP | `DaemonUp` | itself (informational) |
//! | THEFT_FAILED | `JobMoveFailed` (not a cancelled one) | the job's next `JobMoveCompleted` |
//! | LOW_HEAD_FREE_SPACE | `HeadSpaceLow` | `HeadSpaceRecovered`, `DaemonRemoved` |
//! | OPLOG_TTL_RESIZE | `OplogTtlResized` | itself (informational) |
//! | BIND_FAILURE | `BindFailed` (a job) | the job's `BackupJobCreated` |
//! | BIND_FAILURE | `DrainBlocked` (a draining daemon) | the daemon's `JobsReleased`, `DrainCompleted`, `DrainCancelled`, `DaemonRemoved` |
//! | MOVE_STUCK | `MoveStuck` | the job's next phase, completion or failure |
//! | FAILOVER_PAUSED | `FailoverPaused` | `FailoverResumed` |
//! | MOVE_INTERRUPTED | `MoveInterrupted` | the move's `MoveResumed` or `MoveCancelled` |

use crate::event::Event;

// The alert names sit below the events that carry them; their old paths here stay for
// callers.
pub use crate::model::{AlertKey, AlertKind, FLEET};

/// What an event does to the alerts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    /// The alert opens (again, if it was closed).
    Open { key: AlertKey, detail: String },
    /// The alert closes, if it is open.
    Close { key: AlertKey },
    /// An informational alert: raised and closed at once.
    Notice { key: AlertKey, detail: String },
}

/// The alerts an event raises or closes.
pub fn effects(event: &Event) -> Vec<Effect> {
    use AlertKind::*;
    let open = |kind, about: &dyn std::fmt::Display, detail: String| Effect::Open {
        key: AlertKey::new(kind, about),
        detail,
    };
    let close = |kind, about: &dyn std::fmt::Display| Effect::Close {
        key: AlertKey::new(kind, about),
    };
    match event {
        Event::DaemonDown { daemon } => vec![open(
            DaemonDown,
            daemon,
            format!("{daemon} sent no heartbeat for the threshold"),
        )],
        Event::DaemonUp { daemon } => vec![
            close(DaemonDown, daemon),
            Effect::Notice {
                key: AlertKey::new(DaemonUp, daemon),
                detail: format!("{daemon} sends heartbeats again"),
            },
        ],
        Event::DaemonRemoved { daemon } => {
            vec![
                close(DaemonDown, daemon),
                close(LowHeadFreeSpace, daemon),
                close(BindFailure, daemon),
            ]
        }
        // Asked for: no THEFT_FAILED.
        Event::JobMoveFailed {
            job,
            cancelled: true,
            ..
        } => vec![close(MoveStuck, job)],
        Event::JobMoveFailed {
            job,
            reason,
            returned_to,
            ..
        } => vec![
            close(MoveStuck, job),
            open(
                TheftFailed,
                job,
                format!("the move of {job} failed ({reason}); it went back to {returned_to}"),
            ),
        ],
        Event::JobMoveCompleted { job, .. } => {
            vec![close(TheftFailed, job), close(MoveStuck, job)]
        }
        Event::HeadSpaceLow {
            daemon,
            free_bytes,
            head_space_bytes,
            threshold_percent,
        } => vec![open(
            LowHeadFreeSpace,
            daemon,
            format!(
                "{daemon} has {free_bytes} of {head_space_bytes} bytes of head space free, \
                 under {threshold_percent}%"
            ),
        )],
        Event::HeadSpaceRecovered { daemon, .. } => vec![close(LowHeadFreeSpace, daemon)],
        Event::OplogTtlResized {
            job,
            previous_hours,
            hours,
            reason,
        } => vec![Effect::Notice {
            key: AlertKey::new(OplogTtlResize, job),
            detail: format!(
                "oplog of {job} kept {hours} h instead of {previous_hours} h: {reason}"
            ),
        }],
        Event::BindFailed { job, detail, .. } => vec![open(
            BindFailure,
            job,
            format!("no daemon can take {job}: {detail}"),
        )],
        Event::BackupJobCreated { job, .. } => vec![close(BindFailure, job)],
        Event::DrainBlocked {
            daemon,
            drain_id,
            job,
            detail,
        } => vec![open(
            BindFailure,
            daemon,
            format!(
                "drain {drain_id} of {daemon} cannot place {job} nor any job after it: {detail}"
            ),
        )],
        Event::JobsReleased { daemon, .. }
        | Event::DrainCompleted { daemon, .. }
        | Event::DrainCancelled { daemon, .. } => vec![close(BindFailure, daemon)],
        Event::MoveStuck {
            job,
            move_id,
            phase,
            idle_ms,
        } => vec![open(
            MoveStuck,
            job,
            format!(
                "the move {move_id} of {job} shows no progress in phase {phase:?} for {} s",
                idle_ms / 1000
            ),
        )],
        Event::JobMovePhaseReported { job, .. } => vec![close(MoveStuck, job)],
        Event::FailoverPaused {
            down,
            active,
            max_down_percent,
        } => vec![open(
            FailoverPaused,
            &FLEET,
            format!(
                "{} of {active} daemons are down, more than {max_down_percent}%: automatic \
                 failover waits (a partition of our own is likelier than a mass failure)",
                down.len()
            ),
        )],
        Event::FailoverResumed { .. } => vec![close(FailoverPaused, &FLEET)],
        Event::MoveInterrupted {
            move_id,
            planned,
            started,
            reason,
        } => vec![open(
            MoveInterrupted,
            move_id,
            format!(
                "move {move_id} started {started} of its {planned} jobs; the rest waits: \
                 {reason}; the command service starts it as soon as it can"
            ),
        )],
        Event::MoveResumed { move_id, .. } | Event::MoveCancelled { move_id, .. } => {
            vec![close(MoveInterrupted, move_id)]
        }
        _ => vec![],
    }
}

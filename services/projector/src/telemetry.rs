//! The projector's metrics, through the `metrics` facade (the binary installs the
//! Prometheus exporter: `--metrics`): how far behind the stream it is (measured on a
//! timer of its own, so a stalled fold shows), how fast it folds, and what the fleet's
//! state holds (set when the fold starts, then at most once a second as it goes).

use std::collections::BTreeMap;

use handoff_domain::model::AlertKind;
use handoff_domain::State;
use metrics::{counter, describe_counter, describe_gauge, gauge, Unit};

/// The stream's last sequence less the last one whose views are stored.
pub const LAG: &str = "handoff_projector_lag_events";
/// The stream sequence of the last event whose views are stored.
pub const APPLIED_SEQUENCE: &str = "handoff_projector_applied_sequence";
/// Events folded.
pub const APPLIED: &str = "handoff_projector_events_applied_total";
/// Moves in progress.
pub const MOVES: &str = "handoff_moves_in_progress";
/// Jobs moving now, in every move.
pub const JOBS_MOVING: &str = "handoff_jobs_moving";
/// Open alerts, by `kind` (each kind listed, 0 when none is open).
pub const ALERTS: &str = "handoff_alerts_open";
/// Drains in progress.
pub const DRAINS: &str = "handoff_drains_in_progress";

/// Describes the metrics (their HELP lines).
pub fn describe() {
    describe_gauge!(
        LAG,
        Unit::Count,
        "The event stream's last sequence less the last one the projector's views hold."
    );
    describe_gauge!(
        APPLIED_SEQUENCE,
        "Stream sequence of the last event the projector's views hold."
    );
    describe_counter!(APPLIED, Unit::Count, "Events the projector folded.");
    describe_gauge!(MOVES, Unit::Count, "Moves in progress.");
    describe_gauge!(JOBS_MOVING, Unit::Count, "Jobs moving now, in every move.");
    describe_gauge!(ALERTS, Unit::Count, "Open alerts, by kind.");
    describe_gauge!(DRAINS, Unit::Count, "Drains in progress.");
}

/// Events folded in a batch.
pub fn folded(events: u64) {
    counter!(APPLIED).increment(events);
}

/// How far behind the stream's `last` sequence the stored views (at `applied`) are.
pub fn behind(last: u64, applied: u64) {
    gauge!(APPLIED_SEQUENCE).set(applied as f64);
    gauge!(LAG).set(last.saturating_sub(applied) as f64);
}

/// What the fleet's state holds: moves, moving jobs, drains, open alerts by kind.
pub fn state(state: &State) {
    gauge!(MOVES).set(state.moves.len() as f64);
    gauge!(JOBS_MOVING).set(f64::from(state.moving()));
    gauge!(DRAINS).set(state.drains.len() as f64);
    let mut open: BTreeMap<AlertKind, u64> = AlertKind::ALL.iter().map(|k| (*k, 0)).collect();
    for a in &state.alerts {
        *open.entry(a.kind).or_default() += 1;
    }
    for (kind, n) in open {
        gauge!(ALERTS, "kind" => kind.as_str()).set(n as f64);
    }
}

//! The projector's metrics, through the `metrics` facade (the binary installs the
//! Prometheus exporter: `--metrics`), set after each batch it folds: how far behind the
//! stream it is, how fast it folds, and what the fleet's state holds now.

use std::collections::BTreeMap;

use handoff_domain::model::AlertKind;
use handoff_domain::State;
use metrics::{counter, describe_counter, describe_gauge, gauge, Unit};

/// Events in the stream after the last one folded (as the consumer reported it).
pub const LAG: &str = "handoff_projector_lag_events";
/// The stream sequence of the last event folded.
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
        "Events in the stream after the last one the projector folded."
    );
    describe_gauge!(
        APPLIED_SEQUENCE,
        "Stream sequence of the last event the projector folded."
    );
    describe_counter!(APPLIED, Unit::Count, "Events the projector folded.");
    describe_gauge!(MOVES, Unit::Count, "Moves in progress.");
    describe_gauge!(JOBS_MOVING, Unit::Count, "Jobs moving now, in every move.");
    describe_gauge!(ALERTS, Unit::Count, "Open alerts, by kind.");
    describe_gauge!(DRAINS, Unit::Count, "Drains in progress.");
}

/// After a batch: `folded` events up to `sequence`, `pending` after it in the stream.
pub fn folded(folded: u64, sequence: u64, pending: u64, state: &State) {
    counter!(APPLIED).increment(folded);
    gauge!(APPLIED_SEQUENCE).set(sequence as f64);
    gauge!(LAG).set(pending as f64);
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

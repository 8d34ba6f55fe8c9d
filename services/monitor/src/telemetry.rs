//! The monitor's metrics, through the `metrics` facade (the binary installs the
//! Prometheus exporter: `--metrics`): each daemon's heartbeat age by the monitor's own
//! clock, and how many daemons are up and down.

use std::time::Instant;

use handoff_domain::model::Liveness;
use handoff_domain::state::DaemonStatus;
use handoff_domain::State;
use metrics::{describe_gauge, gauge, Unit};

use crate::watch::Watch;

/// Seconds since each daemon's last heartbeat (or since the monitor started watching
/// it), by `daemon`; NaN once the daemon is removed.
pub const HEARTBEAT_AGE: &str = "handoff_heartbeat_age_seconds";
/// Daemons by `status`: `up` or `down` (removed ones are not counted).
pub const DAEMONS: &str = "handoff_daemons";

/// Describes the metrics (their HELP lines).
pub fn describe() {
    describe_gauge!(
        HEARTBEAT_AGE,
        Unit::Seconds,
        "Seconds since the daemon's last heartbeat, by the monitor's clock (NaN once removed)."
    );
    describe_gauge!(DAEMONS, Unit::Count, "Daemons up and down.");
}

/// Sets the gauges from what the watch heard and the state holds, as of `now`.
pub fn heard(watch: &Watch, state: &State, now: Instant) {
    let (mut up, mut down) = (0u64, 0u64);
    for (id, d) in &state.daemons {
        let age = match d.status {
            DaemonStatus::Removed => f64::NAN,
            DaemonStatus::Active(l) => {
                if l == Liveness::Up {
                    up += 1;
                } else {
                    down += 1;
                }
                match watch.heard(id) {
                    Some(at) => now.saturating_duration_since(at).as_secs_f64(),
                    None => continue,
                }
            }
        };
        gauge!(HEARTBEAT_AGE, "daemon" => id.to_string()).set(age);
    }
    gauge!(DAEMONS, "status" => "up").set(up as f64);
    gauge!(DAEMONS, "status" => "down").set(down as f64);
}

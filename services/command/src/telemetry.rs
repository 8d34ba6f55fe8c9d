//! The command service's metrics, through the `metrics` facade (the binary installs the
//! Prometheus exporter: `--metrics`). Names follow Prometheus's conventions.

use metrics::{describe_counter, describe_histogram, Unit};

/// Request to reply, by `endpoint` and `outcome` (`applied`, `duplicate`, `dry_run`, or
/// the error's code: `refused`, `forbidden`, `unavailable`...).
pub const COMMAND_SECONDS: &str = "handoff_command_duration_seconds";
/// Events this instance appended for the commands it applied.
pub const EVENTS_APPENDED: &str = "handoff_command_events_appended_total";
/// Commands answered with an error, by `reason` (`bind_failure`, `forbidden`,
/// `event_log_unavailable`...: the reasons table of schemas/README.md).
pub const REFUSALS: &str = "handoff_command_refusals_total";

/// Describes the metrics (their HELP lines).
pub fn describe() {
    describe_histogram!(
        COMMAND_SECONDS,
        Unit::Seconds,
        "Command request to reply, by endpoint and outcome."
    );
    describe_counter!(
        EVENTS_APPENDED,
        "Events this command service instance appended for the commands it applied."
    );
    describe_counter!(REFUSALS, "Commands answered with an error, by reason.");
}

/// Records one answered request.
pub fn answered(endpoint: &'static str, reply: &handoff_protocol::Reply, seconds: f64) {
    let outcome = match reply {
        handoff_protocol::Reply::Ok(a) if a.dry_run => "dry_run",
        handoff_protocol::Reply::Ok(a) if a.duplicate => "duplicate",
        handoff_protocol::Reply::Ok(a) => {
            metrics::counter!(EVENTS_APPENDED).increment(a.events.len() as u64);
            "applied"
        }
        handoff_protocol::Reply::Error(e) => {
            metrics::counter!(REFUSALS, "reason" => e.reason.clone()).increment(1);
            e.code.as_str()
        }
    };
    metrics::histogram!(COMMAND_SECONDS, "endpoint" => endpoint, "outcome" => outcome)
        .record(seconds);
}

//! The command service's metrics, through the `metrics` facade (the binary installs the
//! Prometheus exporter: `--metrics`). Names follow Prometheus's conventions.

use metrics::{describe_counter, describe_histogram, Unit};

/// Request to reply, by `endpoint` and `outcome` (`applied`, `duplicate`, `dry_run`, or
/// the error's code: `refused`, `forbidden`, `unavailable`...).
pub const COMMAND_SECONDS: &str = "handoff_command_duration_seconds";
/// Events of the commands this instance answered as applied (not those it appends by
/// itself: refusal records, alerts, a drain's steps).
pub const EVENTS_APPENDED: &str = "handoff_command_events_appended_total";
/// Commands answered with an error, by `code` (`refused`, `forbidden`, `unavailable`...)
/// and `reason` (`bind_failure`, `bad_signature`, `event_log_unavailable`...: the reasons
/// table of schemas/README.md).
pub const ERRORS: &str = "handoff_command_errors_total";

/// Describes the metrics (their HELP lines).
pub fn describe() {
    describe_histogram!(
        COMMAND_SECONDS,
        Unit::Seconds,
        "Command request to reply, by endpoint and outcome."
    );
    describe_counter!(
        EVENTS_APPENDED,
        "Events of the commands this command service instance answered as applied."
    );
    describe_counter!(
        ERRORS,
        "Commands answered with an error, by code and reason."
    );
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
            metrics::counter!(ERRORS, "code" => e.code.as_str(), "reason" => e.reason.clone())
                .increment(1);
            e.code.as_str()
        }
    };
    metrics::histogram!(COMMAND_SECONDS, "endpoint" => endpoint, "outcome" => outcome)
        .record(seconds);
}

//! `--metrics ADDR`: a long-running process's Prometheus metrics, served at
//! `http://ADDR/metrics` in the text exposition format. One recorder per process, so
//! `handoff up` serves those of every service it runs in one place (its daemons, each
//! its own process, on the ports after it).

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use axum::http::header::CONTENT_TYPE;
use axum::routing::get;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::Failure;

/// Histogram buckets, in seconds: a command's, half a millisecond to half a minute.
const SECONDS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// A rebuild's, ten seconds to a day.
const REBUILD_SECONDS: &[f64] = &[
    1.0, 10.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 43200.0, 86400.0,
];

static RECORDER: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process's recorder, installed on first use with every metric described.
fn recorder() -> Result<PrometheusHandle, Failure> {
    if let Some(h) = RECORDER.get() {
        return Ok(h.clone());
    }
    let handle = PrometheusBuilder::new()
        .set_buckets(SECONDS)
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full(handoff_dataplane::telemetry::REBUILD_SECONDS.to_owned()),
                REBUILD_SECONDS,
            )
        })
        .and_then(|b| b.install_recorder())
        .map_err(|e| Failure::Usage(format!("cannot record metrics: {e}")))?;
    handoff_command::telemetry::describe();
    handoff_projector::telemetry::describe();
    handoff_monitor::telemetry::describe();
    handoff_dataplane::telemetry::describe();
    // Histograms keep their samples until the upkeep folds them in.
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(5));
        loop {
            every.tick().await;
            upkeep.run_upkeep();
        }
    });
    Ok(RECORDER.get_or_init(|| handle).clone())
}

/// Serves the metrics on `addr` (port 0: any free port) until the process ends; returns
/// the address bound.
pub async fn serve(addr: SocketAddr) -> Result<SocketAddr, Failure> {
    let handle = recorder()?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| Failure::Usage(format!("--metrics {addr}: {e}")))?;
    let bound = listener.local_addr()?;
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let handle = handle.clone();
            async move {
                // O(series): off the runtime's workers, which serve commands meanwhile.
                let body = tokio::task::spawn_blocking(move || handle.render())
                    .await
                    .unwrap_or_default();
                (
                    [(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
                    body,
                )
            }
        }),
    );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!(error = %e, "the metrics endpoint stopped");
        }
    });
    tracing::info!("metrics at http://{bound}/metrics");
    Ok(bound)
}

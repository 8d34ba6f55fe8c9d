//! Live updates: server-sent events from the event stream (and the rebuilds' progress
//! messages), which `/console.js` folds into the page.
//!
//! A page says where its views stood when it was rendered (`after`: a little before the
//! projector's checkpoint read before its queries); its stream starts after that, so
//! nothing between the page and the stream is missed, and the script skips what the page
//! already shows. Each event carries its sequence as its id: a browser that reconnects
//! (the stream ends after [`LIVE_FOR`], or when the console stops) goes on from the last
//! one it had. A stream that cannot be served now (all [`super::LIVE_STREAMS`] taken, the
//! stream out of reach) is answered with a retry time, not an error, so the browser
//! tries again by itself. A client too slow to take its events loses its stream, not
//! the console's memory. A stream needs the console's token (`t`): a page elsewhere
//! cannot hold the permits.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as Sse, KeepAlive};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use handoff_domain::model::MovePhase;
use handoff_domain::Event;
use handoff_eventlog::{Follower, Recorded};
use handoff_protocol::dataplane::Progress;
use handoff_protocol::subjects;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::mpsc;

use super::Console;
use crate::cmd::history::describe;
use crate::output::{name, time};

/// How long one stream lasts before the browser opens the next.
const LIVE_FOR: Duration = Duration::from_secs(600);
/// How long a client may take to accept an event before its stream ends.
const SLOW_CLIENT: Duration = Duration::from_secs(5);
/// Events waiting for their client.
const BUFFERED: usize = 64;

/// How long a browser waits before it asks again for a stream that could not be served.
const RETRY: Duration = Duration::from_secs(5);

#[derive(Debug, Deserialize)]
pub(super) struct MovesLive {
    /// Only this move's jobs (a move's page); else every move's (the Moves page).
    #[serde(rename = "move")]
    move_id: Option<String>,
    after: u64,
    t: String,
}

#[derive(Debug, Deserialize)]
pub(super) struct HistoryLive {
    job: Option<String>,
    daemon: Option<String>,
    after: u64,
    t: String,
}

/// What a stream's client follows.
enum Watch {
    Moves(Option<String>),
    History {
        job: Option<String>,
        daemon: Option<String>,
    },
}

/// The sequence a reconnecting browser had last.
fn resumed(headers: &HeaderMap, after: u64) -> u64 {
    headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .map_or(after, |last: u64| last.max(after))
}

pub(super) async fn moves(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    Query(q): Query<MovesLive>,
) -> Response {
    if !c.live_token_ok(&q.t) {
        return (StatusCode::FORBIDDEN, "not this console's page").into_response();
    }
    if let Some(id) = &q.move_id {
        if let Err(e) = handoff_domain::CommandId::new(id.clone()) {
            return (StatusCode::BAD_REQUEST, format!("move: {e}")).into_response();
        }
    }
    let after = resumed(&headers, q.after);
    open(c, after, Watch::Moves(q.move_id)).await
}

pub(super) async fn history(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    Query(q): Query<HistoryLive>,
) -> Response {
    if !c.live_token_ok(&q.t) {
        return (StatusCode::FORBIDDEN, "not this console's page").into_response();
    }
    let after = resumed(&headers, q.after);
    if q.job.is_none() == q.daemon.is_none() {
        return (StatusCode::BAD_REQUEST, "say one job or one daemon").into_response();
    }
    open(
        c,
        after,
        Watch::History {
            job: q.job,
            daemon: q.daemon,
        },
    )
    .await
}

/// A stream that says only "try again in a while": a browser's `EventSource` closes
/// for good on an error status, but reconnects by itself when a stream ends.
fn later() -> Response {
    let once = futures::stream::iter([Ok::<_, Infallible>(
        Sse::default().retry(RETRY).comment("later"),
    )]);
    axum::response::sse::Sse::new(once).into_response()
}

async fn open(c: Arc<Console>, after: u64, watch: Watch) -> Response {
    let Ok(permit) = c.live.clone().try_acquire_owned() else {
        tracing::debug!("every live stream is taken: the page asks again later");
        return later();
    };
    let log = match c.api.log().await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "a live page could not follow the stream");
            return later();
        }
    };
    // The rebuilds' progress: of one move, or of all.
    let progress_subject = match &watch {
        Watch::Moves(Some(id)) => Some(subjects::progress(id)),
        Watch::Moves(None) => Some(subjects::progress(">")),
        Watch::History { .. } => None,
    };
    let progress = match progress_subject {
        Some(s) => match c.api.client.subscribe(s).await {
            Ok(sub) => Some(sub),
            Err(e) => {
                tracing::warn!(error = %e, "a live page could not follow the rebuilds");
                return later();
            }
        },
        None => None,
    };
    let follower = Follower::new(log, after + 1, None);
    let (tx, rx) = mpsc::channel(BUFFERED);
    let stopping = c.stopping.clone();
    tokio::spawn(async move {
        follow(follower, progress, watch, tx, stopping).await;
        drop(permit);
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|e| (Ok::<_, Infallible>(e), rx))
    });
    axum::response::sse::Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// Sends the client its events until it leaves, is too slow, the stream's time is up or
/// the console stops.
async fn follow(
    mut follower: Follower,
    mut progress: Option<async_nats::Subscriber>,
    watch: Watch,
    tx: mpsc::Sender<Sse>,
    mut stopping: tokio::sync::watch::Receiver<bool>,
) {
    let end = tokio::time::sleep(LIVE_FOR);
    tokio::pin!(end);
    loop {
        let events = tokio::select! {
            _ = tx.closed() => return,
            _ = &mut end => return,
            _ = stopping.wait_for(|s| *s) => return,
            r = follower.next() => match r {
                Ok(r) => of_event(&watch, &r),
                Err(e) => {
                    tracing::warn!(error = %e, "a live page stopped following the stream");
                    return;
                }
            },
            Some(m) = async {
                match &mut progress {
                    Some(p) => p.next().await,
                    None => std::future::pending().await,
                }
            } => {
                // Progress is only a hint: dropped when the client is behind.
                if let Some(e) = serde_json::from_slice::<Progress>(&m.payload).ok().map(|p| of_progress(&p)) {
                    let _ = tx.try_send(e);
                }
                continue;
            }
        };
        for e in events {
            match tokio::time::timeout(SLOW_CLIENT, tx.send(e)).await {
                Ok(Ok(())) => {}
                _ => return,
            }
        }
    }
}

/// An event of the stream that changes nothing on the page: its sequence only, so that
/// the page reconnects from past it.
fn passed(id: String) -> Sse {
    Sse::default().id(id).event("at").data("0")
}

fn of_progress(p: &Progress) -> Sse {
    let percent = match p.snapshot_total {
        0 => 0.0,
        total => p.snapshot_bytes as f64 / total as f64,
    };
    let detail = match p.phase {
        MovePhase::ReplayingOplog => format!(
            "{} oplog entries, {:.1} s behind",
            p.entries_applied,
            p.lag_ms as f64 / 1000.0
        ),
        phase => name(&phase),
    };
    Sse::default().event("progress").data(
        json!({
            "move": p.move_id,
            "job": p.job,
            "phase": name(&p.phase),
            "done": percent.min(1.0),
            "detail": detail,
        })
        .to_string(),
    )
}

/// What the client is told of one event of the stream.
fn of_event(watch: &Watch, r: &Recorded) -> Vec<Sse> {
    let e = &r.envelope.event;
    let id = r.seq.to_string();
    match watch {
        Watch::History { job, daemon } => {
            let about = match (job, daemon) {
                (Some(j), _) => e.jobs().iter().any(|x| x.as_str() == j),
                (None, Some(d)) => e.daemons().iter().any(|x| x.as_str() == d),
                (None, None) => false,
            };
            if !about {
                return vec![passed(id)];
            }
            vec![Sse::default().id(id).event("entry").data(
                json!({
                    "seq": r.seq,
                    "at": time(r.envelope.at),
                    "actor": r.envelope.actor,
                    "event": e.type_name(),
                    "what": describe(e),
                })
                .to_string(),
            )]
        }
        Watch::Moves(only) => {
            let phase = |move_id: &handoff_domain::CommandId,
                         job: &handoff_domain::JobId,
                         phase: MovePhase| {
                if only.as_deref().is_some_and(|m| m != move_id.as_str()) {
                    return passed(id.clone());
                }
                Sse::default().id(id.clone()).event("phase").data(
                    json!({
                        "move": move_id,
                        "job": job,
                        "phase": name(&phase),
                        "final": phase.is_final(),
                    })
                    .to_string(),
                )
            };
            let sse = match e {
                Event::JobMovePhaseReported {
                    job,
                    move_id,
                    phase: p,
                } => phase(move_id, job, *p),
                Event::JobMoveCompleted { job, move_id, .. } => {
                    phase(move_id, job, MovePhase::Completed)
                }
                Event::JobMoveFailed {
                    job,
                    move_id,
                    cancelled,
                    ..
                } => phase(
                    move_id,
                    job,
                    if *cancelled {
                        MovePhase::Cancelled
                    } else {
                        MovePhase::Failed
                    },
                ),
                // A move starts, stops or resumes: the page draws itself again (a move's
                // page, for its own move only).
                Event::MoveStarted { move_id, .. }
                | Event::MoveCancelled { move_id, .. }
                | Event::MoveInterrupted { move_id, .. }
                | Event::MoveResumed { move_id, .. }
                    if only.as_deref().is_none_or(|m| m == move_id.as_str()) =>
                {
                    Sse::default().id(id).event("changed").data(
                        json!({ "move": move_id, "started": matches!(e, Event::MoveStarted { .. }) })
                            .to_string(),
                    )
                }
                _ => passed(id),
            };
            vec![sse]
        }
    }
}

//! The query micro service (`handoff-query`): answers from the views, never from the
//! stream. Replies are `{"ok": ..}` or `{"error": {"code", "reason", "message"}}`.
//!
//! | endpoint | request | answer |
//! |----------|---------|--------|
//! | `status` | `{}` | `{"checkpoint": N}` |
//! | `daemons` | `{}` | every daemon view |
//! | `daemon` | `{"daemon"}` | one daemon view |
//! | `assignments` | `{"daemon"}` | the jobs the daemon owns |
//! | `projects` | `{}` | every project view |
//! | `jobs` | `{"daemon"?, "project"?, "moving"?}` | job views |
//! | `job` | `{"job"}` | one job view |
//! | `moves` | `{}` | every move view, newest first |
//! | `move` | `{"move_id"}` | one move view |
//! | `history` | `{"job"}` or `{"daemon"}` | history entries, oldest first |
//! | `alerts` | `{"all"?}` | open alerts (with `all`, closed ones too), newest first |

use async_nats::service::ServiceExt;
use async_nats::Client;
use bytes::Bytes;
use futures::StreamExt;
use handoff_domain::state::Assignment;
use handoff_domain::DaemonId;
use handoff_protocol::api::query::{ByDaemon, ByJob, ByMove, Empty, History, Jobs as JobsFilter};
use handoff_protocol::api::MAX_REQUEST_BYTES;
use handoff_protocol::{subjects, ErrorBody, ErrorCode};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use tokio::sync::{oneshot, watch};

use crate::store::{SledStore, ViewStore};
use crate::views::{self, AssignmentView, DaemonView, HistoryEntry, JobView, MoveView};
use handoff_protocol::EventEnvelope;

pub const SERVICE_NAME: &str = "handoff-query";

const ENDPOINTS: &[&str] = &[
    "status",
    "daemons",
    "daemon",
    "assignments",
    "projects",
    "jobs",
    "job",
    "moves",
    "move",
    "history",
    "alerts",
];

/// The running query service.
pub struct QueryService {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl QueryService {
    pub async fn start(
        client: Client,
        store: SledStore,
        checkpoint: watch::Receiver<u64>,
    ) -> Result<Self, async_nats::Error> {
        let service = client
            .service_builder()
            .description(
                "handoff queries: daemons, jobs, moves and history from the projector's views",
            )
            .start(SERVICE_NAME, env!("CARGO_PKG_VERSION"))
            .await?;
        let group = service.group(subjects::QUERIES);
        let mut endpoints = Vec::new();
        for name in ENDPOINTS {
            let ep = group.endpoint(*name).await?;
            endpoints.push(ep.map(move |r| (*name, r)).boxed());
        }
        // A round trip through the server, which handles this connection's messages in
        // order: once the ping is answered, the endpoints' subscriptions are in place.
        client
            .request(format!("$SRV.PING.{SERVICE_NAME}"), bytes::Bytes::new())
            .await?;
        let (stop, mut stopped) = oneshot::channel();
        let task = tokio::spawn(async move {
            let mut requests = futures::stream::select_all(endpoints);
            loop {
                tokio::select! {
                    _ = &mut stopped => break,
                    next = requests.next() => {
                        let Some((name, request)) = next else { break };
                        let answer = match answer(&store, &checkpoint, name, &request.message.payload) {
                            Ok(v) => json!({ "ok": v }),
                            Err(e) => json!({ "error": e }),
                        };
                        let body = serde_json::to_vec(&answer).expect("json values serialize");
                        if let Err(e) = request.respond(Ok(Bytes::from(body))).await {
                            tracing::warn!(error = %e, "could not answer a query");
                        }
                    }
                }
            }
            // Ignored: stopping only unsubscribes; the task is ending either way.
            let _ = service.stop().await;
        });
        Ok(QueryService { stop, task })
    }

    pub async fn stop(self) {
        // Ignored: the task may have ended already, which is what we want.
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

/// Parses a query whose fields are all optional: an empty body is the default.
fn parse<T: DeserializeOwned + Default>(name: &str, payload: &[u8]) -> Result<T, ErrorBody> {
    if payload.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    parse_required(name, payload)
}

fn internal(e: impl std::fmt::Display) -> ErrorBody {
    ErrorBody::new(
        ErrorCode::Internal,
        "store",
        format!("the view store failed: {e}"),
    )
}

fn values(store: &SledStore, prefix: &[u8]) -> Result<Vec<Value>, ErrorBody> {
    store
        .scan(prefix)
        .map_err(internal)?
        .into_iter()
        .map(|(_, v)| serde_json::from_slice(&v).map_err(internal))
        .collect()
}

fn typed<T: DeserializeOwned>(v: Value) -> Result<T, ErrorBody> {
    serde_json::from_value(v).map_err(internal)
}

fn one(store: &SledStore, key: &[u8], kind: &str, id: &str) -> Result<Value, ErrorBody> {
    match store.get(key).map_err(internal)? {
        Some(v) => serde_json::from_slice(&v).map_err(internal),
        None => Err(ErrorBody::new(
            ErrorCode::NotFound,
            "not_found",
            format!("unknown {kind} {id}"),
        )),
    }
}

fn answer(
    store: &SledStore,
    checkpoint: &watch::Receiver<u64>,
    name: &str,
    payload: &[u8],
) -> Result<Value, ErrorBody> {
    match name {
        "status" => status(checkpoint, parse(name, payload)?),
        "daemons" => daemons(store, parse(name, payload)?),
        "projects" => projects(store, parse(name, payload)?),
        "daemon" => daemon(store, parse_required(name, payload)?),
        "assignments" => assignments(store, parse_required(name, payload)?),
        "jobs" => jobs(store, parse(name, payload)?),
        "job" => job(store, parse_required(name, payload)?),
        "alerts" => alerts(store, parse(name, payload)?),
        "moves" => moves(store, parse(name, payload)?),
        "move" => one_move(store, parse_required(name, payload)?),
        "history" => history(store, parse(name, payload)?),
        other => Err(ErrorBody::new(
            ErrorCode::NotFound,
            "unknown_query",
            format!("unknown query {other}"),
        )),
    }
}

fn status(checkpoint: &watch::Receiver<u64>, _: Empty) -> Result<Value, ErrorBody> {
    Ok(json!({ "checkpoint": *checkpoint.borrow() }))
}

fn daemons(store: &SledStore, _: Empty) -> Result<Value, ErrorBody> {
    Ok(Value::Array(values(store, &views::prefix(&["daemon"]))?))
}

fn projects(store: &SledStore, _: Empty) -> Result<Value, ErrorBody> {
    Ok(Value::Array(values(store, &views::prefix(&["project"]))?))
}

fn daemon(store: &SledStore, q: ByDaemon) -> Result<Value, ErrorBody> {
    one(
        store,
        &views::daemon_key(&q.daemon),
        "daemon",
        q.daemon.as_str(),
    )
}

fn assignments(store: &SledStore, q: ByDaemon) -> Result<Value, ErrorBody> {
    let daemon: DaemonView = typed(one(
        store,
        &views::daemon_key(&q.daemon),
        "daemon",
        q.daemon.as_str(),
    )?)?;
    let mut out = Vec::new();
    for j in &daemon.state.jobs {
        let job: JobView = typed(one(store, &views::job_key(j), "job", j.as_str())?)?;
        out.push(AssignmentView {
            daemon: q.daemon.clone(),
            job: j.clone(),
            epoch: job.state.epoch,
            moving_in: match job.state.assignment {
                Assignment::Moving { move_id, .. } => Some(move_id),
                Assignment::Assigned { .. } => None,
            },
        });
    }
    serde_json::to_value(out).map_err(internal)
}

fn jobs(store: &SledStore, f: JobsFilter) -> Result<Value, ErrorBody> {
    let mut out = Vec::new();
    for v in values(store, &views::prefix(&["job"]))? {
        let job: JobView = serde_json::from_value(v.clone()).map_err(internal)?;
        let moving = matches!(job.state.assignment, Assignment::Moving { .. });
        let involved = |d: &DaemonId| {
            job.owner == *d
                || matches!(&job.state.assignment, Assignment::Moving { from, .. } if from == d)
        };
        if f.daemon.as_ref().is_some_and(|d| !involved(d))
            || f.project.as_ref().is_some_and(|p| job.state.project != *p)
            || f.moving.is_some_and(|m| m != moving)
        {
            continue;
        }
        out.push(v);
    }
    Ok(Value::Array(out))
}

fn job(store: &SledStore, q: ByJob) -> Result<Value, ErrorBody> {
    one(store, &views::job_key(&q.job), "job", q.job.as_str())
}

fn alerts(store: &SledStore, q: handoff_protocol::api::query::Alerts) -> Result<Value, ErrorBody> {
    let mut alerts: Vec<views::AlertView> = values(store, &views::prefix(&["alert"]))?
        .into_iter()
        .map(|v| serde_json::from_value(v).map_err(internal))
        .filter(|a| !matches!(a, Ok(a) if !q.all && !views::AlertView::is_open(a)))
        .collect::<Result<_, _>>()?;
    alerts.sort_by_key(|a| std::cmp::Reverse(a.raised_seq));
    serde_json::to_value(alerts).map_err(internal)
}

fn moves(store: &SledStore, _: Empty) -> Result<Value, ErrorBody> {
    let mut moves: Vec<MoveView> = values(store, &views::prefix(&["move"]))?
        .into_iter()
        .map(|v| serde_json::from_value(v).map_err(internal))
        .collect::<Result<_, _>>()?;
    moves.sort_by(|a, b| b.move_id.cmp(&a.move_id));
    serde_json::to_value(moves).map_err(internal)
}

fn one_move(store: &SledStore, q: ByMove) -> Result<Value, ErrorBody> {
    one(
        store,
        &views::move_key(&q.move_id),
        "move",
        q.move_id.as_str(),
    )
}

fn history(store: &SledStore, q: History) -> Result<Value, ErrorBody> {
    let seqs: Vec<u64> = match (&q.job, &q.daemon) {
        (Some(j), None) => {
            typed::<JobView>(one(store, &views::job_key(j), "job", j.as_str())?)?.history
        }
        (None, Some(d)) => {
            let mut seqs = Vec::new();
            for (_, chunk) in store
                .scan(&views::prefix(&["hist", "daemon", d.as_str()]))
                .map_err(internal)?
            {
                seqs.extend(serde_json::from_slice::<Vec<u64>>(&chunk).map_err(internal)?);
            }
            seqs
        }
        _ => {
            return Err(ErrorBody::new(
                ErrorCode::Validation,
                "malformed",
                "history needs exactly one of job or daemon",
            ))
        }
    };
    serde_json::to_value(history_entries(store, seqs)?).map_err(internal)
}

/// The stored events at `seqs`, in that order.
fn history_entries(store: &SledStore, seqs: Vec<u64>) -> Result<Vec<HistoryEntry>, ErrorBody> {
    let mut entries = Vec::new();
    // The batch holding the last event looked up; histories often stay in one.
    let mut batch: Option<(Vec<u8>, Vec<u8>)> = None;
    for seq in seqs {
        let cached = batch
            .as_ref()
            .and_then(|(_, framed)| views::find_framed(framed, seq).map(<[u8]>::to_vec));
        let stored = match cached {
            Some(p) => p,
            None => {
                let k = views::events_key(seq);
                let framed = store.get(&k).map_err(internal)?.ok_or_else(|| {
                    internal(format!("history names event {seq}, which is not stored"))
                })?;
                let p = views::find_framed(&framed, seq)
                    .ok_or_else(|| {
                        internal(format!("history names event {seq}, which is not stored"))
                    })?
                    .to_vec();
                batch = Some((k, framed));
                p
            }
        };
        let e = EventEnvelope::decode(&stored).map_err(internal)?;
        entries.push(HistoryEntry {
            seq,
            at: e.at,
            actor: e.actor.to_string(),
            command: e.command,
            event: e.event,
        });
    }
    Ok(entries)
}

/// Parses a query whose fields are required (an empty body is malformed).
fn parse_required<T: DeserializeOwned>(name: &str, payload: &[u8]) -> Result<T, ErrorBody> {
    if payload.len() > MAX_REQUEST_BYTES {
        return Err(ErrorBody::new(
            ErrorCode::Validation,
            "too_large",
            format!(
                "query of {} bytes is larger than the limit of {MAX_REQUEST_BYTES}",
                payload.len()
            ),
        ));
    }
    serde_json::from_slice(payload).map_err(|e| {
        ErrorBody::new(
            ErrorCode::Validation,
            "malformed",
            format!("malformed {name} query: {e}"),
        )
    })
}

//! The query micro service (`handoff-query`): answers from the views, never from the
//! stream. Replies are `{"ok": ..}` or `{"error": {"code", "reason", "message"}}`.
//!
//! | endpoint | request | answer |
//! |----------|---------|--------|
//! | `status` | `{}` | `{"checkpoint": N}` |
//! | `daemons` | `{"status"?}` | a page of daemon views, by id |
//! | `daemon` | `{"daemon"}` | one daemon view |
//! | `assignments` | `{"daemon"}` | a page of the jobs the daemon owns, by id |
//! | `projects` | `{}` | a page of project views, by id |
//! | `jobs` | `{"daemon"?, "project"?, "moving"?}` | a page of job views, by id |
//! | `job` | `{"job"}` | one job view |
//! | `moves` | `{"status"?}` | a page of moves (their jobs counted by phase), newest first |
//! | `move` | `{"move_id"}` | one move view |
//! | `history` | `{"job"}` or `{"daemon"}` | a page of history entries, oldest first |
//! | `alerts` | `{"all"?, "type"?}` | a page of open alerts (with `all`, closed ones too), newest first |
//!
//! Every list takes `limit` and `cursor` and answers `{"items", "total", "next"?}`
//! ([`Page`]). A page reads the keys it returns from the views' indexes (a project's jobs
//! from the job records under its name, a history from its blocks), and its total from a
//! counter or, for a history, its job's or daemon's record ([`views`]), so its cost does
//! not grow with the fleet or the history; the one exception
//! is a total under two filters at once (`jobs` of a daemon *and* a project, say), which
//! counts the smaller list. A page stops early rather than outgrow the server's payload
//! limit; an answer that cannot fit (one record larger than the limit) is an error reply
//! saying so, never silence.

use async_nats::service::ServiceExt;
use async_nats::Client;
use bytes::Bytes;
use futures::StreamExt;
use handoff_domain::model::Liveness;
use handoff_domain::state::{Assignment, DaemonStatus};
use handoff_domain::DaemonId;
use handoff_protocol::api::query::{
    Alerts, Assignments, ByDaemon, ByJob, ByMove, DaemonFilter, Daemons, Empty, History,
    Jobs as JobsFilter, Moves, Projects, DEFAULT_LIMIT, MAX_LIMIT,
};
use handoff_protocol::api::MAX_REQUEST_BYTES;
use handoff_protocol::{subjects, ErrorBody, ErrorCode};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::{oneshot, watch};

use crate::store::{SledStore, ViewStore};
use crate::views::{self, AssignmentView, DaemonView, HistoryEntry, JobView, MoveView};
use handoff_protocol::views::MoveSummary;
use handoff_protocol::EventEnvelope;

mod page;

pub use page::fit;
use page::{too_large, List};

pub const SERVICE_NAME: &str = "handoff-query";

/// Bytes of a reply kept for its frame (`{"ok":{"items":[..],"total":..,"next":".."}}`,
/// the cursor, the service's headers): a page's items fill the payload limit less this.
const FRAME_BYTES: usize = 4096;

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
        for name in handoff_protocol::api::query::QUERIES {
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
                        // The server's limit as this connection learnt it.
                        let max = client.max_payload();
                        let q = Query { store: &store, budget: max.saturating_sub(FRAME_BYTES).max(max / 2), max };
                        let answer = match q.answer(&checkpoint, name, &request.message.payload) {
                            Ok(v) => json!({ "ok": v }),
                            Err(e) => json!({ "error": e }),
                        };
                        let body = fit(serde_json::to_vec(&answer).expect("json values serialize"), max);
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

fn not_found(kind: &str, id: &str) -> ErrorBody {
    ErrorBody::new(
        ErrorCode::NotFound,
        "not_found",
        format!("unknown {kind} {id}"),
    )
}

fn invalid(reason: &str, message: String) -> ErrorBody {
    ErrorBody::new(ErrorCode::Validation, reason, message)
}

/// One query's answer, from the store, within a budget of reply bytes.
struct Query<'a> {
    store: &'a SledStore,
    budget: usize,
    /// The server's payload limit.
    max: usize,
}

impl Query<'_> {
    fn answer(
        &self,
        checkpoint: &watch::Receiver<u64>,
        name: &str,
        payload: &[u8],
    ) -> Result<Value, ErrorBody> {
        match name {
            "status" => {
                let _: Empty = parse(name, payload)?;
                Ok(json!({ "checkpoint": *checkpoint.borrow() }))
            }
            "daemons" => self.daemons(parse(name, payload)?),
            "projects" => self.projects(parse(name, payload)?),
            "daemon" => {
                let q: ByDaemon = parse_required(name, payload)?;
                self.one(&views::daemon_key(&q.daemon), "daemon", q.daemon.as_str())
            }
            "assignments" => self.assignments(parse_required(name, payload)?),
            "jobs" => self.jobs(parse(name, payload)?),
            "job" => {
                let q: ByJob = parse_required(name, payload)?;
                self.one(&views::job_key(&q.job), "job", q.job.as_str())
            }
            "alerts" => self.alerts(parse(name, payload)?),
            "moves" => self.moves(parse(name, payload)?),
            "move" => {
                let q: ByMove = parse_required(name, payload)?;
                self.one(&views::move_key(&q.move_id), "move", q.move_id.as_str())
            }
            "history" => self.history(parse(name, payload)?),
            other => Err(ErrorBody::new(
                ErrorCode::NotFound,
                "unknown_query",
                format!("unknown query {other}"),
            )),
        }
    }

    fn get<T: DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, ErrorBody> {
        match self.store.get(key).map_err(internal)? {
            Some(v) => serde_json::from_slice(&v).map(Some).map_err(internal),
            None => Ok(None),
        }
    }

    /// The length of the history of the record at `key` (a job's or a daemon's).
    fn history_length(&self, key: &[u8], kind: &str, id: &str) -> Result<u64, ErrorBody> {
        #[derive(Deserialize)]
        struct Record {
            history_events: u64,
        }
        let stored = self
            .store
            .get(key)
            .map_err(internal)?
            .ok_or_else(|| not_found(kind, id))?;
        let r: Record = serde_json::from_slice(&stored).map_err(internal)?;
        Ok(r.history_events)
    }

    fn one(&self, key: &[u8], kind: &str, id: &str) -> Result<Value, ErrorBody> {
        let v: Value = self.get(key)?.ok_or_else(|| not_found(kind, id))?;
        let size = serde_json::to_vec(&v).map_err(internal)?.len();
        if size > self.budget {
            return Err(too_large(size, self.max));
        }
        Ok(v)
    }

    /// The length of the list under `prefix`, from its counter.
    fn count(&self, prefix: &[u8]) -> Result<u64, ErrorBody> {
        match self
            .store
            .get(&views::counter_key(prefix))
            .map_err(internal)?
        {
            None => Ok(0),
            Some(b) => <[u8; 8]>::try_from(b.as_slice())
                .map(u64::from_be_bytes)
                .map_err(|_| internal("a counter is not 8 bytes")),
        }
    }

    fn daemons(&self, q: Daemons) -> Result<Value, ErrorBody> {
        let prefix = views::prefix(&["daemon"]);
        let keep = |d: &DaemonView| match q.status {
            None => true,
            Some(DaemonFilter::Up) => d.status == DaemonStatus::Active(Liveness::Up),
            Some(DaemonFilter::Down) => d.status == DaemonStatus::Active(Liveness::Down),
            Some(DaemonFilter::Removed) => d.status == DaemonStatus::Removed,
        };
        // Daemons are few (a fleet has about a thousand): a filtered total counts them.
        let total = match q.status {
            None => self.count(&prefix)?,
            Some(_) => {
                let mut n = 0;
                for entry in self.store.range(&prefix, None, false) {
                    let (_, v) = entry.map_err(internal)?;
                    let d: DaemonView = serde_json::from_slice(&v).map_err(internal)?;
                    n += u64::from(keep(&d));
                }
                n
            }
        };
        let list = List {
            prefix,
            reverse: false,
            limit: q.limit,
            cursor: q.cursor.as_deref(),
        };
        self.page(list, total, |_, v| {
            let d: DaemonView = serde_json::from_slice(v).map_err(internal)?;
            Ok(keep(&d).then_some(d))
        })
    }

    fn projects(&self, q: Projects) -> Result<Value, ErrorBody> {
        let prefix = views::prefix(&["project"]);
        let total = self.count(&prefix)?;
        let list = List {
            prefix,
            reverse: false,
            limit: q.limit,
            cursor: q.cursor.as_deref(),
        };
        self.page(list, total, |_, v| {
            Ok(Some(serde_json::from_slice::<Value>(v).map_err(internal)?))
        })
    }

    /// The jobs a daemon owns: its view's set of jobs, from after the cursor.
    fn assignments(&self, q: Assignments) -> Result<Value, ErrorBody> {
        let daemon: DaemonView = self
            .get(&views::daemon_key(&q.daemon))?
            .ok_or_else(|| not_found("daemon", q.daemon.as_str()))?;
        // The daemon's index also holds the jobs moving away from it: those are left out.
        let list = List {
            prefix: views::prefix(&["ix", "daemon", q.daemon.as_str()]),
            reverse: false,
            limit: q.limit,
            cursor: q.cursor.as_deref(),
        };
        let jobs = views::prefix(&["job"]);
        let skip = list.prefix.len();
        self.page(list, daemon.jobs, |k, _| {
            let mut key = jobs.clone();
            key.extend_from_slice(&k[skip..]);
            let job: JobView = self
                .get(&key)?
                .ok_or_else(|| internal("an index names a job that has no view"))?;
            if job.owner != q.daemon {
                return Ok(None);
            }
            Ok(Some(AssignmentView {
                daemon: q.daemon.clone(),
                epoch: job.state.epoch,
                moving_in: match job.state.assignment {
                    Assignment::Moving { move_id, .. } => Some(move_id),
                    Assignment::Assigned { .. } => None,
                },
                job: job.job,
            }))
        })
    }

    /// Jobs from the smallest index the filters allow; the other filters apply to each.
    fn jobs(&self, f: JobsFilter) -> Result<Value, ErrorBody> {
        let by_daemon = f
            .daemon
            .as_ref()
            .map(|d| views::prefix(&["ix", "daemon", d.as_str()]));
        let moving_only = (f.moving == Some(true)).then(|| views::prefix(&["ix", "moving"]));
        let all = views::prefix(&["job"]);
        let mut candidates = Vec::new();
        for p in [by_daemon, moving_only].into_iter().flatten() {
            let n = self.count(&p)?;
            candidates.push((n, p));
        }
        // A project's jobs are the records under its name (a job's id starts with its
        // project's), counted apart.
        if let Some(p) = &f.project {
            let n = self.count(&views::prefix(&["ix", "project", p.as_str()]))?;
            candidates.push((n, views::project_jobs(p)));
        }
        candidates.sort();
        let (smallest, prefix) = match candidates.first() {
            Some((n, p)) => (*n, p.clone()),
            None => (self.count(&all)?, all.clone()),
        };
        let keep = |job: &JobView| {
            let moving = matches!(job.state.assignment, Assignment::Moving { .. });
            let involved = |d: &DaemonId| {
                job.owner == *d
                    || matches!(&job.state.assignment, Assignment::Moving { from, .. } if from == d)
            };
            !(f.daemon.as_ref().is_some_and(|d| !involved(d))
                || f.project.as_ref().is_some_and(|p| job.job.project() != *p)
                || f.moving.is_some_and(|m| m != moving))
        };
        let view = |k: &[u8], v: &[u8]| -> Result<JobView, ErrorBody> {
            if prefix.starts_with(&all) {
                return serde_json::from_slice(v).map_err(internal);
            }
            let id = &k[prefix.len()..];
            let mut key = all.clone();
            key.extend_from_slice(id);
            self.get(&key)?
                .ok_or_else(|| internal("an index names a job that has no view"))
        };
        let filters = [f.daemon.is_some(), f.project.is_some(), f.moving.is_some()]
            .iter()
            .filter(|b| **b)
            .count();
        let total = match (filters, f.moving) {
            (0, _) => smallest,
            (1, Some(true)) | (1, None) => smallest,
            // Not moving: every job but the moving ones.
            (1, Some(false)) => {
                smallest - self.count(&views::prefix(&["ix", "moving"]))?.min(smallest)
            }
            _ => {
                let mut n = 0;
                for entry in self.store.range(&prefix, None, false) {
                    let (k, v) = entry.map_err(internal)?;
                    n += u64::from(keep(&view(&k, &v)?));
                }
                n
            }
        };
        // A cursor is a job's id whichever list a page is read from: with two filters the
        // smaller list is chosen again for each page, and a project's jobs are the records
        // under `job\0<project>/`, whose keys hold the whole id too.
        let base = if prefix.starts_with(&all) {
            &all
        } else {
            &prefix
        };
        let after = page::decode_cursor(base, f.cursor.as_deref())?;
        // The job a cursor names is one of the list's, whichever list is read.
        let foreign = |a: &Vec<u8>| {
            let id = String::from_utf8_lossy(&a[base.len()..]);
            !a.starts_with(&prefix)
                || f.project
                    .as_ref()
                    .is_some_and(|p| !id.starts_with(&format!("{p}/")))
        };
        if after.as_ref().is_some_and(foreign) {
            return Err(invalid(
                "bad_cursor",
                format!(
                    "cursor {:?} names no job this list holds",
                    f.cursor.unwrap_or_default()
                ),
            ));
        }
        let entries = self
            .store
            .range(&prefix, after.as_deref(), false)
            .map(|e| e.map_err(internal));
        self.page_of(base, f.limit, total, entries, |k, v| {
            let job = view(k, v)?;
            Ok(keep(&job).then_some(job))
        })
    }

    fn alerts(&self, q: Alerts) -> Result<Value, ErrorBody> {
        let prefix = views::alert_index(!q.all, q.kind);
        let total = self.count(&prefix)?;
        let list = List {
            prefix,
            reverse: true,
            limit: q.limit,
            cursor: q.cursor.as_deref(),
        };
        let records = views::prefix(&["alert"]);
        self.page(list, total, |_, record| {
            let mut key = records.clone();
            key.extend_from_slice(record);
            let alert: Value = self
                .get(&key)?
                .ok_or_else(|| internal("an index names an alert that has no view"))?;
            Ok(Some(alert))
        })
    }

    fn moves(&self, q: Moves) -> Result<Value, ErrorBody> {
        let records = views::prefix(&["move"]);
        let prefix = match q.status {
            Some(s) => views::prefix(&["ix", "move", s.as_str()]),
            None => records.clone(),
        };
        let total = self.count(&prefix)?;
        let list = List {
            prefix: prefix.clone(),
            reverse: true,
            limit: q.limit,
            cursor: q.cursor.as_deref(),
        };
        self.page(list, total, |k, v| {
            let m: MoveView = if prefix == records {
                serde_json::from_slice(v).map_err(internal)?
            } else {
                let mut key = records.clone();
                key.extend_from_slice(&k[prefix.len()..]);
                self.get(&key)?
                    .ok_or_else(|| internal("an index names a move that has no view"))?
            };
            Ok(Some(MoveSummary::from(m)))
        })
    }

    fn history(&self, q: History) -> Result<Value, ErrorBody> {
        // A history's length is in its job's or daemon's record.
        let (prefix, total) = match (&q.job, &q.daemon) {
            (Some(j), None) => (
                views::job_history(j),
                self.history_length(&views::job_key(j), "job", j.as_str())?,
            ),
            (None, Some(d)) => (
                views::daemon_history(d),
                self.history_length(&views::daemon_key(d), "daemon", d.as_str())?,
            ),
            _ => {
                return Err(invalid(
                    "malformed",
                    "history needs exactly one of job or daemon".into(),
                ))
            }
        };
        // The cursor is the last event's sequence, as the key it would have on its own.
        let bad_cursor = || invalid("bad_cursor", "a history's cursor is a sequence".into());
        let after = match page::decode_cursor(&prefix, q.cursor.as_deref())? {
            None => None,
            Some(k) => Some(views::parse_number(&k[prefix.len()..]).ok_or_else(bad_cursor)?),
        };
        // The blocks from the one holding the next event on, each read as its events.
        let from = after
            .map(|s| views::history_block(s.saturating_add(1)))
            .filter(|b| *b > 0)
            .map(|b| views::history_block_key(&prefix, b - 1));
        let events = self
            .store
            .range(&prefix, from.as_deref(), false)
            .flat_map(|block| {
                let seqs = block.map_err(internal).and_then(|(k, v)| {
                    views::block_of_key(&prefix, &k)
                        .and_then(|b| views::unpack_seqs(b, &v))
                        .ok_or_else(|| internal("a history block is not whole sequences"))
                });
                let (seqs, failed) = match seqs {
                    Ok(seqs) => (seqs, None),
                    Err(e) => (Vec::new(), Some(Err(e))),
                };
                let events = seqs
                    .into_iter()
                    .filter(move |s| after.is_none_or(|a| *s > a))
                    .map(|s| Ok((views::history_block_key(&prefix, s), Vec::new())));
                failed.into_iter().chain(events)
            });
        // The chunk holding the last event looked up; histories often stay in one.
        let mut chunk: Option<Vec<u8>> = None;
        self.page_of(&prefix, q.limit, total, events, |k, _| {
            let seq = views::parse_number(&k[prefix.len()..])
                .ok_or_else(|| internal("a history key holds no sequence"))?;
            Ok(Some(self.entry(seq, &mut chunk)?))
        })
    }

    /// The stored event at `seq`.
    fn entry(&self, seq: u64, chunk: &mut Option<Vec<u8>>) -> Result<HistoryEntry, ErrorBody> {
        let missing = || internal(format!("history names event {seq}, which is not stored"));
        let cached = chunk
            .as_deref()
            .and_then(|framed| views::find_framed(framed, seq).map(<[u8]>::to_vec));
        let stored = match cached {
            Some(p) => p,
            None => {
                let framed = self
                    .store
                    .get(&views::events_key(seq))
                    .map_err(internal)?
                    .ok_or_else(missing)?;
                let p = views::find_framed(&framed, seq)
                    .ok_or_else(missing)?
                    .to_vec();
                *chunk = Some(framed);
                p
            }
        };
        let e = EventEnvelope::decode(&stored).map_err(internal)?;
        Ok(HistoryEntry {
            seq,
            at: e.at,
            actor: e.actor.to_string(),
            command: e.command,
            event: e.event,
        })
    }
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

//! The pages that read: daemons, jobs, moves (and one move), alerts and history.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::response::Response;
use futures::StreamExt;
use handoff_dataplane::store::Stores;
use handoff_domain::model::MovePhase;
use handoff_domain::state::Assignment;
use handoff_domain::JobId;
use handoff_protocol::api::query::{Page, Status};
use handoff_protocol::dataplane::SnapshotMeta;
use handoff_protocol::views::{
    AlertView, DaemonView, HistoryEntry, JobView, MoveStatus, MoveSummary, MoveView,
};
use serde_json::json;

use super::{enc, esc, link, more, table, table_with, Console, Filter, Live};
use crate::cmd::fleet::heartbeat_ages;
use crate::cmd::history::describe;
use crate::output::{bytes, name, time};
use crate::Failure;

/// The most jobs of one move the Moves page lists (the move's own page lists them all).
const JOBS_SHOWN: usize = 50;
/// The most moves in progress the Moves page lists with their jobs.
const IN_PROGRESS_SHOWN: u32 = 10;
/// The open alerts the Daemons page reads to count each daemon's.
const OPEN_ALERTS_READ: u32 = 200;
/// The most jobs a move's page lists.
const MOVE_JOBS_SHOWN: usize = 500;
/// How far before the views' checkpoint a live page's stream starts: the page's own query
/// may have been answered by another projector, a little behind the one asked for the
/// checkpoint. What the stream repeats, the script takes once.
const LAG_MARGIN: u64 = 1000;
/// The most snapshot lookups of a Jobs page at once.
const SNAPSHOT_LOOKUPS: usize = 8;

impl Console {
    /// Each job's newest snapshot, looked up in the snapshot index by the job's own keys
    /// (a few at once); none for all when the data plane's stores are not there.
    async fn last_snapshots(&self, jobs: &[JobView]) -> Vec<Option<SnapshotMeta>> {
        let stores = self
            .stores
            .get_or_try_init(|| Stores::bind(self.api.client.clone()))
            .await;
        let Ok(stores) = stores else {
            return vec![None; jobs.len()];
        };
        let ids: Vec<JobId> = jobs.iter().map(|j| j.job.clone()).collect();
        futures::stream::iter(ids)
            .map(|job| {
                let stores = stores.clone();
                async move {
                    match stores.snapshots(Some(&job)).await {
                        Ok(all) => all.into_iter().max_by_key(|m| m.taken_at_ms),
                        Err(e) => {
                            tracing::debug!(%job, error = %e, "no snapshot list");
                            None
                        }
                    }
                }
            })
            .buffered(SNAPSHOT_LOOKUPS)
            .collect()
            .await
    }

    /// The last event folded into the views, read before a live page's queries.
    async fn checkpoint(&self) -> Result<u64, Failure> {
        let s: Status = self.api.query("status", json!({})).await?;
        Ok(s.checkpoint)
    }

    /// A page's live stream: `path?query`, with the console's token, from a little
    /// before `checkpoint` (see [`LAG_MARGIN`]).
    fn live(&self, path: &str, query: &str, checkpoint: u64) -> Live {
        Live {
            url: format!(
                "{path}?{query}{}after={}&t={}",
                if query.is_empty() { "" } else { "&" },
                checkpoint.saturating_sub(LAG_MARGIN),
                self.live_token
            ),
            checkpoint,
        }
    }
}

/// A head-space bar with its words.
fn space_bar(free: u64, total: u64) -> String {
    let total_ = total.max(1);
    let used =
        (u128::from(total_.saturating_sub(free.min(total_))) * 100 / u128::from(total_)) as u32;
    format!(
        "<div class=\"bar\" title=\"{used}% used\"><div style=\"width:{used}%\"></div></div>{} free of {}",
        esc(&bytes(free)),
        esc(&bytes(total))
    )
}

/// How many open alerts are about each daemon or job, from the first page of open alerts
/// (a count shown as "at least" when there are more).
async fn open_alerts(c: &Console) -> (BTreeMap<String, u32>, bool) {
    let page: Result<Page<AlertView>, _> = c
        .api
        .query("alerts", json!({ "limit": OPEN_ALERTS_READ }))
        .await;
    match page {
        Ok(p) => {
            let mut by = BTreeMap::new();
            for a in &p.items {
                *by.entry(a.about.clone()).or_insert(0) += 1;
            }
            (by, p.next.is_some())
        }
        Err(e) => {
            tracing::warn!(error = %e, "the console could not read the open alerts");
            (BTreeMap::new(), false)
        }
    }
}

pub(super) async fn daemons(State(c): State<Arc<Console>>, Query(f): Query<Filter>) -> Response {
    let page: Page<DaemonView> = match c.page("daemons", json!({}), f.cursor).await {
        Ok(p) => p,
        Err(e) => return c.failed("Daemons", e).await,
    };
    let may_move = c.may_move().await.unwrap_or(false);
    let ages = heartbeat_ages(&c.api.client, &page.items).await;
    let (alerts, more_alerts) = open_alerts(&c).await;
    let rows = page.items.iter().zip(ages).map(|(d, age)| {
        let id = enc(d.daemon.as_str());
        let mut actions = format!("<a href=\"/history?daemon={id}\">history</a>");
        if may_move && d.jobs > 0 {
            let _ = write!(
                actions,
                " <a class=\"action\" data-action=\"move-all\" href=\"/move?daemon={id}\">Move all heads</a>\
                 <a class=\"action\" data-action=\"drain\" href=\"/drain?daemon={id}\">Drain</a>"
            );
        }
        let s = &d.settings;
        vec![
            link("/jobs", "daemon", d.daemon.as_str()),
            esc(&crate::cmd::fleet::status(d.status)),
            esc(&age.map_or("never".into(), |a| format!("{} ago", crate::output::age(a)))),
            match &d.drain {
                Some(drain) => format!("draining ({} moved)", drain.moved),
                None if s.assignment_enabled => "on".into(),
                None => "off".into(),
            },
            esc(&format!(
                "{} disk, {} workers, labels {}",
                name(&s.head_disk_type),
                s.num_workers,
                crate::cmd::fleet::labels(&s.labels)
            )),
            d.jobs.to_string(),
            space_bar(d.free_bytes, s.head_space_bytes),
            match alerts.get(d.daemon.as_str()) {
                Some(n) => format!(
                    "<a href=\"/alerts\">{}{n} open</a>",
                    if more_alerts { "at least " } else { "" }
                ),
                None => String::new(),
            },
            actions,
        ]
    });
    let content = table(
        &[
            "daemon",
            "liveness",
            "heartbeat",
            "assignment",
            "settings",
            "jobs",
            "head space",
            "alerts",
            "",
        ],
        rows,
    ) + &more(&page, "/daemons", "daemons");
    c.render("Daemons", &content, None).await
}

pub(super) async fn jobs(State(c): State<Arc<Console>>, Query(f): Query<Filter>) -> Response {
    let mut body = json!({});
    let mut filter = Vec::new();
    if let Some(d) = &f.daemon {
        body["daemon"] = json!(d);
        filter.push(format!("daemon={}", enc(d)));
    }
    if let Some(p) = &f.project {
        body["project"] = json!(p);
        filter.push(format!("project={}", enc(p)));
    }
    match f.state.as_deref() {
        Some("moving") => body["moving"] = json!(true),
        Some("assigned") => body["moving"] = json!(false),
        Some(other) => {
            let refusal = handoff_protocol::ErrorBody::new(
                handoff_protocol::ErrorCode::Validation,
                "malformed",
                format!("state {other:?}: a job is assigned or moving"),
            );
            return c.failed("Jobs", Failure::Refused(refusal)).await;
        }
        None => {}
    }
    if let Some(s) = &f.state {
        filter.push(format!("state={}", enc(s)));
    }
    let base = match filter.is_empty() {
        true => "/jobs".to_owned(),
        false => format!("/jobs?{}", filter.join("&amp;")),
    };
    let page: Page<JobView> = match c.page("jobs", body, f.cursor).await {
        Ok(p) => p,
        Err(e) => return c.failed("Jobs", e).await,
    };
    let may_move = c.may_move().await.unwrap_or(false);
    let snapshots = c.last_snapshots(&page.items).await;
    let rows = page.items.iter().zip(snapshots).map(|(j, snapshot)| {
        let moving = matches!(j.state.assignment, Assignment::Moving { .. });
        vec![
            link("/history", "job", j.job.as_str()),
            link("/jobs", "daemon", j.owner.as_str()),
            j.state.epoch.to_string(),
            esc(&match &j.state.assignment {
                Assignment::Assigned { .. } => "assigned".to_owned(),
                Assignment::Moving { to, phase, .. } => {
                    format!("moving to {to} ({})", name(phase))
                }
            }),
            esc(&bytes(j.state.size.head_size_bytes)),
            esc(&match snapshot {
                Some(meta) => format!(
                    "{} ago ({})",
                    crate::output::age(handoff_protocol::now_ms().saturating_sub(meta.taken_at_ms)),
                    bytes(meta.size_bytes)
                ),
                None => "none".into(),
            }),
            if may_move && !moving {
                format!(
                    "<a class=\"action\" data-action=\"move-head\" href=\"/move?job={}\">Move head</a>",
                    enc(j.job.as_str())
                )
            } else {
                String::new()
            },
        ]
    });
    let selected = |s: &str| {
        if f.state.as_deref() == Some(s) {
            " selected"
        } else {
            ""
        }
    };
    let form = format!(
        "<form action=\"/jobs\">daemon <input name=\"daemon\" size=\"36\" value=\"{}\"> \
         project <input name=\"project\" value=\"{}\"> state <select name=\"state\">\
         <option value=\"\">any</option><option{}>assigned</option><option{}>moving</option>\
         </select> <button>filter</button></form>",
        esc(f.daemon.as_deref().unwrap_or("")),
        esc(f.project.as_deref().unwrap_or("")),
        selected("assigned"),
        selected("moving"),
    );
    let content =
        form + &table(
            &[
                "job",
                "owner",
                "epoch",
                "state",
                "head",
                "last snapshot",
                "",
            ],
            rows,
        ) + &more(&page, &base, "jobs");
    c.render("Jobs", &content, None).await
}

/// A job's row of a move: its phase, and a progress bar the live updates fill.
fn job_row(move_id: &str, job: &str, phase: MovePhase) -> (String, Vec<String>) {
    (
        format!(
            " data-move=\"{}\" data-job=\"{}\"",
            esc(move_id),
            esc(job)
        ),
        vec![
            link("/history", "job", job),
            format!("<span class=\"phase\">{}</span>", esc(&name(&phase))),
            format!(
                "<progress class=\"progress\" max=\"1\" value=\"{}\"></progress> <span class=\"detail\"></span>",
                if phase == MovePhase::Completed { 1 } else { 0 }
            ),
        ],
    )
}

fn summary_row(m: &MoveSummary) -> Vec<String> {
    vec![
        format!(
            "<a href=\"/moves/{}\">{}</a>",
            enc(m.move_id.as_str()),
            esc(m.move_id.as_str())
        ),
        esc(&time(m.started_at)),
        esc(m.status.as_str()),
        esc(m.from.as_str()),
        esc(&match &m.spread {
            Some(_) => format!("spread (first {})", m.to),
            None => m.to.to_string(),
        }),
        esc(&m.actor),
        esc(m.reason.as_deref().unwrap_or("")),
    ]
}

pub(super) async fn moves(State(c): State<Arc<Console>>, Query(f): Query<Filter>) -> Response {
    let after = match c.checkpoint().await {
        Ok(s) => s,
        Err(e) => return c.failed("Moves", e).await,
    };
    let mut content = String::new();
    let first_page = f.cursor.is_none();
    if first_page {
        let running: Result<Page<MoveSummary>, _> = c
            .api
            .query(
                "moves",
                json!({ "status": "in_progress", "limit": IN_PROGRESS_SHOWN }),
            )
            .await;
        let running = match running {
            Ok(p) => p,
            Err(e) => return c.failed("Moves", e).await,
        };
        let _ = write!(content, "<h2>In progress ({})</h2>", running.total);
        let mut rows = Vec::new();
        for m in &running.items {
            let view: MoveView = match c.api.query("move", json!({ "move_id": m.move_id })).await {
                Ok(v) => v,
                Err(e) => return c.failed("Moves", e).await,
            };
            for (job, phase) in view.jobs.iter().take(JOBS_SHOWN) {
                let (attrs, mut cells) = job_row(view.move_id.as_str(), job.as_str(), *phase);
                cells.insert(
                    0,
                    format!(
                        "<a href=\"/moves/{}\">{}</a>",
                        enc(view.move_id.as_str()),
                        esc(view.move_id.as_str())
                    ),
                );
                rows.push((attrs, cells));
            }
        }
        content += &table_with(&["move", "job", "phase", "progress"], rows, "running");
        content.push_str("<span id=\"capped\"></span>");
    }
    let page: Page<MoveSummary> = match c.page("moves", json!({}), f.cursor).await {
        Ok(p) => p,
        Err(e) => return c.failed("Moves", e).await,
    };
    content += "<h2>All moves, newest first</h2>";
    content += &table(
        &["move", "started", "status", "from", "to", "by", "reason"],
        page.items.iter().map(summary_row),
    );
    content += &more(&page, "/moves", "moves");
    // The first page follows the moves; a later one stays as it was read.
    let live = first_page.then(|| c.live("/live/moves", "", after));
    c.render("Moves", &content, live).await
}

pub(super) async fn one_move(State(c): State<Arc<Console>>, Path(id): Path<String>) -> Response {
    let title = format!("Move {id}");
    let after = match c.checkpoint().await {
        Ok(s) => s,
        Err(e) => return c.failed(&title, e).await,
    };
    let view: MoveView = match c.api.query("move", json!({ "move_id": id })).await {
        Ok(v) => v,
        Err(e) => return c.failed(&title, e).await,
    };
    let mut content = format!(
        "<p>status <b id=\"status\">{}</b> &middot; from {} to {} &middot; {} of {} job(s) started \
         &middot; by {} at {}{}</p>",
        esc(view.status.as_str()),
        link("/jobs", "daemon", view.from.as_str()),
        match &view.spread {
            Some(_) => "any eligible daemon (spread)".to_owned(),
            None => link("/jobs", "daemon", view.to.as_str()),
        },
        view.jobs.len(),
        view.planned,
        esc(&view.actor),
        esc(&time(view.started_at)),
        view.reason
            .as_deref()
            .map_or(String::new(), |r| format!(": <q>{}</q>", esc(r))),
    );
    if let Some(cancel) = &view.cancelled {
        let _ = write!(
            content,
            "<p>cancelled by {} at {}: <q>{}</q></p>",
            esc(&cancel.by),
            esc(&time(cancel.at)),
            esc(&cancel.reason)
        );
    }
    let rows = view
        .jobs
        .iter()
        .take(MOVE_JOBS_SHOWN)
        .map(|(job, phase)| job_row(view.move_id.as_str(), job.as_str(), *phase));
    content += &table_with(&["job", "phase", "progress"], rows, "jobs");
    if view.jobs.len() > MOVE_JOBS_SHOWN {
        // The script then draws the page again now and then as jobs not shown end.
        content.push_str("<span id=\"capped\"></span>");
    }
    if view.jobs.len() > MOVE_JOBS_SHOWN {
        let _ = write!(
            content,
            "<p>the first {MOVE_JOBS_SHOWN} of {} jobs (`handoff move {}` lists them all)</p>",
            view.jobs.len(),
            esc(view.move_id.as_str())
        );
    }
    let running = matches!(
        view.status,
        MoveStatus::InProgress | MoveStatus::Interrupted
    );
    if running && view.cancelled.is_none() && c.may_move().await.unwrap_or(false) {
        let _ = write!(
            content,
            "<form method=\"post\" action=\"/cancel\">{}<input type=\"hidden\" name=\"move_id\" value=\"{}\">\
             <label>reason <input name=\"reason\" required size=\"40\"></label>\
             <button data-action=\"cancel\">Cancel this move</button></form>",
            c.token_field(),
            esc(view.move_id.as_str())
        );
    }
    let live = running.then(|| {
        c.live(
            "/live/moves",
            &format!("move={}", enc(view.move_id.as_str())),
            after,
        )
    });
    c.render(&title, &content, live).await
}

pub(super) async fn alerts(State(c): State<Arc<Console>>, Query(f): Query<Filter>) -> Response {
    let page: Page<AlertView> = match c.page("alerts", json!({ "all": true }), f.cursor).await {
        Ok(p) => p,
        Err(e) => return c.failed("Alerts", e).await,
    };
    let rows = page.items.iter().map(|a| {
        vec![
            esc(a.kind.as_str()),
            esc(&a.about),
            esc(&a.detail),
            esc(&time(a.raised_at)),
            esc(&a.closed_at.map(time).unwrap_or_else(|| "open".into())),
        ]
    });
    let content = table(&["alert", "about", "detail", "raised", "closed"], rows)
        + &more(&page, "/alerts", "alerts");
    c.render("Alerts", &content, None).await
}

pub(super) async fn history(State(c): State<Arc<Console>>, Query(f): Query<Filter>) -> Response {
    let (key, value, body) = match (&f.job, &f.daemon) {
        (Some(j), _) => ("job", j, json!({ "job": j })),
        (None, Some(d)) => ("daemon", d, json!({ "daemon": d })),
        (None, None) => {
            let form = "<form action=\"/history\"><label>job <input name=\"job\"></label> \
                        <button>show</button></form><form action=\"/history\"><label>daemon \
                        <input name=\"daemon\" size=\"40\"></label> <button>show</button></form>";
            return c.render("History", form, None).await;
        }
    };
    let title = format!("History of {value}");
    let base = format!("/history?{key}={}", enc(value));
    let after = match c.checkpoint().await {
        Ok(s) => s,
        Err(e) => return c.failed(&title, e).await,
    };
    let page: Page<HistoryEntry> = match c.page("history", body, f.cursor).await {
        Ok(p) => p,
        Err(e) => return c.failed(&title, e).await,
    };
    let rows = page.items.iter().map(|e| {
        (
            format!(" data-seq=\"{}\"", e.seq),
            vec![
                e.seq.to_string(),
                esc(&time(e.at)),
                esc(&e.actor),
                esc(e.event.type_name()),
                esc(&describe(&e.event)),
            ],
        )
    });
    let content = table_with(&["#", "at", "by", "event", "what"], rows, "entries")
        + &more(&page, &base, "events");
    // The last page grows as events come.
    let live = page
        .next
        .is_none()
        .then(|| c.live("/live/history", &format!("{key}={}", enc(value)), after));
    c.render(&title, &content, live).await
}

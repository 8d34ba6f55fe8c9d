//! `handoff web`: the console in a browser, served by this process as the user whose
//! credentials it was started with (named on every page). Each page is rendered on the
//! server from the same queries the CLI reads, a page of a list at a time; every text it
//! shows is escaped, so nothing a daemon id, a reason or a label holds can run as script.
//! So far the pages read: daemons, jobs, moves, alerts and history.
//!
//! Every request passes [`guard`] first: its `Host` must be this console's own (a page
//! elsewhere cannot read it through DNS rebinding), at most [`CONCURRENT`] are served at
//! once, each within [`REQUEST_TIMEOUT`], and every answer forbids framing, caching,
//! sniffing and any script (`Content-Security-Policy`).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;

use std::time::Duration;

use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::get;
use clap::Args;
use handoff_protocol::api::query::Page;
use handoff_protocol::views::{AlertView, DaemonView, HistoryEntry, JobView, MoveSummary};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::cmd::history::describe;
use crate::cmd::Paging;
use crate::output::{bytes, time};
use crate::{Context, Failure};

#[derive(Debug, Args)]
pub struct WebArgs {
    /// Where to serve the console. Loopback by default: it acts as your user.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
}

/// The most requests served at once; more wait their turn.
const CONCURRENT: usize = 64;
/// The longest a request may take (a query waits up to 30 s for its answer).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(35);

struct Console {
    api: crate::client::Api,
    /// Who the console acts as.
    user: String,
}

/// What every request passes through: see the module's documentation.
struct Guard {
    /// The `Host` values this console answers to.
    hosts: Vec<String>,
    permits: tokio::sync::Semaphore,
}

/// What a list page may be asked for in its address (an empty value counts as none).
#[derive(Debug, Default, Deserialize)]
struct Filter {
    #[serde(default, deserialize_with = "non_empty")]
    cursor: Option<String>,
    #[serde(default, deserialize_with = "non_empty")]
    daemon: Option<String>,
    #[serde(default, deserialize_with = "non_empty")]
    project: Option<String>,
    #[serde(default, deserialize_with = "non_empty")]
    job: Option<String>,
}

fn non_empty<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let v: Option<String> = Option::deserialize(d)?;
    Ok(v.filter(|s| !s.trim().is_empty()))
}

pub async fn web(ctx: &Context, a: WebArgs) -> Result<(), Failure> {
    let Some(creds) = &ctx.creds else {
        return Err(Failure::Usage(
            "the console acts as a user: give its credentials (--creds or HANDOFF_CREDS)".into(),
        ));
    };
    let api = ctx.api().await?;
    let console = Arc::new(Console {
        api,
        user: creds.user.to_string(),
    });
    let listener = tokio::net::TcpListener::bind(a.listen)
        .await
        .map_err(|e| Failure::Usage(format!("--listen {}: {e}", a.listen)))?;
    let bound = listener.local_addr()?;
    if !bound.ip().is_loopback() {
        tracing::warn!(%bound, "the console listens beyond this machine: anyone who reaches it reads the fleet as you");
    }
    let port = bound.port();
    let guard = Arc::new(Guard {
        hosts: vec![
            bound.to_string(),
            format!("localhost:{port}"),
            format!("127.0.0.1:{port}"),
            format!("[::1]:{port}"),
        ],
        permits: tokio::sync::Semaphore::new(CONCURRENT),
    });
    let app = axum::Router::new()
        .route("/", get(|| async { Redirect::to("/daemons") }))
        .route("/daemons", get(daemons))
        .route("/jobs", get(jobs))
        .route("/moves", get(moves))
        .route("/alerts", get(alerts))
        .route("/history", get(history))
        .with_state(console)
        .layer(axum::middleware::from_fn_with_state(guard, guarded));
    println!("console at http://{bound}/");
    axum::serve(listener, app)
        .with_graceful_shutdown(crate::shutdown_signal())
        .await
        .map_err(|e| Failure::Usage(format!("the console stopped: {e}")))
}

/// Refuses a request for another host, waits for a permit, bounds the time, and adds the
/// security headers to whatever is answered.
async fn guarded(State(guard): State<Arc<Guard>>, request: Request, next: Next) -> Response {
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default()
        .to_ascii_lowercase();
    let mut response = if !guard.hosts.contains(&host) {
        (
            StatusCode::MISDIRECTED_REQUEST,
            "this console answers only to its own address",
        )
            .into_response()
    } else {
        match guard.permits.acquire().await {
            Err(_) => StatusCode::SERVICE_UNAVAILABLE.into_response(),
            Ok(_permit) => match tokio::time::timeout(REQUEST_TIMEOUT, next.run(request)).await {
                Ok(r) => r,
                Err(_) => (
                    StatusCode::GATEWAY_TIMEOUT,
                    "handoff took too long to answer",
                )
                    .into_response(),
            },
        }
    };
    let headers = response.headers_mut();
    for (name, value) in [
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::CACHE_CONTROL, "no-store"),
        (header::X_FRAME_OPTIONS, "DENY"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

/// Text made safe for HTML, in element content and in quoted attributes alike.
pub fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A query parameter's value, percent-encoded.
fn enc(text: &str) -> String {
    let mut out = String::new();
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

impl Console {
    async fn page<T: DeserializeOwned>(
        &self,
        query: &str,
        body: Value,
        cursor: Option<String>,
    ) -> Result<Page<T>, Failure> {
        let paging = Paging {
            cursor,
            ..Paging::default()
        };
        self.api.list(query, body, &paging).await
    }

    /// The whole page: the navigation, who the console acts as, the content.
    fn render(&self, title: &str, content: &str) -> Response {
        let mut html = String::new();
        let _ = write!(
            html,
            "<!doctype html><html><head><meta charset=\"utf-8\"><title>handoff: {t}</title>\
             <style>body{{font-family:sans-serif;margin:1.5em}}table{{border-collapse:collapse}}\
             td,th{{border-bottom:1px solid #ddd;padding:.3em .6em;text-align:left}}\
             nav a{{margin-right:1em}}.bar{{background:#eee;width:10em;height:.8em}}\
             .bar>div{{background:#48c;height:100%}}</style></head><body>\
             <nav><a href=\"/daemons\">Daemons</a><a href=\"/jobs\">Jobs</a>\
             <a href=\"/moves\">Moves</a><a href=\"/alerts\">Alerts</a>\
             <a href=\"/history\">History</a><span id=\"user\">signed in as <b>{u}</b></span></nav>\
             <h1>{t}</h1>{content}</body></html>",
            t = esc(title),
            u = esc(&self.user),
        );
        Html(html).into_response()
    }

    /// A query's failure: handoff's refusal said as it is (not found, invalid), anything
    /// else as a gateway error whose detail goes to the log, not to the page.
    fn failed(&self, title: &str, failure: Failure) -> Response {
        let (status, said) = match &failure {
            Failure::Refused(e) => (
                match e.code {
                    handoff_protocol::ErrorCode::NotFound => StatusCode::NOT_FOUND,
                    handoff_protocol::ErrorCode::Validation => StatusCode::BAD_REQUEST,
                    _ => StatusCode::BAD_GATEWAY,
                },
                e.message.clone(),
            ),
            Failure::Usage(detail) => {
                tracing::warn!(%detail, page = title, "a page could not be read");
                (
                    StatusCode::BAD_GATEWAY,
                    "handoff could not be read just now; try again".to_owned(),
                )
            }
        };
        let mut page = self.render(title, &format!("<p class=\"error\">{}</p>", esc(&said)));
        *page.status_mut() = status;
        page
    }
}

/// A table: its header, then each row's cells (already escaped HTML).
fn table(header: &[&str], rows: impl IntoIterator<Item = Vec<String>>) -> String {
    let mut html = String::from("<table><tr>");
    for h in header {
        let _ = write!(html, "<th>{}</th>", esc(h));
    }
    html.push_str("</tr>");
    for row in rows {
        html.push_str("<tr>");
        for cell in row {
            let _ = write!(html, "<td>{cell}</td>");
        }
        html.push_str("</tr>");
    }
    html.push_str("</table>");
    html
}

/// How much of the list is shown, and a link to the next page (`base`: this page's
/// address with its filter, already encoded).
fn more<T>(page: &Page<T>, base: &str, what: &str) -> String {
    let mut html = format!("<p>{} of {} {}", page.items.len(), page.total, esc(what));
    if let Some(next) = &page.next {
        let join = if base.contains('?') { "&amp;" } else { "?" };
        let _ = write!(
            html,
            " &middot; <a href=\"{}{join}cursor={}\">next page</a>",
            base,
            enc(next)
        );
    }
    html.push_str("</p>");
    html
}

fn link(path: &str, key: &str, value: &str) -> String {
    format!("<a href=\"{path}?{key}={}\">{}</a>", enc(value), esc(value))
}

async fn daemons(State(c): State<Arc<Console>>, Query(f): Query<Filter>) -> Response {
    let page: Page<DaemonView> = match c.page("daemons", json!({}), f.cursor).await {
        Ok(p) => p,
        Err(e) => return c.failed("Daemons", e),
    };
    let rows = page.items.iter().map(|d| {
        let total = d.settings.head_space_bytes.max(1);
        let used = (u128::from(d.used_bytes.min(total)) * 100 / u128::from(total)) as u32;
        vec![
            link("/jobs", "daemon", d.daemon.as_str()),
            esc(&crate::cmd::fleet::status(d.status)),
            match &d.drain {
                Some(drain) => format!("draining ({} moved)", drain.moved),
                None if d.settings.assignment_enabled => "on".into(),
                None => "off".into(),
            },
            d.jobs.to_string(),
            format!(
                "<div class=\"bar\" title=\"{used}% used\"><div style=\"width:{used}%\"></div></div>{} free of {}",
                esc(&bytes(d.free_bytes)),
                esc(&bytes(d.settings.head_space_bytes))
            ),
            link("/history", "daemon", d.daemon.as_str()),
        ]
    });
    let content = table(
        &[
            "daemon",
            "liveness",
            "assignment",
            "jobs",
            "head space",
            "history",
        ],
        rows,
    ) + &more(&page, "/daemons", "daemons");
    c.render("Daemons", &content)
}

async fn jobs(State(c): State<Arc<Console>>, Query(f): Query<Filter>) -> Response {
    let mut body = json!({});
    let mut base = "/jobs".to_owned();
    if let Some(d) = &f.daemon {
        body["daemon"] = json!(d);
        base = format!("/jobs?daemon={}", enc(d));
    } else if let Some(p) = &f.project {
        body["project"] = json!(p);
        base = format!("/jobs?project={}", enc(p));
    }
    let page: Page<JobView> = match c.page("jobs", body, f.cursor).await {
        Ok(p) => p,
        Err(e) => return c.failed("Jobs", e),
    };
    let rows = page.items.iter().map(|j| {
        vec![
            link("/history", "job", j.job.as_str()),
            link("/jobs", "daemon", j.owner.as_str()),
            j.state.epoch.to_string(),
            esc(&match &j.state.assignment {
                handoff_domain::state::Assignment::Assigned { .. } => "assigned".to_owned(),
                handoff_domain::state::Assignment::Moving { to, phase, .. } => {
                    format!("moving to {to} ({})", crate::output::name(phase))
                }
            }),
            esc(&bytes(j.state.size.head_size_bytes)),
        ]
    });
    let content =
        table(&["job", "owner", "epoch", "state", "head"], rows) + &more(&page, &base, "jobs");
    c.render("Jobs", &content)
}

async fn moves(State(c): State<Arc<Console>>, Query(f): Query<Filter>) -> Response {
    let page: Page<MoveSummary> = match c.page("moves", json!({}), f.cursor).await {
        Ok(p) => p,
        Err(e) => return c.failed("Moves", e),
    };
    let rows = page.items.iter().map(|m| {
        vec![
            esc(m.move_id.as_str()),
            esc(&time(m.started_at)),
            esc(&crate::output::name(&m.status)),
            esc(m.from.as_str()),
            esc(m.to.as_str()),
            esc(&m.actor),
            esc(m.reason.as_deref().unwrap_or("")),
        ]
    });
    let content = table(
        &["move", "started", "status", "from", "to", "by", "reason"],
        rows,
    ) + &more(&page, "/moves", "moves");
    c.render("Moves", &content)
}

async fn alerts(State(c): State<Arc<Console>>, Query(f): Query<Filter>) -> Response {
    let page: Page<AlertView> = match c.page("alerts", json!({ "all": true }), f.cursor).await {
        Ok(p) => p,
        Err(e) => return c.failed("Alerts", e),
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
    c.render("Alerts", &content)
}

async fn history(State(c): State<Arc<Console>>, Query(f): Query<Filter>) -> Response {
    let (key, value, body) = match (&f.job, &f.daemon) {
        (Some(j), _) => ("job", j, json!({ "job": j })),
        (None, Some(d)) => ("daemon", d, json!({ "daemon": d })),
        (None, None) => {
            let form = "<form action=\"/history\"><label>job <input name=\"job\"></label> \
                        <button>show</button></form><form action=\"/history\"><label>daemon \
                        <input name=\"daemon\" size=\"40\"></label> <button>show</button></form>";
            return c.render("History", form);
        }
    };
    let title = format!("History of {value}");
    let base = format!("/history?{key}={}", enc(value));
    let page: Page<HistoryEntry> = match c.page("history", body, f.cursor).await {
        Ok(p) => p,
        Err(e) => return c.failed(&title, e),
    };
    let rows = page.items.iter().map(|e| {
        vec![
            e.seq.to_string(),
            esc(&time(e.at)),
            esc(&e.actor),
            esc(e.event.type_name()),
            esc(&describe(&e.event)),
        ]
    });
    let content = table(&["#", "at", "by", "event", "what"], rows) + &more(&page, &base, "events");
    c.render(&title, &content)
}

#[cfg(test)]
mod tests {
    use super::{enc, esc};

    #[test]
    fn escaping_leaves_no_markup() {
        assert_eq!(
            esc(r#"<a href="x" onclick='y'>&</a>"#),
            "&lt;a href=&quot;x&quot; onclick=&#39;y&#39;&gt;&amp;&lt;/a&gt;"
        );
        assert_eq!(esc("backup1:/data/"), "backup1:/data/");
    }

    #[test]
    fn query_values_are_percent_encoded() {
        assert_eq!(enc("sales/orders"), "sales%2Forders");
        assert_eq!(enc("a b&c=\"<"), "a%20b%26c%3D%22%3C");
        assert_eq!(enc("Ab-_.~9"), "Ab-_.~9");
    }
}

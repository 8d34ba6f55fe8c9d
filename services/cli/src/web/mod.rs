//! `handoff web`: the console in a browser, served by this process as the user whose
//! credentials it was started with (named, with their roles, on every page). Each page is
//! rendered on the server from the same queries the CLI reads, a page of a list at a
//! time; every text it shows is escaped, so nothing a daemon id, a reason or a label holds
//! can run as script.
//!
//! - [`pages`]: daemons, jobs, moves (and one move), alerts, history.
//! - [`actions`]: Move head, Move all heads and Drain: a form, the dry run's plan, then the
//!   command itself, signed as the console's user and refused exactly as the CLI's would
//!   be. Every change is a POST carrying the console's CSRF token.
//! - [`live`]: server-sent events from the stream, which the one script of the console
//!   (`/console.js`) folds into the page: phases, rebuild progress, history entries.
//!
//! Every request passes [`guarded`] first: its `Host` must be this console's own (a page
//! elsewhere cannot read it through DNS rebinding), a POST must come from this console's
//! own pages, at most [`CONCURRENT`] are served at once, each within [`REQUEST_TIMEOUT`],
//! and every answer forbids framing, caching, sniffing and any script but the console's.

mod actions;
mod guard;
mod live;
mod pages;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::DefaultBodyLimit;
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use clap::Args;
use handoff_domain::model::Role;
use handoff_domain::{Actor, Aggregate, Event};
use handoff_protocol::api::query::Page;
use handoff_protocol::{subjects, ErrorCode};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;
use tokio::sync::{watch, Semaphore};

use guard::{guarded, host_names, Guard};

use crate::cmd::Paging;
use crate::{Context, Failure};

#[derive(Debug, Args)]
pub struct WebArgs {
    /// Where to serve the console. Loopback by default: it acts as your user.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Another name the console answers to (`Host`), as `name` or `name:port` (the
    /// listening port when none is given): its address behind a proxy, or this host's
    /// name when it listens beyond loopback. Repeatable.
    #[arg(long = "host", value_name = "NAME")]
    pub hosts: Vec<String>,
}

/// The most requests served at once; more wait their turn.
const CONCURRENT: usize = 64;
/// The longest a request may take (a query waits up to 30 s for its answer).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(35);
/// How long a stop waits for the requests in flight before it drops them.
const STOP_WITHIN: Duration = Duration::from_secs(5);
/// The most live streams open at once (each follows the event stream).
const LIVE_STREAMS: usize = 32;
/// The largest form a POST may carry.
const FORM_LIMIT: usize = 16 * 1024;
/// How long the user's roles, read from the stream, are taken as they are.
const ROLES_FOR: Duration = Duration::from_secs(5);
/// The longest a read of the roles may take.
const ROLES_WITHIN: Duration = Duration::from_secs(5);

/// The console's script: the live updates (no inline script runs on these pages).
const SCRIPT: &str = include_str!("console.js");

struct Console {
    api: crate::client::Api,
    /// Who the console acts as.
    user: Actor,
    /// The token every form carries: a page of another site cannot read it.
    token: String,
    /// The token of the live streams' addresses (apart from the forms', as an address
    /// may end up in a proxy's log).
    live_token: String,
    /// The user's roles as last read, and when.
    roles: Mutex<Option<(Instant, Vec<Role>)>>,
    /// Reads the roles one request at a time.
    reading_roles: tokio::sync::Mutex<()>,
    /// Permits for live streams.
    live: Arc<Semaphore>,
    /// Turns true when the console stops: live streams end.
    stopping: watch::Receiver<bool>,
    /// The data plane's stores, once bound (for the jobs' last snapshots).
    stores: tokio::sync::OnceCell<handoff_dataplane::store::Stores>,
}

/// A console serving in this process.
pub struct Served {
    pub addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Served {
    /// Stops serving: live streams end, requests in flight finish (those still going
    /// after [`STOP_WITHIN`] are dropped).
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let mut task = self.task;
        if tokio::time::timeout(STOP_WITHIN, &mut task).await.is_err() {
            tracing::warn!("the console's requests did not finish in time: dropped");
            task.abort();
        }
    }
}

pub async fn web(ctx: &Context, a: WebArgs) -> Result<(), Failure> {
    let api = ctx.api().await?;
    let served = serve(api, a.listen, &a.hosts).await?;
    println!("console at http://{}/", served.addr);
    crate::shutdown_signal().await;
    served.stop().await;
    Ok(())
}

/// Serves the console on `listen` as the user of `api`'s credentials, answering to its
/// own address, `localhost` and the `hosts` given.
pub async fn serve(
    api: crate::client::Api,
    listen: SocketAddr,
    hosts: &[String],
) -> Result<Served, Failure> {
    let user = match &api.creds {
        Some(c) => c.user.clone(),
        None => {
            return Err(Failure::Usage(
                "the console acts as a user: give its credentials (--creds or HANDOFF_CREDS)"
                    .into(),
            ))
        }
    };
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| Failure::Usage(format!("--listen {listen}: {e}")))?;
    let addr = listener.local_addr()?;
    if !addr.ip().is_loopback() {
        tracing::warn!(%addr, "the console listens beyond this machine: anyone who reaches it acts as you");
    }
    let (stop, stopping) = watch::channel(false);
    let console = Arc::new(Console {
        api,
        user,
        token: random_token()?,
        live_token: random_token()?,
        roles: Mutex::new(None),
        reading_roles: tokio::sync::Mutex::new(()),
        live: Arc::new(Semaphore::new(LIVE_STREAMS)),
        stopping: stopping.clone(),
        stores: tokio::sync::OnceCell::new(),
    });
    let port = addr.port();
    let mut names = vec![
        addr.to_string(),
        format!("localhost:{port}"),
        format!("127.0.0.1:{port}"),
        format!("[::1]:{port}"),
    ];
    for h in hosts {
        names.extend(host_names(h, port)?);
    }
    let guard = Arc::new(Guard {
        hosts: names,
        permits: Semaphore::new(CONCURRENT),
    });
    let app = axum::Router::new()
        .route("/", get(|| async { Redirect::to("/daemons") }))
        .route("/console.js", get(script))
        .route("/daemons", get(pages::daemons))
        .route("/jobs", get(pages::jobs))
        .route("/moves", get(pages::moves))
        .route("/moves/{id}", get(pages::one_move))
        .route("/alerts", get(pages::alerts))
        .route("/history", get(pages::history))
        .route("/move", get(actions::move_form))
        .route("/drain", get(actions::drain_form))
        .route("/plan", post(actions::plan))
        .route("/confirm", post(actions::confirm))
        .route("/cancel", post(actions::cancel))
        .route("/live/moves", get(live::moves))
        .route("/live/history", get(live::history))
        .with_state(console)
        .layer(DefaultBodyLimit::max(FORM_LIMIT))
        .layer(axum::middleware::from_fn_with_state(guard, guarded));
    let mut until = stopping;
    let task = tokio::spawn(async move {
        let stopped = async move {
            let _ = until.wait_for(|s| *s).await;
        };
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(stopped)
            .await
        {
            tracing::error!(error = %e, "the console stopped");
        }
    });
    Ok(Served { addr, stop, task })
}

/// 256 bits from the system's random source, in hex.
fn random_token() -> Result<String, Failure> {
    use std::io::Read;
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| Failure::Usage(format!("cannot read /dev/urandom: {e}")))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

async fn script() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        SCRIPT,
    )
        .into_response()
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

/// A page's live updates: the address of its stream, and the last event its views held
/// (what the stream repeats up to there changes nothing on the page).
struct Live {
    url: String,
    checkpoint: u64,
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

    /// The user's roles, read from the user's own subject of the stream (a few seconds
    /// old at most; one reader at a time). Only what the console offers follows them: the
    /// command service decides. `None` when they could not be read and none are known.
    async fn roles(&self) -> Option<Vec<Role>> {
        let fresh = |held: &Option<(Instant, Vec<Role>)>| {
            held.as_ref()
                .filter(|(at, _)| at.elapsed() < ROLES_FOR)
                .map(|(_, roles)| roles.clone())
        };
        if let Some(roles) = fresh(&self.roles.lock().expect("roles lock")) {
            return Some(roles);
        }
        let stale = || {
            self.roles
                .lock()
                .expect("roles lock")
                .as_ref()
                .map(|(_, roles)| roles.clone())
        };
        // One reader at a time: the others take what is known.
        let Ok(_reading) = self.reading_roles.try_lock() else {
            return stale();
        };
        let subject = subjects::aggregate(&Aggregate::User(self.user.clone()));
        let read = async {
            let log = self.api.log().await?;
            let mut roles = Vec::new();
            for r in log
                .events_of(&subject)
                .await
                .map_err(|e| Failure::Usage(e.to_string()))?
            {
                match r.envelope.event {
                    Event::UserAdded { roles: r, .. } => roles = r.into_iter().collect(),
                    Event::UserRemoved { .. } => roles.clear(),
                    _ => {}
                }
            }
            Ok::<_, Failure>(roles)
        };
        match tokio::time::timeout(ROLES_WITHIN, read)
            .await
            .unwrap_or_else(|_| Err(Failure::Usage("timed out".into())))
        {
            Ok(roles) => {
                *self.roles.lock().expect("roles lock") = Some((Instant::now(), roles.clone()));
                Some(roles)
            }
            Err(e) => {
                tracing::warn!(error = %e, "the console could not read its user's roles");
                // What was known stays known until it can be read again.
                stale()
            }
        }
    }

    /// Whether the console offers moves: the user administers backups (`None`: the
    /// roles could not be read just now).
    async fn may_move(&self) -> Option<bool> {
        self.roles().await.map(|roles| {
            roles
                .iter()
                .any(|r| matches!(r, Role::GlobalOwner | Role::GlobalBackupAdmin))
        })
    }

    /// The whole page: the navigation, who the console acts as, the content; with `live`,
    /// the page follows its stream.
    async fn render(&self, title: &str, content: &str, live: Option<Live>) -> Response {
        let roles = match self.roles().await {
            Some(roles) if roles.is_empty() => "no roles".to_owned(),
            Some(roles) => roles
                .iter()
                .map(|r| r.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            None => "roles unknown just now".to_owned(),
        };
        let mut html = String::new();
        let _ = write!(
            html,
            "<!doctype html><html><head><meta charset=\"utf-8\"><title>handoff: {t}</title>\
             <meta name=\"csrf-token\" content=\"{token}\">\
             <style>body{{font-family:sans-serif;margin:1.5em}}table{{border-collapse:collapse}}\
             td,th{{border-bottom:1px solid #ddd;padding:.3em .6em;text-align:left}}\
             nav a{{margin-right:1em}}.bar{{background:#eee;width:10em;height:.8em}}\
             .bar>div{{background:#48c;height:100%}}.error{{color:#b00}}\
             .action{{margin-right:.6em}}form.inline{{display:inline}}\
             label{{display:block;margin:.4em 0}}</style>\
             <script src=\"/console.js\" defer></script></head><body{live}>\
             <nav><a href=\"/daemons\">Daemons</a><a href=\"/jobs\">Jobs</a>\
             <a href=\"/moves\">Moves</a><a href=\"/alerts\">Alerts</a>\
             <a href=\"/history\">History</a><span id=\"user\">signed in as <b>{u}</b> ({r})</span></nav>\
             <h1>{t}</h1>{content}</body></html>",
            t = esc(title),
            u = esc(self.user.as_str()),
            token = self.token,
            r = esc(&roles),
            live = live.map_or(String::new(), |l| format!(
                " data-live=\"{}\" data-checkpoint=\"{}\"",
                esc(&l.url),
                l.checkpoint
            )),
        );
        Html(html).into_response()
    }

    /// A failure: handoff's refusal said as it is (with its reason), anything else as a
    /// gateway error whose detail goes to the log, not to the page.
    async fn failed(&self, title: &str, failure: Failure) -> Response {
        let (status, said) = match &failure {
            Failure::Refused(e) => (
                match e.code {
                    ErrorCode::NotFound => StatusCode::NOT_FOUND,
                    ErrorCode::Validation => StatusCode::BAD_REQUEST,
                    ErrorCode::Forbidden => StatusCode::FORBIDDEN,
                    ErrorCode::Conflict | ErrorCode::Refused => StatusCode::CONFLICT,
                    _ => StatusCode::BAD_GATEWAY,
                },
                format!("refused ({}): {}", e.reason, e.message),
            ),
            Failure::Usage(detail) => {
                tracing::warn!(%detail, page = title, "a page could not be read");
                (
                    StatusCode::BAD_GATEWAY,
                    "handoff could not be reached just now; try again".to_owned(),
                )
            }
        };
        let content = format!("<p class=\"error\" id=\"error\">{}</p>", esc(&said));
        let mut page = self.render(title, &content, None).await;
        *page.status_mut() = status;
        page
    }

    /// The hidden field every form carries.
    fn token_field(&self) -> String {
        format!(
            "<input type=\"hidden\" name=\"token\" value=\"{}\">",
            self.token
        )
    }

    /// Whether `given` is this console's token (compared in constant time).
    fn token_ok(&self, given: &str) -> bool {
        same(&self.token, given)
    }

    /// Whether `given` is this console's live streams' token.
    fn live_token_ok(&self, given: &str) -> bool {
        same(&self.live_token, given)
    }
}

/// Whether two secrets are equal, in constant time.
fn same(secret: &str, given: &str) -> bool {
    let (a, b) = (secret.as_bytes(), given.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
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
    #[serde(default, deserialize_with = "non_empty")]
    state: Option<String>,
}

fn non_empty<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let v: Option<String> = Option::deserialize(d)?;
    Ok(v.filter(|s| !s.trim().is_empty()))
}

/// A table: its header, then each row's cells (already escaped HTML).
fn table(header: &[&str], rows: impl IntoIterator<Item = Vec<String>>) -> String {
    table_with(header, rows.into_iter().map(|r| (String::new(), r)), "")
}

/// A table whose rows carry attributes (`attrs`, already escaped) and whose body has
/// `id` when given.
fn table_with(
    header: &[&str],
    rows: impl IntoIterator<Item = (String, Vec<String>)>,
    id: &str,
) -> String {
    let mut html = String::from("<table><thead><tr>");
    for h in header {
        let _ = write!(html, "<th>{}</th>", esc(h));
    }
    html.push_str("</tr></thead>");
    if id.is_empty() {
        html.push_str("<tbody>");
    } else {
        let _ = write!(html, "<tbody id=\"{id}\">");
    }
    for (attrs, row) in rows {
        let _ = write!(html, "<tr{attrs}>");
        for cell in row {
            let _ = write!(html, "<td>{cell}</td>");
        }
        html.push_str("</tr>");
    }
    html.push_str("</tbody></table>");
    html
}

/// How much of the list is shown, and a link to the next page (`base`: this page's
/// address with its filter, already encoded).
fn more<T>(page: &Page<T>, base: &str, what: &str) -> String {
    let mut html = format!(
        "<p id=\"count\">{} of {} {}",
        page.items.len(),
        page.total,
        esc(what)
    );
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

//! The console's actions: Move head, Move all heads (to one daemon or spread) and Drain.
//! Each goes form → plan (the command as a dry run: every job, every check, the head
//! space before and after) → confirm (the same command, for real, with the id the plan
//! page chose, so that confirming twice moves once) → the move's own page. A read-only
//! user is offered none of it, and the command service refuses it anyway.

use std::fmt::Write as _;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use axum::Form;
use handoff_domain::command::{CancelMove, DrainDaemon, MoveJob, MoveJobs, SpreadJobs};
use handoff_domain::{Command, CommandId, MovePlan};
use handoff_protocol::views::DaemonView;
use handoff_protocol::{ErrorBody, ErrorCode};
use serde::Deserialize;
use serde_json::json;

use super::{enc, esc, table, Console, Filter};
use crate::cmd::command_id;
use crate::cmd::fleet::{daemon_id, job_id};
use crate::output::bytes;
use crate::Failure;

/// A drain's moves at once unless the form says otherwise (as the CLI's default).
const DRAIN_CONCURRENT: u32 = 4;
/// The most jobs a plan page lists (the checks and the head space cover them all).
const PLAN_JOBS_SHOWN: usize = 500;

/// What the forms of a move send: which action, about what, where to, why.
#[derive(Debug, Default, Deserialize)]
pub(super) struct ActionForm {
    #[serde(default)]
    token: String,
    /// `job` (Move head), `jobs` (Move all heads) or `drain`.
    #[serde(default)]
    kind: String,
    /// The job or the daemon.
    #[serde(default)]
    subject: String,
    #[serde(default)]
    to: String,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    max_concurrent: String,
    /// The command's id (the confirm form's).
    #[serde(default)]
    id: String,
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct CancelForm {
    #[serde(default)]
    token: String,
    #[serde(default)]
    move_id: String,
    #[serde(default)]
    reason: String,
}

fn invalid(message: String) -> Failure {
    Failure::Refused(ErrorBody::new(ErrorCode::Validation, "malformed", message))
}

/// The command a form asks for: pure, so that what the console sends is what the form
/// says and nothing else.
fn command(form: &ActionForm, dry_run: bool) -> Result<Command, Failure> {
    let reason = Some(form.reason.trim().to_owned()).filter(|r| !r.is_empty());
    let to = form.to.trim();
    let daemon = |what: &str, s: &str| daemon_id(s).map_err(|e| invalid(format!("{what}: {e}")));
    Ok(match form.kind.as_str() {
        "job" => Command::MoveJob(MoveJob {
            job: job_id(&form.subject).map_err(|e| invalid(format!("job: {e}")))?,
            to: match to {
                "" => return Err(invalid("Move head needs a destination daemon".into())),
                to => daemon("destination", to)?,
            },
            reason,
            dry_run,
        }),
        "jobs" if to.is_empty() => Command::SpreadJobs(SpreadJobs {
            from: daemon("daemon", &form.subject)?,
            to: Vec::new(),
            reason,
            dry_run,
        }),
        "jobs" => Command::MoveJobs(MoveJobs {
            from: daemon("daemon", &form.subject)?,
            to: daemon("destination", to)?,
            reason,
            dry_run,
        }),
        "drain" => Command::DrainDaemon(DrainDaemon {
            daemon: daemon("daemon", &form.subject)?,
            max_concurrent: match form.max_concurrent.trim() {
                "" => DRAIN_CONCURRENT,
                n => n
                    .parse()
                    .map_err(|_| invalid(format!("moves at once: {n:?} is not a whole number")))?,
            },
            reason,
            dry_run,
        }),
        other => return Err(invalid(format!("no such action {other:?}"))),
    })
}

/// What the action is called on its pages.
fn title(form: &ActionForm) -> String {
    match form.kind.as_str() {
        "job" => format!("Move head of {}", form.subject),
        "drain" => format!("Drain {}", form.subject),
        _ => format!("Move all heads of {}", form.subject),
    }
}

/// `/move?job=J` (Move head) or `/move?daemon=D` (Move all heads).
pub(super) async fn move_form(State(c): State<Arc<Console>>, Query(f): Query<Filter>) -> Response {
    let form = match (f.job, f.daemon) {
        (Some(job), _) => ActionForm {
            kind: "job".into(),
            subject: job,
            ..Default::default()
        },
        (None, Some(daemon)) => ActionForm {
            kind: "jobs".into(),
            subject: daemon,
            ..Default::default()
        },
        (None, None) => {
            let e = invalid("say which job (?job=) or daemon (?daemon=) to move".into());
            return c.failed("Move", e).await;
        }
    };
    form_page(&c, form).await
}

/// `/drain?daemon=D`.
pub(super) async fn drain_form(State(c): State<Arc<Console>>, Query(f): Query<Filter>) -> Response {
    let Some(daemon) = f.daemon else {
        let e = invalid("say which daemon to drain (?daemon=)".into());
        return c.failed("Drain", e).await;
    };
    let form = ActionForm {
        kind: "drain".into(),
        subject: daemon,
        max_concurrent: DRAIN_CONCURRENT.to_string(),
        ..Default::default()
    };
    form_page(&c, form).await
}

async fn form_page(c: &Console, form: ActionForm) -> Response {
    let title = title(&form);
    let may_move = match c.may_move().await {
        Some(may) => may,
        None => {
            let e = Failure::Usage("the console could not read its user's roles".into());
            return c.failed(&title, e).await;
        }
    };
    if !may_move {
        let content = "<p id=\"read-only\">You may not move jobs: moves need GLOBAL_OWNER or \
                       GLOBAL_BACKUP_ADMIN.</p>";
        let mut page = c.render(&title, content, None).await;
        *page.status_mut() = StatusCode::FORBIDDEN;
        return page;
    }
    // The destinations offered: the first page of daemons that take jobs.
    let daemons: Vec<DaemonView> = match c.page("daemons", json!({}), None).await {
        Ok(p) => p.items,
        Err(e) => return c.failed(&title, e).await,
    };
    let mut html = format!(
        "<form method=\"post\" action=\"/plan\" id=\"move-form\">{}\
         <input type=\"hidden\" name=\"kind\" value=\"{}\">\
         <input type=\"hidden\" name=\"subject\" value=\"{}\">",
        c.token_field(),
        esc(&form.kind),
        esc(&form.subject)
    );
    match form.kind.as_str() {
        "drain" => {
            let _ = write!(
                html,
                "<p>Assignment to it stops now; handoff moves its jobs away, each to where the \
                 failover policy would place it.</p>\
                 <label>at most <input name=\"max_concurrent\" type=\"number\" min=\"1\" \
                 max=\"1024\" value=\"{}\"> moves at once</label>",
                esc(&form.max_concurrent)
            );
        }
        kind => {
            let _ = write!(
                html,
                "<label>destination <select name=\"to\"{}>{}",
                if kind == "job" { " required" } else { "" },
                if kind == "job" {
                    "<option value=\"\">choose a daemon</option>"
                } else {
                    "<option value=\"\">let handoff spread the jobs over any eligible daemon</option>"
                }
            );
            for d in daemons
                .iter()
                .filter(|d| d.settings.assignment_enabled && d.daemon.as_str() != form.subject)
            {
                let _ = write!(
                    html,
                    "<option value=\"{0}\">{0} ({1} free)</option>",
                    esc(d.daemon.as_str()),
                    esc(&bytes(d.free_bytes))
                );
            }
            html.push_str("</select></label>");
        }
    }
    html.push_str(
        "<label>reason <input name=\"reason\" size=\"60\"></label>\
         <button data-action=\"plan\">See the plan</button></form>",
    );
    c.render(&title, &html, None).await
}

/// The form's hidden copy, for the confirm button.
fn hidden(c: &Console, form: &ActionForm, id: &CommandId) -> String {
    let mut html = c.token_field();
    for (name, value) in [
        ("kind", &form.kind),
        ("subject", &form.subject),
        ("to", &form.to),
        ("reason", &form.reason),
        ("max_concurrent", &form.max_concurrent),
    ] {
        let _ = write!(
            html,
            "<input type=\"hidden\" name=\"{name}\" value=\"{}\">",
            esc(value)
        );
    }
    let _ = write!(
        html,
        "<input type=\"hidden\" name=\"id\" value=\"{}\">",
        esc(id.as_str())
    );
    html
}

/// A form without this console's token: another page's, or an old one.
async fn stale(c: &Console, title: &str) -> Response {
    let e = Failure::Refused(ErrorBody::new(
        ErrorCode::Forbidden,
        "stale_form",
        "this form is not from this console (or from before it restarted): open the page again",
    ));
    c.failed(title, e).await
}

/// `POST /plan`: the command as a dry run, and a button to send it for real.
pub(super) async fn plan(State(c): State<Arc<Console>>, Form(form): Form<ActionForm>) -> Response {
    let title = title(&form);
    if !c.token_ok(&form.token) {
        return stale(&c, &title).await;
    }
    let sent = async {
        let command = command(&form, true)?;
        c.api.command(&command_id(None)?, &command).await
    };
    let applied = match sent.await {
        Ok(a) => a,
        Err(e) => return c.failed(&title, e).await,
    };
    let Some(plan) = applied.plan else {
        let e = Failure::Usage("the dry run came back without its plan".into());
        return c.failed(&title, e).await;
    };
    let id = match command_id(None) {
        Ok(id) => id,
        Err(e) => return c.failed(&title, e).await,
    };
    let content = format!(
        "{}<form method=\"post\" action=\"/confirm\" id=\"confirm-form\">{}\
         <button data-action=\"confirm\">Confirm: {}</button> <a href=\"/daemons\">back</a></form>",
        plan_html(&plan),
        hidden(&c, &form, &id),
        esc(&title)
    );
    c.render(&format!("{title}: the plan"), &content, None)
        .await
}

fn plan_html(plan: &MovePlan) -> String {
    let mut html = format!(
        "<div id=\"plan\"><p>{} job(s) from {} to {} &middot; nothing has changed yet</p>",
        plan.jobs.len(),
        esc(plan.from.as_str()),
        esc(&if plan.destinations.is_empty() {
            plan.to.to_string()
        } else {
            "the daemons below".to_owned()
        }),
    );
    html += &table(
        &["job", "head", "new epoch", "to"],
        plan.jobs.iter().take(PLAN_JOBS_SHOWN).map(|j| {
            vec![
                esc(j.job.as_str()),
                esc(&bytes(j.head_size_bytes)),
                j.epoch.to_string(),
                esc(j.to.as_ref().unwrap_or(&plan.to).as_str()),
            ]
        }),
    );
    if plan.jobs.len() > PLAN_JOBS_SHOWN {
        let _ = write!(
            html,
            "<p>the first {PLAN_JOBS_SHOWN} of {} jobs (`--dry-run` of the CLI lists them all)</p>",
            plan.jobs.len()
        );
    }
    html.push_str("<h2>Checks passed</h2><ul id=\"checks\">");
    for check in &plan.checks {
        let _ = write!(
            html,
            "<li>ok <b>{}</b> {}</li>",
            esc(&check.name),
            esc(&check.detail)
        );
    }
    html.push_str("</ul><h2>Head space</h2>");
    let rows: Vec<(String, u32, u64, u64, u64)> = if plan.destinations.is_empty() {
        vec![(
            plan.to.to_string(),
            plan.jobs.len() as u32,
            plan.needed_bytes,
            plan.destination_free_before,
            plan.destination_free_after,
        )]
    } else {
        plan.destinations
            .iter()
            .map(|d| {
                (
                    d.daemon.to_string(),
                    d.jobs,
                    d.needed_bytes,
                    d.free_before,
                    d.free_after,
                )
            })
            .collect()
    };
    html += &table(
        &["daemon", "jobs", "needs", "free before", "free after"],
        rows.iter().map(|(d, jobs, needs, before, after)| {
            vec![
                esc(d),
                jobs.to_string(),
                esc(&bytes(*needs)),
                esc(&bytes(*before)),
                esc(&bytes(*after)),
            ]
        }),
    );
    html.push_str("</div>");
    html
}

/// `POST /confirm`: the command for real, with the plan page's id; then its page.
pub(super) async fn confirm(
    State(c): State<Arc<Console>>,
    Form(form): Form<ActionForm>,
) -> Response {
    let title = title(&form);
    if !c.token_ok(&form.token) {
        return stale(&c, &title).await;
    }
    let sent = async {
        let command = command(&form, false)?;
        let id = CommandId::new(form.id.clone())
            .map_err(|e| invalid(format!("the command's id: {e}")))?;
        c.api.command(&id, &command).await?;
        Ok::<_, Failure>(id)
    };
    match sent.await {
        Ok(_) if form.kind == "drain" => {
            Redirect::to(&format!("/history?daemon={}", enc(&form.subject))).into_response()
        }
        Ok(id) => Redirect::to(&format!("/moves/{}", enc(id.as_str()))).into_response(),
        Err(e) => c.failed(&title, e).await,
    }
}

/// `POST /cancel`: cancels a move (its jobs not completed go back).
pub(super) async fn cancel(
    State(c): State<Arc<Console>>,
    Form(form): Form<CancelForm>,
) -> Response {
    let title = format!("Cancel move {}", form.move_id);
    if !c.token_ok(&form.token) {
        return stale(&c, &title).await;
    }
    let sent = async {
        let move_id = CommandId::new(form.move_id.clone())
            .map_err(|e| invalid(format!("the move's id: {e}")))?;
        let command = Command::CancelMove(CancelMove {
            move_id: move_id.clone(),
            reason: form.reason.trim().to_owned(),
        });
        c.api.command(&command_id(None)?, &command).await?;
        Ok::<_, Failure>(move_id)
    };
    match sent.await {
        Ok(id) => Redirect::to(&format!("/moves/{}", enc(id.as_str()))).into_response(),
        Err(e) => c.failed(&title, e).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(kind: &str, subject: &str, to: &str) -> ActionForm {
        ActionForm {
            kind: kind.into(),
            subject: subject.into(),
            to: to.into(),
            reason: "  ".into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_form_becomes_exactly_its_command() {
        let d1 = "backup1:/data/";
        match command(&form("jobs", d1, ""), true) {
            Ok(Command::SpreadJobs(s)) => {
                assert!(s.to.is_empty() && s.dry_run && s.reason.is_none())
            }
            other => panic!("{other:?}"),
        }
        match command(&form("jobs", d1, "backup2:/data/"), false) {
            Ok(Command::MoveJobs(m)) => assert!(!m.dry_run && m.to.as_str() == "backup2:/data/"),
            other => panic!("{other:?}"),
        }
        match command(&form("drain", d1, ""), false) {
            Ok(Command::DrainDaemon(d)) => assert_eq!(d.max_concurrent, DRAIN_CONCURRENT),
            other => panic!("{other:?}"),
        }
        assert!(command(&form("job", "sales/orders", ""), true).is_err());
        assert!(command(&form("delete", d1, ""), true).is_err());
        let mut drain = form("drain", d1, "");
        drain.max_concurrent = "many".into();
        assert!(command(&drain, true).is_err());
    }
}

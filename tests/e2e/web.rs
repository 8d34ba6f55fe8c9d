//! The console (`handoff web`) against `handoff up`: its pages list the daemons, a
//! daemon's jobs, the moves, the alerts and a job's history, name the user it acts as,
//! and show a hostile reason as text, never as markup.

use std::net::SocketAddr;

use anyhow::{anyhow, Result};
use handoff_tests::*;

const D1: &str = "backup1.example.net:/data/backup/";
const D3: &str = "backup3.example.net:/data/backup/";
const HOSTILE: &str = "<script>alert('x')</script>\"><img src=x onerror=alert(1)>";

fn get(addr: SocketAddr, path: &str) -> Result<String> {
    let r = http_get(addr, path)?;
    if r.status != 200 || !r.head.contains("content-type: text/html") {
        return Err(anyhow!("GET {path}: {} {}\n{}", r.status, r.head, r.body));
    }
    Ok(r.body)
}

#[tokio::test]
async fn the_console_shows_the_fleet_as_its_user_and_escapes_what_it_shows() -> Result<()> {
    let up = Up::start().await?;
    let url = up.url();
    handoff_ok(
        &url,
        &["move-job", "sales/orders", "--to", D3, "--reason", HOSTILE],
    )?;
    up.settle().await?;
    let mut web = Background::spawn(Some(&url), &["web", "--listen", "127.0.0.1:0"])?;
    let line = web.wait_for_line("console at")?;
    let addr: SocketAddr = line
        .trim()
        .trim_start_matches("console at http://")
        .trim_end_matches('/')
        .parse()?;

    let daemons = get(addr, "/daemons")?;
    assert!(daemons.contains("signed in as <b>admin</b>"), "{daemons}");
    for n in 1..=3 {
        assert!(
            daemons.contains(&format!("backup{n}.example.net:/data/backup/")),
            "{daemons}"
        );
    }
    assert!(
        daemons.contains("class=\"bar\""),
        "head space bars: {daemons}"
    );
    assert!(daemons.contains("3 of 3 daemons"), "{daemons}");

    let on_d1 = get(
        addr,
        "/jobs?daemon=backup1.example.net%3A%2Fdata%2Fbackup%2F",
    )?;
    let listed = handoff_ok(&url, &["jobs", "--daemon", D1, "--json"])?.json()?;
    let total = listed["total"].as_u64().unwrap_or(0);
    assert!(total > 0);
    assert!(
        on_d1.contains(&format!("{total} of {total} jobs")),
        "{on_d1}"
    );
    // With no data plane (`Up::start`), the move stays requested.
    assert!(
        on_d1.contains(&format!("moving to {D3} (requested)")),
        "the job moving away: {on_d1}"
    );

    let escaped = "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&quot;&gt;&lt;img src=x onerror=alert(1)&gt;";
    let moves = get(addr, "/moves")?;
    assert!(moves.contains(escaped), "{moves}");
    assert!(
        !moves.contains("<script>alert") && !moves.contains("<img"),
        "{moves}"
    );

    let history = get(addr, "/history?job=sales%2Forders")?;
    assert!(history.contains("History of sales/orders"), "{history}");
    assert!(
        history.contains("JobMoveStarted") && history.contains(escaped),
        "{history}"
    );
    assert!(!history.contains("<script>alert"), "{history}");

    assert!(!history.contains("<img"), "{history}");

    assert!(get(addr, "/alerts")?.contains("<h1>Alerts</h1>"));
    assert!(
        get(addr, "/history")?.contains("name=\"job\""),
        "a form to pick one"
    );
    // handoff's refusals, said on the page: an unknown job, an invalid one (its text
    // escaped wherever it shows).
    let r = http_get(addr, "/history?job=no%2Fsuch")?;
    assert_eq!(r.status, 404, "{}", r.body);
    assert!(r.body.contains("no/such"), "{}", r.body);
    let r = http_get(addr, "/history?job=no%2F%3Cb%3E")?;
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(!r.body.contains("no/<b>"), "{}", r.body);
    // Every answer forbids script, framing and caching; another host is refused (a page
    // elsewhere cannot read the console through DNS rebinding).
    let r = http_get(addr, "/daemons")?;
    for header in [
        "content-security-policy: default-src 'none'",
        "x-frame-options: deny",
        "cache-control: no-store",
        "x-content-type-options: nosniff",
    ] {
        assert!(r.head.contains(header), "{header}: {}", r.head);
    }
    let r = http_get_as(addr, "/daemons", &format!("evil.example:{}", addr.port()))?;
    assert_eq!(r.status, 421, "{}", r.body);
    assert!(!r.body.contains(D1), "{}", r.body);
    assert_eq!(
        http_get_as(addr, "/daemons", &format!("localhost:{}", addr.port()))?.status,
        200
    );
    Ok(())
}

/// The events of the stream of `type`, as `handoff history --json` prints them.
fn events_of_type(url: &str, kind: &str) -> Result<Vec<serde_json::Value>> {
    let out = handoff_ok(url, &["history", "--json"])?.stdout;
    let mut found = Vec::new();
    for line in out.lines() {
        let v: serde_json::Value = serde_json::from_str(line)?;
        if v["type"] == kind {
            found.push(v);
        }
    }
    Ok(found)
}

fn console(url: &str, creds: &std::path::Path) -> Result<(Background, SocketAddr)> {
    let mut web =
        Background::spawn_as(Some(url), Some(creds), &["web", "--listen", "127.0.0.1:0"])?;
    let addr = console_addr(&web.wait_for_line("console at")?)?;
    Ok((web, addr))
}

/// The token a console's pages carry.
fn token_of(addr: SocketAddr) -> Result<String> {
    let page = get(addr, "/daemons")?;
    let at = page
        .find("name=\"csrf-token\" content=\"")
        .ok_or_else(|| anyhow!("no token in {page}"))?
        + "name=\"csrf-token\" content=\"".len();
    Ok(page[at..at + 64].to_owned())
}

/// The console's actions are POSTs with its token, from its own pages, signed as its
/// user and refused as the CLI's would be: no token, a foreign origin or a read-only user
/// change nothing; a confirmation sent twice moves once.
#[tokio::test]
async fn the_consoles_actions_change_only_what_an_allowed_user_confirmed() -> Result<()> {
    let up = Up::start().await?;
    let url = up.url();
    let (_web, addr) = console(&url, &owner().1)?;
    let token = token_of(addr)?;
    let id = ulid::Ulid::new().to_string();
    let move_all = |token: &str| {
        vec![
            ("token", token.to_owned()),
            ("kind", "jobs".to_owned()),
            ("subject", D1.to_owned()),
            ("to", D3.to_owned()),
            ("reason", "from the console".to_owned()),
            ("id", id.clone()),
        ]
    };
    let post =
        |addr: SocketAddr, path: &str, headers: &[(&str, &str)], fields: &[(&str, String)]| {
            let fields: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
            http_post_form(addr, path, headers, &fields)
        };

    // Without the token, or from another site: refused before anything is sent.
    let r = post(addr, "/confirm", &[], &move_all("0".repeat(64).as_str()))?;
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(r.body.contains("stale_form"), "{}", r.body);
    let r = post(
        addr,
        "/confirm",
        &[("Origin", "http://evil.example")],
        &move_all(&token),
    )?;
    assert_eq!(r.status, 403, "{}", r.body);
    let r = post(
        addr,
        "/confirm",
        &[("Sec-Fetch-Site", "cross-site")],
        &move_all(&token),
    )?;
    assert_eq!(r.status, 403, "{}", r.body);
    // A live stream is this console's pages' only: its token, and not for another site.
    let live = |t: &str, headers: &[(&str, &str)]| {
        let host = addr.to_string();
        let mut all = vec![("Host", host.as_str())];
        all.extend_from_slice(headers);
        http_request(
            addr,
            "GET",
            &format!("/live/moves?after=0&t={t}"),
            &all,
            b"",
        )
    };
    // Its own token, which a page's live address carries (not the forms' token).
    let moves = get(addr, "/moves")?;
    let at = moves
        .find("&amp;t=")
        .or_else(|| moves.find("?t="))
        .ok_or_else(|| anyhow!("no live address in {moves}"))?;
    let at = at + moves[at..].find("t=").unwrap_or(0) + 2;
    let live_token = moves[at..at + 64].to_owned();
    assert_ne!(live_token, token);
    assert_eq!(live(&"0".repeat(64), &[])?.status, 403);
    assert_eq!(
        live(&token, &[])?.status,
        403,
        "the forms' token opens no stream"
    );
    assert_eq!(
        live(&live_token, &[("Sec-Fetch-Site", "cross-site")])?.status,
        403
    );
    // A plan is a dry run: refused as the CLI's would be when it cannot be done.
    let mut to_itself = move_all(&token);
    to_itself[3].1 = D1.to_owned();
    let r = post(addr, "/plan", &[], &to_itself)?;
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(r.body.contains("refused (move_to_self)"), "{}", r.body);
    let r = post(addr, "/plan", &[], &move_all(&token))?;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains("id=\"plan\""), "{}", r.body);
    up.settle().await?;
    assert!(
        events_of_type(&url, "MoveStarted")?.is_empty(),
        "nothing moved yet"
    );

    // A read-only user's console: its own token, and the command service refuses.
    let viewer = up.user("viewer", "GLOBAL_READ_ONLY")?;
    let (_ro, ro) = console(&url, &viewer)?;
    assert!(!get(ro, "/daemons")?.contains("data-action"));
    let r = post(ro, "/confirm", &[], &move_all(&token_of(ro)?))?;
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(
        r.body.contains("forbidden") || r.body.contains("may not"),
        "{}",
        r.body
    );
    up.settle().await?;
    assert!(
        events_of_type(&url, "MoveStarted")?.is_empty(),
        "{}",
        r.body
    );

    // Confirmed, twice (a double click, a resent form): one move, with the plan page's id.
    for _ in 0..2 {
        let r = post(
            addr,
            "/confirm",
            &[("Origin", &format!("http://{addr}"))],
            &move_all(&token),
        )?;
        assert_eq!(r.status, 303, "{}", r.body);
        assert!(
            r.head
                .contains(&format!("location: /moves/{}", id.to_lowercase())),
            "{}",
            r.head
        );
    }
    up.settle().await?;
    let started = events_of_type(&url, "MoveStarted")?;
    assert_eq!(started.len(), 1, "{started:?}");
    assert_eq!(started[0]["command"], serde_json::json!(id));
    assert_eq!(started[0]["actor"], serde_json::json!("admin"));
    // Another name it answers to, when asked (behind a proxy, or beyond loopback).
    let mut named = Background::spawn(
        Some(&url),
        &[
            "web",
            "--listen",
            "127.0.0.1:0",
            "--host",
            "console.example",
        ],
    )?;
    let named = console_addr(&named.wait_for_line("console at")?)?;
    let as_named = format!("console.example:{}", named.port());
    assert_eq!(http_get_as(named, "/daemons", &as_named)?.status, 200);
    assert_eq!(http_get_as(addr, "/daemons", &as_named)?.status, 421);
    let page = get(addr, &format!("/moves/{id}"))?;
    assert!(
        page.contains("from the console") && page.contains("id=\"status\""),
        "{page}"
    );
    Ok(())
}

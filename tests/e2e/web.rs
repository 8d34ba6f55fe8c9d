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

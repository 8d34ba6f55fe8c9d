//! The console in a real browser (headless Chromium through ChromeDriver) against `handoff
//! up --web` with its data plane: Move all heads of a daemon from the Daemons page, the
//! plan, the confirmation, the move followed live to completed, the history growing live;
//! a read-only console offers no move; hostile text stays text. Each page is saved as a
//! PNG under the test's temporary directory (or `HANDOFF_SCREENSHOTS`).

use std::time::Duration;

use anyhow::{anyhow, Result};
use handoff_domain::command::{CompleteJobMove, ReportJobMovePhase};
use handoff_domain::model::MovePhase;
use handoff_domain::Command;
use handoff_protocol::dataplane::Progress;
use handoff_tests::*;
use serde_json::json;

const D1: &str = "backup1.example.net:/data/backup/";
const D3: &str = "backup3.example.net:/data/backup/";
/// A reason that would run script if the console let it through as markup.
const HOSTILE: &str = "<img src=x onerror=\"window.pwned=1\"><script>window.pwned=1</script>";
/// How long a real rebuild of the sample's heads may take here.
const MOVE_LIMIT: Duration = Duration::from_secs(120);

/// The text of the first element `css` selects, or none while the page has none (it
/// may be loading again).
fn text_of(browser: &Browser, css: &str) -> Option<String> {
    let element = browser.all(css).ok()?.into_iter().next()?;
    browser.text(&element).ok()
}

/// Waits until `css` selects something on the browser's page; its first element.
/// When it never does, the page is saved as `failed.png` and its text is in the error.
async fn element(browser: &Browser, css: &str, limit: Duration) -> Result<String> {
    let found = until(&format!("{css} on the page"), limit, || async {
        Ok(browser.all(css)?.into_iter().next())
    })
    .await;
    found.map_err(|e| {
        let _ = browser.screenshot("failed");
        let shown = browser
            .find("body")
            .and_then(|b| browser.text(&b))
            .unwrap_or_default();
        anyhow!("{e}; the page shows:\n{shown}")
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_moves_a_daemons_heads_from_the_console_and_watches_it_live() -> Result<()> {
    let shots_dir = tempfile::tempdir()?;
    let shots = std::env::var_os("HANDOFF_SCREENSHOTS")
        .map_or_else(|| shots_dir.path().to_owned(), Into::into);
    let mut up = Up::start_with(&["--hour-ms", "600", "--web", "127.0.0.1:0"]).await?;
    let url = up.url();
    let addr = console_addr(&up.process.wait_for_line("console")?)?;
    let base = format!("http://{addr}");

    // Every job of the daemon has a snapshot to be rebuilt from.
    let listed = handoff_ok(&url, &["jobs", "--daemon", D1, "--json"])?.json()?;
    let jobs: Vec<String> = listed["items"]
        .as_array()
        .ok_or_else(|| anyhow!("no jobs: {listed}"))?
        .iter()
        .filter_map(|j| j["job"].as_str().map(str::to_owned))
        .collect();
    assert!(jobs.len() >= 2, "{listed}");
    let stores = handoff_dataplane::store::Stores::open(up.server.connect().await?, 1).await?;
    for j in &jobs {
        until(&format!("a snapshot of {j}"), MOVE_LIMIT, || {
            let stores = stores.clone();
            async move {
                let snaps = stores.snapshots(Some(&job(j))).await?;
                Ok(snaps.iter().any(|s| s.daemon.is_some()).then_some(()))
            }
        })
        .await?;
    }

    let browser = Browser::start(&shots).await?;
    browser.open(&format!("{base}/daemons"))?;
    browser.screenshot("daemons")?;
    let who = browser.text(&element(&browser, "#user", MOVE_LIMIT).await?)?;
    // `up --web` serves it as a user of its own, an administrator of backups.
    assert!(
        who.contains("console") && who.contains("GLOBAL_BACKUP_ADMIN"),
        "{who}"
    );
    let fleet = browser.text(&browser.find("table")?)?;
    assert!(fleet.contains("s ago"), "heartbeat ages: {fleet}");
    // The daemon's jobs, each with its last snapshot.
    browser.open(&format!(
        "{base}/jobs?daemon=backup1.example.net%3A%2Fdata%2Fbackup%2F"
    ))?;
    let listed = browser.text(&element(&browser, "table", MOVE_LIMIT).await?)?;
    for j in &jobs {
        let row = listed
            .lines()
            .find(|l| l.starts_with(j.as_str()))
            .ok_or_else(|| anyhow!("{j} not listed: {listed}"))?;
        assert!(row.contains(" ago ("), "{j}'s last snapshot: {row}");
    }
    browser.screenshot("jobs")?;
    browser.open(&format!("{base}/daemons"))?;

    // Move all heads: the form, the plan with its checks, the confirmation.
    let move_all = browser.find(&format!(
        "a[data-action='move-all'][href='/move?daemon={}']",
        "backup1.example.net%3A%2Fdata%2Fbackup%2F"
    ))?;
    browser.click(&move_all)?;
    let reason = element(&browser, "#move-form input[name='reason']", MOVE_LIMIT).await?;
    browser.type_into(&reason, HOSTILE)?;
    browser.screenshot("move-form")?;
    browser.click(&browser.find("button[data-action='plan']")?)?;
    element(&browser, "#plan", MOVE_LIMIT).await?;
    let plan = browser.text(&browser.find("#plan")?)?;
    for j in &jobs {
        assert!(plan.contains(j.as_str()), "{j} in the plan: {plan}");
    }
    assert!(
        plan.contains("head_space") && plan.contains("free before"),
        "{plan}"
    );
    assert!(
        !browser.all("#checks li")?.is_empty(),
        "every check is listed"
    );
    browser.screenshot("plan")?;
    // Nothing moved yet: the plan is a dry run.
    let moving = handoff_ok(&url, &["jobs", "--daemon", D1, "--json"])?.json()?;
    assert!(
        !moving.to_string().contains("\"moving\""),
        "a plan moves nothing: {moving}"
    );
    browser.click(&browser.find("button[data-action='confirm']")?)?;

    // The move's own page follows it live: the page turns to completed by itself.
    let status = element(&browser, "#status", MOVE_LIMIT).await?;
    let page = browser.url()?;
    assert!(page.starts_with(&format!("{base}/moves/")), "{page}");
    assert!(!browser.text(&status)?.is_empty());
    browser.screenshot("move-in-progress")?;
    until("the move to show completed", MOVE_LIMIT, || async {
        Ok((text_of(&browser, "#status").as_deref() == Some("completed")).then_some(()))
    })
    .await?;
    let left = handoff_ok(&url, &["jobs", "--daemon", D1, "--json"])?.json()?;
    assert_eq!(left["total"], json!(0), "every job left {D1}: {left}");
    browser.screenshot("move-completed")?;

    // The reason is shown as text.
    browser.open(&format!("{base}/moves"))?;
    let moves = browser.text(&browser.find("body")?)?;
    assert!(moves.contains(HOSTILE), "the reason, as text: {moves}");
    assert!(browser.all("img")?.is_empty(), "no element from the reason");
    // So is a hostile daemon id in an address: handoff refuses it, and the page says so.
    browser.open(&format!(
        "{base}/jobs?daemon=%3Cimg%20src%3Dx%20onerror%3D%22window.pwned%3D1%22%3E%3A%2Fd%2F"
    ))?;
    let said = text_of(&browser, "#error").unwrap_or_default();
    assert!(said.starts_with("refused ("), "{said}");
    assert!(
        browser.all("img")?.is_empty(),
        "no element from the address"
    );
    browser.screenshot("moves")?;

    // The daemon's history holds the move and grows live, without a reload.
    browser.open(&format!(
        "{base}/history?daemon=backup1.example.net%3A%2Fdata%2Fbackup%2F"
    ))?;
    let history = browser.text(&browser.find("#entries")?)?;
    assert!(
        history.contains("MoveStarted") && history.contains(HOSTILE),
        "the move, who asked and why: {history}"
    );
    browser.script("window.stayed = true; return null;")?;
    handoff_ok(
        &url,
        &["daemon", "configure", D1, "--assignment-enabled", "false"],
    )?;
    until("the new event on the page", MOVE_LIMIT, || async {
        let rows = text_of(&browser, "#entries").unwrap_or_default();
        Ok(rows.contains("DaemonConfigured").then_some(()))
    })
    .await?;
    assert_eq!(
        browser.script("return window.stayed === true;")?,
        json!(true),
        "the entry came live, not by loading the page again"
    );
    // What the stream repeated of the page (it starts a little before) is shown once.
    let seqs = browser.script(
        "return Array.from(document.querySelectorAll('#entries tr[data-seq]'), r => r.getAttribute('data-seq'));",
    )?;
    let seqs: Vec<&str> = seqs
        .as_array()
        .ok_or_else(|| anyhow!("no rows: {seqs}"))?
        .iter()
        .filter_map(|s| s.as_str())
        .collect();
    let distinct: std::collections::BTreeSet<&str> = seqs.iter().copied().collect();
    assert_eq!(distinct.len(), seqs.len(), "each entry once: {seqs:?}");
    browser.screenshot("history")?;

    // A read-only console offers no move, and handoff refuses one sent anyway.
    let viewer = up.user("viewer", "GLOBAL_READ_ONLY")?;
    let mut read_only = Background::spawn_as(
        Some(&url),
        Some(&viewer),
        &["web", "--listen", "127.0.0.1:0"],
    )?;
    let ro = console_addr(&read_only.wait_for_line("console at")?)?;
    browser.open(&format!("http://{ro}/daemons"))?;
    let who = browser.text(&browser.find("#user")?)?;
    assert!(
        who.contains("viewer") && who.contains("GLOBAL_READ_ONLY"),
        "{who}"
    );
    assert!(
        browser.all("[data-action]")?.is_empty(),
        "a read-only console offers no action"
    );
    browser.open(&format!("http://{ro}/jobs"))?;
    assert!(browser.all("[data-action]")?.is_empty());
    browser.screenshot("read-only")?;
    // The form itself says why, to anyone who opens it by its address.
    browser.open(&format!(
        "http://{ro}/move?daemon=backup1.example.net%3A%2Fdata%2Fbackup%2F"
    ))?;
    let said = browser.text(&browser.find("#read-only")?)?;
    assert!(said.contains("GLOBAL_BACKUP_ADMIN"), "{said}");
    assert!(browser.all("form[action='/plan']")?.is_empty());
    read_only.terminate()?;
    Ok(())
}

/// A move's page follows it without being loaded again: a phase reported, then the
/// rebuild's progress, each written into its row; the move's end draws the page again,
/// completed. The test plays the destination daemon itself, so each step is its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moves_page_follows_each_phase_and_the_rebuilds_progress() -> Result<()> {
    let shots_dir = tempfile::tempdir()?;
    let mut up = Up::start_with(&["--no-data-plane", "--web", "127.0.0.1:0"]).await?;
    let url = up.url();
    let base = format!(
        "http://{}",
        console_addr(&up.process.wait_for_line("console")?)?
    );
    let id = ulid::Ulid::new().to_string();
    let reply = handoff_ok(
        &url,
        &[
            "move-job",
            "sales/orders",
            "--to",
            D3,
            "--id",
            &id,
            "--json",
        ],
    )?
    .json()?;
    let epoch = reply["plan"]["jobs"][0]["epoch"]
        .as_u64()
        .ok_or_else(|| anyhow!("no epoch: {reply}"))?;
    up.settle().await?;

    let browser = Browser::start(shots_dir.path()).await?;
    browser.open(&format!("{base}/moves/{id}"))?;
    let phase = element(&browser, "tr[data-job='sales/orders'] .phase", MOVE_LIMIT).await?;
    assert_eq!(browser.text(&phase)?, "requested");
    browser.script("window.stayed = true; return null;")?;

    // The destination reports its first phase: the row says so, on the same page.
    let client = up.server.connect().await?;
    let destination = up.daemon_user(3)?;
    let (job_id, move_id) = (
        job("sales/orders"),
        handoff_domain::CommandId::new(id.clone())?,
    );
    let report = Command::ReportJobMovePhase(ReportJobMovePhase {
        job: job_id.clone(),
        move_id: move_id.clone(),
        epoch,
        phase: MovePhase::RestoringSnapshot,
    });
    send_command(&client, &destination, &new_id(), &report)
        .await?
        .map_err(|e| anyhow!(e.message))?;
    until("the phase on the page", MOVE_LIMIT, || async {
        let phase = text_of(&browser, "tr[data-job='sales/orders'] .phase");
        Ok((phase.as_deref() == Some("restoring_snapshot")).then_some(()))
    })
    .await?;
    // Its progress, as the rebuild publishes it: the bar and the words follow.
    let progress = Progress {
        move_id: id.clone(),
        job: job_id.clone(),
        daemon: daemon(3),
        epoch,
        phase: MovePhase::ReplayingOplog,
        snapshot_bytes: 100,
        snapshot_total: 100,
        entries_applied: 1234,
        lag_ms: 2500,
        done: None,
    };
    let subject = handoff_protocol::subjects::progress(&id);
    until("the progress on the page", MOVE_LIMIT, || async {
        client
            .publish(subject.clone(), serde_json::to_vec(&progress)?.into())
            .await?;
        client.flush().await?;
        let detail = browser.find("tr[data-job='sales/orders'] .detail")?;
        Ok(browser
            .text(&detail)?
            .contains("1234 oplog entries")
            .then_some(()))
    })
    .await?;
    assert_eq!(
        browser.script(
            "return document.querySelector('tr[data-job=\"sales/orders\"] .progress').value;"
        )?,
        json!(1)
    );
    assert_eq!(
        browser.script("return window.stayed === true;")?,
        json!(true),
        "the phase and the progress came live, not by loading the page again"
    );
    browser.screenshot("move-live")?;

    // The move ends: the page draws itself again, completed.
    let complete = Command::CompleteJobMove(CompleteJobMove {
        head: rebuilt_head(),
        job: job_id,
        move_id,
        epoch,
    });
    send_command(&client, &destination, &new_id(), &complete)
        .await?
        .map_err(|e| anyhow!(e.message))?;
    until("the move to show completed", MOVE_LIMIT, || async {
        Ok((text_of(&browser, "#status").as_deref() == Some("completed")).then_some(()))
    })
    .await?;
    Ok(())
}

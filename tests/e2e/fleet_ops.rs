//! Fleet operations from the command line, against `handoff up`: a spread of a daemon's
//! jobs over several daemons, and a move followed with `--wait --json`.

use anyhow::{Context as _, Result};
use handoff_domain::command::CompleteJobMove;
use handoff_domain::{Command, CommandId};
use handoff_tests::*;

const D1: &str = "backup1.example.net:/data/backup/";
const D2: &str = "backup2.example.net:/data/backup/";
const D3: &str = "backup3.example.net:/data/backup/";

/// `move-jobs --spread` plans every job of a daemon over the others by the policy's
/// rules (a dry run shows each job's destination and each destination's head space),
/// then moves them in one move with one id; `--to` without `--spread` names one daemon.
#[tokio::test]
async fn move_jobs_spread_plans_and_moves_over_several_daemons() -> Result<()> {
    let up = Up::start().await?;
    let url = up.url();
    let on_d1 = handoff_ok(&url, &["jobs", "--daemon", D1, "--json"])?.json()?;
    let jobs = on_d1["total"].as_u64().expect("a total");
    assert!(jobs >= 2, "{on_d1}");
    let dry = handoff_ok(&url, &["move-jobs", "--from", D1, "--spread", "--dry-run"])?.stdout;
    for expected in ["(dry run)", "TO", "head space on", "nothing changed"] {
        assert!(dry.contains(expected), "{expected:?} missing from:\n{dry}");
    }
    assert_eq!(
        handoff(&url, &["move-jobs", "--from", D1, "--to", D2, "--to", D3])?.code,
        2
    );
    let applied = handoff_ok(
        &url,
        &[
            "--json",
            "move-jobs",
            "--from",
            D1,
            "--spread",
            "--to",
            D2,
            "--to",
            D3,
        ],
    )?
    .json()?;
    let destinations: std::collections::BTreeSet<&str> = applied["plan"]["jobs"]
        .as_array()
        .expect("the plan's jobs")
        .iter()
        .filter_map(|j| j["to"].as_str())
        .collect();
    assert_eq!(destinations, [D2, D3].into(), "{applied}");
    up.settle().await?;
    let moving = handoff_ok(&url, &["jobs", "--moving", "--json"])?.json()?;
    assert_eq!(moving["total"].as_u64(), Some(jobs));
    let moves = handoff_ok(&url, &["moves", "--json"])?.json()?;
    assert_eq!(moves["total"], 1, "{moves}");
    assert_eq!(moves["items"][0]["spread"], serde_json::json!([D2, D3]));
    Ok(())
}

/// `--wait --json` prints one JSON document per line: the command's reply (with the move's
/// id) first, then each job's phases as the move goes.
#[tokio::test]
async fn move_with_wait_and_json_prints_the_reply_first() -> Result<()> {
    let up = Up::start().await?;
    let url = up.url();
    let id = ulid::Ulid::new().to_string();
    let mut wait = Background::spawn(
        Some(&url),
        &[
            "move-job",
            "sales/orders",
            "--to",
            D3,
            "--id",
            &id,
            "--json",
            "--wait",
        ],
    )?;
    let first: serde_json::Value = serde_json::from_str(&wait.wait_for_line("{")?)?;
    assert_eq!(first["command"], id.as_str(), "{first}");
    assert_eq!(first["plan"]["move_id"], id.as_str(), "{first}");
    let epoch = first["plan"]["jobs"][0]["epoch"]
        .as_u64()
        .expect("an epoch");
    let daemon = up.daemon_user(3)?;
    let complete = Command::CompleteJobMove(CompleteJobMove {
        head: rebuilt_head(),
        job: handoff_domain::JobId::new("sales/orders")?,
        move_id: CommandId::new(id.clone())?,
        epoch,
    });
    send_command(&up.server.connect().await?, &daemon, &new_id(), &complete)
        .await?
        .map_err(|e| anyhow::anyhow!(e.message))?;
    let (code, lines) = wait.finish()?;
    assert_eq!(code, 0, "{lines:?}");
    let documents: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).with_context(|| format!("not one JSON document: {l}")))
        .collect::<Result<_>>()?;
    assert_eq!(documents[0]["command"], id.as_str());
    let last = documents.last().expect("lines");
    assert_eq!(
        (&last["job"], &last["phase"]),
        (&"sales/orders".into(), &"completed".into()),
        "{documents:?}"
    );
    Ok(())
}

/// `daemon drain` from the command line: refusals say why and change nothing; a drain
/// disables assignment, and the command service starts its moves (one at a time here:
/// with no data plane none ends); `--cancel` stops it, and the daemon's history and view
/// tell both.
#[tokio::test]
async fn daemon_drain_starts_its_moves_and_cancel_stops_it() -> Result<()> {
    let up = Up::start().await?;
    let url = up.url();
    // A refusal is recorded as the command's answer (decision 0010), never as an event
    // about the daemon.
    let d1_history = || -> Result<usize> {
        Ok(handoff_ok(&url, &["history", "--daemon", D1, "--json"])?
            .stdout
            .lines()
            .count())
    };
    up.settle().await?;
    let before = d1_history()?;
    let refused = |args: &[&str], reason: &str| -> Result<()> {
        let run = handoff(&url, args)?;
        assert_ne!(run.code, 0, "{args:?} was accepted");
        let said = format!("{}{}", run.stdout, run.stderr);
        assert!(
            said.contains(reason),
            "{args:?}: {reason:?} missing from {said}"
        );
        Ok(())
    };
    refused(
        &["daemon", "drain", "nosuch.example.net:/data/"],
        "not_found",
    )?;
    refused(
        &["daemon", "drain", D1, "--max-concurrent", "0"],
        "max_concurrent",
    )?;
    refused(&["daemon", "drain", D1, "--cancel"], "--reason")?;
    refused(
        &["daemon", "drain", D1, "--cancel", "--reason", "x"],
        "not_draining",
    )?;
    up.settle().await?;
    assert_eq!(
        d1_history()?,
        before,
        "a refused drain appended events about the daemon"
    );

    let started = handoff_ok(
        &url,
        &[
            "--json",
            "daemon",
            "drain",
            D1,
            "--max-concurrent",
            "1",
            "--reason",
            "retiring the host",
        ],
    )?
    .json()?;
    let id = started["command"]
        .as_str()
        .context("the drain's id")?
        .to_owned();
    until("the drain's first move", TIMEOUT, || async {
        let moves = handoff_ok(&url, &["moves", "--json"])?.json()?;
        Ok((moves["total"] == 1 && moves["items"][0]["drain"] == id.as_str()).then_some(()))
    })
    .await?;
    refused(&["daemon", "drain", D1], "draining")?;
    refused(
        &["daemon", "configure", D1, "--assignment-enabled", "true"],
        "draining",
    )?;
    let show = handoff_ok(&url, &["daemon", "show", D1])?.stdout;
    assert!(
        show.contains(&format!("drain               {id} in progress")),
        "{show}"
    );
    let listed = handoff_ok(&url, &["daemons"])?.stdout;
    assert!(listed.contains("draining"), "{listed}");

    handoff_ok(
        &url,
        &["daemon", "drain", D1, "--cancel", "--reason", "peak hours"],
    )?;
    // The move in progress goes back: were the drain still on, the service would start
    // the next one. It steps every drain in one pass, so once another daemon's drain
    // has started a move, and a command after that is answered, that pass is over.
    let first_move = {
        let moves = handoff_ok(&url, &["moves", "--json"])?.json()?;
        moves["items"][0]["move_id"]
            .as_str()
            .context("a move")?
            .to_owned()
    };
    handoff_ok(&url, &["cancel-move", &first_move, "--reason", "later"])?;
    let other = handoff_ok(
        &url,
        &["--json", "daemon", "drain", D2, "--max-concurrent", "1"],
    )?
    .json()?;
    let other = other["command"]
        .as_str()
        .context("the second drain's id")?
        .to_owned();
    until("the second drain's first move", TIMEOUT, || async {
        let moves = handoff_ok(&url, &["moves", "--json", "--all"])?.json()?;
        let of_other = moves["items"]
            .as_array()
            .is_some_and(|m| m.iter().any(|m| m["drain"] == other.as_str()));
        Ok(of_other.then_some(()))
    })
    .await?;
    handoff_ok(&url, &["project", "configure", "barrier"])?;
    up.settle().await?;
    let moves = handoff_ok(&url, &["moves", "--json", "--all"])?.json()?;
    let of_first = moves["items"].as_array().map_or(0, |m| {
        m.iter().filter(|m| m["drain"] == id.as_str()).count()
    });
    assert_eq!(of_first, 1, "a cancelled drain started a move: {moves}");
    let history = handoff_ok(&url, &["history", "--daemon", D1])?.stdout;
    for expected in [
        format!("drain {id} of {D1} started: assignment disabled"),
        format!("drain {id} of {D1} cancelled: peak hours"),
        format!("(drain {id})"),
    ] {
        assert!(
            history.contains(&expected),
            "{expected:?} missing from:\n{history}"
        );
    }
    let show = handoff_ok(&url, &["daemon", "show", D1])?.stdout;
    assert!(!show.contains("in progress"), "{show}");
    Ok(())
}

//! Every `handoff` subcommand, run as an operator would, against `handoff up`.

use anyhow::{Context as _, Result};
use handoff_domain::command::CompleteJobMove;
use handoff_domain::{Command, CommandId};
use handoff_tests::*;

const D1: &str = "backup1.example.net:/data/backup/";
const D2: &str = "backup2.example.net:/data/backup/";
const D3: &str = "backup3.example.net:/data/backup/";

/// The listings show the sample fleet that `handoff up` created, as tables and as JSON.
#[tokio::test]
async fn listings_show_the_sample_fleet() -> Result<()> {
    let up = Up::start().await?;
    let url = up.url();
    let daemons = handoff_ok(&url, &["daemons"])?.stdout;
    assert!(daemons.starts_with("DAEMON"), "{daemons}");
    for d in [D1, D2, D3] {
        assert!(daemons.contains(d), "{daemons}");
    }
    let json = handoff_ok(&url, &["daemons", "--json"])?.json()?;
    assert_eq!(json["items"].as_array().map(Vec::len), Some(3));
    assert_eq!(json["total"], 3);

    let projects = handoff_ok(&url, &["projects"])?.stdout;
    assert!(
        projects.contains("sales") && projects.contains("analytics"),
        "{projects}"
    );

    let jobs = handoff_ok(&url, &["jobs", "--json"])?.json()?;
    assert_eq!(
        jobs["items"].as_array().map(Vec::len),
        Some(5),
        "2 replica sets, 2 shards and config servers"
    );
    let sales = handoff_ok(&url, &["jobs", "--project", "sales", "--json"])?.json()?;
    assert_eq!(sales["items"].as_array().map(Vec::len), Some(4));
    let on_d1 = handoff_ok(&url, &["jobs", "--daemon", D1, "--json"])?.json()?;
    assert!(on_d1["items"]
        .as_array()
        .is_some_and(|a| a.iter().all(|j| j["owner"] == D1)));
    let moving = handoff_ok(&url, &["jobs", "--moving", "--json"])?.json()?;
    assert_eq!(moving["items"].as_array().map(Vec::len), Some(0));

    let show = handoff_ok(&url, &["daemon", "show", D1])?.stdout;
    assert!(
        show.contains("head space") && show.contains("sales/orders"),
        "{show}"
    );
    let moves = handoff_ok(&url, &["moves", "--json"])?.json()?;
    assert_eq!(moves["items"].as_array().map(Vec::len), Some(0));

    // Page by page: two at a time, the cursor of one page opens the next, and --all
    // gives every page.
    let first = handoff_ok(&url, &["jobs", "--limit", "2"])?.stdout;
    assert!(
        first.contains("2 of 5 jobs; the next page: --cursor"),
        "{first}"
    );
    let page = handoff_ok(&url, &["jobs", "--limit", "2", "--json"])?.json()?;
    assert_eq!(page["total"], 5);
    let next = page["next"].as_str().expect("a next page").to_owned();
    let second =
        handoff_ok(&url, &["jobs", "--limit", "2", "--cursor", &next, "--json"])?.json()?;
    let ids = |p: &serde_json::Value| -> Vec<String> {
        p["items"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|j| j["job"].as_str().unwrap_or("").to_owned())
            .collect()
    };
    let all = handoff_ok(&url, &["jobs", "--limit", "2", "--all", "--json"])?.json()?;
    assert_eq!(ids(&all).len(), 5);
    assert_eq!([ids(&page), ids(&second)].concat(), ids(&all)[..4].to_vec());
    assert!(all["next"].is_null());
    let bad = handoff(&url, &["jobs", "--cursor", "zz"])?;
    assert_eq!(bad.code, 1, "{}", bad.stderr);
    assert!(bad.stderr.contains("cursor"), "{}", bad.stderr);
    Ok(())
}

/// Register, configure, mark down and up, and remove a daemon; each refusal exits 1 with
/// its reason, each usage error exits 2.
#[tokio::test]
async fn a_daemon_lifecycle_from_the_command_line() -> Result<()> {
    let up = Up::start().await?;
    let url = up.url();
    let d = "backup9.example.net:/srv/heads/";
    handoff_ok(
        &url,
        &[
            "daemon",
            "register",
            d,
            "--head-space",
            "100GiB",
            "--labels",
            "eu,ssd",
            "--head-disk-type",
            "ssd",
        ],
    )?;
    handoff_refused(
        &url,
        &["daemon", "register", d, "--head-space", "100GiB"],
        "already_exists",
    )?;

    handoff_ok(
        &url,
        &[
            "daemon",
            "configure",
            d,
            "--assignment-enabled",
            "false",
            "--num-workers",
            "8",
        ],
    )?;
    up.settle().await?;
    let shown = handoff_ok(&url, &["daemon", "show", d, "--json"])?.json()?;
    let settings = &shown["daemon"]["settings"];
    assert_eq!(settings["assignment_enabled"], false);
    assert_eq!(settings["num_workers"], 8);
    assert_eq!(
        settings["head_disk_type"], "SSD",
        "configure keeps what it is not told to change"
    );
    assert_eq!(settings["labels"], serde_json::json!(["eu", "ssd"]));

    assert!(handoff_ok(&url, &["daemon", "down", d])?
        .stdout
        .contains("DAEMON_DOWN"));
    assert!(handoff_ok(&url, &["daemon", "down", d])?
        .stdout
        .contains("nothing changed"));
    handoff_ok(&url, &["daemon", "up", d])?;
    handoff_ok(&url, &["daemon", "remove", d])?;
    handoff_refused(&url, &["daemon", "remove", d], "daemon_removed")?;

    handoff_refused(&url, &["daemon", "remove", D1], "daemon_has_jobs")?;

    let bad = handoff(
        &url,
        &["daemon", "register", "no-directory", "--head-space", "1GiB"],
    )?;
    assert_eq!(bad.code, 2, "{}", bad.stderr);
    let bad_size = handoff(&url, &["daemon", "register", d, "--head-space", "lots"])?;
    assert_eq!(bad_size.code, 2, "{}", bad_size.stderr);
    Ok(())
}

/// Configure a project and create a replica set and a sharded cluster for it.
#[tokio::test]
async fn projects_and_jobs_are_created_from_the_command_line() -> Result<()> {
    let up = Up::start().await?;
    let url = up.url();
    handoff_ok(
        &url,
        &["project", "configure", "billing", "--label-filter", "eu"],
    )?;
    let rs = handoff_ok(
        &url,
        &[
            "job",
            "create",
            "--project",
            "billing",
            "--replica-set",
            "ledger",
            "--head-size",
            "10GiB",
        ],
    )?;
    assert!(rs.stdout.contains("billing/ledger"), "{}", rs.stdout);
    let sc = handoff_ok(
        &url,
        &[
            "job",
            "create",
            "--project",
            "billing",
            "--sharded-cluster",
            "archive",
            "--shards",
            "a,b",
            "--head-size",
            "5GiB",
            "--oplog-per-hour",
            "2GB",
        ],
    )?;
    assert!(sc.stdout.contains("created 3 job(s)"), "{}", sc.stdout);
    up.settle().await?;
    let jobs = handoff_ok(&url, &["jobs", "--project", "billing", "--json"])?.json()?;
    assert_eq!(jobs["items"].as_array().map(Vec::len), Some(4));
    let projects = handoff_ok(&url, &["projects", "--json"])?.json()?;
    assert!(projects["items"].as_array().is_some_and(|p| p
        .iter()
        .any(|p| p["project"] == "billing" && p["label_filter"] == serde_json::json!(["eu"]))));

    handoff_refused(
        &url,
        &[
            "job",
            "create",
            "--project",
            "nope",
            "--replica-set",
            "x",
            "--head-size",
            "1GiB",
        ],
        "not_found",
    )?;
    handoff_refused(
        &url,
        &[
            "job",
            "create",
            "--project",
            "billing",
            "--replica-set",
            "huge",
            "--head-size",
            "100TiB",
        ],
        "bind_failure",
    )?;
    Ok(())
}

/// A dry run prints each job, the checks passed and the head space before and after,
/// and changes nothing; the real move with --wait follows the jobs until the destination
/// completes them; a retry with the same --id changes nothing.
#[tokio::test]
async fn move_jobs_plans_moves_and_waits() -> Result<()> {
    let up = Up::start().await?;
    let url = up.url();
    let dry = handoff_ok(&url, &["move-jobs", "--from", D1, "--to", D3, "--dry-run"])?.stdout;
    for expected in [
        "(dry run)",
        "sales/orders",
        "checks passed",
        "head_space",
        "free before",
        "nothing changed",
    ] {
        assert!(dry.contains(expected), "{expected:?} missing from:\n{dry}");
    }
    up.settle().await?;
    assert_eq!(
        handoff_ok(&url, &["moves", "--json"])?.json()?["items"]
            .as_array()
            .map(Vec::len),
        Some(0)
    );

    let id = ulid::Ulid::new().to_string();
    let mut wait = Background::spawn(
        Some(&url),
        &[
            "move-jobs",
            "--from",
            D1,
            "--to",
            D3,
            "--reason",
            "server lost",
            "--id",
            &id,
            "--wait",
        ],
    )?;
    wait.wait_for_line("waiting for")?;
    // The destination reports completion, as a daemon will.
    let stack_client = up.server.connect().await?;
    let daemon = up.daemon_user(3)?;
    let move_id = CommandId::new(id.clone())?;
    let jobs = handoff_ok(&url, &["jobs", "--moving", "--json"])?.json()?;
    for j in jobs["items"].as_array().expect("a list") {
        let job = handoff_domain::JobId::new(j["job"].as_str().expect("an id"))?;
        let epoch = j["epoch"].as_u64().expect("an epoch");
        let complete = Command::CompleteJobMove(CompleteJobMove {
            head: rebuilt_head(),
            job,
            move_id: move_id.clone(),
            epoch,
        });
        send_command(&stack_client, &daemon, &new_id(), &complete)
            .await?
            .map_err(|e| anyhow::anyhow!(e.message))?;
    }
    let (code, lines) = wait.finish()?;
    assert_eq!(code, 0, "{lines:?}");
    assert!(lines.iter().any(|l| l.contains("completed")), "{lines:?}");

    up.settle().await?;
    let moves = handoff_ok(&url, &["moves"])?.stdout;
    assert!(
        moves.contains("completed") && moves.contains("server lost"),
        "{moves}"
    );
    let again = handoff_ok(
        &url,
        &[
            "move-jobs",
            "--from",
            D1,
            "--to",
            D3,
            "--reason",
            "server lost",
            "--id",
            &id,
        ],
    )?
    .stdout;
    assert!(again.contains("already applied"), "{again}");
    handoff_refused(
        &url,
        &["move-jobs", "--from", D1, "--to", D2, "--id", &id],
        "id_reused",
    )?;

    handoff_refused(
        &url,
        &["move-job", "sales/orders", "--to", D3],
        "move_to_self",
    )?;
    let one = handoff_ok(&url, &["move-job", "sales/orders", "--to", D2, "--json"])?.json()?;
    assert_eq!(one["plan"]["jobs"][0]["job"], "sales/orders");
    Ok(())
}

/// History is read from the stream and filtered by job, daemon and time; watch prints new
/// events as they come.
#[tokio::test]
async fn history_and_watch_read_the_stream() -> Result<()> {
    let up = Up::start().await?;
    let url = up.url();
    let job = handoff_ok(&url, &["history", "--job", "sales/orders"])?.stdout;
    assert!(
        job.contains("BackupJobCreated") && job.contains("JobsAssigned"),
        "{job}"
    );
    assert!(!job.contains("analytics/events"), "{job}");
    let daemon = handoff_ok(&url, &["history", "--daemon", D2, "--json"])?.stdout;
    let lines: Vec<serde_json::Value> = daemon
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    assert!(lines.iter().any(|l| l["type"] == "DaemonRegistered"));
    assert!(lines
        .iter()
        .all(|l| l["seq"].as_u64().is_some() && l["actor"].is_string()));
    assert!(!handoff_ok(&url, &["history", "--since", "1h"])?
        .stdout
        .is_empty());
    assert!(
        handoff_ok(&url, &["history", "--since", "2099-01-01T00:00:00Z"])?
            .stdout
            .is_empty()
    );
    assert_eq!(handoff(&url, &["history", "--since", "someday"])?.code, 2);

    let mut watch = Background::spawn(
        Some(&url),
        &["watch", "--daemon", D2, "--limit", "1", "--json"],
    )?;
    // Events sent before it subscribed are not shown: send until one is.
    let mut shown = None;
    for _ in 0..40 {
        handoff_ok(&url, &["daemon", "down", D2])?;
        handoff_ok(&url, &["daemon", "up", D2])?;
        if let Ok(line) =
            watch.wait_for_line_within("\"type\"", std::time::Duration::from_millis(500))
        {
            shown = Some(line);
            break;
        }
    }
    let line = shown.expect("watch printed an event");
    assert!(
        line.contains("DaemonDown") || line.contains("DaemonUp"),
        "{line}"
    );
    let (code, _) = watch.finish()?;
    assert_eq!(code, 0);
    Ok(())
}

/// Exit codes: 2 when handoff cannot be reached or the arguments are wrong.
#[tokio::test]
async fn exit_codes_tell_usage_from_refusal() -> Result<()> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let closed = format!("nats://127.0.0.1:{}", listener.local_addr()?.port());
    drop(listener);
    let unreachable = handoff(&closed, &["daemons"])?;
    assert_eq!(unreachable.code, 2);
    assert!(
        unreachable.stderr.contains("cannot connect"),
        "{}",
        unreachable.stderr
    );
    let usage = handoff(&closed, &["move-jobs", "--from", D1])?;
    assert_eq!(usage.code, 2);
    let help = handoff_ok(&closed, &["--help"])?;
    assert!(help.stdout.contains("Examples:") && help.stdout.contains("Exit codes"));
    Ok(())
}

/// `handoff up` without --nats-url starts its own nats-server and stops it on SIGTERM.
#[tokio::test]
async fn up_runs_its_own_nats_server_and_stops_it() -> Result<()> {
    let data = tempfile::tempdir()?;
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?.port()
    };
    let url = format!("nats://127.0.0.1:{port}");
    let dir = data.path().to_string_lossy().into_owned();
    let mut up = Background::spawn(None, &["up", "--data", &dir, "--port", &port.to_string()])?;
    up.wait_for_line("handoff is up")?;
    // Its server admits only its own keys: the operator's is in its secrets.
    let key = data.path().join("secrets/operator.nk");
    let key = key.to_string_lossy();
    assert_eq!(
        handoff(&url, &["daemons"])?.code,
        2,
        "admitted without a key"
    );
    let daemons = handoff_ok(&url, &["--nats-key", &key, "daemons", "--json"]);
    let (code, lines) = up.terminate()?;
    assert_eq!(
        daemons?.json()?["items"]
            .as_array()
            .map(Vec::len)
            .map(|n| n <= 3),
        Some(true)
    );
    assert_eq!(code, 0, "{lines:?}");
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "nats-server still running"
    );
    assert!(data.path().join("nats/store").exists() && data.path().join("views").exists());
    Ok(())
}

/// `handoff demo` tells the whole story on its own stack.
#[tokio::test]
async fn the_demo_tells_the_story() -> Result<()> {
    let mut demo = Background::spawn(None, &["demo"])?;
    // Its console, to watch the story in: it answers as the story runs.
    let addr = console_addr(&demo.wait_for_line("the console: http://")?)?;
    let daemons = http_get(addr, "/daemons")?;
    assert_eq!(daemons.status, 200, "{}", daemons.body);
    assert!(daemons.body.contains("signed in as"), "{}", daemons.body);
    // The whole story: a daemon lost and detected, another frozen and thawed, two
    // rebuilds, restores, the next snapshots.
    demo.wait_for_line_within("done:", TIMEOUT * 4)?;
    let (code, lines) = demo.finish()?;
    assert_eq!(code, 0, "{lines:?}");
    let text = lines.join("\n");
    for expected in [
        "DAEMON_DOWN",
        "the monitor appended DAEMON_UP",
        "process is killed",
        "refused:",
        "dry run",
        "restoring_snapshot",
        "completed",
        "removed",
        "MoveStarted",
        "at its slot",
    ] {
        assert!(
            text.contains(expected),
            "{expected:?} missing from the demo:\n{text}"
        );
    }
    // Every moved job's rebuilt head equals its source: one line per job of the dry run.
    let moving: usize = lines
        .iter()
        .find_map(|l| l.split_once(" job(s) would move"))
        .and_then(|(n, _)| n.trim().parse().ok())
        .with_context(|| format!("the dry run's count of jobs:\n{text}"))?;
    let heads = demo_step(&lines, 6, |l| l.contains(" head at "));
    assert_eq!(
        heads.len(),
        moving,
        "one checked head per moved job:\n{text}"
    );
    for line in &heads {
        assert!(
            line.ends_with("  equals the source"),
            "a head not equal to its source: {line}\n{text}"
        );
    }
    // Every shard and config server of sales/catalog is restored and verified.
    let restored = demo_step(&lines, 7, |l| l.starts_with("sales/catalog/"));
    assert_eq!(restored.len(), 3, "shard0, shard1, config:\n{text}");
    for line in &restored {
        assert!(
            line.ends_with("yes: equals the source"),
            "a restore not verified: {line}\n{text}"
        );
    }
    for wrong in ["DIFFERS", "source point not found"] {
        assert!(!text.contains(wrong), "{wrong:?} in the demo:\n{text}");
    }
    Ok(())
}

/// The lines of the demo's step `n` (from its `== n.` title to the next title) that `keep`.
fn demo_step(lines: &[String], n: usize, keep: impl Fn(&str) -> bool) -> Vec<&str> {
    lines
        .iter()
        .map(String::as_str)
        .skip_while(|l| !l.starts_with(&format!("== {n}.")))
        .skip(1)
        .take_while(|l| !l.starts_with("== "))
        .filter(|l| keep(l.trim_start()))
        .map(str::trim_start)
        .collect()
}

/// `--log-format json` logs one JSON object per line, each command with its id, kind,
/// actor and the daemon, job or move it is about; `RUST_LOG` sets the level.
#[tokio::test]
async fn services_log_structured_json() -> Result<()> {
    let server = handoff_testkit::NatsServer::start().await?;
    let dir = tempfile::tempdir()?;
    let log = dir.path().join("service.log");
    let mut command = std::process::Command::new(handoff_bin()?);
    command
        .args([
            "--nats-url",
            &server.url(),
            "--log-format",
            "json",
            "command-service",
            "--first-owner",
            &format!("admin={}", owner().0.public_key()),
        ])
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log)?);
    let mut service = handoff_testkit::Child::spawn("command-service", &mut command)?;
    let url = server.url();
    let registered = until("the command service", TIMEOUT, || {
        let url = url.clone();
        async move {
            let run = handoff(&url, &["daemon", "register", D1, "--head-space", "1GiB"])?;
            Ok((run.code == 0).then_some(run))
        }
    })
    .await?;
    assert!(registered.stdout.contains("registered"));
    // Stopped cleanly, so its last lines are flushed.
    service.terminate(TIMEOUT)?;
    let text = std::fs::read_to_string(&log)?;
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    let applied = lines
        .iter()
        .find(|l| l["fields"]["message"] == "applied")
        .unwrap_or_else(|| panic!("no 'applied' line in:\n{text}"));
    assert_eq!(applied["span"]["kind"], "RegisterDaemon");
    assert_eq!(applied["span"]["actor"], "admin");
    assert_eq!(applied["span"]["daemon"], D1);
    assert!(applied["span"]["command"]
        .as_str()
        .is_some_and(|c| c.len() == 26));
    Ok(())
}

/// `handoff up --cluster 3` runs three nats-server nodes and keeps the event stream on
/// three replicas; the CLI works against any node.
#[tokio::test]
async fn up_runs_a_three_node_cluster() -> Result<()> {
    let data = tempfile::tempdir()?;
    let dir = data.path().to_string_lossy().into_owned();
    let mut up = Background::spawn(
        None,
        &["up", "--cluster", "3", "--port", "0", "--data", &dir],
    )?;
    up.wait_for_line("handoff is up")?;
    let line = up.wait_for_line("NATS")?;
    assert!(line.contains("3-node cluster"), "{line}");
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("nats://"))
        .expect("the banner names the URL")
        .to_owned();
    let key = data.path().join("secrets/operator.nk");
    let daemons = handoff_ok(
        &url,
        &["--nats-key", &key.to_string_lossy(), "daemons", "--json"],
    )?
    .json()?;
    let seed = std::fs::read_to_string(&key)?.trim().to_owned();
    let client = async_nats::ConnectOptions::with_nkey(seed)
        .connect(&url)
        .await?;
    let js = async_nats::jetstream::new(client);
    let info = js
        .get_stream(handoff_protocol::subjects::STREAM)
        .await?
        .info()
        .await?
        .clone();
    let (code, lines) = up.terminate()?;
    assert_eq!(code, 0, "{lines:?}");
    assert_eq!(info.config.num_replicas, 3);
    assert_eq!(info.cluster.map(|c| c.replicas.len()), Some(2));
    assert_eq!(daemons["items"].as_array().map(Vec::len), Some(3));
    Ok(())
}

/// `watch --job` prints only that job's events as they happen.
#[tokio::test]
async fn watch_follows_one_job() -> Result<()> {
    use handoff_domain::command::ReportJobMovePhase;
    use handoff_domain::model::MovePhase;
    let up = Up::start().await?;
    let url = up.url();
    let moved = handoff_ok(&url, &["move-job", "sales/orders", "--to", D2, "--json"])?.json()?;
    let move_id = CommandId::new(moved["command"].as_str().expect("an id"))?;
    let epoch = moved["plan"]["jobs"][0]["epoch"]
        .as_u64()
        .expect("an epoch");
    let mut watch = Background::spawn(
        Some(&url),
        &["watch", "--job", "sales/orders", "--limit", "1"],
    )?;
    let client = up.server.connect().await?;
    let backup2 = up.daemon_user(2)?;
    // Events sent before it subscribed are not shown: report phases until one is, with
    // another daemon's event in between that must not be.
    let mut shown = None;
    for (i, phase) in [MovePhase::RestoringSnapshot, MovePhase::ReplayingOplog]
        .iter()
        .cycle()
        .take(40)
        .enumerate()
    {
        handoff_ok(
            &url,
            &["daemon", if i % 2 == 0 { "down" } else { "up" }, D1],
        )?;
        let report = Command::ReportJobMovePhase(ReportJobMovePhase {
            job: job("sales/orders"),
            move_id: move_id.clone(),
            epoch,
            phase: *phase,
        });
        send_command(&client, &backup2, &new_id(), &report)
            .await?
            .map_err(|e| anyhow::anyhow!(e.message))?;
        if let Ok(line) =
            watch.wait_for_line_within("sales/orders", std::time::Duration::from_millis(500))
        {
            shown = Some(line);
            break;
        }
    }
    let line = shown.expect("watch printed the job's event");
    assert!(line.contains("JobMovePhaseReported"), "{line}");
    let (code, lines) = watch.finish()?;
    assert_eq!(code, 0);
    assert!(
        lines
            .iter()
            .all(|l| !l.contains("DaemonDown") && !l.contains("DaemonUp")),
        "{lines:?}"
    );
    Ok(())
}

/// `handoff up` runs the data plane: `move-jobs --wait` follows a real rebuild by a daemon
/// process to its completion, with the head's point recorded in the history.
#[tokio::test]
async fn up_rebuilds_heads_for_real() -> Result<()> {
    let up = Up::start_with(&["--hour-ms", "600"]).await?;
    let url = up.url();
    let client = up.server.connect().await?;
    let stores = handoff_dataplane::store::Stores::open(client, 1).await?;
    until(
        "the first scheduled snapshot of sales/orders",
        TIMEOUT,
        || {
            let stores = stores.clone();
            async move {
                let snaps = stores.snapshots(Some(&job("sales/orders"))).await?;
                Ok(snaps.iter().any(|s| s.daemon.is_some()).then_some(()))
            }
        },
    )
    .await?;
    let out = handoff_ok(&url, &["move-job", "sales/orders", "--to", D3, "--wait"])?.stdout;
    assert!(
        out.contains("restoring_snapshot") && out.contains("replaying_oplog"),
        "{out}"
    );
    assert!(out.contains("completed"), "{out}");
    let history = handoff_ok(&url, &["history", "--job", "sales/orders"])?.stdout;
    assert!(
        history.contains("head at") && history.contains("checksum"),
        "{history}"
    );
    Ok(())
}

//! The projector as a real process: killed with SIGKILL mid-stream it resumes, and its
//! views equal a rebuild from the stream; queries answer from its views.

use std::path::Path;
use std::process::Stdio;

use anyhow::Result;
use handoff_domain::command::*;
use handoff_domain::Command;
use handoff_projector::{SledStore, ViewStore};
use handoff_testkit::Child;
use handoff_tests::*;
use serde_json::{json, Value};

use crate::moves::fleet;

/// Moves every job of `from` to `to` and completes each.
async fn move_and_complete(stack: &Stack, from: usize, to: usize) -> Result<()> {
    let applied = stack.apply(move_jobs(from, to)).await?;
    let plan = applied.plan.expect("a move has a plan");
    for j in plan.jobs {
        stack
            .report(
                to,
                Command::CompleteJobMove(CompleteJobMove {
                    head: rebuilt_head(),
                    job: j.job,
                    move_id: plan.move_id.clone(),
                    epoch: j.epoch,
                }),
            )
            .await?;
    }
    Ok(())
}

/// A projector held by its failpoint right after it wrote (and flushed) the first batch
/// of views past `past`, before it acknowledged it; its stderr goes to `log`.
fn projector_held_after_write(url: &str, dir: &Path, past: u64, log: &Path) -> Result<Child> {
    let mut command = std::process::Command::new(handoff_bin()?);
    command
        .args(["--nats-url", url, "projector", "--data"])
        .arg(dir)
        .env("RUST_LOG", "warn")
        .env(
            "HANDOFF_FAILPOINT",
            format!("projector-after-write-past:{past}"),
        )
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log)?);
    Child::spawn("projector", &mut command)
}

/// Killed with SIGKILL three times while events keep coming, each time between a write
/// of views and its acknowledgement (its failpoint holds it there: the store already
/// holds the batch, the checkpoint it answers with does not), the projector resumes
/// each time from its own store's checkpoint; at the end its views equal, key for key, a
/// rebuild from the stream into a fresh store.
#[tokio::test]
async fn a_projector_killed_mid_stream_resumes_and_equals_a_rebuild() -> Result<()> {
    let stack = Stack::start().await?;
    let dir = tempfile::tempdir()?;
    let live = dir.path().join("live");
    fleet(&stack).await?;
    for n in 0..20 {
        stack
            .apply(replica_set("p1", &format!("extra{n}"), 1))
            .await?;
    }
    for round in 0..3 {
        let before = stack.last_seq().await?;
        let log = dir.path().join(format!("projector{round}.log"));
        let mut projector = projector_held_after_write(&stack.url(), &live, before, &log)?;
        // It folds what is there, then the events of a move come while it runs.
        let (from, to) = [(1, 2), (2, 3), (3, 1)][round];
        move_and_complete(&stack, from, to).await?;
        let written: u64 = until(
            "the projector to stop at its failpoint",
            TIMEOUT,
            || async {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                Ok(text
                    .split("views written through ")
                    .nth(1)
                    .and_then(|rest| rest.split(',').next())
                    .and_then(|n| n.parse().ok()))
            },
        )
        .await?;
        let acknowledged = query(&stack.client, "status", json!({}))
            .await?
            .map_err(|e| anyhow::anyhow!("status refused: {e}"))?["checkpoint"]
            .as_u64()
            .unwrap_or(0);
        projector.kill()?;
        let stored = SledStore::open(&live)?.checkpoint()?;
        assert!(
            before < written && acknowledged < written && stored == written,
            "round {round}: killed after writing through {written} (the store holds {stored}) \
             and acknowledging only {acknowledged}, mid-stream past {before}"
        );
    }
    // Resumed, it catches up with events written while it runs; stopped cleanly
    // (SIGTERM) its last batch is flushed.
    let projector = ProjectorProcess::spawn(&stack.url(), &live, &[])?;
    move_and_complete(&stack, 1, 2).await?;
    let end = stack.last_seq().await?;
    wait_for_checkpoint(&stack.client, end).await?;
    assert!(projector.terminate()?, "the projector did not stop cleanly");

    let rebuilt = rebuild_into(&stack.url(), &dir.path().join("rebuilt"))?;

    let a = dump_views(&live)?;
    let jobs = a.iter().filter(|(k, _)| k.starts_with(b"job\0")).count();
    assert_eq!(jobs, 23, "the views hold every job");
    assert_same_views(&live, &rebuilt)
}

/// Rebuilds the views from the whole stream into `dir` (a projector of its own name, gone
/// once caught up).
fn rebuild_into(url: &str, dir: &Path) -> Result<std::path::PathBuf> {
    let rebuild = ProjectorProcess::spawn(
        url,
        dir,
        &["--name", "rebuild", "--rebuild", "--exit-when-caught-up"],
    )?;
    anyhow::ensure!(rebuild.wait()?, "the rebuild failed");
    Ok(dir.to_owned())
}

/// The views in `live` and `rebuilt` are the same keys and values.
fn assert_same_views(live: &Path, rebuilt: &Path) -> Result<()> {
    let (a, b) = (dump_views(live)?, dump_views(rebuilt)?);
    let keys = |v: &[(Vec<u8>, Vec<u8>)]| -> std::collections::BTreeSet<String> {
        v.iter()
            .map(|(k, _)| String::from_utf8_lossy(k).replace('\0', "|"))
            .collect()
    };
    let (ka, kb) = (keys(&a), keys(&b));
    assert_eq!(
        a.len(),
        b.len(),
        "only live: {:?}; only rebuilt: {:?}",
        ka.difference(&kb).collect::<Vec<_>>(),
        kb.difference(&ka).collect::<Vec<_>>()
    );
    for ((ka, va), (kb, vb)) in a.iter().zip(&b) {
        assert_eq!(
            (String::from_utf8_lossy(ka), String::from_utf8_lossy(va)),
            (String::from_utf8_lossy(kb), String::from_utf8_lossy(vb))
        );
    }
    Ok(())
}

/// A store whose views another layout wrote (here: no layout said, and a key this one
/// never writes) is rebuilt from the stream
/// at start, not resumed: it ends equal to a rebuild.
#[tokio::test]
async fn views_of_another_layout_are_rebuilt_at_start() -> Result<()> {
    let stack = Stack::start().await?;
    let dir = tempfile::tempdir()?;
    let live = dir.path().join("live");
    fleet(&stack).await?;
    let projector = ProjectorProcess::spawn(&stack.url(), &live, &[])?;
    wait_for_checkpoint(&stack.client, stack.last_seq().await?).await?;
    assert!(projector.terminate()?, "the projector did not stop cleanly");
    {
        let store = SledStore::open(&live)?;
        let at = store.checkpoint()?;
        let stale = format!("dh\0{}\0{:020}", daemon(1), 1).into_bytes();
        store.commit(
            vec![(b"meta\0format".to_vec(), None), (stale, Some(Vec::new()))],
            at,
        )?;
        store.flush()?;
    }
    let resumed = ProjectorProcess::spawn(&stack.url(), &live, &[])?;
    wait_for_checkpoint(&stack.client, stack.last_seq().await?).await?;
    assert!(resumed.terminate()?, "the projector did not stop cleanly");
    let rebuilt = rebuild_into(&stack.url(), &dir.path().join("rebuilt"))?;
    assert_same_views(&live, &rebuilt)
}

/// Queries answer from the views: assignments per daemon, jobs by daemon and moving,
/// moves with per-job phases, history by job and by daemon.
#[tokio::test]
async fn queries_answer_from_the_views() -> Result<()> {
    let stack = Stack::start().await?;
    let dir = tempfile::tempdir()?;
    let _projector = ProjectorProcess::spawn(&stack.url(), dir.path(), &[])?;
    fleet(&stack).await?;
    let applied = stack.apply(move_job("p1/rs0", 2)).await?;
    let move_id = applied.plan.expect("plan").move_id;
    wait_for_checkpoint(&stack.client, stack.last_seq().await?).await?;

    let c = &stack.client;
    let assignments = query(c, "assignments", json!({ "daemon": daemon(1) }))
        .await?
        .expect("answered");
    assert_eq!(assignments["items"].as_array().map(Vec::len), Some(2));
    assert_eq!(assignments["total"], 2);
    let incoming = query(c, "assignments", json!({ "daemon": daemon(2) }))
        .await?
        .expect("answered");
    assert_eq!(incoming["items"][0]["moving_in"], json!(move_id));
    assert_eq!(incoming["items"][0]["epoch"], json!(2));

    let moving = query(c, "jobs", json!({ "moving": true }))
        .await?
        .expect("answered");
    assert_eq!(moving["items"].as_array().map(Vec::len), Some(1));
    assert_eq!(moving["total"], 1);
    let on_1 = query(c, "jobs", json!({ "daemon": daemon(1) }))
        .await?
        .expect("answered");
    assert_eq!(
        on_1["items"].as_array().map(Vec::len),
        Some(3),
        "the moving job still involves its source"
    );
    assert_eq!(on_1["total"], 3);

    // A project's jobs, and only its own: p1's name starts p10's.
    stack.apply(configure_project("p10")).await?;
    stack.apply(replica_set("p10", "rs0", 1)).await?;
    wait_for_checkpoint(&stack.client, stack.last_seq().await?).await?;
    for (project, jobs) in [
        ("p1", vec!["p1/rs0", "p1/rs1", "p1/rs2"]),
        ("p10", vec!["p10/rs0"]),
    ] {
        let page = query(c, "jobs", json!({ "project": project, "limit": 2 }))
            .await?
            .expect("answered");
        assert_eq!(page["total"], jobs.len(), "{project}");
        let mut listed: Vec<Value> = page["items"].as_array().cloned().unwrap_or_default();
        if let Some(next) = page.get("next") {
            let rest = query(
                c,
                "jobs",
                json!({ "project": project, "limit": 2, "cursor": next }),
            )
            .await?
            .expect("answered");
            assert!(rest.get("next").is_none());
            listed.extend(rest["items"].as_array().cloned().unwrap_or_default());
        }
        let ids: Vec<&str> = listed.iter().filter_map(|j| j["job"].as_str()).collect();
        assert_eq!(ids, jobs, "{project}");
    }
    // With two filters each page reads the smaller list, which may change between pages:
    // a cursor names a job in any of them. Here the first page reads the project's
    // records, the second daemon 1's jobs (daemon 1's list is as long, and is read first).
    let first = query(c, "jobs", json!({ "project": "p1", "limit": 2 }))
        .await?
        .expect("answered");
    let next = first["next"].clone();
    let rest = query(
        c,
        "jobs",
        json!({ "project": "p1", "daemon": daemon(1), "limit": 2, "cursor": next }),
    )
    .await?
    .expect("answered");
    assert_eq!(rest["items"][0]["job"], "p1/rs2", "{rest}");
    assert_eq!(rest["items"].as_array().map(Vec::len), Some(1));
    assert_eq!(rest["total"], 3, "daemon 1's three jobs, all of p1: {rest}");
    // A cursor of another project's list is not one of this list's.
    let p10 = query(c, "jobs", json!({ "project": "p10", "limit": 1 }))
        .await?
        .expect("answered");
    assert!(p10.get("next").is_none());
    let foreign = hex(b"p10/rs0");
    let refused = c
        .request(
            handoff_protocol::subjects::query("jobs"),
            serde_json::to_vec(&json!({ "project": "p1", "cursor": foreign }))?.into(),
        )
        .await?;
    let refused: Value = serde_json::from_slice(&refused.payload)?;
    assert_eq!(refused["error"]["reason"], "bad_cursor", "{refused}");
    // The same when the page would read daemon 1's list rather than p1's records.
    let filter = json!({ "project": "p1", "daemon": daemon(1), "cursor": hex(b"p10/rs0") });
    let refused = c
        .request(
            handoff_protocol::subjects::query("jobs"),
            serde_json::to_vec(&filter)?.into(),
        )
        .await?;
    let refused: Value = serde_json::from_slice(&refused.payload)?;
    assert_eq!(refused["error"]["reason"], "bad_cursor", "{refused}");

    let mv = query(c, "move", json!({ "move_id": move_id }))
        .await?
        .expect("answered");
    assert_eq!(mv["status"], "in_progress");
    assert_eq!(mv["jobs"]["p1/rs0"], "requested");
    assert_eq!(mv["actor"], "admin");

    let history = query(c, "history", json!({ "job": "p1/rs0" }))
        .await?
        .expect("answered");
    assert_eq!(history["total"], 6);
    let kinds: Vec<_> = history["items"]
        .as_array()
        .expect("a list")
        .iter()
        .map(|h| h["type"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(
        kinds,
        [
            "BackupJobCreated",
            "JobsAssigned",
            "MoveStarted",
            "JobMoveStarted",
            "JobsReleased",
            "JobsAssigned"
        ]
    );
    // A daemon's history holds the move and the jobs it was told to take, not each
    // job's steps (those are the job's history and the move's view).
    let by_daemon = query(c, "history", json!({ "daemon": daemon(2) }))
        .await?
        .expect("answered");
    let types: Vec<&str> = by_daemon["items"]
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|h| h["type"].as_str())
        .collect();
    assert!(
        types.contains(&"MoveStarted") && types.contains(&"JobsAssigned"),
        "{types:?}"
    );
    assert!(
        !types
            .iter()
            .any(|t| ["JobMoveStarted", "JobMoveCompleted", "BackupJobCreated"].contains(t)),
        "{types:?}"
    );

    let unknown = query(c, "job", json!({ "job": "p1/nope" }))
        .await?
        .expect_err("unknown");
    assert_eq!(unknown["code"], "not_found");
    let malformed = query(c, "job", json!({ "job": "a.b" }))
        .await?
        .expect_err("malformed");
    assert_eq!(malformed["code"], "validation");

    // The daemon view reflects the head space taken by the incoming job.
    let d2 = query(c, "daemon", json!({ "daemon": daemon(2) }))
        .await?
        .expect("answered");
    assert_eq!(d2["used_bytes"], json!(10u64 << 30));
    // Removing daemons shows up too.
    stack.apply(register(7, settings(1))).await?;
    stack
        .apply(Command::RemoveDaemon(RemoveDaemon { daemon: daemon(7) }))
        .await?;
    wait_for_checkpoint(c, stack.last_seq().await?).await?;
    let d7 = query(c, "daemon", json!({ "daemon": daemon(7) }))
        .await?
        .expect("answered");
    assert_eq!(d7["status"]["status"], "removed");
    Ok(())
}

/// A gap in the stream is never skipped: with an event missing (a stream whose deletes
/// are allowed, unlike handoff's), the projector stops at the event before it and says
/// which one is missing.
#[tokio::test]
async fn a_missing_event_stops_the_projector_instead_of_being_skipped() -> Result<()> {
    let server = handoff_testkit::NatsServer::start().await?;
    let client = server.connect().await?;
    let js = async_nats::jetstream::new(client.clone());
    let config = handoff_eventlog::Config {
        stream: "GAPPY".into(),
        subjects: vec!["gappy.>".into()],
        ..Default::default()
    };
    let stream = js
        .create_stream(async_nats::jetstream::stream::Config {
            name: config.stream.clone(),
            subjects: config.subjects.clone(),
            allow_atomic_publish: true,
            ..Default::default()
        })
        .await?;
    // Three valid events, then the second one deleted.
    let actor = handoff_domain::Actor::new("admin")?;
    for n in 1..=3u8 {
        let envelope = handoff_protocol::EventEnvelope {
            event: handoff_domain::Event::DaemonRegistered {
                daemon: daemon(n as usize),
                settings: settings(1),
            },
            version: handoff_domain::Event::VERSION,
            command: new_id(),
            actor: actor.clone(),
            at: 0,
            last: true,
            digest: "0".into(),
            signature: None,
        };
        js.publish(format!("gappy.daemon.{n}"), envelope.encode().into())
            .await?
            .await?;
    }
    assert!(stream.delete_message(2).await?);

    let dir = tempfile::tempdir()?;
    let mut projector_config = handoff_projector::Config::new(dir.path());
    projector_config.event_log = config;
    projector_config.serve_queries = false;
    let projector = handoff_projector::start(client, projector_config).await?;
    let checkpoint = projector.checkpoint();
    let result = tokio::time::timeout(TIMEOUT, projector.run(std::future::pending())).await?;
    assert!(
        matches!(
            result,
            Err(handoff_projector::Error::Missing {
                missing: 2,
                checkpoint: 1
            })
        ),
        "{result:?}"
    );
    assert_eq!(*checkpoint.borrow(), 1, "nothing after the gap was folded");
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

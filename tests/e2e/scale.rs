//! A fleet at size: 200 daemons and 20,000 jobs behind a server whose payload limit is
//! 128 KiB. Every list query pages through to exactly its total, in a stable order, and
//! no reply outgrows the limit: pages hold fewer items when more would not fit.

use std::collections::BTreeSet;

use anyhow::{ensure, Result};
use handoff_domain::command::CreateBackupJobs;
use handoff_domain::ids::DeploymentName;
use handoff_domain::model::{Deployment, JobSize, Shard};
use handoff_domain::Command;
use handoff_testkit::NatsServer;
use handoff_tests::*;
use serde_json::{json, Value};

const MAX_PAYLOAD: usize = 128 * 1024;
const DAEMONS: usize = 200;
/// Clusters of 49 shards and their config servers: 50 jobs each.
const CLUSTERS: usize = 400;
const JOBS: usize = CLUSTERS * 50;

/// A whole list, page after page, and what the pages looked like.
struct Paged {
    items: Vec<Value>,
    total: u64,
    pages: usize,
    /// A page that was not the last and held fewer items than asked: cut by size.
    cut_by_size: bool,
}

async fn pages(
    client: &async_nats::Client,
    name: &str,
    filter: Value,
    limit: u64,
) -> Result<Paged> {
    let mut out = Paged {
        items: Vec::new(),
        total: 0,
        pages: 0,
        cut_by_size: false,
    };
    let mut cursor: Option<String> = None;
    loop {
        let mut body = filter.clone();
        body["limit"] = json!(limit);
        if let Some(c) = &cursor {
            body["cursor"] = json!(c);
        }
        let reply = client
            .request(
                handoff_protocol::subjects::query(name),
                serde_json::to_vec(&body)?.into(),
            )
            .await?;
        // A reply over the server's limit would never arrive: that it did is the check.
        let mut v: Value = serde_json::from_slice(&reply.payload)?;
        let page = v["ok"].take();
        ensure!(!page.is_null(), "{name} {body}: {v}");
        let items = page["items"].as_array().cloned().unwrap_or_default();
        let total = page["total"].as_u64().unwrap_or(u64::MAX);
        ensure!(
            out.pages == 0 || total == out.total,
            "{name}: the total moved from {} to {total}",
            out.total
        );
        out.total = total;
        out.pages += 1;
        cursor = page["next"].as_str().map(str::to_owned);
        if cursor.is_some() && (items.len() as u64) < limit {
            out.cut_by_size = true;
        }
        out.items.extend(items);
        if cursor.is_none() {
            return Ok(out);
        }
        ensure!(out.pages < 10_000, "{name}: no end");
    }
}

fn field(items: &[Value], key: &str) -> Vec<String> {
    items
        .iter()
        .map(|v| v[key].as_str().unwrap_or_default().to_owned())
        .collect()
}

fn strictly_ascending(ids: &[String]) -> bool {
    ids.windows(2).all(|w| w[0] < w[1])
}

fn cluster(n: usize) -> Command {
    let size = JobSize {
        head_size_bytes: 1 << 30,
        oplog_bytes_per_hour: 1 << 20,
    };
    let name = |s: String| DeploymentName::new(s).expect("a valid name");
    Command::CreateBackupJobs(CreateBackupJobs {
        project: project("p"),
        deployment: Deployment::ShardedCluster {
            name: name(format!("c{n:03}")),
            shards: (0..49)
                .map(|i| Shard {
                    name: name(format!("s{i:02}")),
                    size,
                })
                .collect(),
            config_servers: size,
        },
    })
}

#[tokio::test]
async fn every_list_pages_through_a_fleet_of_200_daemons_and_20000_jobs() -> Result<()> {
    let server = NatsServer::start_configured(&format!("max_payload: {MAX_PAYLOAD}")).await?;
    let commands = CommandService::start(&server.url(), Default::default()).await?;
    let client = server.connect().await?;
    ensure!(
        client.max_payload() == MAX_PAYLOAD,
        "the server's limit is {}",
        client.max_payload()
    );
    let stack = Stack::on(server, client, Some(commands))?;
    let dir = tempfile::tempdir()?;
    let _projector = ProjectorProcess::spawn(&stack.url(), dir.path(), &[])?;

    for n in 1..=DAEMONS {
        stack.apply(register(n, settings(1000))).await?;
    }
    stack.apply(configure_project("p")).await?;
    for c in 0..CLUSTERS {
        stack.apply(cluster(c)).await?;
    }
    let moved = stack.apply(move_jobs(1, 2)).await?;
    let plan = moved.plan.expect("a move has a plan");
    // Six more moves, of one job each, and ten daemons reported down (ten alerts).
    let mut singles = Vec::new();
    let before = {
        let mut s = handoff_domain::State::default();
        for r in &stack.events().await? {
            s.apply(&r.envelope.event);
        }
        s
    };
    let still: Vec<_> = before
        .jobs
        .iter()
        .filter(|(_, j)| {
            matches!(
                j.assignment,
                handoff_domain::state::Assignment::Assigned { .. }
            )
        })
        .take(6)
        .map(|(id, j)| (id.clone(), j.owner().clone()))
        .collect();
    for (id, owner) in still {
        let to = (3..).find(|d| daemon(*d) != owner).expect("a daemon");
        let m = stack.apply(move_job(id.as_str(), to)).await?;
        singles.push(m.command);
    }
    for n in 150..160 {
        stack
            .apply(Command::ReportDaemonLiveness(
                handoff_domain::command::ReportDaemonLiveness {
                    daemon: daemon(n),
                    up: false,
                },
            ))
            .await?;
    }
    let events = stack.events().await?;
    wait_for_checkpoint(&stack.client, events.last().map_or(0, |r| r.seq)).await?;
    let state = {
        let mut s = handoff_domain::State::default();
        for r in &events {
            s.apply(&r.envelope.event);
        }
        s
    };
    let c = &stack.client;

    let daemons = pages(c, "daemons", json!({}), 1000).await?;
    assert_eq!(
        (daemons.items.len(), daemons.total),
        (DAEMONS, DAEMONS as u64)
    );
    assert!(strictly_ascending(&field(&daemons.items, "daemon")));

    // 20,000 job views do not fit in pages of 1,000 under 128 KiB: the pages are cut.
    let jobs = pages(c, "jobs", json!({}), 1000).await?;
    assert_eq!((jobs.items.len(), jobs.total), (JOBS, JOBS as u64));
    let ids = field(&jobs.items, "job");
    assert!(strictly_ascending(&ids), "a stable order, each job once");
    assert_eq!(
        ids,
        state.jobs.keys().map(|j| j.to_string()).collect::<Vec<_>>()
    );
    assert!(
        jobs.cut_by_size,
        "some page was cut to fit the payload limit"
    );
    assert!(jobs.pages > JOBS / 1000);

    let of_project = pages(c, "jobs", json!({ "project": "p" }), 500).await?;
    assert_eq!(
        (of_project.items.len(), of_project.total),
        (JOBS, JOBS as u64)
    );

    let d1 = daemon(1).to_string();
    let on_1 = pages(c, "jobs", json!({ "daemon": d1 }), 30).await?;
    let involved = state
        .jobs
        .values()
        .filter(|j| {
            j.owner() == &daemon(1)
                || matches!(&j.assignment, handoff_domain::state::Assignment::Moving { from, .. } if *from == daemon(1))
        })
        .count();
    assert_eq!((on_1.items.len(), on_1.total), (involved, involved as u64));
    assert!(on_1.pages > 1);

    let moving_now = plan.jobs.len() + singles.len();
    let moving = pages(c, "jobs", json!({ "moving": true }), 1000).await?;
    assert_eq!(
        (moving.items.len(), moving.total),
        (moving_now, moving_now as u64)
    );
    let not_moving = pages(c, "jobs", json!({ "moving": false }), 1000).await?;
    assert_eq!(not_moving.total as usize, JOBS - moving_now);
    assert_eq!(not_moving.items.len(), JOBS - moving_now);
    // Two filters: the total is counted, and still exact.
    let moving_from_1 = pages(c, "jobs", json!({ "daemon": d1, "moving": true }), 7).await?;
    assert_eq!(
        (moving_from_1.items.len(), moving_from_1.total),
        (plan.jobs.len(), plan.jobs.len() as u64)
    );

    let d2 = daemon(2);
    let assigned = pages(c, "assignments", json!({ "daemon": d2 }), 25).await?;
    let owned = state.daemons[&d2].jobs.len();
    assert_eq!(
        (assigned.items.len(), assigned.total),
        (owned, owned as u64)
    );
    assert!(strictly_ascending(&field(&assigned.items, "job")));

    // Newest first, two by two; their jobs counted by phase, not named.
    let moves = pages(c, "moves", json!({}), 2).await?;
    assert_eq!((moves.items.len(), moves.total, moves.pages), (7, 7, 4));
    let ids = field(&moves.items, "move_id");
    let mut newest_first: Vec<String> = singles.iter().map(|m| m.to_string()).collect();
    newest_first.push(plan.move_id.to_string());
    newest_first.sort();
    newest_first.reverse();
    assert_eq!(ids, newest_first);
    assert!(moves
        .items
        .iter()
        .all(|m| m.get("jobs").is_none() && m["phases"].is_object()));
    let open = pages(c, "moves", json!({ "status": "in_progress" }), 3).await?;
    assert_eq!((open.items.len(), open.total), (7, 7));
    let done = pages(c, "moves", json!({ "status": "completed" }), 10).await?;
    assert_eq!((done.items.len(), done.total), (0, 0));

    let job = &plan.jobs[0].job;
    let history = pages(c, "history", json!({ "job": job }), 2).await?;
    let of_job = events
        .iter()
        .filter(|r| r.envelope.event.jobs().contains(&job))
        .count();
    assert_eq!(
        (history.items.len(), history.total),
        (of_job, of_job as u64)
    );
    let seqs = |items: &[Value]| -> Vec<u64> {
        items
            .iter()
            .map(|h| h["seq"].as_u64().unwrap_or(0))
            .collect()
    };
    assert!(
        seqs(&history.items).windows(2).all(|w| w[0] < w[1]),
        "oldest first"
    );
    // Exactly the daemon's events, oldest first, seven a page: the pages cross the
    // blocks a history is stored in.
    let of_d1: Vec<u64> = events
        .iter()
        .filter(|r| r.envelope.event.daemons().contains(&&daemon(1)))
        .map(|r| r.seq)
        .collect();
    let blocks: BTreeSet<u64> = of_d1.iter().map(|s| s / 4096).collect();
    assert!(
        blocks.len() > 2,
        "{} events in blocks {blocks:?}",
        of_d1.len()
    );
    let history = pages(c, "history", json!({ "daemon": d1 }), 7).await?;
    assert_eq!(history.total, of_d1.len() as u64);
    assert_eq!(seqs(&history.items), of_d1);

    // Ten DAEMON_DOWN, newest first, three a page; of another type, none.
    let alerts = pages(c, "alerts", json!({}), 3).await?;
    assert_eq!(
        (alerts.items.len(), alerts.total, alerts.pages),
        (10, 10, 4)
    );
    let raised: Vec<u64> = alerts
        .items
        .iter()
        .map(|a| a["raised_seq"].as_u64().unwrap_or(0))
        .collect();
    assert!(
        raised.windows(2).all(|w| w[0] > w[1]),
        "newest first: {raised:?}"
    );
    let down = pages(
        c,
        "alerts",
        json!({ "type": "DAEMON_DOWN", "all": true }),
        4,
    )
    .await?;
    assert_eq!(down.total, 10);
    let stuck = pages(c, "alerts", json!({ "type": "MOVE_STUCK" }), 4).await?;
    assert_eq!((stuck.items.len(), stuck.total), (0, 0));

    // What no list gave out is refused, and so is a page size out of range.
    for bad in [
        json!({ "cursor": "zz" }),
        json!({ "limit": 0 }),
        json!({ "limit": 1001 }),
    ] {
        let e = query(c, "jobs", bad.clone()).await?.expect_err("refused");
        assert_eq!(e["code"], "validation", "{bad}: {e}");
    }
    Ok(())
}

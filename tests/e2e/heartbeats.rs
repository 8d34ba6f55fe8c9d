//! A daemon goes on heartbeating while its job work hangs and is stopped and started
//! again. The work is held in a command send that the command service never answers (the
//! daemon's connection loses every command it publishes, as a one-way partition would),
//! and the daemon is told to stop that work (the job comes back to it at a newer epoch,
//! so the old work must end before the new one starts). Heartbeats once took the lock of
//! the running jobs, which the daemon's loop held while it waited for a task to wind
//! down: they stopped. Now the loop owns the bookkeeping and a report races the work's
//! stop, so the work ends at once; this checks the heartbeats never wait on any of it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, Result};
use futures::StreamExt;
use handoff_dataplane::store::{Heartbeat, Stores};
use handoff_domain::command::FailJobMove;
use handoff_domain::Command;
use handoff_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A TCP proxy in front of the nats-server that, once armed, drops every message the
/// client publishes on `handoff.cmd.>` (its command requests) and keeps their bodies.
struct CommandBlackHole {
    port: u16,
    armed: Arc<Mutex<bool>>,
    dropped: Arc<Mutex<Vec<serde_json::Value>>>,
    task: tokio::task::JoinHandle<()>,
}

impl CommandBlackHole {
    async fn start(upstream: u16) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let armed = Arc::new(Mutex::new(false));
        let dropped = Arc::new(Mutex::new(Vec::new()));
        let (a, d) = (armed.clone(), dropped.clone());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                    continue;
                };
                let (mut from_server, to_server) = server.into_split();
                let (from_client, mut to_client) = client.into_split();
                tokio::spawn(async move {
                    // Ignored: a connection ends when either side closes it.
                    let _ = tokio::io::copy(&mut from_server, &mut to_client).await;
                });
                tokio::spawn(filter(from_client, to_server, a.clone(), d.clone()));
            }
        });
        Ok(CommandBlackHole {
            port,
            armed,
            dropped,
            task,
        })
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn arm(&self) {
        *self.armed.lock().expect("not poisoned") = true;
    }

    /// The epochs of the dropped commands that carry one.
    fn dropped_epochs(&self) -> Vec<u64> {
        self.dropped
            .lock()
            .expect("not poisoned")
            .iter()
            .filter_map(|r| r["command"]["epoch"].as_u64())
            .collect()
    }
}

impl Drop for CommandBlackHole {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Relays the client's side of the NATS protocol, but for the command publishes.
async fn filter(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    armed: Arc<Mutex<bool>>,
    dropped: Arc<Mutex<Vec<serde_json::Value>>>,
) -> std::io::Result<()> {
    let mut pending = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = from.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        pending.extend_from_slice(&chunk[..n]);
        let mut out = Vec::new();
        while let Some(eol) = pending.windows(2).position(|w| w == b"\r\n") {
            let line = String::from_utf8_lossy(&pending[..eol]).into_owned();
            let words: Vec<&str> = line.split_whitespace().collect();
            let op = words.first().map(|w| w.to_ascii_uppercase());
            // PUB subject [reply] size; HPUB subject [reply] header-size total-size.
            let (size, headers) = match op.as_deref() {
                Some("PUB") => (words.last().and_then(|w| w.parse().ok()), 0),
                Some("HPUB") => (
                    words.last().and_then(|w| w.parse().ok()),
                    words[words.len() - 2].parse().unwrap_or(0),
                ),
                _ => (None, 0),
            };
            let whole = eol + 2 + size.map_or(0, |s: usize| s + 2);
            if pending.len() < whole {
                break;
            }
            let command =
                size.is_some() && words.get(1).is_some_and(|s| s.starts_with("handoff.cmd."));
            if command && *armed.lock().expect("not poisoned") {
                let body = &pending[eol + 2 + headers..whole - 2];
                if let Ok(v) = serde_json::from_slice(body) {
                    dropped.lock().expect("not poisoned").push(v);
                }
            } else {
                out.extend_from_slice(&pending[..whole]);
            }
            pending.drain(..whole);
        }
        to.write_all(&out).await?;
    }
}

#[tokio::test]
async fn heartbeats_go_on_while_a_jobs_work_is_slow_to_stop() -> Result<()> {
    let stack = Stack::start().await?;
    stack.apply(register(1, settings(100))).await?;
    stack.apply(configure_project("p")).await?;
    stack.apply(replica_set("p", "a", 1)).await?;
    stack.apply(register(2, settings(100))).await?;

    // Daemon 2 runs in this process, its connection through the black hole.
    let hole = CommandBlackHole::start(stack.server.port()).await?;
    let stores = Stores::open(async_nats::connect(hole.url()).await?, 1).await?;
    let dir = tempfile::tempdir()?;
    let config = handoff_dataplane::daemon::Config {
        id: daemon(2),
        head_dir: dir.path().join("heads"),
        settings: settings(100),
        heartbeat_ms: 100,
        creds: stack.daemon_user(2).await?,
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(handoff_dataplane::daemon::run(stores, config, async move {
        // Ignored: a dropped sender stops the daemon too.
        let _ = stopped.await;
    }));
    let watcher = Stores::open(stack.client.clone(), 1).await?;
    let key = handoff_protocol::subjects::daemon_key(&daemon(2));
    until("daemon 2's first heartbeat", TIMEOUT, || async {
        Ok(watcher.heartbeats.entry(key.as_str()).await?.map(|_| ()))
    })
    .await?;

    // The job moves to daemon 2, whose rebuild reports its phase: a send that never
    // gets an answer, retried for minutes.
    hole.arm();
    let plan = stack
        .apply(move_job("p/a", 2))
        .await?
        .plan
        .context("a move has a plan")?;
    let first = plan.jobs[0].epoch;
    until("the rebuild's phase report to hang", TIMEOUT, || async {
        Ok(hole.dropped_epochs().contains(&first).then_some(()))
    })
    .await?;
    // The move is given up and the job moved to daemon 2 again: its work at the first
    // epoch must stop before the work at the new one starts.
    stack
        .apply(Command::FailJobMove(FailJobMove {
            job: job("p/a"),
            move_id: plan.move_id.clone(),
            epoch: first,
            reason: "given up by the test".into(),
        }))
        .await?;
    let again = stack
        .apply(move_job("p/a", 2))
        .await?
        .plan
        .context("a move has a plan")?;
    let second = again.jobs[0].epoch;

    // Twenty heartbeats in a row, none more than a second after the one before.
    let mut beats = watcher.heartbeats.watch(key.as_str()).await?;
    let mut at = Vec::new();
    while at.len() < 20 {
        let e = tokio::time::timeout(Duration::from_secs(2), beats.next())
            .await
            .with_context(|| format!("no heartbeat for 2 s after {} of them", at.len()))?
            .context("the watch ended")??;
        let hb: Heartbeat = serde_json::from_slice(&e.value)?;
        at.push(hb.at_ms);
    }
    let gaps: Vec<u64> = at.windows(2).map(|w| w[1].saturating_sub(w[0])).collect();
    assert!(
        gaps.iter().all(|g| *g < 1000),
        "heartbeat gaps (ms): {gaps:?}"
    );
    // Meanwhile the old work was stopped and the new one started, its own phase report
    // lost in the same hole: the daemon's loop stopped and started work while it kept
    // heartbeating.
    until(
        "the work at the new epoch to report its phase",
        TIMEOUT,
        || async { Ok(hole.dropped_epochs().contains(&second).then_some(())) },
    )
    .await?;

    // Ignored: the daemon may have stopped already.
    let _ = stop.send(());
    running.abort();
    Ok(())
}

//! (g) A soak: the local stack (`handoff up`: its nats-server, the services, the agent, the
//! monitor and the sample fleet's daemon processes) with every sample job moved round the
//! daemons by `handoff move-job --wait`, each move a real rebuild, for
//! `HANDOFF_SOAK_MINUTES` (default 10). Printed each minute: the moves completed and the
//! resident memory of every process, read every second: each minute's peak and median.
//! Targets: the last minute's move rate within 90% of the first's, and every handoff
//! process's memory within 1.25x of its figure after the second minute, read as both its
//! peak and its median over the last minute against those over the second. A daemon's
//! memory swings with the rebuilds it runs (71 to 138 MiB read once a minute in one run,
//! with no trend), so one reading against another says when each fell more than whether
//! memory grew; a rise in either the peaks or the medians says it grew.
//!
//! The workload is steady, as a long soak needs: every simulated collection is at its
//! working size ([`SIZE`]) from the start, and each job rests [`REST`] on a daemon between
//! its moves, with snapshot slots every [`HOUR_MS`] x 6 ms, so the job is at rest over most
//! of its slots. A job moved back to back never is: no snapshot is taken while a job moves
//! (and a missed one waits for the next regular slot), so each of its rebuilds replays
//! all the oplog since its last snapshot, longer every minute.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::process::status_mib;
use crate::verdict;

const MINUTE: Duration = Duration::from_secs(60);
/// How often each process's resident memory is read.
const SAMPLE_EVERY: Duration = Duration::from_secs(1);
/// Each sample job's data: the simulated collection's working size.
const SIZE: &str = "4MiB";
/// How long a job stays on a daemon between its moves.
const REST: Duration = Duration::from_secs(1);
/// An hour of snapshot schedule: the sample's 6-hour interval lasts 6 s.
const HOUR_MS: &str = "1000";

/// `handoff up` as a child, stopped (as Ctrl-C would) by [`Up::stop`], killed if dropped.
struct Up {
    child: Child,
    reach: Reach,
}

/// Where the stack answers, and as whom: what a CLI call needs.
#[derive(Clone)]
struct Reach {
    url: String,
    creds: PathBuf,
}

impl Up {
    async fn start(bin: &Path, data: &Path) -> Result<Up> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mut child = Command::new(bin)
            .args(["up", "--data"])
            .arg(data)
            .args(["--port", &port.to_string()])
            // A steady workload: every collection at its working size from the start, and
            // snapshot slots short enough that jobs at rest between moves reach them.
            .args([
                "--initial-size",
                SIZE,
                "--max-size",
                SIZE,
                "--hour-ms",
                HOUR_MS,
            ])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
        let (mut url, mut creds) = (None, None);
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(line) = tokio::time::timeout(left, lines.next_line()).await else {
                bail!("handoff up was not up within 180 s");
            };
            let Some(line) = line? else {
                bail!("handoff up ended before it was up");
            };
            if let Some(u) = line.trim().strip_prefix("export HANDOFF_NATS_URL=") {
                url = Some(u.to_owned());
            }
            if let Some(c) = line.trim().strip_prefix("export HANDOFF_CREDS=") {
                creds = Some(PathBuf::from(c));
            }
            if line.starts_with("Ctrl-C stops everything") {
                break;
            }
        }
        // The rest of its output is not read: drained, so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Up {
            child,
            reach: Reach {
                url: url.context("no NATS url printed")?,
                creds: creds.context("no credentials printed")?,
            },
        })
    }

    fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            // SAFETY: a signal to our own child's pid.
            unsafe { libc::kill(pid as i32, libc::SIGINT) };
        }
        if tokio::time::timeout(Duration::from_secs(60), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

/// A `handoff` CLI call on the stack: its stdout when it succeeded, or, when it failed,
/// why: the last line of its stderr, after the line of its stdout that gave a failed
/// job's reason (`move-job --wait` prints `(THEFT_FAILED: <reason>)`), if any.
async fn cli(bin: &Path, to: &Reach, args: &[&str]) -> Result<Result<String, String>> {
    let out = Command::new(bin)
        .args(["--nats-url", &to.url, "--creds"])
        .arg(&to.creds)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await?;
    if out.status.success() {
        return Ok(Ok(String::from_utf8_lossy(&out.stdout).into_owned()));
    }
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    let detail = stdout.lines().find(|l| l.contains("(THEFT_FAILED: "));
    let why = stderr.lines().rev().find(|l| !l.trim().is_empty());
    let why = why.unwrap_or("no reason given");
    Ok(Err(match detail {
        Some(d) => format!("{}; {why}", d.trim()),
        None => why.to_owned(),
    }))
}

/// `handoff up` and its children (daemons, nats-server), by a name for each.
fn processes(up: u32) -> BTreeMap<String, u32> {
    let mut out = BTreeMap::from([("handoff up (services, agent, monitor)".to_owned(), up)]);
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    let mut daemons = 0;
    for entry in dir.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...
        let Some((comm, rest)) = stat.split_once(") ") else {
            continue;
        };
        let comm = comm.rsplit('(').next().unwrap_or_default();
        let ppid: u32 = rest
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        if ppid != up {
            continue;
        }
        if comm.starts_with("nats-server") {
            out.insert(format!("nats-server {pid}"), pid);
        } else if comm.starts_with("handoff") {
            daemons += 1;
            out.insert(format!("daemon process {daemons}"), pid);
        }
    }
    out
}

/// A process's resident memory over a minute, read every [`SAMPLE_EVERY`].
#[derive(Clone, Copy)]
struct Figures {
    peak: f64,
    median: f64,
}

impl Figures {
    fn of(mut samples: Vec<f64>) -> Figures {
        samples.sort_by(f64::total_cmp);
        Figures {
            peak: samples.last().copied().unwrap_or(0.0),
            median: samples.get(samples.len() / 2).copied().unwrap_or(0.0),
        }
    }
}

fn memory(procs: &BTreeMap<String, u32>) -> BTreeMap<String, f64> {
    procs
        .iter()
        .filter_map(|(name, pid)| Some((name.clone(), status_mib(*pid, "VmRSS:")?)))
        .collect()
}

pub async fn run() -> Result<()> {
    let minutes: u64 = std::env::var("HANDOFF_SOAK_MINUTES")
        .ok()
        .and_then(|m| m.parse().ok())
        .unwrap_or(10)
        .max(3);
    println!("(g) soak: the sample jobs moved round the daemons with real rebuilds on `handoff up`, {minutes} minutes");
    let bin = std::env::current_exe()?.with_file_name("handoff");
    if !bin.exists() {
        bail!("{} is missing: scripts/bench builds it", bin.display());
    }
    let data = tempfile::Builder::new().prefix("handoff-soak-").tempdir()?;
    let up = Up::start(&bin, data.path()).await?;
    let result = soak(&bin, &up, minutes).await;
    up.stop().await;
    result
}

async fn soak(bin: &Path, up: &Up, minutes: u64) -> Result<()> {
    let daemons: serde_json::Value = serde_json::from_str(
        &cli(bin, &up.reach, &["--json", "daemons"])
            .await?
            .map_err(|why| anyhow::anyhow!("handoff daemons failed: {why}"))?,
    )?;
    let daemons: Vec<String> = daemons["items"]
        .as_array()
        .context("no daemons")?
        .iter()
        .filter_map(|d| d["daemon"].as_str().map(str::to_owned))
        .collect();
    let jobs: serde_json::Value = serde_json::from_str(
        &cli(bin, &up.reach, &["--json", "jobs"])
            .await?
            .map_err(|why| anyhow::anyhow!("handoff jobs failed: {why}"))?,
    )?;
    let jobs: Vec<(String, String)> = jobs["items"]
        .as_array()
        .context("no jobs")?
        .iter()
        .filter_map(|j| {
            Some((
                j["job"].as_str()?.to_owned(),
                j["owner"].as_str()?.to_owned(),
            ))
        })
        .collect();
    if daemons.len() < 2 || jobs.len() < 3 {
        bail!(
            "the sample fleet has {} daemons and {} jobs",
            daemons.len(),
            jobs.len()
        );
    }
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    // The first few reasons a move failed, to print.
    let reasons = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let end = Instant::now() + MINUTE * minutes as u32;
    let mut movers = tokio::task::JoinSet::new();
    for (job, owner) in jobs {
        let (bin, reach) = (bin.to_owned(), up.reach.clone());
        let (daemons, done, failed) = (daemons.clone(), done.clone(), failed.clone());
        let reasons = reasons.clone();
        movers.spawn(async move {
            let mut at = daemons.iter().position(|d| *d == owner).unwrap_or(0);
            while Instant::now() < end {
                let to = &daemons[(at + 1) % daemons.len()];
                match cli(&bin, &reach, &["move-job", &job, "--to", to, "--wait"]).await {
                    Ok(Ok(_)) => {
                        done.fetch_add(1, Ordering::Relaxed);
                        at = (at + 1) % daemons.len();
                        tokio::time::sleep(REST).await;
                    }
                    failure => {
                        // Counted, then tried again after a pause (the move may have been
                        // refused for a reason that passes, such as a move still ending).
                        failed.fetch_add(1, Ordering::Relaxed);
                        let why = match failure {
                            Ok(Err(why)) => why,
                            Err(e) => format!("handoff did not run: {e}"),
                            Ok(Ok(_)) => unreachable!("a success is matched above"),
                        };
                        {
                            let mut reasons = reasons.lock().unwrap_or_else(|p| p.into_inner());
                            if reasons.len() < 5 {
                                reasons.push(format!("{job} to {to}: {why}"));
                            }
                        }
                        tokio::time::sleep(REST).await;
                    }
                }
            }
        });
    }
    let procs = processes(up.pid());
    let mut rates = Vec::new();
    // Each process's figures over minute 2 and over the last minute.
    let mut after_two = BTreeMap::new();
    let mut last = BTreeMap::new();
    let mut counted = 0;
    for minute in 1..=minutes {
        let minute_end = end - MINUTE * (minutes - minute) as u32;
        let mut samples = BTreeMap::<String, Vec<f64>>::new();
        loop {
            for (name, mib) in memory(&procs) {
                samples.entry(name).or_default().push(mib);
            }
            let now = Instant::now();
            if now >= minute_end {
                break;
            }
            tokio::time::sleep_until((now + SAMPLE_EVERY).min(minute_end).into()).await;
        }
        let figures: BTreeMap<String, Figures> = samples
            .into_iter()
            .map(|(name, s)| (name, Figures::of(s)))
            .collect();
        let now = done.load(Ordering::Relaxed);
        rates.push(now - counted);
        counted = now;
        if minute == 2 {
            after_two = figures.clone();
        }
        let mem: Vec<String> = figures
            .iter()
            .map(|(n, f)| format!("{n} {:.0}/{:.0}", f.peak, f.median))
            .collect();
        println!(
            "    minute {minute:>2}: {:>4} moves completed ({} failed so far); MiB peak/median: {}",
            rates.last().copied().unwrap_or(0),
            failed.load(Ordering::Relaxed),
            mem.join(", ")
        );
        last = figures;
    }
    while movers.join_next().await.is_some() {}
    for why in reasons.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        println!("    a failed move: {why}");
    }
    let (first, final_rate) = (rates[0] as f64, *rates.last().unwrap_or(&0) as f64);
    let rate = if first > 0.0 { final_rate / first } else { 0.0 };
    println!(
        "    move rate: last minute {final_rate:.0}, first {first:.0}: {:.0}%   target >= 90%: {}",
        rate * 100.0,
        verdict(rate >= 0.9)
    );
    let mut flat = true;
    let alive = memory(&procs);
    for name in procs.keys() {
        let handoff = !name.starts_with("nats-server");
        let (Some(two), Some(end), true) = (
            after_two.get(name),
            last.get(name),
            alive.contains_key(name),
        ) else {
            // A process not read in minute 2, in the last or at the end (it ended, or
            // crashed) is no flat memory.
            flat &= !handoff;
            println!("    {name}: not read in minute 2, in the last minute or at the end");
            continue;
        };
        let (peak, median) = (end.peak / two.peak, end.median / two.median);
        if handoff {
            flat &= peak <= 1.25 && median <= 1.25;
        }
        println!(
            "    memory of {name}, minute 2 to the last: peak {:.0} to {:.0} MiB ({peak:.2}x), median {:.0} to {:.0} MiB ({median:.2}x){}",
            two.peak,
            end.peak,
            two.median,
            end.median,
            if handoff { "" } else { " (not a handoff process)" }
        );
    }
    println!(
        "    every handoff process's peak and median in the last minute within 1.25x of minute 2's: {}\n",
        verdict(flat)
    );
    Ok(())
}

//! (f) A fleet at size, built through the signed command API: 1,000 daemons and 100,000
//! jobs (1,000 sharded clusters of 99 shards and their config servers), then a history
//! grown past 1,000,000 events (moves of whole daemons cancelled back, daemons reported
//! down and up). The command service and the projector run as their own `handoff`
//! processes, so their resident memory is theirs.
//! Measured at the fleet's size and again at a million events:
//!
//! - the first page of every list query, p50 and p99 (target: p99 under 50 ms);
//! - a MoveJobs of a 100-job daemon, request to durable reply, p50 (target: under 50 ms);
//! - a FailoverJob decision on the folded state, p50 (target: under 5 ms);
//! - a command service restart to its first answered command (target: under 3 s, and the
//!   million-event figure within 1.5x of the first);
//! - the resident memory of the command service and the projector (target: under 256 MiB
//!   each, within 1.5x of the first figure);
//! - at the end, a projector rebuilt from the whole stream into an empty store: its time,
//!   and its resident memory at the end and at its peak (target: under 256 MiB).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use futures::StreamExt;
use handoff_client::{new_command_id, Client, Retry};
use handoff_domain::command::*;
use handoff_domain::ids::DeploymentName;
use handoff_domain::model::{DaemonSettings, Deployment, JobSize, Shard};
use handoff_domain::{Actor, Command, CommandId, Context, DaemonId, ProjectId, State};
use handoff_eventlog::EventLog;
use handoff_natsd::NatsProcess;
use handoff_protocol::auth::Credentials;
use serde_json::json;

use crate::process::Service;
use crate::{median, ms, p99, verdict};

const DAEMONS: usize = 1000;
const CLUSTERS: usize = 1000;
const HISTORY: u64 = 1_000_000;
/// The daemons whose jobs move (to their pair) and back as the history grows: none of
/// those the measures move (from 0 up) or take down (800, 900-999).
const GROW_MOVES: std::ops::Range<usize> = 400..800;

fn daemon(n: usize) -> DaemonId {
    DaemonId::new(format!("backup{n:04}.fleet:/heads/")).expect("valid")
}

/// What one round of measures found.
struct Figures {
    events: u64,
    pages: Vec<(&'static str, Duration, Duration)>,
    move_jobs: Duration,
    failover: Duration,
    restart: Duration,
    commands_mib: f64,
    projector_mib: f64,
}

struct Fleet {
    nats: NatsProcess,
    url: String,
    client: async_nats::Client,
    owner: Credentials,
    commands: Client,
    command_service: Option<Service>,
    projector: Service,
    _dir: tempfile::TempDir,
    /// The next daemon whose jobs a MoveJobs measure moves.
    next_move: usize,
}

impl Fleet {
    async fn start() -> Result<Self> {
        let bin = handoff_natsd::find_binary(&[
            std::env::current_dir()?,
            PathBuf::from(env!("CARGO_MANIFEST_DIR")),
        ])?;
        let dir = tempfile::tempdir()?;
        let nats = NatsProcess::start(bin, &dir.path().join("nats"), None).await?;
        let url = nats.url();
        let client = async_nats::connect(&url).await?;
        let owner = Credentials::generate(Actor::new("bench")?, None);
        let command_service = Some(Self::command_service(&url, &owner)?);
        let projector = Service::spawn(
            &url,
            &[
                "projector",
                "--data",
                &dir.path().join("views").display().to_string(),
            ],
        )?;
        let commands =
            Client::new(client.clone(), owner.clone(), "handoff-bench").with_retry(Retry::SERVICE);
        Ok(Fleet {
            nats,
            url,
            client,
            owner,
            commands,
            command_service,
            projector,
            _dir: dir,
            next_move: 0,
        })
    }

    fn command_service(url: &str, owner: &Credentials) -> Result<Service> {
        let first = format!("{}={}", owner.user, owner.public_key());
        Service::spawn(url, &["command-service", "--first-owner", &first])
    }

    async fn send(&self, command: Command) -> Result<handoff_protocol::Applied> {
        self.send_as(&new_command_id(), command).await
    }

    /// Sends `command` with the id `id`.
    async fn send_as(&self, id: &CommandId, command: Command) -> Result<handoff_protocol::Applied> {
        let name = command.name();
        self.commands
            .send(id, &command)
            .await
            .map_err(|e| anyhow::anyhow!("{name} refused: {e}"))
    }

    async fn last_seq(&self) -> Result<u64> {
        Ok(EventLog::attach(self.client.clone(), Default::default())
            .await?
            .last_sequence()
            .await?)
    }

    /// Sends `commands` with `concurrency` of them in flight.
    async fn send_all(&self, commands: Vec<Command>, concurrency: usize) -> Result<()> {
        let mut sent = futures::stream::iter(commands.into_iter().map(|c| self.send(c)))
            .buffer_unordered(concurrency);
        while let Some(r) = sent.next().await {
            r?;
        }
        Ok(())
    }

    async fn build(&self) -> Result<()> {
        let settings = DaemonSettings {
            head_space_bytes: 1 << 50,
            num_workers: 8,
            ..DaemonSettings::default()
        };
        self.send_all(
            (0..DAEMONS)
                .map(|n| {
                    Command::RegisterDaemon(RegisterDaemon {
                        daemon: daemon(n),
                        settings: settings.clone(),
                    })
                })
                .collect(),
            16,
        )
        .await?;
        self.send_all(
            (0..50)
                .map(|p| {
                    Command::ConfigureProject(ConfigureProject {
                        project: ProjectId::new(format!("p{p:02}")).expect("valid"),
                        daemon_filter: vec![],
                        label_filter: vec![],
                    })
                })
                .collect(),
            8,
        )
        .await?;
        let size = JobSize {
            head_size_bytes: 1 << 30,
            oplog_bytes_per_hour: 1 << 20,
        };
        let name = |s: String| DeploymentName::new(s).expect("valid");
        let clusters = (0..CLUSTERS)
            .map(|c| {
                Command::CreateBackupJobs(CreateBackupJobs {
                    project: ProjectId::new(format!("p{:02}", c % 50)).expect("valid"),
                    deployment: Deployment::ShardedCluster {
                        name: name(format!("c{c:04}")),
                        shards: (0..99)
                            .map(|s| Shard {
                                name: name(format!("s{s:02}")),
                                size,
                            })
                            .collect(),
                        config_servers: size,
                    },
                })
            })
            .collect();
        self.send_all(clusters, 4).await
    }

    /// Until the stream holds `events`, rounds of: every daemon of [`GROW_MOVES`] moves its
    /// jobs to its pair with MoveJobs and the move is cancelled (a MoveStarted, a release,
    /// an assignment and an event per job each way), and daemons 900-999 are reported down
    /// or up.
    async fn grow(&self, events: u64) -> Result<()> {
        let mut round = 0;
        while self.last_seq().await? < events {
            let up = round % 2 == 1;
            let liveness = (900..DAEMONS)
                .map(|n| {
                    Command::ReportDaemonLiveness(ReportDaemonLiveness {
                        daemon: daemon(n),
                        up,
                    })
                })
                .collect::<Vec<_>>();
            self.send_all(liveness, 32).await?;
            let mut moves =
                futures::stream::iter(GROW_MOVES.step_by(2).map(|n| self.move_and_cancel(n)))
                    .buffer_unordered(16);
            while let Some(r) = moves.next().await {
                r?;
            }
            round += 1;
        }
        Ok(())
    }

    /// Daemon `n`'s jobs moved to daemon `n + 1`, then the move cancelled.
    async fn move_and_cancel(&self, n: usize) -> Result<()> {
        let id = new_command_id();
        self.send_as(
            &id,
            Command::MoveJobs(MoveJobs {
                from: daemon(n),
                to: daemon(n + 1),
                reason: Some("bench history".into()),
                dry_run: false,
            }),
        )
        .await?;
        self.send(Command::CancelMove(CancelMove {
            move_id: id,
            reason: "bench history".into(),
        }))
        .await?;
        Ok(())
    }

    /// Waits until the projector has folded the stream's end.
    async fn projector_caught_up(&self) -> Result<()> {
        let end = self.last_seq().await?;
        let deadline = Instant::now() + Duration::from_secs(1800);
        loop {
            let reply = self
                .client
                .request(handoff_protocol::subjects::query("status"), "{}".into())
                .await;
            if let Ok(m) = reply {
                let v: serde_json::Value = serde_json::from_slice(&m.payload)?;
                if v["ok"]["checkpoint"].as_u64().unwrap_or(0) >= end {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("the projector did not reach {end}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The first page of each list query, 100 times each.
    async fn pages(&self) -> Result<Vec<(&'static str, Duration, Duration)>> {
        let queries: [(&'static str, &str, serde_json::Value); 5] = [
            ("daemons", "daemons", json!({})),
            ("jobs", "jobs", json!({})),
            (
                "jobs of one daemon",
                "jobs",
                json!({ "daemon": daemon(450) }),
            ),
            ("moves", "moves", json!({})),
            ("alerts", "alerts", json!({ "all": true })),
        ];
        let mut out = Vec::new();
        for (label, name, body) in queries {
            let mut times = Vec::new();
            for _ in 0..100 {
                let t = Instant::now();
                let reply = self
                    .client
                    .request(
                        handoff_protocol::subjects::query(name),
                        serde_json::to_vec(&body)?.into(),
                    )
                    .await
                    .with_context(|| format!("query {name}"))?;
                times.push(t.elapsed());
                let v: serde_json::Value = serde_json::from_slice(&reply.payload)?;
                if v.get("ok").is_none() {
                    bail!("{name}: {v}");
                }
            }
            out.push((label, median(&mut times), p99(&mut times)));
        }
        Ok(out)
    }

    /// MoveJobs of 100-job daemons (each to a daemon of its own), request to reply.
    async fn move_jobs(&mut self) -> Result<Duration> {
        let mut times = Vec::new();
        for _ in 0..20 {
            let (from, to) = (self.next_move, self.next_move + 1);
            self.next_move += 2;
            let t = Instant::now();
            let applied = self
                .send(Command::MoveJobs(MoveJobs {
                    from: daemon(from),
                    to: daemon(to),
                    reason: Some("bench".into()),
                    dry_run: false,
                }))
                .await?;
            times.push(t.elapsed());
            let moved = applied.plan.map_or(0, |p| p.jobs.len());
            if moved < 50 {
                bail!("a MoveJobs moved {moved} jobs");
            }
        }
        Ok(median(&mut times))
    }

    /// A FailoverJob decided on the whole folded state, a daemon down.
    async fn failover(&self) -> Result<Duration> {
        let log = EventLog::attach(self.client.clone(), Default::default()).await?;
        let end = log.last_sequence().await?;
        let mut reader = log.read_from(1).await?;
        let mut state = State::default();
        loop {
            let r = reader.next().await?;
            state.apply(&r.envelope.event);
            if r.seq >= end {
                break;
            }
        }
        // The moves the MoveJobs measures started end here, in this copy of the state
        // only: the rebuild limit would refuse the failover otherwise.
        let moving: Vec<_> = state
            .jobs
            .iter()
            .filter_map(|(id, j)| match &j.assignment {
                handoff_domain::state::Assignment::Moving { move_id, to, .. } => {
                    Some((id.clone(), move_id.clone(), to.clone(), j.epoch))
                }
                _ => None,
            })
            .collect();
        for (job, move_id, daemon, epoch) in moving {
            state.apply(&handoff_domain::Event::JobMoveCompleted {
                job,
                move_id,
                daemon,
                epoch,
                head: None,
            });
        }
        let down = daemon(800);
        state.apply(&handoff_domain::Event::DaemonDown {
            daemon: down.clone(),
        });
        let jobs: Vec<_> = state.daemons[&down].jobs.iter().cloned().collect();
        let mut times = Vec::new();
        for job in jobs.iter().cycle().take(100) {
            let command = Command::FailoverJob(FailoverJob {
                job: job.clone(),
                from: down.clone(),
                down_for_ms: 60_000,
                delay_ms: 30_000,
                max_concurrent_rebuilds: 1024,
                max_down_percent: 100,
            });
            let ctx = Context {
                command: new_command_id(),
                actor: Actor::new("failover-policy")?,
                at_ms: handoff_protocol::now_ms(),
            };
            let t = Instant::now();
            let decided = handoff_domain::decide(&command, &ctx, &state);
            times.push(t.elapsed());
            if let Err(r) = decided {
                bail!("the failover was refused: {r}");
            }
        }
        Ok(median(&mut times))
    }

    /// Stops the command service cleanly and starts it again; the time from the start to
    /// its first answered command.
    async fn restart(&mut self) -> Result<Duration> {
        if let Some(mut s) = self.command_service.take() {
            s.stop()?;
        }
        let t = Instant::now();
        self.command_service = Some(Self::command_service(&self.url, &self.owner)?);
        // A report that changes nothing: answered once the model is loaded.
        let probe = Client::new(self.client.clone(), self.owner.clone(), "handoff-bench")
            .with_retry(Retry::SERVICE);
        probe
            .send(
                &new_command_id(),
                &Command::ReportDaemonLiveness(ReportDaemonLiveness {
                    daemon: daemon(0),
                    up: true,
                }),
            )
            .await
            .map_err(|e| anyhow::anyhow!("the first command after the restart: {e}"))?;
        Ok(t.elapsed())
    }

    /// Replaces the projector with one that folds the whole stream into an empty store (as
    /// `handoff projector --rebuild` does): the time until it has caught up, and its
    /// resident memory then and at its peak.
    async fn rebuild_projector(&mut self) -> Result<(Duration, f64, f64)> {
        let dir = self._dir.path().join("rebuilt").display().to_string();
        // One projector at a time: they share the consumer's name.
        self.projector.stop()?;
        self.projector = Service::spawn(&self.url, &["projector", "--data", &dir, "--rebuild"])?;
        let t = Instant::now();
        self.projector_caught_up().await?;
        let took = t.elapsed();
        Ok((took, self.projector.rss_mib(), self.projector.peak_mib()))
    }

    async fn measure(&mut self) -> Result<Figures> {
        self.projector_caught_up().await?;
        let pages = self.pages().await?;
        let move_jobs = self.move_jobs().await?;
        let failover = self.failover().await?;
        // One restart's time moves with what else the machine does: the median of three.
        let mut restarts = Vec::new();
        for _ in 0..3 {
            restarts.push(self.restart().await?);
        }
        let restart = median(&mut restarts);
        self.projector_caught_up().await?;
        // Settled: what each holds at rest, after the work above.
        tokio::time::sleep(Duration::from_secs(2)).await;
        Ok(Figures {
            events: self.last_seq().await?,
            pages,
            move_jobs,
            failover,
            restart,
            commands_mib: self.command_service.as_ref().map_or(0.0, Service::rss_mib),
            projector_mib: self.projector.rss_mib(),
        })
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.nats.kill();
    }
}

fn print(f: &Figures) {
    println!("    at {} events:", f.events);
    for (label, p50, p99) in &f.pages {
        println!(
            "      first page of {label:<20} p50 {:>9}   p99 {:>9}   target p99 < 50 ms: {}",
            ms(*p50),
            ms(*p99),
            verdict(*p99 < Duration::from_millis(50))
        );
    }
    println!(
        "      MoveJobs of a 100-job daemon, p50 {}   target < 50 ms: {}",
        ms(f.move_jobs),
        verdict(f.move_jobs < Duration::from_millis(50))
    );
    println!(
        "      FailoverJob decision, p50 {}   target < 5 ms: {}",
        ms(f.failover),
        verdict(f.failover < Duration::from_millis(5))
    );
    println!(
        "      command service restart to its first answer (median of 3) {}   target < 3 s: {}",
        ms(f.restart),
        verdict(f.restart < Duration::from_secs(3))
    );
    println!(
        "      resident memory: command service {:.0} MiB, projector {:.0} MiB   target < 256 MiB each: {}",
        f.commands_mib,
        f.projector_mib,
        verdict(f.commands_mib < 256.0 && f.projector_mib < 256.0)
    );
}

pub async fn run() -> Result<()> {
    println!(
        "(f) a fleet of {DAEMONS} daemons and {} jobs, built through the signed API",
        CLUSTERS * 100
    );
    let mut fleet = Fleet::start().await?;
    let t = Instant::now();
    fleet.build().await.context("building the fleet")?;
    println!("    built in {:.1} s", t.elapsed().as_secs_f64());
    let small = fleet.measure().await?;
    print(&small);
    let t = Instant::now();
    let before = fleet.last_seq().await?;
    // `HANDOFF_BENCH_EVENTS` grows a shorter (or longer) history: about 300 s for a
    // million events on 2 cores.
    let history = std::env::var("HANDOFF_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(HISTORY);
    fleet.grow(history).await.context("growing the history")?;
    let grown = fleet.last_seq().await? - before;
    println!(
        "    history grown by {grown} events in {:.0} s ({:.0} events/s through the API)",
        t.elapsed().as_secs_f64(),
        grown as f64 / t.elapsed().as_secs_f64()
    );
    let large = fleet.measure().await?;
    print(&large);
    let (took, rss, peak) = fleet.rebuild_projector().await?;
    println!(
        "      a projector rebuilt from the stream: {:.1} s ({:.0} events/s), resident {rss:.0} MiB, peak {peak:.0} MiB   target < 256 MiB: {}",
        took.as_secs_f64(),
        large.events as f64 / took.as_secs_f64(),
        verdict(peak < 256.0)
    );
    let flat = |a: f64, b: f64| b / a;
    let restart = flat(small.restart.as_secs_f64(), large.restart.as_secs_f64());
    let commands = flat(small.commands_mib, large.commands_mib);
    let projector = flat(small.projector_mib, large.projector_mib);
    println!(
        "    flat: restart {restart:.2}x, command service memory {commands:.2}x, projector memory {projector:.2}x from {} to {} events   target within 1.5x: {}\n",
        small.events,
        large.events,
        verdict(restart <= 1.5 && commands <= 1.5 && projector <= 1.5)
    );
    Ok(())
}

//! The nemesis: faults drawn from the seed, injected while the workload runs, each healed
//! after a drawn while. It never takes two nodes of the three away at once (the cluster
//! would lose its quorum, which is an outage, not a fault handoff must ride through).
//!
//! Kinds: SIGKILL and restart of a command service, a projector, a daemon, the agent, the
//! monitor, or a nats-server node; SIGSTOP then SIGCONT of a daemon (shorter, and longer,
//! than the monitor's threshold), of a command service, a projector or the monitor; lost
//! acknowledgements of the event stream (the proxy in front of the second command
//! service); a full disk under a daemon's heads (a size-limited tmpfs, filled then
//! emptied), where the machine allows mounting one.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, Result};
use handoff_protocol::{now_ms, subjects};
use tokio::time::Instant;

use crate::rng::Rng;
use crate::topology::{Deployment, Part};

/// What a fault does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    KillCommand,
    KillProjector,
    KillDaemon,
    KillAgent,
    KillMonitor,
    KillNode,
    PauseDaemonShort,
    PauseDaemonLong,
    PauseService,
    LoseAcks,
    FullDisk,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::KillCommand => "kill-command-service",
            Kind::KillProjector => "kill-projector",
            Kind::KillDaemon => "kill-daemon",
            Kind::KillAgent => "kill-agent",
            Kind::KillMonitor => "kill-monitor",
            Kind::KillNode => "kill-nats-node",
            Kind::PauseDaemonShort => "pause-daemon-short",
            Kind::PauseDaemonLong => "pause-daemon-long",
            Kind::PauseService => "pause-service",
            Kind::LoseAcks => "lose-acks",
            Kind::FullDisk => "full-disk",
        }
    }
}

/// When a daemon could not send heartbeats because of the nemesis: killed or frozen,
/// from `from_ms` to `to_ms` (wall clock).
#[derive(Clone, Copy, Debug)]
pub struct Silence {
    pub daemon: usize,
    pub from_ms: u64,
    pub to_ms: u64,
}

/// What the nemesis did, for the report and the checker.
#[derive(Debug, Default)]
pub struct Report {
    pub injected: BTreeMap<&'static str, u32>,
    pub silences: Vec<Silence>,
    /// Acknowledgements the proxy really lost.
    pub acks_lost: usize,
    /// Writes refused for lack of space while the disk was full (bytes the filler could
    /// not write prove it was full).
    pub disk_filled: u32,
    /// Why a kind could not run here, if one could not.
    pub skipped: Vec<String>,
    /// Processes that exited by themselves (not killed by the nemesis), by name.
    pub crashes: BTreeMap<String, u32>,
    /// Every injection and heal, with its wall-clock time in ms.
    pub timeline: Vec<(u64, String)>,
}

impl Report {
    pub fn faults(&self) -> u32 {
        self.injected.values().sum()
    }

    pub fn kinds(&self) -> usize {
        self.injected.len()
    }
}

/// A fault in force, and how to end it.
enum Heal {
    Restart(Part),
    Thaw(Part),
    Node(usize),
    EmptyDisk(PathBuf),
}

struct Pending {
    at: Instant,
    heal: Heal,
    /// For a daemon's silence: which daemon, and since when.
    silence: Option<(usize, u64)>,
}

/// A size-limited filesystem under a daemon's heads, when the machine lets us mount one.
pub struct SmallDisk {
    pub dir: PathBuf,
}

impl SmallDisk {
    /// Mounts a tmpfs of `mib` MiB on `dir` (which must be empty). `None`, with the
    /// reason, where mounting is not allowed.
    pub fn mount(dir: PathBuf, mib: u32) -> Result<SmallDisk, String> {
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(&dir)
            .output()
            .map_err(|e| format!("mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(SmallDisk { dir })
    }

    fn filler(&self) -> PathBuf {
        self.dir.join("chaos-filler")
    }

    /// Writes until the filesystem is full; returns whether it saw ENOSPC.
    fn fill(&self) -> Result<bool> {
        use std::io::Write;
        let mut f = std::fs::File::create(self.filler())?;
        let block = vec![0u8; 1 << 20];
        loop {
            match f.write(&block) {
                Ok(0) => return Ok(true),
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => return Ok(true),
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        // Ignored: a busy mount is left for the machine; the run's directory goes anyway.
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.dir)
            .status();
    }
}

/// The nemesis of one run.
pub struct Nemesis {
    rng: Rng,
    pending: Vec<Pending>,
    pub report: Report,
    pub down_after: Duration,
    pub disk: Option<SmallDisk>,
    /// When every process was last seen running (or restarted).
    last_supervised_ms: u64,
}

impl Nemesis {
    pub fn new(rng: Rng, down_after: Duration, disk: Result<SmallDisk, String>) -> Nemesis {
        let mut report = Report::default();
        let disk = match disk {
            Ok(d) => Some(d),
            Err(why) => {
                report.skipped.push(format!("full-disk: {why}"));
                None
            }
        };
        Nemesis {
            rng,
            pending: Vec::new(),
            report,
            down_after,
            disk,
            last_supervised_ms: now_ms(),
        }
    }

    /// Injects faults until `until`, at most `concurrent` at a time.
    pub async fn run(
        &mut self,
        d: &mut Deployment,
        until: Instant,
        concurrent: usize,
    ) -> Result<()> {
        while Instant::now() < until {
            let pause = Duration::from_millis(self.rng.between(50, 300));
            tokio::time::sleep(pause).await;
            self.heal_due(d, Instant::now()).await?;
            let faulted: Vec<Part> = self
                .pending
                .iter()
                .filter_map(|p| match &p.heal {
                    Heal::Restart(x) | Heal::Thaw(x) => Some(*x),
                    _ => None,
                })
                .collect();
            for part in d.supervise(&faulted)? {
                // Not a fault of ours: the process died by itself. Counted, and started
                // again as a supervisor would; a daemon was silent since it was last seen
                // running.
                self.note(format!("{part} exited by itself; started again"));
                *self.report.crashes.entry(part.to_string()).or_default() += 1;
                if let Part::Daemon(i) = part {
                    self.report.silences.push(Silence {
                        daemon: i,
                        from_ms: self.last_supervised_ms,
                        to_ms: now_ms(),
                    });
                }
            }
            self.last_supervised_ms = now_ms();
            if self.pending.len() < concurrent {
                self.inject(d).await?;
            }
        }
        Ok(())
    }

    /// Ends every fault in force.
    pub async fn heal_all(&mut self, d: &mut Deployment) -> Result<()> {
        self.heal_due(d, Instant::now() + Duration::from_secs(3600))
            .await?;
        self.report.acks_lost = d.proxy.dropped();
        d.heal().await
    }

    async fn heal_due(&mut self, d: &mut Deployment, now: Instant) -> Result<()> {
        let (due, later): (Vec<Pending>, Vec<Pending>) =
            self.pending.drain(..).partition(|p| p.at <= now);
        self.pending = later;
        for p in due {
            let what = match &p.heal {
                Heal::Restart(part) => format!("restart {part}"),
                Heal::Thaw(part) => format!("thaw {part}"),
                Heal::Node(i) => format!("restart nats node {i}"),
                Heal::EmptyDisk(_) => "empty the small disk".to_owned(),
            };
            self.report.timeline.push((now_ms(), what));
            match &p.heal {
                Heal::Restart(part) => d.service(*part).restart()?,
                Heal::Thaw(part) => {
                    let s = d.service(*part);
                    if s.is_frozen() {
                        s.thaw()?;
                    }
                }
                Heal::Node(i) => d.restart_node(*i).await?,
                Heal::EmptyDisk(path) => std::fs::remove_file(path)?,
            }
            if let Some((daemon, from_ms)) = p.silence {
                self.report.silences.push(Silence {
                    daemon,
                    from_ms,
                    to_ms: now_ms(),
                });
            }
        }
        Ok(())
    }

    fn busy(&self, part: Part) -> bool {
        self.pending
            .iter()
            .any(|p| matches!(&p.heal, Heal::Restart(x) | Heal::Thaw(x) if *x == part))
    }

    fn kind(&mut self) -> Kind {
        const WEIGHTED: [(Kind, u64); 11] = [
            (Kind::KillCommand, 3),
            (Kind::KillProjector, 2),
            (Kind::KillDaemon, 3),
            (Kind::KillAgent, 1),
            (Kind::KillMonitor, 1),
            (Kind::KillNode, 1),
            (Kind::PauseDaemonShort, 3),
            (Kind::PauseDaemonLong, 1),
            (Kind::PauseService, 2),
            (Kind::LoseAcks, 3),
            (Kind::FullDisk, 1),
        ];
        let total: u64 = WEIGHTED.iter().map(|(_, w)| w).sum();
        let mut roll = self.rng.below(total);
        for (k, w) in WEIGHTED {
            if roll < w {
                return k;
            }
            roll -= w;
        }
        Kind::KillDaemon
    }

    async fn inject(&mut self, d: &mut Deployment) -> Result<()> {
        let kind = self.kind();
        let daemons = d.daemons.len() as u64;
        let now = Instant::now();
        let ms = |lo: u64, hi: u64, rng: &mut Rng| now + Duration::from_millis(rng.between(lo, hi));
        let down = self.down_after.as_millis() as u64;
        let (part, pending) = match kind {
            Kind::KillCommand | Kind::KillProjector => {
                let i = self.rng.below(2) as usize;
                let part = if kind == Kind::KillCommand {
                    Part::Command(i)
                } else {
                    Part::Projector(i)
                };
                (Some(part), Heal::Restart(part))
            }
            Kind::KillDaemon => {
                let part = Part::Daemon(self.rng.below(daemons) as usize);
                (Some(part), Heal::Restart(part))
            }
            Kind::KillAgent => (Some(Part::Agent), Heal::Restart(Part::Agent)),
            Kind::KillMonitor => (Some(Part::Monitor), Heal::Restart(Part::Monitor)),
            Kind::PauseDaemonShort | Kind::PauseDaemonLong => {
                let part = Part::Daemon(self.rng.below(daemons) as usize);
                (Some(part), Heal::Thaw(part))
            }
            Kind::PauseService => {
                let part = *self.rng.pick(&[
                    Part::Command(0),
                    Part::Command(1),
                    Part::Projector(0),
                    Part::Projector(1),
                    Part::Monitor,
                ]);
                (Some(part), Heal::Thaw(part))
            }
            Kind::KillNode => {
                if d.node_down.iter().any(|x| *x) {
                    return Ok(());
                }
                let i = self.rng.below(d.nodes.len() as u64) as usize;
                d.kill_node(i);
                self.note(format!("kill nats node {i}"));
                self.record(kind);
                self.pending.push(Pending {
                    at: ms(1_000, 5_000, &mut self.rng),
                    heal: Heal::Node(i),
                    silence: None,
                });
                return Ok(());
            }
            Kind::LoseAcks => {
                let n = self.rng.between(1, 3) as usize;
                d.proxy.drop_next_acks_of(subjects::STREAM, n);
                self.note(format!("lose the next {n} acks of command-service-2"));
                self.record(kind);
                return Ok(());
            }
            Kind::FullDisk => {
                let Some(disk) = &self.disk else {
                    return Ok(());
                };
                if self
                    .pending
                    .iter()
                    .any(|p| matches!(p.heal, Heal::EmptyDisk(_)))
                {
                    return Ok(());
                }
                if disk.fill().context("filling the small disk")? {
                    self.report.disk_filled += 1;
                }
                let filler = disk.filler();
                self.note("fill the small disk".to_owned());
                self.record(kind);
                self.pending.push(Pending {
                    at: ms(1_000, 4_000, &mut self.rng),
                    heal: Heal::EmptyDisk(filler),
                    silence: None,
                });
                return Ok(());
            }
        };
        let Some(part) = part else { return Ok(()) };
        if self.busy(part) {
            return Ok(());
        }
        let until = match kind {
            Kind::PauseDaemonLong => ms(down + 1_000, down * 2, &mut self.rng),
            Kind::PauseDaemonShort => ms(200, down / 2, &mut self.rng),
            Kind::PauseService => ms(200, 3_000, &mut self.rng),
            _ => ms(100, 2_500, &mut self.rng),
        };
        match &pending {
            Heal::Restart(_) => d.service(part).kill(),
            Heal::Thaw(_) => d.service(part).freeze()?,
            _ => {}
        }
        self.note(format!("{} {part}", kind.name()));
        let silence = match part {
            Part::Daemon(i) => Some((i, now_ms())),
            _ => None,
        };
        self.record(kind);
        self.pending.push(Pending {
            at: until,
            heal: pending,
            silence,
        });
        Ok(())
    }

    fn record(&mut self, kind: Kind) {
        *self.report.injected.entry(kind.name()).or_default() += 1;
    }

    fn note(&mut self, what: String) {
        self.report.timeline.push((now_ms(), what));
    }
}

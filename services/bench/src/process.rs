//! The processes the benchmarks run and watch: a `handoff` service of its own, and what
//! /proc says of a process's memory.

use std::process::{Child, Command as Process, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

/// A field of /proc/<pid>/status given in kB (`VmRSS:` resident now, `VmHWM:` at its
/// peak), in MiB.
pub fn status_mib(pid: u32, field: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

/// A `handoff` service as its own process.
pub struct Service {
    child: Child,
}

impl Service {
    pub fn spawn(url: &str, args: &[&str]) -> Result<Self> {
        let bin = std::env::current_exe()?.with_file_name("handoff");
        if !bin.exists() {
            bail!("{} is missing: scripts/bench builds it", bin.display());
        }
        let child = Process::new(bin)
            .args(["--nats-url", url])
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()?;
        Ok(Service { child })
    }

    /// Resident memory now.
    pub fn rss_mib(&self) -> f64 {
        self.status_mib("VmRSS:")
    }

    /// The most it was ever resident.
    pub fn peak_mib(&self) -> f64 {
        self.status_mib("VmHWM:")
    }

    fn status_mib(&self, field: &str) -> f64 {
        status_mib(self.child.id(), field).unwrap_or(0.0)
    }

    /// SIGTERM, and waits for the exit (a clean stop: the command service saves its model).
    pub fn stop(&mut self) -> Result<()> {
        let pid = self.child.id().to_string();
        Process::new("kill").args(["-TERM", &pid]).status()?;
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child.kill()?;
        bail!("the service did not stop within 120 s")
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

//! The `handoff` services a test runs as real processes, so they can be frozen, thawed
//! and killed like real ones: the projector ([`ProjectorProcess`]) and the agent, the
//! daemons and the monitor ([`Proc`]). Each is a [`handoff_testkit::Child`]: it dies with
//! the test.

use std::path::Path;
use std::process::{Command as Process, Stdio};

use anyhow::Result;
use handoff_domain::DaemonId;
use handoff_testkit::{Child, Signal};

use crate::cli::handoff_bin;
use crate::TIMEOUT;

/// A projector running as its own process.
pub struct ProjectorProcess {
    child: Child,
}

impl ProjectorProcess {
    pub fn spawn(url: &str, dir: &Path, extra: &[&str]) -> Result<Self> {
        let mut command = Process::new(handoff_bin()?);
        command
            .args(["--nats-url", url, "projector", "--data"])
            .arg(dir)
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        Ok(ProjectorProcess {
            child: Child::spawn("projector", &mut command)?,
        })
    }

    /// SIGKILL: no chance to flush or clean up.
    pub fn kill(mut self) -> Result<()> {
        self.child.kill()?;
        Ok(())
    }

    /// SIGTERM, then waits: whether it stopped cleanly.
    pub fn terminate(mut self) -> Result<bool> {
        Ok(self.child.terminate(TIMEOUT)?.success())
    }

    /// Waits for the process to exit by itself and returns whether it succeeded.
    pub fn wait(mut self) -> Result<bool> {
        Ok(self.child.wait_within(TIMEOUT)?.success())
    }
}

impl From<ProjectorProcess> for Child {
    fn from(p: ProjectorProcess) -> Child {
        p.child
    }
}

/// Every key and value of a view store, for comparing two stores.
pub fn dump_views(dir: &Path) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    use handoff_projector::ViewStore;
    let store = handoff_projector::SledStore::open(dir)?;
    Ok(store.scan(b"")?)
}

/// A `handoff` process of a story (agent, daemon, monitor), its log in `<name>.log`.
pub struct Proc {
    child: Child,
}

impl Proc {
    /// Runs `handoff ARGS` as the user of the credentials file `creds`.
    pub fn spawn(url: &str, dir: &Path, name: &str, creds: &Path, args: &[&str]) -> Result<Proc> {
        let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
        let mut command = Process::new(handoff_bin()?);
        command
            .args(["--nats-url", url])
            .arg("--creds")
            .arg(creds)
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        Ok(Proc {
            child: Child::spawn(name, &mut command)?,
        })
    }

    /// Runs `handoff daemon --id ID` (100 GiB of head space) as the daemon's user,
    /// logging to `<name>.log`.
    pub fn daemon(
        url: &str,
        dir: &Path,
        name: &str,
        creds: &Path,
        id: &DaemonId,
        workers: &str,
        heartbeat_ms: &str,
    ) -> Result<Proc> {
        Proc::spawn(
            url,
            dir,
            name,
            creds,
            &[
                "daemon",
                "--id",
                id.as_str(),
                "--head-space",
                "100GiB",
                "--num-workers",
                workers,
                "--heartbeat-ms",
                heartbeat_ms,
            ],
        )
    }

    /// Freezes (SIGSTOP), thaws (SIGCONT) or stops it.
    pub fn signal(&mut self, signal: Signal) -> Result<()> {
        self.child.signal(signal)
    }

    /// SIGKILL: no chance to flush or clean up.
    pub fn kill(mut self) -> Result<()> {
        self.child.kill()?;
        Ok(())
    }
}

impl From<Proc> for Child {
    fn from(p: Proc) -> Child {
        p.child
    }
}

//! A child process owned by a test: the `handoff` processes (projector, agent, daemons,
//! monitor, `handoff up`) that end-to-end tests start, freeze, thaw and kill.
//!
//! It cannot outlive the test: it gets SIGKILL when the thread that started it ends, even
//! when the test process itself is killed (PR_SET_PDEATHSIG), and it is killed and reaped
//! when dropped. It is signalled by pid through `kill(2)`, never by running `kill`, and
//! waited for with a deadline by polling a pidfd: no sleep, and a test that expects an
//! exit fails instead of hanging. Linux only, as the rest of the kit.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{ChildStdout, Command, ExitStatus};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

/// The signals tests send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    /// SIGSTOP: frozen, as a paused VM or a server that stops answering.
    Stop,
    /// SIGCONT: thawed.
    Cont,
    /// SIGTERM: asked to stop cleanly.
    Term,
    /// SIGKILL: no chance to flush or clean up.
    Kill,
}

impl Signal {
    fn number(self) -> libc::c_int {
        match self {
            Signal::Stop => libc::SIGSTOP,
            Signal::Cont => libc::SIGCONT,
            Signal::Term => libc::SIGTERM,
            Signal::Kill => libc::SIGKILL,
        }
    }
}

/// A running child process, named for error messages.
pub struct Child {
    name: String,
    process: std::process::Child,
}

impl Child {
    /// Starts `command` as the child `name`. It dies with the thread that calls this.
    pub fn spawn(name: impl Into<String>, command: &mut Command) -> Result<Child> {
        let name = name.into();
        handoff_natsd::die_with_parent(command);
        let process = command
            .spawn()
            .with_context(|| format!("starting {name} ({:?})", command.get_program()))?;
        Ok(Child { name, process })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn id(&self) -> u32 {
        self.process.id()
    }

    /// Its stdout, when it was piped and not taken yet.
    pub fn take_stdout(&mut self) -> Option<ChildStdout> {
        self.process.stdout.take()
    }

    /// Sends `signal`. Fails if the child has exited (its pid may belong to another
    /// process by now).
    pub fn signal(&mut self, signal: Signal) -> Result<()> {
        if let Some(status) = self.process.try_wait()? {
            bail!(
                "cannot send {signal:?} to {}: it exited ({status})",
                self.name
            );
        }
        // Safe: kill(2) takes plain integers, and the pid is our child's, not yet reaped
        // (checked just above; only this struct reaps it).
        let sent = unsafe { libc::kill(self.process.id() as libc::pid_t, signal.number()) };
        if sent != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("sending {signal:?} to {}", self.name));
        }
        Ok(())
    }

    /// Waits at most `limit` for the child to exit; its exit status.
    pub fn wait_within(&mut self, limit: Duration) -> Result<ExitStatus> {
        if let Some(status) = self.process.try_wait()? {
            return Ok(status);
        }
        if !exits_within(self.process.id(), limit)
            .with_context(|| format!("waiting for {} to exit", self.name))?
        {
            bail!("{} did not exit within {limit:?}", self.name);
        }
        Ok(self.process.wait()?)
    }

    /// SIGTERM, then waits at most `limit` for the child to exit.
    pub fn terminate(&mut self, limit: Duration) -> Result<ExitStatus> {
        self.signal(Signal::Term)?;
        self.wait_within(limit)
    }

    /// SIGKILL, and reaps it.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.process.try_wait()? {
            return Ok(status);
        }
        self.process
            .kill()
            .with_context(|| format!("killing {}", self.name))?;
        Ok(self.process.wait()?)
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        // Ignored: the child may have exited already; wait reaps it either way.
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

/// Whether process `pid` (a child not yet reaped) exits within `limit`: its pidfd becomes
/// readable when it does (Linux 5.3 and later).
fn exits_within(pid: u32, limit: Duration) -> std::io::Result<bool> {
    // Safe: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // Safe: the descriptor was just opened and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) };
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut ready = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // Rounded up, so a wait of less than a millisecond still waits.
        let ms = left
            .as_micros()
            .div_ceil(1000)
            .min(libc::c_int::MAX as u128) as libc::c_int;
        // Safe: one valid pollfd, and its count says one.
        match unsafe { libc::poll(&mut ready, 1, ms) } {
            0 => return Ok(false),
            n if n > 0 => return Ok(true),
            _ => {
                let e = std::io::Error::last_os_error();
                // Interrupted by a signal to the test process: wait for what is left.
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The state letter of a process in `/proc/<pid>/stat` (`T`: stopped).
    fn state(pid: u32) -> Result<char> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        // The state follows the command name, which is in parentheses.
        let after = stat.rsplit_once(") ").map(|(_, rest)| rest).unwrap_or("");
        after.chars().next().context("no state in /proc/<pid>/stat")
    }

    /// A frozen child is stopped by the kernel and does not exit; thawed and terminated,
    /// it does, within the deadline.
    #[tokio::test]
    async fn is_signalled_and_waited_for_with_a_deadline() -> Result<()> {
        let mut child = Child::spawn("sleep", Command::new("sleep").arg("30"))?;
        child.signal(Signal::Stop)?;
        let pid = child.id();
        crate::until("the child to be stopped", Duration::from_secs(5), || {
            let stopped = state(pid).map(|s| (s == 'T').then_some(()));
            async move { stopped }
        })
        .await?;
        assert!(child.wait_within(Duration::from_millis(100)).is_err());
        child.signal(Signal::Cont)?;
        let status = child.terminate(Duration::from_secs(5))?;
        assert!(!status.success());
        assert!(child.signal(Signal::Cont).is_err(), "signalled after exit");
        Ok(())
    }
}

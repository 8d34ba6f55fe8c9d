//! The `handoff` binary as a user runs it: one command and its output ([`handoff`]), a
//! command left running whose lines the test reads ([`Background`]), and a whole
//! `handoff up` with its sample fleet ([`Up`]).

use std::path::{Path, PathBuf};
use std::process::{Command as Process, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use handoff_eventlog::EventLog;
use handoff_protocol::auth::Credentials;
use handoff_testkit::{Child, NatsServer, Signal};
use serde_json::Value;

use crate::fixtures::daemon;
use crate::stack::owner;
use crate::wait::wait_for_checkpoint;
use crate::TIMEOUT;

/// The `handoff` binary, built beside the test binary (`cargo build` builds it; the
/// test command does).
pub fn handoff_bin() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| anyhow!("unexpected test binary location {}", exe.display()))?;
    let bin = dir.join("handoff");
    if !bin.exists() {
        bail!(
            "{} not found: build it with `cargo build -p handoff`",
            bin.display()
        );
    }
    Ok(bin)
}

/// What a `handoff` command printed and how it exited.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// The stdout parsed as JSON.
    pub fn json(&self) -> Result<Value> {
        serde_json::from_str(&self.stdout).with_context(|| format!("not JSON: {}", self.stdout))
    }
}

/// Runs `handoff ARGS` against `url` and waits for it.
pub fn handoff(url: &str, args: &[&str]) -> Result<Run> {
    let out = Process::new(handoff_bin()?)
        .args(args)
        .env("HANDOFF_NATS_URL", url)
        .env("HANDOFF_CREDS", &owner().1)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()?;
    Ok(Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// Runs `handoff ARGS` and expects exit code 0.
pub fn handoff_ok(url: &str, args: &[&str]) -> Result<Run> {
    let run = handoff(url, args)?;
    if run.code != 0 {
        bail!(
            "handoff {args:?} exited {}:\n{}\n{}",
            run.code,
            run.stdout,
            run.stderr
        );
    }
    Ok(run)
}

/// Runs `handoff ARGS` and expects a refusal (exit code 1) with `reason`.
pub fn handoff_refused(url: &str, args: &[&str], reason: &str) -> Result<()> {
    let run = handoff(url, args)?;
    if run.code != 1 || !run.stderr.contains(reason) {
        bail!(
            "handoff {args:?}: expected a refusal with {reason:?}, got exit {}:\n{}",
            run.code,
            run.stderr
        );
    }
    Ok(())
}

/// A `handoff` process running in the background (`up`, `watch`, `move-jobs --wait`),
/// its stdout read line by line.
pub struct Background {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Background {
    pub fn spawn(url: Option<&str>, args: &[&str]) -> Result<Self> {
        Self::spawn_as(url, Some(&owner().1), args)
    }

    /// Like [`Background::spawn`], with the credentials file `creds` (none: no
    /// credentials at all, as a first `handoff up` runs).
    pub fn spawn_as(url: Option<&str>, creds: Option<&Path>, args: &[&str]) -> Result<Self> {
        let mut command = Process::new(handoff_bin()?);
        match creds {
            Some(c) => command.env("HANDOFF_CREDS", c),
            None => command.env_remove("HANDOFF_CREDS"),
        };
        match url {
            Some(u) => command.env("HANDOFF_NATS_URL", u),
            None => command.env_remove("HANDOFF_NATS_URL"),
        };
        command.args(args).stderr(Stdio::null());
        let name = format!("handoff {}", args.first().copied().unwrap_or_default());
        Self::program(name, command)
    }

    /// Any program (its stderr as `command` sets it), read line by line from stdout.
    pub fn program(name: String, mut command: Process) -> Result<Self> {
        command.stdin(Stdio::null()).stdout(Stdio::piped());
        let mut child = Child::spawn(name, &mut command)?;
        let stdout = child.take_stdout().ok_or_else(|| anyhow!("no stdout"))?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Background {
            child,
            lines,
            seen: Vec::new(),
        })
    }

    /// Waits for a line containing `needle`; returns it.
    pub fn wait_for_line(&mut self, needle: &str) -> Result<String> {
        self.wait_for_line_within(needle, TIMEOUT)
    }

    /// Waits at most `limit` for a line containing `needle`.
    pub fn wait_for_line_within(&mut self, needle: &str, limit: Duration) -> Result<String> {
        let deadline = Instant::now() + limit;
        // Each line is read as it comes, up to the deadline: no polling.
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return Ok(line);
                    }
                }
                Err(_) => bail!(
                    "no line with {needle:?} within {limit:?}; saw {:?}",
                    self.seen
                ),
            }
        }
    }

    /// Waits for the process to exit; its exit code and every line it printed.
    pub fn finish(mut self) -> Result<(i32, Vec<String>)> {
        let status = self
            .child
            .wait_within(TIMEOUT)
            .with_context(|| format!("the process printed {:?}", self.seen))?;
        // The rest of its output, until the reader sees the pipe close (bounded: a
        // process it started may hold the pipe open).
        while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
            self.seen.push(line);
        }
        Ok((status.code().unwrap_or(-1), std::mem::take(&mut self.seen)))
    }

    /// SIGTERM, then [`Background::finish`].
    pub fn terminate(mut self) -> Result<(i32, Vec<String>)> {
        // Ignored: it fails only for a process that has exited, which finish reports.
        let _ = self.child.signal(Signal::Term);
        self.finish()
    }
}

/// A `handoff up` on a test server, with its sample fleet, ready for commands.
pub struct Up {
    pub server: NatsServer,
    pub process: Background,
    pub data: tempfile::TempDir,
}

impl Up {
    /// `handoff up` with its sample fleet, the control plane only: moves wait for the
    /// test to report their rebuilds.
    pub async fn start() -> Result<Self> {
        Self::start_with(&["--no-data-plane"]).await
    }

    /// `handoff up` with more arguments.
    pub async fn start_with(args: &[&str]) -> Result<Self> {
        let server = NatsServer::start().await?;
        let data = tempfile::tempdir()?;
        let dir = data.path().to_string_lossy().into_owned();
        let mut full = vec!["up", "--data", &dir];
        full.extend_from_slice(args);
        let mut process = Background::spawn(Some(&server.url()), &full)?;
        process.wait_for_line("handoff is up")?;
        let up = Up {
            server,
            process,
            data,
        };
        up.settle().await?;
        Ok(up)
    }

    pub fn url(&self) -> String {
        self.server.url()
    }

    /// Daemon `n`'s user `backup<n>` (BACKUP_DAEMON), added with `handoff user add` on
    /// first use; its credentials.
    pub fn daemon_user(&self, n: usize) -> Result<Credentials> {
        let path = self.data.path().join(format!("backup{n}.creds"));
        if !path.exists() {
            let name = format!("backup{n}");
            let d = daemon(n).to_string();
            let out = path.to_string_lossy().into_owned();
            handoff_ok(
                &self.url(),
                &[
                    "user",
                    "add",
                    &name,
                    "--role",
                    "BACKUP_DAEMON",
                    "--daemon",
                    &d,
                    "--out",
                    &out,
                ],
            )?;
        }
        Ok(Credentials::load(&path)?)
    }

    /// A user `name` with `role`, added with `handoff user add` on first use; the path of
    /// its credentials.
    pub fn user(&self, name: &str, role: &str) -> Result<PathBuf> {
        let path = self.data.path().join(format!("{name}.creds"));
        if !path.exists() {
            let out = path.to_string_lossy().into_owned();
            handoff_ok(
                &self.url(),
                &["user", "add", name, "--role", role, "--out", &out],
            )?;
        }
        Ok(path)
    }

    /// Waits until the projector has folded every event appended so far.
    pub async fn settle(&self) -> Result<()> {
        let client = self.server.connect().await?;
        let log = EventLog::attach(client.clone(), Default::default()).await?;
        wait_for_checkpoint(&client, log.last_sequence().await?).await?;
        Ok(())
    }
}

/// The address in a line a console prints (`console at http://ADDR/`, `console
/// http://ADDR/ ...`, `the console: http://ADDR/ ...`).
pub fn console_addr(line: &str) -> Result<std::net::SocketAddr> {
    let start = line
        .find("http://")
        .ok_or_else(|| anyhow!("no address in {line:?}"))?;
    let rest = &line[start + "http://".len()..];
    Ok(rest[..rest.find('/').unwrap_or(rest.len())].parse()?)
}

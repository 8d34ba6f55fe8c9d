//! A nats-server child process with JetStream: the local stack (`handoff up`) and the
//! test kit both run one.
//!
//! The server listens on loopback only, keeps its store and configuration in one
//! directory, syncs every write (`sync_interval: always`, so an acknowledged event is on
//! disk) and is ready once it answers JetStream requests.
//!
//! # Layout
//! One file: [`find_binary`] locates the pinned server, [`NatsProcess`] starts one (alone
//! or as a node of a cluster), waits for it to be ready, restarts and stops it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use thiserror::Error;

/// How long a server may take to start answering. A cluster's JetStream meta leader is
/// elected once its nodes see each other; on a loaded 2-core machine (the end-to-end
/// tests just finished) that was seen to take over 15 s.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Error)]
pub enum Error {
    #[error(
        "nats-server not found: install it with scripts/install-nats (or set NATS_SERVER_BIN)"
    )]
    NotFound,
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("nats-server did not start: {0}")]
    NotReady(String),
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}

/// Finds the nats-server binary: `$NATS_SERVER_BIN`, then `.tools/bin/nats-server` in
/// each of `roots` and their ancestors (where scripts/install-nats puts it), then `PATH`.
/// Makes the child die with the thread that starts it, even when that process is killed
/// outright (PR_SET_PDEATHSIG): no orphan outlives a crashed parent.
pub fn die_with_parent(command: &mut Command) {
    // Safe: prctl is async-signal-safe and touches nothing of the parent's.
    unsafe {
        use std::os::unix::process::CommandExt;
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

pub fn find_binary(roots: &[PathBuf]) -> Result<PathBuf, Error> {
    if let Some(p) = std::env::var_os("NATS_SERVER_BIN") {
        return Ok(PathBuf::from(p));
    }
    for root in roots {
        for dir in root.ancestors() {
            let candidate = dir.join(".tools/bin/nats-server");
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("nats-server"))
        .find(|p| p.is_file())
        .ok_or(Error::NotFound)
}

/// A running nats-server.
pub struct NatsProcess {
    child: Option<Child>,
    dir: PathBuf,
    port: u16,
    bin: PathBuf,
    /// More configuration (a server name, a cluster block, an authorization block),
    /// kept for restarts.
    extra: String,
    /// With an authorization block: the seed of an nkey allowed everything, to check
    /// that the server is ready.
    seed: Option<String>,
}

/// A server that admits only the nkeys of an `authorization` block.
#[derive(Clone)]
pub struct Security {
    /// The `authorization { .. }` block.
    pub authorization: String,
    /// The seed of a user allowed everything (the command service's), for readiness checks.
    pub seed: String,
}

impl NatsProcess {
    /// Starts `bin` with its store under `dir`, on `port` (`None`: any free port).
    pub async fn start(bin: PathBuf, dir: &Path, port: Option<u16>) -> Result<Self, Error> {
        Self::start_secured(bin, dir, port, None).await
    }

    /// Like [`start`](Self::start) on any free port, with `extra` appended to the
    /// configuration (a `max_payload`, say).
    pub async fn start_configured(bin: PathBuf, dir: &Path, extra: &str) -> Result<Self, Error> {
        let mut p = Self::spawn_with(bin, dir, None, extra, None)?;
        p.port = p.read_port().await?;
        p.wait_ready().await?;
        Ok(p)
    }

    /// Like [`start`](Self::start), admitting only the users of `security` when given.
    pub async fn start_secured(
        bin: PathBuf,
        dir: &Path,
        port: Option<u16>,
        security: Option<&Security>,
    ) -> Result<Self, Error> {
        let mut p = Self::spawn_with(bin, dir, port, "", security)?;
        if port.is_none() {
            p.port = p.read_port().await?;
        }
        p.wait_ready().await?;
        Ok(p)
    }

    /// Starts `bin` on `port` with `extra` appended to its configuration, without waiting
    /// for it: the nodes of a cluster are all started, then each is waited for with
    /// [`wait_ready`](Self::wait_ready).
    pub fn spawn_with(
        bin: PathBuf,
        dir: &Path,
        port: Option<u16>,
        extra: &str,
        security: Option<&Security>,
    ) -> Result<Self, Error> {
        let mut p = NatsProcess {
            child: None,
            dir: dir.to_owned(),
            port: port.unwrap_or(0),
            bin,
            extra: match security {
                Some(s) => format!("{extra}\n{}", s.authorization),
                None => extra.to_owned(),
            },
            seed: security.map(|s| s.seed.clone()),
        };
        p.spawn(port)?;
        Ok(p)
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops the server at once (SIGKILL) and starts it again on the same port and store.
    pub async fn restart(&mut self) -> Result<(), Error> {
        self.respawn()?;
        self.wait_ready().await
    }

    /// Kills it and starts it again on the same port and store, without waiting: to bring
    /// back several nodes of a cluster at once, then wait for each ([`Self::wait_ready`]).
    pub fn respawn(&mut self) -> Result<(), Error> {
        self.kill();
        self.spawn(Some(self.port))
    }

    /// Stops the server cleanly (SIGTERM) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Safe: the pid is our own child's, which has not been reaped yet.
            unsafe {
                libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
            }
            // Ignored: the child is gone either way once wait returns or fails.
            let _ = child.wait();
        }
    }

    /// Stops the server at once (SIGKILL).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Ignored: the child may already have exited; wait reaps it either way.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn spawn(&mut self, port: Option<u16>) -> Result<(), Error> {
        let d = &self.dir;
        let ports = d.join("ports");
        std::fs::create_dir_all(&ports).map_err(io(format!("creating {}", ports.display())))?;
        // Ports files of earlier runs would hide this run's.
        for entry in std::fs::read_dir(&ports)
            .map_err(io("reading the ports directory"))?
            .flatten()
        {
            // Ignored: a file that cannot be removed is only stale, read_port skips it.
            let _ = std::fs::remove_file(entry.path());
        }
        let listen = match port {
            Some(p) => format!("127.0.0.1:{p}"),
            None => "127.0.0.1:-1".to_owned(),
        };
        let config = format!(
            "listen: \"{listen}\"\nports_file_dir: \"{ports}\"\n\
             jetstream {{\n  store_dir: \"{store}\"\n  sync_interval: always\n}}\n{extra}\n",
            ports = ports.display(),
            store = d.join("store").display(),
            extra = self.extra,
        );
        let conf = d.join("nats.conf");
        std::fs::write(&conf, config).map_err(io(format!("writing {}", conf.display())))?;
        let log = std::fs::File::create(d.join("server.log")).map_err(io("creating server.log"))?;
        let mut command = Command::new(&self.bin);
        // No orphaned server keeps the port and the store after a crash.
        die_with_parent(&mut command);
        let child = command
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(io(format!("starting {}", self.bin.display())))?;
        self.child = Some(child);
        Ok(())
    }

    async fn read_port(&mut self) -> Result<u16, Error> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let ports = self.dir.join("ports");
        loop {
            self.check_alive()?;
            let found = std::fs::read_dir(&ports)
                .map_err(io("reading the ports directory"))?
                .flatten()
                .filter_map(|e| std::fs::read_to_string(e.path()).ok())
                .find_map(|text| parse_client_port(&text));
            if let Some(port) = found {
                return Ok(port);
            }
            if Instant::now() > deadline {
                return Err(Error::NotReady(format!(
                    "no ports file within {READY_TIMEOUT:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until the server answers JetStream requests (in a cluster: once it has a
    /// JetStream leader).
    pub async fn wait_ready(&mut self) -> Result<(), Error> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut last_error = String::new();
        while Instant::now() < deadline {
            self.check_alive()?;
            let options = match &self.seed {
                Some(seed) => async_nats::ConnectOptions::with_nkey(seed.clone()),
                None => async_nats::ConnectOptions::new(),
            };
            match options.connect(self.url()).await {
                Ok(client) => match async_nats::jetstream::new(client).query_account().await {
                    Ok(_) => return Ok(()),
                    Err(e) => last_error = e.to_string(),
                },
                Err(e) => last_error = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(Error::NotReady(format!(
            "not answering within {READY_TIMEOUT:?}: {last_error}"
        )))
    }

    fn check_alive(&mut self) -> Result<(), Error> {
        if let Some(child) = self.child.as_mut() {
            if let Some(status) = child.try_wait().map_err(io("checking nats-server"))? {
                let log = std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default();
                return Err(Error::NotReady(format!("exited with {status}:\n{log}")));
            }
        }
        Ok(())
    }
}

/// A free loopback port (it may be taken by someone else before it is used).
fn free_port() -> Result<u16, Error> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(io("finding a free port"))
}

/// Starts a JetStream cluster of `n` nodes on loopback, each with its store under
/// `dir/n<i>`, routed to each other, and waits until each answers JetStream (a leader is
/// elected). Client ports are `first_port..first_port+n` when given, else free ones.
pub async fn start_cluster(
    bin: PathBuf,
    dir: &Path,
    n: usize,
    first_port: Option<u16>,
    security: Option<&Security>,
) -> Result<Vec<NatsProcess>, Error> {
    let clients: Vec<u16> = match first_port {
        Some(p) => (0..n as u16).map(|i| p + i).collect(),
        None => (0..n).map(|_| free_port()).collect::<Result<_, _>>()?,
    };
    let routes: Vec<u16> = (0..n).map(|_| free_port()).collect::<Result<_, _>>()?;
    let route_urls: Vec<String> = routes
        .iter()
        .map(|p| format!("\"nats-route://127.0.0.1:{p}\""))
        .collect();
    let mut nodes = Vec::new();
    for i in 0..n {
        let node_dir = dir.join(format!("n{i}"));
        std::fs::create_dir_all(&node_dir)
            .map_err(io(format!("creating {}", node_dir.display())))?;
        let extra = format!(
            "server_name: n{i}\ncluster {{\n  name: handoff\n  listen: \"127.0.0.1:{}\"\n  routes: [{}]\n}}\n",
            routes[i],
            route_urls.join(", ")
        );
        nodes.push(NatsProcess::spawn_with(
            bin.clone(),
            &node_dir,
            Some(clients[i]),
            &extra,
            security,
        )?);
    }
    for node in &mut nodes {
        node.wait_ready().await?;
    }
    Ok(nodes)
}

impl Drop for NatsProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The client port from nats-server's ports file (`{"nats":["nats://127.0.0.1:PORT"],..}`).
fn parse_client_port(text: &str) -> Option<u16> {
    let start = text.find("nats://")? + "nats://".len();
    let rest = &text[start..];
    let end = rest.find('"')?;
    rest[..end].rsplit(':').next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_client_port() {
        let text = r#"{"nats":["nats://127.0.0.1:43121"],"monitoring":[]}"#;
        assert_eq!(parse_client_port(text), Some(43121));
        assert_eq!(parse_client_port("{}"), None);
    }
}

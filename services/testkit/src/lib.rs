//! Test kit: a real nats-server for tests, never a mock.
//!
//! [`NatsServer::start`] runs the pinned nats-server as a child process on an ephemeral
//! loopback port with its own temporary JetStream store and `sync_interval: always` (so an
//! acknowledged write is on disk), waits for it to answer JetStream requests, can
//! [`restart`](NatsServer::restart) it on the same port and store, and kills it and removes
//! the store on drop.
//!
//! The binary is `$NATS_SERVER_BIN`, else the project's `.tools/bin/nats-server` (put there
//! by `scripts/install-nats`), else `nats-server` on `PATH`.

pub mod proxy;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};

/// How long a server may take to start answering.
const READY_TIMEOUT: Duration = Duration::from_secs(15);

/// A running nats-server, owned by one test.
pub struct NatsServer {
    child: Option<Child>,
    dir: tempfile::TempDir,
    port: u16,
    bin: PathBuf,
}

/// Finds the nats-server binary, or says how to install it.
pub fn nats_server_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("NATS_SERVER_BIN") {
        return Ok(PathBuf::from(p));
    }
    let local = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.tools/bin/nats-server");
    if local.exists() {
        return Ok(local);
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("nats-server"))
        .find(|p| p.exists());
    on_path.ok_or_else(|| {
        anyhow!(
            "nats-server not found: install it with scripts/install-nats (or set NATS_SERVER_BIN)"
        )
    })
}

impl NatsServer {
    /// Starts a fresh server with JetStream on an ephemeral port.
    pub async fn start() -> Result<Self> {
        let bin = nats_server_bin()?;
        let dir = tempfile::Builder::new()
            .prefix("handoff-nats-")
            .tempdir()
            .context("creating the server's temporary directory")?;
        let mut server = NatsServer {
            child: None,
            dir,
            port: 0,
            bin,
        };
        server.spawn(None)?;
        server.port = server.read_port().await?;
        server.wait_ready().await?;
        Ok(server)
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// A new client connection to this server.
    pub async fn connect(&self) -> Result<async_nats::Client> {
        async_nats::connect(self.url())
            .await
            .with_context(|| format!("connecting to {}", self.url()))
    }

    /// Stops the server (SIGKILL) and starts it again on the same port and store.
    pub async fn restart(&mut self) -> Result<()> {
        self.kill();
        self.spawn(Some(self.port))?;
        self.wait_ready().await
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The directory holding the server's store and configuration.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn spawn(&mut self, port: Option<u16>) -> Result<()> {
        let d = self.dir.path();
        let ports = d.join("ports");
        std::fs::create_dir_all(&ports)?;
        let listen = match port {
            Some(p) => format!("127.0.0.1:{p}"),
            None => "127.0.0.1:-1".to_owned(),
        };
        let config = format!(
            "listen: \"{listen}\"\nports_file_dir: \"{ports}\"\n\
             jetstream {{\n  store_dir: \"{store}\"\n  sync_interval: always\n}}\n",
            ports = ports.display(),
            store = d.join("store").display(),
        );
        let conf = d.join("nats.conf");
        std::fs::write(&conf, config)?;
        let log = std::fs::File::create(d.join("server.log"))?;
        let child = Command::new(&self.bin)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        self.child = Some(child);
        Ok(())
    }

    async fn read_port(&mut self) -> Result<u16> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let ports = self.dir.path().join("ports");
        loop {
            self.check_alive()?;
            if let Some(port) = std::fs::read_dir(&ports)?
                .filter_map(|e| e.ok())
                .filter_map(|e| std::fs::read_to_string(e.path()).ok())
                .find_map(|text| parse_client_port(&text))
            {
                return Ok(port);
            }
            if Instant::now() > deadline {
                bail!("nats-server wrote no ports file within {READY_TIMEOUT:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut last_error = String::new();
        while Instant::now() < deadline {
            self.check_alive()?;
            match async_nats::connect(self.url()).await {
                Ok(client) => {
                    let js = async_nats::jetstream::new(client);
                    match js.query_account().await {
                        Ok(_) => return Ok(()),
                        Err(e) => last_error = e.to_string(),
                    }
                }
                Err(e) => last_error = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        bail!("nats-server not ready within {READY_TIMEOUT:?}: {last_error}")
    }

    fn check_alive(&mut self) -> Result<()> {
        if let Some(child) = self.child.as_mut() {
            if let Some(status) = child.try_wait()? {
                let log =
                    std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default();
                bail!("nats-server exited with {status}:\n{log}");
            }
        }
        Ok(())
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Ignored: the child may already have exited; wait reaps it either way.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The client port from nats-server's ports file (`{"nats":["nats://127.0.0.1:PORT"],..}`).
fn parse_client_port(text: &str) -> Option<u16> {
    let start = text.find("nats://")? + "nats://".len();
    let rest = &text[start..];
    let end = rest.find('"')?;
    rest[..end].rsplit(':').next()?.parse().ok()
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
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

    /// A started server answers JetStream, and answers again after a restart.
    #[tokio::test]
    async fn starts_and_restarts() -> Result<()> {
        let mut server = NatsServer::start().await?;
        let url = server.url();
        server.restart().await?;
        assert_eq!(url, server.url());
        let js = async_nats::jetstream::new(server.connect().await?);
        js.query_account().await?;
        Ok(())
    }
}

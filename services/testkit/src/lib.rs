//! Test kit: a real nats-server for tests, never a mock, and the two things every
//! end-to-end test needs around it: waiting for a condition and owning a child process.
//!
//! [`NatsServer::start`] runs the pinned nats-server as a child process on an ephemeral
//! loopback port with its own temporary JetStream store and `sync_interval: always` (so an
//! acknowledged write is on disk), waits for it to answer JetStream requests, can
//! [`restart`](NatsServer::restart) it on the same port and store, and kills it and removes
//! the store on drop.
//!
//! The binary is `$NATS_SERVER_BIN`, else the project's `.tools/bin/nats-server` (put there
//! by `scripts/install-nats`), else `nats-server` on `PATH`; when none is found the error
//! says how to install it.
//!
//! # Layout
//! - [`NatsServer`], [`NatsCluster`]: one server or a cluster per test.
//! - [`until`] (`wait`): the one poller. A test waits for what it expects by polling it to a
//!   deadline, never by sleeping a fixed time; a timeout says what was waited for.
//! - [`Child`], [`Signal`] (`child`): a child process that dies with the test (even a
//!   killed one), is signalled by pid, waited for with a deadline, and killed and reaped
//!   on drop.
//! - [`proxy::AckDropper`]: sits between a client and the server and loses JetStream
//!   acknowledgements on demand.

mod child;
pub mod proxy;
mod wait;

pub use child::{Child, Signal};
pub use wait::until;

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use handoff_natsd::NatsProcess;

/// A running nats-server, owned by one test.
pub struct NatsServer {
    // Dropped first: the process stops before its directory is removed.
    process: NatsProcess,
    dir: tempfile::TempDir,
}

impl NatsServer {
    /// Starts a fresh server with JetStream on an ephemeral port.
    pub async fn start() -> Result<Self> {
        Self::start_configured("").await
    }

    /// Like [`start`](Self::start), with `extra` added to the server's configuration
    /// (`max_payload: 65536`, say).
    pub async fn start_configured(extra: &str) -> Result<Self> {
        let bin = handoff_natsd::find_binary(&[PathBuf::from(env!("CARGO_MANIFEST_DIR"))])?;
        let dir = tempfile::Builder::new()
            .prefix("handoff-nats-")
            .tempdir()
            .context("creating the server's temporary directory")?;
        let process = NatsProcess::start_configured(bin, dir.path(), extra).await?;
        Ok(NatsServer { process, dir })
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        self.process.url()
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.process.port()
    }

    /// A new client connection to this server.
    pub async fn connect(&self) -> Result<async_nats::Client> {
        async_nats::connect(self.url())
            .await
            .with_context(|| format!("connecting to {}", self.url()))
    }

    /// Stops the server (SIGKILL) and starts it again on the same port and store.
    pub async fn restart(&mut self) -> Result<()> {
        Ok(self.process.restart().await?)
    }

    /// The directory holding the server's store and configuration.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// A JetStream cluster of nats-servers on loopback, owned by one test.
pub struct NatsCluster {
    nodes: Vec<NatsProcess>,
    dir: tempfile::TempDir,
}

impl NatsCluster {
    /// Starts `n` nodes routed to each other, with JetStream, and waits for a leader.
    pub async fn start(n: usize) -> Result<Self> {
        let bin = handoff_natsd::find_binary(&[PathBuf::from(env!("CARGO_MANIFEST_DIR"))])?;
        let dir = tempfile::Builder::new()
            .prefix("handoff-cluster-")
            .tempdir()?;
        let nodes = handoff_natsd::start_cluster(bin, dir.path(), n, None, None).await?;
        Ok(NatsCluster { nodes, dir })
    }

    /// The URL of node `i`.
    pub fn url(&self, i: usize) -> String {
        self.nodes[i].url()
    }

    /// The client port of node `i`.
    pub fn port(&self, i: usize) -> u16 {
        self.nodes[i].port()
    }

    /// A client connected to every node (it fails over between them).
    pub async fn connect(&self) -> Result<async_nats::Client> {
        let urls: Vec<async_nats::ServerAddr> = self
            .nodes
            .iter()
            .map(|n| n.url().parse())
            .collect::<Result<_, _>>()?;
        Ok(async_nats::connect(urls).await?)
    }

    /// The directory holding every node's store.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Stops node `i` at once (SIGKILL), as a lost server.
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].kill();
    }

    /// Starts node `i` again on its port and store, and waits until it answers.
    pub async fn restart(&mut self, i: usize) -> Result<()> {
        Ok(self.nodes[i].restart().await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

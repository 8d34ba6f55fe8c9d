//! The in-process stack: a nats-server from the test kit, a command service running in
//! this process, and a client for the test signed as the [`owner`].

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

use anyhow::{anyhow, Result};
use handoff_dataplane::store::Stores;
use handoff_domain::auth::Role;
use handoff_domain::command::AddUser;
use handoff_domain::{Actor, Command, CommandId, DaemonId};
use handoff_eventlog::{EventLog, Recorded};
use handoff_protocol::auth::Credentials;
use handoff_protocol::{Applied, ErrorBody};
use handoff_testkit::NatsServer;
use tokio::sync::oneshot;

use crate::cli::handoff_ok;
use crate::client::{request, send_command};
use crate::fixtures::{daemon, new_id};
use crate::TIMEOUT;

/// The owner every test stack starts with (`admin`, GLOBAL_OWNER): one key for the whole
/// test run, its credentials in a file the `handoff` processes are given.
pub fn owner() -> &'static (Credentials, PathBuf) {
    static OWNER: OnceLock<(Credentials, PathBuf)> = OnceLock::new();
    OWNER.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("handoff-test-owner-")
            .tempdir()
            .expect("a temporary directory")
            .keep();
        let path = dir.join("admin.creds");
        let creds = Credentials::generate(Actor::new("admin").expect("valid"), None);
        creds
            .write_new(&path)
            .expect("writing the owner's credentials");
        (creds, path)
    })
}

/// A command service running in this process.
pub struct CommandService {
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), handoff_command::Error>>,
}

impl CommandService {
    /// Starts a command service connected to `url`; returns once its endpoints listen.
    /// Its first owner is [`owner`] unless the config names one.
    pub async fn start(url: &str, mut config: handoff_command::Config) -> Result<Self> {
        if config.bootstrap_owner.is_none() {
            let (creds, _) = owner();
            config.bootstrap_owner = Some((creds.user.clone(), creds.public_key()));
        }
        let client = async_nats::connect(url).await?;
        let service = handoff_command::start(client, config).await?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(service.run(async {
            // Ignored: a dropped sender stops the service too.
            let _ = stopped.await;
        }));
        Ok(CommandService {
            stop: Some(stop),
            task,
        })
    }

    /// Stops it and waits until it has.
    pub async fn stop(mut self) -> Result<()> {
        if let Some(s) = self.stop.take() {
            // Ignored: the service may have stopped already.
            let _ = s.send(());
        }
        (&mut self.task).await??;
        Ok(())
    }

    /// Stops it at once, as a crash would: whatever it was doing is cut off.
    pub fn abort(self) {
        self.task.abort();
    }
}

impl Drop for CommandService {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A nats-server with a command service, and a client for the test.
pub struct Stack {
    pub server: NatsServer,
    pub client: async_nats::Client,
    pub commands: Option<CommandService>,
    /// Who [`Stack::send`] signs as: the [`owner`].
    pub creds: Credentials,
    /// Users added by [`Stack::user`], by name, with their credentials files.
    users: Mutex<HashMap<String, (Credentials, PathBuf)>>,
    files: tempfile::TempDir,
}

impl Stack {
    /// A fresh server and one command service.
    pub async fn start() -> Result<Self> {
        let server = NatsServer::start().await?;
        let commands = CommandService::start(&server.url(), Default::default()).await?;
        let client = server.connect().await?;
        Stack::on(server, client, Some(commands))
    }

    /// A stack of these parts (a command service started with the default owner).
    pub fn on(
        server: NatsServer,
        client: async_nats::Client,
        commands: Option<CommandService>,
    ) -> Result<Self> {
        Ok(Stack {
            server,
            client,
            commands,
            creds: owner().0.clone(),
            users: Default::default(),
            files: tempfile::tempdir()?,
        })
    }

    /// A user with `roles` (bound to `daemon`), added by the owner on first use: its
    /// credentials and their file (for a `handoff` process).
    pub async fn user(
        &self,
        name: &str,
        roles: &[Role],
        daemon: Option<DaemonId>,
    ) -> Result<(Credentials, PathBuf)> {
        if let Some(u) = self.users.lock().expect("users lock").get(name) {
            return Ok(u.clone());
        }
        let creds = Credentials::generate(Actor::new(name)?, None);
        let path = self.files.path().join(format!("{name}.creds"));
        self.apply(Command::AddUser(AddUser {
            user: creds.user.clone(),
            roles: roles.to_vec(),
            key: creds.public_key(),
            daemon,
        }))
        .await?;
        creds.write_new(&path)?;
        self.users
            .lock()
            .expect("users lock")
            .insert(name.to_owned(), (creds.clone(), path.clone()));
        Ok((creds, path))
    }

    /// Daemon `n`'s user, `backup<n>` (BACKUP_DAEMON), which reports on moves to it.
    pub async fn daemon_user(&self, n: usize) -> Result<Credentials> {
        Ok(self
            .user(
                &format!("backup{n}"),
                &[Role::BackupDaemon],
                Some(daemon(n)),
            )
            .await?
            .0)
    }

    /// Sends a report of daemon `n` (signed by its user) that must be applied.
    pub async fn report(&self, n: usize, command: Command) -> Result<Applied> {
        let creds = self.daemon_user(n).await?;
        let name = command.name();
        send_command(&self.client, &creds, &new_id(), &command)
            .await?
            .map_err(|e| anyhow!("{name} by daemon {n} refused: {} ({})", e.message, e.reason))
    }

    pub fn url(&self) -> String {
        self.server.url()
    }

    pub async fn log(&self) -> Result<EventLog> {
        Ok(EventLog::attach(self.client.clone(), Default::default()).await?)
    }

    /// The stream's last sequence.
    pub async fn last_seq(&self) -> Result<u64> {
        Ok(self.log().await?.last_sequence().await?)
    }

    /// Every event in the stream, in order.
    pub async fn events(&self) -> Result<Vec<Recorded>> {
        let log = self.log().await?;
        let end = log.last_sequence().await?;
        let mut reader = log.read_from(1).await?;
        let mut out = Vec::new();
        while (out.len() as u64) < end {
            out.push(tokio::time::timeout(TIMEOUT, reader.next()).await??);
        }
        Ok(out)
    }

    /// Sends a command with a new id; the service's reply.
    pub async fn send(&self, command: Command) -> Result<Result<Applied, ErrorBody>> {
        self.send_as(&new_id(), &command).await
    }

    /// Sends a command with the given id.
    pub async fn send_as(
        &self,
        id: &CommandId,
        command: &Command,
    ) -> Result<Result<Applied, ErrorBody>> {
        send_command(&self.client, &self.creds, id, command).await
    }

    /// Sends raw bytes to a command endpoint.
    pub async fn send_raw(
        &self,
        endpoint: &str,
        body: Vec<u8>,
    ) -> Result<Result<Applied, ErrorBody>> {
        request(&self.client, endpoint, body).await
    }

    /// Sends a command that must be applied.
    pub async fn apply(&self, command: Command) -> Result<Applied> {
        let name = command.name();
        self.send(command)
            .await?
            .map_err(|e| anyhow!("{name} refused: {} ({})", e.message, e.reason))
    }
}

/// A data-plane story's stack: a fresh server, one command service, the data plane's
/// stores, and the schedule's hours lasting `hour_ms` (with 300 hours of oplog kept).
pub async fn data_stack(hour_ms: u64) -> Result<(Stack, Stores)> {
    let server = NatsServer::start().await?;
    let url = server.url();
    let commands = CommandService::start(&url, Default::default()).await?;
    let client = server.connect().await?;
    let stores = Stores::open(client.clone(), 1).await?;
    let stack = Stack::on(server, client, Some(commands))?;
    handoff_ok(
        &url,
        &[
            "schedule",
            "--hour-ms",
            &hour_ms.to_string(),
            "--oplog-ttl-hours",
            "300",
        ],
    )?;
    Ok((stack, stores))
}

//! What the end-to-end tests share: a stack of real parts (a nats-server from the test
//! kit, the command service, a projector) and helpers to send commands and queries and to
//! read the stream back.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Process, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use futures::StreamExt;
use handoff_dataplane::oplog::{self, Ts};
use handoff_dataplane::store::Stores;
use handoff_dataplane::Checksum;
use handoff_domain::auth::Role;
use handoff_domain::command::*;
use handoff_domain::model::{DaemonSettings, Deployment, HeadDiskType, JobSize};
use handoff_domain::{Actor, Command, CommandId, DaemonId, Event, JobId, Label, ProjectId};
use handoff_eventlog::{EventLog, Recorded};
use handoff_protocol::auth::{Credentials, SIGNATURE_HEADER};
use handoff_protocol::{Applied, ErrorBody, Reply};
use handoff_testkit::NatsServer;
use serde_json::Value;
use tokio::sync::oneshot;

/// How long any wait in a test may take before it fails.
pub const TIMEOUT: Duration = Duration::from_secs(20);

/// The owner every test stack starts with (`admin`, GLOBAL_OWNER): one key for the whole
/// test run, its credentials in a file the `handoff` processes are given.
pub fn owner() -> &'static (Credentials, PathBuf) {
    static OWNER: std::sync::OnceLock<(Credentials, PathBuf)> = std::sync::OnceLock::new();
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
    users: std::sync::Mutex<std::collections::HashMap<String, (Credentials, PathBuf)>>,
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

/// Sends raw bytes to a command endpoint over `client`, signed by the [`owner`] (what
/// was signed is exactly what is sent).
pub async fn request(
    client: &async_nats::Client,
    endpoint: &str,
    body: Vec<u8>,
) -> Result<Result<Applied, ErrorBody>> {
    let subject = handoff_protocol::subjects::command(endpoint);
    let signature = owner().0.sign(&subject, &body);
    request_signed(client, &subject, body, Some(&signature)).await
}

/// Sends `body` on `subject` with `signature` as its signature header (none: unsigned).
pub async fn request_signed(
    client: &async_nats::Client,
    subject: &str,
    body: Vec<u8>,
    signature: Option<&str>,
) -> Result<Result<Applied, ErrorBody>> {
    let mut headers = async_nats::HeaderMap::new();
    if let Some(s) = signature {
        headers.insert(SIGNATURE_HEADER, s);
    }
    let reply = tokio::time::timeout(
        TIMEOUT,
        client.request_with_headers(subject.to_owned(), headers, body.into()),
    )
    .await
    .context("command timed out")??;
    let reply: Reply = serde_json::from_slice(&reply.payload).with_context(|| {
        format!(
            "unreadable reply: {}",
            String::from_utf8_lossy(&reply.payload)
        )
    })?;
    Ok(reply.into_result())
}

/// Sends `command` signed by `creds` with the given id over `client`; the service's reply.
pub async fn send_command(
    client: &async_nats::Client,
    creds: &Credentials,
    id: &CommandId,
    command: &Command,
) -> Result<Result<Applied, ErrorBody>> {
    let signed = creds.sign_command(id, command, Some("handoff-tests"));
    request_signed(
        client,
        &signed.subject,
        signed.payload,
        Some(&signed.signature),
    )
    .await
}

/// Asks the projector's query service.
pub async fn query(
    client: &async_nats::Client,
    name: &str,
    body: Value,
) -> Result<Result<Value, Value>> {
    let subject = handoff_protocol::subjects::query(name);
    let reply = tokio::time::timeout(
        TIMEOUT,
        client.request(subject, serde_json::to_vec(&body)?.into()),
    )
    .await
    .context("query timed out")??;
    let mut v: Value = serde_json::from_slice(&reply.payload)?;
    if let Some(ok) = v.get_mut("ok") {
        return Ok(Ok(ok.take()));
    }
    Ok(Err(v["error"].take()))
}

/// Polls `check` until it returns `Some`, failing after [`TIMEOUT`].
pub async fn wait_for<T, F, Fut>(what: &str, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some(v) = check().await? {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the projector's views include sequence `seq`.
pub async fn wait_for_checkpoint(client: &async_nats::Client, seq: u64) -> Result<u64> {
    wait_for(&format!("the projector to reach {seq}"), || async move {
        Ok(match query(client, "status", serde_json::json!({})).await {
            Ok(Ok(v)) => v["checkpoint"].as_u64().filter(|c| *c >= seq),
            _ => None,
        })
    })
    .await
}

pub fn new_id() -> CommandId {
    CommandId::new(ulid::Ulid::new().to_string()).expect("a ULID is a valid command id")
}

pub fn daemon(n: usize) -> DaemonId {
    DaemonId::new(format!("backup{n}.example.net:/data/backup/")).expect("a valid daemon id")
}

pub fn project(name: &str) -> ProjectId {
    ProjectId::new(name).expect("a valid project id")
}

pub fn job(id: &str) -> JobId {
    JobId::new(id).expect("a valid job id")
}

pub fn label(l: &str) -> Label {
    Label::new(l).expect("a valid label")
}

/// Settings of an HDD daemon that takes work, with `gib` GiB of head space.
pub fn settings(gib: u64) -> DaemonSettings {
    DaemonSettings {
        head_space_bytes: gib << 30,
        num_workers: 4,
        head_disk_type: HeadDiskType::Hdd,
        ..DaemonSettings::default()
    }
}

pub fn register(n: usize, settings: DaemonSettings) -> Command {
    Command::RegisterDaemon(RegisterDaemon {
        daemon: daemon(n),
        settings,
    })
}

pub fn configure_project(name: &str) -> Command {
    Command::ConfigureProject(ConfigureProject {
        project: project(name),
        daemon_filter: vec![],
        label_filter: vec![],
    })
}

/// A replica set of `gib` GiB of head.
pub fn replica_set(project_name: &str, name: &str, gib: u64) -> Command {
    Command::CreateBackupJobs(CreateBackupJobs {
        project: project(project_name),
        deployment: Deployment::ReplicaSet {
            name: handoff_domain::ids::DeploymentName::new(name).expect("a valid name"),
            size: JobSize {
                head_size_bytes: gib << 30,
                oplog_bytes_per_hour: 1 << 20,
            },
        },
    })
}

pub fn move_jobs(from: usize, to: usize) -> Command {
    Command::MoveJobs(MoveJobs {
        from: daemon(from),
        to: daemon(to),
        reason: Some("server lost".into()),
        dry_run: false,
    })
}

pub fn move_job(j: &str, to: usize) -> Command {
    Command::MoveJob(MoveJob {
        job: job(j),
        to: daemon(to),
        reason: None,
        dry_run: false,
    })
}

/// The events of a kind, in stream order.
pub fn of_type<'a>(events: &'a [Recorded], kind: &str) -> Vec<&'a Event> {
    events
        .iter()
        .map(|r| &r.envelope.event)
        .filter(|e| e.type_name() == kind)
        .collect()
}

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

/// A projector running as its own process, so it can be killed like a real one.
pub struct ProjectorProcess {
    child: Child,
}

impl ProjectorProcess {
    pub fn spawn(url: &str, dir: &Path, extra: &[&str]) -> Result<Self> {
        let mut command = Process::new(handoff_bin()?);
        // Gone with the tests, even when a test leaves it behind.
        handoff_natsd::die_with_parent(&mut command);
        let child = command
            .args(["--nats-url", url, "projector", "--data"])
            .arg(dir)
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()?;
        Ok(ProjectorProcess { child })
    }

    /// SIGKILL: no chance to flush or clean up.
    pub fn kill(mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// SIGTERM, then waits: whether it stopped cleanly.
    pub fn terminate(self) -> Result<bool> {
        let status = Process::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()?;
        if !status.success() {
            bail!("kill -TERM failed");
        }
        self.wait()
    }

    /// Waits for the process to exit by itself and returns whether it succeeded.
    pub fn wait(mut self) -> Result<bool> {
        Ok(self.child.wait()?.success())
    }
}

impl Drop for ProjectorProcess {
    fn drop(&mut self) {
        // Ignored: the child may have exited already.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every key and value of a view store, for comparing two stores.
pub fn dump_views(dir: &Path) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    use handoff_projector::ViewStore;
    let store = handoff_projector::SledStore::open(dir)?;
    Ok(store.scan(b"")?)
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

/// A `handoff` process running in the background (`up`, `watch`, `move-jobs --wait`).
pub struct Background {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
    pub seen: Vec<String>,
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
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        match url {
            Some(u) => command.env("HANDOFF_NATS_URL", u),
            None => command.env_remove("HANDOFF_NATS_URL"),
        };
        let mut child = command.spawn()?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let (tx, lines) = std::sync::mpsc::channel();
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
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
                    self.seen.push(line);
                }
                return Ok((status.code().unwrap_or(-1), std::mem::take(&mut self.seen)));
            }
            if Instant::now() > deadline {
                bail!(
                    "the process did not exit within {TIMEOUT:?}; printed {:?}",
                    self.seen
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then [`Background::finish`].
    pub fn terminate(self) -> Result<(i32, Vec<String>)> {
        Process::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()?;
        self.finish()
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        // Ignored: the child may have exited already.
        let _ = self.child.kill();
        let _ = self.child.wait();
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

    /// Waits until the projector has folded every event appended so far.
    pub async fn settle(&self) -> Result<()> {
        let client = self.server.connect().await?;
        let log = EventLog::attach(client.clone(), Default::default()).await?;
        wait_for_checkpoint(&client, log.last_sequence().await?).await?;
        Ok(())
    }
}

/// What a story keeps alive (servers, processes, directories) until the test process
/// ends.
pub type Keep = Vec<Box<dyn std::any::Any + Send>>;

/// Plays a module's story once and hands every test its record (`play` returns it with
/// what must stay alive). The story runs in a
/// thread and runtime of its own that live as long as the test process: the processes it
/// starts die with the thread that started them.
pub fn story_once<T, F, Fut>(
    cell: &'static std::sync::OnceLock<Result<T, String>>,
    play: F,
) -> &'static T
where
    T: Send + Sync + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = (Result<T>, Keep)>,
{
    let result = cell.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().expect("a runtime");
            let (record, _keep) = rt.block_on(play());
            let _ = tx.send(record.map_err(|e| format!("{e:#}")));
            loop {
                std::thread::park();
            }
        });
        rx.recv()
            .unwrap_or_else(|_| Err("the story thread died".into()))
    });
    match result {
        Ok(s) => s,
        Err(e) => panic!("the story failed: {e}"),
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

/// A `handoff` process of a story (agent, daemon, monitor), its log in a file.
pub struct Proc {
    pub child: Child,
    pub name: String,
}

impl Proc {
    /// Runs `handoff ARGS` as the user of the credentials file `creds`.
    pub fn spawn(url: &str, dir: &Path, name: &str, creds: &Path, args: &[&str]) -> Result<Proc> {
        let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
        let mut command = Process::new(handoff_bin()?);
        handoff_natsd::die_with_parent(&mut command);
        let child = command
            .args(["--nats-url", url])
            .arg("--creds")
            .arg(creds)
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        Ok(Proc {
            child,
            name: name.to_owned(),
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

    pub fn signal(&self, signal: &str) -> Result<()> {
        let ok = Process::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()?
            .success();
        if !ok {
            bail!("kill {signal} {} failed", self.name);
        }
        Ok(())
    }

    pub fn kill(mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // Ignored: the child may have exited already.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One job's oplog as stored.
#[derive(Debug, Default)]
pub struct OplogScan {
    pub first_n: u64,
    pub last_n: u64,
    pub gaps: Vec<(u64, u64)>,
    pub source_at: BTreeMap<Ts, Checksum>,
}

/// Waits (polling every 50 ms) until `check` holds, at most `limit`.
pub async fn until<F, Fut>(what: &str, limit: Duration, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let deadline = Instant::now() + limit;
    while !check().await? {
        if Instant::now() > deadline {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Reads a job's whole oplog as stored: its entry numbers and the source's checksum at
/// each timestamp.
pub async fn scan_oplog(stores: &Stores, job: &JobId) -> Result<OplogScan> {
    let (last_seq, _) = stores
        .oplog_last(job)
        .await?
        .ok_or_else(|| anyhow!("no oplog of {job}"))?;
    let mut messages = stores.read_oplog(job, 1).await?;
    let mut scan = OplogScan::default();
    loop {
        let m = tokio::time::timeout(TIMEOUT, messages.next())
            .await
            .context("reading the oplog")?
            .ok_or_else(|| anyhow!("oplog reader ended"))??;
        let seq = m.info().map_err(|e| anyhow!("{e}"))?.stream_sequence;
        for e in oplog::decode(&m.payload)? {
            if scan.first_n == 0 {
                scan.first_n = e.n;
            } else if e.n != scan.last_n + 1 {
                scan.gaps.push((scan.last_n, e.n));
            }
            scan.last_n = e.n;
            scan.source_at.insert(e.ts, e.c);
        }
        if seq >= last_seq {
            return Ok(scan);
        }
    }
}

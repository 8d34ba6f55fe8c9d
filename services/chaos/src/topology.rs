//! The deployment under test, all real processes: a 3-node JetStream cluster with the
//! generated authorization of `handoff up`, two command services (the second reaches the
//! cluster through the test kit's ack-losing proxy), two projectors, the monitor with the
//! failover policy on, the agent and the daemons, each a `handoff` process with its own
//! NATS identity and user, its log appended to `<dir>/<name>.log` across restarts.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use handoff::secrets::{self, key_path, NatsKeys};
use handoff_client::{new_command_id, Client, Retry, SendError};
use handoff_domain::auth::Role;
use handoff_domain::command::{AddUser, ConfigureProject, CreateBackupJobs};
use handoff_domain::ids::DeploymentName;
use handoff_domain::model::{self, JobSize};
use handoff_domain::{Actor, Command as Cmd, DaemonId, Event, JobId, ProjectId, Rejection};
use handoff_eventlog::EventLog;
use handoff_natsd::NatsProcess;
use handoff_protocol::auth::Credentials;
use handoff_protocol::permissions::ProcessRole;
use handoff_testkit::proxy::AckDropper;

/// What a run deploys.
#[derive(Clone, Debug)]
pub struct Shape {
    pub daemons: usize,
    pub jobs: usize,
    /// The monitor's threshold for DAEMON_DOWN (and its failover delay).
    pub down_after: Duration,
    pub heartbeat: Duration,
}

/// Which service a process is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Part {
    Command(usize),
    Projector(usize),
    Monitor,
    Agent,
    Daemon(usize),
}

impl std::fmt::Display for Part {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Part::Command(i) => write!(f, "command-service-{}", i + 1),
            Part::Projector(i) => write!(f, "projector-{}", i + 1),
            Part::Monitor => f.write_str("monitor"),
            Part::Agent => f.write_str("agent"),
            Part::Daemon(i) => write!(f, "daemon-{}", i + 1),
        }
    }
}

/// One `handoff` process that can be killed, frozen and started again the same way.
pub struct Service {
    pub part: Part,
    bin: PathBuf,
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
    frozen: bool,
}

impl Service {
    fn start(&mut self) -> Result<()> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        let mut command = Command::new(&self.bin);
        command
            .args(&self.args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        handoff_natsd::die_with_parent(&mut command);
        self.child = Some(
            command
                .spawn()
                .with_context(|| format!("starting {}", self.part))?,
        );
        self.frozen = false;
        Ok(())
    }

    fn signal(&self, signal: libc::c_int) -> Result<()> {
        let Some(child) = &self.child else {
            bail!("{} is not running", self.part);
        };
        let pid = libc::pid_t::try_from(child.id())?;
        // SAFETY: kill(2) reads two integers; the pid is our unreaped child's.
        if unsafe { libc::kill(pid, signal) } != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        Ok(())
    }

    /// SIGKILL; it is reaped on a blocking thread, so a process slow to die (in the
    /// middle of a write to disk) never holds up the run.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Ignored: it may have exited by itself; wait reaps it either way.
            let _ = child.kill();
            tokio::task::spawn_blocking(move || {
                let _ = child.wait();
            });
        }
        self.frozen = false;
    }

    /// Starts it again after a kill.
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        self.start()
    }

    pub fn freeze(&mut self) -> Result<()> {
        self.signal(libc::SIGSTOP)?;
        self.frozen = true;
        Ok(())
    }

    pub fn thaw(&mut self) -> Result<()> {
        self.signal(libc::SIGCONT)?;
        self.frozen = false;
        Ok(())
    }

    pub fn is_frozen(&self) -> bool {
        self.frozen
    }

    /// Whether it runs (not killed, not exited by itself).
    pub fn alive(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// SIGTERM, then SIGKILL if it has not stopped within `grace`.
    pub async fn stop(&mut self, grace: Duration) {
        if self.frozen {
            // Ignored: a thaw that fails means the process is gone.
            let _ = self.thaw();
        }
        if self.signal(libc::SIGTERM).is_ok() {
            let deadline = tokio::time::Instant::now() + grace;
            while tokio::time::Instant::now() < deadline && self.alive() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        self.kill();
    }
}

/// The running deployment.
pub struct Deployment {
    pub dir: PathBuf,
    pub nodes: Vec<NatsProcess>,
    /// Which nodes the nemesis has killed and not restarted yet.
    pub node_down: Vec<bool>,
    /// Every node's URL, comma-separated: what every process is given.
    pub urls: String,
    pub keys: NatsKeys,
    pub owner: Credentials,
    pub daemons: Vec<DaemonId>,
    pub jobs: Vec<JobId>,
    pub services: Vec<Service>,
    /// Between the second command service and node 2: loses acknowledgements on demand.
    pub proxy: AckDropper,
    bin: PathBuf,
}

pub fn daemon_id(dir: &Path, n: usize) -> DaemonId {
    DaemonId::new(format!(
        "chaos{n}.example.net:{}/",
        dir.join(format!("heads{n}")).display()
    ))
    .expect("a valid daemon id")
}

fn handoff_bin() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let bin = exe.with_file_name("handoff");
    if !bin.exists() {
        bail!(
            "{} is missing: build it first (cargo build --bins)",
            bin.display()
        );
    }
    Ok(bin)
}

impl Deployment {
    /// Starts the cluster, the services and the fleet, and waits until every daemon is
    /// registered and every job placed.
    pub async fn start(dir: &Path, shape: &Shape) -> Result<Deployment> {
        let bin = handoff_bin()?;
        let daemons: Vec<DaemonId> = (1..=shape.daemons).map(|n| daemon_id(dir, n)).collect();
        let secrets_dir = dir.join("secrets");
        secrets::private_dir(&secrets_dir)?;
        let keys = NatsKeys::load_or_create(&secrets_dir, &daemons)?;
        let nats_bin = handoff_natsd::find_binary(&[std::env::current_dir()?, bin.clone()])?;
        let nodes = handoff_natsd::start_cluster(
            nats_bin,
            &dir.join("nats"),
            3,
            None,
            Some(&keys.security()),
        )
        .await?;
        let urls = nodes
            .iter()
            .map(NatsProcess::url)
            .collect::<Vec<_>>()
            .join(",");
        let proxy = AckDropper::start(nodes[1].port()).await?;
        let admin = Actor::new("admin")?;
        let owner = secrets::creds_file(
            &secrets_dir.join("owner.creds"),
            &admin,
            Some(keys.operator.clone()),
        )?;
        let mut d = Deployment {
            dir: dir.to_owned(),
            node_down: vec![false; nodes.len()],
            nodes,
            urls,
            keys,
            owner,
            daemons,
            jobs: Vec::new(),
            services: Vec::new(),
            proxy,
            bin,
        };
        d.start_control_plane().await?;
        d.start_data_plane(shape).await?;
        Ok(d)
    }

    fn key(&self, role: ProcessRole) -> String {
        key_path(&self.keys.dir, &role).display().to_string()
    }

    fn add(&mut self, part: Part, url: String, identity: Vec<String>, args: &[&str]) -> Result<()> {
        let mut all = vec!["--nats-url".to_owned(), url];
        all.extend(identity);
        all.extend(args.iter().map(|a| (*a).to_owned()));
        let mut service = Service {
            part,
            bin: self.bin.clone(),
            args: all,
            log: self.dir.join(format!("{part}.log")),
            child: None,
            frozen: false,
        };
        service.start()?;
        self.services.push(service);
        Ok(())
    }

    async fn start_control_plane(&mut self) -> Result<()> {
        let first_owner = format!("admin={}", self.owner.public_key());
        let key = vec![
            "--nats-key".to_owned(),
            self.key(ProcessRole::CommandService),
        ];
        let args = [
            "command-service",
            "--replicas",
            "3",
            "--first-owner",
            &first_owner,
        ];
        self.add(Part::Command(0), self.urls.clone(), key.clone(), &args)?;
        self.add(Part::Command(1), self.proxy.url(), key, &args)?;
        for i in 0..2 {
            let key = vec!["--nats-key".to_owned(), self.key(ProcessRole::Projector)];
            let data = self
                .dir
                .join(format!("views{}", i + 1))
                .display()
                .to_string();
            let name = format!("p{}", i + 1);
            self.add(
                Part::Projector(i),
                self.urls.clone(),
                key,
                &["projector", "--data", &data, "--name", &name],
            )?;
        }
        Ok(())
    }

    /// Starts again every process that exited by itself, as a supervisor (systemd,
    /// Kubernetes) would, except those in `faulted`; returns their names.
    pub fn supervise(&mut self, faulted: &[Part]) -> Result<Vec<Part>> {
        let mut restarted = Vec::new();
        for s in &mut self.services {
            if faulted.contains(&s.part) || s.is_frozen() || s.alive() {
                continue;
            }
            s.restart()?;
            restarted.push(s.part);
        }
        Ok(restarted)
    }

    /// The owner's command client, patient enough to ride through the faults.
    pub async fn owner_client(&self) -> Result<Client> {
        let nats = self.connect(&self.keys.operator).await?;
        Ok(
            Client::new(nats, self.owner.clone(), "handoff-chaos").with_retry(Retry {
                attempt_timeout: Duration::from_secs(5),
                deadline: Duration::from_secs(120),
                first_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(1),
                when_nothing_answers: true,
            }),
        )
    }

    /// A connection with the identity of `seed`, to any node.
    pub async fn connect(&self, seed: &str) -> Result<async_nats::Client> {
        let addrs = handoff::client::server_addrs(&self.urls)?;
        Ok(async_nats::ConnectOptions::with_nkey(seed.to_owned())
            .retry_on_initial_connect()
            .connect(addrs)
            .await?)
    }

    /// The checker's and the setup's view of the stream and the stores: an operator's
    /// identity, which may read them and set the schedule, as a person would.
    pub async fn admin_connection(&self) -> Result<async_nats::Client> {
        self.connect(&self.keys.operator).await
    }

    /// The checker's view of the data plane's stores, fences and head records included:
    /// a daemon's identity, which reads them all (the operator's does not read fences).
    pub async fn store_connection(&self) -> Result<async_nats::Client> {
        let seed = &self.keys.daemons.first().context("a daemon")?.1;
        self.connect(seed).await
    }

    /// Adds a process's user (once) and writes its credentials file.
    async fn user(
        &self,
        client: &Client,
        name: &str,
        role: Role,
        daemon: Option<DaemonId>,
        seed: &str,
    ) -> Result<PathBuf> {
        let path = self.dir.join("secrets").join(format!("{name}.creds"));
        let user = Actor::new(name)?;
        let creds = secrets::creds_file(&path, &user, Some(seed.to_owned()))?;
        let add = Cmd::AddUser(AddUser {
            user,
            roles: [role].into(),
            key: creds.public_key(),
            daemon,
        });
        match client.send(&new_command_id(), &add).await {
            Ok(_) | Err(SendError::Rejected(Rejection::AlreadyExists { .. })) => Ok(path),
            Err(e) => Err(e).with_context(|| format!("adding user {name}")),
        }
    }

    /// Waits until a command service answers, starting again any service that could not
    /// start yet (a cluster still electing its leaders refuses to create streams).
    async fn wait_answering(&mut self, client: &Client, command: &Cmd) -> Result<()> {
        let quick = client
            .clone()
            .with_retry(Retry::once(Duration::from_secs(5)));
        for _ in 0..60 {
            match quick.send(&new_command_id(), command).await {
                Ok(_) => return Ok(()),
                Err(SendError::Unavailable { .. }) => {
                    for part in self.supervise(&[])? {
                        println!("chaos: {part} exited during the setup; started again");
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
        bail!("no command service answered within a minute")
    }

    async fn start_data_plane(&mut self, shape: &Shape) -> Result<()> {
        let client = self.owner_client().await?;
        let project = ProjectId::new("chaos")?;
        let configure = Cmd::ConfigureProject(ConfigureProject {
            project: project.clone(),
            daemon_filter: vec![],
            label_filter: vec![],
        });
        self.wait_answering(&client, &configure).await?;
        let monitor_seed = self.keys.monitor.clone();
        let monitor = self
            .user(&client, "monitor", Role::BackupMonitor, None, &monitor_seed)
            .await?;
        let policy = self
            .user(
                &client,
                "failover-policy",
                Role::BackupMonitor,
                None,
                &monitor_seed,
            )
            .await?;
        let agent_seed = self.keys.agent.clone();
        let agent = self
            .user(&client, "agent", Role::BackupAgent, None, &agent_seed)
            .await?;
        let creds = |p: &Path| vec!["--creds".to_owned(), p.display().to_string()];
        self.add(
            Part::Agent,
            self.urls.clone(),
            creds(&agent),
            &[
                "agent",
                "--replicas",
                "3",
                "--ops-per-sec",
                "40",
                "--slice-ms",
                "250",
                "--groom-ms",
                "1000",
                "--initial-size",
                "32KiB",
                "--doc-size",
                "128",
            ],
        )?;
        // The agent creates the stores; the operator then sets the schedule.
        self.set_schedule().await?;
        let heartbeat = shape.heartbeat.as_millis().to_string();
        for (i, id) in self.daemons.clone().iter().enumerate() {
            let seed = self.keys.daemon(id).context("a daemon key")?.to_owned();
            let path = self
                .user(
                    &client,
                    &format!("d{}", i + 1),
                    Role::BackupDaemon,
                    Some(id.clone()),
                    &seed,
                )
                .await?;
            self.add(
                Part::Daemon(i),
                self.urls.clone(),
                creds(&path),
                &[
                    "daemon",
                    "--id",
                    id.as_str(),
                    "--head-space",
                    "100GiB",
                    "--num-workers",
                    "2",
                    "--heartbeat-ms",
                    &heartbeat,
                ],
            )?;
        }
        self.wait_registered().await?;
        for k in 1..=shape.jobs {
            let create = Cmd::CreateBackupJobs(CreateBackupJobs {
                project: project.clone(),
                deployment: model::Deployment::ReplicaSet {
                    name: DeploymentName::new(format!("rs{k}"))?,
                    size: JobSize {
                        head_size_bytes: 1 << 30,
                        oplog_bytes_per_hour: 1_000_000,
                    },
                },
            });
            client.send(&new_command_id(), &create).await?;
            self.jobs.push(JobId::new(format!("chaos/rs{k}"))?);
        }
        let down = format!("{}ms", shape.down_after.as_millis());
        let identity = creds(&monitor);
        let policy = policy.display().to_string();
        self.add(
            Part::Monitor,
            self.urls.clone(),
            identity,
            &[
                "monitor",
                "--replicas",
                "3",
                "--down-after",
                &down,
                "--failover",
                "--failover-delay",
                &down,
                "--move-stuck-after",
                "90s",
                "--max-concurrent-rebuilds",
                "4",
                "--policy-creds",
                &policy,
            ],
        )?;
        Ok(())
    }

    /// A short snapshot schedule, so snapshots are cut (and fenced) during the run.
    async fn set_schedule(&self) -> Result<()> {
        let nats = self.admin_connection().await?;
        // Creating the stores on a cluster can outlast one request's timeout: again.
        let mut tries = 0;
        let stores = loop {
            match handoff_dataplane::store::Stores::bind(nats.clone()).await {
                Ok(s) => break s,
                Err(e) if tries < 30 => {
                    tries += 1;
                    println!("chaos: the data plane's stores are not ready ({e}); again");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => return Err(e.into()),
            }
        };
        let mut settings = stores.settings().await?;
        // Snapshots every 30 s; the oplog kept for 25 minutes, so a completed rebuild can
        // be checked against the source's own checksums.
        settings.schedule.hour_ms = 5_000;
        settings.retention.ttl_hours = 300;
        stores.set_settings(&settings).await?;
        Ok(())
    }

    async fn wait_registered(&self) -> Result<()> {
        let log = EventLog::attach(self.admin_connection().await?, Default::default()).await?;
        let mut reader = log.read_from(1).await?;
        let mut missing: Vec<DaemonId> = self.daemons.clone();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while !missing.is_empty() {
            let r = tokio::time::timeout_at(deadline, reader.next())
                .await
                .context("daemons did not register within 60 s")??;
            if let Event::DaemonRegistered { daemon, .. } = &r.envelope.event {
                missing.retain(|d| d != daemon);
            }
        }
        Ok(())
    }

    /// SIGKILL of node `i`.
    pub fn kill_node(&mut self, i: usize) {
        self.nodes[i].kill();
        self.node_down[i] = true;
    }

    /// Node `i` started again on its port and store; waits until it answers JetStream.
    pub async fn restart_node(&mut self, i: usize) -> Result<()> {
        self.nodes[i].restart().await?;
        self.node_down[i] = false;
        Ok(())
    }

    pub fn service(&mut self, part: Part) -> &mut Service {
        self.services
            .iter_mut()
            .find(|s| s.part == part)
            .expect("every part is deployed")
    }

    pub fn parts(&self) -> Vec<Part> {
        self.services.iter().map(|s| s.part).collect()
    }

    /// Every process thawed and running again, every node up: the quiet period starts.
    pub async fn heal(&mut self) -> Result<()> {
        for i in 0..self.nodes.len() {
            if self.node_down[i] {
                self.restart_node(i).await?;
            }
        }
        for s in &mut self.services {
            if s.is_frozen() {
                s.thaw()?;
            }
            if !s.alive() {
                s.restart()?;
            }
        }
        Ok(())
    }
}

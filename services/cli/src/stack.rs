//! `handoff up`: everything in one foreground process. A nats-server child (its data in a
//! local directory, stopped with the stack) unless `--nats-url` names a running server,
//! the command service, a projector, and a sample fleet.
//!
//! Security: a server it starts admits only the nkeys of its processes, each with the
//! permissions of its role (`handoff_protocol::permissions`); the keys live in
//! `DATA/secrets/` (0700, files 0600) and are reused on the next start. The first
//! GLOBAL_OWNER is `--creds` when given, else `admin` with credentials in
//! `DATA/owner.creds`; the agent and each daemon get a user of their own.

use std::path::{Path, PathBuf};

use clap::Args;
use handoff_domain::auth::Role;
use handoff_domain::command::AddUser;
use handoff_domain::{Actor, Command, DaemonId};
use handoff_natsd::NatsProcess;
use handoff_protocol::auth::Credentials;
use tokio::sync::oneshot;

use crate::sample::{sample_daemon, seed, settle};
use crate::secrets::{self, NatsKeys};
use crate::{Context, Failure};

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Where the stack keeps its data: the NATS store and the projector's views.
    #[arg(long, default_value = ".handoff")]
    pub data: PathBuf,
    /// Client port of the nats-server it starts (0: any free port).
    #[arg(long, default_value_t = 4222)]
    pub port: u16,
    /// Do not create the sample fleet.
    #[arg(long)]
    pub no_sample: bool,
    /// Start a JetStream cluster of this many nodes (client ports from --port on) and keep
    /// the event stream on as many replicas (at most 5), instead of a single server.
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=5))]
    pub cluster: Option<u8>,
    /// Run only the control plane: no agent, no daemon processes (moves then wait for
    /// someone to report their rebuilds).
    #[arg(long)]
    pub no_data_plane: bool,
    /// Length of an hour of snapshot schedule, in milliseconds: the default makes the
    /// sample's 6-hour snapshot interval last a minute.
    #[arg(long, default_value_t = 10_000)]
    pub hour_ms: u64,
    /// The monitor's options (it runs with the data plane).
    #[command(flatten)]
    pub monitor: crate::cmd::monitor::MonitorSettingsArgs,
    /// The simulated sources of the sample fleet's jobs.
    #[command(flatten)]
    pub sim: crate::cmd::data::SimArgs,
    /// Serve the console (`handoff web`) here too, as the stack's owner (port 0: any).
    #[arg(long, value_name = "ADDR")]
    pub web: Option<std::net::SocketAddr>,
}

impl UpArgs {
    /// The agent of the sample fleet: the defaults, with the simulated sources asked for.
    fn agent_config(&self) -> handoff_dataplane::agent::Config {
        handoff_dataplane::agent::Config {
            source: handoff_dataplane::agent::SourceConfig::Sim(self.sim.config()),
            ..Default::default()
        }
    }
}

/// A running stack.
pub struct Stack {
    pub url: String,
    /// The sample daemons' processes, by daemon.
    pub daemons: Vec<(DaemonId, std::process::Child)>,
    /// The first owner, who seeds the fleet.
    pub owner: Credentials,
    /// Where the owner's credentials are.
    pub owner_path: PathBuf,
    /// The processes' NATS keys, when the stack started a server of its own.
    pub keys: Option<NatsKeys>,
    /// Where this process serves its metrics: daemon `n` serves its own on the port `n`
    /// after it (or any free port when it is 0).
    pub metrics: Option<std::net::SocketAddr>,
    secrets: PathBuf,
    nats: Vec<NatsProcess>,
    stops: Vec<oneshot::Sender<()>>,
    tasks: Vec<tokio::task::JoinHandle<Result<(), String>>>,
}

impl Stack {
    /// Starts the stack with its data under `data`; on `url` when given, else on a
    /// nats-server of its own on `port` (0: any).
    pub async fn start(data: &Path, url: Option<&str>, port: u16) -> Result<Stack, Failure> {
        Self::start_with(data, url, port, None, None).await
    }

    /// Like [`Stack::start`], with a cluster of `cluster` nodes instead of one server, and
    /// `owner` (credentials and their file) as the first owner instead of a new `admin`.
    pub async fn start_with(
        data: &Path,
        url: Option<&str>,
        port: u16,
        cluster: Option<u8>,
        owner: Option<(Credentials, PathBuf)>,
    ) -> Result<Stack, Failure> {
        std::fs::create_dir_all(data)
            .map_err(|e| Failure::Usage(format!("cannot create {}: {e}", data.display())))?;
        let secrets_dir = data.join("secrets");
        secrets::private_dir(&secrets_dir)?;
        let keys = match url {
            Some(_) => None,
            None => Some(NatsKeys::load_or_create(
                &secrets_dir,
                &(1..=3).map(sample_daemon).collect::<Vec<_>>(),
            )?),
        };
        let security = keys.as_ref().map(NatsKeys::security);
        let (nats, url) = match url {
            Some(u) => (Vec::new(), u.to_owned()),
            None => {
                let roots = [
                    std::env::current_dir().unwrap_or_default(),
                    std::env::current_exe().unwrap_or_default(),
                ];
                let bin = handoff_natsd::find_binary(&roots)
                    .map_err(|e| Failure::Usage(format!("{e}; or give --nats-url")))?;
                let nodes = match cluster {
                    Some(n) => {
                        let first = (port != 0).then_some(port);
                        handoff_natsd::start_cluster(
                            bin,
                            &data.join("nats-cluster"),
                            n.into(),
                            first,
                            security.as_ref(),
                        )
                        .await?
                    }
                    None => {
                        let dir = data.join("nats");
                        std::fs::create_dir_all(&dir).map_err(|e| {
                            Failure::Usage(format!("cannot create {}: {e}", dir.display()))
                        })?;
                        vec![
                            NatsProcess::start_secured(
                                bin,
                                &dir,
                                (port != 0).then_some(port),
                                security.as_ref(),
                            )
                            .await?,
                        ]
                    }
                };
                let url = nodes[0].url();
                (nodes, url)
            }
        };
        let (owner, owner_path) = match owner {
            Some(o) => o,
            None => {
                let path = data.join("owner.creds");
                let admin = Actor::new("admin").expect("a valid actor");
                let operator = keys.as_ref().map(|k| k.operator.clone());
                (secrets::creds_file(&path, &admin, operator)?, path)
            }
        };
        let seed_of = |pick: fn(&NatsKeys) -> &String| keys.as_ref().map(|k| pick(k).clone());
        let (command_seed, projector_seed) =
            (seed_of(|k| &k.command_service), seed_of(|k| &k.projector));
        let mut stack = Stack {
            url: url.clone(),
            daemons: Vec::new(),
            owner,
            owner_path,
            keys,
            metrics: None,
            secrets: secrets_dir,
            nats,
            stops: Vec::new(),
            tasks: Vec::new(),
        };
        let mut config = handoff_command::Config::default();
        config.event_log.replicas = cluster.map_or(1, usize::from);
        config.bootstrap_owner = Some((stack.owner.user.clone(), stack.owner.public_key()));
        let commands = handoff_command::start(connect(&url, command_seed).await?, config)
            .await
            .map_err(|e| Failure::Usage(format!("starting the command service: {e}")))?;
        stack.spawn(|stop| commands.run(stop));
        let projector = handoff_projector::start(
            connect(&url, projector_seed).await?,
            handoff_projector::Config::new(data.join("views")),
        )
        .await
        .map_err(|e| Failure::Usage(format!("starting the projector: {e}")))?;
        stack.spawn(|stop| projector.run(stop));
        Ok(stack)
    }

    /// The owner's client of the stack.
    pub async fn api(&self) -> Result<crate::client::Api, Failure> {
        let seed = self
            .owner
            .nats_seed()
            .map(str::to_owned)
            .or_else(|| self.keys.as_ref().map(|k| k.operator.clone()));
        crate::client::Api::connect(&self.url, Some(self.owner.clone()), seed).await
    }

    /// The console's connection (`--web`): a user of its own, `console`, a
    /// GLOBAL_BACKUP_ADMIN (it moves jobs and never manages users), on the operator's
    /// NATS identity.
    pub async fn console_api(&self) -> Result<crate::client::Api, Failure> {
        let seed = self.keys.as_ref().map(|k| k.operator.clone());
        let (creds, _) = self
            .process_user("console", vec![Role::GlobalBackupAdmin], None, seed.clone())
            .await?;
        crate::client::Api::connect(&self.url, Some(creds), seed).await
    }

    /// The credentials of a process's user (made and added as `roles` on first use),
    /// and their file.
    async fn process_user(
        &self,
        name: &str,
        roles: Vec<Role>,
        daemon: Option<DaemonId>,
        nats_seed: Option<String>,
    ) -> Result<(Credentials, PathBuf), Failure> {
        let path = self.secrets.join(format!("{name}.creds"));
        let user = Actor::new(name).expect("a valid actor");
        let creds = secrets::creds_file(&path, &user, nats_seed)?;
        let add = Command::AddUser(AddUser {
            user,
            roles,
            key: creds.public_key(),
            daemon,
        });
        match self
            .api()
            .await?
            .command(&crate::cmd::command_id(None)?, &add)
            .await
        {
            Ok(_) => {}
            Err(Failure::Refused(e))
                if matches!(
                    e.rejection.as_deref(),
                    Some(handoff_domain::Rejection::AlreadyExists { .. })
                ) => {}
            Err(e) => return Err(e),
        }
        Ok((creds, path))
    }

    /// Runs a service until [`Stack::stop`]: `run` gets the future that completes then.
    fn spawn<F, Fut, E>(&mut self, run: F)
    where
        F: FnOnce(std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>) -> Fut,
        Fut: std::future::Future<Output = Result<(), E>> + Send + 'static,
        E: std::fmt::Display,
    {
        let (stop, stopped) = oneshot::channel::<()>();
        self.stops.push(stop);
        let service = run(Box::pin(async {
            // Ignored: a dropped sender stops the service too.
            let _ = stopped.await;
        }));
        self.tasks.push(tokio::spawn(async move {
            service.await.map_err(|e| e.to_string())
        }));
    }

    /// Starts the data plane of the sample fleet: the agent (in this process) and one
    /// `handoff daemon` process per sample daemon, heads under `data/heads/`. The schedule
    /// is set with hours of `hour_ms` milliseconds.
    pub async fn start_data_plane(
        &mut self,
        data: &Path,
        hour_ms: u64,
        agent: handoff_dataplane::agent::Config,
        replicas: usize,
    ) -> Result<(), Failure> {
        let agent_seed = self.keys.as_ref().map(|k| k.agent.clone());
        let (agent_creds, _) = self
            .process_user("agent", vec![Role::BackupAgent], None, agent_seed.clone())
            .await?;
        let client = connect(&self.url, agent_seed).await?;
        let stores = handoff_dataplane::store::Stores::open(client, replicas)
            .await
            .map_err(|e| Failure::Usage(e.to_string()))?;
        let mut settings = stores
            .settings()
            .await
            .map_err(|e| Failure::Usage(e.to_string()))?;
        settings.schedule.hour_ms = hour_ms;
        stores
            .set_settings(&settings)
            .await
            .map_err(|e| Failure::Usage(format!("--hour-ms: {e}")))?;
        self.spawn(move |stop| handoff_dataplane::agent::run(stores, agent, agent_creds, stop));
        for n in 1..=3 {
            self.spawn_daemon(data, n).await?;
        }
        Ok(())
    }

    /// Starts the monitor in this process, as user `monitor`; the failover policy signs
    /// its moves as user `failover-policy`.
    pub async fn start_monitor(
        &mut self,
        settings: handoff_monitor::Settings,
        replicas: usize,
    ) -> Result<(), Failure> {
        let seed = self.keys.as_ref().map(|k| k.monitor.clone());
        let (creds, _) = self
            .process_user("monitor", vec![Role::BackupMonitor], None, seed.clone())
            .await?;
        let (policy, _) = self
            .process_user(
                "failover-policy",
                vec![Role::BackupMonitor],
                None,
                seed.clone(),
            )
            .await?;
        let client = connect(&self.url, seed).await?;
        let config = handoff_monitor::Config {
            settings,
            creds,
            policy_creds: Some(policy),
            replicas,
        };
        self.spawn(move |stop| handoff_monitor::run(client, config, stop));
        Ok(())
    }

    /// Starts sample daemon `n` as a process of its own (so it can die like a real one),
    /// as user `backup<n>`.
    pub async fn spawn_daemon(&mut self, data: &Path, n: usize) -> Result<(), Failure> {
        let id = sample_daemon(n);
        let seed = self
            .keys
            .as_ref()
            .and_then(|k| k.daemon(&id))
            .map(str::to_owned);
        let (_, creds) = self
            .process_user(
                &format!("backup{n}"),
                vec![Role::BackupDaemon],
                Some(id.clone()),
                seed,
            )
            .await?;
        let heads = data.join("heads").join(n.to_string());
        let log = std::fs::File::create(data.join(format!("daemon{n}.log")))?;
        let exe = std::env::current_exe()?;
        let mut command = std::process::Command::new(exe);
        handoff_natsd::die_with_parent(&mut command);
        if let Some(addr) = self.metrics {
            let port = match addr.port() {
                0 => 0,
                p => p + n as u16,
            };
            command
                .arg("--metrics")
                .arg(std::net::SocketAddr::new(addr.ip(), port).to_string());
        }
        let child = command
            .args([
                "--nats-url",
                &self.url,
                "daemon",
                "--id",
                id.as_str(),
                "--heartbeat-ms",
                "1000",
            ])
            .arg("--creds")
            .arg(&creds)
            .env_remove("HANDOFF_NATS_KEY")
            .arg("--head-dir")
            .arg(&heads)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()?;
        self.daemons.push((id, child));
        Ok(())
    }

    /// Sends a signal to a sample daemon's process (`SIGSTOP` freezes it, `SIGCONT` thaws
    /// it).
    pub fn signal_daemon(&self, id: &DaemonId, signal: libc::c_int) -> Result<(), Failure> {
        let (_, child) = self
            .daemons
            .iter()
            .find(|(d, _)| d == id)
            .ok_or_else(|| Failure::Usage(format!("no process runs {id}")))?;
        signal_process(child, signal)
            .map_err(|e| Failure::Usage(format!("signal {signal} to {id} failed: {e}")))
    }

    /// Kills a sample daemon's process outright (SIGKILL), as a lost server would.
    pub fn kill_daemon(&mut self, id: &DaemonId) {
        if let Some(k) = self.daemons.iter().position(|(d, _)| d == id) {
            let (_, mut child) = self.daemons.remove(k);
            // Ignored: it may be gone already.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the services, then the nats-server it started.
    pub async fn stop(mut self) {
        for (_, child) in &self.daemons {
            // SIGTERM: the daemons flush their heads and stop. Ignored: one that is gone
            // already has nothing to flush.
            let _ = signal_process(child, libc::SIGTERM);
        }
        for (_, mut child) in self.daemons.drain(..) {
            let _ = child.wait();
        }
        for s in self.stops.drain(..) {
            // Ignored: the service may have stopped already.
            let _ = s.send(());
        }
        for t in self.tasks.drain(..) {
            match t.await {
                Ok(Err(e)) => tracing::warn!(error = %e, "a service stopped with an error"),
                Err(e) => tracing::warn!(error = %e, "a service task failed"),
                Ok(Ok(())) => {}
            }
        }
        for mut n in self.nats.drain(..) {
            n.stop();
        }
    }
}

/// Sends `signal` to a child process that has not been waited for (so its pid is still
/// its own).
fn signal_process(child: &std::process::Child, signal: libc::c_int) -> std::io::Result<()> {
    let pid = libc::pid_t::try_from(child.id()).map_err(std::io::Error::other)?;
    // SAFETY: kill(2) only reads its two integer arguments.
    match unsafe { libc::kill(pid, signal) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

/// A client of `url`, as the NATS identity of `seed` when given.
async fn connect(url: &str, seed: Option<String>) -> Result<async_nats::Client, Failure> {
    let options = match seed {
        Some(s) => async_nats::ConnectOptions::with_nkey(s),
        None => async_nats::ConnectOptions::new(),
    };
    options
        .connect(crate::client::server_addrs(url)?)
        .await
        .map_err(|e| Failure::Usage(format!("cannot connect to NATS at {url}: {e}")))
}

pub async fn up(ctx: &Context, a: UpArgs) -> Result<(), Failure> {
    let url = ctx.url_given.then_some(ctx.url.as_str());
    if url.is_some() && a.cluster.is_some() {
        return Err(Failure::Usage(
            "--cluster starts its own servers; leave out --nats-url (and HANDOFF_NATS_URL)".into(),
        ));
    }
    let owner = match (&ctx.creds, &ctx.creds_path) {
        (Some(c), Some(p)) => Some((c.clone(), p.clone())),
        _ => None,
    };
    if let Some(addr) = ctx.metrics {
        if addr.port() > u16::MAX - 3 {
            return Err(Failure::Usage(format!(
                "--metrics {addr}: the three daemons serve theirs on the ports after it; choose a port up to {}",
                u16::MAX - 3
            )));
        }
    }
    let mut stack = Stack::start_with(&a.data, url, a.port, a.cluster, owner).await?;
    stack.metrics = ctx.metrics;
    let api = stack.api().await?;
    if !a.no_sample {
        seed(&api).await?;
    }
    if !a.no_data_plane {
        let replicas = a.cluster.map_or(1, usize::from);
        stack
            .start_data_plane(&a.data, a.hour_ms, a.agent_config(), replicas)
            .await?;
        stack.start_monitor(a.monitor.settings()?, replicas).await?;
    }
    settle(&api).await?;
    let console = match a.web {
        Some(addr) => Some(crate::web::serve(stack.console_api().await?, addr, &[]).await?),
        None => None,
    };
    println!("handoff is up");
    let started = match a.cluster {
        _ if url.is_some() => String::new(),
        Some(n) => format!(" (a {n}-node cluster started here, the stream on {n} replicas)"),
        None => " (started here)".to_owned(),
    };
    println!("  NATS          {}{started}", stack.url);
    println!("  data          {}", a.data.display());
    if let Some(addr) = ctx.metrics_bound {
        println!(
            "  metrics       http://{addr}/metrics (the services here){}",
            if a.no_data_plane {
                String::new()
            } else {
                "; each daemon on the next port after it".to_owned()
            }
        );
    }
    if let Some(console) = &console {
        println!(
            "  console       http://{}/ (acting as console, GLOBAL_BACKUP_ADMIN)",
            console.addr
        );
    }
    println!("  services      handoff-command (handoff.cmd.*), handoff-query (handoff.query.*)");
    println!(
        "  owner         {} (GLOBAL_OWNER), credentials in {}",
        stack.owner.user,
        stack.owner_path.display()
    );
    if stack.keys.is_some() {
        println!(
            "  security      the server admits only the stack's NATS keys (in {}), each with its role's permissions",
            a.data.join("secrets").display()
        );
    }
    if !a.no_data_plane {
        println!(
            "  data plane    agent (oplog store HANDOFF_OPLOG, snapshot store handoff_snapshots), {} daemon processes (logs in {}); an hour of schedule lasts {} ms",
            stack.daemons.len(),
            a.data.display(),
            a.hour_ms
        );
        println!(
            "  monitor       DAEMON_DOWN after {} s without a heartbeat; automatic failover {}",
            a.monitor.down_after.as_secs(),
            if a.monitor.failover {
                format!(
                    "on (after {} s down, at most {} rebuilds at once, paused over {}% down)",
                    a.monitor.failover_delay.as_secs(),
                    a.monitor.max_concurrent_rebuilds,
                    a.monitor.max_down
                )
            } else {
                "off (--failover turns it on)".to_owned()
            }
        );
    }
    if !a.no_sample {
        println!(
            "  sample fleet  3 daemons, 2 projects, 2 replica sets, 1 sharded cluster (5 jobs)"
        );
    }
    println!("try, in another terminal:");
    println!("  export HANDOFF_NATS_URL={}", stack.url);
    println!("  export HANDOFF_CREDS={}", stack.owner_path.display());
    println!("  handoff daemons");
    println!("  handoff alerts");
    println!("  handoff jobs");
    println!(
        "  handoff move-jobs --from {} --to {} --dry-run",
        sample_daemon(1),
        sample_daemon(3)
    );
    if !a.no_data_plane {
        println!("  handoff snapshots");
        println!("  handoff restore --job sales/catalog --at $(date +%s) --out /tmp/restore");
    }
    println!("Ctrl-C stops everything.");
    crate::shutdown_signal().await;
    println!("stopping...");
    if let Some(console) = console {
        console.stop().await;
    }
    stack.stop().await;
    Ok(())
}

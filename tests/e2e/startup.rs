//! Services started before what they need: each `handoff` service tries again while the
//! failure passes (JetStream without a leader, a store its owner has not created yet),
//! stops cleanly when told to meanwhile, and gives up at once on what does not pass (a
//! key the server does not know, a key with another role's permissions). A process that
//! only binds to a store never tries to create it: the server running the generated
//! permissions refuses nobody anything.

use std::path::{Path, PathBuf};
use std::process::{Command as Process, Stdio};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use handoff_domain::command::AddUser;
use handoff_domain::model::Role;
use handoff_domain::{Actor, Command, DaemonId};
use handoff_natsd::{NatsProcess, Security};
use handoff_protocol::auth::{self, Credentials};
use handoff_protocol::permissions::{authorization, NatsUser, ProcessRole};
use handoff_testkit::Child;
use handoff_tests::*;

/// Runs `handoff --nats-url URL ARGS`, its log in `<dir>/<name>.log`.
fn spawn(dir: &Path, name: &str, url: &str, args: &[&str]) -> Result<Child> {
    let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
    let mut command = Process::new(handoff_bin()?);
    command
        .args(["--nats-url", url])
        .args(args)
        .env("RUST_LOG", "info")
        .env_remove("HANDOFF_CREDS")
        .env_remove("HANDOFF_NATS_KEY")
        .env_remove("HANDOFF_NATS_URL")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    Child::spawn(name, &mut command)
}

fn log_of(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default()
}

/// How long a service may take to start once JetStream is back: a leader elected, then
/// the service's next attempt after its pause (at most 5 s), which may time out once more.
const LIMIT: Duration = Duration::from_secs(60);

/// Waits until `name`'s log holds `text`; fails at once if the process gave up (`handoff`
/// prints `error: ...` as it exits).
async fn said(dir: &Path, name: &str, text: &str) -> Result<()> {
    until(&format!("{name} to log {text:?}"), LIMIT, || {
        let log = log_of(dir, name);
        std::future::ready(if log.contains(text) {
            Ok(Some(()))
        } else if log.lines().any(|l| l.starts_with("error:")) {
            Err(anyhow::anyhow!("{name} gave up:\n{log}"))
        } else {
            Ok(None)
        })
    })
    .await
    .with_context(|| format!("{name}'s log:\n{}", log_of(dir, name)))
}

/// Waits until `name` has failed a start-up attempt with `why` and is trying again.
async fn retrying(dir: &Path, name: &str, why: &str) -> Result<()> {
    until(&format!("{name} to try again after {why:?}"), LIMIT, || {
        let log = log_of(dir, name);
        std::future::ready(
            if log
                .lines()
                .any(|l| l.contains("trying again") && l.contains(why))
            {
                Ok(Some(()))
            } else if log.lines().any(|l| l.starts_with("error:")) {
                Err(anyhow::anyhow!("{name} gave up:\n{log}"))
            } else {
                Ok(None)
            },
        )
    })
    .await
    .with_context(|| format!("{name}'s log:\n{}", log_of(dir, name)))
}

fn nats_server() -> Result<PathBuf> {
    Ok(handoff_natsd::find_binary(&[PathBuf::from(env!(
        "CARGO_MANIFEST_DIR"
    ))])?)
}

/// A three-node cluster with two nodes down has no JetStream leader: every JetStream
/// request times out. The command service and a projector started on the remaining node
/// try again instead of exiting (they exited with "jetstream request timed out"); one
/// told to stop meanwhile exits cleanly at once; when the nodes are back, both start.
#[tokio::test]
async fn services_started_while_jetstream_has_no_leader_start_once_it_has() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let logs = dir.path();
    let mut nodes =
        handoff_natsd::start_cluster(nats_server()?, &logs.join("nats"), 3, None, None).await?;
    nodes[1].kill();
    nodes[2].kill();
    let url = nodes[0].url();
    let views = |n: &str| logs.join(n).to_string_lossy().into_owned();
    let _commands = spawn(
        logs,
        "command-service",
        &url,
        &["command-service", "--replicas", "3"],
    )?;
    let _projector = spawn(
        logs,
        "projector",
        &url,
        &["projector", "--data", &views("v1")],
    )?;
    let mut stopped = spawn(
        logs,
        "stopped",
        &url,
        &["projector", "--data", &views("v2"), "--name", "second"],
    )?;
    retrying(logs, "command-service", "starting the command service").await?;
    retrying(logs, "projector", "starting the projector").await?;
    retrying(logs, "stopped", "starting the projector").await?;
    assert!(
        stopped.terminate(TIMEOUT)?.success(),
        "a service told to stop while it waits exits 0:\n{}",
        log_of(logs, "stopped")
    );

    // Both nodes at once: one back alone leaves a cluster that elects its leader only
    // slowly, with its third node still missing.
    nodes[1].respawn()?;
    nodes[2].respawn()?;
    nodes[1].wait_ready().await?;
    nodes[2].wait_ready().await?;
    said(logs, "command-service", "command service ready").await?;
    said(logs, "projector", "projector ready").await?;
    Ok(())
}

/// A server running the generated permissions, and a credentials file holding the NATS
/// key of each role (the user in it signs nothing unless it is added).
struct Secured {
    server: NatsProcess,
    dir: tempfile::TempDir,
    seeds: Vec<(ProcessRole, String)>,
}

impl Secured {
    async fn start(roles: &[ProcessRole]) -> Result<Secured> {
        let dir = tempfile::tempdir()?;
        let seeds: Vec<(ProcessRole, String)> = roles
            .iter()
            .map(|r| (r.clone(), auth::new_seed()))
            .collect();
        let users = seeds
            .iter()
            .map(|(role, seed)| {
                Ok(NatsUser {
                    nkey: auth::public_key_of(seed).map_err(anyhow::Error::msg)?,
                    role: role.clone(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let ready = seeds
            .iter()
            .find(|(r, _)| *r == ProcessRole::CommandService)
            .context("a command service")?
            .1
            .clone();
        let security = Security {
            authorization: authorization(&users),
            seed: ready,
        };
        let server = NatsProcess::start_secured(
            nats_server()?,
            &dir.path().join("nats"),
            None,
            Some(&security),
        )
        .await?;
        Ok(Secured { server, dir, seeds })
    }

    fn url(&self) -> String {
        self.server.url()
    }

    fn logs(&self) -> &Path {
        self.dir.path()
    }

    fn seed(&self, role: &ProcessRole) -> Result<String> {
        Ok(self
            .seeds
            .iter()
            .find(|(r, _)| r == role)
            .with_context(|| format!("no key for {role:?}"))?
            .1
            .clone())
    }

    /// A credentials file for `user`, connecting as `role`'s NATS key.
    fn creds(&self, user: &str, role: &ProcessRole) -> Result<(Credentials, String)> {
        let creds = Credentials::generate(Actor::new(user)?, Some(self.seed(role)?));
        let path = self.dir.path().join(format!("{user}.creds"));
        creds.write_new(&path)?;
        Ok((creds, path.to_string_lossy().into_owned()))
    }

    /// Runs `handoff --creds CREDS ARGS` as `name`.
    fn spawn(&self, name: &str, creds: &str, args: &[&str]) -> Result<Child> {
        let mut full = vec!["--creds", creds];
        full.extend_from_slice(args);
        spawn(self.logs(), name, &self.url(), &full)
    }

    /// Starts the command service with the test's owner as the first owner.
    async fn start_command_service(&self) -> Result<Child> {
        let (_, creds) = self.creds("command-service", &ProcessRole::CommandService)?;
        let first = format!("{}={}", owner().0.user, owner().0.public_key());
        let child = self.spawn(
            "command-service",
            &creds,
            &["command-service", "--first-owner", &first],
        )?;
        said(self.logs(), "command-service", "command service ready").await?;
        Ok(child)
    }

    /// Adds `creds`' user with `roles`, as the owner, over the operator's key.
    async fn add_user(
        &self,
        creds: &Credentials,
        roles: &[Role],
        daemon: Option<DaemonId>,
    ) -> Result<()> {
        let operator = async_nats::ConnectOptions::with_nkey(self.seed(&ProcessRole::Operator)?)
            .connect(self.url())
            .await?;
        let add = Command::AddUser(AddUser {
            user: creds.user.clone(),
            roles: roles.to_vec(),
            key: creds.public_key(),
            daemon,
        });
        send_command(&operator, &owner().0, &new_id(), &add)
            .await?
            .map_err(|e| anyhow::anyhow!("adding {}: {}", creds.user, e.message))?;
        Ok(())
    }

    /// The server's permissions violations so far.
    fn violations(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.path().join("nats").join("server.log"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("Permissions Violation"))
            .map(str::to_owned)
            .collect()
    }
}

/// Under the generated permissions, started before the stores exist: a daemon, the
/// projector and the monitor wait for them (a daemon used to try to create the oplog
/// store, which its permissions deny, and exit). The command service creates the event
/// stream and the fences, and the projector starts; the daemon and the monitor wait on
/// for the agent's stores, and start once the agent has made them. Nobody was refused
/// anything.
#[tokio::test]
async fn processes_that_bind_wait_for_the_stores_their_owners_create() -> Result<()> {
    let d1 = daemon(1);
    let daemon_role = ProcessRole::Daemon(d1.clone());
    let s = Secured::start(&[
        ProcessRole::CommandService,
        ProcessRole::Projector,
        ProcessRole::Operator,
        ProcessRole::Agent,
        ProcessRole::Monitor,
        daemon_role.clone(),
    ])
    .await?;
    let logs = s.logs();
    let (daemon_user, daemon_creds) = s.creds("backup1", &daemon_role)?;
    let heads = logs.join("heads").to_string_lossy().into_owned();
    let _daemon = s.spawn(
        "daemon",
        &daemon_creds,
        &[
            "daemon",
            "--id",
            d1.as_str(),
            "--head-dir",
            &heads,
            "--heartbeat-ms",
            "200",
        ],
    )?;
    let (_, projector_creds) = s.creds("projector", &ProcessRole::Projector)?;
    let views = logs.join("views").to_string_lossy().into_owned();
    let _projector = s.spawn(
        "projector",
        &projector_creds,
        &["projector", "--data", &views],
    )?;
    let (monitor_user, monitor_creds) = s.creds("monitor", &ProcessRole::Monitor)?;
    let _monitor = s.spawn(
        "monitor",
        &monitor_creds,
        &["monitor", "--down-after", "60s"],
    )?;
    retrying(logs, "daemon", "does not exist yet").await?;
    retrying(logs, "projector", "the event stream does not exist yet").await?;
    retrying(logs, "monitor", "the event stream does not exist yet").await?;

    let _commands = s.start_command_service().await?;
    said(logs, "projector", "projector ready").await?;
    retrying(logs, "monitor", "the heartbeat bucket does not exist yet").await?;
    retrying(logs, "daemon", "(the agent creates it)").await?;
    s.add_user(&daemon_user, &[Role::BackupDaemon], Some(d1.clone()))
        .await?;
    s.add_user(&monitor_user, &[Role::BackupMonitor], None)
        .await?;
    let (agent_user, agent_creds) = s.creds("agent", &ProcessRole::Agent)?;
    s.add_user(&agent_user, &[Role::BackupAgent], None).await?;
    assert!(
        !log_of(logs, "daemon").contains("daemon running"),
        "the daemon ran before the agent made the stores"
    );

    let _agent = s.spawn("agent", &agent_creds, &["agent"])?;
    said(logs, "agent", "agent running").await?;
    said(logs, "daemon", "daemon running").await?;
    said(logs, "monitor", "monitor running").await?;
    let violations = s.violations();
    assert!(violations.is_empty(), "refused: {violations:#?}");
    Ok(())
}

/// The agent started before the command service waits for the fences, which are the
/// command service's (it used to try to create them, which its permissions deny, and
/// exit). What does not pass ends a service at once: a key the server does not know,
/// and a key of another role (the monitor run with the agent's key is refused its read
/// of the whole event stream).
#[tokio::test]
async fn the_agent_waits_for_the_fences_and_what_does_not_pass_ends_a_service() -> Result<()> {
    let s = Secured::start(&[
        ProcessRole::CommandService,
        ProcessRole::Agent,
        ProcessRole::Monitor,
    ])
    .await?;
    let logs = s.logs();
    let (_, agent_creds) = s.creds("agent", &ProcessRole::Agent)?;
    let _agent = s.spawn("agent", &agent_creds, &["agent"])?;
    retrying(logs, "agent", "handoff_fences does not exist yet").await?;
    let _commands = s.start_command_service().await?;
    said(logs, "agent", "agent running").await?;
    let violations = s.violations();
    assert!(violations.is_empty(), "refused: {violations:#?}");

    let stranger = Credentials::generate(Actor::new("stranger")?, Some(auth::new_seed()));
    let stranger_path = logs.join("stranger.creds");
    stranger.write_new(&stranger_path)?;
    let mut unknown = s.spawn(
        "unknown",
        &stranger_path.to_string_lossy(),
        &["projector", "--data", &logs.join("v").to_string_lossy()],
    )?;
    let status = unknown.wait_within(TIMEOUT)?;
    let log = log_of(logs, "unknown");
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(log.contains("authorization violation"), "{log}");

    // The monitor's own credentials, connecting with the agent's key.
    let (_, monitor_creds) = s.creds("monitor", &ProcessRole::Agent)?;
    let mut wrong = s.spawn("wrong-key", &monitor_creds, &["monitor"])?;
    let status = wrong.wait_within(TIMEOUT)?;
    let log = log_of(logs, "wrong-key");
    assert_eq!(status.code(), Some(2), "{log}");
    let error = log
        .lines()
        .find(|l| l.starts_with("error:"))
        .with_context(|| format!("no error in:\n{log}"))?;
    if !error.contains("Permissions Violation") {
        bail!("the error does not name the violation: {error}");
    }
    Ok(())
}

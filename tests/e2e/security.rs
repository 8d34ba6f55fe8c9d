//! Who may do what, end to end: signed commands checked by the command service (each
//! refusal an audit event, nothing else appended), and a nats-server running the generated
//! configuration that walls each process off.

use std::time::Duration;

use anyhow::{anyhow, Context as _, Result};
use handoff_domain::auth::Role;
use handoff_domain::command::{AddUser, CompleteJobMove, RemoveUser};
use handoff_domain::{Actor, Command, Event};
use handoff_protocol::auth::Credentials;
use handoff_tests::*;
use tokio::sync::mpsc;

use crate::moves::fleet;

/// The events appended since `before`.
async fn since(stack: &Stack, before: u64) -> Result<Vec<Event>> {
    Ok(stack
        .events()
        .await?
        .into_iter()
        .filter(|r| r.seq > before)
        .map(|r| r.envelope.event)
        .collect())
}

/// Sends `body` on the endpoint with `signature`; expects a `forbidden` refusal with
/// `reason`, and that the only thing appended is one CommandRefused saying so.
async fn refused(
    stack: &Stack,
    subject: &str,
    body: Vec<u8>,
    signature: Option<&str>,
    reason: &str,
) -> Result<()> {
    let before = stack.last_seq().await?;
    let e = request_signed(&stack.client, subject, body, signature)
        .await?
        .expect_err("refused");
    assert_eq!(
        (e.code, e.reason.as_str()),
        (handoff_protocol::ErrorCode::Forbidden, reason),
        "{}",
        e.message
    );
    let appended = since(stack, before).await?;
    assert_eq!(appended.len(), 1, "{appended:?}");
    match &appended[0] {
        Event::CommandRefused {
            reason: r, client, ..
        } => {
            assert_eq!(r, reason);
            assert_eq!(client.as_deref(), Some("handoff-tests"));
        }
        other => panic!("expected CommandRefused, got {other:?}"),
    }
    Ok(())
}

/// [`refused`] for a request as it was signed.
async fn refused_as(
    stack: &Stack,
    s: handoff_protocol::auth::SignedRequest,
    reason: &str,
) -> Result<()> {
    refused(stack, &s.subject, s.payload, Some(&s.signature), reason).await
}

/// Unsigned, forged, expired, replayed, unknown-user and wrong-role commands are each
/// refused with their reason and recorded; a retry signed again is answered as the
/// duplicate it is; events carry the verified signer.
#[tokio::test]
async fn every_command_is_signed_by_a_user_allowed_to_send_it() -> Result<()> {
    let stack = Stack::start().await?;
    fleet(&stack).await?;
    let owner = &stack.creds;
    let move_it = move_jobs(1, 2);
    let id = new_id();
    let signed = owner.sign_command(&id, &move_it, Some("handoff-tests"));

    refused(
        &stack,
        &signed.subject,
        signed.payload.clone(),
        None,
        "unsigned",
    )
    .await?;
    // The body changed after signing: another destination.
    let forged =
        String::from_utf8(signed.payload.clone())?.replace(daemon(2).as_str(), daemon(3).as_str());
    refused(
        &stack,
        &signed.subject,
        forged.into_bytes(),
        Some(&signed.signature),
        "bad_signature",
    )
    .await?;
    // Signed by a key that is not the claimed user's.
    let impostor = Credentials::generate(Actor::new("admin")?, None);
    let s = impostor.sign_command(&new_id(), &move_it, Some("handoff-tests"));
    refused_as(&stack, s, "bad_signature").await?;
    let ghost = Credentials::generate(Actor::new("ghost")?, None);
    let s = ghost.sign_command(&new_id(), &move_it, Some("handoff-tests"));
    refused_as(&stack, s, "unknown_user").await?;
    let old = handoff_protocol::auth::now_ms() - 10 * 60 * 1000;
    let s = owner.sign_command_at(&new_id(), &move_it, old, Some("handoff-tests"));
    refused_as(&stack, s, "expired").await?;
    let future = handoff_protocol::auth::now_ms() + 10 * 60 * 1000;
    let s = owner.sign_command_at(&new_id(), &move_it, future, Some("handoff-tests"));
    refused_as(&stack, s, "expired").await?;

    // The genuine request is applied once; the same bytes again are a replay; the same id
    // signed again is a retry, answered as a duplicate.
    let applied = request_signed(
        &stack.client,
        &signed.subject,
        signed.payload.clone(),
        Some(&signed.signature),
    )
    .await?
    .map_err(|e| anyhow::anyhow!(e.message))?;
    refused(
        &stack,
        &signed.subject,
        signed.payload.clone(),
        Some(&signed.signature),
        "replayed",
    )
    .await?;
    let retry = send_command(&stack.client, owner, &id, &move_it)
        .await?
        .map_err(|e| anyhow::anyhow!(e.message))?;
    assert!(retry.duplicate);
    assert_eq!(retry.events, applied.events);

    // Roles: read-only sends nothing; a backup admin moves but manages no user; a daemon
    // reports only on moves to itself.
    let (reader, _) = stack.user("rita", &[Role::GlobalReadOnly], None).await?;
    let s = reader.sign_command(&new_id(), &move_job("p1/rs0", 3), Some("handoff-tests"));
    refused_as(&stack, s, "forbidden").await?;
    let (admin, _) = stack.user("bob", &[Role::GlobalBackupAdmin], None).await?;
    let add = Command::AddUser(AddUser {
        user: Actor::new("eve")?,
        roles: vec![Role::GlobalOwner],
        key: Credentials::generate(Actor::new("eve")?, None).public_key(),
        daemon: None,
    });
    let s = admin.sign_command(&new_id(), &add, Some("handoff-tests"));
    refused_as(&stack, s, "forbidden").await?;
    let plan = applied_plan(&applied)?;
    let wrong_daemon = stack.daemon_user(3).await?;
    let complete = Command::CompleteJobMove(CompleteJobMove {
        job: plan.0.clone(),
        move_id: id.clone(),
        epoch: plan.1,
        head: rebuilt_head(),
    });
    let s = wrong_daemon.sign_command(&new_id(), &complete, Some("handoff-tests"));
    refused_as(&stack, s, "forbidden").await?;
    stack.report(2, complete).await?;

    // A removed user signs nothing any more.
    stack
        .apply(Command::RemoveUser(RemoveUser {
            user: Actor::new("bob")?,
        }))
        .await?;
    let s = admin.sign_command(&new_id(), &move_job("p1/rs1", 3), Some("handoff-tests"));
    refused_as(&stack, s, "unknown_user").await?;

    // History names the verified signers; no seed is in any event.
    let events = stack.events().await?;
    let started: Vec<_> = events
        .iter()
        .filter(|r| r.envelope.command == id)
        .map(|r| r.envelope.actor.as_str().to_owned())
        .collect();
    assert!(
        !started.is_empty() && started.iter().all(|a| a == "admin"),
        "{started:?}"
    );
    let completed = events
        .iter()
        .find(|r| r.envelope.event.type_name() == "JobMoveCompleted")
        .context("a completion")?;
    assert_eq!(completed.envelope.actor.as_str(), "backup2");
    let all = serde_json::to_string(&events.iter().map(|r| &r.envelope).collect::<Vec<_>>())?;
    let seeds = serde_json::to_value(owner)?;
    assert!(!all.contains(seeds["seed"].as_str().expect("a seed")));
    Ok(())
}

/// The first job of a move's reply and its epoch.
fn applied_plan(applied: &handoff_protocol::Applied) -> Result<(handoff_domain::JobId, u64)> {
    let plan = applied.plan.as_ref().context("a plan")?;
    Ok((plan.jobs[0].job.clone(), plan.jobs[0].epoch))
}

/// Users through the CLI: the owner adds a user whose credentials file is private, the
/// new user acts within its role, `user list` shows it, and once removed it can do
/// nothing.
#[tokio::test]
async fn users_are_managed_with_the_cli() -> Result<()> {
    let up = Up::start().await?;
    let url = up.url();
    let dir = tempfile::tempdir()?;
    let creds = dir.path().join("rita.creds");
    let out = creds.to_string_lossy().into_owned();
    let add_rita = [
        "user",
        "add",
        "rita",
        "--role",
        "GLOBAL_READ_ONLY",
        "--out",
        &out,
    ];
    handoff_ok(&url, &add_rita)?;
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(&creds)?.permissions().mode() & 0o777,
        0o600
    );
    let exists = handoff(&url, &add_rita)?;
    assert_eq!(exists.code, 2, "an existing file is never overwritten");
    let list = handoff_ok(&url, &["user", "list", "--json"])?.json()?;
    let names: Vec<_> = list
        .as_array()
        .context("a list")?
        .iter()
        .map(|u| {
            (
                u["user"].as_str().unwrap_or("").to_owned(),
                u["roles"][0].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    assert!(
        names.contains(&("admin".into(), "GLOBAL_OWNER".into())),
        "{names:?}"
    );
    assert!(
        names.contains(&("rita".into(), "GLOBAL_READ_ONLY".into())),
        "{names:?}"
    );
    let as_rita = |args: &[&str]| -> Result<Run> {
        let out = std::process::Command::new(handoff_bin()?)
            .args(args)
            .env("HANDOFF_NATS_URL", &url)
            .env("HANDOFF_CREDS", &creds)
            .output()?;
        Ok(Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    };
    assert_eq!(as_rita(&["jobs"])?.code, 0, "read-only reads");
    let moved = as_rita(&[
        "move-job",
        "sales/orders",
        "--to",
        "backup2.example.net:/data/backup/",
    ])?;
    assert_eq!(moved.code, 1);
    assert!(
        moved
            .stderr
            .contains("needs GLOBAL_OWNER or GLOBAL_BACKUP_ADMIN"),
        "{}",
        moved.stderr
    );
    handoff_refused(&url, &["user", "remove", "admin"], "last GLOBAL_OWNER")?;
    handoff_ok(&url, &["user", "remove", "rita"])?;
    let gone = as_rita(&["daemon", "down", "backup1.example.net:/data/backup/"])?;
    assert!(gone.stderr.contains("unknown_user"), "{}", gone.stderr);
    let history = handoff_ok(
        &url,
        &["history", "--daemon", "backup1.example.net:/data/backup/"],
    )?;
    assert!(!history.stdout.contains("DaemonDown"), "{}", history.stdout);
    Ok(())
}

/// A client of the secured server as `seed`'s NATS identity, and the server errors it
/// is told about (permission violations).
async fn connect_as(
    url: &str,
    seed: &str,
) -> Result<(async_nats::Client, mpsc::UnboundedReceiver<String>)> {
    let (tx, rx) = mpsc::unbounded_channel();
    let client = async_nats::ConnectOptions::with_nkey(seed.to_owned())
        .event_callback(move |event| {
            let tx = tx.clone();
            async move {
                if let async_nats::Event::ServerError(e) = event {
                    let _ = tx.send(format!("{e:?}"));
                }
            }
        })
        .connect(url)
        .await?;
    Ok((client, rx))
}

/// Waits for a permissions violation about `subject` among the errors the server sends.
async fn violation(errors: &mut mpsc::UnboundedReceiver<String>, subject: &str) -> Result<()> {
    until(
        &format!("a permissions violation for {subject}"),
        TIMEOUT,
        || {
            // What the server has sent since the last poll.
            let seen = std::iter::from_fn(|| errors.try_recv().ok())
                .any(|e| e.contains("Permissions Violation") && e.contains(subject));
            std::future::ready(match seen {
                true => Ok(Some(())),
                false if errors.is_closed() => Err(anyhow!("the connection closed")),
                false => Ok(None),
            })
        },
    )
    .await
}

/// `handoff up` on a server of its own runs the generated configuration: nothing connects
/// without a key; a daemon's key can neither append an event nor move jobs nor read another
/// daemon's assignments; an operator's key calls the endpoints but cannot append to the
/// stream; the stack itself runs a real rebuild under these permissions, and the server
/// refuses none of its processes anything (its log shows only the test's own violations).
#[tokio::test]
async fn the_generated_nats_configuration_walls_off_each_process() -> Result<()> {
    let data = tempfile::tempdir()?;
    let dir = data.path().to_string_lossy().into_owned();
    let mut up = Background::spawn_as(
        None,
        None,
        &["up", "--port", "0", "--data", &dir, "--hour-ms", "600"],
    )?;
    up.wait_for_line("handoff is up")?;
    let line = up.wait_for_line("NATS ")?;
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("nats://"))
        .context("a URL")?
        .to_owned();
    let owner_line = up.wait_for_line("owner ")?;
    assert!(owner_line.contains("owner.creds"), "{owner_line}");
    assert!(
        async_nats::connect(&url).await.is_err(),
        "a connection without a key was admitted"
    );

    let owner = Credentials::load(&data.path().join("owner.creds"))?;
    let operator_seed = owner
        .nats_seed()
        .context("the owner's NATS key")?
        .to_owned();
    let d1 = handoff_domain::DaemonId::new("backup1.example.net:/data/backup/")?;
    let d2 = handoff_domain::DaemonId::new("backup2.example.net:/data/backup/")?;
    let daemon_seed = std::fs::read_to_string(data.path().join("secrets").join(format!(
        "daemon-{}.nk",
        handoff_protocol::subjects::daemon_token(&d1)
    )))?
    .trim()
    .to_owned();

    let (operator, mut operator_errors) = connect_as(&url, &operator_seed).await?;
    let js = async_nats::jetstream::new(operator.clone());
    // What the walled-off identities try to write to: daemon 1's subject. (The stack's
    // own services may append elsewhere meanwhile, e.g. a daemon's registration again.)
    let own_subject = handoff_protocol::subjects::daemon(&d1);
    let reader = handoff_eventlog::EventLog::attach(operator.clone(), Default::default()).await?;
    let before = reader.last_sequence_of(&own_subject).await?;
    // An operator's key: the endpoints answer, the stream cannot be written.
    let status = operator
        .request(handoff_protocol::subjects::query("status"), "{}".into())
        .await?;
    assert!(String::from_utf8_lossy(&status.payload).contains("checkpoint"));
    operator
        .publish(handoff_protocol::subjects::daemon(&d1), "{}".into())
        .await?;
    violation(
        &mut operator_errors,
        &format!("{}.daemon", handoff_protocol::subjects::EVENTS),
    )
    .await?;
    let purge = js
        .get_stream(handoff_protocol::subjects::STREAM)
        .await?
        .purge()
        .await;
    assert!(purge.is_err(), "an operator purged the event stream");

    // A daemon's key: no event, no move, no other daemon's assignments.
    let (daemon, mut daemon_errors) = connect_as(&url, &daemon_seed).await?;
    daemon
        .publish(handoff_protocol::subjects::daemon(&d1), "{}".into())
        .await?;
    violation(
        &mut daemon_errors,
        &format!("{}.daemon", handoff_protocol::subjects::EVENTS),
    )
    .await?;
    let moved = daemon
        .send_request(
            handoff_protocol::subjects::command("move-jobs"),
            async_nats::Request::new()
                .payload("{}".into())
                .timeout(Some(Duration::from_secs(2))),
        )
        .await;
    assert!(moved.is_err(), "a daemon's key reached move-jobs");
    violation(
        &mut daemon_errors,
        &handoff_protocol::subjects::command("move-jobs"),
    )
    .await?;
    let log = handoff_eventlog::EventLog::attach(daemon.clone(), Default::default()).await?;
    let own = log
        .read_filtered(1, &handoff_protocol::subjects::daemon(&d1))
        .await;
    assert!(own.is_ok(), "a daemon reads its own assignments");
    let other = log
        .read_filtered(1, &handoff_protocol::subjects::daemon(&d2))
        .await;
    assert!(other.is_err(), "a daemon read another daemon's assignments");

    assert_eq!(
        reader.last_sequence_of(&own_subject).await?,
        before,
        "nothing appended to what they tried to write"
    );

    // Under these permissions the data plane works: a move rebuilds for real.
    let out = std::process::Command::new(handoff_bin()?)
        .args(["move-job", "sales/orders", "--to", d2.as_str(), "--wait"])
        .env("HANDOFF_NATS_URL", &url)
        .env("HANDOFF_CREDS", data.path().join("owner.creds"))
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("completed"), "{text}");
    let logs: String = (1..=3)
        .map(|n| {
            std::fs::read_to_string(data.path().join(format!("daemon{n}.log"))).unwrap_or_default()
        })
        .collect();
    for seed in [&operator_seed, &daemon_seed] {
        assert!(!logs.contains(seed.as_str()), "a seed in the daemons' logs");
    }
    // The stack's own processes never touched a subject they may not: the only
    // violations the server logged are the ones this test provoked.
    let provoked = |subject: &str| {
        subject.starts_with(&format!("{}.", handoff_protocol::subjects::EVENTS))
            || subject == handoff_protocol::subjects::command("move-jobs")
            || subject
                == format!(
                    "$JS.API.STREAM.PURGE.{}",
                    handoff_protocol::subjects::STREAM
                )
            || subject.ends_with(&handoff_protocol::subjects::daemon(&d2))
    };
    let server_log = std::fs::read_to_string(data.path().join("nats").join("server.log"))?;
    let unexpected: Vec<&str> = server_log
        .lines()
        .filter(|l| l.contains("Violation"))
        .filter(|l| {
            l.split_once("Subject \"")
                .and_then(|(_, rest)| rest.split_once('"'))
                .is_none_or(|(subject, _)| !provoked(subject))
        })
        .collect();
    assert!(
        unexpected.is_empty(),
        "the stack was refused:\n{}",
        unexpected.join("\n")
    );
    up.terminate()?;
    Ok(())
}

//! How the client sorts answers and retries, against a real nats-server with a stand-in
//! for the command service that answers as told and records what it received.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use futures::StreamExt;
use handoff_client::{new_command_id, Client, Outage, Retry, SendError};
use handoff_domain::command::RemoveDaemon;
use handoff_domain::rejection::Kind;
use handoff_domain::{Actor, Command, DaemonId, Rejection};
use handoff_protocol::api::CommandRequest;
use handoff_protocol::auth::{verify, Credentials, SIGNATURE_HEADER};
use handoff_protocol::{subjects, Applied, ErrorBody, ErrorCode, Reply};
use handoff_testkit::NatsServer;
use serde_json::Value;

fn command() -> Command {
    Command::RemoveDaemon(RemoveDaemon {
        daemon: DaemonId::new("backup1.example.net:/data/backup/").unwrap(),
    })
}

/// What the stand-in received: each request's command id and whether its signature
/// verified over the exact bytes.
type Received = Arc<Mutex<Vec<(String, bool)>>>;

/// Answers requests on the command's endpoint with `answers` in turn (the last one
/// again when they run out).
async fn stand_in(
    nats: &async_nats::Client,
    creds: &Credentials,
    answers: Vec<Reply>,
) -> Result<Received> {
    let subject = subjects::command("remove-daemon");
    let mut requests = nats.subscribe(subject.clone()).await?;
    let received: Received = Arc::default();
    let (nats, key, seen) = (nats.clone(), creds.public_key(), received.clone());
    tokio::spawn(async move {
        let mut n = 0;
        while let Some(m) = requests.next().await {
            let request: CommandRequest<Value> = serde_json::from_slice(&m.payload).unwrap();
            let signature = m
                .headers
                .as_ref()
                .and_then(|h| h.get(SIGNATURE_HEADER))
                .map(|v| v.as_str().to_owned())
                .unwrap_or_default();
            let verified = verify(&key, &subject, &m.payload, &signature).is_ok();
            seen.lock()
                .unwrap()
                .push((request.id.to_string(), verified));
            let answer = &answers[n.min(answers.len() - 1)];
            n += 1;
            let body = serde_json::to_vec(answer).unwrap();
            nats.publish(m.reply.unwrap(), body.into()).await.unwrap();
        }
    });
    Ok(received)
}

fn unavailable() -> Reply {
    Reply::Error(ErrorBody::new(
        ErrorCode::Unavailable,
        "unavailable",
        "the event log did not answer",
    ))
}

fn applied(command: &str) -> Reply {
    Reply::Ok(Applied {
        command: handoff_domain::CommandId::new(command).unwrap(),
        events: vec![],
        duplicate: true,
        dry_run: false,
        plan: None,
    })
}

fn fast(deadline: Duration) -> Retry {
    Retry {
        attempt_timeout: Duration::from_secs(2),
        deadline,
        first_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(50),
        when_nothing_answers: true,
    }
}

async fn setup() -> Result<(NatsServer, async_nats::Client, Credentials)> {
    let server = NatsServer::start().await?;
    let nats = server.connect().await?;
    let creds = Credentials::generate(Actor::new("alice")?, None);
    Ok((server, nats, creds))
}

/// An answer of `unavailable` is retried with the same command id, each attempt signed
/// anew over the bytes it sends, until the command is applied.
#[tokio::test]
async fn an_outage_is_retried_with_the_same_id_until_applied() -> Result<()> {
    let (_server, nats, creds) = setup().await?;
    let id = new_command_id();
    let received = stand_in(
        &nats,
        &creds,
        vec![unavailable(), unavailable(), applied(id.as_str())],
    )
    .await?;
    let client = Client::new(nats, creds, "test").with_retry(fast(Duration::from_secs(10)));
    let applied = client.send(&id, &command()).await?;
    assert_eq!(applied.command, id);
    let received = received.lock().unwrap().clone();
    assert_eq!(received.len(), 3, "{received:?}");
    assert!(
        received.iter().all(|(i, ok)| i == id.as_str() && *ok),
        "{received:?}"
    );
    Ok(())
}

/// A domain rejection is final and typed: one attempt, matched by its variant.
#[tokio::test]
async fn a_rejection_is_final_and_typed() -> Result<()> {
    let (_server, nats, creds) = setup().await?;
    let rejection = Rejection::AlreadyExists {
        kind: Kind::Daemon,
        id: "backup1.example.net:/data/backup/".into(),
    };
    let received = stand_in(&nats, &creds, vec![Reply::Error(rejection.into())]).await?;
    let client = Client::new(nats, creds, "test").with_retry(fast(Duration::from_secs(10)));
    let e = client
        .send(&new_command_id(), &command())
        .await
        .expect_err("rejected");
    assert!(
        matches!(e, SendError::Rejected(Rejection::AlreadyExists { .. })),
        "{e:?}"
    );
    assert_eq!(received.lock().unwrap().len(), 1);
    Ok(())
}

/// The service's own refusal (here: forbidden) is final too, and keeps its body.
#[tokio::test]
async fn a_refusal_of_the_request_is_final() -> Result<()> {
    let (_server, nats, creds) = setup().await?;
    let forbidden = ErrorBody::new(ErrorCode::Forbidden, "unknown_user", "who is alice?");
    let received = stand_in(&nats, &creds, vec![Reply::Error(forbidden.clone())]).await?;
    let client = Client::new(nats, creds, "test").with_retry(fast(Duration::from_secs(10)));
    let e = client
        .send(&new_command_id(), &command())
        .await
        .expect_err("refused");
    assert!(
        matches!(&e, SendError::Refused(b) if *b == forbidden),
        "{e:?}"
    );
    assert_eq!(received.lock().unwrap().len(), 1);
    Ok(())
}

/// An outage that outlasts the deadline ends as `Unavailable`, after several attempts.
#[tokio::test]
async fn an_outage_past_the_deadline_is_unavailable() -> Result<()> {
    let (_server, nats, creds) = setup().await?;
    let received = stand_in(&nats, &creds, vec![unavailable()]).await?;
    let client = Client::new(nats, creds, "test").with_retry(fast(Duration::from_millis(300)));
    let e = client
        .send(&new_command_id(), &command())
        .await
        .expect_err("unavailable");
    let SendError::Unavailable { attempts, last } = e else {
        panic!("expected unavailable, got {e:?}");
    };
    assert!(attempts > 1, "{attempts} attempt(s)");
    assert!(matches!(last, Outage::Service(_)), "{last:?}");
    assert_eq!(received.lock().unwrap().len(), attempts as usize);
    Ok(())
}

/// With nothing subscribed, an interactive client says so at once; a service's client
/// waits for the command service until its deadline.
#[tokio::test]
async fn nothing_answering_is_told_at_once_to_a_person() -> Result<()> {
    let (_server, nats, creds) = setup().await?;
    let person = Client::new(nats.clone(), creds.clone(), "cli").with_retry(Retry::INTERACTIVE);
    let e = person
        .send(&new_command_id(), &command())
        .await
        .expect_err("nothing answers");
    assert!(
        matches!(
            e,
            SendError::Unavailable {
                attempts: 1,
                last: Outage::NothingAnswers { .. }
            }
        ),
        "{e:?}"
    );
    let service = Client::new(nats, creds, "daemon").with_retry(fast(Duration::from_millis(200)));
    let e = service
        .send(&new_command_id(), &command())
        .await
        .expect_err("nothing answers");
    assert!(
        matches!(e, SendError::Unavailable { attempts, .. } if attempts > 1),
        "{e:?}"
    );
    Ok(())
}

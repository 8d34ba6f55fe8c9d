//! The audit trail of refused requests: every refusal recorded, on a bounded set of
//! subjects, whatever floods in.

use std::collections::BTreeSet;

use anyhow::Result;
use handoff_domain::{Actor, Event};
use handoff_protocol::api::encode_request;
use handoff_protocol::auth::Credentials;
use handoff_protocol::ErrorCode;
use handoff_tests::*;

/// A flood of refused requests (unsigned, claiming a new user each time; forged; from
/// users that do not exist), sent at once to two instances, makes one subject per
/// reason, not one per request: the stream's subjects stay bounded however many
/// strangers knock. Each refusal is still there, with who it claimed to be and why,
/// although the two instances wrote the same subjects at the same time.
#[tokio::test]
async fn refusals_share_one_subject_per_reason() -> Result<()> {
    let stack = Stack::start().await?;
    let _second = CommandService::start(&stack.url(), Default::default()).await?;
    let command = register(1, settings(100));
    let subject = handoff_protocol::subjects::command("register-daemon");
    let mut sends = Vec::new();
    for i in 0..24 {
        let stranger = Credentials::generate(Actor::new(format!("stranger{i}"))?, None);
        let claimed = match i % 3 {
            // The owner's name, another key: forged.
            2 => stack.creds.user.clone(),
            _ => stranger.user.clone(),
        };
        let body = encode_request(&new_id(), &claimed, &command);
        // Unsigned, or signed by the stranger's own key (an unknown user, or a forgery).
        let signature = (i % 3 != 0).then(|| stranger.sign(&subject, &body));
        let client = stack.client.clone();
        let subject = subject.clone();
        sends.push(tokio::spawn(async move {
            request_signed(&client, &subject, body, signature.as_deref()).await
        }));
    }
    let sent = sends.len();
    for send in sends {
        let refused = send.await??.expect_err("refused");
        assert_eq!(refused.code, ErrorCode::Forbidden, "{}", refused.message);
    }
    let events = stack.events().await?;
    let refusals: Vec<_> = events
        .iter()
        .filter(|r| matches!(r.envelope.event, Event::CommandRefused { .. }))
        .collect();
    assert_eq!(refusals.len(), sent, "every refusal is recorded");
    let subjects: BTreeSet<&str> = refusals.iter().map(|r| r.subject.as_str()).collect();
    let reasons: BTreeSet<&str> = refusals
        .iter()
        .filter_map(|r| match &r.envelope.event {
            Event::CommandRefused { reason, .. } => Some(reason.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(
        reasons,
        BTreeSet::from(["bad_signature", "unknown_user", "unsigned"])
    );
    assert_eq!(
        subjects.len(),
        reasons.len(),
        "one subject per reason: {subjects:?}"
    );
    for r in &refusals {
        let Event::CommandRefused { reason, user, .. } = &r.envelope.event else {
            unreachable!("filtered above");
        };
        assert_eq!(r.subject, format!("handoff.evt.audit.{reason}"));
        assert!(user.as_str().starts_with("stranger") || *user == stack.creds.user);
    }
    Ok(())
}

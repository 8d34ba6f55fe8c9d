//! A command's reply always reaches its caller: one too large for the server's payload
//! limit becomes the error `reply_too_large`, which says the command was applied; a
//! reply that fits goes as it is.

use handoff_command::fit;
use handoff_domain::CommandId;
use handoff_protocol::api::AppendedEvent;
use handoff_protocol::{Applied, ErrorCode, Reply};

fn applied(events: usize) -> Reply {
    Reply::Ok(Applied {
        command: CommandId::new("01JAAAAAAAAAAAAAAAAAAAAAAA").unwrap(),
        events: (0..events as u64)
            .map(|seq| AppendedEvent {
                seq,
                subject: format!("handoff.evt.job.p.rs{seq}"),
                kind: "JobMoveStarted".into(),
            })
            .collect(),
        duplicate: false,
        dry_run: false,
        plan: None,
    })
}

#[test]
fn a_reply_that_fits_goes_as_it_is() {
    let reply = applied(10);
    let body = fit(&reply, 64 * 1024);
    assert_eq!(serde_json::from_slice::<Reply>(&body).unwrap(), reply);
}

#[test]
fn a_reply_over_the_limit_says_the_command_was_applied() {
    let limit = 64 * 1024;
    let whole = serde_json::to_vec(&applied(2000)).unwrap();
    assert!(
        whole.len() > limit,
        "the test's reply is {} bytes",
        whole.len()
    );
    let body = fit(&applied(2000), limit);
    assert!(body.len() < limit, "{} bytes", body.len());
    match serde_json::from_slice::<Reply>(&body).unwrap() {
        Reply::Error(e) => {
            assert_eq!(
                (e.code, e.reason.as_str()),
                (ErrorCode::Validation, "reply_too_large")
            );
            assert!(
                e.message
                    .contains("01JAAAAAAAAAAAAAAAAAAAAAAA was applied (2000 events")
                    && e.message.contains(&format!("limit of {limit}")),
                "{}",
                e.message
            );
        }
        other => panic!("{other:?}"),
    }
    // An error, however it came, is never replaced.
    let refused = Reply::Error(handoff_protocol::ErrorBody::new(
        ErrorCode::Refused,
        "r",
        "m",
    ));
    assert_eq!(
        serde_json::from_slice::<Reply>(&fit(&refused, 10)).unwrap(),
        refused
    );
}

//! The monitor while the command service does not answer: its reports wait in a task of
//! their own, so it goes on reading heartbeats, and when the command service is back it
//! reports what is true (the silent daemon down) and nothing else (no burst of false
//! DAEMON_DOWN for the daemons whose heartbeats queued up meanwhile).

use anyhow::Result;
use handoff_dataplane::store::Stores;
use handoff_domain::{DaemonId, Event};
use handoff_protocol::now_ms;
use handoff_tests::*;

use crate::alerts::{monitor, Heartbeats};

fn down_of(d: DaemonId) -> impl Fn(&handoff_eventlog::Recorded) -> bool {
    move |r| matches!(&r.envelope.event, Event::DaemonDown { daemon } if *daemon == d)
}

/// Daemon 1 is silent; daemons 2 and 3 keep beating. The command service stops just as
/// the monitor finds daemon 1 down, so its report is retried for seconds; meanwhile
/// heartbeats of 2 and 3 pile up. Back, the command service appends daemon 1's
/// DAEMON_DOWN, and daemon 2 (still beating) is never reported down; daemon 3 is, once
/// it really falls silent.
#[tokio::test]
async fn a_report_retried_for_seconds_does_not_make_the_monitor_deaf() -> Result<()> {
    let mut stack = Stack::start().await?;
    let dir = tempfile::tempdir()?;
    let stores = Stores::open(stack.client.clone(), 1).await?;
    let beats = Heartbeats::start(stores.clone(), &[daemon(2), daemon(3)]);
    for n in 1..=3 {
        stack.apply(register(n, settings(10))).await?;
    }
    let _monitor = monitor(&stack, dir.path(), &["--down-after", "2s"]).await?;
    let log = dir.path().join("monitor.log");
    until("the monitor to run", TIMEOUT, || async {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        Ok(text.contains("monitor running").then_some(()))
    })
    .await?;
    // The command service goes away before daemon 1's 2 s are up.
    if let Some(commands) = stack.commands.take() {
        commands.stop().await?;
    }
    // Long enough for the report of daemon 1 to be due and retried, and for two dozen
    // heartbeats of daemon 2 to queue up behind it.
    let key = handoff_protocol::subjects::daemon_key(&daemon(2));
    let from = stores
        .heartbeats
        .entry(key.as_str())
        .await?
        .map_or(0, |e| e.revision);
    until("heartbeats to pile up", TIMEOUT, || async {
        let now = stores.heartbeats.entry(key.as_str()).await?;
        Ok(now.filter(|e| e.revision >= from + 2 * 25).map(|_| ()))
    })
    .await?;
    stack.commands = Some(CommandService::start(&stack.url(), Default::default()).await?);
    first_event(
        &stack,
        "daemon 1's DAEMON_DOWN",
        TIMEOUT,
        down_of(daemon(1)),
    )
    .await?;
    // The monitor still hears: daemon 3 falls silent and is found down in its time.
    let lost_at = now_ms();
    beats.lose(&daemon(3));
    let down_3 = first_event(
        &stack,
        "daemon 3's DAEMON_DOWN",
        TIMEOUT,
        down_of(daemon(3)),
    )
    .await?;
    assert!(
        down_3.envelope.at >= lost_at + 1500,
        "daemon 3 reported down {} ms after its last heartbeat",
        down_3.envelope.at.saturating_sub(lost_at)
    );
    let events = stack.events().await?;
    let down_2 = events.iter().filter(|r| down_of(daemon(2))(r)).count();
    assert_eq!(down_2, 0, "daemon 2 never stopped beating");
    assert_eq!(events.iter().filter(|r| down_of(daemon(1))(r)).count(), 1);
    Ok(())
}

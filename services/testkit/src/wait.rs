//! The one poller. Tests wait for what they expect to become true (an event appended, a
//! snapshot stored, a process registered) by asking again and again until a deadline; a
//! fixed sleep is either too short on a slow machine or wasted on a fast one.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

/// The pause after the first poll; it doubles after each poll up to [`MAX_PAUSE`], so a
/// condition that is nearly true is seen at once and a slow one is not asked too often.
const FIRST_PAUSE: Duration = Duration::from_millis(10);
const MAX_PAUSE: Duration = Duration::from_millis(100);

/// Polls `check` until it answers `Some(value)` and returns the value.
///
/// Fails when `limit` has passed without one (the error says "timed out after LIMIT
/// waiting for WHAT"), and at once when `check` fails: an error is not a "not yet". A
/// plain condition answers `Ok(condition.then_some(()))`.
pub async fn until<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + limit;
    let mut pause = FIRST_PAUSE;
    loop {
        if let Some(value) = check()
            .await
            .with_context(|| format!("while waiting for {what}"))?
        {
            return Ok(value);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        // The one sleep of the test kit: between two polls, never past the deadline (the
        // condition is asked once more at the deadline itself).
        tokio::time::sleep(pause.min(left)).await;
        pause = (pause * 2).min(MAX_PAUSE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of the first `Some` is returned; a condition never met fails naming it.
    #[tokio::test]
    async fn returns_the_first_value_and_names_what_timed_out() -> Result<()> {
        let mut polls = 0;
        let third = until("the third poll", Duration::from_secs(5), || {
            polls += 1;
            let n = polls;
            async move { Ok((n == 3).then_some(n)) }
        })
        .await?;
        assert_eq!(third, 3);
        let never = until("nothing", Duration::from_millis(50), || async {
            Ok(None::<()>)
        })
        .await
        .expect_err("never true");
        assert!(never.to_string().contains("waiting for nothing"), "{never}");
        Ok(())
    }
}

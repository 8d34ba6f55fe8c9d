//! Following the stream through outages. A reader's consumer lives on one server; when
//! that server dies, or a stream's leader moves, opening or reading fails for a while.
//! A [`Follower`] opens its reader again from the next sequence it has not returned, so a
//! node lost in a cluster only delays it: nothing is skipped and nothing is returned
//! twice. Only what will not pass (an event that cannot be decoded) is an error.

use std::time::Duration;

use crate::{EventLog, EventReader, ReadError, Recorded};

/// The longest wait between two attempts to open the reader again.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Events in stream order from a sequence, optionally filtered, riding through outages.
pub struct Follower {
    log: EventLog,
    filter: Option<String>,
    next: u64,
    reader: Option<EventReader>,
    reopened: u32,
}

impl Follower {
    /// Follows from `start` (1: the beginning), every subject or those matching `filter`.
    pub fn new(log: EventLog, start: u64, filter: Option<&str>) -> Follower {
        Follower {
            log,
            filter: filter.map(str::to_owned),
            next: start.max(1),
            reader: None,
            reopened: 0,
        }
    }

    /// How many times the reader was opened again after an outage.
    pub fn reopened(&self) -> u32 {
        self.reopened
    }

    /// The next event; waits for one at the end of the stream, and through outages.
    pub async fn next(&mut self) -> Result<Recorded, ReadError> {
        let mut wait = Duration::from_millis(100);
        loop {
            let reader = match &mut self.reader {
                Some(r) => r,
                None => {
                    let opened = match &self.filter {
                        Some(f) => self.log.read_filtered(self.next, f).await,
                        None => self.log.read_from(self.next).await,
                    };
                    match opened {
                        Ok(r) => self.reader.insert(r),
                        Err(ReadError::Unavailable(why)) => {
                            tracing::debug!(%why, "the event stream is out of reach; trying again");
                            tokio::time::sleep(wait).await;
                            wait = (wait * 2).min(MAX_BACKOFF);
                            continue;
                        }
                        Err(e) => return Err(e),
                    }
                }
            };
            match reader.next().await {
                Ok(r) => {
                    self.next = r.seq + 1;
                    return Ok(r);
                }
                Err(ReadError::Unavailable(why)) => {
                    tracing::debug!(%why, next = self.next, "the event reader broke off; opening it again");
                    self.reader = None;
                    self.reopened += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

impl EventLog {
    /// The last sequence in the stream, asked again through an outage for up to `limit`.
    pub async fn last_sequence_within(&self, limit: Duration) -> Result<u64, crate::AppendError> {
        let deadline = tokio::time::Instant::now() + limit;
        let mut wait = Duration::from_millis(100);
        loop {
            match self.last_sequence().await {
                Ok(seq) => return Ok(seq),
                Err(e) if tokio::time::Instant::now() + wait > deadline => return Err(e),
                Err(_) => {
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(MAX_BACKOFF);
                }
            }
        }
    }
}

//! The agent's grooming of each job, every `groom_ms`: purges the oplog nothing needs any
//! more, grows a job's retention when something still needs older entries
//! (OPLOG_TTL_RESIZE), expires snapshots past their tiers, and sets the metrics of each
//! job's snapshots and oplog.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use handoff_client::Client;
use handoff_domain::command::ResizeOplogTtl;
use handoff_domain::{Command, JobId};
use handoff_protocol::{new_command_id, now_ms};
use tokio::sync::watch;

use crate::agent::{AgentError, Config, Ttl};
use crate::retention::{self, Hold};
use crate::store::{self, SnapshotMeta, Stores};

pub(crate) async fn groom_loop(
    stores: Stores,
    config: Config,
    creds: handoff_protocol::auth::Credentials,
    jobs: Arc<Mutex<BTreeSet<JobId>>>,
    ttl: Ttl,
    mut stop: watch::Receiver<bool>,
) -> Result<(), AgentError> {
    let client = Client::new(stores.client.clone(), creds, "handoff-agent");
    let mut ticker = tokio::time::interval(Duration::from_millis(config.groom_ms.max(50)));
    loop {
        tokio::select! {
            _ = stop.changed() => return Ok(()),
            _ = ticker.tick() => {}
        }
        let list: Vec<JobId> = jobs.lock().expect("jobs lock").iter().cloned().collect();
        let (leases, settings) = match (stores.leases().await, stores.settings().await) {
            (Ok(l), Ok(s)) => (l, s),
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!(error = %e, "groom skipped");
                continue;
            }
        };
        let (mut oldest, mut missing) = (None, 0);
        for job in list {
            let hours = ttl.lock().expect("ttl lock").get(&job).copied();
            match groom(&stores, &client, &settings, &job, hours, &leases).await {
                Ok(groomed) => {
                    if let Some(grown) = groomed.resized {
                        ttl.lock().expect("ttl lock").insert(job.clone(), grown);
                    }
                    oldest = oldest.max(groomed.snapshot_age_ms);
                    missing += u64::from(groomed.snapshot_age_ms.is_none());
                }
                Err(e) => {
                    tracing::warn!(%job, error = %e, "groom of a job failed; trying again later");
                }
            }
        }
        crate::telemetry::snapshots(oldest, missing);
    }
}

/// What grooming a job found and did.
#[derive(Debug, Default)]
pub struct Groomed {
    /// The job's retention, if it grew now.
    pub resized: Option<u32>,
    /// How old its latest snapshot is, if it has one.
    pub snapshot_age_ms: Option<u64>,
}

/// Grooms one job: purges the oplog that nothing needs and expires snapshots. `grown`:
/// the job's retention if it grew before. Returns the retention if it grows now, and
/// the age of its latest snapshot (both also set as metrics, with its oplog's window).
pub async fn groom(
    stores: &Stores,
    client: &Client,
    settings: &store::Settings,
    job: &JobId,
    grown: Option<u32>,
    leases: &[store::Lease],
) -> Result<Groomed, AgentError> {
    let hour = settings.hour_ms();
    let now = now_ms();
    let hours = grown
        .unwrap_or(settings.retention.ttl_hours)
        .max(settings.retention.ttl_hours);
    let mut resized = None;
    let (snaps, taken_back) = stores.groomed_snapshots(job).await?;
    if let Err(e) = stores.clear_taken_back(job, &taken_back).await {
        // Tried again at the next grooming; the rest of this one goes on.
        tracing::warn!(%job, error = %e, "refused snapshots not removed");
    }
    let snapshot_age_ms = snaps.last().map(|s| now.saturating_sub(s.taken_at_ms));
    if let Some(ms) = snapshot_age_ms {
        crate::telemetry::snapshot_age(job, ms);
    }
    let cutoff = now.saturating_sub(u64::from(hours) * hour);
    let pit_base = snaps.iter().rev().find(|s| s.taken_at_ms <= cutoff);
    if let Some((first, first_at)) = stores.oplog_first(job).await? {
        let last = stores.oplog_last(job).await?.map_or(first, |(s, _)| s);
        let last_at = stores.oplog_time(last).await?.unwrap_or(now);
        crate::telemetry::oplog_window(job, last_at.saturating_sub(first_at));
        let expired_below = if first_at >= cutoff {
            first
        } else if last_at < cutoff {
            last + 1
        } else {
            // Some message is inside the window; if it cannot be found now, purge
            // nothing this round rather than guess.
            stores
                .oplog_first_since(job, cutoff)
                .await?
                .unwrap_or(first)
        };
        let at =
            |seq: u64| async move { stores.oplog_time(seq).await.ok().flatten().unwrap_or(now) };
        let mut holds = Vec::new();
        if let Some(latest) = snaps.last() {
            let seq = latest.oplog_seq.max(first);
            holds.push(Hold {
                seq,
                at_ms: at(seq).await,
                why: "the latest snapshot (where a rebuild starts)".into(),
                grows: true,
            });
        }
        if let Some(base) = pit_base {
            holds.push(Hold {
                seq: base.oplog_seq.max(first),
                at_ms: 0,
                why: "the point-in-time window".into(),
                grows: false,
            });
        }
        if let Some(head) = stores.head(job).await? {
            let seq = (head.applied_seq + 1).max(first);
            if seq <= last {
                holds.push(Hold {
                    seq,
                    at_ms: at(seq).await,
                    why: format!("the head on {}", head.daemon),
                    grows: true,
                });
            }
        }
        for l in leases.iter().filter(|l| l.job == *job) {
            let seq = l.from_seq.max(first);
            holds.push(Hold {
                seq,
                at_ms: at(seq).await,
                why: "a restore in progress".into(),
                grows: true,
            });
        }
        let plan = retention::plan(
            now,
            hour,
            hours,
            &settings.retention,
            first,
            expired_below,
            &holds,
        );
        if let Some((new_hours, reason)) = plan.resize {
            client
                .send(
                    &new_command_id(),
                    &Command::ResizeOplogTtl(ResizeOplogTtl {
                        job: job.clone(),
                        previous_hours: hours,
                        hours: new_hours,
                        reason: reason.clone(),
                    }),
                )
                .await
                .map_err(|source| AgentError::Resize {
                    job: job.clone(),
                    source,
                })?;
            tracing::warn!(%job, hours = new_hours, reason, "oplog retention grown (OPLOG_TTL_RESIZE)");
            resized = Some(new_hours);
        }
        if let Some(below) = plan.purge_below {
            let purged = stores.purge_oplog(job, below).await?;
            tracing::debug!(%job, below, purged, "oplog purged");
        }
    }
    expire_snapshots(stores, settings, job, &snaps, pit_base, now).await?;
    Ok(Groomed {
        resized,
        snapshot_age_ms,
    })
}

/// Deletes the job's snapshots past their tiers' retention; never the latest nor the
/// point-in-time window's base.
async fn expire_snapshots(
    stores: &Stores,
    settings: &store::Settings,
    job: &JobId,
    snaps: &[SnapshotMeta],
    pit_base: Option<&SnapshotMeta>,
    now: u64,
) -> Result<(), AgentError> {
    let schedule = match stores.own_schedule(job).await? {
        Some(s) => s,
        None => settings.schedule.clone(),
    };
    let keep: BTreeMap<&str, ()> = snaps
        .last()
        .into_iter()
        .chain(pit_base)
        .map(|s| (s.id.as_str(), ()))
        .collect();
    for s in snaps {
        if keep.contains_key(s.id.as_str()) {
            continue;
        }
        if schedule.expires_at(s.slot_ms.unwrap_or(s.taken_at_ms)) <= now {
            stores.delete_snapshot(s).await?;
            tracing::info!(%job, snapshot = %s.id, "snapshot expired");
        }
    }
    Ok(())
}

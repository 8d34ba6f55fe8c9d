//! Oplog retention as a pure decision: what may be purged from one job's oplog, and
//! whether its retention must grow (OPLOG_TTL_RESIZE).
//!
//! Entries older than the retention window go, unless something still needs them: the
//! head of the job's owner (entries it has not applied), the latest snapshot (a rebuild
//! starts there), the snapshot a point-in-time restore of the window's start needs, and
//! restores in progress. When an entry that something still needs comes within the margin
//! of expiring, the retention grows by a step (Ops Manager: 3 h, up to 14 days).

use serde::{Deserialize, Serialize};

/// Retention settings of the oplog store, in hours of the data plane's clock.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Retention {
    /// The point-in-time window: how long entries are kept (24 h by default).
    pub ttl_hours: u32,
    /// How much the window grows when a needed entry is about to expire.
    pub step_hours: u32,
    /// The most it may grow to (14 days).
    pub max_hours: u32,
    /// How long before expiry a needed entry makes the window grow.
    pub margin_hours: u32,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            ttl_hours: 24,
            step_hours: 3,
            max_hours: handoff_domain::model::MAX_OPLOG_TTL_HOURS,
            margin_hours: 1,
        }
    }
}

impl Retention {
    pub fn validate(&self) -> Result<(), String> {
        if self.ttl_hours == 0 || self.ttl_hours > self.max_hours {
            return Err("ttl_hours must be from 1 to max_hours".into());
        }
        if self.max_hours > handoff_domain::model::MAX_OPLOG_TTL_HOURS {
            return Err("max_hours must be at most 336 (14 days)".into());
        }
        if self.step_hours == 0 || self.margin_hours >= self.ttl_hours {
            return Err("step_hours must be positive and margin_hours below ttl_hours".into());
        }
        Ok(())
    }
}

/// Something that needs a job's oplog from `seq` on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hold {
    /// The first stream sequence still needed.
    pub seq: u64,
    /// When that entry was stored (ms since the epoch).
    pub at_ms: u64,
    /// Who needs it, for the OPLOG_TTL_RESIZE reason.
    pub why: String,
    /// Whether keeping it past the window is a resize (false for the point-in-time base,
    /// which the window itself implies).
    pub grows: bool,
}

/// What to do with one job's oplog now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Purge every entry below this stream sequence.
    pub purge_below: Option<u64>,
    /// Grow the window to this many hours, for this reason.
    pub resize: Option<(u32, String)>,
}

/// Decides for one job. `expired_below`: every entry below this sequence was stored before
/// the window (now minus the current ttl); `first`: the job's first stored sequence.
pub fn plan(
    now_ms: u64,
    hour_ms: u64,
    ttl_hours: u32,
    settings: &Retention,
    first: u64,
    expired_below: u64,
    holds: &[Hold],
) -> Plan {
    let mut ttl = ttl_hours;
    let mut reason = None;
    for h in holds.iter().filter(|h| h.grows) {
        let expires =
            |ttl: u32| h.at_ms + u64::from(ttl.saturating_sub(settings.margin_hours)) * hour_ms;
        while expires(ttl) <= now_ms && ttl < settings.max_hours {
            ttl = (ttl + settings.step_hours).min(settings.max_hours);
            reason.get_or_insert_with(|| {
                format!(
                    "{} still needs entries stored {} h ago",
                    h.why,
                    now_ms.saturating_sub(h.at_ms) / hour_ms.max(1)
                )
            });
        }
    }
    let held = holds.iter().map(|h| h.seq).min().unwrap_or(u64::MAX);
    let below = expired_below.min(held);
    Plan {
        purge_below: (below > first).then_some(below),
        resize: (ttl > ttl_hours).then(|| (ttl, reason.unwrap_or_default())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Never purges an entry that something holds, and only expired ones.
        #[test]
        fn never_purges_what_is_held(
            first in 1u64..100, expired in 1u64..200,
            holds in proptest::collection::vec((1u64..200, 0u64..100_000, any::<bool>()), 0..5),
            now in 0u64..200_000,
        ) {
            let holds: Vec<Hold> = holds.into_iter().map(|(seq, at_ms, grows)| Hold { seq, at_ms, why: "a head".into(), grows }).collect();
            let p = plan(now, 1000, 24, &Retention::default(), first, expired, &holds);
            if let Some(below) = p.purge_below {
                prop_assert!(below <= expired && below > first);
                prop_assert!(holds.iter().all(|h| h.seq >= below));
            }
            if let Some((ttl, reason)) = p.resize {
                prop_assert!(ttl > 24 && ttl <= 336 && !reason.is_empty());
            }
        }
    }

    #[test]
    fn grows_by_steps_when_a_needed_entry_nears_expiry() {
        let r = Retention::default();
        let hold = Hold {
            seq: 5,
            at_ms: 0,
            why: "the head of d2".into(),
            grows: true,
        };
        // 23.5 h after the entry: within the 1 h margin of 24 h, so one step of 3 h.
        let p = plan(23_500, 1000, 24, &r, 1, 5, std::slice::from_ref(&hold));
        assert_eq!(p.resize.as_ref().map(|r| r.0), Some(27));
        assert!(p.resize.unwrap().1.contains("the head of d2"));
        // Not yet near: no resize.
        assert_eq!(
            plan(10_000, 1000, 24, &r, 1, 5, std::slice::from_ref(&hold)).resize,
            None
        );
        // Far past: grows up to the cap and no further.
        assert_eq!(
            plan(10_000_000, 1000, 24, &r, 1, 5, &[hold])
                .resize
                .map(|r| r.0),
            Some(336)
        );
    }
}

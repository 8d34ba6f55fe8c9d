//! Snapshot schedules and retention tiers (Ops Manager's rules), as pure functions of
//! time in milliseconds since the epoch.
//!
//! Snapshots are due at the slots `reference + k * interval`. After any gap (a move, a
//! daemon down) the next snapshot is the next slot after now: missed slots are never
//! taken in a burst. `hour_ms` is the length of an hour: 3,600,000 in production, less in
//! tests and the demo, so a day of schedule can pass in seconds.

use serde::{Deserialize, Serialize};

/// One hour, in milliseconds.
pub const HOUR_MS: u64 = 3_600_000;

/// A job's snapshot schedule and retention.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Schedule {
    /// Hours between snapshots: 6, 8, 12 or 24.
    pub interval_hours: u32,
    /// The reference time of day the slots count from, as minutes after midnight UTC
    /// (a time zone offset is folded in by whoever sets it).
    pub reference_minute: u32,
    /// Days every snapshot is kept (base tier): 2 to 5.
    pub base_days: u32,
    /// Days the first snapshot of each day is kept (0 disables the tier).
    pub daily_days: u32,
    /// Weeks the first snapshot of each week is kept (0 disables the tier).
    pub weekly_weeks: u32,
    /// Months (of 30 days) the first snapshot of each month is kept (0 disables it).
    pub monthly_months: u32,
    /// The length of an hour in milliseconds (3,600,000 outside tests and demos).
    pub hour_ms: u64,
}

impl Default for Schedule {
    fn default() -> Self {
        Schedule {
            interval_hours: 6,
            reference_minute: 0,
            base_days: 2,
            daily_days: 7,
            weekly_weeks: 4,
            monthly_months: 12,
            hour_ms: HOUR_MS,
        }
    }
}

/// The retention tiers a snapshot belongs to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tiers {
    pub daily: bool,
    pub weekly: bool,
    pub monthly: bool,
}

impl Schedule {
    /// Checks the values Ops Manager accepts.
    pub fn validate(&self) -> Result<(), String> {
        if ![6, 8, 12, 24].contains(&self.interval_hours) {
            return Err(format!(
                "interval_hours must be 6, 8, 12 or 24 (got {})",
                self.interval_hours
            ));
        }
        if self.reference_minute >= 24 * 60 {
            return Err("reference_minute must be below 1440 (a time of day)".into());
        }
        if !(2..=5).contains(&self.base_days) {
            return Err(format!("base_days must be 2 to 5 (got {})", self.base_days));
        }
        if self.daily_days > 365 || self.weekly_weeks > 52 || self.monthly_months > 36 {
            return Err("daily_days <= 365, weekly_weeks <= 52, monthly_months <= 36".into());
        }
        if !(60..=HOUR_MS).contains(&self.hour_ms) {
            return Err("hour_ms must be from 60 to 3600000".into());
        }
        Ok(())
    }

    pub fn interval_ms(&self) -> u64 {
        u64::from(self.interval_hours) * self.hour_ms
    }

    pub fn day_ms(&self) -> u64 {
        24 * self.hour_ms
    }

    /// The slot all others count from.
    fn origin(&self) -> u64 {
        u64::from(self.reference_minute) * (self.hour_ms / 60)
    }

    /// The first slot strictly after `t`.
    pub fn next_slot_after(&self, t: u64) -> u64 {
        let origin = self.origin();
        let step = self.interval_ms();
        if t < origin {
            return origin;
        }
        origin + ((t - origin) / step + 1) * step
    }

    /// The latest slot at or before `t`, if there is one.
    pub fn slot_at_or_before(&self, t: u64) -> Option<u64> {
        let origin = self.origin();
        (t >= origin).then(|| origin + (t - origin) / self.interval_ms() * self.interval_ms())
    }

    /// The tiers of the snapshot of `slot`: the first slot of a day, a week (of 7 days
    /// from the reference) or a month (of 30 days).
    pub fn tiers(&self, slot: u64) -> Tiers {
        let since = slot.saturating_sub(self.origin());
        let day = self.day_ms();
        Tiers {
            daily: self.daily_days > 0 && since.is_multiple_of(day),
            weekly: self.weekly_weeks > 0 && since.is_multiple_of(7 * day),
            monthly: self.monthly_months > 0 && since.is_multiple_of(30 * day),
        }
    }

    /// When the snapshot of `slot` (taken at `taken` if off schedule) may be deleted: the
    /// longest of its tiers' retentions.
    pub fn expires_at(&self, slot: u64) -> u64 {
        let day = self.day_ms();
        let tiers = self.tiers(slot);
        let mut keep = u64::from(self.base_days) * day;
        if tiers.daily {
            keep = keep.max(u64::from(self.daily_days) * day);
        }
        if tiers.weekly {
            keep = keep.max(u64::from(self.weekly_weeks) * 7 * day);
        }
        if tiers.monthly {
            keep = keep.max(u64::from(self.monthly_months) * 30 * day);
        }
        slot + keep
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn schedule() -> impl Strategy<Value = Schedule> {
        (
            prop::sample::select(vec![6u32, 8, 12, 24]),
            0u32..1440,
            2u32..=5,
            0u32..10,
            0u32..5,
            0u32..3,
            prop::sample::select(vec![60u64, 600, 60_000, HOUR_MS]),
        )
            .prop_map(|(i, r, b, d, w, m, h)| Schedule {
                interval_hours: i,
                reference_minute: r,
                base_days: b,
                daily_days: d,
                weekly_weeks: w,
                monthly_months: m,
                hour_ms: h,
            })
    }

    proptest! {
        /// The next slot is after `t`, at most one interval away, and a slot: so after
        /// any gap exactly one snapshot is due, never a burst of the missed ones.
        #[test]
        fn next_slot_is_the_one_regular_slot_after_now(s in schedule(), t in 0u64..(1u64 << 45)) {
            prop_assert!(s.validate().is_ok());
            let next = s.next_slot_after(t);
            prop_assert!(next > t);
            prop_assert!(next <= t + s.interval_ms() || t < s.origin());
            prop_assert_eq!(s.slot_at_or_before(next), Some(next));
            prop_assert_eq!(s.next_slot_after(next - 1), next);
            if let Some(prev) = s.slot_at_or_before(t) {
                prop_assert!(prev <= t && t < prev + s.interval_ms());
                prop_assert_eq!(s.next_slot_after(prev), prev + s.interval_ms());
            }
        }

        /// A snapshot is kept at least its base days, and a tier only adds time.
        #[test]
        fn expiry_covers_base_and_tiers(s in schedule(), k in 0u64..10_000) {
            let slot = s.origin() + k * s.interval_ms();
            let exp = s.expires_at(slot);
            prop_assert!(exp >= slot + u64::from(s.base_days) * s.day_ms());
            let tiers = s.tiers(slot);
            if tiers.weekly { prop_assert!(exp >= slot + u64::from(s.weekly_weeks) * 7 * s.day_ms()); }
            if tiers.weekly { prop_assert!(s.daily_days == 0 || tiers.daily); }
        }
    }

    #[test]
    fn rejects_what_ops_manager_rejects() {
        let bad = [
            Schedule {
                interval_hours: 5,
                ..Schedule::default()
            },
            Schedule {
                base_days: 1,
                ..Schedule::default()
            },
            Schedule {
                reference_minute: 1440,
                ..Schedule::default()
            },
            Schedule {
                hour_ms: 7,
                ..Schedule::default()
            },
        ];
        for s in bad {
            assert!(s.validate().is_err(), "{s:?}");
        }
        assert!(Schedule::default().validate().is_ok());
    }
}

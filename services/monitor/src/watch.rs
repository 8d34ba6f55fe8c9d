//! What the monitor knows on its own clock, and the commands that knowledge calls for.
//! No I/O: the clock comes in as an `Instant`, the fleet as the domain state.
//!
//! - A daemon is heard when a heartbeat arrives, never from a timestamp read back: after
//!   the monitor starts, and when a daemon first appears, it counts as heard now (a
//!   fresh grace period). Silent for longer than the threshold while up: DAEMON_DOWN.
//!   Heard again after it went down: DAEMON_UP.
//! - Silence counts only while the monitor listens. When it could not (its loop or its
//!   process stalled: [`Watch::deaf`]), that span counts for nobody's silence, nor for the
//!   failover delay: the heartbeats that queued up meanwhile are read before anyone is
//!   judged on them.
//! - A silence every daemon shares is most likely the heartbeat bucket's (its stream's
//!   leader moving after a node loss: every put fails for seconds) or the watch's, not
//!   the daemons'. Once every daemon that is up has missed three of its usual heartbeats
//!   and nobody at all is heard, the time until the next heartbeat from anyone counts like
//!   time the monitor could not listen, up to [`Watch::shared_cap`] per silence: the loss
//!   of every daemon at once is still reported, that much later. A daemon's usual spacing
//!   is learned from its heartbeats heard in full; until each daemon that is up has one,
//!   no silence is shared. When nothing is heard for a while, the shell watches the
//!   bucket again ([`Watch::rewatch`]): a watch whose server died may stall without ending.
//! - One command per thing at a time: a command handed to the sender is in flight until
//!   [`Watch::landed`], and nothing more about the same thing is due meanwhile, however
//!   long the command service takes; after it lands, not again within `resend` (the
//!   state catches up with what it appended).
//! - A moving job makes progress when its phase changes or its destination publishes
//!   progress with the job's current epoch that goes further than any before (phase,
//!   then bytes restored, then entries applied): a rebuild that starts over and over
//!   republishes the same progress and is stuck. None for the threshold: MOVE_STUCK.
//! - LOW_HEAD_FREE_SPACE follows the state's free space against a percentage.
//! - The failover policy, when enabled, moves the jobs of a daemon that has been down
//!   for its delay (counted from when this monitor saw it down), no more at once than its
//!   rebuild limit, and not at all while more than its share of daemons is down.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use handoff_domain::alert::{AlertKey, AlertKind, FLEET};
use handoff_domain::command::{
    FailoverJob, ReportDaemonLiveness, ReportFailoverGuard, ReportHeadSpace, ReportMoveStuck,
};
use handoff_domain::model::MovePhase;
use handoff_domain::state::{Assignment, DaemonStatus};
use handoff_domain::{Command, CommandId, DaemonId, JobId, State};
use handoff_protocol::dataplane::Progress;

/// The automatic failover policy's settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// How long a daemon stays down before its jobs move.
    pub delay: Duration,
    /// No new move while this many jobs are moving (any move, the operators' included).
    pub max_concurrent_rebuilds: u32,
    /// Pause while more than this percentage of the daemons is down.
    pub max_down_percent: u32,
}

/// The monitor's settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// DAEMON_DOWN after this long without a heartbeat (Ops Manager: 15 minutes).
    pub threshold: Duration,
    /// MOVE_STUCK after this long without progress.
    pub move_stuck_after: Duration,
    /// LOW_HEAD_FREE_SPACE under this percentage of a daemon's head space.
    pub low_head_free_percent: u32,
    /// Off (`None`) by default: Ops Manager never moves jobs by itself.
    pub failover: Option<Policy>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            threshold: Duration::from_secs(15 * 60),
            move_stuck_after: Duration::from_secs(30 * 60),
            low_head_free_percent: 10,
            failover: None,
        }
    }
}

/// A command the monitor should send now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Due {
    /// What it is about (`down <daemon>`, `failover <job>`...): one command per key is in
    /// flight at a time; report it back with [`Watch::landed`].
    pub key: String,
    pub command: Command,
    /// Sent as the failover policy's user.
    pub by_policy: bool,
}

/// An instant on the monitor's clock, with how long it had been deaf by then: the time
/// it listened between two of these is their distance less the deafness between them.
#[derive(Clone, Copy, Debug)]
struct Mark {
    at: Instant,
    deaf: Duration,
}

/// The monitor's bookkeeping.
/// A moving job's move, its phase in the state, when it last went further, and the
/// furthest progress its destination reported.
struct Moving {
    move_id: CommandId,
    phase: MovePhase,
    last: Instant,
    furthest: Option<(MovePhase, u64, u64)>,
}

pub struct Watch {
    settings: Settings,
    /// When each daemon was last heard (or first seen).
    heard: HashMap<DaemonId, Mark>,
    /// When this monitor saw each daemon go down (or reported it down).
    down_since: HashMap<DaemonId, Mark>,
    /// How long the monitor has been deaf in all (see [`Watch::deaf`]), the silences
    /// every daemon shared included once they ended.
    deaf: Duration,
    /// When each daemon's last heartbeat arrived (a first sighting is not one).
    beats: HashMap<DaemonId, Mark>,
    /// Each daemon's usual heartbeat spacing: the last gap between two of its heartbeats
    /// that the monitor heard in full (nothing deaf between them).
    spacing: HashMap<DaemonId, Duration>,
    /// The daemons up in the state, whose heartbeats are expected.
    up: HashSet<DaemonId>,
    /// The last heartbeat from any daemon (or the start): a silence everybody shares ends
    /// with the next one.
    last_any: Option<Mark>,
    /// How often the heartbeat bucket was watched again during the current silence.
    rewatched: u32,
    /// Each moving job's move and how far it went.
    moving: HashMap<JobId, Moving>,
    /// When each command last landed (or was handed over), by what it is about: not
    /// repeated within `resend`, so a report the state has not caught up with is not sent
    /// twice.
    sent: HashMap<String, Instant>,
    /// What is handed to the sender and has not landed yet.
    in_flight: HashSet<String>,
    resend: Duration,
}

impl Watch {
    pub fn new(settings: Settings) -> Self {
        let resend =
            (settings.threshold / 2).clamp(Duration::from_millis(500), Duration::from_secs(5));
        Watch {
            settings,
            heard: HashMap::new(),
            down_since: HashMap::new(),
            deaf: Duration::ZERO,
            beats: HashMap::new(),
            spacing: HashMap::new(),
            up: HashSet::new(),
            last_any: None,
            rewatched: 0,
            moving: HashMap::new(),
            sent: HashMap::new(),
            in_flight: HashSet::new(),
            resend,
        }
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// How often the shell should ask what is due: a fifth of the threshold, between
    /// 50 ms and a second.
    pub fn tick(&self) -> Duration {
        (self.settings.threshold / 5).clamp(Duration::from_millis(50), Duration::from_secs(1))
    }

    /// The most of one silence every daemon shares that counts as the monitor's: five
    /// thresholds, at most 30 s. Beyond, it is the daemons' silence again.
    pub fn shared_cap(&self) -> Duration {
        (self.settings.threshold * 5).min(Duration::from_secs(30))
    }

    /// How long nothing may be heard from anyone before the shell watches the heartbeat
    /// bucket again (and again after as long): a quarter of the threshold, from 1 to 10 s.
    fn rewatch_after(&self) -> Duration {
        (self.settings.threshold / 4).clamp(Duration::from_secs(1), Duration::from_secs(10))
    }

    /// How long the monitor has been deaf by `now`, the silence everybody shares so far
    /// included.
    fn deaf_by(&self, now: Instant) -> Duration {
        self.deaf + self.shared(now)
    }

    fn mark(&self, at: Instant) -> Mark {
        Mark {
            at,
            deaf: self.deaf_by(at),
        }
    }

    /// How long the monitor listened from `since` to `now`.
    fn listened(&self, since: Mark, now: Instant) -> Duration {
        now.saturating_duration_since(since.at)
            .saturating_sub(self.deaf_by(now).saturating_sub(since.deaf))
    }

    /// How long the monitor listened from `since` to `now`, counting as deaf only what has
    /// ended (its stalls, and the shared silences a heartbeat ended).
    fn quiet(&self, since: Mark, now: Instant) -> Duration {
        now.saturating_duration_since(since.at)
            .saturating_sub(self.deaf.saturating_sub(since.deaf))
    }

    /// How much of the silence now is everybody's (see the module's notes): none unless
    /// each daemon that is up has a usual spacing and has missed three heartbeats, from
    /// the moment the last of them did, up to [`Watch::shared_cap`].
    fn shared(&self, now: Instant) -> Duration {
        let Some(last) = self.last_any else {
            return Duration::ZERO;
        };
        if self.up.is_empty() {
            return Duration::ZERO;
        }
        let mut shared = self.quiet(last, now);
        for daemon in &self.up {
            let (Some(beat), Some(spacing)) = (self.beats.get(daemon), self.spacing.get(daemon))
            else {
                return Duration::ZERO;
            };
            let overdue_after = (*spacing * 3).max(self.tick());
            shared = shared.min(self.quiet(*beat, now).saturating_sub(overdue_after));
        }
        shared.min(self.shared_cap())
    }

    /// A heartbeat of `daemon` arrived: it is heard, and a silence everybody shared ends.
    pub fn heartbeat(&mut self, daemon: DaemonId, now: Instant) {
        self.deaf += self.shared(now);
        self.rewatched = 0;
        let mark = Mark {
            at: now,
            deaf: self.deaf,
        };
        // A gap heard in full tells the daemon's spacing; one with deafness in it does not
        // (a silence everybody shared would otherwise stretch everybody's spacing).
        if let Some(last) = self.beats.get(&daemon) {
            if last.deaf == self.deaf && now > last.at {
                self.spacing.insert(daemon.clone(), now - last.at);
            }
        }
        self.beats.insert(daemon.clone(), mark);
        self.last_any = Some(mark);
        self.heard.insert(daemon, mark);
    }

    /// Whether the shell should watch the heartbeat bucket again: nothing has been heard
    /// from any daemon for [`Watch::rewatch_after`] while some are up (a watch whose
    /// server went away can stall without ending), and again after each as long.
    pub fn rewatch(&mut self, now: Instant) -> bool {
        let Some(last) = self.last_any else {
            return false;
        };
        if self.up.is_empty() {
            return false;
        }
        let due = self.rewatch_after() * (self.rewatched + 1);
        if now.saturating_duration_since(last.at) < due {
            return false;
        }
        self.rewatched += 1;
        true
    }

    /// The monitor could hear nothing from `from` to `to` (its loop or its process
    /// stalled): a daemon's silence and a failover delay count only the time it listened,
    /// so the heartbeats that queued up meanwhile are read before anyone is judged.
    pub fn deaf(&mut self, from: Instant, to: Instant) {
        self.deaf += to.saturating_duration_since(from);
    }

    /// The command about `key` that [`Watch::due`] handed out has been sent: applied,
    /// refused, or given up after its retries. The next one about it may be due after
    /// `resend`, once the state had the time to show what the command did.
    pub fn landed(&mut self, key: &str, now: Instant) {
        if self.in_flight.remove(key) {
            self.sent.insert(key.to_owned(), now);
        }
    }

    /// Commands handed out that have not landed.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// The destination of `job`'s move reported progress `p`.
    pub fn progress(&mut self, state: &State, p: &Progress, now: Instant) {
        let current = state.jobs.get(&p.job).is_some_and(|j| j.epoch == p.epoch);
        let mark = (p.phase, p.snapshot_bytes, p.entries_applied);
        if let (true, Some(m)) = (current, self.moving.get_mut(&p.job)) {
            if m.furthest.is_none_or(|f| mark > f) {
                m.furthest = Some(mark);
                m.last = now;
            }
        }
    }

    /// When the daemon was last heard, if it was since this monitor started.
    pub fn heard(&self, daemon: &DaemonId) -> Option<Instant> {
        self.heard.get(daemon).map(|m| m.at)
    }

    /// Brings the bookkeeping in line with the state: daemons and moves seen for the first
    /// time start their clocks now.
    pub fn observe(&mut self, state: &State, now: Instant) {
        let up: HashSet<DaemonId> = state
            .daemons
            .iter()
            .filter(|(_, d)| matches!(d.status, DaemonStatus::Active(_)) && d.is_up())
            .map(|(id, _)| id.clone())
            .collect();
        if self.last_any.is_none() || (self.up.is_empty() && !up.is_empty()) {
            // Silence is everybody's only from when somebody was expected.
            self.last_any = Some(Mark {
                at: now,
                deaf: self.deaf,
            });
        }
        self.up = up;
        let mark = self.mark(now);
        for (id, d) in &state.daemons {
            match d.status {
                DaemonStatus::Active(_) => {
                    self.heard.entry(id.clone()).or_insert(mark);
                    if d.is_up() {
                        self.down_since.remove(id);
                    } else {
                        self.down_since.entry(id.clone()).or_insert(mark);
                    }
                }
                DaemonStatus::Removed => {
                    self.heard.remove(id);
                    self.down_since.remove(id);
                    self.beats.remove(id);
                    self.spacing.remove(id);
                }
            }
        }
        let mut still = BTreeMap::new();
        for (job, j) in &state.jobs {
            if let Assignment::Moving { move_id, phase, .. } = &j.assignment {
                still.insert(job, ());
                let fresh = match self.moving.get(job) {
                    Some(m) => &m.move_id != move_id || m.phase != *phase,
                    None => true,
                };
                if fresh {
                    let furthest = self.moving.get(job).and_then(|m| m.furthest);
                    self.moving.insert(
                        job.clone(),
                        Moving {
                            move_id: move_id.clone(),
                            phase: *phase,
                            last: now,
                            furthest: furthest.filter(|_| {
                                self.moving.get(job).is_some_and(|m| &m.move_id == move_id)
                            }),
                        },
                    );
                }
            }
        }
        self.moving.retain(|job, _| still.contains_key(job));
    }

    /// Whether a command about `key` may go now; if so it is in flight from here.
    fn once(&mut self, key: &str, now: Instant) -> bool {
        if self.in_flight.contains(key) {
            return false;
        }
        match self.sent.get(key) {
            Some(at) if now.duration_since(*at) < self.resend => false,
            _ => {
                self.sent.insert(key.to_owned(), now);
                self.in_flight.insert(key.to_owned());
                true
            }
        }
    }

    /// The commands due now: liveness first, then alerts, then the policy.
    pub fn due(&mut self, state: &State, now: Instant) -> Vec<Due> {
        self.observe(state, now);
        let mut due = Vec::new();
        let report = |key: String, command: Command| Due {
            key,
            command,
            by_policy: false,
        };
        for (id, d) in &state.daemons {
            if d.status == DaemonStatus::Removed {
                continue;
            }
            let heard = self.heard[id];
            if d.is_up() {
                let key = format!("down {id}");
                if self.listened(heard, now) > self.settings.threshold && self.once(&key, now) {
                    // From now the daemon counts as down here, whatever the stream says
                    // later: a heartbeat after this brings it back up.
                    let mark = self.mark(now);
                    self.down_since.insert(id.clone(), mark);
                    due.push(report(
                        key,
                        Command::ReportDaemonLiveness(ReportDaemonLiveness {
                            daemon: id.clone(),
                            up: false,
                        }),
                    ));
                }
            } else {
                let key = format!("up {id}");
                if heard.at > self.down_since[id].at && self.once(&key, now) {
                    due.push(report(
                        key,
                        Command::ReportDaemonLiveness(ReportDaemonLiveness {
                            daemon: id.clone(),
                            up: true,
                        }),
                    ));
                }
            }
            let total = d.settings.head_space_bytes;
            let low = total > 0
                && u128::from(d.free_bytes()) * 100
                    < u128::from(total) * u128::from(self.settings.low_head_free_percent);
            let open = state
                .alerts
                .contains(&AlertKey::new(AlertKind::LowHeadFreeSpace, id));
            let key = format!("space {id}");
            if low != open && self.once(&key, now) {
                due.push(report(
                    key,
                    Command::ReportHeadSpace(ReportHeadSpace {
                        daemon: id.clone(),
                        threshold_percent: self.settings.low_head_free_percent,
                    }),
                ));
            }
        }
        let mut stuck: Vec<(&JobId, &Moving)> = self.moving.iter().collect();
        stuck.sort_by_key(|(job, _)| (*job).clone());
        let mut stuck_due = Vec::new();
        for (job, Moving { move_id, last, .. }) in stuck {
            let idle = now.duration_since(*last);
            if idle > self.settings.move_stuck_after
                && !state
                    .alerts
                    .contains(&AlertKey::new(AlertKind::MoveStuck, job))
            {
                stuck_due.push((job.clone(), move_id.clone(), idle));
            }
        }
        for (job, move_id, idle) in stuck_due {
            let key = format!("stuck {job}");
            if self.once(&key, now) {
                due.push(report(
                    key,
                    Command::ReportMoveStuck(ReportMoveStuck {
                        job,
                        move_id,
                        idle_ms: idle.as_millis() as u64,
                    }),
                ));
            }
        }
        // The policy decides on how many daemons are down: not while a liveness report,
        // which changes that count, is on its way (it could move a job the guard is
        // about to pause, the report having been sent before but landing after).
        let counting = self
            .in_flight
            .iter()
            .chain(due.iter().map(|d| &d.key))
            .any(|k| k.starts_with("down ") || k.starts_with("up "));
        if let (Some(policy), false) = (self.settings.failover.clone(), counting) {
            due.extend(self.failover(state, &policy, now));
        }
        due
    }

    fn failover(&mut self, state: &State, policy: &Policy, now: Instant) -> Vec<Due> {
        let mut due = Vec::new();
        let (down, active) = state.down_of_active();
        let tripped = active > 0
            && down.len() as u64 * 100 > u64::from(active) * u64::from(policy.max_down_percent);
        let paused = state
            .alerts
            .contains(&AlertKey::new(AlertKind::FailoverPaused, FLEET));
        if tripped != paused && self.once("guard", now) {
            due.push(Due {
                key: "guard".into(),
                command: Command::ReportFailoverGuard(ReportFailoverGuard {
                    max_down_percent: policy.max_down_percent,
                }),
                by_policy: true,
            });
        }
        // Paused until the state says it resumed: a move sent with the report that lifts
        // the guard could land before it, a move while FAILOVER_PAUSED is open.
        if tripped || paused {
            return due;
        }
        let mut budget = policy
            .max_concurrent_rebuilds
            .saturating_sub(state.moving());
        for daemon in down {
            let Some(since) = self.down_since.get(&daemon).copied() else {
                continue;
            };
            let down_for = self.listened(since, now);
            // Heard again since: it is about to be reported up, and keeps its jobs.
            let heard_again = self.heard.get(&daemon).is_some_and(|h| h.at > since.at);
            if down_for < policy.delay || heard_again {
                continue;
            }
            for job in &state.daemons[&daemon].jobs {
                if budget == 0 {
                    return due;
                }
                let on_it = matches!(&state.jobs[job].assignment,
                    Assignment::Assigned { daemon: d } if *d == daemon);
                let key = format!("failover {job}");
                if !on_it || !self.once(&key, now) {
                    continue;
                }
                budget -= 1;
                due.push(Due {
                    key,
                    command: Command::FailoverJob(FailoverJob {
                        job: job.clone(),
                        from: daemon.clone(),
                        down_for_ms: down_for.as_millis() as u64,
                        delay_ms: policy.delay.as_millis() as u64,
                        max_concurrent_rebuilds: policy.max_concurrent_rebuilds,
                        max_down_percent: policy.max_down_percent,
                    }),
                    by_policy: true,
                });
            }
        }
        due
    }
}

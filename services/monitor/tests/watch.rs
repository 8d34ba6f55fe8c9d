//! The monitor's judgement on its own clock, without a server: the clock is an `Instant`
//! the test moves, the fleet a domain state built by deciding commands.

use std::time::{Duration, Instant};

use handoff_domain::command::*;
use handoff_domain::ids::DeploymentName;
use handoff_domain::model::{DaemonSettings, Deployment, JobSize, MovePhase};
use handoff_domain::{decide, Actor, Command, CommandId, Context, DaemonId, JobId, State};
use handoff_monitor::{Policy, Settings, Watch};
use handoff_protocol::dataplane::Progress;

const GIB: u64 = 1 << 30;

fn d(n: usize) -> DaemonId {
    DaemonId::new(format!("backup{n}:/data/")).unwrap()
}

struct Fleet {
    state: State,
    next: u64,
}

impl Fleet {
    fn apply(&mut self, command: Command) {
        self.next += 1;
        let ctx = Context {
            command: CommandId::new(format!("01J{:023}", self.next)).unwrap(),
            actor: Actor::new("admin").unwrap(),
            at_ms: self.next,
        };
        let decision = decide(&command, &ctx, &self.state)
            .unwrap_or_else(|r| panic!("{} refused: {r}", command.name()));
        for e in decision.events() {
            self.state.apply(e);
        }
    }

    /// `n` daemons of 100 GiB; daemon 1 owns `jobs` jobs of 10 GiB.
    fn new(n: usize, jobs: usize) -> Fleet {
        let mut f = Fleet {
            state: State::default(),
            next: 0,
        };
        f.register(1);
        f.apply(Command::ConfigureProject(ConfigureProject {
            project: handoff_domain::ProjectId::new("p").unwrap(),
            daemon_filter: vec![],
            label_filter: vec![],
        }));
        for i in 0..jobs {
            f.apply(Command::CreateBackupJobs(CreateBackupJobs {
                project: handoff_domain::ProjectId::new("p").unwrap(),
                deployment: Deployment::ReplicaSet {
                    name: DeploymentName::new(format!("rs{i}")).unwrap(),
                    size: JobSize {
                        head_size_bytes: 10 * GIB,
                        oplog_bytes_per_hour: 0,
                    },
                },
            }));
        }
        for i in 2..=n {
            f.register(i);
        }
        f
    }

    fn register(&mut self, n: usize) {
        self.apply(Command::RegisterDaemon(RegisterDaemon {
            daemon: d(n),
            settings: DaemonSettings {
                head_space_bytes: 100 * GIB,
                ..DaemonSettings::default()
            },
        }));
    }

    /// Applies what the monitor sent (as the command service would), and tells the
    /// monitor each has landed.
    fn run(&mut self, watch: &mut Watch, now: Instant) -> Vec<String> {
        let due = watch.due(&self.state, now);
        due.into_iter()
            .map(|d| {
                let name = describe(&d.command);
                self.apply(d.command);
                watch.landed(&d.key, now);
                name
            })
            .collect()
    }
}

fn describe(c: &Command) -> String {
    match c {
        Command::ReportDaemonLiveness(r) => {
            format!("{} {}", if r.up { "up" } else { "down" }, r.daemon)
        }
        Command::FailoverJob(f) => format!("failover {}", f.job),
        Command::ReportFailoverGuard(_) => "guard".into(),
        Command::ReportMoveStuck(s) => format!("stuck {}", s.job),
        Command::ReportHeadSpace(h) => format!("space {}", h.daemon),
        other => other.name().into(),
    }
}

fn settings(failover: Option<Policy>) -> Settings {
    Settings {
        threshold: Duration::from_secs(10),
        move_stuck_after: Duration::from_secs(30),
        low_head_free_percent: 10,
        failover,
    }
}

fn policy() -> Policy {
    Policy {
        delay: Duration::from_secs(20),
        max_concurrent_rebuilds: 2,
        max_down_percent: 50,
    }
}

fn s(n: u64) -> Duration {
    Duration::from_secs(n)
}

#[test]
fn a_daemon_is_down_only_after_the_threshold_without_heartbeats() {
    let mut f = Fleet::new(3, 1);
    let t0 = Instant::now();
    let mut w = Watch::new(settings(None));
    w.observe(&f.state, t0);
    for n in 1..=3 {
        w.heartbeat(d(n), t0 + s(8));
    }
    assert!(f.run(&mut w, t0 + s(9)).is_empty());
    // Daemons 2 and 3 keep sending; daemon 1 stops.
    w.heartbeat(d(2), t0 + s(16));
    w.heartbeat(d(3), t0 + s(16));
    assert!(
        f.run(&mut w, t0 + s(17)).is_empty(),
        "8 s of silence is under 10"
    );
    assert_eq!(f.run(&mut w, t0 + s(19)), vec![format!("down {}", d(1))]);
    assert!(!f.state.daemons[&d(1)].is_up());
    // Reported once, however often it is asked.
    assert!(f.run(&mut w, t0 + s(19)).is_empty());
    w.heartbeat(d(1), t0 + s(20));
    w.heartbeat(d(2), t0 + s(20));
    w.heartbeat(d(3), t0 + s(20));
    assert_eq!(f.run(&mut w, t0 + s(21)), vec![format!("up {}", d(1))]);
}

#[test]
fn after_a_restart_every_daemon_gets_a_fresh_grace_period() {
    let mut f = Fleet::new(2, 0);
    let t0 = Instant::now();
    // A monitor that starts much later hears nothing for a while: it must not declare
    // anything down before a whole threshold passed on its own clock.
    let later = t0 + s(3600);
    let mut w = Watch::new(settings(None));
    w.observe(&f.state, later);
    assert!(f.run(&mut w, later + s(9)).is_empty());
    let mut down = f.run(&mut w, later + s(11));
    down.sort();
    assert_eq!(
        down,
        vec![format!("down {}", d(1)), format!("down {}", d(2))]
    );
    // A daemon down in the stream stays down after a restart until it is heard.
    let mut w = Watch::new(settings(None));
    w.observe(&f.state, later + s(100));
    assert!(f.run(&mut w, later + s(200)).is_empty());
    w.heartbeat(d(2), later + s(201));
    assert_eq!(f.run(&mut w, later + s(202)), vec![format!("up {}", d(2))]);
}

#[test]
fn the_policy_waits_for_its_delay_and_a_daemon_back_in_time_keeps_its_jobs() {
    let mut f = Fleet::new(3, 2);
    let t0 = Instant::now();
    let mut w = Watch::new(settings(Some(policy())));
    w.observe(&f.state, t0);
    let beat = |w: &mut Watch, at: Instant, who: &[usize]| {
        for n in who {
            w.heartbeat(d(*n), at);
        }
    };
    beat(&mut w, t0 + s(5), &[2, 3]);
    beat(&mut w, t0 + s(10), &[2, 3]);
    assert_eq!(f.run(&mut w, t0 + s(11)), vec![format!("down {}", d(1))]);
    // Daemon 1 flaps back within the delay: nothing moves.
    for t in [15, 20, 25] {
        beat(&mut w, t0 + s(t), &[1, 2, 3]);
    }
    assert_eq!(f.run(&mut w, t0 + s(26)), vec![format!("up {}", d(1))]);
    for t in [30, 35, 40, 45, 50] {
        beat(&mut w, t0 + s(t), &[1, 2, 3]);
        assert!(f.run(&mut w, t0 + s(t + 1)).is_empty());
    }
    // Down again, for good this time: the delay counts from then.
    beat(&mut w, t0 + s(55), &[2, 3]);
    beat(&mut w, t0 + s(60), &[2, 3]);
    assert_eq!(f.run(&mut w, t0 + s(61)), vec![format!("down {}", d(1))]);
    for t in [65, 70, 75, 80] {
        beat(&mut w, t0 + s(t), &[2, 3]);
    }
    assert!(f.run(&mut w, t0 + s(75)).is_empty(), "14 s of a 20 s delay");
    let mut moved = f.run(&mut w, t0 + s(82));
    moved.sort();
    assert_eq!(moved, vec!["failover p/rs0", "failover p/rs1"]);
    let owners: std::collections::BTreeSet<_> = ["p/rs0", "p/rs1"]
        .iter()
        .map(|j| f.state.jobs[&JobId::new(*j).unwrap()].owner().clone())
        .collect();
    assert_eq!(owners.len(), 2, "spread over daemons 2 and 3: {owners:?}");
}

#[test]
fn the_policy_respects_its_rebuild_limit() {
    let mut f = Fleet::new(3, 3);
    let t0 = Instant::now();
    let mut w = Watch::new(settings(Some(Policy {
        max_concurrent_rebuilds: 1,
        ..policy()
    })));
    w.observe(&f.state, t0);
    for t in [5, 10, 15, 20, 25, 30, 35] {
        w.heartbeat(d(2), t0 + s(t));
        w.heartbeat(d(3), t0 + s(t));
    }
    assert_eq!(f.run(&mut w, t0 + s(11)), vec![format!("down {}", d(1))]);
    assert_eq!(f.run(&mut w, t0 + s(32)).len(), 1, "one rebuild at a time");
    assert!(f.run(&mut w, t0 + s(40)).is_empty());
}

#[test]
fn the_guard_pauses_the_policy_when_more_than_its_share_is_down() {
    let mut f = Fleet::new(3, 1);
    let t0 = Instant::now();
    let mut w = Watch::new(settings(Some(policy())));
    w.observe(&f.state, t0);
    for t in [5, 10, 15, 20, 25, 30, 35, 40] {
        w.heartbeat(d(3), t0 + s(t));
    }
    let mut first = f.run(&mut w, t0 + s(11));
    first.sort();
    assert_eq!(
        first,
        vec![format!("down {}", d(1)), format!("down {}", d(2))]
    );
    assert_eq!(f.run(&mut w, t0 + s(12)), vec!["guard"]);
    assert!(
        f.run(&mut w, t0 + s(40)).is_empty(),
        "paused: nothing moves"
    );
    // Daemon 2 comes back: one of three down is under half; the policy resumes.
    w.heartbeat(d(2), t0 + s(41));
    w.heartbeat(d(3), t0 + s(41));
    assert_eq!(f.run(&mut w, t0 + s(42)), vec![format!("up {}", d(2))]);
    // The guard lifts first; the move waits until the state says it has (sent together,
    // the move could land while FAILOVER_PAUSED is still open).
    assert_eq!(f.run(&mut w, t0 + s(43)), vec!["guard"]);
    assert_eq!(f.run(&mut w, t0 + s(44)), vec!["failover p/rs0"]);
}

#[test]
fn a_move_without_progress_is_stuck_and_progress_resets_the_clock() {
    let mut f = Fleet::new(2, 1);
    f.apply(Command::MoveJob(MoveJob {
        job: JobId::new("p/rs0").unwrap(),
        to: d(2),
        reason: None,
        dry_run: false,
    }));
    let t0 = Instant::now();
    let mut w = Watch::new(Settings {
        threshold: Duration::from_secs(1000),
        ..settings(None)
    });
    w.observe(&f.state, t0);
    let job = JobId::new("p/rs0").unwrap();
    let epoch = f.state.jobs[&job].epoch;
    let at = |epoch, phase, entries| Progress {
        move_id: "m".into(),
        job: job.clone(),
        daemon: d(2),
        epoch,
        phase,
        snapshot_bytes: 100,
        snapshot_total: 100,
        entries_applied: entries,
        lag_ms: 0,
        done: None,
    };
    w.progress(
        &f.state,
        &at(epoch, MovePhase::RestoringSnapshot, 0),
        t0 + s(10),
    );
    w.progress(
        &f.state,
        &at(epoch, MovePhase::ReplayingOplog, 5),
        t0 + s(20),
    );
    // A report from a daemon that lost the job (an older epoch) is no progress.
    w.progress(
        &f.state,
        &at(epoch - 1, MovePhase::ReplayingOplog, 9),
        t0 + s(45),
    );
    // Nor is a rebuild started over that gets no further than before.
    w.progress(
        &f.state,
        &at(epoch, MovePhase::RestoringSnapshot, 0),
        t0 + s(46),
    );
    w.progress(
        &f.state,
        &at(epoch, MovePhase::ReplayingOplog, 5),
        t0 + s(47),
    );
    assert!(f.run(&mut w, t0 + s(45)).is_empty());
    assert_eq!(f.run(&mut w, t0 + s(51)), vec!["stuck p/rs0"]);
    assert!(f.run(&mut w, t0 + s(60)).is_empty(), "raised once");
}

#[test]
fn a_rebuild_that_goes_further_is_not_stuck() {
    let mut f = Fleet::new(2, 1);
    f.apply(Command::MoveJob(MoveJob {
        job: JobId::new("p/rs0").unwrap(),
        to: d(2),
        reason: None,
        dry_run: false,
    }));
    let t0 = Instant::now();
    let mut w = Watch::new(Settings {
        threshold: Duration::from_secs(1000),
        ..settings(None)
    });
    w.observe(&f.state, t0);
    let job = JobId::new("p/rs0").unwrap();
    let epoch = f.state.jobs[&job].epoch;
    for (t, entries) in [(20, 1), (40, 2), (60, 3)] {
        let p = Progress {
            move_id: "m".into(),
            job: job.clone(),
            daemon: d(2),
            epoch,
            phase: MovePhase::ReplayingOplog,
            snapshot_bytes: 100,
            snapshot_total: 100,
            entries_applied: entries,
            lag_ms: 0,
            done: None,
        };
        w.progress(&f.state, &p, t0 + s(t));
    }
    assert!(
        f.run(&mut w, t0 + s(85)).is_empty(),
        "went further 25 s ago"
    );
    assert_eq!(f.run(&mut w, t0 + s(91)), vec!["stuck p/rs0"]);
}

#[test]
fn a_daemon_heard_again_after_the_delay_is_brought_up_not_failed_over() {
    let mut f = Fleet::new(3, 1);
    let t0 = Instant::now();
    let mut w = Watch::new(settings(Some(policy())));
    w.observe(&f.state, t0);
    for t in [5, 10, 15, 20, 25, 30] {
        w.heartbeat(d(2), t0 + s(t));
        w.heartbeat(d(3), t0 + s(t));
    }
    assert_eq!(f.run(&mut w, t0 + s(11)), vec![format!("down {}", d(1))]);
    // Back just as the 20 s delay ran out: the same tick brings it up and moves nothing.
    w.heartbeat(d(1), t0 + s(31));
    assert_eq!(f.run(&mut w, t0 + s(32)), vec![format!("up {}", d(1))]);
    assert!(f.run(&mut w, t0 + s(33)).is_empty());
}

#[test]
fn a_stall_of_the_monitor_is_not_silence_of_the_daemons() {
    let mut f = Fleet::new(3, 1);
    let t0 = Instant::now();
    let mut w = Watch::new(settings(Some(policy())));
    w.observe(&f.state, t0);
    for n in 1..=3 {
        w.heartbeat(d(n), t0 + s(5));
    }
    // The monitor's loop (or its process) stalls for 25 s: the daemons went on sending
    // heartbeats, which wait unread. Judged before they are read, everybody would be down.
    w.deaf(t0 + s(5), t0 + s(30));
    assert!(
        f.run(&mut w, t0 + s(30)).is_empty(),
        "no DAEMON_DOWN from a stall"
    );
    w.heartbeat(d(2), t0 + s(30));
    w.heartbeat(d(3), t0 + s(30));
    // Daemon 1 was silent for no time heard before the stall; after it, the clock runs.
    assert!(f.run(&mut w, t0 + s(39)).is_empty(), "9 s of listening");
    w.heartbeat(d(2), t0 + s(40));
    w.heartbeat(d(3), t0 + s(40));
    assert_eq!(f.run(&mut w, t0 + s(41)), vec![format!("down {}", d(1))]);
    // The failover delay counts listening time too: a stall of 30 s moves nothing.
    for t in [45, 50, 55] {
        w.heartbeat(d(2), t0 + s(t));
        w.heartbeat(d(3), t0 + s(t));
        assert!(f.run(&mut w, t0 + s(t)).is_empty());
    }
    w.deaf(t0 + s(55), t0 + s(85));
    assert!(
        f.run(&mut w, t0 + s(85)).is_empty(),
        "14 s of a 20 s delay were heard"
    );
    w.heartbeat(d(2), t0 + s(86));
    w.heartbeat(d(3), t0 + s(86));
    assert_eq!(f.run(&mut w, t0 + s(92)), vec!["failover p/rs0"]);
}

#[test]
fn a_command_in_flight_is_not_handed_out_again_until_it_lands() {
    let f = Fleet::new(2, 0);
    let t0 = Instant::now();
    let mut w = Watch::new(settings(None));
    w.observe(&f.state, t0);
    let down = w.due(&f.state, t0 + s(11));
    assert_eq!(down.len(), 2, "daemons 1 and 2 are both silent");
    assert_eq!(w.in_flight(), 2);
    // The command service takes minutes to answer: nothing piles up behind the reports.
    for t in [20, 60, 300] {
        assert!(w.due(&f.state, t0 + s(t)).is_empty(), "at {t} s");
    }
    // They land without being applied (the command service gave up): due again once
    // `resend` has passed since, still one per daemon.
    for d in &down {
        w.landed(&d.key, t0 + s(301));
    }
    assert_eq!(w.in_flight(), 0);
    assert!(w.due(&f.state, t0 + s(301)).is_empty());
    let again = w.due(&f.state, t0 + s(310));
    assert_eq!(again.len(), down.len());
    assert_eq!(again[0].key, down[0].key);
}

/// Every daemon beats each second; `who` beat at each of `from..=to` seconds, and the
/// monitor judges after each.
fn beat_and_judge(
    f: &mut Fleet,
    w: &mut Watch,
    t0: Instant,
    from: u64,
    to: u64,
    who: &[usize],
) -> Vec<(u64, String)> {
    let mut due = Vec::new();
    for t in from..=to {
        for n in who {
            w.heartbeat(d(*n), t0 + s(t));
        }
        due.extend(f.run(w, t0 + s(t)).into_iter().map(|c| (t, c)));
    }
    due
}

/// The heartbeat bucket's stream loses its leader: for 15 s every daemon's heartbeat put
/// fails, so nobody is heard, longer than the 10 s threshold. A silence every daemon
/// shares is the bucket's, not theirs: nobody is reported down. Once heartbeats come
/// again, a daemon that then falls silent is found down after the threshold as usual.
#[test]
fn a_silence_every_daemon_shares_is_not_theirs() {
    let mut f = Fleet::new(3, 1);
    let t0 = Instant::now();
    let mut w = Watch::new(settings(Some(policy())));
    w.observe(&f.state, t0);
    assert!(beat_and_judge(&mut f, &mut w, t0, 1, 10, &[1, 2, 3]).is_empty());
    for t in 11..=25 {
        assert!(f.run(&mut w, t0 + s(t)).is_empty(), "reported at {t} s");
    }
    assert!(beat_and_judge(&mut f, &mut w, t0, 26, 30, &[1, 2, 3]).is_empty());
    // Daemon 1 stops for good at 30 s; the others go on.
    let due = beat_and_judge(&mut f, &mut w, t0, 31, 45, &[2, 3]);
    assert_eq!(due, vec![(41, format!("down {}", d(1)))]);
}

/// Every daemon is lost at once. Their shared silence counts as the monitor's only up to
/// the cap (30 s here): each is reported down once the threshold has passed beyond it.
#[test]
fn the_loss_of_every_daemon_at_once_is_still_reported() {
    let mut f = Fleet::new(3, 1);
    let t0 = Instant::now();
    let mut w = Watch::new(settings(None));
    w.observe(&f.state, t0);
    assert_eq!(w.shared_cap(), s(30));
    assert!(beat_and_judge(&mut f, &mut w, t0, 1, 10, &[1, 2, 3]).is_empty());
    // Three missed heartbeats (13 s) start the shared silence; 30 s of it are the
    // monitor's; then 10 s of the daemons' own.
    for t in 11..=50 {
        assert!(f.run(&mut w, t0 + s(t)).is_empty(), "reported at {t} s");
    }
    let mut down = f.run(&mut w, t0 + s(51));
    down.sort();
    assert_eq!(
        down,
        (1..=3)
            .map(|n| format!("down {}", d(n)))
            .collect::<Vec<_>>()
    );
}

/// Until each daemon that is up has a usual spacing (two heartbeats heard in full), no
/// silence is shared: daemon 3 has beaten once when nobody is heard any more, so the
/// silence of all three is judged on the threshold alone.
#[test]
fn no_silence_is_shared_before_every_spacing_is_known() {
    let mut f = Fleet::new(3, 0);
    let t0 = Instant::now();
    let mut w = Watch::new(settings(None));
    w.observe(&f.state, t0);
    assert!(beat_and_judge(&mut f, &mut w, t0, 1, 9, &[1, 2]).is_empty());
    assert!(beat_and_judge(&mut f, &mut w, t0, 10, 10, &[1, 2, 3]).is_empty());
    assert!(f.run(&mut w, t0 + s(20)).is_empty());
    let mut down = f.run(&mut w, t0 + s(21));
    down.sort();
    assert_eq!(
        down,
        (1..=3)
            .map(|n| format!("down {}", d(n)))
            .collect::<Vec<_>>()
    );
}

/// A watch of the heartbeat bucket whose server died can stall without ending: when
/// nobody is heard for a quarter of the threshold (2.5 s here), the shell watches the
/// bucket again, and again after each as long, until a heartbeat comes.
#[test]
fn the_heartbeat_watch_is_made_again_when_nobody_is_heard() {
    let mut f = Fleet::new(2, 0);
    let t0 = Instant::now();
    let mut w = Watch::new(settings(None));
    w.observe(&f.state, t0);
    assert!(beat_and_judge(&mut f, &mut w, t0, 1, 10, &[1, 2]).is_empty());
    let ms = |n: u64| t0 + Duration::from_millis(n);
    assert!(!w.rewatch(ms(12_000)));
    assert!(w.rewatch(ms(12_500)));
    assert!(!w.rewatch(ms(13_000)), "once per quarter threshold");
    assert!(w.rewatch(ms(15_000)));
    w.heartbeat(d(1), ms(16_000));
    assert!(!w.rewatch(ms(18_000)));
    assert!(w.rewatch(ms(18_500)));
}

/// Three of four daemons fall silent at once. Two DAEMON_DOWN reports land; the third
/// is still on its way when the policy's delay has run out. With two of four down the
/// command service would accept a failover (half is not more than half), so the policy
/// waits for every liveness report in flight: when the third lands, the guard pauses it
/// and nothing was moved.
#[test]
fn the_policy_waits_while_a_liveness_report_is_on_its_way() {
    let mut f = Fleet::new(4, 1);
    let t0 = Instant::now();
    let mut w = Watch::new(settings(Some(policy())));
    w.observe(&f.state, t0);
    for t in (1..=60).map(|t| t0 + s(t)) {
        w.heartbeat(d(4), t);
    }
    let downs = w.due(&f.state, t0 + s(11));
    assert_eq!(downs.len(), 3, "daemons 1, 2 and 3 are silent");
    let (slow, landed) = downs.split_last().expect("three reports");
    for due in landed {
        f.apply(due.command.clone());
        w.landed(&due.key, t0 + s(11));
    }
    // The delay (20 s) runs out for the two already down, with the third report still
    // in flight.
    let meanwhile: Vec<String> = w
        .due(&f.state, t0 + s(35))
        .iter()
        .map(|d| describe(&d.command))
        .collect();
    assert!(
        meanwhile.iter().all(|c| !c.starts_with("failover")),
        "moved while a liveness report was on its way: {meanwhile:?}"
    );
    f.apply(slow.command.clone());
    w.landed(&slow.key, t0 + s(36));
    assert_eq!(
        f.run(&mut w, t0 + s(37)),
        vec!["guard"],
        "paused, nothing moved"
    );
}

//! Lost daemons, end to end: four daemons, the agent, a projector and the monitor with
//! automatic failover on, all real processes; daemons are frozen with SIGSTOP (a server
//! that stops answering) and thawed with SIGCONT. The story runs once and records what
//! happened; each test asserts one rule on the record.
//!
//! 1. Daemon 2 is frozen until the monitor declares it DAEMON_DOWN, then thawed: DAEMON_UP,
//!    and nothing moves (it came back within the policy's delay).
//! 2. Daemons 2, 3 and 4 are frozen (3 of 4, over the 50% guard): FAILOVER_PAUSED, and
//!    nothing moves while the delay runs out. Meanwhile an operator moves a job of
//!    daemon 1 to the frozen daemon 4: MOVE_STUCK, then the operator fails the move
//!    (THEFT_FAILED).
//! 3. Daemons 2 and 3 are thawed: the guard lifts and the policy moves daemon 4's two
//!    jobs, one to each of two daemons; their heads are rebuilt and checked against the
//!    source.
//! 4. Daemon 4 is thawed: fenced, it writes no snapshot and no head position of the jobs
//!    it lost, and lets their heads go.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use futures::StreamExt;
use handoff_dataplane::store::{HeadRecord, SnapshotMeta, Stores};
use handoff_dataplane::Ts;
use handoff_domain::alert::AlertKind;
use handoff_domain::auth::Role;
use handoff_domain::command::CompleteJobMove;
use handoff_domain::event::FailoverInputs;
use handoff_domain::model::HeadPoint;
use handoff_domain::{Command, CommandId, DaemonId, Event, JobId};
use handoff_eventlog::Recorded;
use handoff_protocol::now_ms;
use handoff_protocol::views::AlertView;
use handoff_protocol::ErrorBody;
use handoff_tests::*;
use serde_json::Value;

/// An hour of schedule lasts this long here: a 6-hour interval is 1.8 s.
const HOUR_MS: u64 = 300;
/// The monitor's threshold, the policy's delay, and MOVE_STUCK's threshold, in seconds.
const DOWN_AFTER: u64 = 2;
const DELAY: u64 = 4;
const STUCK_AFTER: u64 = 5;

/// A moved job: where it went, by which decision, and its rebuilt head.
#[derive(Debug)]
struct Moved {
    job: JobId,
    to: DaemonId,
    actor: String,
    inputs: FailoverInputs,
    epoch: u64,
    head: Option<HeadPoint>,
    source_at_head: Option<String>,
}

#[derive(Debug)]
struct Story {
    daemons: Vec<DaemonId>,
    /// Phase 1.
    froze_2_at: u64,
    down_2: Recorded,
    up_2: Recorded,
    alerts_while_2_down: Vec<AlertView>,
    daemons_while_2_down: Value,
    alerts_after_2_up: Vec<AlertView>,
    /// Phase 2.
    paused: Recorded,
    alerts_while_paused: Vec<AlertView>,
    /// How long daemon 2 had been silent when the pause was checked (server's clock).
    silent_when_checked_ms: u64,
    stuck: Recorded,
    stuck_job: JobId,
    stuck_move: CommandId,
    stuck_epoch: u64,
    theft_failed: Recorded,
    /// Phase 3.
    resumed: Recorded,
    moved: Vec<Moved>,
    /// Phase 4.
    froze_4_at: u64,
    snapshots_after: Vec<SnapshotMeta>,
    heads_after: Vec<(JobId, Option<HeadRecord>)>,
    fences_after: Vec<(JobId, u64)>,
    /// Every head position stored, by anyone, from just before daemon 4 was thawed.
    head_writes_after: Vec<HeadRecord>,
    stale_completion: Result<(), ErrorBody>,
    daemon_4_log: String,
    events: Vec<Recorded>,
}

static STORY: OnceLock<Result<Story, String>> = OnceLock::new();

fn story() -> &'static Story {
    story_once(&STORY, || async {
        let mut keep = Keep::default();
        let record = run_story(&mut keep).await;
        (record, keep)
    })
}

/// How long each step may wait for the monitor or the policy to act.
const LIMIT: Duration = Duration::from_secs(DOWN_AFTER + 10);

fn alerts(url: &str, all: bool) -> Result<Vec<AlertView>> {
    let mut args = vec!["--json", "alerts", "--all"];
    if all {
        args.push("--closed");
    }
    Ok(serde_json::from_value(
        handoff_ok(url, &args)?.json()?["items"].take(),
    )?)
}

/// How long ago daemon `d`'s last heartbeat reached the bucket, by the server's clock.
async fn silence_ms(stores: &Stores, d: &DaemonId) -> Result<u64> {
    let token = handoff_protocol::subjects::daemon_key(d);
    let entry = stores
        .heartbeats
        .entry(token)
        .await?
        .ok_or_else(|| anyhow!("no heartbeat of {d}"))?;
    Ok(now_ms().saturating_sub(handoff_dataplane::store::time_ms(entry.created)))
}

fn is_failover(r: &Recorded) -> bool {
    matches!(r.envelope.event, Event::FailoverDecided { .. })
}

/// The fleet's state folded from `events`.
fn state_of(events: &[Recorded]) -> handoff_domain::State {
    let mut s = handoff_domain::State::default();
    for r in events {
        s.apply(&r.envelope.event);
    }
    s
}

/// The jobs daemon `d` owns after `events`.
fn jobs_of(events: &[Recorded], d: &DaemonId) -> Vec<JobId> {
    state_of(events).daemons[d].jobs.iter().cloned().collect()
}

/// The story's running parts: the stack and its stores, the projector, the agent and
/// the four daemons, their heads and logs under `root`.
struct Fleet {
    stack: Stack,
    stores: Stores,
    root: PathBuf,
    /// Daemon `n`'s credentials file is at `n - 1`.
    daemon_creds: Vec<PathBuf>,
    /// Daemon `n` is at `n - 1`.
    daemons: Vec<Proc>,
    agent: Proc,
    projector: ProjectorProcess,
}

impl Fleet {
    fn url(&self) -> String {
        self.stack.url()
    }

    fn id(&self, n: usize) -> DaemonId {
        daemon_id(&self.root, n)
    }

    /// Daemon `n` stops answering (SIGSTOP), as a server that is lost.
    fn freeze(&mut self, n: usize) -> Result<()> {
        self.daemons[n - 1].signal(Signal::Stop)
    }

    /// Daemon `n` comes back (SIGCONT).
    fn thaw(&mut self, n: usize) -> Result<()> {
        self.daemons[n - 1].signal(Signal::Cont)
    }

    /// The first event (from the start) that `pred` accepts, waiting up to [`LIMIT`].
    async fn first(&self, what: &str, pred: impl Fn(&Event) -> bool) -> Result<Recorded> {
        first_event(&self.stack, what, LIMIT, |r| pred(&r.envelope.event)).await
    }

    /// The first DAEMON_DOWN of daemon `n`.
    async fn daemon_down(&self, n: usize) -> Result<Recorded> {
        let id = self.id(n);
        self.first(
            &format!("DAEMON_DOWN of daemon {n}"),
            |e| matches!(e, Event::DaemonDown { daemon } if *daemon == id),
        )
        .await
    }

    /// The first DAEMON_UP of daemon `n`.
    async fn daemon_up(&self, n: usize) -> Result<Recorded> {
        let id = self.id(n);
        self.first(
            &format!("DAEMON_UP of daemon {n}"),
            |e| matches!(e, Event::DaemonUp { daemon } if *daemon == id),
        )
        .await
    }

    /// Waits until the projector has folded every event appended so far.
    async fn settle(&self) -> Result<()> {
        let seq = self.stack.last_seq().await?;
        wait_for_checkpoint(&self.stack.client, seq).await?;
        Ok(())
    }
}

/// Daemon `n`'s id, `d<n>.lost:<its head directory under root>/`.
fn daemon_id(root: &Path, n: usize) -> DaemonId {
    let head = root.join(format!("heads{n}"));
    DaemonId::new(format!("d{n}.lost:{}/", head.display())).expect("a valid daemon id")
}

async fn run_story(keep: &mut Keep) -> Result<Story> {
    let dir = tempfile::tempdir()?;
    let root = dir.path().to_path_buf();
    let result = play(keep, &root).await;
    keep.dir(dir);
    // A failed story says what the monitor and the daemons logged.
    result.map_err(|e| {
        let mut logs = String::new();
        for name in ["monitor", "daemon2", "daemon4"] {
            let log = std::fs::read_to_string(root.join(format!("{name}.log"))).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            logs.push_str(&format!(
                "\n--- {name}.log (last lines, newest first)\n{}",
                tail.join("\n")
            ));
        }
        e.context(logs)
    })
}

/// The story's four steps (see the module's documentation), recorded.
async fn play(keep: &mut Keep, root: &Path) -> Result<Story> {
    let mut fleet = start_the_fleet(root).await?;
    give_each_daemon_two_jobs(&fleet).await?;
    let monitor = start_the_monitor(&fleet).await?;
    let flap = lose_daemon_2_for_a_moment(&mut fleet).await?;
    let pause = lose_three_of_four(&mut fleet).await?;
    let theft = give_up_the_stuck_move(&fleet, &pause.stuck_job).await?;
    let failover = bring_two_back(&mut fleet).await?;
    let fenced = bring_daemon_4_back(&mut fleet, &failover.jobs, &pause, theft.epoch).await?;
    let events = fleet.stack.events().await?;
    let daemons = (1..=4).map(|n| fleet.id(n)).collect();
    let Fleet {
        stack,
        daemons: processes,
        agent,
        projector,
        ..
    } = fleet;
    for p in processes {
        keep.process(p);
    }
    keep.process(agent).process(monitor).process(projector);
    keep.stack(stack);
    Ok(Story {
        daemons,
        froze_2_at: flap.froze_at,
        down_2: flap.down,
        up_2: flap.up,
        alerts_while_2_down: flap.alerts_while_down,
        daemons_while_2_down: flap.daemons_while_down,
        alerts_after_2_up: flap.alerts_after_up,
        paused: pause.paused,
        alerts_while_paused: pause.alerts,
        silent_when_checked_ms: pause.silent_when_checked_ms,
        stuck: pause.stuck,
        stuck_job: pause.stuck_job,
        stuck_move: pause.stuck_move,
        stuck_epoch: theft.epoch,
        theft_failed: theft.failed,
        resumed: failover.resumed,
        moved: failover.moved,
        froze_4_at: pause.froze_4_at,
        snapshots_after: fenced.snapshots,
        heads_after: fenced.heads,
        fences_after: fenced.fences,
        head_writes_after: fenced.head_writes,
        stale_completion: fenced.stale_completion,
        daemon_4_log: fenced.log,
        events,
    })
}

/// A stack with the schedule's short hours, a projector, the users of the daemons, the
/// agent and the monitor, the agent, and four daemons, each registered.
async fn start_the_fleet(root: &Path) -> Result<Fleet> {
    let (stack, stores) = data_stack(HOUR_MS).await?;
    let url = stack.url();
    let projector = ProjectorProcess::spawn(&url, &root.join("views"), &[])?;
    let mut daemon_creds: Vec<PathBuf> = Vec::new();
    for n in 1..=4 {
        let user = stack
            .user(
                &format!("d{n}"),
                &[Role::BackupDaemon],
                Some(daemon_id(root, n)),
            )
            .await?;
        daemon_creds.push(user.1);
    }
    let agent_creds = stack.user("agent", &[Role::BackupAgent], None).await?.1;
    let agent = Proc::spawn(
        &url,
        root,
        "agent",
        &agent_creds,
        &[
            "agent",
            "--ops-per-sec",
            "100",
            "--slice-ms",
            "200",
            "--groom-ms",
            "500",
            "--initial-size",
            "64KiB",
            "--doc-size",
            "128",
        ],
    )?;
    let mut daemons = Vec::new();
    for n in 1..=4 {
        daemons.push(Proc::daemon(
            &url,
            root,
            &format!("daemon{n}"),
            &daemon_creds[n - 1],
            &daemon_id(root, n),
            "2",
            "200",
        )?);
    }
    for n in 1..=4 {
        let id = daemon_id(root, n);
        first_event(&stack, &format!("daemon {n} to register"), TIMEOUT, |r| {
            matches!(&r.envelope.event, Event::DaemonRegistered { daemon, .. } if *daemon == id)
        })
        .await?;
    }
    Ok(Fleet {
        stack,
        stores,
        root: root.to_path_buf(),
        daemon_creds,
        daemons,
        agent,
        projector,
    })
}

/// Two replica sets per daemon (placement takes the least loaded), every head built and
/// snapshotted once before anything is lost.
async fn give_each_daemon_two_jobs(fleet: &Fleet) -> Result<()> {
    let stack = &fleet.stack;
    stack.apply(configure_project("p")).await?;
    for k in 1..=8 {
        stack.apply(replica_set("p", &format!("rs{k}"), 1)).await?;
    }
    let events = stack.events().await?;
    for n in 1..=4 {
        if jobs_of(&events, &fleet.id(n)).len() != 2 {
            bail!("daemon {n} should own two jobs");
        }
    }
    until(
        "every job to have a daemon's snapshot",
        TIMEOUT * 2,
        || async {
            let snaps = fleet.stores.snapshots(None).await?;
            Ok((1..=8)
                .all(|k| {
                    snaps
                        .iter()
                        .any(|s| s.job.as_str() == format!("p/rs{k}") && s.daemon.is_some())
                })
                .then_some(()))
        },
    )
    .await
}

/// The monitor with automatic failover on, as the `failover-policy` user.
async fn start_the_monitor(fleet: &Fleet) -> Result<Proc> {
    let stack = &fleet.stack;
    let monitor_creds = stack.user("monitor", &[Role::BackupMonitor], None).await?.1;
    let policy_creds = stack
        .user("failover-policy", &[Role::BackupMonitor], None)
        .await?
        .1;
    Proc::spawn(
        &fleet.url(),
        &fleet.root,
        "monitor",
        &monitor_creds,
        &[
            "monitor",
            "--down-after",
            &format!("{DOWN_AFTER}s"),
            "--move-stuck-after",
            &format!("{STUCK_AFTER}s"),
            "--failover",
            "--failover-delay",
            &format!("{DELAY}s"),
            "--max-concurrent-rebuilds",
            "2",
            "--max-down",
            "50",
            "--policy-creds",
            policy_creds.to_str().unwrap_or_default(),
        ],
    )
}

/// Step 1, recorded.
struct Flap {
    froze_at: u64,
    down: Recorded,
    up: Recorded,
    alerts_while_down: Vec<AlertView>,
    daemons_while_down: Value,
    alerts_after_up: Vec<AlertView>,
}

/// Step 1: Daemon 2 is lost for a moment: frozen until DAEMON_DOWN, then thawed.
async fn lose_daemon_2_for_a_moment(fleet: &mut Fleet) -> Result<Flap> {
    let url = fleet.url();
    let froze_at = now_ms();
    fleet.freeze(2)?;
    let down = fleet.daemon_down(2).await?;
    fleet.settle().await?;
    let alerts_while_down = alerts(&url, false)?;
    let daemons_while_down = handoff_ok(&url, &["--json", "daemons"])?.json()?;
    fleet.thaw(2)?;
    let up = fleet.daemon_up(2).await?;
    wait_for_checkpoint(&fleet.stack.client, up.seq).await?;
    let alerts_after_up = alerts(&url, false)?;
    Ok(Flap {
        froze_at,
        down,
        up,
        alerts_while_down,
        daemons_while_down,
        alerts_after_up,
    })
}

/// Step 2, recorded.
struct Pause {
    froze_4_at: u64,
    paused: Recorded,
    alerts: Vec<AlertView>,
    silent_when_checked_ms: u64,
    stuck: Recorded,
    stuck_job: JobId,
    stuck_move: CommandId,
}

/// Step 2: Three of four lost at once; an operator's move to one of them meanwhile. The
/// policy pauses, and the delay runs out while it is paused.
async fn lose_three_of_four(fleet: &mut Fleet) -> Result<Pause> {
    let url = fleet.url();
    for n in [2, 3, 4] {
        fleet.freeze(n)?;
    }
    let froze_4_at = now_ms();
    let stuck_job = jobs_of(&fleet.stack.events().await?, &fleet.id(1))[0].clone();
    let moved = handoff_ok(
        &url,
        &[
            "--json",
            "move-job",
            stuck_job.as_str(),
            "--to",
            fleet.id(4).as_str(),
        ],
    )?
    .json()?;
    let stuck_move = CommandId::new(
        moved["command"]
            .as_str()
            .ok_or_else(|| anyhow!("no move id in {moved}"))?,
    )?;
    let paused = fleet
        .first("FAILOVER_PAUSED", |e| {
            matches!(e, Event::FailoverPaused { .. })
        })
        .await?;
    let stuck = fleet
        .first(
            "MOVE_STUCK",
            |e| matches!(e, Event::MoveStuck { job, .. } if *job == stuck_job),
        )
        .await?;
    // The delay runs out while paused: wait until daemon 2 has been silent for the
    // threshold, the delay and a second more, on the server's clock.
    let wait = (DOWN_AFTER + DELAY + 1) * 1000;
    let d2 = fleet.id(2);
    until("the policy's delay to run out", LIMIT, || async {
        Ok((silence_ms(&fleet.stores, &d2).await? > wait).then_some(()))
    })
    .await?;
    let silent_when_checked_ms = silence_ms(&fleet.stores, &d2).await?;
    fleet.settle().await?;
    let alerts = alerts(&url, false)?;
    Ok(Pause {
        froze_4_at,
        paused,
        alerts,
        silent_when_checked_ms,
        stuck,
        stuck_job,
        stuck_move,
    })
}

/// The stuck move given up.
struct Theft {
    /// The job's epoch while it was stuck.
    epoch: u64,
    failed: Recorded,
}

/// The operator gives up on the stuck move: the job goes back to daemon 1.
async fn give_up_the_stuck_move(fleet: &Fleet, stuck_job: &JobId) -> Result<Theft> {
    let epoch = state_of(&fleet.stack.events().await?).jobs[stuck_job].epoch;
    handoff_ok(
        &fleet.url(),
        &[
            "fail-move",
            stuck_job.as_str(),
            "--reason",
            "destination frozen",
        ],
    )?;
    let failed = fleet
        .first(
            "THEFT_FAILED",
            |e| matches!(e, Event::JobMoveFailed { job, .. } if job == stuck_job),
        )
        .await?;
    Ok(Theft { epoch, failed })
}

/// Step 3, recorded.
struct Failover {
    resumed: Recorded,
    /// Daemon 4's jobs, which the policy moved.
    jobs: Vec<JobId>,
    moved: Vec<Moved>,
}

/// Step 3: Two come back: the guard lifts, and daemon 4's jobs move and complete.
async fn bring_two_back(fleet: &mut Fleet) -> Result<Failover> {
    let d4 = fleet.id(4);
    let jobs = jobs_of(&fleet.stack.events().await?, &d4);
    fleet.thaw(2)?;
    fleet.thaw(3)?;
    let resumed = fleet
        .first("FAILOVER_RESUMED", |e| {
            matches!(e, Event::FailoverResumed { .. })
        })
        .await?;
    until(
        "daemon 4's jobs to move and complete",
        TIMEOUT * 2,
        || async {
            let events = fleet.stack.events().await?;
            Ok(jobs
                .iter()
                .all(|j| {
                    events.iter().any(|r| {
                        matches!(&r.envelope.event, Event::JobMoveCompleted { job, daemon, .. }
                    if job == j && *daemon != d4)
                    })
                })
                .then_some(()))
        },
    )
    .await?;
    let moved = record_the_failovers(fleet, &jobs).await?;
    Ok(Failover {
        resumed,
        jobs,
        moved,
    })
}

/// Each of `jobs` as the policy moved it: its decision, its completion, and the source's
/// checksum at the rebuilt head's timestamp.
async fn record_the_failovers(fleet: &Fleet, jobs: &[JobId]) -> Result<Vec<Moved>> {
    let events = fleet.stack.events().await?;
    let mut moved = Vec::new();
    for j in jobs {
        let decided = events
            .iter()
            .find(|r| matches!(&r.envelope.event, Event::FailoverDecided { job, .. } if job == j))
            .ok_or_else(|| anyhow!("no FailoverDecided for {j}"))?;
        let Event::FailoverDecided { to, inputs, .. } = &decided.envelope.event else {
            unreachable!()
        };
        let (epoch, head) = events
            .iter()
            .rev()
            .find_map(|r| match &r.envelope.event {
                Event::JobMoveCompleted {
                    job, epoch, head, ..
                } if job == j => Some((*epoch, head.clone())),
                _ => None,
            })
            .ok_or_else(|| anyhow!("{j} did not complete"))?;
        let scan = scan_oplog(&fleet.stores, j).await?;
        let source_at_head = head
            .as_ref()
            .and_then(|h| h.ts.parse::<Ts>().ok())
            .and_then(|ts| scan.source_at.get(&ts))
            .map(|c| c.to_string());
        moved.push(Moved {
            job: j.clone(),
            to: to.clone(),
            actor: decided.envelope.actor.to_string(),
            inputs: inputs.clone(),
            epoch,
            head,
            source_at_head,
        });
    }
    Ok(moved)
}

/// Step 4, recorded.
struct Fenced {
    snapshots: Vec<SnapshotMeta>,
    heads: Vec<(JobId, Option<HeadRecord>)>,
    fences: Vec<(JobId, u64)>,
    head_writes: Vec<HeadRecord>,
    stale_completion: Result<(), ErrorBody>,
    log: String,
}

/// Step 4: Daemon 4 comes back, having lost everything (`lost`, and the stuck move's job):
/// it lets their heads go, and a completion of the failed move signed by it with its old
/// epoch (`stuck_epoch`) is refused.
async fn bring_daemon_4_back(
    fleet: &mut Fleet,
    lost: &[JobId],
    pause: &Pause,
    stuck_epoch: u64,
) -> Result<Fenced> {
    // Every head position written from here on, also one overwritten right after: a
    // write of daemon 4's must be refused, not merely written over.
    let js = async_nats::jetstream::new(fleet.stack.client.clone());
    let mut writes = js
        .get_key_value(handoff_eventlog::fence::BUCKET)
        .await?
        .watch("head.>")
        .await?;
    let (written, mut head_writes) = tokio::sync::mpsc::unbounded_channel();
    let recorder = tokio::spawn(async move {
        while let Some(Ok(entry)) = writes.next().await {
            if let Ok(record) = serde_json::from_slice::<HeadRecord>(&entry.value) {
                // Ignored: the receiver goes only once the story has read what it needs.
                let _ = written.send(record);
            }
        }
    });
    fleet.thaw(4)?;
    fleet.daemon_up(4).await?;
    let every: Vec<&JobId> = lost.iter().chain([&pause.stuck_job]).collect();
    let log4 = fleet.root.join("daemon4.log");
    until("daemon 4 to let go of its old jobs", LIMIT, || async {
        let log = std::fs::read_to_string(&log4)?;
        Ok(every
            .iter()
            .all(|j| {
                log.lines()
                    .any(|l| l.contains(j.as_str()) && l.contains("dropping its head"))
            })
            .then_some(()))
    })
    .await?;
    let d4 = handoff_protocol::auth::Credentials::load(&fleet.daemon_creds[3])?;
    let stale_completion = send_command(
        &fleet.stack.client,
        &d4,
        &new_id(),
        &Command::CompleteJobMove(CompleteJobMove {
            job: pause.stuck_job.clone(),
            move_id: pause.stuck_move.clone(),
            epoch: stuck_epoch,
            head: None,
        }),
    )
    .await?
    .map(|_| ());
    recorder.abort();
    let mut head_writes_seen = Vec::new();
    while let Ok(record) = head_writes.try_recv() {
        head_writes_seen.push(record);
    }
    let stores = &fleet.stores;
    let snapshots = stores.snapshots(None).await?;
    let mut heads = Vec::new();
    let mut fences = Vec::new();
    for j in every {
        heads.push((j.clone(), stores.head(j).await?));
        fences.push((j.clone(), stores.fences.read(j).await?.epoch));
    }
    Ok(Fenced {
        snapshots,
        heads,
        fences,
        head_writes: head_writes_seen,
        stale_completion,
        log: std::fs::read_to_string(&log4)?,
    })
}

fn open_alert<'a>(alerts: &'a [AlertView], kind: AlertKind, about: &str) -> Option<&'a AlertView> {
    alerts
        .iter()
        .find(|a| a.kind == kind && a.about == about && a.is_open())
}

#[test]
fn the_threshold_crossed_raises_daemon_down_and_a_heartbeat_brings_it_back() {
    let s = story();
    let d2 = &s.daemons[1];
    // Judged on the monitor's clock: not before the threshold (less the last heartbeat's
    // interval), not much after.
    let after = s.down_2.envelope.at.saturating_sub(s.froze_2_at);
    assert!(
        (DOWN_AFTER * 1000 - 300..DOWN_AFTER * 1000 + 3000).contains(&after),
        "DAEMON_DOWN {after} ms after the freeze"
    );
    assert_eq!(s.down_2.envelope.actor.as_str(), "monitor");
    let alert = open_alert(&s.alerts_while_2_down, AlertKind::DaemonDown, d2.as_str())
        .unwrap_or_else(|| panic!("no open DAEMON_DOWN in {:?}", s.alerts_while_2_down));
    assert_eq!(alert.raised_seq, s.down_2.seq);
    let listed = s.daemons_while_2_down["items"].as_array().expect("a list");
    let row = listed
        .iter()
        .find(|d| d["daemon"] == d2.as_str())
        .expect("daemon 2 listed");
    assert_eq!(row["status"]["liveness"], "down", "{row}");
    assert!(
        row["heartbeat_age_ms"].as_u64().unwrap_or(0) >= DOWN_AFTER * 1000 - 300,
        "{row}"
    );
    let up_row = listed
        .iter()
        .find(|d| d["daemon"] == s.daemons[0].as_str())
        .expect("daemon 1 listed");
    assert!(
        up_row["heartbeat_age_ms"].as_u64().unwrap_or(u64::MAX) < 2000,
        "{up_row}"
    );
    assert!(s.up_2.seq > s.down_2.seq);
    assert!(open_alert(&s.alerts_after_2_up, AlertKind::DaemonDown, d2.as_str()).is_none());
}

#[test]
fn a_daemon_back_within_the_delay_keeps_its_jobs() {
    let s = story();
    let d2 = &s.daemons[1];
    assert!(
        !s.events.iter().any(|r| matches!(&r.envelope.event,
            Event::FailoverDecided { from, .. } if from == d2)),
        "the policy moved a job of daemon 2, which came back"
    );
    assert!(
        s.up_2.envelope.at - s.down_2.envelope.at < DELAY * 1000,
        "the flap lasted longer than the delay"
    );
}

#[test]
fn too_many_daemons_down_pause_the_policy_with_an_alert() {
    let s = story();
    let Event::FailoverPaused {
        down,
        active,
        max_down_percent,
    } = &s.paused.envelope.event
    else {
        unreachable!()
    };
    assert_eq!((down.len(), *active, *max_down_percent), (3, 4, 50));
    assert_eq!(s.paused.envelope.actor.as_str(), "failover-policy");
    assert!(open_alert(&s.alerts_while_paused, AlertKind::FailoverPaused, "fleet").is_some());
    for d in &s.daemons[1..] {
        assert!(open_alert(&s.alerts_while_paused, AlertKind::DaemonDown, d.as_str()).is_some());
    }
    assert!(s.silent_when_checked_ms > (DOWN_AFTER + DELAY) * 1000);
    assert!(
        !s.events
            .iter()
            .any(|r| is_failover(r) && r.seq < s.resumed.seq),
        "the policy moved a job while paused"
    );
    assert!(s.resumed.seq > s.paused.seq);
}

#[test]
fn a_move_to_a_frozen_daemon_is_stuck_and_failing_it_raises_theft_failed() {
    let s = story();
    let Event::MoveStuck { move_id, .. } = &s.stuck.envelope.event else {
        unreachable!()
    };
    assert_eq!(move_id, &s.stuck_move);
    assert!(open_alert(
        &s.alerts_while_paused,
        AlertKind::MoveStuck,
        s.stuck_job.as_str()
    )
    .is_some());
    assert!(s.theft_failed.seq > s.stuck.seq);
    // The job went back to daemon 1 with a new epoch, and no automatic move touched it.
    let Event::JobMoveFailed {
        returned_to, epoch, ..
    } = &s.theft_failed.envelope.event
    else {
        unreachable!()
    };
    assert_eq!(returned_to, &s.daemons[0]);
    assert!(*epoch > s.stuck_epoch);
}

#[test]
fn automatic_failover_moves_the_down_daemons_jobs_spread_and_rebuilt() {
    let s = story();
    assert_eq!(s.moved.len(), 2);
    for m in &s.moved {
        assert_eq!(m.actor, "failover-policy", "{m:?}");
        assert_eq!(m.inputs.candidates.first().map(|c| &c.daemon), Some(&m.to));
        assert!(m.inputs.down_for_ms >= DELAY * 1000, "{m:?}");
        assert!(m.to != s.daemons[3], "{m:?}");
        let head = m
            .head
            .as_ref()
            .unwrap_or_else(|| panic!("{m:?}: no head point"));
        assert_eq!(
            Some(&head.checksum),
            m.source_at_head.as_ref(),
            "{}: the rebuilt head differs from the source at {}",
            m.job,
            head.ts
        );
    }
    assert_ne!(s.moved[0].to, s.moved[1].to, "both jobs went to one daemon");
    let started: Vec<_> = s
        .events
        .iter()
        .filter(|r| {
            matches!(
                &r.envelope.event,
                Event::MoveStarted {
                    automatic: true,
                    ..
                }
            )
        })
        .collect();
    assert_eq!(started.len(), 2);
    assert!(started.iter().all(|r| r.seq > s.resumed.seq));
}

#[test]
fn the_thawed_daemon_is_fenced_and_overwrites_nothing() {
    let s = story();
    let d4 = &s.daemons[3];
    let late: Vec<_> = s
        .snapshots_after
        .iter()
        .filter(|m| m.daemon.as_ref() == Some(d4) && m.taken_at_ms > s.froze_4_at)
        .collect();
    assert!(
        late.is_empty(),
        "daemon 4 stored snapshots after it lost its jobs: {late:?}"
    );
    for m in &s.moved {
        let (_, head) = s
            .heads_after
            .iter()
            .find(|(j, _)| *j == m.job)
            .expect("read");
        let head = head.as_ref().expect("a head record");
        assert_eq!((&head.daemon, head.epoch), (&m.to, m.epoch), "{}", m.job);
        let fence = s
            .fences_after
            .iter()
            .find(|(j, _)| *j == m.job)
            .expect("read")
            .1;
        assert!(fence >= m.epoch, "{}: fence {fence}", m.job);
    }
    let (_, stuck_head) = s
        .heads_after
        .iter()
        .find(|(j, _)| *j == s.stuck_job)
        .expect("read");
    if let Some(h) = stuck_head {
        assert_ne!(
            &h.daemon, d4,
            "daemon 4 wrote the head of the job it never got"
        );
    }
    let refused = s
        .stale_completion
        .as_ref()
        .expect_err("a stale completion was applied");
    assert_eq!(refused.reason, "move_not_in_progress", "{refused:?}");
    assert!(
        !s.events.iter().any(|r| matches!(&r.envelope.event,
            Event::JobMoveCompleted { daemon, .. } if daemon == d4)),
        "daemon 4 completed a move after it was fenced"
    );
    assert!(
        s.daemon_4_log.contains("dropping its head"),
        "daemon 4's log: {}",
        s.daemon_4_log
    );
    // Refused, not overwritten: no head position of daemon 4's was stored while it was
    // back, even for a moment.
    let stored: Vec<_> = s
        .head_writes_after
        .iter()
        .filter(|h| &h.daemon == d4)
        .collect();
    assert!(
        stored.is_empty(),
        "daemon 4's head positions were stored: {stored:?}"
    );
    // The fences fired: each refusal daemon 4 met is logged once, and is of a job it
    // lost; its start of the stuck move's job, at the move's epoch, was one.
    let lost: Vec<&JobId> = s
        .moved
        .iter()
        .map(|m| &m.job)
        .chain([&s.stuck_job])
        .collect();
    let refusals: Vec<&str> = s
        .daemon_4_log
        .lines()
        .filter(|l| l.contains("the job is no longer ours"))
        .collect();
    assert!(
        refusals.iter().any(|l| l.contains(s.stuck_job.as_str())),
        "no refusal of {} in daemon 4's {} refusal(s): {refusals:#?}",
        s.stuck_job,
        refusals.len()
    );
    for l in &refusals {
        assert!(
            lost.iter().any(|j| l.contains(j.as_str())),
            "a refusal of a job daemon 4 did not lose: {l}"
        );
    }
}

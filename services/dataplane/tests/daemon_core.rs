//! The daemon's decisions without a server: the core is fed assignments, releases, the ends
//! of the work and moves it started and the clock, in random orders, and what it answers
//! is played against a model of the shell (work in flight, watches, heads on disk).

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use handoff_dataplane::daemon::core::{
    Action, Assignment, Core, Input, MoveEnd, Release, WorkEnd, RETRY_AFTER,
};
use handoff_domain::event::AssignmentCause;
use handoff_domain::{CommandId, JobId};
use proptest::prelude::*;

const JOBS: usize = 3;

fn job(n: usize) -> JobId {
    JobId::new(format!("p/rs{n}")).unwrap()
}

fn move_id() -> CommandId {
    CommandId::new("01ARZ3NDEKTSV4RRFFQ69G5FAV").unwrap()
}

fn assignment(epoch: u64, moving: bool) -> Assignment {
    Assignment {
        epoch,
        cause: if moving {
            AssignmentCause::Move { move_id: move_id() }
        } else {
            AssignmentCause::Placement
        },
    }
}

fn assigned(n: usize, epoch: u64) -> Input {
    Input::Assigned {
        job: job(n),
        assignment: assignment(epoch, false),
    }
}

/// The release of a job to the move, by a `JobsReleased` at sequence `seq`.
fn release(seq: u64) -> Release {
    Release {
        move_id: move_id(),
        seq,
    }
}

fn released(n: usize, seq: u64) -> Input {
    Input::Released {
        job: job(n),
        release: release(seq),
    }
}

fn watch(n: usize, seq: u64) -> Action {
    Action::WatchMove {
        job: job(n),
        release: release(seq),
    }
}

fn move_ended(n: usize, seq: u64, end: MoveEnd) -> Input {
    Input::MoveEnded {
        job: job(n),
        seq,
        end,
    }
}

fn ended(n: usize, epoch: u64, end: WorkEnd) -> Input {
    Input::WorkEnded {
        job: job(n),
        epoch,
        end,
    }
}

fn start(n: usize, epoch: u64) -> Action {
    Action::Start {
        job: job(n),
        assignment: assignment(epoch, false),
    }
}

/// One thing that happens to a daemon.
#[derive(Clone, Debug)]
enum Op {
    /// A JobsAssigned names the job at this epoch (older ones included).
    Assign {
        job: usize,
        epoch: u64,
        moving: bool,
    },
    /// A JobsReleased names the job.
    Release { job: usize },
    /// The job's work in flight, if any, ends so.
    WorkEnds { job: usize, end: WorkEnd },
    /// The job's watch, if any, ends so.
    MoveEnds { job: usize, end: MoveEnd },
    /// Time passes.
    Wait { ms: u64 },
}

fn op() -> impl Strategy<Value = Op> {
    let job = 0..JOBS;
    prop_oneof![
        3 => (job.clone(), 1..=6u64, any::<bool>())
            .prop_map(|(job, epoch, moving)| Op::Assign { job, epoch, moving }),
        2 => job.clone().prop_map(|job| Op::Release { job }),
        3 => (job.clone(), prop_oneof![
                Just(WorkEnd::Finished),
                Just(WorkEnd::Cancelled),
                Just(WorkEnd::Fenced),
                Just(WorkEnd::Failed),
            ]).prop_map(|(job, end)| Op::WorkEnds { job, end }),
        2 => (job, prop_oneof![
                Just(MoveEnd::CompletedElsewhere),
                Just(MoveEnd::CompletedHere),
                Just(MoveEnd::Failed),
            ]).prop_map(|(job, end)| Op::MoveEnds { job, end }),
        1 => (0..2_500u64).prop_map(|ms| Op::Wait { ms }),
    ]
}

/// The core, a model of the shell around it, and what the subject and the stores said:
/// each action is checked against the rules as it is performed.
struct World {
    core: Core,
    now: Instant,
    live: bool,
    /// The newest epoch any assignment carried, by job.
    newest: HashMap<JobId, u64>,
    /// The epoch each job is assigned here at, by the subject (an assignment at an epoch
    /// no newer than one seen changes nothing; a release ends it).
    held: HashMap<JobId, u64>,
    /// The highest epoch a store refused, by job.
    fenced: HashMap<JobId, u64>,
    /// Assignments whose work finished by itself.
    finished: HashSet<(JobId, u64)>,
    /// Work in flight: its epoch, and whether it was told to stop.
    work: HashMap<JobId, (u64, bool)>,
    /// The watches on moves away, by the sequence of the release each watches.
    watching: HashMap<JobId, u64>,
    /// The sequence of the release of each job released while it held it.
    released_at: HashMap<JobId, u64>,
    /// The last sequence a release took.
    seq: u64,
    heads: HashSet<JobId>,
    /// When the failed work of a held job is due again, by the rule.
    retry: HashMap<JobId, Instant>,
    /// Released jobs whose watched move ended without completing elsewhere.
    move_over: HashSet<JobId>,
}

impl World {
    fn new(heads: impl IntoIterator<Item = JobId>) -> World {
        World {
            core: Core::new(),
            now: Instant::now(),
            live: false,
            newest: HashMap::new(),
            held: HashMap::new(),
            fenced: HashMap::new(),
            finished: HashSet::new(),
            work: HashMap::new(),
            watching: HashMap::new(),
            released_at: HashMap::new(),
            seq: 0,
            heads: heads.into_iter().collect(),
            retry: HashMap::new(),
            move_over: HashSet::new(),
        }
    }

    /// Whether the job is this daemon's and no store refused its epoch.
    fn holds(&self, job: &JobId) -> bool {
        self.held
            .get(job)
            .is_some_and(|e| self.fenced.get(job).is_none_or(|f| f < e))
    }

    fn catch_up(&mut self) -> Result<(), TestCaseError> {
        let heads = self.heads.iter().cloned().collect();
        self.live = true;
        let actions = self.core.handle(Input::CaughtUp { heads }, self.now);
        self.perform(actions, None, true)
    }

    fn step(&mut self, op: &Op) -> Result<(), TestCaseError> {
        let mut moved_away = None;
        let actions = match op {
            Op::Assign {
                job: n,
                epoch,
                moving,
            } => {
                let j = job(*n);
                if self.newest.get(&j).is_none_or(|n| epoch > n) {
                    self.newest.insert(j.clone(), *epoch);
                    self.held.insert(j.clone(), *epoch);
                    self.retry.remove(&j);
                    self.move_over.remove(&j);
                    self.released_at.remove(&j);
                }
                let input = Input::Assigned {
                    job: j,
                    assignment: assignment(*epoch, *moving),
                };
                self.core.handle(input, self.now)
            }
            Op::Release { job: n } => {
                let j = job(*n);
                self.seq += 1;
                if self.held.remove(&j).is_some() {
                    self.released_at.insert(j.clone(), self.seq);
                }
                self.retry.remove(&j);
                self.core.handle(released(*n, self.seq), self.now)
            }
            Op::WorkEnds { job: n, end } => {
                let j = job(*n);
                let Some((epoch, stopping)) = self.work.remove(&j) else {
                    return Ok(());
                };
                if *end == WorkEnd::Fenced {
                    let f = self.fenced.entry(j.clone()).or_default();
                    *f = (*f).max(epoch);
                }
                let current = self.held.get(&j) == Some(&epoch);
                if current && !stopping && matches!(end, WorkEnd::Finished | WorkEnd::Cancelled) {
                    self.finished.insert((j.clone(), epoch));
                }
                if current && !stopping && *end == WorkEnd::Failed {
                    self.retry.insert(j.clone(), self.now + RETRY_AFTER);
                }
                self.core.handle(ended(*n, epoch, *end), self.now)
            }
            Op::MoveEnds { job: n, end } => {
                let j = job(*n);
                let Some(seq) = self.watching.remove(&j) else {
                    return Ok(());
                };
                // Only the end of the move the job was last released to says anything
                // about its head.
                if self.released_at.get(&j) == Some(&seq) {
                    if *end == MoveEnd::CompletedElsewhere {
                        moved_away = Some(j.clone());
                    } else {
                        self.move_over.insert(j.clone());
                    }
                }
                self.core.handle(move_ended(*n, seq, *end), self.now)
            }
            Op::Wait { ms } => {
                self.now += Duration::from_millis(*ms);
                let due: Vec<JobId> = self
                    .retry
                    .iter()
                    .filter(|(j, at)| **at <= self.now && !self.work.contains_key(*j))
                    .map(|(j, _)| j.clone())
                    .collect();
                let actions = self.core.due(self.now);
                self.perform(actions, None, false)?;
                if self.live {
                    // Failed work starts again once its wait is over, job by job.
                    for j in due {
                        prop_assert!(
                            self.work.contains_key(&j) || !self.holds(&j),
                            "{j}'s failed work was due again and did not start"
                        );
                    }
                }
                return self.check();
            }
        };
        self.perform(actions, moved_away.as_ref(), false)?;
        self.check()
    }

    /// Performs the actions as the shell would, checking each against the rules.
    /// `moved_away`: the job whose move just completed elsewhere, if any; `at_start`:
    /// these answer the end of the backlog.
    fn perform(
        &mut self,
        actions: Vec<Action>,
        moved_away: Option<&JobId>,
        at_start: bool,
    ) -> Result<(), TestCaseError> {
        for action in actions {
            prop_assert!(self.live, "{action:?} before the backlog was read");
            match action {
                Action::Start { job, assignment } => {
                    // (c) at most one piece of work per job.
                    prop_assert!(!self.work.contains_key(&job), "{job} started twice");
                    // (a) only at the newest epoch seen, and only while it is ours.
                    prop_assert_eq!(Some(&assignment.epoch), self.newest.get(&job));
                    prop_assert_eq!(Some(&assignment.epoch), self.held.get(&job));
                    prop_assert!(self.holds(&job), "{job} started at a fenced epoch");
                    prop_assert!(
                        self.retry.get(&job).is_none_or(|at| *at <= self.now),
                        "{job} started again before its wait was over"
                    );
                    self.retry.remove(&job);
                    self.work.insert(job.clone(), (assignment.epoch, false));
                    self.heads.insert(job);
                }
                Action::Stop { job } => {
                    let work = self.work.get_mut(&job);
                    prop_assert!(
                        matches!(work, Some((_, false))),
                        "{job} stopped while not running"
                    );
                    if let Some(w) = work {
                        w.1 = true;
                    }
                }
                Action::WatchMove { job, release } => {
                    prop_assert!(!self.held.contains_key(&job), "{job} watched while ours");
                    prop_assert!(!self.work.contains_key(&job), "{job} watched while working");
                    prop_assert_eq!(
                        self.released_at.get(&job),
                        Some(&release.seq),
                        "{} watched at another release than its last",
                        job
                    );
                    prop_assert!(
                        self.watching.insert(job.clone(), release.seq).is_none(),
                        "{job} watched twice"
                    );
                }
                Action::DropHead { job } => {
                    // (b) never the head of a job it holds.
                    prop_assert!(
                        !self.holds(&job),
                        "dropped the head of {job}, which it holds"
                    );
                    prop_assert!(
                        !self.work.contains_key(&job),
                        "dropped {job}'s head under its work"
                    );
                    // A released job's head stays until its move completes elsewhere, also
                    // across a restart: at start only the heads no event named go.
                    let released = !self.held.contains_key(&job);
                    let unnamed = !self.newest.contains_key(&job);
                    prop_assert!(
                        !released || moved_away == Some(&job) || (at_start && unnamed),
                        "dropped the head of released {job} before its move completed"
                    );
                    self.heads.remove(&job);
                }
            }
        }
        Ok(())
    }

    /// The rules that hold between inputs.
    fn check(&self) -> Result<(), TestCaseError> {
        // (a) no work keeps going at an epoch that is not the job's newest, or released.
        for (job, (epoch, stopping)) in &self.work {
            prop_assert!(
                *stopping || self.held.get(job) == Some(epoch),
                "{job} still works at epoch {epoch}, held at {:?}",
                self.held.get(job)
            );
        }
        if !self.live {
            return Ok(());
        }
        // A job that is ours and was neither finished nor fenced has work in flight or a
        // retry to come, within the wait.
        for (job, epoch) in &self.held {
            let idle = !self.work.contains_key(job);
            if idle && self.holds(job) && !self.finished.contains(&(job.clone(), *epoch)) {
                let retry = self.retry.get(job);
                prop_assert!(
                    retry.is_some_and(|t| *t > self.now && *t <= self.now + RETRY_AFTER),
                    "{job} at {epoch} is ours, idle, and no retry is due"
                );
                prop_assert!(
                    self.core.next_due().is_some_and(|t| t <= *retry.unwrap()),
                    "the core does not wake up for {job}'s retry"
                );
            }
        }
        // A released job whose head is here and whose work has stopped is watched until
        // its move ends, so the head goes once the move completes elsewhere.
        for job in &self.heads {
            let released = !self.held.contains_key(job);
            if released && !self.work.contains_key(job) && !self.move_over.contains(job) {
                prop_assert!(
                    self.watching.contains_key(job),
                    "released {job} keeps its head and nobody watches its move"
                );
            }
        }
        // The core keeps bookkeeping only for the jobs that are not over here.
        let live: HashSet<&JobId> = self
            .held
            .keys()
            .chain(self.work.keys())
            .chain(self.watching.keys())
            .collect();
        prop_assert!(
            self.core.tracked() <= live.len(),
            "the core tracks {} jobs, {} are not over",
            self.core.tracked(),
            live.len()
        );
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// For any order of assignments (older epochs included), releases, work endings,
    /// move endings and waits, before and after the backlog is read: the core never
    /// starts or keeps work at an epoch older than the newest seen, never drops the head
    /// of a job it holds (nor a released job's before its move completes elsewhere), runs
    /// at most one piece of work per job, and leaves no held job without work or a retry.
    #[test]
    fn the_core_keeps_its_rules(
        heads in proptest::collection::vec(any::<bool>(), JOBS),
        ops in proptest::collection::vec(op(), 0..80),
        backlog in 0usize..20,
    ) {
        let mut world = World::new((0..JOBS).filter(|n| heads[*n]).map(job));
        for (i, op) in ops.iter().enumerate() {
            if i == backlog {
                world.catch_up()?;
            }
            world.step(op)?;
        }
        if !world.live {
            world.catch_up()?;
        }
        world.check()?;
    }
}

/// Given a job assigned and working, when it is released, then its work stops, its move
/// is watched once the work has stopped, and its head stays until the move completes
/// with another daemon.
#[test]
fn a_released_job_keeps_its_head_until_its_move_completes_elsewhere() {
    let now = Instant::now();
    let mut core = Core::new();
    core.handle(assigned(0, 1), now);
    assert_eq!(
        core.handle(
            Input::CaughtUp {
                heads: vec![job(0)]
            },
            now
        ),
        vec![start(0, 1)]
    );
    assert_eq!(
        core.handle(released(0, 7), now),
        vec![Action::Stop { job: job(0) }]
    );
    assert_eq!(
        core.handle(ended(0, 1, WorkEnd::Cancelled), now),
        vec![watch(0, 7)]
    );
    assert_eq!(
        core.handle(move_ended(0, 7, MoveEnd::CompletedElsewhere), now),
        vec![Action::DropHead { job: job(0) }]
    );
}

/// Given a released job whose move then failed, then nothing is dropped, before a restart
/// or after.
#[test]
fn a_failed_move_away_keeps_the_head() {
    let now = Instant::now();
    let mut core = Core::new();
    core.handle(assigned(0, 1), now);
    core.handle(released(0, 2), now);
    let at_start = core.handle(
        Input::CaughtUp {
            heads: vec![job(0)],
        },
        now,
    );
    assert_eq!(at_start, vec![watch(0, 2)]);
    assert_eq!(core.handle(move_ended(0, 2, MoveEnd::Failed), now), vec![]);
    assert_eq!(core.handle(assigned(0, 2), now), vec![start(0, 2)]);
    core.handle(released(0, 9), now);
    assert_eq!(
        core.handle(ended(0, 2, WorkEnd::Cancelled), now),
        vec![watch(0, 9)]
    );
    assert_eq!(core.handle(move_ended(0, 9, MoveEnd::Failed), now), vec![]);
}

/// Given a released job being watched, when it comes back (its move failed) and then
/// the old move is reported completed elsewhere, then its head stays and its work runs.
#[test]
fn a_job_that_comes_back_keeps_its_head() {
    let now = Instant::now();
    let mut core = Core::new();
    core.handle(assigned(0, 1), now);
    core.handle(
        Input::CaughtUp {
            heads: vec![job(0)],
        },
        now,
    );
    core.handle(released(0, 5), now);
    core.handle(ended(0, 1, WorkEnd::Cancelled), now);
    let back = Input::Assigned {
        job: job(0),
        assignment: Assignment {
            epoch: 3,
            cause: AssignmentCause::MoveFailed { move_id: move_id() },
        },
    };
    assert!(matches!(
        core.handle(back, now).as_slice(),
        [Action::Start { assignment, .. }] if assignment.epoch == 3
    ));
    assert_eq!(
        core.handle(move_ended(0, 5, MoveEnd::CompletedElsewhere), now),
        vec![]
    );
}

/// Given a job released, back, and released again to another move while the watch on
/// the first is still running, when the first move's end is reported, then the head
/// stays and the second move is watched: only the last release's move decides.
#[test]
fn only_the_last_releases_move_decides_the_head() {
    let now = Instant::now();
    let mut core = Core::new();
    core.handle(assigned(0, 1), now);
    core.handle(Input::CaughtUp { heads: vec![] }, now);
    core.handle(released(0, 5), now);
    assert_eq!(
        core.handle(ended(0, 1, WorkEnd::Cancelled), now),
        vec![watch(0, 5)]
    );
    assert_eq!(core.handle(assigned(0, 3), now), vec![start(0, 3)]);
    core.handle(released(0, 8), now);
    assert_eq!(core.handle(ended(0, 3, WorkEnd::Cancelled), now), vec![]);
    assert_eq!(
        core.handle(move_ended(0, 5, MoveEnd::CompletedElsewhere), now),
        vec![watch(0, 8)]
    );
    assert_eq!(
        core.handle(move_ended(0, 8, MoveEnd::CompletedElsewhere), now),
        vec![Action::DropHead { job: job(0) }]
    );
}

/// Given heads on disk for jobs the subject never named, and for a job released in the
/// backlog (its move may still be going on: the daemon was restarted during it), when the
/// backlog has been read, then only the never-named heads are dropped: the released one
/// is kept and its move watched, and the assigned jobs start, nothing before. A job
/// released with no head here is not watched.
#[test]
fn at_start_heads_never_named_are_dropped_and_released_ones_watched() {
    let now = Instant::now();
    let mut core = Core::new();
    for input in [
        assigned(0, 1),
        assigned(1, 1),
        released(1, 4),
        assigned(3, 1),
        released(3, 6),
    ] {
        assert_eq!(core.handle(input, now), vec![]);
    }
    let actions = core.handle(
        Input::CaughtUp {
            heads: vec![job(0), job(1), job(2)],
        },
        now,
    );
    assert_eq!(
        actions,
        vec![Action::DropHead { job: job(2) }, start(0, 1), watch(1, 4)]
    );
    assert_eq!(
        core.handle(move_ended(1, 4, MoveEnd::CompletedElsewhere), now),
        vec![Action::DropHead { job: job(1) }]
    );
}

/// Given a job working at epoch 1, when it is assigned at epoch 2, then the old work
/// stops first and the new one starts only once the old has ended; a late assignment at
/// epoch 1 changes nothing.
#[test]
fn a_newer_epoch_replaces_the_work_after_it_stops() {
    let now = Instant::now();
    let mut core = Core::new();
    core.handle(assigned(0, 1), now);
    core.handle(Input::CaughtUp { heads: vec![] }, now);
    assert_eq!(
        core.handle(assigned(0, 2), now),
        vec![Action::Stop { job: job(0) }]
    );
    assert_eq!(core.handle(assigned(0, 1), now), vec![]);
    assert_eq!(
        core.handle(ended(0, 1, WorkEnd::Cancelled), now),
        vec![start(0, 2)]
    );
}

/// Given work that failed, then it starts again after the retry wait and not before;
/// given work that was fenced, then its head is dropped and it does not start again until
/// a newer assignment.
#[test]
fn failed_work_is_retried_and_fenced_work_is_not() {
    let now = Instant::now();
    let mut core = Core::new();
    core.handle(assigned(0, 1), now);
    core.handle(assigned(1, 1), now);
    core.handle(Input::CaughtUp { heads: vec![] }, now);
    assert_eq!(core.handle(ended(0, 1, WorkEnd::Failed), now), vec![]);
    assert_eq!(core.next_due(), Some(now + RETRY_AFTER));
    assert_eq!(core.due(now + RETRY_AFTER / 2), vec![]);
    assert_eq!(core.due(now + RETRY_AFTER), vec![start(0, 1)]);
    assert_eq!(
        core.handle(ended(1, 1, WorkEnd::Fenced), now),
        vec![Action::DropHead { job: job(1) }]
    );
    assert_eq!(core.due(now + RETRY_AFTER * 10), vec![]);
    assert_eq!(core.handle(assigned(1, 2), now), vec![start(1, 2)]);
}

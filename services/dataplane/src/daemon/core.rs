//! What a daemon decides about its jobs, without I/O: no tasks, no NATS, no sled, no
//! clock. The daemon's assignment events, the ends of the work it started and the clock
//! come in as [`Input`]s and an `Instant`; what to do comes out as [`Action`]s, which the
//! shell performs and whose results it feeds back in.
//!
//! The rules it keeps:
//! - Work runs only for the newest assignment of a job: an assignment at an epoch no
//!   newer than one already seen changes nothing (epochs grow with every assignment), and
//!   a newer one stops the work at the older epoch before it starts its own.
//! - At most one piece of work per job: a job's next work starts only once the previous
//!   one has reported its end.
//! - A head goes only when the job is not this daemon's: at start for heads no event of
//!   the backlog names, when the move a job was last released to has completed with another daemon,
//!   or when a store refused the job's epoch (a newer owner exists). A released job keeps
//!   its head until its move completes elsewhere, in case the move fails and the job comes
//!   back, also across a restart (a job released in the backlog with a head on disk is
//!   watched from its release once the backlog is read). A release is known by its sequence, so the end of an older move (the job came
//!   back and left again since) decides nothing.
//! - Work that failed is started again after [`RETRY_AFTER`], as long as the job is still
//!   this daemon's at that epoch.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use handoff_domain::event::AssignmentCause;
use handoff_domain::{CommandId, JobId};

/// How long failed work waits before it starts again.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);

/// One job's assignment to this daemon, as its subject says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assignment {
    /// Grows with every assignment of the job.
    pub epoch: u64,
    pub cause: AssignmentCause,
}

impl Assignment {
    /// The move that brought the job here, if it is the destination of one.
    pub fn move_id(&self) -> Option<&CommandId> {
        match &self.cause {
            AssignmentCause::Move { move_id } => Some(move_id),
            _ => None,
        }
    }
}

/// A job's release to a move, as the daemon's subject says: the move, and the sequence of
/// the `JobsReleased` in the stream. The move's end comes after it on the job's subject.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Release {
    pub move_id: CommandId,
    pub seq: u64,
}

/// What the core is told.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Input {
    /// A `JobsAssigned` on the daemon's subject names the job (one input per job, in the
    /// subject's order).
    Assigned { job: JobId, assignment: Assignment },
    /// A `JobsReleased` on the daemon's subject names the job: it is moving away.
    Released { job: JobId, release: Release },
    /// The daemon's subject has been read up to its end as it was at start; `heads` are
    /// the jobs with a head on disk. Until this, assignments are only recorded: nothing
    /// starts while the backlog may still release what it assigned.
    CaughtUp { heads: Vec<JobId> },
    /// The work started by [`Action::Start`] for `job` at `epoch` has ended and no longer
    /// touches the head.
    WorkEnded {
        job: JobId,
        epoch: u64,
        end: WorkEnd,
    },
    /// The move watched by [`Action::WatchMove`] for the release at `seq` has ended.
    MoveEnded { job: JobId, seq: u64, end: MoveEnd },
}

/// How a job's work ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkEnd {
    /// Nothing more to do at this epoch: the move it rebuilt for failed (and was
    /// reported), or this daemon had failed that move already.
    Finished,
    /// It stopped because [`Action::Stop`] told it to.
    Cancelled,
    /// A store refused a write at its epoch: the job has a newer owner somewhere.
    Fenced,
    /// It broke off in a way worth another attempt (a store or the command service out
    /// of reach, a head that must be rebuilt).
    Failed,
}

/// How the move of a released job ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MoveEnd {
    /// Completed with another daemon, or failed back to another (the destination of a
    /// cancelled move, released from it): the job's head here is no longer needed.
    CompletedElsewhere,
    /// Completed with this daemon (its assignment arrives on the subject).
    CompletedHere,
    /// Failed: the job returns to this daemon, its source, which keeps the head.
    Failed,
}

/// What the shell must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Start the job's work at this assignment: raise the job's fence to its epoch, build
    /// or rebuild the head if needed, then follow the oplog and take the snapshots. Report
    /// [`Input::WorkEnded`] with the assignment's epoch when it ends, however it ends.
    Start { job: JobId, assignment: Assignment },
    /// Tell the job's running work to stop. It still reports [`Input::WorkEnded`] once it
    /// has stopped; until then it may touch the head.
    Stop { job: JobId },
    /// Watch the job's events after the release until the release's move completes or
    /// fails, then report [`Input::MoveEnded`] with the release's sequence.
    WatchMove { job: JobId, release: Release },
    /// Delete the job's head from disk. No work of the job is running.
    DropHead { job: JobId },
}

/// The daemon's bookkeeping of its jobs.
#[derive(Debug, Default)]
pub struct Core {
    phase: Phase,
    /// The jobs assigned here, and those released whose work or watch is not over.
    jobs: BTreeMap<JobId, Job>,
    /// The newest epoch of each job that is over here (released, no work, no watch): a
    /// late assignment cannot bring back an epoch that is over. One number per job that
    /// ever passed through, so it is bounded by the fleet, not by the history.
    past: BTreeMap<JobId, u64>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Phase {
    /// Reading the backlog of the daemon's subject: recording only.
    #[default]
    CatchingUp,
    /// Acting on every input.
    Live,
}

#[derive(Debug)]
struct Job {
    /// The newest epoch any assignment of the job carried; kept after a release, so a
    /// late assignment cannot bring back an epoch that is over.
    newest: Option<u64>,
    hold: Hold,
    work: Work,
    watch: Watch,
}

/// Whether the job is this daemon's.
#[derive(Debug)]
enum Hold {
    /// Released to a move.
    Released { release: Release },
    /// Assigned here; `run` says whether work is wanted at that assignment.
    Assigned { assignment: Assignment, run: Run },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Run {
    /// Work should run at the assignment.
    Wanted,
    /// Work failed; it starts again at this time.
    RetryAt(Instant),
    /// Work finished by itself: nothing more until a new assignment.
    Finished,
    /// A store refused the epoch; the head is gone. Nothing more until a new assignment.
    Fenced,
}

/// The job's work as the shell runs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Work {
    Idle,
    Running(u64),
    /// Told to stop; its end is not reported yet.
    Stopping(u64),
}

/// The watch on a released job's move.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Watch {
    None,
    /// To start once the job's work has stopped.
    Wanted,
    /// On the release at this sequence.
    Watching(u64),
}

impl Job {
    fn held_epoch(&self) -> Option<u64> {
        match &self.hold {
            Hold::Assigned { assignment, .. } => Some(assignment.epoch),
            Hold::Released { .. } => None,
        }
    }

    /// Brings the work and the watch in line with the hold.
    fn reconcile(&mut self, id: &JobId, out: &mut Vec<Action>) {
        if let Work::Running(epoch) = self.work {
            let wanted = matches!(&self.hold,
                Hold::Assigned { assignment, run: Run::Wanted } if assignment.epoch == epoch);
            if !wanted {
                out.push(Action::Stop { job: id.clone() });
                self.work = Work::Stopping(epoch);
            }
        }
        if self.work != Work::Idle {
            return;
        }
        match &self.hold {
            Hold::Assigned {
                assignment,
                run: Run::Wanted,
            } => {
                self.work = Work::Running(assignment.epoch);
                out.push(Action::Start {
                    job: id.clone(),
                    assignment: assignment.clone(),
                });
            }
            Hold::Released { release } if self.watch == Watch::Wanted => {
                self.watch = Watch::Watching(release.seq);
                out.push(Action::WatchMove {
                    job: id.clone(),
                    release: release.clone(),
                });
            }
            _ => {}
        }
    }
}

impl Core {
    pub fn new() -> Core {
        Core::default()
    }

    /// Takes one input at `now`; returns what to do, in order.
    pub fn handle(&mut self, input: Input, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        let touched = match &input {
            Input::Assigned { job, .. }
            | Input::Released { job, .. }
            | Input::WorkEnded { job, .. }
            | Input::MoveEnded { job, .. } => Some(job.clone()),
            Input::CaughtUp { .. } => None,
        };
        match input {
            Input::Assigned { job, assignment } => self.assigned(job, assignment, &mut out),
            Input::Released { job, release } => self.released(job, release, &mut out),
            Input::CaughtUp { heads } => self.caught_up(heads, &mut out),
            Input::WorkEnded { job, epoch, end } => self.work_ended(job, epoch, end, now, &mut out),
            Input::MoveEnded { job, seq, end } => self.move_ended(job, seq, end, &mut out),
        }
        match touched {
            Some(job) => self.forget_if_over(&job),
            None => {
                let over: Vec<JobId> = self.jobs.keys().cloned().collect();
                for job in over {
                    self.forget_if_over(&job);
                }
            }
        }
        out
    }

    /// Moves a job that is over here (live, released, no work, no watch) to `past`, so
    /// that what the core keeps and scans is the daemon's current jobs.
    fn forget_if_over(&mut self, id: &JobId) {
        if self.phase != Phase::Live {
            return;
        }
        let over = self.jobs.get(id).is_some_and(|j| {
            matches!(j.hold, Hold::Released { .. })
                && j.work == Work::Idle
                && j.watch == Watch::None
        });
        if over {
            if let Some(newest) = self.jobs.remove(id).and_then(|j| j.newest) {
                self.past.insert(id.clone(), newest);
            }
        }
    }

    /// How many jobs the core keeps bookkeeping for (the daemon's current jobs and
    /// those still leaving).
    pub fn tracked(&self) -> usize {
        self.jobs.len()
    }

    /// Starts again the failed work whose wait is over at `now`.
    pub fn due(&mut self, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        let live = self.phase == Phase::Live;
        for (id, job) in &mut self.jobs {
            if let Hold::Assigned { run, .. } = &mut job.hold {
                if matches!(run, Run::RetryAt(at) if *at <= now) {
                    *run = Run::Wanted;
                    if live {
                        job.reconcile(id, &mut out);
                    }
                }
            }
        }
        out
    }

    /// When [`Core::due`] next has something to do.
    pub fn next_due(&self) -> Option<Instant> {
        self.jobs
            .values()
            .filter_map(|j| match &j.hold {
                Hold::Assigned {
                    run: Run::RetryAt(at),
                    ..
                } => Some(*at),
                _ => None,
            })
            .min()
    }

    /// How many jobs are assigned to this daemon.
    pub fn held(&self) -> usize {
        self.jobs
            .values()
            .filter(|j| matches!(j.hold, Hold::Assigned { .. }))
            .count()
    }

    fn assigned(&mut self, id: JobId, assignment: Assignment, out: &mut Vec<Action>) {
        let over = self.past.get(&id).copied();
        if over.is_some_and(|n| assignment.epoch <= n) {
            return;
        }
        self.past.remove(&id);
        let epoch = assignment.epoch;
        let hold = Hold::Assigned {
            assignment,
            run: Run::Wanted,
        };
        let job = match self.jobs.entry(id.clone()) {
            Entry::Occupied(e) if e.get().newest.is_some_and(|n| epoch <= n) => return,
            Entry::Occupied(e) => {
                let job = e.into_mut();
                job.newest = Some(epoch);
                job.hold = hold;
                job
            }
            Entry::Vacant(e) => e.insert(Job {
                newest: Some(epoch),
                hold,
                work: Work::Idle,
                watch: Watch::None,
            }),
        };
        if self.phase == Phase::Live {
            job.reconcile(&id, out);
        }
    }

    fn released(&mut self, id: JobId, release: Release, out: &mut Vec<Action>) {
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        if job.held_epoch().is_none() {
            return;
        }
        job.hold = Hold::Released { release };
        if job.watch == Watch::None {
            job.watch = Watch::Wanted;
        }
        // One released in the backlog is watched once the heads on disk are known.
        if self.phase == Phase::Live {
            job.reconcile(&id, out);
        }
    }

    fn caught_up(&mut self, heads: Vec<JobId>, out: &mut Vec<Action>) {
        if self.phase == Phase::Live {
            return;
        }
        self.phase = Phase::Live;
        // The backlog names every job this daemon held or still holds; a head of any
        // other job is nobody's here.
        let mut kept = BTreeSet::new();
        for head in heads {
            if self.jobs.contains_key(&head) {
                kept.insert(head);
            } else {
                out.push(Action::DropHead { job: head });
            }
        }
        for (id, job) in &mut self.jobs {
            // A job released with no head here has nothing to keep: no watch.
            if matches!(job.hold, Hold::Released { .. }) && !kept.contains(id) {
                job.watch = Watch::None;
            }
            job.reconcile(id, out);
        }
    }

    fn work_ended(
        &mut self,
        id: JobId,
        epoch: u64,
        end: WorkEnd,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        match job.work {
            Work::Running(e) | Work::Stopping(e) if e == epoch => job.work = Work::Idle,
            // Not the work in flight: nothing it says is news.
            _ => return,
        }
        if let Hold::Assigned { assignment, run } = &mut job.hold {
            // Only the end of the work wanted now says something about the assignment:
            // work that was told to stop ended because of that.
            let current = assignment.epoch == epoch && *run == Run::Wanted;
            match end {
                WorkEnd::Fenced if assignment.epoch == epoch => {
                    // Still ours by the subject, but a store knows a newer owner: the head
                    // can never be written again at this epoch.
                    *run = Run::Fenced;
                    out.push(Action::DropHead { job: id.clone() });
                }
                WorkEnd::Failed if current => *run = Run::RetryAt(now + RETRY_AFTER),
                WorkEnd::Finished | WorkEnd::Cancelled if current => *run = Run::Finished,
                _ => {}
            }
        }
        job.reconcile(&id, out);
    }

    fn move_ended(&mut self, id: JobId, seq: u64, end: MoveEnd, out: &mut Vec<Action>) {
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        if job.watch != Watch::Watching(seq) {
            return;
        }
        job.watch = Watch::None;
        match &job.hold {
            // Back and released again to another move since: that move says what
            // becomes of the head.
            Hold::Released { release } if release.seq != seq => job.watch = Watch::Wanted,
            Hold::Released { .. } if end == MoveEnd::CompletedElsewhere => {
                if job.work == Work::Idle {
                    out.push(Action::DropHead { job: id.clone() });
                } else {
                    job.watch = Watch::Wanted;
                }
            }
            _ => {}
        }
        job.reconcile(&id, out);
    }
}

//! The views, and how one event changes them.
//!
//! The projector keeps the domain state in memory (loaded from the store at start) and
//! folds each event with the domain's own `State::apply`, so the views never disagree
//! with the rules. After each batch it writes the records of everything the batch
//! touched, the index entries that changed, and the counters of the indexes:
//!
//! | key | value |
//! |-----|-------|
//! | `daemon\0<daemon>` | [`DaemonView`] |
//! | `project\0<project>` | [`ProjectView`] |
//! | `job\0<job>` | [`JobView`] |
//! | `move\0<move>` | [`MoveView`] |
//! | `alert\0<TYPE>\0<about>` | [`AlertView`]: the last alert of that type about that daemon or job, open or closed |
//! | `events\0<n>` | events `n*64` to `n*64+63` as stored in the stream, framed |
//! | `jh\0<job>\0<block>` | the sequences of the job's events from `block` to `block + 4095`, each as its distance from `block` (2 bytes, big endian): its history, by range (its length is in the job's record) |
//! | `dh\0<daemon>\0<block>` | the same for the daemon's history (`Event::daemons`; its length is in the daemon's record) |
//! | `ix\0daemon\0<daemon>\0<job>` | (empty) a job the daemon owns or that is moving away from it |
//! | `ix\0moving\0<job>` | (empty) a moving job |
//! | `ix\0move\0<status>\0<move>` | (empty) a move by its standing |
//! | `ix\0alert\0<all or open>\0<seq>\0<TYPE>\0<about>` | the alert's key: alerts by the event that raised them |
//! | `ix\0alert\0kind\0<TYPE>\0<all or open>\0<seq>\0<about>` | the same, by type |
//! | `n\0<prefix>` | how many keys start with `<prefix>` (8 bytes, big endian); `n\0ix\0project\0<project>\0`: how many jobs the project has (its jobs' records are `job\0<project>/…`, as a job's id starts with its project's) |
//!
//! So a page of any list costs what it holds: a daemon's jobs, the moving jobs, a page of
//! history are ranges of keys, and every list's total is one counter, or, for a history,
//! a field of its job's or daemon's record (written with its events anyway). Nothing
//! grows in memory with the history: histories are blocks in the store, and the fold
//! keeps only those of the block of sequences it is in.
//!
//! A history is kept in blocks of fixed ranges of sequences, not one key per event: sled
//! pays for each key a write adds to its tree far more than for one it replaces, and a
//! rebuild over 202,001 events took 12.5 s with a key per event, 6.5 s with no history
//! at all, and 9.8 s with blocks of 4,096 (10.6 s with 1,024; `scripts/bench c`). A block
//! is written again in each batch that adds to it, holding at most 4,096 sequences
//! (8 KiB). What the fold keeps of the open block is one sequence per event and job or
//! daemon it names there.
//!
//! Records are written once per batch however many of its events touched them, and
//! events are kept in chunks, so a rebuild writes far fewer records than events. Chunks
//! cover fixed ranges of sequences, so the store's contents depend only on the events,
//! never on how they were batched.
//!
//! Sequences in keys are 20-digit zero-padded decimals, so key order is stream order.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use handoff_domain::alert::{self, AlertKey, AlertKind};
use handoff_domain::{CommandId, DaemonId, Event, JobId, ProjectId, State};
use handoff_eventlog::Recorded;
pub use handoff_protocol::views::{
    AlertView, AssignmentView, DaemonView, HistoryEntry, JobView, MoveStatus, MoveView, ProjectView,
};

use serde::Serialize;

use crate::store::{StoreError, ViewStore, Write};

mod history;
mod keys;
mod lists;
mod moves;

use history::Histories;
use keys::frame;
pub use keys::*;
use lists::{alert_lists, job_lists, move_lists, Listed};
use moves::{follow_move, move_of, move_status};

fn json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("views always serialize")
}

/// A record to store, not yet serialised: the writer thread serialises it, so that work
/// overlaps the fold of the next batch.
pub enum Value {
    Bytes(Vec<u8>),
    Count(u64),
    Daemon(DaemonView),
    Project(ProjectView),
    Job(Box<JobView>),
    Move(Box<MoveView>),
    Alert(Box<AlertView>),
}

impl Value {
    pub fn encode(self) -> Vec<u8> {
        match self {
            Value::Bytes(b) => b,
            Value::Count(n) => n.to_be_bytes().to_vec(),
            Value::Daemon(v) => json(&v),
            Value::Project(v) => json(&v),
            Value::Job(v) => json(&v),
            Value::Move(v) => json(&v),
            Value::Alert(v) => json(&v),
        }
    }
}

/// A change of one key: a value, or `None` to delete it.
pub type Change = (Vec<u8>, Option<Value>);

/// Serialises changes into store writes.
pub fn encode(changes: Vec<Change>) -> Vec<Write> {
    changes
        .into_iter()
        .map(|(k, v)| (k, v.map(Value::encode)))
        .collect()
}

/// The in-memory state behind the views, with the move metadata the domain state does
/// not keep, the lists' counters, and what changed since the last [`Views::drain`].
#[derive(Default)]
pub struct Views {
    state: State,
    moves: BTreeMap<CommandId, MoveView>,
    /// The last alert of each type about each thing.
    alerts: BTreeMap<AlertKey, AlertView>,
    /// The last chunk of events, as stored plus what this batch added.
    events: (u64, Vec<u8>),
    /// Every list's length, by its counter's key.
    counts: HashMap<Vec<u8>, u64>,
    /// The length of each job's and each daemon's history.
    job_events: HashMap<JobId, u64>,
    daemon_events: HashMap<DaemonId, u64>,
    histories: Histories,
    dirty: Dirty,
}

/// Records to write at the end of a batch: each is serialized once however many events
/// of the batch touched it. The lists of jobs, moves and alerts as they were before the
/// batch first touched them, to write what changed.
#[derive(Default)]
struct Dirty {
    daemons: HashSet<DaemonId>,
    projects: BTreeSet<ProjectId>,
    jobs: HashMap<JobId, Vec<Listed>>,
    moves: BTreeMap<CommandId, Vec<Listed>>,
    alerts: BTreeMap<AlertKey, Vec<Listed>>,
    /// Counters changed.
    counts: BTreeSet<Vec<u8>>,
    /// Event chunks to write: the last one changed, and chunks this batch filled up.
    events: bool,
    full_event_chunks: Vec<Change>,
}

impl Views {
    /// Rebuilds the in-memory state from the stored views.
    pub fn load(store: &impl ViewStore) -> Result<Self, StoreError> {
        let mut views = Views::default();
        let corrupt = |e: serde_json::Error| StoreError::Corrupt {
            path: Default::default(),
            detail: format!("unreadable view: {e}"),
        };
        for (_, v) in store.scan(&prefix(&["daemon"]))? {
            let d: DaemonView = serde_json::from_slice(&v).map_err(corrupt)?;
            // Its jobs come back with the jobs' views, below.
            let daemon = handoff_domain::state::Daemon {
                settings: d.settings,
                status: d.status,
                jobs: BTreeSet::new(),
                used_bytes: d.used_bytes,
            };
            if let Some(drain) = d.drain {
                views.state.drains.insert(d.daemon.clone(), drain);
            }
            views
                .daemon_events
                .insert(d.daemon.clone(), d.history_events);
            views.state.daemons.insert(d.daemon, daemon);
        }
        for (_, v) in store.scan(&prefix(&["project"]))? {
            let p: ProjectView = serde_json::from_slice(&v).map_err(corrupt)?;
            views.state.projects.insert(p.project, p.state);
        }
        for (_, v) in store.scan(&prefix(&["job"]))? {
            let j: JobView = serde_json::from_slice(&v).map_err(corrupt)?;
            if let Some(d) = views.state.daemons.get_mut(j.state.owner()) {
                d.jobs.insert(j.job.clone());
            }
            views.job_events.insert(j.job.clone(), j.history_events);
            views.state.jobs.insert(j.job, j.state);
        }
        let events = prefix(&["events"]);
        if let Some((k, v)) = store.last_below(&key(&["events", "~"]))? {
            if let Some(n) = k.strip_prefix(events.as_slice()).and_then(parse_number) {
                views.events = (n, v);
            }
        }
        for (k, v) in store.scan(&prefix(&["n"]))? {
            let n = <[u8; 8]>::try_from(v.as_slice()).map_err(|_| StoreError::Corrupt {
                path: Default::default(),
                detail: format!("a counter has {} bytes, not 8", v.len()),
            })?;
            views.counts.insert(k, u64::from_be_bytes(n));
        }
        // Only the moves in progress: those over are in the store, and nothing changes
        // them any more.
        for status in [MoveStatus::InProgress, MoveStatus::Interrupted] {
            let listed = prefix(&["ix", "move", status.as_str()]);
            for (k, _) in store.scan(&listed)? {
                let mut key = prefix(&["move"]);
                key.extend_from_slice(&k[listed.len()..]);
                let Some(v) = store.get(&key)? else {
                    return Err(StoreError::Corrupt {
                        path: Default::default(),
                        detail: "a move listed in progress has no view".into(),
                    });
                };
                let m: MoveView = serde_json::from_slice(&v).map_err(corrupt)?;
                views.state.moves.insert(
                    m.move_id.clone(),
                    handoff_domain::state::Move {
                        scope: m.scope.clone(),
                        from: m.from.clone(),
                        to: m.to.clone(),
                        reason: m.reason.clone(),
                        planned: m.planned,
                        automatic: m.automatic,
                        spread: m.spread.clone(),
                        drain: m.drain.clone(),
                        cancelled: m.cancelled.as_ref().map(|c| handoff_domain::state::Cancel {
                            by: c.command.clone(),
                            reason: c.reason.clone(),
                        }),
                        jobs: m.jobs.clone(),
                    },
                );
                views.moves.insert(m.move_id.clone(), m);
            }
        }
        for (_, v) in store.scan(&prefix(&["alert"]))? {
            let a: AlertView = serde_json::from_slice(&v).map_err(corrupt)?;
            let key = AlertKey {
                kind: a.kind,
                about: a.about.clone(),
            };
            if a.is_open() {
                views.state.alerts.insert(key.clone());
            }
            views.alerts.insert(key, a);
        }
        views.histories = Histories::load(store)?;
        Ok(views)
    }

    /// The fleet's state as the views have folded it.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// How many keys start with `prefix`, as of the last drain.
    pub fn count(&self, prefix: &[u8]) -> u64 {
        self.counts.get(&counter_key(prefix)).copied().unwrap_or(0)
    }

    /// Folds one event (`payload` as stored in the stream); what it changed is written by
    /// the next [`Views::drain`].
    pub fn apply(&mut self, r: &Recorded, payload: &[u8]) {
        let event = &r.envelope.event;
        // Each once, however many times the event names it.
        let mut jobs: Vec<&JobId> = event.jobs();
        jobs.sort_unstable();
        jobs.dedup();
        for j in &jobs {
            let job = self.state.jobs.get(*j);
            // A job's previous owner loses it: its daemon view changes too.
            if let Some(job) = job {
                if !self.dirty.daemons.contains(job.owner()) {
                    self.dirty.daemons.insert(job.owner().clone());
                }
            }
            if !self.dirty.jobs.contains_key(*j) {
                self.dirty.jobs.insert((*j).clone(), job_lists(j, job));
            }
        }
        // A drain's counts change as its moves end: its daemon's view changes too.
        if let Event::JobMoveCompleted { move_id, .. } | Event::JobMoveFailed { move_id, .. } =
            event
        {
            if let Some(m) = self.state.moves.get(move_id).filter(|m| m.drain.is_some()) {
                self.dirty.daemons.insert(m.from.clone());
            }
        }
        self.state.apply(event);
        // And its owner now gains it (a new job, a move's destination): whether or not the
        // event is in that daemon's history.
        for j in &jobs {
            if let Some(job) = self.state.jobs.get(*j) {
                if !self.dirty.daemons.contains(job.owner()) {
                    self.dirty.daemons.insert(job.owner().clone());
                }
            }
        }
        for effect in alert::effects(event) {
            let raised = |key: AlertKey, detail: String| AlertView {
                kind: key.kind,
                about: key.about,
                detail,
                raised_seq: r.seq,
                raised_at: r.envelope.at,
                raised_by: event.type_name().to_owned(),
                closed_at: None,
                closed_by: None,
            };
            let (key, view) = match effect {
                alert::Effect::Open { key, detail } => (key.clone(), raised(key, detail)),
                alert::Effect::Notice { key, detail } => {
                    let mut view = raised(key.clone(), detail);
                    view.closed_at = Some(r.envelope.at);
                    view.closed_by = Some(event.type_name().to_owned());
                    (key, view)
                }
                alert::Effect::Close { key } => match self.alerts.get(&key) {
                    Some(open) if open.is_open() => {
                        let mut view = open.clone();
                        view.closed_at = Some(r.envelope.at);
                        view.closed_by = Some(event.type_name().to_owned());
                        (key, view)
                    }
                    _ => continue,
                },
            };
            if !self.dirty.alerts.contains_key(&key) {
                let before = alert_lists(self.alerts.get(&key));
                self.dirty.alerts.insert(key.clone(), before);
            }
            self.alerts.insert(key, view);
        }
        // Histories: of what the state holds, as only its records say how long they are.
        for j in &jobs {
            if self.state.jobs.contains_key(*j) {
                self.histories.add(job_history(j), r.seq);
                *self.job_events.entry((*j).clone()).or_default() += 1;
            }
        }
        let mut daemons = event.daemons();
        daemons.sort_unstable();
        daemons.dedup();
        for d in daemons {
            if self.state.daemons.contains_key(d) {
                self.histories.add(daemon_history(d), r.seq);
                *self.daemon_events.entry(d.clone()).or_default() += 1;
                if !self.dirty.daemons.contains(d) {
                    self.dirty.daemons.insert(d.clone());
                }
            }
        }
        if let Event::ProjectConfigured { project, .. } = event {
            self.dirty.projects.insert(project.clone());
        }
        if let Some(move_id) = move_of(event) {
            // A move gets its view when it starts (the state knows it then); the view
            // follows its jobs' phases itself, as the state forgets a move once it is over.
            if !self.moves.contains_key(move_id) {
                if let Some(m) = self.state.moves.get(move_id) {
                    let view = MoveView {
                        move_id: move_id.clone(),
                        scope: m.scope.clone(),
                        from: m.from.clone(),
                        to: m.to.clone(),
                        reason: m.reason.clone(),
                        actor: r.envelope.actor.to_string(),
                        started_at: r.envelope.at,
                        updated_at: r.envelope.at,
                        planned: m.planned,
                        jobs: m.jobs.clone(),
                        status: MoveStatus::InProgress,
                        automatic: m.automatic,
                        cancelled: None,
                        spread: m.spread.clone(),
                        drain: m.drain.clone(),
                    };
                    self.moves.insert(move_id.clone(), view);
                    self.dirty.moves.entry(move_id.clone()).or_default();
                }
            }
            if let Some(view) = self.moves.get_mut(move_id) {
                if !self.dirty.moves.contains_key(move_id) {
                    self.dirty
                        .moves
                        .insert(move_id.clone(), move_lists(Some(view)));
                }
                view.updated_at = r.envelope.at;
                if let Event::MoveCancelled {
                    reason, cancel_id, ..
                } = event
                {
                    view.cancelled = Some(handoff_protocol::views::Cancellation {
                        command: cancel_id.clone(),
                        by: r.envelope.actor.to_string(),
                        at: r.envelope.at,
                        reason: reason.clone(),
                    });
                }
                follow_move(view, event);
            }
        }

        // The event itself, once, in its chunk: histories hold its sequence.
        let chunk = r.seq / EVENTS_PER_CHUNK;
        if self.events.0 != chunk {
            let full = std::mem::replace(&mut self.events, (chunk, Vec::new()));
            if !full.1.is_empty() {
                self.dirty.full_event_chunks.push((
                    events_key(full.0 * EVENTS_PER_CHUNK),
                    Some(Value::Bytes(full.1)),
                ));
            }
        }
        frame(&mut self.events.1, r.seq, payload);
        self.dirty.events = true;
    }

    fn set_count(&mut self, prefix: Vec<u8>, n: usize) {
        let counter = counter_key(&prefix);
        self.counts.insert(counter.clone(), n as u64);
        self.dirty.counts.insert(counter);
    }

    fn counted(&mut self, prefix: Vec<u8>, added: bool) {
        let counter = counter_key(&prefix);
        let n = self.counts.entry(counter.clone()).or_insert(0);
        *n = if added { *n + 1 } else { n.saturating_sub(1) };
        self.dirty.counts.insert(counter);
    }

    /// Writes the list entries that left (`before` but not `after`) and joined.
    fn relist(&mut self, before: Vec<Listed>, after: Vec<Listed>, writes: &mut Vec<Change>) {
        let before: BTreeSet<Listed> = before.into_iter().collect();
        let after: BTreeSet<Listed> = after.into_iter().collect();
        for gone in before.difference(&after) {
            // Only what was written goes: a record is removed apart, if ever.
            if gone.value.is_some() {
                writes.push((gone.key.clone(), None));
            }
            self.counted(gone.counted.clone(), false);
        }
        for new in after.difference(&before) {
            if let Some(value) = &new.value {
                writes.push((new.key.clone(), Some(Value::Bytes(value.clone()))));
            }
            self.counted(new.counted.clone(), true);
        }
    }

    /// Appends the writes of every record changed since the last drain.
    pub fn drain(&mut self, writes: &mut Vec<Change>) {
        let mut dirty = std::mem::take(&mut self.dirty);
        writes.append(&mut dirty.full_event_chunks);
        if dirty.events {
            let (chunk, bytes) = &self.events;
            writes.push((
                events_key(chunk * EVENTS_PER_CHUNK),
                Some(Value::Bytes(bytes.clone())),
            ));
        }
        self.histories.drain(writes);
        // The counters changed since the last drain; the lists below add theirs.
        self.dirty.counts = std::mem::take(&mut dirty.counts);
        // Daemons and projects are all in memory: their counts are the state's.
        if !dirty.daemons.is_empty() {
            self.set_count(prefix(&["daemon"]), self.state.daemons.len());
        }
        if !dirty.projects.is_empty() {
            self.set_count(prefix(&["project"]), self.state.projects.len());
        }
        for d in dirty.daemons {
            if let Some(daemon) = self.state.daemons.get(&d) {
                let view = DaemonView {
                    free_bytes: daemon.free_bytes(),
                    settings: daemon.settings.clone(),
                    status: daemon.status,
                    jobs: daemon.jobs.len() as u64,
                    used_bytes: daemon.used_bytes,
                    drain: self.state.drains.get(&d).cloned(),
                    history_events: self.daemon_events.get(&d).copied().unwrap_or(0),
                    daemon: d,
                };
                writes.push((daemon_key(&view.daemon), Some(Value::Daemon(view))));
            }
        }
        for p in dirty.projects {
            if let Some(project) = self.state.projects.get(&p) {
                let view = ProjectView {
                    state: project.clone(),
                    project: p,
                };
                writes.push((project_key(&view.project), Some(Value::Project(view))));
            }
        }
        for (j, before) in dirty.jobs {
            let after = job_lists(&j, self.state.jobs.get(&j));
            self.relist(before, after, writes);
            if let Some(job) = self.state.jobs.get(&j) {
                let view = JobView {
                    owner: job.owner().clone(),
                    state: job.clone(),
                    history_events: self.job_events.get(&j).copied().unwrap_or(0),
                    job: j,
                };
                writes.push((job_key(&view.job), Some(Value::Job(Box::new(view)))));
            }
        }
        for (a, before) in dirty.alerts {
            let after = alert_lists(self.alerts.get(&a));
            self.relist(before, after, writes);
            if let Some(view) = self.alerts.get(&a) {
                writes.push((alert_key(&a), Some(Value::Alert(Box::new(view.clone())))));
            }
        }
        for (m, before) in dirty.moves {
            let interrupted = self
                .state
                .alerts
                .contains(&AlertKey::new(AlertKind::MoveInterrupted, &m));
            let Some(view) = self.moves.get_mut(&m) else {
                continue;
            };
            view.status = match move_status(view.planned, &view.jobs) {
                _ if interrupted => MoveStatus::Interrupted,
                MoveStatus::InProgress => MoveStatus::InProgress,
                _ if view.cancelled.is_some() => MoveStatus::Cancelled,
                over => over,
            };
            let view = view.clone();
            // Over: written one last time, and no longer kept in memory.
            if !matches!(
                view.status,
                MoveStatus::InProgress | MoveStatus::Interrupted
            ) {
                self.moves.remove(&m);
            }
            self.relist(before, move_lists(Some(&view)), writes);
            writes.push((move_key(&m), Some(Value::Move(Box::new(view)))));
        }
        // A counter at zero goes, as it would never have been written by a fold of the
        // same events in other batches.
        let counts = std::mem::take(&mut self.dirty.counts);
        for c in counts {
            match self.counts.get(&c).copied().unwrap_or(0) {
                0 => {
                    self.counts.remove(&c);
                    writes.push((c, None));
                }
                n => writes.push((c, Some(Value::Count(n)))),
            }
        }
    }
}

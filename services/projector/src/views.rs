//! The views, and how one event changes them.
//!
//! The projector keeps the domain state in memory (loaded from the store at start) and
//! folds each event with the domain's own `State::apply`, so the views never disagree
//! with the rules. After each event it writes the records of everything the event
//! touched:
//!
//! | key | value |
//! |-----|-------|
//! | `daemon\0<daemon>` | [`DaemonView`] |
//! | `project\0<project>` | [`ProjectView`] |
//! | `job\0<job>` | [`JobView`], with the sequences of the job's events |
//! | `move\0<move>` | [`MoveView`] |
//! | `alert\0<TYPE>\0<about>` | [`AlertView`]: the last alert of that type about that daemon or job, open or closed |
//! | `events\0<n>` | events `n*64` to `n*64+63` as stored in the stream, framed |
//! | `hist\0daemon\0<daemon>\0<n>` | the sequences of the daemon's events among `n*1024` to `n*1024+1023` |
//!
//! A daemon's view lists the jobs it owns (its assignments); a job's view lists the
//! sequences of its events (its history). Records are written once per batch however
//! many of its events touched them, and events are kept in chunks, so a rebuild writes
//! far fewer records than events. Chunks cover fixed ranges of sequences, so the store's
//! contents depend only on the events, never on how they were batched.
//!
//! Sequences in keys are 20-digit zero-padded decimals, so key order is stream order.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use handoff_domain::alert::{self, AlertKey, AlertKind};
use handoff_domain::model::MovePhase;
use handoff_domain::{CommandId, DaemonId, Event, JobId, ProjectId, State};
use handoff_eventlog::Recorded;
pub use handoff_protocol::views::{
    AlertView, AssignmentView, DaemonView, HistoryEntry, JobView, MoveStatus, MoveView, ProjectView,
};

use serde::Serialize;

use crate::store::{StoreError, ViewStore, Write};

pub fn daemon_key(d: &DaemonId) -> Vec<u8> {
    key(&["daemon", d.as_str()])
}
pub fn project_key(p: &ProjectId) -> Vec<u8> {
    key(&["project", p.as_str()])
}
pub fn job_key(j: &JobId) -> Vec<u8> {
    key(&["job", j.as_str()])
}
pub fn move_key(m: &CommandId) -> Vec<u8> {
    key(&["move", m.as_str()])
}
pub fn alert_key(a: &AlertKey) -> Vec<u8> {
    key(&["alert", a.kind.as_str(), &a.about])
}
/// Events per chunk of stored events.
pub const EVENTS_PER_CHUNK: u64 = 64;
/// Sequences per chunk of a daemon's history.
pub const HISTORY_PER_CHUNK: u64 = 1024;

/// The key of the chunk holding event `seq`.
pub fn events_key(seq: u64) -> Vec<u8> {
    key(&["events", &format!("{:020}", seq / EVENTS_PER_CHUNK)])
}

fn parse_number(digits: &[u8]) -> Option<u64> {
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// Appends one event to a batch's framed events: sequence (8 bytes, big endian), length
/// (4 bytes, big endian), the payload.
fn frame(out: &mut Vec<u8>, seq: u64, payload: &[u8]) {
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
}

/// The payload of event `seq` among a batch's framed events.
pub fn find_framed(mut framed: &[u8], seq: u64) -> Option<&[u8]> {
    while framed.len() >= 12 {
        let s = u64::from_be_bytes(framed[..8].try_into().ok()?);
        let len = u32::from_be_bytes(framed[8..12].try_into().ok()?) as usize;
        let payload = framed.get(12..12 + len)?;
        if s == seq {
            return Some(payload);
        }
        framed = &framed[12 + len..];
    }
    None
}
/// The key of the chunk of `d`'s history holding `seq`.
pub fn history_daemon_key(d: &DaemonId, seq: u64) -> Vec<u8> {
    key(&[
        "hist",
        "daemon",
        d.as_str(),
        &format!("{:020}", seq / HISTORY_PER_CHUNK),
    ])
}

/// Joins parts with NUL, which no id may contain; a prefix query ends with a NUL.
pub fn key(parts: &[&str]) -> Vec<u8> {
    parts.join("\0").into_bytes()
}

/// A prefix covering every key under `parts`.
pub fn prefix(parts: &[&str]) -> Vec<u8> {
    let mut k = key(parts);
    k.push(0);
    k
}

fn json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("views always serialize")
}

/// A record to store, not yet serialised: the writer thread serialises it, so that work
/// overlaps the fold of the next batch.
pub enum Value {
    Bytes(Vec<u8>),
    Seqs(Vec<u64>),
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
            Value::Seqs(s) => json(&s),
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
/// not keep, and what changed since the last [`Views::drain`].
#[derive(Default)]
pub struct Views {
    state: State,
    moves: BTreeMap<CommandId, MoveView>,
    /// The last alert of each type about each thing.
    alerts: BTreeMap<AlertKey, AlertView>,
    /// Each job's events, by sequence.
    job_history: HashMap<JobId, Vec<u64>>,
    /// The last chunk of events, as stored plus what this batch added.
    events: (u64, Vec<u8>),
    /// Each daemon's last history chunk.
    daemon_history: HashMap<DaemonId, (u64, Vec<u64>)>,
    dirty: Dirty,
}

/// Records to write at the end of a batch: each is serialized once however many events
/// of the batch touched it.
#[derive(Default)]
struct Dirty {
    daemons: HashSet<DaemonId>,
    projects: BTreeSet<ProjectId>,
    jobs: HashSet<JobId>,
    moves: BTreeSet<CommandId>,
    alerts: BTreeSet<AlertKey>,
    /// History chunks to write: the daemons whose last chunk changed, and chunks this
    /// batch filled up.
    daemon_history: HashSet<DaemonId>,
    full_history_chunks: Vec<Change>,
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
            views.state.daemons.insert(d.daemon, d.state);
        }
        for (_, v) in store.scan(&prefix(&["project"]))? {
            let p: ProjectView = serde_json::from_slice(&v).map_err(corrupt)?;
            views.state.projects.insert(p.project, p.state);
        }
        for (_, v) in store.scan(&prefix(&["job"]))? {
            let j: JobView = serde_json::from_slice(&v).map_err(corrupt)?;
            views.job_history.insert(j.job.clone(), j.history);
            views.state.jobs.insert(j.job, j.state);
        }
        let events = prefix(&["events"]);
        if let Some((k, v)) = store.last_below(&key(&["events", "~"]))? {
            if let Some(n) = k.strip_prefix(events.as_slice()).and_then(parse_number) {
                views.events = (n, v);
            }
        }
        for (k, v) in store.scan(&prefix(&["hist", "daemon"]))? {
            let mut parts = k.split(|b| *b == 0).skip(2);
            let (Some(d), Some(n)) = (parts.next(), parts.next().and_then(parse_number)) else {
                continue;
            };
            let d = std::str::from_utf8(d)
                .ok()
                .and_then(|d| DaemonId::new(d).ok());
            let seqs: Vec<u64> = serde_json::from_slice(&v).map_err(corrupt)?;
            if let Some(d) = d {
                // Keys come in order: the last chunk of each daemon wins.
                views.daemon_history.insert(d, (n, seqs));
            }
        }
        for (_, v) in store.scan(&prefix(&["move"]))? {
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
                    jobs: m.jobs.clone(),
                },
            );
            views.moves.insert(m.move_id.clone(), m);
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
        Ok(views)
    }

    /// Folds one event (`payload` as stored in the stream); what it changed is written by
    /// the next [`Views::drain`].
    pub fn apply(&mut self, r: &Recorded, payload: &[u8]) {
        let event = &r.envelope.event;
        let jobs: Vec<&JobId> = event.jobs();
        // A job's previous owner loses it: its daemon view changes too.
        for j in &jobs {
            if let Some(job) = self.state.jobs.get(*j) {
                if !self.dirty.daemons.contains(job.owner()) {
                    self.dirty.daemons.insert(job.owner().clone());
                }
            }
        }
        self.state.apply(event);
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
            self.alerts.insert(key.clone(), view);
            self.dirty.alerts.insert(key);
        }
        for j in &jobs {
            if self.state.jobs.contains_key(*j) {
                self.job_history
                    .entry((*j).clone())
                    .or_default()
                    .push(r.seq);
                if !self.dirty.jobs.contains(*j) {
                    self.dirty.jobs.insert((*j).clone());
                }
            }
        }
        for d in event.daemons() {
            let chunk = r.seq / HISTORY_PER_CHUNK;
            let open = self
                .daemon_history
                .entry(d.clone())
                .or_insert((chunk, Vec::new()));
            if open.0 != chunk {
                let full = std::mem::replace(open, (chunk, Vec::new()));
                self.dirty.full_history_chunks.push((
                    history_daemon_key(d, full.0 * HISTORY_PER_CHUNK),
                    Some(Value::Seqs(full.1)),
                ));
            }
            open.1.push(r.seq);
            self.dirty.daemon_history.insert(d.clone());
            if !self.dirty.daemons.contains(d) {
                self.dirty.daemons.insert(d.clone());
            }
        }
        if let Event::ProjectConfigured { project, .. } = event {
            self.dirty.projects.insert(project.clone());
        }
        if let Some(move_id) = move_of(event) {
            if let Some(m) = self.state.moves.get(move_id) {
                let view = self
                    .moves
                    .entry(move_id.clone())
                    .or_insert_with(|| MoveView {
                        move_id: move_id.clone(),
                        scope: m.scope.clone(),
                        from: m.from.clone(),
                        to: m.to.clone(),
                        reason: m.reason.clone(),
                        actor: r.envelope.actor.to_string(),
                        started_at: r.envelope.at,
                        updated_at: r.envelope.at,
                        planned: m.planned,
                        jobs: BTreeMap::new(),
                        status: MoveStatus::InProgress,
                        automatic: m.automatic,
                    });
                view.updated_at = r.envelope.at;
                self.dirty.moves.insert(move_id.clone());
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
        writes.append(&mut dirty.full_history_chunks);
        for d in dirty.daemon_history {
            if let Some((chunk, seqs)) = self.daemon_history.get(&d) {
                writes.push((
                    history_daemon_key(&d, chunk * HISTORY_PER_CHUNK),
                    Some(Value::Seqs(seqs.clone())),
                ));
            }
        }
        for d in dirty.daemons {
            if let Some(daemon) = self.state.daemons.get(&d) {
                let view = DaemonView {
                    free_bytes: daemon.free_bytes(),
                    state: daemon.clone(),
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
        for j in dirty.jobs {
            if let Some(job) = self.state.jobs.get(&j) {
                let view = JobView {
                    owner: job.owner().clone(),
                    history: self.job_history.get(&j).cloned().unwrap_or_default(),
                    state: job.clone(),
                    job: j,
                };
                writes.push((job_key(&view.job), Some(Value::Job(Box::new(view)))));
            }
        }
        for a in dirty.alerts {
            if let Some(view) = self.alerts.get(&a) {
                writes.push((alert_key(&a), Some(Value::Alert(Box::new(view.clone())))));
            }
        }
        for m in dirty.moves {
            if let (Some(state), Some(view)) = (self.state.moves.get(&m), self.moves.get_mut(&m)) {
                view.jobs.clone_from(&state.jobs);
                view.planned = state.planned;
                let interrupted = AlertKey::new(AlertKind::MoveInterrupted, &m);
                view.status = if self.state.alerts.contains(&interrupted) {
                    MoveStatus::Interrupted
                } else {
                    move_status(state.planned, &state.jobs)
                };
                writes.push((move_key(&m), Some(Value::Move(Box::new(view.clone())))));
            }
        }
    }
}

fn move_of(event: &Event) -> Option<&CommandId> {
    match event {
        Event::MoveStarted { move_id, .. }
        | Event::MoveInterrupted { move_id, .. }
        | Event::MoveResumed { move_id, .. }
        | Event::JobMoveStarted { move_id, .. }
        | Event::JobMovePhaseReported { move_id, .. }
        | Event::JobMoveCompleted { move_id, .. }
        | Event::JobMoveFailed { move_id, .. } => Some(move_id),
        _ => None,
    }
}

fn move_status(planned: u32, jobs: &BTreeMap<JobId, MovePhase>) -> MoveStatus {
    if (jobs.len() as u32) < planned || jobs.values().any(|p| !p.is_final()) {
        return MoveStatus::InProgress;
    }
    let failed = jobs.values().filter(|p| **p == MovePhase::Failed).count();
    match failed {
        0 => MoveStatus::Completed,
        n if n == jobs.len() => MoveStatus::Failed,
        _ => MoveStatus::PartlyFailed,
    }
}

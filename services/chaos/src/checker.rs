//! The checker: reads only the recorded history, the event stream (folded here, not
//! through any view of handoff's) and the stores after the run, and reports every
//! invariant that does not hold, with its evidence.
//!
//! 1. Every command answered as applied has its events in the stream, each once; no
//!    command answered as refused has any.
//! 2. Folding the stream, no job is held by two daemons after any command, and every job
//!    ends held by exactly one registered daemon, the one the state names.
//! 3. Every projector's views equal a fresh rebuild, key for key (done by the caller
//!    through [`compare_views`]).
//! 4. Every completed move's head checksum equals the source's at the head's timestamp.
//! 5. No snapshot is stored after one of a newer epoch of the same job, and each was cut
//!    by a daemon that held the job at its epoch; no head record names an epoch the job
//!    has gone past while its fence says so.
//! 6. Every move has ended, or has an open MOVE_STUCK alert.
//! 7. No DAEMON_DOWN was raised for a daemon that the nemesis had not silenced.
//! 8. A drain starts a move only while it is in progress and fewer than its limit of the
//!    daemon's jobs are moving away; a draining daemon is never a move's destination;
//!    a drain completes only when its daemon holds no job but those it left.
//!
//! The stream checks are pure functions of the history and the events, tested with
//! histories that break each rule.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use handoff_domain::model::AlertKind;
use handoff_domain::{CommandId, DaemonId, Event, JobId, State};
use handoff_eventlog::Recorded;

use crate::nemesis::Silence;
use crate::workload::{Op, Outcome};

/// One invariant that did not hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    pub rule: u8,
    pub evidence: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "violation of rule {}: {}", self.rule, self.evidence)
    }
}

fn v(rule: u8, evidence: String) -> Violation {
    Violation { rule, evidence }
}

/// Rule 1: applied commands have their events once; refused ones have none.
pub fn commands(history: &[Op], events: &[Recorded]) -> Vec<Violation> {
    let mut by_command: HashMap<&CommandId, Vec<&Recorded>> = HashMap::new();
    for r in events {
        by_command.entry(&r.envelope.command).or_default().push(r);
    }
    let mut out = Vec::new();
    for op in history {
        let stored: BTreeSet<u64> = by_command
            .get(&op.id)
            .map(|rs| rs.iter().map(|r| r.seq).collect())
            .unwrap_or_default();
        match &op.outcome {
            Outcome::Applied { seqs } => {
                let answered: BTreeSet<u64> = seqs.iter().copied().collect();
                if answered != stored {
                    out.push(v(
                        1,
                        format!(
                            "{} {} (client {}) was answered as applied with events {answered:?}, the stream holds {stored:?}",
                            op.command, op.id, op.client
                        ),
                    ));
                }
            }
            Outcome::Refused { reason } if !stored.is_empty() => out.push(v(
                1,
                format!(
                    "{} {} (client {}) was refused ({reason}) but the stream holds its events {stored:?}",
                    op.command, op.id, op.client
                ),
            )),
            _ => {}
        }
    }
    // Each command's events once: no two alike on the same subject.
    for (id, rs) in &by_command {
        let mut seen: HashMap<(String, String), u64> = HashMap::new();
        for r in rs {
            let body = serde_json::to_string(&r.envelope.event).unwrap_or_default();
            if let Some(first) = seen.insert((r.subject.clone(), body), r.seq) {
                out.push(v(
                    1,
                    format!(
                        "command {id} appended the same {} on {} twice: sequences {first} and {}",
                        r.envelope.event.type_name(),
                        r.subject,
                        r.seq
                    ),
                ));
            }
        }
    }
    out
}

/// Rule 2: one holder per job after every command, and one registered owner at the end.
pub fn owners(events: &[Recorded], state: &State) -> Vec<Violation> {
    let mut holders: BTreeMap<JobId, BTreeSet<DaemonId>> = BTreeMap::new();
    // A move's destination holds the job from its start; a failed move ends that (the
    // destination is fenced, not released on its own subject).
    let mut destination: BTreeMap<JobId, DaemonId> = BTreeMap::new();
    let mut out = Vec::new();
    let mut reported: BTreeSet<JobId> = BTreeSet::new();
    for (k, r) in events.iter().enumerate() {
        match &r.envelope.event {
            Event::BackupJobCreated { job, daemon, .. } => {
                holders
                    .entry(job.clone())
                    .or_default()
                    .insert(daemon.clone());
            }
            Event::JobsAssigned { daemon, jobs, .. } => {
                for j in jobs {
                    holders
                        .entry(j.job.clone())
                        .or_default()
                        .insert(daemon.clone());
                }
            }
            Event::JobsReleased { daemon, jobs, .. } => {
                for j in jobs {
                    holders.entry(j.clone()).or_default().remove(daemon);
                }
            }
            Event::JobMoveStarted { job, to, .. } => {
                destination.insert(job.clone(), to.clone());
                continue;
            }
            Event::JobMoveCompleted { job, .. } => {
                destination.remove(job);
                continue;
            }
            Event::JobMoveFailed { job, .. } => {
                if let Some(to) = destination.remove(job) {
                    holders.entry(job.clone()).or_default().remove(&to);
                }
            }
            _ => continue,
        }
        // Judged where a command's events end: a move assigns and releases in one unit.
        let command_ends = events
            .get(k + 1)
            .is_none_or(|next| next.envelope.command != r.envelope.command);
        if !command_ends {
            continue;
        }
        for (job, held) in &holders {
            if held.len() > 1 && reported.insert(job.clone()) {
                out.push(v(
                    2,
                    format!("after sequence {} job {job} is held by {held:?}", r.seq),
                ));
            }
        }
    }
    for (job, j) in &state.jobs {
        let held = holders.get(job).cloned().unwrap_or_default();
        let owner = j.owner();
        if held.len() != 1 || !held.contains(owner) {
            out.push(v(
                2,
                format!("job {job} ends held by {held:?}, the state names {owner}"),
            ));
        }
        if !state.daemons.contains_key(owner) {
            out.push(v(
                2,
                format!("job {job} ends on {owner}, which is not registered"),
            ));
        }
    }
    out
}

/// Rule 8: drains keep their limit, take no job, and complete only when done.
pub fn drains(events: &[Recorded]) -> Vec<Violation> {
    let mut state = State::default();
    let mut out = Vec::new();
    for r in events {
        let e = &r.envelope.event;
        match e {
            Event::JobMoveStarted {
                job,
                move_id,
                from,
                to,
                ..
            } => {
                if let Some(drain) = state.drains.get(to) {
                    out.push(v(
                        8,
                        format!(
                            "#{}: {job} moves to {to}, which drains ({})",
                            r.seq, drain.id
                        ),
                    ));
                }
                if let Some(id) = state.moves.get(move_id).and_then(|m| m.drain.as_ref()) {
                    let moving = state.jobs_moving_from(from).count();
                    match state.drains.get(from).filter(|d| d.id == *id) {
                        None => out.push(v(
                            8,
                            format!("#{}: drain {id} started {job}'s move while not in progress", r.seq),
                        )),
                        Some(d) if moving >= d.max_concurrent as usize => out.push(v(
                            8,
                            format!(
                                "#{}: drain {id} started {job}'s move with {moving} moving away already (limit {})",
                                r.seq, d.max_concurrent
                            ),
                        )),
                        Some(_) => {}
                    }
                }
            }
            Event::DrainCompleted {
                daemon, drain_id, ..
            } => {
                let drain = state.drains.get(daemon).map(|d| d.id.clone());
                let held = state.daemons.get(daemon).map(|d| &d.jobs);
                if let (Some(drain), Some(held)) = (drain, held) {
                    let rest: Vec<&JobId> = held
                        .iter()
                        .filter(|j| state.jobs[*j].left_by_drain.as_ref() != Some(&drain))
                        .collect();
                    if !rest.is_empty() || state.jobs_moving_from(daemon).next().is_some() {
                        out.push(v(
                            8,
                            format!("#{}: drain {drain_id} completed with {rest:?} still on {daemon} or moving away", r.seq),
                        ));
                    }
                }
            }
            _ => {}
        }
        state.apply(e);
    }
    out
}

/// Rule 6: every move ended, or its MOVE_STUCK is open.
pub fn moves(state: &State) -> Vec<Violation> {
    let mut out = Vec::new();
    for (id, m) in &state.moves {
        for (job, phase) in &m.jobs {
            if phase.is_final() {
                continue;
            }
            let stuck = state
                .alerts
                .iter()
                .any(|a| a.kind == AlertKind::MoveStuck && a.about == job.as_str());
            if !stuck {
                out.push(v(
                    6,
                    format!("move {id} of {job} is still {phase:?} with no MOVE_STUCK alert"),
                ));
            }
        }
    }
    out
}

/// The nemesis's silences of each daemon, each lengthened to the first heartbeat the run
/// heard after it (a restarted daemon is silent until it has started), then merged where
/// they touch.
pub fn silences_heard(silences: &[Silence], heard: &BTreeMap<usize, Vec<u64>>) -> Vec<Silence> {
    let mut out: Vec<Silence> = silences
        .iter()
        .map(|s| {
            let back = heard
                .get(&s.daemon)
                .and_then(|beats| beats.iter().find(|t| **t > s.to_ms))
                .copied()
                .unwrap_or(u64::MAX);
            Silence {
                to_ms: back.max(s.to_ms),
                ..*s
            }
        })
        .collect();
    out.sort_by_key(|s| (s.daemon, s.from_ms));
    let mut merged: Vec<Silence> = Vec::new();
    for s in out {
        match merged.last_mut() {
            Some(m) if m.daemon == s.daemon && s.from_ms <= m.to_ms => {
                m.to_ms = m.to_ms.max(s.to_ms);
            }
            _ => merged.push(s),
        }
    }
    merged
}

/// How late a DAEMON_DOWN may be appended after the silence that earned it ended: the
/// monitor's report is retried with its id through command-service outages, so a true
/// report can land after the daemon came back (DAEMON_UP follows it).
pub const REPORT_DELAY_MS: u64 = 60_000;

/// Rule 7: a DAEMON_DOWN only for a daemon that the nemesis silenced (killed or froze)
/// for at least the threshold (`down_after_ms`, less `slack_ms` for the monitor's tick),
/// appended after that much of the silence and at most [`REPORT_DELAY_MS`] after it.
pub fn downs(
    events: &[Recorded],
    daemons: &[DaemonId],
    silences: &[Silence],
    down_after_ms: u64,
    slack_ms: u64,
    timeline: &[(u64, String)],
) -> Vec<Violation> {
    let mut out = Vec::new();
    for r in events {
        let Event::DaemonDown { daemon } = &r.envelope.event else {
            continue;
        };
        let Some(n) = daemons.iter().position(|d| d == daemon) else {
            continue;
        };
        let at = r.envelope.at;
        let earned = down_after_ms.saturating_sub(slack_ms);
        let silenced = silences.iter().any(|s| {
            s.daemon == n
                && s.to_ms.saturating_sub(s.from_ms) >= earned
                && s.from_ms + earned <= at
                && at <= s.to_ms.saturating_add(REPORT_DELAY_MS)
        });
        if !silenced {
            let before: Vec<String> = timeline
                .iter()
                .filter(|(t, _)| *t + 2 * down_after_ms >= at && *t <= at)
                .map(|(t, what)| format!("{what} {} ms before", at - t))
                .collect();
            out.push(v(
                7,
                format!(
                    "DAEMON_DOWN of {daemon} at sequence {} ({at} ms) while its heartbeats kept coming; faults before it: {before:?}",
                    r.seq
                ),
            ));
        }
    }
    out
}

/// The epochs at which each daemon held each job, by the stream.
pub fn held_epochs(events: &[Recorded]) -> BTreeSet<(JobId, DaemonId, u64)> {
    let mut out = BTreeSet::new();
    for r in events {
        match &r.envelope.event {
            Event::BackupJobCreated {
                job, daemon, epoch, ..
            } => {
                out.insert((job.clone(), daemon.clone(), *epoch));
            }
            Event::JobsAssigned { daemon, jobs, .. } => {
                for j in jobs {
                    out.insert((j.job.clone(), daemon.clone(), j.epoch));
                }
            }
            _ => {}
        }
    }
    out
}

/// One stored snapshot, as rule 5 sees it.
#[derive(Clone, Debug)]
pub struct Stored {
    pub id: String,
    /// The oplog point it holds, as (seconds, increment).
    pub ts: (u32, u32),
    pub epoch: u64,
    /// Who cut it: a daemon, or none for the agent's initial sync.
    pub daemon: Option<DaemonId>,
}

/// Rule 5 for the snapshots of one job: a snapshot holding a later point than one of a
/// newer epoch was written by an owner that had lost the job (a new owner rebuilds from
/// the stored oplog, which is ahead of anything the old owner applied before the fence
/// rose), and each was cut by a daemon that held the job at its epoch.
pub fn snapshots(
    job: &JobId,
    stored: &[Stored],
    held: &BTreeSet<(JobId, DaemonId, u64)>,
) -> Vec<Violation> {
    let mut out = Vec::new();
    for s in stored {
        let newer = stored.iter().find(|o| o.ts < s.ts && o.epoch > s.epoch);
        if let Some(o) = newer {
            out.push(v(
                5,
                format!(
                    "snapshot {} of {job} at epoch {} holds {:?}, after snapshot {} at epoch {} held {:?}",
                    s.id, s.epoch, s.ts, o.id, o.epoch, o.ts
                ),
            ));
        }
        if let Some(d) = &s.daemon {
            if !held.contains(&(job.clone(), d.clone(), s.epoch)) {
                out.push(v(
                    5,
                    format!(
                        "snapshot {} of {job} names {d} at epoch {}, which never held it then",
                        s.id, s.epoch
                    ),
                ));
            }
        }
    }
    out
}

/// Rule 3: two dumps of view stores, key for key.
pub fn compare_views(
    name: &str,
    live: &[(Vec<u8>, Vec<u8>)],
    fresh: &[(Vec<u8>, Vec<u8>)],
) -> Vec<Violation> {
    let live: BTreeMap<&[u8], &[u8]> = live.iter().map(|(k, v)| (&k[..], &v[..])).collect();
    let fresh: BTreeMap<&[u8], &[u8]> = fresh.iter().map(|(k, v)| (&k[..], &v[..])).collect();
    let mut out = Vec::new();
    for key in live.keys().chain(fresh.keys()).collect::<BTreeSet<_>>() {
        if live.get(key) != fresh.get(key) {
            out.push(v(
                3,
                format!(
                    "{name}'s view {} differs from a rebuild: {:?} vs {:?}",
                    String::from_utf8_lossy(key),
                    live.get(key)
                        .map(|b| String::from_utf8_lossy(b).into_owned()),
                    fresh
                        .get(key)
                        .map(|b| String::from_utf8_lossy(b).into_owned()),
                ),
            ));
            if out.len() >= 5 {
                break;
            }
        }
    }
    out
}

#[cfg(test)]
#[path = "checker_tests.rs"]
mod tests;

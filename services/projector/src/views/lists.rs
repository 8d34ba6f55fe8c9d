//! Where each record is listed: the index entries (and counters) a job, a move or an
//! alert belongs to. The fold writes what changed between two of these.

use handoff_domain::state::Assignment;
use handoff_domain::JobId;

use super::keys::{alert_index, key, prefix, seq_text};
use super::{AlertView, MoveView};

/// Where a record is listed: each entry is a key written (with its value) while the
/// record belongs there, counted by the counter of `counted` (a prefix of the key). An
/// entry with no value is only counted: the record's own key (written apart), and a job in
/// its project (whose jobs are the records under its name).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Listed {
    pub(super) key: Vec<u8>,
    pub(super) value: Option<Vec<u8>>,
    pub(super) counted: Vec<u8>,
}

impl Listed {
    fn under(counted: Vec<u8>, rest: &[&str], value: Vec<u8>) -> Self {
        let mut key = counted.clone();
        key.extend_from_slice(&self::key(rest));
        Listed {
            key,
            value: Some(value),
            counted,
        }
    }

    fn record(counted: Vec<u8>, rest: &[&str]) -> Self {
        Listed {
            value: None,
            ..Listed::under(counted, rest, Vec::new())
        }
    }
}

/// The lists a job is in.
pub(super) fn job_lists(id: &JobId, job: Option<&handoff_domain::state::Job>) -> Vec<Listed> {
    let Some(job) = job else { return Vec::new() };
    let j = id.as_str();
    let mut out = vec![
        Listed::record(prefix(&["job"]), &[j]),
        Listed::under(
            prefix(&["ix", "daemon", job.owner().as_str()]),
            &[j],
            Vec::new(),
        ),
        // Counted only: a project's jobs are the records under its name, which the id
        // starts with (so counted by the id's project, as they are listed).
        Listed::record(prefix(&["ix", "project", id.project().as_str()]), &[j]),
    ];
    if let Assignment::Moving { from, .. } = &job.assignment {
        out.push(Listed::under(prefix(&["ix", "moving"]), &[j], Vec::new()));
        if from != job.owner() {
            out.push(Listed::under(
                prefix(&["ix", "daemon", from.as_str()]),
                &[j],
                Vec::new(),
            ));
        }
    }
    out
}

/// The lists a move is in.
pub(super) fn move_lists(view: Option<&MoveView>) -> Vec<Listed> {
    let Some(m) = view else { return Vec::new() };
    let id = m.move_id.as_str();
    vec![
        Listed::record(prefix(&["move"]), &[id]),
        Listed::under(
            prefix(&["ix", "move", m.status.as_str()]),
            &[id],
            Vec::new(),
        ),
    ]
}

/// The lists an alert is in: every alert, and the open ones; of every type and of its own.
pub(super) fn alert_lists(view: Option<&AlertView>) -> Vec<Listed> {
    let Some(a) = view else { return Vec::new() };
    let kind = a.kind.as_str();
    let seq = seq_text(a.raised_seq);
    let record = key(&[kind, &a.about]);
    let mut out = vec![Listed::record(prefix(&["alert"]), &[kind, &a.about])];
    let mut sets = vec![false];
    if a.is_open() {
        sets.push(true);
    }
    for open in sets {
        out.push(Listed::under(
            alert_index(open, None),
            &[&seq, kind, &a.about],
            record.clone(),
        ));
        out.push(Listed::under(
            alert_index(open, Some(a.kind)),
            &[&seq, &a.about],
            record.clone(),
        ));
    }
    out
}

//! What decisions read of the state beyond its maps: the moving jobs, the rebuilds per
//! daemon, the daemons down.

use std::collections::{BTreeMap, BTreeSet};

use super::{Assignment, DaemonStatus, State};
use crate::ids::{DaemonId, JobId};
use crate::model::Liveness;

impl State {
    /// The jobs moving now, each with its move's source and destination: read from the
    /// moves in progress (every moving job is in its move), so it costs the moves in
    /// progress, not the fleet.
    pub fn moving_jobs(&self) -> impl Iterator<Item = (&JobId, &DaemonId, &DaemonId)> {
        self.moves.iter().flat_map(move |(id, m)| {
            m.jobs
                .keys()
                .filter_map(move |j| match self.jobs.get(j).map(|x| &x.assignment) {
                    Some(Assignment::Moving {
                        move_id, from, to, ..
                    }) if move_id == id => Some((j, from, to)),
                    _ => None,
                })
        })
    }

    /// Jobs moving now, in every move.
    pub fn moving(&self) -> u32 {
        self.moving_jobs().count() as u32
    }

    /// Jobs being rebuilt on each daemon now (a daemon rebuilding none is absent).
    pub fn rebuilding(&self) -> BTreeMap<&DaemonId, u32> {
        let mut out = BTreeMap::new();
        for (_, _, to) in self.moving_jobs() {
            *out.entry(to).or_insert(0) += 1;
        }
        out
    }

    /// Jobs being rebuilt on `daemon` now.
    pub fn rebuilding_on(&self, daemon: &DaemonId) -> u32 {
        self.moving_jobs()
            .filter(|(_, _, to)| *to == daemon)
            .count() as u32
    }

    /// The daemons that are down, and how many are active (not removed).
    pub fn down_of_active(&self) -> (Vec<DaemonId>, u32) {
        let mut down = Vec::new();
        let mut active = 0;
        for (id, d) in &self.daemons {
            match d.status {
                DaemonStatus::Active(l) => {
                    active += 1;
                    if l == Liveness::Down {
                        down.push(id.clone());
                    }
                }
                DaemonStatus::Removed => {}
            }
        }
        (down, active)
    }

    /// Jobs currently moving away from `daemon`.
    pub fn jobs_moving_from<'a>(&'a self, daemon: &'a DaemonId) -> impl Iterator<Item = &'a JobId> {
        let moving: BTreeSet<&JobId> = self
            .moving_jobs()
            .filter(move |(_, from, _)| *from == daemon)
            .map(|(j, _, _)| j)
            .collect();
        moving.into_iter()
    }
}

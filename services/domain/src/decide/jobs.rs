//! Projects and their backup jobs: a project's filters, creating a deployment's jobs with
//! Ops Manager's placement, and the agent's oplog TTL reports.

use std::collections::BTreeMap;

use super::{filter_rejection, Decision};
use crate::command::{ConfigureProject, CreateBackupJobs, ResizeOplogTtl};
use crate::event::{AssignedJob, AssignmentCause, Event};
use crate::ids::{DaemonId, JobId};
use crate::model::{Deployment, HeadDiskType, JobSize, JobTarget, SSD_OPLOG_RATE_BYTES_PER_HOUR};
use crate::rejection::{Kind, Rejection};
use crate::state::{Daemon, State};

pub(super) fn configure_project(c: &ConfigureProject) -> Result<Decision, Rejection> {
    Ok(Decision::one(vec![Event::ProjectConfigured {
        project: c.project.clone(),
        daemon_filter: c.daemon_filter.iter().cloned().collect(),
        label_filter: c.label_filter.iter().cloned().collect(),
    }]))
}

pub(super) fn create_backup_jobs(
    c: &CreateBackupJobs,
    state: &State,
) -> Result<Decision, Rejection> {
    if !state.projects.contains_key(&c.project) {
        return Err(Rejection::NotFound {
            kind: Kind::Project,
            id: c.project.to_string(),
        });
    }
    let mut wanted: Vec<(JobId, JobTarget, JobSize)> = Vec::new();
    match &c.deployment {
        Deployment::ReplicaSet { name, size } => wanted.push((
            JobId::of(&c.project, name, None),
            JobTarget::ReplicaSet { name: name.clone() },
            *size,
        )),
        Deployment::ShardedCluster {
            name,
            shards,
            config_servers,
        } => {
            for s in shards {
                wanted.push((
                    JobId::of(&c.project, name, Some(s.name.as_str())),
                    JobTarget::Shard {
                        cluster: name.clone(),
                        shard: s.name.clone(),
                    },
                    s.size,
                ));
            }
            wanted.push((
                JobId::of(&c.project, name, Some("config")),
                JobTarget::ConfigServers {
                    cluster: name.clone(),
                },
                *config_servers,
            ));
        }
    }
    if let Some((job, ..)) = wanted.iter().find(|(j, ..)| state.jobs.contains_key(j)) {
        return Err(Rejection::AlreadyExists {
            kind: Kind::Job,
            id: job.to_string(),
        });
    }

    // Head space taken by the jobs placed so far in this command.
    let mut reserved: BTreeMap<&DaemonId, (u64, usize)> = BTreeMap::new();
    let mut created = Vec::new();
    let mut assigned: BTreeMap<DaemonId, Vec<AssignedJob>> = BTreeMap::new();
    for (job, target, size) in wanted {
        let chosen = place(state, &job, &size, &reserved)?;
        let r = reserved.entry(chosen).or_default();
        // Bounded by the daemon's free space, which `place` checked; saturating all the same.
        r.0 = r.0.saturating_add(size.head_size_bytes);
        r.1 += 1;
        assigned
            .entry(chosen.clone())
            .or_default()
            .push(AssignedJob {
                job: job.clone(),
                epoch: 1,
            });
        created.push(Event::BackupJobCreated {
            job,
            project: c.project.clone(),
            target,
            size,
            daemon: chosen.clone(),
            epoch: 1,
        });
    }
    created.extend(
        assigned
            .into_iter()
            .map(|(daemon, jobs)| Event::JobsAssigned {
                daemon,
                cause: AssignmentCause::Placement,
                jobs,
            }),
    );
    Ok(Decision::one(created))
}

/// Ops Manager's binding: up, assignment and backup jobs enabled, the project's filters,
/// room for the head; HDD unless the oplog runs at 1 GB/h or more (or no HDD daemon can
/// take it); least loaded first.
fn place<'a>(
    state: &'a State,
    job: &JobId,
    size: &JobSize,
    reserved: &BTreeMap<&DaemonId, (u64, usize)>,
) -> Result<&'a DaemonId, Rejection> {
    let mut candidates: Vec<(&DaemonId, &Daemon, u64, usize)> = Vec::new();
    let mut seen_any = false;
    for (id, d) in &state.daemons {
        if !(d.is_up() && d.settings.assignment_enabled && d.settings.backup_jobs_enabled) {
            continue;
        }
        if filter_rejection(state, job, id, d).is_some() {
            continue;
        }
        seen_any = true;
        let (extra_bytes, extra_jobs) = reserved.get(id).copied().unwrap_or_default();
        let free = d.free_bytes().saturating_sub(extra_bytes);
        if free < size.head_size_bytes {
            continue;
        }
        candidates.push((id, d, free, d.jobs.len() + extra_jobs));
    }
    let preferred = if size.oplog_bytes_per_hour >= SSD_OPLOG_RATE_BYTES_PER_HOUR {
        HeadDiskType::Ssd
    } else {
        HeadDiskType::Hdd
    };
    // Preferred disk type, then fewest jobs, then most free space, then id.
    let best = candidates.iter().min_by_key(|(id, d, free, jobs)| {
        (
            d.settings.head_disk_type != preferred,
            *jobs,
            std::cmp::Reverse(*free),
            *id,
        )
    });
    match best {
        Some((id, ..)) => Ok(id),
        None => Err(Rejection::BindFailure {
            job: job.clone(),
            detail: if seen_any {
                format!(
                    "no eligible daemon has {} bytes of head space free",
                    size.head_size_bytes
                )
            } else {
                "no daemon is up with assignment and backup jobs enabled and passing the \
                 project's filters"
                    .to_owned()
            },
        }),
    }
}

pub(super) fn resize_oplog_ttl(c: &ResizeOplogTtl, state: &State) -> Result<Decision, Rejection> {
    if !state.jobs.contains_key(&c.job) {
        return Err(Rejection::NotFound {
            kind: Kind::Job,
            id: c.job.to_string(),
        });
    }
    Ok(Decision::one(vec![Event::OplogTtlResized {
        job: c.job.clone(),
        previous_hours: c.previous_hours,
        hours: c.hours,
        reason: c.reason.clone(),
    }]))
}

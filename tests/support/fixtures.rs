//! Ids and commands of the tests' fleets: daemon `n` is `backup<n>.example.net`, jobs are
//! replica sets of a project, and every command is one the tests send again and again.

use handoff_domain::command::*;
use handoff_domain::model::{DaemonSettings, Deployment, HeadDiskType, HeadPoint, JobSize};
use handoff_domain::{Command, CommandId, DaemonId, Event, JobId, Label, ProjectId};
use handoff_eventlog::Recorded;

/// A fresh command id, from the one source of ids.
pub fn new_id() -> CommandId {
    handoff_client::new_command_id()
}

pub fn daemon(n: usize) -> DaemonId {
    DaemonId::new(format!("backup{n}.example.net:/data/backup/")).expect("a valid daemon id")
}

pub fn project(name: &str) -> ProjectId {
    ProjectId::new(name).expect("a valid project id")
}

pub fn job(id: &str) -> JobId {
    JobId::new(id).expect("a valid job id")
}

/// Where a rebuilt head stands, as a destination reports it with `CompleteJobMove` (a
/// completion without it is refused).
pub fn rebuilt_head() -> Option<HeadPoint> {
    Some(HeadPoint {
        ts: "1700000000:1".into(),
        checksum: "3-9f3a".into(),
    })
}

pub fn label(l: &str) -> Label {
    Label::new(l).expect("a valid label")
}

/// Settings of an HDD daemon that takes work, with `gib` GiB of head space.
pub fn settings(gib: u64) -> DaemonSettings {
    DaemonSettings {
        head_space_bytes: gib << 30,
        num_workers: 4,
        head_disk_type: HeadDiskType::Hdd,
        ..DaemonSettings::default()
    }
}

pub fn register(n: usize, settings: DaemonSettings) -> Command {
    Command::RegisterDaemon(RegisterDaemon {
        daemon: daemon(n),
        settings,
    })
}

pub fn configure_project(name: &str) -> Command {
    Command::ConfigureProject(ConfigureProject {
        project: project(name),
        daemon_filter: vec![],
        label_filter: vec![],
    })
}

/// A replica set of `gib` GiB of head.
pub fn replica_set(project_name: &str, name: &str, gib: u64) -> Command {
    Command::CreateBackupJobs(CreateBackupJobs {
        project: project(project_name),
        deployment: Deployment::ReplicaSet {
            name: handoff_domain::ids::DeploymentName::new(name).expect("a valid name"),
            size: JobSize {
                head_size_bytes: gib << 30,
                oplog_bytes_per_hour: 1 << 20,
            },
        },
    })
}

pub fn move_jobs(from: usize, to: usize) -> Command {
    Command::MoveJobs(MoveJobs {
        from: daemon(from),
        to: daemon(to),
        reason: Some("server lost".into()),
        dry_run: false,
    })
}

pub fn move_job(j: &str, to: usize) -> Command {
    Command::MoveJob(MoveJob {
        job: job(j),
        to: daemon(to),
        reason: None,
        dry_run: false,
    })
}

/// The events of a kind, in stream order.
pub fn of_type<'a>(events: &'a [Recorded], kind: &str) -> Vec<&'a Event> {
    events
        .iter()
        .map(|r| &r.envelope.event)
        .filter(|e| e.type_name() == kind)
        .collect()
}

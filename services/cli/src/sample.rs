//! The sample fleet of `handoff up` and `handoff demo`: three daemons, two projects, two
//! replica sets and a sharded cluster, created through the signed API with fixed command
//! ids so that seeding twice changes nothing.

use handoff_domain::command::*;
use handoff_domain::ids::DeploymentName;
use handoff_domain::model::{DaemonSettings, Deployment, HeadDiskType, JobSize, Shard};
use handoff_domain::{Command, CommandId, DaemonId, Label, ProjectId};

use crate::Failure;

/// The sample fleet's daemons.
pub fn sample_daemon(n: usize) -> DaemonId {
    DaemonId::new(format!("backup{n}.example.net:/data/backup/")).expect("a valid daemon id")
}

/// The sample fleet: three daemons, two projects, two replica sets and a sharded
/// cluster. Each command has a fixed id, so seeding twice changes nothing.
pub fn sample_fleet() -> Vec<(CommandId, Command)> {
    let gib = |n: u64| n << 30;
    let daemon = |n: usize, disk: HeadDiskType, labels: &[&str]| {
        Command::RegisterDaemon(RegisterDaemon {
            daemon: sample_daemon(n),
            settings: DaemonSettings {
                head_space_bytes: gib(500),
                head_disk_type: disk,
                labels: labels
                    .iter()
                    .map(|l| Label::new(*l).expect("valid"))
                    .collect(),
                num_workers: 4,
                ..DaemonSettings::default()
            },
        })
    };
    let name = |s: &str| DeploymentName::new(s).expect("a valid name");
    let size = |head: u64, oplog: u64| JobSize {
        head_size_bytes: gib(head),
        oplog_bytes_per_hour: oplog,
    };
    let commands = vec![
        daemon(1, HeadDiskType::Hdd, &["eu"]),
        daemon(2, HeadDiskType::Hdd, &["eu"]),
        daemon(3, HeadDiskType::Ssd, &["eu"]),
        Command::ConfigureProject(ConfigureProject {
            project: ProjectId::new("sales").expect("valid"),
            daemon_filter: vec![],
            label_filter: vec![],
        }),
        Command::ConfigureProject(ConfigureProject {
            project: ProjectId::new("analytics").expect("valid"),
            daemon_filter: vec![],
            label_filter: vec![Label::new("eu").expect("valid")],
        }),
        Command::CreateBackupJobs(CreateBackupJobs {
            project: ProjectId::new("sales").expect("valid"),
            deployment: Deployment::ReplicaSet {
                name: name("orders"),
                size: size(40, 200_000_000),
            },
        }),
        Command::CreateBackupJobs(CreateBackupJobs {
            project: ProjectId::new("analytics").expect("valid"),
            deployment: Deployment::ReplicaSet {
                name: name("events"),
                size: size(60, 2_000_000_000),
            },
        }),
        Command::CreateBackupJobs(CreateBackupJobs {
            project: ProjectId::new("sales").expect("valid"),
            deployment: Deployment::ShardedCluster {
                name: name("catalog"),
                shards: vec![
                    Shard {
                        name: name("shard0"),
                        size: size(30, 100_000_000),
                    },
                    Shard {
                        name: name("shard1"),
                        size: size(30, 100_000_000),
                    },
                ],
                config_servers: size(1, 1_000_000),
            },
        }),
    ];
    commands
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let id = CommandId::new(format!("{:026}", i + 1)).expect("digits are a valid ULID");
            (id, c)
        })
        .collect()
}

/// Creates the sample fleet (again: each command's fixed id makes a repeat a no-op).
pub async fn seed(api: &crate::client::Api) -> Result<(), Failure> {
    for (id, command) in sample_fleet() {
        api.command(&id, &command).await?;
    }
    Ok(())
}

/// Waits until the projector's views include everything appended so far.
pub async fn settle(api: &crate::client::Api) -> Result<(), Failure> {
    let end = api.log().await?.last_sequence().await?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let s: handoff_protocol::api::query::Status =
            api.query("status", serde_json::json!({})).await?;
        if s.checkpoint >= end {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            return Err(Failure::Usage(
                "the projector did not catch up within 10 s".into(),
            ));
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

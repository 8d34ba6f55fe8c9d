//! Builders shared by the domain tests: a state made by deciding and applying commands,
//! exactly as the command service does.

#![allow(dead_code)]

use handoff_domain::command::*;
use handoff_domain::ids::DeploymentName;
use handoff_domain::model::{DaemonSettings, Deployment, HeadDiskType, JobSize, Shard};
use handoff_domain::{
    decide, Actor, Command, CommandId, Context, DaemonId, Decision, JobId, ProjectId, Rejection,
    State,
};

pub const GIB: u64 = 1 << 30;

pub fn d(n: usize) -> DaemonId {
    DaemonId::new(format!("backup{n}:/data/")).unwrap()
}

pub fn p(name: &str) -> ProjectId {
    ProjectId::new(name).unwrap()
}

pub fn j(id: &str) -> JobId {
    JobId::new(id).unwrap()
}

/// The n-th command id (valid ULIDs, ordered).
pub fn id(n: u64) -> CommandId {
    CommandId::new(format!("01J{:023}", n)).unwrap()
}

pub fn settings(gib: u64) -> DaemonSettings {
    DaemonSettings {
        head_space_bytes: gib * GIB,
        ..DaemonSettings::default()
    }
}

/// A state and a counter for command ids.
#[derive(Default)]
pub struct World {
    pub state: State,
    pub next: u64,
}

impl World {
    pub fn new() -> Self {
        World {
            next: 1,
            ..World::default()
        }
    }

    pub fn ctx(&mut self) -> Context {
        let c = Context {
            command: id(self.next),
            actor: Actor::new("admin").unwrap(),
            at_ms: self.next,
        };
        self.next += 1;
        c
    }

    /// Decides and, when accepted, applies the events.
    pub fn run(&mut self, command: Command) -> Result<Decision, Rejection> {
        let ctx = self.ctx();
        self.run_with(&ctx, command)
    }

    pub fn run_with(&mut self, ctx: &Context, command: Command) -> Result<Decision, Rejection> {
        let decision = decide(&command, ctx, &self.state)?;
        for e in decision.events() {
            self.state.apply(e);
        }
        Ok(decision)
    }

    pub fn ok(&mut self, command: Command) -> Decision {
        let name = command.name();
        self.run(command)
            .unwrap_or_else(|r| panic!("{name} refused: {r}"))
    }
}

pub fn register(n: usize, gib: u64) -> Command {
    Command::RegisterDaemon(RegisterDaemon {
        daemon: d(n),
        settings: settings(gib),
    })
}

pub fn register_with(n: usize, settings: DaemonSettings) -> Command {
    Command::RegisterDaemon(RegisterDaemon {
        daemon: d(n),
        settings,
    })
}

pub fn project(name: &str) -> Command {
    Command::ConfigureProject(ConfigureProject {
        project: p(name),
        daemon_filter: vec![],
        label_filter: vec![],
    })
}

pub fn rs(project: &str, name: &str, gib: u64) -> Command {
    rs_rate(project, name, gib, 0)
}

pub fn rs_rate(project: &str, name: &str, gib: u64, rate: u64) -> Command {
    Command::CreateBackupJobs(CreateBackupJobs {
        project: p(project),
        deployment: Deployment::ReplicaSet {
            name: DeploymentName::new(name).unwrap(),
            size: JobSize {
                head_size_bytes: gib * GIB,
                oplog_bytes_per_hour: rate,
            },
        },
    })
}

pub fn cluster(project: &str, name: &str, shards: usize, gib: u64) -> Command {
    let size = JobSize {
        head_size_bytes: gib * GIB,
        oplog_bytes_per_hour: 0,
    };
    Command::CreateBackupJobs(CreateBackupJobs {
        project: p(project),
        deployment: Deployment::ShardedCluster {
            name: DeploymentName::new(name).unwrap(),
            shards: (0..shards)
                .map(|i| Shard {
                    name: DeploymentName::new(format!("shard{i}")).unwrap(),
                    size,
                })
                .collect(),
            config_servers: size,
        },
    })
}

pub fn move_jobs(from: usize, to: usize) -> Command {
    Command::MoveJobs(MoveJobs {
        from: d(from),
        to: d(to),
        reason: None,
        dry_run: false,
    })
}

pub fn move_job(job: &str, to: usize) -> Command {
    Command::MoveJob(MoveJob {
        job: j(job),
        to: d(to),
        reason: None,
        dry_run: false,
    })
}

pub fn hdd_ssd(gib: u64, disk: HeadDiskType) -> DaemonSettings {
    DaemonSettings {
        head_disk_type: disk,
        ..settings(gib)
    }
}

/// Daemon 1 with three 10 GiB replica sets of project p1; daemons 2 and 3 empty,
/// 100 GiB each.
pub fn fleet() -> World {
    let mut w = World::new();
    w.ok(register(1, 100));
    w.ok(project("p1"));
    for name in ["rs0", "rs1", "rs2"] {
        w.ok(rs("p1", name, 10));
    }
    w.ok(register(2, 100));
    w.ok(register(3, 100));
    w
}

/// Daemon 1 with 1,280 jobs (five sharded clusters of 255 shards and their config
/// servers, 1 GiB each): more than one atomic unit moves; then daemons 2 to
/// `1 + destinations`, 10,000 GiB each.
pub fn large_fleet(destinations: usize) -> World {
    let mut w = World::new();
    w.ok(register(1, 10_000));
    w.ok(project("p1"));
    for c in 0..5 {
        w.ok(cluster("p1", &format!("c{c}"), 255, 1));
    }
    for n in 0..destinations {
        w.ok(register(2 + n, 10_000));
    }
    w
}

/// Every unit of `decision` fits one atomic batch: at most [`MAX_EVENTS_PER_UNIT`]
/// events, each aggregate at most once.
pub fn assert_units_fit(decision: &Decision) {
    for unit in &decision.units {
        assert!(unit.len() <= handoff_domain::MAX_EVENTS_PER_UNIT);
        let mut aggregates: Vec<_> = unit.iter().map(|e| e.aggregate()).collect();
        aggregates.sort();
        let n = aggregates.len();
        aggregates.dedup();
        assert_eq!(aggregates.len(), n, "a unit touches an aggregate twice");
    }
}

/// Where a rebuilt head stands, as a destination reports it when it completes a move.
pub fn rebuilt_head() -> Option<handoff_domain::model::HeadPoint> {
    Some(handoff_domain::model::HeadPoint {
        ts: "1700000000:1".into(),
        checksum: "3-9f3a".into(),
    })
}

/// A well-formed user key made of one base32 character.
pub fn key(c: char) -> handoff_domain::UserKey {
    handoff_domain::UserKey::new(format!("U{}", c.to_string().repeat(55))).expect("a valid key")
}

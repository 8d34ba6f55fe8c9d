//! The values that commands and events carry: daemon settings, deployments, job and move
//! phases, roles, and the names of alerts. Ops Manager's names throughout.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::ids::{DaemonId, DeploymentName, Invalid, Label};

/// Largest byte count accepted anywhere (1 EiB): keeps sums far from overflow.
pub const MAX_BYTES: u64 = 1 << 60;
/// Most labels a daemon or a project filter may carry.
pub const MAX_LABELS: usize = 32;
/// Most daemons a project's daemon filter may list.
pub const MAX_DAEMON_FILTER: usize = 256;
/// Most shards a sharded cluster may have.
pub const MAX_SHARDS: usize = 256;
/// Longest reason an operator may give for a move.
pub const MAX_REASON: usize = 1024;
/// The most destinations a spread may name.
pub const MAX_SPREAD_TO: usize = 1000;
/// Longest an oplog store keeps a job's oplog when it has to grow its retention (14 days).
pub const MAX_OPLOG_TTL_HOURS: u32 = 14 * 24;
/// Most workers a daemon may run.
pub const MAX_WORKERS: u32 = 1024;
/// Oplog rate from which a job may go to an SSD daemon when an HDD daemon could take it
/// (Ops Manager: 1 GB per hour).
pub const SSD_OPLOG_RATE_BYTES_PER_HOUR: u64 = 1_000_000_000;

/// A daemon's head disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "UPPERCASE")]
pub enum HeadDiskType {
    Hdd,
    Ssd,
}

/// A daemon's configuration, with the Admin API's names.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct DaemonSettings {
    /// Takes new jobs (initial placement and moves).
    pub assignment_enabled: bool,
    /// Runs backup jobs.
    pub backup_jobs_enabled: bool,
    /// Runs restore jobs.
    pub restore_jobs_enabled: bool,
    /// Runs garbage collection of its heads.
    pub garbage_collection_enabled: bool,
    pub head_disk_type: HeadDiskType,
    #[serde(default)]
    pub labels: BTreeSet<Label>,
    /// How many jobs (rebuilds included) it works on at once.
    pub num_workers: u32,
    /// The size of the head disk; free = this minus the heads of the jobs it owns.
    pub head_space_bytes: u64,
}

impl DaemonSettings {
    pub fn validate(&self) -> Result<(), Invalid> {
        if self.labels.len() > MAX_LABELS {
            return Err(Invalid::new(
                "labels",
                format!("at most {MAX_LABELS} labels"),
            ));
        }
        if self.num_workers == 0 || self.num_workers > MAX_WORKERS {
            return Err(Invalid::new(
                "num_workers",
                format!("must be 1 to {MAX_WORKERS}"),
            ));
        }
        check_bytes("head_space_bytes", self.head_space_bytes)
    }
}

impl Default for DaemonSettings {
    /// A daemon ready to take work: every kind of job enabled, HDD, one worker, no space.
    fn default() -> Self {
        Self {
            assignment_enabled: true,
            backup_jobs_enabled: true,
            restore_jobs_enabled: true,
            garbage_collection_enabled: true,
            head_disk_type: HeadDiskType::Hdd,
            labels: BTreeSet::new(),
            num_workers: 1,
            head_space_bytes: 0,
        }
    }
}

pub(crate) fn check_bytes(field: &'static str, value: u64) -> Result<(), Invalid> {
    if value > MAX_BYTES {
        return Err(Invalid::new(field, format!("must be at most {MAX_BYTES}")));
    }
    Ok(())
}

/// Whether a daemon answers heartbeats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum Liveness {
    Up,
    /// DAEMON_DOWN: no heartbeat for the threshold.
    Down,
}

/// What one job needs from a daemon: its head size and how fast its oplog grows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct JobSize {
    pub head_size_bytes: u64,
    #[serde(default)]
    pub oplog_bytes_per_hour: u64,
}

impl JobSize {
    pub fn validate(&self) -> Result<(), Invalid> {
        check_bytes("head_size_bytes", self.head_size_bytes)?;
        check_bytes("oplog_bytes_per_hour", self.oplog_bytes_per_hour)
    }
}

/// A shard of a sharded cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct Shard {
    pub name: DeploymentName,
    #[serde(flatten)]
    pub size: JobSize,
}

/// A deployment to back up: one job per replica set; one per shard plus one for the
/// config servers of a sharded cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Deployment {
    ReplicaSet {
        name: DeploymentName,
        #[serde(flatten)]
        size: JobSize,
    },
    ShardedCluster {
        name: DeploymentName,
        shards: Vec<Shard>,
        config_servers: JobSize,
    },
}

impl Deployment {
    pub fn name(&self) -> &DeploymentName {
        match self {
            Deployment::ReplicaSet { name, .. } | Deployment::ShardedCluster { name, .. } => name,
        }
    }
}

/// What a job backs up.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum JobTarget {
    ReplicaSet {
        name: DeploymentName,
    },
    Shard {
        cluster: DeploymentName,
        shard: DeploymentName,
    },
    ConfigServers {
        cluster: DeploymentName,
    },
}

/// Ops Manager's job states.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Provisioning,
    Active,
    Stopped,
    Inactive,
    Terminating,
}

/// Where one job's move stands. The last three are final.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum MovePhase {
    Requested,
    RestoringSnapshot,
    ReplayingOplog,
    Completed,
    Failed,
    /// Back on its previous owner: the move was cancelled (`CancelMove`).
    Cancelled,
}

impl MovePhase {
    pub fn is_final(self) -> bool {
        matches!(
            self,
            MovePhase::Completed | MovePhase::Failed | MovePhase::Cancelled
        )
    }
}

/// What a move covers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum MoveScope {
    /// Every job of the source daemon ("Move all heads").
    AllJobsOf { daemon: DaemonId },
    /// One job ("Move head").
    OneJob { job: crate::ids::JobId },
}

/// Where a head stands: the oplog timestamp it has applied up to and its checksum there,
/// both in the data plane's text forms (`t:i` and `count-sum`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct HeadPoint {
    pub ts: String,
    pub checksum: String,
}

impl HeadPoint {
    pub fn validate(&self) -> Result<(), Invalid> {
        let ok = |s: &str, sep: char, hex: bool| {
            s.split_once(sep).is_some_and(|(a, b)| {
                !a.is_empty()
                    && !b.is_empty()
                    && a.len() <= 20
                    && b.len() <= 20
                    && a.chars().all(|c| c.is_ascii_digit())
                    && b.chars().all(|c| {
                        if hex {
                            c.is_ascii_hexdigit()
                        } else {
                            c.is_ascii_digit()
                        }
                    })
            })
        };
        if !ok(&self.ts, ':', false) {
            return Err(Invalid::new(
                "head.ts",
                "must be seconds:increment, e.g. 1700000000:3",
            ));
        }
        if !ok(&self.checksum, '-', true) {
            return Err(Invalid::new(
                "head.checksum",
                "must be count-hexsum, e.g. 42-9f3a",
            ));
        }
        Ok(())
    }
}

/// A role, with Ops Manager's names for people's roles.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Role {
    /// Everything, users included.
    GlobalOwner,
    /// Daemons, projects, jobs and moves; not users.
    GlobalBackupAdmin,
    /// Reads everything; changes nothing.
    GlobalReadOnly,
    /// A backup daemon: registers itself and reports on the moves to it.
    BackupDaemon,
    /// The agent: reports on the oplog store (OPLOG_TTL_RESIZE).
    BackupAgent,
    /// The monitor: reports liveness and alerts, and runs the failover policy.
    BackupMonitor,
}

impl Role {
    /// The name on the wire and in Ops Manager, e.g. `GLOBAL_OWNER`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::GlobalOwner => "GLOBAL_OWNER",
            Role::GlobalBackupAdmin => "GLOBAL_BACKUP_ADMIN",
            Role::GlobalReadOnly => "GLOBAL_READ_ONLY",
            Role::BackupDaemon => "BACKUP_DAEMON",
            Role::BackupAgent => "BACKUP_AGENT",
            Role::BackupMonitor => "BACKUP_MONITOR",
        }
    }

    /// Every role.
    pub const ALL: [Role; 6] = [
        Role::GlobalOwner,
        Role::GlobalBackupAdmin,
        Role::GlobalReadOnly,
        Role::BackupDaemon,
        Role::BackupAgent,
        Role::BackupMonitor,
    ];
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                let names: Vec<_> = Role::ALL.iter().map(|r| r.as_str()).collect();
                format!("unknown role {s:?}; one of {}", names.join(", "))
            })
    }
}

/// An alert's type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AlertKind {
    DaemonDown,
    DaemonUp,
    TheftFailed,
    LowHeadFreeSpace,
    OplogTtlResize,
    BindFailure,
    MoveStuck,
    /// Automatic failover stopped itself: too many daemons are down at once.
    FailoverPaused,
    /// A move appended in part: some of its jobs started, the rest not yet.
    MoveInterrupted,
}

impl AlertKind {
    /// Every kind (a test matches each against it).
    pub const ALL: [AlertKind; 9] = [
        AlertKind::DaemonDown,
        AlertKind::DaemonUp,
        AlertKind::TheftFailed,
        AlertKind::LowHeadFreeSpace,
        AlertKind::OplogTtlResize,
        AlertKind::BindFailure,
        AlertKind::MoveStuck,
        AlertKind::FailoverPaused,
        AlertKind::MoveInterrupted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AlertKind::DaemonDown => "DAEMON_DOWN",
            AlertKind::DaemonUp => "DAEMON_UP",
            AlertKind::TheftFailed => "THEFT_FAILED",
            AlertKind::LowHeadFreeSpace => "LOW_HEAD_FREE_SPACE",
            AlertKind::OplogTtlResize => "OPLOG_TTL_RESIZE",
            AlertKind::BindFailure => "BIND_FAILURE",
            AlertKind::MoveStuck => "MOVE_STUCK",
            AlertKind::FailoverPaused => "FAILOVER_PAUSED",
            AlertKind::MoveInterrupted => "MOVE_INTERRUPTED",
        }
    }
}

impl std::fmt::Display for AlertKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One alert: its type and what it is about (a daemon, a job, or `fleet`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct AlertKey {
    pub kind: AlertKind,
    pub about: String,
}

impl AlertKey {
    pub fn new(kind: AlertKind, about: impl std::fmt::Display) -> Self {
        AlertKey {
            kind,
            about: about.to_string(),
        }
    }
}

/// What the fleet as a whole is called in an alert about it.
pub const FLEET: &str = "fleet";

#[cfg(test)]
mod tests {
    use super::AlertKind;

    /// A kind added to the enum without `ALL` fails here: the match below must name it,
    /// and the count must grow with it.
    #[test]
    fn all_alert_kinds_are_listed() {
        let position = |k: AlertKind| match k {
            AlertKind::DaemonDown => 0,
            AlertKind::DaemonUp => 1,
            AlertKind::TheftFailed => 2,
            AlertKind::LowHeadFreeSpace => 3,
            AlertKind::OplogTtlResize => 4,
            AlertKind::BindFailure => 5,
            AlertKind::MoveStuck => 6,
            AlertKind::FailoverPaused => 7,
            AlertKind::MoveInterrupted => 8,
        };
        let listed: Vec<usize> = AlertKind::ALL.iter().map(|k| position(*k)).collect();
        assert_eq!(listed, (0..AlertKind::ALL.len()).collect::<Vec<_>>());
        assert_eq!(AlertKind::ALL.len(), 9);
    }
}

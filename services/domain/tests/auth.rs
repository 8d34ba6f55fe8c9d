//! Who may send which command (MISSION rule 1), as properties over every role set and
//! every kind of command.

mod common;

use std::collections::BTreeSet;

use common::*;
use handoff_domain::auth::{authorize, Principal, Role};
use handoff_domain::command::*;
use handoff_domain::{Actor, Command};
use proptest::prelude::*;

const ROLES: [Role; 6] = Role::ALL;

/// Daemon 1's jobs moving to daemon 2 (move id 99), so reports on the move make sense.
fn world() -> World {
    let mut w = fleet();
    w.run_with(
        &handoff_domain::Context {
            command: id(99),
            actor: Actor::new("admin").unwrap(),
            at_ms: 1,
        },
        move_job("p1/rs0", 2),
    )
    .expect("the move starts");
    w
}

/// One command of every kind.
fn commands() -> Vec<Command> {
    vec![
        move_jobs(1, 3),
        move_job("p1/rs1", 3),
        register(7, 10),
        Command::RegisterDaemon(RegisterDaemon {
            daemon: d(2),
            settings: settings(1),
        }),
        Command::ConfigureDaemon(ConfigureDaemon {
            daemon: d(3),
            settings: settings(5),
        }),
        Command::RemoveDaemon(RemoveDaemon { daemon: d(3) }),
        Command::ReportDaemonLiveness(ReportDaemonLiveness {
            daemon: d(1),
            up: false,
        }),
        project("p2"),
        rs("p1", "new", 1),
        Command::SpreadJobs(SpreadJobs {
            from: d(1),
            to: vec![],
            reason: None,
            dry_run: false,
        }),
        Command::CancelMove(CancelMove {
            move_id: id(99),
            reason: "not now".into(),
        }),
        Command::DrainDaemon(DrainDaemon {
            daemon: d(1),
            max_concurrent: 2,
            reason: None,
            dry_run: false,
        }),
        Command::ContinueDrain(ContinueDrain {
            daemon: d(1),
            drain_id: id(98),
        }),
        Command::CancelDrain(CancelDrain {
            daemon: d(1),
            reason: "not now".into(),
        }),
        Command::ReportJobMovePhase(ReportJobMovePhase {
            job: j("p1/rs0"),
            move_id: id(99),
            epoch: 2,
            phase: handoff_domain::model::MovePhase::ReplayingOplog,
        }),
        Command::CompleteJobMove(CompleteJobMove {
            job: j("p1/rs0"),
            move_id: id(99),
            epoch: 2,
            head: rebuilt_head(),
        }),
        Command::FailJobMove(FailJobMove {
            job: j("p1/rs0"),
            move_id: id(99),
            epoch: 2,
            reason: "x".into(),
        }),
        Command::ResizeOplogTtl(ResizeOplogTtl {
            job: j("p1/rs0"),
            previous_hours: 24,
            hours: 27,
            reason: "x".into(),
        }),
        add_user("bob", &[Role::GlobalBackupAdmin]),
        Command::RemoveUser(RemoveUser {
            user: Actor::new("bob").unwrap(),
        }),
        Command::ReportHeadSpace(ReportHeadSpace {
            daemon: d(1),
            threshold_percent: 10,
        }),
        Command::ReportMoveStuck(ReportMoveStuck {
            job: j("p1/rs0"),
            move_id: id(99),
            idle_ms: 1000,
        }),
        Command::ReportFailoverGuard(ReportFailoverGuard {
            max_down_percent: 50,
        }),
        Command::FailoverJob(FailoverJob {
            job: j("p1/rs1"),
            from: d(1),
            down_for_ms: 10,
            delay_ms: 10,
            max_concurrent_rebuilds: 2,
            max_down_percent: 50,
        }),
    ]
}

fn add_user(name: &str, roles: &[Role]) -> Command {
    Command::AddUser(AddUser {
        user: Actor::new(name).unwrap(),
        roles: roles.to_vec(),
        key: key('B'),
        daemon: None,
    })
}

fn principal() -> impl Strategy<Value = Principal> {
    (
        proptest::sample::subsequence(ROLES.to_vec(), 0..=6),
        proptest::option::of(1usize..=3),
    )
        .prop_map(|(roles, daemon)| Principal {
            user: Actor::new("someone").unwrap(),
            roles: roles.into_iter().collect(),
            daemon: daemon.map(d),
        })
}

proptest! {
    /// Only GLOBAL_OWNER or GLOBAL_BACKUP_ADMIN may move jobs or change the fleet; a
    /// report on a move comes from its destination daemon alone; read-only changes
    /// nothing; the oplog store's report comes from the agent.
    #[test]
    fn each_command_needs_its_role(who in principal()) {
        let w = world();
        let admin = who.roles.contains(&Role::GlobalOwner) || who.roles.contains(&Role::GlobalBackupAdmin);
        let destination = who.roles.contains(&Role::BackupDaemon) && who.daemon == Some(d(2));
        let monitor = who.roles.contains(&Role::BackupMonitor);
        for c in commands() {
            let allowed = authorize(&who, &c, &w.state).is_ok();
            let expected = match &c {
                Command::MoveJobs(_) | Command::MoveJob(_) | Command::SpreadJobs(_) | Command::CancelMove(_) | Command::ConfigureDaemon(_)
                | Command::DrainDaemon(_) | Command::ContinueDrain(_) | Command::CancelDrain(_)
                | Command::RemoveDaemon(_) | Command::ConfigureProject(_) | Command::CreateBackupJobs(_) => admin,
                Command::ReportDaemonLiveness(_) => admin || monitor,
                Command::ReportHeadSpace(_) | Command::ReportMoveStuck(_) | Command::ReportFailoverGuard(_)
                | Command::FailoverJob(_) => monitor,
                Command::RegisterDaemon(r) => admin || (who.roles.contains(&Role::BackupDaemon) && who.daemon.as_ref() == Some(&r.daemon)),
                Command::ReportJobMovePhase(_) | Command::CompleteJobMove(_) => destination,
                Command::FailJobMove(_) => admin || destination,
                Command::ResizeOplogTtl(_) => who.roles.contains(&Role::BackupAgent),
                Command::AddUser(_) | Command::RemoveUser(_) => who.roles.contains(&Role::GlobalOwner),
            };
            prop_assert_eq!(allowed, expected, "{:?} sending {}", who.roles, c.name());
        }
        if who.roles.iter().all(|r| *r == Role::GlobalReadOnly) {
            prop_assert!(commands().iter().all(|c| authorize(&who, c, &w.state).is_err()), "read-only sent a command");
        }
    }
}

/// A refusal names the caller, the command and what it lacks.
#[test]
fn a_refusal_says_what_is_missing() {
    let w = world();
    let reader = Principal {
        user: Actor::new("rita").unwrap(),
        roles: BTreeSet::from([Role::GlobalReadOnly]),
        daemon: None,
    };
    let e = authorize(&reader, &move_jobs(1, 3), &w.state).unwrap_err();
    assert_eq!(
        e.to_string(),
        "rita may not MoveJobs: it needs GLOBAL_OWNER or GLOBAL_BACKUP_ADMIN"
    );
    let other_daemon = Principal {
        user: Actor::new("d3").unwrap(),
        roles: BTreeSet::from([Role::BackupDaemon]),
        daemon: Some(d(3)),
    };
    let complete = Command::CompleteJobMove(CompleteJobMove {
        job: j("p1/rs0"),
        move_id: id(99),
        epoch: 2,
        head: rebuilt_head(),
    });
    let e = authorize(&other_daemon, &complete, &w.state).unwrap_err();
    assert!(
        e.reason.contains("the destination of the job's move"),
        "{e}"
    );
    assert_eq!(
        serde_json::to_string(&Role::GlobalBackupAdmin).unwrap(),
        "\"GLOBAL_BACKUP_ADMIN\""
    );
}

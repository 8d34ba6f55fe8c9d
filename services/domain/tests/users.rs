//! Users are managed by commands and made by events: who exists, with which roles and
//! key, decides who may sign what.

mod common;

use common::*;
use handoff_domain::auth::{Principal, Role};
use handoff_domain::command::*;
use handoff_domain::{Actor, Command, Event, Rejection, RejectionClass};

fn user(name: &str) -> Actor {
    Actor::new(name).unwrap()
}

fn add(name: &str, roles: &[Role], k: char, daemon: Option<usize>) -> Command {
    Command::AddUser(AddUser {
        user: user(name),
        roles: roles.to_vec(),
        key: key(k),
        daemon: daemon.map(d),
    })
}

fn remove(name: &str) -> Command {
    Command::RemoveUser(RemoveUser { user: user(name) })
}

fn with_owner() -> World {
    let mut w = World::new();
    w.ok(add("root", &[Role::GlobalOwner], 'A', None));
    w
}

#[test]
fn an_added_user_is_a_principal_with_its_roles_and_key() {
    let mut w = with_owner();
    let decision = w.ok(add("d1", &[Role::BackupDaemon], 'B', Some(1)));
    assert!(matches!(
        &decision.units[0][0],
        Event::UserAdded { user: u, daemon: Some(_), .. } if u.as_str() == "d1"
    ));
    let p = Principal::of(&w.state, &user("d1")).expect("a current user");
    assert_eq!(
        p.roles.into_iter().collect::<Vec<_>>(),
        [Role::BackupDaemon]
    );
    assert_eq!(p.daemon, Some(d(1)));
    assert_eq!(w.state.users[&user("d1")].key, key('B'));
}

#[test]
fn names_and_keys_are_unique() {
    let mut w = with_owner();
    w.ok(add("alice", &[Role::GlobalBackupAdmin], 'B', None));
    let again = w
        .run(add("alice", &[Role::GlobalReadOnly], 'C', None))
        .unwrap_err();
    assert_eq!(again.reason_code(), "already_exists");
    let same_key = w
        .run(add("bob", &[Role::GlobalReadOnly], 'B', None))
        .unwrap_err();
    assert_eq!(
        same_key,
        Rejection::KeyInUse {
            user: user("alice")
        }
    );
    assert_eq!(same_key.class(), RejectionClass::Conflict);
}

#[test]
fn a_removed_user_is_no_principal_and_its_name_can_be_reused() {
    let mut w = with_owner();
    w.ok(add("alice", &[Role::GlobalBackupAdmin], 'B', None));
    w.ok(remove("alice"));
    assert!(Principal::of(&w.state, &user("alice")).is_none());
    assert_eq!(
        w.run(remove("alice")).unwrap_err().reason_code(),
        "not_found"
    );
    w.ok(add("alice", &[Role::GlobalReadOnly], 'C', None));
    assert_eq!(
        Principal::of(&w.state, &user("alice"))
            .unwrap()
            .roles
            .into_iter()
            .collect::<Vec<_>>(),
        [Role::GlobalReadOnly]
    );
}

#[test]
fn the_last_owner_stays() {
    let mut w = with_owner();
    let e = w.run(remove("root")).unwrap_err();
    assert_eq!(e, Rejection::LastOwner { user: user("root") });
    w.ok(add("second", &[Role::GlobalOwner], 'B', None));
    w.ok(remove("root"));
    assert_eq!(
        w.run(remove("second")).unwrap_err().reason_code(),
        "last_owner"
    );
}

#[test]
fn malformed_users_are_invalid() {
    let mut w = with_owner();
    let cases = [
        (add("handoff", &[Role::GlobalOwner], 'B', None), "user"),
        (add("x", &[], 'B', None), "roles"),
        (
            add("x", &[Role::GlobalOwner, Role::GlobalOwner], 'B', None),
            "roles",
        ),
        (add("x", &[Role::BackupDaemon], 'B', None), "daemon"),
        (add("x", &[Role::GlobalOwner], 'B', Some(1)), "daemon"),
    ];
    for (command, field) in cases {
        match w.run(command) {
            Err(Rejection::Invalid(i)) => assert_eq!(i.field, field),
            other => panic!("expected invalid {field}, got {other:?}"),
        }
    }
    for bad in [
        "",
        "U123",
        "XAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        &format!("U{}", "a".repeat(55)),
    ] {
        assert!(
            handoff_domain::UserKey::new(bad).is_err(),
            "{bad:?} accepted"
        );
    }
}

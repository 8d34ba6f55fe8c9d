//! Users: adding and removing them. Who may do what is `auth`'s; here, only what keeps
//! the users consistent (one key per user, always a GLOBAL_OWNER).

use super::Decision;
use crate::command::{AddUser, RemoveUser};
use crate::event::Event;
use crate::model::Role;
use crate::rejection::{Kind, Rejection};
use crate::state::State;

pub(super) fn add(c: &AddUser, state: &State) -> Result<Decision, Rejection> {
    if state.users.contains_key(&c.user) {
        return Err(Rejection::AlreadyExists {
            kind: Kind::User,
            id: c.user.to_string(),
        });
    }
    if let Some((owner, _)) = state.users.iter().find(|(_, u)| u.key == c.key) {
        return Err(Rejection::KeyInUse {
            user: owner.clone(),
        });
    }
    Ok(Decision::one(vec![Event::UserAdded {
        user: c.user.clone(),
        roles: c.roles.iter().copied().collect(),
        key: c.key.clone(),
        daemon: c.daemon.clone(),
    }]))
}

pub(super) fn remove(c: &RemoveUser, state: &State) -> Result<Decision, Rejection> {
    let Some(user) = state.users.get(&c.user) else {
        return Err(Rejection::NotFound {
            kind: Kind::User,
            id: c.user.to_string(),
        });
    };
    let owners = state
        .users
        .values()
        .filter(|u| u.roles.contains(&Role::GlobalOwner))
        .count();
    if user.roles.contains(&Role::GlobalOwner) && owners == 1 {
        return Err(Rejection::LastOwner {
            user: c.user.clone(),
        });
    }
    Ok(Decision::one(vec![Event::UserRemoved {
        user: c.user.clone(),
    }]))
}

//! Leak: no node is sent a frame or key of an epoch in which none of its users
//! was a member, and no node is sent a sealed key for a user it does not host.

use conclave_actors::ids::{Epoch, RoomId};
use conclave_actors::UserId;

use super::{short, Oracle, Verdict, View, LEAK};
use crate::cluster::Carried;

/// See the module docs.
pub struct Leak;

fn fails(detail: String) -> Verdict {
    Verdict::Fails {
        oracle: LEAK,
        detail,
    }
}

impl Oracle for Leak {
    fn name(&self) -> &'static str {
        LEAK
    }

    fn on_carried(&mut self, view: &View<'_>, carried: &Carried) -> Verdict {
        let Some(to) = view.cluster.index(carried.to) else {
            return Verdict::Holds;
        };
        for user in &carried.key_users {
            let verdict = key_for(view, to, user);
            if verdict != Verdict::Holds {
                return verdict;
            }
        }
        for &(room, epoch) in &carried.epochs {
            let verdict = epoch_to(view, to, room, epoch);
            if verdict != Verdict::Holds {
                return verdict;
            }
        }
        Verdict::Holds
    }
}

/// A node is sent sealed keys only for the users it hosts.
fn key_for(view: &View<'_>, to: usize, user: &UserId) -> Verdict {
    let Some(u) = view.roster.user_index(user) else {
        return Verdict::Holds;
    };
    let home = view.roster.user(u).node;
    if home == to {
        return Verdict::Holds;
    }
    fails(format!(
        "n{to} was sent a sealed key for a user of n{home}: a node receives only its own users' keys"
    ))
}

/// A node other than the home is sent a room's frames and keys of an epoch only
/// if one of its users was a member in that epoch.
fn epoch_to(view: &View<'_>, to: usize, room: RoomId, epoch: Epoch) -> Verdict {
    let Some(m) = view.model.rooms.get(&room) else {
        return Verdict::Holds;
    };
    if to == m.home || m.allowed.get(&epoch.0).is_some_and(|s| s.contains(&to)) {
        return Verdict::Holds;
    }
    fails(format!(
        "n{to} was sent a frame or key of room {} epoch {}, but none of its users was a member in that epoch (members' nodes then: {:?})",
        short(&room.0),
        epoch.0,
        m.allowed.get(&epoch.0).cloned().unwrap_or_default()
    ))
}

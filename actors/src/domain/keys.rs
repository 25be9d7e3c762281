//! Epoch keys: the bundle rule, the sealed-key store, and the keys actor.
//!
//! A client creates each epoch key and seals it to every member's X25519 key; nodes
//! only check, store and route sealed keys. The room's home accepts a bundle only if
//! it is for exactly the next epoch, covers exactly the members and nobody else,
//! and every key in it verifies as sealed by the requester to that member
//! ([`validate_bundle`]). It then sends each member node the keys of *its* users
//! only, so a node never receives a key for a user it does not host.
//!
//! The keys actor is the receiving end on a member node: it checks each sealed key
//! against the recipient's X25519 key in its own registry (so a home that lied about
//! a user's key is caught) and stores it for the user's client to open.

use std::collections::BTreeMap;

use conclave_storage::{Order, ReadTxn, StoreError, Table, WriteTxn};
use serde::{Deserialize, Serialize};
use x25519_dalek::PublicKey;

use super::{
    applied, gateway_of, members, origin, room, ClientMsg, Denial, Msg, RoomMember,
    ROOM_MEMBERS_MAX,
};
use crate::actor::{Actor, Context, System};
use crate::crypto::{verify_sealed_key, SealError, SealedKey};
use crate::ids::{Epoch, RoomId, UserId};

/// Sealed keys by (room, user, epoch): a user's keys of one room are one range.
const SEALED: Table<([u8; 16], [u8; 32], u64), SealedKey> = Table::new("keys.sealed");

/// Stores `key`, sealed to `user`, for `room` at `epoch`.
pub fn put(
    txn: &mut dyn WriteTxn,
    room: RoomId,
    epoch: Epoch,
    user: UserId,
    key: &SealedKey,
) -> Result<(), StoreError> {
    SEALED.put(txn, &(room.0, user.0, epoch.0), key)
}

/// Every key of `room` sealed to `user` on this node, by epoch.
pub fn sealed_for(
    txn: &dyn ReadTxn,
    room: RoomId,
    user: UserId,
) -> Result<Vec<(Epoch, SealedKey)>, StoreError> {
    Ok(SEALED
        .scan(
            txn,
            (room.0, user.0, 0)..=(room.0, user.0, u64::MAX),
            Order::Ascending,
            usize::MAX,
        )?
        .into_iter()
        .map(|((_, _, epoch), key)| (Epoch(epoch), key))
        .collect())
}

/// Checks that `bundle` is `epoch`'s key sealed by `sealer` to exactly `members`:
/// nobody missing, nobody extra, nobody twice, every key verifying for its member's
/// X25519 key, room and epoch.
pub fn validate_bundle(
    members: &[RoomMember],
    room: RoomId,
    epoch: Epoch,
    sealer: UserId,
    bundle: &[(UserId, SealedKey)],
) -> Result<(), Denial> {
    if bundle.len() > ROOM_MEMBERS_MAX {
        return Err(Denial::bundle(format!(
            "{} keys, more than a room's {ROOM_MEMBERS_MAX} members",
            bundle.len()
        )));
    }
    let mut by_user: BTreeMap<UserId, &SealedKey> = BTreeMap::new();
    for (user, key) in bundle {
        if by_user.insert(*user, key).is_some() {
            return Err(Denial::bundle(format!("{user} appears twice")));
        }
    }
    for member in members {
        if !by_user.contains_key(&member.user) {
            return Err(Denial::bundle(format!("no key for member {}", member.user)));
        }
    }
    for user in by_user.keys() {
        if !members.iter().any(|m| m.user == *user) {
            return Err(Denial::bundle(format!("key for non-member {user}")));
        }
    }
    for member in members {
        let key = by_user[&member.user];
        if key.sealer != sealer {
            return Err(Denial::bundle(format!(
                "key for {} not sealed by the requester",
                member.user
            )));
        }
        verify_sealed_key(key, &PublicKey::from(member.exchange), room, epoch).map_err(
            |e| match e {
                SealError::BadSignature | SealError::InvalidSealerKey => Denial::BadSignature,
                other => Denial::bundle(format!("key for {}: {other}", member.user)),
            },
        )?;
    }
    Ok(())
}

/// Messages to the keys actor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeysMsg {
    /// Keys of `room` at `epoch` for users of this node, from the room's home.
    Store {
        /// The room.
        room: RoomId,
        /// The epoch.
        epoch: Epoch,
        /// Each user's sealed key.
        keys: Vec<(UserId, SealedKey)>,
    },
}

/// The keys actor (see the module docs).
#[derive(Debug)]
pub struct Keys;

impl Keys {
    pub(crate) fn activate<S: System>(_cx: &mut Context<'_, S>) -> Self {
        Keys
    }
}

impl<S: System<Msg = Msg>> Actor<S> for Keys {
    type Msg = KeysMsg;

    fn handle(&mut self, msg: KeysMsg, cx: &mut Context<'_, S>) {
        let KeysMsg::Store { room, epoch, keys } = msg;
        let Some(from) = origin(cx) else {
            metrics::counter!("conclave_runtime_messages_dropped_total", "reason" => "bypassed_outbox").increment(1);
            return;
        };
        let done = match store(cx, from, room, epoch, &keys) {
            Ok(()) => {
                cx.send(gateway_of(cx.node()), ClientMsg::Changed { room });
                true
            }
            Err(Denial::Storage) => false,
            Err(denial) => {
                tracing::warn!(?room, epoch = epoch.0, ?from, reason = denial.reason(), %denial, "sealed keys refused");
                metrics::counter!("conclave_keys_rejected_total", "reason" => denial.reason())
                    .increment(1);
                true
            }
        };
        applied(cx, done);
    }
}

fn store<S: System<Msg = Msg>>(
    cx: &mut Context<'_, S>,
    from: crate::ids::NodeId,
    room: RoomId,
    epoch: Epoch,
    keys: &[(UserId, SealedKey)],
) -> Result<(), Denial> {
    let mut txn = cx.store().write()?;
    // Keys come only from the room's home, which sent its snapshot first.
    if room::home_of(&*txn, room)? != Some(from) {
        return Err(Denial::malformed(
            "keys from a node that is not the room's home",
        ));
    }
    if keys.len() > ROOM_MEMBERS_MAX {
        return Err(Denial::bundle("too many keys"));
    }
    // Each key on its own: one bad key (a user this node does not know, or whose
    // key does not verify) must not keep the others from their users.
    for (user, key) in keys {
        let checked = match members::user(&*txn, *user)? {
            None => Err(Denial::not_found(format!("user {user}"))),
            Some(record) => verify_sealed_key(key, &PublicKey::from(record.exchange), room, epoch)
                .map_err(|e| match e {
                    SealError::BadSignature | SealError::InvalidSealerKey => Denial::BadSignature,
                    other => Denial::bundle(other.to_string()),
                }),
        };
        match checked {
            Ok(()) => put(&mut *txn, room, epoch, *user, key)?,
            Err(denial) => {
                tracing::warn!(
                    ?room,
                    epoch = epoch.0,
                    ?user,
                    reason = denial.reason(),
                    "sealed key refused"
                );
                metrics::counter!("conclave_keys_rejected_total", "reason" => denial.reason())
                    .increment(1);
            }
        }
    }
    txn.commit()?;
    Ok(())
}

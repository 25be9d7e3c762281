//! The members actor: a node's user registry and the gate every local request
//! passes.
//!
//! Default-deny: a request is handled only when its signature verifies, it was
//! issued within [`super::REQUEST_SKEW_MAX`] of the node's clock, the registry has
//! its user, the user is active and their role allows the operation. Any error
//! (storage included) refuses it. Room requests that pass are forwarded to the
//! room's home: directly when the home is this node, through the durable outbox
//! otherwise.

use conclave_storage::{Order, ReadTxn, StoreError, Table, WriteTxn};
use serde::{Deserialize, Serialize};

use super::{
    denied, enqueue, origin, outbox_of, reply, room, room_of, Deliverable, Denial, Msg, Op,
    Outcome, ReplyTo, RoomMsg, SignedRequest, UserEntry, UserRole, UserStatus, REQUEST_SKEW_MAX,
};
use crate::actor::{Actor, Context, System, Time};
use crate::crypto::Frame;
use crate::identity::PublicIdentity;
use crate::ids::{NodeId, RoomId, UserId};

/// One registered user.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRecord {
    /// Their X25519 public key.
    pub exchange: [u8; 32],
    /// Their role.
    pub role: UserRole,
    /// Active or revoked.
    pub status: UserStatus,
    /// When they were added.
    pub added_at: Time,
    /// Which admin added them (`None` for the bootstrap admin).
    pub added_by: Option<UserId>,
}

const USERS: Table<[u8; 32], UserRecord> = Table::new("members.users");

/// The most users [`Op::ListUsers`] returns.
pub const LIST_USERS_MAX: usize = 10_000;

/// A user of this node, if registered.
pub fn user(txn: &dyn ReadTxn, id: UserId) -> Result<Option<UserRecord>, StoreError> {
    USERS.get(txn, &id.0)
}

/// Registers `user` as an admin without an acting admin: the bootstrap of a node's
/// first admin, from its operator. Fails with [`Denial::Conflict`] if the key is
/// registered already (nothing is changed).
pub fn seed_admin(txn: &mut dyn WriteTxn, user: &PublicIdentity, now: Time) -> Result<(), Denial> {
    insert(txn, user, UserRole::Admin, now, None)
}

fn insert(
    txn: &mut dyn WriteTxn,
    user: &PublicIdentity,
    role: UserRole,
    now: Time,
    added_by: Option<UserId>,
) -> Result<(), Denial> {
    if user.verifying_key().is_none() {
        return Err(Denial::malformed(
            "the user's signing key is not a valid Ed25519 key",
        ));
    }
    if USERS.get(&*txn, &user.signing)?.is_some() {
        return Err(Denial::Conflict {
            what: format!("user {} is registered already", UserId(user.signing)),
        });
    }
    USERS.put(
        txn,
        &user.signing,
        &UserRecord {
            exchange: user.exchange,
            role,
            status: UserStatus::Active,
            added_at: now,
            added_by,
        },
    )?;
    Ok(())
}

/// Every user of this node, in id order (at most [`LIST_USERS_MAX`]).
pub fn list(txn: &dyn ReadTxn) -> Result<Vec<UserEntry>, StoreError> {
    Ok(USERS
        .scan(txn, .., Order::Ascending, LIST_USERS_MAX)?
        .into_iter()
        .map(|(signing, r)| UserEntry {
            user: PublicIdentity {
                signing,
                exchange: r.exchange,
            },
            role: r.role,
            status: r.status,
        })
        .collect())
}

/// The registry's verdict on `user`: their record if they may act.
pub fn check_active(txn: &dyn ReadTxn, user: UserId) -> Result<UserRecord, Denial> {
    let record = USERS
        .get(txn, &user.0)?
        .ok_or_else(|| Denial::not_found(format!("user {user}")))?;
    match record.status {
        UserStatus::Active => Ok(record),
        UserStatus::Revoked => Err(Denial::Revoked),
    }
}

/// Checks a signed request: signature, issue time, registry (see the module docs).
pub fn authenticate(
    txn: &dyn ReadTxn,
    req: &SignedRequest,
    now: Time,
) -> Result<UserRecord, Denial> {
    req.verify()?;
    let issued = req.request.issued;
    let skew = if issued > now {
        issued.saturating_since(now)
    } else {
        now.saturating_since(issued)
    };
    if skew > REQUEST_SKEW_MAX {
        return Err(Denial::Expired);
    }
    check_active(txn, req.request.user)
}

/// Messages to the members actor. Only local clients (the gateway) send them.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum MembersMsg {
    /// A signed request of a local user.
    Request {
        /// The request (boxed: it is much larger than the other variants).
        req: Box<SignedRequest>,
        /// Where the outcome goes.
        reply: ReplyTo,
    },
    /// A frame a local user publishes (the frame is signed; the room's home checks it).
    Publish {
        /// The frame.
        frame: Frame,
        /// Where the receipt goes.
        reply: ReplyTo,
    },
}

/// The members actor (see the module docs).
#[derive(Debug)]
pub struct Members;

impl Members {
    pub(crate) fn activate<S: System>(_cx: &mut Context<'_, S>) -> Self {
        Members
    }
}

impl<S: System<Msg = Msg>> Actor<S> for Members {
    type Msg = MembersMsg;

    fn handle(&mut self, msg: MembersMsg, cx: &mut Context<'_, S>) {
        if origin(cx) != Some(cx.node()) {
            // Remote nodes talk to rooms and keys, never to another node's registry.
            tracing::warn!(from = ?cx.sender(), "members request from another node dropped");
            metrics::counter!("conclave_runtime_messages_dropped_total", "reason" => "not_local")
                .increment(1);
            return;
        }
        let me = cx.node();
        let (user, reply_to, result) = match msg {
            MembersMsg::Request { req, reply } => {
                let user = req.request.user;
                (user, reply, self.request(req, reply, cx))
            }
            MembersMsg::Publish { frame, reply } => {
                let user = frame.sender;
                (user, reply, self.publish(frame, reply, cx))
            }
        };
        match result {
            Ok(Some(outcome)) => reply(cx, me, reply_to, outcome),
            // Forwarded locally: the room replies.
            Ok(None) => {}
            Err(denial) => {
                let outcome = denied("members", Some(user), denial);
                reply(cx, me, reply_to, outcome);
            }
        }
    }
}

impl Members {
    /// `Ok(None)` when the request went on to a local room, which replies.
    fn request<S: System<Msg = Msg>>(
        &mut self,
        req: Box<SignedRequest>,
        reply: ReplyTo,
        cx: &mut Context<'_, S>,
    ) -> Result<Option<Outcome>, Denial> {
        let store = cx.store();
        let now = cx.now();
        let actor = {
            let txn = store.read()?;
            authenticate(&*txn, &req, now)?
        };
        let acting = req.request.user;
        let admin = || {
            if actor.role == UserRole::Admin {
                Ok(())
            } else {
                Err(Denial::missing("admin"))
            }
        };
        match &req.request.op {
            Op::AddUser { user, role } => {
                admin()?;
                let mut txn = store.write()?;
                insert(&mut *txn, user, *role, now, Some(acting))?;
                txn.commit()?;
                tracing::info!(admin = ?acting, user = ?UserId(user.signing), ?role, "user added");
                Ok(Some(Outcome::Done))
            }
            Op::RevokeUser { user } => {
                admin()?;
                let mut txn = store.write()?;
                let mut record = USERS
                    .get(&*txn, &user.0)?
                    .ok_or_else(|| Denial::not_found(format!("user {user}")))?;
                if record.status != UserStatus::Revoked {
                    record.status = UserStatus::Revoked;
                    USERS.put(&mut *txn, &user.0, &record)?;
                    txn.commit()?;
                    tracing::info!(admin = ?acting, ?user, "user revoked");
                }
                Ok(Some(Outcome::Done))
            }
            Op::ListUsers => {
                admin()?;
                let txn = store.read()?;
                Ok(Some(Outcome::Users(list(&*txn)?)))
            }
            Op::ListRooms => {
                let txn = store.read()?;
                Ok(Some(Outcome::Rooms(room::rooms_of(&*txn, acting)?)))
            }
            Op::CreateRoom { room, .. } => {
                // Rooms are homed on their creator's node: this one.
                let room = *room;
                cx.send(room_of(cx.node(), room), RoomMsg::Request { req, reply });
                Ok(None)
            }
            Op::Invite { room, .. } | Op::Remove { room, .. } | Op::RoomInfo { room } => {
                let room = *room;
                self.forward(room, RoomMsg::Request { req, reply }, cx)
            }
        }
    }

    fn publish<S: System<Msg = Msg>>(
        &mut self,
        frame: Frame,
        reply: ReplyTo,
        cx: &mut Context<'_, S>,
    ) -> Result<Option<Outcome>, Denial> {
        {
            let txn = cx.store().read()?;
            check_active(&*txn, frame.sender)?;
        }
        metrics::counter!("conclave_frames_published_total").increment(1);
        let room = frame.room;
        self.forward(room, RoomMsg::Publish { frame, reply }, cx)
    }

    /// Sends `msg` to `room`'s home: directly if it is this node, else through the
    /// outbox (answering [`Outcome::Forwarded`]; the home answers the rest).
    fn forward<S: System<Msg = Msg>>(
        &mut self,
        room: RoomId,
        msg: RoomMsg,
        cx: &mut Context<'_, S>,
    ) -> Result<Option<Outcome>, Denial> {
        let me = cx.node();
        // A read transaction: a local home (the common case) needs no writer.
        let home: NodeId = room::home_of(&*cx.store().read()?, room)?
            .ok_or_else(|| Denial::not_found(format!("room {room}")))?;
        if home == me {
            cx.send(room_of(me, room), msg);
            return Ok(None);
        }
        let mut txn = cx.store().write()?;
        enqueue(&mut *txn, room_of(home, room), Deliverable::Room(msg))?;
        txn.commit()?;
        cx.send(outbox_of(me, home), super::OutboxMsg::Kick);
        Ok(Some(Outcome::Forwarded))
    }
}

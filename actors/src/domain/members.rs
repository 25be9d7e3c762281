//! The members actor: a node's user registry and the gate every local request
//! passes.
//!
//! Default-deny: a request is handled only when its signature verifies, it was
//! issued within [`super::REQUEST_SKEW_MAX`] of the node's clock, the registry has
//! its user, the user is active and their role allows the operation. Any error
//! (storage included) refuses it. Room requests that pass are forwarded to the
//! room's home: directly when the home is this node, through the durable outbox
//! otherwise.

use serde::{Deserialize, Serialize};

use super::quota::{PublishQuota, Quotas};
use super::state::{registry, rooms};
use super::{
    denied, enqueue, origin, outbox_of, reply, room_of, Deliverable, Denial, Msg, Op, Outcome,
    ReplyTo, RoomMsg, SignedRequest, UserRole,
};
use crate::actor::{Actor, Context, System};
use crate::crypto::Frame;
use crate::ids::{NodeId, RoomId, UserId};
use crate::mutation::{self, Mutation};

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
pub struct Members {
    /// What each user may still publish.
    quotas: Quotas,
    /// Where rooms are sequenced when they are on shard groups: a node that
    /// replicates a room's shard takes its users' commands itself.
    sharding: Option<super::room::shard::Sharding>,
}

impl Members {
    pub(crate) fn activate<S: System>(
        quota: PublishQuota,
        sharding: Option<super::room::shard::Sharding>,
        _cx: &mut Context<'_, S>,
    ) -> Self {
        Members {
            quotas: Quotas::new(quota),
            sharding,
        }
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
            registry::authenticate(&*txn, &req, now)?
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
                registry::add(&mut *txn, user, *role, now, Some(acting))?;
                txn.commit()?;
                tracing::info!(admin = ?acting, user = ?UserId(user.signing), ?role, "user added");
                Ok(Some(Outcome::Done))
            }
            Op::RevokeUser { user } => {
                admin()?;
                let mut txn = store.write()?;
                if registry::revoke(&mut *txn, *user)? {
                    txn.commit()?;
                    tracing::info!(admin = ?acting, ?user, "user revoked");
                }
                // Every time, not only the first: a crash may have cut the
                // evictions short (their messages are local until the room sends
                // its word on, durably); evicting twice changes nothing.
                evict_everywhere(cx, *user)?;
                Ok(Some(Outcome::Done))
            }
            Op::ListUsers => {
                admin()?;
                let txn = store.read()?;
                Ok(Some(Outcome::Users(registry::list(&*txn)?)))
            }
            Op::ListRooms { after } => {
                let txn = store.read()?;
                let (rooms, next) = rooms::rooms_page(&*txn, acting, *after)?;
                Ok(Some(Outcome::Rooms { rooms, next }))
            }
            Op::CreateRoom { link, .. } => {
                // Rooms are homed on their creator's node: this one.
                let room = link.link.room;
                cx.send(room_of(cx.node(), room), RoomMsg::Request { req, reply });
                Ok(None)
            }
            Op::Invite { .. } | Op::Remove { .. } | Op::Rekey { .. } | Op::RoomInfo { .. } => {
                let room = req
                    .request
                    .op
                    .room()
                    .ok_or_else(|| Denial::malformed("no room"))?;
                self.forward(acting, room, RoomMsg::Request { req, reply }, cx)
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
            registry::check_active(&*txn, frame.sender)?;
        }
        let bytes = frame.ciphertext.len() as u64;
        if !mutation::active(Mutation::SkipQuota) {
            self.quotas
                .take(frame.sender, bytes, cx.now())
                .map_err(|what| Denial::Limit { what })?;
        }
        metrics::counter!("conclave_frames_published_total").increment(1);
        let (sender, room) = (frame.sender, frame.room);
        self.forward(sender, room, RoomMsg::Publish { frame, reply }, cx)
    }

    /// Sends `msg` (from `acting`) to `room`'s sequencer: directly if it is this
    /// node, else through the outbox (answering [`Outcome::Forwarded`]; the home
    /// answers the rest) if `acting` is a member of the room as this node knows:
    /// what a non-member sends never enters an outbox shared by every room towards
    /// that node.
    fn forward<S: System<Msg = Msg>>(
        &mut self,
        acting: UserId,
        room: RoomId,
        msg: RoomMsg,
        cx: &mut Context<'_, S>,
    ) -> Result<Option<Outcome>, Denial> {
        let me = cx.node();
        let home: NodeId = {
            // A read transaction: a local home (the common case) needs no writer.
            let txn = cx.store().read()?;
            let home = rooms::sequencer_of(&*txn, room)?
                .ok_or_else(|| Denial::not_found(format!("room {room}")))?;
            let member = rooms::visibility(&*txn, acting, room)?.is_some_and(|v| v.until.is_none());
            if home != me && !member && !mutation::active(Mutation::ForwardNonMembers) {
                return Err(Denial::NotAMember);
            }
            home
        };
        let replicated_here = self
            .sharding
            .as_ref()
            .is_some_and(|s| s.replicas(home, room).contains(&me));
        if home == me || replicated_here {
            cx.send(room_of(me, room), msg);
            return Ok(None);
        }
        // Queued work is new work: it waits for space like the home's own.
        super::room_for_more(cx.store())?;
        let mut txn = cx.store().write()?;
        enqueue(&mut *txn, room_of(home, room), Deliverable::Room(msg))?;
        txn.commit()?;
        cx.send(outbox_of(me, home), super::OutboxMsg::Kick);
        Ok(Some(Outcome::Forwarded))
    }
}

/// Tells each room `user` (revoked) belongs to here to have them evicted (see
/// [`RoomMsg::Revoked`]), and their connections that they are gone.
pub(crate) fn evict_everywhere<S: System<Msg = Msg>>(
    cx: &mut Context<'_, S>,
    user: UserId,
) -> Result<(), Denial> {
    let rooms = rooms::rooms_of(&*cx.store().read()?, user)?;
    let me = cx.node();
    for (room, _) in rooms {
        cx.send(room_of(me, room), RoomMsg::Revoked { user });
    }
    cx.send(super::gateway_of(me), super::ClientMsg::Revoked { user });
    Ok(())
}

//! The room actor: one per room per node, activated from storage, passivated when
//! idle.
//!
//! On the room's **sequencer** (today its home, the creator's node; see
//! [`super::state::rooms::sequencer_of`]) it is the authority. Every request is first
//! **decided** ([`decide`]: signature, membership, role, epoch, bundle, duplicate
//! id) into an [`Event`] or a [`Denial`]; the event is then **applied** ([`apply`])
//! to the room's state, and the fan-out it owes member nodes is queued in their
//! outboxes in the same transaction; only after the commit is the caller answered
//! and the outboxes kicked.
//!
//! On a **member node** (a node hosting at least one member) it is the local copy
//! ([`replica`]): it takes the sequencer's membership snapshots, the sealed keys of
//! this node's users and the committed frames, checks each again, and stores them
//! so that local subscribers read history locally. Snapshots, keys and frames of a
//! room all travel to the room itself, so one room's updates stay in order however
//! the peer interleaves different rooms.

use core::time::Duration;
use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use super::state::{registry, rooms::RoomMeta};
use super::{
    applied, denied, gateway_of, origin, outbox_of, reply, ClientMsg, Denial, DomainConfig, Msg,
    Op, Outcome, ReplyTo, RoomMember, SignedRequest,
};
use crate::actor::{Actor, Context, System, Time};
use crate::crypto::{Frame, SealedKey};
use crate::ids::{Epoch, NodeId, RoomId, Seq, UserId};
use crate::mutation::{self, Mutation};

mod apply;
pub mod decide;
pub mod replica;

pub use decide::validate_bundle;
pub use replica::UpdateError;

/// What the sequencer sends to member nodes, through their outboxes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Update {
    /// The room's record and members after a membership change.
    Members {
        /// The sequencer's record of the room (its `members_version` orders
        /// snapshots).
        meta: RoomMeta,
        /// Every member.
        members: Vec<RoomMember>,
        /// The creator's signed creation: proves to a node that has not seen the
        /// room yet that the sender is its home.
        create: Box<SignedRequest>,
    },
    /// An epoch's key sealed to each of the receiving node's users (and only
    /// theirs), after the snapshot that made them members of that epoch.
    Keys {
        /// The epoch.
        epoch: Epoch,
        /// Each user's sealed key.
        keys: Vec<(UserId, SealedKey)>,
    },
    /// A committed frame.
    Frame {
        /// Its sequence number.
        seq: Seq,
        /// The frame.
        frame: Frame,
        /// When the sequencer committed it (for the commit-to-deliver latency).
        committed: Time,
    },
}

/// What a decided request changes: the input of [`apply`]. Each carries the room's
/// record as it is after the change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The room was created with its owner as the only member.
    Created {
        /// The new record.
        meta: RoomMeta,
        /// The creator.
        owner: RoomMember,
        /// Epoch 1's key, sealed by and to the creator.
        key: SealedKey,
        /// The signed creation (the proof of the home).
        create: Box<SignedRequest>,
    },
    /// A member joined, with the current epoch's key.
    Invited {
        /// The record after it.
        meta: RoomMeta,
        /// The new member.
        member: RoomMember,
        /// Their key of the current epoch.
        key: SealedKey,
    },
    /// A member left and the room moved to the next epoch.
    Removed {
        /// The record after it (the new epoch).
        meta: RoomMeta,
        /// Who was removed, as they were recorded.
        removed: RoomMember,
        /// The new epoch's key sealed to each remaining member.
        bundle: Vec<(UserId, SealedKey)>,
    },
    /// A frame was sequenced.
    Published {
        /// The record after it.
        meta: RoomMeta,
        /// Its sequence number.
        seq: Seq,
        /// The frame.
        frame: Frame,
        /// When it was sequenced.
        committed: Time,
    },
}

impl Event {
    /// What the caller is told once the event is durable.
    fn outcome(&self) -> Outcome {
        match self {
            Event::Published { seq, frame, .. } => Outcome::Committed {
                id: frame.id,
                seq: *seq,
            },
            Event::Created { .. } | Event::Invited { .. } | Event::Removed { .. } => Outcome::Done,
        }
    }
}

/// Messages to a room.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum RoomMsg {
    /// A user's request (create, invite, remove, info), already authorized by their
    /// home node's members actor; the room checks the signature and role again.
    Request {
        /// The request (boxed: it is much larger than the other variants).
        req: Box<SignedRequest>,
        /// Where the outcome goes.
        reply: ReplyTo,
    },
    /// A frame to sequence (on the sequencer).
    Publish {
        /// The frame.
        frame: Frame,
        /// Where the receipt goes.
        reply: ReplyTo,
    },
    /// From the sequencer to a member node.
    Update(Update),
    /// The idle check (a timer).
    Tick,
}

/// The room actor (see the module docs).
#[derive(Debug)]
pub struct Room {
    room: RoomId,
    /// The cluster's nodes, if known: invitees must be homed on one of them.
    nodes: Option<std::sync::Arc<BTreeSet<NodeId>>>,
    idle: Duration,
    /// Whether a message arrived since the last idle check.
    busy: bool,
    /// Only used under [`Mutation::VolatileSequence`]: the next sequence number,
    /// kept in memory instead of the store.
    volatile_next: Option<Seq>,
}

impl Room {
    pub(crate) fn activate<S: System<Msg = Msg>>(
        room: RoomId,
        config: DomainConfig,
        nodes: Option<std::sync::Arc<BTreeSet<NodeId>>>,
        cx: &mut Context<'_, S>,
    ) -> Self {
        cx.timer(config.idle, RoomMsg::Tick);
        Room {
            room,
            nodes,
            idle: config.idle,
            busy: false,
            volatile_next: None,
        }
    }
}

impl<S: System<Msg = Msg>> Actor<S> for Room {
    type Msg = RoomMsg;

    fn handle(&mut self, msg: RoomMsg, cx: &mut Context<'_, S>) {
        let Some(from) = origin(cx) else {
            tracing::warn!(room = ?self.room, from = ?cx.sender(), "room message from a remote actor outside the outbox protocol dropped");
            metrics::counter!("conclave_runtime_messages_dropped_total", "reason" => "bypassed_outbox").increment(1);
            return;
        };
        let retry = match msg {
            RoomMsg::Tick => return self.tick(cx),
            RoomMsg::Request { req, reply: to } => {
                let user = req.request.user;
                let outcome = self
                    .request(&req, from, cx)
                    .unwrap_or_else(|denial| denied("room", Some(user), denial));
                self.answer(cx, from, to, outcome)
            }
            RoomMsg::Publish { frame, reply: to } => {
                let user = frame.sender;
                let outcome = self.publish(frame, from, cx).unwrap_or_else(|denial| {
                    metrics::counter!("conclave_frames_rejected_total", "reason" => denial.reason())
                        .increment(1);
                    denied("room", Some(user), denial)
                });
                self.answer(cx, from, to, outcome)
            }
            RoomMsg::Update(update) => match self.update(update, from, cx) {
                Ok(()) => false,
                Err(error) => {
                    tracing::warn!(room = ?self.room, ?from, reason = error.reason(), %error, "update from the room's home refused");
                    metrics::counter!("conclave_updates_rejected_total", "reason" => error.reason())
                        .increment(1);
                    matches!(error, UpdateError::Storage(_))
                }
            },
        };
        self.busy = true;
        // A storage failure is not an answer: the message stays unacknowledged, so
        // its sender's outbox offers it again.
        applied(cx, !retry);
    }
}

impl Room {
    fn tick<S: System<Msg = Msg>>(&mut self, cx: &mut Context<'_, S>) {
        if self.busy {
            self.busy = false;
            cx.timer(self.idle, RoomMsg::Tick);
        } else {
            cx.stop();
        }
    }

    /// Replies with `outcome`; returns whether the message must be offered again
    /// (the store failed, so nothing was decided).
    fn answer<S: System<Msg = Msg>>(
        &self,
        cx: &mut Context<'_, S>,
        from: NodeId,
        to: ReplyTo,
        outcome: Outcome,
    ) -> bool {
        let retry = outcome == Outcome::Denied(Denial::Storage);
        reply(cx, from, to, outcome);
        retry
    }

    fn home<'a>(&'a self, from: NodeId, cx: &Context<'_, impl System>) -> decide::Home<'a> {
        decide::Home {
            room: self.room,
            me: cx.node(),
            from,
            now: cx.now(),
            nodes: self.nodes.as_deref(),
        }
    }

    /// Decides a request and, if it changes the room, applies and commits it.
    fn request<S: System<Msg = Msg>>(
        &mut self,
        req: &SignedRequest,
        from: NodeId,
        cx: &mut Context<'_, S>,
    ) -> Result<Outcome, Denial> {
        let txn = cx.store().write()?;
        // The requester's node checked its registry; this node checks the signature
        // and the clock itself, and its own registry when the requester is local.
        if from == cx.node() {
            registry::authenticate(&*txn, req, cx.now())?;
        } else {
            req.verify()?;
        }
        if req.request.op.room() != Some(self.room) {
            return Err(Denial::malformed("request for another room"));
        }
        let h = self.home(from, cx);
        let acting = req.request.user;
        let event = match &req.request.op {
            Op::CreateRoom { .. } => decide::create(&*txn, &h, req)?,
            Op::Invite {
                invitee,
                epoch,
                key,
                ..
            } => decide::invite(&*txn, &h, acting, invitee, *epoch, key)?,
            Op::Remove {
                user,
                epoch,
                bundle,
                ..
            } => decide::remove(&*txn, &h, acting, *user, *epoch, bundle)?,
            Op::RoomInfo { .. } => return decide::info(&*txn, &h, acting),
            Op::AddUser { .. } | Op::RevokeUser { .. } | Op::ListUsers | Op::ListRooms => {
                return Err(Denial::malformed("not a room request"));
            }
        };
        tracing::info!(room = ?self.room, user = ?acting, op = event.name(), "room changed");
        self.commit(event, txn, cx)
    }

    /// Decides a frame and, if it is accepted, sequences and commits it.
    fn publish<S: System<Msg = Msg>>(
        &mut self,
        frame: Frame,
        from: NodeId,
        cx: &mut Context<'_, S>,
    ) -> Result<Outcome, Denial> {
        let txn = cx.store().write()?;
        // Mutation: the sequence number comes from memory.
        let next = self
            .volatile_next
            .filter(|_| mutation::active(Mutation::VolatileSequence));
        let event = decide::publish(&*txn, &self.home(from, cx), frame, next)?;
        let outcome = self.commit(event, txn, cx)?;
        metrics::counter!("conclave_frames_committed_total").increment(1);
        Ok(outcome)
    }

    /// Applies `event`, queues its fan-out, commits, and only then kicks the
    /// outboxes and tells local subscribers.
    fn commit<S: System<Msg = Msg>>(
        &mut self,
        event: Event,
        mut txn: Box<dyn conclave_storage::WriteTxn + '_>,
        cx: &mut Context<'_, S>,
    ) -> Result<Outcome, Denial> {
        let me = cx.node();
        apply::apply(&mut *txn, self.room, me, &event)?;
        let nodes = apply::fan_out(&mut *txn, self.room, me, cx.now(), &event)?;
        txn.commit()?;
        if let Event::Published { meta, frame, .. } = &event {
            if mutation::active(Mutation::VolatileSequence) {
                self.volatile_next = Some(meta.next_seq);
            }
            let created = Time::from_unix_micros(frame.id.unix_ms().saturating_mul(1_000));
            metrics::histogram!("conclave_publish_to_commit_seconds")
                .record(cx.now().saturating_since(created).as_secs_f64());
        }
        for node in nodes {
            cx.send(outbox_of(me, node), super::OutboxMsg::Kick);
        }
        cx.send(gateway_of(me), ClientMsg::Changed { room: self.room });
        Ok(event.outcome())
    }

    /// Applies an update from the room's sequencer to this node's copy.
    fn update<S: System<Msg = Msg>>(
        &mut self,
        update: Update,
        from: NodeId,
        cx: &mut Context<'_, S>,
    ) -> Result<(), UpdateError> {
        let at = replica::Copy {
            room: self.room,
            me: cx.node(),
            from,
            now: cx.now(),
        };
        let mut txn = cx.store().write()?;
        replica::apply(&mut *txn, &at, update)?;
        txn.commit()?;
        cx.send(gateway_of(at.me), ClientMsg::Changed { room: self.room });
        Ok(())
    }
}

impl Event {
    /// A short name for logs.
    fn name(&self) -> &'static str {
        match self {
            Event::Created { .. } => "created",
            Event::Invited { .. } => "invited",
            Event::Removed { .. } => "removed",
            Event::Published { .. } => "published",
        }
    }
}

//! The room actor: one per room per node, activated from storage, passivated when
//! idle.
//!
//! On the room's **home** (its creator's node) it is the authority: it admits and
//! removes members, rekeys, and sequences frames. A frame is checked (membership,
//! the sender's home, epoch, duplicate id, signature), given the next sequence
//! number, persisted together with its fan-out to every member node's outbox, and
//! only then acknowledged to the publisher.
//!
//! On a **member node** (a node hosting at least one member) it is the local copy:
//! it takes the home's membership snapshots and frames, verifies each frame again,
//! and stores them so that local subscribers read history locally. For each local
//! user it records which sequence numbers they may read (from joining, or from the
//! start of the epoch they joined in, until their removal).

use core::time::Duration;
use std::collections::{BTreeMap, BTreeSet};

use conclave_storage::{Order, ReadTxn, StoreError, Table, WriteTxn};
use serde::{Deserialize, Serialize};
use x25519_dalek::PublicKey;

use super::members::{authenticate, check_active};
use super::{
    applied, denied, enqueue, gateway_of, keys, keys_of, origin, outbox_of, reply, room_of,
    ClientMsg, Deliverable, Denial, DomainConfig, History, KeysMsg, Msg, Op, Outcome, Policy,
    ReplyTo, RoomInfo, RoomMember, RoomRole, SignedRequest, ROOM_MEMBERS_MAX,
};
use crate::actor::{Actor, Context, System, Time};
use crate::crypto::{verify_frame, verify_sealed_key, Frame, FrameError, SealError};
use crate::ids::{Epoch, NodeId, RoomId, Seq, UserId};
use crate::mutation::{self, Mutation};

/// How many frames a room without `persist` keeps (on its home and member nodes).
pub const EPHEMERAL_FRAMES_KEPT: u64 = 256;

/// A room's state as a node records it (authoritative on the home; the home's last
/// snapshot elsewhere).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomMeta {
    /// The home node.
    pub home: NodeId,
    /// The policy.
    pub policy: Policy,
    /// The current epoch.
    pub epoch: Epoch,
    /// The first sequence number of the current epoch.
    pub epoch_start: Seq,
    /// The sequence number of the next frame.
    pub next_seq: Seq,
    /// The creator.
    pub owner: UserId,
}

/// Which sequence numbers a local user may read: `from`, up to `until` (exclusive)
/// once they are removed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Visibility {
    /// The first readable sequence number.
    pub from: Seq,
    /// The first sequence number after their removal.
    pub until: Option<Seq>,
}

impl Visibility {
    /// Whether `seq` is readable.
    pub fn covers(&self, seq: Seq) -> bool {
        seq >= self.from && self.until.is_none_or(|u| seq < u)
    }
}

const META: Table<[u8; 16], RoomMeta> = Table::new("room.meta");
const MEMBERS: Table<([u8; 16], [u8; 32]), RoomMember> = Table::new("room.members");
const FRAMES: Table<([u8; 16], u64), Frame> = Table::new("room.frames");
const IDS: Table<([u8; 16], u128), u64> = Table::new("room.ids");
const VISIBLE: Table<([u8; 32], [u8; 16]), Visibility> = Table::new("room.visible");
/// The creator's signed request that created the room: the proof of its home.
const CREATED: Table<[u8; 16], SignedRequest> = Table::new("room.created");

/// Whether `create` proves that `home` is the home of `room`, created by `owner`:
/// the creator's own signature over a creation naming that room and home.
fn proves_home(create: &SignedRequest, room: RoomId, home: NodeId, owner: UserId) -> bool {
    matches!(create.request.op, Op::CreateRoom { room: r, home: h, .. } if r == room && h == home)
        && create.request.user == owner
        && create.verify().is_ok()
}
/// Only written under [`Mutation::FanoutToRemoved`]: the nodes of removed members.
const MUTATION_REMOVED: Table<([u8; 16], [u8; 32]), u8> = Table::new("room.mutation_removed");

/// The room's state on this node, if it knows the room.
pub fn meta(txn: &dyn ReadTxn, room: RoomId) -> Result<Option<RoomMeta>, StoreError> {
    META.get(txn, &room.0)
}

/// The room's home, if this node knows the room.
pub fn home_of(txn: &dyn ReadTxn, room: RoomId) -> Result<Option<NodeId>, StoreError> {
    Ok(META.get(txn, &room.0)?.map(|m| m.home))
}

/// The room's members as this node knows them, in user order.
pub fn members(txn: &dyn ReadTxn, room: RoomId) -> Result<Vec<RoomMember>, StoreError> {
    Ok(MEMBERS
        .scan(
            txn,
            (room.0, [0; 32])..=(room.0, [0xff; 32]),
            Order::Ascending,
            ROOM_MEMBERS_MAX + 1,
        )?
        .into_iter()
        .map(|(_, m)| m)
        .collect())
}

/// Up to `limit` stored frames of `room` from `from` on, in sequence order.
pub fn frames(
    txn: &dyn ReadTxn,
    room: RoomId,
    from: Seq,
    limit: usize,
) -> Result<Vec<(Seq, Frame)>, StoreError> {
    Ok(FRAMES
        .scan(
            txn,
            (room.0, from.0)..=(room.0, u64::MAX),
            Order::Ascending,
            limit,
        )?
        .into_iter()
        .map(|((_, seq), f)| (Seq(seq), f))
        .collect())
}

/// What a local user may read of `room`, if they are or were a member.
pub fn visibility(
    txn: &dyn ReadTxn,
    user: UserId,
    room: RoomId,
) -> Result<Option<Visibility>, StoreError> {
    VISIBLE.get(txn, &(user.0, room.0))
}

/// The rooms a local user is a member of now, with their homes.
pub fn rooms_of(txn: &dyn ReadTxn, user: UserId) -> Result<Vec<(RoomId, NodeId)>, StoreError> {
    let mut out = Vec::new();
    for ((_, room), vis) in VISIBLE.scan(
        txn,
        (user.0, [0; 16])..=(user.0, [0xff; 16]),
        Order::Ascending,
        usize::MAX,
    )? {
        if vis.until.is_none() {
            if let Some(meta) = META.get(txn, &room)? {
                out.push((RoomId(room), meta.home));
            }
        }
    }
    Ok(out)
}

/// What the home sends to member nodes, through their outboxes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Update {
    /// The room's state and members after a change.
    Members {
        /// The home's record of the room.
        meta: RoomMeta,
        /// Every member.
        members: Vec<RoomMember>,
        /// The creator's signed creation: proves to a node that has not seen the
        /// room yet that the sender is its home.
        create: Box<SignedRequest>,
    },
    /// A committed frame.
    Frame {
        /// Its sequence number.
        seq: Seq,
        /// The frame.
        frame: Frame,
        /// When the home committed it (for the commit-to-deliver latency).
        committed: Time,
    },
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
    /// A frame to sequence (on the home).
    Publish {
        /// The frame.
        frame: Frame,
        /// Where the receipt goes.
        reply: ReplyTo,
    },
    /// From the home to a member node.
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
        let mut retry = false;
        match msg {
            RoomMsg::Tick => {
                if self.busy {
                    self.busy = false;
                    cx.timer(self.idle, RoomMsg::Tick);
                } else {
                    cx.stop();
                }
                return;
            }
            RoomMsg::Request { req, reply: to } => {
                let user = req.request.user;
                let outcome = match self.request(&req, from, cx) {
                    Ok(outcome) => outcome,
                    Err(denial) => denied("room", Some(user), denial),
                };
                retry = outcome == Outcome::Denied(Denial::Storage);
                reply(cx, from, to, outcome);
            }
            RoomMsg::Publish { frame, reply: to } => {
                let user = frame.sender;
                let outcome = match self.publish(frame, from, cx) {
                    Ok(outcome) => outcome,
                    Err(denial) => {
                        metrics::counter!("conclave_frames_rejected_total", "reason" => denial.reason())
                            .increment(1);
                        denied("room", Some(user), denial)
                    }
                };
                retry = outcome == Outcome::Denied(Denial::Storage);
                reply(cx, from, to, outcome);
            }
            RoomMsg::Update(update) => {
                if let Err(reason) = self.update(update, from, cx) {
                    tracing::warn!(room = ?self.room, ?from, reason, "update from the room's home refused");
                    metrics::counter!("conclave_updates_rejected_total", "reason" => reason)
                        .increment(1);
                    retry = reason == "storage";
                }
            }
        }
        self.busy = true;
        // A storage failure is not an answer: the message stays unacknowledged, so
        // its sender's outbox offers it again.
        applied(cx, !retry);
    }
}

/// The nodes other than `me` hosting at least one of `members`.
fn member_nodes(members: &[RoomMember], me: NodeId) -> BTreeSet<NodeId> {
    members
        .iter()
        .map(|m| m.home)
        .filter(|&n| n != me)
        .collect()
}

fn seal_error(e: SealError) -> Denial {
    match e {
        SealError::BadSignature | SealError::InvalidSealerKey => Denial::BadSignature,
        other => Denial::bundle(other.to_string()),
    }
}

impl Room {
    fn home_meta(&self, txn: &dyn ReadTxn, me: NodeId) -> Result<RoomMeta, Denial> {
        let meta = META
            .get(txn, &self.room.0)?
            .ok_or_else(|| Denial::not_found(format!("room {}", self.room)))?;
        if meta.home != me {
            return Err(Denial::malformed(format!(
                "room {} is homed on {}, not here",
                self.room, meta.home
            )));
        }
        Ok(meta)
    }

    /// The acting member: a member of the room, homed on the node the request came from.
    fn acting_member(
        &self,
        txn: &dyn ReadTxn,
        user: UserId,
        from: NodeId,
    ) -> Result<RoomMember, Denial> {
        let member = MEMBERS
            .get(txn, &(self.room.0, user.0))?
            .ok_or(Denial::NotAMember)?;
        if member.home != from {
            // Only a user's own node speaks for them.
            return Err(Denial::NotAMember);
        }
        Ok(member)
    }

    fn request<S: System<Msg = Msg>>(
        &mut self,
        req: &SignedRequest,
        from: NodeId,
        cx: &mut Context<'_, S>,
    ) -> Result<Outcome, Denial> {
        let me = cx.node();
        let store = cx.store();
        let mut txn = store.write()?;
        // The requester's node checked its registry; this node checks the signature
        // and the clock itself, and its own registry when the requester is local.
        if from == me {
            authenticate(&*txn, req, cx.now())?;
        } else {
            req.verify()?;
        }
        let acting = req.request.user;
        if req.request.op.room() != Some(self.room) {
            return Err(Denial::malformed("request for another room"));
        }
        let mut sends: Vec<NodeId> = Vec::new();
        let outcome = match &req.request.op {
            Op::CreateRoom {
                policy, key, home, ..
            } => {
                if from != me || *home != me {
                    return Err(Denial::malformed(
                        "rooms are created on their creator's node",
                    ));
                }
                if META.get(&*txn, &self.room.0)?.is_some() {
                    return Err(Denial::Conflict {
                        what: format!("room {} exists", self.room),
                    });
                }
                let creator = check_active(&*txn, acting)?;
                if key.sealer != acting {
                    return Err(Denial::bundle(
                        "the first key must be sealed by the creator",
                    ));
                }
                let epoch = Epoch(1);
                verify_sealed_key(key, &PublicKey::from(creator.exchange), self.room, epoch)
                    .map_err(seal_error)?;
                let meta = RoomMeta {
                    home: me,
                    policy: *policy,
                    epoch,
                    epoch_start: Seq(1),
                    next_seq: Seq(1),
                    owner: acting,
                };
                META.put(&mut *txn, &self.room.0, &meta)?;
                CREATED.put(&mut *txn, &self.room.0, req)?;
                let member = RoomMember {
                    user: acting,
                    exchange: creator.exchange,
                    home: me,
                    role: RoomRole::Owner,
                    since: Seq(1),
                };
                MEMBERS.put(&mut *txn, &(self.room.0, acting.0), &member)?;
                keys::put(&mut *txn, self.room, epoch, acting, key)?;
                VISIBLE.put(
                    &mut *txn,
                    &(acting.0, self.room.0),
                    &Visibility {
                        from: Seq(1),
                        until: None,
                    },
                )?;
                tracing::info!(room = ?self.room, owner = ?acting, "room created");
                Outcome::Done
            }
            Op::Invite {
                invitee,
                epoch,
                key,
                ..
            } => {
                let meta = self.home_meta(&*txn, me)?;
                let inviter = self.acting_member(&*txn, acting, from)?;
                if !inviter.role.manages_members() {
                    return Err(Denial::missing("room owner or admin"));
                }
                let user = UserId(invitee.user.signing);
                if invitee.user.verifying_key().is_none() {
                    return Err(Denial::malformed(
                        "the invitee's key is not a valid Ed25519 key",
                    ));
                }
                if invitee.home != me
                    && self
                        .nodes
                        .as_ref()
                        .is_some_and(|n| !n.contains(&invitee.home))
                {
                    return Err(Denial::not_found(format!(
                        "node {} (not a node of this cluster)",
                        invitee.home
                    )));
                }
                if invitee.role == RoomRole::Owner {
                    return Err(Denial::malformed("a room has one owner, its creator"));
                }
                if MEMBERS.get(&*txn, &(self.room.0, user.0))?.is_some() {
                    return Err(Denial::Conflict {
                        what: format!("{user} is a member already"),
                    });
                }
                let before = members(&*txn, self.room)?;
                if before.len() >= ROOM_MEMBERS_MAX {
                    return Err(Denial::RoomFull);
                }
                if *epoch != meta.epoch {
                    return Err(Denial::bundle(format!(
                        "key for epoch {}, the room is at epoch {}",
                        epoch.0, meta.epoch.0
                    )));
                }
                if key.sealer != acting {
                    return Err(Denial::bundle("the key must be sealed by the inviter"));
                }
                verify_sealed_key(key, &invitee.user.exchange_key(), self.room, meta.epoch)
                    .map_err(seal_error)?;
                let since = match meta.policy.history {
                    History::FromJoin => meta.next_seq,
                    History::FromEpoch => meta.epoch_start,
                };
                let member = RoomMember {
                    user,
                    exchange: invitee.user.exchange,
                    home: invitee.home,
                    role: invitee.role,
                    since,
                };
                MEMBERS.put(&mut *txn, &(self.room.0, user.0), &member)?;
                keys::put(&mut *txn, self.room, meta.epoch, user, key)?;
                if invitee.home == me {
                    VISIBLE.put(
                        &mut *txn,
                        &(user.0, self.room.0),
                        &Visibility {
                            from: since,
                            until: None,
                        },
                    )?;
                }
                let old_nodes = member_nodes(&before, me);
                let after = members(&*txn, self.room)?;
                // Snapshot first, so a member node knows the room before its keys
                // and frames arrive (one outbox per node keeps them in order).
                let create = self.creation(&*txn)?;
                for &node in &member_nodes(&after, me) {
                    self.enqueue_update(
                        &mut *txn,
                        node,
                        Update::Members {
                            meta,
                            members: after.clone(),
                            create: create.clone(),
                        },
                    )?;
                    sends.push(node);
                }
                if invitee.home != me {
                    enqueue(
                        &mut *txn,
                        keys_of(invitee.home),
                        Deliverable::Keys(KeysMsg::Store {
                            room: self.room,
                            epoch: meta.epoch,
                            keys: vec![(user, key.clone())],
                        }),
                    )?;
                    if !old_nodes.contains(&invitee.home) {
                        // A new member node: send the history it may need.
                        let start = self.kept_from(&meta, since);
                        for (seq, frame) in frames(&*txn, self.room, start, usize::MAX)? {
                            self.enqueue_update(
                                &mut *txn,
                                invitee.home,
                                Update::Frame {
                                    seq,
                                    frame,
                                    committed: cx.now(),
                                },
                            )?;
                        }
                    }
                }
                tracing::info!(room = ?self.room, inviter = ?acting, ?user, "member invited");
                Outcome::Done
            }
            Op::Remove {
                user,
                epoch,
                bundle,
                ..
            } => {
                let mut meta = self.home_meta(&*txn, me)?;
                let remover = self.acting_member(&*txn, acting, from)?;
                let target = MEMBERS
                    .get(&*txn, &(self.room.0, user.0))?
                    .ok_or_else(|| Denial::not_found(format!("member {user}")))?;
                if *user != acting {
                    if !remover.role.manages_members() {
                        return Err(Denial::missing("room owner or admin"));
                    }
                    if target.role == RoomRole::Owner {
                        return Err(Denial::missing("only the owner may remove the owner"));
                    }
                }
                let next = Epoch(meta.epoch.0 + 1);
                if *epoch != next {
                    return Err(Denial::bundle(format!(
                        "bundle for epoch {}, the next epoch is {}",
                        epoch.0, next.0
                    )));
                }
                let before = members(&*txn, self.room)?;
                let remaining: Vec<RoomMember> =
                    before.iter().copied().filter(|m| m.user != *user).collect();
                keys::validate_bundle(&remaining, self.room, next, acting, bundle)?;
                MEMBERS.delete(&mut *txn, &(self.room.0, user.0))?;
                meta.epoch = next;
                meta.epoch_start = meta.next_seq;
                META.put(&mut *txn, &self.room.0, &meta)?;
                for (member, key) in bundle {
                    keys::put(&mut *txn, self.room, next, *member, key)?;
                }
                if mutation::active(Mutation::FanoutToRemoved) && target.home != me {
                    MUTATION_REMOVED.put(&mut *txn, &(self.room.0, target.home.0), &1)?;
                }
                if target.home == me {
                    VISIBLE.put(
                        &mut *txn,
                        &(user.0, self.room.0),
                        &Visibility {
                            from: target.since,
                            until: Some(meta.next_seq),
                        },
                    )?;
                }
                let nodes = member_nodes(&remaining, me);
                let mut notified = nodes.clone();
                // The removed member's node learns of the removal (so it stops
                // serving the room to them) but gets no key of the new epoch.
                if target.home != me {
                    notified.insert(target.home);
                }
                let create = self.creation(&*txn)?;
                for &node in &notified {
                    self.enqueue_update(
                        &mut *txn,
                        node,
                        Update::Members {
                            meta,
                            members: remaining.clone(),
                            create: create.clone(),
                        },
                    )?;
                    sends.push(node);
                }
                for &node in &nodes {
                    let keys: Vec<_> = bundle
                        .iter()
                        .filter(|(u, _)| {
                            // Mutation: every node gets the whole bundle.
                            mutation::active(Mutation::BundleUnsplit)
                                || remaining.iter().any(|m| m.user == *u && m.home == node)
                        })
                        .cloned()
                        .collect();
                    enqueue(
                        &mut *txn,
                        keys_of(node),
                        Deliverable::Keys(KeysMsg::Store {
                            room: self.room,
                            epoch: next,
                            keys,
                        }),
                    )?;
                }
                tracing::info!(room = ?self.room, remover = ?acting, removed = ?user, epoch = next.0, "member removed; room rekeyed");
                Outcome::Done
            }
            Op::RoomInfo { .. } => {
                let meta = self.home_meta(&*txn, me)?;
                self.acting_member(&*txn, acting, from)?;
                return Ok(Outcome::Room(RoomInfo {
                    room: self.room,
                    home: meta.home,
                    policy: meta.policy,
                    epoch: meta.epoch,
                    next_seq: meta.next_seq,
                    members: members(&*txn, self.room)?,
                }));
            }
            Op::AddUser { .. } | Op::RevokeUser { .. } | Op::ListUsers | Op::ListRooms => {
                return Err(Denial::malformed("not a room request"));
            }
        };
        txn.commit()?;
        self.kick(&sends, cx);
        cx.send(gateway_of(me), ClientMsg::Changed { room: self.room });
        Ok(outcome)
    }

    /// The creator's signed creation of this room, as stored by its home.
    fn creation(&self, txn: &dyn ReadTxn) -> Result<Box<SignedRequest>, Denial> {
        CREATED
            .get(txn, &self.room.0)?
            .map(Box::new)
            .ok_or_else(|| Denial::not_found(format!("the creation of room {}", self.room)))
    }

    /// The first sequence number still kept from `since` on.
    fn kept_from(&self, meta: &RoomMeta, since: Seq) -> Seq {
        if meta.policy.persist {
            since
        } else {
            Seq(since
                .0
                .max(meta.next_seq.0.saturating_sub(EPHEMERAL_FRAMES_KEPT)))
        }
    }

    fn enqueue_update(
        &self,
        txn: &mut dyn WriteTxn,
        node: NodeId,
        update: Update,
    ) -> Result<(), Denial> {
        enqueue(
            txn,
            room_of(node, self.room),
            Deliverable::Room(RoomMsg::Update(update)),
        )
    }

    fn kick<S: System<Msg = Msg>>(&self, nodes: &[NodeId], cx: &mut Context<'_, S>) {
        let me = cx.node();
        let unique: BTreeSet<NodeId> = nodes.iter().copied().collect();
        for node in unique {
            cx.send(outbox_of(me, node), super::OutboxMsg::Kick);
        }
    }

    /// Stores `frame` at `seq`, dropping the oldest kept frame of a room without
    /// `persist`.
    fn store_frame(
        &self,
        txn: &mut dyn WriteTxn,
        meta: &RoomMeta,
        seq: Seq,
        frame: &Frame,
    ) -> Result<(), StoreError> {
        FRAMES.put(txn, &(self.room.0, seq.0), frame)?;
        if !meta.policy.persist && seq.0 > EPHEMERAL_FRAMES_KEPT {
            FRAMES.delete(txn, &(self.room.0, seq.0 - EPHEMERAL_FRAMES_KEPT))?;
        }
        Ok(())
    }

    fn publish<S: System<Msg = Msg>>(
        &mut self,
        frame: Frame,
        from: NodeId,
        cx: &mut Context<'_, S>,
    ) -> Result<Outcome, Denial> {
        let me = cx.node();
        let store = cx.store();
        let mut txn = store.write()?;
        let mut meta = self.home_meta(&*txn, me)?;
        if frame.room != self.room {
            return Err(Denial::malformed("frame names another room"));
        }
        self.acting_member(&*txn, frame.sender, from)?;
        if let Some(seq) = IDS.get(&*txn, &(self.room.0, frame.id.0))? {
            return Err(Denial::Duplicate { seq: Seq(seq) });
        }
        if frame.epoch != meta.epoch && !mutation::active(Mutation::AcceptStaleEpoch) {
            return Err(Denial::StaleEpoch {
                current: meta.epoch,
                got: frame.epoch,
            });
        }
        verify_frame(&frame).map_err(|e| match e {
            FrameError::TooLarge { .. } => Denial::malformed(e.to_string()),
            _ => Denial::BadSignature,
        })?;
        let volatile = mutation::active(Mutation::VolatileSequence);
        let seq = match self.volatile_next {
            // Mutation: the sequence number comes from memory.
            Some(next) if volatile => next,
            _ => meta.next_seq,
        };
        let members = members(&*txn, self.room)?;
        let mut nodes = member_nodes(&members, me);
        if mutation::active(Mutation::FanoutToRemoved) {
            // Mutation: frames still go to the nodes of removed members.
            for ((_, node), _) in MUTATION_REMOVED.scan(
                &*txn,
                (self.room.0, [0; 32])..=(self.room.0, [0xff; 32]),
                Order::Ascending,
                usize::MAX,
            )? {
                nodes.insert(NodeId(node));
            }
        }
        for &node in &nodes {
            self.enqueue_update(
                &mut *txn,
                node,
                Update::Frame {
                    seq,
                    frame: frame.clone(),
                    committed: cx.now(),
                },
            )?;
        }
        self.store_frame(&mut *txn, &meta, seq, &frame)?;
        IDS.put(&mut *txn, &(self.room.0, frame.id.0), &seq.0)?;
        meta.next_seq = Seq(seq.0 + 1);
        if volatile {
            // Mutation: the next sequence number is not persisted with the frame.
            self.volatile_next = Some(meta.next_seq);
        } else {
            META.put(&mut *txn, &self.room.0, &meta)?;
        }
        txn.commit()?;
        metrics::counter!("conclave_frames_committed_total").increment(1);
        let created = Time::from_unix_micros(frame.id.unix_ms().saturating_mul(1_000));
        metrics::histogram!("conclave_publish_to_commit_seconds")
            .record(cx.now().saturating_since(created).as_secs_f64());
        let nodes: Vec<NodeId> = nodes.into_iter().collect();
        self.kick(&nodes, cx);
        cx.send(gateway_of(me), ClientMsg::Changed { room: self.room });
        Ok(Outcome::Committed { id: frame.id, seq })
    }

    /// Applies an update from the room's home. Errors are reasons for the metric.
    fn update<S: System<Msg = Msg>>(
        &mut self,
        update: Update,
        from: NodeId,
        cx: &mut Context<'_, S>,
    ) -> Result<(), &'static str> {
        let me = cx.node();
        if from == me {
            return Err("from_self");
        }
        let store = cx.store();
        let mut txn = store.write().map_err(|_| "storage")?;
        let known = META.get(&*txn, &self.room.0).map_err(|_| "storage")?;
        if known.is_some_and(|m| m.home != from) {
            return Err("not_from_home");
        }
        match update {
            Update::Members {
                meta,
                members: new_members,
                create,
            } => {
                if meta.home != from || new_members.len() > ROOM_MEMBERS_MAX {
                    return Err("malformed");
                }
                // Only the node the creator named (and signed) is the room's home:
                // a peer cannot claim a room it does not hold.
                if known.is_none() && !proves_home(&create, self.room, from, meta.owner) {
                    return Err("unproven_home");
                }
                if known.is_none() {
                    CREATED
                        .put(&mut *txn, &self.room.0, &create)
                        .map_err(|_| "storage")?;
                }
                let mut meta = meta;
                let old = members(&*txn, self.room).map_err(|_| "storage")?;
                if let Some(known) = known {
                    // An older snapshot than the one applied: handed over again after
                    // this node crashed between applying it and its peer recording
                    // that. Each snapshot of the home is later than the one before in
                    // (epoch, member count): an invite adds one member, a removal
                    // starts the next epoch. Applying it would take the copy back
                    // (re-admitting removed members until the newer snapshots come
                    // again, and stretching their visibility past their removal).
                    if (meta.epoch, new_members.len()) < (known.epoch, old.len())
                        && !mutation::active(Mutation::SkipReceiverDedup)
                    {
                        metrics::counter!("conclave_updates_stale_total").increment(1);
                        return Ok(());
                    }
                    // Frames already stored here may be ahead of the snapshot's view.
                    meta.next_seq = meta.next_seq.max(known.next_seq);
                }
                let now_in: BTreeMap<UserId, RoomMember> =
                    new_members.iter().map(|m| (m.user, *m)).collect();
                for m in &old {
                    MEMBERS
                        .delete(&mut *txn, &(self.room.0, m.user.0))
                        .map_err(|_| "storage")?;
                    if m.home == me && !now_in.contains_key(&m.user) {
                        VISIBLE
                            .put(
                                &mut *txn,
                                &(m.user.0, self.room.0),
                                &Visibility {
                                    from: m.since,
                                    until: Some(meta.next_seq),
                                },
                            )
                            .map_err(|_| "storage")?;
                    }
                }
                for m in &new_members {
                    MEMBERS
                        .put(&mut *txn, &(self.room.0, m.user.0), m)
                        .map_err(|_| "storage")?;
                    if m.home == me {
                        let current = VISIBLE
                            .get(&*txn, &(m.user.0, self.room.0))
                            .map_err(|_| "storage")?;
                        if current.is_none_or(|v| v.until.is_some()) {
                            VISIBLE
                                .put(
                                    &mut *txn,
                                    &(m.user.0, self.room.0),
                                    &Visibility {
                                        from: m.since,
                                        until: None,
                                    },
                                )
                                .map_err(|_| "storage")?;
                        }
                    }
                }
                META.put(&mut *txn, &self.room.0, &meta)
                    .map_err(|_| "storage")?;
            }
            Update::Frame {
                seq,
                frame,
                committed,
            } => {
                let Some(mut meta) = known else {
                    return Err("unknown_room");
                };
                if !mutation::active(Mutation::SkipReceiverDedup)
                    && FRAMES
                        .get(&*txn, &(self.room.0, seq.0))
                        .map_err(|_| "storage")?
                        .is_some()
                {
                    metrics::counter!("conclave_frames_duplicate_total").increment(1);
                    return Ok(());
                }
                if frame.room != self.room {
                    return Err("wrong_room");
                }
                if frame.epoch != meta.epoch {
                    return Err("stale_epoch");
                }
                if MEMBERS
                    .get(&*txn, &(self.room.0, frame.sender.0))
                    .map_err(|_| "storage")?
                    .is_none()
                {
                    return Err("not_a_member");
                }
                verify_frame(&frame).map_err(|_| "bad_signature")?;
                self.store_frame(&mut *txn, &meta, seq, &frame)
                    .map_err(|_| "storage")?;
                meta.next_seq = meta.next_seq.max(Seq(seq.0.saturating_add(1)));
                META.put(&mut *txn, &self.room.0, &meta)
                    .map_err(|_| "storage")?;
                metrics::counter!("conclave_frames_delivered_total").increment(1);
                metrics::histogram!("conclave_commit_to_deliver_seconds")
                    .record(cx.now().saturating_since(committed).as_secs_f64());
            }
        }
        txn.commit().map_err(|_| "storage")?;
        cx.send(gateway_of(me), ClientMsg::Changed { room: self.room });
        Ok(())
    }
}

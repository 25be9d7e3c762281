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

use super::chain::SignedLink;
use super::state::{outcomes, registry, rooms, rooms::RoomMeta};
use super::{
    applied, denied, enqueue, gateway_of, origin, outbox_of, reply, room_of, Asked, ClientMsg,
    Deliverable, Denial, DomainConfig, Msg, Op, Outcome, ReplyTo, RoomMember, SignedRequest,
    UserStatus,
};
use crate::actor::{Actor, Context, System, Time};
use crate::crypto::{Frame, SealedKey, SignatureBytes};
use crate::identity::Identity;
use crate::ids::{Epoch, NodeId, RoomId, Seq, UserId};
use crate::mutation::{self, Mutation};
use crate::replication::layout::replicas_of;
use crate::replication::{ProposalId, ReplicasMsg};
use conclave_storage::StoreError;

mod apply;
pub mod decide;
pub mod replica;
pub mod shard;

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
        /// The room's first chain link, the creator's signed creation: proves to a
        /// node that has not seen the room yet that the sender is its home.
        create: Box<SignedLink>,
    },
    /// Links of the room's membership chain, from index `from` on (a page of at
    /// most [`CHAIN_PAGE_LINKS`]): the new link after each change, the whole chain
    /// to a node new to the room. Sent after the snapshot, before keys.
    Chain {
        /// The index of the first link.
        from: u64,
        /// The links.
        links: Vec<SignedLink>,
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
    /// The room's history continues at `next`: ask for it
    /// ([`RoomMsg::MoreHistory`]). Until then the node gets no live frame.
    More {
        /// The next frame's sequence number.
        next: Seq,
    },
}

/// The most chain links one [`Update::Chain`] carries (a link is at most a few
/// hundred bytes, so a page stays far below an envelope).
pub const CHAIN_PAGE_LINKS: usize = 256;

/// What a decided request changes: the input of [`apply`]. Each carries the room's
/// record as it is after the change, and each membership change the chain link
/// that records it.
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
        /// The signed creation, the chain's first link (the proof of the home).
        link: Box<SignedLink>,
    },
    /// A member joined, with the current epoch's key.
    Invited {
        /// The record after it.
        meta: RoomMeta,
        /// The new member.
        member: RoomMember,
        /// Their key of the current epoch.
        key: SealedKey,
        /// The link.
        link: Box<SignedLink>,
    },
    /// A member left and the room moved to the next epoch.
    Removed {
        /// The record after it (the new epoch).
        meta: RoomMeta,
        /// Who was removed, as they were recorded.
        removed: RoomMember,
        /// The new epoch's key sealed to each remaining member.
        bundle: Vec<(UserId, SealedKey)>,
        /// The link.
        link: Box<SignedLink>,
    },
    /// The room moved to the next epoch with the same members.
    Rekeyed {
        /// The record after it (the new epoch).
        meta: RoomMeta,
        /// The new epoch's key sealed to each member.
        bundle: Vec<(UserId, SealedKey)>,
        /// The link.
        link: Box<SignedLink>,
    },
    /// A revoked member was evicted; a rekey is now due.
    Evicted {
        /// The record after it (`rekey_due`).
        meta: RoomMeta,
        /// Who was evicted, as they were recorded.
        removed: RoomMember,
        /// The link, signed by this node as the room's home.
        link: Box<SignedLink>,
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
            Event::Created { .. }
            | Event::Invited { .. }
            | Event::Removed { .. }
            | Event::Rekeyed { .. }
            | Event::Evicted { .. } => Outcome::Done,
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
    /// From this node's members actor (never from another node): `user`, one of
    /// this node's users, was revoked. The room has them evicted: it signs its word
    /// for the room's home and sends it there (or, being the home, evicts them).
    Revoked {
        /// The revoked user.
        user: UserId,
    },
    /// To the room's sequencer, from the node of a revoked member: evict them.
    Evict {
        /// The member.
        user: UserId,
        /// Their node's signature over [`super::chain::eviction_message`].
        attestation: SignatureBytes,
    },
    /// From a room's home to the node that forwarded a request or a frame, through
    /// the home's outbox, in the transaction that decided it: what the home
    /// decided, where the asking node cannot learn it otherwise (a membership
    /// change's outcome, a frame's refusal; a committed frame reaches the sender's
    /// node itself). That node records it for the user
    /// ([`super::state::outcomes`]) and tells its gateway.
    Decided {
        /// Who asked.
        user: UserId,
        /// What they asked.
        asked: Asked,
        /// The decision: [`Outcome::Done`] or [`Outcome::Denied`].
        outcome: Outcome,
    },
    /// To a room's home, from a member node catching up on the history (after
    /// [`Update::More`]): the next page, from `from` on.
    MoreHistory {
        /// Where the page starts (what the home said the history continues at).
        from: Seq,
    },
    /// The idle check (a timer).
    Tick,
    /// From this node's peer actor (never from another node): consecutive messages
    /// the remote node's outbox delivered to this room, applied in order. The room
    /// answers each one as if it came alone, and after a message its store failed
    /// on it applies nothing more of the run (those answer "offer again"), so the
    /// room's order holds however the run ends.
    Run(Vec<RoomMsg>),
}

/// Who asked for what, on the node that forwarded it to this room's home: where
/// the home's word goes durably ([`RoomMsg::Decided`]).
#[derive(Clone, Copy, Debug)]
struct Asker {
    node: NodeId,
    user: UserId,
    asked: Asked,
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
    /// This node's identity, if the driver gave it one (to sign evictions).
    signer: Option<Identity>,
    /// How many frames an epoch key may encrypt.
    epoch_frames_max: u64,
    /// How many frames of history one page to a new member node holds.
    history_page_frames: usize,
    /// Where rooms are sequenced when they are on shard groups ([`shard`]).
    sharding: Option<shard::Sharding>,
}

impl Room {
    pub(crate) fn activate<S: System<Msg = Msg>>(
        room: RoomId,
        config: DomainConfig,
        nodes: Option<std::sync::Arc<BTreeSet<NodeId>>>,
        signer: Option<Identity>,
        sharding: Option<shard::Sharding>,
        cx: &mut Context<'_, S>,
    ) -> Self {
        cx.timer(config.idle, RoomMsg::Tick);
        Room {
            room,
            nodes,
            idle: config.idle,
            busy: false,
            volatile_next: None,
            signer,
            epoch_frames_max: config.epoch_frames_max,
            history_page_frames: config.history_page_frames,
            sharding,
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
        match msg {
            RoomMsg::Tick => self.tick(cx),
            RoomMsg::Run(run) => self.run(run, from, cx),
            msg => {
                let retry = self.handle_one(msg, from, cx);
                // A storage failure is not an answer: the message stays
                // unacknowledged, so its sender's outbox offers it again.
                applied(cx, !retry);
            }
        }
    }
}

impl Room {
    /// Applies a run the local peer handed over, in order, answering each message;
    /// after the first one to fail on storage, the rest are answered "offer again"
    /// unapplied.
    fn run<S: System<Msg = Msg>>(
        &mut self,
        run: Vec<RoomMsg>,
        from: NodeId,
        cx: &mut Context<'_, S>,
    ) {
        if super::local_peer(cx).is_none() {
            tracing::warn!(room = ?self.room, from = ?cx.sender(), "a run not from this node's peer dropped");
            metrics::counter!("conclave_runtime_messages_dropped_total", "reason" => "not_peer")
                .increment(1);
            return;
        }
        let mut failed = false;
        for msg in run {
            if !failed {
                failed = self.handle_one(msg, from, cx);
            }
            applied(cx, !failed);
        }
    }

    /// Handles one message that is not a timer; returns whether it must be
    /// offered again (the store failed, so nothing was decided).
    fn handle_one<S: System<Msg = Msg>>(
        &mut self,
        msg: RoomMsg,
        from: NodeId,
        cx: &mut Context<'_, S>,
    ) -> bool {
        let retry = match msg {
            RoomMsg::Tick | RoomMsg::Run(_) => {
                // Only the peer makes runs, of delivered messages; a timer never travels.
                tracing::warn!(room = ?self.room, "a timer or a run inside a run dropped");
                false
            }
            RoomMsg::Request { req, reply: to } => {
                let user = req.request.user;
                // A membership change's outcome is reported durably; a read is
                // simply asked again.
                let asker = req.request.op.link().map(|_| Asker {
                    node: from,
                    user,
                    asked: Asked::Request {
                        nonce: req.request.nonce,
                    },
                });
                match self.request(&req, from, asker, to, cx) {
                    Ok(None) => false, // taken: answered once applied
                    Ok(Some(outcome)) => self.answer(cx, from, to, asker, outcome),
                    Err(denial) => {
                        let outcome = denied("room", Some(user), denial);
                        self.answer(cx, from, to, asker, outcome)
                    }
                }
            }
            RoomMsg::Publish { frame, reply: to } => {
                let asker = Asker {
                    node: from,
                    user: frame.sender,
                    asked: Asked::Frame { id: frame.id },
                };
                let outcome = match self.publish(frame, from, to, cx) {
                    Ok(None) => return self.handled(false), // taken: answered once applied
                    Ok(Some(outcome)) => outcome,
                    Err(denial) => {
                        let reason = denial.reason();
                        metrics::counter!("conclave_frames_rejected_total", "reason" => reason)
                            .increment(1);
                        denied("room", Some(asker.user), denial)
                    }
                };
                self.answer(cx, from, to, Some(asker), outcome)
            }
            RoomMsg::Decided {
                user,
                asked,
                outcome,
            } => {
                let result = self.decided(user, asked, outcome, from, cx);
                self.settle_update(from, result)
            }
            RoomMsg::Revoked { user } if from == cx.node() => {
                let result = self.revoked(user, cx);
                self.settle_eviction(user, result)
            }
            RoomMsg::Revoked { .. } => {
                tracing::warn!(room = ?self.room, ?from, "a revocation notice from another node dropped");
                false
            }
            RoomMsg::Evict { user, attestation } => {
                let result = self.evict(user, &attestation, from, cx);
                self.settle_eviction(user, result)
            }
            RoomMsg::Update(update) => {
                let result = self.update(update, from, cx);
                self.settle_update(from, result)
            }
            RoomMsg::MoreHistory { from: next } => match self.more_history(next, from, cx) {
                Ok(()) => false,
                Err(denial) => {
                    tracing::warn!(room = ?self.room, node = %from, reason = denial.reason(), %denial, "history page not sent");
                    metrics::counter!("conclave_history_pages_refused_total", "reason" => denial.reason())
                        .increment(1);
                    matches!(denial, Denial::Storage | Denial::OutboxFull { .. })
                }
            },
        };
        self.handled(retry)
    }

    /// Marks the room busy (a message arrived since the last idle check) and
    /// passes `retry` on.
    fn handled(&mut self, retry: bool) -> bool {
        self.busy = true;
        retry
    }

    fn tick<S: System<Msg = Msg>>(&mut self, cx: &mut Context<'_, S>) {
        if self.busy {
            self.busy = false;
            cx.timer(self.idle, RoomMsg::Tick);
        } else {
            cx.stop();
        }
    }

    /// Logs and counts a refused update (or late outcome) from `from`; returns
    /// whether to offer it again (the store failed).
    fn settle_update(&self, from: NodeId, result: Result<(), UpdateError>) -> bool {
        let Err(error) = result else { return false };
        tracing::warn!(room = ?self.room, ?from, reason = error.reason(), %error, "update from the room's home refused");
        metrics::counter!("conclave_updates_rejected_total", "reason" => error.reason())
            .increment(1);
        matches!(
            error,
            UpdateError::Storage(_)
                | UpdateError::StoreFull
                | UpdateError::Unqueued(Denial::Storage | Denial::OutboxFull { .. })
        )
    }

    /// Replies with `outcome` and, for a refusal `asker` must learn, queues it
    /// for their node (a decision that changed the room queued its report when it
    /// committed); returns whether the message must be offered again (the store
    /// or the outbox failed, so nothing was decided).
    fn answer<S: System<Msg = Msg>>(
        &self,
        cx: &mut Context<'_, S>,
        from: NodeId,
        to: ReplyTo,
        asker: Option<Asker>,
        outcome: Outcome,
    ) -> bool {
        let retry = match (&outcome, asker) {
            (Outcome::Denied(Denial::Storage), _) => true,
            // Not a refusal: the frame was committed before, and reached the
            // sender's node then.
            (Outcome::Denied(Denial::Duplicate { .. }), _) => false,
            // A local caller has its answer (this node writes nothing for it).
            (Outcome::Denied(_), Some(asker)) if asker.node != cx.node() => {
                self.report_refusal(cx, asker, &outcome)
            }
            _ => false,
        };
        // A forwarded message that is offered again is decided then: an answer
        // now would be taken for the final one.
        if !retry || from == cx.node() {
            reply(cx, from, to, outcome);
        }
        retry
    }

    /// Queues a refusal for the node that forwarded what was refused; returns
    /// whether that failed for a reason that may pass (the store, a full outbox),
    /// so the message must be offered again.
    fn report_refusal<S: System<Msg = Msg>>(
        &self,
        cx: &mut Context<'_, S>,
        asker: Asker,
        outcome: &Outcome,
    ) -> bool {
        let queued = cx
            .store()
            .write()
            .map_err(Denial::from)
            .and_then(|mut txn| {
                let queued = self.report(&mut *txn, cx.node(), asker, outcome)?;
                txn.commit()?;
                Ok(queued)
            });
        match queued {
            Ok(true) => {
                cx.send(outbox_of(cx.node(), asker.node), super::OutboxMsg::Kick);
                false
            }
            Ok(false) => false,
            Err(denial) => {
                tracing::warn!(room = ?self.room, node = %asker.node, reason = denial.reason(), %denial, "a refusal could not be queued for the asking node");
                metrics::counter!("conclave_outcomes_unreported_total", "reason" => denial.reason())
                    .increment(1);
                matches!(denial, Denial::Storage | Denial::OutboxFull { .. })
            }
        }
    }

    /// Queues `outcome` in `txn` for `asker`'s node if it is another node (whose
    /// room copy records it, see [`RoomMsg::Decided`]); returns whether it did.
    fn report(
        &self,
        txn: &mut dyn conclave_storage::WriteTxn,
        me: NodeId,
        asker: Asker,
        outcome: &Outcome,
    ) -> Result<bool, Denial> {
        if asker.node == me || mutation::active(Mutation::VolatileReplies) {
            return Ok(false);
        }
        let msg = RoomMsg::Decided {
            user: asker.user,
            asked: asker.asked,
            outcome: outcome.clone(),
        };
        enqueue(txn, room_of(asker.node, self.room), Deliverable::Room(msg))?;
        Ok(true)
    }

    /// On the node that forwarded a request: records what the room's home `from`
    /// decided late on it for `user`, one of this node's users who is or was a
    /// member of the room. (A caller still waiting had the home's direct answer;
    /// nothing is passed to the gateway from here, where the gateway could not
    /// tell which home answers.)
    fn decided<S: System<Msg = Msg>>(
        &mut self,
        user: UserId,
        asked: Asked,
        outcome: Outcome,
        from: NodeId,
        cx: &mut Context<'_, S>,
    ) -> Result<(), UpdateError> {
        if from == cx.node() {
            return Err(UpdateError::FromSelf);
        }
        let mut txn = cx.store().write()?;
        let home = rooms::sequencer_of(&*txn, self.room)?.ok_or(UpdateError::UnknownRoom)?;
        if home != from {
            return Err(UpdateError::NotFromHome { from, home });
        }
        let local = registry::user(&*txn, user)?.is_some();
        if !local || rooms::visibility(&*txn, user, self.room)?.is_none() {
            return Err(UpdateError::Malformed(
                "a late outcome for a user of another node, or not of the room",
            ));
        }
        match outcomes::record(&mut *txn, user, self.room, asked, outcome) {
            Ok(()) => {}
            Err(outcomes::RecordError::Unfit) => {
                return Err(UpdateError::Malformed("a late outcome that is not one"));
            }
            Err(outcomes::RecordError::Store(e)) => return Err(e.into()),
        }
        txn.commit()?;
        Ok(())
    }

    fn home<'a>(&'a self, from: NodeId, cx: &Context<'_, impl System>) -> decide::Home<'a> {
        decide::Home {
            room: self.room,
            me: cx.node(),
            from,
            now: cx.now(),
            nodes: self.nodes.as_deref(),
            epoch_frames_max: self.epoch_frames_max,
            registry: decide::Registry::Store,
        }
    }

    /// Logs and counts a refused eviction; returns whether to offer the message
    /// again (the store failed).
    fn settle_eviction(&self, user: UserId, result: Result<(), Denial>) -> bool {
        match result {
            Ok(()) => false,
            Err(denial) => {
                tracing::warn!(room = ?self.room, ?user, reason = denial.reason(), %denial, "eviction not made");
                metrics::counter!("conclave_evictions_refused_total", "reason" => denial.reason())
                    .increment(1);
                denial == Denial::Storage
            }
        }
    }

    /// One of this node's users was revoked: evict them here (the home) or send
    /// this node's signed word to the room's home, through the durable outbox.
    fn revoked<S: System<Msg = Msg>>(
        &mut self,
        user: UserId,
        cx: &mut Context<'_, S>,
    ) -> Result<(), Denial> {
        let signer = self
            .signer
            .as_ref()
            .ok_or_else(|| Denial::missing("this node's identity (to sign the eviction)"))?;
        let attestation = super::chain::attest_eviction(signer, self.room, user);
        let me = cx.node();
        let mut txn = cx.store().write()?;
        registry::check_revoked(&*txn, user)?;
        let meta = rooms::meta(&*txn, self.room)?
            .ok_or_else(|| Denial::not_found(format!("room {}", self.room)))?;
        if meta.sequencer() == me {
            drop(txn);
            return self.evict(user, &attestation, me, cx);
        }
        let msg = RoomMsg::Evict { user, attestation };
        super::enqueue(
            &mut *txn,
            super::room_of(meta.sequencer(), self.room),
            super::Deliverable::Room(msg),
        )?;
        txn.commit()?;
        cx.send(outbox_of(me, meta.sequencer()), super::OutboxMsg::Kick);
        Ok(())
    }

    /// On the sequencer: evicts `user` on the word of their node `from`, signing
    /// the chain link as the room's home.
    fn evict<S: System<Msg = Msg>>(
        &mut self,
        user: UserId,
        attestation: &SignatureBytes,
        from: NodeId,
        cx: &mut Context<'_, S>,
    ) -> Result<(), Denial> {
        let signer = self
            .signer
            .clone()
            .ok_or_else(|| Denial::missing("this node's identity (to sign the eviction)"))?;
        let txn = cx.store().write()?;
        // Made again here after it lost a race on a shard: on the word of the
        // member's node, which the attestation proves.
        let from = match rooms::member(&*txn, self.room, user)? {
            Some(member) if from == cx.node() => member.home,
            _ => from,
        };
        if let Some(group) = self.shard_here(None, cx)? {
            // Decided when applied: this replica may not have applied yet what
            // made the user a member. A link that no longer follows the head
            // then is signed again there (see the replicas actor).
            let (_, head) = rooms::chain_head(&*txn, self.room)?;
            let link = super::chain::Link {
                room: self.room,
                prev: head,
                by: super::chain::Signer::Node(cx.node()),
                change: super::chain::Change::Evict {
                    user,
                    attestation: *attestation,
                },
            };
            let link = Box::new(SignedLink::sign(&signer, link));
            drop(txn);
            return self.take(shard::ShardCommand::Evict(link), from, None, group, cx);
        }
        let event = decide::evict(&*txn, &self.home(from, cx), &signer, user, attestation)?;
        tracing::info!(room = ?self.room, ?user, "revoked member evicted");
        self.commit(event, txn, None, cx).map(|_| ())
    }

    /// Decides a request and, if it changes the room, applies and commits it.
    fn request<S: System<Msg = Msg>>(
        &mut self,
        req: &SignedRequest,
        from: NodeId,
        asker: Option<Asker>,
        reply: ReplyTo,
        cx: &mut Context<'_, S>,
    ) -> Result<Option<Outcome>, Denial> {
        let created_on = match &req.request.op {
            Op::CreateRoom { link, .. } => match &link.link.change {
                super::chain::Change::Create { home, .. } => Some(*home),
                _ => None,
            },
            _ => None,
        };
        if let Some(group) = self.shard_here(created_on, cx)? {
            if let Op::RoomInfo { .. } = req.request.op {
                return self.info_here(req, from, cx).map(Some);
            }
            let command = shard::ShardCommand::Request(Box::new(req.clone()));
            return self
                .take(command, from, Some(reply), group, cx)
                .map(|()| None);
        }
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
        // What grows the store waits for space; removals and rekeys, which keep a
        // room safe, go on in the reserve.
        if matches!(req.request.op, Op::CreateRoom { .. } | Op::Invite { .. }) {
            super::room_for_more(cx.store())?;
        }
        let h = self.home(from, cx);
        let acting = req.request.user;
        let event = match &req.request.op {
            Op::CreateRoom { link, key } => decide::create(&*txn, &h, req, link, key)?,
            Op::Invite { link, key } => decide::invite(&*txn, &h, req, link, key)?,
            Op::Remove { link, bundle } => decide::remove(&*txn, &h, req, link, bundle)?,
            Op::Rekey { link, bundle } => decide::rekey(&*txn, &h, req, link, bundle)?,
            Op::RoomInfo { .. } => return decide::info(&*txn, &h, acting).map(Some),
            Op::AddUser { .. } | Op::RevokeUser { .. } | Op::ListUsers | Op::ListRooms { .. } => {
                return Err(Denial::malformed("not a room request"));
            }
        };
        tracing::info!(room = ?self.room, user = ?acting, op = event.name(), "room changed");
        self.commit(event, txn, asker, cx).map(Some)
    }

    /// Decides a frame and, if it is accepted, sequences and commits it.
    fn publish<S: System<Msg = Msg>>(
        &mut self,
        frame: Frame,
        from: NodeId,
        reply: ReplyTo,
        cx: &mut Context<'_, S>,
    ) -> Result<Option<Outcome>, Denial> {
        if let Some(group) = self.shard_here(None, cx)? {
            let command = shard::ShardCommand::Publish(frame);
            return self
                .take(command, from, Some(reply), group, cx)
                .map(|()| None);
        }
        super::room_for_more(cx.store())?;
        let txn = cx.store().write()?;
        // Mutation: the sequence number comes from memory.
        let next = self
            .volatile_next
            .filter(|_| mutation::active(Mutation::VolatileSequence));
        let event = decide::publish(&*txn, &self.home(from, cx), frame, next)?;
        let outcome = self.commit(event, txn, None, cx)?;
        metrics::counter!("conclave_frames_committed_total").increment(1);
        Ok(Some(outcome))
    }

    /// The shard group this node proposes the room's commands to: when rooms
    /// are on shard groups and this node replicates the room's shard (its home
    /// being `home`, or as the room's record here says).
    fn shard_here<S: System<Msg = Msg>>(
        &self,
        home: Option<NodeId>,
        cx: &Context<'_, S>,
    ) -> Result<Option<u64>, Denial> {
        let Some(sharding) = &self.sharding else {
            return Ok(None);
        };
        let home = match home {
            Some(home) => home,
            None => match rooms::meta(&*cx.store().read()?, self.room)? {
                Some(meta) => meta.home,
                None => return Ok(None),
            },
        };
        let Some(group) = sharding.shard(home, self.room) else {
            return Ok(None);
        };
        let here = sharding
            .layout
            .replicas(&sharding.nodes, group)
            .contains(&cx.node());
        Ok(here.then_some(group))
    }

    /// The room as this node's replica of its shard holds it, to a member.
    fn info_here<S: System<Msg = Msg>>(
        &self,
        req: &SignedRequest,
        from: NodeId,
        cx: &Context<'_, S>,
    ) -> Result<Outcome, Denial> {
        let txn = cx.store().read()?;
        if from == cx.node() {
            registry::authenticate(&*txn, req, cx.now())?;
        } else {
            req.verify()?;
        }
        let h = decide::Home {
            registry: decide::Registry::Given(&[]),
            ..self.home(from, cx)
        };
        decide::info(&*txn, &h, req.request.user)
    }

    /// Takes `command` for the room's shard `group`: checks what only this
    /// node can (its user's signature and registry, its disk), checks it
    /// against this node's replica, and owes it (proposed by the replicas
    /// actor until applied here, then answered to `reply`).
    fn take<S: System<Msg = Msg>>(
        &mut self,
        command: shard::ShardCommand,
        from: NodeId,
        reply: Option<ReplyTo>,
        group: u64,
        cx: &mut Context<'_, S>,
    ) -> Result<(), Denial> {
        use shard::ShardCommand;
        let me = cx.node();
        let grows = match &command {
            ShardCommand::Request(req) => {
                matches!(req.request.op, Op::CreateRoom { .. } | Op::Invite { .. })
            }
            ShardCommand::Publish(_) => true,
            ShardCommand::Evict(_) => false,
        };
        if grows {
            super::room_for_more(cx.store())?;
        }
        let mut txn = cx.store().write()?;
        let users = match &command {
            ShardCommand::Request(req) => self.users_here(&*txn, req, from, cx)?,
            _ => Vec::new(),
        };
        let entry = shard::ShardEntry {
            room: self.room,
            at: cx.now(),
            proposer: me,
            via: from,
            users,
            command,
        };
        let replicas: BTreeSet<NodeId> = BTreeSet::new();
        // As every replica will decide: the whole cluster, not this node's peers.
        let cluster: Option<BTreeSet<NodeId>> = self
            .sharding
            .as_ref()
            .map(|s| s.nodes.iter().copied().collect());
        let at = shard::Replica {
            me,
            replicas: &replicas,
            nodes: cluster.as_ref(),
            epoch_frames_max: self.epoch_frames_max,
            history_page_frames: self.history_page_frames,
        };
        // An eviction is judged only when applied (see `evict`).
        if !matches!(entry.command, ShardCommand::Evict(_)) {
            shard::check(&*txn, &at, &entry)?;
        }
        let mut id = [0u8; 16];
        cx.rng().fill_bytes(&mut id);
        shard::owe(&mut *txn, ProposalId(id), group, &entry, reply)?;
        txn.commit()?;
        cx.send(replicas_of(me), ReplicasMsg::Kick);
        Ok(())
    }

    /// Checks a request as the node it came from can, and returns the records
    /// of this node's users its decision looks up (the acting user, an
    /// invitee homed here).
    fn users_here<S: System<Msg = Msg>>(
        &self,
        txn: &dyn conclave_storage::ReadTxn,
        req: &SignedRequest,
        from: NodeId,
        cx: &Context<'_, S>,
    ) -> Result<Vec<(UserId, registry::UserRecord)>, Denial> {
        let me = cx.node();
        if from == me {
            registry::authenticate(txn, req, cx.now())?;
        } else {
            req.verify()?;
        }
        if req.request.op.room() != Some(self.room) {
            return Err(Denial::malformed("request for another room"));
        }
        let mut users = vec![req.request.user];
        if let Op::Invite { link, .. } = &req.request.op {
            if let super::chain::Change::Invite { invitee, .. } = &link.link.change {
                if invitee.home == me {
                    users.push(UserId(invitee.user.signing));
                }
            }
        }
        if let Op::CreateRoom { .. } = &req.request.op {
            // The creator's node counts its users' rooms (every room it homes
            // is on a shard it replicates); the replicas do not.
            decide::check_room_quota(txn, req.request.user)?;
        }
        let mut records = Vec::new();
        for user in users {
            if let Some(record) = registry::user(txn, user)? {
                records.push((user, record));
            }
        }
        Ok(records)
    }

    /// Applies `event`, queues its fan-out and its report to `asker`'s node,
    /// commits, and only then kicks the outboxes and tells local subscribers.
    fn commit<S: System<Msg = Msg>>(
        &mut self,
        event: Event,
        mut txn: Box<dyn conclave_storage::WriteTxn + '_>,
        asker: Option<Asker>,
        cx: &mut Context<'_, S>,
    ) -> Result<Outcome, Denial> {
        let me = cx.node();
        apply::apply(&mut *txn, self.room, me, &event)?;
        let at = (cx.now(), self.history_page_frames);
        let holders = BTreeSet::from([me]);
        let out = apply::Fanout::home(&holders);
        let mut nodes = apply::fan_out(&mut *txn, self.room, out, at, &event)?;
        if let Some(asker) = asker {
            if self.report(&mut *txn, me, asker, &event.outcome())? {
                nodes.insert(asker.node);
            }
        }
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

    /// On the room's home: sends member node `node` the next page of the history
    /// it is owed, from `next` (where the home said it goes on). A request
    /// answered already (handed over again), or for history no longer owed (the
    /// node's members were removed before it got there), is done with.
    fn more_history<S: System<Msg = Msg>>(
        &mut self,
        next: Seq,
        node: NodeId,
        cx: &mut Context<'_, S>,
    ) -> Result<(), Denial> {
        let me = cx.node();
        let mut txn = cx.store().write()?;
        let meta = rooms::meta(&*txn, self.room)?
            .ok_or_else(|| Denial::not_found(format!("room {}", self.room)))?;
        if meta.sequencer() != me || node == me {
            return Err(Denial::malformed(
                "history asked of a node that is not the room's home",
            ));
        }
        let owed = rooms::catch_ups(&*txn, self.room, node)?;
        let Some(stretch) = owed.first().filter(|s| s.next == next).copied() else {
            return Ok(());
        };
        let at = (cx.now(), self.history_page_frames);
        // With rooms on shard groups too: what it sends was decided before.
        let holders = BTreeSet::from([me]);
        let out = apply::Fanout {
            holders: &holders,
            decided: self.sharding.is_some(),
        };
        apply::send_page(&mut *txn, out, self.room, node, stretch, at)?;
        txn.commit()?;
        cx.send(outbox_of(me, node), super::OutboxMsg::Kick);
        Ok(())
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
        let snapshot = matches!(update, Update::Members { .. });
        let asks = matches!(update, Update::More { .. });
        if matches!(update, Update::Frame { .. }) {
            // Offered again later: the home's outbox holds it meanwhile.
            if let Err(Denial::StoreFull { .. }) = super::room_for_more(cx.store()) {
                return Err(UpdateError::StoreFull);
            }
        }
        let mut txn = cx.store().write()?;
        replica::apply(&mut *txn, &at, update)?;
        txn.commit()?;
        if asks {
            cx.send(outbox_of(at.me, from), super::OutboxMsg::Kick);
        }
        cx.send(gateway_of(at.me), ClientMsg::Changed { room: self.room });
        if snapshot {
            self.evict_revoked_locals(cx)?;
        }
        Ok(())
    }

    /// A snapshot may list a user of this node revoked before the invite reached
    /// it (the revocation evicted them only from the rooms it knew): have them
    /// evicted now.
    fn evict_revoked_locals<S: System<Msg = Msg>>(
        &self,
        cx: &mut Context<'_, S>,
    ) -> Result<(), StoreError> {
        let me = cx.node();
        let txn = cx.store().read()?;
        let mut revoked = Vec::new();
        for member in rooms::members(&*txn, self.room)? {
            let record = registry::user(&*txn, member.user)?;
            if member.home == me && record.is_some_and(|r| r.status == UserStatus::Revoked) {
                revoked.push(member.user);
            }
        }
        drop(txn);
        for user in revoked {
            cx.send(super::room_of(me, self.room), RoomMsg::Revoked { user });
        }
        Ok(())
    }
}

impl Event {
    /// The room's record after it.
    fn meta(&self) -> &RoomMeta {
        match self {
            Event::Created { meta, .. }
            | Event::Invited { meta, .. }
            | Event::Removed { meta, .. }
            | Event::Rekeyed { meta, .. }
            | Event::Evicted { meta, .. }
            | Event::Published { meta, .. } => meta,
        }
    }

    /// A short name for logs.
    fn name(&self) -> &'static str {
        match self {
            Event::Created { .. } => "created",
            Event::Invited { .. } => "invited",
            Event::Removed { .. } => "removed",
            Event::Rekeyed { .. } => "rekeyed",
            Event::Evicted { .. } => "evicted",
            Event::Published { .. } => "published",
        }
    }
}

#[cfg(test)]
mod tests {
    use conclave_storage::{Faulty, MemStore};
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    use super::*;
    use crate::actor::Effect;
    use crate::domain::{peer_of, room_of, Domain, PeerMsg};

    const HOME: NodeId = NodeId([1; 32]);
    const HERE: NodeId = NodeId([2; 32]);

    /// Hands `run` to a room on `HERE` as the peer for `HOME` does; returns its
    /// answers, in order.
    fn answers(store: &Faulty<MemStore>, run: Vec<RoomMsg>) -> Vec<bool> {
        let id = RoomId([7; 16]);
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let mut effects = Vec::new();
        let (me, peer) = (room_of(HERE, id), peer_of(HERE, HOME));
        let mut cx =
            Context::<Domain>::new(me, None, Time::default(), &mut rng, store, &mut effects);
        let mut room = Room::activate(id, DomainConfig::default(), None, None, None, &mut cx);
        let mut cx = Context::<Domain>::new(
            me,
            Some(peer),
            Time::default(),
            &mut rng,
            store,
            &mut effects,
        );
        room.handle(RoomMsg::Run(run), &mut cx);
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::Send {
                    to,
                    msg: Msg::Peer(PeerMsg::Applied { done }),
                    ..
                } if *to == peer => Some(*done),
                _ => None,
            })
            .collect()
    }

    fn keys() -> RoomMsg {
        RoomMsg::Update(Update::Keys {
            epoch: Epoch(1),
            keys: Vec::new(),
        })
    }

    #[test]
    fn a_run_answers_every_message_and_stops_applying_at_a_storage_failure() {
        // Keys for a room this node does not know are refused for good: done.
        let store = Faulty::new(MemStore::new());
        assert_eq!(answers(&store, vec![keys(), keys(), keys()]), [true; 3]);
        // The store fails on the first: nothing after it is applied, so all three
        // are offered again (the second would otherwise be refused, i.e. done).
        store.fail_next_write();
        assert_eq!(answers(&store, vec![keys(), keys(), keys()]), [false; 3]);
    }
}

//! Rooms on shard groups (replication): a room's commands go into the log of
//! its shard group ([`Replication::shard_of`]), and every replica of the shard
//! decides and applies each one when it applies the entry, alike. A decision
//! reads only the room's replicated state and the entry: its time, the node
//! that proposed it and the records of that node's users it needs.
//!
//! - **Owed commands.** A node takes a command for a room whose shard it
//!   replicates by writing it to its owed table ([`owe`]) in the transaction
//!   that answers its sender; its replicas actor proposes every owed command
//!   ([`owed`]) until it applies it here ([`settle`]): again after a leader
//!   was lost, and after a restart. A command applied twice changes nothing the
//!   second time (a frame's id, a request's chain link, a room that exists are
//!   refused again), so retrying is safe and a frame commits once.
//! - **The home fans out.** The room's home, a replica of the room's shard by
//!   [`Replication::shard_of`], queues what member nodes outside the shard must
//!   learn, and reports to a node outside the shard what became of the commands
//!   it forwarded, as it does without replication: those nodes take a room's
//!   updates from its home only. The shard's replicas learn by applying.

use std::collections::BTreeSet;
use std::sync::Arc;

use conclave_storage::{Order, ReadTxn, StoreError, Table, WriteTxn};
use serde::{Deserialize, Serialize};

use super::decide::{self, Home, Registry};
use super::{apply, Event, RoomMsg};
use crate::actor::Time;
use crate::crypto::Frame;
use crate::domain::chain::SignedLink;
use crate::domain::state::registry::UserRecord;
use crate::domain::{room_of, Asked, Deliverable, Denial, Op, Outcome, ReplyTo};
use crate::domain::{SignedRequest, UserId};
use crate::ids::{NodeId, RoomId};
use crate::replication::layout::{ProposalId, PROPOSAL_BYTES_MAX};
use crate::replication::Replication;
use crate::wire::{decode_bounded, encode_bounded};

/// Where rooms are sequenced when they are on shard groups: the layout and the
/// cluster (sorted).
#[derive(Clone, Debug)]
pub struct Sharding {
    /// The layout.
    pub layout: Replication,
    /// The cluster, sorted.
    pub nodes: Arc<[NodeId]>,
}

impl Sharding {
    /// The shard group of `room`, homed on `home`.
    pub fn shard(&self, home: NodeId, room: RoomId) -> Option<u64> {
        self.layout.shard_of(&self.nodes, home, room)
    }

    /// The replicas of `room`'s shard (empty if it has none).
    pub fn replicas(&self, home: NodeId, room: RoomId) -> Vec<NodeId> {
        self.shard(home, room)
            .map(|g| self.layout.replicas(&self.nodes, g))
            .unwrap_or_default()
    }
}

/// One entry of a shard group's log: a command for one room.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardEntry {
    /// The room.
    pub room: RoomId,
    /// The proposing node's clock when it took the command: the decision's.
    pub at: Time,
    /// The node that took the command and proposed it.
    pub proposer: NodeId,
    /// The node the command came from: the acting user's (a node outside the
    /// shard forwards its users' commands to the room's home).
    pub via: NodeId,
    /// The records, as `proposer` holds them, of its users the decision looks
    /// up: a room's creator, an invitee homed there.
    pub users: Vec<(UserId, UserRecord)>,
    /// What to do.
    pub command: ShardCommand,
}

/// What a [`ShardEntry`] asks of the room.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ShardCommand {
    /// A signed membership request (create, invite, remove, rekey).
    Request(Box<SignedRequest>),
    /// A frame to sequence.
    Publish(Frame),
    /// An eviction, in a link the room's home signed on the evicted user's
    /// node's word (`via`).
    Evict(Box<SignedLink>),
}

impl ShardEntry {
    /// What the acting user asked, as their node records late outcomes.
    fn asked(&self) -> Option<(UserId, Asked)> {
        match &self.command {
            ShardCommand::Request(req) => Some((
                req.request.user,
                Asked::Request {
                    nonce: req.request.nonce,
                },
            )),
            ShardCommand::Publish(frame) => Some((frame.sender, Asked::Frame { id: frame.id })),
            ShardCommand::Evict(_) => None,
        }
    }
}

/// What a replica applying entries needs besides the entry.
pub struct Replica<'a> {
    /// This node.
    pub me: NodeId,
    /// The shard's replicas.
    pub replicas: &'a BTreeSet<NodeId>,
    /// The cluster's nodes (invitees must be homed on one).
    pub nodes: Option<&'a BTreeSet<NodeId>>,
    /// How many frames one epoch key may encrypt.
    pub epoch_frames_max: u64,
    /// How many frames of history one page to a new member node holds.
    pub history_page_frames: usize,
}

/// What applying one entry did here.
#[derive(Debug)]
pub struct Applied {
    /// The room.
    pub room: RoomId,
    /// The decision, as the asking client is told it.
    pub outcome: Outcome,
    /// Whether the room changed (its local subscribers are told).
    pub changed: bool,
    /// The nodes whose outboxes now hold something (this node being the home).
    pub kick: BTreeSet<NodeId>,
    /// When the node that took the command proposed it.
    pub at: Time,
    /// A user of this node, revoked here, that the command made a member
    /// (the revocation evicted them only from the rooms they were in then):
    /// to be evicted now.
    pub revoked_member: Option<UserId>,
}

/// Why an entry could not be applied: the turn fails and is tried again.
#[derive(Debug, thiserror::Error)]
#[error("applying a shard entry: {0}")]
pub struct ApplyError(pub Denial);

impl From<StoreError> for ApplyError {
    fn from(e: StoreError) -> Self {
        ApplyError(Denial::from(e))
    }
}

/// Decides and applies the entry `bytes` on this replica. `None` if it is not
/// an entry (one a replica cannot read is skipped by every replica alike).
pub fn apply_entry(
    txn: &mut dyn WriteTxn,
    at: &Replica<'_>,
    bytes: &[u8],
) -> Result<Option<Applied>, ApplyError> {
    let Ok(entry) = decode_bounded::<ShardEntry>(bytes, PROPOSAL_BYTES_MAX) else {
        tracing::warn!("a shard entry that does not decode skipped");
        return Ok(None);
    };
    let decided = decide_entry(&*txn, &deciding(&entry, at), &entry);
    let applied = match decided {
        Ok(event) => apply_event(txn, at, &entry, &event)?,
        Err(Denial::Storage) => return Err(ApplyError(Denial::Storage)),
        Err(Denial::Duplicate { seq }) => {
            let id = match &entry.command {
                ShardCommand::Publish(frame) => frame.id,
                _ => {
                    return Err(ApplyError(Denial::malformed(
                        "a duplicate that is no frame",
                    )))
                }
            };
            // Committed before (a retry): the frame's outcome, once.
            Applied {
                room: entry.room,
                outcome: Outcome::Committed { id, seq },
                changed: false,
                kick: BTreeSet::new(),
                at: entry.at,
                revoked_member: None,
            }
        }
        Err(denial) => refuse(txn, at, &entry, denial)?,
    };
    Ok(Some(applied))
}

/// What every replica would decide on `entry` now, as the node taking it can
/// tell from its own replica: a command refused here is refused at once rather
/// than sent through the log (it may still be refused when applied, if the
/// room changed meanwhile).
pub fn check(txn: &dyn ReadTxn, at: &Replica<'_>, entry: &ShardEntry) -> Result<(), Denial> {
    decide_entry(txn, &deciding(entry, at), entry).map(|_| ())
}

/// Who decides `entry` and with what: as its proposer would, on any replica.
fn deciding<'a>(entry: &'a ShardEntry, at: &Replica<'a>) -> Home<'a> {
    Home {
        room: entry.room,
        me: entry.proposer,
        from: entry.via,
        now: entry.at,
        nodes: at.nodes,
        epoch_frames_max: at.epoch_frames_max,
        registry: Registry::Given(&entry.users),
    }
}

/// The decision on `entry`'s command, as every replica makes it.
fn decide_entry(txn: &dyn ReadTxn, h: &Home<'_>, entry: &ShardEntry) -> Result<Event, Denial> {
    match &entry.command {
        ShardCommand::Request(req) => {
            req.verify()?;
            if req.request.op.room() != Some(h.room) {
                return Err(Denial::malformed("request for another room"));
            }
            match &req.request.op {
                Op::CreateRoom { link, key } => decide::create(txn, h, req, link, key),
                Op::Invite { link, key } => decide::invite(txn, h, req, link, key),
                Op::Remove { link, bundle } => decide::remove(txn, h, req, link, bundle),
                Op::Rekey { link, bundle } => decide::rekey(txn, h, req, link, bundle),
                _ => Err(Denial::malformed("not a request a shard decides")),
            }
        }
        ShardCommand::Publish(frame) => decide::publish(txn, h, frame.clone(), None),
        ShardCommand::Evict(link) => decide::evicted(txn, h, (**link).clone()),
    }
}

/// Applies `event` here; the room's home also fans it out and reports a
/// membership change to the node that forwarded it.
fn apply_event(
    txn: &mut dyn WriteTxn,
    at: &Replica<'_>,
    entry: &ShardEntry,
    event: &Event,
) -> Result<Applied, ApplyError> {
    let room = entry.room;
    apply::apply(txn, room, at.me, event)?;
    let outcome = event.outcome();
    let mut kick = BTreeSet::new();
    if event.meta().home == at.me {
        let page = (entry.at, at.history_page_frames);
        let out = apply::Fanout {
            holders: at.replicas,
            decided: true,
        };
        kick = apply::fan_out(txn, room, out, page, event).map_err(ApplyError)?;
        let change = matches!(entry.command, ShardCommand::Request(_));
        if change && report(txn, at, entry, &outcome)? {
            kick.insert(entry.via);
        }
    }
    Ok(Applied {
        room,
        outcome,
        changed: true,
        kick,
        at: entry.at,
        revoked_member: revoked_member(&*txn, at.me, event)?,
    })
}

/// The member `event` added, if they are a user of this node that its registry
/// shows revoked (read only to act here, never to decide).
fn revoked_member(
    txn: &dyn ReadTxn,
    me: NodeId,
    event: &Event,
) -> Result<Option<UserId>, StoreError> {
    let Event::Invited { member, .. } = event else {
        return Ok(None);
    };
    if member.home != me {
        return Ok(None);
    }
    let record = crate::domain::state::registry::user(txn, member.user)?;
    let revoked = record.is_some_and(|r| r.status == crate::domain::UserStatus::Revoked);
    Ok(revoked.then_some(member.user))
}

/// A refusal: nothing changes; the room's home reports it to the node that
/// forwarded the command.
fn refuse(
    txn: &mut dyn WriteTxn,
    at: &Replica<'_>,
    entry: &ShardEntry,
    denial: Denial,
) -> Result<Applied, ApplyError> {
    let outcome = Outcome::Denied(denial);
    let mut kick = BTreeSet::new();
    let home = crate::domain::state::rooms::meta(&*txn, entry.room)?.map(|m| m.home);
    if home == Some(at.me) && report(txn, at, entry, &outcome)? {
        kick.insert(entry.via);
    }
    Ok(Applied {
        room: entry.room,
        outcome,
        changed: false,
        kick,
        at: entry.at,
        revoked_member: None,
    })
}

/// Queues `outcome` for the node the command came from if it is outside the
/// shard (inside it, that node learns by applying); returns whether it did.
fn report(
    txn: &mut dyn WriteTxn,
    at: &Replica<'_>,
    entry: &ShardEntry,
    outcome: &Outcome,
) -> Result<bool, ApplyError> {
    let Some((user, asked)) = entry.asked() else {
        return Ok(false);
    };
    if at.replicas.contains(&entry.via) {
        return Ok(false);
    }
    let msg = RoomMsg::Decided {
        user,
        asked,
        outcome: outcome.clone(),
    };
    let to = room_of(entry.via, entry.room);
    crate::domain::enqueue_decided(txn, to, Deliverable::Room(msg)).map_err(ApplyError)?;
    Ok(true)
}

/// A command this node took and has not applied yet.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Owed {
    /// The shard group.
    pub group: u64,
    /// The entry ([`ShardEntry`], encoded).
    #[serde(with = "serde_bytes")]
    pub entry: Vec<u8>,
    /// Where the outcome goes once applied here (best effort; a client that
    /// missed it asks again).
    pub reply: Option<ReplyTo>,
}

/// The most commands a node owes at once (past it: [`Denial::Limit`]).
pub const OWED_MAX: u64 = 4_096;

const OWED: Table<[u8; 16], Owed> = Table::new("shard.owed");
const OWED_COUNT: Table<[u8; 1], u64> = Table::new("shard.owed_count");

/// Records `entry` for `group` as owed by this node, as `id`.
pub fn owe(
    txn: &mut dyn WriteTxn,
    id: ProposalId,
    group: u64,
    entry: &ShardEntry,
    reply: Option<ReplyTo>,
) -> Result<(), Denial> {
    let count = OWED_COUNT.get(&*txn, &[0])?.unwrap_or(0);
    if count >= OWED_MAX {
        return Err(Denial::Limit {
            what: format!("{OWED_MAX} commands waiting for their shard on this node"),
        });
    }
    let entry = encode_bounded(entry, PROPOSAL_BYTES_MAX).map_err(|_| Denial::Limit {
        what: format!("a command of at most {PROPOSAL_BYTES_MAX} bytes"),
    })?;
    OWED.put(
        txn,
        &id.0,
        &Owed {
            group,
            entry,
            reply,
        },
    )?;
    OWED_COUNT.put(txn, &[0], &(count + 1))?;
    Ok(())
}

/// Up to `limit` owed commands, by id.
pub fn owed(txn: &dyn ReadTxn, limit: usize) -> Result<Vec<(ProposalId, Owed)>, StoreError> {
    let all = OWED.scan(txn, [0u8; 16]..=[u8::MAX; 16], Order::Ascending, limit)?;
    Ok(all.into_iter().map(|(k, v)| (ProposalId(k), v)).collect())
}

/// Takes owed command `id` off the table (it was applied here, or refused
/// before it was proposed); what it was, if it was owed.
pub fn settle(txn: &mut dyn WriteTxn, id: ProposalId) -> Result<Option<Owed>, StoreError> {
    let Some(owed) = OWED.get(&*txn, &id.0)? else {
        return Ok(None);
    };
    OWED.delete(txn, &id.0)?;
    let count = OWED_COUNT.get(&*txn, &[0])?.unwrap_or(1);
    OWED_COUNT.put(txn, &[0], &count.saturating_sub(1))?;
    Ok(Some(owed))
}

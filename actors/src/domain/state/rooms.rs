//! Rooms as a node records them: the room's record ([`RoomMeta`]), its members,
//! its frames and the message ids already sequenced, what each local user may read
//! ([`Visibility`]), and the room's membership chain (whose first link, the
//! creator's signed creation, proves its home).
//!
//! On the room's sequencer (today its home) these are authoritative; on a member
//! node they are the copy the sequencer's updates built.

use conclave_storage::{Order, ReadTxn, StoreError, Table, WriteTxn};
use serde::{Deserialize, Serialize};

use crate::crypto::Frame;
use crate::domain::chain::{ChainHash, SignedLink};
use crate::domain::{Policy, RoomMember, ROOM_MEMBERS_MAX};
use crate::ids::{Epoch, MessageId, NodeId, RoomId, Seq, UserId};

/// How many frames a room without `persist` keeps (on its home and member nodes).
pub const EPHEMERAL_FRAMES_KEPT: u64 = 256;

/// The most memberships one page of [`rooms_page`] looks at (a room listed is ~50
/// bytes in a response: a page stays far under 1 MiB).
pub const ROOMS_PAGE_MAX: usize = 4_096;

/// The most frames of history one page to a new member node holds (it asks for
/// the next page once it has this one: see [`catching_up`]).
pub const BACKFILL_PAGE_FRAMES: usize = 256;

/// The most ciphertext bytes of an ephemeral room's history a new member node is
/// sent (the newest frames that fit, at once: see `room::apply`).
pub const EPHEMERAL_HISTORY_BYTES_MAX: usize = 16 * 1024 * 1024;

/// The most ciphertext bytes of history one page holds (a page ends at the frame
/// that passes it).
pub const BACKFILL_PAGE_BYTES: usize = 4 * 1024 * 1024;

/// A room's record on a node (authoritative on its sequencer; the sequencer's last
/// snapshot elsewhere).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomMeta {
    /// The home node, named (and signed) by the creator.
    pub home: NodeId,
    /// The policy.
    pub policy: Policy,
    /// The current epoch (from 1).
    pub epoch: Epoch,
    /// The first sequence number of the current epoch.
    pub epoch_start: Seq,
    /// The sequence number of the next frame (from 1).
    pub next_seq: Seq,
    /// The creator.
    pub owner: UserId,
    /// Bumped by every membership change (creation is 1), so a member node can
    /// order the snapshots it receives and skip an older one handed over again.
    pub members_version: u64,
    /// A member was evicted (revoked by their node) since the epoch started: no
    /// frame is sequenced until a member moves the room to a new epoch.
    pub rekey_due: bool,
}

impl RoomMeta {
    /// Whether the record is possible: epochs, sequence numbers and versions start
    /// at 1, and an epoch starts at or before the next frame. A member node checks
    /// this of every snapshot before it keeps it.
    pub fn is_valid(&self) -> bool {
        self.epoch.0 >= 1
            && self.next_seq.0 >= 1
            && self.epoch_start.0 >= 1
            && self.epoch_start <= self.next_seq
            && self.members_version >= 1
    }

    /// The node that sequences the room's frames and decides its membership. Today
    /// that is its home; replication replaces this one function (with the leader of
    /// the room's shard), and every "who sequences room R" goes through it.
    pub fn sequencer(&self) -> NodeId {
        self.home
    }

    /// Asserts [`RoomMeta::is_valid`] of what is written: a broken record is a bug
    /// here, not something a peer can cause (snapshots are checked first).
    fn assert_valid(&self) {
        assert!(self.is_valid(), "impossible room record {self:?}");
    }
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
const CHAIN: Table<([u8; 16], u64), SignedLink> = Table::new("room.chain");
/// Members evicted from a room (revoked), by the index of the link that did it.
const EVICTED: Table<([u8; 16], [u8; 32]), u64> = Table::new("room.evicted");
/// On a member node: the epoch each of a room's epochs began at, by its first
/// sequence number, as the home's snapshots said. A node catching up on the
/// history is sent frames of epochs before the current one, each checked against
/// the epoch in force at its sequence number.
const EPOCH_STARTS: Table<([u8; 16], u64), u64> = Table::new("room.epoch_starts");
/// On a member node: members the home's snapshots removed, and the sequence
/// number of the room's next frame at their removal (their frames before it are
/// history a node catching up is still sent).
const FORMER: Table<([u8; 16], [u8; 32]), u64> = Table::new("room.former");
/// On a room's home: the stretches of history member nodes are still owed, by
/// (room, node, next frame to send), each to `until` (exclusive) or, while the
/// node's members are still members, to the room's head.
const CATCHING_UP: Table<([u8; 16], [u8; 32], u64), Option<u64>> = Table::new("room.catching_up");

/// The most stretches of history one node may be owed in one room (each a
/// membership of its users that began while it was catching up on the one
/// before); an invitation that would owe it more is refused with `limit`.
pub const CATCH_UPS_MAX: usize = 16;

/// A stretch of history a member node is owed: from `next` to `until`
/// (exclusive), or to the room's head when `until` is `None`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CatchUp {
    /// The next frame to send.
    pub next: Seq,
    /// Where the stretch ends (the removal of the node's last member), if it does.
    pub until: Option<Seq>,
}

/// The stretches of `room`'s history `node` is owed, oldest first. While there
/// is any, the node gets no live frame: it asks for the history page after page,
/// and the page that reaches the room's head makes it live, in order.
pub fn catch_ups(
    txn: &dyn ReadTxn,
    room: RoomId,
    node: NodeId,
) -> Result<Vec<CatchUp>, StoreError> {
    let range = (room.0, node.0, 0)..=(room.0, node.0, u64::MAX);
    let stretches = CATCHING_UP.scan(txn, range, Order::Ascending, CATCH_UPS_MAX + 1)?;
    if stretches.len() > CATCH_UPS_MAX {
        return Err(StoreError::Corrupt {
            table: "room.catching_up".into(),
            reason: format!("room {room} owes a node more than {CATCH_UPS_MAX} stretches"),
        });
    }
    Ok(stretches
        .into_iter()
        .map(|((_, _, next), until)| CatchUp {
            next: Seq(next),
            until: until.map(Seq),
        })
        .collect())
}

/// The nodes owed any of `room`'s history (one scan, usually of nothing: what a
/// publish asks before it fans out).
pub fn nodes_catching_up(
    txn: &dyn ReadTxn,
    room: RoomId,
) -> Result<std::collections::BTreeSet<NodeId>, StoreError> {
    let range = (room.0, [0; 32], 0)..=(room.0, [0xff; 32], u64::MAX);
    let limit = (ROOM_MEMBERS_MAX + 1) * CATCH_UPS_MAX;
    let stretches = CATCHING_UP.scan(txn, range, Order::Ascending, limit)?;
    Ok(stretches
        .into_iter()
        .map(|((_, node, _), _)| NodeId(node))
        .collect())
}

/// Records a stretch `node` is owed.
pub fn put_catch_up(
    txn: &mut dyn WriteTxn,
    room: RoomId,
    node: NodeId,
    stretch: CatchUp,
) -> Result<(), StoreError> {
    let key = (room.0, node.0, stretch.next.0);
    CATCHING_UP.put(txn, &key, &stretch.until.map(|u| u.0))
}

/// Forgets the stretch `node` is owed from `next` (sent, or moved on).
pub fn delete_catch_up(
    txn: &mut dyn WriteTxn,
    room: RoomId,
    node: NodeId,
    next: Seq,
) -> Result<(), StoreError> {
    CATCHING_UP
        .delete(txn, &(room.0, node.0, next.0))
        .map(|_| ())
}

/// How many rooms each user created on this node (rooms are never deleted).
const CREATED: Table<[u8; 32], u64> = Table::new("room.created_by");

/// The most rooms one user may create (each takes its record, chain and keys on
/// its home for good).
pub const ROOMS_CREATED_PER_USER_MAX: u64 = 10_000;

/// How many rooms `user` created on this node.
pub fn created_by(txn: &dyn ReadTxn, user: UserId) -> Result<u64, StoreError> {
    Ok(CREATED.get(txn, &user.0)?.unwrap_or(0))
}

/// Counts one more room created by `user`.
pub fn count_created(txn: &mut dyn WriteTxn, user: UserId) -> Result<(), StoreError> {
    let created = created_by(&*txn, user)?;
    CREATED.put(txn, &user.0, &created.saturating_add(1))
}
/// Only written under the `fanout_to_removed` mutation: the nodes of removed members.
const MUTATION_REMOVED: Table<([u8; 16], [u8; 32]), u8> = Table::new("room.mutation_removed");

/// Whether this node knows any room.
pub fn any(txn: &dyn ReadTxn) -> Result<bool, StoreError> {
    Ok(META.first(txn)?.is_some())
}

/// The room's record on this node, if it knows the room.
pub fn meta(txn: &dyn ReadTxn, room: RoomId) -> Result<Option<RoomMeta>, StoreError> {
    let meta = META.get(txn, &room.0)?;
    // Checked after it is read back: a disk can hand back what was never written.
    if let Some(m) = meta.filter(|m| !m.is_valid()) {
        return Err(StoreError::Corrupt {
            table: "room.meta".into(),
            reason: format!("room {room} holds an impossible record {m:?}"),
        });
    }
    Ok(meta)
}

/// Writes the room's record.
pub fn put_meta(txn: &mut dyn WriteTxn, room: RoomId, meta: &RoomMeta) -> Result<(), StoreError> {
    meta.assert_valid();
    META.put(txn, &room.0, meta)
}

/// The node that sequences `room` ([`RoomMeta::sequencer`]), if this node knows
/// the room.
pub fn sequencer_of(txn: &dyn ReadTxn, room: RoomId) -> Result<Option<NodeId>, StoreError> {
    Ok(meta(txn, room)?.map(|m| m.sequencer()))
}

/// The room's members as this node knows them, in user order.
pub fn members(txn: &dyn ReadTxn, room: RoomId) -> Result<Vec<RoomMember>, StoreError> {
    let members: Vec<RoomMember> = MEMBERS
        .scan(
            txn,
            (room.0, [0; 32])..=(room.0, [0xff; 32]),
            Order::Ascending,
            ROOM_MEMBERS_MAX + 1,
        )?
        .into_iter()
        .map(|(_, m)| m)
        .collect();
    if members.len() > ROOM_MEMBERS_MAX {
        return Err(StoreError::Corrupt {
            table: "room.members".into(),
            reason: format!("room {room} holds more than {ROOM_MEMBERS_MAX} members"),
        });
    }
    Ok(members)
}

/// One member of the room, if they are one.
pub fn member(
    txn: &dyn ReadTxn,
    room: RoomId,
    user: UserId,
) -> Result<Option<RoomMember>, StoreError> {
    let member = MEMBERS.get(txn, &(room.0, user.0))?;
    debug_assert!(
        member.is_none_or(|m| m.user == user),
        "members are keyed by their user"
    );
    Ok(member)
}

/// Adds or replaces a member.
pub fn put_member(
    txn: &mut dyn WriteTxn,
    room: RoomId,
    member: &RoomMember,
) -> Result<(), StoreError> {
    assert!(member.since.0 >= 1, "sequence numbers start at 1");
    MEMBERS.put(txn, &(room.0, member.user.0), member)
}

/// Removes a member; returns whether they were one.
pub fn delete_member(
    txn: &mut dyn WriteTxn,
    room: RoomId,
    user: UserId,
) -> Result<bool, StoreError> {
    MEMBERS.delete(txn, &(room.0, user.0))
}

/// Up to `limit` stored frames of `room` from `from` on, in sequence order.
pub fn frames(
    txn: &dyn ReadTxn,
    room: RoomId,
    from: Seq,
    limit: usize,
) -> Result<Vec<(Seq, Frame)>, StoreError> {
    let frames: Vec<(Seq, Frame)> = FRAMES
        .scan(
            txn,
            (room.0, from.0)..=(room.0, u64::MAX),
            Order::Ascending,
            limit,
        )?
        .into_iter()
        .map(|((_, seq), f)| (Seq(seq), f))
        .collect();
    debug_assert!(frames.iter().all(|(s, f)| *s >= from && f.room == room));
    Ok(frames)
}

/// Up to `limit` stored frames of `room` from `from` on and before `before`,
/// newest first.
pub fn frames_back(
    txn: &dyn ReadTxn,
    room: RoomId,
    from: Seq,
    before: Seq,
    limit: usize,
) -> Result<Vec<(Seq, Frame)>, StoreError> {
    if before <= from {
        return Ok(Vec::new());
    }
    let frames: Vec<(Seq, Frame)> = FRAMES
        .scan(
            txn,
            (room.0, from.0)..(room.0, before.0),
            Order::Descending,
            limit,
        )?
        .into_iter()
        .map(|((_, seq), f)| (Seq(seq), f))
        .collect();
    debug_assert!(frames
        .iter()
        .all(|(s, f)| *s >= from && *s < before && f.room == room));
    Ok(frames)
}

/// Whether a frame is stored at `seq`.
pub fn has_frame(txn: &dyn ReadTxn, room: RoomId, seq: Seq) -> Result<bool, StoreError> {
    Ok(FRAMES.get(txn, &(room.0, seq.0))?.is_some())
}

/// Stores `frame` at `seq`, dropping the oldest kept frame of a room without
/// `persist` (so such a room keeps [`EPHEMERAL_FRAMES_KEPT`]).
pub fn put_frame(
    txn: &mut dyn WriteTxn,
    room: RoomId,
    policy: &Policy,
    seq: Seq,
    frame: &Frame,
) -> Result<(), StoreError> {
    assert_eq!(frame.room, room, "a room stores only its own frames");
    assert!(seq.0 >= 1, "sequence numbers start at 1");
    FRAMES.put(txn, &(room.0, seq.0), frame)?;
    if !policy.persist && seq.0 > EPHEMERAL_FRAMES_KEPT {
        FRAMES.delete(txn, &(room.0, seq.0 - EPHEMERAL_FRAMES_KEPT))?;
    }
    Ok(())
}

/// Where the frame with message id `id` was sequenced, if it was.
pub fn seq_of_id(
    txn: &dyn ReadTxn,
    room: RoomId,
    id: MessageId,
) -> Result<Option<Seq>, StoreError> {
    Ok(IDS.get(txn, &(room.0, id.0))?.map(Seq))
}

/// Records that message id `id` was sequenced at `seq`.
pub fn put_id(
    txn: &mut dyn WriteTxn,
    room: RoomId,
    id: MessageId,
    seq: Seq,
) -> Result<(), StoreError> {
    assert!(seq.0 >= 1, "sequence numbers start at 1");
    IDS.put(txn, &(room.0, id.0), &seq.0)
}

/// What a local user may read of `room`, if they are or were a member.
pub fn visibility(
    txn: &dyn ReadTxn,
    user: UserId,
    room: RoomId,
) -> Result<Option<Visibility>, StoreError> {
    VISIBLE.get(txn, &(user.0, room.0))
}

/// Records what a local user may read of `room`.
pub fn put_visibility(
    txn: &mut dyn WriteTxn,
    user: UserId,
    room: RoomId,
    visibility: &Visibility,
) -> Result<(), StoreError> {
    assert!(
        visibility.until.is_none_or(|u| u >= visibility.from),
        "visibility ends at or after it starts"
    );
    VISIBLE.put(txn, &(user.0, room.0), visibility)
}

/// A room and its sequencer, as listed.
pub type RoomHome = (RoomId, NodeId);

/// One page of the rooms a local user is a member of now, with their
/// sequencers, in room id order after `after`: the rooms, and where the next
/// page starts (`None`: this was the last). A page looks at up to
/// [`ROOMS_PAGE_MAX`] memberships (rooms the user left are skipped), so a page may
/// be short, even empty, and still have a next.
pub fn rooms_page(
    txn: &dyn ReadTxn,
    user: UserId,
    after: Option<RoomId>,
) -> Result<(Vec<RoomHome>, Option<RoomId>), StoreError> {
    use std::ops::Bound::{Excluded, Included};
    let lower = match after {
        Some(room) => Excluded((user.0, room.0)),
        None => Included((user.0, [0; 16])),
    };
    let seen = VISIBLE.scan(
        txn,
        (lower, Included((user.0, [0xff; 16]))),
        Order::Ascending,
        ROOMS_PAGE_MAX,
    )?;
    let next = (seen.len() == ROOMS_PAGE_MAX)
        .then(|| seen.last().map(|((_, room), _)| RoomId(*room)))
        .flatten();
    let mut rooms = Vec::new();
    for ((_, room), vis) in seen {
        if vis.until.is_none() {
            if let Some(node) = sequencer_of(txn, RoomId(room))? {
                rooms.push((RoomId(room), node));
            }
        }
    }
    Ok((rooms, next))
}

/// Every room a local user is a member of now (page after page): for this node's
/// own use (a revocation evicts the user from all of them).
pub fn rooms_of(txn: &dyn ReadTxn, user: UserId) -> Result<Vec<(RoomId, NodeId)>, StoreError> {
    let mut all = Vec::new();
    let mut after = None;
    loop {
        let (rooms, next) = rooms_page(txn, user, after)?;
        all.extend(rooms);
        match next {
            Some(next) => after = Some(next),
            None => return Ok(all),
        }
    }
}

/// The creator's signed creation of `room` (the first link of its chain), if this
/// node holds it.
pub fn creation(txn: &dyn ReadTxn, room: RoomId) -> Result<Option<SignedLink>, StoreError> {
    CHAIN.get(txn, &(room.0, 0))
}

/// The length of `room`'s chain on this node and the hash of its last link
/// (`(0, GENESIS)` if it holds none).
pub fn chain_head(txn: &dyn ReadTxn, room: RoomId) -> Result<(u64, ChainHash), StoreError> {
    let last = CHAIN.scan(txn, (room.0, 0)..=(room.0, u64::MAX), Order::Descending, 1)?;
    Ok(match last.first() {
        Some(((_, index), link)) => (index + 1, link.hash()),
        None => (0, ChainHash::GENESIS),
    })
}

/// Up to `limit` links of `room`'s chain from index `from` on.
pub fn links(
    txn: &dyn ReadTxn,
    room: RoomId,
    from: u64,
    limit: usize,
) -> Result<Vec<SignedLink>, StoreError> {
    let links: Vec<(u64, SignedLink)> = CHAIN
        .scan(
            txn,
            (room.0, from)..=(room.0, u64::MAX),
            Order::Ascending,
            limit,
        )?
        .into_iter()
        .map(|((_, i), l)| (i, l))
        .collect();
    // Links are stored without gaps, so the page is contiguous from `from`.
    debug_assert!(links.iter().zip(from..).all(|((i, _), j)| *i == j));
    Ok(links.into_iter().map(|(_, l)| l).collect())
}

/// Appends `link` at `index`, which must be the chain's length (links are only
/// ever appended, each naming the hash of the one before).
pub fn put_link(
    txn: &mut dyn WriteTxn,
    room: RoomId,
    index: u64,
    link: &SignedLink,
) -> Result<(), StoreError> {
    debug_assert_eq!(link.link.room, room, "a room stores only its own links");
    debug_assert_eq!(
        chain_head(&*txn, room)?,
        (index, link.link.prev),
        "links are appended in order"
    );
    CHAIN.put(txn, &(room.0, index), link)
}

/// Records that `user` was evicted from `room` by the chain link at `index`.
pub fn put_evicted(
    txn: &mut dyn WriteTxn,
    room: RoomId,
    user: UserId,
    index: u64,
) -> Result<(), StoreError> {
    EVICTED.put(txn, &(room.0, user.0), &index)
}

/// Whether `user` was ever evicted from `room` (revoked while a member).
pub fn was_evicted(txn: &dyn ReadTxn, room: RoomId, user: UserId) -> Result<bool, StoreError> {
    Ok(EVICTED.get(txn, &(room.0, user.0))?.is_some())
}

/// Records that `epoch` of `room` began at `start`.
pub fn put_epoch_start(
    txn: &mut dyn WriteTxn,
    room: RoomId,
    start: Seq,
    epoch: Epoch,
) -> Result<(), StoreError> {
    EPOCH_STARTS.put(txn, &(room.0, start.0), &epoch.0)
}

/// The epoch of `room` in force at `seq`, if this node knows where it began.
pub fn epoch_at(txn: &dyn ReadTxn, room: RoomId, seq: Seq) -> Result<Option<Epoch>, StoreError> {
    let last = EPOCH_STARTS.scan(txn, (room.0, 0)..=(room.0, seq.0), Order::Descending, 1)?;
    Ok(last.first().map(|(_, epoch)| Epoch(*epoch)))
}

/// Records that `user` was removed from `room` when its next frame was `until`.
pub fn put_former(
    txn: &mut dyn WriteTxn,
    room: RoomId,
    user: UserId,
    until: Seq,
) -> Result<(), StoreError> {
    FORMER.put(txn, &(room.0, user.0), &until.0)
}

/// Whether `user` was a member of `room` whose removal came after `seq`.
pub fn was_member_at(
    txn: &dyn ReadTxn,
    room: RoomId,
    user: UserId,
    seq: Seq,
) -> Result<bool, StoreError> {
    Ok(FORMER
        .get(txn, &(room.0, user.0))?
        .is_some_and(|until| seq.0 < until))
}

/// Only under the `fanout_to_removed` mutation: records a removed member's node.
pub fn mutation_add_removed(
    txn: &mut dyn WriteTxn,
    room: RoomId,
    node: NodeId,
) -> Result<(), StoreError> {
    MUTATION_REMOVED.put(txn, &(room.0, node.0), &1)
}

/// Only under the `fanout_to_removed` mutation: the removed members' nodes.
pub fn mutation_removed(txn: &dyn ReadTxn, room: RoomId) -> Result<Vec<NodeId>, StoreError> {
    Ok(MUTATION_REMOVED
        .scan(
            txn,
            (room.0, [0; 32])..=(room.0, [0xff; 32]),
            Order::Ascending,
            ROOM_MEMBERS_MAX,
        )?
        .into_iter()
        .map(|((_, node), _)| NodeId(node))
        .collect())
}

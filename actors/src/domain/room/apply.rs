//! Apply: a decided [`Event`] written to the room's state on its sequencer, and the
//! fan-out it owes member nodes queued in their outboxes, in the same transaction.
//!
//! [`apply`] only writes what the event says, deterministically; [`fan_out`] is the
//! sequencer's duty to the other nodes. Keeping them apart is the seam replication
//! needs: every replica applies, the leader fans out.

use std::collections::BTreeSet;

use conclave_storage::{StoreError, WriteTxn};

use super::{Event, RoomMsg, Update};
use crate::actor::Time;
use crate::crypto::SealedKey;
use crate::domain::chain::SignedLink;
use crate::domain::state::{keys, rooms, rooms::Visibility};
use crate::domain::{enqueue, room_of, Deliverable, Denial, RoomMember};
use crate::ids::{NodeId, RoomId, Seq, UserId};
use crate::mutation::{self, Mutation};

/// Writes `event` to `room`'s state on its sequencer `me`.
pub(super) fn apply(
    txn: &mut dyn WriteTxn,
    room: RoomId,
    me: NodeId,
    event: &Event,
) -> Result<(), StoreError> {
    match event {
        Event::Created {
            meta,
            owner,
            key,
            link,
        } => {
            append(txn, room, link)?;
            rooms::count_created(txn, owner.user)?;
            apply_joined(txn, room, me, meta, owner, key)
        }
        Event::Invited {
            meta,
            member,
            key,
            link,
        } => {
            append(txn, room, link)?;
            apply_joined(txn, room, me, meta, member, key)
        }
        Event::Removed {
            meta,
            removed,
            bundle,
            link,
        } => {
            append(txn, room, link)?;
            apply_removed(txn, room, me, meta, removed, bundle)
        }
        Event::Evicted {
            meta,
            removed,
            link,
        } => {
            append(txn, room, link)?;
            apply_removed(txn, room, me, meta, removed, &[])
        }
        Event::Rekeyed { meta, bundle, link } => {
            append(txn, room, link)?;
            rooms::put_meta(txn, room, meta)?;
            for (member, key) in bundle {
                keys::put(txn, room, meta.epoch, *member, key)?;
            }
            Ok(())
        }
        Event::Published {
            meta, seq, frame, ..
        } => {
            rooms::put_frame(txn, room, &meta.policy, *seq, frame)?;
            rooms::put_id(txn, room, frame.id, *seq)?;
            if mutation::active(Mutation::VolatileSequence) {
                // Mutation: the next sequence number is not persisted with the frame.
                return Ok(());
            }
            rooms::put_meta(txn, room, meta)
        }
    }
}

/// A member joined (the creator at creation, or an invitee) with the current
/// epoch's key; a member of this node may read from their `since` on.
fn apply_joined(
    txn: &mut dyn WriteTxn,
    room: RoomId,
    me: NodeId,
    meta: &rooms::RoomMeta,
    member: &RoomMember,
    key: &SealedKey,
) -> Result<(), StoreError> {
    rooms::put_meta(txn, room, meta)?;
    rooms::put_member(txn, room, member)?;
    keys::put(txn, room, meta.epoch, member.user, key)?;
    if member.home != me {
        return Ok(());
    }
    let visible = Visibility {
        from: member.since,
        until: None,
    };
    rooms::put_visibility(txn, member.user, room, &visible)
}

/// Appends `link` to the room's chain (decide checked that it follows the head).
fn append(txn: &mut dyn WriteTxn, room: RoomId, link: &SignedLink) -> Result<(), StoreError> {
    let (len, _) = rooms::chain_head(&*txn, room)?;
    rooms::put_link(txn, room, len, link)
}

fn apply_removed(
    txn: &mut dyn WriteTxn,
    room: RoomId,
    me: NodeId,
    meta: &rooms::RoomMeta,
    removed: &RoomMember,
    bundle: &[(UserId, SealedKey)],
) -> Result<(), StoreError> {
    let was_member = rooms::delete_member(txn, room, removed.user)?;
    assert!(
        was_member,
        "decide checked that the removed user is a member"
    );
    rooms::put_meta(txn, room, meta)?;
    for (member, key) in bundle {
        keys::put(txn, room, meta.epoch, *member, key)?;
    }
    if mutation::active(Mutation::FanoutToRemoved) && removed.home != me {
        rooms::mutation_add_removed(txn, room, removed.home)?;
    }
    if removed.home != me {
        return Ok(());
    }
    let visible = Visibility {
        from: removed.since,
        until: Some(meta.next_seq),
    };
    rooms::put_visibility(txn, removed.user, room, &visible)
}

/// The nodes hosting at least one of `members`, but for the `holders` of the
/// room's sequencer state (its home; with replication, its shard's replicas),
/// which learn of changes by applying them.
pub(super) fn member_nodes(members: &[RoomMember], holders: &BTreeSet<NodeId>) -> BTreeSet<NodeId> {
    members
        .iter()
        .map(|m| m.home)
        .filter(|n| !holders.contains(n))
        .collect()
}

/// Where a room's fan-out goes and how it is queued.
#[derive(Clone, Copy)]
pub(super) struct Fanout<'a> {
    /// The nodes holding the room's sequencer state (its home; with rooms on
    /// shard groups, its shard's replicas), which learn of changes by applying
    /// them.
    pub holders: &'a BTreeSet<NodeId>,
    /// Whether the change is already decided elsewhere (applied from a shard's
    /// log): it cannot be refused for a full outbox, so its fan-out takes no
    /// room's share and may use the outbox's reserve (see
    /// [`crate::domain::enqueue_decided`]).
    pub decided: bool,
}

impl<'a> Fanout<'a> {
    /// A room's home deciding alone.
    pub fn home(holders: &'a BTreeSet<NodeId>) -> Self {
        Fanout {
            holders,
            decided: false,
        }
    }
}

fn send(
    txn: &mut dyn WriteTxn,
    out: Fanout<'_>,
    room: RoomId,
    node: NodeId,
    update: Update,
) -> Result<(), Denial> {
    let to = room_of(node, room);
    let msg = Deliverable::Room(RoomMsg::Update(update));
    if out.decided {
        crate::domain::enqueue_decided(txn, to, msg)
    } else {
        enqueue(txn, to, msg)
    }
}

/// Queues, after `apply`, what member nodes other than the `holders` (see
/// [`member_nodes`]) must learn of `event`; returns the nodes whose outboxes now
/// hold something.
pub(super) fn fan_out(
    txn: &mut dyn WriteTxn,
    room: RoomId,
    out: Fanout<'_>,
    (now, page): (Time, usize),
    event: &Event,
) -> Result<BTreeSet<NodeId>, Denial> {
    match event {
        // The creator is the only member, on this node.
        Event::Created { .. } => Ok(BTreeSet::new()),
        Event::Invited {
            meta, member, key, ..
        } => {
            let new = (member, key);
            fan_out_invited(txn, room, out, (now, page), meta, new)
        }
        Event::Removed {
            meta,
            removed,
            bundle,
            ..
        } => {
            end_owed(txn, room, removed.home, meta.next_seq)?;
            fan_out_epoch(txn, room, out, meta, Some(removed), bundle)
        }
        Event::Rekeyed { meta, bundle, .. } => fan_out_epoch(txn, room, out, meta, None, bundle),
        Event::Evicted { meta, removed, .. } => {
            end_owed(txn, room, removed.home, meta.next_seq)?;
            let nodes = snapshot(txn, room, out, meta, Some(removed.home))?;
            for &node in &nodes {
                chain_to(txn, out, room, node, None)?;
            }
            Ok(nodes)
        }
        Event::Published {
            seq,
            frame,
            committed,
            ..
        } => {
            let mut nodes = member_nodes(&rooms::members(&*txn, room)?, out.holders);
            // A node catching up on the history gets this frame in its turn.
            if !mutation::active(Mutation::LiveBeforeCaughtUp) {
                let catching_up = rooms::nodes_catching_up(&*txn, room)?;
                nodes.retain(|node| !catching_up.contains(node));
            }
            if mutation::active(Mutation::FanoutToRemoved) {
                // Mutation: frames still go to the nodes of removed members.
                nodes.extend(rooms::mutation_removed(&*txn, room)?);
            }
            for &node in &nodes {
                let update = Update::Frame {
                    seq: *seq,
                    frame: frame.clone(),
                    committed: *committed,
                };
                send(txn, out, room, node, update)?;
            }
            Ok(nodes)
        }
    }
}

/// An invitation: the snapshot to every member node, the new link (the whole
/// chain to a node new to the room), then the new member's key and (to a node new
/// to the room) the history they may read.
fn fan_out_invited(
    txn: &mut dyn WriteTxn,
    room: RoomId,
    out: Fanout<'_>,
    at: (Time, usize),
    meta: &rooms::RoomMeta,
    (member, key): (&RoomMember, &SealedKey),
) -> Result<BTreeSet<NodeId>, Denial> {
    let nodes = snapshot(txn, room, out, meta, None)?;
    let members = rooms::members(&*txn, room)?;
    let new_node = !out.holders.contains(&member.home)
        && !members
            .iter()
            .any(|m| m.user != member.user && m.home == member.home);
    for &node in &nodes {
        let from = (new_node && node == member.home).then_some(0);
        chain_to(txn, out, room, node, from)?;
    }
    if out.holders.contains(&member.home) {
        return Ok(nodes);
    }
    debug_assert!(
        nodes.contains(&member.home),
        "the new member's node gets the snapshot"
    );
    let keys = vec![(member.user, key.clone())];
    send(
        txn,
        out,
        room,
        member.home,
        Update::Keys {
            epoch: meta.epoch,
            keys,
        },
    )?;
    if new_node && meta.policy.persist {
        let from = kept_from(meta, member.since);
        owe_history(txn, out, room, member.home, from, at)?;
    } else if new_node {
        send_kept(
            txn,
            out,
            room,
            member.home,
            kept_from(meta, member.since),
            at.0,
        )?;
    }
    Ok(nodes)
}

/// A new epoch (a removal, or a rekey): the snapshot to every member node and to
/// the removed member's (so it stops serving the room to them), the new link, then
/// to each remaining member node the new epoch's keys of its own users only.
fn fan_out_epoch(
    txn: &mut dyn WriteTxn,
    room: RoomId,
    out: Fanout<'_>,
    meta: &rooms::RoomMeta,
    removed: Option<&RoomMember>,
    bundle: &[(UserId, SealedKey)],
) -> Result<BTreeSet<NodeId>, Denial> {
    let nodes = snapshot(txn, room, out, meta, removed.map(|r| r.home))?;
    for &node in &nodes {
        chain_to(txn, out, room, node, None)?;
    }
    let members = rooms::members(&*txn, room)?;
    debug_assert!(members
        .iter()
        .all(|m| Some(m.user) != removed.map(|r| r.user)));
    for node in member_nodes(&members, out.holders) {
        let keys: Vec<_> = bundle
            .iter()
            .filter(|(u, _)| {
                // Mutation: every node gets the whole bundle.
                mutation::active(Mutation::BundleUnsplit)
                    || members.iter().any(|m| m.user == *u && m.home == node)
            })
            .cloned()
            .collect();
        send(
            txn,
            out,
            room,
            node,
            Update::Keys {
                epoch: meta.epoch,
                keys,
            },
        )?;
    }
    Ok(nodes)
}

/// Sends `node` the room's chain from index `from` on, in pages; `None` sends the
/// last link only (what a node that holds the rest lacks after a change).
fn chain_to(
    txn: &mut dyn WriteTxn,
    out: Fanout<'_>,
    room: RoomId,
    node: NodeId,
    from: Option<u64>,
) -> Result<(), Denial> {
    let (len, _) = rooms::chain_head(&*txn, room)?;
    debug_assert!(len >= 1, "a changed room has a chain");
    let mut next = from.unwrap_or(len.saturating_sub(1));
    while next < len {
        let links = rooms::links(&*txn, room, next, super::CHAIN_PAGE_LINKS)?;
        let count = links.len() as u64;
        if count == 0 {
            break;
        }
        send(txn, out, room, node, Update::Chain { from: next, links })?;
        next += count;
    }
    Ok(())
}

/// Sends the room's new membership snapshot to every member node (and `also`),
/// first, so a member node knows the room before its keys and frames arrive (one
/// outbox per node keeps them in order).
fn snapshot(
    txn: &mut dyn WriteTxn,
    room: RoomId,
    out: Fanout<'_>,
    meta: &rooms::RoomMeta,
    also: Option<NodeId>,
) -> Result<BTreeSet<NodeId>, Denial> {
    let members = rooms::members(&*txn, room)?;
    let create: Box<SignedLink> = rooms::creation(&*txn, room)?
        .map(Box::new)
        .ok_or_else(|| Denial::not_found(format!("the creation of room {room}")))?;
    let mut nodes = member_nodes(&members, out.holders);
    nodes.extend(also.filter(|n| !out.holders.contains(n)));
    for &node in &nodes {
        let update = Update::Members {
            meta: *meta,
            members: members.clone(),
            create: create.clone(),
        };
        send(txn, out, room, node, update)?;
        // A node still owed history is told again where it goes on: a request
        // for it that was lost (the node came back with an empty store) or
        // refused is made again, and one made already finds its page sent and
        // is ignored.
        if let Some(owed) = rooms::catch_ups(&*txn, room, node)?.first() {
            send(txn, out, room, node, Update::More { next: owed.next })?;
        }
    }
    Ok(nodes)
}

/// Owes new member node `node` the history from `from` on: its first page at
/// once, or, if the node is still owed history of earlier memberships (it asks
/// for that already), after it.
fn owe_history(
    txn: &mut dyn WriteTxn,
    out: Fanout<'_>,
    room: RoomId,
    node: NodeId,
    from: Seq,
    (now, page): (Time, usize),
) -> Result<(), Denial> {
    let owed = rooms::catch_ups(&*txn, room, node)?;
    debug_assert!(
        owed.iter().all(|s| s.until.is_some()),
        "a node new to the room has no member whose history runs on"
    );
    if owed.len() >= rooms::CATCH_UPS_MAX {
        return Err(Denial::Limit {
            what: format!(
                "node {node} is still owed {} stretches of room {room}'s history",
                rooms::CATCH_UPS_MAX
            ),
        });
    }
    // What it is owed already it gets once.
    let next = owed.iter().filter_map(|s| s.until).fold(from, Seq::max);
    let stretch = rooms::CatchUp { next, until: None };
    if owed.is_empty() {
        send_page(txn, out, room, node, stretch, (now, page))
    } else {
        Ok(rooms::put_catch_up(txn, room, node, stretch)?)
    }
}

/// An ephemeral room keeps its last [`rooms::EPHEMERAL_FRAMES_KEPT`] frames only,
/// so a new member node is sent at once what it may read of them (the newest
/// that fit [`rooms::EPHEMERAL_HISTORY_BYTES_MAX`]) and is live from here: were it
/// sent pages as it asked, the room could drop frames it was still owed.
fn send_kept(
    txn: &mut dyn WriteTxn,
    out: Fanout<'_>,
    room: RoomId,
    node: NodeId,
    from: Seq,
    now: Time,
) -> Result<(), Denial> {
    // Read newest first, a few at a time, so that memory stays within the bound.
    const READ_FRAMES: usize = 16;
    let (mut newest, mut bytes, mut before) = (Vec::new(), 0usize, Seq(u64::MAX));
    'read: loop {
        let read = rooms::frames_back(&*txn, room, from, before, READ_FRAMES)?;
        let Some(&(oldest, _)) = read.last() else {
            break;
        };
        for (seq, frame) in read {
            bytes = bytes.saturating_add(frame.ciphertext.len());
            if bytes > rooms::EPHEMERAL_HISTORY_BYTES_MAX {
                break 'read;
            }
            newest.push((seq, frame));
        }
        before = oldest;
    }
    for (seq, frame) in newest.into_iter().rev() {
        let update = Update::Frame {
            seq,
            frame,
            committed: now,
        };
        send(txn, out, room, node, update)?;
    }
    Ok(())
}

/// The last member of `node` left the room before `until`: the history it is
/// still owed ends there (nothing after a removal reaches the removed).
fn end_owed(txn: &mut dyn WriteTxn, room: RoomId, node: NodeId, until: Seq) -> Result<(), Denial> {
    let hosts_members = rooms::members(&*txn, room)?.iter().any(|m| m.home == node);
    if hosts_members || mutation::active(Mutation::HistoryPastRemoval) {
        return Ok(());
    }
    for stretch in rooms::catch_ups(&*txn, room, node)? {
        if stretch.until.is_some() {
            continue;
        }
        rooms::delete_catch_up(txn, room, node, stretch.next)?;
        if stretch.next < until {
            let ended = rooms::CatchUp {
                until: Some(until),
                ..stretch
            };
            rooms::put_catch_up(txn, room, node, ended)?;
        }
    }
    Ok(())
}

/// Sends `node` the next page of a stretch of history it is owed: at most `page`
/// frames ([`rooms::BACKFILL_PAGE_FRAMES`] by default), ending at the frame that
/// passes [`rooms::BACKFILL_PAGE_BYTES`] or at the stretch's end. While it is owed
/// more, the node is asked to ask for the next page ([`Update::More`]) and gets no
/// live frame, so its frames arrive in order; once it is owed nothing, it is live.
pub(super) fn send_page(
    txn: &mut dyn WriteTxn,
    out: Fanout<'_>,
    room: RoomId,
    node: NodeId,
    stretch: rooms::CatchUp,
    (now, page): (Time, usize),
) -> Result<(), Denial> {
    rooms::delete_catch_up(txn, room, node, stretch.next)?;
    let frames_max = page.clamp(1, rooms::BACKFILL_PAGE_FRAMES);
    let end = stretch.until.unwrap_or(Seq(u64::MAX));
    let frames = rooms::frames(&*txn, room, stretch.next, frames_max)?;
    // Fewer than asked for: the room holds no more.
    let mut ended = frames.len() < frames_max;
    let (mut next, mut bytes) = (stretch.next, 0usize);
    for (seq, frame) in frames {
        if seq >= end || bytes >= rooms::BACKFILL_PAGE_BYTES {
            ended = seq >= end;
            break;
        }
        bytes = bytes.saturating_add(frame.ciphertext.len());
        next = Seq(seq.0.saturating_add(1));
        let update = Update::Frame {
            seq,
            frame,
            committed: now,
        };
        send(txn, out, room, node, update)?;
    }
    let following = if ended || next >= end {
        rooms::catch_ups(&*txn, room, node)?.first().copied()
    } else {
        let rest = rooms::CatchUp { next, ..stretch };
        rooms::put_catch_up(txn, room, node, rest)?;
        Some(rest)
    };
    if let Some(owed) = following {
        send(txn, out, room, node, Update::More { next: owed.next })?;
    }
    Ok(())
}

/// The first sequence number still kept from `since` on.
fn kept_from(meta: &rooms::RoomMeta, since: Seq) -> Seq {
    if meta.policy.persist {
        since
    } else {
        Seq(since
            .0
            .max(meta.next_seq.0.saturating_sub(rooms::EPHEMERAL_FRAMES_KEPT)))
    }
}

#[cfg(test)]
mod tests {
    use conclave_storage::{MemStore, Store};

    use super::*;
    use crate::crypto::{Frame, SignatureBytes};
    use crate::domain::{Policy, Routed};
    use crate::ids::{Epoch, MessageId};

    const NEW: NodeId = NodeId([3; 32]);
    const ROOM: RoomId = RoomId([7; 16]);
    const PAGE: usize = rooms::BACKFILL_PAGE_FRAMES;

    /// A frame of `ROOM` at `seq` (as stored; nobody checks it here).
    fn test_frame(seq: u64) -> Frame {
        Frame {
            room: ROOM,
            epoch: Epoch(1),
            sender: UserId([5; 32]),
            id: MessageId(u128::from(seq)),
            nonce: [0; 12],
            ciphertext: vec![1],
            signature: SignatureBytes([0; 64]),
        }
    }

    /// The home's store holding `count` frames of `bytes` bytes each (as stored;
    /// nobody checks them here).
    fn home_with(count: u64, bytes: usize) -> MemStore {
        let store = MemStore::new();
        let mut txn = store.write().expect("write");
        let policy = Policy {
            persist: true,
            ..Policy::default()
        };
        for seq in 1..=count {
            let frame = Frame {
                ciphertext: vec![1; bytes],
                ..test_frame(seq)
            };
            rooms::put_frame(&mut *txn, ROOM, &policy, Seq(seq), &frame).expect("frame");
        }
        txn.commit().expect("commit");
        store
    }

    /// Takes and acknowledges what the home queued for `NEW`: the frames'
    /// sequence numbers, and where the history goes on if it does.
    fn take(store: &MemStore) -> (Vec<u64>, Option<Seq>) {
        let mut txn = store.write().expect("write");
        let queued = crate::outbox::unacked(&*txn, NEW, usize::MAX).expect("read");
        let (mut seqs, mut more) = (Vec::new(), None);
        for (_, bytes) in &queued {
            let routed: Routed =
                crate::wire::decode_bounded(bytes, crate::wire::ENVELOPE_BYTES_MAX)
                    .expect("decode");
            match routed.msg {
                Deliverable::Room(RoomMsg::Update(Update::Frame { seq, .. })) => seqs.push(seq.0),
                Deliverable::Room(RoomMsg::Update(Update::More { next })) => more = Some(next),
                Deliverable::Room(RoomMsg::Update(Update::Members { .. })) => {}
                _ => panic!("only history and snapshots are queued here"),
            }
        }
        if let Some((last, _)) = queued.last() {
            crate::outbox::ack(&mut *txn, NEW, *last).expect("ack");
        }
        txn.commit().expect("commit");
        (seqs, more)
    }

    /// Owes `NEW` the whole history, then answers its requests for more as the
    /// node would make them; returns the pages it was sent.
    fn pull(store: &MemStore) -> Vec<Vec<u64>> {
        let at = (Time::default(), PAGE);
        let mut txn = store.write().expect("write");
        owe_history(
            &mut *txn,
            Fanout::home(&BTreeSet::new()),
            ROOM,
            NEW,
            Seq(1),
            at,
        )
        .expect("owed");
        txn.commit().expect("commit");
        let mut pages = Vec::new();
        loop {
            let (seqs, more) = take(store);
            pages.push(seqs);
            let Some(next) = more else { break };
            let mut txn = store.write().expect("write");
            let owed = rooms::catch_ups(&*txn, ROOM, NEW).expect("owed");
            assert_eq!(owed.first().map(|s| s.next), Some(next));
            send_page(
                &mut *txn,
                Fanout::home(&BTreeSet::new()),
                ROOM,
                NEW,
                owed[0],
                at,
            )
            .expect("page");
            txn.commit().expect("commit");
        }
        let txn = store.read().expect("read");
        assert!(rooms::catch_ups(&*txn, ROOM, NEW).expect("owed").is_empty());
        pages
    }

    /// Longer than two shares of an outbox, and than a whole invitation could
    /// carry before (16,384 frames, refused `limit` past it).
    #[test]
    fn a_history_longer_than_an_outbox_share_is_sent_a_page_at_a_time_as_asked() {
        let history = 2 * crate::outbox::OUTBOX_TAG_DEPTH_MAX + 100;
        let pages = pull(&home_with(history, 1));
        assert!(pages.iter().all(|p| p.len() <= PAGE));
        let sent: Vec<u64> = pages.concat();
        assert_eq!(sent, (1..=history).collect::<Vec<_>>());
    }

    /// A node that lost its request for more (its store was wiped) is told again
    /// where its history goes on with the room's next snapshot, and the request
    /// it made already, if it comes after all, is ignored.
    #[test]
    fn a_snapshot_tells_a_node_still_owed_history_where_it_goes_on() {
        use rand_chacha::ChaCha20Rng;
        use rand_core::SeedableRng;

        use crate::domain::{client, RoomRole};
        use crate::identity::Identity;

        const HOME: NodeId = NodeId([1; 32]);
        let mut rng = ChaCha20Rng::seed_from_u64(8);
        let owner = Identity::generate(&mut rng);
        let (room, _, op) =
            client::create_room(&mut rng, &owner, HOME, Policy::default()).expect("create");
        let store = MemStore::new();
        let mut txn = store.write().expect("write");
        let link = op.link().expect("a creation carries its link");
        rooms::put_link(&mut *txn, room, 0, link).expect("link");
        let policy = Policy::default();
        let member = |user: UserId, home| RoomMember {
            user,
            exchange: [0; 32],
            binding: SignatureBytes([0; 64]),
            home,
            role: RoomRole::Member,
            since: Seq(1),
        };
        rooms::put_member(&mut *txn, room, &member(owner.user_id(), HOME)).expect("owner");
        rooms::put_member(&mut *txn, room, &member(UserId([9; 32]), NEW)).expect("member");
        let frame = |seq: u64| Frame {
            room,
            epoch: Epoch(1),
            sender: owner.user_id(),
            id: MessageId(u128::from(seq)),
            nonce: [0; 12],
            ciphertext: vec![1],
            signature: SignatureBytes([0; 64]),
        };
        for seq in 1..=2 * PAGE as u64 {
            rooms::put_frame(&mut *txn, room, &policy, Seq(seq), &frame(seq)).expect("frame");
        }
        owe_history(
            &mut *txn,
            Fanout::home(&BTreeSet::new()),
            room,
            NEW,
            Seq(1),
            (Time::default(), PAGE),
        )
        .expect("owed");
        txn.commit().expect("commit");
        let next = Seq(PAGE as u64 + 1);
        let (_, more) = take(&store);
        assert_eq!(more, Some(next), "the first page says where it goes on");
        // That request is lost; a later snapshot says it again.
        let meta = rooms::RoomMeta {
            home: HOME,
            policy,
            epoch: Epoch(1),
            epoch_start: Seq(1),
            next_seq: Seq(2 * PAGE as u64 + 1),
            owner: owner.user_id(),
            members_version: 3,
            rekey_due: false,
        };
        let mut txn = store.write().expect("write");
        let holders = BTreeSet::from([HOME]);
        snapshot(&mut *txn, room, Fanout::home(&holders), &meta, None).expect("snapshot");
        txn.commit().expect("commit");
        assert_eq!(take(&store), (Vec::new(), Some(next)));
    }

    /// An ephemeral room's history (its last 256 frames) is sent at once, newest
    /// first within its byte bound, and the node owes nothing: it is live.
    #[test]
    fn an_ephemeral_rooms_kept_frames_are_sent_at_once_the_newest_that_fit() {
        let ephemeral = Policy {
            persist: false,
            ..Policy::default()
        };
        for (count, bytes) in [(300u64, 1usize), (60, 400 * 1024)] {
            let store = MemStore::new();
            let mut txn = store.write().expect("write");
            for seq in 1..=count {
                let frame = Frame {
                    ciphertext: vec![1; bytes],
                    ..test_frame(seq)
                };
                rooms::put_frame(&mut *txn, ROOM, &ephemeral, Seq(seq), &frame).expect("frame");
            }
            send_kept(
                &mut *txn,
                Fanout::home(&BTreeSet::new()),
                ROOM,
                NEW,
                Seq(1),
                Time::default(),
            )
            .expect("sent");
            txn.commit().expect("commit");
            let fit = (rooms::EPHEMERAL_HISTORY_BYTES_MAX / bytes) as u64;
            let kept = count.min(rooms::EPHEMERAL_FRAMES_KEPT).min(fit);
            assert_eq!(take(&store), ((count - kept + 1..=count).collect(), None));
            let txn = store.read().expect("read");
            assert!(rooms::catch_ups(&*txn, ROOM, NEW).expect("owed").is_empty());
        }
    }

    /// A page ends at the frame that passes its byte bound.
    #[test]
    fn a_page_of_large_frames_ends_past_its_byte_bound() {
        // As large as a frame that fits an envelope gets, about.
        let bytes = 400 * 1024;
        let per_page = rooms::BACKFILL_PAGE_BYTES.div_ceil(bytes);
        let pages = pull(&home_with(30, bytes));
        let sizes: Vec<usize> = pages.iter().map(Vec::len).collect();
        assert_eq!(sizes, [per_page, per_page, 30 - 2 * per_page]);
    }
}

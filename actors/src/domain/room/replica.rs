//! A member node's copy of a room: the [`Update`]s its sequencer sends (membership
//! snapshots, sealed keys for this node's users, committed frames) checked and
//! applied. Nothing from another node is believed unchecked: the sender must be the
//! room's proven home, every frame verifies again, every key must verify for the
//! X25519 key this node's own registry holds for its recipient.

use std::collections::BTreeSet;

use conclave_storage::{StoreError, WriteTxn};
use x25519_dalek::PublicKey;

use super::Update;
use crate::actor::Time;
use crate::crypto::{verify_frame, verify_sealed_key, Frame, SealedKey};
use crate::domain::chain::{ChainState, Change, SignedLink};
use crate::domain::state::rooms::{RoomMeta, Visibility};
use crate::domain::state::{keys, registry, rooms};
use crate::domain::{enqueue, room_of, Deliverable, Denial, RoomMember, ROOM_MEMBERS_MAX};
use crate::identity::check_binding;
use crate::ids::{Epoch, NodeId, RoomId, Seq, UserId};
use crate::mutation::{self, Mutation};

/// Why a member node refused an update. Counted by [`UpdateError::reason`] in
/// `conclave_updates_rejected_total`.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    /// The update came from this node itself (a room never updates its own copy).
    #[error("an update from this node itself")]
    FromSelf,
    /// The sender is not the room's home.
    #[error("the sender {from} is not the room's home {home}")]
    NotFromHome {
        /// Who sent it.
        from: NodeId,
        /// The room's home as this node knows it.
        home: NodeId,
    },
    /// The first snapshot of a room does not carry the creator's signed creation
    /// naming the sender as the home.
    #[error("the sender did not prove it is the room's home")]
    UnprovenHome,
    /// A frame or keys for a room this node has no snapshot of yet.
    #[error("a frame or keys for an unknown room")]
    UnknownRoom,
    /// The update breaks the protocol's shape.
    #[error("malformed update: {0}")]
    Malformed(&'static str),
    /// A frame naming another room.
    #[error("a frame of another room")]
    WrongRoom,
    /// A frame of another epoch than the one in force at its sequence number (the
    /// room's current one, for a live frame).
    #[error("a frame of epoch {got} where the room was at epoch {current}", got = .got.0, current = .current.0)]
    StaleEpoch {
        /// The room's epoch at the frame's sequence number.
        current: Epoch,
        /// The frame's.
        got: Epoch,
    },
    /// A frame whose sender is not a member.
    #[error("a frame from a non-member")]
    NotAMember,
    /// A frame whose signature does not verify.
    #[error("a frame with a bad signature")]
    BadSignature,
    /// The store failed: the update is offered again later.
    #[error(transparent)]
    Storage(#[from] StoreError),
    /// The store reaches into its reserve: the frame is offered again later.
    #[error("the store is full")]
    StoreFull,
    /// The request for the history's next page could not be queued for the home
    /// (offered again later when the outbox is full or the store failed).
    #[error("the request for more history was not queued: {0}")]
    Unqueued(Denial),
}

impl UpdateError {
    /// The reason as a metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            UpdateError::FromSelf => "from_self",
            UpdateError::NotFromHome { .. } => "not_from_home",
            UpdateError::UnprovenHome => "unproven_home",
            UpdateError::UnknownRoom => "unknown_room",
            UpdateError::Malformed(_) => "malformed",
            UpdateError::WrongRoom => "wrong_room",
            UpdateError::StaleEpoch { .. } => "stale_epoch",
            UpdateError::NotAMember => "not_a_member",
            UpdateError::BadSignature => "bad_signature",
            UpdateError::Storage(_) => "storage",
            UpdateError::StoreFull => "store_full",
            UpdateError::Unqueued(denial) => denial.reason(),
        }
    }
}

/// Where an update is applied: the room, this node, the sender, the time.
pub(super) struct Copy {
    pub room: RoomId,
    pub me: NodeId,
    pub from: NodeId,
    pub now: Time,
}

/// Checks and applies `update` to this node's copy of the room.
pub(super) fn apply(txn: &mut dyn WriteTxn, at: &Copy, update: Update) -> Result<(), UpdateError> {
    if at.from == at.me {
        return Err(UpdateError::FromSelf);
    }
    let known = rooms::meta(&*txn, at.room)?;
    if let Some(k) = known.filter(|k| k.sequencer() != at.from) {
        return Err(UpdateError::NotFromHome {
            from: at.from,
            home: k.sequencer(),
        });
    }
    match update {
        Update::Members {
            meta,
            members,
            create,
        } => snapshot(txn, at, known, meta, &members, &create),
        Update::Keys { epoch, keys } => {
            let known = known.ok_or(UpdateError::UnknownRoom)?;
            store_keys(txn, at.room, &known, epoch, &keys)
        }
        Update::Frame {
            seq,
            frame,
            committed,
        } => {
            let known = known.ok_or(UpdateError::UnknownRoom)?;
            store_frame(txn, at, known, seq, &frame, committed)
        }
        Update::Chain { from, links } => {
            known.ok_or(UpdateError::UnknownRoom)?;
            store_links(txn, at.room, from, &links)
        }
        Update::More { next } => {
            known.ok_or(UpdateError::UnknownRoom)?;
            let ask = Deliverable::Room(super::RoomMsg::MoreHistory { from: next });
            enqueue(txn, room_of(at.from, at.room), ask).map_err(UpdateError::Unqueued)
        }
    }
}

/// Chain links from the room's home, appended in order. A link this node holds
/// already is skipped if it is the same; anything that does not extend the chain
/// (a gap, a fork, a link of another room, a bad signature) is refused. Member
/// nodes check the chain's shape; clients verify what each link is allowed to do.
fn store_links(
    txn: &mut dyn WriteTxn,
    room: RoomId,
    from: u64,
    links: &[SignedLink],
) -> Result<(), UpdateError> {
    if links.len() > super::CHAIN_PAGE_LINKS {
        return Err(UpdateError::Malformed("more chain links than a page holds"));
    }
    for (index, link) in (from..).zip(links) {
        let (len, head) = rooms::chain_head(&*txn, room)?;
        if index < len {
            let held = rooms::links(&*txn, room, index, 1)?;
            if held.first().map(SignedLink::hash) != Some(link.hash()) {
                return Err(UpdateError::Malformed(
                    "a chain link differing from the one held",
                ));
            }
            continue;
        }
        if index > len {
            return Err(UpdateError::Malformed("a gap in the chain"));
        }
        let valid = if index == 0 {
            ChainState::genesis(room, link).is_ok()
        } else {
            link.link.room == room && link.link.prev == head && link.verify().is_ok()
        };
        if !valid {
            return Err(UpdateError::Malformed(
                "a chain link that does not extend the chain",
            ));
        }
        rooms::put_link(txn, room, index, link)?;
        if let Change::Evict { user, .. } = link.link.change {
            rooms::put_evicted(txn, room, user, index)?;
        }
    }
    Ok(())
}

/// Whether `create` proves that `home` is the home of `room`, created by `owner`:
/// the room's first chain link, signed by its creator, naming that home, with the
/// room id derived from creator, home and nonce (so nobody can claim another
/// room's id).
fn proves_home(create: &SignedLink, room: RoomId, home: NodeId, owner: UserId) -> bool {
    ChainState::genesis(room, create).is_ok_and(|g| {
        g.home == home && g.members.contains_key(&owner) && create.user() == Some(owner)
    })
}

/// Whether a snapshot is well formed: from its home, a valid record, a bounded
/// member list in which nobody may read past the room's next frame.
fn check_snapshot(
    txn: &dyn conclave_storage::ReadTxn,
    at: &Copy,
    meta: &RoomMeta,
    members: &[RoomMember],
) -> Result<(), UpdateError> {
    if meta.sequencer() != at.from {
        return Err(UpdateError::Malformed(
            "a snapshot naming another sequencer",
        ));
    }
    if !meta.is_valid() {
        return Err(UpdateError::Malformed("an impossible room record"));
    }
    if members.len() > ROOM_MEMBERS_MAX {
        return Err(UpdateError::Malformed("more members than a room may have"));
    }
    let users: BTreeSet<UserId> = members.iter().map(|m| m.user).collect();
    if users.len() != members.len() {
        return Err(UpdateError::Malformed("a member listed twice"));
    }
    if members
        .iter()
        .any(|m| m.since.0 == 0 || m.since > meta.next_seq)
    {
        return Err(UpdateError::Malformed(
            "a member readable from an impossible seq",
        ));
    }
    // A member kept with the same key was checked when it arrived: only new or
    // changed keys cost a signature check, not every member on every snapshot.
    let known = rooms::members(txn, at.room)?;
    let unbound = members
        .iter()
        .filter(|m| !known.contains(m))
        .any(|m| check_binding(&m.user.0, &m.exchange, &m.binding).is_err());
    if unbound {
        return Err(UpdateError::Malformed(
            "a member's X25519 key not bound to them",
        ));
    }
    Ok(())
}

/// A membership snapshot: replaces the member list and updates what local users may
/// read. An older snapshot than the one applied (by `members_version`) is skipped:
/// it was handed over again after this node crashed between applying it and its
/// peer recording that, and applying it would take the copy back (re-admitting
/// removed members until the newer snapshots come again).
fn snapshot(
    txn: &mut dyn WriteTxn,
    at: &Copy,
    known: Option<RoomMeta>,
    mut meta: RoomMeta,
    members: &[RoomMember],
    create: &SignedLink,
) -> Result<(), UpdateError> {
    check_snapshot(&*txn, at, &meta, members)?;
    match known {
        None if !proves_home(create, at.room, at.from, meta.owner) => {
            return Err(UpdateError::UnprovenHome);
        }
        // The chain itself follows, from its first link.
        None => {}
        Some(k) => {
            if meta.members_version <= k.members_version
                && !mutation::active(Mutation::SkipReceiverDedup)
            {
                metrics::counter!("conclave_updates_stale_total").increment(1);
                return Ok(());
            }
            // Frames already stored here may be ahead of the snapshot's view.
            meta.next_seq = meta.next_seq.max(k.next_seq);
        }
    }
    replace_members(txn, at, &meta, members)?;
    rooms::put_epoch_start(txn, at.room, meta.epoch_start, meta.epoch)?;
    rooms::put_meta(txn, at.room, &meta)?;
    Ok(())
}

fn replace_members(
    txn: &mut dyn WriteTxn,
    at: &Copy,
    meta: &RoomMeta,
    members: &[RoomMember],
) -> Result<(), StoreError> {
    let old = rooms::members(&*txn, at.room)?;
    for m in &old {
        rooms::delete_member(txn, at.room, m.user)?;
        let still = members.iter().any(|n| n.user == m.user);
        if !still {
            rooms::put_former(txn, at.room, m.user, meta.next_seq)?;
        }
        if m.home == at.me && !still {
            let ended = Visibility {
                from: m.since,
                until: Some(meta.next_seq.max(m.since)),
            };
            rooms::put_visibility(txn, m.user, at.room, &ended)?;
        }
    }
    for m in members {
        rooms::put_member(txn, at.room, m)?;
        if m.home != at.me {
            continue;
        }
        let current = rooms::visibility(&*txn, m.user, at.room)?;
        if current.is_none_or(|v| v.until.is_some()) {
            let visible = Visibility {
                from: m.since,
                until: None,
            };
            rooms::put_visibility(txn, m.user, at.room, &visible)?;
        }
    }
    Ok(())
}

/// Sealed keys for this node's users. Each key on its own: one bad key (a user
/// this node does not know, or whose key does not verify) must not keep the others
/// from their users; each refusal is logged and counted.
fn store_keys(
    txn: &mut dyn WriteTxn,
    room: RoomId,
    known: &RoomMeta,
    epoch: Epoch,
    sealed: &[(UserId, SealedKey)],
) -> Result<(), UpdateError> {
    if sealed.len() > ROOM_MEMBERS_MAX {
        return Err(UpdateError::Malformed("more keys than a room has members"));
    }
    if epoch.0 == 0 || epoch > known.epoch {
        return Err(UpdateError::Malformed("keys of an impossible epoch"));
    }
    for (user, key) in sealed {
        match check_key(&*txn, room, epoch, *user, key)? {
            Ok(()) => keys::put(txn, room, epoch, *user, key)?,
            Err(denial) => {
                tracing::warn!(?room, epoch = epoch.0, ?user, reason = denial.reason(), %denial, "sealed key refused");
                metrics::counter!("conclave_keys_rejected_total", "reason" => denial.reason())
                    .increment(1);
            }
        }
    }
    Ok(())
}

/// The verdict on one sealed key: the outer error is the store's, the inner one the
/// key's.
fn check_key(
    txn: &dyn conclave_storage::ReadTxn,
    room: RoomId,
    epoch: Epoch,
    user: UserId,
    key: &SealedKey,
) -> Result<Result<(), Denial>, StoreError> {
    let Some(record) = registry::user(txn, user)? else {
        return Ok(Err(Denial::not_found(format!("user {user}"))));
    };
    let exchange = PublicKey::from(record.exchange);
    Ok(verify_sealed_key(key, &exchange, room, epoch).map_err(super::decide::seal_error))
}

/// Whether `frame`, at `seq`, is from someone who was a member when it was
/// sequenced. A node catching up on the history is sent frames of senders removed
/// since (this node saw them removed), and of senders evicted before it joined:
/// an eviction keeps the epoch until a member rekeys, so their frames may be of
/// the current epoch while a rekey is due, or of an earlier one. (A removal
/// starts a new epoch, so no removed member's frame is of the current one.)
fn sent_by_member(
    txn: &dyn conclave_storage::ReadTxn,
    meta: &RoomMeta,
    seq: Seq,
    frame: &Frame,
) -> Result<bool, StoreError> {
    let (room, sender) = (frame.room, frame.sender);
    if rooms::member(txn, room, sender)?.is_some() || rooms::was_member_at(txn, room, sender, seq)?
    {
        return Ok(true);
    }
    let evicted_then = meta.rekey_due || frame.epoch < meta.epoch;
    Ok(evicted_then && rooms::was_evicted(txn, room, sender)?)
}

/// The epoch a frame at `seq` must be of: the one in force there (a node catching
/// up on the history is sent frames of epochs before the current one). Every
/// snapshot applied records where its epoch began, so a frame before every start
/// this node knows is before anything it may hold. A live frame is of the
/// current epoch: only history costs a read.
fn epoch_at(
    txn: &dyn conclave_storage::ReadTxn,
    meta: &RoomMeta,
    room: RoomId,
    seq: Seq,
) -> Result<Epoch, UpdateError> {
    if seq >= meta.epoch_start {
        return Ok(meta.epoch);
    }
    rooms::epoch_at(txn, room, seq)?.ok_or(UpdateError::Malformed(
        "a frame before every epoch this node knows of the room",
    ))
}

/// A committed frame, verified again and stored once.
fn store_frame(
    txn: &mut dyn WriteTxn,
    at: &Copy,
    mut meta: RoomMeta,
    seq: Seq,
    frame: &Frame,
    committed: Time,
) -> Result<(), UpdateError> {
    if seq.0 == 0 {
        return Err(UpdateError::Malformed("a frame at seq 0"));
    }
    if !mutation::active(Mutation::SkipReceiverDedup) && rooms::has_frame(&*txn, at.room, seq)? {
        metrics::counter!("conclave_frames_duplicate_total").increment(1);
        return Ok(());
    }
    if frame.room != at.room {
        return Err(UpdateError::WrongRoom);
    }
    let epoch = epoch_at(&*txn, &meta, at.room, seq)?;
    if frame.epoch != epoch {
        return Err(UpdateError::StaleEpoch {
            current: epoch,
            got: frame.epoch,
        });
    }
    if !sent_by_member(&*txn, &meta, seq, frame)? {
        return Err(UpdateError::NotAMember);
    }
    verify_frame(frame).map_err(|_| UpdateError::BadSignature)?;
    rooms::put_frame(txn, at.room, &meta.policy, seq, frame)?;
    // The sender's node learns from it that their frame was committed, and where.
    rooms::put_id(txn, at.room, frame.id, seq)?;
    meta.next_seq = meta.next_seq.max(Seq(seq.0.saturating_add(1)));
    rooms::put_meta(txn, at.room, &meta)?;
    metrics::counter!("conclave_frames_delivered_total").increment(1);
    metrics::histogram!("conclave_commit_to_deliver_seconds")
        .record(at.now.saturating_since(committed).as_secs_f64());
    Ok(())
}

#[cfg(test)]
mod tests {
    use conclave_storage::{MemStore, Store};
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    use super::*;
    use crate::domain::{client, Policy, RoomRole};
    use crate::identity::Identity;

    const HOME: NodeId = NodeId([1; 32]);
    const HERE: NodeId = NodeId([2; 32]);

    /// A room created on `HOME` by a fresh owner, and its first snapshot.
    fn room() -> (RoomId, RoomMeta, RoomMember, Box<SignedLink>) {
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        let owner = Identity::generate(&mut rng);
        let (room, _, op) =
            client::create_room(&mut rng, &owner, HOME, Policy::default()).expect("create");
        let create = Box::new(op.link().expect("a creation carries its link").clone());
        let meta = RoomMeta {
            home: HOME,
            policy: Policy::default(),
            epoch: Epoch(1),
            epoch_start: Seq(1),
            next_seq: Seq(1),
            owner: owner.user_id(),
            members_version: 1,
            rekey_due: false,
        };
        let member = RoomMember {
            user: owner.user_id(),
            exchange: owner.public().exchange,
            binding: owner.public().binding,
            home: HOME,
            role: RoomRole::Owner,
            since: Seq(1),
        };
        (room, meta, member, create)
    }

    fn apply_to(store: &MemStore, room: RoomId, update: Update) -> Result<(), UpdateError> {
        let at = Copy {
            room,
            me: HERE,
            from: HOME,
            now: Time::default(),
        };
        let mut txn = store.write().expect("write");
        apply(&mut *txn, &at, update)?;
        txn.commit().expect("commit");
        Ok(())
    }

    #[test]
    fn an_impossible_snapshot_is_refused_not_a_panic() {
        let (room, meta, member, create) = room();
        let store = MemStore::new();
        let bad = [
            RoomMeta {
                epoch: Epoch(0),
                ..meta
            },
            RoomMeta {
                next_seq: Seq(0),
                ..meta
            },
            RoomMeta {
                epoch_start: Seq(5),
                ..meta
            },
            RoomMeta {
                members_version: 0,
                ..meta
            },
        ];
        for meta in bad {
            let update = Update::Members {
                meta,
                members: vec![member],
                create: create.clone(),
            };
            let error = apply_to(&store, room, update).expect_err("taken");
            assert_eq!(error.reason(), "malformed", "{meta:?}");
        }
        // A member readable past the room's next frame, or listed twice.
        let late = RoomMember {
            since: Seq(9),
            ..member
        };
        for members in [vec![late], vec![member, member]] {
            let update = Update::Members {
                meta,
                members,
                create: create.clone(),
            };
            let error = apply_to(&store, room, update).expect_err("taken");
            assert_eq!(error.reason(), "malformed");
        }
        let txn = store.read().expect("read");
        assert_eq!(rooms::meta(&*txn, room).expect("meta"), None);
    }

    #[test]
    fn an_older_snapshot_by_members_version_is_skipped() {
        let (room, meta, member, create) = room();
        let store = MemStore::new();
        let mut rng = ChaCha20Rng::seed_from_u64(4);
        let bob = Identity::generate(&mut rng);
        let bob = RoomMember {
            user: bob.user_id(),
            exchange: bob.public().exchange,
            binding: bob.public().binding,
            home: HERE,
            role: RoomRole::Member,
            since: Seq(1),
        };
        let v2 = RoomMeta {
            members_version: 2,
            ..meta
        };
        let newer = Update::Members {
            meta: v2,
            members: vec![member, bob],
            create: create.clone(),
        };
        apply_to(&store, room, newer).expect("v2");
        // Version 1 (before bob joined) handed over again: skipped, bob stays.
        let older = Update::Members {
            meta,
            members: vec![member],
            create,
        };
        apply_to(&store, room, older).expect("v1");
        let txn = store.read().expect("read");
        assert_eq!(rooms::members(&*txn, room).expect("members").len(), 2);
        assert_eq!(
            rooms::meta(&*txn, room)
                .expect("meta")
                .map(|m| m.members_version),
            Some(2)
        );
        let vis = rooms::visibility(&*txn, bob.user, room)
            .expect("vis")
            .expect("bob reads");
        assert_eq!(
            vis.until, None,
            "bob's visibility ended by a stale snapshot"
        );
    }

    #[test]
    fn a_first_snapshot_whose_room_id_is_not_derived_from_its_creation_is_refused() {
        let mut rng = ChaCha20Rng::seed_from_u64(5);
        let owner = Identity::generate(&mut rng);
        let (_, _, op) =
            client::create_room(&mut rng, &owner, HOME, Policy::default()).expect("create");
        // The owner signs a creation naming another id than its derivation.
        let claimed = RoomId([9; 16]);
        let mut link = op.link().expect("a creation carries its link").link.clone();
        assert_ne!(link.room, claimed);
        link.room = claimed;
        let create = Box::new(SignedLink::sign(&owner, link));
        let (_, meta, member, _) = room();
        let meta = RoomMeta {
            owner: owner.user_id(),
            ..meta
        };
        let member = RoomMember {
            user: owner.user_id(),
            exchange: owner.public().exchange,
            binding: owner.public().binding,
            ..member
        };
        let update = Update::Members {
            meta,
            members: vec![member],
            create,
        };
        let store = MemStore::new();
        let error = apply_to(&store, claimed, update).expect_err("taken");
        assert_eq!(error.reason(), "unproven_home");
    }

    #[test]
    fn a_snapshot_with_a_member_key_its_owner_did_not_sign_is_refused() {
        let (room, meta, member, create) = room();
        // The home substitutes an X25519 key of its own for the owner's.
        let mut rng = ChaCha20Rng::seed_from_u64(6);
        let other = Identity::generate(&mut rng).public();
        let swapped = RoomMember {
            exchange: other.exchange,
            ..member
        };
        let update = Update::Members {
            meta,
            members: vec![swapped],
            create,
        };
        let store = MemStore::new();
        let error = apply_to(&store, room, update).expect_err("taken");
        assert_eq!(error.reason(), "malformed");
    }

    #[test]
    fn chain_links_are_stored_only_as_an_extension_of_the_chain_held() {
        let (room, meta, member, create) = room();
        let store = MemStore::new();
        let snapshot = Update::Members {
            meta,
            members: vec![member],
            create: create.clone(),
        };
        apply_to(&store, room, snapshot).expect("snapshot");
        let chain = |from, links: Vec<SignedLink>| Update::Chain { from, links };
        // A gap before the first link.
        let error = apply_to(&store, room, chain(1, vec![(*create).clone()])).expect_err("gap");
        assert_eq!(error.reason(), "malformed");
        apply_to(&store, room, chain(0, vec![(*create).clone()])).expect("first link");
        // Handed over again: skipped.
        apply_to(&store, room, chain(0, vec![(*create).clone()])).expect("again");
        // A link that does not follow the head, and one differing from the held one.
        let mut rng = ChaCha20Rng::seed_from_u64(9);
        let stranger = Identity::generate(&mut rng);
        let loose = SignedLink::sign(
            &stranger,
            crate::domain::chain::Link {
                room,
                prev: crate::domain::chain::ChainHash([5; 32]),
                by: crate::domain::chain::Signer::User(stranger.user_id()),
                change: crate::domain::chain::Change::Rekey {
                    epoch: Epoch(2),
                    check: crate::domain::chain::KeyCheck([0; 32]),
                },
            },
        );
        for update in [chain(1, vec![loose.clone()]), chain(0, vec![loose])] {
            let error = apply_to(&store, room, update).expect_err("refused");
            assert_eq!(error.reason(), "malformed");
        }
        let txn = store.read().expect("read");
        assert_eq!(
            rooms::chain_head(&*txn, room).expect("head"),
            (1, create.hash())
        );
    }

    #[test]
    fn keys_or_frames_before_the_first_snapshot_are_refused() {
        let (room, ..) = room();
        let store = MemStore::new();
        let keys = Update::Keys {
            epoch: Epoch(1),
            keys: Vec::new(),
        };
        assert_eq!(
            apply_to(&store, room, keys).expect_err("taken").reason(),
            "unknown_room"
        );
    }
}

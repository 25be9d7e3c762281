//! Decide: a request checked against the room's state, into the [`Event`] that
//! applying it would be, or the [`Denial`] that refuses it. Nothing here writes:
//! every function reads through a transaction and returns a value, so the same
//! decision can later be made on a leader and applied on every replica.

use std::collections::{BTreeMap, BTreeSet};

use conclave_storage::ReadTxn;
use x25519_dalek::PublicKey;

use super::Event;
use crate::actor::Time;
use crate::crypto::SignatureBytes;
use crate::crypto::{verify_frame, verify_sealed_key, Frame, FrameError, SealError, SealedKey};
use crate::domain::chain::{
    check_eviction, may_invite, may_remove, ChainError, ChainHash, ChainState, Change, Link,
    SignedLink, Signer, CHAIN_LINKS_MAX,
};
use crate::domain::state::registry::{self, UserRecord};
use crate::domain::state::{rooms, rooms::RoomMeta};
use crate::domain::{
    Denial, History, Invitee, Outcome, RoomInfo, RoomMember, RoomRole, SignedRequest, UserStatus,
    ROOM_MEMBERS_MAX,
};
use crate::identity::Identity;
use crate::ids::{Epoch, NodeId, RoomId, Seq, UserId};
use crate::mutation::{self, Mutation};

/// Who decides and for whom: the room, the node deciding (the room's home, or
/// on a shard replica the node that proposed the entry), the node the request
/// came from, the time, and the cluster's nodes when known.
pub(super) struct Home<'a> {
    pub room: RoomId,
    pub me: NodeId,
    pub from: NodeId,
    pub now: Time,
    pub nodes: Option<&'a BTreeSet<NodeId>>,
    pub epoch_frames_max: u64,
    /// Where `me`'s users are looked up.
    pub registry: Registry<'a>,
}

/// Where a decision looks up the users of the deciding node (`me`): a creator,
/// an invitee homed there.
#[derive(Clone, Copy)]
pub(super) enum Registry<'a> {
    /// This node's registry: the room's home decides alone.
    Store,
    /// What the proposing node said of its users, carried by a shard entry:
    /// every replica decides alike whatever its own registry holds.
    Given(&'a [(UserId, UserRecord)]),
}

impl Home<'_> {
    /// The record of `user`, one of `me`'s users, if they may act.
    fn active_user(&self, txn: &dyn ReadTxn, user: UserId) -> Result<UserRecord, Denial> {
        let Registry::Given(users) = self.registry else {
            return registry::check_active(txn, user);
        };
        // Broken on purpose under the mutation: this node's own registry.
        if mutation::active(Mutation::ShardOwnRegistry) {
            return registry::check_active(txn, user);
        }
        let record = users
            .iter()
            .find(|(u, _)| *u == user)
            .map(|(_, r)| *r)
            .ok_or_else(|| Denial::not_found(format!("user {user}")))?;
        match record.status {
            UserStatus::Active => Ok(record),
            UserStatus::Revoked => Err(Denial::Revoked),
        }
    }

    /// The room's record, which must say this node sequences it (a shard
    /// replica holds it because it replicates the room's shard).
    fn meta(&self, txn: &dyn ReadTxn) -> Result<RoomMeta, Denial> {
        let meta = rooms::meta(txn, self.room)?
            .ok_or_else(|| Denial::not_found(format!("room {}", self.room)))?;
        if matches!(self.registry, Registry::Store) && meta.sequencer() != self.me {
            return Err(Denial::malformed(format!(
                "room {} is sequenced by {}, not here",
                self.room,
                meta.sequencer()
            )));
        }
        Ok(meta)
    }

    /// The acting member: a member of the room, homed on the node the request came
    /// from (only a user's own node speaks for them).
    fn acting_member(&self, txn: &dyn ReadTxn, user: UserId) -> Result<RoomMember, Denial> {
        let member = rooms::member(txn, self.room, user)?.ok_or(Denial::NotAMember)?;
        if member.home != self.from {
            return Err(Denial::NotAMember);
        }
        Ok(member)
    }
}

/// A sealed key's verification failure as the refusal it is.
pub(super) fn seal_error(e: SealError) -> Denial {
    match e {
        SealError::BadSignature | SealError::InvalidSealerKey => Denial::BadSignature,
        other => Denial::bundle(other.to_string()),
    }
}

/// The chain link a membership request carries: of this room, signed by the
/// requester, following the chain's head here, and room left in the chain.
fn check_link(
    txn: &dyn ReadTxn,
    h: &Home<'_>,
    req: &SignedRequest,
    link: &SignedLink,
) -> Result<(), Denial> {
    if link.link.room != h.room || link.link.by != Signer::User(req.request.user) {
        return Err(Denial::malformed(
            "the chain link is for another room or signed by someone else",
        ));
    }
    link.verify().map_err(|_| Denial::BadSignature)?;
    let (len, head) = chain_head_with_room(txn, h.room)?;
    if link.link.prev != head {
        return Err(Denial::StaleChain { len });
    }
    Ok(())
}

/// The room's chain length and head, if the chain may take one more link.
fn chain_head_with_room(txn: &dyn ReadTxn, room: RoomId) -> Result<(u64, ChainHash), Denial> {
    let (len, head) = rooms::chain_head(txn, room)?;
    if len >= CHAIN_LINKS_MAX {
        return Err(Denial::Limit {
            what: format!("a room's chain holds at most {CHAIN_LINKS_MAX} links"),
        });
    }
    Ok((len, head))
}

fn chain_denial(e: ChainError) -> Denial {
    match e {
        ChainError::BadSignature => Denial::BadSignature,
        ChainError::Unauthorized(needed) => Denial::missing(needed),
        other => Denial::malformed(other.to_string()),
    }
}

/// A room's creation, on its creator's node, with epoch 1's key sealed by and to
/// the creator. The link is the room's first: its id derives from it.
pub(super) fn create(
    txn: &dyn ReadTxn,
    h: &Home<'_>,
    req: &SignedRequest,
    link: &SignedLink,
    key: &SealedKey,
) -> Result<Event, Denial> {
    let genesis = ChainState::genesis(h.room, link).map_err(chain_denial)?;
    let acting = req.request.user;
    if link.link.by != Signer::User(acting) {
        return Err(Denial::malformed("the creation is signed by someone else"));
    }
    if h.from != h.me || genesis.home != h.me {
        return Err(Denial::malformed(
            "rooms are created on their creator's node",
        ));
    }
    if rooms::meta(txn, h.room)?.is_some() {
        return Err(Denial::Conflict {
            what: format!("room {} exists", h.room),
        });
    }
    let creator = h.active_user(txn, acting)?;
    // A node-wide count: only the creator's node judges it (a shard replica
    // counts the rooms of the shards it holds; see `check_room_quota`).
    if matches!(h.registry, Registry::Store) {
        check_room_quota(txn, acting)?;
    }
    let owner = genesis.members[&acting];
    if owner.identity.exchange != creator.exchange {
        return Err(Denial::malformed(
            "the creation names another X25519 key than the creator's",
        ));
    }
    if key.sealer != acting {
        return Err(Denial::bundle(
            "the first key must be sealed by the creator",
        ));
    }
    let epoch = Epoch(1);
    verify_sealed_key(key, &PublicKey::from(creator.exchange), h.room, epoch)
        .map_err(seal_error)?;
    let meta = RoomMeta {
        home: h.me,
        policy: genesis.policy,
        epoch,
        epoch_start: Seq(1),
        next_seq: Seq(1),
        owner: acting,
        members_version: 1,
        rekey_due: false,
    };
    let owner = RoomMember {
        user: acting,
        exchange: creator.exchange,
        binding: creator.binding,
        home: h.me,
        role: RoomRole::Owner,
        since: Seq(1),
    };
    Ok(Event::Created {
        meta,
        owner,
        key: key.clone(),
        link: Box::new(link.clone()),
    })
}

/// Refuses a creation by `user` past the rooms one user may create
/// ([`rooms::ROOMS_CREATED_PER_USER_MAX`]), as their node counts them.
pub(super) fn check_room_quota(txn: &dyn ReadTxn, user: UserId) -> Result<(), Denial> {
    if rooms::created_by(txn, user)? >= rooms::ROOMS_CREATED_PER_USER_MAX {
        return Err(Denial::Limit {
            what: format!(
                "rooms created: {} per user",
                rooms::ROOMS_CREATED_PER_USER_MAX
            ),
        });
    }
    Ok(())
}

/// An invitation by an owner or admin, with the current epoch's key sealed by the
/// inviter to the invitee.
pub(super) fn invite(
    txn: &dyn ReadTxn,
    h: &Home<'_>,
    req: &SignedRequest,
    link: &SignedLink,
    key: &SealedKey,
) -> Result<Event, Denial> {
    let Change::Invite { invitee, epoch } = &link.link.change else {
        return Err(Denial::malformed(
            "an invitation's link is not an invitation",
        ));
    };
    let meta = h.meta(txn)?;
    let acting = req.request.user;
    let inviter = h.acting_member(txn, acting)?;
    check_link(txn, h, req, link)?;
    may_invite(inviter.role, invitee.role).map_err(chain_denial)?;
    check_invitee(txn, h, invitee)?;
    if *epoch != meta.epoch {
        return Err(Denial::bundle(format!(
            "key for epoch {}, the room is at epoch {}",
            epoch.0, meta.epoch.0
        )));
    }
    if key.sealer != acting {
        return Err(Denial::bundle("the key must be sealed by the inviter"));
    }
    verify_sealed_key(key, &invitee.user.exchange_key(), h.room, meta.epoch).map_err(seal_error)?;
    let since = match meta.policy.history {
        History::FromJoin => meta.next_seq,
        History::FromEpoch => meta.epoch_start,
    };
    let member = RoomMember {
        user: UserId(invitee.user.signing),
        exchange: invitee.user.exchange,
        binding: invitee.user.binding,
        home: invitee.home,
        role: invitee.role,
        since,
    };
    let meta = RoomMeta {
        members_version: meta.members_version + 1,
        ..meta
    };
    Ok(Event::Invited {
        meta,
        member,
        key: key.clone(),
        link: Box::new(link.clone()),
    })
}

/// Who may be invited: a valid key, homed on a node of the cluster, not a member
/// already, and room left.
fn check_invitee(txn: &dyn ReadTxn, h: &Home<'_>, invitee: &Invitee) -> Result<(), Denial> {
    invitee
        .user
        .check()
        .map_err(|e| Denial::malformed(format!("the invitee's keys: {e}")))?;
    if invitee.home != h.me && h.nodes.is_some_and(|n| !n.contains(&invitee.home)) {
        return Err(Denial::not_found(format!(
            "node {} (not a node of this cluster)",
            invitee.home
        )));
    }
    let user = UserId(invitee.user.signing);
    if invitee.home == h.me {
        // This node's registry speaks for its own users: no revoked one joins.
        h.active_user(txn, user)?;
    }
    if rooms::member(txn, h.room, user)?.is_some() {
        return Err(Denial::Conflict {
            what: format!("{user} is a member already"),
        });
    }
    if rooms::members(txn, h.room)?.len() >= ROOM_MEMBERS_MAX {
        return Err(Denial::RoomFull);
    }
    Ok(())
}

/// The record after a move to `epoch`, which must be the next one.
fn next_epoch(meta: RoomMeta, epoch: Epoch) -> Result<RoomMeta, Denial> {
    let next = Epoch(meta.epoch.0 + 1);
    if epoch != next {
        return Err(Denial::bundle(format!(
            "bundle for epoch {}, the next epoch is {}",
            epoch.0, next.0
        )));
    }
    Ok(RoomMeta {
        epoch: next,
        epoch_start: meta.next_seq,
        members_version: meta.members_version + 1,
        rekey_due: false,
        ..meta
    })
}

/// A removal (by an owner or admin, or of oneself), which moves the room to the
/// next epoch with its key sealed by the remover to every remaining member.
pub(super) fn remove(
    txn: &dyn ReadTxn,
    h: &Home<'_>,
    req: &SignedRequest,
    link: &SignedLink,
    bundle: &[(UserId, SealedKey)],
) -> Result<Event, Denial> {
    let Change::Remove { user, epoch, .. } = &link.link.change else {
        return Err(Denial::malformed("a removal's link is not a removal"));
    };
    let meta = h.meta(txn)?;
    let acting = req.request.user;
    let remover = h.acting_member(txn, acting)?;
    check_link(txn, h, req, link)?;
    let removed = rooms::member(txn, h.room, *user)?
        .ok_or_else(|| Denial::not_found(format!("member {user}")))?;
    may_remove(acting, remover.role, *user, removed.role).map_err(chain_denial)?;
    let meta = next_epoch(meta, *epoch)?;
    let remaining: Vec<RoomMember> = rooms::members(txn, h.room)?
        .into_iter()
        .filter(|m| m.user != *user)
        .collect();
    validate_bundle(&remaining, h.room, meta.epoch, acting, bundle)?;
    Ok(Event::Removed {
        meta,
        removed,
        bundle: bundle.to_vec(),
        link: Box::new(link.clone()),
    })
}

/// A rekey by any member: the next epoch, its key sealed to every member.
pub(super) fn rekey(
    txn: &dyn ReadTxn,
    h: &Home<'_>,
    req: &SignedRequest,
    link: &SignedLink,
    bundle: &[(UserId, SealedKey)],
) -> Result<Event, Denial> {
    let Change::Rekey { epoch, .. } = &link.link.change else {
        return Err(Denial::malformed("a rekey's link is not a rekey"));
    };
    let meta = h.meta(txn)?;
    let acting = req.request.user;
    h.acting_member(txn, acting)?;
    check_link(txn, h, req, link)?;
    let meta = next_epoch(meta, *epoch)?;
    validate_bundle(
        &rooms::members(txn, h.room)?,
        h.room,
        meta.epoch,
        acting,
        bundle,
    )?;
    Ok(Event::Rekeyed {
        meta,
        bundle: bundle.to_vec(),
        link: Box::new(link.clone()),
    })
}

/// An eviction of a revoked member, on the signed word of their node (which must
/// be the node it came from), recorded in a link this node signs as the home.
pub(super) fn evict(
    txn: &dyn ReadTxn,
    h: &Home<'_>,
    home: &Identity,
    user: UserId,
    attestation: &SignatureBytes,
) -> Result<Event, Denial> {
    assert_eq!(home.node_id(), h.me, "the home signs with its own identity");
    let (_, head) = chain_head_with_room(txn, h.room)?;
    let link = SignedLink::sign(
        home,
        Link {
            room: h.room,
            prev: head,
            by: Signer::Node(h.me),
            change: Change::Evict {
                user,
                attestation: *attestation,
            },
        },
    );
    evicted(txn, h, link)
}

/// An eviction recorded in `link`, signed by the room's home: the room's
/// record must name that home, the link follow the chain's head, and the word
/// come from the evicted user's node (`h.from`), signed by it.
pub(super) fn evicted(txn: &dyn ReadTxn, h: &Home<'_>, link: SignedLink) -> Result<Event, Denial> {
    let meta = h.meta(txn)?;
    let Change::Evict { user, attestation } = &link.link.change else {
        return Err(Denial::malformed("an eviction's link is not an eviction"));
    };
    if link.link.room != h.room || link.link.by != Signer::Node(meta.home) {
        return Err(Denial::malformed(
            "an eviction's link is for another room or not signed by its home",
        ));
    }
    link.verify().map_err(|_| Denial::BadSignature)?;
    let removed = rooms::member(txn, h.room, *user)?
        .ok_or_else(|| Denial::not_found(format!("member {user}")))?;
    if removed.home != h.from {
        return Err(Denial::NotAMember);
    }
    check_eviction(removed.home, h.room, *user, attestation).map_err(chain_denial)?;
    let (len, head) = chain_head_with_room(txn, h.room)?;
    if link.link.prev != head {
        return Err(Denial::StaleChain { len });
    }
    let meta = RoomMeta {
        members_version: meta.members_version + 1,
        rekey_due: true,
        ..meta
    };
    Ok(Event::Evicted {
        meta,
        removed,
        link: Box::new(link),
    })
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
    if let Some(m) = members.iter().find(|m| !by_user.contains_key(&m.user)) {
        return Err(Denial::bundle(format!("no key for member {}", m.user)));
    }
    if let Some(u) = by_user
        .keys()
        .find(|u| !members.iter().any(|m| m.user == **u))
    {
        return Err(Denial::bundle(format!("key for non-member {u}")));
    }
    // Every member has exactly one key and nobody else has one.
    debug_assert_eq!(by_user.len(), members.len());
    for member in members {
        let key = by_user[&member.user];
        if key.sealer != sealer {
            return Err(Denial::bundle(format!(
                "key for {} not sealed by the requester",
                member.user
            )));
        }
        verify_sealed_key(key, &PublicKey::from(member.exchange), room, epoch).map_err(|e| {
            match seal_error(e) {
                Denial::BadBundle { problem } => {
                    Denial::bundle(format!("key for {}: {problem}", member.user))
                }
                other => other,
            }
        })?;
    }
    Ok(())
}

/// A frame to sequence: from a member homed on the node it came from, not seen
/// before, of the current epoch, signed by its sender. `next` overrides the stored
/// next sequence number (only the `volatile_sequence` mutation passes one).
pub(super) fn publish(
    txn: &dyn ReadTxn,
    h: &Home<'_>,
    frame: Frame,
    next: Option<Seq>,
) -> Result<Event, Denial> {
    let meta = h.meta(txn)?;
    if frame.room != h.room {
        return Err(Denial::malformed("frame names another room"));
    }
    // Committed before (offered again, proposed again): a duplicate, whatever
    // changed since (a removal, a rekey), so that its sender is never told it
    // was refused.
    if let Some(seq) = rooms::seq_of_id(txn, h.room, frame.id)? {
        let stored = rooms::frames(txn, h.room, seq, 1)?;
        let same = stored
            .first()
            .is_none_or(|(s, f)| *s != seq || f.sender == frame.sender);
        if same {
            return Err(Denial::Duplicate { seq });
        }
    }
    let carried = meta.next_seq.0.saturating_sub(meta.epoch_start.0);
    if meta.rekey_due || carried >= h.epoch_frames_max {
        return Err(Denial::RekeyNeeded);
    }
    h.acting_member(txn, frame.sender)?;
    if rooms::seq_of_id(txn, h.room, frame.id)?.is_some() {
        return Err(Denial::malformed("a message id another sender committed"));
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
    let seq = next.unwrap_or(meta.next_seq);
    let meta = RoomMeta {
        next_seq: Seq(seq.0.saturating_add(1)),
        ..meta
    };
    Ok(Event::Published {
        meta,
        seq,
        frame,
        committed: h.now,
    })
}

/// The room as its home describes it, to a member.
pub(super) fn info(txn: &dyn ReadTxn, h: &Home<'_>, acting: UserId) -> Result<Outcome, Denial> {
    let meta = h.meta(txn)?;
    h.acting_member(txn, acting)?;
    Ok(Outcome::Room(RoomInfo {
        room: h.room,
        home: meta.home,
        policy: meta.policy,
        epoch: meta.epoch,
        next_seq: meta.next_seq,
        chain_len: rooms::chain_head(txn, h.room)?.0,
        members: rooms::members(txn, h.room)?,
    }))
}

//! The membership chain: every change of a room's members or keys, signed by who
//! made it, each link naming the hash of the one before. Clients verify it from the
//! room's creation and believe nothing else about the room's members or keys.
//!
//! A link is signed by a **user** (create, invite, remove, rekey) or, for one
//! change only, by the room's **home node**: it evicts a user on the word (a
//! signature) of that user's own node, which revoked them and could as well cut
//! them off by withholding. No node can add anyone or set a key.
//! Links that start an epoch (create, remove, rekey) carry a [`KeyCheck`] of the new
//! epoch key, so a client accepts exactly one key per epoch, sealed by a member the
//! chain authorizes ([`ChainState::check_key`]). A node stores and relays links but
//! cannot make one a client accepts.
//!
//! The authorization rules ([`may_invite`], [`may_remove`]) are the ones the room's
//! home decides with, so the home and every client judge a change alike.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use sha2::Digest;

use super::{Invitee, Policy, RoomRole, ROOM_MEMBERS_MAX};
use crate::crypto::{EpochKey, SignatureBytes};
use crate::identity::{Identity, PublicIdentity};
use crate::ids::{Epoch, NodeId, RoomId, UserId};

/// Domain separation for a link's signature.
const LINK_SIG_TAG: &[u8] = b"conclave/chain-link/v1";
/// Domain separation for a link's hash.
const LINK_HASH_TAG: &[u8] = b"conclave/chain-hash/v1";
/// Domain separation for an epoch key's check value.
const KEY_CHECK_TAG: &[u8] = b"conclave/epoch-key-check/v1";

/// The most links a room's chain may hold: bounds what a new member node is sent
/// and what a client verifies (a link is a few hundred bytes, so ~5 MB at most).
/// Past it, membership changes are refused with a reason; the room goes on.
pub const CHAIN_LINKS_MAX: u64 = 16_384;

/// The hash of a link (SHA-256 over a tag and its encoding); the first link's
/// `prev` is [`ChainHash::GENESIS`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ChainHash(pub [u8; 32]);

impl ChainHash {
    /// What the first link names as its predecessor.
    pub const GENESIS: ChainHash = ChainHash([0; 32]);
}

/// A commitment to an epoch key, in the link that starts the epoch: SHA-256 over a
/// tag, the room, the epoch and the key. It pins the key without revealing it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyCheck(pub [u8; 32]);

impl KeyCheck {
    /// The check of `key` as `room`'s key at `epoch`.
    pub fn of(room: RoomId, epoch: Epoch, key: &EpochKey) -> Self {
        let mut hash = sha2::Sha256::new();
        hash.update(KEY_CHECK_TAG);
        hash.update(room.0);
        hash.update(epoch.0.to_be_bytes());
        hash.update(key.as_bytes());
        KeyCheck(hash.finalize().into())
    }
}

/// Who signed a link.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Signer {
    /// A user (every change but eviction).
    User(UserId),
    /// The room's home (evictions only).
    Node(NodeId),
}

/// What a link changes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    /// The room is created, homed on `home`, with its creator as owner; its id is
    /// [`RoomId::derive`]`(creator, home, nonce)`.
    Create {
        /// The creator (whose X25519 key is sealed to).
        creator: PublicIdentity,
        /// The room's home.
        home: NodeId,
        /// The creator's random nonce.
        nonce: [u8; 16],
        /// The room's policy.
        policy: Policy,
        /// Epoch 1's key.
        check: KeyCheck,
    },
    /// A member is added and given the key of `epoch` (the current one) by the
    /// signer.
    Invite {
        /// Who, where and in what role.
        invitee: Invitee,
        /// The current epoch.
        epoch: Epoch,
    },
    /// A member is removed and the room moves to `epoch` (the next one), whose key
    /// the signer sealed to every remaining member.
    Remove {
        /// Whom.
        user: UserId,
        /// The next epoch.
        epoch: Epoch,
        /// Its key.
        check: KeyCheck,
    },
    /// The room moves to `epoch` (the next one) with the same members.
    Rekey {
        /// The next epoch.
        epoch: Epoch,
        /// Its key.
        check: KeyCheck,
    },
    /// A revoked user is removed by the room's home (which signs the link), on the
    /// word of the user's own node (`attestation`: its signature, see
    /// [`eviction_message`]); the room must rekey before anyone publishes again.
    Evict {
        /// Whom.
        user: UserId,
        /// The evicted user's home node's signature over [`eviction_message`].
        attestation: SignatureBytes,
    },
}

/// Domain separation for a node's word that one of its users is to be evicted.
const EVICTION_TAG: &[u8] = b"conclave/evict/v1";

/// What a node signs to evict one of its users from a room.
pub fn eviction_message(room: RoomId, user: UserId) -> Vec<u8> {
    let mut out = EVICTION_TAG.to_vec();
    out.extend_from_slice(&room.0);
    out.extend_from_slice(&user.0);
    out
}

/// `node`'s word that `user` (one of its users) is to be evicted from `room`.
pub fn attest_eviction(node: &Identity, room: RoomId, user: UserId) -> SignatureBytes {
    SignatureBytes::sign(node.signing_key(), &eviction_message(room, user))
}

/// Checks `attestation` as `node`'s word that `user` is to be evicted from `room`.
pub fn check_eviction(
    node: NodeId,
    room: RoomId,
    user: UserId,
    attestation: &SignatureBytes,
) -> Result<(), ChainError> {
    crate::crypto::verify_signature(&node.0, &eviction_message(room, user), attestation)
        .map_err(|_| ChainError::BadSignature)
}

/// One link of a room's chain, as signed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Link {
    /// The room.
    pub room: RoomId,
    /// The hash of the previous link.
    pub prev: ChainHash,
    /// Who signs it.
    pub by: Signer,
    /// What it changes.
    pub change: Change,
}

/// A link and its signer's Ed25519 signature over `LINK_SIG_TAG ‖ postcard(link)`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedLink {
    /// The link.
    pub link: Link,
    /// The signature.
    pub signature: SignatureBytes,
}

fn link_bytes(link: &Link) -> Vec<u8> {
    let mut out = LINK_SIG_TAG.to_vec();
    // Encoding an in-memory value into a Vec cannot fail; an empty encoding would
    // only make the signature fail to verify.
    if postcard::to_io(link, &mut out).is_err() {
        out.clear();
    }
    out
}

impl SignedLink {
    /// Signs `link` with `identity`, who must be its signer (as a user or a node).
    pub fn sign(identity: &Identity, link: Link) -> Self {
        let public = identity.public().signing;
        assert!(
            matches!(link.by, Signer::User(UserId(k)) | Signer::Node(NodeId(k)) if k == public),
            "a link is signed by the signer it names"
        );
        let signature = SignatureBytes::sign(identity.signing_key(), &link_bytes(&link));
        Self { link, signature }
    }

    /// Checks the signature against the signer the link names.
    pub fn verify(&self) -> Result<(), ChainError> {
        let key = match self.link.by {
            Signer::User(UserId(k)) | Signer::Node(NodeId(k)) => k,
        };
        crate::crypto::verify_signature(&key, &link_bytes(&self.link), &self.signature)
            .map_err(|_| ChainError::BadSignature)
    }

    /// The link's hash, which the next link names as `prev`.
    pub fn hash(&self) -> ChainHash {
        let mut hash = sha2::Sha256::new();
        hash.update(LINK_HASH_TAG);
        hash.update(link_bytes(&self.link));
        hash.update(self.signature.0);
        ChainHash(hash.finalize().into())
    }

    /// The signing user, if a user signed it.
    pub fn user(&self) -> Option<UserId> {
        match self.link.by {
            Signer::User(u) => Some(u),
            Signer::Node(_) => None,
        }
    }
}

/// Why a chain (or one link of it) is refused. Counted by [`ChainError::reason`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// A signature does not verify.
    #[error("a link's signature does not verify")]
    BadSignature,
    /// A link does not name the hash of the one before it.
    #[error("a link does not follow the one before it")]
    Broken,
    /// A link of another room.
    #[error("a link of another room")]
    WrongRoom,
    /// The first link is not a valid creation of this room.
    #[error("the chain does not start with this room's creation: {0}")]
    BadGenesis(&'static str),
    /// The signer may not make this change.
    #[error("not authorized: {0}")]
    Unauthorized(&'static str),
    /// An epoch out of sequence.
    #[error("epoch {got} where {expected} was due", got = .got.0, expected = .expected.0)]
    BadEpoch {
        /// The epoch the chain is due to name.
        expected: Epoch,
        /// The epoch the link names.
        got: Epoch,
    },
    /// A change that cannot apply (a member twice, a key not bound, …).
    #[error("invalid change: {0}")]
    Invalid(&'static str),
    /// More links than [`CHAIN_LINKS_MAX`].
    #[error("the chain is longer than {CHAIN_LINKS_MAX} links")]
    TooLong,
}

impl ChainError {
    /// The reason as a metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            ChainError::BadSignature => "bad_signature",
            ChainError::Broken => "broken_chain",
            ChainError::WrongRoom => "wrong_room",
            ChainError::BadGenesis(_) => "bad_genesis",
            ChainError::Unauthorized(_) => "unauthorized",
            ChainError::BadEpoch { .. } => "bad_epoch",
            ChainError::Invalid(_) => "invalid_change",
            ChainError::TooLong => "chain_too_long",
        }
    }
}

/// Whether a member with `role` may invite someone as `invited`.
pub fn may_invite(role: RoomRole, invited: RoomRole) -> Result<(), ChainError> {
    if !role.manages_members() {
        return Err(ChainError::Unauthorized("only owners and admins invite"));
    }
    if invited == RoomRole::Owner {
        return Err(ChainError::Unauthorized(
            "a room has one owner, its creator",
        ));
    }
    Ok(())
}

/// Whether `actor` (with `role`) may remove `target` (with `target_role`): anyone
/// themselves; owners and admins anyone but the owner.
pub fn may_remove(
    actor: UserId,
    role: RoomRole,
    target: UserId,
    target_role: RoomRole,
) -> Result<(), ChainError> {
    if actor == target {
        return Ok(());
    }
    if !role.manages_members() {
        return Err(ChainError::Unauthorized(
            "only owners and admins remove others",
        ));
    }
    if target_role == RoomRole::Owner {
        return Err(ChainError::Unauthorized("only the owner removes the owner"));
    }
    Ok(())
}

/// A member as the chain records them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChainMember {
    /// Their public identity (X25519 key bound, checked when they joined).
    pub identity: PublicIdentity,
    /// Their home node.
    pub home: NodeId,
    /// Their role.
    pub role: RoomRole,
}

/// Who started an epoch, and its key's check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EpochStart {
    /// The member who created the epoch's key.
    pub sealer: UserId,
    /// The key's check.
    pub check: KeyCheck,
}

/// Why a client refused a sealed key. Counted by [`KeyRefusal::reason`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeyRefusal {
    /// The chain has no such epoch.
    #[error("the chain has no epoch {}", .0.0)]
    UnknownEpoch(Epoch),
    /// The sealer neither created the epoch nor invited the recipient in it.
    #[error("sealed by {0}, whom the chain does not authorize for this key")]
    UnauthorizedSealer(UserId),
    /// The key is not the one the chain pins for the epoch.
    #[error("not the key the chain pins for epoch {}", .0.0)]
    Mismatch(Epoch),
    /// The key does not open (or its seal does not verify).
    #[error("does not open: {0}")]
    Unopened(String),
}

impl KeyRefusal {
    /// The reason as a metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            KeyRefusal::UnknownEpoch(_) => "unknown_epoch",
            KeyRefusal::UnauthorizedSealer(_) => "unauthorized_sealer",
            KeyRefusal::Mismatch(_) => "key_mismatch",
            KeyRefusal::Unopened(_) => "unopened",
        }
    }
}

/// A room as its verified chain says it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainState {
    /// The room.
    pub room: RoomId,
    /// How many links were verified.
    pub len: u64,
    /// The hash of the last one.
    pub head: ChainHash,
    /// The room's home.
    pub home: NodeId,
    /// Its policy.
    pub policy: Policy,
    /// Its current epoch.
    pub epoch: Epoch,
    /// Its members.
    pub members: BTreeMap<UserId, ChainMember>,
    /// Who started each epoch.
    pub epochs: BTreeMap<Epoch, EpochStart>,
    /// (recipient, epoch, sealer): an invitation in which `sealer` gave
    /// `recipient` the key of `epoch`.
    pub shared: BTreeSet<(UserId, Epoch, UserId)>,
    /// A member was evicted since the epoch started: the next publish needs a new
    /// epoch.
    pub rekey_due: bool,
}

impl ChainState {
    /// The state after the room's first link, its creation.
    pub fn genesis(room: RoomId, first: &SignedLink) -> Result<Self, ChainError> {
        let l = &first.link;
        if l.room != room {
            return Err(ChainError::WrongRoom);
        }
        let Change::Create {
            creator,
            home,
            nonce,
            policy,
            check,
        } = &l.change
        else {
            return Err(ChainError::BadGenesis("the first link is not a creation"));
        };
        let owner = UserId(creator.signing);
        if l.by != Signer::User(owner) || l.prev != ChainHash::GENESIS {
            return Err(ChainError::BadGenesis(
                "not signed by its creator, or not first",
            ));
        }
        if RoomId::derive(owner, *home, *nonce) != room {
            return Err(ChainError::BadGenesis("the room id is not derived from it"));
        }
        creator
            .check()
            .map_err(|_| ChainError::Invalid("the creator's X25519 key is not bound"))?;
        first.verify()?;
        let member = ChainMember {
            identity: *creator,
            home: *home,
            role: RoomRole::Owner,
        };
        let start = EpochStart {
            sealer: owner,
            check: *check,
        };
        Ok(Self {
            room,
            len: 1,
            head: first.hash(),
            home: *home,
            policy: *policy,
            epoch: Epoch(1),
            members: BTreeMap::from([(owner, member)]),
            epochs: BTreeMap::from([(Epoch(1), start)]),
            shared: BTreeSet::new(),
            rekey_due: false,
        })
    }

    /// Verifies `links` as `room`'s whole chain, from its creation.
    pub fn verify(room: RoomId, links: &[SignedLink]) -> Result<Self, ChainError> {
        let (first, rest) = links
            .split_first()
            .ok_or(ChainError::BadGenesis("the chain is empty"))?;
        let mut state = Self::genesis(room, first)?;
        for link in rest {
            state.apply(link)?;
        }
        Ok(state)
    }

    /// Verifies `link` as the next one and applies it. On error nothing changes.
    pub fn apply(&mut self, link: &SignedLink) -> Result<(), ChainError> {
        let l = &link.link;
        if l.room != self.room {
            return Err(ChainError::WrongRoom);
        }
        if l.prev != self.head {
            return Err(ChainError::Broken);
        }
        if self.len >= CHAIN_LINKS_MAX {
            return Err(ChainError::TooLong);
        }
        link.verify()?;
        match (&l.change, l.by) {
            (Change::Create { .. }, _) => {
                return Err(ChainError::Invalid("a second creation"));
            }
            (Change::Evict { user, attestation }, Signer::Node(node)) => {
                self.evict(node, *user, attestation)?;
            }
            (_, Signer::Node(_)) => {
                return Err(ChainError::Unauthorized("a node may only evict"));
            }
            (Change::Invite { invitee, epoch }, Signer::User(by)) => {
                self.invite(by, invitee, *epoch)?;
            }
            (Change::Remove { user, epoch, check }, Signer::User(by)) => {
                self.remove(by, *user, *epoch, *check)?;
            }
            (Change::Rekey { epoch, check }, Signer::User(by)) => {
                self.acting(by)?;
                self.next_epoch(by, *epoch, *check)?;
            }
            (Change::Evict { .. }, Signer::User(_)) => {
                return Err(ChainError::Unauthorized("only the room's home evicts"));
            }
        }
        self.len += 1;
        self.head = link.hash();
        Ok(())
    }

    fn acting(&self, by: UserId) -> Result<ChainMember, ChainError> {
        self.members
            .get(&by)
            .copied()
            .ok_or(ChainError::Unauthorized("the signer is not a member"))
    }

    fn invite(&mut self, by: UserId, invitee: &Invitee, epoch: Epoch) -> Result<(), ChainError> {
        may_invite(self.acting(by)?.role, invitee.role)?;
        if epoch != self.epoch {
            return Err(ChainError::BadEpoch {
                expected: self.epoch,
                got: epoch,
            });
        }
        let user = UserId(invitee.user.signing);
        if self.members.contains_key(&user) {
            return Err(ChainError::Invalid("a member invited again"));
        }
        if self.members.len() >= ROOM_MEMBERS_MAX {
            return Err(ChainError::Invalid("the room is full"));
        }
        invitee
            .user
            .check()
            .map_err(|_| ChainError::Invalid("the invitee's X25519 key is not bound"))?;
        let member = ChainMember {
            identity: invitee.user,
            home: invitee.home,
            role: invitee.role,
        };
        self.members.insert(user, member);
        self.shared.insert((user, epoch, by));
        Ok(())
    }

    fn remove(
        &mut self,
        by: UserId,
        user: UserId,
        epoch: Epoch,
        check: KeyCheck,
    ) -> Result<(), ChainError> {
        let actor = self.acting(by)?;
        let target = self
            .members
            .get(&user)
            .ok_or(ChainError::Invalid("the removed user is not a member"))?;
        may_remove(by, actor.role, user, target.role)?;
        self.next_epoch(by, epoch, check)?;
        self.members.remove(&user);
        Ok(())
    }

    fn next_epoch(&mut self, by: UserId, epoch: Epoch, check: KeyCheck) -> Result<(), ChainError> {
        let expected = Epoch(self.epoch.0 + 1);
        if epoch != expected {
            return Err(ChainError::BadEpoch {
                expected,
                got: epoch,
            });
        }
        self.epoch = epoch;
        self.epochs.insert(epoch, EpochStart { sealer: by, check });
        self.rekey_due = false;
        Ok(())
    }

    fn evict(
        &mut self,
        node: NodeId,
        user: UserId,
        attestation: &SignatureBytes,
    ) -> Result<(), ChainError> {
        if node != self.home {
            return Err(ChainError::Unauthorized("only the room's home evicts"));
        }
        let member = self
            .members
            .get(&user)
            .ok_or(ChainError::Invalid("the evicted user is not a member"))?;
        check_eviction(member.home, self.room, user, attestation)?;
        self.members.remove(&user);
        self.rekey_due = true;
        Ok(())
    }

    /// Whether the chain lets `sealer` give `recipient` the key of `epoch`: the
    /// member who started the epoch, or one who invited them during it.
    pub fn may_seal(&self, recipient: UserId, epoch: Epoch, sealer: UserId) -> bool {
        self.epochs.get(&epoch).is_some_and(|s| s.sealer == sealer)
            || self.shared.contains(&(recipient, epoch, sealer))
    }

    /// Whether `key`, opened by `recipient` as `epoch`'s key sealed by `sealer`, is
    /// one to accept: the epoch exists, the sealer was authorized, and the key is
    /// the one the chain pins.
    pub fn check_key(
        &self,
        recipient: UserId,
        epoch: Epoch,
        sealer: UserId,
        key: &EpochKey,
    ) -> Result<(), KeyRefusal> {
        let start = self
            .epochs
            .get(&epoch)
            .ok_or(KeyRefusal::UnknownEpoch(epoch))?;
        if !self.may_seal(recipient, epoch, sealer) {
            return Err(KeyRefusal::UnauthorizedSealer(sealer));
        }
        if KeyCheck::of(self.room, epoch, key) != start.check {
            return Err(KeyRefusal::Mismatch(epoch));
        }
        Ok(())
    }

    /// The members other than `except`, as the chain has them (keys bound).
    pub fn others(&self, except: Option<UserId>) -> Vec<ChainMember> {
        self.members
            .iter()
            .filter(|(u, _)| Some(**u) != except)
            .map(|(_, m)| *m)
            .collect()
    }

    /// The link that would follow this chain, signed by `identity`.
    pub fn next_link(&self, identity: &Identity, change: Change) -> SignedLink {
        SignedLink::sign(
            identity,
            Link {
                room: self.room,
                prev: self.head,
                by: Signer::User(identity.user_id()),
                change,
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    use super::*;

    const HOME: NodeId = NodeId([1; 32]);

    struct Room {
        rng: ChaCha20Rng,
        owner: Identity,
        links: Vec<SignedLink>,
        state: ChainState,
        keys: BTreeMap<Epoch, EpochKey>,
    }

    impl Room {
        fn new(seed: u64) -> Self {
            let mut rng = ChaCha20Rng::seed_from_u64(seed);
            let owner = Identity::generate(&mut rng);
            let nonce = [7; 16];
            let room = RoomId::derive(owner.user_id(), HOME, nonce);
            let key = EpochKey::generate(&mut rng);
            let first = SignedLink::sign(
                &owner,
                Link {
                    room,
                    prev: ChainHash::GENESIS,
                    by: Signer::User(owner.user_id()),
                    change: Change::Create {
                        creator: owner.public(),
                        home: HOME,
                        nonce,
                        policy: Policy::default(),
                        check: KeyCheck::of(room, Epoch(1), &key),
                    },
                },
            );
            let state = ChainState::genesis(room, &first).expect("genesis");
            Room {
                rng,
                owner,
                links: vec![first],
                state,
                keys: BTreeMap::from([(Epoch(1), key)]),
            }
        }

        fn user(&mut self) -> Identity {
            Identity::generate(&mut self.rng)
        }

        /// `by` appends `change`; the state must take it.
        fn push(&mut self, by: &Identity, change: Change) {
            let link = self.state.next_link(by, change);
            self.state.apply(&link).expect("a valid link");
            self.links.push(link);
        }

        fn invite(&mut self, by: &Identity, who: &Identity, role: RoomRole) {
            let invitee = Invitee {
                user: who.public(),
                home: HOME,
                role,
            };
            let epoch = self.state.epoch;
            self.push(by, Change::Invite { invitee, epoch });
        }

        fn new_epoch(&mut self) -> (Epoch, KeyCheck) {
            let epoch = Epoch(self.state.epoch.0 + 1);
            let key = EpochKey::generate(&mut self.rng);
            let check = KeyCheck::of(self.state.room, epoch, &key);
            self.keys.insert(epoch, key);
            (epoch, check)
        }
    }

    #[test]
    fn a_chain_members_built_verifies_from_creation_to_the_same_state() {
        let mut r = Room::new(1);
        let (owner, admin, member) = (r.owner.clone(), r.user(), r.user());
        r.invite(&owner, &admin, RoomRole::Admin);
        r.invite(&admin, &member, RoomRole::Member);
        let (epoch, check) = r.new_epoch();
        let user = member.user_id();
        r.push(&admin, Change::Remove { user, epoch, check });
        let (epoch, check) = r.new_epoch();
        r.push(&admin, Change::Rekey { epoch, check });
        let verified = ChainState::verify(r.state.room, &r.links).expect("verifies");
        assert_eq!(verified, r.state);
        assert_eq!(verified.len, 5);
        assert_eq!(verified.epoch, Epoch(3));
        let members: Vec<UserId> = verified.members.keys().copied().collect();
        let mut expected = vec![owner.user_id(), admin.user_id()];
        expected.sort();
        assert_eq!(members, expected);
    }

    #[test]
    fn a_link_nobody_authorized_is_refused_and_changes_nothing() {
        let mut r = Room::new(2);
        let (owner, member, intruder) = (r.owner.clone(), r.user(), r.user());
        r.invite(&owner, &member, RoomRole::Member);
        let before = r.state.clone();
        let invite_self = |by: &Identity, prev| {
            let invitee = Invitee {
                user: by.public(),
                home: HOME,
                role: RoomRole::Admin,
            };
            SignedLink::sign(
                by,
                Link {
                    room: before.room,
                    prev,
                    by: Signer::User(by.user_id()),
                    change: Change::Invite {
                        invitee,
                        epoch: Epoch(1),
                    },
                },
            )
        };
        let cases = [
            // A non-member invites themselves.
            (invite_self(&intruder, before.head), "unauthorized"),
            // Not following the head.
            (invite_self(&owner, ChainHash([9; 32])), "broken_chain"),
            // A plain member may not invite.
            (
                before.next_link(
                    &member,
                    Change::Invite {
                        invitee: Invitee {
                            user: intruder.public(),
                            home: HOME,
                            role: RoomRole::Member,
                        },
                        epoch: Epoch(1),
                    },
                ),
                "unauthorized",
            ),
            // A node may only evict.
            (
                SignedLink::sign(
                    &intruder,
                    Link {
                        room: before.room,
                        prev: before.head,
                        by: Signer::Node(intruder.node_id()),
                        change: Change::Rekey {
                            epoch: Epoch(2),
                            check: KeyCheck([0; 32]),
                        },
                    },
                ),
                "unauthorized",
            ),
            // Skipping an epoch.
            (
                before.next_link(
                    &owner,
                    Change::Rekey {
                        epoch: Epoch(3),
                        check: KeyCheck([0; 32]),
                    },
                ),
                "bad_epoch",
            ),
        ];
        for (link, reason) in cases {
            let mut state = before.clone();
            let error = state.apply(&link).expect_err("refused");
            assert_eq!(error.reason(), reason, "{error}");
            assert_eq!(state, before, "a refused link changed the state");
        }
    }

    #[test]
    fn a_forged_or_misaddressed_link_is_refused() {
        let r = Room::new(9);
        let owner = r.owner.clone();
        let before = r.state.clone();
        let rekey = Change::Rekey {
            epoch: Epoch(2),
            check: KeyCheck([0; 32]),
        };
        // The owner's own link with its signature broken.
        let mut forged = before.next_link(&owner, rekey.clone());
        forged.link.change = Change::Rekey {
            epoch: Epoch(2),
            check: KeyCheck([1; 32]),
        };
        let mut state = before.clone();
        assert_eq!(state.apply(&forged), Err(ChainError::BadSignature));
        // Another room's link.
        let other = Room::new(3);
        let mut link = before.next_link(&owner, rekey);
        link.link.room = other.state.room;
        assert_eq!(state.apply(&link), Err(ChainError::WrongRoom));
        assert_eq!(state, before);
    }

    #[test]
    fn removal_rules_match_the_homes() {
        let mut r = Room::new(4);
        let (owner, admin, member) = (r.owner.clone(), r.user(), r.user());
        r.invite(&owner, &admin, RoomRole::Admin);
        r.invite(&owner, &member, RoomRole::Member);
        let (epoch, check) = r.new_epoch();
        let remove = |user: &Identity| Change::Remove {
            user: user.user_id(),
            epoch,
            check,
        };
        let mut state = r.state.clone();
        let by_member = state.next_link(&member, remove(&admin));
        assert_eq!(
            state.apply(&by_member).map_err(|e| e.reason()),
            Err("unauthorized")
        );
        let owner_by_admin = state.next_link(&admin, remove(&owner));
        assert_eq!(
            state.apply(&owner_by_admin).map_err(|e| e.reason()),
            Err("unauthorized")
        );
        // Anyone may leave.
        r.push(&member, remove(&member));
        assert!(!r.state.members.contains_key(&member.user_id()));
    }

    #[test]
    fn a_key_is_accepted_only_from_an_authorized_sealer_and_as_pinned() {
        let mut r = Room::new(5);
        let (owner, admin, late) = (r.owner.clone(), r.user(), r.user());
        r.invite(&owner, &admin, RoomRole::Admin);
        let (epoch, check) = r.new_epoch();
        r.push(&admin, Change::Rekey { epoch, check });
        r.invite(&admin, &late, RoomRole::Member);
        let s = &r.state;
        let key2 = r.keys[&Epoch(2)].clone();
        // The epoch's creator, to anyone; the inviter, to whom they invited.
        assert_eq!(
            s.check_key(owner.user_id(), Epoch(2), admin.user_id(), &key2),
            Ok(())
        );
        assert_eq!(
            s.check_key(late.user_id(), Epoch(2), admin.user_id(), &key2),
            Ok(())
        );
        assert_eq!(
            s.check_key(
                owner.user_id(),
                Epoch(1),
                owner.user_id(),
                &r.keys[&Epoch(1)]
            ),
            Ok(())
        );
        // The owner neither started epoch 2 nor invited anyone in it.
        assert_eq!(
            s.check_key(late.user_id(), Epoch(2), owner.user_id(), &key2)
                .map_err(|e| e.reason()),
            Err("unauthorized_sealer")
        );
        // An epoch the chain does not have, and a key it does not pin.
        let other = EpochKey::generate(&mut r.rng);
        assert_eq!(
            r.state
                .check_key(owner.user_id(), Epoch(3), admin.user_id(), &other)
                .map_err(|e| e.reason()),
            Err("unknown_epoch")
        );
        assert_eq!(
            r.state
                .check_key(owner.user_id(), Epoch(2), admin.user_id(), &other)
                .map_err(|e| e.reason()),
            Err("key_mismatch")
        );
    }

    #[test]
    fn only_the_home_evicts_and_only_on_the_users_node_word() {
        let mut r = Room::new(6);
        let owner = r.owner.clone();
        let member = r.user();
        r.invite(&owner, &member, RoomRole::Member);
        let home = r.user();
        let home_id = home.node_id();
        // The chain's home is HOME, whose secret this test does not hold: build a
        // room homed on `home` instead.
        let nonce = [3; 16];
        let room = RoomId::derive(owner.user_id(), home_id, nonce);
        let key = EpochKey::generate(&mut r.rng);
        let first = SignedLink::sign(
            &owner,
            Link {
                room,
                prev: ChainHash::GENESIS,
                by: Signer::User(owner.user_id()),
                change: Change::Create {
                    creator: owner.public(),
                    home: home_id,
                    nonce,
                    policy: Policy::default(),
                    check: KeyCheck::of(room, Epoch(1), &key),
                },
            },
        );
        let mut state = ChainState::genesis(room, &first).expect("genesis");
        // The member is homed on `user_node`.
        let user_node = r.user();
        let invitee = Invitee {
            user: member.public(),
            home: user_node.node_id(),
            role: RoomRole::Member,
        };
        let link = state.next_link(
            &owner,
            Change::Invite {
                invitee,
                epoch: Epoch(1),
            },
        );
        state.apply(&link).expect("invite");
        let evict = |signer: &Identity, attest_by: &Identity, state: &ChainState| {
            SignedLink::sign(
                signer,
                Link {
                    room,
                    prev: state.head,
                    by: Signer::Node(signer.node_id()),
                    change: Change::Evict {
                        user: member.user_id(),
                        attestation: attest_eviction(attest_by, room, member.user_id()),
                    },
                },
            )
        };
        let before = state.clone();
        // Not the home; the home without the user's node's word.
        for (signer, attester) in [(&user_node, &user_node), (&home, &home)] {
            assert!(state.apply(&evict(signer, attester, &state)).is_err());
            assert_eq!(state, before);
        }
        state
            .apply(&evict(&home, &user_node, &state))
            .expect("evicted");
        assert!(!state.members.contains_key(&member.user_id()));
        assert!(state.rekey_due);
        let link = state.next_link(
            &owner,
            Change::Rekey {
                epoch: Epoch(2),
                check: KeyCheck([0; 32]),
            },
        );
        state.apply(&link).expect("rekey");
        assert!(!state.rekey_due);
    }

    #[test]
    fn a_genesis_not_deriving_the_room_id_is_refused() {
        let r = Room::new(7);
        let other = Room::new(8);
        assert_eq!(
            ChainState::genesis(other.state.room, &r.links[0]).map_err(|e| e.reason()),
            Err("wrong_room")
        );
        let mut link = r.links[0].link.clone();
        link.room = other.state.room;
        let signed = SignedLink::sign(&r.owner, link);
        assert_eq!(
            ChainState::genesis(other.state.room, &signed).map_err(|e| e.reason()),
            Err("bad_genesis")
        );
    }
}

//! The domain: users, rooms, peers and outboxes as four actors over the tables of
//! [`state`].
//!
//! | actor | address | does |
//! |---|---|---|
//! | [`members::Members`] | `MEMBERS`, unit | the node's user registry; authorizes every request of a local user (default-deny) and forwards room requests to the room's home |
//! | [`room::Room`] | `ROOM`, room id | on the room's sequencer (its home): decides and applies membership changes and frames, rekeys; on member nodes: the local copy of the room's members, its keys for local users and its frames |
//! | [`peer::Peer`] | `PEER`, remote node | receives what a remote node's outbox sends: drops duplicates, hands the rest in order to local actors, acknowledges once they are applied |
//! | [`outbox::Outbox`] | `OUTBOX`, remote node | sends what is durably queued for a remote node, resends with backoff and jitter until acknowledged |
//!
//! # How state changes travel
//!
//! An actor that changes state and must tell another node writes the message into
//! that node's outbox ([`crate::outbox::enqueue`]) **in the same transaction** as its
//! own change, then kicks the outbox actor. So a crash can never keep the change and
//! lose the message, or the reverse. The receiving [`peer::Peer`] hands messages to
//! their target in order; every target is idempotent (a frame is stored once per
//! sequence number, a publish once per message id, a key once per (room, epoch,
//! user), and a membership snapshot older than the one applied is skipped), and the peer records its durable high-water mark and acknowledges only
//! after the target has committed. Delivery is therefore once and in order per
//! (origin, destination), across crashes of either side.
//!
//! Replies to clients are best effort: a room sends them straight to the caller's
//! gateway ([`ActorKind::GATEWAY`]). A lost reply leaves the caller with `queued`,
//! never with a wrong answer; the outcome itself is durable.
//!
//! Every actor here is stateless between messages except for delivery bookkeeping
//! (peer, outbox): what matters lives in the store, so activation after a crash is
//! just a read.

use core::time::Duration;

use serde::{Deserialize, Serialize};

use crate::actor::{ActorKey, ActorKind, ActorRef, Context, Handler, System};
use crate::crypto::{SealedKey, SignatureBytes};
use crate::identity::{Identity, PublicIdentity};
use crate::ids::{Epoch, MessageId, NodeId, RoomId, Seq, UserId};
use crate::wire::{MessageClass, WireMessage};
use chain::SignedLink;

pub mod chain;
pub mod client;
pub mod members;
pub mod outbox;
pub mod peer;
pub mod quota;
pub mod room;
pub mod state;

pub use members::{Members, MembersMsg};
pub use outbox::{Outbox, OutboxMsg};
pub use peer::{Peer, PeerMsg};
pub use room::{Room, RoomMsg};

/// The most members one room may have. Bounds every bundle and membership snapshot
/// (a bundle of this many sealed keys fits in one envelope with room to spare).
pub const ROOM_MEMBERS_MAX: usize = 1_000;

/// How far a request's issue time may be from the node's clock before it is refused
/// as [`Denial::Expired`]: bounds how long a captured request can be replayed.
pub const REQUEST_SKEW_MAX: Duration = Duration::from_secs(300);

/// A user's role in a node's registry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum UserRole {
    /// May add and revoke users.
    Admin,
    /// May create and join rooms.
    Member,
}

/// A user's status in a node's registry. Revoking flips it; nothing is deleted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum UserStatus {
    /// May act.
    Active,
    /// Every request is refused with [`Denial::Revoked`].
    Revoked,
}

/// A member's role in a room.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum RoomRole {
    /// The creator: cannot be removed by others.
    Owner,
    /// May invite and remove members.
    Admin,
    /// May publish and read.
    Member,
}

impl RoomRole {
    /// Whether this role may invite and remove members.
    pub fn manages_members(self) -> bool {
        matches!(self, RoomRole::Owner | RoomRole::Admin)
    }
}

/// What a new member may read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum History {
    /// Frames from the moment they joined.
    #[default]
    FromJoin,
    /// Every frame of the epoch current when they joined (they receive that epoch's
    /// key in any case).
    FromEpoch,
}

/// A room's policy. Every room is end-to-end encrypted and every frame signed: a
/// node never sees plaintext, and there is no switch to turn that off.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// Keep the room's frames as history (on the home and on every member node). If
    /// false, only the last [`room::EPHEMERAL_FRAMES_KEPT`] frames are kept, enough
    /// for live subscribers to catch up after a short disconnection.
    pub persist: bool,
    /// What a new member may read.
    pub history: History,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            persist: true,
            history: History::FromJoin,
        }
    }
}

/// Why a request was refused. Every refusal reaches the caller with one of these,
/// is logged, and is counted by [`Denial::reason`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Denial {
    /// The user, room or member named does not exist here.
    #[error("not found: {what}")]
    NotFound {
        /// What was looked up.
        what: String,
    },
    /// The acting user has been revoked.
    #[error("user is revoked")]
    Revoked,
    /// The acting user's role does not allow this.
    #[error("missing capability: {needed}")]
    MissingCapability {
        /// What would have been needed.
        needed: String,
    },
    /// The acting user is not a member of the room (or not homed where it claims).
    #[error("not a member of the room")]
    NotAMember,
    /// A signature (of the request, the frame or a sealed key) does not verify.
    #[error("bad signature")]
    BadSignature,
    /// The request was issued too far from the node's clock.
    #[error("request expired (issued too far from the node's clock)")]
    Expired,
    /// The frame is of another epoch than the room's current one.
    #[error("frame is of epoch {}, the room is at epoch {}", .got.0, .current.0)]
    StaleEpoch {
        /// The room's epoch.
        current: Epoch,
        /// The frame's.
        got: Epoch,
    },
    /// A frame with this message id was already committed, at `seq`.
    #[error("duplicate message, committed at seq {}", .seq.0)]
    Duplicate {
        /// Where the original was committed.
        seq: Seq,
    },
    /// The thing to create exists already; nothing was changed.
    #[error("conflict: {what}")]
    Conflict {
        /// What exists.
        what: String,
    },
    /// A key bundle is not exactly the next epoch sealed to exactly the members.
    #[error("bad key bundle: {problem}")]
    BadBundle {
        /// What is wrong with it.
        problem: String,
    },
    /// The request is malformed (for example a frame naming another room).
    #[error("malformed request: {problem}")]
    Malformed {
        /// What is wrong with it.
        problem: String,
    },
    /// The outbox towards a node the request must reach is full: retry later.
    #[error("outbox towards {node} is full: retry later")]
    OutboxFull {
        /// The destination.
        node: NodeId,
    },
    /// The room has [`ROOM_MEMBERS_MAX`] members.
    #[error("room is full ({ROOM_MEMBERS_MAX} members)")]
    RoomFull,
    /// A per-user limit is reached (for example open connections): retry later.
    #[error("limit reached: {what}")]
    Limit {
        /// Which limit.
        what: String,
    },
    /// The change does not follow the room's membership chain as its home holds
    /// it (someone changed the room first): read the chain again and retry.
    #[error("the room's membership chain has moved on (it holds {len} links)")]
    StaleChain {
        /// How many links the home's chain holds.
        len: u64,
    },
    /// The room must move to a new epoch before it takes more frames: a member was
    /// evicted, or the epoch carried [`DomainConfig::epoch_frames_max`] frames.
    /// Any member may rekey ([`Op::Rekey`]); clients do it and publish again.
    #[error("the room needs a new epoch key first")]
    RekeyNeeded,
    /// The node's storage failed; nothing was changed.
    #[error("storage error")]
    Storage,
    /// The node's store reaches into the reserve it keeps for acknowledgements
    /// and deletes: it takes no new frames or rooms until space is freed.
    #[error("the node's store is full ({used_bytes} of {max_bytes} bytes used): retry later")]
    StoreFull {
        /// Bytes the store's data takes.
        used_bytes: u64,
        /// Its bound.
        max_bytes: u64,
    },
    /// No quorum of the replicas that must agree is reachable (no leader is
    /// known): nothing was sequenced; retry later or through another node.
    #[error("no quorum: retry later or through another node")]
    NoQuorum,
}

impl Denial {
    /// The reason as a short label (for logs and the `reason` metric label).
    pub fn reason(&self) -> &'static str {
        match self {
            Denial::NotFound { .. } => "not_found",
            Denial::Revoked => "revoked",
            Denial::MissingCapability { .. } => "missing_capability",
            Denial::NotAMember => "not_a_member",
            Denial::BadSignature => "bad_signature",
            Denial::Expired => "expired",
            Denial::StaleEpoch { .. } => "stale_epoch",
            Denial::Duplicate { .. } => "duplicate",
            Denial::Conflict { .. } => "conflict",
            Denial::BadBundle { .. } => "bad_bundle",
            Denial::Malformed { .. } => "malformed",
            Denial::OutboxFull { .. } => "outbox_full",
            Denial::RoomFull => "room_full",
            Denial::Limit { .. } => "limit",
            Denial::StaleChain { .. } => "stale_chain",
            Denial::RekeyNeeded => "rekey_needed",
            Denial::Storage => "storage",
            Denial::StoreFull { .. } => "store_full",
            Denial::NoQuorum => "no_quorum",
        }
    }

    pub(crate) fn not_found(what: impl Into<String>) -> Self {
        Denial::NotFound { what: what.into() }
    }

    pub(crate) fn missing(needed: impl Into<String>) -> Self {
        Denial::MissingCapability {
            needed: needed.into(),
        }
    }

    pub(crate) fn bundle(problem: impl Into<String>) -> Self {
        Denial::BadBundle {
            problem: problem.into(),
        }
    }

    pub(crate) fn malformed(problem: impl Into<String>) -> Self {
        Denial::Malformed {
            problem: problem.into(),
        }
    }
}

impl From<conclave_storage::StoreError> for Denial {
    fn from(error: conclave_storage::StoreError) -> Self {
        tracing::error!(%error, "storage error; request refused");
        Denial::Storage
    }
}

/// One member of a room as the room records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomMember {
    /// The user.
    pub user: UserId,
    /// Their X25519 key, to which epoch keys are sealed.
    pub exchange: [u8; 32],
    /// The user's signature binding `exchange` to them (see
    /// [`PublicIdentity::check`]): clients seal only to keys it binds.
    pub binding: SignatureBytes,
    /// The node the user is homed on.
    pub home: NodeId,
    /// Their role.
    pub role: RoomRole,
    /// The first sequence number they may read.
    pub since: Seq,
}

/// Someone to invite: who, where they are homed, and in what role.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Invitee {
    /// Their public identity (the X25519 half is what keys are sealed to).
    pub user: PublicIdentity,
    /// The node they are homed on.
    pub home: NodeId,
    /// Their role in the room.
    pub role: RoomRole,
}

/// What a user asks for. Signed as a [`SignedRequest`]; publishing is separate
/// ([`MembersMsg::Publish`]) because a frame carries its own signature.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// Register a user on this node (admins only).
    AddUser {
        /// The new user.
        user: PublicIdentity,
        /// Their role.
        role: UserRole,
    },
    /// Revoke a user of this node (admins only).
    RevokeUser {
        /// Whom.
        user: UserId,
    },
    /// List this node's users (admins only).
    ListUsers,
    /// Create a room homed on this node, with its first epoch key sealed to the
    /// creator. The link is the room's first ([`chain::Change::Create`]): its id is
    /// derived from it and checked by every node.
    CreateRoom {
        /// The creation, signed by the creator.
        link: SignedLink,
        /// Epoch 1's key, sealed by and to the creator.
        key: SealedKey,
    },
    /// Add a member (owners and admins), with the current epoch key sealed to them
    /// ([`chain::Change::Invite`]).
    Invite {
        /// The invitation, signed by the inviter, following the room's chain head.
        link: SignedLink,
        /// The current epoch's key, sealed by the inviter to the invitee.
        key: SealedKey,
    },
    /// Remove a member (owners and admins; anyone may remove themselves) and move
    /// the room to the next epoch, whose key is sealed to every remaining member
    /// ([`chain::Change::Remove`]).
    Remove {
        /// The removal, signed by the remover, following the room's chain head.
        link: SignedLink,
        /// The next epoch's key, sealed by the remover to each remaining member.
        bundle: Vec<(UserId, SealedKey)>,
    },
    /// Move the room to the next epoch with the same members (any member;
    /// [`chain::Change::Rekey`]): after an eviction, or when the epoch has carried
    /// [`DomainConfig::epoch_frames_max`] frames.
    Rekey {
        /// The rekey, signed by the member, following the room's chain head.
        link: SignedLink,
        /// The next epoch's key, sealed by the member to every member.
        bundle: Vec<(UserId, SealedKey)>,
    },
    /// The room's home, policy, epoch and members (members only).
    RoomInfo {
        /// The room.
        room: RoomId,
    },
    /// A page of the rooms the acting user belongs to (as this node knows them),
    /// after `after` in room id order.
    ListRooms {
        /// Where the page starts: after this room (`None`: the first page).
        after: Option<RoomId>,
    },
}

impl Op {
    /// The chain link the request would append, for membership changes.
    pub fn link(&self) -> Option<&SignedLink> {
        match self {
            Op::CreateRoom { link, .. }
            | Op::Invite { link, .. }
            | Op::Remove { link, .. }
            | Op::Rekey { link, .. } => Some(link),
            _ => None,
        }
    }

    /// The room the request is about, for requests its home must handle.
    pub fn room(&self) -> Option<RoomId> {
        match self {
            Op::CreateRoom { link, .. }
            | Op::Invite { link, .. }
            | Op::Remove { link, .. }
            | Op::Rekey { link, .. } => Some(link.link.room),
            Op::RoomInfo { room } => Some(*room),
            Op::AddUser { .. } | Op::RevokeUser { .. } | Op::ListUsers | Op::ListRooms { .. } => {
                None
            }
        }
    }
}

/// A request as signed: who, when, a nonce (so two identical requests differ) and what.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// The acting user.
    pub user: UserId,
    /// When the client issued it (checked against [`REQUEST_SKEW_MAX`]).
    pub issued: crate::actor::Time,
    /// Random, chosen by the client.
    pub nonce: u64,
    /// What is asked.
    pub op: Op,
}

/// A request and its user's Ed25519 signature over
/// `b"conclave/request/v1" ‖ postcard(request)`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedRequest {
    /// The request.
    pub request: Request,
    /// The acting user's signature.
    pub signature: SignatureBytes,
}

const REQUEST_SIG_TAG: &[u8] = b"conclave/request/v1";

impl SignedRequest {
    fn signed_bytes(request: &Request) -> Option<Vec<u8>> {
        let mut out = REQUEST_SIG_TAG.to_vec();
        postcard::to_io(request, &mut out).ok()?;
        Some(out)
    }

    /// Signs `request` as `identity` (who must be `request.user`).
    pub fn sign(identity: &Identity, request: Request) -> Self {
        // Encoding an in-memory request cannot fail; an empty message would only
        // make the signature fail to verify, never pass.
        let bytes = Self::signed_bytes(&request).unwrap_or_default();
        let signature = SignatureBytes::sign(identity.signing_key(), &bytes);
        Self { request, signature }
    }

    /// Checks the signature against `request.user`.
    pub fn verify(&self) -> Result<(), Denial> {
        let bytes = Self::signed_bytes(&self.request).ok_or(Denial::BadSignature)?;
        crate::crypto::verify_signature(self.request.user.as_bytes(), &bytes, &self.signature)
            .map_err(|_| Denial::BadSignature)
    }
}

/// Where a reply goes: a gateway and the caller's request number there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplyTo {
    /// The gateway ([`ActorKind::GATEWAY`]) on the caller's node.
    pub to: ActorRef,
    /// The caller's request number.
    pub request: u64,
}

/// What a user asked that a room's home decides, as the user knows it: a request
/// by its nonce, a frame by its message id. With the user and the room it names the
/// outcome their node records when the home answers late
/// ([`state::outcomes`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Asked {
    /// A signed request ([`Request::nonce`]).
    Request {
        /// The request's nonce.
        nonce: u64,
    },
    /// A frame.
    Frame {
        /// Its message id.
        id: MessageId,
    },
}

impl core::fmt::Display for Asked {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Asked::Request { nonce } => write!(f, "request {nonce}"),
            Asked::Frame { id } => write!(f, "message {id}"),
        }
    }
}

/// A registry entry, as listed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserEntry {
    /// The user's public identity.
    pub user: PublicIdentity,
    /// Their role.
    pub role: UserRole,
    /// Their status.
    pub status: UserStatus,
}

/// A room as its home describes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomInfo {
    /// The room.
    pub room: RoomId,
    /// Its home node.
    pub home: NodeId,
    /// Its policy.
    pub policy: Policy,
    /// Its current epoch.
    pub epoch: Epoch,
    /// The sequence number the next frame will get.
    pub next_seq: Seq,
    /// How many links its membership chain holds (clients verify the chain
    /// itself; this says how far to read it).
    pub chain_len: u64,
    /// Its members (as the home says: clients take members from the chain).
    pub members: Vec<RoomMember>,
}

/// The answer to a request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Done; nothing to return.
    Done,
    /// The request went into the durable outbox towards the room's home (which is
    /// not this node); its outcome follows when the home has handled it.
    Forwarded,
    /// A frame was committed at `seq`.
    Committed {
        /// The frame's message id.
        id: MessageId,
        /// Its sequence number.
        seq: Seq,
    },
    /// The node's users.
    Users(Vec<UserEntry>),
    /// A page of the acting user's rooms and their homes.
    Rooms {
        /// The rooms, in room id order.
        rooms: Vec<(RoomId, NodeId)>,
        /// Where the next page starts (`None`: this was the last).
        next: Option<RoomId>,
    },
    /// A room.
    Room(RoomInfo),
    /// Refused.
    Denied(Denial),
    /// A proposal was committed in Raft group `group` at `index` (and applied
    /// on the node that answers).
    Appended {
        /// The group.
        group: u64,
        /// The log index.
        index: u64,
    },
}

/// What actors tell a gateway.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum ClientMsg {
    /// The outcome of request `request`.
    Reply {
        /// The caller's request number.
        request: u64,
        /// The outcome.
        outcome: Outcome,
    },
    /// Something in `room` changed on this node (a frame, a key or the members):
    /// subscribers read the store again.
    Changed {
        /// The room.
        room: RoomId,
    },
    /// This node applied entries of its shard groups to their rooms (from its
    /// replicas actor only, once per turn): subscribers of the rooms that
    /// changed read the store again.
    Applied {
        /// Each entry, in the order applied.
        entries: Vec<AppliedEntry>,
    },
    /// `user` was revoked: their open connections are closed.
    Revoked {
        /// The user.
        user: UserId,
    },
    /// This node leads Raft group `group` in `term` (counted; the simulator
    /// checks that no two nodes lead one group in one term).
    Leading {
        /// The group.
        group: u64,
        /// The term.
        term: u64,
    },
    /// What this node's replicas hold now (from its replicas actor only).
    Replication(crate::replication::ReplicationStatus),
}

/// One entry of a shard group as a replica applied it to its room.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedEntry {
    /// The shard group.
    pub group: u64,
    /// The entry's index in the group's log.
    pub index: u64,
    /// The room.
    pub room: RoomId,
    /// What was decided.
    pub outcome: Outcome,
    /// Whether the room changed (a refusal, or a frame applied before, did not).
    pub changed: bool,
}

/// What travels through an outbox: the messages that change state on another node.
/// Deliberately not recursive, so decoding it is bounded. Everything goes to rooms
/// (requests and frames to a room's sequencer, updates to its member nodes), so one
/// room's messages stay in order while different rooms' are independent.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Deliverable {
    /// To a room.
    Room(RoomMsg),
}

impl From<Deliverable> for Msg {
    fn from(d: Deliverable) -> Self {
        match d {
            Deliverable::Room(m) => Msg::Room(m),
        }
    }
}

impl Deliverable {
    /// Consecutive messages for one target, handed over as one run.
    pub(crate) fn run(msgs: Vec<Deliverable>) -> Msg {
        Msg::Room(RoomMsg::Run(
            msgs.into_iter().map(|Deliverable::Room(m)| m).collect(),
        ))
    }

    /// Whether this message may be addressed to `to` (its kind matches, and it is
    /// one that travels: a room's idle timer never does).
    fn fits(&self, to: &ActorRef) -> bool {
        match (self, to.key) {
            (Deliverable::Room(RoomMsg::Tick | RoomMsg::Revoked { .. } | RoomMsg::Run(_)), _) => {
                false
            }
            (Deliverable::Room(_), ActorKey::Room(_)) => to.kind == ActorKind::ROOM,
            _ => false,
        }
    }
}

/// One outbox entry: the target actor on the destination node and the message.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Routed {
    /// The target actor.
    pub to: ActorRef,
    /// The message.
    pub msg: Deliverable,
}

crate::message_union! {
    /// Every message of the domain.
    #[derive(Debug, Serialize, Deserialize)]
    pub enum Msg {
        Members(MembersMsg),
        Room(RoomMsg),
        Peer(PeerMsg),
        Outbox(OutboxMsg),
        Client(ClientMsg),
        Replicas(crate::replication::ReplicasMsg),
    }
}

impl WireMessage for Msg {
    fn class(&self) -> MessageClass {
        match self {
            // Everything an outbox sends shares one stream, so it arrives in order.
            Msg::Peer(PeerMsg::Deliver { .. }) => MessageClass::Data,
            _ => MessageClass::Control,
        }
    }
}

/// Timing of the domain's retries and passivation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DomainConfig {
    /// The first resend delay of an outbox.
    pub retry_base: Duration,
    /// The longest resend delay.
    pub retry_max: Duration,
    /// How long a room, peer or outbox stays active without messages.
    pub idle: Duration,
    /// How many frames one epoch key may encrypt: past it the room's home takes no
    /// frame until a member rekeys ([`Denial::RekeyNeeded`]). Frames use random
    /// 96-bit nonces, so the bound keeps the chance of a nonce repeating under one
    /// key negligible.
    pub epoch_frames_max: u64,
    /// What one user may publish per second through their node (refused with
    /// [`Denial::Limit`] past it).
    pub publish_quota: quota::PublishQuota,
    /// How many frames of history one page to a new member node holds (at most
    /// [`state::rooms::BACKFILL_PAGE_FRAMES`]; the simulator draws small pages so
    /// that catching up takes many).
    pub history_page_frames: usize,
    /// How the cluster's Raft groups are laid out; `None`: no replication (the
    /// replicas actor is not started). Needs [`Domain::nodes`] and the
    /// `replication` feature.
    pub replication: Option<crate::replication::Replication>,
}

/// An outbox's first resend delay, by default.
pub const RETRY_DELAY_MS_MIN: u64 = 200;
/// An outbox's longest resend delay, by default.
pub const RETRY_DELAY_MS_MAX: u64 = 5_000;
/// How long a room, peer or outbox stays active without messages, by default.
pub const IDLE_MS: u64 = 30_000;
/// How many frames one epoch key encrypts, by default: 2^24. With random 96-bit
/// nonces the chance that two frames of one epoch share a nonce is then below
/// 2^-48 (n^2 / 2^97).
pub const EPOCH_FRAMES_MAX: u64 = 1 << 24;

impl Default for DomainConfig {
    fn default() -> Self {
        Self {
            retry_base: Duration::from_millis(RETRY_DELAY_MS_MIN),
            retry_max: Duration::from_millis(RETRY_DELAY_MS_MAX),
            idle: Duration::from_millis(IDLE_MS),
            epoch_frames_max: EPOCH_FRAMES_MAX,
            publish_quota: quota::PublishQuota::default(),
            history_page_frames: state::rooms::BACKFILL_PAGE_FRAMES,
            replication: None,
        }
    }
}

/// The domain's actors, for either driver.
#[derive(Clone, Debug, Default)]
pub struct Domain {
    /// Timing.
    pub config: DomainConfig,
    /// The nodes of the cluster (this one's known peers), when the driver knows
    /// them: an invite naming a home outside it is refused, so that a member cannot
    /// make a room queue messages for nodes that will never take them. `None`
    /// accepts any home.
    pub nodes: Option<std::sync::Arc<std::collections::BTreeSet<NodeId>>>,
    /// The identities of the nodes this driver hosts (one for a node process, all
    /// of them in the simulator): a node signs evictions of its revoked users and,
    /// as a room's home, the chain links that record them. Without its identity a
    /// node cannot evict (revocation still refuses the user everything).
    pub identities: std::sync::Arc<std::collections::BTreeMap<NodeId, Identity>>,
}

impl Domain {
    /// The domain with `config`, accepting invitees homed anywhere.
    pub fn new(config: DomainConfig) -> Self {
        Self {
            config,
            nodes: None,
            identities: Default::default(),
        }
    }

    /// Lets the node of `identity` sign evictions (see [`Domain::identities`]).
    pub fn with_identity(mut self, identity: Identity) -> Self {
        std::sync::Arc::make_mut(&mut self.identities).insert(identity.node_id(), identity);
        self
    }

    /// Limits invitees' homes to `nodes` (and this node).
    pub fn with_nodes(mut self, nodes: impl IntoIterator<Item = NodeId>) -> Self {
        self.nodes = Some(std::sync::Arc::new(nodes.into_iter().collect()));
        self
    }

    /// Activates the domain actor at `addr`, or `None` if there is none there
    /// (drivers that host more kinds, like the gateway, call this for the rest).
    pub fn activate<S>(
        &self,
        addr: &ActorRef,
        cx: &mut Context<'_, S>,
    ) -> Option<Box<dyn Handler<S>>>
    where
        S: System<Msg = Msg>,
    {
        match (addr.kind, addr.key) {
            (ActorKind::MEMBERS, ActorKey::Unit) => {
                let quota = self.config.publish_quota;
                Some(Box::new(Members::activate(quota, self.sharding(), cx)))
            }
            (ActorKind::ROOM, ActorKey::Room(room)) => Some(Box::new(Room::activate(
                room,
                self.config,
                self.nodes.clone(),
                self.identities.get(&addr.node).cloned(),
                self.sharding(),
                cx,
            ))),
            (ActorKind::PEER, ActorKey::Node(remote)) if remote != addr.node => {
                Some(Box::new(Peer::activate(remote, self.config, cx)))
            }
            (ActorKind::OUTBOX, ActorKey::Node(dest)) if dest != addr.node => {
                Some(Box::new(Outbox::activate(dest, self.config, cx)))
            }
            #[cfg(feature = "replication")]
            (ActorKind::REPLICAS, ActorKey::Unit) => {
                let config = self.config.replication?;
                let nodes = self.cluster()?;
                let signer = self.identities.get(&addr.node).cloned();
                let rooms =
                    crate::replication::host::Rooms::new(&self.config, self.sharding(), signer);
                let replicas =
                    crate::replication::host::Replicas::activate(config, nodes, rooms, cx)?;
                Some(Box::new(replicas))
            }
            _ => None,
        }
    }

    /// The messages a driver sends when node `node` starts: [`boot`]'s, and the
    /// first tick of its replicas actor when replication is on (each tick
    /// schedules the next, so there is one clock per run).
    pub fn boot(
        &self,
        node: NodeId,
        store: &dyn conclave_storage::Store,
    ) -> Result<Vec<(ActorRef, Msg)>, conclave_storage::StoreError> {
        let mut out = boot(node, store)?;
        if self.config.replication.is_some() && cfg!(feature = "replication") {
            let replicas = ActorRef::new(node, ActorKind::REPLICAS, ActorKey::Unit);
            out.push((
                replicas,
                Msg::Replicas(crate::replication::ReplicasMsg::Tick),
            ));
        }
        Ok(out)
    }

    /// Marks every Raft group `node` replicates as rejoining: its store is new,
    /// but the node (its identity) was in the cluster before, and may have voted
    /// or held entries it no longer remembers (see
    /// [`crate::replication::host`]). The driver calls it before the node's first
    /// start on such a store.
    #[cfg(feature = "replication")]
    pub fn rejoin(
        &self,
        node: NodeId,
        store: &dyn conclave_storage::Store,
    ) -> Result<(), crate::replication::LogError> {
        let (Some(config), Some(nodes)) = (self.config.replication, self.cluster()) else {
            return Ok(());
        };
        let mut txn = store.write()?;
        crate::replication::log::begin_rejoin(&mut *txn, config.groups_of(&nodes, node))?;
        Ok(txn.commit()?)
    }

    /// Where rooms are sequenced when they are on shard groups (`None`: each
    /// by its home).
    pub fn sharding(&self) -> Option<room::shard::Sharding> {
        let layout = self.config.replication.filter(|r| r.rooms)?;
        Some(room::shard::Sharding {
            layout,
            nodes: self.cluster()?,
        })
    }

    /// The whole cluster, sorted: the known nodes and this one (`None` when the
    /// nodes are not known).
    pub fn cluster(&self) -> Option<std::sync::Arc<[NodeId]>> {
        let nodes = self.nodes.as_ref()?;
        let all: std::collections::BTreeSet<NodeId> = nodes
            .iter()
            .chain(self.identities.keys())
            .copied()
            .collect();
        Some(all.into_iter().collect())
    }
}

impl Domain {
    /// Which local actors another node may address (see
    /// [`System::accepts_remote`]): a node's outbox talks to the peer actor that
    /// stands for it here, that peer acknowledges to the outbox towards it, and room
    /// homes (their rooms, or their replicas actors) answer callers' gateways. Everything else (members, rooms, and
    /// the timers and transport events of peers and outboxes) is only reached
    /// locally, through the peer's in-order hand-off.
    pub fn accepts_remote(&self, from: &ActorRef, to: &ActorRef) -> bool {
        match (from.kind, to.kind) {
            (ActorKind::OUTBOX, ActorKind::PEER) | (ActorKind::PEER, ActorKind::OUTBOX) => {
                to.key == ActorKey::Node(from.node) && from.key == ActorKey::Node(to.node)
            }
            // A room's home answers the callers of requests it decided; with
            // rooms on shard groups, its replicas actor does, once applied.
            (ActorKind::ROOM | ActorKind::REPLICAS, ActorKind::GATEWAY) => to.key == ActorKey::Unit,
            (ActorKind::REPLICAS, ActorKind::REPLICAS) => {
                from.key == ActorKey::Unit && to.key == ActorKey::Unit
            }
            _ => false,
        }
    }
}

impl System for Domain {
    type Msg = Msg;

    fn activate(
        &self,
        addr: &ActorRef,
        cx: &mut Context<'_, Self>,
    ) -> Option<Box<dyn Handler<Self>>> {
        Domain::activate(self, addr, cx)
    }

    fn accepts_remote(&self, from: &ActorRef, to: &ActorRef) -> bool {
        Domain::accepts_remote(self, from, to)
    }
}

/// Records `incarnation` (drawn at random by the driver) as the run of the node
/// that starts now, before any of its actors runs: every stream of messages this
/// node sends starts afresh (see [`crate::outbox`]).
pub fn begin_run(
    store: &dyn conclave_storage::Store,
    incarnation: u64,
) -> Result<(), conclave_storage::StoreError> {
    let mut txn = store.write()?;
    crate::outbox::start_incarnation(&mut *txn, incarnation)?;
    txn.commit()
}

/// The messages a driver sends when a node starts (after [`begin_run`]): every
/// outbox with messages waiting is kicked, so that what was queued before a crash is sent again; and
/// every room still listing a revoked user of this node is told again (a crash may
/// have cut a revocation's evictions short; see [`RoomMsg::Revoked`]).
pub fn boot(
    node: NodeId,
    store: &dyn conclave_storage::Store,
) -> Result<Vec<(ActorRef, Msg)>, conclave_storage::StoreError> {
    let txn = store.read()?;
    let pending = crate::outbox::pending_destinations(&*txn)?;
    let mut out: Vec<(ActorRef, Msg)> = pending
        .into_iter()
        .map(|dest| (outbox_of(node, dest), Msg::Outbox(OutboxMsg::Kick)))
        .collect();
    let revoked = state::registry::list(&*txn)?
        .into_iter()
        .filter(|u| u.status == UserStatus::Revoked);
    for entry in revoked {
        let user = UserId(entry.user.signing);
        for (room, _) in state::rooms::rooms_of(&*txn, user)? {
            out.push((room_of(node, room), Msg::Room(RoomMsg::Revoked { user })));
        }
    }
    Ok(out)
}

/// The address of a node's members actor.
pub fn members_of(node: NodeId) -> ActorRef {
    ActorRef::new(node, ActorKind::MEMBERS, ActorKey::Unit)
}

/// The address of `room` on `node`.
pub fn room_of(node: NodeId, room: RoomId) -> ActorRef {
    ActorRef::new(node, ActorKind::ROOM, ActorKey::Room(room))
}

/// The address, on `node`, of the peer actor for `remote`.
pub fn peer_of(node: NodeId, remote: NodeId) -> ActorRef {
    ActorRef::new(node, ActorKind::PEER, ActorKey::Node(remote))
}

/// The address, on `node`, of the outbox towards `dest`.
pub fn outbox_of(node: NodeId, dest: NodeId) -> ActorRef {
    ActorRef::new(node, ActorKind::OUTBOX, ActorKey::Node(dest))
}

/// The address of a node's gateway hub (notifications, and replies by request number).
pub fn gateway_of(node: NodeId) -> ActorRef {
    ActorRef::new(node, ActorKind::GATEWAY, ActorKey::Unit)
}

/// The node a message came from: for messages a [`Peer`] hands over, the remote
/// node it speaks for; for local senders (and injected messages), this node.
/// `None` for a remote actor that addressed a domain actor directly, bypassing the
/// outbox: that is not part of the protocol and is refused.
pub(crate) fn origin<S: System>(cx: &Context<'_, S>) -> Option<NodeId> {
    match cx.sender() {
        None => Some(cx.node()),
        Some(s) if s.node != cx.node() => None,
        Some(s) => match (s.kind, s.key) {
            (ActorKind::PEER, ActorKey::Node(remote)) => Some(remote),
            _ => Some(cx.node()),
        },
    }
}

/// Tells the peer that handed over the current message whether it has been
/// applied (committed, or refused for good: `done`) or must be offered again (the
/// store failed). Targets call this last, for every message.
pub(crate) fn applied<S: System<Msg = Msg>>(cx: &mut Context<'_, S>, done: bool) {
    if let Some(peer) = local_peer(cx) {
        cx.send(peer, PeerMsg::Applied { done });
    }
}

/// The sender of the current message if it is one of this node's peer actors
/// (which hand over what other nodes' outboxes deliver).
pub(crate) fn local_peer<S: System>(cx: &Context<'_, S>) -> Option<ActorRef> {
    cx.sender()
        .copied()
        .filter(|s| s.kind == ActorKind::PEER && s.node == cx.node())
}

/// Refuses new work (a frame, a room, a member) once the store reaches into the
/// reserve it keeps for what frees space or finishes accepted work
/// ([`conclave_storage::Usage::full`]).
pub(crate) fn room_for_more(store: &dyn conclave_storage::Store) -> Result<(), Denial> {
    match store.usage()? {
        Some(usage) if usage.full() => Err(Denial::StoreFull {
            used_bytes: usage.used_bytes,
            max_bytes: usage.max_bytes,
        }),
        _ => Ok(()),
    }
}

/// Logs and counts a refusal, and returns it as an outcome.
pub fn denied(actor: &'static str, user: Option<UserId>, denial: Denial) -> Outcome {
    tracing::info!(actor, ?user, reason = denial.reason(), %denial, "request denied");
    metrics::counter!("conclave_requests_denied_total", "reason" => denial.reason()).increment(1);
    Outcome::Denied(denial)
}

/// Sends `outcome` to `reply`, if the gateway it names is on the node the request
/// came from (a remote cannot make this node message a third party).
pub(crate) fn reply<S: System<Msg = Msg>>(
    cx: &mut Context<'_, S>,
    from: NodeId,
    reply: ReplyTo,
    outcome: Outcome,
) {
    if reply.to.kind == ActorKind::GATEWAY && reply.to.node == from {
        cx.send(
            reply.to,
            ClientMsg::Reply {
                request: reply.request,
                outcome,
            },
        );
    } else {
        tracing::warn!(to = ?reply.to, "reply address is not a gateway on the requesting node; reply dropped");
    }
}

/// [`enqueue`] for what a shard's replicas decided already (a committed entry
/// applied on the room's home): it cannot be refused for a full outbox, since
/// the others applied it, so it takes no room's share and may use the
/// outbox's reserve ([`crate::outbox::OUTBOX_CONTROL_RESERVE`]). Past that too
/// the home's turn fails and is tried again, holding the shard's entries on
/// the home until the destination drains.
pub(crate) fn enqueue_decided(
    txn: &mut dyn conclave_storage::WriteTxn,
    to: ActorRef,
    msg: Deliverable,
) -> Result<(), Denial> {
    let routed = Routed { to, msg };
    let bytes = crate::wire::encode_bounded(&routed, crate::wire::ENVELOPE_BYTES_MAX / 2)
        .map_err(|e| Denial::malformed(format!("message does not fit an envelope: {e}")))?;
    match crate::outbox::enqueue_control(txn, to.node, bytes) {
        Ok(_) => Ok(()),
        Err(crate::outbox::OutboxError::Store(e)) => Err(e.into()),
        Err(
            crate::outbox::OutboxError::Full { dest, .. }
            | crate::outbox::OutboxError::ShareFull { dest, .. },
        ) => Err(Denial::OutboxFull { node: dest }),
        Err(e) => Err(Denial::malformed(e.to_string())),
    }
}

/// Queues `msg` for `to` (on another node) in `txn`. Nothing is sent until the
/// caller commits and kicks the outbox.
pub(crate) fn enqueue(
    txn: &mut dyn conclave_storage::WriteTxn,
    to: ActorRef,
    msg: Deliverable,
) -> Result<(), Denial> {
    // A member node's request for the next page of a room's history lets the
    // home drain what it holds for this node: it takes no room's share and may
    // use the outbox's control reserve.
    let control = matches!(msg, Deliverable::Room(RoomMsg::MoreHistory { .. }));
    let routed = Routed { to, msg };
    let bytes = crate::wire::encode_bounded(&routed, crate::wire::ENVELOPE_BYTES_MAX / 2)
        .map_err(|e| Denial::malformed(format!("message does not fit an envelope: {e}")))?;
    // Every room gets at most its share of the outbox all rooms share.
    let tag = match to.key {
        ActorKey::Room(room) => Some(room.0),
        _ => None,
    };
    let queued = if control {
        crate::outbox::enqueue_control(txn, to.node, bytes)
    } else {
        crate::outbox::enqueue_tagged(txn, to.node, tag, bytes)
    };
    match queued {
        Ok(_) => Ok(()),
        Err(
            crate::outbox::OutboxError::Full { dest, .. }
            | crate::outbox::OutboxError::ShareFull { dest, .. },
        ) => Err(Denial::OutboxFull { node: dest }),
        Err(crate::outbox::OutboxError::Store(e)) => Err(e.into()),
        Err(
            e @ (crate::outbox::OutboxError::AckBeyondSent { .. }
            | crate::outbox::OutboxError::NoIncarnation),
        ) => Err(Denial::malformed(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outbox_messages_share_one_stream_and_replies_are_control() {
        let deliver = Msg::Peer(PeerMsg::Deliver {
            seq: Seq(1),
            stream: crate::outbox::Stream {
                incarnation: 1,
                first: Seq(1),
            },
            to: room_of(NodeId([1; 32]), RoomId([0; 16])),
            msg: Deliverable::Room(RoomMsg::Update(room::Update::Keys {
                epoch: Epoch(1),
                keys: Vec::new(),
            })),
        });
        assert_eq!(deliver.class(), MessageClass::Data);
        let ack = Msg::Outbox(OutboxMsg::Ack {
            upto: Seq(1),
            incarnation: 1,
        });
        assert_eq!(ack.class(), MessageClass::Control);
    }

    #[test]
    fn other_nodes_reach_only_peers_outboxes_and_gateways() {
        let (a, b) = (NodeId([1; 32]), NodeId([2; 32]));
        let d = Domain::default();
        // B's outbox towards A delivers to A's peer actor for B, which acknowledges.
        assert!(d.accepts_remote(&outbox_of(b, a), &peer_of(a, b)));
        assert!(d.accepts_remote(&peer_of(b, a), &outbox_of(a, b)));
        // Not to the peer actor standing for a third node, nor from another kind.
        assert!(!d.accepts_remote(&outbox_of(b, a), &peer_of(a, NodeId([3; 32]))));
        assert!(!d.accepts_remote(&room_of(b, RoomId([0; 16])), &peer_of(a, b)));
        // Rooms answer gateways; nobody remote reaches members or rooms.
        assert!(d.accepts_remote(&room_of(b, RoomId([0; 16])), &gateway_of(a)));
        assert!(!d.accepts_remote(&peer_of(b, a), &gateway_of(a)));
        assert!(!d.accepts_remote(&peer_of(b, a), &members_of(a)));
        assert!(!d.accepts_remote(&peer_of(b, a), &room_of(a, RoomId([0; 16]))));
    }

    #[test]
    fn a_deliverable_fits_only_its_kind() {
        let node = NodeId([1; 32]);
        let keys = Deliverable::Room(RoomMsg::Update(room::Update::Keys {
            epoch: Epoch(1),
            keys: Vec::new(),
        }));
        assert!(keys.fits(&room_of(node, RoomId([0; 16]))));
        assert!(!keys.fits(&members_of(node)));
        assert!(!keys.fits(&peer_of(node, NodeId([2; 32]))));
        // A room's idle timer is its own: it never travels.
        let tick = Deliverable::Room(RoomMsg::Tick);
        assert!(!tick.fits(&room_of(node, RoomId([0; 16]))));
        // Nor does a run: only this node's peer makes them.
        let run = Deliverable::Room(RoomMsg::Run(Vec::new()));
        assert!(!run.fits(&room_of(node, RoomId([0; 16]))));
    }

    #[test]
    fn one_room_fills_only_its_share_of_an_outbox_and_other_rooms_still_queue() {
        use conclave_storage::Store;
        let store = conclave_storage::MemStore::new();
        let (home, busy, quiet) = (NodeId([1; 32]), RoomId([1; 16]), RoomId([2; 16]));
        let msg = || Deliverable::Room(RoomMsg::Tick);
        let mut txn = store.write().unwrap();
        for _ in 0..crate::outbox::OUTBOX_TAG_DEPTH_MAX {
            enqueue(&mut *txn, room_of(home, busy), msg()).unwrap();
        }
        assert_eq!(
            enqueue(&mut *txn, room_of(home, busy), msg()),
            Err(Denial::OutboxFull { node: home })
        );
        enqueue(&mut *txn, room_of(home, quiet), msg()).expect("another room's share");
    }
}

//! Acting as a user: the same operations whether the user's node runs in this
//! process ([`crate::Node`]) or is reached over the client protocol
//! ([`crate::RemoteNode`]).
//!
//! Everything secret happens here, in the user's process: epoch keys are created
//! and sealed to members, requests and frames are signed, frames are encrypted and
//! decrypted. A [`Backend`] only carries signed requests, sealed keys and
//! ciphertext.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use conclave_actors::crypto::{EpochKey, Frame, SealedKey};
use conclave_actors::domain::chain::{ChainState, SignedLink};
use conclave_actors::domain::{
    client, Asked, Denial, Invitee, Op, Outcome, Policy, RoomInfo, RoomRole, SignedRequest,
    UserEntry, UserRole,
};
use conclave_actors::ids::{Epoch, MessageId, NodeId, RoomId, Seq, UserId};
use conclave_actors::{Identity, PublicIdentity};
use conclave_storage::StoreError;
use getrandom::SysRng;
use rand_core::UnwrapErr;
use serde::{Deserialize, Serialize};

use crate::host::{wall_now, RouteError};

/// Why a user's call failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The node refused: the reason says why (`not_found`, `revoked`,
    /// `missing_capability`, `not_a_member`, `bad_signature`, `stale_epoch`, …).
    #[error("denied ({reason}): {denial}", reason = .0.reason(), denial = .0)]
    Denied(Denial),
    /// The request is in the durable outbox towards the room's home node, which has
    /// not answered yet (it may be unreachable). It will be decided when it is back;
    /// [`User::outcome`] then tells what was decided.
    #[error(
        "queued for the room's home node, which has not answered yet ({asked} of room {room})"
    )]
    Queued {
        /// The room.
        room: RoomId,
        /// The request, as [`User::outcome`] asks for it.
        asked: Asked,
    },
    /// No answer within the request timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The node is shutting down, or its runtime refused the request.
    #[error("the node refused the request: {0}")]
    Route(#[from] RouteError),
    /// The node's store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// This user holds no key for the room (not a member, or the key has not
    /// arrived yet).
    #[error("no key for room {0}")]
    NoKey(RoomId),
    /// A key or frame could not be sealed or opened.
    #[error("cryptography failed: {0}")]
    Crypto(String),
    /// The node answered something this call does not expect (a bug).
    #[error("unexpected answer: {0:?}")]
    Unexpected(Box<Outcome>),
    /// The connection to a remote node failed or broke.
    #[error("connection to the node failed: {0}")]
    Connection(String),
    /// The node served something that does not verify against the room's
    /// membership chain (a link no member signed, a key from a sealer the chain
    /// does not authorize, …) or a frame out of sequence: it was refused, logged and counted in
    /// `conclave_client_refusals_total{reason}`. The client keeps what it verified
    /// before. `reason` is a [`conclave_actors::domain::chain::ChainError::reason`]
    /// or a [`conclave_actors::domain::chain::KeyRefusal::reason`], or
    /// `bad_sequence`.
    #[error("refused what the node served ({reason}): {detail}")]
    Untrusted {
        /// Why, as a metric label (`bad_signature`, `unauthorized`, `broken_chain`,
        /// `bad_genesis`, `unknown_epoch`, `unauthorized_sealer`, `key_mismatch`,
        /// `bad_sequence`, …).
        reason: &'static str,
        /// What exactly.
        detail: String,
    },
    /// The user's node holds no membership chain of the room (the user is not a
    /// member, or the chain has not reached their node yet).
    #[error("no membership chain of room {0} on this node")]
    NoChain(RoomId),
}

/// Where a subscription starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Position {
    /// The first frame the user may read (history, then live).
    Start,
    /// The frame with this sequence number (or the first readable after it).
    At(Seq),
    /// Only frames committed from now on.
    Live,
}

/// The result of a publish.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Receipt {
    /// The room's sequencer has persisted the frame at `seq`: its home, or
    /// with rooms on shard groups a majority of its shard's replicas.
    Committed {
        /// The message id.
        id: MessageId,
        /// Its place in the room.
        seq: Seq,
    },
    /// The frame is durably queued for the room's home (or owed to its shard
    /// group), which has not confirmed yet (unreachable, slow, or without a
    /// leader for now); it commits when it is back.
    Queued {
        /// The message id.
        id: MessageId,
    },
}

/// One message as a subscriber reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// Its place in the room.
    pub seq: Seq,
    /// Its id.
    pub id: MessageId,
    /// Who sent it (verified).
    pub sender: UserId,
    /// The key epoch it was encrypted under.
    pub epoch: Epoch,
    /// The plaintext.
    pub body: Vec<u8>,
}

/// What a [`User`] acts through: [`crate::Node`] (a node in this process) or
/// [`crate::RemoteNode`] (a node over the client protocol). Sealed: what travels
/// between a user and their node (signed requests, sealed keys, ciphertext) is
/// internal, so that the wire types can change without breaking embedders.
pub trait Backend: sealed::Carrier {}

impl<T: sealed::Carrier> Backend for T {}

pub(crate) mod sealed {
    //! The operations behind [`super::Backend`], visible to this crate only.
    use super::*;

    /// What a [`User`] needs from the node it is homed on.
    pub trait Carrier: Clone + Send + Sync + 'static {
        /// A stream of a room's frames.
        type Frames: FrameSource;

        /// The node's id.
        fn node_id(&self) -> NodeId;

        /// Hands a signed request to the node; `Ok(None)` if it is queued for the
        /// room's home and not answered yet.
        fn call(
            &self,
            req: SignedRequest,
        ) -> impl Future<Output = Result<Option<Outcome>, ApiError>> + Send;

        /// Hands a sealed, signed frame to the node; `Ok(None)` as for `call`.
        fn publish(
            &self,
            frame: Frame,
        ) -> impl Future<Output = Result<Option<Outcome>, ApiError>> + Send;

        /// Up to [`super::CHAIN_LINKS_PER_CALL_MAX`] links of `room`'s membership
        /// chain from index `from` on, as the node holds them (for a user of the
        /// node who is or was a member). The client verifies them.
        fn chain(
            &self,
            user: UserId,
            room: RoomId,
            from: u64,
        ) -> impl Future<Output = Result<Vec<SignedLink>, ApiError>> + Send;

        /// A page of the keys of `room` the node holds sealed to `user`: the
        /// epochs after `after`, ascending (a page shorter than
        /// [`conclave_actors::domain::state::keys::SEALED_KEYS_PAGE_MAX`] is the
        /// last).
        fn sealed_keys(
            &self,
            user: UserId,
            room: RoomId,
            after: Epoch,
        ) -> impl Future<Output = Result<Vec<(Epoch, SealedKey)>, ApiError>> + Send;

        /// What the node knows became of `asked` by `user` in `room` (see
        /// [`super::User::outcome`]).
        fn outcome(
            &self,
            user: UserId,
            room: RoomId,
            asked: Asked,
        ) -> impl Future<Output = Result<Option<Outcome>, ApiError>> + Send;

        /// The frames of `room` that `user` may read, from `from` on: history, then
        /// live.
        fn frames(
            &self,
            user: UserId,
            room: RoomId,
            from: Position,
        ) -> impl Future<Output = Result<Self::Frames, ApiError>> + Send;
    }
}

/// A stream of `(seq, frame)`; `None` once the user may read no more (removed).
pub trait FrameSource: Send + 'static {
    /// The next frame, waiting for one if needed.
    fn next(&mut self) -> impl Future<Output = Option<Result<(Seq, Frame), ApiError>>> + Send;
}

/// How long a publish or invite waits for a key that has not reached the user's
/// node yet (after an invite or a rekey).
const KEY_WAIT_MAX: Duration = Duration::from_secs(10);

/// The most chain links a node returns per request for a room's chain (the same page
/// as a room's home sends its member nodes, so it fits one message).
pub const CHAIN_LINKS_PER_CALL_MAX: usize = conclave_actors::domain::room::CHAIN_PAGE_LINKS;

/// The most calls one chain sync makes: enough for the longest chain a room may
/// hold, so a node that keeps serving links cannot keep a client busy forever.
/// The most pages of rooms [`User::list_rooms`] asks for: a million memberships.
const ROOM_PAGES_MAX: usize = 1 << 20 >> 12;

/// The most pages of sealed keys read for one room: as many epochs as a chain can
/// hold.
const KEY_PAGES_MAX: u64 = conclave_actors::domain::chain::CHAIN_LINKS_MAX
    / conclave_actors::domain::state::keys::SEALED_KEYS_PAGE_MAX as u64
    + 1;

const CHAIN_SYNC_CALLS_MAX: u64 =
    conclave_actors::domain::chain::CHAIN_LINKS_MAX / CHAIN_LINKS_PER_CALL_MAX as u64 + 1;

/// How many times a membership change is signed again on a chain read again after
/// the home said someone changed the room first ([`Denial::StaleChain`]).
const STALE_CHAIN_RETRIES_MAX: u32 = 5;

/// The first pause before such a retry (doubling each time): the user's node may
/// not hold the home's newest link yet.
const STALE_CHAIN_RETRY_MS_MIN: u64 = 50;

/// How many times a publish rekeys the room and tries again when the home asks
/// for a new epoch ([`Denial::RekeyNeeded`]).
const REKEY_RETRIES_MAX: u32 = 3;

/// How many refusals a client remembers as reported, so that a lie its node serves
/// on every read is logged and counted once (past it, the memory starts over).
const REFUSALS_REPORTED_MAX: usize = 4_096;

/// What a client verified itself, per room: the chain, and the refusals it reported.
#[derive(Default)]
struct Trust {
    /// The verified chain of each room, up to its last good link.
    chains: BTreeMap<RoomId, ChainState>,
    /// (room, link index or epoch, reason) of each refusal already reported.
    reported: BTreeSet<(RoomId, u64, &'static str)>,
}

/// A user acting through a node. Cheap to clone.
pub struct User<B: Backend = crate::Node> {
    backend: B,
    identity: Arc<Identity>,
    /// Opened epoch keys, per room: only keys the verified chain accepts.
    keys: Arc<Mutex<BTreeMap<RoomId, BTreeMap<Epoch, EpochKey>>>>,
    /// The verified chains.
    trust: Arc<Mutex<Trust>>,
}

impl<B: Backend> Clone for User<B> {
    fn clone(&self) -> Self {
        Self {
            backend: self.backend.clone(),
            identity: Arc::clone(&self.identity),
            keys: Arc::clone(&self.keys),
            trust: Arc::clone(&self.trust),
        }
    }
}

impl<B: Backend> std::fmt::Debug for User<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("User")
            .field("id", &self.identity.user_id())
            .field("node", &self.backend.node_id())
            .finish_non_exhaustive()
    }
}

/// OS entropy, as the client's random source.
fn rng() -> UnwrapErr<SysRng> {
    UnwrapErr(SysRng)
}

fn crypto(e: impl std::fmt::Display) -> ApiError {
    ApiError::Crypto(e.to_string())
}

impl<B: Backend> User<B> {
    /// `identity` acting through `backend`.
    pub fn new(backend: B, identity: Identity) -> Self {
        Self {
            backend,
            identity: Arc::new(identity),
            keys: Arc::new(Mutex::new(BTreeMap::new())),
            trust: Arc::new(Mutex::new(Trust::default())),
        }
    }

    /// The user's id.
    pub fn id(&self) -> UserId {
        self.identity.user_id()
    }

    /// The user's public identity (what others invite).
    pub fn public(&self) -> PublicIdentity {
        self.identity.public()
    }

    /// The user's identity (secret: handle with care).
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The node the user acts through.
    pub fn node(&self) -> &B {
        &self.backend
    }

    async fn call(&self, op: Op) -> Result<Outcome, ApiError> {
        let req = client::sign(&self.identity, wall_now(), &mut rng(), op);
        let (room, nonce) = (req.request.op.room(), req.request.nonce);
        match (self.backend.call(req).await?, room) {
            (Some(Outcome::Denied(denial)), _) => Err(ApiError::Denied(denial)),
            (Some(outcome), _) => Ok(outcome),
            (None, Some(room)) => Err(ApiError::Queued {
                room,
                asked: Asked::Request { nonce },
            }),
            // Only a room's requests travel to another node.
            (None, None) => Err(ApiError::Unexpected(Box::new(Outcome::Forwarded))),
        }
    }

    async fn call_done(&self, op: Op) -> Result<(), ApiError> {
        match self.call(op).await? {
            Outcome::Done => Ok(()),
            other => Err(ApiError::Unexpected(Box::new(other))),
        }
    }

    /// Registers a user on this node (admins only).
    pub async fn add_user(&self, user: &PublicIdentity, role: UserRole) -> Result<(), ApiError> {
        self.call_done(Op::AddUser { user: *user, role }).await
    }

    /// Revokes a user of this node (admins only).
    pub async fn revoke_user(&self, user: UserId) -> Result<(), ApiError> {
        self.call_done(Op::RevokeUser { user }).await
    }

    /// This node's users (admins only).
    pub async fn list_users(&self) -> Result<Vec<UserEntry>, ApiError> {
        match self.call(Op::ListUsers).await? {
            Outcome::Users(users) => Ok(users),
            other => Err(ApiError::Unexpected(Box::new(other))),
        }
    }

    /// The rooms this user is a member of, with their home nodes (asked page by
    /// page, each at most [`conclave_actors::domain::state::rooms::ROOMS_PAGE_MAX`]
    /// memberships).
    pub async fn list_rooms(&self) -> Result<Vec<(RoomId, NodeId)>, ApiError> {
        let mut all: Vec<(RoomId, NodeId)> = Vec::new();
        let mut after = None;
        for _ in 0..ROOM_PAGES_MAX {
            let (rooms, next) = match self.call(Op::ListRooms { after }).await? {
                Outcome::Rooms { rooms, next } => (rooms, next),
                other => return Err(ApiError::Unexpected(Box::new(other))),
            };
            // Pages move forward, in order: a node that does otherwise would have
            // the client list rooms twice, or loop.
            let floor = after.or(all.last().map(|(room, _)| *room));
            let ordered = rooms.windows(2).all(|w| w[0].0 < w[1].0)
                && rooms
                    .first()
                    .is_none_or(|(r, _)| floor.is_none_or(|f| *r > f))
                && next.is_none_or(|n| rooms.last().is_none_or(|(r, _)| n >= *r))
                && next.is_none_or(|n| after.is_none_or(|a| n > a));
            if !ordered {
                return Err(ApiError::Connection(
                    "the node's room pages go backwards".into(),
                ));
            }
            all.extend(rooms);
            match next {
                Some(next) => after = Some(next),
                None => return Ok(all),
            }
        }
        Err(ApiError::Connection(format!(
            "the node sent more than {ROOM_PAGES_MAX} pages of rooms"
        )))
    }

    /// Creates a room homed on this user's node, with this user as its owner.
    pub async fn create_room(&self, policy: Policy) -> Result<RoomId, ApiError> {
        let (room, key, op) =
            client::create_room(&mut rng(), &self.identity, self.backend.node_id(), policy)
                .map_err(crypto)?;
        // Our own creation: verified like any link, it starts the room's chain here.
        let genesis = op
            .link()
            .map(|link| ChainState::genesis(room, link))
            .transpose()
            .map_err(crypto)?;
        self.call_done(op).await?;
        if let Some(genesis) = genesis {
            self.keep_chain(genesis);
        }
        self.lock_keys()
            .entry(room)
            .or_default()
            .insert(Epoch(1), key);
        Ok(room)
    }

    /// Invites `invitee`, homed on `home`, sealing the room's current key to them.
    /// The invitation follows the room's chain as this client verified it; if the
    /// home's chain has moved on, it is read again and signed again.
    pub async fn invite(
        &self,
        room: RoomId,
        invitee: &PublicIdentity,
        home: NodeId,
        role: RoomRole,
    ) -> Result<(), ApiError> {
        let invitee = Invitee {
            user: *invitee,
            home,
            role,
        };
        let mut attempt = 0;
        loop {
            let chain = self.await_chain(room).await?;
            let key = self.await_epoch_key(room, chain.epoch).await?;
            let op = client::invite(&mut rng(), &self.identity, &chain, &key, invitee)
                .map_err(crypto)?;
            match self.call_done(op).await {
                Err(ApiError::Denied(Denial::StaleChain { .. }))
                    if attempt < STALE_CHAIN_RETRIES_MAX =>
                {
                    stale_chain_pause(attempt).await;
                    attempt += 1;
                }
                done => return done,
            }
        }
    }

    /// The room as its home describes it (members only). This is the home's
    /// unverified say: for who is in the room, trust [`User::members`].
    pub async fn room_info(&self, room: RoomId) -> Result<RoomInfo, ApiError> {
        match self.call(Op::RoomInfo { room }).await? {
            Outcome::Room(info) => Ok(info),
            other => Err(ApiError::Unexpected(Box::new(other))),
        }
    }

    /// The room's members as its membership chain says, verified by this client
    /// from the room's creation: `(user, role, home node)`. This is the list to
    /// trust; [`User::room_info`] is only what the room's home says.
    pub async fn members(&self, room: RoomId) -> Result<Vec<(UserId, RoomRole, NodeId)>, ApiError> {
        let chain = self.await_chain(room).await?;
        Ok(chain
            .members
            .iter()
            .map(|(user, m)| (*user, m.role, m.home))
            .collect())
    }

    /// The epochs of `room` whose keys this client holds: only keys its verified
    /// chain accepts (the epoch exists, the sealer was authorized, the key is the
    /// one the chain pins).
    pub async fn key_epochs(&self, room: RoomId) -> Result<Vec<Epoch>, ApiError> {
        self.refresh_keys(room).await?;
        Ok(self
            .lock_keys()
            .get(&room)
            .map(|keys| keys.keys().copied().collect())
            .unwrap_or_default())
    }

    /// Removes `user` from the room and moves it to a new epoch whose key is
    /// sealed to every remaining member the verified chain lists (never to a
    /// member list a node supplied): from then on the room accepts only frames of
    /// the new epoch, and the removed member receives nothing of it.
    pub async fn remove(&self, room: RoomId, user: UserId) -> Result<(), ApiError> {
        let mut attempt = 0;
        loop {
            let chain = self.await_chain(room).await?;
            let (key, op) =
                client::remove(&mut rng(), &self.identity, &chain, user).map_err(crypto)?;
            match self.call_done(op).await {
                Ok(()) => {
                    if user != self.id() {
                        self.keep_key(room, Epoch(chain.epoch.0 + 1), key);
                    }
                    return Ok(());
                }
                Err(ApiError::Denied(Denial::StaleChain { .. }))
                    if attempt < STALE_CHAIN_RETRIES_MAX =>
                {
                    stale_chain_pause(attempt).await;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Moves the room to a new epoch with the same members: a fresh key sealed to
    /// every member the verified chain lists. Returns the new epoch. (A publish
    /// does this by itself when the room's home asks for it.)
    pub async fn rekey(&self, room: RoomId) -> Result<Epoch, ApiError> {
        let mut attempt = 0;
        loop {
            match self.rekey_once(room).await {
                Err(ApiError::Denied(Denial::StaleChain { .. }))
                    if attempt < STALE_CHAIN_RETRIES_MAX =>
                {
                    stale_chain_pause(attempt).await;
                    attempt += 1;
                }
                done => return done,
            }
        }
    }

    async fn rekey_once(&self, room: RoomId) -> Result<Epoch, ApiError> {
        let chain = self.await_chain(room).await?;
        let (key, op) = client::rekey(&mut rng(), &self.identity, &chain).map_err(crypto)?;
        let epoch = Epoch(chain.epoch.0 + 1);
        self.call_done(op).await?;
        self.keep_key(room, epoch, key);
        Ok(epoch)
    }

    /// Encrypts, signs and publishes `body` to `room`. Returns once the room's home
    /// has committed it, or once it is durably queued for an unreachable home.
    /// When the home asks for a new epoch first (a member was evicted, or the
    /// epoch carried its most frames), this rekeys the room and publishes again.
    pub async fn publish(&self, room: RoomId, body: &[u8]) -> Result<Receipt, ApiError> {
        let mut stale_retries = 0;
        let mut rekeys = 0;
        // The newest key held is used as is (reading the node's keys and chain
        // would cost two more round trips per message); the home says when the
        // room has moved on, and then they are read again.
        let mut reread = false;
        loop {
            let (epoch, key) = match self.cached_newest(room) {
                Some(newest) if !reread => newest,
                _ => self.await_key(room).await?,
            };
            let frame = client::seal(
                &mut rng(),
                &self.identity,
                room,
                epoch,
                &key,
                wall_now(),
                body,
            )
            .map_err(crypto)?;
            let id = frame.id;
            match self.backend.publish(frame).await? {
                Some(Outcome::Committed { id, seq }) => return Ok(Receipt::Committed { id, seq }),
                // This very frame was committed before (a resend after a crash of
                // the home answered late): that is its receipt.
                Some(Outcome::Denied(Denial::Duplicate { seq })) => {
                    return Ok(Receipt::Committed { id, seq })
                }
                Some(Outcome::Denied(Denial::StaleEpoch { current, .. }))
                    if stale_retries < 20 && current > epoch =>
                {
                    // The room was rekeyed and the new key is on its way to this
                    // user's node: wait for it, then seal again.
                    stale_retries += 1;
                    reread = true;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Some(Outcome::Denied(Denial::RekeyNeeded)) if rekeys < REKEY_RETRIES_MAX => {
                    rekeys += 1;
                    self.rekey_for_publish(room).await?;
                }
                Some(Outcome::Denied(denial)) => return Err(ApiError::Denied(denial)),
                Some(other) => return Err(ApiError::Unexpected(Box::new(other))),
                None => return Ok(Receipt::Queued { id }),
            }
        }
    }

    /// What became of something this user asked that was queued for the room's
    /// home ([`Receipt::Queued`], [`ApiError::Queued`]), as their node knows it:
    /// [`Outcome::Committed`] for a frame the home sequenced, [`Outcome::Done`] for
    /// a membership change it applied, [`Outcome::Denied`] with the home's reason
    /// for either one it refused. `None`: not decided yet (the home may be
    /// unreachable), or not known to the node. The node keeps the last
    /// [`conclave_actors::domain::state::outcomes::LATE_OUTCOMES_PER_ROOM_MAX`]
    /// refusals and request outcomes per user and room.
    pub async fn outcome(&self, room: RoomId, asked: Asked) -> Result<Option<Outcome>, ApiError> {
        self.backend.outcome(self.id(), room, asked).await
    }

    /// The rekey a publish makes when the home asks for one.
    async fn rekey_for_publish(&self, room: RoomId) -> Result<(), ApiError> {
        match self.rekey_once(room).await {
            Ok(_) => Ok(()),
            // Someone changed the room first, most likely another member rekeying
            // for the same reason: take their key and publish again.
            Err(ApiError::Denied(Denial::StaleChain { .. })) => {
                tokio::time::sleep(Duration::from_millis(STALE_CHAIN_RETRY_MS_MIN)).await;
                self.refresh_keys(room).await
            }
            Err(e) => Err(e),
        }
    }

    /// The room's messages this user may read from `from` on: history, then live
    /// as they arrive. The stream ends if the user is removed from the room (after
    /// the last message they may read).
    ///
    /// Membership reaches a member's node shortly after the invite commits on the
    /// room's home; until it has, this waits (up to the request timeout) and then
    /// refuses with [`Denial::NotAMember`].
    pub async fn subscribe(
        &self,
        room: RoomId,
        from: Position,
    ) -> Result<Subscription<B>, ApiError> {
        let frames = self.backend.frames(self.id(), room, from).await?;
        Ok(Subscription {
            user: self.clone(),
            room,
            frames,
            next: match from {
                Position::At(seq) => seq,
                _ => Seq(0),
            },
        })
    }

    fn lock_keys(&self) -> std::sync::MutexGuard<'_, BTreeMap<RoomId, BTreeMap<Epoch, EpochKey>>> {
        self.keys.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lock_trust(&self) -> std::sync::MutexGuard<'_, Trust> {
        self.trust.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn keep_key(&self, room: RoomId, epoch: Epoch, key: EpochKey) {
        self.lock_keys().entry(room).or_default().insert(epoch, key);
    }

    /// Keeps `chain` as the room's verified chain unless a longer one is kept
    /// already (another call of this user's may have verified further).
    fn keep_chain(&self, chain: ChainState) {
        assert!(chain.len >= 1, "a verified chain starts with the creation");
        let mut trust = self.lock_trust();
        let kept = trust
            .chains
            .entry(chain.room)
            .or_insert_with(|| chain.clone());
        if chain.len > kept.len {
            *kept = chain;
        }
    }

    fn verified_chain(&self, room: RoomId) -> Option<ChainState> {
        self.lock_trust().chains.get(&room).cloned()
    }

    /// Logs and counts a refusal of what the node served, once per (room, link
    /// index or epoch, reason): a lie served on every read is reported once.
    fn report(&self, room: RoomId, at: u64, reason: &'static str, detail: &str) {
        let mut trust = self.lock_trust();
        if trust.reported.len() >= REFUSALS_REPORTED_MAX {
            trust.reported.clear();
        }
        if trust.reported.insert((room, at, reason)) {
            tracing::warn!(
                user = %self.identity.user_id(),
                node = %self.backend.node_id(),
                ?room,
                at,
                reason,
                detail,
                "refused what the node served: it does not verify"
            );
            metrics::counter!("conclave_client_refusals_total", "reason" => reason).increment(1);
        }
    }

    /// Reads the links of `room`'s chain past the verified head from the node and
    /// verifies them. `Ok(None)` if the node holds no chain of the room yet. A link
    /// that does not verify is refused ([`ApiError::Untrusted`]), and the verified
    /// chain stays at its last good link.
    async fn sync_chain(&self, room: RoomId) -> Result<Option<ChainState>, ApiError> {
        for _ in 0..CHAIN_SYNC_CALLS_MAX {
            let verified = self.verified_chain(room);
            let from = verified.as_ref().map_or(0, |c| c.len);
            let mut page = self.backend.chain(self.id(), room, from).await?;
            // A node answering more than a page is cut to a page.
            page.truncate(CHAIN_LINKS_PER_CALL_MAX);
            let full = page.len() == CHAIN_LINKS_PER_CALL_MAX;
            let (extended, refused) = extend_chain(room, verified, from, &page);
            if let Some(chain) = &extended {
                self.keep_chain(chain.clone());
            }
            if let Some((at, reason, detail)) = refused {
                self.report(room, at, reason, &detail);
                return Err(ApiError::Untrusted { reason, detail });
            }
            if !full {
                return Ok(extended);
            }
        }
        Ok(self.verified_chain(room))
    }

    /// The verified chain of `room`, read up to the node's head, waiting (up to
    /// [`KEY_WAIT_MAX`]) for the first links to reach this user's node.
    async fn await_chain(&self, room: RoomId) -> Result<ChainState, ApiError> {
        let deadline = tokio::time::Instant::now() + KEY_WAIT_MAX;
        loop {
            if let Some(chain) = self.sync_chain(room).await? {
                return Ok(chain);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ApiError::NoChain(room));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Opens whatever keys of `room` the node holds for this user that are not
    /// cached yet, and keeps those the verified chain accepts. Each refused key is
    /// logged and counted by its reason, and never kept.
    async fn refresh_keys(&self, room: RoomId) -> Result<(), ApiError> {
        // The keys first, then the chain: a member node stores a change's link
        // before its keys (both come from the home in order), so every key read
        // here has its link in the chain read after it. The other way round an
        // honest key arriving between the two reads would be refused.
        let sealed = self.sealed_keys(room).await?;
        let chain = match self.sync_chain(room).await {
            Ok(Some(chain)) => chain,
            Ok(None) => return Ok(()),
            // A link the node added is refused (and reported); keys are still
            // judged by the chain as far as it verified.
            Err(refused @ ApiError::Untrusted { .. }) => {
                self.verified_chain(room).ok_or(refused)?
            }
            Err(e) => return Err(e),
        };
        let missing: Vec<_> = {
            let cache = self.lock_keys();
            let known = cache.get(&room);
            sealed
                .into_iter()
                .filter(|(epoch, _)| !known.is_some_and(|k| k.contains_key(epoch)))
                .collect()
        };
        let (accepted, refused) = client::accept_keys(&self.identity, &chain, &missing);
        for (epoch, refusal) in refused {
            self.report(room, epoch.0, refusal.reason(), &refusal.to_string());
        }
        debug_assert!(accepted.keys().all(|e| chain.epochs.contains_key(e)));
        self.lock_keys().entry(room).or_default().extend(accepted);
        Ok(())
    }

    /// Every key of `room` the node holds sealed to this user, page by page (each
    /// page after the last, ascending, or the node is not believed).
    async fn sealed_keys(&self, room: RoomId) -> Result<Vec<(Epoch, SealedKey)>, ApiError> {
        use conclave_actors::domain::state::keys::SEALED_KEYS_PAGE_MAX;
        let mut all: Vec<(Epoch, SealedKey)> = Vec::new();
        for _ in 0..KEY_PAGES_MAX {
            let after = all.last().map_or(Epoch(0), |(epoch, _)| *epoch);
            let page = self.backend.sealed_keys(self.id(), room, after).await?;
            let ordered = page.windows(2).all(|w| w[0].0 < w[1].0)
                && page.first().is_none_or(|(epoch, _)| *epoch > after)
                && page.len() <= SEALED_KEYS_PAGE_MAX;
            if !ordered {
                return Err(ApiError::Connection(
                    "the node's pages of sealed keys are out of order".into(),
                ));
            }
            let last = page.len() < SEALED_KEYS_PAGE_MAX;
            all.extend(page);
            if last {
                return Ok(all);
            }
        }
        Err(ApiError::Connection(
            "the node sent more pages of sealed keys than a room has epochs".into(),
        ))
    }

    fn cached_newest(&self, room: RoomId) -> Option<(Epoch, EpochKey)> {
        self.lock_keys()
            .get(&room)
            .and_then(|keys| keys.iter().next_back())
            .map(|(e, k)| (*e, k.clone()))
    }

    /// The newest key of `room`, waiting (up to [`KEY_WAIT_MAX`]) for one to reach
    /// this user's node: after an invite, it arrives shortly after the invite
    /// commits on the room's home.
    async fn await_key(&self, room: RoomId) -> Result<(Epoch, EpochKey), ApiError> {
        let deadline = tokio::time::Instant::now() + KEY_WAIT_MAX;
        loop {
            match self.refresh_keys(room).await {
                Ok(()) => {}
                // Just invited: the membership has not reached this user's node yet.
                Err(ApiError::Denied(Denial::NotAMember))
                    if tokio::time::Instant::now() < deadline => {}
                Err(error) => return Err(error),
            }
            if let Some(found) = self.cached_newest(room) {
                return Ok(found);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ApiError::NoKey(room));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The key of `room` at `epoch`, waiting (up to [`KEY_WAIT_MAX`]) for it.
    async fn await_epoch_key(&self, room: RoomId, epoch: Epoch) -> Result<EpochKey, ApiError> {
        let deadline = tokio::time::Instant::now() + KEY_WAIT_MAX;
        loop {
            match self.key_for(room, epoch).await {
                Ok(Some(key)) => return Ok(key),
                Ok(None) => {}
                // The membership has not reached this user's node yet.
                Err(ApiError::Denied(Denial::NotAMember))
                    if tokio::time::Instant::now() < deadline => {}
                Err(error) => return Err(error),
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ApiError::NoKey(room));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn key_for(&self, room: RoomId, epoch: Epoch) -> Result<Option<EpochKey>, ApiError> {
        if let Some(key) = self.lock_keys().get(&room).and_then(|k| k.get(&epoch)) {
            return Ok(Some(key.clone()));
        }
        self.refresh_keys(room).await?;
        Ok(self
            .lock_keys()
            .get(&room)
            .and_then(|k| k.get(&epoch))
            .cloned())
    }
}

/// Waits before the `attempt`-th retry after [`Denial::StaleChain`].
async fn stale_chain_pause(attempt: u32) {
    debug_assert!(attempt < STALE_CHAIN_RETRIES_MAX);
    tokio::time::sleep(Duration::from_millis(STALE_CHAIN_RETRY_MS_MIN << attempt)).await;
}

/// `verified` (the chain up to index `from`) extended by `page`, the links from
/// `from` on: the chain as far as it verifies, and the first refused link's index,
/// reason and detail, if any.
fn extend_chain(
    room: RoomId,
    verified: Option<ChainState>,
    from: u64,
    page: &[SignedLink],
) -> (Option<ChainState>, Option<(u64, &'static str, String)>) {
    debug_assert_eq!(verified.as_ref().map_or(0, |c| c.len), from);
    let mut chain = verified;
    for (index, link) in (from..).zip(page) {
        // On error neither changes anything: the chain stays as verified.
        let step = match chain.as_mut() {
            Some(verified) => verified.apply(link),
            None => match ChainState::genesis(room, link) {
                Ok(genesis) => {
                    chain = Some(genesis);
                    Ok(())
                }
                Err(error) => Err(error),
            },
        };
        if let Err(error) = step {
            return (chain, Some((index, error.reason(), error.to_string())));
        }
    }
    debug_assert!(chain
        .as_ref()
        .is_none_or(|c| c.len == from + page.len() as u64));
    (chain, None)
}

/// A user's view of a room: history, then live messages, decrypted. See
/// [`User::subscribe`].
pub struct Subscription<B: Backend = crate::Node> {
    user: User<B>,
    room: RoomId,
    frames: B::Frames,
    next: Seq,
}

impl<B: Backend> Subscription<B> {
    /// The sequence number after the last message returned: where to resume.
    pub fn position(&self) -> Seq {
        self.next
    }

    /// The next message, waiting for one if needed. `None` when the user has been
    /// removed and every message they may read has been returned. A frame that does
    /// not verify or decrypt is returned as an error, and the stream goes on.
    pub async fn next(&mut self) -> Option<Result<Message, ApiError>> {
        let (seq, frame) = match self.frames.next().await? {
            Ok(item) => item,
            Err(e) => return Some(Err(e)),
        };
        let Some(next) = advance(self.next, seq) else {
            let detail = format!("sequence {} where {} or later was due", seq.0, self.next.0);
            self.user.report(self.room, seq.0, "bad_sequence", &detail);
            return Some(Err(ApiError::Untrusted {
                reason: "bad_sequence",
                detail,
            }));
        };
        self.next = next;
        if frame.room != self.room {
            return Some(Err(ApiError::Crypto("a frame of another room".into())));
        }
        let key = match self.user.key_for(self.room, frame.epoch).await {
            Ok(Some(key)) => key,
            Ok(None) => return Some(Err(ApiError::NoKey(self.room))),
            Err(e) => return Some(Err(e)),
        };
        let keys = BTreeMap::from([(frame.epoch, key)]);
        Some(
            client::open(&frame, &keys)
                .map(|body| Message {
                    seq,
                    id: frame.id,
                    sender: frame.sender,
                    epoch: frame.epoch,
                    body,
                })
                .map_err(crypto),
        )
    }
}

/// Where a subscription resumes after a frame at `seq`, when `next` was due;
/// `None` if the node's sequence does not move forward (a node sending one twice,
/// or going back, would have the client show a message twice) or leaves no room
/// for a next (the node chose it: no overflow).
fn advance(next: Seq, seq: Seq) -> Option<Seq> {
    seq.0.checked_add(1).filter(|_| seq >= next).map(Seq)
}

#[cfg(test)]
mod tests {
    use super::*;
    use conclave_actors::domain::chain::{Change, Signer};

    #[test]
    fn a_subscription_moves_forward_only_and_never_overflows() {
        assert_eq!(advance(Seq(0), Seq(0)), Some(Seq(1)));
        // Gaps are fine: a user reads only what they may.
        assert_eq!(advance(Seq(3), Seq(9)), Some(Seq(10)));
        assert_eq!(advance(Seq(10), Seq(9)), None, "a sequence seen again");
        assert_eq!(advance(Seq(10), Seq(2)), None, "a sequence going back");
        assert_eq!(
            advance(Seq(10), Seq(u64::MAX)),
            None,
            "no next after the last"
        );
    }

    /// A room's creation and one invite, as their home would hold them.
    fn chain_of_two() -> (RoomId, Identity, Vec<SignedLink>) {
        let alice = Identity::generate(&mut rng());
        let bob = Identity::generate(&mut rng());
        let home = NodeId([1; 32]);
        let (room, key, create) =
            client::create_room(&mut rng(), &alice, home, Policy::default()).expect("create");
        let first = create.link().expect("a creation carries its link").clone();
        let genesis = ChainState::genesis(room, &first).expect("genesis");
        let invitee = Invitee {
            user: bob.public(),
            home,
            role: RoomRole::Member,
        };
        let invite = client::invite(&mut rng(), &alice, &genesis, &key, invitee).expect("invite");
        let second = invite.link().expect("an invite carries its link").clone();
        (room, alice, vec![first, second])
    }

    #[test]
    fn a_chain_is_verified_from_its_creation_and_in_pages() {
        let (room, _, links) = chain_of_two();
        let (whole, refused) = extend_chain(room, None, 0, &links);
        assert!(refused.is_none());
        assert_eq!(whole.as_ref().map(|c| c.members.len()), Some(2));
        let (first, _) = extend_chain(room, None, 0, &links[..1]);
        let (paged, refused) = extend_chain(room, first, 1, &links[1..]);
        assert!(refused.is_none());
        assert_eq!(paged, whole);
    }

    #[test]
    fn a_link_that_does_not_verify_is_refused_and_the_chain_stays_at_its_last_good_link() {
        let (room, alice, mut links) = chain_of_two();
        // The node's own identity names alice as the signer of its link.
        let node = Identity::generate(&mut rng());
        let mut forged = links[1].clone();
        forged.link.by = Signer::User(node.user_id());
        forged = SignedLink::sign(&node, forged.link);
        forged.link.by = Signer::User(alice.user_id());
        links[1] = forged;
        let (chain, refused) = extend_chain(room, None, 0, &links);
        assert_eq!(chain.as_ref().map(|c| c.len), Some(1));
        assert!(matches!(refused, Some((1, "bad_signature", _))));
        // A creation of another room is no genesis of this one.
        let other = RoomId([9; 16]);
        let (chain, refused) = extend_chain(other, None, 0, &links);
        assert!(chain.is_none());
        assert!(matches!(refused, Some((0, "wrong_room", _))));
        // A node's link that is not an eviction.
        let change = Change::Rekey {
            epoch: Epoch(2),
            check: conclave_actors::domain::chain::KeyCheck([0; 32]),
        };
        let genesis = ChainState::genesis(room, &links[0]).expect("genesis");
        let mut by_node = genesis.next_link(&node, change);
        by_node.link.by = Signer::Node(NodeId(node.public().signing));
        let by_node = SignedLink::sign(&node, by_node.link);
        let (chain, refused) = extend_chain(room, Some(genesis), 1, &[by_node]);
        assert_eq!(chain.map(|c| c.len), Some(1));
        assert!(matches!(refused, Some((1, "unauthorized", _))));
    }
}

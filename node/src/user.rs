//! Acting as a user: the same operations whether the user's node runs in this
//! process ([`crate::Node`]) or is reached over the client protocol
//! ([`crate::client::RemoteNode`]).
//!
//! Everything secret happens here, in the user's process: epoch keys are created
//! and sealed to members, requests and frames are signed, frames are encrypted and
//! decrypted. A [`Backend`] only carries signed requests, sealed keys and
//! ciphertext.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use conclave_actors::crypto::{EpochKey, Frame, SealedKey};
use conclave_actors::domain::{
    client, Denial, Invitee, Op, Outcome, Policy, RoomInfo, RoomRole, SignedRequest, UserEntry,
    UserRole,
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
    /// not answered yet (it may be unreachable). It will be applied when it is back.
    #[error("queued for the room's home node, which has not answered yet")]
    Queued,
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
    /// The room's home has persisted the frame at `seq`.
    Committed {
        /// The message id.
        id: MessageId,
        /// Its place in the room.
        seq: Seq,
    },
    /// The frame is durably queued for the room's home, which has not confirmed yet
    /// (unreachable, or slow); it commits when the home is back.
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

        /// The keys of `room` the node holds sealed to `user`.
        fn sealed_keys(
            &self,
            user: UserId,
            room: RoomId,
        ) -> impl Future<Output = Result<Vec<(Epoch, SealedKey)>, ApiError>> + Send;

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

/// A user acting through a node. Cheap to clone.
pub struct User<B: Backend = crate::Node> {
    backend: B,
    identity: Arc<Identity>,
    /// Opened epoch keys, per room.
    keys: Arc<Mutex<BTreeMap<RoomId, BTreeMap<Epoch, EpochKey>>>>,
}

impl<B: Backend> Clone for User<B> {
    fn clone(&self) -> Self {
        Self {
            backend: self.backend.clone(),
            identity: Arc::clone(&self.identity),
            keys: Arc::clone(&self.keys),
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
        match self.backend.call(req).await? {
            Some(Outcome::Denied(denial)) => Err(ApiError::Denied(denial)),
            Some(outcome) => Ok(outcome),
            None => Err(ApiError::Queued),
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

    /// The rooms this user is a member of, with their home nodes.
    pub async fn list_rooms(&self) -> Result<Vec<(RoomId, NodeId)>, ApiError> {
        match self.call(Op::ListRooms).await? {
            Outcome::Rooms(rooms) => Ok(rooms),
            other => Err(ApiError::Unexpected(Box::new(other))),
        }
    }

    /// Creates a room homed on this user's node, with this user as its owner.
    pub async fn create_room(&self, policy: Policy) -> Result<RoomId, ApiError> {
        let (room, key, op) =
            client::create_room(&mut rng(), &self.identity, self.backend.node_id(), policy)
                .map_err(crypto)?;
        self.call_done(op).await?;
        self.lock_keys()
            .entry(room)
            .or_default()
            .insert(Epoch(1), key);
        Ok(room)
    }

    /// Invites `invitee`, homed on `home`, sealing the room's current key to them.
    pub async fn invite(
        &self,
        room: RoomId,
        invitee: &PublicIdentity,
        home: NodeId,
        role: RoomRole,
    ) -> Result<(), ApiError> {
        let (epoch, key) = self.await_key(room).await?;
        let invitee = Invitee {
            user: *invitee,
            home,
            role,
        };
        let op = client::invite(&mut rng(), &self.identity, room, epoch, &key, invitee)
            .map_err(crypto)?;
        self.call_done(op).await
    }

    /// The room as its home describes it (members only).
    pub async fn room_info(&self, room: RoomId) -> Result<RoomInfo, ApiError> {
        match self.call(Op::RoomInfo { room }).await? {
            Outcome::Room(info) => Ok(info),
            other => Err(ApiError::Unexpected(Box::new(other))),
        }
    }

    /// Removes `user` from the room and moves it to a new epoch whose key is
    /// sealed to every remaining member: from then on the room accepts only frames
    /// of the new epoch, and the removed member receives nothing of it.
    pub async fn remove(&self, room: RoomId, user: UserId) -> Result<(), ApiError> {
        let info = self.room_info(room).await?;
        let (key, op) = client::remove(&mut rng(), &self.identity, &info, user).map_err(crypto)?;
        let epoch = Epoch(info.epoch.0 + 1);
        self.call_done(op).await?;
        if user != self.id() {
            self.lock_keys().entry(room).or_default().insert(epoch, key);
        }
        Ok(())
    }

    /// Encrypts, signs and publishes `body` to `room`. Returns once the room's home
    /// has committed it, or once it is durably queued for an unreachable home.
    pub async fn publish(&self, room: RoomId, body: &[u8]) -> Result<Receipt, ApiError> {
        let mut stale_retries = 0;
        loop {
            let (epoch, key) = self.await_key(room).await?;
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
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Some(Outcome::Denied(denial)) => return Err(ApiError::Denied(denial)),
                Some(other) => return Err(ApiError::Unexpected(Box::new(other))),
                None => return Ok(Receipt::Queued { id }),
            }
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

    /// Opens whatever keys of `room` the node holds for this user that are not
    /// cached yet.
    async fn refresh_keys(&self, room: RoomId) -> Result<(), ApiError> {
        let sealed = self.backend.sealed_keys(self.id(), room).await?;
        let mut cache = self.lock_keys();
        let known = cache.entry(room).or_default();
        let missing: Vec<_> = sealed
            .into_iter()
            .filter(|(epoch, _)| !known.contains_key(epoch))
            .collect();
        let (opened, errors) = client::open_keys(&self.identity, room, &missing);
        for (epoch, error) in errors {
            tracing::warn!(?room, epoch = epoch.0, %error, "a sealed key for this user does not open");
        }
        known.extend(opened);
        Ok(())
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
            self.refresh_keys(room).await?;
            if let Some(found) = self.cached_newest(room) {
                return Ok(found);
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
        self.next = Seq(seq.0 + 1);
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

//! The embedding API: run a node inside a tokio service and use it as users.
//!
//! ```no_run
//! # async fn demo(alice: conclave_actors::Identity, bob: conclave_actors::PublicIdentity,
//! #               node_b: conclave_actors::NodeId) -> Result<(), Box<dyn std::error::Error>> {
//! use conclave::{Node, Policy, Position, RoomRole};
//!
//! let node = Node::builder()
//!     .data_dir("./data/a")
//!     .listen("127.0.0.1:7401".parse()?)
//!     .peer(node_b, "127.0.0.1:7402".parse()?)
//!     .start()
//!     .await?;
//! node.seed_admin(&alice.public())?;              // first start only: the bootstrap
//! let alice = node.user(alice).await?;             // a user homed on this node
//! let room = alice.create_room(Policy::default()).await?;
//! alice.invite(room, &bob, node_b, RoomRole::Member).await?;
//! let receipt = alice.publish(room, b"hello").await?; // committed, or queued
//! let mut messages = alice.subscribe(room, Position::Start).await?;
//! while let Some(message) = messages.next().await {
//!     println!("{}", String::from_utf8_lossy(&message?.body));
//! }
//! # Ok(()) }
//! ```
//!
//! Everything a user does is encrypted and signed here, in the caller's process,
//! with the user's identity: the node's actors see only ciphertext and sealed keys.
//! Every refusal comes back as [`ApiError::Denied`] with its reason.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use conclave_actors::actor::{Actor, ActorKey, ActorKind, ActorRef, Context, Handler, System};
use conclave_actors::crypto::EpochKey;
use conclave_actors::domain::{
    self, client, gateway_of, members_of, ClientMsg, Denial, Domain, DomainConfig, Invitee,
    MembersMsg, Msg, Op, Outcome, Policy, ReplyTo, RoomInfo, RoomRole, UserEntry, UserRole,
};
use conclave_actors::ids::{Epoch, MessageId, NodeId, RoomId, Seq, UserId};
use conclave_actors::{Identity, PublicIdentity};
use conclave_storage::{LmdbOptions, LmdbStore, Store, StoreError};
use conclave_transports::quic::{QuicConfig, QuicTransport};
use conclave_transports::{Transport, TransportEvent};
use getrandom::SysRng;
use rand_core::UnwrapErr;
use tokio::sync::{broadcast, mpsc};

use crate::host::{wall_now, HostConfig, RouteError, Runtime};
use crate::identity_file::{self, IdentityFileError};

/// Why a node did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// No data directory was given.
    #[error("no data directory: call NodeBuilder::data_dir")]
    NoDataDir,
    /// The data directory could not be created.
    #[error("cannot create the data directory {}: {source}", path.display())]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The node identity could not be loaded or created.
    #[error(transparent)]
    Identity(#[from] IdentityFileError),
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The QUIC transport did not start.
    #[error(transparent)]
    Transport(#[from] conclave_transports::quic::StartError),
    /// The actor runtime did not start.
    #[error(transparent)]
    Runtime(#[from] crate::host::StartError),
}

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
}

/// Where a subscription starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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

/// Configures and starts a [`Node`].
#[derive(Clone, Debug)]
pub struct NodeBuilder {
    data_dir: Option<PathBuf>,
    listen: SocketAddr,
    peers: BTreeMap<NodeId, SocketAddr>,
    domain: DomainConfig,
    request_timeout: Duration,
    commit_wait: Duration,
    lmdb: LmdbOptions,
}

impl Default for NodeBuilder {
    fn default() -> Self {
        Self {
            data_dir: None,
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            peers: BTreeMap::new(),
            domain: DomainConfig::default(),
            request_timeout: Duration::from_secs(10),
            commit_wait: Duration::from_secs(2),
            lmdb: LmdbOptions::default(),
        }
    }
}

impl NodeBuilder {
    /// Where the node keeps its identity (`node.id`) and its store (`db/`).
    /// Required.
    pub fn data_dir(mut self, dir: impl AsRef<Path>) -> Self {
        self.data_dir = Some(dir.as_ref().to_path_buf());
        self
    }

    /// The UDP address to listen on (default `127.0.0.1:0`: loopback, any port).
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.listen = addr;
        self
    }

    /// A peer node and where to reach it. Only known peers may connect.
    pub fn peer(mut self, id: NodeId, addr: SocketAddr) -> Self {
        self.peers.insert(id, addr);
        self
    }

    /// Outbox retry and passivation timing.
    pub fn domain_config(mut self, config: DomainConfig) -> Self {
        self.domain = config;
        self
    }

    /// How long a call waits for the node's answer (default 10 s).
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// How long a publish waits for its commit before reporting
    /// [`Receipt::Queued`] (default 2 s).
    pub fn commit_wait(mut self, wait: Duration) -> Self {
        self.commit_wait = wait;
        self
    }

    /// LMDB options (map size, table count).
    pub fn lmdb_options(mut self, options: LmdbOptions) -> Self {
        self.lmdb = options;
        self
    }

    /// Opens the store, loads or creates the node identity, starts QUIC and the
    /// actors, and resumes sending whatever the outboxes held. Must run inside a
    /// multi-thread tokio runtime.
    pub async fn start(self) -> Result<Node, StartError> {
        let dir = self.data_dir.clone().ok_or(StartError::NoDataDir)?;
        std::fs::create_dir_all(&dir).map_err(|source| StartError::DataDir {
            path: dir.clone(),
            source,
        })?;
        let (identity, _) = identity_file::load_or_create(&dir.join("node.id"))?;
        let id = identity.node_id();
        let store = Arc::new(LmdbStore::open(&dir.join("db"), self.lmdb.clone())?);
        let mut quic = QuicConfig::new(identity, self.listen);
        quic.peers = self.peers.clone();
        let (transport, channels) = QuicTransport::<Msg>::start(quic)?;
        let local_addr = transport.local_addr().ok();
        let gateway = Arc::new(Gateway::new());
        let runtime = Runtime::start(HostConfig {
            node: id,
            system: NodeSystem {
                domain: Domain::new(self.domain),
                gateway: Arc::clone(&gateway),
            },
            store: Arc::clone(&store) as Arc<dyn Store>,
            transport: Arc::new(transport.clone()) as Arc<dyn Transport<Msg>>,
            incoming: channels.incoming,
        })?;
        let runtime = Arc::new(runtime);
        for (to, msg) in domain::boot(id, store.as_ref())? {
            if let Err(error) = runtime.tell(to, msg) {
                tracing::warn!(%error, "could not resume an outbox at start");
            }
        }
        let events = tokio::spawn(forward_events(
            id,
            Arc::downgrade(&runtime),
            channels.events,
        ));
        tracing::info!(node = %id, addr = ?local_addr, dir = %dir.display(), "node started");
        Ok(Node {
            inner: Arc::new(Inner {
                id,
                dir,
                local_addr,
                peers: self.peers,
                store: Mutex::new(Some(store)),
                gateway,
                runtime: Mutex::new(Some(runtime)),
                transport: Mutex::new(Some(transport)),
                events: Mutex::new(Some(events)),
                request_timeout: self.request_timeout,
                commit_wait: self.commit_wait,
            }),
        })
    }
}

/// Tells each peer actor what the transport sees of its node.
async fn forward_events(
    me: NodeId,
    runtime: std::sync::Weak<Runtime<NodeSystem>>,
    mut events: mpsc::Receiver<TransportEvent>,
) {
    while let Some(event) = events.recv().await {
        let Some(runtime) = runtime.upgrade() else {
            return;
        };
        let (peer, msg) = match event {
            TransportEvent::Connected { peer } => (peer, domain::PeerMsg::Connected),
            TransportEvent::Disconnected { peer, .. } => (peer, domain::PeerMsg::Disconnected),
            // Logged and counted by the transport.
            TransportEvent::AuthFailed { .. } => continue,
        };
        if let Err(error) = runtime.tell(domain::peer_of(me, peer), msg) {
            tracing::debug!(%error, "connection event not delivered");
        }
    }
}

struct Inner {
    id: NodeId,
    dir: PathBuf,
    local_addr: Option<SocketAddr>,
    peers: BTreeMap<NodeId, SocketAddr>,
    /// Taken at shutdown, so that the directory can be opened again in this process
    /// while old handles still exist.
    store: Mutex<Option<Arc<LmdbStore>>>,
    gateway: Arc<Gateway>,
    runtime: Mutex<Option<Arc<Runtime<NodeSystem>>>>,
    /// Taken at shutdown: the UDP socket is released with the last handle.
    transport: Mutex<Option<QuicTransport<Msg>>>,
    events: Mutex<Option<tokio::task::JoinHandle<()>>>,
    request_timeout: Duration,
    commit_wait: Duration,
}

/// A running node. Cheap to clone; [`Node::shutdown`] stops it.
#[derive(Clone)]
pub struct Node {
    inner: Arc<Inner>,
}

impl Node {
    /// A builder.
    pub fn builder() -> NodeBuilder {
        NodeBuilder::default()
    }

    /// Creates `dir` and the node identity in it (or loads the existing one) and
    /// returns the node id, without starting anything: what `conclave init` does,
    /// for a deployment that must know its nodes' ids before starting them.
    pub fn init(dir: impl AsRef<Path>) -> Result<NodeId, StartError> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|source| StartError::DataDir {
            path: dir.to_path_buf(),
            source,
        })?;
        let (identity, _) = identity_file::load_or_create(&dir.join("node.id"))?;
        Ok(identity.node_id())
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.inner.id
    }

    /// The address the node listens on.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.inner.local_addr
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The configured peers.
    pub fn peers(&self) -> &BTreeMap<NodeId, SocketAddr> {
        &self.inner.peers
    }

    /// The node's store (read it; the actors write it), or `None` once the node is
    /// shut down.
    pub fn store(&self) -> Option<Arc<LmdbStore>> {
        self.inner
            .store
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn open_store(&self) -> Result<Arc<LmdbStore>, ApiError> {
        self.store().ok_or(ApiError::Route(RouteError::Stopped))
    }

    /// Registers `user` as an admin of this node without an acting admin: the
    /// bootstrap, for the operator. [`Denial::Conflict`] if registered already.
    pub fn seed_admin(&self, user: &PublicIdentity) -> Result<(), ApiError> {
        let store = self.open_store()?;
        let mut txn = store.write()?;
        domain::members::seed_admin(&mut *txn, user, wall_now()).map_err(ApiError::Denied)?;
        txn.commit()?;
        Ok(())
    }

    /// A handle acting as `identity`, who must be an active user of this node.
    pub async fn user(&self, identity: Identity) -> Result<User, ApiError> {
        {
            let store = self.open_store()?;
            let txn = store.read_txn()?;
            domain::members::check_active(&txn, identity.user_id()).map_err(ApiError::Denied)?;
        }
        Ok(User {
            node: self.clone(),
            identity: Arc::new(identity),
            keys: Arc::new(Mutex::new(BTreeMap::new())),
        })
    }

    /// Stops the actors and the transport. Every committed change is on disk
    /// already (the store syncs each commit); messages not yet acknowledged stay in
    /// the outboxes and are resent on the next start.
    pub async fn shutdown(&self) {
        let runtime = self
            .inner
            .runtime
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        self.inner
            .store
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(events) = self
            .inner
            .events
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            events.abort();
        }
        let transport = self
            .inner
            .transport
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(transport) = transport {
            transport.shutdown().await;
        }
        if let Some(runtime) = runtime {
            // Joining the runtime thread blocks; keep it off the async workers.
            let _ = tokio::task::spawn_blocking(move || drop(runtime)).await;
        }
        tracing::info!(node = %self.inner.id, "node stopped");
    }

    fn runtime(&self) -> Result<Arc<Runtime<NodeSystem>>, ApiError> {
        self.inner
            .runtime
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or(ApiError::Route(RouteError::Stopped))
    }

    /// Sends `msg` to the members actor with a fresh reply address; returns the
    /// receiver of its outcomes.
    fn submit(
        &self,
        make: impl FnOnce(ReplyTo) -> MembersMsg,
    ) -> Result<(u64, mpsc::UnboundedReceiver<Outcome>), ApiError> {
        let (request, rx) = self.inner.gateway.register();
        let reply = ReplyTo {
            to: gateway_of(self.inner.id),
            request,
        };
        if let Err(error) = self.runtime()?.tell(members_of(self.inner.id), make(reply)) {
            self.inner.gateway.forget(request);
            return Err(error.into());
        }
        Ok((request, rx))
    }

    /// Waits for the final outcome; `Forwarded` then nothing within `wait` is
    /// `Ok(None)`.
    async fn outcome(
        &self,
        request: u64,
        mut rx: mpsc::UnboundedReceiver<Outcome>,
        wait_after_forward: Duration,
    ) -> Result<Option<Outcome>, ApiError> {
        let timeout = self.inner.request_timeout;
        let mut deadline = tokio::time::Instant::now() + timeout;
        let mut forwarded = false;
        let result = loop {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(Outcome::Forwarded)) => {
                    forwarded = true;
                    deadline = tokio::time::Instant::now() + wait_after_forward;
                }
                Ok(Some(outcome)) => break Ok(Some(outcome)),
                Ok(None) => break Err(ApiError::Route(RouteError::Stopped)),
                Err(_) if forwarded => break Ok(None),
                Err(_) => break Err(ApiError::Timeout(timeout)),
            }
        };
        self.inner.gateway.forget(request);
        result
    }
}

/// A user of a node, acting with their identity. Cheap to clone.
#[derive(Clone)]
pub struct User {
    node: Node,
    identity: Arc<Identity>,
    /// Opened epoch keys, per room.
    keys: Arc<Mutex<BTreeMap<RoomId, BTreeMap<Epoch, EpochKey>>>>,
}

impl std::fmt::Debug for User {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("User")
            .field("id", &self.identity.user_id())
            .field("node", &self.node.id())
            .finish_non_exhaustive()
    }
}

impl User {
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

    /// The node the user is homed on.
    pub fn node(&self) -> &Node {
        &self.node
    }

    async fn call(&self, op: Op) -> Result<Outcome, ApiError> {
        let req = client::sign(&self.identity, wall_now(), &mut rng(), op);
        let (request, rx) = self.node.submit(|reply| MembersMsg::Request {
            req: Box::new(req),
            reply,
        })?;
        let timeout = self.node.inner.request_timeout;
        match self.node.outcome(request, rx, timeout).await? {
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
        let (room, key, op) = client::create_room(&mut rng(), &self.identity, policy)
            .map_err(|e| ApiError::Crypto(e.to_string()))?;
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
        let op = client::invite(
            &mut rng(),
            &self.identity,
            room,
            epoch,
            &key,
            Invitee {
                user: *invitee,
                home,
                role,
            },
        )
        .map_err(|e| ApiError::Crypto(e.to_string()))?;
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
        let (key, op) = client::remove(&mut rng(), &self.identity, &info, user)
            .map_err(|e| ApiError::Crypto(e.to_string()))?;
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
            .map_err(|e| ApiError::Crypto(e.to_string()))?;
            let id = frame.id;
            let (request, rx) = self
                .node
                .submit(|reply| MembersMsg::Publish { frame, reply })?;
            let wait = self.node.inner.commit_wait;
            match self.node.outcome(request, rx, wait).await? {
                Some(Outcome::Committed { id, seq }) => return Ok(Receipt::Committed { id, seq }),
                Some(Outcome::Denied(Denial::StaleEpoch { current, .. }))
                    if stale_retries < 20 && current > epoch =>
                {
                    // The room was rekeyed and the new key is on its way here: wait
                    // for it, then seal again.
                    stale_retries += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                Some(Outcome::Denied(denial)) => return Err(ApiError::Denied(denial)),
                Some(other) => return Err(ApiError::Unexpected(Box::new(other))),
                None => return Ok(Receipt::Queued { id }),
            }
        }
    }

    /// The room's messages this user may read from `from` on: history from the
    /// node's store, then live as they arrive. The stream ends if the user is
    /// removed from the room (after the last message they may read).
    ///
    /// Membership reaches a member's node shortly after the invite commits on the
    /// room's home; until it has, this waits (up to the request timeout) and then
    /// refuses with [`Denial::NotAMember`].
    pub async fn subscribe(&self, room: RoomId, from: Position) -> Result<Subscription, ApiError> {
        let mut changes = self.node.inner.gateway.changes.subscribe();
        let deadline = tokio::time::Instant::now() + self.node.inner.request_timeout;
        let next = loop {
            let store = self.node.open_store()?;
            let txn = store.read_txn()?;
            if let Some(vis) = domain::room::visibility(&txn, self.id(), room)? {
                break match from {
                    Position::Start => vis.from,
                    Position::At(seq) => seq.max(vis.from),
                    Position::Live => domain::room::meta(&txn, room)?
                        .map(|m| m.next_seq)
                        .unwrap_or(vis.from)
                        .max(vis.from),
                };
            }
            drop(txn);
            match tokio::time::timeout_at(deadline, changes.recv()).await {
                Ok(Ok(_)) | Ok(Err(broadcast::error::RecvError::Lagged(_))) => {}
                Ok(Err(broadcast::error::RecvError::Closed)) | Err(_) => {
                    return Err(ApiError::Denied(Denial::NotAMember));
                }
            }
        };
        Ok(Subscription {
            user: self.clone(),
            room,
            next,
            buffer: VecDeque::new(),
            changes,
        })
    }

    fn lock_keys(&self) -> std::sync::MutexGuard<'_, BTreeMap<RoomId, BTreeMap<Epoch, EpochKey>>> {
        self.keys.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Opens whatever keys of `room` the node holds for this user that are not
    /// cached yet.
    fn refresh_keys(&self, room: RoomId) -> Result<(), ApiError> {
        let sealed = {
            let store = self.node.open_store()?;
            let txn = store.read_txn()?;
            domain::keys::sealed_for(&txn, room, self.id())?
        };
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

    /// The newest key of `room`, waiting (up to the request timeout) for one to
    /// arrive: after an invite, the key reaches the member's node shortly after the
    /// invite commits on the room's home.
    async fn await_key(&self, room: RoomId) -> Result<(Epoch, EpochKey), ApiError> {
        let mut changes = self.node.inner.gateway.changes.subscribe();
        let deadline = tokio::time::Instant::now() + self.node.inner.request_timeout;
        loop {
            match self.newest_key(room) {
                Err(ApiError::NoKey(_)) => {}
                other => return other,
            }
            match tokio::time::timeout_at(deadline, changes.recv()).await {
                Ok(Ok(_)) | Ok(Err(broadcast::error::RecvError::Lagged(_))) => {}
                Ok(Err(broadcast::error::RecvError::Closed)) | Err(_) => {
                    return Err(ApiError::NoKey(room));
                }
            }
        }
    }

    fn newest_key(&self, room: RoomId) -> Result<(Epoch, EpochKey), ApiError> {
        self.refresh_keys(room)?;
        self.lock_keys()
            .get(&room)
            .and_then(|keys| keys.iter().next_back())
            .map(|(e, k)| (*e, k.clone()))
            .ok_or(ApiError::NoKey(room))
    }

    fn key_for(&self, room: RoomId, epoch: Epoch) -> Result<Option<EpochKey>, ApiError> {
        if let Some(key) = self.lock_keys().get(&room).and_then(|k| k.get(&epoch)) {
            return Ok(Some(key.clone()));
        }
        self.refresh_keys(room)?;
        Ok(self
            .lock_keys()
            .get(&room)
            .and_then(|k| k.get(&epoch))
            .cloned())
    }
}

/// A user's view of a room: history, then live messages. See [`User::subscribe`].
pub struct Subscription {
    user: User,
    room: RoomId,
    next: Seq,
    buffer: VecDeque<Result<Message, ApiError>>,
    changes: broadcast::Receiver<RoomId>,
}

/// How many frames a subscription reads from the store at once.
const SUBSCRIPTION_BATCH: usize = 256;

impl Subscription {
    /// The sequence number of the next message this subscription will return: where
    /// to resume after a restart.
    pub fn position(&self) -> Seq {
        self.next
    }

    /// The next message, waiting for one if needed. `None` when the user has been
    /// removed and every message they may read has been returned. A frame that does
    /// not verify or decrypt is returned as an error, and the stream goes on.
    pub async fn next(&mut self) -> Option<Result<Message, ApiError>> {
        loop {
            if let Some(item) = self.buffer.pop_front() {
                return Some(item);
            }
            match self.fill() {
                Ok(true) => continue,
                Ok(false) => {}
                Err(Some(error)) => return Some(Err(error)),
                Err(None) => return None,
            }
            // Nothing new: wait for the room to change on this node.
            loop {
                match self.changes.recv().await {
                    Ok(room) if room == self.room => break,
                    Ok(_) => {}
                    // Missed notifications: read the store again, it is the truth.
                    Err(broadcast::error::RecvError::Lagged(_)) => break,
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        }
    }

    /// Reads the next batch from the store. `Ok(true)` if anything was buffered;
    /// `Err(None)` when the stream is over.
    fn fill(&mut self) -> Result<bool, Option<ApiError>> {
        let store = self.user.node.open_store().map_err(Some)?;
        let (vis, frames) = {
            let txn = store.read_txn().map_err(|e| Some(e.into()))?;
            let vis = domain::room::visibility(&txn, self.user.id(), self.room)
                .map_err(|e| Some(e.into()))?
                .ok_or(Some(ApiError::Denied(Denial::NotAMember)))?;
            let frames = domain::room::frames(&txn, self.room, self.next, SUBSCRIPTION_BATCH)
                .map_err(|e| Some(e.into()))?;
            (vis, frames)
        };
        if vis.until.is_some_and(|until| self.next >= until) {
            return Err(None);
        }
        let mut any = false;
        for (seq, frame) in frames {
            if !vis.covers(seq) {
                if vis.until.is_some_and(|until| seq >= until) {
                    break;
                }
                self.next = Seq(seq.0 + 1);
                continue;
            }
            let item = match self.user.key_for(self.room, frame.epoch) {
                Ok(Some(key)) => {
                    let keys = BTreeMap::from([(frame.epoch, key)]);
                    client::open(&frame, &keys)
                        .map(|body| Message {
                            seq,
                            id: frame.id,
                            sender: frame.sender,
                            epoch: frame.epoch,
                            body,
                        })
                        .map_err(|e| ApiError::Crypto(e.to_string()))
                }
                Ok(None) => Err(ApiError::NoKey(self.room)),
                Err(e) => Err(e),
            };
            self.buffer.push_back(item);
            self.next = Seq(seq.0 + 1);
            any = true;
        }
        Ok(any)
    }
}

/// Replies and notifications from the actors to API callers.
struct Gateway {
    next: AtomicU64,
    pending: Mutex<BTreeMap<u64, mpsc::UnboundedSender<Outcome>>>,
    changes: broadcast::Sender<RoomId>,
}

impl Gateway {
    fn new() -> Self {
        Self {
            next: AtomicU64::new(1),
            pending: Mutex::new(BTreeMap::new()),
            changes: broadcast::channel(1024).0,
        }
    }

    fn register(&self) -> (u64, mpsc::UnboundedReceiver<Outcome>) {
        let request = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        self.pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(request, tx);
        (request, rx)
    }

    fn forget(&self, request: u64) {
        self.pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&request);
    }

    fn deliver(&self, msg: ClientMsg) {
        match msg {
            ClientMsg::Reply { request, outcome } => {
                let pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
                if let Some(tx) = pending.get(&request) {
                    let _ = tx.send(outcome);
                }
            }
            ClientMsg::Changed { room } => {
                // No subscriber is fine.
                let _ = self.changes.send(room);
            }
        }
    }
}

/// The gateway as an actor of the node's system: the actors' replies land here.
struct GatewayActor(Arc<Gateway>);

impl Actor<NodeSystem> for GatewayActor {
    type Msg = ClientMsg;

    fn handle(&mut self, msg: ClientMsg, _cx: &mut Context<'_, NodeSystem>) {
        self.0.deliver(msg);
    }
}

/// The domain plus this node's gateway.
pub struct NodeSystem {
    domain: Domain,
    gateway: Arc<Gateway>,
}

impl System for NodeSystem {
    type Msg = Msg;

    fn activate(
        &self,
        addr: &ActorRef,
        cx: &mut Context<'_, Self>,
    ) -> Option<Box<dyn Handler<Self>>> {
        match (addr.kind, addr.key) {
            (ActorKind::GATEWAY, ActorKey::Unit) => {
                Some(Box::new(GatewayActor(Arc::clone(&self.gateway))))
            }
            _ => self.domain.activate(addr, cx),
        }
    }
}

/// OS entropy, as the clients' random source.
fn rng() -> UnwrapErr<SysRng> {
    UnwrapErr(SysRng)
}

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
use conclave_actors::crypto::{Frame, SealedKey};
use conclave_actors::domain::chain::SignedLink;
use conclave_actors::domain::{
    self, gateway_of, members_of, Asked, ClientMsg, Denial, Domain, DomainConfig, MembersMsg, Msg,
    Outcome, ReplyTo, SignedRequest,
};
use conclave_actors::ids::{Epoch, NodeId, RoomId, Seq, UserId};
use conclave_actors::replication::{Replication, ReplicationStatus};
use conclave_actors::{Identity, PublicIdentity};
use conclave_storage::{LmdbOptions, LmdbStore, Store, StoreError};
use conclave_transports::quic::{QuicConfig, QuicTransport};
use conclave_transports::{Transport, TransportEvent};
use tokio::sync::{broadcast, mpsc, watch};

use crate::admin::SeedError;
use crate::data_dir::{store_dir, DataDirError, DataDirLock};
use crate::host::{HostConfig, RouteError, Runtime};
use crate::identity_file::{self, IdentityFileError};
use crate::user::sealed::Carrier;
use crate::user::{ApiError, FrameSource, Position, User, CHAIN_LINKS_PER_CALL_MAX};

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
    /// Another node (or an offline admin operation) holds the data directory.
    #[error(transparent)]
    InUse(#[from] DataDirError),
    /// The node identity could not be loaded or created.
    #[error(transparent)]
    Identity(#[from] IdentityFileError),
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The store holds another build's table layout.
    #[error(transparent)]
    Format(#[from] domain::state::FormatError),
    /// The QUIC transport did not start.
    #[error(transparent)]
    Transport(#[from] conclave_transports::quic::StartError),
    /// The actor runtime did not start.
    #[error(transparent)]
    Runtime(#[from] crate::host::StartError),
    /// The replication layout cannot place every node's rooms: some node
    /// replicates no shard.
    #[error("replication: {shards} shards of {factor} replicas leave rooms homed on some of the {nodes} nodes without a shard (give at least {needed} shards, or fewer nodes per shard: shards + factor - 1 >= nodes)")]
    Layout {
        /// Shards configured.
        shards: u16,
        /// Replicas per group.
        factor: u8,
        /// Nodes in the cluster.
        nodes: usize,
        /// The fewest shards that place every node's rooms.
        needed: usize,
    },
    /// The Raft groups could not be marked rejoining on a lost store.
    #[error("marking the Raft groups rejoining: {0}")]
    Rejoin(#[from] conclave_actors::replication::LogError),
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

    /// Replicates the cluster's Raft groups with this layout (off by default;
    /// every node of a cluster must be given the same layout and the same peers,
    /// or its replicas' messages are dropped). Set after
    /// [`NodeBuilder::domain_config`], which replaces it.
    pub fn replication(mut self, replication: Replication) -> Self {
        self.domain.replication = Some(replication);
        self
    }

    /// How long a call waits for the node's answer (default 10 s).
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// How long a publish waits for its commit before reporting
    /// [`crate::Receipt::Queued`] (default 2 s).
    pub fn commit_wait(mut self, wait: Duration) -> Self {
        self.commit_wait = wait;
        self
    }

    /// The largest the node's store may grow to (default 64 GiB; the file is
    /// sparse, so a large bound costs only address space). Past it, writes are
    /// refused with `storage`.
    pub fn store_bytes_max(mut self, bytes: usize) -> Self {
        self.lmdb.map_size_bytes = bytes;
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
        // Held until shutdown: one node per directory (see `data_dir`).
        let lock = DataDirLock::acquire(&dir)?;
        let (identity, created) = identity_file::load_or_create(&dir.join("node.id"))?;
        let id = identity.node_id();
        let store = Arc::new(LmdbStore::open(&store_dir(&dir), self.lmdb.clone())?);
        // The domain signs evictions of this node's revoked users with it.
        let domain = Domain::new(self.domain)
            .with_nodes(self.peers.keys().copied())
            .with_identity(identity.clone());
        // Before the format is recorded: a crash in between marks it again.
        if !created && domain::state::is_new(store.as_ref())? {
            rejoin(&domain, id, store.as_ref())?;
        }
        domain::state::ensure_format(store.as_ref())?;
        // A new run: the streams this node sends start afresh.
        domain::begin_run(store.as_ref(), random_u64())?;
        let mut quic = QuicConfig::new(identity, self.listen);
        quic.peers = self.peers.clone();
        quic.accept_clients = true;
        let (transport, channels) = QuicTransport::<Msg>::start(quic)?;
        let local_addr = transport.local_addr().ok();
        check_layout(&domain)?;
        let gateway = Arc::new(Gateway::new(id));
        if let (Some(layout), Some(cluster)) = (domain.config.replication, domain.cluster()) {
            // Until the replicas actor reports: every group, none with a leader.
            let groups = layout.groups_of(&cluster, id).len() as u32;
            *gateway
                .replication
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(ReplicationStatus {
                groups,
                without_leader: groups,
                ..ReplicationStatus::default()
            });
        }
        let boot = domain.boot(id, store.as_ref())?;
        let runtime = Runtime::start(HostConfig {
            node: id,
            system: NodeSystem {
                domain,
                gateway: Arc::clone(&gateway),
            },
            store: Arc::new(crate::observe::MeteredStore::new(Arc::clone(&store)))
                as Arc<dyn Store>,
            transport: Arc::new(transport.clone()) as Arc<dyn Transport<Msg>>,
            incoming: channels.incoming,
        })?;
        let runtime = Arc::new(runtime);
        for (to, msg) in boot {
            if let Err(error) = runtime.tell(to, msg) {
                tracing::warn!(%error, "could not resume an outbox at start");
            }
        }
        let connected = Arc::new(Mutex::new(std::collections::BTreeSet::new()));
        let events = tokio::spawn(forward_events(
            id,
            Arc::downgrade(&runtime),
            channels.events,
            Arc::clone(&connected),
        ));
        tracing::info!(node = %id, addr = ?local_addr, dir = %dir.display(), "node started");
        let node = Node {
            inner: Arc::new(Inner {
                id,
                dir,
                local_addr,
                peers: self.peers,
                store: Mutex::new(Some(store)),
                lock: Mutex::new(Some(lock)),
                gateway,
                runtime: Mutex::new(Some(runtime)),
                transport: Mutex::new(Some(transport)),
                tasks: Mutex::new(vec![events]),
                connected,
                request_timeout: self.request_timeout,
                commit_wait: self.commit_wait,
            }),
        };
        let clients = tokio::spawn(crate::client::serve(node.clone(), channels.clients));
        node.inner
            .tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(clients);
        Ok(node)
    }
}

/// Refuses a layout with rooms on shard groups that leaves some node without
/// a shard for the rooms it homes.
fn check_layout(domain: &Domain) -> Result<(), StartError> {
    let (Some(layout), Some(cluster)) = (domain.config.replication, domain.cluster()) else {
        return Ok(());
    };
    if !layout.rooms || layout.covers(&cluster) {
        return Ok(());
    }
    let needed = (cluster.len() + 1).saturating_sub(usize::from(layout.factor.max(1)));
    Err(StartError::Layout {
        shards: layout.shards,
        factor: layout.factor,
        nodes: cluster.len(),
        needed: needed.max(1),
    })
}

/// The store is new but the identity is not (`Node::init` and every first
/// start create both): the store was lost or deleted. This node may have voted
/// and acknowledged entries in its Raft groups that it no longer remembers, so
/// it rejoins them: it votes again only once a leader has caught it up.
fn rejoin(domain: &Domain, id: NodeId, store: &dyn Store) -> Result<(), StartError> {
    if domain.config.replication.is_none() {
        return Ok(());
    }
    tracing::warn!(node = %id, "the store is new but the node identity is not: the store was lost; rejoining the Raft groups (this node votes again once a leader has caught it up)");
    Ok(domain.rejoin(id, store)?)
}

/// Tells each peer actor what the transport sees of its node.
async fn forward_events(
    me: NodeId,
    runtime: std::sync::Weak<Runtime<NodeSystem>>,
    mut events: mpsc::Receiver<TransportEvent>,
    connected: Arc<Mutex<std::collections::BTreeSet<NodeId>>>,
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
        {
            let mut set = connected.lock().unwrap_or_else(PoisonError::into_inner);
            if matches!(msg, domain::PeerMsg::Connected) {
                set.insert(peer);
            } else {
                set.remove(&peer);
            }
        }
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
    /// The data directory's lock, released at shutdown once the store is closed.
    lock: Mutex<Option<DataDirLock>>,
    gateway: Arc<Gateway>,
    runtime: Mutex<Option<Arc<Runtime<NodeSystem>>>>,
    /// Taken at shutdown: the UDP socket is released with the last handle.
    transport: Mutex<Option<QuicTransport<Msg>>>,
    /// Peers with an authenticated connection now.
    connected: Arc<Mutex<std::collections::BTreeSet<NodeId>>>,
    /// Event forwarding and the client protocol's acceptor, aborted at shutdown.
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
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
        // The store is created with the identity: an identity without a store
        // later means the store was lost (see `rejoin`).
        if !store_dir(dir).join("data.mdb").exists() {
            let _lock = DataDirLock::acquire(dir)?;
            let store = LmdbStore::open(&store_dir(dir), LmdbOptions::default())?;
            domain::state::ensure_format(&store)?;
        }
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
    pub(crate) fn store(&self) -> Option<Arc<LmdbStore>> {
        self.inner
            .store
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Readiness and posture, as `/healthz` reports them.
    pub fn health(&self) -> crate::observe::Health {
        let failure = self.failure();
        let ready = self.store().is_some() && failure.is_none();
        crate::observe::Health {
            ready,
            failure,
            node_id: self.inner.id.to_string(),
            peers_connected: self
                .inner
                .connected
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .len(),
            peers_known: self.inner.peers.len(),
            tls: true,
            data_dir: self.inner.dir.display().to_string(),
            replication: self
                .inner
                .gateway
                .replication
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        }
    }

    /// Why the node cannot serve, if it cannot: shut down, its actor runtime
    /// stopped by itself (an actor panicked; crash-only: restart the process, as
    /// `conclave node` does by exiting), its last group commit failed (a failing
    /// store; cleared by the next commit that succeeds), or its store reaches into
    /// the reserve kept for acknowledgements and deletes (`store_full`: it refuses
    /// new frames and rooms until space is freed).
    pub fn failure(&self) -> Option<String> {
        let runtime = self
            .inner
            .runtime
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let failure = match runtime.as_ref() {
            None => Some("shut down".into()),
            Some(runtime) => runtime.failure().map(|f| f.to_string()),
        };
        drop(runtime);
        failure.or_else(|| self.store_full())
    }

    /// `store_full: …` if the store reaches into its reserve.
    fn store_full(&self) -> Option<String> {
        let usage = self.store()?.usage().ok().flatten()?;
        usage.full().then(|| {
            format!(
                "store_full: {} of {} bytes used (a reserve of {} is kept for acknowledgements and deletes); new frames and rooms are refused",
                usage.used_bytes,
                usage.max_bytes,
                usage.reserve_bytes()
            )
        })
    }

    /// Waits until the node's actor runtime has stopped by itself (an actor
    /// panicked) and says why; never returns for a healthy node. Its store may be
    /// failing meanwhile: that is reported by [`Node::failure`], and does not end
    /// this wait.
    pub async fn stopped_by_failure(&self) -> String {
        let mut tick = tokio::time::interval(FAILURE_POLL);
        loop {
            tick.tick().await;
            let runtime = self
                .inner
                .runtime
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            if let Some(failure @ crate::host::Failure::Stopped) =
                runtime.as_ref().and_then(|r| r.failure())
            {
                return failure.to_string();
            }
        }
    }

    /// Revocations of this node's users from now on (the client protocol closes
    /// their connections).
    pub(crate) fn revocations(&self) -> broadcast::Receiver<UserId> {
        self.inner.gateway.revoked.subscribe()
    }

    /// Whether `user` may act on this node (registered and active).
    pub fn check_user(&self, user: UserId) -> Result<(), Denial> {
        let store = self.store().ok_or(Denial::Storage)?;
        crate::client::check_user(&store, user)
    }

    fn open_store(&self) -> Result<Arc<LmdbStore>, ApiError> {
        self.store().ok_or(ApiError::Route(RouteError::Stopped))
    }

    /// Runs `read` on one read transaction, for `user` if they are an active user
    /// of this node.
    fn read_as<T>(
        &self,
        user: UserId,
        read: impl FnOnce(&dyn conclave_storage::ReadTxn) -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        let store = self.open_store()?;
        let txn = store.read_txn()?;
        domain::state::registry::check_active(&txn, user).map_err(ApiError::Denied)?;
        read(&txn)
    }

    /// Registers `user` as an admin of this node without an acting admin: the
    /// bootstrap, for the operator. [`Denial::Conflict`] if registered already.
    /// (For a node that is not running, see [`crate::admin::seed_admin_offline`].)
    pub fn seed_admin(&self, user: &PublicIdentity) -> Result<(), ApiError> {
        let store = self.open_store()?;
        crate::admin::seed_admin(store.as_ref(), user).map_err(|error| match error {
            SeedError::Store(error) => error.into(),
            SeedError::Refused(denial) => ApiError::Denied(denial),
        })
    }

    /// Up to `count_max` (at most [`STORED_FRAMES_MAX`]) frames of `room` this node stores, from `from` on, as
    /// stored: ciphertext and signatures, never plaintext. For operators and
    /// tests that audit what a node holds; users read with [`User::subscribe`].
    pub fn stored_frames(
        &self,
        room: RoomId,
        from: Seq,
        count_max: usize,
    ) -> Result<Vec<(Seq, Frame)>, ApiError> {
        // At most STORED_FRAMES_MAX at once, whatever the caller asks for.
        let count_max = count_max.min(STORED_FRAMES_MAX);
        let store = self.open_store()?;
        let txn = store.read_txn()?;
        let frames = domain::state::rooms::frames(&txn, room, from, count_max)?;
        debug_assert!(frames.len() <= count_max);
        debug_assert!(frames.windows(2).all(|w| w[0].0 < w[1].0));
        Ok(frames)
    }

    /// The epochs of `room` whose key this node holds sealed to `user`: what a
    /// removed member's node still has (nothing past the removal).
    pub fn stored_key_epochs(&self, room: RoomId, user: UserId) -> Result<Vec<Epoch>, ApiError> {
        let store = self.open_store()?;
        let txn = store.read_txn()?;
        Ok(domain::state::keys::sealed_for(&txn, room, user)?
            .into_iter()
            .map(|(epoch, _)| epoch)
            .collect())
    }

    /// A handle acting as `identity`, who must be an active user of this node.
    pub async fn user(&self, identity: Identity) -> Result<User, ApiError> {
        {
            let store = self.open_store()?;
            let txn = store.read_txn()?;
            domain::state::registry::check_active(&txn, identity.user_id())
                .map_err(ApiError::Denied)?;
        }
        Ok(User::new(self.clone(), identity))
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
        for task in std::mem::take(
            &mut *self
                .inner
                .tasks
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        ) {
            task.abort();
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
        // Last: the actors are stopped and the store closed, so the directory may
        // now be taken by another node or an offline admin operation.
        self.inner
            .lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
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
        room: Option<RoomId>,
        make: impl FnOnce(ReplyTo) -> MembersMsg,
    ) -> Result<(u64, mpsc::UnboundedReceiver<Outcome>), ApiError> {
        // Who may answer: this node, and the room's home for a room request.
        let mut answerers = std::collections::BTreeSet::from([self.inner.id]);
        if let Some(room) = room {
            let store = self.open_store()?;
            let txn = store.read_txn()?;
            answerers.extend(domain::state::rooms::sequencer_of(&txn, room)?);
        }
        let (request, rx) = self.inner.gateway.register(answerers);
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

impl Carrier for Node {
    type Frames = LocalFrames;

    fn node_id(&self) -> NodeId {
        self.inner.id
    }

    async fn call(&self, req: SignedRequest) -> Result<Option<Outcome>, ApiError> {
        let timeout = self.inner.request_timeout;
        self.submit_request(req, timeout).await
    }

    async fn publish(&self, frame: Frame) -> Result<Option<Outcome>, ApiError> {
        let wait = self.inner.commit_wait;
        self.submit_publish(frame, wait).await
    }

    async fn chain(
        &self,
        user: UserId,
        room: RoomId,
        from: u64,
    ) -> Result<Vec<SignedLink>, ApiError> {
        self.read_as(user, |txn| {
            // Whoever is or was a member may read the chain (a removed member still
            // verifies the keys of the epochs they were in).
            if domain::state::rooms::visibility(txn, user, room)?.is_none() {
                return Err(ApiError::Denied(Denial::NotAMember));
            }
            let links = domain::state::rooms::links(txn, room, from, CHAIN_LINKS_PER_CALL_MAX)?;
            debug_assert!(links.len() <= CHAIN_LINKS_PER_CALL_MAX);
            Ok(links)
        })
    }

    async fn sealed_keys(
        &self,
        user: UserId,
        room: RoomId,
        after: Epoch,
    ) -> Result<Vec<(Epoch, SealedKey)>, ApiError> {
        self.read_as(user, |txn| {
            Ok(domain::state::keys::sealed_page(txn, room, user, after)?)
        })
    }

    async fn outcome(
        &self,
        user: UserId,
        room: RoomId,
        asked: Asked,
    ) -> Result<Option<Outcome>, ApiError> {
        self.read_as(user, |txn| {
            Ok(domain::state::outcomes::of(txn, user, room, asked)?)
        })
    }

    async fn frames(
        &self,
        user: UserId,
        room: RoomId,
        from: Position,
    ) -> Result<LocalFrames, ApiError> {
        self.frames(user, room, from).await
    }
}

impl Node {
    /// Hands a request signed by a user of this node to its members actor and waits
    /// for the outcome: `Ok(None)` if it went to the outbox towards the room's home
    /// and no answer came within `wait` (it is applied when the home is back).
    /// For the client protocol, which relays requests its clients signed.
    pub(crate) async fn submit_request(
        &self,
        req: SignedRequest,
        wait: Duration,
    ) -> Result<Option<Outcome>, ApiError> {
        let room = req.request.op.room();
        let (request, rx) = self.submit(room, |reply| MembersMsg::Request {
            req: Box::new(req),
            reply,
        })?;
        self.outcome(request, rx, wait).await
    }

    /// Hands a frame a user of this node sealed and signed to its members actor
    /// and waits for the receipt (see [`Node::submit_request`] for `Ok(None)`).
    pub(crate) async fn submit_publish(
        &self,
        frame: Frame,
        wait: Duration,
    ) -> Result<Option<Outcome>, ApiError> {
        let room = frame.room;
        let (request, rx) =
            self.submit(Some(room), |reply| MembersMsg::Publish { frame, reply })?;
        self.outcome(request, rx, wait).await
    }

    /// The frames of `room` that `user` (of this node) may read, from `from` on,
    /// still encrypted: history from the store, then live. Waits (up to the request
    /// timeout) for the membership to reach this node after an invite.
    pub async fn frames(
        &self,
        user: UserId,
        room: RoomId,
        from: Position,
    ) -> Result<LocalFrames, ApiError> {
        let mut changes = self.inner.gateway.watch(room);
        let deadline = tokio::time::Instant::now() + self.inner.request_timeout;
        let next = loop {
            let store = self.open_store()?;
            let txn = store.read_txn()?;
            if let Some(vis) = domain::state::rooms::visibility(&txn, user, room)? {
                break match from {
                    Position::Start => vis.from,
                    Position::At(seq) => seq.max(vis.from),
                    Position::Live => domain::state::rooms::meta(&txn, room)?
                        .map(|m| m.next_seq)
                        .unwrap_or(vis.from)
                        .max(vis.from),
                };
            }
            drop(txn);
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => {
                    // Logged and counted like the actors' refusals.
                    domain::denied("subscribe", Some(user), Denial::NotAMember);
                    return Err(ApiError::Denied(Denial::NotAMember));
                }
            }
        };
        Ok(LocalFrames {
            node: self.clone(),
            user,
            room,
            next,
            buffer: VecDeque::new(),
            changes,
        })
    }
}

/// How often [`Node::stopped_by_failure`] looks at the actor runtime.
const FAILURE_POLL: std::time::Duration = std::time::Duration::from_millis(200);

/// Most frames [`Node::stored_frames`] reads at once.
pub const STORED_FRAMES_MAX: usize = 4096;

/// A room's frames as a local user may read them: history, then live. See
/// [`Node::frames`].
pub struct LocalFrames {
    node: Node,
    user: UserId,
    room: RoomId,
    next: Seq,
    buffer: VecDeque<(Seq, Frame)>,
    /// Wakes when this room changes on this node (and only this room).
    changes: watch::Receiver<u64>,
}

/// How many frames are read from the store at once.
const FRAMES_BATCH: usize = 256;

impl FrameSource for LocalFrames {
    async fn next(&mut self) -> Option<Result<(Seq, Frame), ApiError>> {
        loop {
            if let Some(item) = self.buffer.pop_front() {
                return Some(Ok(item));
            }
            match self.fill() {
                Ok(true) => continue,
                Ok(false) => {}
                Err(Some(error)) => return Some(Err(error)),
                Err(None) => return None,
            }
            // Nothing new: wait for the room to change on this node. A change
            // since the last read counts too (the watch keeps the latest).
            if self.changes.changed().await.is_err() {
                return None;
            }
        }
    }
}

impl LocalFrames {
    /// The sequence number the subscription reads next (where a `Live` one
    /// actually starts, before any frame).
    pub(crate) fn position(&self) -> Seq {
        self.buffer.front().map_or(self.next, |(seq, _)| *seq)
    }

    /// Reads the next batch from the store. `Ok(true)` if anything was buffered;
    /// `Err(None)` when the stream is over (the user was removed and has read
    /// everything they may).
    fn fill(&mut self) -> Result<bool, Option<ApiError>> {
        let store = self.node.open_store().map_err(Some)?;
        let (vis, frames) = {
            let txn = store.read_txn().map_err(|e| Some(e.into()))?;
            // A user revoked while reading stops reading.
            domain::state::registry::check_active(&txn, self.user)
                .map_err(|d| Some(ApiError::Denied(d)))?;
            let vis = domain::state::rooms::visibility(&txn, self.user, self.room)
                .map_err(|e| Some(e.into()))?
                .ok_or(Some(ApiError::Denied(Denial::NotAMember)))?;
            let frames = domain::state::rooms::frames(&txn, self.room, self.next, FRAMES_BATCH)
                .map_err(|e| Some(e.into()))?;
            (vis, frames)
        };
        if vis.until.is_some_and(|until| self.next >= until) {
            return Err(None);
        }
        let mut any = false;
        for (seq, frame) in frames {
            if vis.until.is_some_and(|until| seq >= until) {
                break;
            }
            self.next = Seq(seq.0.saturating_add(1));
            if vis.covers(seq) {
                self.buffer.push_back((seq, frame));
                any = true;
            }
        }
        Ok(any)
    }
}

/// Replies and notifications from the actors to API callers.
struct Gateway {
    me: NodeId,
    next: AtomicU64,
    pending: Mutex<BTreeMap<u64, Pending>>,
    /// Per room with subscribers on this node: a change counter they watch, so a
    /// change wakes only that room's subscribers (a room nobody watches any more
    /// is forgotten at its next change).
    changes: Mutex<BTreeMap<RoomId, watch::Sender<u64>>>,
    /// Users of this node just revoked: the client protocol closes their
    /// connections.
    revoked: broadcast::Sender<UserId>,
    /// What this node's Raft groups looked like when its replicas actor last
    /// said (`None`: replication is off, or nothing said yet).
    replication: Mutex<Option<ReplicationStatus>>,
}

/// At this many watched rooms, rooms nobody watches any more are forgotten before
/// another is added (they are otherwise forgotten at their next change).
const WATCHED_ROOMS_PRUNE_AT: usize = 4096;

/// How many revocations wait for the client protocol's connections to see them;
/// a connection that falls behind reads its user's status from the store instead.
const REVOCATIONS_QUEUED_MAX: usize = 256;

/// A request waiting for its outcome.
struct Pending {
    tx: mpsc::UnboundedSender<Outcome>,
    /// The nodes whose answers count (this node; the room's home).
    answerers: std::collections::BTreeSet<NodeId>,
    /// Whether `Forwarded` was already passed on (it is said once).
    forwarded: bool,
}

/// A random u64 from the OS: a run's incarnation, where its request numbers start
/// (so that two runs of a node share none in practice).
fn random_u64() -> u64 {
    use rand_core::Rng;
    rand_core::UnwrapErr(getrandom::SysRng).next_u64()
}

impl Gateway {
    fn changes(&self) -> std::sync::MutexGuard<'_, BTreeMap<RoomId, watch::Sender<u64>>> {
        // Entries are inserted and removed whole: a poisoned lock guards a valid map.
        self.changes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A receiver woken by every later change of `room` on this node.
    fn watch(&self, room: RoomId) -> watch::Receiver<u64> {
        let mut changes = self.changes();
        if changes.len() >= WATCHED_ROOMS_PRUNE_AT {
            // Rooms whose watchers all left and that have not changed since.
            changes.retain(|_, sender| sender.receiver_count() > 0);
        }
        let sender = changes.entry(room).or_insert_with(|| watch::channel(0).0);
        let mut receiver = sender.subscribe();
        // Only changes from now on count.
        receiver.mark_unchanged();
        receiver
    }

    /// Wakes `room`'s subscribers, if it has any (and forgets it if it has none).
    fn changed(&self, room: RoomId) {
        let mut changes = self.changes();
        let Some(sender) = changes.get(&room) else {
            return;
        };
        if sender.receiver_count() == 0 {
            changes.remove(&room);
            return;
        }
        sender.send_modify(|version| *version = version.wrapping_add(1));
    }

    fn new(me: NodeId) -> Self {
        Self {
            me,
            // Random, not 1: an answer to a request of an earlier run of this
            // node (forwarded, decided by the home after a restart) must not be
            // taken for the answer to a new request that got the same number.
            next: AtomicU64::new(random_u64()),
            pending: Mutex::new(BTreeMap::new()),
            changes: Mutex::new(BTreeMap::new()),
            revoked: broadcast::channel(REVOCATIONS_QUEUED_MAX).0,
            replication: Mutex::new(None),
        }
    }

    fn register(
        &self,
        answerers: std::collections::BTreeSet<NodeId>,
    ) -> (u64, mpsc::UnboundedReceiver<Outcome>) {
        let request = self.next.fetch_add(1, Ordering::Relaxed);
        // Wrapping past u64::MAX is fine: numbers only need to differ.
        let (tx, rx) = mpsc::unbounded_channel();
        self.pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(
                request,
                Pending {
                    tx,
                    answerers,
                    forwarded: false,
                },
            );
        (request, rx)
    }

    fn forget(&self, request: u64) {
        self.pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&request);
    }

    /// Passes an actor's message on, if it comes from a node that may say it: an
    /// outcome from this node or the request's room home (`Forwarded` only from
    /// this node, once; then one final outcome), a change notice only from this
    /// node. Anything else is dropped and counted: another node cannot answer for
    /// a room it is not the home of, nor wake subscribers here.
    fn deliver(&self, from: NodeId, msg: ClientMsg) {
        let accepted = match msg {
            ClientMsg::Reply { request, outcome } => {
                let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
                match pending.get_mut(&request) {
                    Some(p) if p.answerers.contains(&from) => match outcome {
                        Outcome::Forwarded if from != self.me || p.forwarded => false,
                        Outcome::Forwarded => {
                            p.forwarded = true;
                            p.tx.send(Outcome::Forwarded).is_ok()
                        }
                        outcome => {
                            let _ = p.tx.send(outcome);
                            pending.remove(&request);
                            true
                        }
                    },
                    // A late answer to a request that was already answered or
                    // given up on is normal; one from another node is not.
                    Some(_) => false,
                    None => true,
                }
            }
            ClientMsg::Changed { room } if from == self.me => {
                self.changed(room);
                true
            }
            ClientMsg::Changed { .. } => false,
            ClientMsg::Applied { entries } if from == self.me => {
                for entry in entries.iter().filter(|e| e.changed) {
                    self.changed(entry.room);
                }
                true
            }
            ClientMsg::Applied { .. } => false,
            ClientMsg::Revoked { user } if from == self.me => {
                // No open connection is fine.
                let _ = self.revoked.send(user);
                true
            }
            ClientMsg::Revoked { .. } => false,
            // Counted where it is decided (the replicas actor).
            ClientMsg::Leading { .. } => from == self.me,
            ClientMsg::Replication(status) if from == self.me => {
                *self
                    .replication
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = Some(status);
                true
            }
            ClientMsg::Replication(_) => false,
        };
        if !accepted {
            tracing::warn!(node = %from, "gateway message from a node that may not send it; dropped");
            metrics::counter!("conclave_runtime_messages_dropped_total", "reason" => "gateway_not_answerer").increment(1);
        }
    }
}

/// The gateway as an actor of the node's system: the actors' replies land here.
struct GatewayActor(Arc<Gateway>);

impl Actor<NodeSystem> for GatewayActor {
    type Msg = ClientMsg;

    fn handle(&mut self, msg: ClientMsg, cx: &mut Context<'_, NodeSystem>) {
        // Messages from outside any actor (none are sent) count as this node's.
        let from = cx.sender().map_or(cx.node(), |s| s.node);
        self.0.deliver(from, msg);
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

    fn accepts_remote(&self, from: &ActorRef, to: &ActorRef) -> bool {
        self.domain.accepts_remote(from, to)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_answering_nodes_reach_a_waiting_caller() {
        let (me, home, other) = (NodeId([1; 32]), NodeId([2; 32]), NodeId([3; 32]));
        let gateway = Gateway::new(me);
        let (request, mut rx) = gateway.register([me, home].into());
        let done = |request| ClientMsg::Reply {
            request,
            outcome: Outcome::Done,
        };
        // Another node cannot answer, nor say "forwarded"; the home cannot say
        // "forwarded" either (only this node's members actor does, once).
        gateway.deliver(other, done(request));
        gateway.deliver(
            home,
            ClientMsg::Reply {
                request,
                outcome: Outcome::Forwarded,
            },
        );
        gateway.deliver(
            me,
            ClientMsg::Reply {
                request,
                outcome: Outcome::Forwarded,
            },
        );
        gateway.deliver(
            me,
            ClientMsg::Reply {
                request,
                outcome: Outcome::Forwarded,
            },
        );
        assert_eq!(rx.try_recv().ok(), Some(Outcome::Forwarded));
        assert!(rx.try_recv().is_err());
        // The home's answer is the one final outcome; nothing after it.
        gateway.deliver(home, done(request));
        gateway.deliver(home, done(request));
        assert_eq!(rx.try_recv().ok(), Some(Outcome::Done));
        assert!(rx.try_recv().is_err());
        // Change notices only from this node, and only to the room's watchers.
        let (room, elsewhere) = (RoomId([0; 16]), RoomId([1; 16]));
        let changes = gateway.watch(room);
        gateway.deliver(other, ClientMsg::Changed { room });
        assert!(!changes.has_changed().unwrap());
        gateway.deliver(me, ClientMsg::Changed { room: elsewhere });
        assert!(!changes.has_changed().unwrap());
        gateway.deliver(me, ClientMsg::Changed { room });
        assert!(changes.has_changed().unwrap());
        // A room nobody watches any more is forgotten at its next change.
        drop(changes);
        gateway.deliver(me, ClientMsg::Changed { room });
        assert!(gateway.changes().is_empty());
    }

    #[test]
    fn an_answer_to_a_request_of_an_earlier_run_does_not_reach_a_new_request() {
        let (me, home) = (NodeId([1; 32]), NodeId([2; 32]));
        // A request forwarded to the home, then the node restarts before the
        // home's answer comes back.
        let (old, _) = Gateway::new(me).register([me, home].into());
        let restarted = Gateway::new(me);
        let (new, mut rx) = restarted.register([me, home].into());
        assert_ne!(old, new, "a new run numbers its requests afresh");
        let late = ClientMsg::Reply {
            request: old,
            outcome: Outcome::Done,
        };
        restarted.deliver(home, late);
        assert!(
            rx.try_recv().is_err(),
            "the old answer reached request {new}"
        );
    }

    #[test]
    fn only_this_node_closes_its_users_connections() {
        let (me, other) = (NodeId([1; 32]), NodeId([3; 32]));
        let gateway = Gateway::new(me);
        let mut revoked = gateway.revoked.subscribe();
        let user = UserId([9; 32]);
        // Another node cannot have this node's users cut off.
        gateway.deliver(other, ClientMsg::Revoked { user });
        assert!(revoked.try_recv().is_err());
        gateway.deliver(me, ClientMsg::Revoked { user });
        assert_eq!(revoked.try_recv().ok(), Some(user));
        // No connection listening is fine.
        drop(revoked);
        gateway.deliver(me, ClientMsg::Revoked { user });
    }
}

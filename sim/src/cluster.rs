//! A deterministic driver for the domain actors: several nodes in one thread, one
//! event queue ordered by (virtual time, sequence), random sources derived from one
//! root seed (one per node and one per subsystem), an in-memory network that
//! carries every cross-node message as an encoded [`Envelope`] (so what travels is
//! exactly what would travel over QUIC), and in-memory stores with crash semantics.
//!
//! It hosts the same [`Domain`] the production runtime hosts; the gateway
//! ([`ActorKind::GATEWAY`]) is the driver's own: replies are collected per request.
//!
//! Each node handles one message at a time, and each message costs it
//! [`SimNode::cost`] of virtual time (zero by default), so a slow node falls behind
//! and a crash can land between any two of its messages. As in the production
//! runtime, where every actor has its own actix mailbox, every actor has its own
//! FIFO mailbox: what one actor sends another is handled in the order sent, but
//! messages to *different* actors of a node may be handled in either order.
//! [`Scheduling`] says how: which actor's mailbox runs next (the oldest message
//! first, or an actor picked by the node's seeded scheduler), and how long an actor
//! that is not active takes to activate before it handles its first message (while
//! the node's other actors go on).
//! Activation, passivation, timers and `stop` follow
//! [`conclave_actors::lifecycle`], the contract the production runtime follows
//! too: a stopping actor handles what was queued for it before the stop, its
//! timers die, and what arrives meanwhile waits for its next activation.
//! Each node reads its own clock ([`SimNode::clock_offset`]). The network
//! ([`NetFaults`]) adds per-link latency and jitter (which reorders), drops and
//! duplicates; [`Cluster::cut`] holds the links that carry nothing (partitions, in
//! one direction or both).
//!
//! Every handled message, network decision and driver action is folded into a
//! trace hash ([`Cluster::trace_hash`]): the same seed gives the same hash.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use conclave_actors::actor::{ActorKind, ActorRef, Context, Effect, Handler, Time};
use conclave_actors::crypto::Frame;
use conclave_actors::domain::chain::{ChainState, Change, SignedLink, Signer, CHAIN_LINKS_MAX};
use conclave_actors::domain::{
    self, client, gateway_of, members_of, ClientMsg, Domain, DomainConfig, Invitee, MembersMsg,
    Msg, Op, Outcome, Policy, ReplyTo, Request, RoomInfo, RoomMsg,
};
use conclave_actors::ids::{Epoch, MessageId, NodeId, RoomId, Seq};
use conclave_actors::lifecycle::{batch_full, Incarnation, Lifecycles, Phase, Turn};
use conclave_actors::mutation::{self, Mutation};
use conclave_actors::replication::{Packet, ProposalId, ReplicasMsg};
use conclave_actors::wire::Envelope;
use conclave_actors::{Identity, UserId};
use conclave_storage::{Batch, MemStore, ReadTxn, Store, StoreError};
use rand_chacha::ChaCha20Rng;
use rand_core::{Rng, SeedableRng};

use crate::hash::TraceHasher;

/// Virtual time at which every run starts: 2026-01-01T00:00:00Z, so message ids
/// carry plausible timestamps.
pub const START: Time = Time::from_unix_micros(1_767_225_600_000_000);

/// A random source for `subsystem` of `index` (a node, or 0), derived from the root
/// `seed`: ChaCha20 keyed by (seed, index, subsystem), so every stream is
/// independent of the others and of how much the others were used.
pub fn derive_rng(seed: u64, index: u64, subsystem: &str) -> ChaCha20Rng {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&index.to_le_bytes());
    for (k, b) in key[16..].iter_mut().zip(subsystem.bytes()) {
        *k = b;
    }
    ChaCha20Rng::from_seed(key)
}

/// How a node picks the actor whose mailbox runs next.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Interleave {
    /// The oldest waiting message first, whatever its actor (with no activation
    /// delay, one FIFO per node).
    #[default]
    Arrival,
    /// Any actor with a message ready, picked uniformly by the node's scheduler
    /// (its own random stream, derived from the seed).
    Random,
}

/// How each node schedules its actors' mailboxes (see the module docs). FIFO per
/// (sender, receiver) pair always holds; across receivers it does not.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Scheduling {
    /// Which ready mailbox runs next.
    pub interleave: Interleave,
    /// Activation: a message to an actor that is not active waits a delay drawn
    /// uniformly up to this (by the node's scheduler) before the actor, activated,
    /// handles it; messages that arrive for it meanwhile queue behind it. Zero: at
    /// once.
    pub activation_max: Duration,
}

/// A message waiting in an actor's mailbox.
struct Pending {
    from: Option<ActorRef>,
    to: ActorRef,
    msg: Msg,
    /// For timers: the incarnation of the actor that set it.
    timer: Option<Incarnation>,
    /// When it arrived on its node, as a count (for [`Interleave::Arrival`]).
    arrival: u64,
}

/// One incarnation of an actor on a node: its mailbox and, once activated, the
/// actor (the lifecycle around it is [`conclave_actors::lifecycle`]'s).
struct Mailbox {
    queue: VecDeque<Pending>,
    /// When its activation is done and it can handle the message at the front.
    ready_at: Time,
    /// Whether activation was attempted (once per incarnation).
    activated: bool,
    /// The actor; `None` before activation, or if activation found none.
    handler: Option<Box<dyn Handler<Domain>>>,
}

impl Mailbox {
    fn new(ready_at: Time) -> Self {
        Self {
            queue: VecDeque::new(),
            ready_at,
            activated: false,
            handler: None,
        }
    }

    /// Whether the message at the front may be handled at `now`.
    fn ready(&self, now: Time) -> bool {
        self.activated || self.ready_at <= now
    }

    /// When the message at the front may be handled, from `now` on.
    fn ready_from(&self, now: Time) -> Time {
        if self.activated {
            now
        } else {
            self.ready_at.max(now)
        }
    }
}

/// One simulated node.
pub struct SimNode {
    /// Its id.
    pub id: NodeId,
    /// Its identity (its Ed25519 key is its id): it signs evictions, and a node
    /// that lies to its clients seals keys with it.
    pub identity: Identity,
    /// Its disk.
    pub store: Arc<MemStore>,
    /// What its actors write through: a group commit over `store`, flushed when the
    /// node has no ready message left or the batch is full.
    pub batch: Arc<Batch>,
    /// What the open batch's messages sent: released only once it is durable.
    held: Vec<(ActorRef, ActorRef, Msg)>,
    /// What the driver saw the open batch's rooms decide: it counts once it is
    /// durable.
    decided: Vec<Observation>,
    /// What the sealed batch owes, from its sealing until its release. Meanwhile the
    /// node goes on handling messages into the open batch (the disk syncs while the
    /// processor works), up to a full batch.
    committing: Option<Owed>,
    /// Bumped by every crash: a `Flushed` event of an older life is ignored.
    life: u64,
    /// Virtual time one flush (commit and fsync) costs this node.
    pub commit_cost: Duration,
    /// Virtual time between a batch's commit and the release of what it owes (a
    /// crash then loses only the latter).
    pub release_delay: Duration,
    /// Its actors: active, stopping, and their mailboxes.
    actors: Lifecycles<Pending, Mailbox>,
    /// Whether the node is running.
    pub up: bool,
    /// Whether the node was lost for good (its disk wiped); it never restarts.
    pub wiped: bool,
    /// Whether the node came back with an empty disk under its identity: what it
    /// held is lost for good (it is `wiped`), but it is up and other nodes'
    /// streams to it must flow again.
    pub reborn: bool,
    /// The node's own random source (what its actors get from `cx.rng()`).
    rng: ChaCha20Rng,
    /// Which mailbox runs next, and activation delays ([`Scheduling`]).
    sched_rng: ChaCha20Rng,
    /// How many messages wait in its actors' mailboxes or are held for their next
    /// incarnation.
    queued: usize,
    /// How many messages have arrived (numbers [`Pending::arrival`]).
    arrivals: u64,
    /// When the node is done with the message it handles last.
    busy_until: Time,
    /// Until when its process is paused ([`Cluster::pause`]): it handles
    /// nothing and releases nothing before then.
    paused_until: Time,
    /// When the `Process` event for this node that counts is due, if one is queued.
    scheduled: Option<Time>,
    /// Bumped by every (re)scheduling and every crash: a `Process` event with
    /// another token is stale and ignored.
    token: u64,
    /// Virtual time each message costs this node (a slow node's is large).
    pub cost: Duration,
    /// How far this node's clock is from true (virtual) time, in microseconds.
    pub clock_offset: i64,
}

/// What a sealed batch owes once it is durable.
struct Owed {
    sends: Vec<(ActorRef, ActorRef, Msg)>,
    decided: Vec<Observation>,
}

enum Event {
    /// A message injected from outside any actor, or a local send.
    Deliver {
        from: Option<ActorRef>,
        to: ActorRef,
        msg: Msg,
    },
    /// An encoded envelope on the wire towards `to_node`.
    Wire { to_node: NodeId, bytes: Vec<u8> },
    Timer {
        to: ActorRef,
        incarnation: Incarnation,
        msg: Msg,
    },
    /// Node `node` handles the next message of one of its actors' mailboxes.
    Process { node: usize, token: u64 },
    /// Node `node`'s flush (begun in its life `life`) is done: the batch is on
    /// disk, and what it owes is released.
    Flushed { node: usize, life: u64 },
    /// Node `node` releases what its committed batch owes.
    Released { node: usize, life: u64 },
}

/// A cross-node message as the network carried it, for leak checks.
#[derive(Clone, Debug)]
pub struct Carried {
    /// Sending node.
    pub from: NodeId,
    /// Receiving node.
    pub to: NodeId,
    /// The message (empty unless [`Cluster::carry_text`]).
    pub msg: String,
    /// The room and epoch of any frame or key it carries.
    pub epochs: Vec<(RoomId, Epoch)>,
    /// The users whose sealed keys it carries.
    pub key_users: Vec<UserId>,
    /// The room and sender of a publish it forwards to the room's home.
    pub publisher: Option<(RoomId, UserId)>,
    /// The Raft messages it carries (between replicas actors).
    pub raft: Vec<Packet>,
}

/// Network weather: applied to every cross-node message not on a cut link.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetFaults {
    /// Chance, in parts per million, that a message is lost.
    pub drop_ppm: u32,
    /// Chance, in parts per million, that a message is delivered twice.
    pub duplicate_ppm: u32,
    /// Up to this much extra latency per message, uniformly drawn: messages on one
    /// link overtake each other.
    pub jitter: Duration,
}

/// The header of a frame (what oracles need of it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// Its room.
    pub room: RoomId,
    /// Its epoch.
    pub epoch: Epoch,
    /// Its sender.
    pub sender: UserId,
    /// Its message id.
    pub id: MessageId,
}

impl From<&Frame> for FrameHeader {
    fn from(f: &Frame) -> Self {
        Self {
            room: f.room,
            epoch: f.epoch,
            sender: f.sender,
            id: f.id,
        }
    }
}

/// What a room decided, as the driver saw it leave the actor (whether or not the
/// reply then reaches the client).
#[derive(Clone, Debug)]
pub enum Observed {
    /// A signed request handled by a room.
    Request {
        /// The request.
        request: Box<Request>,
        /// What the room answered.
        outcome: Outcome,
    },
    /// A frame handled by a room.
    Publish {
        /// The frame.
        frame: FrameHeader,
        /// What the room answered.
        outcome: Outcome,
    },
    /// A room evicted a revoked member: it appended an eviction link, signed as
    /// the room's home (an eviction answers no client, so the driver sees it in
    /// the link the room committed while it handled the revocation).
    Evicted {
        /// The member.
        user: UserId,
    },
}

/// What the driver watches a room's handling of a message for.
enum Watch {
    /// Its answer to a client.
    Reply(Observed),
    /// An eviction of `user`, when the room's chain held `len` links.
    Eviction { user: UserId, len: u64 },
}

/// One decision of a room (see [`Observed`]).
#[derive(Clone, Debug)]
pub struct Observation {
    /// The node whose room decided (with rooms on shard groups: the room's
    /// home, whichever replica applied the entry first).
    pub node: usize,
    /// With rooms on shard groups: the entry (group, index) decided; only the
    /// first replica to apply it is observed.
    pub entry: Option<(u64, u64)>,
    /// The room.
    pub room: RoomId,
    /// What it decided.
    pub what: Observed,
}

/// What one call of [`Cluster::step`] ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stepped {
    /// Node `node` handled a message to `to`.
    Handled {
        /// The node.
        node: usize,
        /// The actor.
        to: ActorRef,
    },
    /// Something else (a message arriving, a timer firing, a dropped message).
    Other,
}

/// A cluster of simulated nodes (see the module docs).
pub struct Cluster {
    /// The nodes, in node id order.
    pub nodes: Vec<SimNode>,
    domain: Domain,
    queue: BTreeMap<(Time, u64), Event>,
    now: Time,
    next_event: u64,
    /// Clients' randomness (keys, nonces, ids): [`Cluster::rng`].
    rng: ChaCha20Rng,
    /// The network's randomness (drops, duplicates, jitter).
    net_rng: ChaCha20Rng,
    /// One-way latency of every link without its own in `link_latency`.
    pub latency: Duration,
    /// One-way latency per link, as (from, to) node indices.
    pub link_latency: BTreeMap<(usize, usize), Duration>,
    /// Network weather.
    pub net: NetFaults,
    /// How nodes interleave their actors' mailboxes (by default, oldest first with
    /// no activation delay: one FIFO per node).
    pub scheduling: Scheduling,
    /// Links that drop everything, as (from, to).
    pub cut: BTreeSet<(NodeId, NodeId)>,
    /// Connections the transport has reported lost, as (observer, peer) indices.
    lost: BTreeSet<(usize, usize)>,
    replies: BTreeMap<(NodeId, u64), Vec<Outcome>>,
    /// Every time a node told its gateway it leads a Raft group, as (node, group,
    /// term), in order.
    pub leading: Vec<(usize, u64, u64)>,
    /// The (node, group) whose stored Raft log took a flipped bit.
    pub flipped: BTreeSet<(usize, u64)>,
    /// Every proposal the workload made to a Raft group, as (node, request,
    /// group, id).
    pub proposed: Vec<(usize, u64, u64, ProposalId)>,
    next_request: u64,
    /// Every cross-node message delivered, in order (only if [`Cluster::carry_log`]).
    pub carried: Vec<Carried>,
    /// Whether [`Cluster::carried`] is kept (on by default).
    pub carry_log: bool,
    /// Whether [`Carried::msg`] is filled in (on by default; it formats every
    /// message).
    pub carry_text: bool,
    /// Whether rooms' decisions are recorded in [`Cluster::observed`].
    pub observe: bool,
    /// Rooms' decisions, in order (only if [`Cluster::observe`]).
    pub observed: Vec<Observation>,
    /// Shard entries (group, index) observed applied (the first replica to
    /// apply one is its observation).
    entries_seen: BTreeSet<(u64, u64)>,
    /// What the first replica to apply each shard entry decided (outcome,
    /// whether the room changed): every other replica must decide alike.
    applied_as: BTreeMap<(u64, u64), (Outcome, bool)>,
    /// Replicas that decided a shard entry otherwise than the first one did.
    pub divergences: Vec<String>,
    /// How many events have run.
    pub events: u64,
    /// How many messages nodes have handled.
    pub handled: u64,
    trace: TraceHasher,
    /// A line per handled message and driver action, if set (for `--trace`).
    pub trace_log: Option<Vec<String>>,
    /// What every handled message did, if set (to compare with the production
    /// driver in a contract test).
    pub journal: Option<Vec<Turn>>,
}

impl Cluster {
    /// `n` nodes with fresh identities and empty stores, from `seed`.
    pub fn new(n: usize, seed: u64) -> Self {
        Self::with_config(n, seed, DomainConfig::default())
    }

    /// Like [`Cluster::new`] with the domain's timing.
    pub fn with_config(n: usize, seed: u64, config: DomainConfig) -> Self {
        let mut ids = derive_rng(seed, 0, "node-ids");
        let mut identities: Vec<Identity> = (0..n).map(|_| Identity::generate(&mut ids)).collect();
        identities.sort_by_key(Identity::node_id);
        let domain = identities
            .iter()
            .fold(Domain::new(config), |d, id| d.with_identity(id.clone()))
            .with_nodes(identities.iter().map(Identity::node_id));
        let nodes = identities
            .into_iter()
            .enumerate()
            .map(|(i, identity)| {
                let store = Arc::new(MemStore::new());
                let batch = Arc::new(Batch::new(Arc::clone(&store) as Arc<dyn Store>));
                SimNode {
                    id: identity.node_id(),
                    identity,
                    store,
                    batch,
                    held: Vec::new(),
                    decided: Vec::new(),
                    committing: None,
                    life: 0,
                    commit_cost: Duration::ZERO,
                    release_delay: Duration::ZERO,
                    actors: Lifecycles::new(),
                    up: true,
                    wiped: false,
                    reborn: false,
                    rng: derive_rng(seed, i as u64, "node"),
                    sched_rng: derive_rng(seed, i as u64, "scheduler"),
                    queued: 0,
                    arrivals: 0,
                    busy_until: START,
                    paused_until: START,
                    scheduled: None,
                    token: 0,
                    cost: Duration::ZERO,
                    clock_offset: 0,
                }
            })
            .collect();
        let mut cluster = Self {
            nodes,
            domain,
            queue: BTreeMap::new(),
            now: START,
            next_event: 0,
            rng: derive_rng(seed, 0, "clients"),
            net_rng: derive_rng(seed, 0, "network"),
            latency: Duration::from_millis(1),
            link_latency: BTreeMap::new(),
            net: NetFaults::default(),
            scheduling: Scheduling::default(),
            cut: BTreeSet::new(),
            lost: BTreeSet::new(),
            replies: BTreeMap::new(),
            leading: Vec::new(),
            flipped: BTreeSet::new(),
            proposed: Vec::new(),
            next_request: 0,
            carried: Vec::new(),
            carry_log: true,
            carry_text: true,
            observe: false,
            observed: Vec::new(),
            entries_seen: BTreeSet::new(),
            applied_as: BTreeMap::new(),
            divergences: Vec::new(),
            events: 0,
            handled: 0,
            trace: TraceHasher::new(),
            trace_log: None,
            journal: None,
        };
        for i in 0..n {
            cluster.begin_run(i);
            cluster.boot(i);
        }
        cluster
    }

    /// Begins a run of node `i` (at creation and at every restart), with an
    /// incarnation drawn from the node's own randomness, as the runtime does.
    fn begin_run(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        let incarnation = node.rng.next_u64();
        domain::begin_run(node.store.as_ref(), incarnation).expect("a run begins");
    }

    /// The nodes' ids, sorted: the cluster as the replicas actors lay it out.
    pub fn sorted_ids(&self) -> Vec<NodeId> {
        let mut ids: Vec<NodeId> = self.nodes.iter().map(|n| n.id).collect();
        ids.sort();
        ids
    }

    /// The current virtual time.
    pub fn now(&self) -> Time {
        self.now
    }

    /// Node `i`'s clock: the virtual time plus its offset.
    pub fn node_now(&self, i: usize) -> Time {
        offset(self.now, self.nodes[i].clock_offset)
    }

    /// The domain's configuration (timing, the frames an epoch may carry).
    pub fn config(&self) -> DomainConfig {
        self.domain.config
    }

    /// The cluster's random source (for clients' keys, nonces and ids).
    pub fn rng(&mut self) -> &mut ChaCha20Rng {
        &mut self.rng
    }

    /// Node `i`'s id.
    pub fn id(&self, i: usize) -> NodeId {
        self.nodes[i].id
    }

    /// The index of the node with id `node`.
    pub fn index(&self, node: NodeId) -> Option<usize> {
        self.nodes.iter().position(|n| n.id == node)
    }

    /// The trace hash so far: every handled message, network decision and driver
    /// action, in order.
    pub fn trace_hash(&self) -> u64 {
        self.trace.finish()
    }

    /// Folds a driver action (a fault, a workload step) into the trace.
    pub fn mark(&mut self, action: &str) {
        self.trace.write_u64(self.now.unix_micros());
        self.trace.write_bytes(action.as_bytes());
        if let Some(log) = &mut self.trace_log {
            log.push(format!("{} ! {action}", self.now.unix_micros()));
        }
    }

    /// The time of the next event, if any.
    pub fn next_event_at(&self) -> Option<Time> {
        self.queue.first_key_value().map(|((t, _), _)| *t)
    }

    fn push(&mut self, at: Time, event: Event) {
        self.queue.insert((at, self.next_event), event);
        self.next_event += 1;
    }

    /// Injects `msg` to `to` from outside any actor (as a gateway would).
    pub fn tell(&mut self, to: ActorRef, msg: impl Into<Msg>) {
        self.push(
            self.now,
            Event::Deliver {
                from: None,
                to,
                msg: msg.into(),
            },
        );
    }

    /// Injects `msg` to `to` as if the actor `from` had sent it now (for scripted
    /// tests: `from` may be on a node outside the cluster, and the network is
    /// bypassed).
    pub fn tell_from(&mut self, from: ActorRef, to: ActorRef, msg: impl Into<Msg>) {
        self.push(
            self.now,
            Event::Deliver {
                from: Some(from),
                to,
                msg: msg.into(),
            },
        );
    }

    /// How many actors are active (or stopping) on node `i`.
    pub fn active_actors(&self, i: usize) -> usize {
        self.nodes[i].actors.len()
    }

    /// Runs the next event if it is due by `end`; `None` (with the clock moved to
    /// `end`) if none is.
    pub fn step(&mut self, end: Time) -> Option<Stepped> {
        let Some(entry) = self.queue.first_entry() else {
            self.now = self.now.max(end);
            return None;
        };
        let (at, _) = *entry.key();
        if at > end {
            self.now = self.now.max(end);
            return None;
        }
        let event = entry.remove();
        self.now = self.now.max(at);
        self.events += 1;
        Some(self.run(event))
    }

    /// Runs events until none is left or virtual time passes `limit` from now.
    /// Returns whether the queue drained.
    pub fn run_for(&mut self, limit: Duration) -> bool {
        let end = self.now.saturating_add(limit);
        while self.step(end).is_some() {}
        self.queue.is_empty()
    }

    /// Runs until nothing but timers of idle actors is left (bounded: one virtual
    /// minute).
    pub fn settle(&mut self) {
        self.run_for(Duration::from_secs(60));
    }

    fn run(&mut self, event: Event) -> Stepped {
        match event {
            Event::Deliver { from, to, msg } => {
                self.arrive(from, to, msg, None);
                Stepped::Other
            }
            Event::Timer {
                to,
                incarnation,
                msg,
            } => {
                self.arrive(None, to, msg, Some(incarnation));
                Stepped::Other
            }
            Event::Wire { to_node, bytes } => {
                let Some(i) = self.index(to_node) else {
                    return Stepped::Other;
                };
                self.trace.write_u64(self.now.unix_micros());
                self.trace.write_bytes(&bytes);
                if !self.nodes[i].up {
                    return Stepped::Other;
                }
                let envelope = match Envelope::<Msg>::decode(&bytes) {
                    Ok(e) => e,
                    Err(error) => panic!("an envelope this node encoded does not decode: {error}"),
                };
                if self.carry_log {
                    self.carried.push(Carried {
                        from: envelope.from.node,
                        to: to_node,
                        msg: if self.carry_text {
                            format!("{:?}", envelope.msg)
                        } else {
                            String::new()
                        },
                        epochs: epochs_in(&envelope.msg),
                        key_users: key_users_in(&envelope.msg),
                        publisher: publisher_in(&envelope.msg),
                        raft: match &envelope.msg {
                            Msg::Replicas(ReplicasMsg::Raft { packets, .. }) => packets.clone(),
                            _ => Vec::new(),
                        },
                    });
                }
                // As the runtime does: other nodes reach only a few addresses.
                if !self.domain.accepts_remote(&envelope.from, &envelope.to) {
                    return Stepped::Other;
                }
                self.arrive(Some(envelope.from), envelope.to, envelope.msg, None);
                Stepped::Other
            }
            Event::Process { node, token } => self.process(node, token),
            Event::Flushed { node, life } => {
                self.flushed(node, life);
                Stepped::Other
            }
            Event::Released { node, life } => {
                self.released(node, life);
                Stepped::Other
            }
        }
    }

    /// A message reaches node `to.node`: the gateway's are recorded at once; the
    /// rest go through the actor's lifecycle: queued in its mailbox (activating it
    /// if it is inactive) or held while it stops; a timer of an incarnation that is
    /// gone or stopping is dropped.
    fn arrive(
        &mut self,
        from: Option<ActorRef>,
        to: ActorRef,
        msg: Msg,
        timer: Option<Incarnation>,
    ) {
        let Some(i) = self.index(to.node) else { return };
        if !self.nodes[i].up {
            return;
        }
        if to.kind == ActorKind::GATEWAY {
            // Replies are collected; `ClientMsg::Revoked` (close a revoked user's
            // connections) has nothing to close here: clients read stores directly.
            match msg {
                Msg::Client(ClientMsg::Reply { request, outcome }) => {
                    self.replies
                        .entry((to.node, request))
                        .or_default()
                        .push(outcome);
                }
                Msg::Client(ClientMsg::Leading { group, term }) => {
                    self.trace.write_u64(group);
                    self.trace.write_u64(term);
                    self.leading.push((i, group, term));
                }
                _ => {}
            }
            return;
        }
        if timer.is_some_and(|tag| !self.nodes[i].actors.timer_fires(&to, tag)) {
            return;
        }
        let now = self.now;
        let activation = self.activation_delay(i, &to);
        let node = &mut self.nodes[i];
        let arrival = node.arrivals;
        node.arrivals += 1;
        node.queued += 1;
        let pending = Pending {
            from,
            to,
            msg,
            timer,
            arrival,
        };
        let activate = |_| Mailbox::new(now.saturating_add(activation));
        let Some(pending) = node.actors.arrive(to, pending, activate) else {
            // Held for the next incarnation, which the drained mailbox starts.
            return;
        };
        let Some(slot) = node.actors.get_mut(&to) else {
            return;
        };
        slot.driver.queue.push_back(pending);
        let ready = slot.driver.ready_from(now);
        self.wake(i, ready);
    }

    /// How long node `i` takes to activate `to` before it handles a message that
    /// starts an incarnation: zero if it is active or stopping (drawn only when it
    /// counts, so the scheduler's stream does not depend on the rest).
    fn activation_delay(&mut self, i: usize, to: &ActorRef) -> Duration {
        if self.nodes[i].actors.get(to).is_some() {
            return Duration::ZERO;
        }
        self.draw_activation(i)
    }

    /// One activation delay for node `i`, up to [`Scheduling::activation_max`].
    fn draw_activation(&mut self, i: usize) -> Duration {
        let max = u64::try_from(self.scheduling.activation_max.as_micros()).unwrap_or(u64::MAX);
        if max == 0 {
            return Duration::ZERO;
        }
        Duration::from_micros(self.nodes[i].sched_rng.next_u64() % (max + 1))
    }

    /// Makes sure node `i` runs by `ready` (or once it is done with its current
    /// message): queues a `Process` event unless one is due by then.
    fn wake(&mut self, i: usize, ready: Time) {
        let node = &mut self.nodes[i];
        let at = ready.max(node.busy_until).max(self.now);
        if node.scheduled.is_some_and(|s| s <= at) {
            return;
        }
        node.token += 1;
        node.scheduled = Some(at);
        let token = node.token;
        self.push(at, Event::Process { node: i, token });
    }

    /// Queues node `i`'s next `Process` event for when the earliest of its
    /// mailboxes is ready, if any holds a message.
    fn reschedule(&mut self, i: usize) {
        let now = self.now;
        debug_assert_eq!(
            self.nodes[i].queued,
            self.nodes[i]
                .actors
                .iter()
                .map(|(_, slot)| slot.driver.queue.len() + slot.held_len())
                .sum::<usize>(),
            "every waiting message is in a mailbox or held"
        );
        let next = self.nodes[i]
            .actors
            .iter()
            .filter(|(_, slot)| !slot.driver.queue.is_empty())
            .map(|(_, slot)| slot.driver.ready_from(now))
            .min();
        if let Some(ready) = next {
            self.wake(i, ready);
        }
    }

    /// The actor whose mailbox node `i` runs now, if one is ready.
    fn pick(&mut self, i: usize) -> Option<ActorRef> {
        let now = self.now;
        let interleave = self.scheduling.interleave;
        let node = &mut self.nodes[i];
        let actors = &node.actors;
        let ready = || {
            actors
                .iter()
                .filter(move |(_, slot)| !slot.driver.queue.is_empty() && slot.driver.ready(now))
        };
        match interleave {
            Interleave::Arrival => ready()
                .min_by_key(|(_, slot)| slot.driver.queue.front().map_or(u64::MAX, |p| p.arrival))
                .map(|(to, _)| *to),
            Interleave::Random => {
                let count = ready().count();
                if count == 0 {
                    return None;
                }
                let k = if count == 1 {
                    0
                } else {
                    (node.sched_rng.next_u64() % count as u64) as usize
                };
                ready().nth(k).map(|(to, _)| *to)
            }
        }
    }

    fn process(&mut self, i: usize, token: u64) -> Stepped {
        {
            let node = &mut self.nodes[i];
            if node.token != token || !node.up {
                return Stepped::Other;
            }
            node.scheduled = None;
            if node.paused_until > self.now {
                let until = node.paused_until;
                self.wake(i, until);
                return Stepped::Other;
            }
            if node.committing.is_some() && batch_full(&node.batch) {
                // A full batch waits for the one before to be durable: `released`
                // schedules the next message.
                return Stepped::Other;
            }
        }
        let Some(to) = self.pick(i) else {
            self.close_batch(i);
            self.reschedule(i);
            return Stepped::Other;
        };
        let now = self.now;
        let node = &mut self.nodes[i];
        let Some(slot) = node.actors.get_mut(&to) else {
            return Stepped::Other;
        };
        let Some(pending) = slot.driver.queue.pop_front() else {
            return Stepped::Other;
        };
        let incarnation = slot.incarnation();
        node.queued -= 1;
        node.busy_until = now.saturating_add(node.cost);
        let handled = self.deliver(i, incarnation, pending);
        if self.nodes[i].up {
            self.end_if_drained(i, to);
            if self.batch_closes(i) {
                self.close_batch(i);
            }
            self.reschedule(i);
        }
        if handled {
            Stepped::Handled { node: i, to }
        } else {
            Stepped::Other
        }
    }

    /// If `to` on node `i` is stopping and has handled everything queued for its
    /// incarnation, that incarnation ends; what was held meanwhile starts the next
    /// one (after an activation delay), in order.
    fn end_if_drained(&mut self, i: usize, to: ActorRef) {
        let Some(slot) = self.nodes[i].actors.get(&to) else {
            return;
        };
        if slot.phase() != Phase::Stopping || !slot.driver.queue.is_empty() {
            return;
        }
        let (incarnation, held) = (slot.incarnation(), slot.held_len());
        let activation = if held > 0 {
            self.draw_activation(i)
        } else {
            Duration::ZERO
        };
        let ready_at = self.now.saturating_add(activation);
        let actors = &mut self.nodes[i].actors;
        let Some(held) = actors.drained(&to, incarnation, |_| Mailbox::new(ready_at)) else {
            debug_assert!(
                actors.get(&to).is_none(),
                "a drained actor with nothing held is gone"
            );
            return;
        };
        if let Some(slot) = actors.get_mut(&to) {
            slot.driver.queue.extend(held);
        }
    }

    /// Node `i` handles one message for incarnation `incarnation` of its actor,
    /// activating the actor first if this is the incarnation's first message.
    /// Returns whether an actor handled it.
    fn deliver(&mut self, i: usize, incarnation: Incarnation, pending: Pending) -> bool {
        let Pending {
            from,
            to,
            msg,
            timer,
            arrival: _,
        } = pending;
        if timer.is_some_and(|tag| !self.nodes[i].actors.timer_fires(&to, tag)) {
            return false;
        }
        self.trace.write_u64(self.now.unix_micros());
        self.trace.write_u64(i as u64);
        self.trace.write_serialized(&(from, to));
        self.trace.write_serialized(&msg);
        if let Some(log) = &mut self.trace_log {
            log.push(format!(
                "{} n{i} {:?}/{:?} #{} <- {:?}: {msg:?}",
                self.now.unix_micros(),
                to.kind,
                to.key,
                incarnation.get(),
                from.map(|f| (f.node, f.kind))
            ));
        }
        let mut effects = self.activate(i, to, incarnation);
        let observing = self.observing(i, to, &msg);
        let now = self.node_now(i);
        let node = &mut self.nodes[i];
        let store: Arc<Batch> = Arc::clone(&node.batch);
        let Some(handler) = node
            .actors
            .get_mut(&to)
            .and_then(|slot| slot.driver.handler.as_mut())
        else {
            // No actor at this address: the message is dropped.
            self.apply(i, to, incarnation, effects);
            return false;
        };
        let text = self.journal.as_ref().map(|_| format!("{msg:?}"));
        {
            let mut cx = Context::new(to, from, now, &mut node.rng, store.as_ref(), &mut effects)
                .with_durable(store.base().as_ref());
            handler.handle_any(msg, &mut cx);
        }
        self.handled += 1;
        if let (Some(journal), Some(text)) = (&mut self.journal, text) {
            journal.push(Turn::new(to, incarnation, from, text, &effects));
        }
        // Chain links this turn's evictions were matched to (a run may carry two
        // evictions of one user, and only one of them evicts).
        let mut claimed = BTreeSet::new();
        if self.observe && to.kind == ActorKind::REPLICAS {
            self.observe_applied(i, &effects);
        }
        for (watch, effects) in observing.into_iter().zip(per_message(&effects)) {
            match watch {
                Some(Watch::Reply(what)) => self.observe_decision(i, to, what, effects),
                Some(Watch::Eviction { user, len }) => {
                    self.observe_eviction(i, to, user, len, &mut claimed);
                }
                None => {}
            }
        }
        self.apply(i, to, incarnation, effects);
        true
    }

    /// Activates `to` on node `i` from storage if its incarnation has not tried
    /// yet; returns the activation's effects. If it finds no actor, the
    /// incarnation stops: what is queued for it is dropped.
    fn activate(&mut self, i: usize, to: ActorRef, incarnation: Incarnation) -> Vec<Effect<Msg>> {
        let mut effects = Vec::new();
        let now = self.node_now(i);
        let node = &mut self.nodes[i];
        let store: Arc<Batch> = Arc::clone(&node.batch);
        let Some(slot) = node.actors.get_mut(&to) else {
            return effects;
        };
        if slot.driver.activated {
            return effects;
        }
        debug_assert!(slot.driver.handler.is_none());
        slot.driver.activated = true;
        let mut cx = Context::new(to, None, now, &mut node.rng, store.as_ref(), &mut effects)
            .with_durable(store.base().as_ref());
        slot.driver.handler = self.domain.activate(&to, &mut cx);
        if slot.driver.handler.is_none() {
            node.actors.stop(&to, incarnation);
        }
        effects
    }

    /// What to record of a room's decisions on `msg` (on node `i`), if rooms are
    /// observed: one entry per message it carries (a run carries many).
    fn observing(&self, i: usize, to: ActorRef, msg: &Msg) -> Vec<Option<Watch>> {
        if !self.observe || to.kind != ActorKind::ROOM {
            return Vec::new();
        }
        match msg {
            Msg::Room(RoomMsg::Run(run)) => run.iter().map(|m| self.watch(i, to, m)).collect(),
            Msg::Room(msg) => vec![self.watch(i, to, msg)],
            _ => Vec::new(),
        }
    }

    /// What to record of room `to`'s decision on `msg` (on node `i`).
    fn watch(&self, i: usize, to: ActorRef, msg: &RoomMsg) -> Option<Watch> {
        match msg {
            RoomMsg::Request { req, .. } => Some(Watch::Reply(Observed::Request {
                request: Box::new(req.request.clone()),
                outcome: Outcome::Forwarded,
            })),
            RoomMsg::Publish { frame, .. } => Some(Watch::Reply(Observed::Publish {
                frame: FrameHeader::from(frame),
                outcome: Outcome::Forwarded,
            })),
            RoomMsg::Evict { user, .. } | RoomMsg::Revoked { user } => {
                let conclave_actors::actor::ActorKey::Room(room) = to.key else {
                    return None;
                };
                let txn = self.nodes[i].batch.read().ok()?;
                let (len, _) = domain::state::rooms::chain_head(&*txn, room).ok()?;
                Some(Watch::Eviction { user: *user, len })
            }
            _ => None,
        }
    }

    /// Records that room `to` on node `i` evicted `user`, if handling the message
    /// (or the run that carried it) appended the link that does so, signed by
    /// node `i`, to the `len` it held, and no other message of the turn was
    /// matched to that link (`claimed`).
    fn observe_eviction(
        &mut self,
        i: usize,
        to: ActorRef,
        user: UserId,
        len: u64,
        claimed: &mut BTreeSet<u64>,
    ) {
        let conclave_actors::actor::ActorKey::Room(room) = to.key else {
            return;
        };
        let Ok(txn) = self.nodes[i].batch.read() else {
            return;
        };
        // A run appends at most one link per message.
        let most = domain::peer::RUN_MESSAGES_MAX;
        let Ok(added) = domain::state::rooms::links(&*txn, room, len, most) else {
            return;
        };
        let evicted = (len..).zip(&added).find(|(index, link)| {
            !claimed.contains(index)
                && link.link.by == Signer::Node(self.nodes[i].id)
                && matches!(link.link.change, Change::Evict { user: u, .. } if u == user)
        });
        drop(txn);
        if let Some((index, _)) = evicted {
            claimed.insert(index);
            let seen = Observation {
                node: i,
                entry: None,
                room,
                what: Observed::Evicted { user },
            };
            self.nodes[i].decided.push(seen);
        }
    }

    /// Where rooms are sequenced, when they are on shard groups.
    pub fn sharding(&self) -> Option<conclave_actors::domain::room::shard::Sharding> {
        self.domain.sharding()
    }

    /// Records what node `i`'s replicas applied to rooms this turn (see
    /// [`ClientMsg::Applied`]): each entry as the decision of its room's home.
    fn observe_applied(&mut self, i: usize, effects: &[Effect<Msg>]) {
        let applied = effects.iter().filter_map(|e| match e {
            Effect::Send {
                msg: Msg::Client(ClientMsg::Applied { entries }),
                ..
            } => Some(entries),
            _ => None,
        });
        let mut seen = Vec::new();
        {
            let Ok(txn) = self.nodes[i].batch.read() else {
                return;
            };
            for entry in applied.flatten() {
                let key = (entry.group, entry.index);
                let decided = (entry.outcome.clone(), entry.changed);
                match self.applied_as.get(&key) {
                    None => {
                        self.applied_as.insert(key, decided);
                    }
                    Some(first) if *first != decided => self.divergences.push(format!(
                        "n{i} decided entry {} of group {} as {decided:?}, another replica as {first:?}",
                        entry.index, entry.group
                    )),
                    Some(_) => {}
                }
                if let Some(obs) = shard_observation(&*txn, &self.nodes, entry) {
                    seen.push(obs);
                }
            }
        }
        self.nodes[i].decided.extend(seen);
    }

    /// Records what room `to` on node `i` decided, if it answered its client.
    fn observe_decision(
        &mut self,
        i: usize,
        to: ActorRef,
        mut what: Observed,
        effects: &[Effect<Msg>],
    ) {
        let decided = effects.iter().find_map(|e| match e {
            Effect::Send {
                to,
                msg: Msg::Client(ClientMsg::Reply { outcome, .. }),
                ..
            } if to.kind == ActorKind::GATEWAY => Some(outcome.clone()),
            _ => None,
        });
        if let (Some(decided), conclave_actors::actor::ActorKey::Room(room)) = (decided, to.key) {
            match &mut what {
                Observed::Request { outcome, .. } | Observed::Publish { outcome, .. } => {
                    *outcome = decided;
                }
                Observed::Evicted { .. } => {}
            }
            let seen = Observation {
                node: i,
                entry: None,
                room,
                what,
            };
            self.nodes[i].decided.push(seen);
        }
    }

    /// Carries out what incarnation `incarnation` of `me` asked for, in order.
    fn apply(
        &mut self,
        i: usize,
        me: ActorRef,
        incarnation: Incarnation,
        effects: Vec<Effect<Msg>>,
    ) {
        for effect in effects {
            match effect {
                Effect::Send {
                    from,
                    to,
                    msg,
                    durable,
                } => {
                    // Made of durable state only, it leaves at once; under the
                    // mutation, everything does, before the batch that wrote its
                    // state is durable.
                    if durable || mutation::active(Mutation::ReleaseBeforeCommit) {
                        self.send(i, from, to, msg);
                    } else {
                        self.nodes[i].held.push((from, to, msg));
                    }
                }
                Effect::Timer { after, msg } => {
                    let at = self.now.saturating_add(after);
                    self.push(
                        at,
                        Event::Timer {
                            to: me,
                            incarnation,
                            msg,
                        },
                    );
                }
                Effect::Stop => {
                    // It drains its mailbox; what arrives meanwhile is held.
                    self.nodes[i].actors.stop(&me, incarnation);
                }
                Effect::Misrouted => {}
            }
        }
    }

    /// A send leaves node `i`: to a local actor's mailbox, or onto the network.
    fn send(&mut self, i: usize, from: ActorRef, to: ActorRef, msg: Msg) {
        if to.node == self.nodes[i].id {
            self.arrive(Some(from), to, msg, None);
        } else {
            self.transmit(i, from, to, msg);
        }
    }

    /// Whether node `i`'s batch ends after the message it just handled: it is full,
    /// or no mailbox of the node is ready to add to it now.
    fn batch_closes(&self, i: usize) -> bool {
        let node = &self.nodes[i];
        if batch_full(&node.batch) {
            return true;
        }
        let now = self.now;
        !node
            .actors
            .iter()
            .any(|(_, slot)| !slot.driver.queue.is_empty() && slot.driver.ready(now))
    }

    /// Node `i` seals its open batch and commits it: the batch is durable a
    /// commit cost after the node finished its last message, then what it owes is
    /// released ([`Cluster::flushed`]). A crash in between loses the whole batch,
    /// and what it owes. One batch commits at a time; the node goes on filling the
    /// next one meanwhile.
    fn close_batch(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        let nothing = node.held.is_empty() && node.decided.is_empty() && node.batch.txns() == 0;
        if node.committing.is_some() || nothing {
            return;
        }
        node.batch.seal();
        node.committing = Some(Owed {
            sends: std::mem::take(&mut node.held),
            decided: std::mem::take(&mut node.decided),
        });
        let life = node.life;
        let at = self
            .now
            .max(node.busy_until)
            .saturating_add(node.commit_cost);
        self.push(at, Event::Flushed { node: i, life });
    }

    /// Node `i`'s sealed batch is committed, and what its rooms decided counts.
    /// What it owes leaves now, or, on a node with a release delay, a moment later
    /// ([`Cluster::released`]): a crash in between loses what it owed and keeps
    /// what it wrote.
    fn flushed(&mut self, i: usize, life: u64) {
        let node = &mut self.nodes[i];
        if node.life != life || !node.up {
            return;
        }
        if let Err(error) = node.batch.commit_sealed() {
            panic!("a simulated disk failed to commit a batch: {error}");
        }
        // What the batch's rooms decided is durable now, released or not.
        let decided = node
            .committing
            .as_mut()
            .map(|owed| std::mem::take(&mut owed.decided))
            .unwrap_or_default();
        let delay = node.release_delay;
        let seen = &mut self.entries_seen;
        let first = decided
            .into_iter()
            .filter(|o| o.entry.is_none_or(|e| seen.insert(e)));
        self.observed.extend(first);
        self.mark(&format!("flush n{i}"));
        if delay.is_zero() {
            return self.released(i, life);
        }
        let at = self.now.saturating_add(delay);
        self.push(at, Event::Released { node: i, life });
    }

    /// Node `i` releases what its last committed batch owes: its sends leave. The
    /// open batch may then commit in turn.
    fn released(&mut self, i: usize, life: u64) {
        let node = &mut self.nodes[i];
        if node.life != life || !node.up {
            return;
        }
        if node.paused_until > self.now {
            // Durable, but the paused process sends nothing until it goes on.
            let until = node.paused_until;
            self.push(until, Event::Released { node: i, life });
            return;
        }
        let released = node
            .committing
            .take()
            .map(|owed| owed.sends)
            .unwrap_or_default();
        for (from, to, msg) in released {
            self.send(i, from, to, msg);
        }
        if self.batch_closes(i) {
            self.close_batch(i);
        }
        self.reschedule(i);
    }

    fn chance(&mut self, ppm: u32) -> bool {
        ppm > 0 && self.net_rng.next_u64() % 1_000_000 < u64::from(ppm)
    }

    fn jitter(&mut self) -> Duration {
        let max = u64::try_from(self.net.jitter.as_micros()).unwrap_or(u64::MAX);
        if max == 0 {
            return Duration::ZERO;
        }
        Duration::from_micros(self.net_rng.next_u64() % (max + 1))
    }

    /// Puts a message from node `i` on the wire, through the network's weather.
    fn transmit(&mut self, i: usize, from: ActorRef, to: ActorRef, msg: Msg) {
        let Some(j) = self.index(to.node) else { return };
        if self.cut.contains(&(from.node, to.node)) {
            self.trace.write_bytes(b"cut");
            return;
        }
        if self.chance(self.net.drop_ppm) {
            self.trace.write_bytes(b"drop");
            return;
        }
        let bytes = Envelope { from, to, msg }
            .encode()
            .expect("domain messages fit an envelope");
        let base = self
            .link_latency
            .get(&(i, j))
            .copied()
            .unwrap_or(self.latency);
        let at = self.now.saturating_add(base + self.jitter());
        if self.chance(self.net.duplicate_ppm) {
            self.trace.write_bytes(b"dup");
            let again = self
                .now
                .saturating_add(base + self.jitter() + self.jitter());
            self.push(
                again,
                Event::Wire {
                    to_node: to.node,
                    bytes: bytes.clone(),
                },
            );
        }
        self.push(
            at,
            Event::Wire {
                to_node: to.node,
                bytes,
            },
        );
    }

    /// Pauses node `i`'s process for `length` (see
    /// [`crate::faults::Fault::Pause`]): it handles no message and releases
    /// nothing until then; what arrives meanwhile waits in its mailboxes.
    pub fn pause(&mut self, i: usize, length: Duration) {
        let until = self.now.saturating_add(length);
        let node = &mut self.nodes[i];
        node.paused_until = node.paused_until.max(until);
        node.busy_until = node.busy_until.max(until);
        self.mark(&format!("pause n{i} {length:?}"));
    }

    /// Crashes node `i`: its actors, its mailbox and unsynced writes are gone, and it
    /// receives nothing until [`Cluster::restart`].
    pub fn crash(&mut self, i: usize) {
        self.mark(&format!("crash n{i}"));
        // Its transport is gone with it: it connects afresh after a restart.
        for j in (0..self.nodes.len()).filter(|&j| j != i) {
            self.lost.insert((i, j));
        }
        let node = &mut self.nodes[i];
        node.up = false;
        node.actors.crash();
        node.queued = 0;
        node.scheduled = None;
        node.token += 1;
        node.held.clear();
        node.decided.clear();
        node.committing = None;
        node.life += 1;
        node.batch.discard();
        node.store.crash();
    }

    /// How many messages wait in node `i`'s mailboxes (a node with some is
    /// mid-work: a crash now loses what it was in the middle of).
    pub fn mailbox_len(&self, i: usize) -> usize {
        self.nodes[i].queued
    }

    /// Node `i` is lost for good: crashed, its disk wiped; it never restarts.
    pub fn wipe(&mut self, i: usize) {
        self.crash(i);
        self.mark(&format!("wipe n{i}"));
        let node = &mut self.nodes[i];
        node.wiped = true;
        node.store.wipe();
    }

    /// Crashes node `i` and starts it again at once with an empty store under the
    /// same identity: everything it held is lost for good (it counts as wiped),
    /// but it serves again.
    pub fn reborn(&mut self, i: usize) {
        self.wipe(i);
        self.mark(&format!("reborn n{i}"));
        self.nodes[i].reborn = true;
        // The driver knows the store is new under an old identity: the node's
        // Raft groups rejoin (no vote until caught up).
        self.domain
            .rejoin(self.nodes[i].id, self.nodes[i].store.as_ref())
            .expect("the rejoin mark is written");
        self.start(i);
    }

    /// Restarts node `i` from its store, as the runtime does on start (a wiped node
    /// stays down).
    pub fn restart(&mut self, i: usize) {
        if self.nodes[i].wiped {
            return;
        }
        self.mark(&format!("restart n{i}"));
        self.start(i);
    }

    /// Starts node `i` from its store.
    fn start(&mut self, i: usize) {
        self.nodes[i].up = true;
        self.nodes[i].busy_until = self.now;
        self.nodes[i].paused_until = self.now;
        self.begin_run(i);
        self.boot(i);
    }

    /// Sends node `i` the messages of its start ([`Domain::boot`]).
    fn boot(&mut self, i: usize) {
        let id = self.nodes[i].id;
        let boot = self
            .domain
            .boot(id, self.nodes[i].store.as_ref())
            .expect("boot reads the store");
        for (to, msg) in boot {
            self.tell(to, msg);
        }
    }

    /// Tells node `i`'s peer actor for node `j` that the transport connected again
    /// (as the runtime does on a transport event) — only if the connection was lost
    /// ([`Cluster::disconnected`], or a crash of either node): a connection that
    /// never broke produces no event, so lost messages must be found by retries.
    pub fn connected(&mut self, i: usize, j: usize) {
        if self.lost.remove(&(i, j)) {
            let to = domain::peer_of(self.id(i), self.id(j));
            self.tell(to, domain::PeerMsg::Connected);
        }
    }

    /// Tells node `i`'s peer actor for node `j` that the transport lost it.
    pub fn disconnected(&mut self, i: usize, j: usize) {
        self.lost.insert((i, j));
        let to = domain::peer_of(self.id(i), self.id(j));
        self.tell(to, domain::PeerMsg::Disconnected);
    }

    /// Cuts (or heals) both directions between nodes `i` and `j`.
    pub fn partition(&mut self, i: usize, j: usize, cut: bool) {
        self.cut_link(i, j, cut);
        self.cut_link(j, i, cut);
    }

    /// Cuts (or heals) the direction from node `i` to node `j` only.
    pub fn cut_link(&mut self, i: usize, j: usize, cut: bool) {
        self.mark(&format!("{} n{i}->n{j}", if cut { "cut" } else { "heal" }));
        let link = (self.id(i), self.id(j));
        if cut {
            self.cut.insert(link);
        } else {
            self.cut.remove(&link);
        }
    }

    /// Seeds `user` as an admin of node `i` (the bootstrap).
    pub fn seed_admin(&mut self, i: usize, user: &Identity) {
        let store = &self.nodes[i].store;
        let mut txn = store.write().expect("write");
        domain::state::registry::seed_admin(&mut *txn, &user.public(), self.node_now(i))
            .expect("seed admin");
        txn.commit().expect("commit");
    }

    /// Sends `op`, signed by `user` with node `i`'s clock, to node `i`'s members
    /// actor; returns the request number to look the outcome up with.
    pub fn request(&mut self, i: usize, user: &Identity, op: Op) -> u64 {
        let now = self.node_now(i);
        let req = client::sign(user, now, &mut self.rng, op);
        self.send_signed(i, req)
    }

    /// Sends an already signed request to node `i`.
    pub fn send_signed(&mut self, i: usize, req: domain::SignedRequest) -> u64 {
        let request = self.reply_to(i);
        self.tell(
            members_of(self.id(i)),
            MembersMsg::Request {
                req: Box::new(req),
                reply: request,
            },
        );
        request.request
    }

    /// A new request number (for a request the caller sends itself).
    pub fn new_request(&mut self) -> u64 {
        self.next_request += 1;
        self.next_request
    }

    fn reply_to(&mut self, i: usize) -> ReplyTo {
        self.next_request += 1;
        ReplyTo {
            to: gateway_of(self.id(i)),
            request: self.next_request,
        }
    }

    /// Every outcome received for request `request` on node `i`, in order.
    pub fn outcomes(&self, i: usize, request: u64) -> Vec<Outcome> {
        self.replies
            .get(&(self.id(i), request))
            .cloned()
            .unwrap_or_default()
    }

    /// The final outcome of a request (after any `Forwarded`), after settling.
    pub fn outcome(&mut self, i: usize, request: u64) -> Option<Outcome> {
        self.outcomes(i, request)
            .into_iter()
            .rfind(|o| *o != Outcome::Forwarded)
    }

    /// Runs `op` as `user` on node `i` to its final outcome.
    pub fn call(&mut self, i: usize, user: &Identity, op: Op) -> Outcome {
        let request = self.request(i, user, op);
        self.settle();
        self.outcome(i, request)
            .or_else(|| self.outcomes(i, request).pop())
            .unwrap_or_else(|| panic!("no reply to request {request} on node {i}"))
    }

    /// `user` (homed on node `i`) creates a room; returns its id.
    pub fn create_room(&mut self, i: usize, user: &Identity, policy: Policy) -> RoomId {
        let (room, _key, op) = client::create_room(&mut self.rng, user, self.nodes[i].id, policy)
            .expect("seal the first key");
        let outcome = self.call(i, user, op);
        assert_eq!(outcome, Outcome::Done, "create room");
        room
    }

    /// `room`'s chain as node `i` holds it, verified from its creation (for
    /// scripted tests: it must verify).
    pub fn chain(&self, i: usize, room: RoomId) -> ChainState {
        let txn = self.nodes[i].store.read().expect("read");
        let links = stored_chain(&*txn, room).expect("read the chain");
        ChainState::verify(room, &links)
            .unwrap_or_else(|e| panic!("n{i}'s chain of room {room:?} does not verify: {e}"))
    }

    /// The keys node `i` holds for `user` in `room`, opened and accepted against
    /// the chain node `i` holds (every one must be).
    pub fn keys(
        &self,
        i: usize,
        user: &Identity,
        room: RoomId,
    ) -> BTreeMap<Epoch, conclave_actors::crypto::EpochKey> {
        let chain = self.chain(i, room);
        let txn = self.nodes[i].store.read().expect("read");
        let sealed = domain::state::keys::sealed_for(&*txn, room, user.user_id()).expect("keys");
        let (keys, refused) = client::accept_keys(user, &chain, &sealed);
        assert!(refused.is_empty(), "keys refused: {refused:?}");
        keys
    }

    /// `inviter` (homed on node `i`) invites `invitee` (homed on `home`), with the
    /// key of the current epoch of the chain node `i` holds.
    pub fn invite(
        &mut self,
        i: usize,
        inviter: &Identity,
        room: RoomId,
        invitee: &Identity,
        home: usize,
        role: domain::RoomRole,
    ) -> Outcome {
        let chain = self.chain(i, room);
        let keys = self.keys(i, inviter, room);
        let key = keys
            .get(&chain.epoch)
            .expect("the inviter holds the current key");
        let invitee = Invitee {
            user: invitee.public(),
            home: self.id(home),
            role,
        };
        let op = client::invite(&mut self.rng, inviter, &chain, key, invitee).expect("seal");
        self.call(i, inviter, op)
    }

    /// The room as its home describes it, asked by `user` on node `i`.
    pub fn room_info(&mut self, i: usize, user: &Identity, room: RoomId) -> RoomInfo {
        match self.call(i, user, Op::RoomInfo { room }) {
            Outcome::Room(info) => info,
            other => panic!("room info: {other:?}"),
        }
    }

    /// `remover` (on node `i`) removes `user`, rekeying the room for the members
    /// of the chain node `i` holds.
    pub fn remove(&mut self, i: usize, remover: &Identity, room: RoomId, user: UserId) -> Outcome {
        let chain = self.chain(i, room);
        let (_key, op) = client::remove(&mut self.rng, remover, &chain, user).expect("seal");
        self.call(i, remover, op)
    }

    /// `member` (on node `i`) moves the room to its next epoch, same members.
    pub fn rekey(&mut self, i: usize, member: &Identity, room: RoomId) -> Outcome {
        let chain = self.chain(i, room);
        let (_key, op) = client::rekey(&mut self.rng, member, &chain).expect("seal");
        self.call(i, member, op)
    }

    /// Seals `text` as `user` (on node `i`) with their newest key and publishes it;
    /// returns the request number (run the cluster to get the receipt).
    pub fn publish(&mut self, i: usize, user: &Identity, room: RoomId, text: &[u8]) -> u64 {
        let keys = self.keys(i, user, room);
        let (&epoch, key) = keys.iter().next_back().expect("the publisher holds a key");
        let now = self.node_now(i);
        let frame =
            client::seal(&mut self.rng, user, room, epoch, key, now, text).expect("seal frame");
        self.publish_frame(i, frame)
    }

    /// Seals `text` as `user` for `room` at `epoch` with `key`, now.
    pub fn seal(
        &mut self,
        user: &Identity,
        room: RoomId,
        epoch: Epoch,
        key: &conclave_actors::crypto::EpochKey,
        text: &[u8],
    ) -> Result<conclave_actors::crypto::Frame, conclave_actors::crypto::FrameError> {
        let now = self.now;
        client::seal(&mut self.rng, user, room, epoch, key, now, text)
    }

    /// Publishes an already sealed frame through node `i`.
    pub fn publish_frame(&mut self, i: usize, frame: conclave_actors::crypto::Frame) -> u64 {
        let reply = self.reply_to(i);
        self.tell(members_of(self.id(i)), MembersMsg::Publish { frame, reply });
        reply.request
    }

    /// What `user` (homed on node `i`) can read of `room` there, decrypted, in
    /// sequence order.
    pub fn read(&self, i: usize, user: &Identity, room: RoomId) -> Vec<(Seq, Vec<u8>)> {
        let keys = self.keys(i, user, room);
        let txn = self.nodes[i].store.read().expect("read");
        let Some(vis) = domain::state::rooms::visibility(&*txn, user.user_id(), room).expect("vis")
        else {
            return Vec::new();
        };
        domain::state::rooms::frames(&*txn, room, vis.from, crate::model::ROOM_FRAMES_MAX)
            .expect("frames")
            .into_iter()
            .filter(|(seq, _)| vis.covers(*seq))
            .map(|(seq, frame)| {
                let text = client::open(&frame, &keys)
                    .unwrap_or_else(|e| panic!("frame {seq:?} does not open for its reader: {e}"));
                (seq, text)
            })
            .collect()
    }

    /// Messages waiting for acknowledgement in node `i`'s outboxes, per destination
    /// (only destinations with any).
    pub fn outbox_depths(&self, i: usize) -> Vec<(NodeId, u64)> {
        let Ok(txn) = self.nodes[i].store.read() else {
            return Vec::new();
        };
        let Ok(dests) = conclave_actors::outbox::pending_destinations(&*txn) else {
            return Vec::new();
        };
        dests
            .into_iter()
            .filter_map(|d| {
                conclave_actors::outbox::depth(&*txn, d)
                    .ok()
                    .map(|depth| (d, depth))
            })
            .filter(|(_, depth)| *depth > 0)
            .collect()
    }
}

/// How many links one read of a store's chain takes.
pub const CHAIN_READ_PAGE_LINKS: usize = 256;

/// `room`'s chain as a store holds it, from its creation, read in pages (at most
/// [`CHAIN_LINKS_MAX`] links and one page: more would not verify anyway).
pub fn stored_chain(txn: &dyn ReadTxn, room: RoomId) -> Result<Vec<SignedLink>, StoreError> {
    let mut links: Vec<SignedLink> = Vec::new();
    loop {
        let from = links.len() as u64;
        let page = domain::state::rooms::links(txn, room, from, CHAIN_READ_PAGE_LINKS)?;
        let full = page.len() == CHAIN_READ_PAGE_LINKS;
        links.extend(page);
        if !full || links.len() as u64 > CHAIN_LINKS_MAX {
            return Ok(links);
        }
    }
}

/// `room`'s chain as node `node` holds it, verified from its creation; `None` if
/// it holds none yet, or none that verifies, or its store cannot be read.
pub fn verified_chain(node: &SimNode, room: RoomId) -> Option<ChainState> {
    let txn = node.store.read().ok()?;
    let links = stored_chain(&*txn, room).ok()?;
    ChainState::verify(room, &links).ok()
}

/// `t` shifted by `offset` microseconds.
fn offset(t: Time, offset: i64) -> Time {
    Time::from_unix_micros(t.unix_micros().saturating_add_signed(offset))
}

/// The users whose sealed keys a message carries.
fn key_users_in(msg: &Msg) -> Vec<UserId> {
    use domain::room::Update;
    use domain::{Deliverable, PeerMsg, RoomMsg};
    match msg {
        Msg::Peer(PeerMsg::Deliver {
            msg: Deliverable::Room(RoomMsg::Update(Update::Keys { keys, .. })),
            ..
        }) => keys.iter().map(|(user, _)| *user).collect(),
        _ => Vec::new(),
    }
}

/// The room and sender of the publish a message forwards, if it does.
fn publisher_in(msg: &Msg) -> Option<(RoomId, UserId)> {
    use domain::{Deliverable, PeerMsg, RoomMsg};
    match msg {
        Msg::Peer(PeerMsg::Deliver {
            msg: Deliverable::Room(RoomMsg::Publish { frame, .. }),
            ..
        }) => Some((frame.room, frame.sender)),
        _ => None,
    }
}

/// A turn's effects, split per message it handled: a run's room answers each of
/// its messages with an [`PeerMsg::Applied`] after that message's effects, so each
/// part ends with one; anything else is one part.
fn per_message(effects: &[Effect<Msg>]) -> Vec<&[Effect<Msg>]> {
    let ends_one = |e: &Effect<Msg>| {
        matches!(
            e,
            Effect::Send {
                msg: Msg::Peer(domain::PeerMsg::Applied { .. }),
                ..
            }
        )
    };
    let mut parts: Vec<&[Effect<Msg>]> = effects.split_inclusive(ends_one).collect();
    if parts.is_empty() {
        parts.push(effects);
    }
    parts
}

/// The (room, epoch) of every frame and key a message carries.
fn epochs_in(msg: &Msg) -> Vec<(RoomId, Epoch)> {
    use domain::room::Update;
    use domain::{Deliverable, PeerMsg, RoomMsg};
    let (to, inner) = match msg {
        Msg::Peer(PeerMsg::Deliver { to, msg, .. }) => (to, msg),
        _ => return Vec::new(),
    };
    match inner {
        Deliverable::Room(RoomMsg::Update(Update::Frame { frame, .. })) => {
            vec![(frame.room, frame.epoch)]
        }
        Deliverable::Room(RoomMsg::Publish { frame, .. }) => vec![(frame.room, frame.epoch)],
        Deliverable::Room(RoomMsg::Update(Update::Keys { epoch, keys })) if !keys.is_empty() => {
            match to.key {
                conclave_actors::actor::ActorKey::Room(room) => vec![(room, *epoch)],
                _ => Vec::new(),
            }
        }
        _ => Vec::new(),
    }
}

/// The decision a replica applied as shard entry `applied`, read from its log:
/// what the room's home decided (a frame applied before, or an eviction
/// refused, decides nothing new and is not one).
fn shard_observation(
    txn: &dyn conclave_storage::ReadTxn,
    nodes: &[SimNode],
    applied: &conclave_actors::domain::AppliedEntry,
) -> Option<Observation> {
    use conclave_actors::domain::room::shard::{ShardCommand, ShardEntry};
    let raft_entry =
        conclave_actors::replication::log::entry(txn, applied.group, applied.index).ok()??;
    let max = conclave_actors::replication::layout::PROPOSAL_BYTES_MAX;
    let entry: ShardEntry = conclave_actors::wire::decode_bounded(&raft_entry.data, max).ok()?;
    let outcome = applied.outcome.clone();
    let (what, home) = match entry.command {
        ShardCommand::Request(req) => {
            let home = match &req.request.op {
                Op::CreateRoom { link, .. } => match &link.link.change {
                    Change::Create { home, .. } => Some(*home),
                    _ => None,
                },
                _ => None,
            };
            let what = Observed::Request {
                request: Box::new(req.request.clone()),
                outcome,
            };
            (what, home)
        }
        ShardCommand::Publish(frame)
            if applied.changed || !matches!(outcome, Outcome::Committed { .. }) =>
        {
            let what = Observed::Publish {
                frame: FrameHeader::from(&frame),
                outcome,
            };
            (what, None)
        }
        ShardCommand::Evict(link) if applied.changed => match link.link.change {
            Change::Evict { user, .. } => (Observed::Evicted { user }, None),
            _ => return None,
        },
        _ => return None,
    };
    let home = match home {
        Some(home) => home,
        None => domain::state::rooms::meta(txn, applied.room).ok()??.home,
    };
    let node = nodes.iter().position(|n| n.id == home)?;
    Some(Observation {
        node,
        entry: Some((applied.group, applied.index)),
        room: applied.room,
        what,
    })
}

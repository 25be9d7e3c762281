//! A deterministic driver for the domain actors: several nodes in one thread, one
//! event queue ordered by (virtual time, sequence), one seeded random source, an
//! in-memory network that carries every cross-node message as an encoded
//! [`Envelope`] (so what travels is exactly what would travel over QUIC), and
//! in-memory stores with crash semantics.
//!
//! It hosts the same [`Domain`] the production runtime hosts; the gateway
//! ([`ActorKind::GATEWAY`]) is the driver's own: replies are collected per request.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use conclave_actors::actor::{ActorKind, ActorRef, Context, Effect, Handler, Time};
use conclave_actors::domain::{
    self, client, gateway_of, members_of, ClientMsg, Domain, DomainConfig, Invitee, MembersMsg,
    Msg, Op, Outcome, Policy, ReplyTo, RoomInfo,
};
use conclave_actors::ids::{Epoch, NodeId, RoomId, Seq};
use conclave_actors::wire::Envelope;
use conclave_actors::{Identity, UserId};
use conclave_storage::{MemStore, Store};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

/// Virtual time at which every run starts: 2026-01-01T00:00:00Z, so message ids
/// carry plausible timestamps.
pub const START: Time = Time::from_unix_micros(1_767_225_600_000_000);

/// One simulated node.
pub struct SimNode {
    /// Its id.
    pub id: NodeId,
    /// Its disk.
    pub store: Arc<MemStore>,
    active: BTreeMap<ActorRef, Box<dyn Handler<Domain>>>,
    /// Bumped on every activation, so a passivated actor's timers die with it.
    incarnation: BTreeMap<ActorRef, u64>,
    /// Whether the node is running.
    pub up: bool,
}

enum Event {
    Deliver {
        from: Option<ActorRef>,
        to: ActorRef,
        msg: Msg,
    },
    /// An encoded envelope on the wire towards `to_node`.
    Wire { to_node: NodeId, bytes: Vec<u8> },
    Timer {
        to: ActorRef,
        incarnation: u64,
        msg: Msg,
    },
}

/// A cross-node message as the network carried it, for leak checks.
#[derive(Clone, Debug)]
pub struct Carried {
    /// Sending node.
    pub from: NodeId,
    /// Receiving node.
    pub to: NodeId,
    /// The message.
    pub msg: String,
    /// The room and epoch of any frame or key it carries.
    pub epochs: Vec<(RoomId, Epoch)>,
}

/// A cluster of simulated nodes (see the module docs).
pub struct Cluster {
    /// The nodes, in creation order.
    pub nodes: Vec<SimNode>,
    domain: Domain,
    queue: BTreeMap<(Time, u64), Event>,
    now: Time,
    next_event: u64,
    rng: ChaCha20Rng,
    /// One-way latency of every link.
    pub latency: Duration,
    /// Links that drop everything, as (from, to).
    pub cut: BTreeSet<(NodeId, NodeId)>,
    replies: BTreeMap<(NodeId, u64), Vec<Outcome>>,
    next_request: u64,
    /// Every cross-node message delivered, in order.
    pub carried: Vec<Carried>,
    /// How many events have run.
    pub events: u64,
}

impl Cluster {
    /// `n` nodes with fresh identities and empty stores, from `seed`.
    pub fn new(n: usize, seed: u64) -> Self {
        Self::with_config(n, seed, DomainConfig::default())
    }

    /// Like [`Cluster::new`] with the domain's timing.
    pub fn with_config(n: usize, seed: u64, config: DomainConfig) -> Self {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let mut nodes: Vec<SimNode> = (0..n)
            .map(|_| SimNode {
                id: Identity::generate(&mut rng).node_id(),
                store: Arc::new(MemStore::new()),
                active: BTreeMap::new(),
                incarnation: BTreeMap::new(),
                up: true,
            })
            .collect();
        nodes.sort_by_key(|n| n.id);
        Self {
            nodes,
            domain: Domain::new(config),
            queue: BTreeMap::new(),
            now: START,
            next_event: 0,
            rng,
            latency: Duration::from_millis(1),
            cut: BTreeSet::new(),
            replies: BTreeMap::new(),
            next_request: 0,
            carried: Vec::new(),
            events: 0,
        }
    }

    /// The current virtual time.
    pub fn now(&self) -> Time {
        self.now
    }

    /// The cluster's random source (for clients' keys, nonces and ids).
    pub fn rng(&mut self) -> &mut ChaCha20Rng {
        &mut self.rng
    }

    /// Node `i`'s id.
    pub fn id(&self, i: usize) -> NodeId {
        self.nodes[i].id
    }

    fn index(&self, node: NodeId) -> Option<usize> {
        self.nodes.iter().position(|n| n.id == node)
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

    /// Runs events until none is left or virtual time passes `limit` from now.
    /// Returns whether the queue drained.
    pub fn run_for(&mut self, limit: Duration) -> bool {
        let end = self.now.saturating_add(limit);
        while let Some(entry) = self.queue.first_entry() {
            let (at, _) = *entry.key();
            if at > end {
                self.now = end;
                return false;
            }
            let event = entry.remove();
            self.now = self.now.max(at);
            self.events += 1;
            self.run(event);
        }
        true
    }

    /// Runs until nothing but timers of idle actors is left (bounded: one virtual
    /// minute).
    pub fn settle(&mut self) {
        self.run_for(Duration::from_secs(60));
    }

    fn run(&mut self, event: Event) {
        match event {
            Event::Deliver { from, to, msg } => self.deliver(from, to, msg, None),
            Event::Timer {
                to,
                incarnation,
                msg,
            } => self.deliver(None, to, msg, Some(incarnation)),
            Event::Wire { to_node, bytes } => {
                let Some(i) = self.index(to_node) else { return };
                if !self.nodes[i].up {
                    return;
                }
                let envelope = match Envelope::<Msg>::decode(&bytes) {
                    Ok(e) => e,
                    Err(error) => panic!("an envelope this node encoded does not decode: {error}"),
                };
                self.carried.push(Carried {
                    from: envelope.from.node,
                    to: to_node,
                    msg: format!("{:?}", envelope.msg),
                    epochs: epochs_in(&envelope.msg),
                });
                self.deliver(Some(envelope.from), envelope.to, envelope.msg, None);
            }
        }
    }

    fn deliver(&mut self, from: Option<ActorRef>, to: ActorRef, msg: Msg, timer: Option<u64>) {
        let Some(i) = self.index(to.node) else { return };
        if !self.nodes[i].up {
            return;
        }
        if to.kind == ActorKind::GATEWAY {
            if let Msg::Client(ClientMsg::Reply { request, outcome }) = msg {
                self.replies
                    .entry((to.node, request))
                    .or_default()
                    .push(outcome);
            }
            return;
        }
        let now = self.now;
        let mut effects = Vec::new();
        let node = &mut self.nodes[i];
        if let Some(incarnation) = timer {
            if node.incarnation.get(&to) != Some(&incarnation) || !node.active.contains_key(&to) {
                return;
            }
        }
        let store: Arc<MemStore> = Arc::clone(&node.store);
        if !node.active.contains_key(&to) {
            let mut cx = Context::new(to, None, now, &mut self.rng, store.as_ref(), &mut effects);
            let Some(handler) = self.domain.activate(&to, &mut cx) else {
                return;
            };
            let node = &mut self.nodes[i];
            node.active.insert(to, handler);
            *node.incarnation.entry(to).or_default() += 1;
        }
        let node = &mut self.nodes[i];
        let Some(handler) = node.active.get_mut(&to) else {
            return;
        };
        {
            let mut cx = Context::new(to, from, now, &mut self.rng, store.as_ref(), &mut effects);
            handler.handle_any(msg, &mut cx);
        }
        self.apply(i, to, effects);
    }

    fn apply(&mut self, i: usize, me: ActorRef, effects: Vec<Effect<Msg>>) {
        for effect in effects {
            match effect {
                Effect::Send { from, to, msg } => {
                    if to.node == me.node {
                        self.push(
                            self.now,
                            Event::Deliver {
                                from: Some(from),
                                to,
                                msg,
                            },
                        );
                    } else if !self.cut.contains(&(me.node, to.node)) {
                        let bytes = Envelope { from, to, msg }
                            .encode()
                            .expect("domain messages fit an envelope");
                        let at = self.now.saturating_add(self.latency);
                        self.push(
                            at,
                            Event::Wire {
                                to_node: to.node,
                                bytes,
                            },
                        );
                    }
                }
                Effect::Timer { after, msg } => {
                    let incarnation = self.nodes[i].incarnation.get(&me).copied().unwrap_or(0);
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
                    let node = &mut self.nodes[i];
                    node.active.remove(&me);
                }
                Effect::Misrouted => {}
            }
        }
    }

    /// Crashes node `i`: its actors and unsynced writes are gone, and it receives
    /// nothing until [`Cluster::restart`].
    pub fn crash(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        node.up = false;
        node.active.clear();
        node.store.crash();
    }

    /// Restarts node `i` from its store, as the runtime does on start.
    pub fn restart(&mut self, i: usize) {
        self.nodes[i].up = true;
        let id = self.nodes[i].id;
        let boot = domain::boot(id, self.nodes[i].store.as_ref()).expect("boot reads the store");
        for (to, msg) in boot {
            self.tell(to, msg);
        }
    }

    /// Tells node `i`'s peer actor for node `j` that the transport connected (as
    /// the runtime does on a transport event).
    pub fn connected(&mut self, i: usize, j: usize) {
        let to = domain::peer_of(self.id(i), self.id(j));
        self.tell(to, domain::PeerMsg::Connected);
    }

    /// Cuts (or heals) both directions between nodes `i` and `j`.
    pub fn partition(&mut self, i: usize, j: usize, cut: bool) {
        let (a, b) = (self.id(i), self.id(j));
        for link in [(a, b), (b, a)] {
            if cut {
                self.cut.insert(link);
            } else {
                self.cut.remove(&link);
            }
        }
    }

    /// Seeds `user` as an admin of node `i` (the bootstrap).
    pub fn seed_admin(&mut self, i: usize, user: &Identity) {
        let store = &self.nodes[i].store;
        let mut txn = store.write().expect("write");
        domain::members::seed_admin(&mut *txn, &user.public(), self.now).expect("seed admin");
        txn.commit().expect("commit");
    }

    /// Sends `op`, signed by `user`, to node `i`'s members actor; returns the request
    /// number to look the outcome up with.
    pub fn request(&mut self, i: usize, user: &Identity, op: Op) -> u64 {
        let now = self.now;
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
        let (room, _key, op) =
            client::create_room(&mut self.rng, user, policy).expect("seal the first key");
        let outcome = self.call(i, user, op);
        assert_eq!(outcome, Outcome::Done, "create room");
        room
    }

    /// The keys node `i` holds for `user` in `room`, opened.
    pub fn keys(
        &self,
        i: usize,
        user: &Identity,
        room: RoomId,
    ) -> BTreeMap<Epoch, conclave_actors::crypto::EpochKey> {
        let txn = self.nodes[i].store.read().expect("read");
        let sealed = domain::keys::sealed_for(&*txn, room, user.user_id()).expect("keys");
        let (keys, errors) = client::open_keys(user, room, &sealed);
        assert!(errors.is_empty(), "keys that do not open: {errors:?}");
        keys
    }

    /// `inviter` (homed on node `i`) invites `invitee` (homed on `home`).
    pub fn invite(
        &mut self,
        i: usize,
        inviter: &Identity,
        room: RoomId,
        invitee: &Identity,
        home: usize,
        role: domain::RoomRole,
    ) -> Outcome {
        let keys = self.keys(i, inviter, room);
        let (&epoch, key) = keys.iter().next_back().expect("the inviter holds a key");
        let invitee = Invitee {
            user: invitee.public(),
            home: self.id(home),
            role,
        };
        let op = client::invite(&mut self.rng, inviter, room, epoch, key, invitee).expect("seal");
        self.call(i, inviter, op)
    }

    /// The room as its home describes it, asked by `user` on node `i`.
    pub fn room_info(&mut self, i: usize, user: &Identity, room: RoomId) -> RoomInfo {
        match self.call(i, user, Op::RoomInfo { room }) {
            Outcome::Room(info) => info,
            other => panic!("room info: {other:?}"),
        }
    }

    /// `remover` (on node `i`) removes `user`, rekeying the room.
    pub fn remove(&mut self, i: usize, remover: &Identity, room: RoomId, user: UserId) -> Outcome {
        let info = self.room_info(i, remover, room);
        let (_key, op) = client::remove(&mut self.rng, remover, &info, user).expect("seal");
        self.call(i, remover, op)
    }

    /// Seals `text` as `user` (on node `i`) with their newest key and publishes it;
    /// returns the request number (run the cluster to get the receipt).
    pub fn publish(&mut self, i: usize, user: &Identity, room: RoomId, text: &[u8]) -> u64 {
        let keys = self.keys(i, user, room);
        let (&epoch, key) = keys.iter().next_back().expect("the publisher holds a key");
        let frame = client::seal(&mut self.rng, user, room, epoch, key, self.now, text)
            .expect("seal frame");
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
        let Some(vis) = domain::room::visibility(&*txn, user.user_id(), room).expect("vis") else {
            return Vec::new();
        };
        domain::room::frames(&*txn, room, vis.from, usize::MAX)
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
}

/// The (room, epoch) of every frame and key a message carries.
fn epochs_in(msg: &Msg) -> Vec<(RoomId, Epoch)> {
    use domain::room::Update;
    use domain::{Deliverable, KeysMsg, PeerMsg, RoomMsg};
    let inner = match msg {
        Msg::Peer(PeerMsg::Deliver { msg, .. }) => msg,
        _ => return Vec::new(),
    };
    match inner {
        Deliverable::Room(RoomMsg::Update(Update::Frame { frame, .. })) => {
            vec![(frame.room, frame.epoch)]
        }
        Deliverable::Room(RoomMsg::Publish { frame, .. }) => vec![(frame.room, frame.epoch)],
        Deliverable::Keys(KeysMsg::Store { room, epoch, keys }) if !keys.is_empty() => {
            vec![(*room, *epoch)]
        }
        _ => Vec::new(),
    }
}

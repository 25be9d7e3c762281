//! One simulated run: a cluster built from a seed's [`Options`], a workload and a
//! fault plan drawn from the seed, oracles checked after every event and at the end.
//!
//! A run has three phases:
//! 1. **setup**, without faults: each node's admin is seeded, users are added
//!    (`Op::AddUser`), rooms are created and their first members invited;
//! 2. **chaos**: the workload (publishes, invites, removals with rekey, subscribers
//!    reading history then live) runs while the seed's faults hit the network,
//!    the disks and the clocks;
//! 3. **liveness**: every fault stops, crashed nodes restart (a node lost for good
//!    does not), every transport reports `Connected`, and within
//!    [`LIVENESS_BOUND`] of virtual time every outbox must drain and every member
//!    node converge; then the final checks run.
//!
//! The oracles' model of each room is built from what the room's home *decided*
//! (the driver observes each decision as it leaves the actor), never from what the
//! stores say, so a broken actor cannot vouch for itself. Oracles report failures
//! as values ([`Failure`]), not panics.

use core::fmt;
use core::time::Duration;
use std::collections::{BTreeMap, BTreeSet};

use conclave_actors::actor::{ActorKey, ActorKind, Time};
use conclave_actors::crypto::EpochKey;
use conclave_actors::domain::{
    self, client, History, Invitee, Op, Outcome, Policy, RoomRole, SignedRequest, UserRole,
};
use conclave_actors::ids::{Epoch, MessageId, RoomId, Seq};
use conclave_actors::{Identity, UserId};
use conclave_storage::Store;
use rand_chacha::ChaCha20Rng;
use rand_core::Rng;

use crate::cluster::{derive_rng, Carried, Cluster, Observation, Observed, Stepped, START};
use crate::options::Options;

/// How long, after every fault has stopped, outboxes have to drain and member nodes
/// to converge.
pub const LIVENESS_BOUND: Duration = Duration::from_secs(60);

/// How long the setup phase may take before it counts as failed.
const SETUP_BOUND: Duration = Duration::from_secs(30);

/// The oracles, by name.
pub mod oracle {
    /// No committed frame is lost or replaced, across any crash.
    pub const DURABILITY: &str = "durability";
    /// Every member node sees a room's frames and updates in one order, with no gap
    /// and no duplicate; no request is applied twice.
    pub const ORDER: &str = "order";
    /// No node is sent a frame or key of an epoch in which none of its users was a
    /// member.
    pub const LEAK: &str = "leak";
    /// Frames committed after a removal are of the new epoch, so the removed
    /// member's keys open none of them.
    pub const EPOCH: &str = "epoch";
    /// Only members' frames and managers' changes are accepted, by the home.
    pub const AUTHZ: &str = "authz";
    /// Every delivered frame verifies and decrypts for its members, to what was sent.
    pub const DECRYPT: &str = "decrypt";
    /// Once faults stop, outboxes drain and members converge in bounded time.
    pub const LIVENESS: &str = "liveness";
    /// The fault-free setup did not complete (a bug, or a mutation that breaks
    /// even the fault-free path).
    pub const SETUP: &str = "setup";
}

/// An oracle's verdict against a run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// Which oracle (see [`oracle`]).
    pub oracle: &'static str,
    /// What it found.
    pub detail: String,
    /// Virtual time since the start of the run.
    pub at: Duration,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "[{}] at {:.3}s: {}",
            self.oracle,
            self.at.as_secs_f64(),
            self.detail
        )
    }
}

/// What a run did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Frames published by the workload.
    pub published: u64,
    /// Frames the homes committed.
    pub committed: u64,
    /// Invites and removals the homes applied.
    pub invites: u64,
    /// Removals (with rekey) the homes applied.
    pub removals: u64,
    /// Frames subscribers read, verified and decrypted.
    pub read: u64,
    /// Crashes, wipes and partitions injected.
    pub crashes: u64,
    /// Partitions injected.
    pub partitions: u64,
}

/// The result of one run.
#[derive(Clone, Debug)]
pub struct Report {
    /// What the seed derived.
    pub options: Options,
    /// The first oracle failure, if any.
    pub failure: Option<Failure>,
    /// What the oracles state without failing (what a node lost for good took with it).
    pub notes: Vec<String>,
    /// The trace hash.
    pub hash: u64,
    /// Events the driver ran.
    pub events: u64,
    /// Messages the nodes handled.
    pub handled: u64,
    /// Virtual time simulated.
    pub virtual_time: Duration,
    /// What the workload did.
    pub stats: Stats,
    /// The trace, one line per event, if asked for.
    pub trace: Option<Vec<String>>,
}

/// Runs one seed.
pub fn run(options: &Options) -> Report {
    run_with(options, false)
}

/// Runs one seed, keeping a line per event if `trace`.
pub fn run_with(options: &Options, trace: bool) -> Report {
    let _mutation = MutationGuard::set(options);
    let mut sim = Sim::new(options.clone(), trace);
    sim.run();
    let notes = std::mem::take(&mut sim.notes);
    Report {
        options: options.clone(),
        failure: sim.failure.clone(),
        notes,
        hash: sim.c.trace_hash(),
        events: sim.c.events,
        handled: sim.c.handled,
        virtual_time: sim.c.now().saturating_since(START),
        stats: sim.stats,
        trace: sim.c.trace_log.take(),
    }
}

/// Switches the run's mutation on for its duration (and off again, even on panic).
struct MutationGuard;

impl MutationGuard {
    fn set(options: &Options) -> Self {
        #[cfg(feature = "mutations")]
        conclave_actors::mutation::set(options.mutation);
        #[cfg(not(feature = "mutations"))]
        assert!(
            options.mutation.is_none(),
            "mutations need the `mutations` feature of conclave-sim"
        );
        MutationGuard
    }
}

impl Drop for MutationGuard {
    fn drop(&mut self) {
        #[cfg(feature = "mutations")]
        conclave_actors::mutation::set(None);
    }
}

struct User {
    id: Identity,
    uid: UserId,
    node: usize,
}

/// A room as its home's decisions define it.
struct RoomModel {
    home: usize,
    history: History,
    epoch: u64,
    epoch_start: BTreeMap<u64, u64>,
    /// Per epoch, the nodes that hosted a member at some point of it.
    allowed: BTreeMap<u64, BTreeSet<usize>>,
    /// Current members: node, first readable seq, role.
    members: BTreeMap<UserId, (usize, u64, RoomRole)>,
    /// Removed members: first readable seq and the first seq after removal.
    removed: BTreeMap<UserId, (u64, u64)>,
    /// seq → (message id, epoch).
    committed: BTreeMap<u64, (MessageId, u64)>,
    ids: BTreeMap<MessageId, u64>,
    next_seq: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum OpKey {
    Request(UserId, u64),
    Frame(MessageId),
}

/// A workload request whose outcome may be `Forwarded`.
struct Sent {
    node: usize,
    request: u64,
    room: RoomId,
    key: OpKey,
}

struct PendingRemove {
    node: usize,
    remover: usize,
    target: UserId,
    request: u64,
    deadline: Time,
}

/// A subscriber: `user` reading `room` from their node, history then live.
#[derive(Clone, Copy)]
struct Sub {
    /// The visibility start it follows (a new membership starts over).
    from: u64,
    /// The next sequence number it expects.
    next: u64,
}

enum Fault {
    Crash(usize),
    /// Crash the node once it is mid-work, or at the deadline.
    CrashMidWork(usize),
    Restart(usize),
    Wipe(usize),
    Cut {
        links: Vec<(usize, usize)>,
        symmetric: bool,
    },
    Heal(Vec<(usize, usize)>),
}

struct Sim {
    o: Options,
    c: Cluster,
    wl: ChaCha20Rng,
    faults: Vec<(Duration, Fault)>,
    users: Vec<User>,
    by_uid: BTreeMap<UserId, usize>,
    rooms: BTreeMap<RoomId, RoomModel>,
    room_order: Vec<RoomId>,
    keycache: BTreeMap<(usize, RoomId), BTreeMap<Epoch, EpochKey>>,
    texts: BTreeMap<MessageId, Vec<u8>>,
    subs: BTreeMap<(usize, RoomId), Sub>,
    pending_removes: Vec<PendingRemove>,
    sent: Vec<Sent>,
    decided: BTreeSet<OpKey>,
    applied: BTreeSet<(UserId, u64)>,
    /// Per member node and room: the (epoch, member count) its copy last showed.
    replica_epoch: BTreeMap<(usize, RoomId), (u64, usize)>,
    /// Nodes to crash as soon as they are mid-work, with a deadline.
    crash_armed: BTreeMap<usize, Time>,
    failure: Option<Failure>,
    notes: Vec<String>,
    stats: Stats,
    counter: u64,
}

fn pick<T: Copy>(rng: &mut ChaCha20Rng, items: &[T]) -> Option<T> {
    if items.is_empty() {
        None
    } else {
        Some(items[(rng.next_u64() % items.len() as u64) as usize])
    }
}

fn between(rng: &mut ChaCha20Rng, lo: u64, hi: u64) -> u64 {
    lo + rng.next_u64() % (hi.saturating_sub(lo) + 1)
}

fn chance(rng: &mut ChaCha20Rng, ppm: u32) -> bool {
    rng.next_u64() % 1_000_000 < u64::from(ppm)
}

/// Around `d`: uniformly between half and one and a half of it.
fn around(rng: &mut ChaCha20Rng, d: Duration) -> Duration {
    let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(2);
    Duration::from_micros(between(rng, us / 2, us + us / 2))
}

fn short(bytes: &[u8]) -> String {
    bytes[..4].iter().map(|b| format!("{b:02x}")).collect()
}

impl Sim {
    fn new(o: Options, trace: bool) -> Self {
        let mut c = Cluster::with_config(o.nodes, o.seed, o.domain);
        c.carry_text = false;
        c.observe = true;
        c.scheduling = o.scheduling;
        if trace {
            c.trace_log = Some(Vec::new());
        }
        let mut links = derive_rng(o.seed, 0, "links");
        let max = u64::try_from(o.latency_max.as_micros())
            .unwrap_or(1)
            .max(500);
        for i in 0..o.nodes {
            c.nodes[i].cost = o.base_cost;
            c.nodes[i].clock_offset = o.clock_offsets_ms.get(i).copied().unwrap_or(0) * 1_000;
            for j in 0..o.nodes {
                if i != j {
                    let d = Duration::from_micros(between(&mut links, 500, max));
                    c.link_latency.insert((i, j), d);
                }
            }
        }
        for &(n, cost) in &o.slow {
            if n < o.nodes {
                c.nodes[n].cost = cost;
            }
        }
        let faults = plan(&o);
        Sim {
            wl: derive_rng(o.seed, 0, "workload"),
            o,
            c,
            faults,
            users: Vec::new(),
            by_uid: BTreeMap::new(),
            rooms: BTreeMap::new(),
            room_order: Vec::new(),
            keycache: BTreeMap::new(),
            texts: BTreeMap::new(),
            subs: BTreeMap::new(),
            pending_removes: Vec::new(),
            sent: Vec::new(),
            decided: BTreeSet::new(),
            applied: BTreeSet::new(),
            replica_epoch: BTreeMap::new(),
            crash_armed: BTreeMap::new(),
            failure: None,
            notes: Vec::new(),
            stats: Stats::default(),
            counter: 0,
        }
    }

    fn elapsed(&self) -> Duration {
        self.c.now().saturating_since(START)
    }

    fn fail(&mut self, oracle: &'static str, detail: String) {
        if self.failure.is_none() {
            self.c.mark(&format!("FAIL {oracle}: {detail}"));
            self.failure = Some(Failure {
                oracle,
                detail,
                at: self.elapsed(),
            });
        }
    }

    fn failed(&self) -> bool {
        self.failure.is_some()
    }

    fn live(&self, i: usize) -> bool {
        self.c.nodes[i].up && !self.c.nodes[i].wiped
    }

    fn run(&mut self) {
        self.setup();
        if self.failed() {
            return;
        }
        self.chaos();
        if self.failed() {
            return;
        }
        self.liveness();
        if self.failed() {
            return;
        }
        self.final_checks();
    }

    // ---- driving -------------------------------------------------------------

    /// Runs events due by `end`, checking after each one.
    fn run_until(&mut self, end: Time) {
        while let Some(stepped) = self.c.step(end) {
            self.after_step(stepped);
            if self.failed() {
                return;
            }
        }
    }

    fn after_step(&mut self, stepped: Stepped) {
        if !self.c.observed.is_empty() {
            for obs in std::mem::take(&mut self.c.observed) {
                self.observe(obs);
            }
        }
        if !self.c.carried.is_empty() {
            for carried in std::mem::take(&mut self.c.carried) {
                self.check_leak(&carried);
            }
        }
        if let Stepped::Handled { node, to } = stepped {
            if let (ActorKind::ROOM, ActorKey::Room(room)) = (to.kind, to.key) {
                if self.rooms.get(&room).is_some_and(|m| m.home != node) {
                    self.check_replica_epoch(node, room);
                }
            }
            if self.crash_armed.contains_key(&node) && self.c.mailbox_len(node) > 0 {
                self.crash_armed.remove(&node);
                self.crash(node);
            }
        }
        if let Some((&node, &deadline)) = self.crash_armed.first_key_value() {
            if self.c.now() >= deadline {
                self.crash_armed.remove(&node);
                self.crash(node);
            }
        }
    }

    fn crash(&mut self, i: usize) {
        if self.live(i) {
            self.stats.crashes += 1;
            self.c.crash(i);
            for j in (0..self.o.nodes).filter(|&j| j != i) {
                self.c.disconnected(j, i);
            }
        }
    }

    /// Runs until each of `requests` has a final outcome (or `limit` passes).
    fn await_outcomes(
        &mut self,
        requests: &[(usize, u64)],
        limit: Duration,
    ) -> Vec<Option<Outcome>> {
        let end = self.c.now().saturating_add(limit);
        loop {
            let done = requests
                .iter()
                .all(|&(n, r)| self.c.outcome(n, r).is_some());
            if done || self.failed() {
                break;
            }
            match self.c.step(end) {
                Some(stepped) => self.after_step(stepped),
                None => break,
            }
        }
        requests
            .iter()
            .map(|&(n, r)| self.c.outcome(n, r))
            .collect()
    }

    fn sign(&mut self, user: usize, op: Op) -> SignedRequest {
        let node = self.users[user].node;
        let now = self.c.node_now(node);
        client::sign(&self.users[user].id, now, self.c.rng(), op)
    }

    /// Sends a signed request of `user` to their node, tracking it if it may be
    /// forwarded to a remote home.
    fn send(&mut self, user: usize, room: Option<RoomId>, op: Op) -> u64 {
        let node = self.users[user].node;
        let req = self.sign(user, op);
        let key = OpKey::Request(req.request.user, req.request.nonce);
        let request = self.c.send_signed(node, req);
        if let Some(room) = room {
            self.sent.push(Sent {
                node,
                request,
                room,
                key,
            });
        }
        request
    }

    // ---- setup ---------------------------------------------------------------

    fn setup(&mut self) {
        self.c.mark("setup");
        let mut ids = derive_rng(self.o.seed, 0, "users");
        let mut adds = Vec::new();
        for node in 0..self.o.nodes {
            let admin = Identity::generate(&mut ids);
            self.c.seed_admin(node, &admin);
            for _ in 0..self.o.users_per_node {
                let id = Identity::generate(&mut ids);
                let uid = id.user_id();
                let request = self.c.request(
                    node,
                    &admin,
                    Op::AddUser {
                        user: id.public(),
                        role: UserRole::Member,
                    },
                );
                adds.push((node, request));
                self.by_uid.insert(uid, self.users.len());
                self.users.push(User { id, uid, node });
            }
        }
        for (i, outcome) in self
            .await_outcomes(&adds, SETUP_BOUND)
            .into_iter()
            .enumerate()
        {
            if outcome != Some(Outcome::Done) {
                self.fail(
                    oracle::SETUP,
                    format!("adding user {i} ended with {outcome:?}"),
                );
                return;
            }
        }
        for _ in 0..self.o.rooms {
            let owner = (self.wl.next_u64() % self.users.len() as u64) as usize;
            let history = if self.wl.next_u64() & 1 == 1 {
                History::FromEpoch
            } else {
                History::FromJoin
            };
            let policy = Policy {
                persist: true,
                history,
            };
            let home = self.c.id(self.users[owner].node);
            let created = client::create_room(self.c.rng(), &self.users[owner].id, home, policy);
            let Ok((room, _key, op)) = created else {
                self.fail(oracle::SETUP, "sealing a room's first key failed".into());
                return;
            };
            let request = self.send(owner, None, op);
            let node = self.users[owner].node;
            let outcome = self.await_outcomes(&[(node, request)], SETUP_BOUND);
            if outcome[0] != Some(Outcome::Done) {
                self.fail(
                    oracle::SETUP,
                    format!("creating a room ended with {:?}", outcome[0]),
                );
                return;
            }
            self.room_order.push(room);
            // Its first members, invited by the owner one at a time.
            let invitees = between(&mut self.wl, 1, 3.min(self.users.len() as u64 - 1));
            for _ in 0..invitees {
                let Some(request) = self.invite_as(owner, room, None) else {
                    continue;
                };
                let outcome = self.await_outcomes(&[request], SETUP_BOUND);
                if !matches!(
                    outcome[0],
                    Some(Outcome::Done | Outcome::Denied(domain::Denial::Conflict { .. }))
                ) {
                    self.fail(
                        oracle::SETUP,
                        format!("inviting a first member ended with {:?}", outcome[0]),
                    );
                    return;
                }
            }
        }
    }

    // ---- chaos ---------------------------------------------------------------

    fn chaos(&mut self) {
        self.c.mark("chaos");
        self.c.net.drop_ppm = self.o.drop_ppm;
        self.c.net.duplicate_ppm = self.o.duplicate_ppm;
        self.c.net.jitter = self.o.jitter;
        let start = self.c.now();
        let end = start.saturating_add(self.o.chaos);
        let mut next_step = start.saturating_add(around(&mut self.wl, self.o.step_every));
        let mut fault = 0;
        loop {
            let next_fault = self
                .faults
                .get(fault)
                .map(|(t, _)| start.saturating_add(*t));
            let next = next_fault.map_or(next_step, |f| f.min(next_step)).min(end);
            self.run_until(next);
            if self.failed() || next >= end {
                return;
            }
            if next_fault == Some(next) {
                self.apply_fault(fault);
                fault += 1;
            } else {
                self.step();
                next_step = next_step.saturating_add(around(&mut self.wl, self.o.step_every));
            }
            if self.failed() {
                return;
            }
        }
    }

    fn apply_fault(&mut self, index: usize) {
        let fault = std::mem::replace(&mut self.faults[index].1, Fault::Heal(Vec::new()));
        match fault {
            Fault::Crash(i) => self.crash(i),
            Fault::CrashMidWork(i) => {
                if self.live(i) {
                    let deadline = self.c.now().saturating_add(Duration::from_secs(1));
                    self.crash_armed.insert(i, deadline);
                }
            }
            Fault::Restart(i) => {
                if !self.c.nodes[i].up && !self.c.nodes[i].wiped {
                    self.restart(i);
                }
            }
            Fault::Wipe(i) => {
                if !self.c.nodes[i].wiped {
                    self.stats.crashes += 1;
                    self.c.wipe(i);
                    self.notes.push(format!(
                        "n{i} was lost for good at {:.3}s (disk wiped; it never restarts)",
                        self.elapsed().as_secs_f64()
                    ));
                }
            }
            Fault::Cut { links, symmetric } => {
                self.stats.partitions += 1;
                for &(a, b) in &links {
                    self.c.cut_link(a, b, true);
                    if symmetric {
                        self.c.disconnected(a, b);
                    }
                }
            }
            Fault::Heal(links) => {
                for &(a, b) in &links {
                    self.c.cut_link(a, b, false);
                    self.c.connected(a, b);
                    self.c.connected(b, a);
                }
            }
        }
    }

    fn restart(&mut self, i: usize) {
        self.c.restart(i);
        let others: Vec<usize> = (0..self.o.nodes)
            .filter(|&j| j != i && self.live(j))
            .collect();
        for j in others {
            self.c.connected(i, j);
            self.c.connected(j, i);
        }
        // A home that restarts must still hold everything it committed.
        let homed: Vec<RoomId> = self
            .rooms
            .iter()
            .filter(|(_, m)| m.home == i)
            .map(|(r, _)| *r)
            .collect();
        for room in homed {
            self.check_home(room);
        }
    }

    /// One workload step.
    fn step(&mut self) {
        self.progress_removes();
        let w = self.o.weights;
        let total: u32 = w.iter().sum();
        let mut roll = (self.wl.next_u64() % u64::from(total.max(1))) as u32;
        let mut action = 0;
        for (k, weight) in w.iter().enumerate() {
            if roll < *weight {
                action = k;
                break;
            }
            roll -= weight;
        }
        match action {
            0 => self.publish(),
            1 => self.invite(),
            2 => self.remove(),
            _ => self.read_all(false),
        }
    }

    /// The rooms `user`'s node says they are a member of now.
    fn rooms_of(&self, user: usize) -> Vec<RoomId> {
        let u = &self.users[user];
        let Ok(txn) = self.c.nodes[u.node].store.read() else {
            return Vec::new();
        };
        self.room_order
            .iter()
            .copied()
            .filter(|&room| {
                matches!(
                    domain::state::rooms::visibility(&*txn, u.uid, room),
                    Ok(Some(v)) if v.until.is_none()
                )
            })
            .collect()
    }

    /// The keys `user`'s node holds for them in `room`, opened (cached). A key that
    /// does not open is a `decrypt` failure.
    fn keys(&mut self, user: usize, room: RoomId) -> BTreeMap<Epoch, EpochKey> {
        let node = self.users[user].node;
        let sealed = match self.c.nodes[node].store.read() {
            Ok(txn) => domain::state::keys::sealed_for(&*txn, room, self.users[user].uid)
                .unwrap_or_default(),
            Err(_) => Vec::new(),
        };
        let cache = self.keycache.entry((user, room)).or_default();
        let fresh: Vec<_> = sealed
            .into_iter()
            .filter(|(e, _)| !cache.contains_key(e))
            .collect();
        if !fresh.is_empty() {
            let (opened, errors) = client::open_keys(&self.users[user].id, room, &fresh);
            cache.extend(opened);
            if let Some((epoch, error)) = errors.first() {
                let detail = format!(
                    "n{node} holds a key of room {} epoch {} for user {} that does not open: {error}",
                    short(&room.0),
                    epoch.0,
                    short(&self.users[user].uid.0)
                );
                self.fail(oracle::DECRYPT, detail);
            }
        }
        self.keycache[&(user, room)].clone()
    }

    fn publish(&mut self) {
        let candidates: Vec<usize> = (0..self.users.len())
            .filter(|&u| self.live(self.users[u].node))
            .collect();
        let Some(user) = pick(&mut self.wl, &candidates) else {
            return;
        };
        let rooms = self.rooms_of(user);
        let Some(room) = pick(&mut self.wl, &rooms) else {
            return;
        };
        let keys = self.keys(user, room);
        let epochs: Vec<Epoch> = keys.keys().copied().collect();
        let Some(&newest) = epochs.last() else { return };
        let epoch = if epochs.len() > 1 && chance(&mut self.wl, self.o.stale_publish_ppm) {
            epochs[(self.wl.next_u64() % (epochs.len() as u64 - 1)) as usize]
        } else {
            newest
        };
        self.counter += 1;
        let text = format!("seed {} message {}", self.o.seed, self.counter).into_bytes();
        let node = self.users[user].node;
        let now = self.c.node_now(node);
        let sealed = client::seal(
            self.c.rng(),
            &self.users[user].id,
            room,
            epoch,
            &keys[&epoch],
            now,
            &text,
        );
        let Ok(frame) = sealed else { return };
        let id = frame.id;
        self.c
            .mark(&format!("publish u{user} n{node} epoch {}", epoch.0));
        self.texts.insert(id, text);
        let request = self.c.publish_frame(node, frame);
        self.stats.published += 1;
        self.sent.push(Sent {
            node,
            request,
            room,
            key: OpKey::Frame(id),
        });
    }

    /// `inviter` invites someone (`invitee`, or a random non-member) to `room`.
    /// Returns the request, if one was sent.
    fn invite_as(
        &mut self,
        inviter: usize,
        room: RoomId,
        invitee: Option<usize>,
    ) -> Option<(usize, u64)> {
        let members: BTreeSet<UserId> = self
            .rooms
            .get(&room)
            .map(|m| m.members.keys().copied().collect())
            .unwrap_or_default();
        let invitee = match invitee {
            Some(i) => i,
            None => {
                let candidates: Vec<usize> = (0..self.users.len())
                    .filter(|&u| {
                        !members.contains(&self.users[u].uid)
                            && !self.c.nodes[self.users[u].node].wiped
                    })
                    .collect();
                pick(&mut self.wl, &candidates)?
            }
        };
        let keys = self.keys(inviter, room);
        let (&epoch, key) = keys.iter().next_back()?;
        let role = if self.wl.next_u64() % 10 < 3 {
            RoomRole::Admin
        } else {
            RoomRole::Member
        };
        let home = self.c.id(self.users[invitee].node);
        let op = client::invite(
            self.c.rng(),
            &self.users[inviter].id,
            room,
            epoch,
            key,
            Invitee {
                user: self.users[invitee].id.public(),
                home,
                role,
            },
        )
        .ok()?;
        self.c
            .mark(&format!("invite u{inviter} u{invitee} epoch {}", epoch.0));
        let request = self.send(inviter, Some(room), op);
        Some((self.users[inviter].node, request))
    }

    fn managers(&self, room: RoomId) -> Vec<usize> {
        let Some(m) = self.rooms.get(&room) else {
            return Vec::new();
        };
        m.members
            .iter()
            .filter(|(_, (_, _, role))| role.manages_members())
            .filter_map(|(uid, _)| self.by_uid.get(uid).copied())
            .filter(|&u| self.live(self.users[u].node))
            .collect()
    }

    fn invite(&mut self) {
        let Some(room) = pick(&mut self.wl, &self.room_order.clone()) else {
            return;
        };
        let managers = self.managers(room);
        if let Some(inviter) = pick(&mut self.wl, &managers) {
            self.invite_as(inviter, room, None);
        }
    }

    fn remove(&mut self) {
        let Some(room) = pick(&mut self.wl, &self.room_order.clone()) else {
            return;
        };
        let managers = self.managers(room);
        let Some(remover) = pick(&mut self.wl, &managers) else {
            return;
        };
        let Some(m) = self.rooms.get(&room) else {
            return;
        };
        let me = self.users[remover].uid;
        let own_role = m.members.get(&me).map(|(_, _, r)| *r);
        let target = if own_role != Some(RoomRole::Owner) && self.wl.next_u64().is_multiple_of(5) {
            me
        } else {
            let targets: Vec<UserId> = m
                .members
                .iter()
                .filter(|(u, (_, _, role))| **u != me && *role != RoomRole::Owner)
                .map(|(u, _)| *u)
                .collect();
            let Some(t) = pick(&mut self.wl, &targets) else {
                return;
            };
            t
        };
        // A client asks the home for the room's members first, then seals the next
        // epoch's key to all but the removed member.
        self.c
            .mark(&format!("room info for a removal by u{remover}"));
        let request = self.send(remover, Some(room), Op::RoomInfo { room });
        self.pending_removes.push(PendingRemove {
            node: self.users[remover].node,
            remover,
            target,
            request,
            deadline: self.c.now().saturating_add(Duration::from_secs(10)),
        });
    }

    fn progress_removes(&mut self) {
        let pending = std::mem::take(&mut self.pending_removes);
        for p in pending {
            match self.c.outcome(p.node, p.request) {
                Some(Outcome::Room(info)) => {
                    if !self.live(p.node) {
                        continue;
                    }
                    let removal =
                        client::remove(self.c.rng(), &self.users[p.remover].id, &info, p.target);
                    if let Ok((_key, op)) = removal {
                        self.c.mark(&format!("remove by u{}", p.remover));
                        self.send(p.remover, Some(info.room), op);
                    }
                }
                Some(_) => {}
                None if self.c.now() < p.deadline => self.pending_removes.push(p),
                None => {}
            }
        }
    }

    // ---- oracles during the run ----------------------------------------------

    fn observe(&mut self, obs: Observation) {
        let Observation { node, room, what } = obs;
        match what {
            Observed::Request { request, outcome } => {
                self.decided
                    .insert(OpKey::Request(request.user, request.nonce));
                if outcome != Outcome::Done {
                    return;
                }
                let changes = matches!(
                    request.op,
                    Op::CreateRoom { .. } | Op::Invite { .. } | Op::Remove { .. }
                );
                if changes && !self.applied.insert((request.user, request.nonce)) {
                    self.fail(
                        oracle::ORDER,
                        format!(
                            "room {}: the home applied the same signed request twice ({}): a duplicate delivery was not dropped",
                            short(&room.0),
                            op_name(&request.op)
                        ),
                    );
                    return;
                }
                self.apply_decision(node, room, request.user, request.op);
            }
            Observed::Publish { frame, outcome } => {
                self.decided.insert(OpKey::Frame(frame.id));
                let Outcome::Committed { id, seq } = outcome else {
                    return;
                };
                self.commit(node, room, frame, id, seq);
            }
        }
    }

    fn apply_decision(&mut self, node: usize, room: RoomId, acting: UserId, op: Op) {
        match op {
            Op::CreateRoom { policy, .. } => {
                self.rooms.insert(
                    room,
                    RoomModel {
                        home: node,
                        history: policy.history,
                        epoch: 1,
                        epoch_start: BTreeMap::from([(1, 1)]),
                        allowed: BTreeMap::from([(1, BTreeSet::from([node]))]),
                        members: BTreeMap::from([(acting, (node, 1, RoomRole::Owner))]),
                        removed: BTreeMap::new(),
                        committed: BTreeMap::new(),
                        ids: BTreeMap::new(),
                        next_seq: 1,
                    },
                );
            }
            Op::Invite { invitee, .. } => {
                let Some(target) = self.c.index(invitee.home) else {
                    return;
                };
                let Some(m) = self.rooms.get_mut(&room) else {
                    return;
                };
                if m.home != node {
                    let detail = format!(
                        "room {}: n{node}, not its home, admitted a member",
                        short(&room.0)
                    );
                    self.fail(oracle::AUTHZ, detail);
                    return;
                }
                let since = match m.history {
                    History::FromJoin => m.next_seq,
                    History::FromEpoch => m.epoch_start[&m.epoch],
                };
                let user = UserId(invitee.user.signing);
                m.members.insert(user, (target, since, invitee.role));
                m.removed.remove(&user);
                m.allowed.entry(m.epoch).or_default().insert(target);
                self.stats.invites += 1;
            }
            Op::Remove { user, epoch, .. } => {
                let Some(m) = self.rooms.get_mut(&room) else {
                    return;
                };
                if epoch.0 != m.epoch + 1 {
                    let detail = format!(
                        "room {}: a removal moved the room to epoch {} from epoch {}",
                        short(&room.0),
                        epoch.0,
                        m.epoch
                    );
                    self.fail(oracle::EPOCH, detail);
                    return;
                }
                if let Some((_, since, _)) = m.members.remove(&user) {
                    m.removed.insert(user, (since, m.next_seq));
                }
                m.epoch += 1;
                m.epoch_start.insert(m.epoch, m.next_seq);
                let nodes: BTreeSet<usize> = m.members.values().map(|(n, _, _)| *n).collect();
                m.allowed.insert(m.epoch, nodes);
                self.stats.removals += 1;
            }
            _ => {}
        }
    }

    fn commit(
        &mut self,
        node: usize,
        room: RoomId,
        frame: crate::cluster::FrameHeader,
        id: MessageId,
        seq: Seq,
    ) {
        let r = short(&room.0);
        let Some(m) = self.rooms.get_mut(&room) else {
            self.fail(
                oracle::AUTHZ,
                format!("a frame was committed in unknown room {r}"),
            );
            return;
        };
        let failure = if m.home != node {
            Some((
                oracle::AUTHZ,
                format!(
                    "room {r}: n{node}, not its home n{}, committed a frame",
                    m.home
                ),
            ))
        } else if id != frame.id {
            Some((
                oracle::ORDER,
                format!(
                    "room {r}: a receipt names message {} for frame {}",
                    id.0, frame.id.0
                ),
            ))
        } else if let Some(prev) = m.ids.get(&id) {
            Some((
                oracle::ORDER,
                format!(
                    "room {r}: message {} committed twice, at seq {prev} and seq {}",
                    id.0, seq.0
                ),
            ))
        } else if seq.0 < m.next_seq {
            let was = m
                .committed
                .get(&seq.0)
                .map_or("nothing".to_string(), |(i, _)| format!("message {}", i.0));
            Some((oracle::DURABILITY, format!("room {r}: seq {} committed again (it held {was}): a committed frame was replaced", seq.0)))
        } else if seq.0 > m.next_seq {
            Some((
                oracle::ORDER,
                format!(
                    "room {r}: the home committed seq {} when seq {} was next",
                    seq.0, m.next_seq
                ),
            ))
        } else if frame.epoch.0 != m.epoch {
            Some((oracle::EPOCH, format!(
                "room {r}: a frame of epoch {} was committed at seq {} while the room is at epoch {} (since seq {}): members removed since epoch {} hold the key that opens it",
                frame.epoch.0, seq.0, m.epoch, m.epoch_start[&m.epoch], frame.epoch.0
            )))
        } else if !m.members.contains_key(&frame.sender) {
            Some((
                oracle::AUTHZ,
                format!(
                    "room {r}: a frame of a non-member was committed at seq {}",
                    seq.0
                ),
            ))
        } else {
            None
        };
        if let Some((oracle, detail)) = failure {
            self.fail(oracle, detail);
            return;
        }
        m.committed.insert(seq.0, (id, frame.epoch.0));
        m.ids.insert(id, seq.0);
        m.next_seq += 1;
        self.stats.committed += 1;
    }

    fn check_leak(&mut self, carried: &Carried) {
        // A node is sent sealed keys only for the users it hosts.
        if let Some(to) = self.c.index(carried.to) {
            for user in &carried.key_users {
                if let Some(u) = self.users.iter().find(|u| u.uid == *user) {
                    if u.node != to {
                        let detail = format!(
                            "n{to} was sent a sealed key for a user of n{}: a node receives only its own users' keys",
                            u.node
                        );
                        self.fail(oracle::LEAK, detail);
                        return;
                    }
                }
            }
        }
        for &(room, epoch) in &carried.epochs {
            let Some(m) = self.rooms.get(&room) else {
                continue;
            };
            let Some(to) = self.c.index(carried.to) else {
                continue;
            };
            if to == m.home {
                continue;
            }
            if !m.allowed.get(&epoch.0).is_some_and(|s| s.contains(&to)) {
                let detail = format!(
                    "n{to} was sent a frame or key of room {} epoch {}, but none of its users was a member in that epoch (members' nodes then: {:?})",
                    short(&room.0),
                    epoch.0,
                    m.allowed.get(&epoch.0).cloned().unwrap_or_default()
                );
                self.fail(oracle::LEAK, detail);
                return;
            }
        }
    }

    /// A member node's copy of a room only moves forward: within an epoch members
    /// are only added, and a removal starts the next epoch. Applying an older
    /// update after a newer one (a duplicate, or a replay) would take it back.
    fn check_replica_epoch(&mut self, node: usize, room: RoomId) {
        let now = match self.c.nodes[node].store.read() {
            Ok(txn) => match domain::state::rooms::meta(&*txn, room) {
                Ok(Some(meta)) => (
                    meta.epoch.0,
                    domain::state::rooms::members(&*txn, room).map_or(0, |m| m.len()),
                ),
                _ => return,
            },
            Err(_) => return,
        };
        let seen = self.replica_epoch.entry((node, room)).or_insert(now);
        if now < *seen {
            let detail = format!(
                "n{node}'s copy of room {} went back from epoch {} with {} members to epoch {} with {} members: it applied an older update after a newer one",
                short(&room.0),
                seen.0,
                seen.1,
                now.0,
                now.1
            );
            self.fail(oracle::ORDER, detail);
        } else {
            *seen = now;
        }
    }

    /// Every subscriber reads what is new for it.
    fn read_all(&mut self, strict: bool) {
        for user in 0..self.users.len() {
            for room in self.room_order.clone() {
                self.read(user, room, strict);
                if self.failed() {
                    return;
                }
            }
        }
    }

    /// The subscriber of `user` in `room` reads on from where it is: every frame
    /// must be the next sequence number (history, then live, no gap), the one the
    /// home committed there, and must verify and decrypt to what was sent. A frame
    /// whose key has not arrived yet waits, unless `strict` (the end of the run).
    fn read(&mut self, user: usize, room: RoomId, strict: bool) {
        let node = self.users[user].node;
        if !self.live(node) {
            return;
        }
        let uid = self.users[user].uid;
        let (vis, frames) = {
            let Ok(txn) = self.c.nodes[node].store.read() else {
                return;
            };
            let Ok(Some(vis)) = domain::state::rooms::visibility(&*txn, uid, room) else {
                return;
            };
            let sub = self.subs.entry((user, room)).or_insert(Sub {
                from: vis.from.0,
                next: vis.from.0,
            });
            if sub.from != vis.from.0 {
                *sub = Sub {
                    from: vis.from.0,
                    next: vis.from.0,
                };
            }
            let from = Seq(sub.next);
            let Ok(frames) = domain::state::rooms::frames(&*txn, room, from, usize::MAX) else {
                return;
            };
            (vis, frames)
        };
        let r = short(&room.0);
        for (seq, frame) in frames {
            if !vis.covers(seq) {
                break;
            }
            let Some(sub) = self.subs.get(&(user, room)).copied() else {
                return;
            };
            if seq.0 != sub.next {
                let detail = format!(
                    "a subscriber of u{user} on n{node} in room {r} read seq {} when seq {} was next: a gap",
                    seq.0, sub.next
                );
                self.fail(oracle::ORDER, detail);
                return;
            }
            let committed = self
                .rooms
                .get(&room)
                .and_then(|m| m.committed.get(&seq.0).copied());
            match committed {
                Some((id, _)) if id == frame.id => {}
                Some((id, _)) => {
                    let detail = format!(
                        "n{node} holds message {} at seq {} of room {r}; the home committed message {} there",
                        frame.id.0, seq.0, id.0
                    );
                    self.fail(oracle::ORDER, detail);
                    return;
                }
                None => {
                    let detail = format!(
                        "n{node} holds a frame at seq {} of room {r} that the home never committed",
                        seq.0
                    );
                    self.fail(oracle::ORDER, detail);
                    return;
                }
            }
            let mut keys = self
                .keycache
                .get(&(user, room))
                .cloned()
                .unwrap_or_default();
            if !keys.contains_key(&frame.epoch) {
                keys = self.keys(user, room);
                if self.failed() {
                    return;
                }
            }
            if !keys.contains_key(&frame.epoch) {
                let home_lost = self
                    .rooms
                    .get(&room)
                    .is_some_and(|m| self.c.nodes[m.home].wiped);
                if strict && home_lost {
                    // The key was on its way from a home that is gone for good.
                    self.notes.push(format!(
                        "u{user} on n{node} cannot read seq {} on of room {r} (epoch {}): its key had not left the room's home, lost for good",
                        seq.0, frame.epoch.0
                    ));
                } else if strict {
                    let detail = format!(
                        "u{user} on n{node} may read seq {} of room {r} (epoch {}) but holds no key for that epoch",
                        seq.0, frame.epoch.0
                    );
                    self.fail(oracle::DECRYPT, detail);
                }
                return;
            }
            match client::open(&frame, &keys) {
                Ok(text) => {
                    if self.texts.get(&frame.id).is_some_and(|sent| *sent != text) {
                        let detail = format!(
                            "seq {} of room {r} decrypts on n{node} to something else than was sent",
                            seq.0
                        );
                        self.fail(oracle::DECRYPT, detail);
                        return;
                    }
                }
                Err(error) => {
                    let detail = format!(
                        "seq {} of room {r} does not open for member u{user} on n{node}: {error}",
                        seq.0
                    );
                    self.fail(oracle::DECRYPT, detail);
                    return;
                }
            }
            self.stats.read += 1;
            if let Some(sub) = self.subs.get_mut(&(user, room)) {
                sub.next = seq.0 + 1;
            }
        }
    }

    /// The home of `room` (if alive) holds every frame it committed, as committed.
    fn check_home(&mut self, room: RoomId) {
        let Some(m) = self.rooms.get(&room) else {
            return;
        };
        let home = m.home;
        if self.c.nodes[home].wiped {
            return;
        }
        let stored: BTreeMap<u64, MessageId> = match self.c.nodes[home].store.read() {
            Ok(txn) => domain::state::rooms::frames(&*txn, room, Seq(1), usize::MAX)
                .unwrap_or_default()
                .into_iter()
                .map(|(s, f)| (s.0, f.id))
                .collect(),
            Err(_) => return,
        };
        let r = short(&room.0);
        for (&seq, &(id, _)) in &m.committed {
            match stored.get(&seq) {
                Some(&got) if got == id => {}
                Some(&got) => {
                    let detail = format!(
                        "room {r}: home n{home} holds message {} at seq {seq}, where it committed message {}",
                        got.0, id.0
                    );
                    self.fail(oracle::DURABILITY, detail);
                    return;
                }
                None => {
                    let detail = format!(
                        "room {r}: committed frame seq {seq} (message {}) is gone from home n{home}'s store",
                        id.0
                    );
                    self.fail(oracle::DURABILITY, detail);
                    return;
                }
            }
        }
        if let Some((&seq, _)) = stored.iter().find(|(s, _)| !m.committed.contains_key(s)) {
            let detail = format!(
                "room {r}: home n{home} holds a frame at seq {seq} it never reported committed"
            );
            self.fail(oracle::ORDER, detail);
        }
    }

    // ---- liveness and the end ------------------------------------------------

    fn liveness(&mut self) {
        self.c.mark("liveness: every fault stops");
        self.crash_armed.clear();
        self.c.net = Default::default();
        let cut: Vec<_> = self.c.cut.iter().copied().collect();
        for (a, b) in cut {
            if let (Some(i), Some(j)) = (self.c.index(a), self.c.index(b)) {
                self.c.cut_link(i, j, false);
            }
        }
        for i in 0..self.o.nodes {
            self.c.nodes[i].cost = self.o.base_cost;
            if !self.c.nodes[i].up && !self.c.nodes[i].wiped {
                self.c.restart(i);
            }
        }
        for i in 0..self.o.nodes {
            for j in 0..self.o.nodes {
                if i != j && self.live(i) && self.live(j) {
                    self.c.connected(i, j);
                }
            }
        }
        let deadline = self.c.now().saturating_add(LIVENESS_BOUND);
        let slice = Duration::from_millis(250);
        let mut quiet = 0;
        loop {
            let until = self.c.now().saturating_add(slice);
            self.run_until(until);
            if self.failed() {
                return;
            }
            let (transport, state) = self.pending();
            if transport.is_empty() && state.is_empty() {
                return;
            }
            if transport.is_empty() {
                quiet += 1;
                if quiet >= 4 {
                    // Nothing is on its way any more: what is missing now is lost.
                    let oracle = state[0].0;
                    let items: Vec<String> = state.into_iter().map(|(_, s)| s).collect();
                    let detail = format!(
                        "lost for good: every outbox is drained and every forwarded request arrived, yet {}",
                        summarize(&items)
                    );
                    self.fail(oracle, detail);
                    return;
                }
            } else {
                quiet = 0;
            }
            if self.c.now() >= deadline {
                let mut all = transport;
                all.extend(state.into_iter().map(|(_, s)| s));
                let detail = format!(
                    "not converged {:?} after every fault stopped: {}",
                    LIVENESS_BOUND,
                    summarize(&all)
                );
                self.fail(oracle::LIVENESS, detail);
                return;
            }
        }
    }

    /// What has not converged yet: (outboxes and forwarded requests, member nodes'
    /// state with the oracle each gap belongs to).
    fn pending(&mut self) -> (Vec<String>, Vec<(&'static str, String)>) {
        let mut transport = Vec::new();
        let mut state = Vec::new();
        for i in 0..self.o.nodes {
            if !self.live(i) {
                continue;
            }
            for (dest, depth) in self.c.outbox_depths(i) {
                if let Some(j) = self.c.index(dest) {
                    if !self.c.nodes[j].wiped {
                        transport.push(format!("outbox n{i}->n{j} holds {depth}"));
                    }
                }
            }
        }
        for s in &self.sent {
            let home = self.rooms.get(&s.room).map(|m| m.home);
            let Some(home) = home else { continue };
            if !self.live(s.node) || self.c.nodes[home].wiped || self.decided.contains(&s.key) {
                continue;
            }
            if self
                .c
                .outcomes(s.node, s.request)
                .contains(&Outcome::Forwarded)
            {
                transport.push(format!(
                    "a request forwarded by n{} never reached home n{home}",
                    s.node
                ));
            }
        }
        for (&room, m) in &self.rooms {
            if self.c.nodes[m.home].wiped {
                continue;
            }
            let r = short(&room.0);
            for (uid, &(node, since, _)) in &m.members {
                if !self.live(node) {
                    continue;
                }
                let Ok(txn) = self.c.nodes[node].store.read() else {
                    continue;
                };
                let vis = domain::state::rooms::visibility(&*txn, *uid, room)
                    .ok()
                    .flatten();
                let u = self.by_uid.get(uid).copied().unwrap_or(usize::MAX);
                match vis {
                    Some(v) if v.until.is_none() && v.from.0 == since => {}
                    other => {
                        state.push((oracle::ORDER, format!(
                            "n{node} does not show u{u} as a member of room {r} from seq {since} ({other:?})"
                        )));
                        continue;
                    }
                }
                let stored: BTreeSet<u64> =
                    domain::state::rooms::frames(&*txn, room, Seq(since), usize::MAX)
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(s, _)| s.0)
                        .collect();
                let missing: Vec<u64> = (since..m.next_seq)
                    .filter(|s| !stored.contains(s))
                    .collect();
                if !missing.is_empty() {
                    state.push((
                        oracle::ORDER,
                        format!(
                            "n{node} lacks seqs {} of room {r} that u{u} may read",
                            ranges(&missing)
                        ),
                    ));
                }
                let held: BTreeSet<u64> = domain::state::keys::sealed_for(&*txn, room, *uid)
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(e, _)| e.0)
                    .collect();
                let needed: BTreeSet<u64> =
                    m.committed.range(since..).map(|(_, (_, e))| *e).collect();
                if let Some(e) = needed.iter().find(|e| !held.contains(e)) {
                    state.push((oracle::DECRYPT, format!(
                        "n{node} holds no key of room {r} epoch {e} for member u{u}, who may read frames of that epoch"
                    )));
                }
            }
            for (uid, &(since, until)) in &m.removed {
                let Some(&u) = self.by_uid.get(uid) else {
                    continue;
                };
                let node = self.users[u].node;
                if !self.live(node) {
                    continue;
                }
                let Ok(txn) = self.c.nodes[node].store.read() else {
                    continue;
                };
                let vis = domain::state::rooms::visibility(&*txn, *uid, room)
                    .ok()
                    .flatten();
                if !vis.is_some_and(|v| v.until == Some(Seq(until)) && v.from.0 == since) {
                    state.push((oracle::ORDER, format!(
                        "n{node} does not show u{u} as removed from room {r} at seq {until} ({vis:?})"
                    )));
                }
            }
        }
        (transport, state)
    }

    fn final_checks(&mut self) {
        self.c.mark("final checks");
        for room in self.room_order.clone() {
            self.check_home(room);
            if self.failed() {
                return;
            }
        }
        // Every copy of every room holds, at each sequence number, the frame its
        // home committed there.
        for i in 0..self.o.nodes {
            if !self.live(i) {
                continue;
            }
            for room in self.room_order.clone() {
                let stored = match self.c.nodes[i].store.read() {
                    Ok(txn) => domain::state::rooms::frames(&*txn, room, Seq(1), usize::MAX)
                        .unwrap_or_default(),
                    Err(_) => continue,
                };
                let Some(m) = self.rooms.get(&room) else {
                    continue;
                };
                for (seq, frame) in stored {
                    if m.committed.get(&seq.0).map(|(id, _)| *id) != Some(frame.id) {
                        let detail = format!(
                            "n{i} holds message {} at seq {} of room {}; the home committed {:?} there",
                            frame.id.0,
                            seq.0,
                            short(&room.0),
                            m.committed.get(&seq.0).map(|(id, _)| id.0)
                        );
                        self.fail(oracle::ORDER, detail);
                        return;
                    }
                }
            }
        }
        self.read_all(true);
        if self.failed() {
            return;
        }
        self.state_losses();
    }

    /// What a node lost for good took with it, stated.
    fn state_losses(&mut self) {
        let wiped: Vec<usize> = (0..self.o.nodes)
            .filter(|&i| self.c.nodes[i].wiped)
            .collect();
        for w in wiped {
            for (&room, m) in &self.rooms {
                if m.home != w {
                    continue;
                }
                let mut surviving = BTreeSet::new();
                for i in (0..self.o.nodes).filter(|&i| self.live(i)) {
                    if let Ok(txn) = self.c.nodes[i].store.read() {
                        for (seq, frame) in
                            domain::state::rooms::frames(&*txn, room, Seq(1), usize::MAX)
                                .unwrap_or_default()
                        {
                            if m.committed.get(&seq.0).map(|(id, _)| *id) == Some(frame.id) {
                                surviving.insert(seq.0);
                            }
                        }
                    }
                }
                let lost: Vec<u64> = m
                    .committed
                    .keys()
                    .copied()
                    .filter(|s| !surviving.contains(s))
                    .collect();
                self.notes.push(format!(
                    "room {} was homed on n{w}, lost for good: of its {} committed frames, {} survive on member nodes; {} were held only by n{w} and are lost{}",
                    short(&room.0),
                    m.committed.len(),
                    surviving.len(),
                    lost.len(),
                    if lost.is_empty() { String::new() } else { format!(" (seqs {})", ranges(&lost)) }
                ));
            }
            let id = self.c.id(w);
            let mut undeliverable = 0;
            for i in (0..self.o.nodes).filter(|&i| self.live(i)) {
                undeliverable += self
                    .c
                    .outbox_depths(i)
                    .into_iter()
                    .filter(|(d, _)| *d == id)
                    .map(|(_, n)| n)
                    .sum::<u64>();
            }
            if undeliverable > 0 {
                self.notes.push(format!(
                    "{undeliverable} messages wait in outboxes towards n{w} and will never be delivered"
                ));
            }
        }
    }
}

fn op_name(op: &Op) -> &'static str {
    match op {
        Op::AddUser { .. } => "add user",
        Op::RevokeUser { .. } => "revoke user",
        Op::ListUsers => "list users",
        Op::CreateRoom { .. } => "create room",
        Op::Invite { .. } => "invite",
        Op::Remove { .. } => "remove",
        Op::RoomInfo { .. } => "room info",
        Op::ListRooms => "list rooms",
    }
}

/// "3..5, 9" for [3, 4, 5, 9].
fn ranges(seqs: &[u64]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < seqs.len() {
        let start = seqs[i];
        let mut end = start;
        while i + 1 < seqs.len() && seqs[i + 1] == end + 1 {
            i += 1;
            end = seqs[i];
        }
        out.push(if start == end {
            start.to_string()
        } else {
            format!("{start}..{end}")
        });
        i += 1;
    }
    out.join(", ")
}

fn summarize(items: &[String]) -> String {
    const SHOWN: usize = 6;
    let mut s = items
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join("; ");
    if items.len() > SHOWN {
        s.push_str(&format!("; and {} more", items.len() - SHOWN));
    }
    s
}

/// The seed's fault plan: when each fault happens, relative to the start of the
/// chaos.
fn plan(o: &Options) -> Vec<(Duration, Fault)> {
    let mut rng = derive_rng(o.seed, 0, "faults");
    let n = o.nodes;
    let mut faults: Vec<(Duration, Fault)> = Vec::new();
    if n >= 2 {
        if let Some(p) = o.partitions {
            let mut t = Duration::ZERO;
            loop {
                t += around(&mut rng, p.every);
                if t >= o.chaos {
                    break;
                }
                let length = Duration::from_millis(between(
                    &mut rng,
                    50,
                    u64::try_from(p.length_max.as_millis())
                        .unwrap_or(50)
                        .max(50),
                ));
                let (links, symmetric) = if chance(&mut rng, p.asymmetric_ppm) {
                    let a = (rng.next_u64() % n as u64) as usize;
                    let b = (a + 1 + (rng.next_u64() % (n as u64 - 1)) as usize) % n;
                    (vec![(a, b)], false)
                } else {
                    let mut side: Vec<bool> = (0..n).map(|_| rng.next_u64() & 1 == 1).collect();
                    if side.iter().all(|&s| s == side[0]) {
                        let k = (rng.next_u64() % n as u64) as usize;
                        side[k] = !side[k];
                    }
                    let mut links = Vec::new();
                    for a in 0..n {
                        for b in 0..n {
                            if side[a] != side[b] {
                                links.push((a, b));
                            }
                        }
                    }
                    (links, true)
                };
                faults.push((t + length, Fault::Heal(links.clone())));
                faults.push((t, Fault::Cut { links, symmetric }));
            }
        }
    }
    if let Some(c) = o.crashes {
        let mut t = Duration::ZERO;
        loop {
            t += around(&mut rng, c.every);
            if t >= o.chaos {
                break;
            }
            let node = (rng.next_u64() % n as u64) as usize;
            let down = Duration::from_millis(between(
                &mut rng,
                20,
                u64::try_from(c.down_max.as_millis()).unwrap_or(20).max(20),
            ));
            if !chance(&mut rng, c.stay_down_ppm) {
                faults.push((t + down, Fault::Restart(node)));
            }
            if chance(&mut rng, c.mid_work_ppm) {
                faults.push((t, Fault::CrashMidWork(node)));
            } else {
                faults.push((t, Fault::Crash(node)));
            }
        }
    }
    if o.wipe {
        let node = (rng.next_u64() % n as u64) as usize;
        let chaos = u64::try_from(o.chaos.as_micros()).unwrap_or(0);
        let at = Duration::from_micros(between(&mut rng, chaos / 4, chaos * 3 / 4));
        faults.push((at, Fault::Wipe(node)));
    }
    // Stable: faults at the same instant keep the order they were drawn in.
    faults.sort_by_key(|(t, _)| *t);
    faults.retain(|(t, _)| *t < o.chaos);
    faults
}

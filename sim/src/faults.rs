//! The faults: the seed's plan (partitions, crashes, a node lost for good, nodes
//! lying to their own clients, drawn when the run starts) and how each one is
//! applied to the cluster.

use core::time::Duration;
use std::collections::{BTreeMap, BTreeSet};

use conclave_actors::actor::Time;
use conclave_actors::crypto::{seal_epoch_key, EpochKey};
use conclave_actors::domain;
use conclave_actors::ids::{Epoch, RoomId};
use conclave_actors::replication::log;
use conclave_actors::{PublicIdentity, UserId};
use conclave_storage::Store;
use rand_chacha::ChaCha20Rng;
use rand_core::Rng;

use crate::cluster::{derive_rng, Cluster, START};
use crate::draw::{around, between, chance, pick};
use crate::options::{Crashes, Options, Partitions};
use crate::workload::Roster;

/// How long a crash waits for its node to be mid-work before it happens anyway.
pub const CRASH_MID_WORK_WAIT_MS_MAX: u64 = 1_000;

/// The shortest partition.
const PARTITION_MS_MIN: u64 = 50;

/// The shortest time a crashed node stays down.
const DOWN_MS_MIN: u64 = 20;

/// Whether node `i` is up and not lost for good.
pub fn live(c: &Cluster, i: usize) -> bool {
    c.nodes[i].up && !c.nodes[i].wiped
}

/// One fault of the plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Crash the node.
    Crash(usize),
    /// Crash the node once it is mid-work, or at the deadline.
    CrashMidWork(usize),
    /// Restart the node, if it is down and not lost for good.
    Restart(usize),
    /// Lose the node for good.
    Wipe(usize),
    /// The node comes back at once with an empty disk under its identity.
    Reborn(usize),
    /// Cut links, as (from, to).
    Cut {
        /// The links.
        links: Vec<(usize, usize)>,
        /// Whether the transports notice (both directions are cut).
        symmetric: bool,
    },
    /// Heal links, as (from, to).
    Heal(Vec<(usize, usize)>),
    /// The node's process stops for a while (a stop signal, a long GC, a VM
    /// frozen): it handles nothing and sends nothing, its peers see no
    /// disconnection, and then it goes on where it was, its clock and timers
    /// past due.
    Pause {
        /// The node.
        node: usize,
        /// For how long.
        length: Duration,
    },
    /// A node lies to one of its own users: it writes into its own store, beside
    /// the keys its rooms gave it, a key of a room the user is a member of, sealed
    /// to the user's real X25519 key by an identity the node controls (its own),
    /// never a member. The epoch is the next one, or an earlier one the user holds
    /// no key for (which the chain has, started by someone else). An honest client
    /// refuses it (`unknown_epoch`, `unauthorized_sealer`); one that takes it reads
    /// with a key the node knows. A key the node holds is never overwritten, so
    /// the lie takes nothing from the user.
    Lie,
}

/// What applying a fault did that the run must follow up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Applied {
    /// Nothing to follow up.
    Done,
    /// Node `i` restarted: its rooms' homes are to be checked.
    Restarted(usize),
    /// A node was lost for good: the note says which and when.
    Wiped(String),
}

/// The plan and the state of the faults during a run.
pub struct Faults {
    plan: Vec<(Duration, Fault)>,
    next: usize,
    /// Nodes to crash as soon as they are mid-work, with a deadline.
    armed: BTreeMap<usize, Time>,
    /// Crashes and wipes injected.
    pub crashes: u64,
    /// Partitions injected.
    pub partitions: u64,
    /// Keys nodes slipped their users ([`Fault::Lie`]).
    pub lies: u64,
    /// Process pauses ([`Fault::Pause`]).
    pub pauses: u64,
    /// Whom a lie goes to, which epoch it names, and the key itself.
    liar_rng: ChaCha20Rng,
    /// Which group and entry a bit flip hits.
    flip_rng: ChaCha20Rng,
}

impl Faults {
    /// The seed's plan, none applied yet.
    pub fn new(o: &Options) -> Self {
        Faults {
            plan: plan(o),
            next: 0,
            armed: BTreeMap::new(),
            crashes: 0,
            partitions: 0,
            lies: 0,
            pauses: 0,
            liar_rng: derive_rng(o.seed, 0, "liar"),
            flip_rng: derive_rng(o.seed, 0, "bitflip-at"),
        }
    }

    /// Flips one bit of one stored Raft entry of node `i` (down): a group it
    /// replicates and an index of its log, drawn.
    fn flip_bit(&mut self, c: &mut Cluster, i: usize) {
        let Some(config) = c.config().replication else {
            return;
        };
        let groups = config.groups_of(&c.sorted_ids(), c.nodes[i].id);
        if groups.is_empty() {
            return;
        }
        let group = groups[(self.flip_rng.next_u64() % groups.len() as u64) as usize];
        let store = &c.nodes[i].store;
        // Any stored entry, committed or not.
        let Ok(last) = store
            .read()
            .map_err(|_| ())
            .and_then(|t| log::last_index(&*t, group).map_err(|_| ()))
        else {
            return;
        };
        let index = 1 + self.flip_rng.next_u64() % last.max(1);
        let bit = self.flip_rng.next_u64() as u32;
        let flipped = store.write().map_err(|_| ()).and_then(|mut txn| {
            let flipped = log::flip_bit(&mut *txn, group, index, bit).map_err(|_| ())?;
            txn.commit().map_err(|_| ())?;
            Ok(flipped)
        });
        if flipped == Ok(true) {
            c.mark(&format!("bit flip n{i} group {group} entry {index}"));
            c.flipped.insert((i, group));
        }
    }

    /// When the next fault is due, relative to the start of the chaos.
    pub fn next_at(&self) -> Option<Duration> {
        self.plan.get(self.next).map(|(t, _)| *t)
    }

    /// Applies the next fault (a lie goes to one of `roster`'s users).
    pub fn apply_next(&mut self, c: &mut Cluster, o: &Options, roster: &Roster) -> Applied {
        assert!(self.next < self.plan.len(), "no fault is left to apply");
        let fault = std::mem::replace(&mut self.plan[self.next].1, Fault::Heal(Vec::new()));
        self.next += 1;
        match fault {
            Fault::Crash(i) => self.crash(c, o, i),
            Fault::CrashMidWork(i) => {
                if live(c, i) {
                    let wait = Duration::from_millis(CRASH_MID_WORK_WAIT_MS_MAX);
                    self.armed.insert(i, c.now().saturating_add(wait));
                }
            }
            Fault::Restart(i) => {
                if !c.nodes[i].up && !c.nodes[i].wiped {
                    if o.bitflips == Some(i) {
                        self.flip_bit(c, i);
                    }
                    restart(c, o, i);
                    return Applied::Restarted(i);
                }
            }
            Fault::Wipe(i) => return self.wipe(c, i),
            Fault::Reborn(i) => return self.reborn(c, o, i),
            Fault::Cut { links, symmetric } => {
                self.partitions += 1;
                for &(a, b) in &links {
                    c.cut_link(a, b, true);
                    if symmetric {
                        c.disconnected(a, b);
                    }
                }
            }
            Fault::Heal(links) => {
                for &(a, b) in &links {
                    c.cut_link(a, b, false);
                    c.connected(a, b);
                    c.connected(b, a);
                }
            }
            Fault::Pause { node, length } => {
                if live(c, node) {
                    self.pauses += 1;
                    c.pause(node, length);
                }
            }
            Fault::Lie => self.lie(c, roster),
        }
        Applied::Done
    }

    /// A live node slips one of its users who is a member of a room a key it
    /// sealed itself ([`Fault::Lie`]); nothing if no live node hosts a member.
    fn lie(&mut self, c: &mut Cluster, roster: &Roster) {
        let members = live_members(c, roster);
        let Some((user, room)) = pick(&mut self.liar_rng, &members) else {
            return;
        };
        let u = roster.user(user);
        let Some((epoch, held)) = self.lie_epoch(c, u.node, u.uid, room) else {
            return;
        };
        if held {
            return;
        }
        let recipient = u.id.public();
        if slip_key(c, u.node, &recipient, room, epoch, &mut self.liar_rng) {
            self.lies += 1;
            c.mark(&format!("lie n{} u{user} epoch {}", u.node, epoch.0));
        }
    }

    /// The epoch a lie to `uid` in `room` on node `i` names: the one after the
    /// room's current one there, or (half the time, if any) an earlier one they
    /// hold no key for; and whether they hold a key of it.
    fn lie_epoch(
        &mut self,
        c: &Cluster,
        i: usize,
        uid: UserId,
        room: RoomId,
    ) -> Option<(Epoch, bool)> {
        let txn = c.nodes[i].store.read().ok()?;
        let meta = domain::state::rooms::meta(&*txn, room).ok()??;
        let held: BTreeSet<Epoch> = domain::state::keys::sealed_for(&*txn, room, uid)
            .ok()?
            .into_iter()
            .map(|(e, _)| e)
            .collect();
        let earlier: Vec<Epoch> = (1..meta.epoch.0)
            .map(Epoch)
            .filter(|e| !held.contains(e))
            .collect();
        let epoch = match pick(&mut self.liar_rng, &earlier) {
            Some(e) if self.liar_rng.next_u64() & 1 == 1 => e,
            _ => Epoch(meta.epoch.0 + 1),
        };
        Some((epoch, held.contains(&epoch)))
    }

    fn wipe(&mut self, c: &mut Cluster, i: usize) -> Applied {
        if c.nodes[i].wiped {
            return Applied::Done;
        }
        self.crashes += 1;
        c.wipe(i);
        assert!(c.nodes[i].wiped && !c.nodes[i].up);
        Applied::Wiped(format!(
            "n{i} was lost for good at {:.3}s (disk wiped; it never restarts)",
            c.now().saturating_since(START).as_secs_f64()
        ))
    }

    fn reborn(&mut self, c: &mut Cluster, o: &Options, i: usize) -> Applied {
        if c.nodes[i].wiped {
            return Applied::Done;
        }
        self.crashes += 1;
        for j in (0..o.nodes).filter(|&j| j != i) {
            c.disconnected(j, i);
        }
        c.reborn(i);
        connect_to_live(c, o, i);
        Applied::Wiped(format!(
            "n{i} came back with an empty disk at {:.3}s (what it held is lost for good; \
             it serves again under its identity)",
            c.now().saturating_since(START).as_secs_f64()
        ))
    }

    /// Crashes node `i` (if live); the others' transports notice.
    pub fn crash(&mut self, c: &mut Cluster, o: &Options, i: usize) {
        if live(c, i) {
            self.crashes += 1;
            c.crash(i);
            for j in (0..o.nodes).filter(|&j| j != i) {
                c.disconnected(j, i);
            }
        }
        assert!(!live(c, i));
    }

    /// After a step: crashes an armed node that `handled` a message and has more
    /// waiting, or the first armed node whose deadline passed.
    pub fn after_step(&mut self, c: &mut Cluster, o: &Options, handled: Option<usize>) {
        if let Some(node) = handled {
            if self.armed.contains_key(&node) && c.mailbox_len(node) > 0 {
                self.armed.remove(&node);
                self.crash(c, o, node);
            }
        }
        if let Some((&node, &deadline)) = self.armed.first_key_value() {
            if c.now() >= deadline {
                self.armed.remove(&node);
                self.crash(c, o, node);
            }
        }
    }

    /// Stops every fault: no weather, no cuts, every node at its base speed, every
    /// node not lost for good up and connected to every other.
    pub fn stop(&mut self, c: &mut Cluster, o: &Options) {
        self.armed.clear();
        c.net = Default::default();
        let cut: Vec<_> = c.cut.iter().copied().collect();
        for (a, b) in cut {
            if let (Some(i), Some(j)) = (c.index(a), c.index(b)) {
                c.cut_link(i, j, false);
            }
        }
        for i in 0..o.nodes {
            c.nodes[i].cost = o.base_cost;
            if !c.nodes[i].up && !c.nodes[i].wiped {
                c.restart(i);
            }
        }
        for i in 0..o.nodes {
            for j in 0..o.nodes {
                if i != j && live(c, i) && live(c, j) {
                    c.connected(i, j);
                }
            }
        }
        assert!(c.cut.is_empty(), "a link is still cut");
    }
}

/// Node `i` lies to `user`: it writes into its own store a fresh key of `room` at
/// `epoch`, sealed to the user's X25519 key by the node's own identity (which no
/// room has as a member). Whether it was written.
pub fn slip_key(
    c: &Cluster,
    i: usize,
    user: &PublicIdentity,
    room: RoomId,
    epoch: Epoch,
    rng: &mut ChaCha20Rng,
) -> bool {
    let key = EpochKey::generate(rng);
    let node = &c.nodes[i];
    let sealer = node.identity.signing_key();
    let recipient = user.exchange_key();
    let Ok(sealed) = seal_epoch_key(rng, sealer, &recipient, room, epoch, &key) else {
        return false;
    };
    let uid = UserId(user.signing);
    node.store
        .write()
        .and_then(|mut txn| {
            domain::state::keys::put(&mut *txn, room, epoch, uid, &sealed)?;
            txn.commit()
        })
        .is_ok()
}

/// Every (user, room) of `roster` where the user's node is live and shows them as
/// a member.
fn live_members(c: &Cluster, roster: &Roster) -> Vec<(usize, RoomId)> {
    let mut out = Vec::new();
    for user in 0..roster.users_len() {
        let u = roster.user(user);
        if !live(c, u.node) {
            continue;
        }
        let Ok(txn) = c.nodes[u.node].store.read() else {
            continue;
        };
        for &room in roster.rooms() {
            let vis = domain::state::rooms::visibility(&*txn, u.uid, room);
            if matches!(vis, Ok(Some(v)) if v.until.is_none()) {
                out.push((user, room));
            }
        }
    }
    out
}

/// Restarts node `i` and reconnects it with every live node.
fn restart(c: &mut Cluster, o: &Options, i: usize) {
    c.restart(i);
    connect_to_live(c, o, i);
}

/// Node `i` is up again: it and every live node see their connection back.
fn connect_to_live(c: &mut Cluster, o: &Options, i: usize) {
    let others: Vec<usize> = (0..o.nodes).filter(|&j| j != i && live(c, j)).collect();
    for j in others {
        c.connected(i, j);
        c.connected(j, i);
    }
}

/// How many process pauses a seed with pauses has.
const PAUSES: usize = 3;

/// The shortest and the longest process pause.
const PAUSE_MS_MIN: u64 = 100;
const PAUSE_MS_MAX: u64 = 5_000;

/// How many times the node whose disk flips bits crashes and comes back.
const BITFLIP_CRASHES: usize = 3;

/// The seed's fault plan: when each fault happens, relative to the start of the
/// chaos. The draws happen in a fixed order (partitions, crashes, the wipe) so a
/// seed always gives the same plan.
pub fn plan(o: &Options) -> Vec<(Duration, Fault)> {
    let mut rng = derive_rng(o.seed, 0, "faults");
    let mut faults: Vec<(Duration, Fault)> = Vec::new();
    if o.nodes >= 2 {
        if let Some(p) = o.partitions {
            plan_partitions(&mut rng, o, p, &mut faults);
        }
    }
    if let Some(crashes) = o.crashes {
        plan_crashes(&mut rng, o, crashes, &mut faults);
    }
    if o.wipe {
        let node = (rng.next_u64() % o.nodes as u64) as usize;
        let chaos = u64::try_from(o.chaos.as_micros()).unwrap_or(0);
        let at = Duration::from_micros(between(&mut rng, chaos / 4, chaos * 3 / 4));
        faults.push((at, Fault::Wipe(node)));
    }
    if o.reborn {
        // A stream of its own: the other faults stay what they were.
        let mut rng = derive_rng(o.seed, 0, "reborn-plan");
        let node = (rng.next_u64() % o.nodes as u64) as usize;
        let chaos = u64::try_from(o.chaos.as_micros()).unwrap_or(0);
        let at = Duration::from_micros(between(&mut rng, chaos / 4, chaos * 3 / 4));
        faults.push((at, Fault::Reborn(node)));
    }
    if let Some(victim) = o.bitflips {
        // A stream of its own: the other faults stay what they were. The victim
        // crashes a few times and comes back with a flipped bit each time.
        let mut rng = derive_rng(o.seed, 0, "bitflip-plan");
        let chaos = u64::try_from(o.chaos.as_micros()).unwrap_or(0);
        for _ in 0..BITFLIP_CRASHES {
            let at = Duration::from_micros(between(&mut rng, chaos / 8, chaos * 7 / 8));
            let down = Duration::from_millis(between(&mut rng, 10, 1_000));
            faults.push((at, Fault::Crash(victim)));
            faults.push((at + down, Fault::Restart(victim)));
        }
    }
    if o.power_loss {
        // A stream of its own. Every node at the same instant, then all back.
        let mut rng = derive_rng(o.seed, 0, "power-loss-plan");
        let chaos = u64::try_from(o.chaos.as_micros()).unwrap_or(0);
        let at = Duration::from_micros(between(&mut rng, chaos / 4, chaos * 3 / 4));
        let down = Duration::from_millis(between(&mut rng, 10, 2_000));
        for node in 0..o.nodes {
            faults.push((at, Fault::Crash(node)));
            faults.push((at + down, Fault::Restart(node)));
        }
    }
    if o.pauses {
        // A stream of its own. Each pause outlasts the longest election
        // timeout (20 ticks of at most 100 ms) now and then.
        let mut rng = derive_rng(o.seed, 0, "pause-plan");
        let chaos = u64::try_from(o.chaos.as_micros()).unwrap_or(0);
        for _ in 0..PAUSES {
            let node = (rng.next_u64() % o.nodes as u64) as usize;
            let at = Duration::from_micros(between(&mut rng, chaos / 8, chaos * 7 / 8));
            let length = Duration::from_millis(between(&mut rng, PAUSE_MS_MIN, PAUSE_MS_MAX));
            faults.push((at, Fault::Pause { node, length }));
        }
    }
    if let Some(lies) = o.lies {
        let mut t = Duration::ZERO;
        loop {
            t += around(&mut rng, lies.every);
            if t >= o.chaos {
                break;
            }
            faults.push((t, Fault::Lie));
        }
    }
    // Stable: faults at the same instant keep the order they were drawn in.
    faults.sort_by_key(|(t, _)| *t);
    faults.retain(|(t, _)| *t < o.chaos);
    debug_assert!(faults.windows(2).all(|w| w[0].0 <= w[1].0));
    faults
}

fn plan_partitions(
    rng: &mut ChaCha20Rng,
    o: &Options,
    p: Partitions,
    faults: &mut Vec<(Duration, Fault)>,
) {
    let n = o.nodes;
    assert!(n >= 2, "a partition needs two nodes");
    let length_ms_max = u64::try_from(p.length_max.as_millis())
        .unwrap_or(PARTITION_MS_MIN)
        .max(PARTITION_MS_MIN);
    let mut t = Duration::ZERO;
    loop {
        t += around(rng, p.every);
        if t >= o.chaos {
            break;
        }
        let length = Duration::from_millis(between(rng, PARTITION_MS_MIN, length_ms_max));
        let (links, symmetric) = if chance(rng, p.asymmetric_ppm) {
            let a = (rng.next_u64() % n as u64) as usize;
            let b = (a + 1 + (rng.next_u64() % (n as u64 - 1)) as usize) % n;
            assert_ne!(a, b);
            (vec![(a, b)], false)
        } else {
            (split(rng, n), true)
        };
        faults.push((t + length, Fault::Heal(links.clone())));
        faults.push((t, Fault::Cut { links, symmetric }));
    }
}

/// Every link between two sides of a random split of `n` nodes (neither side
/// empty), both directions.
fn split(rng: &mut ChaCha20Rng, n: usize) -> Vec<(usize, usize)> {
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
    assert!(!links.is_empty(), "a split has two sides");
    links
}

fn plan_crashes(
    rng: &mut ChaCha20Rng,
    o: &Options,
    c: Crashes,
    faults: &mut Vec<(Duration, Fault)>,
) {
    let n = o.nodes as u64;
    let down_ms_max = u64::try_from(c.down_max.as_millis())
        .unwrap_or(DOWN_MS_MIN)
        .max(DOWN_MS_MIN);
    let mut t = Duration::ZERO;
    loop {
        t += around(rng, c.every);
        if t >= o.chaos {
            break;
        }
        let node = (rng.next_u64() % n) as usize;
        let down = Duration::from_millis(between(rng, DOWN_MS_MIN, down_ms_max));
        if !chance(rng, c.stay_down_ppm) {
            faults.push((t + down, Fault::Restart(node)));
        }
        if chance(rng, c.mid_work_ppm) {
            faults.push((t, Fault::CrashMidWork(node)));
        } else {
            faults.push((t, Fault::Crash(node)));
        }
    }
}

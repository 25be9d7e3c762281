//! The faults: the seed's plan (partitions, crashes, a node lost for good, drawn
//! when the run starts) and how each one is applied to the cluster.

use core::time::Duration;
use std::collections::BTreeMap;

use conclave_actors::actor::Time;
use rand_chacha::ChaCha20Rng;
use rand_core::Rng;

use crate::cluster::{derive_rng, Cluster, START};
use crate::draw::{around, between, chance};
use crate::options::{Crashes, Options, Partitions};

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
    /// Cut links, as (from, to).
    Cut {
        /// The links.
        links: Vec<(usize, usize)>,
        /// Whether the transports notice (both directions are cut).
        symmetric: bool,
    },
    /// Heal links, as (from, to).
    Heal(Vec<(usize, usize)>),
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
        }
    }

    /// When the next fault is due, relative to the start of the chaos.
    pub fn next_at(&self) -> Option<Duration> {
        self.plan.get(self.next).map(|(t, _)| *t)
    }

    /// Applies the next fault.
    pub fn apply_next(&mut self, c: &mut Cluster, o: &Options) -> Applied {
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
                    restart(c, o, i);
                    return Applied::Restarted(i);
                }
            }
            Fault::Wipe(i) => return self.wipe(c, i),
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
        }
        Applied::Done
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

/// Restarts node `i` and reconnects it with every live node.
fn restart(c: &mut Cluster, o: &Options, i: usize) {
    c.restart(i);
    let others: Vec<usize> = (0..o.nodes).filter(|&j| j != i && live(c, j)).collect();
    for j in others {
        c.connected(i, j);
        c.connected(j, i);
    }
}

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

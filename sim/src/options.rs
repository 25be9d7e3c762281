//! Swarm testing: each seed draws which faults are on, how likely and how long
//! they are, and the shape of the workload. Sweeps then explore different weather,
//! not the same drizzle.

use core::fmt;
use core::time::Duration;

use conclave_actors::domain::quota::PublishQuota;
use conclave_actors::domain::{DomainConfig, EPOCH_FRAMES_MAX};
use conclave_actors::mutation::Mutation;
use conclave_actors::replication::Replication;
use rand_chacha::ChaCha20Rng;
use rand_core::Rng;

use crate::cluster::{derive_rng, Interleave, Scheduling};

/// The fewest frames per epoch a seed that bounds epochs tightly draws.
const EPOCH_FRAMES_DRAWN_MIN: u64 = 8;
/// The most frames per epoch a seed that bounds epochs tightly draws.
const EPOCH_FRAMES_DRAWN_MAX: u64 = 64;

/// The shortest mean time between two lies of a seed whose nodes lie.
const LIE_MS_EVERY_MIN: u64 = 300;
/// The longest mean time between two lies of a seed whose nodes lie.
const LIE_MS_EVERY_MAX: u64 = 3_000;

/// Partitions: how often one starts and how long it lasts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Partitions {
    /// Mean time between two partitions.
    pub every: Duration,
    /// Longest partition.
    pub length_max: Duration,
    /// Share (per million) of partitions that cut one direction of one link only.
    pub asymmetric_ppm: u32,
}

/// Crashes: how often a node crashes and how long it stays down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Crashes {
    /// Mean time between two crashes.
    pub every: Duration,
    /// Longest time down before the node restarts.
    pub down_max: Duration,
    /// Share (per million) of crashed nodes that stay down until the chaos ends.
    pub stay_down_ppm: u32,
    /// Share (per million) of crashes that wait (up to a second) until the node is
    /// in the middle of work: it has just handled a message and more wait in its
    /// mailbox, so the crash cuts a chain of local messages in two.
    pub mid_work_ppm: u32,
}

/// Nodes that lie to their own clients: how often one slips a user a key it
/// sealed itself (see [`crate::faults::Fault::Lie`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lies {
    /// Mean time between two lies.
    pub every: Duration,
}

/// Everything a run derives from its seed (plus the node count and mutation, which
/// the command line may fix).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    /// The root seed.
    pub seed: u64,
    /// How many nodes.
    pub nodes: usize,
    /// The mutation switched on, if any.
    pub mutation: Option<Mutation>,
    /// Longest base one-way latency of a link (each link draws its own up to it).
    pub latency_max: Duration,
    /// Extra latency per message, up to this (reorders messages), if on.
    pub jitter: Duration,
    /// Chance a message is lost, per million.
    pub drop_ppm: u32,
    /// Chance a message is delivered twice, per million.
    pub duplicate_ppm: u32,
    /// Partitions, if on.
    pub partitions: Option<Partitions>,
    /// Crashes, if on.
    pub crashes: Option<Crashes>,
    /// Whether one node is lost for good (its disk wiped) during the chaos.
    pub wipe: bool,
    /// Whether one node comes back with an empty store under the same identity
    /// (a disk replaced, a data directory deleted) during the chaos.
    pub reborn: bool,
    /// The node whose disk flips a bit in a stored Raft entry each time it
    /// restarts (it must repair its log from the other replicas), if any.
    pub bitflips: Option<usize>,
    /// Whether every node loses power at the same instant once during the
    /// chaos (and comes back): nothing acknowledged may be lost.
    pub power_loss: bool,
    /// Whether nodes' processes pause now and then (three times in the chaos,
    /// 0.1 to 5 s each: a paused leader wakes up believing it still leads).
    pub pauses: bool,
    /// Nodes lying to their own clients, if on.
    pub lies: Option<Lies>,
    /// Whether nodes' admins revoke users now and then (their rooms must evict
    /// them). Drawn per seed (a third of them); `--revocations` turns it on for
    /// every seed.
    pub revocations: bool,
    /// Whether one user is hostile: now and then, besides the workload's steps,
    /// they flood a room with three bursts' worth of publishes at once (the
    /// publish quota is set low in these seeds) or publish to a room their node
    /// knows and they are not a member of. Drawn per seed (a third of them).
    pub hostile: bool,
    /// What one message costs every node.
    pub base_cost: Duration,
    /// What one group commit (a batch's commit and fsync) costs every node: the
    /// window in which a crash loses a whole batch and what it owes.
    pub commit_cost: Duration,
    /// How long after a commit a node releases what the batch owes (zero: at
    /// once); a crash in between loses only that.
    pub release_delay: Duration,
    /// Slow nodes and what one message costs them.
    pub slow: Vec<(usize, Duration)>,
    /// Each node's clock offset in milliseconds (all zero if off).
    pub clock_offsets_ms: Vec<i64>,
    /// Users per node (besides its admin).
    pub users_per_node: usize,
    /// Rooms created at the start.
    pub rooms: usize,
    /// Mean time between two workload steps.
    pub step_every: Duration,
    /// How long the chaos lasts.
    pub chaos: Duration,
    /// Workload weights: publish, invite, remove, read.
    pub weights: [u32; 4],
    /// Chance (per million) a publish uses an older key than the newest it holds.
    pub stale_publish_ppm: u32,
    /// The domain's timing: outbox retry delays and how soon idle actors passivate.
    pub domain: DomainConfig,
    /// How nodes interleave their actors' mailboxes: which runs next, and how long
    /// an activation takes (messages to different actors of a node are handled in
    /// either order, as in the production runtime).
    pub scheduling: Scheduling,
}

fn between(rng: &mut ChaCha20Rng, lo: u64, hi: u64) -> u64 {
    lo + rng.next_u64() % (hi - lo + 1)
}

fn coin(rng: &mut ChaCha20Rng) -> bool {
    rng.next_u64() & 1 == 1
}

fn ms(rng: &mut ChaCha20Rng, lo: u64, hi: u64) -> Duration {
    Duration::from_millis(between(rng, lo, hi))
}

/// The network's weather: (latency_max, jitter, drop_ppm, duplicate_ppm).
fn draw_network(rng: &mut ChaCha20Rng) -> (Duration, Duration, u32, u32) {
    let latency_max = ms(rng, 1, 40);
    let jitter = if coin(rng) {
        ms(rng, 1, 30)
    } else {
        Duration::ZERO
    };
    let drop_ppm = if coin(rng) {
        between(rng, 5_000, 200_000) as u32
    } else {
        0
    };
    let duplicate_ppm = if coin(rng) {
        between(rng, 5_000, 100_000) as u32
    } else {
        0
    };
    (latency_max, jitter, drop_ppm, duplicate_ppm)
}

/// Partitions and crashes, if on, and whether a node is lost for good.
fn draw_faults(rng: &mut ChaCha20Rng, nodes: usize) -> (Option<Partitions>, Option<Crashes>, bool) {
    let partitions = coin(rng).then(|| Partitions {
        every: ms(rng, 1_000, 6_000),
        length_max: ms(rng, 200, 5_000),
        asymmetric_ppm: between(rng, 0, 500_000) as u32,
    });
    let crashes = coin(rng).then(|| Crashes {
        every: ms(rng, 1_000, 8_000),
        down_max: ms(rng, 100, 5_000),
        stay_down_ppm: between(rng, 0, 300_000) as u32,
        mid_work_ppm: between(rng, 0, 1_000_000) as u32,
    });
    let wipe = nodes >= 3 && between(rng, 0, 5) == 0;
    (partitions, crashes, wipe)
}

/// Slow nodes (sorted, each at most once) and what one message costs them.
fn draw_slow(rng: &mut ChaCha20Rng, nodes: usize) -> Vec<(usize, Duration)> {
    let mut slow = Vec::new();
    if coin(rng) {
        let count = between(rng, 1, 2.min(nodes as u64)) as usize;
        for _ in 0..count {
            let node = (rng.next_u64() % nodes as u64) as usize;
            let cost = Duration::from_micros(between(rng, 500, 5_000));
            if !slow.iter().any(|&(n, _)| n == node) {
                slow.push((node, cost));
            }
        }
        slow.sort();
    }
    debug_assert!(slow.windows(2).all(|w| w[0].0 < w[1].0));
    slow
}

/// Each node's clock offset in milliseconds (all zero if off).
fn draw_clocks(rng: &mut ChaCha20Rng, nodes: usize) -> Vec<i64> {
    if coin(rng) {
        (0..nodes)
            .map(|_| between(rng, 0, 40_000) as i64 - 20_000)
            .collect()
    } else {
        vec![0; nodes]
    }
}

/// The workload's shape: (users_per_node, rooms, step_every, chaos, weights,
/// stale_publish_ppm).
fn draw_workload(rng: &mut ChaCha20Rng) -> (usize, usize, Duration, Duration, [u32; 4], u32) {
    let users_per_node = between(rng, 1, 3) as usize;
    let rooms = between(rng, 1, 3) as usize;
    let step_every = ms(rng, 60, 250);
    let chaos = ms(rng, 8_000, 25_000);
    let weights = [
        between(rng, 40, 80) as u32,
        between(rng, 5, 20) as u32,
        between(rng, 3, 15) as u32,
        between(rng, 5, 25) as u32,
    ];
    let stale_publish_ppm = if coin(rng) {
        between(rng, 20_000, 200_000) as u32
    } else {
        0
    };
    (
        users_per_node,
        rooms,
        step_every,
        chaos,
        weights,
        stale_publish_ppm,
    )
}

/// Half the seeds run the production timing; the others retry sooner or later
/// and passivate idle actors within a second or two, so that activation from
/// storage happens all the time. A third of the seeds bound an epoch to a few
/// frames, so rooms rekey on their own all the time, under the faults.
fn draw_domain(rng: &mut ChaCha20Rng) -> DomainConfig {
    let mut config = if coin(rng) {
        DomainConfig::default()
    } else {
        DomainConfig {
            retry_base: ms(rng, 20, 500),
            retry_max: ms(rng, 500, 5_000),
            idle: ms(rng, 200, 5_000),
            epoch_frames_max: EPOCH_FRAMES_MAX,
            ..DomainConfig::default()
        }
    };
    if between(rng, 0, 2) == 0 {
        config.epoch_frames_max = between(rng, EPOCH_FRAMES_DRAWN_MIN, EPOCH_FRAMES_DRAWN_MAX);
    }
    config
}

/// Drawn from a stream of its own, so that every other option stays what it was
/// before nodes lied. Two seeds in three have nodes that lie to their clients.
fn draw_lies(seed: u64) -> Option<Lies> {
    let mut rng = derive_rng(seed, 0, "lies");
    (between(&mut rng, 0, 2) != 0).then(|| Lies {
        every: ms(&mut rng, LIE_MS_EVERY_MIN, LIE_MS_EVERY_MAX),
    })
}

/// Drawn from a stream of its own, so that every other option stays what it was
/// before group commit: a quarter of the seeds commit at no cost (a batch is
/// durable as soon as it closes), the others take 20 µs to 3 ms per commit.
fn draw_commit_cost(seed: u64) -> Duration {
    let mut rng = derive_rng(seed, 0, "commit-cost");
    if between(&mut rng, 0, 3) == 0 {
        return Duration::ZERO;
    }
    Duration::from_micros(between(&mut rng, 20, 3_000))
}

/// Drawn from a stream of its own: half the seeds release a batch's effects a
/// moment (10 µs to 1 ms) after its commit, so that crashes land in between.
fn draw_release_delay(seed: u64) -> Duration {
    let mut rng = derive_rng(seed, 0, "release-delay");
    if coin(&mut rng) {
        return Duration::ZERO;
    }
    Duration::from_micros(between(&mut rng, 10, 1_000))
}

/// Drawn from a stream of its own, so that every other option stays what it was
/// before streams had incarnations: a quarter of the seeds with two nodes or more.
fn draw_reborn(seed: u64, nodes: usize) -> bool {
    let mut rng = derive_rng(seed, 0, "reborn");
    nodes >= 2 && between(&mut rng, 0, 3) == 0
}

/// Drawn from a stream of its own, so that every other option stays what it was
/// before disks flipped bits: a quarter of the seeds without another lost disk
/// pick one node (a minority of every group) whose Raft log takes a flipped bit
/// at each restart.
fn draw_bitflips(seed: u64, nodes: usize, disk_lost: bool) -> Option<usize> {
    let mut rng = derive_rng(seed, 0, "bitflips");
    let on = between(&mut rng, 0, 3) == 0;
    let victim = between(&mut rng, 0, nodes as u64 - 1) as usize;
    (on && !disk_lost && nodes >= 3).then_some(victim)
}

/// Drawn from a stream of its own, so that every other option stays what it was
/// before new member nodes pulled their history: half the seeds send it in pages
/// of 1 to 8 frames, so that catching up takes many pages, under the faults.
fn draw_history_page(seed: u64) -> usize {
    let mut rng = derive_rng(seed, 0, "history_page");
    if coin(&mut rng) {
        between(&mut rng, 1, 8) as usize
    } else {
        conclave_actors::domain::state::rooms::BACKFILL_PAGE_FRAMES
    }
}

/// Drawn from a stream of its own, so that every other option stays what it was
/// before replication: every seed runs Raft groups (one meta group and 1 to 4
/// shards, each on three nodes, or on five in a fifth of the seeds), ticking
/// every 20 to 100 ms.
fn draw_replication(seed: u64, nodes: usize) -> Replication {
    let mut rng = derive_rng(seed, 0, "replication");
    let shards = between(&mut rng, 1, 4) as u16;
    let factor = if between(&mut rng, 0, 4) == 0 { 5 } else { 3 };
    let mut replication = Replication {
        shards,
        factor,
        tick: ms(&mut rng, 20, 100),
        rooms: false,
    };
    // A stream of its own: rooms on shard groups in half the seeds, with
    // enough shards that every node replicates one.
    let mut rng = derive_rng(seed, 0, "replicated-rooms");
    if between(&mut rng, 0, 1) == 0 {
        rooms_on_shards(&mut replication, nodes);
    }
    replication
}

/// Rooms on shard groups, with enough shards that each of `nodes` nodes
/// replicates one.
fn rooms_on_shards(replication: &mut Replication, nodes: usize) {
    replication.rooms = true;
    let needed = (nodes + 1)
        .saturating_sub(usize::from(replication.factor))
        .max(1);
    replication.shards = replication.shards.max(needed as u16);
}

/// Drawn from a stream of its own, so that every other option stays what it was
/// before hostile users were drawn: a third of the seeds have one, and a publish
/// quota of 4 to 12 frames per second per user (bursts of two seconds' worth), so
/// that their floods trip it while the others mostly stay under it.
fn draw_hostile(seed: u64) -> Option<PublishQuota> {
    let mut rng = derive_rng(seed, 0, "hostile");
    (between(&mut rng, 0, 2) == 0).then(|| PublishQuota {
        frames_per_s: between(&mut rng, 4, 12),
        ..PublishQuota::default()
    })
}

/// Drawn from a stream of its own, so that every other option stays what it was
/// before revocations were drawn: a third of the seeds revoke users.
fn draw_revocations(seed: u64) -> bool {
    let mut rng = derive_rng(seed, 0, "revocations");
    between(&mut rng, 0, 2) == 0
}

/// Drawn from a stream of its own, so that every other option stays what it was
/// before mailboxes were modelled per actor. A quarter of the seeds handle a
/// node's messages oldest first (one FIFO per node), the others pick a ready
/// actor at random; half of all seeds also delay activations.
fn draw_scheduling(seed: u64) -> Scheduling {
    let mut sched = derive_rng(seed, 0, "scheduling");
    let interleave = if between(&mut sched, 0, 3) == 0 {
        Interleave::Arrival
    } else {
        Interleave::Random
    };
    let activation_max = if coin(&mut sched) {
        Duration::from_micros(between(&mut sched, 50, 3_000))
    } else {
        Duration::ZERO
    };
    Scheduling {
        interleave,
        activation_max,
    }
}

impl Options {
    /// Puts rooms on shard groups, with enough shards that every node
    /// replicates one (what half the seeds draw).
    pub fn put_rooms_on_shards(&mut self) {
        if let Some(replication) = self.domain.replication.as_mut() {
            rooms_on_shards(replication, self.nodes);
        }
    }

    /// The options of `seed`; `nodes` fixes the node count (else the seed picks 3 to 5).
    pub fn derive(seed: u64, nodes: Option<usize>, mutation: Option<Mutation>) -> Self {
        // The draws happen in this order, from one stream: changing it changes
        // what every seed means.
        let mut rng = derive_rng(seed, 0, "options");
        let drawn_nodes = between(&mut rng, 3, 5) as usize;
        let nodes = nodes.unwrap_or(drawn_nodes).max(1);
        let (latency_max, jitter, drop_ppm, duplicate_ppm) = draw_network(&mut rng);
        let (partitions, crashes, wipe) = draw_faults(&mut rng, nodes);
        let base_cost = Duration::from_micros(between(&mut rng, 5, 100));
        let slow = draw_slow(&mut rng, nodes);
        let clock_offsets_ms = draw_clocks(&mut rng, nodes);
        let (users_per_node, rooms, step_every, chaos, weights, stale_publish_ppm) =
            draw_workload(&mut rng);
        let mut domain = draw_domain(&mut rng);
        domain.history_page_frames = draw_history_page(seed);
        domain.replication = Some(draw_replication(seed, nodes));
        let hostile = draw_hostile(seed);
        if let Some(quota) = hostile {
            domain.publish_quota = quota;
        }
        let options = Options {
            seed,
            nodes,
            mutation,
            latency_max,
            jitter,
            drop_ppm,
            duplicate_ppm,
            partitions,
            crashes,
            wipe,
            reborn: draw_reborn(seed, nodes),
            bitflips: draw_bitflips(seed, nodes, wipe || draw_reborn(seed, nodes)),
            power_loss: between(&mut derive_rng(seed, 0, "power-loss"), 0, 4) == 0,
            pauses: between(&mut derive_rng(seed, 0, "pauses"), 0, 4) == 0,
            lies: draw_lies(seed),
            revocations: draw_revocations(seed),
            hostile: hostile.is_some(),
            base_cost,
            commit_cost: draw_commit_cost(seed),
            release_delay: draw_release_delay(seed),
            slow,
            clock_offsets_ms,
            users_per_node,
            rooms,
            step_every,
            chaos,
            weights,
            stale_publish_ppm,
            domain,
            scheduling: draw_scheduling(seed),
        };
        assert_eq!(options.clock_offsets_ms.len(), options.nodes);
        assert!(
            options.weights.iter().sum::<u32>() > 0,
            "some workload step is drawn"
        );
        options
    }
}

fn pct(ppm: u32) -> String {
    format!("{:.1}%", f64::from(ppm) / 10_000.0)
}

impl Options {
    fn fmt_network(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "seed {}: {} nodes, mutation {}",
            self.seed,
            self.nodes,
            self.mutation.map_or("none", |m| m.name())
        )?;
        writeln!(
            f,
            "  network: latency up to {:?}, jitter {}, drop {}, duplicate {}",
            self.latency_max,
            if self.jitter.is_zero() {
                "off".to_string()
            } else {
                format!("up to {:?}", self.jitter)
            },
            if self.drop_ppm == 0 {
                "off".to_string()
            } else {
                pct(self.drop_ppm)
            },
            if self.duplicate_ppm == 0 {
                "off".to_string()
            } else {
                pct(self.duplicate_ppm)
            },
        )?;
        Ok(())
    }

    fn fmt_faults(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let on_off = |on: bool| if on { "on" } else { "off" };
        match self.partitions {
            Some(p) => writeln!(
                f,
                "  partitions: every ~{:?}, up to {:?} long, {} one-way",
                p.every,
                p.length_max,
                pct(p.asymmetric_ppm)
            )?,
            None => writeln!(f, "  partitions: off")?,
        }
        match self.crashes {
            Some(c) => writeln!(
                f,
                "  crashes: every ~{:?}, down up to {:?}, {} stay down until the end, {} mid-work",
                c.every,
                c.down_max,
                pct(c.stay_down_ppm),
                pct(c.mid_work_ppm)
            )?,
            None => writeln!(f, "  crashes: off")?,
        }
        writeln!(
            f,
            "  node lost for good (disk wiped): {}",
            on_off(self.wipe)
        )?;
        writeln!(
            f,
            "  node back with an empty disk under its identity: {}",
            on_off(self.reborn)
        )?;
        writeln!(
            f,
            "  every node loses power at once (and comes back): {}",
            on_off(self.power_loss)
        )?;
        writeln!(
            f,
            "  process pauses (three, 0.1 to 5 s, nodes drawn): {}",
            on_off(self.pauses)
        )?;
        match self.bitflips {
            Some(n) => writeln!(f, "  bit flips in the Raft log of n{n} at each restart")?,
            None => writeln!(f, "  bit flips: off")?,
        }
        match self.lies {
            Some(l) => writeln!(
                f,
                "  nodes lying to their clients (keys they sealed themselves): every ~{:?}",
                l.every
            )?,
            None => writeln!(f, "  nodes lying to their clients: off")?,
        }
        writeln!(f, "  revocations: {}", on_off(self.revocations))?;
        match self.hostile {
            true => writeln!(
                f,
                "  a hostile user: floods and publishes where not a member; quota {} frames/s per user",
                self.domain.publish_quota.frames_per_s
            )?,
            false => writeln!(f, "  a hostile user: off")?,
        }
        Ok(())
    }

    fn fmt_nodes(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "  processing: {:?} per message, {:?} per group commit, effects released {:?} after it; slow nodes: {}",
            self.base_cost,
            self.commit_cost,
            self.release_delay,
            if self.slow.is_empty() {
                "off".to_string()
            } else {
                self.slow
                    .iter()
                    .map(|(n, c)| format!("n{n} {c:?}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        )?;
        writeln!(
            f,
            "  clock offsets: {}",
            if self.clock_offsets_ms.iter().all(|&o| o == 0) {
                "off".to_string()
            } else {
                self.clock_offsets_ms
                    .iter()
                    .map(|o| format!("{o}ms"))
                    .collect::<Vec<_>>()
                    .join(" ")
            }
        )?;
        writeln!(
            f,
            "  mailboxes: one per actor, {}; activation {}",
            match self.scheduling.interleave {
                Interleave::Arrival => "oldest message first",
                Interleave::Random => "next actor picked at random",
            },
            if self.scheduling.activation_max.is_zero() {
                "at once".to_string()
            } else {
                format!("delayed up to {:?}", self.scheduling.activation_max)
            }
        )?;
        writeln!(
            f,
            "  timing: outbox retries from {:?} up to {:?}, idle actors passivate after {:?}, an epoch carries at most {} frames, history pages of {} frames",
            self.domain.retry_base, self.domain.retry_max, self.domain.idle, self.domain.epoch_frames_max, self.domain.history_page_frames
        )?;
        if let Some(r) = self.domain.replication {
            writeln!(
                f,
                "  replication: a meta group and {} shards, each on {} nodes, a Raft tick every {:?}; rooms {}",
                r.shards,
                r.factor,
                r.tick,
                if r.rooms {
                    "on the shard groups"
                } else {
                    "sequenced by their homes"
                }
            )?;
        }
        Ok(())
    }
}

impl fmt::Display for Options {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.fmt_network(f)?;
        self.fmt_faults(f)?;
        self.fmt_nodes(f)?;
        write!(
            f,
            "  workload: {} users/node, {} rooms, a step every ~{:?} for {:?}, weights publish/invite/remove/read {:?}, stale-key publishes {}",
            self.users_per_node,
            self.rooms,
            self.step_every,
            self.chaos,
            self.weights,
            if self.stale_publish_ppm == 0 {
                "off".to_string()
            } else {
                pct(self.stale_publish_ppm)
            }
        )
    }
}

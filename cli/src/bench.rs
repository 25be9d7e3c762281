//! `conclave bench`: conclave side by side with NATS JetStream, and against the
//! crypto floor, in one run on one machine.
//!
//! conclave runs as a local three-node cluster of **separate node processes** (the
//! `cluster up` machinery: QUIC on loopback, LMDB with fsync before acknowledgement),
//! so that CPU time and peak memory can be read per node from `/proc`. The load is
//! driven over the client protocol (`RemoteNode`) from this process, which seals and
//! opens every frame as a real client does. The peer is `nats-server` (installed
//! by `scripts/install-bench-deps.sh`; the bench never installs software) with
//! JetStream file storage, a single node
//! (R1) and a three-node cluster (R3), driven with `async-nats`: publish with
//! acknowledgement, one durable pull consumer per member, and, in the `+crypto`
//! variants, the very same sealing and opening (`domain::client::seal`/`open`).
//!
//! Each message carries its index and send time in its (plaintext) body, so
//! publish-to-commit is measured at the publisher (receipt / ack) and
//! publish-to-deliver when the last member has decrypted it.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::future::Future;
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Child;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context};
use clap::Args;
use conclave_actors::crypto::{open_frame, seal_frame, verify_frame, EpochKey, Frame};
use conclave_actors::domain::client as domain_client;
use conclave_actors::{Epoch, Identity, MessageId, NodeId, RoomId, Time};
use futures_util::StreamExt;
use tokio::sync::Semaphore;

use conclave::{identity_file, Policy, Position, Receipt, RemoteNode, RoomRole, User, UserRole};

use crate::cluster::{cluster_up, Cluster, ClusterArgs, ClusterFile};
use crate::signal;

/// Options of `conclave bench`.
#[derive(Args, Clone, Debug)]
pub struct BenchArgs {
    /// Small counts: the whole run finishes in under a minute (for CI and spot checks).
    #[arg(long)]
    pub quick: bool,
    /// Messages per run at maximum throughput [default: 6000; 600 with --quick].
    #[arg(long, value_name = "N")]
    pub messages: Option<usize>,
    /// Publishes in flight at maximum throughput.
    #[arg(long, value_name = "N", default_value_t = 64)]
    pub in_flight: usize,
    /// Rooms of workload c [default: 10000; 150 with --quick].
    #[arg(long, value_name = "N")]
    pub rooms: Option<usize>,
    /// Workloads: a (1 room, 3 members), b (1 room, 30 members), c (many rooms)
    /// [default: a,b,c; a,c with --quick, where b's 30 R3 consumers alone take ~25 s].
    #[arg(long, value_delimiter = ',')]
    pub workloads: Vec<String>,
    /// JetStream peers: r1, r3 (or none).
    #[arg(long, value_delimiter = ',', default_value = "r1,r3")]
    pub jetstream: Vec<String>,
    /// Payload size in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = 256)]
    pub size: usize,
    /// Working directory (emptied per cluster); the report (bench.md, latency.svg) goes here.
    #[arg(long, value_name = "DIR", default_value = "./data/bench")]
    pub dir: PathBuf,
    /// First port: conclave nodes at P.., their metrics at P+100.., nats at P+200...
    #[arg(long, value_name = "P", default_value_t = 7600)]
    pub base_port: u16,
}

impl BenchArgs {
    fn messages(&self) -> usize {
        self.messages
            .unwrap_or(if self.quick { 600 } else { 6000 })
            .max(16)
    }
    fn rooms(&self) -> usize {
        self.rooms.unwrap_or(if self.quick { 150 } else { 10_000 })
    }
    fn crypto_iterations(&self) -> usize {
        if self.quick {
            1000
        } else {
            10_000
        }
    }
    fn has(&self, workload: &str) -> bool {
        if self.workloads.is_empty() {
            return workload != "b" || !self.quick;
        }
        self.workloads.iter().any(|w| w == workload)
    }
}

// ---------------------------------------------------------------------------------
// Process accounting
// ---------------------------------------------------------------------------------

/// CPU seconds (user + system) and memory of one process.
#[derive(Clone, Copy, Debug, Default)]
struct ProcSample {
    cpu: f64,
    rss_kb: u64,
    hwm_kb: u64,
}

fn clock_ticks() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map_or(100.0, |t| t as f64)
}

fn proc_sample(pid: u32) -> anyhow::Result<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = &stat[stat.rfind(')').ok_or_else(|| anyhow!("bad stat"))? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields after the command start at field 3 (state): utime is 14, stime 15.
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb = |key: &str| -> u64 {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Ok(ProcSample {
        cpu: ticks as f64 / clock_ticks(),
        rss_kb: kb("VmRSS:"),
        hwm_kb: kb("VmHWM:"),
    })
}

fn samples(pids: &[u32]) -> Vec<ProcSample> {
    pids.iter()
        .map(|&p| proc_sample(p).unwrap_or_default())
        .collect()
}

// ---------------------------------------------------------------------------------
// The load driver and its recorder
// ---------------------------------------------------------------------------------

#[derive(Clone, Copy, Default)]
struct Slot {
    sent_ns: u64,
    commit_ns: u64,
    seen: u32,
    done_ns: u64,
}

/// Per message: when it was sent, committed, and seen by every member.
struct Recorder {
    t0: Instant,
    members: u32,
    slots: Mutex<Vec<Slot>>,
}

impl Recorder {
    fn new(members: usize, capacity: usize) -> Arc<Self> {
        Arc::new(Recorder {
            t0: Instant::now(),
            members: u32::try_from(members).unwrap_or(u32::MAX),
            slots: Mutex::new(vec![Slot::default(); capacity]),
        })
    }
    fn now_ns(&self) -> u64 {
        u64::try_from(self.t0.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Slot>> {
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }
    /// A body of `size` bytes carrying `index` and the send time.
    fn body(&self, index: usize, size: usize) -> Vec<u8> {
        let now = self.now_ns();
        if let Some(slot) = self.lock().get_mut(index) {
            slot.sent_ns = now;
        }
        let mut body = vec![0x42u8; size.max(16)];
        body[..8].copy_from_slice(&(index as u64).to_le_bytes());
        body[8..16].copy_from_slice(&now.to_le_bytes());
        body
    }
    fn committed(&self, index: usize) {
        let now = self.now_ns();
        if let Some(slot) = self.lock().get_mut(index) {
            slot.commit_ns = now;
        }
    }
    /// A member decrypted `body`.
    fn delivered(&self, body: &[u8]) {
        if body.len() < 16 {
            return;
        }
        let mut index = [0u8; 8];
        index.copy_from_slice(&body[..8]);
        let index = usize::try_from(u64::from_le_bytes(index)).unwrap_or(usize::MAX);
        let now = self.now_ns();
        if let Some(slot) = self.lock().get_mut(index) {
            slot.seen += 1;
            if slot.seen == self.members {
                slot.done_ns = now;
            }
        }
    }
    fn delivered_count(&self, range: std::ops::Range<usize>) -> (usize, usize) {
        let slots = self.lock();
        let committed = slots[range.clone()]
            .iter()
            .filter(|s| s.commit_ns > 0)
            .count();
        let done = slots[range].iter().filter(|s| s.done_ns > 0).count();
        (committed, done)
    }
}

type PublishFn = Arc<
    dyn Fn(usize, Vec<u8>) -> Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>>
        + Send
        + Sync,
>;

#[derive(Clone, Copy, Debug)]
enum Load {
    Max { in_flight: usize },
    Rate { per_sec: f64 },
}

/// What one run at one load measured.
#[derive(Clone, Debug, Default)]
struct Phase {
    sent: usize,
    committed: usize,
    delivered: usize,
    commit_rate: f64,
    deliver_rate: f64,
    commit_lat: Vec<f64>,
    deliver_lat: Vec<f64>,
    failures: usize,
    first_failure: Option<String>,
}

async fn drive(
    rec: &Arc<Recorder>,
    publish: &PublishFn,
    publishers: usize,
    base: usize,
    n: usize,
    size: usize,
    load: Load,
) -> Phase {
    let permits = Arc::new(Semaphore::new(match load {
        Load::Max { in_flight } => in_flight.max(1),
        Load::Rate { .. } => 4096,
    }));
    let start = Instant::now();
    let start_ns = rec.now_ns();
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        if let Load::Rate { per_sec } = load {
            let at = start + Duration::from_secs_f64(i as f64 / per_sec.max(1.0));
            tokio::time::sleep_until(at.into()).await;
        }
        let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
            break;
        };
        let index = base + i;
        let body = rec.body(index, size);
        let publish = Arc::clone(publish);
        let rec = Arc::clone(rec);
        tasks.push(tokio::spawn(async move {
            let result = publish(i % publishers.max(1), body).await;
            if result.is_ok() {
                rec.committed(index);
            }
            drop(permit);
            result
        }));
    }
    let mut phase = Phase {
        sent: n,
        ..Phase::default()
    };
    for task in tasks {
        match task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                phase.failures += 1;
                phase.first_failure.get_or_insert(format!("{e:#}"));
            }
            Err(e) => {
                phase.failures += 1;
                phase.first_failure.get_or_insert(e.to_string());
            }
        }
    }
    // Wait until every committed message reached every member, or progress stops.
    let range = base..base + n;
    let mut last = (0, 0);
    let mut last_progress = Instant::now();
    loop {
        let now = rec.delivered_count(range.clone());
        if now.1 >= now.0 {
            break;
        }
        if now != last {
            last = now;
            last_progress = Instant::now();
        } else if last_progress.elapsed() > Duration::from_secs(10) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let slots = rec.lock();
    let mut last_commit = start_ns;
    let mut last_done = start_ns;
    for slot in &slots[range] {
        if slot.commit_ns > 0 {
            phase.committed += 1;
            phase
                .commit_lat
                .push(slot.commit_ns.saturating_sub(slot.sent_ns) as f64 / 1e6);
            last_commit = last_commit.max(slot.commit_ns);
        }
        if slot.done_ns > 0 {
            phase.delivered += 1;
            phase
                .deliver_lat
                .push(slot.done_ns.saturating_sub(slot.sent_ns) as f64 / 1e6);
            last_done = last_done.max(slot.done_ns);
        }
    }
    phase.commit_rate = phase.committed as f64 / ((last_commit - start_ns) as f64 / 1e9).max(1e-9);
    phase.deliver_rate = phase.delivered as f64 / ((last_done - start_ns) as f64 / 1e9).max(1e-9);
    phase.commit_lat.sort_by(f64::total_cmp);
    phase.deliver_lat.sort_by(f64::total_cmp);
    phase
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// A system under one workload: its runs at maximum and at half load.
#[derive(Clone, Debug, Default)]
struct Result_ {
    system: String,
    workload: String,
    members: usize,
    max: Phase,
    half: Phase,
    /// CPU seconds per committed message during the maximum run: servers, client.
    cpu_server: f64,
    cpu_client: f64,
    /// Peak RSS per server process (MiB).
    peak_rss_mib: Vec<f64>,
    /// The crypto floor for this system and workload, msg/s on the whole machine.
    floor: Option<f64>,
    notes: Vec<String>,
}

/// Runs warm-up, the maximum-throughput run and the half-load run.
#[allow(clippy::too_many_arguments)]
async fn measure(
    args: &BenchArgs,
    rec: &Arc<Recorder>,
    publish: &PublishFn,
    publishers: usize,
    server_pids: &[u32],
    result: &mut Result_,
) {
    let n = args.messages();
    let warm = (n / 10).max(8);
    let max = Load::Max {
        in_flight: args.in_flight,
    };
    // The same load twice: a warm-up (not measured), then the measured run.
    let warmup = drive(rec, publish, publishers, 0, warm, args.size, max).await;
    if warmup.failures > 0 {
        result.notes.push(format!(
            "warm-up: {} failures ({})",
            warmup.failures,
            warmup.first_failure.unwrap_or_default()
        ));
    }
    let servers_before = samples(server_pids);
    let client_before = proc_sample(std::process::id()).unwrap_or_default();
    result.max = drive(rec, publish, publishers, warm, n, args.size, max).await;
    let servers_after = samples(server_pids);
    let client_after = proc_sample(std::process::id()).unwrap_or_default();
    let committed = result.max.committed.max(1) as f64;
    result.cpu_server = servers_after
        .iter()
        .zip(&servers_before)
        .map(|(a, b)| a.cpu - b.cpu)
        .sum::<f64>()
        / committed;
    result.cpu_client = (client_after.cpu - client_before.cpu) / committed;
    let rate = result.max.commit_rate.min(result.max.deliver_rate) / 2.0;
    result.half = drive(
        rec,
        publish,
        publishers,
        warm + n,
        n / 2,
        args.size,
        Load::Rate { per_sec: rate },
    )
    .await;
    result.peak_rss_mib = samples(server_pids)
        .iter()
        .map(|s| s.hwm_kb as f64 / 1024.0)
        .collect();
    for (name, phase) in [("max", &result.max), ("half", &result.half)] {
        if phase.failures > 0 || phase.delivered < phase.committed {
            result.notes.push(format!(
                "{name}: {} sent, {} committed, {} delivered to all, {} failures{}",
                phase.sent,
                phase.committed,
                phase.delivered,
                phase.failures,
                phase
                    .first_failure
                    .as_ref()
                    .map(|f| format!(" (first: {f})"))
                    .unwrap_or_default()
            ));
        }
    }
}

fn capacity(args: &BenchArgs) -> usize {
    let n = args.messages();
    (n / 10).max(8) + n + n / 2
}

// ---------------------------------------------------------------------------------
// The crypto floor
// ---------------------------------------------------------------------------------

/// Microseconds per operation on one core, 256-byte (or --size) frames.
#[derive(Clone, Copy, Debug)]
struct Floor {
    seal_us: f64,
    verify_us: f64,
    open_us: f64,
    cores: usize,
}

impl Floor {
    /// msg/s on the whole machine if only the cryptography cost anything.
    fn conclave(&self, members: usize) -> f64 {
        self.cores as f64 * 1e6 / (self.seal_us + self.verify_us + members as f64 * self.open_us)
    }
    /// The same for JetStream + crypto (no verification at a home node).
    fn jetstream(&self, members: usize) -> f64 {
        self.cores as f64 * 1e6 / (self.seal_us + members as f64 * self.open_us)
    }
}

fn crypto_floor(iterations: usize, size: usize) -> anyhow::Result<Floor> {
    let mut rng = rand_core::UnwrapErr(getrandom::SysRng);
    let identity = Identity::generate(&mut rng);
    let key = EpochKey::generate(&mut rng);
    let room = RoomId([7; 16]);
    let epoch = Epoch(1);
    let plaintext = vec![0x5au8; size];
    let id = MessageId::from_parts(1_700_000_000_000, 42);
    let time = |f: &mut dyn FnMut()| {
        for _ in 0..iterations / 10 {
            f();
        }
        let start = Instant::now();
        for _ in 0..iterations {
            f();
        }
        start.elapsed().as_secs_f64() * 1e6 / iterations as f64
    };
    let frame = seal_frame(
        &mut rng,
        identity.signing_key(),
        &key,
        room,
        epoch,
        id,
        &plaintext,
    )
    .map_err(|e| anyhow!("{e:?}"))?;
    let seal_us = time(&mut || {
        black_box(
            seal_frame(
                &mut rng,
                identity.signing_key(),
                &key,
                room,
                epoch,
                id,
                black_box(&plaintext),
            )
            .is_ok(),
        );
    });
    let verify_us = time(&mut || {
        black_box(verify_frame(black_box(&frame)).is_ok());
    });
    let open_us = time(&mut || {
        black_box(open_frame(black_box(&frame), room, epoch, &key).is_ok());
    });
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    Ok(Floor {
        seal_us,
        verify_us,
        open_us,
        cores,
    })
}

// ---------------------------------------------------------------------------------
// conclave
// ---------------------------------------------------------------------------------

fn fresh_dir(dir: &Path) -> anyhow::Result<()> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("emptying {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir)?;
    Ok(())
}

/// `per_node` users on each node of the cluster, in node-round-robin order (user k
/// is on node k % nodes), each connected to its node.
async fn conclave_users(
    file: &ClusterFile,
    per_node: usize,
) -> anyhow::Result<Vec<(User<RemoteNode>, NodeId)>> {
    let mut admins = Vec::new();
    for node in &file.node {
        let identity = identity_file::load(&node.admin)?;
        let id = node.node_id()?;
        admins.push((
            RemoteNode::connect(&identity, node.addr, Some(id)).await?,
            id,
        ));
    }
    let mut users = Vec::new();
    for _ in 0..per_node {
        for ((admin, id), node) in admins.iter().zip(&file.node) {
            let identity = Identity::generate(&mut rand_core::UnwrapErr(getrandom::SysRng));
            admin.add_user(&identity.public(), UserRole::Member).await?;
            let user = RemoteNode::connect(&identity, node.addr, Some(*id)).await?;
            users.push((user, *id));
        }
    }
    Ok(users)
}

async fn conclave_cluster(args: &BenchArgs, name: &str) -> anyhow::Result<(Cluster, Vec<u32>)> {
    let dir = args.dir.join(name);
    fresh_dir(&dir)?;
    let cluster = cluster_up(&ClusterArgs {
        nodes: 3,
        dir,
        base_port: args.base_port,
    })
    .await?;
    let pids = cluster.file.node.iter().map(|n| n.pid).collect();
    Ok((cluster, pids))
}

/// Workloads a and b: one room homed on node 0, `per_node` members on each node,
/// one publisher per node, every member subscribed.
async fn conclave_room(
    args: &BenchArgs,
    workload: &str,
    per_node: usize,
    floor: &Floor,
) -> anyhow::Result<Result_> {
    let (cluster, pids) = conclave_cluster(args, &format!("conclave-{workload}")).await?;
    let run = async {
        let users = conclave_users(&cluster.file, per_node).await?;
        let owner = &users[0].0;
        let room = owner.create_room(Policy::default()).await?;
        for (user, node) in &users[1..] {
            owner
                .invite(room, &user.public(), *node, RoomRole::Member)
                .await?;
        }
        let members = users.len();
        let rec = Recorder::new(members, capacity(args));
        let mut readers = Vec::new();
        for (user, _) in &users {
            let mut sub = user.subscribe(room, Position::Live).await?;
            let rec = Arc::clone(&rec);
            readers.push(tokio::spawn(async move {
                while let Some(Ok(message)) = sub.next().await {
                    rec.delivered(&message.body);
                }
            }));
        }
        let publishers: Vec<User<RemoteNode>> =
            users.iter().take(3).map(|(u, _)| u.clone()).collect();
        let publish: PublishFn = Arc::new(move |p, body| {
            let user = publishers[p % publishers.len()].clone();
            Box::pin(async move {
                match user.publish(room, &body).await? {
                    Receipt::Committed { .. } => Ok(()),
                    Receipt::Queued { .. } => bail!("queued, not committed"),
                }
            })
        });
        let mut result = Result_ {
            system: "conclave".into(),
            workload: workload.into(),
            members,
            floor: Some(floor.conclave(members)),
            ..Result_::default()
        };
        measure(args, &rec, &publish, 3, &pids, &mut result).await;
        for r in readers {
            r.abort();
        }
        anyhow::Ok(result)
    }
    .await;
    cluster.stop();
    run
}

/// What workload c measured.
#[derive(Clone, Debug, Default)]
struct RoomsResult {
    rooms: usize,
    setup_rate: f64,
    setup_cpu_ms: f64,
    rss_per_room_kib: Vec<f64>,
    publish: Phase,
    peak_rss_mib: Vec<f64>,
    failures: usize,
}

/// Workload c: many rooms (one member per node each, homes spread over the nodes),
/// three messages per room.
async fn conclave_rooms(args: &BenchArgs) -> anyhow::Result<RoomsResult> {
    let (cluster, pids) = conclave_cluster(args, "conclave-c").await?;
    let run = async {
        let users = conclave_users(&cluster.file, 1).await?;
        let n = args.rooms();
        let mut result = RoomsResult {
            rooms: n,
            ..RoomsResult::default()
        };
        let before = samples(&pids);
        let start = Instant::now();
        let (rooms, failures) = set_up_rooms(&users, n).await?;
        result.failures = failures;
        result.setup_rate = rooms.len() as f64 / start.elapsed().as_secs_f64();
        let after = samples(&pids);
        let per_room = |total: f64| total / rooms.len().max(1) as f64;
        result.setup_cpu_ms = per_room(
            after
                .iter()
                .zip(&before)
                .map(|(a, b)| a.cpu - b.cpu)
                .sum::<f64>()
                * 1e3,
        );
        result.rss_per_room_kib = after
            .iter()
            .zip(&before)
            .map(|(a, b)| per_room(a.rss_kb as f64 - b.rss_kb as f64))
            .collect();
        result.publish = publish_to_rooms(args, &users, rooms).await;
        result.peak_rss_mib = samples(&pids)
            .iter()
            .map(|s| s.hwm_kb as f64 / 1024.0)
            .collect();
        anyhow::Ok(result)
    }
    .await;
    cluster.stop();
    run
}

/// How many rooms are set up at once.
const ROOM_SETUPS_CONCURRENT_MAX: usize = 32;

/// Creates `n` rooms, each owned by one of the three users (in turn) with the other
/// two invited; returns the rooms (with their owner's index) and how many failed.
async fn set_up_rooms(
    users: &[(User<RemoteNode>, NodeId)],
    n: usize,
) -> anyhow::Result<(Vec<(usize, RoomId)>, usize)> {
    assert_eq!(users.len(), 3, "one user per node of a three-node cluster");
    let permits = Arc::new(Semaphore::new(ROOM_SETUPS_CONCURRENT_MAX));
    let mut tasks = Vec::new();
    for r in 0..n {
        let permit = Arc::clone(&permits).acquire_owned().await?;
        let owner = users[r % 3].0.clone();
        let others: Vec<_> = (1..3)
            .map(|k| {
                let (u, node) = &users[(r + k) % 3];
                (u.public(), *node)
            })
            .collect();
        tasks.push(tokio::spawn(async move {
            let room = owner.create_room(Policy::default()).await?;
            for (public, node) in others {
                owner.invite(room, &public, node, RoomRole::Member).await?;
            }
            drop(permit);
            anyhow::Ok((r % 3, room))
        }));
    }
    let (mut rooms, mut failures) = (Vec::new(), 0);
    for t in tasks {
        match t.await? {
            Ok(room) => rooms.push(room),
            Err(_) => failures += 1,
        }
    }
    Ok((rooms, failures))
}

/// Three messages per room, publishes spread over the rooms, at maximum load. No
/// subscribers here: this run measures commits (delivery is workloads a and b).
async fn publish_to_rooms(
    args: &BenchArgs,
    users: &[(User<RemoteNode>, NodeId)],
    rooms: Vec<(usize, RoomId)>,
) -> Phase {
    let per_room = 3;
    let slots = rooms.len() * per_room;
    let rec = Recorder::new(1, slots);
    let owners: Vec<User<RemoteNode>> = users.iter().map(|(u, _)| u.clone()).collect();
    let room_of = Arc::new(rooms);
    let publish: PublishFn = Arc::new(move |_, body| {
        let mut index = [0u8; 8];
        index.copy_from_slice(&body[..8]);
        let (owner, room) = room_of[u64::from_le_bytes(index) as usize % room_of.len()];
        let user = owners[owner].clone();
        Box::pin(async move {
            match user.publish(room, &body).await? {
                Receipt::Committed { .. } => Ok(()),
                Receipt::Queued { .. } => bail!("queued, not committed"),
            }
        })
    });
    rec.lock().truncate(slots);
    let load = Load::Max {
        in_flight: args.in_flight,
    };
    let mut phase = drive(&rec, &publish, 1, 0, slots, args.size, load).await;
    phase.delivered = 0;
    phase.deliver_lat.clear();
    phase.deliver_rate = f64::NAN;
    phase
}

// ---------------------------------------------------------------------------------
// NATS JetStream
// ---------------------------------------------------------------------------------

/// The script that installs what the JetStream rows need; the bench itself never
/// installs software.
const INSTALL_SCRIPT: &str = "scripts/install-bench-deps.sh";

/// Finds `nats-server` on the PATH (or in the usual system directories).
fn nats_server() -> anyhow::Result<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/usr/bin", "/usr/local/bin"])
        .map(|d| Path::new(d).join("nats-server"))
        .find(|p| p.is_file());
    found.ok_or_else(|| {
        anyhow!(
            "nats-server is not installed, and the JetStream rows need it: run \
                 {INSTALL_SCRIPT} (Debian's nats-server package), or pass --jetstream none \
                 to benchmark conclave alone"
        )
    })
}

struct NatsCluster {
    children: Vec<Child>,
    urls: Vec<String>,
}

impl NatsCluster {
    fn pids(&self) -> Vec<u32> {
        self.children.iter().map(Child::id).collect()
    }
    fn stop(mut self) {
        for child in &self.children {
            signal::terminate(child);
        }
        for child in &mut self.children {
            if signal::wait_or_kill(child).is_none() {
                eprintln!(
                    "nats-server did not stop in {} ms; killed it",
                    signal::STOP_GRACE_MS
                );
            }
        }
    }
}

fn start_nats(exe: &Path, dir: &Path, nodes: usize, base_port: u16) -> anyhow::Result<NatsCluster> {
    fresh_dir(dir)?;
    let client_port = |i: usize| base_port + 200 + i as u16;
    let route_port = |i: usize| base_port + 210 + i as u16;
    let mut children = Vec::new();
    let mut urls = Vec::new();
    for i in 0..nodes {
        let store = dir.join(format!("n{i}"));
        let mut conf = format!(
            "server_name: n{i}\nlisten: 127.0.0.1:{}\njetstream {{ store_dir: \"{}\" }}\n",
            client_port(i),
            store.display()
        );
        if nodes > 1 {
            let routes: Vec<String> = (0..nodes)
                .filter(|&j| j != i)
                .map(|j| format!("\"nats-route://127.0.0.1:{}\"", route_port(j)))
                .collect();
            let _ = writeln!(
                conf,
                "cluster {{ name: bench, listen: 127.0.0.1:{}, routes: [{}] }}",
                route_port(i),
                routes.join(", ")
            );
        }
        let conf_path = dir.join(format!("n{i}.conf"));
        std::fs::write(&conf_path, conf)?;
        let log = std::fs::File::create(dir.join(format!("n{i}.log")))?;
        children.push(
            std::process::Command::new(exe)
                .arg("-c")
                .arg(&conf_path)
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .context("starting nats-server")?,
        );
        urls.push(format!("nats://127.0.0.1:{}", client_port(i)));
    }
    Ok(NatsCluster { children, urls })
}

async fn nats_connect(url: &str) -> anyhow::Result<async_nats::Client> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match async_nats::connect(url).await {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() > deadline => bail!("connecting to {url}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// The keys and identity a JetStream+crypto client uses: one room, one epoch key
/// (distributed out of band; key distribution is not part of this run).
#[derive(Clone)]
struct E2e {
    identity: Arc<Identity>,
    room: RoomId,
    keys: Arc<BTreeMap<Epoch, EpochKey>>,
}

impl E2e {
    fn new() -> Self {
        let mut rng = rand_core::UnwrapErr(getrandom::SysRng);
        let identity = Identity::generate(&mut rng);
        let mut keys = BTreeMap::new();
        keys.insert(Epoch(1), EpochKey::generate(&mut rng));
        E2e {
            identity: Arc::new(identity),
            room: RoomId([9; 16]),
            keys: Arc::new(keys),
        }
    }
    fn seal(&self, plaintext: &[u8]) -> anyhow::Result<Vec<u8>> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH)?;
        let frame = domain_client::seal(
            &mut rand_core::UnwrapErr(getrandom::SysRng),
            &self.identity,
            self.room,
            Epoch(1),
            &self.keys[&Epoch(1)],
            Time::from_unix_micros(u64::try_from(now.as_micros())?),
            plaintext,
        )
        .map_err(|e| anyhow!("{e:?}"))?;
        frame.encode().map_err(|e| anyhow!("{e:?}"))
    }
    fn open(&self, payload: &[u8]) -> anyhow::Result<Vec<u8>> {
        let frame = Frame::decode(payload).map_err(|e| anyhow!("{e:?}"))?;
        domain_client::open(&frame, &self.keys).map_err(|e| anyhow!("{e}"))
    }
}

/// JetStream with `nodes` servers and R`nodes`, `members` durable consumers (one per
/// member, connected round-robin to the servers), one publisher per server.
async fn jetstream(
    args: &BenchArgs,
    exe: &Path,
    nodes: usize,
    workload: &str,
    members: usize,
    crypto: bool,
    floor: &Floor,
) -> anyhow::Result<Result_> {
    use async_nats::jetstream::{self as js, consumer, stream};
    let name = format!("js-r{nodes}{}-{workload}", if crypto { "-e2e" } else { "" });
    let cluster = start_nats(exe, &args.dir.join(&name), nodes, args.base_port)?;
    let run = async {
        let mut clients = Vec::new();
        for url in &cluster.urls {
            clients.push(js::new(nats_connect(url).await?));
        }
        // A cluster needs a meta leader before it takes streams: retry.
        let deadline = Instant::now() + Duration::from_secs(30);
        let stream = loop {
            let created = clients[0]
                .get_or_create_stream(stream::Config {
                    name: "BENCH".into(),
                    subjects: vec!["bench.>".into()],
                    storage: stream::StorageType::File,
                    num_replicas: nodes,
                    ..Default::default()
                })
                .await;
            match created {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => bail!("creating the stream: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        };
        drop(stream);
        let e2e = E2e::new();
        let rec = Recorder::new(members, capacity(args));
        let mut readers = Vec::new();
        for m in 0..members {
            let ctx = clients[m % nodes].clone();
            let stream = ctx.get_stream("BENCH").await?;
            let consumer = stream
                .create_consumer(consumer::pull::Config {
                    durable_name: Some(format!("m{m}")),
                    ack_policy: consumer::AckPolicy::Explicit,
                    deliver_policy: consumer::DeliverPolicy::New,
                    ..Default::default()
                })
                .await
                .map_err(|e| anyhow!("creating consumer m{m}: {e}"))?;
            let mut messages = consumer
                .messages()
                .await
                .map_err(|e| anyhow!("consuming m{m}: {e}"))?;
            let rec = Arc::clone(&rec);
            let e2e = e2e.clone();
            readers.push(tokio::spawn(async move {
                while let Some(Ok(message)) = messages.next().await {
                    if crypto {
                        if let Ok(body) = e2e.open(&message.payload) {
                            rec.delivered(&body);
                        }
                    } else {
                        rec.delivered(&message.payload);
                    }
                    let _ = message.ack().await;
                }
            }));
        }
        let publishers = clients.clone();
        let seal = e2e.clone();
        let publish: PublishFn = Arc::new(move |p, body| {
            let ctx = publishers[p % publishers.len()].clone();
            let payload = if crypto { seal.seal(&body) } else { Ok(body) };
            Box::pin(async move {
                let ack = ctx
                    .publish("bench.room", payload?.into())
                    .await
                    .map_err(|e| anyhow!("publish: {e}"))?;
                ack.await.map_err(|e| anyhow!("ack: {e}"))?;
                Ok(())
            })
        });
        let mut result = Result_ {
            system: format!("JetStream R{nodes}{}", if crypto { "+crypto" } else { "" }),
            workload: workload.into(),
            members,
            floor: crypto.then(|| floor.jetstream(members)),
            ..Result_::default()
        };
        measure(args, &rec, &publish, nodes, &cluster.pids(), &mut result).await;
        for r in readers {
            r.abort();
        }
        anyhow::Ok(result)
    }
    .await;
    cluster.stop();
    run
}

// ---------------------------------------------------------------------------------
// The report
// ---------------------------------------------------------------------------------

fn ms(v: f64) -> String {
    if v.is_nan() {
        "–".into()
    } else if v < 10.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.1}")
    }
}

fn lat(sorted: &[f64]) -> String {
    format!(
        "{} / {} / {}",
        ms(percentile(sorted, 0.5)),
        ms(percentile(sorted, 0.99)),
        ms(percentile(sorted, 0.999))
    )
}

fn results_table(results: &[Result_]) -> String {
    let mut out = String::new();
    out.push_str("| system | workload | committed msg/s | delivered msg/s | publish→commit ms p50/p99/p999 (max) | publish→deliver ms p50/p99/p999 (max) | publish→commit (half) | publish→deliver (half) | half rate msg/s | CPU ms/msg servers | CPU ms/msg client | peak RSS MiB per server | crypto floor msg/s | delivered / floor |\n");
    out.push_str("|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n");
    for r in results {
        let _ = writeln!(
            out,
            "| {} | {} ({} members) | {:.0} | {:.0} | {} | {} | {} | {} | {:.0} | {:.3} | {:.3} | {} | {} | {} |",
            r.system,
            r.workload,
            r.members,
            r.max.commit_rate,
            r.max.deliver_rate,
            lat(&r.max.commit_lat),
            lat(&r.max.deliver_lat),
            lat(&r.half.commit_lat),
            lat(&r.half.deliver_lat),
            r.half.deliver_rate,
            r.cpu_server * 1e3,
            r.cpu_client * 1e3,
            r.peak_rss_mib
                .iter()
                .map(|m| format!("{m:.0}"))
                .collect::<Vec<_>>()
                .join(" / "),
            r.floor.map_or("–".into(), |f| format!("{f:.0}")),
            r.floor
                .map_or("–".into(), |f| format!("{:.1} %", 100.0 * r.max.deliver_rate / f)),
        );
    }
    out
}

fn ratio_table(results: &[Result_]) -> String {
    let mut out = String::new();
    out.push_str("| workload | peer | committed msg/s conclave ÷ peer | delivered msg/s conclave ÷ peer | deliver p50 (max) conclave ÷ peer | deliver p99 (max) conclave ÷ peer | deliver p50 (half) conclave ÷ peer | CPU/msg (servers) conclave ÷ peer |\n");
    out.push_str("|---|---|--:|--:|--:|--:|--:|--:|\n");
    for c in results.iter().filter(|r| r.system == "conclave") {
        for p in results
            .iter()
            .filter(|r| r.system != "conclave" && r.workload == c.workload)
        {
            let _ = writeln!(
                out,
                "| {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
                c.workload,
                p.system,
                c.max.commit_rate / p.max.commit_rate,
                c.max.deliver_rate / p.max.deliver_rate,
                percentile(&c.max.deliver_lat, 0.5) / percentile(&p.max.deliver_lat, 0.5),
                percentile(&c.max.deliver_lat, 0.99) / percentile(&p.max.deliver_lat, 0.99),
                percentile(&c.half.deliver_lat, 0.5) / percentile(&p.half.deliver_lat, 0.5),
                c.cpu_server / p.cpu_server,
            );
        }
    }
    out
}

/// Publish-to-deliver latency by percentile (x: 0 … 99.9 %, "nines" scale; y: log
/// milliseconds), one line per system and load, for one workload.
/// The plot area of a latency chart: percentiles on a log scale of (1 - p) across,
/// milliseconds on a log scale of decades `lo..=hi` up.
struct Chart {
    lo: f64,
    hi: f64,
}

impl Chart {
    const W: f64 = 760.0;
    const H: f64 = 420.0;
    const L: f64 = 60.0;
    const R: f64 = 230.0;
    const T: f64 = 30.0;
    const B: f64 = 50.0;
    const COLORS: [&'static str; 8] = [
        "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
    ];

    /// Decades wide enough for every value in `lines`.
    fn fitting(lines: &[(String, &[f64])]) -> Self {
        let all = lines.iter().flat_map(|(_, l)| l.iter().copied());
        let lo = all
            .clone()
            .fold(f64::INFINITY, f64::min)
            .max(0.01)
            .log10()
            .floor();
        let hi = all
            .fold(0.0f64, f64::max)
            .max(0.1)
            .log10()
            .ceil()
            .max(lo + 1.0);
        Chart { lo, hi }
    }

    fn x(&self, p: f64) -> f64 {
        Self::L + (Self::W - Self::L - Self::R) * (-(1.0 - p).max(1e-3).log10()) / 3.0
    }

    fn y(&self, v: f64) -> f64 {
        let (t, h, b) = (Self::T, Self::H, Self::B);
        t + (h - t - b) * (1.0 - (v.max(1e-3).log10() - self.lo) / (self.hi - self.lo))
    }

    /// The percentile grid, the millisecond decades and the axis label.
    fn axes(&self, svg: &mut String) {
        let (w, h, l, r, t, b) = (Self::W, Self::H, Self::L, Self::R, Self::T, Self::B);
        for (p, label) in [
            (0.0, "p0"),
            (0.5, "p50"),
            (0.9, "p90"),
            (0.99, "p99"),
            (0.999, "p99.9"),
        ] {
            let _ = writeln!(
                svg,
                "<line x1=\"{0:.1}\" y1=\"{t}\" x2=\"{0:.1}\" y2=\"{1:.1}\" stroke=\"#ddd\"/><text x=\"{0:.1}\" y=\"{2:.1}\" text-anchor=\"middle\">{label}</text>",
                self.x(p),
                h - b,
                h - b + 16.0
            );
        }
        let mut decade = self.lo;
        while decade <= self.hi {
            let v = 10f64.powf(decade);
            let _ = writeln!(
                svg,
                "<line x1=\"{l}\" y1=\"{0:.1}\" x2=\"{1:.1}\" y2=\"{0:.1}\" stroke=\"#ddd\"/><text x=\"{2:.1}\" y=\"{3:.1}\" text-anchor=\"end\">{v} ms</text>",
                self.y(v),
                w - r,
                l - 4.0,
                self.y(v) + 4.0
            );
            decade += 1.0;
        }
        let _ = writeln!(
            svg,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">percentile</text>",
            (l + w - r) / 2.0,
            h - 12.0
        );
    }

    /// Line `i`: its percentile curve and its legend entry.
    fn line(&self, svg: &mut String, i: usize, label: &str, sorted: &[f64]) {
        let (w, r, t) = (Self::W, Self::R, Self::T);
        let color = Self::COLORS[i % Self::COLORS.len()];
        let dash = if label.ends_with("(half)") {
            " stroke-dasharray=\"5,3\""
        } else {
            ""
        };
        let mut points = String::new();
        let steps = 200;
        for s in 0..=steps {
            let p = 1.0 - 10f64.powf(-3.0 * s as f64 / steps as f64);
            let _ = write!(
                points,
                "{:.1},{:.1} ",
                self.x(p),
                self.y(percentile(sorted, p))
            );
        }
        let _ = writeln!(
            svg,
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"1.5\"{dash} points=\"{points}\"/>"
        );
        let ly = t + 16.0 * i as f64;
        let _ = writeln!(
            svg,
            "<line x1=\"{0:.1}\" y1=\"{ly:.1}\" x2=\"{1:.1}\" y2=\"{ly:.1}\" stroke=\"{color}\" stroke-width=\"2\"{dash}/><text x=\"{2:.1}\" y=\"{3:.1}\">{label}</text>",
            w - r + 10.0,
            w - r + 30.0,
            w - r + 36.0,
            ly + 4.0
        );
    }
}

/// The publish→deliver latency chart of `workload`: one curve per system and load.
fn latency_svg(results: &[Result_], workload: &str) -> String {
    let lines: Vec<(String, &[f64])> = results
        .iter()
        .filter(|r| r.workload == workload)
        .flat_map(|r| {
            [
                (format!("{} (max)", r.system), r.max.deliver_lat.as_slice()),
                (
                    format!("{} (half)", r.system),
                    r.half.deliver_lat.as_slice(),
                ),
            ]
        })
        .filter(|(_, l)| !l.is_empty())
        .collect();
    let chart = Chart::fitting(&lines);
    let (w, h, l) = (Chart::W, Chart::H, Chart::L);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{l}\" y=\"18\" font-size=\"14\">publish→deliver latency, workload {workload} (every member decrypted)</text>\n"
    );
    chart.axes(&mut svg);
    for (i, (label, sorted)) in lines.iter().enumerate() {
        chart.line(&mut svg, i, label, sorted);
    }
    svg.push_str("</svg>\n");
    svg
}

fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or("?".into(), |kb| format!("{:.1} GiB", kb / 1024.0 / 1024.0));
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "?".into());
    format!("{cores} cores ({cpu}), {mem} memory")
}

/// Runs the benchmark and prints (and writes) the report.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    // Before anything is measured: a missing peer stops the run at once.
    let nats = if args.jetstream.iter().any(|j| j == "r1" || j == "r3") {
        Some(nats_server()?)
    } else {
        None
    };
    std::fs::create_dir_all(&args.dir)?;
    let started = Instant::now();
    let mut report = String::new();
    let _ = writeln!(
        report,
        "machine: {}; {} B payloads, {} messages at max with {} in flight, then {} at half that rate{}\n",
        machine(),
        args.size,
        args.messages(),
        args.in_flight,
        args.messages() / 2,
        if args.quick { " (--quick)" } else { "" }
    );
    eprintln!("== crypto floor");
    let floor = crypto_floor(args.crypto_iterations(), args.size)?;
    let _ = writeln!(
        report,
        "crypto floor (one core, {} B): seal+sign {:.1} µs, verify at home {:.1} µs, verify+decrypt per member {:.1} µs; machine floor = {} cores ÷ (seal + verify + members × open): {:.0} msg/s for 3 members, {:.0} msg/s for 30\n",
        args.size,
        floor.seal_us,
        floor.verify_us,
        floor.open_us,
        floor.cores,
        floor.conclave(3),
        floor.conclave(30)
    );
    eprint!("{report}");
    let (results, mut notes) = room_workloads(&args, nats.as_deref(), &floor, started).await;
    report.push_str(&results_table(&results));
    report.push('\n');
    report.push_str(&ratio_table(&results));
    if args.has("c") {
        eprintln!(
            "== conclave, workload c (at {:.0} s)",
            started.elapsed().as_secs_f64()
        );
        match conclave_rooms(&args).await {
            Ok(c) => report.push_str(&rooms_line(&c)),
            Err(e) => notes.push(format!("conclave workload c failed: {e:#}")),
        }
    }
    if !notes.is_empty() {
        report.push_str("\nnotes:\n");
        for n in &notes {
            let _ = writeln!(report, "- {n}");
        }
    }
    let _ = writeln!(
        report,
        "\nJetStream durability: JetStream acknowledges a publish once the message is written to the file store (R1) or stored by a quorum (R3), before fsync; the NATS docs give 2 minutes as the default `sync_interval`. The installed nats-server 2.9.10 rejects `sync_interval` (`nats-server -t`: unknown field), so a sync-always JetStream run is not possible with it. conclave's home node fsyncs (LMDB) before acknowledging.\n\ntook {:.0} s",
        started.elapsed().as_secs_f64()
    );
    println!("{report}");
    write_report(&args, &report, &results)
}

/// Workloads a and b on conclave, then on each JetStream peer asked for (raw and
/// with the same crypto): the results, and a note per failed run.
async fn room_workloads(
    args: &BenchArgs,
    nats: Option<&Path>,
    floor: &Floor,
    started: Instant,
) -> (Vec<Result_>, Vec<String>) {
    let mut results = Vec::new();
    let mut notes = Vec::new();
    for (workload, per_node) in [("a", 1usize), ("b", 10)] {
        if !args.has(workload) {
            continue;
        }
        eprintln!(
            "== conclave, workload {workload} (at {:.0} s)",
            started.elapsed().as_secs_f64()
        );
        match conclave_room(args, workload, per_node, floor).await {
            Ok(r) => results.push(r),
            Err(e) => notes.push(format!("conclave workload {workload} failed: {e:#}")),
        }
        let Some(exe) = nats else { continue };
        let peers = args.jetstream.iter().filter_map(|j| match j.as_str() {
            "r1" => Some(1),
            "r3" => Some(3),
            _ => None,
        });
        for nodes in peers {
            for crypto in [false, true] {
                eprintln!(
                    "== JetStream R{nodes}{}, workload {workload} (at {:.0} s)",
                    if crypto { "+crypto" } else { "" },
                    started.elapsed().as_secs_f64()
                );
                match jetstream(args, exe, nodes, workload, per_node * 3, crypto, floor).await {
                    Ok(r) => results.push(r),
                    Err(e) => notes.push(format!(
                        "JetStream R{nodes} (crypto: {crypto}) workload {workload} failed: {e:#}"
                    )),
                }
            }
        }
    }
    for r in &results {
        for n in &r.notes {
            notes.push(format!("{} {}: {n}", r.system, r.workload));
        }
    }
    (results, notes)
}

/// Workload c's paragraph of the report.
fn rooms_line(c: &RoomsResult) -> String {
    let per_node = |values: &[f64], precision: usize| {
        values
            .iter()
            .map(|v| format!("{v:.precision$}"))
            .collect::<Vec<_>>()
            .join(" / ")
    };
    format!(
        "\nworkload c (conclave): {} rooms (3 members, one per node; homes spread over the nodes): set up (create + 2 invites) at {:.0} rooms/s, {:.2} CPU ms per room (all nodes), RSS growth per room {} KiB per node; then 3 messages per room: {:.0} msg/s committed, publish→commit ms p50/p99/p999 {}; peak RSS MiB per node {}; {} failures\n",
        c.rooms,
        c.setup_rate,
        c.setup_cpu_ms,
        per_node(&c.rss_per_room_kib, 1),
        c.publish.commit_rate,
        lat(&c.publish.commit_lat),
        per_node(&c.peak_rss_mib, 0),
        c.failures + c.publish.failures
    )
}

/// Writes `DIR/bench.md` and the latency charts of workloads a and b.
fn write_report(args: &BenchArgs, report: &str, results: &[Result_]) -> anyhow::Result<()> {
    std::fs::write(args.dir.join("bench.md"), report)?;
    for w in ["a", "b"] {
        if results.iter().any(|r| r.workload == w) {
            std::fs::write(
                args.dir.join(format!("latency-{w}.svg")),
                latency_svg(results, w),
            )?;
        }
    }
    eprintln!(
        "wrote {} and latency-*.svg there",
        args.dir.join("bench.md").display()
    );
    Ok(())
}

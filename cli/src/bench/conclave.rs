//! conclave under load: a local three-node cluster of separate node processes,
//! driven over the client protocol.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use conclave_actors::{Identity, NodeId, RoomId};
use tokio::sync::Semaphore;

use conclave::{identity_file, Policy, Position, Receipt, RemoteNode, RoomRole, User, UserRole};

use super::driver::{
    capacity, drive, measure, samples, Durability, Load, Phase, PublishFn, Recorder, Result_,
};
use super::floor::Floor;
use super::BenchArgs;
use crate::cluster::{cluster_up, Cluster, ClusterArgs, ClusterFile};

pub(super) fn fresh_dir(dir: &Path) -> anyhow::Result<()> {
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
        no_replication: false,
    })
    .await?;
    let pids = cluster.file.node.iter().map(|n| n.pid).collect();
    Ok((cluster, pids))
}

/// Workloads a and b: one room homed on node 0, `per_node` members on each node,
/// one publisher per node, every member subscribed; `window` publishes in flight,
/// then (when `with_half`) the half-load run.
pub(super) async fn conclave_room(
    args: &BenchArgs,
    workload: &str,
    per_node: usize,
    window: usize,
    with_half: bool,
    floor: &Floor,
) -> anyhow::Result<Result_> {
    let name = format!("conclave-{workload}-w{window}");
    let (cluster, pids) = conclave_cluster(args, &name).await?;
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
            durability: Durability::FsyncBeforeAck,
            crypto: true,
            window,
            members,
            floor: Some(floor.conclave(members)),
            ..Result_::default()
        };
        measure(args, &rec, &publish, 3, &pids, with_half, &mut result).await;
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
pub(super) struct RoomsResult {
    pub(super) rooms: usize,
    pub(super) setup_rate: f64,
    pub(super) setup_cpu_ms: f64,
    pub(super) rss_per_room_kib: Vec<f64>,
    pub(super) publish: Phase,
    pub(super) peak_rss_mib: Vec<f64>,
    pub(super) failures: usize,
}

/// Workload c: many rooms (one member per node each, homes spread over the nodes),
/// three messages per room.
pub(super) async fn conclave_rooms(args: &BenchArgs) -> anyhow::Result<RoomsResult> {
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

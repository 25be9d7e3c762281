//! `conclave check`: end-to-end verification against a cluster started by
//! `conclave cluster up` (users on every node, a room spanning them, every member
//! decrypts every message exactly once).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::{Args, ValueEnum};
use conclave::{
    identity_file, ApiError, Identity, NodeId, Policy, Position, Receipt, RemoteNode, RoomRole,
    User, UserRole,
};
use conclave_actors::ids::{RoomId, Seq};

use crate::cluster::{ClusterFile, ClusterNode};

/// How long the check waits for one publish before counting it failed.
const PUBLISH_WAIT_MS: u64 = 5_000;
/// How long a publisher's reconnect may take, and how often one is tried.
const RECONNECT_WAIT_MS: u64 = 2_000;
/// How long a reader waits before reconnecting to its node.
const READER_RETRY_MS: u64 = 300;
/// How often convergence is checked at the end.
const SETTLE_POLL_MS: u64 = 200;
/// How long to keep reading after convergence, so that a duplicate would show.
const DUPLICATE_WAIT_MS: u64 = 500;
/// How often loop mode prints progress.
const TICK_MS: u64 = 1_000;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum CheckMode {
    /// Publish --messages, confirm every member decrypts them all, exit.
    Once,
    /// Publish continuously, print progress per second, verify at the end.
    Loop,
}

/// Options of `conclave check`.
#[derive(Args)]
pub(crate) struct CheckArgs {
    /// The cluster's directory (with cluster.toml).
    #[arg(long, value_name = "DIR")]
    cluster: PathBuf,
    /// How many messages (mode once).
    #[arg(long, default_value_t = 100)]
    messages: usize,
    /// once or loop.
    #[arg(long, value_enum, default_value = "once")]
    mode: CheckMode,
    /// How long to publish, in seconds (mode loop).
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    duration: u64,
    /// Time between messages, in milliseconds (mode loop).
    #[arg(long, value_name = "MS", default_value_t = 100)]
    interval: u64,
    /// How long to wait for every member to converge at the end, in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 60)]
    settle: u64,
}

/// A member of the check's room: one user per node.
struct Member {
    name: String,
    node: ClusterNode,
    /// The node's id from cluster.toml: every connection pins it.
    node_id: NodeId,
    identity: Identity,
}

/// What one member's reader has seen, by message id.
#[derive(Default)]
struct Seen {
    /// Message id → times seen.
    ids: BTreeMap<u128, u32>,
    /// The next sequence number to read from.
    next: Seq,
    attached: bool,
}

type SharedSeen = Arc<Mutex<Seen>>;

fn lock(seen: &SharedSeen) -> MutexGuard<'_, Seen> {
    seen.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What the publishers sent, by outcome.
#[derive(Default)]
struct Sent {
    attempted: usize,
    committed: Vec<u128>,
    queued: Vec<u128>,
    failed: usize,
}

/// Adds a fresh user on each node (through that node's admin) and builds a room
/// homed on the first node with all of them.
async fn check_setup(file: &ClusterFile) -> anyhow::Result<(RoomId, Vec<Member>)> {
    if file.node.is_empty() {
        bail!("cluster.toml lists no node");
    }
    let mut members = Vec::new();
    for node in &file.node {
        let admin_identity = identity_file::load(&node.admin)?;
        let node_id = node.node_id()?;
        let admin = RemoteNode::connect(&admin_identity, node.addr, Some(node_id))
            .await
            .with_context(|| format!("connecting to {} as its admin", node.name))?;
        let identity = Identity::generate(&mut rand_core::UnwrapErr(getrandom::SysRng));
        admin.add_user(&identity.public(), UserRole::Member).await?;
        members.push(Member {
            name: format!("user@{}", node.name),
            node: node.clone(),
            node_id,
            identity,
        });
    }
    let (first, addr, node_id) = (&members[0], members[0].node.addr, members[0].node_id);
    let owner = RemoteNode::connect(&first.identity, addr, Some(node_id)).await?;
    let room = owner.create_room(Policy::default()).await?;
    for m in &members[1..] {
        owner
            .invite(
                room,
                &m.identity.public(),
                m.node.id.parse()?,
                RoomRole::Member,
            )
            .await?;
    }
    Ok((room, members))
}

/// Reads `room` as `member` forever, reconnecting to its node when the connection
/// breaks and resuming after the last message seen.
async fn reader(
    (addr, node_id): (SocketAddr, NodeId),
    identity: Identity,
    room: RoomId,
    seen: SharedSeen,
) {
    loop {
        let from = match lock(&seen).next {
            Seq(0) => Position::Start,
            next => Position::At(next),
        };
        let sub = async {
            let user = RemoteNode::connect(&identity, addr, Some(node_id)).await?;
            user.subscribe(room, from).await
        };
        if let Ok(mut sub) = sub.await {
            lock(&seen).attached = true;
            while let Some(Ok(message)) = sub.next().await {
                let mut s = lock(&seen);
                *s.ids.entry(message.id.0).or_default() += 1;
                s.next = Seq(message.seq.0 + 1);
            }
        }
        lock(&seen).attached = false;
        tokio::time::sleep(Duration::from_millis(READER_RETRY_MS)).await;
    }
}

pub(crate) async fn check(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let file = ClusterFile::read(&args.cluster)?;
    let (room, members) = check_setup(&file).await?;
    println!(
        "room {room} homed on {} with {} members, one per node",
        file.node[0].name,
        members.len()
    );
    let seen: Vec<SharedSeen> = members.iter().map(|_| SharedSeen::default()).collect();
    let readers: Vec<_> = members
        .iter()
        .zip(&seen)
        .map(|(m, s)| {
            let (node, identity) = ((m.node.addr, m.node_id), m.identity.clone());
            tokio::spawn(reader(node, identity, room, s.clone()))
        })
        .collect();
    let started = Instant::now();
    let sent = publish(&args, room, &members, &seen).await;
    settle(&args, &sent, &seen).await;
    for r in readers {
        r.abort();
    }
    println!(
        "published {} messages in {:.1} s: {} committed, {} queued, {} failed",
        sent.attempted,
        started.elapsed().as_secs_f64(),
        sent.committed.len(),
        sent.queued.len(),
        sent.failed
    );
    if verdict(&args, &sent, &members, &seen) {
        println!("OK: every member decrypted every committed message exactly once");
        Ok(ExitCode::SUCCESS)
    } else {
        println!("FAILED: see the lines above");
        Ok(ExitCode::FAILURE)
    }
}

/// Publishes round-robin from every member (--messages in mode once, for
/// --duration in mode loop), reconnecting publishers whose node went away.
async fn publish(args: &CheckArgs, room: RoomId, members: &[Member], seen: &[SharedSeen]) -> Sent {
    let mut publishers: Vec<Option<User<RemoteNode>>> = Vec::new();
    for m in members {
        publishers.push(
            RemoteNode::connect(&m.identity, m.node.addr, Some(m.node_id))
                .await
                .ok(),
        );
    }
    let mut reconnect_at = vec![Instant::now(); members.len()];
    let mut sent = Sent::default();
    let started = Instant::now();
    let mut last_tick = Instant::now();
    let (limit, interval) = match args.mode {
        CheckMode::Once => (Some(args.messages), Duration::ZERO),
        CheckMode::Loop => (None, Duration::from_millis(args.interval)),
    };
    while limit.map_or(
        started.elapsed() < Duration::from_secs(args.duration),
        |n| sent.attempted < n,
    ) {
        let i = sent.attempted % members.len();
        sent.attempted += 1;
        // Reconnect at most once per wait, and never for longer than that.
        if publishers[i].is_none() && Instant::now() >= reconnect_at[i] {
            reconnect_at[i] = Instant::now() + Duration::from_millis(RECONNECT_WAIT_MS);
            let m = &members[i];
            let connect = RemoteNode::connect(&m.identity, m.node.addr, Some(m.node_id));
            publishers[i] = tokio::time::timeout(Duration::from_millis(RECONNECT_WAIT_MS), connect)
                .await
                .ok()
                .and_then(Result::ok);
        }
        let text = format!("check {} from {}", sent.attempted, members[i].name);
        let result = publish_one(publishers[i].as_ref(), room, &text).await;
        record(
            args,
            &mut sent,
            &mut publishers[i],
            &members[i].name,
            result,
        );
        if args.mode == CheckMode::Loop && last_tick.elapsed() >= Duration::from_millis(TICK_MS) {
            last_tick = Instant::now();
            print_tick(started, members, seen, &sent);
        }
        if !interval.is_zero() {
            tokio::time::sleep(interval).await;
        }
    }
    sent
}

/// One bounded publish, so that a node killed mid-request does not stall the
/// loop. (A message that timed out may still commit: it is then delivered, though
/// not counted as sent.)
async fn publish_one(
    publisher: Option<&User<RemoteNode>>,
    room: RoomId,
    text: &str,
) -> Result<Receipt, ApiError> {
    let wait = Duration::from_millis(PUBLISH_WAIT_MS);
    match publisher {
        Some(user) => tokio::time::timeout(wait, user.publish(room, text.as_bytes()))
            .await
            .unwrap_or(Err(ApiError::Timeout(wait))),
        None => Err(ApiError::Connection("not connected".into())),
    }
}

fn record(
    args: &CheckArgs,
    sent: &mut Sent,
    publisher: &mut Option<User<RemoteNode>>,
    name: &str,
    result: Result<Receipt, ApiError>,
) {
    match result {
        Ok(Receipt::Committed { id, .. }) => sent.committed.push(id.0),
        Ok(Receipt::Queued { id }) => sent.queued.push(id.0),
        Err(error) => {
            sent.failed += 1;
            if matches!(error, ApiError::Connection(_) | ApiError::Timeout(_)) {
                *publisher = None;
            }
            if args.mode == CheckMode::Once {
                eprintln!("publish {} by {name} failed: {error}", sent.attempted);
            }
        }
    }
}

/// Waits (up to --settle) until every member has every committed and every
/// queued message, then a moment more so that a duplicate would show.
async fn settle(args: &CheckArgs, sent: &Sent, seen: &[SharedSeen]) {
    let expected: BTreeSet<u128> = sent.committed.iter().chain(&sent.queued).copied().collect();
    let deadline = Instant::now() + Duration::from_secs(args.settle);
    loop {
        let done = seen.iter().all(|s| {
            let s = lock(s);
            expected.iter().all(|id| s.ids.contains_key(id))
        });
        if done || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(SETTLE_POLL_MS)).await;
    }
    tokio::time::sleep(Duration::from_millis(DUPLICATE_WAIT_MS)).await;
}

/// Prints each member's tally; true when nothing committed is missing and nothing
/// arrived twice (and, in mode once, nothing failed or stayed queued).
fn verdict(args: &CheckArgs, sent: &Sent, members: &[Member], seen: &[SharedSeen]) -> bool {
    let mut ok = args.mode == CheckMode::Loop || sent.failed == 0;
    for (m, s) in members.iter().zip(seen) {
        let s = lock(s);
        let missing = sent
            .committed
            .iter()
            .filter(|id| !s.ids.contains_key(id))
            .count();
        let missing_queued = sent
            .queued
            .iter()
            .filter(|id| !s.ids.contains_key(id))
            .count();
        let duplicates = s.ids.values().filter(|&&n| n > 1).count();
        let received = s.ids.len();
        println!(
            "{:<12} on {}: received {received}, missing {missing} committed, {missing_queued} queued not yet delivered, {duplicates} delivered twice",
            m.name, m.node.name,
        );
        if missing > 0 || duplicates > 0 || (args.mode == CheckMode::Once && missing_queued > 0) {
            ok = false;
        }
    }
    ok
}

fn print_tick(started: Instant, members: &[Member], seen: &[SharedSeen], sent: &Sent) {
    let mut line = format!(
        "t={:>4.0}s sent: {} committed, {} queued, {} failed |",
        started.elapsed().as_secs_f64(),
        sent.committed.len(),
        sent.queued.len(),
        sent.failed
    );
    for (m, s) in members.iter().zip(seen) {
        let s = lock(s);
        let state = if s.attached {
            "attached to"
        } else {
            "reconnecting to"
        };
        line.push_str(&format!(
            " {} received {} ({state} {})",
            m.name,
            s.ids.len(),
            m.node.name
        ));
    }
    println!("{line}");
}

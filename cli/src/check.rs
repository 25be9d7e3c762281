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
    identity_file, ApiError, Identity, NodeId, Policy, Position, Receipt, RemoteNode, Replication,
    RoomRole, User, UserRole,
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
    /// Sequence → the message id read there.
    seqs: BTreeMap<u64, u128>,
    /// Sequences read again with another message id.
    conflicts: usize,
    /// The next sequence number to read from.
    next: Seq,
    attached: bool,
}

impl Seen {
    /// Notes message `id` read at `seq`.
    fn read(&mut self, seq: u64, id: u128) {
        *self.ids.entry(id).or_default() += 1;
        if self.seqs.insert(seq, id).is_some_and(|was| was != id) {
            self.conflicts += 1;
        }
        // Subscription::next refuses a sequence with no next.
        self.next = Seq(seq.saturating_add(1));
    }
}

type SharedSeen = Arc<Mutex<Seen>>;

fn lock(seen: &SharedSeen) -> MutexGuard<'_, Seen> {
    seen.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What the publishers sent, by outcome.
#[derive(Default)]
struct Sent {
    attempted: usize,
    /// Message id and the sequence its receipt gave.
    committed: Vec<(u128, u64)>,
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
        admin.node().close().await;
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
    owner.node().close().await;
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
                lock(&seen).read(message.seq.0, message.id.0);
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
            let leader = room_leader(members, room).await;
            print_tick(started, members, seen, &sent, &leader);
        }
        if !interval.is_zero() {
            tokio::time::sleep(interval).await;
        }
    }
    for publisher in publishers.into_iter().flatten() {
        publisher.node().close().await;
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
        Ok(Receipt::Committed { id, seq }) => sent.committed.push((id.0, seq.0)),
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
    let committed = sent.committed.iter().map(|&(id, _)| id);
    let expected: BTreeSet<u128> = committed.chain(sent.queued.iter().copied()).collect();
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

/// Prints each member's tally; true when nothing committed is missing, nothing
/// arrived twice, the sequences a member read have no gap and no sequence holds
/// two messages, and every receipt's sequence holds its message (and, in mode
/// once, nothing failed or stayed queued).
fn verdict(args: &CheckArgs, sent: &Sent, members: &[Member], seen: &[SharedSeen]) -> bool {
    let mut ok = args.mode == CheckMode::Loop || sent.failed == 0;
    for (m, s) in members.iter().zip(seen) {
        let s = lock(s);
        let tally = Tally::of(sent, &s);
        println!(
            "{:<12} on {}: received {}, missing {} committed, {} queued not yet delivered, {} delivered twice, {} sequence gaps, {} sequences read with two messages, {} receipts whose sequence holds another message",
            m.name, m.node.name, s.ids.len(), tally.missing, tally.missing_queued,
            tally.duplicates, tally.gaps, s.conflicts, tally.misplaced,
        );
        let queued_ok = args.mode == CheckMode::Loop || tally.missing_queued == 0;
        if !(tally.is_clean() && s.conflicts == 0 && queued_ok) {
            ok = false;
        }
    }
    ok
}

/// What one member's reader got wrong.
struct Tally {
    missing: usize,
    missing_queued: usize,
    duplicates: usize,
    /// Sequences between the first and the last read that were not read.
    gaps: u64,
    /// Receipts whose sequence this member read with another message.
    misplaced: usize,
}

impl Tally {
    fn of(sent: &Sent, s: &Seen) -> Self {
        let span = match (s.seqs.keys().next(), s.seqs.keys().next_back()) {
            (Some(first), Some(last)) => last - first + 1,
            _ => 0,
        };
        Self {
            missing: sent
                .committed
                .iter()
                .filter(|(id, _)| !s.ids.contains_key(id))
                .count(),
            missing_queued: sent
                .queued
                .iter()
                .filter(|id| !s.ids.contains_key(id))
                .count(),
            duplicates: s.ids.values().filter(|&&n| n > 1).count(),
            gaps: span - s.seqs.len() as u64,
            misplaced: sent
                .committed
                .iter()
                .filter(|(id, seq)| s.seqs.get(seq).is_some_and(|got| got != id))
                .count(),
        }
    }

    fn is_clean(&self) -> bool {
        self.missing == 0 && self.duplicates == 0 && self.gaps == 0 && self.misplaced == 0
    }
}

/// Which node leads the room's shard group now, as the nodes' `/healthz` say
/// (the room is on the default layout `cluster up` starts nodes with, homed on
/// the first member's node); `no leader`, or `off` without replication.
async fn room_leader(members: &[Member], room: RoomId) -> String {
    let mut nodes: Vec<NodeId> = members.iter().map(|m| m.node_id).collect();
    nodes.sort();
    let Some(shard) = Replication::default().shard_of(&nodes, members[0].node_id, room) else {
        return "off".into();
    };
    let mut replicated = false;
    for m in members {
        let Ok((_, body)) = conclave::observe::http_get(m.node.metrics, "/healthz").await else {
            continue;
        };
        let health: Option<conclave::observe::Health> = serde_json::from_str(&body).ok();
        let Some(status) = health.and_then(|h| h.replication) else {
            continue;
        };
        replicated = true;
        if status.led.contains(&shard) {
            return format!("led by {}", m.node.name);
        }
    }
    if replicated {
        "no leader".into()
    } else {
        "off".into()
    }
}

fn print_tick(
    started: Instant,
    members: &[Member],
    seen: &[SharedSeen],
    sent: &Sent,
    leader: &str,
) {
    let mut line = format!(
        "t={:>4.0}s room {leader}; sent: {} committed, {} queued, {} failed |",
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

#[cfg(test)]
mod tests {
    use super::*;

    fn sent(committed: &[(u128, u64)]) -> Sent {
        Sent {
            attempted: committed.len(),
            committed: committed.to_vec(),
            ..Sent::default()
        }
    }

    #[test]
    fn a_reader_that_read_every_receipt_where_it_landed_is_clean() {
        let mut seen = Seen::default();
        for (seq, id) in [(4, 40), (5, 50), (6, 60)] {
            seen.read(seq, id);
        }
        let tally = Tally::of(&sent(&[(40, 4), (50, 5), (60, 6)]), &seen);
        assert!(tally.is_clean());
        assert_eq!((seen.conflicts, seen.next), (0, Seq(7)));
    }

    #[test]
    fn a_gap_a_misplaced_receipt_and_a_sequence_read_twice_are_each_caught() {
        let mut gap = Seen::default();
        for (seq, id) in [(1, 10), (2, 20), (4, 40)] {
            gap.read(seq, id);
        }
        let tally = Tally::of(&sent(&[(10, 1), (20, 2), (40, 4)]), &gap);
        assert_eq!((tally.gaps, tally.is_clean()), (1, false));

        let mut swapped = Seen::default();
        swapped.read(1, 20);
        swapped.read(2, 10);
        let tally = Tally::of(&sent(&[(10, 1), (20, 2)]), &swapped);
        assert_eq!((tally.misplaced, tally.missing), (2, 0));
        assert!(!tally.is_clean());

        let mut twice = Seen::default();
        twice.read(1, 10);
        twice.read(1, 11);
        assert_eq!(twice.conflicts, 1);
    }
}

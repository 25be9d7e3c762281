//! Rooms on the shard groups across real node processes (`cluster up`, three
//! nodes, every shard on all three): a room keeps taking and delivering
//! publishes while any one node, its home included, is SIGKILLed and restarted;
//! with two nodes of three down, publishes are refused `no_quorum` and none of
//! those ever appears; every member reads every committed message once, in one
//! order.
//!
//! How long publishes paused per kill is printed (run with `--nocapture`),
//! never asserted: the waits are generous bounds only.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use conclave::{
    identity_file, ApiError, Denial, Identity, NodeId, Policy, Position, Receipt, RemoteNode,
    RoomId, RoomRole, User, UserRole,
};
use conclave_cli::cluster::{ClusterFile, ClusterNode};
use conclave_integration::processes::{cluster_up, health, kill_and_wait_gone, restart_node};

const EXE: &str = env!("CARGO_BIN_EXE_conclave-it");

/// The longest any wait here may take (a bound, not a timing claim).
const BOUND: Duration = Duration::from_secs(60);

/// How long one publish may take before it counts as lost (a node killed
/// mid-request).
const PUBLISH_WAIT: Duration = Duration::from_secs(5);

/// How often each publisher publishes.
const PUBLISH_EVERY: Duration = Duration::from_millis(20);

struct Member {
    identity: Identity,
    addr: SocketAddr,
    node_id: NodeId,
}

impl Member {
    async fn connect(&self) -> Result<User<RemoteNode>, ApiError> {
        RemoteNode::connect(&self.identity, self.addr, Some(self.node_id)).await
    }
}

/// A user on each node (added by its admin) and a room of the first one's with
/// the other two invited.
async fn setup(file: &ClusterFile) -> (RoomId, Vec<Member>) {
    let mut members = Vec::new();
    for node in &file.node {
        let admin = identity_file::load(&node.admin).unwrap();
        let node_id = node.node_id().unwrap();
        let as_admin = RemoteNode::connect(&admin, node.addr, Some(node_id))
            .await
            .unwrap();
        let identity = Identity::generate(&mut rand_core::UnwrapErr(getrandom::SysRng));
        as_admin
            .add_user(&identity.public(), UserRole::Member)
            .await
            .unwrap();
        as_admin.node().close().await;
        members.push(Member {
            identity,
            addr: node.addr,
            node_id,
        });
    }
    let owner = members[0].connect().await.unwrap();
    let room = owner.create_room(Policy::default()).await.unwrap();
    for (m, node) in members[1..].iter().zip(&file.node[1..]) {
        let home: NodeId = node.id.parse().unwrap();
        let invitee = m.identity.public();
        let invited = owner.invite(room, &invitee, home, RoomRole::Member);
        invited.await.unwrap();
    }
    owner.node().close().await;
    (room, members)
}

/// What a publisher got back, and when.
#[derive(Clone, Debug)]
enum Got {
    Committed { id: u128, seq: u64 },
    Queued,
    NoQuorum,
    Failed,
}

type Log = Arc<Mutex<Vec<(Instant, usize, Got)>>>;

/// Publishes to `room` as member `i` every [`PUBLISH_EVERY`] until `stop`,
/// reconnecting when its node is gone, logging each result.
async fn publisher(member: Arc<Member>, i: usize, room: RoomId, stop: Arc<AtomicBool>, log: Log) {
    let mut user = None;
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        if user.is_none() {
            user = tokio::time::timeout(Duration::from_secs(2), member.connect())
                .await
                .ok()
                .and_then(Result::ok);
        }
        let got = match &user {
            None => Got::Failed,
            Some(u) => {
                n += 1;
                let text = format!("member {i} message {n}");
                match tokio::time::timeout(PUBLISH_WAIT, u.publish(room, text.as_bytes())).await {
                    Ok(Ok(Receipt::Committed { id, seq })) => Got::Committed {
                        id: id.0,
                        seq: seq.0,
                    },
                    Ok(Ok(Receipt::Queued { .. })) => Got::Queued,
                    Ok(Err(ApiError::Denied(Denial::NoQuorum))) => Got::NoQuorum,
                    Ok(Err(_)) | Err(_) => {
                        user = None;
                        Got::Failed
                    }
                }
            }
        };
        log.lock().unwrap().push((Instant::now(), i, got));
        tokio::time::sleep(PUBLISH_EVERY).await;
    }
}

/// Waits until every node of `nodes` answers and every Raft group it
/// replicates knows a leader.
async fn wait_led(nodes: &[&ClusterNode]) {
    let started = Instant::now();
    loop {
        let mut led = true;
        for node in nodes {
            let h = health(node.metrics).await;
            led &= h
                .and_then(|h| h.replication)
                .is_some_and(|r| r.without_leader == 0 && r.rejoining == 0);
        }
        if led {
            return;
        }
        assert!(started.elapsed() < BOUND, "the groups got no leader");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until a publisher other than `victim`'s got a commit after `since`;
/// returns when.
async fn next_commit(log: &Log, victim: usize, since: Instant) -> Instant {
    loop {
        let found = log.lock().unwrap().iter().find_map(|(at, i, got)| {
            (*at > since && *i != victim && matches!(got, Got::Committed { .. })).then_some(*at)
        });
        if let Some(at) = found {
            return at;
        }
        assert!(
            since.elapsed() < BOUND,
            "no publish committed while n{victim} was down"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Every message `member` reads of `room`, from the start, until it has read
/// up to sequence number `last` (or the bound passes): seq → (id, body).
async fn read_all(member: &Member, room: RoomId, last: u64) -> BTreeMap<u64, (u128, Vec<u8>)> {
    let user = member.connect().await.unwrap();
    let mut sub = user.subscribe(room, Position::Start).await.unwrap();
    let mut read = BTreeMap::new();
    let started = Instant::now();
    while read.last_key_value().is_none_or(|(&seq, _)| seq < last) && started.elapsed() < BOUND {
        match tokio::time::timeout(Duration::from_secs(5), sub.next()).await {
            Ok(Some(Ok(message))) => {
                let again = read.insert(message.seq.0, (message.id.0, message.body));
                assert!(again.is_none(), "seq {} read twice", message.seq.0);
            }
            Ok(other) => panic!("the subscription ended: {other:?}"),
            Err(_) => {}
        }
    }
    read
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_goes_on_while_any_node_is_killed_and_refuses_without_a_quorum() {
    let (dir, mut guard, _table) = cluster_up(EXE, 3, 43);
    let text = std::fs::read_to_string(dir.path().join("cluster/cluster.toml")).unwrap();
    let file: ClusterFile = toml::from_str(&text).unwrap();
    let nodes: Vec<&ClusterNode> = file.node.iter().collect();
    wait_led(&nodes).await;
    let (room, members) = setup(&file).await;
    let members: Vec<Arc<Member>> = members.into_iter().map(Arc::new).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let log: Log = Arc::default();
    let tasks: Vec<_> = members
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let (m, stop, log) = (Arc::clone(m), Arc::clone(&stop), Arc::clone(&log));
            tokio::spawn(publisher(m, i, room, stop, log))
        })
        .collect();

    // Each node killed twice, the room's home (node 0) first: the other two
    // go on committing; the pause is the time to the next commit.
    let mut pids: Vec<u32> = file.node.iter().map(|n| n.pid).collect();
    let mut pauses = Vec::new();
    for round in 0..6 {
        let victim = round % 3;
        tokio::time::sleep(Duration::from_millis(500)).await;
        kill_and_wait_gone(pids[victim], nodes[victim].addr);
        let killed = Instant::now();
        let resumed = next_commit(&log, victim, killed).await;
        pauses.push(resumed - killed);
        println!(
            "n{victim} killed: the next commit {:?} later",
            resumed - killed
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        let child = restart_node(EXE, &nodes[victim].args);
        pids[victim] = child.id();
        guard.others.push(child);
        wait_led(&nodes).await;
    }
    println!(
        "publishes paused per kill: median {:?}, worst {:?} ({} kills)",
        median(pauses.clone()),
        pauses.iter().max().unwrap(),
        pauses.len()
    );

    // Two of three down: node 0's member is refused `no_quorum` (once its
    // groups know they have no leader); those never appear.
    tokio::time::sleep(Duration::from_millis(500)).await;
    kill_and_wait_gone(pids[1], nodes[1].addr);
    kill_and_wait_gone(pids[2], nodes[2].addr);
    let downed = Instant::now();
    let alone = members[0].connect().await.unwrap();
    // Those refused are told apart by their text (one published before its
    // groups knew may still commit: it was not refused).
    let mut refused = Vec::new();
    for k in 0.. {
        if refused.len() == 3 {
            break;
        }
        assert!(downed.elapsed() < BOUND, "never refused no_quorum");
        let text = format!("without a quorum {k}").into_bytes();
        match alone.publish(room, &text).await {
            Err(ApiError::Denied(Denial::NoQuorum)) => refused.push(text),
            Ok(_) | Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    println!(
        "two nodes down: refused no_quorum after {:?}",
        downed.elapsed()
    );
    alone.node().close().await;
    for node in &nodes[1..] {
        let child = restart_node(EXE, &node.args);
        guard.others.push(child);
    }
    wait_led(&nodes).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.unwrap();
    }

    // Every committed message, read by every member, once, where its receipt
    // said, with no gap; nothing sent without a quorum.
    let log = log.lock().unwrap().clone();
    let committed: BTreeMap<u64, u128> = log
        .iter()
        .filter_map(|(_, _, got)| match got {
            Got::Committed { id, seq } => Some((*seq, *id)),
            _ => None,
        })
        .collect();
    assert!(
        committed.len() > 100,
        "the publishers committed {}",
        committed.len()
    );
    for (i, member) in members.iter().enumerate() {
        let last = *committed.keys().next_back().unwrap();
        let read = read_all(member, room, last).await;
        for (seq, id) in &committed {
            let got = read.get(seq).map(|(id, _)| id);
            assert_eq!(got, Some(id), "member {i} at seq {seq}");
        }
        // What was published before the refusals may have committed; what
        // was refused never does.
        let refused_read = read
            .values()
            .filter(|(_, body)| refused.contains(body))
            .count();
        assert_eq!(
            refused_read, 0,
            "member {i} read a publish refused no_quorum"
        );
        let seqs: Vec<u64> = read.keys().copied().collect();
        let last = *seqs.last().unwrap();
        assert_eq!(seqs, (1..=last).collect::<Vec<_>>(), "member {i}: no gap");
        let texts = read.len();
        println!(
            "member {i} read {texts} messages, {} committed with a receipt",
            committed.len()
        );
    }
}

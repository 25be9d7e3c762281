//! The cluster's Raft groups on real node processes over QUIC (`cluster up`,
//! replicated by default): every group gets a leader and leaders spread; a node
//! killed with SIGKILL loses its groups to the other two, and gets them back as a
//! follower once restarted; with two of three nodes down the last one leads
//! nothing (check_quorum: it cannot reach a quorum); a node whose store was
//! deleted under the same identity rejoins before it votes again; a node given
//! another layout is refused by the others.
//!
//! Timings are printed, never asserted: the waits are generous bounds only.

use std::process::Child;
use std::time::{Duration, Instant};

use conclave::observe::http_get;
use conclave::ReplicationStatus;
use conclave_cli::cluster::{ClusterFile, ClusterNode};
use conclave_integration::processes::{cluster_up, health, kill_and_wait_gone, restart_node};

const EXE: &str = env!("CARGO_BIN_EXE_conclave-it");

/// The groups of the default layout: the meta group and 8 shards, each on all
/// three nodes.
const GROUPS: u32 = 9;

/// How long the cluster may take to settle after a change (elections take 1 to
/// 2 s at the default tick of 100 ms).
const SETTLE: Duration = Duration::from_secs(60);

async fn status(node: &ClusterNode) -> Option<ReplicationStatus> {
    health(node.metrics).await?.replication
}

/// Waits until `check` holds for the statuses of `nodes` (all of which must
/// answer); returns how long that took.
async fn wait_for(
    nodes: &[&ClusterNode],
    what: &str,
    check: impl Fn(&[ReplicationStatus]) -> bool,
) -> Duration {
    let started = Instant::now();
    loop {
        let mut statuses = Vec::new();
        for node in nodes {
            if let Some(s) = status(node).await {
                statuses.push(s);
            }
        }
        if statuses.len() == nodes.len() && check(&statuses) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < SETTLE,
            "not within {SETTLE:?}: {what}; last statuses {statuses:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every group has exactly one leader among `nodes`, and every node there
/// knows a leader for each of its groups.
fn all_led(statuses: &[ReplicationStatus]) -> bool {
    let led: u32 = statuses.iter().map(|s| s.leading).sum();
    led == GROUPS
        && statuses
            .iter()
            .all(|s| s.groups == GROUPS && s.without_leader == 0 && s.rejoining == 0)
}

/// A counter's value in `node`'s `/metrics` (summed over its labels matching
/// `labels`).
async fn counter(node: &ClusterNode, name: &str, labels: &str) -> f64 {
    let (_, text) = http_get(node.metrics, "/metrics").await.expect("metrics");
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn kill(node: &ClusterNode, pid: u32) {
    kill_and_wait_gone(pid, node.addr);
}

fn start(node: &ClusterNode, extra: &[&str], others: &mut Vec<Child>) -> u32 {
    let mut args = node.args.clone();
    args.extend(extra.iter().map(|s| s.to_string()));
    let child = restart_node(EXE, &args);
    let pid = child.id();
    others.push(child);
    pid
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_groups_survive_one_node_down_stop_without_quorum_and_rejoin() {
    let (dir, mut guard, table) = cluster_up(EXE, 3, 31);
    let file: ClusterFile =
        toml::from_str(&std::fs::read_to_string(dir.path().join("cluster/cluster.toml")).unwrap())
            .unwrap();
    let nodes: Vec<&ClusterNode> = file.node.iter().collect();
    assert!(
        table.iter().any(|l| l.contains("leads")),
        "the status table shows the Raft groups: {table:?}"
    );

    // Every group led, and leaders spread: the layout hands each group to its
    // first replica, one in three to each node.
    let took = wait_for(&nodes, "every group led, 3 per node", |s| {
        all_led(s) && s.iter().all(|s| s.leading == GROUPS / 3)
    })
    .await;
    println!("leaders spread over the three nodes after {took:?}");

    // One node down, three times over: the other two lead every group; back,
    // it follows (or leads again, once handed its groups).
    let mut pids: Vec<u32> = file.node.iter().map(|n| n.pid).collect();
    for round in 0..3 {
        let victim = round % 3;
        kill(nodes[victim], pids[victim]);
        let rest: Vec<&ClusterNode> = (0..3).filter(|&i| i != victim).map(|i| nodes[i]).collect();
        let took = wait_for(&rest, "the other two lead every group", all_led).await;
        println!("node{victim} killed: every group led by the other two after {took:?}");
        pids[victim] = start(nodes[victim], &[], &mut guard.others);
        let took = wait_for(&nodes, "every group led with all three back", all_led).await;
        println!("node{victim} restarted: all three settled after {took:?}");
    }

    // Two down: the last node cannot reach a quorum, so it leads nothing.
    kill(nodes[1], pids[1]);
    kill(nodes[2], pids[2]);
    let took = wait_for(&nodes[..1], "no leader without a quorum", |s| {
        s[0].leading == 0 && s[0].without_leader == GROUPS
    })
    .await;
    println!("two nodes down: node0 leads nothing after {took:?}");
    pids[1] = start(nodes[1], &[], &mut guard.others);
    pids[2] = start(nodes[2], &[], &mut guard.others);
    wait_for(&nodes, "every group led again", all_led).await;

    // node2's store deleted, its identity kept: it rejoins every group (votes
    // only once a leader caught it up), then the cluster is whole again.
    kill(nodes[2], pids[2]);
    std::fs::remove_dir_all(nodes[2].data.join("db")).unwrap();
    pids[2] = start(nodes[2], &[], &mut guard.others);
    let took = wait_for(&nodes, "node2 rejoined every group", all_led).await;
    let rejoined = counter(nodes[2], "conclave_raft_rejoins_total", "").await;
    assert_eq!(
        rejoined,
        f64::from(GROUPS),
        "node2 rejoined each of its groups"
    );
    println!("node2 with an empty store rejoined its {GROUPS} groups after {took:?}");

    // node2 restarted with another layout: the others drop what it sends, so it
    // never learns a leader, and they go on leading every group between them.
    kill(nodes[2], pids[2]);
    pids[2] = start(nodes[2], &["--replication-shards", "4"], &mut guard.others);
    let others = [nodes[0], nodes[1]];
    wait_for(&others, "the other two lead every group", all_led).await;
    let started = Instant::now();
    loop {
        let mut refused = 0.0;
        for node in others {
            let labels = "reason=\"layout\"";
            refused += counter(node, "conclave_raft_messages_refused_total", labels).await;
        }
        if refused > 0.0 {
            break;
        }
        assert!(
            started.elapsed() < SETTLE,
            "no message refused for its layout"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Past the longest election timeout (20 ticks of 100 ms): had the others
    // taken its votes, it would know a leader by now.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let node2 = status(nodes[2]).await.expect("node2 answers");
    assert_eq!(
        (node2.groups, node2.leading, node2.without_leader),
        (5, 0, 5),
        "node2, laid out otherwise, has no leader in any of its groups"
    );
}

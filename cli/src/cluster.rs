//! A local cluster of separate node processes on loopback: `conclave cluster up`,
//! the demo and the benchmark start one; `DIR/cluster.toml` describes it to
//! `conclave check` and to the tests.
//!
//! Each node is this same executable run as `conclave node …`, so the cluster is
//! what an operator would run by hand, one process per node.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use clap::Args;
use conclave::{admin, identity_file, observe, Node, NodeId};
use serde::{Deserialize, Serialize};

use crate::signal;

/// How long every node of a new cluster has to answer `/healthz`.
const READY_WAIT_MS: u64 = 30_000;
/// How often a starting node's `/healthz` is polled.
const READY_POLL_MS: u64 = 100;
/// How many lines of a failed node's log an error quotes.
const LOG_TAIL_LINES: usize = 10;
/// Node i's metrics port is its QUIC port plus this.
const METRICS_PORT_OFFSET: u16 = 100;
/// Most nodes `cluster up` starts (ports and file descriptors stay modest).
const NODES_MAX: u16 = 50;

/// What `conclave cluster up` (and the demo and bench) start.
#[derive(Args, Clone, Debug)]
pub struct ClusterArgs {
    /// How many nodes.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=i64::from(NODES_MAX)))]
    pub nodes: u16,
    /// Where the nodes keep their data, and cluster.toml.
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
    /// The first node's port.
    #[arg(long, value_name = "P", default_value_t = 7400)]
    pub base_port: u16,
    /// Start the nodes without the cluster's Raft groups (they run by default).
    #[arg(long)]
    pub no_replication: bool,
}

/// `DIR/cluster.toml`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClusterFile {
    /// The nodes.
    pub node: Vec<ClusterNode>,
}

/// One node of a local cluster.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClusterNode {
    /// `node<i>`.
    pub name: String,
    /// Its id.
    pub id: String,
    /// Its QUIC address.
    pub addr: SocketAddr,
    /// Its metrics address.
    pub metrics: SocketAddr,
    /// Its process id when started.
    pub pid: u32,
    /// Its data directory.
    pub data: PathBuf,
    /// The identity file of its seeded admin.
    pub admin: PathBuf,
    /// Its log file.
    pub log: PathBuf,
    /// The arguments it was started with (after the executable), to restart it.
    pub args: Vec<String>,
}

impl ClusterNode {
    /// Its id, parsed: what clients of the cluster pin when they connect to it.
    pub fn node_id(&self) -> anyhow::Result<NodeId> {
        self.id
            .parse()
            .with_context(|| format!("the id of {} in cluster.toml", self.name))
    }
}

impl ClusterFile {
    /// Reads `DIR/cluster.toml`.
    pub fn read(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join("cluster.toml");
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "reading {} (start the cluster with `conclave cluster up`)",
                path.display()
            )
        })?;
        toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }
}

/// A running local cluster; [`Cluster::stop`] stops its processes.
pub struct Cluster {
    /// What `DIR/cluster.toml` says about it.
    pub file: ClusterFile,
    /// One child per entry of `file.node`, in the same order.
    children: Vec<Child>,
}

impl Cluster {
    /// Stops every node with SIGTERM (so that each closes its store cleanly),
    /// waits for each up to the grace period, then kills what is left.
    pub fn stop(mut self) {
        debug_assert_eq!(self.children.len(), self.file.node.len());
        for child in &self.children {
            signal::terminate(child);
        }
        for (child, node) in self.children.iter_mut().zip(&self.file.node) {
            match signal::wait_or_kill(child) {
                Some(status) => eprintln!("{} stopped ({status})", node.name),
                None => eprintln!(
                    "{} did not stop in {} ms; killed it",
                    node.name,
                    signal::STOP_GRACE_MS
                ),
            }
        }
    }

    /// The node processes' ids, in node order.
    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().map(Child::id).collect()
    }
}

/// A node prepared on disk (identity, seeded admin), not started yet.
struct Prepared {
    data: PathBuf,
    id: NodeId,
    admin: PathBuf,
    addr: SocketAddr,
    metrics: SocketAddr,
}

/// Starts `args.nodes` node processes on loopback, each knowing the others, with
/// an admin seeded per node, writes `DIR/cluster.toml` and waits until every node
/// is ready. Nothing keeps running if it fails.
pub async fn cluster_up(args: &ClusterArgs) -> anyhow::Result<Cluster> {
    assert!(args.nodes >= 1, "clap bounds --nodes to 1..={NODES_MAX}");
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("creating {}", args.dir.display()))?;
    let dir = args.dir.canonicalize()?;
    let nodes = (0..usize::from(args.nodes))
        .map(|i| prepare(&dir, i, args))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let exe = std::env::current_exe().context("locating this executable")?;
    let mut cluster = Cluster {
        file: ClusterFile { node: Vec::new() },
        children: Vec::new(),
    };
    for i in 0..nodes.len() {
        match spawn(&exe, &nodes, i, args.no_replication) {
            Ok((node, child)) => {
                cluster.file.node.push(node);
                cluster.children.push(child);
            }
            Err(error) => {
                cluster.stop();
                return Err(error);
            }
        }
    }
    let ready = match write_file(&dir, &cluster.file) {
        Ok(()) => wait_ready(&mut cluster).await,
        Err(error) => Err(error),
    };
    if let Err(error) = ready {
        cluster.stop();
        return Err(error);
    }
    Ok(cluster)
}

fn write_file(dir: &Path, file: &ClusterFile) -> anyhow::Result<()> {
    let path = dir.join("cluster.toml");
    let text = toml::to_string_pretty(file).context("encoding cluster.toml")?;
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
}

/// Node `i`'s identity, its seeded admin and its addresses.
fn prepare(dir: &Path, i: usize, args: &ClusterArgs) -> anyhow::Result<Prepared> {
    let port = |offset: u16| -> anyhow::Result<u16> {
        u16::try_from(i)
            .ok()
            .and_then(|i| args.base_port.checked_add(offset)?.checked_add(i))
            .ok_or_else(|| {
                anyhow!(
                    "--base-port {} leaves no room for {} nodes",
                    args.base_port,
                    args.nodes
                )
            })
    };
    let data = dir.join(format!("node{i}"));
    let id = Node::init(&data)?;
    let admin = data.join("admin.id");
    let (identity, _) = identity_file::load_or_create(&admin)?;
    // Seeding again on a restarted cluster finds the admin registered already.
    admin::seed_admin_offline(&data, &identity.public())
        .with_context(|| format!("seeding the admin of node{i}"))?;
    Ok(Prepared {
        data,
        id,
        admin,
        addr: SocketAddr::from(([127, 0, 0, 1], port(0)?)),
        metrics: SocketAddr::from(([127, 0, 0, 1], port(METRICS_PORT_OFFSET)?)),
    })
}

/// Starts node `i` of `nodes` as `exe node …`, its output going to its log.
fn spawn(
    exe: &Path,
    nodes: &[Prepared],
    i: usize,
    no_replication: bool,
) -> anyhow::Result<(ClusterNode, Child)> {
    let node = &nodes[i];
    let mut node_args = vec![
        "node".to_string(),
        "--data".into(),
        node.data.display().to_string(),
        "--listen".into(),
        node.addr.to_string(),
        "--metrics".into(),
        node.metrics.to_string(),
    ];
    if no_replication {
        node_args.push("--no-replication".into());
    }
    for (j, peer) in nodes.iter().enumerate().filter(|(j, _)| *j != i) {
        debug_assert_ne!(j, i);
        node_args.push("--peer".into());
        node_args.push(format!("{}@{}", peer.id, peer.addr));
    }
    let log = node.data.join("node.log");
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .with_context(|| format!("opening {}", log.display()))?;
    let child = std::process::Command::new(exe)
        .args(&node_args)
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .with_context(|| format!("starting node{i}"))?;
    let entry = ClusterNode {
        name: format!("node{i}"),
        id: node.id.to_string(),
        addr: node.addr,
        metrics: node.metrics,
        pid: child.id(),
        data: node.data.clone(),
        admin: node.admin.clone(),
        log,
        args: node_args,
    };
    Ok((entry, child))
}

/// Ready when every node answers `/healthz` with 200 and each of its Raft groups
/// knows a leader; a node that exits first is reported with the end of its log.
async fn wait_ready(cluster: &mut Cluster) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_millis(READY_WAIT_MS);
    for (node, child) in cluster.file.node.iter().zip(cluster.children.iter_mut()) {
        loop {
            if let Ok((200, body)) = observe::http_get(node.metrics, "/healthz").await {
                if serde_json::from_str::<observe::Health>(&body).is_ok_and(|h| led(&h)) {
                    break;
                }
            }
            if let Ok(Some(status)) = child.try_wait() {
                let log = std::fs::read_to_string(&node.log).unwrap_or_default();
                let lines: Vec<_> = log.lines().collect();
                let tail = lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n");
                bail!(
                    "{} exited at start ({status}); its log ends:\n{tail}",
                    node.name
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not become ready (healthy, every Raft group led) within {READY_WAIT_MS} ms (see {})",
                    node.name,
                    node.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(READY_POLL_MS)).await;
        }
    }
    Ok(())
}

/// Whether every Raft group of the node knows a leader (or replication is off).
fn led(health: &observe::Health) -> bool {
    health
        .replication
        .as_ref()
        .is_none_or(|r| r.without_leader == 0 && r.unopened == 0)
}

/// Prints one line per node: id, addresses, pid, connected/known peers and
/// its Raft groups (led/replicated, and how many have no leader it knows of).
pub async fn print_status(cluster: &Cluster) {
    println!(
        "{:<7} {:<18} {:<16} {:<16} {:>8} {:>6}  raft groups",
        "node", "id", "addr", "metrics", "pid", "peers"
    );
    for node in &cluster.file.node {
        let (peers, raft) = match observe::http_get(node.metrics, "/healthz").await {
            Ok((_, body)) => match serde_json::from_str::<observe::Health>(&body) {
                Ok(h) => (
                    format!("{}/{}", h.peers_connected, h.peers_known),
                    raft_summary(h.replication.as_ref()),
                ),
                Err(_) => ("?".into(), "?".into()),
            },
            Err(_) => ("down".into(), String::new()),
        };
        let id_prefix = node.id.get(..16).unwrap_or(&node.id);
        println!(
            "{:<7} {:<18} {:<16} {:<16} {:>8} {:>6}  {raft}",
            node.name,
            format!("{id_prefix}…"),
            node.addr,
            node.metrics,
            node.pid,
            peers
        );
    }
}

/// `leads 3 of 9` (and what is not well), or `off`.
fn raft_summary(status: Option<&conclave::ReplicationStatus>) -> String {
    let Some(s) = status else {
        return "off".into();
    };
    let mut text = format!("leads {} of {}", s.leading, s.groups);
    for (count, what) in [
        (s.without_leader, "without leader"),
        (s.rejoining, "rejoining"),
        (s.unopened, "unopened"),
    ] {
        if count > 0 {
            text.push_str(&format!(", {count} {what}"));
        }
    }
    text
}

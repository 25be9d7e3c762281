//! The `conclave` command line: its arguments, and the node, user, room, send and
//! tail commands. The cluster, check, demo and bench commands live in their own
//! modules; this one only dispatches to them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context as _};
use clap::{Args, Parser, Subcommand, ValueEnum};
use conclave::admin::{self, Seeded};
use conclave::{
    identity_file, observe, Asked, History, Identity, Node, NodeId, Outcome, Policy, Position,
    PublicIdentity, Receipt, RemoteNode, RoomRole, User, UserId, UserRole,
};
use conclave_actors::domain::DomainConfig;
use conclave_actors::ids::{MessageId, RoomId, Seq};
use conclave_actors::replication::layout::{FACTOR_MAX, SHARDS_MAX};
use conclave_actors::replication::Replication;
use serde::{Deserialize, Serialize};

use crate::bench::BenchArgs;
use crate::check::CheckArgs;
use crate::cluster::{cluster_up, print_status, ClusterArgs};
use crate::demo::DemoArgs;
use crate::pin::{self, Decision, Pins};
use crate::signal::wait_for_signal;

const EXAMPLES: &str = "\
Examples:
  # The demo: a local three-node cluster and an encrypted conversation across it
  conclave demo

  # One node
  conclave init --data ./data/a
  conclave node --data ./data/a --listen 127.0.0.1:7401 --metrics 127.0.0.1:9401 \\
      --peer <NODE_B_ID>@127.0.0.1:7402

  # A local cluster of three processes, and an end-to-end check against it
  conclave cluster up --nodes 3 --dir ./data/cluster
  conclave check --cluster ./data/cluster --messages 100

  # Users and rooms (client commands authenticate with a user identity file, and pin
  # the node: its id met first is remembered in FILE.nodes, or give --node-id ID)
  conclave user add --admin --data ./data/a --identity ./admin.id   # bootstrap (node stopped)
  conclave user new --out ./alice.id                                # prints alice's public key
  conclave user add --node 127.0.0.1:7401 --as ./admin.id --public <ALICE_PUBLIC>
  conclave room create --node 127.0.0.1:7401 --as ./alice.id
  conclave send --node 127.0.0.1:7401 --as ./alice.id --room <ROOM> hello
  conclave tail --node 127.0.0.1:7401 --as ./alice.id --room <ROOM>";

/// conclave: end-to-end-encrypted group messaging between nodes.
#[derive(Parser)]
#[command(name = "conclave", version, about, long_about = None, after_help = EXAMPLES)]
pub(crate) struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create this node's identity (or load the existing one) and print the node id.
    ///
    /// The identity is written to DIR/node.id with mode 0600. A damaged identity file
    /// is reported and never replaced.
    ///
    /// Example: conclave init --data ./data/a
    Init {
        /// The node's data directory.
        #[arg(long, value_name = "DIR")]
        data: PathBuf,
    },
    /// Run one node until SIGINT or SIGTERM.
    ///
    /// Listens for peers and clients on --listen (QUIC), serves /metrics and /healthz
    /// on --metrics, and stops cleanly on a signal: every committed change is on disk
    /// and undelivered messages stay in the outboxes for the next start. If its
    /// actors stop by themselves (a panic), it exits with status 1 so that a
    /// supervisor restarts it (crash-only).
    ///
    /// Example: conclave node --data ./data/a --listen 127.0.0.1:7401 --peer ID@127.0.0.1:7402
    Node(NodeArgs),
    /// Users of a node: create identities, add, list, revoke.
    #[command(subcommand)]
    User(UserCmd),
    /// Rooms: create, list, invite, members (verified), remove (with rekey).
    #[command(subcommand)]
    Room(RoomCmd),
    /// Encrypt, sign and publish messages to a room (arguments, or stdin lines).
    ///
    /// Example: conclave send --node 127.0.0.1:7401 --as ./alice.id --room ROOM hello
    Send(SendArgs),
    /// Print a room's messages, decrypted: history, then live until interrupted.
    /// One line per message, control characters escaped; a message that does not
    /// verify or decrypt is reported on stderr and skipped. When the node restarts,
    /// the tail reconnects and resumes after the last message printed (it gives
    /// up after 30 s without the node).
    ///
    /// Example: conclave tail --node 127.0.0.1:7401 --as ./alice.id --room ROOM
    Tail(TailArgs),
    /// A local cluster of separate node processes.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// End-to-end verification against a cluster started by `cluster up`.
    ///
    /// Creates a user on every node, a room spanning them, publishes --messages
    /// messages and confirms every member decrypts every one exactly once, reads
    /// the room's sequence with no gap and finds each message where its receipt
    /// said. With
    /// --mode loop it publishes every --interval for --duration and prints
    /// sent/received per member each second, reconnecting to nodes that restart.
    ///
    /// Example: conclave check --cluster ./data/cluster --messages 100
    Check(CheckArgs),
    /// Start a local three-node cluster and show an encrypted conversation across it.
    ///
    /// The cluster keeps running (until Ctrl-C) so that you can send your own
    /// messages; the commands to do so are printed.
    ///
    /// Example: conclave demo
    Demo(DemoArgs),
    /// Benchmark: conclave side by side with NATS JetStream, the crypto floor and
    /// the fsync floor.
    ///
    /// Starts local three-node clusters (separate processes, QUIC, LMDB with fsync),
    /// drives workloads a (1 room, 3 members), b (1 room, 30 members), c (many
    /// rooms), then the same load on JetStream R1 and R3 (fsync before ack and its
    /// default, with and without the same end-to-end crypto), and prints a table
    /// (also DIR/bench.md, DIR/bench.json, DIR/latency-*.svg) and, last, a
    /// `summary:` line. nats-server 2.10+ is needed for the JetStream rows: run
    /// scripts/install-bench-deps.sh (or pass --jetstream none).
    ///
    /// Example: conclave bench --quick
    Bench(BenchArgs),
}

#[derive(Args)]
struct NodeArgs {
    /// The node's data directory (identity and store).
    #[arg(long, value_name = "DIR", required_unless_present = "config")]
    data: Option<PathBuf>,
    /// The UDP address for peers and clients.
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// The TCP address of /metrics and /healthz (loopback by default).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
    /// A peer node: its id and address (repeat for each peer).
    #[arg(long = "peer", value_name = "ID@ADDR")]
    peers: Vec<String>,
    /// The largest the store may grow to, in GiB (default 64; the file is sparse).
    /// Its last eighth (at most 1 GiB) is kept for acknowledgements and deletes:
    /// once data reaches into it, new frames, rooms and invites are refused
    /// (store_full) and /healthz reports the node not ready.
    #[arg(long, value_name = "GIB", value_parser = clap::value_parser!(u64).range(1..=STORE_MAX_GIB_CEILING))]
    store_max_gib: Option<u64>,
    /// How many frames one user may publish per second through this node
    /// (default 2,000), in bursts of two seconds' worth; past it: limit.
    #[arg(long, value_name = "FRAMES", value_parser = clap::value_parser!(u64).range(1..=PUBLISH_PER_S_CEILING))]
    publish_per_s: Option<u64>,
    /// How many MiB of ciphertext one user may publish per second through this
    /// node (default 64), in bursts of two seconds' worth; past it: limit.
    #[arg(long, value_name = "MIB", value_parser = clap::value_parser!(u64).range(1..=PUBLISH_MIB_PER_S_CEILING))]
    publish_mib_per_s: Option<u64>,
    /// Run without the cluster's Raft groups (they run by default). Every node
    /// of a cluster must agree on this, on the three settings below and on the
    /// peers: a node laid out otherwise has its Raft messages dropped (counted
    /// as reason `layout`).
    #[arg(long)]
    no_replication: bool,
    /// How many shard groups the cluster has, besides the meta group (default 8).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=i64::from(SHARDS_MAX)))]
    replication_shards: Option<u16>,
    /// How many nodes replicate each group (default 3; fewer in a smaller
    /// cluster; 5 tolerates two nodes down).
    #[arg(long, value_name = "F", value_parser = clap::value_parser!(u8).range(1..=i64::from(FACTOR_MAX)))]
    replication_factor: Option<u8>,
    /// One Raft tick, in milliseconds (default 100): leaders send heartbeats
    /// every 2 ticks, and an election starts after 10 to 20 ticks without one.
    #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u64).range(RAFT_TICK_MS_RANGE))]
    raft_tick_ms: Option<u64>,
    /// A TOML file with data, listen, metrics, store_max_gib, publish_per_s,
    /// publish_mib_per_s, replication (true/false), replication_shards,
    /// replication_factor, raft_tick_ms and [[peer]] id/addr entries (flags
    /// given too override it).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

/// The Raft tick `--raft-tick-ms` may set, in milliseconds: from 10 (elections
/// in 100 ms) to 10 s.
const RAFT_TICK_MS_RANGE: std::ops::RangeInclusive<u64> = 10..=10_000;

/// The largest `--store-max-gib` (1 TiB).
const STORE_MAX_GIB_CEILING: u64 = 1024;

/// The largest `--publish-per-s` (a million frames a second: far past what a
/// node commits, so only a mistake is refused).
const PUBLISH_PER_S_CEILING: u64 = 1_000_000;

/// The largest `--publish-mib-per-s` (1 TiB a second, likewise).
const PUBLISH_MIB_PER_S_CEILING: u64 = 1 << 20;

/// The node's domain settings: the defaults, with the publish quota the flags or
/// the config file set (flags first).
fn domain_config(args: &NodeArgs, config: &NodeConfig) -> anyhow::Result<DomainConfig> {
    let mut domain = DomainConfig::default();
    if let Some(frames) = args.publish_per_s.or(config.publish_per_s) {
        if !(1..=PUBLISH_PER_S_CEILING).contains(&frames) {
            bail!("publish_per_s must be between 1 and {PUBLISH_PER_S_CEILING}, not {frames}");
        }
        domain.publish_quota.frames_per_s = frames;
    }
    if let Some(mib) = args.publish_mib_per_s.or(config.publish_mib_per_s) {
        if !(1..=PUBLISH_MIB_PER_S_CEILING).contains(&mib) {
            bail!("publish_mib_per_s must be between 1 and {PUBLISH_MIB_PER_S_CEILING}, not {mib}");
        }
        domain.publish_quota.bytes_per_s = mib << 20;
    }
    domain.replication = replication(args, config)?;
    Ok(domain)
}

/// The Raft layout the flags or the config file set (flags first); `None` when
/// replication is switched off.
fn replication(args: &NodeArgs, config: &NodeConfig) -> anyhow::Result<Option<Replication>> {
    if args.no_replication || config.replication == Some(false) {
        return Ok(None);
    }
    let mut layout = Replication::default();
    if let Some(shards) = args.replication_shards.or(config.replication_shards) {
        if !(1..=SHARDS_MAX).contains(&shards) {
            bail!("replication_shards must be between 1 and {SHARDS_MAX}, not {shards}");
        }
        layout.shards = shards;
    }
    if let Some(factor) = args.replication_factor.or(config.replication_factor) {
        if !(1..=FACTOR_MAX).contains(&factor) {
            bail!("replication_factor must be between 1 and {FACTOR_MAX}, not {factor}");
        }
        layout.factor = factor;
    }
    if let Some(ms) = args.raft_tick_ms.or(config.raft_tick_ms) {
        if !RAFT_TICK_MS_RANGE.contains(&ms) {
            bail!(
                "raft_tick_ms must be between {} and {}, not {ms}",
                RAFT_TICK_MS_RANGE.start(),
                RAFT_TICK_MS_RANGE.end()
            );
        }
        layout.tick = std::time::Duration::from_millis(ms);
    }
    Ok(Some(layout))
}

/// What `--config` holds.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct NodeConfig {
    data: Option<PathBuf>,
    listen: Option<SocketAddr>,
    metrics: Option<SocketAddr>,
    store_max_gib: Option<u64>,
    publish_per_s: Option<u64>,
    publish_mib_per_s: Option<u64>,
    replication: Option<bool>,
    replication_shards: Option<u16>,
    replication_factor: Option<u8>,
    raft_tick_ms: Option<u64>,
    #[serde(default)]
    peer: Vec<PeerConfig>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct PeerConfig {
    id: String,
    addr: SocketAddr,
}

/// `--node-id` of the client commands, in short: how they pin the node.
const NODE_ID_HELP: &str = "The node's id, which the node must prove (default: the id remembered \
in FILE.nodes beside --as FILE, learned on first contact)";
/// `--node-id` of the client commands, in full (see `crate::pin`).
const NODE_ID_LONG_HELP: &str =
    "The node's id (as `conclave init` or `conclave node` prints it); the \
node must prove it. Without it, the id the node proves on first contact is remembered in \
FILE.nodes beside the --as FILE, and a node at that address presenting another id is refused. \
Given, it replaces what is remembered";

/// How a client command reaches its node and whom it acts as.
#[derive(Args, Clone)]
struct ClientArgs {
    /// The node's address (its --listen).
    #[arg(long = "node", value_name = "ADDR")]
    node: SocketAddr,
    #[arg(long = "node-id", value_name = "ID", help = NODE_ID_HELP, long_help = NODE_ID_LONG_HELP)]
    node_id: Option<NodeId>,
    /// The user's identity file.
    #[arg(long = "as", value_name = "FILE")]
    identity: PathBuf,
}

#[derive(Subcommand)]
enum UserCmd {
    /// Create a user identity file (mode 0600) and print the user's public key.
    New {
        /// Where to write it.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Add a user: through an admin (--node/--as), or, for the first admin of a
    /// node, with --admin against the data directory of the stopped node (the
    /// bootstrap).
    Add(UserAddArgs),
    /// List the node's users (admins only).
    List(ClientArgs),
    /// Revoke a user (admins only). Revocation is a status flip, never a delete:
    /// the user's open connections are closed, and they are evicted from their
    /// rooms (each room rekeys before its next message).
    Revoke {
        #[command(flatten)]
        client: ClientArgs,
        /// The user's id.
        #[arg(long, value_name = "ID")]
        user: UserId,
    },
}

#[derive(Args)]
struct UserAddArgs {
    /// Bootstrap: register the identity in --identity as an admin, offline, in the
    /// store of the node at --data. The node must not be running (it is detected
    /// and refused); once it runs, add users through an admin with --node/--as.
    #[arg(long, requires_all = ["data", "identity_file"])]
    admin: bool,
    /// The node's data directory (with --admin).
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
    /// The new admin's identity file, created if missing (with --admin).
    #[arg(long = "identity", value_name = "FILE")]
    identity_file: Option<PathBuf>,
    /// The node's address (without --admin).
    #[arg(long = "node", value_name = "ADDR", conflicts_with = "admin")]
    node: Option<SocketAddr>,
    #[arg(long = "node-id", value_name = "ID", conflicts_with = "admin", help = NODE_ID_HELP, long_help = NODE_ID_LONG_HELP)]
    node_id: Option<NodeId>,
    /// The acting admin's identity file (without --admin).
    #[arg(long = "as", value_name = "FILE")]
    acting: Option<PathBuf>,
    /// The new user's public key, as `conclave user new` prints it (without --admin).
    #[arg(long, value_name = "HEX")]
    public: Option<String>,
    /// The new user's role (without --admin).
    #[arg(long, value_enum, default_value = "member")]
    role: RoleArg,
}

#[derive(Clone, Copy, ValueEnum)]
enum RoleArg {
    Member,
    Admin,
}

#[derive(Clone, Copy, ValueEnum)]
enum HistoryArg {
    /// Members read from when they joined.
    FromJoin,
    /// Members read the whole epoch they joined in.
    FromEpoch,
}

#[derive(Subcommand)]
enum RoomCmd {
    /// Create a room homed on the user's node; prints its id.
    Create {
        #[command(flatten)]
        client: ClientArgs,
        /// What new members may read.
        #[arg(long, value_enum, default_value = "from-join")]
        history: HistoryArg,
        /// Keep only the last 256 frames instead of the full history.
        #[arg(long)]
        ephemeral: bool,
    },
    /// List the user's rooms and their home nodes.
    List(ClientArgs),
    /// Invite a user (homed on --home) to a room.
    Invite {
        #[command(flatten)]
        client: ClientArgs,
        /// The room.
        #[arg(long, value_name = "ROOM")]
        room: RoomId,
        /// The invitee's public key (from `conclave user new`).
        #[arg(long, value_name = "HEX")]
        public: String,
        /// The invitee's home node id.
        #[arg(long, value_name = "ID")]
        home: NodeId,
        /// Their role in the room.
        #[arg(long, value_enum, default_value = "member")]
        role: RoleArg,
    },
    /// List a room's members as its membership chain says: every change signed by
    /// the member who made it, verified here from the room's creation (not the
    /// node's say-so).
    Members {
        #[command(flatten)]
        client: ClientArgs,
        /// The room.
        #[arg(long, value_name = "ROOM")]
        room: RoomId,
    },
    /// Remove a member; the room moves to a new epoch sealed to the others.
    Remove {
        #[command(flatten)]
        client: ClientArgs,
        /// The room.
        #[arg(long, value_name = "ROOM")]
        room: RoomId,
        /// The member's user id.
        #[arg(long, value_name = "ID")]
        user: UserId,
    },
    /// What became of a message or a request that was queued for the room's
    /// home (`send` and the room commands print what they queued): committed at
    /// its sequence number, done, refused with the home's reason, or not decided
    /// yet.
    ///
    /// Example: conclave room outcome --node 127.0.0.1:7402 --as ./bob.id --room ROOM --message ID
    Outcome {
        #[command(flatten)]
        client: ClientArgs,
        /// The room.
        #[arg(long, value_name = "ROOM")]
        room: RoomId,
        /// The queued message's id.
        #[arg(
            long,
            value_name = "ID",
            conflicts_with = "request",
            required_unless_present = "request"
        )]
        message: Option<MessageId>,
        /// The queued request's number.
        #[arg(long, value_name = "N")]
        request: Option<u64>,
    },
}

#[derive(Args)]
struct SendArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// The room.
    #[arg(long, value_name = "ROOM")]
    room: RoomId,
    /// The messages (one per argument); none: one per line of stdin.
    messages: Vec<String>,
}

#[derive(Args)]
struct TailArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// The room.
    #[arg(long, value_name = "ROOM")]
    room: RoomId,
    /// Where to start: `start`, `live`, or a sequence number.
    #[arg(long, default_value = "start")]
    from: String,
    /// Exit after this many messages.
    #[arg(long, value_name = "N")]
    count: Option<usize>,
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Start N nodes as separate processes on loopback, each knowing the others,
    /// seed an admin per node, write DIR/cluster.toml and run until interrupted.
    ///
    /// Node i listens on 127.0.0.1:(P+i) and serves metrics on 127.0.0.1:(P+100+i).
    /// Logs go to DIR/node<i>/node.log. On SIGINT/SIGTERM the nodes are stopped
    /// cleanly.
    ///
    /// Example: conclave cluster up --nodes 3 --dir ./data/cluster
    Up(ClusterArgs),
}

/// Runs one parsed command.
pub(crate) async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Init { data } => {
            let id = Node::init(&data)?;
            println!("{id}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Node(args) => run_node(args).await.map(|()| ExitCode::SUCCESS),
        Command::User(cmd) => user_cmd(cmd).await.map(|()| ExitCode::SUCCESS),
        Command::Room(cmd) => room_cmd(cmd).await.map(|()| ExitCode::SUCCESS),
        Command::Send(args) => send(args).await.map(|()| ExitCode::SUCCESS),
        Command::Tail(args) => tail(args).await.map(|()| ExitCode::SUCCESS),
        Command::Cluster(ClusterCmd::Up(args)) => {
            let cluster = cluster_up(&args).await?;
            print_status(&cluster).await;
            println!("\ncluster running; Ctrl-C stops it");
            wait_for_signal().await;
            cluster.stop();
            Ok(ExitCode::SUCCESS)
        }
        Command::Check(args) => crate::check::check(args).await,
        Command::Demo(args) => crate::demo::demo(args).await.map(|()| ExitCode::SUCCESS),
        Command::Bench(args) => crate::bench::run(args).await.map(|()| ExitCode::SUCCESS),
    }
}

fn parse_peer(text: &str) -> anyhow::Result<(NodeId, SocketAddr)> {
    let (id, addr) = text
        .split_once('@')
        .ok_or_else(|| anyhow!("peer {text:?} is not ID@ADDR"))?;
    Ok((
        id.parse().with_context(|| format!("peer id {id:?}"))?,
        addr.parse()
            .with_context(|| format!("peer address {addr:?}"))?,
    ))
}

async fn run_node(args: NodeArgs) -> anyhow::Result<()> {
    let config: NodeConfig = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?
        }
        None => NodeConfig::default(),
    };
    let domain = domain_config(&args, &config)?;
    let data = args
        .data
        .or(config.data)
        .ok_or_else(|| anyhow!("no data directory: give --data or data in --config"))?;
    let listen = args
        .listen
        .or(config.listen)
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 7401)));
    let metrics_addr = args
        .metrics
        .or(config.metrics)
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 9401)));
    let mut peers = BTreeMap::new();
    for peer in &config.peer {
        peers.insert(
            peer.id.parse::<NodeId>().context("peer id in the config")?,
            peer.addr,
        );
    }
    for text in &args.peers {
        let (id, addr) = parse_peer(text)?;
        peers.insert(id, addr);
    }
    let handle = observe::install_prometheus().context("installing the metrics exporter")?;
    let mut builder = Node::builder().data_dir(&data).listen(listen);
    if let Some(gib) = args.store_max_gib.or(config.store_max_gib) {
        if !(1..=STORE_MAX_GIB_CEILING).contains(&gib) {
            bail!("store_max_gib must be between 1 and {STORE_MAX_GIB_CEILING}, not {gib}");
        }
        let bytes =
            usize::try_from(gib << 30).context("store_max_gib does not fit this machine")?;
        builder = builder.store_bytes_max(bytes);
    }
    builder = builder.domain_config(domain);
    for (id, addr) in &peers {
        builder = builder.peer(*id, *addr);
    }
    let node = builder.start().await?;
    let metrics_bound = observe::serve_http(metrics_addr, handle, node.clone())
        .await
        .with_context(|| format!("serving metrics on {metrics_addr}"))?;
    println!(
        "node {} listening on {} (QUIC), metrics on http://{metrics_bound}/metrics, health on http://{metrics_bound}/healthz",
        node.id(),
        node.local_addr().map_or_else(|| listen.to_string(), |a| a.to_string()),
    );
    // Crash-only: a node whose actors stopped by themselves (a panic) exits with
    // an error so that its supervisor restarts it; recovery is a restart.
    tokio::select! {
        () = wait_for_signal() => tracing::info!("signal received; stopping"),
        failure = node.stopped_by_failure() => {
            tracing::error!(%failure, "the node failed; exiting so that it is restarted");
            node.shutdown().await;
            bail!("the node failed: {failure}");
        }
    }
    node.shutdown().await;
    Ok(())
}

fn user_role(role: RoleArg) -> UserRole {
    match role {
        RoleArg::Member => UserRole::Member,
        RoleArg::Admin => UserRole::Admin,
    }
}

fn room_role(role: RoleArg) -> RoomRole {
    match role {
        RoleArg::Member => RoomRole::Member,
        RoleArg::Admin => RoomRole::Admin,
    }
}

/// A public identity as one hex string: the Ed25519 key, then the X25519 key.
pub(crate) fn public_hex(public: &PublicIdentity) -> String {
    let mut out = UserId(public.signing).to_string();
    out.push_str(&UserId(public.exchange).to_string());
    for b in public.binding.0 {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// How many hex digits [`public_hex`] prints: the Ed25519 key, the X25519 key and
/// the identity's signature binding the two.
const PUBLIC_HEX_DIGITS: usize = 2 * (32 + 32 + 64);

/// Parses [`public_hex`]'s output, and checks that the identity signed its X25519
/// key (and that the key is usable).
pub(crate) fn parse_public(text: &str) -> anyhow::Result<PublicIdentity> {
    let text = text.trim();
    if text.len() != PUBLIC_HEX_DIGITS || !text.is_ascii() {
        bail!(
            "a public key is {PUBLIC_HEX_DIGITS} hex digits (as `conclave user new` prints), got {}",
            text.len()
        );
    }
    let signing: UserId = text[..64].parse().context("public key")?;
    let exchange: UserId = text[64..128].parse().context("public key")?;
    let mut binding = [0u8; 64];
    for (i, slot) in binding.iter_mut().enumerate() {
        let pair = &text[128 + 2 * i..130 + 2 * i];
        *slot = u8::from_str_radix(pair, 16).context("public key: not hex")?;
    }
    let public = PublicIdentity {
        signing: signing.0,
        exchange: exchange.0,
        binding: conclave_actors::crypto::SignatureBytes(binding),
    };
    public
        .check()
        .map_err(|e| anyhow!("the public key cannot be used: {e}"))?;
    Ok(public)
}

/// Connects as `--as` to the node at `--node` and pins it (see [`crate::pin`]):
/// `--node-id` if given, else the id remembered beside the identity file, else
/// the id met now, remembered for next time. A node that is not the pinned one is
/// refused before any command is sent to it.
async fn connect(args: &ClientArgs) -> anyhow::Result<User<RemoteNode>> {
    let identity = identity_file::load(&args.identity)
        .with_context(|| format!("loading the user identity {}", args.identity.display()))?;
    // Read before connecting: a pins file that cannot be read stops the command
    // before anything reaches the network, and is never replaced.
    let mut pins = Pins::load(&pin::pins_path(&args.identity))?;
    let user = RemoteNode::connect(&identity, args.node, args.node_id)
        .await
        .with_context(|| format!("connecting to {} as {}", args.node, identity.user_id()))?;
    let presented = user.node().node_id();
    debug_assert!(args.node_id.is_none_or(|id| id == presented));
    match pins.decide(args.node, presented, args.node_id.is_some())? {
        Decision::Known => {}
        Decision::Record => {
            pins.record(args.node, presented)?;
            eprintln!(
                "trusting node {presented} at {} from now on (first contact; remembered in {})",
                args.node,
                pins.path().display()
            );
        }
        Decision::Replace { previous } => {
            pins.record(args.node, presented)?;
            eprintln!(
                "node at {} is now pinned to {presented} (given by --node-id), replacing {previous} in {}",
                args.node,
                pins.path().display()
            );
        }
    }
    Ok(user)
}

/// Runs `act` as the user of `client`, then closes the connection (bounded), so
/// that the node stops counting it against the user's limit as the command exits.
async fn as_user<T, E>(
    client: &ClientArgs,
    act: impl AsyncFnOnce(&User<RemoteNode>) -> Result<T, E>,
) -> anyhow::Result<T>
where
    anyhow::Error: From<E>,
{
    let user = connect(client).await?;
    let result = act(&user).await;
    user.node().close().await;
    Ok(result?)
}

/// `conclave user add --admin`: the node's first admin, written offline into its
/// store (the node must be stopped; a running node is reported, not written to).
fn bootstrap(args: UserAddArgs) -> anyhow::Result<()> {
    let (data, file) = (
        args.data.context("--admin needs --data")?,
        args.identity_file.context("--admin needs --identity")?,
    );
    let (identity, created) = identity_file::load_or_create(&file)
        .with_context(|| format!("loading {}", file.display()))?;
    if created {
        eprintln!("created the admin identity {}", file.display());
    }
    match admin::seed_admin_offline(&data, &identity.public())? {
        Seeded::Added => eprintln!(
            "{} is now an admin of the node in {}",
            identity.user_id(),
            data.display()
        ),
        Seeded::AlreadyRegistered => eprintln!(
            "{} is registered already; nothing changed",
            identity.user_id()
        ),
    }
    println!("{}", identity.user_id());
    Ok(())
}

async fn user_cmd(cmd: UserCmd) -> anyhow::Result<()> {
    match cmd {
        UserCmd::New { out } => {
            let identity = Identity::generate(&mut rand_core::UnwrapErr(getrandom::SysRng));
            identity_file::write_new(&out, &identity)
                .with_context(|| format!("writing {}", out.display()))?;
            eprintln!("user identity written to {}", out.display());
            println!("user {}", identity.user_id());
            println!("public {}", public_hex(&identity.public()));
        }
        UserCmd::Add(args) if args.admin => bootstrap(args)?,
        UserCmd::Add(args) => {
            let client = ClientArgs {
                node: args
                    .node
                    .ok_or_else(|| anyhow!("--node is required (or --admin for the bootstrap)"))?,
                node_id: args.node_id,
                identity: args.acting.ok_or_else(|| anyhow!("--as is required"))?,
            };
            let public =
                parse_public(&args.public.ok_or_else(|| anyhow!("--public is required"))?)?;
            as_user(&client, async |u| {
                u.add_user(&public, user_role(args.role)).await
            })
            .await?;
            println!("added {}", UserId(public.signing));
        }
        UserCmd::List(client) => {
            for entry in as_user(&client, async |u| u.list_users().await).await? {
                println!(
                    "{} {:?} {:?} public {}",
                    UserId(entry.user.signing),
                    entry.role,
                    entry.status,
                    public_hex(&entry.user)
                );
            }
        }
        UserCmd::Revoke { client, user } => {
            as_user(&client, async |u| u.revoke_user(user).await).await?;
            println!("revoked {user}");
        }
    }
    Ok(())
}

async fn room_cmd(cmd: RoomCmd) -> anyhow::Result<()> {
    match cmd {
        RoomCmd::Create {
            client,
            history,
            ephemeral,
        } => {
            let policy = Policy {
                persist: !ephemeral,
                history: match history {
                    HistoryArg::FromJoin => History::FromJoin,
                    HistoryArg::FromEpoch => History::FromEpoch,
                },
            };
            let room = as_user(&client, async |u| u.create_room(policy).await).await?;
            println!("{room}");
        }
        RoomCmd::List(client) => {
            for (room, home) in as_user(&client, async |u| u.list_rooms().await).await? {
                println!("{room} home {home}");
            }
        }
        RoomCmd::Invite {
            client,
            room,
            public,
            home,
            role,
        } => {
            let public = parse_public(&public)?;
            let role = room_role(role);
            as_user(&client, async |u| u.invite(room, &public, home, role).await).await?;
            println!("invited {}", UserId(public.signing));
        }
        RoomCmd::Members { client, room } => {
            for (user, role, home) in as_user(&client, async |u| u.members(room).await).await? {
                let role = match role {
                    RoomRole::Owner => "owner",
                    RoomRole::Admin => "admin",
                    RoomRole::Member => "member",
                };
                println!("{user} {role} home {home}");
            }
        }
        RoomCmd::Remove { client, room, user } => {
            as_user(&client, async |u| u.remove(room, user).await).await?;
            println!("removed {user}; the room has a new epoch key");
        }
        RoomCmd::Outcome {
            client,
            room,
            message,
            request,
        } => {
            let asked = match (message, request) {
                (Some(id), _) => Asked::Frame { id },
                (None, Some(nonce)) => Asked::Request { nonce },
                (None, None) => bail!("--message or --request is needed"),
            };
            match as_user(&client, async |u| u.outcome(room, asked).await).await? {
                Some(Outcome::Committed { seq, .. }) => println!("committed #{}", seq.0),
                Some(Outcome::Done) => println!("done"),
                Some(Outcome::Denied(denial)) => {
                    println!("refused ({}): {denial}", denial.reason());
                }
                Some(other) => println!("{other:?}"),
                None => println!("not decided yet (or not known to this node)"),
            }
        }
    }
    Ok(())
}

async fn send(args: SendArgs) -> anyhow::Result<()> {
    let mut messages = args.messages;
    if messages.is_empty() {
        messages = std::io::stdin().lines().collect::<Result<_, _>>()?;
    }
    as_user(&args.client, async |user| {
        for text in messages {
            match user.publish(args.room, text.as_bytes()).await? {
                Receipt::Committed { seq, .. } => println!("committed #{}", seq.0),
                Receipt::Queued { id } => println!("queued {id} (the room's home is unreachable)"),
            }
        }
        anyhow::Ok(())
    })
    .await
}

async fn tail(args: TailArgs) -> anyhow::Result<()> {
    let from = match args.from.as_str() {
        "start" => Position::Start,
        "live" => Position::Live,
        n => Position::At(Seq(n
            .parse()
            .context("--from is start, live or a number")?)),
    };
    as_user(&args.client, async |user| {
        let mut sub = user.subscribe(args.room, from).await?;
        let (mut out, mut err) = (std::io::stdout().lock(), std::io::stderr().lock());
        print_messages(&mut sub, args.count, &mut out, &mut err).await
    })
    .await
}

/// What `conclave tail` prints from: a subscription (in tests, a list).
trait Messages {
    async fn next(&mut self) -> Option<Result<conclave::Message, conclave::ApiError>>;
}

impl Messages for conclave::Subscription<RemoteNode> {
    async fn next(&mut self) -> Option<Result<conclave::Message, conclave::ApiError>> {
        conclave::Subscription::next(self).await
    }
}

/// Prints `messages`, one line each (`#seq sender body`), until `count` were
/// printed or they end. A frame that does not verify, decrypt or have a key is
/// reported on `err` and skipped: one member's bad frame must not stop everyone's
/// tail. Anything else (the connection broke, the node refused) ends it.
async fn print_messages(
    messages: &mut impl Messages,
    count: Option<usize>,
    out: &mut impl std::io::Write,
    err: &mut impl std::io::Write,
) -> anyhow::Result<()> {
    use conclave::ApiError;
    let mut printed = 0;
    while let Some(message) = messages.next().await {
        match message {
            Ok(m) => {
                writeln!(out, "#{} {} {}", m.seq.0, m.sender, printable(&m.body))?;
                printed += 1;
                if count.is_some_and(|n| printed >= n) {
                    break;
                }
            }
            Err(e @ (ApiError::Crypto(_) | ApiError::NoKey(_) | ApiError::Untrusted { .. })) => {
                writeln!(err, "skipped a message: {e}")?;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// `body` as one line of text: bytes that are not UTF-8 replaced, control
/// characters (newlines, a terminal's escape sequences) escaped, so a message
/// prints as what it is and cannot drive the terminal.
fn printable(body: &[u8]) -> String {
    let mut line = String::with_capacity(body.len());
    for c in String::from_utf8_lossy(body).chars() {
        if c.is_control() {
            line.extend(c.escape_default());
        } else {
            line.push(c);
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use conclave::{ApiError, Epoch, Message, MessageId, UserId};

    use super::*;

    /// `conclave node` with `flags` (after the data directory).
    fn node_args(flags: &[&str]) -> NodeArgs {
        let argv = ["conclave", "node", "--data", "d"].iter().chain(flags);
        match Cli::try_parse_from(argv).expect("parses").command {
            Command::Node(args) => args,
            _ => unreachable!("a node command"),
        }
    }

    #[test]
    fn the_publish_quota_comes_from_the_flags_over_the_config_file() {
        let config: NodeConfig =
            toml::from_str("publish_per_s = 10\npublish_mib_per_s = 3\n").expect("toml");
        let quota = |args| domain_config(&args, &config).expect("valid").publish_quota;
        let from_file = quota(node_args(&[]));
        assert_eq!(
            (from_file.frames_per_s, from_file.bytes_per_s),
            (10, 3 << 20)
        );
        let flagged = quota(node_args(&["--publish-per-s", "7"]));
        assert_eq!((flagged.frames_per_s, flagged.bytes_per_s), (7, 3 << 20));
        let default = domain_config(&node_args(&[]), &NodeConfig::default()).expect("valid");
        assert_eq!(default.publish_quota, DomainConfig::default().publish_quota);
        // Zero would refuse every publish: a mistake, refused with a reason.
        let zero: NodeConfig = toml::from_str("publish_per_s = 0").expect("toml");
        let error = domain_config(&node_args(&[]), &zero).expect_err("refused");
        assert!(error.to_string().contains("publish_per_s"), "{error}");
        assert!(
            Cli::try_parse_from(["conclave", "node", "--data", "d", "--publish-per-s", "0"])
                .is_err()
        );
    }

    struct Listed(VecDeque<Result<Message, ApiError>>);

    impl Messages for Listed {
        async fn next(&mut self) -> Option<Result<Message, ApiError>> {
            self.0.pop_front()
        }
    }

    fn message(seq: u64, body: &[u8]) -> Result<Message, ApiError> {
        Ok(Message {
            seq: Seq(seq),
            id: MessageId(u128::from(seq)),
            sender: UserId([7; 32]),
            epoch: Epoch(1),
            body: body.to_vec(),
        })
    }

    async fn tail_of(
        items: Vec<Result<Message, ApiError>>,
        count: Option<usize>,
    ) -> (anyhow::Result<()>, String, String) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let result = print_messages(&mut Listed(items.into()), count, &mut out, &mut err).await;
        let text = |b: Vec<u8>| String::from_utf8(b).expect("utf-8");
        (result, text(out), text(err))
    }

    #[tokio::test]
    async fn a_message_that_does_not_open_is_skipped_and_the_tail_goes_on() {
        let items = vec![
            message(1, b"one"),
            Err(ApiError::Crypto("does not decrypt".into())),
            Err(ApiError::Untrusted {
                reason: "key_mismatch",
                detail: "not the pinned key".into(),
            }),
            message(4, b"four"),
        ];
        let (result, out, err) = tail_of(items, None).await;
        assert!(result.is_ok());
        let sender = UserId([7; 32]);
        assert_eq!(out, format!("#1 {sender} one\n#4 {sender} four\n"));
        assert_eq!(err.lines().count(), 2, "{err}");
    }

    #[tokio::test]
    async fn a_broken_connection_ends_the_tail_and_count_counts_printed_messages() {
        let items = vec![
            Err(ApiError::NoKey(RoomId([1; 16]))),
            message(2, b"two"),
            Err(ApiError::Connection("reset".into())),
            message(3, b"never"),
        ];
        let (result, out, _) = tail_of(items, None).await;
        assert!(result.is_err());
        assert!(!out.contains("never"));
        let items = vec![
            Err(ApiError::NoKey(RoomId([1; 16]))),
            message(2, b"a"),
            message(3, b"b"),
        ];
        let (_, out, _) = tail_of(items, Some(1)).await;
        assert_eq!(out.lines().count(), 1, "{out}");
    }

    #[test]
    fn control_characters_are_escaped_and_bad_utf8_replaced() {
        assert_eq!(printable(b"plain text"), "plain text");
        assert_eq!(printable(b"two\nlines"), "two\\nlines");
        assert_eq!(printable(b"\x1b[2Jcleared"), "\\u{1b}[2Jcleared");
        assert_eq!(printable(b"caf\xc3\xa9 \xff"), "caf\u{e9} \u{fffd}");
    }
}

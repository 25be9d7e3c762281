//! The `conclave` command line: nodes, a local cluster, client commands, the
//! end-to-end check and the demo. `node/src/main.rs` only calls [`main`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use clap::{Args, Parser, Subcommand, ValueEnum};
use conclave_actors::ids::{NodeId, RoomId, Seq, UserId};
use conclave_actors::{Identity, PublicIdentity};
use serde::{Deserialize, Serialize};

use crate::client::RemoteNode;
use crate::observe;
use crate::user::{ApiError, Position, Receipt, User};
use crate::{Denial, History, Node, Policy, RoomRole, UserRole};

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

  # Users and rooms (client commands authenticate with a user identity file)
  conclave user add --admin --data ./data/a --identity ./admin.id   # bootstrap
  conclave user new --out ./alice.id                                # prints alice's public key
  conclave user add --node 127.0.0.1:7401 --as ./admin.id --public <ALICE_PUBLIC>
  conclave room create --node 127.0.0.1:7401 --as ./alice.id
  conclave send --node 127.0.0.1:7401 --as ./alice.id --room <ROOM> hello
  conclave tail --node 127.0.0.1:7401 --as ./alice.id --room <ROOM>";

/// conclave: end-to-end-encrypted group messaging between nodes.
#[derive(Parser)]
#[command(name = "conclave", version, about, long_about = None, after_help = EXAMPLES)]
struct Cli {
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
    /// and undelivered messages stay in the outboxes for the next start.
    ///
    /// Example: conclave node --data ./data/a --listen 127.0.0.1:7401 --peer ID@127.0.0.1:7402
    Node(NodeArgs),
    /// Users of a node: create identities, add, list, revoke.
    #[command(subcommand)]
    User(UserCmd),
    /// Rooms: create, list, invite, remove (with rekey).
    #[command(subcommand)]
    Room(RoomCmd),
    /// Encrypt, sign and publish messages to a room (arguments, or stdin lines).
    ///
    /// Example: conclave send --node 127.0.0.1:7401 --as ./alice.id --room ROOM hello
    Send(SendArgs),
    /// Print a room's messages, decrypted: history, then live until interrupted.
    ///
    /// Example: conclave tail --node 127.0.0.1:7401 --as ./alice.id --room ROOM
    Tail(TailArgs),
    /// A local cluster of separate node processes.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// End-to-end verification against a cluster started by `cluster up`.
    ///
    /// Creates a user on every node, a room spanning them, publishes --messages
    /// messages and confirms every member decrypts every one exactly once. With
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
    /// Benchmark: conclave side by side with NATS JetStream and the crypto floor.
    ///
    /// Starts local three-node clusters (separate processes, QUIC, LMDB with fsync),
    /// drives workloads a (1 room, 3 members), b (1 room, 30 members), c (many
    /// rooms), then the same load on JetStream R1 and R3, with and without the same
    /// end-to-end crypto, and prints a table (also DIR/bench.md, DIR/latency-*.svg).
    /// nats-server is installed from Debian's packages when missing.
    ///
    /// Example: conclave bench --quick
    Bench(crate::bench::BenchArgs),
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
    /// A TOML file with data, listen, metrics and [[peer]] id/addr entries (flags
    /// given too override it).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

/// What `--config` holds.
#[derive(Debug, Default, Deserialize, Serialize)]
struct NodeConfig {
    data: Option<PathBuf>,
    listen: Option<SocketAddr>,
    metrics: Option<SocketAddr>,
    #[serde(default)]
    peer: Vec<PeerConfig>,
}

#[derive(Debug, Deserialize, Serialize)]
struct PeerConfig {
    id: String,
    addr: SocketAddr,
}

/// How a client command reaches its node and whom it acts as.
#[derive(Args, Clone)]
struct ClientArgs {
    /// The node's address (its --listen).
    #[arg(long = "node", value_name = "ADDR")]
    node: SocketAddr,
    /// The node's id, to check the node is the one expected.
    #[arg(long = "node-id", value_name = "ID")]
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
    /// node, with --admin against the node's data directory (the bootstrap).
    Add(UserAddArgs),
    /// List the node's users (admins only).
    List(ClientArgs),
    /// Revoke a user (admins only). Revocation is a status flip, never a delete.
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
    /// Bootstrap: register the identity in --identity as an admin, directly in the
    /// store of the node at --data.
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
    /// The node's id, to check the node is the one expected.
    #[arg(long = "node-id", value_name = "ID")]
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

#[derive(Args, Clone)]
pub(crate) struct ClusterArgs {
    /// How many nodes.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=50))]
    pub(crate) nodes: u16,
    /// Where the nodes keep their data, and cluster.toml.
    #[arg(long, value_name = "DIR")]
    pub(crate) dir: PathBuf,
    /// The first node's port.
    #[arg(long, value_name = "P", default_value_t = 7400)]
    pub(crate) base_port: u16,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum CheckMode {
    /// Publish --messages, confirm every member decrypts them all, exit.
    Once,
    /// Publish continuously, print progress per second, verify at the end.
    Loop,
}

#[derive(Args)]
struct CheckArgs {
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

#[derive(Args)]
struct DemoArgs {
    /// Where the demo cluster keeps its data.
    #[arg(long, value_name = "DIR", default_value = "./data/demo")]
    dir: PathBuf,
    /// The first node's port.
    #[arg(long, value_name = "P", default_value_t = 7400)]
    base_port: u16,
    /// Stop the cluster after the conversation instead of running until Ctrl-C.
    #[arg(long)]
    exit: bool,
}

/// Runs the `conclave` command line.
pub fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
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
        Command::Check(args) => check(args).await,
        Command::Demo(args) => demo(args).await.map(|()| ExitCode::SUCCESS),
        Command::Bench(args) => crate::bench::run(args).await.map(|()| ExitCode::SUCCESS),
    }
}

/// Waits for SIGINT or SIGTERM.
async fn wait_for_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(error) => {
            tracing::warn!(%error, "cannot listen for SIGTERM; only Ctrl-C stops this");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
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
    wait_for_signal().await;
    tracing::info!("signal received; stopping");
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
pub fn public_hex(public: &PublicIdentity) -> String {
    let mut out = UserId(public.signing).to_string();
    out.push_str(&UserId(public.exchange).to_string());
    out
}

/// Parses [`public_hex`]'s output.
pub fn parse_public(text: &str) -> anyhow::Result<PublicIdentity> {
    let text = text.trim();
    if text.len() != 128 {
        bail!(
            "a public key is 128 hex digits (as `conclave user new` prints), got {}",
            text.len()
        );
    }
    let signing: UserId = text[..64].parse().context("public key")?;
    let exchange: UserId = text[64..].parse().context("public key")?;
    let public = PublicIdentity {
        signing: signing.0,
        exchange: exchange.0,
    };
    if public.verifying_key().is_none() {
        bail!("the public key's Ed25519 half is not a valid key");
    }
    Ok(public)
}

async fn connect(args: &ClientArgs) -> anyhow::Result<User<RemoteNode>> {
    let identity = crate::identity_file::load(&args.identity)
        .with_context(|| format!("loading the user identity {}", args.identity.display()))?;
    RemoteNode::connect(&identity, args.node, args.node_id)
        .await
        .with_context(|| format!("connecting to {} as {}", args.node, identity.user_id()))
}

/// Registers `identity` as an admin directly in the store at `data`. An identity
/// registered already is fine (re-running a bootstrap changes nothing).
fn bootstrap_admin(data: &Path, identity: &Identity) -> anyhow::Result<bool> {
    let store = conclave_storage::LmdbStore::open(&data.join("db"), Default::default())
        .with_context(|| format!("opening the store in {}", data.display()))?;
    let mut txn = conclave_storage::Store::write(&store)?;
    match conclave_actors::domain::state::registry::seed_admin(
        &mut *txn,
        &identity.public(),
        crate::host::wall_now(),
    ) {
        Ok(()) => {
            txn.commit()?;
            Ok(true)
        }
        Err(Denial::Conflict { .. }) => Ok(false),
        Err(denial) => Err(anyhow!("bootstrap refused: {denial}")),
    }
}

async fn user_cmd(cmd: UserCmd) -> anyhow::Result<()> {
    match cmd {
        UserCmd::New { out } => {
            let identity = Identity::generate(&mut rand_core::UnwrapErr(getrandom::SysRng));
            crate::identity_file::write_new(&out, &identity)
                .with_context(|| format!("writing {}", out.display()))?;
            eprintln!("user identity written to {}", out.display());
            println!("user {}", identity.user_id());
            println!("public {}", public_hex(&identity.public()));
        }
        UserCmd::Add(args) if args.admin => {
            let (data, file) = (
                args.data.context("--admin needs --data")?,
                args.identity_file.context("--admin needs --identity")?,
            );
            let (identity, created) = crate::identity_file::load_or_create(&file)
                .with_context(|| format!("loading {}", file.display()))?;
            if created {
                eprintln!("created the admin identity {}", file.display());
            }
            if bootstrap_admin(&data, &identity)? {
                eprintln!(
                    "{} is now an admin of the node in {}",
                    identity.user_id(),
                    data.display()
                );
            } else {
                eprintln!(
                    "{} is registered already; nothing changed",
                    identity.user_id()
                );
            }
            println!("{}", identity.user_id());
        }
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
            connect(&client)
                .await?
                .add_user(&public, user_role(args.role))
                .await?;
            println!("added {}", UserId(public.signing));
        }
        UserCmd::List(client) => {
            for entry in connect(&client).await?.list_users().await? {
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
            connect(&client).await?.revoke_user(user).await?;
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
            let room = connect(&client).await?.create_room(policy).await?;
            println!("{room}");
        }
        RoomCmd::List(client) => {
            for (room, home) in connect(&client).await?.list_rooms().await? {
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
            connect(&client)
                .await?
                .invite(room, &public, home, room_role(role))
                .await?;
            println!("invited {}", UserId(public.signing));
        }
        RoomCmd::Remove { client, room, user } => {
            connect(&client).await?.remove(room, user).await?;
            println!("removed {user}; the room has a new epoch key");
        }
    }
    Ok(())
}

async fn send(args: SendArgs) -> anyhow::Result<()> {
    let user = connect(&args.client).await?;
    let mut messages = args.messages;
    if messages.is_empty() {
        messages = std::io::stdin().lines().collect::<Result<_, _>>()?;
    }
    for text in messages {
        match user.publish(args.room, text.as_bytes()).await? {
            Receipt::Committed { seq, .. } => println!("committed #{}", seq.0),
            Receipt::Queued { id } => println!("queued {id} (the room's home is unreachable)"),
        }
    }
    Ok(())
}

async fn tail(args: TailArgs) -> anyhow::Result<()> {
    let user = connect(&args.client).await?;
    let from = match args.from.as_str() {
        "start" => Position::Start,
        "live" => Position::Live,
        n => Position::At(Seq(n
            .parse()
            .context("--from is start, live or a number")?)),
    };
    let mut sub = user.subscribe(args.room, from).await?;
    let mut seen = 0;
    while let Some(message) = sub.next().await {
        let message = message?;
        println!(
            "#{} {} {}",
            message.seq.0,
            message.sender,
            String::from_utf8_lossy(&message.body)
        );
        seen += 1;
        if args.count.is_some_and(|n| seen >= n) {
            break;
        }
    }
    Ok(())
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

pub(crate) struct Cluster {
    pub(crate) file: ClusterFile,
    children: Vec<std::process::Child>,
}

impl Cluster {
    /// Stops every node with SIGTERM, waits up to 10 s each, then SIGKILLs.
    pub(crate) fn stop(mut self) {
        for child in &self.children {
            if let Ok(pid) = i32::try_from(child.id()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
        }
        for (child, node) in self.children.iter_mut().zip(&self.file.node) {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match child.try_wait() {
                    Ok(Some(status)) => {
                        eprintln!("{} stopped ({status})", node.name);
                        break;
                    }
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(50))
                    }
                    _ => {
                        eprintln!("{} did not stop in 10 s; killing it", node.name);
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                }
            }
        }
    }
}

pub(crate) async fn cluster_up(args: &ClusterArgs) -> anyhow::Result<Cluster> {
    let n = usize::from(args.nodes);
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("creating {}", args.dir.display()))?;
    let dir = args.dir.canonicalize()?;
    let port = |i: usize, offset: u16| -> anyhow::Result<u16> {
        u16::try_from(i)
            .ok()
            .and_then(|i| args.base_port.checked_add(offset)?.checked_add(i))
            .ok_or_else(|| {
                anyhow!(
                    "--base-port {} leaves no room for {n} nodes",
                    args.base_port
                )
            })
    };
    let mut nodes = Vec::new();
    for i in 0..n {
        let data = dir.join(format!("node{i}"));
        let id = Node::init(&data)?;
        let admin = data.join("admin.id");
        let (identity, _) = crate::identity_file::load_or_create(&admin)?;
        bootstrap_admin(&data, &identity)?;
        nodes.push((
            data,
            id,
            admin,
            SocketAddr::from(([127, 0, 0, 1], port(i, 0)?)),
            SocketAddr::from(([127, 0, 0, 1], port(i, 100)?)),
        ));
    }
    let exe = std::env::current_exe().context("locating this executable")?;
    let mut file = ClusterFile { node: Vec::new() };
    let mut children = Vec::new();
    for (i, (data, id, admin, addr, metrics)) in nodes.iter().enumerate() {
        let mut node_args = vec![
            "node".to_string(),
            "--data".into(),
            data.display().to_string(),
            "--listen".into(),
            addr.to_string(),
            "--metrics".into(),
            metrics.to_string(),
        ];
        for (j, (_, peer, _, peer_addr, _)) in nodes.iter().enumerate() {
            if j != i {
                node_args.push("--peer".into());
                node_args.push(format!("{peer}@{peer_addr}"));
            }
        }
        let log = data.join("node.log");
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let child = std::process::Command::new(&exe)
            .args(&node_args)
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting node{i}"))?;
        file.node.push(ClusterNode {
            name: format!("node{i}"),
            id: id.to_string(),
            addr: *addr,
            metrics: *metrics,
            pid: child.id(),
            data: data.clone(),
            admin: admin.clone(),
            log,
            args: node_args,
        });
        children.push(child);
    }
    std::fs::write(dir.join("cluster.toml"), toml::to_string_pretty(&file)?)?;
    let mut cluster = Cluster { file, children };
    // Ready when every node answers /healthz.
    if let Err(error) = wait_ready(&mut cluster).await {
        cluster.stop();
        return Err(error);
    }
    Ok(cluster)
}

async fn wait_ready(cluster: &mut Cluster) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    for (node, child) in cluster.file.node.iter().zip(cluster.children.iter_mut()) {
        loop {
            if let Ok((200, _)) = observe::http_get(node.metrics, "/healthz").await {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                let log = std::fs::read_to_string(&node.log).unwrap_or_default();
                let lines: Vec<_> = log.lines().collect();
                let tail = lines[lines.len().saturating_sub(10)..].join("\n");
                bail!(
                    "{} exited at start ({status}); its log ends:\n{tail}",
                    node.name
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not become ready within 30 s (see {})",
                    node.name,
                    node.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

async fn print_status(cluster: &Cluster) {
    println!(
        "{:<7} {:<18} {:<16} {:<16} {:>8} {:>6}",
        "node", "id", "addr", "metrics", "pid", "peers"
    );
    for node in &cluster.file.node {
        let peers = match observe::http_get(node.metrics, "/healthz").await {
            Ok((_, body)) => serde_json::from_str::<observe::Health>(&body)
                .map(|h| format!("{}/{}", h.peers_connected, h.peers_known))
                .unwrap_or_else(|_| "?".into()),
            Err(_) => "down".into(),
        };
        println!(
            "{:<7} {:<18} {:<16} {:<16} {:>8} {:>6}",
            node.name,
            format!("{}…", &node.id[..16]),
            node.addr,
            node.metrics,
            node.pid,
            peers
        );
    }
}

/// A member of the check's room: one user per node.
struct Member {
    name: String,
    node: ClusterNode,
    identity: Identity,
}

/// Adds a fresh user on each node (through that node's admin) and builds a room
/// homed on the first node with all of them.
async fn check_setup(file: &ClusterFile) -> anyhow::Result<(RoomId, Vec<Member>)> {
    let mut members = Vec::new();
    for node in &file.node {
        let admin_identity = crate::identity_file::load(&node.admin)?;
        let node_id: NodeId = node.id.parse()?;
        let admin = RemoteNode::connect(&admin_identity, node.addr, Some(node_id))
            .await
            .with_context(|| format!("connecting to {} as its admin", node.name))?;
        let identity = Identity::generate(&mut rand_core::UnwrapErr(getrandom::SysRng));
        admin.add_user(&identity.public(), UserRole::Member).await?;
        members.push(Member {
            name: format!("user@{}", node.name),
            node: node.clone(),
            identity,
        });
    }
    let owner = RemoteNode::connect(&members[0].identity, members[0].node.addr, None).await?;
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

/// What one member's reader has seen, by message id.
#[derive(Default)]
struct Seen {
    /// Message id → times seen.
    ids: BTreeMap<u128, u32>,
    /// The next sequence number to read from.
    next: Seq,
    attached: bool,
}

/// Reads `room` as `member` forever, reconnecting to its node when the connection
/// breaks and resuming after the last message seen.
async fn reader(
    member: (String, SocketAddr, Identity),
    room: RoomId,
    seen: std::sync::Arc<std::sync::Mutex<Seen>>,
) {
    let (_name, addr, identity) = member;
    loop {
        let from = {
            let s = seen
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if s.next == Seq(0) {
                Position::Start
            } else {
                Position::At(s.next)
            }
        };
        let sub = async {
            let user = RemoteNode::connect(&identity, addr, None).await?;
            user.subscribe(room, from).await
        };
        if let Ok(mut sub) = sub.await {
            seen.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .attached = true;
            while let Some(Ok(message)) = sub.next().await {
                let mut s = seen
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                *s.ids.entry(message.id.0).or_default() += 1;
                s.next = Seq(message.seq.0 + 1);
            }
        }
        seen.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .attached = false;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// How long the check waits for one publish before counting it failed.
const PUBLISH_WAIT: Duration = Duration::from_secs(5);

async fn check(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let file = ClusterFile::read(&args.cluster)?;
    let (room, members) = check_setup(&file).await?;
    println!(
        "room {room} homed on {} with {} members, one per node",
        file.node[0].name,
        members.len()
    );
    let seen: Vec<_> = members
        .iter()
        .map(|_| std::sync::Arc::new(std::sync::Mutex::new(Seen::default())))
        .collect();
    let mut readers = Vec::new();
    for (m, s) in members.iter().zip(&seen) {
        readers.push(tokio::spawn(reader(
            (m.name.clone(), m.node.addr, m.identity.clone()),
            room,
            s.clone(),
        )));
    }
    // Publishers: one connection per member, reconnected on failure.
    let mut publishers: Vec<Option<User<RemoteNode>>> = Vec::new();
    for m in &members {
        publishers.push(
            RemoteNode::connect(&m.identity, m.node.addr, None)
                .await
                .ok(),
        );
    }
    let mut reconnect_at = vec![Instant::now(); members.len()];
    let mut committed: Vec<u128> = Vec::new();
    let mut queued: Vec<u128> = Vec::new();
    let mut failed = 0usize;
    let started = Instant::now();
    let mut k = 0usize;
    let mut last_tick = Instant::now();
    let (limit, interval) = match args.mode {
        CheckMode::Once => (Some(args.messages), Duration::ZERO),
        CheckMode::Loop => (None, Duration::from_millis(args.interval)),
    };
    loop {
        if limit.is_some_and(|n| k >= n)
            || (limit.is_none() && started.elapsed() >= Duration::from_secs(args.duration))
        {
            break;
        }
        let i = k % members.len();
        k += 1;
        // Reconnect at most every two seconds, and never for longer than that.
        if publishers[i].is_none() && Instant::now() >= reconnect_at[i] {
            reconnect_at[i] = Instant::now() + Duration::from_secs(2);
            let connect = RemoteNode::connect(&members[i].identity, members[i].node.addr, None);
            publishers[i] = tokio::time::timeout(Duration::from_secs(2), connect)
                .await
                .ok()
                .and_then(Result::ok);
        }
        let text = format!("check {k} from {}", members[i].name);
        let result = match &publishers[i] {
            // Bounded, so that a node killed mid-request does not stall the loop.
            // (A message that timed out may still commit: it is then delivered,
            // though not counted as sent.)
            Some(user) => tokio::time::timeout(PUBLISH_WAIT, user.publish(room, text.as_bytes()))
                .await
                .unwrap_or(Err(ApiError::Timeout(PUBLISH_WAIT))),
            None => Err(ApiError::Connection("not connected".into())),
        };
        match result {
            Ok(Receipt::Committed { id, .. }) => committed.push(id.0),
            Ok(Receipt::Queued { id }) => queued.push(id.0),
            Err(error) => {
                failed += 1;
                if matches!(error, ApiError::Connection(_) | ApiError::Timeout(_)) {
                    publishers[i] = None;
                }
                if args.mode == CheckMode::Once {
                    eprintln!("publish {k} by {} failed: {error}", members[i].name);
                }
            }
        }
        if args.mode == CheckMode::Loop && last_tick.elapsed() >= Duration::from_secs(1) {
            last_tick = Instant::now();
            print_tick(
                started,
                &members,
                &seen,
                committed.len(),
                queued.len(),
                failed,
            );
        }
        if !interval.is_zero() {
            tokio::time::sleep(interval).await;
        }
    }
    // Converge: every member has every committed (and every queued) message.
    let expected: std::collections::BTreeSet<u128> =
        committed.iter().chain(&queued).copied().collect();
    let deadline = Instant::now() + Duration::from_secs(args.settle);
    loop {
        let done = seen.iter().all(|s| {
            let s = s.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            expected.iter().all(|id| s.ids.contains_key(id))
        });
        if done || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A moment more, so that a duplicate would show.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for r in readers {
        r.abort();
    }
    println!(
        "published {} messages in {:.1} s: {} committed, {} queued, {} failed",
        k,
        started.elapsed().as_secs_f64(),
        committed.len(),
        queued.len(),
        failed
    );
    let mut ok = args.mode == CheckMode::Loop || failed == 0;
    for (m, s) in members.iter().zip(&seen) {
        let s = s.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let missing: Vec<_> = committed
            .iter()
            .filter(|id| !s.ids.contains_key(id))
            .collect();
        let missing_queued = queued.iter().filter(|id| !s.ids.contains_key(id)).count();
        let duplicates = s.ids.values().filter(|&&n| n > 1).count();
        let received = s.ids.len();
        println!(
            "{:<12} on {}: received {received}, missing {} committed, {missing_queued} queued not yet delivered, {duplicates} delivered twice",
            m.name,
            m.node.name,
            missing.len()
        );
        if !missing.is_empty()
            || duplicates > 0
            || (args.mode == CheckMode::Once && missing_queued > 0)
        {
            ok = false;
        }
    }
    if ok {
        println!("OK: every member decrypted every committed message exactly once");
        Ok(ExitCode::SUCCESS)
    } else {
        println!("FAILED: see the lines above");
        Ok(ExitCode::FAILURE)
    }
}

fn print_tick(
    started: Instant,
    members: &[Member],
    seen: &[std::sync::Arc<std::sync::Mutex<Seen>>],
    committed: usize,
    queued: usize,
    failed: usize,
) {
    let mut line = format!(
        "t={:>4.0}s sent: {committed} committed, {queued} queued, {failed} failed |",
        started.elapsed().as_secs_f64()
    );
    for (m, s) in members.iter().zip(seen) {
        let s = s.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        line.push_str(&format!(
            " {} received {} ({})",
            m.name,
            s.ids.len(),
            if s.attached {
                format!("attached to {}", m.node.name)
            } else {
                format!("reconnecting to {}", m.node.name)
            }
        ));
    }
    println!("{line}");
}

async fn demo(args: DemoArgs) -> anyhow::Result<()> {
    println!(
        "starting a local three-node cluster in {} ...",
        args.dir.display()
    );
    let cluster = cluster_up(&ClusterArgs {
        nodes: 3,
        dir: args.dir.clone(),
        base_port: args.base_port,
    })
    .await?;
    print_status(&cluster).await;
    let result = demo_conversation(&cluster, &args.dir).await;
    if let Err(error) = &result {
        eprintln!("error: {error:#}");
    }
    if result.is_ok() && !args.exit {
        println!("\nThe cluster keeps running; Ctrl-C stops it.");
        wait_for_signal().await;
    }
    cluster.stop();
    result
}

async fn demo_conversation(cluster: &Cluster, dir: &Path) -> anyhow::Result<()> {
    let users_dir = dir.canonicalize()?.join("users");
    std::fs::create_dir_all(&users_dir)?;
    let names = ["alice", "bob", "carol"];
    let mut users = Vec::new();
    for (name, node) in names.iter().zip(&cluster.file.node) {
        let file = users_dir.join(format!("{name}.id"));
        let (identity, _) = crate::identity_file::load_or_create(&file)?;
        let admin = RemoteNode::connect(
            &crate::identity_file::load(&node.admin)?,
            node.addr,
            Some(node.id.parse()?),
        )
        .await?;
        match admin.add_user(&identity.public(), UserRole::Member).await {
            Ok(()) | Err(ApiError::Denied(Denial::Conflict { .. })) => {}
            Err(e) => return Err(e.into()),
        }
        users.push((
            name,
            file,
            node,
            RemoteNode::connect(&identity, node.addr, None).await?,
        ));
    }
    let (alice, bob, carol) = (&users[0].3, &users[1].3, &users[2].3);
    let room = alice.create_room(Policy::default()).await?;
    println!("\nalice (on {}) created room {room}", users[0].2.name);
    for (name, _, node, user) in &users[1..] {
        alice
            .invite(room, &user.public(), node.id.parse()?, RoomRole::Member)
            .await?;
        println!("alice invited {name} (homed on {})", node.name);
    }
    let script: [(usize, &str); 5] = [
        (0, "Hello both, this room is end-to-end encrypted."),
        (1, "Hi alice! The nodes only ever see ciphertext."),
        (
            2,
            "And each node verified our signatures before storing anything.",
        ),
        (0, "Carol, I'll rotate the key when someone leaves."),
        (2, "Perfect. Sequenced by node0, delivered once, in order."),
    ];
    println!();
    for (who, text) in script {
        let receipt = users[who].3.publish(room, text.as_bytes()).await?;
        let seq = match receipt {
            Receipt::Committed { seq, .. } => format!("committed #{}", seq.0),
            Receipt::Queued { .. } => "queued".into(),
        };
        println!("{:>5} -> {text:?} ({seq})", users[who].0);
    }
    println!("\nwhat each member decrypts on their own node:");
    for (name, _, node, user) in &users {
        let mut sub = user.subscribe(room, Position::Start).await?;
        let mut lines = Vec::new();
        while lines.len() < script.len() {
            let message = tokio::time::timeout(Duration::from_secs(10), sub.next())
                .await
                .map_err(|_| anyhow!("{name} did not receive every message within 10 s"))?
                .ok_or_else(|| anyhow!("{name}'s stream ended"))??;
            let from = users
                .iter()
                .find(|u| u.3.id() == message.sender)
                .map_or("?", |u| u.0);
            lines.push(format!(
                "  #{} {from}: {}",
                message.seq.0,
                String::from_utf8_lossy(&message.body)
            ));
        }
        println!("{name} on {}:\n{}", node.name, lines.join("\n"));
    }
    let _ = (bob, carol);
    let n0 = &cluster.file.node[0];
    let exe = "cargo run --release --";
    println!(
        "\nMetrics: http://{}/metrics (health: http://{}/healthz), and likewise for:",
        n0.metrics, n0.metrics
    );
    for node in &cluster.file.node[1..] {
        println!("  {}: http://{}/metrics", node.name, node.metrics);
    }
    println!("\nSend your own message as bob, and read the room as carol:");
    println!(
        "  {exe} send --node {} --as {} --room {room} \"hello from the shell\"",
        users[1].2.addr,
        users[1].1.display()
    );
    println!(
        "  {exe} tail --node {} --as {} --room {room}",
        users[2].2.addr,
        users[2].1.display()
    );
    println!("Cluster layout: {}", dir.join("cluster.toml").display());
    Ok(())
}

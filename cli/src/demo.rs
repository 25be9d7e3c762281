//! `conclave demo`: a local three-node cluster and an end-to-end-encrypted
//! conversation across it, then the commands to continue by hand.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::anyhow;
use clap::Args;
use conclave::{
    identity_file, ApiError, Denial, Policy, Position, Receipt, RemoteNode, RoomRole, User,
    UserRole,
};
use conclave_actors::ids::RoomId;

use crate::cluster::{cluster_up, print_status, Cluster, ClusterArgs, ClusterNode};
use crate::signal::wait_for_signal;

/// How long each member may take to receive the whole conversation.
const RECEIVE_WAIT_MS: u64 = 10_000;
/// The demo's cluster size: one user per node.
const DEMO_NODES: u16 = 3;
/// The users, one per node, in node order.
const NAMES: [&str; DEMO_NODES as usize] = ["alice", "bob", "carol"];
/// Who says what (an index into [`NAMES`]).
const SCRIPT: [(usize, &str); 5] = [
    (0, "Hello both, this room is end-to-end encrypted."),
    (1, "Hi alice! The nodes only ever see ciphertext."),
    (
        2,
        "And each node verified our signatures before storing anything.",
    ),
    (0, "Carol, I'll rotate the key when someone leaves."),
    (2, "Perfect. Sequenced by node0, delivered once, in order."),
];

/// Options of `conclave demo`.
#[derive(Args)]
pub(crate) struct DemoArgs {
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

/// One participant: their identity file, their node, their connection.
struct DemoUser<'a> {
    name: &'static str,
    file: PathBuf,
    node: &'a ClusterNode,
    user: User<RemoteNode>,
}

pub(crate) async fn demo(args: DemoArgs) -> anyhow::Result<()> {
    println!(
        "starting a local three-node cluster in {} ...",
        args.dir.display()
    );
    let cluster = cluster_up(&ClusterArgs {
        nodes: DEMO_NODES,
        dir: args.dir.clone(),
        base_port: args.base_port,
        no_replication: false,
    })
    .await?;
    print_status(&cluster).await;
    let result = conversation(&cluster, &args.dir).await;
    if result.is_ok() && !args.exit {
        println!("\nThe cluster keeps running; Ctrl-C stops it.");
        wait_for_signal().await;
    }
    cluster.stop();
    result
}

async fn conversation(cluster: &Cluster, dir: &Path) -> anyhow::Result<()> {
    let users = demo_users(cluster, dir).await?;
    let room = users[0].user.create_room(Policy::default()).await?;
    println!("\nalice (on {}) created room {room}", users[0].node.name);
    for u in &users[1..] {
        users[0]
            .user
            .invite(room, &u.user.public(), u.node.node_id()?, RoomRole::Member)
            .await?;
        println!("alice invited {} (homed on {})", u.name, u.node.name);
    }
    println!();
    for (who, text) in SCRIPT {
        let receipt = users[who].user.publish(room, text.as_bytes()).await?;
        let seq = match receipt {
            Receipt::Committed { seq, .. } => format!("committed #{}", seq.0),
            Receipt::Queued { .. } => "queued".into(),
        };
        println!("{:>5} -> {text:?} ({seq})", users[who].name);
    }
    println!("\nwhat each member decrypts on their own node:");
    for u in &users {
        let lines = read_conversation(u, &users, room).await?;
        println!("{} on {}:\n{}", u.name, u.node.name, lines.join("\n"));
    }
    print_next_steps(cluster, &users, room, dir);
    Ok(())
}

/// alice, bob and carol, one per node, each added by their node's admin (again on
/// a restarted demo: already registered is fine).
async fn demo_users<'a>(cluster: &'a Cluster, dir: &Path) -> anyhow::Result<Vec<DemoUser<'a>>> {
    assert_eq!(cluster.file.node.len(), NAMES.len(), "one user per node");
    let users_dir = dir.canonicalize()?.join("users");
    std::fs::create_dir_all(&users_dir)?;
    let mut users = Vec::new();
    for (name, node) in NAMES.into_iter().zip(&cluster.file.node) {
        let file = users_dir.join(format!("{name}.id"));
        let (identity, _) = identity_file::load_or_create(&file)?;
        let admin_identity = identity_file::load(&node.admin)?;
        let node_id = node.node_id()?;
        let admin = RemoteNode::connect(&admin_identity, node.addr, Some(node_id)).await?;
        match admin.add_user(&identity.public(), UserRole::Member).await {
            Ok(()) | Err(ApiError::Denied(Denial::Conflict { .. })) => {}
            Err(e) => return Err(e.into()),
        }
        let user = RemoteNode::connect(&identity, node.addr, Some(node_id)).await?;
        users.push(DemoUser {
            name,
            file,
            node,
            user,
        });
    }
    Ok(users)
}

/// The conversation as `reader` decrypts it on their own node, one line each.
async fn read_conversation(
    reader: &DemoUser<'_>,
    users: &[DemoUser<'_>],
    room: RoomId,
) -> anyhow::Result<Vec<String>> {
    let name = reader.name;
    let mut sub = reader.user.subscribe(room, Position::Start).await?;
    let mut lines = Vec::new();
    while lines.len() < SCRIPT.len() {
        let message = tokio::time::timeout(Duration::from_millis(RECEIVE_WAIT_MS), sub.next())
            .await
            .map_err(|_| {
                anyhow!("{name} did not receive every message within {RECEIVE_WAIT_MS} ms")
            })?
            .ok_or_else(|| anyhow!("{name}'s stream ended"))??;
        let from = users
            .iter()
            .find(|u| u.user.id() == message.sender)
            .map_or("?", |u| u.name);
        lines.push(format!(
            "  #{} {from}: {}",
            message.seq.0,
            String::from_utf8_lossy(&message.body)
        ));
    }
    Ok(lines)
}

fn print_next_steps(cluster: &Cluster, users: &[DemoUser<'_>], room: RoomId, dir: &Path) {
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
        "  {exe} send --node {} --node-id {} --as {} --room {room} \"hello from the shell\"",
        users[1].node.addr,
        users[1].node.id,
        users[1].file.display()
    );
    println!(
        "  {exe} tail --node {} --node-id {} --as {} --room {room}",
        users[2].node.addr,
        users[2].node.id,
        users[2].file.display()
    );
    println!("Cluster layout: {}", dir.join("cluster.toml").display());
}

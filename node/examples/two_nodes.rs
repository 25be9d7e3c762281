//! Two nodes on loopback exchange end-to-end-encrypted messages.
//!
//! Run: `cargo run --release -p conclave --example two_nodes`
//!
//! Alice is homed on node A, Bob on node B. Alice creates a room (homed on A),
//! invites Bob, and both publish; each reads the room's history, then live messages.
//! Everything is encrypted and signed in this process: the nodes see ciphertext only.

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use conclave::{Identity, Node, Policy, Position, Receipt, RoomRole, UserRole};

/// A loopback port that is free right now.
fn free_port() -> std::io::Result<SocketAddr> {
    UdpSocket::bind("127.0.0.1:0")?.local_addr()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let dir = tempfile::tempdir()?;
    let (dir_a, dir_b) = (dir.path().join("a"), dir.path().join("b"));
    // Each node needs the other's id and address before it starts.
    let (id_a, id_b) = (Node::init(&dir_a)?, Node::init(&dir_b)?);
    let (addr_a, addr_b) = (free_port()?, free_port()?);
    let a = Node::builder()
        .data_dir(&dir_a)
        .listen(addr_a)
        .peer(id_b, addr_b)
        .start()
        .await?;
    let b = Node::builder()
        .data_dir(&dir_b)
        .listen(addr_b)
        .peer(id_a, addr_a)
        .start()
        .await?;
    println!("node A {id_a} on {addr_a}\nnode B {id_b} on {addr_b}");

    // The bootstrap: each node's first admin, who then registers a user.
    let mut rng = rand_core::UnwrapErr(getrandom::SysRng);
    let mut user_on = async |node: &Node| -> anyhow::Result<conclave::User> {
        let admin = Identity::generate(&mut rng);
        node.seed_admin(&admin.public())?;
        let admin = node.user(admin).await?;
        let user = Identity::generate(&mut rng);
        admin.add_user(&user.public(), UserRole::Member).await?;
        Ok(node.user(user).await?)
    };
    let alice = user_on(&a).await?;
    let bob = user_on(&b).await?;

    let room = alice.create_room(Policy::default()).await?;
    alice
        .invite(room, &bob.public(), b.id(), RoomRole::Member)
        .await?;
    println!("alice created room {room} on node A and invited bob (node B)");

    for text in ["hello bob", "this is end-to-end encrypted"] {
        let receipt = alice.publish(room, text.as_bytes()).await?;
        println!("alice -> {text:?}: {receipt:?}");
    }
    let mut bob_reads = bob.subscribe(room, Position::Start).await?;
    let receipt = bob.publish(room, b"hi alice").await?;
    println!("bob   -> \"hi alice\": {receipt:?}");
    assert!(matches!(receipt, Receipt::Committed { .. }));

    for _ in 0..3 {
        let message = tokio::time::timeout(Duration::from_secs(10), bob_reads.next())
            .await?
            .expect("the room is open")?;
        let who = if message.sender == alice.id() {
            "alice"
        } else {
            "bob"
        };
        println!(
            "bob reads #{} from {who}: {:?}",
            message.seq.0,
            String::from_utf8_lossy(&message.body)
        );
    }
    a.shutdown().await;
    b.shutdown().await;
    Ok(())
}

//! Removing a member rekeys the room: the removed member's node receives nothing
//! of the new epoch, and their stream ends after the last message they may read.
//!
//! Run: `cargo run --release -p conclave --example removal`

use std::time::Duration;

use conclave::{Policy, Position, RoomRole};

mod common;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let common::Cluster {
        dir: _dir,
        ids,
        nodes,
        users,
    } = common::local_cluster(3).await?;
    let (alice, bob, carol) = (&users[0], &users[1], &users[2]);

    let room = alice.create_room(Policy::default()).await?;
    alice
        .invite(room, &bob.public(), ids[1], RoomRole::Member)
        .await?;
    alice
        .invite(room, &carol.public(), ids[2], RoomRole::Member)
        .await?;
    alice
        .publish(room, b"all three of us can read this")
        .await?;

    let mut carol_reads = carol.subscribe(room, Position::Start).await?;
    let first = carol_reads.next().await.expect("open")?;
    println!(
        "carol reads (epoch {}): {:?}",
        first.epoch.0,
        String::from_utf8_lossy(&first.body)
    );

    alice.remove(room, carol.id()).await?;
    // The members as the room's chain says, verified by alice's client (the
    // home's `room_info` is only its say).
    let members = alice.members(room).await?;
    let epochs = alice.key_epochs(room).await?;
    println!(
        "carol removed; the room is now at epoch {} with {} members",
        epochs.last().map_or(0, |e| e.0),
        members.len()
    );
    alice
        .publish(room, b"only alice and bob can read this")
        .await?;

    let mut bob_reads = bob.subscribe(room, Position::Start).await?;
    for _ in 0..2 {
        let m = tokio::time::timeout(Duration::from_secs(10), bob_reads.next())
            .await?
            .expect("open")?;
        println!(
            "bob reads (epoch {}): {:?}",
            m.epoch.0,
            String::from_utf8_lossy(&m.body)
        );
    }
    match tokio::time::timeout(Duration::from_secs(10), carol_reads.next()).await? {
        None => println!("carol's stream has ended: she receives nothing of epoch 2"),
        Some(m) => anyhow::bail!("carol read something after her removal: {m:?}"),
    }
    match carol.publish(room, b"can I still post?").await {
        Err(e) => println!("carol publishes: refused, {e}"),
        Ok(r) => anyhow::bail!("carol could still publish: {r:?}"),
    }
    for node in &nodes {
        node.shutdown().await;
    }
    Ok(())
}

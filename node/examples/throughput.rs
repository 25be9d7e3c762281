//! A rough publish-to-deliver throughput figure: three nodes in this process over
//! QUIC on loopback, LMDB with fsync per commit, one room with a member on each
//! node, 256-byte messages published by all three members with a bounded number
//! in flight. (The full benchmark, with latency percentiles and a comparison, is
//! `conclave bench`.)
//!
//! Run: `cargo run --release -p conclave --example throughput -- [MESSAGES] [IN_FLIGHT]`

use std::sync::Arc;
use std::time::{Duration, Instant};

use conclave::{Policy, Position, Receipt, RoomRole};
use tokio::sync::Semaphore;

mod common;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let messages: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(3000);
    let in_flight: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(64);
    let common::Cluster {
        dir: _dir,
        ids,
        nodes,
        users,
    } = common::local_cluster(3).await?;
    let room = users[0].create_room(Policy::default()).await?;
    for (i, user) in users.iter().enumerate().skip(1) {
        users[0]
            .invite(room, &user.public(), ids[i], RoomRole::Member)
            .await?;
    }
    let mut readers = Vec::new();
    for user in &users {
        let mut sub = user.subscribe(room, Position::Live).await?;
        readers.push(tokio::spawn(async move {
            let mut got = 0;
            while got < messages {
                match tokio::time::timeout(Duration::from_secs(60), sub.next()).await {
                    Ok(Some(Ok(_))) => got += 1,
                    other => panic!("reader stopped after {got}: {other:?}"),
                }
            }
            Instant::now()
        }));
    }
    let body = vec![0x42u8; 256];
    let permits = Arc::new(Semaphore::new(in_flight));
    let start = Instant::now();
    let mut publishers = Vec::new();
    for i in 0..messages {
        let permit = Arc::clone(&permits).acquire_owned().await?;
        let user = users[i % 3].clone();
        let body = body.clone();
        publishers.push(tokio::spawn(async move {
            let receipt = user.publish(room, &body).await;
            drop(permit);
            match receipt {
                Ok(Receipt::Committed { .. }) => true,
                other => {
                    eprintln!("publish not committed: {other:?}");
                    false
                }
            }
        }));
    }
    let mut committed = 0;
    for p in publishers {
        committed += usize::from(p.await?);
    }
    let committed_at = start.elapsed();
    let mut delivered_at = Duration::ZERO;
    for r in readers {
        delivered_at = delivered_at.max(r.await?.duration_since(start));
    }
    println!("{messages} messages of 256 B, {in_flight} in flight, 3 nodes, 3 members");
    println!(
        "committed: {committed} in {:.2} s = {:.0} msg/s",
        committed_at.as_secs_f64(),
        committed as f64 / committed_at.as_secs_f64()
    );
    println!(
        "delivered to every member: {:.2} s = {:.0} msg/s",
        delivered_at.as_secs_f64(),
        messages as f64 / delivered_at.as_secs_f64()
    );
    for node in &nodes {
        node.shutdown().await;
    }
    Ok(())
}

//! A hostile client against a node process, bounded and on loopback: handshakes it
//! never finishes, then one registered user announcing large requests on every
//! stream of every connection it may open and never finishing them. The node's
//! memory stays within what its stated limits allow, and a legitimate client keeps
//! being served (publishes, and a new connection in the middle of the flood).
//!
//! The suite runs a short version; the long one is
//! `CONCLAVE_HOSTILE_HANDSHAKES=20000 cargo test --release -p conclave-integration
//! --test hostile_load -- --nocapture` (it prints its figures).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use conclave::{Identity, Policy, Receipt, RemoteNode, UserRole};
use conclave_cli::cluster::ClusterFile;
use conclave_integration::hostile::{half_open_handshakes, pin_requests, rss_kib};
use conclave_integration::processes::cluster_up;
use conclave_transports::quic::{
    CLIENT_RECEIVE_WINDOW_BYTES, CLIENT_SEND_WINDOW_BYTES, HANDSHAKES_IN_FLIGHT_MAX,
};

const EXE: &str = env!("CARGO_BIN_EXE_conclave-it");

/// Handshakes sent in the short version (the environment variable
/// `CONCLAVE_HOSTILE_HANDSHAKES` sets another count).
const HANDSHAKES_DEFAULT: usize = 2_000;
/// Request streams the hostile user tries to open per connection, and what each
/// announces: what took a node to 577 MB before clients had limits of their own.
const PIN_STREAMS: usize = 64;
const PIN_ANNOUNCE_BYTES: u32 = 1 << 20;
/// What one half-open handshake can cost the node (measured: ~31 KB).
const HANDSHAKE_KIB: u64 = 32;
/// Room for the allocator, the runtime and the legitimate traffic, in MiB.
const SLACK_MIB: u64 = 16;
/// How long each phase holds the pressure while the node's memory is sampled.
const HOLD_MS: u64 = 1_500;
/// How often the node's memory is sampled, and the legitimate client publishes.
const SAMPLE_MS: u64 = 20;
const PUBLISH_INTERVAL_MS: u64 = 100;

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// The node's resident memory, sampled until stopped: the peak since the last
/// [`Sampler::peak_since`].
struct Sampler {
    peak: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Sampler {
    fn start(pid: u32) -> Self {
        let peak = Arc::new(AtomicU64::new(0));
        let seen = Arc::clone(&peak);
        let task = tokio::spawn(async move {
            while let Some(rss) = rss_kib(pid) {
                seen.fetch_max(rss, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(SAMPLE_MS)).await;
            }
        });
        Self { peak, task }
    }

    /// The peak so far, and a fresh start.
    fn peak_since(&self) -> u64 {
        self.peak.swap(0, Ordering::SeqCst)
    }
}

/// A legitimate member publishing throughout: how many publishes committed, how
/// many did not, and the slowest, in ms.
#[derive(Default)]
struct Legit {
    committed: AtomicUsize,
    failed: AtomicUsize,
    slowest_ms: AtomicU64,
}

async fn publish_throughout(user: conclave::User<RemoteNode>, legit: Arc<Legit>) {
    let room = user.create_room(Policy::default()).await.expect("room");
    loop {
        let started = Instant::now();
        match user.publish(room, b"still served").await {
            Ok(Receipt::Committed { .. }) => legit.committed.fetch_add(1, Ordering::SeqCst),
            _ => legit.failed.fetch_add(1, Ordering::SeqCst),
        };
        let ms = started.elapsed().as_millis() as u64;
        legit.slowest_ms.fetch_max(ms, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(PUBLISH_INTERVAL_MS)).await;
    }
}

async fn hostile_user(admin: &conclave::User<RemoteNode>) -> Identity {
    let identity = Identity::generate(&mut rand_core::UnwrapErr(getrandom::SysRng));
    admin
        .add_user(&identity.public(), UserRole::Member)
        .await
        .expect("hostile user registered");
    identity
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_client_cannot_grow_the_node_past_its_limits() {
    let handshakes = std::env::var("CONCLAVE_HOSTILE_HANDSHAKES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(HANDSHAKES_DEFAULT);
    let (dir, _guard, _) = cluster_up(EXE, 1, 3);
    let file = ClusterFile::read(&dir.path().join("cluster")).expect("cluster.toml");
    let node = &file.node[0];
    let addr: SocketAddr = node.addr;
    let admin_identity = conclave::identity_file::load(&node.admin).expect("admin");
    let admin = RemoteNode::connect(&admin_identity, addr, None)
        .await
        .expect("admin connects");
    let hostile = hostile_user(&admin).await;
    let legit = Arc::new(Legit::default());
    let publisher = tokio::spawn(publish_throughout(admin.clone(), Arc::clone(&legit)));
    let sampler = Sampler::start(node.pid);
    tokio::time::sleep(Duration::from_millis(HOLD_MS)).await;
    let baseline = sampler.peak_since();

    // 1. Handshakes never finished.
    let flood = tokio::task::spawn_blocking(move || half_open_handshakes(addr, handshakes));
    let newcomer = RemoteNode::connect(&admin_identity, addr, None).await;
    let flood = flood.await.unwrap().expect("flood sent");
    tokio::time::sleep(Duration::from_millis(HOLD_MS)).await;
    let after_handshakes = sampler.peak_since();
    assert!(
        newcomer.is_ok(),
        "a new client during the flood: {newcomer:?}"
    );
    let newcomer = newcomer.unwrap();
    assert!(newcomer.list_users().await.is_ok());
    newcomer.node().close().await;

    // 2. One user pins what it can.
    let limit = conclave::client::CONNECTIONS_PER_USER_MAX;
    let pinned = pin_requests(&hostile, addr, limit, PIN_STREAMS, PIN_ANNOUNCE_BYTES).await;
    tokio::time::sleep(Duration::from_millis(HOLD_MS)).await;
    let after_pinning = sampler.peak_since();
    let (connections, streams, bytes) = (pinned.connections, pinned.streams, pinned.bytes);
    drop(pinned);
    publisher.abort();
    sampler.task.abort();

    let (committed, failed) = (
        legit.committed.load(Ordering::SeqCst),
        legit.failed.load(Ordering::SeqCst),
    );
    println!(
        "baseline RSS {:.1} MiB; {} half-open handshakes: the node answered {}, asked {} \
         for a Retry, peak RSS {:.1} MiB; one user: {connections} connections, {streams} \
         request streams, {:.1} MiB accepted, peak RSS {:.1} MiB; legitimate publishes: \
         {committed} committed, {failed} failed, slowest {} ms",
        mib(baseline),
        flood.sent,
        flood.answered,
        flood.retried,
        mib(after_handshakes),
        bytes as f64 / (1 << 20) as f64,
        mib(after_pinning),
        legit.slowest_ms.load(Ordering::SeqCst),
    );

    // What the limits allow: HANDSHAKES_IN_FLIGHT_MAX handshakes; one user's
    // connections with their windows and the per-user request budget.
    let handshake_kib = HANDSHAKES_IN_FLIGHT_MAX as u64 * HANDSHAKE_KIB;
    let windows = u64::from(CLIENT_RECEIVE_WINDOW_BYTES) + CLIENT_SEND_WINDOW_BYTES;
    let user_kib =
        (limit as u64 * windows + conclave::client::CLIENT_REQUEST_BYTES_PER_USER as u64) / 1024;
    let slack_kib = SLACK_MIB * 1024;
    assert!(flood.retried > 0, "no Retry asked: {flood:?}");
    assert!(flood.answered <= HANDSHAKES_IN_FLIGHT_MAX, "{flood:?}");
    assert!(
        after_handshakes <= baseline + handshake_kib + slack_kib,
        "handshakes grew the node from {baseline} KiB to {after_handshakes} KiB"
    );
    assert!(
        after_pinning <= baseline + user_kib + slack_kib,
        "one user grew the node from {baseline} KiB to {after_pinning} KiB"
    );
    assert!(
        committed > 0 && failed == 0,
        "legitimate publishes: {committed} committed, {failed} failed"
    );

    // Every refusal is counted by its reason.
    let (_, metrics) = conclave::observe::http_get(node.metrics, "/metrics")
        .await
        .expect("scrape");
    for series in [
        "conclave_transport_handshakes_total{result=\"retry\"}",
        "conclave_client_requests_refused_total{reason=\"busy\"}",
    ] {
        let count = metrics
            .lines()
            .find_map(|l| l.strip_prefix(series))
            .and_then(|v| v.trim().parse::<f64>().ok());
        assert!(count.is_some_and(|n| n > 0.0), "{series}: {count:?}");
    }
}

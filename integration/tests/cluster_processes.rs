//! The `conclave` binary as separate processes: `cluster up` with three nodes,
//! `check`, a node killed with SIGKILL in the middle of a `check --mode loop` run
//! and restarted from its data directory, and every node's `/metrics` (validated
//! with `promtool check metrics`) and `/healthz`.

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use conclave::observe::http_get;
use conclave::{ApiError, Denial, Identity, RemoteNode};
use conclave_cli::cluster::{ClusterFile, ClusterNode};
use conclave_integration::processes::{
    cluster_up, free_base_port, health, kill_and_wait_gone, restart_node, signal, wait_healthy,
};

const EXE: &str = env!("CARGO_BIN_EXE_conclave-it");

fn run(args: &[&str]) -> Output {
    Command::new(EXE)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run conclave")
}

/// The committed, queued and failed counts of a check's summary line.
fn summary(text: &str) -> (usize, usize, usize) {
    let line = text
        .lines()
        .find(|l| l.starts_with("published "))
        .unwrap_or_else(|| panic!("no summary in:\n{text}"));
    let numbers: Vec<usize> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect();
    // published N messages in S.s s: C committed, Q queued, F failed
    let n = numbers.len();
    (numbers[n - 3], numbers[n - 2], numbers[n - 1])
}

fn promtool_check(exposition: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|error| {
            panic!(
                "cannot run promtool ({error}): this test validates /metrics with it. Run the \
                 suite with scripts/test, which installs promtool (Debian's `prometheus` \
                 package) when it is missing"
            )
        });
    child
        .stdin
        .take()
        .unwrap()
        .write_all(exposition.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// How long [`slowloris`] waits for the server to cut it: far beyond the server's
/// header timeout (5 s).
const SLOWLORIS_WAIT_S: u64 = 30;

/// Sends half a request's headers to `addr` and waits for the server to close;
/// returns how long the connection was held (the whole wait if never closed).
async fn slowloris(addr: SocketAddr) -> Duration {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let started = Instant::now();
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: slow\r\n")
        .await
        .expect("write");
    let mut sink = Vec::new();
    let wait = Duration::from_secs(SLOWLORIS_WAIT_S);
    let _ = tokio::time::timeout(wait, stream.read_to_end(&mut sink)).await;
    started.elapsed()
}

/// Runs more `conclave` commands in a row as one user than the per-user limit:
/// each closes its connection as it exits, so all are served (and the node finds
/// none of their connections silent: checked on its metrics by the caller).
fn commands_close_their_connections(node0: &ClusterNode) {
    let client = [
        "--node",
        &node0.addr.to_string(),
        "--node-id",
        &node0.id,
        "--as",
        node0.admin.to_str().unwrap(),
    ]
    .map(String::from);
    let command = |args: &[&str]| {
        let out = Command::new(EXE)
            .args(args)
            .args(&client)
            .env("RUST_LOG", "warn")
            .output()
            .expect("run conclave");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{args:?}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        text
    };
    let room = command(&["room", "create"]).trim().to_string();
    for i in 0..2 * conclave::client::CONNECTIONS_PER_USER_MAX {
        let text = command(&["send", "--room", &room, &format!("one of many {i}")]);
        assert!(text.starts_with("committed #"), "{text}");
    }
}

/// Every node of `file` (a restarted one included) is healthy again, and its
/// exposition is valid and holds what the test made happen.
async fn every_node_is_healthy_and_its_metrics_valid(file: &ClusterFile) {
    // Every node (node1 restarted) is healthy again, and its exposition is valid.
    let deadline = Instant::now() + Duration::from_secs(30);
    for node in &file.node {
        loop {
            match health(node.metrics).await {
                Some(h) if h.ready && h.peers_connected == 2 => break,
                other => assert!(
                    Instant::now() < deadline,
                    "{} not healthy: {other:?}",
                    node.name
                ),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let (status, metrics) = http_get(node.metrics, "/metrics").await.expect("scrape");
        assert_eq!(status, 200);
        promtool_check(&metrics);
        assert!(
            metrics.contains("conclave_peers_connected"),
            "{}",
            node.name
        );
        assert!(
            metrics.contains("conclave_storage_commit_seconds_bucket"),
            "{}",
            node.name
        );
        assert!(!metrics.contains("quantile="), "histograms, not summaries");
    }
    let (_, node0) = http_get(file.node[0].metrics, "/metrics").await.unwrap();
    for expected in [
        "conclave_frames_committed_total",
        "conclave_frames_published_total",
        "conclave_publish_to_commit_seconds_bucket",
        "conclave_client_auth_failures_total{reason=\"not_found\"} 1",
        "conclave_active_actors{kind=\"room\"}",
    ] {
        assert!(node0.contains(expected), "node0 metrics lack {expected}");
    }
    for series in [
        "conclave_client_connections_silent_total ",
        "conclave_client_auth_failures_total{reason=\"limit\"} ",
    ] {
        let counted = node0.lines().find(|l| l.starts_with(series));
        assert!(
            counted.is_none_or(|l| l.ends_with(" 0")),
            "node0: {counted:?}"
        );
    }
    let (_, node2) = http_get(file.node[2].metrics, "/metrics").await.unwrap();
    for expected in [
        "conclave_frames_delivered_total",
        "conclave_commit_to_deliver_seconds_bucket",
    ] {
        assert!(node2.contains(expected), "node2 metrics lack {expected}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_up_check_kill_restart_and_scrape() {
    let (dir, mut guard, table) = cluster_up(EXE, 3, 0);
    let cluster_dir = dir.path().join("cluster");
    assert!(table.len() >= 4, "status table: {table:?}");
    let file = ClusterFile::read(&cluster_dir).expect("cluster.toml");
    assert_eq!(file.node.len(), 3);
    for node in &file.node {
        let h = health(node.metrics).await.expect("healthz answers");
        assert!(h.ready && h.tls);
        assert_eq!(h.peers_known, 2);
        assert_eq!(h.node_id, node.id);
    }

    // The end-to-end check.
    let cluster_arg = cluster_dir.to_str().unwrap();
    let out = run(&["check", "--cluster", cluster_arg, "--messages", "60"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "check failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("OK: every member decrypted every committed message exactly once"),
        "{text}"
    );

    // Meanwhile, a client trickles a request's headers to node0's metrics server.
    let slowloris = tokio::spawn(slowloris(file.node[0].metrics));

    // Loop mode; node1 is killed with SIGKILL in the middle and restarted.
    let looping = Command::new(EXE)
        .args([
            "check",
            "--cluster",
            cluster_arg,
            "--mode",
            "loop",
            "--duration",
            "16",
            "--interval",
            "40",
            "--settle",
            "60",
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("check loop");
    tokio::time::sleep(Duration::from_secs(5)).await;
    signal(file.node[1].pid, nix::sys::signal::Signal::SIGKILL);
    tokio::time::sleep(Duration::from_secs(3)).await;
    guard.others.push(restart_node(EXE, &file.node[1].args));
    let out = tokio::task::spawn_blocking(move || looping.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "loop check failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("OK: every member decrypted every committed message exactly once"),
        "{text}"
    );
    // The kill was felt: publishing through node1 failed or was queued meanwhile.
    let (committed, queued, failed) = summary(&text);
    assert!(committed >= 40, "{text}");
    assert!(queued + failed > 0, "the kill was not seen:\n{text}");
    for line in text.lines().filter(|l| l.contains("delivered twice")) {
        assert!(
            line.contains("missing 0 committed") && line.contains(" 0 delivered twice"),
            "{line}"
        );
    }

    let held = slowloris.await.unwrap();
    assert!(
        held < Duration::from_secs(SLOWLORIS_WAIT_S),
        "the metrics server held a connection without headers for {held:?}"
    );

    // A client the registry does not know is refused with not_found, and counted.
    let stranger = Identity::generate(&mut rand_core::UnwrapErr(getrandom::SysRng));
    match RemoteNode::connect(&stranger, file.node[0].addr, None).await {
        Err(ApiError::Denied(Denial::NotFound { .. })) => {}
        other => panic!("expected not_found, got {other:?}"),
    }

    commands_close_their_connections(&file.node[0]);

    every_node_is_healthy_and_its_metrics_valid(&file).await;

    // The cluster stops its nodes cleanly on SIGINT.
    let mut up = guard.up.take().unwrap();
    signal(up.id(), nix::sys::signal::Signal::SIGINT);
    let status = tokio::task::spawn_blocking(move || up.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "cluster up exited with {status}");
    for restarted in &guard.others {
        signal(restarted.id(), nix::sys::signal::Signal::SIGTERM);
    }
    for child in &mut guard.others {
        let status = child.wait().unwrap();
        assert!(status.success(), "restarted node exited with {status}");
    }
    guard.others.clear();
}

/// The README's main command, `conclave demo`, run to the end (`--exit`).
#[test]
fn the_demo_shows_every_member_decrypting_the_conversation() {
    let dir = tempfile::tempdir().unwrap();
    let base = free_base_port(1).to_string();
    let out = run(&[
        "demo",
        "--dir",
        dir.path().join("demo").to_str().unwrap(),
        "--base-port",
        &base,
        "--exit",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for member in ["alice on node0:", "bob on node1:", "carol on node2:"] {
        let at = text
            .find(member)
            .unwrap_or_else(|| panic!("{member} missing:\n{text}"));
        let lines: Vec<_> = text[at..].lines().skip(1).take(5).collect();
        assert_eq!(lines.len(), 5, "{member}");
        for (i, line) in lines.iter().enumerate() {
            assert!(
                line.starts_with(&format!("  #{} ", i + 1)),
                "{member}: {line}"
            );
        }
    }
    assert!(text.contains("/metrics"), "{text}");
    assert!(text.contains(" send --node "), "{text}");
}

/// How many times [`a_subscriber_is_receiving_again_soon_after_its_node_is_killed_and_restarted`]
/// kills the subscriber's node.
const KILLS: usize = 5;
/// The bound the test asserts on the time from a restarted node answering
/// `/healthz` to its subscriber receiving again: generous (the target is 2 s; a
/// subscriber that waits for the idle timeout takes 10 s, one that does not
/// resume never receives).
const RECEIVING_AGAIN_S_MAX: u64 = 6;
/// How often the publisher publishes.
const PUBLISH_INTERVAL_MS: u64 = 50;

/// A member `user` of a fresh room homed on node0, with `bob` on node1: both
/// registered by the nodes' admins (whose connections are closed).
async fn two_members(
    file: &ClusterFile,
) -> (conclave::User<RemoteNode>, Identity, conclave::RoomId) {
    let mut members = Vec::new();
    for node in &file.node {
        let admin = conclave::identity_file::load(&node.admin).expect("admin identity");
        let admin = RemoteNode::connect(&admin, node.addr, Some(node.node_id().unwrap()))
            .await
            .expect("admin connects");
        let identity = Identity::generate(&mut rand_core::UnwrapErr(getrandom::SysRng));
        admin
            .add_user(&identity.public(), conclave::UserRole::Member)
            .await
            .expect("user added");
        admin.node().close().await;
        members.push(identity);
    }
    let (alice, bob) = (members.remove(0), members.remove(0));
    let alice = RemoteNode::connect(&alice, file.node[0].addr, None)
        .await
        .expect("alice connects");
    let room = alice
        .create_room(conclave::Policy::default())
        .await
        .expect("room");
    let node1 = file.node[1].node_id().unwrap();
    alice
        .invite(room, &bob.public(), node1, conclave::RoomRole::Member)
        .await
        .expect("invite");
    (alice, bob, room)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_is_receiving_again_soon_after_its_node_is_killed_and_restarted() {
    let (dir, mut guard, _) = cluster_up(EXE, 2, 2);
    let file = ClusterFile::read(&dir.path().join("cluster")).expect("cluster.toml");
    let (alice, bob, room) = two_members(&file).await;
    // Bob reads on node1, through one subscription for the whole test.
    let bob = RemoteNode::connect(&bob, file.node[1].addr, None)
        .await
        .expect("bob connects");
    let mut sub = bob
        .subscribe(room, conclave::Position::Start)
        .await
        .expect("subscribe");
    let (received, mut arrivals) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(message) = sub.next().await {
            if let Ok(message) = message {
                let _ = received.send(message.seq);
            }
        }
    });
    // Alice publishes on node0 throughout.
    let publisher = tokio::spawn(async move {
        for i in 0u64.. {
            let _ = alice.publish(room, format!("m{i}").as_bytes()).await;
            tokio::time::sleep(Duration::from_millis(PUBLISH_INTERVAL_MS)).await;
        }
    });
    tokio::time::timeout(Duration::from_secs(30), arrivals.recv())
        .await
        .expect("bob receives before any kill");

    let mut pid = file.node[1].pid;
    let mut waits = Vec::new();
    for _ in 0..KILLS {
        kill_and_wait_gone(pid, file.node[1].addr);
        let restarted = restart_node(EXE, &file.node[1].args);
        pid = restarted.id();
        guard.others.push(restarted);
        wait_healthy(file.node[1].metrics).await;
        let ready = Instant::now();
        while arrivals.try_recv().is_ok() {}
        let bound = Duration::from_secs(RECEIVING_AGAIN_S_MAX);
        tokio::time::timeout(bound, arrivals.recv())
            .await
            .unwrap_or_else(|_| panic!("bob received nothing {bound:?} after node1 was back"))
            .expect("bob's subscription is still open");
        waits.push(ready.elapsed());
    }
    publisher.abort();
    waits.sort();
    println!(
        "receiving again after a restart: median {:?}, worst {:?} ({KILLS} kills)",
        waits[KILLS / 2],
        waits[KILLS - 1]
    );
}

//! Running `conclave` as processes, for the tests that do: free ports, `cluster
//! up`, signals, health, and a guard that stops what a test started even when it
//! fails. The executable is the caller's (`CARGO_BIN_EXE_conclave-it`).

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use conclave::observe::{http_get, Health};

/// A base port P such that P..P+3 (UDP and TCP) and P+100..P+103 (TCP) are free now.
pub fn free_base_port(salt: u16) -> u16 {
    let seed = (std::process::id() as u16).wrapping_add(salt.wrapping_mul(4099));
    for attempt in 0..200u16 {
        let base = 20_000 + (seed.wrapping_add(attempt.wrapping_mul(7919)) % 20_000);
        let free = (0..3).all(|i| {
            UdpSocket::bind(("127.0.0.1", base + i)).is_ok()
                && TcpListener::bind(("127.0.0.1", base + 100 + i)).is_ok()
        });
        if free {
            return base;
        }
    }
    panic!("no free port range found");
}

/// Stops the cluster (SIGINT to `cluster up`, which stops its nodes) and kills a
/// restarted node, even when the test fails.
pub struct Guard {
    /// The `cluster up` process.
    pub up: Option<Child>,
    /// Nodes the test started itself (restarted ones).
    pub others: Vec<Child>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(mut up) = self.up.take() {
            signal(up.id(), nix::sys::signal::Signal::SIGINT);
            let deadline = Instant::now() + Duration::from_secs(20);
            while up.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = up.kill();
            let _ = up.wait();
        }
        for child in &mut self.others {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Sends `signal` to process `pid`.
pub fn signal(pid: u32, signal: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal).expect("signal");
}

/// Kills process `pid` (SIGKILL) and waits until it has let go of its UDP address
/// `listen` (an exiting process closes its sockets and its data directory's lock
/// together): a node started again at once, on a loaded machine, could otherwise
/// find both still held and exit.
pub fn kill_and_wait_gone(pid: u32, listen: SocketAddr) {
    signal(pid, nix::sys::signal::Signal::SIGKILL);
    let deadline = Instant::now() + Duration::from_secs(10);
    while UdpSocket::bind(listen).is_err() {
        assert!(
            Instant::now() < deadline,
            "process {pid} still holds {listen}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// What `addr`'s `/healthz` says, if it answers.
pub async fn health(addr: SocketAddr) -> Option<Health> {
    let (status, body) = http_get(addr, "/healthz").await.ok()?;
    assert!(status == 200 || status == 503, "healthz status {status}");
    Some(serde_json::from_str(&body).expect("healthz is JSON"))
}

/// `conclave cluster up` with `nodes` nodes in a fresh directory, once it says it
/// is running: the directory, the guard that stops it, its status table.
pub fn cluster_up(exe: &str, nodes: usize, salt: u16) -> (tempfile::TempDir, Guard, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let cluster_dir = dir.path().join("cluster");
    let base = free_base_port(salt).to_string();
    let up = Command::new(exe)
        .args(["cluster", "up", "--nodes", &nodes.to_string(), "--dir"])
        .arg(&cluster_dir)
        .args(["--base-port", &base])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .expect("cluster up");
    let mut guard = Guard {
        up: Some(up),
        others: Vec::new(),
    };
    let stdout = guard.up.as_mut().unwrap().stdout.take().unwrap();
    // Wait for the status table and "cluster running".
    let mut lines = BufReader::new(stdout).lines();
    let mut table = Vec::new();
    for line in lines.by_ref() {
        let line = line.expect("cluster up output");
        if line.contains("cluster running") {
            break;
        }
        table.push(line);
    }
    (dir, guard, table)
}

/// Waits until `addr`'s `/healthz` says ready.
pub async fn wait_healthy(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !health(addr).await.is_some_and(|h| h.ready) {
        assert!(Instant::now() < deadline, "{addr} never became ready");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Starts a node process again with the arguments it was first started with
/// (`args`, from `cluster.toml`); its output is dropped.
pub fn restart_node(exe: &str, args: &[String]) -> Child {
    Command::new(exe)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("restart a node")
}

//! Client commands pin the node: the `conclave` command line (as a process)
//! remembers the node it first met at an address, beside the identity file, and
//! refuses another node at that address, sending it nothing, unless `--node-id`
//! names the new node.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use conclave::{identity_file, Identity, Node, NodeId, RemoteNode, UserId};

const EXE: &str = env!("CARGO_BIN_EXE_conclave-it");
/// How long a node may take to bind an address its predecessor just released.
const REBIND_WAIT_MS: u64 = 5_000;
/// How long one command of the command line may run.
const COMMAND_WAIT_MS: u64 = 60_000;

/// Runs the command line and waits for it, off the runtime's worker threads.
async fn cli(args: Vec<String>) -> Output {
    let run = tokio::task::spawn_blocking(move || {
        Command::new(EXE)
            .args(&args)
            .env("RUST_LOG", "warn")
            .output()
            .expect("run conclave")
    });
    tokio::time::timeout(Duration::from_millis(COMMAND_WAIT_MS), run)
        .await
        .expect("the command finished in time")
        .expect("the command's thread")
}

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `--node ADDR --as FILE`, then `rest`.
fn client(command: &[&str], addr: SocketAddr, identity: &Path, rest: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = command.iter().map(|s| s.to_string()).collect();
    args.extend(["--node".into(), addr.to_string(), "--as".into()]);
    args.push(identity.display().to_string());
    args.extend(rest.iter().map(|s| s.to_string()));
    args
}

/// A node on `addr` (the address its predecessor just gave up), with `admin`
/// seeded as its admin.
async fn start_node(data: &Path, addr: SocketAddr, admin: &Identity) -> Node {
    let deadline = Instant::now() + Duration::from_millis(REBIND_WAIT_MS);
    let node = loop {
        match Node::builder().data_dir(data).listen(addr).start().await {
            Ok(node) => break node,
            Err(error) if Instant::now() < deadline => {
                eprintln!("retrying to listen on {addr}: {error}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(error) => panic!("cannot listen on {addr}: {error}"),
        }
    };
    node.seed_admin(&admin.public()).expect("seed the admin");
    node
}

/// The users of the node at `addr`, asked by `admin` through a connection pinned
/// to `node` (not through the command line under test).
async fn users_of(admin: &Identity, addr: SocketAddr, node: NodeId) -> Vec<UserId> {
    let user = RemoteNode::connect(admin, addr, Some(node))
        .await
        .expect("the admin connects");
    let users = user.list_users().await.expect("list users");
    users.iter().map(|u| UserId(u.user.signing)).collect()
}

/// `conclave user new --out FILE`: the new user's id and public key.
async fn new_user(file: &Path) -> (UserId, String) {
    let out = cli(vec![
        "user".into(),
        "new".into(),
        "--out".into(),
        file.display().to_string(),
    ])
    .await;
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let field = |name: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name:?} in {stdout}"))
            .trim()
            .to_string()
    };
    (field("user ").parse().expect("user id"), field("public "))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_different_node_at_a_pinned_address_is_refused_unless_named_with_node_id() {
    let dir = tempfile::tempdir().unwrap();
    let alice_file = dir.path().join("alice.id");
    let alice = Identity::generate(&mut rand_core::UnwrapErr(getrandom::SysRng));
    identity_file::write_new(&alice_file, &alice).unwrap();
    let pins: PathBuf = dir.path().join("alice.id.nodes");
    let (bob, bob_public) = new_user(&dir.path().join("bob.id")).await;

    // First contact with node A: trusted, and remembered beside the identity file.
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let node_a = start_node(&dir.path().join("a"), any, &alice).await;
    let addr = node_a.local_addr().expect("A listens");
    let a = node_a.id();
    let out = cli(client(&["user", "list"], addr, &alice_file, &[])).await;
    assert!(out.status.success(), "{}", text(&out));
    let remembered = std::fs::read_to_string(&pins).expect("the pins file exists");
    assert!(remembered.contains(&format!("{addr} {a}")), "{remembered}");
    node_a.shutdown().await;

    // Node B, another identity, on the same address, where alice is an admin too:
    // without the pin the command line would happily add bob through it.
    let node_b = start_node(&dir.path().join("b"), addr, &alice).await;
    let b = node_b.id();
    assert_ne!(a, b);
    let add_bob = client(
        &["user", "add"],
        addr,
        &alice_file,
        &["--public", &bob_public],
    );
    let out = cli(add_bob.clone()).await;
    assert!(!out.status.success(), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for part in [
        addr.to_string(),
        a.to_string(),
        b.to_string(),
        pins.display().to_string(),
    ] {
        assert!(
            stderr.contains(&part),
            "the refusal does not name {part}:\n{stderr}"
        );
    }
    assert!(
        !users_of(&alice, addr, b).await.contains(&bob),
        "nothing was sent to B"
    );
    assert_eq!(
        std::fs::read_to_string(&pins).unwrap(),
        remembered,
        "pin unchanged"
    );

    // --node-id must match the node: A's id is refused at B.
    let mut wrong = add_bob.clone();
    wrong.extend(["--node-id".into(), a.to_string()]);
    let out = cli(wrong).await;
    assert!(!out.status.success(), "{}", text(&out));
    assert!(!users_of(&alice, addr, b).await.contains(&bob));

    // Named with --node-id, B is used, and pinned from now on.
    let mut named = add_bob;
    named.extend(["--node-id".into(), b.to_string()]);
    let out = cli(named).await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(users_of(&alice, addr, b).await.contains(&bob));
    let repinned = std::fs::read_to_string(&pins).unwrap();
    assert!(repinned.contains(&format!("{addr} {b}")), "{repinned}");
    assert!(!repinned.contains(&a.to_string()), "{repinned}");
    let out = cli(client(&["user", "list"], addr, &alice_file, &[])).await;
    assert!(out.status.success(), "{}", text(&out));
    node_b.shutdown().await;
}

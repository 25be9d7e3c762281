//! Three conclave nodes in one process over real QUIC and LMDB, used through the
//! embedding API.

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use conclave::{
    ApiError, Asked, Denial, Identity, Message, Node, NodeId, Outcome, Policy, Position, Receipt,
    RoomRole, UserRole,
};
use conclave_actors::domain::DomainConfig;
use conclave_actors::ids::{Epoch, RoomId, Seq};

/// How many times a node start is tried before the test fails.
const START_ATTEMPTS_MAX: u32 = 20;
/// The pause between two start attempts.
const START_RETRY_MS: u64 = 100;

/// A loopback UDP port that was free a moment ago.
fn free_port() -> SocketAddr {
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
    socket.local_addr().expect("addr")
}

struct Cluster {
    dir: tempfile::TempDir,
    ids: Vec<NodeId>,
    addrs: Vec<SocketAddr>,
    nodes: Vec<Option<Node>>,
    /// How long a publish waits for the room's home once forwarded (a call: up to
    /// its request timeout, the default unless `calls_wait`).
    wait: Duration,
    calls_wait: bool,
    /// A node whose store is small (and its bound).
    small: Option<(usize, usize)>,
}

impl Cluster {
    async fn start(n: usize) -> Self {
        Self::start_with(n, Duration::from_secs(5), true, None).await
    }

    async fn start_with(
        n: usize,
        wait: Duration,
        calls_wait: bool,
        small: Option<(usize, usize)>,
    ) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut ids = Vec::new();
        for i in 0..n {
            let data = dir.path().join(format!("n{i}"));
            std::fs::create_dir_all(&data).unwrap();
            let (identity, _) =
                conclave::identity_file::load_or_create(&data.join("node.id")).unwrap();
            ids.push(identity.node_id());
        }
        let addrs = (0..n).map(|_| free_port()).collect();
        let mut cluster = Self {
            dir,
            ids,
            addrs,
            nodes: (0..n).map(|_| None).collect(),
            wait,
            calls_wait,
            small,
        };
        for i in 0..n {
            cluster.up(i).await;
        }
        cluster
    }

    /// Starts node `i` on its address and data directory. A restart right after a
    /// shutdown can find the UDP port still held for a moment (or taken by another
    /// test's ephemeral bind), so a failed start is retried a bounded number of
    /// times before the test fails with the last error.
    async fn up(&mut self, i: usize) {
        for attempt in 1..=START_ATTEMPTS_MAX {
            match self.builder(i).start().await {
                Ok(node) => {
                    self.nodes[i] = Some(node);
                    return;
                }
                Err(error) if attempt < START_ATTEMPTS_MAX => {
                    eprintln!("node {i} did not start (attempt {attempt}): {error}; retrying");
                    tokio::time::sleep(Duration::from_millis(START_RETRY_MS)).await;
                }
                Err(error) => panic!("node {i} did not start: {error}"),
            }
        }
    }

    fn builder(&self, i: usize) -> conclave::NodeBuilder {
        let mut builder = Node::builder()
            .data_dir(self.dir.path().join(format!("n{i}")))
            .listen(self.addrs[i])
            .domain_config(DomainConfig {
                retry_base: Duration::from_millis(50),
                retry_max: Duration::from_millis(500),
                idle: Duration::from_secs(30),
                ..DomainConfig::default()
            })
            .commit_wait(self.wait);
        if self.calls_wait {
            builder = builder.request_timeout(self.wait);
        }
        if let Some((_, bytes)) = self.small.filter(|(j, _)| *j == i) {
            builder = builder.store_bytes_max(bytes);
        }
        for j in 0..self.ids.len() {
            if j != i {
                builder = builder.peer(self.ids[j], self.addrs[j]);
            }
        }
        builder
    }

    async fn down(&mut self, i: usize) {
        if let Some(node) = self.nodes[i].take() {
            node.shutdown().await;
        }
    }

    fn node(&self, i: usize) -> &Node {
        self.nodes[i].as_ref().expect("node is up")
    }

    /// A new member user on node `i`, added by that node's seeded admin.
    async fn user(&self, i: usize) -> (Identity, conclave::User) {
        let node = self.node(i);
        let admin = Identity::generate(&mut rng());
        node.seed_admin(&admin.public()).expect("seed admin");
        let admin = node.user(admin).await.expect("admin");
        let identity = Identity::generate(&mut rng());
        admin
            .add_user(&identity.public(), UserRole::Member)
            .await
            .expect("add user");
        let user = node.user(identity.clone()).await.expect("user");
        (identity, user)
    }
}

fn rng() -> rand_core::UnwrapErr<getrandom::SysRng> {
    rand_core::UnwrapErr(getrandom::SysRng)
}

async fn take(sub: &mut conclave::Subscription, n: usize) -> Vec<Message> {
    let mut out = Vec::new();
    while out.len() < n {
        let next = tokio::time::timeout(Duration::from_secs(20), sub.next())
            .await
            .unwrap_or_else(|_| panic!("only {} of {n} messages arrived", out.len()));
        out.push(next.expect("stream open").expect("message opens"));
    }
    out
}

fn committed(receipt: Receipt) -> Seq {
    match receipt {
        Receipt::Committed { seq, .. } => seq,
        Receipt::Queued { .. } => panic!("expected a commit, got queued"),
    }
}

/// A room of alice's (home: node 0) with bob (node 1) and carol (node 2).
async fn room(c: &Cluster) -> (RoomId, [conclave::User; 3]) {
    let (_, alice) = c.user(0).await;
    let (_, bob) = c.user(1).await;
    let (_, carol) = c.user(2).await;
    let room = alice.create_room(Policy::default()).await.expect("create");
    alice
        .invite(room, &bob.public(), c.ids[1], RoomRole::Member)
        .await
        .expect("invite bob");
    alice
        .invite(room, &carol.public(), c.ids[2], RoomRole::Member)
        .await
        .expect("invite carol");
    (room, [alice, bob, carol])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn golden_flow_over_quic_history_then_live_in_one_order() {
    let c = Cluster::start(3).await;
    let (room, [alice, bob, carol]) = room(&c).await;
    let mut bob_sub = bob
        .subscribe(room, Position::Start)
        .await
        .expect("subscribe");

    // History: ten messages before carol subscribes.
    for i in 0..10 {
        committed(
            alice
                .publish(room, format!("history {i}").as_bytes())
                .await
                .expect("publish"),
        );
    }
    let mut carol_sub = carol
        .subscribe(room, Position::Start)
        .await
        .expect("subscribe");
    // Live: all three publish concurrently.
    let mut tasks = Vec::new();
    for (who, user) in [
        ("alice", alice.clone()),
        ("bob", bob.clone()),
        ("carol", carol.clone()),
    ] {
        tasks.push(tokio::spawn(async move {
            for i in 0..10 {
                committed(
                    user.publish(room, format!("{who} {i}").as_bytes())
                        .await
                        .expect("publish"),
                );
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut alice_sub = alice
        .subscribe(room, Position::Start)
        .await
        .expect("subscribe");
    let a = take(&mut alice_sub, 40).await;
    let b = take(&mut bob_sub, 40).await;
    let cc = take(&mut carol_sub, 40).await;
    let view = |m: &[Message]| {
        m.iter()
            .map(|m| (m.seq, m.sender, m.body.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(view(&a), view(&b));
    assert_eq!(view(&a), view(&cc));
    let seqs: Vec<u64> = a.iter().map(|m| m.seq.0).collect();
    assert_eq!(seqs, (1..=40).collect::<Vec<_>>());
    assert_eq!(a[0].body, b"history 0");
    for who in ["alice", "bob", "carol"] {
        let mine: Vec<_> = a
            .iter()
            .filter(|m| m.body.starts_with(who.as_bytes()))
            .map(|m| m.body.clone())
            .collect();
        let expected: Vec<_> = (0..10).map(|i| format!("{who} {i}").into_bytes()).collect();
        assert_eq!(mine, expected, "{who}'s messages in the order sent");
    }
    for i in 0..3 {
        c.node(i).shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removal_rekeys_and_the_removed_node_gets_nothing_later() {
    let c = Cluster::start(3).await;
    let (room, [alice, bob, carol]) = room(&c).await;
    committed(alice.publish(room, b"before").await.unwrap());
    let mut carol_sub = carol.subscribe(room, Position::Start).await.unwrap();
    assert_eq!(take(&mut carol_sub, 1).await[0].body, b"before");

    alice.remove(room, carol.id()).await.expect("remove");
    let mut bob_sub = bob.subscribe(room, Position::Start).await.unwrap();
    committed(alice.publish(room, b"after 1").await.unwrap());
    committed(bob.publish(room, b"after 2").await.unwrap());
    let b = take(&mut bob_sub, 3).await;
    assert_eq!(b[1].epoch, Epoch(2));
    assert_eq!(b[2].body, b"after 2");

    // Carol's node holds no frame and no key of epoch 2; her stream ends.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let frames = c.node(2).stored_frames(room, Seq(1), 100).unwrap();
    assert_eq!(frames.len(), 1);
    assert!(frames.iter().all(|(_, f)| f.epoch == Epoch(1)));
    let epochs = c.node(2).stored_key_epochs(room, carol.id()).unwrap();
    assert_eq!(epochs, vec![Epoch(1)]);
    let end = tokio::time::timeout(Duration::from_secs(5), carol_sub.next())
        .await
        .expect("stream ends");
    assert!(end.is_none(), "carol's stream ends after her last message");
    // Carol can no longer publish.
    match carol.publish(room, b"still here?").await {
        Err(ApiError::Denied(Denial::NotAMember)) => {}
        other => panic!("expected not_a_member, got {other:?}"),
    }
    for i in 0..3 {
        c.node(i).shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarted_on_its_data_dir_loses_nothing_and_delivers_nothing_twice() {
    let mut c = Cluster::start(3).await;
    let (room, [alice, bob, _carol]) = room(&c).await;
    for i in 0..5 {
        committed(
            alice
                .publish(room, format!("m{i}").as_bytes())
                .await
                .unwrap(),
        );
    }
    // Bob's node goes down; alice goes on publishing.
    let bob_identity = {
        // The handle's identity lives on: make a new handle after the restart.
        bob.clone()
    };
    c.down(1).await;
    for i in 5..15 {
        committed(
            alice
                .publish(room, format!("m{i}").as_bytes())
                .await
                .unwrap(),
        );
    }
    c.up(1).await;
    let bob = c
        .node(1)
        .user(identity_of(&bob_identity))
        .await
        .expect("bob after restart");
    let mut sub = bob.subscribe(room, Position::Start).await.unwrap();
    let got = take(&mut sub, 15).await;
    let bodies: Vec<_> = got.iter().map(|m| m.body.clone()).collect();
    assert_eq!(
        bodies,
        (0..15)
            .map(|i| format!("m{i}").into_bytes())
            .collect::<Vec<_>>()
    );
    let seqs: Vec<u64> = got.iter().map(|m| m.seq.0).collect();
    assert_eq!(seqs, (1..=15).collect::<Vec<_>>());

    // The home restarts: every committed frame is still there, and sequencing goes on.
    let alice_identity = identity_of(&alice);
    c.down(0).await;
    c.up(0).await;
    let alice = c.node(0).user(alice_identity).await.unwrap();
    assert_eq!(
        committed(alice.publish(room, b"m15").await.unwrap()),
        Seq(16)
    );
    let got = take(&mut sub, 1).await;
    assert_eq!(got[0].body, b"m15");
    // Nothing more: no duplicate shows up.
    let extra = tokio::time::timeout(Duration::from_millis(500), sub.next()).await;
    assert!(extra.is_err(), "a message arrived twice: {:?}", extra.ok());
    assert_eq!(
        c.node(1).stored_frames(room, Seq(1), 100).unwrap().len(),
        16
    );
    for i in 0..3 {
        c.node(i).shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_while_the_home_is_down_is_queued_and_commits_when_it_returns() {
    let mut c = Cluster::start(3).await;
    let (room, [alice, bob, carol]) = room(&c).await;
    let alice_identity = identity_of(&alice);
    c.down(0).await;
    let receipt = bob.publish(room, b"while the home is down").await.unwrap();
    assert!(matches!(receipt, Receipt::Queued { .. }), "{receipt:?}");
    c.up(0).await;
    let _alice = c.node(0).user(alice_identity).await.unwrap();
    let mut sub = carol.subscribe(room, Position::Start).await.unwrap();
    let got = take(&mut sub, 1).await;
    assert_eq!(got[0].body, b"while the home is down");
    assert_eq!(got[0].sender, bob.id());
    for i in 0..3 {
        c.node(i).shutdown().await;
    }
}

/// What became of `asked` as `user`'s node reports it, once it is decided (or
/// `None` after 20 s).
async fn decided<B: conclave::Backend>(
    user: &conclave::User<B>,
    room: RoomId,
    asked: Asked,
) -> Option<Outcome> {
    for _ in 0..200 {
        if let Some(outcome) = user.outcome(room, asked).await.expect("outcome") {
            return Some(outcome);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_was_queued_while_the_home_was_down_reports_its_outcome_later() {
    let mut c = Cluster::start_with(3, Duration::from_secs(1), true, None).await;
    let (room, [alice, bob, _carol]) = room(&c).await;
    let alice_identity = identity_of(&alice);
    // Bob's rekey follows the chain his node holds: let carol's invite reach it.
    for _ in 0..100 {
        if bob.members(room).await.is_ok_and(|m| m.len() == 3) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    c.down(0).await;
    // Bob's node queues, in order: a frame, a rekey, and a frame sealed with the
    // key the rekey replaces (the home will refuse it).
    let Receipt::Queued { id: first } = bob.publish(room, b"first").await.unwrap() else {
        panic!("not queued");
    };
    let rekey = match bob.rekey(room).await {
        Err(ApiError::Queued { room: r, asked }) if r == room => asked,
        other => panic!("the rekey was not queued: {other:?}"),
    };
    let Receipt::Queued { id: stale } = bob.publish(room, b"stale").await.unwrap() else {
        panic!("not queued");
    };
    assert_eq!(
        bob.outcome(room, Asked::Frame { id: first }).await.unwrap(),
        None
    );
    c.up(0).await;
    let _alice = c.node(0).user(alice_identity).await.unwrap();
    // Asked through the node in process and through the client protocol.
    let bob_remote = conclave::RemoteNode::connect(&identity_of(&bob), c.addrs[1], Some(c.ids[1]))
        .await
        .expect("connect");
    let Some(Outcome::Committed { id, seq }) =
        decided(&bob, room, Asked::Frame { id: first }).await
    else {
        panic!("the first frame was not reported committed");
    };
    assert_eq!((id, seq), (first, Seq(1)));
    assert_eq!(decided(&bob_remote, room, rekey).await, Some(Outcome::Done));
    let refused = Outcome::Denied(Denial::StaleEpoch {
        current: Epoch(2),
        got: Epoch(1),
    });
    let stale = Asked::Frame { id: stale };
    assert_eq!(
        decided(&bob_remote, room, stale).await,
        Some(refused.clone())
    );
    assert_eq!(decided(&bob, room, stale).await, Some(refused));
    bob_remote.node().close().await;
    for i in 0..3 {
        c.node(i).shutdown().await;
    }
}

/// Bob's node, whose store fills up, refuses new work with `store_full` and says
/// so in its health, and still sends what it queued: the reserve it keeps lets
/// the acknowledgements delete it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_store_refuses_new_work_with_its_reason_and_still_drains_its_outbox() {
    const STORE_BYTES: usize = 4 << 20;
    const PUBLISHES_MAX: usize = 1_000;
    let wait = Duration::from_millis(50);
    let mut c = Cluster::start_with(3, wait, false, Some((1, STORE_BYTES))).await;
    let (room, [alice, bob, carol]) = room(&c).await;
    let alice_identity = identity_of(&alice);
    c.down(0).await;
    let body = vec![b'x'; 64 << 10];
    let mut queued = 0;
    let refused = loop {
        assert!(
            queued < PUBLISHES_MAX,
            "a {STORE_BYTES}-byte store never filled"
        );
        match bob.publish(room, &body).await {
            Ok(Receipt::Queued { .. }) => queued += 1,
            Ok(receipt) => panic!("committed with the home down: {receipt:?}"),
            Err(error) => break error,
        }
    };
    assert!(
        matches!(refused, ApiError::Denied(Denial::StoreFull { .. })),
        "{refused}"
    );
    let health = c.node(1).health();
    assert!(!health.ready, "{health:?}");
    let failure = health.failure.unwrap_or_default();
    assert!(failure.starts_with("store_full"), "{failure}");
    // The home is back: everything bob's node queued reaches it.
    c.up(0).await;
    let _alice = c.node(0).user(alice_identity).await.unwrap();
    let mut sub = carol.subscribe(room, Position::Start).await.unwrap();
    let got = take(&mut sub, queued).await;
    assert!(got.iter().all(|m| m.sender == bob.id() && m.body == body));
    for i in 0..3 {
        c.node(i).shutdown().await;
    }
}

fn identity_of(user: &conclave::User) -> Identity {
    user.identity().clone()
}

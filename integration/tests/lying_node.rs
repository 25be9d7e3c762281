//! A node that lies. Two honest nodes over real QUIC and LMDB (A homes the rooms,
//! B is a member node); then each node in turn is stopped and its own store is
//! made to lie, as a malicious operator could: epoch keys sealed by an identity
//! the node controls, a key for an epoch no member started, a key that is not the
//! one the chain pins, chain links no member signed, a member's X25519 key
//! swapped for one the node holds, a room claiming another node's room id. No
//! client accepts any of it; each refusal has its reason and is counted in
//! `conclave_client_refusals_total{reason}`; honest members keep talking.

use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use conclave::{ApiError, Denial, Identity, Node, NodeId, Policy, Position, RoomRole, UserRole};
use conclave_actors::crypto::{open_epoch_key, seal_epoch_key, EpochKey};
use conclave_actors::domain::chain::{Change, KeyCheck, Link, SignedLink, Signer};
use conclave_actors::domain::state::{keys, rooms};
use conclave_actors::domain::{client, DomainConfig, Invitee, Op, Outcome};
use conclave_actors::ids::{Epoch, RoomId, Seq, UserId};
use conclave_actors::Time;
use conclave_storage::{StoreError, WriteTxn};

/// How many times a node start is tried before the test fails (a restarted node
/// can find its UDP port held for a moment).
const START_ATTEMPTS_MAX: u32 = 20;
/// The pause between two start attempts.
const START_RETRY_MS: u64 = 100;
/// How long a step waits for what an honest node delivers.
const DELIVERY_WAIT_MS_MAX: u64 = 20_000;
/// The pause between two looks at what was delivered.
const POLL_MS: u64 = 50;

/// Node A: the rooms' home. Node B: a member node.
const A: usize = 0;
const B: usize = 1;

fn rng() -> rand_core::UnwrapErr<getrandom::SysRng> {
    rand_core::UnwrapErr(getrandom::SysRng)
}

fn free_port() -> SocketAddr {
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
    socket.local_addr().expect("addr")
}

struct Cluster {
    /// How many frames an epoch carries before its room must rekey.
    epoch_frames_max: u64,
    dir: tempfile::TempDir,
    ids: Vec<NodeId>,
    addrs: Vec<SocketAddr>,
    nodes: Vec<Option<Node>>,
}

impl Cluster {
    async fn start(n: usize) -> Self {
        Self::start_with(n, DomainConfig::default().epoch_frames_max).await
    }

    async fn start_with(n: usize, epoch_frames_max: u64) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut ids = Vec::new();
        for i in 0..n {
            let (identity, _) =
                conclave::identity_file::load_or_create(&Self::data_in(&dir, i).join("node.id"))
                    .expect("node identity");
            ids.push(identity.node_id());
        }
        let mut cluster = Self {
            epoch_frames_max,
            dir,
            ids,
            addrs: (0..n).map(|_| free_port()).collect(),
            nodes: (0..n).map(|_| None).collect(),
        };
        for i in 0..n {
            cluster.up(i).await;
        }
        cluster
    }

    fn data_in(dir: &tempfile::TempDir, i: usize) -> PathBuf {
        let data = dir.path().join(format!("n{i}"));
        std::fs::create_dir_all(&data).expect("data dir");
        data
    }

    fn data(&self, i: usize) -> PathBuf {
        Self::data_in(&self.dir, i)
    }

    /// The node's own identity: what a lying node signs and seals with.
    fn identity(&self, i: usize) -> Identity {
        conclave::identity_file::load_or_create(&self.data(i).join("node.id"))
            .expect("node identity")
            .0
    }

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
            .data_dir(self.data(i))
            .listen(self.addrs[i])
            .domain_config(DomainConfig {
                retry_base: Duration::from_millis(50),
                retry_max: Duration::from_millis(500),
                idle: Duration::from_secs(30),
                epoch_frames_max: self.epoch_frames_max,
                ..DomainConfig::default()
            })
            .commit_wait(Duration::from_secs(5));
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

    /// Stops node `i`, lets `lie` write into its store, and starts it again.
    async fn lie(
        &mut self,
        i: usize,
        lie: impl FnOnce(&mut dyn WriteTxn) -> Result<(), StoreError>,
    ) {
        self.down(i).await;
        conclave::testing::write_stopped(&self.data(i), lie).expect("write the lie");
        self.up(i).await;
    }

    /// A new user on node `i`, added by a seeded admin.
    async fn user(&self, i: usize) -> Identity {
        let node = self.node(i);
        let admin = Identity::generate(&mut rng());
        node.seed_admin(&admin.public()).expect("seed admin");
        let admin = node.user(admin).await.expect("admin");
        let identity = Identity::generate(&mut rng());
        admin
            .add_user(&identity.public(), UserRole::Member)
            .await
            .expect("add user");
        identity
    }

    /// A handle for `identity` on node `i` (a fresh client: it has verified
    /// nothing yet).
    async fn client(&self, i: usize, identity: &Identity) -> conclave::User {
        self.node(i)
            .user(identity.clone())
            .await
            .expect("active user")
    }
}

/// This process's metrics, as Prometheus text (the recorder is installed once,
/// for every test of this file).
fn metrics() -> String {
    type Render = Box<dyn Fn() -> String + Send + Sync>;
    static RENDER: OnceLock<Render> = OnceLock::new();
    RENDER.get_or_init(|| {
        let handle = conclave::observe::install_prometheus().expect("one recorder per process");
        Box::new(move || handle.render())
    })()
}

/// The value of the series `name{reason}` in `exposition` (0 if absent).
fn series(exposition: &str, name: &str, reason: &str) -> f64 {
    let series = format!("{name}{{reason=\"{reason}\"}} ");
    exposition
        .lines()
        .find_map(|line| line.strip_prefix(&series))
        .map_or(0.0, |value| value.trim().parse().expect("a metric value"))
}

/// The value of `conclave_client_refusals_total{reason}` in `exposition`.
fn refusals(exposition: &str, reason: &str) -> u64 {
    // A counter is a whole number.
    series(exposition, "conclave_client_refusals_total", reason) as u64
}

/// Every reason a client refuses with.
const REASONS: &[&str] = &[
    "bad_signature",
    "broken_chain",
    "wrong_room",
    "bad_genesis",
    "unauthorized",
    "bad_epoch",
    "invalid_change",
    "chain_too_long",
    "unknown_epoch",
    "unauthorized_sealer",
    "key_mismatch",
    "unopened",
];

/// Polls `check` until it holds, or fails the test after [`DELIVERY_WAIT_MS_MAX`].
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_millis(DELIVERY_WAIT_MS_MAX);
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(POLL_MS)).await;
    }
}

/// Waits until `user` holds exactly the keys of `epochs` for `room`.
async fn wait_epochs(user: &conclave::User, room: RoomId, epochs: &[u64]) {
    let want: Vec<Epoch> = epochs.iter().map(|e| Epoch(*e)).collect();
    eventually(&format!("keys of epochs {epochs:?}"), || async {
        user.key_epochs(room).await.ok() == Some(want.clone())
    })
    .await;
}

/// `from` publishes `body` to `room` and `to` reads it: the epoch it was sent in.
async fn talk(from: &conclave::User, to: &conclave::User, room: RoomId, body: &[u8]) -> Epoch {
    from.publish(room, body).await.expect("publish");
    let mut sub = to
        .subscribe(room, Position::Start)
        .await
        .expect("subscribe");
    loop {
        let next = tokio::time::timeout(Duration::from_millis(DELIVERY_WAIT_MS_MAX), sub.next())
            .await
            .expect("the message arrives")
            .expect("stream open");
        match next {
            Ok(message) if message.body == body => {
                assert_eq!(message.sender, from.id());
                return message.epoch;
            }
            // Earlier messages, or ones of an epoch this reader holds no key of.
            Ok(_) | Err(ApiError::NoKey(_)) => {}
            Err(error) => panic!("reading {body:?}: {error}"),
        }
    }
}

/// A room of alice's (home A) with bob (node B) as a member, both holding its key.
async fn room_with(alice: &conclave::User, bob: &conclave::User, b: NodeId) -> RoomId {
    let room = alice.create_room(Policy::default()).await.expect("create");
    alice
        .invite(room, &bob.public(), b, RoomRole::Member)
        .await
        .expect("invite bob");
    wait_epochs(bob, room, &[1]).await;
    room
}

/// `key` for `room` at `epoch`, sealed by `sealer` to `to`.
fn sealed(
    sealer: &Identity,
    to: &Identity,
    room: RoomId,
    epoch: Epoch,
) -> conclave_actors::crypto::SealedKey {
    let key = EpochKey::generate(&mut rng());
    seal_epoch_key(
        &mut rng(),
        sealer.signing_key(),
        &to.public().exchange_key(),
        room,
        epoch,
        &key,
    )
    .expect("seal")
}

/// The next link of `room`'s chain as `txn` holds it, signed by `signer`.
fn next_link(
    txn: &dyn WriteTxn,
    room: RoomId,
    signer: &Identity,
    change: Change,
) -> Result<(u64, SignedLink), StoreError> {
    let (len, head) = rooms::chain_head(txn, room)?;
    let link = Link {
        room,
        prev: head,
        by: Signer::User(signer.user_id()),
        change,
    };
    Ok((len, SignedLink::sign(signer, link)))
}

/// The rooms, one per lie, and who is in them.
struct Scene {
    alice: Identity,
    bob: Identity,
    carol: Identity,
    mallory: Identity,
    /// Lie (a): a key for an epoch no member started.
    future_epoch: RoomId,
    /// Lie (b): an old epoch's key sealed by the node.
    node_sealed: RoomId,
    /// Lie (b): an old epoch's key sealed by an authorized member, not the pinned one.
    not_pinned: RoomId,
    /// Lie (c): a link the node signed itself (it invites its own identity).
    self_invite: RoomId,
    /// Lie (c): a link naming alice as its signer, signed by the node.
    forged_invite: RoomId,
    /// Lie (d): the home swaps bob's X25519 key for mallory's.
    swapped_key: RoomId,
    /// Lie (e): node B serves bob a creation of this room (alice's) by mallory.
    claimed: RoomId,
}

async fn scene(c: &Cluster) -> Scene {
    let (alice, carol) = (c.user(A).await, c.user(A).await);
    let (bob, mallory) = (c.user(B).await, c.user(B).await);
    let a = c.client(A, &alice).await;
    let b = c.client(B, &bob).await;
    let b_id = c.ids[B];
    let future_epoch = room_with(&a, &b, b_id).await;
    let node_sealed = room_with(&a, &b, b_id).await;
    let not_pinned = room_with(&a, &b, b_id).await;
    // Both at epoch 2 now, so that the lie (about epoch 1) leaves bob a key.
    for room in [node_sealed, not_pinned] {
        assert_eq!(a.rekey(room).await.expect("rekey"), Epoch(2));
        wait_epochs(&b, room, &[1, 2]).await;
    }
    let self_invite = room_with(&a, &b, b_id).await;
    let forged_invite = room_with(&a, &b, b_id).await;
    let swapped_key = room_with(&a, &b, b_id).await;
    a.invite(swapped_key, &carol.public(), c.ids[A], RoomRole::Member)
        .await
        .expect("invite carol");
    let claimed = a.create_room(Policy::default()).await.expect("create");
    Scene {
        alice,
        bob,
        carol,
        mallory,
        future_epoch,
        node_sealed,
        not_pinned,
        self_invite,
        forged_invite,
        swapped_key,
        claimed,
    }
}

/// What node B writes into its own store: lies (a), (b), (c) and (e).
fn lies_of_b<'a>(
    s: &'a Scene,
    node: &Identity,
    b: NodeId,
) -> impl FnOnce(&mut dyn WriteTxn) -> Result<(), StoreError> + 'a {
    let node = node.clone();
    move |txn| {
        let bob = s.bob.user_id();
        // (a) epoch 2 of a room at epoch 1, sealed by the node.
        let key = sealed(&node, &s.bob, s.future_epoch, Epoch(2));
        keys::put(txn, s.future_epoch, Epoch(2), bob, &key)?;
        // (b) epoch 1's key replaced by one the node sealed, and by one alice
        // sealed (she may give epoch 1's key) that is not the key the chain pins.
        let key = sealed(&node, &s.bob, s.node_sealed, Epoch(1));
        keys::put(txn, s.node_sealed, Epoch(1), bob, &key)?;
        let key = sealed(&s.alice, &s.bob, s.not_pinned, Epoch(1));
        keys::put(txn, s.not_pinned, Epoch(1), bob, &key)?;
        // (c) the node's identity invites itself; then a link naming alice as its
        // signer, signed by the node.
        let intruder = Invitee {
            user: node.public(),
            home: b,
            role: RoomRole::Admin,
        };
        let change = Change::Invite {
            invitee: intruder,
            epoch: Epoch(1),
        };
        let (at, link) = next_link(txn, s.self_invite, &node, change.clone())?;
        rooms::put_link(txn, s.self_invite, at, &link)?;
        let (at, mut link) = next_link(txn, s.forged_invite, &node, change)?;
        link.link.by = Signer::User(s.alice.user_id());
        rooms::put_link(txn, s.forged_invite, at, &link)?;
        // (e) mallory's creation of a room with alice's room id, homed here, and
        // bob made to see it.
        let creation = claim(&s.mallory, s.claimed, b);
        rooms::put_link(txn, s.claimed, 0, &creation)?;
        let visible = rooms::Visibility {
            from: Seq(1),
            until: None,
        };
        rooms::put_visibility(txn, bob, s.claimed, &visible)
    }
}

/// `creator`'s creation of a room homed on `home` that claims the id `room`.
fn claim(creator: &Identity, room: RoomId, home: NodeId) -> SignedLink {
    let key = EpochKey::generate(&mut rng());
    let link = Link {
        room,
        prev: conclave_actors::domain::chain::ChainHash::GENESIS,
        by: Signer::User(creator.user_id()),
        change: Change::Create {
            creator: creator.public(),
            home,
            nonce: [7; 16],
            policy: Policy::default(),
            check: KeyCheck::of(room, Epoch(1), &key),
        },
    };
    SignedLink::sign(creator, link)
}

fn untrusted_reason<T: std::fmt::Debug>(result: Result<T, ApiError>) -> &'static str {
    match result {
        Err(ApiError::Untrusted { reason, .. }) => reason,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// Bob (a fresh client on B, after B lied) believes none of B's lies.
async fn bob_refuses_b(c: &Cluster, s: &Scene) {
    let bob = c.client(B, &s.bob).await;
    let alice = c.client(A, &s.alice).await;
    // (a) the key of an epoch the chain lacks is refused; bob keeps epoch 1.
    assert_eq!(bob.key_epochs(s.future_epoch).await.unwrap(), [Epoch(1)]);
    assert_eq!(talk(&bob, &alice, s.future_epoch, b"a").await, Epoch(1));
    // (b) epoch 1's replaced keys are refused; epoch 2's honest one is kept.
    for room in [s.node_sealed, s.not_pinned] {
        assert_eq!(bob.key_epochs(room).await.unwrap(), [Epoch(2)]);
        assert_eq!(talk(&bob, &alice, room, b"b").await, Epoch(2));
    }
    // (c) the links no member signed are refused: bob reports no member list
    // that holds the intruder, alice's (from the honest home) does not hold it
    // either, and both keep talking on the chain as it verified.
    let intruder = UserId(c.identity(B).public().signing);
    let reason = untrusted_reason(bob.members(s.self_invite).await);
    assert_eq!(reason, "unauthorized");
    let reason = untrusted_reason(bob.members(s.forged_invite).await);
    assert_eq!(reason, "bad_signature");
    for room in [s.self_invite, s.forged_invite] {
        let members = alice.members(room).await.expect("alice's members");
        assert!(members.iter().all(|(user, _, _)| *user != intruder));
        assert_eq!(members.len(), 2);
        assert_eq!(talk(&bob, &alice, room, b"c").await, Epoch(1));
        assert_eq!(talk(&alice, &bob, room, b"c back").await, Epoch(1));
    }
    // (e) a creation that does not derive the room's id is refused.
    assert_eq!(
        untrusted_reason(bob.members(s.claimed).await),
        "bad_genesis"
    );
}

/// (e) B's node itself refuses a creation claiming alice's room id.
async fn claim_refused(c: &Cluster, s: &Scene) {
    let link = claim(&s.mallory, s.future_epoch, c.ids[B]);
    let key = sealed(&s.mallory, &s.mallory, s.future_epoch, Epoch(1));
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970");
    let now = Time::from_unix_micros(u64::try_from(now.as_micros()).expect("micros"));
    let op = Op::CreateRoom { link, key };
    let req = client::sign(&s.mallory, now, &mut rng(), op);
    match conclave::testing::call(c.node(B), req).await {
        Ok(Some(Outcome::Denied(denial))) => {
            assert_eq!(denial.reason(), "malformed", "{denial}");
            assert!(denial.to_string().contains("not derived"), "{denial}");
        }
        other => panic!("a claimed room id was not refused: {other:?}"),
    }
}

/// (d) The home swaps bob's X25519 key for mallory's: the home's say
/// (`room_info`) shows it, but alice's removal of carol seals the next key to the
/// key bob bound in the chain, so the lying home (which checks the bundle against
/// its swapped key) refuses it and mallory gets nothing; once the home stops
/// lying the same removal goes through and bob reads the new epoch.
async fn swapped_key(c: &mut Cluster, s: &Scene) {
    let (room, bob_id) = (s.swapped_key, s.bob.user_id());
    let mut kept = None;
    c.lie(A, |txn| {
        let mut member = rooms::member(txn, room, bob_id)?.expect("bob is a member");
        kept = Some(member);
        member.exchange = s.mallory.public().exchange;
        rooms::put_member(txn, room, &member)
    })
    .await;
    let honest = kept.expect("bob's record");
    let alice = c.client(A, &s.alice).await;
    let info = alice.room_info(room).await.expect("room info");
    let served = info.members.iter().find(|m| m.user == bob_id).expect("bob");
    assert_eq!(
        served.exchange,
        s.mallory.public().exchange,
        "the lie is served"
    );
    let members = alice.members(room).await.expect("verified members");
    assert!(members.iter().any(|(user, _, _)| *user == bob_id));
    match alice.remove(room, s.carol.user_id()).await {
        // The seal's signature covers its recipient's key: sealed to bob's bound
        // key, it does not verify for the swapped one.
        Err(ApiError::Denied(denial)) => assert_eq!(denial, Denial::BadSignature),
        other => panic!("the lying home took a bundle for its swapped key: {other:?}"),
    }
    let stored = c.node(A).stored_key_epochs(room, bob_id).expect("keys");
    assert_eq!(stored, [Epoch(1)], "no key of a new epoch was stored");
    c.lie(A, |txn| rooms::put_member(txn, room, &honest)).await;
    let alice = c.client(A, &s.alice).await;
    alice.remove(room, s.carol.user_id()).await.expect("remove");
    let bob = c.client(B, &s.bob).await;
    assert_eq!(talk(&alice, &bob, room, b"d").await, Epoch(2));
}

/// What A stored for bob at epoch 2 opens with bob's key only, not mallory's.
fn mallory_cannot_open(c: &Cluster, s: &Scene) {
    let room = s.swapped_key;
    let held = conclave::testing::write_stopped(&c.data(A), |txn| {
        keys::sealed_for(txn, room, s.bob.user_id())
    })
    .expect("read A's store");
    let (_, key) = held
        .iter()
        .find(|(epoch, _)| *epoch == Epoch(2))
        .expect("epoch 2 for bob");
    assert!(open_epoch_key(s.mallory.exchange_secret(), room, Epoch(2), key).is_err());
    assert!(open_epoch_key(s.bob.exchange_secret(), room, Epoch(2), key).is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_lies_is_believed_by_no_client() {
    let mut c = Cluster::start(2).await;
    let s = scene(&c).await;
    let before = metrics();
    for reason in REASONS {
        assert_eq!(refusals(&before, reason), 0, "honest nodes: no {reason}");
    }
    let (node_b, b) = (c.identity(B), c.ids[B]);
    c.lie(B, lies_of_b(&s, &node_b, b)).await;
    bob_refuses_b(&c, &s).await;
    claim_refused(&c, &s).await;
    let after = metrics();
    for reason in [
        "unknown_epoch",
        "unauthorized_sealer",
        "key_mismatch",
        "unauthorized",
        "bad_signature",
        "bad_genesis",
    ] {
        assert_eq!(refusals(&after, reason), 1, "{reason} counted once");
    }
    swapped_key(&mut c, &s).await;
    let end = metrics();
    for reason in REASONS {
        assert_eq!(refusals(&end, reason), refusals(&after, reason), "{reason}");
    }
    c.down(A).await;
    c.down(B).await;
    mallory_cannot_open(&c, &s);
}

/// Revocation reaches open connections: a revoked user's connection over the
/// client protocol is closed at once with the `revoked` close reason (and their
/// subscription ends), not left open until they next ask for something.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_users_connection_is_closed_at_once() {
    let mut c = Cluster::start(1).await;
    let node = c.node(A);
    let admin = Identity::generate(&mut rng());
    node.seed_admin(&admin.public()).expect("seed admin");
    let admin = node.user(admin).await.expect("admin");
    let eve = Identity::generate(&mut rng());
    admin
        .add_user(&eve.public(), UserRole::Member)
        .await
        .expect("add eve");
    let remote = conclave::RemoteNode::connect(&eve, c.addrs[A], Some(c.ids[A]))
        .await
        .expect("eve connects");
    let room = remote.create_room(Policy::default()).await.expect("create");
    let mut sub = remote
        .subscribe(room, Position::Start)
        .await
        .expect("subscribe");
    let revoked_before = series(&metrics(), "conclave_client_auth_failures_total", "revoked");
    admin.revoke_user(eve.user_id()).await.expect("revoke eve");
    let next = tokio::time::timeout(Duration::from_millis(DELIVERY_WAIT_MS_MAX), sub.next())
        .await
        .expect("the subscription ends");
    assert!(
        matches!(next, None | Some(Err(ApiError::Denied(Denial::Revoked)))),
        "{next:?}"
    );
    eventually("the connection is closed as revoked", || async {
        series(&metrics(), "conclave_client_auth_failures_total", "revoked") > revoked_before
    })
    .await;
    match remote.list_rooms().await {
        Err(ApiError::Denied(Denial::Revoked)) => {}
        other => panic!("a revoked user was answered: {other:?}"),
    }
    c.down(A).await;
}

/// Frames an epoch may carry in [`revoked_members_are_evicted_and_the_room_rekeys`].
const TEST_EPOCH_FRAMES_MAX: u64 = 4;

/// A revoked member is evicted from their rooms (a link the home signs on their
/// node's word); the next publish finds the room due for a rekey, rekeys it to the
/// members the chain lists and goes on. An epoch that carried its most frames is
/// rekeyed the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_members_are_evicted_and_the_room_rekeys() {
    let c = Cluster::start_with(2, TEST_EPOCH_FRAMES_MAX).await;
    let alice = c.client(A, &c.user(A).await).await;
    let bob = c.client(B, &c.user(B).await).await;
    let node_b = c.node(B);
    let admin_b = Identity::generate(&mut rng());
    node_b.seed_admin(&admin_b.public()).expect("seed admin");
    let admin_b = node_b.user(admin_b).await.expect("admin");
    let eve = Identity::generate(&mut rng());
    admin_b
        .add_user(&eve.public(), UserRole::Member)
        .await
        .expect("add eve");
    let room = room_with(&alice, &bob, c.ids[B]).await;
    alice
        .invite(room, &eve.public(), c.ids[B], RoomRole::Member)
        .await
        .expect("invite eve");
    assert_eq!(alice.members(room).await.expect("members").len(), 3);
    admin_b
        .revoke_user(eve.user_id())
        .await
        .expect("revoke eve");
    eventually("eve is evicted", || async {
        let members = alice.members(room).await.expect("members");
        members.iter().all(|(user, _, _)| *user != eve.user_id())
    })
    .await;
    // The eviction left the room due for a new epoch: the publish rekeys it.
    assert_eq!(talk(&alice, &bob, room, b"after eve").await, Epoch(2));
    assert_eq!(bob.members(room).await.expect("members").len(), 2);
    // The epoch has carried one frame; the bound makes a later publish rekey.
    for i in 1..TEST_EPOCH_FRAMES_MAX {
        let body = format!("epoch 2, frame {i}");
        assert_eq!(talk(&bob, &alice, room, body.as_bytes()).await, Epoch(2));
    }
    assert_eq!(talk(&bob, &alice, room, b"epoch 3").await, Epoch(3));
    assert_eq!(
        c.node(B)
            .stored_key_epochs(room, eve.user_id())
            .expect("keys"),
        [Epoch(1)],
        "eve's node holds no key after her eviction"
    );
}

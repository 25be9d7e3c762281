//! Rooms on shard groups, scripted on the deterministic driver: three nodes,
//! every shard on all three. Frames and membership changes commit through the
//! room's shard, so a room goes on while its home is down; a frame published
//! twice commits once; without a quorum a publish is refused `no_quorum` and
//! never commits.

use core::time::Duration;

use conclave_actors::domain::{Denial, DomainConfig, Op, Outcome, Policy, RoomRole, UserRole};
use conclave_actors::ids::{RoomId, Seq};
use conclave_actors::replication::Replication;
use conclave_actors::Identity;
use conclave_sim::Cluster;

/// Three nodes with rooms on two shards; alice on node 0, bob on node 1, carol
/// on node 2; a room of alice's with bob and carol invited.
struct World {
    c: Cluster,
    users: Vec<Identity>,
    room: RoomId,
}

fn world(seed: u64) -> World {
    let config = DomainConfig {
        replication: Some(Replication {
            shards: 2,
            factor: 3,
            tick: Duration::from_millis(50),
            rooms: true,
        }),
        ..DomainConfig::default()
    };
    let mut c = Cluster::with_config(3, seed, config);
    // Leaders first: a room's commands wait for its shard's.
    c.run_for(Duration::from_secs(3));
    let mut users = Vec::new();
    for i in 0..3 {
        let admin = Identity::generate(c.rng());
        c.seed_admin(i, &admin);
        let user = Identity::generate(c.rng());
        let op = Op::AddUser {
            user: user.public(),
            role: UserRole::Member,
        };
        assert_eq!(c.call(i, &admin, op), Outcome::Done);
        users.push(user);
    }
    let room = c.create_room(0, &users[0], Policy::default());
    for i in 1..3 {
        let (alice, invitee) = (users[0].clone(), users[i].clone());
        let outcome = c.invite(0, &alice, room, &invitee, i, RoomRole::Member);
        assert_eq!(outcome, Outcome::Done, "invite the user of node {i}");
    }
    World { c, users, room }
}

fn committed(c: &mut Cluster, node: usize, request: u64) -> Seq {
    match c.outcome(node, request) {
        Some(Outcome::Committed { seq, .. }) => seq,
        other => panic!("expected a commit on node {node}, got {other:?}"),
    }
}

#[test]
fn every_member_reads_every_frame_in_one_order_through_the_shard() {
    let mut w = world(1);
    let mut sent = Vec::new();
    for round in 0..4 {
        for node in 0..3 {
            let text = format!("round {round} from node {node}").into_bytes();
            let user = w.users[node].clone();
            sent.push((node, w.c.publish(node, &user, w.room, &text), text));
        }
    }
    w.c.settle();
    let mut by_seq = std::collections::BTreeMap::new();
    for (node, request, text) in &sent {
        let seq = committed(&mut w.c, *node, *request);
        assert!(by_seq.insert(seq, text.clone()).is_none(), "two at {seq:?}");
    }
    let seqs: Vec<u64> = by_seq.keys().map(|s| s.0).collect();
    assert_eq!(seqs, (1..=12).collect::<Vec<_>>(), "no gap, no duplicate");
    let expected: Vec<(Seq, Vec<u8>)> = by_seq.into_iter().collect();
    for node in 0..3 {
        let user = w.users[node].clone();
        assert_eq!(w.c.read(node, &user, w.room), expected, "node {node}");
    }
    // Every replica holds the same chain.
    let chain = w.c.chain(0, w.room);
    for node in 1..3 {
        assert_eq!(w.c.chain(node, w.room).head, chain.head, "node {node}");
    }
}

#[test]
fn the_room_goes_on_while_its_home_is_down() {
    let mut w = world(2);
    w.c.crash(0);
    w.c.run_for(Duration::from_secs(3));
    let bob = w.users[1].clone();
    let request = w.c.publish(1, &bob, w.room, b"while the home is down");
    w.c.run_for(Duration::from_secs(3));
    let seq = committed(&mut w.c, 1, request);
    let carol = w.users[2].clone();
    let read = w.c.read(2, &carol, w.room);
    assert_eq!(read, vec![(seq, b"while the home is down".to_vec())]);
    // Back, the home has it all.
    w.c.restart(0);
    for i in 1..3 {
        w.c.connected(0, i);
        w.c.connected(i, 0);
    }
    w.c.settle();
    let alice = w.users[0].clone();
    assert_eq!(w.c.read(0, &alice, w.room), read);
}

#[test]
fn a_frame_published_twice_commits_once() {
    let mut w = world(3);
    let bob = w.users[1].clone();
    let keys = w.c.keys(1, &bob, w.room);
    let (&epoch, key) = keys.iter().next_back().unwrap();
    let frame = w.c.seal(&bob, w.room, epoch, key, b"once").unwrap();
    let first = w.c.publish_frame(1, frame.clone());
    w.c.settle();
    let seq = committed(&mut w.c, 1, first);
    // Twice before either is applied: both go through the log, and the
    // second changes nothing but is told where the frame committed.
    let twice = w.c.seal(&bob, w.room, epoch, key, b"twice").unwrap();
    let a = w.c.publish_frame(1, twice.clone());
    let b = w.c.publish_frame(1, twice);
    w.c.settle();
    let (sa, sb) = (committed(&mut w.c, 1, a), committed(&mut w.c, 1, b));
    assert_eq!(sa, sb, "one frame, one sequence number");
    // Once it is applied here: refused at once as a duplicate of what
    // committed. (Through another node, bob is nobody's user.)
    let again = w.c.publish_frame(1, frame.clone());
    let elsewhere = w.c.publish_frame(2, frame);
    w.c.settle();
    assert_eq!(
        w.c.outcome(1, again),
        Some(Outcome::Denied(Denial::Duplicate { seq }))
    );
    assert!(matches!(
        w.c.outcome(2, elsewhere),
        Some(Outcome::Denied(Denial::NotFound { .. }))
    ));
    let carol = w.users[2].clone();
    let expected = vec![(seq, b"once".to_vec()), (sa, b"twice".to_vec())];
    assert_eq!(w.c.read(2, &carol, w.room), expected);
}

#[test]
fn without_a_quorum_a_publish_is_refused_and_never_commits() {
    let mut w = world(4);
    w.c.crash(0);
    w.c.crash(1);
    // Long enough for node 2 to know it has no leader (check_quorum, then
    // elections it cannot win).
    w.c.run_for(Duration::from_secs(5));
    let carol = w.users[2].clone();
    let request = w.c.publish(2, &carol, w.room, b"no quorum");
    w.c.run_for(Duration::from_secs(1));
    assert_eq!(
        w.c.outcome(2, request),
        Some(Outcome::Denied(Denial::NoQuorum))
    );
    for i in 0..2 {
        w.c.restart(i);
    }
    for (a, b) in [(0, 1), (0, 2), (1, 2)] {
        w.c.connected(a, b);
        w.c.connected(b, a);
    }
    w.c.settle();
    for node in 0..3 {
        let user = w.users[node].clone();
        assert!(
            w.c.read(node, &user, w.room).is_empty(),
            "node {node}: nothing was committed"
        );
    }
    // And the room works again.
    let request = w.c.publish(2, &carol, w.room, b"quorum");
    w.c.settle();
    committed(&mut w.c, 2, request);
}

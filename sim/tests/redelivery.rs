//! What the simulator found (seed 3160 of the first sweeps): a node that crashes
//! after a room applied messages from another node, but before its peer recorded
//! them as applied (in a transaction of its own, a moment later), gets them again
//! after the restart. Each target must then leave things as they are:
//! - a member node must not re-apply an older membership snapshot: it re-admitted
//!   removed members and stretched their visibility past their removal (the bug,
//!   fixed in the room's replica);
//! - a home must not apply a forwarded invite again after a removal (it does not:
//!   the invite carries a key of the epoch the removal ended, and is refused).

use std::time::Duration;

use conclave_actors::domain::{self, client, Invitee, Op, Outcome, Policy, RoomRole, UserRole};
use conclave_actors::ids::Seq;
use conclave_actors::{Identity, Time};
use conclave_sim::Cluster;
use conclave_storage::Store;

struct World {
    c: Cluster,
    alice: Identity,
    bob: Identity,
    carol: Identity,
    dave: Identity,
}

/// alice on node 0, bob and dave on node 1, carol on node 2.
fn world(seed: u64) -> World {
    let mut c = Cluster::new(3, seed);
    let mut admins = Vec::new();
    for i in 0..3 {
        let admin = Identity::generate(c.rng());
        c.seed_admin(i, &admin);
        admins.push(admin);
    }
    let add = |c: &mut Cluster, node: usize| {
        let user = Identity::generate(c.rng());
        let op = Op::AddUser {
            user: user.public(),
            role: UserRole::Member,
        };
        assert_eq!(c.call(node, &admins[node], op), Outcome::Done);
        user
    };
    let alice = add(&mut c, 0);
    let bob = add(&mut c, 1);
    let dave = add(&mut c, 1);
    let carol = add(&mut c, 2);
    World {
        c,
        alice,
        bob,
        carol,
        dave,
    }
}

/// Runs until `done` holds, stepping one event at a time (bounded).
fn step_until(c: &mut Cluster, mut done: impl FnMut(&Cluster) -> bool) {
    let end = Time::from_unix_micros(c.now().unix_micros() + 60_000_000);
    while !done(c) {
        assert!(c.step(end).is_some(), "ran out of events");
    }
}

fn restart(c: &mut Cluster, i: usize) {
    c.restart(i);
    for j in (0..3).filter(|&j| j != i) {
        c.connected(i, j);
        c.connected(j, i);
    }
    c.settle();
}

#[test]
fn a_member_node_does_not_reapply_an_older_snapshot_handed_over_again() {
    let mut w = world(11);
    let (alice, dave) = (w.alice.clone(), w.dave.clone());
    let room = w.c.create_room(0, &alice, Policy::default());
    let bob = w.bob.clone();
    assert_eq!(
        w.c.invite(0, &alice, room, &bob, 1, RoomRole::Member),
        Outcome::Done
    );
    // Node 0 cannot reach node 1 for a while: dave's invite, a frame, dave's
    // removal and two more frames wait in node 0's outbox towards it.
    w.c.cut_link(0, 1, true);
    assert_eq!(
        w.c.invite(0, &alice, room, &dave, 1, RoomRole::Member),
        Outcome::Done
    );
    w.c.publish(0, &alice, room, b"one");
    w.c.settle();
    assert_eq!(w.c.remove(0, &alice, room, dave.user_id()), Outcome::Done);
    w.c.publish(0, &alice, room, b"two");
    w.c.publish(0, &alice, room, b"three");
    w.c.settle();
    // Node 1 is slow: when the link heals it applies the whole batch, and its
    // peer's records of that wait in its mailbox. It crashes right then.
    w.c.nodes[1].cost = Duration::from_millis(2);
    w.c.cut_link(0, 1, false);
    w.c.connected(0, 1);
    step_until(&mut w.c, |c| {
        let txn = c.nodes[1].store.read().unwrap();
        domain::state::rooms::frames(&*txn, room, Seq(3), 1)
            .unwrap()
            .len()
            == 1
    });
    assert!(
        w.c.mailbox_len(1) > 0,
        "the peer has not recorded the batch yet"
    );
    w.c.crash(1);
    w.c.nodes[1].cost = Duration::ZERO;
    restart(&mut w.c, 1);

    // Dave was removed at seq 2 and may read seq 1 only; bob reads all three.
    let txn = w.c.nodes[1].store.read().unwrap();
    let vis = domain::state::rooms::visibility(&*txn, dave.user_id(), room)
        .unwrap()
        .unwrap();
    assert_eq!(vis.until, Some(Seq(2)), "dave's visibility: {vis:?}");
    let members: Vec<_> = domain::state::rooms::members(&*txn, room)
        .unwrap()
        .into_iter()
        .map(|m| m.user)
        .collect();
    assert!(!members.contains(&dave.user_id()));
    drop(txn);
    assert_eq!(w.c.read(1, &dave, room).len(), 1);
    assert_eq!(w.c.read(1, &bob, room).len(), 3);
}

#[test]
fn a_home_does_not_apply_a_forwarded_invite_again_after_a_removal() {
    let mut w = world(12);
    let (alice, bob, carol) = (w.alice.clone(), w.bob.clone(), w.carol.clone());
    let room = w.c.create_room(0, &alice, Policy::default());
    assert_eq!(
        w.c.invite(0, &alice, room, &bob, 1, RoomRole::Admin),
        Outcome::Done
    );
    // Bob (an admin, on node 1) invites carol and removes her again while node 1
    // cannot reach the home: both requests wait in node 1's outbox.
    w.c.cut_link(1, 0, true);
    let mut chain = w.c.chain(1, room);
    let keys = w.c.keys(1, &bob, room);
    let key = &keys[&chain.epoch];
    let invitee = Invitee {
        user: carol.public(),
        home: w.c.id(2),
        role: RoomRole::Member,
    };
    let invite = client::invite(w.c.rng(), &bob, &chain, key, invitee).unwrap();
    // Bob's client follows its own invitation: the removal's link follows it.
    chain.apply(invite.link().unwrap()).unwrap();
    w.c.request(1, &bob, invite);
    // The removal's bundle covers the members once carol is gone: alice and bob.
    let (_key, remove) = client::remove(w.c.rng(), &bob, &chain, carol.user_id()).unwrap();
    w.c.request(1, &bob, remove);
    w.c.settle();
    // The home is slow, applies both when the link heals, and crashes before its
    // peer has recorded them.
    w.c.nodes[0].cost = Duration::from_millis(2);
    w.c.cut_link(1, 0, false);
    w.c.connected(1, 0);
    step_until(&mut w.c, |c| {
        let txn = c.nodes[0].store.read().unwrap();
        domain::state::rooms::meta(&*txn, room)
            .unwrap()
            .unwrap()
            .epoch
            .0
            == 2
    });
    assert!(w.c.mailbox_len(0) > 0, "the peer has not recorded them yet");
    w.c.crash(0);
    w.c.nodes[0].cost = Duration::ZERO;
    restart(&mut w.c, 0);

    let info = w.c.room_info(0, &alice, room);
    let members: Vec<_> = info.members.iter().map(|m| m.user).collect();
    assert_eq!(info.epoch.0, 2);
    assert!(
        !members.contains(&carol.user_id()),
        "carol, removed, was admitted again: {members:?}"
    );
}

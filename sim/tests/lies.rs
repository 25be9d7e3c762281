//! A node that lies to its own clients: it slips a user keys it sealed itself
//! (the simulator's `Fault::Lie`). The client, taking keys only through the room's
//! verified chain, refuses each with its reason, and still takes the real keys.

use conclave_actors::domain::{client, state, Op, Outcome, Policy, RoomRole, UserRole};
use conclave_actors::ids::Epoch;
use conclave_actors::Identity;
use conclave_sim::cluster::derive_rng;
use conclave_sim::faults::slip_key;
use conclave_sim::Cluster;
use conclave_storage::Store;

/// alice on node 0, bob on node 1.
fn world(seed: u64) -> (Cluster, Identity, Identity) {
    let mut c = Cluster::new(2, seed);
    let mut users = Vec::new();
    for i in 0..2 {
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
    let bob = users.pop().expect("bob");
    let alice = users.pop().expect("alice");
    (c, alice, bob)
}

/// What bob's client makes of the keys node 1 holds for him.
fn judged(
    c: &Cluster,
    bob: &Identity,
    room: conclave_actors::RoomId,
) -> (Vec<u64>, Vec<(u64, &'static str)>) {
    let chain = c.chain(1, room);
    let txn = c.nodes[1].store.read().expect("read");
    let sealed = state::keys::sealed_for(&*txn, room, bob.user_id()).expect("keys");
    let (keys, refused) = client::accept_keys(bob, &chain, &sealed);
    let refused = refused.iter().map(|(e, r)| (e.0, r.reason())).collect();
    (keys.keys().map(|e| e.0).collect(), refused)
}

#[test]
fn a_client_refuses_every_key_its_node_sealed_and_takes_the_real_ones() {
    let (mut c, alice, bob) = world(21);
    let room = c.create_room(0, &alice, Policy::default());
    assert_eq!(c.rekey(0, &alice, room), Outcome::Done);
    assert_eq!(
        c.invite(0, &alice, room, &bob, 1, RoomRole::Member),
        Outcome::Done
    );
    assert_eq!(judged(&c, &bob, room), (vec![2], vec![]));

    // Node 1 slips bob a key of epoch 1 (which the chain has, started by alice)
    // and one of epoch 3 (which it does not have yet).
    let mut rng = derive_rng(21, 1, "liar");
    assert!(slip_key(&c, 1, &bob.public(), room, Epoch(1), &mut rng));
    assert!(slip_key(&c, 1, &bob.public(), room, Epoch(3), &mut rng));
    assert_eq!(
        judged(&c, &bob, room),
        (
            vec![2],
            vec![(1, "unauthorized_sealer"), (3, "unknown_epoch")]
        )
    );

    // Alice moves the room on: the real key of epoch 3 replaces the lie, and bob
    // takes it; the lie about epoch 1 stays refused.
    assert_eq!(c.rekey(0, &alice, room), Outcome::Done);
    c.settle();
    assert_eq!(
        judged(&c, &bob, room),
        (vec![2, 3], vec![(1, "unauthorized_sealer")])
    );
    // Honest members keep talking, with the key bob took.
    let chain = c.chain(1, room);
    let sealed = {
        let txn = c.nodes[1].store.read().expect("read");
        state::keys::sealed_for(&*txn, room, bob.user_id()).expect("keys")
    };
    let (keys, _) = client::accept_keys(&bob, &chain, &sealed);
    let frame = c
        .seal(&bob, room, Epoch(3), &keys[&Epoch(3)], b"still here")
        .expect("seal");
    c.publish_frame(1, frame);
    c.settle();
    let read = c.read(0, &alice, room);
    assert_eq!(
        read.last().map(|(_, t)| t.as_slice()),
        Some(&b"still here"[..])
    );
}

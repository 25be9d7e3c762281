//! A revoked member is evicted from their room by its home, on their node's word;
//! the room takes no frame until a member moves it to the next epoch, whose key
//! the evicted member does not get.

use conclave_actors::domain::{state, Denial, Op, Outcome, Policy, RoomRole, UserRole};
use conclave_actors::ids::Epoch;
use conclave_actors::Identity;
use conclave_sim::cluster::Observed;
use conclave_sim::Cluster;
use conclave_storage::Store;

#[test]
fn a_revoked_member_is_evicted_and_the_room_rekeys_without_them() {
    let mut c = Cluster::new(2, 33);
    c.observe = true;
    let mut admins = Vec::new();
    let mut users = Vec::new();
    for i in 0..2 {
        let admin = Identity::generate(c.rng());
        c.seed_admin(i, &admin);
        let user = Identity::generate(c.rng());
        let add = Op::AddUser {
            user: user.public(),
            role: UserRole::Member,
        };
        assert_eq!(c.call(i, &admin, add), Outcome::Done);
        admins.push(admin);
        users.push(user);
    }
    let (alice, bob) = (users[0].clone(), users[1].clone());
    let room = c.create_room(0, &alice, Policy::default());
    assert_eq!(
        c.invite(0, &alice, room, &bob, 1, RoomRole::Member),
        Outcome::Done
    );
    c.observed.clear();

    let revoke = Op::RevokeUser {
        user: bob.user_id(),
    };
    assert_eq!(c.call(1, &admins[1], revoke), Outcome::Done);
    c.settle();
    let evicted: Vec<_> = c
        .observed
        .iter()
        .filter_map(|o| match o.what {
            Observed::Evicted { user } => Some((o.node, o.room, user)),
            _ => None,
        })
        .collect();
    assert_eq!(evicted, [(0, room, bob.user_id())]);
    let chain = c.chain(0, room);
    assert!(chain.rekey_due && !chain.members.contains_key(&bob.user_id()));
    assert_eq!(
        c.chain(1, room).head,
        chain.head,
        "bob's node holds the eviction too"
    );

    // No frame until a member rekeys; then alice publishes in epoch 2.
    let request = c.publish(0, &alice, room, b"too early");
    c.settle();
    assert_eq!(
        c.outcome(0, request),
        Some(Outcome::Denied(Denial::RekeyNeeded))
    );
    assert_eq!(c.rekey(0, &alice, room), Outcome::Done);
    let request = c.publish(0, &alice, room, b"after");
    c.settle();
    assert!(matches!(
        c.outcome(0, request),
        Some(Outcome::Committed { .. })
    ));
    assert!(c.keys(0, &alice, room).contains_key(&Epoch(2)));
    let txn = c.nodes[1].store.read().unwrap();
    let bobs = state::keys::sealed_for(&*txn, room, bob.user_id()).unwrap();
    assert!(
        bobs.iter().all(|(e, _)| *e == Epoch(1)),
        "bob gets no key of the epoch after his eviction"
    );
}

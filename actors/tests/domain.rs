//! The domain actors end to end on the deterministic driver: three nodes, an
//! in-memory network carrying encoded envelopes, in-memory stores with crash
//! semantics.

use core::time::Duration;

use conclave_actors::crypto::SealedKey;
use conclave_actors::domain::chain::{
    ChainHash, ChainState, Change, KeyCheck, Link, SignedLink, Signer, CHAIN_LINKS_MAX,
};
use conclave_actors::domain::state::outcomes;
use conclave_actors::domain::{
    client, Asked, Denial, History, Invitee, Op, Outcome, Policy, RoomRole, UserRole,
};
use conclave_actors::ids::{Epoch, RoomId, Seq};
use conclave_actors::{Identity, Time};
use conclave_sim::Cluster;
use conclave_storage::Store;
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use metrics_util::MetricKind;

type Bundle = Vec<(conclave_actors::UserId, SealedKey)>;

/// Three nodes; alice on node 0, bob on node 1, carol on node 2, each added by
/// their node's admin.
struct World {
    c: Cluster,
    alice: Identity,
    bob: Identity,
    carol: Identity,
}

fn world(seed: u64) -> World {
    world_with(seed, conclave_actors::domain::DomainConfig::default())
}

fn world_with(seed: u64, config: conclave_actors::domain::DomainConfig) -> World {
    let mut c = Cluster::with_config(3, seed, config);
    let mut users = Vec::new();
    for i in 0..3 {
        let admin = Identity::generate(c.rng());
        c.seed_admin(i, &admin);
        let user = Identity::generate(c.rng());
        let outcome = c.call(
            i,
            &admin,
            Op::AddUser {
                user: user.public(),
                role: UserRole::Member,
            },
        );
        assert_eq!(outcome, Outcome::Done);
        users.push(user);
    }
    let carol = users.pop().unwrap();
    let bob = users.pop().unwrap();
    let alice = users.pop().unwrap();
    World {
        c,
        alice,
        bob,
        carol,
    }
}

/// A room of alice's (home: node 0) with bob and carol invited.
fn room_of_three(w: &mut World, policy: Policy) -> RoomId {
    let room = w.c.create_room(0, &w.alice, policy);
    let (bob, carol) = (w.bob.clone(), w.carol.clone());
    assert_eq!(
        w.c.invite(0, &w.alice, room, &bob, 1, RoomRole::Member),
        Outcome::Done
    );
    assert_eq!(
        w.c.invite(0, &w.alice, room, &carol, 2, RoomRole::Member),
        Outcome::Done
    );
    room
}

/// The chain of `room` node `i` holds, verified from its creation.
fn chain(c: &Cluster, i: usize, room: RoomId) -> ChainState {
    let txn = c.nodes[i].store.read().unwrap();
    let links =
        conclave_actors::domain::state::rooms::links(&*txn, room, 0, CHAIN_LINKS_MAX as usize)
            .unwrap();
    ChainState::verify(room, &links).expect("the chain a node holds verifies")
}

/// A rekey by `by` to `epoch` with `bundle`, following `chain`.
fn rekey_op(chain: &ChainState, by: &Identity, epoch: Epoch, bundle: Bundle) -> Op {
    let change = Change::Rekey {
        epoch,
        check: KeyCheck([0; 32]),
    };
    Op::Rekey {
        link: chain.next_link(by, change),
        bundle,
    }
}

fn committed(c: &mut Cluster, node: usize, request: u64) -> Seq {
    match c.outcome(node, request) {
        Some(Outcome::Committed { seq, .. }) => seq,
        other => panic!("expected a commit, got {other:?}"),
    }
}

fn denial(outcome: Option<Outcome>) -> Denial {
    match outcome {
        Some(Outcome::Denied(d)) => d,
        other => panic!("expected a denial, got {other:?}"),
    }
}

#[test]
fn golden_flow_every_member_reads_every_frame_in_one_order() {
    let mut w = world(1);
    let room = room_of_three(&mut w, Policy::default());
    let mut sent = Vec::new();
    for round in 0..5 {
        for (node, user) in [(0, &w.alice), (1, &w.bob), (2, &w.carol)] {
            let text = format!("round {round} from node {node}").into_bytes();
            let request = w.c.publish(node, user, room, &text);
            sent.push((node, request, text));
        }
    }
    w.c.settle();
    let mut by_seq = std::collections::BTreeMap::new();
    for (node, request, text) in &sent {
        let seq = committed(&mut w.c, *node, *request);
        assert!(
            by_seq.insert(seq, text.clone()).is_none(),
            "two frames at {seq:?}"
        );
    }
    // Sequence numbers are 1..=15 with no gap.
    let seqs: Vec<u64> = by_seq.keys().map(|s| s.0).collect();
    assert_eq!(seqs, (1..=15).collect::<Vec<_>>());
    let expected: Vec<(Seq, Vec<u8>)> = by_seq.into_iter().collect();
    for (node, user) in [(0, &w.alice), (1, &w.bob), (2, &w.carol)] {
        assert_eq!(w.c.read(node, user, room), expected, "node {node}");
    }

    // Live: more frames after everyone has read the history arrive after it, in
    // the same order everywhere.
    let request = w.c.publish(1, &w.bob.clone(), room, b"live");
    w.c.settle();
    let seq = committed(&mut w.c, 1, request);
    assert_eq!(seq, Seq(16));
    for (node, user) in [(0, &w.alice), (1, &w.bob), (2, &w.carol)] {
        let read = w.c.read(node, user, room);
        assert_eq!(read.len(), 16);
        assert_eq!(read[..15], expected[..]);
        assert_eq!(read[15], (Seq(16), b"live".to_vec()));
    }
}

#[test]
fn history_visibility_follows_the_room_policy() {
    for (history, first_visible) in [(History::FromJoin, 3), (History::FromEpoch, 1)] {
        let mut w = world(2);
        let room = w.c.create_room(
            0,
            &w.alice.clone(),
            Policy {
                persist: true,
                history,
            },
        );
        let bob = w.bob.clone();
        w.c.invite(0, &w.alice.clone(), room, &bob, 1, RoomRole::Member);
        for text in [b"one", b"two"] {
            w.c.publish(0, &w.alice.clone(), room, text);
        }
        w.c.settle();
        let carol = w.carol.clone();
        assert_eq!(
            w.c.invite(0, &w.alice.clone(), room, &carol, 2, RoomRole::Member),
            Outcome::Done
        );
        w.c.publish(1, &bob, room, b"three");
        w.c.settle();
        let seen: Vec<u64> = w.c.read(2, &carol, room).iter().map(|(s, _)| s.0).collect();
        assert_eq!(seen, (first_visible..=3).collect::<Vec<_>>(), "{history:?}");
    }
}

/// A new member node pulls the whole history its new member may read, page after
/// page, and gets no live frame before the history's end: it holds a gapless
/// prefix of the room at every moment, however long the history.
#[test]
fn a_new_member_node_pulls_a_long_history_in_order_while_the_room_goes_on() {
    use conclave_actors::domain::state::rooms::{self, BACKFILL_PAGE_FRAMES};
    let mut w = world(4);
    let policy = Policy {
        persist: true,
        history: History::FromEpoch,
    };
    let (alice, carol) = (w.alice.clone(), w.carol.clone());
    let room = w.c.create_room(0, &alice, policy);
    let history = 2 * BACKFILL_PAGE_FRAMES as u64 + 4;
    for i in 0..history {
        w.c.publish(0, &alice, room, format!("m{i}").as_bytes());
        if i % 64 == 63 {
            w.c.settle();
        }
    }
    w.c.settle();
    // The invitation, then at once more frames: the room goes on while node 2
    // catches up.
    let chain = w.c.chain(0, room);
    let keys = w.c.keys(0, &alice, room);
    let invitee = Invitee {
        user: carol.public(),
        home: w.c.id(2),
        role: RoomRole::Member,
    };
    let op = client::invite(w.c.rng(), &alice, &chain, &keys[&chain.epoch], invitee).unwrap();
    let invite = w.c.request(0, &alice, op);
    let live = 40;
    for i in 0..live {
        w.c.publish(0, &alice, room, format!("live {i}").as_bytes());
    }
    // Two virtual seconds, looked at every 5 ms.
    let mut held = Vec::new();
    for _ in 0..400 {
        w.c.run_for(Duration::from_millis(5));
        let txn = w.c.nodes[2].store.read().unwrap();
        let stored = rooms::frames(&*txn, room, Seq(1), 4_096).unwrap();
        let seqs: Vec<u64> = stored.iter().map(|(s, _)| s.0).collect();
        assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "a gap");
        held.push(seqs.len());
    }
    w.c.settle();
    assert_eq!(w.c.outcome(0, invite), Some(Outcome::Done));
    let seen: Vec<u64> = w.c.read(2, &carol, room).iter().map(|(s, _)| s.0).collect();
    assert_eq!(seen, (1..=history + live).collect::<Vec<_>>());
    // It was seen part way (the last page and the frames published meanwhile
    // were still to come).
    held.dedup();
    assert!(held.len() >= 2, "{held:?}");
    let txn = w.c.nodes[0].store.read().unwrap();
    assert!(rooms::catch_ups(&*txn, room, w.c.id(2)).unwrap().is_empty());
}

/// Node 0's room (persisted, history from the epoch) with `history` frames by
/// alice, and carol of node 2 invited: her node is sent the history a frame a
/// page, and its requests for more stop reaching node 0 (the link from node 2 to
/// node 0 is cut until the caller heals it), so it is still catching up.
fn a_room_node_2_catches_up_on(seed: u64, history: u64) -> (World, RoomId) {
    use conclave_actors::domain::state::rooms;
    let config = conclave_actors::domain::DomainConfig {
        history_page_frames: 1,
        ..Default::default()
    };
    let mut w = world_with(seed, config);
    let policy = Policy {
        persist: true,
        history: History::FromEpoch,
    };
    let alice = w.alice.clone();
    let room = w.c.create_room(0, &alice, policy);
    for i in 0..history {
        w.c.publish(0, &alice, room, format!("m{i}").as_bytes());
    }
    w.c.settle();
    let chain = w.c.chain(0, room);
    let keys = w.c.keys(0, &alice, room);
    let invitee = Invitee {
        user: w.carol.public(),
        home: w.c.id(2),
        role: RoomRole::Member,
    };
    let op = client::invite(w.c.rng(), &alice, &chain, &keys[&chain.epoch], invitee).unwrap();
    let invite = w.c.request(0, &alice, op);
    while w.c.outcome(0, invite).is_none() {
        w.c.run_for(Duration::from_millis(1));
    }
    w.c.cut_link(2, 0, true);
    assert_eq!(w.c.outcome(0, invite), Some(Outcome::Done));
    let txn = w.c.nodes[0].store.read().unwrap();
    assert!(!rooms::catch_ups(&*txn, room, w.c.id(2)).unwrap().is_empty());
    drop(txn);
    (w, room)
}

/// The sequence numbers of the frames node `i` holds of `room`.
fn held(w: &World, i: usize, room: RoomId) -> Vec<u64> {
    let txn = w.c.nodes[i].store.read().unwrap();
    let frames = conclave_actors::domain::state::rooms::frames(&*txn, room, Seq(1), 4_096);
    frames.unwrap().iter().map(|(s, _)| s.0).collect()
}

/// A node catching up on the history is sent frames of epochs before the room's
/// current one and of members removed since: it checks each against the epoch
/// and the membership at its sequence number, not today's. The removal of its
/// last member ends what it is owed there: all before it, nothing after.
#[test]
fn a_node_catching_up_across_a_rekey_and_its_members_removal_gets_all_before_and_nothing_after() {
    use conclave_actors::domain::state::rooms::{self, CatchUp};
    let (mut w, room) = a_room_node_2_catches_up_on(5, 12);
    let (alice, carol) = (w.alice.clone(), w.carol.clone());
    assert_eq!(w.c.rekey(0, &alice, room), Outcome::Done);
    for i in 0..3 {
        w.c.publish(0, &alice, room, format!("epoch 2: {i}").as_bytes());
    }
    assert_eq!(w.c.remove(0, &alice, room, carol.user_id()), Outcome::Done);
    let txn = w.c.nodes[0].store.read().unwrap();
    let owed = rooms::catch_ups(&*txn, room, w.c.id(2)).unwrap();
    drop(txn);
    assert!(
        matches!(
            owed[..],
            [CatchUp {
                until: Some(Seq(16)),
                ..
            }]
        ),
        "frames 1 to 15 came before the removal: {owed:?}"
    );
    for i in 0..2 {
        w.c.publish(0, &alice, room, format!("epoch 3: {i}").as_bytes());
    }
    w.c.cut_link(2, 0, false);
    w.c.settle();
    assert_eq!(held(&w, 2, room), (1..=15).collect::<Vec<_>>());
    let read: Vec<u64> = w.c.read(2, &carol, room).iter().map(|(s, _)| s.0).collect();
    assert_eq!(read, (1..=15).collect::<Vec<_>>());
    let txn = w.c.nodes[0].store.read().unwrap();
    assert!(rooms::catch_ups(&*txn, room, w.c.id(2)).unwrap().is_empty());
}

/// A node whose member is removed and invited again before it caught up is owed
/// two stretches of the history: it gets the first to the removal, then the
/// second, each frame once, in order, with no gap between what it may hold.
#[test]
fn a_node_invited_again_before_it_caught_up_gets_both_stretches_in_order() {
    use conclave_actors::domain::state::rooms;
    let (mut w, room) = a_room_node_2_catches_up_on(6, 10);
    let (alice, carol) = (w.alice.clone(), w.carol.clone());
    assert_eq!(w.c.remove(0, &alice, room, carol.user_id()), Outcome::Done);
    for i in 0..3 {
        w.c.publish(0, &alice, room, format!("while away {i}").as_bytes());
    }
    let invited = w.c.invite(0, &alice, room, &carol, 2, RoomRole::Member);
    assert_eq!(invited, Outcome::Done);
    let txn = w.c.nodes[0].store.read().unwrap();
    assert_eq!(rooms::catch_ups(&*txn, room, w.c.id(2)).unwrap().len(), 2);
    drop(txn);
    for i in 0..2 {
        w.c.publish(0, &alice, room, format!("back {i}").as_bytes());
    }
    w.c.cut_link(2, 0, false);
    w.c.settle();
    // The removal started epoch 2 at frame 11, which the second invitation
    // reads from (history from the epoch).
    assert_eq!(held(&w, 2, room), (1..=15).collect::<Vec<_>>());
    let read: Vec<u64> = w.c.read(2, &carol, room).iter().map(|(s, _)| s.0).collect();
    assert_eq!(read, (11..=15).collect::<Vec<_>>());
    let txn = w.c.nodes[0].store.read().unwrap();
    assert!(rooms::catch_ups(&*txn, room, w.c.id(2)).unwrap().is_empty());
}

#[test]
fn a_removed_member_gets_no_later_frame_or_key_and_old_epoch_frames_are_refused() {
    let mut w = world(3);
    let room = room_of_three(&mut w, Policy::default());
    let (alice, bob, carol) = (w.alice.clone(), w.bob.clone(), w.carol.clone());
    w.c.publish(0, &alice, room, b"before");
    w.c.settle();
    // Bob seals a frame with epoch 1's key now, to send after the removal.
    let bob_keys = w.c.keys(1, &bob, room);
    let stale =
        w.c.seal(&bob, room, Epoch(1), &bob_keys[&Epoch(1)], b"stale")
            .unwrap();

    assert_eq!(w.c.remove(0, &alice, room, carol.user_id()), Outcome::Done);
    let carried_before = w.c.carried.len();
    for text in [b"after 1", b"after 2"] {
        w.c.publish(0, &alice, room, text);
        w.c.publish(1, &bob, room, text);
    }
    w.c.settle();

    // Node 2 hosts only carol: nothing of epoch 2 reached it, frame or key.
    let node2 = w.c.id(2);
    let leaked: Vec<_> = w.c.carried[..]
        .iter()
        .filter(|m| m.to == node2 && m.epochs.iter().any(|&(r, e)| r == room && e >= Epoch(2)))
        .collect();
    assert!(
        leaked.is_empty(),
        "epoch 2 reached the removed member's node: {leaked:?}"
    );
    assert!(w.c.carried.len() > carried_before);
    assert_eq!(
        w.c.keys(2, &carol, room)
            .keys()
            .copied()
            .collect::<Vec<_>>(),
        vec![Epoch(1)]
    );
    // Carol reads what she could before, nothing after.
    let carol_read: Vec<Vec<u8>> =
        w.c.read(2, &carol, room)
            .into_iter()
            .map(|(_, t)| t)
            .collect();
    assert_eq!(carol_read, vec![b"before".to_vec()]);
    // The others read everything, in the same order, and hold epoch 2's key.
    let alice_read = w.c.read(0, &alice, room);
    assert_eq!(alice_read.len(), 5);
    assert_eq!(w.c.read(1, &bob, room), alice_read);
    assert!(w.c.keys(1, &bob, room).contains_key(&Epoch(2)));

    // A frame of the old epoch is refused, and so is carol.
    let request = w.c.publish_frame(1, stale);
    w.c.settle();
    assert_eq!(
        denial(w.c.outcome(1, request)),
        Denial::StaleEpoch {
            current: Epoch(2),
            got: Epoch(1)
        }
    );
    let carol_keys = w.c.keys(2, &carol, room);
    let carol_frame =
        w.c.seal(&carol, room, Epoch(1), &carol_keys[&Epoch(1)], b"hi")
            .unwrap();
    let request = w.c.publish_frame(2, carol_frame);
    w.c.settle();
    assert_eq!(denial(w.c.outcome(2, request)), Denial::NotAMember);
    assert_eq!(w.c.read(0, &alice, room).len(), 5);
}

#[test]
fn a_node_down_loses_nothing_and_gets_everything_once_when_back() {
    let mut w = world(4);
    let room = room_of_three(&mut w, Policy::default());
    let (alice, bob) = (w.alice.clone(), w.bob.clone());
    for i in 0..3 {
        w.c.publish(0, &alice, room, format!("a{i}").as_bytes());
    }
    w.c.settle();
    w.c.crash(1);
    // While bob's node is down, frames for it wait in node 0's outbox.
    let mut requests = Vec::new();
    for i in 0..10 {
        requests.push(w.c.publish(0, &alice, room, format!("b{i}").as_bytes()));
    }
    w.c.settle();
    for r in &requests {
        committed(&mut w.c, 0, *r);
    }
    w.c.restart(1);
    w.c.settle();
    let alice_read = w.c.read(0, &alice, room);
    assert_eq!(alice_read.len(), 13);
    assert_eq!(w.c.read(1, &bob, room), alice_read);

    // The home crashes right after commits; nothing committed is lost, and what
    // it had not yet delivered goes out when it is back.
    w.c.partition(0, 2, true);
    let r = w.c.publish(0, &alice, room, b"c");
    w.c.settle();
    committed(&mut w.c, 0, r);
    w.c.crash(0);
    w.c.partition(0, 2, false);
    w.c.restart(0);
    w.c.settle();
    let alice_read = w.c.read(0, &alice, room);
    assert_eq!(alice_read.len(), 14);
    assert_eq!(w.c.read(2, &w.carol.clone(), room), alice_read);
    assert_eq!(w.c.read(1, &bob, room), alice_read);
}

#[test]
fn publishing_while_the_home_is_unreachable_is_queued_and_commits_later() {
    let mut w = world(5);
    let room = room_of_three(&mut w, Policy::default());
    let bob = w.bob.clone();
    w.c.partition(0, 1, true);
    let r = w.c.publish(1, &bob, room, b"queued");
    w.c.settle();
    assert_eq!(w.c.outcomes(1, r), vec![Outcome::Forwarded]);
    w.c.partition(0, 1, false);
    w.c.settle();
    committed(&mut w.c, 1, r);
    assert_eq!(w.c.read(2, &w.carol.clone(), room).len(), 1);
}

#[test]
fn a_non_members_publish_never_enters_an_outbox() {
    let mut w = world(6);
    let room = room_of_three(&mut w, Policy::default());
    let (alice, carol) = (w.alice.clone(), w.carol.clone());
    let keys = w.c.keys(2, &carol, room);
    // Carol is removed; her node still knows the room and where its home is.
    assert_eq!(w.c.remove(0, &alice, room, carol.user_id()), Outcome::Done);
    w.c.settle();
    // With the home unreachable, whatever node 2 forwarded would wait in its outbox.
    w.c.partition(0, 2, true);
    let frame =
        w.c.seal(&carol, room, Epoch(1), &keys[&Epoch(1)], b"spam")
            .expect("seal");
    let r = w.c.publish_frame(2, frame);
    w.c.settle();
    assert_eq!(
        w.c.outcomes(2, r),
        vec![Outcome::Denied(Denial::NotAMember)]
    );
    assert!(
        w.c.outbox_depths(2).is_empty(),
        "{:?}",
        w.c.outbox_depths(2)
    );
    // A member's publish from a member node still travels.
    let bob = w.bob.clone();
    let r = w.c.publish(1, &bob, room, b"from a member");
    w.c.settle();
    committed(&mut w.c, 1, r);
}

/// What node `i` reports to `user` about what they asked in `room`.
fn reported(c: &Cluster, i: usize, user: &Identity, room: RoomId, asked: Asked) -> Option<Outcome> {
    let txn = c.nodes[i].store.read().unwrap();
    outcomes::of(&*txn, user.user_id(), room, asked).unwrap()
}

#[test]
fn the_homes_late_decisions_reach_the_asking_node_after_it_restarted() {
    let mut w = world(7);
    let room = room_of_three(&mut w, Policy::default());
    let (alice, bob, carol) = (w.alice.clone(), w.bob.clone(), w.carol.clone());
    let keys = w.c.keys(1, &bob, room);
    let stale =
        w.c.seal(&bob, room, Epoch(1), &keys[&Epoch(1)], b"stale")
            .unwrap();
    assert_eq!(w.c.remove(0, &alice, room, carol.user_id()), Outcome::Done);
    w.c.settle();
    // Cut off from the home, bob's node queues a frame of the old epoch and a rekey.
    w.c.partition(0, 1, true);
    let frame = Asked::Frame { id: stale.id };
    let r1 = w.c.publish_frame(1, stale);
    let chain = w.c.chain(1, room);
    let (_key, op) = client::rekey(w.c.rng(), &bob, &chain).unwrap();
    let now = w.c.node_now(1);
    let req = client::sign(&bob, now, w.c.rng(), op);
    let rekey = Asked::Request {
        nonce: req.request.nonce,
    };
    let r2 = w.c.send_signed(1, req);
    w.c.settle();
    assert_eq!(w.c.outcomes(1, r1), vec![Outcome::Forwarded]);
    assert_eq!(w.c.outcomes(1, r2), vec![Outcome::Forwarded]);
    assert_eq!(reported(&w.c, 1, &bob, room, frame), None);
    // Bob's node restarts (nobody waits for those answers any more), then the
    // home decides.
    w.c.crash(1);
    w.c.restart(1);
    w.c.partition(0, 1, false);
    w.c.settle();
    let stale_epoch = Denial::StaleEpoch {
        current: Epoch(2),
        got: Epoch(1),
    };
    assert_eq!(
        reported(&w.c, 1, &bob, room, frame),
        Some(Outcome::Denied(stale_epoch))
    );
    assert_eq!(reported(&w.c, 1, &bob, room, rekey), Some(Outcome::Done));
    // Another user of the node learns nothing of bob's.
    assert_eq!(reported(&w.c, 1, &carol, room, rekey), None);
    // A committed frame is reported by where it was sequenced.
    let r3 = w.c.publish(1, &bob, room, b"fresh");
    w.c.settle();
    let Some(Outcome::Committed { id, seq }) = w.c.outcome(1, r3) else {
        panic!("not committed: {:?}", w.c.outcomes(1, r3));
    };
    assert_eq!(
        reported(&w.c, 1, &bob, room, Asked::Frame { id }),
        Some(Outcome::Committed { id, seq })
    );
    assert_eq!(reported(&w.c, 1, &carol, room, Asked::Frame { id }), None);
}

#[test]
fn a_late_decision_from_a_node_that_is_not_the_rooms_home_is_refused() {
    use conclave_actors::domain::{Deliverable, OutboxMsg, RoomMsg, Routed};
    let mut w = world(8);
    let room = room_of_three(&mut w, Policy::default());
    let bob = w.bob.clone();
    // Node 2 (carol's) claims a decision on bob's request for node 1 to record.
    let (n1, n2) = (w.c.id(1), w.c.id(2));
    let asked = Asked::Request { nonce: 7 };
    let routed = Routed {
        to: conclave_actors::domain::room_of(n1, room),
        msg: Deliverable::Room(RoomMsg::Decided {
            user: bob.user_id(),
            asked,
            outcome: Outcome::Denied(Denial::NotAMember),
        }),
    };
    let bytes = conclave_actors::wire::encode_bounded(&routed, 1 << 20).unwrap();
    {
        let mut txn = w.c.nodes[2].store.write().unwrap();
        conclave_actors::outbox::enqueue(&mut *txn, n1, bytes).unwrap();
        txn.commit().unwrap();
    }
    w.c.tell(conclave_actors::domain::outbox_of(n2, n1), OutboxMsg::Kick);
    w.c.settle();
    assert_eq!(reported(&w.c, 1, &bob, room, asked), None);
    assert!(
        w.c.outbox_depths(2).is_empty(),
        "refused, not offered again"
    );
}

#[test]
fn a_user_past_their_publish_quota_is_refused_limit_and_others_go_on() {
    use conclave_actors::domain::quota::{PublishQuota, QUOTA_BURST_S};
    let quota = PublishQuota {
        frames_per_s: 5,
        bytes_per_s: 1 << 20,
    };
    let config = conclave_actors::domain::DomainConfig {
        publish_quota: quota,
        ..Default::default()
    };
    let mut w = world_with(10, config);
    let room = room_of_three(&mut w, Policy::default());
    let (alice, bob) = (w.alice.clone(), w.bob.clone());
    let burst = quota.frames_per_s * QUOTA_BURST_S;
    let requests: Vec<u64> = (0..burst + 2)
        .map(|i| w.c.publish(0, &alice, room, format!("a{i}").as_bytes()))
        .collect();
    w.c.settle();
    for r in &requests[..burst as usize] {
        committed(&mut w.c, 0, *r);
    }
    for r in &requests[burst as usize..] {
        assert_eq!(denial(w.c.outcome(0, *r)).reason(), "limit");
    }
    let r = w.c.publish(1, &bob, room, b"another user");
    w.c.settle();
    committed(&mut w.c, 1, r);
    // A second later the bucket holds five frames again.
    w.c.run_for(Duration::from_secs(1));
    let r = w.c.publish(0, &alice, room, b"later");
    w.c.settle();
    committed(&mut w.c, 0, r);
}

#[test]
fn a_user_creates_at_most_their_share_of_rooms() {
    use conclave_actors::domain::state::rooms::{self, ROOMS_CREATED_PER_USER_MAX};
    let mut w = world(11);
    let (alice, bob) = (w.alice.clone(), w.bob.clone());
    w.c.create_room(0, &alice, Policy::default());
    {
        let txn = w.c.nodes[0].store.read().unwrap();
        assert_eq!(rooms::created_by(&*txn, alice.user_id()).unwrap(), 1);
    }
    // As if alice had created all she may.
    {
        let mut txn = w.c.nodes[0].store.write().unwrap();
        for _ in 1..ROOMS_CREATED_PER_USER_MAX {
            rooms::count_created(&mut *txn, alice.user_id()).unwrap();
        }
        txn.commit().unwrap();
    }
    let node = w.c.id(0);
    let (_room, _key, op) =
        client::create_room(w.c.rng(), &alice, node, Policy::default()).unwrap();
    let outcome = w.c.call(0, &alice, op);
    assert_eq!(denial(Some(outcome)).reason(), "limit");
    // Another user is not held to alice's count.
    w.c.create_room(1, &bob, Policy::default());
}

/// Counts of `conclave_requests_denied_total` by reason.
fn denied_counts(recorder: &DebuggingRecorder) -> std::collections::BTreeMap<String, u64> {
    let mut out = std::collections::BTreeMap::new();
    for (key, _, _, value) in recorder.snapshotter().snapshot().into_vec() {
        if key.kind() == MetricKind::Counter && key.key().name() == "conclave_requests_denied_total"
        {
            let reason = key
                .key()
                .labels()
                .find(|l| l.key() == "reason")
                .unwrap()
                .value()
                .to_string();
            if let DebugValue::Counter(n) = value {
                *out.entry(reason).or_default() += n;
            }
        }
    }
    out
}

/// Every refusal: its reason reaches the caller, it is counted, and the home's
/// store is not written (no commit at all).
#[test]
fn bad_input_is_refused_with_its_reason_counted_and_changes_nothing() {
    let recorder = DebuggingRecorder::new();
    metrics::with_local_recorder(&recorder, || {
        let mut w = world(6);
        let (alice, bob, carol) = (w.alice.clone(), w.bob.clone(), w.carol.clone());
        let room = w.c.create_room(0, &alice, Policy::default());
        w.c.invite(0, &alice, room, &bob, 1, RoomRole::Member);
        // A second user on node 0, a plain member.
        let admin0 = Identity::generate(w.c.rng());
        w.c.seed_admin(0, &admin0);
        let dave = Identity::generate(w.c.rng());
        w.c.call(
            0,
            &admin0,
            Op::AddUser {
                user: dave.public(),
                role: UserRole::Member,
            },
        );
        w.c.invite(0, &alice, room, &dave, 0, RoomRole::Member);
        let r = w.c.publish(0, &alice, room, b"first");
        w.c.settle();
        let first_seq = committed(&mut w.c, 0, r);
        let keys = w.c.keys(0, &alice, room);
        let key = &keys[&Epoch(1)];
        let store = std::sync::Arc::clone(&w.c.nodes[0].store);
        let check = |what: &str, outcome: Option<Outcome>, expected: &str, commits_before: u64| {
            let d = denial(outcome);
            assert_eq!(d.reason(), expected, "{what}: {d}");
            assert_eq!(store.commits(), commits_before, "{what} wrote to the store");
        };

        // Wrong signature: a frame altered after signing.
        let mut frame = w.c.seal(&alice, room, Epoch(1), key, b"x").unwrap();
        frame.ciphertext[0] ^= 1;
        let before = store.commits();
        let r = w.c.publish_frame(0, frame);
        w.c.settle();
        check("tampered frame", w.c.outcome(0, r), "bad_signature", before);

        // A frame signed by someone else than its claimed sender.
        let mut forged = w.c.seal(&alice, room, Epoch(1), key, b"x").unwrap();
        forged.sender = dave.user_id();
        let before = store.commits();
        let r = w.c.publish_frame(0, forged);
        w.c.settle();
        check("forged sender", w.c.outcome(0, r), "bad_signature", before);

        // Stale (and future) epoch.
        let future = w.c.seal(&alice, room, Epoch(7), key, b"x").unwrap();
        let before = store.commits();
        let r = w.c.publish_frame(0, future);
        w.c.settle();
        check("future epoch", w.c.outcome(0, r), "stale_epoch", before);

        // A replayed frame.
        let frame = w.c.seal(&alice, room, Epoch(1), key, b"once").unwrap();
        let r = w.c.publish_frame(0, frame.clone());
        w.c.settle();
        committed(&mut w.c, 0, r);
        let before = store.commits();
        let r = w.c.publish_frame(0, frame);
        w.c.settle();
        check("replay", w.c.outcome(0, r), "duplicate", before);

        // Publish by a non-member (registered on node 0, not in the room).
        let erin = Identity::generate(w.c.rng());
        w.c.call(
            0,
            &admin0,
            Op::AddUser {
                user: erin.public(),
                role: UserRole::Member,
            },
        );
        let frame = w.c.seal(&erin, room, Epoch(1), key, b"x").unwrap();
        let before = store.commits();
        let r = w.c.publish_frame(0, frame);
        w.c.settle();
        check("non-member", w.c.outcome(0, r), "not_a_member", before);

        // Publish by an unknown user, and by a revoked member.
        let stranger = Identity::generate(w.c.rng());
        let frame = w.c.seal(&stranger, room, Epoch(1), key, b"x").unwrap();
        let before = store.commits();
        let r = w.c.publish_frame(0, frame);
        w.c.settle();
        check("unknown user", w.c.outcome(0, r), "not_found", before);
        assert_eq!(
            w.c.call(
                0,
                &admin0,
                Op::RevokeUser {
                    user: dave.user_id()
                }
            ),
            Outcome::Done
        );
        let dave_keys = w.c.keys(0, &dave, room);
        let frame =
            w.c.seal(&dave, room, Epoch(1), &dave_keys[&Epoch(1)], b"x")
                .unwrap();
        let before = store.commits();
        let r = w.c.publish_frame(0, frame);
        w.c.settle();
        check("revoked user", w.c.outcome(0, r), "revoked", before);
        // A revoked user's requests are refused too.
        let before = store.commits();
        let outcome = w.c.call(0, &dave, Op::RoomInfo { room });
        check("revoked request", Some(outcome), "revoked", before);

        // Revoking dave evicted him: the room takes no frame until a rekey.
        let evicted = chain(&w.c, 0, room);
        assert!(!evicted.members.contains_key(&dave.user_id()));
        assert!(evicted.rekey_due);
        // Bundles: malformed, omitting a member, adding a non-member, wrong epoch.
        let (_, good) = client::rekey(w.c.rng(), &alice, &evicted).unwrap();
        let Op::Rekey { bundle, .. } = good.clone() else {
            unreachable!()
        };
        assert_eq!(bundle.len(), 2, "alice and bob remain");
        let variants: Vec<(&str, Bundle, Epoch)> = vec![
            (
                "malformed bundle",
                {
                    let mut b = bundle.clone();
                    b[0].1.ciphertext.truncate(10);
                    b
                },
                Epoch(2),
            ),
            ("bundle omitting a member", bundle[1..].to_vec(), Epoch(2)),
            (
                "bundle adding a non-member",
                {
                    let mut b = bundle.clone();
                    b.push((erin.user_id(), bundle[0].1.clone()));
                    b
                },
                Epoch(2),
            ),
            (
                "bundle naming a member twice",
                {
                    let mut b = bundle.clone();
                    b.push(bundle[0].clone());
                    b
                },
                Epoch(2),
            ),
            ("bundle for a skipped epoch", bundle.clone(), Epoch(3)),
        ];
        for (what, bundle, epoch) in variants {
            let before = store.commits();
            let outcome =
                w.c.call(0, &alice, rekey_op(&evicted, &alice, epoch, bundle));
            check(what, Some(outcome), "bad_bundle", before);
        }
        // A key for bob re-targeted at another member does not verify.
        let mut swapped = bundle.clone();
        let (a, b) = (swapped[0].1.clone(), swapped[1].1.clone());
        swapped[0].1 = b;
        swapped[1].1 = a;
        let before = store.commits();
        let outcome =
            w.c.call(0, &alice, rekey_op(&evicted, &alice, Epoch(2), swapped));
        check("swapped keys", Some(outcome), "bad_signature", before);
        // A link signed by someone else than the requester.
        let before = store.commits();
        let bobs = rekey_op(&evicted, &bob, Epoch(2), bundle.clone());
        let outcome = w.c.call(0, &alice, bobs);
        check("another's link", Some(outcome), "malformed", before);

        // Requests: bad signature, expired, unknown user, missing capability, conflict.
        let mut req = client::sign(&alice, w.c.now(), w.c.rng(), Op::RoomInfo { room });
        req.signature.0[0] ^= 1;
        let before = store.commits();
        let r = w.c.send_signed(0, req);
        w.c.settle();
        check(
            "request signature",
            w.c.outcome(0, r),
            "bad_signature",
            before,
        );
        let old = Time::from_unix_micros(w.c.now().unix_micros() - 3_600_000_000);
        let req = client::sign(&alice, old, w.c.rng(), Op::RoomInfo { room });
        let before = store.commits();
        let r = w.c.send_signed(0, req);
        w.c.settle();
        check("expired request", w.c.outcome(0, r), "expired", before);
        let before = store.commits();
        let outcome = w.c.call(
            0,
            &alice,
            Op::AddUser {
                user: stranger.public(),
                role: UserRole::Admin,
            },
        );
        check(
            "add user by non-admin",
            Some(outcome),
            "missing_capability",
            before,
        );
        let before = store.commits();
        let outcome = w.c.call(
            0,
            &admin0,
            Op::AddUser {
                user: alice.public(),
                role: UserRole::Member,
            },
        );
        check("add existing user", Some(outcome), "conflict", before);
        let before = store.commits();
        let outcome = w.c.call(0, &stranger, Op::ListRooms { after: None });
        check("unknown user request", Some(outcome), "not_found", before);
        let before = store.commits();
        let outcome = w.c.invite(0, &alice, room, &bob, 1, RoomRole::Member);
        check("invite a member again", Some(outcome), "conflict", before);
        // Bob (a plain member, remote) may not invite: refused at the home.
        let before = store.commits();
        let outcome = w.c.invite(1, &bob, room, &carol, 2, RoomRole::Member);
        assert_eq!(denial(Some(outcome)).reason(), "missing_capability");
        // Node 0 committed only the peer's high-water mark for bob's request, the
        // refusal it queued for bob's node, and that entry's removal once bob's
        // node had it (the room itself wrote nothing).
        assert!(store.commits() <= before + 3);
        assert!(
            w.c.outbox_depths(0).is_empty(),
            "{:?}",
            w.c.outbox_depths(0)
        );

        // Nothing but the first two frames was ever committed.
        let txn = store.read().unwrap();
        let frames =
            conclave_actors::domain::state::rooms::frames(&*txn, room, Seq(1), 100).unwrap();
        assert_eq!(frames.len(), 2);
        assert_eq!(frames[0].0, first_seq);
        drop(txn);

        let counts = denied_counts(&recorder);
        for (reason, at_least) in [
            ("bad_signature", 4),
            ("stale_epoch", 1),
            ("duplicate", 1),
            ("not_a_member", 1),
            ("not_found", 2),
            ("revoked", 2),
            ("bad_bundle", 5),
            ("expired", 1),
            ("missing_capability", 2),
            ("conflict", 2),
        ] {
            assert!(
                counts.get(reason).copied().unwrap_or(0) >= at_least,
                "{reason}: {counts:?}"
            );
        }
    });
}

#[test]
fn a_bundle_for_a_room_member_set_that_changed_is_refused() {
    let mut w = world(7);
    let room = room_of_three(&mut w, Policy::default());
    let alice = w.alice.clone();
    // A removal prepared before carol left no longer follows the room's chain.
    let before = chain(&w.c, 0, room);
    let (_, op) = client::remove(w.c.rng(), &alice, &before, w.bob.user_id()).unwrap();
    assert_eq!(
        w.c.remove(0, &alice, room, w.carol.user_id()),
        Outcome::Done
    );
    let outcome = w.c.call(0, &alice, op.clone());
    assert_eq!(denial(Some(outcome)).reason(), "stale_chain");
    // Linked to the new head, its bundle is not for exactly the members.
    let Op::Remove { bundle, .. } = op else {
        unreachable!()
    };
    let after = chain(&w.c, 0, room);
    let change = Change::Remove {
        user: w.bob.user_id(),
        epoch: Epoch(3),
        check: KeyCheck([0; 32]),
    };
    let relinked = Op::Remove {
        link: after.next_link(&alice, change),
        bundle,
    };
    let outcome = w.c.call(0, &alice, relinked);
    assert_eq!(denial(Some(outcome)).reason(), "bad_bundle");
}

#[test]
fn invites_need_a_valid_invitee_and_key() {
    let mut w = world(8);
    let alice = w.alice.clone();
    let room = w.c.create_room(0, &alice, Policy::default());
    let keys = w.c.keys(0, &alice, room);
    let key = &keys[&Epoch(1)];
    let chain = chain(&w.c, 0, room);
    // A key sealed to someone else than the invitee.
    let (home1, home2) = (w.c.id(1), w.c.id(2));
    let op = client::invite(
        w.c.rng(),
        &alice,
        &chain,
        key,
        Invitee {
            user: w.carol.public(),
            home: home2,
            role: RoomRole::Member,
        },
    )
    .unwrap();
    let Op::Invite {
        key: sealed_for_carol,
        ..
    } = op
    else {
        unreachable!()
    };
    let bob_invitee = Invitee {
        user: w.bob.public(),
        home: home1,
        role: RoomRole::Member,
    };
    let change = Change::Invite {
        invitee: bob_invitee,
        epoch: Epoch(1),
    };
    let op = Op::Invite {
        link: chain.next_link(&alice, change),
        key: sealed_for_carol,
    };
    assert_eq!(
        denial(Some(w.c.call(0, &alice, op))).reason(),
        "bad_signature"
    );
    // A second owner: nobody may make one (the chain's rule, the home's too).
    let op = client::invite(
        w.c.rng(),
        &alice,
        &chain,
        key,
        Invitee {
            role: RoomRole::Owner,
            ..bob_invitee
        },
    )
    .unwrap();
    assert_eq!(
        denial(Some(w.c.call(0, &alice, op))).reason(),
        "missing_capability"
    );
}

/// A room id names its creator and home: a user on another node cannot create a
/// room with an existing room's id (and so cannot make that room's member nodes
/// take it for another home's room); every node derives the id from the signed
/// creation.
#[test]
fn a_room_id_is_bound_to_its_creation() {
    use conclave_actors::crypto::{seal_epoch_key, EpochKey};
    let mut w = world(10);
    let (alice, bob, carol) = (w.alice.clone(), w.bob.clone(), w.carol.clone());
    let room = w.c.create_room(0, &alice, Policy::default());
    w.c.invite(0, &alice, room, &carol, 2, RoomRole::Member);
    // Bob, on node 1, creates a room with alice's room id, homed on his node, with
    // a valid first key sealed by and to himself for that id.
    let n1 = w.c.id(1);
    let key = EpochKey::generate(w.c.rng());
    let exchange = x25519_dalek::PublicKey::from(bob.public().exchange);
    let sealed = seal_epoch_key(
        w.c.rng(),
        bob.signing_key(),
        &exchange,
        room,
        Epoch(1),
        &key,
    )
    .unwrap();
    let link = SignedLink::sign(
        &bob,
        Link {
            room,
            prev: ChainHash::GENESIS,
            by: Signer::User(bob.user_id()),
            change: Change::Create {
                creator: bob.public(),
                home: n1,
                nonce: [7; 16],
                policy: Policy::default(),
                check: KeyCheck::of(room, Epoch(1), &key),
            },
        },
    );
    let op = Op::CreateRoom { link, key: sealed };
    let denied = denial(Some(w.c.call(1, &bob, op)));
    assert_eq!(denied.reason(), "malformed", "{denied}");
    // Alice's room goes on for carol on node 2.
    let r = w.c.publish(0, &alice, room, b"still alice's room");
    w.c.settle();
    committed(&mut w.c, 0, r);
    assert_eq!(
        w.c.read(2, &carol, room),
        vec![(Seq(1), b"still alice's room".to_vec())]
    );
    // A creation whose id is derived is accepted, on any node.
    let own = w.c.create_room(1, &bob, Policy::default());
    assert_ne!(own, room);
}

/// A peer cannot claim to be the home of a room it does not hold: a member node
/// that has not seen the room yet takes its first snapshot only with the creator's
/// signed creation naming the sender as home.
#[test]
fn a_peer_cannot_claim_a_room_homed_elsewhere() {
    use conclave_actors::domain::{room::Update, state::rooms::RoomMeta};
    use conclave_actors::domain::{Deliverable, OutboxMsg, RoomMsg, Routed};
    let mut w = world(9);
    let (alice, bob, carol) = (w.alice.clone(), w.bob.clone(), w.carol.clone());
    let room = w.c.create_room(0, &alice, Policy::default());
    w.c.invite(0, &alice, room, &bob, 1, RoomRole::Member);
    // Node 1 (bob's) forges a snapshot of alice's room naming itself as home, with
    // a creation signed by bob, and queues it for node 2 through its outbox.
    let (n1, n2) = (w.c.id(1), w.c.id(2));
    let Op::CreateRoom { link, .. } = client::create_room(w.c.rng(), &bob, n1, Policy::default())
        .unwrap()
        .2
    else {
        unreachable!()
    };
    let mut claim = link.link;
    claim.room = room;
    let forged_create = SignedLink::sign(&bob, claim);
    let meta = RoomMeta {
        home: n1,
        policy: Policy::default(),
        epoch: Epoch(1),
        epoch_start: Seq(1),
        next_seq: Seq(1),
        owner: alice.user_id(),
        members_version: 1,
        rekey_due: false,
    };
    let routed = Routed {
        to: conclave_actors::domain::room_of(n2, room),
        msg: Deliverable::Room(RoomMsg::Update(Update::Members {
            meta,
            members: Vec::new(),
            create: Box::new(forged_create),
        })),
    };
    let bytes = conclave_actors::wire::encode_bounded(&routed, 1 << 20).unwrap();
    {
        let store = &w.c.nodes[1].store;
        let mut txn = store.write().unwrap();
        conclave_actors::outbox::enqueue(&mut *txn, n2, bytes).unwrap();
        txn.commit().unwrap();
    }
    w.c.tell(conclave_actors::domain::outbox_of(n1, n2), OutboxMsg::Kick);
    w.c.settle();
    {
        let txn = w.c.nodes[2].store.read().unwrap();
        assert_eq!(
            conclave_actors::domain::state::rooms::meta(&*txn, room).unwrap(),
            None,
            "the forged snapshot was taken"
        );
    }
    // The real home's invite still works.
    assert_eq!(
        w.c.invite(0, &alice, room, &carol, 2, RoomRole::Member),
        Outcome::Done
    );
    let r = w.c.publish(0, &alice, room, b"from the real home");
    w.c.settle();
    committed(&mut w.c, 0, r);
    assert_eq!(
        w.c.read(2, &carol, room),
        vec![(Seq(1), b"from the real home".to_vec())]
    );
}

/// An X25519 key is bound to its identity by the identity's own signature: the
/// registry, the room's home and a sealing client refuse a key its owner did not
/// sign (a node substituting its own) and a low-order key (which would make every
/// sealed key readable and every honest removal fail).
#[test]
fn x25519_keys_must_be_bound_to_their_identity() {
    use conclave_actors::crypto::SealError;
    use conclave_actors::identity::EXCHANGE_BINDING_TAG;
    use conclave_actors::PublicIdentity;
    use ed25519_dalek::Signer;
    let mut w = world(11);
    let admin = Identity::generate(w.c.rng());
    w.c.seed_admin(0, &admin);
    let (alice, bob) = (w.alice.clone(), w.bob.clone());
    let dave = Identity::generate(w.c.rng());
    // Dave's id with bob's X25519 key: not signed by dave.
    let swapped = PublicIdentity {
        exchange: bob.public().exchange,
        ..dave.public()
    };
    // A low-order X25519 key that dave did sign.
    let low = [0u8; 32];
    let mut message = EXCHANGE_BINDING_TAG.to_vec();
    message.extend_from_slice(&low);
    let low_order = PublicIdentity {
        exchange: low,
        binding: conclave_actors::crypto::SignatureBytes(
            dave.signing_key().sign(&message).to_bytes(),
        ),
        ..dave.public()
    };
    for user in [swapped, low_order] {
        let op = Op::AddUser {
            user,
            role: UserRole::Member,
        };
        let refused = denial(Some(w.c.call(0, &admin, op)));
        assert_eq!(refused.reason(), "malformed", "{refused}");
    }
    // The home refuses to invite an unbound key, even with a key sealed to it.
    let room = w.c.create_room(0, &alice, Policy::default());
    let keys = w.c.keys(0, &alice, room);
    let sealed = conclave_actors::crypto::seal_epoch_key(
        w.c.rng(),
        alice.signing_key(),
        &x25519_dalek::PublicKey::from(swapped.exchange),
        room,
        Epoch(1),
        &keys[&Epoch(1)],
    )
    .unwrap();
    let invitee = Invitee {
        user: swapped,
        home: w.c.id(1),
        role: RoomRole::Member,
    };
    let chain_now = chain(&w.c, 0, room);
    let change = Change::Invite {
        invitee,
        epoch: Epoch(1),
    };
    let op = Op::Invite {
        link: chain_now.next_link(&alice, change),
        key: sealed,
    };
    assert_eq!(denial(Some(w.c.call(0, &alice, op))).reason(), "malformed");
    // A client refuses to seal to an unbound key, whoever handed it the invitee.
    let refused = client::invite(w.c.rng(), &alice, &chain_now, &keys[&Epoch(1)], invitee);
    assert_eq!(refused.unwrap_err(), SealError::UnboundRecipient);
    // Members come from the verified chain, where every key is bound: a member
    // list with a substituted key (what a lying node would hand over) is not
    // sealed to.
    w.c.invite(0, &alice, room, &bob, 1, RoomRole::Member);
    let mut forged = chain(&w.c, 0, room);
    if let Some(m) = forged.members.get_mut(&bob.user_id()) {
        m.identity.exchange = dave.public().exchange;
    }
    let refused = client::remove(w.c.rng(), &alice, &forged, alice.user_id());
    assert_eq!(refused.err(), Some(SealError::UnboundRecipient));
}

/// Revoking a user evicts them from every room they are in (a link signed by the
/// room's home on the word of the user's node), and the room takes no frame until
/// a member moves it to a new epoch, whose key the evicted user's node never gets.
#[test]
fn revocation_evicts_the_user_from_their_rooms_and_the_room_rekeys() {
    let mut w = world(12);
    let room = room_of_three(&mut w, Policy::default());
    let (alice, bob, carol) = (w.alice.clone(), w.bob.clone(), w.carol.clone());
    let admin1 = Identity::generate(w.c.rng());
    w.c.seed_admin(1, &admin1);
    let revoke = Op::RevokeUser {
        user: bob.user_id(),
    };
    assert_eq!(w.c.call(1, &admin1, revoke), Outcome::Done);
    w.c.settle();
    // Every node's chain ends with bob's eviction, signed by the home.
    for i in 0..3 {
        let state = chain(&w.c, i, room);
        assert!(!state.members.contains_key(&bob.user_id()), "node {i}");
        assert!(state.rekey_due, "node {i}");
    }
    let r = w.c.publish(0, &alice, room, b"before the rekey");
    w.c.settle();
    assert_eq!(denial(w.c.outcome(0, r)), Denial::RekeyNeeded);
    // Carol (a plain member, on node 2) rekeys; then frames flow again.
    let state = chain(&w.c, 2, room);
    let (_, op) = client::rekey(w.c.rng(), &carol, &state).unwrap();
    assert_eq!(w.c.call(2, &carol, op), Outcome::Done);
    let r = w.c.publish(0, &alice, room, b"after the rekey");
    w.c.settle();
    committed(&mut w.c, 0, r);
    assert_eq!(
        w.c.read(2, &carol, room)
            .into_iter()
            .map(|(_, t)| t)
            .collect::<Vec<_>>(),
        vec![b"after the rekey".to_vec()]
    );
    // Bob's node holds no key of the new epoch, and reads him nothing new.
    let txn = w.c.nodes[1].store.read().unwrap();
    let bob_epochs: Vec<Epoch> =
        conclave_actors::domain::state::keys::sealed_for(&*txn, room, bob.user_id())
            .unwrap()
            .into_iter()
            .map(|(e, _)| e)
            .collect();
    assert_eq!(bob_epochs, vec![Epoch(1)]);
    let vis = conclave_actors::domain::state::rooms::visibility(&*txn, bob.user_id(), room)
        .unwrap()
        .expect("bob was a member");
    assert!(vis.until.is_some(), "bob's reading did not end");
}

/// An epoch key encrypts at most `epoch_frames_max` frames: past that the home
/// asks for a rekey, and takes frames again under the new key.
#[test]
fn past_the_epoch_frame_bound_the_room_asks_for_a_rekey() {
    let config = conclave_actors::domain::DomainConfig {
        epoch_frames_max: 3,
        ..Default::default()
    };
    let mut w = world_with(13, config);
    let room = room_of_three(&mut w, Policy::default());
    let alice = w.alice.clone();
    for text in [b"1", b"2", b"3"] {
        let r = w.c.publish(0, &alice, room, text);
        w.c.settle();
        committed(&mut w.c, 0, r);
    }
    let r = w.c.publish(0, &alice, room, b"4");
    w.c.settle();
    assert_eq!(denial(w.c.outcome(0, r)), Denial::RekeyNeeded);
    let state = chain(&w.c, 0, room);
    let (_, op) = client::rekey(w.c.rng(), &alice, &state).unwrap();
    assert_eq!(w.c.call(0, &alice, op), Outcome::Done);
    let r = w.c.publish(0, &alice, room, b"4");
    w.c.settle();
    assert_eq!(committed(&mut w.c, 0, r), Seq(4));
    assert_eq!(chain(&w.c, 0, room).epoch, Epoch(2));
}

//! The client protocol over real QUIC: users of a node act through it exactly as
//! through the embedding API, and a client the registry refuses is told why.

use std::time::Duration;

use conclave::{
    ApiError, Denial, Identity, Node, Policy, Position, Receipt, RemoteNode, RoomRole, UserRole,
};

fn rng() -> rand_core::UnwrapErr<getrandom::SysRng> {
    rand_core::UnwrapErr(getrandom::SysRng)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_users_act_like_local_ones_and_refusals_carry_their_reason() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::builder().data_dir(dir.path()).start().await.unwrap();
    let addr = node.local_addr().unwrap();
    let admin = Identity::generate(&mut rng());
    node.seed_admin(&admin.public()).unwrap();

    // An unknown user is refused with not_found.
    let stranger = Identity::generate(&mut rng());
    match RemoteNode::connect(&stranger, addr, Some(node.id())).await {
        Err(ApiError::Denied(Denial::NotFound { .. })) => {}
        other => panic!("expected not_found, got {other:?}"),
    }

    // The admin registers alice and bob over the protocol.
    let admin = RemoteNode::connect(&admin, addr, Some(node.id()))
        .await
        .expect("admin connects");
    let (alice_id, bob_id) = (
        Identity::generate(&mut rng()),
        Identity::generate(&mut rng()),
    );
    admin
        .add_user(&alice_id.public(), UserRole::Member)
        .await
        .unwrap();
    admin
        .add_user(&bob_id.public(), UserRole::Member)
        .await
        .unwrap();
    let users = admin.list_users().await.unwrap();
    assert_eq!(users.len(), 3);
    let alice = RemoteNode::connect(&alice_id, addr, None).await.unwrap();
    let bob = RemoteNode::connect(&bob_id, addr, None).await.unwrap();
    // A member may not add users.
    match alice.add_user(&stranger.public(), UserRole::Member).await {
        Err(ApiError::Denied(Denial::MissingCapability { .. })) => {}
        other => panic!("expected missing_capability, got {other:?}"),
    }

    // Rooms, invites, publish and subscribe, encrypted in the clients.
    let room = alice.create_room(Policy::default()).await.unwrap();
    // An invitee must be homed on a node of the cluster.
    let nowhere = Identity::generate(&mut rng()).node_id();
    match alice
        .invite(room, &bob.public(), nowhere, RoomRole::Member)
        .await
    {
        Err(ApiError::Denied(Denial::NotFound { .. })) => {}
        other => panic!("expected not_found for an unknown home, got {other:?}"),
    }
    alice
        .invite(room, &bob.public(), node.id(), RoomRole::Member)
        .await
        .unwrap();
    assert!(matches!(
        alice
            .publish(room, b"over the client protocol")
            .await
            .unwrap(),
        Receipt::Committed { .. }
    ));
    let mut sub = bob.subscribe(room, Position::Start).await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.body, b"over the client protocol");
    assert_eq!(first.sender, alice.id());
    bob.publish(room, b"live").await.unwrap();
    let second = tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(second.body, b"live");
    assert_eq!(bob.list_rooms().await.unwrap(), vec![(room, node.id())]);
    // The node stored ciphertext only.
    let frames = node.stored_frames(room, conclave::Seq(1), 10).unwrap();
    assert_eq!(frames.len(), 2);
    assert!(frames.iter().all(|(_, f)| !f
        .ciphertext
        .windows(4)
        .any(|w| w == b"over" || w == b"live")));

    // Revoked: bob's next connection is refused with revoked, and requests on his
    // open connection are refused too; alice is still served.
    admin.revoke_user(bob.id()).await.unwrap();
    match RemoteNode::connect(&bob_id, addr, None).await {
        Err(ApiError::Denied(Denial::Revoked)) => {}
        other => panic!("expected revoked, got {other:?}"),
    }
    match bob.publish(room, b"after revocation").await {
        Err(ApiError::Denied(Denial::Revoked)) => {}
        other => panic!("expected revoked, got {other:?}"),
    }
    assert!(matches!(
        alice.publish(room, b"still served").await.unwrap(),
        Receipt::Committed { .. }
    ));

    // Connections per user are bounded; the others keep being served.
    let mut held = Vec::new();
    for _ in 1..conclave::client::CONNECTIONS_PER_USER_MAX {
        held.push(
            RemoteNode::connect(&alice_id, addr, None)
                .await
                .expect("within the limit"),
        );
    }
    match RemoteNode::connect(&alice_id, addr, None).await {
        Err(ApiError::Denied(Denial::Limit { .. })) => {}
        other => panic!("expected limit, got {other:?}"),
    }
    assert!(admin.list_users().await.is_ok());
    drop(held);

    // A client expecting another node id refuses the node.
    let other = Identity::generate(&mut rng()).node_id();
    assert!(RemoteNode::connect(&alice_id, addr, Some(other))
        .await
        .is_err());
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_of_a_client_that_vanished_stop_counting_against_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::builder().data_dir(dir.path()).start().await.unwrap();
    let addr = node.local_addr().unwrap();
    let alice = Identity::generate(&mut rng());
    node.seed_admin(&alice.public()).unwrap();
    let limit = conclave::client::CONNECTIONS_PER_USER_MAX;

    // A client process holding every connection alice may have, on a runtime of
    // its own: dropping it is the process being killed (no close is sent).
    let vanishing = tokio::runtime::Runtime::new().unwrap();
    let held = {
        let alice = alice.clone();
        vanishing
            .spawn(async move {
                let mut held = Vec::new();
                for _ in 0..limit {
                    held.push(
                        RemoteNode::connect(&alice, addr, None)
                            .await
                            .expect("within"),
                    );
                }
                held
            })
            .await
            .unwrap()
    };
    // While that client is alive, its connections count.
    match RemoteNode::connect(&alice, addr, None).await {
        Err(ApiError::Denied(Denial::Limit { .. })) => {}
        other => panic!("expected limit, got {other:?}"),
    }
    vanishing.shutdown_background();
    drop(held);

    // Once it is gone, its silent connections no longer do.
    let back = RemoteNode::connect(&alice, addr, None)
        .await
        .expect("served again once the vanished client's connections are silent");
    assert!(back.list_users().await.is_ok());
    node.shutdown().await;
}

/// The store bound of [`a_full_store_makes_the_node_not_ready_and_says_why`].
const SMALL_STORE_BYTES: usize = 4 << 20;
/// More publishes than that store can hold.
const PUBLISHES_MAX: usize = 10_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_store_makes_the_node_not_ready_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::builder()
        .data_dir(dir.path())
        .store_bytes_max(SMALL_STORE_BYTES)
        .start()
        .await
        .unwrap();
    let alice = Identity::generate(&mut rng());
    node.seed_admin(&alice.public()).unwrap();
    let alice = node.user(alice).await.unwrap();
    let room = alice.create_room(Policy::default()).await.unwrap();
    assert!(node.health().ready);
    let body = vec![b'x'; 32 << 10];
    let mut refused = None;
    for _ in 0..PUBLISHES_MAX {
        if let Err(error) = alice.publish(room, &body).await {
            refused = Some(error);
            break;
        }
    }
    let refused = refused.expect("a 4 MiB store fills up");
    // Refused with its reason, before the store itself fails.
    assert!(
        matches!(refused, ApiError::Denied(Denial::StoreFull { .. })),
        "{refused}"
    );
    let health = node.health();
    assert!(!health.ready, "{health:?} after {refused}");
    let failure = health.failure.unwrap_or_default();
    assert!(failure.starts_with("store_full"), "{failure}");
    node.shutdown().await;
}

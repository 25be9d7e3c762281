//! The Raft groups every node hosts (issue 15's first steps), driven by the
//! simulator: elections, replication of proposals, a leader's crash, and a node
//! back with an empty disk that must catch up before it votes.

use std::time::Duration;

use conclave_actors::domain::DomainConfig;
use conclave_actors::domain::{Denial, Outcome};
use conclave_actors::replication::host::replicas_of;
use conclave_actors::replication::log::{self, Applied};
use conclave_actors::replication::{ProposalId, ReplicasMsg, Replication};
use conclave_sim::Cluster;
use conclave_storage::Store;

/// Three nodes, a meta group and two shards, each on all three.
fn cluster(seed: u64) -> Cluster {
    let config = DomainConfig {
        replication: Some(Replication {
            shards: 2,
            factor: 3,
            tick: Duration::from_millis(50),
            rooms: false,
        }),
        ..DomainConfig::default()
    };
    Cluster::with_config(3, seed, config)
}

/// The node leading `group` in the latest term any node announced.
fn leader(c: &Cluster, group: u64) -> Option<(usize, u64)> {
    c.leading
        .iter()
        .filter(|&&(_, g, _)| g == group)
        .max_by_key(|&&(_, _, term)| term)
        .map(|&(node, _, term)| (node, term))
}

fn applied(c: &Cluster, i: usize, group: u64) -> Applied {
    let txn = c.nodes[i].store.read().unwrap();
    log::applied(&*txn, group).unwrap()
}

fn rejoining(c: &Cluster, i: usize, group: u64) -> Option<u64> {
    let txn = c.nodes[i].store.read().unwrap();
    log::rejoining(&*txn, group).unwrap()
}

/// Proposes `text` to `group` through node `i`; returns the request number its
/// outcome comes back under.
fn propose(c: &mut Cluster, i: usize, group: u64, text: &str) -> u64 {
    let data = text.as_bytes().to_vec();
    let request = c.new_request();
    let mut id = [0; 16];
    id[..8].copy_from_slice(&request.to_le_bytes());
    let id = ProposalId(id);
    let msg = ReplicasMsg::Propose {
        group,
        id,
        data,
        request,
    };
    c.tell(replicas_of(c.id(i)), msg);
    request
}

#[test]
fn every_group_elects_one_leader_and_its_replicas_apply_the_same_entries() {
    let mut c = cluster(1);
    c.run_for(Duration::from_secs(5));
    for group in 0..=2 {
        let (leader, _) = leader(&c, group).expect("a leader within 5 s");
        for n in 0..10 {
            // Through every node: followers forward to the leader.
            propose(&mut c, (leader + n) % 3, group, &format!("entry {n}"));
        }
    }
    c.run_for(Duration::from_secs(3));
    for group in 0..=2 {
        let first = applied(&c, 0, group);
        // The leader's empty entry of each term, and the ten proposals.
        assert!(first.index >= 11, "group {group} applied {}", first.index);
        for i in 1..3 {
            assert_eq!(applied(&c, i, group), first, "group {group} on n{i}");
        }
    }
}

#[test]
fn when_a_leader_crashes_another_node_leads_in_a_later_term_and_nothing_is_lost() {
    let mut c = cluster(2);
    c.run_for(Duration::from_secs(5));
    let (first, term) = leader(&c, 0).expect("a leader");
    propose(&mut c, first, 0, "before");
    c.run_for(Duration::from_secs(1));
    let before = applied(&c, first, 0);
    c.crash(first);
    c.run_for(Duration::from_secs(5));
    let (second, later) = leader(&c, 0).expect("a new leader");
    assert_ne!(second, first);
    assert!(later > term);
    propose(&mut c, second, 0, "after");
    c.run_for(Duration::from_secs(1));
    c.restart(first);
    c.run_for(Duration::from_secs(5));
    let now = applied(&c, first, 0);
    assert!(now.index > before.index, "the restarted node caught up");
    for i in 0..3 {
        assert_eq!(applied(&c, i, 0), now, "n{i}");
    }
}

#[test]
fn a_node_back_with_an_empty_disk_catches_up_before_it_votes_again() {
    let mut c = cluster(3);
    c.run_for(Duration::from_secs(5));
    for n in 0..5 {
        propose(&mut c, 0, 1, &format!("entry {n}"));
    }
    c.run_for(Duration::from_secs(2));
    let (leader, _) = leader(&c, 1).expect("a leader");
    let follower = (leader + 1) % 3;
    let held = applied(&c, leader, 1);
    c.reborn(follower);
    assert_eq!(
        rejoining(&c, follower, 1),
        Some(0),
        "marked rejoining, no leader heard yet"
    );
    assert_eq!(applied(&c, follower, 1), Applied::default());
    c.run_for(Duration::from_secs(5));
    assert_eq!(rejoining(&c, follower, 1), None, "caught up");
    let now = applied(&c, follower, 1);
    assert!(now.index >= held.index);
    assert_eq!(now, applied(&c, leader, 1));
    // It recorded a vote for the leader of the term it came back in.
    let txn = c.nodes[follower].store.read().unwrap();
    let hard = log::hard_state(&*txn, 1).unwrap();
    assert_ne!(hard.vote, 0, "a vote is recorded for the term");
}

#[test]
fn a_flipped_bit_in_a_nodes_log_is_repaired_from_the_other_replicas() {
    let mut c = cluster(4);
    c.run_for(Duration::from_secs(5));
    for n in 0..5 {
        propose(&mut c, 0, 0, &format!("entry {n}"));
    }
    c.run_for(Duration::from_secs(2));
    let (leader, _) = leader(&c, 0).expect("a leader");
    let follower = (leader + 1) % 3;
    c.crash(follower);
    {
        let mut txn = c.nodes[follower].store.write().unwrap();
        assert!(log::flip_bit(&mut *txn, 0, 2, 7).unwrap());
        txn.commit().unwrap();
    }
    let txn = c.nodes[follower].store.read().unwrap();
    assert!(log::entry(&*txn, 0, 2).is_err(), "the flip is detected");
    drop(txn);
    c.restart(follower);
    c.connected(follower, leader);
    c.connected(leader, follower);
    c.run_for(Duration::from_secs(5));
    assert_eq!(rejoining(&c, follower, 0), None, "repaired and caught up");
    let repaired = c.nodes[follower].store.read().unwrap();
    let held = c.nodes[leader].store.read().unwrap();
    let entry = log::entry(&*repaired, 0, 2)
        .unwrap()
        .expect("entry 2 again");
    assert_eq!(Some(entry), log::entry(&*held, 0, 2).unwrap());
    drop((repaired, held));
    assert_eq!(applied(&c, follower, 0), applied(&c, leader, 0));
}

#[test]
fn a_proposal_is_answered_once_committed_and_refused_without_a_quorum() {
    let mut c = cluster(5);
    c.run_for(Duration::from_secs(5));
    let request = propose(&mut c, 1, 2, "with a quorum");
    c.run_for(Duration::from_secs(1));
    let Some(Outcome::Appended { group, index }) = c.outcome(1, request) else {
        panic!("not appended: {:?}", c.outcomes(1, request));
    };
    assert_eq!(group, 2);
    let txn = c.nodes[0].store.read().unwrap();
    let entry = log::entry(&*txn, 2, index)
        .unwrap()
        .expect("committed on n0 too");
    assert_eq!(entry.data, b"with a quorum");
    drop(txn);
    // Two of three nodes down: the one left hears from no leader within an
    // election timeout (check_quorum steps a lone leader down).
    c.crash(0);
    c.crash(2);
    c.run_for(Duration::from_secs(5));
    let request = propose(&mut c, 1, 2, "without");
    c.run_for(Duration::from_secs(1));
    assert_eq!(
        c.outcome(1, request),
        Some(Outcome::Denied(Denial::NoQuorum))
    );
    let txn = c.nodes[1].store.read().unwrap();
    let last = (1..)
        .take_while(|&k| log::entry(&*txn, 2, k).unwrap().is_some())
        .count() as u64;
    for k in 1..=last {
        let entry = log::entry(&*txn, 2, k).unwrap().unwrap();
        assert_ne!(entry.data, b"without", "a refused proposal was appended");
    }
}

#[test]
fn leaders_spread_each_group_led_by_its_first_replica() {
    let mut c = cluster(6);
    c.run_for(Duration::from_secs(10));
    let config = c.config().replication.unwrap();
    let nodes = c.sorted_ids();
    let mut leaders = std::collections::BTreeSet::new();
    for group in config.groups() {
        let first = config.replicas(&nodes, group)[0];
        let (leader, _) = leader(&c, group).expect("a leader");
        assert_eq!(c.id(leader), first, "group {group}");
        leaders.insert(leader);
    }
    assert_eq!(leaders.len(), 3, "three groups, three nodes, three leaders");
}

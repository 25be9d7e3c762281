//! The driver's mailboxes model the production runtime's: one FIFO mailbox per
//! actor, so what one sender sends one receiver is handled in the order sent, while
//! messages to *different* actors of a node may be handled in either order (which
//! mailbox runs next, and activations that take time).

use std::time::Duration;

use conclave_actors::domain::{self, PeerMsg};
use conclave_actors::Time;
use conclave_sim::cluster::{Interleave, Scheduling};
use conclave_sim::Cluster;

/// The messages node 0's peer actors handled, in order, as (remote index, message).
fn peer_messages(c: &Cluster) -> Vec<(usize, &'static str)> {
    let remotes = [(c.id(1), 1), (c.id(2), 2)];
    c.trace_log
        .as_ref()
        .expect("trace on")
        .iter()
        .filter(|line| line.contains(" n0 peer/"))
        .filter_map(|line| {
            let remote = remotes
                .iter()
                .find(|(id, _)| line.contains(&format!("{id:?}")))
                .map(|&(_, r)| r)?;
            let msg = if line.contains("Peer(Disconnected)") {
                "disconnected"
            } else if line.contains("Peer(Connected)") {
                "connected"
            } else {
                return None;
            };
            Some((remote, msg))
        })
        .collect()
}

/// Tells node 0's peer for node 1 `disconnected` then `connected`, and its peer
/// for node 2 `disconnected`, interleaved as
/// `1:disconnected, 2:disconnected, 1:connected`; returns what was handled.
fn run(seed: u64, scheduling: Scheduling) -> Vec<(usize, &'static str)> {
    let mut c = Cluster::new(3, seed);
    c.scheduling = scheduling;
    c.trace_log = Some(Vec::new());
    let (n0, n1, n2) = (c.id(0), c.id(1), c.id(2));
    c.tell(domain::peer_of(n0, n1), PeerMsg::Disconnected);
    c.tell(domain::peer_of(n0, n2), PeerMsg::Disconnected);
    c.tell(domain::peer_of(n0, n1), PeerMsg::Connected);
    let end = Time::from_unix_micros(c.now().unix_micros() + 1_000_000);
    while c.step(end).is_some() {}
    let handled = peer_messages(&c);
    assert_eq!(handled.len(), 3, "seed {seed}: {handled:?}");
    handled
}

#[test]
fn oldest_first_without_activation_delay_is_one_fifo_per_node() {
    for seed in 0..8 {
        assert_eq!(
            run(seed, Scheduling::default()),
            [(1, "disconnected"), (2, "disconnected"), (1, "connected")],
            "seed {seed}"
        );
    }
}

#[test]
fn actors_interleave_by_seed_but_each_mailbox_stays_fifo() {
    let scheduling = Scheduling {
        interleave: Interleave::Random,
        activation_max: Duration::ZERO,
    };
    let mut orders = std::collections::BTreeSet::new();
    for seed in 0..40 {
        let handled = run(seed, scheduling);
        // The same seed, the same order.
        assert_eq!(handled, run(seed, scheduling), "seed {seed}");
        let to_1: Vec<_> = handled.iter().filter(|(r, _)| *r == 1).collect();
        assert_eq!(
            to_1,
            [&(1, "disconnected"), &(1, "connected")],
            "seed {seed}: one sender, one receiver, out of order"
        );
        orders.insert(handled);
    }
    // Node 2's peer goes first in some seeds, between in others, last in others.
    assert_eq!(orders.len(), 3, "{orders:?}");
    // Activations that take time do not reorder one mailbox either.
    let delayed = Scheduling {
        activation_max: Duration::from_millis(2),
        ..scheduling
    };
    for seed in 0..40 {
        let handled = run(seed, delayed);
        let to_1: Vec<_> = handled.iter().filter(|(r, _)| *r == 1).collect();
        assert_eq!(
            to_1,
            [&(1, "disconnected"), &(1, "connected")],
            "seed {seed}"
        );
    }
}

#[test]
fn an_activation_lets_active_actors_overtake() {
    let scheduling = Scheduling {
        interleave: Interleave::Arrival,
        activation_max: Duration::from_millis(5),
    };
    let mut overtaken = 0;
    for seed in 0..10 {
        let mut c = Cluster::new(3, seed);
        c.scheduling = scheduling;
        let (n0, n1, n2) = (c.id(0), c.id(1), c.id(2));
        // The peer for node 1 is active; the one for node 2 is not.
        c.tell(domain::peer_of(n0, n1), PeerMsg::Disconnected);
        c.run_for(Duration::from_millis(100));
        c.trace_log = Some(Vec::new());
        c.tell(domain::peer_of(n0, n2), PeerMsg::Disconnected);
        c.tell(domain::peer_of(n0, n1), PeerMsg::Connected);
        c.run_for(Duration::from_millis(100));
        let handled = peer_messages(&c);
        assert_eq!(handled.len(), 2, "seed {seed}: {handled:?}");
        if handled[0] == (1, "connected") {
            overtaken += 1;
        }
    }
    assert!(
        overtaken >= 5,
        "only {overtaken} of 10 activations were overtaken"
    );
}

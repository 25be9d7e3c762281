//! The driver contract test: one scripted sequence through both drivers, the actix
//! host here and the simulator (`conclave-sim`), with the same observable outcome.
//! The contract itself is [`conclave_actors::lifecycle`].
//!
//! The script is the outbox example. Node A's outbox towards B holds one message:
//! 1. a kick activates the outbox, which sends it and arms its retry timer;
//! 2. B's acknowledgement and a second kick arrive together: the acknowledgement
//!    brings the depth to 0 and the outbox stops, with the kick queued behind the
//!    stop;
//! 3. a new message is queued for B and kicked.
//!
//! Both drivers must show: the kick queued behind the stop is handled by the
//! stopping incarnation (it finds nothing to send and the actor is gone after it,
//! so it did not reactivate it); the first incarnation's retry timer never fires;
//! the kick after the stop activates a second incarnation from storage, which sends
//! only the new message; the store holds that one message, unacknowledged.

use std::sync::Arc;
use std::time::{Duration, Instant};

use conclave_actors::actor::ActorRef;
use conclave_actors::domain::{
    outbox_of, peer_of, Deliverable, Domain, DomainConfig, Msg, OutboxMsg, RoomMsg, Routed,
};
use conclave_actors::ids::{NodeId, Seq};
use conclave_actors::lifecycle::Incarnation;
pub(crate) use conclave_actors::lifecycle::Turn;
use conclave_actors::wire::{encode_bounded, ENVELOPE_BYTES_MAX};
use conclave_sim::cluster::Cluster;
use conclave_storage::{MemStore, Store};
use conclave_transports::mem::MemNetwork;

use super::{HostConfig, Origin, Runtime};

/// The first resend delay: the first incarnation's timer would fire within it.
const RETRY_MS_BASE: u64 = 1_000;
/// How long the script waits after its last step, past any retry of the first
/// incarnation.
const SETTLE_MS: u64 = 2 * RETRY_MS_BASE;
/// How long the host may take for one step before the test fails.
const STEP_MS_MAX: u64 = 20_000;

fn config() -> DomainConfig {
    DomainConfig {
        retry_base: Duration::from_millis(RETRY_MS_BASE),
        retry_max: Duration::from_secs(5),
        // No idle timer of another actor takes part.
        idle: Duration::from_secs(3600),
        ..DomainConfig::default()
    }
}

/// Queues one message for `dest` in `store`'s outbox (as a room would, in the
/// transaction of its change).
fn enqueue(store: &dyn Store, dest: NodeId) {
    let routed = Routed {
        to: conclave_actors::domain::room_of(dest, conclave_actors::RoomId([5; 16])),
        msg: Deliverable::Room(RoomMsg::Tick),
    };
    let bytes = encode_bounded(&routed, ENVELOPE_BYTES_MAX).expect("encodes");
    let mut txn = store.write().expect("write");
    conclave_actors::outbox::enqueue(&mut *txn, dest, bytes).expect("enqueue");
    txn.commit().expect("commit");
}

/// The run both drivers' node A is in: the same, so that the messages compare as
/// text (each driver would draw its own).
const RUN: u64 = 0xc0de;

/// B's acknowledgement of A's stream up to 1.
fn ack_one() -> OutboxMsg {
    OutboxMsg::Ack {
        upto: Seq(1),
        incarnation: RUN,
    }
}

/// The sequence numbers the outbox in `store` towards `dest` still holds.
fn unacked(store: &dyn Store, dest: NodeId) -> Vec<u64> {
    let txn = store.read().expect("read");
    conclave_actors::outbox::unacked(&*txn, dest, 16)
        .expect("unacked")
        .into_iter()
        .map(|(seq, _)| seq.0)
        .collect()
}

/// One turn of the outbox: (incarnation ordinal, sender, message, sends, timers
/// set, whether it asked to stop).
type Step = (
    u64,
    Option<ActorRef>,
    String,
    Vec<(ActorRef, String)>,
    usize,
    bool,
);

/// What the script observes of one driver.
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    /// The outbox's turns, with incarnations numbered from 1 in order of
    /// appearance (drivers number them differently), retries left out: when the
    /// second incarnation's timer fires depends on wall time in the host.
    turns: Vec<Step>,
    /// The incarnation ordinals that handled a retry timer.
    retried_by: Vec<u64>,
    /// What the outbox still holds.
    unacked: Vec<u64>,
    /// How many actors were active at the end.
    active: usize,
}

fn outcome(
    outbox: ActorRef,
    journal: &[Turn],
    store: &dyn Store,
    dest: NodeId,
    active: usize,
) -> Outcome {
    let mut seen: Vec<Incarnation> = Vec::new();
    let mut turns = Vec::new();
    let mut retried_by = Vec::new();
    for turn in journal.iter().filter(|t| t.actor == outbox) {
        let ordinal = match seen.iter().position(|i| *i == turn.incarnation) {
            Some(k) => k + 1,
            None => {
                seen.push(turn.incarnation);
                seen.len()
            }
        } as u64;
        if turn.msg.starts_with("Outbox(Retry") {
            retried_by.push(ordinal);
        } else {
            let t = turn.clone();
            turns.push((ordinal, t.from, t.msg, t.sends, t.timers, t.stopped));
        }
    }
    Outcome {
        turns,
        retried_by,
        unacked: unacked(store, dest),
        active,
    }
}

/// The script on the simulator; `a` and `b` are its nodes 0 and 1.
fn run_sim(seed: u64) -> (NodeId, NodeId, Outcome) {
    let mut sim = Cluster::with_config(2, seed, config());
    let (a, b) = (sim.id(0), sim.id(1));
    // B stays silent: its acknowledgement is the script's.
    sim.partition(0, 1, true);
    sim.journal = Some(Vec::new());
    let outbox = outbox_of(a, b);
    conclave_actors::domain::begin_run(sim.nodes[0].store.as_ref(), RUN).expect("run");
    enqueue(sim.nodes[0].store.as_ref(), b);
    sim.tell(outbox, OutboxMsg::Kick);
    sim.run_for(Duration::from_millis(1));
    sim.tell_from(peer_of(b, a), outbox, ack_one());
    sim.tell(outbox, OutboxMsg::Kick);
    sim.run_for(Duration::from_millis(1));
    assert_eq!(sim.active_actors(0), 0, "the outbox passivated");
    enqueue(sim.nodes[0].store.as_ref(), b);
    sim.tell(outbox, OutboxMsg::Kick);
    sim.run_for(Duration::from_millis(SETTLE_MS));
    let journal = sim.journal.take().unwrap_or_default();
    let out = outcome(
        outbox,
        &journal,
        sim.nodes[0].store.as_ref(),
        b,
        sim.active_actors(0),
    );
    (a, b, out)
}

/// Polls `done` until it holds, failing the test after [`STEP_MS_MAX`].
fn wait_until(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_millis(STEP_MS_MAX);
    while !done() {
        assert!(
            Instant::now() < deadline,
            "host: {what} not reached in time"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The script on the actix host, with the simulator's node ids (so that the
/// messages compare as text).
fn run_host(a: NodeId, b: NodeId) -> Outcome {
    let net = MemNetwork::<Msg>::new();
    let (transport, incoming) = net.join(a);
    // B's end of the network: it receives what A sends and never answers.
    let (_b_transport, _b_incoming) = net.join(b);
    let store = Arc::new(MemStore::new());
    conclave_actors::domain::begin_run(store.as_ref(), RUN).expect("run");
    let runtime = Runtime::start(HostConfig {
        node: a,
        system: Domain {
            config: config(),
            nodes: None,
            identities: Default::default(),
        },
        store: store.clone(),
        transport: Arc::new(transport),
        incoming,
    })
    .expect("runtime starts");
    let shared = Arc::clone(&runtime.shared);
    let turns = || shared.journal.lock().map(|j| j.len()).unwrap_or(0);
    let outbox = outbox_of(a, b);

    enqueue(store.as_ref(), b);
    runtime.tell(outbox, OutboxMsg::Kick).expect("accepted");
    wait_until("the first send", || turns() == 1);
    // Both land in the mailbox before the outbox handles either: the arbiter
    // thread runs one thing at a time, and this is one thing.
    let script = Arc::clone(&shared);
    let queued = shared.arbiter.spawn_fn(move || {
        let ack = ack_one();
        let from = Some(peer_of(b, a));
        let _ = script.route(Origin::Outside, from, outbox, ack.into());
        let _ = script.route(Origin::Outside, None, outbox, OutboxMsg::Kick.into());
    });
    assert!(queued, "the arbiter runs");
    wait_until("the stop", || turns() == 3 && runtime.active_actors() == 0);
    // The acknowledgement's batch may still be on its way to the store: writing
    // beside it before it lands would race its outbox head.
    let acked = || {
        let txn = store.read().expect("read");
        conclave_actors::outbox::depth(&*txn, b).ok() == Some(0)
    };
    wait_until("the acknowledgement is committed", acked);
    enqueue(store.as_ref(), b);
    runtime.tell(outbox, OutboxMsg::Kick).expect("accepted");
    wait_until("the second send", || turns() == 4);
    std::thread::sleep(Duration::from_millis(SETTLE_MS));
    let journal = shared.journal.lock().map(|j| j.clone()).unwrap_or_default();
    let out = outcome(outbox, &journal, store.as_ref(), b, runtime.active_actors());
    runtime.shutdown();
    out
}

/// A turn in short: (incarnation ordinal, sender, message, how many sends, timers
/// set, whether it asked to stop).
type Short<'a> = (u64, Option<ActorRef>, &'a str, usize, usize, bool);

/// The outcome the contract prescribes (see the module docs).
fn expected(a: NodeId, b: NodeId) -> Vec<Short<'static>> {
    let ack = "Outbox(Ack { upto: Seq(1), incarnation: 49374 })";
    vec![
        (1, None, "Outbox(Kick)", 1, 1, false),
        (1, Some(peer_of(b, a)), ack, 0, 0, true),
        // Queued behind the stop: handled by the stopping incarnation, which finds
        // nothing to send (and does not ask to stop twice).
        (1, None, "Outbox(Kick)", 0, 0, false),
        // After the stop: a fresh incarnation from storage.
        (2, None, "Outbox(Kick)", 1, 1, false),
    ]
}

fn check(driver: &str, a: NodeId, b: NodeId, out: &Outcome) {
    let got: Vec<Short<'_>> = out
        .turns
        .iter()
        .map(|(n, from, msg, sends, timers, stopped)| {
            (*n, *from, msg.as_str(), sends.len(), *timers, *stopped)
        })
        .collect();
    assert_eq!(got, expected(a, b), "{driver}: turns {:#?}", out.turns);
    let sent: Vec<&str> = out
        .turns
        .iter()
        .flat_map(|step| step.3.iter().map(|(_, m)| m.as_str()))
        .collect();
    assert!(
        sent[0].starts_with("Peer(Deliver { seq: Seq(1)"),
        "{driver}: {sent:?}"
    );
    assert!(
        sent[1].starts_with("Peer(Deliver { seq: Seq(2)"),
        "{driver}: {sent:?}"
    );
    let peer = peer_of(b, a);
    assert!(out
        .turns
        .iter()
        .flat_map(|step| &step.3)
        .all(|(to, _)| *to == peer));
    assert!(
        out.retried_by.iter().all(|n| *n == 2),
        "{driver}: a timer of the stopped incarnation fired: {:?}",
        out.retried_by
    );
    assert_eq!(out.unacked, [2], "{driver}: the store");
    assert_eq!(out.active, 1, "{driver}: the second incarnation is active");
}

#[test]
fn outbox_stop_with_a_kick_queued_behind_it_is_the_same_in_both_drivers() {
    let (a, b, sim) = run_sim(11);
    check("simulator", a, b, &sim);
    let host = run_host(a, b);
    check("host", a, b, &host);
    assert_eq!(host.turns, sim.turns, "the drivers disagree");
    assert_eq!(host.unacked, sim.unacked);
    assert_eq!(host.active, sim.active);
}

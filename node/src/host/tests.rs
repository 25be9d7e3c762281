//! The actix driver hosting sans-IO actors: local and remote ping-pong, timers,
//! passivation, and state that survives a restart through LMDB. (Moved here from
//! `node/tests/host.rs` when the driver became private to the crate.)

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::time::Duration;

use super::{Failure, HostConfig, Runtime};
use conclave_actors::actor::{Actor, ActorKey, ActorKind, ActorRef, Context, Handler, System};
use conclave_actors::NodeId;
use conclave_storage::{Faulty, LmdbOptions, LmdbStore, MemStore, Store, Table};
use conclave_transports::mem::MemNetwork;
use serde::{Deserialize, Serialize};

const PINGER: ActorKind = ActorKind(100);
const PONGER: ActorKind = ActorKind(101);
const TIMER: ActorKind = ActorKind(102);
const COUNTER: ActorKind = ActorKind(103);
const WITNESS: ActorKind = ActorKind(104);

const COUNTS: Table<u64, u64> = Table::new("test_counts");
const WAIT: Duration = Duration::from_secs(20);

// Each actor kind has its own typed messages; `Msg` is the system's union of them.
#[derive(Debug, Serialize, Deserialize)]
enum PingerMsg {
    Start { rounds: u32, ponger: ActorRef },
    Pong(u32),
}

#[derive(Debug, Serialize, Deserialize)]
struct Ping(u32);

#[derive(Debug, Serialize, Deserialize)]
enum TimerMsg {
    Arm { after_ms: u64 },
    Fired { armed_at_micros: u64 },
}

#[derive(Debug, Serialize, Deserialize)]
enum CounterMsg {
    Incr,
    Get,
    Passivate,
    /// Passivate, and send itself an increment and a report while doing so.
    PassivateThenIncrAndGet,
    /// Block the actor for a while, so that a backlog builds up behind it.
    Stall {
        ms: u64,
    },
    /// Increment, and tell `witness` the new count.
    IncrAndTell {
        witness: ActorRef,
    },
    /// A bug in the actor, after it wrote an increment.
    Panic,
}

/// To the witness: counter `key` was told `count`.
#[derive(Debug, Serialize, Deserialize)]
struct Told {
    key: u64,
    count: u64,
}

conclave_actors::message_union! {
    #[derive(Debug, Serialize, Deserialize)]
    enum Msg {
        Pinger(PingerMsg),
        Ponger(Ping),
        Timer(TimerMsg),
        Counter(CounterMsg),
        Witness(Told),
    }
}

impl conclave_actors::wire::WireMessage for Msg {}

#[derive(Debug, PartialEq)]
enum Event {
    Done {
        rounds: u32,
    },
    Fired {
        elapsed: Duration,
    },
    Count {
        key: u64,
        count: u64,
    },
    /// The witness was told `told`; the durable store held `stored` then.
    Witnessed {
        told: u64,
        stored: u64,
    },
    Activated(ActorKind),
}

struct TestSystem {
    events: Sender<Event>,
}

impl System for TestSystem {
    type Msg = Msg;

    fn activate(
        &self,
        addr: &ActorRef,
        cx: &mut Context<'_, Self>,
    ) -> Option<Box<dyn Handler<Self>>> {
        let _ = self.events.send(Event::Activated(addr.kind));
        let events = self.events.clone();
        match addr.kind {
            PINGER => Some(Box::new(Pinger { rounds: 0, events })),
            PONGER => Some(Box::new(Ponger)),
            TIMER => Some(Box::new(Timer { events })),
            WITNESS => Some(Box::new(Witness { events })),
            COUNTER => {
                let ActorKey::Id(key) = addr.key else {
                    return None;
                };
                // State comes back from storage on every activation.
                let txn = cx.store().read().ok()?;
                let count = COUNTS.get(&*txn, &key).ok()?.unwrap_or(0);
                Some(Box::new(Counter { key, count, events }))
            }
            _ => None,
        }
    }
}

struct Pinger {
    rounds: u32,
    events: Sender<Event>,
}

impl Actor<TestSystem> for Pinger {
    type Msg = PingerMsg;
    fn handle(&mut self, msg: PingerMsg, cx: &mut Context<'_, TestSystem>) {
        match msg {
            PingerMsg::Start { rounds, ponger } => {
                self.rounds = rounds;
                cx.send(ponger, Ping(1));
            }
            PingerMsg::Pong(n) if n == self.rounds => {
                let _ = self.events.send(Event::Done { rounds: n });
            }
            PingerMsg::Pong(n) => {
                let ponger = *cx.sender().expect("pong has a sender");
                cx.send(ponger, Ping(n + 1));
            }
        }
    }
}

struct Ponger;

impl Actor<TestSystem> for Ponger {
    type Msg = Ping;
    fn handle(&mut self, Ping(n): Ping, cx: &mut Context<'_, TestSystem>) {
        let pinger = *cx.sender().expect("ping has a sender");
        cx.send(pinger, PingerMsg::Pong(n));
    }
}

struct Timer {
    events: Sender<Event>,
}

impl Actor<TestSystem> for Timer {
    type Msg = TimerMsg;
    fn handle(&mut self, msg: TimerMsg, cx: &mut Context<'_, TestSystem>) {
        match msg {
            TimerMsg::Arm { after_ms } => {
                let armed_at_micros = cx.now().unix_micros();
                cx.timer(
                    Duration::from_millis(after_ms),
                    TimerMsg::Fired { armed_at_micros },
                );
            }
            TimerMsg::Fired { armed_at_micros } => {
                assert!(cx.sender().is_none(), "timers have no sender");
                let elapsed = Duration::from_micros(cx.now().unix_micros() - armed_at_micros);
                let _ = self.events.send(Event::Fired { elapsed });
            }
        }
    }
}

struct Counter {
    key: u64,
    count: u64,
    events: Sender<Event>,
}

impl Actor<TestSystem> for Counter {
    type Msg = CounterMsg;
    fn handle(&mut self, msg: CounterMsg, cx: &mut Context<'_, TestSystem>) {
        match msg {
            CounterMsg::Incr => {
                let mut txn = cx.store().write().expect("write txn");
                COUNTS
                    .put(&mut *txn, &self.key, &(self.count + 1))
                    .expect("put");
                txn.commit().expect("commit");
                // Only a committed count becomes the actor's state.
                self.count += 1;
            }
            CounterMsg::Get => {
                let _ = self.events.send(Event::Count {
                    key: self.key,
                    count: self.count,
                });
            }
            CounterMsg::Passivate => cx.stop(),
            CounterMsg::Stall { ms } => std::thread::sleep(Duration::from_millis(ms)),
            CounterMsg::Panic => {
                let mut txn = cx.store().write().expect("write txn");
                COUNTS
                    .put(&mut *txn, &self.key, &(self.count + 1))
                    .expect("put");
                txn.commit().expect("commit");
                panic!("the counter was asked to panic");
            }
            CounterMsg::IncrAndTell { witness } => {
                self.handle(CounterMsg::Incr, cx);
                let told = Told {
                    key: self.key,
                    count: self.count,
                };
                cx.send(witness, told);
            }
            CounterMsg::PassivateThenIncrAndGet => {
                cx.stop();
                let me = *cx.me();
                cx.send(me, CounterMsg::Incr);
                cx.send(me, CounterMsg::Get);
            }
        }
    }
}

/// Reports what it is told next to what the durable store holds.
struct Witness {
    events: Sender<Event>,
}

impl Actor<TestSystem> for Witness {
    type Msg = Told;
    fn handle(&mut self, Told { key, count }: Told, cx: &mut Context<'_, TestSystem>) {
        let txn = cx.read_durable().expect("read");
        let stored = COUNTS.get(&*txn, &key).expect("get").unwrap_or(0);
        let _ = self.events.send(Event::Witnessed {
            told: count,
            stored,
        });
    }
}

/// The process-wide metrics recorder of this test binary. Only the test that
/// triggers a drop reason reads that reason's counter, so tests can share it.
fn snapshotter() -> &'static metrics_util::debugging::Snapshotter {
    static SNAPSHOTTER: std::sync::OnceLock<metrics_util::debugging::Snapshotter> =
        std::sync::OnceLock::new();
    SNAPSHOTTER.get_or_init(|| {
        let recorder = metrics_util::debugging::DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        recorder
            .install()
            .expect("the only recorder in this binary");
        snapshotter
    })
}

/// How many messages the runtime has dropped, by reason. One snapshot: taking it
/// resets the recorder's counters.
fn dropped_by_reason() -> std::collections::BTreeMap<String, u64> {
    let mut out = std::collections::BTreeMap::new();
    for (key, _, _, value) in snapshotter().snapshot().into_vec() {
        if key.key().name() != "conclave_runtime_messages_dropped_total" {
            continue;
        }
        let reason = key
            .key()
            .labels()
            .find(|l| l.key() == "reason")
            .map(|l| l.value().to_string())
            .unwrap_or_default();
        if let metrics_util::debugging::DebugValue::Counter(n) = value {
            *out.entry(reason).or_insert(0) += n;
        }
    }
    out
}

fn start(
    node: NodeId,
    store: Arc<dyn Store>,
    net: &MemNetwork<Msg>,
) -> (Runtime<TestSystem>, Receiver<Event>) {
    snapshotter();
    let (events, rx) = channel();
    let (transport, incoming) = net.join(node);
    let runtime = Runtime::start(HostConfig {
        node,
        system: TestSystem { events },
        store,
        transport: Arc::new(transport),
        incoming,
    })
    .expect("runtime starts");
    (runtime, rx)
}

/// Polls `done` until it holds, failing the test after [`WAIT`].
fn wait_until(done: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + WAIT;
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "condition not reached in time"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The next event that is not an activation notice.
fn next(rx: &Receiver<Event>) -> Event {
    loop {
        match rx
            .recv_timeout(WAIT)
            .expect("an event within the time limit")
        {
            Event::Activated(_) => continue,
            event => return event,
        }
    }
}

#[test]
fn two_actors_ping_pong_on_one_node() {
    let node = NodeId([1; 32]);
    let (runtime, rx) = start(node, Arc::new(MemStore::new()), &MemNetwork::<Msg>::new());
    let ponger = ActorRef::new(node, PONGER, ActorKey::Unit);
    runtime
        .tell(
            ActorRef::new(node, PINGER, ActorKey::Unit),
            PingerMsg::Start {
                rounds: 500,
                ponger,
            },
        )
        .expect("accepted");
    assert_eq!(next(&rx), Event::Done { rounds: 500 });
    assert_eq!(runtime.active_actors(), 2);
    runtime.shutdown();
}

#[test]
fn ping_pong_across_two_nodes_goes_through_the_transport() {
    let net = MemNetwork::<Msg>::new();
    let (a, b) = (NodeId([1; 32]), NodeId([2; 32]));
    let (node_a, rx_a) = start(a, Arc::new(MemStore::new()), &net);
    let (node_b, rx_b) = start(b, Arc::new(MemStore::new()), &net);
    let ponger = ActorRef::new(b, PONGER, ActorKey::Unit);
    node_a
        .tell(
            ActorRef::new(a, PINGER, ActorKey::Unit),
            PingerMsg::Start {
                rounds: 200,
                ponger,
            },
        )
        .expect("accepted");
    assert_eq!(next(&rx_a), Event::Done { rounds: 200 });
    // The ponger was activated on node b, by messages that crossed the transport.
    assert_eq!(
        rx_b.recv_timeout(WAIT).expect("activation"),
        Event::Activated(PONGER)
    );
    assert_eq!(node_a.active_actors(), 1);
    assert_eq!(node_b.active_actors(), 1);
    node_a.shutdown();
    node_b.shutdown();
}

#[test]
fn a_timer_fires_no_earlier_than_asked() {
    let node = NodeId([1; 32]);
    let (runtime, rx) = start(node, Arc::new(MemStore::new()), &MemNetwork::<Msg>::new());
    runtime
        .tell(
            ActorRef::new(node, TIMER, ActorKey::Unit),
            TimerMsg::Arm { after_ms: 50 },
        )
        .expect("accepted");
    match next(&rx) {
        Event::Fired { elapsed } => assert!(
            elapsed >= Duration::from_millis(50),
            "fired after {elapsed:?}"
        ),
        other => panic!("expected the timer, got {other:?}"),
    }
    runtime.shutdown();
}

/// How long a commit of the slow disk below takes: long enough that many messages
/// are handled (into the next batch) while one commit is under way.
const SLOW_COMMIT: Duration = Duration::from_millis(5);

#[test]
fn a_send_leaves_only_once_the_batch_that_wrote_its_state_is_durable() {
    let node = NodeId([1; 32]);
    let disk = Arc::new(Faulty::new(MemStore::new()).with_commit_delay(SLOW_COMMIT));
    let (runtime, rx) = start(node, disk, &MemNetwork::<Msg>::new());
    let counter = ActorRef::new(node, COUNTER, ActorKey::Id(3));
    let witness = ActorRef::new(node, WITNESS, ActorKey::Unit);
    const MESSAGES: u64 = 400;
    for _ in 0..MESSAGES {
        let msg = CounterMsg::IncrAndTell { witness };
        runtime.tell(counter, msg).expect("accepted");
    }
    for expected in 1..=MESSAGES {
        match next(&rx) {
            Event::Witnessed { told, stored } => {
                assert_eq!(told, expected, "in order");
                assert!(stored >= told, "told {told} while the store held {stored}");
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    runtime.shutdown();
}

#[test]
fn an_actor_that_panics_stops_the_runtime_which_says_so_and_commits_nothing_after() {
    let node = NodeId([1; 32]);
    let store = Arc::new(MemStore::new());
    let (runtime, rx) = start(node, store.clone(), &MemNetwork::<Msg>::new());
    let counter = ActorRef::new(node, COUNTER, ActorKey::Id(1));
    let witness = ActorRef::new(node, WITNESS, ActorKey::Unit);
    runtime
        .tell(counter, CounterMsg::IncrAndTell { witness })
        .expect("accepted");
    assert!(matches!(next(&rx), Event::Witnessed { told: 1, stored: 1 }));
    assert_eq!(runtime.failure(), None);
    // It writes, then panics; what waits behind it is never handled.
    runtime.tell(counter, CounterMsg::Panic).expect("accepted");
    runtime.tell(counter, CounterMsg::Incr).expect("accepted");
    wait_until(|| runtime.failure() == Some(Failure::Stopped));
    assert!(runtime.tell(counter, CounterMsg::Incr).is_err());
    // As if the process had died at the panic: its turn's write is not kept.
    runtime.shutdown();
    let txn = store.read().expect("read");
    assert_eq!(COUNTS.get(&*txn, &1).expect("get"), Some(1));
}

#[test]
fn a_failed_commit_is_reported_until_a_commit_succeeds() {
    let node = NodeId([1; 32]);
    let disk = Arc::new(Faulty::new(MemStore::new()));
    let store: Arc<dyn Store> = disk.clone();
    let (runtime, rx) = start(node, store, &MemNetwork::<Msg>::new());
    let counter = ActorRef::new(node, COUNTER, ActorKey::Id(2));
    let witness = ActorRef::new(node, WITNESS, ActorKey::Unit);
    disk.fail_next_commit();
    runtime.tell(counter, CounterMsg::Incr).expect("accepted");
    wait_until(|| matches!(runtime.failure(), Some(Failure::Storage(_))));
    // The next commit succeeds, and the failure is no longer reported.
    runtime
        .tell(counter, CounterMsg::IncrAndTell { witness })
        .expect("accepted");
    assert!(matches!(next(&rx), Event::Witnessed { .. }));
    assert_eq!(runtime.failure(), None);
    runtime.shutdown();
}

#[test]
fn state_survives_passivation_and_a_restart_through_lmdb() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = NodeId([1; 32]);
    let counter = ActorRef::new(node, COUNTER, ActorKey::Id(7));
    let open = || -> Arc<dyn Store> {
        Arc::new(LmdbStore::open(dir.path(), LmdbOptions::default()).expect("lmdb opens"))
    };

    let (runtime, rx) = start(node, open(), &MemNetwork::<Msg>::new());
    for _ in 0..3 {
        runtime.tell(counter, CounterMsg::Incr).expect("accepted");
    }
    runtime.tell(counter, CounterMsg::Get).expect("accepted");
    assert_eq!(next(&rx), Event::Count { key: 7, count: 3 });

    // Passivate, wait until it is gone, and the next message activates it again from
    // storage.
    runtime
        .tell(counter, CounterMsg::Passivate)
        .expect("accepted");
    wait_until(|| runtime.active_actors() == 0);
    runtime.tell(counter, CounterMsg::Incr).expect("accepted");
    runtime.tell(counter, CounterMsg::Get).expect("accepted");
    assert_eq!(
        rx.recv_timeout(WAIT).expect("activation"),
        Event::Activated(COUNTER)
    );
    assert_eq!(next(&rx), Event::Count { key: 7, count: 4 });

    // Messages that arrive while an actor passivates wait for the next activation:
    // the old copy first handles everything already queued for it (a backlog of
    // 1000 increments built while it stalls), and only then does a new copy start
    // from storage. Two copies never run at once, so no increment is lost.
    runtime
        .tell(counter, CounterMsg::Stall { ms: 100 })
        .expect("accepted");
    runtime
        .tell(counter, CounterMsg::PassivateThenIncrAndGet)
        .expect("accepted");
    for _ in 0..1000 {
        runtime.tell(counter, CounterMsg::Incr).expect("accepted");
    }
    match next(&rx) {
        // Reported by the new copy, after at least its own increment.
        Event::Count { key: 7, count } => assert!((5..=1005).contains(&count), "{count}"),
        other => panic!("expected a count, got {other:?}"),
    }
    runtime.tell(counter, CounterMsg::Get).expect("accepted");
    assert_eq!(
        next(&rx),
        Event::Count {
            key: 7,
            count: 1005
        }
    );
    runtime.shutdown();

    // A new runtime on the same data directory starts from what was committed.
    let (runtime, rx) = start(node, open(), &MemNetwork::<Msg>::new());
    runtime.tell(counter, CounterMsg::Get).expect("accepted");
    assert_eq!(
        rx.recv_timeout(WAIT).expect("activation"),
        Event::Activated(COUNTER)
    );
    assert_eq!(
        next(&rx),
        Event::Count {
            key: 7,
            count: 1005
        }
    );
    runtime.shutdown();
}

#[test]
fn spoofed_misrouted_and_unknown_messages_are_dropped() {
    use conclave_actors::wire::Envelope;
    use conclave_transports::Transport;

    let net = MemNetwork::<Msg>::new();
    let (a, b, mallory) = (NodeId([1; 32]), NodeId([2; 32]), NodeId([9; 32]));
    let (node_a, rx_a) = start(a, Arc::new(MemStore::new()), &net);
    let (mallory_tx, _mallory_rx) = net.join(mallory);

    // An envelope claiming to come from node b, sent by mallory. (Undecodable bytes
    // never get this far: the transport refuses them, see its tests.)
    let spoofed = Envelope::<Msg> {
        from: ActorRef::new(b, PONGER, ActorKey::Unit),
        to: ActorRef::new(a, COUNTER, ActorKey::Id(1)),
        msg: CounterMsg::Incr.into(),
    };
    mallory_tx.send(a, &spoofed).expect("send");
    // An actor kind node a does not host.
    node_a
        .tell(
            ActorRef::new(a, ActorKind(999), ActorKey::Unit),
            CounterMsg::Get,
        )
        .expect("accepted");

    // A message of the wrong kind for the counter is dropped, not a panic.
    let wrong_kind = Envelope::<Msg> {
        from: ActorRef::new(mallory, PINGER, ActorKey::Unit),
        to: ActorRef::new(a, COUNTER, ActorKey::Id(1)),
        msg: TimerMsg::Arm { after_ms: 1 }.into(),
    };
    mallory_tx.send(a, &wrong_kind).expect("send");

    // An honest envelope from mallory, behind the others on the same channel: the
    // node still serves, and the counter was never incremented by the spoof.
    let honest = Envelope::<Msg> {
        from: ActorRef::new(mallory, PINGER, ActorKey::Unit),
        to: ActorRef::new(a, COUNTER, ActorKey::Id(1)),
        msg: CounterMsg::Get.into(),
    };
    mallory_tx.send(a, &honest).expect("send");
    assert_eq!(next(&rx_a), Event::Count { key: 1, count: 0 });
    // Each drop was counted under its reason (no other test causes these).
    let dropped = dropped_by_reason();
    for reason in ["spoofed_sender", "wrong_kind", "unknown_actor"] {
        assert_eq!(dropped.get(reason), Some(&1), "{reason} in {dropped:?}");
    }
    node_a.shutdown();
}

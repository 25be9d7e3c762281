//! raft-rs's log lines reach `tracing` (its own process, so that the subscriber
//! can be the global one: a scoped one misses events while other tests' threads
//! meet the same call sites).

use std::sync::{Arc, Mutex};

use conclave_actors::replication::replica::ELECTION_TICKS;
use conclave_actors::replication::Replica;
use conclave_storage::{MemStore, Store};
use rand_core::SeedableRng;
use tracing_subscriber::prelude::*;

/// The messages of the events seen.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<String>>>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Seen {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        struct Message<'a>(&'a mut String);
        impl tracing::field::Visit for Message<'_> {
            fn record_debug(&mut self, _: &tracing::field::Field, value: &dyn core::fmt::Debug) {
                self.0.push_str(&format!("{value:?}"));
            }
        }
        let mut text = String::new();
        event.record(&mut Message(&mut text));
        self.0.lock().unwrap().push(text);
    }
}

#[test]
fn a_replica_alone_elects_itself_and_raft_rs_says_so_through_tracing() {
    let seen = Seen::default();
    tracing_subscriber::registry().with(seen.clone()).init();
    let store = MemStore::new();
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(1);
    let mut replica = {
        let txn = store.read().unwrap();
        Replica::open(&*txn, 1, 1, &[1], &mut rng).unwrap()
    };
    // The longest election timeout there is, and one tick more.
    for _ in 0..ELECTION_TICKS.end {
        replica.tick();
        replica.redraw_timeout(&mut rng);
        let mut txn = store.write().unwrap();
        replica.drive(&mut *txn).unwrap();
        txn.commit().unwrap();
    }
    assert!(replica.is_leader());
    let lines = seen.0.lock().unwrap();
    assert!(
        lines.iter().any(|l| l.contains("raft: became leader")),
        "{lines:?}"
    );
}

use conclave_storage::{MemStore, Store, SyncPolicy};
use rand_chacha::ChaCha20Rng;
use rand_core::{Rng, SeedableRng};

use super::*;

const A: NodeId = NodeId([1; 32]);
const B: NodeId = NodeId([2; 32]);

fn with_write<T>(store: &dyn Store, f: impl FnOnce(&mut dyn WriteTxn) -> T) -> T {
    let mut txn = store.write().expect("write txn");
    let out = f(&mut *txn);
    txn.commit().expect("commit");
    out
}

#[test]
fn messages_wait_in_order_until_acknowledged() {
    let store = MemStore::new();
    let seqs: Vec<Seq> = with_write(&store, |txn| {
        (0..5u8)
            .map(|i| enqueue(txn, B, vec![i; 3]).expect("enqueue"))
            .collect()
    });
    assert_eq!(seqs, (1..=5).map(Seq).collect::<Vec<_>>());
    let read = store.read().expect("read");
    let pending = unacked(&*read, B, 10).expect("unacked");
    assert_eq!(pending.len(), 5);
    assert_eq!(pending[0], (Seq(1), vec![0; 3]));
    assert_eq!(
        unacked(&*read, B, 2).expect("unacked").len(),
        2,
        "limit holds"
    );
    assert_eq!(
        unacked(&*read, A, 10).expect("unacked"),
        vec![],
        "per destination"
    );
    drop(read);

    assert_eq!(
        with_write(&store, |txn| ack(txn, B, Seq(3)).expect("ack")),
        3
    );
    // Duplicate and stale acknowledgements change nothing.
    assert_eq!(
        with_write(&store, |txn| ack(txn, B, Seq(3)).expect("ack")),
        0
    );
    assert_eq!(
        with_write(&store, |txn| ack(txn, B, Seq(1)).expect("ack")),
        0
    );
    let read = store.read().expect("read");
    assert_eq!(depth(&*read, B).expect("depth"), 2);
    let pending: Vec<Seq> = unacked(&*read, B, 10)
        .expect("unacked")
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(pending, vec![Seq(4), Seq(5)]);
}

#[test]
fn an_ack_beyond_what_was_sent_is_refused_and_changes_nothing() {
    let store = MemStore::new();
    with_write(&store, |txn| enqueue(txn, B, vec![1]).expect("enqueue"));
    let mut txn = store.write().expect("write");
    let err = ack(&mut *txn, B, Seq(2)).unwrap_err();
    assert!(
        matches!(
            err,
            OutboxError::AckBeyondSent {
                upto: 2,
                sent: 1,
                ..
            }
        ),
        "{err}"
    );
    let err = ack(&mut *txn, A, Seq(1)).unwrap_err();
    assert!(
        matches!(err, OutboxError::AckBeyondSent { sent: 0, .. }),
        "{err}"
    );
    drop(txn);
    assert_eq!(depth(&*store.read().expect("read"), B).expect("depth"), 1);
}

#[test]
fn a_full_outbox_is_an_error_not_growth() {
    let store = MemStore::new();
    let mut txn = store.write().expect("write");
    for _ in 0..OUTBOX_DEPTH_MAX {
        enqueue(&mut *txn, B, Vec::new()).expect("within the bound");
    }
    let err = enqueue(&mut *txn, B, Vec::new()).unwrap_err();
    assert!(matches!(err, OutboxError::Full { depth, .. } if depth == OUTBOX_DEPTH_MAX));
    // Another destination is not affected.
    enqueue(&mut *txn, A, Vec::new()).expect("other destination");
    ack(&mut *txn, B, Seq(1)).expect("ack");
    enqueue(&mut *txn, B, Vec::new()).expect("room again after an ack");
}

#[test]
fn a_control_message_gets_into_a_full_outbox_within_its_reserve() {
    let store = MemStore::new();
    let mut txn = store.write().expect("write");
    for _ in 0..OUTBOX_DEPTH_MAX {
        enqueue(&mut *txn, B, Vec::new()).expect("within the bound");
    }
    for _ in 0..OUTBOX_CONTROL_RESERVE {
        enqueue_control(&mut *txn, B, Vec::new()).expect("within the reserve");
    }
    let err = enqueue_control(&mut *txn, B, Vec::new()).unwrap_err();
    assert!(matches!(err, OutboxError::Full { .. }), "{err}");
    // The reserve is not a way around the bound for other messages, and an outbox
    // holding it reads back as sound.
    let err = enqueue(&mut *txn, B, Vec::new()).unwrap_err();
    assert!(matches!(err, OutboxError::Full { .. }), "{err}");
    let held = OUTBOX_DEPTH_MAX + OUTBOX_CONTROL_RESERVE;
    assert_eq!(depth(&*txn, B).expect("depth"), held);
}

#[test]
fn one_tag_holds_at_most_its_share_and_others_still_get_in() {
    let store = MemStore::new();
    let (busy, quiet) = ([1u8; 16], [2u8; 16]);
    let mut txn = store.write().expect("write");
    for _ in 0..OUTBOX_TAG_DEPTH_MAX {
        enqueue_tagged(&mut *txn, B, Some(busy), Vec::new()).expect("within the share");
    }
    let err = enqueue_tagged(&mut *txn, B, Some(busy), Vec::new()).unwrap_err();
    assert!(
        matches!(err, OutboxError::ShareFull { depth, .. } if depth == OUTBOX_TAG_DEPTH_MAX),
        "{err}"
    );
    // Another tag, an untagged message and another destination still get in.
    let quiet_seq = enqueue_tagged(&mut *txn, B, Some(quiet), Vec::new()).expect("another tag");
    enqueue(&mut *txn, B, Vec::new()).expect("untagged");
    enqueue_tagged(&mut *txn, A, Some(busy), Vec::new()).expect("another destination");
    // Acknowledgements give the share back, tag by tag.
    ack(&mut *txn, B, Seq(10)).expect("ack");
    for _ in 0..10 {
        enqueue_tagged(&mut *txn, B, Some(busy), Vec::new()).expect("room again after an ack");
    }
    assert!(enqueue_tagged(&mut *txn, B, Some(busy), Vec::new()).is_err());
    ack(&mut *txn, B, quiet_seq).expect("ack");
    assert_eq!(
        TAG_DEPTHS.get(&*txn, &(B.0, quiet)).unwrap(),
        None,
        "nothing left"
    );
    let busy_left = TAG_DEPTHS.get(&*txn, &(B.0, busy)).unwrap();
    assert_eq!(busy_left, Some(10), "the ten sent after the first ack");
    let sent = read_head(&*txn, B).unwrap().sent;
    ack(&mut *txn, B, Seq(sent)).expect("ack all");
    let left = TAGS.scan(&*txn, (B.0, 0)..=(B.0, u64::MAX), Order::Ascending, 16);
    assert!(left.unwrap().is_empty(), "no tag outlives its message");
}

#[test]
fn queued_messages_survive_a_crash_and_uncommitted_ones_do_not() {
    let store = MemStore::with_policy(SyncPolicy::OnCommit);
    with_write(&store, |txn| {
        enqueue(txn, B, b"kept".to_vec()).expect("enqueue")
    });
    let mut txn = store.write().expect("write");
    enqueue(&mut *txn, B, b"lost".to_vec()).expect("enqueue");
    drop(txn); // never committed
    store.crash();
    let read = store.read().expect("read");
    assert_eq!(
        unacked(&*read, B, 10).expect("unacked"),
        vec![(Seq(1), b"kept".to_vec())]
    );
    drop(read);
    // Numbering continues after the survivor.
    assert_eq!(
        with_write(&store, |txn| enqueue(txn, B, vec![]).expect("enqueue")),
        Seq(2)
    );
}

/// A stream from a sender that has held everything since its first message.
const STREAM: Stream = Stream {
    incarnation: 7,
    first: Seq(1),
};

/// The last sequence number `store` took from `origin` (0: none).
fn high(store: &MemStore, origin: NodeId) -> u64 {
    mark(&*store.read().expect("read"), origin)
        .expect("mark")
        .map_or(0, |m| m.high)
}

#[test]
fn the_receiver_takes_each_message_once_and_only_in_order() {
    let store = MemStore::new();
    let take = |seq| {
        with_write(&store, |txn| {
            accept(txn, A, STREAM, Seq(seq)).expect("accept")
        })
    };
    assert_eq!(take(2), Arrival::Gap { expected: Seq(1) });
    assert_eq!(take(1), Arrival::Fresh);
    assert_eq!(take(1), Arrival::Duplicate);
    assert_eq!(take(3), Arrival::Gap { expected: Seq(2) });
    assert_eq!(take(2), Arrival::Fresh);
    assert_eq!(take(0), Arrival::Duplicate);
    assert_eq!(high(&store, A), 2);
    assert_eq!(high(&store, B), 0);
}

#[test]
fn a_receiver_follows_a_new_incarnation_and_skips_what_its_sender_no_longer_holds() {
    let store = MemStore::new();
    let take = |stream, seq| {
        with_write(&store, |txn| {
            accept(txn, A, stream, Seq(seq)).expect("accept")
        })
    };
    let stream = |incarnation, first| Stream {
        incarnation,
        first: Seq(first),
    };
    assert_eq!(take(stream(1, 1), 1), Arrival::Fresh);
    assert_eq!(take(stream(1, 1), 2), Arrival::Fresh);
    // The sender restarted: its acknowledged prefix ends at 2.
    assert_eq!(take(stream(2, 3), 3), Arrival::Fresh);
    assert_eq!(take(stream(2, 3), 2), Arrival::Duplicate);
    // The sender's store was restored from a backup and numbers from 1 again:
    // without the incarnation, 1 would be dropped as a duplicate (and lost).
    assert_eq!(take(stream(3, 1), 1), Arrival::Fresh);
    // The receiver's store was reset: without the stream's first message, it
    // would wait for message 1 for ever.
    let reset = MemStore::new();
    let take_reset = |seq| {
        with_write(&reset, |txn| {
            accept(txn, A, stream(3, 7), Seq(seq)).expect("accept")
        })
    };
    assert_eq!(take_reset(7), Arrival::Fresh);
    assert_eq!(high(&reset, A), 7);
    // Behind within one incarnation: the sender holds nothing before 10.
    assert_eq!(take(stream(3, 10), 10), Arrival::Fresh);
    let ahead = Mark {
        incarnation: 3,
        high: 10,
    };
    assert_eq!(
        follow(Some(ahead), stream(3, 5)),
        (ahead, None),
        "a stream the receiver is ahead of is followed as it is"
    );
    assert_eq!(follow(None, stream(4, 1)).1, Some(Resync::First));
}

/// Stored by the receiver in the same transaction as the high-water mark.
const DELIVERED: Table<u64, Payload> = Table::new("test.delivered");

/// Runs one seeded exchange: a sender and a receiver, each with a store that crashes
/// now and then, joined by a network that drops, duplicates and reorders both
/// messages and acknowledgements. Returns what went wrong, if anything: the
/// receiver must end with every message exactly once, in order, and the outbox
/// must drain.
///
/// With `ack_unsynced`, the receiver's disk only makes commits durable when synced
/// (and it never syncs) while it acknowledges anyway: the "acknowledge before
/// persisting" bug, which this harness must catch.
fn exchange(seed: u64, ack_unsynced: bool) -> Result<(), String> {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let messages = 1 + rng.next_u32() % 40;
    let (drop_pct, dup_pct, crash_pct) = (
        rng.next_u32() % 50,
        rng.next_u32() % 30,
        1 + rng.next_u32() % 10,
    );
    let sender = MemStore::new();
    let receiver = if ack_unsynced {
        MemStore::with_policy(SyncPolicy::Explicit)
    } else {
        MemStore::new()
    };
    with_write(&sender, |txn| {
        for i in 0..messages {
            enqueue(txn, B, i.to_be_bytes().to_vec()).expect("enqueue");
        }
    });

    // Every start of the sender is a new incarnation.
    let mut incarnation = 1;
    let mut in_flight: Vec<(Stream, Seq, Vec<u8>)> = Vec::new();
    let mut acks: Vec<(u64, Seq)> = Vec::new();
    let mut rounds = 0;
    while depth(&*sender.read().expect("read"), B).expect("depth") > 0 {
        rounds += 1;
        if rounds > 2_000 {
            return Err(format!("seed {seed}: no progress"));
        }
        // The sender (re)sends a window of what is unacknowledged.
        let read = sender.read().expect("read");
        let (acked, _) = progress(&*read, B).expect("progress");
        let stream = Stream {
            incarnation,
            first: Seq(acked.0 + 1),
        };
        let window = unacked(&*read, B, 8).expect("unacked");
        drop(read);
        for (seq, bytes) in window {
            let msg = (stream, seq, bytes);
            if rng.next_u32() % 100 >= drop_pct {
                if rng.next_u32() % 100 < dup_pct {
                    in_flight.push(msg.clone());
                }
                in_flight.push(msg);
            }
        }
        // The network reorders.
        shuffle(&mut rng, &mut in_flight);
        // The receiver takes what arrives, storing it with the high-water mark.
        for (stream, seq, bytes) in in_flight.drain(..) {
            let mut txn = receiver.write().expect("write");
            if accept(&mut *txn, A, stream, seq).expect("accept") == Arrival::Fresh {
                DELIVERED
                    .put(&mut *txn, &seq.0, &Payload(bytes))
                    .expect("deliver");
            }
            txn.commit().expect("commit");
            let hwm = mark(&*receiver.read().expect("read"), A).expect("mark");
            if rng.next_u32() % 100 >= drop_pct {
                acks.extend(hwm.map(|m| (m.incarnation, Seq(m.high))));
            }
            if rng.next_u32() % 100 < crash_pct {
                receiver.crash();
                // What the sender has dropped as acknowledged must still be held
                // by the receiver, or it is lost for good.
                let hwm = high(&receiver, A);
                let pending = depth(&*sender.read().expect("read"), B).expect("depth");
                let acked = u64::from(messages) - pending;
                if hwm < acked {
                    return Err(format!(
                        "seed {seed}: the receiver lost message {} after it was acknowledged",
                        hwm + 1
                    ));
                }
            }
        }
        // Acknowledgements come back, reordered and duplicated.
        shuffle(&mut rng, &mut acks);
        for (of, upto) in acks.drain(..) {
            if of != incarnation {
                // Acknowledges another run's stream: dropped.
                continue;
            }
            let mut txn = sender.write().expect("write");
            match ack(&mut *txn, B, upto) {
                Ok(_) => txn.commit().expect("commit"),
                Err(e) => return Err(format!("seed {seed}: {e}")),
            }
        }
        if rng.next_u32() % 100 < crash_pct {
            sender.crash();
            incarnation += 1;
        }
    }

    check_delivered(&receiver, messages, seed)
}

/// Reorders `items` as the network may (Fisher–Yates).
fn shuffle<T>(rng: &mut ChaCha20Rng, items: &mut [T]) {
    for i in (1..items.len()).rev() {
        let j = (rng.next_u32() as usize) % (i + 1);
        items.swap(i, j);
    }
}

/// Whether `receiver` holds each of the `messages` exactly once, in order.
fn check_delivered(receiver: &MemStore, messages: u32, seed: u64) -> Result<(), String> {
    let read = receiver.read().expect("read");
    let delivered = DELIVERED
        .scan(&*read, .., Order::Ascending, usize::MAX)
        .expect("scan");
    let expected: Vec<(u64, Payload)> = (0..messages)
        .map(|i| (u64::from(i) + 1, Payload(i.to_be_bytes().to_vec())))
        .collect();
    if delivered != expected {
        return Err(format!(
            "seed {seed}: delivered {} of {messages} messages, or out of order",
            delivered.len()
        ));
    }
    Ok(())
}

#[test]
fn once_in_order_through_loss_duplication_reordering_and_crashes() {
    for seed in 0..200 {
        if let Err(e) = exchange(seed, false) {
            panic!("{e}");
        }
    }
}

#[test]
fn the_harness_catches_acknowledging_before_persisting() {
    let caught = (0..200)
        .filter(|&seed| exchange(seed, true).is_err())
        .count();
    assert!(
        caught > 0,
        "no seed caught acknowledgements of unsynced messages"
    );
}

#[test]
fn unsent_reads_only_past_what_was_sent_and_within_the_window() {
    let store = MemStore::new();
    with_write(&store, |txn| {
        for i in 0..6u8 {
            enqueue(txn, B, vec![i]).expect("enqueue");
        }
    });
    let seqs = |after: u64, window: usize| -> Vec<u64> {
        let read = store.read().expect("read");
        unsent(&*read, B, Seq(0), Seq(after), window)
            .expect("unsent")
            .into_iter()
            .map(|(s, _)| s.0)
            .collect()
    };
    assert_eq!(
        seqs(0, 4),
        [1, 2, 3, 4],
        "the window is the first unacknowledged"
    );
    assert_eq!(seqs(2, 4), [3, 4], "nothing sent already");
    assert_eq!(seqs(4, 4), Vec::<u64>::new(), "the window is full");
    with_write(&store, |txn| ack(txn, B, Seq(3)).expect("ack"));
    // Acknowledged through 3: the window slides to 4..=6.
    assert_eq!(seqs(4, 4), [5, 6]);
    assert_eq!(
        seqs(1, 2),
        [4, 5],
        "a stale mark reads from the first unacknowledged"
    );
    // An acknowledgement the caller knows of and this store does not yet (it is
    // not durable) opens the window all the same.
    let read = store.read().expect("read");
    let ahead: Vec<u64> = unsent(&*read, B, Seq(5), Seq(4), 1)
        .expect("unsent")
        .into_iter()
        .map(|(s, _)| s.0)
        .collect();
    assert_eq!(ahead, [6]);
}

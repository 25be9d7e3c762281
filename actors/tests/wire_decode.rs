//! The envelope decoder against random and mutated input: it returns a typed error,
//! never panics, and allocates in proportion to its input, never beyond the limit.

use std::alloc::{GlobalAlloc, Layout, System as SystemAlloc};
use std::cell::Cell;
use std::collections::BTreeMap;

use conclave_actors::actor::{ActorKey, ActorKind, ActorRef};
use conclave_actors::wire::{Envelope, WireError, ENVELOPE_BYTES_MAX, WIRE_VERSION};
use conclave_actors::{MessageId, NodeId, RoomId};
use proptest::prelude::*;
use serde::{Deserialize, Serialize};

/// Counts this thread's live heap bytes and their peak, so that concurrent tests do
/// not disturb each other's measurement.
struct CountingAlloc;

thread_local! {
    static LIVE: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

fn note_alloc(size: usize) {
    let _ = LIVE.try_with(|live| {
        let now = live.get() + size;
        live.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

fn note_free(size: usize) {
    let _ = LIVE.try_with(|live| live.set(live.get().saturating_sub(size)));
}

unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note_alloc(layout.size());
        SystemAlloc.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        note_free(layout.size());
        SystemAlloc.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note_free(layout.size());
        note_alloc(new_size);
        SystemAlloc.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// Peak heap bytes allocated on this thread while `f` runs, above what was live.
fn peak_during<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    let out = f();
    (out, PEAK.with(Cell::get) - base)
}

/// A body with every shape the real messages use: nested enums, sequences of
/// structs, byte strings, text, options, fixed arrays and ordered maps.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum Body {
    Publish {
        room: RoomId,
        id: MessageId,
        ciphertext: Vec<u8>,
        note: Option<String>,
    },
    Fanout {
        to: Vec<ActorRef>,
        seqs: Vec<u64>,
    },
    Keys(BTreeMap<u64, Vec<u8>>),
    Ack {
        upto: u64,
    },
}

fn actor_ref() -> impl Strategy<Value = ActorRef> {
    (any::<[u8; 32]>(), any::<u16>(), any::<u64>()).prop_map(|(n, k, id)| ActorRef {
        node: NodeId(n),
        kind: ActorKind(k),
        key: ActorKey::Id(id),
    })
}

fn body() -> impl Strategy<Value = Body> {
    prop_oneof![
        (
            any::<[u8; 16]>(),
            any::<u128>(),
            prop::collection::vec(any::<u8>(), 0..512),
            prop::option::of(".{0,40}")
        )
            .prop_map(|(r, id, ciphertext, note)| Body::Publish {
                room: RoomId(r),
                id: MessageId(id),
                ciphertext,
                note
            }),
        (
            prop::collection::vec(actor_ref(), 0..8),
            prop::collection::vec(any::<u64>(), 0..16)
        )
            .prop_map(|(to, seqs)| Body::Fanout { to, seqs }),
        prop::collection::btree_map(
            any::<u64>(),
            prop::collection::vec(any::<u8>(), 0..64),
            0..8
        )
        .prop_map(Body::Keys),
        any::<u64>().prop_map(|upto| Body::Ack { upto }),
    ]
}

fn envelope() -> impl Strategy<Value = Envelope<Body>> {
    (actor_ref(), actor_ref(), body()).prop_map(|(from, to, msg)| Envelope { from, to, msg })
}

/// Decoding may allocate a constant plus a small multiple of its input: the largest
/// in-memory element per encoded byte, doubled for vector growth.
fn allocation_bound(input_len: usize) -> usize {
    4096 + 160 * input_len
}

fn decode_checked(bytes: &[u8]) -> Result<Envelope<Body>, WireError> {
    let (result, peak) = peak_during(|| Envelope::<Body>::decode(bytes));
    assert!(
        peak <= allocation_bound(bytes.len()),
        "decoding {} bytes allocated {peak} bytes",
        bytes.len()
    );
    result
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn valid_envelopes_round_trip(env in envelope()) {
        let bytes = env.encode().expect("encodes");
        prop_assert_eq!(bytes[0], WIRE_VERSION);
        prop_assert_eq!(decode_checked(&bytes), Ok(env));
    }

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        let _ = decode_checked(&bytes);
    }

    #[test]
    fn random_bytes_behind_the_version_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        let mut input = vec![WIRE_VERSION];
        input.extend_from_slice(&bytes);
        let _ = decode_checked(&input);
    }

    #[test]
    fn mutated_envelopes_never_panic(
        env in envelope(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
        extend in prop::collection::vec(any::<u8>(), 0..8),
    ) {
        let mut bytes = env.encode().expect("encodes");
        for (at, value) in flips {
            let i = at.index(bytes.len());
            bytes[i] = value;
        }
        let _ = decode_checked(&bytes);
        // Every truncation of a valid encoding is an error, never a panic.
        let valid = env.encode().expect("encodes");
        let short = &valid[..cut.index(valid.len())];
        prop_assert!(decode_checked(short).is_err());
        // Bytes after a complete envelope are refused.
        if !extend.is_empty() {
            let mut long = valid.clone();
            long.extend_from_slice(&extend);
            prop_assert_eq!(decode_checked(&long), Err(WireError::TrailingBytes(extend.len())));
        }
    }
}

#[test]
fn errors_are_typed() {
    assert_eq!(Envelope::<Body>::decode(&[]), Err(WireError::Empty));
    assert_eq!(
        Envelope::<Body>::decode(&[WIRE_VERSION + 1, 0, 0]),
        Err(WireError::UnsupportedVersion {
            got: WIRE_VERSION + 1
        })
    );
    assert_eq!(
        Envelope::<Body>::decode(&[WIRE_VERSION]),
        Err(WireError::Truncated)
    );
    let huge = vec![WIRE_VERSION; ENVELOPE_BYTES_MAX + 1];
    assert_eq!(
        Envelope::<Body>::decode(&huge),
        Err(WireError::TooLarge {
            len: ENVELOPE_BYTES_MAX + 1,
            max: ENVELOPE_BYTES_MAX
        })
    );
}

#[test]
fn forged_lengths_do_not_allocate_what_they_claim() {
    // A valid header, then a sequence claiming u32::MAX elements: the decoder must
    // refuse it after allocating about what the input holds, not gigabytes.
    let env = Envelope {
        from: ActorRef::new(NodeId([1; 32]), ActorKind(1), ActorKey::Unit),
        to: ActorRef::new(NodeId([2; 32]), ActorKind(2), ActorKey::Unit),
        msg: Body::Fanout {
            to: vec![],
            seqs: vec![],
        },
    };
    let mut bytes = env.encode().expect("encodes");
    bytes.pop();
    bytes.pop(); // drop the two empty sequence lengths
    bytes.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x0f]); // varint u32::MAX
    bytes.extend_from_slice(&[0u8; 64]);
    assert!(decode_checked(&bytes).is_err());

    // The same with enough bytes for a few dozen elements before the input ends.
    let mut seq = env.encode().expect("encodes");
    seq.truncate(seq.len() - 2);
    seq.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x0f]);
    seq.extend_from_slice(&[0u8; 1024]);
    assert!(decode_checked(&seq).is_err());
}

#[test]
fn oversized_bodies_do_not_encode() {
    let env = Envelope {
        from: ActorRef::new(NodeId([1; 32]), ActorKind(1), ActorKey::Unit),
        to: ActorRef::new(NodeId([2; 32]), ActorKind(2), ActorKey::Unit),
        msg: Body::Publish {
            room: RoomId([0; 16]),
            id: MessageId(0),
            ciphertext: vec![0; ENVELOPE_BYTES_MAX],
            note: None,
        },
    };
    assert!(matches!(env.encode(), Err(WireError::TooLarge { .. })));
}

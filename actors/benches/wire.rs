//! Envelope encode/decode: the wire cost every message pays at least twice.

use std::hint::black_box;
use std::time::Duration;

use conclave_actors::actor::{ActorKey, ActorKind, ActorRef};
use conclave_actors::crypto::{seal_frame, EpochKey, Frame};
use conclave_actors::wire::Envelope;
use conclave_actors::{Epoch, Identity, MessageId, NodeId, RoomId};
use criterion::{criterion_group, criterion_main, Criterion};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

fn frame_envelope() -> Envelope<Frame> {
    let mut rng = ChaCha20Rng::seed_from_u64(7);
    let sender = Identity::generate(&mut rng);
    let key = EpochKey::generate(&mut rng);
    let room = RoomId([3; 16]);
    let frame = seal_frame(
        &mut rng,
        sender.signing_key(),
        &key,
        room,
        Epoch(1),
        MessageId::from_parts(1_700_000_000_000, 42),
        &[0x5a; 256],
    )
    .expect("seals");
    Envelope {
        from: ActorRef::new(NodeId([1; 32]), ActorKind::ROOM, ActorKey::Room(room)),
        to: ActorRef::new(NodeId([2; 32]), ActorKind::ROOM, ActorKey::Room(room)),
        msg: frame,
    }
}

fn bench(c: &mut Criterion) {
    let env = frame_envelope();
    let bytes = env.encode().expect("encodes");
    let mut group = c.benchmark_group("envelope_256B_frame");
    group.measurement_time(Duration::from_secs(3));
    group.bench_function("encode", |b| b.iter(|| black_box(&env).encode()));
    group.bench_function("decode", |b| {
        b.iter(|| Envelope::<Frame>::decode(black_box(&bytes)))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

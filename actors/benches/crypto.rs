//! The cryptography every message and every rekey pays for.
//!
//! Sizes are the common case: one 32-byte epoch key sealed (and signed) to one member,
//! and a 256-byte frame plaintext. Sample sizes are kept small so the whole run stays
//! under a minute on a small machine.

use std::hint::black_box;
use std::time::Duration;

use conclave_actors::crypto::{
    open_epoch_key, open_frame, seal_epoch_key, seal_frame, verify_frame, verify_sealed_key,
    EpochKey, Frame,
};
use conclave_actors::{Epoch, MessageId, RoomId};
use criterion::{criterion_group, criterion_main, Criterion};
use ed25519_dalek::SigningKey;
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use x25519_dalek::{PublicKey, StaticSecret};

const ROOM: RoomId = RoomId([3; 16]);
const EPOCH: Epoch = Epoch(1);

fn epoch_keys(c: &mut Criterion) {
    let mut rng = ChaCha20Rng::seed_from_u64(1);
    let member = StaticSecret::random_from_rng(&mut rng);
    let member_public = PublicKey::from(&member);
    let sealer = SigningKey::generate(&mut rng);
    let key = EpochKey::generate(&mut rng);
    let sealed =
        seal_epoch_key(&mut rng, &sealer, &member_public, ROOM, EPOCH, &key).expect("seals");

    let mut group = c.benchmark_group("epoch_key");
    group.sample_size(30);
    group.warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(2));
    group.bench_function("seal_epoch_key", |b| {
        b.iter(|| {
            seal_epoch_key(
                &mut rng,
                &sealer,
                black_box(&member_public),
                ROOM,
                EPOCH,
                &key,
            )
            .expect("seals")
        })
    });
    group.bench_function("open_epoch_key", |b| {
        b.iter(|| open_epoch_key(&member, ROOM, EPOCH, black_box(&sealed)).expect("opens"))
    });
    group.bench_function("verify_sealed_key", |b| {
        b.iter(|| {
            verify_sealed_key(black_box(&sealed), &member_public, ROOM, EPOCH).expect("verifies")
        })
    });
    group.finish();
}

fn frames(c: &mut Criterion) {
    let mut rng = ChaCha20Rng::seed_from_u64(2);
    let signer = SigningKey::generate(&mut rng);
    let key = EpochKey::generate(&mut rng);
    let id = MessageId::from_parts(1_700_000_000_000, 42);
    let plaintext = [0x5a; 256];
    let frame = seal_frame(&mut rng, &signer, &key, ROOM, EPOCH, id, &plaintext).expect("seals");
    let bytes = frame.encode().expect("encodes");

    let mut group = c.benchmark_group("frame_256B");
    group.sample_size(30);
    group.warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(2));
    group.bench_function("seal_frame", |b| {
        b.iter(|| {
            seal_frame(
                &mut rng,
                &signer,
                &key,
                ROOM,
                EPOCH,
                id,
                black_box(&plaintext),
            )
            .expect("seals")
        })
    });
    group.bench_function("open_frame", |b| {
        b.iter(|| open_frame(black_box(&frame), ROOM, EPOCH, &key).expect("opens"))
    });
    group.bench_function("verify_frame", |b| {
        b.iter(|| verify_frame(black_box(&frame)).expect("verifies"))
    });
    group.bench_function("encode", |b| {
        b.iter(|| black_box(&frame).encode().expect("encodes"))
    });
    group.bench_function("decode", |b| {
        b.iter(|| Frame::decode(black_box(&bytes)).expect("decodes"))
    });
    group.finish();
}

criterion_group!(benches, epoch_keys, frames);
criterion_main!(benches);

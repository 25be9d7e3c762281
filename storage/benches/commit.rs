//! What a durable commit costs: LMDB with 1 and 64 records (~256-byte values) per
//! transaction, each commit fsynced before it returns, in a temporary directory on the
//! disk that holds it; and MemStore with 64 records, for comparison.
//!
//! `cargo bench -p conclave-storage --bench commit`

use std::hint::black_box;
use std::time::Duration;

use conclave_storage::{LmdbOptions, LmdbStore, MemStore, Store};
use criterion::{criterion_group, criterion_main, Criterion};

const VALUE_BYTES: usize = 256;

/// One write transaction of `records` fresh keys, committed.
fn commit_records(store: &dyn Store, next_key: &mut u64, records: u64, value: &[u8]) {
    let mut txn = store.write().expect("begin");
    for _ in 0..records {
        txn.put("bench", &next_key.to_be_bytes(), value)
            .expect("put");
        *next_key += 1;
    }
    txn.commit().expect("commit");
}

fn commits(c: &mut Criterion) {
    let value = vec![0xa5u8; VALUE_BYTES];
    let dir = tempfile::tempdir().expect("tempdir");
    let lmdb = LmdbStore::open(dir.path(), LmdbOptions::default()).expect("open");
    let mem = MemStore::new();

    let mut group = c.benchmark_group("commit");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    for (name, store, records) in [
        ("lmdb_1_record", &lmdb as &dyn Store, 1),
        ("lmdb_64_records", &lmdb, 64),
        ("mem_64_records", &mem, 64),
    ] {
        let mut next_key = 0u64;
        group.bench_function(name, |b| {
            b.iter(|| commit_records(black_box(store), &mut next_key, records, &value))
        });
    }
    group.finish();
}

criterion_group!(benches, commits);
criterion_main!(benches);

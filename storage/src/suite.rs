//! One behavioural suite, run against every store, plus store-specific tests.
//!
//! Each suite function takes a [`Harness`]; the `suite!` macro at the bottom turns
//! each into a `#[test]` for [`LmdbStore`] and one for [`MemStore`].

use std::collections::BTreeMap;
use std::ops::Bound::{self, Excluded, Included, Unbounded};
use std::ops::RangeBounds;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::mpsc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{
    Entry, LmdbOptions, LmdbStore, MemStore, Order, Store, StoreError, SyncPolicy, Table,
    KEY_BYTES_MAX, TABLE_NAME_BYTES_MAX, VALUE_BYTES_MAX,
};

/// A store under test, and a way to restart it.
pub(crate) trait Harness {
    fn store(&self) -> &dyn Store;
    /// Restart: LMDB closes and reopens the environment; MemStore crashes (volatile
    /// state lost, durable state kept) and carries on through a clone.
    fn restart(&mut self);
}

struct LmdbHarness {
    dir: tempfile::TempDir,
    store: Option<LmdbStore>,
}

impl LmdbHarness {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = LmdbStore::open(dir.path(), small_lmdb()).unwrap();
        LmdbHarness {
            dir,
            store: Some(store),
        }
    }
}

/// Tests open many environments at once; keep each map modest (it is address space).
fn small_lmdb() -> LmdbOptions {
    LmdbOptions {
        map_size_bytes: 256 << 20,
        ..LmdbOptions::default()
    }
}

impl Harness for LmdbHarness {
    fn store(&self) -> &dyn Store {
        self.store.as_ref().unwrap()
    }
    fn restart(&mut self) {
        drop(self.store.take());
        self.store = Some(LmdbStore::open(self.dir.path(), small_lmdb()).unwrap());
    }
}

struct MemHarness {
    store: MemStore,
}

impl Harness for MemHarness {
    fn store(&self) -> &dyn Store {
        &self.store
    }
    fn restart(&mut self) {
        self.store.crash();
        self.store = self.store.clone();
    }
}

/// A batch over an in-memory store: every suite test then runs on the batch's
/// pending writes; a restart flushes (a clean stop) and crashes the store.
struct BatchHarness {
    mem: MemStore,
    batch: crate::Batch,
}

impl BatchHarness {
    fn new() -> Self {
        let mem = MemStore::new();
        let batch = crate::Batch::new(std::sync::Arc::new(mem.clone()));
        BatchHarness { mem, batch }
    }
}

impl Harness for BatchHarness {
    fn store(&self) -> &dyn Store {
        &self.batch
    }
    fn restart(&mut self) {
        self.batch.flush().unwrap();
        self.mem.crash();
        self.batch = crate::Batch::new(std::sync::Arc::new(self.mem.clone()));
    }
}

// ---- helpers ----

fn put(store: &dyn Store, table: &str, kvs: &[(&[u8], &[u8])]) {
    let mut txn = store.write().unwrap();
    for (k, v) in kvs {
        txn.put(table, k, v).unwrap();
    }
    txn.commit().unwrap();
}

fn get(store: &dyn Store, table: &str, key: &[u8]) -> Option<Vec<u8>> {
    store.read().unwrap().get(table, key).unwrap()
}

fn all(store: &dyn Store, table: &str) -> Vec<Entry> {
    store
        .read()
        .unwrap()
        .scan(table, Unbounded, Unbounded, Order::Ascending, usize::MAX)
        .unwrap()
}

fn entries(kvs: &[(&[u8], &[u8])]) -> Vec<Entry> {
    kvs.iter().map(|(k, v)| (k.to_vec(), v.to_vec())).collect()
}

/// What a scan must return, computed from a model.
fn model_scan(
    model: &BTreeMap<Vec<u8>, Vec<u8>>,
    lower: Bound<&[u8]>,
    upper: Bound<&[u8]>,
    order: Order,
    limit: usize,
) -> Vec<Entry> {
    let in_range = |k: &[u8]| (lower, upper).contains(k);
    let it = model.iter().filter(|(k, _)| in_range(k));
    let v: Vec<Entry> = match order {
        Order::Ascending => it
            .map(|(k, v)| (k.clone(), v.clone()))
            .take(limit)
            .collect(),
        Order::Descending => it
            .rev()
            .map(|(k, v)| (k.clone(), v.clone()))
            .take(limit)
            .collect(),
    };
    v
}

/// Every combination of bounds over `probes`, both orders, several limits: compares
/// `scan` against the model.
fn check_scans(
    txn: &dyn crate::ReadTxn,
    table: &str,
    model: &BTreeMap<Vec<u8>, Vec<u8>>,
    probes: &[&[u8]],
) {
    let mut bounds: Vec<Bound<&[u8]>> = vec![Unbounded];
    for p in probes {
        bounds.push(Included(p));
        bounds.push(Excluded(p));
    }
    let mut checked = 0;
    for &lower in &bounds {
        for &upper in &bounds {
            for order in [Order::Ascending, Order::Descending] {
                for limit in [0, 1, 2, 3, 100] {
                    let got = txn.scan(table, lower, upper, order, limit).unwrap();
                    let want = model_scan(model, lower, upper, order, limit);
                    assert_eq!(
                        got, want,
                        "scan {lower:?}..{upper:?} {order:?} limit {limit}"
                    );
                    checked += 1;
                }
            }
        }
    }
    assert_eq!(checked, bounds.len() * bounds.len() * 2 * 5);
}

// ---- the suite ----

fn get_put_delete(h: &mut dyn Harness) {
    let s = h.store();
    put(s, "t", &[(b"k1", b"v1"), (b"k2", b"v2")]);
    assert_eq!(get(s, "t", b"k1").as_deref(), Some(&b"v1"[..]));
    assert_eq!(get(s, "t", b"k2").as_deref(), Some(&b"v2"[..]));
    assert_eq!(get(s, "t", b"k3"), None);

    let mut txn = s.write().unwrap();
    assert!(txn.delete("t", b"k1").unwrap());
    assert!(
        !txn.delete("t", b"k1").unwrap(),
        "second delete finds nothing"
    );
    assert!(!txn.delete("t", b"nope").unwrap());
    txn.commit().unwrap();
    assert_eq!(get(s, "t", b"k1"), None);
    assert_eq!(all(s, "t"), entries(&[(b"k2", b"v2")]));

    // Empty values are values.
    put(s, "t", &[(b"empty", b"")]);
    assert_eq!(get(s, "t", b"empty"), Some(Vec::new()));
}

fn overwrite(h: &mut dyn Harness) {
    let s = h.store();
    put(s, "t", &[(b"k", b"first")]);
    put(s, "t", &[(b"k", b"second, longer")]);
    assert_eq!(get(s, "t", b"k").as_deref(), Some(&b"second, longer"[..]));
    put(s, "t", &[(b"k", b"3")]);
    assert_eq!(all(s, "t"), entries(&[(b"k", b"3")]));
    // Twice in one transaction: the last put wins.
    put(s, "t", &[(b"k", b"a"), (b"k", b"b")]);
    assert_eq!(get(s, "t", b"k").as_deref(), Some(&b"b"[..]));
}

fn tables_are_separate_and_absent_ones_read_empty(h: &mut dyn Harness) {
    let s = h.store();
    assert_eq!(get(s, "never", b"k"), None);
    assert!(all(s, "never").is_empty());
    put(s, "a", &[(b"k", b"in a")]);
    put(s, "b", &[(b"k", b"in b")]);
    assert_eq!(get(s, "a", b"k").as_deref(), Some(&b"in a"[..]));
    assert_eq!(get(s, "b", b"k").as_deref(), Some(&b"in b"[..]));
    assert_eq!(get(s, "never", b"k"), None);

    // Inside a write transaction too, and deleting from a missing table is a no-op.
    let mut txn = s.write().unwrap();
    assert_eq!(txn.get("never", b"k").unwrap(), None);
    assert!(txn
        .scan("never", Unbounded, Unbounded, Order::Descending, 10)
        .unwrap()
        .is_empty());
    assert!(!txn.delete("never", b"k").unwrap());
    txn.commit().unwrap();
    assert!(all(s, "never").is_empty());
}

const SCAN_KEYS: [&[u8]; 7] = [b"a", b"ab", b"abc", b"b", b"ba", b"c", b"\xff"];
const SCAN_PROBES: [&[u8]; 10] = [
    b"",
    b"a",
    b"aa",
    b"ab",
    b"abc",
    b"abd",
    b"b",
    b"bz",
    b"c",
    b"\xff\xff",
];

fn scan_bounds_orders_limits(h: &mut dyn Harness) {
    let s = h.store();
    let mut model = BTreeMap::new();
    let mut txn = s.write().unwrap();
    // Insert out of order: the store, not the caller, sorts.
    for (i, k) in SCAN_KEYS.iter().enumerate().rev() {
        let v = format!("v{i}").into_bytes();
        txn.put("scan", k, &v).unwrap();
        model.insert(k.to_vec(), v);
    }
    txn.commit().unwrap();
    // A neighbouring table must not leak into scans.
    put(s, "scan-other", &[(b"a", b"x"), (b"b", b"y")]);
    let txn = s.read().unwrap();
    check_scans(&*txn, "scan", &model, &SCAN_PROBES);
}

fn txn_sees_its_own_writes(h: &mut dyn Harness) {
    let s = h.store();
    let mut model = BTreeMap::new();
    let mut txn = s.write().unwrap();
    for (i, k) in SCAN_KEYS.iter().enumerate() {
        let v = format!("v{i}").into_bytes();
        txn.put("own", k, &v).unwrap();
        model.insert(k.to_vec(), v);
    }
    txn.commit().unwrap();

    let mut txn = s.write().unwrap();
    // Delete committed keys, overwrite one, add new ones between and around them,
    // add-then-delete one that was never committed.
    for k in [&b"ab"[..], b"c"] {
        assert!(txn.delete("own", k).unwrap());
        model.remove(k);
    }
    for (k, v) in [
        (&b"a"[..], &b"new a"[..]),
        (b"aa", b"aa"),
        (b"abd", b"abd"),
        (b"0", b"zero"),
        (b"\xff\xff", b"last"),
        (b"tmp", b"tmp"),
    ] {
        txn.put("own", k, v).unwrap();
        model.insert(k.to_vec(), v.to_vec());
    }
    assert!(txn.delete("own", b"tmp").unwrap());
    model.remove(&b"tmp"[..]);
    assert!(!txn.delete("own", b"tmp").unwrap());
    // Deleted then put again.
    txn.put("own", b"c", b"back").unwrap();
    model.insert(b"c".to_vec(), b"back".to_vec());

    assert_eq!(
        txn.get("own", b"a").unwrap().as_deref(),
        Some(&b"new a"[..])
    );
    assert_eq!(txn.get("own", b"ab").unwrap(), None);
    assert_eq!(txn.get("own", b"tmp").unwrap(), None);
    check_scans(&*txn, "own", &model, &SCAN_PROBES);

    // Nobody else sees any of it before the commit.
    let reader = s.read().unwrap();
    assert_eq!(reader.get("own", b"aa").unwrap(), None);
    assert_eq!(
        reader.get("own", b"ab").unwrap().as_deref(),
        Some(&b"v1"[..])
    );
    drop(reader);

    // A table created by this very transaction is readable in it.
    txn.put("own-new", b"k", b"v").unwrap();
    assert_eq!(
        txn.get("own-new", b"k").unwrap().as_deref(),
        Some(&b"v"[..])
    );
    txn.commit().unwrap();

    let txn = s.read().unwrap();
    check_scans(&*txn, "own", &model, &SCAN_PROBES);
    assert_eq!(
        txn.get("own-new", b"k").unwrap().as_deref(),
        Some(&b"v"[..])
    );
}

fn drop_aborts(h: &mut dyn Harness) {
    let s = h.store();
    put(s, "t", &[(b"keep", b"1")]);
    {
        let mut txn = s.write().unwrap();
        txn.put("t", b"lost", b"x").unwrap();
        txn.put("t", b"keep", b"overwritten").unwrap();
        assert!(txn.delete("t", b"keep").unwrap());
        txn.put("new-table", b"k", b"v").unwrap();
        // dropped without commit
    }
    assert_eq!(all(s, "t"), entries(&[(b"keep", b"1")]));
    assert!(all(s, "new-table").is_empty());
    // The table creation was rolled back too: creating it again later works.
    put(s, "new-table", &[(b"k", b"v2")]);
    assert_eq!(get(s, "new-table", b"k").as_deref(), Some(&b"v2"[..]));
}

fn many_puts_are_all_or_nothing(h: &mut dyn Harness) {
    let s = h.store();
    let key = |i: u32| i.to_be_bytes();
    {
        let mut txn = s.write().unwrap();
        for i in 0..1000u32 {
            txn.put("x", &key(i), b"x").unwrap();
            txn.put("y", &key(i), b"y").unwrap();
        }
    }
    assert!(all(s, "x").is_empty() && all(s, "y").is_empty());

    let mut txn = s.write().unwrap();
    for i in 0..1000u32 {
        txn.put("x", &key(i), b"x").unwrap();
        txn.put("y", &key(i), b"y").unwrap();
    }
    // A rejected write changes nothing and leaves the transaction usable.
    let err = txn.put("x", &[0; KEY_BYTES_MAX + 1], b"x").unwrap_err();
    assert!(matches!(err, StoreError::KeyTooLarge { .. }), "{err}");
    txn.commit().unwrap();
    assert_eq!(all(s, "x").len(), 1000);
    assert_eq!(all(s, "y").len(), 1000);
}

fn readers_see_a_stable_snapshot(h: &mut dyn Harness) {
    let s = h.store();
    put(
        s,
        "acct",
        &[(b"a", &100u64.to_be_bytes()), (b"b", &0u64.to_be_bytes())],
    );

    // Same thread: a reader that began earlier keeps its snapshot across commits,
    // including of a table created after it began.
    let old = s.read().unwrap();
    put(
        s,
        "acct",
        &[(b"a", &60u64.to_be_bytes()), (b"b", &40u64.to_be_bytes())],
    );
    put(s, "later", &[(b"k", b"v")]);
    assert_eq!(
        old.get("acct", b"a").unwrap(),
        Some(100u64.to_be_bytes().to_vec())
    );
    assert_eq!(old.get("later", b"k").unwrap(), None);
    assert!(old
        .scan("later", Unbounded, Unbounded, Order::Ascending, 10)
        .unwrap()
        .is_empty());
    let new = s.read().unwrap();
    assert_eq!(
        new.get("acct", b"a").unwrap(),
        Some(60u64.to_be_bytes().to_vec())
    );
    assert_eq!(new.get("later", b"k").unwrap().as_deref(), Some(&b"v"[..]));
    drop((old, new));

    // Threads: a writer moves money between two accounts, readers check that every
    // snapshot balances and does not change under them.
    let read_u64 = |txn: &dyn crate::ReadTxn, k: &[u8]| {
        let v = txn.get("acct", k).unwrap().unwrap();
        u64::from_be_bytes(v.try_into().unwrap())
    };
    let done = AtomicBool::new(false);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            for i in 0..200u64 {
                let mut txn = s.write().unwrap();
                let a = read_u64(&*txn, b"a");
                let b = read_u64(&*txn, b"b");
                let amount = i % 7;
                let (a, b) = if i % 2 == 0 {
                    (a - amount.min(a), b + amount.min(a))
                } else {
                    (a + amount.min(b), b - amount.min(b))
                };
                txn.put("acct", b"a", &a.to_be_bytes()).unwrap();
                txn.put("acct", b"b", &b.to_be_bytes()).unwrap();
                txn.commit().unwrap();
            }
            done.store(true, SeqCst);
        });
        for _ in 0..2 {
            scope.spawn(|| {
                let mut reads = 0;
                while !done.load(SeqCst) || reads < 50 {
                    let txn = s.read().unwrap();
                    let a = read_u64(&*txn, b"a");
                    let b = read_u64(&*txn, b"b");
                    assert_eq!(a + b, 100, "a snapshot must balance");
                    assert_eq!(read_u64(&*txn, b"a"), a, "a snapshot must not move");
                    reads += 1;
                }
            });
        }
    });
    let txn = s.read().unwrap();
    assert_eq!(read_u64(&*txn, b"a") + read_u64(&*txn, b"b"), 100);
}

fn one_writer_at_a_time(h: &mut dyn Harness) {
    let s = h.store();
    let (tx, rx) = mpsc::channel();
    let mut first = s.write().unwrap();
    first.put("w", b"k", b"first").unwrap();
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let mut second = s.write().unwrap();
            // By the time we get here the first writer has committed.
            let seen = second.get("w", b"k").unwrap();
            second.put("w", b"k", b"second").unwrap();
            second.commit().unwrap();
            tx.send(seen).unwrap();
        });
        assert!(
            rx.recv_timeout(Duration::from_millis(100)).is_err(),
            "a second writer began while the first was open"
        );
        first.commit().unwrap();
        let seen = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(seen.as_deref(), Some(&b"first"[..]));
    });
    assert_eq!(get(s, "w", b"k").as_deref(), Some(&b"second"[..]));
}

fn limits_are_enforced(h: &mut dyn Harness) {
    let s = h.store();
    let mut txn = s.write().unwrap();
    let max_name = "n".repeat(TABLE_NAME_BYTES_MAX);
    let long_name = "n".repeat(TABLE_NAME_BYTES_MAX + 1);
    for bad in ["", "has space", "nul\0byte", "ünï", long_name.as_str()] {
        let err = txn.put(bad, b"k", b"v").unwrap_err();
        assert!(
            matches!(err, StoreError::BadTableName { .. }),
            "{bad:?}: {err}"
        );
        assert!(matches!(
            txn.get(bad, b"k"),
            Err(StoreError::BadTableName { .. })
        ));
        assert!(matches!(
            txn.scan(bad, Unbounded, Unbounded, Order::Ascending, 1),
            Err(StoreError::BadTableName { .. })
        ));
        assert!(matches!(
            txn.delete(bad, b"k"),
            Err(StoreError::BadTableName { .. })
        ));
    }
    txn.put(&max_name, b"k", b"v").unwrap();

    let err = txn.put("t", b"", b"v").unwrap_err();
    assert!(
        matches!(err, StoreError::EmptyKey { ref table } if table == "t"),
        "{err}"
    );
    assert!(matches!(
        txn.get("t", b""),
        Err(StoreError::EmptyKey { .. })
    ));
    assert!(matches!(
        txn.delete("t", b""),
        Err(StoreError::EmptyKey { .. })
    ));

    let max_key = vec![7u8; KEY_BYTES_MAX];
    let long_key = vec![7u8; KEY_BYTES_MAX + 1];
    txn.put("t", &max_key, b"v").unwrap();
    let err = txn.put("t", &long_key, b"v").unwrap_err();
    assert!(
        matches!(err, StoreError::KeyTooLarge { len, max, .. } if len == KEY_BYTES_MAX + 1 && max == KEY_BYTES_MAX),
        "{err}"
    );
    assert!(matches!(
        txn.get("t", &long_key),
        Err(StoreError::KeyTooLarge { .. })
    ));
    assert!(matches!(
        txn.scan("t", Included(&long_key), Unbounded, Order::Ascending, 1),
        Err(StoreError::KeyTooLarge { .. })
    ));

    let max_value = vec![1u8; VALUE_BYTES_MAX];
    let big_value = vec![1u8; VALUE_BYTES_MAX + 1];
    txn.put("t", b"big", &max_value).unwrap();
    let err = txn.put("t", b"bigger", &big_value).unwrap_err();
    assert!(matches!(err, StoreError::ValueTooLarge { .. }), "{err}");
    txn.commit().unwrap();

    assert_eq!(get(s, "t", &max_key).as_deref(), Some(&b"v"[..]));
    assert_eq!(get(s, "t", b"big").map(|v| v.len()), Some(VALUE_BYTES_MAX));
    assert_eq!(get(s, "t", b"bigger"), None);
    assert_eq!(get(s, &max_name, b"k").as_deref(), Some(&b"v"[..]));
    // Messages say what failed.
    let msg = StoreError::KeyTooLarge {
        table: "t".into(),
        len: 600,
        max: KEY_BYTES_MAX,
    }
    .to_string();
    assert!(
        msg.contains("600") && msg.contains("511") && msg.contains("`t`"),
        "{msg}"
    );
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Frame {
    sender: String,
    body: Vec<u8>,
    epoch: u32,
}

const FRAMES: Table<(u64, i32, String), Frame> = Table::new("frames");
const COUNTERS: Table<[u8; 4], u64> = Table::new("counters");

fn typed_tables(h: &mut dyn Harness) {
    let s = h.store();
    let frame = |n: i32| Frame {
        sender: format!("s{n}"),
        body: vec![n as u8; 3],
        epoch: n.unsigned_abs(),
    };
    // Keys inserted in scrambled order; integers across byte boundaries and signs,
    // strings where a prefix sorts first.
    let mut keys = Vec::new();
    for room in [0u64, 1, 255, 256, u64::MAX] {
        for seq in [i32::MIN, -256, -1, 0, 1, 255, 256, i32::MAX] {
            for name in ["", "a", "ab", "b"] {
                keys.push((room, seq, name.to_owned()));
            }
        }
    }
    let mut scrambled = keys.clone();
    scrambled.reverse();
    scrambled.rotate_left(37);
    let mut txn = s.write().unwrap();
    for k in &scrambled {
        FRAMES.put(&mut *txn, k, &frame(k.1)).unwrap();
    }
    COUNTERS.put(&mut *txn, b"abcd", &42).unwrap();
    assert_eq!(FRAMES.get(&*txn, &keys[5]).unwrap(), Some(frame(keys[5].1)));
    txn.commit().unwrap();

    let txn = s.read().unwrap();
    keys.sort();
    let got = FRAMES
        .scan(&*txn, .., Order::Ascending, usize::MAX)
        .unwrap();
    let got_keys: Vec<_> = got.iter().map(|(k, _)| k.clone()).collect();
    assert_eq!(got_keys, keys, "byte order is tuple order");
    for (k, v) in &got {
        assert_eq!(v, &frame(k.1));
    }
    let rev = FRAMES.scan(&*txn, .., Order::Descending, 3).unwrap();
    let want: Vec<_> = keys.iter().rev().take(3).cloned().collect();
    assert_eq!(rev.into_iter().map(|(k, _)| k).collect::<Vec<_>>(), want);

    // Range within one room: seq in [-1, 256), descending, limited.
    let lo = (255u64, -1i32, String::new());
    let hi = (255u64, 256i32, String::new());
    let got = FRAMES
        .scan(&*txn, lo.clone()..hi.clone(), Order::Descending, 5)
        .unwrap();
    let want: Vec<_> = keys
        .iter()
        .filter(|k| **k >= lo && **k < hi)
        .rev()
        .take(5)
        .cloned()
        .collect();
    assert_eq!(want.len(), 5);
    assert_eq!(got.into_iter().map(|(k, _)| k).collect::<Vec<_>>(), want);
    let got = FRAMES
        .scan(
            &*txn,
            (Excluded(lo.clone()), Included(hi.clone())),
            Order::Ascending,
            100,
        )
        .unwrap();
    let want: Vec<_> = keys
        .iter()
        .filter(|k| **k > lo && **k <= hi)
        .cloned()
        .collect();
    assert_eq!(got.into_iter().map(|(k, _)| k).collect::<Vec<_>>(), want);

    assert_eq!(
        FRAMES.first(&*txn).unwrap().map(|(k, _)| k),
        keys.first().cloned()
    );
    assert_eq!(
        FRAMES.last(&*txn).unwrap().map(|(k, _)| k),
        keys.last().cloned()
    );
    assert_eq!(COUNTERS.get(&*txn, b"abcd").unwrap(), Some(42));
    assert_eq!(COUNTERS.get(&*txn, b"zzzz").unwrap(), None);
    drop(txn);

    let mut txn = s.write().unwrap();
    assert!(FRAMES.delete(&mut *txn, &keys[0]).unwrap());
    assert!(!FRAMES.delete(&mut *txn, &keys[0]).unwrap());
    txn.commit().unwrap();
    let txn = s.read().unwrap();
    assert_eq!(
        FRAMES.first(&*txn).unwrap().map(|(k, _)| k),
        Some(keys[1].clone())
    );
    assert_eq!(FRAMES.get(&*txn, &keys[0]).unwrap(), None);

    // An empty table has no first or last.
    let empty: Table<u64, u64> = Table::new("empty");
    assert_eq!(empty.first(&*txn).unwrap(), None);
    assert_eq!(empty.last(&*txn).unwrap(), None);
    // The empty string key of a lone String table is an empty key: rejected.
    let names: Table<String, u8> = Table::new("names");
    drop(txn);
    let mut txn = s.write().unwrap();
    assert!(matches!(
        names.put(&mut *txn, &String::new(), &1),
        Err(StoreError::EmptyKey { .. })
    ));
}

fn bad_stored_bytes_are_corrupt(h: &mut dyn Harness) {
    let s = h.store();
    let typed: Table<u64, Frame> = Table::new("typed");
    let mut txn = s.write().unwrap();
    typed
        .put(
            &mut *txn,
            &1,
            &Frame {
                sender: "ok".into(),
                body: vec![],
                epoch: 1,
            },
        )
        .unwrap();
    // A value that is not a Frame (string length runs past the end).
    txn.put("typed", &2u64.to_be_bytes(), &[200, 1]).unwrap();
    // A valid Frame followed by garbage.
    let mut trailing = postcard::to_allocvec(&Frame {
        sender: "x".into(),
        body: vec![],
        epoch: 0,
    })
    .unwrap();
    trailing.push(0);
    txn.put("typed", &3u64.to_be_bytes(), &trailing).unwrap();
    // A key that is not a u64.
    txn.put("typed", b"short", &[0]).unwrap();
    txn.commit().unwrap();

    let txn = s.read().unwrap();
    assert!(typed.get(&*txn, &1).unwrap().is_some());
    for k in [2, 3] {
        let err = typed.get(&*txn, &k).unwrap_err();
        assert!(
            matches!(&err, StoreError::Corrupt { table, .. } if table == "typed"),
            "{err}"
        );
        assert!(err.to_string().contains("typed"), "{err}");
    }
    let err = typed.scan(&*txn, .., Order::Ascending, 10).unwrap_err();
    assert!(
        matches!(&err, StoreError::Corrupt { table, .. } if table == "typed"),
        "{err}"
    );
    let err = typed.last(&*txn).unwrap_err();
    assert!(
        matches!(&err, StoreError::Corrupt { table, reason } if table == "typed" && reason.contains("8 bytes")),
        "{err}"
    );
    // A UTF-8 check for String keys.
    let strings: Table<(u8, String), u8> = Table::new("strings");
    drop(txn);
    put(s, "strings", &[(&[1, 0xff, 0xfe], &[5])]);
    let txn = s.read().unwrap();
    let err = strings.first(&*txn).unwrap_err();
    assert!(
        matches!(&err, StoreError::Corrupt { table, .. } if table == "strings"),
        "{err}"
    );
}

fn group_commit_of_many_records(h: &mut dyn Harness) {
    let s = h.store();
    let t: Table<u64, Vec<u8>> = Table::new("group");
    let mut txn = s.write().unwrap();
    for i in 0..10_000u64 {
        t.put(&mut *txn, &i, &i.to_le_bytes().repeat(4)).unwrap();
    }
    txn.commit().unwrap();
    h.restart();
    let s = h.store();
    let txn = s.read().unwrap();
    let got = t.scan(&*txn, .., Order::Ascending, usize::MAX).unwrap();
    assert_eq!(got.len(), 10_000);
    for (i, (k, v)) in got.iter().enumerate() {
        assert_eq!(*k, i as u64);
        assert_eq!(*v, k.to_le_bytes().repeat(4));
    }
}

fn committed_data_survives_restart(h: &mut dyn Harness) {
    put(h.store(), "p", &[(b"a", b"1"), (b"b", b"2")]);
    put(h.store(), "q", &[(b"x", b"y")]);
    {
        let mut txn = h.store().write().unwrap();
        txn.put("p", b"uncommitted", b"!").unwrap();
        txn.put("uncommitted-table", b"k", b"v").unwrap();
    }
    h.restart();
    let s = h.store();
    assert_eq!(all(s, "p"), entries(&[(b"a", b"1"), (b"b", b"2")]));
    assert_eq!(all(s, "q"), entries(&[(b"x", b"y")]));
    assert!(all(s, "uncommitted-table").is_empty());
    // Usable after the restart: existing and new tables.
    put(s, "p", &[(b"c", b"3")]);
    put(s, "r", &[(b"k", b"v")]);
    let mut txn = s.write().unwrap();
    assert!(txn.delete("q", b"x").unwrap());
    txn.commit().unwrap();
    h.restart();
    let s = h.store();
    assert_eq!(all(s, "p").len(), 3);
    assert!(all(s, "q").is_empty());
    assert_eq!(get(s, "r", b"k").as_deref(), Some(&b"v"[..]));
}

macro_rules! suite {
    ($($name:ident),* $(,)?) => {
        mod lmdb_suite {
            $(#[test] fn $name() { super::$name(&mut super::LmdbHarness::new()) })*
        }
        mod mem_suite {
            $(#[test] fn $name() {
                super::$name(&mut super::MemHarness { store: super::MemStore::new() })
            })*
        }
        mod batch_suite {
            $(#[test] fn $name() { super::$name(&mut super::BatchHarness::new()) })*
        }
    };
}

suite!(
    get_put_delete,
    overwrite,
    tables_are_separate_and_absent_ones_read_empty,
    scan_bounds_orders_limits,
    txn_sees_its_own_writes,
    drop_aborts,
    many_puts_are_all_or_nothing,
    readers_see_a_stable_snapshot,
    one_writer_at_a_time,
    limits_are_enforced,
    typed_tables,
    bad_stored_bytes_are_corrupt,
    group_commit_of_many_records,
    committed_data_survives_restart,
);

// ---- MemStore only: crash semantics ----

#[test]
fn mem_commit_then_crash_keeps_data_on_commit_policy() {
    let s = MemStore::new();
    assert_eq!(s.policy(), SyncPolicy::OnCommit);
    put(&s, "t", &[(b"k", b"v")]);
    assert_eq!(s.unsynced_commits(), 0);
    s.crash();
    assert_eq!(get(&s, "t", b"k").as_deref(), Some(&b"v"[..]));
    assert_eq!(s.generation(), 1);
    assert_eq!(s.commits(), 1);
}

#[test]
fn mem_explicit_policy_loses_unsynced_commits() {
    let s = MemStore::with_policy(SyncPolicy::Explicit);
    put(&s, "t", &[(b"synced", b"1")]);
    s.sync();
    put(&s, "t", &[(b"unsynced", b"2")]);
    let mut txn = s.write().unwrap();
    assert!(txn.delete("t", b"synced").unwrap());
    txn.commit().unwrap();
    put(&s, "new", &[(b"k", b"v")]);
    assert_eq!(s.unsynced_commits(), 3);
    // Visible before the crash...
    assert_eq!(all(&s, "t"), entries(&[(b"unsynced", b"2")]));
    let clone = s.clone();
    s.crash();
    // ...gone after it, through every handle; the synced state is back.
    assert_eq!(all(&clone, "t"), entries(&[(b"synced", b"1")]));
    assert!(all(&clone, "new").is_empty());
    assert_eq!(s.unsynced_commits(), 0);
}

#[test]
fn mem_explicit_policy_commit_sync_crash_keeps_data() {
    let s = MemStore::with_policy(SyncPolicy::Explicit);
    put(&s, "t", &[(b"a", b"1")]);
    put(&s, "t", &[(b"b", b"2")]);
    assert_eq!(s.unsynced_commits(), 2);
    s.sync();
    assert_eq!(s.unsynced_commits(), 0);
    s.crash();
    assert_eq!(all(&s, "t"), entries(&[(b"a", b"1"), (b"b", b"2")]));
    // Switching to OnCommit syncs what is pending.
    put(&s, "t", &[(b"c", b"3")]);
    s.set_policy(SyncPolicy::OnCommit);
    s.crash();
    assert_eq!(all(&s, "t").len(), 3);
}

#[test]
fn mem_write_txn_open_across_a_crash_fails() {
    for policy in [SyncPolicy::OnCommit, SyncPolicy::Explicit] {
        let s = MemStore::with_policy(policy);
        put(&s, "t", &[(b"before", b"1")]);
        s.sync();
        let mut txn = s.write().unwrap();
        txn.put("t", b"during", b"2").unwrap();
        txn.put("other", b"k", b"v").unwrap();
        s.crash();
        txn.put("t", b"after", b"3").unwrap();
        let err = txn.commit().unwrap_err();
        assert!(matches!(err, StoreError::Crashed), "{err}");
        assert_eq!(all(&s, "t"), entries(&[(b"before", b"1")]));
        assert!(all(&s, "other").is_empty());
        assert_eq!(s.commits(), 1);
        // The writer lock was released: the store works after the crash.
        put(&s, "t", &[(b"after", b"ok")]);
        assert_eq!(get(&s, "t", b"after").as_deref(), Some(&b"ok"[..]));
    }
}

#[test]
fn mem_try_write_refuses_a_second_writer() {
    let s = MemStore::new();
    let mut first = s.try_write().unwrap();
    assert!(
        s.try_write().is_none(),
        "a second writer while the first is open"
    );
    first.put("t", b"k", b"v").unwrap();
    first.commit().unwrap();
    let second = s.try_write().unwrap();
    assert_eq!(second.get("t", b"k").unwrap().as_deref(), Some(&b"v"[..]));
}

#[test]
fn mem_wipe_loses_everything() {
    let s = MemStore::new();
    put(&s, "t", &[(b"k", b"v")]);
    s.sync();
    let reader = s.read().unwrap();
    let mut txn = s.write().unwrap();
    txn.put("t", b"k2", b"v2").unwrap();
    s.wipe();
    assert!(matches!(txn.commit(), Err(StoreError::Crashed)));
    assert!(all(&s, "t").is_empty());
    s.crash();
    assert!(all(&s, "t").is_empty(), "a wipe is durable");
    // A snapshot taken before keeps what it saw: it is memory, not disk.
    assert_eq!(reader.get("t", b"k").unwrap().as_deref(), Some(&b"v"[..]));
    assert_eq!(s.generation(), 2);
}

#[test]
fn mem_readers_keep_snapshots_and_commits_do_not_copy_untouched_tables() {
    let s = MemStore::with_policy(SyncPolicy::Explicit);
    put(&s, "a", &[(b"k", b"1")]);
    put(&s, "b", &[(b"k", b"1")]);
    let before = s.read().unwrap();
    put(&s, "a", &[(b"k", b"2")]);
    assert_eq!(before.get("a", b"k").unwrap().as_deref(), Some(&b"1"[..]));
    assert_eq!(get(&s, "a", b"k").as_deref(), Some(&b"2"[..]));
    s.crash();
    // Never synced: all three commits are lost.
    assert!(all(&s, "a").is_empty() && all(&s, "b").is_empty());
    assert_eq!(before.get("b", b"k").unwrap().as_deref(), Some(&b"1"[..]));
}

// ---- LMDB only ----

#[test]
fn lmdb_store_is_send_sync_and_read_txns_are_send() {
    fn send_sync_static<T: Send + Sync + 'static>() {}
    fn send<T: Send>() {}
    send_sync_static::<LmdbStore>();
    send_sync_static::<MemStore>();
    send::<crate::LmdbReadTxn<'static>>();

    let dir = tempfile::tempdir().unwrap();
    let store = std::sync::Arc::new(LmdbStore::open(dir.path(), small_lmdb()).unwrap());
    put(&*store, "t", &[(b"k", b"before")]);
    // A read transaction begun here, moved to and used on another thread.
    let txn = store.read_txn().unwrap();
    put(&*store, "t", &[(b"k", b"after")]);
    let seen = std::thread::scope(|scope| {
        scope
            .spawn(move || crate::ReadTxn::get(&txn, "t", b"k").unwrap())
            .join()
            .unwrap()
    });
    assert_eq!(seen.as_deref(), Some(&b"before"[..]));
    // The store used from spawned ('static) threads.
    let handles: Vec<_> = (0..4u8)
        .map(|i| {
            let store = std::sync::Arc::clone(&store);
            std::thread::spawn(move || put(&*store, "threads", &[(&[i], &[i])]))
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert_eq!(all(&*store, "threads").len(), 4);
}

#[test]
fn lmdb_same_directory_opens_once_per_process() {
    let dir = tempfile::tempdir().unwrap();
    let first = LmdbStore::open(dir.path(), small_lmdb()).unwrap();
    let err = LmdbStore::open(dir.path(), small_lmdb()).unwrap_err();
    assert!(matches!(err, StoreError::AlreadyOpen { .. }), "{err}");
    drop(first);
    LmdbStore::open(dir.path(), small_lmdb()).unwrap();
}

#[test]
fn lmdb_map_full_is_reported_and_the_store_stays_usable() {
    let dir = tempfile::tempdir().unwrap();
    let opts = LmdbOptions {
        map_size_bytes: 1 << 20,
        ..LmdbOptions::default()
    };
    let store = LmdbStore::open(dir.path(), opts).unwrap();
    put(&store, "t", &[(b"small", b"ok")]);
    let value = vec![0u8; 64 * 1024];
    let mut txn = store.write().unwrap();
    let err = (0..64u32)
        .try_for_each(|i| txn.put("t", &i.to_be_bytes(), &value))
        .and_then(|()| txn.commit())
        .unwrap_err();
    assert!(
        matches!(err, StoreError::MapFull { map_size_bytes } if map_size_bytes == 1 << 20),
        "{err}"
    );
    assert!(err.to_string().contains("map_size_bytes"), "{err}");
    assert_eq!(all(&store, "t"), entries(&[(b"small", b"ok")]));
    put(&store, "t", &[(b"later", b"fine")]);
    assert_eq!(all(&store, "t").len(), 2);
}

#[test]
fn lmdb_usage_follows_the_data_and_is_full_at_the_reserve() {
    let dir = tempfile::tempdir().unwrap();
    let opts = LmdbOptions {
        map_size_bytes: 4 << 20,
        ..LmdbOptions::default()
    };
    let store = LmdbStore::open(dir.path(), opts).unwrap();
    let empty = store.usage().unwrap().expect("LMDB has a bound");
    assert_eq!(empty.max_bytes, 4 << 20);
    assert_eq!(empty.reserve_bytes(), 512 << 10);
    assert!(!empty.full(), "{empty:?}");
    let value = vec![7u8; 64 << 10];
    let mut written = 0u32;
    while !store.usage().unwrap().unwrap().full() {
        assert!(written < 64, "4 MiB never filled: {:?}", store.usage());
        put(&store, "t", &[(&written.to_be_bytes(), &value)]);
        written += 1;
    }
    let full = store.usage().unwrap().unwrap();
    assert!(
        full.used_bytes >= u64::from(written) * (64 << 10),
        "{full:?}"
    );
    assert!(full.used_bytes + full.reserve_bytes() >= full.max_bytes);
    // The reserve takes what frees space: deleting everything commits, and the
    // data shrinks back.
    let mut txn = store.write().unwrap();
    for i in 0..written {
        assert!(txn.delete("t", &i.to_be_bytes()).unwrap());
    }
    txn.commit().unwrap();
    let after = store.usage().unwrap().unwrap();
    assert!(
        after.used_bytes < empty.used_bytes + (64 << 10),
        "{after:?}"
    );
    assert!(!after.full());
    assert_eq!(
        MemStore::new().usage().unwrap(),
        None,
        "the memory store has no bound"
    );
}

#[test]
fn lmdb_usage_far_from_full_is_measured_at_most_every_100_ms() {
    let dir = tempfile::tempdir().unwrap();
    let store = LmdbStore::open(dir.path(), small_lmdb()).unwrap();
    let before = store.usage().unwrap().unwrap();
    let value = vec![7u8; 64 << 10];
    for i in 0..16u32 {
        put(&store, "t", &[(&i.to_be_bytes(), &value)]);
    }
    assert_eq!(store.usage().unwrap().unwrap(), before, "answered again");
    std::thread::sleep(std::time::Duration::from_millis(110));
    let after = store.usage().unwrap().unwrap();
    assert!(
        after.used_bytes >= before.used_bytes + (1 << 20),
        "{after:?}"
    );
}

#[test]
fn lmdb_too_many_tables_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let opts = LmdbOptions {
        max_tables: 2,
        ..small_lmdb()
    };
    let store = LmdbStore::open(dir.path(), opts).unwrap();
    put(&store, "one", &[(b"k", b"v")]);
    let mut txn = store.write().unwrap();
    txn.put("two", b"k", b"v").unwrap();
    let err = txn.put("three", b"k", b"v").unwrap_err();
    assert!(matches!(err, StoreError::TooManyTables { max: 2 }), "{err}");
    // The failed creation did not spoil the transaction.
    txn.commit().unwrap();
    assert_eq!(get(&store, "two", b"k").as_deref(), Some(&b"v"[..]));
}

// ---- Batch only: pending writes over flushed ones ----

/// A small deterministic generator (xorshift), so the test needs no dependency.
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Scan bounds for the batch model test: a few keys inside, at and past the ends.
const BATCH_PROBES: &[&[u8]] = &[b"a", b"c", b"f", b"k", b"t", b"z"];

#[test]
fn batch_reads_match_a_model_across_flushes_seals_and_dropped_txns() {
    let mem = MemStore::new();
    let batch = crate::Batch::new(std::sync::Arc::new(mem.clone()));
    let mut model: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
    // What the store must hold, and what a sealed batch will add to it.
    let mut durable = model.clone();
    let mut sealed: Option<BTreeMap<Vec<u8>, Vec<u8>>> = None;
    let mut g = Gen(0x9e37_79b9_7f4a_7c15);
    for round in 0..400 {
        let mut txn = batch.write().unwrap();
        let mut next = model.clone();
        for _ in 0..g.below(6) {
            let key = vec![b'a' + g.below(20) as u8];
            if g.below(3) == 0 {
                assert_eq!(txn.delete("t", &key).unwrap(), next.remove(&key).is_some());
            } else {
                let value = vec![round as u8, g.below(255) as u8];
                txn.put("t", &key, &value).unwrap();
                next.insert(key, value);
            }
        }
        check_scans(&*txn, "t", &next, BATCH_PROBES);
        if g.below(4) == 0 {
            drop(txn);
        } else {
            txn.commit().unwrap();
            model = next;
        }
        check_scans(&*batch.read().unwrap(), "t", &model, BATCH_PROBES);
        match g.below(10) {
            0 | 1 => {
                batch.flush().unwrap();
                durable = model.clone();
                sealed = None;
            }
            2 if sealed.is_none() && batch.seal() > 0 => sealed = Some(model.clone()),
            3 if sealed.is_some() => {
                batch.commit_sealed().unwrap();
                durable = sealed.take().expect("sealed");
            }
            _ => {}
        }
        assert_eq!(batch.is_sealed(), sealed.is_some());
        // The store holds exactly what was committed: sealed or open writes never
        // show through early.
        check_scans(&*mem.read().unwrap(), "t", &durable, BATCH_PROBES);
    }
}

#[test]
fn a_sealed_batch_commits_on_another_thread_while_the_next_one_fills() {
    let mem = MemStore::new();
    let batch = crate::Batch::new(std::sync::Arc::new(mem.clone()));
    put(&batch, "t", &[(b"a", b"1")]);
    assert_eq!(batch.seal(), 1);
    put(&batch, "t", &[(b"a", b"2"), (b"b", b"2")]);
    std::thread::scope(|scope| {
        let committer = scope.spawn(|| batch.commit_sealed().unwrap());
        // Whatever the committer has done so far, reads see both batches.
        assert_eq!(get(&batch, "t", b"a").as_deref(), Some(&b"2"[..]));
        assert_eq!(committer.join().expect("committer"), 1);
    });
    assert_eq!(
        get(&mem, "t", b"a").as_deref(),
        Some(&b"1"[..]),
        "only the sealed batch is durable"
    );
    assert_eq!(get(&mem, "t", b"b"), None);
    assert_eq!(get(&batch, "t", b"b").as_deref(), Some(&b"2"[..]));
    assert_eq!(batch.flush().unwrap(), 1);
    assert_eq!(get(&mem, "t", b"a").as_deref(), Some(&b"2"[..]));
}

#[test]
fn nothing_of_a_batch_is_durable_before_its_flush() {
    let mem = MemStore::new();
    let batch = crate::Batch::new(std::sync::Arc::new(mem.clone()));
    put(&batch, "t", &[(b"a", b"1"), (b"b", b"2")]);
    assert_eq!(batch.txns(), 1);
    assert_eq!(
        get(&mem, "t", b"a"),
        None,
        "the store saw an unflushed write"
    );
    assert_eq!(get(&batch, "t", b"a").as_deref(), Some(&b"1"[..]));
    assert_eq!(batch.flush().unwrap(), 1);
    mem.crash();
    assert_eq!(get(&mem, "t", b"a").as_deref(), Some(&b"1"[..]));
    put(&batch, "t", &[(b"c", b"3")]);
    batch.discard();
    assert_eq!(get(&batch, "t", b"c"), None);
    assert_eq!(batch.flush().unwrap(), 0);
}

#[test]
fn a_failed_commit_keeps_its_batch_until_the_caller_discards_it_with_the_next() {
    let mem = MemStore::new();
    let disk = std::sync::Arc::new(crate::Faulty::new(mem.clone()));
    disk.fail_next_commit();
    let batch = crate::Batch::new(disk);
    put(&batch, "t", &[(b"a", b"1")]);
    batch.seal();
    // A transaction of the open batch, under way while the commit fails, reads
    // the sealed batch and writes what follows from it.
    let mut txn = batch.write().unwrap();
    assert_eq!(txn.get("t", b"a").unwrap().as_deref(), Some(&b"1"[..]));
    std::thread::scope(|scope| {
        let failed = scope.spawn(|| batch.commit_sealed()).join().expect("joins");
        assert!(failed.is_err());
    });
    txn.put("t", b"b", b"after a").unwrap();
    txn.commit().unwrap();
    // Nothing was cleared behind that transaction's back: both batches are still
    // there, consistent with each other, and nothing reached the store.
    assert!(batch.is_sealed());
    assert_eq!(get(&batch, "t", b"a").as_deref(), Some(&b"1"[..]));
    assert_eq!(get(&mem, "t", b"a"), None);
    // The caller drops them together; nothing built on the lost batch survives.
    batch.discard();
    assert_eq!(batch.flush().unwrap(), 0);
    assert_eq!(get(&mem, "t", b"b"), None);
    assert_eq!(get(&batch, "t", b"b"), None);
}

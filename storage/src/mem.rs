//! [`MemStore`]: an in-memory [`Store`] with crash semantics, for the deterministic
//! simulator.
//!
//! It keeps two states: the *volatile* one, which a running process sees, and the
//! *durable* one, which survives power loss. [`MemStore::crash`] throws the volatile
//! state away and starts again from the durable one, exactly as a node that loses
//! power would. Everything is `BTreeMap`-based so iteration order never depends on
//! hashing, and nothing here reads a clock or a random source.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, TryLockError};

use crate::merge::merge;
use crate::{check, Entry, Order, ReadTxn, Result, Store, StoreError, WriteTxn};

type TableData = BTreeMap<Vec<u8>, Vec<u8>>;
/// All tables. Both levels are `Arc`s so that a reader's snapshot costs two reference
/// counts and a commit copies only the tables it touches, and only while an older
/// snapshot still shares them (`Arc::make_mut`).
type Tables = Arc<BTreeMap<String, Arc<TableData>>>;
/// A write transaction's pending writes: `None` is a delete.
type Overlay = BTreeMap<String, BTreeMap<Vec<u8>, Option<Vec<u8>>>>;

/// When a [`MemStore`] commit becomes durable.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SyncPolicy {
    /// A commit is durable when it returns, as with [`crate::LmdbStore`].
    #[default]
    OnCommit,
    /// A commit is visible at once but durable only after [`MemStore::sync`]: models a
    /// disk that acknowledges writes from its cache and loses them on power loss. A
    /// correct program never relies on such writes; fault injection checks that.
    Explicit,
}

/// An in-memory [`Store`] with crash semantics; clones share the same storage, as two
/// handles on one disk would.
///
/// One writer at a time: a second [`Store::write`] blocks until the first transaction
/// commits or is dropped (in a single-threaded simulator that is a deadlock, as it
/// would be with LMDB). Readers see a snapshot of the last commit as of when they began.
#[derive(Clone, Default)]
pub struct MemStore {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    state: Mutex<State>,
    /// Held by the write transaction for its whole life. It guards no data, so a
    /// poisoned lock is simply recovered.
    writer: Mutex<()>,
}

#[derive(Default)]
struct State {
    policy: SyncPolicy,
    volatile: Tables,
    /// The durable state when it differs from `volatile`, i.e. while some commits are
    /// unsynced (only under [`SyncPolicy::Explicit`]); `None` means `volatile` is
    /// durable.
    durable: Option<Tables>,
    unsynced_commits: u64,
    /// Bumped by every crash and wipe; a write transaction from an older generation
    /// cannot commit.
    generation: u64,
    commits: u64,
}

impl Inner {
    /// Every update of `State` under this lock is a handful of assignments that cannot
    /// panic halfway (short of allocation failure, which aborts), so a poisoned lock
    /// still guards a consistent state and is recovered rather than turned into an
    /// error.
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl MemStore {
    /// An empty store whose commits are durable when they return.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty store with the given sync policy.
    pub fn with_policy(policy: SyncPolicy) -> Self {
        let store = Self::default();
        store.inner.state().policy = policy;
        store
    }

    /// The current sync policy.
    pub fn policy(&self) -> SyncPolicy {
        self.inner.state().policy
    }

    /// Changes the sync policy. Switching to [`SyncPolicy::OnCommit`] syncs first, so
    /// that every commit that returned under the new policy is durable.
    pub fn set_policy(&self, policy: SyncPolicy) {
        let mut st = self.inner.state();
        if policy == SyncPolicy::OnCommit {
            sync_locked(&mut st);
        }
        st.policy = policy;
    }

    /// Makes every commit so far durable (an `fsync`).
    pub fn sync(&self) {
        sync_locked(&mut self.inner.state());
    }

    /// Power loss: the volatile state is replaced by the durable one, so commits not
    /// yet synced are lost, and a write transaction open at this moment fails to
    /// commit with [`StoreError::Crashed`]. The store is usable again at once, as
    /// after a restart.
    pub fn crash(&self) {
        let mut st = self.inner.state();
        if let Some(durable) = st.durable.take() {
            st.volatile = durable;
        }
        st.unsynced_commits = 0;
        st.generation += 1;
    }

    /// The disk is lost for good: every table is gone, durable or not, and an open
    /// write transaction fails to commit with [`StoreError::Crashed`].
    pub fn wipe(&self) {
        let mut st = self.inner.state();
        st.volatile = Tables::default();
        st.durable = None;
        st.unsynced_commits = 0;
        st.generation += 1;
    }

    /// How many commits a crash now would lose (always 0 under
    /// [`SyncPolicy::OnCommit`]).
    pub fn unsynced_commits(&self) -> u64 {
        self.inner.state().unsynced_commits
    }

    /// How many write transactions have committed since the store was created,
    /// including any a crash later lost.
    pub fn commits(&self) -> u64 {
        self.inner.state().commits
    }

    /// How many crashes and wipes the store has been through.
    pub fn generation(&self) -> u64 {
        self.inner.state().generation
    }
}

fn sync_locked(st: &mut State) {
    st.durable = None;
    st.unsynced_commits = 0;
}

impl fmt::Debug for MemStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.inner.state();
        f.debug_struct("MemStore")
            .field("policy", &st.policy)
            .field("tables", &st.volatile.len())
            .field("commits", &st.commits)
            .field("unsynced_commits", &st.unsynced_commits)
            .field("generation", &st.generation)
            .finish()
    }
}

impl MemStore {
    /// Begins the write transaction unless one is already open, in which case it
    /// returns `None` instead of blocking: a single-threaded simulator can then report
    /// a second writer instead of deadlocking on it.
    pub fn try_write(&self) -> Option<Box<dyn WriteTxn + '_>> {
        let writer = match self.inner.writer.try_lock() {
            Ok(guard) => guard,
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(TryLockError::WouldBlock) => return None,
        };
        Some(self.begin_write(writer))
    }

    fn begin_write<'a>(&'a self, writer: MutexGuard<'a, ()>) -> Box<dyn WriteTxn + 'a> {
        // The caller holds the writer lock, so the snapshot below is the state this
        // transaction will commit on top of.
        let st = self.inner.state();
        Box::new(MemWrite {
            inner: &self.inner,
            generation: st.generation,
            base: Arc::clone(&st.volatile),
            overlay: Overlay::new(),
            _writer: writer,
        })
    }
}

impl Store for MemStore {
    fn read(&self) -> Result<Box<dyn ReadTxn + '_>> {
        let tables = Arc::clone(&self.inner.state().volatile);
        Ok(Box::new(MemRead { tables }))
    }

    fn write(&self) -> Result<Box<dyn WriteTxn + '_>> {
        let writer = self
            .inner
            .writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        Ok(self.begin_write(writer))
    }
}

/// A read transaction: a snapshot of the volatile state.
struct MemRead {
    tables: Tables,
}

impl ReadTxn for MemRead {
    fn get(&self, table: &str, key: &[u8]) -> Result<Option<Vec<u8>>> {
        check::table_name(table)?;
        check::key(table, key)?;
        Ok(self.tables.get(table).and_then(|t| t.get(key)).cloned())
    }

    fn scan(
        &self,
        table: &str,
        lower: Bound<&[u8]>,
        upper: Bound<&[u8]>,
        order: Order,
        limit: usize,
    ) -> Result<Vec<Entry>> {
        scan(
            &self.tables,
            &Overlay::new(),
            table,
            lower,
            upper,
            order,
            limit,
        )
    }
}

/// The write transaction: a snapshot plus an overlay of pending writes.
struct MemWrite<'a> {
    inner: &'a Inner,
    generation: u64,
    base: Tables,
    overlay: Overlay,
    _writer: MutexGuard<'a, ()>,
}

impl MemWrite<'_> {
    fn record(&mut self, table: &str, key: &[u8], value: Option<Vec<u8>>) {
        // Look up before inserting: no `String` allocation per write to a known table.
        if let Some(writes) = self.overlay.get_mut(table) {
            writes.insert(key.to_vec(), value);
        } else {
            let writes = BTreeMap::from([(key.to_vec(), value)]);
            self.overlay.insert(table.to_owned(), writes);
        }
    }
}

impl ReadTxn for MemWrite<'_> {
    fn get(&self, table: &str, key: &[u8]) -> Result<Option<Vec<u8>>> {
        check::table_name(table)?;
        check::key(table, key)?;
        if let Some(pending) = self.overlay.get(table).and_then(|t| t.get(key)) {
            return Ok(pending.clone());
        }
        Ok(self.base.get(table).and_then(|t| t.get(key)).cloned())
    }

    fn scan(
        &self,
        table: &str,
        lower: Bound<&[u8]>,
        upper: Bound<&[u8]>,
        order: Order,
        limit: usize,
    ) -> Result<Vec<Entry>> {
        scan(&self.base, &self.overlay, table, lower, upper, order, limit)
    }
}

impl WriteTxn for MemWrite<'_> {
    fn put(&mut self, table: &str, key: &[u8], value: &[u8]) -> Result<()> {
        check::table_name(table)?;
        check::key(table, key)?;
        check::value(table, value)?;
        self.record(table, key, Some(value.to_vec()));
        Ok(())
    }

    fn delete(&mut self, table: &str, key: &[u8]) -> Result<bool> {
        let present = self.get(table, key)?.is_some();
        if present {
            let in_base = self.base.get(table).is_some_and(|t| t.contains_key(key));
            if in_base {
                self.record(table, key, None);
            } else if let Some(writes) = self.overlay.get_mut(table) {
                // Only ever written by this transaction: forgetting the put is enough.
                // So a `None` always shadows a committed key (see `commit`).
                writes.remove(key);
            }
        }
        Ok(present)
    }

    fn commit(self: Box<Self>) -> Result<()> {
        let MemWrite {
            inner,
            generation,
            base,
            overlay,
            _writer,
        } = *self;
        // Release our snapshot first, or `Arc::make_mut` below would copy every table
        // we touch just because we still hold a reference to it.
        drop(base);
        let mut st = inner.state();
        if st.generation != generation {
            return Err(StoreError::Crashed);
        }
        st.commits += 1;
        debug_assert!(st.unsynced_commits < st.commits || st.policy == SyncPolicy::Explicit);
        if overlay.is_empty() {
            return Ok(());
        }
        if st.policy == SyncPolicy::Explicit {
            if st.durable.is_none() {
                // First unsynced commit: remember what a crash falls back to.
                st.durable = Some(Arc::clone(&st.volatile));
            }
            st.unsynced_commits += 1;
        }
        let tables = Arc::make_mut(&mut st.volatile);
        for (name, writes) in overlay {
            if writes.is_empty() {
                continue;
            }
            // A `None` only ever shadows a committed key, so writes to a table that
            // does not exist yet include a put: creating it here is right.
            let table = Arc::make_mut(tables.entry(name).or_default());
            for (key, value) in writes {
                match value {
                    Some(value) => table.insert(key, value),
                    None => table.remove(&key),
                };
            }
        }
        Ok(())
    }
}

/// Scans `base` with `overlay` applied on top, without materialising the merge.
fn scan(
    base: &Tables,
    overlay: &Overlay,
    table: &str,
    lower: Bound<&[u8]>,
    upper: Bound<&[u8]>,
    order: Order,
    limit: usize,
) -> Result<Vec<Entry>> {
    check::table_name(table)?;
    let Some(range) = check::bounds(table, lower, upper)? else {
        return Ok(Vec::new());
    };
    if limit == 0 {
        return Ok(Vec::new());
    }
    static NO_DATA: TableData = BTreeMap::new();
    static NO_WRITES: BTreeMap<Vec<u8>, Option<Vec<u8>>> = BTreeMap::new();
    let base = base.get(table).map_or(&NO_DATA, |t| &**t);
    let overlay = overlay.get(table).unwrap_or(&NO_WRITES);
    let base = base
        .range::<[u8], _>(range)
        .map(|(k, v)| (k.as_slice(), v.as_slice()));
    let overlay = overlay
        .range::<[u8], _>(range)
        .map(|(k, v)| (k.as_slice(), v.as_deref()));
    let entries = match order {
        Order::Ascending => merge(base, overlay, order, limit),
        Order::Descending => merge(base.rev(), overlay.rev(), order, limit),
    };
    debug_assert!(entries.len() <= limit, "a scan returns at most its limit");
    Ok(entries)
}

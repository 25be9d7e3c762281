//! [`Batch`]: group commit. Many write transactions, each atomic on its own, reach
//! the underlying store in one commit (one fsync).
//!
//! A driver hands its actors a `Batch` instead of the store: each message's write
//! transaction commits into the batch (in memory; dropping it still discards just
//! that message's writes), every later transaction of the batch reads what earlier
//! ones wrote, and [`Batch::flush`] writes them all to the store in one
//! transaction. Until the flush returns, nothing of the batch is durable, so the
//! driver holds back everything the batch's messages owe the outside world (sends,
//! acknowledgements, replies) and releases it only after the flush.
//!
//! A flush can also be split so that the next batch fills while this one syncs:
//! [`Batch::seal`] closes the open batch (later transactions start a new one that
//! reads through it), and [`Batch::commit_sealed`], on any thread, writes it to the
//! store. One batch is sealed at a time.
//!
//! Readers of the underlying store (other threads) see only what was flushed: they
//! never observe a write that a crash could still take back.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::merge::merge;
use crate::{check, Entry, Order, ReadTxn, Result, Store, WriteTxn};

/// Pending writes of one table: `None` is a delete.
type Writes = BTreeMap<Vec<u8>, Option<Vec<u8>>>;
/// Pending writes of every table. `Arc`s at both levels so a reader's snapshot
/// costs a reference count and a commit copies only a table a reader still shares.
type Pending = Arc<BTreeMap<String, Arc<Writes>>>;
/// One transaction's own writes.
type Own = BTreeMap<String, Writes>;

/// Writes committed into a batch and not yet flushed.
#[derive(Default)]
struct State {
    /// The open batch.
    pending: Pending,
    /// Transactions committed into the open batch.
    txns: usize,
    /// Key and value bytes they wrote.
    bytes: usize,
    /// The sealed batch being written to the store, and its transaction count:
    /// under the open one for reads.
    sealed: Option<(Pending, usize)>,
}

/// A reader's view of the batch: the sealed batch (if any), then the open one.
#[derive(Clone, Default)]
struct Snapshot {
    sealed: Option<Pending>,
    pending: Pending,
}

/// A group of write transactions flushed to a store in one commit (see the module
/// docs). Its own commits are **not** durable: only [`Batch::flush`] is.
pub struct Batch {
    base: Arc<dyn Store>,
    state: Mutex<State>,
    /// Held by a batch write transaction for its whole life: one at a time.
    writer: Mutex<()>,
    /// Held while the sealed batch is written to the store: one commit at a time,
    /// whichever thread asks.
    committer: Mutex<()>,
}

impl std::fmt::Debug for Batch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.state();
        f.debug_struct("Batch")
            .field("txns", &st.txns)
            .field("bytes", &st.bytes)
            .finish_non_exhaustive()
    }
}

impl Batch {
    /// An empty batch over `base`.
    pub fn new(base: Arc<dyn Store>) -> Self {
        Self {
            base,
            state: Mutex::new(State::default()),
            writer: Mutex::new(()),
            committer: Mutex::new(()),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // The state is replaced whole under the lock; a panic cannot leave half of it.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The store the batch flushes to.
    pub fn base(&self) -> &Arc<dyn Store> {
        &self.base
    }

    /// How many transactions committed into the open batch, and how many key and
    /// value bytes they wrote (one look at the state).
    pub fn size(&self) -> (usize, usize) {
        let st = self.state();
        (st.txns, st.bytes)
    }

    /// How many transactions committed into the open batch.
    pub fn txns(&self) -> usize {
        self.state().txns
    }

    /// How many key and value bytes they wrote.
    pub fn bytes(&self) -> usize {
        self.state().bytes
    }

    /// Whether a sealed batch waits for [`Batch::commit_sealed`].
    pub fn is_sealed(&self) -> bool {
        self.state().sealed.is_some()
    }

    /// Seals the open batch and its transactions for [`Batch::commit_sealed`];
    /// transactions from now on go into a new open batch, which reads through the
    /// sealed one. Returns how many transactions it sealed (0: nothing to commit,
    /// nothing sealed).
    ///
    /// # Panics
    /// If a sealed batch is still uncommitted: a driver commits in order, one at a
    /// time.
    pub fn seal(&self) -> usize {
        let _writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        let mut st = self.state();
        assert!(st.sealed.is_none(), "one sealed batch at a time");
        if st.txns == 0 {
            return 0;
        }
        let txns = std::mem::take(&mut st.txns);
        st.bytes = 0;
        let pending = std::mem::take(&mut st.pending);
        st.sealed = Some((pending, txns));
        txns
    }

    /// Writes the sealed batch to the store in one transaction and commits it (one
    /// fsync); safe to call on another thread while the open batch fills. Returns
    /// how many transactions it made durable (0 when nothing was sealed).
    ///
    /// On error nothing of it reached the store and it stays sealed (reads still
    /// see it): the caller then drops it together with the open batch built on it,
    /// and what they owed, with [`Batch::discard`] on the thread that runs the
    /// transactions — never from here, where a transaction of the open batch may
    /// be under way.
    pub fn commit_sealed(&self) -> Result<usize> {
        let _committer = self
            .committer
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let Some((writes, txns)) = self.state().sealed.clone() else {
            return Ok(0);
        };
        self.write_through(&writes)?;
        self.state().sealed = None;
        Ok(txns)
    }

    /// Commits what is sealed, then seals the open batch and commits it too (see
    /// [`Batch::commit_sealed`]): everything to the store, now. Returns how many
    /// transactions it made durable.
    pub fn flush(&self) -> Result<usize> {
        let earlier = self.commit_sealed()?;
        self.seal();
        Ok(earlier + self.commit_sealed()?)
    }

    fn write_through(&self, writes: &Pending) -> Result<()> {
        let mut txn = self.base.write()?;
        for (table, writes) in writes.iter() {
            for (key, value) in writes.iter() {
                match value {
                    Some(value) => txn.put(table, key, value)?,
                    None => {
                        txn.delete(table, key)?;
                    }
                }
            }
        }
        txn.commit()
    }

    /// Forgets every write not committed, sealed or open: after a simulated crash
    /// (the process is gone), or after a failed commit, from the thread that runs
    /// the batch's transactions (none is open then).
    pub fn discard(&self) {
        *self.state() = State::default();
    }

    fn snapshot(&self) -> Snapshot {
        let st = self.state();
        Snapshot {
            sealed: st.sealed.as_ref().map(|(writes, _)| Arc::clone(writes)),
            pending: Arc::clone(&st.pending),
        }
    }
}

impl Store for Batch {
    fn read(&self) -> Result<Box<dyn ReadTxn + '_>> {
        Ok(Box::new(BatchRead::open(self)?))
    }

    /// The store's (what is committed; a batch is small next to the reserve).
    fn usage(&self) -> Result<Option<crate::Usage>> {
        self.base.usage()
    }

    fn write(&self) -> Result<Box<dyn WriteTxn + '_>> {
        let writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(Box::new(BatchWrite {
            batch: self,
            read: BatchRead::open(self)?,
            own: Own::new(),
            _writer: writer,
        }))
    }
}

/// The store's state with the batch's pending writes (sealed, then open) on top.
struct BatchRead<'a> {
    base: Box<dyn ReadTxn + 'a>,
    layers: Snapshot,
}

static NO_WRITES: Writes = BTreeMap::new();

/// How many keys of `writes` lie within the bounds (each can hide one entry below).
fn within(writes: &Writes, (lower, upper): (Bound<&[u8]>, Bound<&[u8]>)) -> usize {
    writes.range::<[u8], _>((lower, upper)).count()
}

/// `key` as read through `layers` (the topmost last) over `base`.
fn layered_get(
    base: &dyn ReadTxn,
    layers: &[&Writes],
    table: &str,
    key: &[u8],
) -> Result<Option<Vec<u8>>> {
    check::table_name(table)?;
    check::key(table, key)?;
    match layers.iter().rev().find_map(|w| w.get(key)) {
        Some(value) => Ok(value.clone()),
        None => base.get(table, key),
    }
}

/// A scan of `base` with `layers` (the topmost last) applied on top. Each layer
/// can hide one entry below it per key it holds in range, so `base` is asked for
/// that many more.
fn layered_scan(
    base: &dyn ReadTxn,
    layers: &[&Writes],
    table: &str,
    (lower, upper): (Bound<&[u8]>, Bound<&[u8]>),
    order: Order,
    limit: usize,
) -> Result<Vec<Entry>> {
    check::table_name(table)?;
    let Some(bounds) = check::bounds(table, lower, upper)? else {
        return Ok(Vec::new());
    };
    let mut hidden: usize = layers.iter().map(|w| within(w, bounds)).sum();
    let mut entries = base.scan(
        table,
        bounds.0,
        bounds.1,
        order,
        limit.saturating_add(hidden),
    )?;
    for writes in layers {
        hidden -= within(writes, bounds);
        let below = entries.iter().map(|(k, v)| (k.as_slice(), v.as_slice()));
        let above = writes
            .range::<[u8], _>(bounds)
            .map(|(k, v)| (k.as_slice(), v.as_deref()));
        let keep = limit.saturating_add(hidden);
        entries = match order {
            Order::Ascending => merge(below, above, order, keep),
            Order::Descending => merge(below, above.rev(), order, keep),
        };
    }
    debug_assert!(entries.len() <= limit, "a scan returns at most its limit");
    Ok(entries)
}

/// `table`'s writes in `pending`.
fn writes_of<'p>(pending: &'p Pending, table: &str) -> &'p Writes {
    pending.get(table).map_or(&NO_WRITES, |w| &**w)
}

impl<'a> BatchRead<'a> {
    fn open(batch: &'a Batch) -> Result<Self> {
        // The layers first, then the store: a sealed batch committed in between
        // is then both in the store and in its layer, with the same writes. The
        // other order could miss it in both.
        let layers = batch.snapshot();
        Ok(BatchRead {
            base: batch.base.read()?,
            layers,
        })
    }

    /// The sealed batch's writes to `table`, then the open batch's.
    fn pending(&self, table: &str) -> [&Writes; 2] {
        let sealed = self
            .layers
            .sealed
            .as_ref()
            .map_or(&NO_WRITES, |p| writes_of(p, table));
        [sealed, writes_of(&self.layers.pending, table)]
    }
}

impl ReadTxn for BatchRead<'_> {
    fn get(&self, table: &str, key: &[u8]) -> Result<Option<Vec<u8>>> {
        layered_get(&*self.base, &self.pending(table), table, key)
    }

    fn scan(
        &self,
        table: &str,
        lower: Bound<&[u8]>,
        upper: Bound<&[u8]>,
        order: Order,
        limit: usize,
    ) -> Result<Vec<Entry>> {
        let layers = self.pending(table);
        layered_scan(&*self.base, &layers, table, (lower, upper), order, limit)
    }
}

/// A transaction of the batch: its own writes over the batch's.
struct BatchWrite<'a> {
    batch: &'a Batch,
    read: BatchRead<'a>,
    own: Own,
    _writer: MutexGuard<'a, ()>,
}

impl BatchWrite<'_> {
    fn layers(&self, table: &str) -> [&Writes; 3] {
        let [sealed, open] = self.read.pending(table);
        [sealed, open, self.own.get(table).unwrap_or(&NO_WRITES)]
    }
}

impl ReadTxn for BatchWrite<'_> {
    fn get(&self, table: &str, key: &[u8]) -> Result<Option<Vec<u8>>> {
        layered_get(&*self.read.base, &self.layers(table), table, key)
    }

    fn scan(
        &self,
        table: &str,
        lower: Bound<&[u8]>,
        upper: Bound<&[u8]>,
        order: Order,
        limit: usize,
    ) -> Result<Vec<Entry>> {
        let layers = self.layers(table);
        layered_scan(
            &*self.read.base,
            &layers,
            table,
            (lower, upper),
            order,
            limit,
        )
    }
}

impl WriteTxn for BatchWrite<'_> {
    fn put(&mut self, table: &str, key: &[u8], value: &[u8]) -> Result<()> {
        check::table_name(table)?;
        check::key(table, key)?;
        check::value(table, value)?;
        let writes = self.own.entry(table.to_owned()).or_default();
        writes.insert(key.to_vec(), Some(value.to_vec()));
        Ok(())
    }

    fn delete(&mut self, table: &str, key: &[u8]) -> Result<bool> {
        let present = self.get(table, key)?.is_some();
        if present {
            let writes = self.own.entry(table.to_owned()).or_default();
            writes.insert(key.to_vec(), None);
        }
        Ok(present)
    }

    fn commit(self: Box<Self>) -> Result<()> {
        let BatchWrite {
            batch, read, own, ..
        } = *self;
        // Release the snapshot first, or `make_mut` below would copy the tables.
        drop(read);
        let mut st = batch.state();
        let mut bytes = 0;
        let pending = Arc::make_mut(&mut st.pending);
        for (table, writes) in own {
            let into = Arc::make_mut(pending.entry(table).or_default());
            for (key, value) in writes {
                bytes += key.len() + value.as_ref().map_or(0, Vec::len);
                into.insert(key, value);
            }
        }
        st.txns += 1;
        st.bytes += bytes;
        Ok(())
    }
}

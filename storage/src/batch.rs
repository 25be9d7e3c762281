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
    pending: Pending,
    /// Transactions committed into the batch since the last flush.
    txns: usize,
    /// Key and value bytes they wrote.
    bytes: usize,
}

/// A group of write transactions flushed to a store in one commit (see the module
/// docs). Its own commits are **not** durable: only [`Batch::flush`] is.
pub struct Batch {
    base: Arc<dyn Store>,
    state: Mutex<State>,
    /// Held by a batch write transaction for its whole life: one at a time.
    writer: Mutex<()>,
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

    /// How many transactions committed into the batch since the last flush.
    pub fn txns(&self) -> usize {
        self.state().txns
    }

    /// How many key and value bytes they wrote.
    pub fn bytes(&self) -> usize {
        self.state().bytes
    }

    /// Writes every pending write to the store in one transaction and commits it.
    /// Returns how many batch transactions it made durable. On error nothing of the
    /// batch reached the store, and the batch is emptied all the same: its writes
    /// are lost as a crash would lose them (the caller drops what they owed).
    pub fn flush(&self) -> Result<usize> {
        let _writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        let taken = std::mem::take(&mut *self.state());
        if taken.txns == 0 {
            return Ok(0);
        }
        let mut txn = self.base.write()?;
        for (table, writes) in taken.pending.iter() {
            for (key, value) in writes.iter() {
                match value {
                    Some(value) => txn.put(table, key, value)?,
                    None => {
                        txn.delete(table, key)?;
                    }
                }
            }
        }
        txn.commit()?;
        Ok(taken.txns)
    }

    /// Forgets every pending write (for a simulated crash: the process is gone).
    pub fn discard(&self) {
        *self.state() = State::default();
    }

    fn snapshot(&self) -> Pending {
        Arc::clone(&self.state().pending)
    }
}

impl Store for Batch {
    fn read(&self) -> Result<Box<dyn ReadTxn + '_>> {
        Ok(Box::new(BatchRead {
            base: self.base.read()?,
            pending: self.snapshot(),
        }))
    }

    fn write(&self) -> Result<Box<dyn WriteTxn + '_>> {
        let writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(Box::new(BatchWrite {
            batch: self,
            read: BatchRead {
                base: self.base.read()?,
                pending: self.snapshot(),
            },
            own: Own::new(),
            _writer: writer,
        }))
    }
}

/// The store's state with the batch's pending writes on top.
struct BatchRead<'a> {
    base: Box<dyn ReadTxn + 'a>,
    pending: Pending,
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

impl BatchRead<'_> {
    fn pending(&self, table: &str) -> &Writes {
        self.pending.get(table).map_or(&NO_WRITES, |w| &**w)
    }
}

impl ReadTxn for BatchRead<'_> {
    fn get(&self, table: &str, key: &[u8]) -> Result<Option<Vec<u8>>> {
        layered_get(&*self.base, &[self.pending(table)], table, key)
    }

    fn scan(
        &self,
        table: &str,
        lower: Bound<&[u8]>,
        upper: Bound<&[u8]>,
        order: Order,
        limit: usize,
    ) -> Result<Vec<Entry>> {
        let layers = [self.pending(table)];
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
    fn layers(&self, table: &str) -> [&Writes; 2] {
        [
            self.read.pending(table),
            self.own.get(table).unwrap_or(&NO_WRITES),
        ]
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

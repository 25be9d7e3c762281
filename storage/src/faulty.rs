//! [`Faulty`]: a store that fails or slows down when told to, for the tests of
//! what is built on stores (the group commit, the drivers, the actors' handling of
//! storage failures). Nothing in a node uses it.

use std::ops::Bound;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::{Entry, Order, ReadTxn, Result, Store, StoreError, WriteTxn};

/// `inner` with faults on request: the next read or write transaction refused,
/// the next commit failed, every commit slowed down.
pub struct Faulty<S> {
    inner: S,
    fail_next_read: AtomicBool,
    fail_next_write: AtomicBool,
    fail_next_commit: AtomicBool,
    commit_delay: Duration,
}

impl<S: Store> Faulty<S> {
    /// `inner`, without faults until asked.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            fail_next_read: AtomicBool::new(false),
            fail_next_write: AtomicBool::new(false),
            fail_next_commit: AtomicBool::new(false),
            commit_delay: Duration::ZERO,
        }
    }

    /// Every commit takes `delay` longer (a slow disk).
    pub fn with_commit_delay(mut self, delay: Duration) -> Self {
        self.commit_delay = delay;
        self
    }

    /// The next [`Store::read`] fails.
    pub fn fail_next_read(&self) {
        self.fail_next_read.store(true, Ordering::SeqCst);
    }

    /// The next [`Store::write`] fails.
    pub fn fail_next_write(&self) {
        self.fail_next_write.store(true, Ordering::SeqCst);
    }

    /// The commit of the next write transaction fails (nothing of it is written).
    pub fn fail_next_commit(&self) {
        self.fail_next_commit.store(true, Ordering::SeqCst);
    }
}

fn injected(op: &'static str) -> StoreError {
    StoreError::Io {
        op,
        source: std::io::Error::other("injected fault"),
    }
}

impl<S: Store> Store for Faulty<S> {
    fn usage(&self) -> Result<Option<crate::Usage>> {
        self.inner.usage()
    }

    fn read(&self) -> Result<Box<dyn ReadTxn + '_>> {
        if self.fail_next_read.swap(false, Ordering::SeqCst) {
            return Err(injected("begin a read"));
        }
        self.inner.read()
    }

    fn write(&self) -> Result<Box<dyn WriteTxn + '_>> {
        if self.fail_next_write.swap(false, Ordering::SeqCst) {
            return Err(injected("begin a write"));
        }
        Ok(Box::new(FaultyTxn {
            inner: self.inner.write()?,
            fail: self.fail_next_commit.swap(false, Ordering::SeqCst),
            delay: self.commit_delay,
        }))
    }
}

struct FaultyTxn<'a> {
    inner: Box<dyn WriteTxn + 'a>,
    fail: bool,
    delay: Duration,
}

impl ReadTxn for FaultyTxn<'_> {
    fn get(&self, table: &str, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.inner.get(table, key)
    }

    fn scan(
        &self,
        table: &str,
        lower: Bound<&[u8]>,
        upper: Bound<&[u8]>,
        order: Order,
        limit: usize,
    ) -> Result<Vec<Entry>> {
        self.inner.scan(table, lower, upper, order, limit)
    }
}

impl WriteTxn for FaultyTxn<'_> {
    fn put(&mut self, table: &str, key: &[u8], value: &[u8]) -> Result<()> {
        self.inner.put(table, key, value)
    }

    fn delete(&mut self, table: &str, key: &[u8]) -> Result<bool> {
        self.inner.delete(table, key)
    }

    fn commit(self: Box<Self>) -> Result<()> {
        std::thread::sleep(self.delay);
        if self.fail {
            return Err(injected("commit"));
        }
        self.inner.commit()
    }
}

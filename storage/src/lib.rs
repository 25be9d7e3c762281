//! Storage for conclave.
//!
//! A [`Store`] is a set of named tables of ordered byte keys and byte values with
//! atomic, durable write transactions. Two implementations pass one shared suite:
//! [`LmdbStore`] (heed/LMDB, fsync before a commit returns) for production, and
//! [`MemStore`] for the simulator, whose [`MemStore::crash`] discards every write that
//! was not yet committed and synced, exactly as a power loss would. A [`Batch`] over
//! either gives group commit: many transactions, one commit of the store.
//!
//! On top of the byte-level trait, [`Table`] gives typed access: keys encode in an
//! order-preserving form ([`Key`]), values with postcard ([`serde`]).
//!
//! Both stores check arguments identically: table names are 1 to
//! [`TABLE_NAME_BYTES_MAX`] bytes of `[A-Za-z0-9_.:/-]`, keys 1 to [`KEY_BYTES_MAX`]
//! bytes (scan bounds at most that long), values at most [`VALUE_BYTES_MAX`] bytes.
//! A trait-object read transaction is not `Send`; [`LmdbStore::read_txn`] returns the
//! concrete [`LmdbReadTxn`], which is, for code that must hold one across threads or
//! `.await`s.
#![warn(missing_docs)]

mod batch;
mod check;
mod error;
mod faulty;
mod lmdb;
mod mem;
mod merge;
#[cfg(test)]
mod suite;
mod table;

pub use batch::Batch;
pub use error::StoreError;
pub use faulty::Faulty;
pub use lmdb::{LmdbOptions, LmdbReadTxn, LmdbStore};
pub use mem::{MemStore, SyncPolicy};
pub use table::{FixedKey, Key, Table};

use std::ops::Bound;

/// Result of a storage operation.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// The longest table name a store accepts.
pub const TABLE_NAME_BYTES_MAX: usize = 64;
/// The longest key a store accepts (LMDB's default limit is 511 bytes).
pub const KEY_BYTES_MAX: usize = 511;
/// The largest value a store accepts.
pub const VALUE_BYTES_MAX: usize = 16 * 1024 * 1024;

/// Scan direction for [`ReadTxn::scan`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Order {
    /// Smallest key first.
    Ascending,
    /// Largest key first.
    Descending,
}

/// One key/value pair returned by a scan.
pub type Entry = (Vec<u8>, Vec<u8>);

/// A consistent read-only view of the store.
///
/// A table that was never written reads as empty.
pub trait ReadTxn {
    /// The value stored under `key` in `table`, if any.
    fn get(&self, table: &str, key: &[u8]) -> Result<Option<Vec<u8>>>;
    /// At most `limit` entries of `table` whose keys lie within `(lower, upper)`, in
    /// `order`. The limit is mandatory: every read is bounded.
    fn scan(
        &self,
        table: &str,
        lower: Bound<&[u8]>,
        upper: Bound<&[u8]>,
        order: Order,
        limit: usize,
    ) -> Result<Vec<Entry>>;
}

/// A write transaction: sees its own writes; nothing is visible to others, or
/// durable, until [`WriteTxn::commit`] returns `Ok`. Dropping it aborts it.
pub trait WriteTxn: ReadTxn {
    /// Stores `value` under `key` in `table`, replacing any previous value.
    fn put(&mut self, table: &str, key: &[u8], value: &[u8]) -> Result<()>;
    /// Removes `key` from `table`; returns whether it was present.
    fn delete(&mut self, table: &str, key: &[u8]) -> Result<bool>;
    /// Commits atomically. When this returns `Ok` under a durable store the data
    /// survives a crash or power loss.
    fn commit(self: Box<Self>) -> Result<()>;
}

/// Synchronous, transactional storage shared by the actors of one node.
///
/// One writer at a time (a second `write` blocks until the first ends); any number
/// of readers, which see the last committed state as of when they began.
pub trait Store: Send + Sync + 'static {
    /// Begins a read-only transaction.
    fn read(&self) -> Result<Box<dyn ReadTxn + '_>>;
    /// Begins the write transaction.
    fn write(&self) -> Result<Box<dyn WriteTxn + '_>>;
    /// How much of its bound the store's committed data takes, if it has a bound
    /// (`None`: it has none, as the in-memory store).
    fn usage(&self) -> Result<Option<Usage>> {
        Ok(None)
    }
}

/// The most a bounded store keeps in reserve (see [`Usage::full`]): 1 GiB.
pub const RESERVE_BYTES_MAX: u64 = 1 << 30;

/// How much of its bound a store's committed data takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Usage {
    /// Bytes the data takes (pages in use).
    pub used_bytes: u64,
    /// The store's bound.
    pub max_bytes: u64,
}

impl Usage {
    /// What is kept for work that finishes what was accepted or frees space
    /// (acknowledgements, deletes, resends): an eighth of the bound, at most
    /// [`RESERVE_BYTES_MAX`].
    pub fn reserve_bytes(&self) -> u64 {
        (self.max_bytes / 8).min(RESERVE_BYTES_MAX)
    }

    /// Whether the data reaches into the reserve: new work must be refused, so that
    /// what frees space can still be written.
    pub fn full(&self) -> bool {
        self.used_bytes.saturating_add(self.reserve_bytes()) >= self.max_bytes
    }
}

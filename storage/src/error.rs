//! The one error type of the crate.

use std::path::PathBuf;

/// Why a storage operation failed.
///
/// Every message says what failed and, where the caller can do something about it,
/// what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The operating system refused a file operation.
    #[error(
        "storage I/O failed during {op}: {source}; check that the storage directory exists, \
         is writable and that the disk is not full"
    )]
    Io {
        /// What the store was doing.
        op: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// LMDB reported an error not covered by a more specific variant.
    #[error("LMDB failed during {op}: {reason}")]
    Lmdb {
        /// What the store was doing.
        op: &'static str,
        /// LMDB's description of the error.
        reason: String,
    },
    /// The LMDB memory map is full: the database has grown to its configured maximum.
    #[error(
        "the LMDB map is full ({map_size_bytes} bytes): the write transaction was not \
         committed; raise LmdbOptions::map_size_bytes and reopen the store"
    )]
    MapFull {
        /// The configured map size.
        map_size_bytes: usize,
    },
    /// More tables were created than the store was opened for.
    #[error(
        "too many tables: the store was opened for at most {max}; raise \
         LmdbOptions::max_tables and reopen the store"
    )]
    TooManyTables {
        /// The configured maximum.
        max: u32,
    },
    /// The directory is already open as a store in this process.
    #[error(
        "the store at {} is already open in this process; share the open LmdbStore \
         (it is Send + Sync) instead of opening it twice",
        path.display()
    )]
    AlreadyOpen {
        /// The directory.
        path: PathBuf,
    },
    /// Stored bytes could not be decoded: the data on disk is not what the code expects.
    #[error(
        "table `{table}` holds data that does not decode: {reason}; the store is corrupt or \
         was written by an incompatible version"
    )]
    Corrupt {
        /// The table holding the bad bytes.
        table: String,
        /// What did not decode, and why.
        reason: String,
    },
    /// A value could not be encoded before being written; nothing was written.
    #[error("could not encode a value for table `{table}`: {reason}")]
    Encode {
        /// The table the value was meant for.
        table: String,
        /// Why encoding failed.
        reason: String,
    },
    /// A key (or scan bound) is longer than [`crate::KEY_BYTES_MAX`].
    #[error("key of {len} bytes for table `{table}` is longer than the {max}-byte limit")]
    KeyTooLarge {
        /// The table.
        table: String,
        /// The key's length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A key is empty; like LMDB, no store accepts empty keys.
    #[error("empty key for table `{table}`: keys must be at least one byte long")]
    EmptyKey {
        /// The table.
        table: String,
    },
    /// A value is larger than [`crate::VALUE_BYTES_MAX`].
    #[error(
        "value of {len} bytes for table `{table}` is larger than the {max}-byte limit; \
         split it across several keys"
    )]
    ValueTooLarge {
        /// The table.
        table: String,
        /// The value's length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A table name is empty, too long or uses a character outside `[A-Za-z0-9_.:/-]`.
    #[error("bad table name {name:?}: {reason}")]
    BadTableName {
        /// The rejected name.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// [`crate::MemStore`] only: the store crashed (or was wiped) after this transaction
    /// began, so it cannot commit. Nothing it wrote was kept.
    #[error(
        "the store crashed after this transaction began; nothing it wrote was kept: \
         restart the node and retry from durable state"
    )]
    Crashed,
}

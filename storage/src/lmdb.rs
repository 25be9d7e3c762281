//! [`LmdbStore`]: the production [`Store`], on LMDB through heed.
//!
//! Each table is a named LMDB database. Durability comes from LMDB's default flags:
//! `mdb_txn_commit` writes the data pages, `fdatasync`s them, then writes and syncs
//! the meta page before it returns, so a commit that returned `Ok` survives power
//! loss. None of `NO_SYNC`, `NO_META_SYNC`, `MAP_ASYNC` or `WRITE_MAP` is ever set.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use heed::types::Bytes;
use heed::{CommitOrAbort, Database, Env, EnvOpenOptions, MdbError, RoTxn, RwTxn, WithoutTls};

use crate::{check, Entry, Order, ReadTxn, Result, Store, StoreError, WriteTxn};

/// A table's handle. heed hands out `'static` handles only once the transaction that
/// opened the table has committed, which is exactly when they are safe to share.
type Db = Database<'static, Bytes, Bytes>;
/// Handles of every committed table, by name. Replaced as a whole (copy on write) when
/// a commit creates tables, so a transaction can keep the map it began with.
type Handles = Arc<BTreeMap<String, Db>>;

/// Sizes an [`LmdbStore`] is opened with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LmdbOptions {
    /// The largest the database may grow to. The file is sparse, so a large value costs
    /// only address space. Rounded up to a multiple of 64 KiB (LMDB wants a multiple of
    /// the OS page size). Exceeding it fails commits with [`StoreError::MapFull`].
    pub map_size_bytes: usize,
    /// How many tables the store may hold; creating one more fails with
    /// [`StoreError::TooManyTables`].
    pub max_tables: u32,
    /// How many read transactions may be open at once, across all threads.
    pub max_readers: u32,
}

impl Default for LmdbOptions {
    fn default() -> Self {
        LmdbOptions {
            // 64 GiB where the address space allows it.
            map_size_bytes: usize::try_from(64u64 << 30).unwrap_or(1 << 30),
            max_tables: 128,
            max_readers: 512,
        }
    }
}

/// The production store: LMDB via heed, one directory per store.
///
/// A commit is durable when it returns. Read transactions do not use thread-local
/// storage, so [`LmdbReadTxn`] is `Send` and may be moved across threads (and `.await`s).
pub struct LmdbStore {
    env: Env<WithoutTls>,
    /// Guards publication of new tables; see [`LmdbStore::read_txn`] and
    /// [`LmdbWriteTxn`]'s `commit`. Swapping an `Arc` cannot leave the map half
    /// updated, so a poisoned lock is recovered rather than reported.
    handles: Mutex<Handles>,
    map_size_bytes: usize,
    max_tables: u32,
    path: PathBuf,
    /// The last [`Store::usage`] and when it was measured.
    usage: Mutex<Option<(std::time::Instant, crate::Usage)>>,
}

const MAP_SIZE_GRANULE: usize = 64 * 1024;

/// How long a measured usage is answered again before it is measured anew (it is
/// asked before every frame), while the data is more than [`USAGE_MARGIN_BYTES`]
/// away from the reserve: 100 ms of writes take far less.
const USAGE_FRESH_MS: u64 = 100;
/// Within this of the reserve, usage is measured every time it is asked.
const USAGE_MARGIN_BYTES: u64 = 64 << 20;

/// fsyncs a directory, so that entries created in it survive power loss.
fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| StoreError::Io {
            op: "sync the store directory",
            source,
        })
}

impl LmdbStore {
    /// Opens the store in `dir`, creating the directory and the database if needed.
    ///
    /// A directory can be open only once per process at a time (LMDB forbids two
    /// environments on one file in one process); a second open fails with
    /// [`StoreError::AlreadyOpen`] until the first store is dropped. The directory must
    /// be on a local file system and must not be modified by anything but LMDB.
    pub fn open(dir: &Path, opts: LmdbOptions) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
            op: "create the store directory",
            source,
        })?;
        let map_size_bytes = opts
            .map_size_bytes
            .max(MAP_SIZE_GRANULE)
            .div_ceil(MAP_SIZE_GRANULE)
            .saturating_mul(MAP_SIZE_GRANULE);
        let mut options = EnvOpenOptions::new().read_txn_without_tls();
        options
            .map_size(map_size_bytes)
            .max_dbs(opts.max_tables)
            .max_readers(opts.max_readers);
        // SAFETY: heed's `open` is unsafe because the memory map is undefined behaviour
        // if the file is modified behind LMDB's back. We uphold what is ours to uphold:
        // - no unsafe flags (`NO_LOCK`, `NO_SYNC`, ...) are set, so LMDB's lock file
        //   coordinates every process that opens the directory;
        // - within this process heed refuses a second environment on the same path
        //   (`EnvAlreadyOpened`, mapped to `AlreadyOpen` below), so there is exactly one
        //   Env, hence one map and one lock table, per file per process;
        // - the directory belongs to this store: nothing else writes, truncates or
        //   replaces its files (documented on `open`).
        let env = unsafe { options.open(dir) }.map_err(|e| match e {
            heed::Error::EnvAlreadyOpened => StoreError::AlreadyOpen {
                path: dir.to_path_buf(),
            },
            e => map_err("open the LMDB environment", map_size_bytes, opts.max_tables)(e),
        })?;
        // LMDB fsyncs its data file on commit, but not the directory: make the
        // directory entries of a freshly created store (and the store directory
        // itself) durable, or the first commits could vanish with the file on power
        // loss.
        sync_dir(dir)?;
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent)?;
        }
        let mut store = LmdbStore {
            env,
            handles: Mutex::new(Handles::default()),
            map_size_bytes,
            max_tables: opts.max_tables,
            path: dir.to_path_buf(),
            usage: Mutex::new(None),
        };
        let existing = store.open_existing_tables()?;
        *store
            .handles
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(existing);
        Ok(store)
    }

    /// The directory the store lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Begins a read transaction, as [`Store::read`] does, but returns the concrete
    /// type, which is `Send`: it can be moved to another thread or held across an
    /// `.await`.
    pub fn read_txn(&self) -> Result<LmdbReadTxn<'_>> {
        // The snapshot and the handle map are taken under the lock a committing writer
        // holds while it publishes tables it created, so a reader that sees a new
        // table's data also has its handle, and one that lacks the handle also lacks
        // the data (it reads the table as empty, which it was at that snapshot).
        let handles = self.lock_handles();
        let txn = self
            .env
            .read_txn()
            .map_err(self.err("begin a read transaction"))?;
        Ok(LmdbReadTxn {
            txn,
            handles: Arc::clone(&handles),
            store: self,
        })
    }

    /// Opens the handle of every table already in the file, so that each table that
    /// exists has a handle before any transaction runs. Names of named databases are
    /// the keys of LMDB's unnamed database.
    fn open_existing_tables(&self) -> Result<BTreeMap<String, Db>> {
        let op = "open the existing tables";
        let err = self.err(op);
        let rtxn = self.env.read_txn().map_err(&err)?;
        let main = self
            .env
            .open_databases_and_commit(rtxn, |opener, rtxn| {
                opener
                    .open_database::<Bytes, Bytes>(rtxn, None)
                    .map(CommitOrAbort::<_, ()>::Commit)
            })
            .map_err(&err)?
            .commit()
            .flatten();
        let Some(main) = main else {
            return Ok(BTreeMap::new());
        };
        let mut names = Vec::new();
        {
            let rtxn = self.env.read_txn().map_err(&err)?;
            for item in main.iter(&rtxn).map_err(&err)? {
                let (name, _) = item.map_err(&err)?;
                // Skip anything that is not one of our names: we never create such a
                // database, and opening a plain key as a database would fail.
                if let Ok(name) = std::str::from_utf8(name) {
                    if check::table_name(name).is_ok() {
                        names.push(name.to_owned());
                    }
                }
            }
        }
        let mut handles = BTreeMap::new();
        for name in names {
            let rtxn = self.env.read_txn().map_err(&err)?;
            let db = self
                .env
                .open_databases_and_commit(rtxn, |opener, rtxn| {
                    opener
                        .open_database::<Bytes, Bytes>(rtxn, Some(&name))
                        .map(CommitOrAbort::<_, ()>::Commit)
                })
                .map_err(&err)?
                .commit()
                .flatten();
            if let Some(db) = db {
                handles.insert(name, db);
            }
        }
        Ok(handles)
    }

    /// The pages of every table and of LMDB's catalog, now.
    fn measure_usage(&self) -> Result<crate::Usage> {
        let read = self.read_txn()?;
        let catalog = self.env.unnamed_database_stat();
        let page_bytes = u64::from(catalog.page_size);
        let mut pages = pages_of(&catalog);
        for db in read.handles.values() {
            let stat = db
                .stat(&read.txn)
                .map_err(self.err("read a table's size"))?;
            pages = pages.saturating_add(pages_of(&stat));
        }
        Ok(crate::Usage {
            used_bytes: pages.saturating_mul(page_bytes),
            max_bytes: self.map_size_bytes as u64,
        })
    }

    fn lock_handles(&self) -> MutexGuard<'_, Handles> {
        self.handles.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn err(&self, op: &'static str) -> impl Fn(heed::Error) -> StoreError {
        map_err(op, self.map_size_bytes, self.max_tables)
    }
}

fn map_err(
    op: &'static str,
    map_size_bytes: usize,
    max_tables: u32,
) -> impl Fn(heed::Error) -> StoreError {
    move |e| match e {
        heed::Error::Mdb(MdbError::MapFull) => StoreError::MapFull { map_size_bytes },
        heed::Error::Mdb(MdbError::DbsFull) => StoreError::TooManyTables { max: max_tables },
        heed::Error::Mdb(MdbError::ReadersFull) => StoreError::Lmdb {
            op,
            reason: "too many read transactions are open: end long-lived ones or raise \
                     LmdbOptions::max_readers"
                .to_owned(),
        },
        heed::Error::Io(source) => StoreError::Io { op, source },
        e => StoreError::Lmdb {
            op,
            reason: e.to_string(),
        },
    }
}

impl fmt::Debug for LmdbStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LmdbStore")
            .field("path", &self.path)
            .field("map_size_bytes", &self.map_size_bytes)
            .field("max_tables", &self.max_tables)
            .finish_non_exhaustive()
    }
}

impl Store for LmdbStore {
    fn read(&self) -> Result<Box<dyn ReadTxn + '_>> {
        Ok(Box::new(self.read_txn()?))
    }

    /// The pages of every table and of LMDB's catalog, as of at most
    /// [`USAGE_FRESH_MS`] ago while far from full, else now (pages freed but not
    /// yet reused are not counted: LMDB reuses them first).
    fn usage(&self) -> Result<Option<crate::Usage>> {
        let fresh = std::time::Duration::from_millis(USAGE_FRESH_MS);
        let mut cached = self.usage.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((at, usage)) = *cached {
            let room = usage.max_bytes.saturating_sub(usage.reserve_bytes());
            let far = usage.used_bytes.saturating_add(USAGE_MARGIN_BYTES) < room;
            if far && at.elapsed() < fresh {
                return Ok(Some(usage));
            }
        }
        let usage = self.measure_usage()?;
        *cached = Some((std::time::Instant::now(), usage));
        Ok(Some(usage))
    }

    fn write(&self) -> Result<Box<dyn WriteTxn + '_>> {
        // Blocks on LMDB's writer lock while another write transaction is open.
        let txn = self
            .env
            .write_txn()
            .map_err(self.err("begin a write transaction"))?;
        // No lock needed to be consistent: only the writer adds tables, and we are it.
        let handles = Arc::clone(&self.lock_handles());
        Ok(Box::new(LmdbWriteTxn {
            store: self,
            txn,
            handles,
            created: BTreeMap::new(),
        }))
    }
}

/// The pages a table's B-tree takes.
fn pages_of(stat: &heed::DatabaseStat) -> u64 {
    [stat.branch_pages, stat.leaf_pages, stat.overflow_pages]
        .iter()
        .fold(0u64, |sum, &n| sum.saturating_add(n as u64))
}

/// A read transaction on an [`LmdbStore`]: a consistent snapshot, `Send`.
///
/// Keep it short: an open read transaction stops LMDB from reusing pages freed after
/// its snapshot, so the file grows while it lives.
pub struct LmdbReadTxn<'a> {
    txn: RoTxn<'a, WithoutTls>,
    handles: Handles,
    store: &'a LmdbStore,
}

impl fmt::Debug for LmdbReadTxn<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LmdbReadTxn")
            .field("snapshot", &self.txn.id())
            .finish_non_exhaustive()
    }
}

impl ReadTxn for LmdbReadTxn<'_> {
    fn get(&self, table: &str, key: &[u8]) -> Result<Option<Vec<u8>>> {
        get(self.store, &self.txn, self.handles.get(table), table, key)
    }

    fn scan(
        &self,
        table: &str,
        lower: Bound<&[u8]>,
        upper: Bound<&[u8]>,
        order: Order,
        limit: usize,
    ) -> Result<Vec<Entry>> {
        let db = self.handles.get(table);
        scan(self.store, &self.txn, db, table, lower, upper, order, limit)
    }
}

/// The write transaction of an [`LmdbStore`].
struct LmdbWriteTxn<'a> {
    store: &'a LmdbStore,
    txn: RwTxn<'a>,
    handles: Handles,
    /// Tables this transaction created. Their handles are valid inside it only: LMDB
    /// closes them if it aborts, so they are published only after a commit.
    created: BTreeMap<String, Db>,
}

impl LmdbWriteTxn<'_> {
    fn db(&self, table: &str) -> Option<&Db> {
        self.created.get(table).or_else(|| self.handles.get(table))
    }

    /// The table's handle, creating the table if needed. heed creates databases only
    /// through `create_databases_and_commit`, which commits the transaction it is
    /// given, so the table is created in a nested transaction: committing that one
    /// merges the new table into ours, to be committed (or aborted) with everything
    /// else we write.
    fn db_or_create(&mut self, table: &str) -> Result<Db> {
        if let Some(db) = self.db(table) {
            return Ok(*db);
        }
        let err = self.store.err("create a table");
        let env = &self.store.env;
        let nested = env.nested_write_txn(&mut self.txn).map_err(&err)?;
        let db = env
            .create_databases_and_commit(nested, |opener, wtxn| {
                opener
                    .create_database::<Bytes, Bytes>(wtxn, Some(table))
                    .map(CommitOrAbort::<_, ()>::Commit)
            })
            .map_err(&err)?
            .commit()
            .ok_or_else(|| StoreError::Lmdb {
                op: "create a table",
                reason: format!("creating table `{table}` was aborted"),
            })?;
        self.created.insert(table.to_owned(), db);
        Ok(db)
    }
}

impl ReadTxn for LmdbWriteTxn<'_> {
    fn get(&self, table: &str, key: &[u8]) -> Result<Option<Vec<u8>>> {
        get(self.store, &self.txn, self.db(table), table, key)
    }

    fn scan(
        &self,
        table: &str,
        lower: Bound<&[u8]>,
        upper: Bound<&[u8]>,
        order: Order,
        limit: usize,
    ) -> Result<Vec<Entry>> {
        let db = self.db(table);
        scan(self.store, &self.txn, db, table, lower, upper, order, limit)
    }
}

impl WriteTxn for LmdbWriteTxn<'_> {
    fn put(&mut self, table: &str, key: &[u8], value: &[u8]) -> Result<()> {
        check::table_name(table)?;
        check::key(table, key)?;
        check::value(table, value)?;
        let db = self.db_or_create(table)?;
        db.put(&mut self.txn, key, value)
            .map_err(self.store.err("put"))?;
        // What is written reads back, within the transaction (debug builds: a get).
        debug_assert!(db.get(&self.txn, key).is_ok_and(|v| v == Some(value)));
        Ok(())
    }

    fn delete(&mut self, table: &str, key: &[u8]) -> Result<bool> {
        check::table_name(table)?;
        check::key(table, key)?;
        // Deleting from a table that does not exist must not create it.
        let Some(db) = self.db(table).copied() else {
            return Ok(false);
        };
        db.delete(&mut self.txn, key)
            .map_err(self.store.err("delete"))
    }

    fn commit(self: Box<Self>) -> Result<()> {
        let LmdbWriteTxn {
            store,
            txn,
            handles,
            created,
        } = *self;
        drop(handles);
        let err = store.err("commit");
        if created.is_empty() {
            // Durable on return: LMDB syncs data and meta pages before it returns.
            return txn.commit().map_err(err);
        }
        // New tables: commit and publish their handles under the lock readers take to
        // begin, so no reader sees the new data without the handle to read it.
        let mut handles = store.lock_handles();
        txn.commit().map_err(err)?;
        Arc::make_mut(&mut handles).extend(created);
        Ok(())
    }
}

fn get(
    store: &LmdbStore,
    txn: &RoTxn<'_, WithoutTls>,
    db: Option<&Db>,
    table: &str,
    key: &[u8],
) -> Result<Option<Vec<u8>>> {
    check::table_name(table)?;
    check::key(table, key)?;
    let Some(db) = db else {
        return Ok(None);
    };
    let value = db.get(txn, key).map_err(store.err("get"))?;
    Ok(value.map(<[u8]>::to_vec))
}

#[allow(clippy::too_many_arguments)]
fn scan(
    store: &LmdbStore,
    txn: &RoTxn<'_, WithoutTls>,
    db: Option<&Db>,
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
    let Some(db) = db else {
        return Ok(Vec::new());
    };
    if limit == 0 {
        return Ok(Vec::new());
    }
    let err = store.err("scan");
    let mut out = Vec::with_capacity(limit.min(1024));
    let mut push = |item: heed::Result<(&[u8], &[u8])>| -> Result<()> {
        let (k, v) = item.map_err(&err)?;
        out.push((k.to_vec(), v.to_vec()));
        Ok(())
    };
    match order {
        Order::Ascending => {
            for item in db.range(txn, &range).map_err(&err)?.take(limit) {
                push(item)?;
            }
        }
        Order::Descending => {
            for item in db.rev_range(txn, &range).map_err(&err)?.take(limit) {
                push(item)?;
            }
        }
    }
    debug_assert!(out.len() <= limit, "a scan returns at most its limit");
    Ok(out)
}

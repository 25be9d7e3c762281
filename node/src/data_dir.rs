//! A node's data directory: its layout, and one owner at a time: a running node, or an offline admin
//! operation, holds an exclusive lock on `DIR/node.lock` for as long as it uses
//! the store.
//!
//! LMDB itself allows several processes on one store, but a node's actors keep
//! what they read in memory, so a second writer behind a running node's back would
//! go unseen; two nodes on one directory would both sequence the same rooms. The
//! lock is an advisory `flock`: the kernel drops it when its holder exits, however
//! it exits, so a crashed node never leaves a stale lock behind.

use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};

/// The lock file's name inside a data directory.
pub const LOCK_FILE_NAME: &str = "node.lock";

/// Where a node keeps its store inside its data directory.
pub(crate) fn store_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("db")
}

/// Why a data directory could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    /// Another holder (a running node, or an admin operation) has it.
    #[error(
        "the data directory {} is in use by a running node (it holds {}); stop that node \
         first, or act through it over the client protocol",
        dir.display(),
        dir.join(LOCK_FILE_NAME).display()
    )]
    InUse {
        /// The data directory.
        dir: PathBuf,
    },
    /// The lock file could not be created or locked.
    #[error("cannot lock {}: {source}", path.display())]
    Io {
        /// The lock file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// The held lock of a data directory; released when dropped (or when the process
/// exits).
#[derive(Debug)]
pub(crate) struct DataDirLock {
    /// Holding the open file holds the lock.
    _file: File,
}

impl DataDirLock {
    /// Takes `dir`'s lock without waiting; [`DataDirError::InUse`] if it is held,
    /// by another process or by another handle in this one.
    pub(crate) fn acquire(dir: &Path) -> Result<Self, DataDirError> {
        let path = dir.join(LOCK_FILE_NAME);
        let io = |source| DataDirError::Io {
            path: path.clone(),
            source,
        };
        // Never truncated or written: the lock is the flock, not the content.
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => Ok(Self { _file: file }),
            Err(TryLockError::WouldBlock) => Err(DataDirError::InUse {
                dir: dir.to_path_buf(),
            }),
            Err(TryLockError::Error(source)) => Err(io(source)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_directory_is_refused_until_released() {
        let dir = tempfile::tempdir().expect("tempdir");
        let held = DataDirLock::acquire(dir.path()).expect("first holder");
        match DataDirLock::acquire(dir.path()) {
            Err(DataDirError::InUse { dir: reported }) => assert_eq!(reported, dir.path()),
            other => panic!("expected in use, got {other:?}"),
        }
        drop(held);
        DataDirLock::acquire(dir.path()).expect("free again once released");
    }
}

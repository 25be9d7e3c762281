//! Offline administration of a node's data directory, for the operator, while the
//! node is stopped: the bootstrap of a node's first admin before its first start
//! (what `conclave user add --admin --data DIR` does).
//!
//! Once a node runs, users are managed through it (an admin over the client
//! protocol, or [`crate::Node::seed_admin`] in an embedding process); the offline
//! operation refuses a directory a running node holds ([`DataDirError::InUse`]).

use std::path::{Path, PathBuf};

use conclave_actors::domain::{self, Denial};
use conclave_actors::{PublicIdentity, UserId};
use conclave_storage::{LmdbOptions, LmdbStore, Store, StoreError};

use crate::data_dir::{store_dir, DataDirError, DataDirLock};
use crate::host::wall_now;

/// What [`seed_admin_offline`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seeded {
    /// The identity is now an admin of the node.
    Added,
    /// The identity was registered already; nothing changed (a bootstrap may be
    /// re-run safely).
    AlreadyRegistered,
}

/// Why an offline admin operation failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The data directory is held by a running node, or could not be locked.
    #[error(transparent)]
    DataDir(#[from] DataDirError),
    /// The data directory could not be created.
    #[error("cannot create the data directory {}: {source}", dir.display())]
    Create {
        /// The directory.
        dir: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The store could not be opened, read or written.
    #[error("the store in {}: {source}", dir.display())]
    Store {
        /// The data directory.
        dir: PathBuf,
        /// The error.
        source: StoreError,
    },
    /// The registry refused the identity (e.g. a malformed key).
    #[error("the bootstrap was refused: {0}")]
    Refused(Denial),
    /// The store was written by a build with another table layout.
    #[error("the store in {}: {source}", dir.display())]
    Format {
        /// The data directory.
        dir: PathBuf,
        /// Why it cannot be used.
        source: domain::state::FormatError,
    },
}

/// Registers `admin` as an admin of the node whose data directory is `data_dir`
/// (creating the directory and the store if needed), then closes the store. The
/// node must not be running: a directory a node holds is refused with
/// [`DataDirError::InUse`].
pub fn seed_admin_offline(data_dir: &Path, admin: &PublicIdentity) -> Result<Seeded, AdminError> {
    std::fs::create_dir_all(data_dir).map_err(|source| AdminError::Create {
        dir: data_dir.to_path_buf(),
        source,
    })?;
    with_stopped_store(data_dir, |store| {
        let store_error = |source| AdminError::Store {
            dir: data_dir.to_path_buf(),
            source,
        };
        match seed_admin(store, admin) {
            Ok(()) => Ok(Seeded::Added),
            Err(SeedError::Refused(Denial::Conflict { .. })) => already_admin(store, admin)
                .map_err(store_error)?
                .map_err(AdminError::Refused),
            Err(SeedError::Refused(denial)) => Err(AdminError::Refused(denial)),
            Err(SeedError::Store(source)) => Err(store_error(source)),
        }
    })
}

/// Runs `work` on the store of the stopped node whose data directory is
/// `data_dir`: holds the directory's lock (a running node's directory is refused),
/// checks the store's format, and closes the store before releasing the lock, so
/// that a node starting right after finds it closed.
pub(crate) fn with_stopped_store<T>(
    data_dir: &Path,
    work: impl FnOnce(&LmdbStore) -> Result<T, AdminError>,
) -> Result<T, AdminError> {
    let lock = DataDirLock::acquire(data_dir)?;
    let store =
        LmdbStore::open(&store_dir(data_dir), LmdbOptions::default()).map_err(|source| {
            AdminError::Store {
                dir: data_dir.to_path_buf(),
                source,
            }
        })?;
    domain::state::ensure_format(&store).map_err(|source| AdminError::Format {
        dir: data_dir.to_path_buf(),
        source,
    })?;
    let out = work(&store);
    drop(store);
    drop(lock);
    out
}

/// A bootstrap of an identity that is registered already changes nothing; that
/// is success only if it is an active admin (a member or a revoked user is not made
/// one, and saying "registered" would hide that).
fn already_admin(
    store: &dyn Store,
    admin: &PublicIdentity,
) -> Result<Result<Seeded, Denial>, StoreError> {
    let read = store.read()?;
    let user = UserId(admin.signing);
    let record = domain::state::registry::user(&*read, user)?;
    Ok(match record {
        Some(r) if r.status == domain::UserStatus::Revoked => Err(Denial::Revoked),
        Some(r) if r.role == domain::UserRole::Admin => Ok(Seeded::AlreadyRegistered),
        Some(_) => Err(Denial::Conflict {
            what: format!("{user} is registered as a member, not an admin"),
        }),
        // The conflict said it exists; read back, it does not: the store is broken.
        None => Err(Denial::Storage),
    })
}

/// Why [`seed_admin`] failed.
pub(crate) enum SeedError {
    Store(StoreError),
    Refused(Denial),
}

/// Registers `admin` as an admin in `store` (one transaction), and reads it back.
/// [`Denial::Conflict`] if the key is registered already.
pub(crate) fn seed_admin(store: &dyn Store, admin: &PublicIdentity) -> Result<(), SeedError> {
    let mut txn = store.write().map_err(SeedError::Store)?;
    domain::state::registry::seed_admin(&mut *txn, admin, wall_now())
        .map_err(SeedError::Refused)?;
    txn.commit().map_err(SeedError::Store)?;
    let read = store.read().map_err(SeedError::Store)?;
    // Read back what was just committed: an active admin with this exchange key.
    let record = domain::state::registry::check_active(&*read, UserId(admin.signing))
        .map_err(SeedError::Refused)?;
    assert_eq!(
        record.role,
        domain::UserRole::Admin,
        "a seeded user reads back as admin"
    );
    assert_eq!(
        record.exchange, admin.exchange,
        "a seeded user reads back with its key"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use conclave_actors::Identity;

    fn identity() -> Identity {
        Identity::generate(&mut rand_core::UnwrapErr(getrandom::SysRng))
    }

    #[test]
    fn seeds_once_then_reports_registered() {
        let dir = tempfile::tempdir().expect("tempdir");
        let admin = identity().public();
        assert_eq!(
            seed_admin_offline(dir.path(), &admin).expect("seed"),
            Seeded::Added
        );
        assert_eq!(
            seed_admin_offline(dir.path(), &admin).expect("seed again"),
            Seeded::AlreadyRegistered
        );
    }

    #[test]
    fn a_registered_member_is_not_reported_as_an_admin() {
        let dir = tempfile::tempdir().expect("tempdir");
        let member = identity().public();
        {
            let store =
                LmdbStore::open(&store_dir(dir.path()), LmdbOptions::default()).expect("store");
            domain::state::ensure_format(&store).expect("format");
            let mut txn = store.write().expect("write");
            domain::state::registry::add(
                &mut *txn,
                &member,
                domain::UserRole::Member,
                wall_now(),
                None,
            )
            .expect("add");
            txn.commit().expect("commit");
        }
        let refused = seed_admin_offline(dir.path(), &member);
        assert!(
            matches!(refused, Err(AdminError::Refused(Denial::Conflict { .. }))),
            "{refused:?}"
        );
    }
}

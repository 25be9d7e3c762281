//! Identity files on disk: load-or-create, mode 0600, never silently replaced.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use conclave_actors::identity::{IdentityError, IDENTITY_FILE_BYTES};
use conclave_actors::Identity;
use getrandom::SysRng;
use rand_core::UnwrapErr;

/// Why an identity file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum IdentityFileError {
    /// Reading or writing the file failed.
    #[error("identity file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// The file exists but is not a valid identity: it is left untouched.
    #[error("identity file {path} is damaged and was left untouched: {source}. Restore it from a backup, or move it away to create a new identity (that changes this node's or user's id)")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        source: IdentityError,
    },
    /// Group or others may read or write the secret.
    #[error("identity file {path} has mode {mode:04o}: group and others must have no access; run `chmod 600 {path}`")]
    Permissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> IdentityFileError + '_ {
    move |source| IdentityFileError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Loads the identity at `path`; creates a fresh one there if no file exists.
/// Returns the identity and whether it was created.
pub fn load_or_create(path: &Path) -> Result<(Identity, bool), IdentityFileError> {
    match load(path) {
        Ok(identity) => Ok((identity, false)),
        Err(IdentityFileError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            let identity = Identity::generate(&mut UnwrapErr(SysRng));
            match write_new(path, &identity) {
                Ok(()) => Ok((identity, true)),
                // Another process created it first: use theirs, never overwrite.
                Err(IdentityFileError::Io { source, .. })
                    if source.kind() == io::ErrorKind::AlreadyExists =>
                {
                    load(path).map(|identity| (identity, false))
                }
                Err(e) => Err(e),
            }
        }
        Err(e) => Err(e),
    }
}

/// Loads the identity at `path`, refusing a damaged file or one that group or
/// others can access.
pub fn load(path: &Path) -> Result<Identity, IdentityFileError> {
    let mut file = File::open(path).map_err(io_error(path))?;
    let mode = file
        .metadata()
        .map_err(io_error(path))?
        .permissions()
        .mode()
        & 0o777;
    if mode & 0o077 != 0 {
        return Err(IdentityFileError::Permissions {
            path: path.to_owned(),
            mode,
        });
    }
    // Read one byte past the expected size so a longer file is seen as such,
    // without reading an arbitrarily large file into memory.
    let mut bytes = zeroize::Zeroizing::new(Vec::with_capacity(IDENTITY_FILE_BYTES + 1));
    (&mut file)
        .take(IDENTITY_FILE_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(io_error(path))?;
    Identity::from_file_bytes(&bytes).map_err(|source| IdentityFileError::Corrupt {
        path: path.to_owned(),
        source,
    })
}

/// Writes `identity` to a new file at `path` with mode 0600, durably. Fails if the
/// file exists: an identity is never overwritten.
pub fn write_new(path: &Path, identity: &Identity) -> Result<(), IdentityFileError> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    fs::create_dir_all(dir).map_err(io_error(path))?;
    // Write under a unique temporary name (created 0600) and link it into place
    // without replacing anything, so a crash never leaves a truncated identity under
    // the real name and two concurrent creators cannot swap files.
    let mut tmp = tempfile::Builder::new()
        .prefix(".identity-")
        .permissions(fs::Permissions::from_mode(0o600))
        .tempfile_in(dir)
        .map_err(io_error(path))?;
    tmp.write_all(&identity.to_file_bytes())
        .and_then(|()| tmp.as_file().sync_all())
        .map_err(io_error(path))?;
    tmp.persist_noclobber(path)
        .map_err(|e| io_error(path)(e.error))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_once_then_loads_the_same_identity_with_mode_0600() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub/node.id");
        let (first, created) = load_or_create(&path).expect("create");
        assert!(created);
        let mode = fs::metadata(&path).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let (second, created) = load_or_create(&path).expect("load");
        assert!(!created);
        assert_eq!(first.public(), second.public());
        let leftovers = fs::read_dir(path.parent().expect("dir"))
            .expect("ls")
            .count();
        assert_eq!(leftovers, 1, "only the identity file remains");
    }

    #[test]
    fn truncated_or_corrupt_files_are_errors_and_left_untouched() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("node.id");
        load_or_create(&path).expect("create");
        let good = fs::read(&path).expect("read");

        for bad in [good[..good.len() - 1].to_vec(), Vec::new(), {
            let mut b = good.clone();
            b[40] ^= 0xff;
            b
        }] {
            fs::write(&path, &bad).expect("write");
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).expect("chmod");
            let err = load_or_create(&path).unwrap_err();
            assert!(
                matches!(err, IdentityFileError::Corrupt { .. }),
                "got {err:?}"
            );
            assert_eq!(fs::read(&path).expect("read"), bad, "file was modified");
        }
    }

    #[test]
    fn readable_by_others_is_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("node.id");
        load_or_create(&path).expect("create");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).expect("chmod");
        match load(&path) {
            Err(IdentityFileError::Permissions { mode, .. }) => assert_eq!(mode, 0o644),
            other => panic!("expected a permissions error, got {other:?}"),
        }
        assert!(load_or_create(&path).is_err(), "must not replace it either");
    }

    #[test]
    fn write_new_never_overwrites() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("node.id");
        let (original, _) = load_or_create(&path).expect("create");
        let other = Identity::from_secrets(&[1; 32], [2; 32]);
        let err = write_new(&path, &other).unwrap_err();
        assert!(
            matches!(err, IdentityFileError::Io { ref source, .. } if source.kind() == io::ErrorKind::AlreadyExists)
        );
        assert_eq!(load(&path).expect("load").public(), original.public());
    }
}

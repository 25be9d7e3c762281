//! Test seams, not part of the API: what a node that lies would do to its own
//! store, done to a stopped node's data directory so that tests can check that no
//! client believes it.

use std::path::Path;

use conclave_actors::domain;
use conclave_storage::{Store, StoreError, WriteTxn};

use crate::admin::AdminError;

/// Runs `write` in one write transaction on the store of the stopped node whose
/// data directory is `data_dir`, and commits it if `write` succeeds. Refuses a
/// directory a running node holds.
pub fn write_stopped<T>(
    data_dir: &Path,
    write: impl FnOnce(&mut dyn WriteTxn) -> Result<T, StoreError>,
) -> Result<T, AdminError> {
    crate::admin::with_stopped_store(data_dir, |store| {
        let store_error = |source| AdminError::Store {
            dir: data_dir.to_path_buf(),
            source,
        };
        let mut txn = store.write().map_err(store_error)?;
        let out = write(&mut *txn).map_err(store_error)?;
        txn.commit().map_err(store_error)?;
        Ok(out)
    })
}

/// Hands a signed request to `node` as its client protocol would (a hand-built
/// request, for what the embedding API never builds: a creation claiming another
/// room's id, say). `Ok(None)`: queued for the room's home.
pub async fn call(
    node: &crate::Node,
    req: domain::SignedRequest,
) -> Result<Option<domain::Outcome>, crate::ApiError> {
    crate::user::sealed::Carrier::call(node, req).await
}

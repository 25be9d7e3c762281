//! The domain's tables and the queries over them, apart from the actors.
//!
//! Actors decide and apply; what they read and write lives here, so that no actor
//! imports another to read its tables, and so that a later replicated log can apply
//! the same writes on every replica. Every scan has a named bound (no
//! `usize::MAX`), and what is read back is checked against what it must be.
//!
//! | module | holds |
//! |---|---|
//! | [`registry`] | the node's users (role, status, bound X25519 key) |
//! | [`rooms`] | each room's record, members, frames, message ids, local readers' visibility, and its signed creation |
//! | [`keys`] | sealed epoch keys by (room, user, epoch) |
//! | [`outcomes`] | what rooms' homes decided late on requests this node forwarded |

pub mod keys;
pub mod outcomes;
pub mod registry;
pub mod rooms;

use conclave_storage::{Store, StoreError, Table};

/// The layout of the domain's tables this build reads and writes. Bumped whenever
/// a stored type changes incompatibly (2: rooms' records carry `members_version`;
/// sealed keys reach member nodes as room updates; 3: rooms keep their membership
/// chain, and their records whether a rekey is due; 4: a receiver's mark per
/// origin names the incarnation it follows, and a node records its run's; 5: member
/// nodes index frames by message id, and record late outcomes).
pub const STORE_FORMAT: u32 = 6;

const FORMAT: Table<[u8; 1], u32> = Table::new("store.format");

/// Why a node's store cannot be used by this build.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// The store was written by a build with another table layout.
    #[error(
        "the store has format {found}, this build reads format {STORE_FORMAT}: use the build \
         that wrote it, or start from a new data directory"
    )]
    Incompatible {
        /// The format the store records.
        found: u32,
    },
    /// The store holds data but records no format: an earlier build wrote it.
    #[error(
        "the store was written by an earlier build (it records no format; this build reads \
         format {STORE_FORMAT}): start from a new data directory"
    )]
    Unversioned,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Checks that `store` holds this build's table layout, recording it in a store
/// that holds nothing yet. Drivers call this once, before any actor runs, so that a
/// store of another layout is refused with a reason instead of failing every
/// operation as corrupt.
pub fn ensure_format(store: &dyn Store) -> Result<(), FormatError> {
    let mut txn = store.write()?;
    match FORMAT.get(&*txn, &[0])? {
        Some(STORE_FORMAT) => return Ok(()),
        Some(found) => return Err(FormatError::Incompatible { found }),
        None => {}
    }
    let used = registry::any(&*txn)? || rooms::any(&*txn)? || crate::outbox::any(&*txn)?;
    if used {
        return Err(FormatError::Unversioned);
    }
    FORMAT.put(&mut *txn, &[0], &STORE_FORMAT)?;
    txn.commit()?;
    Ok(())
}

/// Whether `store` is new: [`ensure_format`] has never recorded a layout in it.
pub fn is_new(store: &dyn Store) -> Result<bool, StoreError> {
    let txn = store.read()?;
    Ok(FORMAT.get(&*txn, &[0])?.is_none())
}

#[cfg(test)]
mod tests {
    use conclave_storage::MemStore;
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    use super::*;
    use crate::actor::Time;
    use crate::identity::Identity;

    #[test]
    fn a_new_store_takes_this_format_and_another_layout_is_refused() {
        let store = MemStore::new();
        ensure_format(&store).expect("a new store");
        ensure_format(&store).expect("the same format again");
        // A store an earlier build wrote: data, but no recorded format.
        let old = MemStore::new();
        let admin = Identity::generate(&mut ChaCha20Rng::seed_from_u64(1));
        let mut txn = old.write().expect("write");
        registry::seed_admin(&mut *txn, &admin.public(), Time::default()).expect("seed");
        txn.commit().expect("commit");
        assert!(matches!(ensure_format(&old), Err(FormatError::Unversioned)));
        // A store of another recorded format.
        let other = MemStore::new();
        let mut txn = other.write().expect("write");
        FORMAT
            .put(&mut *txn, &[0], &(STORE_FORMAT + 1))
            .expect("put");
        txn.commit().expect("commit");
        let refused = ensure_format(&other);
        assert!(
            matches!(refused, Err(FormatError::Incompatible { found }) if found == STORE_FORMAT + 1)
        );
    }

    #[test]
    fn a_users_rooms_and_keys_are_read_in_pages_and_all_of_them_are_there() {
        use crate::domain::Policy;
        use crate::ids::{Epoch, NodeId, RoomId, Seq, UserId};
        let store = MemStore::new();
        let user = UserId([7; 32]);
        let home = NodeId([1; 32]);
        // More memberships than a page, one in three left.
        let count = rooms::ROOMS_PAGE_MAX + rooms::ROOMS_PAGE_MAX / 2;
        let mut txn = store.write().expect("write");
        for i in 0..count {
            let mut id = [0u8; 16];
            id[..8].copy_from_slice(&(i as u64).to_be_bytes());
            let room = RoomId(id);
            let meta = rooms::RoomMeta {
                home,
                policy: Policy::default(),
                epoch: Epoch(1),
                epoch_start: Seq(1),
                next_seq: Seq(1),
                owner: user,
                members_version: 1,
                rekey_due: false,
            };
            rooms::put_meta(&mut *txn, room, &meta).expect("meta");
            let until = (i % 3 == 0).then_some(Seq(1));
            let vis = rooms::Visibility {
                from: Seq(1),
                until,
            };
            rooms::put_visibility(&mut *txn, user, room, &vis).expect("visibility");
        }
        let key = crate::crypto::SealedKey {
            sealer: user,
            enc: [0; 32],
            ciphertext: vec![0; 48],
            signature: crate::crypto::SignatureBytes([0; 64]),
        };
        let epochs = keys::SEALED_KEYS_PAGE_MAX as u64 + 5;
        for epoch in 1..=epochs {
            keys::put(&mut *txn, RoomId([9; 16]), Epoch(epoch), user, &key).expect("key");
        }
        txn.commit().expect("commit");

        let txn = store.read().expect("read");
        let (first, next) = rooms::rooms_page(&*txn, user, None).expect("page");
        assert!(next.is_some(), "a full page has a next");
        let (second, last) = rooms::rooms_page(&*txn, user, next).expect("page");
        assert_eq!(last, None);
        let members_now = count - count.div_ceil(3);
        assert_eq!(first.len() + second.len(), members_now);
        assert_eq!(
            rooms::rooms_of(&*txn, user).expect("all").len(),
            members_now
        );
        let page = keys::sealed_page(&*txn, RoomId([9; 16]), user, Epoch(0)).expect("keys");
        assert_eq!(page.len(), keys::SEALED_KEYS_PAGE_MAX);
        let rest =
            keys::sealed_page(&*txn, RoomId([9; 16]), user, page[page.len() - 1].0).expect("keys");
        assert_eq!(
            rest.first().map(|(e, _)| e.0),
            Some(keys::SEALED_KEYS_PAGE_MAX as u64 + 1)
        );
        assert_eq!(
            keys::sealed_for(&*txn, RoomId([9; 16]), user)
                .expect("all")
                .len() as u64,
            epochs
        );
    }
}

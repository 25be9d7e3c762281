//! Sealed epoch keys, by (room, user, epoch): a user's keys of one room are one range.
//!
//! Nodes only store and route sealed keys; they cannot open them.

use conclave_storage::{Order, ReadTxn, StoreError, Table, WriteTxn};

use crate::crypto::SealedKey;
use crate::ids::{Epoch, RoomId, UserId};

const SEALED: Table<([u8; 16], [u8; 32], u64), SealedKey> = Table::new("keys.sealed");

/// The most sealed keys one page of [`sealed_page`] holds (a key is ~200 bytes,
/// so a page stays well under a 1 MiB response).
pub const SEALED_KEYS_PAGE_MAX: usize = 1_024;

/// Stores `key`, sealed to `user`, for `room` at `epoch`. Storing the same key again
/// changes nothing (receivers are idempotent).
pub fn put(
    txn: &mut dyn WriteTxn,
    room: RoomId,
    epoch: Epoch,
    user: UserId,
    key: &SealedKey,
) -> Result<(), StoreError> {
    assert!(epoch.0 >= 1, "epochs start at 1");
    SEALED.put(txn, &(room.0, user.0, epoch.0), key)
}

/// One page of the keys of `room` sealed to `user` on this node: the epochs after
/// `after`, ascending, at most [`SEALED_KEYS_PAGE_MAX`] (a shorter page is the
/// last).
pub fn sealed_page(
    txn: &dyn ReadTxn,
    room: RoomId,
    user: UserId,
    after: Epoch,
) -> Result<Vec<(Epoch, SealedKey)>, StoreError> {
    let Some(first) = after.0.checked_add(1) else {
        return Ok(Vec::new());
    };
    let keys: Vec<(Epoch, SealedKey)> = SEALED
        .scan(
            txn,
            (room.0, user.0, first)..=(room.0, user.0, u64::MAX),
            Order::Ascending,
            SEALED_KEYS_PAGE_MAX,
        )?
        .into_iter()
        .map(|((_, _, epoch), key)| (Epoch(epoch), key))
        .collect();
    debug_assert!(keys.windows(2).all(|w| w[0].0 < w[1].0), "epochs ascend");
    Ok(keys)
}

/// Every key of `room` sealed to `user` on this node (page after page), by
/// ascending epoch: for this node's own use and tests.
pub fn sealed_for(
    txn: &dyn ReadTxn,
    room: RoomId,
    user: UserId,
) -> Result<Vec<(Epoch, SealedKey)>, StoreError> {
    let mut all = Vec::new();
    loop {
        let after = all.last().map_or(Epoch(0), |(epoch, _)| *epoch);
        let page = sealed_page(txn, room, user, after)?;
        let last = page.len() < SEALED_KEYS_PAGE_MAX;
        all.extend(page);
        if last {
            return Ok(all);
        }
    }
}

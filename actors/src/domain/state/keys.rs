//! Sealed epoch keys, by (room, user, epoch): a user's keys of one room are one range.
//!
//! Nodes only store and route sealed keys; they cannot open them.

use conclave_storage::{Order, ReadTxn, StoreError, Table, WriteTxn};

use crate::crypto::SealedKey;
use crate::ids::{Epoch, RoomId, UserId};

const SEALED: Table<([u8; 16], [u8; 32], u64), SealedKey> = Table::new("keys.sealed");

/// The most sealed keys [`sealed_for`] returns: the newest epochs, which are the
/// ones a client reads with (a key is ~200 bytes, so this stays well under a 1 MiB
/// response).
pub const SEALED_KEYS_LISTED_MAX: usize = 1_024;

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

/// The keys of `room` sealed to `user` on this node, by ascending epoch: the newest
/// [`SEALED_KEYS_LISTED_MAX`] of them.
pub fn sealed_for(
    txn: &dyn ReadTxn,
    room: RoomId,
    user: UserId,
) -> Result<Vec<(Epoch, SealedKey)>, StoreError> {
    let mut keys: Vec<(Epoch, SealedKey)> = SEALED
        .scan(
            txn,
            (room.0, user.0, 0)..=(room.0, user.0, u64::MAX),
            Order::Descending,
            SEALED_KEYS_LISTED_MAX,
        )?
        .into_iter()
        .map(|((_, _, epoch), key)| (Epoch(epoch), key))
        .collect();
    keys.reverse();
    debug_assert!(keys.windows(2).all(|w| w[0].0 < w[1].0), "epochs ascend");
    Ok(keys)
}

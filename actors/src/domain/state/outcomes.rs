//! Late outcomes: what a room's home decided on a request this node forwarded,
//! recorded when the home's word arrives through its durable outbox, so that a user
//! learns it after their call stopped waiting, after a partition, or after either
//! node restarted.
//!
//! A committed frame needs no record: the frame itself reaches the sender's node
//! (it is a member node of the room), which indexes it by message id. So a frame's
//! outcome is its sequence number if the node holds it, else a recorded refusal,
//! else not known yet.
//!
//! One record per (user, room, what was asked). A home may decide the same request
//! twice (a redelivery after a crash, or after the peer offered a run again): a
//! membership change it applied the first time is then refused as stale, so a
//! recorded [`Outcome::Done`] is never replaced by a refusal (an applied change
//! cannot be undone). Records are kept per (user, room), oldest first, at most
//! [`LATE_OUTCOMES_PER_ROOM_MAX`], each at most [`LATE_OUTCOME_BYTES_MAX`]: a
//! room's home can make a node keep only so much, and only for that room.

use conclave_storage::{Order, ReadTxn, StoreError, Table, WriteTxn};
use serde::{Deserialize, Serialize};

use super::rooms;
use crate::domain::{Asked, Outcome};
use crate::ids::{RoomId, Seq, UserId};

/// The most late outcomes a node keeps per user and room (the oldest go first).
pub const LATE_OUTCOMES_PER_ROOM_MAX: u64 = 1_024;

/// The largest late outcome a node records, encoded (a refusal's reason and its
/// few words of detail take far less).
pub const LATE_OUTCOME_BYTES_MAX: usize = 512;

/// (user, room, what was asked: a kind byte and a big-endian nonce or message id).
type AskedKey = ([u8; 32], [u8; 16], [u8; 17]);

/// A late outcome, under (user, room, serial): serials grow by one per record.
const LATE: Table<([u8; 32], [u8; 16], u64), Late> = Table::new("outcome.late");
/// The serial of the record of (user, room, what was asked).
const ASKED: Table<AskedKey, u64> = Table::new("outcome.asked");

/// What a room's home decided on something a user asked through this node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Late {
    asked: Asked,
    outcome: Outcome,
}

/// Why a late outcome was not recorded.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// It is neither [`Outcome::Done`] nor [`Outcome::Denied`], or it is larger
    /// than [`LATE_OUTCOME_BYTES_MAX`].
    #[error("a late outcome must be done or denied, in at most {LATE_OUTCOME_BYTES_MAX} bytes")]
    Unfit,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn asked_key(asked: Asked) -> [u8; 17] {
    let mut key = [0u8; 17];
    let (kind, id) = match asked {
        Asked::Request { nonce } => (0, u128::from(nonce)),
        Asked::Frame { id } => (1, id.0),
    };
    key[0] = kind;
    key[1..].copy_from_slice(&id.to_be_bytes());
    key
}

/// Records `outcome` of `asked` by `user` in `room`, unless a `Done` is recorded
/// for it already; drops the (user, room)'s oldest record past
/// [`LATE_OUTCOMES_PER_ROOM_MAX`].
pub fn record(
    txn: &mut dyn WriteTxn,
    user: UserId,
    room: RoomId,
    asked: Asked,
    outcome: Outcome,
) -> Result<(), RecordError> {
    let fits = crate::wire::encode_bounded(&outcome, LATE_OUTCOME_BYTES_MAX).is_ok();
    if !fits || !matches!(outcome, Outcome::Done | Outcome::Denied(_)) {
        return Err(RecordError::Unfit);
    }
    let late = Late { asked, outcome };
    let index = (user.0, room.0, asked_key(asked));
    if let Some(serial) = ASKED.get(&*txn, &index)? {
        let held = LATE.get(&*txn, &(user.0, room.0, serial))?;
        if held.is_some_and(|h| h.outcome == Outcome::Done) {
            return Ok(());
        }
        return Ok(LATE.put(txn, &(user.0, room.0, serial), &late)?);
    }
    let serial = next_serial(txn, user, room)?;
    LATE.put(txn, &(user.0, room.0, serial), &late)?;
    ASKED.put(txn, &index, &serial)?;
    Ok(())
}

/// The serial of the next record of (user, room), after dropping the oldest if
/// the bound is reached (serials are contiguous: records go only from the front).
fn next_serial(txn: &mut dyn WriteTxn, user: UserId, room: RoomId) -> Result<u64, StoreError> {
    let range = (user.0, room.0, 0)..=(user.0, room.0, u64::MAX);
    let oldest = LATE.scan(&*txn, range.clone(), Order::Ascending, 1)?.pop();
    let newest = LATE.scan(&*txn, range, Order::Descending, 1)?.pop();
    let (Some(((_, _, first), gone)), Some(((_, _, last), _))) = (oldest, newest) else {
        return Ok(0);
    };
    if last.saturating_sub(first) + 1 >= LATE_OUTCOMES_PER_ROOM_MAX {
        LATE.delete(txn, &(user.0, room.0, first))?;
        ASKED.delete(txn, &(user.0, room.0, asked_key(gone.asked)))?;
    }
    last.checked_add(1).ok_or_else(|| StoreError::Corrupt {
        table: "outcome.late".into(),
        reason: "a user's serials in a room are exhausted".into(),
    })
}

/// What became of `asked` (by `user`, in `room`) as this node knows it: the
/// recorded outcome, or for a frame the sequence number it holds it at (only a
/// frame `user` sent, in a room they are or were a member of: nobody learns of
/// others' frames here). `None`: not decided yet, or not known here.
pub fn of(
    txn: &dyn ReadTxn,
    user: UserId,
    room: RoomId,
    asked: Asked,
) -> Result<Option<Outcome>, StoreError> {
    if let Asked::Frame { id } = asked {
        let held = match rooms::visibility(txn, user, room)? {
            Some(_) => rooms::seq_of_id(txn, room, id)?,
            None => None,
        };
        if let Some(seq) = held {
            if sent_by(txn, room, seq, user)? {
                return Ok(Some(Outcome::Committed { id, seq }));
            }
        }
    }
    let Some(serial) = ASKED.get(txn, &(user.0, room.0, asked_key(asked)))? else {
        return Ok(None);
    };
    Ok(LATE
        .get(txn, &(user.0, room.0, serial))?
        .filter(|late| late.asked == asked)
        .map(|late| late.outcome))
}

/// Whether the frame held at `seq` was sent by `user` (a frame no longer held, of
/// a room that keeps only recent frames, counts as theirs: its id was theirs to
/// know).
fn sent_by(txn: &dyn ReadTxn, room: RoomId, seq: Seq, user: UserId) -> Result<bool, StoreError> {
    Ok(rooms::frames(txn, room, seq, 1)?
        .first()
        .is_none_or(|(s, frame)| *s != seq || frame.sender == user))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Denial;
    use conclave_storage::{MemStore, Store};

    const ROOM: RoomId = RoomId([7; 16]);

    fn put(store: &MemStore, user: UserId, room: RoomId, nonce: u64, outcome: Outcome) {
        let mut txn = store.write().unwrap();
        record(&mut *txn, user, room, Asked::Request { nonce }, outcome).unwrap();
        txn.commit().unwrap();
    }

    fn find(store: &MemStore, user: UserId, room: RoomId, nonce: u64) -> Option<Outcome> {
        let txn = store.read().unwrap();
        of(&*txn, user, room, Asked::Request { nonce }).unwrap()
    }

    #[test]
    fn a_user_keeps_their_newest_outcomes_per_room_up_to_the_bound() {
        let store = MemStore::new();
        let (alice, bob) = (UserId([1; 32]), UserId([2; 32]));
        let denied = Outcome::Denied(Denial::NotAMember);
        put(&store, bob, ROOM, 0, denied.clone());
        put(&store, alice, RoomId([8; 16]), 0, denied.clone());
        for nonce in 0..LATE_OUTCOMES_PER_ROOM_MAX + 10 {
            put(&store, alice, ROOM, nonce, denied.clone());
        }
        assert_eq!(find(&store, alice, ROOM, 9), None, "the oldest went first");
        assert_eq!(find(&store, alice, ROOM, 10), Some(denied.clone()));
        let last = LATE_OUTCOMES_PER_ROOM_MAX + 9;
        assert_eq!(find(&store, alice, ROOM, last), Some(denied.clone()));
        assert_eq!(
            find(&store, bob, ROOM, 0),
            Some(denied.clone()),
            "another user's stay"
        );
        let other = Some(denied);
        assert_eq!(
            find(&store, alice, RoomId([8; 16]), 0),
            other,
            "another room's stay"
        );
        assert_eq!(
            find(&store, bob, RoomId([8; 16]), 0),
            None,
            "a record is of one room"
        );
        let txn = store.read().unwrap();
        let held = LATE.scan(&*txn, .., Order::Ascending, 4_096).unwrap();
        assert_eq!(held.len() as u64, LATE_OUTCOMES_PER_ROOM_MAX + 2);
        let indexed = ASKED.scan(&*txn, .., Order::Ascending, 4_096).unwrap();
        assert_eq!(indexed.len(), held.len(), "the index drops what goes");
    }

    #[test]
    fn a_change_recorded_done_is_never_reported_refused_and_a_refusal_may_become_done() {
        let store = MemStore::new();
        let alice = UserId([1; 32]);
        let stale = Outcome::Denied(Denial::StaleChain { len: 3 });
        put(&store, alice, ROOM, 1, Outcome::Done);
        put(&store, alice, ROOM, 1, stale.clone());
        assert_eq!(find(&store, alice, ROOM, 1), Some(Outcome::Done));
        let full = Outcome::Denied(Denial::StoreFull {
            used_bytes: 1,
            max_bytes: 1,
        });
        put(&store, alice, ROOM, 2, full);
        put(&store, alice, ROOM, 2, Outcome::Done);
        assert_eq!(find(&store, alice, ROOM, 2), Some(Outcome::Done));
        let txn = store.read().unwrap();
        let held = LATE.scan(&*txn, .., Order::Ascending, 16).unwrap();
        assert_eq!(held.len(), 2, "one record per request");
    }

    #[test]
    fn what_is_not_a_late_outcome_or_is_too_large_is_not_recorded() {
        let store = MemStore::new();
        let mut txn = store.write().unwrap();
        let (user, asked) = (UserId([1; 32]), Asked::Request { nonce: 1 });
        let huge = Outcome::Denied(Denial::Malformed {
            problem: "x".repeat(LATE_OUTCOME_BYTES_MAX),
        });
        let forwarded = Outcome::Forwarded;
        for outcome in [huge, forwarded] {
            let result = record(&mut *txn, user, ROOM, asked, outcome);
            assert!(matches!(result, Err(RecordError::Unfit)), "{result:?}");
        }
    }
}

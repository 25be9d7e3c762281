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
//! Records are kept per user, oldest first, at most [`LATE_OUTCOMES_PER_USER_MAX`]:
//! a user who provokes refusals without end evicts only their own oldest records.

use conclave_storage::{Order, ReadTxn, StoreError, Table, WriteTxn};
use serde::{Deserialize, Serialize};

use super::rooms;
use crate::actor::Time;
use crate::domain::{Asked, Outcome};
use crate::ids::{RoomId, Seq, UserId};

/// The most late outcomes a node keeps per user (the oldest go first).
pub const LATE_OUTCOMES_PER_USER_MAX: u64 = 1_024;

/// A late outcome, under (user, serial): serials grow by one per record of the user.
const LATE: Table<([u8; 32], u64), Late> = Table::new("outcome.late");

/// What a room's home decided on something a user asked through this node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Late {
    /// The room.
    pub room: RoomId,
    /// What was asked.
    pub asked: Asked,
    /// What the home decided ([`Outcome::Done`] or [`Outcome::Denied`]).
    pub outcome: Outcome,
    /// When this node recorded it.
    pub at: Time,
}

/// Records `late` for `user`, dropping their oldest record past
/// [`LATE_OUTCOMES_PER_USER_MAX`].
pub fn record(txn: &mut dyn WriteTxn, user: UserId, late: &Late) -> Result<(), StoreError> {
    let range = (user.0, 0)..=(user.0, u64::MAX);
    let oldest = LATE.scan(&*txn, range.clone(), Order::Ascending, 1)?.pop();
    let newest = LATE.scan(&*txn, range, Order::Descending, 1)?.pop();
    let next = match (oldest, newest) {
        (Some(((_, first), _)), Some(((_, last), _))) => {
            // Serials are contiguous: records go only from the front.
            if last.saturating_sub(first) + 1 >= LATE_OUTCOMES_PER_USER_MAX {
                LATE.delete(txn, &(user.0, first))?;
            }
            last.checked_add(1).ok_or_else(|| StoreError::Corrupt {
                table: "outcome.late".into(),
                reason: "a user's serials are exhausted".into(),
            })?
        }
        _ => 0,
    };
    LATE.put(txn, &(user.0, next), late)
}

/// What became of `asked` (by `user`, in `room`) as this node knows it: the newest
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
    let records = LATE.scan(
        txn,
        (user.0, 0)..=(user.0, u64::MAX),
        Order::Descending,
        LATE_OUTCOMES_PER_USER_MAX as usize,
    )?;
    Ok(records
        .into_iter()
        .find(|(_, late)| late.room == room && late.asked == asked)
        .map(|(_, late)| late.outcome))
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

    fn late(nonce: u64) -> Late {
        Late {
            room: RoomId([7; 16]),
            asked: Asked::Request { nonce },
            outcome: Outcome::Denied(Denial::NotAMember),
            at: Time::from_unix_micros(nonce),
        }
    }

    #[test]
    fn a_user_keeps_their_newest_outcomes_up_to_the_bound_and_others_keep_theirs() {
        let store = MemStore::new();
        let (alice, bob) = (UserId([1; 32]), UserId([2; 32]));
        let mut txn = store.write().unwrap();
        record(&mut *txn, bob, &late(0)).unwrap();
        for nonce in 0..LATE_OUTCOMES_PER_USER_MAX + 10 {
            record(&mut *txn, alice, &late(nonce)).unwrap();
        }
        txn.commit().unwrap();
        let txn = store.read().unwrap();
        let room = RoomId([7; 16]);
        let find = |user, nonce| of(&*txn, user, room, Asked::Request { nonce }).unwrap();
        let denied = Some(Outcome::Denied(Denial::NotAMember));
        assert_eq!(find(alice, 9), None, "the oldest went first");
        assert_eq!(find(alice, 10), denied);
        assert_eq!(find(alice, LATE_OUTCOMES_PER_USER_MAX + 9), denied);
        assert_eq!(find(bob, 0), denied, "another user's records stay");
        let held = LATE.scan(&*txn, .., Order::Ascending, 4_096).unwrap();
        assert_eq!(held.len() as u64, LATE_OUTCOMES_PER_USER_MAX + 1);
        assert_eq!(find(alice, LATE_OUTCOMES_PER_USER_MAX + 10), None);
        let other_room = of(&*txn, bob, RoomId([8; 16]), Asked::Request { nonce: 0 });
        assert_eq!(other_room.unwrap(), None, "a record is of one room");
    }
}

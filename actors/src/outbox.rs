//! Durable once-in-order delivery between two nodes, as storage operations.
//!
//! The sending half is a per-destination outbox: a message is written to storage
//! (and so survives a crash) before it is sent, gets the next sequence number for
//! its destination, and stays until the destination acknowledges it. The receiving
//! half is a per-origin high-water mark: a message is taken only if it is the next
//! in sequence, in the same transaction as whatever the receiver does with it, so a
//! crash can neither lose it nor take it twice. Duplicates are dropped; a message
//! after a gap is refused until the gap is filled (the sender resends in order).
//! Together: every message is delivered once and in order per (origin,
//! destination), however the network drops, duplicates or reorders, and however
//! often either side restarts.
//!
//! Sequence numbers mean something only within one run of the sender's store: each
//! start of a node draws a new **incarnation**, and every delivery carries its
//! [`Stream`] (the incarnation, and the first message the sender still holds). A
//! receiver follows one incarnation per origin ([`Mark`]); a delivery of another
//! one (the sender restarted, or its store was reset or restored from a backup),
//! or one whose sender no longer holds what the receiver waits for (the receiver's
//! store was reset), makes it follow the stream afresh from its first message
//! ([`follow`]) instead of dropping new messages as duplicates or waiting for ever
//! for a gap. Receivers are idempotent, so taking a message again is harmless.
//!
//! These are plain functions over a transaction; the outbox actor drives them with
//! its timers and the transport.

use conclave_storage::{Order, ReadTxn, StoreError, Table, WriteTxn};
use serde::{Deserialize, Serialize};

use crate::ids::{NodeId, Seq};

/// How many unacknowledged messages one destination's outbox may hold. Beyond it,
/// [`enqueue`] fails with [`OutboxError::Full`] rather than growing without bound.
pub const OUTBOX_DEPTH_MAX: u64 = 65_536;

/// How many unacknowledged messages of one tag (for the domain: one room) one
/// destination's outbox may hold: an eighth of it, so that what one room queues
/// towards a node that is away or slow cannot take the outbox every room shares.
/// (A new member node's history is queued a page at a time, as it asks.)
pub const OUTBOX_TAG_DEPTH_MAX: u64 = OUTBOX_DEPTH_MAX / 8;

/// How many messages past [`OUTBOX_DEPTH_MAX`] an outbox still takes from
/// [`enqueue_control`]: a request that lets the destination drain what it holds
/// for this node must not wait behind this node's own backlog, or two nodes whose
/// outboxes towards each other are full would each wait for the other for ever.
pub const OUTBOX_CONTROL_RESERVE: u64 = 4_096;

/// The most unacknowledged messages an outbox ever holds.
const OUTBOX_HELD_MAX: u64 = OUTBOX_DEPTH_MAX + OUTBOX_CONTROL_RESERVE;

/// What a message counts against (see [`OUTBOX_TAG_DEPTH_MAX`]).
pub type Tag = [u8; 16];

/// The stored message bytes (serialized as bytes, not as a sequence of u8).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Payload(#[serde(with = "serde_bytes")] Vec<u8>);

/// Per destination: the last sequence number assigned and the last acknowledged.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Head {
    sent: u64,
    acked: u64,
}

/// The most destinations [`pending_destinations`] scans: far more nodes than a
/// cluster has (each destination is a configured peer).
pub const OUTBOX_DESTINATIONS_MAX: usize = 1 << 16;

const MESSAGES: Table<([u8; 32], u64), Payload> = Table::new("outbox.messages");
const HEADS: Table<[u8; 32], Head> = Table::new("outbox.heads");
/// The tag of each tagged message, under the message's key.
const TAGS: Table<([u8; 32], u64), Tag> = Table::new("outbox.tags");
/// How many unacknowledged messages each tag has, per destination.
const TAG_DEPTHS: Table<([u8; 32], Tag), u64> = Table::new("outbox.tag_depths");
/// This run's incarnation, under key 0 (see [`start_incarnation`]).
const INCARNATION: Table<u8, u64> = Table::new("outbox.incarnation");
const MARKS: Table<[u8; 32], Mark> = Table::new("inbox.marks");

/// Which stream a delivery belongs to: the sender's incarnation, and the first
/// message it still holds for this destination (every one before it was
/// acknowledged).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stream {
    /// The sender's incarnation.
    pub incarnation: u64,
    /// Its oldest unacknowledged sequence number for the destination.
    pub first: Seq,
}

/// What a receiver has taken from one origin: the incarnation it follows and the
/// last sequence number taken from it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mark {
    /// The origin's incarnation.
    pub incarnation: u64,
    /// The last sequence number taken (0: none).
    pub high: u64,
}

/// Why a receiver follows a stream afresh (see [`follow`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resync {
    /// It followed no stream of that origin (a new origin, or its store is new).
    First,
    /// The origin started again (a restart, or a store reset or restored).
    NewIncarnation,
    /// The origin no longer holds what the receiver waits for: the receiver's
    /// store lost what it had taken (reset, or restored from an older backup).
    Behind,
}

impl Resync {
    /// As a metric label.
    pub fn reason(self) -> &'static str {
        match self {
            Resync::First => "first",
            Resync::NewIncarnation => "new_incarnation",
            Resync::Behind => "behind",
        }
    }
}

impl Mark {
    /// The stream this mark follows, from the message after it.
    pub fn stream(self) -> Stream {
        Stream {
            incarnation: self.incarnation,
            first: Seq(self.high + 1),
        }
    }
}

/// The mark a receiver at `mark` follows `stream` from: `mark` itself, or, when
/// it must follow the stream afresh (and why), the mark just before the stream's
/// first message.
pub fn follow(mark: Option<Mark>, stream: Stream) -> (Mark, Option<Resync>) {
    let fresh = Mark {
        incarnation: stream.incarnation,
        high: stream.first.0.saturating_sub(1),
    };
    match mark {
        None => (fresh, Some(Resync::First)),
        Some(m) if m.incarnation != stream.incarnation => (fresh, Some(Resync::NewIncarnation)),
        Some(m) if m.high < fresh.high => (fresh, Some(Resync::Behind)),
        Some(m) => (m, None),
    }
}

/// Why an outbox operation failed.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    /// The destination's outbox holds [`OUTBOX_DEPTH_MAX`] unacknowledged messages.
    #[error("outbox to {dest} is full ({depth} unacknowledged messages): retry later")]
    Full {
        /// The destination.
        dest: NodeId,
        /// Messages waiting.
        depth: u64,
    },
    /// The destination's outbox holds [`OUTBOX_TAG_DEPTH_MAX`] unacknowledged
    /// messages of this message's tag.
    #[error("outbox to {dest} holds its share of {depth} messages of one room: retry later")]
    ShareFull {
        /// The destination.
        dest: NodeId,
        /// Messages of the tag waiting.
        depth: u64,
    },
    /// An acknowledgement names a sequence number that was never sent: the peer is
    /// confused or lying, and nothing is removed.
    #[error("acknowledgement from {dest} up to {upto} but only {sent} were sent")]
    AckBeyondSent {
        /// The destination that acknowledged.
        dest: NodeId,
        /// What it acknowledged.
        upto: u64,
        /// The last sequence number sent to it.
        sent: u64,
    },
    /// No incarnation was recorded for this run (the driver records one at
    /// start, with [`start_incarnation`]).
    #[error("no incarnation recorded for this run of the node")]
    NoIncarnation,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Durably queues `payload` for `dest` and returns its sequence number (from 1).
/// Nothing is queued unless the caller commits `txn`.
pub fn enqueue(txn: &mut dyn WriteTxn, dest: NodeId, payload: Vec<u8>) -> Result<Seq, OutboxError> {
    enqueue_tagged(txn, dest, None, payload)
}

/// [`enqueue`], counting the message against `tag`'s share of the outbox
/// ([`OUTBOX_TAG_DEPTH_MAX`]) until it is acknowledged.
pub fn enqueue_tagged(
    txn: &mut dyn WriteTxn,
    dest: NodeId,
    tag: Option<Tag>,
    payload: Vec<u8>,
) -> Result<Seq, OutboxError> {
    enqueue_within(txn, dest, tag, payload, OUTBOX_DEPTH_MAX)
}

/// [`enqueue`] for a request that lets `dest` drain what it holds for this node:
/// it counts against no tag and may use [`OUTBOX_CONTROL_RESERVE`] past a full
/// outbox.
pub fn enqueue_control(
    txn: &mut dyn WriteTxn,
    dest: NodeId,
    payload: Vec<u8>,
) -> Result<Seq, OutboxError> {
    enqueue_within(txn, dest, None, payload, OUTBOX_HELD_MAX)
}

fn enqueue_within(
    txn: &mut dyn WriteTxn,
    dest: NodeId,
    tag: Option<Tag>,
    payload: Vec<u8>,
    depth_max: u64,
) -> Result<Seq, OutboxError> {
    debug_assert!(depth_max <= OUTBOX_HELD_MAX);
    let mut head = read_head(&*txn, dest)?;
    let depth = head.sent - head.acked;
    if depth >= depth_max {
        return Err(OutboxError::Full { dest, depth });
    }
    head.sent += 1;
    if let Some(tag) = tag {
        let depth = TAG_DEPTHS.get(&*txn, &(dest.0, tag))?.unwrap_or(0);
        if depth >= OUTBOX_TAG_DEPTH_MAX {
            return Err(OutboxError::ShareFull { dest, depth });
        }
        TAG_DEPTHS.put(txn, &(dest.0, tag), &(depth + 1))?;
        TAGS.put(txn, &(dest.0, head.sent), &tag)?;
    }
    MESSAGES.put(txn, &(dest.0, head.sent), &Payload(payload))?;
    HEADS.put(txn, &dest.0, &head)?;
    debug_assert!(head.sent - head.acked <= depth_max);
    Ok(Seq(head.sent))
}

/// The head of `dest`'s outbox, checked after it is read back: nothing can be
/// acknowledged that was not sent, and no more can wait than an outbox holds.
fn read_head(txn: &dyn ReadTxn, dest: NodeId) -> Result<Head, StoreError> {
    let head = HEADS.get(txn, &dest.0)?.unwrap_or_default();
    if head.acked > head.sent || head.sent - head.acked > OUTBOX_HELD_MAX {
        return Err(StoreError::Corrupt {
            table: "outbox.heads".into(),
            reason: format!(
                "outbox to {dest}: acknowledged {} of {} sent",
                head.acked, head.sent
            ),
        });
    }
    Ok(head)
}

/// Removes every message to `dest` up to and including `upto`. Acknowledgements
/// arrive duplicated and out of order: one at or below what is already
/// acknowledged changes nothing. Returns how many messages were removed.
pub fn ack(txn: &mut dyn WriteTxn, dest: NodeId, upto: Seq) -> Result<u64, OutboxError> {
    let mut head = read_head(&*txn, dest)?;
    if upto.0 > head.sent {
        return Err(OutboxError::AckBeyondSent {
            dest,
            upto: upto.0,
            sent: head.sent,
        });
    }
    if upto.0 <= head.acked {
        return Ok(0);
    }
    let removed = upto.0 - head.acked;
    let mut untagged: std::collections::BTreeMap<Tag, u64> = Default::default();
    for seq in head.acked + 1..=upto.0 {
        let existed = MESSAGES.delete(txn, &(dest.0, seq))?;
        debug_assert!(existed, "every unacknowledged message is stored");
        if let Some(tag) = TAGS.get(&*txn, &(dest.0, seq))? {
            TAGS.delete(txn, &(dest.0, seq))?;
            *untagged.entry(tag).or_default() += 1;
        }
    }
    for (tag, n) in untagged {
        let depth = TAG_DEPTHS.get(&*txn, &(dest.0, tag))?.unwrap_or(0);
        match depth.checked_sub(n) {
            Some(0) => TAG_DEPTHS.delete(txn, &(dest.0, tag)).map(|_| ())?,
            Some(left) => TAG_DEPTHS.put(txn, &(dest.0, tag), &left)?,
            None => {
                return Err(OutboxError::Store(StoreError::Corrupt {
                    table: "outbox.tag_depths".into(),
                    reason: format!("outbox to {dest}: {n} acknowledged of a tag counting {depth}"),
                }))
            }
        }
    }
    head.acked = upto.0;
    HEADS.put(txn, &dest.0, &head)?;
    Ok(removed)
}

/// Queued messages as read back: sequence number and encoded message.
pub type Queued = Vec<(Seq, Vec<u8>)>;

/// The first `limit` unacknowledged messages to `dest`, in sequence order: what to
/// (re)send.
pub fn unacked(txn: &dyn ReadTxn, dest: NodeId, limit: usize) -> Result<Queued, OutboxError> {
    unsent(txn, dest, Seq(0), Seq(0), limit)
}

/// Of the first `window` messages to `dest` after `acked`, those after `after`, in
/// sequence order: what an outbox that has sent up to `after` sends next, without
/// reading again what it sent already. `acked` may be ahead of what `txn` holds (an
/// acknowledgement not yet durable still opens the window); it never goes below it.
pub fn unsent(
    txn: &dyn ReadTxn,
    dest: NodeId,
    acked: Seq,
    after: Seq,
    window: usize,
) -> Result<Queued, OutboxError> {
    let head = read_head(txn, dest)?;
    let acked = head.acked.max(acked.0);
    let window = u64::try_from(window).unwrap_or(u64::MAX);
    let first = acked.max(after.0).saturating_add(1);
    let last = head.sent.min(acked.saturating_add(window));
    if first > last {
        return Ok(Vec::new());
    }
    let expected = usize::try_from(last - first + 1).unwrap_or(usize::MAX);
    let entries = MESSAGES.scan(
        txn,
        (dest.0, first)..=(dest.0, last),
        Order::Ascending,
        expected,
    )?;
    // Every unacknowledged message is stored: the scan is the consecutive run from
    // `first`, or the store lost a message.
    let consecutive = entries
        .iter()
        .enumerate()
        .all(|(i, ((_, seq), _))| *seq == first + i as u64);
    if !consecutive || entries.len() != expected {
        return Err(StoreError::Corrupt {
            table: "outbox.messages".into(),
            reason: format!(
                "outbox to {dest} lost messages between {} and {}",
                head.acked, head.sent
            ),
        }
        .into());
    }
    Ok(entries
        .into_iter()
        .map(|((_, seq), Payload(bytes))| (Seq(seq), bytes))
        .collect())
}

/// Acknowledged through where, and how many messages to `dest` wait for
/// acknowledgement.
pub fn progress(txn: &dyn ReadTxn, dest: NodeId) -> Result<(Seq, u64), OutboxError> {
    let head = read_head(txn, dest)?;
    Ok((Seq(head.acked), head.sent - head.acked))
}

/// How many messages to `dest` wait for acknowledgement.
pub fn depth(txn: &dyn ReadTxn, dest: NodeId) -> Result<u64, OutboxError> {
    let head = read_head(txn, dest)?;
    Ok(head.sent - head.acked)
}

/// Whether any outbox or mark was ever written.
pub fn any(txn: &dyn ReadTxn) -> Result<bool, StoreError> {
    Ok(HEADS.first(txn)?.is_some() || MARKS.first(txn)?.is_some())
}

/// Records `drawn` (random, from the driver) as this run's incarnation: every
/// start of a node begins new streams (see the module docs).
pub fn start_incarnation(txn: &mut dyn WriteTxn, drawn: u64) -> Result<(), StoreError> {
    INCARNATION.put(txn, &0, &drawn)
}

/// This run's incarnation; `None` before [`start_incarnation`].
pub fn incarnation(txn: &dyn ReadTxn) -> Result<Option<u64>, StoreError> {
    INCARNATION.get(txn, &0)
}

/// Every destination with messages waiting for acknowledgement, in id order: what a
/// node must resume sending when it starts.
pub fn pending_destinations(txn: &dyn ReadTxn) -> Result<Vec<NodeId>, StoreError> {
    Ok(HEADS
        .scan(txn, .., Order::Ascending, OUTBOX_DESTINATIONS_MAX)?
        .into_iter()
        .filter(|(_, head)| head.sent > head.acked)
        .map(|(dest, _)| NodeId(dest))
        .collect())
}

/// What the receiver should do with an arriving message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arrival {
    /// The next in sequence: it was taken (the high-water mark moved, effective
    /// when the caller commits together with its handling of the message).
    Fresh,
    /// Already taken before: drop it, acknowledge again.
    Duplicate,
    /// A message is missing before it: drop it; the sender resends in order.
    Gap {
        /// The sequence number the receiver waits for.
        expected: Seq,
    },
}

/// Takes message `seq` of `stream` from `origin` if it is the next one, following
/// the stream afresh first if needed ([`follow`]). Commit `txn` together with the
/// message's effects, so that taking it and acting on it are one step.
pub fn accept(
    txn: &mut dyn WriteTxn,
    origin: NodeId,
    stream: Stream,
    seq: Seq,
) -> Result<Arrival, StoreError> {
    let stored = MARKS.get(&*txn, &origin.0)?;
    let (
        Mark {
            incarnation,
            mut high,
        },
        _,
    ) = follow(stored, stream);
    if crate::mutation::active(crate::mutation::Mutation::IgnoreStreams) {
        // Mutation: the stored mark stays, whatever the stream.
        high = stored.map_or(0, |m| m.high);
    }
    if seq.0 <= high {
        return Ok(Arrival::Duplicate);
    }
    if seq.0 != high + 1 {
        return Ok(Arrival::Gap {
            expected: Seq(high + 1),
        });
    }
    let next = Mark {
        incarnation,
        high: seq.0,
    };
    MARKS.put(txn, &origin.0, &next)?;
    Ok(Arrival::Fresh)
}

/// What the receiver has taken from `origin` (`None`: nothing yet).
pub fn mark(txn: &dyn ReadTxn, origin: NodeId) -> Result<Option<Mark>, StoreError> {
    MARKS.get(txn, &origin.0)
}

#[cfg(test)]
mod tests;

//! A Raft group's log and hard state, in the node's store. Every entry is stored
//! with a checksum that is verified when it is read back: a corrupt entry is
//! reported, never served.

use conclave_storage::{Order, ReadTxn, StoreError, Table, WriteTxn};
use prost::Message as _;
use raft::prelude::{Entry, HardState};
use raft::storage::MemStorage;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::mutation::{self, Mutation};

/// The most entries a group's log holds (there is no compaction yet: a group
/// that reaches it refuses proposals; see [`LogError::Full`]).
pub const LOG_ENTRIES_MAX: u64 = 1 << 20;

/// An encoded entry and its checksum.
#[derive(Serialize, Deserialize)]
struct Stored {
    checksum: [u8; 8],
    #[serde(with = "serde_bytes")]
    entry: Vec<u8>,
}

/// Entries, by (group, index).
const ENTRIES: Table<(u64, u64), Stored> = Table::new("raft.entries");
/// Each group's hard state (term, vote, commit), encoded, with its checksum.
const HARD: Table<u64, Stored> = Table::new("raft.hard_state");

/// Why a group's log could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// What was read back is not what was written.
    #[error("raft group {group}: {what} is corrupt")]
    Corrupt {
        /// The group.
        group: u64,
        /// What is corrupt ("entry 12", "the hard state").
        what: String,
    },
    /// The log holds [`LOG_ENTRIES_MAX`] entries.
    #[error("raft group {group}: the log holds {LOG_ENTRIES_MAX} entries")]
    Full {
        /// The group.
        group: u64,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// raft-rs refused what the store held.
    #[error(transparent)]
    Raft(#[from] raft::Error),
}

fn checksum(bytes: &[u8]) -> [u8; 8] {
    let digest = Sha256::digest(bytes);
    let mut sum = [0; 8];
    sum.copy_from_slice(&digest[..8]);
    sum
}

fn seal(bytes: Vec<u8>) -> Stored {
    Stored {
        checksum: checksum(&bytes),
        entry: bytes,
    }
}

fn open(group: u64, stored: &Stored, what: impl Fn() -> String) -> Result<&[u8], LogError> {
    // Broken on purpose under the mutation: what is read is not verified.
    let unchecked = mutation::active(Mutation::RaftSkipChecksum);
    if !unchecked && checksum(&stored.entry) != stored.checksum {
        return Err(LogError::Corrupt {
            group,
            what: what(),
        });
    }
    Ok(&stored.entry)
}

/// Appends `entries` (consecutive) to `group`'s log, replacing any entries from
/// the first one's index on (a follower's conflicting tail).
pub fn append(txn: &mut dyn WriteTxn, group: u64, entries: &[Entry]) -> Result<(), LogError> {
    let Some(first) = entries.first() else {
        return Ok(());
    };
    let last = entries.last().map_or(first.index, |e| e.index);
    if last > LOG_ENTRIES_MAX {
        return Err(LogError::Full { group });
    }
    let tail = ENTRIES.scan(
        &*txn,
        (group, first.index)..=(group, u64::MAX),
        Order::Ascending,
        usize::MAX,
    )?;
    for ((_, index), _) in tail {
        ENTRIES.delete(txn, &(group, index))?;
    }
    for (entry, index) in entries.iter().zip(first.index..) {
        debug_assert_eq!(entry.index, index, "entries are consecutive");
        ENTRIES.put(txn, &(group, index), &seal(entry.encode_to_vec()))?;
    }
    Ok(())
}

/// Records `group`'s hard state.
pub fn set_hard_state(
    txn: &mut dyn WriteTxn,
    group: u64,
    hard: &HardState,
) -> Result<(), LogError> {
    HARD.put(txn, &group, &seal(hard.encode_to_vec()))?;
    Ok(())
}

/// `group`'s log and hard state as stored, every entry verified, in raft-rs's
/// in-memory storage (which the replica reads from and keeps in step with the
/// store); `None` if nothing is stored for the group.
pub fn load(txn: &dyn ReadTxn, group: u64) -> Result<Option<MemStorage>, LogError> {
    let Some(stored) = HARD.get(txn, &group)? else {
        return Ok(None);
    };
    let corrupt = |what: &str| LogError::Corrupt {
        group,
        what: what.to_owned(),
    };
    let hard = open(group, &stored, || "the hard state".to_owned())?;
    let hard = HardState::decode(hard).map_err(|_| corrupt("the hard state"))?;
    let range = (group, 0)..=(group, u64::MAX);
    let rows = ENTRIES.scan(
        txn,
        range,
        Order::Ascending,
        usize::try_from(LOG_ENTRIES_MAX).unwrap_or(usize::MAX),
    )?;
    let mut entries = Vec::with_capacity(rows.len());
    for ((_, index), stored) in &rows {
        let bytes = open(group, stored, || format!("entry {index}"))?;
        let entry = Entry::decode(bytes).map_err(|_| corrupt(&format!("entry {index}")))?;
        // Stored without gaps from 1, each under its own index.
        if entry.index != *index || *index != entries.len() as u64 + 1 {
            return Err(corrupt(&format!("entry {index}")));
        }
        entries.push(entry);
    }
    let memory = MemStorage::new();
    {
        let mut core = memory.wl();
        core.append(&entries)?;
        core.set_hardstate(hard);
    }
    Ok(Some(memory))
}

/// Repairs `group`'s log after [`load`] found it corrupt: keeps the entries
/// before the first one that does not verify, drops it and every later one,
/// lowers the stored commit index to what is kept, and marks the group
/// rejoining, so that it votes again only once a leader has sent it the rest
/// (the entries came from the other replicas, which hold them). A hard state that
/// does not verify takes the whole group with it (term and vote are unknown: the
/// group rejoins as if its disk were new). Returns the first index dropped.
pub fn repair(txn: &mut dyn WriteTxn, group: u64) -> Result<u64, LogError> {
    let hard = match hard_state(&*txn, group) {
        Ok(hard) => Some(hard),
        Err(LogError::Corrupt { .. }) => None,
        Err(other) => return Err(other),
    };
    let rows = ENTRIES.scan(
        &*txn,
        (group, 0)..=(group, u64::MAX),
        Order::Ascending,
        usize::try_from(LOG_ENTRIES_MAX).unwrap_or(usize::MAX),
    )?;
    let mut kept = 0;
    if hard.is_some() {
        for ((_, index), stored) in &rows {
            let sound = open(group, stored, String::new).is_ok_and(|bytes| {
                Entry::decode(bytes).is_ok_and(|e| e.index == *index && *index == kept + 1)
            });
            if !sound {
                break;
            }
            kept = *index;
        }
    }
    for ((_, index), _) in rows.iter().filter(|((_, index), _)| *index > kept) {
        ENTRIES.delete(txn, &(group, *index))?;
    }
    let mut hard = hard.unwrap_or_default();
    hard.commit = hard.commit.min(kept);
    set_hard_state(txn, group, &hard)?;
    REJOINING.put(txn, &group, &0)?;
    Ok(kept + 1)
}

/// Flips one bit of `group`'s stored entry at `index`, as a failing disk would
/// (for the simulator's faults). Returns whether there was such an entry.
pub fn flip_bit(
    txn: &mut dyn WriteTxn,
    group: u64,
    index: u64,
    bit: u32,
) -> Result<bool, LogError> {
    let Some(mut stored) = ENTRIES.get(&*txn, &(group, index))? else {
        return Ok(false);
    };
    let Some(len) = u32::try_from(stored.entry.len()).ok().filter(|&l| l > 0) else {
        return Ok(false);
    };
    let bit = bit % (len * 8);
    stored.entry[(bit / 8) as usize] ^= 1 << (bit % 8);
    ENTRIES.put(txn, &(group, index), &stored)?;
    Ok(true)
}

/// What a replica has applied of its group's log: the last index, its term, and
/// a hash chain over every applied entry (`chain = SHA-256(chain ‖ index ‖ term ‖
/// data)`), so that replicas that applied the same entries hold the same chain.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    /// The last applied index (0: nothing yet).
    pub index: u64,
    /// Its term.
    pub term: u64,
    /// The chain up to it.
    pub chain: [u8; 32],
}

impl Applied {
    /// The chain after `entry`.
    pub fn next(&self, entry: &Entry) -> Applied {
        let mut hash = Sha256::new();
        hash.update(self.chain);
        hash.update(entry.index.to_le_bytes());
        hash.update(entry.term.to_le_bytes());
        hash.update(&entry.data);
        Applied {
            index: entry.index,
            term: entry.term,
            chain: hash.finalize().into(),
        }
    }
}

/// What each group has applied.
const APPLIED: Table<u64, Applied> = Table::new("raft.applied");

/// Groups this node replicates but must not vote or campaign in until it has
/// caught up (its store was lost: it may have voted, or held entries, that it no
/// longer remembers), with the commit index it must reach (0: no leader heard yet).
const REJOINING: Table<u64, u64> = Table::new("raft.rejoining");

/// What `group` has applied.
pub fn applied(txn: &dyn ReadTxn, group: u64) -> Result<Applied, LogError> {
    Ok(APPLIED.get(txn, &group)?.unwrap_or_default())
}

/// Applies `entries` (committed, in order) to `group`'s chain; entries applied
/// already (at or below the chain's index) are skipped.
pub fn apply(txn: &mut dyn WriteTxn, group: u64, entries: &[Entry]) -> Result<Applied, LogError> {
    let mut applied = applied(&*txn, group)?;
    let from = applied.index;
    for entry in entries.iter().filter(|e| e.index > from) {
        if entry.index != applied.index + 1 {
            return Err(LogError::Corrupt {
                group,
                what: format!("entry {} applied after {}", entry.index, applied.index),
            });
        }
        applied = applied.next(entry);
    }
    APPLIED.put(txn, &group, &applied)?;
    Ok(applied)
}

/// `group`'s hard state as stored (default if none).
pub fn hard_state(txn: &dyn ReadTxn, group: u64) -> Result<HardState, LogError> {
    let Some(stored) = HARD.get(txn, &group)? else {
        return Ok(HardState::default());
    };
    let bytes = open(group, &stored, || "the hard state".to_owned())?;
    HardState::decode(bytes).map_err(|_| LogError::Corrupt {
        group,
        what: "the hard state".to_owned(),
    })
}

/// The index of `group`'s last stored entry (0: none); its bytes are not
/// read, so an entry that no longer verifies still counts.
pub fn last_index(txn: &dyn ReadTxn, group: u64) -> Result<u64, LogError> {
    let range = (group, 0)..=(group, u64::MAX);
    let last = ENTRIES.scan(txn, range, Order::Descending, 1)?;
    Ok(last.first().map_or(0, |((_, index), _)| *index))
}

/// `group`'s stored entry at `index`, verified.
pub fn entry(txn: &dyn ReadTxn, group: u64, index: u64) -> Result<Option<Entry>, LogError> {
    let Some(stored) = ENTRIES.get(txn, &(group, index))? else {
        return Ok(None);
    };
    let bytes = open(group, &stored, || format!("entry {index}"))?;
    let entry = Entry::decode(bytes).map_err(|_| LogError::Corrupt {
        group,
        what: format!("entry {index}"),
    })?;
    Ok(Some(entry))
}

/// Marks `groups` as rejoining (see [`REJOINING`]).
pub fn begin_rejoin(
    txn: &mut dyn WriteTxn,
    groups: impl IntoIterator<Item = u64>,
) -> Result<(), LogError> {
    for group in groups {
        REJOINING.put(txn, &group, &0)?;
    }
    Ok(())
}

/// The commit index `group` must reach before it votes again, if it is
/// rejoining (0: no leader heard yet).
pub fn rejoining(txn: &dyn ReadTxn, group: u64) -> Result<Option<u64>, LogError> {
    Ok(REJOINING.get(txn, &group)?)
}

/// Records the commit index `group` must reach (`None`: it has caught up).
pub fn set_rejoining(
    txn: &mut dyn WriteTxn,
    group: u64,
    target: Option<u64>,
) -> Result<(), LogError> {
    match target {
        Some(target) => REJOINING.put(txn, &group, &target)?,
        None => {
            REJOINING.delete(txn, &group)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use conclave_storage::{MemStore, Store};

    use super::*;

    fn entry(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            data: vec![index as u8; 3],
            ..Entry::default()
        }
    }

    #[test]
    fn a_log_reads_back_as_written_and_a_conflicting_tail_is_replaced() {
        let store = MemStore::new();
        let mut txn = store.write().unwrap();
        append(&mut *txn, 7, &[entry(1, 1), entry(2, 1), entry(3, 1)]).unwrap();
        append(&mut *txn, 7, &[entry(2, 2)]).unwrap();
        let hard = HardState {
            term: 2,
            vote: 3,
            commit: 1,
        };
        set_hard_state(&mut *txn, 7, &hard).unwrap();
        txn.commit().unwrap();
        let txn = store.read().unwrap();
        let memory = load(&*txn, 7).unwrap().expect("stored");
        let core = memory.rl();
        assert_eq!(core.hard_state(), &hard);
        use raft::Storage as _;
        assert_eq!(memory.last_index().unwrap(), 2);
        assert_eq!(memory.term(2).unwrap(), 2);
        drop(core);
        assert!(
            load(&*txn, 8).unwrap().is_none(),
            "another group holds nothing"
        );
    }

    #[test]
    fn a_repair_keeps_what_verifies_drops_the_rest_and_rejoins() {
        let store = MemStore::new();
        let mut txn = store.write().unwrap();
        append(&mut *txn, 1, &[entry(1, 1), entry(2, 1), entry(3, 1)]).unwrap();
        let hard = HardState {
            term: 1,
            vote: 2,
            commit: 3,
        };
        set_hard_state(&mut *txn, 1, &hard).unwrap();
        assert!(flip_bit(&mut *txn, 1, 2, 13).unwrap());
        assert_eq!(
            last_index(&*txn, 1).unwrap(),
            3,
            "a flipped entry still counts"
        );
        assert!(load(&*txn, 1).is_err(), "entry 2 no longer verifies");
        assert_eq!(repair(&mut *txn, 1).unwrap(), 2, "dropped from entry 2");
        let memory = load(&*txn, 1).unwrap().expect("stored");
        use raft::Storage as _;
        assert_eq!(memory.last_index().unwrap(), 1);
        assert_eq!(last_index(&*txn, 1).unwrap(), 1);
        let repaired = hard_state(&*txn, 1).unwrap();
        assert_eq!((repaired.term, repaired.vote, repaired.commit), (1, 2, 1));
        assert_eq!(rejoining(&*txn, 1).unwrap(), Some(0));
    }

    #[test]
    fn a_corrupt_entry_is_reported_not_served() {
        let store = MemStore::new();
        let mut txn = store.write().unwrap();
        append(&mut *txn, 1, &[entry(1, 1), entry(2, 1)]).unwrap();
        set_hard_state(&mut *txn, 1, &HardState::default()).unwrap();
        // A bit flips in entry 2 on the disk.
        let mut stored = ENTRIES.get(&*txn, &(1, 2)).unwrap().unwrap();
        stored.entry[0] ^= 1;
        ENTRIES.put(&mut *txn, &(1, 2), &stored).unwrap();
        txn.commit().unwrap();
        let Err(error) = load(&*store.read().unwrap(), 1) else {
            panic!("a corrupt entry was served");
        };
        assert!(
            matches!(&error, LogError::Corrupt { what, .. } if what == "entry 2"),
            "{error}"
        );
    }
}

//! A Raft group's log and hard state, in the node's store. Every entry is stored
//! with a checksum that is verified when it is read back: a corrupt entry is
//! reported, never served.

use conclave_storage::{Order, ReadTxn, StoreError, Table, WriteTxn};
use prost::Message as _;
use raft::prelude::{Entry, HardState};
use raft::storage::MemStorage;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

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
    if checksum(&stored.entry) != stored.checksum {
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

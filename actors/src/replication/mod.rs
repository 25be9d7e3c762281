//! Replication on Raft (issue 15, in progress): raft-rs's `RawNode` driven
//! sans-IO, every group a node replicates hosted in one actor.
//!
//! raft-rs (`RawNode`) decides; this module feeds it ticks and messages, writes
//! what it must persist (entries, hard state) into the driver's write
//! transaction and hands back the messages to send and the committed entries to
//! apply. The messages leave only after that transaction committed (the driver
//! releases effects after the group commit), which satisfies raft-rs's rule that
//! messages of a `Ready` be sent only after its entries and hard state are
//! durable. raft-rs draws an election timeout (in 10..20 ticks) from the OS at
//! every change of term or role; the replica replaces it at once with one drawn
//! from the actor's `cx.rng()`, so a seed decides every timeout in force.
//!
//! - [`layout`]: the groups (one meta group, a fixed number of shards), which
//!   nodes replicate each, and the messages between replicas actors. Compiled in
//!   every build.
//! - `log`, `replica`, `host` (feature `replication`): the stored log, one
//!   replica, and the actor hosting a node's replicas.
//!
//! Not yet here (the next steps of the issue): rooms and the user registry on
//! the groups, log compaction and snapshots, membership changes, nodes outside
//! the simulator running the groups.

#[cfg(feature = "replication")]
pub mod host;
pub mod layout;
#[cfg(feature = "replication")]
pub mod log;
#[cfg(feature = "replication")]
pub mod replica;

pub use layout::{Packet, ProposalId, ReplicasMsg, Replication, ReplicationStatus, META_GROUP};
#[cfg(feature = "replication")]
pub use log::LogError;
#[cfg(feature = "replication")]
pub use replica::{Output, Replica, ReplicaError};

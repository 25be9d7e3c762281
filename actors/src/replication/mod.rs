//! Replication, its first step (issue 15): one Raft group driven sans-IO.
//!
//! raft-rs (`RawNode`) decides; this module feeds it ticks and messages, writes
//! what it must persist (entries, hard state) into the caller's write transaction
//! and hands back the messages to send and the committed entries to apply. The
//! caller sends the messages only after that transaction committed (the driver
//! releases effects after the group commit), which satisfies raft-rs's rule that
//! messages of a `Ready` be sent only after its entries and hard state are
//! durable. Nothing here reads a clock or the OS's randomness: raft-rs draws an
//! election timeout from `[min_election_tick, max_election_tick)`, and a replica is
//! given a range of one value, drawn by its caller from a seeded rng.
//!
//! Not yet here (the next steps of the issue): hosting a group in an actor, the
//! wire messages between replicas, log compaction and snapshots, membership
//! changes, shards of rooms, and the simulator's Raft oracles.

pub mod log;
pub mod replica;

pub use log::LogError;
pub use replica::{Output, Replica, ReplicaError};

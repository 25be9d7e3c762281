//! Deliberately broken variants of the domain actors, for the simulator to prove
//! that its oracles catch real bugs ("an oracle that catches nothing proves
//! nothing").
//!
//! Only builds with the `mutations` cargo feature (off by default, never enabled by
//! the runtime) can switch one on, with [`set`]; without the feature [`active`] is a
//! constant `false` and every mutated branch compiles away, so production behaviour
//! is unchanged. The switch is per thread: the simulator is single-threaded and runs
//! one seed at a time.

/// A deliberately broken variant of the domain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Mutation {
    /// The receiving peer hands duplicates (resends of messages it handed over
    /// already) to their target again, and a member node's room neither checks
    /// whether it holds a frame's sequence number already nor skips a membership
    /// snapshot older than the one it applied.
    SkipReceiverDedup,
    /// The receiving peer records its high-water mark and acknowledges a message
    /// when it hands it over, before the target has committed it.
    AckBeforePersist,
    /// A room's home sequences frames of an epoch other than the current one (so a
    /// removed member's key still opens frames sent after the removal).
    AcceptStaleEpoch,
    /// A room's home keeps fanning frames out to the nodes of removed members.
    FanoutToRemoved,
    /// An outbox sends each message once and never resends what was not
    /// acknowledged.
    DropOutboxRetries,
    /// A room's home keeps its next sequence number in memory and does not persist
    /// it with the frame, so after a restart it hands out committed numbers again.
    VolatileSequence,
    /// A room's home sends every remaining member node the whole rekey bundle
    /// instead of the keys of its own users (which the node then refuses).
    BundleUnsplit,
    /// The receiving peer, which hands messages to different rooms in parallel,
    /// gives a room that becomes free its newest waiting message instead of its
    /// oldest: one room's messages (its membership snapshot, its keys, its frames)
    /// are then applied out of order.
    PipelinedHandoff,
    /// A client takes every sealed key that opens for it, without asking the
    /// room's verified membership chain whether the epoch exists, the sealer was
    /// authorized and the key is the one the chain pins: a node that seals a key
    /// of its own to a member then reads what they send.
    AcceptUnauthorizedKey,
    /// The simulator's driver releases what a message sends as soon as it is
    /// handled, before the batch holding its writes is committed: a crash then
    /// takes back state that other nodes (or clients) were already told about.
    ReleaseBeforeCommit,
    /// An outbox reads what to send from the batch in progress instead of its
    /// durable part, and still sends it at once: a crash before the commit then
    /// takes back a message the destination has already applied, and its sequence
    /// number is handed out again to another.
    OutboxSendsUncommitted,
    /// The receiving peer ignores the stream a delivery carries (its sender's
    /// incarnation and first held message): it keeps the mark it has, and on an
    /// empty store starts from nothing taken, so a node back with an empty disk
    /// waits for ever for messages its senders no longer hold.
    IgnoreStreams,
    /// A room's home answers a forwarded request or frame only directly, best
    /// effort, and queues nothing for the node that forwarded it: a refusal (or a
    /// membership change's outcome) decided while that node is unreachable, or
    /// after its caller stopped waiting, is never reported.
    VolatileReplies,
    /// A new member node's pull of the history does not end at the removal of
    /// its last member: it goes on to the room's head, so the node is sent frames
    /// sequenced after its users left.
    HistoryPastRemoval,
    /// A room's home sends live frames to a member node still catching up on
    /// the history, so they arrive before frames they follow.
    LiveBeforeCaughtUp,
    /// A node forwards a user's publish to the room's home without checking that
    /// the user is a member there: anyone's frames take places in outboxes every
    /// room shares.
    ForwardNonMembers,
    /// A node takes every publish without the user's quota.
    SkipQuota,
    /// A Raft replica keeps its term and vote in memory only: after a crash it
    /// may vote a second time in a term, so that two leaders are elected in it.
    RaftVoteUnpersisted,
    /// A Raft replica applies entries as soon as it appends them, before they
    /// are committed (and a leader change may then replace them).
    RaftApplyUncommitted,
    /// A Raft replica back with an empty disk votes and campaigns at once,
    /// though it may have voted in the current term, or acknowledged entries,
    /// before it lost them.
    RaftRejoinVotes,
    /// A Raft log is read back without checking its entries' checksums: a
    /// flipped bit is served as if it were the entry.
    RaftSkipChecksum,
    /// A node acknowledges a proposal as soon as a leader appended it to its
    /// own log, before a quorum holds it: a leader change can then replace it.
    RaftAckBeforeCommit,
    /// A node proposes each room command it owes once: one whose proposal was
    /// lost (a leader changed, the node restarted) is never proposed again.
    ShardForgetsOwed,
    /// A node refuses a room command `no_quorum` when it finds no leader, even
    /// one it proposed before, which may still commit.
    ShardRefusesProposed,
    /// A shard replica decides a room's command with its own registry, not with
    /// the records of the proposing node's users the entry carries: replicas
    /// of one log then decide differently.
    ShardOwnRegistry,
}

impl Mutation {
    /// Every mutation, in a fixed order.
    pub const ALL: [Mutation; 25] = [
        Mutation::SkipReceiverDedup,
        Mutation::AckBeforePersist,
        Mutation::AcceptStaleEpoch,
        Mutation::FanoutToRemoved,
        Mutation::DropOutboxRetries,
        Mutation::VolatileSequence,
        Mutation::BundleUnsplit,
        Mutation::PipelinedHandoff,
        Mutation::AcceptUnauthorizedKey,
        Mutation::ReleaseBeforeCommit,
        Mutation::OutboxSendsUncommitted,
        Mutation::IgnoreStreams,
        Mutation::VolatileReplies,
        Mutation::HistoryPastRemoval,
        Mutation::LiveBeforeCaughtUp,
        Mutation::ForwardNonMembers,
        Mutation::SkipQuota,
        Mutation::RaftVoteUnpersisted,
        Mutation::RaftApplyUncommitted,
        Mutation::RaftRejoinVotes,
        Mutation::RaftSkipChecksum,
        Mutation::RaftAckBeforeCommit,
        Mutation::ShardForgetsOwed,
        Mutation::ShardRefusesProposed,
        Mutation::ShardOwnRegistry,
    ];

    /// Its name on the command line (`skip_receiver_dedup`, …).
    pub const fn name(self) -> &'static str {
        match self {
            Mutation::SkipReceiverDedup => "skip_receiver_dedup",
            Mutation::AckBeforePersist => "ack_before_persist",
            Mutation::AcceptStaleEpoch => "accept_stale_epoch",
            Mutation::FanoutToRemoved => "fanout_to_removed",
            Mutation::DropOutboxRetries => "drop_outbox_retries",
            Mutation::VolatileSequence => "volatile_sequence",
            Mutation::BundleUnsplit => "bundle_unsplit",
            Mutation::PipelinedHandoff => "pipelined_handoff",
            Mutation::AcceptUnauthorizedKey => "accept_unauthorized_key",
            Mutation::ReleaseBeforeCommit => "release_before_commit",
            Mutation::OutboxSendsUncommitted => "outbox_sends_uncommitted",
            Mutation::IgnoreStreams => "ignore_streams",
            Mutation::VolatileReplies => "volatile_replies",
            Mutation::HistoryPastRemoval => "history_past_removal",
            Mutation::LiveBeforeCaughtUp => "live_before_caught_up",
            Mutation::ForwardNonMembers => "forward_non_members",
            Mutation::SkipQuota => "skip_quota",
            Mutation::RaftVoteUnpersisted => "raft_vote_unpersisted",
            Mutation::RaftApplyUncommitted => "raft_apply_uncommitted",
            Mutation::RaftRejoinVotes => "raft_rejoin_votes",
            Mutation::RaftSkipChecksum => "raft_skip_checksum",
            Mutation::RaftAckBeforeCommit => "raft_ack_before_commit",
            Mutation::ShardForgetsOwed => "shard_forgets_owed",
            Mutation::ShardRefusesProposed => "shard_refuses_proposed",
            Mutation::ShardOwnRegistry => "shard_own_registry",
        }
    }

    /// The mutation named `name`.
    pub fn from_name(name: &str) -> Option<Mutation> {
        Mutation::ALL.into_iter().find(|m| m.name() == name)
    }
}

#[cfg(feature = "mutations")]
thread_local! {
    static ACTIVE: core::cell::Cell<Option<Mutation>> = const { core::cell::Cell::new(None) };
}

/// Switches `mutation` on for this thread (`None`: the correct actors).
#[cfg(feature = "mutations")]
pub fn set(mutation: Option<Mutation>) {
    ACTIVE.with(|a| a.set(mutation));
}

/// Whether this build can switch mutations on at all.
pub const fn available() -> bool {
    cfg!(feature = "mutations")
}

/// Whether `mutation` is on.
#[cfg(feature = "mutations")]
#[inline]
pub fn active(mutation: Mutation) -> bool {
    ACTIVE.with(|a| a.get() == Some(mutation))
}

/// Whether `mutation` is on: never, in a build without the `mutations` feature. A
/// constant, so every mutated branch is dead code the compiler removes.
#[cfg(not(feature = "mutations"))]
#[inline(always)]
pub const fn active(_mutation: Mutation) -> bool {
    false
}

//! One replica of one Raft group: raft-rs's `RawNode` over the group's stored
//! log, driven by its caller (see the module docs of [`super`]).

use conclave_storage::{ReadTxn, WriteTxn};
use raft::prelude::{Entry, EntryType, Message, MessageType};
use raft::storage::MemStorage;
use raft::{Config, RawNode, StateRole};
use rand_core::CryptoRng;

use super::layout::{HEARTBEAT_TICKS, PROPOSAL_BYTES_MAX};
use super::log::{self, LogError};
use crate::mutation::{self, Mutation};

/// The most bytes of entries one append message carries (one entry alone may
/// pass it, up to [`PROPOSAL_BYTES_MAX`]).
const APPEND_BYTES_MAX: u64 = 256 * 1024;

/// The most append messages a leader has in flight to one follower.
const INFLIGHT_APPENDS_MAX: usize = 64;

/// The range an election timeout is drawn from, in ticks (five heartbeats at
/// least, so that a leader's heartbeats keep followers quiet). raft-rs draws a
/// new one from the OS at every change of term or role; the replica replaces it
/// at once with one drawn from its caller's seeded rng (see
/// [`Replica::redraw_timeout`]), so that candidates that collided once do not
/// collide for ever and a seed still decides everything.
pub const ELECTION_TICKS: core::ops::Range<usize> = 10..20;

/// The most `Ready` rounds one [`Replica::drive`] handles (what is left waits for
/// the next call).
const READY_ROUNDS_MAX: usize = 8;

/// Why a replica could not go on.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    /// Its log or hard state could not be read or written.
    #[error(transparent)]
    Log(#[from] LogError),
    /// raft-rs refused (a message of another group, a proposal while no leader
    /// is known, …).
    #[error(transparent)]
    Raft(#[from] raft::Error),
    /// Something this first step does not do yet (snapshots, membership changes).
    #[error("not supported yet: {0}")]
    Unsupported(&'static str),
}

/// raft-rs logs through slog: its lines go on to `tracing`, under this module's
/// target (so a node's rate limit of the actors' lines covers them). Its info
/// lines (elections, terms) are debug here: a node runs many groups.
struct ToTracing;

impl slog::Drain for ToTracing {
    type Ok = ();
    type Err = slog::Never;

    fn log(&self, record: &slog::Record<'_>, _: &slog::OwnedKVList) -> Result<(), slog::Never> {
        let message = record.msg();
        match record.level() {
            slog::Level::Critical | slog::Level::Error => tracing::error!("raft: {message}"),
            slog::Level::Warning => tracing::warn!("raft: {message}"),
            slog::Level::Info => tracing::debug!("raft: {message}"),
            slog::Level::Debug | slog::Level::Trace => tracing::trace!("raft: {message}"),
        }
        Ok(())
    }
}

/// What one [`Replica::drive`] produced: messages to send once the caller's
/// transaction is committed, and committed entries to apply, in order.
#[derive(Debug, Default)]
pub struct Output {
    /// To the other replicas.
    pub messages: Vec<Message>,
    /// Committed, not yet applied (leaders' empty entries included).
    pub committed: Vec<Entry>,
    /// Appended to this replica's log, committed or not (only under the
    /// `raft_ack_before_commit` mutation; empty otherwise).
    pub appended: Vec<Entry>,
}

/// One replica: its `RawNode` and the in-memory view of its log that raft-rs
/// reads, kept in step with the store.
pub struct Replica {
    group: u64,
    node: RawNode<MemStorage>,
    memory: MemStorage,
    /// The term and role its election timeout was last drawn for.
    drawn_for: (u64, StateRole),
}

impl Replica {
    /// Opens replica `id` of `group` from what `txn` holds; a group with nothing
    /// stored starts with `voters` (the same on every replica). Its election
    /// timeouts are drawn from `rng`.
    pub fn open(
        txn: &dyn ReadTxn,
        group: u64,
        id: u64,
        voters: &[u64],
        rng: &mut dyn CryptoRng,
    ) -> Result<Self, ReplicaError> {
        let memory = match log::load(txn, group)? {
            Some(memory) => memory,
            None => MemStorage::new(),
        };
        memory
            .wl()
            .set_conf_state(raft::prelude::ConfState::from((voters.to_vec(), vec![])));
        let config = Config {
            id,
            election_tick: ELECTION_TICKS.start,
            heartbeat_tick: HEARTBEAT_TICKS,
            min_election_tick: ELECTION_TICKS.start,
            max_election_tick: ELECTION_TICKS.end,
            pre_vote: true,
            check_quorum: true,
            // Committed entries are applied in the transaction that learns of
            // them, so on a restart none is applied twice.
            applied: memory.rl().hard_state().commit,
            max_size_per_msg: APPEND_BYTES_MAX,
            max_inflight_msgs: INFLIGHT_APPENDS_MAX,
            ..Config::default()
        };
        let logger = slog::Logger::root(ToTracing, slog::o!("group" => group));
        let node = RawNode::new(&config, memory.clone(), &logger)?;
        let mut replica = Replica {
            group,
            node,
            memory,
            drawn_for: (0, StateRole::Follower),
        };
        replica.draw_timeout(rng);
        Ok(replica)
    }

    /// Replaces the election timeout raft-rs drew (from the OS) when the term
    /// or role changed since the last draw; call it after every
    /// [`Replica::tick`] and [`Replica::step`]. raft-rs draws at every change of
    /// term or role and only then, so the timeout in force is always one drawn
    /// from `rng`.
    pub fn redraw_timeout(&mut self, rng: &mut dyn CryptoRng) {
        let now = (self.node.raft.term, self.node.raft.state);
        if now != self.drawn_for {
            self.draw_timeout(rng);
        }
    }

    fn draw_timeout(&mut self, rng: &mut dyn CryptoRng) {
        let span = (ELECTION_TICKS.end - ELECTION_TICKS.start) as u64;
        let ticks = ELECTION_TICKS.start + (rng.next_u64() % span) as usize;
        self.node.raft.set_randomized_election_timeout(ticks);
        self.drawn_for = (self.node.raft.term, self.node.raft.state);
    }

    /// One tick of its clock (the caller's timer).
    pub fn tick(&mut self) {
        self.node.tick();
    }

    /// A message from another replica of the group. A heartbeat's commit index
    /// is cut to this replica's last index: raft-rs panics on one beyond it,
    /// which only a replica that lost its log (or a node that lies) would see.
    /// Snapshots are refused (none is ever sent yet).
    pub fn step(&mut self, mut message: Message) -> Result<(), ReplicaError> {
        use MessageType::*;
        match message.msg_type() {
            MsgHeartbeat => message.commit = message.commit.min(self.last_index()),
            // A request for a snapshot is no concern of ours (none is sent).
            MsgAppendResponse => message.request_snapshot = raft::INVALID_INDEX,
            MsgAppend => self.check_append(&message)?,
            MsgPropose if message.entries.is_empty() => {
                return Err(ReplicaError::Unsupported("an empty proposal"))
            }
            MsgPropose => check_entries(&message.entries)?,
            MsgRequestVote
            | MsgRequestVoteResponse
            | MsgRequestPreVote
            | MsgRequestPreVoteResponse
            | MsgHeartbeatResponse => {}
            // A leader handing its group over (see `hand_over`): only from the
            // leader this replica follows, in its term.
            MsgTimeoutNow if self.leader() == Some(message.from) && message.term == self.term() => {
            }
            // Snapshots, other leadership transfers, read index and the local kinds:
            // nothing this node takes from another yet.
            _ => return Err(ReplicaError::Unsupported("this kind of message")),
        }
        Ok(self.node.step(message)?)
    }

    /// An append raft-rs can take without panicking: its entries follow its
    /// index one by one, are normal entries of bounded size, and none it
    /// carries for an index this replica holds committed has another term.
    fn check_append(&self, message: &Message) -> Result<(), ReplicaError> {
        check_entries(&message.entries)?;
        let unfit = ReplicaError::Unsupported("an append that does not fit the log");
        // raft-rs reads the term of an index past the log as 0: a previous
        // entry of term 0, or entries of term 0, would "match" what this
        // replica does not hold, and it would commit past its log (a panic).
        if message.index > 0 && message.log_term == 0 {
            return Err(unfit);
        }
        let first = message.index.checked_add(1).ok_or(unfit)?;
        let log = &self.node.raft.raft_log;
        for (entry, index) in message.entries.iter().zip(first..) {
            let conflicts = index <= log.committed && log.term(index).ok() != Some(entry.term);
            let term_ok = entry.term > 0 && entry.term <= message.term;
            if entry.index != index || conflicts || !term_ok {
                return Err(ReplicaError::Unsupported(
                    "an append that does not fit the log",
                ));
            }
        }
        Ok(())
    }

    /// As leader: hands the group over to replica `to` if `to` holds its whole
    /// log and no hand-over is under way (raft-rs then tells `to` to start an
    /// election at once). Returns whether it started one.
    pub fn hand_over(&mut self, to: u64) -> bool {
        let raft = &self.node.raft;
        // Caught up and taking appends as they come. (Not `recent_active`:
        // check_quorum clears it every election timeout, in step with this
        // check.) A hand-over to a replica that went down meanwhile fails after
        // an election timeout, and is not tried again in the term.
        let caught_up = raft.prs().get(to).is_some_and(|p| {
            p.matched == raft.raft_log.last_index() && p.state == raft::ProgressState::Replicate
        });
        let started =
            self.is_leader() && to != raft.id && raft.lead_transferee.is_none() && caught_up;
        if started {
            self.node.transfer_leader(to);
        }
        started
    }

    /// Whether raft-rs has anything to persist, send or apply.
    pub fn has_ready(&self) -> bool {
        self.node.has_ready()
    }

    /// As leader: whether replica `id` holds its whole log.
    pub fn holds_whole_log(&self, id: u64) -> bool {
        let raft = &self.node.raft;
        self.is_leader()
            && raft
                .prs()
                .get(id)
                .is_some_and(|p| p.matched == raft.raft_log.last_index())
    }

    /// As leader: how many entries of its log the furthest-behind voter lacks
    /// (0 otherwise).
    pub fn lag(&self) -> u64 {
        let raft = &self.node.raft;
        if !self.is_leader() {
            return 0;
        }
        let last = raft.raft_log.last_index();
        let matched = raft.prs().iter().map(|(_, p)| p.matched);
        matched.map(|m| last.saturating_sub(m)).max().unwrap_or(0)
    }

    /// The index of the last entry of its log.
    pub fn last_index(&self) -> u64 {
        self.node.raft.raft_log.last_index()
    }

    /// As leader: forgets what replica `id` acknowledged (it lost its store), so
    /// that it is sent the log again from the start. Returns whether it leads.
    pub fn reset_follower(&mut self, id: u64) -> bool {
        if !self.is_leader() || id == self.node.raft.id {
            return false;
        }
        if let Some(progress) = self.node.raft.mut_prs().get_mut(id) {
            progress.matched = 0;
            progress.become_probe();
        }
        true
    }

    /// Proposes `data`, with `context` kept beside it in the entry (forwarded
    /// to the leader by a follower that knows one; refused when no leader is
    /// known or `data` is too large).
    pub fn propose(&mut self, context: Vec<u8>, data: Vec<u8>) -> Result<(), ReplicaError> {
        if data.len() > PROPOSAL_BYTES_MAX {
            return Err(ReplicaError::Raft(raft::Error::ProposalDropped));
        }
        if self.last_index() >= log::LOG_ENTRIES_MAX {
            return Err(ReplicaError::Log(LogError::Full { group: self.group }));
        }
        Ok(self.node.propose(context, data)?)
    }

    /// The highest index it knows committed.
    pub fn commit(&self) -> u64 {
        self.node.raft.raft_log.committed
    }

    /// Records a vote for the leader it follows, if it has none in this term: a
    /// replica back with an empty store may have voted in this term before, for
    /// this leader or for a loser; recording the leader keeps it from giving a
    /// second vote in the term.
    pub fn vote_for_leader(&mut self) {
        let raft = &mut self.node.raft;
        if raft.vote == raft::INVALID_ID && raft.leader_id != raft::INVALID_ID {
            raft.vote = raft.leader_id;
        }
    }

    /// The leader this replica knows of, if any.
    pub fn leader(&self) -> Option<u64> {
        let leader = self.node.raft.leader_id;
        (leader != raft::INVALID_ID).then_some(leader)
    }

    /// Whether it leads.
    pub fn is_leader(&self) -> bool {
        self.node.raft.state == StateRole::Leader
    }

    /// Its current term.
    pub fn term(&self) -> u64 {
        self.node.raft.term
    }

    /// Persists what raft-rs has ready into `txn` and returns what to send and
    /// apply. The caller applies the committed entries in `txn` and sends the
    /// messages only once `txn` is committed. After an error the replica's memory
    /// is ahead of its store: drop it, and the transaction, and open it again.
    pub fn drive(&mut self, txn: &mut dyn WriteTxn) -> Result<Output, ReplicaError> {
        let mut out = Output::default();
        // Advancing can make more ready (a commit learned while persisting);
        // raft-rs settles within a few rounds.
        for _ in 0..READY_ROUNDS_MAX {
            if !self.node.has_ready() {
                return Ok(out);
            }
            self.drive_once(txn, &mut out)?;
        }
        debug_assert!(
            !self.node.has_ready(),
            "raft-rs settles within {READY_ROUNDS_MAX} rounds"
        );
        Ok(out)
    }

    fn drive_once(&mut self, txn: &mut dyn WriteTxn, out: &mut Output) -> Result<(), ReplicaError> {
        let mut ready = self.node.ready();
        if !ready.snapshot().is_empty() {
            return Err(ReplicaError::Unsupported("snapshots"));
        }
        out.messages.extend(ready.take_messages());
        if mutation::active(Mutation::RaftApplyUncommitted) {
            // Broken on purpose: what is appended is applied at once, committed
            // or not (and what commits later is not applied again).
            out.committed.extend(ready.entries().iter().cloned());
            let _ = ready.take_committed_entries();
        } else {
            out.committed.extend(ready.take_committed_entries());
        }
        if mutation::active(Mutation::RaftAckBeforeCommit) {
            out.appended.extend(ready.entries().iter().cloned());
        }
        log::append(txn, self.group, ready.entries())?;
        self.memory.wl().append(ready.entries())?;
        if let Some(hard) = ready.hs() {
            persist_hard_state(txn, self.group, hard)?;
            self.memory.wl().set_hardstate(hard.clone());
        }
        out.messages.extend(ready.take_persisted_messages());
        let mut light = self.node.advance(ready);
        if let Some(commit) = light.commit_index() {
            let mut core = self.memory.wl();
            core.mut_hard_state().commit = commit;
            persist_hard_state(txn, self.group, core.hard_state())?;
        }
        out.messages.extend(light.take_messages());
        let committed = light.take_committed_entries();
        if !mutation::active(Mutation::RaftApplyUncommitted) {
            out.committed.extend(committed);
        }
        if out
            .committed
            .iter()
            .any(|e| e.entry_type() != EntryType::EntryNormal)
        {
            return Err(ReplicaError::Unsupported("membership changes"));
        }
        self.node.advance_apply();
        Ok(())
    }
}

/// Entries another node may hand this one: normal (membership changes are not
/// supported yet), none larger than a proposal may be, at most what one message
/// between replicas carries.
fn check_entries(entries: &[Entry]) -> Result<(), ReplicaError> {
    let normal = entries.iter().all(|e| {
        e.entry_type() == EntryType::EntryNormal
            && e.data.len() <= PROPOSAL_BYTES_MAX
            && e.context.len() <= CONTEXT_BYTES_MAX
    });
    if !normal {
        return Err(ReplicaError::Unsupported("entries of another kind or size"));
    }
    Ok(())
}

/// The most bytes of an entry's context (a proposal id).
const CONTEXT_BYTES_MAX: usize = 16;

/// Writes `hard` as `group`'s hard state.
fn persist_hard_state(
    txn: &mut dyn WriteTxn,
    group: u64,
    hard: &raft::prelude::HardState,
) -> Result<(), LogError> {
    let mut stored = hard.clone();
    if mutation::active(Mutation::RaftVoteUnpersisted) {
        // Broken on purpose: term and vote stay in memory only.
        let before = log::hard_state(&*txn, group)?;
        (stored.term, stored.vote) = (before.term, before.vote);
    }
    log::set_hard_state(txn, group, &stored)
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet, VecDeque};

    use conclave_storage::{MemStore, Store};
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    use super::*;

    const GROUP: u64 = 4;
    const VOTERS: [u64; 3] = [1, 2, 3];

    /// Three replicas on three stores, a network that delivers in order, and what
    /// each replica applied.
    struct Group {
        stores: Vec<MemStore>,
        replicas: Vec<Option<Replica>>,
        /// Each replica's seeded random source.
        rngs: Vec<ChaCha20Rng>,
        wire: VecDeque<Message>,
        applied: Vec<Vec<Vec<u8>>>,
        /// Every (term, leader) seen.
        leaders: BTreeSet<(u64, u64)>,
    }

    impl Group {
        fn new(seed: u64) -> Self {
            let rngs = VOTERS
                .iter()
                .map(|&v| ChaCha20Rng::seed_from_u64(seed * 16 + v))
                .collect();
            let stores: Vec<MemStore> = VOTERS.iter().map(|_| MemStore::new()).collect();
            let mut group = Group {
                stores,
                replicas: Vec::new(),
                rngs,
                wire: VecDeque::new(),
                applied: vec![Vec::new(); VOTERS.len()],
                leaders: BTreeSet::new(),
            };
            group.replicas = (0..VOTERS.len()).map(|i| Some(group.open(i))).collect();
            group
        }

        fn open(&mut self, i: usize) -> Replica {
            let txn = self.stores[i].read().unwrap();
            Replica::open(&*txn, GROUP, VOTERS[i], &VOTERS, &mut self.rngs[i]).unwrap()
        }

        /// Persists what replica `i` has ready, applies and queues what it gives.
        fn drive(&mut self, i: usize) {
            let Some(replica) = self.replicas[i].as_mut() else {
                return;
            };
            let mut txn = self.stores[i].write().unwrap();
            let out = replica.drive(&mut *txn).unwrap();
            txn.commit().unwrap();
            if replica.is_leader() {
                self.leaders.insert((replica.term(), VOTERS[i]));
            }
            let data = out.committed.into_iter().map(|e| e.data.to_vec());
            self.applied[i].extend(data.filter(|d| !d.is_empty()));
            self.wire.extend(out.messages);
        }

        /// One tick everywhere, then every message delivered (to replicas up).
        fn round(&mut self) {
            for i in 0..VOTERS.len() {
                if let Some(replica) = self.replicas[i].as_mut() {
                    replica.tick();
                    replica.redraw_timeout(&mut self.rngs[i]);
                }
                self.drive(i);
            }
            while let Some(message) = self.wire.pop_front() {
                let i = VOTERS.iter().position(|&v| v == message.to).unwrap();
                if let Some(replica) = self.replicas[i].as_mut() {
                    replica.step(message).unwrap();
                    replica.redraw_timeout(&mut self.rngs[i]);
                    self.drive(i);
                }
            }
        }

        fn leader(&self) -> Option<usize> {
            (0..VOTERS.len()).find(|&i| self.replicas[i].as_ref().is_some_and(Replica::is_leader))
        }

        /// At most one leader per term, ever.
        fn assert_one_leader_per_term(&self) {
            let mut by_term = BTreeMap::new();
            for &(term, leader) in &self.leaders {
                let other = by_term.insert(term, leader);
                assert!(
                    other.is_none(),
                    "two leaders in term {term}: {other:?} and {leader}"
                );
            }
        }
    }

    #[test]
    fn three_replicas_elect_one_leader_and_apply_the_same_entries_in_order() {
        let mut group = Group::new(1);
        for _ in 0..60 {
            group.round();
        }
        let leader = group.leader().expect("a leader within 60 ticks");
        for n in 0..20u8 {
            group.replicas[leader]
                .as_mut()
                .unwrap()
                .propose(Vec::new(), vec![n])
                .unwrap();
            group.drive(leader);
            group.round();
        }
        for _ in 0..5 {
            group.round();
        }
        let expected: Vec<Vec<u8>> = (0..20u8).map(|n| vec![n]).collect();
        for applied in &group.applied {
            assert_eq!(applied, &expected);
        }
        group.assert_one_leader_per_term();
    }

    #[test]
    fn a_restarted_replica_reloads_its_log_and_catches_up_applying_nothing_twice() {
        let mut group = Group::new(2);
        for _ in 0..60 {
            group.round();
        }
        let leader = group.leader().expect("a leader");
        let follower = (leader + 1) % VOTERS.len();
        group.replicas[leader]
            .as_mut()
            .unwrap()
            .propose(Vec::new(), b"before".to_vec())
            .unwrap();
        for _ in 0..3 {
            group.round();
        }
        // The follower crashes: what it held in memory is gone, its store stays.
        group.replicas[follower] = None;
        group.replicas[leader]
            .as_mut()
            .unwrap()
            .propose(Vec::new(), b"while down".to_vec())
            .unwrap();
        for _ in 0..3 {
            group.round();
        }
        let reopened = group.open(follower);
        group.replicas[follower] = Some(reopened);
        for _ in 0..30 {
            group.round();
        }
        let expected = vec![b"before".to_vec(), b"while down".to_vec()];
        for applied in &group.applied {
            assert_eq!(applied, &expected);
        }
        group.assert_one_leader_per_term();
    }

    #[test]
    fn when_the_leader_stops_another_is_elected_in_a_later_term() {
        let mut group = Group::new(3);
        for _ in 0..60 {
            group.round();
        }
        let first = group.leader().expect("a leader");
        let term = group.replicas[first].as_ref().unwrap().term();
        group.replicas[first] = None;
        for _ in 0..60 {
            group.round();
        }
        let second = group.leader().expect("a new leader");
        assert_ne!(second, first);
        assert!(group.replicas[second].as_ref().unwrap().term() > term);
        group.assert_one_leader_per_term();
    }

    #[test]
    fn messages_that_would_make_raft_rs_panic_are_refused_not_stepped() {
        let mut group = Group::new(4);
        for _ in 0..60 {
            group.round();
        }
        let leader = group.leader().expect("a leader");
        group.replicas[leader]
            .as_mut()
            .unwrap()
            .propose(Vec::new(), b"committed".to_vec())
            .unwrap();
        for _ in 0..5 {
            group.round();
        }
        let follower = (leader + 1) % VOTERS.len();
        let replica = group.replicas[follower].as_mut().unwrap();
        let committed = replica.commit();
        assert!(committed >= 2, "the leader's entry and the proposal");
        let term = replica.term();
        let from = VOTERS[leader];
        let to = VOTERS[follower];
        let message = |kind: MessageType| Message {
            msg_type: kind as i32,
            from,
            to,
            term,
            ..Message::default()
        };
        let entry = |index: u64, term: u64| Entry {
            index,
            term,
            data: b"forged".to_vec(),
            ..Entry::default()
        };
        // An empty proposal: raft-rs's fatal "stepped empty MsgProp".
        let empty = message(MessageType::MsgPropose);
        // An append whose entries do not follow its index.
        let mut gap = message(MessageType::MsgAppend);
        gap.index = committed;
        gap.log_term = term;
        gap.entries = vec![entry(committed + 3, term)];
        // An append rewriting a committed entry with another term.
        let mut rewrite = message(MessageType::MsgAppend);
        rewrite.index = committed - 1;
        rewrite.log_term = 0;
        rewrite.entries = vec![entry(committed, term + 7)];
        // A hand-over from a replica that does not lead, and a read index: not
        // taken from other nodes.
        let mut transfer = message(MessageType::MsgTimeoutNow);
        transfer.from = VOTERS[(leader + 2) % VOTERS.len()];
        let read = message(MessageType::MsgReadIndex);
        for forged in [empty, gap, rewrite, transfer, read] {
            let kind = forged.msg_type();
            assert!(replica.step(forged).is_err(), "{kind:?} was stepped");
        }
        assert_eq!(replica.commit(), committed);
    }

    #[test]
    fn the_same_seed_elects_the_same_leaders_at_the_same_ticks() {
        let history = |seed| {
            let mut group = Group::new(seed);
            let mut seen = Vec::new();
            for round in 0..80 {
                group.round();
                seen.push((round, group.leader()));
                if round == 40 {
                    if let Some(leader) = group.leader() {
                        group.replicas[leader] = None;
                    }
                }
            }
            seen
        };
        for seed in 0..8 {
            assert_eq!(history(seed), history(seed), "seed {seed}");
        }
    }
}

//! A node's replicas actor (`REPLICAS`, unit): every Raft group the node
//! replicates, in one actor.
//!
//! - **Clock.** A timer ([`Replication::tick`]) ticks every group but those
//!   rejoining (below).
//! - **Persistence.** Each turn drives every group into one write transaction of
//!   the driver's batch: entries, hard states and what was applied go to disk in
//!   the batch's one commit.
//! - **Sending.** The messages of all groups for one node leave as one
//!   [`ReplicasMsg::Raft`], through [`Context::send`]: the driver releases it only
//!   after the batch is durable, which is raft-rs's rule for what a `Ready` sends.
//!   Raft tolerates loss, so nothing goes through the durable outboxes.
//! - **Checks.** A packet is stepped only if its group is one both nodes
//!   replicate, it names this node as receiver and its sender is the node the
//!   transport authenticated.
//! - **Rejoining.** A node whose store was lost under the same identity
//!   ([`log::begin_rejoin`]), or whose log was repaired ([`log::repair`]), may
//!   have acknowledged entries and voted in terms it no longer remembers. It
//!   takes no vote request and does not tick (so it does not campaign) in such a
//!   group until a leader confirmed that it forgot what the node acknowledged
//!   ([`ReplicasMsg::Rejoined`], [`ReplicasMsg::Reset`]) and the node holds the
//!   commit index that leader (and any since) announced, and a majority of the
//!   group among the other voters said they are at no later term than its own
//!   ([`ReplicasMsg::Terms`]: a term whose election its lost vote helped win is
//!   at most what they hold). It then records a vote for that leader, so that
//!   it cannot vote twice in that term.
//! - **Input from other nodes.** Only the messages replicas exchange are
//!   stepped, and an append only if raft-rs can take it without panicking (see
//!   [`Replica::step`]); the rest is dropped and counted.

use std::collections::BTreeMap;
use std::sync::Arc;

use conclave_storage::WriteTxn;
use prost::Message as _;
use raft::prelude::{Message, MessageType};

use super::layout::{
    node_of, raft_id, Packet, ProposalId, ReplicasMsg, Replication, ReplicationStatus,
    PACKETS_BYTES_MAX, PENDING_PROPOSALS_MAX, PROPOSAL_BYTES_MAX, PROPOSAL_TICKS_MAX, SHARDS_MAX,
};
use super::log::{self, LogError};
use super::replica::{Replica, ReplicaError};
use crate::actor::{Actor, ActorKind, Context, System};
use crate::domain::{gateway_of, ClientMsg, Denial, Msg, Outcome};
use crate::ids::NodeId;
use crate::mutation::{self, Mutation};

mod rooms;

pub use rooms::Rooms;

pub use super::layout::replicas_of;

/// How often, in ticks, a leader checks whether to hand its group over to the
/// group's first replica.
const HAND_OVER_TICKS: u64 = 10;

/// How many ticks a rejoining replica waits for a leader to confirm that it
/// forgot what the replica acknowledged before it asks again.
const REJOIN_ASK_TICKS: u64 = 20;

/// One group as this node holds it.
struct Group {
    replica: Replica,
    /// The Raft ids of its voters.
    voters: Vec<u64>,
    /// Rejoining: the commit index to reach (0: no leader heard yet).
    rejoining: Option<u64>,
    /// Rejoining: the (leader, term) that confirmed it forgot what this node
    /// had acknowledged (kept in memory only: after a restart it is asked again).
    reset_by: Option<(u64, u64)>,
    /// Rejoining: the (leader, term) last asked to forget, and when (in ticks).
    asked: Option<(u64, u64, u64)>,
    /// Rejoining: the highest term each other voter said it is at.
    terms: BTreeMap<u64, u64>,
    /// The term in which it last handed the group over (see
    /// [`Replicas::spread_leaders`]).
    handed_over: u64,
    /// The term in which it last told the gateway it leads.
    announced: u64,
    /// The term it was at at the last tick (term changes are counted).
    ticked_term: u64,
}

/// Every group this node replicates.
pub struct Replicas {
    config: Replication,
    /// [`Replication::fingerprint`] of this node's layout.
    layout: u64,
    /// The cluster, sorted.
    nodes: Arc<[NodeId]>,
    me: u64,
    groups: BTreeMap<u64, Group>,
    /// Groups whose stored log did not verify: repaired at the next turn.
    corrupt: std::collections::BTreeSet<u64>,
    /// Groups that could not be opened otherwise (the store failed): tried
    /// again at the next tick.
    unopened: std::collections::BTreeSet<u64>,
    /// Proposals made through this node and not applied here yet.
    pending: BTreeMap<ProposalId, Waiting>,
    /// Ticks since activation (the clock of [`Waiting::until`]).
    ticks: u64,
    /// This run of the actor (drawn at activation), sent with every message.
    run: u64,
    /// As leader: (group, follower) that rejoined → the run that did. Until
    /// the follower holds the whole log, acknowledgements of its other runs
    /// are dropped: one sent before its loss could claim what it lost.
    fences: BTreeMap<(u64, u64), u64>,
    /// What the gateway was last told ([`Replicas::report`]).
    reported: Option<ReplicationStatus>,
    /// Rooms on shard groups, if they are.
    rooms: Option<Rooms>,
    /// Owed room commands proposed at least once (in this run, or before a
    /// restart): never refused since, as they may commit.
    tried: std::collections::BTreeSet<ProposalId>,
    /// Owed room commands a client waits for that could not be proposed yet
    /// (no leader known), and since when (in ticks).
    unproposed: BTreeMap<ProposalId, u64>,
    /// Not read since activation: every command the owed table holds at its
    /// first read may have been proposed before a restart, so none of them is
    /// refused (the first read, which covers the whole table, counts them tried).
    restarted: bool,
    /// Whether some owed command may not be waited on (new, given up on, or
    /// from before a restart): the owed table is read again at the next tick.
    owed_due: bool,
}

/// A proposal made through this node: its group, the caller's request number
/// at the gateway (none for an owed room command, answered when applied, see
/// [`rooms`]), and the tick after which it is no longer waited on.
struct Waiting {
    group: u64,
    request: Option<u64>,
    until: u64,
}

/// What one turn of the replicas actor sends once its writes are durable: Raft
/// messages (to Raft ids), answers to proposals, and terms it started to lead.
#[derive(Default)]
struct Turn {
    messages: Vec<(u64, Packet)>,
    replies: Vec<(u64, Outcome)>,
    led: Vec<(u64, u64)>,
    rooms: rooms::RoomsTurn,
}

/// Why a group's turn failed (it is then opened again from the store, as after
/// a restart).
#[derive(Debug, thiserror::Error)]
enum TurnError {
    #[error(transparent)]
    Replica(#[from] ReplicaError),
    #[error(transparent)]
    Log(#[from] LogError),
    #[error(transparent)]
    Store(#[from] conclave_storage::StoreError),
    #[error(transparent)]
    Rooms(#[from] crate::domain::room::shard::ApplyError),
}

impl Replicas {
    /// Opens every group `cx.node()` replicates of the cluster `nodes` (sorted).
    /// `None` if this node is not in `nodes`. The clock starts with the first
    /// [`ReplicasMsg::Tick`], which [`crate::domain::Domain::boot`] sends.
    pub fn activate<S: System<Msg = Msg>>(
        config: Replication,
        nodes: Arc<[NodeId]>,
        rooms: Option<Rooms>,
        cx: &mut Context<'_, S>,
    ) -> Option<Self> {
        let me = raft_id(&nodes, cx.node())?;
        let mut replicas = Replicas {
            config,
            layout: config.fingerprint(&nodes, rooms.as_ref().map_or(0, |r| r.epoch_frames_max)),
            nodes,
            me,
            groups: BTreeMap::new(),
            corrupt: Default::default(),
            unopened: Default::default(),
            pending: BTreeMap::new(),
            ticks: 0,
            run: cx.rng().next_u64(),
            fences: BTreeMap::new(),
            reported: None,
            rooms,
            tried: Default::default(),
            unproposed: BTreeMap::new(),
            restarted: true,
            owed_due: true,
        };
        replicas.open(cx);
        Some(replicas)
    }

    /// (Re)opens every group from the store. A group whose log does not verify
    /// is left out, reported and counted, and repaired at the next turn
    /// ([`Replicas::repair`]); one that cannot be opened otherwise is tried again
    /// at the next tick.
    fn open<S: System<Msg = Msg>>(&mut self, cx: &mut Context<'_, S>) {
        let groups = self.config.groups_of(&self.nodes, cx.node());
        self.groups.clear();
        self.unopened.clear();
        self.open_groups(&groups, cx);
    }

    fn open_groups<S: System<Msg = Msg>>(&mut self, groups: &[u64], cx: &mut Context<'_, S>) {
        let txn = match cx.store().read() {
            Ok(txn) => txn,
            Err(error) => {
                tracing::error!(%error, "replicas: the store cannot be read; the groups are tried again at the next tick");
                self.unopened.extend(groups);
                return;
            }
        };
        for &group in groups {
            let voters: Vec<u64> = self
                .config
                .replicas(&self.nodes, group)
                .into_iter()
                .filter_map(|n| raft_id(&self.nodes, n))
                .collect();
            let opened = Replica::open(&*txn, group, self.me, &voters, cx.rng())
                .and_then(|replica| Ok((replica, log::rejoining(&*txn, group)?)));
            match opened {
                Ok((replica, rejoining)) => {
                    let group_state = Group {
                        replica,
                        voters,
                        rejoining,
                        reset_by: None,
                        asked: None,
                        terms: BTreeMap::new(),
                        handed_over: 0,
                        announced: 0,
                        ticked_term: 0,
                    };
                    self.groups.insert(group, group_state);
                }
                Err(ReplicaError::Log(error @ LogError::Corrupt { .. })) => {
                    tracing::error!(group, %error, "replicas: a group's log does not verify; it is repaired from the other replicas");
                    metrics::counter!("conclave_raft_corrupt_logs_total").increment(1);
                    self.corrupt.insert(group);
                }
                Err(error) => {
                    tracing::error!(group, %error, "replicas: a group cannot be opened; it is tried again at the next tick");
                    metrics::counter!("conclave_raft_groups_unopened_total").increment(1);
                    self.unopened.insert(group);
                }
            }
        }
    }

    /// Repairs the groups whose logs did not verify ([`log::repair`]: what
    /// verifies is kept, the rest comes again from the leader) and opens them.
    fn repair<S: System<Msg = Msg>>(&mut self, cx: &mut Context<'_, S>) {
        let groups: Vec<u64> = std::mem::take(&mut self.corrupt).into_iter().collect();
        let repaired = cx.store().write().map_err(LogError::from).and_then(|mut txn| {
            for &group in &groups {
                let from = log::repair(&mut *txn, group)?;
                tracing::warn!(group, from, "replicas: a log repaired: entries from this index on come again from the leader");
            }
            txn.commit().map_err(LogError::from)
        });
        if let Err(error) = repaired {
            tracing::error!(%error, "replicas: a repair failed; tried again at the next turn");
            self.corrupt.extend(groups);
            return;
        }
        self.open_groups(&groups, cx);
    }

    /// The Raft id of the node that sent the current message, if it is another
    /// node's replicas actor.
    fn remote_sender<S: System>(&self, cx: &Context<'_, S>) -> Option<u64> {
        let sender = cx.sender()?;
        let remote = sender.kind == ActorKind::REPLICAS && sender.node != cx.node();
        remote.then(|| raft_id(&self.nodes, sender.node)).flatten()
    }

    /// Every [`HAND_OVER_TICKS`], each group this node leads but is not the
    /// first replica of goes to that replica if it holds the whole log: so
    /// leaders stay spread over the nodes as the layout spreads the groups.
    fn spread_leaders(&mut self) {
        if !self.ticks.is_multiple_of(HAND_OVER_TICKS) {
            return;
        }
        for (&id, group) in &mut self.groups {
            let preferred = group.voters[0];
            let term = group.replica.term();
            // Once per term: a hand-over that failed (the replica did not win)
            // is not tried again until the term changes.
            if preferred == self.me || group.handed_over == term {
                continue;
            }
            if group.replica.hand_over(preferred) {
                group.handed_over = term;
                tracing::debug!(
                    group = id,
                    to = preferred,
                    "replicas: handing a group over to its first replica"
                );
                metrics::counter!("conclave_raft_hand_overs_total").increment(1);
            }
        }
    }

    /// Every [`REJOIN_ASK_TICKS`], asks the other voters of the groups it is
    /// rejoining what terms they are at (one message per node).
    fn ask_terms<S: System<Msg = Msg>>(&mut self, cx: &mut Context<'_, S>) {
        if !self.ticks.is_multiple_of(REJOIN_ASK_TICKS) {
            return;
        }
        let mut by_node: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
        for (&id, group) in &self.groups {
            if group.rejoining.is_none() {
                continue;
            }
            for &voter in group.voters.iter().filter(|&&v| v != self.me) {
                by_node.entry(voter).or_default().push(id);
            }
        }
        for (voter, groups) in by_node {
            if let Some(node) = node_of(&self.nodes, voter) {
                let layout = self.layout;
                cx.send(replicas_of(node), ReplicasMsg::Terms { groups, layout });
            }
        }
    }

    /// The terms of the groups `from` asked about that it shares with this node.
    fn terms_of(&self, from: u64, groups: &[u64]) -> Vec<(u64, u64)> {
        let shared = groups.iter().take(usize::from(SHARDS_MAX) + 1);
        shared
            .filter_map(|id| {
                let group = self.groups.get(id)?;
                group
                    .voters
                    .contains(&from)
                    .then(|| (*id, group.replica.term()))
            })
            .collect()
    }

    /// `from` said what terms it is at.
    fn heard_terms(&mut self, from: u64, terms: &[(u64, u64)]) {
        for &(id, term) in terms.iter().take(usize::from(SHARDS_MAX) + 1) {
            let Some(group) = self.groups.get_mut(&id) else {
                continue;
            };
            if group.rejoining.is_some() && group.voters.contains(&from) && from != self.me {
                let heard = group.terms.entry(from).or_insert(term);
                *heard = (*heard).max(term);
            }
        }
    }

    fn tick(&mut self, rng: &mut dyn rand_core::CryptoRng) {
        for group in self.groups.values_mut() {
            // Broken on purpose under the mutation: a rejoining replica campaigns.
            if group.rejoining.is_none() || mutation::active(Mutation::RaftRejoinVotes) {
                group.replica.tick();
                group.replica.redraw_timeout(rng);
            }
        }
    }

    /// Steps what another node sent; what does not check out is dropped and
    /// counted. Returns the groups whose leader (`from`) must be told that this
    /// node lost what it acknowledged.
    fn receive(
        &mut self,
        from: u64,
        run: u64,
        packets: Vec<Packet>,
        rng: &mut dyn rand_core::CryptoRng,
    ) -> Vec<u64> {
        let mut rejoined = Vec::new();
        for packet in packets {
            let group = packet.group;
            match self.step(from, run, packet, rng) {
                Ok(true) if !rejoined.contains(&group) => rejoined.push(group),
                Ok(_) => {}
                Err(reason) => {
                    tracing::warn!(from, group, reason, "replicas: a raft message dropped");
                    metrics::counter!("conclave_raft_messages_refused_total", "reason" => reason)
                        .increment(1);
                }
            }
        }
        rejoined
    }

    /// Steps one packet; `true` if its sender leads the group and must be told
    /// that this node, rejoining, lacks what it acknowledged.
    fn step(
        &mut self,
        from: u64,
        run: u64,
        packet: Packet,
        rng: &mut dyn rand_core::CryptoRng,
    ) -> Result<bool, &'static str> {
        let ticks = self.ticks;
        let fence = self.fences.get(&(packet.group, from)).copied();
        let group = self.groups.get_mut(&packet.group).ok_or("unknown_group")?;
        let mut message = Message::decode(&packet.message[..]).map_err(|_| "malformed")?;
        if message.from != from || message.to != self.me || !group.voters.contains(&from) {
            return Err("misaddressed");
        }
        let stale = fence.is_some_and(|f| f != run);
        if stale && message.msg_type() == MessageType::MsgAppendResponse {
            return Err("fenced");
        }
        let mut lacking = false;
        if let Some(target) = group.rejoining.as_mut() {
            let kind = message.msg_type();
            match kind {
                // It may have voted in these terms before its store was lost.
                MessageType::MsgRequestVote
                | MessageType::MsgRequestPreVote
                | MessageType::MsgTimeoutNow
                    if !mutation::active(Mutation::RaftRejoinVotes) =>
                {
                    return Ok(false)
                }
                MessageType::MsgAppend | MessageType::MsgHeartbeat => {
                    if kind == MessageType::MsgAppend {
                        *target = (*target).max(message.commit);
                    } else if group.reset_by != Some((from, message.term)) {
                        // Until this leader forgot, its idea of what this
                        // replica holds may predate the loss: only appends
                        // move the commit.
                        message.commit = message.commit.min(group.replica.commit());
                    }
                    let leader = (from, message.term);
                    let asked_lately = group.asked.is_some_and(|(l, t, at)| {
                        (l, t) == leader && ticks < at + REJOIN_ASK_TICKS
                    });
                    lacking = group.reset_by != Some(leader) && !asked_lately;
                    if lacking {
                        group.asked = Some((from, message.term, ticks));
                    }
                }
                _ => {}
            }
        }
        let stepped = group.replica.step(message);
        group.replica.redraw_timeout(rng);
        stepped.map_err(|_| "refused")?;
        Ok(lacking)
    }

    /// `from` lost its store: the groups it names that this node leads send it
    /// their logs again from the start. Returns, for each, the term and the
    /// commit index at the reset, which `from` must reach before it votes.
    fn rejoined(&mut self, from: u64, run: u64, groups: &[u64]) -> Vec<(u64, u64, u64)> {
        let mut reset = Vec::new();
        for &id in groups.iter().take(usize::from(SHARDS_MAX) + 1) {
            let Some(group) = self.groups.get_mut(&id) else {
                continue;
            };
            if group.voters.contains(&from) && group.replica.reset_follower(from) {
                self.fences.insert((id, from), run);
                tracing::info!(
                    group = id,
                    from,
                    "replicas: a follower rejoined with a store that lost entries"
                );
                reset.push((id, group.replica.term(), group.replica.commit()));
            }
        }
        reset
    }

    /// The leader `from` forgot what this node had acknowledged in `reset`'s
    /// groups, as of (term, commit).
    fn reset(&mut self, from: u64, reset: &[(u64, u64, u64)]) {
        for &(id, term, commit) in reset.iter().take(usize::from(SHARDS_MAX) + 1) {
            let Some(group) = self.groups.get_mut(&id) else {
                continue;
            };
            // Only the answer of the leader asked, in the term asked.
            let asked = group.asked.is_some_and(|(l, t, _)| (l, t) == (from, term));
            if let (Some(target), true) = (group.rejoining.as_mut(), asked) {
                *target = (*target).max(commit);
                group.reset_by = Some((from, term));
            }
        }
    }

    /// Proposes `data` to `group` as `id` for the gateway's request `request`
    /// (if any);
    /// refused at once when it cannot be sequenced now (a proposal changes
    /// neither term nor role, so no timeout is drawn).
    fn propose(
        &mut self,
        group: u64,
        id: ProposalId,
        data: Vec<u8>,
        request: Option<u64>,
    ) -> Option<Denial> {
        if self.pending.len() >= PENDING_PROPOSALS_MAX {
            return Some(Denial::Limit {
                what: format!("{PENDING_PROPOSALS_MAX} proposals waiting on this node"),
            });
        }
        if data.len() > PROPOSAL_BYTES_MAX {
            return Some(Denial::Limit {
                what: format!("a proposal of at most {PROPOSAL_BYTES_MAX} bytes"),
            });
        }
        let Some(g) = self.groups.get_mut(&group) else {
            return Some(Denial::NotFound {
                what: format!("raft group {group} on this node"),
            });
        };
        if g.rejoining.is_some() || g.replica.leader().is_none() {
            return Some(Denial::NoQuorum);
        }
        match g.replica.propose(id.0.to_vec(), data) {
            Ok(()) => {}
            Err(ReplicaError::Log(LogError::Full { .. })) => {
                return Some(Denial::Limit {
                    what: format!("{} entries in a raft log", log::LOG_ENTRIES_MAX),
                });
            }
            Err(_) => return Some(Denial::NoQuorum),
        }
        // An owed room command is proposed again sooner: a proposal forwarded
        // to a leader is lost with the message, and proposing twice is safe.
        let wait = match request {
            Some(_) => PROPOSAL_TICKS_MAX,
            None => rooms::OWED_RETRY_TICKS,
        };
        let until = self.ticks + wait;
        self.pending.insert(
            id,
            Waiting {
                group,
                request,
                until,
            },
        );
        None
    }

    /// Stops waiting on proposals past their deadline (they may still commit:
    /// their callers retry).
    fn expire(&mut self) {
        let now = self.ticks;
        let before = self.pending.len();
        let mut owed = false;
        self.pending.retain(|_, w| {
            let waits = w.until >= now;
            owed |= !waits && w.request.is_none();
            waits
        });
        // An owed command given up on is proposed again.
        self.owed_due |= owed;
        let expired = before - self.pending.len();
        if expired > 0 {
            metrics::counter!("conclave_raft_proposals_expired_total").increment(expired as u64);
        }
    }

    /// Persists what every group has ready, each group in a transaction of its
    /// own (all of them in the driver's batch), then sends the groups' messages,
    /// batched per node, the answers to proposals applied and the terms led (all
    /// released after the batch's commit). A group whose turn fails is opened
    /// again from the store, as after a crash; the others go on.
    fn drive<S: System<Msg = Msg>>(&mut self, cx: &mut Context<'_, S>) {
        let mut turn = Turn::default();
        let ids: Vec<u64> = self.groups.keys().copied().collect();
        for id in ids {
            if let Err(error) = self.persist(id, cx, &mut turn) {
                // What the replica holds in memory is ahead of the store.
                tracing::error!(group = id, %error, "replicas: a group's turn failed; it is opened again");
                metrics::counter!("conclave_raft_turns_failed_total").increment(1);
                self.groups.remove(&id);
                self.open_groups(&[id], cx);
            }
        }
        let groups = &self.groups;
        self.fences.retain(|&(id, follower), _| {
            groups
                .get(&id)
                .is_some_and(|g| g.replica.is_leader() && !g.replica.holds_whole_log(follower))
        });
        for (request, outcome) in turn.replies {
            cx.send(gateway_of(cx.node()), ClientMsg::Reply { request, outcome });
        }
        for (group, term) in turn.led {
            tracing::debug!(group, term, "replicas: leading");
            metrics::counter!("conclave_raft_leader_terms_total").increment(1);
            cx.send(gateway_of(cx.node()), ClientMsg::Leading { group, term });
        }
        self.send(turn.messages, cx);
        for id in &turn.rooms.settled {
            self.tried.remove(id);
            self.unproposed.remove(id);
        }
        self.owed_due |= turn.rooms.owed_again;
        rooms::release(turn.rooms, cx);
    }

    /// Persists and applies what group `id` has ready, adding what it sends and
    /// answers to `turn` once its transaction committed.
    fn persist<S: System<Msg = Msg>>(
        &mut self,
        id: u64,
        cx: &mut Context<'_, S>,
        turn: &mut Turn,
    ) -> Result<(), TurnError> {
        let Some(group) = self.groups.get_mut(&id) else {
            return Ok(());
        };
        if !group.replica.has_ready() && group.rejoining.is_none() {
            return Ok(()); // nothing to write, send or apply
        }
        let mut txn = cx.store().write()?;
        // Before the drive, so that a vote it records is persisted with it.
        let rejoined = caught_up(&mut *txn, id, group)?;
        let out = group.replica.drive(&mut *txn)?;
        // A repaired log may hand back entries applied before: rooms take
        // each entry once.
        let applied_before = log::applied(&*txn, id)?.index;
        log::apply(&mut *txn, id, &out.committed)?;
        // Committed entries come in index order.
        let first_new = out.committed.partition_point(|e| e.index <= applied_before);
        let fresh = &out.committed[first_new..];
        let at = (cx.node(), cx.now());
        let applied = rooms::apply(self.rooms.as_ref(), at, id, &mut *txn, fresh)?;
        txn.commit()?;
        turn.rooms.merge(applied);
        if rejoined {
            tracing::info!(
                group = id,
                "replicas: caught up after rejoining; voting again"
            );
            metrics::counter!("conclave_raft_rejoins_total").increment(1);
        }
        // Broken on purpose under the mutation: what is appended counts.
        for entry in out.appended.iter().chain(&out.committed) {
            let Ok(key) = <[u8; 16]>::try_from(&entry.context[..]) else {
                continue;
            };
            let Some(w) = self.pending.remove(&ProposalId(key)) else {
                continue;
            };
            if let Some(request) = w.request {
                let outcome = Outcome::Appended {
                    group: w.group,
                    index: entry.index,
                };
                turn.replies.push((request, outcome));
            }
        }
        turn.messages.extend(out.messages.into_iter().map(|m| {
            let packet = Packet {
                group: id,
                message: m.encode_to_vec(),
            };
            (m.to, packet)
        }));
        let term = group.replica.term();
        if group.replica.is_leader() && group.announced != term {
            group.announced = term;
            turn.led.push((id, term));
        }
        Ok(())
    }

    /// Sends `messages`, one [`ReplicasMsg::Raft`] per node and at most
    /// [`PACKETS_BYTES_MAX`] bytes of packets.
    fn send<S: System<Msg = Msg>>(&self, messages: Vec<(u64, Packet)>, cx: &mut Context<'_, S>) {
        let mut by_node: BTreeMap<u64, Vec<Vec<Packet>>> = BTreeMap::new();
        let mut bytes: BTreeMap<u64, usize> = BTreeMap::new();
        for (to, packet) in messages {
            let batches = by_node.entry(to).or_default();
            let size = bytes.entry(to).or_default();
            if batches.is_empty() || *size + packet.message.len() > PACKETS_BYTES_MAX {
                batches.push(Vec::new());
                *size = 0;
            }
            *size += packet.message.len();
            if let Some(batch) = batches.last_mut() {
                batch.push(packet);
            }
        }
        for (to, batches) in by_node {
            let Some(node) = node_of(&self.nodes, to) else {
                continue;
            };
            for packets in batches {
                let (run, layout) = (self.run, self.layout);
                cx.send(
                    replicas_of(node),
                    ReplicasMsg::Raft {
                        packets,
                        run,
                        layout,
                    },
                );
            }
        }
    }
}

/// Ends `group`'s rejoining once a leader confirmed it forgot what this node
/// had acknowledged and its commit index reached what that leader (and every
/// leader heard since) announced, recording a vote for the leader first (see
/// the module docs); else records the target it has learned.
/// Returns whether it ended now.
fn caught_up(txn: &mut dyn WriteTxn, id: u64, group: &mut Group) -> Result<bool, LogError> {
    let Some(target) = group.rejoining else {
        return Ok(false);
    };
    // The leader it follows now, in this term, is the one that forgot.
    let term = group.replica.term();
    let current = group.replica.leader().map(|l| (l, term));
    if current.is_some()
        && group.reset_by == current
        && target > 0
        && group.replica.commit() >= target
        && no_later_term(group, term)
    {
        group.replica.vote_for_leader();
        group.rejoining = None;
    }
    log::set_rejoining(txn, id, group.rejoining)?;
    Ok(group.rejoining.is_none())
}

/// Whether enough of the other voters answered [`ReplicasMsg::Terms`], all at
/// `term` or below: a term in which this node's lost vote helped elect a leader
/// is at most what any majority of the group holds now, and at least one of
/// those answered (a majority of the group among the others meets every
/// majority that elected). So it never votes again in such a term: terms below
/// `term` are past, and in `term` it records a vote for the leader.
fn no_later_term(group: &Group, term: u64) -> bool {
    let others = group.voters.len().saturating_sub(1);
    let needed = (group.voters.len() / 2 + 1).min(others);
    group.terms.len() >= needed && group.terms.values().all(|&t| t <= term)
}

impl<S: System<Msg = Msg>> Actor<S> for Replicas {
    type Msg = ReplicasMsg;

    fn handle(&mut self, msg: ReplicasMsg, cx: &mut Context<'_, S>) {
        if !self.corrupt.is_empty() {
            self.repair(cx);
        }
        match msg {
            // Only its own timer ticks it.
            ReplicasMsg::Tick if cx.sender().is_none() => self.on_tick(cx),
            ReplicasMsg::Tick => return,
            ReplicasMsg::Kick if cx.sender().is_none_or(|s| s.node == cx.node()) => {
                self.propose_owed(cx);
            }
            ReplicasMsg::Kick => return,
            ReplicasMsg::Propose {
                group,
                id,
                data,
                request,
            } => {
                if cx.sender().is_some_and(|s| s.node != cx.node()) {
                    return; // another node cannot propose through this one
                }
                self.on_propose(group, id, data, request, cx);
            }
            from_peer => {
                let Some(from) = self.remote_sender(cx) else {
                    tracing::warn!(sender = ?cx.sender(), "replicas: a replicas message not from another node's replicas; dropped");
                    metrics::counter!("conclave_raft_messages_refused_total", "reason" => "sender")
                        .increment(1);
                    return;
                };
                if from_peer.layout().is_some_and(|l| l != self.layout) {
                    tracing::warn!(from, "replicas: a node laid out otherwise (other shards, factor or peers); its message dropped");
                    metrics::counter!("conclave_raft_messages_refused_total", "reason" => "layout")
                        .increment(1);
                    return;
                }
                let answer = self.on_peer(from, from_peer, cx.rng());
                if let (Some(answer), Some(to)) = (answer, cx.sender().copied()) {
                    cx.send(to, answer);
                }
            }
        }
        self.drive(cx);
    }
}

impl Replicas {
    /// One tick: groups that could not be opened are tried again, every group
    /// not rejoining ticks, leaders spread, rejoining groups ask for terms, and
    /// proposals past their deadline are given up.
    fn on_tick<S: System<Msg = Msg>>(&mut self, cx: &mut Context<'_, S>) {
        self.ticks += 1;
        if !self.unopened.is_empty() {
            let groups: Vec<u64> = std::mem::take(&mut self.unopened).into_iter().collect();
            self.open_groups(&groups, cx);
        }
        self.tick(cx.rng());
        self.spread_leaders();
        self.ask_terms(cx);
        self.expire();
        if self.owed_due || !self.unproposed.is_empty() {
            self.propose_owed(cx);
        }
        self.report(cx);
        cx.timer(self.config.tick, ReplicasMsg::Tick);
    }

    /// What the groups look like now; counts the terms that changed since the
    /// last tick.
    fn status(&mut self) -> ReplicationStatus {
        let mut status = ReplicationStatus {
            unopened: (self.corrupt.len() + self.unopened.len()) as u32,
            ..ReplicationStatus::default()
        };
        let mut term_changes = 0;
        for (&id, group) in self.groups.iter_mut() {
            status.groups += 1;
            let replica = &group.replica;
            if group.rejoining.is_some() {
                status.rejoining += 1;
            } else if replica.is_leader() {
                status.leading += 1;
                status.led.push(id);
            } else if replica.leader().is_some() {
                status.following += 1;
            } else {
                status.without_leader += 1;
            }
            status.lag_entries = status.lag_entries.max(replica.lag());
            if replica.term() != group.ticked_term {
                group.ticked_term = replica.term();
                term_changes += 1;
            }
        }
        status.groups += status.unopened;
        metrics::counter!("conclave_raft_term_changes_total").increment(term_changes);
        status
    }

    /// Sets the replication gauges and tells this node's gateway (for
    /// `/healthz`) when what the groups look like changed.
    fn report<S: System<Msg = Msg>>(&mut self, cx: &mut Context<'_, S>) {
        let status = self.status();
        let roles = [
            ("leader", status.leading),
            ("follower", status.following),
            ("without_leader", status.without_leader),
            ("rejoining", status.rejoining),
            ("unopened", status.unopened),
        ];
        for (role, count) in roles {
            metrics::gauge!("conclave_raft_groups", "role" => role).set(f64::from(count));
        }
        metrics::gauge!("conclave_raft_lag_entries").set(status.lag_entries as f64);
        let longest = self.groups.values().map(|g| g.replica.last_index()).max();
        metrics::gauge!("conclave_raft_log_entries_max").set(longest.unwrap_or(0) as f64);
        if self.reported.as_ref() != Some(&status) {
            self.reported = Some(status.clone());
            cx.send(gateway_of(cx.node()), ClientMsg::Replication(status));
        }
    }

    /// A proposal through this node; a refusal is answered at once.
    fn on_propose<S: System<Msg = Msg>>(
        &mut self,
        group: u64,
        id: ProposalId,
        data: Vec<u8>,
        request: u64,
        cx: &mut Context<'_, S>,
    ) {
        let Some(denial) = self.propose(group, id, data, Some(request)) else {
            return;
        };
        let reason = denial.reason();
        tracing::debug!(group, reason, "replicas: a proposal refused");
        metrics::counter!("conclave_raft_proposals_refused_total", "reason" => reason).increment(1);
        let outcome = Outcome::Denied(denial);
        cx.send(gateway_of(cx.node()), ClientMsg::Reply { request, outcome });
    }

    /// A message from the replicas actor of node `from` (Raft id); returns the
    /// answer to send back, if any.
    fn on_peer(
        &mut self,
        from: u64,
        msg: ReplicasMsg,
        rng: &mut dyn rand_core::CryptoRng,
    ) -> Option<ReplicasMsg> {
        let run = self.run;
        match msg {
            ReplicasMsg::Raft {
                packets,
                run: theirs,
                ..
            } => {
                let groups = self.receive(from, theirs, packets, rng);
                let layout = self.layout;
                (!groups.is_empty()).then_some(ReplicasMsg::Rejoined {
                    groups,
                    run,
                    layout,
                })
            }
            ReplicasMsg::Rejoined {
                groups,
                run: theirs,
                ..
            } => {
                let groups = self.rejoined(from, theirs, &groups);
                (!groups.is_empty()).then_some(ReplicasMsg::Reset { groups })
            }
            ReplicasMsg::Reset { groups } => {
                self.reset(from, &groups);
                None
            }
            ReplicasMsg::Terms { groups, .. } => {
                let groups = self.terms_of(from, &groups);
                (!groups.is_empty()).then_some(ReplicasMsg::TermsAre { groups })
            }
            ReplicasMsg::TermsAre { groups } => {
                self.heard_terms(from, &groups);
                None
            }
            // Local only (see `handle`).
            ReplicasMsg::Tick | ReplicasMsg::Kick | ReplicasMsg::Propose { .. } => None,
        }
    }
}

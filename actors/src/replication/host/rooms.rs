//! Rooms on shard groups, as the replicas actor hosts them (see
//! [`crate::domain::room::shard`]): the commands this node owes are proposed
//! until they are applied here, and every committed entry of a shard group is
//! decided and applied to its room, in the group's transaction.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use conclave_storage::WriteTxn;
use raft::prelude::{Entry, EntryType};

use super::Replicas;
use crate::actor::{Context, System, Time};
use crate::crypto::SignatureBytes;
use crate::domain::chain::Change;
use crate::domain::room::shard::{self, ApplyError, ShardCommand, ShardEntry, Sharding};
use crate::domain::{
    gateway_of, outbox_of, reply, room_of, AppliedEntry, ClientMsg, Denial, DomainConfig, Msg,
    OutboxMsg, Outcome, ReplyTo, RoomMsg,
};
use crate::ids::{NodeId, RoomId, UserId};
use crate::mutation::{self, Mutation};
use crate::replication::layout::{ProposalId, PENDING_PROPOSALS_MAX, PROPOSAL_BYTES_MAX};
use crate::replication::META_GROUP;

/// What the replicas actor needs to apply rooms' commands.
pub struct Rooms {
    /// Where rooms are sequenced.
    pub sharding: Sharding,
    /// The cluster's nodes (invitees must be homed on one).
    pub nodes: Option<Arc<BTreeSet<NodeId>>>,
    /// How many frames one epoch key may encrypt.
    pub epoch_frames_max: u64,
    /// How many frames of history one page to a new member node holds.
    pub history_page_frames: usize,
    /// This node's identity: as a room's home, it signs an eviction again
    /// when another change took the chain's head first.
    pub signer: Option<crate::identity::Identity>,
}

impl Rooms {
    /// From the domain's configuration, if rooms are on shard groups. Every
    /// replica must decide alike, so invitees are checked against the whole
    /// cluster (never against a node's own list of its peers).
    pub fn new(
        config: &DomainConfig,
        sharding: Option<Sharding>,
        signer: Option<crate::identity::Identity>,
    ) -> Option<Self> {
        let sharding = sharding?;
        let nodes = Some(Arc::new(sharding.nodes.iter().copied().collect()));
        Some(Rooms {
            sharding,
            nodes,
            epoch_frames_max: config.epoch_frames_max,
            history_page_frames: config.history_page_frames,
            signer,
        })
    }
}

/// What applying a turn's room entries owes once the turn is durable.
#[derive(Default)]
pub(super) struct RoomsTurn {
    /// Answers to waiting clients.
    pub answers: Vec<(ReplyTo, Outcome)>,
    /// Outboxes now holding something.
    pub kicks: BTreeSet<NodeId>,
    /// The entries applied, in order (the gateway wakes the subscribers of
    /// rooms that changed).
    pub applied: Vec<AppliedEntry>,
    /// Evictions this node proposed that lost a race with another change: made
    /// again on the new chain head.
    pub evict_again: Vec<(RoomId, UserId, SignatureBytes)>,
    /// Owed commands applied here (no longer tracked).
    pub settled: Vec<ProposalId>,
    /// An eviction was owed again: the owed table is read at the next tick.
    pub owed_again: bool,
    /// Users of this node, revoked here, that an entry made members of a room:
    /// the room has them evicted.
    pub revoked: Vec<(RoomId, UserId)>,
}

impl RoomsTurn {
    pub(super) fn merge(&mut self, other: RoomsTurn) {
        self.answers.extend(other.answers);
        self.kicks.extend(other.kicks);
        self.applied.extend(other.applied);
        self.evict_again.extend(other.evict_again);
        self.settled.extend(other.settled);
        self.owed_again |= other.owed_again;
        self.revoked.extend(other.revoked);
    }
}

/// Applies `group`'s committed `entries` to their rooms in `txn` (nothing for
/// the meta group, or when rooms are not on shard groups); settles those this
/// node owed.
pub(super) fn apply(
    rooms: Option<&Rooms>,
    (me, now): (NodeId, Time),
    group: u64,
    txn: &mut dyn WriteTxn,
    entries: &[Entry],
) -> Result<RoomsTurn, ApplyError> {
    let mut turn = RoomsTurn::default();
    let Some(rooms) = rooms.filter(|_| group != META_GROUP) else {
        return Ok(turn);
    };
    let replicas: BTreeSet<NodeId> = rooms
        .sharding
        .layout
        .replicas(&rooms.sharding.nodes, group)
        .into_iter()
        .collect();
    let at = shard::Replica {
        me,
        replicas: &replicas,
        nodes: rooms.nodes.as_deref(),
        epoch_frames_max: rooms.epoch_frames_max,
        history_page_frames: rooms.history_page_frames,
    };
    let normal = entries
        .iter()
        .filter(|e| e.get_entry_type() == EntryType::EntryNormal && !e.data.is_empty());
    for entry in normal {
        let Some(applied) = shard::apply_entry(txn, &at, &entry.data)? else {
            continue;
        };
        let stored = applied.changed && matches!(applied.outcome, Outcome::Committed { .. });
        if stored {
            // As a member node stores what its room's home committed.
            metrics::counter!("conclave_frames_delivered_total").increment(1);
            metrics::histogram!("conclave_commit_to_deliver_seconds")
                .record(now.saturating_since(applied.at).as_secs_f64());
        }
        turn.kicks.extend(applied.kick);
        if let Some(user) = applied.revoked_member {
            turn.revoked.push((applied.room, user));
        }
        turn.applied.push(AppliedEntry {
            group,
            index: entry.index,
            room: applied.room,
            outcome: applied.outcome.clone(),
            changed: applied.changed,
        });
        let Ok(id) = <[u8; 16]>::try_from(&entry.context[..]) else {
            continue;
        };
        let Some(owed) = shard::settle(txn, ProposalId(id))? else {
            continue;
        };
        turn.settled.push(ProposalId(id));
        if let (true, Outcome::Committed { id, .. }) = (stored, &applied.outcome) {
            let created = Time::from_unix_micros(id.unix_ms().saturating_mul(1_000));
            metrics::counter!("conclave_frames_committed_total").increment(1);
            metrics::histogram!("conclave_publish_to_commit_seconds")
                .record(now.saturating_since(created).as_secs_f64());
        }
        if let Some(again) = lost_race(&entry.data, &applied.outcome) {
            // In this transaction, so that a crash cannot lose it: the
            // eviction, signed again on the chain head as it is now, is owed.
            let again_id = again_id(ProposalId(id), entry.index);
            match evict_again(txn, rooms, (me, now), group, again, again_id)? {
                true => turn.owed_again = true,
                false => turn.evict_again.push(again),
            }
        }
        if let Some(to) = owed.reply {
            turn.answers.push((to, applied.outcome));
        }
    }
    Ok(turn)
}

/// The id of the eviction made again for the owed eviction `id` refused at
/// `index`: unique, and the same on every run.
fn again_id(id: ProposalId, index: u64) -> ProposalId {
    use sha2::{Digest, Sha256};
    let digest = Sha256::new()
        .chain_update(b"conclave evict again")
        .chain_update(id.0)
        .chain_update(index.to_be_bytes())
        .finalize();
    let mut again = [0u8; 16];
    again.copy_from_slice(&digest[..16]);
    ProposalId(again)
}

/// Owes, as `id`, eviction `again` signed anew on the room's chain head (this
/// node being its home); false if it cannot sign (no identity).
fn evict_again(
    txn: &mut dyn WriteTxn,
    rooms: &Rooms,
    (me, now): (NodeId, Time),
    group: u64,
    (room, user, attestation): (RoomId, UserId, SignatureBytes),
    id: ProposalId,
) -> Result<bool, ApplyError> {
    let Some(signer) = rooms.signer.as_ref() else {
        return Ok(false);
    };
    let Some(meta) = crate::domain::state::rooms::meta(&*txn, room)? else {
        return Ok(true);
    };
    let (_, head) = crate::domain::state::rooms::chain_head(&*txn, room)?;
    let link = crate::domain::chain::Link {
        room,
        prev: head,
        by: crate::domain::chain::Signer::Node(me),
        change: Change::Evict { user, attestation },
    };
    let entry = ShardEntry {
        room,
        at: now,
        proposer: me,
        // The member's node, whose word the attestation is.
        via: crate::domain::state::rooms::member(&*txn, room, user)?.map_or(meta.home, |m| m.home),
        users: Vec::new(),
        command: ShardCommand::Evict(Box::new(crate::domain::chain::SignedLink::sign(
            signer, link,
        ))),
    };
    shard::owe(txn, id, group, &entry, None).map_err(ApplyError)?;
    Ok(true)
}

/// An eviction refused because another change took the chain's head first:
/// (room, user, attestation) to evict again.
fn lost_race(bytes: &[u8], outcome: &Outcome) -> Option<(RoomId, UserId, SignatureBytes)> {
    if !matches!(outcome, Outcome::Denied(Denial::StaleChain { .. })) {
        return None;
    }
    let entry: ShardEntry = crate::wire::decode_bounded(bytes, PROPOSAL_BYTES_MAX).ok()?;
    let ShardCommand::Evict(link) = entry.command else {
        return None;
    };
    let Change::Evict { user, attestation } = link.link.change else {
        return None;
    };
    Some((entry.room, user, attestation))
}

/// How many ticks a node waits for an owed command it proposed to be applied
/// here before it proposes it again: twice the longest election timeout (a
/// proposal forwarded to a leader is lost with its message; one applied twice
/// changes nothing the second time).
pub(super) const OWED_RETRY_TICKS: u64 = 40;

/// How many ticks a command a client waits for may go unproposed (no leader
/// known) before it is refused `no_quorum`: the longest election timeout, so
/// that an election or a hand-over under way does not refuse it.
const NO_QUORUM_GRACE_TICKS: u64 = 20;

impl Replicas {
    /// Proposes every owed command not waited on yet (after a restart, after
    /// a proposal was given up on, or new). One a client of this node waits for
    /// and that was never proposed is refused (`no_quorum`) when it could not
    /// be proposed for [`NO_QUORUM_GRACE_TICKS`]: taken off the table, it can
    /// never commit. The others stay
    /// owed, and are proposed again at the next tick.
    pub(super) fn propose_owed<S: System<Msg = Msg>>(&mut self, cx: &mut Context<'_, S>) {
        if self.rooms.is_none() {
            return;
        }
        self.owed_due = false;
        let room = PENDING_PROPOSALS_MAX.saturating_sub(self.pending.len());
        let rows = cx
            .store()
            .read()
            .and_then(|txn| shard::owed(&*txn, self.pending.len() + room));
        let rows = match rows {
            Ok(rows) => rows,
            Err(error) => {
                tracing::warn!(%error, "replicas: owed commands cannot be read; tried again at the next tick");
                self.owed_due = true;
                return;
            }
        };
        let me = cx.node();
        // More are owed than were read: the rest at the next tick.
        self.owed_due |= rows.len() >= PENDING_PROPOSALS_MAX;
        if std::mem::take(&mut self.restarted) {
            self.tried.extend(rows.iter().map(|(id, _)| *id));
        }
        let mut refused = BTreeMap::new();
        for (id, owed) in rows {
            if self.pending.contains_key(&id) {
                continue;
            }
            let fresh = !self.tried.contains(&id);
            // Broken on purpose under the mutations: a lost proposal is not
            // made again; one proposed before is refused like a fresh one.
            if !fresh && mutation::active(Mutation::ShardForgetsOwed) {
                continue;
            }
            let fresh = fresh || mutation::active(Mutation::ShardRefusesProposed);
            match self.propose(owed.group, id, owed.entry, None) {
                None => {
                    self.tried.insert(id);
                    self.unproposed.remove(&id);
                }
                Some(denial) if fresh && owed.reply.is_some_and(|r| r.to.node == me) => {
                    // A leader may be on its way (an election, a hand-over).
                    let since = *self.unproposed.entry(id).or_insert(self.ticks);
                    if self.ticks.saturating_sub(since) >= NO_QUORUM_GRACE_TICKS {
                        self.unproposed.remove(&id);
                        refused.insert(id, denial);
                    }
                }
                // Proposed again at the next tick.
                Some(_) => self.owed_due = true,
            }
        }
        self.refuse_owed(refused, cx);
    }

    /// Takes commands refused before they were ever proposed off the table and
    /// tells their waiting clients why.
    fn refuse_owed<S: System<Msg = Msg>>(
        &mut self,
        refused: BTreeMap<ProposalId, Denial>,
        cx: &mut Context<'_, S>,
    ) {
        if refused.is_empty() {
            return;
        }
        let settled = cx.store().write().and_then(|mut txn| {
            let mut answers = Vec::new();
            for (id, denial) in refused {
                if let Some(to) = shard::settle(&mut *txn, id)?.and_then(|o| o.reply) {
                    answers.push((to, denial));
                }
            }
            txn.commit()?;
            Ok(answers)
        });
        match settled {
            Ok(answers) => {
                for (to, denial) in answers {
                    let reason = denial.reason();
                    metrics::counter!("conclave_raft_proposals_refused_total", "reason" => reason)
                        .increment(1);
                    reply(cx, to.to.node, to, Outcome::Denied(denial));
                }
            }
            Err(error) => {
                tracing::warn!(%error, "replicas: refused commands could not be settled; proposed again at the next tick");
            }
        }
    }
}

/// Sends what a turn's room entries owe, once the turn is durable.
pub(super) fn release<S: System<Msg = Msg>>(turn: RoomsTurn, cx: &mut Context<'_, S>) {
    let me = cx.node();
    for (to, outcome) in turn.answers {
        reply(cx, to.to.node, to, outcome);
    }
    for node in turn.kicks {
        cx.send(outbox_of(me, node), OutboxMsg::Kick);
    }
    if !turn.applied.is_empty() {
        let entries = turn.applied;
        cx.send(gateway_of(me), ClientMsg::Applied { entries });
    }
    for (room, user, attestation) in turn.evict_again {
        cx.send(room_of(me, room), RoomMsg::Evict { user, attestation });
    }
    for (room, user) in turn.revoked {
        cx.send(room_of(me, room), RoomMsg::Revoked { user });
    }
}

//! Raft: the replication groups every node runs keep Raft's promises, across
//! crashes, partitions, lost messages and nodes back with an empty disk.
//!
//! - **One leader per term**: no two nodes tell their gateways they lead one
//!   group in one term.
//! - **One vote per term**: no node grants its vote in one group and term to two
//!   candidates (seen in the messages the network carries), not even after its
//!   disk was lost.
//! - **Nothing goes back**: after a restart, a node's stored term is at least
//!   any term it sent a message in, and its stored vote (in that term) is the
//!   one it granted; its stored commit index is at least any it announced.
//! - **Committed entries never change**: every entry a replica's stored commit
//!   index covers is the same, on every replica and at every look.
//! - **Applied is committed**: what a replica applied (its hash chain) is a
//!   prefix of its committed log, recomputed.
//! - **Liveness**: once faults stop, every group whose live, caught-up replicas
//!   are a majority converges (equal logs, all committed) within
//!   [`super::liveness::LIVENESS_BOUND`].

use std::collections::BTreeMap;

use conclave_actors::actor::Time;
use conclave_actors::domain::Outcome;
use conclave_actors::replication::layout::raft_id;
use conclave_actors::replication::log::{self, Applied};
use conclave_actors::replication::{ProposalId, Replication};
use conclave_storage::{ReadTxn, Store};
use prost::Message as _;
use raft::prelude::{Message, MessageType};
use sha2::{Digest, Sha256};

use super::liveness::LIVENESS_BOUND;
use super::{Oracle, Phase, Verdict, View, RAFT};
use crate::cluster::{Carried, Cluster};

/// What a node told the others, in one group.
#[derive(Clone, Copy, Default)]
struct Said {
    /// The highest term it sent a message in (pre-votes aside: they name the
    /// term a candidate would take, not its own).
    term: u64,
    /// The highest commit index it announced.
    commit: u64,
}

/// See the module docs.
#[derive(Default)]
pub struct RaftOracle {
    /// How many of [`Cluster::leading`] were checked.
    leading_seen: usize,
    /// The leader of each (group, term).
    leaders: BTreeMap<(u64, u64), usize>,
    /// The candidate each (node, group, term) granted its vote to.
    votes: BTreeMap<(usize, u64, u64), u64>,
    /// What each (node, group) said since it last started.
    said: BTreeMap<(usize, u64), Said>,
    /// Every committed entry seen: (group, index) → (term, hash of its context
    /// and data).
    committed: BTreeMap<(u64, u64), (u64, [u8; 32])>,
    /// Where each proposal id was seen committed: (group, index), first seen.
    committed_ids: BTreeMap<ProposalId, (u64, u64)>,
    /// The proposal id of each committed entry that has one.
    id_at: BTreeMap<(u64, u64), ProposalId>,
    /// When the groups must have converged.
    deadline: Option<Time>,
}

/// Why a stored group did not check out.
enum Checked {
    /// Its log does not verify.
    Corrupt,
    /// A property broke.
    Fails(String),
}

fn fails(detail: String) -> Verdict {
    Verdict::Fails {
        oracle: RAFT,
        detail,
    }
}

fn hash(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

impl RaftOracle {
    fn config(view: &View<'_>) -> Option<Replication> {
        view.cluster.config().replication
    }

    fn check_leaders(&mut self, c: &Cluster) -> Verdict {
        for &(node, group, term) in &c.leading[self.leading_seen..] {
            if let Some(&other) = self.leaders.get(&(group, term)) {
                if other != node {
                    return fails(format!(
                        "group {group}: n{other} and n{node} both led term {term}"
                    ));
                }
            }
            self.leaders.insert((group, term), node);
        }
        self.leading_seen = c.leading.len();
        Verdict::Holds
    }

    fn index(c: &Cluster, id: conclave_actors::ids::NodeId) -> Option<usize> {
        c.nodes.iter().position(|n| n.id == id)
    }

    /// Reads node `i`'s stored state of every group it replicates, checking
    /// each against what was committed before and what it applied.
    fn check_stores(&mut self, view: &View<'_>, i: usize) -> Verdict {
        let Some(config) = Self::config(view) else {
            return Verdict::Holds;
        };
        let c = view.cluster;
        let nodes = c.sorted_ids();
        let Ok(txn) = c.nodes[i].store.read() else {
            return Verdict::Holds;
        };
        for group in config.groups_of(&nodes, c.nodes[i].id) {
            if Self::beyond_tolerance(c, group) {
                continue;
            }
            let flipped = c.flipped.contains(&(i, group));
            match self.check_group(&*txn, i, group, flipped) {
                Ok(()) => {}
                // A flipped bit the node has not repaired yet (it never serves it).
                Err(Checked::Corrupt) if flipped => {}
                Err(Checked::Corrupt) => {
                    return fails(format!("n{i} group {group}: its log does not verify"));
                }
                Err(Checked::Fails(detail)) => return fails(detail),
            }
        }
        Verdict::Holds
    }

    /// Checks node `i`'s stored `group`. A node whose log took a flipped bit
    /// (`flipped`) repairs it by dropping entries, its commit index with them,
    /// and takes them again from the leader: until it has, what it applied may
    /// be ahead of its log.
    fn check_group(
        &mut self,
        txn: &dyn ReadTxn,
        i: usize,
        group: u64,
        flipped: bool,
    ) -> Result<(), Checked> {
        let failed = |e: log::LogError| match e {
            log::LogError::Corrupt { .. } => Checked::Corrupt,
            e => Checked::Fails(format!("n{i} group {group}: {e}")),
        };
        let hard = log::hard_state(txn, group).map_err(failed)?;
        let applied = log::applied(txn, group).map_err(failed)?;
        let repairing = flipped && applied.index > hard.commit;
        if applied.index > hard.commit && !repairing {
            return Err(Checked::Fails(format!(
                "n{i} group {group}: applied up to {} but committed only up to {}",
                applied.index, hard.commit
            )));
        }
        let mut chain = Applied::default();
        for index in 1..=hard.commit {
            let Some(entry) = log::entry(txn, group, index).map_err(failed)? else {
                return Err(Checked::Fails(format!(
                    "n{i} group {group}: committed up to {} but holds no entry {index}",
                    hard.commit
                )));
            };
            let seen = (
                entry.term,
                hash(&[&entry.context[..], &entry.data[..]].concat()),
            );
            if let Ok(id) = <[u8; 16]>::try_from(&entry.context[..]) {
                self.committed_ids
                    .entry(ProposalId(id))
                    .or_insert((group, index));
                self.id_at.insert((group, index), ProposalId(id));
            }
            match self.committed.insert((group, index), seen) {
                Some(before) if before != seen => {
                    return Err(Checked::Fails(format!(
                        "n{i} group {group}: committed entry {index} is of term {}, where a committed entry of term {} was seen",
                        entry.term, before.0
                    )));
                }
                _ => {}
            }
            if index <= applied.index {
                chain = chain.next(&entry);
            }
        }
        if chain != applied && !repairing {
            return Err(Checked::Fails(format!(
                "n{i} group {group}: what it applied (up to {}) is not its committed log",
                applied.index
            )));
        }
        Ok(())
    }

    /// Whether a majority of `group`'s replicas lost their disks (for good, or
    /// came back empty): Raft keeps what a majority holds, so past that it
    /// promises nothing about what was committed.
    fn beyond_tolerance(c: &Cluster, group: u64) -> bool {
        let Some(config) = c.config().replication else {
            return false;
        };
        let replicas = config.replicas(&c.sorted_ids(), group);
        let lost = replicas
            .iter()
            .filter(|id| Self::index(c, **id).is_some_and(|i| c.nodes[i].wiped))
            .count();
        lost > replicas.len() / 2
    }

    /// The leaders announced, then every node's stores.
    fn check_everything_stored(&mut self, view: &View<'_>) -> Verdict {
        if let v @ Verdict::Fails { .. } = self.check_leaders(view.cluster) {
            return v;
        }
        for i in 0..view.cluster.nodes.len() {
            if let v @ Verdict::Fails { .. } = self.check_stores(view, i) {
                return v;
            }
        }
        Verdict::Holds
    }

    /// After node `i` restarted: its stored term, vote and commit are at least
    /// what it said before.
    fn check_restart(&mut self, view: &View<'_>, i: usize) -> Verdict {
        let c = view.cluster;
        let Ok(txn) = c.nodes[i].store.read() else {
            return Verdict::Holds;
        };
        let said: Vec<(u64, Said)> = self
            .said
            .range((i, 0)..=(i, u64::MAX))
            .map(|(&(_, g), &s)| (g, s))
            .collect();
        for (group, said) in said {
            let Ok(hard) = log::hard_state(&*txn, group) else {
                continue; // a corrupt hard state is the log's to report
            };
            // A repaired log lowers its commit index (see `check_group`).
            let commit_back = hard.commit < said.commit && !c.flipped.contains(&(i, group));
            if hard.term < said.term || commit_back {
                return fails(format!(
                    "n{i} group {group}: restarted at term {} commit {}, after it said term {} commit {}",
                    hard.term, hard.commit, said.term, said.commit
                ));
            }
            if let Some(&candidate) = self.votes.get(&(i, group, hard.term)) {
                if hard.vote != candidate {
                    return fails(format!(
                        "n{i} group {group}: restarted with vote {} in term {}, where it had voted for {candidate}",
                        hard.vote, hard.term
                    ));
                }
            }
        }
        Verdict::Holds
    }

    /// Every proposal acknowledged as appended at (group, index) is committed
    /// there; none refused is committed anywhere.
    fn check_proposals(&self, c: &Cluster) -> Result<(), String> {
        for &(node, request, group, id) in &c.proposed {
            if Self::beyond_tolerance(c, group) {
                continue;
            }
            for outcome in c.outcomes(node, request) {
                let at = self.committed_ids.get(&id);
                match outcome {
                    Outcome::Appended { group: g, index } => {
                        if g != group || self.id_at.get(&(g, index)) != Some(&id) {
                            return Err(format!(
                                "a proposal to group {group} through n{node} was acknowledged at index {index} of group {g}, which does not hold it committed"
                            ));
                        }
                    }
                    Outcome::Denied(denial) => {
                        if let Some((g, index)) = at {
                            return Err(format!(
                                "a proposal to group {group} through n{node} was refused ({}) yet committed at index {index} of group {g}",
                                denial.reason()
                            ));
                        }
                    }
                    other => {
                        return Err(format!("a proposal was answered {other:?}"));
                    }
                }
            }
        }
        Ok(())
    }

    /// The replicas of `group` that count towards its liveness: up, and not
    /// lost for good.
    fn converged(
        &self,
        view: &View<'_>,
        config: Replication,
        group: u64,
    ) -> Result<Result<(), String>, String> {
        let c = view.cluster;
        let nodes = c.sorted_ids();
        let replicas = config.replicas(&nodes, group);
        let mut states = Vec::new();
        let mut rejoining = 0;
        for id in &replicas {
            let Some(i) = Self::index(c, *id) else {
                continue;
            };
            let node = &c.nodes[i];
            if !node.up || (node.wiped && !node.reborn) {
                continue;
            }
            let txn = node.store.read().map_err(|e| e.to_string())?;
            if log::rejoining(&*txn, group)
                .map_err(|e| e.to_string())?
                .is_some()
            {
                rejoining += 1;
            }
            let hard = log::hard_state(&*txn, group).map_err(|e| e.to_string())?;
            let applied = log::applied(&*txn, group).map_err(|e| e.to_string())?;
            let last = log::last_index(&*txn, group).map_err(|e| e.to_string())?;
            states.push((i, hard.term, hard.commit, last, applied));
        }
        if states.len() - rejoining <= replicas.len() / 2 {
            // No majority can lead: fail closed is the right answer.
            return Ok(Ok(()));
        }
        let first = states[0];
        let same = |s: &(usize, u64, u64, u64, Applied)| {
            (s.2, s.3, s.4) == (first.2, first.3, first.4) && s.2 == s.3 && s.4.index == s.2
        };
        if first.2 > 0 && rejoining == 0 && states.iter().all(same) {
            return Ok(Ok(()));
        }
        let shown: Vec<String> = states
            .iter()
            .map(|(i, term, commit, last, applied)| {
                format!(
                    "n{i} term {term} commit {commit} last {last} applied {}",
                    applied.index
                )
            })
            .collect();
        Ok(Err(shown.join("; ")))
    }
}

impl Oracle for RaftOracle {
    fn name(&self) -> &'static str {
        RAFT
    }

    fn on_phase(&mut self, view: &View<'_>, phase: Phase) -> Verdict {
        if phase == Phase::Liveness {
            self.deadline = Some(view.cluster.now().saturating_add(LIVENESS_BOUND));
        }
        self.check_leaders(view.cluster)
    }

    fn on_carried(&mut self, view: &View<'_>, carried: &Carried) -> Verdict {
        if carried.raft.is_empty() {
            return Verdict::Holds;
        }
        let c = view.cluster;
        let Some(i) = Self::index(c, carried.from) else {
            return Verdict::Holds;
        };
        let nodes = c.sorted_ids();
        let Some(me) = raft_id(&nodes, carried.from) else {
            return Verdict::Holds;
        };
        for packet in &carried.raft {
            let Ok(m) = Message::decode(&packet.message[..]) else {
                return fails(format!("n{i} sent a raft message that does not decode"));
            };
            let group = packet.group;
            let pre = matches!(
                m.msg_type(),
                MessageType::MsgRequestPreVote | MessageType::MsgRequestPreVoteResponse
            );
            let said = self.said.entry((i, group)).or_default();
            if !pre {
                said.term = said.term.max(m.term);
            }
            if matches!(
                m.msg_type(),
                MessageType::MsgAppend | MessageType::MsgHeartbeat
            ) {
                said.commit = said.commit.max(m.commit);
            }
            let granted = m.msg_type() == MessageType::MsgRequestVoteResponse && !m.reject;
            if granted && m.from == me {
                let vote = self.votes.entry((i, group, m.term)).or_insert(m.to);
                if *vote != m.to {
                    return fails(format!(
                        "group {group}: n{i} voted for both {} and {} in term {}",
                        *vote, m.to, m.term
                    ));
                }
            }
        }
        self.check_leaders(c)
    }

    fn on_restart(&mut self, view: &View<'_>, node: usize) -> Verdict {
        match self.check_restart(view, node) {
            Verdict::Holds => self.check_stores(view, node),
            other => other,
        }
    }

    fn on_settling(&mut self, view: &View<'_>) -> Verdict {
        if let v @ Verdict::Fails { .. } = self.check_everything_stored(view) {
            return v;
        }
        let Some(config) = Self::config(view) else {
            return Verdict::Holds;
        };
        for group in config.groups() {
            match self.converged(view, config, group) {
                Ok(Ok(())) => {}
                Ok(Err(states)) => {
                    let late = self.deadline.is_some_and(|d| view.cluster.now() >= d);
                    if late {
                        return fails(format!(
                            "group {group}: its replicas have not converged {LIVENESS_BOUND:?} after every fault stopped: {states}"
                        ));
                    }
                    return Verdict::Waits;
                }
                Err(error) => return fails(format!("group {group}: {error}")),
            }
        }
        Verdict::Holds
    }

    fn check_final(&mut self, view: &View<'_>) -> Verdict {
        // Replicas decide each committed entry alike (rooms on shard groups).
        if let Some(divergence) = view.cluster.divergences.first() {
            return fails(format!("replicas diverged: {divergence}"));
        }
        if let v @ Verdict::Fails { .. } = self.check_everything_stored(view) {
            return v;
        }
        if let Err(detail) = self.check_proposals(view.cluster) {
            return fails(detail);
        }
        let c = view.cluster;
        let beyond: Vec<String> = Self::config(view)
            .into_iter()
            .flat_map(|config| config.groups())
            .filter(|&g| Self::beyond_tolerance(c, g))
            .map(|g| g.to_string())
            .collect();
        if beyond.is_empty() {
            return Verdict::Holds;
        }
        Verdict::Note(format!(
            "raft group(s) {} lost a majority of their replicas' disks: what they committed was not checked",
            beyond.join(", ")
        ))
    }
}

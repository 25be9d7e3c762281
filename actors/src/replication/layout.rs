//! Which nodes replicate which Raft group, and what replicas send each other.
//! Compiled in every build (the domain's message union carries [`ReplicasMsg`]);
//! the replicas themselves need the `replication` feature.

use core::time::Duration;

use serde::{Deserialize, Serialize};

use crate::ids::{NodeId, RoomId};

/// The group holding what the whole cluster shares (node membership, the user
/// registry, the room → shard directory, in later steps).
pub const META_GROUP: u64 = 0;

/// The most shard groups a cluster may have.
pub const SHARDS_MAX: u16 = 1_024;

/// The most nodes one group may be replicated on.
pub const FACTOR_MAX: u8 = 7;

/// The most bytes of one proposal (an entry alone must fit in one message
/// between replicas, under [`crate::wire::ENVELOPE_BYTES_MAX`]).
pub const PROPOSAL_BYTES_MAX: usize = 256 * 1024;

/// The most bytes of Raft messages one [`ReplicasMsg::Raft`] carries (more wait
/// for the next one), well under [`crate::wire::ENVELOPE_BYTES_MAX`].
pub const PACKETS_BYTES_MAX: usize = 512 * 1024;

/// How replication is laid out over a cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Replication {
    /// How many shard groups there are (besides [`META_GROUP`]).
    pub shards: u16,
    /// How many nodes replicate each group (fewer when the cluster is smaller).
    pub factor: u8,
    /// One tick of every group's clock: heartbeats go out every
    /// [`HEARTBEAT_TICKS`] ticks, elections start after 10 to 20.
    pub tick: Duration,
    /// Whether rooms are sequenced by shard groups ([`Replication::shard_of`])
    /// rather than by their home node alone. Needs [`Replication::covers`].
    pub rooms: bool,
}

/// How many ticks a leader waits between heartbeats.
pub const HEARTBEAT_TICKS: usize = 2;

/// One tick, by default.
pub const TICK_MS: u64 = 100;

impl Default for Replication {
    fn default() -> Self {
        Self {
            shards: 8,
            factor: 3,
            tick: Duration::from_millis(TICK_MS),
            rooms: true,
        }
    }
}

impl Replication {
    /// Every group: the meta group, then the shards.
    pub fn groups(&self) -> impl Iterator<Item = u64> {
        assert!(self.shards <= SHARDS_MAX, "at most {SHARDS_MAX} shards");
        META_GROUP..=u64::from(self.shards)
    }

    /// The nodes that replicate `group`, of the cluster `nodes` (sorted, without
    /// duplicates): `factor` consecutive nodes from the group's own offset, so
    /// that groups, and with them leaders, spread over the nodes.
    pub fn replicas(&self, nodes: &[NodeId], group: u64) -> Vec<NodeId> {
        debug_assert!(nodes.windows(2).all(|w| w[0] < w[1]), "sorted nodes");
        assert!(
            (1..=FACTOR_MAX).contains(&self.factor),
            "a factor of 1 to {FACTOR_MAX}"
        );
        let n = nodes.len();
        let k = usize::from(self.factor).min(n);
        let offset = usize::try_from(group % n.max(1) as u64).unwrap_or(0);
        (0..k).map(|i| nodes[(offset + i) % n]).collect()
    }

    /// What every node of a cluster must agree on, hashed: the shard count, the
    /// factor, whether rooms are on the shards, the sorted nodes and
    /// `decisions`, the settings replicas decide rooms' commands with (how many
    /// frames an epoch carries); the tick may differ. Every request between
    /// replicas carries it, and one with another fingerprint is dropped: nodes
    /// given different settings or peers would otherwise disagree on which
    /// nodes vote in a group, and two leaders could be elected in one term.
    pub fn fingerprint(&self, nodes: &[NodeId], decisions: u64) -> u64 {
        use sha2::{Digest, Sha256};
        let mut hash = Sha256::new();
        hash.update(b"conclave raft layout v1");
        hash.update(self.shards.to_be_bytes());
        hash.update([self.factor, u8::from(self.rooms)]);
        hash.update(decisions.to_be_bytes());
        for node in nodes {
            hash.update(node.0);
        }
        let digest = hash.finalize();
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        u64::from_be_bytes(first)
    }

    /// The shard group that sequences room `room`, homed on `home`, in the
    /// cluster `nodes` (sorted): a shard `home` replicates, so that the home can
    /// always propose for its rooms, preferably one `home` comes first in (the
    /// group's leader once leaders spread: a room is sequenced where it was
    /// created), picked among those by the room id. `None` if `home` is not in
    /// `nodes` or replicates no shard (see [`Replication::covers`]).
    pub fn shard_of(&self, nodes: &[NodeId], home: NodeId, room: RoomId) -> Option<u64> {
        let shards = (META_GROUP + 1)..=u64::from(self.shards);
        let held: Vec<(u64, bool)> = shards
            .filter_map(|g| {
                let replicas = self.replicas(nodes, g);
                let at = replicas.iter().position(|&n| n == home)?;
                Some((g, at == 0))
            })
            .collect();
        let led: Vec<u64> = held
            .iter()
            .filter(|(_, first)| *first)
            .map(|(g, _)| *g)
            .collect();
        let candidates: Vec<u64> = if led.is_empty() {
            held.iter().map(|(g, _)| *g).collect()
        } else {
            led
        };
        let mut first = [0u8; 8];
        first.copy_from_slice(&room.0[..8]);
        let pick = u64::from_be_bytes(first) % (candidates.len().max(1) as u64);
        candidates.get(usize::try_from(pick).ok()?).copied()
    }

    /// Whether every node of `nodes` replicates at least one shard, so that
    /// rooms homed anywhere have a shard ([`Replication::shard_of`]): true when
    /// `shards + factor - 1 >= nodes`.
    pub fn covers(&self, nodes: &[NodeId]) -> bool {
        nodes
            .iter()
            .all(|&n| self.groups_of(nodes, n).iter().any(|&g| g != META_GROUP))
    }

    /// The groups `node` replicates.
    pub fn groups_of(&self, nodes: &[NodeId], node: NodeId) -> Vec<u64> {
        self.groups()
            .filter(|&g| self.replicas(nodes, g).contains(&node))
            .collect()
    }
}

/// The address of `node`'s replicas actor.
pub fn replicas_of(node: NodeId) -> crate::actor::ActorRef {
    use crate::actor::{ActorKey, ActorKind, ActorRef};
    ActorRef::new(node, ActorKind::REPLICAS, ActorKey::Unit)
}

/// A node's id within every Raft group: its place in the sorted cluster, from 1
/// (raft-rs reserves 0).
pub fn raft_id(nodes: &[NodeId], node: NodeId) -> Option<u64> {
    nodes.binary_search(&node).ok().map(|i| i as u64 + 1)
}

/// The node with Raft id `id`.
pub fn node_of(nodes: &[NodeId], id: u64) -> Option<NodeId> {
    let i = usize::try_from(id.checked_sub(1)?).ok()?;
    nodes.get(i).copied()
}

/// One Raft message of one group, encoded as raft-rs encodes it (protobuf).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Packet {
    /// The group.
    pub group: u64,
    /// The encoded message.
    #[serde(with = "serde_bytes")]
    pub message: Vec<u8>,
}

/// What a node's replicas actor handles.
#[derive(Debug, Serialize, Deserialize)]
pub enum ReplicasMsg {
    /// Its clock: every group ticks once.
    Tick,
    /// Room commands were added to this node's owed table
    /// ([`crate::domain::room::shard::owe`]): propose them (local senders only).
    Kick,
    /// Raft messages from the replicas actor of another node, for any of the
    /// groups both replicate (batched: one message per node pair and turn).
    Raft {
        /// The messages, in the order sent.
        packets: Vec<Packet>,
        /// The sender's run (drawn when its replicas actor starts): a leader
        /// takes from a node that rejoined only the acknowledgements of the run
        /// that rejoined (see [`ReplicasMsg::Rejoined`]).
        run: u64,
        /// The sender's [`Replication::fingerprint`]: nodes laid out otherwise
        /// would disagree on who votes in a group, so what they send is dropped.
        layout: u64,
    },
    /// From a node whose store lost entries (emptied, or repaired) to the
    /// leaders it hears from: it may have acknowledged entries it no longer
    /// has; forget that, and send it the log again from the start.
    Rejoined {
        /// The groups (that the receiver leads).
        groups: Vec<u64>,
        /// The sender's run: acknowledgements of its earlier runs, still on
        /// their way, are dropped until it has caught up.
        run: u64,
        /// The sender's [`Replication::fingerprint`].
        layout: u64,
    },
    /// A leader's answer to [`ReplicasMsg::Rejoined`]: it forgot what the node
    /// had acknowledged, as of (group, term, commit index); the node votes
    /// again only once it holds that commit index.
    Reset {
        /// (group, term, commit index at the reset).
        groups: Vec<(u64, u64, u64)>,
    },
    /// From a rejoining node to the other replicas of its groups: what term is
    /// each at? (It must not vote in a term it may have voted in before its
    /// loss; any term whose election it helped win is at most what a majority
    /// of the others answer.)
    Terms {
        /// The groups.
        groups: Vec<u64>,
        /// The sender's [`Replication::fingerprint`].
        layout: u64,
    },
    /// The answer to [`ReplicasMsg::Terms`]: (group, current term).
    TermsAre {
        /// The groups and their terms here.
        groups: Vec<(u64, u64)>,
    },
    /// Append `data` to `group`'s log (local senders only). The outcome goes to
    /// this node's gateway as request `request`: refused at once when the
    /// group is not replicated here or no leader is known ([`crate::domain::Denial::NoQuorum`]),
    /// else [`crate::domain::Outcome::Appended`] once this node applied it. A
    /// proposal whose leader is lost before it commits gets no answer: the
    /// caller retries, and what it proposes must be idempotent (rooms refuse a
    /// message id twice).
    Propose {
        /// The group.
        group: u64,
        /// The proposal's id, unique per proposal (kept with the entry).
        id: ProposalId,
        /// What to append.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
        /// The caller's request number at this node's gateway.
        request: u64,
    },
}

impl ReplicasMsg {
    /// The sender's layout fingerprint, on the requests between replicas (the
    /// answers, [`ReplicasMsg::Reset`] and [`ReplicasMsg::TermsAre`], are taken
    /// only as answers to a request of this node's).
    pub fn layout(&self) -> Option<u64> {
        match self {
            ReplicasMsg::Raft { layout, .. }
            | ReplicasMsg::Rejoined { layout, .. }
            | ReplicasMsg::Terms { layout, .. } => Some(*layout),
            ReplicasMsg::Tick
            | ReplicasMsg::Kick
            | ReplicasMsg::Reset { .. }
            | ReplicasMsg::TermsAre { .. }
            | ReplicasMsg::Propose { .. } => None,
        }
    }
}

/// What a node's replicas hold, as `/healthz` shows it (sent to the node's
/// gateway whenever it changes, checked at every tick).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicationStatus {
    /// The groups this node replicates.
    pub groups: u32,
    /// Of them, those it leads.
    pub leading: u32,
    /// Those it follows a known leader in.
    pub following: u32,
    /// Those with no leader it knows of: proposals to them are refused
    /// `no_quorum`.
    pub without_leader: u32,
    /// Those it is rejoining (its store lost entries): it does not vote there
    /// until a leader has caught it up.
    pub rejoining: u32,
    /// Those that could not be opened or whose log is being repaired.
    pub unopened: u32,
    /// As leader, the most entries any voter of one of its groups lacks.
    pub lag_entries: u64,
    /// The groups it leads (at most [`SHARDS_MAX`] + 1): with the layout, which
    /// node sequences a room now.
    #[serde(default)]
    pub led: Vec<u64>,
}

/// A proposal's id: drawn at random by the proposer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ProposalId(pub [u8; 16]);

/// The most proposals a node waits on at once (more are refused with
/// [`crate::domain::Denial::Limit`]).
pub const PENDING_PROPOSALS_MAX: usize = 4_096;

/// How many ticks a node waits for its proposal to be applied before it stops
/// waiting (the proposal may still commit; its caller retries).
pub const PROPOSAL_TICKS_MAX: u64 = 200;

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(n: u8) -> Vec<NodeId> {
        (0..n).map(|i| NodeId([i; 32])).collect()
    }

    #[test]
    fn each_group_has_factor_replicas_and_groups_spread_over_the_nodes() {
        let config = Replication::default();
        let cluster = nodes(5);
        let mut firsts = std::collections::BTreeSet::new();
        for group in config.groups() {
            let replicas = config.replicas(&cluster, group);
            assert_eq!(replicas.len(), 3);
            let distinct: std::collections::BTreeSet<_> = replicas.iter().collect();
            assert_eq!(distinct.len(), 3, "three distinct nodes");
            firsts.insert(replicas[0]);
        }
        assert_eq!(firsts.len(), 5, "every node comes first for some group");
        let small = nodes(2);
        assert_eq!(
            config.replicas(&small, 3).len(),
            2,
            "two nodes: two replicas"
        );
    }

    #[test]
    fn raft_ids_count_from_one_and_map_back() {
        let cluster = nodes(3);
        for (i, &node) in cluster.iter().enumerate() {
            let id = raft_id(&cluster, node).unwrap();
            assert_eq!(id, i as u64 + 1);
            assert_eq!(node_of(&cluster, id), Some(node));
        }
        assert_eq!(node_of(&cluster, 0), None);
        assert_eq!(node_of(&cluster, 4), None);
        assert_eq!(raft_id(&cluster, NodeId([9; 32])), None);
    }

    #[test]
    fn a_room_goes_to_a_shard_its_home_replicates_and_leads_when_one_exists() {
        let config = Replication::default();
        let cluster = nodes(5);
        for (i, &home) in cluster.iter().enumerate() {
            for r in 0..32u8 {
                let room = RoomId([r; 16]);
                let shard = config.shard_of(&cluster, home, room).unwrap();
                assert_ne!(shard, META_GROUP);
                let replicas = config.replicas(&cluster, shard);
                assert_eq!(replicas[0], home, "n{i} leads shard {shard}");
                assert_eq!(config.shard_of(&cluster, home, room), Some(shard));
            }
        }
        // One shard on five nodes is held by three of them.
        let one = Replication {
            shards: 1,
            ..config
        };
        assert!(!one.covers(&cluster));
        let holders = one.replicas(&cluster, 1);
        for &home in &cluster {
            let shard = one.shard_of(&cluster, home, RoomId([1; 16]));
            assert_eq!(shard.is_some(), holders.contains(&home));
        }
        let three = Replication {
            shards: 3,
            ..config
        };
        assert!(
            three.covers(&cluster),
            "3 shards of 3 replicas cover 5 nodes"
        );
        assert!(config.covers(&cluster));
    }

    #[test]
    fn the_fingerprint_changes_with_what_replicas_must_agree_on_but_not_the_tick() {
        let config = Replication::default();
        let base = config.fingerprint(&nodes(3), 7);
        let slower = Replication {
            tick: Duration::from_secs(1),
            ..config
        };
        assert_eq!(slower.fingerprint(&nodes(3), 7), base);
        let more = Replication {
            shards: config.shards + 1,
            ..config
        };
        assert_ne!(more.fingerprint(&nodes(3), 7), base);
        let wider = Replication {
            factor: 5,
            ..config
        };
        assert_ne!(wider.fingerprint(&nodes(3), 7), base);
        let homed = Replication {
            rooms: !config.rooms,
            ..config
        };
        assert_ne!(homed.fingerprint(&nodes(3), 7), base);
        assert_ne!(config.fingerprint(&nodes(4), 7), base);
        assert_ne!(
            config.fingerprint(&nodes(3), 8),
            base,
            "another epoch bound"
        );
    }
}

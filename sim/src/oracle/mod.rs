//! The oracles: each one property of the system, in a module of its own, behind
//! one small interface ([`Oracle`]), as TigerBeetle keeps its state checker.
//!
//! An oracle sees the run through hooks (a room's decision, a message on the
//! network, what a client saw, a home after a restart, the settling after every
//! fault stopped, the end), reads the [`Model`] and the [`Cluster`] through a
//! read-only [`View`], keeps whatever state of its own it needs, and answers with
//! a [`Verdict`]: failures are values, never panics. [`Checks`] runs them all, in
//! the order of [`ORACLES`], and keeps the first failure.

use core::fmt;

use conclave_actors::crypto::EpochKey;
use conclave_actors::domain::chain::KeyRefusal;
use conclave_actors::ids::{Epoch, MessageId, RoomId, Seq};

use crate::cluster::{Carried, Cluster, Observation, START};
use crate::faults::live;
use crate::model::{Model, OpKey};
use crate::run::Failure;
use crate::workload::Roster;

pub mod abuse;
pub mod authz;
pub mod chain;
pub mod decrypt;
pub mod durability;
pub mod epoch;
pub mod leak;
pub mod liveness;
pub mod order;
pub mod raft;

/// No committed frame is lost or replaced, across any crash.
pub const DURABILITY: &str = "durability";
/// Every member node sees a room's frames and updates in one order, with no gap
/// and no duplicate; no request is applied twice.
pub const ORDER: &str = "order";
/// No node is sent a frame or key of an epoch in which none of its users was a
/// member.
pub const LEAK: &str = "leak";
/// Frames committed after a removal are of the new epoch, so the removed
/// member's keys open none of them.
pub const EPOCH: &str = "epoch";
/// Only members' frames and managers' changes are accepted, by the home.
pub const AUTHZ: &str = "authz";
/// What one user does cannot take what every user shares: a non-member's publish
/// never leaves their node, and publishes past a user's quota are refused.
pub const ABUSE: &str = "abuse";
/// Every delivered frame verifies and decrypts for its members, to what was sent.
pub const DECRYPT: &str = "decrypt";
/// Once faults stop, outboxes drain and members converge in bounded time.
pub const LIVENESS: &str = "liveness";
/// Every key a client accepts is the one the room's true chain pins for an epoch
/// it has; every node's chain is a prefix of the home's, which verifies and lists
/// the home's members; no epoch carries more frames than the bound.
pub const CHAIN: &str = "chain";
/// The replication groups keep Raft's promises: one leader per term, one vote
/// per node and term, nothing stored goes back across a crash, committed entries
/// never change, what is applied is committed, and groups converge once faults
/// stop.
pub const RAFT: &str = "raft";
/// The fault-free setup did not complete (a bug, or a mutation that breaks
/// even the fault-free path).
pub const SETUP: &str = "setup";

/// Every oracle, in the order [`Checks`] asks them.
pub const ORACLES: [&str; 10] = [
    DURABILITY, ORDER, LEAK, EPOCH, AUTHZ, ABUSE, DECRYPT, CHAIN, RAFT, LIVENESS,
];

/// What the oracles may read: the cluster, the model and what the workload made.
#[derive(Clone, Copy)]
pub struct View<'a> {
    /// The cluster, its nodes and their stores.
    pub cluster: &'a Cluster,
    /// Every room as its home decided it.
    pub model: &'a Model,
    /// The workload's users and rooms.
    pub roster: &'a Roster,
}

impl View<'_> {
    /// Whether node `i` is up and not lost for good.
    pub fn live(&self, i: usize) -> bool {
        live(self.cluster, i)
    }

    /// Whether node `i` is lost for good.
    pub fn wiped(&self, i: usize) -> bool {
        self.cluster.nodes[i].wiped
    }

    /// The nodes holding the state `room`'s commands are decided on: its home
    /// `home`, or with rooms on shard groups, the replicas of its shard.
    pub fn sequencers(&self, room: RoomId, home: usize) -> Vec<usize> {
        let Some(sharding) = self.cluster.sharding() else {
            return vec![home];
        };
        let replicas = sharding.replicas(self.cluster.id(home), room);
        replicas
            .into_iter()
            .filter_map(|n| self.cluster.index(n))
            .collect()
    }

    /// Whether node `i` decides `room`'s commands itself (its users' are not
    /// forwarded).
    pub fn sequences(&self, room: RoomId, home: usize, i: usize) -> bool {
        i == home || self.sequencers(room, home).contains(&i)
    }

    /// Whether Raft group `group` lost the disks of a majority of its
    /// replicas (lost for good, or back empty): it keeps only what the others
    /// hold, and cannot elect a leader again (a replica back empty votes only
    /// once a leader caught it up).
    pub fn group_lost(&self, group: u64) -> bool {
        let Some(sharding) = self.cluster.sharding() else {
            return false;
        };
        let replicas = sharding.layout.replicas(&sharding.nodes, group);
        let lost = replicas
            .iter()
            .filter_map(|&id| self.cluster.index(id))
            .filter(|&i| self.wiped(i))
            .count();
        2 * lost >= replicas.len()
    }

    /// Whether `room`, homed on `home`, is lost: its home's disk (without
    /// shards), or the disks of a majority of its shard's replicas, were lost.
    pub fn room_lost(&self, room: RoomId, home: usize) -> bool {
        let Some(sharding) = self.cluster.sharding() else {
            return self.wiped(home);
        };
        sharding
            .shard(self.cluster.id(home), room)
            .is_none_or(|g| self.group_lost(g))
    }

    /// Of the nodes holding `room`'s sequencer state and not lost for good,
    /// the one furthest on (its home without shards): what the room committed
    /// is judged against it, a replica may lag behind. `None` if the room is
    /// lost ([`View::room_lost`]).
    pub fn reference(&self, room: RoomId, home: usize) -> Option<usize> {
        // Lost (a majority of its shard's disks): nothing left to judge against.
        if self.room_lost(room, home) {
            return None;
        }
        let progress = |i: usize| {
            let txn = conclave_storage::Store::read(self.cluster.nodes[i].store.as_ref()).ok()?;
            let meta = conclave_actors::domain::state::rooms::meta(&*txn, room).ok()??;
            Some((meta.next_seq, meta.members_version))
        };
        let candidates = self.sequencers(room, home).into_iter();
        candidates
            .filter(|&i| !self.wiped(i))
            .max_by_key(|&i| (progress(i), i == home))
    }
}

/// A phase of the run (see [`crate::run`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Users, rooms and first members, without faults.
    Setup,
    /// The workload under the seed's faults.
    Chaos,
    /// Every fault has stopped; the cluster must converge.
    Liveness,
    /// The checks at the end.
    Final,
}

/// What a client of the workload did or saw.
#[derive(Clone, Copy)]
pub enum Seen<'a> {
    /// A request that a node may forward to the room's home.
    Sent {
        /// The user's node.
        node: usize,
        /// The request, on that node.
        request: u64,
        /// Its room.
        room: RoomId,
        /// What the home will know it by.
        key: OpKey,
        /// Whether its home reports its outcome to the user's node durably (a
        /// membership change; a read is not reported).
        reported: bool,
    },
    /// A frame published.
    Published {
        /// The user.
        user: usize,
        /// The user's node.
        node: usize,
        /// The publish request, on that node.
        request: u64,
        /// Its room.
        room: RoomId,
        /// Its message id.
        id: MessageId,
        /// What was sealed in it.
        text: &'a [u8],
    },
    /// A client refused a key its node holds for its user: it does not open, or
    /// the room's chain (as the user's node holds it) does not let the client
    /// take it. Legitimate when the node lies or the chain has not arrived yet.
    KeyRefused {
        /// The user.
        user: usize,
        /// Their node.
        node: usize,
        /// The room.
        room: RoomId,
        /// The key's epoch.
        epoch: Epoch,
        /// Why it was refused.
        refusal: &'a KeyRefusal,
    },
    /// A client accepted a key its node holds for its user, as the key of the
    /// room at `epoch`.
    KeyAccepted {
        /// The user.
        user: usize,
        /// Their node.
        node: usize,
        /// The room.
        room: RoomId,
        /// The key's epoch.
        epoch: Epoch,
        /// The key.
        key: &'a EpochKey,
    },
    /// A node revoked one of its users (its admin's request was done): it must
    /// have them evicted from every room they were a member of.
    Revoked {
        /// The user.
        user: usize,
        /// Their node.
        node: usize,
    },
    /// A subscriber read the frame at `seq` (not yet opened).
    Read {
        /// The subscriber's user.
        user: usize,
        /// Their node.
        node: usize,
        /// The room.
        room: RoomId,
        /// Where the frame is.
        seq: Seq,
        /// The sequence number the subscriber expected.
        next: u64,
        /// The frame's message id.
        id: MessageId,
    },
    /// A hostile user published `id`, sealed with a key of their own, to a room
    /// they were not a member of as their node's disk said. If they became a
    /// member again before their node took it, it is a member's frame nobody
    /// can open: a node cannot see what a frame is sealed with.
    Trespassed {
        /// The frame's message id.
        id: MessageId,
    },
    /// A hostile user handed their node `requests`, publishes all at once: at
    /// most `allowance` of them may pass their publish quota.
    Flood {
        /// The user.
        user: usize,
        /// Their node.
        node: usize,
        /// The publish requests, on that node.
        requests: &'a [u64],
        /// A full bucket and a second's refill.
        allowance: u64,
    },
    /// At the end of the run, a subscriber holds no key for a frame it may read.
    NoKey {
        /// The subscriber's user.
        user: usize,
        /// Their node.
        node: usize,
        /// The room.
        room: RoomId,
        /// Where the frame is.
        seq: Seq,
        /// The frame's epoch.
        epoch: Epoch,
    },
    /// A subscriber opened a frame, or failed to.
    Opened {
        /// The subscriber's user.
        user: usize,
        /// Their node.
        node: usize,
        /// The room.
        room: RoomId,
        /// Where the frame is.
        seq: Seq,
        /// The frame's message id.
        id: MessageId,
        /// What it decrypted to, or why it did not open.
        text: Result<&'a [u8], &'a dyn fmt::Display>,
    },
}

/// An oracle's answer at one hook.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing wrong.
    Holds,
    /// Nothing wrong yet, but not settled either: ask again after the next slice
    /// (only while the run settles).
    Waits,
    /// Nothing wrong, and something to state (what a loss took with it).
    Note(String),
    /// A property broke. `oracle` is the oracle's own name, except that
    /// liveness names the property a loss for good broke.
    Fails {
        /// Which property.
        oracle: &'static str,
        /// What broke it.
        detail: String,
    },
}

/// One property of the system, checked during and after a run. Every hook has a
/// default that holds, so an oracle implements only what it watches.
pub trait Oracle {
    /// Its name (one of [`ORACLES`]).
    fn name(&self) -> &'static str;

    /// The run enters `phase`.
    fn on_phase(&mut self, _view: &View<'_>, _phase: Phase) -> Verdict {
        Verdict::Holds
    }

    /// A room decided; the model takes the decision in after this hook, and only
    /// if no oracle objected.
    fn on_decision(&mut self, _view: &View<'_>, _decision: &Observation) -> Verdict {
        Verdict::Holds
    }

    /// The network delivered a cross-node message.
    fn on_carried(&mut self, _view: &View<'_>, _carried: &Carried) -> Verdict {
        Verdict::Holds
    }

    /// Node `node` handled a message to its actor for `room`.
    fn on_room_handled(&mut self, _view: &View<'_>, _node: usize, _room: RoomId) -> Verdict {
        Verdict::Holds
    }

    /// A client of the workload did or saw something.
    fn on_client(&mut self, _view: &View<'_>, _seen: &Seen<'_>) -> Verdict {
        Verdict::Holds
    }

    /// The home of `room` is checked against what it committed (after it
    /// restarted, and at the end).
    fn on_home(&mut self, _view: &View<'_>, _room: RoomId) -> Verdict {
        Verdict::Holds
    }

    /// Node `node` restarted from its store (not after a wipe).
    fn on_restart(&mut self, _view: &View<'_>, _node: usize) -> Verdict {
        Verdict::Holds
    }

    /// Every fault has stopped and another slice of time has run.
    fn on_settling(&mut self, _view: &View<'_>) -> Verdict {
        Verdict::Holds
    }

    /// The end of the run.
    fn check_final(&mut self, _view: &View<'_>) -> Verdict {
        Verdict::Holds
    }
}

/// What one round of hooks found, besides the failure [`Checks`] keeps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Round {
    /// How many oracles failed.
    pub failed: usize,
    /// Whether some oracle is not settled yet.
    pub waits: bool,
}

/// Every oracle, the first failure and the notes of a run.
pub struct Checks {
    oracles: Vec<Box<dyn Oracle>>,
    failure: Option<Failure>,
    notes: Vec<String>,
}

impl Default for Checks {
    fn default() -> Self {
        Self::new()
    }
}

impl Checks {
    /// All of [`ORACLES`], in order.
    pub fn new() -> Self {
        let oracles: Vec<Box<dyn Oracle>> = vec![
            Box::new(durability::Durability::default()),
            Box::new(order::Order::default()),
            Box::new(leak::Leak),
            Box::new(epoch::EpochOracle),
            Box::new(authz::Authz),
            Box::new(abuse::Abuse::default()),
            Box::new(decrypt::Decrypt::default()),
            Box::new(chain::ChainOracle::default()),
            Box::new(raft::RaftOracle::default()),
            Box::new(liveness::Liveness::default()),
        ];
        let names: Vec<&str> = oracles.iter().map(|o| o.name()).collect();
        assert_eq!(names, ORACLES, "the oracles, in their order");
        Checks {
            oracles,
            failure: None,
            notes: Vec::new(),
        }
    }

    /// Whether an oracle failed.
    pub fn failed(&self) -> bool {
        self.failure.is_some()
    }

    /// The first failure.
    pub fn failure(&self) -> Option<&Failure> {
        self.failure.as_ref()
    }

    /// Takes the notes.
    pub fn take_notes(&mut self) -> Vec<String> {
        std::mem::take(&mut self.notes)
    }

    /// States `note` in the report.
    pub fn note(&mut self, note: String) {
        self.notes.push(note);
    }

    /// Records a failure, unless one is recorded already (the first one counts,
    /// and is folded into the trace).
    pub fn fail(&mut self, c: &mut Cluster, oracle: &'static str, detail: String) {
        if self.failure.is_none() {
            c.mark(&format!("FAIL {oracle}: {detail}"));
            let at = c.now().saturating_since(START);
            self.failure = Some(Failure { oracle, detail, at });
        }
    }

    /// Asks every oracle `hook`, in order.
    pub fn round(
        &mut self,
        c: &mut Cluster,
        model: &Model,
        roster: &Roster,
        mut hook: impl FnMut(&mut dyn Oracle, &View<'_>) -> Verdict,
    ) -> Round {
        let mut round = Round::default();
        let mut failures = Vec::new();
        {
            let view = View {
                cluster: c,
                model,
                roster,
            };
            for oracle in &mut self.oracles {
                match hook(oracle.as_mut(), &view) {
                    Verdict::Holds => {}
                    Verdict::Waits => round.waits = true,
                    Verdict::Note(note) => self.notes.push(note),
                    Verdict::Fails { oracle, detail } => failures.push((oracle, detail)),
                }
            }
        }
        round.failed = failures.len();
        for (oracle, detail) in failures {
            self.fail(c, oracle, detail);
        }
        round
    }
}

/// The first four bytes of an id, in hex (how failures name rooms and users).
pub fn short(bytes: &[u8]) -> String {
    bytes[..4].iter().map(|b| format!("{b:02x}")).collect()
}

/// "3..5, 9" for [3, 4, 5, 9].
pub fn ranges(seqs: &[u64]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < seqs.len() {
        let start = seqs[i];
        let mut end = start;
        while i + 1 < seqs.len() && seqs[i + 1] == end + 1 {
            i += 1;
            end = seqs[i];
        }
        out.push(if start == end {
            start.to_string()
        } else {
            format!("{start}..{end}")
        });
        i += 1;
    }
    out.join(", ")
}

/// The first few of `items`, and how many more.
pub fn summarize(items: &[String]) -> String {
    const SHOWN: usize = 6;
    let mut s = items
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join("; ");
    if items.len() > SHOWN {
        s.push_str(&format!("; and {} more", items.len() - SHOWN));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_join_runs() {
        assert_eq!(ranges(&[3, 4, 5, 9]), "3..5, 9");
        assert_eq!(ranges(&[]), "");
        assert_eq!(ranges(&[1]), "1");
    }

    #[test]
    fn summarize_counts_what_it_leaves_out() {
        let items: Vec<String> = (0..8).map(|i| i.to_string()).collect();
        assert_eq!(summarize(&items), "0; 1; 2; 3; 4; 5; and 2 more");
    }

    use conclave_actors::domain::{History, Outcome};
    use conclave_actors::ids::{Epoch, MessageId, RoomId, Seq};
    use conclave_actors::UserId;

    use crate::cluster::{FrameHeader, Observed};
    use crate::model::RoomModel;

    const ROOM: RoomId = RoomId([7; 16]);
    const OWNER: UserId = UserId([1; 32]);

    /// Which oracles object when node `node` commits message `id` of `epoch`, sent
    /// by `sender`, at `seq`, to a room homed on node 0 at epoch 2 that committed
    /// message 1 at seq 1.
    fn objections(
        node: usize,
        sender: UserId,
        epoch: u64,
        id: u128,
        seq: u64,
    ) -> Vec<&'static str> {
        let mut c = Cluster::new(2, 1);
        let mut model = Model::default();
        let mut room = RoomModel::created(0, History::FromJoin, OWNER);
        room.epoch = 2;
        room.epoch_start.insert(2, 1);
        room.allowed.insert(2, [0].into());
        model.rooms.insert(ROOM, room);
        let first = Observation {
            node: 0,
            entry: None,
            room: ROOM,
            what: Observed::Publish {
                frame: FrameHeader {
                    room: ROOM,
                    epoch: Epoch(2),
                    sender: OWNER,
                    id: MessageId(1),
                },
                outcome: Outcome::Committed {
                    id: MessageId(1),
                    seq: Seq(1),
                },
            },
        };
        model.take(&c, &first, true);
        let decision = Observation {
            node,
            entry: None,
            room: ROOM,
            what: Observed::Publish {
                frame: FrameHeader {
                    room: ROOM,
                    epoch: Epoch(epoch),
                    sender,
                    id: MessageId(id),
                },
                outcome: Outcome::Committed {
                    id: MessageId(id),
                    seq: Seq(seq),
                },
            },
        };
        let roster = Roster::default();
        let mut checks = Checks::new();
        let mut failed = Vec::new();
        for oracle in &mut checks.oracles {
            let view = View {
                cluster: &c,
                model: &model,
                roster: &roster,
            };
            if let Verdict::Fails { oracle, .. } = oracle.on_decision(&view, &decision) {
                failed.push(oracle);
            }
        }
        let round = checks.round(&mut c, &model, &roster, |o, view| {
            o.on_decision(view, &decision)
        });
        assert_eq!(round.failed, failed.len());
        assert_eq!(checks.failure().map(|f| f.oracle), failed.first().copied());
        failed
    }

    #[test]
    fn each_wrong_commit_is_one_oracles_alone() {
        let stranger = UserId([9; 32]);
        assert_eq!(objections(0, OWNER, 2, 2, 2), Vec::<&str>::new());
        assert_eq!(objections(1, OWNER, 2, 2, 2), [AUTHZ], "not the home");
        assert_eq!(objections(0, OWNER, 2, 1, 2), [ORDER], "committed twice");
        assert_eq!(objections(0, OWNER, 2, 2, 3), [ORDER], "a gap");
        assert_eq!(objections(0, OWNER, 2, 2, 1), [DURABILITY], "replaced");
        assert_eq!(objections(0, OWNER, 1, 2, 2), [EPOCH], "a stale epoch");
        assert_eq!(objections(0, stranger, 2, 2, 2), [AUTHZ], "a non-member");
        // Stale and by a non-member: the epoch oracle's, as a frame out of
        // sequence is the order oracle's whatever its epoch.
        assert_eq!(objections(0, stranger, 1, 2, 2), [EPOCH]);
        assert_eq!(objections(0, stranger, 1, 2, 3), [ORDER]);
    }

    #[test]
    fn every_oracle_is_asked_in_order() {
        let checks = Checks::new();
        assert!(!checks.failed());
        assert_eq!(checks.oracles.len(), ORACLES.len());
    }
}

//! The model: each room as its home *decided* it.
//!
//! It is built from the decisions the driver observes leaving the room actors
//! (see [`Observation`]), never from what the stores say, so a broken actor cannot
//! vouch for itself. The oracles read it; the run feeds it each decision after the
//! oracles have seen it, and a decision an oracle objects to is not taken in.

use std::collections::{BTreeMap, BTreeSet};

use conclave_actors::crypto::Frame;
use conclave_actors::domain::chain::Change;
use conclave_actors::domain::{self, History, Invitee, Op, Outcome, RoomRole};
use conclave_actors::ids::{Epoch, MessageId, RoomId, Seq};
use conclave_actors::UserId;
use conclave_storage::{ReadTxn, StoreError};

use crate::cluster::{Cluster, FrameHeader, Observation, Observed};

/// The most frames one scan of a node's copy of a room returns. A run publishes
/// at most about 850 frames (the chaos lasts at most 25 s and the workload steps
/// at most every 30 ms), so a scan that reaches this is a bug of the run, not a
/// long run.
pub const ROOM_FRAMES_MAX: usize = 1 << 16;

/// A node's copy of `room`, from `from` on, bounded by [`ROOM_FRAMES_MAX`].
pub fn room_frames(
    txn: &dyn ReadTxn,
    room: RoomId,
    from: Seq,
) -> Result<Vec<(Seq, Frame)>, StoreError> {
    let frames = domain::state::rooms::frames(txn, room, from, ROOM_FRAMES_MAX)?;
    assert!(
        frames.len() < ROOM_FRAMES_MAX,
        "a scan of a room reached {ROOM_FRAMES_MAX} frames: more than a run publishes"
    );
    debug_assert!(frames.windows(2).all(|w| w[0].0 < w[1].0));
    Ok(frames)
}

/// What one of the model's requests or frames is known by, across nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum OpKey {
    /// A signed request: its user and nonce.
    Request(UserId, u64),
    /// A frame: its message id.
    Frame(MessageId),
}

/// A current member, as the home admitted them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Member {
    /// The node that hosts them.
    pub node: usize,
    /// The first sequence number they may read.
    pub since: u64,
    /// Their role in the room.
    pub role: RoomRole,
}

/// A removed member: what they could read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Removed {
    /// The first sequence number they could read.
    pub since: u64,
    /// The first sequence number after their removal.
    pub until: u64,
}

/// A frame the home committed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Committed {
    /// Its message id.
    pub id: MessageId,
    /// Its epoch.
    pub epoch: u64,
}

/// Where a commit the home reported falls against what it committed before.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Landing {
    /// The receipt names another message than the frame.
    WrongReceipt,
    /// The message was committed before, at `prev`.
    Recommitted {
        /// Where it was committed first.
        prev: u64,
    },
    /// A new message at a sequence number already taken.
    Replaces,
    /// A new message past the next sequence number.
    Gap,
    /// A new message at the next sequence number.
    Next,
}

/// A room as its home's decisions define it.
#[derive(Clone, Debug)]
pub struct RoomModel {
    /// The node that sequences it.
    pub home: usize,
    /// Which history a new member may read.
    pub history: History,
    /// The current epoch.
    pub epoch: u64,
    /// Per epoch, the first sequence number of that epoch.
    pub epoch_start: BTreeMap<u64, u64>,
    /// Per epoch, the nodes that hosted a member at some point of it.
    pub allowed: BTreeMap<u64, BTreeSet<usize>>,
    /// The current members.
    pub members: BTreeMap<UserId, Member>,
    /// The removed members.
    pub removed: BTreeMap<UserId, Removed>,
    /// The frames the home committed, by sequence number.
    pub committed: BTreeMap<u64, Committed>,
    /// The sequence number of each committed message.
    pub ids: BTreeMap<MessageId, u64>,
    /// The next sequence number the home hands out.
    pub next_seq: u64,
    /// A member was evicted since the epoch started: no frame until the next one.
    pub rekey_due: bool,
}

impl RoomModel {
    /// A room just created on `home` by `owner`.
    pub(crate) fn created(home: usize, history: History, owner: UserId) -> Self {
        let owner_member = Member {
            node: home,
            since: 1,
            role: RoomRole::Owner,
        };
        RoomModel {
            home,
            history,
            epoch: 1,
            epoch_start: BTreeMap::from([(1, 1)]),
            allowed: BTreeMap::from([(1, BTreeSet::from([home]))]),
            members: BTreeMap::from([(owner, owner_member)]),
            removed: BTreeMap::new(),
            committed: BTreeMap::new(),
            ids: BTreeMap::new(),
            next_seq: 1,
            rekey_due: false,
        }
    }

    /// Where a commit of `frame` as message `id` at `seq` falls.
    pub fn landing(&self, frame: &FrameHeader, id: MessageId, seq: Seq) -> Landing {
        if id != frame.id {
            Landing::WrongReceipt
        } else if let Some(&prev) = self.ids.get(&id) {
            Landing::Recommitted { prev }
        } else if seq.0 < self.next_seq {
            Landing::Replaces
        } else if seq.0 > self.next_seq {
            Landing::Gap
        } else {
            Landing::Next
        }
    }

    /// The first sequence number of the current epoch.
    pub fn current_epoch_start(&self) -> u64 {
        self.epoch_start[&self.epoch]
    }

    /// The room moves to `epoch`, which must be the next one, with the members it
    /// has now (after `what`, which moved it).
    fn next_epoch(&mut self, epoch: Epoch, what: &str) {
        assert_eq!(
            epoch.0,
            self.epoch + 1,
            "{what} skipping epochs was accepted"
        );
        self.epoch += 1;
        self.rekey_due = false;
        self.epoch_start.insert(self.epoch, self.next_seq);
        let nodes: BTreeSet<usize> = self.members.values().map(|m| m.node).collect();
        self.allowed.insert(self.epoch, nodes);
    }

    /// What must hold after every decision the model took in.
    fn assert_invariants(&self) {
        assert_eq!(self.committed.len(), self.ids.len(), "one id per commit");
        assert_eq!(
            self.next_seq,
            self.committed.len() as u64 + 1,
            "commits are 1..next_seq, without a gap"
        );
        assert!(self.epoch >= 1);
        assert!(self.epoch_start.contains_key(&self.epoch));
        assert!(self.allowed.contains_key(&self.epoch));
        debug_assert!(self.members.keys().all(|u| !self.removed.contains_key(u)));
    }
}

/// Every room as its home decided it, and what the homes decided at all.
#[derive(Debug, Default)]
pub struct Model {
    /// The rooms, by id.
    pub rooms: BTreeMap<RoomId, RoomModel>,
    /// Every request and frame some home decided on (whatever the outcome).
    pub decided: BTreeSet<OpKey>,
    /// What homes decided on each of them (more than once if a crash took a
    /// decision back before it was durable).
    pub verdicts: BTreeMap<OpKey, Vec<Outcome>>,
    /// Every membership change a home applied, as (user, nonce).
    pub applied: BTreeSet<(UserId, u64)>,
    /// Frames the homes committed.
    pub committed: u64,
    /// Invites the homes applied.
    pub invites: u64,
    /// Removals the homes applied.
    pub removals: u64,
    /// Rekeys (same members, next epoch) the homes applied.
    pub rekeys: u64,
    /// Every eviction of a revoked member a home made, as (room, user).
    pub evictions: BTreeSet<(RoomId, UserId)>,
}

/// Whether `op` changes a room's membership or epoch (appends a chain link).
pub fn changes_members(op: &Op) -> bool {
    op.link().is_some()
}

impl Model {
    /// Takes a room's decision in; only what it records of every decision unless
    /// `accepted` (no oracle objected to it).
    pub fn take(&mut self, cluster: &Cluster, obs: &Observation, accepted: bool) {
        match &obs.what {
            Observed::Request { request, outcome } => {
                let key = OpKey::Request(request.user, request.nonce);
                self.decided.insert(key);
                self.verdicts.entry(key).or_default().push(outcome.clone());
                if *outcome != Outcome::Done {
                    return;
                }
                let key = (request.user, request.nonce);
                if changes_members(&request.op) && !self.applied.insert(key) {
                    assert!(!accepted, "a change applied twice was accepted");
                    return;
                }
                if accepted {
                    self.apply(cluster, obs.node, obs.room, request.user, &request.op);
                }
            }
            Observed::Publish { frame, outcome } => {
                self.decided.insert(OpKey::Frame(frame.id));
                let verdicts = self.verdicts.entry(OpKey::Frame(frame.id)).or_default();
                verdicts.push(outcome.clone());
                if let (Outcome::Committed { id, seq }, true) = (outcome, accepted) {
                    self.commit(obs.room, frame, *id, *seq);
                }
            }
            Observed::Evicted { user } => {
                if accepted {
                    self.evict(obs.room, *user);
                }
            }
        }
        if let Some(m) = self.rooms.get(&obs.room) {
            m.assert_invariants();
        }
    }

    fn apply(&mut self, cluster: &Cluster, node: usize, room: RoomId, acting: UserId, op: &Op) {
        let Some(link) = op.link() else { return };
        match &link.link.change {
            Change::Create { policy, .. } => {
                let created = RoomModel::created(node, policy.history, acting);
                self.rooms.insert(room, created);
            }
            Change::Invite { invitee, .. } => self.invite(cluster, node, room, invitee),
            Change::Remove { user, epoch, .. } => {
                let Some(m) = self.rooms.get_mut(&room) else {
                    return;
                };
                if let Some(member) = m.members.remove(user) {
                    let removed = Removed {
                        since: member.since,
                        until: m.next_seq,
                    };
                    m.removed.insert(*user, removed);
                }
                m.next_epoch(*epoch, "a removal");
                self.removals += 1;
            }
            Change::Rekey { epoch, .. } => {
                let Some(m) = self.rooms.get_mut(&room) else {
                    return;
                };
                m.next_epoch(*epoch, "a rekey");
                self.rekeys += 1;
            }
            // Evictions are the home's own links, never a client's request.
            Change::Evict { .. } => {}
        }
    }

    /// The home evicted `user` (revoked by their node): they are removed, and the
    /// room takes no frame until a member moves it to the next epoch.
    fn evict(&mut self, room: RoomId, user: UserId) {
        let Some(m) = self.rooms.get_mut(&room) else {
            return;
        };
        if let Some(member) = m.members.remove(&user) {
            let removed = Removed {
                since: member.since,
                until: m.next_seq,
            };
            m.removed.insert(user, removed);
        }
        m.rekey_due = true;
        self.evictions.insert((room, user));
    }

    fn invite(&mut self, cluster: &Cluster, node: usize, room: RoomId, invitee: &Invitee) {
        let Some(target) = cluster.index(invitee.home) else {
            return;
        };
        let Some(m) = self.rooms.get_mut(&room) else {
            return;
        };
        assert_eq!(
            m.home, node,
            "an invite by a node not the home was accepted"
        );
        let since = match m.history {
            History::FromJoin => m.next_seq,
            History::FromEpoch => m.current_epoch_start(),
        };
        let user = UserId(invitee.user.signing);
        let member = Member {
            node: target,
            since,
            role: invitee.role,
        };
        m.members.insert(user, member);
        m.removed.remove(&user);
        m.allowed.entry(m.epoch).or_default().insert(target);
        self.invites += 1;
    }

    fn commit(&mut self, room: RoomId, frame: &FrameHeader, id: MessageId, seq: Seq) {
        let Some(m) = self.rooms.get_mut(&room) else {
            unreachable!("a commit in an unknown room was accepted");
        };
        assert_eq!(
            m.landing(frame, id, seq),
            Landing::Next,
            "an accepted commit lands at the next sequence number"
        );
        assert_eq!(
            frame.epoch.0, m.epoch,
            "a commit of a stale epoch was accepted"
        );
        let epoch = frame.epoch.0;
        m.committed.insert(seq.0, Committed { id, epoch });
        m.ids.insert(id, seq.0);
        m.next_seq += 1;
        self.committed += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROOM: RoomId = RoomId([7; 16]);
    const OWNER: UserId = UserId([1; 32]);

    fn frame(id: u128) -> FrameHeader {
        FrameHeader {
            room: ROOM,
            epoch: Epoch(1),
            sender: OWNER,
            id: MessageId(id),
        }
    }

    fn publish(node: usize, id: u128, seq: u64) -> Observation {
        Observation {
            node,
            entry: None,
            room: ROOM,
            what: Observed::Publish {
                frame: frame(id),
                outcome: Outcome::Committed {
                    id: MessageId(id),
                    seq: Seq(seq),
                },
            },
        }
    }

    fn model_with_room() -> Model {
        let mut model = Model::default();
        let room = RoomModel::created(0, History::FromJoin, OWNER);
        room.assert_invariants();
        model.rooms.insert(ROOM, room);
        model
    }

    #[test]
    fn a_commit_lands_where_the_home_put_it() {
        let cluster = Cluster::new(1, 1);
        let mut model = model_with_room();
        let m = &model.rooms[&ROOM];
        assert_eq!(
            m.landing(&frame(5), MessageId(6), Seq(1)),
            Landing::WrongReceipt
        );
        assert_eq!(m.landing(&frame(5), MessageId(5), Seq(2)), Landing::Gap);
        assert_eq!(m.landing(&frame(5), MessageId(5), Seq(1)), Landing::Next);
        model.take(&cluster, &publish(0, 5, 1), true);
        let m = &model.rooms[&ROOM];
        assert_eq!(m.next_seq, 2);
        assert_eq!(
            m.landing(&frame(5), MessageId(5), Seq(2)),
            Landing::Recommitted { prev: 1 }
        );
        assert_eq!(
            m.landing(&frame(6), MessageId(6), Seq(1)),
            Landing::Replaces
        );
        assert_eq!(model.committed, 1);
        assert!(model.decided.contains(&OpKey::Frame(MessageId(5))));
    }

    #[test]
    fn a_decision_an_oracle_objected_to_is_recorded_but_not_taken_in() {
        let cluster = Cluster::new(1, 1);
        let mut model = model_with_room();
        model.take(&cluster, &publish(0, 9, 3), false);
        assert!(model.decided.contains(&OpKey::Frame(MessageId(9))));
        assert_eq!(model.rooms[&ROOM].next_seq, 1);
        assert_eq!(model.committed, 0);
    }

    #[test]
    #[should_panic(expected = "an accepted commit lands at the next sequence number")]
    fn taking_in_a_commit_out_of_sequence_is_a_bug_of_the_run() {
        let cluster = Cluster::new(1, 1);
        let mut model = model_with_room();
        model.take(&cluster, &publish(0, 9, 3), true);
    }
}

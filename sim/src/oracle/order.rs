//! Order: every member node sees a room's frames and updates in one order, the
//! home's, with no gap and no duplicate; no request is applied twice.

use std::collections::BTreeMap;

use conclave_actors::domain::{self, Op, Outcome};
use conclave_actors::ids::{MessageId, RoomId, Seq};
use conclave_storage::Store;

use super::durability::home_frames;
use super::{short, Oracle, Seen, Verdict, View, ORDER};
use crate::cluster::{FrameHeader, Observation, Observed};
use crate::model::{changes_members, room_frames, Landing};

/// See the module docs.
#[derive(Default)]
pub struct Order {
    /// Per member node and room: the (epoch, member count) its copy last showed.
    replica_epoch: BTreeMap<(usize, RoomId), (u64, u64, usize)>,
}

fn fails(detail: String) -> Verdict {
    Verdict::Fails {
        oracle: ORDER,
        detail,
    }
}

impl Oracle for Order {
    fn name(&self) -> &'static str {
        ORDER
    }

    fn on_decision(&mut self, view: &View<'_>, decision: &Observation) -> Verdict {
        match &decision.what {
            Observed::Request { request, outcome } => {
                let key = (request.user, request.nonce);
                let twice = *outcome == Outcome::Done
                    && changes_members(&request.op)
                    && view.model.applied.contains(&key);
                if !twice {
                    return Verdict::Holds;
                }
                fails(format!(
                    "room {}: the home applied the same signed request twice ({}): a duplicate delivery was not dropped",
                    short(&decision.room.0),
                    op_name(&request.op)
                ))
            }
            Observed::Publish { frame, outcome } => match *outcome {
                Outcome::Committed { id, seq } => commit(view, decision, frame, id, seq),
                _ => Verdict::Holds,
            },
            Observed::Evicted { .. } => Verdict::Holds,
        }
    }

    /// A member node's copy of a room only moves forward: its epoch, and within an
    /// epoch its membership version (bumped by every change, evictions included).
    /// Applying an older update after a newer one (a duplicate, or a replay) would
    /// take it back.
    fn on_room_handled(&mut self, view: &View<'_>, node: usize, room: RoomId) -> Verdict {
        // The home's own copy is the model's source, not a replica; a node that
        // lost its disk starts its copies over (what it takes again may be older
        // than what its previous disk held).
        if view.model.rooms.get(&room).is_none_or(|m| m.home == node) || view.wiped(node) {
            return Verdict::Holds;
        }
        let Some(now) = replica_state(view, node, room) else {
            return Verdict::Holds;
        };
        let seen = self.replica_epoch.entry((node, room)).or_insert(now);
        if now < *seen {
            return fails(format!(
                "n{node}'s copy of room {} went back from epoch {} with {} members (version {}) to epoch {} with {} members (version {}): it applied an older update after a newer one",
                short(&room.0),
                seen.0,
                seen.2,
                seen.1,
                now.0,
                now.2,
                now.1
            ));
        }
        *seen = now;
        Verdict::Holds
    }

    /// A subscriber reads the next sequence number, and what the home committed
    /// there.
    fn on_client(&mut self, view: &View<'_>, seen: &Seen<'_>) -> Verdict {
        let Seen::Read {
            user,
            node,
            room,
            seq,
            next,
            id,
        } = *seen
        else {
            return Verdict::Holds;
        };
        let r = short(&room.0);
        if seq.0 != next {
            return fails(format!(
                "a subscriber of u{user} on n{node} in room {r} read seq {} when seq {next} was next: a gap",
                seq.0
            ));
        }
        let committed = view
            .model
            .rooms
            .get(&room)
            .and_then(|m| m.committed.get(&seq.0).copied());
        match committed {
            Some(c) if c.id == id => Verdict::Holds,
            Some(c) => fails(format!(
                "n{node} holds message {} at seq {} of room {r}; the home committed message {} there",
                id.0, seq.0, c.id.0
            )),
            None => fails(format!(
                "n{node} holds a frame at seq {} of room {r} that the home never committed",
                seq.0
            )),
        }
    }

    /// The home holds no frame it did not report committed.
    fn on_home(&mut self, view: &View<'_>, room: RoomId) -> Verdict {
        let Some(m) = view.model.rooms.get(&room) else {
            return Verdict::Holds;
        };
        let Some(stored) = home_frames(view, m.home, room) else {
            return Verdict::Holds;
        };
        match stored.keys().find(|s| !m.committed.contains_key(s)) {
            Some(seq) => fails(format!(
                "room {}: home n{} holds a frame at seq {seq} it never reported committed",
                short(&room.0),
                m.home
            )),
            None => Verdict::Holds,
        }
    }

    /// Every copy of every room holds, at each sequence number, the frame its
    /// home committed there.
    fn check_final(&mut self, view: &View<'_>) -> Verdict {
        for i in (0..view.cluster.nodes.len()).filter(|&i| view.live(i)) {
            for &room in view.roster.rooms() {
                let verdict = replica_matches(view, i, room);
                if verdict != Verdict::Holds {
                    return verdict;
                }
            }
        }
        Verdict::Holds
    }
}

/// A commit by the home falls at the next sequence number, for a message not
/// committed before, as the receipt says.
fn commit(
    view: &View<'_>,
    decision: &Observation,
    frame: &FrameHeader,
    id: MessageId,
    seq: Seq,
) -> Verdict {
    let Some(m) = view.model.rooms.get(&decision.room) else {
        return Verdict::Holds;
    };
    if m.home != decision.node {
        return Verdict::Holds;
    }
    let r = short(&decision.room.0);
    match m.landing(frame, id, seq) {
        Landing::WrongReceipt => fails(format!(
            "room {r}: a receipt names message {} for frame {}",
            id.0, frame.id.0
        )),
        Landing::Recommitted { prev } => fails(format!(
            "room {r}: message {} committed twice, at seq {prev} and seq {}",
            id.0, seq.0
        )),
        Landing::Gap => fails(format!(
            "room {r}: the home committed seq {} when seq {} was next",
            seq.0, m.next_seq
        )),
        Landing::Replaces | Landing::Next => Verdict::Holds,
    }
}

/// The (epoch, membership version, member count) of `node`'s copy of `room`, if
/// it has one.
fn replica_state(view: &View<'_>, node: usize, room: RoomId) -> Option<(u64, u64, usize)> {
    let txn = view.cluster.nodes[node].store.read().ok()?;
    let meta = domain::state::rooms::meta(&*txn, room).ok()??;
    let members = domain::state::rooms::members(&*txn, room).map_or(0, |m| m.len());
    Some((meta.epoch.0, meta.members_version, members))
}

/// Node `i`'s copy of `room` holds only what the home committed, where it did.
fn replica_matches(view: &View<'_>, i: usize, room: RoomId) -> Verdict {
    let stored = match view.cluster.nodes[i].store.read() {
        Ok(txn) => room_frames(&*txn, room, Seq(1)).unwrap_or_default(),
        Err(_) => return Verdict::Holds,
    };
    let Some(m) = view.model.rooms.get(&room) else {
        return Verdict::Holds;
    };
    for (seq, frame) in stored {
        let committed = m.committed.get(&seq.0).map(|c| c.id);
        if committed != Some(frame.id) {
            return fails(format!(
                "n{i} holds message {} at seq {} of room {}; the home committed {:?} there",
                frame.id.0,
                seq.0,
                short(&room.0),
                committed.map(|id| id.0)
            ));
        }
    }
    Verdict::Holds
}

/// How failures name an operation.
fn op_name(op: &Op) -> &'static str {
    match op {
        Op::AddUser { .. } => "add user",
        Op::RevokeUser { .. } => "revoke user",
        Op::ListUsers => "list users",
        Op::CreateRoom { .. } => "create room",
        Op::Invite { .. } => "invite",
        Op::Remove { .. } => "remove",
        Op::Rekey { .. } => "rekey",
        Op::RoomInfo { .. } => "room info",
        Op::ListRooms { .. } => "list rooms",
    }
}

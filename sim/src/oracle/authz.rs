//! Authz: only a room's home admits members and commits frames, and it commits
//! only members' frames.

use conclave_actors::domain::chain::Change;
use conclave_actors::domain::Outcome;
use conclave_actors::UserId;

use super::{short, Oracle, Verdict, View, AUTHZ};
use crate::cluster::{FrameHeader, Observation, Observed};
use crate::model::Landing;

/// See the module docs.
pub struct Authz;

fn fails(detail: String) -> Verdict {
    Verdict::Fails {
        oracle: AUTHZ,
        detail,
    }
}

impl Oracle for Authz {
    fn name(&self) -> &'static str {
        AUTHZ
    }

    fn on_decision(&mut self, view: &View<'_>, decision: &Observation) -> Verdict {
        match &decision.what {
            Observed::Request { request, outcome } => {
                let Some(Change::Invite { invitee, .. }) =
                    request.op.link().map(|l| &l.link.change)
                else {
                    return Verdict::Holds;
                };
                let first = !view.model.applied.contains(&(request.user, request.nonce));
                let known = view.cluster.index(invitee.home).is_some();
                let Some(m) = view.model.rooms.get(&decision.room) else {
                    return Verdict::Holds;
                };
                if *outcome != Outcome::Done || !first || !known || m.home == decision.node {
                    return Verdict::Holds;
                }
                fails(format!(
                    "room {}: n{}, not its home, admitted a member",
                    short(&decision.room.0),
                    decision.node
                ))
            }
            Observed::Publish { frame, outcome } => match *outcome {
                Outcome::Committed { id, seq } => commit(view, decision, frame, id, seq),
                _ => Verdict::Holds,
            },
            Observed::Evicted { user } => eviction(view, decision, *user),
        }
    }
}

/// An eviction is the home's, of a member.
fn eviction(view: &View<'_>, decision: &Observation, user: UserId) -> Verdict {
    let r = short(&decision.room.0);
    let Some(m) = view.model.rooms.get(&decision.room) else {
        return fails(format!("a member of unknown room {r} was evicted"));
    };
    if m.home != decision.node {
        return fails(format!(
            "room {r}: n{}, not its home n{}, evicted a member",
            decision.node, m.home
        ));
    }
    if !m.members.contains_key(&user) {
        return fails(format!("room {r}: its home evicted a non-member"));
    }
    Verdict::Holds
}

/// A commit is the home's, in a room it knows, of a member's frame.
fn commit(
    view: &View<'_>,
    decision: &Observation,
    frame: &FrameHeader,
    id: conclave_actors::ids::MessageId,
    seq: conclave_actors::ids::Seq,
) -> Verdict {
    let r = short(&decision.room.0);
    let Some(m) = view.model.rooms.get(&decision.room) else {
        return fails(format!("a frame was committed in unknown room {r}"));
    };
    if m.home != decision.node {
        return fails(format!(
            "room {r}: n{}, not its home n{}, committed a frame",
            decision.node, m.home
        ));
    }
    // A frame out of sequence or of another epoch is the order, durability or
    // epoch oracle's; a member's frame in sequence is this one's.
    let in_sequence = m.landing(frame, id, seq) == Landing::Next && frame.epoch.0 == m.epoch;
    if in_sequence && !m.members.contains_key(&frame.sender) {
        return fails(format!(
            "room {r}: a frame of a non-member was committed at seq {}",
            seq.0
        ));
    }
    Verdict::Holds
}

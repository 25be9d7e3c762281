//! Epoch: a removal (or a rekey) moves a room to the next epoch, and frames committed after it
//! are of that epoch, so the removed member's keys open none of them.

use conclave_actors::domain::chain::Change;
use conclave_actors::domain::Outcome;

use super::{short, Oracle, Verdict, View, EPOCH};
use crate::cluster::{Observation, Observed};
use crate::model::Landing;

/// See the module docs.
pub struct EpochOracle;

fn fails(detail: String) -> Verdict {
    Verdict::Fails {
        oracle: EPOCH,
        detail,
    }
}

impl Oracle for EpochOracle {
    fn name(&self) -> &'static str {
        EPOCH
    }

    fn on_decision(&mut self, view: &View<'_>, decision: &Observation) -> Verdict {
        let r = short(&decision.room.0);
        let Some(m) = view.model.rooms.get(&decision.room) else {
            return Verdict::Holds;
        };
        match &decision.what {
            Observed::Request { request, outcome } => {
                let epoch = match request.op.link().map(|l| &l.link.change) {
                    Some(Change::Remove { epoch, .. } | Change::Rekey { epoch, .. }) => *epoch,
                    _ => return Verdict::Holds,
                };
                let first = !view.model.applied.contains(&(request.user, request.nonce));
                if *outcome != Outcome::Done || !first || epoch.0 == m.epoch + 1 {
                    return Verdict::Holds;
                }
                fails(format!(
                    "room {r}: a removal or rekey moved the room to epoch {} from epoch {}",
                    epoch.0, m.epoch
                ))
            }
            Observed::Publish { frame, outcome } => {
                let Outcome::Committed { id, seq } = *outcome else {
                    return Verdict::Holds;
                };
                let next = m.home == decision.node && m.landing(frame, id, seq) == Landing::Next;
                if !next || frame.epoch.0 == m.epoch {
                    return Verdict::Holds;
                }
                fails(format!(
                    "room {r}: a frame of epoch {} was committed at seq {} while the room is at epoch {} (since seq {}): members removed since epoch {} hold the key that opens it",
                    frame.epoch.0, seq.0, m.epoch, m.current_epoch_start(), frame.epoch.0
                ))
            }
            Observed::Evicted { .. } => Verdict::Holds,
        }
    }
}

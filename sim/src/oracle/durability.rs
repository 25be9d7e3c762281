//! Durability: no committed frame is lost or replaced, across any crash.
//!
//! A home must never hand out a sequence number it committed before, and after a
//! restart (and at the end) must hold every frame it committed, as committed. A
//! node lost for good is the exception this oracle states instead of failing:
//! [`losses`] says what it took with it.

use std::collections::{BTreeMap, BTreeSet};

use conclave_actors::domain::{Denial, Outcome};
use conclave_actors::ids::{MessageId, RoomId, Seq};
use conclave_storage::Store;

use super::{ranges, short, Oracle, Seen, Verdict, View, DURABILITY};
use crate::cluster::{Observation, Observed};
use crate::model::{room_frames, Landing};

/// See the module docs.
#[derive(Default)]
pub struct Durability {
    /// Every publish a client made: (node, request, room, message id).
    published: Vec<(usize, u64, RoomId, MessageId)>,
}

fn fails(detail: String) -> Verdict {
    Verdict::Fails {
        oracle: DURABILITY,
        detail,
    }
}

impl Oracle for Durability {
    fn name(&self) -> &'static str {
        DURABILITY
    }

    /// A new message committed at a sequence number already taken replaces a
    /// committed frame.
    fn on_decision(&mut self, view: &View<'_>, decision: &Observation) -> Verdict {
        let Observed::Publish { frame, outcome } = &decision.what else {
            return Verdict::Holds;
        };
        let Outcome::Committed { id, seq } = *outcome else {
            return Verdict::Holds;
        };
        let Some(m) = view.model.rooms.get(&decision.room) else {
            return Verdict::Holds;
        };
        if m.home != decision.node || m.landing(frame, id, seq) != Landing::Replaces {
            return Verdict::Holds;
        }
        let was = m
            .committed
            .get(&seq.0)
            .map_or("nothing".to_string(), |c| format!("message {}", c.id.0));
        fails(format!(
            "room {}: seq {} committed again (it held {was}): a committed frame was replaced",
            short(&decision.room.0),
            seq.0
        ))
    }

    fn on_client(&mut self, _view: &View<'_>, seen: &Seen<'_>) -> Verdict {
        if let Seen::Published {
            node,
            request,
            room,
            id,
            ..
        } = *seen
        {
            self.published.push((node, request, room, id));
        }
        Verdict::Holds
    }

    /// What a client was told of its publish is what became of it: a frame
    /// reported refused committed nowhere, one reported committed is at the
    /// sequence number it was told (a publish is committed once or refused,
    /// never both).
    fn check_final(&mut self, view: &View<'_>) -> Verdict {
        for &(node, request, room, id) in &self.published {
            let Some(m) = view.model.rooms.get(&room) else {
                continue;
            };
            // A room whose sequencer's disk was lost may refuse, as unknown,
            // what it committed before.
            if view.room_lost(room, m.home) {
                continue;
            }
            let held = m.ids.get(&id).copied();
            let told = view.cluster.outcomes(node, request);
            let told = told.iter().rfind(|o| **o != Outcome::Forwarded);
            let agrees = match told {
                Some(Outcome::Committed { seq, .. }) => held.is_none_or(|h| h == seq.0),
                Some(Outcome::Denied(Denial::Duplicate { .. })) | None => true,
                Some(Outcome::Denied(_)) => held.is_none(),
                Some(_) => true,
            };
            if !agrees {
                return fails(format!(
                    "room {}: n{node} told its client {told:?} for message {}, which committed at seq {held:?}",
                    short(&room.0),
                    id.0
                ));
            }
        }
        Verdict::Holds
    }

    /// The home (if not lost for good) holds every frame it committed, as
    /// committed; with rooms on shard groups, the replica furthest on does.
    fn on_home(&mut self, view: &View<'_>, room: RoomId) -> Verdict {
        let Some(m) = view.model.rooms.get(&room) else {
            return Verdict::Holds;
        };
        let Some(home) = view.reference(room, m.home) else {
            return Verdict::Holds;
        };
        let Some(stored) = home_frames(view, home, room) else {
            return Verdict::Holds;
        };
        let r = short(&room.0);
        for (&seq, committed) in &m.committed {
            let id = committed.id;
            match stored.get(&seq) {
                Some(&got) if got == id => {}
                Some(&got) => {
                    return fails(format!(
                        "room {r}: home n{home} holds message {} at seq {seq}, where it committed message {}",
                        got.0, id.0
                    ));
                }
                None => {
                    return fails(format!(
                        "room {r}: committed frame seq {seq} (message {}) is gone from home n{home}'s store",
                        id.0
                    ));
                }
            }
        }
        Verdict::Holds
    }
}

/// What `home` holds of `room`, by sequence number (`None` if it is lost for good
/// or its store cannot be read).
pub fn home_frames(view: &View<'_>, home: usize, room: RoomId) -> Option<BTreeMap<u64, MessageId>> {
    if view.wiped(home) {
        return None;
    }
    let txn = view.cluster.nodes[home].store.read().ok()?;
    let frames = room_frames(&*txn, room, Seq(1)).unwrap_or_default();
    Some(frames.into_iter().map(|(s, f)| (s.0, f.id)).collect())
}

/// What each node lost for good took with it: the frames only it held, and what
/// waits in outboxes towards it for ever.
pub fn losses(view: &View<'_>) -> Vec<String> {
    let nodes = view.cluster.nodes.len();
    let mut notes = Vec::new();
    for w in (0..nodes).filter(|&w| view.wiped(w)) {
        for (&room, m) in &view.model.rooms {
            if m.home == w {
                notes.push(room_loss(view, w, room));
            }
        }
        let id = view.cluster.id(w);
        let mut undeliverable = 0;
        for i in (0..nodes).filter(|&i| view.live(i)) {
            undeliverable += view
                .cluster
                .outbox_depths(i)
                .into_iter()
                .filter(|(d, _)| *d == id)
                .map(|(_, n)| n)
                .sum::<u64>();
        }
        if undeliverable > 0 {
            notes.push(format!(
                "{undeliverable} messages wait in outboxes towards n{w} and will never be delivered"
            ));
        }
    }
    notes
}

/// What survives of `room`, homed on `w` that is lost for good.
fn room_loss(view: &View<'_>, w: usize, room: RoomId) -> String {
    let m = &view.model.rooms[&room];
    let mut surviving = BTreeSet::new();
    for i in (0..view.cluster.nodes.len()).filter(|&i| view.live(i)) {
        let Ok(txn) = view.cluster.nodes[i].store.read() else {
            continue;
        };
        for (seq, frame) in room_frames(&*txn, room, Seq(1)).unwrap_or_default() {
            if m.committed.get(&seq.0).map(|c| c.id) == Some(frame.id) {
                surviving.insert(seq.0);
            }
        }
    }
    let lost: Vec<u64> = m
        .committed
        .keys()
        .copied()
        .filter(|s| !surviving.contains(s))
        .collect();
    assert_eq!(surviving.len() + lost.len(), m.committed.len());
    format!(
        "room {} was homed on n{w}, lost for good: of its {} committed frames, {} survive on member nodes; {} were held only by n{w} and are lost{}",
        short(&room.0),
        m.committed.len(),
        surviving.len(),
        lost.len(),
        if lost.is_empty() { String::new() } else { format!(" (seqs {})", ranges(&lost)) }
    )
}

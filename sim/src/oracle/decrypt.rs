//! Decrypt: every key a node holds for a member opens for them (whether the
//! client may take it is the chain oracle's), and every frame
//! a member may read verifies and decrypts, to what was sent.

use std::collections::{BTreeMap, BTreeSet};

use conclave_actors::domain::chain::KeyRefusal;
use conclave_actors::ids::MessageId;

use super::{short, Oracle, Seen, Verdict, View, DECRYPT};

/// See the module docs.
#[derive(Default)]
pub struct Decrypt {
    /// What each published frame was sealed from.
    texts: BTreeMap<MessageId, Vec<u8>>,
    /// Frames a hostile user sealed with a key of their own (see
    /// [`Seen::Trespassed`]): no member can open them.
    junk: BTreeSet<MessageId>,
}

fn fails(detail: String) -> Verdict {
    Verdict::Fails {
        oracle: DECRYPT,
        detail,
    }
}

impl Oracle for Decrypt {
    fn name(&self) -> &'static str {
        DECRYPT
    }

    fn on_client(&mut self, view: &View<'_>, seen: &Seen<'_>) -> Verdict {
        match *seen {
            Seen::Published { id, text, .. } => {
                let previous = self.texts.insert(id, text.to_vec());
                assert!(previous.is_none(), "two frames drew message id {}", id.0);
                Verdict::Holds
            }
            Seen::KeyRefused {
                node,
                user,
                room,
                epoch,
                refusal: refusal @ KeyRefusal::Unopened(_),
            } => fails(format!(
                "n{node} holds a key of room {} epoch {} for user {} that does not open: {refusal}",
                short(&room.0),
                epoch.0,
                short(&view.roster.user(user).uid.0)
            )),
            Seen::Trespassed { id } => {
                self.junk.insert(id);
                Verdict::Holds
            }
            Seen::NoKey { .. } => no_key(view, seen),
            Seen::Opened { .. } => self.opened(seen),
            Seen::Sent { .. }
            | Seen::Read { .. }
            | Seen::KeyRefused { .. }
            | Seen::Revoked { .. }
            | Seen::KeyAccepted { .. }
            | Seen::Flood { .. } => Verdict::Holds,
        }
    }
}

impl Decrypt {
    /// A frame a member may read opens, to what was sent.
    fn opened(&self, seen: &Seen<'_>) -> Verdict {
        let Seen::Opened {
            user,
            node,
            room,
            seq,
            id,
            text,
        } = *seen
        else {
            unreachable!("only an opened frame is checked as one");
        };
        let r = short(&room.0);
        match text {
            Ok(text) if self.texts.get(&id).is_some_and(|sent| sent != text) => fails(format!(
                "seq {} of room {r} decrypts on n{node} to something else than was sent",
                seq.0
            )),
            Ok(_) => Verdict::Holds,
            Err(_) if self.junk.contains(&id) => Verdict::Holds,
            Err(error) => fails(format!(
                "seq {} of room {r} does not open for member u{user} on n{node}: {error}",
                seq.0
            )),
        }
    }
}

/// At the end, a member holds a key for every frame they may read, unless it was
/// still at a home lost for good (stated, not failed).
fn no_key(view: &View<'_>, seen: &Seen<'_>) -> Verdict {
    let Seen::NoKey {
        user,
        node,
        room,
        seq,
        epoch,
    } = *seen
    else {
        unreachable!("only a missing key is checked as one");
    };
    let r = short(&room.0);
    let home_lost = view
        .model
        .rooms
        .get(&room)
        .is_some_and(|m| view.wiped(m.home));
    if home_lost {
        // The key was on its way from a home that is gone for good.
        return Verdict::Note(format!(
            "u{user} on n{node} cannot read seq {} on of room {r} (epoch {}): its key had not left the room's home, lost for good",
            seq.0, epoch.0
        ));
    }
    fails(format!(
        "u{user} on n{node} may read seq {} of room {r} (epoch {}) but holds no key for that epoch",
        seq.0, epoch.0
    ))
}

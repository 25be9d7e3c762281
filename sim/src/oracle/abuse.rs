//! Abuse: what one user does cannot take what every user shares. A publish of a
//! user who was never a member of the room never leaves their node (it would
//! take a place in an outbox every room towards the home shares), and a user's
//! publishes past their quota are refused with `limit`.

use conclave_actors::domain::{Denial, Outcome};

use super::{short, Oracle, Seen, Verdict, View, ABUSE};
use crate::cluster::Carried;

/// A flood of publishes handed to a node at once, and how many may pass.
struct Flood {
    user: usize,
    node: usize,
    requests: Vec<u64>,
    allowance: u64,
}

/// See the module docs.
#[derive(Default)]
pub struct Abuse {
    floods: Vec<Flood>,
}

fn fails(detail: String) -> Verdict {
    Verdict::Fails {
        oracle: ABUSE,
        detail,
    }
}

impl Oracle for Abuse {
    fn name(&self) -> &'static str {
        ABUSE
    }

    fn on_carried(&mut self, view: &View<'_>, carried: &Carried) -> Verdict {
        let Some((room, sender)) = carried.publisher else {
            return Verdict::Holds;
        };
        let Some(m) = view.model.rooms.get(&room) else {
            return Verdict::Holds;
        };
        if m.members.contains_key(&sender) || m.removed.contains_key(&sender) {
            return Verdict::Holds;
        }
        let from = view.cluster.index(carried.from).map_or(-1, |i| i as i64);
        fails(format!(
            "n{from} forwarded to the home of room {} a publish of {}, never a member of it",
            short(&room.0),
            short(&sender.0)
        ))
    }

    fn on_client(&mut self, _view: &View<'_>, seen: &Seen<'_>) -> Verdict {
        if let Seen::Flood {
            user,
            node,
            requests,
            allowance,
        } = *seen
        {
            self.floods.push(Flood {
                user,
                node,
                requests: requests.to_vec(),
                allowance,
            });
        }
        Verdict::Holds
    }

    fn check_final(&mut self, view: &View<'_>) -> Verdict {
        for flood in &self.floods {
            let passed = flood
                .requests
                .iter()
                .filter(|&&request| {
                    let outcomes = view.cluster.outcomes(flood.node, request);
                    let limited = outcomes
                        .iter()
                        .any(|o| matches!(o, Outcome::Denied(Denial::Limit { .. })));
                    !outcomes.is_empty() && !limited
                })
                .count() as u64;
            if passed > flood.allowance {
                return fails(format!(
                    "u{} handed n{} {} publishes at once and {passed} passed the quota, which allows {}",
                    flood.user,
                    flood.node,
                    flood.requests.len(),
                    flood.allowance
                ));
            }
        }
        Verdict::Holds
    }
}

//! Chain: a room's signed membership chain is its truth, and clients take no key
//! it does not pin.
//!
//! - Every key a client accepts is, for an epoch the room's chain has, the key that
//!   chain pins. The chain judged against is the one the room's home holds (the
//!   home is honest in the simulation), verified here from its creation: never the
//!   client's own chain, nor its own verdict. A node that slips its users a key it
//!   sealed itself ([`crate::faults::Fault::Lie`]) is caught here if a client takes
//!   it.
//! - The home's chain only grows: a link once held is never lost or changed.
//! - No epoch carries more committed frames than
//!   [`conclave_actors::domain::DomainConfig::epoch_frames_max`].
//! - At the end, the home's chain verifies, its members are the home's member
//!   table and the members the home's decisions made (the model); every live
//!   node's chain is a prefix of the home's, and every live node hosting a member
//!   holds all of it.

use std::collections::{BTreeMap, BTreeSet};

use conclave_actors::domain::chain::{ChainHash, ChainState, KeyCheck, SignedLink};
use conclave_actors::domain::{self, Outcome};
use conclave_actors::ids::RoomId;
use conclave_actors::UserId;
use conclave_storage::Store;

use super::{short, Oracle, Seen, Verdict, View, CHAIN};
use crate::cluster::{stored_chain, Observation, Observed};
use crate::model::{Landing, RoomModel};

/// See the module docs.
#[derive(Default)]
pub struct ChainOracle {
    /// Per room, the home's chain as verified so far (extended link by link).
    verified: BTreeMap<RoomId, ChainState>,
    /// Per room, the hash of every link verified so far, in order.
    hashes: BTreeMap<RoomId, Vec<ChainHash>>,
}

fn fails(detail: String) -> Verdict {
    Verdict::Fails {
        oracle: CHAIN,
        detail,
    }
}

impl Oracle for ChainOracle {
    fn name(&self) -> &'static str {
        CHAIN
    }

    fn on_decision(&mut self, view: &View<'_>, decision: &Observation) -> Verdict {
        let Observed::Publish { frame, outcome } = &decision.what else {
            return Verdict::Holds;
        };
        let (Outcome::Committed { id, seq }, Some(m)) =
            (outcome, view.model.rooms.get(&decision.room))
        else {
            return Verdict::Holds;
        };
        // A commit out of sequence, of another epoch, by another node or of a
        // non-member is another oracle's; one in sequence past the bound is this
        // one's.
        let in_sequence = m.home == decision.node
            && m.landing(frame, *id, *seq) == Landing::Next
            && frame.epoch.0 == m.epoch
            && m.members.contains_key(&frame.sender);
        let carried = m.next_seq - m.current_epoch_start();
        let max = view.cluster.config().epoch_frames_max;
        if in_sequence && m.rekey_due {
            return fails(format!(
                "room {}: a frame was committed at seq {} after a member was evicted, before the room moved on from epoch {} (whose key they hold)",
                short(&decision.room.0),
                seq.0,
                m.epoch
            ));
        }
        if !in_sequence || carried < max {
            return Verdict::Holds;
        }
        fails(format!(
            "room {}: a frame was committed at seq {} in epoch {}, which had carried {carried} frames already (at most {max} per epoch)",
            short(&decision.room.0),
            seq.0,
            m.epoch
        ))
    }

    fn on_client(&mut self, view: &View<'_>, seen: &Seen<'_>) -> Verdict {
        let Seen::KeyAccepted {
            user,
            node,
            room,
            epoch,
            key,
        } = *seen
        else {
            return Verdict::Holds;
        };
        let r = short(&room.0);
        let chain = match self.home_chain(view, room) {
            Ok(Some(chain)) => chain,
            // The home is lost for good: nothing left to judge against.
            Ok(None) => return Verdict::Holds,
            Err(detail) => return fails(detail),
        };
        let Some(start) = chain.epochs.get(&epoch) else {
            return fails(format!(
                "u{user} on n{node} accepted a key of room {r} for epoch {}, which the room's chain ({} links, at epoch {}) does not have",
                epoch.0, chain.len, chain.epoch.0
            ));
        };
        if KeyCheck::of(room, epoch, key) != start.check {
            return fails(format!(
                "u{user} on n{node} accepted a key of room {r} epoch {} that is not the one the room's chain pins",
                epoch.0
            ));
        }
        Verdict::Holds
    }

    fn on_home(&mut self, view: &View<'_>, room: RoomId) -> Verdict {
        match self.home_chain(view, room) {
            Ok(_) => Verdict::Holds,
            Err(detail) => fails(detail),
        }
    }

    fn check_final(&mut self, view: &View<'_>) -> Verdict {
        for (&room, m) in &view.model.rooms {
            let chain = match self.home_chain(view, room) {
                Ok(Some(chain)) => chain.clone(),
                Ok(None) => continue,
                Err(detail) => return fails(detail),
            };
            if let Err(detail) = members_agree(view, room, m, &chain) {
                return fails(detail);
            }
            if let Err(detail) = self.replicas_agree(view, room, m) {
                return fails(detail);
            }
        }
        Verdict::Holds
    }
}

impl ChainOracle {
    /// The chain of `room` its home holds, verified from its creation (what was
    /// verified before, extended by what the home appended since); `None` if the
    /// home is lost for good or unknown. An error if it does not verify, or lost
    /// or changed a link it held.
    fn home_chain(&mut self, view: &View<'_>, room: RoomId) -> Result<Option<&ChainState>, String> {
        let r = short(&room.0);
        let Some(m) = view.model.rooms.get(&room) else {
            return Ok(None);
        };
        // With rooms on shard groups, the replica furthest on.
        let Some(home) = view.reference(room, m.home) else {
            return Ok(None);
        };
        let links = read_chain(view, home, room)
            .map_err(|e| format!("n{home} cannot read the chain of room {r}: {e}"))?;
        let hashes = self.hashes.entry(room).or_default();
        let kept = links.len() >= hashes.len()
            && links.iter().zip(hashes.iter()).all(|(l, h)| l.hash() == *h);
        if !kept {
            return Err(format!(
                "home n{home} of room {r} holds {} chain links that are not the {} it held",
                links.len(),
                hashes.len()
            ));
        }
        for (index, link) in links.iter().enumerate().skip(hashes.len()) {
            let verified = match self.verified.get_mut(&room) {
                Some(state) => state.apply(link),
                None => ChainState::genesis(room, link).map(|state| {
                    self.verified.insert(room, state);
                }),
            };
            verified.map_err(|e| {
                format!(
                    "the chain of room {r} at its home n{home} does not verify at link {index}: {e}",
                )
            })?;
            hashes.push(link.hash());
        }
        debug_assert_eq!(
            self.verified.get(&room).map_or(0, |c| c.len),
            hashes.len() as u64
        );
        Ok(self.verified.get(&room))
    }

    /// Every live node's chain of `room` is a prefix of the home's; a live node
    /// hosting a current member holds all of it.
    fn replicas_agree(&self, view: &View<'_>, room: RoomId, m: &RoomModel) -> Result<(), String> {
        let r = short(&room.0);
        let home = self.hashes.get(&room).map_or(&[][..], Vec::as_slice);
        let hosting: BTreeSet<usize> = m.members.values().map(|member| member.node).collect();
        for i in (0..view.cluster.nodes.len()).filter(|&i| view.live(i) && i != m.home) {
            let links = read_chain(view, i, room)
                .map_err(|e| format!("n{i} cannot read the chain of room {r}: {e}"))?;
            let prefix =
                links.len() <= home.len() && links.iter().zip(home).all(|(l, h)| l.hash() == *h);
            if !prefix {
                return Err(format!(
                    "n{i} holds a chain of room {r} ({} links) that is not a prefix of its home n{}'s ({} links)",
                    links.len(),
                    m.home,
                    home.len()
                ));
            }
            // With rooms on shard groups, a node outside the shard takes the
            // room's updates from its home only: none once it is lost.
            let fed = view.sequences(room, m.home, i) || !view.wiped(m.home);
            if hosting.contains(&i) && links.len() < home.len() && fed {
                return Err(format!(
                    "n{i} hosts a member of room {r} but holds {} of its {} chain links",
                    links.len(),
                    home.len()
                ));
            }
        }
        Ok(())
    }
}

/// `room`'s chain as node `i` holds it.
fn read_chain(view: &View<'_>, i: usize, room: RoomId) -> Result<Vec<SignedLink>, String> {
    let txn = view.cluster.nodes[i]
        .store
        .read()
        .map_err(|e| e.to_string())?;
    stored_chain(&*txn, room).map_err(|e| e.to_string())
}

/// The members the home's chain lists are the home's member table and the model's.
fn members_agree(
    view: &View<'_>,
    room: RoomId,
    m: &RoomModel,
    chain: &ChainState,
) -> Result<(), String> {
    let r = short(&room.0);
    let in_chain: BTreeSet<UserId> = chain.members.keys().copied().collect();
    // Where the chain was read (with rooms on shard groups, the replica
    // furthest on).
    let home = view.reference(room, m.home).unwrap_or(m.home);
    let table: BTreeSet<UserId> = view.cluster.nodes[home]
        .store
        .read()
        .map_err(|e| e.to_string())
        .and_then(|txn| domain::state::rooms::members(&*txn, room).map_err(|e| e.to_string()))
        .map_err(|e| format!("n{home} cannot read the members of room {r}: {e}"))?
        .into_iter()
        .map(|member| member.user)
        .collect();
    let decided: BTreeSet<UserId> = m.members.keys().copied().collect();
    if in_chain != table || in_chain != decided {
        return Err(format!(
            "room {r}: its chain lists {} members, its home n{home}'s table {}, its home's decisions {} (not the same users)",
            in_chain.len(),
            table.len(),
            decided.len()
        ));
    }
    if chain.epoch.0 != m.epoch {
        return Err(format!(
            "room {r}: its chain is at epoch {}, its home's decisions at epoch {}",
            chain.epoch.0, m.epoch
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use conclave_actors::crypto::EpochKey;
    use conclave_actors::domain::{History, Op, Policy, UserRole};
    use conclave_actors::ids::Epoch;
    use conclave_actors::Identity;

    use super::*;
    use crate::cluster::Cluster;
    use crate::model::Model;
    use crate::workload::Roster;

    /// A one-node cluster with a room alice created, and the model of it.
    fn room() -> (Cluster, Model, Identity, RoomId) {
        let mut c = Cluster::new(1, 5);
        let admin = Identity::generate(c.rng());
        c.seed_admin(0, &admin);
        let alice = Identity::generate(c.rng());
        let add = Op::AddUser {
            user: alice.public(),
            role: UserRole::Member,
        };
        assert_eq!(c.call(0, &admin, add), Outcome::Done);
        let room = c.create_room(0, &alice, Policy::default());
        let mut model = Model::default();
        let created = RoomModel::created(0, History::FromJoin, alice.user_id());
        model.rooms.insert(room, created);
        (c, model, alice, room)
    }

    fn accepted(c: &Cluster, model: &Model, room: RoomId, epoch: u64, key: &EpochKey) -> Verdict {
        let roster = Roster::default();
        let view = View {
            cluster: c,
            model,
            roster: &roster,
        };
        let seen = Seen::KeyAccepted {
            user: 0,
            node: 0,
            room,
            epoch: Epoch(epoch),
            key,
        };
        ChainOracle::default().on_client(&view, &seen)
    }

    #[test]
    fn a_key_the_chain_pins_holds_and_any_other_fails() {
        let (mut c, model, alice, room) = room();
        let real = c.keys(0, &alice, room)[&Epoch(1)].clone();
        assert_eq!(accepted(&c, &model, room, 1, &real), Verdict::Holds);
        let forged = EpochKey::generate(c.rng());
        let wrong = accepted(&c, &model, room, 1, &forged);
        assert!(
            matches!(&wrong, Verdict::Fails { oracle: CHAIN, detail } if detail.contains("not the one the room's chain pins")),
            "{wrong:?}"
        );
        let unknown = accepted(&c, &model, room, 2, &real);
        assert!(
            matches!(&unknown, Verdict::Fails { oracle: CHAIN, detail } if detail.contains("does not have")),
            "{unknown:?}"
        );
    }

    #[test]
    fn at_the_end_the_home_chain_lists_the_members_decided() {
        let (c, mut model, _alice, room) = room();
        let roster = Roster::default();
        let view = View {
            cluster: &c,
            model: &model,
            roster: &roster,
        };
        assert_eq!(ChainOracle::default().check_final(&view), Verdict::Holds);
        // A member the home's decisions never made.
        let stranger = crate::model::Member {
            node: 0,
            since: 1,
            role: conclave_actors::domain::RoomRole::Member,
        };
        let m = model.rooms.get_mut(&room).expect("the room");
        m.members.insert(UserId([9; 32]), stranger);
        let view = View {
            cluster: &c,
            model: &model,
            roster: &roster,
        };
        let verdict = ChainOracle::default().check_final(&view);
        assert!(
            matches!(&verdict, Verdict::Fails { oracle: CHAIN, detail } if detail.contains("not the same users")),
            "{verdict:?}"
        );
    }
}

//! Liveness: once every fault has stopped, within [`LIVENESS_BOUND`] of virtual
//! time every outbox drains, every forwarded request reaches its home, whose
//! decision reaches the node that forwarded it (as the outcome that node reports to
//! its user: a frame's sequence number or refusal, a membership change's outcome),
//! and every
//! member node converges (shows its members and removals as the home decided,
//! holds every frame they may read and the keys to open them), and every user a
//! node revoked is evicted from each room they were a member of then.
//!
//! When nothing is on its way any more but something is still missing, it is lost
//! for good: that fails at once, under the property the loss broke (order for
//! frames and members, decrypt for keys), rather than waiting out the bound.

use core::time::Duration;
use std::collections::BTreeSet;

use conclave_actors::actor::Time;
use conclave_actors::domain::{self, Asked, Outcome};
use conclave_actors::ids::{RoomId, Seq};
use conclave_actors::replication::log;
use conclave_actors::UserId;
use conclave_storage::Store;

use super::{ranges, short, summarize, Oracle, Phase, Seen, Verdict, View};
use super::{CHAIN, DECRYPT, LIVENESS, ORDER};
use crate::model::{room_frames, OpKey, RoomModel};

/// How long, after every fault has stopped, outboxes have to drain and member
/// nodes to converge.
pub const LIVENESS_BOUND: Duration = Duration::from_secs(60);

/// How many slices in a row with nothing on its way make what is missing lost for
/// good.
pub const QUIET_SLICES_MIN: u32 = 4;

/// A request a node may have forwarded to a room's home.
struct Forwardable {
    node: usize,
    request: u64,
    room: RoomId,
    key: OpKey,
    /// The user, and what their node reports to them when the home decided
    /// (`None`: nothing, a read).
    asked: Option<(UserId, Asked)>,
}

/// See the module docs.
#[derive(Default)]
pub struct Liveness {
    forwardable: Vec<Forwardable>,
    /// When the cluster must have converged (set when the faults stop).
    deadline: Option<Time>,
    /// Slices in a row with nothing on its way.
    quiet: u32,
    /// Revoked users and the rooms they were members of then, as (user, room):
    /// each must evict them.
    revoked: Vec<(usize, RoomId)>,
}

/// What has not converged: what is still on its way, and what is missing on member
/// nodes with the property each gap belongs to.
#[derive(Default)]
struct Pending {
    transport: Vec<String>,
    state: Vec<(&'static str, String)>,
}

impl Oracle for Liveness {
    fn name(&self) -> &'static str {
        LIVENESS
    }

    fn on_phase(&mut self, view: &View<'_>, phase: Phase) -> Verdict {
        if phase == Phase::Liveness {
            self.deadline = Some(view.cluster.now().saturating_add(LIVENESS_BOUND));
            self.quiet = 0;
        }
        Verdict::Holds
    }

    fn on_client(&mut self, view: &View<'_>, seen: &Seen<'_>) -> Verdict {
        let (node, request, room, key, asked) = match *seen {
            Seen::Revoked { user, .. } => {
                let uid = view.roster.user(user).uid;
                for (&room, m) in &view.model.rooms {
                    if m.members.contains_key(&uid) {
                        self.revoked.push((user, room));
                    }
                }
                return Verdict::Holds;
            }
            Seen::Sent {
                node,
                request,
                room,
                key,
                reported,
            } => {
                let asked = match key {
                    OpKey::Request(user, nonce) if reported => {
                        Some((user, Asked::Request { nonce }))
                    }
                    _ => None,
                };
                (node, request, room, key, asked)
            }
            Seen::Published {
                user,
                node,
                request,
                room,
                id,
                ..
            } => {
                let asked = Some((view.roster.user(user).uid, Asked::Frame { id }));
                (node, request, room, OpKey::Frame(id), asked)
            }
            _ => return Verdict::Holds,
        };
        self.forwardable.push(Forwardable {
            node,
            request,
            room,
            key,
            asked,
        });
        Verdict::Holds
    }

    fn on_settling(&mut self, view: &View<'_>) -> Verdict {
        let Some(deadline) = self.deadline else {
            unreachable!("settling before the faults stopped");
        };
        let pending = self.pending(view);
        if pending.transport.is_empty() && pending.state.is_empty() {
            return Verdict::Holds;
        }
        if pending.transport.is_empty() {
            self.quiet += 1;
            if self.quiet >= QUIET_SLICES_MIN {
                let oracle = pending.state[0].0;
                let items: Vec<String> = pending.state.into_iter().map(|(_, s)| s).collect();
                let detail = format!(
                    "lost for good: every outbox is drained and every forwarded request arrived, yet {}",
                    summarize(&items)
                );
                return Verdict::Fails { oracle, detail };
            }
        } else {
            self.quiet = 0;
        }
        if view.cluster.now() >= deadline {
            let mut all = pending.transport;
            all.extend(pending.state.into_iter().map(|(_, s)| s));
            let detail = format!(
                "not converged {LIVENESS_BOUND:?} after every fault stopped: {}",
                summarize(&all)
            );
            return Verdict::Fails {
                oracle: LIVENESS,
                detail,
            };
        }
        Verdict::Waits
    }
}

impl Liveness {
    fn pending(&self, view: &View<'_>) -> Pending {
        let mut pending = Pending {
            transport: outboxes(view),
            state: Vec::new(),
        };
        pending.transport.extend(self.unforwarded(view));
        pending.transport.extend(raft_behind(view));
        pending.transport.extend(owed(view));
        for (&room, m) in &view.model.rooms {
            if view.wiped(m.home) || view.room_lost(room, m.home) {
                continue;
            }
            members(view, room, m, &mut pending.state);
            removed(view, room, m, &mut pending.state);
        }
        self.unevicted(view, &mut pending.state);
        self.unreported(view, &mut pending.state);
        pending
    }

    /// Decisions on forwarded requests that the (live, not wiped) node that
    /// forwarded them does not report to its user as the (not lost) home decided.
    fn unreported(&self, view: &View<'_>, state: &mut Vec<(&'static str, String)>) {
        for s in &self.forwardable {
            let (Some((user, asked)), Some(m)) = (s.asked, view.model.rooms.get(&s.room)) else {
                continue;
            };
            let Some(verdicts) = view.model.verdicts.get(&s.key) else {
                continue;
            };
            let local = view.sequences(s.room, m.home, s.node);
            let lost = view.wiped(m.home) || view.room_lost(s.room, m.home);
            if local || !view.live(s.node) || view.wiped(s.node) || lost {
                continue;
            }
            let Ok(txn) = view.cluster.nodes[s.node].store.read() else {
                continue;
            };
            let reported = domain::state::outcomes::of(&*txn, user, s.room, asked)
                .ok()
                .flatten();
            let agrees = match (&reported, s.key) {
                (Some(Outcome::Committed { id, seq }), _) => {
                    m.committed.get(&seq.0).is_some_and(|c| c.id == *id)
                }
                // A frame the home committed is never reported refused.
                (Some(Outcome::Denied(_)), OpKey::Frame(id)) => !m.ids.contains_key(&id),
                // A change is reported done exactly when the home applied it
                // (deciding it again later refuses it as stale).
                (Some(outcome), OpKey::Request(u, nonce)) => {
                    let applied = view.model.applied.contains(&(u, nonce));
                    verdicts.contains(outcome) && applied == (*outcome == Outcome::Done)
                }
                _ => false,
            };
            if !agrees {
                state.push((
                    LIVENESS,
                    format!(
                        "n{} reports {reported:?} for {asked:?} of {} in room {}, home n{} decided {verdicts:?}",
                        s.node,
                        label(view, &user),
                        short(&s.room.0),
                        m.home
                    ),
                ));
            }
        }
    }

    /// Revoked users still members of a room they were in when revoked, and never
    /// evicted from it (unless its home or their node is lost for good).
    fn unevicted(&self, view: &View<'_>, state: &mut Vec<(&'static str, String)>) {
        for &(user, room) in &self.revoked {
            let u = view.roster.user(user);
            let Some(m) = view.model.rooms.get(&room) else {
                continue;
            };
            let evicted = view.model.evictions.contains(&(room, u.uid));
            if view.wiped(m.home)
                || view.room_lost(room, m.home)
                || view.wiped(u.node)
                || evicted
                || !m.members.contains_key(&u.uid)
            {
                continue;
            }
            state.push((
                CHAIN,
                format!(
                    "u{user}, revoked by n{}, is still a member of room {} (home n{})",
                    u.node,
                    short(&room.0),
                    m.home
                ),
            ));
        }
    }

    /// Requests a live node forwarded that their (not lost) home never decided on.
    fn unforwarded(&self, view: &View<'_>) -> Vec<String> {
        let mut items = Vec::new();
        for s in &self.forwardable {
            let Some(home) = view.model.rooms.get(&s.room).map(|m| m.home) else {
                continue;
            };
            let lost = view.wiped(home) || view.room_lost(s.room, home);
            if !view.live(s.node) || lost || view.model.decided.contains(&s.key) {
                continue;
            }
            let outcomes = view.cluster.outcomes(s.node, s.request);
            if outcomes.contains(&Outcome::Forwarded) {
                items.push(format!(
                    "a request forwarded by n{} never reached home n{home}",
                    s.node
                ));
            }
        }
        items
    }
}

/// Room commands live nodes still owe their shard groups (proposed until
/// applied): work under way.
fn owed(view: &View<'_>) -> Vec<String> {
    use conclave_actors::domain::room::shard;
    let mut items = Vec::new();
    for i in (0..view.cluster.nodes.len()).filter(|&i| view.live(i)) {
        let Ok(txn) = view.cluster.nodes[i].store.read() else {
            continue;
        };
        let owed = shard::owed(&*txn, shard::OWED_MAX as usize).unwrap_or_default();
        let owed = owed
            .iter()
            .filter(|(_, o)| !view.group_lost(o.group))
            .count();
        if owed > 0 {
            items.push(format!(
                "n{i} owes {owed} room commands to its shard groups"
            ));
        }
    }
    items
}

/// With rooms on shard groups, the groups whose live replicas have not all
/// applied as far as the one furthest on: rooms' state is still moving there.
fn raft_behind(view: &View<'_>) -> Vec<String> {
    let Some(sharding) = view.cluster.sharding() else {
        return Vec::new();
    };
    let mut items = Vec::new();
    for group in sharding.layout.groups().filter(|&g| !view.group_lost(g)) {
        let replicas = sharding.layout.replicas(&sharding.nodes, group);
        let applied: Vec<(usize, u64)> = replicas
            .iter()
            .filter_map(|&id| view.cluster.index(id))
            .filter(|&i| view.live(i) || view.cluster.nodes[i].reborn && view.cluster.nodes[i].up)
            .filter_map(|i| {
                let txn = view.cluster.nodes[i].store.read().ok()?;
                Some((i, log::applied(&*txn, group).ok()?.index))
            })
            .collect();
        let furthest = applied.iter().map(|&(_, a)| a).max().unwrap_or(0);
        for (i, a) in applied.into_iter().filter(|&(_, a)| a < furthest) {
            items.push(format!(
                "raft group {group}: n{i} applied {a} of {furthest}"
            ));
        }
    }
    items
}

/// Live nodes' outboxes that still hold messages for nodes not lost for good, or
/// back under their identity with an empty disk (their streams must flow again).
fn outboxes(view: &View<'_>) -> Vec<String> {
    let mut items = Vec::new();
    for i in (0..view.cluster.nodes.len()).filter(|&i| view.live(i)) {
        for (dest, depth) in view.cluster.outbox_depths(i) {
            if let Some(j) = view.cluster.index(dest) {
                if !view.wiped(j) || view.cluster.nodes[j].reborn {
                    items.push(format!("outbox n{i}->n{j} holds {depth}"));
                }
            }
        }
    }
    items
}

/// How failures name user `uid`.
fn label(view: &View<'_>, uid: &UserId) -> String {
    match view.roster.user_index(uid) {
        Some(u) => format!("u{u}"),
        None => "a user the workload never made".to_string(),
    }
}

/// Each live member's node shows them as a member since where the home said,
/// holds every frame they may read, and a key for every epoch of those.
fn members(view: &View<'_>, room: RoomId, m: &RoomModel, state: &mut Vec<(&'static str, String)>) {
    let r = short(&room.0);
    for (uid, member) in &m.members {
        let (node, since) = (member.node, member.since);
        if !view.live(node) {
            continue;
        }
        let Ok(txn) = view.cluster.nodes[node].store.read() else {
            continue;
        };
        let u = label(view, uid);
        let vis = domain::state::rooms::visibility(&*txn, *uid, room)
            .ok()
            .flatten();
        match vis {
            Some(v) if v.until.is_none() && v.from.0 == since => {}
            other => {
                state.push((
                    ORDER,
                    format!(
                    "n{node} does not show {u} as a member of room {r} from seq {since} ({other:?})"
                ),
                ));
                continue;
            }
        }
        let stored: BTreeSet<u64> = room_frames(&*txn, room, Seq(since))
            .unwrap_or_default()
            .into_iter()
            .map(|(s, _)| s.0)
            .collect();
        let missing: Vec<u64> = (since..m.next_seq)
            .filter(|s| !stored.contains(s))
            .collect();
        if !missing.is_empty() {
            state.push((
                ORDER,
                format!(
                    "n{node} lacks seqs {} of room {r} that {u} may read",
                    ranges(&missing)
                ),
            ));
        }
        // A key a node sealed itself (a lie, see `Fault::Lie`) is no key to read with.
        let held: BTreeSet<u64> = domain::state::keys::sealed_for(&*txn, room, *uid)
            .unwrap_or_default()
            .into_iter()
            .filter(|(_, key)| !node_sealed(view, key.sealer))
            .map(|(e, _)| e.0)
            .collect();
        let needed: BTreeSet<u64> = m.committed.range(since..).map(|(_, c)| c.epoch).collect();
        if let Some(e) = needed.iter().find(|e| !held.contains(e)) {
            state.push((DECRYPT, format!(
                "n{node} holds no key of room {r} epoch {e} for member {u}, who may read frames of that epoch"
            )));
        }
    }
}

/// Whether `sealer` is a node's identity (no member is).
fn node_sealed(view: &View<'_>, sealer: UserId) -> bool {
    view.cluster.nodes.iter().any(|n| n.id.0 == sealer.0)
}

/// Each removed member's live node shows their removal where the home made it.
fn removed(view: &View<'_>, room: RoomId, m: &RoomModel, state: &mut Vec<(&'static str, String)>) {
    let r = short(&room.0);
    for (uid, gone) in &m.removed {
        let Some(u) = view.roster.user_index(uid) else {
            continue;
        };
        let node = view.roster.user(u).node;
        if !view.live(node) {
            continue;
        }
        let Ok(txn) = view.cluster.nodes[node].store.read() else {
            continue;
        };
        let vis = domain::state::rooms::visibility(&*txn, *uid, room)
            .ok()
            .flatten();
        let until = gone.until;
        if !vis.is_some_and(|v| v.until == Some(Seq(until)) && v.from.0 == gone.since) {
            state.push((
                ORDER,
                format!(
                    "n{node} does not show u{u} as removed from room {r} at seq {until} ({vis:?})"
                ),
            ));
        }
    }
}

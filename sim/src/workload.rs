//! The workload: users on every node, rooms, publishes, invites, removals with
//! rekey, rekeys, and subscribers reading history then live, all drawn from the
//! seed's workload stream. Clients report what they do and see to the oracles (as
//! [`Seen`]) and never judge it themselves, with one exception, as real clients:
//! they take a key only if the room's chain, as their node holds it and verified
//! from its creation, pins it ([`client::accept_keys`]), and they seal invitations,
//! removals and rekeys against that chain (never against a member list a node
//! gave them). Whether what they accepted was right is still the oracles' call.

use core::time::Duration;
use std::collections::{BTreeMap, BTreeSet, VecDeque};

use conclave_actors::actor::Time;
use conclave_actors::crypto::{EpochKey, Frame, SealedKey};
use conclave_actors::domain::chain::{ChainHash, ChainState};
use conclave_actors::domain::quota::QUOTA_BURST_S;
use conclave_actors::domain::{
    self, client, Denial, History, Invitee, Op, Outcome, Policy, RoomRole, SignedRequest,
};
use conclave_actors::ids::{Epoch, RoomId, Seq};
use conclave_actors::{Identity, UserId};
use conclave_storage::Store;
use rand_chacha::ChaCha20Rng;
use rand_core::Rng;

use crate::cluster::{derive_rng, verified_chain, Cluster};
use crate::draw::{between, chance, pick};
use crate::faults::live;
use crate::model::{changes_members, room_frames, Model, OpKey};
use crate::options::Options;
use crate::oracle::{Checks, Round, Seen};

/// How long a removal waits for the home's chain length and for the remover's
/// node to hold the chain that far before the client gives up on it.
const REMOVE_CHAIN_WAIT_MS_MAX: u64 = 10_000;

/// How many of the newest publishes have their outcome watched (for refusals that
/// ask for a rekey).
const PUBLISHES_WATCHED_MAX: usize = 64;

/// One chance in this many that a removal step (not a rekey) is a revocation by a
/// node's admin instead.
const REVOKE_INSTEAD_ONE_IN: u64 = 6;

/// The most users one run revokes.
const REVOCATIONS_MAX: usize = 3;

/// How long the workload waits for a node to answer a revocation.
const REVOKE_WAIT_MS_MAX: u64 = 10_000;

/// How long a client waits before it sends another rekey on the same chain head.
const REKEY_RETRY_MS: u64 = 2_000;

/// One chance in this many that a removal step is a rekey (same members, next
/// epoch) by a random member instead.
const REKEY_INSTEAD_ONE_IN: u64 = 4;

/// Share, in tenths, of invitees made admins of the room.
const INVITE_ADMIN_TENTHS: u64 = 3;

/// One chance in this many that a manager who is not the owner removes
/// themselves rather than someone else.
const REMOVE_SELF_ONE_IN: u64 = 5;

/// In the seeds with a hostile user, one step in this many is followed by one
/// of theirs.
const HOSTILE_ONE_IN: u64 = 6;

/// The hostile user: the first one, never revoked (what they pass of their quota
/// is told by their publishes' outcomes, which a revocation would answer first).
const HOSTILE_USER: usize = 0;

/// A user of the workload.
pub struct User {
    /// Their identity (their client's keys).
    pub id: Identity,
    /// Their user id.
    pub uid: UserId,
    /// The node they are homed on.
    pub node: usize,
}

/// What the workload made: its users (`u3` in failures is index 3) and its rooms,
/// in the order they were created.
#[derive(Default)]
pub struct Roster {
    users: Vec<User>,
    by_uid: BTreeMap<UserId, usize>,
    rooms: Vec<RoomId>,
    /// Each node's admin, by node.
    admins: Vec<Identity>,
}

impl Roster {
    /// Adds a user; returns their index.
    pub fn add_user(&mut self, user: User) -> usize {
        let index = self.users.len();
        let previous = self.by_uid.insert(user.uid, index);
        assert!(previous.is_none(), "two users drew the same identity");
        self.users.push(user);
        index
    }

    /// Adds the admin of the next node (nodes in order).
    pub fn add_admin(&mut self, admin: Identity) {
        self.admins.push(admin);
    }

    /// The admin of node `i`.
    pub fn admin(&self, i: usize) -> &Identity {
        &self.admins[i]
    }

    /// Adds a room its home created.
    pub fn add_room(&mut self, room: RoomId) {
        assert!(!self.rooms.contains(&room), "a room created twice");
        self.rooms.push(room);
    }

    /// How many users there are.
    pub fn users_len(&self) -> usize {
        self.users.len()
    }

    /// User `i`.
    pub fn user(&self, i: usize) -> &User {
        &self.users[i]
    }

    /// The index of the user `uid`, if the workload made them.
    pub fn user_index(&self, uid: &UserId) -> Option<usize> {
        self.by_uid.get(uid).copied()
    }

    /// The rooms, in the order they were created.
    pub fn rooms(&self) -> &[RoomId] {
        &self.rooms
    }
}

/// What the workload acts on and reports to.
pub struct Env<'a> {
    /// The run's options.
    pub o: &'a Options,
    /// The cluster.
    pub c: &'a mut Cluster,
    /// Every room as its home decided it.
    pub model: &'a Model,
    /// The users and rooms.
    pub roster: &'a Roster,
    /// The oracles.
    pub checks: &'a mut Checks,
}

impl Env<'_> {
    /// Tells the oracles what a client did or saw.
    pub fn seen(&mut self, seen: &Seen<'_>) -> Round {
        self.checks
            .round(self.c, self.model, self.roster, |o, view| {
                o.on_client(view, seen)
            })
    }

    fn failed(&self) -> bool {
        self.checks.failed()
    }

    fn live(&self, i: usize) -> bool {
        live(self.c, i)
    }
}

/// A removal waiting for the remover's node to hold the room's chain as far as
/// the home has it: the next epoch's key is sealed to the members that chain lists.
struct PendingRemove {
    node: usize,
    remover: usize,
    room: RoomId,
    target: UserId,
    /// The room-info request that asks the home how long the chain is.
    request: u64,
    /// How long the home said the chain is, once it answered.
    chain_len: Option<u64>,
    deadline: Time,
}

/// A revocation waiting for its node's answer.
struct PendingRevoke {
    node: usize,
    user: usize,
    request: u64,
    deadline: Time,
}

/// A publish whose outcome is watched: a refusal for want of a rekey makes the
/// publisher rekey.
struct Watched {
    node: usize,
    request: u64,
    user: usize,
    room: RoomId,
}

/// A subscriber of a user to a room, reading history then live.
#[derive(Clone, Copy)]
struct Sub {
    /// The visibility start it follows (a new membership starts over).
    from: u64,
    /// The next sequence number it expects.
    next: u64,
}

/// The workload's clients and what they remember.
pub struct Workload {
    rng: ChaCha20Rng,
    /// Per user and room, the keys their client opened.
    keycache: BTreeMap<(usize, RoomId), BTreeMap<Epoch, EpochKey>>,
    subs: BTreeMap<(usize, RoomId), Sub>,
    pending_removes: Vec<PendingRemove>,
    /// The newest publishes, oldest first (at most [`PUBLISHES_WATCHED_MAX`]).
    watched: VecDeque<Watched>,
    /// When a rekey was last sent on a room's chain head: one per head, unless
    /// [`REKEY_RETRY_MS`] passed (the first one may have been lost in a crash).
    rekeyed: BTreeMap<(RoomId, ChainHash), Time>,
    pending_revokes: Vec<PendingRevoke>,
    /// Users revoked (or being revoked): nobody invites them any more.
    revoked: BTreeSet<usize>,
    /// Keys refused and reported, by (user, room, epoch, the key's `enc`).
    refusals: BTreeSet<(usize, RoomId, Epoch, Option<[u8; 32]>)>,
    counter: u64,
    /// Frames published.
    pub published: u64,
    /// Frames subscribers read, verified and decrypted.
    pub read: u64,
    /// Keys clients refused (each sealed key once).
    pub refused: u64,
}

impl Workload {
    /// The seed's workload, nothing done yet.
    pub fn new(o: &Options) -> Self {
        Workload {
            rng: derive_rng(o.seed, 0, "workload"),
            keycache: BTreeMap::new(),
            subs: BTreeMap::new(),
            pending_removes: Vec::new(),
            watched: VecDeque::new(),
            pending_revokes: Vec::new(),
            revoked: BTreeSet::new(),
            rekeyed: BTreeMap::new(),
            refusals: BTreeSet::new(),
            counter: 0,
            published: 0,
            read: 0,
            refused: 0,
        }
    }

    /// The workload's random stream (the chaos draws its step times from it).
    pub fn rng(&mut self) -> &mut ChaCha20Rng {
        &mut self.rng
    }

    fn sign(env: &mut Env<'_>, user: usize, op: Op) -> SignedRequest {
        let node = env.roster.user(user).node;
        let now = env.c.node_now(node);
        client::sign(&env.roster.user(user).id, now, env.c.rng(), op)
    }

    /// Sends a signed request of `user` to their node; the oracles follow it if it
    /// concerns `room` (a node may forward it to the room's home).
    pub fn send(env: &mut Env<'_>, user: usize, room: Option<RoomId>, op: Op) -> u64 {
        let node = env.roster.user(user).node;
        let reported = changes_members(&op);
        let req = Self::sign(env, user, op);
        let key = OpKey::Request(req.request.user, req.request.nonce);
        let request = env.c.send_signed(node, req);
        if let Some(room) = room {
            env.seen(&Seen::Sent {
                node,
                request,
                room,
                key,
                reported,
            });
        }
        request
    }

    /// A random user creates a room on their node: returns the owner, the room
    /// and the request (`None` if sealing its first key failed).
    pub fn create_room(&mut self, env: &mut Env<'_>) -> Option<(usize, RoomId, u64)> {
        assert!(env.roster.users_len() > 0, "rooms need users");
        let owner = (self.rng.next_u64() % env.roster.users_len() as u64) as usize;
        let history = if self.rng.next_u64() & 1 == 1 {
            History::FromEpoch
        } else {
            History::FromJoin
        };
        let policy = Policy {
            persist: true,
            history,
        };
        let home = env.c.id(env.roster.user(owner).node);
        let id = &env.roster.user(owner).id;
        let (room, _key, op) = client::create_room(env.c.rng(), id, home, policy).ok()?;
        let request = Self::send(env, owner, None, op);
        Some((owner, room, request))
    }

    /// How many first members a new room gets.
    pub fn first_invitees(&mut self, roster: &Roster) -> u64 {
        let others = roster.users_len() as u64 - 1;
        between(&mut self.rng, 1, 3.min(others))
    }

    /// One workload step.
    pub fn step(&mut self, env: &mut Env<'_>) {
        self.progress_removes(env);
        self.progress_publishes(env);
        self.progress_revokes(env);
        let w = env.o.weights;
        let total: u32 = w.iter().sum();
        let mut roll = (self.rng.next_u64() % u64::from(total.max(1))) as u32;
        let mut action = 0;
        for (k, weight) in w.iter().enumerate() {
            if roll < *weight {
                action = k;
                break;
            }
            roll -= weight;
        }
        if env.o.hostile && self.rng.next_u64().is_multiple_of(HOSTILE_ONE_IN) {
            self.hostile(env);
        }
        match action {
            0 => self.publish(env),
            1 => self.invite(env),
            2 if self.rng.next_u64().is_multiple_of(REKEY_INSTEAD_ONE_IN) => self.rekey(env),
            2 if env.o.revocations && self.rng.next_u64().is_multiple_of(REVOKE_INSTEAD_ONE_IN) => {
                self.revoke(env)
            }
            2 => self.remove(env),
            _ => self.read_all(env, false),
        }
    }

    /// The rooms `user`'s node says they are a member of now.
    fn rooms_of(env: &Env<'_>, user: usize) -> Vec<RoomId> {
        let u = env.roster.user(user);
        let Ok(txn) = env.c.nodes[u.node].store.read() else {
            return Vec::new();
        };
        env.roster
            .rooms()
            .iter()
            .copied()
            .filter(|&room| {
                matches!(
                    domain::state::rooms::visibility(&*txn, u.uid, room),
                    Ok(Some(v)) if v.until.is_none()
                )
            })
            .collect()
    }

    /// The keys `user`'s client holds in `room`: what it accepted before, and
    /// what it accepts now of the keys their node holds, against the room's chain
    /// as their node holds it, verified from its creation. Each key accepted or
    /// refused is reported (a refused one once).
    fn keys(&mut self, env: &mut Env<'_>, user: usize, room: RoomId) -> BTreeMap<Epoch, EpochKey> {
        let node = env.roster.user(user).node;
        let uid = env.roster.user(user).uid;
        let sealed = match env.c.nodes[node].store.read() {
            Ok(txn) => domain::state::keys::sealed_for(&*txn, room, uid).unwrap_or_default(),
            Err(_) => Vec::new(),
        };
        let cache = self.keycache.entry((user, room)).or_default();
        let fresh: Vec<_> = sealed
            .into_iter()
            .filter(|(e, _)| !cache.contains_key(e))
            .collect();
        if !fresh.is_empty() {
            // No chain yet (or none that verifies): nothing can be accepted.
            if let Some(chain) = verified_chain(&env.c.nodes[node], room) {
                self.accept(env, user, &chain, &fresh);
            }
        }
        self.keycache[&(user, room)].clone()
    }

    /// `user`'s client judges `fresh` keys against `chain`, reports each verdict
    /// and keeps what it accepted.
    fn accept(
        &mut self,
        env: &mut Env<'_>,
        user: usize,
        chain: &ChainState,
        fresh: &[(Epoch, SealedKey)],
    ) {
        let (node, room) = (env.roster.user(user).node, chain.room);
        let (accepted, refused) = client::accept_keys(&env.roster.user(user).id, chain, fresh);
        for (epoch, refusal) in &refused {
            let enc = fresh.iter().find(|(e, _)| e == epoch).map(|(_, k)| k.enc);
            if !self.refusals.insert((user, room, *epoch, enc)) {
                continue;
            }
            self.refused += 1;
            env.seen(&Seen::KeyRefused {
                user,
                node,
                room,
                epoch: *epoch,
                refusal,
            });
        }
        for (epoch, key) in accepted {
            env.seen(&Seen::KeyAccepted {
                user,
                node,
                room,
                epoch,
                key: &key,
            });
            self.keycache
                .entry((user, room))
                .or_default()
                .insert(epoch, key);
        }
    }

    fn publish(&mut self, env: &mut Env<'_>) {
        let candidates: Vec<usize> = (0..env.roster.users_len())
            .filter(|&u| env.live(env.roster.user(u).node))
            .collect();
        let Some(user) = pick(&mut self.rng, &candidates) else {
            return;
        };
        let rooms = Self::rooms_of(env, user);
        let Some(room) = pick(&mut self.rng, &rooms) else {
            return;
        };
        if Self::rekey_due(env, user, room) {
            self.rekey_as(env, user, room);
            return;
        }
        let keys = self.keys(env, user, room);
        let epochs: Vec<Epoch> = keys.keys().copied().collect();
        let Some(&newest) = epochs.last() else { return };
        let epoch = if epochs.len() > 1 && chance(&mut self.rng, env.o.stale_publish_ppm) {
            epochs[(self.rng.next_u64() % (epochs.len() as u64 - 1)) as usize]
        } else {
            newest
        };
        let Some(request) = self.publish_sealed(env, user, room, (epoch, &keys[&epoch])) else {
            return;
        };
        if self.watched.len() >= PUBLISHES_WATCHED_MAX {
            self.watched.pop_front();
        }
        self.watched.push_back(Watched {
            node: env.roster.user(user).node,
            request,
            user,
            room,
        });
    }

    /// Seals a fresh text as `user` for `room` at `epoch` with `key`, hands it
    /// to their node and reports it; returns the publish request.
    fn publish_sealed(
        &mut self,
        env: &mut Env<'_>,
        user: usize,
        room: RoomId,
        (epoch, key): (Epoch, &EpochKey),
    ) -> Option<u64> {
        self.counter += 1;
        let text = format!("seed {} message {}", env.o.seed, self.counter).into_bytes();
        let node = env.roster.user(user).node;
        let now = env.c.node_now(node);
        let id = &env.roster.user(user).id;
        let frame = client::seal(env.c.rng(), id, room, epoch, key, now, &text).ok()?;
        let id = frame.id;
        env.c
            .mark(&format!("publish u{user} n{node} epoch {}", epoch.0));
        let request = env.c.publish_frame(node, frame);
        self.published += 1;
        let text = text.as_slice();
        env.seen(&Seen::Published {
            user,
            node,
            request,
            room,
            id,
            text,
        });
        Some(request)
    }

    /// The hostile user (on a live node) floods a room of theirs, or trespasses.
    fn hostile(&mut self, env: &mut Env<'_>) {
        if !env.live(env.roster.user(HOSTILE_USER).node) {
            return;
        }
        if self.rng.next_u64().is_multiple_of(2) {
            self.flood(env);
        } else {
            self.trespass(env);
        }
    }

    /// The hostile user hands their node three bursts' worth of publishes to one
    /// room of theirs at once: what passes their quota is committed as usual.
    fn flood(&mut self, env: &mut Env<'_>) {
        let user = HOSTILE_USER;
        let rooms = Self::rooms_of(env, user);
        let Some(room) = pick(&mut self.rng, &rooms) else {
            return;
        };
        let keys = self.keys(env, user, room);
        let Some((&epoch, key)) = keys.iter().next_back() else {
            return;
        };
        let node = env.roster.user(user).node;
        let per_s = env.o.domain.publish_quota.frames_per_s;
        let burst = per_s * QUOTA_BURST_S;
        env.c
            .mark(&format!("flood u{user} n{node} {} frames", 3 * burst));
        let mut requests = Vec::new();
        for _ in 0..3 * burst {
            let Some(request) = self.publish_sealed(env, user, room, (epoch, key)) else {
                return;
            };
            requests.push(request);
        }
        let allowance = burst + per_s;
        env.seen(&Seen::Flood {
            user,
            node,
            requests: &requests,
            allowance,
        });
    }

    /// The hostile user publishes, with a key of their own, to a room their node
    /// knows and they are not a member of: their node refuses it, and it must
    /// never reach the room's home.
    fn trespass(&mut self, env: &mut Env<'_>) {
        let u = env.roster.user(HOSTILE_USER);
        let (node, uid, id) = (u.node, u.uid, u.id.clone());
        let known: Vec<(RoomId, Epoch)> = match env.c.nodes[node].store.read() {
            Ok(txn) => env
                .roster
                .rooms()
                .iter()
                .filter_map(|&room| {
                    let meta = domain::state::rooms::meta(&*txn, room).ok()??;
                    let vis = domain::state::rooms::visibility(&*txn, uid, room).ok()?;
                    vis.is_none_or(|v| v.until.is_some())
                        .then_some((room, meta.epoch))
                })
                .collect(),
            Err(_) => return,
        };
        let Some((room, epoch)) = pick(&mut self.rng, &known) else {
            return;
        };
        let key = EpochKey::generate(env.c.rng());
        let now = env.c.node_now(node);
        let Ok(frame) = client::seal(env.c.rng(), &id, room, epoch, &key, now, b"trespass") else {
            return;
        };
        env.c.mark(&format!("trespass u{HOSTILE_USER} n{node}"));
        env.seen(&Seen::Trespassed { id: frame.id });
        env.c.publish_frame(node, frame);
    }

    /// `inviter` invites a random non-member to `room`. Returns the request, if
    /// one was sent.
    pub fn invite_as(
        &mut self,
        env: &mut Env<'_>,
        inviter: usize,
        room: RoomId,
    ) -> Option<(usize, u64)> {
        let node = env.roster.user(inviter).node;
        let chain = verified_chain(&env.c.nodes[node], room)?;
        let mut members: BTreeSet<UserId> = chain.members.keys().copied().collect();
        if let Some(m) = env.model.rooms.get(&room) {
            members.extend(m.members.keys().copied());
        }
        let candidates: Vec<usize> = (0..env.roster.users_len())
            .filter(|&u| {
                let user = env.roster.user(u);
                !members.contains(&user.uid)
                    && !env.c.nodes[user.node].wiped
                    && !self.revoked.contains(&u)
            })
            .collect();
        let invitee = pick(&mut self.rng, &candidates)?;
        let keys = self.keys(env, inviter, room);
        let key = keys.get(&chain.epoch)?;
        let role = if self.rng.next_u64() % 10 < INVITE_ADMIN_TENTHS {
            RoomRole::Admin
        } else {
            RoomRole::Member
        };
        let invitee_user = env.roster.user(invitee);
        let home = env.c.id(invitee_user.node);
        let to = Invitee {
            user: invitee_user.id.public(),
            home,
            role,
        };
        let id = &env.roster.user(inviter).id;
        let op = client::invite(env.c.rng(), id, &chain, key, to).ok()?;
        env.c.mark(&format!(
            "invite u{inviter} u{invitee} epoch {}",
            chain.epoch.0
        ));
        let request = Self::send(env, inviter, Some(room), op);
        Some((node, request))
    }

    /// The live users who may change `room`'s members, as its home decided.
    fn managers(env: &Env<'_>, room: RoomId) -> Vec<usize> {
        let Some(m) = env.model.rooms.get(&room) else {
            return Vec::new();
        };
        m.members
            .iter()
            .filter(|(_, member)| member.role.manages_members())
            .filter_map(|(uid, _)| env.roster.user_index(uid))
            .filter(|&u| env.live(env.roster.user(u).node))
            .collect()
    }

    fn invite(&mut self, env: &mut Env<'_>) {
        let Some(room) = pick(&mut self.rng, env.roster.rooms()) else {
            return;
        };
        let managers = Self::managers(env, room);
        if let Some(inviter) = pick(&mut self.rng, &managers) {
            self.invite_as(env, inviter, room);
        }
    }

    /// A manager removes a member (or, not being the owner, themselves): first the
    /// room's members from the home, then (in a later step) the removal with the
    /// next epoch's key sealed to all but the removed member.
    fn remove(&mut self, env: &mut Env<'_>) {
        let Some(room) = pick(&mut self.rng, env.roster.rooms()) else {
            return;
        };
        let managers = Self::managers(env, room);
        let Some(remover) = pick(&mut self.rng, &managers) else {
            return;
        };
        let Some(target) = self.remove_target(env, room, remover) else {
            return;
        };
        env.c
            .mark(&format!("room info for a removal by u{remover}"));
        let request = Self::send(env, remover, Some(room), Op::RoomInfo { room });
        let wait = Duration::from_millis(REMOVE_CHAIN_WAIT_MS_MAX);
        self.pending_removes.push(PendingRemove {
            node: env.roster.user(remover).node,
            remover,
            room,
            target,
            request,
            chain_len: None,
            deadline: env.c.now().saturating_add(wait),
        });
    }

    fn remove_target(&mut self, env: &Env<'_>, room: RoomId, remover: usize) -> Option<UserId> {
        let m = env.model.rooms.get(&room)?;
        let me = env.roster.user(remover).uid;
        let own_role = m.members.get(&me).map(|member| member.role);
        if own_role != Some(RoomRole::Owner)
            && self.rng.next_u64().is_multiple_of(REMOVE_SELF_ONE_IN)
        {
            return Some(me);
        }
        let targets: Vec<UserId> = m
            .members
            .iter()
            .filter(|(u, member)| **u != me && member.role != RoomRole::Owner)
            .map(|(u, _)| *u)
            .collect();
        pick(&mut self.rng, &targets)
    }

    /// Removals whose remover's node holds the chain as far as the home said are
    /// sealed and sent; the others wait, up to their deadline.
    fn progress_removes(&mut self, env: &mut Env<'_>) {
        let pending = std::mem::take(&mut self.pending_removes);
        for mut p in pending {
            if p.chain_len.is_none() {
                match env.c.outcome(p.node, p.request) {
                    Some(Outcome::Room(info)) => p.chain_len = Some(info.chain_len),
                    Some(_) => continue,
                    None => {}
                }
            }
            let sent = env.live(p.node) && self.try_remove(env, &p);
            if !sent && env.live(p.node) && env.c.now() < p.deadline {
                self.pending_removes.push(p);
            }
        }
    }

    /// Sends `p`'s removal if the remover's node holds a verified chain as long as
    /// the home said; whether it is done with (sent, or moot).
    fn try_remove(&mut self, env: &mut Env<'_>, p: &PendingRemove) -> bool {
        let Some(want) = p.chain_len else {
            return false;
        };
        let Some(chain) = verified_chain(&env.c.nodes[p.node], p.room) else {
            return false;
        };
        if chain.len < want {
            return false;
        }
        if !chain.members.contains_key(&p.target) {
            return true;
        }
        let id = &env.roster.user(p.remover).id;
        if let Ok((_key, op)) = client::remove(env.c.rng(), id, &chain, p.target) {
            env.c.mark(&format!("remove by u{}", p.remover));
            Self::send(env, p.remover, Some(p.room), op);
        }
        true
    }

    /// Publishes refused for want of a rekey make their publisher rekey; the
    /// others are done with once answered.
    fn progress_publishes(&mut self, env: &mut Env<'_>) {
        let watched = std::mem::take(&mut self.watched);
        for w in watched {
            match env.c.outcome(w.node, w.request) {
                Some(Outcome::Denied(Denial::RekeyNeeded)) => {
                    if env.live(w.node) {
                        self.rekey_as(env, w.user, w.room);
                    }
                }
                Some(_) => {}
                None => self.watched.push_back(w),
            }
        }
    }

    /// A live node's admin revokes one of its users (at most
    /// [`REVOCATIONS_MAX`] a run): the node has them evicted from their rooms.
    ///
    /// In the seeds that draw revocations (or with `--revocations`). It found two
    /// bugs of the actors, fixed since: a user invited to a room whose membership
    /// had not reached their node when it revoked them was never evicted from it;
    /// and a node joining a room after an eviction, before the rekey, refused the
    /// evicted member's earlier frames of that epoch in its backfill.
    fn revoke(&mut self, env: &mut Env<'_>) {
        if self.revoked.len() >= REVOCATIONS_MAX {
            return;
        }
        let candidates: Vec<usize> = (0..env.roster.users_len())
            .filter(|&u| !self.revoked.contains(&u) && env.live(env.roster.user(u).node))
            .filter(|&u| !(env.o.hostile && u == HOSTILE_USER))
            .collect();
        let Some(user) = pick(&mut self.rng, &candidates) else {
            return;
        };
        let u = env.roster.user(user);
        let op = Op::RevokeUser { user: u.uid };
        let node = u.node;
        env.c.mark(&format!("revoke u{user} on n{node}"));
        let request = env.c.request(node, env.roster.admin(node), op);
        self.revoked.insert(user);
        let wait = Duration::from_millis(REVOKE_WAIT_MS_MAX);
        self.pending_revokes.push(PendingRevoke {
            node,
            user,
            request,
            deadline: env.c.now().saturating_add(wait),
        });
    }

    /// Revocations their node made are reported; the others wait, up to their
    /// deadline (a crash may have taken the request or its answer).
    fn progress_revokes(&mut self, env: &mut Env<'_>) {
        let pending = std::mem::take(&mut self.pending_revokes);
        for p in pending {
            match env.c.outcome(p.node, p.request) {
                Some(Outcome::Done) => {
                    env.seen(&Seen::Revoked {
                        user: p.user,
                        node: p.node,
                    });
                }
                Some(_) => {}
                None if env.c.now() < p.deadline => self.pending_revokes.push(p),
                None => {}
            }
        }
    }

    /// A random member of a random room moves it to its next epoch.
    fn rekey(&mut self, env: &mut Env<'_>) {
        let Some(room) = pick(&mut self.rng, env.roster.rooms()) else {
            return;
        };
        let members: Vec<usize> = env
            .model
            .rooms
            .get(&room)
            .map(|m| {
                m.members
                    .keys()
                    .filter_map(|u| env.roster.user_index(u))
                    .collect()
            })
            .unwrap_or_default();
        let live: Vec<usize> = members
            .into_iter()
            .filter(|&u| env.live(env.roster.user(u).node))
            .collect();
        if let Some(user) = pick(&mut self.rng, &live) {
            self.rekey_as(env, user, room);
        }
    }

    /// Whether `user`'s node says `room` takes no frame until a member rekeys (a
    /// member was evicted, or the epoch carried all the frames it may).
    fn rekey_due(env: &Env<'_>, user: usize, room: RoomId) -> bool {
        let node = env.roster.user(user).node;
        let Ok(txn) = env.c.nodes[node].store.read() else {
            return false;
        };
        let Ok(Some(meta)) = domain::state::rooms::meta(&*txn, room) else {
            return false;
        };
        let carried = meta.next_seq.0.saturating_sub(meta.epoch_start.0);
        meta.rekey_due || carried >= env.o.domain.epoch_frames_max
    }

    /// `user` moves `room` to its next epoch, sealed to the members of the chain
    /// their node holds; once per chain head (another rekey on the same head
    /// would be refused as stale) unless [`REKEY_RETRY_MS`] passed.
    fn rekey_as(&mut self, env: &mut Env<'_>, user: usize, room: RoomId) -> Option<u64> {
        let (node, uid) = (env.roster.user(user).node, env.roster.user(user).uid);
        let chain = verified_chain(&env.c.nodes[node], room)?;
        if !chain.members.contains_key(&uid) {
            return None;
        }
        let now = env.c.now();
        let retry = Duration::from_millis(REKEY_RETRY_MS);
        let last = self.rekeyed.get(&(room, chain.head));
        if last.is_some_and(|&t| now < t.saturating_add(retry)) {
            return None;
        }
        self.rekeyed.insert((room, chain.head), now);
        let id = &env.roster.user(user).id;
        let (_key, op) = client::rekey(env.c.rng(), id, &chain).ok()?;
        env.c
            .mark(&format!("rekey u{user} epoch {}", chain.epoch.0 + 1));
        Some(Self::send(env, user, Some(room), op))
    }

    /// Every subscriber reads what is new for it; `strict` at the end of the run
    /// (a key that has not arrived by then will not).
    pub fn read_all(&mut self, env: &mut Env<'_>, strict: bool) {
        for user in 0..env.roster.users_len() {
            for room in env.roster.rooms().to_vec() {
                self.read(env, user, room, strict);
                if env.failed() {
                    return;
                }
            }
        }
    }

    /// The subscriber of `user` in `room` reads on from where it is, and reports
    /// each frame: where it read it, then what it opened to. A frame whose key has
    /// not arrived yet waits, unless `strict`.
    fn read(&mut self, env: &mut Env<'_>, user: usize, room: RoomId, strict: bool) {
        let node = env.roster.user(user).node;
        if !env.live(node) {
            return;
        }
        let Some((vis, frames)) = self.unread(env, user, room) else {
            return;
        };
        for (seq, frame) in frames {
            if !vis.covers(seq) {
                break;
            }
            if !self.read_frame(env, user, room, seq, &frame, strict) {
                return;
            }
        }
    }

    /// What `user`'s node holds of `room` past where their subscriber is (which
    /// starts over if their membership did).
    fn unread(
        &mut self,
        env: &Env<'_>,
        user: usize,
        room: RoomId,
    ) -> Option<(domain::state::rooms::Visibility, Vec<(Seq, Frame)>)> {
        let u = env.roster.user(user);
        let txn = env.c.nodes[u.node].store.read().ok()?;
        let vis = domain::state::rooms::visibility(&*txn, u.uid, room).ok()??;
        let start = Sub {
            from: vis.from.0,
            next: vis.from.0,
        };
        let sub = self.subs.entry((user, room)).or_insert(start);
        if sub.from != vis.from.0 {
            *sub = start;
        }
        let frames = room_frames(&*txn, room, Seq(sub.next)).ok()?;
        Some((vis, frames))
    }

    /// The keys `user`'s client holds in `room`, looked up again on their node if
    /// they lack `epoch` (`None` if a key found there fails to open).
    fn keys_for(
        &mut self,
        env: &mut Env<'_>,
        user: usize,
        room: RoomId,
        epoch: Epoch,
    ) -> Option<BTreeMap<Epoch, EpochKey>> {
        let cached = self.keycache.get(&(user, room));
        if let Some(keys) = cached.filter(|keys| keys.contains_key(&epoch)) {
            return Some(keys.clone());
        }
        let keys = self.keys(env, user, room);
        (!env.failed()).then_some(keys)
    }

    /// Reads one frame; whether to read on.
    fn read_frame(
        &mut self,
        env: &mut Env<'_>,
        user: usize,
        room: RoomId,
        seq: Seq,
        frame: &Frame,
        strict: bool,
    ) -> bool {
        let node = env.roster.user(user).node;
        let Some(sub) = self.subs.get(&(user, room)).copied() else {
            return false;
        };
        let (next, id) = (sub.next, frame.id);
        let read = Seen::Read {
            user,
            node,
            room,
            seq,
            next,
            id,
        };
        if env.seen(&read).failed > 0 {
            return false;
        }
        let Some(keys) = self.keys_for(env, user, room, frame.epoch) else {
            return false;
        };
        let epoch = frame.epoch;
        if !keys.contains_key(&epoch) {
            if strict {
                env.seen(&Seen::NoKey {
                    user,
                    node,
                    room,
                    seq,
                    epoch,
                });
            }
            return false;
        }
        let opened = client::open(frame, &keys);
        let text = match &opened {
            Ok(text) => Ok(text.as_slice()),
            Err(error) => Err(error as &dyn core::fmt::Display),
        };
        let seen = Seen::Opened {
            user,
            node,
            room,
            seq,
            id,
            text,
        };
        if env.seen(&seen).failed > 0 {
            return false;
        }
        self.read += 1;
        if let Some(sub) = self.subs.get_mut(&(user, room)) {
            sub.next = seq.0 + 1;
        }
        true
    }
}

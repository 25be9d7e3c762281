//! One simulated run: a cluster built from a seed's [`Options`], a workload and a
//! fault plan drawn from the seed, oracles checked after every event and at the end.
//!
//! A run has three phases:
//! 1. **setup**, without faults: each node's admin is seeded, users are added
//!    (`Op::AddUser`), rooms are created and their first members invited;
//! 2. **chaos**: the workload (publishes, invites, removals with rekey, rekeys,
//!    subscribers reading history then live, clients taking keys only through the
//!    room's verified chain) runs while the seed's faults hit the network, the
//!    disks and the clocks, and nodes lie to their own clients;
//! 3. **liveness**: every fault stops, crashed nodes restart (a node lost for good
//!    does not), every transport reports `Connected`, and within
//!    [`LIVENESS_BOUND`] of virtual time every outbox must drain and every member
//!    node converge; then the final checks run.
//!
//! This module only orchestrates: the [`crate::workload`] acts, the
//! [`crate::faults`] strike, the [`crate::model`] records what the homes decided,
//! and the [`oracle`]s judge, each in its own module. Oracles report failures as
//! values ([`Failure`]), not panics.

use core::fmt;
use core::time::Duration;
use std::collections::BTreeSet;

use conclave_actors::actor::{ActorKey, ActorKind, Time};
use conclave_actors::domain::{self, Op, Outcome, UserRole};
use conclave_actors::ids::RoomId;
use conclave_actors::replication::log;
use conclave_actors::Identity;
use conclave_storage::Store as _;

use crate::cluster::{derive_rng, Cluster, Observation, Stepped, START};
use crate::draw::{around, between};
use crate::faults::{Applied, Faults};
use crate::model::Model;
use crate::options::Options;
use crate::oracle::{durability, Checks, Phase, View};
use crate::probes::Probes;
use crate::workload::{Env, Roster, User, Workload};

pub use crate::oracle;
pub use crate::oracle::liveness::LIVENESS_BOUND;

/// How long the setup phase may take before it counts as failed.
const SETUP_BOUND: Duration = Duration::from_secs(30);

/// How much virtual time runs between two looks at whether the cluster settled.
const LIVENESS_SLICE_MS: u64 = 250;

/// The shortest one-way latency of a link, in microseconds.
const LINK_LATENCY_US_MIN: u64 = 500;

/// An oracle's verdict against a run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// Which oracle (see [`oracle`]).
    pub oracle: &'static str,
    /// What it found.
    pub detail: String,
    /// Virtual time since the start of the run.
    pub at: Duration,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "[{}] at {:.3}s: {}",
            self.oracle,
            self.at.as_secs_f64(),
            self.detail
        )
    }
}

/// What a run did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Frames published by the workload.
    pub published: u64,
    /// Frames the homes committed.
    pub committed: u64,
    /// Invites and removals the homes applied.
    pub invites: u64,
    /// Removals (with rekey) the homes applied.
    pub removals: u64,
    /// Rekeys (same members, next epoch) the homes applied.
    pub rekeys: u64,
    /// Evictions of revoked members the homes made.
    pub evictions: u64,
    /// Frames subscribers read, verified and decrypted.
    pub read: u64,
    /// Crashes, wipes and partitions injected.
    pub crashes: u64,
    /// Partitions injected.
    pub partitions: u64,
    /// Keys nodes slipped their own users (see [`crate::faults::Fault::Lie`]).
    pub lies: u64,
    /// Process pauses (see [`crate::faults::Fault::Pause`]).
    pub pauses: u64,
    /// Keys clients refused (lies, and keys that came before their chain).
    pub refused: u64,
    /// Terms in which some node led a Raft group.
    pub raft_terms: u64,
    /// Raft entries committed (every group's highest stored commit index).
    pub raft_entries: u64,
    /// Proposals acknowledged as appended.
    pub raft_acked: u64,
    /// Proposals refused (mostly `no_quorum`).
    pub raft_refused: u64,
}

/// The result of one run.
#[derive(Clone, Debug)]
pub struct Report {
    /// What the seed derived.
    pub options: Options,
    /// The first oracle failure, if any.
    pub failure: Option<Failure>,
    /// What the oracles state without failing (what a node lost for good took with it).
    pub notes: Vec<String>,
    /// The trace hash.
    pub hash: u64,
    /// Events the driver ran.
    pub events: u64,
    /// Messages the nodes handled.
    pub handled: u64,
    /// Virtual time simulated.
    pub virtual_time: Duration,
    /// What the workload did.
    pub stats: Stats,
    /// The trace, one line per event, if asked for.
    pub trace: Option<Vec<String>>,
}

/// Runs one seed.
pub fn run(options: &Options) -> Report {
    run_with(options, false)
}

/// Runs one seed, keeping a line per event if `trace`.
pub fn run_with(options: &Options, trace: bool) -> Report {
    let _mutation = MutationGuard::set(options);
    let mut sim = Sim::new(options.clone(), trace);
    sim.run();
    Report {
        options: options.clone(),
        failure: sim.checks.failure().cloned(),
        notes: sim.checks.take_notes(),
        hash: sim.c.trace_hash(),
        events: sim.c.events,
        handled: sim.c.handled,
        virtual_time: sim.c.now().saturating_since(START),
        stats: sim.stats(),
        trace: sim.c.trace_log.take(),
    }
}

/// Switches the run's mutation on for its duration (and off again, even on panic).
struct MutationGuard;

impl MutationGuard {
    fn set(options: &Options) -> Self {
        #[cfg(feature = "mutations")]
        conclave_actors::mutation::set(options.mutation);
        #[cfg(not(feature = "mutations"))]
        assert!(
            options.mutation.is_none(),
            "mutations need the `mutations` feature of conclave-sim"
        );
        MutationGuard
    }
}

impl Drop for MutationGuard {
    fn drop(&mut self) {
        #[cfg(feature = "mutations")]
        conclave_actors::mutation::set(None);
    }
}

/// One run: the cluster and everything that acts on it or judges it.
struct Sim {
    o: Options,
    c: Cluster,
    model: Model,
    roster: Roster,
    workload: Workload,
    faults: Faults,
    checks: Checks,
    probes: Probes,
}

/// Every group's highest commit index on any node's disk, summed.
fn raft_committed(c: &Cluster) -> u64 {
    let Some(config) = c.config().replication else {
        return 0;
    };
    config
        .groups()
        .map(|group| {
            c.nodes
                .iter()
                .filter_map(|n| {
                    let txn = n.store.read().ok()?;
                    log::hard_state(&*txn, group).ok().map(|h| h.commit)
                })
                .max()
                .unwrap_or(0)
        })
        .sum()
}

impl Sim {
    fn new(o: Options, trace: bool) -> Self {
        let mut c = Cluster::with_config(o.nodes, o.seed, o.domain);
        c.carry_text = false;
        c.observe = true;
        c.scheduling = o.scheduling;
        if trace {
            c.trace_log = Some(Vec::new());
        }
        let mut links = derive_rng(o.seed, 0, "links");
        let latency_us_max = u64::try_from(o.latency_max.as_micros())
            .unwrap_or(1)
            .max(LINK_LATENCY_US_MIN);
        for i in 0..o.nodes {
            c.nodes[i].cost = o.base_cost;
            c.nodes[i].commit_cost = o.commit_cost;
            c.nodes[i].release_delay = o.release_delay;
            c.nodes[i].clock_offset = o.clock_offsets_ms.get(i).copied().unwrap_or(0) * 1_000;
            for j in (0..o.nodes).filter(|&j| j != i) {
                let us = between(&mut links, LINK_LATENCY_US_MIN, latency_us_max);
                c.link_latency.insert((i, j), Duration::from_micros(us));
            }
        }
        for &(n, cost) in &o.slow {
            if n < o.nodes {
                c.nodes[n].cost = cost;
            }
        }
        let o_seed = o.seed;
        Sim {
            workload: Workload::new(&o),
            faults: Faults::new(&o),
            o,
            c,
            model: Model::default(),
            roster: Roster::default(),
            checks: Checks::new(),
            probes: Probes::new(o_seed),
        }
    }

    fn run(&mut self) {
        self.setup();
        if self.failed() {
            return;
        }
        self.chaos();
        if self.failed() {
            return;
        }
        self.liveness();
        if self.failed() {
            return;
        }
        self.final_checks();
    }

    fn stats(&self) -> Stats {
        Stats {
            published: self.workload.published,
            committed: self.model.committed,
            invites: self.model.invites,
            removals: self.model.removals,
            rekeys: self.model.rekeys,
            evictions: self.model.evictions.len() as u64,
            read: self.workload.read,
            crashes: self.faults.crashes,
            partitions: self.faults.partitions,
            lies: self.faults.lies,
            pauses: self.faults.pauses,
            refused: self.workload.refused,
            raft_terms: self.c.leading.len() as u64,
            raft_entries: raft_committed(&self.c),
            raft_acked: self.proposal_outcomes(|o| matches!(o, Outcome::Appended { .. })),
            raft_refused: self.proposal_outcomes(|o| matches!(o, Outcome::Denied(_))),
        }
    }

    /// How many of the workload's proposals were answered with an outcome
    /// that `counts`.
    fn proposal_outcomes(&self, counts: impl Fn(&Outcome) -> bool) -> u64 {
        let answered = self.c.proposed.iter().map(|&(node, request, _, _)| {
            self.c
                .outcomes(node, request)
                .iter()
                .filter(|o| counts(o))
                .count() as u64
        });
        answered.sum()
    }

    fn failed(&self) -> bool {
        self.checks.failed()
    }

    fn fail(&mut self, oracle: &'static str, detail: String) {
        self.checks.fail(&mut self.c, oracle, detail);
    }

    /// The workload, and what it acts on.
    fn env(&mut self) -> (&mut Workload, Env<'_>) {
        let env = Env {
            o: &self.o,
            c: &mut self.c,
            model: &self.model,
            roster: &self.roster,
            checks: &mut self.checks,
        };
        (&mut self.workload, env)
    }

    /// Marks the start of `phase` in the trace and tells the oracles.
    fn phase(&mut self, phase: Phase, mark: &str) {
        self.c.mark(mark);
        let (model, roster) = (&self.model, &self.roster);
        self.checks.round(&mut self.c, model, roster, |o, view| {
            o.on_phase(view, phase)
        });
    }

    // ---- driving -------------------------------------------------------------

    /// Runs events due by `end`, checking after each one.
    fn run_until(&mut self, end: Time) {
        while let Some(stepped) = self.c.step(end) {
            self.after_step(stepped);
            if self.failed() {
                return;
            }
        }
    }

    /// Shows the oracles what the last event did, then lets armed crashes strike.
    fn after_step(&mut self, stepped: Stepped) {
        if !self.c.observed.is_empty() {
            for obs in std::mem::take(&mut self.c.observed) {
                self.decide(&obs);
            }
        }
        if !self.c.carried.is_empty() {
            for carried in std::mem::take(&mut self.c.carried) {
                let (model, roster) = (&self.model, &self.roster);
                self.checks.round(&mut self.c, model, roster, |o, view| {
                    o.on_carried(view, &carried)
                });
            }
        }
        let mut handled = None;
        if let Stepped::Handled { node, to } = stepped {
            if let (ActorKind::ROOM, ActorKey::Room(room)) = (to.kind, to.key) {
                let (model, roster) = (&self.model, &self.roster);
                self.checks.round(&mut self.c, model, roster, |o, view| {
                    o.on_room_handled(view, node, room)
                });
            }
            handled = Some(node);
        }
        self.faults.after_step(&mut self.c, &self.o, handled);
    }

    /// A room's decision: the oracles judge it, then the model takes it in unless
    /// one objected.
    fn decide(&mut self, obs: &Observation) {
        let (model, roster) = (&self.model, &self.roster);
        let round = self.checks.round(&mut self.c, model, roster, |o, view| {
            o.on_decision(view, obs)
        });
        // Each oracle checks its own cases of a decision; they never overlap, so
        // which oracle is asked first cannot change which one fails.
        debug_assert!(round.failed <= 1, "two oracles objected to one decision");
        self.model.take(&self.c, obs, round.failed == 0);
    }

    /// Checks the homes of the rooms in `rooms` against what they committed.
    fn check_homes(&mut self, rooms: &[RoomId]) {
        for &room in rooms {
            let (model, roster) = (&self.model, &self.roster);
            self.checks
                .round(&mut self.c, model, roster, |o, view| o.on_home(view, room));
            if self.failed() {
                return;
            }
        }
    }

    /// Runs until each of `requests` has a final outcome (or `limit` passes).
    fn await_outcomes(
        &mut self,
        requests: &[(usize, u64)],
        limit: Duration,
    ) -> Vec<Option<Outcome>> {
        let end = self.c.now().saturating_add(limit);
        loop {
            let done = requests
                .iter()
                .all(|&(n, r)| self.c.outcome(n, r).is_some());
            if done || self.failed() {
                break;
            }
            match self.c.step(end) {
                Some(stepped) => self.after_step(stepped),
                None => break,
            }
        }
        requests
            .iter()
            .map(|&(n, r)| self.c.outcome(n, r))
            .collect()
    }

    // ---- setup ---------------------------------------------------------------

    fn setup(&mut self) {
        self.phase(Phase::Setup, "setup");
        self.setup_users();
        if self.failed() {
            return;
        }
        self.await_leaders();
        if self.failed() {
            return;
        }
        for _ in 0..self.o.rooms {
            self.setup_room();
            if self.failed() {
                return;
            }
        }
    }

    /// With rooms on shard groups, runs until every group has had a leader
    /// (a room's commands are refused `no_quorum` before).
    fn await_leaders(&mut self) {
        let Some(layout) = self.o.domain.replication.filter(|r| r.rooms) else {
            return;
        };
        let end = self.c.now().saturating_add(SETUP_BOUND);
        loop {
            let led: BTreeSet<u64> = self.c.leading.iter().map(|&(_, g, _)| g).collect();
            if layout.groups().all(|g| led.contains(&g)) || self.failed() {
                return;
            }
            match self.c.step(end) {
                Some(stepped) => self.after_step(stepped),
                None => break,
            }
        }
        self.fail(oracle::SETUP, "a Raft group had no leader".into());
    }

    /// Each node's admin, and the users they add.
    fn setup_users(&mut self) {
        let mut ids = derive_rng(self.o.seed, 0, "users");
        let mut adds = Vec::new();
        for node in 0..self.o.nodes {
            let admin = Identity::generate(&mut ids);
            self.c.seed_admin(node, &admin);
            self.roster.add_admin(admin.clone());
            for _ in 0..self.o.users_per_node {
                let id = Identity::generate(&mut ids);
                let uid = id.user_id();
                let op = Op::AddUser {
                    user: id.public(),
                    role: UserRole::Member,
                };
                adds.push((node, self.c.request(node, &admin, op)));
                self.roster.add_user(User { id, uid, node });
            }
        }
        assert_eq!(
            self.roster.users_len(),
            self.o.nodes * self.o.users_per_node
        );
        let outcomes = self.await_outcomes(&adds, SETUP_BOUND);
        for (i, outcome) in outcomes.into_iter().enumerate() {
            if outcome != Some(Outcome::Done) {
                self.fail(
                    oracle::SETUP,
                    format!("adding user {i} ended with {outcome:?}"),
                );
                return;
            }
        }
    }

    /// A room, created by a random user, and its first members, invited by the
    /// owner one at a time.
    fn setup_room(&mut self) {
        let (workload, mut env) = self.env();
        let Some((owner, room, request)) = workload.create_room(&mut env) else {
            self.fail(oracle::SETUP, "sealing a room's first key failed".into());
            return;
        };
        let node = self.roster.user(owner).node;
        let outcome = self.await_outcomes(&[(node, request)], SETUP_BOUND);
        if outcome[0] != Some(Outcome::Done) {
            let detail = format!("creating a room ended with {:?}", outcome[0]);
            self.fail(oracle::SETUP, detail);
            return;
        }
        self.roster.add_room(room);
        let invitees = self.workload.first_invitees(&self.roster);
        for _ in 0..invitees {
            let (workload, mut env) = self.env();
            let Some(request) = workload.invite_as(&mut env, owner, room) else {
                continue;
            };
            let outcome = self.await_outcomes(&[request], SETUP_BOUND);
            if !matches!(
                outcome[0],
                Some(Outcome::Done | Outcome::Denied(domain::Denial::Conflict { .. }))
            ) {
                let detail = format!("inviting a first member ended with {:?}", outcome[0]);
                self.fail(oracle::SETUP, detail);
                return;
            }
        }
    }

    // ---- chaos ---------------------------------------------------------------

    fn chaos(&mut self) {
        self.phase(Phase::Chaos, "chaos");
        self.c.net.drop_ppm = self.o.drop_ppm;
        self.c.net.duplicate_ppm = self.o.duplicate_ppm;
        self.c.net.jitter = self.o.jitter;
        let start = self.c.now();
        let end = start.saturating_add(self.o.chaos);
        let step_every = self.o.step_every;
        let mut next_step = start.saturating_add(around(self.workload.rng(), step_every));
        loop {
            let next_fault = self.faults.next_at().map(|t| start.saturating_add(t));
            let next = next_fault.map_or(next_step, |f| f.min(next_step)).min(end);
            self.run_until(next);
            if self.failed() || next >= end {
                return;
            }
            if next_fault == Some(next) {
                self.apply_fault();
            } else {
                let (workload, mut env) = self.env();
                workload.step(&mut env);
                self.probes.step(&mut self.c);
                next_step = next_step.saturating_add(around(self.workload.rng(), step_every));
            }
            if self.failed() {
                return;
            }
        }
    }

    fn apply_fault(&mut self) {
        match self.faults.apply_next(&mut self.c, &self.o, &self.roster) {
            Applied::Done => {}
            Applied::Restarted(i) => {
                let (model, roster) = (&self.model, &self.roster);
                self.checks
                    .round(&mut self.c, model, roster, |o, view| o.on_restart(view, i));
                if self.failed() {
                    return;
                }
                // A home that restarts must still hold everything it committed.
                let homed: Vec<RoomId> = self
                    .model
                    .rooms
                    .iter()
                    .filter(|(_, m)| m.home == i)
                    .map(|(r, _)| *r)
                    .collect();
                self.check_homes(&homed);
            }
            Applied::Wiped(note) => self.checks.note(note),
        }
    }

    // ---- liveness and the end ------------------------------------------------

    fn liveness(&mut self) {
        self.c.mark("liveness: every fault stops");
        self.faults.stop(&mut self.c, &self.o);
        let (model, roster) = (&self.model, &self.roster);
        self.checks.round(&mut self.c, model, roster, |o, view| {
            o.on_phase(view, Phase::Liveness)
        });
        let slice = Duration::from_millis(LIVENESS_SLICE_MS);
        loop {
            let until = self.c.now().saturating_add(slice);
            self.run_until(until);
            if self.failed() {
                return;
            }
            let (model, roster) = (&self.model, &self.roster);
            let round = self
                .checks
                .round(&mut self.c, model, roster, |o, view| o.on_settling(view));
            if round.failed > 0 || !round.waits {
                return;
            }
        }
    }

    fn final_checks(&mut self) {
        self.phase(Phase::Final, "final checks");
        let rooms = self.roster.rooms().to_vec();
        self.check_homes(&rooms);
        if self.failed() {
            return;
        }
        let (model, roster) = (&self.model, &self.roster);
        self.checks
            .round(&mut self.c, model, roster, |o, view| o.check_final(view));
        if self.failed() {
            return;
        }
        let (workload, mut env) = self.env();
        workload.read_all(&mut env, true);
        if self.failed() {
            return;
        }
        let view = View {
            cluster: &self.c,
            model: &self.model,
            roster: &self.roster,
        };
        for note in durability::losses(&view) {
            self.checks.note(note);
        }
    }
}

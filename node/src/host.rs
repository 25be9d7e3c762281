//! The actix driver: hosts sans-IO actors on actix.
//!
//! Each activated actor lives in its own actix actor ([`Host`]) with its own mailbox.
//! The driver supplies what the actor's [`Context`] promises (wall-clock time, OS
//! entropy, the node's store) and carries out the effects the actor returns: local
//! sends become actix messages, remote sends are encoded and handed to the
//! transport, timers are actix `run_later`, and a stop passivates the actor, all as
//! [`conclave_actors::lifecycle`] (shared with the simulator) decides. Nothing
//! here knows any domain logic, so another host could replace this file without
//! touching an actor.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{SystemTime, UNIX_EPOCH};

use actix::{Actor as _, ActorContext as _, AsyncContext as _};
use conclave_actors::actor::{ActorRef, Context, Effect, Handler, System, Time};
use conclave_actors::lifecycle::{batch_full, Incarnation, Lifecycles, Phase};
use conclave_actors::wire::Envelope;
use conclave_actors::NodeId;
use conclave_storage::{Batch, Store};
use conclave_transports::{Incoming, Transport};
use getrandom::SysRng;
use rand_core::UnwrapErr;
use tokio::sync::mpsc;

/// The wall clock, as actor time.
pub(crate) fn wall_now() -> Time {
    // A clock before 1970 is a broken host; actors then see time zero rather than a
    // panic. (Wall time can step backwards; actors must not assume it is monotonic.)
    let micros = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0);
    Time::from_unix_micros(micros)
}

/// Counts a message the runtime dropped, by reason.
fn count_dropped(reason: &'static str) {
    metrics::counter!("conclave_runtime_messages_dropped_total", "reason" => reason).increment(1);
}

/// How many messages from outside (the embedding API, the transport) may wait in one
/// actor's mailbox before further ones are refused with [`RouteError::Backpressure`].
pub const MAILBOX_DEPTH_MAX: usize = 4096;

/// How many actors may be active at once. Activation from outside beyond this is
/// refused with [`RouteError::TooManyActive`], so a peer cannot make a node hold
/// unbounded actors by addressing made-up ones.
pub const ACTIVE_ACTORS_MAX: usize = 1 << 20;

/// Why the runtime refused a message from outside.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// The address is on another node; only actors send across nodes.
    #[error("actor {0:?} is not on this node")]
    NotLocal(ActorRef),
    /// The actor's mailbox is full: retry later.
    #[error("mailbox of {0:?} is full (backpressure)")]
    Backpressure(ActorRef),
    /// Activating one more actor would exceed [`ACTIVE_ACTORS_MAX`].
    #[error("too many active actors ({ACTIVE_ACTORS_MAX})")]
    TooManyActive,
    /// The runtime has stopped (shut down, or an actor panicked).
    #[error("the actor runtime has stopped")]
    Stopped,
}

/// Why a runtime cannot serve (see [`Runtime::failure`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    /// The actor runtime stopped by itself: an actor panicked.
    #[error("the actor runtime stopped (an actor panicked)")]
    Stopped,
    /// The last group commit failed.
    #[error("storage: {0}")]
    Storage(String),
}

/// Where a message comes from decides which limits apply: messages from outside are
/// bounded and refused when over a limit; messages between actors are the actors'
/// own protocol and are always delivered.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Origin {
    Outside,
    Actor,
}

/// What the runtime needs to start: the actors, where they live and how to reach
/// other nodes.
pub struct HostConfig<S: System> {
    /// This node's id.
    pub node: NodeId,
    /// The actor system to host.
    pub system: S,
    /// The node's store.
    pub store: Arc<dyn Store>,
    /// Outgoing transport.
    pub transport: Arc<dyn Transport<S::Msg>>,
    /// What the transport receives for this node.
    pub incoming: mpsc::Receiver<Incoming<S::Msg>>,
}

/// A host's address and how many messages wait for it.
struct Mailbox<S: System> {
    addr: actix::Addr<Host<S>>,
    depth: Arc<AtomicUsize>,
}

impl<S: System> Mailbox<S> {
    fn send(&self, d: Deliver<S::Msg>) {
        self.depth.fetch_add(1, Ordering::Relaxed);
        self.addr.do_send(d);
    }
}

/// A send held until the batch of the turn that made it is durable: (from, to,
/// message).
type HeldSend<M> = (ActorRef, ActorRef, M);

/// What batches' messages asked to send, held until the batch is durable.
struct Held<M> {
    /// The open batch's.
    sends: Vec<HeldSend<M>>,
    /// Whether a flush is queued on the arbiter behind the ready mailboxes.
    scheduled: bool,
    /// The sealed batch whose commit runs on the blocking pool, if any.
    committing: Option<InFlight<M>>,
}

/// A sealed batch being committed off the arbiter thread.
struct InFlight<M> {
    /// What its messages sent.
    sends: Vec<HeldSend<M>>,
    done: Arc<Done>,
}

/// The outcome of a commit, set by the thread that ran it.
#[derive(Default)]
struct Done {
    result: Mutex<Option<conclave_storage::Result<usize>>>,
    ready: std::sync::Condvar,
}

struct Shared<S: System> {
    node: NodeId,
    system: S,
    /// The node's store, through which actors write in batches: one commit (one
    /// fsync) for every message handled since the last flush.
    batch: Batch,
    held: Mutex<Held<S::Msg>>,
    transport: Arc<dyn Transport<S::Msg>>,
    arbiter: actix_rt::ArbiterHandle,
    /// The actors' lifecycles ([`conclave_actors::lifecycle`]), each active one
    /// with its host's mailbox. Every transition (activate, stop, drained) happens
    /// under this lock. It is never held while actor code runs: activation runs on
    /// the arbiter thread inside the new host (see `spawn`).
    active: Mutex<Actors<S>>,
    /// Why the last group commit failed, until one succeeds (health reports it).
    storage_failure: Mutex<Option<String>>,
    /// Whether an actor panicked, which stopped the runtime. Read on every turn:
    /// an atomic, not a lock.
    panicked: AtomicBool,
    /// Every handled message, for the driver contract test.
    #[cfg(test)]
    journal: Mutex<Vec<contract::Turn>>,
}

/// The lifecycles of a node's actors: what waits for the next incarnation is a
/// message with its sender; an incarnation's own data is its host's mailbox.
type Actors<S> = Lifecycles<Deliver<<S as System>::Msg>, Mailbox<S>>;

impl<S: System> Shared<S> {
    fn lock(&self) -> std::sync::MutexGuard<'_, Actors<S>> {
        // Every critical section leaves the map consistent before anything that can
        // panic, so a poisoned lock still guards a valid map.
        self.active.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Delivers `msg` to `to`: into a local mailbox (activating the actor if needed)
    /// or, for another node, encoded to the transport.
    fn route(
        self: &Arc<Self>,
        origin: Origin,
        from: Option<ActorRef>,
        to: ActorRef,
        msg: S::Msg,
    ) -> Result<(), RouteError> {
        if to.node != self.node {
            if origin == Origin::Outside {
                return Err(RouteError::NotLocal(to));
            }
            self.send_remote(from, to, msg);
            return Ok(());
        }
        let d = Deliver { from, msg };
        let mut active = self.lock();
        if origin == Origin::Outside {
            self.admit(&active, &to)?;
        }
        if let Some(d) = active.arrive(to, d, |incarnation| self.spawn(to, incarnation)) {
            if let Some(slot) = active.get(&to) {
                slot.driver.send(d);
            }
        }
        Ok(())
    }

    /// Whether a message from outside may go to `to` now: each mailbox, each
    /// buffer of held messages and the number of active actors is bounded.
    fn admit(&self, active: &Actors<S>, to: &ActorRef) -> Result<(), RouteError> {
        match active.get(to) {
            Some(slot) if slot.phase() == Phase::Active => {
                if slot.driver.depth.load(Ordering::Relaxed) >= MAILBOX_DEPTH_MAX {
                    return Err(RouteError::Backpressure(*to));
                }
            }
            Some(slot) => {
                if slot.held_len() >= MAILBOX_DEPTH_MAX {
                    return Err(RouteError::Backpressure(*to));
                }
            }
            None => {
                if active.len() >= ACTIVE_ACTORS_MAX {
                    return Err(RouteError::TooManyActive);
                }
            }
        }
        Ok(())
    }

    /// Starts a host for incarnation `incarnation` of `me`. Must be called with the
    /// `active` lock held (the caller records the result), so nothing can be sent
    /// to the new host ahead of the messages the lifecycle hands it.
    fn spawn(self: &Arc<Self>, me: ActorRef, incarnation: Incarnation) -> Mailbox<S> {
        let shared = Arc::clone(self);
        let depth = Arc::new(AtomicUsize::new(0));
        let host_depth = Arc::clone(&depth);
        // actix runs this closure later, on the arbiter thread (`spawn_fn`), never
        // inside this call: the activation below may therefore take the lock.
        let addr = Host::start_in_arbiter(&self.arbiter, move |ctx| {
            let mut host = Host {
                me,
                incarnation,
                handler: None,
                depth: host_depth,
                shared,
            };
            host.guarded(|host| host.activate(ctx));
            host
        });
        Mailbox { addr, depth }
    }

    fn send_remote(&self, from: Option<ActorRef>, to: ActorRef, msg: S::Msg) {
        let Some(from) = from else {
            // Only actors send across nodes: the receiver needs a sender to attribute.
            tracing::warn!(actor = ?to, "remote send without a sending actor dropped");
            count_dropped("remote_without_sender");
            return;
        };
        if let Err(error) = self.transport.send(to.node, &Envelope { from, to, msg }) {
            // Reliability is the outbox actor's job: it resends until acknowledged.
            tracing::warn!(?from, ?to, %error, "transport refused a message; dropped");
            count_dropped("transport");
        }
    }

    /// Routes one envelope from the transport (which decoded it), checking that the
    /// sender it names is the peer the transport authenticated and that it is
    /// addressed here.
    fn receive(self: &Arc<Self>, incoming: Incoming<S::Msg>) {
        let envelope = incoming.envelope;
        if envelope.from.node != incoming.from {
            tracing::warn!(peer = ?incoming.from, claimed = ?envelope.from, "envelope claims another sender; dropped");
            count_dropped("spoofed_sender");
            return;
        }
        if !self.system.accepts_remote(&envelope.from, &envelope.to) {
            tracing::warn!(from = ?envelope.from, to = ?envelope.to, "envelope to an address other nodes may not reach; dropped");
            count_dropped("not_reachable");
            return;
        }
        if let Err(error) = self.route(
            Origin::Outside,
            Some(envelope.from),
            envelope.to,
            envelope.msg,
        ) {
            // The sender's outbox resends what it does not see acknowledged.
            tracing::warn!(peer = ?incoming.from, to = ?envelope.to, %error, "incoming envelope refused");
            count_dropped(match error {
                RouteError::NotLocal(_) => "misaddressed",
                RouteError::Backpressure(_) => "backpressure",
                RouteError::TooManyActive => "too_many_active",
                RouteError::Stopped => "stopped",
            });
        }
    }

    /// Incarnation `incarnation` of `me` asked to stop (or found no actor): from
    /// now on its messages are held, and its host is told to stop behind
    /// everything already in its mailbox.
    fn begin_passivation(&self, me: &ActorRef, incarnation: Incarnation) {
        let mut active = self.lock();
        if active.stop(me, incarnation) {
            if let Some(slot) = active.get(me) {
                slot.driver.addr.do_send(Passivate);
            }
        }
    }

    /// Incarnation `incarnation` of `me` has handled everything queued before its
    /// stop. It goes away; what was held meanwhile goes, in order, to a fresh
    /// incarnation activated from storage.
    fn end_passivation(self: &Arc<Self>, me: &ActorRef, incarnation: Incarnation) {
        let mut active = self.lock();
        let Some(held) = active.drained(me, incarnation, |next| self.spawn(*me, next)) else {
            return;
        };
        if let Some(slot) = active.get(me) {
            for d in held {
                slot.driver.send(d);
            }
        }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Held<S::Msg>> {
        // Only pushed to and taken whole: a poisoned lock still guards a valid list.
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// After each handled message: a full batch is committed now (once the one
    /// before it is); otherwise a flush is queued on the arbiter, behind the
    /// mailboxes that are ready, so that every message handled until then shares
    /// its commit. No fixed delay: the batch is whatever arrived while the last one
    /// was handled and synced.
    fn turn_done(self: &Arc<Self>) {
        if batch_full(&self.batch) {
            // Back-pressure: the arbiter waits for the disk rather than let the
            // open batch grow past its bound.
            self.wait_commit();
            return self.start_commit();
        }
        let mut held = self.held();
        if !held.scheduled {
            held.scheduled = true;
            let shared = Arc::clone(self);
            actix_rt::spawn(async move { shared.flush() });
        }
    }

    /// The queued flush: commits the open batch, unless a commit is under way (its
    /// end commits what accumulated meanwhile).
    fn flush(self: &Arc<Self>) {
        {
            let mut held = self.held();
            held.scheduled = false;
            if held.committing.is_some() {
                return;
            }
        }
        self.start_commit();
    }

    /// Seals the open batch and commits it on the blocking pool while the arbiter
    /// goes on with the next one; what the batch sent is released when the commit
    /// is done ([`Shared::finish_commit`]).
    fn start_commit(self: &Arc<Self>) {
        if self.has_panicked() {
            // The open batch holds the writes of a turn cut short: never committed.
            return;
        }
        let mut held = self.held();
        debug_assert!(held.committing.is_none(), "one commit at a time");
        let sends = std::mem::take(&mut held.sends);
        if self.batch.seal() == 0 {
            // Nothing written, and no commit under way: everything these turns
            // read was durable already.
            drop(held);
            return self.release(sends);
        }
        let done = Arc::new(Done::default());
        held.committing = Some(InFlight {
            sends,
            done: Arc::clone(&done),
        });
        drop(held);
        let shared = Arc::clone(self);
        let commit = tokio::task::spawn_blocking(move || {
            // A panic in the store must still end the commit, or the arbiter would
            // wait for it for ever.
            let commit = std::panic::AssertUnwindSafe(|| shared.batch.commit_sealed());
            let result = std::panic::catch_unwind(commit).unwrap_or_else(|_| {
                Err(conclave_storage::StoreError::Io {
                    op: "commit",
                    source: std::io::Error::other("the commit panicked"),
                })
            });
            *done.result.lock().unwrap_or_else(PoisonError::into_inner) = Some(result);
            done.ready.notify_all();
        });
        let shared = Arc::clone(self);
        actix_rt::spawn(async move {
            let _ = commit.await;
            if shared.finish_commit() && shared.has_open_work() {
                shared.start_commit();
            }
        });
    }

    /// Whether the open batch wrote or sent anything.
    fn has_open_work(&self) -> bool {
        self.batch.txns() > 0 || !self.held().sends.is_empty()
    }

    /// Blocks until the commit under way, if any, is done, and finishes it.
    fn wait_commit(self: &Arc<Self>) {
        let Some(done) = self.held().committing.as_ref().map(|c| Arc::clone(&c.done)) else {
            return;
        };
        let mut result = done.result.lock().unwrap_or_else(PoisonError::into_inner);
        while result.is_none() {
            result = done
                .ready
                .wait(result)
                .unwrap_or_else(PoisonError::into_inner);
        }
        drop(result);
        self.finish_commit();
    }

    /// If the commit under way is done, releases what its batch sent (or, if it
    /// failed, drops the batch and the open one built on it, with what both sent:
    /// their writes are lost as in a crash, peers resend what is not acknowledged,
    /// callers see no reply). Runs on the arbiter thread, between turns, so no
    /// transaction of the open batch is under way. Returns whether it finished one.
    fn finish_commit(self: &Arc<Self>) -> bool {
        let (in_flight, result) = {
            let mut held = self.held();
            let Some(result) = held.committing.as_ref().and_then(|c| {
                c.done
                    .result
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .take()
            }) else {
                return false;
            };
            let Some(in_flight) = held.committing.take() else {
                return false;
            };
            if result.is_err() {
                let lost = std::mem::take(&mut held.sends);
                self.batch.discard();
                tracing::error!(
                    dropped = lost.len(),
                    "the open batch was built on a batch that failed to commit: lost too"
                );
            }
            (in_flight, result)
        };
        let mut failure = self
            .storage_failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match result {
            Ok(txns) => {
                *failure = None;
                drop(failure);
                metrics::histogram!("conclave_batch_transactions").record(txns as f64);
                self.release(in_flight.sends);
            }
            Err(error) => {
                tracing::error!(%error, dropped = in_flight.sends.len(), "group commit failed: the batch and what it sent are lost");
                metrics::counter!("conclave_batch_commit_failures_total").increment(1);
                *failure = Some(error.to_string());
            }
        }
        true
    }

    /// Whether an actor panicked: from then on nothing more is committed, sent or
    /// handled (crash-only; see [`Host::guarded`]).
    fn has_panicked(&self) -> bool {
        self.panicked.load(Ordering::Acquire)
    }

    /// Sends what durable batches owe.
    fn release(self: &Arc<Self>, sends: Vec<HeldSend<S::Msg>>) {
        if self.has_panicked() {
            return;
        }
        for (from, to, msg) in sends {
            // Sends between actors are never refused (see `Origin`).
            let _ = self.route(Origin::Actor, Some(from), to, msg);
        }
    }

    #[cfg(test)]
    fn record(&self, turn: contract::Turn) {
        self.journal
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(turn);
    }

    /// Whether a timer that `incarnation` of `me` set may be delivered now.
    fn timer_fires(&self, me: &ActorRef, incarnation: Incarnation) -> bool {
        self.lock().timer_fires(me, incarnation)
    }
}

/// One sans-IO actor hosted in an actix actor.
pub struct Host<S: System> {
    me: ActorRef,
    incarnation: Incarnation,
    /// `None` when the system has no actor at this address: its messages are
    /// counted and dropped, and the host passivates.
    handler: Option<Box<dyn Handler<S>>>,
    depth: Arc<AtomicUsize>,
    shared: Arc<Shared<S>>,
}

impl<S: System> actix::Actor for Host<S> {
    type Context = actix::Context<Self>;

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        if self.handler.is_some() {
            metrics::gauge!("conclave_active_actors", "kind" => kind_label(self.me.kind))
                .decrement(1.0);
        }
    }
}

/// The `kind` label of an actor kind (a handful of values).
fn kind_label(kind: conclave_actors::ActorKind) -> String {
    format!("{kind:?}")
}

impl<S: System> Host<S> {
    /// Builds the actor from its stored state, on the arbiter thread.
    /// Runs actor code. Crash-only: an actor that panics leaves its state
    /// unknown, so the whole runtime stops (its thread ends, [`Runtime::failure`]
    /// says so, and the node is restarted by its supervisor), rather than that one
    /// actor's messages vanishing while the rest carry on.
    fn guarded(&mut self, run: impl FnOnce(&mut Self)) {
        if self.shared.has_panicked() {
            // The node is stopping: no actor runs again (actix may still hand this
            // host, or another, what its mailbox holds).
            return;
        }
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(self)));
        if ran.is_err() {
            tracing::error!(actor = ?self.me, "an actor panicked: stopping the node's actors");
            self.shared.panicked.store(true, Ordering::Release);
            actix::System::current().stop();
        }
    }

    fn activate(&mut self, ctx: &mut actix::Context<Self>) {
        let mut effects = Vec::new();
        let mut rng = UnwrapErr(SysRng);
        {
            let mut cx = Context::new(
                self.me,
                None,
                wall_now(),
                &mut rng,
                &self.shared.batch,
                &mut effects,
            )
            .with_durable(&**self.shared.batch.base());
            self.handler = self.shared.system.activate(&self.me, &mut cx);
        }
        self.shared.turn_done();
        if self.handler.is_none() {
            tracing::warn!(actor = ?self.me, "messages to an actor this node does not have are dropped");
            effects.push(Effect::Stop);
        } else {
            metrics::gauge!("conclave_active_actors", "kind" => kind_label(self.me.kind))
                .increment(1.0);
        }
        self.apply(effects, ctx);
    }

    fn deliver(&mut self, from: Option<ActorRef>, msg: S::Msg, ctx: &mut actix::Context<Self>) {
        let Some(handler) = self.handler.as_mut() else {
            count_dropped("unknown_actor");
            return;
        };
        let mut effects = Vec::new();
        let mut rng = UnwrapErr(SysRng);
        #[cfg(test)]
        let text = format!("{msg:?}");
        {
            let mut cx = Context::new(
                self.me,
                from,
                wall_now(),
                &mut rng,
                &self.shared.batch,
                &mut effects,
            )
            .with_durable(&**self.shared.batch.base());
            handler.handle_any(msg, &mut cx);
        }
        #[cfg(test)]
        self.shared.record(contract::Turn::new(
            self.me,
            self.incarnation,
            from,
            text,
            &effects,
        ));
        self.apply(effects, ctx);
        self.shared.turn_done();
    }

    /// Carries out what the actor asked for, in order.
    fn apply(&mut self, effects: Vec<Effect<S::Msg>>, ctx: &mut actix::Context<Self>) {
        for effect in effects {
            match effect {
                // Released once the batch is durable (see `Shared::flush`).
                Effect::Send {
                    from,
                    to,
                    msg,
                    durable: false,
                } => self.shared.held().sends.push((from, to, msg)),
                // Made of durable state only: nothing to wait for.
                Effect::Send {
                    from,
                    to,
                    msg,
                    durable: true,
                } => {
                    // Sends between actors are never refused (see `Origin`).
                    let _ = self.shared.route(Origin::Actor, Some(from), to, msg);
                }
                Effect::Timer { after, msg } => {
                    // Due, it joins the back of the mailbox, behind what is queued
                    // already, as in the simulator; actix cancels it when this host
                    // stops, and the lifecycle decides when it is handled whether it
                    // may still fire (not once a stop was asked).
                    ctx.run_later(after, move |_, ctx| ctx.address().do_send(Fired { msg }));
                }
                Effect::Stop => self.shared.begin_passivation(&self.me, self.incarnation),
                Effect::Misrouted => count_dropped("wrong_kind"),
            }
        }
    }
}

/// A timer that came due, queued in the mailbox like any message.
struct Fired<M> {
    msg: M,
}

impl<M: 'static> actix::Message for Fired<M> {
    type Result = ();
}

impl<S: System> actix::Handler<Fired<S::Msg>> for Host<S> {
    type Result = ();
    fn handle(&mut self, fired: Fired<S::Msg>, ctx: &mut actix::Context<Self>) {
        if self.shared.timer_fires(&self.me, self.incarnation) {
            self.guarded(|host| host.deliver(None, fired.msg, ctx));
        }
    }
}

struct Deliver<M> {
    from: Option<ActorRef>,
    msg: M,
}

impl<M: 'static> actix::Message for Deliver<M> {
    type Result = ();
}

impl<S: System> actix::Handler<Deliver<S::Msg>> for Host<S> {
    type Result = ();
    fn handle(&mut self, d: Deliver<S::Msg>, ctx: &mut actix::Context<Self>) {
        self.depth.fetch_sub(1, Ordering::Relaxed);
        self.guarded(|host| host.deliver(d.from, d.msg, ctx));
    }
}

struct Passivate;

impl actix::Message for Passivate {
    type Result = ();
}

impl<S: System> actix::Handler<Passivate> for Host<S> {
    type Result = ();
    fn handle(&mut self, _: Passivate, ctx: &mut actix::Context<Self>) {
        self.shared.end_passivation(&self.me, self.incarnation);
        ctx.stop();
    }
}

/// Why the runtime did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The runtime thread could not be spawned.
    #[error("could not start the actor runtime thread: {0}")]
    Thread(#[from] std::io::Error),
    /// The runtime thread died before it was ready.
    #[error("the actor runtime thread stopped during start-up")]
    Died,
}

/// A running actix host: a dedicated thread with an actix system, so that it works
/// the same under `#[tokio::main]`, in a plain `#[test]` or in a binary.
pub struct Runtime<S: System> {
    shared: Arc<Shared<S>>,
    system: actix_rt::System,
    thread: Option<JoinHandle<()>>,
}

impl<S: System> Runtime<S> {
    /// Starts the runtime thread and begins receiving from the transport.
    pub fn start(config: HostConfig<S>) -> Result<Self, StartError> {
        let HostConfig {
            node,
            system,
            store,
            transport,
            mut incoming,
        } = config;
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("conclave-actors".into())
            .spawn(move || {
                let sys = actix_rt::System::new();
                sys.block_on(async move {
                    let shared = Arc::new(Shared {
                        node,
                        system,
                        batch: Batch::new(store),
                        held: Mutex::new(Held {
                            sends: Vec::new(),
                            scheduled: false,
                            committing: None,
                        }),
                        transport,
                        arbiter: actix_rt::Arbiter::current(),
                        active: Mutex::new(Lifecycles::new()),
                        storage_failure: Mutex::new(None),
                        panicked: AtomicBool::new(false),
                        #[cfg(test)]
                        journal: Mutex::new(Vec::new()),
                    });
                    let receiver = Arc::clone(&shared);
                    actix_rt::spawn(async move {
                        while let Some(msg) = incoming.recv().await {
                            receiver.receive(msg);
                        }
                    });
                    // If the caller is gone there is nobody to run for.
                    let _ = ready_tx.send((shared, actix_rt::System::current()));
                });
                if let Err(error) = sys.run() {
                    tracing::error!(%error, "actor runtime stopped with an error");
                }
            })?;
        let (shared, system) = ready_rx.recv().map_err(|_| StartError::Died)?;
        Ok(Self {
            shared,
            system,
            thread: Some(thread),
        })
    }

    /// Delivers `msg` to `to` from outside any actor (the embedding API's way in).
    /// `to` must be on this node. A message to an address the system has no actor for
    /// is accepted here, then dropped and counted when activation finds nothing.
    pub fn tell(&self, to: ActorRef, msg: impl Into<S::Msg>) -> Result<(), RouteError> {
        if self.stopped() {
            return Err(RouteError::Stopped);
        }
        self.shared.route(Origin::Outside, None, to, msg.into())
    }

    /// Whether the runtime has stopped by itself: its thread ended, or an actor
    /// panicked and it is ending.
    fn stopped(&self) -> bool {
        self.shared.has_panicked() || self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Why the runtime cannot serve, if it cannot: its thread ended without being
    /// stopped (an actor panicked: every actor of the node has stopped, and the
    /// node must be restarted — conclave is crash-only), or the last group commit
    /// failed (the store refuses writes, e.g. a full map; this clears when a commit
    /// succeeds again).
    pub fn failure(&self) -> Option<Failure> {
        if self.stopped() {
            return Some(Failure::Stopped);
        }
        let storage = self
            .shared
            .storage_failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        storage.clone().map(Failure::Storage)
    }

    /// How many actors are active or stopping (only tests ask).
    #[cfg(test)]
    pub fn active_actors(&self) -> usize {
        self.shared.lock().len()
    }

    /// Stops every actor and waits for the runtime thread to end. Storage writes
    /// are synchronous inside handlers, so nothing is left half-written; messages
    /// still waiting in mailboxes are dropped (durable delivery is the outbox's job).
    /// Dropping the runtime does the same; tests say it explicitly.
    #[cfg(test)]
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        self.system.stop();
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("actor runtime thread panicked");
            }
        }
        if self.shared.has_panicked() {
            // Crash-only: as if the process died at the panic. The sealed batch
            // holds whole turns (committed if its commit is under way); the open
            // one holds the panicking turn's writes, and is dropped.
            let _ = self.shared.batch.commit_sealed();
            self.shared.batch.discard();
            return;
        }
        // What the last batches wrote is kept (their sends are not: the runtime is
        // gone, and peers resend what they do not see acknowledged). A commit still
        // under way on the blocking pool finishes first (`flush` waits for it).
        if let Err(error) = self.shared.batch.flush() {
            tracing::error!(%error, "the last batch could not be committed at shutdown");
        }
    }
}

impl<S: System> Drop for Runtime<S> {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod contract;

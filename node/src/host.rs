//! The actix driver: hosts sans-IO actors on actix.
//!
//! Each activated actor lives in its own actix actor ([`Host`]) with its own mailbox.
//! The driver supplies what the actor's [`Context`] promises (wall-clock time, OS
//! entropy, the node's store) and carries out the effects the actor returns: local
//! sends become actix messages, remote sends are encoded and handed to the
//! transport, timers are actix `run_later`, and a stop passivates the actor. Nothing
//! here knows any domain logic, so another host could replace this file without
//! touching an actor.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{SystemTime, UNIX_EPOCH};

use actix::{Actor as _, ActorContext as _, AsyncContext as _};
use conclave_actors::actor::{ActorRef, Context, Effect, Handler, System, Time};
use conclave_actors::wire::Envelope;
use conclave_actors::NodeId;
use conclave_storage::Store;
use conclave_transports::{Incoming, Transport};
use getrandom::SysRng;
use rand_core::UnwrapErr;
use tokio::sync::mpsc;

/// The wall clock, as actor time.
fn wall_now() -> Time {
    // A clock before 1970 is a broken host; actors then see time zero rather than a
    // panic, and timestamps stay monotone from there.
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
    pub transport: Arc<dyn Transport>,
    /// What the transport receives for this node.
    pub incoming: mpsc::Receiver<Incoming>,
}

struct Shared<S: System> {
    node: NodeId,
    system: S,
    store: Arc<dyn Store>,
    transport: Arc<dyn Transport>,
    arbiter: actix_rt::ArbiterHandle,
    /// The activated actors. Activation and passivation both happen under this lock,
    /// which is what makes a passivating actor lose no message (see `passivate`).
    active: Mutex<BTreeMap<ActorRef, actix::Addr<Host<S>>>>,
}

impl<S: System> Shared<S> {
    /// Delivers `msg` to `to`: into a local mailbox (activating the actor if needed)
    /// or, for another node, encoded to the transport.
    fn route(self: &Arc<Self>, from: Option<ActorRef>, to: ActorRef, msg: S::Msg) {
        if to.node != self.node {
            return self.send_remote(from, to, msg);
        }
        let mut active = self.active.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(addr) = active.get(&to) {
            addr.do_send(Deliver { from, msg });
            return;
        }
        let mut effects = Vec::new();
        let mut rng = UnwrapErr(SysRng);
        let handler = {
            let mut cx = Context::new(
                to,
                None,
                wall_now(),
                &mut rng,
                self.store.as_ref(),
                &mut effects,
            );
            self.system.activate(&to, &mut cx)
        };
        let Some(handler) = handler else {
            tracing::warn!(actor = ?to, ?from, "message to an actor this node does not have dropped");
            count_dropped("unknown_actor");
            return;
        };
        let shared = Arc::clone(self);
        let addr = Host::start_in_arbiter(&self.arbiter, move |ctx| {
            let mut host = Host {
                me: to,
                handler,
                shared,
            };
            host.apply(effects, ctx);
            host
        });
        addr.do_send(Deliver { from, msg });
        active.insert(to, addr);
    }

    fn send_remote(&self, from: Option<ActorRef>, to: ActorRef, msg: S::Msg) {
        let Some(from) = from else {
            // Only actors send across nodes: the receiver needs a sender to attribute.
            tracing::warn!(actor = ?to, "remote send without a sending actor dropped");
            count_dropped("remote_without_sender");
            return;
        };
        let bytes = match (Envelope { from, to, msg }).encode() {
            Ok(bytes) => bytes,
            Err(error) => {
                tracing::warn!(?from, ?to, %error, "outgoing message does not encode; dropped");
                count_dropped("encode");
                return;
            }
        };
        if let Err(error) = self.transport.send(to.node, bytes) {
            tracing::debug!(?from, ?to, %error, "transport refused a message");
            count_dropped("transport");
        }
    }

    /// Routes one envelope from the transport, checking that the sender it names is
    /// the peer the transport authenticated and that it is addressed here.
    fn receive(self: &Arc<Self>, incoming: Incoming) {
        let envelope = match Envelope::<S::Msg>::decode(&incoming.bytes) {
            Ok(envelope) => envelope,
            Err(error) => {
                tracing::warn!(peer = ?incoming.from, %error, "undecodable envelope dropped");
                count_dropped("decode");
                return;
            }
        };
        if envelope.from.node != incoming.from {
            tracing::warn!(peer = ?incoming.from, claimed = ?envelope.from, "envelope claims another sender; dropped");
            count_dropped("spoofed_sender");
            return;
        }
        if envelope.to.node != self.node {
            tracing::warn!(peer = ?incoming.from, to = ?envelope.to, "envelope for another node dropped");
            count_dropped("misaddressed");
            return;
        }
        self.route(Some(envelope.from), envelope.to, envelope.msg);
    }

    /// Forgets `me`, then tells its host to stop. Every message routed to it before
    /// the removal is already in its mailbox, ahead of the stop; every message after
    /// activates a fresh instance. So passivation loses nothing.
    fn passivate(&self, me: &ActorRef, addr: actix::Addr<Host<S>>) {
        let mut active = self.active.lock().unwrap_or_else(PoisonError::into_inner);
        if active.get(me) == Some(&addr) {
            active.remove(me);
        }
        addr.do_send(Passivate);
    }
}

/// One sans-IO actor hosted in an actix actor.
pub struct Host<S: System> {
    me: ActorRef,
    handler: Box<dyn Handler<S>>,
    shared: Arc<Shared<S>>,
}

impl<S: System> actix::Actor for Host<S> {
    type Context = actix::Context<Self>;
}

impl<S: System> Host<S> {
    fn deliver(&mut self, from: Option<ActorRef>, msg: S::Msg, ctx: &mut actix::Context<Self>) {
        let mut effects = Vec::new();
        let mut rng = UnwrapErr(SysRng);
        {
            let mut cx = Context::new(
                self.me,
                from,
                wall_now(),
                &mut rng,
                self.shared.store.as_ref(),
                &mut effects,
            );
            self.handler.handle_any(msg, &mut cx);
        }
        self.apply(effects, ctx);
    }

    /// Carries out what the actor asked for, in order.
    fn apply(&mut self, effects: Vec<Effect<S::Msg>>, ctx: &mut actix::Context<Self>) {
        for effect in effects {
            match effect {
                Effect::Send { from, to, msg } => self.shared.route(Some(from), to, msg),
                Effect::Timer { after, msg } => {
                    ctx.run_later(after, move |host, ctx| host.deliver(None, msg, ctx));
                }
                Effect::Stop => self.shared.passivate(&self.me, ctx.address()),
                Effect::Misrouted => count_dropped("wrong_kind"),
            }
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
        self.deliver(d.from, d.msg, ctx);
    }
}

struct Passivate;

impl actix::Message for Passivate {
    type Result = ();
}

impl<S: System> actix::Handler<Passivate> for Host<S> {
    type Result = ();
    fn handle(&mut self, _: Passivate, ctx: &mut actix::Context<Self>) {
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
                        store,
                        transport,
                        arbiter: actix_rt::Arbiter::current(),
                        active: Mutex::new(BTreeMap::new()),
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

    /// This node's id.
    pub fn node(&self) -> NodeId {
        self.shared.node
    }

    /// Delivers `msg` to `to` from outside any actor (the embedding API's way in).
    /// `to` must be on this node.
    pub fn tell(&self, to: ActorRef, msg: impl Into<S::Msg>) {
        self.shared.route(None, to, msg.into());
    }

    /// How many actors are active (activated and not passivated).
    pub fn active_actors(&self) -> usize {
        self.shared
            .active
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Stops every actor and waits for the runtime thread to end. Storage writes
    /// are synchronous inside handlers, so nothing is left half-written.
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
    }
}

impl<S: System> Drop for Runtime<S> {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

//! The sans-IO actor model.
//!
//! An actor is a deterministic state machine: [`Actor::handle`] takes one message and
//! a [`Context`], and everything it needs from the world comes through that context:
//! the time ([`Context::now`]), randomness ([`Context::rng`]), storage
//! ([`Context::store`]). Everything it wants done goes out through it too, as
//! [`Effect`]s the driver carries out after `handle` returns: sends
//! ([`Context::send`]), timers ([`Context::timer`]) and passivation
//! ([`Context::stop`]). Two drivers exist: the actix runtime in `conclave` and the
//! deterministic simulator in `conclave-sim`. Because an actor cannot reach the OS,
//! the simulator can replay any run exactly.
//!
//! Addresses are location-transparent: an [`ActorRef`] names a node, an actor kind and
//! a key, and [`Context::send`] is the same call whether the target is local or on
//! another node. Actors are *virtual*: the driver activates one from its stored state
//! ([`System::activate`]) on the first message to its address and drops it when it
//! asks to passivate.

use core::fmt;
use core::time::Duration;

use conclave_storage::{ReadTxn, Store};
use rand_core::CryptoRng;
use serde::{Deserialize, Serialize};

use crate::ids::{NodeId, RoomId};
use crate::wire::WireMessage;

/// A point in time: microseconds since the Unix epoch, supplied by the driver (wall
/// time in production, virtual time in the simulator).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Time(u64);

impl Time {
    /// The time `micros` microseconds after the Unix epoch.
    pub const fn from_unix_micros(micros: u64) -> Self {
        Self(micros)
    }

    /// Microseconds since the Unix epoch.
    pub const fn unix_micros(self) -> u64 {
        self.0
    }

    /// Milliseconds since the Unix epoch (for ULIDs).
    pub const fn unix_ms(self) -> u64 {
        self.0 / 1_000
    }

    /// This time plus `d`, saturating at the end of representable time.
    pub fn saturating_add(self, d: Duration) -> Self {
        let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        Self(self.0.saturating_add(micros))
    }

    /// How long after `earlier` this is; zero if `earlier` is later.
    pub fn saturating_since(self, earlier: Time) -> Duration {
        Duration::from_micros(self.0.saturating_sub(earlier.0))
    }
}

/// What kind of actor an address names. Each [`System`] decides which kinds it
/// hosts; the domain kinds are the associated constants.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ActorKind(pub u16);

impl ActorKind {
    /// The node's user registry and authorization.
    pub const MEMBERS: ActorKind = ActorKind(1);
    /// A room, homed on its creator's node.
    pub const ROOM: ActorKind = ActorKind(2);
    // 3 was the keys actor: epoch keys now travel as updates of their room.
    /// One remote node as seen from here.
    pub const PEER: ActorKind = ActorKind(4);
    /// The durable outbox towards one remote node.
    pub const OUTBOX: ActorKind = ActorKind(5);
    /// The driver's own endpoint for replies and notifications to clients (the
    /// embedding API, the client protocol, the simulator's workload). Not a domain
    /// actor: each driver hosts it itself.
    pub const GATEWAY: ActorKind = ActorKind(6);
    /// Every Raft group replica of a node (see [`crate::replication`]).
    pub const REPLICAS: ActorKind = ActorKind(7);
}

impl fmt::Debug for ActorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ActorKind::MEMBERS => f.write_str("members"),
            ActorKind::ROOM => f.write_str("room"),
            ActorKind::PEER => f.write_str("peer"),
            ActorKind::OUTBOX => f.write_str("outbox"),
            ActorKind::GATEWAY => f.write_str("gateway"),
            ActorKind::REPLICAS => f.write_str("replicas"),
            ActorKind(other) => write!(f, "kind{other}"),
        }
    }
}

/// Which actor of a kind: singletons use [`ActorKey::Unit`], rooms their id, peers
/// and outboxes the remote node's id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum ActorKey {
    /// The one actor of its kind on a node.
    Unit,
    /// Keyed by a node (peers, outboxes).
    Node(NodeId),
    /// Keyed by a room.
    Room(RoomId),
    /// Keyed by a number.
    Id(u64),
}

/// A location-transparent actor address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ActorRef {
    /// The node hosting the actor.
    pub node: NodeId,
    /// Its kind.
    pub kind: ActorKind,
    /// Which one of its kind.
    pub key: ActorKey,
}

impl ActorRef {
    /// An address.
    pub const fn new(node: NodeId, kind: ActorKind, key: ActorKey) -> Self {
        Self { node, kind, key }
    }
}

/// A closed set of actor kinds and their messages: what one driver hosts.
///
/// `Msg` is the union of every actor's message type; it is what travels between
/// nodes inside a [`crate::wire::Envelope`], so it must be serializable.
pub trait System: Send + Sync + Sized + 'static {
    /// The union of the messages of every actor in the system.
    type Msg: fmt::Debug + WireMessage;

    /// Activates the actor at `addr` from its stored state, before a new
    /// incarnation handles its first message (see [`crate::lifecycle`]). `None`
    /// means this system has no actor at that address; what was queued for it is
    /// then dropped and counted by the driver. The context lets activation read the
    /// store and schedule timers; `cx.sender()` is `None` here.
    fn activate(
        &self,
        addr: &ActorRef,
        cx: &mut Context<'_, Self>,
    ) -> Option<Box<dyn Handler<Self>>>;

    /// Whether an envelope from `from`, an actor on another node (whose node the
    /// transport authenticated), may be delivered to the local actor `to`. Drivers
    /// drop and count the rest. The default accepts everything; a system should
    /// name the few addresses other nodes may reach.
    fn accepts_remote(&self, from: &ActorRef, to: &ActorRef) -> bool {
        let _ = (from, to);
        true
    }
}

/// A typed actor within system `S`.
pub trait Actor<S: System>: Send + 'static {
    /// This actor's own message enum, a part of `S::Msg`. The conversion fails when
    /// the message belongs to another kind.
    type Msg: TryFrom<S::Msg>;

    /// Handles one message. Must be deterministic given the message, the actor's
    /// state and what the context returns.
    fn handle(&mut self, msg: Self::Msg, cx: &mut Context<'_, S>);
}

/// The type-erased form of an [`Actor`] that drivers hold. Implemented for every
/// actor; do not implement it by hand.
pub trait Handler<S: System>: Send + 'static {
    /// Converts `msg` to the actor's type and handles it; a message of another kind
    /// is dropped with a warning (a peer can send anything, so this is no panic).
    fn handle_any(&mut self, msg: S::Msg, cx: &mut Context<'_, S>);
}

impl<S: System, A: Actor<S>> Handler<S> for A {
    fn handle_any(&mut self, msg: S::Msg, cx: &mut Context<'_, S>) {
        match A::Msg::try_from(msg) {
            Ok(msg) => self.handle(msg, cx),
            Err(_) => {
                // The message itself is not logged: a peer controls its size.
                tracing::warn!(actor = ?cx.me(), from = ?cx.sender(), "message of the wrong kind for this actor dropped");
                cx.effects.push(Effect::Misrouted);
            }
        }
    }
}

/// What an actor asked its driver to do, in the order it asked.
#[derive(Debug, PartialEq, Eq)]
pub enum Effect<M> {
    /// Deliver `msg` to `to`, local or remote, from `from`. Drivers that group
    /// commits hold it until the batch the turn wrote to is durable, unless it is
    /// `durable`.
    Send {
        /// The sending actor.
        from: ActorRef,
        /// The receiving actor.
        to: ActorRef,
        /// The message.
        msg: M,
        /// Made only of what was durable when the turn read it (through
        /// [`Context::read_durable`]): no crash can take it back, so it leaves at once
        /// instead of waiting for the batch's commit.
        durable: bool,
    },
    /// Deliver `msg` to the requesting actor after `after`. A timer is cancelled if
    /// the actor passivates first: an actor that needs a deadline to survive stores
    /// it and schedules it again on activation.
    Timer {
        /// Delay from now.
        after: Duration,
        /// The message.
        msg: M,
    },
    /// Passivate: the driver drops the actor once it has handled what was already
    /// sent to it; the next message activates it again from storage.
    Stop,
    /// A message of the wrong kind reached the actor and was dropped.
    Misrouted,
}

/// Everything an actor may touch while it handles one message.
pub struct Context<'a, S: System> {
    me: ActorRef,
    sender: Option<ActorRef>,
    now: Time,
    rng: &'a mut dyn CryptoRng,
    store: &'a dyn Store,
    /// What of `store` is durable (the same store when every commit is).
    durable: &'a dyn Store,
    effects: &'a mut Vec<Effect<S::Msg>>,
}

impl<'a, S: System> Context<'a, S> {
    /// Builds a context. For drivers: they supply the time, the random source and
    /// the store, and carry out `effects` after the call.
    pub fn new(
        me: ActorRef,
        sender: Option<ActorRef>,
        now: Time,
        rng: &'a mut dyn CryptoRng,
        store: &'a dyn Store,
        effects: &'a mut Vec<Effect<S::Msg>>,
    ) -> Self {
        Self {
            me,
            sender,
            now,
            rng,
            store,
            durable: store,
            effects,
        }
    }

    /// For drivers whose `store` commits in batches: `durable` is the store the
    /// batches are flushed to, holding only what no crash can take back.
    pub fn with_durable(mut self, durable: &'a dyn Store) -> Self {
        self.durable = durable;
        self
    }

    /// This actor's address.
    pub fn me(&self) -> &ActorRef {
        &self.me
    }

    /// The node this actor runs on.
    pub fn node(&self) -> NodeId {
        self.me.node
    }

    /// The actor that sent the current message; `None` for timers, activation and
    /// messages injected by the embedding API. For a remote sender its node is the
    /// one the transport authenticated.
    pub fn sender(&self) -> Option<&ActorRef> {
        self.sender.as_ref()
    }

    /// The current time, from the driver.
    pub fn now(&self) -> Time {
        self.now
    }

    /// A cryptographically secure random source: OS entropy in production, a seeded
    /// ChaCha in the simulator.
    pub fn rng(&mut self) -> &mut dyn CryptoRng {
        &mut *self.rng
    }

    /// The node's store: synchronous and transactional. The reference outlives the
    /// borrow of the context, so a transaction can stay open across [`Context::send`].
    pub fn store(&self) -> &'a dyn Store {
        self.store
    }

    /// A read of the durable part of the store: what was committed for good,
    /// without the writes of the batch in progress (this turn's included). What is
    /// read here may feed [`Context::send_durable`].
    pub fn read_durable(&self) -> conclave_storage::Result<Box<dyn ReadTxn + 'a>> {
        self.durable.read()
    }

    /// Sends `msg` to `to`, on this node or another, once what this turn wrote is
    /// durable.
    pub fn send(&mut self, to: ActorRef, msg: impl Into<S::Msg>) {
        self.effects.push(Effect::Send {
            from: self.me,
            to,
            msg: msg.into(),
            durable: false,
        });
    }

    /// Sends `msg` at once, without waiting for this turn's writes to be durable.
    /// Only for a message made wholly of what was read through
    /// [`Context::read_durable`]: anything read through [`Context::store`] may still be
    /// taken back by a crash.
    pub fn send_durable(&mut self, to: ActorRef, msg: impl Into<S::Msg>) {
        self.effects.push(Effect::Send {
            from: self.me,
            to,
            msg: msg.into(),
            durable: true,
        });
    }

    /// Delivers `msg` to this actor after `after` (see [`Effect::Timer`]).
    pub fn timer(&mut self, after: Duration, msg: impl Into<S::Msg>) {
        self.effects.push(Effect::Timer {
            after,
            msg: msg.into(),
        });
    }

    /// Asks to be passivated (see [`Effect::Stop`]).
    pub fn stop(&mut self) {
        self.effects.push(Effect::Stop);
    }
}

/// Declares a system's message union: an enum with one variant per actor's message
/// type, and the conversions that [`Context::send`] (`From`) and [`Actor::Msg`]
/// (`TryFrom`, handing the message back when it is of another kind) rely on.
///
/// ```
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Debug, Serialize, Deserialize)]
/// pub enum CounterMsg { Incr, Get }
/// #[derive(Debug, Serialize, Deserialize)]
/// pub enum EchoMsg { Say(String) }
///
/// conclave_actors::message_union! {
///     #[derive(Debug, Serialize, Deserialize)]
///     pub enum Msg { Counter(CounterMsg), Echo(EchoMsg) }
/// }
///
/// let msg: Msg = CounterMsg::Incr.into();
/// assert!(EchoMsg::try_from(msg).is_err());
/// ```
#[macro_export]
macro_rules! message_union {
    ($(#[$meta:meta])* $vis:vis enum $name:ident { $($variant:ident($ty:ty)),+ $(,)? }) => {
        $(#[$meta])*
        $vis enum $name {
            $(
                #[allow(missing_docs)]
                $variant($ty),
            )+
        }
        $(
            impl ::core::convert::From<$ty> for $name {
                fn from(msg: $ty) -> Self {
                    $name::$variant(msg)
                }
            }
            impl ::core::convert::TryFrom<$name> for $ty {
                type Error = $name;
                #[allow(unreachable_patterns)]
                fn try_from(msg: $name) -> ::core::result::Result<Self, $name> {
                    match msg {
                        $name::$variant(msg) => Ok(msg),
                        other => Err(other),
                    }
                }
            }
        )+
    };
}

//! The actor lifecycle: activation, passivation, timers and `stop`, defined once for
//! every driver.
//!
//! Both drivers (the actix runtime in `conclave` and the simulator in
//! `conclave-sim`) keep one [`Lifecycles`] per node and follow its decisions, so an
//! actor behaves the same under both, and what the simulator proves about a
//! sequence of messages holds in production. The state machine is sans-IO: the
//! driver owns each incarnation's mailbox (an actix mailbox, a simulated queue) and
//! the actor itself ([`crate::Handler`]); this module decides what happens to every
//! message, stop and timer.
//!
//! # The contract
//!
//! An address is **inactive**, **active** or **stopping**:
//!
//! ```text
//!            message arrives                   cx.stop() (or activation
//! Inactive ───────────────────▶ Active(n) ────────────────────────────▶ Stopping(n)
//!    ▲        new incarnation n               found no actor)              │
//!    │                                                                      │ mailbox of n
//!    │            nothing held                                              │ drained
//!    └──────────────────────────────────────────────────────────────────────┤
//!                                   something held: Active(m), m > n  ◀─────┘
//! ```
//!
//! - **Activation.** The first message to an inactive address starts a new
//!   *incarnation*, numbered by the node ([`Incarnation`], never reused, not even
//!   across a crash of the node). Before the incarnation handles its first message
//!   the driver activates the actor from storage ([`crate::System::activate`]);
//!   effects of activation (timers, sends) belong to the new incarnation. If
//!   activation finds no actor, the incarnation stops at once and the driver drops
//!   (and counts) everything queued for it. Activation is retried by the next
//!   message that arrives after that: one attempt per incarnation.
//! - **Stop.** After an actor calls [`crate::Context::stop`], the incarnation still
//!   handles every message that was queued for it before the stop, in order (the
//!   production semantics, as in Akka's passivation): nothing already accepted is
//!   dropped. Messages that arrive from then on are **held** by the lifecycle, in
//!   arrival order. When the incarnation's mailbox is drained it is gone; if any
//!   message is held, a fresh incarnation is activated from storage and handles the
//!   held messages first. Two incarnations of one address are never active at once,
//!   and nothing is handled out of arrival order. Whatever in-memory state the
//!   stopping incarnation builds while it drains is forgotten with it, so an actor
//!   whose memory matters takes no new work after its stop: it refuses it, to be
//!   sent again (the peer actor does this with deliveries; the outbox resends),
//!   or sends it to itself, which reaches the next incarnation.
//! - **Timers.** A timer ([`crate::Context::timer`]) belongs to the incarnation that
//!   set it and dies with it: it is delivered only while that incarnation is active
//!   and has not asked to stop. So once an actor calls `stop`, none of its timers
//!   fires any more, neither those pending nor those it sets while draining its
//!   mailbox; a timer never activates an actor. A due timer joins the back of the
//!   actor's mailbox, behind what was queued before it came due. An actor that needs a deadline to
//!   outlive its incarnation stores it and schedules it again on activation.
//! - **Crash.** A node's crash ends every incarnation at once; what was queued or
//!   held is lost with the node (durable delivery is the outbox's job).
//!
//! A driver calls [`Lifecycles::arrive`] for every message to a local actor,
//! [`Lifecycles::timer_fires`] before it delivers a timer (when it fires, and again
//! when it reaches the front of the mailbox if it waits there),
//! [`Lifecycles::stop`] when an actor asks to stop or its activation finds nothing,
//! and [`Lifecycles::drained`] when a stopping incarnation has handled (or, with no
//! actor, dropped) everything queued for it.

use std::collections::{BTreeMap, VecDeque};

/// The most messages one group commit takes. Both drivers handle messages against
/// one batch ([`conclave_storage::Batch`]) until no mailbox is ready or this bound
/// is reached, commit it once, and only then release what the batch's messages
/// sent (to other actors, other nodes and clients).
pub const BATCH_MESSAGES_MAX: usize = 256;

/// The most bytes (keys and values written) one group commit takes.
pub const BATCH_BYTES_MAX: usize = 8 * 1024 * 1024;

/// Whether `batch` holds as much as one batch may: the drivers then commit it
/// (or wait for the commit before it) before handling anything more.
pub fn batch_full(batch: &conclave_storage::Batch) -> bool {
    let (txns, bytes) = batch.size();
    txns >= BATCH_MESSAGES_MAX || bytes >= BATCH_BYTES_MAX
}

use crate::actor::ActorRef;

/// One activation of an address, numbered by its node: a timer carries the number
/// of the incarnation that set it. Numbers start at 1 and are never reused on a
/// node, so a timer of a past incarnation can never match a later one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Incarnation(u64);

impl Incarnation {
    /// The number.
    pub const fn get(self) -> u64 {
        self.0
    }
}

/// Where an active address is in its lifecycle (an inactive one has no slot).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// It handles what arrives; its timers fire.
    Active,
    /// It asked to stop (or its activation found no actor): it drains its mailbox,
    /// its timers no longer fire, and what arrives is held for a fresh incarnation.
    Stopping,
}

/// One address that is active or stopping.
#[derive(Debug)]
pub struct Slot<M, H> {
    incarnation: Incarnation,
    phase: Phase,
    /// Messages that arrived while stopping, in arrival order, for the next
    /// incarnation.
    held: VecDeque<M>,
    /// The driver's own data for this incarnation (its mailbox, its actor).
    pub driver: H,
}

impl<M, H> Slot<M, H> {
    /// The current incarnation.
    pub fn incarnation(&self) -> Incarnation {
        self.incarnation
    }

    /// Active or stopping.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// How many messages wait for the next incarnation.
    pub fn held_len(&self) -> usize {
        self.held.len()
    }
}

/// The lifecycle of every actor on one node (see the module docs). `M` is what the
/// driver queues (a message with its sender), `H` its per-incarnation data.
#[derive(Debug)]
pub struct Lifecycles<M, H> {
    slots: BTreeMap<ActorRef, Slot<M, H>>,
    /// The last incarnation number handed out on this node.
    incarnation_last: u64,
}

impl<M, H> Default for Lifecycles<M, H> {
    fn default() -> Self {
        Self::new()
    }
}

impl<M, H> Lifecycles<M, H> {
    /// No actor active.
    pub fn new() -> Self {
        Self {
            slots: BTreeMap::new(),
            incarnation_last: 0,
        }
    }

    fn next_incarnation(&mut self) -> Incarnation {
        // A u64 bumped once per activation does not wrap in any node's lifetime.
        self.incarnation_last += 1;
        Incarnation(self.incarnation_last)
    }

    /// `msg` arrives for `to`. Returns it when the driver must queue it in the
    /// current incarnation's mailbox; `None` when it is held for the next
    /// incarnation (`to` is stopping). If `to` was inactive, a new incarnation
    /// starts: `activate` builds the driver's data for it (the driver activates the
    /// actor before it handles the first message).
    pub fn arrive(
        &mut self,
        to: ActorRef,
        msg: M,
        activate: impl FnOnce(Incarnation) -> H,
    ) -> Option<M> {
        if !self.slots.contains_key(&to) {
            let incarnation = self.next_incarnation();
            let slot = Slot {
                incarnation,
                phase: Phase::Active,
                held: VecDeque::new(),
                driver: activate(incarnation),
            };
            self.slots.insert(to, slot);
        }
        let slot = self.slots.get_mut(&to)?;
        match slot.phase {
            Phase::Active => Some(msg),
            Phase::Stopping => {
                slot.held.push_back(msg);
                None
            }
        }
    }

    /// Incarnation `incarnation` of `at` asked to stop, or its activation found no
    /// actor. Returns whether this began its stop (a second stop, or one from an
    /// incarnation that is gone, changes nothing): the driver then drains its
    /// mailbox and calls [`Lifecycles::drained`].
    pub fn stop(&mut self, at: &ActorRef, incarnation: Incarnation) -> bool {
        match self.slots.get_mut(at) {
            Some(slot) if slot.incarnation == incarnation && slot.phase == Phase::Active => {
                slot.phase = Phase::Stopping;
                debug_assert!(slot.held.is_empty(), "messages held for an active actor");
                true
            }
            _ => false,
        }
    }

    /// Stopping incarnation `incarnation` of `at` has drained its mailbox. If
    /// nothing is held, `at` becomes inactive and this returns `None`. Otherwise a
    /// new incarnation starts (`activate` builds the driver's data for it) and this
    /// returns the held messages, which the driver queues for it first, in order.
    /// A call for an incarnation that is not the stopping one changes nothing.
    pub fn drained(
        &mut self,
        at: &ActorRef,
        incarnation: Incarnation,
        activate: impl FnOnce(Incarnation) -> H,
    ) -> Option<VecDeque<M>> {
        let current = self.slots.get(at)?;
        if current.incarnation != incarnation || current.phase != Phase::Stopping {
            return None;
        }
        if current.held.is_empty() {
            self.slots.remove(at);
            return None;
        }
        let next = self.next_incarnation();
        let slot = self.slots.get_mut(at)?;
        let held = std::mem::take(&mut slot.held);
        slot.incarnation = next;
        slot.phase = Phase::Active;
        slot.driver = activate(next);
        debug_assert!(!held.is_empty());
        debug_assert!(next > incarnation, "incarnations only grow");
        Some(held)
    }

    /// Whether a timer that incarnation `incarnation` of `at` set may be delivered
    /// now: only while that incarnation is active and has not asked to stop.
    pub fn timer_fires(&self, at: &ActorRef, incarnation: Incarnation) -> bool {
        self.slots
            .get(at)
            .is_some_and(|s| s.incarnation == incarnation && s.phase == Phase::Active)
    }

    /// The slot of `at`, if it is active or stopping.
    pub fn get(&self, at: &ActorRef) -> Option<&Slot<M, H>> {
        self.slots.get(at)
    }

    /// The slot of `at`, mutably (for the driver's data).
    pub fn get_mut(&mut self, at: &ActorRef) -> Option<&mut Slot<M, H>> {
        self.slots.get_mut(at)
    }

    /// Every active or stopping address, in address order.
    pub fn iter(&self) -> impl Iterator<Item = (&ActorRef, &Slot<M, H>)> {
        self.slots.iter()
    }

    /// How many addresses are active or stopping.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The node crashed: every incarnation ends and what was held is lost. The
    /// numbering goes on, so timers of the lost incarnations stay dead.
    pub fn crash(&mut self) {
        self.slots.clear();
    }
}

/// What one handled message did, as a driver saw it: a record that lets a test run
/// one script through both drivers and compare them (the drivers' journals).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Turn {
    /// The actor that handled it.
    pub actor: ActorRef,
    /// Which of its incarnations.
    pub incarnation: Incarnation,
    /// Its sender (`None` for timers and injected messages).
    pub from: Option<ActorRef>,
    /// The message, formatted.
    pub msg: String,
    /// What the actor sent while handling it, in order: (to, message formatted).
    pub sends: Vec<(ActorRef, String)>,
    /// How many timers it set.
    pub timers: usize,
    /// Whether it asked to stop.
    pub stopped: bool,
}

impl Turn {
    /// The record of `actor`'s incarnation `incarnation` handling `msg` from `from`
    /// with these `effects`.
    pub fn new<M: core::fmt::Debug>(
        actor: ActorRef,
        incarnation: Incarnation,
        from: Option<ActorRef>,
        msg: String,
        effects: &[crate::actor::Effect<M>],
    ) -> Self {
        use crate::actor::Effect;
        let sends = effects
            .iter()
            .filter_map(|e| match e {
                Effect::Send { to, msg, .. } => Some((*to, format!("{msg:?}"))),
                _ => None,
            })
            .collect();
        Self {
            actor,
            incarnation,
            from,
            msg,
            sends,
            timers: effects
                .iter()
                .filter(|e| matches!(e, Effect::Timer { .. }))
                .count(),
            stopped: effects.iter().any(|e| matches!(e, Effect::Stop)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actor::{ActorKey, ActorKind};
    use crate::ids::NodeId;

    fn addr(key: u64) -> ActorRef {
        ActorRef::new(NodeId([7; 32]), ActorKind::OUTBOX, ActorKey::Id(key))
    }

    /// The driver data records which incarnation it was built for.
    type Node = Lifecycles<&'static str, Incarnation>;

    fn arrive(node: &mut Node, at: ActorRef, msg: &'static str) -> Option<&'static str> {
        node.arrive(at, msg, |incarnation| incarnation)
    }

    #[test]
    fn the_first_message_activates_and_later_ones_queue() {
        let mut node = Node::new();
        let a = addr(1);
        assert_eq!(arrive(&mut node, a, "m1"), Some("m1"));
        assert_eq!(arrive(&mut node, a, "m2"), Some("m2"));
        let slot = node.get(&a).expect("active");
        assert_eq!(slot.phase(), Phase::Active);
        assert_eq!(slot.incarnation(), Incarnation(1));
        assert_eq!(slot.driver, Incarnation(1));
        arrive(&mut node, addr(2), "other");
        assert_eq!(
            node.get(&addr(2)).map(Slot::incarnation),
            Some(Incarnation(2))
        );
        assert_eq!(node.len(), 2);
    }

    #[test]
    fn a_stop_with_nothing_held_makes_the_address_inactive() {
        let mut node = Node::new();
        let a = addr(1);
        arrive(&mut node, a, "ack");
        assert!(node.stop(&a, Incarnation(1)));
        assert!(
            !node.stop(&a, Incarnation(1)),
            "a second stop changes nothing"
        );
        assert_eq!(node.drained(&a, Incarnation(1), |i| i), None);
        assert!(node.get(&a).is_none());
        assert!(node.is_empty());
    }

    #[test]
    fn what_arrives_while_stopping_is_held_and_reactivates_in_order() {
        let mut node = Node::new();
        let a = addr(1);
        arrive(&mut node, a, "ack");
        assert!(node.stop(&a, Incarnation(1)));
        assert_eq!(arrive(&mut node, a, "kick"), None);
        assert_eq!(arrive(&mut node, a, "kick2"), None);
        assert_eq!(node.get(&a).map(Slot::held_len), Some(2));
        // A drain reported by some other incarnation is ignored.
        assert_eq!(node.drained(&a, Incarnation(9), |i| i), None);
        let held = node
            .drained(&a, Incarnation(1), |i| i)
            .expect("reactivated");
        assert_eq!(held, ["kick", "kick2"]);
        let slot = node.get(&a).expect("active again");
        assert_eq!(slot.phase(), Phase::Active);
        assert_eq!(slot.incarnation(), Incarnation(2));
        assert_eq!(slot.driver, Incarnation(2));
        assert_eq!(slot.held_len(), 0);
        assert_eq!(arrive(&mut node, a, "next"), Some("next"));
    }

    #[test]
    fn a_timer_fires_only_for_its_incarnation_while_it_is_active() {
        let mut node = Node::new();
        let a = addr(1);
        assert!(!node.timer_fires(&a, Incarnation(1)), "no timer activates");
        arrive(&mut node, a, "m");
        assert!(node.timer_fires(&a, Incarnation(1)));
        node.stop(&a, Incarnation(1));
        assert!(!node.timer_fires(&a, Incarnation(1)), "dies at the stop");
        arrive(&mut node, a, "held");
        node.drained(&a, Incarnation(1), |i| i);
        assert!(!node.timer_fires(&a, Incarnation(1)), "not the new one's");
        assert!(node.timer_fires(&a, Incarnation(2)));
    }

    #[test]
    fn a_stop_from_a_past_incarnation_changes_nothing() {
        let mut node = Node::new();
        let a = addr(1);
        arrive(&mut node, a, "m");
        node.stop(&a, Incarnation(1));
        arrive(&mut node, a, "held");
        node.drained(&a, Incarnation(1), |i| i);
        assert!(!node.stop(&a, Incarnation(1)));
        assert_eq!(node.get(&a).map(Slot::phase), Some(Phase::Active));
    }

    #[test]
    fn incarnations_are_never_reused_even_across_a_crash() {
        let mut node = Node::new();
        let a = addr(1);
        arrive(&mut node, a, "m");
        node.stop(&a, Incarnation(1));
        node.drained(&a, Incarnation(1), |i| i);
        arrive(&mut node, a, "m");
        assert_eq!(node.get(&a).map(Slot::incarnation), Some(Incarnation(2)));
        node.crash();
        assert!(node.is_empty());
        assert!(!node.timer_fires(&a, Incarnation(2)));
        arrive(&mut node, a, "m");
        assert_eq!(node.get(&a).map(Slot::incarnation), Some(Incarnation(3)));
    }
}

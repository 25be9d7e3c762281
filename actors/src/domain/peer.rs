//! The peer actor: one per remote node, on the receiving side.
//!
//! It takes what the remote node's outbox sends ([`PeerMsg::Deliver`]), drops
//! duplicates and anything after a gap (the outbox resends in order), and hands the
//! messages to their local targets (rooms) **in sequence order per target, in
//! parallel across targets**: a target gets its next message only when it has
//! answered [`PeerMsg::Applied`] for the previous one, while other rooms go on.
//! Everything a room depends on (its membership snapshot, its keys, its frames)
//! goes to the room itself, so order per target is all the order there is. What
//! waits or is in flight is bounded by the outbox's window.
//!
//! The durable high-water mark ([`crate::outbox::accept`]) covers only the
//! **applied prefix**: message `n` counts once it and every message before it are
//! applied, so a crash can never acknowledge a message that was still in flight.
//! The peer moves the mark and acknowledges every [`ACK_EVERY_MESSAGES`] messages or when
//! nothing waits, not after each one. A crash between a target's commit and the
//! acknowledgement only makes the outbox resend; targets are idempotent, so nothing
//! is applied twice.
//!
//! It also keeps the transport's view of the remote node (connected or not, when it
//! was last heard from) and, when the connection comes back, has the local outbox
//! towards it resend at once instead of waiting for its backoff.

use core::time::Duration;
use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};

use super::{outbox_of, Deliverable, DomainConfig, Msg, OutboxMsg};
use crate::actor::{Actor, ActorRef, Context, System, Time};
use crate::ids::{NodeId, Seq};
use crate::mutation::{self, Mutation};

/// Acknowledge at least every this many applied messages.
pub const ACK_EVERY_MESSAGES: u64 = 32;

/// Messages to a peer actor.
// Deliveries are the common case; boxing them would add an allocation per frame.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum PeerMsg {
    /// Message `seq` of the remote node's outbox towards this node.
    Deliver {
        /// Its sequence number in that outbox.
        seq: Seq,
        /// The local target.
        to: ActorRef,
        /// The message.
        msg: Deliverable,
    },
    /// From a local target: the message handed to it last has been committed or
    /// refused for good (`done`), or must be offered again (`!done`: storage failed).
    Applied {
        /// Whether it is finished.
        done: bool,
    },
    /// From the driver: the transport connected to the remote node.
    Connected,
    /// From the driver: the transport lost the remote node.
    Disconnected,
    /// The idle check (a timer).
    Tick,
}

/// The peer actor (see the module docs).
#[derive(Debug)]
pub struct Peer {
    remote: NodeId,
    idle: Duration,
    /// Every message up to here is applied (the applied prefix).
    high: u64,
    /// The high-water mark last written and acknowledged.
    durable: u64,
    /// The next sequence number to accept from the outbox.
    expected: u64,
    /// Accepted, not yet handed over (their target is busy), in sequence order.
    waiting: VecDeque<(u64, ActorRef, Deliverable)>,
    /// Handed over and not yet applied: at most one per target.
    in_flight: BTreeMap<ActorRef, u64>,
    /// Applied above the prefix, while a message before them is still in flight.
    applied: BTreeSet<u64>,
    connected: bool,
    last_heard: Option<Time>,
    busy: bool,
}

impl Peer {
    pub(crate) fn activate<S: System<Msg = Msg>>(
        remote: NodeId,
        config: DomainConfig,
        cx: &mut Context<'_, S>,
    ) -> Self {
        let high = match cx
            .store()
            .read()
            .and_then(|txn| crate::outbox::high_water(&*txn, remote))
        {
            Ok(seq) => seq.0,
            Err(error) => {
                // Starting from zero only makes the outbox's resends look new; every
                // target is idempotent, so that is safe, merely slower.
                tracing::error!(?remote, %error, "could not read the high-water mark; starting from zero");
                0
            }
        };
        cx.timer(config.idle, PeerMsg::Tick);
        Peer {
            remote,
            idle: config.idle,
            high,
            durable: high,
            expected: high + 1,
            waiting: VecDeque::new(),
            in_flight: BTreeMap::new(),
            applied: BTreeSet::new(),
            connected: false,
            last_heard: None,
            busy: false,
        }
    }

    /// The remote outbox this peer answers.
    fn remote_outbox(&self, me: NodeId) -> ActorRef {
        outbox_of(self.remote, me)
    }

    fn ack<S: System<Msg = Msg>>(&self, cx: &mut Context<'_, S>) {
        let to = self.remote_outbox(cx.node());
        cx.send(
            to,
            OutboxMsg::Ack {
                upto: Seq(self.durable),
            },
        );
    }

    /// What this peer holds that is not applied yet: accepted messages are either
    /// waiting or in flight, and nothing beyond the outbox's window.
    fn assert_bounded(&self) {
        debug_assert!(self.durable <= self.high && self.high < self.expected);
        debug_assert!(
            self.waiting.len() + self.in_flight.len() <= super::outbox::OUTBOX_WINDOW_MESSAGES
                || mutation::active(Mutation::SkipReceiverDedup)
        );
        debug_assert!(self.applied.first().is_none_or(|&a| a > self.high + 1));
    }

    /// Hands over every waiting message whose target is free, oldest first, so
    /// that each target still gets its messages in sequence order.
    fn pump<S: System<Msg = Msg>>(&mut self, cx: &mut Context<'_, S>) {
        let me = cx.node();
        let mut kept = VecDeque::with_capacity(self.waiting.len());
        if mutation::active(Mutation::PipelinedHandoff) {
            // Mutation: newest first, so a free room gets its newest waiting message.
            self.waiting.make_contiguous().reverse();
        }
        while let Some((seq, to, msg)) = self.waiting.pop_front() {
            if to.node != me || !msg.fits(&to) {
                // Misaddressed: counted, and finished as refused so that it does
                // not block everything behind it.
                tracing::warn!(remote = ?self.remote, ?to, "misaddressed delivery refused");
                metrics::counter!("conclave_runtime_messages_dropped_total", "reason" => "misaddressed").increment(1);
                self.finish(seq);
            } else if let Entry::Vacant(slot) = self.in_flight.entry(to) {
                slot.insert(seq);
                cx.send(to, msg);
            } else {
                kept.push_back((seq, to, msg));
            }
        }
        if mutation::active(Mutation::PipelinedHandoff) {
            kept.make_contiguous().reverse();
        }
        self.waiting = kept;
        self.assert_bounded();
        self.flush(cx);
    }

    /// Records `seq` as applied (or refused for good) and moves the high-water mark
    /// over the applied prefix.
    fn finish(&mut self, seq: u64) {
        if seq <= self.high {
            // Applied again after a target asked for a resend (targets are
            // idempotent): the prefix already covers it.
            return;
        }
        self.applied.insert(seq);
        while self.applied.first() == Some(&(self.high + 1)) {
            self.applied.pop_first();
            self.high += 1;
        }
    }

    /// Makes the high-water mark durable and acknowledges it, when enough was
    /// applied or nothing else waits.
    fn flush<S: System<Msg = Msg>>(&mut self, cx: &mut Context<'_, S>) {
        let idle = self.in_flight.is_empty() && self.waiting.is_empty();
        if self.high == self.durable || !(idle || self.high - self.durable >= ACK_EVERY_MESSAGES) {
            return;
        }
        let (from, to) = (self.durable, self.high);
        let result = cx.store().write().and_then(|mut txn| {
            for s in from + 1..=to {
                crate::outbox::accept(&mut *txn, self.remote, Seq(s))?;
            }
            txn.commit()
        });
        match result {
            Ok(()) => {
                self.durable = to;
                self.ack(cx);
            }
            // Not acknowledged: the outbox resends, and the idempotent targets apply
            // nothing twice. The next applied message tries again.
            Err(error) => {
                tracing::error!(remote = ?self.remote, %error, "could not record the high-water mark");
            }
        }
    }

    /// A message from the remote outbox.
    fn deliver<S: System<Msg = Msg>>(
        &mut self,
        seq: Seq,
        to: ActorRef,
        msg: Deliverable,
        cx: &mut Context<'_, S>,
    ) {
        self.busy = true;
        self.last_heard = Some(cx.now());
        if seq.0 < self.expected {
            if mutation::active(Mutation::SkipReceiverDedup) {
                // Mutation: the duplicate is handed over again.
                self.waiting.push_back((seq.0, to, msg));
                self.pump(cx);
                return;
            }
            // A resend of something accepted already: acknowledge what is durable,
            // so the outbox can forget it.
            metrics::counter!("conclave_inbox_duplicates_total").increment(1);
            self.ack(cx);
            return;
        }
        let held = self.waiting.len() + self.in_flight.len();
        if seq.0 > self.expected || held >= super::outbox::OUTBOX_WINDOW_MESSAGES {
            // A gap (or, from a misbehaving outbox, more than its window): refused,
            // and the outbox resends in order.
            metrics::counter!("conclave_inbox_gaps_total").increment(1);
            return;
        }
        self.expected += 1;
        if mutation::active(Mutation::AckBeforePersist) && held == 0 {
            // Mutation: acknowledged on hand-over, before the target commits.
            cx.send(to, msg);
            self.high = self.high.max(seq.0);
            self.flush(cx);
            return;
        }
        self.waiting.push_back((seq.0, to, msg));
        self.pump(cx);
    }

    /// A target answered for the message it was handed.
    fn on_applied<S: System<Msg = Msg>>(&mut self, done: bool, cx: &mut Context<'_, S>) {
        let Some(&target) = cx.sender() else { return };
        let Some(seq) = self.in_flight.remove(&target) else {
            return;
        };
        if done {
            self.finish(seq);
        } else {
            // The target's store failed: take this message and everything after it
            // again when the outbox resends them (what is in flight to other
            // targets finishes; the targets are idempotent).
            self.waiting.retain(|(s, _, _)| *s < seq);
            self.expected = self.expected.min(seq);
        }
        self.pump(cx);
    }
}

impl<S: System<Msg = Msg>> Actor<S> for Peer {
    type Msg = PeerMsg;

    fn handle(&mut self, msg: PeerMsg, cx: &mut Context<'_, S>) {
        let me = cx.node();
        match msg {
            PeerMsg::Deliver { seq, to, msg } => {
                if cx.sender() != Some(&self.remote_outbox(me)) {
                    tracing::warn!(remote = ?self.remote, sender = ?cx.sender(), "delivery not from the remote node's outbox dropped");
                    metrics::counter!("conclave_runtime_messages_dropped_total", "reason" => "not_outbox").increment(1);
                    return;
                }
                self.deliver(seq, to, msg, cx);
            }
            PeerMsg::Applied { done } => self.on_applied(done, cx),
            PeerMsg::Connected | PeerMsg::Disconnected | PeerMsg::Tick if cx.sender().is_some() => {
                // Transport events and timers come from the driver, never from an actor.
                tracing::warn!(remote = ?self.remote, sender = ?cx.sender(), "peer control message from an actor dropped");
            }
            PeerMsg::Connected => {
                if !self.connected {
                    metrics::gauge!("conclave_peers_connected").increment(1.0);
                }
                self.connected = true;
                self.last_heard = Some(cx.now());
                // Whatever waits for that node goes now, not after its backoff; what
                // was in flight on the lost connection is sent again.
                cx.send(outbox_of(me, self.remote), OutboxMsg::Resend);
            }
            PeerMsg::Disconnected => {
                if self.connected {
                    metrics::gauge!("conclave_peers_connected").decrement(1.0);
                }
                self.connected = false;
            }
            PeerMsg::Tick => self.tick(cx),
        }
    }
}

impl Peer {
    fn tick<S: System<Msg = Msg>>(&mut self, cx: &mut Context<'_, S>) {
        // Connection state lives here, so a connected peer stays active.
        if self.busy || self.connected || !self.in_flight.is_empty() || !self.waiting.is_empty() {
            self.busy = false;
            cx.timer(self.idle, PeerMsg::Tick);
        } else {
            cx.stop();
        }
    }
}

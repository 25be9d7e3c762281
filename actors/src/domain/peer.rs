//! The peer actor: one per remote node, on the receiving side.
//!
//! It takes what the remote node's outbox sends ([`PeerMsg::Deliver`]), drops
//! duplicates and anything after a gap (the outbox resends in order), and hands the
//! messages to their local targets **one at a time, in sequence order**: the next
//! goes only when the target has answered [`PeerMsg::Applied`] for the previous
//! one. Messages for different actors depend on each other (a room's membership
//! snapshot must be applied before its keys and frames are), so handing them over
//! concurrently could apply them out of order. What waits is bounded by the
//! outbox's window.
//!
//! Once a message is applied the peer moves its durable high-water mark
//! ([`crate::outbox::accept`]) and acknowledges; under load it does so every
//! [`ACK_EVERY`] messages or when nothing waits, not after each one. A crash between
//! a target's commit and the acknowledgement only makes the outbox resend; targets
//! are idempotent, so nothing is applied twice.
//!
//! It also keeps the transport's view of the remote node (connected or not, when it
//! was last heard from) and, when the connection comes back, has the local outbox
//! towards it resend at once instead of waiting for its backoff.

use core::time::Duration;
use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};

use super::{outbox_of, Deliverable, DomainConfig, Msg, OutboxMsg};
use crate::actor::{Actor, ActorRef, Context, System, Time};
use crate::ids::{NodeId, Seq};
use crate::mutation::{self, Mutation};

/// Acknowledge at least every this many applied messages.
pub const ACK_EVERY: u64 = 32;

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
    /// Everything up to here is applied; durable up to `durable`.
    high: u64,
    /// The high-water mark last written and acknowledged.
    durable: u64,
    /// The next sequence number to accept from the outbox.
    expected: u64,
    /// Accepted, waiting to be handed over, in sequence order.
    waiting: VecDeque<(u64, ActorRef, Deliverable)>,
    /// Handed over, not yet applied.
    in_flight: Option<(u64, ActorRef)>,
    /// Only under [`Mutation::PipelinedHandoff`]: handed over and not yet applied,
    /// per target, in the order handed over.
    pipelined: BTreeMap<ActorRef, VecDeque<u64>>,
    /// Only under [`Mutation::PipelinedHandoff`]: applied, after one that is not yet.
    applied: BTreeSet<u64>,
    connected: bool,
    last_heard: Option<Time>,
    busy: bool,
    /// Whether this incarnation asked to stop. It still handles what was queued
    /// behind the stop (see [`crate::lifecycle`]) but takes no new delivery: what
    /// it accepted would be handed over and then forgotten with it, and the
    /// outbox's resend would hand the same message over a second time.
    stopping: bool,
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
            in_flight: None,
            pipelined: BTreeMap::new(),
            applied: BTreeSet::new(),
            connected: false,
            last_heard: None,
            busy: false,
            stopping: false,
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

    /// Hands the next waiting message over, unless one is in flight.
    fn pump<S: System<Msg = Msg>>(&mut self, cx: &mut Context<'_, S>) {
        let me = cx.node();
        while self.in_flight.is_none() {
            let Some((seq, to, msg)) = self.waiting.pop_front() else {
                break;
            };
            if to.node != me || !msg.fits(&to) {
                // Misaddressed: counted, and finished as refused so that it does
                // not block everything behind it.
                tracing::warn!(remote = ?self.remote, ?to, "misaddressed delivery refused");
                metrics::counter!("conclave_runtime_messages_dropped_total", "reason" => "misaddressed").increment(1);
                self.high = seq;
                continue;
            }
            self.in_flight = Some((seq, to));
            cx.send(to, msg);
        }
        self.flush(cx);
    }

    /// Makes the high-water mark durable and acknowledges it, when enough was
    /// applied or nothing else waits.
    fn flush<S: System<Msg = Msg>>(&mut self, cx: &mut Context<'_, S>) {
        let idle = self.in_flight.is_none() && self.waiting.is_empty() && self.pipelined.is_empty();
        if self.high == self.durable || !(idle || self.high - self.durable >= ACK_EVERY) {
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

    /// Only under [`Mutation::PipelinedHandoff`]: records `seq` as applied and moves
    /// the high-water mark over every applied message without a gap before it.
    fn finish_pipelined<S: System<Msg = Msg>>(&mut self, seq: u64, cx: &mut Context<'_, S>) {
        self.applied.insert(seq);
        while self.applied.first() == Some(&(self.high + 1)) {
            self.applied.pop_first();
            self.high += 1;
        }
        self.flush(cx);
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
                self.busy = true;
                self.last_heard = Some(cx.now());
                if seq.0 < self.expected {
                    if mutation::active(Mutation::SkipReceiverDedup) {
                        // Mutation: the duplicate is handed over again.
                        self.waiting.push_back((seq.0, to, msg));
                        self.pump(cx);
                        return;
                    }
                    // A resend of something accepted already: acknowledge what is
                    // durable, so the outbox can forget it.
                    metrics::counter!("conclave_inbox_duplicates_total").increment(1);
                    self.ack(cx);
                    return;
                }
                if self.stopping {
                    // Refused like a gap: the outbox resends it, and the next
                    // incarnation takes it.
                    tracing::debug!(remote = ?self.remote, seq = seq.0, "delivery refused while passivating");
                    return;
                }
                if seq.0 > self.expected || self.waiting.len() >= super::outbox::WINDOW {
                    // (A well-behaved outbox never has more than its window in flight;
                    // beyond that, the surplus is refused like a gap and resent.)
                    // A gap: the outbox resends in order, so wait for the missing one.
                    metrics::counter!("conclave_inbox_gaps_total").increment(1);
                    return;
                }
                self.expected += 1;
                if mutation::active(Mutation::AckBeforePersist)
                    && self.in_flight.is_none()
                    && self.waiting.is_empty()
                {
                    // Mutation: acknowledged on hand-over, before the target commits.
                    cx.send(to, msg);
                    self.high = self.high.max(seq.0);
                    self.flush(cx);
                    return;
                }
                if mutation::active(Mutation::PipelinedHandoff) {
                    // Mutation: handed over at once, while earlier messages to other
                    // targets may still be waiting to be applied.
                    if to.node != me || !msg.fits(&to) {
                        self.finish_pipelined(seq.0, cx);
                    } else {
                        self.pipelined.entry(to).or_default().push_back(seq.0);
                        cx.send(to, msg);
                    }
                    return;
                }
                self.waiting.push_back((seq.0, to, msg));
                self.pump(cx);
            }
            PeerMsg::Applied { done } if mutation::active(Mutation::PipelinedHandoff) => {
                // Mutation: the oldest message in flight to this target is applied.
                let Some(&target) = cx.sender() else { return };
                let Some(queue) = self.pipelined.get_mut(&target) else {
                    return;
                };
                let Some(seq) = queue.pop_front() else { return };
                if queue.is_empty() {
                    self.pipelined.remove(&target);
                }
                if done {
                    self.finish_pipelined(seq, cx);
                } else {
                    // Hand it over again when the outbox resends it.
                    self.expected = self.expected.min(seq);
                }
            }
            PeerMsg::Applied { done } => {
                let Some((seq, target)) = self.in_flight else {
                    return;
                };
                if cx.sender() != Some(&target) {
                    return;
                }
                self.in_flight = None;
                if done {
                    // (Never lowers it; only a mutation hands a duplicate over.)
                    self.high = self.high.max(seq);
                    self.pump(cx);
                } else {
                    // The target's store failed: take this message and everything
                    // after it again when the outbox resends them.
                    self.waiting.clear();
                    self.expected = seq;
                    self.flush(cx);
                }
            }
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
            PeerMsg::Tick => {
                // Connection state lives here, so a connected peer stays active.
                if self.busy
                    || self.connected
                    || self.in_flight.is_some()
                    || !self.waiting.is_empty()
                    || !self.pipelined.is_empty()
                {
                    self.busy = false;
                    cx.timer(self.idle, PeerMsg::Tick);
                } else {
                    debug_assert!(self.in_flight.is_none() && self.waiting.is_empty());
                    self.stopping = true;
                    cx.stop();
                }
            }
        }
    }
}

//! The peer actor: one per remote node, on the receiving side.
//!
//! It takes what the remote node's outbox sends ([`PeerMsg::Deliver`]), drops
//! duplicates and anything after a gap (the outbox resends in order), and hands each
//! new message, in sequence order, to its local target. Targets answer
//! [`PeerMsg::Applied`] once they have committed (or refused for good). The peer
//! then moves its durable high-water mark ([`crate::outbox::accept`]) over every
//! message applied without a gap before it, and acknowledges up to there. A crash
//! between a target's commit and the acknowledgement only makes the outbox resend;
//! targets are idempotent, so nothing is applied twice.
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
    /// The durable high-water mark: everything up to it is applied.
    high: u64,
    /// The next sequence number to hand over.
    expected: u64,
    /// Handed over and not yet applied, per target, in the order handed over.
    in_flight: BTreeMap<ActorRef, VecDeque<u64>>,
    /// Applied, but after a message that is not yet.
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
            expected: high + 1,
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
                upto: Seq(self.high),
            },
        );
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
                    if mutation::active(Mutation::SkipReceiverDedup)
                        && to.node == me
                        && msg.fits(&to)
                    {
                        // Mutation: the duplicate goes to its target again.
                        self.in_flight.entry(to).or_default().push_back(seq.0);
                        cx.send(to, msg);
                        return;
                    }
                    // A resend of something handed over already: acknowledge what is
                    // applied, so the outbox can forget it.
                    metrics::counter!("conclave_inbox_duplicates_total").increment(1);
                    self.ack(cx);
                    return;
                }
                if seq.0 > self.expected {
                    // A gap: the outbox resends in order, so wait for the missing one.
                    metrics::counter!("conclave_inbox_gaps_total").increment(1);
                    return;
                }
                if to.node != me || !msg.fits(&to) {
                    // Misaddressed: counted, and applied as refused so it does not
                    // block everything behind it.
                    tracing::warn!(remote = ?self.remote, ?to, "misaddressed delivery refused");
                    metrics::counter!("conclave_runtime_messages_dropped_total", "reason" => "misaddressed").increment(1);
                    self.expected += 1;
                    self.finish(seq.0, cx);
                    return;
                }
                self.expected += 1;
                if mutation::active(Mutation::AckBeforePersist) {
                    // Mutation: acknowledged on hand-over, before the target commits.
                    cx.send(to, msg);
                    self.finish(seq.0, cx);
                    return;
                }
                self.in_flight.entry(to).or_default().push_back(seq.0);
                cx.send(to, msg);
            }
            PeerMsg::Applied { done } => {
                let Some(&target) = cx.sender() else { return };
                let Some(queue) = self.in_flight.get_mut(&target) else {
                    return;
                };
                let Some(seq) = queue.pop_front() else { return };
                if queue.is_empty() {
                    self.in_flight.remove(&target);
                }
                if done {
                    self.finish(seq, cx);
                } else {
                    // Hand it over again when the outbox resends it.
                    self.expected = self.expected.min(seq);
                }
            }
            PeerMsg::Connected => {
                if !self.connected {
                    metrics::gauge!("conclave_peers_connected").increment(1.0);
                }
                self.connected = true;
                self.last_heard = Some(cx.now());
                // Whatever waits for that node goes now, not after its backoff.
                cx.send(outbox_of(me, self.remote), OutboxMsg::Kick);
            }
            PeerMsg::Disconnected => {
                if self.connected {
                    metrics::gauge!("conclave_peers_connected").decrement(1.0);
                }
                self.connected = false;
            }
            PeerMsg::Tick => {
                // Connection state lives here, so a connected peer stays active.
                if self.busy || self.connected || !self.in_flight.is_empty() {
                    self.busy = false;
                    cx.timer(self.idle, PeerMsg::Tick);
                } else {
                    cx.stop();
                }
            }
        }
    }
}

impl Peer {
    /// Records `seq` as applied; moves the high-water mark over every applied
    /// message without a gap, durably, and acknowledges.
    fn finish<S: System<Msg = Msg>>(&mut self, seq: u64, cx: &mut Context<'_, S>) {
        if seq <= self.high && mutation::active(Mutation::SkipReceiverDedup) {
            // Mutation: a duplicate handed over again was applied again; say so.
            self.ack(cx);
            return;
        }
        self.applied.insert(seq);
        let mut high = self.high;
        while self.applied.first() == Some(&(high + 1)) {
            self.applied.pop_first();
            high += 1;
        }
        if high == self.high {
            return;
        }
        let result = cx.store().write().and_then(|mut txn| {
            for s in self.high + 1..=high {
                crate::outbox::accept(&mut *txn, self.remote, Seq(s))?;
            }
            txn.commit()
        });
        match result {
            Ok(()) => {
                self.high = high;
                self.ack(cx);
            }
            Err(error) => {
                // Not acknowledged: the outbox resends, and the idempotent targets
                // apply nothing twice.
                tracing::error!(remote = ?self.remote, %error, "could not record the high-water mark");
                for s in self.high + 1..=high {
                    self.applied.insert(s);
                }
            }
        }
    }
}

//! The outbox actor: one per destination node, on the sending side.
//!
//! Messages are written to the outbox by whoever changes state, in the same
//! transaction as the change ([`super::enqueue`]); this actor only sends them. It
//! keeps up to [`OUTBOX_WINDOW_MESSAGES`] messages in flight to the destination's peer actor,
//! slides the window as acknowledgements arrive, and when a retry timer finds no
//! progress it resends everything unacknowledged (in order, so the receiver sees no
//! gap) and doubles its delay, up to a maximum, with jitter so that many outboxes do
//! not resend in step. The queue itself is in the store, so it survives restarts of
//! either side; on start the driver kicks every outbox that has messages waiting
//! ([`super::boot`]).

use core::time::Duration;

use serde::{Deserialize, Serialize};

use super::{peer_of, DomainConfig, Msg, PeerMsg, Routed};
use crate::actor::{Actor, Context, System};
use crate::ids::{NodeId, Seq};
use crate::mutation::{self, Mutation};
use crate::outbox::Stream;
use crate::wire::{decode_bounded, ENVELOPE_BYTES_MAX};

/// How many unacknowledged messages an outbox sends before waiting for an
/// acknowledgement.
pub const OUTBOX_WINDOW_MESSAGES: usize = 256;

/// Messages to an outbox actor.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum OutboxMsg {
    /// Something was queued: send it.
    Kick,
    /// The destination is reachable again: send everything unacknowledged now,
    /// from the first, with the shortest delay.
    Resend,
    /// From the destination's peer actor: everything up to `upto` of the stream
    /// of incarnation `incarnation` is applied.
    Ack {
        /// The destination's high-water mark for this node.
        upto: Seq,
        /// The incarnation whose stream it acknowledges (another run's is ignored).
        incarnation: u64,
    },
    /// The retry timer of round `round`.
    Retry {
        /// Which arming of the timer this is (older ones are ignored).
        round: u64,
    },
}

/// The outbox actor (see the module docs).
#[derive(Debug)]
pub struct Outbox {
    dest: NodeId,
    config: DomainConfig,
    /// This run's incarnation, once read.
    incarnation: Option<u64>,
    /// The highest sequence number sent since the last (re)send from the start.
    sent_upto: u64,
    backoff: Duration,
    round: u64,
    armed: bool,
    /// Whether an acknowledgement advanced since the retry timer was armed.
    progress: bool,
    /// The depth last added to the node's depth gauge.
    reported: u64,
    /// Whether this incarnation asked to stop. It still handles what was queued
    /// behind the stop (see [`crate::lifecycle`]), but sends nothing more: its
    /// retry timer is dead, so what it sent now would never be resent. Work found
    /// then goes to the next incarnation, as a kick to itself.
    stopping: bool,
}

impl Outbox {
    pub(crate) fn activate<S: System<Msg = Msg>>(
        dest: NodeId,
        config: DomainConfig,
        _cx: &mut Context<'_, S>,
    ) -> Self {
        Outbox {
            dest,
            config,
            incarnation: None,
            sent_upto: 0,
            backoff: config.retry_base,
            round: 0,
            armed: false,
            progress: false,
            reported: 0,
            stopping: false,
        }
    }
}

impl<S: System<Msg = Msg>> Actor<S> for Outbox {
    type Msg = OutboxMsg;

    fn handle(&mut self, msg: OutboxMsg, cx: &mut Context<'_, S>) {
        let me = cx.node();
        match msg {
            // Kicks come from this node's actors and transport events only: another
            // node cannot make this one resend its window.
            OutboxMsg::Kick | OutboxMsg::Resend if cx.sender().is_some_and(|s| s.node != me) => {
                metrics::counter!("conclave_runtime_messages_dropped_total", "reason" => "not_local").increment(1);
            }
            OutboxMsg::Kick => self.pump(cx),
            OutboxMsg::Resend => {
                self.sent_upto = 0;
                self.backoff = self.config.retry_base;
                self.pump(cx);
            }
            OutboxMsg::Ack { upto, incarnation } => {
                if cx.sender() != Some(&peer_of(self.dest, me)) {
                    tracing::warn!(dest = ?self.dest, sender = ?cx.sender(), "acknowledgement not from the destination's peer dropped");
                    metrics::counter!("conclave_runtime_messages_dropped_total", "reason" => "not_peer").increment(1);
                    return;
                }
                match self.incarnation(cx) {
                    Ok(mine) if mine == incarnation => self.on_ack(upto, cx),
                    // It acknowledges another run's numbers, which mean other
                    // messages now.
                    Ok(_) => metrics::counter!("conclave_runtime_messages_dropped_total", "reason" => "stale_ack").increment(1),
                    Err(error) => tracing::error!(dest = ?self.dest, %error, "could not read this run's incarnation; acknowledgement dropped"),
                }
            }
            // Only this outbox's own timer retries.
            OutboxMsg::Retry { round } if round == self.round && cx.sender().is_none() => {
                self.on_retry(cx);
            }
            OutboxMsg::Retry { .. } => {}
        }
    }
}

impl Outbox {
    /// The destination applied everything up to `upto`: forget it, and passivate
    /// once nothing waits.
    fn on_ack<S: System<Msg = Msg>>(&mut self, upto: Seq, cx: &mut Context<'_, S>) {
        let result = cx
            .store()
            .write()
            .map_err(crate::outbox::OutboxError::from)
            .and_then(|mut txn| {
                let removed = crate::outbox::ack(&mut *txn, self.dest, upto)?;
                let depth = crate::outbox::depth(&*txn, self.dest)?;
                txn.commit()?;
                Ok((removed, depth))
            });
        let (removed, depth) = match result {
            Ok(counts) => counts,
            Err(error) => {
                tracing::warn!(dest = ?self.dest, %error, "acknowledgement refused");
                metrics::counter!("conclave_runtime_messages_dropped_total", "reason" => "bad_ack")
                    .increment(1);
                return;
            }
        };
        self.report(depth);
        if removed > 0 {
            self.progress = true;
            self.backoff = self.config.retry_base;
        }
        if depth == 0 {
            self.passivate(cx);
        } else {
            self.pump(cx);
        }
    }

    /// The retry timer fired: if nothing was acknowledged for a whole delay, resend
    /// everything unacknowledged, in order, and wait longer next time.
    fn on_retry<S: System<Msg = Msg>>(&mut self, cx: &mut Context<'_, S>) {
        self.armed = false;
        if !self.progress && !mutation::active(Mutation::DropOutboxRetries) {
            self.sent_upto = 0;
            self.backoff = (self.backoff * 2).min(self.config.retry_max);
            metrics::counter!("conclave_outbox_retries_total").increment(1);
        }
        debug_assert!(self.backoff >= self.config.retry_base.min(self.config.retry_max));
        debug_assert!(self.backoff <= self.config.retry_max.max(self.config.retry_base));
        self.progress = false;
        self.pump(cx);
    }
}

impl Outbox {
    /// Sends what is queued, durable and not yet sent (within the window), and
    /// arms the retry timer while anything waits. Passivates when nothing does.
    ///
    /// What waits and where the window starts are judged by the node's whole view
    /// (the batch in progress included: an acknowledgement counts at once, so the
    /// window slides when it arrives, not when it is durable), but what is
    /// sent is read from the durable part of the store only, and sent at once: a
    /// queued message is durable before anyone sees it, so its sequence number is
    /// never handed out twice, and it need not wait for the commit of the batch
    /// this turn belongs to. A message queued in the batch still in progress is
    /// sent by the kick its writer sends once that batch is durable.
    fn pump<S: System<Msg = Msg>>(&mut self, cx: &mut Context<'_, S>) {
        let me = cx.node();
        let pending = match self.read_pending(cx) {
            Ok((pending, depth, stream)) => {
                self.report(depth);
                if depth == 0 {
                    self.passivate(cx);
                    return;
                }
                (pending, stream)
            }
            Err(error) => {
                tracing::error!(dest = ?self.dest, %error, "could not read the outbox; retrying later");
                self.arm(cx);
                return;
            }
        };
        let (pending, stream) = pending;
        if self.stopping {
            let me_addr = *cx.me();
            cx.send(me_addr, OutboxMsg::Kick);
            return;
        }
        let peer = peer_of(self.dest, me);
        debug_assert!(
            pending.windows(2).all(|w| w[0].0 < w[1].0),
            "sent in sequence order"
        );
        for (seq, bytes) in pending {
            debug_assert!(seq.0 > self.sent_upto, "sent once per (re)send");
            match decode_bounded::<Routed>(&bytes, ENVELOPE_BYTES_MAX) {
                Ok(Routed { to, msg }) => {
                    let deliver = PeerMsg::Deliver {
                        seq,
                        stream,
                        to,
                        msg,
                    };
                    cx.send_durable(peer, deliver);
                }
                // Written by this node's own code, so this is a bug or a corrupt
                // store; the receiver sees a gap and the rest waits behind it.
                Err(error) => {
                    tracing::error!(dest = ?self.dest, seq = seq.0, %error, "outbox entry does not decode");
                }
            }
            self.sent_upto = seq.0;
        }
        self.arm(cx);
    }

    /// This run's incarnation (from the store: the driver records it at start).
    fn incarnation<S: System<Msg = Msg>>(
        &mut self,
        cx: &Context<'_, S>,
    ) -> Result<u64, crate::outbox::OutboxError> {
        if let Some(known) = self.incarnation {
            return Ok(known);
        }
        let stored = crate::outbox::incarnation(&*cx.store().read()?)?;
        let known = stored.ok_or(crate::outbox::OutboxError::NoIncarnation)?;
        self.incarnation = Some(known);
        Ok(known)
    }

    /// What to send next (durable, after what was sent, within the window), how
    /// many messages wait in all, and the stream they go on.
    fn read_pending<S: System<Msg = Msg>>(
        &mut self,
        cx: &Context<'_, S>,
    ) -> Result<(crate::outbox::Queued, u64, Stream), crate::outbox::OutboxError> {
        let incarnation = self.incarnation(cx)?;
        let (acked, depth) = crate::outbox::progress(&*cx.store().read()?, self.dest)?;
        let stream = Stream {
            incarnation,
            first: Seq(acked.0 + 1),
        };
        let durable = if mutation::active(Mutation::OutboxSendsUncommitted) {
            // Mutation: what the batch in progress holds, sent at once all the same.
            cx.store().read()?
        } else {
            cx.read_durable()?
        };
        let after = Seq(self.sent_upto);
        let window = OUTBOX_WINDOW_MESSAGES;
        let pending = crate::outbox::unsent(&*durable, self.dest, acked, after, window)?;
        Ok((pending, depth, stream))
    }

    /// Drained: cancel the timer and passivate until the next kick (once).
    fn passivate<S: System<Msg = Msg>>(&mut self, cx: &mut Context<'_, S>) {
        if self.stopping {
            return;
        }
        self.round += 1;
        self.armed = false;
        self.stopping = true;
        cx.stop();
    }

    /// Keeps `conclave_outbox_depth` (the node's total) in step with this outbox.
    fn report(&mut self, depth: u64) {
        let delta = depth as f64 - self.reported as f64;
        if delta != 0.0 {
            metrics::gauge!("conclave_outbox_depth").increment(delta);
            self.reported = depth;
        }
    }

    fn arm<S: System<Msg = Msg>>(&mut self, cx: &mut Context<'_, S>) {
        if self.armed {
            return;
        }
        // Equal jitter: half the delay fixed, half uniformly random.
        let half = u64::try_from(self.backoff.as_micros() / 2).unwrap_or(u64::MAX);
        let jitter = cx.rng().next_u64() % (half + 1);
        let delay = Duration::from_micros(half + jitter);
        debug_assert!(
            delay <= self.backoff,
            "equal jitter never exceeds the delay"
        );
        self.round += 1;
        self.armed = true;
        cx.timer(delay, OutboxMsg::Retry { round: self.round });
    }
}

#[cfg(test)]
mod tests {
    use conclave_storage::{MemStore, Store};
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    use super::*;
    use crate::actor::{ActorRef, Effect, Time};
    use crate::domain::{outbox_of, room_of, Domain, RoomMsg, Routed};
    use crate::ids::RoomId;

    const HERE: NodeId = NodeId([1; 32]);
    const THERE: NodeId = NodeId([2; 32]);

    /// The run of HERE the tests' outboxes send in.
    const RUN: u64 = 11;

    /// Begins HERE's run in `store` (as the driver does at start).
    fn begin(store: &MemStore) {
        crate::domain::begin_run(store, RUN).expect("run");
    }

    fn enqueue(store: &MemStore) {
        let routed = Routed {
            to: room_of(THERE, RoomId([5; 16])),
            msg: crate::domain::Deliverable::Room(RoomMsg::Tick),
        };
        let bytes = crate::wire::encode_bounded(&routed, ENVELOPE_BYTES_MAX).expect("encode");
        let mut txn = store.write().expect("write");
        crate::outbox::enqueue(&mut *txn, THERE, bytes).expect("enqueue");
        txn.commit().expect("commit");
    }

    fn handle(
        outbox: &mut Outbox,
        store: &MemStore,
        from: Option<ActorRef>,
        msg: OutboxMsg,
    ) -> Vec<Effect<Msg>> {
        handle_batched(outbox, store, store, from, msg)
    }

    /// Sends of `effects` that deliver, by sequence number.
    fn delivered(effects: &[Effect<Msg>]) -> Vec<u64> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::Send {
                    msg: Msg::Peer(PeerMsg::Deliver { seq, .. }),
                    durable: true,
                    ..
                } => Some(seq.0),
                _ => None,
            })
            .collect()
    }

    /// Handles `msg` with the store seen through `batch`, whose durable part is
    /// `disk`.
    fn handle_batched(
        outbox: &mut Outbox,
        batch: &dyn Store,
        disk: &dyn Store,
        from: Option<ActorRef>,
        msg: OutboxMsg,
    ) -> Vec<Effect<Msg>> {
        let mut rng = ChaCha20Rng::seed_from_u64(9);
        let mut effects = Vec::new();
        let me = outbox_of(HERE, THERE);
        let mut cx =
            Context::<Domain>::new(me, from, Time::default(), &mut rng, batch, &mut effects)
                .with_durable(disk);
        outbox.handle(msg, &mut cx);
        effects
    }

    #[test]
    fn an_acknowledgement_slides_the_window_before_it_is_durable() {
        let disk = std::sync::Arc::new(MemStore::new());
        begin(&disk);
        for _ in 0..OUTBOX_WINDOW_MESSAGES + 3 {
            enqueue(&disk);
        }
        let batch = conclave_storage::Batch::new(disk.clone());
        let mut outbox = {
            let (mut rng, mut effects) = (ChaCha20Rng::seed_from_u64(9), Vec::new());
            let me = outbox_of(HERE, THERE);
            let mut cx =
                Context::<Domain>::new(me, None, Time::default(), &mut rng, &batch, &mut effects);
            Outbox::activate(THERE, DomainConfig::default(), &mut cx)
        };
        let disk = disk.as_ref();
        let kick = OutboxMsg::Kick;
        let sent = delivered(&handle_batched(&mut outbox, &batch, disk, None, kick));
        assert_eq!(sent.len(), OUTBOX_WINDOW_MESSAGES, "a full window");
        // Three acknowledged: the acknowledgement is in the batch, not on disk yet,
        // and the next three go at once (they are durable), not at the retry.
        let ack = OutboxMsg::Ack {
            upto: Seq(3),
            incarnation: RUN,
        };
        let peer = Some(peer_of(THERE, HERE));
        let sent = delivered(&handle_batched(&mut outbox, &batch, disk, peer, ack));
        let next = OUTBOX_WINDOW_MESSAGES as u64;
        assert_eq!(sent, [next + 1, next + 2, next + 3]);
        assert_eq!(batch.txns(), 1, "the acknowledgement is not durable yet");
    }

    #[test]
    fn a_stopping_outbox_hands_new_work_to_its_next_incarnation() {
        let store = MemStore::new();
        begin(&store);
        let mut rng = ChaCha20Rng::seed_from_u64(9);
        let mut effects = Vec::new();
        let me = outbox_of(HERE, THERE);
        let mut cx =
            Context::<Domain>::new(me, None, Time::default(), &mut rng, &store, &mut effects);
        let mut outbox = Outbox::activate(THERE, DomainConfig::default(), &mut cx);
        enqueue(&store);
        handle(&mut outbox, &store, None, OutboxMsg::Kick);
        let stale = OutboxMsg::Ack {
            upto: Seq(1),
            incarnation: RUN + 1,
        };
        let effects = handle(&mut outbox, &store, Some(peer_of(THERE, HERE)), stale);
        assert!(
            !effects.iter().any(|e| matches!(e, Effect::Stop)),
            "another run's acknowledgement removes nothing"
        );
        let ack = OutboxMsg::Ack {
            upto: Seq(1),
            incarnation: RUN,
        };
        let effects = handle(&mut outbox, &store, Some(peer_of(THERE, HERE)), ack);
        assert!(
            effects.iter().any(|e| matches!(e, Effect::Stop)),
            "drained, it stops"
        );
        // New work arrives, its kick queued behind the stop: the stopping
        // incarnation neither sends (its retry timer is dead) nor arms a timer; it
        // kicks itself, which reaches the next incarnation.
        enqueue(&store);
        let effects = handle(&mut outbox, &store, None, OutboxMsg::Kick);
        assert_eq!(effects.len(), 1, "{effects:?}");
        assert!(matches!(
            &effects[0],
            Effect::Send { to, msg: Msg::Outbox(OutboxMsg::Kick), .. } if *to == me
        ));
    }
}

//! The peer actor: one per remote node, on the receiving side.
//!
//! It takes what the remote node's outbox sends ([`PeerMsg::Deliver`]), drops
//! duplicates and anything after a gap (the outbox resends in order), and hands the
//! messages to their local targets (rooms) **in sequence order per target, in
//! parallel across targets**: a free target gets everything waiting for it (up to
//! [`RUN_MESSAGES_MAX`]) as one run, applied in one turn and so in one commit of
//! the node's batch, and gets its next run only when it has answered
//! [`PeerMsg::Applied`] for every message of this one, while other rooms go on.
//! Everything a room depends on (its membership snapshot, its keys, its frames)
//! goes to the room itself, so order per target is all the order there is. What
//! waits or is in flight is bounded by the outbox's window.
//!
//! Each delivery carries its outbox's [`Stream`]: a new incarnation of that node,
//! or an outbox that no longer holds what this peer waits for (this node's store
//! was reset), makes the peer follow the stream afresh from its first message
//! ([`crate::outbox::follow`]), once what it holds of the old one is finished; a
//! mark it cannot read is never taken as "nothing taken".
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
use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};

use super::{outbox_of, Deliverable, DomainConfig, Msg, OutboxMsg};
use crate::actor::{Actor, ActorRef, Context, System, Time};
use crate::ids::{NodeId, Seq};
use crate::mutation::{self, Mutation};
use crate::outbox::{Mark, Stream};
use conclave_storage::StoreError;

/// Acknowledge at least every this many applied messages.
pub const ACK_EVERY_MESSAGES: u64 = 32;

/// The most messages one target gets in one hand-off: a run is applied in one
/// turn, so this bounds a turn's work (and what a run holds stays within the
/// outbox's window).
pub const RUN_MESSAGES_MAX: usize = 64;

/// Messages to a peer actor.
// Deliveries are the common case; boxing them would add an allocation per frame.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum PeerMsg {
    /// Message `seq` of the remote node's outbox towards this node.
    Deliver {
        /// Its sequence number in that outbox.
        seq: Seq,
        /// The outbox's stream: its incarnation and first held message.
        stream: Stream,
        /// The local target.
        to: ActorRef,
        /// The message.
        msg: Deliverable,
    },
    /// From a local target, once for each message handed to it, in order: the
    /// message has been committed or refused for good (`done`), or must be offered
    /// again (`!done`: storage failed).
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
    /// The remote outbox's stream this peer follows: `None` before its first
    /// delivery when nothing was taken from that node yet, or when the mark could
    /// not be read (then it is read again before any delivery is taken).
    stream: Option<Stream>,
    /// Whether the stored mark could be read (a read error is never taken as
    /// "nothing taken yet").
    known: bool,
    /// Every message up to here is applied (the applied prefix).
    high: u64,
    /// The high-water mark last written and acknowledged.
    durable: u64,
    /// The next sequence number to accept from the outbox.
    expected: u64,
    /// Accepted, not yet handed over because their target is busy: per target, in
    /// sequence order.
    waiting: BTreeMap<ActorRef, VecDeque<(u64, Deliverable)>>,
    /// How many messages wait, over all targets.
    waiting_len: usize,
    /// Handed over and not yet answered: per target, the run it was handed, in
    /// sequence order.
    in_flight: BTreeMap<ActorRef, VecDeque<u64>>,
    /// How many messages are in flight, over all targets.
    in_flight_len: usize,
    /// Applied above the prefix, while a message before them is still in flight.
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
        cx.timer(config.idle, PeerMsg::Tick);
        let mut peer = Peer {
            remote,
            idle: config.idle,
            stream: None,
            known: false,
            high: 0,
            durable: 0,
            expected: 1,
            waiting: BTreeMap::new(),
            waiting_len: 0,
            in_flight: BTreeMap::new(),
            in_flight_len: 0,
            applied: BTreeSet::new(),
            connected: false,
            last_heard: None,
            busy: false,
            stopping: false,
        };
        if let Err(error) = peer.load(cx) {
            tracing::error!(?remote, %error, "could not read the mark of what was taken; taking nothing until it can be read");
        }
        peer
    }

    /// Reads what was taken from the remote node (its stored mark) and takes it
    /// as this peer's state; until that succeeds, nothing is taken.
    fn load<S: System<Msg = Msg>>(&mut self, cx: &Context<'_, S>) -> Result<(), StoreError> {
        let mark = crate::outbox::mark(&*cx.store().read()?, self.remote)?;
        self.known = true;
        self.adopt(mark.unwrap_or_default());
        // Without a mark, the stream is known from its first delivery.
        self.stream = mark.map(Mark::stream);
        Ok(())
    }

    /// The remote outbox this peer answers.
    fn remote_outbox(&self, me: NodeId) -> ActorRef {
        outbox_of(self.remote, me)
    }

    fn ack<S: System<Msg = Msg>>(&self, cx: &mut Context<'_, S>) {
        let Some(stream) = self.stream else {
            return;
        };
        let to = self.remote_outbox(cx.node());
        cx.send(
            to,
            OutboxMsg::Ack {
                upto: Seq(self.durable),
                incarnation: stream.incarnation,
            },
        );
    }

    /// Before taking a delivery of `stream`: reads the stored mark if it could not
    /// be read before, and follows `stream` afresh if it must
    /// ([`crate::outbox::follow`]), once nothing of the old one is pending.
    /// Whether the delivery may be taken.
    fn follow<S: System<Msg = Msg>>(&mut self, stream: Stream, cx: &mut Context<'_, S>) -> bool {
        if !self.known && self.load(cx).is_err() {
            return false;
        }
        let current = self.stream.map(|s| Mark {
            incarnation: s.incarnation,
            high: self.high,
        });
        if mutation::active(Mutation::IgnoreStreams) {
            // Mutation: whatever the stream, the mark stays (from nothing taken).
            self.stream.get_or_insert(stream);
            return true;
        }
        let (mark, Some(why)) = crate::outbox::follow(current, stream) else {
            return true;
        };
        let idle = self.in_flight.is_empty() && self.waiting_len == 0 && self.applied.is_empty();
        if !idle {
            // What was taken of the old stream finishes first; the outbox resends.
            return false;
        }
        // Nothing to write: the first message taken records the new mark
        // (`accept` follows the stream the same way), and a crash before that
        // only means following it afresh again.
        tracing::info!(remote = ?self.remote, reason = why.reason(), from = mark.high + 1, "following the remote node's outbox afresh");
        metrics::counter!("conclave_inbox_resyncs_total", "reason" => why.reason()).increment(1);
        self.stream = Some(stream);
        self.adopt(mark);
        true
    }

    /// Takes `mark` as what was taken and acknowledged.
    fn adopt(&mut self, mark: Mark) {
        self.high = mark.high;
        self.durable = mark.high;
        self.expected = mark.high + 1;
    }

    /// What this peer holds that is not applied yet: accepted messages are either
    /// waiting or in flight, and nothing beyond the outbox's window.
    fn assert_bounded(&self) {
        debug_assert!(self.durable <= self.high && self.high < self.expected);
        debug_assert!(
            self.waiting_len + self.in_flight_len <= super::outbox::OUTBOX_WINDOW_MESSAGES
                || mutation::active(Mutation::SkipReceiverDedup)
        );
        debug_assert!(self.applied.first().is_none_or(|&a| a > self.high + 1));
        debug_assert_eq!(
            self.waiting_len,
            self.waiting.values().map(VecDeque::len).sum::<usize>()
        );
        debug_assert_eq!(
            self.in_flight_len,
            self.in_flight.values().map(VecDeque::len).sum::<usize>()
        );
        debug_assert!(self.in_flight.values().all(|run| !run.is_empty()));
    }

    /// Hands `msg` to its target now if the target is free, else queues it behind
    /// the target's earlier messages, so each target gets its messages in sequence
    /// order while the others go on.
    fn offer<S: System<Msg = Msg>>(
        &mut self,
        seq: u64,
        to: ActorRef,
        msg: Deliverable,
        cx: &mut Context<'_, S>,
    ) {
        if to.node != cx.node() || !msg.fits(&to) {
            // Misaddressed: counted, and finished as refused so that it does not
            // block everything behind it.
            tracing::warn!(remote = ?self.remote, ?to, "misaddressed delivery refused");
            metrics::counter!("conclave_runtime_messages_dropped_total", "reason" => "misaddressed").increment(1);
            self.finish(seq);
        } else if !self.in_flight.contains_key(&to) {
            self.hand(to, vec![(seq, msg)], cx);
        } else {
            self.waiting.entry(to).or_default().push_back((seq, msg));
            self.waiting_len += 1;
        }
    }

    /// `target` is free again: hands it what waits for it, if anything, as one run.
    fn next_for<S: System<Msg = Msg>>(&mut self, target: ActorRef, cx: &mut Context<'_, S>) {
        debug_assert!(!self.in_flight.contains_key(&target), "one run per target");
        let Some(queue) = self.waiting.get_mut(&target) else {
            return;
        };
        let take = queue.len().min(RUN_MESSAGES_MAX);
        let run: Vec<_> = if mutation::active(Mutation::PipelinedHandoff) {
            // Mutation: a free room gets its newest waiting messages first.
            (0..take).filter_map(|_| queue.pop_back()).collect()
        } else {
            queue.drain(..take).collect()
        };
        if queue.is_empty() {
            self.waiting.remove(&target);
        }
        self.waiting_len -= run.len();
        self.hand(target, run, cx);
    }

    /// Hands `run` (consecutive messages for `target`, in sequence order) over.
    fn hand<S: System<Msg = Msg>>(
        &mut self,
        target: ActorRef,
        run: Vec<(u64, Deliverable)>,
        cx: &mut Context<'_, S>,
    ) {
        debug_assert!(!run.is_empty() && run.len() <= RUN_MESSAGES_MAX);
        let (seqs, msgs): (VecDeque<u64>, Vec<Deliverable>) = run.into_iter().unzip();
        self.in_flight_len += seqs.len();
        self.in_flight.insert(target, seqs);
        // A run of one goes as the message itself.
        let msg = match <[Deliverable; 1]>::try_from(msgs) {
            Ok([only]) => Msg::from(only),
            Err(run) => Deliverable::run(run),
        };
        cx.send(target, msg);
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
        // After a retry the prefix can close over messages applied before it: their
        // resends are duplicates now.
        self.expected = self.expected.max(self.high + 1);
    }

    /// Makes the high-water mark durable and acknowledges it, when enough was
    /// applied or nothing else waits.
    fn flush<S: System<Msg = Msg>>(&mut self, cx: &mut Context<'_, S>) {
        let idle = self.in_flight.is_empty() && self.waiting_len == 0;
        if self.high == self.durable || !(idle || self.high - self.durable >= ACK_EVERY_MESSAGES) {
            return;
        }
        let Some(stream) = self.stream else {
            debug_assert!(false, "nothing is applied before a stream is followed");
            return;
        };
        let (from, to) = (self.durable, self.high);
        let result = cx.store().write().and_then(|mut txn| {
            for s in from + 1..=to {
                crate::outbox::accept(&mut *txn, self.remote, stream, Seq(s))?;
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
        (seq, stream): (Seq, Stream),
        to: ActorRef,
        msg: Deliverable,
        cx: &mut Context<'_, S>,
    ) {
        self.busy = true;
        self.last_heard = Some(cx.now());
        if stream.first > seq || stream.first.0 == 0 {
            // An outbox always holds the message it sends.
            metrics::counter!("conclave_runtime_messages_dropped_total", "reason" => "bad_stream")
                .increment(1);
            return;
        }
        if !self.follow(stream, cx) {
            metrics::counter!("conclave_inbox_deferred_total").increment(1);
            return;
        }
        if seq.0 < self.expected {
            if mutation::active(Mutation::SkipReceiverDedup) {
                // Mutation: the duplicate is handed over again.
                self.offer(seq.0, to, msg, cx);
                self.flush(cx);
                return;
            }
            // A resend of something accepted already: acknowledge what is durable,
            // so the outbox can forget it.
            metrics::counter!("conclave_inbox_duplicates_total").increment(1);
            self.ack(cx);
            return;
        }
        if self.stopping {
            // Refused like a gap: the outbox resends it, and the next incarnation
            // takes it.
            tracing::debug!(remote = ?self.remote, seq = seq.0, "delivery refused while passivating");
            return;
        }
        let held = self.waiting_len + self.in_flight_len;
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
        self.offer(seq.0, to, msg, cx);
        self.assert_bounded();
        self.flush(cx);
    }

    /// A target answered for the message it was handed.
    fn on_applied<S: System<Msg = Msg>>(&mut self, done: bool, cx: &mut Context<'_, S>) {
        let Some(&target) = cx.sender() else { return };
        let Some(run) = self.in_flight.get_mut(&target) else {
            return;
        };
        let Some(seq) = run.pop_front() else {
            return;
        };
        self.in_flight_len -= 1;
        let free = run.is_empty();
        if free {
            self.in_flight.remove(&target);
        }
        if done || seq <= self.high {
            // (A copy handed over again after a retry, whose first copy the prefix
            // already covers, is finished whatever its target answered.)
            self.finish(seq);
        } else {
            // The target's store failed: take this message and everything after it
            // again when the outbox resends them (what is in flight finishes: the
            // rest of this run comes back unapplied, other targets' runs apply,
            // and the targets are idempotent).
            for queue in self.waiting.values_mut() {
                queue.retain(|(s, _)| *s < seq);
            }
            self.waiting.retain(|_, queue| !queue.is_empty());
            self.waiting_len = self.waiting.values().map(VecDeque::len).sum();
            self.expected = self.expected.min(seq);
        }
        if free {
            self.next_for(target, cx);
        }
        self.assert_bounded();
        self.flush(cx);
    }
}

impl<S: System<Msg = Msg>> Actor<S> for Peer {
    type Msg = PeerMsg;

    fn handle(&mut self, msg: PeerMsg, cx: &mut Context<'_, S>) {
        let me = cx.node();
        match msg {
            PeerMsg::Deliver {
                seq,
                stream,
                to,
                msg,
            } => {
                if cx.sender() != Some(&self.remote_outbox(me)) {
                    tracing::warn!(remote = ?self.remote, sender = ?cx.sender(), "delivery not from the remote node's outbox dropped");
                    metrics::counter!("conclave_runtime_messages_dropped_total", "reason" => "not_outbox").increment(1);
                    return;
                }
                self.deliver((seq, stream), to, msg, cx);
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
        if self.busy || self.connected || !self.in_flight.is_empty() || self.waiting_len > 0 {
            self.busy = false;
            cx.timer(self.idle, PeerMsg::Tick);
        } else {
            debug_assert!(self.in_flight.is_empty() && self.waiting_len == 0);
            self.stopping = true;
            cx.stop();
        }
    }
}

#[cfg(test)]
mod tests {
    use conclave_storage::{Faulty, MemStore, Store};
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    use super::*;
    use crate::actor::Effect;
    use crate::domain::{room_of, Domain, RoomMsg};
    use crate::ids::RoomId;

    const HERE: NodeId = NodeId([1; 32]);
    const THERE: NodeId = NodeId([2; 32]);

    /// THERE's stream in the tests: its first run, holding everything from 1.
    const STREAM: Stream = Stream {
        incarnation: 5,
        first: Seq(1),
    };

    struct Bench {
        peer: Peer,
        store: Faulty<MemStore>,
        rng: ChaCha20Rng,
        stream: Stream,
    }

    impl Bench {
        fn new() -> Self {
            Self::on(Faulty::new(MemStore::new()))
        }

        fn on(store: Faulty<MemStore>) -> Self {
            let mut rng = ChaCha20Rng::seed_from_u64(7);
            let mut effects = Vec::new();
            let me = crate::domain::peer_of(HERE, THERE);
            let mut cx =
                Context::<Domain>::new(me, None, Time::default(), &mut rng, &store, &mut effects);
            let peer = Peer::activate(THERE, DomainConfig::default(), &mut cx);
            Bench {
                peer,
                store,
                rng,
                stream: STREAM,
            }
        }

        /// Handles `msg` from `from`; returns what it sent, as (target, message).
        fn handle(&mut self, from: ActorRef, msg: PeerMsg) -> Vec<(ActorRef, Msg)> {
            let mut effects = Vec::new();
            let me = crate::domain::peer_of(HERE, THERE);
            let mut cx = Context::<Domain>::new(
                me,
                Some(from),
                Time::default(),
                &mut self.rng,
                &self.store,
                &mut effects,
            );
            self.peer.handle(msg, &mut cx);
            effects
                .into_iter()
                .filter_map(|e| match e {
                    Effect::Send { to, msg, .. } => Some((to, msg)),
                    _ => None,
                })
                .collect()
        }

        fn deliver(&mut self, seq: u64, room: RoomId) -> Vec<(ActorRef, Msg)> {
            let update = crate::domain::room::Update::Keys {
                epoch: crate::ids::Epoch(1),
                keys: Vec::new(),
            };
            let msg = PeerMsg::Deliver {
                seq: Seq(seq),
                stream: self.stream,
                to: room_of(HERE, room),
                msg: Deliverable::Room(RoomMsg::Update(update)),
            };
            self.handle(outbox_of(THERE, HERE), msg)
        }

        fn applied(&mut self, room: RoomId) -> Vec<(ActorRef, Msg)> {
            self.handle(room_of(HERE, room), PeerMsg::Applied { done: true })
        }
    }

    fn targets(sent: &[(ActorRef, Msg)]) -> Vec<ActorRef> {
        sent.iter().map(|(to, _)| *to).collect()
    }

    fn acked(sent: &[(ActorRef, Msg)]) -> Option<u64> {
        acked_in(sent).map(|(upto, _)| upto)
    }

    /// The acknowledgement sent, as (upto, incarnation).
    fn acked_in(sent: &[(ActorRef, Msg)]) -> Option<(u64, u64)> {
        sent.iter().find_map(|(_, m)| match m {
            Msg::Outbox(OutboxMsg::Ack { upto, incarnation }) => Some((upto.0, *incarnation)),
            _ => None,
        })
    }

    /// The mark the bench's store holds for THERE.
    fn stored(bench: &Bench) -> Option<Mark> {
        let txn = bench.store.read().expect("read");
        crate::outbox::mark(&*txn, THERE).expect("mark")
    }

    #[test]
    fn a_busy_room_does_not_hold_up_another_and_each_room_keeps_its_order() {
        let (a, b) = (RoomId([0xa; 16]), RoomId([0xb; 16]));
        let mut bench = Bench::new();
        assert_eq!(targets(&bench.deliver(1, a)), vec![room_of(HERE, a)]);
        // Room a is busy with 1: its next message waits, room b's goes at once.
        assert_eq!(targets(&bench.deliver(2, a)), vec![]);
        assert_eq!(targets(&bench.deliver(3, b)), vec![room_of(HERE, b)]);
        // b finished 3, but 1 and 2 are not applied: nothing is acknowledged.
        let sent = bench.applied(b);
        assert_eq!(acked(&sent), None, "acknowledged past a message in flight");
        // a finished 1: it gets 2; the applied prefix is 1, and 2 is in flight.
        let sent = bench.applied(a);
        assert_eq!(targets(&sent), vec![room_of(HERE, a)]);
        assert_eq!(acked(&sent), None);
        // a finished 2: everything is applied, so 1..=3 is acknowledged at once.
        let sent = bench.applied(a);
        assert_eq!(acked(&sent), Some(3));
        assert_eq!(stored(&bench).map(|m| m.high), Some(3));
    }

    fn run_len(sent: &[(ActorRef, Msg)]) -> Option<usize> {
        match sent {
            [(_, Msg::Room(RoomMsg::Run(run)))] => Some(run.len()),
            [(_, Msg::Room(_))] => Some(1),
            _ => None,
        }
    }

    #[test]
    fn what_waits_for_a_room_goes_as_one_run_and_is_acknowledged_when_all_of_it_applied() {
        let a = RoomId([0xa; 16]);
        let mut bench = Bench::new();
        assert_eq!(run_len(&bench.deliver(1, a)), Some(1));
        for seq in 2..=4 {
            assert_eq!(targets(&bench.deliver(seq, a)), vec![], "room a is busy");
        }
        // 1 applied: 2..=4 go together.
        let sent = bench.applied(a);
        assert_eq!(run_len(&sent), Some(3));
        assert_eq!(acked(&sent), None, "acknowledged with a run in flight");
        assert_eq!(acked(&bench.applied(a)), None);
        assert_eq!(acked(&bench.applied(a)), None);
        assert_eq!(acked(&bench.applied(a)), Some(4));
    }

    #[test]
    fn a_run_that_fails_partway_is_acknowledged_only_below_the_failure() {
        let a = RoomId([0xa; 16]);
        let mut bench = Bench::new();
        bench.deliver(1, a);
        for seq in 2..=4 {
            bench.deliver(seq, a);
        }
        bench.applied(a);
        // The run 2..=4: 2 applied, the store failed on 3, so 4 comes back unapplied.
        bench.applied(a);
        let sent = bench.handle(room_of(HERE, a), PeerMsg::Applied { done: false });
        assert_eq!(acked(&sent), None);
        let sent = bench.handle(room_of(HERE, a), PeerMsg::Applied { done: false });
        assert_eq!(acked(&sent), Some(2), "only the applied prefix");
        // The outbox resends from 3: taken again, in order.
        assert_eq!(run_len(&bench.deliver(3, a)), Some(1));
        bench.deliver(4, a);
        bench.applied(a);
        assert_eq!(acked(&bench.applied(a)), Some(4));
    }

    #[test]
    fn a_failed_second_copy_of_an_applied_message_does_not_block_the_link() {
        let (q, r) = (RoomId([0xa; 16]), RoomId([0xb; 16]));
        let mut bench = Bench::new();
        bench.deliver(1, q);
        bench.deliver(2, r);
        // q's store fails on 1; the outbox resends 1 and 2.
        bench.handle(room_of(HERE, q), PeerMsg::Applied { done: false });
        bench.deliver(1, q);
        bench.deliver(2, r);
        // r finishes its first copy of 2 and is handed the second; q finishes 1.
        assert_eq!(targets(&bench.applied(r)), vec![room_of(HERE, r)]);
        bench.applied(q);
        // The store fails on r's second copy of 2, which the prefix already covers.
        bench.handle(room_of(HERE, r), PeerMsg::Applied { done: false });
        // The link goes on: 3 is taken and handed over.
        assert_eq!(targets(&bench.deliver(3, q)), vec![room_of(HERE, q)]);
        let sent = bench.applied(q);
        assert_eq!(acked(&sent), Some(3));
    }

    #[test]
    fn a_target_that_must_retry_holds_the_mark_below_it() {
        let (a, b) = (RoomId([0xa; 16]), RoomId([0xb; 16]));
        let mut bench = Bench::new();
        bench.deliver(1, a);
        bench.deliver(2, b);
        // a's store failed on 1: nothing at or after 1 may be acknowledged, and the
        // outbox's resend of 1 is taken again.
        let sent = bench.handle(room_of(HERE, a), PeerMsg::Applied { done: false });
        assert_eq!(acked(&sent), None);
        let sent = bench.applied(b);
        assert_eq!(acked(&sent), None, "2 acknowledged while 1 is not applied");
        assert_eq!(targets(&bench.deliver(1, a)), vec![room_of(HERE, a)]);
        let sent = bench.applied(a);
        assert_eq!(acked(&sent), Some(2));
    }

    #[test]
    fn a_new_incarnation_is_followed_once_the_old_streams_messages_are_finished() {
        let a = RoomId([0xa; 16]);
        let mut bench = Bench::new();
        bench.deliver(1, a);
        bench.deliver(2, a);
        bench.applied(a);
        assert_eq!(acked_in(&bench.applied(a)), Some((2, 5)));
        // THERE restarted; its outbox holds everything from 3. Without the
        // incarnation, a store restored from a backup would renumber from 1 and
        // its new messages would be dropped as duplicates.
        bench.stream = Stream {
            incarnation: 6,
            first: Seq(3),
        };
        assert_eq!(targets(&bench.deliver(3, a)), vec![room_of(HERE, a)]);
        // Another run begins while 3 is in flight: its delivery waits.
        bench.stream = Stream {
            incarnation: 7,
            first: Seq(1),
        };
        assert_eq!(targets(&bench.deliver(1, a)), vec![], "deferred");
        assert_eq!(acked_in(&bench.applied(a)), Some((3, 6)));
        // The old stream is finished: the new one is followed from its first.
        assert_eq!(targets(&bench.deliver(1, a)), vec![room_of(HERE, a)]);
        assert_eq!(acked_in(&bench.applied(a)), Some((1, 7)));
        assert_eq!(
            stored(&bench),
            Some(Mark {
                incarnation: 7,
                high: 1
            })
        );
    }

    #[test]
    fn a_peer_whose_store_was_reset_follows_from_the_first_message_its_origin_holds() {
        let a = RoomId([0xa; 16]);
        // A fresh store, while THERE acknowledged up to 9 from this node's
        // earlier store: 1..=9 will never come again.
        let mut bench = Bench::new();
        bench.stream = Stream {
            incarnation: 5,
            first: Seq(10),
        };
        assert_eq!(targets(&bench.deliver(10, a)), vec![room_of(HERE, a)]);
        assert_eq!(acked(&bench.applied(a)), Some(10));
    }

    #[test]
    fn a_mark_that_cannot_be_read_is_never_taken_as_nothing_taken() {
        let a = RoomId([0xa; 16]);
        let mut earlier = Bench::new();
        earlier.deliver(1, a);
        earlier.deliver(2, a);
        earlier.applied(a);
        earlier.applied(a);
        // The peer starts again, and its store cannot be read at that moment.
        earlier.store.fail_next_read();
        let mut bench = Bench::on(earlier.store);
        // It reads the mark again before taking anything: 2 is a duplicate, 3 is
        // taken (before, it started from 0: 1 and 2 were handed over again).
        let sent = bench.deliver(2, a);
        assert!(
            !targets(&sent).contains(&room_of(HERE, a)),
            "2 handed over again"
        );
        assert_eq!(
            acked(&sent),
            Some(2),
            "the duplicate is acknowledged at the mark"
        );
        assert_eq!(targets(&bench.deliver(3, a)), vec![room_of(HERE, a)]);
    }
}

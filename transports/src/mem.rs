//! The in-memory transport: nodes in one process, joined through a [`MemNetwork`].
//!
//! Every envelope is encoded and decoded on the way, as on a real wire, so what does
//! not serialize or exceeds the limit fails here too.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use conclave_actors::wire::{Envelope, ENVELOPE_BYTES_MAX};
use conclave_actors::NodeId;
use tokio::sync::mpsc;

use crate::{Incoming, SendError, Transport, WireMessage};

/// How many envelopes may wait for a receiving node before senders see backpressure.
pub const MEM_QUEUE_DEPTH_MAX: usize = 1024;

/// A hub that connects in-process nodes by id.
pub struct MemNetwork<M> {
    nodes: Arc<Mutex<BTreeMap<NodeId, mpsc::Sender<Incoming<M>>>>>,
}

impl<M> Clone for MemNetwork<M> {
    fn clone(&self) -> Self {
        Self {
            nodes: Arc::clone(&self.nodes),
        }
    }
}

impl<M> Default for MemNetwork<M> {
    fn default() -> Self {
        Self {
            nodes: Arc::default(),
        }
    }
}

impl<M: WireMessage> MemNetwork<M> {
    /// An empty network.
    pub fn new() -> Self {
        Self::default()
    }

    /// Attaches `node`, replacing any earlier attachment of the same id (a restart),
    /// and returns its transport and the receiver of what is sent to it.
    pub fn join(&self, node: NodeId) -> (MemTransport<M>, mpsc::Receiver<Incoming<M>>) {
        let (tx, rx) = mpsc::channel(MEM_QUEUE_DEPTH_MAX);
        self.nodes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(node, tx);
        let transport = MemTransport {
            local: node,
            network: self.clone(),
        };
        (transport, rx)
    }

    /// Detaches `node`: sends to it fail as unreachable until it joins again.
    pub fn leave(&self, node: NodeId) {
        self.nodes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&node);
    }
}

/// One node's handle on a [`MemNetwork`].
pub struct MemTransport<M> {
    local: NodeId,
    network: MemNetwork<M>,
}

impl<M> Clone for MemTransport<M> {
    fn clone(&self) -> Self {
        Self {
            local: self.local,
            network: self.network.clone(),
        }
    }
}

impl<M: WireMessage> Transport<M> for MemTransport<M> {
    fn local_id(&self) -> NodeId {
        self.local
    }

    fn send(&self, to: NodeId, envelope: &Envelope<M>) -> Result<(), SendError> {
        let bytes = envelope.encode().map_err(SendError::Encode)?;
        assert!(bytes.len() <= ENVELOPE_BYTES_MAX, "encode keeps its bound");
        let envelope = Envelope::decode(&bytes).map_err(SendError::Encode)?;
        // What is delivered is what was sent: the decoded envelope encodes back to
        // the same bytes (checked in tests and debug builds; it costs an encode).
        debug_assert_eq!(envelope.encode().ok().as_deref(), Some(bytes.as_slice()));
        let tx = self
            .network
            .nodes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&to)
            .cloned()
            .ok_or(SendError::Unreachable(to))?;
        tx.try_send(Incoming {
            from: self.local,
            envelope,
        })
        .map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => SendError::Backpressure(to),
            mpsc::error::TrySendError::Closed(_) => SendError::Unreachable(to),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use conclave_actors::actor::{ActorKey, ActorKind, ActorRef};
    use conclave_actors::wire::WireError;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Bytes(Vec<u8>);

    impl WireMessage for Bytes {}

    fn envelope(from: NodeId, to: NodeId, msg: Vec<u8>) -> Envelope<Bytes> {
        Envelope {
            from: ActorRef::new(from, ActorKind(1), ActorKey::Unit),
            to: ActorRef::new(to, ActorKind(1), ActorKey::Unit),
            msg: Bytes(msg),
        }
    }

    #[test]
    fn delivers_attributed_to_the_sender_and_reports_backpressure() {
        let net = MemNetwork::<Bytes>::new();
        let a = NodeId([1; 32]);
        let b = NodeId([2; 32]);
        let (ta, _ra) = net.join(a);
        let (_tb, mut rb) = net.join(b);
        ta.send(b, &envelope(a, b, vec![1, 2, 3])).expect("send");
        let got = rb.try_recv().expect("delivered");
        assert_eq!(got.from, a);
        assert_eq!(got.envelope.msg, Bytes(vec![1, 2, 3]));

        for _ in 0..MEM_QUEUE_DEPTH_MAX {
            ta.send(b, &envelope(a, b, vec![0])).expect("within depth");
        }
        assert_eq!(
            ta.send(b, &envelope(a, b, vec![0])),
            Err(SendError::Backpressure(b))
        );
        let c = NodeId([3; 32]);
        assert_eq!(
            ta.send(c, &envelope(a, c, vec![0])),
            Err(SendError::Unreachable(c))
        );
        assert!(matches!(
            ta.send(b, &envelope(a, b, vec![0; ENVELOPE_BYTES_MAX])),
            Err(SendError::Encode(WireError::TooLarge { .. }))
        ));
        net.leave(b);
        assert_eq!(
            ta.send(b, &envelope(a, b, vec![0])),
            Err(SendError::Unreachable(b))
        );
    }
}

//! The in-memory transport: nodes in one process, joined through a [`MemNetwork`].

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use conclave_actors::wire::ENVELOPE_BYTES_MAX;
use conclave_actors::NodeId;
use tokio::sync::mpsc;

use crate::{Incoming, SendError, Transport};

/// How many messages may wait for a receiving node before senders see backpressure.
pub const MEM_QUEUE_DEPTH_MAX: usize = 1024;

/// A hub that connects in-process nodes by id.
#[derive(Clone, Default)]
pub struct MemNetwork {
    nodes: Arc<Mutex<BTreeMap<NodeId, mpsc::Sender<Incoming>>>>,
}

impl MemNetwork {
    /// An empty network.
    pub fn new() -> Self {
        Self::default()
    }

    /// Attaches `node`, replacing any earlier attachment of the same id (a restart),
    /// and returns its transport and the receiver of what is sent to it.
    pub fn join(&self, node: NodeId) -> (MemTransport, mpsc::Receiver<Incoming>) {
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
#[derive(Clone)]
pub struct MemTransport {
    local: NodeId,
    network: MemNetwork,
}

impl Transport for MemTransport {
    fn local_id(&self) -> NodeId {
        self.local
    }

    fn send(&self, to: NodeId, bytes: Vec<u8>) -> Result<(), SendError> {
        if bytes.len() > ENVELOPE_BYTES_MAX {
            return Err(SendError::TooLarge {
                len: bytes.len(),
                max: ENVELOPE_BYTES_MAX,
            });
        }
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
            bytes,
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

    #[test]
    fn delivers_attributed_to_the_sender_and_reports_backpressure() {
        let net = MemNetwork::new();
        let a = NodeId([1; 32]);
        let b = NodeId([2; 32]);
        let (ta, _ra) = net.join(a);
        let (_tb, mut rb) = net.join(b);
        ta.send(b, vec![1, 2, 3]).expect("send");
        let got = rb.try_recv().expect("delivered");
        assert_eq!(got.from, a);
        assert_eq!(got.bytes, vec![1, 2, 3]);

        for _ in 0..MEM_QUEUE_DEPTH_MAX {
            ta.send(b, vec![0]).expect("within depth");
        }
        assert_eq!(ta.send(b, vec![0]), Err(SendError::Backpressure(b)));
        assert_eq!(
            ta.send(NodeId([3; 32]), vec![0]),
            Err(SendError::Unreachable(NodeId([3; 32])))
        );
        assert!(matches!(
            ta.send(b, vec![0; ENVELOPE_BYTES_MAX + 1]),
            Err(SendError::TooLarge { .. })
        ));
        net.leave(b);
        assert_eq!(ta.send(b, vec![0]), Err(SendError::Unreachable(b)));
    }
}

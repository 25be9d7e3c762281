//! Transports carry encoded envelopes between nodes.
//!
//! A [`Transport`] sends bytes to a [`NodeId`] and delivers what arrives as
//! [`Incoming`], attributed to the peer the transport authenticated: the runtime
//! trusts that attribution, never a sender named inside a message. This crate holds
//! the abstraction and the in-memory transport used by tests; the QUIC transport
//! joins it later.
#![warn(missing_docs)]

pub mod mem;

use conclave_actors::NodeId;

/// One encoded envelope received from an authenticated peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incoming {
    /// The peer that sent it, as the transport authenticated it.
    pub from: NodeId,
    /// The encoded envelope.
    pub bytes: Vec<u8>,
}

/// Why a send was refused. A refused send was not queued: the caller keeps the
/// message (the durable outbox retries it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// No route to that node: it is not a known peer, or it is gone.
    #[error("node {0} is unreachable")]
    Unreachable(NodeId),
    /// The send queue towards that node is full: back off and retry.
    #[error("send queue to node {0} is full (backpressure)")]
    Backpressure(NodeId),
    /// The message is larger than the transport carries.
    #[error("message of {len} bytes exceeds the transport limit of {max}")]
    TooLarge {
        /// Bytes offered.
        len: usize,
        /// The limit.
        max: usize,
    },
}

/// Sends encoded envelopes to other nodes. Sending never blocks: a full queue is a
/// [`SendError::Backpressure`], never unbounded growth.
pub trait Transport: Send + Sync + 'static {
    /// This node.
    fn local_id(&self) -> NodeId;
    /// Queues `bytes` for delivery to `to`.
    fn send(&self, to: NodeId, bytes: Vec<u8>) -> Result<(), SendError>;
}

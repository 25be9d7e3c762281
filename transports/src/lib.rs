//! Transports carry envelopes between nodes.
//!
//! A [`Transport`] sends a typed [`Envelope`] to a [`NodeId`] and delivers what
//! arrives as [`Incoming`], attributed to the peer the transport authenticated: the
//! runtime trusts that attribution, never a sender named inside a message. This
//! crate holds the abstraction, [`mem`] (the in-process transport for tests),
//! [`quic`] (quinn + rustls, mutually authenticated by Ed25519 identities) and
//! [`framing`], the one length-prefixed codec of conclave's streams, which the
//! client protocol uses too; and [`throttle`], the rate limit of log lines a
//! hostile peer could trigger at will.
#![warn(missing_docs)]

pub mod framing;
pub mod mem;
pub mod quic;
pub mod throttle;

use core::fmt;

use conclave_actors::wire::{Envelope, WireError};
pub use conclave_actors::wire::{MessageClass, WireMessage};
use conclave_actors::NodeId;

/// One envelope received from an authenticated peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incoming<M> {
    /// The peer that sent it, as the transport authenticated it.
    pub from: NodeId,
    /// The envelope.
    pub envelope: Envelope<M>,
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
    /// The envelope does not encode, or is larger than the wire allows.
    #[error("envelope does not encode: {0}")]
    Encode(WireError),
    /// The transport has shut down.
    #[error("the transport has shut down")]
    Closed,
}

/// Sends envelopes to other nodes. Sending never blocks: a full queue is a
/// [`SendError::Backpressure`], never unbounded growth.
pub trait Transport<M>: Send + Sync + 'static {
    /// This node.
    fn local_id(&self) -> NodeId;
    /// Queues `envelope` for delivery to `to`.
    fn send(&self, to: NodeId, envelope: &Envelope<M>) -> Result<(), SendError>;
}

/// Why a connection was refused or closed during authentication. Each is logged,
/// sent to the other side as the close reason, surfaced as a [`TransportEvent`] and
/// counted in `conclave_transport_auth_failures_total{reason}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AuthFailure {
    /// The peer's identity is not among the known peers.
    UnknownPeer,
    /// The peer's identity was revoked.
    RevokedPeer,
    /// The dialer reached a different identity than the one it dialed.
    IdentityMismatch,
    /// The peer presented no usable Ed25519 identity, or failed to prove it holds it.
    BadCertificate,
    /// The peer speaks another protocol version (ALPN).
    ProtocolVersion,
}

impl AuthFailure {
    /// Every reason, for tests and metrics.
    pub const ALL: [AuthFailure; 5] = [
        AuthFailure::UnknownPeer,
        AuthFailure::RevokedPeer,
        AuthFailure::IdentityMismatch,
        AuthFailure::BadCertificate,
        AuthFailure::ProtocolVersion,
    ];

    /// The reason as it appears in logs, close frames and metric labels.
    pub const fn as_str(self) -> &'static str {
        match self {
            AuthFailure::UnknownPeer => "unknown_peer",
            AuthFailure::RevokedPeer => "revoked_peer",
            AuthFailure::IdentityMismatch => "identity_mismatch",
            AuthFailure::BadCertificate => "bad_certificate",
            AuthFailure::ProtocolVersion => "protocol_version",
        }
    }
}

impl fmt::Display for AuthFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which side of a connection decided a failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// This node refused the peer.
    Local,
    /// The peer refused this node (and said why in its close reason).
    Remote,
}

/// Something that happened to a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TransportEvent {
    /// An authenticated connection to `peer` is up.
    Connected {
        /// The peer.
        peer: NodeId,
    },
    /// The connection to `peer` went down.
    Disconnected {
        /// The peer.
        peer: NodeId,
        /// Why, as text (the close reason, or the error).
        reason: String,
    },
    /// Authentication failed.
    AuthFailed {
        /// The peer's identity, when it got far enough to present one.
        peer: Option<NodeId>,
        /// The peer's address.
        addr: std::net::SocketAddr,
        /// Why.
        reason: AuthFailure,
        /// Who decided.
        side: Side,
    },
}

//! The QUIC transport: quinn + rustls, mutually authenticated by Ed25519 identities.
//!
//! One connection per peer pair. Each side sends on two long-lived unidirectional
//! streams, one per [`MessageClass`], so a large transfer never holds up control
//! messages. A stream carries frames of the [`crate::framing`] codec (a 4-byte
//! big-endian length, then that many bytes of encoded [`Envelope`], at most
//! [`ENVELOPE_BYTES_MAX`]), so however the bytes arrive they reassemble. An
//! oversized, truncated or undecodable frame closes the connection with a reason
//! (`frame_too_large`, `malformed_frame`). Every peer has a bounded send queue: when it is full, [`Transport::send`]
//! reports backpressure.
//!
//! Authentication (see [`tls`]): the handshake proves each side holds the Ed25519
//! key it presents; right after it, the acceptor refuses revoked and unknown keys and
//! the dialer refuses a key other than the one it dialed, each closing the
//! connection with an application code and reason text that the other side reports
//! as well. A peer of another protocol version fails in the handshake (ALPN). A
//! connection is used, and reported connected, only once both sides have accepted
//! each other: each sends a hello stream after its own checks pass.
//!
//! Order is kept per class within a connection. When a connection is replaced (a
//! reconnect, or the simultaneous-dial tie-break), messages written just before may
//! arrive after some written on the new one; restoring order across connections,
//! and resending what a lost connection swallowed, is the durable outbox's job.

mod cid;
pub mod tls;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use conclave_actors::wire::{
    Envelope, MessageClass, WireMessage, ENVELOPE_BYTES_MAX, WIRE_VERSION,
};
use conclave_actors::{Identity, NodeId};
use quinn::{ConnectionError, VarInt};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use crate::framing::{self, FrameError, FRAME_PREFIX_BYTES};
use crate::throttle::Throttle;
use crate::{AuthFailure, Incoming, SendError, Side, Transport, TransportEvent};

/// Application close codes. Auth failures first, then framing, then lifecycle.
mod code {
    pub const UNKNOWN_PEER: u32 = 0x10;
    pub const REVOKED_PEER: u32 = 0x11;
    pub const IDENTITY_MISMATCH: u32 = 0x12;
    pub const BAD_CERTIFICATE: u32 = 0x13;
    pub const PROTOCOL_VERSION: u32 = 0x14;
    pub const FRAME_TOO_LARGE: u32 = 0x20;
    pub const MALFORMED_FRAME: u32 = 0x21;
    pub const NO_HELLO: u32 = 0x22;
    pub const STREAM_ERROR: u32 = 0x23;
    pub const DUPLICATE_CONNECTION: u32 = 0x30;
    pub const SHUTDOWN: u32 = 0x31;
}

/// TLS alerts (RFC 8446 §6) that mean the peer's identity was refused, including
/// `certificate_required` (116), sent to a client that offered no certificate.
const CERTIFICATE_ALERTS: [u8; 10] = [40, 42, 43, 44, 45, 46, 48, 51, 110, 116];

/// QUIC version 1 (RFC 9000), the only version spoken: quinn also offers drafts
/// 29–34 unless told otherwise.
const QUIC_V1: u32 = 1;

/// The shortest time between two stateless resets a node sends.
const RESET_INTERVAL_MS_MIN: u64 = 1;

/// The domain tags of the endpoint keys derived from a node's identity.
const RESET_KEY_TAG: &[u8] = b"conclave/quic-stateless-reset/v1";
const CID_KEY_TAG: &[u8] = b"conclave/quic-connection-id/v1";

/// SHA-256 of `tag` and `identity`'s Ed25519 secret: a key only this identity can
/// derive, that reveals nothing of the secret.
fn derived_key(identity: &Identity, tag: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    let mut hash = sha2::Sha256::new();
    hash.update(tag);
    hash.update(identity.signing_key().to_bytes());
    hash.finalize().into()
}

/// An endpoint on `addr` that speaks QUIC version 1 only (a client offering a draft
/// gets a version negotiation listing only it), serving `server` if given.
///
/// A server's stateless-reset key and connection-id key are derived from its
/// identity, so that a restarted node recognises the connection ids of its
/// previous run and resets those connections at their first packet: their clients
/// reconnect at once instead of waiting for the idle timeout.
fn bind(
    addr: SocketAddr,
    server: Option<(quinn::ServerConfig, &Identity)>,
) -> std::io::Result<quinn::Endpoint> {
    let mut endpoint = quinn::EndpointConfig::default();
    let server = server.map(|(config, identity)| {
        let reset = derived_key(identity, RESET_KEY_TAG);
        endpoint.reset_key(Arc::new(ring::hmac::Key::new(
            ring::hmac::HMAC_SHA256,
            &reset,
        )));
        let cid = derived_key(identity, CID_KEY_TAG);
        endpoint.cid_generator(move || Box::new(cid::SignedCids::new(&cid)));
        // Every packet of a previous run's connection may be answered (resets are
        // always smaller than what prompts them): after a restart, all of its
        // clients learn at once, not 50 a second (quinn's default is 20 ms).
        endpoint.min_reset_interval(Duration::from_millis(RESET_INTERVAL_MS_MIN));
        config
    });
    endpoint.supported_versions(vec![QUIC_V1]);
    let socket = std::net::UdpSocket::bind(addr)?;
    quinn::Endpoint::new(endpoint, server, socket, Arc::new(quinn::TokioRuntime))
}

/// TLS alerts that mean the peers speak different protocol versions.
const VERSION_ALERTS: [u8; 2] = [70, 120];

fn close_code(reason: AuthFailure) -> u32 {
    match reason {
        AuthFailure::UnknownPeer => code::UNKNOWN_PEER,
        AuthFailure::RevokedPeer => code::REVOKED_PEER,
        AuthFailure::IdentityMismatch => code::IDENTITY_MISMATCH,
        AuthFailure::BadCertificate => code::BAD_CERTIFICATE,
        AuthFailure::ProtocolVersion => code::PROTOCOL_VERSION,
    }
}

/// The authentication failure a connection error stands for, and which side
/// decided it; `None` for errors that are not about authentication.
pub fn auth_failure_of(error: &ConnectionError) -> Option<(AuthFailure, Side)> {
    fn from_alert(code: u64) -> Option<AuthFailure> {
        // QUIC carries a TLS alert as the transport error 0x100 + alert.
        let alert = u8::try_from(code.checked_sub(0x100)?).ok()?;
        if VERSION_ALERTS.contains(&alert) {
            Some(AuthFailure::ProtocolVersion)
        } else if CERTIFICATE_ALERTS.contains(&alert) {
            Some(AuthFailure::BadCertificate)
        } else {
            None
        }
    }
    match error {
        ConnectionError::TransportError(e) => {
            from_alert(u64::from(e.code)).map(|r| (r, Side::Local))
        }
        ConnectionError::ConnectionClosed(close) => {
            from_alert(u64::from(close.error_code)).map(|r| (r, Side::Remote))
        }
        ConnectionError::ApplicationClosed(close) => {
            let reason = match u32::try_from(close.error_code.into_inner()).ok()? {
                code::UNKNOWN_PEER => AuthFailure::UnknownPeer,
                code::REVOKED_PEER => AuthFailure::RevokedPeer,
                code::IDENTITY_MISMATCH => AuthFailure::IdentityMismatch,
                code::BAD_CERTIFICATE => AuthFailure::BadCertificate,
                code::PROTOCOL_VERSION => AuthFailure::ProtocolVersion,
                _ => return None,
            };
            Some((reason, Side::Remote))
        }
        _ => None,
    }
}

/// How a QUIC transport is set up.
#[derive(Clone, Debug)]
pub struct QuicConfig {
    /// This node's identity; its Ed25519 key is what peers authenticate.
    pub identity: Identity,
    /// The UDP address to listen on.
    pub listen: SocketAddr,
    /// The known peers and where to reach them. Only these may connect.
    pub peers: BTreeMap<NodeId, SocketAddr>,
    /// Peers whose identity was revoked: refused with `revoked_peer`.
    pub revoked: BTreeSet<NodeId>,
    /// Envelopes that may wait per peer before `send` reports backpressure.
    pub send_queue_depth_max: usize,
    /// Received envelopes that may wait for the runtime before reading pauses (QUIC
    /// flow control then slows the sender).
    pub incoming_depth_max: usize,
    /// A connection with no traffic for this long is closed.
    pub idle_timeout: Duration,
    /// Keep-alives are sent this often, below the idle timeout.
    pub keep_alive: Duration,
    /// First reconnect delay; it doubles per failure, with full jitter.
    pub reconnect_delay_min: Duration,
    /// The largest reconnect delay.
    pub reconnect_delay_max: Duration,
    /// The wire version announced in ALPN. Tests change it; nothing else should.
    pub protocol_version: u8,
    /// Whether users' clients may connect (ALPN `conclave-client/{version}`). Their
    /// connections are handed over on [`QuicChannels::clients`]; whom to serve is
    /// the receiver's decision.
    pub accept_clients: bool,
}

/// Default of [`QuicConfig::send_queue_depth_max`].
pub const SEND_QUEUE_DEPTH_MAX_DEFAULT: usize = 1024;
/// Default of [`QuicConfig::incoming_depth_max`].
pub const INCOMING_DEPTH_MAX_DEFAULT: usize = 1024;
/// Default of [`QuicConfig::idle_timeout`], and the idle timeout of a client's
/// connection: a peer that died is noticed after this long without a packet.
pub const IDLE_TIMEOUT_MS_DEFAULT: u64 = 10_000;
/// Default of [`QuicConfig::keep_alive`]: well below
/// the idle timeout, so that two lost keep-alives do not end a healthy connection.
pub const KEEP_ALIVE_MS_DEFAULT: u64 = 3_000;
/// How often a user's client sends a keep-alive when it has nothing else to send:
/// often, so that a node restarted after a crash resets the client's connection
/// within about this long, and so that a node can tell a live client from a
/// vanished one (see `CLIENT_SILENCE_MS_MAX` in the node's client protocol).
pub const CLIENT_KEEP_ALIVE_MS: u64 = 1_000;
/// Default of [`QuicConfig::reconnect_delay_min`].
pub const RECONNECT_DELAY_MS_MIN_DEFAULT: u64 = 50;
/// Default of [`QuicConfig::reconnect_delay_max`].
pub const RECONNECT_DELAY_MS_MAX_DEFAULT: u64 = 5_000;

impl QuicConfig {
    /// A configuration with the default limits.
    pub fn new(identity: Identity, listen: SocketAddr) -> Self {
        Self {
            identity,
            listen,
            peers: BTreeMap::new(),
            revoked: BTreeSet::new(),
            send_queue_depth_max: SEND_QUEUE_DEPTH_MAX_DEFAULT,
            incoming_depth_max: INCOMING_DEPTH_MAX_DEFAULT,
            idle_timeout: Duration::from_millis(IDLE_TIMEOUT_MS_DEFAULT),
            keep_alive: Duration::from_millis(KEEP_ALIVE_MS_DEFAULT),
            reconnect_delay_min: Duration::from_millis(RECONNECT_DELAY_MS_MIN_DEFAULT),
            reconnect_delay_max: Duration::from_millis(RECONNECT_DELAY_MS_MAX_DEFAULT),
            protocol_version: WIRE_VERSION,
            accept_clients: false,
        }
    }
}

/// Why the transport did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// TLS could not be configured.
    #[error(transparent)]
    Tls(#[from] tls::TlsSetupError),
    /// The UDP socket could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// The keep-alive is not below the idle timeout, or a limit is zero.
    #[error("invalid configuration: {0}")]
    Config(&'static str),
}

/// What a started transport hands back besides itself.
pub struct QuicChannels<M> {
    /// Envelopes received from authenticated peers.
    pub incoming: mpsc::Receiver<Incoming<M>>,
    /// Connection events. Bounded: when nobody reads them, new ones are dropped
    /// (and still logged and counted).
    pub events: mpsc::Receiver<TransportEvent>,
    /// Connections of users' clients (only with [`QuicConfig::accept_clients`]).
    pub clients: mpsc::Receiver<ClientConnection>,
}

/// A client's connection, after a handshake that proved it holds `user`'s key.
/// The transport has not authorized it: that is the receiver's job, and a refusal
/// should close the connection with the reason.
#[derive(Debug)]
pub struct ClientConnection {
    /// The user the client authenticated as (their Ed25519 key).
    pub user: conclave_actors::UserId,
    /// The connection.
    pub conn: quinn::Connection,
}

/// Client connections that may wait for the receiver before new ones are refused.
const CLIENTS_DEPTH_MAX: usize = 64;

/// Why a client could not connect to a node.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// TLS could not be configured.
    #[error(transparent)]
    Tls(#[from] tls::TlsSetupError),
    /// No local socket.
    #[error("cannot open a local UDP socket: {0}")]
    Bind(std::io::Error),
    /// The connection failed or was refused (the node's reason is in the text).
    #[error("{0}")]
    Connection(String),
    /// The node presented another identity than expected.
    #[error("the node at {addr} is {got}, not the expected {expected}")]
    IdentityMismatch {
        /// Its address.
        addr: SocketAddr,
        /// Whom it proved to be.
        got: NodeId,
        /// Whom we expected.
        expected: NodeId,
    },
}

/// A user's connection to a node over the client protocol.
pub struct ClientLink {
    /// The local endpoint (kept for the connection's lifetime).
    pub endpoint: quinn::Endpoint,
    /// The connection.
    pub conn: quinn::Connection,
    /// The node it reached.
    pub node: NodeId,
}

/// Connects to the node at `addr` as `identity` over the client protocol; checks
/// the node is `expected` when given.
pub async fn connect_client(
    identity: &Identity,
    addr: SocketAddr,
    expected: Option<NodeId>,
) -> Result<ClientLink, ConnectError> {
    let provider = tls::crypto_provider();
    let key = tls::certified_key(identity, &provider)?;
    let mut client =
        quinn::ClientConfig::new(tls::client_crypto(key, tls::client_alpn(WIRE_VERSION))?);
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(Duration::from_millis(CLIENT_KEEP_ALIVE_MS)));
    transport.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(Duration::from_millis(IDLE_TIMEOUT_MS_DEFAULT))
            .map_err(|e| ConnectError::Connection(e.to_string()))?,
    ));
    client.transport_config(Arc::new(transport));
    let local: SocketAddr = if addr.is_ipv6() {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let endpoint = bind(local, None).map_err(ConnectError::Bind)?;
    let conn = endpoint
        .connect_with(client, addr, "conclave")
        .map_err(|e| ConnectError::Connection(e.to_string()))?
        .await
        .map_err(|e| ConnectError::Connection(e.to_string()))?;
    let Some(node) = tls::peer_node_id(&conn) else {
        conn.close(VarInt::from_u32(code::BAD_CERTIFICATE), b"bad_certificate");
        return Err(ConnectError::Connection(
            "the node presented no usable identity".into(),
        ));
    };
    if let Some(expected) = expected {
        if node != expected {
            conn.close(
                VarInt::from_u32(code::IDENTITY_MISMATCH),
                b"identity_mismatch",
            );
            return Err(ConnectError::IdentityMismatch {
                addr,
                got: node,
                expected,
            });
        }
    }
    Ok(ClientLink {
        endpoint,
        conn,
        node,
    })
}

/// Events that may wait before new ones are dropped.
const EVENTS_DEPTH_MAX: usize = 1024;

/// Handshakes that may be in progress at once: enough for a cluster and its
/// clients, not a flood. Past it, new ones are dropped unanswered (no state is
/// kept and nothing is sent back, so a spoofed source reflects nothing). Each
/// costs the node ~31 KB until it ends.
pub const HANDSHAKES_IN_FLIGHT_MAX: usize = 256;
/// Handshakes in progress past which a new client must first prove it owns its
/// address with a QUIC Retry (one stateless round trip): a flood from spoofed
/// sources then costs one small packet each and no state.
pub const HANDSHAKES_BEFORE_RETRY: usize = 16;
/// Admitted handshakes from one IP address that may be in progress at once, counted
/// apart for addresses a Retry proved and for the others (so a spoofer of an
/// address cannot use up what its owner gets once proven). Past it, an unproven
/// address is asked for a Retry and a proven one is dropped unanswered: one
/// address cannot take every slot of [`HANDSHAKES_IN_FLIGHT_MAX`].
pub const HANDSHAKES_PER_ADDRESS_MAX: usize = 32;
/// How long a handshake may take before it is abandoned (quinn's own limit is the
/// idle timeout, 10 s).
pub const HANDSHAKE_WAIT_MS_MAX: u64 = 3_000;
/// Incoming connections quinn may hold before the accept loop sees them.
const INCOMING_HANDSHAKES_MAX: usize = HANDSHAKES_IN_FLIGHT_MAX;
/// Authorized connections from one peer that may wait for its task.
const ACCEPTED_DEPTH_MAX: usize = 2;
/// The largest reconnect delay a configuration may ask for (one hour).
const RECONNECT_DELAY_MS_CEILING: u64 = 3_600_000;
/// How long each side waits for the other's hello after the handshake.
const HELLO_WAIT_MS_MAX: u64 = 5_000;
/// How long a failed hello exchange waits for the peer's close reason (its refusal,
/// if it refused us) before closing with `no_hello`.
const CLOSE_REASON_WAIT_MS_MAX: u64 = 200;
/// How long a connection that lost the simultaneous-dial tie-break may take to drain.
const RETIRE_WAIT_MS_MAX: u64 = 5_000;
/// What one connection may make this node hold: streams the other side may have
/// open at once, the bytes it may send ahead of what the node has read (the
/// connection's receive window) and the bytes the node keeps unacknowledged for it
/// (its send window).
#[derive(Clone, Copy, Debug)]
struct Allowance {
    uni_streams: u32,
    bidi_streams: u32,
    receive_window_bytes: u32,
    send_window_bytes: u64,
}

/// A peer node: a hello and one unidirectional stream per message class, with
/// room to reopen one; no bidirectional stream; windows well above its four
/// streams' (quinn's default stream window is 1.25 MB).
const PEER_ALLOWANCE: Allowance = Allowance {
    uni_streams: 4,
    bidi_streams: 0,
    receive_window_bytes: 16 << 20,
    send_window_bytes: 16 << 20,
};

/// A user's client: requests on bidirectional streams only (one per request), and
/// small windows, so that a user's connections pin little of the node (the node
/// also bounds the request bytes it holds for all clients together).
pub const CLIENT_STREAMS_MAX: u32 = 32;
/// See [`CLIENT_STREAMS_MAX`].
pub const CLIENT_RECEIVE_WINDOW_BYTES: u32 = 2 << 20;
/// See [`CLIENT_STREAMS_MAX`].
pub const CLIENT_SEND_WINDOW_BYTES: u64 = 2 << 20;
const CLIENT_ALLOWANCE: Allowance = Allowance {
    uni_streams: 0,
    bidi_streams: CLIENT_STREAMS_MAX,
    receive_window_bytes: CLIENT_RECEIVE_WINDOW_BYTES,
    send_window_bytes: CLIENT_SEND_WINDOW_BYTES,
};

/// Grants a client connection the node decided to serve its streams and windows
/// ([`CLIENT_STREAMS_MAX`], [`CLIENT_RECEIVE_WINDOW_BYTES`],
/// [`CLIENT_SEND_WINDOW_BYTES`]); before this, it may open none.
pub fn grant_client_allowance(conn: &quinn::Connection) {
    CLIENT_ALLOWANCE.grant(conn);
}

impl Allowance {
    /// What an accepted connection is allowed before it is known to be a peer
    /// or a client (streams need the handshake done, so: none), and its first
    /// receive window, a client's.
    fn handshaking() -> Self {
        Self {
            uni_streams: 0,
            bidi_streams: 0,
            ..CLIENT_ALLOWANCE
        }
    }

    /// Grants this allowance on `conn` (streams and windows only grow for peers;
    /// for clients, streams grow and the send window shrinks).
    fn grant(self, conn: &quinn::Connection) {
        conn.set_max_concurrent_uni_streams(VarInt::from_u32(self.uni_streams));
        conn.set_max_concurrent_bi_streams(VarInt::from_u32(self.bidi_streams));
        conn.set_receive_window(VarInt::from_u32(self.receive_window_bytes));
        conn.set_send_window(self.send_window_bytes);
    }

    /// Sets this allowance as `transport`'s initial one.
    fn configure(self, transport: &mut quinn::TransportConfig) {
        transport
            .max_concurrent_uni_streams(VarInt::from_u32(self.uni_streams))
            .max_concurrent_bidi_streams(VarInt::from_u32(self.bidi_streams))
            .receive_window(VarInt::from_u32(self.receive_window_bytes))
            .send_window(self.send_window_bytes);
    }
}
/// A hello: its stream kind, then the sender's boot id (u64, big-endian).
const HELLO_BYTES: usize = 1 + 8;
/// The most queued messages a writer puts on its stream in one vectored write.
const WRITE_BATCH_MESSAGES_MAX: usize = 64;
/// The most bytes it puts there in one write (beyond the first message, which
/// always goes).
const WRITE_BATCH_BYTES_MAX: usize = 1 << 20;

/// The first byte of every unidirectional stream says what it carries.
mod kind {
    /// "I accept you": sent once, after this side's own checks passed, followed by
    /// the sender's boot id (u64, big-endian), which changes at every start
    /// ([`super::HELLO_BYTES`] in all).
    pub const HELLO: u8 = 0;
    /// Frames of control messages.
    pub const CONTROL: u8 = 1;
    /// Frames of data messages.
    pub const DATA: u8 = 2;
}

struct Outgoing {
    bytes: Vec<u8>,
}

/// A connection both sides have accepted.
struct Authorized {
    conn: quinn::Connection,
    dialed_by: NodeId,
    /// The peer's boot id, from its hello: it changes when the peer restarts.
    remote_boot: u64,
}

struct PeerHandle {
    control: mpsc::Sender<Outgoing>,
    data: mpsc::Sender<Outgoing>,
    accepted: mpsc::Sender<Authorized>,
}

struct Shared<M> {
    local: NodeId,
    /// Random per start: peers tell a restarted node's connection from a stale one.
    boot: u64,
    endpoint: quinn::Endpoint,
    client: quinn::ClientConfig,
    peers: BTreeMap<NodeId, PeerHandle>,
    revoked: BTreeSet<NodeId>,
    incoming: mpsc::Sender<Incoming<M>>,
    events: mpsc::Sender<TransportEvent>,
    clients: mpsc::Sender<ClientConnection>,
    client_alpn: Vec<u8>,
    reconnect_delay_min: Duration,
    reconnect_delay_max: Duration,
    /// Set once by `shutdown`: every task then ends, releasing the endpoint.
    stop: watch::Sender<bool>,
    /// The long-lived tasks, awaited by `shutdown`.
    tasks: Mutex<JoinSet<()>>,
}

/// The QUIC transport. Cheap to clone; [`QuicTransport::shutdown`] closes it.
pub struct QuicTransport<M> {
    shared: Arc<Shared<M>>,
}

impl<M> Clone for QuicTransport<M> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<M: WireMessage> QuicTransport<M> {
    /// Binds the endpoint and starts accepting and dialing. Must be called within a
    /// tokio runtime, which then runs the transport's tasks.
    pub fn start(config: QuicConfig) -> Result<(Self, QuicChannels<M>), StartError> {
        check_config(&config)?;
        let (server, client, client_alpn) = endpoint_configs(&config)?;
        let endpoint = bind(config.listen, Some((server, &config.identity))).map_err(|source| {
            StartError::Bind {
                addr: config.listen,
                source,
            }
        })?;
        let (incoming_tx, incoming_rx) = mpsc::channel(config.incoming_depth_max);
        let (events_tx, events_rx) = mpsc::channel(EVENTS_DEPTH_MAX);
        let (clients_tx, clients_rx) = mpsc::channel(CLIENTS_DEPTH_MAX);
        let (peers, per_peer) = peer_queues(&config);
        let mut boot = [0u8; 8];
        getrandom::fill(&mut boot)
            .map_err(|_| StartError::Config("no OS entropy for the boot id"))?;
        let shared = Arc::new(Shared {
            local: config.identity.node_id(),
            boot: u64::from_be_bytes(boot),
            endpoint,
            client,
            peers,
            revoked: config.revoked,
            incoming: incoming_tx,
            events: events_tx,
            clients: clients_tx,
            client_alpn,
            reconnect_delay_min: config.reconnect_delay_min,
            reconnect_delay_max: config.reconnect_delay_max,
            stop: watch::Sender::new(false),
            tasks: Mutex::new(JoinSet::new()),
        });
        for (peer, addr, control_rx, data_rx, accepted_rx) in per_peer {
            let (link_tx, link_rx) = watch::channel(None);
            shared.spawn(run_peer(
                Arc::clone(&shared),
                peer,
                addr,
                accepted_rx,
                link_tx,
            ));
            shared.spawn(run_writer(kind::CONTROL, control_rx, link_rx.clone()));
            shared.spawn(run_writer(kind::DATA, data_rx, link_rx));
        }
        shared.spawn(accept_loop(Arc::clone(&shared)));
        Ok((
            Self { shared },
            QuicChannels {
                incoming: incoming_rx,
                events: events_rx,
                clients: clients_rx,
            },
        ))
    }
}

/// Refuses a configuration the transport cannot keep its promises with.
fn check_config(config: &QuicConfig) -> Result<(), StartError> {
    if config.keep_alive.is_zero() || config.keep_alive >= config.idle_timeout {
        return Err(StartError::Config(
            "keep_alive must be above zero and below idle_timeout",
        ));
    }
    if config.send_queue_depth_max == 0 || config.incoming_depth_max == 0 {
        return Err(StartError::Config("queue depths must be at least 1"));
    }
    if config.reconnect_delay_min.is_zero()
        || config.reconnect_delay_min > config.reconnect_delay_max
        || config.reconnect_delay_max > Duration::from_millis(RECONNECT_DELAY_MS_CEILING)
    {
        return Err(StartError::Config(
            "reconnect delays must satisfy 0 < min <= max <= 1 hour",
        ));
    }
    Ok(())
}

/// The receiving ends of one peer's queues, for its tasks.
type PeerReceivers = (
    NodeId,
    SocketAddr,
    mpsc::Receiver<Outgoing>,
    mpsc::Receiver<Outgoing>,
    mpsc::Receiver<Authorized>,
);

/// The server and client TLS/QUIC configurations, and the clients' ALPN.
fn endpoint_configs(
    config: &QuicConfig,
) -> Result<(quinn::ServerConfig, quinn::ClientConfig, Vec<u8>), StartError> {
    let provider = tls::crypto_provider();
    let key = tls::certified_key(&config.identity, &provider)?;
    let alpn = tls::alpn(config.protocol_version);
    let client_alpn = tls::client_alpn(config.protocol_version);
    let mut alpns = vec![alpn.clone()];
    if config.accept_clients {
        alpns.push(client_alpn.clone());
    }
    // Whoever connects gets nothing until it is known to be a peer or a client
    // (accept_one then grants that allowance); connections this node dials are
    // to peers.
    let mut accepting = transport_config(config)?;
    Allowance::handshaking().configure(&mut accepting);
    let mut server = quinn::ServerConfig::with_crypto(tls::server_crypto(Arc::clone(&key), alpns)?);
    server.transport_config(Arc::new(accepting));
    server.max_incoming(INCOMING_HANDSHAKES_MAX);
    let mut dialing = transport_config(config)?;
    PEER_ALLOWANCE.configure(&mut dialing);
    let mut client = quinn::ClientConfig::new(tls::client_crypto(key, alpn)?);
    client.transport_config(Arc::new(dialing));
    Ok((server, client, client_alpn))
}

/// One bounded queue per class and peer, and the accepted-connection hand-off,
/// for every known peer but this node and revoked ones.
fn peer_queues(config: &QuicConfig) -> (BTreeMap<NodeId, PeerHandle>, Vec<PeerReceivers>) {
    let local = config.identity.node_id();
    let mut peers = BTreeMap::new();
    let mut per_peer = Vec::new();
    for (&peer, &addr) in &config.peers {
        // Nobody dials itself, or a peer it has revoked.
        if peer == local || config.revoked.contains(&peer) {
            continue;
        }
        let (control, control_rx) = mpsc::channel(config.send_queue_depth_max);
        let (data, data_rx) = mpsc::channel(config.send_queue_depth_max);
        let (accepted, accepted_rx) = mpsc::channel(ACCEPTED_DEPTH_MAX);
        let handle = PeerHandle {
            control,
            data,
            accepted,
        };
        peers.insert(peer, handle);
        per_peer.push((peer, addr, control_rx, data_rx, accepted_rx));
    }
    assert!(
        !peers.contains_key(&local) && peers.keys().all(|p| !config.revoked.contains(p)),
        "nobody dials itself or a revoked peer"
    );
    (peers, per_peer)
}

impl<M: WireMessage> QuicTransport<M> {
    /// The address the endpoint is bound to.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.shared.endpoint.local_addr()
    }

    /// Closes every connection (telling peers why), ends every task and waits for
    /// them, so the socket is released once the last handle is dropped.
    pub async fn shutdown(&self) {
        self.shared.stop.send_replace(true);
        self.shared
            .endpoint
            .close(VarInt::from_u32(code::SHUTDOWN), b"shutdown");
        // The tasks are fixed at start (three per peer and the accept loop), so this
        // ends once each has seen the stop signal.
        let mut tasks = std::mem::take(
            &mut *self
                .shared
                .tasks
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        while tasks.join_next().await.is_some() {}
        self.shared.endpoint.wait_idle().await;
    }
}

impl<M: WireMessage> Transport<M> for QuicTransport<M> {
    fn local_id(&self) -> NodeId {
        self.shared.local
    }

    fn send(&self, to: NodeId, envelope: &Envelope<M>) -> Result<(), SendError> {
        let peer = self
            .shared
            .peers
            .get(&to)
            .ok_or(SendError::Unreachable(to))?;
        let bytes = envelope.encode().map_err(SendError::Encode)?;
        // The writer frames these bytes against the same bound and cannot refuse them.
        assert!(bytes.len() <= ENVELOPE_BYTES_MAX, "encode keeps its bound");
        assert_eq!(
            bytes.first(),
            Some(&WIRE_VERSION),
            "encode starts with the version"
        );
        let queue = match envelope.msg.class() {
            MessageClass::Control => &peer.control,
            MessageClass::Data => &peer.data,
        };
        queue.try_send(Outgoing { bytes }).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => SendError::Backpressure(to),
            mpsc::error::TrySendError::Closed(_) => SendError::Closed,
        })?;
        metrics::gauge!("conclave_transport_send_queue_depth").increment(1.0);
        Ok(())
    }
}

fn transport_config(config: &QuicConfig) -> Result<quinn::TransportConfig, StartError> {
    let mut transport = quinn::TransportConfig::default();
    let idle = quinn::IdleTimeout::try_from(config.idle_timeout)
        .map_err(|_| StartError::Config("idle_timeout is too large"))?;
    transport
        .max_idle_timeout(Some(idle))
        .keep_alive_interval(Some(config.keep_alive))
        // Datagrams are never used: buffer none.
        .datagram_receive_buffer_size(None);
    Ok(transport)
}

impl<M> Shared<M> {
    /// Runs `task` until it ends or the transport shuts down.
    fn spawn(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        let mut stop = self.stop.subscribe();
        self.tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .spawn(async move {
                tokio::select! {
                    _ = stop.wait_for(|stopped| *stopped) => {}
                    () = task => {}
                }
            });
    }

    fn event(&self, event: TransportEvent) {
        if self.events.try_send(event).is_err() {
            metrics::counter!("conclave_transport_events_dropped_total").increment(1);
        }
    }

    /// Logs (rate-limited), counts and reports an authentication failure.
    fn auth_failed(&self, peer: Option<NodeId>, addr: SocketAddr, reason: AuthFailure, side: Side) {
        static FAILED: Throttle = Throttle::new();
        if let Some(suppressed) = FAILED.admit() {
            tracing::warn!(
                ?peer,
                %addr,
                reason = reason.as_str(),
                side = ?side,
                suppressed,
                "peer authentication failed"
            );
        }
        metrics::counter!("conclave_transport_auth_failures_total", "reason" => reason.as_str())
            .increment(1);
        self.event(TransportEvent::AuthFailed {
            peer,
            addr,
            reason,
            side,
        });
    }

    /// Refuses `conn` for `reason`: the peer receives the code and the reason text.
    fn refuse(&self, conn: &quinn::Connection, peer: Option<NodeId>, reason: AuthFailure) {
        conn.close(
            VarInt::from_u32(close_code(reason)),
            reason.as_str().as_bytes(),
        );
        self.auth_failed(peer, conn.remote_address(), reason, Side::Local);
    }

    /// Reports a failed handshake or a refusal by the peer, if it was about
    /// authentication; returns whether it was.
    fn report_connection_error(
        &self,
        peer: Option<NodeId>,
        addr: SocketAddr,
        error: &ConnectionError,
    ) -> bool {
        match auth_failure_of(error) {
            Some((reason, side)) => {
                self.auth_failed(peer, addr, reason, side);
                true
            }
            None => false,
        }
    }

    /// Reports an incoming handshake that failed: as a node's authentication
    /// failure, or (`client`: it asked for the client protocol) as a client's,
    /// counted in `conclave_client_auth_failures_total{reason}`. Returns whether it
    /// was about authentication.
    fn report_handshake_error(
        &self,
        client: bool,
        addr: SocketAddr,
        error: &ConnectionError,
    ) -> bool {
        static FAILED: Throttle = Throttle::new();
        if !client {
            return self.report_connection_error(None, addr, error);
        }
        let Some((reason, side)) = auth_failure_of(error) else {
            return false;
        };
        if let Some(suppressed) = FAILED.admit() {
            tracing::warn!(%addr, reason = reason.as_str(), side = ?side, suppressed, "client authentication failed");
        }
        metrics::counter!("conclave_client_auth_failures_total", "reason" => reason.as_str())
            .increment(1);
        true
    }

    /// Completes the mutual acceptance on a connection whose handshake finished:
    /// this side sends its hello (its own checks have passed), then waits for the
    /// peer's. A refusal by the peer arrives here as the connection's close reason.
    /// Returns the peer's boot id.
    async fn exchange_hellos(&self, conn: &quinn::Connection, peer: NodeId) -> Result<u64, String> {
        let hello = async {
            let mut out = conn.open_uni().await.map_err(|e| e.to_string())?;
            let mut mine = [0u8; HELLO_BYTES];
            mine[0] = kind::HELLO;
            mine[1..].copy_from_slice(&self.boot.to_be_bytes());
            out.write_all(&mine).await.map_err(|e| e.to_string())?;
            out.finish().map_err(|e| e.to_string())?;
            let mut stream = conn.accept_uni().await.map_err(|e| e.to_string())?;
            let mut theirs = [0u8; HELLO_BYTES];
            stream
                .read_exact(&mut theirs)
                .await
                .map_err(|e| e.to_string())?;
            if theirs[0] == kind::HELLO {
                let mut boot = [0u8; 8];
                boot.copy_from_slice(&theirs[1..]);
                Ok(u64::from_be_bytes(boot))
            } else {
                Err("peer did not start with a hello".to_string())
            }
        };
        let wait = Duration::from_millis(HELLO_WAIT_MS_MAX);
        let result = match tokio::time::timeout(wait, hello).await {
            Ok(result) => result,
            Err(_) => Err("no hello from the peer in time".to_string()),
        };
        if result.is_err() {
            // If the peer refused us, its reason is the close reason: report it.
            let wait = Duration::from_millis(CLOSE_REASON_WAIT_MS_MAX);
            let closed = tokio::time::timeout(wait, conn.closed()).await;
            if let Ok(error) = closed {
                if self.report_connection_error(Some(peer), conn.remote_address(), &error) {
                    return Err(error.to_string());
                }
            }
            conn.close(VarInt::from_u32(code::NO_HELLO), b"no_hello");
        }
        result
    }
}

/// Runs until the endpoint closes (at shutdown). Admits each incoming handshake,
/// asks for a Retry or drops it, by the handshakes in flight.
async fn accept_loop<M: WireMessage>(shared: Arc<Shared<M>>) {
    let in_flight = Arc::new(InFlight::default());
    while let Some(incoming) = shared.endpoint.accept().await {
        let source = (
            incoming.remote_address().ip(),
            incoming.remote_address_validated(),
        );
        let busy = (
            in_flight.total.load(Ordering::SeqCst),
            in_flight.from(source),
        );
        match admission(busy, source.1, incoming.may_retry()) {
            Admission::Drop(reason) => {
                handshake_counted(reason);
                incoming.ignore();
            }
            Admission::Retry => {
                handshake_counted("retry");
                // Only an unvalidated address can fail to be retried: nothing to do.
                let _ = incoming.retry();
            }
            Admission::Admit => {
                let slot = HandshakeSlot::take(&in_flight, source);
                // Short-lived: bounded by HANDSHAKE_WAIT_MS_MAX plus the hello wait.
                tokio::spawn(accept_one(Arc::clone(&shared), incoming, slot));
            }
        }
    }
}

/// What becomes of a new handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Admission {
    /// Ignored unanswered, counted with this label.
    Drop(&'static str),
    /// Asked to prove its address first.
    Retry,
    /// Taken.
    Admit,
}

/// What becomes of a new handshake, given the handshakes in flight `(in all,
/// from its source)`, whether a Retry proved its address, and whether it may be
/// asked for one.
fn admission((total, from_source): (usize, usize), proven: bool, may_retry: bool) -> Admission {
    let crowded = from_source >= HANDSHAKES_PER_ADDRESS_MAX;
    if total >= HANDSHAKES_IN_FLIGHT_MAX {
        Admission::Drop("dropped_busy")
    } else if (total >= HANDSHAKES_BEFORE_RETRY || crowded) && !proven && may_retry {
        Admission::Retry
    } else if crowded {
        Admission::Drop("dropped_address")
    } else {
        Admission::Admit
    }
}

/// Where a handshake comes from: the IP address, and whether a Retry proved it.
type Source = (std::net::IpAddr, bool);

/// Handshakes in flight: in all, and per source.
#[derive(Default)]
struct InFlight {
    total: AtomicUsize,
    /// At most [`HANDSHAKES_IN_FLIGHT_MAX`] entries: one per admitted handshake at
    /// most, removed when its count is back to zero.
    per_source: std::sync::Mutex<std::collections::HashMap<Source, usize>>,
}

impl InFlight {
    fn from(&self, source: Source) -> usize {
        let map = self
            .per_source
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        map.get(&source).copied().unwrap_or(0)
    }
}

fn handshake_counted(result: &'static str) {
    metrics::counter!("conclave_transport_handshakes_total", "result" => result).increment(1);
}

/// One handshake in flight, counted (in all and for its source) until dropped.
struct HandshakeSlot {
    in_flight: Arc<InFlight>,
    source: Source,
}

impl HandshakeSlot {
    fn take(in_flight: &Arc<InFlight>, source: Source) -> Self {
        in_flight.total.fetch_add(1, Ordering::SeqCst);
        *in_flight
            .per_source
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(source)
            .or_default() += 1;
        metrics::gauge!("conclave_transport_handshakes_in_flight").increment(1.0);
        Self {
            in_flight: Arc::clone(in_flight),
            source,
        }
    }
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        let before = self.in_flight.total.fetch_sub(1, Ordering::SeqCst);
        debug_assert!(before > 0, "a slot is released once");
        let mut map = self
            .in_flight
            .per_source
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = map.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.source);
            }
        }
        metrics::gauge!("conclave_transport_handshakes_in_flight").decrement(1.0);
    }
}

/// The label of a handshake that failed with `error`.
fn handshake_failure(error: &ConnectionError) -> &'static str {
    match error {
        _ if auth_failure_of(error).is_some() => "auth_failed",
        ConnectionError::TimedOut => "timed_out",
        ConnectionError::VersionMismatch => "version_mismatch",
        ConnectionError::TransportError(_) => "protocol_error",
        ConnectionError::ConnectionClosed(_) | ConnectionError::ApplicationClosed(_) => {
            "closed_by_peer"
        }
        ConnectionError::Reset => "reset",
        ConnectionError::LocallyClosed => "closed_locally",
        ConnectionError::CidsExhausted => "cids_exhausted",
    }
}

/// Completes an admitted handshake within [`HANDSHAKE_WAIT_MS_MAX`] (its slot is
/// released then); the ALPN the client asked for, and the connection.
async fn handshake(
    incoming: quinn::Incoming,
    slot: HandshakeSlot,
) -> (Option<Vec<u8>>, Result<quinn::Connection, ConnectionError>) {
    let mut connecting = match incoming.accept() {
        Ok(connecting) => connecting,
        Err(error) => return (None, Err(error)),
    };
    let mut alpn = None;
    let wait = Duration::from_millis(HANDSHAKE_WAIT_MS_MAX);
    let done = tokio::time::timeout(wait, async {
        // Known from the client's hello, before its certificate is checked: a
        // failure can then be told apart as a client's or a node's.
        alpn = handshake_alpn(connecting.handshake_data().await.ok());
        (&mut connecting).await
    })
    .await;
    drop(slot);
    (alpn, done.unwrap_or(Err(ConnectionError::TimedOut)))
}

async fn accept_one<M: WireMessage>(
    shared: Arc<Shared<M>>,
    incoming: quinn::Incoming,
    slot: HandshakeSlot,
) {
    let addr = incoming.remote_address();
    let (alpn, conn) = handshake(incoming, slot).await;
    let conn = match conn {
        Ok(conn) => {
            handshake_counted("ok");
            conn
        }
        Err(error) => {
            handshake_counted(handshake_failure(&error));
            let client = alpn.as_deref() == Some(shared.client_alpn.as_slice());
            if !shared.report_handshake_error(client, addr, &error) {
                tracing::debug!(%addr, %error, "incoming handshake failed");
            }
            return;
        }
    };
    let Some(peer) = tls::peer_node_id(&conn) else {
        shared.refuse(&conn, None, AuthFailure::BadCertificate);
        return;
    };
    if alpn_of(&conn).as_deref() == Some(shared.client_alpn.as_slice()) {
        // A user's client (only offered when clients are accepted): the receiver
        // decides whether to serve them, and grants them streams if it does
        // ([`grant_client_allowance`]); until then they can send nothing.
        let client = ClientConnection {
            user: conclave_actors::UserId(peer.0),
            conn,
        };
        if let Err(e) = shared.clients.try_send(client) {
            let client = match e {
                mpsc::error::TrySendError::Full(c) | mpsc::error::TrySendError::Closed(c) => c,
            };
            metrics::counter!("conclave_client_connections_refused_total", "reason" => "busy")
                .increment(1);
            client
                .conn
                .close(VarInt::from_u32(code::DUPLICATE_CONNECTION), b"busy");
        }
        return;
    }
    if shared.revoked.contains(&peer) {
        shared.refuse(&conn, Some(peer), AuthFailure::RevokedPeer);
        return;
    }
    let Some(handle) = shared.peers.get(&peer) else {
        shared.refuse(&conn, Some(peer), AuthFailure::UnknownPeer);
        return;
    };
    PEER_ALLOWANCE.grant(&conn);
    let remote_boot = match shared.exchange_hellos(&conn, peer).await {
        Ok(boot) => boot,
        Err(error) => {
            tracing::debug!(?peer, %addr, %error, "incoming connection not accepted by the peer");
            return;
        }
    };
    let authorized = Authorized {
        conn,
        dialed_by: peer,
        remote_boot,
    };
    if let Err(e) = handle.accepted.try_send(authorized) {
        // The peer is opening connections faster than we adopt them.
        let authorized = match e {
            mpsc::error::TrySendError::Full(a) | mpsc::error::TrySendError::Closed(a) => a,
        };
        authorized
            .conn
            .close(VarInt::from_u32(code::DUPLICATE_CONNECTION), b"busy");
    }
}

/// The ALPN protocol a connection negotiated.
fn alpn_of(conn: &quinn::Connection) -> Option<Vec<u8>> {
    handshake_alpn(conn.handshake_data())
}

fn handshake_alpn(data: Option<Box<dyn std::any::Any>>) -> Option<Vec<u8>> {
    data?
        .downcast::<quinn::crypto::rustls::HandshakeData>()
        .ok()?
        .protocol
}

/// Dials `peer` at `addr`, checks it is who we dialed, and exchanges hellos.
async fn dial<M>(shared: &Shared<M>, peer: NodeId, addr: SocketAddr) -> Result<Authorized, String> {
    let connecting = shared
        .endpoint
        .connect_with(shared.client.clone(), addr, "conclave")
        .map_err(|e| e.to_string())?;
    let conn = match connecting.await {
        Ok(conn) => conn,
        Err(error) => {
            metrics::counter!("conclave_transport_handshakes_total", "result" => "failed")
                .increment(1);
            shared.report_connection_error(Some(peer), addr, &error);
            return Err(error.to_string());
        }
    };
    let Some(got) = tls::peer_node_id(&conn) else {
        shared.refuse(&conn, None, AuthFailure::BadCertificate);
        return Err(AuthFailure::BadCertificate.to_string());
    };
    if shared.revoked.contains(&got) {
        shared.refuse(&conn, Some(got), AuthFailure::RevokedPeer);
        return Err(AuthFailure::RevokedPeer.to_string());
    }
    if got != peer {
        shared.refuse(&conn, Some(got), AuthFailure::IdentityMismatch);
        return Err(AuthFailure::IdentityMismatch.to_string());
    }
    metrics::counter!("conclave_transport_handshakes_total", "result" => "ok").increment(1);
    let remote_boot = shared.exchange_hellos(&conn, peer).await?;
    Ok(Authorized {
        conn,
        dialed_by: shared.local,
        remote_boot,
    })
}

/// Full-jitter exponential backoff.
struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    fn new(min: Duration, max: Duration) -> Self {
        // `start` refused any other configuration.
        assert!(!min.is_zero() && min <= max, "backoff bounds are validated");
        Self {
            min,
            max,
            next: min,
        }
    }

    fn reset(&mut self) {
        self.next = self.min;
    }

    fn delay(&mut self) -> Duration {
        let ceiling = self.next;
        assert!(self.min <= ceiling && ceiling <= self.max);
        self.next = self.next.saturating_mul(2).min(self.max);
        // Full jitter spreads the reconnects of many nodes after a shared outage.
        let mut bytes = [0u8; 8];
        if getrandom::fill(&mut bytes).is_err() {
            return ceiling;
        }
        // 53 random bits: a unit in [0, 1), exactly representable as an f64.
        let unit = (u64::from_le_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64;
        let delay = ceiling.mul_f64(unit);
        assert!(delay <= ceiling, "jitter never lengthens the delay");
        delay
    }
}

/// The link in use, as the peer task sees it.
struct Link {
    conn: quinn::Connection,
    dialed_by: NodeId,
    remote_boot: u64,
}

/// Owns the connection to one peer: dials (in the background, so a finished dial is
/// never dropped), adopts what the peer dials, settles simultaneous dials, reports
/// what happens, and backs off after every failure or loss. The writers follow the
/// link it publishes.
async fn run_peer<M: WireMessage>(
    shared: Arc<Shared<M>>,
    peer: NodeId,
    addr: SocketAddr,
    mut accepted: mpsc::Receiver<Authorized>,
    link_tx: watch::Sender<Option<quinn::Connection>>,
) {
    let mut backoff = Backoff::new(shared.reconnect_delay_min, shared.reconnect_delay_max);
    let (dialed_tx, mut dialed) = mpsc::channel::<Result<Authorized, String>>(1);
    let mut dialing = false;
    let mut next_dial = tokio::time::Instant::now();
    let mut link: Option<Link> = None;
    let mut had_link = false;
    // The peer's lifetime: ends when the transport drops its channels (shutdown).
    loop {
        if link.is_none() && !dialing && tokio::time::Instant::now() >= next_dial {
            dialing = true;
            let (shared, tx) = (Arc::clone(&shared), dialed_tx.clone());
            tokio::spawn(async move {
                let _ = tx.send(dial(&shared, peer, addr).await).await;
            });
        }
        let closed = async {
            match &link {
                Some(current) => current.conn.closed().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            authorized = accepted.recv() => {
                let Some(authorized) = authorized else { return };
                settle(&shared, peer, &mut link, authorized, &link_tx, &mut had_link);
                backoff.reset();
            }
            result = dialed.recv() => {
                dialing = false;
                match result {
                    Some(Ok(authorized)) => {
                        settle(&shared, peer, &mut link, authorized, &link_tx, &mut had_link);
                        backoff.reset();
                    }
                    Some(Err(error)) => {
                        let delay = backoff.delay();
                        tracing::debug!(?peer, %addr, %error, ?delay, "dial failed; retrying");
                        next_dial = tokio::time::Instant::now() + delay;
                    }
                    None => return,
                }
            }
            error = closed => {
                if !shared.report_connection_error(Some(peer), addr, &error) {
                    let reason = error.to_string();
                    tracing::info!(?peer, %reason, "connection lost");
                }
                shared.event(TransportEvent::Disconnected {
                    peer,
                    reason: error.to_string(),
                });
                metrics::gauge!("conclave_transport_connections_open").decrement(1.0);
                link = None;
                link_tx.send_replace(None);
                next_dial = tokio::time::Instant::now() + backoff.delay();
            }
            () = tokio::time::sleep_until(next_dial), if link.is_none() && !dialing => {}
        }
    }
}

/// Takes an authorized connection as the link, or not, by one rule applied on both
/// sides: the connection dialed by the smaller id wins; between two dialed by the
/// same side, the newer wins (the older is from before a restart). A loser is
/// drained by its writer and closed by its reader.
fn settle<M: WireMessage>(
    shared: &Arc<Shared<M>>,
    peer: NodeId,
    link: &mut Option<Link>,
    new: Authorized,
    link_tx: &watch::Sender<Option<quinn::Connection>>,
    had_link: &mut bool,
) {
    assert_ne!(peer, shared.local, "nobody links to itself");
    let preferred = shared.local.min(peer);
    let replace = match link {
        None => true,
        // A peer that restarted (a new boot id) has a new connection and the old
        // one is dead, whoever dialed it: take the new one at once rather than wait
        // for the idle timeout to notice.
        Some(current) => {
            new.remote_boot != current.remote_boot
                || new.dialed_by == current.dialed_by
                || new.dialed_by == preferred
        }
    };
    if !replace {
        // The peer will move off it; read what it sent, then let it close.
        tokio::spawn(read_connection(Arc::clone(shared), peer, new.conn, true));
        return;
    }
    tracing::info!(?peer, addr = %new.conn.remote_address(), "connected");
    if *had_link {
        metrics::counter!("conclave_transport_reconnects_total").increment(1);
    }
    *had_link = true;
    tokio::spawn(read_connection(
        Arc::clone(shared),
        peer,
        new.conn.clone(),
        false,
    ));
    if let Some(old) = link.replace(Link {
        conn: new.conn.clone(),
        dialed_by: new.dialed_by,
        remote_boot: new.remote_boot,
    }) {
        // The writers move to the new link and finish their streams on the old one;
        // the peer's reader closes it once drained (or we do, after a bound).
        shared.event(TransportEvent::Disconnected {
            peer,
            reason: "replaced by a newer connection".into(),
        });
        tokio::spawn(async move {
            let wait = Duration::from_millis(RETIRE_WAIT_MS_MAX);
            if tokio::time::timeout(wait, old.conn.closed()).await.is_err() {
                old.conn.close(
                    VarInt::from_u32(code::DUPLICATE_CONNECTION),
                    b"duplicate_connection",
                );
            }
        });
    } else {
        metrics::gauge!("conclave_transport_connections_open").increment(1.0);
    }
    assert!(link.is_some() && *had_link);
    link_tx.send_replace(Some(new.conn));
    shared.event(TransportEvent::Connected { peer });
}

/// Writes one message class to the current link: one long-lived stream per link,
/// opened with the class byte. Whatever is queued when the writer gets to it goes
/// in one vectored write (up to [`WRITE_BATCH_MESSAGES_MAX`] messages and
/// [`WRITE_BATCH_BYTES_MAX`] bytes), so a burst costs one wake-up and one call into
/// quinn rather than one per message. Messages whose write failed are written first
/// on the next link. Each class has its own writer, so a blocked data stream never
/// holds up control messages.
async fn run_writer(
    class: u8,
    mut queue: mpsc::Receiver<Outgoing>,
    mut link: watch::Receiver<Option<quinn::Connection>>,
) {
    // Bodies taken from the queue and not yet written.
    let mut batch: Vec<Bytes> = Vec::new();
    // One turn per link; ends when the queue's sender or the link's is dropped.
    loop {
        let conn = match link.wait_for(Option::is_some).await {
            Ok(conn) => conn.clone(),
            Err(_) => return,
        };
        let Some(conn) = conn else { continue };
        let mut stream = match conn.open_uni().await {
            Ok(stream) => stream,
            Err(_) => {
                // The link is going away: wait for the next one.
                if link.changed().await.is_err() {
                    return;
                }
                continue;
            }
        };
        if stream.write_all(&[class]).await.is_err() {
            if link.changed().await.is_err() {
                return;
            }
            continue;
        }
        // One turn per batch, until this link fails or is replaced.
        loop {
            if batch.is_empty() {
                tokio::select! {
                    out = queue.recv() => match out {
                        Some(out) => take(&mut batch, out),
                        None => return,
                    },
                    changed = link.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        // A new link: finish this stream so the peer can drain it.
                        let _ = stream.finish();
                        break;
                    }
                }
                fill(&mut batch, &mut queue);
            }
            if write_batch(&mut stream, &batch).await.is_err() {
                // Make sure the link is seen as lost, then wait for the next one.
                conn.close(VarInt::from_u32(code::STREAM_ERROR), b"stream_error");
                if link.changed().await.is_err() {
                    return;
                }
                break;
            }
            batch.clear();
        }
    }
}

/// Moves `out` from the send queue into `batch`.
fn take(batch: &mut Vec<Bytes>, out: Outgoing) {
    metrics::gauge!("conclave_transport_send_queue_depth").decrement(1.0);
    batch.push(Bytes::from(out.bytes));
}

/// Adds what is already queued to `batch`, within the write bounds.
fn fill(batch: &mut Vec<Bytes>, queue: &mut mpsc::Receiver<Outgoing>) {
    let mut bytes: usize = batch.iter().map(Bytes::len).sum();
    while batch.len() < WRITE_BATCH_MESSAGES_MAX && bytes < WRITE_BATCH_BYTES_MAX {
        let Ok(out) = queue.try_recv() else { break };
        bytes += out.bytes.len();
        take(batch, out);
    }
}

/// Writes `batch` as consecutive frames in one vectored write, and counts them.
async fn write_batch(stream: &mut quinn::SendStream, batch: &[Bytes]) -> Result<(), ()> {
    let mut chunks = match framing::frame_chunks(batch, ENVELOPE_BYTES_MAX) {
        Ok(chunks) => chunks,
        Err(error) => unreachable!("send queues only envelopes within the bound: {error}"),
    };
    stream.write_all_chunks(&mut chunks).await.map_err(|_| ())?;
    let bytes: usize = batch.iter().map(|b| FRAME_PREFIX_BYTES + b.len()).sum();
    metrics::counter!("conclave_transport_frames_out_total").increment(batch.len() as u64);
    metrics::counter!("conclave_transport_bytes_out_total").increment(bytes as u64);
    Ok(())
}

/// Reads every stream the peer opens on `conn`. For a connection that lost the
/// simultaneous-dial tie-break (`retired`), closes it once the peer has finished
/// every stream it opened (or after a bound).
async fn read_connection<M: WireMessage>(
    shared: Arc<Shared<M>>,
    peer: NodeId,
    conn: quinn::Connection,
    retired: bool,
) {
    let mut readers = JoinSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_millis(RETIRE_WAIT_MS_MAX);
    // Until the connection ends (or, for a retired one, drains or hits the deadline).
    loop {
        tokio::select! {
            stream = conn.accept_uni() => match stream {
                Ok(stream) => {
                    readers.spawn(read_stream(Arc::clone(&shared), peer, conn.clone(), stream));
                }
                Err(_) => break,
            },
            Some(_) = readers.join_next(), if !readers.is_empty() => {
                if retired && readers.is_empty() {
                    break;
                }
            }
            () = tokio::time::sleep_until(deadline), if retired => break,
        }
    }
    if retired {
        // Bounded by the streams accepted before the loop ended.
        while readers.join_next().await.is_some() {}
        conn.close(
            VarInt::from_u32(code::DUPLICATE_CONNECTION),
            b"duplicate_connection",
        );
    }
}

/// Why a stream stopped.
enum StreamEnd {
    /// The peer finished it or the connection went away: nothing to report here.
    Closed,
    /// The peer broke the framing: close the connection with this code and text.
    Violation(u32, String),
}

async fn read_stream<M: WireMessage>(
    shared: Arc<Shared<M>>,
    peer: NodeId,
    conn: quinn::Connection,
    mut stream: quinn::RecvStream,
) {
    let mut first = [0u8; 1];
    let end = match stream.read_exact(&mut first).await {
        Err(_) => StreamEnd::Closed,
        // A late hello (a replaced link's) carries nothing more.
        Ok(()) if first[0] == kind::HELLO => StreamEnd::Closed,
        Ok(()) if first[0] == kind::CONTROL || first[0] == kind::DATA => {
            read_frames(&shared, peer, &mut stream).await
        }
        Ok(()) => StreamEnd::Violation(
            code::MALFORMED_FRAME,
            format!("malformed_frame: unknown stream kind {}", first[0]),
        ),
    };
    if let StreamEnd::Violation(code, reason) = end {
        tracing::warn!(?peer, %reason, "closing connection: peer broke the framing");
        metrics::counter!("conclave_transport_frames_rejected_total").increment(1);
        conn.close(VarInt::from_u32(code), reason.as_bytes());
    }
}

async fn read_frames<M: WireMessage>(
    shared: &Shared<M>,
    peer: NodeId,
    stream: &mut quinn::RecvStream,
) -> StreamEnd {
    // One frame per turn, for as long as the peer keeps the stream open: the stream
    // is the bound (it ends with the connection, which ends at the idle timeout).
    loop {
        let bytes = match framing::read_frame(stream, ENVELOPE_BYTES_MAX).await {
            Ok(Some(bytes)) => bytes,
            Ok(None) => return StreamEnd::Closed,
            Err(error) => return stream_end(error),
        };
        let envelope = match Envelope::<M>::decode(&bytes) {
            Ok(envelope) => envelope,
            Err(error) => {
                return StreamEnd::Violation(
                    code::MALFORMED_FRAME,
                    format!("malformed_frame: {error}"),
                )
            }
        };
        metrics::counter!("conclave_transport_frames_in_total").increment(1);
        metrics::counter!("conclave_transport_bytes_in_total")
            .increment((FRAME_PREFIX_BYTES + bytes.len()) as u64);
        // Waiting here, not dropping, is the backpressure: QUIC flow control slows
        // the sender while the runtime catches up.
        let incoming = Incoming {
            from: peer,
            envelope,
        };
        if shared.incoming.send(incoming).await.is_err() {
            return StreamEnd::Closed;
        }
    }
}

/// What a framing error means for the connection: the peer broke the framing (close
/// it with a reason), or the stream went away (nothing to report).
fn stream_end(error: FrameError) -> StreamEnd {
    match error {
        FrameError::TooLarge { len, max } => StreamEnd::Violation(
            code::FRAME_TOO_LARGE,
            format!("frame_too_large: {len} bytes, limit {max}"),
        ),
        FrameError::TruncatedPrefix { .. } | FrameError::TruncatedBody { .. } => {
            StreamEnd::Violation(code::MALFORMED_FRAME, format!("malformed_frame: {error}"))
        }
        FrameError::Io(_) => StreamEnd::Closed,
    }
}

#[cfg(test)]
mod tests;

//! The QUIC transport: quinn + rustls, mutually authenticated by Ed25519 identities.
//!
//! One connection per peer pair. Each side sends on two long-lived unidirectional
//! streams, one per [`MessageClass`], so a large transfer never holds up control
//! messages. A frame on a stream is a 4-byte big-endian length and that many bytes
//! of encoded [`Envelope`]; it is read with exact reads, so however the bytes arrive
//! they reassemble. An oversized or undecodable frame closes the connection with a
//! reason. Every peer has a bounded send queue: when it is full, [`Transport::send`]
//! reports backpressure.
//!
//! Authentication (see [`tls`]): the handshake proves each side holds the Ed25519
//! key it presents; right after it, the acceptor refuses revoked and unknown keys and
//! the dialer refuses a key other than the one it dialed, each closing the
//! connection with an application code and reason text that the other side reports
//! as well. A peer of another protocol version fails in the handshake (ALPN).

pub mod tls;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use conclave_actors::wire::{
    Envelope, MessageClass, WireMessage, ENVELOPE_BYTES_MAX, WIRE_VERSION,
};
use conclave_actors::{Identity, NodeId};
use quinn::{ConnectionError, VarInt};
use tokio::sync::mpsc;

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
    pub const DUPLICATE_CONNECTION: u32 = 0x30;
    pub const SHUTDOWN: u32 = 0x31;
}

/// TLS alerts (RFC 8446 §6) that mean the peer's identity was refused.
const CERTIFICATE_ALERTS: [u8; 9] = [40, 42, 43, 44, 45, 46, 48, 51, 110];
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
}

impl QuicConfig {
    /// A configuration with the default limits.
    pub fn new(identity: Identity, listen: SocketAddr) -> Self {
        Self {
            identity,
            listen,
            peers: BTreeMap::new(),
            revoked: BTreeSet::new(),
            send_queue_depth_max: 1024,
            incoming_depth_max: 1024,
            idle_timeout: Duration::from_secs(10),
            keep_alive: Duration::from_secs(3),
            reconnect_delay_min: Duration::from_millis(50),
            reconnect_delay_max: Duration::from_secs(5),
            protocol_version: WIRE_VERSION,
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
}

/// Events that may wait before new ones are dropped.
const EVENTS_DEPTH_MAX: usize = 1024;

struct Outgoing {
    class: MessageClass,
    bytes: Vec<u8>,
}

struct PeerHandle {
    queue: mpsc::Sender<Outgoing>,
    accepted: mpsc::Sender<quinn::Connection>,
}

struct Shared<M> {
    local: NodeId,
    endpoint: quinn::Endpoint,
    client: quinn::ClientConfig,
    peers: BTreeMap<NodeId, PeerHandle>,
    revoked: BTreeSet<NodeId>,
    incoming: mpsc::Sender<Incoming<M>>,
    events: mpsc::Sender<TransportEvent>,
    reconnect_delay_min: Duration,
    reconnect_delay_max: Duration,
    /// Set once by `shutdown`: every peer task then ends, releasing the endpoint.
    stop: tokio::sync::watch::Sender<bool>,
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
        if config.keep_alive >= config.idle_timeout {
            return Err(StartError::Config("keep_alive must be below idle_timeout"));
        }
        if config.send_queue_depth_max == 0 || config.incoming_depth_max == 0 {
            return Err(StartError::Config("queue depths must be at least 1"));
        }
        let provider = tls::crypto_provider();
        let key = tls::certified_key(&config.identity, &provider)?;
        let alpn = tls::alpn(config.protocol_version);
        let transport = Arc::new(transport_config(&config)?);

        let mut server =
            quinn::ServerConfig::with_crypto(tls::server_crypto(Arc::clone(&key), alpn.clone())?);
        server.transport_config(Arc::clone(&transport));
        let mut client = quinn::ClientConfig::new(tls::client_crypto(key, alpn)?);
        client.transport_config(transport);

        let endpoint =
            quinn::Endpoint::server(server, config.listen).map_err(|source| StartError::Bind {
                addr: config.listen,
                source,
            })?;

        let (incoming_tx, incoming_rx) = mpsc::channel(config.incoming_depth_max);
        let (events_tx, events_rx) = mpsc::channel(EVENTS_DEPTH_MAX);
        let mut peers = BTreeMap::new();
        let mut tasks = Vec::new();
        for (&peer, &addr) in &config.peers {
            if peer == config.identity.node_id() {
                continue;
            }
            let (queue, queue_rx) = mpsc::channel(config.send_queue_depth_max);
            let (accepted, accepted_rx) = mpsc::channel(4);
            peers.insert(peer, PeerHandle { queue, accepted });
            tasks.push((peer, addr, queue_rx, accepted_rx));
        }
        let shared = Arc::new(Shared {
            local: config.identity.node_id(),
            endpoint,
            client,
            peers,
            revoked: config.revoked,
            incoming: incoming_tx,
            events: events_tx,
            reconnect_delay_min: config.reconnect_delay_min,
            reconnect_delay_max: config.reconnect_delay_max,
            stop: tokio::sync::watch::Sender::new(false),
        });
        for (peer, addr, queue_rx, accepted_rx) in tasks {
            let mut stop = shared.stop.subscribe();
            let task = run_peer(Arc::clone(&shared), peer, addr, queue_rx, accepted_rx);
            tokio::spawn(async move {
                tokio::select! {
                    _ = stop.wait_for(|stopped| *stopped) => {}
                    () = task => {}
                }
            });
        }
        tokio::spawn(accept_loop(Arc::clone(&shared)));
        Ok((
            Self { shared },
            QuicChannels {
                incoming: incoming_rx,
                events: events_rx,
            },
        ))
    }

    /// The address the endpoint is bound to.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.shared.endpoint.local_addr()
    }

    /// Closes every connection (telling peers why), stops dialing, and waits until
    /// the connections are gone.
    pub async fn shutdown(&self) {
        self.shared.stop.send_replace(true);
        self.shared
            .endpoint
            .close(VarInt::from_u32(code::SHUTDOWN), b"shutdown");
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
        let outgoing = Outgoing {
            class: envelope.msg.class(),
            bytes,
        };
        peer.queue.try_send(outgoing).map_err(|e| match e {
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
        // One stream per message class and direction, with room to reopen one.
        .max_concurrent_uni_streams(VarInt::from_u32(4))
        .max_concurrent_bidi_streams(VarInt::from_u32(0));
    Ok(transport)
}

impl<M> Shared<M> {
    fn event(&self, event: TransportEvent) {
        if self.events.try_send(event).is_err() {
            metrics::counter!("conclave_transport_events_dropped_total").increment(1);
        }
    }

    /// Logs, counts and reports an authentication failure.
    fn auth_failed(&self, peer: Option<NodeId>, addr: SocketAddr, reason: AuthFailure, side: Side) {
        tracing::warn!(
            ?peer,
            %addr,
            reason = reason.as_str(),
            side = ?side,
            "peer authentication failed"
        );
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
}

async fn accept_loop<M: WireMessage>(shared: Arc<Shared<M>>) {
    while let Some(incoming) = shared.endpoint.accept().await {
        tokio::spawn(accept_one(Arc::clone(&shared), incoming));
    }
}

async fn accept_one<M: WireMessage>(shared: Arc<Shared<M>>, incoming: quinn::Incoming) {
    let addr = incoming.remote_address();
    let conn = match incoming.await {
        Ok(conn) => conn,
        Err(error) => {
            metrics::counter!("conclave_transport_handshakes_total", "result" => "failed")
                .increment(1);
            if !shared.report_connection_error(None, addr, &error) {
                tracing::debug!(%addr, %error, "incoming handshake failed");
            }
            return;
        }
    };
    let Some(peer) = tls::peer_node_id(&conn) else {
        shared.refuse(&conn, None, AuthFailure::BadCertificate);
        return;
    };
    if shared.revoked.contains(&peer) {
        shared.refuse(&conn, Some(peer), AuthFailure::RevokedPeer);
        return;
    }
    let Some(handle) = shared.peers.get(&peer) else {
        shared.refuse(&conn, Some(peer), AuthFailure::UnknownPeer);
        return;
    };
    metrics::counter!("conclave_transport_handshakes_total", "result" => "ok").increment(1);
    if handle.accepted.send(conn.clone()).await.is_err() {
        conn.close(VarInt::from_u32(code::SHUTDOWN), b"shutdown");
    }
}

/// Dials `peer` at `addr` and checks that it is who we dialed.
async fn dial<M>(
    shared: &Shared<M>,
    peer: NodeId,
    addr: SocketAddr,
) -> Result<quinn::Connection, String> {
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
    Ok(conn)
}

/// An established connection to one peer and the streams we send on.
struct Link {
    conn: quinn::Connection,
    dialed_by: NodeId,
    control: Option<quinn::SendStream>,
    data: Option<quinn::SendStream>,
}

impl Link {
    async fn write(&mut self, out: &Outgoing) -> Result<(), String> {
        let slot = match out.class {
            MessageClass::Control => &mut self.control,
            MessageClass::Data => &mut self.data,
        };
        if slot.is_none() {
            *slot = Some(self.conn.open_uni().await.map_err(|e| e.to_string())?);
        }
        let Some(stream) = slot.as_mut() else {
            return Err("stream unavailable".into());
        };
        let len = u32::try_from(out.bytes.len()).map_err(|_| "frame too large".to_string())?;
        let mut frame = Vec::with_capacity(4 + out.bytes.len());
        frame.extend_from_slice(&len.to_be_bytes());
        frame.extend_from_slice(&out.bytes);
        stream.write_all(&frame).await.map_err(|e| e.to_string())?;
        metrics::counter!("conclave_transport_frames_out_total").increment(1);
        metrics::counter!("conclave_transport_bytes_out_total").increment(frame.len() as u64);
        Ok(())
    }
}

/// Full-jitter exponential backoff.
struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    fn new(min: Duration, max: Duration) -> Self {
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
        self.next = (self.next * 2).min(self.max);
        // Full jitter spreads the reconnects of many nodes after a shared outage.
        let mut bytes = [0u8; 8];
        if getrandom::fill(&mut bytes).is_err() {
            return ceiling;
        }
        let unit = (u64::from_le_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64;
        ceiling.mul_f64(unit)
    }
}

/// Owns everything about one peer: dialing, reconnecting, the single connection,
/// and writing its send queue.
async fn run_peer<M: WireMessage>(
    shared: Arc<Shared<M>>,
    peer: NodeId,
    addr: SocketAddr,
    mut queue: mpsc::Receiver<Outgoing>,
    mut accepted: mpsc::Receiver<quinn::Connection>,
) {
    let mut backoff = Backoff::new(shared.reconnect_delay_min, shared.reconnect_delay_max);
    let mut link: Option<Link> = None;
    // A message taken from the queue whose write failed: sent first once reconnected.
    let mut pending: Option<Outgoing> = None;
    let mut attempts: u64 = 0;
    loop {
        let Some(current) = link.as_mut() else {
            // Not connected: dial, unless the peer's connection arrives first.
            tokio::select! {
                conn = accepted.recv() => {
                    let Some(conn) = conn else { return };
                    link = Some(adopt(&shared, peer, conn, peer));
                    backoff.reset();
                }
                result = dial(&shared, peer, addr) => match result {
                    Ok(conn) => {
                        if attempts > 0 {
                            metrics::counter!("conclave_transport_reconnects_total").increment(1);
                            attempts = 0;
                        }
                        link = Some(adopt(&shared, peer, conn, shared.local));
                        backoff.reset();
                    }
                    Err(error) => {
                        attempts += 1;
                        let delay = backoff.delay();
                        tracing::debug!(?peer, %addr, %error, ?delay, "dial failed; retrying");
                        tokio::select! {
                            conn = accepted.recv() => {
                                let Some(conn) = conn else { return };
                                link = Some(adopt(&shared, peer, conn, peer));
                                backoff.reset();
                            }
                            () = tokio::time::sleep(delay) => {}
                        }
                    }
                },
            }
            continue;
        };
        if let Some(out) = pending.take() {
            if let Err(error) = current.write(&out).await {
                tracing::debug!(?peer, %error, "write failed; reconnecting");
                pending = Some(out);
                link = None;
            }
            continue;
        }
        tokio::select! {
            conn = accepted.recv() => {
                let Some(conn) = conn else { return };
                // Both sides dialed at once. Both keep writing only to the connection
                // dialed by the smaller id; each still reads everything the other
                // already wrote on the loser, and the side that wrote on it closes it
                // once the peer has read it all, so the switch loses nothing.
                if current.dialed_by == shared.local.min(peer) {
                    tokio::spawn(read_connection(Arc::clone(&shared), peer, conn));
                } else if let Some(loser) = link.replace(adopt(&shared, peer, conn, peer)) {
                    retire(loser);
                }
            }
            out = queue.recv() => {
                let Some(out) = out else { return };
                metrics::gauge!("conclave_transport_send_queue_depth").decrement(1.0);
                if let Err(error) = current.write(&out).await {
                    tracing::debug!(?peer, %error, "write failed; reconnecting");
                    pending = Some(out);
                    link = None;
                }
            }
            error = current.conn.closed() => {
                if !shared.report_connection_error(Some(peer), addr, &error) {
                    let reason = error.to_string();
                    tracing::info!(?peer, %reason, "connection closed");
                    shared.event(TransportEvent::Disconnected { peer, reason });
                }
                metrics::gauge!("conclave_transport_connections_open").decrement(1.0);
                link = None;
            }
        }
    }
}

/// Takes `conn` as the link to `peer`: starts reading it and reports it.
fn adopt<M: WireMessage>(
    shared: &Arc<Shared<M>>,
    peer: NodeId,
    conn: quinn::Connection,
    dialed_by: NodeId,
) -> Link {
    tracing::info!(?peer, addr = %conn.remote_address(), "connected");
    metrics::gauge!("conclave_transport_connections_open").increment(1.0);
    shared.event(TransportEvent::Connected { peer });
    tokio::spawn(read_connection(Arc::clone(shared), peer, conn.clone()));
    Link {
        conn,
        dialed_by,
        control: None,
        data: None,
    }
}

/// Stops writing to a connection that lost the simultaneous-dial tie-break: finish
/// its streams, wait (bounded) until the peer has read them, then close it.
fn retire(link: Link) {
    metrics::gauge!("conclave_transport_connections_open").decrement(1.0);
    tokio::spawn(async move {
        let Link {
            conn,
            control,
            data,
            ..
        } = link;
        let drained = async {
            for mut stream in [control, data].into_iter().flatten() {
                if stream.finish().is_ok() {
                    let _ = stream.stopped().await;
                }
            }
        };
        let _ = tokio::time::timeout(RETIRE_WAIT_MAX, drained).await;
        conn.close(
            VarInt::from_u32(code::DUPLICATE_CONNECTION),
            b"duplicate_connection",
        );
    });
}

/// How long a retired connection may take to deliver what was written to it.
const RETIRE_WAIT_MAX: Duration = Duration::from_secs(5);

async fn read_connection<M: WireMessage>(
    shared: Arc<Shared<M>>,
    peer: NodeId,
    conn: quinn::Connection,
) {
    while let Ok(stream) = conn.accept_uni().await {
        tokio::spawn(read_stream(Arc::clone(&shared), peer, conn.clone(), stream));
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
    let end = loop {
        match read_frame(&mut stream).await {
            Ok(Some(bytes)) => match Envelope::<M>::decode(&bytes) {
                Ok(envelope) => {
                    metrics::counter!("conclave_transport_frames_in_total").increment(1);
                    metrics::counter!("conclave_transport_bytes_in_total")
                        .increment(4 + bytes.len() as u64);
                    // Waiting here, not dropping, is the backpressure: QUIC flow
                    // control slows the sender while the runtime catches up.
                    if shared
                        .incoming
                        .send(Incoming {
                            from: peer,
                            envelope,
                        })
                        .await
                        .is_err()
                    {
                        break StreamEnd::Closed;
                    }
                }
                Err(error) => {
                    break StreamEnd::Violation(
                        code::MALFORMED_FRAME,
                        format!("malformed_frame: {error}"),
                    )
                }
            },
            Ok(None) => break StreamEnd::Closed,
            Err(end) => break end,
        }
    };
    if let StreamEnd::Violation(code, reason) = end {
        tracing::warn!(?peer, %reason, "closing connection: peer broke the framing");
        metrics::counter!("conclave_transport_frames_rejected_total").increment(1);
        conn.close(VarInt::from_u32(code), reason.as_bytes());
    }
}

/// Reads one length-prefixed frame with exact reads. `Ok(None)` when the stream
/// ended cleanly between frames.
async fn read_frame(stream: &mut quinn::RecvStream) -> Result<Option<Vec<u8>>, StreamEnd> {
    let mut len = [0u8; 4];
    match stream.read_exact(&mut len).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(quinn::ReadExactError::FinishedEarly(_)) => {
            return Err(StreamEnd::Violation(
                code::MALFORMED_FRAME,
                "malformed_frame: stream ended inside a length prefix".into(),
            ))
        }
        Err(quinn::ReadExactError::ReadError(_)) => return Err(StreamEnd::Closed),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > ENVELOPE_BYTES_MAX {
        return Err(StreamEnd::Violation(
            code::FRAME_TOO_LARGE,
            format!("frame_too_large: {len} bytes, limit {ENVELOPE_BYTES_MAX}"),
        ));
    }
    let mut bytes = vec![0u8; len];
    match stream.read_exact(&mut bytes).await {
        Ok(()) => Ok(Some(bytes)),
        Err(quinn::ReadExactError::FinishedEarly(_)) => Err(StreamEnd::Violation(
            code::MALFORMED_FRAME,
            "malformed_frame: stream ended inside a frame".into(),
        )),
        Err(quinn::ReadExactError::ReadError(_)) => Err(StreamEnd::Closed),
    }
}

#[cfg(test)]
mod tests;

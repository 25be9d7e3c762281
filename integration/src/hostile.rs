//! A hostile client, for the load tests: what a client no one on the project
//! wrote can do to a node with a UDP socket (handshakes it never finishes) and
//! with one registered user (requests it announces large and never finishes).
//! Bounded by its arguments; loopback only.

use std::collections::BTreeSet;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use conclave_actors::wire::WIRE_VERSION;
use conclave_actors::Identity;
use conclave_transports::quic::{connect_client, tls, ClientLink};

/// The first byte of a QUIC v1 long-header packet, masked to its form, fixed bit
/// and type: an Initial, a Retry.
const LONG_TYPE_MASK: u8 = 0xF0;
const INITIAL: u8 = 0xC0;
const RETRY: u8 = 0xF0;
/// How long [`half_open_handshakes`] listens for answers after its last packet.
const ANSWER_WAIT_MS: u64 = 500;
/// The largest UDP datagram read.
const DATAGRAM_BYTES_MAX: usize = 65_536;

/// What a node answered to handshakes that were never continued.
#[derive(Clone, Copy, Debug, Default)]
pub struct HalfOpen {
    /// Initial packets sent (one handshake each).
    pub sent: usize,
    /// Handshakes the node answered with its own Initial: state it holds.
    pub answered: usize,
    /// Retry packets: the node asked the client to prove its address first and
    /// kept nothing.
    pub retried: usize,
}

/// Sends `count` QUIC Initial packets to `node` from one socket, each opening a
/// handshake (a ClientHello for the client protocol) that is never continued, as a
/// client that vanishes or spoofs its source would; then counts what came back.
pub fn half_open_handshakes(node: SocketAddr, count: usize) -> std::io::Result<HalfOpen> {
    let socket = UdpSocket::bind("127.0.0.1:0")?;
    socket.set_read_timeout(Some(Duration::from_millis(ANSWER_WAIT_MS)))?;
    let identity = Identity::generate(&mut rand_core::UnwrapErr(getrandom::SysRng));
    let key = tls::certified_key(&identity, &tls::crypto_provider()).map_err(other)?;
    let crypto = tls::client_crypto(key, tls::client_alpn(WIRE_VERSION)).map_err(other)?;
    let config = quinn::ClientConfig::new(crypto);
    let mut endpoint = quinn_proto::Endpoint::new(
        Arc::new(quinn_proto::EndpointConfig::default()),
        None,
        false,
        None,
    );
    let mut report = HalfOpen::default();
    let mut answers = Answers::default();
    let mut buf = Vec::new();
    for _ in 0..count {
        let now = Instant::now();
        let (_, mut conn) = endpoint
            .connect(now, config.clone(), node, "conclave")
            .map_err(other)?;
        buf.clear();
        if let Some(transmit) = conn.poll_transmit(now, 1, &mut buf) {
            socket.send_to(&buf[..transmit.size], node)?;
            report.sent += 1;
        }
        // Read as we go: the socket's buffer would not hold every answer.
        socket.set_nonblocking(true)?;
        answers.read(&socket);
        socket.set_nonblocking(false)?;
    }
    answers.read(&socket);
    report.answered = answers.answered.len();
    report.retried = answers.retried;
    Ok(report)
}

/// What came back to [`half_open_handshakes`].
#[derive(Default)]
struct Answers {
    /// The connections the node answered with an Initial.
    answered: BTreeSet<Vec<u8>>,
    retried: usize,
}

impl Answers {
    /// Reads datagrams until none is waiting (or, on a blocking socket, until
    /// its read timeout).
    fn read(&mut self, socket: &UdpSocket) {
        let mut datagram = vec![0u8; DATAGRAM_BYTES_MAX];
        while let Ok((len, _)) = socket.recv_from(&mut datagram) {
            let packet = &datagram[..len];
            match packet.first().map(|b| b & LONG_TYPE_MASK) {
                Some(RETRY) => self.retried += 1,
                Some(INITIAL) => {
                    if let Some(cid) = destination_cid(packet) {
                        self.answered.insert(cid.to_vec());
                    }
                }
                _ => {}
            }
        }
    }
}

/// The destination connection id of a long-header packet (the id this client
/// chose for the connection): byte 0, a 4-byte version, a length, the id.
fn destination_cid(packet: &[u8]) -> Option<&[u8]> {
    let len = usize::from(*packet.get(5)?);
    packet.get(6..6 + len)
}

fn other(error: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(error.to_string())
}

/// What one user's pinned requests reached.
#[derive(Default)]
pub struct Pinned {
    /// Connections the node accepted.
    pub connections: usize,
    /// Request streams opened.
    pub streams: usize,
    /// Request bytes the node accepted (flow control let them through).
    pub bytes: u64,
    /// What holds them open: drop it to let go.
    pub held: Vec<(ClientLink, Vec<quinn::SendStream>)>,
}

/// Per write of a pinned request: how much, and how long to wait for flow control
/// before taking the stream as full.
const PIN_CHUNK_BYTES: usize = 64 * 1024;
const PIN_WAIT_MS: u64 = 200;

/// As `identity` (a registered user), opens up to `connections` client
/// connections to `node`, and on each up to `streams` request streams that
/// announce `announce` bytes and send as many as the node's flow control takes,
/// never finishing: what a user can make a node hold.
pub async fn pin_requests(
    identity: &Identity,
    node: SocketAddr,
    connections: usize,
    streams: usize,
    announce: u32,
) -> Pinned {
    let mut pinned = Pinned::default();
    let wait = Duration::from_millis(PIN_WAIT_MS);
    for _ in 0..connections {
        let Ok(link) = connect_client(identity, node, None).await else {
            continue;
        };
        pinned.connections += 1;
        let mut sends = Vec::new();
        for _ in 0..streams {
            let Ok(Ok((mut send, _recv))) = tokio::time::timeout(wait, link.conn.open_bi()).await
            else {
                break;
            };
            pinned.streams += 1;
            pinned.bytes += fill(&mut send, announce, wait).await;
            sends.push(send);
        }
        pinned.held.push((link, sends));
    }
    pinned
}

/// Writes a length prefix of `announce` and body bytes until flow control stops
/// them, one byte short of the whole body (so that the request stays open, and
/// what the node took for it stays taken); returns the bytes written.
async fn fill(send: &mut quinn::SendStream, announce: u32, wait: Duration) -> u64 {
    let mut written = 0u64;
    if send.write_all(&announce.to_be_bytes()).await.is_err() {
        return written;
    }
    let short = u64::from(announce).saturating_sub(1);
    let chunk = vec![0u8; PIN_CHUNK_BYTES];
    while written < short {
        let len = usize::try_from(short - written).map_or(chunk.len(), |n| n.min(chunk.len()));
        match tokio::time::timeout(wait, send.write(&chunk[..len])).await {
            Ok(Ok(n)) => written += n as u64,
            _ => break,
        }
    }
    written
}

/// The resident memory of process `pid`, in KiB (Linux).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

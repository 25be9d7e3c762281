//! Loopback tests of the QUIC transport: connecting both ways, every
//! authentication failure seen by both sides, framing limits, backpressure and
//! reconnecting.

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use conclave_actors::actor::{ActorKey, ActorKind, ActorRef};
use serde::{Deserialize, Serialize};

use super::*;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum TestMsg {
    Control(u32),
    Data(Vec<u8>),
}

impl WireMessage for TestMsg {
    fn class(&self) -> MessageClass {
        match self {
            TestMsg::Control(_) => MessageClass::Control,
            TestMsg::Data(_) => MessageClass::Data,
        }
    }
}

/// How long a test waits for anything that should happen.
const WAIT_MS_MAX: u64 = 15_000;
const WAIT: Duration = Duration::from_millis(WAIT_MS_MAX);
/// Short reconnect delays, so that tests of reconnection run quickly.
const RECONNECT_DELAY_MS_MIN: u64 = 20;
const RECONNECT_DELAY_MS_MAX: u64 = 200;
/// How long `send_until_received` waits for one send before it resends.
const RESEND_INTERVAL_MS: u64 = 500;
/// The pause between the pieces of a chunked write, so that they arrive apart.
const CHUNK_INTERVAL_MS: u64 = 1;
/// Retries of binding a restarted node's address, and the pause between them.
const REBIND_ATTEMPTS_MAX: u32 = 100;
const REBIND_INTERVAL_MS: u64 = 20;
/// The pause between sends while filling a peer's queue.
const FILL_INTERVAL_MS: u64 = 2;

fn identity(seed: u8) -> Identity {
    Identity::from_secrets(&[seed; 32], [seed.wrapping_add(100); 32])
}

/// A loopback address with a port that was free a moment ago.
fn free_addr() -> SocketAddr {
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
    socket.local_addr().expect("addr")
}

fn config(me: &Identity, listen: SocketAddr, peers: &[(&Identity, SocketAddr)]) -> QuicConfig {
    let mut config = QuicConfig::new(me.clone(), listen);
    config.peers = peers
        .iter()
        .map(|(id, addr)| (id.node_id(), *addr))
        .collect();
    config.reconnect_delay_min = Duration::from_millis(RECONNECT_DELAY_MS_MIN);
    config.reconnect_delay_max = Duration::from_millis(RECONNECT_DELAY_MS_MAX);
    config
}

type Node = (QuicTransport<TestMsg>, QuicChannels<TestMsg>);

fn start(config: QuicConfig) -> Node {
    QuicTransport::start(config).expect("transport starts")
}

fn envelope(from: NodeId, to: NodeId, msg: TestMsg) -> Envelope<TestMsg> {
    Envelope {
        from: ActorRef::new(from, ActorKind(1), ActorKey::Unit),
        to: ActorRef::new(to, ActorKind(1), ActorKey::Unit),
        msg,
    }
}

async fn recv(node: &mut Node) -> Incoming<TestMsg> {
    tokio::time::timeout(WAIT, node.1.incoming.recv())
        .await
        .expect("an envelope in time")
        .expect("transport alive")
}

/// Waits for an event matching `want`, skipping others.
async fn wait_event(node: &mut Node, want: impl Fn(&TransportEvent) -> bool) -> TransportEvent {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let event = tokio::time::timeout_at(deadline, node.1.events.recv())
            .await
            .expect("the event in time")
            .expect("transport alive");
        if want(&event) {
            return event;
        }
    }
}

fn auth_failed(reason: AuthFailure, side: Side) -> impl Fn(&TransportEvent) -> bool {
    move |e| matches!(e, TransportEvent::AuthFailed { reason: r, side: s, .. } if *r == reason && *s == side)
}

/// Sends until the peer receives one (the first sends may race the handshake).
/// Resends, as the outbox would, until the peer receives one: a message written
/// while the connection is being set up or replaced may be lost.
async fn send_until_received(from: &Node, to: &mut Node, msg: TestMsg) -> Incoming<TestMsg> {
    let (a, b) = (from.0.local_id(), to.0.local_id());
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        from.0
            .send(b, &envelope(a, b, msg.clone()))
            .expect("queued");
        let wait = tokio::time::timeout(
            Duration::from_millis(RESEND_INTERVAL_MS),
            to.1.incoming.recv(),
        );
        if let Ok(got) = wait.await {
            return got.expect("transport alive");
        }
        assert!(tokio::time::Instant::now() < deadline, "never received");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_fresh_nodes_connect_both_ways() {
    let (ia, ib) = (identity(1), identity(2));
    let (aa, ab) = (free_addr(), free_addr());
    let mut a = start(config(&ia, aa, &[(&ib, ab)]));
    let mut b = start(config(&ib, ab, &[(&ia, aa)]));

    let got = send_until_received(&a, &mut b, TestMsg::Control(7)).await;
    assert_eq!(
        got.from,
        ia.node_id(),
        "attributed to the authenticated peer"
    );
    assert_eq!(got.envelope.msg, TestMsg::Control(7));
    let got = send_until_received(&b, &mut a, TestMsg::Data(vec![9; 1000])).await;
    assert_eq!(got.from, ib.node_id());
    assert_eq!(got.envelope.msg, TestMsg::Data(vec![9; 1000]));

    wait_event(
        &mut a,
        |e| matches!(e, TransportEvent::Connected { peer } if *peer == ib.node_id()),
    )
    .await;
    wait_event(
        &mut b,
        |e| matches!(e, TransportEvent::Connected { peer } if *peer == ia.node_id()),
    )
    .await;

    a.0.shutdown().await;
    b.0.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_is_kept_per_class_on_a_connection() {
    let (ia, ib) = (identity(1), identity(2));
    let (aa, ab) = (free_addr(), free_addr());
    let a = start(config(&ia, aa, &[(&ib, ab)]));
    // B lists A where nobody answers, so A's dial is the only connection: order is
    // promised within a connection, not across a replaced one (the outbox's job).
    let mut b = start(config(&ib, ab, &[(&ia, free_addr())]));
    send_until_received(&a, &mut b, TestMsg::Control(1000)).await;
    for i in 0..100 {
        a.0.send(
            ib.node_id(),
            &envelope(ia.node_id(), ib.node_id(), TestMsg::Control(i)),
        )
        .expect("queued");
    }
    let mut controls = Vec::new();
    while controls.len() < 100 {
        // A resent copy of the warm-up message may still arrive: skip it.
        if let TestMsg::Control(i @ 0..100) = recv(&mut b).await.envelope.msg {
            controls.push(i);
        }
    }
    assert_eq!(controls, (0..100).collect::<Vec<_>>());
    a.0.shutdown().await;
    b.0.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_peer_is_seen_by_both_sides() {
    let (ia, ib) = (identity(1), identity(2));
    let (aa, ab) = (free_addr(), free_addr());
    let mut a = start(config(&ia, aa, &[(&ib, ab)]));
    let mut b = start(config(&ib, ab, &[]));
    wait_event(&mut b, auth_failed(AuthFailure::UnknownPeer, Side::Local)).await;
    wait_event(&mut a, auth_failed(AuthFailure::UnknownPeer, Side::Remote)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_peer_is_refused_by_the_acceptor_and_seen_by_both_sides() {
    let (ia, ib) = (identity(1), identity(2));
    let (aa, ab) = (free_addr(), free_addr());
    let mut a = start(config(&ia, aa, &[(&ib, ab)]));
    // B lists A but revoked it: B never dials A, so only its acceptor can refuse.
    let mut cb = config(&ib, ab, &[(&ia, aa)]);
    cb.revoked.insert(ia.node_id());
    let mut b = start(cb);
    wait_event(&mut b, auth_failed(AuthFailure::RevokedPeer, Side::Local)).await;
    wait_event(&mut a, auth_failed(AuthFailure::RevokedPeer, Side::Remote)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_peer_is_refused_by_the_dialer_and_seen_by_both_sides() {
    let (ia, ib, ic) = (identity(1), identity(2), identity(3));
    let (aa, ab) = (free_addr(), free_addr());
    // A dials C at B's address and meets B, whom A revoked.
    let mut ca = config(&ia, aa, &[(&ic, ab)]);
    ca.revoked.insert(ib.node_id());
    let mut a = start(ca);
    // B accepts A (listing it at an address where nobody answers, so B's own dials
    // go nowhere): only A's dialer check can refuse.
    let mut b = start(config(&ib, ab, &[(&ia, free_addr())]));
    wait_event(&mut a, auth_failed(AuthFailure::RevokedPeer, Side::Local)).await;
    wait_event(&mut b, auth_failed(AuthFailure::RevokedPeer, Side::Remote)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_mismatch_is_seen_by_both_sides() {
    let (ia, ib, ic) = (identity(1), identity(2), identity(3));
    let (aa, ab) = (free_addr(), free_addr());
    // A believes C lives at B's address.
    let mut a = start(config(&ia, aa, &[(&ic, ab)]));
    let mut b = start(config(&ib, ab, &[(&ia, aa)]));
    wait_event(
        &mut a,
        auth_failed(AuthFailure::IdentityMismatch, Side::Local),
    )
    .await;
    wait_event(
        &mut b,
        auth_failed(AuthFailure::IdentityMismatch, Side::Remote),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_version_is_seen_by_both_sides() {
    let (ia, ib) = (identity(1), identity(2));
    let (aa, ab) = (free_addr(), free_addr());
    let mut ca = config(&ia, aa, &[(&ib, ab)]);
    ca.protocol_version = WIRE_VERSION + 1;
    let mut a = start(ca);
    let mut b = start(config(&ib, ab, &[(&ia, aa)]));
    wait_event(
        &mut b,
        auth_failed(AuthFailure::ProtocolVersion, Side::Local),
    )
    .await;
    wait_event(
        &mut a,
        auth_failed(AuthFailure::ProtocolVersion, Side::Remote),
    )
    .await;
}

/// A client endpoint presenting `spki` as its raw public key while signing with
/// `identity`'s key: the way to offer a certificate that is not an Ed25519 identity.
fn raw_client(
    identity: &Identity,
    spki: Option<Vec<u8>>,
) -> (quinn::Endpoint, quinn::ClientConfig) {
    let provider = tls::crypto_provider();
    let mut key = tls::certified_key(identity, &provider).expect("key");
    if let Some(spki) = spki {
        let mut forged = (*key).clone();
        forged.cert = vec![rustls::pki_types::CertificateDer::from(spki)];
        key = Arc::new(forged);
    }
    let crypto = tls::client_crypto(key, tls::alpn(WIRE_VERSION)).expect("client tls");
    let endpoint =
        quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("client endpoint");
    (endpoint, quinn::ClientConfig::new(crypto))
}

/// Connects to `b` at `server` presenting `spki` while signing with `signer`'s key,
/// and asserts that both sides report `bad_certificate`. In TLS 1.3 the client
/// finishes its side of the handshake before the server has checked the client's
/// certificate, so the refusal may arrive just after the handshake.
async fn expect_bad_certificate(
    b: &mut Node,
    signer: &Identity,
    spki: Vec<u8>,
    server: SocketAddr,
) {
    let (endpoint, client) = raw_client(signer, Some(spki));
    let connecting = endpoint
        .connect_with(client, server, "conclave")
        .expect("connect");
    let error = match connecting.await {
        Err(error) => error,
        Ok(conn) => tokio::time::timeout(WAIT, conn.closed())
            .await
            .expect("refused in time"),
    };
    assert_eq!(
        auth_failure_of(&error),
        Some((AuthFailure::BadCertificate, Side::Remote)),
        "client saw {error}"
    );
    wait_event(b, auth_failed(AuthFailure::BadCertificate, Side::Local)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_certificate_is_seen_by_both_sides() {
    let (ia, ib) = (identity(1), identity(2));
    let ab = free_addr();
    let mut b = start(config(&ib, ab, &[(&ia, free_addr())]));
    expect_bad_certificate(&mut b, &ia, b"not a public key".to_vec(), ab).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presenting_another_nodes_key_is_a_bad_certificate_on_both_sides() {
    use ed25519_dalek::pkcs8::EncodePublicKey;
    let (ia, ib, mallory) = (identity(1), identity(2), identity(9));
    let ab = free_addr();
    let mut b = start(config(&ib, ab, &[(&ia, free_addr())]));
    // Mallory presents A's public key but can only sign with her own.
    let a_spki = ia
        .signing_key()
        .verifying_key()
        .to_public_key_der()
        .expect("spki")
        .as_bytes()
        .to_vec();
    expect_bad_certificate(&mut b, &mallory, a_spki, ab).await;
    // Nothing from mallory was attributed to A.
    assert!(b.1.incoming.try_recv().is_err());
}

/// Connects to `server` as `identity`, exchanges hellos, and returns the connection.
async fn raw_connect(
    identity: &Identity,
    server: SocketAddr,
) -> (quinn::Endpoint, quinn::Connection) {
    let (endpoint, client) = raw_client(identity, None);
    let conn = endpoint
        .connect_with(client, server, "conclave")
        .expect("connect")
        .await
        .expect("handshake");
    let mut hello = conn.open_uni().await.expect("hello stream");
    // The hello: its kind, then a boot id.
    hello
        .write_all(&[kind::HELLO, 0, 0, 0, 0, 0, 0, 0, 7])
        .await
        .expect("hello");
    hello.finish().expect("finish");
    let mut theirs = conn.accept_uni().await.expect("their hello");
    let mut first = [0u8; 9];
    theirs.read_exact(&mut first).await.expect("hello bytes");
    assert_eq!(first[0], kind::HELLO);
    (endpoint, conn)
}

/// Writes `bytes` to a fresh data stream of `conn`, `chunk` bytes at a time.
async fn write_chunked(conn: &quinn::Connection, bytes: &[u8], chunk: usize) {
    let mut stream = conn.open_uni().await.expect("stream");
    stream.write_all(&[kind::DATA]).await.expect("kind");
    for piece in bytes.chunks(chunk) {
        stream.write_all(piece).await.expect("write");
        tokio::time::sleep(Duration::from_millis(CHUNK_INTERVAL_MS)).await;
    }
    stream.finish().expect("finish");
}

fn framed(bytes: &[u8]) -> Vec<u8> {
    let mut out = (bytes.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(bytes);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_arriving_in_pieces_reassemble() {
    let (ia, ib) = (identity(1), identity(2));
    let ab = free_addr();
    let mut b = start(config(&ib, ab, &[(&ia, free_addr())]));
    let (_endpoint, conn) = raw_connect(&ia, ab).await;
    let first = envelope(ia.node_id(), ib.node_id(), TestMsg::Data(vec![5; 300]));
    let second = envelope(ia.node_id(), ib.node_id(), TestMsg::Control(77));
    let mut bytes = framed(&first.encode().expect("encode"));
    bytes.extend_from_slice(&framed(&second.encode().expect("encode")));
    // One byte at a time: every read returns less than a whole frame.
    write_chunked(&conn, &bytes, 1).await;
    assert_eq!(recv(&mut b).await.envelope, first);
    assert_eq!(recv(&mut b).await.envelope, second);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_garbage_frames_close_the_connection_but_not_the_node() {
    let (ia, ib, ic) = (identity(1), identity(2), identity(3));
    let (ab, ac) = (free_addr(), free_addr());
    let mut b = start(config(&ib, ab, &[(&ia, free_addr()), (&ic, ac)]));

    // A frame claiming more than the limit.
    let (_e1, conn) = raw_connect(&ia, ab).await;
    let too_big = ((ENVELOPE_BYTES_MAX + 1) as u32).to_be_bytes();
    write_chunked(&conn, &too_big, 4).await;
    match tokio::time::timeout(WAIT, conn.closed())
        .await
        .expect("closed in time")
    {
        ConnectionError::ApplicationClosed(close) => {
            assert_eq!(close.error_code, VarInt::from_u32(code::FRAME_TOO_LARGE));
            assert!(close.reason.starts_with(b"frame_too_large"));
        }
        other => panic!("expected an application close, got {other}"),
    }

    // A frame of garbage behind a valid version byte, so postcard has to refuse it.
    let (_e2, conn) = raw_connect(&ia, ab).await;
    let mut garbage = vec![WIRE_VERSION];
    garbage.extend_from_slice(&[0xff; 64]);
    write_chunked(&conn, &framed(&garbage), 65).await;
    match tokio::time::timeout(WAIT, conn.closed())
        .await
        .expect("closed in time")
    {
        ConnectionError::ApplicationClosed(close) => {
            assert_eq!(close.error_code, VarInt::from_u32(code::MALFORMED_FRAME));
            assert!(close.reason.starts_with(b"malformed_frame"));
        }
        other => panic!("expected an application close, got {other}"),
    }

    // The node still serves another peer.
    let mut c = start(config(&ic, ac, &[(&ib, ab)]));
    let got = send_until_received(&c, &mut b, TestMsg::Control(1)).await;
    assert_eq!(got.from, ic.node_id());
    c.0.shutdown().await;
    let _ = &mut c;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_send_queue_reports_backpressure() {
    let (ia, ib) = (identity(1), identity(2));
    // Nobody listens at B's address: everything queues.
    let mut ca = config(&ia, free_addr(), &[(&ib, free_addr())]);
    ca.send_queue_depth_max = 8;
    let a = start(ca);
    let env = envelope(ia.node_id(), ib.node_id(), TestMsg::Control(0));
    let mut accepted = 0;
    let refused = loop {
        match a.0.send(ib.node_id(), &env) {
            Ok(()) => accepted += 1,
            Err(e) => break e,
        }
        assert!(accepted <= 9, "queue grew past its bound");
    };
    assert_eq!(refused, SendError::Backpressure(ib.node_id()));
    // The peer task may hold one message it took for sending.
    assert!((8..=9).contains(&accepted), "accepted {accepted}");
    let stranger = identity(9).node_id();
    assert_eq!(
        a.0.send(stranger, &env),
        Err(SendError::Unreachable(stranger))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_after_the_peer_restarts_on_the_same_address() {
    let (ia, ib) = (identity(1), identity(2));
    let (aa, ab) = (free_addr(), free_addr());
    let mut a = start(config(&ia, aa, &[(&ib, ab)]));
    let mut b = start(config(&ib, ab, &[(&ia, aa)]));
    send_until_received(&a, &mut b, TestMsg::Control(1)).await;

    b.0.shutdown().await;
    drop(b);
    wait_event(&mut a, |e| matches!(e, TransportEvent::Disconnected { .. })).await;

    // The old socket is released once its last task ends: retry the bind briefly.
    let mut restarted = None;
    for _ in 0..REBIND_ATTEMPTS_MAX {
        match QuicTransport::start(config(&ib, ab, &[(&ia, aa)])) {
            Ok(node) => {
                restarted = Some(node);
                break;
            }
            Err(StartError::Bind { .. }) => {
                tokio::time::sleep(Duration::from_millis(REBIND_INTERVAL_MS)).await
            }
            Err(other) => panic!("restart failed: {other}"),
        }
    }
    let mut b = restarted.expect("B restarts on its address");
    let got = send_until_received(&a, &mut b, TestMsg::Control(2)).await;
    assert_eq!(got.envelope.msg, TestMsg::Control(2));
    a.0.shutdown().await;
    b.0.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_messages_overtake_a_large_data_transfer() {
    let (ia, ib) = (identity(1), identity(2));
    let (aa, ab) = (free_addr(), free_addr());
    let a = start(config(&ia, aa, &[(&ib, ab)]));
    // One dialer, so the connection is never replaced mid-transfer.
    let mut b = start(config(&ib, ab, &[(&ia, free_addr())]));
    send_until_received(&a, &mut b, TestMsg::Control(0)).await;

    let (from, to) = (ia.node_id(), ib.node_id());
    let data = 30;
    for _ in 0..data {
        a.0.send(to, &envelope(from, to, TestMsg::Data(vec![1; 512 * 1024])))
            .expect("queued");
    }
    for i in 1..=10 {
        a.0.send(to, &envelope(from, to, TestMsg::Control(i)))
            .expect("queued");
    }
    // Queued after 15 MiB of data, the control messages still arrive before the
    // data is through: they travel on their own stream with their own writer.
    let (mut data_seen, mut controls_done_at) = (0, None);
    while data_seen < data {
        match recv(&mut b).await.envelope.msg {
            TestMsg::Data(_) => data_seen += 1,
            TestMsg::Control(10) => controls_done_at = Some(data_seen),
            TestMsg::Control(_) => {}
        }
    }
    let at = controls_done_at.expect("all control messages arrived");
    assert!(at < data, "control waited for all {data} data messages");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stops_reading_causes_backpressure_not_growth() {
    let (ia, ib) = (identity(1), identity(2));
    let (aa, ab) = (free_addr(), free_addr());
    let mut ca = config(&ia, aa, &[(&ib, ab)]);
    ca.send_queue_depth_max = 8;
    let a = start(ca);
    let mut cb = config(&ib, ab, &[(&ia, aa)]);
    cb.incoming_depth_max = 4;
    let mut b = start(cb);
    send_until_received(&a, &mut b, TestMsg::Control(0)).await;

    // B's runtime never reads again. What A accepts is bounded by its queue, the
    // QUIC flow-control windows and B's small incoming queue.
    let (from, to) = (ia.node_id(), ib.node_id());
    let env = envelope(from, to, TestMsg::Data(vec![7; 64 * 1024]));
    let mut accepted = 0u32;
    let deadline = tokio::time::Instant::now() + WAIT;
    let refused = loop {
        match a.0.send(to, &env) {
            Ok(()) => accepted += 1,
            Err(e) => break e,
        }
        assert!(
            accepted < 400,
            "accepted {accepted} envelopes without backpressure"
        );
        assert!(
            tokio::time::Instant::now() < deadline,
            "no backpressure in time"
        );
        tokio::time::sleep(Duration::from_millis(FILL_INTERVAL_MS)).await;
    };
    assert_eq!(refused, SendError::Backpressure(to));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_offering_a_quic_draft_is_refused_by_version_negotiation() {
    let ib = identity(2);
    let ab = free_addr();
    let _b = start(config(&ib, ab, &[]));
    let (endpoint, mut client) = raw_client(&identity(1), None);
    client.version(0xff00_001d); // draft 29
    let connecting = endpoint
        .connect_with(client, ab, "conclave")
        .expect("connect");
    let error = tokio::time::timeout(WAIT, connecting)
        .await
        .expect("answered in time")
        .expect_err("refused");
    assert!(matches!(error, ConnectionError::VersionMismatch), "{error}");
}

fn tls_alert_close(alert: u8) -> ConnectionError {
    ConnectionError::ConnectionClosed(quinn::ConnectionClose {
        error_code: quinn::TransportErrorCode::crypto(alert),
        frame_type: None,
        reason: Default::default(),
    })
}

#[test]
fn certificate_alerts_read_as_bad_certificates_and_others_do_not() {
    // bad_certificate .. certificate_unknown, unknown_ca, decrypt_error,
    // certificate_required (a client that offered no certificate).
    for alert in [42, 43, 44, 45, 46, 48, 51, 116] {
        assert_eq!(
            auth_failure_of(&tls_alert_close(alert)),
            Some((AuthFailure::BadCertificate, Side::Remote)),
            "alert {alert}"
        );
    }
    // internal_error, decode_error: not about who the peer is.
    for alert in [80, 50] {
        assert_eq!(
            auth_failure_of(&tls_alert_close(alert)),
            None,
            "alert {alert}"
        );
    }
}

fn application_close(code: u32) -> ConnectionError {
    ConnectionError::ApplicationClosed(quinn::ApplicationClose {
        error_code: VarInt::from_u32(code),
        reason: Default::default(),
    })
}

#[test]
fn close_codes_are_distinct_and_only_auth_codes_read_as_auth_failures() {
    for reason in AuthFailure::ALL {
        let error = application_close(close_code(reason));
        assert_eq!(auth_failure_of(&error), Some((reason, Side::Remote)));
    }
    let others = [
        code::FRAME_TOO_LARGE,
        code::MALFORMED_FRAME,
        code::NO_HELLO,
        code::STREAM_ERROR,
        code::DUPLICATE_CONNECTION,
        code::SHUTDOWN,
    ];
    for code in others {
        assert_eq!(auth_failure_of(&application_close(code)), None, "{code:#x}");
    }
    let mut all: Vec<u32> = AuthFailure::ALL.map(close_code).to_vec();
    all.extend(others);
    let distinct: BTreeSet<u32> = all.iter().copied().collect();
    assert_eq!(
        distinct.len(),
        all.len(),
        "every close code means one thing"
    );
}

#[test]
fn backoff_doubles_up_to_its_maximum_and_jitters_below_its_ceiling() {
    let (min, max) = (Duration::from_millis(10), Duration::from_millis(70));
    let mut backoff = Backoff::new(min, max);
    for ceiling_ms in [10, 20, 40, 70, 70] {
        assert!(backoff.delay() <= Duration::from_millis(ceiling_ms));
    }
    backoff.reset();
    assert_eq!(backoff.next, min);
}

/// Starts `config`'s transport on `rt` (a runtime the test can drop as a crash).
async fn start_on(rt: &tokio::runtime::Runtime, config: QuicConfig) -> Node {
    rt.spawn(async move { start(config) })
        .await
        .expect("start task")
}

/// Starts `config`'s transport, retrying the bind while the address of a stopped
/// one is still held.
async fn restart(config: QuicConfig) -> Node {
    for _ in 0..REBIND_ATTEMPTS_MAX {
        match QuicTransport::start(config.clone()) {
            Ok(node) => return node,
            Err(StartError::Bind { .. }) => {
                tokio::time::sleep(Duration::from_millis(REBIND_INTERVAL_MS)).await
            }
            Err(other) => panic!("restart failed: {other}"),
        }
    }
    panic!("the address stayed held");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_resets_the_connections_of_its_crashed_run() {
    let ib = identity(2);
    let ab = free_addr();
    let mut server = config(&ib, ab, &[]);
    server.accept_clients = true;
    // The node's first run, on a runtime of its own: dropping it is a crash (no
    // close is sent; the connection's state is simply gone).
    let crashing = tokio::runtime::Runtime::new().expect("runtime");
    let (transport, mut channels) = start_on(&crashing, server.clone()).await;
    let link = connect_client(&identity(1), ab, Some(ib.node_id()))
        .await
        .expect("client connects");
    let served = tokio::time::timeout(WAIT, channels.clients.recv())
        .await
        .expect("handed over in time")
        .expect("a client connection");
    // Every task of that run stops for good before its handles go: a connection
    // handle dropped while its driver still runs would close it (code 0), which a
    // crash never does.
    tokio::task::spawn_blocking(move || crashing.shutdown_timeout(WAIT))
        .await
        .expect("the crashed run stops");
    drop((transport, channels, served));

    let _restarted = restart(server).await;
    // The client's next packet (a keep-alive) reaches the new run, which answers
    // with a stateless reset that only the same identity's key produces: the
    // connection ends with `Reset`, not with the idle timeout.
    let error = tokio::time::timeout(WAIT, link.conn.closed())
        .await
        .expect("the connection ends in time");
    assert!(matches!(error, ConnectionError::Reset), "{error}");
}

#[test]
fn one_address_gets_at_most_its_share_of_handshakes_and_a_proven_one_its_own() {
    use super::{admission, Admission};
    const PER: usize = HANDSHAKES_PER_ADDRESS_MAX;
    // A quiet node takes anyone.
    assert_eq!(admission((0, 0), false, true), Admission::Admit);
    // Past the threshold, an unproven address must prove itself; a proven one is taken.
    let busy = HANDSHAKES_BEFORE_RETRY;
    assert_eq!(admission((busy, 0), false, true), Admission::Retry);
    assert_eq!(admission((busy, 0), true, true), Admission::Admit);
    // One address at its share: unproven, a Retry; proven (its own share), dropped.
    assert_eq!(admission((PER, PER), false, true), Admission::Retry);
    let crowded = Admission::Drop("dropped_address");
    assert_eq!(admission((PER, PER), true, false), crowded);
    assert_eq!(admission((PER, PER - 1), true, false), Admission::Admit);
    // Full: everyone is dropped.
    let full = HANDSHAKES_IN_FLIGHT_MAX;
    assert_eq!(
        admission((full, 0), true, false),
        Admission::Drop("dropped_busy")
    );
}

//! QUIC transport throughput between two endpoints on loopback: envelopes of 256 B
//! and 16 KiB, on one stream (all data) and on two streams (control and data
//! alternating). One criterion iteration is one envelope sent and received, so the
//! time per iteration is the inverse of messages/s and the byte throughput is MB/s.
//!
//! The reference in the same run: bare quinn with the same TLS and framing, writing
//! on one and on four concurrent streams, with no queues, no envelope encoding and
//! no decoding. The ratio between the two is what the transport's own machinery
//! costs, and the one-versus-four-stream reference shows what parallel streams buy.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use conclave_actors::actor::{ActorKey, ActorKind, ActorRef};
use conclave_actors::wire::{Envelope, MessageClass, WireMessage};
use conclave_actors::Identity;
use conclave_transports::quic::{tls, QuicConfig, QuicTransport};
use conclave_transports::{Incoming, SendError, Transport};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

/// How long the warm-up waits for the first envelope (it waits for the connection).
const CONNECT_WAIT_MS_MAX: u64 = 15_000;
/// Criterion's measuring time per case.
const MEASUREMENT_MS: u64 = 5_000;

#[derive(Clone, Debug, Serialize, Deserialize)]
enum BenchMsg {
    Control(#[serde(with = "serde_bytes")] Vec<u8>),
    Data(#[serde(with = "serde_bytes")] Vec<u8>),
}

impl WireMessage for BenchMsg {
    fn class(&self) -> MessageClass {
        match self {
            BenchMsg::Control(_) => MessageClass::Control,
            BenchMsg::Data(_) => MessageClass::Data,
        }
    }
}

fn free_addr() -> SocketAddr {
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("a free port")
}

struct Pair {
    a: QuicTransport<BenchMsg>,
    _b: QuicTransport<BenchMsg>,
    _a_events: mpsc::Receiver<conclave_transports::TransportEvent>,
    b_incoming: mpsc::Receiver<Incoming<BenchMsg>>,
    from: ActorRef,
    to: ActorRef,
}

async fn pair() -> Pair {
    let (ia, ib) = (
        Identity::from_secrets(&[1; 32], [2; 32]),
        Identity::from_secrets(&[3; 32], [4; 32]),
    );
    let (aa, ab) = (free_addr(), free_addr());
    let mut ca = QuicConfig::new(ia.clone(), aa);
    ca.peers.insert(ib.node_id(), ab);
    ca.send_queue_depth_max = 4096;
    let mut cb = QuicConfig::new(ib.clone(), ab);
    cb.peers.insert(ia.node_id(), aa);
    cb.incoming_depth_max = 4096;
    let (a, a_channels) = QuicTransport::<BenchMsg>::start(ca).expect("a starts");
    let (b, b_channels) = QuicTransport::<BenchMsg>::start(cb).expect("b starts");
    let from = ActorRef::new(ia.node_id(), ActorKind(1), ActorKey::Unit);
    let to = ActorRef::new(ib.node_id(), ActorKind(1), ActorKey::Unit);
    let mut pair = Pair {
        a,
        _b: b,
        _a_events: a_channels.events,
        b_incoming: b_channels.incoming,
        from,
        to,
    };
    // Warm up: the first envelope waits for the connection.
    let warm = Envelope {
        from,
        to,
        msg: BenchMsg::Data(vec![0]),
    };
    pair.a.send(to.node, &warm).expect("queued");
    tokio::time::timeout(
        Duration::from_millis(CONNECT_WAIT_MS_MAX),
        pair.b_incoming.recv(),
    )
    .await
    .expect("connected")
    .expect("alive");
    pair
}

/// Sends `iters` envelopes as fast as the send queue takes them and waits until all
/// arrived; returns the elapsed time.
async fn run(pair: &mut Pair, iters: u64, size: usize, streams: usize) -> Duration {
    let payload = vec![0x5a; size];
    let start = Instant::now();
    let (mut sent, mut received) = (0u64, 0u64);
    while received < iters {
        while sent < iters {
            let msg = if streams == 2 && sent % 2 == 1 {
                BenchMsg::Control(payload.clone())
            } else {
                BenchMsg::Data(payload.clone())
            };
            let env = Envelope {
                from: pair.from,
                to: pair.to,
                msg,
            };
            match pair.a.send(pair.to.node, &env) {
                Ok(()) => sent += 1,
                Err(SendError::Backpressure(_)) => break,
                Err(e) => panic!("send failed: {e}"),
            }
        }
        pair.b_incoming.recv().await.expect("alive");
        received += 1;
    }
    start.elapsed()
}

/// A bare quinn connection using the transport's TLS, with `streams` open streams.
struct Raw {
    streams: Vec<Arc<tokio::sync::Mutex<quinn::SendStream>>>,
    frames: mpsc::UnboundedReceiver<()>,
    _endpoints: (quinn::Endpoint, quinn::Endpoint),
    _conn: quinn::Connection,
}

async fn raw(streams: usize) -> Raw {
    let (ia, ib) = (
        Identity::from_secrets(&[5; 32], [6; 32]),
        Identity::from_secrets(&[7; 32], [8; 32]),
    );
    let provider = tls::crypto_provider();
    let alpn = tls::alpn(conclave_actors::wire::WIRE_VERSION);
    let server = quinn::ServerConfig::with_crypto(
        tls::server_crypto(
            tls::certified_key(&ib, &provider).expect("key"),
            vec![alpn.clone()],
        )
        .expect("server tls"),
    );
    let client = quinn::ClientConfig::new(
        tls::client_crypto(tls::certified_key(&ia, &provider).expect("key"), alpn)
            .expect("client tls"),
    );
    let b = quinn::Endpoint::server(server, "127.0.0.1:0".parse().expect("addr")).expect("b");
    let a = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("a");
    let b_addr = b.local_addr().expect("addr");
    let (tx, frames) = mpsc::unbounded_channel();
    let acceptor = b.clone();
    tokio::spawn(async move {
        let Some(incoming) = acceptor.accept().await else {
            return;
        };
        let Ok(conn) = incoming.await else { return };
        while let Ok(mut stream) = conn.accept_uni().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut len = [0u8; 4];
                while stream.read_exact(&mut len).await.is_ok() {
                    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
                    if stream.read_exact(&mut body).await.is_err() || tx.send(()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    let conn = a
        .connect_with(client, b_addr, "conclave")
        .expect("connect")
        .await
        .expect("handshake");
    let mut open = Vec::new();
    for _ in 0..streams {
        open.push(Arc::new(tokio::sync::Mutex::new(
            conn.open_uni().await.expect("stream"),
        )));
    }
    Raw {
        streams: open,
        frames,
        _endpoints: (a, b),
        _conn: conn,
    }
}

/// Writes `iters` frames spread over the streams, concurrently, and waits until the
/// receiver has read them all.
async fn run_raw(raw: &mut Raw, iters: u64, size: usize) -> Duration {
    let mut frame = (size as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&vec![0x5a; size]);
    let frame = Arc::new(frame);
    let start = Instant::now();
    let k = raw.streams.len() as u64;
    let mut writers = Vec::new();
    for (i, stream) in raw.streams.iter().enumerate() {
        let share = iters / k + u64::from((i as u64) < iters % k);
        let (stream, frame) = (Arc::clone(stream), Arc::clone(&frame));
        writers.push(tokio::spawn(async move {
            let mut stream = stream.lock().await;
            for _ in 0..share {
                stream.write_all(&frame).await.expect("write");
            }
        }));
    }
    for _ in 0..iters {
        raw.frames.recv().await.expect("alive");
    }
    for w in writers {
        w.await.expect("writer");
    }
    start.elapsed()
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut pair = rt.block_on(pair());
    let mut group = c.benchmark_group("quic_loopback");
    group.measurement_time(Duration::from_millis(MEASUREMENT_MS));
    group.sample_size(20);
    for (label, size) in [("256B", 256usize), ("16KiB", 16 * 1024)] {
        for streams in [1usize, 2] {
            group.throughput(Throughput::Bytes(size as u64));
            group.bench_function(format!("{label}/{streams}_stream"), |b| {
                b.iter_custom(|iters| rt.block_on(run(&mut pair, iters, size, streams)))
            });
        }
        for streams in [1usize, 4] {
            let mut reference = rt.block_on(raw(streams));
            group.throughput(Throughput::Bytes(size as u64));
            group.bench_function(format!("{label}/bare_quinn_{streams}_stream"), |b| {
                b.iter_custom(|iters| rt.block_on(run_raw(&mut reference, iters, size)))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

//! Metrics and health: the Prometheus exporter, `/metrics` and `/healthz`, and a
//! store wrapper that times commits.
//!
//! Metrics go through the `metrics` facade; [`install_prometheus`] installs its
//! Prometheus exporter with explicit histogram buckets (so every histogram is
//! exposed as a histogram, never a summary). Names carry the `conclave_` prefix,
//! base units (seconds, bytes) and `_total` on counters; labels are low-cardinality
//! only (a reason, a kind), never a room, user or peer id.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use conclave_storage::{Entry, Order, ReadTxn, Store, StoreError, WriteTxn};
use conclave_transports::throttle::Throttle;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use metrics_exporter_prometheus::{BuildError, PrometheusBuilder, PrometheusHandle};
use serde::Serialize;
use std::ops::Bound;

use crate::Node;

/// Bucket bounds (seconds) of every latency histogram: 100 µs to 30 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
];

/// Bucket bounds of the messages-per-group-commit histogram: 1 to the batch bound
/// ([`conclave_actors::lifecycle::BATCH_MESSAGES_MAX`]).
pub const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// Installs the Prometheus exporter as the process's metrics recorder and
/// describes conclave's metrics. Call once per process.
pub fn install_prometheus() -> Result<PrometheusHandle, BuildError> {
    let handle = PrometheusBuilder::new()
        .set_buckets(LATENCY_BUCKETS)?
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full("conclave_batch_transactions".into()),
            BATCH_BUCKETS,
        )?
        .install_recorder()?;
    describe();
    Ok(handle)
}

/// Counters the node exports, with their HELP text.
const COUNTERS: &[(&str, &str)] = &[
    (
        "conclave_raft_leader_terms_total",
        "Terms in which this node became leader of one of its Raft groups.",
    ),
    (
        "conclave_raft_term_changes_total",
        "Term changes seen in this node's Raft groups (elections, won or not).",
    ),
    (
        "conclave_raft_hand_overs_total",
        "Raft groups this node handed to their first replica, so that leaders spread.",
    ),
    (
        "conclave_raft_proposals_refused_total",
        "Proposals refused at once, by reason (no_quorum: no leader known or rejoining).",
    ),
    (
        "conclave_raft_proposals_expired_total",
        "Proposals no longer waited on after 200 ticks (they may still commit).",
    ),
    (
        "conclave_raft_messages_refused_total",
        "Raft messages from other nodes dropped, by reason (sender, layout, unknown_group, malformed, misaddressed, fenced, refused).",
    ),
    (
        "conclave_raft_rejoins_total",
        "Raft groups this node rejoined (after its store was lost or a log repaired) and votes in again.",
    ),
    (
        "conclave_raft_corrupt_logs_total",
        "Raft logs that failed their checksum and were repaired from the other replicas.",
    ),
    (
        "conclave_raft_groups_unopened_total",
        "Times a Raft group could not be opened from the store (tried again at the next tick).",
    ),
    (
        "conclave_raft_turns_failed_total",
        "Raft group turns whose persistence failed (the group is reopened from the store).",
    ),
    (
        "conclave_frames_published_total",
        "Frames handed to this node by its users for publishing.",
    ),
    (
        "conclave_frames_committed_total",
        "Frames this node sequenced as a room's home, or (rooms on shard groups) took from its users and saw committed by the room's shard.",
    ),
    (
        "conclave_frames_delivered_total",
        "Frames this node stored as a member node of their room (rooms on shard groups: as a replica of its shard).",
    ),
    (
        "conclave_frames_rejected_total",
        "Frames a room's home refused, by reason.",
    ),
    (
        "conclave_requests_denied_total",
        "Requests refused, by reason.",
    ),
    (
        "conclave_outbox_retries_total",
        "Outbox resends after a delay without acknowledgement.",
    ),
    (
        "conclave_transport_auth_failures_total",
        "Node connections refused, by reason.",
    ),
    (
        "conclave_client_auth_failures_total",
        "Client connections refused, by reason.",
    ),
    (
        "conclave_client_connections_silent_total",
        "Client connections closed because nothing arrived on them for 2.5 s while their user was at the connection limit.",
    ),
    (
        "conclave_client_refusals_total",
        "Chain links, sealed keys and frames a user's client refused (they do not verify against the room's membership chain, or come out of sequence), by reason.",
    ),
    (
        "conclave_client_reconnects_total",
        "Connections a user's client replaced after its connection to the node died.",
    ),
    (
        "conclave_frames_duplicate_total",
        "Frames a member node received again and dropped.",
    ),
    (
        "conclave_inbox_duplicates_total",
        "Outbox messages received again from a peer and dropped.",
    ),
    (
        "conclave_inbox_gaps_total",
        "Outbox messages received after a gap and dropped (the sender resends in order).",
    ),
    (
        "conclave_inbox_resyncs_total",
        "Times a peer followed another node's stream afresh, by reason (first, new_incarnation: that node restarted or its store was reset or restored; behind: this node's store lost what it had taken).",
    ),
    (
        "conclave_inbox_deferred_total",
        "Deliveries of a new stream left for the sender to resend until what the peer held of the old one was finished.",
    ),
    (
        "conclave_keys_rejected_total",
        "Sealed keys from a room's home refused, by reason.",
    ),
    (
        "conclave_updates_stale_total",
        "Membership snapshots skipped on a member node because a newer one was applied.",
    ),
    (
        "conclave_evictions_refused_total",
        "Evictions of revoked members not made, by reason.",
    ),
    (
        "conclave_batch_commit_failures_total",
        "Group commits that failed (their batch and what it sent were dropped).",
    ),
    (
        "conclave_updates_rejected_total",
        "Room updates (and late outcomes) from a room's home refused, by reason.",
    ),
    (
        "conclave_history_pages_refused_total",
        "Requests of a member node for the next page of a room's history not answered, by reason (full outboxes and store failures are asked again).",
    ),
    (
        "conclave_outcomes_unreported_total",
        "Decisions on forwarded requests whose word for the asking node could not be queued (the request is offered again), by reason.",
    ),
    (
        "conclave_runtime_messages_dropped_total",
        "Messages the actor runtime dropped, by reason.",
    ),
    (
        "conclave_client_connections_refused_total",
        "Client connections refused before authentication, by reason.",
    ),
    (
        "conclave_client_requests_refused_total",
        "Client requests refused before they were read, by reason (too_large, truncated, undecodable, too_slow, busy, stream_failed).",
    ),
    (
        "conclave_transport_frames_in_total",
        "Envelopes received from peers.",
    ),
    (
        "conclave_transport_frames_out_total",
        "Envelopes sent to peers.",
    ),
    (
        "conclave_transport_frames_rejected_total",
        "Received frames refused (too large, malformed), by reason.",
    ),
    (
        "conclave_transport_handshakes_total",
        "QUIC handshakes, by result: ok (incoming, and dials to peers), and for incoming ones retry, dropped_busy, timed_out, auth_failed, protocol_error, version_mismatch, closed_by_peer, reset, closed_locally, cids_exhausted).",
    ),
    (
        "conclave_transport_reconnects_total",
        "Reconnections to peers.",
    ),
    (
        "conclave_transport_events_dropped_total",
        "Transport events dropped because nobody read them.",
    ),
];

/// Gauges the node exports, with their HELP text.
const GAUGES: &[(&str, &str)] = &[
    (
        "conclave_raft_groups",
        "This node's Raft groups by role: leader, follower, without_leader (proposals refused no_quorum), rejoining, unopened.",
    ),
    (
        "conclave_raft_log_entries_max",
        "The most entries one of this node's Raft group logs holds (no compaction yet: at 1,048,576 the group refuses proposals, limit).",
    ),
    (
        "conclave_raft_lag_entries",
        "As leader: the most log entries any voter of one of this node's groups lacks.",
    ),
    (
        "conclave_outbox_depth",
        "Messages waiting in this node's outboxes for acknowledgement.",
    ),
    (
        "conclave_peers_connected",
        "Peer nodes with an authenticated connection.",
    ),
    (
        "conclave_active_actors",
        "Actors active in memory, by kind (kind=\"room\": active rooms).",
    ),
    (
        "conclave_clients_connected",
        "Authenticated client connections.",
    ),
    (
        "conclave_transport_connections_open",
        "Open node-to-node connections.",
    ),
    (
        "conclave_transport_send_queue_depth",
        "Envelopes waiting in peers' send queues.",
    ),
    (
        "conclave_transport_handshakes_in_flight",
        "Incoming QUIC handshakes in progress (at most 256; past 16, clients must answer a Retry first).",
    ),
];

/// Histograms of seconds the node exports, with their HELP text.
const HISTOGRAMS_SECONDS: &[(&str, &str)] = &[
    (
        "conclave_publish_to_commit_seconds",
        "From a frame's creation by its publisher to its commit on the room's home.",
    ),
    (
        "conclave_commit_to_deliver_seconds",
        "From a frame's commit on the room's home to its storage on a member node (rooms on shard groups: from its proposal to its storage on each replica).",
    ),
    (
        "conclave_storage_commit_seconds",
        "Duration of a durable storage commit.",
    ),
];

/// Histograms of counts the node exports, with their HELP text.
const HISTOGRAMS_COUNT: &[(&str, &str)] = &[(
    "conclave_batch_transactions",
    "Messages whose writes one group commit made durable.",
)];

/// Counters of bytes the node exports, with their HELP text.
const COUNTERS_BYTES: &[(&str, &str)] = &[
    (
        "conclave_transport_bytes_in_total",
        "Bytes of envelopes received from peers.",
    ),
    (
        "conclave_transport_bytes_out_total",
        "Bytes of envelopes sent to peers.",
    ),
];

/// Gives every metric its HELP text (and its unit where it has one).
fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    for &(name, help) in COUNTERS {
        describe_counter!(name, help);
    }
    for &(name, help) in GAUGES {
        describe_gauge!(name, help);
    }
    for &(name, help) in HISTOGRAMS_SECONDS {
        describe_histogram!(name, Unit::Seconds, help);
    }
    for &(name, help) in HISTOGRAMS_COUNT {
        describe_histogram!(name, Unit::Count, help);
    }
    for &(name, help) in COUNTERS_BYTES {
        describe_counter!(name, Unit::Bytes, help);
    }
}

/// A store whose commits are timed into `conclave_storage_commit_seconds`.
pub struct MeteredStore<S> {
    inner: Arc<S>,
}

impl<S> MeteredStore<S> {
    /// Wraps `inner`.
    pub fn new(inner: Arc<S>) -> Self {
        Self { inner }
    }
}

struct MeteredTxn<'a> {
    inner: Box<dyn WriteTxn + 'a>,
}

impl ReadTxn for MeteredTxn<'_> {
    fn get(&self, table: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.get(table, key)
    }

    fn scan(
        &self,
        table: &str,
        lower: Bound<&[u8]>,
        upper: Bound<&[u8]>,
        order: Order,
        limit: usize,
    ) -> Result<Vec<Entry>, StoreError> {
        self.inner.scan(table, lower, upper, order, limit)
    }
}

impl WriteTxn for MeteredTxn<'_> {
    fn put(&mut self, table: &str, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.inner.put(table, key, value)
    }

    fn delete(&mut self, table: &str, key: &[u8]) -> Result<bool, StoreError> {
        self.inner.delete(table, key)
    }

    fn commit(self: Box<Self>) -> Result<(), StoreError> {
        let start = Instant::now();
        let result = self.inner.commit();
        metrics::histogram!("conclave_storage_commit_seconds")
            .record(start.elapsed().as_secs_f64());
        result
    }
}

impl<S: Store> Store for MeteredStore<S> {
    fn usage(&self) -> Result<Option<conclave_storage::Usage>, StoreError> {
        self.inner.usage()
    }

    fn read(&self) -> Result<Box<dyn ReadTxn + '_>, StoreError> {
        self.inner.read()
    }

    fn write(&self) -> Result<Box<dyn WriteTxn + '_>, StoreError> {
        Ok(Box::new(MeteredTxn {
            inner: self.inner.write()?,
        }))
    }
}

/// What `/healthz` reports.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Health {
    /// The node's actors, store and transport are running, and its last commit
    /// succeeded.
    pub ready: bool,
    /// Why it is not ready (see [`crate::Node::failure`]).
    #[serde(default)]
    pub failure: Option<String>,
    /// The node id.
    pub node_id: String,
    /// Peers with an authenticated connection now.
    pub peers_connected: usize,
    /// Peers configured.
    pub peers_known: usize,
    /// Node and client connections use TLS 1.3 with mutual authentication (always).
    pub tls: bool,
    /// The data directory.
    pub data_dir: String,
    /// This node's Raft groups, as its replicas actor last reported them
    /// (`null`: replication is off, or nothing reported yet). A group without
    /// a leader refuses what is proposed to it (`no_quorum`).
    #[serde(default)]
    pub replication: Option<conclave_actors::replication::ReplicationStatus>,
}

fn response(
    status: StatusCode,
    content_type: &str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    if let Ok(value) = content_type.parse() {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}

fn route(
    req: &Request<hyper::body::Incoming>,
    handle: &PrometheusHandle,
    node: &Node,
) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => response(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            handle.render(),
        ),
        (&Method::GET, "/healthz") => {
            let health = node.health();
            let status = if health.ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            let body = serde_json::to_vec(&health).unwrap_or_default();
            response(status, "application/json", body)
        }
        _ => response(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /metrics or /healthz\n",
        ),
    }
}

/// Serves `/metrics` and `/healthz` on `addr` until the node shuts down; returns
/// the bound address. Also runs the exporter's upkeep.
pub async fn serve_http(
    addr: SocketAddr,
    handle: PrometheusHandle,
    node: Node,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    tokio::spawn(accept_http(listener, handle, node));
    tracing::info!(addr = %bound, "serving /metrics and /healthz");
    Ok(bound)
}

/// Connections to the metrics server served at once; more wait in the kernel's
/// backlog.
const HTTP_CONNECTIONS_MAX: usize = 64;
/// How long a client may take to send a request's headers (a slowloris is cut).
const HTTP_HEADER_WAIT_MS: u64 = 5_000;
/// How long one connection may last, requests included (a client that never reads
/// its response is cut).
const HTTP_CONNECTION_MS_MAX: u64 = 60_000;
/// The pause after a failed accept (out of file descriptors, say), so that the
/// loop does not spin.
const HTTP_ACCEPT_RETRY_MS: u64 = 100;

async fn accept_http(listener: tokio::net::TcpListener, handle: PrometheusHandle, node: Node) {
    static ACCEPT_FAILED: Throttle = Throttle::new();
    let permits = Arc::new(tokio::sync::Semaphore::new(HTTP_CONNECTIONS_MAX));
    loop {
        let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                if let Some(suppressed) = ACCEPT_FAILED.admit() {
                    tracing::warn!(%error, suppressed, "metrics server: accept failed");
                }
                tokio::time::sleep(Duration::from_millis(HTTP_ACCEPT_RETRY_MS)).await;
                continue;
            }
        };
        let (handle, node) = (handle.clone(), node.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |req| {
                let response = route(&req, &handle, &node);
                async move { Ok::<_, Infallible>(response) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_millis(HTTP_HEADER_WAIT_MS))
                .serve_connection(io, service);
            let lifetime = Duration::from_millis(HTTP_CONNECTION_MS_MAX);
            match tokio::time::timeout(lifetime, connection).await {
                Ok(Err(error)) => tracing::debug!(%error, "metrics connection ended"),
                Err(_) => tracing::debug!("metrics connection cut: open too long"),
                Ok(Ok(())) => {}
            }
        });
    }
}

/// A minimal HTTP/1.0 GET of `path` on `addr`: the status code and the body. For
/// readiness checks and tests; not a general client.
pub async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut raw = Vec::new();
    // Bounded: a metrics page is well under this.
    stream.take(64 << 20).read_to_end(&mut raw).await?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {head:?}")))?;
    Ok((status, body.to_string()))
}

//! Authentication failures are counted by reason in
//! `conclave_transport_auth_failures_total{reason}`. Alone in its test binary,
//! because it installs the process-wide metrics recorder.

use std::collections::BTreeMap;
use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use conclave_actors::wire::WireMessage;
use conclave_actors::Identity;
use conclave_transports::quic::{QuicConfig, QuicTransport};
use conclave_transports::{AuthFailure, Side, TransportEvent};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

#[derive(Debug, Serialize, Deserialize)]
struct Msg;

impl WireMessage for Msg {}

fn free_addr() -> SocketAddr {
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("a free port")
}

/// The auth-failure counters by reason. One snapshot: taking it resets the
/// recorder's counters.
fn auth_failures(snapshotter: &Snapshotter) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        if key.key().name() != "conclave_transport_auth_failures_total" {
            continue;
        }
        let reason = key
            .key()
            .labels()
            .find(|l| l.key() == "reason")
            .map(|l| l.value().to_string())
            .unwrap_or_default();
        if let DebugValue::Counter(n) = value {
            *out.entry(reason).or_insert(0) += n;
        }
    }
    out
}

/// How long a test waits for an event that should come.
const EVENT_WAIT_MS_MAX: u64 = 15_000;

/// Waits for an `unknown_peer` failure decided by `side`.
async fn wait_unknown_peer(events: &mut mpsc::Receiver<TransportEvent>, side: Side) {
    let found = tokio::time::timeout(Duration::from_millis(EVENT_WAIT_MS_MAX), async {
        while let Some(event) = events.recv().await {
            if matches!(event, TransportEvent::AuthFailed { reason: AuthFailure::UnknownPeer, side: s, .. } if s == side)
            {
                return true;
            }
        }
        false
    })
    .await
    .expect("the failure in time");
    assert!(found, "event channel closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_failures_are_counted_by_reason_on_both_sides() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder
        .install()
        .expect("the only recorder in this binary");

    let ia = Identity::from_secrets(&[1; 32], [2; 32]);
    let ib = Identity::from_secrets(&[3; 32], [4; 32]);
    let (aa, ab) = (free_addr(), free_addr());
    let mut ca = QuicConfig::new(ia.clone(), aa);
    ca.peers.insert(ib.node_id(), ab);
    // B does not know A: A's dials are refused with unknown_peer, on both sides.
    let (_a, mut a) = QuicTransport::<Msg>::start(ca).expect("a starts");
    let (_b, mut b) = QuicTransport::<Msg>::start(QuicConfig::new(ib, ab)).expect("b starts");
    wait_unknown_peer(&mut b.events, Side::Local).await;
    wait_unknown_peer(&mut a.events, Side::Remote).await;

    // Counted by the refusing side and by the refused side, and under no other
    // reason.
    let counted = auth_failures(&snapshotter);
    let unknown = counted.get(AuthFailure::UnknownPeer.as_str()).copied();
    assert!(unknown >= Some(2), "{counted:?}");
    assert_eq!(counted.len(), 1, "{counted:?}");
}

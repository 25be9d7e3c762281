//! Authentication failures are counted by reason in
//! `conclave_transport_auth_failures_total{reason}`. Alone in its test binary,
//! because it installs the process-wide metrics recorder.

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

/// The counter's value for `reason`, or zero.
fn auth_failures(snapshotter: &Snapshotter, reason: AuthFailure) -> u64 {
    snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter(|(key, _, _, _)| {
            key.key().name() == "conclave_transport_auth_failures_total"
                && key
                    .key()
                    .labels()
                    .any(|l| l.key() == "reason" && l.value() == reason.as_str())
        })
        .map(|(_, _, _, value)| match value {
            DebugValue::Counter(n) => n,
            _ => 0,
        })
        .sum()
}

/// Waits for an `unknown_peer` failure decided by `side`.
async fn wait_unknown_peer(events: &mut mpsc::Receiver<TransportEvent>, side: Side) {
    let found = tokio::time::timeout(Duration::from_secs(15), async {
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

    // Counted by the refusing side and by the refused side.
    assert!(auth_failures(&snapshotter, AuthFailure::UnknownPeer) >= 2);
    for other in [
        AuthFailure::RevokedPeer,
        AuthFailure::IdentityMismatch,
        AuthFailure::BadCertificate,
        AuthFailure::ProtocolVersion,
    ] {
        assert_eq!(auth_failures(&snapshotter, other), 0, "{other}");
    }
}

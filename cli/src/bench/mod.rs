//! `conclave bench`: conclave side by side with NATS JetStream, and against the
//! crypto and fsync floors, in one run on one machine.
//!
//! conclave runs as a local three-node cluster of **separate node processes** (the
//! `cluster up` machinery: QUIC on loopback, LMDB with fsync before acknowledgement),
//! so that CPU time, context switches and peak memory can be read per node from
//! `/proc`. The load is driven over the client protocol (`RemoteNode`) from this
//! process, which seals and opens every frame as a real client does. The peer is
//! nats-server 2.15 (installed by `scripts/install-bench-deps.sh`; the bench never
//! installs software) with JetStream file storage, a single node (R1) and a
//! three-node cluster (R3), each with fsync before acknowledging
//! (`sync_interval: always`, conclave's durability) and with its default
//! (acknowledge, fsync later); driven with `async-nats`: publish with
//! acknowledgement, one durable pull consumer per member, and, in the `+crypto`
//! rows, the very same sealing and opening (`domain::client::seal`/`open`).
//!
//! Each message carries its index and send time in its (plaintext) body, so
//! publish-to-commit is measured at the publisher (receipt / ack) and
//! publish-to-deliver when the last member has decrypted it.
//!
//! Output: the report on stdout and in `DIR/bench.md`, the same as data in
//! `DIR/bench.json`, latency charts, and a last stdout line `summary: ...`.

mod conclave;
mod driver;
mod floor;
mod jetstream;
mod json;
mod report;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Args;

use driver::{Durability, Result_};
use floor::{crypto_floor, fsync_floor, Floor, FsyncFloor};
use jetstream::JsSpec;
use json::{Outcome, RunJson, Summary};

/// Options of `conclave bench`.
#[derive(Args, Clone, Debug)]
pub struct BenchArgs {
    /// Small counts and only the +crypto JetStream rows: the whole run takes about a
    /// minute (for CI and spot checks).
    #[arg(long)]
    pub quick: bool,
    /// Messages per run at maximum throughput [default: 6000; 600 with --quick].
    #[arg(long, value_name = "N")]
    pub messages: Option<usize>,
    /// Publishes in flight at maximum throughput (every row; half load is measured
    /// at this window).
    #[arg(long, value_name = "N", default_value_t = 64)]
    pub in_flight: usize,
    /// The larger window of the extra workload-a rows (conclave, JetStream R3 +
    /// crypto); 0 for none.
    #[arg(long, value_name = "N", default_value_t = 256)]
    pub wide_in_flight: usize,
    /// Rooms of workload c [default: 10000; 150 with --quick].
    #[arg(long, value_name = "N")]
    pub rooms: Option<usize>,
    /// Workloads: a (1 room, 3 members), b (1 room, 30 members), c (many rooms)
    /// [default: a,b,c; a,c with --quick, where b's 30 R3 consumers alone take ~25 s].
    #[arg(long, value_delimiter = ',')]
    pub workloads: Vec<String>,
    /// JetStream peers: r1, r3 (or none). Each runs with fsync before acknowledging
    /// (`sync_interval: always`) and with its default, with the same client-side
    /// crypto as conclave and (not with --quick) without.
    #[arg(long, value_delimiter = ',', default_value = "r1,r3")]
    pub jetstream: Vec<String>,
    /// The nats-server to run [default: the one scripts/install-bench-deps.sh
    /// installs, else the first on the PATH]; 2.10 or newer.
    #[arg(long, value_name = "PATH")]
    pub nats_server: Option<PathBuf>,
    /// Payload size in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = 256)]
    pub size: usize,
    /// Working directory (emptied per cluster); the report (bench.md, bench.json,
    /// latency-*.svg) goes here, and the fsync floor is measured on its disk.
    #[arg(long, value_name = "DIR", default_value = "./data/bench")]
    pub dir: PathBuf,
    /// First port: conclave nodes at P.., their metrics at P+100.., nats at P+200...
    #[arg(long, value_name = "P", default_value_t = 7600)]
    pub base_port: u16,
}

impl BenchArgs {
    fn messages(&self) -> usize {
        self.messages
            .unwrap_or(if self.quick { 600 } else { 6000 })
            .max(16)
    }
    fn rooms(&self) -> usize {
        self.rooms.unwrap_or(if self.quick { 150 } else { 10_000 })
    }
    fn fsync_iterations(&self) -> usize {
        if self.quick {
            200
        } else {
            1000
        }
    }
    fn crypto_iterations(&self) -> usize {
        if self.quick {
            1000
        } else {
            10_000
        }
    }
    fn has(&self, workload: &str) -> bool {
        if self.workloads.is_empty() {
            return workload != "b" || !self.quick;
        }
        self.workloads.iter().any(|w| w == workload)
    }
}

/// Runs the benchmark, prints the report and writes it (bench.md, bench.json,
/// charts); the summary line comes last on stdout.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    // Before anything is measured: a missing or too old peer stops the run at once.
    let nats = if args.jetstream.iter().any(|j| j == "r1" || j == "r3") {
        Some(jetstream::nats_server(args.nats_server.as_deref())?)
    } else {
        None
    };
    std::fs::create_dir_all(&args.dir)?;
    let started = Instant::now();
    let mut report = String::new();
    let _ = writeln!(
        report,
        "machine: {}; peer: {}; {} B payloads, {} messages at max with {} in flight{}, then {} at half that rate{}\n",
        report::machine(),
        nats.as_ref()
            .map_or("none".into(), |(exe, v)| format!("{v} ({})", exe.display())),
        args.size,
        args.messages(),
        args.in_flight,
        if args.wide_in_flight > 0 {
            format!(" (and {} in the wide-window rows)", args.wide_in_flight)
        } else {
            String::new()
        },
        args.messages() / 2,
        if args.quick { " (--quick)" } else { "" }
    );
    eprintln!("== crypto floor, fsync floor");
    let floor = crypto_floor(args.crypto_iterations(), args.size)?;
    report.push_str(&report::crypto_line(&floor, args.size));
    report.push('\n');
    let mut notes = Vec::new();
    let fsync = match fsync_floor(&args.dir, args.fsync_iterations()) {
        Ok(f) => {
            report.push_str(&report::fsync_line(&f));
            report.push('\n');
            Some(f)
        }
        Err(e) => {
            notes.push(format!("fsync floor not measured: {e:#}"));
            None
        }
    };
    eprint!("{report}");
    let (results, room_notes) = room_workloads(
        &args,
        nats.as_ref().map(|(exe, _)| exe.as_path()),
        &floor,
        started,
    )
    .await;
    notes.extend(room_notes);
    report.push_str(&report::results_table(&results, args.in_flight));
    report.push('\n');
    report.push_str(&report::ratio_table(&results, args.in_flight));
    let rooms = if args.has("c") {
        workload_c(&args, started, &mut report, &mut notes).await
    } else {
        None
    };
    finish(
        &args,
        report,
        &Measured {
            nats: nats.as_ref(),
            floor: &floor,
            fsync: fsync.as_ref(),
            results: &results,
            rooms: rooms.as_ref(),
            notes: &notes,
            started,
        },
    )
}

/// Workload c, its paragraph added to `report` (or a note when it failed).
async fn workload_c(
    args: &BenchArgs,
    started: Instant,
    report: &mut String,
    notes: &mut Vec<String>,
) -> Option<conclave::RoomsResult> {
    eprintln!(
        "== conclave, workload c (at {:.0} s)",
        started.elapsed().as_secs_f64()
    );
    match conclave::conclave_rooms(args).await {
        Ok(c) => {
            report.push_str(&report::rooms_line(&c));
            Some(c)
        }
        Err(e) => {
            notes.push(format!("conclave workload c failed: {e:#}"));
            None
        }
    }
}

/// What a run measured, for its report's end and its files.
struct Measured<'a> {
    /// nats-server and its version.
    nats: Option<&'a (PathBuf, String)>,
    floor: &'a Floor,
    fsync: Option<&'a FsyncFloor>,
    results: &'a [Result_],
    rooms: Option<&'a conclave::RoomsResult>,
    notes: &'a [String],
    started: Instant,
}

/// Ends the report (notes, durability, time), prints it, writes the files, and
/// prints the summary line last.
fn finish(args: &BenchArgs, mut report: String, m: &Measured<'_>) -> anyhow::Result<()> {
    if !m.notes.is_empty() {
        report.push_str("\nnotes:\n");
        for n in m.notes {
            let _ = writeln!(report, "- {n}");
        }
    }
    let seconds = m.started.elapsed().as_secs_f64();
    let _ = writeln!(
        report,
        "\n{}\n\ntook {seconds:.0} s",
        report::DURABILITY_TEXT
    );
    let summary = Summary::new(m.results, args.in_flight, m.floor);
    let document = json::document(&Outcome {
        run: RunJson {
            machine: report::machine(),
            quick: args.quick,
            size_bytes: args.size,
            messages: args.messages(),
            in_flight: args.in_flight,
            wide_in_flight: args.wide_in_flight,
            nats_server: m.nats.map(|(exe, _)| exe.display().to_string()),
            nats_server_version: m.nats.map(|(_, v)| v.clone()),
            seconds,
        },
        crypto_floor: m.floor,
        fsync_floor: m.fsync,
        results: m.results,
        rooms: m.rooms,
        summary: &summary,
        notes: m.notes,
    });
    println!("{report}");
    write_report(args, &report, m.results, &document)?;
    println!("{}", summary.line());
    Ok(())
}

/// conclave's runs of a room workload, as (window, with a half-load run): the base
/// window, and for workload a the wide one (throughput only).
fn conclave_plan(args: &BenchArgs, workload: &str) -> Vec<(usize, bool)> {
    let mut plan = vec![(args.in_flight, true)];
    if workload == "a" && args.wide_in_flight > 0 && args.wide_in_flight != args.in_flight {
        plan.push((args.wide_in_flight, false));
    }
    plan
}

/// The JetStream rows of a room workload, as (spec, with a half-load run): each
/// peer asked for, fsync-before-ack and default, with the same crypto as conclave
/// (and raw, except under --quick), at the base window; for workload a, R3 +
/// crypto also at the wide window (fsync-before-ack; the default too unless quick).
fn jetstream_plan(args: &BenchArgs, workload: &str) -> Vec<(JsSpec, bool)> {
    let durabilities = [Durability::FsyncBeforeAck, Durability::AckBeforeFsync];
    let cryptos: &[bool] = if args.quick { &[true] } else { &[false, true] };
    let peers: Vec<usize> = args
        .jetstream
        .iter()
        .filter_map(|j| match j.as_str() {
            "r1" => Some(1),
            "r3" => Some(3),
            _ => None,
        })
        .collect();
    let mut plan = Vec::new();
    for &nodes in &peers {
        for durability in durabilities {
            for &crypto in cryptos {
                let window = args.in_flight;
                plan.push((
                    JsSpec {
                        nodes,
                        durability,
                        crypto,
                        window,
                    },
                    true,
                ));
            }
        }
    }
    let wide = conclave_plan(args, workload).len() > 1;
    if wide && peers.contains(&3) {
        let wide_durabilities = if args.quick {
            &durabilities[..1]
        } else {
            &durabilities[..]
        };
        for &durability in wide_durabilities {
            let window = args.wide_in_flight;
            plan.push((
                JsSpec {
                    nodes: 3,
                    durability,
                    crypto: true,
                    window,
                },
                false,
            ));
        }
    }
    plan
}

/// Workloads a and b on conclave, then on each JetStream row of the plan: the
/// results, and a note per failed run.
async fn room_workloads(
    args: &BenchArgs,
    nats: Option<&Path>,
    floor: &Floor,
    started: Instant,
) -> (Vec<Result_>, Vec<String>) {
    let mut results = Vec::new();
    let mut notes = Vec::new();
    let at = || format!("at {:.0} s", started.elapsed().as_secs_f64());
    for (workload, per_node) in [("a", 1usize), ("b", 10)] {
        if !args.has(workload) {
            continue;
        }
        for (window, half) in conclave_plan(args, workload) {
            eprintln!(
                "== conclave, workload {workload}, {window} in flight ({})",
                at()
            );
            match conclave::conclave_room(args, workload, per_node, window, half, floor).await {
                Ok(r) => results.push(r),
                Err(e) => notes.push(format!("conclave workload {workload} failed: {e:#}")),
            }
        }
        let Some(exe) = nats else { continue };
        for (spec, half) in jetstream_plan(args, workload) {
            let row = Result_ {
                system: format!("JetStream R{}", spec.nodes),
                durability: spec.durability,
                crypto: spec.crypto,
                window: spec.window,
                ..Result_::default()
            };
            let label = row.label(args.in_flight);
            eprintln!("== {label}, workload {workload} ({})", at());
            let members = per_node * 3;
            match jetstream::jetstream(args, exe, spec, workload, members, half, floor).await {
                Ok(r) => results.push(r),
                Err(e) => notes.push(format!("{label} workload {workload} failed: {e:#}")),
            }
        }
    }
    for r in &results {
        for n in &r.notes {
            notes.push(format!("{} {}: {n}", r.label(args.in_flight), r.workload));
        }
    }
    (results, notes)
}

/// Writes `DIR/bench.md`, `DIR/bench.json` and the latency charts of workloads a
/// and b.
fn write_report(
    args: &BenchArgs,
    report: &str,
    results: &[Result_],
    document: &serde_json::Value,
) -> anyhow::Result<()> {
    std::fs::write(args.dir.join("bench.md"), report)?;
    let json = serde_json::to_string_pretty(document)?;
    std::fs::write(args.dir.join("bench.json"), json + "\n")?;
    for w in ["a", "b"] {
        if results.iter().any(|r| r.workload == w) {
            let svg = report::latency_svg(results, w, args.in_flight);
            std::fs::write(args.dir.join(format!("latency-{w}.svg")), svg)?;
        }
    }
    eprintln!(
        "wrote {} (and bench.json, latency-*.svg there)",
        args.dir.join("bench.md").display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        bench: BenchArgs,
    }

    fn args(flags: &[&str]) -> BenchArgs {
        let argv = std::iter::once("bench").chain(flags.iter().copied());
        Cli::try_parse_from(argv).expect("valid flags").bench
    }

    #[test]
    fn the_quick_plan_has_the_rows_the_summary_needs() {
        let quick = args(&["--quick"]);
        assert_eq!(conclave_plan(&quick, "a"), vec![(64, true), (256, false)]);
        let plan = jetstream_plan(&quick, "a");
        let has = |nodes, durability, window| {
            plan.iter().any(|(s, _)| {
                *s == JsSpec {
                    nodes,
                    durability,
                    crypto: true,
                    window,
                }
            })
        };
        assert!(has(3, Durability::FsyncBeforeAck, 64));
        assert!(has(3, Durability::AckBeforeFsync, 64));
        assert!(has(3, Durability::FsyncBeforeAck, 256));
        assert!(
            plan.iter().all(|(s, _)| s.crypto),
            "--quick skips the raw rows"
        );
        assert_eq!(plan.len(), 5);
    }

    #[test]
    fn the_full_plan_runs_raw_and_crypto_both_ways_on_both_peers() {
        let full = args(&[]);
        let plan = jetstream_plan(&full, "a");
        assert_eq!(plan.len(), 2 * 2 * 2 + 2);
        assert!(plan
            .iter()
            .filter(|(s, _)| s.window == 256)
            .all(|(s, half)| { s.nodes == 3 && s.crypto && !half }));
        assert_eq!(jetstream_plan(&full, "b").len(), 8, "no wide window for b");
        assert_eq!(conclave_plan(&full, "b"), vec![(64, true)]);
        let none = args(&["--jetstream", "none", "--wide-in-flight", "0"]);
        assert!(jetstream_plan(&none, "a").is_empty());
        assert_eq!(conclave_plan(&none, "a"), vec![(64, true)]);
    }
}

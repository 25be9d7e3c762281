//! `conclave-sim`: sweep seeds, replay one exactly, check that every mutation is
//! caught.
//!
//! ```text
//! conclave-sim run --seeds A..B [--nodes N] [--mutation NAME] [--revocations] [--rooms-on-shards]
//! conclave-sim replay --seed N [--trace FILE] [--print-hash] [--nodes N] [--mutation NAME] [--revocations] [--rooms-on-shards]
//! conclave-sim mutations [--seeds A..B] [--nodes N]
//! ```
//!
//! The simulation itself never reads a clock; this binary does, only to report how
//! fast virtual time runs against wall time.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::str::FromStr;
use std::time::Duration;

use clap::{Parser, Subcommand};
use conclave_actors::mutation::{self, Mutation};
use conclave_sim::{run, run_with, Options, Report};

#[derive(Parser)]
#[command(
    name = "conclave-sim",
    version,
    about = "conclave's deterministic simulator: whole clusters, chaos by seed, oracles proven by mutations"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a range of seeds and summarize.
    Run {
        /// Seeds to run, `A..B` (B excluded).
        #[arg(long)]
        seeds: Seeds,
        /// Nodes per cluster (default: each seed picks 3 to 5).
        #[arg(long)]
        nodes: Option<usize>,
        /// Switch a mutation on (needs a build with `--features mutations`).
        #[arg(long)]
        mutation: Option<String>,
        /// What every seed does that only some would.
        #[command(flatten)]
        forced: Forced,
    },
    /// Replay one seed exactly.
    Replay {
        /// The seed.
        #[arg(long)]
        seed: u64,
        /// Write every event, one per line, to this file.
        #[arg(long)]
        trace: Option<PathBuf>,
        /// Print the trace hash as the last line.
        #[arg(long)]
        print_hash: bool,
        /// Nodes per cluster, as given to `run` (default: the seed picks).
        #[arg(long)]
        nodes: Option<usize>,
        /// The mutation, as given to `run`.
        #[arg(long)]
        mutation: Option<String>,
        /// As given to `run`.
        #[command(flatten)]
        forced: Forced,
    },
    /// Run every mutation over the seeds until an oracle catches it.
    Mutations {
        /// Seeds to try per mutation, `A..B` (B excluded).
        #[arg(long, default_value = "0..200")]
        seeds: Seeds,
        /// Nodes per cluster (default: each seed picks 3 to 5).
        #[arg(long)]
        nodes: Option<usize>,
    },
}

/// A seed range `A..B`.
#[derive(Clone, Copy, Debug)]
struct Seeds {
    start: u64,
    end: u64,
}

impl FromStr for Seeds {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (a, b) = s
            .split_once("..")
            .ok_or_else(|| format!("expected A..B, got {s:?}"))?;
        let start = a.trim().parse().map_err(|e| format!("{a:?}: {e}"))?;
        let end = b.trim().parse().map_err(|e| format!("{b:?}: {e}"))?;
        if end < start {
            return Err(format!("empty range {s:?}"));
        }
        Ok(Seeds { start, end })
    }
}

impl Seeds {
    fn len(&self) -> u64 {
        self.end - self.start
    }
}

/// Wall-clock time, for speed figures only (the simulation never sees it).
#[allow(clippy::disallowed_types, clippy::disallowed_methods)]
struct Stopwatch(std::time::Instant);

#[allow(clippy::disallowed_types, clippy::disallowed_methods)]
impl Stopwatch {
    fn start() -> Self {
        Stopwatch(std::time::Instant::now())
    }

    fn elapsed(&self) -> Duration {
        self.0.elapsed()
    }
}

/// Writes the trace file (the only file this binary writes).
#[allow(clippy::disallowed_methods)]
fn write_file(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    std::fs::write(path, text)
}

fn parse_mutation(name: Option<&str>) -> Result<Option<Mutation>, String> {
    let Some(name) = name else { return Ok(None) };
    let Some(m) = Mutation::from_name(name) else {
        let names: Vec<&str> = Mutation::ALL.iter().map(|m| m.name()).collect();
        return Err(format!(
            "unknown mutation {name:?}; known: {}",
            names.join(", ")
        ));
    };
    if !mutation::available() {
        return Err(
            "this build has no mutations: build with `cargo build --release -p conclave-sim --features mutations`"
                .into(),
        );
    }
    Ok(Some(m))
}

/// The options of `seed`, as the command line shapes them.
/// What the command line makes every seed do, that the seed draws for some.
#[derive(clap::Args, Clone, Copy, Debug, Default)]
struct Forced {
    /// Let nodes' admins revoke users in every seed (by default a third of the
    /// seeds do).
    #[arg(long)]
    revocations: bool,
    /// Put rooms on shard groups in every seed (by default half the seeds do).
    #[arg(long)]
    rooms_on_shards: bool,
}

fn options(seed: u64, nodes: Option<usize>, mutation: Option<Mutation>, forced: Forced) -> Options {
    let mut options = Options::derive(seed, nodes, mutation);
    options.revocations |= forced.revocations;
    if forced.rooms_on_shards {
        options.put_rooms_on_shards();
    }
    options
}

fn replay_command(seed: u64, nodes: Option<usize>, mutation: Option<Mutation>) -> String {
    let mut cmd = format!("conclave-sim replay --seed {seed}");
    if let Some(n) = nodes {
        cmd.push_str(&format!(" --nodes {n}"));
    }
    if let Some(m) = mutation {
        cmd.push_str(&format!(" --mutation {}", m.name()));
    }
    cmd
}

struct Progress {
    on: bool,
    total: u64,
}

impl Progress {
    fn new(total: u64) -> Self {
        Progress {
            on: std::io::stderr().is_terminal(),
            total,
        }
    }

    fn show(&self, done: u64, failures: usize, label: &str) {
        if !self.on {
            return;
        }
        const WIDTH: u64 = 30;
        let filled = (done * WIDTH).checked_div(self.total).unwrap_or(WIDTH);
        let bar: String = (0..WIDTH)
            .map(|i| if i < filled { '#' } else { '-' })
            .collect();
        eprint!(
            "\r{label} [{bar}] {done}/{} seeds, {failures} failing ",
            self.total
        );
        let _ = std::io::stderr().flush();
    }

    fn clear(&self) {
        if self.on {
            eprint!("\r{:80}\r", "");
        }
    }
}

/// What a sweep ran, summed over its seeds.
#[derive(Default)]
struct Sweep {
    failures: Vec<Report>,
    virtual_time: Duration,
    events: u64,
    handled: u64,
    totals: conclave_sim::run::Stats,
    wiped: u64,
}

impl Sweep {
    fn add(&mut self, report: Report) {
        self.virtual_time += report.virtual_time;
        self.events += report.events;
        self.handled += report.handled;
        let (s, t) = (report.stats, &mut self.totals);
        t.published += s.published;
        t.committed += s.committed;
        t.invites += s.invites;
        t.removals += s.removals;
        t.rekeys += s.rekeys;
        t.evictions += s.evictions;
        t.lies += s.lies;
        t.refused += s.refused;
        t.read += s.read;
        t.crashes += s.crashes;
        t.partitions += s.partitions;
        t.pauses += s.pauses;
        t.raft_terms += s.raft_terms;
        t.raft_entries += s.raft_entries;
        t.raft_acked += s.raft_acked;
        t.raft_refused += s.raft_refused;
        if report.options.wipe {
            self.wiped += 1;
        }
        if report.failure.is_some() {
            self.failures.push(report);
        }
    }

    fn print(&self, seeds: Seeds, nodes: Option<usize>, mutation: Option<Mutation>, wall: f64) {
        let t = &self.totals;
        println!(
            "seeds run: {} ({}..{}), nodes: {}, mutation: {}",
            seeds.len(),
            seeds.start,
            seeds.end,
            nodes.map_or("3 to 5, drawn per seed".to_string(), |n| n.to_string()),
            mutation.map_or("none", |m| m.name())
        );
        println!(
            "workload: {} frames published, {} committed, {} read by subscribers (verified, decrypted); {} invites, {} removals with rekey, {} rekeys, {} evictions of revoked members",
            t.published, t.committed, t.read, t.invites, t.removals, t.rekeys, t.evictions
        );
        println!(
            "faults: {} crashes, {} partitions, {} process pauses; {} seeds lost a node for good (what it took is stated in their replay); {} keys slipped to users by their own node, {} keys refused by clients",
            t.crashes, t.partitions, t.pauses, self.wiped, t.lies, t.refused
        );
        println!(
            "raft: {} leader terms, {} entries committed (through every node's groups); proposals: {} acknowledged, {} refused",
            t.raft_terms, t.raft_entries, t.raft_acked, t.raft_refused
        );
        println!(
            "speed: {:.1} seeds/s; {:.0} virtual seconds in {:.1} wall seconds = {:.0} virtual s per wall s; {:.0} events/s ({:.0} messages handled/s)",
            seeds.len() as f64 / wall,
            self.virtual_time.as_secs_f64(),
            wall,
            self.virtual_time.as_secs_f64() / wall,
            self.events as f64 / wall,
            self.handled as f64 / wall,
        );
        println!("failures: {}", self.failures.len());
        for report in &self.failures {
            let Some(failure) = &report.failure else {
                continue;
            };
            println!("  seed {} {failure}", report.options.seed);
            let mut replay = replay_command(report.options.seed, nodes, mutation);
            if report.options.revocations {
                replay.push_str(" --revocations");
            }
            if report.options.domain.replication.is_some_and(|r| r.rooms) {
                replay.push_str(" --rooms-on-shards");
            }
            println!("    replay: {replay}");
            for line in report.options.to_string().lines().skip(1) {
                println!("    {}", line.trim_start());
            }
        }
    }
}

fn sweep(
    seeds: Seeds,
    nodes: Option<usize>,
    mutation: Option<Mutation>,
    forced: Forced,
) -> ExitCode {
    let progress = Progress::new(seeds.len());
    let watch = Stopwatch::start();
    let mut sweep = Sweep::default();
    for (k, seed) in (seeds.start..seeds.end).enumerate() {
        progress.show(k as u64, sweep.failures.len(), "run");
        sweep.add(run(&options(seed, nodes, mutation, forced)));
    }
    progress.clear();
    let wall = watch.elapsed().as_secs_f64().max(1e-9);
    sweep.print(seeds, nodes, mutation, wall);
    if sweep.failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn replay(
    seed: u64,
    nodes: Option<usize>,
    mutation: Option<Mutation>,
    forced: Forced,
    trace: Option<PathBuf>,
    print_hash: bool,
) -> ExitCode {
    let options = options(seed, nodes, mutation, forced);
    println!("{options}");
    let report = run_with(&options, trace.is_some());
    let s = report.stats;
    println!(
        "ran {:.3} virtual seconds: {} events, {} messages handled; {} frames published, {} committed, {} read; {} invites, {} removals, {} rekeys, {} evictions; {} crashes, {} partitions, {} pauses; {} lies, {} keys refused",
        report.virtual_time.as_secs_f64(),
        report.events,
        report.handled,
        s.published,
        s.committed,
        s.read,
        s.invites,
        s.removals,
        s.rekeys,
        s.evictions,
        s.crashes,
        s.partitions,
        s.pauses,
        s.lies,
        s.refused
    );
    println!(
        "raft: {} leader terms, {} entries committed; proposals: {} acknowledged, {} refused",
        s.raft_terms, s.raft_entries, s.raft_acked, s.raft_refused
    );
    for note in &report.notes {
        println!("note: {note}");
    }
    let mut code = ExitCode::SUCCESS;
    if let (Some(path), Some(lines)) = (&trace, &report.trace) {
        let mut text = lines.join("\n");
        text.push('\n');
        if let Err(e) = write_file(path, &text) {
            eprintln!("could not write the trace to {}: {e}", path.display());
            code = ExitCode::FAILURE;
        } else {
            println!(
                "trace: {} events written to {}",
                lines.len(),
                path.display()
            );
        }
    }
    match &report.failure {
        Some(failure) => {
            println!("FAILED {failure}");
            code = ExitCode::FAILURE;
        }
        None => println!("passed: every oracle holds"),
    }
    if print_hash {
        println!("{:016x}", report.hash);
    }
    code
}

/// How a mutation was caught: the seed, how many seeds it took, what the oracle
/// saw, and whether the seed passes without the mutation.
type Caught = (u64, u64, conclave_sim::Failure, bool);

/// Runs `m` over the seeds until an oracle catches it, then the catching seed
/// without it (which must pass, or the catch proves nothing about the mutation).
fn catch(m: Mutation, seeds: Seeds, nodes: Option<usize>) -> Option<Caught> {
    let progress = Progress::new(seeds.len());
    let mut caught = None;
    for (k, seed) in (seeds.start..seeds.end).enumerate() {
        progress.show(k as u64, 0, m.name());
        let report = run(&Options::derive(seed, nodes, Some(m)));
        if let Some(failure) = report.failure {
            caught = Some((seed, k as u64 + 1, failure));
            break;
        }
    }
    progress.clear();
    let (seed, tried, failure) = caught?;
    let clean = run(&Options::derive(seed, nodes, None));
    Some((seed, tried, failure, clean.failure.is_none()))
}

/// `detail`, cut to fit a table row.
fn cut(detail: &str) -> String {
    const DETAIL_CHARS_MAX: usize = 110;
    let mut detail = detail.to_string();
    if detail.len() > DETAIL_CHARS_MAX {
        let mut end = DETAIL_CHARS_MAX;
        while !detail.is_char_boundary(end) {
            end -= 1;
        }
        detail.truncate(end);
        detail.push('…');
    }
    detail
}

fn print_mutations(rows: &[(Mutation, Option<Caught>)], seeds: Seeds) {
    println!(
        "{:<24} {:<6} {:<11} {:>5} {:>9}  {:<14} what the oracle saw",
        "mutation", "caught", "oracle", "seeds", "at seed", "seed w/o it"
    );
    for (m, row) in rows {
        match row {
            Some((seed, tried, failure, clean_ok)) => println!(
                "{:<24} {:<6} {:<11} {:>5} {:>9}  {:<14} {}",
                m.name(),
                "yes",
                failure.oracle,
                tried,
                seed,
                if *clean_ok { "passes" } else { "FAILS TOO" },
                cut(&failure.detail)
            ),
            None => println!(
                "{:<24} {:<6} {:<11} {:>5} {:>9}  {:<14} -",
                m.name(),
                "NO",
                "-",
                seeds.len(),
                "-",
                "-"
            ),
        }
    }
}

fn mutations(seeds: Seeds, nodes: Option<usize>) -> ExitCode {
    if !mutation::available() {
        eprintln!(
            "this build has no mutations: build with `cargo build --release -p conclave-sim --features mutations`"
        );
        return ExitCode::FAILURE;
    }
    let watch = Stopwatch::start();
    let rows: Vec<(Mutation, Option<Caught>)> = Mutation::ALL
        .into_iter()
        .map(|m| (m, catch(m, seeds, nodes)))
        .collect();
    let all_caught = rows
        .iter()
        .all(|(_, row)| row.as_ref().is_some_and(|(_, _, _, clean_ok)| *clean_ok));
    print_mutations(&rows, seeds);
    println!(
        "seeds {}..{}; {:.1} wall seconds",
        seeds.start,
        seeds.end,
        watch.elapsed().as_secs_f64()
    );
    for (m, row) in &rows {
        if let Some((seed, _, _, _)) = row {
            println!("  {}: {}", m.name(), replay_command(*seed, nodes, Some(*m)));
        }
    }
    if all_caught {
        ExitCode::SUCCESS
    } else {
        println!("some mutation was not caught (or its seed fails without it too)");
        ExitCode::FAILURE
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run {
            seeds,
            nodes,
            mutation,
            forced,
        } => match parse_mutation(mutation.as_deref()) {
            Ok(m) => sweep(seeds, nodes, m, forced),
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(2)
            }
        },
        Command::Replay {
            seed,
            trace,
            print_hash,
            nodes,
            mutation,
            forced,
        } => match parse_mutation(mutation.as_deref()) {
            Ok(m) => replay(seed, nodes, m, forced, trace, print_hash),
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(2)
            }
        },
        Command::Mutations { seeds, nodes } => mutations(seeds, nodes),
    }
}

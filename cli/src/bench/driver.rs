//! The load driver, its recorder, and what `/proc` tells of the processes under load.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::anyhow;
use tokio::sync::Semaphore;

use super::BenchArgs;

// ---------------------------------------------------------------------------------
// Process accounting
// ---------------------------------------------------------------------------------

/// CPU seconds (user + system), memory and context switches of one process.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct ProcSample {
    pub(super) cpu: f64,
    pub(super) rss_kb: u64,
    pub(super) hwm_kb: u64,
    /// Summed over the threads alive at the sample (see `context_switches`).
    pub(super) switches: Switches,
}

/// Context switches: voluntary (the thread blocked: a lock, a channel, I/O, fsync)
/// and nonvoluntary (the scheduler preempted it).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(super) struct Switches {
    pub(super) voluntary: u64,
    pub(super) nonvoluntary: u64,
}

/// Context switches per delivered message over a measured run, all servers summed.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub(super) struct SwitchesPerMsg {
    pub(super) voluntary: f64,
    pub(super) nonvoluntary: f64,
    pub(super) total: f64,
}

impl SwitchesPerMsg {
    /// The switches between `before` and `after` (one sample per process) divided by
    /// `delivered`; `None` when nothing was delivered.
    pub(super) fn between(
        before: &[ProcSample],
        after: &[ProcSample],
        delivered: usize,
    ) -> Option<Self> {
        assert_eq!(before.len(), after.len(), "one sample per process, twice");
        if delivered == 0 {
            return None;
        }
        let (mut voluntary, mut nonvoluntary) = (0u64, 0u64);
        for (b, a) in before.iter().zip(after) {
            voluntary += a.switches.voluntary.saturating_sub(b.switches.voluntary);
            nonvoluntary += a
                .switches
                .nonvoluntary
                .saturating_sub(b.switches.nonvoluntary);
        }
        let n = delivered as f64;
        Some(SwitchesPerMsg {
            voluntary: voluntary as f64 / n,
            nonvoluntary: nonvoluntary as f64 / n,
            total: (voluntary + nonvoluntary) as f64 / n,
        })
    }
}

/// The value of `key` (e.g. `VmRSS:`) in a `/proc/.../status` text, 0 when absent.
fn status_field(status: &str, key: &str) -> u64 {
    status
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A process's context switches. `/proc/PID/status` counts only the main thread's,
/// and a node's work happens on its runtime's and storage's threads, so this sums
/// `/proc/PID/task/*/status`. Threads that exit between two samples take their
/// counts with them (an undercount, never an overcount).
fn context_switches(pid: u32) -> Switches {
    let mut total = Switches::default();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return total;
    };
    for task in tasks.flatten() {
        if let Ok(status) = std::fs::read_to_string(task.path().join("status")) {
            total.voluntary += status_field(&status, "voluntary_ctxt_switches:");
            total.nonvoluntary += status_field(&status, "nonvoluntary_ctxt_switches:");
        }
    }
    total
}

fn clock_ticks() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map_or(100.0, |t| t as f64)
}

pub(super) fn proc_sample(pid: u32) -> anyhow::Result<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = &stat[stat.rfind(')').ok_or_else(|| anyhow!("bad stat"))? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields after the command start at field 3 (state): utime is 14, stime 15.
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    Ok(ProcSample {
        cpu: ticks as f64 / clock_ticks(),
        rss_kb: status_field(&status, "VmRSS:"),
        hwm_kb: status_field(&status, "VmHWM:"),
        switches: context_switches(pid),
    })
}

pub(super) fn samples(pids: &[u32]) -> Vec<ProcSample> {
    pids.iter()
        .map(|&p| proc_sample(p).unwrap_or_default())
        .collect()
}

// ---------------------------------------------------------------------------------
// The load driver and its recorder
// ---------------------------------------------------------------------------------

#[derive(Clone, Copy, Default)]
pub(super) struct Slot {
    sent_ns: u64,
    commit_ns: u64,
    seen: u32,
    done_ns: u64,
}

/// Per message: when it was sent, committed, and seen by every member.
pub(super) struct Recorder {
    t0: Instant,
    members: u32,
    slots: Mutex<Vec<Slot>>,
}

impl Recorder {
    pub(super) fn new(members: usize, capacity: usize) -> Arc<Self> {
        Arc::new(Recorder {
            t0: Instant::now(),
            members: u32::try_from(members).unwrap_or(u32::MAX),
            slots: Mutex::new(vec![Slot::default(); capacity]),
        })
    }
    fn now_ns(&self) -> u64 {
        u64::try_from(self.t0.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Slot>> {
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }
    /// A body of `size` bytes carrying `index` and the send time.
    fn body(&self, index: usize, size: usize) -> Vec<u8> {
        let now = self.now_ns();
        if let Some(slot) = self.lock().get_mut(index) {
            slot.sent_ns = now;
        }
        let mut body = vec![0x42u8; size.max(16)];
        body[..8].copy_from_slice(&(index as u64).to_le_bytes());
        body[8..16].copy_from_slice(&now.to_le_bytes());
        body
    }
    fn committed(&self, index: usize) {
        let now = self.now_ns();
        if let Some(slot) = self.lock().get_mut(index) {
            slot.commit_ns = now;
        }
    }
    /// A member decrypted `body`.
    pub(super) fn delivered(&self, body: &[u8]) {
        if body.len() < 16 {
            return;
        }
        let mut index = [0u8; 8];
        index.copy_from_slice(&body[..8]);
        let index = usize::try_from(u64::from_le_bytes(index)).unwrap_or(usize::MAX);
        let now = self.now_ns();
        if let Some(slot) = self.lock().get_mut(index) {
            slot.seen += 1;
            if slot.seen == self.members {
                slot.done_ns = now;
            }
        }
    }
    fn delivered_count(&self, range: std::ops::Range<usize>) -> (usize, usize) {
        let slots = self.lock();
        let committed = slots[range.clone()]
            .iter()
            .filter(|s| s.commit_ns > 0)
            .count();
        let done = slots[range].iter().filter(|s| s.done_ns > 0).count();
        (committed, done)
    }
}

pub(super) type PublishFn = Arc<
    dyn Fn(usize, Vec<u8>) -> Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>>
        + Send
        + Sync,
>;

#[derive(Clone, Copy, Debug)]
pub(super) enum Load {
    Max { in_flight: usize },
    Rate { per_sec: f64 },
}

/// What one run at one load measured.
#[derive(Clone, Debug, Default)]
pub(super) struct Phase {
    pub(super) sent: usize,
    pub(super) committed: usize,
    pub(super) delivered: usize,
    pub(super) commit_rate: f64,
    pub(super) deliver_rate: f64,
    pub(super) commit_lat: Vec<f64>,
    pub(super) deliver_lat: Vec<f64>,
    pub(super) failures: usize,
    pub(super) first_failure: Option<String>,
}

pub(super) async fn drive(
    rec: &Arc<Recorder>,
    publish: &PublishFn,
    publishers: usize,
    base: usize,
    n: usize,
    size: usize,
    load: Load,
) -> Phase {
    let permits = Arc::new(Semaphore::new(match load {
        Load::Max { in_flight } => in_flight.max(1),
        Load::Rate { .. } => 4096,
    }));
    let start = Instant::now();
    let start_ns = rec.now_ns();
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        if let Load::Rate { per_sec } = load {
            let at = start + Duration::from_secs_f64(i as f64 / per_sec.max(1.0));
            tokio::time::sleep_until(at.into()).await;
        }
        let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
            break;
        };
        let index = base + i;
        let body = rec.body(index, size);
        let publish = Arc::clone(publish);
        let rec = Arc::clone(rec);
        tasks.push(tokio::spawn(async move {
            let result = publish(i % publishers.max(1), body).await;
            if result.is_ok() {
                rec.committed(index);
            }
            drop(permit);
            result
        }));
    }
    let mut phase = Phase {
        sent: n,
        ..Phase::default()
    };
    for task in tasks {
        match task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                phase.failures += 1;
                phase.first_failure.get_or_insert(format!("{e:#}"));
            }
            Err(e) => {
                phase.failures += 1;
                phase.first_failure.get_or_insert(e.to_string());
            }
        }
    }
    // Wait until every committed message reached every member, or progress stops.
    let range = base..base + n;
    let mut last = (0, 0);
    let mut last_progress = Instant::now();
    loop {
        let now = rec.delivered_count(range.clone());
        if now.1 >= now.0 {
            break;
        }
        if now != last {
            last = now;
            last_progress = Instant::now();
        } else if last_progress.elapsed() > Duration::from_secs(10) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let slots = rec.lock();
    let mut last_commit = start_ns;
    let mut last_done = start_ns;
    for slot in &slots[range] {
        if slot.commit_ns > 0 {
            phase.committed += 1;
            phase
                .commit_lat
                .push(slot.commit_ns.saturating_sub(slot.sent_ns) as f64 / 1e6);
            last_commit = last_commit.max(slot.commit_ns);
        }
        if slot.done_ns > 0 {
            phase.delivered += 1;
            phase
                .deliver_lat
                .push(slot.done_ns.saturating_sub(slot.sent_ns) as f64 / 1e6);
            last_done = last_done.max(slot.done_ns);
        }
    }
    phase.commit_rate = phase.committed as f64 / ((last_commit - start_ns) as f64 / 1e9).max(1e-9);
    phase.deliver_rate = phase.delivered as f64 / ((last_done - start_ns) as f64 / 1e9).max(1e-9);
    phase.commit_lat.sort_by(f64::total_cmp);
    phase.deliver_lat.sort_by(f64::total_cmp);
    phase
}

pub(super) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// A system under one workload: its runs at maximum and at half load.
#[derive(Clone, Debug, Default)]
pub(super) struct Result_ {
    /// "conclave", "JetStream R1" or "JetStream R3".
    pub(super) system: String,
    pub(super) workload: String,
    pub(super) durability: Durability,
    /// Whether clients seal and open every message (conclave always does).
    pub(super) crypto: bool,
    /// Publishes in flight at maximum throughput.
    pub(super) window: usize,
    pub(super) members: usize,
    pub(super) max: Phase,
    /// Empty when this row has no half-load run (the wide-window rows).
    pub(super) half: Phase,
    /// CPU seconds per committed message during the maximum run: servers, client.
    pub(super) cpu_server: f64,
    pub(super) cpu_client: f64,
    /// Peak RSS per server process (MiB).
    pub(super) peak_rss_mib: Vec<f64>,
    /// The crypto floor for this system and workload, msg/s on the whole machine.
    pub(super) floor: Option<f64>,
    /// Server context switches per delivered message during the maximum run.
    pub(super) switches: Option<SwitchesPerMsg>,
    pub(super) notes: Vec<String>,
}

/// When a system acknowledges a publish relative to making it durable.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum Durability {
    /// fsync before acknowledging: conclave (LMDB), JetStream `sync_interval: always`.
    #[default]
    FsyncBeforeAck,
    /// JetStream's default: acknowledge once written (R1) or stored by a quorum (R3),
    /// fsync every `sync_interval` (2 minutes).
    AckBeforeFsync,
}

impl Durability {
    /// The word in row labels and the summary's names.
    pub(super) fn word(self) -> &'static str {
        match self {
            Durability::FsyncBeforeAck => "always",
            Durability::AckBeforeFsync => "default",
        }
    }
}

impl Result_ {
    /// The row's name in the tables: e.g. `JetStream R3 always+crypto` or
    /// `conclave`, with the window when it is not `base_window`.
    pub(super) fn label(&self, base_window: usize) -> String {
        let mut label = self.system.clone();
        if self.system != "conclave" {
            label.push(' ');
            label.push_str(self.durability.word());
            if self.crypto {
                label.push_str("+crypto");
            }
        }
        if self.window != base_window {
            label.push_str(&format!(" ({} in flight)", self.window));
        }
        label
    }
}

/// Runs warm-up, the maximum-throughput run at `result.window` in flight and, when
/// `with_half`, the half-load run.
#[allow(clippy::too_many_arguments)]
pub(super) async fn measure(
    args: &BenchArgs,
    rec: &Arc<Recorder>,
    publish: &PublishFn,
    publishers: usize,
    server_pids: &[u32],
    with_half: bool,
    result: &mut Result_,
) {
    assert!(
        result.window > 0,
        "a run needs at least one publish in flight"
    );
    let n = args.messages();
    let warm = (n / 10).max(8);
    let max = Load::Max {
        in_flight: result.window,
    };
    // The same load twice: a warm-up (not measured), then the measured run.
    let warmup = drive(rec, publish, publishers, 0, warm, args.size, max).await;
    if warmup.failures > 0 {
        result.notes.push(format!(
            "warm-up: {} failures ({})",
            warmup.failures,
            warmup.first_failure.unwrap_or_default()
        ));
    }
    let servers_before = samples(server_pids);
    let client_before = proc_sample(std::process::id()).unwrap_or_default();
    result.max = drive(rec, publish, publishers, warm, n, args.size, max).await;
    let servers_after = samples(server_pids);
    let client_after = proc_sample(std::process::id()).unwrap_or_default();
    let committed = result.max.committed.max(1) as f64;
    result.cpu_server = servers_after
        .iter()
        .zip(&servers_before)
        .map(|(a, b)| a.cpu - b.cpu)
        .sum::<f64>()
        / committed;
    result.cpu_client = (client_after.cpu - client_before.cpu) / committed;
    result.switches =
        SwitchesPerMsg::between(&servers_before, &servers_after, result.max.delivered);
    if with_half && result.max.delivered > 0 {
        half_load(args, rec, publish, publishers, warm + n, result).await;
    } else if with_half {
        // Half of a delivery rate of zero is no load to measure latency at.
        result
            .notes
            .push("no half-load run: nothing was delivered at maximum load".into());
    }
    result.peak_rss_mib = samples(server_pids)
        .iter()
        .map(|s| s.hwm_kb as f64 / 1024.0)
        .collect();
    for (name, phase) in [("max", &result.max), ("half", &result.half)] {
        if phase.sent == 0 {
            continue;
        }
        if phase.failures > 0 || phase.delivered < phase.committed {
            result.notes.push(format!(
                "{name}: {} sent, {} committed, {} delivered to all, {} failures{}",
                phase.sent,
                phase.committed,
                phase.delivered,
                phase.failures,
                phase
                    .first_failure
                    .as_ref()
                    .map(|f| format!(" (first: {f})"))
                    .unwrap_or_default()
            ));
        }
    }
}

/// Half as many messages as the maximum run, paced at half the rate it reached:
/// latency when the system is not saturated.
async fn half_load(
    args: &BenchArgs,
    rec: &Arc<Recorder>,
    publish: &PublishFn,
    publishers: usize,
    base: usize,
    result: &mut Result_,
) {
    let rate = result.max.commit_rate.min(result.max.deliver_rate) / 2.0;
    let load = Load::Rate { per_sec: rate };
    let n = args.messages() / 2;
    result.half = drive(rec, publish, publishers, base, n, args.size, load).await;
}

pub(super) fn capacity(args: &BenchArgs) -> usize {
    let n = args.messages();
    (n / 10).max(8) + n + n / 2
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(voluntary: u64, nonvoluntary: u64) -> ProcSample {
        ProcSample {
            switches: Switches {
                voluntary,
                nonvoluntary,
            },
            ..ProcSample::default()
        }
    }

    #[test]
    fn context_switches_per_message_sum_the_processes_and_divide_by_delivered() {
        let before = [sample(100, 10), sample(50, 5)];
        let after = [sample(400, 30), sample(150, 25)];
        let per_msg = SwitchesPerMsg::between(&before, &after, 100).expect("delivered");
        assert_eq!(
            per_msg,
            SwitchesPerMsg {
                voluntary: 4.0,
                nonvoluntary: 0.4,
                total: 4.4,
            }
        );
        assert_eq!(SwitchesPerMsg::between(&before, &after, 0), None);
    }

    #[test]
    fn this_process_has_context_switches_summed_over_its_threads() {
        // This (test) thread is not the main thread, is alive at the sample, and
        // sleeping switches it out voluntarily.
        std::thread::sleep(Duration::from_millis(5));
        let own = proc_sample(std::process::id()).expect("/proc of this process");
        assert!(own.switches.voluntary > 0);
        assert!(own.rss_kb > 0);
    }
}

//! The floors a result is read against, both measured in the same run: the crypto
//! floor (what the cryptography alone allows) and the fsync floor (what this
//! machine's disk allows when every message, or every batch, waits for one fsync).

use std::hint::black_box;
use std::io::Write as _;
use std::path::Path;
use std::time::Instant;

use anyhow::anyhow;
use conclave_actors::crypto::{open_frame, seal_frame, verify_frame, EpochKey};
use conclave_actors::{Epoch, Identity, MessageId, RoomId};

use super::driver::percentile;

// ---------------------------------------------------------------------------------
// The crypto floor
// ---------------------------------------------------------------------------------

/// Microseconds per operation on one core, 256-byte (or --size) frames.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub(super) struct Floor {
    pub(super) seal_us: f64,
    pub(super) verify_us: f64,
    pub(super) open_us: f64,
    pub(super) cores: usize,
}

impl Floor {
    /// msg/s on the whole machine if only the cryptography cost anything.
    pub(super) fn conclave(&self, members: usize) -> f64 {
        self.cores as f64 * 1e6 / (self.seal_us + self.verify_us + members as f64 * self.open_us)
    }
    /// The same for JetStream + crypto (no verification at a home node).
    pub(super) fn jetstream(&self, members: usize) -> f64 {
        self.cores as f64 * 1e6 / (self.seal_us + members as f64 * self.open_us)
    }
}

pub(super) fn crypto_floor(iterations: usize, size: usize) -> anyhow::Result<Floor> {
    let mut rng = rand_core::UnwrapErr(getrandom::SysRng);
    let identity = Identity::generate(&mut rng);
    let key = EpochKey::generate(&mut rng);
    let room = RoomId([7; 16]);
    let epoch = Epoch(1);
    let plaintext = vec![0x5au8; size];
    let id = MessageId::from_parts(1_700_000_000_000, 42);
    let time = |f: &mut dyn FnMut()| {
        for _ in 0..iterations / 10 {
            f();
        }
        let start = Instant::now();
        for _ in 0..iterations {
            f();
        }
        start.elapsed().as_secs_f64() * 1e6 / iterations as f64
    };
    let frame = seal_frame(
        &mut rng,
        identity.signing_key(),
        &key,
        room,
        epoch,
        id,
        &plaintext,
    )
    .map_err(|e| anyhow!("{e:?}"))?;
    let seal_us = time(&mut || {
        black_box(
            seal_frame(
                &mut rng,
                identity.signing_key(),
                &key,
                room,
                epoch,
                id,
                black_box(&plaintext),
            )
            .is_ok(),
        );
    });
    let verify_us = time(&mut || {
        black_box(verify_frame(black_box(&frame)).is_ok());
    });
    let open_us = time(&mut || {
        black_box(open_frame(black_box(&frame), room, epoch, &key).is_ok());
    });
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    Ok(Floor {
        seal_us,
        verify_us,
        open_us,
        cores,
    })
}

// ---------------------------------------------------------------------------------
// The fsync floor
// ---------------------------------------------------------------------------------

/// Bytes written before each fdatasync: one page, what a small commit dirties.
const FSYNC_BLOCK_BYTES: usize = 4096;

/// The batch sizes the fsync floor is stated for (64 is the bench's window).
pub(super) const FSYNC_BATCH_SIZES: [usize; 2] = [64, 256];

/// This machine's fsync latency and the throughput it caps a system at.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub(super) struct FsyncFloor {
    pub(super) samples: usize,
    pub(super) block_bytes: usize,
    pub(super) median_us: f64,
    pub(super) p99_us: f64,
    /// msg/s when every message waits for its own fsync (one after another).
    pub(super) per_message_msg_s: f64,
    /// msg/s when each fsync commits a whole batch (one per `FSYNC_BATCH_SIZES`).
    pub(super) per_batch: Vec<BatchFloor>,
}

/// The disk floor when one fsync commits `batch` messages.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub(super) struct BatchFloor {
    pub(super) batch: usize,
    pub(super) msg_s: f64,
}

impl FsyncFloor {
    /// The floor implied by `latencies_us` (one fsync each, any order).
    pub(super) fn from_latencies(mut latencies_us: Vec<f64>, block_bytes: usize) -> Self {
        assert!(!latencies_us.is_empty(), "the fsync floor needs a sample");
        latencies_us.sort_by(f64::total_cmp);
        let median_us = percentile(&latencies_us, 0.5);
        // A zero median (a clock too coarse) would make the floor infinite.
        let per_message_msg_s = 1e6 / median_us.max(1e-3);
        FsyncFloor {
            samples: latencies_us.len(),
            block_bytes,
            median_us,
            p99_us: percentile(&latencies_us, 0.99),
            per_message_msg_s,
            per_batch: FSYNC_BATCH_SIZES
                .iter()
                .map(|&batch| BatchFloor {
                    batch,
                    msg_s: batch as f64 * per_message_msg_s,
                })
                .collect(),
        }
    }
}

/// Appends a page and fdatasyncs it, `iterations` times, in a temporary file in
/// `dir` (the disk the systems under test write to).
pub(super) fn fsync_floor(dir: &Path, iterations: usize) -> anyhow::Result<FsyncFloor> {
    assert!(iterations > 0, "the fsync floor needs at least one sample");
    let mut file = tempfile::tempfile_in(dir)
        .map_err(|e| anyhow!("a temporary file in {}: {e}", dir.display()))?;
    let block = vec![0x5au8; FSYNC_BLOCK_BYTES];
    let mut latencies_us = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let start = Instant::now();
        file.write_all(&block)?;
        file.sync_data()?;
        latencies_us.push(start.elapsed().as_secs_f64() * 1e6);
    }
    Ok(FsyncFloor::from_latencies(latencies_us, FSYNC_BLOCK_BYTES))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fsync_floor_is_one_message_per_median_fsync_and_a_batch_per_fsync() {
        // 100 samples: 1..=100 ms in µs; the median (p50, nearest rank) is 50 ms.
        let latencies: Vec<f64> = (1..=100).rev().map(|ms| ms as f64 * 1000.0).collect();
        let floor = FsyncFloor::from_latencies(latencies, 4096);
        assert_eq!(floor.samples, 100);
        assert_eq!(floor.median_us, 50_000.0);
        assert_eq!(floor.p99_us, 99_000.0);
        assert!((floor.per_message_msg_s - 20.0).abs() < 1e-9);
        assert_eq!(floor.per_batch.len(), 2);
        assert_eq!(floor.per_batch[0].batch, 64);
        assert!((floor.per_batch[0].msg_s - 1280.0).abs() < 1e-9);
        assert_eq!(floor.per_batch[1].batch, 256);
        assert!((floor.per_batch[1].msg_s - 5120.0).abs() < 1e-9);
    }

    #[test]
    fn the_fsync_floor_is_measured_in_the_given_directory() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let floor = fsync_floor(dir.path(), 3).expect("fsync works in a temporary directory");
        assert_eq!(floor.samples, 3);
        assert!(floor.median_us > 0.0 && floor.p99_us >= floor.median_us);
    }
}

//! The simulator's own guarantees: the same seed gives the same run, bit for bit
//! (the trace hash), and a handful of seeds pass every oracle. (Debug builds run
//! crypto slowly, so these runs are short; `conclave-sim run` sweeps long ones.)

use std::time::Duration;

use conclave_sim::{run, Options};

/// The options of `seed`, with the chaos cut to a few virtual seconds.
fn short(seed: u64, nodes: Option<usize>) -> Options {
    let mut options = Options::derive(seed, nodes, None);
    options.chaos = options.chaos.min(Duration::from_secs(3));
    options
}

#[test]
fn the_same_seed_gives_the_same_trace_hash() {
    // Each seed as drawn, and with rooms on the shard groups.
    let runs = [7, 42].into_iter().flat_map(|seed| {
        let mut sharded = short(seed, None);
        sharded.put_rooms_on_shards();
        [(seed, short(seed, None)), (seed, sharded)]
    });
    for (seed, options) in runs {
        let first = run(&options);
        let second = run(&options);
        assert_eq!(first.hash, second.hash, "seed {seed} ran differently twice");
        assert_eq!(first.events, second.events);
        assert_eq!(first.stats, second.stats);
        assert!(
            first.events > 100,
            "seed {seed} ran only {} events",
            first.events
        );
    }
}

#[test]
fn different_seeds_give_different_runs() {
    let a = run(&short(1, Some(3)));
    let b = run(&short(2, Some(3)));
    assert_ne!(a.hash, b.hash);
}

#[test]
fn a_few_seeds_pass_every_oracle() {
    for seed in 0..3 {
        let report = run(&short(seed, None));
        assert!(
            report.failure.is_none(),
            "seed {seed}: {}",
            report.failure.unwrap()
        );
        assert!(report.stats.committed > 0, "seed {seed} committed nothing");
    }
}

//! Draws from a run's random streams (the workload's, the fault plan's). Each
//! takes a fixed number of draws, so that a seed replays exactly.

use core::time::Duration;

use rand_chacha::ChaCha20Rng;
use rand_core::Rng;

/// One of `items`, uniformly (`None` if there are none).
pub fn pick<T: Copy>(rng: &mut ChaCha20Rng, items: &[T]) -> Option<T> {
    if items.is_empty() {
        None
    } else {
        Some(items[(rng.next_u64() % items.len() as u64) as usize])
    }
}

/// Uniformly in `lo..=hi` (just `lo` if `hi < lo`).
pub fn between(rng: &mut ChaCha20Rng, lo: u64, hi: u64) -> u64 {
    lo + rng.next_u64() % (hi.saturating_sub(lo) + 1)
}

/// True with a chance of `ppm` per million.
pub fn chance(rng: &mut ChaCha20Rng, ppm: u32) -> bool {
    rng.next_u64() % 1_000_000 < u64::from(ppm)
}

/// Around `d`: uniformly between half and one and a half of it.
pub fn around(rng: &mut ChaCha20Rng, d: Duration) -> Duration {
    let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(2);
    Duration::from_micros(between(rng, us / 2, us + us / 2))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::derive_rng;

    #[test]
    fn draws_stay_in_their_bounds() {
        let mut rng = derive_rng(1, 0, "draw");
        for _ in 0..1_000 {
            let x = between(&mut rng, 3, 5);
            assert!((3..=5).contains(&x));
            let d = around(&mut rng, Duration::from_millis(100));
            assert!(d >= Duration::from_millis(50) && d <= Duration::from_millis(150));
            assert_eq!(pick(&mut rng, &[7u8]), Some(7));
        }
        assert_eq!(pick::<u8>(&mut rng, &[]), None);
        assert!(!chance(&mut rng, 0));
        assert!(chance(&mut rng, 1_000_000));
    }
}

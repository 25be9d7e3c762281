//! Rate-limited logging: what a hostile peer can trigger at will (refused
//! handshakes, malformed requests) is still logged, but a flood writes a bounded
//! number of lines, and the next line says how many were left out.
//!
//! Counting is not throttled: every refusal still increments its metric.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lines one [`Throttle`] lets through per window.
pub const LINES_PER_WINDOW: u32 = 10;
/// The window of a [`Throttle`].
pub const WINDOW: Duration = Duration::from_secs(10);

/// One call site's budget of log lines: [`LINES_PER_WINDOW`] per [`WINDOW`].
/// `const`, so that it can be a `static` beside the line it guards.
#[derive(Debug)]
pub struct Throttle {
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// When the current window started (`None` before the first event).
    since: Option<Instant>,
    /// Lines let through in the current window.
    emitted: u32,
    /// Events left out since the last line let through.
    suppressed: u64,
}

impl Default for Throttle {
    fn default() -> Self {
        Self::new()
    }
}

impl Throttle {
    /// A fresh budget.
    pub const fn new() -> Self {
        Self {
            state: Mutex::new(State {
                since: None,
                emitted: 0,
                suppressed: 0,
            }),
        }
    }

    /// Whether an event happening now may be logged: `Some(n)` with the number
    /// of events left out since the last one logged (to put in the line), or
    /// `None` to leave this one out.
    pub fn admit(&self) -> Option<u64> {
        self.admit_at(Instant::now())
    }

    fn admit_at(&self, now: Instant) -> Option<u64> {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let expired = state
            .since
            .is_none_or(|since| now.saturating_duration_since(since) >= WINDOW);
        if expired {
            state.since = Some(now);
            state.emitted = 0;
        }
        if state.emitted >= LINES_PER_WINDOW {
            state.suppressed += 1;
            return None;
        }
        state.emitted += 1;
        Some(std::mem::take(&mut state.suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_is_cut_to_the_budget_and_the_next_window_says_how_much_was_left_out() {
        let throttle = Throttle::new();
        let start = Instant::now();
        let admitted = (0..500)
            .filter(|_| throttle.admit_at(start).is_some())
            .count();
        assert_eq!(admitted, LINES_PER_WINDOW as usize);
        let later = start + WINDOW;
        assert_eq!(
            throttle.admit_at(later),
            Some(500 - u64::from(LINES_PER_WINDOW))
        );
        assert_eq!(throttle.admit_at(later), Some(0));
    }
}

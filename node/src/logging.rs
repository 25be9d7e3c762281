//! Rate-limited actor logs. What the actors log, a remote node or a user can make
//! them log at will (a refused request, a refused update, a misaddressed
//! delivery), and the actors cannot rate-limit it themselves: they never read the
//! OS clock. [`ThrottledActorLogs`] is a `tracing` layer that lets through at most
//! [`LINES_PER_WINDOW`] events per [`WINDOW`] from each call site of the actors'
//! crate and, when it lets one through after leaving some out, first says how
//! many. Metrics are not throttled: every refusal is still counted.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use conclave_transports::throttle::Throttle;
pub use conclave_transports::throttle::{LINES_PER_WINDOW, WINDOW};
use tracing::callsite::Identifier;
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context, Layer};

/// The target prefix of the actors' events.
const THROTTLED_TARGET: &str = "conclave_actors";

/// Add it to a subscriber (before the layer that writes) to rate-limit the actors'
/// log lines; `conclave node` does.
#[derive(Debug, Default)]
pub struct ThrottledActorLogs {
    /// One budget per call site (a binary has a fixed set of call sites, so the
    /// map is bounded by the code, not by what arrives).
    sites: Mutex<HashMap<Identifier, Arc<Throttle>>>,
}

impl<S: Subscriber> Layer<S> for ThrottledActorLogs {
    fn event_enabled(&self, event: &Event<'_>, _cx: Context<'_, S>) -> bool {
        let meta = event.metadata();
        if !meta.target().starts_with(THROTTLED_TARGET) {
            return true;
        }
        let throttle = {
            let mut sites = self.sites.lock().unwrap_or_else(PoisonError::into_inner);
            Arc::clone(sites.entry(meta.callsite()).or_default())
        };
        match throttle.admit() {
            None => false,
            Some(0) => true,
            Some(left_out) => {
                // Another target, so not throttled itself; the lock is released.
                tracing::warn!(target: "conclave::logging", left_out, site = meta.name(), "log lines like the next were left out");
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use tracing_subscriber::fmt::MakeWriter;
    use tracing_subscriber::prelude::*;

    use super::*;

    /// Lines written, shared with the subscriber.
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Lines {
        type Writer = Lines;
        fn make_writer(&'a self) -> Self::Writer {
            self.clone()
        }
    }

    #[test]
    fn a_flood_from_one_actor_call_site_is_cut_to_the_budget_and_others_are_not() {
        let lines = Lines::default();
        let subscriber = tracing_subscriber::registry()
            .with(ThrottledActorLogs::default())
            .with(tracing_subscriber::fmt::layer().with_writer(lines.clone()));
        tracing::subscriber::with_default(subscriber, || {
            for i in 0..50 {
                tracing::warn!(target: "conclave_actors::domain", i, "request denied");
            }
            for i in 0..3 {
                tracing::warn!(target: "conclave_actors::domain", i, "another refusal");
            }
            for i in 0..50 {
                tracing::warn!(target: "conclave::client", i, "not an actor's");
            }
        });
        let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
        let count = |what: &str| text.lines().filter(|l| l.contains(what)).count();
        assert_eq!(count("request denied"), LINES_PER_WINDOW as usize);
        assert_eq!(count("another refusal"), 3, "a call site of its own");
        assert_eq!(count("not an actor's"), 50);
    }
}

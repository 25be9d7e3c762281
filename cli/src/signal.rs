//! Process signals: waiting for the operator's Ctrl-C or SIGTERM, and stopping the
//! child processes this binary started (cluster nodes, nats-server).

use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

/// How long a child gets to stop cleanly after SIGTERM before it is killed.
pub(crate) const STOP_GRACE_MS: u64 = 10_000;
/// How often a stopping child is polled.
const STOP_POLL_MS: u64 = 50;

/// Waits for SIGINT or SIGTERM.
pub(crate) async fn wait_for_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(error) => {
            tracing::warn!(%error, "cannot listen for SIGTERM; only Ctrl-C stops this");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Asks `child` to stop (SIGTERM), so that it can flush and close cleanly. A
/// child that has exited already is no error: there is nothing left to stop.
pub(crate) fn terminate(child: &Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
}

/// Waits up to [`STOP_GRACE_MS`] for `child` to exit after [`terminate`]; kills it
/// past that. Returns its exit status, or `None` if it had to be killed.
pub(crate) fn wait_or_kill(child: &mut Child) -> Option<ExitStatus> {
    let deadline = Instant::now() + Duration::from_millis(STOP_GRACE_MS);
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(STOP_POLL_MS));
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
}

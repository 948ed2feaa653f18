//! Liveness of the long-running loops (the processor's, the reconciler's), for
//! `/api/v1/health/live` on their metrics port.
//!
//! A loop is alive while it waits for work, or while it makes progress: a batch settled, a
//! retry attempted (an outage is not a hang: its retry loop keeps attempting, and restarting
//! would not help). A loop stuck in an await that never returns (a connection hung without a
//! timeout, a deadlock) does neither; after [`DEFAULT_STALE`] the endpoint answers 503 and the
//! supervisor restarts the process. Nothing is lost by that: nothing past the stuck batch was
//! committed (guarantee 1).
//!
//! One state per process: the deployment units run one loop per process. A process that
//! registers no loop (the ingress, `dlq heal`) is always alive.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, Ordering};
use std::time::Duration;

/// How long a loop may go without progress while not waiting before it counts as stuck.
pub const DEFAULT_STALE: Duration = Duration::from_secs(180);

static REGISTERED: AtomicBool = AtomicBool::new(false);
static WAITING: AtomicU32 = AtomicU32::new(0);
static LAST_PROGRESS_MS: AtomicI64 = AtomicI64::new(0);

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// The loop made progress (a batch settled, a retry attempted).
pub fn progress() {
    REGISTERED.store(true, Ordering::Relaxed);
    LAST_PROGRESS_MS.store(now_ms(), Ordering::Relaxed);
}

/// Marks the loop as waiting for work until the guard is dropped (which counts as progress).
pub fn waiting() -> Waiting {
    progress();
    WAITING.fetch_add(1, Ordering::Relaxed);
    Waiting(())
}

/// See [`waiting`].
pub struct Waiting(());

impl Drop for Waiting {
    fn drop(&mut self) {
        WAITING.fetch_sub(1, Ordering::Relaxed);
        progress();
    }
}

/// `Ok` when alive; else how long since the last progress.
pub fn check(stale: Duration) -> Result<(), Duration> {
    if !REGISTERED.load(Ordering::Relaxed) || WAITING.load(Ordering::Relaxed) > 0 {
        return Ok(());
    }
    let since = now_ms() - LAST_PROGRESS_MS.load(Ordering::Relaxed);
    let since = Duration::from_millis(since.max(0) as u64);
    if since > stale {
        Err(since)
    } else {
        Ok(())
    }
}

/// The stale limit: `HELIOS_LIVENESS_STALE_SECS`, else [`DEFAULT_STALE`].
pub fn stale_limit() -> Duration {
    std::env::var("HELIOS_LIVENESS_STALE_SECS")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|s| *s > 0)
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_STALE)
}

#[cfg(test)]
mod tests {
    use super::*;

    // One test: the state is the process's.
    #[test]
    fn waiting_is_alive_progress_is_alive_silence_is_not() {
        assert!(check(Duration::ZERO).is_ok(), "nothing registered: alive");
        progress();
        std::thread::sleep(Duration::from_millis(20));
        assert!(
            check(Duration::from_millis(5)).is_err(),
            "no progress, not waiting"
        );
        assert!(check(Duration::from_secs(60)).is_ok());
        {
            let _w = waiting();
            std::thread::sleep(Duration::from_millis(20));
            assert!(check(Duration::from_millis(5)).is_ok(), "waiting for work");
        }
        assert!(
            check(Duration::from_millis(5)).is_ok(),
            "the wait ended just now"
        );
    }
}

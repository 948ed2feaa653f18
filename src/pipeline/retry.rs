//! Transient failures and the one retry loop. A dependency that is unavailable (Redis,
//! PostgreSQL, Kafka, the schema registry) pauses the batch: the same work is tried again on
//! that dependency's schedule (its circuit breaker and policy, [`super::breaker`]) until it
//! succeeds or the process is asked to stop, and the
//! caller keeps its consumer polling meanwhile (see `pipeline::consume`), so the group never
//! evicts the instance however long the outage lasts.

use std::time::Duration;

use super::consume::RawConsumer;
use crate::model::Sink;
use crate::shutdown::Shutdown;

/// A dependency could not do its part; the same work will be retried.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{sink} unavailable: {message}")]
pub struct Unavailable {
    pub sink: Sink,
    pub message: String,
    /// The failure carried a code nobody classified: after a few retries the delivery isolates
    /// it like a data error (see [`crate::model::fault`]).
    pub unclassified: bool,
}

impl Unavailable {
    pub fn new(sink: Sink, message: impl Into<String>) -> Self {
        Unavailable {
            sink,
            message: message.into(),
            unclassified: false,
        }
    }

    /// A failure with an unclassified code.
    pub fn unclassified(sink: Sink, message: impl Into<String>) -> Self {
        Unavailable {
            unclassified: true,
            ..Unavailable::new(sink, message)
        }
    }
}

/// Backoff between retries: 0.2 s doubling to 5 s.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            next: Duration::from_millis(200),
        }
    }
}

impl Backoff {
    /// The wait before the next attempt (and doubles the one after).
    pub fn next_wait(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(Duration::from_secs(5));
        d
    }
}

/// The one retry loop, used as `loop { match work().await { Ok(v) => { retry.succeeded();
/// break v } Err(e) => if !retry.after(&e, shutdown).await { return None } } }`: counts the
/// retry, logs it, and waits what the failed dependency's circuit breaker says
/// ([`super::breaker`]: its backoff, or its open schedule), while the consumer keeps polling
/// with partitions paused.
pub struct Retry {
    what: &'static str,
    breakers: std::sync::Arc<super::breaker::Breakers>,
    /// The dependencies that failed this work (closed again when it succeeds).
    failed: Vec<crate::model::Sink>,
    /// When the first attempt failed (the stall began).
    since: Option<std::time::Instant>,
}

impl Retry {
    pub fn new(what: &'static str, breakers: &std::sync::Arc<super::breaker::Breakers>) -> Self {
        Retry {
            what,
            breakers: breakers.clone(),
            failed: vec![],
            since: None,
        }
    }

    /// The work succeeded: every dependency that had failed it is closed again.
    pub fn succeeded(&mut self) {
        for s in self.failed.drain(..) {
            self.breakers.succeeded(s);
        }
    }

    /// How long this work has been failing (zero before its first failure).
    pub fn stalled(&self) -> Duration {
        self.since.map(|s| s.elapsed()).unwrap_or_default()
    }

    /// Counts and logs a retry after `e`; the wait before the next attempt. The stall gauge
    /// (`helios_processor_stalled_seconds`) says how long the work has been failing.
    fn note(&mut self, e: &Unavailable) -> Duration {
        // An outage is not a hang: each attempt is progress ([`crate::liveness`]).
        crate::liveness::progress();
        let since = *self.since.get_or_insert_with(std::time::Instant::now);
        metrics::gauge!("helios_processor_stalled_seconds").set(since.elapsed().as_secs_f64());
        let pause = self.breakers.failed(e.sink);
        if !self.failed.contains(&e.sink) {
            self.failed.push(e.sink);
        }
        metrics::counter!("helios_processor_retries_total", "stage" => e.sink.as_str())
            .increment(1);
        tracing::warn!(error = %e, what = self.what, retry_in_ms = pause.as_millis() as u64,
            "batch paused: a dependency failed; retrying the same work (nothing is committed)");
        pause
    }

    /// Waits before the next attempt after `e`, polling `consumer` (partitions paused).
    /// `false`: shutdown came first, give up.
    pub async fn after_polling(
        &mut self,
        e: &Unavailable,
        consumer: &mut RawConsumer,
        shutdown: &Shutdown,
    ) -> bool {
        let pause = self.note(e);
        let go = tokio::select! {
            _ = consumer.idle(pause) => true,
            _ = shutdown.clone().wait() => false,
        };
        if go {
            self.breakers.attempt(e.sink);
        }
        go
    }

    /// Waits before the next attempt after `e` (a delivery task: the loop that owns the
    /// consumer keeps it polling). `false`: shutdown came first, give up.
    pub async fn after(&mut self, e: &Unavailable, shutdown: &Shutdown) -> bool {
        let pause = self.note(e);
        let go = tokio::select! {
            _ = tokio::time::sleep(pause) => true,
            _ = shutdown.clone().wait() => false,
        };
        if go {
            self.breakers.attempt(e.sink);
        }
        go
    }
}

impl Drop for Retry {
    /// The work succeeded or was given up: it no longer stalls anything.
    fn drop(&mut self) {
        if self.since.is_some() {
            metrics::gauge!("helios_processor_stalled_seconds").set(0.0);
        }
    }
}

//! A circuit breaker per dependency (PostgreSQL, Redis, the broker, the schema registry), and the
//! retry policy of each, in one place.
//!
//! The processor never drops work because a dependency is down (guarantee 5: the batch pauses
//! and is tried again until it succeeds, however long that takes), so a breaker here does not
//! fail calls fast; it decides *when the next attempt is made* and says what state each dependency
//! is in. Closed: failures are retried on the dependency's backoff. After
//! [`Policy::open_after`] failures in a row it opens: every retry waits until its one wait is
//! over (backoff doubling to [`Policy::max`], with jitter so instances do not probe in step;
//! a new batch's first attempt is not held back, and waits too if it fails). Then it is
//! half-open: the next attempt is the probe. A success closes it; a failure opens it again with
//! the next, longer wait. The retry budget is unlimited by design (a pause, never a drop).
//!
//! Exported: `helios_breaker_state{dependency}` (0 closed, 1 half-open, 2 open),
//! `helios_breaker_opened_total{dependency}`, `helios_breaker_probes_total{dependency}`.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::model::Sink;

/// How a dependency is retried.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    /// The first wait.
    pub base: Duration,
    /// The longest wait.
    pub max: Duration,
    /// Failures in a row that open the breaker.
    pub open_after: u32,
    /// Each wait is drawn within ±this share of it.
    pub jitter: f64,
}

/// Every dependency's policy: the one place the retry constants live. They are the same today
/// (0.2 s doubling to 5 s, ±20 %, open after 3 failures in a row): the waits HELIOS always had,
/// which its recovery times were measured with; a dependency that wants its own gets it here.
pub fn policy(sink: Sink) -> Policy {
    let standard = Policy {
        base: Duration::from_millis(200),
        max: Duration::from_secs(5),
        open_after: 3,
        jitter: 0.2,
    };
    match sink {
        Sink::Postgres | Sink::Redis | Sink::Kafka | Sink::SchemaRegistry => standard,
    }
}

impl Policy {
    /// The wait before attempt `n` (0-based) after failures, without jitter.
    pub fn wait(&self, n: u32) -> Duration {
        let factor = 2u32.saturating_pow(n.min(16));
        self.base.saturating_mul(factor).min(self.max)
    }

    /// [`Self::wait`] with jitter, from `unit` in [0, 1).
    pub fn jittered(&self, n: u32, unit: f64) -> Duration {
        let w = self.wait(n).as_secs_f64();
        let spread = w * self.jitter * (2.0 * unit - 1.0);
        Duration::from_secs_f64((w + spread).max(0.0))
    }
}

/// A breaker's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Closed,
    HalfOpen,
    Open,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::HalfOpen => "half_open",
            State::Open => "open",
        }
    }

    fn gauge(self) -> f64 {
        match self {
            State::Closed => 0.0,
            State::HalfOpen => 1.0,
            State::Open => 2.0,
        }
    }
}

/// One dependency's breaker (pure: the caller gives the time and the jitter draw).
#[derive(Debug, Clone)]
pub struct Breaker {
    pub policy: Policy,
    pub state: State,
    /// Failures in a row.
    failures: u32,
    /// While open: when the probe may go.
    until: Option<Instant>,
    /// Times it opened since it last closed (the backoff step).
    opens: u32,
    pub since: Option<Instant>,
}

impl Breaker {
    pub fn new(policy: Policy) -> Self {
        Breaker {
            policy,
            state: State::Closed,
            failures: 0,
            until: None,
            opens: 0,
            since: None,
        }
    }

    /// A failure at `now`: the wait before the next attempt, and whether it opened just now.
    pub fn failed(&mut self, now: Instant, unit: f64) -> (Duration, bool) {
        self.failures += 1;
        match self.state {
            State::Closed if self.failures < self.policy.open_after => {
                (self.policy.jittered(self.failures - 1, unit), false)
            }
            // Open already (another attempt failed meanwhile): the same schedule.
            State::Open if self.until.is_some_and(|u| u > now) => {
                (self.until.map_or(Duration::ZERO, |u| u - now), false)
            }
            _ => {
                let opened = self.state == State::Closed;
                if opened {
                    self.since = Some(now);
                }
                let n = (self.policy.open_after - 1) + self.opens;
                let wait = self.policy.jittered(n, unit);
                self.opens += 1;
                self.state = State::Open;
                self.until = Some(now + wait);
                (wait, opened)
            }
        }
    }

    /// An attempt is about to be made at `now`: an open breaker whose wait is over half-opens
    /// (this attempt is its probe). True when it did.
    pub fn attempt(&mut self, now: Instant) -> bool {
        if self.state == State::Open && self.until.is_none_or(|u| u <= now) {
            self.state = State::HalfOpen;
            return true;
        }
        false
    }

    /// The work succeeded: closed. Returns how long it was not closed, if it was not.
    pub fn succeeded(&mut self, now: Instant) -> Option<Duration> {
        let was = (self.state != State::Closed).then(|| self.since.map(|s| now - s));
        self.state = State::Closed;
        self.failures = 0;
        self.opens = 0;
        self.until = None;
        self.since = None;
        was.flatten()
    }
}

/// The breakers of one process, shared by its retry loops.
#[derive(Debug)]
pub struct Breakers {
    by_sink: Mutex<[Breaker; 4]>,
}

const SINKS: [Sink; 4] = [
    Sink::Postgres,
    Sink::Redis,
    Sink::Kafka,
    Sink::SchemaRegistry,
];

fn index(s: Sink) -> usize {
    SINKS.iter().position(|x| *x == s).unwrap_or(0)
}

/// The `dependency` label of a sink.
pub fn dependency(s: Sink) -> &'static str {
    match s {
        Sink::Postgres => "postgres",
        Sink::Redis => "redis",
        Sink::Kafka => "kafka",
        Sink::SchemaRegistry => "schema_registry",
    }
}

impl Default for Breakers {
    fn default() -> Self {
        Breakers {
            by_sink: Mutex::new(SINKS.map(|s| Breaker::new(policy(s)))),
        }
    }
}

impl Breakers {
    /// Every breaker closed and its series exported at 0.
    pub fn new() -> Self {
        for s in SINKS {
            let d = dependency(s);
            metrics::gauge!("helios_breaker_state", "dependency" => d).set(0.0);
            metrics::counter!("helios_breaker_opened_total", "dependency" => d).increment(0);
            metrics::counter!("helios_breaker_probes_total", "dependency" => d).increment(0);
        }
        Breakers::default()
    }

    fn with<T>(&self, s: Sink, f: impl FnOnce(&mut Breaker) -> T) -> T {
        let mut all = self.by_sink.lock().unwrap_or_else(|p| p.into_inner());
        let b = &mut all[index(s)];
        let out = f(b);
        metrics::gauge!("helios_breaker_state", "dependency" => dependency(s)).set(b.state.gauge());
        out
    }

    /// A failure of `s`: the wait before the next attempt.
    pub fn failed(&self, s: Sink) -> Duration {
        // Jitter from the OS's randomness (uuid's v4 draw), no generator of our own.
        let unit = (uuid::Uuid::new_v4().as_u128() % 1_000_000) as f64 / 1e6;
        let (wait, opened) = self.with(s, |b| b.failed(Instant::now(), unit));
        if opened {
            metrics::counter!("helios_breaker_opened_total", "dependency" => dependency(s))
                .increment(1);
            tracing::warn!(
                dependency = dependency(s),
                "circuit breaker open: attempts now wait for its schedule"
            );
        }
        wait
    }

    /// An attempt that needs `s` is about to be made.
    pub fn attempt(&self, s: Sink) {
        if self.with(s, |b| b.attempt(Instant::now())) {
            metrics::counter!("helios_breaker_probes_total", "dependency" => dependency(s))
                .increment(1);
            tracing::info!(
                dependency = dependency(s),
                "circuit breaker half-open: probing"
            );
        }
    }

    /// Work that had failed on `s` succeeded.
    pub fn succeeded(&self, s: Sink) {
        if let Some(d) = self.with(s, |b| b.succeeded(Instant::now())) {
            tracing::info!(
                dependency = dependency(s),
                after_ms = d.as_millis() as u64,
                "circuit breaker closed"
            );
        }
    }

    /// (dependency, state) of each.
    pub fn states(&self) -> Vec<(&'static str, State)> {
        let all = self.by_sink.lock().unwrap_or_else(|p| p.into_inner());
        SINKS
            .iter()
            .map(|s| (dependency(*s), all[index(*s)].state))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_failures_in_a_row_half_opens_on_schedule_and_closes_on_success() {
        let p = policy(Sink::Postgres);
        let mut b = Breaker::new(p);
        let t0 = Instant::now();
        // Closed: the first failures wait the backoff (jitter drawn at its middle: none).
        assert_eq!(b.failed(t0, 0.5), (p.wait(0), false));
        assert_eq!(b.failed(t0, 0.5), (p.wait(1), false));
        assert_eq!(b.state, State::Closed);
        let (wait, opened) = b.failed(t0, 0.5);
        assert!(opened && b.state == State::Open);
        assert_eq!(wait, p.wait(2));
        // Before its wait is over nothing half-opens; a failure meanwhile keeps the schedule.
        assert!(!b.attempt(t0 + wait / 2));
        assert_eq!(b.failed(t0 + wait / 2, 0.5), (wait / 2, false));
        // Then the next attempt is the probe.
        assert!(b.attempt(t0 + wait));
        assert_eq!(b.state, State::HalfOpen);
        // A failed probe opens it again, for longer.
        let (again, opened) = b.failed(t0 + wait, 0.5);
        assert!(!opened && b.state == State::Open && again > wait);
        assert!(b.attempt(t0 + wait + again));
        assert!(b.succeeded(t0 + wait + again).is_some());
        assert_eq!(b.state, State::Closed);
        // Closed again: the count starts over.
        assert_eq!(b.failed(t0, 0.5), (p.wait(0), false));
    }

    #[test]
    fn waits_double_to_the_maximum_with_bounded_jitter() {
        let p = policy(Sink::Kafka);
        assert_eq!(p.wait(0), Duration::from_millis(200));
        assert_eq!(p.wait(1), Duration::from_millis(400));
        assert_eq!(p.wait(30), p.max);
        for unit in [0.0, 0.25, 0.999] {
            let w = p.jittered(3, unit).as_secs_f64();
            let mid = p.wait(3).as_secs_f64();
            assert!((w - mid).abs() <= mid * p.jitter + 1e-9, "{w} vs {mid}");
        }
    }
}

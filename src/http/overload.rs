//! Overload behaviour a cloud understands. Before a request's body is even read, the guard
//! refuses it when HELIOS cannot take it now, with the status that cloud retries and a
//! `Retry-After`:
//! - the source's rate limit (topology.yaml `rate_limits`, a token bucket per source) is spent;
//! - too many requests are in flight (`HELIOS_MAX_IN_FLIGHT`);
//! - the broker health probe says Kafka is unreachable — answered at once instead of after the
//!   whole produce timeout, so connections do not pile up during an outage.
//!
//! 429 where the cloud retries it (EventBridge, Pub/Sub, Event Grid, direct callers); 503 for SNS,
//! which treats every 4xx as a permanent failure and would drop the message (see
//! `shared/docs/cloud-push-contracts.md`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::Request;
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::Response;
use tokio::sync::Semaphore;

use super::{Front, IngressError};
use crate::source::Source;
use crate::topology::RateLimit;

/// How a cloud wants to hear "come back later".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backpressure {
    /// 429 Too Many Requests (retried by EventBridge, Pub/Sub, Event Grid).
    TooManyRequests,
    /// 503 Service Unavailable (SNS: any 4xx would be final).
    Unavailable,
}

impl Backpressure {
    fn status(self) -> StatusCode {
        match self {
            Backpressure::TooManyRequests => StatusCode::TOO_MANY_REQUESTS,
            Backpressure::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

struct Bucket {
    limit: RateLimit,
    tokens: f64,
    last: Instant,
}

/// Per-source token buckets and the in-flight cap.
pub struct Overload {
    buckets: BTreeMap<Source, Mutex<Bucket>>,
    in_flight: Arc<Semaphore>,
}

impl Overload {
    /// `limits`: per-source rates (absent: unlimited); `max_in_flight`: requests at once.
    pub fn new(limits: &BTreeMap<Source, RateLimit>, max_in_flight: usize) -> Self {
        Overload {
            buckets: limits
                .iter()
                .map(|(s, l)| {
                    (
                        *s,
                        Mutex::new(Bucket {
                            limit: *l,
                            tokens: l.burst as f64,
                            last: Instant::now(),
                        }),
                    )
                })
                .collect(),
            in_flight: Arc::new(Semaphore::new(max_in_flight.max(1))),
        }
    }

    /// The rate limit of a source, if any.
    pub fn rate(&self, source: Source) -> Option<RateLimit> {
        self.buckets
            .get(&source)
            .map(|b| b.lock().unwrap_or_else(|p| p.into_inner()).limit)
    }

    /// Takes one token of `source`'s bucket; `Err(wait)` when it is empty.
    fn take(&self, source: Source) -> Result<(), Duration> {
        let Some(b) = self.buckets.get(&source) else {
            return Ok(());
        };
        let mut b = b.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let rate = b.limit.per_second as f64;
        b.tokens =
            (b.tokens + now.duration_since(b.last).as_secs_f64() * rate).min(b.limit.burst as f64);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (1.0 - b.tokens) / rate.max(f64::MIN_POSITIVE),
            ))
        }
    }
}

fn refuse(
    source: Source,
    endpoint: &'static str,
    reason: &'static str,
    status: StatusCode,
    retry_after: Duration,
    message: String,
) -> Response {
    metrics::counter!("helios_ingress_overload_total", "source" => source.as_str(), "reason" => reason)
        .increment(1);
    metrics::counter!("helios_ingress_requests_total", "source" => source.as_str(), "endpoint" => endpoint, "status" => status.as_u16().to_string())
        .increment(1);
    IngressError::Overloaded {
        status,
        retry_after_secs: retry_after.as_secs_f64().ceil().max(1.0) as u64,
        message,
    }
    .into_response_with_id(&uuid::Uuid::now_v7().to_string())
}

/// The guard in front of one endpoint of `source`; `backpressure` picks the status per request
/// (the EventBridge endpoint answers SNS envelopes like SNS).
pub async fn guard(
    front: Arc<Front>,
    source: Source,
    endpoint: &'static str,
    backpressure: fn(&Request) -> Backpressure,
    req: Request,
    next: Next,
) -> Response {
    let status = backpressure(&req).status();
    if front.kafka_health.known_down() {
        return refuse(
            source,
            endpoint,
            "kafka_unreachable",
            StatusCode::SERVICE_UNAVAILABLE,
            Duration::from_secs(5),
            "Kafka is unreachable; the event was not stored, retry later".into(),
        );
    }
    if let Err(wait) = front.overload.take(source) {
        return refuse(
            source,
            endpoint,
            "rate_limit",
            status,
            wait,
            format!(
                "over the rate limit of source {source} (topology.yaml rate_limits); retry later"
            ),
        );
    }
    let Ok(_permit) = front.overload.in_flight.clone().try_acquire_owned() else {
        return refuse(
            source,
            endpoint,
            "in_flight",
            status,
            Duration::from_secs(1),
            "too many requests in flight (HELIOS_MAX_IN_FLIGHT); retry later".into(),
        );
    };
    next.run(req).await
}

/// 429 for everything (EventBridge, Pub/Sub, Event Grid, direct).
pub fn too_many_requests(_: &Request) -> Backpressure {
    Backpressure::TooManyRequests
}

/// 503 for everything (SNS).
pub fn unavailable(_: &Request) -> Backpressure {
    Backpressure::Unavailable
}

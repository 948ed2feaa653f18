//! The front door of every delivery endpoint, in the order that spends nothing shared on a
//! caller before it is authenticated:
//! 1. **protected mode** — an endpoint with no credentials configured serves loopback clients
//!    only (Redis's protected mode) and tells anyone else which variable to set;
//! 2. **credentials** carried by the request head (API key, Basic, a query token, an OIDC bearer
//!    token), checked by the endpoint before this guard is entered: a caller without them is
//!    refused here, holding no token, no permit and no body memory;
//! 3. **Kafka down** (the broker probe) → 503 at once, instead of after the whole produce timeout;
//! 4. the **rate limit** of the endpoint's lane (topology.yaml `rate_limits`, per source; SNS and
//!    EventBridge each have a bucket of their own);
//! 5. an **in-flight permit** of the lane (`HELIOS_MAX_IN_FLIGHT` per endpoint: SNS, whose
//!    signature is in the body, cannot starve EventBridge, nor the other way round);
//! 6. **body memory** of the lane (`HELIOS_MAX_BODY_MEMORY` bytes per endpoint), reserved by the
//!    request's `Content-Length` (the body limit when it has none).
//!
//! Refusals carry the status the cloud retries and a `Retry-After`: 429 where the cloud retries
//! it (EventBridge, Pub/Sub, Event Grid, direct callers); 503 for SNS, which treats every 4xx as
//! a permanent failure and would drop the message (see `shared/docs/cloud-push-contracts.md`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request};
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

/// An endpoint's own share of the front door: its rate bucket, permits and body memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Lane {
    EventBridge,
    Sns,
    PubSub,
    EventGrid,
    Direct,
}

impl Lane {
    pub const ALL: [Lane; 5] = [
        Lane::EventBridge,
        Lane::Sns,
        Lane::PubSub,
        Lane::EventGrid,
        Lane::Direct,
    ];

    /// The source whose rate limit (topology.yaml) the lane applies.
    pub fn source(self) -> Source {
        match self {
            Lane::EventBridge | Lane::Sns => Source::Aws,
            Lane::PubSub => Source::Gcp,
            Lane::EventGrid => Source::Azure,
            Lane::Direct => Source::Direct,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Lane::EventBridge => "eventbridge",
            Lane::Sns => "sns",
            Lane::PubSub => "pubsub",
            Lane::EventGrid => "eventgrid",
            Lane::Direct => "ingest",
        }
    }
}

/// What one request is let in by: decided by the endpoint from the request head.
pub struct Gate<'a> {
    pub lane: Lane,
    pub endpoint: &'static str,
    pub backpressure: Backpressure,
    /// `Some(what to set)` when the endpoint has no credentials configured: protected mode.
    pub unconfigured: Option<&'a str>,
    /// The verdict on the credentials the request head carries.
    pub credentials: Result<(), IngressError>,
}

struct Bucket {
    limit: RateLimit,
    tokens: f64,
    last: Instant,
}

/// Per-lane token buckets, in-flight permits and body memory.
pub struct Overload {
    buckets: BTreeMap<Lane, Mutex<Bucket>>,
    in_flight: BTreeMap<Lane, Arc<Semaphore>>,
    /// Body memory, in KiB, per lane.
    memory: BTreeMap<Lane, Arc<Semaphore>>,
    memory_kib: u32,
    max_body_bytes: usize,
    /// Protected mode is on (the default).
    protected: bool,
}

/// The limits of the door.
#[derive(Debug, Clone, Copy)]
pub struct DoorLimits {
    /// Requests at once per endpoint.
    pub max_in_flight: usize,
    /// Body bytes in flight per endpoint.
    pub max_body_memory: usize,
    /// The largest body (reserved for a request without `Content-Length`).
    pub max_body_bytes: usize,
    /// Endpoints without credentials serve loopback clients only.
    pub protected: bool,
}

impl Overload {
    /// `limits`: per-source rates (absent: unlimited).
    pub fn new(limits: &BTreeMap<Source, RateLimit>, door: DoorLimits) -> Self {
        let memory_kib = (door.max_body_memory.div_ceil(1024)).clamp(1, u32::MAX as usize) as u32;
        Overload {
            buckets: Lane::ALL
                .iter()
                .filter_map(|lane| {
                    limits.get(&lane.source()).map(|l| {
                        (
                            *lane,
                            Mutex::new(Bucket {
                                limit: *l,
                                tokens: l.burst as f64,
                                last: Instant::now(),
                            }),
                        )
                    })
                })
                .collect(),
            in_flight: Lane::ALL
                .iter()
                .map(|l| (*l, Arc::new(Semaphore::new(door.max_in_flight.max(1)))))
                .collect(),
            memory: Lane::ALL
                .iter()
                .map(|l| (*l, Arc::new(Semaphore::new(memory_kib as usize))))
                .collect(),
            memory_kib,
            max_body_bytes: door.max_body_bytes,
            protected: door.protected,
        }
    }

    /// The rate limit of a lane, if any.
    pub fn rate(&self, lane: Lane) -> Option<RateLimit> {
        self.buckets
            .get(&lane)
            .map(|b| b.lock().unwrap_or_else(|p| p.into_inner()).limit)
    }

    /// Whether endpoints without credentials serve loopback clients only.
    pub fn protected(&self) -> bool {
        self.protected
    }

    /// Takes one token of the lane's bucket; `Err(wait)` when it is empty.
    fn take(&self, lane: Lane) -> Result<(), Duration> {
        let Some(b) = self.buckets.get(&lane) else {
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

    /// The body memory a request reserves, in KiB.
    fn reserve_kib(&self, req: &Request) -> u32 {
        let declared = req
            .headers()
            .get(axum::http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(self.max_body_bytes)
            .min(self.max_body_bytes);
        (declared.div_ceil(1024).max(1) as u32).min(self.memory_kib)
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
    refused(
        source,
        endpoint,
        IngressError::Overloaded {
            status,
            retry_after_secs: retry_after.as_secs_f64().ceil().max(1.0) as u64,
            message,
        },
    )
}

/// The response to a request refused at the door (counted like any answer).
pub fn refused(source: Source, endpoint: &'static str, e: IngressError) -> Response {
    metrics::counter!("helios_ingress_requests_total", "source" => source.as_str(), "endpoint" => endpoint, "status" => e.status().as_u16().to_string())
        .increment(1);
    e.into_response_with_id(&super::request_id::new())
}

/// The peer of a request, when the server recorded it.
pub fn peer(req: &Request) -> Option<SocketAddr> {
    req.extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0)
}

/// True for a loopback peer (127.0.0.0/8, ::1, an IPv4-mapped loopback).
pub fn is_loopback(addr: &SocketAddr) -> bool {
    match addr.ip() {
        std::net::IpAddr::V4(v4) => v4.is_loopback(),
        std::net::IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// The door in front of one endpoint (see the module docs for the order).
pub async fn guard(front: Arc<Front>, gate: Gate<'_>, req: Request, next: Next) -> Response {
    let source = gate.lane.source();
    let endpoint = gate.endpoint;
    if let Some(hint) = gate.unconfigured {
        let overload = &front.overload;
        let local = peer(&req).is_some_and(|p| is_loopback(&p));
        if overload.protected && !local {
            metrics::counter!("helios_ingress_auth_failures_total", "source" => source.as_str(), "reason" => "protected_mode")
                .increment(1);
            return refused(
                source,
                endpoint,
                IngressError::Forbidden(format!(
                    "this endpoint has no credentials configured, so it serves loopback clients only (protected mode): {hint}; \
                     or set HELIOS_PROTECTED_MODE=false to accept anyone (not for production)"
                )),
            );
        }
    }
    if let Err(e) = gate.credentials {
        return refused(source, endpoint, e);
    }
    let status = gate.backpressure.status();
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
    let overload = &front.overload;
    if let Err(wait) = overload.take(gate.lane) {
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
    let Ok(_permit) = overload.in_flight[&gate.lane].clone().try_acquire_owned() else {
        return refuse(
            source,
            endpoint,
            "in_flight",
            status,
            Duration::from_secs(1),
            "too many requests in flight (HELIOS_MAX_IN_FLIGHT); retry later".into(),
        );
    };
    let Ok(_memory) = overload.memory[&gate.lane]
        .clone()
        .try_acquire_many_owned(overload.reserve_kib(&req))
    else {
        return refuse(
            source,
            endpoint,
            "body_memory",
            status,
            Duration::from_secs(1),
            "too many request bytes in flight (HELIOS_MAX_BODY_MEMORY); retry later".into(),
        );
    };
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_peers_are_told_apart() {
        for a in [
            "127.0.0.1:1",
            "127.3.4.5:1",
            "[::1]:1",
            "[::ffff:127.0.0.1]:1",
        ] {
            assert!(is_loopback(&a.parse().unwrap()), "{a}");
        }
        for a in [
            "192.0.2.2:1",
            "10.0.0.1:1",
            "[fd00::2]:1",
            "[::ffff:10.0.0.1]:1",
        ] {
            assert!(!is_loopback(&a.parse().unwrap()), "{a}");
        }
    }
}

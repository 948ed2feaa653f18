//! Raw landing: the request body, byte for byte, to `helios.raw.<source>` with the headers the
//! contract lists. The caller answers 2xx only after `land` returned Ok, i.e. after Kafka
//! acknowledged the record with acks=all.

use std::time::Instant;

use axum::http::HeaderMap;
use chrono::{DateTime, SecondsFormat, Utc};
use rdkafka::message::{Header, OwnedHeaders};

use crate::http::error::IngressError;
use crate::kafka::{KafkaHealth, ProduceError, RawProducer};
use crate::model::headers::raw as headers;
use crate::source::Source;
use crate::topology::Topology;

/// The contract headers of a JSON event landed by `endpoint` of `source`, for records produced
/// outside an HTTP request (benchmark backlogs, tests that write raw topics directly).
pub fn event_record_headers(
    source: Source,
    endpoint: &str,
    request_id: &str,
    received_at: &str,
) -> OwnedHeaders {
    [
        (headers::SOURCE, source.as_str()),
        (headers::ENDPOINT, endpoint),
        (headers::KIND, "event"),
        (headers::RECEIVED_AT, received_at),
        (headers::REQUEST_ID, request_id),
        (headers::CONTENT_TYPE, "application/json"),
    ]
    .into_iter()
    .fold(OwnedHeaders::new_with_capacity(8), |h, (key, value)| {
        h.insert(Header {
            key,
            value: Some(value),
        })
    })
}

/// Prefixes of the cloud delivery headers that the processor needs later.
const FORWARDED_PREFIXES: &[&str] = &["x-amz-sns-", "aeg-", "ce-", "x-goog-"];

/// Standard or sensitive headers never copied, even where attributes travel as headers.
const NEVER_FORWARDED: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "cookie",
    "host",
    "content-length",
    "connection",
    "accept",
    "accept-encoding",
    "user-agent",
    "range",
    "transfer-encoding",
    "te",
    "upgrade",
    "expect",
    "forwarded",
    "via",
];

/// One received request, as it will be landed.
pub struct Delivery<'a> {
    pub source: Source,
    pub endpoint: &'static str,
    pub request_id: &'a str,
    pub received_at: DateTime<Utc>,
    pub headers: &'a HeaderMap,
    pub body: &'a [u8],
    /// The trace context the body carries where the request's headers do not (a wrapped Pub/Sub
    /// message's `googclient_traceparent` attribute).
    pub trace_hint: Option<&'a str>,
}

impl Delivery<'_> {
    /// The W3C trace context the delivery arrived with: the request's `traceparent`, a
    /// CloudEvents binary-mode `ce-traceparent`, a Pub/Sub attribute (as an unwrapped header or
    /// from the wrapped message).
    fn trace_parent(&self) -> Option<&str> {
        ["traceparent", "ce-traceparent", "googclient_traceparent"]
            .iter()
            .find_map(|h| self.headers.get(*h).and_then(|v| v.to_str().ok()))
            .or(self.trace_hint)
    }
}

/// Whether a raw record is a business delivery or a handshake kept for the audit trail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    Event,
    Handshake(&'static str),
}

/// A source's raw topic and the series one landed record updates, registered once (a labelled
/// macro call looks its series up by name and labels on every request).
struct PerSource {
    topic: String,
    produce_duration: metrics::Histogram,
    events: metrics::Counter,
    handshakes: metrics::Counter,
    bytes: metrics::Counter,
}

impl PerSource {
    fn new(source: Source, topology: &Topology) -> PerSource {
        let s = source.as_str();
        PerSource {
            topic: topology.raw_topic(source),
            produce_duration: metrics::histogram!("helios_ingress_produce_duration_seconds", "source" => s),
            events: metrics::counter!("helios_ingress_raw_records_total", "source" => s, "kind" => "event"),
            handshakes: metrics::counter!("helios_ingress_raw_records_total", "source" => s, "kind" => "handshake"),
            bytes: metrics::counter!("helios_ingress_raw_bytes_total", "source" => s),
        }
    }
}

/// Lands deliveries in their source's raw topic.
#[derive(Clone)]
pub struct Landing {
    producer: RawProducer,
    /// Per source, in `Source::ALL` order.
    sources: std::sync::Arc<[PerSource; 4]>,
    /// Header names carrying secrets (configured per deployment): never copied.
    secret_headers: Vec<String>,
    /// The broker probe: an acknowledged record proves Kafka reachable (see
    /// [`KafkaHealth::acknowledged`]).
    health: Option<KafkaHealth>,
}

impl Landing {
    pub fn new(producer: RawProducer, topology: &Topology, secret_headers: Vec<String>) -> Self {
        // The recorder first (idempotent): series registered before it would count nowhere.
        crate::metrics::install();
        Landing {
            producer,
            sources: std::sync::Arc::new(Source::ALL.map(|s| PerSource::new(s, topology))),
            secret_headers: secret_headers
                .into_iter()
                .map(|h| h.to_ascii_lowercase())
                .collect(),
            health: None,
        }
    }

    /// The same landing, reporting acknowledged records to `health`.
    pub fn with_health(mut self, health: KafkaHealth) -> Self {
        self.health = Some(health);
        self
    }

    /// The raw topic of a source.
    pub fn topic(&self, source: Source) -> &str {
        &self.sources[source.index()].topic
    }

    /// Produces the delivery and waits for Kafka's acknowledgement.
    /// `extra_attribute_headers`: also copy non-standard headers (Pub/Sub unwrapped attributes).
    pub async fn land(
        &self,
        d: &Delivery<'_>,
        kind: RecordKind,
        extra_attribute_headers: bool,
    ) -> Result<(), IngressError> {
        let topic = self.topic(d.source);
        let source = d.source.as_str();
        // The ingress span (traces on): a child of the delivery's trace context; the raw record
        // carries the span's own context on to the processor.
        let span = if crate::telemetry::traces_on() {
            tracing::info_span!(target: crate::telemetry::SPAN_TARGET, "helios.ingress",
                otel.kind = "server", helios.source = source, helios.endpoint = d.endpoint,
                helios.request_id = d.request_id, messaging.system = "kafka",
                messaging.destination.name = topic, messaging.kafka.partition = tracing::field::Empty,
                messaging.kafka.offset = tracing::field::Empty)
        } else {
            tracing::Span::none()
        };
        let own_trace = crate::telemetry::continue_trace(&span, d.trace_parent());
        let hdrs = self.record_headers(d, kind, extra_attribute_headers, own_trace.as_deref());
        let started = Instant::now();
        let result = self.producer.send(topic, None, d.body, hdrs).await;
        let m = &self.sources[d.source.index()];
        m.produce_duration.record(started.elapsed().as_secs_f64());
        match result {
            Ok((partition, offset)) => {
                if let Some(h) = &self.health {
                    h.acknowledged();
                }
                match kind {
                    RecordKind::Event => m.events.increment(1),
                    RecordKind::Handshake(_) => m.handshakes.increment(1),
                }
                m.bytes.increment(d.body.len() as u64);
                tracing::debug!(request_id = %d.request_id, topic, partition, offset, "landed raw record");
                span.record("messaging.kafka.partition", partition);
                span.record("messaging.kafka.offset", offset);
                Ok(())
            }
            Err(e) => {
                let reason = match &e {
                    ProduceError::Timeout(_) => "timeout",
                    ProduceError::QueueFull => "queue_full",
                    ProduceError::Refused(_) => "refused",
                    ProduceError::Failed(_) => "failed",
                };
                metrics::counter!("helios_ingress_produce_failures_total", "source" => source, "reason" => reason)
                    .increment(1);
                tracing::warn!(request_id = %d.request_id, topic, error = %e, "raw record not acknowledged");
                crate::telemetry::fail(&span, reason);
                Err(match e {
                    // A record the broker refuses for its size can never succeed.
                    ProduceError::Refused(err) => IngressError::RefusedByKafka(err.to_string()),
                    other => IngressError::Unavailable(format!(
                        "the event was not stored, retry later: {other}"
                    )),
                })
            }
        }
    }

    fn record_headers(
        &self,
        d: &Delivery<'_>,
        kind: RecordKind,
        extra_attribute_headers: bool,
        own_trace: Option<&str>,
    ) -> OwnedHeaders {
        let received = d.received_at.to_rfc3339_opts(SecondsFormat::Millis, true);
        let mut h = OwnedHeaders::new_with_capacity(8 + d.headers.len())
            .insert(Header {
                key: headers::SOURCE,
                value: Some(d.source.as_str()),
            })
            .insert(Header {
                key: headers::RECEIVED_AT,
                value: Some(received.as_str()),
            })
            .insert(Header {
                key: headers::REQUEST_ID,
                value: Some(d.request_id),
            })
            .insert(Header {
                key: headers::ENDPOINT,
                value: Some(d.endpoint),
            });
        h = match kind {
            RecordKind::Event => h.insert(Header {
                key: headers::KIND,
                value: Some("event"),
            }),
            RecordKind::Handshake(which) => h
                .insert(Header {
                    key: headers::KIND,
                    value: Some("handshake"),
                })
                .insert(Header {
                    key: headers::HANDSHAKE,
                    value: Some(which),
                }),
        };
        if let Some(t) = own_trace {
            h = h.insert(Header {
                key: "traceparent",
                value: Some(t),
            });
        }
        for (name, value) in d.headers.iter() {
            let n = name.as_str(); // lower-case already
            if own_trace.is_some() && n == "traceparent" {
                continue; // the ingress span's context replaces it (the span's parent is it)
            }
            let wanted = n == headers::CONTENT_TYPE
                || n == "webhook-request-origin"
                // W3C trace context: the processor continues it on the fan-out record.
                || n == "traceparent"
                || n == "tracestate"
                || FORWARDED_PREFIXES.iter().any(|p| n.starts_with(p))
                || (extra_attribute_headers
                    && !NEVER_FORWARDED.contains(&n)
                    && !n.starts_with("x-forwarded-")
                    && !n.starts_with("helios-"));
            if wanted && !self.secret_headers.iter().any(|s| s == n) {
                h = h.insert(Header {
                    key: n,
                    value: Some(value.as_bytes()),
                });
            }
        }
        h
    }

    /// Waits for in-flight records (graceful shutdown).
    pub fn flush(&self, timeout: std::time::Duration) {
        if let Err(e) = self.producer.flush(timeout) {
            tracing::warn!(error = %e, "producer flush did not complete");
        }
    }
}

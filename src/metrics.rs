//! Prometheus metrics: one recorder per process, rendered by the `/metrics` route.
//!
//! Every metric HELIOS emits is described here, so `/metrics` documents itself and the README's
//! list can be checked against one place.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Latency buckets (seconds) for request and produce histograms.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Installs the recorder (first call) and returns the handle that renders it.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .expect("static bucket list is not empty")
                .build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (embedding); then ours only renders zeros,
            // which a test would catch, so keep going rather than abort the process.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            handle
        })
        .clone()
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        "helios_ingress_requests_total",
        "HTTP requests answered by the ingress, by source, endpoint and status code"
    );
    describe_histogram!(
        "helios_ingress_request_duration_seconds",
        Unit::Seconds,
        "Time from request to response, by source and endpoint"
    );
    describe_histogram!(
        "helios_ingress_produce_duration_seconds",
        Unit::Seconds,
        "Time Kafka took to acknowledge a raw record (acks=all), by source"
    );
    describe_counter!(
        "helios_ingress_raw_records_total",
        "Raw records landed in Kafka, by source and kind (event or handshake)"
    );
    describe_counter!(
        "helios_ingress_raw_bytes_total",
        "Bytes of request bodies landed in Kafka, by source"
    );
    describe_counter!(
        "helios_ingress_produce_failures_total",
        "Raw records Kafka did not acknowledge, by source and reason"
    );
    describe_counter!(
        "helios_ingress_handshakes_total",
        "Subscription handshakes, by source, kind, subscription and outcome"
    );
    describe_counter!(
        "helios_ingress_auth_failures_total",
        "Requests refused by authentication or signature checks, by source and reason"
    );
    describe_gauge!(
        "helios_kafka_reachable",
        "1 when the last Kafka metadata probe succeeded, else 0"
    );
}

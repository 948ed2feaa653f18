//! Prometheus metrics: one recorder per process, rendered by the `/metrics` route.
//!
//! Every metric HELIOS emits is described here, so `/metrics` documents itself and the README's
//! list can be checked against one place.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Latency buckets (seconds) for request, produce and batch histograms.
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
            // Histogram samples wait in the recorder until they are folded into their buckets:
            // by a scrape, or by upkeep. Without this, an instance nobody scrapes would keep every
            // request's sample (16 bytes per request) for ever.
            let h = handle.clone();
            let _ = std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || loop {
                    std::thread::sleep(std::time::Duration::from_secs(5));
                    h.run_upkeep();
                });
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
    describe_counter!(
        "helios_processor_raw_records_total",
        "Raw records the processor finished (committed), by raw topic"
    );
    describe_counter!(
        "helios_processor_events_in_total",
        "Units entering the pipeline: events parsed from raw records plus unreadable records, by source. Invariant: = events_out + duplicates + dlq"
    );
    describe_counter!(
        "helios_processor_events_out_total",
        "Events fanned out and stored, by event type and source"
    );
    describe_counter!(
        "helios_processor_duplicates_total",
        "Events skipped as duplicates (in the batch or by a Redis mark of another raw record), by source"
    );
    describe_counter!(
        "helios_processor_dlq_total",
        "Records sent to the dead-letter topic, by reason and stage"
    );
    describe_counter!(
        "helios_processor_handshakes_total",
        "Handshake records skipped (counted, never events), by source"
    );
    describe_counter!(
        "helios_processor_retries_total",
        "Batches retried because a dependency failed, by stage (dedup, postgres, kafka)"
    );
    describe_counter!(
        "helios_processor_rows_inserted_total",
        "Rows newly inserted into PostgreSQL (conflicts on (source, event_id) excluded)"
    );
    describe_histogram!(
        "helios_processor_batch_duration_seconds",
        Unit::Seconds,
        "Time to process and commit one batch"
    );
    describe_histogram!("helios_processor_batch_records", "Raw records per batch");
    describe_counter!(
        "helios_processor_batches_overlapped_total",
        "Batches polled and planned while the previous batch was still being delivered (pipelining at work)"
    );
    describe_gauge!(
        "helios_processor_consumer_lag",
        "Records behind the end of each raw partition (from librdkafka statistics)"
    );
    describe_gauge!(
        "helios_processor_partition_stalled",
        "1 when a raw partition has lag and its position has not moved for 2 minutes"
    );
    describe_gauge!(
        "helios_reconcile_consumer_lag",
        "Records behind the end of each step topic-partition the reconciler reads"
    );
    describe_gauge!(
        "helios_reconcile_partition_stalled",
        "1 when a step topic-partition has lag and the reconciler's position has not moved for 2 minutes"
    );
    describe_gauge!(
        "helios_kafka_reachable",
        "1 when the last Kafka metadata probe succeeded, else 0"
    );
    describe_gauge!(
        "helios_events_partitions",
        "Range partitions of the partitioned events table (the default partition not counted)"
    );
    describe_gauge!(
        "helios_events_default_partition_rows",
        "Rows in events_default: older than every partition or further ahead than create_ahead"
    );
    describe_gauge!(
        "helios_events_oldest_partition_age_seconds",
        Unit::Seconds,
        "Age of the oldest partition's lower bound; above the retention when drops fail"
    );
    describe_gauge!(
        "helios_events_retention_seconds",
        Unit::Seconds,
        "The events table's retention (topology.yaml events_table.retention; 0: none)"
    );
    describe_counter!(
        "helios_events_partitions_created_total",
        "Partitions of events created ahead by maintenance"
    );
    describe_counter!(
        "helios_events_partitions_dropped_total",
        "Partitions of events dropped past retention"
    );
    describe_counter!(
        "helios_events_default_rows_moved_total",
        "Rows moved out of events_default into a partition created for their range"
    );
    describe_counter!(
        "helios_events_default_rows_expired_total",
        "Rows of events_default past retention, deleted"
    );
    describe_counter!(
        "helios_events_partition_maintenance_failures_total",
        "Partition maintenance runs that failed (tried again on the next run)"
    );
}

/// Series with bounded labels exist (at 0, or their value: registering never changes it) in a running ingress, so rates and alerts
/// (`deploy/prometheus/alerts.yml`) see them before the first failure.
pub fn zero_ingress_series() {
    for source in crate::source::Source::ALL {
        let s = source.as_str();
        for reason in ["timeout", "queue_full", "refused", "failed"] {
            metrics::counter!("helios_ingress_produce_failures_total", "source" => s, "reason" => reason)
                .increment(0);
        }
        for reason in ["kafka_unreachable", "rate_limit", "in_flight"] {
            metrics::counter!("helios_ingress_overload_total", "source" => s, "reason" => reason)
                .increment(0);
        }
    }
    for (source, reason) in [
        ("aws", "eventbridge_credentials"),
        ("aws", "sns_on_eventbridge"),
        ("aws", "sns_topic_not_allowed"),
        ("aws", "sns_too_old"),
        ("gcp", "pubsub_oidc"),
        ("gcp", "pubsub_token"),
        ("azure", "eventgrid_secret"),
        ("direct", "api_key"),
    ] {
        metrics::counter!("helios_ingress_auth_failures_total", "source" => source, "reason" => reason)
            .increment(0);
    }
}

/// The processor's bounded series at 0 (see [`zero_ingress_series`]).
pub fn zero_processor_series() {
    for source in crate::source::Source::ALL {
        let s = source.as_str();
        metrics::counter!("helios_processor_events_in_total", "source" => s).increment(0);
        metrics::counter!("helios_processor_duplicates_total", "source" => s).increment(0);
        metrics::counter!("helios_processor_handshakes_total", "source" => s).increment(0);
    }
    for stage in ["postgres", "kafka", "dedup", "schema_registry"] {
        metrics::counter!("helios_processor_retries_total", "stage" => stage).increment(0);
    }
    for name in [
        "helios_processor_dlq_records_total",
        "helios_processor_rows_inserted_total",
        "helios_processor_batches_overlapped_total",
        "helios_processor_rejoins_total",
        "helios_processor_store_duplicates_total",
        "helios_processor_rewinds_total",
        "helios_processor_abandoned_batches_total",
    ] {
        metrics::counter!(name).increment(0);
    }
    metrics::gauge!("helios_processor_stalled_seconds").set(0.0);
    // The partitioned events table's series (0 while `events` is one unpartitioned table).
    for name in [
        "helios_events_partitions_created_total",
        "helios_events_partitions_dropped_total",
        "helios_events_default_rows_moved_total",
        "helios_events_default_rows_expired_total",
        "helios_events_partition_maintenance_failures_total",
    ] {
        metrics::counter!(name).increment(0);
    }
    for name in [
        "helios_events_partitions",
        "helios_events_default_partition_rows",
        "helios_events_oldest_partition_age_seconds",
        "helios_events_retention_seconds",
    ] {
        metrics::gauge!(name).increment(0.0);
    }
}

/// The live status page (`GET /status` on the ingress and on `helios process`'s metrics port):
/// one self-contained HTML file, no downloads, that reads this process's `/metrics` every 2 s
/// and shows the figures, small charts of the last minutes' rates and the breakdowns.
pub async fn status_page() -> axum::response::Html<&'static str> {
    axum::response::Html(include_str!("status_page.html"))
}

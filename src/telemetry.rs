//! Logs and traces set up in one place.
//!
//! Logs: JSON lines by default (what log pipelines expect), human-readable text with
//! `HELIOS_LOG_FORMAT=text`; levels from `RUST_LOG` (default `info`). `helios demo` defaults to
//! text at `warn`, so its summary reads well.
//!
//! Traces: when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set,
//! HELIOS's own spans (the ingress span of each landed request, the processor span of each
//! event) are exported over OTLP/HTTP (protobuf) in batches, continuing the W3C trace context
//! the request carried; the raw record and the fan-out record carry the context on as their
//! `traceparent` header, so one pushed event is one trace across the Kafka hop. The standard
//! `OTEL_*` variables apply (`OTEL_SERVICE_NAME`, `OTEL_EXPORTER_OTLP_HEADERS`,
//! `OTEL_BSP_SCHEDULE_DELAY`, `OTEL_SDK_DISABLED`, …). Unset, no span is created at all.

use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider as _,
};
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{EnvFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// The target of the spans that are exported (and only those: log lines never become spans).
pub const SPAN_TARGET: &str = "helios::trace";

static TRACES: AtomicBool = AtomicBool::new(false);

/// True when spans are exported; callers create no span otherwise.
pub fn traces_on() -> bool {
    TRACES.load(Ordering::Relaxed)
}

/// Keeps the trace exporter alive; dropping it exports what is still buffered.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            TRACES.store(false, Ordering::Relaxed);
            if let Err(e) = p.shutdown() {
                eprintln!("warning: the last spans were not exported: {e}");
            }
        }
    }
}

/// Installs the global subscriber for a service (`service` names it in traces unless
/// `OTEL_SERVICE_NAME` does); later calls are no-ops.
pub fn init(service: &str) -> Telemetry {
    init_with("info,rdkafka=warn,librdkafka=warn", false, service)
}

/// For a command a person reads (`helios demo`): human-readable lines at `warn` unless
/// `RUST_LOG` / `HELIOS_LOG_FORMAT` ask otherwise, so the command's own output stays readable.
pub fn init_for_people(service: &str) -> Telemetry {
    init_with("warn", true, service)
}

/// The subscriber with these defaults; `RUST_LOG` and `HELIOS_LOG_FORMAT` win.
fn init_with(default_filter: &str, default_text: bool, service: &str) -> Telemetry {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let text = match std::env::var("HELIOS_LOG_FORMAT") {
        Ok(v) => v.eq_ignore_ascii_case("text"),
        Err(_) => default_text,
    };
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let logs = if text {
        fmt.boxed()
    } else {
        fmt.json()
            .flatten_event(true)
            .with_current_span(false)
            .boxed()
    };
    let provider = otlp_provider(service);
    let spans = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("helios"))
            .with_filter(Targets::new().with_target(SPAN_TARGET, tracing::Level::TRACE))
    });
    let installed = tracing_subscriber::registry()
        .with(logs.with_filter(filter))
        .with(spans)
        .try_init()
        .is_ok();
    if installed && provider.is_some() {
        TRACES.store(true, Ordering::Relaxed);
    }
    Telemetry {
        provider: provider.filter(|_| installed),
    }
}

fn env_set(key: &str) -> bool {
    std::env::var(key).is_ok_and(|v| !v.trim().is_empty())
}

/// The OTLP/HTTP trace pipeline when an endpoint is configured.
fn otlp_provider(service: &str) -> Option<SdkTracerProvider> {
    if !env_set("OTEL_EXPORTER_OTLP_ENDPOINT") && !env_set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
        return None;
    }
    if std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.trim().eq_ignore_ascii_case("true")) {
        return None;
    }
    let exporter = match opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()
    {
        Ok(e) => e,
        Err(e) => {
            eprintln!("warning: traces are not exported: the OTLP exporter cannot start: {e}");
            return None;
        }
    };
    let mut resource = opentelemetry_sdk::Resource::builder().with_attribute(
        opentelemetry::KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
    );
    if !env_set("OTEL_SERVICE_NAME") {
        resource = resource.with_service_name(service.to_string());
    }
    Some(
        SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource.build())
            .build(),
    )
}

/// Makes `span` a child of the W3C `traceparent` (when valid; a new trace otherwise) and
/// returns the span's own `traceparent`, for the record it writes. `None` when `span` is not
/// exported (traces off).
pub fn continue_trace(span: &tracing::Span, parent: Option<&str>) -> Option<String> {
    if span.is_disabled() {
        return None;
    }
    if let Some(cx) = parent.and_then(remote_parent) {
        let _ = span.set_parent(cx);
    }
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| traceparent(&sc))
}

/// The `traceparent` of a span context.
fn traceparent(sc: &SpanContext) -> String {
    format!(
        "00-{:032x}-{:016x}-{:02x}",
        sc.trace_id(),
        sc.span_id(),
        sc.trace_flags().to_u8()
    )
}

/// A remote parent from a `traceparent` (version 00, validated as the processor does).
fn remote_parent(t: &str) -> Option<opentelemetry::Context> {
    if !crate::model::draft::valid_traceparent(t) {
        return None;
    }
    let mut p = t.split('-').skip(1);
    let trace_id = TraceId::from_hex(p.next()?).ok()?;
    let span_id = SpanId::from_hex(p.next()?).ok()?;
    let flags = u8::from_str_radix(p.next()?, 16).ok()?;
    let sc = SpanContext::new(
        trace_id,
        span_id,
        TraceFlags::new(flags & 1),
        true,
        TraceState::default(),
    );
    Some(opentelemetry::Context::new().with_remote_span_context(sc))
}

/// Marks an exported span as failed, with why.
pub fn fail(span: &tracing::Span, why: &str) {
    if !span.is_disabled() {
        span.set_status(opentelemetry::trace::Status::error(why.to_string()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_traceparent_round_trips_through_a_remote_parent() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let cx = remote_parent(tp).expect("valid");
        assert_eq!(traceparent(cx.span().span_context()), tp);
        assert!(remote_parent("00-00000000000000000000000000000000-00f067aa0ba902b7-01").is_none());
        assert!(remote_parent("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").is_none());
    }
}

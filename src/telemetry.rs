//! Structured logging set-up in one place: JSON lines by default (what log pipelines expect),
//! human-readable text with `HELIOS_LOG_FORMAT=text`; levels from `RUST_LOG` (default `info`).
//! `helios demo` defaults to text at `warn`, so its summary reads well.

use tracing_subscriber::EnvFilter;

/// Installs the global tracing subscriber once; later calls are no-ops.
pub fn init() {
    init_with("info,rdkafka=warn,librdkafka=warn", false);
}

/// For a command a person reads (`helios demo`): human-readable lines at `warn` unless
/// `RUST_LOG` / `HELIOS_LOG_FORMAT` ask otherwise, so the command's own output stays readable.
pub fn init_for_people() {
    init_with("warn", true);
}

/// The subscriber with these defaults; `RUST_LOG` and `HELIOS_LOG_FORMAT` win.
fn init_with(default_filter: &str, default_text: bool) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let text = match std::env::var("HELIOS_LOG_FORMAT") {
        Ok(v) => v.eq_ignore_ascii_case("text"),
        Err(_) => default_text,
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if text {
        builder.try_init()
    } else {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init()
    };
}

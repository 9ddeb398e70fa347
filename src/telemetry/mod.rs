//! Logs and traces. Logs: JSON lines when stdout is not a terminal (or when asked), pretty
//! otherwise; `RUST_LOG` overrides the configured level. Traces, when `log.otlp_endpoint` is
//! set: a span per request and per upstream attempt, exported over OTLP/HTTP, with the
//! client's W3C `traceparent` continued and passed to upstreams.

mod metrics;
pub mod recent;

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{LogConfig, LogFormat};

pub use metrics::{metrics, BackendSeries, Metrics};
pub use recent::recent;

/// Spans are exported (some `init` had `log.otlp_endpoint`). Without an exporter no span
/// carries an OpenTelemetry context, so the per-request trace work below is skipped. Never
/// reset: tests start several gateways in one process and the first subscriber stays.
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Keeps the trace exporter alive; [`Telemetry::shutdown`] flushes it.
pub struct Telemetry {
    provider: SdkTracerProvider,
}

impl Telemetry {
    pub fn shutdown(&self) {
        let _ = self.provider.shutdown();
    }
}

pub fn init(config: &LogConfig) -> Telemetry {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(config.level.as_deref().unwrap_or("info")))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let json = match config.format {
        LogFormat::Json => true,
        LogFormat::Pretty => false,
        LogFormat::Auto => !std::io::stdout().is_terminal(),
    };
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let mut builder = SdkTracerProvider::builder().with_resource(
        Resource::builder()
            .with_service_name(config.service_name.clone())
            .build(),
    );
    if let Some(endpoint) = &config.otlp_endpoint {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(format!("{}/v1/traces", endpoint.trim_end_matches('/')))
            .build();
        match exporter {
            Ok(e) => builder = builder.with_batch_exporter(e),
            Err(e) => eprintln!("imagegate: OTLP export disabled: {e}"),
        }
    }
    let provider = builder.build();
    // Spans cost a few microseconds each; they are only built when they are exported.
    let otel = config
        .otlp_endpoint
        .is_some()
        .then(|| tracing_opentelemetry::layer().with_tracer(provider.tracer("imagegate")));
    if otel.is_some() {
        EXPORTING.store(true, Ordering::Relaxed);
    }
    let fmt = if json {
        tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer().boxed()
    };
    // Already initialised (tests start several gateways in one process): keep the first.
    let _ = tracing_subscriber::registry()
        .with(fmt)
        .with(otel)
        .with(filter)
        .try_init();
    Telemetry { provider }
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// Makes `span` a child of the client's W3C trace context, if it sent one.
pub fn continue_trace(span: &tracing::Span, headers: &http::HeaderMap) {
    if !EXPORTING.load(Ordering::Relaxed) {
        return;
    }
    let parent =
        opentelemetry::global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(headers)));
    let _ = span.set_parent(parent);
}

/// The trace id of `span` (32 hex digits), when tracing is on.
pub fn trace_id(span: &tracing::Span) -> Option<String> {
    use opentelemetry::trace::TraceContextExt;
    if !EXPORTING.load(Ordering::Relaxed) {
        return None;
    }
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

#[derive(Default)]
struct Collect(Vec<(String, String)>);

impl Injector for Collect {
    fn set(&mut self, key: &str, value: String) {
        self.0.push((key.to_string(), value));
    }
}

/// `traceparent` (and `tracestate`) headers for an upstream call made inside `span`.
pub fn trace_headers(span: &tracing::Span) -> Vec<(String, String)> {
    if !EXPORTING.load(Ordering::Relaxed) {
        return Vec::new();
    }
    let mut out = Collect::default();
    let cx = span.context();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&cx, &mut out));
    out.0
}

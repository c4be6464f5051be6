//! Logging and tracing: `tracing` events to stderr (filter `TROUPE_LOG`), and, when an
//! OTLP endpoint is configured, spans exported over OTLP/HTTP (protobuf or JSON) by a
//! batch processor on its own thread.
//!
//! Each node names itself in the resource (`service.instance.id` = the node's name), so
//! a trace that crosses nodes shows which node every span came from. Sampling is
//! parent-based: a trace starts recorded with `sample_ratio`, and a span whose caller
//! (another node, over the gateway) sent a trace context follows the caller's decision,
//! so a trace is recorded whole or not at all. Request spans record their `trace_id` and
//! `span_id` as fields, so log lines inside them carry both.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Keeps the exporter alive; `shutdown` flushes what is buffered.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    pub fn shutdown(self) {
        if let Some(p) = self.provider {
            if let Err(e) = p.shutdown() {
                eprintln!("warning: flushing traces failed: {e}");
            }
        }
    }
}

/// Traces go to `<endpoint>/v1/traces` unless the endpoint already names a path.
pub fn traces_url(endpoint: &str) -> String {
    let e = endpoint.trim_end_matches('/');
    if e.ends_with("/v1/traces") {
        e.to_string()
    } else {
        format!("{e}/v1/traces")
    }
}

/// Where and how spans are exported.
pub struct Otlp {
    pub endpoint: String,
    pub service: String,
    /// `service.instance.id`: the node's name.
    pub instance: String,
    /// OTLP/HTTP with JSON bodies instead of protobuf.
    pub json: bool,
    pub sample_ratio: f64,
}

/// Installs the global subscriber: log lines on stderr at `default` level (`TROUPE_LOG`
/// overrides it), coloured only when stderr is a terminal and `NO_COLOR` is unset, and
/// spans exported over OTLP when `otlp` is given.
pub fn init(default: &str, otlp: Option<Otlp>) -> Result<Telemetry, String> {
    let filter =
        || EnvFilter::try_from_env("TROUPE_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(colour_logs())
        .with_target(false)
        .with_filter(filter());
    let Some(o) = otlp else {
        // A second init (tests, demo inside a process) is harmless.
        tracing_subscriber::registry().with(fmt).try_init().ok();
        return Ok(Telemetry { provider: None });
    };
    let protocol = if o.json {
        Protocol::HttpJson
    } else {
        Protocol::HttpBinary
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(protocol)
        .with_endpoint(traces_url(&o.endpoint))
        .build()
        .map_err(|e| format!("telemetry.otlp_endpoint `{}`: {e}", o.endpoint))?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            o.sample_ratio,
        ))))
        .with_resource(
            Resource::builder()
                .with_service_name(o.service.clone())
                .with_attribute(KeyValue::new("service.instance.id", o.instance.clone()))
                .build(),
        )
        .build();
    let otel = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("troupe"))
        .with_filter(filter());
    tracing_subscriber::registry()
        .with(fmt)
        .with(otel)
        .try_init()
        .ok();
    Ok(Telemetry {
        provider: Some(provider),
    })
}

/// Escape codes only for a person at a terminal: never into a file or a pipe.
fn colour_logs() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none()
}

/// The log level when neither `-v` nor `TROUPE_LOG` says otherwise.
pub fn default_level(verbose: bool, quiet: bool) -> &'static str {
    match (verbose, quiet) {
        (true, _) => "debug",
        (false, true) => "warn",
        (false, false) => "info",
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn traces_url_appends_the_signal_path_once() {
        assert_eq!(
            super::traces_url("http://c:4318"),
            "http://c:4318/v1/traces"
        );
        assert_eq!(
            super::traces_url("http://c:4318/"),
            "http://c:4318/v1/traces"
        );
        assert_eq!(
            super::traces_url("http://c:4318/v1/traces"),
            "http://c:4318/v1/traces"
        );
    }
}

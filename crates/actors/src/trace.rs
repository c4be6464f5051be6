//! Trace context across processes: the W3C `traceparent`/`tracestate` of the current
//! span, written into every cross-node call, and read back on the callee so its spans
//! join the caller's trace (ractor carries spans on local sends only).

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use troupe_proto::wire::TraceContext;

const TRACEPARENT: &str = "traceparent";
const TRACESTATE: &str = "tracestate";

/// The context of `span` (empty when no trace is being recorded, as without an OTLP
/// exporter).
pub fn context_of(span: &tracing::Span) -> TraceContext {
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return TraceContext::default();
    }
    let mut carrier: HashMap<String, String> = HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    TraceContext {
        traceparent: carrier.remove(TRACEPARENT).unwrap_or_default(),
        tracestate: carrier.remove(TRACESTATE).unwrap_or_default(),
    }
}

/// The context of the current span.
pub fn current() -> TraceContext {
    context_of(&tracing::Span::current())
}

/// The `traceparent` of the current span when its trace is sampled (`None` otherwise):
/// what a written record carries, so its apply joins the writer's trace. Unsampled
/// writes carry nothing, which keeps the log's records as small as before.
pub fn sampled() -> Option<String> {
    let cx = tracing::Span::current().context();
    let sc = cx.span().span_context().clone();
    (sc.is_valid() && sc.is_sampled()).then(|| format!("00-{}-{}-01", sc.trace_id(), sc.span_id()))
}

/// Makes `span` a child of the caller's span described by `tc` (nothing when `tc` is
/// empty or malformed: the span then starts its own trace).
pub fn adopt(span: &tracing::Span, tc: &TraceContext) {
    if tc.is_empty() {
        return;
    }
    let mut carrier: HashMap<String, String> = HashMap::new();
    carrier.insert(TRACEPARENT.into(), tc.traceparent.clone());
    if !tc.tracestate.is_empty() {
        carrier.insert(TRACESTATE.into(), tc.tracestate.clone());
    }
    let parent = TraceContextPropagator::new().extract(&carrier);
    if parent.span().span_context().is_valid() {
        // Fails only when the span is disabled (not recorded): nothing to link then.
        drop(span.set_parent(parent));
    }
}

/// Records the trace and span ids of `span` in its `trace_id` and `span_id` fields (when
/// it declares them), so every log line inside it names them and can be found from a
/// trace.
pub fn record_ids(span: &tracing::Span) {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    if sc.is_valid() {
        span.record("trace_id", tracing::field::display(sc.trace_id()));
        span.record("span_id", tracing::field::display(sc.span_id()));
    }
}

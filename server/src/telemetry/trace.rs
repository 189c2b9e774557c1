//! Traces: the OTLP/gRPC exporter, the span every RPC runs in, and the W3C trace context a
//! caller sends in its metadata (`traceparent`, `tracestate`), which that span continues.

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_otlp::{SpanExporter, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tonic::metadata::{KeyRef, MetadataMap};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::TelemetryError;

/// A tracer provider that batches spans to the OTLP/gRPC collector at `endpoint`. Must be built
/// inside a Tokio runtime (the gRPC channel connects lazily on it).
pub(super) fn provider(
    endpoint: &str,
    service_name: &str,
) -> Result<SdkTracerProvider, TelemetryError> {
    let exporter = SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .map_err(|e| TelemetryError::Otlp {
            endpoint: endpoint.to_string(),
            message: e.to_string(),
        })?;
    let resource = Resource::builder()
        .with_service_name(service_name.to_string())
        .build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}

/// Reads the W3C trace context from gRPC metadata. Binary (`-bin`) entries are skipped.
pub struct MetadataExtractor<'a>(pub &'a MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|key| match key {
                KeyRef::Ascii(key) => Some(key.as_str()),
                KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

/// The caller's trace context; an empty context when the metadata carries none (or a malformed
/// one), in which case the RPC starts a new trace.
pub fn parent_context(metadata: &MetadataMap) -> opentelemetry::Context {
    TraceContextPropagator::new().extract(&MetadataExtractor(metadata))
}

/// The span an RPC runs in: named `rpc` in logs and after the method in traces, carrying the
/// request id, and continuing the caller's trace when the metadata carries one. When traces are
/// exported its `trace_id` field lets log lines be matched to the trace.
pub fn rpc_span(metadata: &MetadataMap, rpc: &str, request_id: &str) -> Span {
    let span = tracing::info_span!(
        "rpc",
        rpc,
        request_id = %request_id,
        trace_id = tracing::field::Empty,
        otel.name = rpc,
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.method = rpc,
    );
    let parent = parent_context(metadata);
    if parent.span().span_context().is_valid() {
        // Fails only when no OpenTelemetry layer is installed: then there is nothing to continue.
        let _ = span.set_parent(parent);
    }
    let context = span.context();
    let trace_id = context.span().span_context().trace_id();
    if trace_id != opentelemetry::trace::TraceId::INVALID {
        span.record("trace_id", tracing::field::display(trace_id));
    }
    span
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::{SpanId, TraceId};

    use super::*;

    const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn metadata(entries: &[(&'static str, &str)]) -> MetadataMap {
        let mut metadata = MetadataMap::new();
        for (key, value) in entries {
            metadata.insert(*key, value.parse().expect("ascii value"));
        }
        metadata
    }

    #[test]
    fn traceparent_is_read_from_metadata() {
        let cx = parent_context(&metadata(&[("traceparent", TRACEPARENT)]));
        let span = cx.span();
        let parent = span.span_context();
        assert!(parent.is_valid());
        assert!(parent.is_remote());
        assert!(parent.is_sampled());
        let trace_id = TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").expect("hex");
        assert_eq!(parent.trace_id(), trace_id);
        assert_eq!(
            parent.span_id(),
            SpanId::from_hex("00f067aa0ba902b7").expect("hex")
        );
    }

    #[test]
    fn tracestate_travels_with_it() {
        let cx = parent_context(&metadata(&[
            ("traceparent", TRACEPARENT),
            ("tracestate", "vendor=value"),
        ]));
        let span = cx.span();
        assert_eq!(
            span.span_context().trace_state().get("vendor"),
            Some("value")
        );
    }

    #[test]
    fn missing_or_malformed_traceparent_starts_a_new_trace() {
        for entries in [
            vec![],
            vec![("traceparent", "00-nothex-00f067aa0ba902b7-01")],
            vec![(
                "traceparent",
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            )],
        ] {
            let cx = parent_context(&metadata(&entries));
            assert!(!cx.span().span_context().is_valid(), "{entries:?}");
        }
    }

    #[test]
    fn extractor_lists_ascii_keys_only() {
        let mut map = metadata(&[("traceparent", TRACEPARENT)]);
        map.insert_bin(
            "trace-bin",
            tonic::metadata::MetadataValue::from_bytes(b"\x00"),
        );
        let extractor = MetadataExtractor(&map);
        assert_eq!(extractor.keys(), vec!["traceparent"]);
        assert_eq!(extractor.get("traceparent"), Some(TRACEPARENT));
        assert_eq!(extractor.get("missing"), None);
    }
}

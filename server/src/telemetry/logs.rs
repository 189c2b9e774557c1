//! The process's tracing subscriber: log lines (text or JSON, each carrying the fields of the
//! spans it happened in, such as the request id) and, when configured, the OTLP span exporter.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Subscriber;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use super::TelemetryError;
use crate::config::LogFormat;

/// The filter used when `POLYHEAD_LOG` is unset: ONNX Runtime's INFO lines are chatty.
const DEFAULT_FILTER: &str = "info,ort=warn";

/// Installs the global subscriber: the `POLYHEAD_LOG` filter, log lines on stderr and, given a
/// tracer provider, the layer that exports spans through it.
pub(super) fn install(
    format: LogFormat,
    tracer: Option<&SdkTracerProvider>,
) -> Result<(), TelemetryError> {
    let filter =
        EnvFilter::try_from_env("POLYHEAD_LOG").unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let otel = tracer.map(|provider| {
        tracing_opentelemetry::layer().with_tracer(provider.tracer(env!("CARGO_PKG_NAME")))
    });
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt_layer(format, std::io::stderr))
        .with(otel)
        .try_init()
        .map_err(|e| TelemetryError::Logging(e.to_string()))
}

/// The log-line layer writing to `writer`. JSON lines hold the current span's fields and the
/// list of enclosing spans, so every line of a request carries its `request_id`.
pub fn fmt_layer<S, W>(format: LogFormat, writer: W) -> Box<dyn Layer<S> + Send + Sync>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let layer = tracing_subscriber::fmt::layer().with_writer(writer);
    match format {
        LogFormat::Text => layer.boxed(),
        LogFormat::Json => layer
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .boxed(),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// Collects what the layer writes.
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .expect("buffer lock: this is a bug")
                .extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn logged(format: LogFormat) -> String {
        let buffer = Buffer::default();
        let sink = buffer.clone();
        let subscriber =
            tracing_subscriber::registry().with(fmt_layer(format, move || sink.clone()));
        tracing::subscriber::with_default(subscriber, || {
            let span =
                crate::telemetry::rpc_span(&tonic::metadata::MetadataMap::new(), "Detect", "2a");
            span.in_scope(|| tracing::info!("decoded"));
        });
        let bytes = buffer.0.lock().expect("buffer lock").clone();
        String::from_utf8(bytes).expect("utf-8 logs")
    }

    #[test]
    fn json_lines_carry_the_request_id_of_their_span() {
        let line = logged(LogFormat::Json);
        assert!(line.contains(r#""request_id":"2a""#), "{line}");
        assert!(line.contains(r#""spans":[{"#), "{line}");
        assert!(line.contains(r#""message":"decoded""#), "{line}");
    }

    /// `text` without its ANSI colour sequences (`ESC [ ... m`).
    fn plain(text: &str) -> String {
        let mut out = String::new();
        let mut chars = text.chars();
        while let Some(c) = chars.next() {
            if c == '\u{1b}' {
                chars.by_ref().find(|&c| c == 'm');
            } else {
                out.push(c);
            }
        }
        out
    }

    #[test]
    fn text_lines_carry_the_request_id_of_their_span() {
        let line = plain(&logged(LogFormat::Text));
        assert!(line.contains("rpc{"), "{line}");
        assert!(line.contains("request_id=2a"), "{line}");
        assert!(line.contains("decoded"), "{line}");
    }
}

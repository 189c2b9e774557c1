//! Observability: Prometheus metrics on their own HTTP port, a tracing span per request and per
//! stage (exported over OTLP/gRPC when a collector is configured), and the log output.
//!
//! The metrics recorder and the tracing subscriber are process-wide: [`Telemetry::init`]
//! installs both once, and a process that calls it again gets an error rather than a second set.

mod exporter;
mod grpc;
mod logs;
pub mod metrics;
mod trace;

use std::net::SocketAddr;
use std::time::Duration;

use clap::Args;
use opentelemetry_sdk::trace::SdkTracerProvider;
use serde::Serialize;

pub use exporter::{recorder, serve_metrics};
pub use grpc::{GrpcMetrics, GrpcMetricsLayer, MeteredBody, MeteredFuture, grpc_metrics_layer};
pub use logs::fmt_layer;
pub use trace::{MetadataExtractor, parent_context, rpc_span};

use crate::config::LogFormat;

/// How long shutting the tracer down may take: the last spans are flushed to the collector.
const TRACER_SHUTDOWN: Duration = Duration::from_secs(5);

/// Metrics and tracing settings.
#[derive(Debug, Clone, Args, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct TelemetryConfig {
    /// Address of the Prometheus scrape endpoint (`GET /metrics`), separate from the gRPC port.
    #[arg(
        long,
        env = "POLYHEAD_METRICS_LISTEN",
        default_value = "127.0.0.1:9464"
    )]
    pub metrics_listen: SocketAddr,

    /// Serve no Prometheus metrics.
    #[arg(long, env = "POLYHEAD_NO_METRICS")]
    pub no_metrics: bool,

    /// OTLP/gRPC collector that receives the traces, e.g. `http://127.0.0.1:4317`. Traces are
    /// exported only when this is set.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,

    /// The `service.name` the exported traces carry.
    #[arg(long, env = "OTEL_SERVICE_NAME", default_value = "polyhead")]
    pub service_name: String,
}

/// Why telemetry could not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The log subscriber could not be installed (another one is).
    #[error("cannot install the log subscriber: {0}")]
    Logging(String),
    /// The Prometheus recorder could not be installed (another one is).
    #[error("cannot install the metrics recorder: {0}")]
    Recorder(String),
    /// The metrics port could not be bound.
    #[error("cannot listen for metrics on {address}: {source}")]
    Listen {
        address: SocketAddr,
        source: std::io::Error,
    },
    /// The OTLP exporter could not be built from its settings.
    #[error("cannot export traces to {endpoint}: {message}")]
    Otlp { endpoint: String, message: String },
}

/// What [`Telemetry::init`] started that needs stopping: the trace exporter.
pub struct Telemetry {
    tracer: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Installs the log subscriber (with the OTLP layer when an endpoint is set), then the
    /// metrics recorder and its HTTP endpoint. Logging is up before any error is returned, so
    /// the caller can log it. Must run inside a Tokio runtime.
    pub async fn init(config: &TelemetryConfig, format: LogFormat) -> Result<Self, TelemetryError> {
        let tracer = config
            .otlp_endpoint
            .as_deref()
            .filter(|endpoint| !endpoint.is_empty())
            .map(|endpoint| trace::provider(endpoint, &config.service_name))
            .transpose();
        let installed = logs::install(format, tracer.as_ref().ok().and_then(Option::as_ref));
        let tracer = tracer?;
        installed?;
        if !config.no_metrics {
            let address = exporter::start(config.metrics_listen).await?;
            tracing::info!(%address, "serving Prometheus metrics on /metrics");
        }
        if let Some(endpoint) = &config.otlp_endpoint {
            tracing::info!(%endpoint, service = %config.service_name, "exporting traces over OTLP");
        }
        Ok(Self { tracer })
    }

    /// Flushes the last spans and stops the exporter; gives up after a few seconds when the
    /// collector does not answer.
    pub async fn shutdown(self) {
        let Some(tracer) = self.tracer else { return };
        let stopped =
            tokio::task::spawn_blocking(move || tracer.shutdown_with_timeout(TRACER_SHUTDOWN))
                .await;
        if let Ok(Err(e)) = stopped {
            tracing::warn!("shutting the trace exporter down failed: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        telemetry: TelemetryConfig,
    }

    #[test]
    fn defaults_serve_metrics_on_localhost() {
        let flags = Flags::try_parse_from(["polyhead-server"]).expect("defaults");
        let t = flags.telemetry;
        assert_eq!(t.metrics_listen.to_string(), "127.0.0.1:9464");
        assert!(!t.no_metrics);
        assert_eq!(t.service_name, "polyhead");
    }

    #[test]
    fn flags_set_the_endpoints() {
        let flags = Flags::try_parse_from([
            "polyhead-server",
            "--metrics-listen",
            "0.0.0.0:9100",
            "--no-metrics",
            "--otlp-endpoint",
            "http://collector:4317",
            "--service-name",
            "edge",
        ])
        .expect("valid flags");
        let t = flags.telemetry;
        assert_eq!(t.metrics_listen.port(), 9100);
        assert!(t.no_metrics);
        assert_eq!(t.otlp_endpoint.as_deref(), Some("http://collector:4317"));
        assert_eq!(t.service_name, "edge");
    }
}

//! The gRPC edge: services, proto <-> domain conversion and the error -> status mapping.
//! Nothing below this module sees a proto type.

mod auth;
mod convert;
mod deadline;
mod gate;
mod info;
mod oip;
mod receive;
mod service;
mod status;
#[doc(hidden)]
pub mod validate;
mod windows;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use polyhead_proto::v1::polyhead_server::PolyheadServer;
use tokio::net::TcpListener;
use tonic::codec::CompressionEncoding;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;

pub use auth::{Auth, AuthLayer};
pub use gate::{Admitted, Deferred};
pub use receive::EXEMPT_MESSAGE_BYTES;
pub use service::PolyheadService;

use crate::lifecycle::Lifecycle;
use crate::security::Security;

/// Largest HTTP/2 frame a client may send (the protocol's default is 16 KiB): an image arrives
/// in a few frames rather than in one per 16 KiB, each read, parsed and handed on alone.
const MAX_FRAME_BYTES: u32 = 1 << 20;
/// HTTP/2 flow-control windows: how much a client may send before the server has taken it in.
/// With hyper's 1 MiB, an upload of a few MiB stalls for window updates on its way; the request
/// size itself is bounded by `--max-message-bytes`.
const STREAM_WINDOW_BYTES: u32 = 8 << 20;
const CONNECTION_WINDOW_BYTES: u32 = 16 << 20;

/// Encoded `FileDescriptorSet`s of the services served besides reflection: what reflection
/// describes.
const SERVED_DESCRIPTOR_SETS: [&[u8]; 2] = [
    polyhead_proto::FILE_DESCRIPTOR_SET,
    tonic_health::pb::FILE_DESCRIPTOR_SET,
];

/// Encoded `FileDescriptorSet`s of the reflection services (v1 and v1alpha), which reflection
/// describes on its own.
const REFLECTION_DESCRIPTOR_SETS: [&[u8]; 2] = [
    tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
    tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
];

/// How the gRPC server is put together.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Largest request message, in bytes.
    pub max_request_bytes: usize,
    /// Most bytes one RecognizeActionWindows upload may send over all its messages.
    pub max_upload_bytes: u64,
    /// Largest response message, in bytes.
    pub max_response_bytes: usize,
    /// Serve gRPC reflection (v1 and v1alpha).
    pub reflection: bool,
    /// HTTP/2 streams one connection may have open at once.
    pub max_concurrent_streams: u32,
    /// How long in-flight calls may take to finish once shutdown starts.
    pub drain_timeout: Duration,
    /// Deadline of calls that carry none.
    pub default_timeout: Duration,
    /// Longest deadline of any call.
    pub max_timeout: Duration,
    /// Bytes of request messages received at once, over every call and connection.
    pub max_receiving_bytes: u64,
    /// The `grpc-retry-pushback-ms` sent when that budget refuses a call.
    pub retry_pushback_ms: u64,
}

/// Serves health, reflection and the polyhead API on `listener`, in plaintext and to every
/// caller. The API answers UNAVAILABLE until `lifecycle` has a pipeline. When `shutdown`
/// resolves the server drains: health flips to NOT_SERVING, the listener closes, every
/// connection gets an HTTP/2 GOAWAY (so that clients open their next calls elsewhere), calls
/// that still arrive get UNAVAILABLE, and the server returns once the in-flight calls have
/// finished ([`crate::run`] stops waiting for them after `drain_timeout`).
pub async fn serve(
    lifecycle: Arc<Lifecycle>,
    options: ServeOptions,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    serve_secured(lifecycle, options, Security::default(), listener, shutdown).await
}

/// [`serve`] with `security`: TLS (mutual when a client CA is set) and bearer tokens required
/// on every call but health checks.
pub async fn serve_secured(
    lifecycle: Arc<Lifecycle>,
    options: ServeOptions,
    security: Security,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let (max_request, max_response) = (options.max_request_bytes, options.max_response_bytes);
    let polyhead = Deferred::new(Arc::clone(&lifecycle), move |pipeline| {
        PolyheadServer::new(PolyheadService::new(pipeline))
            .max_decoding_message_size(max_request)
            .max_encoding_message_size(max_response)
            .accept_compressed(CompressionEncoding::Gzip)
            .accept_compressed(CompressionEncoding::Zstd)
            .send_compressed(CompressionEncoding::Gzip)
            .send_compressed(CompressionEncoding::Zstd)
    });
    // The protocol's own probes answer "live, not ready" while loading and draining.
    let oip = Admitted::new(
        Arc::clone(&lifecycle),
        oip::service(Arc::clone(&lifecycle), max_request, max_response),
        &["ServerLive", "ServerReady", "ModelReady", "ServerMetadata"],
    );
    // Both protocol versions: some clients only speak v1alpha.
    // Held to a few KiB per message, as they are outside the receive budget.
    let reflection_v1 = options
        .reflection
        .then(|| ok_or_log(reflection().build_v1()))
        .flatten()
        .map(|server| server.max_decoding_message_size(EXEMPT_MESSAGE_BYTES));
    let reflection_v1alpha = options
        .reflection
        .then(|| ok_or_log(reflection().build_v1alpha()))
        .flatten()
        .map(|server| server.max_decoding_message_size(EXEMPT_MESSAGE_BYTES));
    let drain = drain(Arc::clone(&lifecycle), shutdown);
    let mut builder = Server::builder()
        .max_concurrent_streams(options.max_concurrent_streams)
        .max_frame_size(MAX_FRAME_BYTES)
        .initial_stream_window_size(STREAM_WINDOW_BYTES)
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES);
    if let Some(tls) = security.tls {
        builder = builder.tls_config(tls)?;
    }
    builder
        .layer(metrics_layer())
        .layer(deadline::ArrivalLayer::new(
            options.default_timeout,
            options.max_timeout,
        ))
        .layer(AuthLayer::new(security.tokens))
        .layer(receive::ReceiveBudgetLayer::new(
            options.max_receiving_bytes,
            receive::Inflated::new(
                max_request as u64,
                options.max_upload_bytes,
                crate::config::FRAMING_ALLOWANCE,
            ),
            options.retry_pushback_ms,
        ))
        .add_service(lifecycle.health_service())
        .add_optional_service(reflection_v1)
        .add_optional_service(reflection_v1alpha)
        .add_service(polyhead)
        .add_service(oip)
        .serve_with_incoming_shutdown(incoming(listener), drain)
        .await
}

/// Resolves when the server starts its graceful shutdown (tonic's: the listener closes, each
/// connection gets a GOAWAY and ends once its calls have): after `shutdown`, once the server
/// no longer reports itself ready. How long the calls may take is bounded by whoever serves
/// (`crate::run`: the drain timeout).
async fn drain(lifecycle: Arc<Lifecycle>, shutdown: impl Future<Output = ()>) {
    shutdown.await;
    lifecycle.start_draining().await;
    tracing::info!(inflight = lifecycle.inflight(), "draining");
}

/// The gRPC metrics, with labels of their own for every method of the binary: the served
/// services' and reflection's, whether or not reflection is on (its methods are a fixed few, so
/// when it is off its calls are counted, as UNIMPLEMENTED, under their own names).
fn metrics_layer() -> crate::telemetry::GrpcMetricsLayer {
    crate::telemetry::grpc_metrics_layer(
        &[SERVED_DESCRIPTOR_SETS, REFLECTION_DESCRIPTOR_SETS].concat(),
    )
}

/// Reflection over every proto this server speaks.
fn reflection() -> tonic_reflection::server::Builder<'static> {
    SERVED_DESCRIPTOR_SETS.into_iter().fold(
        tonic_reflection::server::Builder::configure(),
        |builder, set| builder.register_encoded_file_descriptor_set(set),
    )
}

fn ok_or_log<T>(built: Result<T, tonic_reflection::server::Error>) -> Option<T> {
    built
        .map_err(|e| tracing::error!("reflection disabled: {e}"))
        .ok()
}

/// Accepted connections with Nagle's algorithm off: a response's headers, message and trailers
/// go out as separate writes, and with Nagle on the later ones wait for the peer's delayed ACK
/// (up to 40 ms on Linux) before they are sent.
fn incoming(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
}

#[cfg(test)]
mod tests {
    use futures_util::StreamExt;

    use super::*;

    #[tokio::test]
    async fn accepted_connections_send_without_delay() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let mut incoming = incoming(listener);
        let _client = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let accepted = incoming
            .next()
            .await
            .expect("a connection")
            .expect("accepted");
        assert!(accepted.nodelay().expect("TCP_NODELAY readable"));
    }
}

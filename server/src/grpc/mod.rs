//! The gRPC edge: services, proto <-> domain conversion and the error -> status mapping.
//! Nothing below this module sees a proto type.

mod convert;
mod info;
mod service;
mod status;

use std::future::Future;
use std::sync::Arc;

use polyhead_proto::v1::polyhead_server::PolyheadServer;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::codec::CompressionEncoding;
use tonic::transport::Server;

pub use service::PolyheadService;

use crate::pipeline::Pipeline;

/// Largest response message, in bytes: label maps of large images are big.
const MAX_RESPONSE_BYTES: usize = 256 << 20;

/// Serves the polyhead API on `listener` until `shutdown` resolves, then lets in-flight calls
/// finish.
pub async fn serve(
    pipeline: Arc<Pipeline>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let max_request = pipeline.limits().max_message_bytes;
    let service = PolyheadServer::new(PolyheadService::new(pipeline))
        .max_decoding_message_size(max_request)
        .max_encoding_message_size(MAX_RESPONSE_BYTES)
        .accept_compressed(CompressionEncoding::Gzip)
        .accept_compressed(CompressionEncoding::Zstd)
        .send_compressed(CompressionEncoding::Gzip)
        .send_compressed(CompressionEncoding::Zstd);
    Server::builder()
        .add_service(service)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await
}

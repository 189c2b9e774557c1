//! The Open Inference Protocol (KServe v2) `inference.GRPCInferenceService`, served next to
//! polyhead's own API so that Triton's and KServe's clients call polyhead unchanged.
//!
//! Its models are the backbone (outputs: the feature maps) and each head, which runs the
//! backbone once and then the head on the features it consumes (outputs: the head's raw ONNX
//! outputs), like the monolithic reference models. Every model takes the backbone's FP32 input;
//! for an action head its batch axis holds the clip's frames. None of Triton's extensions is
//! implemented.

mod models;
mod tensor;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use polyhead_proto::inference::grpc_inference_service_server::{
    GrpcInferenceService, GrpcInferenceServiceServer,
};
use polyhead_proto::inference::{
    ModelInferRequest, ModelInferResponse, ModelMetadataRequest, ModelMetadataResponse,
    ModelReadyRequest, ModelReadyResponse, ServerLiveRequest, ServerLiveResponse,
    ServerMetadataRequest, ServerMetadataResponse, ServerReadyRequest, ServerReadyResponse,
};
use tonic::codec::CompressionEncoding;
use tonic::{Request, Response, Status};

use super::{deadline, status};
use crate::config::Limits;
use crate::error::Error;
use crate::lifecycle::Lifecycle;
use crate::pipeline::Pipeline;
use models::Model;

/// The name the server reports in its metadata.
const SERVER_NAME: &str = "polyhead";

/// The Open Inference Protocol over the server's pipeline. It answers ServerLive, ServerReady
/// and ModelReady from the start, so probes see "live, not ready" while the models load.
pub struct OipService {
    lifecycle: Arc<Lifecycle>,
    next_id: AtomicU64,
}

/// The service with its message limits: requests up to `max_message_bytes` (decoded), responses
/// up to `max_response_bytes`.
pub fn service(
    lifecycle: Arc<Lifecycle>,
    max_message_bytes: usize,
    max_response_bytes: usize,
) -> GrpcInferenceServiceServer<OipService> {
    GrpcInferenceServiceServer::new(OipService::new(lifecycle))
        .max_decoding_message_size(max_message_bytes)
        .max_encoding_message_size(max_response_bytes)
        .accept_compressed(CompressionEncoding::Gzip)
        .accept_compressed(CompressionEncoding::Zstd)
        .send_compressed(CompressionEncoding::Gzip)
        .send_compressed(CompressionEncoding::Zstd)
}

impl OipService {
    /// Serves the pipeline `lifecycle` holds once it is loaded.
    pub fn new(lifecycle: Arc<Lifecycle>) -> Self {
        Self {
            lifecycle,
            next_id: AtomicU64::new(1),
        }
    }

    /// Whether the server (and so every model) is ready for inferences: loaded, not draining.
    fn ready(&self) -> bool {
        self.lifecycle.pipeline().is_some() && !self.lifecycle.is_draining()
    }

    /// The pipeline, or UNAVAILABLE while the models load.
    fn pipeline(&self) -> Result<&Arc<Pipeline>, Status> {
        self.lifecycle
            .pipeline()
            .ok_or_else(|| Status::unavailable("the server is starting: models are loading"))
    }

    /// A request id for logs, distinct from the polyhead service's.
    fn request_id(&self) -> String {
        format!("oip-{:x}", self.next_id.fetch_add(1, Ordering::Relaxed))
    }

    /// Answers a quick call that needs no deadline, mapping its error like every other.
    fn answer<T>(&self, limits: &Limits, result: Result<T, Error>) -> Result<Response<T>, Status> {
        result
            .map(Response::new)
            .map_err(|error| status::to_status(error, &self.request_id(), limits))
    }
}

#[tonic::async_trait]
impl GrpcInferenceService for OipService {
    async fn server_live(
        &self,
        _: Request<ServerLiveRequest>,
    ) -> Result<Response<ServerLiveResponse>, Status> {
        Ok(Response::new(ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _: Request<ServerReadyRequest>,
    ) -> Result<Response<ServerReadyResponse>, Status> {
        Ok(Response::new(ServerReadyResponse {
            ready: self.ready(),
        }))
    }

    /// Like Triton, an unknown model or version is simply not ready.
    async fn model_ready(
        &self,
        request: Request<ModelReadyRequest>,
    ) -> Result<Response<ModelReadyResponse>, Status> {
        let ModelReadyRequest { name, version } = request.into_inner();
        let known = self
            .lifecycle
            .pipeline()
            .is_some_and(|p| Model::find(p.models(), &name, &version).is_ok());
        Ok(Response::new(ModelReadyResponse {
            ready: self.ready() && known,
        }))
    }

    async fn server_metadata(
        &self,
        _: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        Ok(Response::new(ServerMetadataResponse {
            name: SERVER_NAME.to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            extensions: Vec::new(),
        }))
    }

    async fn model_metadata(
        &self,
        request: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        let ModelMetadataRequest { name, version } = request.into_inner();
        let pipeline = self.pipeline()?;
        self.answer(
            pipeline.limits(),
            Model::find(pipeline.models(), &name, &version).and_then(|m| m.metadata()),
        )
    }

    async fn model_infer(
        &self,
        request: Request<ModelInferRequest>,
    ) -> Result<Response<ModelInferResponse>, Status> {
        let (metadata, extensions, request) = request.into_parts();
        let request_id = self.request_id();
        let pipeline = self.pipeline()?;
        // Checked before admission: a request that names no model, or whose input the model
        // cannot take, is refused at once, never after a wait for a slot.
        let work = async move {
            let checked = check(pipeline, request)?;
            pipeline.admission().run(infer(pipeline, checked)).await
        };
        deadline::run(
            &metadata,
            &extensions,
            "ModelInfer",
            &request_id,
            pipeline.limits(),
            work,
        )
        .await
    }
}

/// A ModelInfer request whose model and outputs exist and whose input the model takes.
struct Checked<'a> {
    model: Model<'a>,
    wanted: Vec<String>,
    id: String,
    input: tensor::CheckedInput,
}

/// Finds the request's model and checks the outputs it asks for and its input.
fn check(pipeline: &Pipeline, request: ModelInferRequest) -> Result<Checked<'_>, Error> {
    // Request-level parameters (priority, sequence ids, ...) select nothing polyhead offers.
    let ModelInferRequest {
        model_name,
        model_version,
        id,
        parameters: _,
        inputs,
        outputs,
        raw_input_contents,
    } = request;
    let model = Model::find(pipeline.models(), &model_name, &model_version)?;
    let wanted = tensor::requested_outputs(&outputs, model.outputs())?;
    let input = tensor::check_input(inputs, raw_input_contents, &model.input()?)?;
    model.check_batch(input.shape(), pipeline.limits())?;
    Ok(Checked {
        model,
        wanted,
        id,
        input,
    })
}

/// Runs the backbone once (in runs of at most its max batch for an action head's longer clip),
/// then the head, for a head model, on the checked request's input and returns the requested
/// outputs as raw little-endian FP32.
async fn infer(pipeline: &Pipeline, checked: Checked<'_>) -> Result<ModelInferResponse, Error> {
    let Checked {
        model,
        wanted,
        id,
        input,
    } = checked;
    // Turning up to a whole message of bytes into floats is kept off the async workers.
    let input = tokio::task::spawn_blocking(move || input.read()).await??;
    let results = model.run(input).await?;
    tensor::check_response_size(&results, &wanted, pipeline.limits().max_response_bytes)?;
    let (outputs, raw_output_contents) =
        tokio::task::spawn_blocking(move || tensor::encode_outputs(&results, &wanted)).await??;
    Ok(ModelInferResponse {
        model_name: model.name().to_string(),
        model_version: model.version().to_string(),
        id,
        parameters: HashMap::new(),
        outputs,
        raw_output_contents,
    })
}

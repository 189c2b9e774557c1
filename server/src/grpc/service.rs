//! The `polyhead.v1.Polyhead` service: each RPC validates its request, runs the pipeline under
//! the call's deadline and converts the result.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use polyhead_proto::v1;
use polyhead_proto::v1::polyhead_server::Polyhead;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::{convert, info, status};
use crate::error::Error;
use crate::manifest::HeadKind;
use crate::pipeline::{HeadOutput, ImageRequest, Pipeline};

/// The service implementation over one pipeline.
pub struct PolyheadService {
    pipeline: Arc<Pipeline>,
    next_id: AtomicU64,
}

impl PolyheadService {
    /// Serves `pipeline`.
    pub fn new(pipeline: Arc<Pipeline>) -> Self {
        Self {
            pipeline,
            next_id: AtomicU64::new(1),
        }
    }

    /// Runs `work` under the call's deadline (or the default one), with a request id for logs.
    async fn call<T, F>(
        &self,
        metadata: &MetadataMap,
        rpc: &str,
        work: F,
    ) -> Result<Response<T>, Status>
    where
        F: Future<Output = Result<T, Error>>,
    {
        let request_id = format!("{:x}", self.next_id.fetch_add(1, Ordering::Relaxed));
        let timeout =
            deadline(metadata).unwrap_or_else(|| self.pipeline.limits().default_timeout());
        let span = tracing::info_span!("rpc", rpc, request_id = %request_id);
        match tokio::time::timeout(timeout, work).instrument(span).await {
            Ok(Ok(reply)) => Ok(Response::new(reply)),
            Ok(Err(error)) => Err(status::to_status(error, &request_id)),
            Err(_) => Err(Status::deadline_exceeded(format!(
                "{rpc} did not finish within its deadline of {:.3} s",
                timeout.as_secs_f64()
            ))),
        }
    }
}

/// The caller's deadline from the `grpc-timeout` header (`<digits><H|M|S|m|u|n>`).
fn deadline(metadata: &MetadataMap) -> Option<Duration> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[tonic::async_trait]
impl Polyhead for PolyheadService {
    async fn detect(
        &self,
        request: Request<v1::DetectRequest>,
    ) -> Result<Response<v1::DetectResponse>, Status> {
        let (metadata, _, req) = request.into_parts();
        let pipeline = &self.pipeline;
        self.call(&metadata, "Detect", async move {
            let models = pipeline.models();
            let head = convert::head(models, &req.head, HeadKind::Detection)?;
            let options = convert::detect_options(req.options, &head)?;
            let image = convert::image(req.image)?;
            let tasks = vec![crate::pipeline::HeadTask {
                head: head.clone(),
                options,
            }];
            let (mut outputs, timings) = pipeline.run_image(ImageRequest { image, tasks }).await?;
            let Some((_, HeadOutput::Detections(d))) = outputs.pop() else {
                return Err(Error::Internal(
                    "the detection head returned no detections".into(),
                ));
            };
            Ok(v1::DetectResponse {
                detections: Some(convert::detections(d, &head.labels)),
                timings: Some(convert::timings(timings)),
            })
        })
        .await
    }

    async fn segment(
        &self,
        request: Request<v1::SegmentRequest>,
    ) -> Result<Response<v1::SegmentResponse>, Status> {
        let (metadata, _, req) = request.into_parts();
        let pipeline = &self.pipeline;
        self.call(&metadata, "Segment", async move {
            let models = pipeline.models();
            let head = convert::head(models, &req.head, HeadKind::Segmentation)?;
            let options = convert::segment_options(req.options, &head)?;
            let image = convert::image(req.image)?;
            let tasks = vec![crate::pipeline::HeadTask {
                head: head.clone(),
                options,
            }];
            let (mut outputs, timings) = pipeline.run_image(ImageRequest { image, tasks }).await?;
            let Some((_, HeadOutput::Segmentation(s))) = outputs.pop() else {
                return Err(Error::Internal(
                    "the segmentation head returned no label map".into(),
                ));
            };
            Ok(v1::SegmentResponse {
                segmentation: Some(convert::segmentation(s, &head.labels)),
                timings: Some(convert::timings(timings)),
            })
        })
        .await
    }

    async fn recognize_action(
        &self,
        request: Request<v1::RecognizeActionRequest>,
    ) -> Result<Response<v1::RecognizeActionResponse>, Status> {
        let (metadata, _, req) = request.into_parts();
        let pipeline = &self.pipeline;
        self.call(&metadata, "RecognizeAction", async move {
            let req = convert::action_request(pipeline.models(), pipeline.limits(), req)?;
            let head = req.head.clone();
            let (actions, timings) = pipeline.run_action(req).await?;
            Ok(v1::RecognizeActionResponse {
                actions: Some(convert::actions(actions, &head.labels)),
                timings: Some(convert::timings(timings)),
            })
        })
        .await
    }

    async fn analyze(
        &self,
        request: Request<v1::AnalyzeRequest>,
    ) -> Result<Response<v1::AnalyzeResponse>, Status> {
        let (metadata, _, req) = request.into_parts();
        let pipeline = &self.pipeline;
        self.call(&metadata, "Analyze", async move {
            let models = pipeline.models();
            let tasks =
                convert::analyze_tasks(models, req.heads, req.detect_options, req.segment_options)?;
            let image = convert::image(req.image)?;
            let (outputs, timings) = pipeline.run_image(ImageRequest { image, tasks }).await?;
            let results = outputs
                .into_iter()
                .map(|(name, output)| head_result(pipeline, name, output))
                .collect();
            Ok(v1::AnalyzeResponse {
                results,
                timings: Some(convert::timings(timings)),
            })
        })
        .await
    }

    async fn list_models(
        &self,
        _: Request<v1::ListModelsRequest>,
    ) -> Result<Response<v1::ListModelsResponse>, Status> {
        Ok(Response::new(info::list(self.pipeline.models())))
    }

    async fn get_model(
        &self,
        request: Request<v1::GetModelRequest>,
    ) -> Result<Response<v1::ModelInfo>, Status> {
        let name = request.into_inner().name;
        if name.is_empty() {
            return Err(Status::invalid_argument("name is required"));
        }
        info::find(self.pipeline.models(), &name)
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("no model named '{name}'")))
    }
}

fn head_result(pipeline: &Pipeline, name: String, output: HeadOutput) -> v1::HeadResult {
    let labels = pipeline
        .models()
        .head(&name)
        .map(|h| h.labels.as_slice())
        .unwrap_or_default();
    let result = match output {
        HeadOutput::Detections(d) => {
            v1::head_result::Result::Detections(convert::detections(d, labels))
        }
        HeadOutput::Segmentation(s) => {
            v1::head_result::Result::Segmentation(convert::segmentation(s, labels))
        }
    };
    v1::HeadResult {
        head: name,
        result: Some(result),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_header_parses() {
        let mut metadata = MetadataMap::new();
        assert_eq!(deadline(&metadata), None);
        metadata.insert("grpc-timeout", "250m".parse().expect("ascii"));
        assert_eq!(deadline(&metadata), Some(Duration::from_millis(250)));
        metadata.insert("grpc-timeout", "2S".parse().expect("ascii"));
        assert_eq!(deadline(&metadata), Some(Duration::from_secs(2)));
        metadata.insert("grpc-timeout", "xS".parse().expect("ascii"));
        assert_eq!(deadline(&metadata), None);
    }
}

//! The `polyhead.v1.Polyhead` service: each RPC validates its request, runs the pipeline in an
//! admission slot under the call's deadline and converts the result. Validation comes before
//! admission, so that a request that can never succeed is INVALID_ARGUMENT at once, even while
//! every slot is busy, rather than RESOURCE_EXHAUSTED (which clients retry).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use polyhead_proto::v1;
use polyhead_proto::v1::polyhead_server::Polyhead;
use tonic::metadata::MetadataMap;
use tonic::{Extensions, Request, Response, Status};

use super::{convert, deadline, info, windows};
use crate::error::Error;
use crate::manifest::HeadKind;
use crate::model_set::Head;
use crate::pipeline::{
    HeadOptions, HeadOutput, HeadTask, ImageInput, ImageRequest, Pipeline, Timings,
};

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

    /// Answers the error of an invalid request, else runs `work` on the valid one in an
    /// admission slot (waiting for one, within the deadline, when all are busy), under the
    /// call's deadline (or the default one), with a request id for logs.
    async fn call<V, T, W, F>(
        &self,
        metadata: &MetadataMap,
        extensions: &Extensions,
        rpc: &str,
        valid: Result<V, Error>,
        work: W,
    ) -> Result<Response<T>, Status>
    where
        W: FnOnce(V) -> F,
        F: Future<Output = Result<T, Error>>,
    {
        let admission = self.pipeline.admission();
        let admitted = async move { admission.run(work(valid?)).await };
        self.answer(metadata, extensions, rpc, admitted).await
    }

    /// Runs `work`, which needs no slot (it reads the loaded model set only), under the call's
    /// deadline, with a request id for logs.
    async fn answer<T, F>(
        &self,
        metadata: &MetadataMap,
        extensions: &Extensions,
        rpc: &str,
        work: F,
    ) -> Result<Response<T>, Status>
    where
        F: Future<Output = Result<T, Error>>,
    {
        let request_id = format!("{:x}", self.next_id.fetch_add(1, Ordering::Relaxed));
        let limits = self.pipeline.limits();
        deadline::run(metadata, extensions, rpc, &request_id, limits, work).await
    }
}

#[tonic::async_trait]
impl Polyhead for PolyheadService {
    type RecognizeActionWindowsStream = windows::WindowStream;

    async fn detect(
        &self,
        request: Request<v1::DetectRequest>,
    ) -> Result<Response<v1::DetectResponse>, Status> {
        let (metadata, extensions, req) = request.into_parts();
        let pipeline = &self.pipeline;
        let valid = (|| {
            let head = convert::head(pipeline.models(), &req.head, HeadKind::Detection)?;
            let options = convert::detect_options(req.options, &head)?;
            Ok((head, options, convert::image(req.image)?))
        })();
        self.call(
            &metadata,
            &extensions,
            "Detect",
            valid,
            |(head, options, image)| async move {
                let (output, timings) = run_one(pipeline, &head, options, image).await?;
                let HeadOutput::Detections(d) = output else {
                    return Err(Error::Internal(
                        "the detection head returned no detections".into(),
                    ));
                };
                Ok(v1::DetectResponse {
                    detections: Some(convert::detections(d, &head.labels)),
                    timings: Some(convert::timings(timings)),
                })
            },
        )
        .await
    }

    async fn segment(
        &self,
        request: Request<v1::SegmentRequest>,
    ) -> Result<Response<v1::SegmentResponse>, Status> {
        let (metadata, extensions, req) = request.into_parts();
        let pipeline = &self.pipeline;
        let valid = (|| {
            let head = convert::head(pipeline.models(), &req.head, HeadKind::Segmentation)?;
            let options = convert::segment_options(req.options, &head)?;
            Ok((head, options, convert::image(req.image)?))
        })();
        self.call(
            &metadata,
            &extensions,
            "Segment",
            valid,
            |(head, options, image)| async move {
                let (output, timings) = run_one(pipeline, &head, options, image).await?;
                let HeadOutput::Segmentation(s) = output else {
                    return Err(Error::Internal(
                        "the segmentation head returned no label map".into(),
                    ));
                };
                Ok(v1::SegmentResponse {
                    segmentation: Some(convert::segmentation(s, &head.labels)),
                    timings: Some(convert::timings(timings)),
                })
            },
        )
        .await
    }

    async fn recognize_action(
        &self,
        request: Request<v1::RecognizeActionRequest>,
    ) -> Result<Response<v1::RecognizeActionResponse>, Status> {
        let (metadata, extensions, req) = request.into_parts();
        let pipeline = &self.pipeline;
        let valid = convert::action_request(pipeline.models(), pipeline.limits(), req);
        self.call(
            &metadata,
            &extensions,
            "RecognizeAction",
            valid,
            |req| async move {
                let head = req.head.clone();
                let (actions, timings) = pipeline.run_action(req).await?;
                Ok(v1::RecognizeActionResponse {
                    actions: Some(convert::actions(actions, &head.labels)),
                    timings: Some(convert::timings(timings)),
                })
            },
        )
        .await
    }

    async fn recognize_action_windows(
        &self,
        request: Request<tonic::Streaming<v1::RecognizeActionWindowsRequest>>,
    ) -> Result<Response<Self::RecognizeActionWindowsStream>, Status> {
        let request_id = format!("{:x}", self.next_id.fetch_add(1, Ordering::Relaxed));
        windows::serve(Arc::clone(&self.pipeline), request, request_id).await
    }

    async fn analyze(
        &self,
        request: Request<v1::AnalyzeRequest>,
    ) -> Result<Response<v1::AnalyzeResponse>, Status> {
        let (metadata, extensions, req) = request.into_parts();
        let pipeline = &self.pipeline;
        let valid = (|| {
            let tasks = convert::analyze_tasks(
                pipeline.models(),
                req.heads,
                req.detect_options,
                req.segment_options,
            )?;
            Ok(ImageRequest {
                image: convert::image(req.image)?,
                tasks,
            })
        })();
        self.call(
            &metadata,
            &extensions,
            "Analyze",
            valid,
            |request| async move {
                let (outputs, timings) = pipeline.run_image(request).await?;
                let results = outputs
                    .into_iter()
                    .map(|(name, output)| head_result(pipeline, name, output))
                    .collect();
                Ok(v1::AnalyzeResponse {
                    results,
                    timings: Some(convert::timings(timings)),
                })
            },
        )
        .await
    }

    async fn list_models(
        &self,
        request: Request<v1::ListModelsRequest>,
    ) -> Result<Response<v1::ListModelsResponse>, Status> {
        let models = self.pipeline.models();
        self.answer(
            request.metadata(),
            request.extensions(),
            "ListModels",
            async move { Ok(info::list(models)) },
        )
        .await
    }

    async fn get_model(
        &self,
        request: Request<v1::GetModelRequest>,
    ) -> Result<Response<v1::ModelInfo>, Status> {
        let (metadata, extensions, req) = request.into_parts();
        let models = self.pipeline.models();
        self.answer(&metadata, &extensions, "GetModel", async move {
            let name = req.name;
            if name.is_empty() {
                return Err(Error::InvalidArgument("name is required".into()));
            }
            info::find(models, &name).ok_or_else(|| info::not_served(models, &name))
        })
        .await
    }

    async fn extract_features(
        &self,
        request: Request<v1::ExtractFeaturesRequest>,
    ) -> Result<Response<v1::ExtractFeaturesResponse>, Status> {
        let (metadata, extensions, req) = request.into_parts();
        let pipeline = &self.pipeline;
        let valid = convert::image(req.image);
        self.call(
            &metadata,
            &extensions,
            "ExtractFeatures",
            valid,
            |image| async move {
                let extracted = pipeline.extract_features(image).await?;
                Ok(convert::extracted_features(extracted))
            },
        )
        .await
    }
}

/// Runs `head` alone on `image`: its output and the request's timings.
async fn run_one(
    pipeline: &Pipeline,
    head: &Arc<Head>,
    options: HeadOptions,
    image: ImageInput,
) -> Result<(HeadOutput, Timings), Error> {
    let tasks = vec![HeadTask {
        head: Arc::clone(head),
        options,
    }];
    let (mut outputs, timings) = pipeline.run_image(ImageRequest { image, tasks }).await?;
    let (_, output) = outputs
        .pop()
        .ok_or_else(|| Error::Internal(format!("head '{}' returned nothing", head.name())))?;
    Ok((output, timings))
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

//! The image path: decode, preprocess, one backbone pass (or the feature cache, or the features
//! a feature handle names), then every requested head.

use std::time::{Duration, Instant};

use image::RgbImage;
use ndarray::Axis;
use tracing::Instrument;

use super::types::{
    Detections, HeadOptions, HeadOutput, HeadTask, HeadTiming, ImageInput, ImageRequest,
    Segmentation, Timings,
};
use super::{FeatureKey, Features, Pipeline, output, stack};
use crate::engine::{NamedTensors, Run};
use crate::error::Error;
use crate::geometry::Geometry;
use crate::heads::{HeadError, detection, segmentation};
use crate::manifest::HeadParams;
use crate::media;
use crate::media::image::Decoded;
use crate::media::image::ImageLimits;
use crate::media::preprocess::PreprocessSpec;
use crate::telemetry::metrics;

/// A decoded, preprocessed image.
struct Prepared {
    chw: Vec<f32>,
    geometry: Geometry,
    /// The feature cache key of the backbone input; `None` with the cache off.
    key: Option<FeatureKey>,
    decode: Duration,
    preprocess: Duration,
}

/// The backbone features of a request's image, its geometry and what getting them cost.
pub(super) struct ImageFeatures {
    pub(super) features: Features,
    pub(super) geometry: Geometry,
    decode: Duration,
    preprocess: Duration,
}

impl ImageFeatures {
    /// The request's timings up to the heads: no backbone pass for cached or kept features.
    pub(super) fn timings(&self) -> Timings {
        let passes = u32::from(!self.features.cached);
        Timings {
            decode: self.decode,
            preprocess: self.preprocess,
            queue: self.features.queued,
            backbone: self.features.elapsed,
            backbone_passes: passes,
            backbone_images: passes,
            features_cached: self.features.cached,
            feature_memory: self.features.memory(),
            ..Timings::default()
        }
    }
}

impl Pipeline {
    /// Runs every head of `request` on its image from ONE backbone pass, or from cached
    /// features of an identical backbone input. Results come back in the order of
    /// `request.tasks`. Records the request's stage latencies.
    pub async fn run_image(
        &self,
        request: ImageRequest,
    ) -> Result<(Vec<(String, HeadOutput)>, Timings), Error> {
        let result = self.image(request).await?;
        metrics::record_request(&result.1);
        Ok(result)
    }

    /// [`Pipeline::run_image`] without recording metrics (for the warm-up).
    pub(super) async fn image(
        &self,
        request: ImageRequest,
    ) -> Result<(Vec<(String, HeadOutput)>, Timings), Error> {
        let started = Instant::now();
        let found = self.features_of(request.image).await?;
        let max_mask_pixels = self.limits.max_mask_pixels;
        let runs = request
            .tasks
            .into_iter()
            .map(|task| run_head(&found.features, task, found.geometry, max_mask_pixels));
        let results = futures_util::future::try_join_all(runs).await?;
        let mut timings = found.timings();
        let mut outputs = Vec::with_capacity(results.len());
        for (name, out, timing) in results {
            timings.postprocess += timing.postprocess;
            timings.heads.push(timing);
            outputs.push((name, out));
        }
        timings.total = started.elapsed();
        Ok((outputs, timings))
    }

    /// The backbone features of `image`: kept under its feature handle, else from the feature
    /// cache or ONE backbone pass after decoding and preprocessing.
    pub(super) async fn features_of(&self, image: ImageInput) -> Result<ImageFeatures, Error> {
        if let ImageInput::Handle(handle) = image {
            let entry = self.handles.get(&handle).await?;
            let features = Features {
                tensors: entry.tensors,
                queued: Duration::ZERO,
                elapsed: Duration::ZERO,
                cached: true,
            };
            return Ok(ImageFeatures {
                features,
                geometry: entry.geometry,
                decode: Duration::ZERO,
                preprocess: Duration::ZERO,
            });
        }
        let prepared = self.prepare(image).await?;
        let geometry = prepared.geometry;
        let batch = stack(
            vec![prepared.chw],
            geometry.input_height as usize,
            geometry.input_width as usize,
        )?;
        let features = self.shared_features(prepared.key, batch).await?;
        Ok(ImageFeatures {
            features,
            geometry,
            decode: prepared.decode,
            preprocess: prepared.preprocess,
        })
    }

    /// Decodes, preprocesses and (with the cache on) hashes, off the async workers.
    async fn prepare(&self, image: ImageInput) -> Result<Prepared, Error> {
        let limits = self.image_limits.clone();
        let spec = self.models.backbone.preprocess;
        let hash = self.cache.is_enabled();
        super::cpu_bound(move || prepare_blocking(image, &limits, &spec, hash)).await?
    }
}

fn prepare_blocking(
    image: ImageInput,
    limits: &ImageLimits,
    spec: &PreprocessSpec,
    hash: bool,
) -> Result<Prepared, Error> {
    let started = Instant::now();
    // Held in the decoding memory until preprocessed.
    let decoded = decode(image, limits)?;
    let decode = started.elapsed();
    let started = Instant::now();
    let (chw, geometry) = preprocess(&decoded.image, spec);
    drop(decoded);
    let key = hash.then(|| cache_key(&chw, &geometry));
    Ok(Prepared {
        chw,
        geometry,
        key,
        decode,
        preprocess: started.elapsed(),
    })
}

/// The cache key of the backbone input `[1, 3, H, W]` that `chw` becomes.
#[tracing::instrument(name = "hash", skip_all)]
fn cache_key(chw: &[f32], geometry: &Geometry) -> FeatureKey {
    let shape = [
        1,
        3,
        geometry.input_height as usize,
        geometry.input_width as usize,
    ];
    FeatureKey::of(&shape, chw)
}

#[tracing::instrument(name = "decode", skip_all)]
fn decode(image: ImageInput, limits: &ImageLimits) -> Result<Decoded, Error> {
    Ok(match image {
        ImageInput::Encoded(bytes) => media::image::decode_holding(&bytes, limits)?,
        // Raw pixels are copied out of the request's message into the image.
        ImageInput::Raw { width, height, rgb } => {
            media::image::check_dimensions(width, height, limits)?;
            let memory = limits
                .memory
                .take(u64::from(width) * u64::from(height) * 3)?;
            Decoded {
                image: media::image::from_raw(width, height, Vec::from(rgb), limits)?,
                memory,
            }
        }
        ImageInput::Handle(_) => {
            return Err(Error::Internal(
                "a feature handle was sent to the decoder".into(),
            ));
        }
    })
}

#[tracing::instrument(
    name = "preprocess",
    skip_all,
    fields(width = rgb.width(), height = rgb.height())
)]
fn preprocess(rgb: &RgbImage, spec: &PreprocessSpec) -> (Vec<f32>, Geometry) {
    media::preprocess::preprocess(rgb, spec)
}

/// Runs one head on the shared features and post-processes its outputs, off the async workers.
/// A detection head's masks may cover at most `max_mask_pixels` (`--max-mask-pixels`).
async fn run_head(
    features: &Features,
    mut task: HeadTask,
    geometry: Geometry,
    max_mask_pixels: u64,
) -> Result<(String, HeadOutput, HeadTiming), Error> {
    if let HeadOptions::Detection(options) = &mut task.options {
        options.max_mask_pixels = max_mask_pixels;
    }
    let inputs = features.select(&task.head.spec.inputs)?;
    let Run {
        outputs,
        queued,
        elapsed,
    } = task.head.run(inputs).await?;
    let name = task.head.name().to_string();
    let span = tracing::info_span!("postprocess", head = %name);
    let started = Instant::now();
    let out = super::cpu_bound(move || postprocess(&task, &outputs, &geometry))
        .instrument(span)
        .await??;
    let timing = HeadTiming {
        head: name.clone(),
        queue: queued,
        inference: elapsed,
        postprocess: started.elapsed(),
    };
    Ok((name, out, timing))
}

fn postprocess(
    task: &HeadTask,
    outputs: &NamedTensors,
    geometry: &Geometry,
) -> Result<HeadOutput, Error> {
    let head = task.head.name();
    // Tests inject a panic here (`postprocess/<head>`), as a bug in post-processing would be.
    #[cfg(feature = "failpoints")]
    fail::fail_point!(&format!("postprocess/{head}"));
    match (&task.head.params, &task.options) {
        (HeadParams::Detection(params), HeadOptions::Detection(options)) => {
            let items = detection::postprocess(
                first(outputs, head, "scores")?,
                first(outputs, head, "boxes")?,
                first(outputs, head, "mask_coeffs")?,
                first(outputs, head, "mask_protos")?,
                geometry,
                params,
                options,
            )
            .map_err(|e| match e {
                HeadError::MaskPixels { .. } => Error::InvalidArgument(e.to_string()),
                e => e.into(),
            })?;
            Ok(HeadOutput::Detections(Detections {
                items,
                image_width: geometry.orig_width,
                image_height: geometry.orig_height,
            }))
        }
        (HeadParams::Segmentation(params), HeadOptions::Segmentation { class_filter }) => {
            let logits = first(outputs, head, "logits")?;
            let map = segmentation::postprocess(logits, geometry, params, class_filter.as_deref())?;
            Ok(HeadOutput::Segmentation(Segmentation {
                png: segmentation::encode_png(&map, task.head.labels.len())?,
                width: map.width,
                height: map.height,
                present: segmentation::coverage(&map),
            }))
        }
        _ => Err(Error::Internal(format!(
            "head '{head}' was given options of another kind"
        ))),
    }
}

/// The first (only) item of a head output's batch, as a `D`-dimensional view.
fn first<'a, D: ndarray::Dimension>(
    outputs: &'a NamedTensors,
    head: &str,
    name: &str,
) -> Result<ndarray::ArrayView<'a, f32, D>, Error> {
    let tensor = output(outputs, head, name)?;
    let shape = tensor.shape().to_vec();
    let shape_error = || {
        Error::Internal(format!(
            "head '{head}' output '{name}' has shape {shape:?}; a batch of one {}-d item was expected",
            D::NDIM.unwrap_or(0)
        ))
    };
    if tensor.ndim() == 0 || tensor.shape()[0] != 1 {
        return Err(shape_error());
    }
    tensor
        .index_axis_move(Axis(0), 0)
        .into_dimensionality::<D>()
        .map_err(|_| shape_error())
}

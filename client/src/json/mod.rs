//! Serde mirrors of the response messages, for machine-readable output.
//!
//! Field names are the proto field names. Unset sub-messages are left out, enums are written by
//! their proto names, and the PNG label map is left out (its size and present classes are kept).

mod clip;
mod image;
mod models;

pub use clip::{ActionScore, Actions, RecognizeActionResponse};
pub use image::{
    AnalyzeResponse, BoundingBox, ClassCoverage, DetectResponse, Detection, Detections, HeadResult,
    RleMask, SegmentResponse, Segmentation,
};
pub use models::{ListModelsResponse, ModelInfo, TensorInfo};

use polyhead_proto::v1;
use serde::Serialize;

/// Mirror of `Timings`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Timings {
    /// Image or clip decoding.
    pub decode_ms: f64,
    /// Resizing and normalisation.
    pub preprocess_ms: f64,
    /// Backbone inference.
    pub backbone_ms: f64,
    /// Per-head times.
    pub heads: Vec<HeadTiming>,
    /// Post-processing.
    pub postprocess_ms: f64,
    /// Whole request.
    pub total_ms: f64,
    /// Backbone runs.
    pub backbone_passes: u32,
    /// Images through the backbone.
    pub backbone_images: u32,
    /// Features from the server's feature cache.
    pub features_cached: bool,
    /// Where the server held the backbone features (`cuda:N`, `cpu`, `host`).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub feature_memory: String,
}

/// Mirror of `HeadTiming`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HeadTiming {
    /// Head name.
    pub head: String,
    /// Head inference.
    pub inference_ms: f64,
    /// Head post-processing.
    pub postprocess_ms: f64,
}

impl From<&v1::Timings> for Timings {
    fn from(t: &v1::Timings) -> Self {
        Self {
            decode_ms: t.decode_ms,
            preprocess_ms: t.preprocess_ms,
            backbone_ms: t.backbone_ms,
            heads: t
                .heads
                .iter()
                .map(|h| HeadTiming {
                    head: h.head.clone(),
                    inference_ms: h.inference_ms,
                    postprocess_ms: h.postprocess_ms,
                })
                .collect(),
            postprocess_ms: t.postprocess_ms,
            total_ms: t.total_ms,
            backbone_passes: t.backbone_passes,
            backbone_images: t.backbone_images,
            features_cached: t.features_cached,
            feature_memory: t.feature_memory.clone(),
        }
    }
}

//! The domain side of a request: validated inputs, per-head options, results and timings. The
//! gRPC layer converts to and from these; nothing here knows about protobuf.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;

use crate::engine::Memory;
use crate::heads::detection::DetectOptions;
use crate::heads::{ClassScore, Detection};
use crate::model_set::Head;

/// An image as the caller sent it.
#[derive(Debug, Clone)]
pub enum ImageInput {
    /// Encoded JPEG, PNG or WebP bytes.
    Encoded(Bytes),
    /// Tightly packed RGB8 pixels.
    Raw { width: u32, height: u32, rgb: Bytes },
    /// A feature handle from [`crate::pipeline::Pipeline::extract_features`]: the image's
    /// features are kept server-side.
    Handle(String),
}

/// A clip as the caller sent it.
#[derive(Debug, Clone)]
pub enum ClipInput {
    /// An encoded video file.
    Video(Bytes),
    /// Encoded images in temporal order, at `fps` frames per second.
    Frames { frames: Vec<Bytes>, fps: f64 },
}

/// One head to run on an image, with its options.
#[derive(Clone)]
pub struct HeadTask {
    pub head: Arc<Head>,
    pub options: HeadOptions,
}

/// Per-kind request options.
#[derive(Debug, Clone)]
pub enum HeadOptions {
    Detection(DetectOptions),
    Segmentation { class_filter: Option<Vec<u32>> },
}

/// A validated image request: one image, one or more heads.
#[derive(Clone)]
pub struct ImageRequest {
    pub image: ImageInput,
    pub tasks: Vec<HeadTask>,
}

/// A validated action-recognition request.
#[derive(Clone)]
pub struct ActionRequest {
    pub clip: ClipInput,
    pub head: Arc<Head>,
    pub num_frames: usize,
    /// `Some(s)`: every s-th frame from the start; `None`: spread uniformly over the clip.
    pub frame_stride: Option<usize>,
    pub top_k: usize,
}

/// The detections on one image.
#[derive(Debug, Clone)]
pub struct Detections {
    pub items: Vec<Detection>,
    pub image_width: u32,
    pub image_height: u32,
}

/// A semantic label map, encoded as PNG, and the classes it holds.
#[derive(Debug, Clone)]
pub struct Segmentation {
    pub png: Vec<u8>,
    pub width: u32,
    pub height: u32,
    pub present: Vec<ClassScore>,
}

/// The result of one head on an image.
#[derive(Debug, Clone)]
pub enum HeadOutput {
    Detections(Detections),
    Segmentation(Segmentation),
}

/// An image's backbone features kept under a handle.
#[derive(Debug, Clone)]
pub struct ExtractedFeatures {
    pub handle: String,
    pub expires_at: SystemTime,
    /// Size of the original image.
    pub image_width: u32,
    pub image_height: u32,
    pub timings: Timings,
}

/// The top actions of a clip and the frames they were computed from.
#[derive(Debug, Clone)]
pub struct Actions {
    pub top: Vec<ClassScore>,
    pub frame_timestamps: Vec<f64>,
}

/// Time spent in one head.
#[derive(Debug, Clone, Default)]
pub struct HeadTiming {
    pub head: String,
    /// Wait in the head's queue before its run started.
    pub queue: Duration,
    pub inference: Duration,
    pub postprocess: Duration,
}

/// Where a request's time went and how much backbone work it caused.
#[derive(Debug, Clone, Default)]
pub struct Timings {
    pub decode: Duration,
    pub preprocess: Duration,
    /// Wait in the backbone's queue before its run started; with features from the cache, the
    /// wait for the cache (for a run another request made, when one was under way).
    pub queue: Duration,
    /// The backbone run; zero with features from the cache.
    pub backbone: Duration,
    pub heads: Vec<HeadTiming>,
    pub postprocess: Duration,
    pub total: Duration,
    /// Backbone runs this request caused: 0 when its features came from the cache.
    pub backbone_passes: u32,
    pub backbone_images: u32,
    /// The backbone features came from the feature cache (or from a run of another request
    /// for the same input), not from a run of this request.
    pub features_cached: bool,
    /// Where the backbone features were held; `None` when none were used.
    pub feature_memory: Option<Memory>,
}

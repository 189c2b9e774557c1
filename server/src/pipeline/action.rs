//! The clip path: decode and sample frames, run them through the backbone as a batch (in runs of
//! at most `--max-batch` frames, one after another), then the action head over the per-frame
//! features, softmax and top-k.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use image::RgbImage;
use tracing::Span;

use super::types::{ActionRequest, Actions, ClipInput, HeadTiming, Timings};
use super::{Pipeline, output, stack};
use crate::engine::{Memory, NamedTensors, Stage};
use crate::error::Error;
use crate::heads::{ClassScore, action};
use crate::manifest::HeadParams;
use crate::media;
use crate::media::Cancel;
use crate::media::image::ImageLimits;
use crate::media::preprocess::PreprocessSpec;
use crate::media::video::{Sampling, VideoLimits};
use crate::model_set::Head;
use crate::telemetry::metrics;

/// A clip's features for its action head, and what the backbone runs took.
#[derive(Default)]
struct ClipFeatures {
    inputs: NamedTensors,
    queued: Duration,
    elapsed: Duration,
    passes: u32,
    memory: Option<Memory>,
}

/// Sampled frames, preprocessed: each frame's `[3, H, W]` input.
struct PreparedClip {
    frames: FrameInputs,
    timestamps: Vec<f64>,
    decode: Duration,
    preprocess: Duration,
}

impl Pipeline {
    /// Recognises the action in a clip. Records the request's stage latencies.
    pub async fn run_action(&self, request: ActionRequest) -> Result<(Actions, Timings), Error> {
        let result = self.action(request).await?;
        metrics::record_request(&result.1);
        Ok(result)
    }

    /// [`Pipeline::run_action`] without recording metrics (for the warm-up).
    async fn action(&self, request: ActionRequest) -> Result<(Actions, Timings), Error> {
        let started = Instant::now();
        let sampling = Sampling {
            num_frames: request.num_frames,
            stride: request.frame_stride,
        };
        let clip = self.prepare_clip(request.clip, sampling).await?;
        let frames = clip.timestamps.len() as u32;
        let head = &request.head;
        check_clip(
            head,
            clip.timestamps.len(),
            "send at least that many frames, or a smaller frame_stride",
        )?;
        let features = self.clip_features(clip.frames, head).await?;
        let run = head.worker.run_as(Stage::Head, features.inputs).await?;
        let post_started = Instant::now();
        let top = postprocess(head.name(), &run.outputs, request.top_k)?;
        let postprocess = post_started.elapsed();
        let timings = Timings {
            decode: clip.decode,
            preprocess: clip.preprocess,
            queue: features.queued,
            backbone: features.elapsed,
            heads: vec![HeadTiming {
                head: head.name().to_string(),
                queue: run.queued,
                inference: run.elapsed,
                postprocess,
            }],
            postprocess,
            total: started.elapsed(),
            backbone_passes: features.passes,
            backbone_images: frames,
            features_cached: false,
            feature_memory: features.memory,
        };
        let actions = Actions {
            top,
            frame_timestamps: clip.timestamps,
        };
        Ok((actions, timings))
    }

    /// Runs the clip's frames through the backbone in runs of at most `--max-batch` frames, one
    /// after another, each run stacked from the frames' own inputs, and stacks the outputs `head`
    /// reads in frame order, as one run over all T frames gives them.
    async fn clip_features(&self, frames: FrameInputs, head: &Head) -> Result<ClipFeatures, Error> {
        let most = self.models.backbone.max_batch().max(1);
        let FrameInputs { chw, height, width } = frames;
        let mut clip = ClipFeatures::default();
        let mut inputs = chw.into_iter().peekable();
        let mut parts = Vec::new();
        while inputs.peek().is_some() {
            let batch = stack(inputs.by_ref().take(most).collect(), height, width)?;
            let run = self.run_backbone(batch).await?;
            parts.push(run.select(&head.spec.inputs)?);
            clip.queued += run.queued;
            clip.elapsed += run.elapsed;
            clip.passes += 1;
            clip.memory = run.memory();
        }
        clip.inputs = if parts.len() == 1 {
            parts.pop().unwrap_or_default()
        } else {
            self.models
                .memory
                .concat_named(parts)
                .map_err(|e| Error::Internal(format!("stacking a clip's features: {e}")))?
        };
        Ok(clip)
    }

    /// Runs a short synthetic clip through `head`: 2 frames, or the model's fixed clip length.
    pub(super) async fn warm_up_action(&self, head: Arc<Head>) -> Result<(), Error> {
        let frame = image::RgbImage::from_pixel(32, 24, image::Rgb([100, 120, 140]));
        let mut png = std::io::Cursor::new(Vec::new());
        frame
            .write_to(&mut png, image::ImageFormat::Png)
            .map_err(|e| Error::Internal(format!("warm-up frame: {e}")))?;
        let num_frames = match &head.params {
            HeadParams::Action(params) => params.fixed_frames.map_or(2, |n| n as usize),
            _ => 2,
        };
        let frames = vec![Bytes::from(png.into_inner()); num_frames];
        let request = ActionRequest {
            clip: ClipInput::Frames { frames, fps: 1.0 },
            head,
            num_frames,
            frame_stride: None,
            top_k: 1,
        };
        self.action(request).await.map(|_| ())
    }

    /// Decodes, samples and preprocesses a clip on a blocking thread, in the current span. The
    /// decode stops early once this future is dropped (the call was cancelled or timed out).
    async fn prepare_clip(
        &self,
        clip: ClipInput,
        sampling: Sampling,
    ) -> Result<PreparedClip, Error> {
        let image_limits = self.image_limits.clone();
        let video_limits = self.video_limits.clone();
        let spec = self.models.backbone.preprocess;
        let span = Span::current();
        let cancel = Cancel::default();
        let _cancel_on_drop = cancel.on_drop();
        tokio::task::spawn_blocking(move || {
            span.in_scope(|| match clip {
                ClipInput::Video(bytes) => {
                    prepare_video(&bytes, &video_limits, &sampling, &spec, &cancel)
                }
                ClipInput::Frames { frames, fps } => {
                    prepare_frames(&frames, fps, &image_limits, &sampling, &spec, &cancel)
                }
            })
        })
        .await?
    }
}

/// Refuses `frames` sampled frames that `head`'s model cannot take (see
/// [`action::ActionParams::check_clip`]), with `hint` on what the caller can change.
pub(super) fn check_clip(head: &Head, frames: usize, hint: &str) -> Result<(), Error> {
    match &head.params {
        HeadParams::Action(params) => params
            .check_clip(frames)
            .map_err(|e| Error::InvalidArgument(format!("head '{}': {e}: {hint}", head.name()))),
        _ => Ok(()),
    }
}

/// Softmax and top-k over the head's logits.
#[tracing::instrument(skip_all, fields(head = %head))]
pub(super) fn postprocess(
    head: &str,
    outputs: &NamedTensors,
    top_k: usize,
) -> Result<Vec<ClassScore>, Error> {
    let logits = output(outputs, head, "logits")?
        .into_dimensionality::<ndarray::Ix2>()
        .map_err(|e| Error::Internal(format!("head '{head}' logits: {e}")))?;
    Ok(action::postprocess(logits, top_k)?)
}

/// Decodes the frames of a video clip that sampling picks, then preprocesses them.
fn prepare_video(
    bytes: &Bytes,
    limits: &VideoLimits,
    sampling: &Sampling,
    spec: &PreprocessSpec,
    cancel: &Cancel,
) -> Result<PreparedClip, Error> {
    let started = Instant::now();
    let clip = decode_video(bytes, limits, sampling, cancel)?;
    let decode = started.elapsed();
    let started = Instant::now();
    let mut frames = FrameInputs::default();
    tracing::info_span!("preprocess", frames = clip.frames.len()).in_scope(|| {
        clip.frames
            .iter()
            .try_for_each(|frame| frames.push(frame, spec))
    })?;
    Ok(PreparedClip {
        frames: frames.finish()?,
        timestamps: clip.timestamps_s,
        decode,
        preprocess: started.elapsed(),
    })
}

#[tracing::instrument(name = "decode", skip_all)]
fn decode_video(
    bytes: &Bytes,
    limits: &VideoLimits,
    sampling: &Sampling,
    cancel: &Cancel,
) -> Result<media::video::DecodedClip, Error> {
    Ok(media::video::decode_clip(bytes, limits, sampling, cancel)?)
}

/// Decodes and preprocesses the sampled subset of a list of encoded frames, one frame at a
/// time: only the frame being preprocessed is held as RGB, so a list of large frames takes the
/// memory of one. One span covers both; the timings keep them apart.
#[tracing::instrument(name = "decode", skip_all, fields(frames = frames.len()))]
fn prepare_frames(
    frames: &[Bytes],
    fps: f64,
    limits: &ImageLimits,
    sampling: &Sampling,
    spec: &PreprocessSpec,
    cancel: &Cancel,
) -> Result<PreparedClip, Error> {
    // The frames of a list were chosen by the caller: all are used unless there are more than
    // asked for, in which case they are sampled like a video's.
    let picked: Vec<usize> = if sampling.stride.is_none() && frames.len() <= sampling.num_frames {
        (0..frames.len()).collect()
    } else {
        sampling.plan(frames.len())
    };
    let mut inputs = FrameInputs::default();
    let (mut decode, mut preprocess) = (Duration::ZERO, Duration::ZERO);
    for &i in &picked {
        cancel.check()?;
        let started = Instant::now();
        let decoded = media::image::decode_holding(&frames[i], limits).map_err(|e| {
            if e.is_full() {
                Error::Media(e)
            } else {
                Error::InvalidArgument(format!("frame {i}: {e}"))
            }
        })?;
        decode += started.elapsed();
        let started = Instant::now();
        inputs.push(&decoded.image, spec)?;
        preprocess += started.elapsed();
    }
    Ok(PreparedClip {
        frames: inputs.finish()?,
        timestamps: picked.iter().map(|&i| i as f64 / fps).collect(),
        decode,
        preprocess,
    })
}

/// The preprocessed frames of a clip, all of one input size.
#[derive(Default)]
struct FrameInputs {
    chw: Vec<Vec<f32>>,
    height: usize,
    width: usize,
}

impl FrameInputs {
    /// Preprocesses `frame` into its `[3, H, W]` input. Frames of different sizes are each
    /// fitted to the backbone input, which is fixed for a model set with a fixed input size.
    fn push(&mut self, frame: &RgbImage, spec: &PreprocessSpec) -> Result<(), Error> {
        let (data, geometry) = media::preprocess::preprocess(frame, spec);
        let size = (
            geometry.input_height as usize,
            geometry.input_width as usize,
        );
        if self.chw.is_empty() {
            (self.height, self.width) = size;
        } else if (self.height, self.width) != size {
            return Err(Error::InvalidArgument(
                "clip frames have different sizes, which this backbone's keep-aspect input cannot batch".into(),
            ));
        }
        self.chw.push(data);
        Ok(())
    }

    /// The frames, or an error for a clip without any.
    fn finish(self) -> Result<Self, Error> {
        if self.chw.is_empty() {
            return Err(Error::InvalidArgument("the clip has no frames".into()));
        }
        Ok(self)
    }
}

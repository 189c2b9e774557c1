//! The shared-backbone request path: decode and preprocess off the async workers, ONE backbone
//! run per image (a clip's frames in runs of at most `--max-batch`), then every requested head on those features,
//! concurrently, each followed by its pure post-processing. An image whose preprocessed tensor
//! was seen recently takes its features from the feature cache instead of the backbone.
//!
//! Each stage is a tracing span of the request's span (work on blocking and session threads
//! included), and every finished request records its stage latencies as metrics.

mod action;
pub mod cache;
pub mod handles;
mod image;
pub mod types;
mod windows;

use std::sync::Arc;
use std::time::{Duration, Instant};

use ndarray::{ArrayD, ArrayViewD, IxDyn};

use crate::admission::{Admission, AdmissionConfig};
use crate::config::Limits;
use crate::engine::{EngineError, Memory, NamedTensors};
use crate::error::Error;
use crate::media::image::ImageLimits;
use crate::media::memory::DecodingMemory;
use crate::media::video::VideoLimits;
use crate::model_set::{Head, ModelSet};
use crate::telemetry::metrics;

pub use cache::{CacheConfig, FeatureCache, FeatureKey};
pub use handles::{HandleConfig, HandleStore};
pub use types::*;
pub use windows::{
    ActionWindow, MAX_DECODED_FPS, WindowEvent, WindowPlan, WindowProgress, WindowRequest,
};

/// How often an idle server removes expired cached features and feature handles.
pub const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(10);

/// The loaded model set, the limits requests are held to, the feature cache, the feature
/// handles and the admission control in front of them all.
pub struct Pipeline {
    // Fields drop in this order: the features the cache and the handles hold go back to their
    // sessions' allocators before the sessions go.
    cache: FeatureCache,
    handles: HandleStore,
    models: ModelSet,
    image_limits: ImageLimits,
    video_limits: VideoLimits,
    limits: Limits,
    admission: Arc<Admission>,
}

/// Backbone features of one batch of inputs, and what getting them cost.
struct Features {
    tensors: NamedTensors,
    /// The wait for the backbone queue, or for the cache.
    queued: Duration,
    /// The backbone run; zero for cached features.
    elapsed: Duration,
    /// Whether the features came from the cache rather than from a run of this request.
    cached: bool,
}

impl Pipeline {
    /// Wraps a loaded model set, with a feature cache as `cache` describes.
    pub fn new(models: ModelSet, limits: Limits, cache: &CacheConfig) -> Self {
        let memory = DecodingMemory::new(limits.max_decoding_bytes);
        let image_limits = ImageLimits {
            max_width: limits.max_image_side,
            max_height: limits.max_image_side,
            max_pixels: limits.max_image_pixels,
            max_decode_bytes: limits.max_image_decode_bytes,
            memory: memory.clone(),
        };
        let video_limits = VideoLimits {
            max_bytes: limits.max_message_bytes as u64,
            max_duration_s: limits.max_clip_seconds,
            max_width: limits.max_clip_side,
            max_height: limits.max_clip_side,
            max_decoded_frames: limits.max_decoded_frames,
            max_output_bytes: limits.max_clip_frame_bytes,
            max_decoder_bytes: limits.max_clip_decoder_bytes,
            max_decode_seconds: limits.max_clip_decode_seconds,
            memory,
            ..VideoLimits::default()
        };
        metrics::record_model_info(&models);
        let cache = FeatureCache::new(cache, models.memory.memory());
        Self {
            models,
            image_limits,
            video_limits,
            limits,
            cache,
            handles: HandleStore::new(&HandleConfig::default()),
            admission: Admission::new(&AdmissionConfig::default()),
        }
    }

    /// The memory all decoding may hold at once (`--max-decoding-bytes`), and what it holds.
    pub fn decoding_memory(&self) -> &DecodingMemory {
        &self.image_limits.memory
    }

    /// Keeps feature handles as `config` describes (default: [`HandleConfig::default`]).
    pub fn with_handles(mut self, config: &HandleConfig) -> Self {
        self.handles = HandleStore::new(config);
        self
    }

    /// Admits requests as `config` describes (default: [`AdmissionConfig::default`]).
    pub fn with_admission(mut self, config: &AdmissionConfig) -> Self {
        self.admission = Admission::new(config);
        self
    }

    /// The request slots and the queue in front of them.
    pub fn admission(&self) -> &Arc<Admission> {
        &self.admission
    }

    /// Every [`HOUSEKEEPING_INTERVAL`] until `pipeline` is dropped, removes the feature cache's
    /// and the feature handles' expired entries, so that an idle server gives their memory back
    /// at most one interval after they expire, and the cache's gauges follow.
    pub fn keep_tidy(pipeline: &Arc<Self>) {
        let pipeline = Arc::downgrade(pipeline);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(HOUSEKEEPING_INTERVAL);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                let Some(pipeline) = pipeline.upgrade() else {
                    return;
                };
                pipeline.cache.housekeep().await;
                pipeline.handles.housekeep().await;
            }
        });
    }

    /// The loaded models.
    pub fn models(&self) -> &ModelSet {
        &self.models
    }

    /// The request limits.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Backbone runs made, warm-up and ModelInfer included; a batch that several concurrent
    /// requests share is one run.
    pub fn backbone_runs(&self) -> u64 {
        self.models.backbone.runs()
    }

    /// Images and clip frames that went through the backbone, over all runs.
    pub fn backbone_images(&self) -> u64 {
        self.models.backbone.images()
    }

    /// Runs a blank image through the backbone and every head so that the first real request
    /// does not pay for ONNX Runtime's lazy initialisation; also proves the set runs end to end.
    pub async fn warm_up(&self) -> Result<Duration, Error> {
        let started = Instant::now();
        let image = ImageInput::Raw {
            width: 64,
            height: 48,
            rgb: vec![128; 64 * 48 * 3].into(),
        };
        let image_heads = self
            .models
            .heads
            .iter()
            .filter(|h| h.kind() != crate::manifest::HeadKind::Action);
        let tasks = image_heads
            .map(|head| default_task(head.clone()))
            .collect::<Vec<_>>();
        self.image(ImageRequest { image, tasks }).await?;
        for head in self
            .models
            .heads
            .iter()
            .filter(|h| h.kind() == crate::manifest::HeadKind::Action)
        {
            self.warm_up_action(head.clone()).await?;
        }
        Ok(started.elapsed())
    }

    /// Runs the backbone on a batch `[N, 3, H, W]`.
    async fn run_backbone(&self, batch: ArrayD<f32>) -> Result<Features, EngineError> {
        let run = self.models.backbone.run(batch).await?;
        Ok(Features {
            tensors: run.outputs,
            queued: run.queued,
            elapsed: run.elapsed,
            cached: false,
        })
    }

    /// The features of the batch `key` identifies: from the cache, else from ONE backbone run
    /// that every concurrent request for the same key shares. Without a key (cache off), a run
    /// of its own.
    async fn shared_features(
        &self,
        key: Option<FeatureKey>,
        batch: ArrayD<f32>,
    ) -> Result<Features, EngineError> {
        let Some(key) = key else {
            return self.run_backbone(batch).await;
        };
        let started = Instant::now();
        let mut own_run = None;
        let compute = async {
            // Other requests for the same image may wait for this run, each with a deadline of
            // its own.
            let features = crate::engine::for_several_calls(self.run_backbone(batch)).await?;
            let tensors = features.tensors.clone();
            own_run = Some(features);
            Ok(tensors)
        };
        let (tensors, _) = self.cache.get_or_compute(key, compute).await?;
        Ok(own_run.unwrap_or_else(|| Features {
            tensors,
            queued: started.elapsed(),
            elapsed: Duration::ZERO,
            cached: true,
        }))
    }
}

/// Runs CPU-bound `work` where it does not stall the async workers, in the caller's span.
///
/// On a multi-threaded runtime that is the calling worker thread itself, which hands its other
/// tasks to another thread meanwhile (`block_in_place`): the request goes on at once, without
/// waiting for a blocking-pool thread to wake up and then for its own task to be woken. That is
/// two thread wake-ups fewer per call, for decoding and for every head's post-processing.
/// Futures joined with the caller's wait while `work` runs, so heads' post-processing runs one
/// after the other. On a current-thread runtime (where `block_in_place` is not allowed) the work
/// goes to the blocking pool. A panic in `work` is an internal error either way.
async fn cpu_bound<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Error> {
    use tokio::runtime::{Handle, RuntimeFlavor};
    let span = tracing::Span::current();
    let work = move || span.in_scope(work);
    if Handle::current().runtime_flavor() != RuntimeFlavor::MultiThread {
        return Ok(tokio::task::spawn_blocking(work).await?);
    }
    tokio::task::block_in_place(|| std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)))
        .map_err(|_| Error::panicked())
}

/// The task that runs `head` with the model set's default options.
fn default_task(head: Arc<Head>) -> HeadTask {
    let options = match &head.params {
        crate::manifest::HeadParams::Detection(p) => {
            HeadOptions::Detection(crate::heads::detection::DetectOptions::defaults(p))
        }
        _ => HeadOptions::Segmentation { class_filter: None },
    };
    HeadTask { head, options }
}

impl Features {
    /// Where the features are held.
    fn memory(&self) -> Option<Memory> {
        self.tensors.first().map(|(_, t)| t.memory())
    }

    /// The tensors a head consumes, by name.
    fn select(&self, names: &[String]) -> Result<NamedTensors, Error> {
        names
            .iter()
            .map(|name| {
                self.tensors
                    .iter()
                    .find(|(n, _)| n == name)
                    .cloned()
                    .ok_or_else(|| Error::Internal(format!("the backbone returned no '{name}'")))
            })
            .collect()
    }
}

/// The output called `name` of a head's run (a host array).
fn output<'a>(
    outputs: &'a NamedTensors,
    head: &str,
    name: &str,
) -> Result<ArrayViewD<'a, f32>, Error> {
    outputs
        .iter()
        .find(|(n, _)| n == name)
        .ok_or_else(|| Error::Internal(format!("head '{head}' returned no '{name}'")))?
        .1
        .array()
        .map_err(|e| Error::Internal(format!("head '{head}' output '{name}': {e}")))
}

/// Stacks CHW images of equal size into one `[N, 3, H, W]` batch.
fn stack(mut chw: Vec<Vec<f32>>, height: usize, width: usize) -> Result<ArrayD<f32>, Error> {
    let n = chw.len();
    // One image is its own batch: no copy.
    let data = if n == 1 {
        chw.swap_remove(0)
    } else {
        chw.concat()
    };
    ArrayD::from_shape_vec(IxDyn(&[n, 3, height, width]), data)
        .map_err(|e| Error::Internal(format!("batch shape: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The work's result, or an internal error for its panic, with no thread hand-off on a
    /// multi-threaded runtime: the work runs on the calling thread.
    async fn check_cpu_bound(same_thread: bool) {
        let caller = std::thread::current().id();
        let ran_on = cpu_bound(|| std::thread::current().id())
            .await
            .expect("the work returns");
        assert_eq!(ran_on == caller, same_thread);
        let panicked = cpu_bound(|| -> u32 { panic!("injected") }).await;
        assert!(
            matches!(&panicked, Err(Error::Internal(m)) if m.contains("panicked")),
            "{panicked:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cpu_bound_work_runs_on_the_calling_worker_of_a_multi_threaded_runtime() {
        check_cpu_bound(true).await;
    }

    #[tokio::test]
    async fn cpu_bound_work_goes_to_the_blocking_pool_of_a_current_thread_runtime() {
        check_cpu_bound(false).await;
    }
}

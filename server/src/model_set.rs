//! A loaded model set: the manifest checked against what each ONNX file declares, one session
//! worker per model, and the labels and parameters each head needs.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ndarray::ArrayD;
use ort::session::Session;

use crate::config::Config;
use crate::engine::{
    BatchConfig, BatchQueue, Batcher, Device, EngineError, FeatureMemory, NamedTensors,
    OutputMemory, Placement, Run, Runtime, SessionWorker, Stage, Tensor, TensorInfo, declared,
    device_memory,
};
use crate::manifest::{
    BackboneSpec, HeadKind, HeadParams, HeadSpec, Manifest, ManifestError, ResizeKind, read_labels,
};
use crate::media::preprocess::{PreprocessSpec, ResizePolicy};

/// Why a model set could not be loaded. Every message names the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// The backbone, ready to run.
pub struct Backbone {
    pub spec: BackboneSpec,
    pub preprocess: PreprocessSpec,
    pub worker: SessionWorker,
    batcher: Batcher,
    /// Most images one run takes: `--max-batch`, or 1 for a model whose batch axis is fixed.
    max_batch: usize,
}

impl Backbone {
    /// Runs the backbone on a batch `[N, 3, H, W]` as the backbone stage of the current request
    /// (its spans are `queue` and `backbone`) through the batcher, which counts the pass: a
    /// single image may share its pass with concurrent requests. The outputs hold this
    /// request's items only.
    pub async fn run(&self, batch: ArrayD<f32>) -> Result<Run, EngineError> {
        let inputs = vec![(self.spec.input.clone(), Tensor::from(batch))];
        self.batcher.run(inputs).await
    }

    /// Backbone runs made so far; a batch of several requests is one run.
    pub fn runs(&self) -> u64 {
        self.batcher.runs()
    }

    /// Images (and clip frames) that went through the backbone so far.
    pub fn images(&self) -> u64 {
        self.batcher.images()
    }

    /// Most images one run should take (`--max-batch`, at least 1; 1 for a model whose batch
    /// axis is fixed): callers with more split them into several runs.
    pub fn max_batch(&self) -> usize {
        self.max_batch
    }
}

/// A head, ready to run.
pub struct Head {
    pub spec: HeadSpec,
    pub params: HeadParams,
    pub labels: Vec<String>,
    pub worker: SessionWorker,
    /// Batches the runs of concurrent requests; `None` for heads whose axis 0 is not a batch
    /// (an action head's is time: one clip's frames).
    batcher: Option<Batcher>,
    /// Most images one run takes: `--max-batch`, or 1 for a model whose batch axis is fixed.
    /// An action head's runs take one clip.
    max_batch: usize,
}

impl Head {
    /// Runs the head on one request's features as the head stage of the current request: an
    /// image's run may share a batch with concurrent requests' (for the same head). The outputs
    /// hold this request's items only.
    pub async fn run(&self, inputs: NamedTensors) -> Result<Run, EngineError> {
        match &self.batcher {
            Some(batcher) => batcher.run(inputs).await,
            None => self.worker.run_as(Stage::Head, inputs).await,
        }
    }

    /// Runs made so far; a batch of several requests is one run.
    pub fn runs(&self) -> Option<u64> {
        self.batcher.as_ref().map(Batcher::runs)
    }

    /// The head's name.
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// The head's kind.
    pub fn kind(&self) -> HeadKind {
        self.spec.kind
    }

    /// Most images one run takes (1 for an action head, whose runs take one clip).
    pub fn max_batch(&self) -> usize {
        self.max_batch
    }
}

/// Everything one process serves.
pub struct ModelSet {
    pub name: String,
    pub version: String,
    pub dir: PathBuf,
    pub device: Device,
    pub backbone: Backbone,
    pub heads: Vec<Arc<Head>>,
    /// Where the backbone's features are kept, and the copies between tensors there.
    pub memory: Arc<FeatureMemory>,
}

impl ModelSet {
    /// Loads and validates the model set named by `config`, refusing with a message that names
    /// the file and the mismatch.
    pub fn load(config: &Config) -> Result<Self, LoadError> {
        let dir = config.models.as_path();
        let manifest = Manifest::load(dir)?;
        let runtime = Runtime::init(&config.runtime)?;
        let (backbone, memory) = load_backbone(&runtime, dir, &manifest.backbone, config)?;
        let heads = manifest
            .heads
            .iter()
            .map(|spec| {
                load_head(&runtime, dir, spec, &manifest.backbone, config, &memory).map(Arc::new)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            name: manifest.set_name(dir),
            version: manifest.version.clone(),
            dir: dir.to_path_buf(),
            device: runtime.device(),
            backbone,
            heads,
            memory,
        })
    }

    /// The head called `name`.
    pub fn head(&self, name: &str) -> Option<&Arc<Head>> {
        self.heads.iter().find(|h| h.name() == name)
    }
}

/// Loads the backbone with its outputs bound where `--feature-placement` keeps features.
fn load_backbone(
    runtime: &Runtime,
    dir: &Path,
    spec: &BackboneSpec,
    config: &Config,
) -> Result<(Backbone, Arc<FeatureMemory>), LoadError> {
    let path = dir.join(&spec.file);
    let capacity = config.runtime.queue_capacity;
    let session = runtime.load(&path)?;
    let load_err = |message: String| EngineError::Load {
        file: path.display().to_string(),
        message,
    };
    let (memory, outputs) = match (config.runtime.feature_placement, runtime.device()) {
        (Placement::Host, Device::Cpu) => (FeatureMemory::host(), OutputMemory::Host),
        (Placement::Host, device @ Device::Cuda(_)) => {
            // Bound to the device, then copied to the host: the copy is counted.
            let info = device_memory(device).map_err(load_err)?;
            let outputs = OutputMemory::Bound {
                info,
                to_host: true,
            };
            (FeatureMemory::host(), outputs)
        }
        (Placement::Device, device) => {
            let memory = FeatureMemory::device(&session, device).map_err(load_err)?;
            let info = device_memory(device).map_err(load_err)?;
            let outputs = OutputMemory::Bound {
                info,
                to_host: false,
            };
            (memory, outputs)
        }
    };
    let memory = Arc::new(memory);
    let manifest_err = |m| ManifestError::new(&path, m);
    let max_batch = batch_limit(&session, config).map_err(manifest_err)?;
    let (batcher, batches) = batcher(&spec.name, Stage::Backbone, config, max_batch, &memory);
    let worker = SessionWorker::spawn_batching(&spec.name, session, capacity, outputs, batches)?;
    check_backbone(spec, &worker).map_err(manifest_err)?;
    let backbone = Backbone {
        preprocess: preprocess_spec(spec),
        spec: spec.clone(),
        worker,
        batcher,
        max_batch,
    };
    Ok((backbone, memory))
}

/// A batcher for `model`'s runs as `stage`, of at most `max_batch` images, and the queue its
/// worker thread serves.
fn batcher(
    model: &str,
    stage: Stage,
    config: &Config,
    max_batch: usize,
    memory: &Arc<FeatureMemory>,
) -> (Batcher, BatchQueue) {
    let capacity = config.runtime.queue_capacity;
    let batch = BatchConfig {
        max_batch: u32::try_from(max_batch).unwrap_or(u32::MAX),
        ..config.batch.clone()
    };
    Batcher::new(model, stage, &batch, capacity, Arc::clone(memory))
}

/// Most images one run of the model in `session` takes: `--max-batch` when axis 0 of its
/// inputs and outputs is dynamic, 1 when the ONNX file fixes it to 1. Any other fixed size is
/// refused: a run holds from one image to `--max-batch`.
fn batch_limit(session: &Session, config: &Config) -> Result<usize, String> {
    let configured = config.batch.max_batch.max(1) as usize;
    let mut limit = configured;
    let (inputs, outputs) = declared(session);
    for tensor in inputs.iter().chain(outputs.iter()) {
        match tensor.shape.first() {
            Some(&1) => limit = 1,
            Some(&size) if size > 1 => {
                return Err(format!(
                    "'{}' has {size} on axis 0 (shape {:?}); the batch axis must be dynamic, or \
                     1 for a model that takes one image per run",
                    tensor.name, tensor.shape
                ));
            }
            _ => {}
        }
    }
    Ok(limit)
}

fn load_head(
    runtime: &Runtime,
    dir: &Path,
    spec: &HeadSpec,
    backbone: &BackboneSpec,
    config: &Config,
    memory: &Arc<FeatureMemory>,
) -> Result<Head, LoadError> {
    let path = dir.join(&spec.file);
    let labels = read_labels(&dir.join(&spec.labels))?;
    let capacity = config.runtime.queue_capacity;
    let session = runtime.load(&path)?;
    let manifest_err = |m| ManifestError::new(&path, m);
    let mut params = spec.params().map_err(manifest_err)?;
    let (batcher, worker, max_batch) = match &mut params {
        HeadParams::Action(action) => {
            let time_axis = declared(&session).0.iter().map(axis_0).max();
            action
                .fit_time_axis(time_axis.unwrap_or(-1))
                .map_err(|e| manifest_err(format!("head '{}' params: {e}", spec.name)))?;
            let server_max = config.limits.max_frames;
            if let Some(fixed) = action.fixed_frames.filter(|&f| f > server_max) {
                return Err(manifest_err(format!(
                    "head '{}' takes exactly {fixed} frames, more than --max-frames ({server_max})",
                    spec.name
                ))
                .into());
            }
            let worker = SessionWorker::spawn(&spec.name, session, capacity)?;
            (None, worker, 1)
        }
        _ => {
            let max_batch = batch_limit(&session, config).map_err(manifest_err)?;
            let (batcher, batches) = batcher(&spec.name, Stage::Head, config, max_batch, memory);
            let outputs = OutputMemory::Host;
            let worker =
                SessionWorker::spawn_batching(&spec.name, session, capacity, outputs, batches)?;
            (Some(batcher), worker, max_batch)
        }
    };
    check_head_inputs(spec, backbone, &worker).map_err(manifest_err)?;
    check_head_outputs(spec, labels.len(), &worker).map_err(manifest_err)?;
    Ok(Head {
        spec: spec.clone(),
        params,
        labels,
        worker,
        batcher,
        max_batch,
    })
}

/// Axis 0 of `tensor`: negative when dynamic (or for a scalar).
fn axis_0(tensor: &TensorInfo) -> i64 {
    tensor.shape.first().copied().unwrap_or(-1)
}

/// The preprocessing the backbone's manifest entry describes.
pub fn preprocess_spec(spec: &BackboneSpec) -> PreprocessSpec {
    let [height, width] = spec.input_size.unwrap_or([0, 0]);
    let resize = match spec.resize {
        ResizeKind::Letterbox => ResizePolicy::Letterbox { width, height },
        ResizeKind::Resize => ResizePolicy::Resize { width, height },
        ResizeKind::KeepAspect => ResizePolicy::KeepAspect {
            max_side: spec.max_side.unwrap_or(1024),
            multiple: spec.multiple.unwrap_or(32),
        },
    };
    PreprocessSpec {
        resize,
        mean: spec.mean,
        std: spec.std,
        pad_value: spec.pad_value,
    }
}

fn check_backbone(spec: &BackboneSpec, worker: &SessionWorker) -> Result<(), String> {
    let input = find(worker.inputs(), &spec.input, "input")?;
    expect_dim(input, (4, 1), 3, "the input's channel axis")?;
    if let (Some([h, w]), ResizeKind::Letterbox | ResizeKind::Resize) =
        (spec.input_size, spec.resize)
    {
        expect_dim(
            input,
            (4, 2),
            i64::from(h),
            "the input height (manifest input_size)",
        )?;
        expect_dim(
            input,
            (4, 3),
            i64::from(w),
            "the input width (manifest input_size)",
        )?;
    }
    for feature in &spec.outputs {
        let output = find(worker.outputs(), &feature.name, "output")?;
        expect_dim(
            output,
            (4, 1),
            i64::from(feature.channels),
            "the feature's channels",
        )?;
    }
    Ok(())
}

fn check_head_inputs(
    spec: &HeadSpec,
    backbone: &BackboneSpec,
    worker: &SessionWorker,
) -> Result<(), String> {
    for declared in worker.inputs() {
        if !spec.inputs.contains(&declared.name) {
            return Err(format!(
                "the model takes input '{}', which the manifest's inputs for head '{}' do not list",
                declared.name, spec.name
            ));
        }
    }
    for name in &spec.inputs {
        let input = find(worker.inputs(), name, "input")?;
        let feature = backbone
            .feature(name)
            .ok_or_else(|| format!("no backbone output '{name}'"))?;
        expect_dim(
            input,
            (4, 1),
            i64::from(feature.channels),
            "the backbone feature's channels",
        )?;
    }
    Ok(())
}

fn check_head_outputs(
    spec: &HeadSpec,
    classes: usize,
    worker: &SessionWorker,
) -> Result<(), String> {
    let outputs = worker.outputs();
    let classes = classes as i64;
    let labels = format!("the {classes} labels of {}", spec.labels.display());
    match spec.kind {
        HeadKind::Detection => {
            expect_dim(find(outputs, "scores", "output")?, (3, 2), classes, &labels)?;
            expect_dim(
                find(outputs, "boxes", "output")?,
                (3, 2),
                4,
                "box coordinates",
            )?;
            expect_rank(find(outputs, "mask_coeffs", "output")?, 3)?;
            expect_rank(find(outputs, "mask_protos", "output")?, 4)
        }
        HeadKind::Segmentation => {
            expect_dim(find(outputs, "logits", "output")?, (4, 1), classes, &labels)
        }
        HeadKind::Action => {
            expect_dim(find(outputs, "logits", "output")?, (2, 1), classes, &labels)
        }
    }
}

fn find<'a>(tensors: &'a [TensorInfo], name: &str, what: &str) -> Result<&'a TensorInfo, String> {
    tensors.iter().find(|t| t.name == name).ok_or_else(|| {
        let names: Vec<_> = tensors.iter().map(|t| t.name.as_str()).collect();
        format!(
            "the model has no {what} '{name}' (it has: {})",
            names.join(", ")
        )
    })
}

fn expect_rank(tensor: &TensorInfo, rank: usize) -> Result<(), String> {
    if tensor.shape.len() == rank {
        Ok(())
    } else {
        Err(format!(
            "'{}' has shape {:?}; rank {rank} was expected",
            tensor.name, tensor.shape
        ))
    }
}

/// Checks `tensor` has rank `rank` and axis `axis` equals `want`; a dynamic axis (-1) accepts
/// anything.
fn expect_dim(
    tensor: &TensorInfo,
    (rank, axis): (usize, usize),
    want: i64,
    what: &str,
) -> Result<(), String> {
    expect_rank(tensor, rank)?;
    match tensor.shape[axis] {
        d if d == want || d < 0 => Ok(()),
        d => Err(format!(
            "'{}' has {d} on axis {axis} (shape {:?}) but {what} is {want}",
            tensor.name, tensor.shape
        )),
    }
}

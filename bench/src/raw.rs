//! The in-process variants: ONNX Runtime sessions of the model set driven directly, with the
//! server's own runtime set-up (library search, optimisation level, intra-op threads).
//!
//! Most variants here start from the already preprocessed input tensor: decoding, resizing and
//! post-processing are excluded, so these rows are the ONNX Runtime cost alone. [`PhotoDetect`]
//! starts from the photo's encoded bytes and does every step the server's Detect does, with the
//! server's own functions, in this process: the limit for the server on a photo.

use std::path::{Path, PathBuf};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use ndarray::{ArrayView, Axis, Dimension};
use ort::session::{Session, SessionOutputs};
use ort::value::TensorRef;
use polyhead_server::config::RuntimeConfig;
use polyhead_server::engine::{Device, Placement, Runtime};
use polyhead_server::heads::detection::{self, DetectOptions, DetectionParams};
use polyhead_server::manifest::{HeadParams, Manifest};

use crate::media::{self, Photo};
use crate::rounds::{Part, Variant};
use crate::stats::Samples;

/// One preprocessed input: `shape` is `[N, 3, H, W]`.
#[derive(Debug, Clone)]
pub struct Tensor {
    pub shape: [usize; 4],
    pub data: Vec<f32>,
}

/// Loads sessions of one model set with the server's runtime settings.
pub struct Models {
    runtime: Runtime,
    dir: PathBuf,
    manifest: Manifest,
}

/// Timing of one in-process loop.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub warmup: Duration,
    pub seconds: Duration,
}

impl Models {
    /// Initialises ONNX Runtime as the server does, with `intra_threads` per session.
    pub fn new(dir: &Path, intra_threads: usize) -> Result<Self> {
        let config = RuntimeConfig {
            device: Device::Cpu,
            allow_cpu_fallback: false,
            feature_placement: Placement::Device,
            ort_dylib: None,
            intra_threads,
            intra_op_spinning: false,
            queue_capacity: 1,
            arena_release_seconds: 10,
        };
        let runtime = Runtime::init(&config).map_err(|e| anyhow!("{e}"))?;
        let manifest = Manifest::load(dir).map_err(|e| anyhow!("{e}"))?;
        Ok(Self {
            runtime,
            dir: dir.to_path_buf(),
            manifest,
        })
    }

    fn session(&self, file: &Path) -> Result<Session> {
        self.runtime
            .load(&self.dir.join(file))
            .map_err(|e| anyhow!("{e}"))
    }

    /// The backbone followed by the heads called `heads`, each fed the backbone's outputs.
    pub fn shared(&self, heads: &[&str]) -> Result<Shared> {
        let backbone = &self.manifest.backbone;
        let heads = heads
            .iter()
            .map(|name| {
                let spec = self
                    .manifest
                    .heads
                    .iter()
                    .find(|h| h.name == *name)
                    .with_context(|| format!("no head called {name} in the manifest"))?;
                Ok((self.session(&spec.file)?, spec.inputs.clone()))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Shared {
            backbone: self.session(&backbone.file)?,
            input: backbone.input.clone(),
            heads,
        })
    }

    /// The monolithic reference models (backbone and head fused), one per named file.
    pub fn monolithic(&self, files: &[&str]) -> Result<Vec<Session>> {
        files.iter().map(|f| self.session(Path::new(f))).collect()
    }

    /// Detect on `photo`'s encoded bytes as the server runs it, with the head called `head`.
    pub fn photo_detect<'a>(&self, head: &str, photo: &'a Photo) -> Result<PhotoDetect<'a>> {
        let params = self
            .manifest
            .heads
            .iter()
            .find(|h| h.name == head)
            .with_context(|| format!("no head called {head} in the manifest"))?
            .params()
            .map_err(err)?;
        let HeadParams::Detection(params) = params else {
            return Err(anyhow!("head {head} is not a detection head"));
        };
        Ok(PhotoDetect {
            shared: self.shared(&[head])?,
            photo,
            params,
        })
    }

    /// Name of the backbone's input tensor.
    pub fn input_name(&self) -> &str {
        &self.manifest.backbone.input
    }
}

/// A backbone session and head sessions, run one after the other on one input.
pub struct Shared {
    backbone: Session,
    input: String,
    heads: Vec<(Session, Vec<String>)>,
}

impl Shared {
    /// One backbone pass, then every head on its outputs (outputs discarded). Answers the time
    /// the session runs took.
    pub fn run(&mut self, tensor: &Tensor) -> Result<Duration> {
        self.run_each(tensor, |_| Ok(()))
    }

    /// One backbone pass, then every head on its outputs, each head's outputs given to `each`.
    /// Answers the time the session runs took (`each` not included).
    fn run_each(
        &mut self,
        tensor: &Tensor,
        mut each: impl FnMut(&SessionOutputs<'_>) -> Result<()>,
    ) -> Result<Duration> {
        let started = Instant::now();
        let input = TensorRef::from_array_view((tensor.shape, &tensor.data[..])).map_err(err)?;
        let outputs = self
            .backbone
            .run(vec![(self.input.as_str(), input)])
            .map_err(err)?;
        let mut runs = started.elapsed();
        for (head, names) in &mut self.heads {
            let mut values = Vec::with_capacity(names.len());
            for name in names.iter() {
                let value = outputs
                    .get(name.as_str())
                    .with_context(|| format!("the backbone has no output {name}"))?;
                let view = value.try_extract_array::<f32>().map_err(err)?;
                values.push((
                    name.as_str(),
                    TensorRef::from_array_view(view).map_err(err)?,
                ));
            }
            let started = Instant::now();
            let outputs = head.run(values).map_err(err)?;
            runs += started.elapsed();
            each(&outputs)?;
        }
        Ok(runs)
    }
}

/// Detect from a photo's encoded bytes, every step in this process with the server's functions:
/// decoding, preprocessing, the backbone and detection sessions, and the detection head's
/// post-processing with the options a Detect request without options gets.
pub struct PhotoDetect<'a> {
    shared: Shared,
    photo: &'a Photo,
    params: DetectionParams,
}

impl PhotoDetect<'_> {
    /// One Detect; answers the time its session runs took.
    pub fn run(&mut self) -> Result<Duration> {
        let (_, tensor, geometry) = media::prepare(&self.photo.encoded, &self.photo.spec)?;
        let (params, options) = (&self.params, DetectOptions::defaults(&self.params));
        self.shared.run_each(&tensor, |outputs| {
            detection::postprocess(
                first(outputs, "scores")?,
                first(outputs, "boxes")?,
                first(outputs, "mask_coeffs")?,
                first(outputs, "mask_protos")?,
                &geometry,
                params,
                &options,
            )
            .map(drop)
            .map_err(err)
        })
    }
}

/// The first item of the output called `name`, as a `D`-dimensional view.
fn first<'a, D: Dimension>(
    outputs: &'a SessionOutputs<'_>,
    name: &str,
) -> Result<ArrayView<'a, f32, D>> {
    let value = outputs
        .get(name)
        .with_context(|| format!("the detection head has no output {name}"))?;
    value
        .try_extract_array::<f32>()
        .map_err(err)?
        .index_axis_move(Axis(0), 0)
        .into_dimensionality::<D>()
        .map_err(err)
}

/// Runs every monolithic model on `tensor`, one after the other; answers the time they took.
pub fn run_monolithic(models: &mut [Session], input: &str, tensor: &Tensor) -> Result<Duration> {
    let started = Instant::now();
    for model in models {
        let value = TensorRef::from_array_view((tensor.shape, &tensor.data[..])).map_err(err)?;
        model.run(vec![(input, value)]).map_err(err)?;
    }
    Ok(started.elapsed())
}

fn err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("{e}")
}

/// An in-process variant for [`rounds::measure`]: every slice runs `workers` together, one
/// thread each (each owning its sessions), first for the warm-up, then for the measured time; a
/// single worker runs on the benchmark's own (long-lived) thread. A worker's call is one request
/// and answers the time its session runs took.
pub fn variant<'a, W>(
    name: String,
    kind: &'static str,
    items_per_request: u32,
    mut workers: Vec<W>,
) -> Variant<'a>
where
    W: FnMut() -> Result<Duration> + Send + 'a,
{
    Variant {
        name,
        kind,
        concurrency: workers.len(),
        interleaved: false,
        run: Box::new(move |timing| {
            let samples = tokio::task::block_in_place(|| {
                run_threads(&mut workers, timing, items_per_request)
            });
            Box::pin(std::future::ready(samples.map(|samples| Part {
                samples,
                server_passes: None,
            })))
        }),
    }
}

/// Runs the slice: a lone worker on the calling thread, several on a thread each.
fn run_threads<W>(workers: &mut [W], timing: Timing, items_per_request: u32) -> Result<Samples>
where
    W: FnMut() -> Result<Duration> + Send,
{
    // A thread started for each request (an interleaved variant's slice is one) would pay for
    // its fresh malloc arena: page faults on every buffer, ~1.2 ms per call for a photo's
    // decoding and preprocessing, which a server's long-lived threads do not pay.
    if let [work] = workers {
        let warm_until = Instant::now() + timing.warmup;
        while Instant::now() < warm_until {
            work()?;
        }
        let start = Instant::now();
        let (samples, end) = timed_loop(work, start + timing.seconds, items_per_request)?;
        return Ok(Samples::merge(vec![samples], end.duration_since(start)));
    }
    let barrier = Barrier::new(workers.len());
    let started = std::sync::OnceLock::new();
    let parts = std::thread::scope(|scope| {
        let handles: Vec<_> = workers
            .iter_mut()
            .map(|work| {
                let (barrier, started) = (&barrier, &started);
                scope.spawn(move || {
                    let warm_until = Instant::now() + timing.warmup;
                    while Instant::now() < warm_until {
                        work()?;
                    }
                    barrier.wait();
                    let start = *started.get_or_init(Instant::now);
                    timed_loop(work, start + timing.seconds, items_per_request)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| anyhow!("a benchmark thread panicked"))?
            })
            .collect::<Result<Vec<_>>>()
    })?;
    let start = started.get().copied().unwrap_or_else(Instant::now);
    let end = parts.iter().map(|(_, end)| *end).max().unwrap_or(start);
    let parts = parts.into_iter().map(|(s, _)| s).collect();
    Ok(Samples::merge(parts, end.duration_since(start)))
}

/// Calls `work` until `deadline` (at least once); returns the samples and when the last call ended.
fn timed_loop(
    work: &mut impl FnMut() -> Result<Duration>,
    deadline: Instant,
    items_per_request: u32,
) -> Result<(Samples, Instant)> {
    let mut samples = Samples {
        items_per_request,
        ..Samples::default()
    };
    let mut end = Instant::now();
    while samples.latencies.is_empty() || end < deadline {
        let t = Instant::now();
        let runs = work()?;
        end = Instant::now();
        samples.latencies.push(end - t);
        samples.model_runs.push(runs);
        // Every in-process request runs exactly one backbone pass.
        samples.reported_passes += 1;
    }
    Ok((samples, end))
}

//! A dedicated OS thread that owns one ONNX Runtime session (`Session::run` takes `&mut self`)
//! and serves a bounded queue of jobs, and its batcher's queue when it has one; callers await a
//! oneshot reply. Each job reports how long it waited in the queue and how long it ran, and both
//! show as spans of the caller's trace.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ort::memory::{DeviceType, MemoryInfo};
use ort::session::{RunOptions, Session};
use ort::value::{DynTensorValueType, ValueType};
use tokio::sync::{mpsc, oneshot};
use tracing::Span;

use super::arena::{ArenaGauge, Release};
use super::batcher::{BatchQueue, BatchRunner, Pending};
use super::tensor::{Bindable, DeviceTensor, device_tensor};
use super::{EngineError, NamedTensors, Tensor};
use crate::telemetry::metrics;

/// Where a session's outputs go.
#[derive(Debug, Clone, Default)]
pub enum OutputMemory {
    /// Host arrays (ONNX Runtime copies device outputs to the host).
    #[default]
    Host,
    /// Bound through an IoBinding to `info` (the execution provider's memory) and kept there;
    /// with `to_host`, copied to host arrays after the run, a copy that counts in
    /// `polyhead_feature_device_to_host_bytes_total`.
    Bound {
        info: MemoryInfo<'static>,
        to_host: bool,
    },
}

/// A model input or output as the ONNX file declares it; -1 marks a dynamic dimension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub shape: Vec<i64>,
    pub datatype: String,
}

/// What a run computes for the request it serves, which names its span.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// The backbone of the request path (span `backbone`).
    Backbone,
    /// A head of the request path (span `head`, `head <name>` in traces).
    Head,
    /// Any other run (span `run`).
    Model,
}

/// A finished run: the outputs in declaration order, the time the job waited in the queue and
/// the time the run itself took.
#[derive(Debug, Clone)]
pub struct Run {
    pub outputs: NamedTensors,
    pub queued: Duration,
    pub elapsed: Duration,
}

struct Job {
    inputs: NamedTensors,
    stage: Stage,
    enqueued: Instant,
    /// The caller's span, parent of the run's span on the worker thread.
    parent: Span,
    /// Open while the job waits; closed when its run starts.
    queue_span: Span,
    reply: oneshot::Sender<Result<Run, EngineError>>,
}

/// The handle to a session's worker thread. Cheap to share; the thread stops when the last
/// handle is dropped.
#[derive(Clone)]
pub struct SessionWorker {
    name: Arc<str>,
    queue: mpsc::Sender<Job>,
    capacity: usize,
    inputs: Arc<[TensorInfo]>,
    outputs: Arc<[TensorInfo]>,
}

impl SessionWorker {
    /// Moves `session` onto its own thread, serving at most `capacity` waiting jobs; its outputs
    /// are host arrays.
    pub fn spawn(name: &str, session: Session, capacity: usize) -> Result<Self, EngineError> {
        Self::spawn_with(name, session, capacity, OutputMemory::Host)
    }

    /// [`SessionWorker::spawn`] with its outputs placed as `outputs` says.
    pub fn spawn_with(
        name: &str,
        session: Session,
        capacity: usize,
        outputs: OutputMemory,
    ) -> Result<Self, EngineError> {
        Self::start(name, session, capacity, outputs, None)
    }

    /// [`SessionWorker::spawn_with`], its thread also serving `batches`: the queue of the
    /// [`super::Batcher`] whose batches run on this session.
    pub fn spawn_batching(
        name: &str,
        session: Session,
        capacity: usize,
        outputs: OutputMemory,
        batches: BatchQueue,
    ) -> Result<Self, EngineError> {
        Self::start(name, session, capacity, outputs, Some(batches))
    }

    fn start(
        name: &str,
        session: Session,
        capacity: usize,
        placement: OutputMemory,
        batches: Option<BatchQueue>,
    ) -> Result<Self, EngineError> {
        let (inputs, outputs) = declared(&session);
        let capacity = capacity.max(1);
        let (queue, jobs) = mpsc::channel(capacity);
        let start_error = |what: &str, e: std::io::Error| EngineError::Run {
            model: name.to_string(),
            message: format!("cannot start the worker {what}: {e}"),
        };
        // The thread's own runtime: a batch waits for more requests on its timer.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .map_err(|e| start_error("runtime", e))?;
        let runner = SessionRunner {
            arena: ArenaGauge::new(&session),
            model: name.to_string(),
            session,
            outputs: placement,
            release: Release::default(),
        };
        std::thread::Builder::new()
            .name(format!("ort-{name}"))
            .spawn(move || runtime.block_on(serve(runner, jobs, batches)))
            .map_err(|e| start_error("thread", e))?;
        Ok(Self {
            name: name.into(),
            queue,
            capacity,
            inputs,
            outputs,
        })
    }

    /// The model's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The model's declared inputs.
    pub fn inputs(&self) -> &[TensorInfo] {
        &self.inputs
    }

    /// The model's declared outputs.
    pub fn outputs(&self) -> &[TensorInfo] {
        &self.outputs
    }

    /// Runs the model on `inputs` (fed by name). Fails at once with `Overloaded` when the queue
    /// is full. Returns the outputs in declaration order and the time the run itself took.
    pub async fn run(&self, inputs: NamedTensors) -> Result<(NamedTensors, Duration), EngineError> {
        let run = self.run_as(Stage::Model, inputs).await?;
        Ok((run.outputs, run.elapsed))
    }

    /// Runs the model on `inputs` as `stage` of the current request: the wait and the run are
    /// spans of the current span. Fails at once with `Overloaded` when the queue is full.
    pub async fn run_as(&self, stage: Stage, inputs: NamedTensors) -> Result<Run, EngineError> {
        let queue_span = tracing::info_span!("queue", model = %self.name);
        self.submit(stage, inputs, Span::current(), queue_span)
            .await
    }

    async fn submit(
        &self,
        stage: Stage,
        inputs: NamedTensors,
        parent: Span,
        queue_span: Span,
    ) -> Result<Run, EngineError> {
        let (reply, answer) = oneshot::channel();
        let job = Job {
            inputs,
            stage,
            enqueued: Instant::now(),
            parent,
            queue_span,
            reply,
        };
        // Counted before sending so that the worker's decrement never comes first.
        metrics::add_queue_depth(&self.name, 1.0);
        self.queue.try_send(job).map_err(|e| {
            metrics::add_queue_depth(&self.name, -1.0);
            self.send_error(e)
        })?;
        answer
            .await
            .map_err(|_| EngineError::Stopped(self.name.to_string()))?
    }

    fn send_error(&self, error: mpsc::error::TrySendError<Job>) -> EngineError {
        match error {
            mpsc::error::TrySendError::Full(_) => EngineError::Overloaded {
                model: self.name.to_string(),
                capacity: self.capacity,
            },
            mpsc::error::TrySendError::Closed(_) => EngineError::Stopped(self.name.to_string()),
        }
    }
}

/// The session and what its runs need, owned by the worker thread.
struct SessionRunner {
    model: String,
    session: Session,
    outputs: OutputMemory,
    release: Release,
    arena: Option<ArenaGauge>,
}

impl SessionRunner {
    /// Runs one job in its span and replies; a job whose caller has gone is skipped unrun.
    fn handle(&mut self, job: Job) {
        let Job {
            inputs,
            stage,
            enqueued,
            parent,
            queue_span,
            reply,
        } = job;
        drop(queue_span);
        if reply.is_closed() {
            tracing::debug!(model = %self.model, "caller gone; job dropped before running");
            metrics::record_dropped(&self.model);
            return;
        }
        let queued = enqueued.elapsed();
        let result = self
            .run_in(stage, &inputs, parent)
            .map(|run| Run { queued, ..run });
        // The caller may have gone while the model ran; its result is simply dropped.
        let _ = reply.send(result);
    }

    /// Runs `inputs` in a span of `stage` under `parent`, and reads the arena's use after it.
    fn run_in(
        &mut self,
        stage: Stage,
        inputs: &NamedTensors,
        parent: Span,
    ) -> Result<Run, EngineError> {
        let result = run_span(stage, &parent, &self.model)
            .in_scope(|| self.run_job(inputs))
            .map(|(outputs, elapsed)| Run {
                outputs,
                queued: Duration::ZERO,
                elapsed,
            });
        // Released before replying, so that the caller's span can close as soon as it is done.
        drop(parent);
        if let Some(stats) = self.arena.as_ref().and_then(ArenaGauge::stats) {
            metrics::set_runtime_arena(stats);
        }
        result
    }

    /// Runs one job, turning a panic into an error, and records its batch size.
    fn run_job(&mut self, inputs: &NamedTensors) -> Result<(NamedTensors, Duration), EngineError> {
        let batch = batch_size(inputs);
        metrics::record_batch_size(&self.model, batch);
        let options = self.release.options(batch);
        let started = Instant::now();
        std::panic::catch_unwind(AssertUnwindSafe(|| {
            injected_fault(&self.model)?;
            match &self.outputs {
                OutputMemory::Host => run_plain(&mut self.session, inputs, options),
                OutputMemory::Bound { info, to_host } => {
                    run_bound(&mut self.session, inputs, batch, options, info, *to_host)
                }
            }
        }))
        .unwrap_or_else(|_| Err("the run panicked".to_string()))
        .map(|outputs| (outputs, started.elapsed()))
        .map_err(|message| EngineError::Run {
            model: self.model.clone(),
            message,
        })
    }
}

impl BatchRunner for SessionRunner {
    /// Runs the batch at once, on this thread: the thread has nothing else to do meanwhile.
    fn run(
        &mut self,
        stage: Stage,
        inputs: NamedTensors,
        parent: Span,
    ) -> impl Future<Output = Result<Run, EngineError>> {
        std::future::ready(self.run_in(stage, &inputs, parent))
    }
}

/// The worker loop: one job, or one batch, at a time, until every handle is gone.
async fn serve(
    mut runner: SessionRunner,
    mut jobs: mpsc::Receiver<Job>,
    mut batches: Option<BatchQueue>,
) {
    let mut jobs_open = true;
    loop {
        tokio::select! {
            job = jobs.recv(), if jobs_open => match job {
                Some(job) => {
                    metrics::add_queue_depth(&runner.model, -1.0);
                    runner.handle(job);
                }
                None => jobs_open = false,
            },
            first = next_batch(&mut batches), if batches.is_some() => match (first, &mut batches) {
                (Some(first), Some(queue)) => queue.serve(first, &mut runner).await,
                _ => batches = None,
            },
            else => break,
        }
    }
    tracing::debug!(model = %runner.model, "worker stopped");
}

/// The next request of `batches`; never, without a batcher.
async fn next_batch(batches: &mut Option<BatchQueue>) -> Option<Pending> {
    match batches {
        Some(queue) => queue.recv().await,
        None => std::future::pending().await,
    }
}

/// The span of one run, a child of the caller's span.
fn run_span(stage: Stage, parent: &Span, model: &str) -> Span {
    match stage {
        Stage::Backbone => tracing::info_span!(parent: parent, "backbone", model),
        Stage::Head => tracing::info_span!(
            parent: parent,
            "head",
            head = model,
            otel.name = format!("head {model}")
        ),
        Stage::Model => tracing::info_span!(parent: parent, "run", model),
    }
}

/// The fault a test injected into `model`'s runs through the `session-run/<model>` failpoint:
/// `return(message)` fails the run with `message`, `panic` panics inside it.
#[cfg(feature = "failpoints")]
fn injected_fault(model: &str) -> Result<(), String> {
    let fault = |message: Option<String>| Err(message.unwrap_or_else(|| "injected fault".into()));
    fail::fail_point!(&format!("session-run/{model}"), fault);
    Ok(())
}

/// Without the `failpoints` feature no fault can be injected.
#[cfg(not(feature = "failpoints"))]
fn injected_fault(_model: &str) -> Result<(), String> {
    Ok(())
}

/// A plain run: inputs fed as views wherever they are, outputs copied to host arrays.
fn run_plain(
    session: &mut Session,
    inputs: &NamedTensors,
    options: Option<&RunOptions>,
) -> Result<NamedTensors, String> {
    let mut values = Vec::with_capacity(inputs.len());
    for (name, tensor) in inputs {
        let value = tensor.input().map_err(|e| format!("input {name}: {e}"))?;
        values.push((name.as_str(), value));
    }
    let outputs = match options {
        Some(options) => session.run_with_options(values, options),
        None => session.run(values),
    }
    .map_err(|e| e.to_string())?;
    outputs
        .iter()
        .map(|(name, value)| {
            let array = value
                .try_extract_array::<f32>()
                .map_err(|e| format!("output {name}: {e}"))?
                .to_owned();
            Ok((name.to_string(), Tensor::from(array)))
        })
        .collect()
}

/// A run of `batch` items through an IoBinding: every output is written into `info`'s memory and
/// kept there (or, with `to_host`, copied to the host after the run). A fresh binding per run, so that ONNX
/// Runtime allocates new outputs rather than reusing the last run's, which callers still hold.
fn run_bound(
    session: &mut Session,
    inputs: &NamedTensors,
    batch: usize,
    options: Option<&RunOptions>,
    info: &MemoryInfo<'static>,
    to_host: bool,
) -> Result<NamedTensors, String> {
    let bindable = inputs
        .iter()
        .map(|(name, tensor)| tensor.bindable().map_err(|e| format!("input {name}: {e}")))
        .collect::<Result<Vec<Bindable<'_>>, _>>()?;
    let mut binding = session.create_binding().map_err(|e| e.to_string())?;
    for ((name, _), value) in inputs.iter().zip(&bindable) {
        binding
            .bind_input(name.as_str(), value.value())
            .map_err(|e| format!("input {name}: {e}"))?;
    }
    let names: Vec<String> = session
        .outputs()
        .iter()
        .map(|o| o.name().to_string())
        .collect();
    let exact = (info.device_type() == DeviceType::CPU && !to_host)
        .then(|| exact_output_shapes(session, batch))
        .flatten();
    let mut written = Vec::new();
    match exact {
        Some(shapes) => {
            for (name, shape) in names.iter().zip(shapes) {
                let mut tensor = DeviceTensor::pooled(&shape)?;
                binding
                    .bind_output(name.as_str(), tensor.value_mut())
                    .map_err(|e| format!("output {name}: {e}"))?;
                written.push((name.clone(), tensor));
            }
        }
        None => {
            for name in &names {
                binding
                    .bind_output_to_device(name.as_str(), info)
                    .map_err(|e| format!("output {name}: {e}"))?;
            }
        }
    }
    let mut outputs = match options {
        Some(options) => session.run_binding_with_options(&binding, options),
        None => session.run_binding(&binding),
    }
    .map_err(|e| e.to_string())?;
    if !written.is_empty() {
        // Written in place: the tensors bound are the outputs.
        return Ok(written
            .into_iter()
            .map(|(name, tensor)| (name, Tensor::Device(Arc::new(tensor))))
            .collect());
    }
    names
        .iter()
        .map(|name| {
            let tensor = outputs
                .remove(name.as_str())
                .ok_or_else(|| format!("output {name} is missing"))?
                .downcast::<DynTensorValueType>()
                .map_err(|e| format!("output {name}: {e}"))
                .and_then(device_tensor)?;
            let tensor = if to_host {
                Tensor::Host(tensor.to_host()?)
            } else {
                tensor
            };
            Ok((name.clone(), tensor))
        })
        .collect()
}

/// Items in a run: the first input's leading dimension.
fn batch_size(inputs: &NamedTensors) -> usize {
    inputs
        .first()
        .and_then(|(_, tensor)| tensor.shape().first().copied())
        .unwrap_or(1)
}

/// The shapes of `session`'s outputs for a run of `batch` items, when the model declares every
/// dimension but the leading one: ONNX Runtime then writes them into tensors of exactly their
/// size from the buffer pool, so that features kept for later (in the feature cache, for a
/// feature handle) hold no more memory than their bytes, and none of the arena's.
/// `None` when a dimension is only known once the model has run.
fn exact_output_shapes(session: &Session, batch: usize) -> Option<Vec<Vec<usize>>> {
    session
        .outputs()
        .iter()
        .map(|outlet| match outlet.dtype() {
            ValueType::Tensor { shape, .. } => shape
                .iter()
                .enumerate()
                .map(|(axis, &dim)| match (axis, usize::try_from(dim)) {
                    (0, _) => Some(batch),
                    (_, Ok(dim)) => Some(dim),
                    (_, Err(_)) => None,
                })
                .collect(),
            _ => None,
        })
        .collect()
}

/// The inputs and the outputs `session`'s model declares, in declaration order.
pub fn declared(session: &Session) -> (Arc<[TensorInfo]>, Arc<[TensorInfo]>) {
    (
        session.inputs().iter().map(outlet_info).collect(),
        session.outputs().iter().map(outlet_info).collect(),
    )
}

fn outlet_info(outlet: &ort::value::Outlet) -> TensorInfo {
    let (shape, datatype) = match outlet.dtype() {
        ValueType::Tensor { ty, shape, .. } => (shape.iter().copied().collect(), format!("{ty:?}")),
        other => (Vec::new(), format!("{other:?}")),
    };
    TensorInfo {
        name: outlet.name().to_string(),
        shape,
        datatype,
    }
}

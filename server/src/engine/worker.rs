//! A dedicated OS thread that owns one ONNX Runtime session (`Session::run` takes `&mut self`)
//! and serves a bounded queue of jobs; callers await a oneshot reply.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ndarray::ArrayD;
use ort::session::Session;
use ort::value::{TensorRef, ValueType};
use tokio::sync::{mpsc, oneshot};

use super::{EngineError, NamedTensors, SharedTensor};

/// A model input or output as the ONNX file declares it; -1 marks a dynamic dimension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub shape: Vec<i64>,
    pub datatype: String,
}

struct Job {
    inputs: NamedTensors,
    reply: oneshot::Sender<Result<(NamedTensors, Duration), EngineError>>,
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
    /// Moves `session` onto its own thread, serving at most `capacity` waiting jobs.
    pub fn spawn(name: &str, session: Session, capacity: usize) -> Result<Self, EngineError> {
        let inputs: Arc<[TensorInfo]> = session.inputs().iter().map(outlet_info).collect();
        let outputs: Arc<[TensorInfo]> = session.outputs().iter().map(outlet_info).collect();
        let capacity = capacity.max(1);
        let (queue, jobs) = mpsc::channel(capacity);
        let thread_name = format!("ort-{name}");
        let model = name.to_string();
        std::thread::Builder::new()
            .name(thread_name)
            .spawn(move || serve(model, session, jobs))
            .map_err(|e| EngineError::Run {
                model: name.to_string(),
                message: format!("cannot start the worker thread: {e}"),
            })?;
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
        let (reply, answer) = oneshot::channel();
        self.queue
            .try_send(Job { inputs, reply })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => EngineError::Overloaded {
                    model: self.name.to_string(),
                    capacity: self.capacity,
                },
                mpsc::error::TrySendError::Closed(_) => EngineError::Stopped(self.name.to_string()),
            })?;
        answer
            .await
            .map_err(|_| EngineError::Stopped(self.name.to_string()))?
    }
}

/// The worker loop: one job at a time; jobs whose caller has gone are skipped unrun.
fn serve(model: String, mut session: Session, mut jobs: mpsc::Receiver<Job>) {
    while let Some(job) = jobs.blocking_recv() {
        if job.reply.is_closed() {
            tracing::debug!(%model, "caller gone; job dropped before running");
            continue;
        }
        let started = Instant::now();
        let result =
            std::panic::catch_unwind(AssertUnwindSafe(|| run_once(&mut session, &job.inputs)))
                .unwrap_or_else(|_| Err("the run panicked".to_string()))
                .map(|outputs| (outputs, started.elapsed()))
                .map_err(|message| EngineError::Run {
                    model: model.clone(),
                    message,
                });
        // The caller may have gone while the model ran; its result is simply dropped.
        let _ = job.reply.send(result);
    }
    tracing::debug!(%model, "worker stopped");
}

fn run_once(session: &mut Session, inputs: &NamedTensors) -> Result<NamedTensors, String> {
    let mut values = Vec::with_capacity(inputs.len());
    for (name, tensor) in inputs {
        let view =
            TensorRef::from_array_view(tensor.view()).map_err(|e| format!("input {name}: {e}"))?;
        values.push((name.as_str(), view));
    }
    let outputs = session.run(values).map_err(|e| e.to_string())?;
    outputs
        .iter()
        .map(|(name, value)| {
            let array: ArrayD<f32> = value
                .try_extract_array::<f32>()
                .map_err(|e| format!("output {name}: {e}"))?
                .to_owned();
            Ok((name.to_string(), SharedTensor::new(array)))
        })
        .collect()
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

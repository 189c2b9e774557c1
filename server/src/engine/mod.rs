//! ONNX Runtime: loading the shared library, choosing the execution provider, the worker
//! threads that each own one session, and the batchers, served by those threads, that share
//! runs between concurrent requests.

pub mod arena;
mod batcher;
pub mod buffers;
mod runtime;
mod status;
mod tensor;
mod worker;

pub use batcher::{
    BatchConfig, BatchQueue, BatchRunner, Batcher, for_several_calls, within_deadline,
};
pub use runtime::{Device, RUNTIME_TELEMETRY_VAR, Runtime, disable_runtime_telemetry};
pub use tensor::{DeviceTensor, FeatureMemory, Memory, Placement, Tensor, device_memory};
pub use worker::{OutputMemory, Run, SessionWorker, Stage, TensorInfo, declared};

/// Named tensors, in the order a model declares them.
pub type NamedTensors = Vec<(String, Tensor)>;

/// What can go wrong in the engine. Cloneable, so that every request sharing one run gets its
/// error.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    /// The ONNX Runtime library could not be found or loaded.
    #[error("cannot load the ONNX Runtime library: {0}")]
    Library(String),
    /// A session could not be created from a model file.
    #[error("cannot load model {file}: {message}")]
    Load { file: String, message: String },
    /// The requested execution provider is not usable here.
    #[error("{0}")]
    Device(String),
    /// The model's queue is full.
    #[error("the {model} queue is full ({capacity} requests waiting)")]
    Overloaded { model: String, capacity: usize },
    /// The worker thread has stopped.
    #[error("the {0} worker has stopped")]
    Stopped(String),
    /// The call's deadline passed while its request waited for the model, which it never
    /// reached.
    #[error("the call's deadline passed while it waited for {0}")]
    Expired(String),
    /// ONNX Runtime failed while running a model.
    #[error("{model} failed: {message}")]
    Run { model: String, message: String },
}

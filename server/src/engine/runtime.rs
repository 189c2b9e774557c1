//! The process-wide ONNX Runtime: where its library comes from, which execution provider runs the
//! models, and how sessions are created.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use ort::environment::Environment;
use ort::ep;
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;

use super::EngineError;
use crate::config::RuntimeConfig;

/// An execution provider selection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    /// The CPU execution provider.
    Cpu,
    /// The CUDA execution provider on the given GPU.
    Cuda(i32),
}

impl FromStr for Device {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse::<i32>().ok())
                .filter(|n| *n >= 0)
                .map(Self::Cuda)
                .ok_or_else(|| format!("unknown device '{s}': expected cpu, cuda or cuda:N")),
        }
    }
}

impl serde::Serialize for Device {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// The loaded ONNX Runtime and the execution provider every session of this process uses.
pub struct Runtime {
    env: Environment,
    device: Device,
    intra_threads: usize,
    intra_op_spinning: bool,
}

impl Runtime {
    /// Loads the ONNX Runtime library and settles the execution provider: a CUDA device that
    /// cannot be used is an error unless CPU fallback is allowed.
    pub fn init(config: &RuntimeConfig) -> Result<Self, EngineError> {
        let env = environment(config.ort_dylib.as_deref())?;
        let device = settle_device(&env, config.device, config.allow_cpu_fallback)?;
        if device == Device::Cpu {
            let release = Duration::from_secs(u64::from(config.arena_release_seconds));
            super::arena::register(&env, release)
                .map_err(|e| EngineError::Library(format!("the shared CPU arena: {e}")))?;
        }
        tracing::info!(%device, "execution provider selected");
        Ok(Self {
            env,
            device,
            intra_threads: config.intra_threads,
            intra_op_spinning: config.intra_op_spinning,
        })
    }

    /// The execution provider in use.
    pub fn device(&self) -> Device {
        self.device
    }

    /// Creates a session for the model at `path` on this runtime's execution provider.
    pub fn load(&self, path: &Path) -> Result<Session, EngineError> {
        let load_err = |message: String| EngineError::Load {
            file: path.display().to_string(),
            message,
        };
        let mut builder = Session::builder(&self.env)
            .map_err(|e| load_err(e.to_string()))?
            .with_optimization_level(GraphOptimizationLevel::Level3)
            .map_err(|e| load_err(e.to_string()))?;
        if self.intra_threads > 0 {
            builder = builder
                .with_intra_threads(self.intra_threads)
                .map_err(|e| load_err(e.to_string()))?;
        }
        builder = builder
            .with_intra_op_spinning(self.intra_op_spinning)
            .map_err(|e| load_err(e.to_string()))?;
        if self.device == Device::Cpu {
            // The process's one CPU arena (see `arena`).
            builder = builder
                .with_env_allocators()
                .map_err(|e| load_err(e.to_string()))?;
        }
        if let Device::Cuda(id) = self.device {
            builder = builder
                .with_execution_providers([cuda_provider(id)])
                .map_err(|e| load_err(e.to_string()))?;
        }
        builder
            .commit_from_file(path)
            .map_err(|e| load_err(e.to_string()))
    }
}

/// The variable with which ONNX Runtime's own usage telemetry is turned off.
pub const RUNTIME_TELEMETRY_VAR: &str = "ORT_DISABLE_TELEMETRY";

/// Turns ONNX Runtime's usage telemetry off for this process, unless its environment already
/// says either way (`ORT_DISABLE_TELEMETRY`).
///
/// The official builds since 1.29 report to Microsoft from Linux too: they resolve and contact
/// `mobile.events.data.microsoft.com` and keep a device id and an event cache under
/// `~/.cache/Microsoft`. The C API's `DisableTelemetryEvents` needs an environment and so comes
/// after the first event; only the variable, read when the library initialises, stops them all.
///
/// Call it first thing in `main`, before any other thread exists: changing the environment
/// races with threads that read it.
#[allow(unsafe_code)]
pub fn disable_runtime_telemetry() {
    if std::env::var_os(RUNTIME_TELEMETRY_VAR).is_none() {
        // SAFETY: called at the start of `main`, while this is the process's only thread.
        unsafe { std::env::set_var(RUNTIME_TELEMETRY_VAR, "1") };
    }
}

/// The process's one ONNX Runtime environment (ONNX Runtime allows a single one), created on
/// first use from the library `explicit` or the default search; later calls share it.
fn environment(explicit: Option<&Path>) -> Result<Environment, EngineError> {
    static ENV: OnceLock<Environment> = OnceLock::new();
    static INIT: Mutex<()> = Mutex::new(());
    let _serialised = INIT.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(env) = ENV.get() {
        return Ok(env.clone());
    }
    let library = find_library(explicit)?;
    let env = ort::init_from(&library)
        .map_err(|e| EngineError::Library(format!("{}: {e}", library.display())))?
        .with_name("polyhead")
        .with_telemetry(false)
        .build()
        .map_err(|e| EngineError::Library(e.to_string()))?;
    tracing::info!(library = %library.display(), "loaded ONNX Runtime");
    Ok(ENV.get_or_init(|| env).clone())
}

fn cuda_provider(id: i32) -> ep::ExecutionProviderDispatch {
    ep::CUDA::default()
        .with_device_id(id)
        .build()
        .error_on_failure()
}

/// Checks that a requested CUDA device can host a session; falls back to the CPU when allowed.
fn settle_device(
    env: &Environment,
    requested: Device,
    allow_cpu_fallback: bool,
) -> Result<Device, EngineError> {
    let Device::Cuda(id) = requested else {
        return Ok(Device::Cpu);
    };
    match cuda_usable(env, id) {
        Ok(()) => Ok(requested),
        Err(reason) if allow_cpu_fallback => {
            tracing::warn!(%reason, "CUDA requested but unusable; falling back to the CPU");
            Ok(Device::Cpu)
        }
        Err(reason) => Err(EngineError::Device(format!(
            "device {requested} was requested but CUDA cannot be used: {reason} \
             (run with --device cpu, or allow --allow-cpu-fallback)"
        ))),
    }
}

/// Registers the CUDA provider on a throw-away session builder: this fails when the library has
/// no CUDA support, the CUDA libraries are missing or the device does not exist.
fn cuda_usable(env: &Environment, id: i32) -> Result<(), String> {
    use ort::ep::ExecutionProvider;
    if !ep::CUDA::is_available().map_err(|e| e.to_string())? {
        return Err("this ONNX Runtime library was built without the CUDA provider".into());
    }
    let cuda = ep::CUDA::default().with_device_id(id);
    let mut builder = Session::builder(env).map_err(|e| e.to_string())?;
    cuda.register(&mut builder).map_err(|e| e.to_string())
}

/// Finds `libonnxruntime.so`: the explicit path, `ORT_DYLIB_PATH`, then the `onnxruntime` wheel
/// in a `.venv` in the working directory or next to (or above) the executable.
fn find_library(explicit: Option<&Path>) -> Result<PathBuf, EngineError> {
    if let Some(path) = explicit {
        return existing(path.to_path_buf());
    }
    if let Some(path) = std::env::var_os("ORT_DYLIB_PATH") {
        return existing(PathBuf::from(path));
    }
    let mut roots = vec![std::env::current_dir().unwrap_or_default()];
    if let Ok(exe) = std::env::current_exe() {
        roots.extend(exe.ancestors().skip(1).take(4).map(Path::to_path_buf));
    }
    roots
        .iter()
        .find_map(|root| wheel_library(&root.join(".venv")))
        .ok_or_else(|| {
            EngineError::Library(
                "libonnxruntime.so not found: pass --ort-dylib, set ORT_DYLIB_PATH, or install \
                 the onnxruntime wheel into ./.venv (make setup)"
                    .into(),
            )
        })
}

fn existing(path: PathBuf) -> Result<PathBuf, EngineError> {
    if path.is_file() {
        Ok(path)
    } else {
        Err(EngineError::Library(format!(
            "{} does not exist",
            path.display()
        )))
    }
}

/// `<venv>/lib/python3.*/site-packages/onnxruntime/capi/libonnxruntime.so.*`
fn wheel_library(venv: &Path) -> Option<PathBuf> {
    let lib = std::fs::read_dir(venv.join("lib")).ok()?;
    lib.filter_map(Result::ok)
        .map(|python| python.path().join("site-packages/onnxruntime/capi"))
        .filter_map(|capi| std::fs::read_dir(capi).ok())
        .flat_map(|dir| dir.filter_map(Result::ok).map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libonnxruntime.so."))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse() {
        assert_eq!("cpu".parse::<Device>(), Ok(Device::Cpu));
        assert_eq!("CUDA".parse::<Device>(), Ok(Device::Cuda(0)));
        assert_eq!("cuda:3".parse::<Device>(), Ok(Device::Cuda(3)));
        assert!("cuda:-1".parse::<Device>().is_err());
        assert!("metal".parse::<Device>().is_err());
        assert_eq!(Device::Cuda(2).to_string(), "cuda:2");
    }

    #[test]
    fn missing_explicit_library_is_named() {
        let err = find_library(Some(Path::new("/nonexistent/libonnxruntime.so")))
            .expect_err("does not exist");
        assert!(err.to_string().contains("/nonexistent/libonnxruntime.so"));
    }
}

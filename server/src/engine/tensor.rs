//! The tensors that flow between the backbone, the feature cache and the heads, and the memory
//! backbone features are kept in.
//!
//! A [`Tensor`] is either an array in host memory or a tensor ONNX Runtime allocated for the
//! execution provider ([`DeviceTensor`]): GPU memory under CUDA, host memory under the CPU
//! provider. With `--feature-placement device` (the default) the backbone writes its outputs
//! straight into that memory through an IoBinding, and the heads read them from there, so
//! under CUDA the features never go through the host. Under the CPU provider the very same code
//! runs, which is how the tests cover it.
//!
//! Batching needs copies between tensors of that memory (a batch's outputs split per request, the
//! features of several requests concatenated for one head run, a window's frames stacked). They
//! go through ONNX Runtime itself, so that they stay on the device: [`FeatureMemory::concat`] and
//! [`FeatureMemory::split`] allocate with the backbone session's allocator and copy part by part
//! into (or out of) views of a range of the batch tensor.
//!
//! Under the CPU provider, the backbone's outputs and these copies are host buffers of their
//! exact size from a pool recycled by size ([`super::buffers`], [`DeviceTensor::pooled`]), bound
//! as ONNX Runtime values, rather than tensors of ONNX Runtime's arena: features kept in the cache
//! then hold no more memory than their bytes.
//!
//! This module's `unsafe` code makes such views: ONNX Runtime values over memory that something
//! else owns ([`alias`]). Each use says why the memory outlives the view.
#![allow(unsafe_code)]

use std::ffi::c_void;
use std::fmt;
use std::ptr::{self, NonNull};
use std::sync::{Arc, Mutex};

use ndarray::{ArrayD, ArrayViewD, Axis, Slice};
use ort::AsPointer;
use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
use ort::session::{Session, SessionInputValue};
use ort::value::{DynTensor, TensorRef};

use super::buffers::PooledBuffer;
use super::{Device, NamedTensors};
use crate::telemetry::metrics;

/// Where a tensor's data is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Memory {
    /// An array polyhead owns in host memory.
    Host,
    /// Host memory ONNX Runtime allocated for the CPU provider.
    Cpu,
    /// GPU memory on the given CUDA device.
    Cuda(i32),
}

impl fmt::Display for Memory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Host => f.write_str("host"),
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(id) => write!(f, "cuda:{id}"),
        }
    }
}

/// A tensor of `f32`, cheap to clone (shared).
#[derive(Debug, Clone)]
pub enum Tensor {
    /// An array in host memory.
    Host(Arc<ArrayD<f32>>),
    /// A tensor in memory ONNX Runtime allocated for the execution provider.
    Device(Arc<DeviceTensor>),
}

/// A tensor ONNX Runtime allocated: a backbone output kept where the backbone wrote it, or a copy
/// made there.
#[derive(Debug)]
pub struct DeviceTensor {
    /// Dropped before `_buffer`, whose memory it may view.
    value: DynTensor,
    shape: Vec<usize>,
    memory: Memory,
    /// The memory of a host tensor from the buffer pool, which `value` views: only held.
    _buffer: Option<PooledBuffer>,
}

impl DeviceTensor {
    fn new(value: DynTensor) -> Result<Self, String> {
        let shape = value
            .shape()
            .iter()
            .map(|&d| {
                usize::try_from(d).map_err(|_| format!("a tensor of shape {:?}", value.shape()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let info = value.memory_info();
        let memory = if info.is_cpu_accessible() {
            Memory::Cpu
        } else if info.allocation_device() == AllocationDevice::CUDA {
            Memory::Cuda(info.device_id())
        } else {
            return Err(format!(
                "a tensor in {} memory, which polyhead does not handle",
                info.allocation_device().as_str()
            ));
        };
        Ok(Self {
            value,
            shape,
            memory,
            _buffer: None,
        })
    }

    /// A tensor of `shape` in host memory from the buffer pool (see [`super::buffers`]), for
    /// ONNX Runtime to write whole: under the CPU provider, the backbone's outputs and the
    /// copies made of them.
    pub(super) fn pooled(shape: &[usize]) -> Result<Self, String> {
        let mut buffer = PooledBuffer::new(shape.iter().product());
        let data = buffer.as_mut_slice().as_mut_ptr();
        // SAFETY: `data` holds the shape's element count of f32 in host memory; the buffer
        // lives in the returned tensor, which drops the view first.
        let value = unsafe { alias(&cpu_memory()?, data.cast(), shape) }?;
        Ok(Self {
            value,
            shape: shape.to_vec(),
            memory: Memory::Cpu,
            _buffer: Some(buffer),
        })
    }

    /// The ONNX Runtime value, to bind as a run's output.
    pub(super) fn value_mut(&mut self) -> &mut DynTensor {
        &mut self.value
    }
}

impl From<ArrayD<f32>> for Tensor {
    fn from(array: ArrayD<f32>) -> Self {
        Self::Host(Arc::new(array))
    }
}

impl Tensor {
    /// The tensor's shape.
    pub fn shape(&self) -> &[usize] {
        match self {
            Self::Host(array) => array.shape(),
            Self::Device(tensor) => &tensor.shape,
        }
    }

    /// The number of elements.
    pub fn len(&self) -> usize {
        self.shape().iter().product()
    }

    /// Whether it holds no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes its elements take.
    pub fn bytes(&self) -> usize {
        self.len() * size_of::<f32>()
    }

    /// Where its data is.
    pub fn memory(&self) -> Memory {
        match self {
            Self::Host(_) => Memory::Host,
            Self::Device(tensor) => tensor.memory,
        }
    }

    /// A view of its data, which must be readable from the host: an error for GPU memory (copy
    /// it with [`Tensor::to_host`] first).
    pub fn array(&self) -> Result<ArrayViewD<'_, f32>, String> {
        match self {
            Self::Host(array) => Ok(array.view()),
            Self::Device(tensor) if tensor.memory == Memory::Cpu => tensor
                .value
                .try_extract_array::<f32>()
                .map_err(|e| e.to_string()),
            Self::Device(tensor) => Err(format!(
                "the tensor is in {} memory; copy it to the host first",
                tensor.memory
            )),
        }
    }

    /// Its data as a host array: shared as it is when it is one already, else copied. A copy out
    /// of GPU memory counts in `polyhead_feature_device_to_host_bytes_total`.
    pub fn to_host(&self) -> Result<Arc<ArrayD<f32>>, String> {
        match self {
            Self::Host(array) => Ok(Arc::clone(array)),
            Self::Device(tensor) if tensor.memory == Memory::Cpu => {
                Ok(Arc::new(self.array()?.to_owned()))
            }
            Self::Device(tensor) => {
                let host = tensor
                    .value
                    .to(AllocationDevice::CPU, 0)
                    .map_err(|e| format!("copying a tensor to the host: {e}"))?;
                let array = host
                    .try_extract_array::<f32>()
                    .map_err(|e| e.to_string())?
                    .to_owned();
                metrics::record_device_to_host(self.bytes());
                Ok(Arc::new(array))
            }
        }
    }

    /// The tensor as an input of a plain session run: a view, never a copy.
    pub(super) fn input(&self) -> Result<SessionInputValue<'_>, String> {
        match self {
            Self::Host(array) => TensorRef::from_array_view(array.view())
                .map(SessionInputValue::from)
                .map_err(|e| e.to_string()),
            Self::Device(tensor) => Ok(SessionInputValue::from(&tensor.value)),
        }
    }

    /// The tensor as a value an IoBinding can hold: a device tensor as it is; a host array
    /// through a view of its memory that lives as long as `self`'s borrow (never a copy).
    pub(super) fn bindable(&self) -> Result<Bindable<'_>, String> {
        match self {
            Self::Device(tensor) => Ok(Bindable::Device(&tensor.value)),
            Self::Host(array) => {
                let data = array
                    .as_slice()
                    .ok_or("a host array that is not contiguous")?;
                let info = cpu_memory()?;
                // SAFETY: `data` holds `array.len()` f32 in host memory, and the view cannot
                // outlive the borrow of `self` that `Bindable` carries.
                let view = unsafe { alias(&info, data.as_ptr().cast_mut().cast(), array.shape()) }?;
                Ok(Bindable::Alias(view, std::marker::PhantomData))
            }
        }
    }
}

/// A tensor ready to be bound as an IoBinding input (see [`Tensor::bindable`]).
pub(super) enum Bindable<'a> {
    Device(&'a DynTensor),
    Alias(DynTensor, std::marker::PhantomData<&'a ()>),
}

impl Bindable<'_> {
    pub(super) fn value(&self) -> &DynTensor {
        match self {
            Self::Device(value) => value,
            Self::Alias(value, _) => value,
        }
    }
}

/// Wraps a tensor a session run wrote where the backbone's outputs are bound.
pub(super) fn device_tensor(value: DynTensor) -> Result<Tensor, String> {
    DeviceTensor::new(value).map(|t| Tensor::Device(Arc::new(t)))
}

/// Where the backbone's features are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Placement {
    /// In the execution provider's memory (GPU memory under CUDA), fed to the heads from there.
    #[default]
    Device,
    /// Copied into host arrays after every backbone run (under CUDA, a round trip through the
    /// host for every head).
    Host,
}

impl fmt::Display for Placement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Device => "device",
            Self::Host => "host",
        })
    }
}

/// The memory the backbone writes its features into, and the copies between tensors there.
pub struct FeatureMemory {
    device: Option<DeviceMemory>,
}

struct DeviceMemory {
    /// Allocations go one at a time: ONNX Runtime's CUDA allocator is not thread-safe.
    allocator: Mutex<Allocator>,
    memory: Memory,
}

impl FeatureMemory {
    /// Features copied to host arrays.
    pub fn host() -> Self {
        Self { device: None }
    }

    /// The memory of `session`'s execution provider on `device`: its allocator makes the
    /// batches' copies.
    pub fn device(session: &Session, device: Device) -> Result<Self, String> {
        let info = device_memory(device)?;
        let (allocator, memory) = match device {
            Device::Cpu => (Allocator::default(), Memory::Cpu),
            Device::Cuda(id) => {
                let allocator = Allocator::new(session, info.clone())
                    .map_err(|e| format!("the CUDA allocator: {e}"))?;
                (allocator, Memory::Cuda(id))
            }
        };
        Ok(Self {
            device: Some(DeviceMemory {
                allocator: Mutex::new(allocator),
                memory,
            }),
        })
    }

    /// Where features are kept: [`Memory::Host`] for host arrays.
    pub fn memory(&self) -> Memory {
        self.device.as_ref().map_or(Memory::Host, |d| d.memory)
    }

    /// Concatenates `parts` (equal shapes but for axis 0) along axis 0: in host memory when all
    /// are host arrays, else into a new tensor of this memory.
    pub fn concat(&self, parts: &[&Tensor]) -> Result<Tensor, String> {
        let first = parts.first().ok_or("nothing to concatenate")?;
        if parts.len() == 1 {
            return Ok((*first).clone());
        }
        let device = match &self.device {
            Some(device) if parts.iter().any(|p| matches!(p, Tensor::Device(_))) => device,
            _ => return concat_host(parts),
        };
        let rest = &first.shape()[1..];
        let mut total = 0;
        for part in parts {
            if part.shape().get(1..) != Some(rest) {
                return Err(format!(
                    "cannot concatenate shapes {:?} and {:?}",
                    first.shape(),
                    part.shape()
                ));
            }
            total += part.shape()[0];
        }
        let shape: Vec<usize> = std::iter::once(total).chain(rest.iter().copied()).collect();
        let target = device.allocate(&shape)?;
        let item = rest.iter().product::<usize>() * size_of::<f32>();
        let mut offset = 0;
        for part in parts {
            let source = part.bindable()?;
            // SAFETY: the range [offset, offset + part bytes) lies inside `target`, which
            // outlives the view.
            let view = unsafe {
                alias(
                    target.value.memory_info(),
                    target.value.data_ptr().cast_mut().byte_add(offset),
                    part.shape(),
                )
            }?;
            source
                .value()
                .copy_into(view)
                .map_err(|e| format!("copying into a batch: {e}"))?;
            offset += part.shape()[0] * item;
        }
        Ok(Tensor::Device(Arc::new(target)))
    }

    /// Splits `tensor` along axis 0 into parts of `sizes` items: views shared as they are for
    /// a single part, else copies in the tensor's own memory.
    pub fn split(&self, tensor: &Tensor, sizes: &[usize]) -> Result<Vec<Tensor>, String> {
        let total: usize = sizes.iter().sum();
        if tensor.shape().first() != Some(&total) {
            return Err(format!(
                "a tensor of shape {:?}; a batch of {total} was expected",
                tensor.shape()
            ));
        }
        if sizes.len() == 1 {
            return Ok(vec![tensor.clone()]);
        }
        let (source, device) = match (tensor, &self.device) {
            (Tensor::Device(source), Some(device)) => (source, device),
            (Tensor::Device(_), None) => return split_host(&*tensor.to_host()?, sizes),
            (Tensor::Host(array), _) => return split_host(array, sizes),
        };
        let rest = &tensor.shape()[1..];
        let item = rest.iter().product::<usize>() * size_of::<f32>();
        let mut offset = 0;
        let mut parts = Vec::with_capacity(sizes.len());
        for &n in sizes {
            let shape: Vec<usize> = std::iter::once(n).chain(rest.iter().copied()).collect();
            let mut target = device.allocate(&shape)?;
            // SAFETY: the range [offset, offset + n items) lies inside `source`, which outlives
            // the view.
            let view = unsafe {
                alias(
                    source.value.memory_info(),
                    source.value.data_ptr().cast_mut().byte_add(offset),
                    &shape,
                )
            }?;
            view.copy_into(&mut target.value)
                .map_err(|e| format!("copying out of a batch: {e}"))?;
            parts.push(Tensor::Device(Arc::new(target)));
            offset += n * item;
        }
        Ok(parts)
    }
}

impl FeatureMemory {
    /// Concatenates several requests' inputs (the same names, equal shapes but for axis 0) along
    /// axis 0, input by input; a lone request's inputs as they are.
    pub fn concat_named(&self, mut requests: Vec<NamedTensors>) -> Result<NamedTensors, String> {
        if requests.len() == 1 {
            if let Some(inputs) = requests.pop() {
                return Ok(inputs);
            }
        }
        let first = requests.first().ok_or("an empty batch")?;
        first
            .iter()
            .enumerate()
            .map(|(i, (name, _))| {
                let parts = requests
                    .iter()
                    .map(|r| match r.get(i) {
                        Some((n, t)) if n == name => Ok(t),
                        _ => Err(format!("a part lacks input {name}")),
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let batch = self
                    .concat(&parts)
                    .map_err(|e| format!("cannot batch input {name}: {e}"))?;
                Ok((name.clone(), batch))
            })
            .collect()
    }

    /// Splits every output of a run along axis 0 into one part per request, `sizes[i]` items
    /// each. A run of one request is its own part, shared as it is.
    pub fn split_named(
        &self,
        outputs: &NamedTensors,
        sizes: &[usize],
    ) -> Result<Vec<NamedTensors>, String> {
        if sizes.len() == 1 {
            return Ok(vec![outputs.clone()]);
        }
        let mut parts = vec![Vec::with_capacity(outputs.len()); sizes.len()];
        for (name, tensor) in outputs {
            let pieces = self
                .split(tensor, sizes)
                .map_err(|e| format!("output {name}: {e}"))?;
            for (part, piece) in parts.iter_mut().zip(pieces) {
                part.push((name.clone(), piece));
            }
        }
        Ok(parts)
    }
}

impl DeviceMemory {
    fn allocate(&self, shape: &[usize]) -> Result<DeviceTensor, String> {
        if self.memory == Memory::Cpu {
            return DeviceTensor::pooled(shape);
        }
        let allocator = self
            .allocator
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let value = ort::value::Tensor::<f32>::new(&allocator, shape.to_vec())
            .map(|t| t.upcast())
            .map_err(|e| format!("allocating {shape:?} in {} memory: {e}", self.memory))?;
        DeviceTensor::new(value)
    }
}

fn concat_host(parts: &[&Tensor]) -> Result<Tensor, String> {
    let arrays = parts
        .iter()
        .map(|p| p.to_host())
        .collect::<Result<Vec<_>, _>>()?;
    let views: Vec<_> = arrays.iter().map(|a| a.view()).collect();
    ndarray::concatenate(Axis(0), &views)
        .map(Tensor::from)
        .map_err(|e| format!("cannot concatenate: {e}"))
}

fn split_host(array: &ArrayD<f32>, sizes: &[usize]) -> Result<Vec<Tensor>, String> {
    let mut start = 0;
    let mut parts = Vec::with_capacity(sizes.len());
    for &n in sizes {
        let part = array.slice_axis(Axis(0), Slice::from(start..start + n));
        parts.push(Tensor::from(part.to_owned()));
        start += n;
    }
    Ok(parts)
}

/// The memory of `device`'s execution provider, where its sessions' outputs can be bound.
pub fn device_memory(device: Device) -> Result<MemoryInfo<'static>, String> {
    match device {
        Device::Cpu => cpu_memory(),
        Device::Cuda(id) => MemoryInfo::new(
            AllocationDevice::CUDA,
            id,
            AllocatorType::Device,
            MemoryType::Default,
        )
        .map_err(|e| e.to_string()),
    }
}

fn cpu_memory() -> Result<MemoryInfo<'static>, String> {
    host_memory(AllocatorType::Device)
}

/// Host memory as ONNX Runtime names it, for an allocator of `kind` (a plain one or an arena).
pub(super) fn host_memory(kind: AllocatorType) -> Result<MemoryInfo<'static>, String> {
    MemoryInfo::new(AllocationDevice::CPU, 0, kind, MemoryType::Default).map_err(|e| e.to_string())
}

/// A tensor value over `shape` f32 at `data`, owning nothing: ONNX Runtime reads and writes the
/// memory in place. Unlike `TensorRefMut::from_raw`, `ort` treats it as an owned value, so an
/// IoBinding binds it as it is instead of copying it first.
///
/// # Safety
/// `data` must point to `shape`'s element count of f32 in the memory `info` describes, valid for
/// as long as the returned value lives.
unsafe fn alias(
    info: &MemoryInfo<'_>,
    data: *mut c_void,
    shape: &[usize],
) -> Result<DynTensor, String> {
    let api = ort::api();
    let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
    let bytes = shape.iter().product::<usize>() * size_of::<f32>();
    let mut value: *mut ort::sys::OrtValue = ptr::null_mut();
    // SAFETY: every pointer is valid for the call; the caller vouches for `data`.
    let status = unsafe {
        (api.CreateTensorWithDataAsOrtValue)(
            info.ptr(),
            data,
            bytes,
            dims.as_ptr(),
            dims.len(),
            ort::sys::ONNXTensorElementDataType::ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
            &mut value,
        )
    };
    super::status::check(status).map_err(|message| format!("a view of a tensor: {message}"))?;
    let value = NonNull::new(value).ok_or("a view of a tensor: no value")?;
    // SAFETY: `value` is the tensor just created; releasing it later frees nothing of `data`.
    Ok(unsafe { DynTensor::from_ptr(value, Some(&Allocator::default())) })
}

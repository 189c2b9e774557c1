//! Tensors on the wire: the request's FP32 input (raw little-endian bytes or
//! `contents.fp32_contents`) checked against the model's declared input, the requested outputs,
//! and outputs encoded as raw little-endian bytes.

use std::collections::HashMap;

use bytes::Bytes;
use ndarray::{ArrayD, IxDyn};
use polyhead_proto::inference::model_infer_request::{
    InferInputTensor, InferRequestedOutputTensor,
};
use polyhead_proto::inference::model_infer_response::InferOutputTensor;
use polyhead_proto::inference::{InferParameter, InferTensorContents};

use crate::engine::{NamedTensors, TensorInfo};
use crate::error::Error;

/// The one datatype polyhead's models take and return.
const FP32: &str = "FP32";

/// Bytes per FP32 element.
const FP32_BYTES: usize = 4;

/// Parameters of Triton's extensions (shared memory, classification) that this server does not
/// implement: ignoring them would silently return something else than asked for.
const UNSUPPORTED_PARAMETERS: &[&str] = &[
    "shared_memory_region",
    "shared_memory_byte_size",
    "shared_memory_offset",
    "classification",
];

/// Encoded outputs: one header per tensor and, in the same order, its raw bytes.
pub(super) type EncodedOutputs = (Vec<InferOutputTensor>, Vec<Bytes>);

/// The request's one input, checked against the model's `declared` input (name, datatype,
/// shape: rank and fixed dimensions, element count against the data sent), its values not yet
/// read: the checks take no time, reading a message's worth of bytes does.
pub(super) fn check_input(
    inputs: Vec<InferInputTensor>,
    raw: Vec<Bytes>,
    declared: &TensorInfo,
) -> Result<CheckedInput, Error> {
    let input = single(inputs, declared)?;
    check_header(&input, declared)?;
    let dims = dims(&input.name, &input.shape, &declared.shape)?;
    let count = element_count(&input.name, &dims)?;
    let values = data(input, raw, count)?;
    Ok(CheckedInput { dims, values })
}

/// An input [`check_input`] accepted.
pub(super) struct CheckedInput {
    dims: Vec<usize>,
    values: Values,
}

/// Where a checked input's values are, as many as its shape holds.
enum Values {
    /// Little-endian FP32 bytes (`raw_input_contents`).
    Raw(Bytes),
    /// `contents.fp32_contents`.
    Floats(Vec<f32>),
}

impl CheckedInput {
    /// The input's shape.
    pub(super) fn shape(&self) -> &[usize] {
        &self.dims
    }

    /// The input as an array; raw bytes are read into floats here.
    pub(super) fn read(self) -> Result<ArrayD<f32>, Error> {
        let values = match self.values {
            Values::Raw(bytes) => f32_from_le(&bytes),
            Values::Floats(values) => values,
        };
        ArrayD::from_shape_vec(IxDyn(&self.dims), values)
            .map_err(|e| Error::Internal(format!("input shape: {e}")))
    }
}

/// The names of the outputs to return: all of `available` when none is requested, else the
/// requested ones in their order.
pub(super) fn requested_outputs(
    requested: &[InferRequestedOutputTensor],
    available: &[TensorInfo],
) -> Result<Vec<String>, Error> {
    if requested.is_empty() {
        return Ok(available.iter().map(|t| t.name.clone()).collect());
    }
    let mut names: Vec<String> = Vec::with_capacity(requested.len());
    for output in requested {
        let name = &output.name;
        check_parameters(&output.parameters, &format!("output '{name}'"))?;
        if !available.iter().any(|t| &t.name == name) {
            return Err(invalid(format!(
                "output '{name}' is unknown: the model's outputs are {}",
                list(available)
            )));
        }
        if names.contains(name) {
            return Err(invalid(format!("output '{name}' is requested twice")));
        }
        names.push(name.clone());
    }
    Ok(names)
}

/// Encodes the outputs called `wanted` as FP32 tensors with row-major little-endian raw bytes.
/// Refuses outputs whose `wanted` tensors hold more than `limit` bytes of FP32, before they are
/// encoded: tonic would refuse the encoded message anyway, with a status naming no limit.
pub(super) fn check_response_size(
    outputs: &NamedTensors,
    wanted: &[String],
    limit: usize,
) -> Result<(), Error> {
    let bytes: usize = outputs
        .iter()
        .filter(|(name, _)| wanted.contains(name))
        .map(|(_, tensor)| tensor.len() * size_of::<f32>())
        .sum();
    if bytes > limit {
        return Err(Error::InvalidArgument(format!(
            "the requested outputs hold {bytes} bytes; a response may hold {limit} \
             (--max-response-bytes): ask for fewer outputs or a smaller batch"
        )));
    }
    Ok(())
}

pub(super) fn encode_outputs(
    outputs: &NamedTensors,
    wanted: &[String],
) -> Result<EncodedOutputs, Error> {
    let mut headers = Vec::with_capacity(wanted.len());
    let mut raw = Vec::with_capacity(wanted.len());
    for name in wanted {
        let tensor = outputs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t)
            .ok_or_else(|| Error::Internal(format!("the model returned no '{name}'")))?;
        let shape = tensor
            .shape()
            .iter()
            .map(|&d| i64::try_from(d).map_err(|e| Error::Internal(format!("{name}: {e}"))))
            .collect::<Result<_, _>>()?;
        headers.push(InferOutputTensor {
            name: name.clone(),
            datatype: FP32.to_string(),
            shape,
            parameters: HashMap::new(),
            contents: None,
        });
        let host = tensor
            .to_host()
            .map_err(|e| Error::Internal(format!("{name}: {e}")))?;
        raw.push(f32_to_le(host.iter().copied(), host.len()).into());
    }
    Ok((headers, raw))
}

/// `values` as consecutive little-endian `f32` bytes.
fn f32_to_le(values: impl Iterator<Item = f32>, len: usize) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(len.saturating_mul(FP32_BYTES));
    for value in values {
        bytes.extend_from_slice(&value.to_le_bytes());
    }
    bytes
}

/// The one input of a request to a model that takes one.
fn single(inputs: Vec<InferInputTensor>, declared: &TensorInfo) -> Result<InferInputTensor, Error> {
    let count = inputs.len();
    let mut inputs = inputs.into_iter();
    match (inputs.next(), inputs.next()) {
        (Some(input), None) => Ok(input),
        _ => Err(invalid(format!(
            "the model takes one input, '{}'; the request has {count}",
            declared.name
        ))),
    }
}

fn check_header(input: &InferInputTensor, declared: &TensorInfo) -> Result<(), Error> {
    let name = &input.name;
    if *name != declared.name {
        return Err(invalid(format!(
            "input '{name}' is unknown: the model's input is '{}'",
            declared.name
        )));
    }
    if input.datatype != FP32 {
        return Err(invalid(format!(
            "input '{name}' has datatype '{}'; the model takes {FP32}",
            input.datatype
        )));
    }
    check_parameters(&input.parameters, &format!("input '{name}'"))
}

fn check_parameters(parameters: &HashMap<String, InferParameter>, what: &str) -> Result<(), Error> {
    match parameters
        .keys()
        .find(|k| UNSUPPORTED_PARAMETERS.contains(&k.as_str()))
    {
        Some(key) => Err(invalid(format!(
            "{what}: parameter '{key}' is not supported (this server implements none of \
             Triton's extensions)"
        ))),
        None => Ok(()),
    }
}

/// The request's dimensions, checked against the declared shape (-1 = any size).
fn dims(name: &str, shape: &[i64], declared: &[i64]) -> Result<Vec<usize>, Error> {
    if shape.len() != declared.len() {
        return Err(invalid(format!(
            "input '{name}' has shape {shape:?} of rank {}; the model takes rank {} {declared:?}",
            shape.len(),
            declared.len()
        )));
    }
    let dim = |(axis, (&got, &want)): (usize, (&i64, &i64))| {
        if want >= 0 && got != want {
            return Err(invalid(format!(
                "input '{name}' has {got} on axis {axis} (shape {shape:?}); the model takes \
                 {want} there (shape {declared:?}, -1 = any)"
            )));
        }
        usize::try_from(got).ok().filter(|d| *d > 0).ok_or_else(|| {
            invalid(format!(
                "input '{name}' has {got} on axis {axis} (shape {shape:?}); dimensions must \
                     be positive"
            ))
        })
    };
    shape.iter().zip(declared).enumerate().map(dim).collect()
}

/// The number of elements of `dims`, which must also fit in bytes.
fn element_count(name: &str, dims: &[usize]) -> Result<usize, Error> {
    dims.iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .filter(|n| n.checked_mul(FP32_BYTES).is_some())
        .ok_or_else(|| invalid(format!("input '{name}' of shape {dims:?} is too large")))
}

/// The input's values, `count` of them, in `raw_input_contents` (when sent) or
/// `contents.fp32_contents`.
fn data(input: InferInputTensor, raw: Vec<Bytes>, count: usize) -> Result<Values, Error> {
    let name = input.name;
    let contents = input.contents.unwrap_or_default();
    let entries = raw.len();
    let mut raw = raw.into_iter();
    match (raw.next(), raw.next()) {
        (None, _) => from_contents(&name, contents, count).map(Values::Floats),
        (Some(bytes), None) if contents == InferTensorContents::default() => {
            check_raw_len(&name, &bytes, count)?;
            Ok(Values::Raw(bytes))
        }
        (Some(_), None) => Err(invalid(format!(
            "input '{name}' has data both in contents and in raw_input_contents; send one"
        ))),
        (Some(_), Some(_)) => Err(invalid(format!(
            "the request has {entries} raw_input_contents entries for its 1 input"
        ))),
    }
}

fn from_contents(
    name: &str,
    contents: InferTensorContents,
    count: usize,
) -> Result<Vec<f32>, Error> {
    let values = contents.fp32_contents;
    if values.is_empty() {
        return Err(invalid(format!(
            "input '{name}' carries no FP32 data: send it in raw_input_contents (little-endian) \
             or contents.fp32_contents"
        )));
    }
    if values.len() != count {
        return Err(invalid(format!(
            "input '{name}' has {count} elements by its shape but contents.fp32_contents holds {}",
            values.len()
        )));
    }
    Ok(values)
}

/// Refuses raw bytes that do not hold exactly `count` FP32 values.
fn check_raw_len(name: &str, bytes: &[u8], count: usize) -> Result<(), Error> {
    let expected = count.saturating_mul(FP32_BYTES);
    if bytes.len() != expected {
        return Err(invalid(format!(
            "input '{name}' has {count} FP32 elements by its shape ({expected} bytes) but \
             raw_input_contents[0] holds {} bytes",
            bytes.len()
        )));
    }
    Ok(())
}

/// The little-endian `f32`s in `bytes` (a trailing partial value is dropped).
fn f32_from_le(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(FP32_BYTES)
        .filter_map(|chunk| <[u8; FP32_BYTES]>::try_from(chunk).ok())
        .map(f32::from_le_bytes)
        .collect()
}

fn list(tensors: &[TensorInfo]) -> String {
    tensors
        .iter()
        .map(|t| t.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

fn invalid(message: String) -> Error {
    Error::InvalidArgument(message)
}

#[cfg(test)]
mod tests;

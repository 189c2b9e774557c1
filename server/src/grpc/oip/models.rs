//! The models the Open Inference Protocol addresses: the backbone alone (its outputs are the
//! feature maps) and each head as backbone + head (its input is the backbone's, like the
//! monolithic reference models), with their metadata and the run that serves them.

use std::collections::HashMap;

use ndarray::{ArrayD, Axis};
use polyhead_proto::inference::ModelMetadataResponse;
use polyhead_proto::inference::model_metadata_response::TensorMetadata;

use crate::config::Limits;
use crate::engine::{NamedTensors, Stage, TensorInfo};
use crate::error::Error;
use crate::grpc::info::not_served;
use crate::manifest::HeadParams;
use crate::media::preprocess::ResizePolicy;
use crate::model_set::{Head, ModelSet};

/// Refuses an input of `height` x `width` past the image limits, or, for a backbone that takes
/// images at their aspect ratio, with a side its preprocessing never gives (not a multiple of
/// `multiple`, or longer than `max_side` rounded up to one): such an input fails inside ONNX
/// Runtime, which would be INTERNAL, or runs a shape the model was not made for.
fn check_sides(
    input: &str,
    height: usize,
    width: usize,
    resize: &ResizePolicy,
    limits: &Limits,
) -> Result<(), Error> {
    let side = height.max(width);
    let pixels = height as u64 * width as u64;
    if side > limits.max_image_side as usize || pixels > limits.max_image_pixels {
        return Err(Error::InvalidArgument(format!(
            "input '{input}' is {height} x {width}; the limits are {} pixels a side \
             (--max-image-side) and {} pixels (--max-image-pixels)",
            limits.max_image_side, limits.max_image_pixels
        )));
    }
    if let ResizePolicy::KeepAspect { max_side, multiple } = *resize {
        let multiple = multiple.max(1) as usize;
        let longest = (max_side.max(1) as usize).div_ceil(multiple) * multiple;
        if height % multiple != 0 || width % multiple != 0 || side > longest {
            return Err(Error::InvalidArgument(format!(
                "input '{input}' is {height} x {width}; the backbone takes sides that are \
                 multiples of {multiple}, at most {longest} (its keep-aspect preprocessing)"
            )));
        }
    }
    Ok(())
}

/// The platform every polyhead model reports.
const PLATFORM: &str = "onnxruntime_onnx";

/// One model of the set, as a client names it.
#[derive(Clone, Copy)]
pub(super) struct Model<'a> {
    set: &'a ModelSet,
    /// `None` for the backbone alone.
    head: Option<&'a Head>,
}

impl<'a> Model<'a> {
    /// The model called `name` at `version` (empty: the current one). An unknown name or
    /// version is NOT_FOUND.
    pub(super) fn find(set: &'a ModelSet, name: &str, version: &str) -> Result<Self, Error> {
        if name.is_empty() {
            return Err(Error::InvalidArgument("the model name is required".into()));
        }
        let head = if name == set.backbone.spec.name {
            None
        } else {
            let head = set.head(name).ok_or_else(|| not_served(set, name))?;
            Some(head.as_ref())
        };
        let model = Self { set, head };
        if !version.is_empty() && version != model.version() {
            return Err(Error::NotFound(format!(
                "model '{name}' has no version '{version}' (versions: {})",
                model.version()
            )));
        }
        Ok(model)
    }

    /// The model's name.
    pub(super) fn name(&self) -> &'a str {
        self.head.map_or(&self.set.backbone.spec.name, |h| h.name())
    }

    /// The model's one version, from the manifest.
    pub(super) fn version(&self) -> &'a str {
        self.head
            .map_or(&self.set.backbone.spec.version, |h| &h.spec.version)
    }

    /// The model's one input: the backbone's, with axis 0 as the whole model takes it. For an
    /// action head that is the clip's frames: any count, or the head's fixed clip length. For
    /// the others it is the images: 1 when the backbone or the head fixes its batch to 1.
    pub(super) fn input(&self) -> Result<TensorInfo, Error> {
        let backbone = &self.set.backbone;
        let mut input = backbone
            .worker
            .inputs()
            .iter()
            .find(|t| t.name == backbone.spec.input)
            .cloned()
            .ok_or_else(|| {
                Error::Internal(format!(
                    "the backbone has no input '{}'",
                    backbone.spec.input
                ))
            })?;
        if let (Some(head), Some(axis)) = (self.head, input.shape.first_mut()) {
            *axis = match &head.params {
                HeadParams::Action(params) => params.fixed_frames.map_or(-1, i64::from),
                _ => head
                    .worker
                    .inputs()
                    .iter()
                    .filter_map(|t| t.shape.first().copied())
                    .fold(*axis, i64::max),
            };
        }
        Ok(input)
    }

    /// The model's outputs, in the order the ONNX file declares them.
    pub(super) fn outputs(&self) -> &'a [TensorInfo] {
        self.head
            .map_or(self.set.backbone.worker.outputs(), |h| h.worker.outputs())
    }

    /// Refuses an input `[N, 3, H, W]` that one run must not take: a clip of more frames than an
    /// action head takes, more images than `--max-batch` for the other models (which bounds a
    /// run's activation memory, as on the request path), or a dynamic height and width the
    /// backbone's preprocessing would never give it (see [`check_sides`]).
    pub(super) fn check_batch(&self, shape: &[usize], limits: &Limits) -> Result<(), Error> {
        let input = &self.set.backbone.spec.input;
        let items = shape.first().copied().unwrap_or(0);
        let count = u32::try_from(items).unwrap_or(u32::MAX);
        match self.head.map(|h| (h, &h.params)) {
            Some((head, HeadParams::Action(params))) if items > 0 => {
                let field = format!("input '{input}' (axis 0: frames)");
                params
                    .clip_frames(count, limits.max_frames, &field)
                    .map_err(|e| Error::InvalidArgument(format!("model '{}': {e}", head.name())))?;
            }
            Some((_, HeadParams::Action(_))) => {}
            head => {
                let backbone = self.set.backbone.max_batch();
                let most = head.map_or(backbone, |(h, _)| h.max_batch().min(backbone));
                if items > most {
                    return Err(Error::InvalidArgument(format!(
                        "input '{input}' holds {items} images on axis 0; model '{}' takes at \
                         most {most} in one call (--max-batch, or 1 for a model whose batch \
                         axis is fixed)",
                        self.name()
                    )));
                }
            }
        }
        match *shape {
            [_, _, height, width] => {
                let resize = &self.set.backbone.preprocess.resize;
                check_sides(input, height, width, resize, limits)
            }
            _ => Ok(()),
        }
    }

    /// Runs the backbone once on `input`, then the head (if any) on the features it consumes.
    /// The runs are the `backbone` and `head` stages of the call, as on the request path.
    /// A clip's frames for an action head go through the backbone in runs of at most its
    /// max batch, as on the request path, and their features are stacked in frame order.
    pub(super) async fn run(&self, input: ArrayD<f32>) -> Result<NamedTensors, Error> {
        let backbone = &self.set.backbone;
        // What this model returns or its head reads: all the features, or the head's inputs.
        let kept = |features: NamedTensors| match self.head {
            Some(head) => select(&features, head),
            None => Ok(features),
        };
        let most = backbone.max_batch();
        let features = if input.len_of(Axis(0)) <= most {
            kept(backbone.run(input).await?.outputs)?
        } else {
            let mut parts = Vec::new();
            for chunk in input.axis_chunks_iter(Axis(0), most) {
                parts.push(kept(backbone.run(chunk.to_owned()).await?.outputs)?);
            }
            self.set
                .memory
                .concat_named(parts)
                .map_err(|e| Error::Internal(format!("stacking a clip's features: {e}")))?
        };
        match self.head {
            Some(head) => Ok(head.worker.run_as(Stage::Head, features).await?.outputs),
            None => Ok(features),
        }
    }

    /// The model's metadata: versions, platform, FP32 tensors (-1 = dynamic) and properties.
    pub(super) fn metadata(&self) -> Result<ModelMetadataResponse, Error> {
        Ok(ModelMetadataResponse {
            name: self.name().to_string(),
            versions: vec![self.version().to_string()],
            platform: PLATFORM.to_string(),
            inputs: vec![tensor_metadata(&self.input()?)],
            outputs: self.outputs().iter().map(tensor_metadata).collect(),
            properties: self.properties(),
        })
    }

    /// What a client needs to prepare the input and read the outputs.
    fn properties(&self) -> HashMap<String, String> {
        let set = self.set;
        let spec = &set.backbone.spec;
        let mut properties = HashMap::from([
            ("model_set".to_string(), set.name.clone()),
            ("backbone".to_string(), spec.name.clone()),
            ("execution_provider".to_string(), set.device.to_string()),
            ("resize".to_string(), spec.resize.as_str().to_string()),
            ("layout".to_string(), "NCHW, RGB".to_string()),
            (
                "normalize".to_string(),
                "(x / 255 - mean) / std".to_string(),
            ),
            ("mean".to_string(), join(&spec.mean)),
            ("std".to_string(), join(&spec.std)),
        ]);
        properties.extend(self.head.map_or_else(backbone_properties, head_properties));
        properties
    }
}

fn backbone_properties() -> Vec<(String, String)> {
    vec![("kind".to_string(), "backbone".to_string())]
}

fn head_properties(head: &Head) -> Vec<(String, String)> {
    let labels = head.spec.labels.file_name().unwrap_or_default();
    let mut properties = vec![
        ("kind".to_string(), head.kind().as_str().to_string()),
        ("labels".to_string(), labels.to_string_lossy().into_owned()),
        ("classes".to_string(), head.labels.len().to_string()),
    ];
    if let HeadParams::Action(params) = &head.params {
        properties.push(("frames".to_string(), params.frames.to_string()));
        properties.push(("max_frames".to_string(), params.max_frames.to_string()));
    }
    properties
}

/// The backbone features `head` consumes, by name.
fn select(features: &NamedTensors, head: &Head) -> Result<NamedTensors, Error> {
    head.spec
        .inputs
        .iter()
        .map(|name| {
            features
                .iter()
                .find(|(n, _)| n == name)
                .cloned()
                .ok_or_else(|| Error::Internal(format!("the backbone returned no '{name}'")))
        })
        .collect()
}

fn tensor_metadata(tensor: &TensorInfo) -> TensorMetadata {
    TensorMetadata {
        name: tensor.name.clone(),
        datatype: datatype(&tensor.datatype).to_string(),
        shape: tensor.shape.clone(),
    }
}

/// The protocol's name for an ONNX Runtime element type (as the engine spells it).
fn datatype(ort: &str) -> &str {
    match ort {
        "Float32" => "FP32",
        "Float16" => "FP16",
        "Float64" => "FP64",
        "Bool" => "BOOL",
        "Uint8" => "UINT8",
        "Uint16" => "UINT16",
        "Uint32" => "UINT32",
        "Uint64" => "UINT64",
        "Int8" => "INT8",
        "Int16" => "INT16",
        "Int32" => "INT32",
        "Int64" => "INT64",
        "String" => "BYTES",
        other => other,
    }
}

fn join(values: &[f32]) -> String {
    values
        .iter()
        .map(f32::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_aspect_inputs_take_the_sides_the_preprocessing_gives() {
        let limits = crate::config::Config::for_models("m").limits;
        let keep = ResizePolicy::KeepAspect {
            max_side: 1000,
            multiple: 32,
        };
        let sides = |h, w, resize: &ResizePolicy| check_sides("x", h, w, resize, &limits);
        assert!(sides(512, 1024, &keep).is_ok(), "1000 rounds up to 1024");
        assert!(sides(32, 32, &keep).is_ok());
        for (h, w) in [(500, 1024), (512, 1000), (512, 1056)] {
            let Err(Error::InvalidArgument(message)) = sides(h, w, &keep) else {
                panic!("{h} x {w} was taken");
            };
            assert!(
                message.contains("multiples of 32, at most 1024"),
                "{message}"
            );
        }
        let fixed = ResizePolicy::Letterbox {
            width: 224,
            height: 224,
        };
        assert!(
            sides(500, 1000, &fixed).is_ok(),
            "the declared shape decides"
        );
        let side = limits.max_image_side as usize + 1;
        assert!(
            sides(side, 32, &fixed).is_err(),
            "the image limits hold for all"
        );
    }
}

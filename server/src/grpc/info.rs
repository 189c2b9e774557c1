//! The model set described on the wire (ListModels, GetModel).

use polyhead_proto::v1;

use crate::engine::{SessionWorker, TensorInfo};
use crate::error::Error;
use crate::manifest::{HeadKind, ResizeKind};
use crate::model_set::{Head, ModelSet};

/// The whole set.
pub fn list(models: &ModelSet) -> v1::ListModelsResponse {
    v1::ListModelsResponse {
        model_set: models.name.clone(),
        backbone: Some(backbone(models)),
        heads: models.heads.iter().map(|h| head(models, h)).collect(),
    }
}

/// NOT_FOUND for a model name the set does not hold, naming the ones it does.
pub fn not_served(models: &ModelSet, name: &str) -> Error {
    let names: Vec<&str> = std::iter::once(models.backbone.spec.name.as_str())
        .chain(models.heads.iter().map(|h| h.name()))
        .collect();
    Error::NotFound(format!(
        "no model named '{name}' (models: {})",
        names.join(", ")
    ))
}

/// The model called `name`, if any.
pub fn find(models: &ModelSet, name: &str) -> Option<v1::ModelInfo> {
    if models.backbone.spec.name == name {
        return Some(backbone(models));
    }
    models.head(name).map(|h| head(models, h))
}

fn backbone(models: &ModelSet) -> v1::ModelInfo {
    let spec = &models.backbone.spec;
    let [height, width] = match spec.resize {
        ResizeKind::KeepAspect => [0, 0],
        ResizeKind::Letterbox | ResizeKind::Resize => spec.input_size.unwrap_or([0, 0]),
    };
    v1::ModelInfo {
        name: spec.name.clone(),
        role: v1::ModelRole::Backbone.into(),
        kind: v1::HeadKind::Unspecified.into(),
        version: spec.version.clone(),
        file: spec.file.display().to_string(),
        input_width: width,
        input_height: height,
        labels: Vec::new(),
        execution_provider: models.device.to_string(),
        resize: spec.resize.as_str().to_string(),
        ..tensors(&models.backbone.worker)
    }
}

fn head(models: &ModelSet, head: &Head) -> v1::ModelInfo {
    v1::ModelInfo {
        name: head.name().to_string(),
        role: v1::ModelRole::Head.into(),
        kind: kind(head.kind()).into(),
        version: head.spec.version.clone(),
        file: head.spec.file.display().to_string(),
        input_width: 0,
        input_height: 0,
        labels: head.labels.clone(),
        execution_provider: models.device.to_string(),
        resize: String::new(),
        ..tensors(&head.worker)
    }
}

fn tensors(worker: &SessionWorker) -> v1::ModelInfo {
    v1::ModelInfo {
        inputs: worker.inputs().iter().map(tensor).collect(),
        outputs: worker.outputs().iter().map(tensor).collect(),
        ..v1::ModelInfo::default()
    }
}

fn tensor(t: &TensorInfo) -> v1::TensorInfo {
    v1::TensorInfo {
        name: t.name.clone(),
        shape: t.shape.clone(),
        datatype: t.datatype.clone(),
    }
}

/// The wire enum of a head kind.
pub fn kind(kind: HeadKind) -> v1::HeadKind {
    match kind {
        HeadKind::Detection => v1::HeadKind::Detection,
        HeadKind::Segmentation => v1::HeadKind::Segmentation,
        HeadKind::Action => v1::HeadKind::Action,
    }
}

//! Mirrors of the model set description.

use polyhead_proto::v1;
use serde::Serialize;

/// Mirror of `ListModelsResponse`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ListModelsResponse {
    /// Model set name.
    pub model_set: String,
    /// The backbone.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backbone: Option<ModelInfo>,
    /// The heads.
    pub heads: Vec<ModelInfo>,
}

/// Mirror of `ModelInfo`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelInfo {
    /// Model name.
    pub name: String,
    /// `MODEL_ROLE_*` name.
    pub role: String,
    /// `HEAD_KIND_*` name.
    pub kind: String,
    /// Version.
    pub version: String,
    /// ONNX file, relative to the model set.
    pub file: String,
    /// Backbone input width (0: dynamic).
    pub input_width: u32,
    /// Backbone input height (0: dynamic).
    pub input_height: u32,
    /// Head labels.
    pub labels: Vec<String>,
    /// Execution provider.
    pub execution_provider: String,
    /// Model inputs.
    pub inputs: Vec<TensorInfo>,
    /// Model outputs.
    pub outputs: Vec<TensorInfo>,
    /// Backbone resize policy.
    pub resize: String,
}

/// Mirror of `TensorInfo`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TensorInfo {
    /// Tensor name.
    pub name: String,
    /// Shape, -1 for dynamic dimensions.
    pub shape: Vec<i64>,
    /// Element type.
    pub datatype: String,
}

impl From<&v1::ListModelsResponse> for ListModelsResponse {
    fn from(r: &v1::ListModelsResponse) -> Self {
        Self {
            model_set: r.model_set.clone(),
            backbone: r.backbone.as_ref().map(Into::into),
            heads: r.heads.iter().map(Into::into).collect(),
        }
    }
}

impl From<&v1::ModelInfo> for ModelInfo {
    fn from(m: &v1::ModelInfo) -> Self {
        let tensors = |list: &[v1::TensorInfo]| {
            list.iter()
                .map(|t| TensorInfo {
                    name: t.name.clone(),
                    shape: t.shape.clone(),
                    datatype: t.datatype.clone(),
                })
                .collect()
        };
        Self {
            name: m.name.clone(),
            role: v1::ModelRole::try_from(m.role)
                .map_or_else(|_| m.role.to_string(), |r| r.as_str_name().to_owned()),
            kind: v1::HeadKind::try_from(m.kind)
                .map_or_else(|_| m.kind.to_string(), |k| k.as_str_name().to_owned()),
            version: m.version.clone(),
            file: m.file.clone(),
            input_width: m.input_width,
            input_height: m.input_height,
            labels: m.labels.clone(),
            execution_provider: m.execution_provider.clone(),
            inputs: tensors(&m.inputs),
            outputs: tensors(&m.outputs),
            resize: m.resize.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_enums_by_name() {
        let info = v1::ModelInfo {
            role: v1::ModelRole::Head as i32,
            kind: v1::HeadKind::Segmentation as i32,
            ..Default::default()
        };
        let mirrored = ModelInfo::from(&info);
        assert_eq!(mirrored.role, "MODEL_ROLE_HEAD");
        assert_eq!(mirrored.kind, "HEAD_KIND_SEGMENTATION");
        let unknown = ModelInfo::from(&v1::ModelInfo {
            kind: 42,
            ..Default::default()
        });
        assert_eq!(unknown.kind, "42");
    }
}

//! The model set manifest (`polyhead.toml`): one backbone, its feature maps, and the heads that
//! consume them. Parsing and the checks that need no ONNX Runtime live here; the checks against
//! the ONNX files' declared inputs and outputs are in [`crate::model_set`].

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::heads::action::ActionParams;
use crate::heads::detection::DetectionParams;
use crate::heads::segmentation::SegmentationParams;

/// The manifest's file name inside a model set directory.
pub const MANIFEST_FILE: &str = "polyhead.toml";

/// A parsed manifest.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub name: Option<String>,
    #[serde(default = "default_version")]
    pub version: String,
    pub backbone: BackboneSpec,
    #[serde(default)]
    pub heads: Vec<HeadSpec>,
}

/// The backbone: its file, its input layout and the feature maps it returns.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackboneSpec {
    #[serde(default = "default_backbone_name")]
    pub name: String,
    #[serde(default = "default_version")]
    pub version: String,
    pub file: PathBuf,
    pub input: String,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    pub resize: ResizeKind,
    /// `[height, width]`, for `letterbox` and `resize`.
    pub input_size: Option<[u32; 2]>,
    #[serde(default = "default_pad_value")]
    pub pad_value: u8,
    pub max_side: Option<u32>,
    pub multiple: Option<u32>,
    pub outputs: Vec<FeatureSpec>,
}

/// How images are brought to the backbone's input size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ResizeKind {
    Letterbox,
    Resize,
    KeepAspect,
}

impl ResizeKind {
    /// The manifest spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Letterbox => "letterbox",
            Self::Resize => "resize",
            Self::KeepAspect => "keep-aspect",
        }
    }
}

/// One backbone feature map, `[N, channels, H/stride, W/stride]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureSpec {
    pub name: String,
    pub channels: u32,
    pub stride: u32,
}

/// The kinds of head polyhead knows how to post-process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HeadKind {
    Detection,
    Segmentation,
    Action,
}

impl HeadKind {
    /// The manifest spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Detection => "detection",
            Self::Segmentation => "segmentation",
            Self::Action => "action",
        }
    }
}

/// One head as the manifest declares it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeadSpec {
    pub name: String,
    pub kind: HeadKind,
    pub file: PathBuf,
    pub inputs: Vec<String>,
    pub labels: PathBuf,
    #[serde(default = "default_version")]
    pub version: String,
    #[serde(default)]
    pub params: toml::Table,
}

/// A head's post-processing parameters, typed by its kind.
#[derive(Debug, Clone)]
pub enum HeadParams {
    Detection(DetectionParams),
    Segmentation(SegmentationParams),
    Action(ActionParams),
}

/// A manifest that cannot be used, with the file it came from.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {message}")]
pub struct ManifestError {
    pub file: String,
    pub message: String,
}

impl ManifestError {
    pub(crate) fn new(file: &Path, message: impl Into<String>) -> Self {
        Self {
            file: file.display().to_string(),
            message: message.into(),
        }
    }
}

impl Manifest {
    /// Reads and checks `<dir>/polyhead.toml`: syntax, resize settings, file presence, head inputs
    /// naming backbone outputs, unique names.
    pub fn load(dir: &Path) -> Result<Self, ManifestError> {
        let path = dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            ManifestError::new(&path, format!("cannot read the model set manifest: {e}"))
        })?;
        let manifest: Self =
            toml::from_str(&text).map_err(|e| ManifestError::new(&path, e.to_string()))?;
        manifest
            .check(dir)
            .map_err(|message| ManifestError::new(&path, message))?;
        Ok(manifest)
    }

    /// The set's name: the manifest's, else the directory's.
    pub fn set_name(&self, dir: &Path) -> String {
        self.name.clone().unwrap_or_else(|| {
            dir.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "models".into())
        })
    }

    fn check(&self, dir: &Path) -> Result<(), String> {
        self.backbone.check(dir)?;
        let mut names = vec![self.backbone.name.as_str()];
        for head in &self.heads {
            if names.contains(&head.name.as_str()) {
                return Err(format!("model name '{}' is used twice", head.name));
            }
            names.push(&head.name);
            head.check(dir, &self.backbone)?;
        }
        Ok(())
    }
}

impl BackboneSpec {
    fn check(&self, dir: &Path) -> Result<(), String> {
        require_file(dir, &self.file, "backbone")?;
        if self.outputs.is_empty() {
            return Err("backbone.outputs is empty: name at least one feature map".into());
        }
        if self.std.iter().any(|s| *s <= 0.0) {
            return Err("backbone.std must be positive".into());
        }
        match self.resize {
            ResizeKind::Letterbox | ResizeKind::Resize => match self.input_size {
                Some([h, w]) if h > 0 && w > 0 => Ok(()),
                _ => Err(format!(
                    "backbone.resize = \"{}\" needs input_size = [height, width]",
                    self.resize.as_str()
                )),
            },
            ResizeKind::KeepAspect => match (self.max_side, self.multiple) {
                (Some(side), Some(m)) if side > 0 && m > 0 => Ok(()),
                _ => Err("backbone.resize = \"keep-aspect\" needs max_side and multiple".into()),
            },
        }
    }

    /// The feature map called `name`.
    pub fn feature(&self, name: &str) -> Option<&FeatureSpec> {
        self.outputs.iter().find(|f| f.name == name)
    }
}

impl HeadSpec {
    fn check(&self, dir: &Path, backbone: &BackboneSpec) -> Result<(), String> {
        require_file(dir, &self.file, &format!("head '{}'", self.name))?;
        require_file(dir, &self.labels, &format!("head '{}' labels", self.name))?;
        if self.inputs.is_empty() {
            return Err(format!("head '{}' consumes no backbone output", self.name));
        }
        for input in &self.inputs {
            if backbone.feature(input).is_none() {
                return Err(format!(
                    "head '{}' consumes '{input}', which is not a backbone output (outputs: {})",
                    self.name,
                    backbone
                        .outputs
                        .iter()
                        .map(|f| f.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
        }
        self.params().map(|_| ())
    }

    /// The head's parameters, typed by its kind, with defaults for those left out.
    pub fn params(&self) -> Result<HeadParams, String> {
        let table = toml::Value::Table(self.params.clone());
        let bad = |e: &dyn std::fmt::Display| format!("head '{}' params: {e}", self.name);
        let params = match self.kind {
            HeadKind::Detection => HeadParams::Detection(table.try_into().map_err(|e| bad(&e))?),
            HeadKind::Segmentation => {
                HeadParams::Segmentation(table.try_into().map_err(|e| bad(&e))?)
            }
            HeadKind::Action => HeadParams::Action(table.try_into().map_err(|e| bad(&e))?),
        };
        let valid = match &params {
            HeadParams::Detection(p) => p.validate(),
            HeadParams::Segmentation(p) => p.validate(),
            HeadParams::Action(p) => p.validate(),
        };
        valid.map_err(|e| bad(&e))?;
        Ok(params)
    }
}

fn require_file(dir: &Path, file: &Path, what: &str) -> Result<(), String> {
    let path = dir.join(file);
    if path.is_file() {
        Ok(())
    } else {
        Err(format!("{what} file {} does not exist", path.display()))
    }
}

/// Reads a label file: one label per line, the line number (from 0) is the class id.
pub fn read_labels(path: &Path) -> Result<Vec<String>, ManifestError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ManifestError::new(path, format!("cannot read labels: {e}")))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect())
}

fn default_version() -> String {
    "1".into()
}

fn default_backbone_name() -> String {
    "backbone".into()
}

fn default_pad_value() -> u8 {
    114
}

#[cfg(test)]
mod tests {
    use super::*;

    const MANIFEST: &str = r#"
        name = "unit"
        [backbone]
        file = "backbone.onnx"
        input = "pixel_values"
        mean = [0.5, 0.5, 0.5]
        std = [0.5, 0.5, 0.5]
        resize = "letterbox"
        input_size = [224, 224]
        [[backbone.outputs]]
        name = "stage1"
        channels = 8
        stride = 4
        [[heads]]
        name = "seg"
        kind = "segmentation"
        file = "seg.onnx"
        inputs = ["stage1"]
        labels = "labels.txt"
        [heads.params]
        output_stride = 4
    "#;

    fn model_dir(manifest: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        for file in ["backbone.onnx", "seg.onnx", "labels.txt"] {
            std::fs::write(dir.path().join(file), b"x").expect("write");
        }
        std::fs::write(dir.path().join(MANIFEST_FILE), manifest).expect("write");
        dir
    }

    #[test]
    fn a_valid_manifest_loads() {
        let dir = model_dir(MANIFEST);
        let manifest = Manifest::load(dir.path()).expect("valid");
        assert_eq!(manifest.set_name(dir.path()), "unit");
        assert_eq!(manifest.heads[0].kind, HeadKind::Segmentation);
        assert!(matches!(
            manifest.heads[0].params(),
            Ok(HeadParams::Segmentation(_))
        ));
    }

    #[test]
    fn a_head_input_that_is_not_a_backbone_output_is_named() {
        let dir = model_dir(&MANIFEST.replace(r#"inputs = ["stage1"]"#, r#"inputs = ["p9"]"#));
        let err = Manifest::load(dir.path()).expect_err("p9 is unknown");
        assert!(err.to_string().contains("'p9'"), "{err}");
        assert!(err.to_string().contains("polyhead.toml"), "{err}");
    }

    #[test]
    fn a_missing_file_is_named() {
        let dir = model_dir(MANIFEST);
        std::fs::remove_file(dir.path().join("seg.onnx")).expect("rm");
        let err = Manifest::load(dir.path()).expect_err("missing file");
        assert!(err.to_string().contains("seg.onnx"), "{err}");
    }

    #[test]
    fn letterbox_needs_an_input_size() {
        let dir = model_dir(&MANIFEST.replace("input_size = [224, 224]", ""));
        let err = Manifest::load(dir.path()).expect_err("no size");
        assert!(err.to_string().contains("input_size"), "{err}");
    }

    #[test]
    fn unknown_keys_are_refused() {
        let dir = model_dir(&MANIFEST.replace("name = \"unit\"", "nmae = \"unit\""));
        assert!(Manifest::load(dir.path()).is_err());
    }
}

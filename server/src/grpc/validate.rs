//! Request validation against a manifest alone, without ONNX Runtime: the checks of
//! [`convert`](super::convert) that need only each head's kind, parameters and class count. The
//! fuzz targets drive it with arbitrary messages; it is not part of the serving path.
//!
//! Head names are resolved here rather than by `convert::head`, which needs loaded sessions: a
//! name must be one of the manifest's heads of the right kind, and an empty name picks the only
//! head of that kind.

use std::path::Path;

use polyhead_proto::v1;

use super::convert::{self, HeadEntry};
use crate::config::Limits;
use crate::error::Error;
use crate::manifest::{HeadKind, HeadParams, Manifest, read_labels};

/// What validation needs to know about one head.
#[derive(Debug, Clone)]
pub struct HeadInfo {
    /// The head's name.
    pub name: String,
    /// The head's parameters, as the manifest declares them.
    pub params: HeadParams,
    /// The number of classes (lines of its label file).
    pub classes: usize,
}

impl convert::HeadEntry for HeadInfo {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> HeadKind {
        match self.params {
            HeadParams::Detection(_) => HeadKind::Detection,
            HeadParams::Segmentation(_) => HeadKind::Segmentation,
            HeadParams::Action(_) => HeadKind::Action,
        }
    }
}

/// Validates requests as the server would for a model set with these heads and limits.
#[derive(Debug, Clone)]
pub struct Validator {
    heads: Vec<HeadInfo>,
    limits: Limits,
}

impl Validator {
    /// A validator for `manifest`'s heads, whose label files are in `labels_dir`.
    pub fn from_manifest(
        manifest: &Manifest,
        labels_dir: &Path,
        limits: Limits,
    ) -> Result<Self, String> {
        let heads = manifest
            .heads
            .iter()
            .map(|spec| {
                let labels = read_labels(&labels_dir.join(&spec.labels));
                Ok(HeadInfo {
                    name: spec.name.clone(),
                    params: spec.params()?,
                    classes: labels.map_err(|e| e.to_string())?.len(),
                })
            })
            .collect::<Result<_, String>>()?;
        Ok(Self { heads, limits })
    }

    /// Validates a Detect request.
    pub fn detect(&self, request: v1::DetectRequest) -> Result<(), Error> {
        let v1::DetectRequest {
            image,
            options,
            head,
        } = request;
        let head = self.head(&head, HeadKind::Detection)?;
        self.head_options(head, options, None)?;
        convert::image(image).map(drop)
    }

    /// Validates an Analyze request.
    pub fn analyze(&self, request: v1::AnalyzeRequest) -> Result<(), Error> {
        let v1::AnalyzeRequest {
            image,
            heads,
            detect_options,
            segment_options,
        } = request;
        if heads.is_empty() {
            return Err(Error::InvalidArgument("heads is empty".into()));
        }
        for (i, name) in heads.iter().enumerate() {
            if heads[..i].contains(name) {
                return Err(Error::InvalidArgument(format!(
                    "head '{name}' is listed twice"
                )));
            }
            let head = self.named(name)?;
            if head.kind() == HeadKind::Action {
                return Err(Error::InvalidArgument(format!(
                    "head '{name}' is an action head"
                )));
            }
            self.head_options(head, detect_options.clone(), segment_options.clone())?;
        }
        convert::image(image).map(drop)
    }

    /// Validates a RecognizeAction request.
    pub fn recognize_action(&self, request: v1::RecognizeActionRequest) -> Result<(), Error> {
        let v1::RecognizeActionRequest {
            clip,
            options,
            head,
        } = request;
        let head = self.head(&head, HeadKind::Action)?;
        let HeadParams::Action(params) = &head.params else {
            return Err(Error::Internal("not an action head".into()));
        };
        convert::action_options(options, params, &self.limits)?;
        convert::clip_input(clip).map(drop)
    }

    fn head_options(
        &self,
        head: &HeadInfo,
        detect: Option<v1::DetectOptions>,
        segment: Option<v1::SegmentOptions>,
    ) -> Result<(), Error> {
        match &head.params {
            HeadParams::Detection(params) => {
                convert::detection_options(detect, params, head.classes).map(drop)
            }
            HeadParams::Segmentation(_) => {
                let class_ids = segment.unwrap_or_default().class_ids;
                convert::class_filter(class_ids, head.classes).map(drop)
            }
            HeadParams::Action(_) => Ok(()),
        }
    }

    fn head(&self, name: &str, kind: HeadKind) -> Result<&HeadInfo, Error> {
        convert::pick(&self.heads, name, kind)
    }

    fn named(&self, name: &str) -> Result<&HeadInfo, Error> {
        convert::find(&self.heads, name)
    }
}

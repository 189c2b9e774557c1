//! proto <-> domain. Requests are validated into the pipeline's types here (proto stops at this
//! file); results and timings are turned back into messages.

use std::sync::Arc;
use std::time::Duration;

use polyhead_proto::v1;

use crate::error::Error;
use crate::heads::action::ActionParams;
use crate::heads::detection::{DetectOptions, DetectionParams};
use crate::heads::{BoxXyxy, ClassScore, Detection, RleMask};
use crate::manifest::{HeadKind, HeadParams};
use crate::model_set::{Head, ModelSet};
use crate::pipeline::{
    Actions, Detections, ExtractedFeatures, HeadOptions, HeadTask, HeadTiming, ImageInput,
    Segmentation, Timings,
};

/// Labels an action request gets when it asks for none (`top_k` 0), within --max-top-k.
const DEFAULT_TOP_K: u32 = 5;

fn invalid(message: impl Into<String>) -> Error {
    Error::InvalidArgument(message.into())
}

/// Validates the image of a request.
pub fn image(image: Option<v1::Image>) -> Result<ImageInput, Error> {
    let source = image.and_then(|i| i.source).ok_or_else(|| {
        invalid("image is required: set image.encoded, image.raw or image.feature_handle")
    })?;
    match source {
        v1::image::Source::Encoded(bytes) if bytes.is_empty() => {
            Err(invalid("image.encoded is empty"))
        }
        v1::image::Source::Encoded(bytes) => Ok(ImageInput::Encoded(bytes)),
        v1::image::Source::Raw(v1::RawImage { width, height, rgb }) => {
            Ok(ImageInput::Raw { width, height, rgb })
        }
        v1::image::Source::FeatureHandle(handle) if handle.is_empty() => {
            Err(invalid("image.feature_handle is empty"))
        }
        v1::image::Source::FeatureHandle(handle) => Ok(ImageInput::Handle(handle)),
    }
}

/// The response to ExtractFeatures.
pub fn extracted_features(extracted: ExtractedFeatures) -> v1::ExtractFeaturesResponse {
    let ExtractedFeatures {
        handle,
        expires_at,
        image_width,
        image_height,
        timings: t,
    } = extracted;
    let since_epoch = expires_at
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    v1::ExtractFeaturesResponse {
        handle,
        expires_at_unix_ms: i64::try_from(since_epoch.as_millis()).unwrap_or(i64::MAX),
        image_width,
        image_height,
        timings: Some(timings(t)),
    }
}

/// Finds the head a request names, of the kind the RPC serves. An empty name picks the set's
/// only head of that kind.
pub fn head(models: &ModelSet, name: &str, kind: HeadKind) -> Result<Arc<Head>, Error> {
    pick(&models.heads, name, kind).map(Arc::clone)
}

/// What choosing a head needs to know of it: a loaded head, or a manifest's description of one.
pub(super) trait HeadEntry {
    fn name(&self) -> &str;
    fn kind(&self) -> HeadKind;
}

impl HeadEntry for Arc<Head> {
    fn name(&self) -> &str {
        Head::name(self)
    }

    fn kind(&self) -> HeadKind {
        Head::kind(self)
    }
}

/// The head of `kind` called `name` among `heads`; an empty name picks the only head of that
/// kind.
pub(super) fn pick<'a, H: HeadEntry>(
    heads: &'a [H],
    name: &str,
    kind: HeadKind,
) -> Result<&'a H, Error> {
    let of_kind: Vec<&H> = heads.iter().filter(|h| h.kind() == kind).collect();
    if name.is_empty() {
        return match of_kind.as_slice() {
            [only] => Ok(only),
            [] => Err(invalid(format!(
                "the model set has no {} head",
                kind.as_str()
            ))),
            many => Err(invalid(format!(
                "the model set has {} {} heads ({}): name one in `head`",
                many.len(),
                kind.as_str(),
                names(many.iter().copied())
            ))),
        };
    }
    let head = find(heads, name)?;
    if head.kind() != kind {
        return Err(invalid(format!(
            "head '{name}' is a {} head; this call needs a {} head",
            head.kind().as_str(),
            kind.as_str()
        )));
    }
    Ok(head)
}

/// The head called `name` among `heads`; NOT_FOUND names the heads there are, as GetModel and
/// the OIP calls do for a model they do not serve.
pub(super) fn find<'a, H: HeadEntry>(heads: &'a [H], name: &str) -> Result<&'a H, Error> {
    heads.iter().find(|h| h.name() == name).ok_or_else(|| {
        Error::NotFound(format!(
            "unknown head '{name}' (heads: {})",
            names(heads.iter())
        ))
    })
}

fn names<'a, H: HeadEntry + 'a>(heads: impl Iterator<Item = &'a H>) -> String {
    heads.map(|h| h.name()).collect::<Vec<_>>().join(", ")
}

/// Validates detection options against the head's defaults and classes.
pub fn detect_options(
    options: Option<v1::DetectOptions>,
    head: &Head,
) -> Result<HeadOptions, Error> {
    let HeadParams::Detection(params) = &head.params else {
        return Err(Error::Internal(format!(
            "head '{}' is not a detection head",
            head.name()
        )));
    };
    detection_options(options, params, head.labels.len()).map(HeadOptions::Detection)
}

/// Validates detection options against a detection head's parameters and class count.
pub(super) fn detection_options(
    options: Option<v1::DetectOptions>,
    params: &DetectionParams,
    classes: usize,
) -> Result<DetectOptions, Error> {
    let v1::DetectOptions {
        score_threshold,
        iou_threshold,
        max_detections,
        class_ids,
        masks,
    } = options.unwrap_or_default();
    let mut out = DetectOptions::defaults(params);
    if let Some(t) = score_threshold {
        out.score_threshold = unit_interval(t, "score_threshold", true)?;
    }
    if let Some(t) = iou_threshold {
        out.iou_threshold = unit_interval(t, "iou_threshold", false)?;
    }
    if max_detections > 0 {
        out.max_detections = capped_max_detections(max_detections, params)?;
    }
    out.class_filter = class_filter(class_ids, classes)?;
    out.masks = masks;
    Ok(out)
}

fn capped_max_detections(n: u32, params: &DetectionParams) -> Result<usize, Error> {
    let cap = params.pre_nms_top_k.max(params.max_detections);
    if n as usize > cap {
        return Err(invalid(format!(
            "max_detections is {n}; this head returns at most {cap}"
        )));
    }
    Ok(n as usize)
}

fn unit_interval(v: f32, field: &str, zero_ok: bool) -> Result<f32, Error> {
    let ok = if zero_ok {
        (0.0..=1.0).contains(&v)
    } else {
        v > 0.0 && v <= 1.0
    };
    if ok {
        Ok(v)
    } else {
        let range = if zero_ok { "[0, 1]" } else { "(0, 1]" };
        Err(invalid(format!("{field} is {v}; it must be in {range}")))
    }
}

/// Checks class ids against the head's class count; an empty list means "all classes".
pub(super) fn class_filter(ids: Vec<u32>, classes: usize) -> Result<Option<Vec<u32>>, Error> {
    if let Some(bad) = ids.iter().find(|&&id| id as usize >= classes) {
        return Err(invalid(format!(
            "class id {bad} does not exist (this head has classes 0..{})",
            classes.saturating_sub(1)
        )));
    }
    Ok((!ids.is_empty()).then_some(ids))
}

/// Validates segmentation options.
pub fn segment_options(
    options: Option<v1::SegmentOptions>,
    head: &Head,
) -> Result<HeadOptions, Error> {
    let v1::SegmentOptions { class_ids } = options.unwrap_or_default();
    Ok(HeadOptions::Segmentation {
        class_filter: class_filter(class_ids, head.labels.len())?,
    })
}

/// Validates the heads of an Analyze call, in the order given.
pub fn analyze_tasks(
    models: &ModelSet,
    heads: Vec<String>,
    detect: Option<v1::DetectOptions>,
    segment: Option<v1::SegmentOptions>,
) -> Result<Vec<HeadTask>, Error> {
    if heads.is_empty() {
        return Err(invalid(format!(
            "heads is empty: name at least one of {}",
            names(models.heads.iter().filter(|h| h.kind() != HeadKind::Action))
        )));
    }
    let mut tasks: Vec<HeadTask> = Vec::with_capacity(heads.len());
    for name in heads {
        if tasks.iter().any(|t| t.head.name() == name) {
            return Err(invalid(format!("head '{name}' is listed twice")));
        }
        let head = find(&models.heads, &name)?;
        let options = match head.kind() {
            HeadKind::Detection => detect_options(detect.clone(), head)?,
            HeadKind::Segmentation => segment_options(segment.clone(), head)?,
            HeadKind::Action => {
                return Err(invalid(format!(
                    "head '{name}' is an action head; it takes clips: use RecognizeAction"
                )));
            }
        };
        tasks.push(HeadTask {
            head: Arc::clone(head),
            options,
        });
    }
    Ok(tasks)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Stage timings as sent on the wire.
pub fn timings(t: Timings) -> v1::Timings {
    v1::Timings {
        decode_ms: ms(t.decode),
        preprocess_ms: ms(t.preprocess),
        backbone_ms: ms(t.backbone),
        heads: t.heads.into_iter().map(head_timing).collect(),
        postprocess_ms: ms(t.postprocess),
        total_ms: ms(t.total),
        backbone_passes: t.backbone_passes,
        backbone_images: t.backbone_images,
        features_cached: t.features_cached,
        feature_memory: t.feature_memory.map(|m| m.to_string()).unwrap_or_default(),
    }
}

fn head_timing(t: HeadTiming) -> v1::HeadTiming {
    v1::HeadTiming {
        head: t.head,
        inference_ms: ms(t.inference),
        postprocess_ms: ms(t.postprocess),
    }
}

fn label(labels: &[String], class_id: u32) -> String {
    labels.get(class_id as usize).cloned().unwrap_or_default()
}

/// Detections as sent on the wire.
pub fn detections(d: Detections, labels: &[String]) -> v1::Detections {
    v1::Detections {
        detections: d.items.into_iter().map(|i| detection(i, labels)).collect(),
        image_width: d.image_width,
        image_height: d.image_height,
    }
}

fn detection(d: Detection, labels: &[String]) -> v1::Detection {
    let Detection {
        class_id,
        score,
        bbox: BoxXyxy { x1, y1, x2, y2 },
        mask,
    } = d;
    v1::Detection {
        class_id,
        label: label(labels, class_id),
        score,
        r#box: Some(v1::Box { x1, y1, x2, y2 }),
        mask: mask.map(
            |RleMask {
                 height,
                 width,
                 counts,
             }| v1::RleMask {
                size: vec![height, width],
                counts,
            },
        ),
    }
}

/// A label map as sent on the wire.
pub fn segmentation(s: Segmentation, labels: &[String]) -> v1::Segmentation {
    v1::Segmentation {
        label_map_png: s.png.into(),
        width: s.width,
        height: s.height,
        class_names: labels.to_vec(),
        present: s
            .present
            .into_iter()
            .map(|ClassScore { class_id, score }| v1::ClassCoverage {
                class_id,
                label: label(labels, class_id),
                fraction: score,
            })
            .collect(),
    }
}

/// Top actions as sent on the wire.
pub fn actions(a: Actions, labels: &[String]) -> v1::Actions {
    v1::Actions {
        top: a
            .top
            .into_iter()
            .map(|ClassScore { class_id, score }| v1::ActionScore {
                class_id,
                label: label(labels, class_id),
                score,
            })
            .collect(),
        frame_timestamps: a.frame_timestamps,
    }
}

/// Validates an action-recognition request against the head's and the server's limits.
pub fn action_request(
    models: &ModelSet,
    limits: &crate::config::Limits,
    request: v1::RecognizeActionRequest,
) -> Result<crate::pipeline::ActionRequest, Error> {
    let v1::RecognizeActionRequest {
        clip,
        options,
        head: name,
    } = request;
    let head = head(models, &name, HeadKind::Action)?;
    let HeadParams::Action(params) = &head.params else {
        return Err(Error::Internal(format!(
            "head '{}' is not an action head",
            head.name()
        )));
    };
    let ActionChoice {
        num_frames,
        frame_stride,
        top_k,
    } = action_options(options, params, limits)?;
    Ok(crate::pipeline::ActionRequest {
        clip: clip_input(clip)?,
        head,
        num_frames,
        frame_stride,
        top_k,
    })
}

/// An action request's sampling and label count, validated.
pub(super) struct ActionChoice {
    pub num_frames: usize,
    pub frame_stride: Option<usize>,
    pub top_k: usize,
}

/// Validates action options against the head's parameters and the server's limits.
pub(super) fn action_options(
    options: Option<v1::ActionOptions>,
    params: &ActionParams,
    limits: &crate::config::Limits,
) -> Result<ActionChoice, Error> {
    let v1::ActionOptions {
        num_frames,
        frame_stride,
        top_k,
    } = options.unwrap_or_default();
    let num_frames = params
        .clip_frames(num_frames, limits.max_frames, "num_frames")
        .map_err(invalid)?;
    let top_k = if top_k == 0 {
        DEFAULT_TOP_K.min(limits.max_top_k)
    } else {
        top_k
    };
    if top_k > limits.max_top_k {
        return Err(invalid(format!(
            "top_k is {top_k}; the limit is {}",
            limits.max_top_k
        )));
    }
    Ok(ActionChoice {
        num_frames: num_frames as usize,
        frame_stride: (frame_stride > 0).then_some(frame_stride as usize),
        top_k: top_k as usize,
    })
}

/// Validates the clip of an action request.
pub(super) fn clip_input(
    clip: Option<v1::recognize_action_request::Clip>,
) -> Result<crate::pipeline::ClipInput, Error> {
    use crate::pipeline::ClipInput;
    use v1::recognize_action_request::Clip;
    match clip.ok_or_else(|| invalid("clip is required: set video or frames"))? {
        Clip::Video(bytes) if bytes.is_empty() => Err(invalid("video is empty")),
        Clip::Video(bytes) => Ok(ClipInput::Video(bytes)),
        Clip::Frames(v1::EncodedFrames { frames, fps }) => {
            if frames.is_empty() {
                return Err(invalid("frames is empty"));
            }
            if !(fps >= 0.0 && fps.is_finite()) {
                return Err(invalid(format!(
                    "fps is {fps}; it must be a positive number"
                )));
            }
            let fps = if fps == 0.0 { 1.0 } else { f64::from(fps) };
            Ok(ClipInput::Frames { frames, fps })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_top_k_stays_within_the_configured_limit() {
        let params = ActionParams::default();
        let mut limits = crate::config::Config::for_models("m").limits;
        let asked = |top_k| v1::ActionOptions {
            top_k,
            ..Default::default()
        };
        let top_k = |limits: &crate::config::Limits, wanted| {
            action_options(Some(asked(wanted)), &params, limits).map(|choice| choice.top_k)
        };
        assert_eq!(top_k(&limits, 0).expect("default"), 5);
        limits.max_top_k = 3;
        assert_eq!(top_k(&limits, 0).expect("default under a lower limit"), 3);
        assert_eq!(top_k(&limits, 3).expect("at the limit"), 3);
        let err = top_k(&limits, 4).expect_err("over the limit");
        assert!(err.to_string().contains("the limit is 3"), "{err}");
    }
}

//! Detection head: anchor-free boxes with instance masks, decoded into original-image detections.
//!
//! The head scores every (anchor point, class) pair and regresses the distances from the anchor
//! point to the four box sides; instance masks are linear combinations of shared prototypes. See
//! the detection section of the model contract for the tensor layout.

use std::ops::Range;

use ndarray::{Array2, ArrayView1, ArrayView2, ArrayView3, Axis, Slice};
use serde::{Deserialize, Serialize};

use super::bilinear::{Coord, Tap, axis_taps};
use super::nms::{Candidate, nms};
use super::rle::RunBuilder;
use super::{BoxXyxy, Detection, HeadError, RleMask, class_mask};
use crate::geometry::Geometry;

/// The `[heads.params]` of a detection head.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DetectionParams {
    /// Strides of the pyramid levels, in the order their anchors are enumerated.
    pub strides: Vec<u32>,
    /// Stride of the mask prototypes, in backbone-input pixels.
    pub proto_stride: u32,
    /// Default minimum class score of a detection.
    pub score_threshold: f32,
    /// Default IoU above which a lower-scored box of the same class is suppressed.
    pub iou_threshold: f32,
    /// Default maximum number of detections.
    pub max_detections: usize,
    /// Mask probability above which a pixel belongs to the instance.
    pub mask_threshold: f32,
    /// Number of best (anchor, class) pairs that enter non-maximum suppression.
    pub pre_nms_top_k: usize,
}

impl Default for DetectionParams {
    fn default() -> Self {
        Self {
            strides: vec![8, 16, 32],
            proto_stride: 4,
            score_threshold: 0.3,
            iou_threshold: 0.5,
            max_detections: 100,
            mask_threshold: 0.5,
            pre_nms_top_k: 1000,
        }
    }
}

impl DetectionParams {
    /// Checks that strides are positive and thresholds and limits are in range.
    pub fn validate(&self) -> Result<(), HeadError> {
        let invalid = |msg: &str| Err(HeadError::InvalidParams(format!("detection: {msg}")));
        let unit = |v: f32| (0.0..=1.0).contains(&v);
        if self.strides.is_empty() || self.strides.contains(&0) {
            return invalid("`strides` must be a non-empty list of positive integers");
        }
        if self.proto_stride == 0 {
            return invalid("`proto_stride` must be positive");
        }
        if !unit(self.score_threshold) || !unit(self.iou_threshold) || !unit(self.mask_threshold) {
            return invalid("thresholds must lie in [0, 1]");
        }
        if self.max_detections == 0 || self.pre_nms_top_k == 0 {
            return invalid("`max_detections` and `pre_nms_top_k` must be positive");
        }
        Ok(())
    }
}

/// Per-request options of the detection head.
#[derive(Debug, Clone, PartialEq)]
pub struct DetectOptions {
    /// Minimum class score of a detection (inclusive).
    pub score_threshold: f32,
    /// IoU above which a lower-scored box of the same class is suppressed.
    pub iou_threshold: f32,
    /// Maximum number of detections returned.
    pub max_detections: usize,
    /// Only these class ids are returned; `None` or an empty list allows every class.
    pub class_filter: Option<Vec<u32>>,
    /// Whether instance masks are computed.
    pub masks: bool,
    /// Most pixels the masks of one image may cover in all, counted over their boxes: a mask
    /// costs work for every pixel of its box. Not the client's to choose: the pipeline sets it
    /// from `--max-mask-pixels` for every head it runs.
    pub max_mask_pixels: u64,
}

impl DetectOptions {
    /// The head's defaults: its thresholds and limit, every class, no masks (and no mask limit
    /// until the pipeline sets the server's).
    pub fn defaults(params: &DetectionParams) -> Self {
        Self {
            score_threshold: params.score_threshold,
            iou_threshold: params.iou_threshold,
            max_detections: params.max_detections,
            class_filter: None,
            masks: false,
            max_mask_pixels: u64::MAX,
        }
    }
}

/// Turns the head outputs of one image into detections on the original image.
///
/// Masks whose boxes cover more than `opts.max_mask_pixels` in all are refused with
/// [`HeadError::MaskPixels`] before any is computed.
///
/// `scores` is `[A, C]`, `boxes` `[A, 4]`, `coeffs` `[A, K]` and `protos` `[K, Hp, Wp]`, where
/// `A = Σ (H_in / s)·(W_in / s)` over the strides (integer division, input size from `geo`) and
/// `Hp = H_in / proto_stride`, `Wp = W_in / proto_stride`. Detections come by decreasing score.
pub fn postprocess(
    scores: ArrayView2<'_, f32>,
    boxes: ArrayView2<'_, f32>,
    coeffs: ArrayView2<'_, f32>,
    protos: ArrayView3<'_, f32>,
    geo: &Geometry,
    params: &DetectionParams,
    opts: &DetectOptions,
) -> Result<Vec<Detection>, HeadError> {
    params.validate()?;
    let levels = check_shapes(scores, boxes, coeffs, protos, geo, params)?;
    let allowed = class_mask(opts.class_filter.as_deref(), scores.ncols())?;
    let pairs = gather(scores, &allowed, opts.score_threshold, params.pre_nms_top_k);
    let mut cands: Vec<Candidate> = pairs
        .into_iter()
        .filter_map(|pair| candidate(pair, boxes, &levels, geo))
        .collect();
    let kept = nms(&mut cands, opts.iou_threshold, opts.max_detections);
    if opts.masks {
        check_mask_pixels(&kept, geo, opts.max_mask_pixels)?;
    }
    let detections = kept
        .into_iter()
        .map(|c| Detection {
            class_id: c.class_id,
            score: c.score,
            bbox: c.bbox,
            mask: opts
                .masks
                .then(|| instance_mask(coeffs.row(c.index), protos, &c.bbox, geo, params)),
        })
        .collect();
    Ok(detections)
}

/// One pyramid level's anchor grid.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Level {
    stride: u32,
    width: usize,
    /// Index of the level's first anchor.
    start: usize,
    /// One past the index of the level's last anchor.
    end: usize,
}

/// The anchor grids of all levels for an input of `geo`'s size.
fn levels(geo: &Geometry, strides: &[u32]) -> Vec<Level> {
    let mut start = 0;
    strides
        .iter()
        .map(|&stride| {
            let width = (geo.input_width / stride) as usize;
            let height = (geo.input_height / stride) as usize;
            let level = Level {
                stride,
                width,
                start,
                end: start + width * height,
            };
            start = level.end;
            level
        })
        .collect()
}

/// Validates every output's shape; returns the anchor grids.
fn check_shapes(
    scores: ArrayView2<'_, f32>,
    boxes: ArrayView2<'_, f32>,
    coeffs: ArrayView2<'_, f32>,
    protos: ArrayView3<'_, f32>,
    geo: &Geometry,
    params: &DetectionParams,
) -> Result<Vec<Level>, HeadError> {
    let levels = levels(geo, &params.strides);
    let anchors = levels.last().map_or(0, |l| l.end);
    let k = coeffs.ncols();
    if scores.nrows() != anchors {
        let expected = format!("[{anchors}, C] for strides {:?}", params.strides);
        return Err(HeadError::shape("scores", scores.shape(), expected));
    }
    if boxes.shape() != [anchors, 4] {
        return Err(HeadError::shape(
            "boxes",
            boxes.shape(),
            format!("[{anchors}, 4]"),
        ));
    }
    if coeffs.nrows() != anchors {
        return Err(HeadError::shape(
            "mask_coeffs",
            coeffs.shape(),
            format!("[{anchors}, K]"),
        ));
    }
    let hp = (geo.input_height / params.proto_stride) as usize;
    let wp = (geo.input_width / params.proto_stride) as usize;
    if protos.shape() != [k, hp, wp] || hp == 0 || wp == 0 {
        let expected = format!("[{k}, {hp}, {wp}] (non-empty)");
        return Err(HeadError::shape("mask_protos", protos.shape(), expected));
    }
    Ok(levels)
}

/// An (anchor, class) pair that passed the score threshold.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Pair {
    anchor: usize,
    class_id: u32,
    score: f32,
}

/// The `top_k` best allowed pairs scoring at least `threshold`, by decreasing score.
fn gather(
    scores: ArrayView2<'_, f32>,
    allowed: &[bool],
    threshold: f32,
    top_k: usize,
) -> Vec<Pair> {
    let mut pairs = Vec::new();
    for (anchor, row) in scores.outer_iter().enumerate() {
        for (class_id, (&score, &ok)) in row.iter().zip(allowed).enumerate() {
            if ok && score >= threshold {
                pairs.push(Pair {
                    anchor,
                    class_id: class_id as u32,
                    score,
                });
            }
        }
    }
    let order = |a: &Pair, b: &Pair| {
        (b.score.total_cmp(&a.score))
            .then(a.anchor.cmp(&b.anchor))
            .then(a.class_id.cmp(&b.class_id))
    };
    if pairs.len() > top_k {
        pairs.select_nth_unstable_by(top_k, order);
        pairs.truncate(top_k);
    }
    pairs.sort_unstable_by(order);
    pairs
}

/// The anchor point `(cx, cy)` of `anchor` in input pixels and its level's stride.
fn anchor_point(levels: &[Level], anchor: usize) -> Option<(f32, f32, f32)> {
    let level = levels.iter().find(|l| (l.start..l.end).contains(&anchor))?;
    let cell = anchor - level.start;
    let (x, y) = (cell % level.width, cell / level.width);
    let stride = level.stride as f32;
    Some(((x as f32 + 0.5) * stride, (y as f32 + 0.5) * stride, stride))
}

/// Decodes a pair's box, maps it to the original image and clips it; `None` when it is empty.
fn candidate(
    pair: Pair,
    boxes: ArrayView2<'_, f32>,
    levels: &[Level],
    geo: &Geometry,
) -> Option<Candidate> {
    let (cx, cy, s) = anchor_point(levels, pair.anchor)?;
    let d = boxes.row(pair.anchor);
    let (x1, y1) = geo.to_original(cx - d[0] * s, cy - d[1] * s);
    let (x2, y2) = geo.to_original(cx + d[2] * s, cy + d[3] * s);
    if [x1, y1, x2, y2].iter().any(|v| v.is_nan()) {
        return None;
    }
    let (w, h) = (geo.orig_width as f32, geo.orig_height as f32);
    let bbox = BoxXyxy {
        x1: x1.max(0.0).min(w),
        y1: y1.max(0.0).min(h),
        x2: x2.max(0.0).min(w),
        y2: y2.max(0.0).min(h),
    };
    (bbox.x2 > bbox.x1 && bbox.y2 > bbox.y1).then_some(Candidate {
        class_id: pair.class_id,
        score: pair.score,
        bbox,
        index: pair.anchor,
    })
}

/// The pixels `i` of an axis of `len` pixels whose centres `i + 0.5` lie in `[lo, hi)`.
fn pixel_span(lo: f32, hi: f32, len: u32) -> Range<u32> {
    let to_index = |v: f32| (v - 0.5).ceil().max(0.0).min(len as f32) as u32;
    let start = to_index(lo);
    start..to_index(hi).max(start)
}

/// Refuses masks for `kept` when their boxes cover more than `limit` pixels in all.
fn check_mask_pixels(kept: &[Candidate], geo: &Geometry, limit: u64) -> Result<(), HeadError> {
    let box_pixels = |c: &Candidate| {
        let cols = pixel_span(c.bbox.x1, c.bbox.x2, geo.orig_width);
        let rows = pixel_span(c.bbox.y1, c.bbox.y2, geo.orig_height);
        u64::from(cols.end - cols.start) * u64::from(rows.end - rows.start)
    };
    let pixels: u64 = kept.iter().map(box_pixels).sum();
    if pixels > limit {
        return Err(HeadError::MaskPixels {
            detections: kept.len(),
            pixels,
            limit,
        });
    }
    Ok(())
}

/// The instance mask of a detection over the whole original image, cropped to its box.
fn instance_mask(
    coeffs: ArrayView1<'_, f32>,
    protos: ArrayView3<'_, f32>,
    bbox: &BoxXyxy,
    geo: &Geometry,
    params: &DetectionParams,
) -> RleMask {
    let (height, width) = (geo.orig_height, geo.orig_width);
    let cols = pixel_span(bbox.x1, bbox.x2, width);
    let rows = pixel_span(bbox.y1, bbox.y2, height);
    let (_, hp, wp) = protos.dim();
    let x_taps = axis_taps(geo, Coord::X, cols.clone(), params.proto_stride, wp);
    let y_taps = axis_taps(geo, Coord::Y, rows.clone(), params.proto_stride, hp);
    let window = LogitWindow::new(coeffs, protos, &x_taps, &y_taps);
    let mut runs = RunBuilder::new();
    let column = u64::from(height);
    runs.push(false, u64::from(cols.start) * column);
    for tx in &x_taps {
        runs.push(false, u64::from(rows.start));
        for ty in &y_taps {
            runs.push(window.probability(tx, ty) > params.mask_threshold, 1);
        }
        runs.push(false, u64::from(height - rows.end));
    }
    runs.push(false, u64::from(width - cols.end) * column);
    RleMask {
        height,
        width,
        counts: runs.finish(),
    }
}

/// The mask logits `Σ_k coeff_k · proto_k` over the prototype cells a set of taps reads.
struct LogitWindow {
    logits: Array2<f32>,
    x0: usize,
    y0: usize,
}

impl LogitWindow {
    fn new(
        coeffs: ArrayView1<'_, f32>,
        protos: ArrayView3<'_, f32>,
        x_taps: &[Tap],
        y_taps: &[Tap],
    ) -> Self {
        let (xs, ys) = (cell_range(x_taps), cell_range(y_taps));
        let (x0, y0) = (xs.start, ys.start);
        let crop = protos
            .slice_axis_move(Axis(1), Slice::from(ys))
            .slice_axis_move(Axis(2), Slice::from(xs));
        let mut logits = Array2::zeros((crop.dim().1, crop.dim().2));
        for (&c, proto) in coeffs.iter().zip(crop.outer_iter()) {
            logits.scaled_add(c, &proto);
        }
        Self { logits, x0, y0 }
    }

    /// The sigmoid of the bilinearly sampled logit at the taps.
    fn probability(&self, tx: &Tap, ty: &Tap) -> f32 {
        let (tx, ty) = (tx.shifted(self.x0), ty.shifted(self.y0));
        let at = |y: usize, x: usize| self.logits[[y, x]];
        let top = tx.lerp(at(ty.i0, tx.i0), at(ty.i0, tx.i1));
        let bottom = tx.lerp(at(ty.i1, tx.i0), at(ty.i1, tx.i1));
        let logit = ty.lerp(top, bottom);
        1.0 / (1.0 + (-logit).exp())
    }
}

/// The smallest range of cells that holds every tap's two samples (empty for no taps).
fn cell_range(taps: &[Tap]) -> Range<usize> {
    let lo = taps.iter().map(|t| t.i0).min().unwrap_or(0);
    let hi = taps.iter().map(|t| t.i1 + 1).max().unwrap_or(0);
    lo..hi.max(lo)
}

#[cfg(test)]
mod tests;

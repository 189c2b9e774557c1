//! Segmentation head: class logits at a fixed stride, resampled into a label map of the original image.
//!
//! Every original pixel's centre is mapped into the logit grid through the geometry, each allowed
//! class's logit is sampled bilinearly there (clamped at the edges) and the best class wins, the
//! lowest class id on ties. The map can be written as a grayscale PNG and summarised per class.

use image::codecs::png::PngEncoder;
use image::{ExtendedColorType, ImageEncoder};
use ndarray::{ArrayView3, Axis};
use serde::{Deserialize, Serialize};

use super::bilinear::{Coord, Tap, axis_taps};
use super::{ClassScore, HeadError, LabelMap, class_mask};
use crate::geometry::Geometry;

/// Largest number of classes a [`LabelMap`] can hold.
const MAX_CLASSES: usize = u16::MAX as usize + 1;

/// The `[heads.params]` of a segmentation head.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SegmentationParams {
    /// Stride of the logit map, in backbone-input pixels.
    pub output_stride: u32,
}

impl Default for SegmentationParams {
    fn default() -> Self {
        Self { output_stride: 4 }
    }
}

impl SegmentationParams {
    /// Checks that the stride is positive.
    pub fn validate(&self) -> Result<(), HeadError> {
        if self.output_stride == 0 {
            return Err(HeadError::InvalidParams(
                "segmentation: `output_stride` must be positive".into(),
            ));
        }
        Ok(())
    }
}

/// Turns the `[C, H_in / output_stride, W_in / output_stride]` logits of one image into a label map
/// of the original image.
///
/// Only the classes in `class_filter` compete for each pixel (`None` or an empty list: all).
pub fn postprocess(
    logits: ArrayView3<'_, f32>,
    geo: &Geometry,
    params: &SegmentationParams,
    class_filter: Option<&[u32]>,
) -> Result<LabelMap, HeadError> {
    params.validate()?;
    check_shape(logits, geo, params)?;
    let (num_classes, hs, ws) = logits.dim();
    let classes: Vec<u16> = class_mask(class_filter, num_classes)?
        .iter()
        .enumerate()
        .filter(|(_, allowed)| **allowed)
        .map(|(c, _)| c as u16)
        .collect();
    let (width, height) = (geo.orig_width, geo.orig_height);
    let x_taps = axis_taps(geo, Coord::X, 0..width, params.output_stride, ws);
    let y_taps = axis_taps(geo, Coord::Y, 0..height, params.output_stride, hs);
    let mut labels = vec![0u16; x_taps.len() * y_taps.len()];
    let grid = Grid::new(logits, &classes);
    let mut span = Span::new(classes.len());
    let rows = labels.chunks_mut(x_taps.len().max(1));
    for (ty, labels) in y_taps.iter().zip(rows) {
        label_row(&grid, &classes, ty, &x_taps, labels, &mut span);
    }
    Ok(LabelMap {
        width,
        height,
        labels,
    })
}

/// Checks the logits against the input size and the stride.
fn check_shape(
    logits: ArrayView3<'_, f32>,
    geo: &Geometry,
    params: &SegmentationParams,
) -> Result<(), HeadError> {
    let hs = (geo.input_height / params.output_stride) as usize;
    let ws = (geo.input_width / params.output_stride) as usize;
    let c = logits.dim().0;
    if logits.dim() != (c, hs, ws) || c == 0 || c > MAX_CLASSES || hs == 0 || ws == 0 {
        let expected = format!("[C, {hs}, {ws}] with 1 <= C <= {MAX_CLASSES} and a non-empty grid");
        return Err(HeadError::shape("logits", logits.shape(), expected));
    }
    Ok(())
}

/// The allowed classes' logits, channel-last, with the best class of every cell.
struct Grid {
    /// Per logit cell (row-major), one value per allowed class.
    data: Vec<f32>,
    /// Per logit cell, the position in the allowed classes of its best class.
    best: Vec<usize>,
    /// Number of allowed classes.
    n: usize,
    /// Number of logit columns.
    ws: usize,
}

impl Grid {
    fn new(logits: ArrayView3<'_, f32>, classes: &[u16]) -> Self {
        let (_, hs, ws) = logits.dim();
        let n = classes.len();
        let mut data = vec![0.0; hs * ws * n];
        // Row by row, so that the row being filled stays in cache while the classes are copied.
        for (y, block) in data.chunks_exact_mut((ws * n).max(1)).enumerate() {
            for (k, &class) in classes.iter().enumerate() {
                let plane = logits.index_axis(Axis(0), usize::from(class));
                for (v, &l) in block[k..].iter_mut().step_by(n).zip(plane.row(y)) {
                    *v = l;
                }
            }
        }
        let cells = data.chunks_exact(n.max(1));
        let best = cells.map(|cell| argmax(cell.iter().copied())).collect();
        Self { data, best, n, ws }
    }

    fn cell(&self, y: usize, x: usize) -> &[f32] {
        let start = (y * self.ws + x) * self.n;
        &self.data[start..start + self.n]
    }

    fn best(&self, y: usize, x: usize) -> usize {
        self.best[y * self.ws + x]
    }

    /// The class best at all four cells the taps read, if there is one: it is then best at the
    /// sample too, whose value is a convex combination of values that are each at least as large
    /// as every other class's.
    fn uniform(&self, ty: &Tap, tx: &Tap) -> Option<usize> {
        let c = self.best(ty.i0, tx.i0);
        let same = c == self.best(ty.i0, tx.i1)
            && c == self.best(ty.i1, tx.i0)
            && c == self.best(ty.i1, tx.i1);
        same.then_some(c)
    }

    /// Interpolates column `x` between the rows of `ty` into `out`.
    fn column(&self, ty: &Tap, x: usize, out: &mut [f32]) {
        let rows = self.cell(ty.i0, x).iter().zip(self.cell(ty.i1, x));
        for (v, (&a, &b)) in out.iter_mut().zip(rows) {
            *v = ty.lerp(a, b);
        }
    }
}

/// The classes that can win between two logit columns of one map row, for the pixels that fall
/// between them.
struct Span {
    /// The logit columns the span was prepared for, on the current map row.
    key: Option<(usize, usize)>,
    /// Column values at the left and right column, per allowed class.
    left: Vec<f32>,
    right: Vec<f32>,
    /// The classes that can be best between the columns, in increasing order.
    contenders: Vec<usize>,
}

impl Span {
    fn new(n: usize) -> Self {
        Self {
            key: None,
            left: vec![0.0; n],
            right: vec![0.0; n],
            contenders: Vec::with_capacity(n),
        }
    }

    /// Forgets the prepared columns; called when a new map row starts.
    fn reset(&mut self) {
        self.key = None;
    }

    /// Makes the span hold the columns of `tx` on the map row whose vertical taps are `ty`.
    fn prepare(&mut self, grid: &Grid, ty: &Tap, tx: &Tap) {
        if self.key == Some((tx.i0, tx.i1)) {
            return;
        }
        self.key = Some((tx.i0, tx.i1));
        grid.column(ty, tx.i0, &mut self.left);
        grid.column(ty, tx.i1, &mut self.right);
        let c0 = argmax(self.left.iter().copied());
        let c1 = argmax(self.right.iter().copied());
        self.contenders.clear();
        if c0 == c1 {
            self.contenders.push(c0);
        } else {
            let floor = crossing_floor(&self.left, &self.right, c0, c1);
            let (l, r) = (&self.left, &self.right);
            self.contenders
                .extend((0..l.len()).filter(|&c| l[c].max(r[c]) >= floor));
        }
    }

    /// The best class at `tx` among the contenders.
    fn best(&self, tx: &Tap) -> usize {
        let values = self
            .contenders
            .iter()
            .map(|&c| tx.lerp(self.left[c], self.right[c]));
        self.contenders[argmax(values)]
    }
}

/// A value the better of classes `c0` (best at column `a`) and `c1` (best at column `b`) never
/// drops below between the columns: where their lines cross, less a margin for rounding. A class
/// whose values at both columns lie below it can never win there.
fn crossing_floor(a: &[f32], b: &[f32], c0: usize, c1: usize) -> f32 {
    let (a0, b0) = (f64::from(a[c0]), f64::from(b[c0]));
    let (a1, b1) = (f64::from(a[c1]), f64::from(b[c1]));
    let w = (a0 - a1) / ((a0 - a1) + (b1 - b0));
    let cross = a0 + (b0 - a0) * w;
    let floor = cross - 1e-3 * (1.0 + cross.abs());
    if floor.is_finite() {
        floor as f32
    } else {
        f32::NEG_INFINITY
    }
}

/// Labels the map row whose vertical taps are `ty`.
fn label_row(
    grid: &Grid,
    classes: &[u16],
    ty: &Tap,
    x_taps: &[Tap],
    labels: &mut [u16],
    span: &mut Span,
) {
    span.reset();
    for (tx, label) in x_taps.iter().zip(labels.iter_mut()) {
        let k = grid.uniform(ty, tx).unwrap_or_else(|| {
            span.prepare(grid, ty, tx);
            span.best(tx)
        });
        *label = classes[k];
    }
}

/// Position of the first largest value; 0 when there is none (or all are NaN).
fn argmax(values: impl Iterator<Item = f32>) -> usize {
    let mut best = (0, f32::NEG_INFINITY);
    for (i, v) in values.enumerate() {
        if v > best.1 {
            best = (i, v);
        }
    }
    best.0
}

/// Writes a label map as a one-channel PNG: 8-bit when `num_classes <= 256`, 16-bit otherwise.
pub fn encode_png(map: &LabelMap, num_classes: usize) -> Result<Vec<u8>, HeadError> {
    let expected = map.width as usize * map.height as usize;
    if map.labels.len() != expected {
        return Err(HeadError::Png(format!(
            "{} labels for a {}x{} map",
            map.labels.len(),
            map.width,
            map.height
        )));
    }
    let (bytes, color) = if num_classes <= 256 {
        (eight_bit(&map.labels)?, ExtendedColorType::L8)
    } else {
        let bytes = map.labels.iter().flat_map(|l| l.to_ne_bytes()).collect();
        (bytes, ExtendedColorType::L16)
    };
    let mut png = Vec::new();
    PngEncoder::new(&mut png)
        .write_image(&bytes, map.width, map.height, color)
        .map_err(|e| HeadError::Png(e.to_string()))?;
    Ok(png)
}

/// The labels as bytes; an error if one does not fit.
fn eight_bit(labels: &[u16]) -> Result<Vec<u8>, HeadError> {
    labels
        .iter()
        .map(|&l| u8::try_from(l))
        .collect::<Result<_, _>>()
        .map_err(|_| HeadError::Png("a label does not fit an 8-bit map".into()))
}

/// The fraction of pixels of every class present in `map`, by decreasing fraction, then class id.
pub fn coverage(map: &LabelMap) -> Vec<ClassScore> {
    let len = map.labels.iter().max().map_or(0, |&m| usize::from(m) + 1);
    let mut counts = vec![0u64; len];
    for &label in &map.labels {
        counts[usize::from(label)] += 1;
    }
    let mut present: Vec<(u32, u64)> = (0u32..)
        .zip(counts)
        .filter(|&(_, count)| count > 0)
        .collect();
    present.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let total = map.labels.len() as f64;
    present
        .into_iter()
        .map(|(class_id, count)| ClassScore {
            class_id,
            score: (count as f64 / total) as f32,
        })
        .collect()
}

#[cfg(test)]
mod tests;

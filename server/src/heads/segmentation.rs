//! Segmentation head: class logits at a fixed stride, resampled into a label map of the original image.
//!
//! Every original pixel's centre is mapped into the logit grid through the geometry, each allowed
//! class's logit is sampled bilinearly there (clamped at the edges) and the best class wins, the
//! lowest class id on ties. The map can be written as a grayscale PNG and summarised per class.

use image::codecs::png::PngEncoder;
use image::{ExtendedColorType, ImageEncoder};
use ndarray::ArrayView3;
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
    let logits = logits.as_standard_layout();
    let logits = logits.view();
    let planes = Planes::new(&logits, &classes)
        .ok_or_else(|| HeadError::shape("logits", logits.shape(), "a row-major array"))?;
    let spans = Spans::new(&x_taps);
    let mut contenders = Contenders::new(spans.pairs.len(), ws);
    let mut row = Row::default();
    let rows = labels.chunks_mut(x_taps.len().max(1));
    for (ty, labels) in y_taps.iter().zip(rows) {
        contenders.prepare(&planes, &spans, ty);
        row.label(&planes, &spans, &contenders, ty, &x_taps, labels);
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

/// The allowed classes' logit planes.
struct Planes<'a> {
    /// The `[C, H, W]` logits, row-major.
    data: &'a [f32],
    rows: usize,
    columns: usize,
    classes: &'a [u16],
    /// The margin below a quad's floor that still competes: it covers the rounding of the two
    /// interpolations (an ulp of the largest magnitude each), with room to spare. `None` when a
    /// logit is not finite: every class then competes everywhere.
    margin: Option<f32>,
}

impl<'a> Planes<'a> {
    /// `None` when `logits` is not in standard layout.
    fn new(logits: &'a ArrayView3<'a, f32>, classes: &'a [u16]) -> Option<Self> {
        let (_, rows, columns) = logits.dim();
        let data = logits.as_slice()?;
        let mut planes = Self {
            data,
            rows,
            columns,
            classes,
            margin: None,
        };
        let mut magnitude = 0.0f32;
        let mut finite = true;
        for k in 0..classes.len() {
            for &v in planes.plane(k) {
                // False for NaN and the infinities.
                finite &= v.abs() <= f32::MAX;
                magnitude = larger(magnitude, v.abs());
            }
        }
        planes.margin = finite.then_some(1e-5 * (1.0 + magnitude));
        Some(planes)
    }

    /// The plane of the `k`-th allowed class.
    fn plane(&self, k: usize) -> &'a [f32] {
        let size = self.rows * self.columns;
        let start = usize::from(self.classes[k]) * size;
        &self.data[start..start + size]
    }

    /// Logit row `y` of the `k`-th allowed class.
    fn row(&self, k: usize, y: usize) -> &'a [f32] {
        &self.plane(k)[y * self.columns..(y + 1) * self.columns]
    }

    /// The `k`-th allowed class's value at column `x` between the logit rows of `ty`.
    fn column(&self, k: usize, ty: &Tap, x: usize) -> f32 {
        ty.lerp(self.row(k, ty.i0)[x], self.row(k, ty.i1)[x])
    }
}

/// The distinct pairs of logit columns the map's pixels fall between, left to right, and for
/// every map column the pair it uses.
struct Spans {
    pairs: Vec<(usize, usize)>,
    of_column: Vec<usize>,
}

impl Spans {
    fn new(x_taps: &[Tap]) -> Self {
        let mut pairs: Vec<(usize, usize)> = Vec::new();
        let of_column = x_taps
            .iter()
            .map(|tx| {
                if pairs.last() != Some(&(tx.i0, tx.i1)) {
                    pairs.push((tx.i0, tx.i1));
                }
                pairs.len() - 1
            })
            .collect();
        Self { pairs, of_column }
    }
}

/// For every span of the current pair of logit rows, the classes that can be best somewhere in
/// the quad of four cells around it, in increasing order.
///
/// A sample in the quad is a convex combination of its four cells, so the class whose smallest
/// corner is largest scores at least that much (the floor) everywhere in the quad, and a class
/// whose every corner lies below the floor can never win there. With the floor lowered by the
/// rounding margin, the labels are exactly those of evaluating every class at every pixel.
struct Contenders {
    rows: Option<(usize, usize)>,
    /// Per span, its classes (positions among the allowed classes).
    spans: Vec<Vec<usize>>,
    /// Per span, the floor.
    floor: Vec<f32>,
    /// Per logit column, the smaller (larger) of the two rows' values of one class.
    low: Vec<f32>,
    high: Vec<f32>,
}

impl Contenders {
    fn new(spans: usize, columns: usize) -> Self {
        Self {
            rows: None,
            spans: vec![Vec::new(); spans],
            floor: vec![0.0; spans],
            low: vec![0.0; columns],
            high: vec![0.0; columns],
        }
    }

    /// Makes the contenders those of the pair of logit rows `ty` reads; a no-op if they are.
    fn prepare(&mut self, planes: &Planes<'_>, spans: &Spans, ty: &Tap) {
        if self.rows == Some((ty.i0, ty.i1)) {
            return;
        }
        self.rows = Some((ty.i0, ty.i1));
        let classes = planes.classes.len();
        self.spans.iter_mut().for_each(Vec::clear);
        let Some(margin) = planes.margin else {
            self.spans
                .iter_mut()
                .for_each(|span| span.extend(0..classes));
            return;
        };
        self.floor.fill(f32::NEG_INFINITY);
        for k in 0..classes {
            self.fill_low(planes, k, ty);
            for (floor, &(x0, x1)) in self.floor.iter_mut().zip(&spans.pairs) {
                *floor = floor.max(smaller(self.low[x0], self.low[x1]));
            }
        }
        for floor in &mut self.floor {
            *floor -= margin;
        }
        for k in 0..classes {
            self.fill_high(planes, k, ty);
            let spans = self.spans.iter_mut().zip(&self.floor).zip(&spans.pairs);
            for ((span, &floor), &(x0, x1)) in spans {
                if larger(self.high[x0], self.high[x1]) >= floor {
                    span.push(k);
                }
            }
        }
    }

    fn fill_low(&mut self, planes: &Planes<'_>, k: usize, ty: &Tap) {
        let (a, b) = (planes.row(k, ty.i0), planes.row(k, ty.i1));
        for ((low, &a), &b) in self.low.iter_mut().zip(a).zip(b) {
            *low = smaller(a, b);
        }
    }

    fn fill_high(&mut self, planes: &Planes<'_>, k: usize, ty: &Tap) {
        let (a, b) = (planes.row(k, ty.i0), planes.row(k, ty.i1));
        for ((high, &a), &b) in self.high.iter_mut().zip(a).zip(b) {
            *high = larger(a, b);
        }
    }

    fn of(&self, span: usize) -> &[usize] {
        &self.spans[span]
    }
}

fn smaller(a: f32, b: f32) -> f32 {
    if a < b { a } else { b }
}

fn larger(a: f32, b: f32) -> f32 {
    if a > b { a } else { b }
}

/// One map row's per-span work: the contenders' values at the span's left and right logit
/// columns, interpolated between the two logit rows.
#[derive(Default)]
struct Row {
    left: Vec<f32>,
    right: Vec<f32>,
}

impl Row {
    /// Labels the map row whose vertical taps are `ty`.
    fn label(
        &mut self,
        planes: &Planes<'_>,
        spans: &Spans,
        contenders: &Contenders,
        ty: &Tap,
        x_taps: &[Tap],
        labels: &mut [u16],
    ) {
        let mut current = None;
        for ((tx, label), &span) in x_taps.iter().zip(labels).zip(&spans.of_column) {
            let classes = contenders.of(span);
            let best = if let [only] = classes {
                *only
            } else {
                if current != Some(span) {
                    current = Some(span);
                    let (x0, x1) = spans.pairs[span];
                    self.left.clear();
                    self.right.clear();
                    let columns = classes.iter();
                    self.left
                        .extend(columns.clone().map(|&k| planes.column(k, ty, x0)));
                    self.right
                        .extend(columns.map(|&k| planes.column(k, ty, x1)));
                }
                let values = self.left.iter().zip(&self.right);
                classes[argmax(values.map(|(&a, &b)| tx.lerp(a, b)))]
            };
            *label = planes.classes[best];
        }
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

//! Unit tests of the detection post-processing on small hand-built tensors.

use ndarray::{Array2, Array3};

use super::*;
use crate::heads::rle;

/// Head outputs of a 64x64 input with prototypes at stride 4.
struct Outputs {
    scores: Array2<f32>,
    boxes: Array2<f32>,
    coeffs: Array2<f32>,
    protos: Array3<f32>,
}

impl Outputs {
    /// All-zero outputs for `anchors` anchors, `classes` classes and `k` prototypes.
    fn new(anchors: usize, classes: usize, k: usize) -> Self {
        Self {
            scores: Array2::zeros((anchors, classes)),
            boxes: Array2::zeros((anchors, 4)),
            coeffs: Array2::zeros((anchors, k)),
            protos: Array3::zeros((k, 16, 16)),
        }
    }

    /// Scores `class` at `anchor` and sets the anchor's (left, top, right, bottom) distances.
    fn set(&mut self, anchor: usize, class: usize, score: f32, ltrb: [f32; 4]) {
        self.scores[[anchor, class]] = score;
        for (i, d) in ltrb.into_iter().enumerate() {
            self.boxes[[anchor, i]] = d;
        }
    }

    fn run(
        &self,
        geo: &Geometry,
        params: &DetectionParams,
        opts: &DetectOptions,
    ) -> Result<Vec<Detection>, HeadError> {
        postprocess(
            self.scores.view(),
            self.boxes.view(),
            self.coeffs.view(),
            self.protos.view(),
            geo,
            params,
            opts,
        )
    }
}

fn params(strides: &[u32]) -> DetectionParams {
    DetectionParams {
        strides: strides.to_vec(),
        ..DetectionParams::default()
    }
}

fn identity() -> Geometry {
    Geometry::resize(64, 64, 64, 64)
}

fn bx(x1: f32, y1: f32, x2: f32, y2: f32) -> BoxXyxy {
    BoxXyxy { x1, y1, x2, y2 }
}

/// (class, score, box) of each detection.
fn summary(dets: &[Detection]) -> Vec<(u32, f32, BoxXyxy)> {
    dets.iter().map(|d| (d.class_id, d.score, d.bbox)).collect()
}

fn defaults(strides: &[u32]) -> (DetectionParams, DetectOptions) {
    let p = params(strides);
    let o = DetectOptions::defaults(&p);
    (p, o)
}

#[test]
fn decodes_boxes_around_anchor_points() {
    // Stride 32 on 64x64: anchors at (16,16), (48,16), (16,48), (48,48).
    let mut out = Outputs::new(4, 2, 1);
    out.set(1, 1, 0.9, [0.25, 0.5, 0.25, 0.25]);
    out.set(2, 0, 0.8, [0.5, 0.25, 1.0, 0.5]);
    let (p, o) = defaults(&[32]);
    let dets = out.run(&identity(), &p, &o).expect("valid outputs");
    assert_eq!(
        summary(&dets),
        vec![
            (1, 0.9, bx(40.0, 0.0, 56.0, 24.0)),
            (0, 0.8, bx(0.0, 40.0, 48.0, 64.0))
        ]
    );
    assert!(dets.iter().all(|d| d.mask.is_none()));
}

#[test]
fn enumerates_anchors_level_by_level_row_major() {
    // Strides 16 then 32: 16 + 4 anchors. Anchor 6 is cell (x 2, y 1) of stride 16 at (40, 24);
    // anchor 19 is cell (1, 1) of stride 32 at (48, 48).
    let mut out = Outputs::new(20, 1, 1);
    out.set(6, 0, 0.9, [0.5; 4]);
    out.set(19, 0, 0.8, [0.25; 4]);
    let (p, o) = defaults(&[16, 32]);
    let dets = out.run(&identity(), &p, &o).expect("valid outputs");
    assert_eq!(
        summary(&dets),
        vec![
            (0, 0.9, bx(32.0, 16.0, 48.0, 32.0)),
            (0, 0.8, bx(40.0, 40.0, 56.0, 56.0))
        ]
    );
}

#[test]
fn maps_boxes_back_through_a_letterbox_and_clips_them() {
    // 128x64 into 64x64: scale 0.5, image rows 16..48 of the input.
    let geo = Geometry::letterbox(128, 64, 64, 64);
    let mut out = Outputs::new(4, 1, 1);
    out.set(1, 0, 0.9, [0.25, 0.0, 0.25, 0.75]); // input (40, 16, 56, 40)
    out.set(2, 0, 0.8, [0.5, 0.25, 0.5, 0.5]); // input (0, 40, 32, 64): reaches the bottom padding
    out.set(0, 0, 0.7, [0.25, 0.25, 0.25, 0.0]); // input (8, 8, 24, 16): all in the top padding
    let (p, o) = defaults(&[32]);
    let dets = out.run(&geo, &p, &o).expect("valid outputs");
    assert_eq!(
        summary(&dets),
        vec![
            (0, 0.9, bx(80.0, 0.0, 112.0, 48.0)),
            (0, 0.8, bx(0.0, 48.0, 64.0, 64.0))
        ]
    );
}

#[test]
fn suppresses_within_a_class_but_not_across_classes() {
    let mut out = Outputs::new(4, 2, 1);
    out.set(0, 0, 0.9, [0.5, 0.5, 1.5, 0.5]); // (0, 0, 64, 32)
    out.set(1, 0, 0.8, [1.5, 0.5, 0.5, 0.5]); // the same box
    out.scores[[1, 1]] = 0.7;
    let (p, o) = defaults(&[32]);
    let dets = out.run(&identity(), &p, &o).expect("valid outputs");
    let full = bx(0.0, 0.0, 64.0, 32.0);
    assert_eq!(summary(&dets), vec![(0, 0.9, full), (1, 0.7, full)]);
}

/// Four disjoint boxes, one per anchor, scored 0.4, 0.5, 0.6, 0.7, classes 0, 1, 0, 1.
fn four_disjoint() -> Outputs {
    let mut out = Outputs::new(4, 2, 1);
    for (anchor, score) in [0.4, 0.5, 0.6, 0.7].into_iter().enumerate() {
        out.set(anchor, anchor % 2, score, [0.25; 4]);
    }
    out
}

#[test]
fn class_filter_keeps_only_the_listed_classes() {
    let out = four_disjoint();
    let (p, mut o) = defaults(&[32]);
    o.class_filter = Some(vec![1]);
    let dets = out.run(&identity(), &p, &o).expect("valid outputs");
    assert_eq!(
        dets.iter().map(|d| d.class_id).collect::<Vec<_>>(),
        vec![1, 1]
    );
    o.class_filter = Some(Vec::new());
    assert_eq!(
        out.run(&identity(), &p, &o).expect("valid outputs").len(),
        4
    );
    o.class_filter = Some(vec![0, 2]);
    let err = out.run(&identity(), &p, &o);
    assert_eq!(
        err,
        Err(HeadError::UnknownClass {
            class_id: 2,
            num_classes: 2
        })
    );
}

#[test]
fn score_threshold_is_inclusive_and_ignores_nan() {
    let mut out = four_disjoint();
    out.scores[[0, 0]] = 0.3;
    out.scores[[1, 1]] = 0.29;
    out.scores[[1, 0]] = f32::NAN;
    let (p, mut o) = defaults(&[32]);
    let scores = |dets: Vec<Detection>| dets.iter().map(|d| d.score).collect::<Vec<_>>();
    let dets = out.run(&identity(), &p, &o).expect("valid outputs");
    assert_eq!(scores(dets), vec![0.7, 0.6, 0.3]);
    o.score_threshold = 0.65;
    assert_eq!(
        scores(out.run(&identity(), &p, &o).expect("valid outputs")),
        vec![0.7]
    );
}

#[test]
fn limits_detections_and_nms_candidates() {
    let out = four_disjoint();
    let (mut p, mut o) = defaults(&[32]);
    o.max_detections = 2;
    let dets = out.run(&identity(), &p, &o).expect("valid outputs");
    assert_eq!(
        summary(&dets).iter().map(|d| d.1).collect::<Vec<_>>(),
        vec![0.7, 0.6]
    );
    o.max_detections = 10;
    p.pre_nms_top_k = 3;
    assert_eq!(
        out.run(&identity(), &p, &o).expect("valid outputs").len(),
        3
    );
}

#[test]
fn non_finite_distances_do_not_panic() {
    let mut out = Outputs::new(4, 1, 1);
    out.set(0, 0, 0.9, [f32::NAN, 0.1, 0.1, 0.1]);
    out.set(1, 0, 0.8, [f32::INFINITY; 4]);
    out.set(2, 0, 0.7, [-1.0, -1.0, -1.0, -1.0]);
    let (p, mut o) = defaults(&[32]);
    o.masks = true;
    let dets = out.run(&identity(), &p, &o).expect("valid outputs");
    assert_eq!(summary(&dets), vec![(0, 0.8, bx(0.0, 0.0, 64.0, 64.0))]);
}

/// The row-major mask of a `width` x `height` image set inside `xs` x `ys`.
fn rect_mask(width: usize, height: usize, xs: Range<usize>, ys: Range<usize>) -> Vec<u8> {
    (0..width * height)
        .map(|i| u8::from(xs.contains(&(i % width)) && ys.contains(&(i / width))))
        .collect()
}

fn assert_mask(det: &Detection, expected: &[u8], width: u32, height: u32) {
    let mask = det.mask.as_ref().expect("masks were requested");
    assert_eq!((mask.width, mask.height), (width, height));
    assert_eq!(
        rle::decode(&mask.counts, height, width).expect("valid RLE"),
        expected
    );
    assert_eq!(mask.counts, rle::encode(expected, height, width));
}

#[test]
fn masks_combine_prototypes_and_are_cropped_to_the_box() {
    // A 32x32 image stretched to 64x64. Prototype 0 is +10 on the left half of the prototype grid
    // (input x < 32, original x < 16) and -10 on the right; prototype 1 is 1 everywhere.
    let geo = Geometry::resize(32, 32, 64, 64);
    let mut out = Outputs::new(4, 2, 2);
    for ((k, _, x), v) in out.protos.indexed_iter_mut() {
        *v = match (k, x < 8) {
            (0, true) => 10.0,
            (0, false) => -10.0,
            _ => 1.0,
        };
    }
    out.set(0, 0, 0.9, [0.25, 0.375, 1.0, 0.25]); // input (8, 4, 48, 24): original (4, 2, 24, 12)
    out.coeffs[[0, 0]] = 1.0;
    out.set(3, 1, 0.8, [1.0, 0.5, 0.25, 0.25]); // input (16, 32, 56, 56): original (8, 16, 28, 28)
    out.coeffs[[3, 0]] = -1.0;
    out.coeffs[[3, 1]] = 0.5;
    let (p, mut o) = defaults(&[32]);
    o.masks = true;
    let dets = out.run(&geo, &p, &o).expect("valid outputs");
    assert_eq!(dets.len(), 2);
    assert_eq!(dets[0].bbox, bx(4.0, 2.0, 24.0, 12.0));
    assert_mask(&dets[0], &rect_mask(32, 32, 4..16, 2..12), 32, 32);
    assert_eq!(dets[1].bbox, bx(8.0, 16.0, 28.0, 28.0));
    assert_mask(&dets[1], &rect_mask(32, 32, 16..28, 16..28), 32, 32);
}

#[test]
fn masks_follow_a_letterbox_and_the_threshold() {
    // 64x32 into 64x64 at scale 1: image rows 16..48 of the input.
    let geo = Geometry::letterbox(64, 32, 64, 64);
    let mut out = Outputs::new(4, 1, 1);
    out.protos.fill(1.0);
    out.set(0, 0, 0.9, [0.25, -0.125, 0.75, 0.875]); // input (8, 20, 40, 44): original (8, 4, 40, 28)
    out.coeffs[[0, 0]] = 0.5; // sigmoid(0.5) = 0.62
    let (mut p, mut o) = defaults(&[32]);
    o.masks = true;
    let dets = out.run(&geo, &p, &o).expect("valid outputs");
    assert_eq!(dets[0].bbox, bx(8.0, 4.0, 40.0, 28.0));
    assert_mask(&dets[0], &rect_mask(64, 32, 8..40, 4..28), 64, 32);
    p.mask_threshold = 0.7;
    let dets = out.run(&geo, &p, &o).expect("valid outputs");
    assert_mask(&dets[0], &[0; 64 * 32], 64, 32);
}

#[test]
fn fractional_box_edges_take_pixels_whose_centres_are_inside() {
    assert_eq!(pixel_span(4.0, 24.0, 32), 4..24);
    assert_eq!(pixel_span(3.6, 5.4, 32), 4..5);
    assert_eq!(pixel_span(3.5, 5.5, 32), 3..5);
    assert_eq!(pixel_span(0.0, 40.0, 32), 0..32);
    assert_eq!(pixel_span(7.2, 7.4, 32), 7..7);
}

#[test]
fn masks_are_refused_when_their_boxes_cover_more_than_the_limit() {
    // Four 16x16 boxes: 1,024 pixels in all.
    let out = four_disjoint();
    let (p, mut o) = defaults(&[32]);
    o.masks = true;
    o.max_mask_pixels = 1024;
    let dets = out.run(&identity(), &p, &o).expect("at the limit");
    assert_eq!(dets.iter().filter(|d| d.mask.is_some()).count(), 4);
    o.max_mask_pixels = 1023;
    let err = out.run(&identity(), &p, &o).expect_err("one pixel over");
    assert!(
        matches!(
            err,
            HeadError::MaskPixels {
                detections: 4,
                pixels: 1024,
                limit: 1023
            }
        ),
        "{err}"
    );
    o.max_detections = 3;
    assert!(out.run(&identity(), &p, &o).is_ok(), "three boxes fit");
    o.masks = false;
    o.max_mask_pixels = 0;
    assert_eq!(out.run(&identity(), &p, &o).expect("no masks").len(), 3);
}

#[test]
fn wrong_shapes_are_errors() {
    let (p, o) = defaults(&[32]);
    let tensor_of = |out: &Outputs| match out.run(&identity(), &p, &o) {
        Err(HeadError::Shape { tensor, .. }) => tensor,
        other => panic!("expected a shape error, got {other:?}"),
    };
    assert_eq!(tensor_of(&Outputs::new(5, 2, 1)), "scores");
    let mut out = Outputs::new(4, 2, 1);
    out.boxes = Array2::zeros((4, 3));
    assert_eq!(tensor_of(&out), "boxes");
    let mut out = Outputs::new(4, 2, 1);
    out.coeffs = Array2::zeros((3, 1));
    assert_eq!(tensor_of(&out), "mask_coeffs");
    let mut out = Outputs::new(4, 2, 1);
    out.coeffs = Array2::zeros((4, 3));
    assert_eq!(tensor_of(&out), "mask_protos");
    let mut out = Outputs::new(4, 2, 1);
    out.protos = Array3::zeros((1, 8, 16));
    assert_eq!(tensor_of(&out), "mask_protos");
}

#[test]
fn invalid_params_are_errors() {
    let out = Outputs::new(4, 1, 1);
    let (mut p, o) = defaults(&[32, 0]);
    assert!(matches!(
        out.run(&identity(), &p, &o),
        Err(HeadError::InvalidParams(_))
    ));
    p.strides = vec![32];
    p.proto_stride = 0;
    assert!(matches!(
        out.run(&identity(), &p, &o),
        Err(HeadError::InvalidParams(_))
    ));
    p.proto_stride = 4;
    p.iou_threshold = f32::NAN;
    assert!(p.validate().is_err());
}

#[test]
fn an_input_smaller_than_every_stride_has_no_anchors() {
    let geo = Geometry::resize(16, 16, 16, 16);
    let (p, mut o) = defaults(&[32]);
    o.masks = true;
    let dets = postprocess(
        Array2::zeros((0, 3)).view(),
        Array2::zeros((0, 4)).view(),
        Array2::zeros((0, 2)).view(),
        Array3::zeros((2, 4, 4)).view(),
        &geo,
        &p,
        &o,
    );
    assert_eq!(dets, Ok(Vec::new()));
}

#[test]
fn params_deserialize_with_contract_defaults() {
    let parsed: DetectionParams = toml::from_str("").expect("empty table");
    assert_eq!(parsed, DetectionParams::default());
    assert_eq!(parsed.strides, vec![8, 16, 32]);
    assert_eq!(
        (
            parsed.proto_stride,
            parsed.max_detections,
            parsed.pre_nms_top_k
        ),
        (4, 100, 1000)
    );
    assert_eq!(
        (
            parsed.score_threshold,
            parsed.iou_threshold,
            parsed.mask_threshold
        ),
        (0.3, 0.5, 0.5)
    );
    let parsed: DetectionParams =
        toml::from_str("strides = [16, 32]\nscore_threshold = 0.25").expect("valid");
    assert_eq!(
        (parsed.strides, parsed.score_threshold),
        (vec![16, 32], 0.25)
    );
    assert!(toml::from_str::<DetectionParams>("stride = [8]").is_err());
}

#[test]
fn default_options_follow_the_params() {
    let p = DetectionParams {
        score_threshold: 0.2,
        iou_threshold: 0.6,
        max_detections: 7,
        ..DetectionParams::default()
    };
    let o = DetectOptions::defaults(&p);
    assert_eq!(
        (o.score_threshold, o.iou_threshold, o.max_detections),
        (0.2, 0.6, 7)
    );
    assert_eq!((o.class_filter, o.masks), (None, false));
}

//! Unit tests of the segmentation post-processing and the label-map encodings.

use image::DynamicImage;
use ndarray::{Array3, ArrayView2, Axis};

use super::*;

fn params(output_stride: u32) -> SegmentationParams {
    SegmentationParams { output_stride }
}

/// Two classes on a 2x1 grid: class 0 wins on the left cell, class 1 on the right one.
fn left_right() -> Array3<f32> {
    Array3::from_shape_vec((2, 1, 2), vec![1.0, -1.0, -1.0, 1.0]).expect("2*1*2 values")
}

fn rows(map: &LabelMap) -> Vec<Vec<u16>> {
    map.labels
        .chunks(map.width as usize)
        .map(<[u16]>::to_vec)
        .collect()
}

#[test]
fn upsampling_splits_two_classes_at_the_midline() {
    // Input 8x4 at stride 4; pixel x maps to (x + 0.5) / 4 - 0.5 on the grid, so pixel 3 sees
    // class 0 at 1 - 2 * 0.375 = 0.25 and pixel 4 sees it at -0.25.
    let logits = left_right();
    let map = postprocess(
        logits.view(),
        &Geometry::resize(8, 4, 8, 4),
        &params(4),
        None,
    )
    .expect("valid");
    assert_eq!((map.width, map.height), (8, 4));
    assert_eq!(rows(&map), vec![vec![0, 0, 0, 0, 1, 1, 1, 1]; 4]);
    // A 16x2 original stretched onto the same input splits at original x = 8.
    let map = postprocess(
        logits.view(),
        &Geometry::resize(16, 2, 8, 4),
        &params(4),
        None,
    )
    .expect("valid");
    let expected: Vec<u16> = (0..16).map(|x| u16::from(x >= 8)).collect();
    assert_eq!(rows(&map), vec![expected; 2]);
}

#[test]
fn letterbox_padding_is_skipped() {
    // 8x4 into 8x8 at scale 1: image rows 2..6 of the input. On the 4x4 grid at stride 2, class 1
    // wins only on grid row 1 (input y = 3). Original row 0 sits at input y 2.5, grid y 0.75, where
    // class 0 scores 1 - 2 * 0.75 = -0.5; row 2 sits at grid y 1.75, where it scores 0.5.
    let logits = Array3::from_shape_fn((2, 4, 4), |(c, y, _)| {
        let class0 = if y == 1 { -1.0f32 } else { 1.0 };
        if c == 0 { class0 } else { -class0 }
    });
    let geo = Geometry::letterbox(8, 4, 8, 8);
    let map = postprocess(logits.view(), &geo, &params(2), None).expect("valid");
    let expected: Vec<Vec<u16>> = [1, 1, 0, 0].iter().map(|&l| vec![l; 8]).collect();
    assert_eq!(rows(&map), expected);
}

#[test]
fn ties_go_to_the_lowest_class() {
    let logits = Array3::from_elem((3, 2, 2), 0.5f32);
    let map = postprocess(
        logits.view(),
        &Geometry::resize(5, 3, 8, 8),
        &params(4),
        None,
    )
    .expect("valid");
    assert!(map.labels.iter().all(|&l| l == 0));
    let only = postprocess(
        logits.view(),
        &Geometry::resize(5, 3, 8, 8),
        &params(4),
        Some(&[2, 1]),
    )
    .expect("valid");
    assert!(only.labels.iter().all(|&l| l == 1));
}

#[test]
fn class_filter_restricts_the_competition() {
    let logits = left_right();
    let geo = Geometry::resize(8, 4, 8, 4);
    let map = postprocess(logits.view(), &geo, &params(4), Some(&[1])).expect("valid");
    assert!(map.labels.iter().all(|&l| l == 1));
    let all = postprocess(logits.view(), &geo, &params(4), Some(&[])).expect("valid");
    assert_eq!(
        all,
        postprocess(logits.view(), &geo, &params(4), None).expect("valid")
    );
    let err = postprocess(logits.view(), &geo, &params(4), Some(&[0, 2]));
    assert_eq!(
        err,
        Err(HeadError::UnknownClass {
            class_id: 2,
            num_classes: 2
        })
    );
}

#[test]
fn wrong_shapes_and_params_are_errors() {
    let geo = Geometry::resize(8, 4, 8, 4);
    let is_shape = |r: Result<LabelMap, HeadError>| {
        matches!(
            r,
            Err(HeadError::Shape {
                tensor: "logits",
                ..
            })
        )
    };
    assert!(is_shape(postprocess(
        Array3::zeros((2, 2, 2)).view(),
        &geo,
        &params(4),
        None
    )));
    assert!(is_shape(postprocess(
        Array3::zeros((0, 1, 2)).view(),
        &geo,
        &params(4),
        None
    )));
    assert!(is_shape(postprocess(
        Array3::zeros((2, 0, 0)).view(),
        &Geometry::resize(2, 2, 2, 2),
        &params(4),
        None
    )));
    let zero = postprocess(left_right().view(), &geo, &params(0), None);
    assert!(matches!(zero, Err(HeadError::InvalidParams(_))));
}

/// Bilinear sample of `plane` at grid position (`px`, `py`), clamped at the edges.
fn sample(plane: ArrayView2<'_, f32>, px: f32, py: f32) -> f32 {
    let (h, w) = plane.dim();
    let axis = |p: f32, n: usize| {
        let p = p.clamp(0.0, (n - 1) as f32);
        let i = p.floor() as usize;
        (i, (i + 1).min(n - 1), p - p.floor())
    };
    let ((x0, x1, fx), (y0, y1, fy)) = (axis(px, w), axis(py, h));
    let top = plane[[y0, x0]] * (1.0 - fx) + plane[[y0, x1]] * fx;
    let bottom = plane[[y1, x0]] * (1.0 - fx) + plane[[y1, x1]] * fx;
    top * (1.0 - fy) + bottom * fy
}

/// Random logits in [-5, 5) of the given shape, from a fixed seed.
fn random_logits(shape: (usize, usize, usize), seed: u32) -> Array3<f32> {
    let mut state = seed;
    Array3::from_shape_fn(shape, |_| {
        state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        (state >> 8) as f32 / (1u32 << 24) as f32 * 10.0 - 5.0
    })
}

/// Checks every pixel's label against a direct bilinear evaluation of the allowed classes.
fn assert_matches_direct(logits: &Array3<f32>, geo: &Geometry, stride: u32, allowed: &[u32]) {
    let filter = (!allowed.is_empty()).then_some(allowed);
    let map = postprocess(logits.view(), geo, &params(stride), filter).expect("valid");
    let width = geo.orig_width as usize;
    let classes: Vec<usize> = match filter {
        Some(ids) => ids.iter().map(|&c| c as usize).collect(),
        None => (0..logits.dim().0).collect(),
    };
    for (i, &label) in map.labels.iter().enumerate() {
        let (xi, yi) = geo.to_input((i % width) as f32 + 0.5, (i / width) as f32 + 0.5);
        let s = stride as f32;
        let value = |c: usize| sample(logits.index_axis(Axis(0), c), xi / s - 0.5, yi / s - 0.5);
        let best = classes
            .iter()
            .map(|&c| value(c))
            .fold(f32::NEG_INFINITY, f32::max);
        assert!(classes.contains(&usize::from(label)), "pixel {i}");
        assert!(value(usize::from(label)) >= best - 1e-4, "pixel {i}");
    }
}

#[test]
fn matches_a_direct_per_pixel_evaluation() {
    // Shrinking: 37x53 letterboxed into 48x40, a 12x10 grid at stride 4.
    let logits = random_logits((7, 10, 12), 0x9e37_79b9);
    assert_matches_direct(&logits, &Geometry::letterbox(37, 53, 48, 40), 4, &[]);
    assert_matches_direct(&logits, &Geometry::letterbox(37, 53, 48, 40), 4, &[6, 1, 3]);
    // Enlarging: 150x110 stretched onto 32x32, an 8x8 grid at stride 4.
    let logits = random_logits((20, 8, 8), 0x2545_f491);
    assert_matches_direct(&logits, &Geometry::resize(150, 110, 32, 32), 4, &[]);
    assert_matches_direct(&logits, &Geometry::letterbox(150, 110, 32, 32), 4, &[2, 19]);
}

/// The label map by brute force: every allowed class interpolated at every pixel (between the
/// logit rows first, then between the columns, as the post-processing does), the first best
/// class winning.
fn every_class_at_every_pixel(
    logits: &Array3<f32>,
    geo: &Geometry,
    stride: u32,
    allowed: &[u32],
) -> Vec<u16> {
    let (c, hs, ws) = logits.dim();
    let classes: Vec<usize> = if allowed.is_empty() {
        (0..c).collect()
    } else {
        let mut ids: Vec<usize> = allowed.iter().map(|&id| id as usize).collect();
        ids.sort_unstable();
        ids
    };
    let x_taps = axis_taps(geo, Coord::X, 0..geo.orig_width, stride, ws);
    let y_taps = axis_taps(geo, Coord::Y, 0..geo.orig_height, stride, hs);
    let mut labels = Vec::new();
    for ty in &y_taps {
        for tx in &x_taps {
            let value = |class: usize| {
                let column =
                    |x: usize| ty.lerp(logits[[class, ty.i0, x]], logits[[class, ty.i1, x]]);
                tx.lerp(column(tx.i0), column(tx.i1))
            };
            let mut best = (classes[0], f32::NEG_INFINITY);
            for &class in &classes {
                let v = value(class);
                if v > best.1 {
                    best = (class, v);
                }
            }
            labels.push(best.0 as u16);
        }
    }
    labels
}

#[test]
fn labels_equal_every_class_evaluated_at_every_pixel() {
    let smooth = Array3::from_shape_fn((30, 12, 14), |(c, y, x)| {
        let (c, y, x) = (c as f32, y as f32, x as f32);
        (0.3 * x + 0.2 * c).sin() * 3.0 + (0.25 * y - 0.1 * c).cos() * 2.0
    });
    let noisy = random_logits((25, 9, 11), 0x1234_5678);
    // Values from a small set: many exact ties, which the lowest class must win.
    let ties = random_logits((12, 8, 8), 0x0bad_f00d).mapv(|v| v.round());
    let mut broken = random_logits((6, 8, 8), 0x5eed_0001);
    broken[[2, 3, 4]] = f32::NAN;
    broken[[4, 6, 1]] = f32::INFINITY;
    broken[[1, 0, 0]] = f32::NEG_INFINITY;
    let cases = [
        (smooth, Geometry::letterbox(101, 77, 56, 48)),
        (noisy, Geometry::resize(23, 61, 44, 36)),
        (ties, Geometry::letterbox(40, 40, 32, 32)),
        (broken, Geometry::resize(29, 31, 32, 32)),
    ];
    for (i, (logits, geo)) in cases.iter().enumerate() {
        let classes = logits.dim().0 as u32;
        for allowed in [vec![], vec![classes - 1, 0, 2]] {
            let filter = (!allowed.is_empty()).then_some(&allowed[..]);
            let map = postprocess(logits.view(), geo, &params(4), filter).expect("valid");
            let expected = every_class_at_every_pixel(logits, geo, 4, &allowed);
            assert_eq!(map.labels, expected, "case {i}, classes {allowed:?}");
        }
    }
}

#[test]
fn logits_in_any_memory_layout_give_the_same_map() {
    let logits = random_logits((9, 6, 7), 0x00dd_ba11);
    let geo = Geometry::resize(30, 20, 28, 24);
    let standard = postprocess(logits.view(), &geo, &params(4), None).expect("valid");
    // The same values stored channel-last, viewed as [C, H, W].
    let (c, h, w) = logits.dim();
    let channel_last = Array3::from_shape_fn((h, w, c), |(y, x, k)| logits[[k, y, x]]);
    let view = channel_last.view().permuted_axes([2, 0, 1]);
    assert!(!view.is_standard_layout());
    let permuted = postprocess(view, &geo, &params(4), None).expect("valid");
    assert_eq!(permuted, standard);
}

#[test]
fn png_is_eight_bit_up_to_256_classes() {
    let map = LabelMap {
        width: 3,
        height: 2,
        labels: vec![0, 1, 2, 3, 200, 255],
    };
    let png = encode_png(&map, 256).expect("encodable");
    match image::load_from_memory(&png).expect("valid PNG") {
        DynamicImage::ImageLuma8(img) => {
            assert_eq!(img.dimensions(), (3, 2));
            assert_eq!(img.into_raw(), vec![0, 1, 2, 3, 200, 255]);
        }
        other => panic!("expected an 8-bit grayscale image, got {:?}", other.color()),
    }
    let too_big = LabelMap {
        labels: vec![0, 1, 2, 3, 4, 256],
        ..map
    };
    assert!(matches!(encode_png(&too_big, 256), Err(HeadError::Png(_))));
}

#[test]
fn png_is_sixteen_bit_above_256_classes() {
    let map = LabelMap {
        width: 2,
        height: 2,
        labels: vec![0, 256, 299, 1],
    };
    let png = encode_png(&map, 300).expect("encodable");
    match image::load_from_memory(&png).expect("valid PNG") {
        DynamicImage::ImageLuma16(img) => {
            assert_eq!(img.dimensions(), (2, 2));
            assert_eq!(img.into_raw(), vec![0, 256, 299, 1]);
        }
        other => panic!("expected a 16-bit grayscale image, got {:?}", other.color()),
    }
}

#[test]
fn png_rejects_a_map_of_the_wrong_size() {
    let map = LabelMap {
        width: 2,
        height: 2,
        labels: vec![0; 3],
    };
    assert!(matches!(encode_png(&map, 2), Err(HeadError::Png(_))));
}

#[test]
fn coverage_orders_classes_by_fraction_and_sums_to_one() {
    let map = LabelMap {
        width: 4,
        height: 2,
        labels: vec![3, 3, 0, 7, 7, 3, 0, 9],
    };
    let cov = coverage(&map);
    let ids: Vec<u32> = cov.iter().map(|c| c.class_id).collect();
    assert_eq!(ids, vec![3, 0, 7, 9]);
    let fractions: Vec<f32> = cov.iter().map(|c| c.score).collect();
    assert_eq!(fractions, vec![0.375, 0.25, 0.25, 0.125]);
    assert!((fractions.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    let empty = LabelMap {
        width: 0,
        height: 0,
        labels: Vec::new(),
    };
    assert!(coverage(&empty).is_empty());
}

#[test]
fn params_deserialize_with_the_contract_default() {
    let parsed: SegmentationParams = toml::from_str("").expect("empty table");
    assert_eq!(parsed.output_stride, 4);
    let parsed: SegmentationParams = toml::from_str("output_stride = 8").expect("valid");
    assert_eq!(parsed.output_stride, 8);
    assert!(toml::from_str::<SegmentationParams>("stride = 8").is_err());
}

//! Serving the split model set gives the same numbers as the monolithic reference models
//! (backbone and head fused in one graph), for every head, through the server's own engine.

use ndarray::{ArrayD, IxDyn};
use polyhead_server::engine::{NamedTensors, Runtime, SessionWorker, Tensor};
use polyhead_server::media::preprocess::preprocess;
use polyhead_server::{Config, media};

use crate::common::{models_dir, photo, server};

const TOLERANCE: f32 = 1e-4;

/// Preprocessed real photos as one `[N, 3, H, W]` batch.
pub(crate) fn batch(names: &[&str]) -> Tensor {
    let spec = &server().pipeline.models().backbone.preprocess;
    let mut data = Vec::new();
    let mut dims = (0, 0);
    for name in names {
        let image = media::image::decode(&photo(name), &Default::default()).expect("decode photo");
        let (chw, geometry) = preprocess(&image, spec);
        dims = (
            geometry.input_height as usize,
            geometry.input_width as usize,
        );
        data.extend(chw);
    }
    let shape = IxDyn(&[names.len(), 3, dims.0, dims.1]);
    Tensor::from(ArrayD::from_shape_vec(shape, data).expect("batch shape"))
}

/// The monolithic reference model `reference_<kind>.onnx` (backbone and head fused), on its own
/// worker.
pub(crate) fn reference(kind: &str) -> SessionWorker {
    let config = Config::for_models(models_dir());
    let runtime = Runtime::init(&config.runtime).expect("ONNX Runtime");
    let path = models_dir().join(format!("reference_{kind}.onnx"));
    let session = runtime.load(&path).expect("reference model");
    SessionWorker::spawn(&format!("reference-{kind}"), session, 4).expect("worker")
}

/// Runs the served path (backbone, then the head on the features it consumes) and the
/// reference on `input`, and returns both outputs.
async fn both(head: &str, kind: &str, input: Tensor) -> (NamedTensors, NamedTensors) {
    let models = server().pipeline.models();
    let backbone = &models.backbone;
    let head = models.head(head).expect("head exists");
    let (features, _) = backbone
        .worker
        .run(vec![(backbone.spec.input.clone(), input.clone())])
        .await
        .expect("backbone");
    let inputs = head
        .spec
        .inputs
        .iter()
        .map(|name| {
            features
                .iter()
                .find(|(n, _)| n == name)
                .cloned()
                .expect("feature")
        })
        .collect();
    let (served, _) = head.worker.run(inputs).await.expect("head");
    let (expected, _) = reference(kind)
        .run(vec![(backbone.spec.input.clone(), input)])
        .await
        .expect("reference");
    (served, expected)
}

/// Asserts `served` has the outputs of `expected`, each within [`TOLERANCE`] and not constant.
pub(crate) fn assert_close(served: &NamedTensors, expected: &NamedTensors) {
    assert_eq!(served.len(), expected.len(), "same outputs");
    for (name, want) in expected {
        let got = served
            .iter()
            .find(|(n, _)| n == name)
            .expect("output served")
            .1
            .array()
            .expect("host-readable");
        let want = want.array().expect("host-readable");
        assert_eq!(got.shape(), want.shape(), "{name} shape");
        let diff = got
            .iter()
            .zip(want.iter())
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(
            diff <= TOLERANCE,
            "{name}: max |served - reference| = {diff}"
        );
        assert!(
            want.iter()
                .any(|v| *v != want.iter().next().copied().unwrap_or_default()),
            "{name} is constant"
        );
    }
}

#[tokio::test]
async fn detection_head_equals_its_reference() {
    let (served, expected) = both("detection", "detection", batch(&["astronaut.png"])).await;
    assert_close(&served, &expected);
}

#[tokio::test]
async fn segmentation_head_equals_its_reference() {
    let (served, expected) = both("segmentation", "segmentation", batch(&["coffee.png"])).await;
    assert_close(&served, &expected);
}

#[tokio::test]
async fn action_head_equals_its_reference() {
    let frames = ["astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg"];
    let (served, expected) = both("action", "action", batch(&frames)).await;
    assert_close(&served, &expected);
}

/// The reference model's outputs for one photo, post-processed exactly as the server does.
async fn reference_outputs(
    kind: &str,
    name: &str,
) -> (NamedTensors, polyhead_server::geometry::Geometry) {
    let spec = &server().pipeline.models().backbone.preprocess;
    let image = media::image::decode(&photo(name), &Default::default()).expect("decode photo");
    let (_, geometry) = preprocess(&image, spec);
    let input = server().pipeline.models().backbone.spec.input.clone();
    let (outputs, _) = reference(kind)
        .run(vec![(input, batch(&[name]))])
        .await
        .expect("reference");
    (outputs, geometry)
}

fn item<'a, D: ndarray::Dimension>(
    outputs: &'a NamedTensors,
    name: &str,
) -> ndarray::ArrayView<'a, f32, D> {
    let tensor = &outputs.iter().find(|(n, _)| n == name).expect("output").1;
    tensor
        .array()
        .expect("host-readable")
        .index_axis_move(ndarray::Axis(0), 0)
        .into_dimensionality::<D>()
        .expect("rank")
}

#[tokio::test]
async fn served_detections_equal_the_reference_models() {
    use polyhead_server::heads::detection::{self, DetectOptions, DetectionParams};
    let (outputs, geometry) = reference_outputs("detection", "chelsea.png").await;
    let params = DetectionParams::default();
    let options = DetectOptions {
        masks: true,
        ..DetectOptions::defaults(&params)
    };
    let expected = detection::postprocess(
        item(&outputs, "scores"),
        item(&outputs, "boxes"),
        item(&outputs, "mask_coeffs"),
        item(&outputs, "mask_protos"),
        &geometry,
        &params,
        &options,
    )
    .expect("post-process");
    let request = polyhead_proto::v1::DetectOptions {
        masks: true,
        ..Default::default()
    };
    let served = crate::common::client()
        .await
        .detect(crate::common::encoded(photo("chelsea.png")), request, "")
        .await
        .expect("detect")
        .detections
        .expect("detections")
        .detections;
    assert!(!expected.is_empty());
    assert_eq!(served.len(), expected.len());
    for (s, e) in served.iter().zip(&expected) {
        let b = s.r#box.expect("box");
        assert_eq!(s.class_id, e.class_id);
        assert!((s.score - e.score).abs() < 1e-4);
        let corners = [
            (b.x1, e.bbox.x1),
            (b.y1, e.bbox.y1),
            (b.x2, e.bbox.x2),
            (b.y2, e.bbox.y2),
        ];
        assert!(
            corners.iter().all(|(a, b)| (a - b).abs() < 1e-2),
            "{b:?} vs {:?}",
            e.bbox
        );
        let mask = s.mask.as_ref().expect("mask");
        assert_eq!(
            Some(&mask.counts),
            e.mask.as_ref().map(|m| &m.counts),
            "same RLE"
        );
    }
}

#[tokio::test]
async fn served_label_map_equals_the_reference_models() {
    use polyhead_server::heads::segmentation::{self, SegmentationParams};
    let (outputs, geometry) = reference_outputs("segmentation", "astronaut.png").await;
    let expected = segmentation::postprocess(
        item(&outputs, "logits"),
        &geometry,
        &SegmentationParams::default(),
        None,
    )
    .expect("post-process");
    let served = crate::common::client()
        .await
        .segment(
            crate::common::encoded(photo("astronaut.png")),
            Default::default(),
            "",
        )
        .await
        .expect("segment")
        .segmentation
        .expect("segmentation");
    let map = image::load_from_memory(&served.label_map_png)
        .expect("PNG")
        .to_luma8();
    let agree = map
        .pixels()
        .zip(&expected.labels)
        .filter(|(p, e)| u16::from(p.0[0]) == **e)
        .count();
    let fraction = agree as f64 / expected.labels.len() as f64;
    // Features agree to 1e-4; only pixels where two classes tie that closely may differ.
    assert!(fraction > 0.999, "{fraction} of pixels agree");
}

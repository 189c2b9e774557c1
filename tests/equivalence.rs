//! Serving the split model set gives the same numbers as the monolithic reference models
//! (backbone and head fused in one graph), for every head, through the server's own engine.

use std::sync::Arc;

use ndarray::{ArrayD, IxDyn};
use polyhead_server::engine::{NamedTensors, Runtime, SessionWorker, SharedTensor};
use polyhead_server::media::preprocess::preprocess;
use polyhead_server::{Config, media};

use crate::common::{models_dir, photo, server};

const TOLERANCE: f32 = 1e-4;

/// Preprocessed real photos as one `[N, 3, H, W]` batch.
fn batch(names: &[&str]) -> SharedTensor {
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
    Arc::new(ArrayD::from_shape_vec(shape, data).expect("batch shape"))
}

fn reference(kind: &str) -> SessionWorker {
    let config = Config::for_models(models_dir());
    let runtime = Runtime::init(&config.runtime).expect("ONNX Runtime");
    let path = models_dir().join(format!("reference_{kind}.onnx"));
    let session = runtime.load(&path).expect("reference model");
    SessionWorker::spawn(&format!("reference-{kind}"), session, 4).expect("worker")
}

/// Runs the served path (backbone, then the head on the features it consumes) and the
/// reference on `input`, and returns both outputs.
async fn both(head: &str, kind: &str, input: SharedTensor) -> (NamedTensors, NamedTensors) {
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

fn assert_close(served: &NamedTensors, expected: &NamedTensors) {
    assert_eq!(served.len(), expected.len(), "same outputs");
    for (name, want) in expected {
        let got = &served
            .iter()
            .find(|(n, _)| n == name)
            .expect("output served")
            .1;
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

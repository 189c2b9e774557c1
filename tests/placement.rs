//! Where backbone features are kept. With `--feature-placement device` (the default) the
//! backbone writes them, through an IoBinding, into ONNX Runtime values in the execution
//! provider's memory, the heads read them there, and batches are split, concatenated and stacked
//! by ONNX Runtime copies there: GPU memory under CUDA, host memory under the CPU provider (exact
//! size buffers from polyhead's pool), where these tests run the very same code path against
//! plain host arrays (`--feature-placement host`).

use polyhead_proto::v1;
use polyhead_server::Config;
use polyhead_server::engine::{Memory, Placement, Tensor};

use crate::common::{connect, encoded, make_clip, models_dir, photo, server, start_server};
use crate::equivalence::batch;

#[tokio::test]
async fn backbone_outputs_stay_in_runtime_memory_and_are_split_and_stacked_there() {
    let models = server().pipeline.models();
    assert_eq!(models.memory.memory(), Memory::Cpu);
    let input = batch(&["astronaut.png", "coffee.png", "chelsea.png"]);
    let backbone = &models.backbone;
    let (outputs, _) = backbone
        .worker
        .run(vec![(backbone.spec.input.clone(), input)])
        .await
        .expect("backbone");
    for (name, tensor) in &outputs {
        assert_eq!(
            tensor.memory(),
            Memory::Cpu,
            "{name} left where it was written"
        );
    }
    let features = outputs[0].1.clone();
    let host = features.to_host().expect("a host copy");
    assert_eq!(host.shape(), features.shape());

    let parts = models.memory.split(&features, &[1, 2]).expect("split");
    drop(outputs);
    drop(features);
    let expected = |from: usize, to: usize| host.slice_axis(ndarray::Axis(0), (from..to).into());
    assert_eq!(parts[0].memory(), Memory::Cpu);
    assert_eq!(parts[0].shape()[0], 1);
    assert_eq!(parts[1].shape()[0], 2);
    assert_eq!(parts[0].array().expect("readable"), expected(0, 1));
    assert_eq!(
        parts[1].array().expect("readable"),
        expected(1, 3),
        "each part is a copy of its range that outlives the batch"
    );

    let joined = models
        .memory
        .concat(&[&parts[1], &parts[0]])
        .expect("concat");
    assert_eq!(joined.memory(), Memory::Cpu);
    let want = ndarray::concatenate(ndarray::Axis(0), &[expected(1, 3), expected(0, 1)])
        .expect("host concat");
    assert_eq!(joined.array().expect("readable"), want.view());

    let from_host = Tensor::from(expected(2, 3).to_owned());
    let mixed = models
        .memory
        .concat(&[&parts[0], &from_host])
        .expect("a host part joins a runtime batch");
    assert_eq!(mixed.memory(), Memory::Cpu);
    let want = ndarray::concatenate(ndarray::Axis(0), &[expected(0, 1), expected(2, 3)])
        .expect("host concat");
    assert_eq!(mixed.array().expect("readable"), want.view());

    let err = models
        .memory
        .split(&joined, &[1, 1])
        .expect_err("3 items are not 2");
    assert!(err.contains("a batch of 2"), "{err}");
}

fn config(placement: Placement) -> Config {
    let mut config = Config::for_models(models_dir());
    config.cache.cache_bytes = 0;
    config.runtime.feature_placement = placement;
    config
}

/// The same requests on a server per placement: equal results, and each response says where its
/// features were.
#[tokio::test]
async fn device_and_host_placement_give_the_same_results() {
    let clip = make_clip(
        "testsrc=size=160x120:rate=10",
        2.0,
        "mp4",
        &["-c:v", "libx264", "-pix_fmt", "yuv420p"],
    );
    let mut answers = Vec::new();
    for (placement, memory) in [(Placement::Device, "cpu"), (Placement::Host, "host")] {
        let server = start_server(config(placement));
        assert_eq!(server.pipeline.models().memory.memory().to_string(), memory);
        let client = connect(server.addr).await;
        let image = encoded(photo("astronaut.png"));
        let masks = v1::DetectOptions {
            masks: true,
            score_threshold: Some(0.05),
            ..Default::default()
        };
        let analysis = client
            .analyze(
                image,
                vec!["detection".into(), "segmentation".into()],
                masks,
                Default::default(),
            )
            .await
            .expect("analyze");
        let action = client
            .recognize_video(clip.clone(), v1::ActionOptions::default(), "")
            .await
            .expect("recognize");
        for timings in [&analysis.timings, &action.timings] {
            let timings = timings.as_ref().expect("timings");
            assert_eq!(timings.feature_memory, memory, "{placement}");
            assert_eq!(timings.backbone_passes, 1);
        }
        answers.push((analysis.results, action.actions.expect("actions")));
    }
    let [(device_results, device_top), (host_results, host_top)] = answers.as_slice() else {
        unreachable!("two placements")
    };
    assert_eq!(device_results.len(), 2);
    for (device, host) in device_results.iter().zip(host_results) {
        use v1::head_result::Result as Output;
        match (&device.result, &host.result) {
            (Some(Output::Detections(d)), Some(Output::Detections(h))) => {
                assert!(!d.detections.is_empty(), "something is detected");
                assert_eq!(d.detections.len(), h.detections.len());
                for (a, b) in d.detections.iter().zip(&h.detections) {
                    assert_eq!((a.class_id, &a.mask), (b.class_id, &b.mask));
                    assert!((a.score - b.score).abs() < 1e-5, "{a:?} vs {b:?}");
                }
            }
            (Some(Output::Segmentation(d)), Some(Output::Segmentation(h))) => {
                assert_eq!(d.label_map_png, h.label_map_png, "the same label map");
            }
            other => panic!("unexpected pair of results: {other:?}"),
        }
    }
    assert_eq!(device_top.top.len(), host_top.top.len());
    for (a, b) in device_top.top.iter().zip(&host_top.top) {
        assert_eq!(a.class_id, b.class_id);
        assert!((a.score - b.score).abs() < 1e-5, "{a:?} vs {b:?}");
    }
}

//! Detect, Segment, Analyze and the model listing over gRPC on real photos.

use polyhead_proto::v1;
use polyhead_server::heads::rle;

use crate::common::{client, encoded, photo};

fn masks_on() -> v1::DetectOptions {
    v1::DetectOptions {
        masks: true,
        score_threshold: Some(0.05),
        ..Default::default()
    }
}

#[tokio::test]
async fn detect_returns_boxes_and_masks_inside_the_image() {
    let client = client().await;
    let response = client
        .detect(encoded(photo("astronaut.png")), masks_on(), "")
        .await
        .expect("detect");
    let detections = response.detections.expect("detections");
    assert_eq!(
        (detections.image_width, detections.image_height),
        (512, 512)
    );
    assert!(
        !detections.detections.is_empty(),
        "a low threshold finds something"
    );
    let mut previous = f32::INFINITY;
    for d in &detections.detections {
        assert!(
            d.score >= 0.05 && d.score <= 1.0 && d.score <= previous,
            "sorted scores"
        );
        previous = d.score;
        assert!(d.class_id < 80 && !d.label.is_empty());
        let b = d.r#box.expect("box");
        assert!(0.0 <= b.x1 && b.x1 < b.x2 && b.x2 <= 512.0, "{b:?}");
        assert!(0.0 <= b.y1 && b.y1 < b.y2 && b.y2 <= 512.0, "{b:?}");
        let mask = d.mask.as_ref().expect("masks were asked for");
        assert_eq!(mask.size, vec![512, 512]);
        let pixels = rle::decode(&mask.counts, 512, 512).expect("valid RLE");
        assert_mask_inside_box(&pixels, 512, b);
    }
    let timings = response.timings.expect("timings");
    assert_eq!(timings.backbone_passes, 1);
    assert_eq!(timings.heads.len(), 1);
    assert!(timings.total_ms >= timings.backbone_ms);
}

/// Every set pixel of a row-major mask lies inside the box (pixel centres).
fn assert_mask_inside_box(pixels: &[u8], width: usize, b: v1::Box) {
    for (i, _) in pixels.iter().enumerate().filter(|(_, p)| **p != 0) {
        let (x, y) = ((i % width) as f32 + 0.5, (i / width) as f32 + 0.5);
        assert!(
            x >= b.x1 && x <= b.x2 && y >= b.y1 && y <= b.y2,
            "pixel ({x}, {y}) outside {b:?}"
        );
    }
}

#[tokio::test]
async fn detect_options_filter_and_cap() {
    let client = client().await;
    let all = client
        .detect(
            encoded(photo("coffee.png")),
            v1::DetectOptions {
                score_threshold: Some(0.0),
                ..Default::default()
            },
            "",
        )
        .await
        .expect("detect")
        .detections
        .expect("detections");
    assert_eq!(all.detections.len(), 100, "the default cap");
    let class = all.detections[0].class_id;
    let options = v1::DetectOptions {
        score_threshold: Some(0.0),
        max_detections: 7,
        class_ids: vec![class],
        ..Default::default()
    };
    let some = client
        .detect(encoded(photo("coffee.png")), options, "")
        .await
        .expect("detect")
        .detections
        .expect("detections");
    assert_eq!(some.detections.len(), 7);
    assert!(
        some.detections
            .iter()
            .all(|d| d.class_id == class && d.mask.is_none())
    );
}

#[tokio::test]
async fn raw_pixels_and_png_give_the_same_detections() {
    let png = photo("chelsea.png");
    let rgb = image::load_from_memory(&png).expect("decode").to_rgb8();
    let raw = v1::Image {
        source: Some(v1::image::Source::Raw(v1::RawImage {
            width: rgb.width(),
            height: rgb.height(),
            rgb: rgb.into_raw().into(),
        })),
    };
    let client = client().await;
    let options = v1::DetectOptions {
        score_threshold: Some(0.1),
        ..Default::default()
    };
    let a = client
        .detect(encoded(png), options.clone(), "")
        .await
        .expect("png");
    let b = client.detect(raw, options, "").await.expect("raw");
    assert_eq!(a.detections, b.detections);
}

#[tokio::test]
async fn segment_returns_a_label_map_at_the_original_size() {
    let client = client().await;
    let response = client
        .segment(
            encoded(photo("coffee.png")),
            v1::SegmentOptions::default(),
            "",
        )
        .await
        .expect("segment");
    let seg = response.segmentation.expect("segmentation");
    assert_eq!((seg.width, seg.height), (600, 400));
    assert_eq!(seg.class_names.len(), 150);
    let map = image::load_from_memory(&seg.label_map_png)
        .expect("PNG")
        .to_luma8();
    assert_eq!(map.dimensions(), (600, 400));
    let mut counts = vec![0usize; 150];
    for p in map.pixels() {
        counts[p.0[0] as usize] += 1;
    }
    let total: f32 = seg.present.iter().map(|c| c.fraction).sum();
    assert!((total - 1.0).abs() < 1e-4, "fractions sum to {total}");
    for c in &seg.present {
        let expected = counts[c.class_id as usize] as f32 / (600.0 * 400.0);
        assert!((c.fraction - expected).abs() < 1e-6, "class {}", c.class_id);
        assert_eq!(c.label, seg.class_names[c.class_id as usize]);
    }
    assert_eq!(response.timings.expect("timings").backbone_passes, 1);
}

#[tokio::test]
async fn segment_restricted_to_chosen_classes() {
    let client = client().await;
    let options = v1::SegmentOptions {
        class_ids: vec![3, 12],
    };
    let seg = client
        .segment(encoded(photo("astronaut.png")), options, "")
        .await
        .expect("segment")
        .segmentation
        .expect("segmentation");
    assert!(
        seg.present
            .iter()
            .all(|c| c.class_id == 3 || c.class_id == 12),
        "{:?}",
        seg.present
    );
    let map = image::load_from_memory(&seg.label_map_png)
        .expect("PNG")
        .to_luma8();
    assert!(map.pixels().all(|p| p.0[0] == 3 || p.0[0] == 12));
}

#[tokio::test]
async fn analyze_runs_the_backbone_once_for_two_heads() {
    let client = client().await;
    let image = encoded(photo("astronaut.png"));
    let response = client
        .analyze(
            image.clone(),
            vec!["detection".into(), "segmentation".into()],
            masks_on(),
            Default::default(),
        )
        .await
        .expect("analyze");
    let timings = response.timings.expect("timings");
    assert_eq!(
        timings.backbone_passes, 1,
        "one backbone pass for two heads"
    );
    assert_eq!(timings.backbone_images, 1);
    assert_eq!(timings.heads.len(), 2);
    assert_eq!(response.results.len(), 2);
    let detect = client
        .detect(image.clone(), masks_on(), "")
        .await
        .expect("detect");
    let segment = client
        .segment(image, v1::SegmentOptions::default(), "")
        .await
        .expect("segment");
    let [det, seg] = response.results.as_slice() else {
        unreachable!("two results")
    };
    assert_eq!(
        det.result,
        Some(v1::head_result::Result::Detections(
            detect.detections.expect("d")
        ))
    );
    assert_eq!(
        seg.result,
        Some(v1::head_result::Result::Segmentation(
            segment.segmentation.expect("s")
        ))
    );
}

#[tokio::test]
async fn list_and_get_models_describe_the_set() {
    let client = client().await;
    let list = client.list_models().await.expect("list");
    let backbone = list.backbone.expect("backbone");
    assert_eq!((backbone.input_width, backbone.input_height), (224, 224));
    assert_eq!(backbone.execution_provider, "cpu");
    assert_eq!(backbone.outputs.len(), 4);
    let labels: Vec<_> = list
        .heads
        .iter()
        .map(|h| (h.name.as_str(), h.labels.len()))
        .collect();
    assert_eq!(
        labels,
        [("detection", 80), ("segmentation", 150), ("action", 400)]
    );
    let action = client.get_model("action").await.expect("get");
    assert_eq!(action.kind(), v1::HeadKind::Action);
    let missing = client.get_model("nope").await.expect_err("unknown model");
    assert_eq!(missing.code(), Some(tonic::Code::NotFound));
    assert!(
        missing
            .to_string()
            .contains("detection, segmentation, action)"),
        "{missing}"
    );
    // A name of a megabyte is quoted in part, so the status fits in any peer's header limit.
    let long = client
        .get_model(&"n".repeat(1 << 20))
        .await
        .expect_err("unknown model");
    assert_eq!(long.code(), Some(tonic::Code::NotFound), "{long}");
    assert!(
        long.to_string().len() < 2048,
        "{} bytes",
        long.to_string().len()
    );
}

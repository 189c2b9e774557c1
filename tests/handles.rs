//! Feature handles end to end: ExtractFeatures, then heads on the handle instead of the image.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use polyhead_client::{Client, ClientError, handle_image};
use polyhead_proto::v1;
use polyhead_server::Config;
use tonic::Code;

use crate::common::{client, encoded, models_dir, photo, start_server};

fn masks() -> v1::DetectOptions {
    v1::DetectOptions {
        score_threshold: Some(0.05),
        masks: true,
        ..Default::default()
    }
}

fn heads() -> Vec<String> {
    vec!["detection".into(), "segmentation".into()]
}

/// Asserts that `timings` come from kept features: no decode, no backbone pass.
fn assert_from_handle(timings: Option<v1::Timings>, what: &str) {
    let t = timings.expect("timings");
    assert!(t.features_cached, "{what}: features kept");
    assert_eq!((t.backbone_passes, t.backbone_images), (0, 0), "{what}");
    assert_eq!((t.decode_ms, t.backbone_ms), (0.0, 0.0), "{what}");
}

/// Asserts that `err` is NOT_FOUND naming an unknown or expired handle.
fn assert_not_found(err: &ClientError) {
    assert_eq!(err.code(), Some(Code::NotFound), "{err}");
    assert!(err.to_string().contains("unknown or expired"), "{err}");
}

fn unix_ms_now() -> i64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after the epoch");
    i64::try_from(now.as_millis()).expect("in range")
}

async fn extract(client: &Client, image: v1::Image) -> v1::ExtractFeaturesResponse {
    client.extract_features(image).await.expect("extract")
}

#[tokio::test]
async fn heads_on_a_handle_equal_heads_on_the_image() {
    let client = client().await;
    let image = || encoded(photo("chelsea.png"));
    let before = unix_ms_now();
    let extracted = extract(&client, image()).await;
    let t = extracted.timings.expect("timings");
    assert_eq!((t.backbone_passes, t.backbone_images), (1, 1));
    assert_eq!((extracted.image_width, extracted.image_height), (451, 300));
    assert_eq!(extracted.handle.len(), 32);
    let ttl_ms = 600_000;
    let expiry = extracted.expires_at_unix_ms;
    assert!(expiry >= before + ttl_ms && expiry <= unix_ms_now() + ttl_ms);
    let handle = || handle_image(extracted.handle.clone());
    let segment = v1::SegmentOptions::default();

    let detected = client.detect(handle(), masks(), "").await.expect("detect");
    assert_from_handle(detected.timings, "detect");
    let reference = client.detect(image(), masks(), "").await.expect("detect");
    assert_eq!(detected.detections, reference.detections);

    let segmented = client
        .segment(handle(), segment.clone(), "")
        .await
        .expect("segment");
    assert_from_handle(segmented.timings, "segment");
    let reference = client
        .segment(image(), segment.clone(), "")
        .await
        .expect("segment");
    assert_eq!(segmented.segmentation, reference.segmentation);

    let analysed = client
        .analyze(handle(), heads(), masks(), segment.clone())
        .await
        .expect("analyze");
    assert_from_handle(analysed.timings, "analyze");
    let reference = client
        .analyze(image(), heads(), masks(), segment)
        .await
        .expect("analyze");
    assert_eq!(analysed.results, reference.results);
}

#[tokio::test]
async fn an_unknown_handle_is_not_found() {
    let client = client().await;
    let unknown = handle_image("0123456789abcdef0123456789abcdef");
    let err = client
        .detect(unknown.clone(), masks(), "")
        .await
        .expect_err("unknown handle");
    assert_not_found(&err);
    assert!(err.to_string().contains("'01234567…'"), "{err}");
    let err = client
        .analyze(unknown, heads(), masks(), v1::SegmentOptions::default())
        .await
        .expect_err("unknown handle");
    assert_not_found(&err);
    let err = client
        .segment(handle_image(""), v1::SegmentOptions::default(), "")
        .await
        .expect_err("empty handle");
    assert_eq!(err.code(), Some(Code::InvalidArgument), "{err}");
}

#[tokio::test]
async fn a_handle_expires_after_its_time_to_live() {
    let mut config = Config::for_models(models_dir());
    config.cache.cache_bytes = 0;
    config.handles.handle_ttl_seconds = 1;
    let server = start_server(config);
    let client = crate::common::connect(server.addr).await;
    let extracted = extract(&client, encoded(photo("coffee.png"))).await;
    assert!(extracted.expires_at_unix_ms <= unix_ms_now() + 1_000);
    let handle = || handle_image(extracted.handle.clone());
    let segment = || v1::SegmentOptions::default();
    let deadline = Instant::now() + Duration::from_secs(10);
    let err = loop {
        match client.segment(handle(), segment(), "").await {
            Ok(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ok(_) => panic!("the handle outlived its 1 s time-to-live by 9 s"),
            Err(err) => break err,
        }
    };
    assert_not_found(&err);
    assert!(err.to_string().contains("handles live 1 s"), "{err}");
}

#[tokio::test]
async fn each_extraction_gives_a_distinct_handle() {
    let client = client().await;
    let image = || encoded(photo("chelsea.png"));
    let first = extract(&client, image()).await;
    let second = extract(&client, image()).await;
    assert_ne!(first.handle, second.handle);
    let renewed = extract(&client, handle_image(first.handle.clone())).await;
    assert_from_handle(renewed.timings, "a handle of a handle");
    let handles = [first.handle, second.handle, renewed.handle];
    assert_ne!(handles[2], handles[0]);
    assert_ne!(handles[2], handles[1]);
    for handle in handles {
        let segmented = client
            .segment(handle_image(handle), v1::SegmentOptions::default(), "")
            .await
            .expect("every handle works");
        assert_from_handle(segmented.timings, "segment");
    }
}

//! The backbone feature cache end to end, on servers of these tests' own with the cache on. The
//! shared server runs with the cache off and gives the uncached results to compare with.

use std::sync::OnceLock;

use polyhead_client::Client;
use polyhead_proto::v1;
use polyhead_server::Config;

use crate::common::{TestServer, client, encoded, models_dir, photo, start_server};

/// The server every cache test but the single-flight one shares.
static CACHED: OnceLock<TestServer> = OnceLock::new();

/// A server with the default feature cache (256 MiB, 5 minutes).
fn cached_config() -> Config {
    let config = Config::for_models(models_dir());
    assert!(config.cache.cache_bytes > 0, "the cache is on by default");
    config
}

async fn cached_client() -> Client {
    crate::common::connect(CACHED.get_or_init(|| start_server(cached_config())).addr).await
}

/// A raw image of `width` x `height` pixels of noise that `seed` determines, so that each test
/// sends images no other test sends.
fn noise(seed: u64, width: u32, height: u32) -> (v1::Image, image::RgbImage) {
    let rgb = crate::common::noise_rgb(seed, width, height);
    let image = v1::Image {
        source: Some(v1::image::Source::Raw(v1::RawImage {
            width,
            height,
            rgb: rgb.clone().into(),
        })),
    };
    let pixels = image::RgbImage::from_raw(width, height, rgb).expect("sized buffer");
    (image, pixels)
}

fn png(pixels: &image::RgbImage) -> v1::Image {
    let mut out = std::io::Cursor::new(Vec::new());
    pixels
        .write_to(&mut out, image::ImageFormat::Png)
        .expect("encode PNG");
    encoded(out.into_inner())
}

fn masks() -> v1::DetectOptions {
    v1::DetectOptions {
        score_threshold: Some(0.05),
        masks: true,
        ..Default::default()
    }
}

/// Asserts that `timings` come from a run of the request's own.
fn assert_computed(timings: Option<v1::Timings>, what: &str) {
    let t = timings.expect("timings");
    assert!(!t.features_cached, "{what}: computed");
    assert_eq!((t.backbone_passes, t.backbone_images), (1, 1), "{what}");
}

/// Asserts that `timings` come from cached features: no backbone pass.
fn assert_cached(timings: Option<v1::Timings>, what: &str) {
    let t = timings.expect("timings");
    assert!(t.features_cached, "{what}: cached");
    assert_eq!((t.backbone_passes, t.backbone_images), (0, 0), "{what}");
    assert_eq!(t.backbone_ms, 0.0, "{what}");
}

#[tokio::test]
async fn segment_after_detect_reuses_the_features_and_gives_the_uncached_result() {
    let cached = cached_client().await;
    let uncached = client().await;
    let image = || encoded(photo("chelsea.png"));
    let segment = v1::SegmentOptions::default();

    let detected = cached.detect(image(), masks(), "").await.expect("detect");
    assert_computed(detected.timings, "first sight");
    let segmented = cached
        .segment(image(), segment.clone(), "")
        .await
        .expect("segment");
    assert_cached(segmented.timings, "segment after detect");
    let analysed = cached
        .analyze(
            image(),
            vec!["detection".into(), "segmentation".into()],
            masks(),
            segment.clone(),
        )
        .await
        .expect("analyze");
    assert_cached(analysed.timings, "analyze after detect");

    let reference_detect = uncached.detect(image(), masks(), "").await.expect("detect");
    assert_computed(reference_detect.timings, "cache off");
    let reference_segment = uncached
        .segment(image(), segment, "")
        .await
        .expect("segment");
    assert_computed(reference_segment.timings, "cache off");
    assert_eq!(detected.detections, reference_detect.detections);
    assert_eq!(segmented.segmentation, reference_segment.segmentation);
    let expected = [
        v1::head_result::Result::Detections(reference_detect.detections.expect("detections")),
        v1::head_result::Result::Segmentation(
            reference_segment.segmentation.expect("segmentation"),
        ),
    ];
    let results: Vec<_> = analysed.results.into_iter().map(|r| r.result).collect();
    assert_eq!(results, expected.map(Some));
}

#[tokio::test]
async fn concurrent_identical_requests_share_one_backbone_run() {
    const CALLS: usize = 8;
    let own = start_server(cached_config());
    let client = crate::common::connect(own.addr).await;
    let (image, _) = noise(7, 160, 120);
    let runs_before = own.pipeline.backbone_runs();
    let calls = (0..CALLS).map(|_| client.detect(image.clone(), masks(), ""));
    let responses = futures_util::future::try_join_all(calls)
        .await
        .expect("detect");
    assert_eq!(
        own.pipeline.backbone_runs() - runs_before,
        1,
        "one backbone run for {CALLS} identical calls"
    );
    let timings: Vec<v1::Timings> = responses
        .iter()
        .map(|r| r.timings.clone().expect("timings"))
        .collect();
    let ran: Vec<_> = timings.iter().filter(|t| t.backbone_passes == 1).collect();
    assert_eq!(
        ran.len(),
        1,
        "exactly one call reports the pass: {timings:?}"
    );
    assert!(!ran[0].features_cached);
    let waited = timings.iter().filter(|t| t.features_cached).count();
    assert_eq!(waited, CALLS - 1, "the others share it: {timings:?}");
    assert!(
        timings
            .iter()
            .all(|t| t.backbone_passes + u32::from(t.features_cached) == 1)
    );
    for response in &responses[1..] {
        assert_eq!(response.detections, responses[0].detections);
    }
}

#[tokio::test]
async fn different_images_do_not_collide() {
    let cached = cached_client().await;
    let uncached = client().await;
    let options = v1::SegmentOptions::default();
    let images = [noise(11, 96, 80).0, noise(12, 96, 80).0];
    let mut references = Vec::new();
    for image in &images {
        let first = cached
            .segment(image.clone(), options.clone(), "")
            .await
            .expect("segment");
        assert_computed(first.timings, "a new image");
        let reference = uncached
            .segment(image.clone(), options.clone(), "")
            .await
            .expect("segment");
        assert_eq!(first.segmentation, reference.segmentation);
        references.push(reference.segmentation);
    }
    assert_ne!(
        references[0], references[1],
        "the two noise images segment differently, or this test proves nothing"
    );
    for (image, reference) in images.iter().zip(&references) {
        let again = cached
            .segment(image.clone(), options.clone(), "")
            .await
            .expect("segment");
        assert_cached(again.timings, "seen before");
        assert_eq!(&again.segmentation, reference);
    }
}

#[tokio::test]
async fn the_key_is_the_preprocessed_image_not_its_encoding() {
    let cached = cached_client().await;
    let (raw, pixels) = noise(21, 128, 96);
    let options = v1::DetectOptions::default();
    let from_png = cached
        .detect(png(&pixels), options.clone(), "")
        .await
        .expect("png");
    assert_computed(from_png.timings, "png");
    let from_raw = cached.detect(raw, options, "").await.expect("raw");
    assert_cached(from_raw.timings, "the same pixels, raw");
    assert_eq!(from_png.detections, from_raw.detections);
}

#[tokio::test]
async fn clips_do_not_use_the_cache() {
    let cached = cached_client().await;
    let frames: Vec<Vec<u8>> = (0..2)
        .map(|seed| {
            let (_, pixels) = noise(31 + seed, 64, 48);
            let mut out = std::io::Cursor::new(Vec::new());
            pixels
                .write_to(&mut out, image::ImageFormat::Png)
                .expect("encode PNG");
            out.into_inner()
        })
        .collect();
    for _ in 0..2 {
        let response = cached
            .recognize_frames(frames.clone(), 1.0, v1::ActionOptions::default(), "")
            .await
            .expect("recognize");
        let t = response.timings.expect("timings");
        assert!(!t.features_cached);
        assert_eq!((t.backbone_passes, t.backbone_images), (1, 2));
    }
}

//! Dynamic batching of backbone and head runs end to end, on servers of these tests' own with the
//! feature cache off: concurrent requests share backbone runs and detection-head runs and each
//! still gets its own image's result, as an unbatched server gives it; a request whose caller has
//! gone is never computed; the thread that owns a session serves plain runs beside its batches.

use std::time::Duration;

use polyhead_proto::v1;
use polyhead_server::Config;
use tonic::Code;

use crate::common::{models_dir, start_server};

/// A server config with the cache off and batches of `max_batch` images or `delay_ms`.
fn config(max_batch: u32, delay_ms: u64) -> Config {
    let mut config = Config::for_models(models_dir());
    config.cache.cache_bytes = 0;
    config.batch.max_batch = max_batch;
    config.batch.max_batch_delay_ms = delay_ms;
    config
}

/// A raw image of noise that `seed` determines, its size varying with the seed.
pub(crate) fn noise(seed: u64) -> v1::Image {
    let (width, height) = (96 + 8 * seed as u32, 80 + 4 * seed as u32);
    let rgb = crate::common::noise_rgb(seed, width, height);
    v1::Image {
        source: Some(v1::image::Source::Raw(v1::RawImage {
            width,
            height,
            rgb: rgb.into(),
        })),
    }
}

pub(crate) fn options() -> v1::DetectOptions {
    v1::DetectOptions {
        score_threshold: Some(0.05),
        ..Default::default()
    }
}

/// Asserts `got` equals `want` within float tolerances: same classes, scores within 1e-4,
/// boxes within 1e-2 pixels.
pub(crate) fn assert_same_detections(got: &v1::Detections, want: &v1::Detections, what: &str) {
    assert_eq!(got.detections.len(), want.detections.len(), "{what}");
    for (g, w) in got.detections.iter().zip(&want.detections) {
        assert_eq!(g.class_id, w.class_id, "{what}");
        assert!((g.score - w.score).abs() < 1e-4, "{what}: {g:?} vs {w:?}");
        let (gb, wb) = (
            g.r#box.as_ref().expect("box"),
            w.r#box.as_ref().expect("box"),
        );
        let corners = [
            (gb.x1, wb.x1),
            (gb.y1, wb.y1),
            (gb.x2, wb.x2),
            (gb.y2, wb.y2),
        ];
        for (a, b) in corners {
            assert!((a - b).abs() < 1e-2, "{what}: {gb:?} vs {wb:?}");
        }
    }
}

#[tokio::test]
async fn concurrent_calls_share_backbone_runs_and_get_their_own_results() {
    const CALLS: u64 = 8;
    let batched = start_server(config(8, 100));
    let unbatched = start_server(config(1, 0));
    let client = crate::common::connect(batched.addr).await;
    let runs_before = batched.pipeline.backbone_runs();
    let images_before = batched.pipeline.backbone_images();
    let head = batched
        .pipeline
        .models()
        .head("detection")
        .expect("detection head");
    let head_runs_before = head.runs().expect("the detection head batches");
    let calls = (0..CALLS).map(|seed| client.detect(noise(seed), options(), ""));
    let responses = futures_util::future::try_join_all(calls)
        .await
        .expect("detect");
    let runs = batched.pipeline.backbone_runs() - runs_before;
    assert!(
        runs < CALLS,
        "{CALLS} concurrent calls took {runs} backbone runs"
    );
    assert_eq!(batched.pipeline.backbone_images() - images_before, CALLS);
    let head_runs = head.runs().expect("the detection head batches") - head_runs_before;
    assert!(
        head_runs < CALLS,
        "{CALLS} concurrent calls took {head_runs} detection head runs"
    );

    let reference = crate::common::connect(unbatched.addr).await;
    let mut found = 0;
    for (seed, response) in (0..CALLS).zip(&responses) {
        let t = response.timings.clone().expect("timings");
        assert_eq!(
            (t.backbone_passes, t.backbone_images),
            (1, 1),
            "call {seed}"
        );
        assert!(!t.features_cached);
        let want = reference
            .detect(noise(seed), options(), "")
            .await
            .expect("detect")
            .detections
            .expect("detections");
        let got = response.detections.as_ref().expect("detections");
        assert_same_detections(got, &want, &format!("image {seed}"));
        found += want.detections.len();
    }
    assert!(
        found > 0,
        "no detections at all, or this test proves nothing"
    );
}

#[tokio::test]
async fn a_call_that_gives_up_before_its_batch_runs_is_not_computed() {
    let own = start_server(config(8, 1_000));
    let client = crate::common::connect(own.addr).await;
    let runs_before = own.pipeline.backbone_runs();
    let images_before = own.pipeline.backbone_images();
    let mut request = tonic::Request::new(v1::DetectRequest {
        image: Some(noise(20)),
        options: Some(options()),
        head: String::new(),
    });
    request.set_timeout(Duration::from_millis(200));
    let status = client
        .raw()
        .detect(request)
        .await
        .expect_err("the batch waits longer than the deadline");
    // The server's deadline or the client's own, whichever fires first: either way the caller
    // is gone.
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status:?}"
    );
    // This call joins the batch the first one waited in, or the next: either way it runs.
    let kept = client
        .detect(noise(21), options(), "")
        .await
        .expect("detect");
    assert_eq!(kept.timings.expect("timings").backbone_passes, 1);
    assert_eq!(own.pipeline.backbone_runs() - runs_before, 1);
    assert_eq!(
        own.pipeline.backbone_images() - images_before,
        1,
        "the abandoned image never went through the backbone"
    );
}

#[tokio::test]
async fn a_session_thread_serves_plain_runs_and_batches_side_by_side() {
    const CALLS: u64 = 4;
    let own = start_server(config(8, 20));
    let client = crate::common::connect(own.addr).await;
    let backbone = &own.pipeline.models().backbone;
    let named = || {
        vec![(
            backbone.spec.input.clone(),
            crate::equivalence::batch(&["astronaut.png"]),
        )]
    };
    let (alone, _) = backbone.worker.run(named()).await.expect("a plain run");
    let runs_before = own.pipeline.backbone_runs();
    // Plain runs (as ModelInfer sends them) queue on the backbone's thread while Detect calls
    // queue on its batcher, which the same thread serves.
    let plain = (0..CALLS).map(|_| backbone.worker.run(named()));
    let calls = (0..CALLS).map(|seed| client.detect(noise(seed), options(), ""));
    let (plain, calls) = tokio::join!(
        futures_util::future::try_join_all(plain),
        futures_util::future::try_join_all(calls)
    );
    for (outputs, _) in plain.expect("plain runs") {
        crate::equivalence::assert_close(&outputs, &alone);
    }
    for response in calls.expect("batched calls") {
        let timings = response.timings.expect("timings");
        assert_eq!((timings.backbone_passes, timings.backbone_images), (1, 1));
    }
    let runs = own.pipeline.backbone_runs() - runs_before;
    assert!(
        (1..=CALLS).contains(&runs),
        "{CALLS} Detect calls took {runs} batched backbone runs"
    );
}

//! RecognizeActionWindows: long videos as sliding windows, streamed. Each sampled frame goes
//! through the backbone once however many windows hold it, each window scores as
//! RecognizeAction does on exactly its frames, and uploads, errors and cancellations behave.

use std::sync::OnceLock;
use std::time::Duration;

use polyhead_client::v1;
use polyhead_client::v1::recognize_action_windows_response::Event;
use polyhead_server::Config;

use crate::common::{self, TestServer};

/// A server of this module's own with the feature cache off, so that its backbone counter
/// moves only with what a test sends it.
fn own_server(slot: &'static OnceLock<TestServer>, max_video_bytes: u64) -> &'static TestServer {
    slot.get_or_init(|| {
        let mut config = Config::for_models(common::models_dir());
        config.cache.cache_bytes = 0;
        config.limits.max_video_bytes = max_video_bytes;
        common::start_server(config)
    })
}

/// A 4 s, 10 fps testsrc clip in lossless PNG-in-Matroska, so that frames the ffmpeg CLI
/// extracts from it are exactly the frames the server decodes.
pub(crate) fn lossless_clip() -> Vec<u8> {
    common::make_clip("testsrc=size=160x120:rate=10", 4.0, "mkv", &["-c:v", "png"])
}

/// The clip's frames as PNG files, extracted with the ffmpeg CLI.
pub(crate) fn png_frames(clip: &[u8]) -> Vec<Vec<u8>> {
    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("clip.mkv");
    std::fs::write(&input, clip).expect("write clip");
    let pattern = dir.path().join("f%04d.png");
    let status = std::process::Command::new("ffmpeg")
        .args(["-loglevel", "error", "-y", "-i"])
        .arg(&input)
        .args(["-fps_mode", "passthrough"])
        .arg(&pattern)
        .status()
        .expect("the ffmpeg CLI");
    assert!(status.success(), "ffmpeg failed to extract frames");
    let mut paths: Vec<_> = std::fs::read_dir(dir.path())
        .expect("read frames")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "png"))
        .collect();
    paths.sort();
    paths
        .iter()
        .map(|p| std::fs::read(p).expect("frame"))
        .collect()
}

pub(crate) fn window_options(window_frames: u32, window_stride: u32) -> v1::WindowOptions {
    v1::WindowOptions {
        window_frames,
        window_stride,
        top_k: 5,
        ..v1::WindowOptions::default()
    }
}

/// Everything a stream sent: its windows, its summary and the status it ended with, if not OK.
pub(crate) struct Collected {
    pub(crate) windows: Vec<v1::ActionWindow>,
    summary: Option<v1::WindowsSummary>,
    last_progress: Option<v1::WindowProgress>,
    pub(crate) error: Option<tonic::Status>,
}

/// Streams `clip` in windows of 8 and waits for the first window; the rest is still to come.
async fn first_window_of(
    client: &polyhead_client::Client,
    clip: Vec<u8>,
) -> tonic::Streaming<v1::RecognizeActionWindowsResponse> {
    let mut stream = client
        .recognize_windows(clip, window_options(8, 8), 1 << 20)
        .await
        .expect("stream");
    let first = stream
        .message()
        .await
        .expect("a window")
        .expect("not ended");
    assert!(matches!(first.event, Some(Event::Window(_))));
    stream
}

pub(crate) async fn collect(
    mut stream: tonic::Streaming<v1::RecognizeActionWindowsResponse>,
) -> Collected {
    let mut collected = Collected {
        windows: Vec::new(),
        summary: None,
        last_progress: None,
        error: None,
    };
    loop {
        match stream.message().await {
            Ok(Some(message)) => {
                collected.last_progress = message.progress;
                match message.event {
                    Some(Event::Window(w)) => collected.windows.push(w),
                    Some(Event::Summary(s)) => collected.summary = Some(s),
                    None => panic!("a response without an event"),
                }
            }
            Ok(None) => return collected,
            Err(status) => {
                collected.error = Some(status);
                return collected;
            }
        }
    }
}

#[tokio::test]
async fn each_frame_passes_the_backbone_once_and_windows_match_recognize_action() {
    static SERVER: OnceLock<TestServer> = OnceLock::new();
    let server = own_server(&SERVER, 512 << 20);
    let client = common::connect(server.addr).await;
    let clip = lossless_clip();
    let (length, stride) = (8usize, 4usize);
    let before = server.pipeline.backbone_images();
    let stream = client
        .recognize_windows(clip.clone(), window_options(8, 4), 1 << 20)
        .await
        .expect("stream starts");
    let got = collect(stream).await;
    let images = server.pipeline.backbone_images() - before;
    assert!(got.error.is_none(), "{:?}", got.error);

    // 40 frames, windows of 8 every 4: floor((40 - 8) / 4) + 1 = 9 windows, 72 window frames,
    // but 40 backbone images.
    let frames = 40usize;
    let expected_windows = (frames - length) / stride + 1;
    assert_eq!(got.windows.len(), expected_windows);
    assert_eq!(images, frames as u64, "each sampled frame once");
    let summary = got.summary.expect("a summary");
    assert_eq!((summary.windows, summary.frames_sampled), (9, 40));
    assert_eq!(summary.video_bytes, clip.len() as u64);
    let totals = summary.timings.expect("totals");
    assert_eq!(totals.backbone_images, 40);
    assert_eq!(totals.backbone_passes, 9);
    let progress = got.last_progress.expect("progress");
    assert_eq!(
        (progress.frames_estimated, progress.windows_estimated),
        (40, 9)
    );
    assert!(
        (progress.duration_s - 4.0).abs() < 0.2,
        "{}",
        progress.duration_s
    );

    for (k, window) in got.windows.iter().enumerate() {
        assert_eq!(window.index as usize, k);
        assert_eq!(window.first_frame as usize, k * stride);
        let expected: Vec<f64> = (0..length)
            .map(|j| (k * stride + j) as f64 / 10.0)
            .collect();
        assert_eq!(window.frame_timestamps.len(), length);
        for (t, e) in window.frame_timestamps.iter().zip(&expected) {
            assert!(
                (t - e).abs() < 1e-6,
                "window {k}: {:?}",
                window.frame_timestamps
            );
        }
        assert!((window.start_s - expected[0]).abs() < 1e-6);
        assert!((window.end_s - expected[length - 1]).abs() < 1e-6);
        let timings = window.timings.as_ref().expect("timings");
        let new_frames = if k == 0 { length } else { stride };
        assert_eq!(timings.backbone_images as usize, new_frames, "window {k}");
        assert_eq!(timings.backbone_passes, 1);
    }

    // Each window scores as RecognizeAction on exactly its frames.
    let pngs = png_frames(&clip);
    assert_eq!(pngs.len(), frames);
    for window in &got.windows {
        let first = window.first_frame as usize;
        let list = pngs[first..first + length].to_vec();
        let action = v1::ActionOptions {
            num_frames: length as u32,
            frame_stride: 0,
            top_k: 5,
        };
        let reference = client
            .recognize_frames(list, 10.0, action, "")
            .await
            .expect("RecognizeAction");
        let top = reference.actions.expect("actions").top;
        assert_eq!(top.len(), window.top.len());
        for (a, b) in window.top.iter().zip(&top) {
            assert_eq!(a.class_id, b.class_id, "window {}", window.index);
            assert_eq!(a.label, b.label);
            assert!(
                (a.score - b.score).abs() < 1e-4,
                "{} vs {}",
                a.score,
                b.score
            );
        }
    }
}

/// A server whose backbone runs take at most 3 images, its feature cache off.
fn small_batches() -> &'static TestServer {
    static SMALL_BATCHES: OnceLock<TestServer> = OnceLock::new();
    SMALL_BATCHES.get_or_init(|| {
        let mut config = Config::for_models(common::models_dir());
        config.cache.cache_bytes = 0;
        config.batch.max_batch = 3;
        common::start_server(config)
    })
}

/// Checks that two top-k lists name the same classes in the same order, with scores within 1e-4.
pub(crate) fn assert_same_top(got: &[v1::ActionScore], want: &[v1::ActionScore], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (x, y) in got.iter().zip(want) {
        assert_eq!(x.class_id, y.class_id, "{what}");
        assert_eq!(x.label, y.label, "{what}");
        assert!(
            (x.score - y.score).abs() < 1e-4,
            "{what}: {} vs {}",
            x.score,
            y.score
        );
    }
}

#[tokio::test]
async fn a_clips_frames_run_in_backbone_runs_of_at_most_max_batch() {
    let server = small_batches();
    let frames = png_frames(&lossless_clip());
    let options = v1::ActionOptions {
        num_frames: 8,
        top_k: 5,
        ..Default::default()
    };
    let before = server.pipeline.backbone_images();
    let got = common::connect(server.addr)
        .await
        .recognize_frames(frames.clone(), 10.0, options, "")
        .await
        .expect("RecognizeAction");
    let timings = got.timings.as_ref().expect("timings");
    // 8 frames as 3 + 3 + 2, each frame once.
    assert_eq!((timings.backbone_passes, timings.backbone_images), (3, 8));
    assert_eq!(server.pipeline.backbone_images() - before, 8);

    // The same scores as one run over all 8 frames.
    let default = common::server();
    assert_eq!(default.pipeline.models().backbone.max_batch(), 8);
    let reference = common::connect(default.addr)
        .await
        .recognize_frames(frames, 10.0, options, "")
        .await
        .expect("reference RecognizeAction");
    let one_run = reference.timings.as_ref().expect("timings");
    assert_eq!((one_run.backbone_passes, one_run.backbone_images), (1, 8));
    let (got, reference) = (
        got.actions.expect("actions"),
        reference.actions.expect("reference actions"),
    );
    assert_eq!(got.frame_timestamps, reference.frame_timestamps);
    assert_same_top(&got.top, &reference.top, "clip");
}

#[tokio::test]
async fn new_frames_are_split_into_backbone_runs_of_at_most_max_batch() {
    let server = small_batches();
    assert_eq!(server.pipeline.models().backbone.max_batch(), 3);
    let client = common::connect(server.addr).await;
    let clip = lossless_clip();
    let before = server.pipeline.backbone_images();
    let got = collect(
        client
            .recognize_windows(clip.clone(), window_options(8, 4), 1 << 20)
            .await
            .expect("stream starts"),
    )
    .await;
    let images = server.pipeline.backbone_images() - before;
    assert!(got.error.is_none(), "{:?}", got.error);

    // 40 frames, windows of 8 every 4: the first window runs its 8 new frames as 3 + 3 + 2,
    // each later one its 4 new frames as 3 + 1; still each sampled frame once.
    assert_eq!(got.windows.len(), 9);
    assert_eq!(images, 40, "each sampled frame once");
    for (k, window) in got.windows.iter().enumerate() {
        let timings = window.timings.as_ref().expect("timings");
        let (new_frames, passes) = if k == 0 { (8, 3) } else { (4, 2) };
        assert_eq!(timings.backbone_images, new_frames, "window {k}");
        assert_eq!(timings.backbone_passes, passes, "window {k}");
    }
    let totals = got.summary.expect("a summary").timings.expect("totals");
    assert_eq!(totals.backbone_images, 40);
    assert_eq!(totals.backbone_passes, 3 + 8 * 2);

    // The same windows as a server that runs each window's new frames at once.
    let default = common::server();
    assert_eq!(default.pipeline.models().backbone.max_batch(), 8);
    let reference = collect(
        common::connect(default.addr)
            .await
            .recognize_windows(clip, window_options(8, 4), 1 << 20)
            .await
            .expect("reference stream starts"),
    )
    .await;
    assert!(reference.error.is_none(), "{:?}", reference.error);
    assert_eq!(reference.windows.len(), got.windows.len());
    for (a, b) in got.windows.iter().zip(&reference.windows) {
        assert_eq!(a.first_frame, b.first_frame);
        assert_eq!(a.frame_timestamps, b.frame_timestamps);
        assert_same_top(&a.top, &b.top, &format!("window {}", a.index));
    }
}

#[tokio::test]
async fn a_chunked_upload_gives_the_same_windows_as_one_message() {
    let client = common::client().await;
    let clip = common::make_clip("testsrc=size=160x120:rate=10", 3.0, "mp4", &[]);
    let step = v1::WindowOptions {
        frame_step: 2,
        ..window_options(4, 2)
    };
    let whole = collect(
        client
            .recognize_windows(clip.clone(), step.clone(), clip.len())
            .await
            .expect("whole"),
    )
    .await;
    let chunked = collect(
        client
            .recognize_windows(clip, step, 997)
            .await
            .expect("chunked"),
    )
    .await;
    assert!(whole.error.is_none() && chunked.error.is_none());
    // 15 frames (every 2nd of 30), windows of 4 every 2: 6 windows.
    assert_eq!(whole.windows.len(), 6);
    assert_eq!(chunked.windows.len(), 6);
    for (a, b) in whole.windows.iter().zip(&chunked.windows) {
        assert_eq!(a.frame_timestamps, b.frame_timestamps);
        assert!((a.frame_timestamps[1] - a.frame_timestamps[0] - 0.2).abs() < 1e-6);
        let ids = |w: &v1::ActionWindow| w.top.iter().map(|t| t.class_id).collect::<Vec<_>>();
        assert_eq!(ids(a), ids(b));
    }
}

#[tokio::test]
async fn short_videos_give_one_window_over_their_frames() {
    let client = common::client().await;
    let clip = common::make_clip("testsrc=size=160x120:rate=10", 0.5, "mp4", &[]);
    let got = collect(
        client
            .recognize_windows(clip, window_options(8, 0), 1 << 20)
            .await
            .expect("stream"),
    )
    .await;
    assert!(got.error.is_none(), "{:?}", got.error);
    assert_eq!(got.windows.len(), 1);
    assert_eq!(got.windows[0].frame_timestamps.len(), 5);
}

#[tokio::test]
async fn corrupt_videos_and_bad_options_are_invalid_argument() {
    let client = common::client().await;
    let junk = common::noise_rgb(77, 64, 64);
    let got = collect(
        client
            .recognize_windows(junk, window_options(0, 0), 1000)
            .await
            .expect("stream"),
    )
    .await;
    let status = got.error.expect("an error status");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(got.windows.is_empty());

    let clip = common::make_clip("testsrc=size=160x120:rate=10", 1.0, "mp4", &[]);
    let both = v1::WindowOptions {
        frame_step: 2,
        sample_fps: 5.0,
        ..window_options(0, 0)
    };
    let err = client
        .recognize_windows(clip.clone(), both, 1 << 20)
        .await
        .expect_err("refused");
    assert_eq!(err.code(), Some(tonic::Code::InvalidArgument), "{err}");

    let too_fast = v1::WindowOptions {
        sample_fps: 3.0e38,
        ..window_options(0, 0)
    };
    let err = client
        .recognize_windows(clip, too_fast, 1 << 20)
        .await
        .expect_err("refused");
    assert_eq!(err.code(), Some(tonic::Code::InvalidArgument), "{err}");
    assert!(err.to_string().contains("the most is 240"), "{err}");
}

static LIMITED: OnceLock<TestServer> = OnceLock::new();

#[tokio::test]
async fn uploads_over_the_video_byte_limit_are_refused() {
    let server = own_server(&LIMITED, 1 << 20);
    let client = common::connect(server.addr).await;
    let big = vec![0u8; (1 << 20) + 1];
    let err = client
        .recognize_windows(big, window_options(0, 0), 64 << 10)
        .await
        .expect_err("over the limit");
    assert_eq!(err.code(), Some(tonic::Code::InvalidArgument), "{err}");
    assert!(err.to_string().contains("--max-video-bytes"), "{err}");
}

#[tokio::test]
async fn a_client_that_goes_away_stops_the_work() {
    let server = own_server(&LIMITED, 1 << 20);
    let client = common::connect(server.addr).await;
    // 600 frames: far more work than one window.
    let clip = common::make_clip("testsrc=size=160x120:rate=10", 60.0, "mp4", &[]);
    let before = server.pipeline.backbone_images();
    let stream = first_window_of(&client, clip).await;
    drop(stream);
    // The call gives its admission slot back when its work has stopped.
    let idle = server
        .pipeline
        .admission()
        .wait_until(|running, _| running == 0);
    tokio::time::timeout(Duration::from_secs(30), idle)
        .await
        .expect("the work did not stop");
    // A backbone run already under way when the client left still finishes and is counted.
    // The backbone runs its queue in order, so once a Detect sent now has its answer, that run
    // is counted; a second Detect then shows that no window work started in between.
    let detect = |seed: u64| {
        let image = v1::Image {
            source: Some(v1::image::Source::Raw(v1::RawImage {
                width: 64,
                height: 48,
                rgb: common::noise_rgb(seed, 64, 48).into(),
            })),
        };
        client.detect(image, v1::DetectOptions::default(), "")
    };
    detect(1).await.expect("detect after the stream");
    let stopped_at = server.pipeline.backbone_images() - before - 1;
    assert!(
        stopped_at < 100,
        "{stopped_at} of 600 frames went through the backbone"
    );
    detect(2).await.expect("detect after the stream");
    assert_eq!(server.pipeline.backbone_images() - before - 2, stopped_at);
}

#[tokio::test]
async fn a_drain_waits_for_open_streams_to_end() {
    let config = Config::for_models(common::models_dir());
    let lifecycle = polyhead_server::Lifecycle::new().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let done = tokio::spawn(polyhead_server::grpc::serve(
        std::sync::Arc::clone(&lifecycle),
        config.serve_options(),
        listener,
        async move {
            let _ = stopped.await;
        },
    ));
    lifecycle
        .set_ready(std::sync::Arc::clone(&common::server().pipeline))
        .await;
    let client = common::connect(addr).await;
    // 60 frames: 7 windows of 8.
    let clip = common::make_clip("testsrc=size=160x120:rate=10", 6.0, "mp4", &[]);
    let stream = first_window_of(&client, clip).await;
    // The response headers went out long ago; the call still counts until its stream ends.
    assert_eq!(lifecycle.inflight(), 1);
    stop.send(()).expect("stop");
    let rest = collect(stream).await;
    assert!(rest.error.is_none(), "{:?}", rest.error);
    assert_eq!(1 + rest.windows.len(), 7);
    assert_eq!(rest.summary.expect("summary").windows, 7);
    done.await.expect("join").expect("clean stop");
    assert_eq!(lifecycle.inflight(), 0);
}

#[tokio::test]
async fn a_passed_deadline_ends_the_stream() {
    let client = common::client()
        .await
        .with_timeout(Duration::from_millis(500));
    // 600 frames: seconds of backbone work, past the deadline.
    let clip = common::make_clip("testsrc=size=160x120:rate=10", 60.0, "mp4", &[]);
    let stream = client
        .recognize_windows(clip, window_options(8, 8), 1 << 20)
        .await
        .expect("stream");
    let got = collect(stream).await;
    let status = got.error.expect("an error status");
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    assert!(got.windows.len() < 75 && got.summary.is_none());
}

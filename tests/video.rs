//! RecognizeAction over gRPC on clips made with the `ffmpeg` CLI and on lists of frames.

use polyhead_proto::v1;
use polyhead_proto::v1::recognize_action_request::Clip;

use crate::common::{client, make_clip, photo};

const H264: &[&str] = &["-c:v", "libx264", "-pix_fmt", "yuv420p"];

fn request(clip: Clip, options: v1::ActionOptions) -> v1::RecognizeActionRequest {
    v1::RecognizeActionRequest {
        clip: Some(clip),
        options: Some(options),
        head: String::new(),
    }
}

fn assert_top_k(actions: &v1::Actions, k: usize) {
    assert_eq!(actions.top.len(), k);
    let mut previous = f32::INFINITY;
    for a in &actions.top {
        assert!(
            (0.0..=1.0).contains(&a.score) && a.score <= previous,
            "{:?}",
            actions.top
        );
        assert!(a.class_id < 400 && !a.label.is_empty());
        previous = a.score;
    }
    let sum: f32 = actions.top.iter().map(|a| a.score).sum();
    assert!(sum <= 1.0 + 1e-5);
}

#[tokio::test]
async fn h264_clip_samples_frames_uniformly_in_one_backbone_pass() {
    let clip = make_clip("testsrc=size=320x240:rate=10", 4.0, "mp4", H264);
    let client = client().await;
    let response = client
        .recognize_action(request(
            Clip::Video(clip.into()),
            v1::ActionOptions::default(),
        ))
        .await
        .expect("recognize");
    let actions = response.actions.expect("actions");
    assert_top_k(&actions, 5);
    let t = &actions.frame_timestamps;
    assert_eq!(t.len(), 8, "the tiny head's default frame count");
    assert!(t.windows(2).all(|w| w[0] < w[1]), "{t:?}");
    assert!(
        t[0] >= 0.0 && t[0] < 0.5 && t[7] > 3.4 && t[7] < 4.0,
        "spread over the clip: {t:?}"
    );
    let timings = response.timings.expect("timings");
    assert_eq!(timings.backbone_passes, 1);
    assert_eq!(timings.backbone_images, 8);
}

#[tokio::test]
async fn vp9_webm_clip_with_stride_sampling() {
    let codec = &[
        "-c:v",
        "libvpx-vp9",
        "-deadline",
        "realtime",
        "-cpu-used",
        "8",
    ];
    let clip = make_clip("testsrc=size=160x120:rate=10", 2.0, "webm", codec);
    let options = v1::ActionOptions {
        num_frames: 4,
        frame_stride: 3,
        top_k: 3,
    };
    let client = client().await;
    let actions = client
        .recognize_action(request(Clip::Video(clip.into()), options))
        .await
        .expect("recognize")
        .actions
        .expect("actions");
    assert_top_k(&actions, 3);
    let t = &actions.frame_timestamps;
    let expected = [0.0, 0.3, 0.6, 0.9];
    assert!(
        t.iter().zip(expected).all(|(a, b)| (a - b).abs() < 1e-6),
        "every 3rd frame: {t:?}"
    );
}

#[tokio::test]
async fn a_list_of_encoded_frames_is_a_clip() {
    let frames = ["astronaut.png", "coffee.png", "rocket.jpg"]
        .map(|name| photo(name).into())
        .to_vec();
    let clip = Clip::Frames(v1::EncodedFrames { frames, fps: 2.0 });
    let client = client().await;
    let response = client
        .recognize_action(request(
            clip,
            v1::ActionOptions {
                top_k: 10,
                ..Default::default()
            },
        ))
        .await
        .expect("recognize");
    let actions = response.actions.expect("actions");
    assert_top_k(&actions, 10);
    assert_eq!(actions.frame_timestamps, vec![0.0, 0.5, 1.0]);
    assert_eq!(response.timings.expect("timings").backbone_images, 3);
}

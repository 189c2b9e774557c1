//! Bad input gets INVALID_ARGUMENT with a message that says what is wrong, and the server keeps
//! serving.

use polyhead_proto::v1;
use polyhead_proto::v1::recognize_action_request::Clip;
use tonic::Code;

use crate::common::{client, encoded, photo};

async fn detect_error(image: Option<v1::Image>, options: v1::DetectOptions) -> (Code, String) {
    let request = v1::DetectRequest {
        image,
        options: Some(options),
        head: String::new(),
    };
    let status = client()
        .await
        .raw()
        .detect(request)
        .await
        .expect_err("bad input is refused");
    (status.code(), status.message().to_string())
}

fn assert_invalid((code, message): (Code, String), words: &[&str]) {
    assert_eq!(code, Code::InvalidArgument, "{message}");
    for word in words {
        assert!(
            message.to_lowercase().contains(word),
            "'{message}' should mention '{word}'"
        );
    }
}

#[tokio::test]
async fn corrupt_and_empty_images_are_invalid_arguments() {
    let mut truncated = photo("astronaut.png");
    truncated.truncate(truncated.len() / 3);
    let cases: Vec<(Option<v1::Image>, &[&str])> = vec![
        (None, &["image is required"]),
        (Some(encoded(Vec::new())), &["empty"]),
        (
            Some(encoded(b"GIF89a not supported here".to_vec())),
            &["unsupported"],
        ),
        (
            Some(encoded(vec![0x89, b'P', b'N', b'G', 1, 2, 3])),
            &["png"],
        ),
        (Some(encoded(truncated)), &["png"]),
    ];
    for (image, words) in cases {
        assert_invalid(detect_error(image, Default::default()).await, words);
    }
    let raw = v1::Image {
        source: Some(v1::image::Source::Raw(v1::RawImage {
            width: 10,
            height: 10,
            rgb: vec![0; 7].into(),
        })),
    };
    assert_invalid(detect_error(Some(raw), Default::default()).await, &["300"]);
    still_serving().await;
}

#[tokio::test]
async fn bad_options_are_invalid_arguments() {
    let image = || Some(encoded(photo("coffee.png")));
    let high = v1::DetectOptions {
        score_threshold: Some(1.5),
        ..Default::default()
    };
    assert_invalid(detect_error(image(), high).await, &["score_threshold"]);
    let class = v1::DetectOptions {
        class_ids: vec![80],
        ..Default::default()
    };
    assert_invalid(detect_error(image(), class).await, &["class id 80"]);
}

#[tokio::test]
async fn unknown_heads_are_not_found_and_bad_head_lists_invalid() {
    let client = client().await;
    let image = encoded(photo("coffee.png"));
    let err = client
        .analyze(
            image.clone(),
            vec!["detection".into(), "depth".into()],
            Default::default(),
            Default::default(),
        )
        .await
        .expect_err("unknown head");
    assert_eq!(err.code(), Some(Code::NotFound));
    assert!(err.to_string().contains("unknown head 'depth'"), "{err}");
    let err = client
        .analyze(
            image.clone(),
            vec![],
            Default::default(),
            Default::default(),
        )
        .await
        .expect_err("no heads");
    assert_eq!(err.code(), Some(Code::InvalidArgument));
    let err = client
        .analyze(
            image,
            vec!["action".into()],
            Default::default(),
            Default::default(),
        )
        .await
        .expect_err("action on image");
    assert_eq!(err.code(), Some(Code::InvalidArgument));
    still_serving().await;
}

#[tokio::test]
async fn undecodable_videos_are_invalid_arguments() {
    let client = client().await;
    let mut clips = vec![
        vec![0u8; 4096],
        b"#EXTM3U\n#EXTINF:1,\nfile:///etc/passwd\n".to_vec(),
    ];
    clips.push(
        (0..50_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
            .collect(),
    );
    for clip in clips {
        let request = v1::RecognizeActionRequest {
            clip: Some(Clip::Video(clip.into())),
            options: None,
            head: String::new(),
        };
        let err = client
            .recognize_action(request)
            .await
            .expect_err("not a video");
        assert_eq!(err.code(), Some(Code::InvalidArgument), "{err}");
    }
    let too_many = v1::RecognizeActionRequest {
        clip: Some(Clip::Frames(v1::EncodedFrames {
            frames: vec![photo("coffee.png").into()],
            fps: 0.0,
        })),
        options: Some(v1::ActionOptions {
            num_frames: 1000,
            ..Default::default()
        }),
        head: String::new(),
    };
    let err = client
        .recognize_action(too_many)
        .await
        .expect_err("over the frame limit");
    assert_eq!(err.code(), Some(Code::InvalidArgument));
    assert!(err.to_string().contains("num_frames"), "{err}");
    still_serving().await;
}

/// A valid request still succeeds on a fresh connection.
async fn still_serving() {
    let client = client().await;
    client
        .detect(encoded(photo("coffee.png")), Default::default(), "")
        .await
        .expect("the server keeps serving after bad input");
}

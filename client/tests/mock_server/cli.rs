//! The `polyhead` binary: output formats, exit codes and messages, and videos the server
//! refuses in one message.

use crate::mock::{MESSAGE_LIMIT, serve};
use crate::{args, polyhead, temp_file, text};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_outputs_and_exit_codes() -> anyhow::Result<()> {
    let addr = serve().await?;
    let image = temp_file("image.jpg", b"jpeg")?;
    let image = image.to_string_lossy().into_owned();

    let detect = polyhead(args(addr, &["detect", &image])).await?;
    assert_eq!(detect.status.code(), Some(0), "{}", text(&detect.stderr));
    let stdout = text(&detect.stdout);
    assert!(stdout.contains("0.500  [1.0, 2.0, 3.0, 4.0]"), "{stdout}");
    assert!(stdout.contains("backbone passes: 1"), "{stdout}");

    let json = polyhead(args(addr, &["--json", "segment", &image])).await?;
    let value: serde_json::Value = serde_json::from_slice(&json.stdout)?;
    assert_eq!(value["segmentation"]["present"][0]["label"], "sky");
    assert!(value["segmentation"].get("label_map_png").is_none());

    let map = temp_file("map.png", b"")?;
    let out = map.to_string_lossy().into_owned();
    let segment = polyhead(args(addr, &["segment", &image, "--out", &out])).await?;
    assert_eq!(segment.status.code(), Some(0), "{}", text(&segment.stderr));
    assert_eq!(std::fs::read(&map)?, b"\x89PNG fake");

    let analyze = polyhead(args(addr, &["analyze", &image])).await?;
    let stdout = text(&analyze.stdout);
    assert!(stdout.contains("== coco (detection) =="), "{stdout}");
    assert!(stdout.contains("== ade (segmentation) =="), "{stdout}");
    assert!(!stdout.contains("k400"), "{stdout}");

    let video = polyhead(args(
        addr,
        &["video", "--images", &image, &image, "--fps", "4"],
    ))
    .await?;
    let stdout = text(&video.stdout);
    assert!(stdout.contains("juggling  0.750"), "{stdout}");
    assert!(
        stdout.contains("2 frames used, at 0.00, 0.25 s"),
        "{stdout}"
    );

    let clip = temp_file("long.mp4", &[9u8; 3000])?;
    let clip = clip.to_string_lossy().into_owned();
    let windows = polyhead(args(addr, &["video", &clip, "--window", "2"])).await?;
    assert_eq!(windows.status.code(), Some(0), "{}", text(&windows.stderr));
    let stdout = text(&windows.stdout);
    assert!(stdout.contains("window    1"), "{stdout}");
    assert!(stdout.contains("juggling 0.750"), "{stdout}");
    assert!(
        stdout.contains("2 windows over 4 sampled frames"),
        "{stdout}"
    );
    let lines = polyhead(args(addr, &["--json", "video", &clip, "--windows"])).await?;
    let stdout = text(&lines.stdout);
    let values: Vec<serde_json::Value> = stdout
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    assert_eq!(values.len(), 3, "{stdout}");
    assert_eq!(values[1]["window"], 1);
    assert_eq!(values[1]["actions"]["top"][0]["label"], "juggling");
    assert_eq!(values[2]["video_bytes"], 3000);

    let busy = polyhead(args(addr, &["detect", &image, "--head", "busy"])).await?;
    assert_eq!(busy.status.code(), Some(1));
    assert_eq!(
        text(&busy.stderr),
        "error: server is at capacity: 8 requests in flight; retry later\n"
    );

    let missing = polyhead(args(addr, &["detect", "/nonexistent/x.jpg"])).await?;
    assert_eq!(missing.status.code(), Some(1));
    assert!(text(&missing.stderr).starts_with("error: cannot read /nonexistent/x.jpg: "));

    let usage = polyhead(args(addr, &["detect", &image, "--score-threshold", "2"])).await?;
    assert_eq!(usage.status.code(), Some(2));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_video_the_server_refuses_whole_is_streamed_in_windows() -> anyhow::Result<()> {
    let addr = serve().await?;
    let clip = temp_file("big.mp4", &vec![9u8; MESSAGE_LIMIT + 1000])?;
    let clip = clip.to_string_lossy().into_owned();

    let windows = polyhead(args(addr, &["video", &clip])).await?;
    assert_eq!(windows.status.code(), Some(0), "{}", text(&windows.stderr));
    let stdout = text(&windows.stdout);
    assert!(stdout.contains("window    1"), "{stdout}");
    assert!(
        stdout.contains("2 windows over 4 sampled frames"),
        "{stdout}"
    );
    let stderr = text(&windows.stderr);
    assert!(
        stderr.starts_with("note: the server refuses ")
            && stderr.contains("(its --max-message-bytes); classifying it in sliding windows"),
        "{stderr}"
    );

    let lines = polyhead(args(addr, &["--json", "video", &clip, "--frames", "8"])).await?;
    assert_eq!(lines.status.code(), Some(0), "{}", text(&lines.stderr));
    let values: Vec<serde_json::Value> = text(&lines.stdout)
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    assert_eq!(values.len(), 3);
    assert_eq!(values[2]["video_bytes"], MESSAGE_LIMIT + 1000);
    assert!(text(&lines.stderr).contains("--frames does not apply to windows"));

    let small = temp_file("small.mp4", &vec![9u8; MESSAGE_LIMIT])?;
    let small = small.to_string_lossy().into_owned();
    let whole = polyhead(args(addr, &["video", &small])).await?;
    assert_eq!(whole.status.code(), Some(0), "{}", text(&whole.stderr));
    assert!(text(&whole.stdout).contains("juggling  0.750"));
    assert_eq!(text(&whole.stderr), "", "sent whole, without a note");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_the_server_refuses_names_its_limit() -> anyhow::Result<()> {
    let addr = serve().await?;
    let image = temp_file("huge.jpg", &vec![1u8; MESSAGE_LIMIT + 1])?;
    let image = image.to_string_lossy().into_owned();
    let output = polyhead(args(addr, &["detect", &image])).await?;
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(
        text(&output.stderr),
        format!(
            "error: request too large: {} bytes, over the server's limit of {MESSAGE_LIMIT} \
             bytes per message (its --max-message-bytes); send a smaller input\n",
            MESSAGE_LIMIT + 1
        )
    );
    Ok(())
}

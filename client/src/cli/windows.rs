//! `polyhead video` on long clips: the video is streamed to RecognizeActionWindows in chunks and
//! each window's result is printed as it arrives, under a progress bar of the windows done.

use indicatif::ProgressBar;
use polyhead_client::v1::recognize_action_windows_response::Event;
use polyhead_client::{Bytes, json, v1};
use serde::Serialize;

use super::progress::Progress;
use super::{Output, Session, render, write_stdout};

/// Upload chunk size: well under any server's message size limit.
const CHUNK_BYTES: usize = 1 << 20;

/// One window in `--json` output: one object per line.
#[derive(Serialize)]
struct WindowLine {
    window: u32,
    first_frame: u32,
    start_s: f64,
    end_s: f64,
    #[serde(flatten)]
    result: json::RecognizeActionResponse,
}

/// The totals in `--json` output, on the last line.
#[derive(Serialize)]
struct SummaryLine {
    windows: u32,
    frames_sampled: u64,
    video_bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    timings: Option<json::Timings>,
}

/// Streams `video` with `options` and prints every window, then the totals.
pub(super) async fn run(
    session: &Session,
    out: &Output,
    progress: &Progress,
    video: Bytes,
    options: v1::WindowOptions,
) -> anyhow::Result<()> {
    let client = session.connect().await?;
    let bar = progress.counter("windows");
    let mut stream = client
        .recognize_windows(video, options, CHUNK_BYTES)
        .await?;
    while let Some(message) = stream
        .message()
        .await
        .map_err(polyhead_client::ClientError::Status)?
    {
        if let Some(p) = &message.progress {
            bar.set_length(u64::from(p.windows_estimated.max(p.windows_done)));
            bar.set_position(u64::from(p.windows_done));
        }
        let text = match message.event {
            Some(Event::Window(window)) => window_text(out, window)?,
            Some(Event::Summary(summary)) => summary_text(out, summary)?,
            None => continue,
        };
        print(&bar, &text)?;
    }
    bar.finish_and_clear();
    Ok(())
}

/// Writes `text` to stdout above the progress bar.
fn print(bar: &ProgressBar, text: &str) -> anyhow::Result<()> {
    bar.suspend(|| write_stdout(text))
}

fn window_text(out: &Output, w: v1::ActionWindow) -> anyhow::Result<String> {
    if out.json {
        let response = v1::RecognizeActionResponse {
            actions: Some(v1::Actions {
                top: w.top,
                frame_timestamps: w.frame_timestamps,
            }),
            timings: w.timings,
        };
        let line = WindowLine {
            window: w.index,
            first_frame: w.first_frame,
            start_s: w.start_s,
            end_s: w.end_s,
            result: (&response).into(),
        };
        return Ok(serde_json::to_string(&line)? + "\n");
    }
    let top: Vec<String> = w
        .top
        .iter()
        .map(|a| format!("{} {:.3}", a.label, a.score))
        .collect();
    let new_frames = w.timings.map_or(0, |t| t.backbone_images);
    Ok(format!(
        "window {:>4}  {:>8.2}-{:.2} s  {}  ({new_frames} new frames)\n",
        w.index,
        w.start_s,
        w.end_s,
        top.join(", ")
    ))
}

fn summary_text(out: &Output, s: v1::WindowsSummary) -> anyhow::Result<String> {
    if out.json {
        let line = SummaryLine {
            windows: s.windows,
            frames_sampled: s.frames_sampled,
            video_bytes: s.video_bytes,
            timings: s.timings.as_ref().map(Into::into),
        };
        return Ok(serde_json::to_string(&line)? + "\n");
    }
    Ok(format!(
        "{} windows over {} sampled frames\n{}",
        s.windows,
        s.frames_sampled,
        render::timings(s.timings.as_ref())
    ))
}

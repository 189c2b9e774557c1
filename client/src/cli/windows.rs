//! `polyhead video` on long clips: the video is streamed to RecognizeActionWindows in chunks and
//! each window's result is printed as it arrives, under a progress bar of the windows done.

use polyhead_client::v1::recognize_action_windows_response::Event;
use polyhead_client::{Bytes, Client, ClientError, WindowStream, json, v1};
use serde::Serialize;

use super::progress::{Counter, Progress};
use super::{Output, render, write_stdout};

/// Upload chunk size: well under a server's usual message size limit.
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

/// Streams `video` with `options` and prints every window, then the totals. The command's
/// `--timeout` covers the whole stream, a second upload in smaller chunks included.
pub(super) async fn run(
    client: &Client,
    out: &Output,
    progress: &Progress,
    video: Bytes,
    options: v1::WindowOptions,
) -> anyhow::Result<()> {
    let counter = progress.counter("windows");
    let result = stream(client, out, &counter, video, options).await;
    counter.finish();
    result
}

/// The stream of [`run`], printing under `counter`.
async fn stream(
    client: &Client,
    out: &Output,
    counter: &Counter,
    video: Bytes,
    options: v1::WindowOptions,
) -> anyhow::Result<()> {
    let mut stream = open(client, video, options).await?;
    while let Some(message) = stream.message().await? {
        if let Some(p) = &message.progress {
            counter.update(u64::from(p.windows_done), u64::from(p.windows_estimated));
        }
        let text = match message.event {
            Some(Event::Window(window)) => window_text(out, window)?,
            Some(Event::Summary(summary)) => summary_text(out, summary)?,
            None => continue,
        };
        counter.suspend(|| write_stdout(&text))?;
    }
    Ok(())
}

/// Starts the stream in chunks of [`CHUNK_BYTES`]; a server whose message size limit is lower
/// refuses the first chunk, before any window, and then gets the video again in chunks that
/// fit its limit.
async fn open(
    client: &Client,
    video: Bytes,
    options: v1::WindowOptions,
) -> Result<WindowStream, ClientError> {
    let refused = match client
        .stream_windows(video.clone(), options.clone(), CHUNK_BYTES)
        .await
    {
        Ok(stream) => return Ok(stream),
        Err(refused) => refused,
    };
    match refused.server_message_limit().and_then(chunks_within) {
        Some(chunk_bytes) => client.stream_windows(video, options, chunk_bytes).await,
        None => Err(refused),
    }
}

/// A chunk size below [`CHUNK_BYTES`] that fits a message size limit of `limit` bytes: half of
/// it, which leaves room for the first message's options.
fn chunks_within(limit: u64) -> Option<usize> {
    let half = usize::try_from(limit / 2).ok()?;
    (half < CHUNK_BYTES).then_some(half.max(1))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_fit_the_server_limit() {
        assert_eq!(chunks_within(64 << 20), None, "the usual chunks fit");
        assert_eq!(chunks_within(2 << 20), None);
        assert_eq!(chunks_within(20_000), Some(10_000));
        assert_eq!(chunks_within(1), Some(1));
        assert_eq!(chunks_within(u64::MAX), None);
    }
}

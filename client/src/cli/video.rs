//! `polyhead video`: action recognition on a video file or a sequence of frame images; long
//! videos in sliding windows, streamed (see [`super::windows`]).

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::error::ErrorKind;
use clap::{Args, CommandFactory};
use polyhead_client::v1::recognize_action_request::Clip;
use polyhead_client::{Client, ClientError, frames_clip, json, v1, video_clip};

use super::progress::Progress;
use super::{Cli, Output, Session, layout, render, windows};

/// Image file extensions picked up by `--frames-dir`.
const FRAME_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "webp"];

/// Arguments of `polyhead video`.
#[derive(Debug, Args)]
pub struct VideoArgs {
    /// Video file (MP4, WebM, ...); with --images, image files in temporal order; with
    /// --frames-dir, a directory of image files.
    #[arg(value_name = "CLIP", required = true)]
    pub clip: Vec<PathBuf>,
    /// CLIP is a list of encoded frame images (JPEG, PNG or WebP) in temporal order.
    #[arg(long, conflicts_with = "frames_dir")]
    pub images: bool,
    /// CLIP is a directory; its image files, sorted by name, are the frames.
    #[arg(long)]
    pub frames_dir: bool,
    /// Frame rate of an image sequence, for the reported timestamps (default: 1 frame/s).
    #[arg(long, value_name = "FPS")]
    pub fps: Option<f32>,
    /// Number of frames to sample (default: the head's).
    #[arg(long, value_name = "N")]
    pub frames: Option<u32>,
    /// Take every S-th frame from the start instead of spreading the samples over the clip
    /// (with windows: sample every S-th decoded frame).
    #[arg(long, value_name = "S")]
    pub stride: Option<u32>,
    /// Classify the video in sliding windows of T sampled frames, streamed with progress
    /// (default T: the head's frame count). Implied by --window-stride, --sample-fps and by
    /// videos larger than one request message (the client's or, when it refuses the video, the
    /// server's --max-message-bytes).
    #[arg(long, value_name = "T", conflicts_with_all = ["images", "frames_dir", "frames"])]
    pub window: Option<u32>,
    /// With windows: sampled frames between the starts of consecutive windows (default: T).
    #[arg(long, value_name = "S", conflicts_with_all = ["images", "frames_dir", "frames"])]
    pub window_stride: Option<u32>,
    /// With windows: sample frames at this rate instead of every --stride-th frame.
    #[arg(long, value_name = "FPS", conflicts_with_all = ["images", "frames_dir", "frames", "stride"])]
    pub sample_fps: Option<f32>,
    /// Classify the video in sliding windows with the defaults (see --window).
    #[arg(long, conflicts_with_all = ["images", "frames_dir", "frames"])]
    pub windows: bool,
    /// Number of labels to return (default: 5).
    #[arg(long, value_name = "K")]
    pub top_k: Option<u32>,
    /// Action head to run (default: the model set's only one).
    #[arg(long, value_name = "NAME")]
    pub head: Option<String>,
}

impl VideoArgs {
    /// Checks the combinations clap cannot express.
    pub fn validate(&self) -> Result<(), clap::Error> {
        let usage = |message: &str| Err(Cli::command().error(ErrorKind::ArgumentConflict, message));
        if !self.images && self.clip.len() > 1 {
            return usage(
                "a video clip is one file; pass --images to send several image files as frames",
            );
        }
        if self.frames_dir && self.clip.len() > 1 {
            return usage("--frames-dir takes one directory");
        }
        if self.fps.is_some() && !(self.images || self.frames_dir) {
            return usage("--fps applies to --images and --frames-dir; a video has its own rate");
        }
        if self.fps.is_some_and(|fps| !(fps.is_finite() && fps > 0.0)) {
            return usage("--fps must be a positive number");
        }
        if self
            .sample_fps
            .is_some_and(|fps| !(fps.is_finite() && fps > 0.0))
        {
            return usage("--sample-fps must be a positive number");
        }
        Ok(())
    }

    /// Whether a window flag asks for sliding windows.
    fn windowed(&self) -> bool {
        self.windows
            || self.window.is_some()
            || self.window_stride.is_some()
            || self.sample_fps.is_some()
    }

    /// The settings of a sliding-window request.
    fn window_options(&self) -> v1::WindowOptions {
        v1::WindowOptions {
            head: self.head.clone().unwrap_or_default(),
            window_frames: self.window.unwrap_or(0),
            window_stride: self.window_stride.unwrap_or(0),
            frame_step: self.stride.unwrap_or(0),
            sample_fps: self.sample_fps.unwrap_or(0.0),
            top_k: self.top_k.unwrap_or(0),
        }
    }

    /// The request options.
    fn options(&self) -> v1::ActionOptions {
        v1::ActionOptions {
            num_frames: self.frames.unwrap_or(0),
            frame_stride: self.stride.unwrap_or(0),
            top_k: self.top_k.unwrap_or(0),
        }
    }
}

/// Runs `polyhead video`.
pub(crate) async fn run(session: &Session, out: &Output, args: VideoArgs) -> anyhow::Result<()> {
    let progress = Progress::new();
    let (clip, what) = load_clip(&args, &progress)?;
    let client = session.connect().await?;
    let Clip::Video(video) = clip else {
        let response = recognize(&client, &progress, &args, clip, &what).await?;
        return print_actions(out, &response);
    };
    if args.windowed() {
        let options = args.window_options();
        return windows::run(&client, out, &progress, video, options).await;
    }
    // A video too large for one request message can only go in chunks.
    let limit = session.options.max_message_bytes;
    if video.len() >= limit {
        let why = format!(
            "{what} is larger than one request message ({} MiB)",
            limit >> 20
        );
        eprintln!("note: {}", chunked_note(&args, &why));
        let options = args.window_options();
        return windows::run(&client, out, &progress, video, options).await;
    }
    let clip = Clip::Video(video.clone());
    match recognize(&client, &progress, &args, clip, &what).await {
        Ok(response) => print_actions(out, &response),
        // The server's limit is lower than the client's: as for a video over the client's.
        Err(err) if err.is_request_too_large() => {
            let why = format!("the server refuses {what} in one message (its --max-message-bytes)");
            eprintln!("note: {}", chunked_note(&args, &why));
            let options = args.window_options();
            windows::run(&client, out, &progress, video, options).await
        }
        Err(err) => Err(err.into()),
    }
}

/// A video not asked to go to RecognizeActionWindows goes there after all, `why`: what that
/// changes.
fn chunked_note(args: &VideoArgs, why: &str) -> String {
    let mut note = format!("{why}; classifying it in sliding windows instead, as with --windows");
    if args.frames.is_some() {
        note.push_str(" (--frames does not apply to windows; see --window)");
    }
    note
}

/// Sends the whole clip in one RecognizeAction call.
async fn recognize(
    client: &Client,
    progress: &Progress,
    args: &VideoArgs,
    clip: Clip,
    what: &str,
) -> Result<v1::RecognizeActionResponse, ClientError> {
    let request = v1::RecognizeActionRequest {
        clip: Some(clip),
        options: Some(args.options()),
        head: args.head.clone().unwrap_or_default(),
    };
    let waiting = format!("recognising the action in {what}");
    progress
        .wait(waiting, client.recognize_action(request))
        .await
}

/// Prints the action of a whole clip.
fn print_actions(out: &Output, response: &v1::RecognizeActionResponse) -> anyhow::Result<()> {
    out.emit(&json::RecognizeActionResponse::from(response), || {
        let mut text = render::actions(response.actions.as_ref());
        text.push_str(&render::timings(response.timings.as_ref()));
        text
    })
}

/// Reads the clip and describes it for the spinner.
fn load_clip(args: &VideoArgs, progress: &Progress) -> anyhow::Result<(Clip, String)> {
    let fps = args.fps.unwrap_or(0.0);
    if args.frames_dir {
        let dir = args.clip.first().context("no directory given")?;
        let paths = frame_files(dir)?;
        let frames = progress.read_files(&paths)?;
        let what = format!("{} frames", frames.len());
        return Ok((frames_clip(frames, fps), what));
    }
    let frames = progress.read_files(&args.clip)?;
    if args.images {
        let what = format!("{} frames", frames.len());
        return Ok((frames_clip(frames, fps), what));
    }
    let video = frames.into_iter().next().context("no clip given")?;
    let name = args.clip.first().map(|p| p.display().to_string());
    let what = format!(
        "{} ({})",
        name.unwrap_or_default(),
        layout::bytes(video.len() as u64)
    );
    Ok((video_clip(video), what))
}

/// The image files in `dir`, sorted by name.
fn frame_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))?;
    let mut paths = Vec::new();
    for entry in entries {
        let path = entry
            .with_context(|| format!("cannot read {}", dir.display()))?
            .path();
        if path.is_file() && has_frame_extension(&path) {
            paths.push(path);
        }
    }
    if paths.is_empty() {
        anyhow::bail!(
            "no frame images ({}) in {}",
            FRAME_EXTENSIONS.join(", "),
            dir.display()
        );
    }
    paths.sort();
    Ok(paths)
}

/// Whether the file name ends in one of [`FRAME_EXTENSIONS`], in any case.
fn has_frame_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|ext| ext.to_str())
        .is_some_and(|ext| {
            FRAME_EXTENSIONS
                .iter()
                .any(|known| ext.eq_ignore_ascii_case(known))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::Command;

    fn video(args: &[&str]) -> Result<VideoArgs, clap::Error> {
        let all = ["polyhead", "video"]
            .into_iter()
            .chain(args.iter().copied());
        match Cli::try_parse_valid(all)?.command {
            Command::Video(args) => Ok(args),
            other => panic!("not video: {other:?}"),
        }
    }

    #[test]
    fn a_video_file() -> Result<(), clap::Error> {
        let args = video(&[
            "clip.mp4", "--frames", "16", "--stride", "2", "--top-k", "3", "--head", "k400",
        ])?;
        assert_eq!(args.clip, vec![PathBuf::from("clip.mp4")]);
        assert!(!args.images && !args.frames_dir);
        let options = args.options();
        assert_eq!(
            (options.num_frames, options.frame_stride, options.top_k),
            (16, 2, 3)
        );
        assert_eq!(args.head.as_deref(), Some("k400"));
        Ok(())
    }

    #[test]
    fn a_video_sent_in_windows_unasked_says_what_no_longer_applies() -> Result<(), clap::Error> {
        let why = "long.mp4 is larger than one request message (64 MiB)";
        assert_eq!(
            chunked_note(&video(&["long.mp4"])?, why),
            "long.mp4 is larger than one request message (64 MiB); classifying it in sliding \
             windows instead, as with --windows"
        );
        let note = chunked_note(&video(&["long.mp4", "--frames", "8"])?, why);
        assert!(
            note.ends_with("(--frames does not apply to windows; see --window)"),
            "{note}"
        );
        Ok(())
    }

    #[test]
    fn window_flags_ask_for_windows() -> Result<(), clap::Error> {
        let args = video(&[
            "long.mp4",
            "--window",
            "16",
            "--window-stride",
            "4",
            "--stride",
            "2",
        ])?;
        assert!(args.windowed());
        let options = args.window_options();
        assert_eq!(
            (
                options.window_frames,
                options.window_stride,
                options.frame_step
            ),
            (16, 4, 2)
        );
        assert!(!video(&["clip.mp4"])?.windowed());
        assert!(video(&["long.mp4", "--windows"])?.windowed());
        assert!(video(&["long.mp4", "--window", "8", "--frames", "8"]).is_err());
        assert!(video(&["long.mp4", "--sample-fps", "2", "--stride", "2"]).is_err());
        Ok(())
    }

    #[test]
    fn image_lists() -> Result<(), clap::Error> {
        let args = video(&["--images", "f1.jpg", "f2.jpg", "f3.jpg", "--fps", "8"])?;
        assert!(args.images);
        assert_eq!(args.clip.len(), 3);
        assert_eq!(args.fps, Some(8.0));
        assert_eq!(args.options(), v1::ActionOptions::default());
        Ok(())
    }

    #[test]
    fn invalid_combinations() {
        let kind = |args: &[&str]| video(args).err().map(|e| e.kind());
        assert_eq!(kind(&["a.mp4", "b.mp4"]), Some(ErrorKind::ArgumentConflict));
        assert_eq!(
            kind(&["a.mp4", "--fps", "30"]),
            Some(ErrorKind::ArgumentConflict)
        );
        assert_eq!(
            kind(&["--frames-dir", "a", "b"]),
            Some(ErrorKind::ArgumentConflict)
        );
        assert_eq!(
            kind(&["--images", "--frames-dir", "a"]),
            Some(ErrorKind::ArgumentConflict)
        );
        assert_eq!(
            kind(&["--images", "a.jpg", "--fps", "0"]),
            Some(ErrorKind::ArgumentConflict)
        );
        assert_eq!(kind(&[]), Some(ErrorKind::MissingRequiredArgument));
    }

    #[test]
    fn frame_directories() -> anyhow::Result<()> {
        let dir = std::env::temp_dir().join(format!("polyhead-frames-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        for name in ["b.JPG", "a.png", "notes.txt", "c.webp"] {
            std::fs::write(dir.join(name), b"x")?;
        }
        let found = frame_files(&dir);
        std::fs::remove_dir_all(&dir)?;
        let names: Vec<_> = found?
            .iter()
            .filter_map(|p| p.file_name()?.to_str().map(str::to_owned))
            .collect();
        assert_eq!(names, ["a.png", "b.JPG", "c.webp"]);
        Ok(())
    }
}

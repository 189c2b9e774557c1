//! The window planner: which sampled frames each window holds, the frames of the window being
//! filled, the stream's counts and its limits. Pure bookkeeping, no model runs.

use std::collections::VecDeque;
use std::time::Duration;

use super::{ActionWindow, WindowProgress};
use crate::engine::NamedTensors;
use crate::error::Error;
use crate::media::video::{FrameStep, VideoOutline};
use crate::pipeline::types::Timings;

/// Where the windows of a video start and how long they are, in sampled frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowPlan {
    /// Frames per window (T >= 1).
    pub length: usize,
    /// Frames between the starts of consecutive windows (s >= 1).
    pub stride: usize,
}

impl WindowPlan {
    /// Windows over `frames` sampled frames: `floor((F - T) / s) + 1` when `F >= T`, one
    /// window over every frame when `0 < F < T`, none for no frames.
    pub fn count(&self, frames: usize) -> usize {
        match frames {
            0 => 0,
            f if f < self.length => 1,
            f => (f - self.length) / self.stride + 1,
        }
    }

    /// Whether frame `index` falls in some window (not in a gap between windows longer apart
    /// than they are long).
    pub fn uses(&self, index: usize) -> bool {
        index % self.stride < self.length
    }
}

/// A sampled frame, preprocessed (unless no window uses it), on its way to the backbone side.
pub(super) struct Frame {
    pub(super) index: usize,
    pub(super) time_s: f64,
    /// CHW tensor and its (height, width); `None` for frames no window uses.
    pub(super) input: Option<(Vec<f32>, usize, usize)>,
    pub(super) decode: Duration,
    pub(super) preprocess: Duration,
}

/// A frame of the window being filled: its input until the backbone runs, its features after.
pub(super) struct Held {
    pub(super) frame: Frame,
    pub(super) features: Option<NamedTensors>,
}

/// The frames of the window being filled and the counts so far.
pub(super) struct State {
    plan: WindowPlan,
    pub(super) held: VecDeque<Held>,
    /// First frame of the next window.
    next_start: usize,
    /// The backbone input's (height, width) of the stream's first used frame; every window
    /// stacks its frames' features, so all must have it.
    input_size: Option<(usize, usize)>,
    pub(super) progress: WindowProgress,
    pub(super) totals: Timings,
}

impl State {
    pub(super) fn new(plan: WindowPlan) -> Self {
        Self {
            plan,
            held: VecDeque::with_capacity(plan.length),
            next_start: 0,
            input_size: None,
            progress: WindowProgress::default(),
            totals: Timings::default(),
        }
    }

    /// Records the video's outline, refusing videos whose estimates already break the limits.
    pub(super) fn outline(
        &mut self,
        outline: &VideoOutline,
        step: FrameStep,
        limits: &crate::config::Limits,
    ) -> Result<(), Error> {
        let frames = step.estimate(outline);
        self.progress.frames_estimated = frames;
        self.progress.windows_estimated = self.plan.count(frames);
        self.progress.duration_s = outline.duration_s;
        check_counts(frames, self.progress.windows_estimated, limits)
    }

    /// Takes a sampled frame; `true` when it completes a window.
    pub(super) fn push(
        &mut self,
        frame: Frame,
        limits: &crate::config::Limits,
    ) -> Result<bool, Error> {
        self.progress.frames_sampled += 1;
        check_counts(self.progress.frames_sampled, 0, limits)?;
        let Some((_, height, width)) = frame.input.as_ref() else {
            return Ok(false);
        };
        if frame.index < self.next_start {
            return Ok(false);
        }
        if *self.input_size.get_or_insert((*height, *width)) != (*height, *width) {
            return Err(Error::InvalidArgument(format!(
                "video frame {} changes the backbone input to {height} x {width}; this \
                 backbone's keep-aspect input needs one frame size through the video",
                frame.index
            )));
        }
        self.held.push_back(Held {
            frame,
            features: None,
        });
        let complete = self.held.len() >= self.plan.length;
        if complete {
            check_counts(0, self.progress.windows_done + 1, limits)?;
        }
        Ok(complete)
    }

    /// Closes the window over the held frames, adds its timings to the totals and keeps the
    /// frames the next window shares.
    pub(super) fn complete(&mut self, timings: Timings) -> ActionWindow {
        let first_frame = self.held.front().map_or(0, |h| h.frame.index);
        let window = ActionWindow {
            index: self.progress.windows_done,
            first_frame,
            frame_timestamps: self.held.iter().map(|h| h.frame.time_s).collect(),
            top: Vec::new(),
            timings: timings.clone(),
        };
        add(&mut self.totals, &timings);
        self.progress.windows_done += 1;
        self.next_start = first_frame + self.plan.stride;
        while self
            .held
            .front()
            .is_some_and(|h| h.frame.index < self.next_start)
        {
            self.held.pop_front();
        }
        window
    }
}

/// Refuses a stream past the sampled-frame or window limits.
fn check_counts(
    frames: usize,
    windows: usize,
    limits: &crate::config::Limits,
) -> Result<(), Error> {
    if frames as u64 > limits.max_video_frames {
        return Err(Error::InvalidArgument(format!(
            "the video gives {frames} sampled frames; the limit is {} (--max-video-frames): \
             sample fewer frames (frame_step, sample_fps)",
            limits.max_video_frames
        )));
    }
    if windows as u64 > limits.max_video_windows {
        return Err(Error::InvalidArgument(format!(
            "the video gives {windows} windows; the limit is {} (--max-video-windows): use a \
             longer window stride",
            limits.max_video_windows
        )));
    }
    Ok(())
}

/// Adds one window's timings to the stream's totals.
fn add(totals: &mut Timings, t: &Timings) {
    totals.decode += t.decode;
    totals.preprocess += t.preprocess;
    totals.queue += t.queue;
    totals.backbone += t.backbone;
    totals.postprocess += t.postprocess;
    totals.backbone_passes += t.backbone_passes;
    totals.backbone_images += t.backbone_images;
    for head in &t.heads {
        match totals.heads.iter_mut().find(|h| h.head == head.head) {
            Some(sum) => {
                sum.queue += head.queue;
                sum.inference += head.inference;
                sum.postprocess += head.postprocess;
            }
            None => totals.heads.push(head.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(length: usize, stride: usize) -> WindowPlan {
        WindowPlan { length, stride }
    }

    /// The windows' first frames, by simulating the state machine over `frames` frames.
    fn starts(p: WindowPlan, frames: usize) -> Vec<Vec<usize>> {
        let limits = crate::config::Config::for_models("m").limits;
        let mut state = State::new(p);
        let mut windows = Vec::new();
        for index in 0..frames {
            let frame = Frame {
                index,
                time_s: index as f64,
                input: p.uses(index).then(|| (Vec::new(), 1, 1)),
                decode: Duration::ZERO,
                preprocess: Duration::ZERO,
            };
            if state.push(frame, &limits).expect("within limits") {
                let held: Vec<usize> = state.held.iter().map(|h| h.frame.index).collect();
                for h in &mut state.held {
                    h.features.get_or_insert_with(Vec::new);
                }
                state.complete(Timings::default());
                windows.push(held);
            }
        }
        windows
    }

    #[test]
    fn window_counts_follow_the_formula() {
        assert_eq!(plan(8, 4).count(40), 9);
        assert_eq!(plan(8, 4).count(43), 9);
        assert_eq!(plan(8, 8).count(40), 5);
        assert_eq!(plan(8, 1).count(8), 1);
        assert_eq!(plan(8, 3).count(5), 1);
        assert_eq!(plan(8, 3).count(0), 0);
        assert_eq!(plan(2, 5).count(12), 3);
    }

    #[test]
    fn overlapping_windows_hold_the_right_frames() {
        let windows = starts(plan(4, 2), 9);
        assert_eq!(
            windows,
            vec![vec![0, 1, 2, 3], vec![2, 3, 4, 5], vec![4, 5, 6, 7]]
        );
        assert_eq!(windows.len(), plan(4, 2).count(9));
    }

    #[test]
    fn gaps_between_windows_are_skipped() {
        let p = plan(2, 5);
        assert_eq!(starts(p, 12), vec![vec![0, 1], vec![5, 6], vec![10, 11]]);
        assert!(p.uses(1) && !p.uses(2) && !p.uses(4) && p.uses(5));
    }

    #[test]
    fn every_plan_matches_its_count() {
        for length in 1..6 {
            for stride in 1..7 {
                for frames in length..30 {
                    let p = plan(length, stride);
                    let windows = starts(p, frames);
                    assert_eq!(windows.len(), p.count(frames), "{p:?} over {frames}");
                    for (k, w) in windows.iter().enumerate() {
                        let expected: Vec<usize> = (k * stride..k * stride + length).collect();
                        assert_eq!(w, &expected);
                    }
                }
            }
        }
    }

    #[test]
    fn a_frame_size_change_is_invalid_argument_before_any_backbone_run() {
        let limits = crate::config::Config::for_models("m").limits;
        let mut state = State::new(plan(4, 4));
        let frame = |index, size| Frame {
            index,
            time_s: index as f64,
            input: Some((Vec::new(), size, size)),
            decode: Duration::ZERO,
            preprocess: Duration::ZERO,
        };
        assert!(!state.push(frame(0, 224), &limits).expect("first size"));
        assert!(!state.push(frame(1, 224), &limits).expect("same size"));
        let err = state.push(frame(2, 192), &limits).expect_err("a new size");
        assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
        assert!(err.to_string().contains("video frame 2"), "{err}");
    }

    #[test]
    fn limits_are_checked() {
        let mut limits = crate::config::Config::for_models("m").limits;
        limits.max_video_frames = 10;
        limits.max_video_windows = 2;
        assert!(check_counts(10, 2, &limits).is_ok());
        let frames = check_counts(11, 1, &limits).expect_err("frames");
        assert!(frames.to_string().contains("--max-video-frames"));
        let windows = check_counts(5, 3, &limits).expect_err("windows");
        assert!(windows.to_string().contains("--max-video-windows"));
    }
}

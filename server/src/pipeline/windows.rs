//! Long videos as sliding windows: a blocking thread decodes and preprocesses the sampled frames
//! one by one and hands them over a bounded channel; this side keeps the frames of the window
//! being filled, and when it is complete sends only the frames no earlier window ran through the
//! backbone (in runs of at most `--max-batch` frames), stacks the window's per-frame features
//! along the batch axis as the action head expects, runs the head and emits the window's top-k.
//! Each sampled frame passes through the backbone at most once, however many windows hold it.
//!
//! A video with fewer sampled frames than a window gives one window over all of them (an action
//! head takes any number of frames, unless its model fixes the clip length: then such a video is
//! INVALID_ARGUMENT); frames after the last full window are not classified.

use std::collections::VecDeque;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::mpsc;
use tracing::Span;

use super::types::{HeadTiming, Timings};
use super::{Pipeline, action, stack};
use crate::engine::{FeatureMemory, NamedTensors, Stage};
use crate::error::Error;
use crate::heads::ClassScore;
use crate::media;
use crate::media::Cancel;
use crate::media::preprocess::PreprocessSpec;
use crate::media::video::{FrameSink, FrameStep, SampledFrame, VideoLimits, VideoOutline};
use crate::model_set::Head;
use crate::telemetry::metrics;

mod plan;

pub use plan::WindowPlan;
use plan::{Frame, Held, State};

/// Decoded frames that may wait for the backbone side: decoding runs ahead by this much.
const FRAME_QUEUE: usize = 16;

/// Highest frame rate budgeted for: the decoded-frame budget of a stream is its longest
/// duration at this rate.
pub const MAX_DECODED_FPS: f64 = 240.0;

/// A validated RecognizeActionWindows request.
pub struct WindowRequest {
    /// The whole uploaded video file.
    pub video: Bytes,
    pub head: Arc<Head>,
    pub plan: WindowPlan,
    pub step: FrameStep,
    pub top_k: usize,
}

/// The result of one window.
#[derive(Debug, Clone)]
pub struct ActionWindow {
    pub index: usize,
    /// Index of the window's first frame among the sampled frames.
    pub first_frame: usize,
    pub frame_timestamps: Vec<f64>,
    pub top: Vec<ClassScore>,
    /// Decode, preprocess and backbone count only the frames this window ran first.
    pub timings: Timings,
}

/// Where a stream stands.
#[derive(Debug, Clone, Copy, Default)]
pub struct WindowProgress {
    pub frames_sampled: usize,
    pub windows_done: usize,
    /// From the demux pass; 0 when unknown.
    pub frames_estimated: usize,
    pub windows_estimated: usize,
    pub duration_s: f64,
}

/// What a window stream sends, in order: windows, then the totals.
#[derive(Debug, Clone)]
pub enum WindowEvent {
    Window(ActionWindow, WindowProgress),
    /// Totals over every window; `total` runs from the start of the work.
    Done(Timings, WindowProgress),
}

enum Decoded {
    Outline(VideoOutline),
    Frame(Frame),
}

impl Pipeline {
    /// Runs `request` window by window, sending each result to `events` as it completes (and
    /// recording its stage latencies, as a request's) and the totals last. Stops, without
    /// error, as soon as `events` is closed (the caller went away): no window starts after that.
    pub async fn run_windows(
        &self,
        request: WindowRequest,
        events: mpsc::Sender<WindowEvent>,
    ) -> Result<(), Error> {
        let started = Instant::now();
        let (tx, mut frames) = mpsc::channel(FRAME_QUEUE);
        // Stops the decoder once this future ends or is dropped, even between sampled frames.
        let cancel = Cancel::default();
        let _cancel_on_drop = cancel.on_drop();
        let decoding = self.spawn_decoder(&request, tx, cancel);
        let mut state = State::new(request.plan);
        while let Some(decoded) = frames.recv().await {
            let frame = match decoded {
                Decoded::Outline(outline) => {
                    state.outline(&outline, request.step, &self.limits)?;
                    continue;
                }
                Decoded::Frame(frame) => frame,
            };
            if !state.push(frame, &self.limits)? {
                continue;
            }
            let window = self.run_window(&request, &mut state).await?;
            if !send_window(&events, window).await {
                return Ok(());
            }
        }
        decoding.await??;
        if state.progress.windows_done == 0 && !state.held.is_empty() {
            // Fewer frames than one window: one window over all of them, when the head takes it.
            let hint = "the video is shorter than one window";
            super::action::check_clip(&request.head, state.held.len(), hint)?;
            let window = self.run_window(&request, &mut state).await?;
            if !send_window(&events, window).await {
                return Ok(());
            }
        }
        state.totals.total = started.elapsed();
        let _ = events
            .send(WindowEvent::Done(state.totals, state.progress))
            .await;
        Ok(())
    }

    /// Decodes and preprocesses the video on a blocking thread, in the current span, until the
    /// video ends, `tx` is closed or `cancel` is set.
    fn spawn_decoder(
        &self,
        request: &WindowRequest,
        tx: mpsc::Sender<Decoded>,
        cancel: Cancel,
    ) -> tokio::task::JoinHandle<Result<usize, Error>> {
        let limits = self.stream_limits();
        let video = request.video.clone();
        let step = request.step;
        let mut sink = ChannelSink {
            tx,
            spec: self.models.backbone.preprocess,
            plan: request.plan,
        };
        let span = Span::current();
        tokio::task::spawn_blocking(move || {
            span.in_scope(|| {
                Ok(media::video::stream_frames(
                    &video, &limits, step, &mut sink, &cancel,
                )?)
            })
        })
    }

    /// The video limits of a window stream: its own size and duration limits; decoding is
    /// bounded by the call's deadline rather than the clip decode time.
    fn stream_limits(&self) -> VideoLimits {
        let frames = (self.limits.max_video_seconds * MAX_DECODED_FPS).ceil() as usize;
        let frames = frames.max(self.video_limits.max_decoded_frames);
        VideoLimits {
            max_bytes: self.limits.max_video_bytes,
            max_duration_s: self.limits.max_video_seconds,
            max_decoded_frames: frames,
            max_packets: frames.saturating_mul(4),
            max_decode_seconds: self.limits.max_timeout_seconds,
            ..self.video_limits.clone()
        }
    }

    /// Runs the held frames as a window: the backbone over those without features (runs of at
    /// most `--max-batch` frames), then the head over every held frame's features.
    async fn run_window(
        &self,
        request: &WindowRequest,
        state: &mut State,
    ) -> Result<WindowEvent, Error> {
        let started = Instant::now();
        let mut timings = self.run_new_frames(&request.head, &mut state.held).await?;
        let head = &request.head;
        let inputs = window_inputs(&self.models.memory, &state.held)?;
        timings.feature_memory = inputs.first().map(|(_, t)| t.memory());
        let run = head.worker.run_as(Stage::Head, inputs).await?;
        let post_started = Instant::now();
        let top = action::postprocess(head.name(), &run.outputs, request.top_k)?;
        let postprocess = post_started.elapsed();
        timings.heads = vec![HeadTiming {
            head: head.name().to_string(),
            queue: run.queued,
            inference: run.elapsed,
            postprocess,
        }];
        timings.postprocess = postprocess;
        timings.total = started.elapsed();
        let mut window = state.complete(timings);
        window.top = top;
        Ok(WindowEvent::Window(window, state.progress))
    }

    /// Sends the held frames that have no features yet through the backbone, in runs of at
    /// most `--max-batch` frames one after another, and keeps each frame's slice of the outputs
    /// the head reads.
    async fn run_new_frames(
        &self,
        head: &Head,
        held: &mut VecDeque<Held>,
    ) -> Result<Timings, Error> {
        let mut timings = Timings::default();
        let mut fresh: Vec<&mut Held> = held.iter_mut().filter(|h| h.features.is_none()).collect();
        if fresh.is_empty() {
            return Ok(timings);
        }
        let mut chw = Vec::with_capacity(fresh.len());
        let mut size = None;
        for h in &mut fresh {
            let (data, height, width) = h.frame.input.take().ok_or_else(|| {
                Error::Internal("a windowed frame has neither input nor features".into())
            })?;
            if *size.get_or_insert((height, width)) != (height, width) {
                return Err(Error::InvalidArgument(
                    "video frames have different sizes, which this backbone's keep-aspect input cannot batch".into(),
                ));
            }
            timings.decode += h.frame.decode;
            timings.preprocess += h.frame.preprocess;
            chw.push(data);
        }
        let (height, width) = size.unwrap_or_default();
        let mut inputs = chw.into_iter();
        for chunk in fresh.chunks_mut(self.models.backbone.max_batch()) {
            let batch: Vec<Vec<f32>> = inputs.by_ref().take(chunk.len()).collect();
            let features = self.run_backbone(stack(batch, height, width)?).await?;
            let selected = features.select(&head.spec.inputs)?;
            let frames = self
                .models
                .memory
                .split_named(&selected, &vec![1; chunk.len()])
                .map_err(|e| Error::Internal(format!("per-frame features: {e}")))?;
            for (h, frame) in chunk.iter_mut().zip(frames) {
                h.features = Some(frame);
            }
            timings.queue += features.queued;
            timings.backbone += features.elapsed;
            timings.backbone_passes += 1;
            timings.backbone_images += chunk.len() as u32;
        }
        Ok(timings)
    }
}

/// Sends a window's result on and, once sent, records its stage latencies as a request's;
/// `false` when the caller has gone.
async fn send_window(events: &mpsc::Sender<WindowEvent>, event: WindowEvent) -> bool {
    let timings = match &event {
        WindowEvent::Window(window, _) => Some(window.timings.clone()),
        WindowEvent::Done(..) => None,
    };
    if events.send(event).await.is_err() {
        return false;
    }
    if let Some(timings) = timings {
        metrics::record_request(&timings);
    }
    true
}

/// The head's inputs for a window: each named feature of every held frame, stacked along the
/// batch axis in frame order (`[T, C, h, w]`), as one backbone run over the T frames gives them;
/// stacked where the features are kept (on the device under CUDA).
fn window_inputs(memory: &FeatureMemory, held: &VecDeque<Held>) -> Result<NamedTensors, Error> {
    let frames = held
        .iter()
        .map(|h| {
            h.features
                .clone()
                .ok_or_else(|| Error::Internal("a window frame has no features".into()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    memory
        .concat_named(frames)
        .map_err(|e| Error::Internal(format!("stacking a window: {e}")))
}

/// Preprocesses each sampled frame that a window uses and sends it on; stops the decoding when
/// the backbone side has gone.
struct ChannelSink {
    tx: mpsc::Sender<Decoded>,
    spec: PreprocessSpec,
    plan: WindowPlan,
}

impl FrameSink for ChannelSink {
    fn outline(&mut self, outline: &VideoOutline) -> ControlFlow<()> {
        self.send(Decoded::Outline(*outline))
    }

    fn frame(&mut self, frame: SampledFrame) -> ControlFlow<()> {
        let started = Instant::now();
        let input = self.plan.uses(frame.index).then(|| {
            let (data, geometry) = media::preprocess::preprocess(&frame.image, &self.spec);
            let (h, w) = (geometry.input_height, geometry.input_width);
            (data, h as usize, w as usize)
        });
        self.send(Decoded::Frame(Frame {
            index: frame.index,
            time_s: frame.time_s,
            input,
            decode: frame.decode,
            preprocess: started.elapsed(),
        }))
    }
}

impl ChannelSink {
    fn send(&self, decoded: Decoded) -> ControlFlow<()> {
        match self.tx.blocking_send(decoded) {
            Ok(()) => ControlFlow::Continue(()),
            Err(_) => ControlFlow::Break(()),
        }
    }
}

//! Frame-by-frame decoding of long videos: every sampled frame is handed to a [`FrameSink`] as
//! soon as it is decoded, instead of being collected, so memory stays bounded by one frame
//! whatever the video's length. The same allow-list, in-memory I/O and budgets as
//! [`super::decode_clip`] apply; a demux-only pass first checks the limits and measures the
//! video, so that the sink learns its outline before the first frame.

use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use ::image::RgbImage;
use bytes::Bytes;
use ffmpeg::codec::decoder;
use ffmpeg::util::frame;
use ffmpeg_next as ffmpeg;

use super::super::memory::Hold;
use super::{
    Budget, Cancel, MediaError, StreamInfo, VideoLimits, check_size, init, open, open_decoder, scan,
};

/// Which decoded frames are sampled.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FrameStep {
    /// Every n-th decoded frame, counting from the first (n >= 1).
    Every(usize),
    /// The first frame, then the first frame at or after each further `1 / fps` seconds.
    Rate(f64),
}

impl FrameStep {
    /// Refuses a step of 0 frames or a rate that is not a positive, finite number.
    fn validate(self) -> Result<(), MediaError> {
        let ok = match self {
            Self::Every(n) => n >= 1,
            Self::Rate(fps) => fps.is_finite() && fps > 0.0,
        };
        if ok {
            return Ok(());
        }
        Err(MediaError::InvalidSampling(format!(
            "{self:?}: the frame step must be at least 1 and the sampling rate positive"
        )))
    }

    /// How many frames this step should sample from a video of `outline` (an estimate: the
    /// packet count may exceed what decodes).
    pub fn estimate(self, outline: &VideoOutline) -> usize {
        match self {
            Self::Every(n) => outline.total_frames.div_ceil(n.max(1)),
            Self::Rate(fps) if outline.duration_s > 0.0 => {
                let by_rate = (outline.duration_s * fps).ceil() as usize;
                by_rate.clamp(1, outline.total_frames.max(1))
            }
            Self::Rate(_) => outline.total_frames,
        }
    }
}

/// What the demux pass learned about a video.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VideoOutline {
    /// Packets of the video stream (frames, unless the stream is damaged).
    pub total_frames: usize,
    /// Duration of the video stream in seconds (0 when unknown).
    pub duration_s: f64,
    /// Frame rate of the video stream (0 when unknown).
    pub fps: f64,
}

/// One sampled frame.
#[derive(Debug, Clone)]
pub struct SampledFrame {
    /// Position among the sampled frames, from 0.
    pub index: usize,
    /// Presentation time in seconds from the start of the stream.
    pub time_s: f64,
    /// The frame, upright RGB8.
    pub image: RgbImage,
    /// Decoding time since the previous sampled frame (skipped frames included).
    pub decode: Duration,
}

/// Receives a video's outline, then its sampled frames in order; either may stop the decoding.
pub trait FrameSink {
    /// Called once, before the first frame.
    fn outline(&mut self, outline: &VideoOutline) -> ControlFlow<()>;
    /// Called for each sampled frame.
    fn frame(&mut self, frame: SampledFrame) -> ControlFlow<()>;
}

/// Decodes the video in `bytes`, within `limits`, handing the frames `step` samples to `sink`
/// one by one. Returns how many frames were sampled (fewer when the sink stopped early).
pub fn stream_frames(
    bytes: &Bytes,
    limits: &VideoLimits,
    step: FrameStep,
    sink: &mut impl FrameSink,
    cancel: &Cancel,
) -> Result<usize, MediaError> {
    init()?;
    check_size(bytes, limits)?;
    step.validate()?;
    let started = Instant::now();
    let mut budget = Budget::new(limits, started, cancel);
    let mut input = open(bytes, limits, &budget)?;
    let info = StreamInfo::read(&input, limits)?;
    let scanned = scan(&mut input, &info, &mut budget)?;
    drop(input);
    if scanned.frames == 0 {
        return Err(MediaError::NoFrames);
    }
    let outline = outline(&info, scanned.frames, scanned.end_s);
    if sink.outline(&outline).is_break() {
        return Ok(0);
    }
    let mut budget = Budget::new(limits, started, cancel);
    let mut input = open(bytes, limits, &budget)?;
    let mut decoder = open_decoder(&input, &info, limits)?;
    let mut sampler = Sampler::new(&info, step, limits);
    while let Some(packet) = budget.next_packet(&mut input)? {
        if packet.stream() != info.index {
            continue;
        }
        if let Err(e) = decoder.send_packet(&packet) {
            budget.error(e)?;
        }
        if sampler.drain(&mut decoder, &mut budget, sink)?.is_break() {
            return Ok(sampler.sampled);
        }
    }
    if decoder.send_eof().is_ok() {
        // The last frames: whether the sink stops after them changes nothing.
        let _ = sampler.drain(&mut decoder, &mut budget, sink)?;
    }
    match sampler.sampled {
        0 => Err(MediaError::NoFrames),
        sampled => Ok(sampled),
    }
}

/// The outline of a stream from its header and the demux pass.
fn outline(info: &StreamInfo, total_frames: usize, end_s: f64) -> VideoOutline {
    let duration_s = if end_s > 0.0 {
        end_s
    } else {
        info.duration_s.unwrap_or(0.0)
    };
    VideoOutline {
        total_frames,
        duration_s,
        fps: info.fps,
    }
}

/// Receives decoded frames, numbers them and hands the sampled ones to the sink.
struct Sampler<'a> {
    info: &'a StreamInfo,
    step: FrameStep,
    limits: &'a VideoLimits,
    decoded: usize,
    sampled: usize,
    /// The first frame's time and the next rate slot due, for [`FrameStep::Rate`].
    first_s: Option<f64>,
    next_slot: u64,
    since: Instant,
    /// The most the decoder has kept in frames.
    decoder_bytes: u64,
    /// The decoder's frames and the one being converted, in `limits.memory`.
    memory: Hold,
    frame: frame::Video,
    scaler: Option<super::Scaler>,
}

impl<'a> Sampler<'a> {
    fn new(info: &'a StreamInfo, step: FrameStep, limits: &'a VideoLimits) -> Self {
        Self {
            info,
            step,
            limits,
            decoded: 0,
            sampled: 0,
            first_s: None,
            next_slot: 0,
            since: Instant::now(),
            decoder_bytes: 0,
            memory: limits.memory.hold(),
            frame: frame::Video::empty(),
            scaler: None,
        }
    }

    /// Takes every frame the decoder has ready, until the sink stops.
    fn drain(
        &mut self,
        decoder: &mut decoder::Video,
        budget: &mut Budget<'_>,
        sink: &mut impl FrameSink,
    ) -> Result<ControlFlow<()>, MediaError> {
        loop {
            match decoder.receive_frame(&mut self.frame) {
                Ok(()) => {
                    let kept = super::check_decoder_memory(decoder, &self.frame, self.limits)?;
                    let rgb = u64::from(self.frame.width()) * u64::from(self.frame.height()) * 3;
                    self.decoder_bytes = self.decoder_bytes.max(kept);
                    self.memory.resize(self.decoder_bytes.saturating_add(rgb))?;
                    if self.take_frame(sink)?.is_break() {
                        return Ok(ControlFlow::Break(()));
                    }
                }
                Err(ffmpeg::Error::Eof) => return Ok(ControlFlow::Continue(())),
                Err(ffmpeg::Error::Other { errno }) if errno == ffmpeg::ffi::EAGAIN => {
                    return Ok(ControlFlow::Continue(()));
                }
                Err(e) => return budget.error(e).map(|()| ControlFlow::Continue(())),
            }
        }
    }

    /// Numbers the frame just received and hands it to the sink if the step samples it.
    fn take_frame(&mut self, sink: &mut impl FrameSink) -> Result<ControlFlow<()>, MediaError> {
        let index = self.decoded;
        self.decoded += 1;
        if self.decoded > self.limits.max_decoded_frames {
            return Err(MediaError::TooManyFrames {
                limit: self.limits.max_decoded_frames,
            });
        }
        let time_s = self.frame_time(index);
        if !self.samples(index, time_s) {
            return Ok(ControlFlow::Continue(()));
        }
        let image = self.convert_frame()?;
        let frame = SampledFrame {
            index: self.sampled,
            time_s,
            image,
            decode: self.since.elapsed(),
        };
        self.sampled += 1;
        let flow = sink.frame(frame);
        self.since = Instant::now();
        Ok(flow)
    }

    /// Whether the step samples decoded frame `index`, shown at `time_s`.
    fn samples(&mut self, index: usize, time_s: f64) -> bool {
        match self.step {
            FrameStep::Every(n) => index % n.max(1) == 0,
            FrameStep::Rate(fps) => {
                let first = *self.first_s.get_or_insert(time_s);
                // A tolerance of a microsecond keeps frames on exact multiples of the period.
                let slot = ((time_s - first).max(0.0) * fps + 1e-6).floor() as u64;
                if slot < self.next_slot {
                    return false;
                }
                self.next_slot = slot.saturating_add(1);
                true
            }
        }
    }

    /// The frame's presentation time in seconds, else its index over the frame rate.
    fn frame_time(&self, index: usize) -> f64 {
        super::frame_time(&self.frame, self.info, index)
    }

    /// Converts the current frame to packed RGB8.
    fn convert_frame(&mut self) -> Result<RgbImage, MediaError> {
        super::to_rgb(
            &self.frame,
            &mut self.scaler,
            self.limits,
            self.info.orientation,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::CancelOnDrop;

    /// Collects what it is given; stops after `stop_after` frames.
    #[derive(Default)]
    struct Collect {
        outline: Option<VideoOutline>,
        times: Vec<f64>,
        stop_after: Option<usize>,
    }

    impl FrameSink for Collect {
        fn outline(&mut self, outline: &VideoOutline) -> ControlFlow<()> {
            self.outline = Some(*outline);
            ControlFlow::Continue(())
        }

        fn frame(&mut self, frame: SampledFrame) -> ControlFlow<()> {
            assert_eq!(frame.index, self.times.len());
            self.times.push(frame.time_s);
            match self.stop_after {
                Some(n) if self.times.len() >= n => ControlFlow::Break(()),
                _ => ControlFlow::Continue(()),
            }
        }
    }

    /// A 3 s, 10 fps testsrc clip made with the ffmpeg CLI.
    fn clip() -> Bytes {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("clip.mp4");
        let status = std::process::Command::new("ffmpeg")
            .args(["-loglevel", "error", "-y", "-f", "lavfi", "-i"])
            .args([
                "testsrc=size=64x48:rate=10",
                "-t",
                "3",
                "-pix_fmt",
                "yuv420p",
            ])
            .arg(&out)
            .status()
            .expect("the ffmpeg CLI");
        assert!(status.success());
        Bytes::from(std::fs::read(out).expect("clip"))
    }

    fn run(step: FrameStep, stop_after: Option<usize>) -> (Collect, usize) {
        let mut sink = Collect {
            stop_after,
            ..Collect::default()
        };
        let sampled = stream_frames(
            &clip(),
            &VideoLimits::default(),
            step,
            &mut sink,
            &Cancel::default(),
        )
        .expect("decodes");
        (sink, sampled)
    }

    #[test]
    fn every_nth_frame_is_streamed_with_its_time() {
        let (sink, sampled) = run(FrameStep::Every(3), None);
        assert_eq!(sampled, 10);
        let outline = sink.outline.expect("outline first");
        assert_eq!(outline.total_frames, 30);
        assert_eq!(FrameStep::Every(3).estimate(&outline), 10);
        for (i, t) in sink.times.iter().enumerate() {
            assert!((t - i as f64 * 0.3).abs() < 1e-6, "{:?}", sink.times);
        }
    }

    #[test]
    fn a_sampling_rate_keeps_the_first_frame_of_each_period() {
        let (sink, sampled) = run(FrameStep::Rate(4.0), None);
        // Periods of 0.25 s over frames 0.1 s apart: 0.0, 0.3, 0.5, 0.8, 1.0, ...
        assert_eq!(sampled, 12);
        assert!((sink.times[1] - 0.3).abs() < 1e-6, "{:?}", sink.times);
        assert!((sink.times[2] - 0.5).abs() < 1e-6, "{:?}", sink.times);
    }

    #[test]
    fn the_sink_can_stop_the_decoding() {
        let (sink, sampled) = run(FrameStep::Every(1), Some(4));
        assert_eq!((sampled, sink.times.len()), (4, 4));
    }

    /// Ends the call (sets `cancel`) when it is given its first frame.
    struct EndsTheCall(Option<CancelOnDrop>);

    impl FrameSink for EndsTheCall {
        fn outline(&mut self, _: &VideoOutline) -> ControlFlow<()> {
            ControlFlow::Continue(())
        }

        fn frame(&mut self, _: SampledFrame) -> ControlFlow<()> {
            self.0.take();
            ControlFlow::Continue(())
        }
    }

    #[test]
    fn an_ended_call_stops_the_decoding_between_sampled_frames() {
        let clip = clip();
        // Only frame 0 is sampled, so the sink is never asked again: the decoder itself stops.
        let decode = |cancel: &Cancel, ends_the_call| {
            let mut sink = EndsTheCall(ends_the_call);
            let limits = VideoLimits::default();
            stream_frames(&clip, &limits, FrameStep::Every(1000), &mut sink, cancel)
        };
        let cancel = Cancel::default();
        assert_eq!(
            decode(&cancel, Some(cancel.on_drop())),
            Err(MediaError::Cancelled)
        );
        assert_eq!(
            decode(&Cancel::default(), None),
            Ok(1),
            "without the cancel, the whole video is decoded"
        );
    }

    #[test]
    fn bad_steps_and_bytes_are_refused() {
        let mut sink = Collect::default();
        let limits = VideoLimits::default();
        let never = Cancel::default();
        let zero = stream_frames(&clip(), &limits, FrameStep::Every(0), &mut sink, &never);
        assert!(matches!(zero, Err(MediaError::InvalidSampling(_))));
        let rate = stream_frames(
            &clip(),
            &limits,
            FrameStep::Rate(f64::NAN),
            &mut sink,
            &never,
        );
        assert!(matches!(rate, Err(MediaError::InvalidSampling(_))));
        let junk = Bytes::from(vec![7u8; 4096]);
        assert!(stream_frames(&junk, &limits, FrameStep::Every(1), &mut sink, &never).is_err());
    }
}

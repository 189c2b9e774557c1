//! Video decoding from untrusted bytes held in memory, with FFmpeg.
//!
//! FFmpeg reads only from the caller's buffer, through a custom I/O context; no file name or URL
//! is ever opened. Container probing is restricted by FFmpeg's `format_whitelist` (an allow-list
//! of demuxers, so playlists such as HLS or concat lists are refused before their header is
//! parsed) and `protocol_whitelist` is empty, so no demuxer can open a nested resource.
//!
//! A clip is decoded in two passes over the buffer. The first only demuxes: it counts the video
//! stream's frames and enforces the packet, error, frame and duration budgets. The frames to keep
//! are then chosen from that count ([`Sampling`]), and the second pass decodes up to the last of
//! them, converting only the chosen frames to RGB, so memory stays bounded by the sample size
//! rather than the clip length. Long videos are decoded frame by frame instead
//! ([`stream_frames`]), each sampled frame handed on as soon as it is decoded.

use std::sync::OnceLock;

use bytes::Bytes;
use std::time::Instant;

use ::image::RgbImage;
use ::image::metadata::Orientation;
use ffmpeg::codec::decoder;
use ffmpeg::format::context::{Input, StreamIo};
use ffmpeg::software::scaling;
use ffmpeg::util::frame;
use ffmpeg::{Dictionary, Packet, Rational};
use ffmpeg_next as ffmpeg;

use super::memory::{DecodingMemory, Hold};
use super::{Cancel, MediaError};

mod native;
mod stream;

pub use stream::{FrameSink, FrameStep, SampledFrame, VideoOutline, stream_frames};

/// Bounds on the clips [`decode_clip`] accepts and the work it does.
#[derive(Debug, Clone, PartialEq)]
pub struct VideoLimits {
    /// Largest accepted encoded size in bytes.
    pub max_bytes: u64,
    /// Longest accepted clip, in seconds.
    pub max_duration_s: f64,
    /// Largest accepted frame width in pixels.
    pub max_width: u32,
    /// Largest accepted frame height in pixels.
    pub max_height: u32,
    /// Most frames the video stream may hold (and the decoder may produce).
    pub max_decoded_frames: usize,
    /// Most packets, over all streams, the demuxer may return.
    pub max_packets: usize,
    /// Most read or decode errors tolerated before the clip is refused as corrupt.
    pub max_errors: usize,
    /// Most memory, in bytes, the sampled frames may take as RGB.
    pub max_output_bytes: u64,
    /// Most memory, in bytes, a decoder may keep in frames: the frame being decoded and the
    /// reference and reordering frames its stream declares.
    pub max_decoder_bytes: u64,
    /// Longest time, in seconds, one clip may take to open, probe, demux and decode.
    pub max_decode_seconds: f64,
    /// The memory all decodes in the process share (see [`super::memory`]): a clip holds its
    /// decoder's frames and its sampled frames, a window stream its decoder's frames and the
    /// frame being converted.
    pub memory: DecodingMemory,
    /// FFmpeg demuxer names that may be used, as FFmpeg spells them (for example
    /// `"mov,mp4,m4a,3gp,3g2,mj2"`); a demuxer is allowed when any comma-separated part of its
    /// name appears in this list.
    pub allowed_formats: Vec<String>,
}

impl Default for VideoLimits {
    fn default() -> Self {
        Self {
            max_bytes: 256 * 1024 * 1024,
            max_duration_s: 120.0,
            max_width: 4096,
            max_height: 4096,
            max_decoded_frames: 10_000,
            max_packets: 100_000,
            max_errors: 32,
            max_output_bytes: 1024 * 1024 * 1024,
            max_decoder_bytes: 512 * 1024 * 1024,
            max_decode_seconds: 60.0,
            memory: DecodingMemory::default(),
            allowed_formats: [
                "mov,mp4,m4a,3gp,3g2,mj2",
                "matroska,webm",
                "avi",
                "mpegts",
                "gif",
            ]
            .map(String::from)
            .to_vec(),
        }
    }
}

/// Which frames of a clip to keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sampling {
    /// How many frames to return.
    pub num_frames: usize,
    /// `None`: spread `num_frames` evenly over the whole clip (frame `i` of `n` is the one at
    /// index `floor((i + 0.5) * total / n)`; a clip shorter than `n` frames repeats frames).
    /// `Some(s)`: every `s`-th frame from the first, up to `num_frames` (fewer if the clip ends).
    pub stride: Option<usize>,
}

impl Sampling {
    /// `num_frames` frames spread evenly over the clip.
    pub fn uniform(num_frames: usize) -> Self {
        Self {
            num_frames,
            stride: None,
        }
    }

    /// Every `stride`-th frame from the start, up to `num_frames`.
    pub fn strided(num_frames: usize, stride: usize) -> Self {
        Self {
            num_frames,
            stride: Some(stride),
        }
    }

    /// Refuses requests that cannot be served within `limits`.
    fn validate(&self, limits: &VideoLimits) -> Result<(), MediaError> {
        if self.num_frames == 0 {
            return Err(MediaError::InvalidSampling(
                "at least one frame must be requested".into(),
            ));
        }
        if self.num_frames > limits.max_decoded_frames {
            return Err(MediaError::InvalidSampling(format!(
                "{} frames requested, the limit is {}",
                self.num_frames, limits.max_decoded_frames
            )));
        }
        if self.stride == Some(0) {
            return Err(MediaError::InvalidSampling(
                "the stride must be at least 1".into(),
            ));
        }
        Ok(())
    }

    /// The indices, ascending, of the frames to keep from a clip of `total` frames; empty when
    /// the clip has no frames.
    pub fn plan(&self, total: usize) -> Vec<usize> {
        if total == 0 {
            return Vec::new();
        }
        let last = total - 1;
        match self.stride {
            None => (0..self.num_frames)
                .map(|i| {
                    let index = (2 * i as u128 + 1) * total as u128 / (2 * self.num_frames as u128);
                    usize::try_from(index).unwrap_or(last).min(last)
                })
                .collect(),
            Some(stride) => (0..total)
                .step_by(stride.max(1))
                .take(self.num_frames)
                .collect(),
        }
    }
}

/// The frames sampled from a clip and what is known about the clip.
#[derive(Debug)]
pub struct DecodedClip {
    /// The sampled frames, upright RGB8, in presentation order.
    pub frames: Vec<RgbImage>,
    /// Presentation time of each frame, in seconds from the start of the stream.
    pub timestamps_s: Vec<f64>,
    /// Frame rate of the video stream (0 when unknown).
    pub fps: f64,
    /// Duration of the video stream in seconds.
    pub duration_s: f64,
    /// Number of frames in the video stream.
    pub total_frames: usize,
    /// The frames' hold on `limits.memory`, until the clip is dropped.
    pub memory: Hold,
}

/// Initialises FFmpeg once per process and silences its logging; safe to call repeatedly.
pub fn init() -> Result<(), MediaError> {
    static INIT: OnceLock<Result<(), String>> = OnceLock::new();
    let result = INIT.get_or_init(|| {
        cap_allocations();
        ffmpeg::init().map_err(|e| e.to_string())?;
        ffmpeg::util::log::set_level(ffmpeg::util::log::Level::Quiet);
        Ok(())
    });
    result.clone().map_err(MediaError::Internal)
}

/// The most one FFmpeg allocation may take: more than any packet, frame or buffer a clip within
/// the limits needs (a 4096x4096 frame is 48 MiB as RGB), far less than FFmpeg's own 2 GiB cap.
pub const MAX_FFMPEG_ALLOCATION: usize = 256 << 20;

/// Caps every FFmpeg allocation at [`MAX_FFMPEG_ALLOCATION`]. Size fields of a container are read
/// before any of polyhead's budgets can apply: an AVI metadata chunk that claims 1.7 GB made the
/// demuxer allocate (and zero) 1.7 GB while opening a 8 KB file. Over the cap FFmpeg's
/// allocation fails, and so does the demuxing of that input, with an error.
#[allow(unsafe_code)]
fn cap_allocations() {
    // SAFETY: `av_max_alloc` stores one process-wide size; it is called once, before this
    // process makes any other FFmpeg call.
    unsafe { ffmpeg::ffi::av_max_alloc(MAX_FFMPEG_ALLOCATION) };
}

/// Decodes the frames `sampling` selects from the clip in `bytes`, within `limits`. FFmpeg reads
/// `bytes` where they are (a view of the request message), not a copy.
pub fn decode_clip(
    bytes: &Bytes,
    limits: &VideoLimits,
    sampling: &Sampling,
    cancel: &Cancel,
) -> Result<DecodedClip, MediaError> {
    init()?;
    check_size(bytes, limits)?;
    sampling.validate(limits)?;
    let started = Instant::now();
    let mut budget = Budget::new(limits, started, cancel);
    let mut input = open(bytes, limits, &budget)?;
    let info = StreamInfo::read(&input, limits)?;
    check_output_size(sampling, &info, limits)?;
    let scan = scan(&mut input, &info, &mut budget)?;
    drop(input);
    if scan.frames == 0 {
        return Err(MediaError::NoFrames);
    }
    let job = Job {
        data: bytes,
        info: &info,
        limits,
        started,
        cancel,
    };
    let (pass, total) = decode_sampled(&job, sampling, scan.frames)?;
    Ok(info.into_clip(pass, total, scan.end_s))
}

/// Refuses empty and oversized inputs.
fn check_size(bytes: &[u8], limits: &VideoLimits) -> Result<(), MediaError> {
    if bytes.is_empty() {
        return Err(MediaError::Empty("video"));
    }
    let len = bytes.len() as u64;
    if len > limits.max_bytes {
        return Err(MediaError::TooManyBytes {
            kind: "video",
            len,
            limit: limits.max_bytes,
        });
    }
    Ok(())
}

/// Refuses a sample whose RGB frames would exceed the output memory limit.
fn check_output_size(
    sampling: &Sampling,
    info: &StreamInfo,
    limits: &VideoLimits,
) -> Result<(), MediaError> {
    let frame_bytes = u64::from(info.width) * u64::from(info.height) * 3;
    let needed = frame_bytes.saturating_mul(sampling.num_frames as u64);
    if needed > limits.max_output_bytes {
        return Err(MediaError::FramesTooLarge {
            needed,
            limit: limits.max_output_bytes,
        });
    }
    Ok(())
}

/// Decodes with the plan for `total` frames; if the decoder produced fewer frames than the
/// demuxer counted, plans again for the frames that really exist and decodes once more.
fn decode_sampled(
    job: &Job<'_>,
    sampling: &Sampling,
    total: usize,
) -> Result<(Pass, usize), MediaError> {
    let plan = sampling.plan(total);
    let mut first = decode_pass(job, &plan)?;
    if first.picked.len() == plan.len() {
        first.hold_picked()?;
        return Ok((first, total));
    }
    if first.decoded == 0 {
        return Err(MediaError::NoFrames);
    }
    let decoded = first.decoded;
    drop(first);
    let plan = sampling.plan(decoded);
    let mut second = decode_pass(job, &plan)?;
    if second.picked.is_empty() {
        return Err(MediaError::NoFrames);
    }
    second.hold_picked()?;
    Ok((second, decoded))
}

impl Pass {
    /// Once the decoder is gone, holds only the picked frames.
    fn hold_picked(&mut self) -> Result<(), MediaError> {
        self.memory.resize(self.output_bytes)
    }
}

/// What every decoding pass over one clip shares.
struct Job<'a> {
    data: &'a Bytes,
    info: &'a StreamInfo,
    limits: &'a VideoLimits,
    started: Instant,
    cancel: &'a Cancel,
}

/// Opens the buffer as a container, refusing demuxers that are not allowed.
fn open(data: &Bytes, limits: &VideoLimits, budget: &Budget<'_>) -> Result<Input, MediaError> {
    let allowed = allowed_parts(limits);
    if allowed.is_empty() {
        return Err(MediaError::UnnamedContainerNotAllowed("none".to_owned()));
    }
    let io = StreamIo::from_read_seek(std::io::Cursor::new(data.clone()))
        .map_err(|e| MediaError::Internal(format!("custom I/O: {e}")))?;
    let mut options = Dictionary::new();
    options.set("format_whitelist", &allowed.join(","));
    options.set("protocol_whitelist", "");
    let stop = || budget.check_time().is_err();
    let opened = native::open_input(io, options, max_pixels(limits), &stop);
    // Probing told to stop ends early, with or without the streams it found: say why.
    budget.check_time()?;
    let input = opened.map_err(|e| open_error(e, data, limits))?;
    let name = input.format().name().to_owned();
    if !is_allowed(&name, &allowed) {
        return Err(MediaError::ContainerNotAllowed(name));
    }
    Ok(input)
}

/// Every comma-separated demuxer name in the allow-list.
fn allowed_parts(limits: &VideoLimits) -> Vec<&str> {
    limits
        .allowed_formats
        .iter()
        .flat_map(|f| f.split(','))
        .map(str::trim)
        .filter(|f| !f.is_empty())
        .collect()
}

/// Whether any part of FFmpeg's demuxer name is allowed.
fn is_allowed(name: &str, allowed: &[&str]) -> bool {
    name.split(',').any(|part| allowed.contains(&part))
}

/// Explains why FFmpeg could not open the container.
///
/// FFmpeg answers `EINVAL` when the probed demuxer is not on the `format_whitelist`, without
/// saying which one it probed; the magic bytes name the common cases.
fn open_error(error: ffmpeg::Error, data: &[u8], limits: &VideoLimits) -> MediaError {
    match error {
        ffmpeg::Error::Other { errno } if errno == ffmpeg::ffi::EINVAL => {
            match sniff_container(data) {
                Some(name) if !is_allowed(name, &allowed_parts(limits)) => {
                    MediaError::ContainerNotAllowed(name.to_owned())
                }
                Some(_) => MediaError::CorruptVideo(format!(
                    "the container could not be read ({error}); references to other files or \
                     URLs are not followed"
                )),
                None => MediaError::UnnamedContainerNotAllowed(limits.allowed_formats.join("; ")),
            }
        }
        ffmpeg::Error::InvalidData | ffmpeg::Error::Eof => MediaError::CorruptVideo(
            "the container could not be read: unknown format, or damaged or truncated data"
                .to_owned(),
        ),
        other => MediaError::CorruptVideo(format!("the container could not be read: {other}")),
    }
}

/// Magic bytes at the start of common formats, and FFmpeg's name for their demuxer.
const CONTAINER_MAGIC: [(&[u8], &str); 17] = [
    (b"#EXTM3U", "hls"),
    (b"ffconcat version", "concat"),
    (b"WEBVTT", "webvtt"),
    (b"[Script Info]", "ass"),
    (b"v=0", "sdp"),
    (b"YUV4MPEG2", "yuv4mpegpipe"),
    (b"DKIF", "ivf"),
    (b"OggS", "ogg"),
    (b"\x89PNG", "png_pipe"),
    (b"\xFF\xD8\xFF", "jpeg_pipe"),
    (b"FLV", "flv"),
    (b"fLaC", "flac"),
    (b"ID3", "mp3"),
    (b"\x30\x26\xB2\x75\x8E\x66\xCF\x11", "asf"),
    (b"\x1A\x45\xDF\xA3", "matroska,webm"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
];

/// Names, as FFmpeg does, the demuxer for common formats, from their magic bytes.
fn sniff_container(data: &[u8]) -> Option<&'static str> {
    if let Some(name) = sniff_riff(data) {
        return Some(name);
    }
    if matches!(
        data.get(4..8),
        Some(b"ftyp" | b"moov" | b"mdat" | b"free" | b"wide" | b"skip")
    ) {
        return Some("mov,mp4,m4a,3gp,3g2,mj2");
    }
    if data.len() > 376 && data[0] == 0x47 && data[188] == 0x47 && data[376] == 0x47 {
        return Some("mpegts");
    }
    CONTAINER_MAGIC
        .iter()
        .find(|(magic, _)| data.starts_with(magic))
        .map(|&(_, name)| name)
}

/// Names the demuxer for the RIFF formats FFmpeg reads.
fn sniff_riff(data: &[u8]) -> Option<&'static str> {
    if data.get(..4) != Some(b"RIFF") {
        return None;
    }
    match data.get(8..12)? {
        b"AVI " => Some("avi"),
        b"WAVE" => Some("wav"),
        b"WEBP" => Some("webp_pipe"),
        _ => None,
    }
}

/// The video stream's parameters, from the container's header.
#[derive(Debug, Clone, Copy)]
struct StreamInfo {
    index: usize,
    time_base: f64,
    time_base_q: Rational,
    start: i64,
    width: u32,
    height: u32,
    fps: f64,
    duration_s: Option<f64>,
    /// What shows the decoded frames upright and unmirrored.
    orientation: Orientation,
}

impl StreamInfo {
    /// Finds the best video stream and checks its resolution and declared duration.
    fn read(input: &Input, limits: &VideoLimits) -> Result<Self, MediaError> {
        let stream = input
            .streams()
            .best(ffmpeg::media::Type::Video)
            .ok_or(MediaError::NoVideoStream)?;
        let (width, height) = coded_size(stream.parameters())?;
        check_resolution(width, height, limits)?;
        let time_base_q = stream.time_base();
        let time_base = rational(time_base_q).unwrap_or(0.0);
        let info = Self {
            index: stream.index(),
            time_base,
            time_base_q,
            start: match stream.start_time() {
                ffmpeg::ffi::AV_NOPTS_VALUE => 0,
                start => start,
            },
            width,
            height,
            fps: frame_rate(stream.avg_frame_rate(), stream.rate()),
            duration_s: declared_duration(&stream, input, time_base),
            orientation: display_orientation(&stream),
        };
        check_duration(info.duration_s.unwrap_or(0.0), limits)?;
        Ok(info)
    }

    /// Seconds from the stream's start for a timestamp in its time base.
    fn seconds(&self, timestamp: i64) -> f64 {
        timestamp.saturating_sub(self.start) as f64 * self.time_base
    }

    /// Assembles the result. The duration is that of the packets actually present (a truncated
    /// file is shorter than its header says), else the header's, else frames over frame rate.
    fn into_clip(self, pass: Pass, total: usize, end_s: f64) -> DecodedClip {
        let estimate = if self.fps > 0.0 {
            total as f64 / self.fps
        } else {
            0.0
        };
        let duration_s = if end_s > 0.0 {
            end_s
        } else {
            self.duration_s.unwrap_or(estimate)
        };
        let fps = if self.fps > 0.0 || duration_s <= 0.0 {
            self.fps
        } else {
            total as f64 / duration_s
        };
        let (frames, timestamps_s) = pass.picked.into_iter().map(|p| (p.image, p.time_s)).unzip();
        DecodedClip {
            frames,
            timestamps_s,
            fps,
            duration_s,
            total_frames: total,
            memory: pass.memory,
        }
    }
}

/// The frame size the stream's decoder reports, refusing streams nothing can decode.
fn coded_size(params: ffmpeg::codec::Parameters) -> Result<(u32, u32), MediaError> {
    if decoder::find(params.id()).is_none() {
        return Err(MediaError::UnsupportedCodec(params.id().name().to_owned()));
    }
    let context = ffmpeg::codec::Context::from_parameters(params)
        .map_err(|e| MediaError::CorruptVideo(format!("bad stream parameters: {e}")))?;
    let video = context
        .decoder()
        .video()
        .map_err(|e| MediaError::CorruptVideo(format!("the video decoder failed to open: {e}")))?;
    Ok((video.width(), video.height()))
}

/// A rational as a float, if it is a positive, finite number.
fn rational(value: Rational) -> Option<f64> {
    (value.numerator() > 0 && value.denominator() > 0)
        .then(|| f64::from(value.numerator()) / f64::from(value.denominator()))
}

/// The average frame rate, else the base frame rate, else 0.
fn frame_rate(average: Rational, base: Rational) -> f64 {
    rational(average)
        .or_else(|| rational(base))
        .filter(|fps| fps.is_finite() && *fps < 1000.0)
        .unwrap_or(0.0)
}

/// The duration the header declares: the stream's own, else the container's.
fn declared_duration(stream: &ffmpeg::Stream<'_>, input: &Input, time_base: f64) -> Option<f64> {
    let own = stream.duration();
    if own > 0 && time_base > 0.0 {
        return Some(own as f64 * time_base);
    }
    let container = input.duration();
    (container > 0).then(|| container as f64 / f64::from(ffmpeg::ffi::AV_TIME_BASE))
}

/// The most pixels a decoded picture may have: larger ones are refused by the decoders,
/// those that probe the streams included, before their buffers are allocated.
fn max_pixels(limits: &VideoLimits) -> u64 {
    u64::from(limits.max_width) * u64::from(limits.max_height)
}

/// Refuses frames larger than the limits.
fn check_resolution(width: u32, height: u32, limits: &VideoLimits) -> Result<(), MediaError> {
    if width > limits.max_width || height > limits.max_height {
        return Err(MediaError::VideoTooLarge {
            width,
            height,
            max_width: limits.max_width,
            max_height: limits.max_height,
        });
    }
    Ok(())
}

/// What shows `stream`'s frames as its display matrix says: a phone records a portrait video
/// as landscape frames and a rotation, a front camera's video may be mirrored. Nothing without a
/// matrix; a rotation between quarter turns is taken to the nearest.
fn display_orientation(stream: &ffmpeg::Stream<'_>) -> Orientation {
    stream
        .side_data()
        .find(|data| data.kind() == ffmpeg::codec::packet::side_data::Type::DisplayMatrix)
        .and_then(|data| native::display_orientation(data.data()))
        .unwrap_or(Orientation::NoTransforms)
}

/// `image` turned and flipped as `orientation` says.
fn upright(image: RgbImage, orientation: Orientation) -> RgbImage {
    if orientation == Orientation::NoTransforms {
        return image;
    }
    let mut image = ::image::DynamicImage::ImageRgb8(image);
    image.apply_orientation(orientation);
    image.into_rgb8()
}

/// Refuses clips longer than the limit.
fn check_duration(duration_s: f64, limits: &VideoLimits) -> Result<(), MediaError> {
    if duration_s > limits.max_duration_s {
        return Err(MediaError::ClipTooLong {
            duration_s,
            limit_s: limits.max_duration_s,
        });
    }
    Ok(())
}

/// Counts packets, errors and time against the limits, and stops once the call has ended.
struct Budget<'a> {
    limits: &'a VideoLimits,
    started: Instant,
    cancel: &'a Cancel,
    packets: usize,
    errors: usize,
}

impl<'a> Budget<'a> {
    fn new(limits: &'a VideoLimits, started: Instant, cancel: &'a Cancel) -> Self {
        Self {
            limits,
            started,
            cancel,
            packets: 0,
            errors: 0,
        }
    }

    /// Fails once decoding has run longer than allowed, or its call has ended.
    fn check_time(&self) -> Result<(), MediaError> {
        self.cancel.check()?;
        if self.started.elapsed().as_secs_f64() > self.limits.max_decode_seconds {
            return Err(MediaError::DecodeTimeout {
                limit_s: self.limits.max_decode_seconds,
            });
        }
        Ok(())
    }

    /// Records an error; fails once there are more than the limit allows.
    fn error(&mut self, error: ffmpeg::Error) -> Result<(), MediaError> {
        self.errors += 1;
        if self.errors > self.limits.max_errors {
            return Err(MediaError::TooManyErrors {
                count: self.errors,
                limit: self.limits.max_errors,
                last: error.to_string(),
            });
        }
        Ok(())
    }

    /// Reads the next packet; `None` at the end of the data.
    fn next_packet(&mut self, input: &mut Input) -> Result<Option<Packet>, MediaError> {
        loop {
            let mut packet = Packet::empty();
            match packet.read(input) {
                Ok(()) => {
                    self.check_time()?;
                    self.packets += 1;
                    if self.packets > self.limits.max_packets {
                        return Err(MediaError::TooManyPackets {
                            limit: self.limits.max_packets,
                        });
                    }
                    return Ok(Some(packet));
                }
                Err(ffmpeg::Error::Eof) => return Ok(None),
                Err(e) => self.error(e)?,
            }
        }
    }
}

/// What the demux-only pass learned.
struct Scan {
    frames: usize,
    end_s: f64,
}

/// Demuxes the whole clip without decoding: counts the video stream's frames and measures its
/// duration from packet timestamps, within the limits.
fn scan(input: &mut Input, info: &StreamInfo, budget: &mut Budget<'_>) -> Result<Scan, MediaError> {
    let limits = budget.limits;
    let mut result = Scan {
        frames: 0,
        end_s: 0.0,
    };
    while let Some(packet) = budget.next_packet(input)? {
        if packet.stream() != info.index {
            continue;
        }
        result.frames += 1;
        if result.frames > limits.max_decoded_frames {
            return Err(MediaError::TooManyFrames {
                limit: limits.max_decoded_frames,
            });
        }
        if let Some(pts) = packet.pts().or(packet.dts()) {
            let end = info.seconds(pts.saturating_add(packet.duration().max(0)));
            result.end_s = result.end_s.max(end);
            check_duration(result.end_s, limits)?;
        }
    }
    Ok(result)
}

/// A frame chosen by the sampling plan.
#[derive(Debug, Clone)]
struct Picked {
    image: RgbImage,
    time_s: f64,
}

/// The outcome of one decoding pass.
struct Pass {
    picked: Vec<Picked>,
    decoded: usize,
    /// Bytes of the picked frames as RGB.
    output_bytes: u64,
    /// What the pass held in the decoding memory, from now on for its picked frames.
    memory: Hold,
}

/// Decodes the video stream up to the last planned frame, keeping the planned ones as RGB.
fn decode_pass(job: &Job<'_>, plan: &[usize]) -> Result<Pass, MediaError> {
    let mut budget = Budget::new(job.limits, job.started, job.cancel);
    let mut input = open(job.data, job.limits, &budget)?;
    let mut decoder = open_decoder(&input, job.info, job.limits)?;
    let mut picker = Picker::new(job.info, plan, job.limits);
    while let Some(packet) = budget.next_packet(&mut input)? {
        if packet.stream() != job.info.index {
            continue;
        }
        if let Err(e) = decoder.send_packet(&packet) {
            budget.error(e)?;
        }
        picker.drain(&mut decoder, &mut budget)?;
        if picker.done() {
            return Ok(picker.finish());
        }
    }
    if decoder.send_eof().is_ok() {
        picker.drain(&mut decoder, &mut budget)?;
    }
    Ok(picker.finish())
}

/// Opens a decoder for the video stream of a freshly opened input. The decoder refuses, before it
/// allocates one, any frame of more pixels than `limits` allow: a stream's frames may declare
/// other sizes than its header (an MJPEG frame can say 65535x65535), and the size checks made on
/// the header and on decoded frames come too late for those.
fn open_decoder(
    input: &Input,
    info: &StreamInfo,
    limits: &VideoLimits,
) -> Result<decoder::Video, MediaError> {
    let stream = input.stream(info.index).ok_or(MediaError::NoVideoStream)?;
    let mut context = ffmpeg::codec::Context::from_parameters(stream.parameters())
        .map_err(|e| MediaError::CorruptVideo(format!("bad stream parameters: {e}")))?;
    context.set_time_base(info.time_base_q);
    let mut decoder = context.decoder();
    decoder.set_packet_time_base(info.time_base_q);
    let codec = decoder
        .codec()
        .or_else(|| decoder::find(decoder.id()))
        .ok_or_else(|| MediaError::UnsupportedCodec(decoder.id().name().to_owned()))?;
    let mut options = Dictionary::new();
    options.set(
        "max_pixels",
        &max_pixels(limits).min(i32::MAX as u64).to_string(),
    );
    decoder
        .open_as_with(codec, options)
        .and_then(|opened| opened.video())
        .map_err(|e| MediaError::CorruptVideo(format!("the video decoder failed to open: {e}")))
}

/// Refuses a stream whose decoder keeps more memory in frames than the limit: the frame just
/// decoded, as large as each it keeps, times the frames it keeps (see
/// [`native::kept_frames`]). A stream may declare up to 16 reference frames of the largest
/// picture the pixel limit allows. Answers those bytes.
fn check_decoder_memory(
    decoder: &decoder::Video,
    frame: &frame::Video,
    limits: &VideoLimits,
) -> Result<u64, MediaError> {
    let frame_bytes: u64 = (0..frame.planes())
        .map(|plane| frame.data(plane).len() as u64)
        .sum();
    let frames = native::kept_frames(decoder);
    let needed = frames.saturating_mul(frame_bytes);
    if needed > limits.max_decoder_bytes {
        return Err(MediaError::DecoderTooLarge {
            frames,
            frame_bytes,
            needed,
            limit: limits.max_decoder_bytes,
        });
    }
    Ok(needed)
}

/// Receives decoded frames, numbers them and keeps the planned ones.
struct Picker<'a> {
    info: &'a StreamInfo,
    plan: &'a [usize],
    limits: &'a VideoLimits,
    next: usize,
    decoded: usize,
    picked: Vec<Picked>,
    output_bytes: u64,
    /// The most the decoder has kept in frames.
    decoder_bytes: u64,
    /// The decoder's frames and the picked ones, in `limits.memory`.
    memory: Hold,
    frame: frame::Video,
    scaler: Option<Scaler>,
}

impl<'a> Picker<'a> {
    fn new(info: &'a StreamInfo, plan: &'a [usize], limits: &'a VideoLimits) -> Self {
        Self {
            info,
            plan,
            limits,
            next: 0,
            decoded: 0,
            picked: Vec::with_capacity(plan.len()),
            output_bytes: 0,
            decoder_bytes: 0,
            memory: limits.memory.hold(),
            frame: frame::Video::empty(),
            scaler: None,
        }
    }

    fn done(&self) -> bool {
        self.next >= self.plan.len()
    }

    fn finish(self) -> Pass {
        Pass {
            picked: self.picked,
            decoded: self.decoded,
            output_bytes: self.output_bytes,
            memory: self.memory,
        }
    }

    /// Takes every frame the decoder has ready.
    fn drain(
        &mut self,
        decoder: &mut decoder::Video,
        budget: &mut Budget<'_>,
    ) -> Result<(), MediaError> {
        loop {
            match decoder.receive_frame(&mut self.frame) {
                Ok(()) => {
                    let kept = check_decoder_memory(decoder, &self.frame, self.limits)?;
                    self.decoder_bytes = self.decoder_bytes.max(kept);
                    // Room for the frame's RGB copy, should the plan pick it.
                    let rgb = u64::from(self.frame.width()) * u64::from(self.frame.height()) * 3;
                    self.hold(rgb)?;
                    self.take_frame()?;
                    self.hold(0)?;
                }
                Err(ffmpeg::Error::Eof) => return Ok(()),
                Err(ffmpeg::Error::Other { errno }) if errno == ffmpeg::ffi::EAGAIN => {
                    return Ok(());
                }
                Err(e) => return budget.error(e),
            }
        }
    }

    /// Numbers the frame just received and keeps it as often as the plan names it.
    fn take_frame(&mut self) -> Result<(), MediaError> {
        let index = self.decoded;
        self.decoded += 1;
        if self.decoded > self.limits.max_decoded_frames {
            return Err(MediaError::TooManyFrames {
                limit: self.limits.max_decoded_frames,
            });
        }
        if self.plan.get(self.next) != Some(&index) {
            return Ok(());
        }
        let image = self.convert_frame()?;
        let time_s = self.frame_time(index);
        while self.plan.get(self.next) == Some(&index) {
            self.account(&image)?;
            self.picked.push(Picked {
                image: image.clone(),
                time_s,
            });
            self.next += 1;
        }
        Ok(())
    }

    /// Holds what the decoder keeps, the frames picked so far and `more` in the decoding
    /// memory.
    fn hold(&mut self, more: u64) -> Result<(), MediaError> {
        self.memory.resize(
            self.decoder_bytes
                .saturating_add(self.output_bytes)
                .saturating_add(more),
        )
    }

    /// Adds a kept frame to the output memory total, failing over the limit.
    fn account(&mut self, image: &RgbImage) -> Result<(), MediaError> {
        self.output_bytes += image.as_raw().len() as u64;
        if self.output_bytes > self.limits.max_output_bytes {
            return Err(MediaError::FramesTooLarge {
                needed: self.output_bytes,
                limit: self.limits.max_output_bytes,
            });
        }
        Ok(())
    }

    /// The frame's presentation time in seconds, else its index over the frame rate.
    fn frame_time(&self, index: usize) -> f64 {
        frame_time(&self.frame, self.info, index)
    }

    /// Converts the current frame to packed RGB8, dropping any row padding.
    fn convert_frame(&mut self) -> Result<RgbImage, MediaError> {
        to_rgb(
            &self.frame,
            &mut self.scaler,
            self.limits,
            self.info.orientation,
        )
    }
}

/// A decoded frame's presentation time in seconds, else its index over the frame rate.
fn frame_time(frame: &frame::Video, info: &StreamInfo, index: usize) -> f64 {
    match frame.timestamp().or(frame.pts()) {
        Some(ts) if info.time_base > 0.0 => info.seconds(ts).max(0.0),
        _ if info.fps > 0.0 => index as f64 / info.fps,
        _ => 0.0,
    }
}

/// A colour converter to RGB24 and the frames it was made for.
struct Scaler {
    context: scaling::Context,
    /// The colour matrix and range of those frames, which FFmpeg's converter does not read
    /// from the frames themselves.
    colours: (ffmpeg::color::Space, ffmpeg::color::Range),
}

/// Converts a decoded frame to packed RGB8, dropping any row padding, and turns and flips it as
/// `orientation` says (see [`display_orientation`]); `scaler` is reused while the frame's format,
/// size, colour matrix and range stay the same.
fn to_rgb(
    frame: &frame::Video,
    scaler: &mut Option<Scaler>,
    limits: &VideoLimits,
    orientation: Orientation,
) -> Result<RgbImage, MediaError> {
    let (width, height) = (frame.width(), frame.height());
    if width == 0 || height == 0 {
        return Err(MediaError::CorruptVideo(format!(
            "decoded a {width}x{height} frame"
        )));
    }
    check_resolution(width, height, limits)?;
    let scaler = scaler_for(scaler, frame)?;
    let mut rgb = frame::Video::empty();
    scaler
        .run(frame, &mut rgb)
        .map_err(|e| MediaError::CorruptVideo(format!("colour conversion failed: {e}")))?;
    Ok(upright(packed_rgb(&rgb, width, height)?, orientation))
}

/// A converter of `frame` to RGB24, reusing `cached` while it fits: the frame's format and size,
/// and the colour matrix and range it is tagged with (BT.709 for HD video, full range for some
/// phone and screen recordings), which the converter is set to as FFmpeg's own scale filter
/// does; untagged frames keep the converter's defaults for their format.
fn scaler_for<'a>(
    cached: &'a mut Option<Scaler>,
    frame: &frame::Video,
) -> Result<&'a mut scaling::Context, MediaError> {
    let (format, width, height) = (frame.format(), frame.width(), frame.height());
    let colours = (frame.color_space(), frame.color_range());
    let reusable = cached.as_ref().is_some_and(|s| {
        let input = s.context.input();
        (input.format, input.width, input.height) == (format, width, height) && s.colours == colours
    });
    if !reusable {
        let mut context = scaling::Context::get(
            format,
            width,
            height,
            ffmpeg::format::Pixel::RGB24,
            width,
            height,
            scaling::Flags::BILINEAR,
        )
        .map_err(|_| MediaError::CorruptVideo(format!("unsupported pixel format {format:?}")))?;
        native::set_source_colours(&mut context, colours.0, colours.1);
        *cached = Some(Scaler { context, colours });
    }
    cached
        .as_mut()
        .map(|s| &mut s.context)
        .ok_or_else(|| MediaError::Internal("no colour converter".to_owned()))
}

/// Copies an RGB24 frame, whose rows may be padded past `width * 3` bytes, into an image.
fn packed_rgb(rgb: &frame::Video, width: u32, height: u32) -> Result<RgbImage, MediaError> {
    let short = || MediaError::Internal("colour conversion produced a short frame".to_owned());
    if rgb.planes() == 0 || rgb.width() != width || rgb.height() != height {
        return Err(short());
    }
    let stride = rgb.stride(0);
    let row = width as usize * 3;
    let data = rgb.data(0);
    let mut packed = Vec::with_capacity(row * height as usize);
    for y in 0..height as usize {
        let line = data.get(y * stride..y * stride + row).ok_or_else(short)?;
        packed.extend_from_slice(line);
    }
    RgbImage::from_raw(width, height, packed).ok_or_else(short)
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};
    use std::process::Command;
    use std::time::{Duration, Instant};

    use super::*;

    /// [`decode_clip`] on a copy of `bytes`.
    fn decode(
        bytes: &[u8],
        limits: &VideoLimits,
        sampling: &Sampling,
    ) -> Result<DecodedClip, MediaError> {
        decode_clip(
            &Bytes::copy_from_slice(bytes),
            limits,
            sampling,
            &Cancel::default(),
        )
    }

    /// Runs the `ffmpeg` CLI, which the tests need to make clips.
    fn ffmpeg_cli(args: &[&str]) {
        let status = Command::new("ffmpeg")
            .args(["-hide_banner", "-loglevel", "error", "-y"])
            .args(args)
            .status()
            .unwrap_or_else(|e| panic!("these tests need the ffmpeg CLI on PATH: {e}"));
        assert!(status.success(), "ffmpeg {args:?} failed");
    }

    /// Makes `name` in `dir` from a lavfi `source` with the given encoder arguments.
    fn make(dir: &Path, name: &str, source: &str, encode: &[&str]) -> PathBuf {
        let path = dir.join(name);
        let out = path.to_str().expect("UTF-8 temp path");
        let mut args = vec!["-f", "lavfi", "-i", source];
        args.extend_from_slice(encode);
        args.push(out);
        ffmpeg_cli(&args);
        path
    }

    /// A 2 s, 10 fps, 20-frame test pattern.
    const PATTERN: &str = "testsrc=size=150x100:rate=10:duration=2";
    const H264: [&str; 4] = ["-c:v", "libx264", "-pix_fmt", "yuv420p"];

    fn h264_mp4(dir: &Path) -> Vec<u8> {
        std::fs::read(make(dir, "clip.mp4", PATTERN, &H264)).expect("read clip")
    }

    fn tempdir() -> tempfile::TempDir {
        tempfile::tempdir().expect("temp dir")
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-6
    }

    #[test]
    fn uniform_sampling_picks_evenly_spaced_frames() {
        let dir = tempdir();
        let clip = decode(
            &h264_mp4(dir.path()),
            &VideoLimits::default(),
            &Sampling::uniform(4),
        )
        .expect("decode");
        assert_eq!(clip.total_frames, 20);
        assert!(close(clip.fps, 10.0), "fps {}", clip.fps);
        assert!(close(clip.duration_s, 2.0), "duration {}", clip.duration_s);
        assert_eq!(clip.frames.len(), 4);
        assert!(clip.frames.iter().all(|f| f.dimensions() == (150, 100)));
        let expected = [0.2, 0.7, 1.2, 1.7];
        assert!(
            clip.timestamps_s
                .iter()
                .zip(expected)
                .all(|(&t, e)| close(t, e)),
            "{:?}",
            clip.timestamps_s
        );
    }

    #[test]
    fn a_clip_of_an_ended_call_is_not_decoded() {
        let dir = tempdir();
        let bytes = Bytes::from(h264_mp4(dir.path()));
        let cancel = Cancel::default();
        drop(cancel.on_drop());
        let sampling = Sampling::uniform(4);
        let ended = decode_clip(&bytes, &VideoLimits::default(), &sampling, &cancel);
        assert_eq!(ended.map(|c| c.frames.len()), Err(MediaError::Cancelled));
        let open = decode_clip(
            &bytes,
            &VideoLimits::default(),
            &sampling,
            &Cancel::default(),
        );
        assert_eq!(open.map(|c| c.frames.len()), Ok(4));
    }

    /// Frame `n` of the video at `path` as the ffmpeg CLI shows it (rotated upright), RGB24.
    fn cli_frame(path: &Path, n: usize) -> Vec<u8> {
        let raw = path.with_extension(format!("frame{n}.rgb"));
        ffmpeg_cli(&[
            "-i",
            path.to_str().expect("path"),
            "-vf",
            &format!("select=eq(n\\,{n})"),
            "-fps_mode",
            "passthrough",
            "-frames:v",
            "1",
            "-f",
            "rawvideo",
            "-pix_fmt",
            "rgb24",
            raw.to_str().expect("path"),
        ]);
        std::fs::read(raw).expect("reference frame")
    }

    /// Asserts that `ours` is `reference` but for colour conversion's rounding.
    fn assert_same_picture(ours: &RgbImage, reference: &[u8]) {
        let ours = ours.as_raw();
        assert_eq!(ours.len(), reference.len());
        let diff: u64 = ours
            .iter()
            .zip(reference)
            .map(|(a, b)| u64::from(a.abs_diff(*b)))
            .sum();
        let mean = diff as f64 / ours.len() as f64;
        assert!(mean < 3.0, "mean absolute difference {mean}");
    }

    #[test]
    fn sampled_frame_matches_the_ffmpeg_cli() {
        let dir = tempdir();
        let bytes = h264_mp4(dir.path());
        let reference = cli_frame(&dir.path().join("clip.mp4"), 7);
        let clip = decode(&bytes, &VideoLimits::default(), &Sampling::uniform(4)).expect("decode");
        assert_same_picture(&clip.frames[1], &reference);
    }

    /// `mp4` with its track's display matrix set to `[a, b, c, d]` (16.16 fixed point: x' = ax +
    /// cy, y' = bx + dy), as a phone writes for a portrait video that its sensor recorded as
    /// landscape frames, or for a mirrored front camera.
    fn with_display_matrix(mp4: &[u8], [a, b, c, d]: [i32; 4]) -> Vec<u8> {
        let at = mp4
            .windows(4)
            .position(|w| w == b"tkhd")
            .expect("a track header");
        assert_eq!(mp4[at + 4], 0, "a version 0 track header");
        // After the version, flags, times, track id, duration, layer, group and volume.
        let matrix = at + 44;
        let write = |out: &mut Vec<u8>, values: [i32; 9]| {
            for (i, value) in values.iter().enumerate() {
                out[matrix + 4 * i..matrix + 4 * i + 4].copy_from_slice(&value.to_be_bytes());
            }
        };
        let one = 1 << 16;
        let mut check = mp4.to_vec();
        write(&mut check, [one, 0, 0, 0, one, 0, 0, 0, 1 << 30]);
        assert_eq!(check, mp4, "the matrix is where the identity was");
        let mut out = mp4.to_vec();
        write(
            &mut out,
            [a * one, b * one, 0, c * one, d * one, 0, 0, 0, 1 << 30],
        );
        out
    }

    /// `frame` as the display matrix `[a, b, c, d]` shows it: the pixel at (x, y) goes to
    /// (ax + cy, bx + dy), shifted so that the picture starts at (0, 0).
    fn displayed(frame: &RgbImage, [a, b, c, d]: [i32; 4]) -> RgbImage {
        let (w, h) = (frame.width() as i32, frame.height() as i32);
        let corners = [(0, 0), (w - 1, 0), (0, h - 1), (w - 1, h - 1)];
        let mapped = corners.map(|(x, y)| (a * x + c * y, b * x + d * y));
        let min_x = mapped.iter().map(|p| p.0).min().unwrap_or(0);
        let min_y = mapped.iter().map(|p| p.1).min().unwrap_or(0);
        let (out_w, out_h) = if a == 0 { (h, w) } else { (w, h) };
        let mut out = RgbImage::new(out_w as u32, out_h as u32);
        for (x, y, pixel) in frame.enumerate_pixels() {
            let (x, y) = (x as i32, y as i32);
            let to = (a * x + c * y - min_x, b * x + d * y - min_y);
            out.put_pixel(to.0 as u32, to.1 as u32, *pixel);
        }
        out
    }

    #[test]
    fn frames_of_a_rotated_video_come_upright_as_the_ffmpeg_cli_shows_them() {
        let dir = tempdir();
        let rotated = with_display_matrix(&h264_mp4(dir.path()), [0, 1, -1, 0]);
        let path = dir.path().join("rotated.mp4");
        std::fs::write(&path, &rotated).expect("write the rotated clip");
        let reference = cli_frame(&path, 7);
        let clip =
            decode(&rotated, &VideoLimits::default(), &Sampling::uniform(4)).expect("decode");
        assert!(clip.frames.iter().all(|f| f.dimensions() == (100, 150)));
        assert_same_picture(&clip.frames[1], &reference);
    }

    #[test]
    fn frames_of_rotated_and_mirrored_videos_come_as_their_display_matrix_shows_them() {
        let dir = tempdir();
        let plain = h264_mp4(dir.path());
        let sampling = Sampling::uniform(4);
        let limits = VideoLimits::default();
        let stored = decode(&plain, &limits, &sampling).expect("decode").frames;
        // Every quarter turn, each mirrored and not.
        let matrices = [
            [0, 1, -1, 0],
            [-1, 0, 0, -1],
            [0, -1, 1, 0],
            [-1, 0, 0, 1],
            [1, 0, 0, -1],
            [0, 1, 1, 0],
            [0, -1, -1, 0],
        ];
        for matrix in matrices {
            let video = with_display_matrix(&plain, matrix);
            let shown = decode(&video, &limits, &sampling).expect("decode");
            assert_eq!(shown.frames.len(), stored.len(), "matrix {matrix:?}");
            for (ours, frame) in shown.frames.iter().zip(&stored) {
                assert!(ours == &displayed(frame, matrix), "matrix {matrix:?}");
            }
        }
    }

    #[test]
    fn frames_tagged_full_range_and_bt709_convert_as_the_ffmpeg_cli_converts_them() {
        // As some phones and screen recorders write them: full-range luma, HD colours.
        let dir = tempdir();
        let tagged = [
            "-c:v",
            "libx264",
            "-pix_fmt",
            "yuv420p",
            "-color_range",
            "pc",
            "-colorspace",
            "bt709",
        ];
        let path = make(dir.path(), "tagged.mp4", PATTERN, &tagged);
        let reference = cli_frame(&path, 7);
        let bytes = std::fs::read(&path).expect("read clip");
        let clip = decode(&bytes, &VideoLimits::default(), &Sampling::uniform(4)).expect("decode");
        assert_same_picture(&clip.frames[1], &reference);
    }

    #[test]
    fn probing_stops_once_the_call_has_ended_or_its_time_is_up() {
        init().expect("FFmpeg");
        let dir = tempdir();
        let bytes = Bytes::from(h264_mp4(dir.path()));
        // FFmpeg asks whether to stop as it probes.
        let asked = std::cell::Cell::new(0);
        let stop = || {
            asked.set(asked.get() + 1);
            true
        };
        let io = StreamIo::from_read_seek(std::io::Cursor::new(bytes.clone())).expect("I/O");
        let opened = native::open_input(io, Dictionary::new(), 1 << 20, &stop);
        assert!(asked.get() > 0, "never asked; opened: {:?}", opened.is_ok());
        // The open says why it stopped (FFmpeg keeps the streams it already knew of).
        let limits = VideoLimits::default();
        let cancel = Cancel::default();
        let budget = Budget::new(&limits, Instant::now(), &cancel);
        assert!(open(&bytes, &limits, &budget).is_ok());
        drop(cancel.on_drop());
        let stopped = open(&bytes, &limits, &budget).map(|_| ());
        assert_eq!(stopped, Err(MediaError::Cancelled));
        let no_time = VideoLimits {
            max_decode_seconds: 0.0,
            ..VideoLimits::default()
        };
        let running = Cancel::default();
        let budget = Budget::new(&no_time, Instant::now(), &running);
        let stopped = open(&bytes, &no_time, &budget).map(|_| ());
        assert!(
            matches!(stopped, Err(MediaError::DecodeTimeout { .. })),
            "{stopped:?}"
        );
    }

    #[test]
    fn a_decoder_that_keeps_too_many_frames_is_refused() {
        let dir = tempdir();
        let source = "testsrc=size=320x240:rate=10:duration=2";
        let encode = |refs: &str, b_frames: &str| {
            let args = [&H264[..], &["-refs", refs, "-bf", b_frames]].concat();
            let name = format!("refs{refs}.mp4");
            std::fs::read(make(dir.path(), &name, source, &args)).expect("read clip")
        };
        // 320x240 4:2:0 is about 115 KB a frame (its rows padded a little more).
        let limits = VideoLimits {
            max_decoder_bytes: 1 << 20,
            ..VideoLimits::default()
        };
        let sampling = Sampling::uniform(4);
        let light = encode("1", "0");
        let clip = decode(&light, &limits, &sampling).expect("one reference frame fits");
        assert_eq!(clip.frames.len(), 4);
        let heavy = encode("16", "3");
        match decode(&heavy, &limits, &sampling) {
            Err(MediaError::DecoderTooLarge { frames, needed, .. }) => {
                assert!(frames >= 17, "{frames} frames");
                assert!(needed > 1 << 20, "{needed} bytes");
            }
            other => panic!(
                "16 reference frames within 1 MiB: {:?}",
                other.map(|c| c.frames.len())
            ),
        }
        let clip = decode(&heavy, &VideoLimits::default(), &sampling).expect("the default fits");
        assert_eq!(clip.frames.len(), 4);
    }

    #[test]
    fn a_clip_holds_its_decoder_and_sampled_frames_of_the_shared_memory() {
        let dir = tempdir();
        let bytes = h264_mp4(dir.path());
        let memory = DecodingMemory::new(64 << 20);
        let limits = VideoLimits {
            memory: memory.clone(),
            ..VideoLimits::default()
        };
        let clip = decode(&bytes, &limits, &Sampling::uniform(4)).expect("decode");
        // Once decoded, the clip holds its sampled frames' bytes, until it is dropped.
        let frames: u64 = clip.frames.iter().map(|f| f.as_raw().len() as u64).sum();
        assert!(frames > 0);
        assert_eq!((clip.memory.bytes(), memory.held()), (frames, frames));
        drop(clip);
        assert_eq!(memory.held(), 0);

        // While decoding, the decoder's frames too: with all but one frame's RGB bytes held by
        // other decodes, the clip does not fit.
        let others = memory.take((64 << 20) - frames / 4).expect("others");
        let err = decode(&bytes, &limits, &Sampling::uniform(4)).expect_err("full");
        assert!(err.is_full(), "{err}");
        assert_eq!(memory.held(), (64 << 20) - frames / 4);
        drop(others);
        let err = decode(
            &bytes,
            &VideoLimits {
                memory: DecodingMemory::new(frames),
                ..limits
            },
            &Sampling::uniform(4),
        )
        .expect_err("the frames and the decoder's");
        assert!(
            matches!(err, MediaError::DecodingMemoryTooSmall { .. }),
            "{err}"
        );
    }

    #[test]
    fn stride_sampling_takes_every_nth_frame() {
        let dir = tempdir();
        let bytes = h264_mp4(dir.path());
        let limits = VideoLimits::default();
        let clip = decode(&bytes, &limits, &Sampling::strided(3, 5)).expect("decode");
        assert!(
            clip.timestamps_s
                .iter()
                .zip([0.0, 0.5, 1.0])
                .all(|(&t, e)| close(t, e))
        );
        let clip = decode(&bytes, &limits, &Sampling::strided(10, 6)).expect("decode");
        assert_eq!(clip.frames.len(), 4, "frames 0, 6, 12 and 18 exist");
        assert!(close(clip.timestamps_s[3], 1.8));
    }

    #[test]
    fn short_clips_repeat_frames_for_uniform_sampling() {
        let dir = tempdir();
        let clip = decode(
            &h264_mp4(dir.path()),
            &VideoLimits::default(),
            &Sampling::uniform(30),
        )
        .expect("decode");
        assert_eq!(clip.frames.len(), 30);
        assert!(clip.timestamps_s.windows(2).all(|w| w[0] <= w[1]));
        assert!(close(clip.timestamps_s[0], 0.0) && close(clip.timestamps_s[29], 1.9));
        assert!(clip.frames[1] == clip.frames[2], "index 1 is sampled twice");
        assert!(clip.frames[0] != clip.frames[1]);
    }

    #[test]
    fn other_allowed_containers_decode() {
        let dir = tempdir();
        let cases: [(&str, &[&str]); 4] = [
            (
                "clip.webm",
                &["-c:v", "libvpx-vp9", "-deadline", "realtime"],
            ),
            ("clip.avi", &["-c:v", "mjpeg", "-q:v", "3"]),
            ("clip.ts", &H264),
            ("clip.gif", &[]),
        ];
        for (name, encode) in cases {
            let bytes = std::fs::read(make(dir.path(), name, PATTERN, encode)).expect("read");
            let clip = decode(&bytes, &VideoLimits::default(), &Sampling::uniform(2))
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(clip.total_frames, 20, "{name}");
            assert!(
                close(clip.timestamps_s[0], 0.5) && close(clip.timestamps_s[1], 1.5),
                "{name}: {:?}",
                clip.timestamps_s
            );
            assert_eq!(clip.frames[0].dimensions(), (150, 100), "{name}");
        }
    }

    #[test]
    fn full_range_mjpeg_keeps_its_colour() {
        let dir = tempdir();
        let path = make(
            dir.path(),
            "red.avi",
            "color=c=0xFF0000:size=64x48:rate=5:duration=1",
            &["-c:v", "mjpeg"],
        );
        let bytes = std::fs::read(path).expect("read");
        let clip = decode(&bytes, &VideoLimits::default(), &Sampling::uniform(1)).expect("decode");
        let pixel = clip.frames[0].get_pixel(32, 24).0;
        assert!(
            pixel[0] > 235 && pixel[1] < 20 && pixel[2] < 20,
            "{pixel:?}"
        );
    }

    #[test]
    fn truncated_clips_fail_or_decode_what_is_there() {
        let dir = tempdir();
        let start = Instant::now();
        let plain = h264_mp4(dir.path());
        let err = decode(
            &plain[..plain.len() / 2],
            &VideoLimits::default(),
            &Sampling::uniform(4),
        )
        .expect_err("the index (moov) is at the end and gone");
        assert!(matches!(err, MediaError::CorruptVideo(_)), "{err}");
        let encode = ["-c:v", "libx264", "-g", "1", "-movflags", "+faststart"];
        let intra = std::fs::read(make(dir.path(), "intra.mp4", PATTERN, &encode)).expect("read");
        let clip = decode(
            &intra[..intra.len() * 6 / 10],
            &VideoLimits::default(),
            &Sampling::uniform(4),
        )
        .expect("the first frames are intact");
        assert!(
            (5..20).contains(&clip.total_frames),
            "{}",
            clip.total_frames
        );
        assert!(clip.duration_s < 2.0 && clip.timestamps_s.iter().all(|&t| t < clip.duration_s));
        for cut in [intra.len() / 3, intra.len() - 100, 3000, 200] {
            let result = decode(
                &intra[..cut],
                &VideoLimits::default(),
                &Sampling::uniform(4),
            );
            if let Ok(clip) = result {
                assert!(
                    clip.total_frames <= 20 && clip.frames.len() == 4,
                    "cut {cut}: {} frames",
                    clip.total_frames
                );
            }
        }
        assert!(start.elapsed() < Duration::from_secs(20));
    }

    #[test]
    fn random_and_empty_bytes_are_refused() {
        let noise: Vec<u8> = (0..100_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let limits = VideoLimits::default();
        let err = decode(&noise, &limits, &Sampling::uniform(4)).expect_err("noise");
        assert!(matches!(err, MediaError::CorruptVideo(_)), "{err}");
        assert_eq!(
            decode(&[], &limits, &Sampling::uniform(4)).expect_err("empty"),
            MediaError::Empty("video")
        );
    }

    #[test]
    fn playlists_are_refused_by_name() {
        let dir = tempdir();
        let canary = make(dir.path(), "canary.ts", PATTERN, &H264);
        let canary = canary.to_str().expect("path");
        let hls =
            format!("#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:2.0,\n{canary}\n#EXT-X-ENDLIST\n");
        let concat = format!("ffconcat version 1.0\nfile '{canary}'\n");
        let limits = VideoLimits::default();
        let err = decode(hls.as_bytes(), &limits, &Sampling::uniform(1)).expect_err("hls");
        assert_eq!(err.to_string(), "video container 'hls' is not allowed");
        let err = decode(concat.as_bytes(), &limits, &Sampling::uniform(1)).expect_err("concat");
        assert_eq!(err.to_string(), "video container 'concat' is not allowed");
    }

    /// Packets FFmpeg reads from `list` when the `file` protocol is allowed.
    fn packets_with_file_access(list: &[u8]) -> usize {
        let io = StreamIo::from_read_seek(std::io::Cursor::new(list.to_vec())).expect("io");
        let mut options = Dictionary::new();
        options.set("protocol_whitelist", "file");
        let mut input = ffmpeg::format::input_from_stream(io, None, Some(options)).expect("open");
        let mut count = 0;
        while Packet::empty().read(&mut input).is_ok() {
            count += 1;
        }
        count
    }

    #[test]
    fn nested_files_are_not_read_even_from_an_allowed_playlist() {
        init().expect("init");
        // The concat demuxer only follows relative names, resolved against the working directory.
        let cwd = std::env::current_dir().expect("cwd");
        let dir = tempfile::Builder::new()
            .prefix("canary")
            .tempdir_in(&cwd)
            .expect("dir");
        make(dir.path(), "canary.ts", PATTERN, &H264);
        let name = dir
            .path()
            .file_name()
            .and_then(|n| n.to_str())
            .expect("name");
        let list = format!("ffconcat version 1.0\nfile '{name}/canary.ts'\n");
        assert_eq!(
            packets_with_file_access(list.as_bytes()),
            20,
            "control: the list is readable"
        );
        let permissive = VideoLimits {
            allowed_formats: vec!["concat".into(), "mpegts".into()],
            ..VideoLimits::default()
        };
        let err = decode(list.as_bytes(), &permissive, &Sampling::uniform(1))
            .expect_err("the canary must not be read");
        assert!(matches!(err, MediaError::CorruptVideo(_)), "{err}");
    }

    #[test]
    fn other_disallowed_formats_are_named() {
        let dir = tempdir();
        let png = make(
            dir.path(),
            "still.png",
            "testsrc=size=32x32",
            &["-frames:v", "1"],
        );
        let bytes = std::fs::read(png).expect("read");
        let err = decode(&bytes, &VideoLimits::default(), &Sampling::uniform(1)).expect_err("png");
        assert_eq!(err.to_string(), "video container 'png_pipe' is not allowed");
        let mkv_only = VideoLimits {
            allowed_formats: vec!["matroska,webm".into()],
            ..VideoLimits::default()
        };
        let err = decode(&h264_mp4(dir.path()), &mkv_only, &Sampling::uniform(1)).expect_err("mp4");
        assert_eq!(
            err.to_string(),
            "video container 'mov,mp4,m4a,3gp,3g2,mj2' is not allowed"
        );
        let raw = make(
            dir.path(),
            "clip.h264",
            PATTERN,
            &["-c:v", "libx264", "-f", "h264"],
        );
        let bytes = std::fs::read(raw).expect("read");
        let err = decode(&bytes, &VideoLimits::default(), &Sampling::uniform(1)).expect_err("raw");
        assert_eq!(
            err.to_string(),
            "video container is not allowed: accepted containers are \
             mov,mp4,m4a,3gp,3g2,mj2; matroska,webm; avi; mpegts; gif"
        );
    }

    #[test]
    fn audio_only_input_has_no_video_stream() {
        let dir = tempdir();
        let path = make(
            dir.path(),
            "tone.mkv",
            "sine=duration=1",
            &["-c:a", "pcm_s16le"],
        );
        let bytes = std::fs::read(path).expect("read");
        let err =
            decode(&bytes, &VideoLimits::default(), &Sampling::uniform(1)).expect_err("audio");
        assert_eq!(err, MediaError::NoVideoStream);
    }

    #[test]
    fn limits_are_enforced() {
        let dir = tempdir();
        let bytes = h264_mp4(dir.path());
        let base = VideoLimits::default();
        let one = Sampling::uniform(1);
        let cases = [
            (
                VideoLimits {
                    max_duration_s: 1.5,
                    ..base.clone()
                },
                "clip is 2.0 s long, the limit is 1.5 s",
            ),
            (
                VideoLimits {
                    max_width: 100,
                    ..base.clone()
                },
                "video is 150x100, the limit is 100x4096",
            ),
            (
                VideoLimits {
                    max_decoded_frames: 10,
                    ..base.clone()
                },
                "clip has more than 10 frames, the limit is 10",
            ),
            (
                VideoLimits {
                    max_packets: 5,
                    ..base.clone()
                },
                "video has more than 5 packets, the limit is 5",
            ),
            (
                VideoLimits {
                    max_output_bytes: 1000,
                    ..base.clone()
                },
                "the sampled frames need 45000 bytes as RGB, the limit is 1000",
            ),
            (
                VideoLimits {
                    max_decode_seconds: 0.0,
                    ..base.clone()
                },
                "decoding the video took longer than the limit of 0 s",
            ),
        ];
        for (limits, message) in cases {
            let err = decode(&bytes, &limits, &one).expect_err(message);
            assert_eq!(err.to_string(), message);
            assert!(err.is_limit());
        }
        let small = VideoLimits {
            max_bytes: 100,
            ..base.clone()
        };
        let err = decode(&bytes, &small, &one).expect_err("too many bytes");
        assert!(
            matches!(err, MediaError::TooManyBytes { limit: 100, .. }),
            "{err}"
        );
    }

    #[test]
    fn sampling_requests_are_validated() {
        let limits = VideoLimits::default();
        for sampling in [
            Sampling::uniform(0),
            Sampling::strided(4, 0),
            Sampling::uniform(1_000_000),
        ] {
            let err = decode(b"whatever", &limits, &sampling).expect_err("invalid");
            assert!(matches!(err, MediaError::InvalidSampling(_)), "{err}");
        }
    }

    #[test]
    fn plans_are_centred_and_bounded() {
        assert_eq!(Sampling::uniform(4).plan(20), [2, 7, 12, 17]);
        assert_eq!(Sampling::uniform(1).plan(20), [10]);
        assert_eq!(Sampling::uniform(3).plan(1), [0, 0, 0]);
        assert_eq!(Sampling::uniform(4).plan(2), [0, 0, 1, 1]);
        assert_eq!(Sampling::strided(3, 5).plan(20), [0, 5, 10]);
        assert_eq!(Sampling::strided(9, 7).plan(20), [0, 7, 14]);
    }

    #[test]
    fn init_is_idempotent() {
        assert_eq!(init(), Ok(()));
        assert_eq!(init(), Ok(()));
    }
}

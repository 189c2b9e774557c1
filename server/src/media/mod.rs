//! Untrusted media in, backbone input tensors out.
//!
//! - [`image`] decodes JPEG, PNG and WebP with size limits checked against the header before any
//!   pixel buffer is allocated, and honours EXIF orientation.
//! - [`video`] decodes clips held in memory with FFmpeg, behind a container allow-list and budgets
//!   on bytes, duration, resolution, packets, frames and errors, and samples the frames a head needs.
//! - [`memory`] holds what all decodes in progress take to one process-wide budget.
//! - [`preprocess`] resizes, pads and normalises an RGB image into a planar CHW `f32` tensor and
//!   reports the [`Geometry`](crate::geometry::Geometry) that maps results back.
//!
//! Every failure is a [`MediaError`] whose message is meant for the caller: it says what was wrong
//! with the input and, for limits, what the limit is.

pub mod image;
pub mod memory;
pub mod preprocess;
pub mod video;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Tells a decode on a blocking thread that its call has ended (the client went away or the
/// deadline passed), so that it stops at its next packet or frame instead of running to its own
/// budget with nobody waiting: dropping the async side's future does not stop a blocking thread.
#[derive(Debug, Clone, Default)]
pub struct Cancel(Arc<AtomicBool>);

impl Cancel {
    /// Fails with [`MediaError::Cancelled`] once the call has ended.
    pub fn check(&self) -> Result<(), MediaError> {
        if self.0.load(Ordering::Relaxed) {
            return Err(MediaError::Cancelled);
        }
        Ok(())
    }

    /// A guard that cancels when it is dropped; the call's future holds it, so that the decode
    /// stops once that future is done or dropped.
    pub fn on_drop(&self) -> CancelOnDrop {
        CancelOnDrop(self.clone())
    }
}

/// See [`Cancel::on_drop`].
#[derive(Debug)]
pub struct CancelOnDrop(Cancel);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        (self.0).0.store(true, Ordering::Relaxed);
    }
}

/// Why media could not be decoded or prepared.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MediaError {
    /// The input held no bytes at all.
    #[error("the {0} is empty (0 bytes)")]
    Empty(&'static str),
    /// The encoded input is larger than allowed.
    #[error("{kind} is {len} bytes, the limit is {limit}")]
    TooManyBytes {
        /// What the bytes are ("video", "image").
        kind: &'static str,
        /// The input's size in bytes.
        len: u64,
        /// The limit in bytes.
        limit: u64,
    },
    /// The bytes are not one of the accepted image formats.
    #[error("unsupported image format: expected JPEG, PNG or WebP")]
    UnsupportedImageFormat,
    /// The image uses a feature of its format that the decoder does not support.
    #[error("unsupported {format} image: {detail}")]
    UnsupportedImageFeature {
        /// The format ("JPEG", "PNG", "WebP").
        format: &'static str,
        /// What is unsupported.
        detail: String,
    },
    /// The image data is damaged or truncated.
    #[error("corrupt {format} data: {detail}")]
    CorruptImage {
        /// The format ("JPEG", "PNG", "WebP").
        format: &'static str,
        /// What the decoder reported.
        detail: String,
    },
    /// An image or frame has a zero width or height.
    #[error("image is {width}x{height}: both sides must be at least 1 pixel")]
    ZeroSize {
        /// Width in pixels.
        width: u32,
        /// Height in pixels.
        height: u32,
    },
    /// One side of an image is longer than allowed.
    #[error("image is {width}x{height}, the limit is {max_width}x{max_height}")]
    ImageTooLarge {
        /// Width in pixels.
        width: u32,
        /// Height in pixels.
        height: u32,
        /// Largest accepted width.
        max_width: u32,
        /// Largest accepted height.
        max_height: u32,
    },
    /// An image has more pixels than allowed.
    #[error("image is {width}x{height} = {pixels} pixels, the limit is {limit}")]
    TooManyPixels {
        /// Width in pixels.
        width: u32,
        /// Height in pixels.
        height: u32,
        /// `width * height`.
        pixels: u64,
        /// Largest accepted pixel count.
        limit: u64,
    },
    /// Decoding would need more memory than allowed.
    #[error("decoding needs {needed} bytes of memory, the limit is {limit}")]
    TooMuchMemory {
        /// Bytes the decoded pixels would take.
        needed: u64,
        /// The limit in bytes.
        limit: u64,
    },
    /// The decoder refused the image under its memory or size limits.
    #[error("{format} image exceeds the decoder's limits: {detail}")]
    ExceedsDecoderLimits {
        /// The format ("JPEG", "PNG", "WebP").
        format: &'static str,
        /// What the decoder reported.
        detail: String,
    },
    /// Raw RGB pixels do not match the stated dimensions.
    #[error("raw RGB data is {len} bytes, a {width}x{height} image needs {expected}")]
    RawLengthMismatch {
        /// Stated width.
        width: u32,
        /// Stated height.
        height: u32,
        /// Bytes supplied.
        len: u64,
        /// Bytes `width * height * 3` requires.
        expected: u64,
    },
    /// FFmpeg recognised a container that is not on the allow-list.
    #[error("video container '{0}' is not allowed")]
    ContainerNotAllowed(String),
    /// FFmpeg recognised a container that is not on the allow-list, and it could not be named.
    #[error("video container is not allowed: accepted containers are {0}")]
    UnnamedContainerNotAllowed(String),
    /// The container holds no video stream.
    #[error("no video stream")]
    NoVideoStream,
    /// No decoder exists for the video codec.
    #[error("unsupported video codec '{0}'")]
    UnsupportedCodec(String),
    /// The video is damaged or truncated.
    #[error("corrupt video: {0}")]
    CorruptVideo(String),
    /// The video's frames are larger than allowed.
    #[error("video is {width}x{height}, the limit is {max_width}x{max_height}")]
    VideoTooLarge {
        /// Frame width in pixels.
        width: u32,
        /// Frame height in pixels.
        height: u32,
        /// Largest accepted width.
        max_width: u32,
        /// Largest accepted height.
        max_height: u32,
    },
    /// The clip is longer than allowed.
    #[error("clip is {duration_s:.1} s long, the limit is {limit_s} s")]
    ClipTooLong {
        /// The clip's duration in seconds.
        duration_s: f64,
        /// The limit in seconds.
        limit_s: f64,
    },
    /// The clip has more frames than allowed.
    #[error("clip has more than {limit} frames, the limit is {limit}")]
    TooManyFrames {
        /// The limit on frames.
        limit: usize,
    },
    /// The container has more packets than allowed.
    #[error("video has more than {limit} packets, the limit is {limit}")]
    TooManyPackets {
        /// The limit on packets.
        limit: usize,
    },
    /// Reading or decoding failed too often.
    #[error("corrupt video: {count} read or decode errors, the limit is {limit} (last: {last})")]
    TooManyErrors {
        /// Errors seen.
        count: usize,
        /// The limit on errors.
        limit: usize,
        /// The last error FFmpeg reported.
        last: String,
    },
    /// The sampled frames, as RGB, would take more memory than allowed.
    #[error("the sampled frames need {needed} bytes as RGB, the limit is {limit}")]
    FramesTooLarge {
        /// Bytes the sampled frames would take.
        needed: u64,
        /// The limit in bytes.
        limit: u64,
    },
    /// The decoder would keep more memory in frames than allowed.
    #[error(
        "decoding the video keeps {frames} frames of {frame_bytes} bytes ({needed} bytes: the \
         frame being decoded and the reference and reordering frames the stream declares), the \
         limit is {limit}"
    )]
    DecoderTooLarge {
        /// Frames the decoder keeps.
        frames: u64,
        /// Bytes of one decoded frame.
        frame_bytes: u64,
        /// Bytes they take together.
        needed: u64,
        /// The limit in bytes.
        limit: u64,
    },
    /// Decoding this input would take more memory than all decoding may hold at once.
    #[error(
        "decoding this input needs {needed} bytes, more than the {limit} bytes all decoding in \
         the server may hold at once (--max-decoding-bytes)"
    )]
    DecodingMemoryTooSmall {
        /// Bytes the decode needs.
        needed: u64,
        /// The limit in bytes.
        limit: u64,
    },
    /// The decodes of other calls hold the memory this one needs; it may succeed once they
    /// are done.
    #[error(
        "decoding this input needs {needed} bytes and other decodes hold {others} of the \
         {limit} bytes all decoding may hold at once (--max-decoding-bytes); retry later"
    )]
    DecodingMemoryFull {
        /// Bytes the decode needs.
        needed: u64,
        /// Bytes the other decodes hold.
        others: u64,
        /// The limit in bytes.
        limit: u64,
    },
    /// Decoding ran past its time budget.
    #[error("decoding the video took longer than the limit of {limit_s} s")]
    DecodeTimeout {
        /// The limit in seconds.
        limit_s: f64,
    },
    /// The video decoded to nothing.
    #[error("decoded no frames")]
    NoFrames,
    /// The call ended (cancelled, or past its deadline) while its media was being decoded.
    #[error("the call ended before its media was decoded")]
    Cancelled,
    /// The frame-sampling request is unusable.
    #[error("invalid frame sampling: {0}")]
    InvalidSampling(String),
    /// A preprocessing output buffer has the wrong length.
    #[error("output buffer holds {len} floats, the input tensor needs {expected}")]
    OutputSizeMismatch {
        /// Floats supplied.
        len: usize,
        /// Floats required.
        expected: usize,
    },
    /// FFmpeg or the decoder failed for a reason that is not the input's fault.
    #[error("media backend failure: {0}")]
    Internal(String),
}

impl MediaError {
    /// `true` when the input was refused because it exceeds a configured limit (as opposed to
    /// being malformed). Both are the request's fault and retrying cannot help, so both are
    /// answered INVALID_ARGUMENT; the distinction is kept for logs and metrics.
    pub fn is_limit(&self) -> bool {
        matches!(
            self,
            Self::TooManyBytes { .. }
                | Self::ImageTooLarge { .. }
                | Self::TooManyPixels { .. }
                | Self::TooMuchMemory { .. }
                | Self::ExceedsDecoderLimits { .. }
                | Self::VideoTooLarge { .. }
                | Self::ClipTooLong { .. }
                | Self::TooManyFrames { .. }
                | Self::TooManyPackets { .. }
                | Self::FramesTooLarge { .. }
                | Self::DecoderTooLarge { .. }
                | Self::DecodingMemoryTooSmall { .. }
                | Self::DecodeTimeout { .. }
        )
    }

    /// `true` when the server's decoding memory is full for now (`--max-decoding-bytes`): the
    /// input is fine, and the same call may succeed later, so it is RESOURCE_EXHAUSTED.
    pub fn is_full(&self) -> bool {
        matches!(self, Self::DecodingMemoryFull { .. })
    }

    /// `true` when the failure is the server's, not the input's.
    pub fn is_internal(&self) -> bool {
        matches!(self, Self::Internal(_) | Self::OutputSizeMismatch { .. })
    }
}

//! Server configuration: command-line flags, each with a `POLYHEAD_*` environment equivalent,
//! parsed into typed sub-structures that are passed down to the layers that use them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, ValueEnum};
use serde::Serialize;

use crate::engine::{Device, Placement};

/// What `--max-receiving-bytes` must hold beyond the largest request it admits: the budget
/// counts bytes as they arrive, a message's 5-byte gRPC prefix included, and a video streamed in
/// chunks has a prefix and a field header (about 10 bytes) per chunk; 64 KiB covers a video of
/// the default `--max-video-bytes` (512 MiB) in chunks of 80 KiB or more.
pub const FRAMING_ALLOWANCE: u64 = 64 << 10;

/// polyhead: one frozen vision backbone, many task heads, served over gRPC.
///
/// Loads one model set (a backbone and its heads), runs the backbone once per image and fans its
/// features out to the heads each request asks for.
#[derive(Debug, Clone, Parser, Serialize)]
#[command(name = "polyhead-server", version, about, long_about = None)]
#[serde(rename_all = "kebab-case")]
pub struct Config {
    /// TOML configuration file. Its keys are the long flag names (`max-image-pixels = 1000000`);
    /// precedence: defaults < file < environment < flags.
    #[arg(long, env = "POLYHEAD_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,

    /// Print the effective configuration as TOML (secrets redacted) and exit.
    #[arg(long)]
    #[serde(skip)]
    pub print_config: bool,

    /// Address the gRPC server listens on.
    #[arg(long, env = "POLYHEAD_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,

    /// Model set directory (holding `polyhead.toml`).
    #[arg(long, env = "POLYHEAD_MODELS", default_value = "models/generated/tiny")]
    pub models: PathBuf,

    #[command(flatten)]
    #[serde(flatten)]
    pub runtime: RuntimeConfig,

    #[command(flatten)]
    #[serde(flatten)]
    pub limits: Limits,

    #[command(flatten)]
    #[serde(flatten)]
    pub admission: crate::admission::AdmissionConfig,

    #[command(flatten)]
    #[serde(flatten)]
    pub cache: crate::pipeline::CacheConfig,

    #[command(flatten)]
    #[serde(flatten)]
    pub batch: crate::engine::BatchConfig,

    #[command(flatten)]
    #[serde(flatten)]
    pub handles: crate::pipeline::HandleConfig,

    #[command(flatten)]
    #[serde(flatten)]
    pub telemetry: crate::telemetry::TelemetryConfig,

    #[command(flatten)]
    #[serde(flatten)]
    pub security: crate::security::SecurityConfig,

    /// How long in-flight calls may take to finish after SIGTERM/SIGINT before the server
    /// stops, in seconds.
    #[arg(long, env = "POLYHEAD_DRAIN_TIMEOUT_SECONDS", default_value_t = 30.0)]
    pub drain_timeout_seconds: f64,

    /// Serve gRPC reflection (v1 and v1alpha) so grpcurl, grpcui and Postman work without the
    /// `.proto` files.
    #[arg(long, env = "POLYHEAD_REFLECTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub reflection: bool,

    /// glibc malloc arenas the server's threads share (0: glibc's default, eight per core).
    /// Each arena keeps the memory freed into it; requests are decoded on whichever thread
    /// serves them, so more arenas hold more idle decoding buffers. Set at start-up, before any
    /// thread.
    #[arg(long, env = "POLYHEAD_MALLOC_ARENAS", default_value_t = crate::heap::DEFAULT_ARENAS)]
    pub malloc_arenas: u32,

    /// Log output format.
    #[arg(long, env = "POLYHEAD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// ONNX Runtime settings.
#[derive(Debug, Clone, Args, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct RuntimeConfig {
    /// Execution provider: `cpu`, `cuda` or `cuda:N` (GPU N).
    #[arg(long, env = "POLYHEAD_DEVICE", default_value = "cpu")]
    pub device: Device,

    /// When a CUDA device is requested but cannot be used, run on the CPU instead of refusing to
    /// start.
    #[arg(long, env = "POLYHEAD_ALLOW_CPU_FALLBACK")]
    pub allow_cpu_fallback: bool,

    /// Where backbone features are kept: `device`, the execution provider's memory (GPU memory
    /// under CUDA; the heads read them from there, with no copy through the host), or `host`,
    /// copied to host memory after every backbone run.
    #[arg(
        long,
        env = "POLYHEAD_FEATURE_PLACEMENT",
        value_enum,
        default_value_t = Placement::Device
    )]
    pub feature_placement: Placement,

    /// Path of the ONNX Runtime shared library (`libonnxruntime.so`). Default: `ORT_DYLIB_PATH`,
    /// then the `onnxruntime` wheel in `./.venv` or next to the executable.
    #[arg(long, env = "POLYHEAD_ORT_DYLIB")]
    pub ort_dylib: Option<PathBuf>,

    /// Threads ONNX Runtime uses inside one operator, per session (0 = ONNX Runtime's default:
    /// one per physical core).
    #[arg(long, env = "POLYHEAD_INTRA_THREADS", default_value_t = 0)]
    pub intra_threads: usize,

    /// Let each session's ONNX Runtime threads spin while they wait for work instead of
    /// sleeping. Every model has its own session and thread pool, and heads run concurrently:
    /// spinning threads of one session take the cores the others need, so it is off unless the
    /// machine has cores to spare.
    #[arg(long, env = "POLYHEAD_INTRA_OP_SPINNING")]
    pub intra_op_spinning: bool,

    /// Requests that may wait for each model (backbone and every head) before new ones are
    /// refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "POLYHEAD_QUEUE_CAPACITY", default_value_t = 64)]
    pub queue_capacity: usize,

    /// Seconds without a batched run after which a model's next single-input run releases the
    /// memory batches grew ONNX Runtime's CPU arena by (CPU provider; 0: at the first
    /// single-input run after batches). Under steady load the arena keeps it for the next batch;
    /// what the warm-up's batches took goes at the first run after the warm-up.
    #[arg(long, env = "POLYHEAD_ARENA_RELEASE_SECONDS", default_value_t = 10)]
    pub arena_release_seconds: u32,
}

/// Limits on what one request may ask for. Each is checked before the work it guards.
#[derive(Debug, Clone, Args, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Limits {
    /// Largest request message accepted, in bytes (images and clips travel inside it).
    #[arg(long, env = "POLYHEAD_MAX_MESSAGE_BYTES", default_value_t = 64 << 20)]
    pub max_message_bytes: usize,

    /// Largest response message sent, in bytes; a ModelInfer whose outputs would be larger is
    /// refused with INVALID_ARGUMENT before they are encoded.
    #[arg(long, env = "POLYHEAD_MAX_RESPONSE_BYTES", default_value_t = 256 << 20)]
    pub max_response_bytes: usize,

    /// Largest image accepted, in pixels (width x height, read from the header before decoding).
    #[arg(long, env = "POLYHEAD_MAX_IMAGE_PIXELS", default_value_t = 40_000_000)]
    pub max_image_pixels: u64,

    /// Largest image width or height accepted, in pixels.
    #[arg(long, env = "POLYHEAD_MAX_IMAGE_SIDE", default_value_t = 8192)]
    pub max_image_side: u32,

    /// Most pixels the instance masks of one detection head on one image may cover in all,
    /// counted over their boxes (each box's pixels are evaluated). A Detect or Analyze asking
    /// for masks over more is refused with INVALID_ARGUMENT before any mask is computed.
    #[arg(long, env = "POLYHEAD_MAX_MASK_PIXELS", default_value_t = 200_000_000)]
    pub max_mask_pixels: u64,

    /// Most memory the decoder may allocate for one image, in bytes.
    #[arg(long, env = "POLYHEAD_MAX_IMAGE_DECODE_BYTES", default_value_t = 512 << 20)]
    pub max_image_decode_bytes: u64,

    /// Longest clip accepted, in seconds.
    #[arg(long, env = "POLYHEAD_MAX_CLIP_SECONDS", default_value_t = 120.0)]
    pub max_clip_seconds: f64,

    /// Largest clip width or height accepted, in pixels.
    #[arg(long, env = "POLYHEAD_MAX_CLIP_SIDE", default_value_t = 4096)]
    pub max_clip_side: u32,

    /// Most frames decoded from one clip (sampling stops decoding once it has what it needs).
    #[arg(long, env = "POLYHEAD_MAX_DECODED_FRAMES", default_value_t = 10_000)]
    pub max_decoded_frames: usize,

    /// Most memory a clip's sampled frames may take as RGB, in bytes (checked from the stream's
    /// size before decoding).
    #[arg(long, env = "POLYHEAD_MAX_CLIP_FRAME_BYTES", default_value_t = 1 << 30)]
    pub max_clip_frame_bytes: u64,

    /// Most memory a clip's decoder may keep in frames, in bytes: the frame being decoded and
    /// the reference and reordering frames its stream declares (an H.264 stream may declare 16
    /// of the largest picture --max-clip-side allows). Checked at every decoded frame.
    #[arg(long, env = "POLYHEAD_MAX_CLIP_DECODER_BYTES", default_value_t = 512 << 20)]
    pub max_clip_decoder_bytes: u64,

    /// Most memory all decoding in the server may hold at once, in bytes, over every call: an
    /// image's decoder buffers and pixels until preprocessed, a clip's decoder frames and
    /// sampled frames until preprocessed, a window stream's decoder frames while it decodes. A
    /// call whose media would take more than is left is refused with RESOURCE_EXHAUSTED, to
    /// retry (in a window stream, possibly after some windows); one that needs more than all
    /// of it, with INVALID_ARGUMENT: it also caps what one image or clip may take.
    #[arg(long, env = "POLYHEAD_MAX_DECODING_BYTES", default_value_t = 2 << 30)]
    pub max_decoding_bytes: u64,

    /// Longest time one clip may take to open, probe, demux and decode, in seconds (the call's
    /// deadline also ends it).
    #[arg(long, env = "POLYHEAD_MAX_CLIP_DECODE_SECONDS", default_value_t = 60.0)]
    pub max_clip_decode_seconds: f64,

    /// Most frames one action request may sample; also capped by the head's `max_frames`. A
    /// request that sends more frames as images has them sampled down to this.
    #[arg(long, env = "POLYHEAD_MAX_FRAMES", default_value_t = 64)]
    pub max_frames: u32,

    /// Most bytes one RecognizeActionWindows stream may upload (its video file, over all its
    /// messages; each message is also held to --max-message-bytes).
    #[arg(long, env = "POLYHEAD_MAX_VIDEO_BYTES", default_value_t = 512 << 20)]
    pub max_video_bytes: u64,

    /// Longest video RecognizeActionWindows accepts, in seconds; it decodes at most this
    /// duration at 240 frames/s (or --max-decoded-frames, if that is more).
    #[arg(long, env = "POLYHEAD_MAX_VIDEO_SECONDS", default_value_t = 3600.0)]
    pub max_video_seconds: f64,

    /// Most frames one RecognizeActionWindows stream may sample.
    #[arg(long, env = "POLYHEAD_MAX_VIDEO_FRAMES", default_value_t = 100_000)]
    pub max_video_frames: u64,

    /// Most windows one RecognizeActionWindows stream may answer.
    #[arg(long, env = "POLYHEAD_MAX_VIDEO_WINDOWS", default_value_t = 20_000)]
    pub max_video_windows: u64,

    /// Most labels one action request may ask for.
    #[arg(long, env = "POLYHEAD_MAX_TOP_K", default_value_t = 100)]
    pub max_top_k: u32,

    /// Deadline applied to requests that carry none, in seconds.
    #[arg(long, env = "POLYHEAD_DEFAULT_TIMEOUT_SECONDS", default_value_t = 60.0)]
    pub default_timeout_seconds: f64,

    /// Longest deadline any call gets, in seconds: a caller's longer `grpc-timeout` is cut to it.
    #[arg(long, env = "POLYHEAD_MAX_TIMEOUT_SECONDS", default_value_t = 300.0)]
    pub max_timeout_seconds: f64,

    /// How long clients should wait before retrying a call refused with RESOURCE_EXHAUSTED, in
    /// milliseconds; sent as the `grpc-retry-pushback-ms` trailer.
    #[arg(long, env = "POLYHEAD_RETRY_PUSHBACK_MS", default_value_t = 100)]
    pub retry_pushback_ms: u64,
}

impl Limits {
    /// The longest deadline any call gets.
    pub fn max_timeout(&self) -> Duration {
        Duration::try_from_secs_f64(self.max_timeout_seconds).unwrap_or(Duration::from_secs(300))
    }

    /// The deadline for requests that carry none.
    pub fn default_timeout(&self) -> Duration {
        Duration::try_from_secs_f64(self.default_timeout_seconds).unwrap_or(Duration::from_secs(60))
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

impl Config {
    /// How the gRPC server is put together.
    pub fn serve_options(&self) -> crate::grpc::ServeOptions {
        crate::grpc::ServeOptions {
            max_request_bytes: self.limits.max_message_bytes,
            max_upload_bytes: self.limits.max_video_bytes,
            max_response_bytes: self.limits.max_response_bytes,
            reflection: self.reflection,
            max_concurrent_streams: self.admission.max_concurrent_streams,
            drain_timeout: Duration::try_from_secs_f64(self.drain_timeout_seconds)
                .unwrap_or_default(),
            default_timeout: self.limits.default_timeout(),
            max_timeout: self.limits.max_timeout(),
            max_receiving_bytes: self.admission.max_receiving_bytes,
            retry_pushback_ms: self.limits.retry_pushback_ms,
        }
    }

    /// Checks what clap's types cannot: durations finite and in range, sizes non-zero.
    pub fn validate(&self) -> Result<(), String> {
        let seconds = [
            ("drain-timeout-seconds", self.drain_timeout_seconds, true),
            (
                "default-timeout-seconds",
                self.limits.default_timeout_seconds,
                false,
            ),
            (
                "max-timeout-seconds",
                self.limits.max_timeout_seconds,
                false,
            ),
            ("max-clip-seconds", self.limits.max_clip_seconds, false),
            (
                "max-clip-decode-seconds",
                self.limits.max_clip_decode_seconds,
                false,
            ),
            ("max-video-seconds", self.limits.max_video_seconds, false),
        ];
        for (flag, value, zero_ok) in seconds {
            let ok = value.is_finite() && value < 1e9 && (value > 0.0 || (zero_ok && value == 0.0));
            if !ok {
                return Err(format!(
                    "--{flag} is {value}; it must be a positive number of seconds"
                ));
            }
        }
        let sizes = [
            ("max-message-bytes", self.limits.max_message_bytes as u64),
            ("max-response-bytes", self.limits.max_response_bytes as u64),
            ("max-image-pixels", self.limits.max_image_pixels),
            ("max-image-side", u64::from(self.limits.max_image_side)),
            ("max-image-decode-bytes", self.limits.max_image_decode_bytes),
            ("max-mask-pixels", self.limits.max_mask_pixels),
            ("max-clip-frame-bytes", self.limits.max_clip_frame_bytes),
            ("max-clip-decoder-bytes", self.limits.max_clip_decoder_bytes),
            ("max-decoding-bytes", self.limits.max_decoding_bytes),
            ("max-clip-side", u64::from(self.limits.max_clip_side)),
            ("max-decoded-frames", self.limits.max_decoded_frames as u64),
            ("max-frames", u64::from(self.limits.max_frames)),
            ("max-top-k", u64::from(self.limits.max_top_k)),
            ("max-video-bytes", self.limits.max_video_bytes),
            ("max-video-frames", self.limits.max_video_frames),
            ("max-video-windows", self.limits.max_video_windows),
            ("handle-bytes", self.handles.handle_bytes),
            ("queue-capacity", self.runtime.queue_capacity as u64),
            (
                "max-concurrent-requests",
                self.admission.max_concurrent_requests as u64,
            ),
            (
                "max-concurrent-streams",
                u64::from(self.admission.max_concurrent_streams),
            ),
        ];
        if let Some((flag, _)) = sizes.iter().find(|(_, v)| *v == 0) {
            return Err(format!("--{flag} must be at least 1"));
        }
        let receiving = self.admission.max_receiving_bytes;
        let largest = [
            ("max-message-bytes", self.limits.max_message_bytes as u64),
            ("max-video-bytes", self.limits.max_video_bytes),
        ];
        match largest
            .iter()
            .find(|(_, v)| v.saturating_add(FRAMING_ALLOWANCE) > receiving)
        {
            Some((flag, bytes)) => Err(format!(
                "--max-receiving-bytes is {receiving}, less than --{flag} ({bytes}) and \
                 {FRAMING_ALLOWANCE} bytes for its gRPC framing: such a request could never be \
                 received"
            )),
            None => Ok(()),
        }
    }

    /// The configuration a test server uses: defaults, the given model set, one intra-op thread.
    pub fn for_models(models: impl Into<PathBuf>) -> Self {
        let mut config = Self::parse_from(["polyhead-server"]);
        config.models = models.into();
        config.runtime.intra_threads = 1;
        config
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_parse_into_typed_config() {
        let config = Config::try_parse_from([
            "polyhead-server",
            "--listen",
            "0.0.0.0:6000",
            "--device",
            "cuda:1",
            "--max-frames",
            "16",
        ])
        .expect("valid flags");
        assert_eq!(config.listen.port(), 6000);
        assert_eq!(config.runtime.device, Device::Cuda(1));
        assert_eq!(config.limits.max_frames, 16);
    }

    #[test]
    fn out_of_range_values_are_refused_by_name() {
        let mut config = Config::for_models("m");
        assert_eq!(config.validate(), Ok(()));
        config.limits.default_timeout_seconds = f64::NAN;
        let err = config.validate().expect_err("NaN timeout");
        assert!(err.contains("--default-timeout-seconds"), "{err}");
        config.limits.default_timeout_seconds = 5.0;
        config.limits.max_frames = 0;
        assert!(
            config
                .validate()
                .expect_err("zero frames")
                .contains("--max-frames")
        );
        config.limits.max_frames = 16;
        for (flag, zero) in [
            (
                "--max-top-k",
                (|c: &mut Config| c.limits.max_top_k = 0) as fn(&mut Config),
            ),
            ("--max-clip-side", |c| c.limits.max_clip_side = 0),
            ("--max-decoded-frames", |c| c.limits.max_decoded_frames = 0),
            ("--max-mask-pixels", |c| c.limits.max_mask_pixels = 0),
            ("--handle-bytes", |c| c.handles.handle_bytes = 0),
            ("--max-video-bytes", |c| {
                c.admission.max_receiving_bytes = c.limits.max_video_bytes + FRAMING_ALLOWANCE - 1;
            }),
            ("--max-message-bytes", |c| {
                c.admission.max_receiving_bytes =
                    c.limits.max_message_bytes as u64 + FRAMING_ALLOWANCE - 1;
            }),
        ] {
            let mut config = config.clone();
            zero(&mut config);
            let err = config.validate().expect_err(flag);
            assert!(err.contains(flag), "{err}");
        }
    }

    #[test]
    fn bad_device_is_rejected() {
        let err = Config::try_parse_from(["polyhead-server", "--device", "tpu"])
            .expect_err("tpu is not a device");
        assert!(err.to_string().contains("tpu"), "{err}");
    }
}

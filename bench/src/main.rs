//! `polyhead-bench`: every variant side by side in one run with the same ONNX Runtime thread
//! settings — the backbone and head sessions driven in-process (raw: the limit for the server),
//! polyhead over gRPC on loopback (the real server binary as a child process), and one full model
//! per task (naive) — then the ratios against the targets, a table and a JSON report.

mod grpc;
mod media;
mod raw;
mod report;
mod rss;
mod server;
mod stats;
mod targets;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use polyhead_client::{image_from_bytes, raw_image, v1};

use crate::media::Photo;
use crate::raw::{Tensor, Timing};
use crate::report::{Phase, Report};
use crate::server::{Server, ServerSpec};
use crate::targets::WindowRows;
use crate::targets::names::*;

/// Benchmarks polyhead against its own sessions driven directly and against one model per task.
#[derive(Debug, Clone, Parser)]
#[command(version)]
struct Args {
    /// Smoke mode: the tiny model set and about a second per variant, to prove every variant runs.
    #[arg(long)]
    smoke: bool,
    /// Model set directory (default: models/generated/swin-t, or tiny with --smoke).
    #[arg(long)]
    models: Option<PathBuf>,
    /// The photo every image variant uses.
    #[arg(long, default_value = ".cache/testdata/astronaut.png")]
    photo: PathBuf,
    /// The photo the clips are made from (a window panning across it).
    #[arg(long, default_value = ".cache/testdata/coffee.png")]
    clip_photo: PathBuf,
    /// Measured seconds per variant (default 10, or 1 with --smoke).
    #[arg(long)]
    seconds: Option<f64>,
    /// Warm-up seconds before each variant (default 2, or 0.3 with --smoke).
    #[arg(long)]
    warmup: Option<f64>,
    /// ONNX Runtime intra-op threads per session, for the server and the in-process sessions.
    #[arg(long, default_value_t = 2)]
    intra_threads: usize,
    /// Threads, each with its own sessions, of the in-process saturation variant.
    #[arg(long, default_value_t = 2)]
    raw_threads: usize,
    /// Concurrency levels tried for gRPC Detect at saturation; the best is the saturation figure.
    #[arg(long, value_delimiter = ',', default_value = "2,4,8")]
    concurrency: Vec<usize>,
    /// Feature cache budget of the cache phase, in bytes.
    #[arg(long, default_value_t = 64 << 20)]
    cache_bytes: u64,
    /// Frames of the RecognizeAction clip (T).
    #[arg(long, default_value_t = 16)]
    clip_frames: u32,
    /// Frames of the video cut into sliding windows of T frames.
    #[arg(long, default_value_t = 64)]
    window_video_frames: u32,
    /// Stride s of the overlapping windows.
    #[arg(long, default_value_t = 4)]
    window_stride: u32,
    /// Where the JSON report goes.
    #[arg(long, default_value = "target/bench/bench.json")]
    json: PathBuf,
    /// The server binary (default: polyhead-server next to this executable).
    #[arg(long)]
    server_bin: Option<PathBuf>,
}

/// Everything the variants share.
struct Inputs {
    photo: Photo,
    clip: Arc<Vec<u8>>,
    clip_tensor: Tensor,
    window_video: Arc<Vec<u8>>,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let started = Instant::now();
    let models = args.models.clone().unwrap_or_else(|| {
        let preset = if args.smoke { "tiny" } else { "swin-t" };
        PathBuf::from("models/generated").join(preset)
    });
    let timing = Timing {
        warmup: secs(args.warmup.unwrap_or(if args.smoke { 0.3 } else { 2.0 })),
        seconds: secs(args.seconds.unwrap_or(if args.smoke { 1.0 } else { 10.0 })),
    };
    let out_dir = args.json.parent().unwrap_or(Path::new(".")).to_path_buf();
    std::fs::create_dir_all(&out_dir)?;
    let inputs = prepare(&args, &models, &out_dir)?;
    eprintln!(
        "bench: {} , {:?} per variant",
        models.display(),
        timing.seconds
    );
    let mut report = Report {
        settings: settings(&args, &models, timing),
        rows: Vec::new(),
        phases: Vec::new(),
        weights_bytes: weights_bytes(&models)?,
        targets: Vec::new(),
        unavailable: Vec::new(),
        wall_seconds: 0.0,
    };
    in_process(&args, &models, &inputs, timing, &mut report)?;
    let spec = |cache_bytes: u64, phase: &str| ServerSpec {
        binary: server_binary(&args),
        models: models.clone(),
        intra_threads: args.intra_threads,
        cache_bytes,
        placement: "device",
        spinning: false,
        log: out_dir.join(format!("server-{phase}.log")),
    };
    let windows = uncached(&args, &inputs, timing, &spec(0, "uncached"), &mut report).await?;
    cached(
        &inputs,
        timing,
        &spec(args.cache_bytes, "cached"),
        &mut report,
    )
    .await?;
    let host = ServerSpec {
        placement: "host",
        ..spec(0, "host")
    };
    variant(&args, &inputs, timing, GRPC_HOST, &host, &mut report).await?;
    let spinning = ServerSpec {
        spinning: true,
        ..spec(0, "spinning")
    };
    variant(
        &args,
        &inputs,
        timing,
        GRPC_SPINNING,
        &spinning,
        &mut report,
    )
    .await?;
    report.targets = targets::evaluate(&report, windows.as_ref(), args.cache_bytes);
    report.wall_seconds = started.elapsed().as_secs_f64();
    report.print();
    report.write(&args.json)?;
    println!("report: {}", args.json.display());
    Ok(())
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.0))
}

fn prepare(args: &Args, models: &Path, out_dir: &Path) -> Result<Inputs> {
    let spec = media::preprocess_spec(models)?;
    let photo = media::photo(&args.photo, &spec)?;
    let stem = args
        .clip_photo
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("clip");
    let clip_path = out_dir.join(format!("{stem}-{}.mp4", args.clip_frames));
    let clip = read(&media::make_clip(
        &args.clip_photo,
        args.clip_frames as usize,
        &clip_path,
    )?)?;
    let clip_tensor = media::clip_tensor(&clip, args.clip_frames as usize, &spec)?;
    let long_path = out_dir.join(format!("{stem}-{}.mp4", args.window_video_frames));
    let window_video = read(&media::make_clip(
        &args.clip_photo,
        args.window_video_frames as usize,
        &long_path,
    )?)?;
    Ok(Inputs {
        photo,
        clip: Arc::new(clip),
        clip_tensor,
        window_video: Arc::new(window_video),
    })
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("read {}", path.display()))
}

fn settings(args: &Args, models: &Path, timing: Timing) -> serde_json::Value {
    serde_json::json!({
        "models": models.display().to_string(),
        "photo": args.photo.display().to_string(),
        "clip_photo": args.clip_photo.display().to_string(),
        "intra_threads": args.intra_threads,
        "raw_threads": args.raw_threads,
        "concurrency": args.concurrency,
        "seconds_per_variant": timing.seconds.as_secs_f64(),
        "warmup_seconds": timing.warmup.as_secs_f64(),
        "cache_bytes": args.cache_bytes,
        "clip_frames": args.clip_frames,
        "window_video_frames": args.window_video_frames,
        "window_stride": args.window_stride,
        "raw_inputs": "preprocessed tensors: decoding, preprocessing and post-processing excluded",
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
    })
}

/// Bytes of the backbone and head ONNX files (the weights the server holds).
fn weights_bytes(models: &Path) -> Result<u64> {
    let manifest =
        polyhead_server::manifest::Manifest::load(models).map_err(|e| anyhow::anyhow!("{e}"))?;
    let files =
        std::iter::once(&manifest.backbone.file).chain(manifest.heads.iter().map(|h| &h.file));
    let mut total = 0;
    for file in files {
        total += std::fs::metadata(models.join(file))?.len();
    }
    Ok(total)
}

fn server_binary(args: &Args) -> PathBuf {
    args.server_bin.clone().unwrap_or_else(|| {
        std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(|dir| dir.join("polyhead-server")))
            .unwrap_or_else(|| PathBuf::from("target/release/polyhead-server"))
    })
}

/// The raw and naive rows: ONNX Runtime sessions in this process.
fn in_process(
    args: &Args,
    models: &Path,
    inputs: &Inputs,
    timing: Timing,
    report: &mut Report,
) -> Result<()> {
    let set = raw::Models::new(models, args.intra_threads)?;
    let image = &inputs.photo.tensor;
    for threads in [1, args.raw_threads.max(1)] {
        let name = format!("{RAW_DETECT} c={threads}");
        eprintln!("bench: {name}");
        let row = raw::measure(&name, "raw", 1, timing, || {
            (0..threads)
                .map(|_| set.shared(&["detection"]).map(|mut s| move || s.run(image)))
                .collect()
        })?;
        report.rows.push(row);
        if args.raw_threads <= 1 {
            break;
        }
    }
    let name = format!("{RAW_SHARED} c=1");
    eprintln!("bench: {name}");
    let row = raw::measure(&name, "raw", 1, timing, || {
        let mut shared = set.shared(&["detection", "segmentation"])?;
        Ok(vec![move || shared.run(image)])
    })?;
    report.rows.push(row);
    let name = format!("{NAIVE_PAIR} c=1");
    eprintln!("bench: {name}");
    let input = set.input_name().to_owned();
    let mut row = raw::measure(&name, "naive", 1, timing, || {
        let mut pair =
            set.monolithic(&["reference_detection.onnx", "reference_segmentation.onnx"])?;
        Ok(vec![move || raw::run_monolithic(&mut pair, &input, image)])
    })?;
    // Each full model runs its own copy of the backbone.
    row.backbone_passes_per_request = Some(2.0);
    report.rows.push(row);
    let name = format!("{RAW_FRAMES} c=1");
    eprintln!("bench: {name}");
    let frames = &inputs.clip_tensor;
    let row = raw::measure(&name, "raw", args.clip_frames, timing, || {
        let mut backbone = set.shared(&[])?;
        Ok(vec![move || backbone.run(frames)])
    })?;
    report.rows.push(row);
    Ok(())
}

/// Detect at concurrency 1 and at every `--concurrency` level, rows named `<name> c=<level>`.
async fn detect_levels(
    args: &Args,
    timing: Timing,
    server: &Server,
    client: &polyhead_client::Client,
    image: &v1::Image,
    name: &str,
    report: &mut Report,
) -> Result<()> {
    let mut levels = vec![1];
    levels.extend(args.concurrency.iter().copied().filter(|&c| c > 1));
    for c in levels {
        let (client, image) = (client.clone(), image.clone());
        let name = format!("{name} c={c}");
        eprintln!("bench: {name}");
        let row = grpc::measure(server, &name, c, 1, timing, move |_| {
            grpc::detect(client.clone(), image.clone())
        })
        .await?;
        report.rows.push(row);
    }
    Ok(())
}

/// The gRPC rows with the feature cache off: every image request runs the backbone.
async fn uncached(
    args: &Args,
    inputs: &Inputs,
    timing: Timing,
    spec: &ServerSpec,
    report: &mut Report,
) -> Result<Option<WindowRows>> {
    eprintln!("bench: starting the server (cache off)");
    let server = Server::start(spec).await?;
    let client = grpc::connect(&server).await?;
    let image = image_from_bytes(inputs.photo.encoded.clone());
    detect_levels(args, timing, &server, &client, &image, GRPC_DETECT, report).await?;
    let (c2, i2) = (client.clone(), image.clone());
    eprintln!("bench: {GRPC_SEGMENT}");
    let row = grpc::measure(&server, GRPC_SEGMENT, 1, 1, timing, move |_| {
        grpc::segment(c2.clone(), i2.clone())
    })
    .await?;
    report.rows.push(row);
    let (c3, i3) = (client.clone(), image.clone());
    eprintln!("bench: {GRPC_ANALYZE}");
    let row = grpc::measure(&server, GRPC_ANALYZE, 1, 1, timing, move |_| {
        grpc::analyze(c3.clone(), i3.clone())
    })
    .await?;
    report.rows.push(row);
    let (c4, clip, frames) = (client.clone(), Arc::clone(&inputs.clip), args.clip_frames);
    eprintln!("bench: {GRPC_CLIP}");
    let row = grpc::measure(&server, GRPC_CLIP, 1, frames, timing, move |_| {
        grpc::action(c4.clone(), Arc::clone(&clip), frames)
    })
    .await?;
    report.rows.push(row);
    let windows = windows(args, inputs, timing, &server, &client, report).await?;
    report.phases.push(Phase {
        name: "uncached phase".into(),
        cache_bytes: 0,
        peak_rss_mb: rss::peak_mb(server.pid()),
    });
    server.stop().await?;
    Ok(windows)
}

/// Detect at every concurrency level, and Analyze at concurrency 1, on a server started
/// otherwise than the default (`spec`), its rows named after `prefix`.
async fn variant(
    args: &Args,
    inputs: &Inputs,
    timing: Timing,
    prefix: &str,
    spec: &ServerSpec,
    report: &mut Report,
) -> Result<()> {
    eprintln!("bench: starting the server (cache off; {prefix})");
    let server = Server::start(spec).await?;
    let client = grpc::connect(&server).await?;
    let image = image_from_bytes(inputs.photo.encoded.clone());
    let detect = format!("{prefix} Detect");
    detect_levels(args, timing, &server, &client, &image, &detect, report).await?;
    let name = format!("{prefix} Analyze c=1");
    eprintln!("bench: {name}");
    let row = grpc::measure(&server, &name, 1, 1, timing, move |_| {
        grpc::analyze(client.clone(), image.clone())
    })
    .await?;
    report.rows.push(row);
    server.stop().await
}

/// Sliding windows of T frames with stride s and with stride T (no overlap) over one video.
async fn windows(
    args: &Args,
    inputs: &Inputs,
    timing: Timing,
    server: &Server,
    client: &polyhead_client::Client,
    report: &mut Report,
) -> Result<Option<WindowRows>> {
    let (frames, video) = (args.clip_frames, &inputs.window_video);
    let mut per_window_images = Vec::new();
    let mut names = Vec::new();
    for stride in [args.window_stride, frames] {
        let probe = grpc::windows(client.clone(), Arc::clone(video), frames, stride).await;
        let probe = match probe {
            Ok(probe) if probe.windows > 0 => probe,
            Ok(_) => return unavailable(report, "RecognizeActionWindows answered no windows"),
            Err(e) => return unavailable(report, &format!("RecognizeActionWindows: {e}")),
        };
        per_window_images.push(f64::from(probe.backbone_images) / f64::from(probe.windows));
        let name = format!("{GRPC_WINDOWS} T={frames} s={stride} c=1");
        eprintln!("bench: {name}");
        let (client, video) = (client.clone(), Arc::clone(video));
        let row = grpc::measure(server, &name, 1, probe.windows, timing, move |_| {
            let (client, video) = (client.clone(), Arc::clone(&video));
            async move {
                let call = grpc::windows(client, video, frames, stride).await?;
                Ok(call.backbone_passes)
            }
        })
        .await?;
        report.rows.push(row);
        names.push(name);
    }
    Ok(Some(WindowRows {
        overlapping: names[0].clone(),
        disjoint: names[1].clone(),
        stride: args.window_stride,
        frames,
        frame_bound: per_window_images[0] / per_window_images[1].max(1e-12),
    }))
}

fn unavailable(report: &mut Report, why: &str) -> Result<Option<WindowRows>> {
    eprintln!("bench: {why}");
    report.unavailable.push(why.to_owned());
    Ok(None)
}

/// The cache phase: a cold Segment (a new image every call) and a Segment on an image the
/// server has seen, both sent as raw RGB so that they cost the same to decode.
async fn cached(
    inputs: &Inputs,
    timing: Timing,
    spec: &ServerSpec,
    report: &mut Report,
) -> Result<()> {
    eprintln!(
        "bench: starting the server (cache on, {} MiB)",
        spec.cache_bytes >> 20
    );
    let server = Server::start(spec).await?;
    let client = grpc::connect(&server).await?;
    let photo = Arc::new((
        inputs.photo.width,
        inputs.photo.height,
        inputs.photo.rgb.clone(),
    ));
    let (c1, p1) = (client.clone(), Arc::clone(&photo));
    eprintln!("bench: {SEGMENT_COLD}");
    let row = grpc::measure(&server, SEGMENT_COLD, 1, 1, timing, move |n| {
        let (w, h, rgb) = &*p1;
        let image = raw_image(*w, *h, media::variant(rgb, *w, n + 1));
        grpc::segment(c1.clone(), image)
    })
    .await?;
    report.rows.push(row);
    let (w, h, rgb) = &*photo;
    let seen = raw_image(*w, *h, rgb.clone());
    eprintln!("bench: {SEGMENT_WARM}");
    let row = grpc::measure(&server, SEGMENT_WARM, 1, 1, timing, move |_| {
        grpc::segment(client.clone(), seen.clone())
    })
    .await?;
    report.rows.push(row);
    report.phases.push(Phase {
        name: "cache phase".into(),
        cache_bytes: spec.cache_bytes,
        peak_rss_mb: rss::peak_mb(server.pid()),
    });
    server.stop().await
}

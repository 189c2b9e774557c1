//! `polyhead-bench`: every variant side by side in one run with the same ONNX Runtime thread
//! settings — the backbone and head sessions driven in-process (raw: the limit for the server),
//! polyhead over gRPC on loopback (the real server binary as a child process), and one full model
//! per task (naive) — then the ratios against the targets, a table and a JSON report.

mod grpc;
mod media;
mod raw;
mod report;
mod rounds;
mod rss;
mod server;
mod stats;
mod targets;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use polyhead_client::{Bytes, image_from_bytes, raw_image, v1};

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
    /// Measure only the c=1 Detect target's pair (see `--c1-seconds`).
    #[arg(long)]
    c1_detect_only: bool,
    /// Measured seconds per variant of the c=1 Detect target's pair: the server's Detect and the
    /// Detect from the photo's bytes in a process of its own, interleaved request by request with
    /// each other only (default 60, or 1 with --smoke). Their per-request difference varies by
    /// 10-20 ms on a shared 2-core machine, so the ~500 turns of the default bound its median to
    /// within +-0.4-0.8 ms (95%), where the ~80 of the side-by-side variants' 10 seconds could
    /// not tell 2 ms.
    #[arg(long)]
    c1_seconds: Option<f64>,
    /// Processes each side of the c=1 Detect target's pair is spread over, turn by turn: fresh
    /// servers, and fresh processes of the in-process Detect, started together (default 3, or 2
    /// with --smoke). How one process's weights and buffers land in memory moves its model runs
    /// by a millisecond or more on a 2-core machine, as much as the target allows: one process
    /// of each would measure that draw.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    c1_processes: Option<u32>,
    /// Measured seconds per side of the saturation target's pair: the server's Detect at its best
    /// concurrency level and the Detect from the photo's bytes at its best thread count (both
    /// chosen from the side-by-side rows), alternating in slices of about 4 s with each other
    /// only (default 40, or 1 with --smoke). The 10 s of a side-by-side row, in 2 s slices among
    /// a dozen other variants, move its requests/s by several hundredths from run to run.
    #[arg(long)]
    saturation_seconds: Option<f64>,
    /// Model set directory (default: models/generated/swin-t, or tiny with --smoke).
    #[arg(long)]
    models: Option<PathBuf>,
    /// The photo every image variant uses.
    #[arg(long, default_value = ".cache/testdata/astronaut.png")]
    photo: PathBuf,
    /// The photo the clips are made from (a window panning across it).
    #[arg(long, default_value = ".cache/testdata/coffee.png")]
    clip_photo: PathBuf,
    /// Measured seconds per variant of the side-by-side and cache phases (default 10, or 1 with
    /// --smoke); the c=1 Detect target's pair takes `--c1-seconds`.
    #[arg(long)]
    seconds: Option<f64>,
    /// Warm-up seconds before each variant (default 2, or 0.3 with --smoke).
    #[arg(long)]
    warmup: Option<f64>,
    /// Rounds the measured seconds of the side-by-side variants are split into: every round runs
    /// each variant once, so that the machine's drift during the run weighs on all alike
    /// (default 5, or 2 with --smoke). The single images at concurrency 1 run interleaved request
    /// by request instead; the report gives their p50 over this many blocks of requests.
    #[arg(long)]
    rounds: Option<u32>,
    /// ONNX Runtime intra-op threads per session, for the server and the in-process sessions.
    #[arg(long, default_value_t = 2)]
    intra_threads: usize,
    /// Threads, each with its own sessions, of the in-process saturation variants: the Detect from
    /// the photo's bytes (the saturation target's limit) and the sessions fed the tensor.
    #[arg(long, default_value_t = 2)]
    raw_threads: usize,
    /// Concurrency levels tried for gRPC Detect at saturation; the best is the saturation figure.
    #[arg(long, value_delimiter = ',', default_value = "2,4,8")]
    concurrency: Vec<usize>,
    /// Feature cache budget of the cache phase, in bytes (default: the server's default,
    /// 268435456, or 4 MiB with --smoke). The phase fills it before reading the server's memory.
    #[arg(long)]
    cache_bytes: Option<u64>,
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
    /// Serve the c=1 pair's in-process Detect for the benchmark that started this process.
    #[arg(long = raw::DETECT_PROCESS_OPTION, hide = true)]
    photo_detect_process: bool,
}

/// Everything the variants share.
struct Inputs {
    photo: Photo,
    clip: Bytes,
    clip_tensor: Tensor,
    window_video: Bytes,
}

fn main() -> Result<()> {
    // The in-process sessions load ONNX Runtime here too, and allocate as the server does.
    polyhead_server::engine::disable_runtime_telemetry();
    polyhead_server::heap::limit_arenas(polyhead_server::heap::DEFAULT_ARENAS);
    let args = Args::parse();
    let models = args.models.clone().unwrap_or_else(|| {
        let preset = if args.smoke { "tiny" } else { "swin-t" };
        PathBuf::from("models/generated").join(preset)
    });
    if args.photo_detect_process {
        return raw::serve_photo_detect(&models, &args.photo, args.intra_threads);
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(args, models))
}

async fn run(args: Args, models: PathBuf) -> Result<()> {
    let started = Instant::now();
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
        pair_processes: 1,
    };
    let rounds = args.rounds.unwrap_or(if args.smoke { 2 } else { 5 });
    let cache_bytes = cache_bytes(&args);
    let spec = |cache_bytes: u64, phase: &str| ServerSpec {
        binary: server_binary(&args),
        models: models.clone(),
        intra_threads: args.intra_threads,
        cache_bytes,
        placement: "device",
        spinning: false,
        log: out_dir.join(format!("server-{phase}.log")),
    };
    let pair_timing = Timing {
        seconds: secs(c1_seconds(&args)),
        ..timing
    };
    let mut windows = None;
    if !args.c1_detect_only {
        windows = side_by_side(&args, &models, &inputs, timing, rounds, &spec, &mut report).await?;
        cached(
            &inputs,
            timing,
            rounds,
            &spec(cache_bytes, "cached"),
            &mut report,
        )
        .await?;
    }
    let pair = spec(0, "c1");
    c1_detect(
        &args,
        &models,
        &inputs,
        pair_timing,
        rounds,
        &pair,
        &mut report,
    )
    .await?;
    report.targets = targets::evaluate(&report, windows.as_ref(), cache_bytes);
    if args.c1_detect_only {
        report.targets.retain(|t| t.pass.is_some());
    }
    report.wall_seconds = started.elapsed().as_secs_f64();
    report.print();
    report.write(&args.json)?;
    println!("report: {}", args.json.display());
    Ok(())
}

fn cache_bytes(args: &Args) -> u64 {
    args.cache_bytes
        .unwrap_or(if args.smoke { 4 << 20 } else { 256 << 20 })
}

fn c1_seconds(args: &Args) -> f64 {
    args.c1_seconds
        .unwrap_or(if args.smoke { 1.0 } else { 60.0 })
}

fn saturation_seconds(args: &Args) -> f64 {
    args.saturation_seconds
        .unwrap_or(if args.smoke { 1.0 } else { 40.0 })
}

fn c1_processes(args: &Args) -> usize {
    args.c1_processes.unwrap_or(if args.smoke { 2 } else { 3 }) as usize
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
    let clip = Bytes::from(read(&media::make_clip(
        &args.clip_photo,
        args.clip_frames as usize,
        &clip_path,
    )?)?);
    let clip_tensor = media::clip_tensor(&clip, args.clip_frames as usize, &spec)?;
    let long_path = out_dir.join(format!("{stem}-{}.mp4", args.window_video_frames));
    let window_video = read(&media::make_clip(
        &args.clip_photo,
        args.window_video_frames as usize,
        &long_path,
    )?)?;
    Ok(Inputs {
        photo,
        clip,
        clip_tensor,
        window_video: window_video.into(),
    })
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("read {}", path.display()))
}

fn settings(args: &Args, models: &Path, timing: Timing) -> serde_json::Value {
    serde_json::json!({
        "models": models.display().to_string(),
        "c1_detect_only": args.c1_detect_only,
        "c1_seconds_per_variant": c1_seconds(args),
        "c1_processes": c1_processes(args),
        "saturation_seconds_per_side": saturation_seconds(args),
        "photo": args.photo.display().to_string(),
        "clip_photo": args.clip_photo.display().to_string(),
        "intra_threads": args.intra_threads,
        "raw_threads": args.raw_threads,
        "concurrency": args.concurrency,
        "seconds_per_variant": timing.seconds.as_secs_f64(),
        "warmup_seconds": timing.warmup.as_secs_f64(),
        "cache_bytes": cache_bytes(args),
        "rounds": args.rounds.unwrap_or(if args.smoke { 2 } else { 5 }),
        "clip_frames": args.clip_frames,
        "window_video_frames": args.window_video_frames,
        "window_stride": args.window_stride,
        "raw_inputs": "preprocessed tensors (decoding, preprocessing and post-processing excluded), but for the raw Detect from the photo, which does all three",
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

/// Every variant compared in a ratio, measured side by side: the in-process sessions (raw and
/// naive), and three servers with the feature cache off (the default, one with features copied
/// to host arrays, one with spinning ONNX Runtime threads). The single images at concurrency 1
/// on the in-process sessions and the default server are interleaved request by request, the
/// rest run in rounds. Then the sliding windows on the default server.
async fn side_by_side(
    args: &Args,
    models: &Path,
    inputs: &Inputs,
    timing: Timing,
    rounds: u32,
    spec: &dyn Fn(u64, &str) -> ServerSpec,
    report: &mut Report,
) -> Result<Option<WindowRows>> {
    eprintln!("bench: starting the servers (cache off)");
    let server = Server::start(&spec(0, "uncached")).await?;
    let host = Server::start(&ServerSpec {
        placement: "host",
        ..spec(0, "host")
    })
    .await?;
    let spinning = Server::start(&ServerSpec {
        spinning: true,
        ..spec(0, "spinning")
    })
    .await?;
    let client = grpc::connect(&server).await?;
    let image = image_from_bytes(inputs.photo.encoded.clone());
    let set = raw::Models::new(models, args.intra_threads)?;
    let mut variants = in_process(args, &set, inputs)?;
    variants.extend(
        detect_levels(args, &server, &client, &image, GRPC_DETECT)
            .into_iter()
            .map(rounds::Variant::interleaved),
    );
    let (c2, i2) = (client.clone(), image.clone());
    variants.push(
        grpc::variant(&server, GRPC_SEGMENT.into(), 1, 1, move |_| {
            grpc::segment(c2.clone(), i2.clone())
        })
        .interleaved(),
    );
    let (c3, i3) = (client.clone(), image.clone());
    variants.push(
        grpc::variant(&server, GRPC_ANALYZE.into(), 1, 1, move |_| {
            grpc::analyze(c3.clone(), i3.clone())
        })
        .interleaved(),
    );
    let (c4, clip, frames) = (client.clone(), inputs.clip.clone(), args.clip_frames);
    variants.push(grpc::variant(
        &server,
        GRPC_CLIP.into(),
        1,
        frames,
        move |_| grpc::action(c4.clone(), clip.clone(), frames),
    ));
    for (other, prefix) in [(&host, GRPC_HOST), (&spinning, GRPC_SPINNING)] {
        let client = grpc::connect(other).await?;
        let detect = format!("{prefix} Detect");
        variants.extend(detect_levels(args, other, &client, &image, &detect));
        let image = image.clone();
        variants.push(grpc::variant(
            other,
            format!("{prefix} Analyze c=1"),
            1,
            1,
            move |_| grpc::analyze(client.clone(), image.clone()),
        ));
    }
    let rows = rounds::measure_all(variants, timing, rounds).await?;
    for mut row in rows {
        match row.kind {
            // Each full model runs its own copy of the backbone.
            "naive" => row.backbone_passes_per_request = Some(2.0),
            "grpc" => {
                let process = if row.variant.starts_with(GRPC_HOST) {
                    &host
                } else if row.variant.starts_with(GRPC_SPINNING) {
                    &spinning
                } else {
                    &server
                };
                row.peak_rss_mb = rss::peak_mb(process.pid());
            }
            _ => {}
        }
        report.rows.push(row);
    }
    saturation_pair(args, &set, inputs, &server, timing, report).await?;
    drop(set);
    host.stop().await?;
    spinning.stop().await?;
    let windows = windows(args, inputs, timing, &server, &client, report).await?;
    report.phases.push(Phase {
        name: "uncached phase".into(),
        cache_bytes: 0,
        cache_held_bytes: None,
        peak_rss_mb: rss::peak_mb(server.pid()),
    });
    server.stop().await?;
    Ok(windows)
}

/// Slices of about this long make up the saturation target's pair.
const SATURATION_SLICE_SECONDS: f64 = 4.0;

/// The saturation target's pair: the server's Detect at the concurrency level that served the
/// most requests/s in the side-by-side rounds, and the Detect from the photo's bytes at the
/// thread count that did, alternating slice by slice with each other only for
/// `--saturation-seconds` each.
async fn saturation_pair(
    args: &Args,
    set: &raw::Models,
    inputs: &Inputs,
    server: &Server,
    timing: Timing,
    report: &mut Report,
) -> Result<()> {
    let (Some(level), Some(threads)) = (
        report.best(GRPC_DETECT).map(|r| r.concurrency),
        report.best(RAW_PHOTO).map(|r| r.concurrency),
    ) else {
        return Ok(());
    };
    let seconds = saturation_seconds(args);
    let slices = ((seconds / SATURATION_SLICE_SECONDS).ceil() as u32).max(2);
    eprintln!(
        "bench: the saturation pair: Detect at c={level} and in process at {threads} threads, \
         {slices} slices each"
    );
    let client = grpc::connect(server).await?;
    let image = image_from_bytes(inputs.photo.encoded.clone());
    let grpc = grpc::variant(server, GRPC_SATURATION_PAIR.into(), level, 1, move |_| {
        grpc::detect(client.clone(), image.clone())
    });
    let workers = photo_workers(set, inputs, threads)?;
    let photo = raw::variant(RAW_PHOTO_SATURATION_PAIR.into(), "raw", 1, workers);
    let timing = Timing {
        seconds: secs(seconds),
        ..timing
    };
    report
        .rows
        .extend(rounds::measure(vec![grpc, photo], timing, slices).await?);
    Ok(())
}

/// The raw and naive variants: ONNX Runtime sessions in this process, on the preprocessed photo
/// and clip, and the Detect from the photo's bytes (decoding, preprocessing, the sessions and
/// post-processing, as the server does them), each Detect at 1 and `--raw-threads` threads.
fn in_process<'a>(
    args: &Args,
    set: &raw::Models,
    inputs: &'a Inputs,
) -> Result<Vec<rounds::Variant<'a>>> {
    let image = &inputs.photo.tensor;
    let mut variants = Vec::new();
    let mut levels = vec![1];
    levels.extend((args.raw_threads > 1).then_some(args.raw_threads));
    for &threads in &levels {
        let workers = (0..threads)
            .map(|_| set.shared(&["detection"]).map(|mut s| move || s.run(image)))
            .collect::<Result<Vec<_>>>()?;
        let name = format!("{RAW_DETECT} c={threads}");
        variants.push(raw::variant(name, "raw", 1, workers).interleaved());
    }
    for &threads in &levels {
        let workers = photo_workers(set, inputs, threads)?;
        let name = format!("{RAW_PHOTO} c={threads}");
        variants.push(raw::variant(name, "raw", 1, workers).interleaved());
    }
    let mut shared = set.shared(&["detection", "segmentation"])?;
    variants.push(
        raw::variant(
            format!("{RAW_SHARED} c=1"),
            "raw",
            1,
            vec![move || shared.run(image)],
        )
        .interleaved(),
    );
    let input = set.input_name().to_owned();
    let mut pair = set.monolithic(&["reference_detection.onnx", "reference_segmentation.onnx"])?;
    variants.push(
        raw::variant(
            format!("{NAIVE_PAIR} c=1"),
            "naive",
            1,
            vec![move || raw::run_monolithic(&mut pair, &input, image)],
        )
        .interleaved(),
    );
    let frames = &inputs.clip_tensor;
    let mut backbone = set.shared(&[])?;
    variants.push(raw::variant(
        format!("{RAW_FRAMES} c=1"),
        "raw",
        args.clip_frames,
        vec![move || backbone.run(frames)],
    ));
    Ok(variants)
}

/// `threads` workers of the Detect from the photo's bytes, each with its own sessions.
fn photo_workers<'a>(
    set: &raw::Models,
    inputs: &'a Inputs,
    threads: usize,
) -> Result<Vec<impl FnMut() -> Result<Duration> + Send + 'a>> {
    (0..threads)
        .map(|_| {
            set.photo_detect("detection", &inputs.photo)
                .map(|mut detect| move || detect.run())
        })
        .collect()
}

/// The c=1 Detect target's pair: the server's Detect and the in-process Detect from the photo's
/// bytes, interleaved with each other only (see `--c1-seconds`), each side spread over
/// `--c1-processes` fresh processes of its own (see `--c1-processes`).
async fn c1_detect(
    args: &Args,
    models: &Path,
    inputs: &Inputs,
    timing: Timing,
    rounds: u32,
    spec: &ServerSpec,
    report: &mut Report,
) -> Result<()> {
    let count = c1_processes(args);
    let mut servers = Vec::with_capacity(count);
    let mut clients = Vec::with_capacity(count);
    let mut processes = Vec::with_capacity(count);
    for i in 0..count {
        eprintln!(
            "bench: starting server {} of {count} (cache off) and its in-process Detect's process",
            i + 1
        );
        let spec = ServerSpec {
            log: spec.log.with_extension(format!("{}.log", i + 1)),
            ..spec.clone()
        };
        let server = Server::start(&spec).await?;
        clients.push(grpc::connect(&server).await?);
        servers.push(server);
        processes.push(raw::DetectProcess::start(
            models,
            &args.photo,
            args.intra_threads,
        )?);
    }
    let image = image_from_bytes(inputs.photo.encoded.clone());
    let variants = vec![
        raw::rotating_variant(processes, RAW_PHOTO_DETECT_PAIR.into()),
        grpc::rotating(&servers, GRPC_DETECT_PAIR.into(), move |i, _| {
            grpc::detect(clients[i].clone(), image.clone())
        }),
    ];
    let rows = rounds::measure_all(variants, timing, rounds).await?;
    report.rows.extend(rows);
    report.pair_processes = count;
    for server in servers {
        server.stop().await?;
    }
    Ok(())
}

/// Detect at concurrency 1 and at every `--concurrency` level, variants named `<name> c=<level>`.
fn detect_levels<'a>(
    args: &Args,
    server: &'a Server,
    client: &polyhead_client::Client,
    image: &v1::Image,
    name: &str,
) -> Vec<rounds::Variant<'a>> {
    let mut levels = vec![1];
    levels.extend(args.concurrency.iter().copied().filter(|&c| c > 1));
    levels
        .into_iter()
        .map(|c| {
            let (client, image) = (client.clone(), image.clone());
            grpc::variant(server, format!("{name} c={c}"), c, 1, move |_| {
                grpc::detect(client.clone(), image.clone())
            })
        })
        .collect()
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
        let probe = grpc::windows(client.clone(), video.clone(), frames, stride).await;
        let probe = match probe {
            Ok(probe) if probe.windows > 0 => probe,
            Ok(_) => return unavailable(report, "RecognizeActionWindows answered no windows"),
            Err(e) => return unavailable(report, &format!("RecognizeActionWindows: {e}")),
        };
        per_window_images.push(f64::from(probe.timings.backbone_images) / f64::from(probe.windows));
        let name = format!("{GRPC_WINDOWS} T={frames} s={stride} c=1");
        let (client, video) = (client.clone(), video.clone());
        let row = grpc::measure(server, &name, 1, probe.windows, timing, move |_| {
            let (client, video) = (client.clone(), video.clone());
            async move { Ok(grpc::windows(client, video, frames, stride).await?.timings) }
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
/// server has seen, interleaved request by request, both sent as raw RGB so that they cost the
/// same to decode; then new images until the cache holds its budget, for the memory figure.
async fn cached(
    inputs: &Inputs,
    timing: Timing,
    rounds: u32,
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
    let fresh = Arc::new(AtomicU64::new(1));
    let new_image = {
        let (photo, fresh) = (Arc::clone(&photo), Arc::clone(&fresh));
        move || {
            let (w, h, rgb) = &*photo;
            raw_image(
                *w,
                *h,
                media::variant(rgb, *w, fresh.fetch_add(1, Ordering::Relaxed)),
            )
        }
    };
    let cold = {
        let (client, new_image) = (client.clone(), new_image.clone());
        grpc::variant(&server, SEGMENT_COLD.into(), 1, 1, move |_| {
            grpc::segment(client.clone(), new_image())
        })
    };
    let (w, h, rgb) = &*photo;
    let seen = raw_image(*w, *h, rgb.clone());
    let warm = {
        let client = client.clone();
        grpc::variant(&server, SEGMENT_WARM.into(), 1, 1, move |_| {
            grpc::segment(client.clone(), seen.clone())
        })
    };
    let variants = vec![cold.interleaved(), warm.interleaved()];
    for mut row in rounds::measure_all(variants, timing, rounds).await? {
        row.peak_rss_mb = rss::peak_mb(server.pid());
        report.rows.push(row);
    }
    let held = fill_cache(&server, &client, spec.cache_bytes, new_image).await?;
    report.phases.push(Phase {
        name: "cache phase".into(),
        cache_bytes: spec.cache_bytes,
        cache_held_bytes: Some(held),
        peak_rss_mb: rss::peak_mb(server.pid()),
    });
    server.stop().await
}

/// Segments new images until the feature cache holds at least 95% of `budget` bytes or has
/// started evicting; answers the bytes it holds.
async fn fill_cache(
    server: &Server,
    client: &polyhead_client::Client,
    budget: u64,
    new_image: impl Fn() -> v1::Image,
) -> Result<f64> {
    eprintln!("bench: filling the feature cache");
    loop {
        let held = server.metric("polyhead_feature_cache_bytes")?;
        let evicted = server.metric("polyhead_feature_cache_evictions_total")?;
        if held >= 0.95 * budget as f64 || evicted > 0.0 {
            return Ok(held);
        }
        grpc::segment(client.clone(), new_image()).await?;
    }
}

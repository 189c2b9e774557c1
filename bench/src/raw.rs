//! The in-process variants: ONNX Runtime sessions of the model set driven directly, with the
//! server's own runtime set-up (library search, optimisation level, intra-op threads).
//!
//! Most variants here start from the already preprocessed input tensor: decoding, resizing and
//! post-processing are excluded, so these rows are the ONNX Runtime cost alone. [`PhotoDetect`]
//! starts from the photo's encoded bytes and does every step the server's Detect does, with the
//! server's own functions, in this process: the limit for the server on a photo.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use ndarray::{ArrayView, Axis, Dimension};
use ort::session::{Session, SessionOutputs};
use ort::value::TensorRef;
use polyhead_server::config::RuntimeConfig;
use polyhead_server::engine::{Device, Placement, Runtime};
use polyhead_server::heads::detection::{self, DetectOptions, DetectionParams};
use polyhead_server::manifest::{HeadParams, Manifest};

use crate::media::{self, Photo};
use crate::rounds::{Part, Rotation, Variant};
use crate::stats::Samples;

/// One preprocessed input: `shape` is `[N, 3, H, W]`.
#[derive(Debug, Clone)]
pub struct Tensor {
    pub shape: [usize; 4],
    pub data: Vec<f32>,
}

/// Loads sessions of one model set with the server's runtime settings.
pub struct Models {
    runtime: Runtime,
    dir: PathBuf,
    manifest: Manifest,
}

/// Timing of one in-process loop.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub warmup: Duration,
    pub seconds: Duration,
}

impl Models {
    /// Initialises ONNX Runtime as the server does, with `intra_threads` per session.
    pub fn new(dir: &Path, intra_threads: usize) -> Result<Self> {
        let config = RuntimeConfig {
            device: Device::Cpu,
            allow_cpu_fallback: false,
            feature_placement: Placement::Device,
            ort_dylib: None,
            intra_threads,
            intra_op_spinning: false,
            queue_capacity: 1,
            arena_release_seconds: 10,
        };
        let runtime = Runtime::init(&config).map_err(|e| anyhow!("{e}"))?;
        let manifest = Manifest::load(dir).map_err(|e| anyhow!("{e}"))?;
        Ok(Self {
            runtime,
            dir: dir.to_path_buf(),
            manifest,
        })
    }

    fn session(&self, file: &Path) -> Result<Session> {
        self.runtime
            .load(&self.dir.join(file))
            .map_err(|e| anyhow!("{e}"))
    }

    /// The backbone followed by the heads called `heads`, each fed the backbone's outputs.
    pub fn shared(&self, heads: &[&str]) -> Result<Shared> {
        let backbone = &self.manifest.backbone;
        let heads = heads
            .iter()
            .map(|name| {
                let spec = self
                    .manifest
                    .heads
                    .iter()
                    .find(|h| h.name == *name)
                    .with_context(|| format!("no head called {name} in the manifest"))?;
                Ok((self.session(&spec.file)?, spec.inputs.clone()))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Shared {
            backbone: self.session(&backbone.file)?,
            input: backbone.input.clone(),
            heads,
        })
    }

    /// The monolithic reference models (backbone and head fused), one per named file.
    pub fn monolithic(&self, files: &[&str]) -> Result<Vec<Session>> {
        files.iter().map(|f| self.session(Path::new(f))).collect()
    }

    /// Detect on `photo`'s encoded bytes as the server runs it, with the head called `head`.
    pub fn photo_detect<'a>(&self, head: &str, photo: &'a Photo) -> Result<PhotoDetect<'a>> {
        let params = self
            .manifest
            .heads
            .iter()
            .find(|h| h.name == head)
            .with_context(|| format!("no head called {head} in the manifest"))?
            .params()
            .map_err(err)?;
        let HeadParams::Detection(params) = params else {
            return Err(anyhow!("head {head} is not a detection head"));
        };
        Ok(PhotoDetect {
            shared: self.shared(&[head])?,
            photo,
            params,
        })
    }

    /// Name of the backbone's input tensor.
    pub fn input_name(&self) -> &str {
        &self.manifest.backbone.input
    }
}

/// A backbone session and head sessions, run one after the other on one input.
pub struct Shared {
    backbone: Session,
    input: String,
    heads: Vec<(Session, Vec<String>)>,
}

impl Shared {
    /// One backbone pass, then every head on its outputs (outputs discarded). Answers the time
    /// the session runs took.
    pub fn run(&mut self, tensor: &Tensor) -> Result<Duration> {
        self.run_each(tensor, |_| Ok(()))
    }

    /// One backbone pass, then every head on its outputs, each head's outputs given to `each`.
    /// Answers the time the session runs took (`each` not included).
    fn run_each(
        &mut self,
        tensor: &Tensor,
        mut each: impl FnMut(&SessionOutputs<'_>) -> Result<()>,
    ) -> Result<Duration> {
        let started = Instant::now();
        let input = TensorRef::from_array_view((tensor.shape, &tensor.data[..])).map_err(err)?;
        let outputs = self
            .backbone
            .run(vec![(self.input.as_str(), input)])
            .map_err(err)?;
        let mut runs = started.elapsed();
        for (head, names) in &mut self.heads {
            let mut values = Vec::with_capacity(names.len());
            for name in names.iter() {
                let value = outputs
                    .get(name.as_str())
                    .with_context(|| format!("the backbone has no output {name}"))?;
                let view = value.try_extract_array::<f32>().map_err(err)?;
                values.push((
                    name.as_str(),
                    TensorRef::from_array_view(view).map_err(err)?,
                ));
            }
            let started = Instant::now();
            let outputs = head.run(values).map_err(err)?;
            runs += started.elapsed();
            each(&outputs)?;
        }
        Ok(runs)
    }
}

/// Detect from a photo's encoded bytes, every step in this process with the server's functions:
/// decoding, preprocessing, the backbone and detection sessions, and the detection head's
/// post-processing with the options a Detect request without options gets.
pub struct PhotoDetect<'a> {
    shared: Shared,
    photo: &'a Photo,
    params: DetectionParams,
}

impl PhotoDetect<'_> {
    /// One Detect; answers the time its session runs took.
    pub fn run(&mut self) -> Result<Duration> {
        let (_, tensor, geometry) = media::prepare(&self.photo.encoded, &self.photo.spec)?;
        let (params, options) = (&self.params, DetectOptions::defaults(&self.params));
        self.shared.run_each(&tensor, |outputs| {
            detection::postprocess(
                first(outputs, "scores")?,
                first(outputs, "boxes")?,
                first(outputs, "mask_coeffs")?,
                first(outputs, "mask_protos")?,
                &geometry,
                params,
                &options,
            )
            .map(drop)
            .map_err(err)
        })
    }
}

/// The first item of the output called `name`, as a `D`-dimensional view.
fn first<'a, D: Dimension>(
    outputs: &'a SessionOutputs<'_>,
    name: &str,
) -> Result<ArrayView<'a, f32, D>> {
    let value = outputs
        .get(name)
        .with_context(|| format!("the detection head has no output {name}"))?;
    value
        .try_extract_array::<f32>()
        .map_err(err)?
        .index_axis_move(Axis(0), 0)
        .into_dimensionality::<D>()
        .map_err(err)
}

/// Runs every monolithic model on `tensor`, one after the other; answers the time they took.
pub fn run_monolithic(models: &mut [Session], input: &str, tensor: &Tensor) -> Result<Duration> {
    let started = Instant::now();
    for model in models {
        let value = TensorRef::from_array_view((tensor.shape, &tensor.data[..])).map_err(err)?;
        model.run(vec![(input, value)]).map_err(err)?;
    }
    Ok(started.elapsed())
}

fn err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("{e}")
}

/// An in-process variant for [`rounds::measure`]: every slice runs `workers` together, one
/// thread each (each owning its sessions), first for the warm-up, then for the measured time; a
/// single worker runs on the benchmark's own (long-lived) thread. A worker's call is one request
/// and answers the time its session runs took.
pub fn variant<'a, W>(
    name: String,
    kind: &'static str,
    items_per_request: u32,
    mut workers: Vec<W>,
) -> Variant<'a>
where
    W: FnMut() -> Result<Duration> + Send + 'a,
{
    Variant {
        name,
        kind,
        concurrency: workers.len(),
        interleaved: false,
        run: Box::new(move |timing| {
            let samples = tokio::task::block_in_place(|| {
                run_threads(&mut workers, timing, items_per_request)
            });
            Box::pin(std::future::ready(samples.map(|samples| Part {
                samples,
                server_passes: None,
            })))
        }),
    }
}

/// Runs the slice: a lone worker on the calling thread, several on a thread each.
fn run_threads<W>(workers: &mut [W], timing: Timing, items_per_request: u32) -> Result<Samples>
where
    W: FnMut() -> Result<Duration> + Send,
{
    // A thread started for each request (an interleaved variant's slice is one) would pay for
    // its fresh malloc arena: page faults on every buffer, ~1.2 ms per call for a photo's
    // decoding and preprocessing, which a server's long-lived threads do not pay.
    if let [work] = workers {
        let warm_until = Instant::now() + timing.warmup;
        while Instant::now() < warm_until {
            work()?;
        }
        let start = Instant::now();
        let (samples, end) = timed_loop(work, start + timing.seconds, items_per_request)?;
        return Ok(Samples::merge(vec![samples], end.duration_since(start)));
    }
    let barrier = Barrier::new(workers.len());
    let started = std::sync::OnceLock::new();
    let parts = std::thread::scope(|scope| {
        let handles: Vec<_> = workers
            .iter_mut()
            .map(|work| {
                let (barrier, started) = (&barrier, &started);
                scope.spawn(move || {
                    let warm_until = Instant::now() + timing.warmup;
                    while Instant::now() < warm_until {
                        work()?;
                    }
                    barrier.wait();
                    let start = *started.get_or_init(Instant::now);
                    timed_loop(work, start + timing.seconds, items_per_request)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| anyhow!("a benchmark thread panicked"))?
            })
            .collect::<Result<Vec<_>>>()
    })?;
    let start = started.get().copied().unwrap_or_else(Instant::now);
    let end = parts.iter().map(|(_, end)| *end).max().unwrap_or(start);
    let parts = parts.into_iter().map(|(s, _)| s).collect();
    Ok(Samples::merge(parts, end.duration_since(start)))
}

/// Calls `work` until `deadline` (at least once); returns the samples and when the last call ended.
fn timed_loop(
    work: &mut impl FnMut() -> Result<Duration>,
    deadline: Instant,
    items_per_request: u32,
) -> Result<(Samples, Instant)> {
    let mut samples = Samples {
        items_per_request,
        ..Samples::default()
    };
    let mut end = Instant::now();
    while samples.latencies.is_empty() || end < deadline {
        let t = Instant::now();
        let runs = work()?;
        end = Instant::now();
        samples.latencies.push(end - t);
        samples.model_runs.push(runs);
        // Every in-process request runs exactly one backbone pass.
        samples.reported_passes += 1;
    }
    Ok((samples, end))
}

/// The (hidden) option that makes `polyhead-bench` serve [`DetectProcess`]'s requests (see
/// [`serve_photo_detect`]) instead of benchmarking.
pub const DETECT_PROCESS_OPTION: &str = "photo-detect-process";

/// The Detect from the photo's bytes ([`PhotoDetect`]) in a fresh process of its own, started
/// with the server it is compared with: both sides' weights and buffers are then allocated at
/// the same time, in processes with no history, rather than one of them in a benchmark process
/// whose heap went through every earlier phase. Its slices are timed in that process, as the
/// in-process variants' are (the pipe that carries them is not timed).
pub struct DetectProcess {
    child: Child,
    /// Closed on drop, which ends the process.
    requests: Option<ChildStdin>,
    replies: BufReader<ChildStdout>,
}

impl DetectProcess {
    /// Starts this executable as a [`DetectProcess`] on the model set `models` and the photo at
    /// `photo`, with `intra_threads` per session; answers once its sessions are loaded.
    pub fn start(models: &Path, photo: &Path, intra_threads: usize) -> Result<Self> {
        let exe = std::env::current_exe().context("this executable's path")?;
        let mut child = Command::new(exe)
            .arg(format!("--{DETECT_PROCESS_OPTION}"))
            .arg("--models")
            .arg(models)
            .arg("--photo")
            .arg(photo)
            .arg("--intra-threads")
            .arg(intra_threads.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("start the in-process Detect's process")?;
        let (Some(requests), Some(replies)) = (child.stdin.take(), child.stdout.take()) else {
            return Err(anyhow!("the in-process Detect's process has no pipes"));
        };
        let mut process = Self {
            child,
            requests: Some(requests),
            replies: BufReader::new(replies),
        };
        let ready = process.reply()?;
        if ready != "ready" {
            return Err(anyhow!("the in-process Detect's process said {ready:?}"));
        }
        Ok(process)
    }

    /// One slice: `timing.warmup` of Detects, then Detects for `timing.seconds` (at least one).
    pub fn slice(&mut self, timing: Timing) -> Result<Samples> {
        let requests = self
            .requests
            .as_mut()
            .ok_or_else(|| anyhow!("the in-process Detect's process is closed"))?;
        writeln!(
            requests,
            "{} {}",
            timing.warmup.as_nanos(),
            timing.seconds.as_nanos()
        )?;
        requests.flush()?;
        decode_samples(&self.reply()?)
    }

    fn reply(&mut self) -> Result<String> {
        let mut line = String::new();
        if self.replies.read_line(&mut line)? == 0 {
            let status = self.child.wait()?;
            return Err(anyhow!("the in-process Detect's process ended: {status}"));
        }
        Ok(line.trim_end().to_string())
    }
}

/// Processes of the in-process Detect as one variant, interleaved with the other c=1 variants:
/// turn `t` runs on process `t % processes.len()`, so that the row is not one process's draw
/// (how its weights and buffers landed in memory moves its runs by a millisecond or two). A
/// warm-up warms every process.
pub fn rotating_variant<'a>(mut processes: Vec<DetectProcess>, name: String) -> Variant<'a> {
    let mut rotation = Rotation::new(processes.len());
    Variant {
        name,
        kind: "raw",
        concurrency: 1,
        interleaved: true,
        run: Box::new(move |timing| {
            let samples = tokio::task::block_in_place(|| {
                let mut samples = Err(anyhow!("no in-process Detect's process"));
                for at in rotation.next(timing) {
                    samples = Ok(processes[at].slice(timing)?);
                }
                samples
            });
            Box::pin(std::future::ready(samples.map(|samples| Part {
                samples,
                server_passes: None,
            })))
        }),
    }
}

impl Drop for DetectProcess {
    /// Closing its requests ends the process; it is waited for, so that it is gone before the
    /// next phase starts.
    fn drop(&mut self) {
        drop(self.requests.take());
        let _ = self.child.wait();
    }
}

/// Serves a [`DetectProcess`]'s requests from standard input, one per line (`<warm-up ns>
/// <seconds ns>`), each answered with its slice's samples on one line of standard output, until
/// standard input closes. `ready` first, once the sessions are loaded.
pub fn serve_photo_detect(models: &Path, photo: &Path, intra_threads: usize) -> Result<()> {
    let spec = media::preprocess_spec(models)?;
    let photo = media::photo(photo, &spec)?;
    let set = Models::new(models, intra_threads)?;
    let mut detect = set.photo_detect("detection", &photo)?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready")?;
    out.flush()?;
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let mut numbers = line.split_whitespace().map(str::parse::<u64>);
        let (Some(Ok(warmup)), Some(Ok(seconds)), None) =
            (numbers.next(), numbers.next(), numbers.next())
        else {
            return Err(anyhow!(
                "a request is two numbers of nanoseconds, not {line:?}"
            ));
        };
        let timing = Timing {
            warmup: Duration::from_nanos(warmup),
            seconds: Duration::from_nanos(seconds),
        };
        let samples = run_threads(&mut [|| detect.run()], timing, 1)?;
        writeln!(out, "{}", encode_samples(&samples))?;
        out.flush()?;
    }
    Ok(())
}

/// A slice's samples on one line: the wall time, then each request's latency and model runs, in
/// nanoseconds.
fn encode_samples(samples: &Samples) -> String {
    let nanos = |all: &[Duration]| {
        all.iter()
            .map(|d| d.as_nanos().to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    format!(
        "{} {} {}",
        samples.wall.as_nanos(),
        nanos(&samples.latencies),
        nanos(&samples.model_runs)
    )
}

fn decode_samples(line: &str) -> Result<Samples> {
    let bad = || anyhow!("the in-process Detect's process answered {line:?}");
    let nanos = |field: Option<&str>| -> Result<Vec<Duration>> {
        field
            .ok_or_else(bad)?
            .split(',')
            .map(|n| n.parse().map(Duration::from_nanos).map_err(|_| bad()))
            .collect()
    };
    let mut fields = line.split(' ');
    let wall = fields
        .next()
        .and_then(|n| n.parse().ok())
        .map(Duration::from_nanos)
        .ok_or_else(bad)?;
    let latencies = nanos(fields.next())?;
    let model_runs = nanos(fields.next())?;
    if latencies.len() != model_runs.len() || fields.next().is_some() {
        return Err(bad());
    }
    Ok(Samples {
        reported_passes: latencies.len() as u64,
        latencies,
        model_runs,
        wall,
        items_per_request: 1,
        ..Samples::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slice_crosses_the_pipe_unchanged() {
        let ms = |v: u64| Duration::from_micros(v * 1000 + 7);
        let samples = Samples {
            latencies: vec![ms(101), ms(99), ms(120)],
            model_runs: vec![ms(95), ms(94), ms(110)],
            wall: ms(320),
            reported_passes: 3,
            items_per_request: 1,
            ..Samples::default()
        };
        let back = decode_samples(&encode_samples(&samples)).expect("decodes");
        assert_eq!(back.latencies, samples.latencies);
        assert_eq!(back.model_runs, samples.model_runs);
        assert_eq!(back.wall, samples.wall);
        assert_eq!(back.reported_passes, 3);
        for bad in ["", "12", "12 1,2 3", "12 1,x 3,4", "12 1 2 3"] {
            assert!(decode_samples(bad).is_err(), "{bad:?}");
        }
    }
}

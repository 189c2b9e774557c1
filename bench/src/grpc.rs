//! The gRPC variants: closed-loop load on a running server over loopback, `concurrency` calls in
//! flight at once on one HTTP/2 connection, with the passes per request read from the server's
//! Prometheus counter around the measured part.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use polyhead_client::{Bytes, Client, ClientOptions, v1};
use v1::recognize_action_windows_response::Event;

use crate::raw::Timing;
use crate::rounds::{self, Part, Rotation, Variant};
use crate::rss;
use crate::server::Server;
use crate::stats::{Row, Samples, Stages};

/// A client for benchmarking: no retries (a refused call is an error), generous deadline.
pub async fn connect(server: &Server) -> Result<Client> {
    let options = ClientOptions {
        timeout: Duration::from_secs(300),
        max_retries: 0,
        ..ClientOptions::default()
    };
    Client::connect(&server.addr.to_string(), options)
        .await
        .map_err(|e| anyhow!("{e}"))
}

/// Warms up, then measures `call` at `concurrency` for `timing.seconds`. `call(n)` gets a number
/// unique within the run and answers the timings its response reported.
pub async fn measure<F, Fut>(
    server: &Server,
    name: &str,
    concurrency: usize,
    items_per_request: u32,
    timing: Timing,
    call: F,
) -> Result<Row>
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<v1::Timings>> + Send + 'static,
{
    let one = variant(
        server,
        name.to_owned(),
        concurrency,
        items_per_request,
        call,
    );
    let mut row = rounds::measure(vec![one], timing, 1)
        .await?
        .pop()
        .context("a row for the variant")?;
    row.peak_rss_mb = rss::peak_mb(server.pid());
    Ok(row)
}

/// A gRPC variant for [`rounds::measure`]: every slice is a warm-up and a measured closed loop of
/// `call` at `concurrency`, with the backbone passes the server counted in between.
pub fn variant<'a, F, Fut>(
    server: &'a Server,
    name: String,
    concurrency: usize,
    items_per_request: u32,
    call: F,
) -> Variant<'a>
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<v1::Timings>> + Send + 'static,
{
    let call = Arc::new(call);
    let counter = Arc::new(AtomicU64::new(0));
    Variant {
        name,
        kind: "grpc",
        concurrency,
        interleaved: false,
        run: Box::new(move |timing| {
            let (call, counter) = (Arc::clone(&call), Arc::clone(&counter));
            Box::pin(async move {
                slice(
                    server,
                    &call,
                    &counter,
                    concurrency,
                    items_per_request,
                    timing,
                )
                .await
            })
        }),
    }
}

/// A gRPC variant at concurrency 1 over several servers, interleaved with the other c=1
/// variants: turn `t` calls server `t % servers.len()` (`call(server, n)`), so that the row is
/// not one server process's draw. A warm-up warms every server.
pub fn rotating<'a, F, Fut>(servers: &'a [Server], name: String, call: F) -> Variant<'a>
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<v1::Timings>> + Send + 'static,
{
    let call = Arc::new(call);
    let counter = Arc::new(AtomicU64::new(0));
    let mut rotation = Rotation::new(servers.len());
    Variant {
        name,
        kind: "grpc",
        concurrency: 1,
        interleaved: true,
        run: Box::new(move |timing| {
            let chosen = rotation.next(timing);
            let (call, counter) = (Arc::clone(&call), Arc::clone(&counter));
            Box::pin(async move {
                let mut part = Err(anyhow!("no server to call"));
                for at in chosen {
                    let call = Arc::clone(&call);
                    let on_server = Arc::new(move |n| call(at, n));
                    part = Ok(slice(&servers[at], &on_server, &counter, 1, 1, timing).await?);
                }
                part
            })
        }),
    }
}

async fn slice<F, Fut>(
    server: &Server,
    call: &Arc<F>,
    counter: &Arc<AtomicU64>,
    concurrency: usize,
    items_per_request: u32,
    timing: Timing,
) -> Result<Part>
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<v1::Timings>> + Send + 'static,
{
    // A loop runs at least one call: a zero warm-up is none at all.
    if !timing.warmup.is_zero() {
        closed_loop(call, counter, concurrency, timing.warmup, items_per_request).await?;
    }
    let before = server.backbone_passes()?;
    let samples = closed_loop(
        call,
        counter,
        concurrency,
        timing.seconds,
        items_per_request,
    )
    .await?;
    let passes = server.backbone_passes()? - before;
    Ok(Part {
        samples,
        server_passes: Some(passes),
    })
}

async fn closed_loop<F, Fut>(
    call: &Arc<F>,
    counter: &Arc<AtomicU64>,
    concurrency: usize,
    seconds: Duration,
    items_per_request: u32,
) -> Result<Samples>
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<v1::Timings>> + Send + 'static,
{
    let start = Instant::now();
    let deadline = start + seconds;
    let tasks: Vec<_> = (0..concurrency.max(1))
        .map(|_| {
            let (call, counter) = (Arc::clone(call), Arc::clone(counter));
            tokio::spawn(async move {
                let mut samples = Samples {
                    items_per_request,
                    ..Samples::default()
                };
                while samples.latencies.is_empty() || Instant::now() < deadline {
                    let t = Instant::now();
                    let timings = call(counter.fetch_add(1, Ordering::Relaxed)).await?;
                    samples.latencies.push(t.elapsed());
                    samples.reported_passes += u64::from(timings.backbone_passes);
                    let stages = stages(&timings);
                    samples.model_runs.push(stages.model_runs());
                    samples.stages.push(stages);
                }
                Ok::<_, anyhow::Error>(samples)
            })
        })
        .collect();
    let mut parts = Vec::with_capacity(tasks.len());
    for task in tasks {
        parts.push(task.await.context("a load task panicked")??);
    }
    Ok(Samples::merge(parts, start.elapsed()))
}

fn stages(t: &v1::Timings) -> Stages {
    Stages {
        decode_ms: t.decode_ms,
        preprocess_ms: t.preprocess_ms,
        backbone_ms: t.backbone_ms,
        heads_ms: t.heads.iter().map(|h| h.inference_ms).sum(),
        postprocess_ms: t.postprocess_ms,
        total_ms: t.total_ms,
    }
}

/// One Detect call (no masks).
pub async fn detect(client: Client, image: v1::Image) -> Result<v1::Timings> {
    let response = client
        .detect(image, v1::DetectOptions::default(), "")
        .await
        .map_err(|e| anyhow!("Detect: {e}"))?;
    Ok(response.timings.unwrap_or_default())
}

/// One Segment call.
pub async fn segment(client: Client, image: v1::Image) -> Result<v1::Timings> {
    let response = client
        .segment(image, v1::SegmentOptions::default(), "")
        .await
        .map_err(|e| anyhow!("Segment: {e}"))?;
    Ok(response.timings.unwrap_or_default())
}

/// One Analyze call running the detection and segmentation heads.
pub async fn analyze(client: Client, image: v1::Image) -> Result<v1::Timings> {
    let heads = vec!["detection".to_owned(), "segmentation".to_owned()];
    let response = client
        .analyze(image, heads, Default::default(), Default::default())
        .await
        .map_err(|e| anyhow!("Analyze: {e}"))?;
    Ok(response.timings.unwrap_or_default())
}

/// One RecognizeAction call on an encoded clip, `frames` frames sampled uniformly.
pub async fn action(client: Client, clip: Bytes, frames: u32) -> Result<v1::Timings> {
    let options = v1::ActionOptions {
        num_frames: frames,
        ..Default::default()
    };
    let response = client
        .recognize_video(clip, options, "")
        .await
        .map_err(|e| anyhow!("RecognizeAction: {e}"))?;
    Ok(response.timings.unwrap_or_default())
}

/// What one RecognizeActionWindows call answered.
#[derive(Debug, Clone, Default)]
pub struct WindowsCall {
    pub windows: u32,
    /// The summary's timings: the whole call's.
    pub timings: v1::Timings,
}

/// One RecognizeActionWindows call over `video` in windows of `frames` frames, `stride` apart.
pub async fn windows(
    client: Client,
    video: Bytes,
    frames: u32,
    stride: u32,
) -> Result<WindowsCall> {
    let message = v1::RecognizeActionWindowsRequest {
        options: Some(v1::WindowOptions {
            window_frames: frames,
            window_stride: stride,
            ..Default::default()
        }),
        chunk: video,
    };
    let request = client.request(tokio_stream::iter(vec![message]));
    let mut stream = client
        .raw()
        .recognize_action_windows(request)
        .await?
        .into_inner();
    let mut answer = WindowsCall::default();
    while let Some(message) = stream.message().await? {
        match message.event {
            Some(Event::Window(_)) => answer.windows += 1,
            Some(Event::Summary(summary)) => answer.timings = summary.timings.unwrap_or_default(),
            None => {}
        }
    }
    Ok(answer)
}

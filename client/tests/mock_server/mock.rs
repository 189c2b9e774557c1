//! The mock server: canned answers from fixed data, with failure modes selected by the head
//! name, and the server's refusal of a request message over its size limit. It keeps what the
//! tests check it received: the number of detect calls and every call's deadline.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use polyhead_client::v1;
use polyhead_client::v1::polyhead_server::{Polyhead, PolyheadServer};
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::{Stream, StreamExt};
use tonic::metadata::MetadataValue;
use tonic::{Code, Request, Response, Status};

/// The mock's message size limit, its `--max-message-bytes`: an image or a clip over it is
/// refused as polyhead refuses a request message over the limit.
pub const MESSAGE_LIMIT: usize = 4096;

type Reply<T> = Result<Response<T>, Status>;

/// What a mock received; clones share it.
#[derive(Debug, Clone, Default)]
pub struct Received {
    /// How many detect calls arrived.
    pub detect_calls: Arc<AtomicUsize>,
    /// How many window streams were uploaded in full.
    pub window_calls: Arc<AtomicUsize>,
    deadlines: Arc<Mutex<Vec<Duration>>>,
}

impl Received {
    /// The deadline every call was sent with (its `grpc-timeout`), in the order they arrived; a
    /// call sent without one is left out.
    pub fn deadlines(&self) -> Vec<Duration> {
        self.deadlines.lock().map(|d| d.clone()).unwrap_or_default()
    }

    /// Notes the deadline of `request`.
    fn note<T>(&self, request: &Request<T>) {
        let sent = request.metadata().get("grpc-timeout");
        if let Some(deadline) = sent.and_then(|v| grpc_timeout(v.to_str().ok()?)) {
            if let Ok(mut deadlines) = self.deadlines.lock() {
                deadlines.push(deadline);
            }
        }
    }
}

/// Parses a `grpc-timeout` value: at most 8 digits and a unit (gRPC over HTTP/2).
pub fn grpc_timeout(value: &str) -> Option<Duration> {
    let unit = value.chars().last()?;
    let amount: u64 = value.strip_suffix(unit)?.parse().ok()?;
    Some(match unit {
        'H' => Duration::from_secs(amount * 3600),
        'M' => Duration::from_secs(amount * 60),
        'S' => Duration::from_secs(amount),
        'm' => Duration::from_millis(amount),
        'u' => Duration::from_micros(amount),
        'n' => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// Answers from fixed data; the head name selects failure modes. Keeps what it received.
#[derive(Default)]
struct Mock {
    received: Received,
}

/// polyhead's answer to a request message over its size limit (`server/src/grpc/status.rs`):
/// RESOURCE_EXHAUSTED naming the flag, with tonic's sizes, and a retry hint that asks clients
/// not to retry.
fn too_large(found: usize) -> Status {
    let message = format!(
        "the request message is too large (--max-message-bytes): Error, decoded message length \
         too large: found {found} bytes, the limit is: {MESSAGE_LIMIT} bytes"
    );
    let mut status = Status::resource_exhausted(message);
    status
        .metadata_mut()
        .insert("grpc-retry-pushback-ms", MetadataValue::from(-1));
    status
}

/// The refusal a `flaky` head answers with: `flaky <failures> <code> [<pushback>]` fails the
/// first `failures` detect calls (or window streams, once uploaded) with `code` (`exhausted`, `unavailable` or `invalid`),
/// carrying `pushback` as the `grpc-retry-pushback-ms` hint when given.
fn flaky(head: &str, call: usize) -> Option<Status> {
    let mut words = head.strip_prefix("flaky ")?.split(' ');
    let failures: usize = words.next()?.parse().ok()?;
    let code = match words.next()? {
        "exhausted" => Code::ResourceExhausted,
        "unavailable" => Code::Unavailable,
        _ => Code::InvalidArgument,
    };
    if call >= failures {
        return None;
    }
    let mut status = Status::new(code, format!("refusal {}", call + 1));
    if let Some(hint) = words.next().and_then(|hint| hint.parse().ok()) {
        status.metadata_mut().insert("grpc-retry-pushback-ms", hint);
    }
    Some(status)
}

#[tonic::async_trait]
impl Polyhead for Mock {
    async fn detect(&self, request: Request<v1::DetectRequest>) -> Reply<v1::DetectResponse> {
        self.received.note(&request);
        let call = self.received.detect_calls.fetch_add(1, Ordering::SeqCst);
        if let Some(refusal) = flaky(&request.get_ref().head, call) {
            return Err(refusal);
        }
        let image = request.get_ref().image.as_ref();
        if let Some(v1::image::Source::Encoded(bytes)) = image.and_then(|i| i.source.as_ref()) {
            if bytes.len() > MESSAGE_LIMIT {
                return Err(too_large(bytes.len()));
            }
        }
        let deadline = request
            .metadata()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("none")
            .to_owned();
        match request.get_ref().head.as_str() {
            "slow" => tokio::time::sleep(Duration::from_secs(10)).await,
            "busy" => return Err(Status::resource_exhausted("8 requests in flight")),
            "bad" => return Err(Status::invalid_argument("image is not decodable")),
            _ => {}
        }
        Ok(Response::new(v1::DetectResponse {
            detections: Some(detections(&deadline)),
            timings: Some(timings(1)),
        }))
    }

    async fn segment(&self, request: Request<v1::SegmentRequest>) -> Reply<v1::SegmentResponse> {
        self.received.note(&request);
        Ok(Response::new(v1::SegmentResponse {
            segmentation: Some(segmentation()),
            timings: Some(timings(1)),
        }))
    }

    async fn recognize_action(
        &self,
        request: Request<v1::RecognizeActionRequest>,
    ) -> Reply<v1::RecognizeActionResponse> {
        self.received.note(&request);
        let (count, fps) = match &request.get_ref().clip {
            Some(v1::recognize_action_request::Clip::Frames(f)) => (f.frames.len(), f.fps),
            Some(v1::recognize_action_request::Clip::Video(video))
                if video.len() > MESSAGE_LIMIT =>
            {
                return Err(too_large(video.len()));
            }
            Some(v1::recognize_action_request::Clip::Video(_)) => (4, 2.0),
            None => return Err(Status::invalid_argument("no clip")),
        };
        let rate = if fps > 0.0 { f64::from(fps) } else { 1.0 };
        Ok(Response::new(v1::RecognizeActionResponse {
            actions: Some(v1::Actions {
                top: vec![v1::ActionScore {
                    class_id: 7,
                    label: "juggling".into(),
                    score: 0.75,
                }],
                frame_timestamps: (0..count).map(|i| i as f64 / rate).collect(),
            }),
            timings: Some(timings(1)),
        }))
    }

    async fn analyze(&self, request: Request<v1::AnalyzeRequest>) -> Reply<v1::AnalyzeResponse> {
        self.received.note(&request);
        use v1::head_result::Result as R;
        let results = request
            .get_ref()
            .heads
            .iter()
            .map(|head| v1::HeadResult {
                head: head.clone(),
                result: Some(if head == "ade" {
                    R::Segmentation(segmentation())
                } else {
                    R::Detections(detections("x"))
                }),
            })
            .collect();
        Ok(Response::new(v1::AnalyzeResponse {
            results,
            timings: Some(timings(1)),
        }))
    }

    async fn list_models(
        &self,
        request: Request<v1::ListModelsRequest>,
    ) -> Reply<v1::ListModelsResponse> {
        self.received.note(&request);
        let head = |name: &str, kind: v1::HeadKind| v1::ModelInfo {
            name: name.into(),
            role: v1::ModelRole::Head as i32,
            kind: kind as i32,
            ..Default::default()
        };
        Ok(Response::new(v1::ListModelsResponse {
            model_set: "mock".into(),
            backbone: None,
            heads: vec![
                head("coco", v1::HeadKind::Detection),
                head("ade", v1::HeadKind::Segmentation),
                head("k400", v1::HeadKind::Action),
            ],
        }))
    }

    async fn get_model(&self, request: Request<v1::GetModelRequest>) -> Reply<v1::ModelInfo> {
        self.received.note(&request);
        Err(Status::not_found(format!(
            "no model named {:?}",
            request.get_ref().name
        )))
    }

    async fn extract_features(
        &self,
        request: Request<v1::ExtractFeaturesRequest>,
    ) -> Reply<v1::ExtractFeaturesResponse> {
        self.received.note(&request);
        Err(Status::unimplemented("the mock keeps no features"))
    }

    type RecognizeActionWindowsStream =
        Pin<Box<dyn Stream<Item = Result<v1::RecognizeActionWindowsResponse, Status>> + Send>>;

    /// Reads the whole upload (refusing a chunk over [`MESSAGE_LIMIT`]), then answers two
    /// windows of 2 frames and the totals. The head `stall` answers the first window and then
    /// nothing, keeping the stream open; `truncated` answers the first window and ends the
    /// stream as answered (OK); `linger` answers everything but keeps the stream open.
    async fn recognize_action_windows(
        &self,
        request: Request<tonic::Streaming<v1::RecognizeActionWindowsRequest>>,
    ) -> Reply<Self::RecognizeActionWindowsStream> {
        self.received.note(&request);
        let mut upload = request.into_inner();
        let mut video_bytes = 0;
        let mut head = String::new();
        while let Some(message) = upload.message().await? {
            if message.chunk.len() > MESSAGE_LIMIT {
                return Err(too_large(message.chunk.len()));
            }
            video_bytes += message.chunk.len() as u64;
            if let Some(options) = message.options {
                head = options.head;
            }
        }
        let call = self.received.window_calls.fetch_add(1, Ordering::SeqCst);
        if let Some(refusal) = flaky(&head, call) {
            return Err(refusal);
        }
        let mut messages = vec![Ok(window(0)), Ok(window(1))];
        if head == "truncated" {
            messages.truncate(1);
            return Ok(Response::new(Box::pin(tokio_stream::iter(messages))));
        }
        if head == "stall" {
            messages.truncate(1);
            let stalled = tokio_stream::iter(messages).chain(tokio_stream::pending());
            return Ok(Response::new(Box::pin(stalled)));
        }
        messages.push(Ok(summary(video_bytes)));
        if head == "linger" {
            let lingering = tokio_stream::iter(messages).chain(tokio_stream::pending());
            return Ok(Response::new(Box::pin(lingering)));
        }
        Ok(Response::new(Box::pin(tokio_stream::iter(messages))))
    }
}

/// The progress after `windows_done` windows of 2 frames, out of 2.
fn progress(windows_done: u32) -> v1::WindowProgress {
    v1::WindowProgress {
        frames_sampled: 2 * u64::from(windows_done),
        windows_done,
        frames_estimated: 4,
        windows_estimated: 2,
        duration_s: 1.0,
    }
}

/// Window `index`: 2 frames, half a second after the previous window.
fn window(index: u32) -> v1::RecognizeActionWindowsResponse {
    let start = 0.5 * f64::from(index);
    v1::RecognizeActionWindowsResponse {
        event: Some(v1::recognize_action_windows_response::Event::Window(
            v1::ActionWindow {
                index,
                first_frame: 2 * index,
                start_s: start,
                end_s: start + 0.25,
                frame_timestamps: vec![start, start + 0.25],
                top: vec![v1::ActionScore {
                    class_id: 7,
                    label: "juggling".into(),
                    score: 0.75,
                }],
                timings: Some(timings(1)),
            },
        )),
        progress: Some(progress(index + 1)),
    }
}

/// The totals of two windows.
fn summary(video_bytes: u64) -> v1::RecognizeActionWindowsResponse {
    v1::RecognizeActionWindowsResponse {
        event: Some(v1::recognize_action_windows_response::Event::Summary(
            v1::WindowsSummary {
                windows: 2,
                frames_sampled: 4,
                video_bytes,
                timings: Some(timings(2)),
            },
        )),
        progress: Some(progress(2)),
    }
}

fn detections(label: &str) -> v1::Detections {
    v1::Detections {
        detections: vec![v1::Detection {
            class_id: 0,
            label: label.into(),
            score: 0.5,
            r#box: Some(v1::Box {
                x1: 1.0,
                y1: 2.0,
                x2: 3.0,
                y2: 4.0,
            }),
            mask: None,
        }],
        image_width: 8,
        image_height: 6,
    }
}

fn segmentation() -> v1::Segmentation {
    v1::Segmentation {
        label_map_png: b"\x89PNG fake".to_vec().into(),
        width: 8,
        height: 6,
        class_names: vec!["sky".into()],
        present: vec![v1::ClassCoverage {
            class_id: 0,
            label: "sky".into(),
            fraction: 1.0,
        }],
    }
}

fn timings(passes: u32) -> v1::Timings {
    v1::Timings {
        total_ms: 5.0,
        backbone_passes: passes,
        backbone_images: passes,
        ..Default::default()
    }
}

/// Serves [`Mock`] on a free local port.
pub async fn serve() -> anyhow::Result<SocketAddr> {
    Ok(serve_counting().await?.0)
}

/// Serves [`Mock`] on a free local port; the counter is the number of detect calls it received.
pub async fn serve_counting() -> anyhow::Result<(SocketAddr, Arc<AtomicUsize>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let received = Received::default();
    serve_on(listener, received.clone());
    Ok((addr, received.detect_calls))
}

/// Serves [`Mock`] on `listener`, keeping what it receives in `received`.
pub fn serve_on(listener: tokio::net::TcpListener, received: Received) {
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(PolyheadServer::new(Mock { received }))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
}

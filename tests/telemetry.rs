//! Metrics and traces, end to end, on the real `polyhead-server` binary: the Prometheus endpoint
//! counts exactly the calls made (each window of a window stream as a request of its own), and a
//! caller's W3C trace continues through the RPC and every stage to an OTLP collector.
//!
//! The metrics recorder and the tracing subscriber are process-wide, so each test starts the
//! binary as a process of its own and is the only user of its ports and its telemetry.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use ndarray::ArrayD;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use polyhead_client::{Client, ClientOptions};
use polyhead_proto::inference::ModelInferRequest;
use polyhead_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use polyhead_proto::inference::model_infer_request::InferInputTensor;
use polyhead_proto::v1;
use polyhead_server::manifest::{HeadKind, Manifest};
use tokio::sync::mpsc;
use tonic::{Code, Request, Response, Status};

use crate::common::{encoded, make_clip, models_dir, noise_rgb, photo};
use crate::process::{ServerProcess, poll};

/// The stages every request records in `polyhead_stage_seconds`, per head.
const STAGES: [&str; 7] = [
    "decode",
    "preprocess",
    "queue",
    "backbone",
    "head",
    "postprocess",
    "total",
];

/// How long the metrics of finished calls may take to show.
const SETTLE: Duration = Duration::from_secs(10);

/// The `service.name` the traced server is started with.
const SERVICE: &str = "polyhead-test";

#[tokio::test]
async fn prometheus_counts_every_call_by_method_and_code() {
    let server = ServerProcess::start(&[]).await;
    let before = scrape(server.metrics_addr).await;
    let sent = send_known_calls(server.addr).await;
    let after = settled(server.metrics_addr, &before, sent).await;
    let manifest = Manifest::load(&models_dir()).expect("the test model set's manifest");
    assert_grpc_counts(&before, &after);
    assert_stage_counts(&before, &after, &manifest);
    assert_gauges(&after, &manifest);
}

#[tokio::test]
async fn a_callers_trace_continues_through_every_stage() {
    let (collector, mut exports) = collector().await;
    let endpoint = format!("http://{collector}");
    let mut server = ServerProcess::start(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
        ("OTEL_SERVICE_NAME", SERVICE),
        ("POLYHEAD_LOG_FORMAT", "json"),
    ])
    .await;
    detect_with_traceparent(server.addr).await;
    // The exporter sends spans in batches, at the latest when the server shuts down.
    let status = server.terminate().await;
    assert!(status.success(), "exit on SIGTERM: {status}");
    let mut spans = Vec::new();
    while let Ok(export) = exports.try_recv() {
        assert_eq!(service_name(&export).as_deref(), Some(SERVICE));
        spans.extend(export_spans(export));
    }
    assert_span_tree(&spans);
}

#[tokio::test]
async fn every_window_of_a_stream_records_its_stages() {
    let server = ServerProcess::start(&[]).await;
    let manifest = Manifest::load(&models_dir()).expect("the test model set's manifest");
    let action = manifest
        .heads
        .iter()
        .find(|h| h.kind == HeadKind::Action)
        .expect("an action head")
        .name
        .clone();
    let before = scrape(server.metrics_addr).await;
    // 20 frames, windows of 8 every 4: 4 windows.
    let clip = make_clip("testsrc=size=160x120:rate=10", 2.0, "mp4", &[]);
    let windows = stream_windows(server.addr, clip).await;
    assert_eq!(windows, 4);
    let stage = |stage| [("stage", stage), ("head", action.as_str())];
    let after = poll("every window to be recorded", SETTLE, async || {
        let after = scrape(server.metrics_addr).await;
        let total = after.delta(&before, "polyhead_stage_seconds_count", &stage("total"));
        (total >= windows as f64).then_some(after)
    })
    .await;
    for name in STAGES {
        assert_eq!(
            after.delta(&before, "polyhead_stage_seconds_count", &stage(name)),
            windows as f64,
            "{name}: once per window"
        );
    }
}

#[tokio::test]
async fn cached_features_stay_out_of_the_runtime_arena_and_a_batch_gives_its_memory_back() {
    let server = ServerProcess::start(&[
        ("POLYHEAD_CACHE_BYTES", "67108864"),
        ("POLYHEAD_ARENA_RELEASE_SECONDS", "0"),
    ])
    .await;
    let client = connect(server.addr).await;
    let arena = |s: &Scrape| {
        (
            s.value("polyhead_runtime_arena_bytes", &[]),
            s.value("polyhead_runtime_arena_in_use_bytes", &[]),
        )
    };
    // At rest the arena's tensors are the models' weights.
    let (_, weights) = arena(&scrape(server.metrics_addr).await);
    assert!(weights > 0.0, "the weights live in the arena");

    // New images: each run's features go to the feature cache, in buffers of their own.
    for seed in 0..6 {
        segment_noise(&client, seed).await;
    }
    // The worker publishes the arena after replying: poll until it has.
    let single = poll("the arena after single images", SETTLE, async || {
        let scrape = scrape(server.metrics_addr).await;
        (arena(&scrape).1 == weights).then_some(scrape)
    })
    .await;
    assert!(
        single.value("polyhead_feature_cache_bytes", &[]) > 0.0,
        "features are cached, outside the arena"
    );
    let (after_singles, _) = arena(&single);
    assert!(
        after_singles > weights,
        "the runs' activations stay for the next run"
    );

    // One backbone run of 8 frames needs 8 images' activations...
    let frames = vec![photo("chelsea.png"); 8];
    let options = v1::ActionOptions {
        num_frames: 8,
        top_k: 1,
        ..Default::default()
    };
    let got = client
        .recognize_frames(frames, 8.0, options, "")
        .await
        .expect("RecognizeAction");
    let timings = got.timings.expect("timings");
    assert_eq!((timings.backbone_passes, timings.backbone_images), (1, 8));
    poll("the arena to hold the batch", SETTLE, async || {
        let (held, in_use) = arena(&scrape(server.metrics_addr).await);
        (in_use == weights && held > after_singles).then_some(())
    })
    .await;
    // ... and the next single image's run gives them back when it ends.
    segment_noise(&client, 6).await;
    poll(
        "the arena to give the batch's memory back",
        SETTLE,
        async || {
            let (held, in_use) = arena(&scrape(server.metrics_addr).await);
            (in_use == weights && held <= after_singles).then_some(())
        },
    )
    .await;
}

/// Segments a 64x48 image of noise made from `seed`.
async fn segment_noise(client: &Client, seed: u64) {
    let image = v1::Image {
        source: Some(v1::image::Source::Raw(v1::RawImage {
            width: 64,
            height: 48,
            rgb: noise_rgb(seed, 64, 48).into(),
        })),
    };
    client
        .segment(image, v1::SegmentOptions::default(), "")
        .await
        .expect("Segment");
}

/// Streams `clip` as windows of 8 frames every 4 to the end; returns how many windows came.
// ONNX Runtime's official builds report usage to Microsoft from Linux unless
// ORT_DISABLE_TELEMETRY=1 is set before the library loads; when they do, they keep a device id
// and an event cache under $HOME/.cache/Microsoft. Started without the variable, the server must
// set it itself: after start-up, a call and a drain, that directory must not exist.
#[tokio::test]
async fn onnx_runtime_telemetry_stays_off() {
    let home = tempfile::tempdir().expect("a home directory");
    let home_path = home.path().to_str().expect("a UTF-8 path");
    let mut server = ServerProcess::start_without(
        &[("HOME", home_path)],
        &[
            polyhead_server::engine::RUNTIME_TELEMETRY_VAR,
            "XDG_CACHE_HOME",
        ],
    )
    .await;
    let client = connect(server.addr).await;
    client
        .detect(encoded(photo("chelsea.png")), Default::default(), "")
        .await
        .expect("a Detect");
    assert!(server.terminate().await.success());
    let written: Vec<_> = walk(home.path());
    assert!(
        !home.path().join(".cache/Microsoft").exists(),
        "ONNX Runtime telemetry wrote {written:?}"
    );
}

/// Every path under `dir`.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(walk(&path));
        }
        found.push(path);
    }
    found
}

async fn stream_windows(addr: SocketAddr, clip: Vec<u8>) -> usize {
    use v1::recognize_action_windows_response::Event;
    let options = v1::WindowOptions {
        window_frames: 8,
        window_stride: 4,
        top_k: 5,
        ..v1::WindowOptions::default()
    };
    let mut stream = connect(addr)
        .await
        .recognize_windows(clip, options, 1 << 20)
        .await
        .expect("the stream starts");
    let (mut windows, mut summary) = (0, None);
    while let Some(message) = stream.message().await.expect("the stream ends OK") {
        match message.event.expect("an event") {
            Event::Window(_) => windows += 1,
            Event::Summary(s) => summary = Some(s),
        }
    }
    let summary = summary.expect("a summary");
    assert_eq!(summary.windows as usize, windows);
    windows
}

async fn connect(addr: SocketAddr) -> Client {
    Client::connect(&addr.to_string(), ClientOptions::default())
        .await
        .expect("connect to polyhead-server")
}

/// Calls answered OK, INVALID_ARGUMENT, NOT_FOUND and (by tonic itself) UNIMPLEMENTED, and one
/// Open Inference Protocol call on the backbone; returns how many calls were made.
async fn send_known_calls(addr: SocketAddr) -> u64 {
    let mut raw = connect(addr).await.raw();
    for _ in 0..3 {
        raw.detect(detect_request(Some(encoded(photo("chelsea.png")))))
            .await
            .expect("detect");
    }
    for _ in 0..2 {
        let status = raw
            .detect(detect_request(None))
            .await
            .expect_err("no image");
        assert_eq!(status.code(), Code::InvalidArgument);
    }
    let analyze = v1::AnalyzeRequest {
        image: Some(encoded(photo("chelsea.png"))),
        heads: vec!["detection".into(), "segmentation".into()],
        ..Default::default()
    };
    raw.analyze(analyze).await.expect("analyze");
    let missing = v1::GetModelRequest {
        name: "no-such-model".into(),
    };
    let status = raw.get_model(missing).await.expect_err("unknown model");
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(call_unknown_method(addr).await, Code::Unimplemented);
    infer_on_backbone(addr).await;
    9
}

/// One ModelInfer of the backbone alone on a blank image of its input size.
async fn infer_on_backbone(addr: SocketAddr) {
    let spec = Manifest::load(&models_dir()).expect("manifest").backbone;
    let [height, width] = spec
        .input_size
        .unwrap_or([224, 224])
        .map(|side| side as usize);
    let input = ArrayD::<f32>::zeros(vec![1, 3, height, width]);
    let request = ModelInferRequest {
        model_name: spec.name,
        inputs: vec![InferInputTensor {
            name: spec.input,
            datatype: "FP32".into(),
            shape: input.shape().iter().map(|&d| d as i64).collect(),
            ..Default::default()
        }],
        raw_input_contents: vec![input.iter().flat_map(|v| v.to_le_bytes()).collect()],
        ..Default::default()
    };
    GrpcInferenceServiceClient::connect(format!("http://{addr}"))
        .await
        .expect("connect to the OIP service")
        .max_decoding_message_size(256 << 20)
        .model_infer(request)
        .await
        .expect("ModelInfer");
}

fn detect_request(image: Option<v1::Image>) -> v1::DetectRequest {
    v1::DetectRequest {
        image,
        options: Some(v1::DetectOptions::default()),
        head: String::new(),
    }
}

/// Calls a method the server does not have; tonic answers it without reaching any service.
async fn call_unknown_method(addr: SocketAddr) -> Code {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("ready");
    let path =
        tonic::codegen::http::uri::PathAndQuery::from_static("/polyhead.v1.Polyhead/NoSuchMethod");
    let codec = tonic_prost::ProstCodec::<v1::ListModelsRequest, v1::ListModelsResponse>::default();
    grpc.unary(Request::new(v1::ListModelsRequest {}), path, codec)
        .await
        .expect_err("no such method")
        .code()
}

/// Scrapes until the calls sent have all been recorded as finished (an error's response may be
/// sent before its call is recorded).
async fn settled(endpoint: SocketAddr, before: &Scrape, sent: u64) -> Scrape {
    poll("every call to be recorded", SETTLE, async || {
        let after = scrape(endpoint).await;
        let finished = after.delta(before, "grpc_server_handled_total", &[]);
        (finished >= sent as f64).then_some(after)
    })
    .await
}

fn assert_grpc_counts(before: &Scrape, after: &Scrape) {
    let detect = [
        ("grpc_service", "polyhead.v1.Polyhead"),
        ("grpc_method", "Detect"),
    ];
    let with_code = |code| [detect[0], detect[1], ("grpc_code", code)];
    let delta = |name: &str, labels: &[(&str, &str)]| after.delta(before, name, labels);
    assert_eq!(delta("grpc_server_started_total", &detect), 5.0);
    assert_eq!(delta("grpc_server_handled_total", &with_code("OK")), 3.0);
    assert_eq!(
        delta("grpc_server_handled_total", &with_code("InvalidArgument")),
        2.0
    );
    assert_eq!(delta("grpc_server_handling_seconds_count", &detect), 5.0);
    let analyze = [("grpc_method", "Analyze"), ("grpc_code", "OK")];
    assert_eq!(delta("grpc_server_handled_total", &analyze), 1.0);
    let get_model = [("grpc_method", "GetModel"), ("grpc_code", "NotFound")];
    assert_eq!(delta("grpc_server_handled_total", &get_model), 1.0);
    // Only the methods the server has get labels of their own.
    let unknown = [
        ("grpc_service", "_other"),
        ("grpc_method", "_other"),
        ("grpc_code", "Unimplemented"),
    ];
    assert_eq!(delta("grpc_server_handled_total", &unknown), 1.0);
    let infer = [
        ("grpc_service", "inference.GRPCInferenceService"),
        ("grpc_method", "ModelInfer"),
        ("grpc_code", "OK"),
    ];
    assert_eq!(delta("grpc_server_handled_total", &infer), 1.0);
    assert_eq!(delta("grpc_server_handled_total", &[]), 9.0, "nothing else");
    let fastest = [detect[0], detect[1], ("le", "0.001")];
    assert!(
        after.has("grpc_server_handling_seconds_bucket", &fastest),
        "1 ms bucket"
    );
}

fn assert_stage_counts(before: &Scrape, after: &Scrape, manifest: &Manifest) {
    let delta = |name: &str, labels: &[(&str, &str)]| after.delta(before, name, labels);
    // Three detections, one analysis and the ModelInfer ran the backbone once each; the bad
    // requests never did.
    assert_eq!(delta("polyhead_backbone_passes_total", &[]), 5.0);
    let batch = [("model", manifest.backbone.name.as_str())];
    assert_eq!(delta("polyhead_batch_size_count", &batch), 5.0);
    assert_eq!(
        delta("polyhead_batch_size_sum", &batch),
        5.0,
        "one image per run"
    );
    for stage in STAGES {
        let detection = [("stage", stage), ("head", "detection")];
        assert_eq!(
            delta("polyhead_stage_seconds_count", &detection),
            4.0,
            "{stage}"
        );
        let segmentation = [("stage", stage), ("head", "segmentation")];
        assert_eq!(
            delta("polyhead_stage_seconds_count", &segmentation),
            1.0,
            "{stage}"
        );
    }
}

fn assert_gauges(after: &Scrape, manifest: &Manifest) {
    let backbone = &manifest.backbone;
    let info = [
        ("model", backbone.name.as_str()),
        ("kind", "backbone"),
        ("version", backbone.version.as_str()),
        ("execution_provider", "cpu"),
    ];
    assert_eq!(after.value("polyhead_model_info", &info), 1.0);
    for head in &manifest.heads {
        let info = [("model", head.name.as_str()), ("kind", head.kind.as_str())];
        assert_eq!(
            after.value("polyhead_model_info", &info),
            1.0,
            "{}",
            head.name
        );
    }
    assert_eq!(
        after.value("polyhead_queue_depth", &[]),
        0.0,
        "queues drained"
    );
    assert!(after.has("polyhead_inflight_requests", &[("rpc", "Detect")]));
    assert_eq!(after.value("polyhead_inflight_requests", &[]), 0.0, "idle");
}

/// Every sample of one scrape of the text exposition format.
struct Scrape(Vec<(String, HashMap<String, String>, f64)>);

impl Scrape {
    fn parse(text: &str) -> Self {
        let samples = text
            .lines()
            .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
            .map(|line| {
                let (series, value) = line.rsplit_once(' ').expect("a sample has a value");
                let value = value.parse().unwrap_or_else(|_| panic!("value of {line}"));
                let (name, labels) = match series.split_once('{') {
                    Some((name, labels)) => (name, parse_labels(labels.trim_end_matches('}'))),
                    None => (series, HashMap::new()),
                };
                (name.to_string(), labels, value)
            })
            .collect();
        Self(samples)
    }

    fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&str, &str)],
    ) -> impl Iterator<Item = f64> + 'a {
        self.0
            .iter()
            .filter(move |(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, _, value)| *value)
    }

    /// The sum over the series of `name` that carry `labels`.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).sum()
    }

    fn has(&self, name: &str, labels: &[(&str, &str)]) -> bool {
        self.matching(name, labels).next().is_some()
    }

    fn delta(&self, before: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(name, labels) - before.value(name, labels)
    }
}

/// `key="value",...` with the format's escapes (`\\`, `\"`, `\n`).
fn parse_labels(mut text: &str) -> HashMap<String, String> {
    let mut labels = HashMap::new();
    while let Some((key, rest)) = text.split_once("=\"") {
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next().expect("closing quote") {
                (i, '"') => break i,
                (_, '\\') => match chars.next().expect("escaped character").1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                (_, c) => value.push(c),
            }
        };
        labels.insert(key.trim_start_matches(',').to_string(), value);
        text = &rest[end + 1..];
    }
    labels
}

/// `GET /metrics` over a plain HTTP/1.1 connection.
async fn scrape(endpoint: SocketAddr) -> Scrape {
    let response = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(endpoint).expect("connect to /metrics");
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: polyhead\r\nConnection: close\r\n\r\n")
            .expect("send the scrape");
        let mut response = String::new();
        stream
            .read_to_string(&mut response)
            .expect("read the scrape");
        response
    })
    .await
    .expect("scrape");
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    Scrape::parse(body)
}

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN_ID: &str = "00f067aa0ba902b7";

async fn detect_with_traceparent(addr: SocketAddr) {
    let mut request = Request::new(detect_request(Some(encoded(photo("chelsea.png")))));
    let traceparent = format!("00-{TRACE_ID}-{CALLER_SPAN_ID}-01");
    request
        .metadata_mut()
        .insert("traceparent", traceparent.parse().expect("ascii"));
    connect(addr)
        .await
        .raw()
        .detect(request)
        .await
        .expect("detect");
}

/// The spans of the caller's trace form one tree: the RPC span under the caller's span, every
/// stage under the RPC span.
fn assert_span_tree(spans: &[Span]) {
    let ours: Vec<&Span> = spans
        .iter()
        .filter(|s| hex(&s.trace_id) == TRACE_ID)
        .collect();
    let rpc = ours
        .iter()
        .find(|s| s.name == "Detect")
        .unwrap_or_else(|| panic!("no Detect span in {:?}", names(&ours)));
    assert_eq!(hex(&rpc.parent_span_id), CALLER_SPAN_ID);
    assert_eq!(rpc.kind, SpanKind::Server as i32);
    assert!(
        attribute(rpc, "request_id").is_some(),
        "request id recorded"
    );
    let mut children: Vec<&str> = ours
        .iter()
        .filter(|s| s.parent_span_id == rpc.span_id)
        .map(|s| s.name.as_str())
        .collect();
    children.sort_unstable();
    let expected = [
        "backbone",
        "decode",
        "head detection",
        "postprocess",
        "preprocess",
        "queue",
        "queue",
    ];
    assert_eq!(children, expected, "stages under the RPC span");
    assert_eq!(ours.len(), expected.len() + 1, "{:?}", names(&ours));
}

fn names<'a>(spans: &[&'a Span]) -> Vec<&'a str> {
    spans.iter().map(|s| s.name.as_str()).collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attribute<'a>(span: &'a Span, key: &str) -> Option<&'a Value> {
    find_attribute(&span.attributes, key)
}

fn find_attribute<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a Value> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.as_ref())
}

fn service_name(export: &ExportTraceServiceRequest) -> Option<String> {
    let resource = export.resource_spans.first()?.resource.as_ref()?;
    match find_attribute(&resource.attributes, "service.name")? {
        Value::StringValue(name) => Some(name.clone()),
        _ => None,
    }
}

fn export_spans(export: ExportTraceServiceRequest) -> Vec<Span> {
    export
        .resource_spans
        .into_iter()
        .flat_map(|r| r.scope_spans)
        .flat_map(|s| s.spans)
        .collect()
}

/// An OTLP/gRPC trace collector on 127.0.0.1:0 that forwards what it receives.
struct Collector(mpsc::UnboundedSender<ExportTraceServiceRequest>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        // The receiver only goes away when the test is over.
        let _ = self.0.send(request.into_inner());
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}

async fn collector() -> (
    SocketAddr,
    mpsc::UnboundedReceiver<ExportTraceServiceRequest>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the collector");
    let addr = listener.local_addr().expect("collector address");
    let (tx, rx) = mpsc::unbounded_channel();
    let service = TraceServiceServer::new(Collector(tx));
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (addr, rx)
}

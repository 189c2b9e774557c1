//! Metrics and traces, end to end: the Prometheus endpoint counts exactly the calls made, and a
//! caller's W3C trace continues through the RPC and every stage to an OTLP collector.
//!
//! The metrics recorder and the tracing subscriber are process-wide and every other test of this
//! binary shares its server, so each check runs in a process of its own: the test below starts
//! this binary again for one ignored test, which installs telemetry before the shared server
//! starts and is the only test of that process.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

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
use polyhead_proto::v1;
use polyhead_server::config::LogFormat;
use polyhead_server::telemetry::{Telemetry, TelemetryConfig};
use tokio::sync::mpsc;
use tonic::{Code, Request, Response, Status};

use crate::common::{client, encoded, photo, server};

/// Set in the environment of the child process.
const CHILD: &str = "POLYHEAD_TELEMETRY_CHILD";

/// How long the metrics of finished calls may take to show.
const SETTLE: Duration = Duration::from_secs(10);

#[test]
fn prometheus_counts_every_call_by_method_and_code() {
    in_own_process("telemetry::own_process::metrics");
}

#[test]
fn a_callers_trace_continues_through_every_stage() {
    in_own_process("telemetry::own_process::trace");
}

/// Runs the ignored test `name` alone in a fresh process of this binary.
fn in_own_process(name: &str) {
    let exe = std::env::current_exe().expect("the test binary");
    let output = std::process::Command::new(exe)
        .args([
            name,
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, "1")
        .env("POLYHEAD_LOG", "info,ort=warn")
        .output()
        .expect("start the test binary again");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stdout.contains("1 passed"),
        "{name} in its own process:\n{stdout}\n{stderr}"
    );
}

fn telemetry_config(otlp_endpoint: Option<String>, metrics: bool) -> TelemetryConfig {
    TelemetryConfig {
        metrics_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        no_metrics: !metrics,
        otlp_endpoint,
        service_name: "polyhead-test".into(),
    }
}

mod own_process {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "runs in its own process, from prometheus_counts_every_call_by_method_and_code"]
    async fn metrics() {
        if std::env::var_os(CHILD).is_none() {
            return;
        }
        let telemetry = Telemetry::init(&telemetry_config(None, true), LogFormat::Text)
            .await
            .expect("telemetry");
        let endpoint = telemetry.metrics_addr().expect("metrics are served");
        server();
        let before = scrape(endpoint).await;
        let sent = send_known_calls().await;
        let after = settled(endpoint, &before, sent).await;
        assert_grpc_counts(&before, &after);
        assert_stage_counts(&before, &after);
        assert_gauges(&after);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "runs in its own process, from a_callers_trace_continues_through_every_stage"]
    async fn trace() {
        if std::env::var_os(CHILD).is_none() {
            return;
        }
        let (collector, mut exports) = collector().await;
        let config = telemetry_config(Some(format!("http://{collector}")), false);
        let telemetry = Telemetry::init(&config, LogFormat::Json)
            .await
            .expect("telemetry");
        detect_with_traceparent().await;
        telemetry.flush().await;
        let mut spans = Vec::new();
        while let Ok(export) = exports.try_recv() {
            assert_eq!(service_name(&export).as_deref(), Some("polyhead-test"));
            spans.extend(export_spans(export));
        }
        assert_span_tree(&spans);
        telemetry.shutdown().await;
    }
}

/// Calls answered OK, INVALID_ARGUMENT, NOT_FOUND and (by tonic itself) UNIMPLEMENTED; returns
/// how many calls were made.
async fn send_known_calls() -> u64 {
    let mut raw = client().await.raw();
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
    assert_eq!(call_unknown_method().await, Code::Unimplemented);
    8
}

fn detect_request(image: Option<v1::Image>) -> v1::DetectRequest {
    v1::DetectRequest {
        image,
        options: Some(v1::DetectOptions::default()),
        head: String::new(),
    }
}

/// Calls a method the server does not have; tonic answers it without reaching any service.
async fn call_unknown_method() -> Code {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", server().addr))
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
/// sent before its call is recorded), or [`SETTLE`] passes.
async fn settled(endpoint: SocketAddr, before: &Scrape, sent: u64) -> Scrape {
    let started = Instant::now();
    loop {
        let after = scrape(endpoint).await;
        let finished = after.delta(before, "grpc_server_handled_total", &[]);
        if finished >= sent as f64 || started.elapsed() > SETTLE {
            return after;
        }
        tokio::task::yield_now().await;
    }
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
    let unknown = [
        ("grpc_method", "NoSuchMethod"),
        ("grpc_code", "Unimplemented"),
    ];
    assert_eq!(delta("grpc_server_handled_total", &unknown), 1.0);
    assert_eq!(delta("grpc_server_handled_total", &[]), 8.0, "nothing else");
    let fastest = [detect[0], detect[1], ("le", "0.001")];
    assert!(
        after.has("grpc_server_handling_seconds_bucket", &fastest),
        "1 ms bucket"
    );
}

fn assert_stage_counts(before: &Scrape, after: &Scrape) {
    let delta = |name: &str, labels: &[(&str, &str)]| after.delta(before, name, labels);
    // Three detections and one analysis ran the backbone once each; the bad requests never did.
    assert_eq!(delta("polyhead_backbone_passes_total", &[]), 4.0);
    let backbone = &server().pipeline.models().backbone.spec.name;
    let batch = [("model", backbone.as_str())];
    assert_eq!(delta("polyhead_batch_size_count", &batch), 4.0);
    assert_eq!(
        delta("polyhead_batch_size_sum", &batch),
        4.0,
        "one image per run"
    );
    for stage in [
        "decode",
        "preprocess",
        "queue",
        "backbone",
        "head",
        "postprocess",
        "total",
    ] {
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

fn assert_gauges(after: &Scrape) {
    let models = server().pipeline.models();
    let backbone = &models.backbone.spec;
    let info = [
        ("model", backbone.name.as_str()),
        ("kind", "backbone"),
        ("version", backbone.version.as_str()),
        ("execution_provider", "cpu"),
    ];
    assert_eq!(after.value("polyhead_model_info", &info), 1.0);
    for head in &models.heads {
        let info = [("model", head.name()), ("kind", head.kind().as_str())];
        assert_eq!(
            after.value("polyhead_model_info", &info),
            1.0,
            "{}",
            head.name()
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

async fn detect_with_traceparent() {
    let mut request = Request::new(detect_request(Some(encoded(photo("chelsea.png")))));
    let traceparent = format!("00-{TRACE_ID}-{CALLER_SPAN_ID}-01");
    request
        .metadata_mut()
        .insert("traceparent", traceparent.parse().expect("ascii"));
    client().await.raw().detect(request).await.expect("detect");
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

//! The library and the `polyhead` binary against an in-process mock server with canned answers:
//! deadlines, retries, status mapping, connection errors, output formats and exit codes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use polyhead_client::v1::polyhead_server::{Polyhead, PolyheadServer};
use polyhead_client::{Client, ClientError, ClientOptions, image_from_bytes, v1};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Code, Request, Response, Status};

type Reply<T> = Result<Response<T>, Status>;

/// Answers from fixed data; the head name selects failure modes. Counts the detect calls.
#[derive(Default)]
struct Mock {
    detect_calls: Arc<AtomicUsize>,
}

/// The refusal a `flaky` head answers with: `flaky <failures> <code> [<pushback>]` fails the
/// first `failures` detect calls with `code` (`exhausted`, `unavailable` or `invalid`),
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
        let call = self.detect_calls.fetch_add(1, Ordering::SeqCst);
        if let Some(refusal) = flaky(&request.get_ref().head, call) {
            return Err(refusal);
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

    async fn segment(&self, _: Request<v1::SegmentRequest>) -> Reply<v1::SegmentResponse> {
        Ok(Response::new(v1::SegmentResponse {
            segmentation: Some(segmentation()),
            timings: Some(timings(1)),
        }))
    }

    async fn recognize_action(
        &self,
        request: Request<v1::RecognizeActionRequest>,
    ) -> Reply<v1::RecognizeActionResponse> {
        let (count, fps) = match &request.get_ref().clip {
            Some(v1::recognize_action_request::Clip::Frames(f)) => (f.frames.len(), f.fps),
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
        _: Request<v1::ListModelsRequest>,
    ) -> Reply<v1::ListModelsResponse> {
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
        Err(Status::not_found(format!(
            "no model named {:?}",
            request.get_ref().name
        )))
    }

    async fn extract_features(
        &self,
        _: Request<v1::ExtractFeaturesRequest>,
    ) -> Reply<v1::ExtractFeaturesResponse> {
        Err(Status::unimplemented("the mock keeps no features"))
    }

    type RecognizeActionWindowsStream =
        tokio_stream::Iter<std::vec::IntoIter<Result<v1::RecognizeActionWindowsResponse, Status>>>;

    /// Reads the whole upload, then answers two windows of 2 frames and the totals.
    async fn recognize_action_windows(
        &self,
        request: Request<tonic::Streaming<v1::RecognizeActionWindowsRequest>>,
    ) -> Reply<Self::RecognizeActionWindowsStream> {
        let mut upload = request.into_inner();
        let mut video_bytes = 0;
        while let Some(message) = upload.message().await? {
            video_bytes += message.chunk.len() as u64;
        }
        let progress = |windows_done| v1::WindowProgress {
            frames_sampled: 2 * u64::from(windows_done),
            windows_done,
            frames_estimated: 4,
            windows_estimated: 2,
            duration_s: 1.0,
        };
        let window = |index: u32| v1::RecognizeActionWindowsResponse {
            event: Some(v1::recognize_action_windows_response::Event::Window(
                v1::ActionWindow {
                    index,
                    first_frame: 2 * index,
                    start_s: 0.5 * f64::from(index),
                    end_s: 0.5 * f64::from(index) + 0.25,
                    frame_timestamps: vec![0.5 * f64::from(index), 0.5 * f64::from(index) + 0.25],
                    top: vec![v1::ActionScore {
                        class_id: 7,
                        label: "juggling".into(),
                        score: 0.75,
                    }],
                    timings: Some(timings(1)),
                },
            )),
            progress: Some(progress(index + 1)),
        };
        let summary = v1::RecognizeActionWindowsResponse {
            event: Some(v1::recognize_action_windows_response::Event::Summary(
                v1::WindowsSummary {
                    windows: 2,
                    frames_sampled: 4,
                    video_bytes,
                    timings: Some(timings(2)),
                },
            )),
            progress: Some(progress(2)),
        };
        let messages = vec![Ok(window(0)), Ok(window(1)), Ok(summary)];
        Ok(Response::new(tokio_stream::iter(messages)))
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
async fn serve() -> anyhow::Result<SocketAddr> {
    Ok(serve_counting().await?.0)
}

/// Serves [`Mock`] on a free local port; the counter is the number of detect calls it received.
async fn serve_counting() -> anyhow::Result<(SocketAddr, Arc<AtomicUsize>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let mock = Mock::default();
    let calls = Arc::clone(&mock.detect_calls);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(PolyheadServer::new(mock))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    Ok((addr, calls))
}

/// A client of a fresh counting mock, with `timeout` and `max_retries`.
async fn counting_client(
    timeout: Duration,
    max_retries: u32,
) -> anyhow::Result<(Client, Arc<AtomicUsize>)> {
    let (addr, calls) = serve_counting().await?;
    let options = ClientOptions {
        timeout,
        max_retries,
        ..ClientOptions::default()
    };
    Ok((Client::connect(&addr.to_string(), options).await?, calls))
}

/// A detect call on the `head` of the mock.
async fn detect(client: &Client, head: &str) -> polyhead_client::Result<v1::DetectResponse> {
    let image = image_from_bytes(b"jpeg".to_vec());
    client
        .detect(image, v1::DetectOptions::default(), head)
        .await
}

/// Runs the `polyhead` binary with `args` off the async runtime.
async fn polyhead(args: Vec<String>) -> anyhow::Result<Output> {
    let output = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_polyhead"))
            .args(args)
            .env_remove("POLYHEAD_SERVER")
            .env_remove("POLYHEAD_TIMEOUT")
            .env_remove("POLYHEAD_RETRIES")
            .output()
    })
    .await??;
    Ok(output)
}

fn args(addr: SocketAddr, rest: &[&str]) -> Vec<String> {
    let mut all = vec!["--server".to_owned(), addr.to_string()];
    all.extend(rest.iter().map(|s| (*s).to_owned()));
    all
}

fn temp_file(name: &str, bytes: &[u8]) -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("polyhead-mock-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(name);
    std::fs::write(&path, bytes)?;
    Ok(path)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn library_calls_carry_deadlines_and_map_statuses() -> anyhow::Result<()> {
    let addr = serve().await?;
    let options = ClientOptions {
        timeout: Duration::from_millis(300),
        ..ClientOptions::default()
    };
    let client = Client::connect(&format!("http://{addr}"), options).await?;
    let image = || image_from_bytes(b"jpeg".to_vec());

    let ok = client
        .detect(image(), v1::DetectOptions::default(), "")
        .await?;
    let sent = ok.detections.map(|d| d.detections[0].label.clone());
    assert_eq!(sent.as_deref(), Some("300000u"), "grpc-timeout header");

    let slow = client
        .detect(image(), v1::DetectOptions::default(), "slow")
        .await;
    let Err(err) = slow else {
        anyhow::bail!("slow call succeeded");
    };
    assert!(matches!(err, ClientError::Timeout { .. }), "{err:?}");
    assert_eq!(err.code(), Some(Code::DeadlineExceeded));
    assert!(
        err.to_string().starts_with("request timed out after 0.3s"),
        "{err}"
    );

    let busy = client
        .detect(image(), v1::DetectOptions::default(), "busy")
        .await;
    let message = busy.err().map(|e| e.to_string());
    assert_eq!(
        message.as_deref(),
        Some("server is at capacity: 8 requests in flight; retry later")
    );

    let missing = client.get_model("nope").await.err();
    assert_eq!(missing.and_then(|e| e.code()), Some(Code::NotFound));

    let frames = vec![b"a".to_vec(), b"b".to_vec(), b"c".to_vec()];
    let actions = client
        .recognize_frames(frames, 2.0, v1::ActionOptions::default(), "")
        .await?
        .actions
        .map(|a| a.frame_timestamps);
    assert_eq!(actions, Some(vec![0.0, 0.5, 1.0]));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_calls_are_retried_after_the_server_pushback() -> anyhow::Result<()> {
    let (client, calls) = counting_client(Duration::from_secs(5), 3).await?;
    let started = Instant::now();
    let ok = detect(&client, "flaky 2 exhausted 30").await?;
    let waited = started.elapsed();
    assert!(ok.detections.is_some());
    assert_eq!(
        calls.load(Ordering::SeqCst),
        3,
        "two refusals, then success"
    );
    assert!(
        waited >= Duration::from_millis(60),
        "waited only {waited:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unavailable_is_retried_and_invalid_argument_is_not() -> anyhow::Result<()> {
    let (client, calls) = counting_client(Duration::from_secs(5), 3).await?;
    detect(&client, "flaky 1 unavailable").await?;
    assert_eq!(calls.swap(0, Ordering::SeqCst), 2);

    let invalid = detect(&client, "flaky 1 invalid 1").await.err();
    assert_eq!(invalid.and_then(|e| e.code()), Some(Code::InvalidArgument));
    assert_eq!(calls.load(Ordering::SeqCst), 1, "never retried");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_stop_at_max_retries_with_the_last_error() -> anyhow::Result<()> {
    let (client, calls) = counting_client(Duration::from_secs(5), 2).await?;
    let err = detect(&client, "flaky 100 exhausted 1").await.err();
    assert_eq!(
        err.map(|e| e.to_string()).as_deref(),
        Some("server is at capacity: refusal 3; retry later")
    );
    assert_eq!(calls.swap(0, Ordering::SeqCst), 3, "max_retries + 1 calls");

    let once = ClientOptions {
        max_retries: 0,
        ..client.options().clone()
    };
    let client = Client::connect(client.addr(), once).await?;
    assert!(detect(&client, "flaky 100 unavailable").await.is_err());
    assert_eq!(calls.load(Ordering::SeqCst), 1, "0 disables retries");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_negative_or_malformed_pushback_stops_retrying() -> anyhow::Result<()> {
    let (client, calls) = counting_client(Duration::from_secs(5), 3).await?;
    for head in ["flaky 100 exhausted -1", "flaky 100 exhausted soon"] {
        let err = detect(&client, head).await.err();
        assert_eq!(err.and_then(|e| e.code()), Some(Code::ResourceExhausted));
        assert_eq!(calls.swap(0, Ordering::SeqCst), 1, "{head}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_overall_timeout_bounds_the_retries() -> anyhow::Result<()> {
    let timeout = Duration::from_millis(200);
    let (client, calls) = counting_client(timeout, 100).await?;
    let started = Instant::now();
    let err = detect(&client, "flaky 100 exhausted 40").await.err();
    let took = started.elapsed();
    assert_eq!(err.and_then(|e| e.code()), Some(Code::ResourceExhausted));
    assert!(took < timeout, "retrying took {took:?}");
    let made = calls.swap(0, Ordering::SeqCst);
    assert!((2..=5).contains(&made), "{made} calls in {timeout:?}");

    let late = detect(&client, "slow").await.err();
    assert!(
        matches!(late, Some(ClientError::Timeout { .. })),
        "{late:?}"
    );
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "a timeout is never retried"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_outputs_and_exit_codes() -> anyhow::Result<()> {
    let addr = serve().await?;
    let image = temp_file("image.jpg", b"jpeg")?;
    let image = image.to_string_lossy().into_owned();

    let detect = polyhead(args(addr, &["detect", &image])).await?;
    assert_eq!(detect.status.code(), Some(0), "{}", text(&detect.stderr));
    let stdout = text(&detect.stdout);
    assert!(stdout.contains("0.500  [1.0, 2.0, 3.0, 4.0]"), "{stdout}");
    assert!(stdout.contains("backbone passes: 1"), "{stdout}");

    let json = polyhead(args(addr, &["--json", "segment", &image])).await?;
    let value: serde_json::Value = serde_json::from_slice(&json.stdout)?;
    assert_eq!(value["segmentation"]["present"][0]["label"], "sky");
    assert!(value["segmentation"].get("label_map_png").is_none());

    let map = temp_file("map.png", b"")?;
    let out = map.to_string_lossy().into_owned();
    let segment = polyhead(args(addr, &["segment", &image, "--out", &out])).await?;
    assert_eq!(segment.status.code(), Some(0), "{}", text(&segment.stderr));
    assert_eq!(std::fs::read(&map)?, b"\x89PNG fake");

    let analyze = polyhead(args(addr, &["analyze", &image])).await?;
    let stdout = text(&analyze.stdout);
    assert!(stdout.contains("== coco (detection) =="), "{stdout}");
    assert!(stdout.contains("== ade (segmentation) =="), "{stdout}");
    assert!(!stdout.contains("k400"), "{stdout}");

    let video = polyhead(args(
        addr,
        &["video", "--images", &image, &image, "--fps", "4"],
    ))
    .await?;
    let stdout = text(&video.stdout);
    assert!(stdout.contains("juggling  0.750"), "{stdout}");
    assert!(
        stdout.contains("2 frames used, at 0.00, 0.25 s"),
        "{stdout}"
    );

    let clip = temp_file("long.mp4", &[9u8; 3000])?;
    let clip = clip.to_string_lossy().into_owned();
    let windows = polyhead(args(addr, &["video", &clip, "--window", "2"])).await?;
    assert_eq!(windows.status.code(), Some(0), "{}", text(&windows.stderr));
    let stdout = text(&windows.stdout);
    assert!(stdout.contains("window    1"), "{stdout}");
    assert!(stdout.contains("juggling 0.750"), "{stdout}");
    assert!(
        stdout.contains("2 windows over 4 sampled frames"),
        "{stdout}"
    );
    let lines = polyhead(args(addr, &["--json", "video", &clip, "--windows"])).await?;
    let stdout = text(&lines.stdout);
    let values: Vec<serde_json::Value> = stdout
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    assert_eq!(values.len(), 3, "{stdout}");
    assert_eq!(values[1]["window"], 1);
    assert_eq!(values[1]["actions"]["top"][0]["label"], "juggling");
    assert_eq!(values[2]["video_bytes"], 3000);

    let busy = polyhead(args(addr, &["detect", &image, "--head", "busy"])).await?;
    assert_eq!(busy.status.code(), Some(1));
    assert_eq!(
        text(&busy.stderr),
        "error: server is at capacity: 8 requests in flight; retry later\n"
    );

    let missing = polyhead(args(addr, &["detect", "/nonexistent/x.jpg"])).await?;
    assert_eq!(missing.status.code(), Some(1));
    assert!(text(&missing.stderr).starts_with("error: cannot read /nonexistent/x.jpg: "));

    let usage = polyhead(args(addr, &["detect", &image, "--score-threshold", "2"])).await?;
    assert_eq!(usage.status.code(), Some(2));
    Ok(())
}

#[tokio::test]
async fn cli_reports_an_absent_server() -> anyhow::Result<()> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    drop(listener);
    let output = polyhead(args(addr, &["models"])).await?;
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(
        text(&output.stderr),
        format!(
            "error: cannot connect to polyhead at http://{addr}: connection refused \
             (is the server running? set --server or POLYHEAD_SERVER)\n"
        )
    );
    Ok(())
}

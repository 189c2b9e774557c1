//! Overload and message limits on servers of their own: exact admission accounting (N slots, a
//! queue of Q, the rest RESOURCE_EXHAUSTED at once), queued calls that expire or are cancelled
//! never reaching the backbone, the per-connection stream limit, oversized or
//! decompression-bomb messages refused with RESOURCE_EXHAUSTED, the one budget for the bytes
//! being received over all calls, and the decode, frame-memory and mask-pixel limits.

use std::sync::Arc;
use std::time::{Duration, Instant};

use polyhead_client::{Client, ClientOptions};
use polyhead_proto::inference::ModelInferRequest;
use polyhead_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use polyhead_proto::inference::model_infer_request::InferInputTensor;
use polyhead_proto::v1;
use polyhead_server::Config;
use polyhead_server::admission::{Admission, Slot};
use prost::Message;
use tonic::Code;
use tonic::codec::CompressionEncoding;
use tonic::transport::Channel;
use v1::polyhead_client::PolyheadClient;

use crate::common::{TestServer, encoded, models_dir, noise_rgb, start_server};

/// A server with `slots` request slots and a queue of `queue`, the feature cache off.
fn server(slots: usize, queue: usize, configure: impl FnOnce(&mut Config)) -> TestServer {
    let mut config = Config::for_models(models_dir());
    config.cache.cache_bytes = 0;
    config.admission.max_concurrent_requests = slots;
    config.admission.max_queued_requests = queue;
    configure(&mut config);
    start_server(config)
}

/// A client on its own connection that never retries, so that every refusal is seen.
async fn no_retries(server: &TestServer) -> Client {
    let options = ClientOptions {
        max_retries: 0,
        ..ClientOptions::default()
    };
    Client::connect(&server.addr.to_string(), options)
        .await
        .expect("connect")
}

fn noise_image(seed: u64) -> v1::Image {
    sized_noise_image(seed, 96, 64)
}

/// Raw RGB noise of `width` x `height`, `seed` telling images apart.
fn sized_noise_image(seed: u64, width: u32, height: u32) -> v1::Image {
    v1::Image {
        source: Some(v1::image::Source::Raw(v1::RawImage {
            width,
            height,
            rgb: noise_rgb(seed, width, height).into(),
        })),
    }
}

async fn detect(client: &Client, seed: u64) -> Result<v1::DetectResponse, tonic::Status> {
    client
        .detect(noise_image(seed), v1::DetectOptions::default(), "")
        .await
        .map_err(|e| {
            e.status()
                .cloned()
                .unwrap_or_else(|| panic!("no status: {e}"))
        })
}

/// A Detect of `image` on a task of its own, with the default options.
fn spawn_detect(
    client: &Client,
    image: v1::Image,
) -> tokio::task::JoinHandle<polyhead_client::Result<v1::DetectResponse>> {
    let client = client.clone();
    tokio::spawn(async move { client.detect(image, v1::DetectOptions::default(), "").await })
}

/// Waits (bounded) until `admission` shows `queued` waiting calls.
async fn until_queued(admission: &Admission, queued: usize) {
    let reached = admission.wait_until(|_, now| now == queued);
    if tokio::time::timeout(Duration::from_secs(20), reached)
        .await
        .is_err()
    {
        panic!(
            "expected {queued} queued calls, have {}",
            admission.queued()
        );
    }
}

fn pushback(status: &tonic::Status) -> Option<&str> {
    status
        .metadata()
        .get("grpc-retry-pushback-ms")
        .and_then(|v| v.to_str().ok())
}

const MIB: usize = 1 << 20;

/// A server for the receive budget's tests: messages of up to 1 MiB, uploads of up to `video`
/// bytes, a budget of `receiving` bytes, and one request slot, held by the test (the returned
/// `Slot`) so that calls wait in the queue with their bytes.
async fn held_server(video: u64, receiving: usize) -> (TestServer, Arc<Admission>, Slot) {
    let server = server(1, 4, |config| {
        config.limits.max_message_bytes = MIB;
        config.limits.max_video_bytes = video;
        config.admission.max_receiving_bytes = receiving as u64;
    });
    let admission = Arc::clone(server.pipeline.admission());
    let slot = admission.admit().await.expect("the only slot");
    (server, admission, slot)
}

/// The generated client on a connection of its own, taking responses of any size.
async fn generated_client(server: &TestServer) -> PolyheadClient<Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", server.addr))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    PolyheadClient::new(channel).max_decoding_message_size(usize::MAX)
}

#[tokio::test]
async fn overload_is_accounted_exactly() {
    const SLOTS: usize = 2;
    const QUEUE: usize = 3;
    const EXTRA: usize = 4;
    let server = server(SLOTS, QUEUE, |_| {});
    let admission = Arc::clone(server.pipeline.admission());
    let client = no_retries(&server).await;
    let images_before = server.pipeline.backbone_images();

    // The slots are taken as running calls would take them, so the rest is deterministic.
    let mut held = Vec::new();
    for _ in 0..SLOTS {
        held.push(admission.admit().await.expect("a free slot"));
    }
    let queued: Vec<_> = (0..QUEUE as u64)
        .map(|seed| {
            let client = client.clone();
            tokio::spawn(async move { detect(&client, seed).await })
        })
        .collect();
    until_queued(&admission, QUEUE).await;

    let mut rejected = 0;
    for seed in 0..EXTRA as u64 {
        let started = Instant::now();
        let status = detect(&client, 100 + seed)
            .await
            .expect_err("queue is full");
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert!(
            status.message().contains("at capacity"),
            "{}",
            status.message()
        );
        assert_eq!(pushback(&status), Some("100"));
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "refused at once"
        );
        rejected += 1;
    }
    assert_eq!(server.pipeline.backbone_images(), images_before);
    // A request that could never succeed is told so at once, full queue or not: a retryable
    // RESOURCE_EXHAUSTED would have the client send it again.
    let status = client
        .detect(
            noise_image(200),
            v1::DetectOptions::default(),
            "no-such-head",
        )
        .await
        .expect_err("unknown head");
    assert_eq!(status.code(), Some(Code::NotFound), "{status}");
    let mut oip = GrpcInferenceServiceClient::connect(format!("http://{}", server.addr))
        .await
        .expect("connect");
    let unknown = ModelInferRequest {
        model_name: "no-such-model".into(),
        ..Default::default()
    };
    let status = oip.model_infer(unknown).await.expect_err("unknown model");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    // So is an input the model cannot take.
    let misshapen = ModelInferRequest {
        model_name: "detection".into(),
        inputs: vec![InferInputTensor {
            name: "pixel_values".into(),
            datatype: "FP32".into(),
            shape: vec![1, 2],
            ..Default::default()
        }],
        raw_input_contents: vec![vec![0u8; 8].into()],
        ..Default::default()
    };
    let status = oip.model_infer(misshapen).await.expect_err("rank 2");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("rank"), "{status:?}");

    drop(held);
    let mut ok = 0;
    for call in queued {
        call.await
            .expect("join")
            .expect("a queued call runs once a slot frees");
        ok += 1;
    }
    assert_eq!((ok, rejected), (QUEUE, EXTRA));
    assert_eq!(ok + rejected, QUEUE + EXTRA, "every call answered once");
    assert_eq!(
        server.pipeline.backbone_images() - images_before,
        QUEUE as u64,
        "refused calls never reach the backbone"
    );
    assert_eq!((admission.running(), admission.queued()), (0, 0));
}

#[tokio::test]
async fn a_flood_of_callers_is_served_or_refused_and_nothing_else() {
    const CALLERS: u64 = 16;
    let server = server(2, 3, |_| {});
    let admission = Arc::clone(server.pipeline.admission());
    let client = no_retries(&server).await;
    let calls: Vec<_> = (0..CALLERS)
        .map(|seed| {
            let client = client.clone();
            tokio::spawn(async move { detect(&client, 1000 + seed).await })
        })
        .collect();
    let (mut ok, mut rejected) = (0, 0);
    for call in calls {
        match call.await.expect("join") {
            Ok(response) => {
                assert!(response.detections.is_some());
                ok += 1;
            }
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                assert_eq!(pushback(&status), Some("100"));
                rejected += 1;
            }
        }
    }
    assert_eq!(ok + rejected, CALLERS);
    assert!(
        ok >= 5,
        "two slots and three queue places are always served: {ok}"
    );
    assert_eq!((admission.running(), admission.queued()), (0, 0));
}

#[tokio::test]
async fn queued_calls_that_expire_or_are_cancelled_never_run() {
    // A call that carries no deadline gets the server's default one: the server, not the
    // client, ends it.
    let server = server(1, 4, |config| config.limits.default_timeout_seconds = 0.3);
    let admission = Arc::clone(server.pipeline.admission());
    let client = no_retries(&server).await;
    let images_before = server.pipeline.backbone_images();
    let held = admission.admit().await.expect("the only slot");

    let no_deadline = tonic::Request::new(v1::DetectRequest {
        image: Some(noise_image(7)),
        ..Default::default()
    });
    let status = client
        .raw()
        .detect(no_deadline)
        .await
        .expect_err("no slot frees in time");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(
        status.message().contains("deadline"),
        "{}",
        status.message()
    );
    until_queued(&admission, 0).await;

    let abandoned = {
        let client = client.clone();
        tokio::spawn(async move { detect(&client, 8).await })
    };
    until_queued(&admission, 1).await;
    abandoned.abort();
    until_queued(&admission, 0).await;

    drop(held);
    assert_eq!(
        server.pipeline.backbone_images(),
        images_before,
        "neither the expired nor the cancelled call reached the backbone"
    );
    assert_eq!(admission.dropped(), 2, "both were counted as dropped");
    detect(&client, 9).await.expect("the server serves on");
    assert_eq!(server.pipeline.backbone_images() - images_before, 1);
}

#[tokio::test]
async fn one_connection_is_held_to_its_stream_limit() {
    // Two slots and no queue: a third call running at once would be refused. The server lets
    // a connection open two streams at a time, so the client holds its other calls back and
    // every one of them is served.
    let server = server(2, 0, |config| config.admission.max_concurrent_streams = 2);
    let client = no_retries(&server).await;
    // A client may open streams before the server's SETTINGS reach it (HTTP/2 refuses those
    // with REFUSED_STREAM); one call first, then the limit is known.
    detect(&client, 1999).await.expect("first call");
    let calls: Vec<_> = (0..8)
        .map(|seed| {
            let client = client.clone();
            tokio::spawn(async move { detect(&client, 2000 + seed).await })
        })
        .collect();
    for call in calls {
        call.await
            .expect("join")
            .expect("the stream limit keeps the connection within the slots");
    }
}

#[tokio::test]
async fn oversized_messages_are_resource_exhausted_and_not_retried() {
    let server = server(4, 4, |config| config.limits.max_message_bytes = 256 << 10);
    let client = Client::connect(&server.addr.to_string(), ClientOptions::default())
        .await
        .expect("connect");
    let started = Instant::now();
    let status = client
        .detect(
            encoded(vec![0xAB; 300 << 10]),
            v1::DetectOptions::default(),
            "",
        )
        .await
        .expect_err("over the limit")
        .status()
        .cloned()
        .expect("a status");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("--max-message-bytes"),
        "{}",
        status.message()
    );
    assert!(status.message().contains("262144"), "{}", status.message());
    assert_eq!(
        pushback(&status),
        Some("-1"),
        "a retry would be refused again"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    detect(&client, 3).await.expect("the connection serves on");
}

#[tokio::test]
async fn a_gzip_bomb_is_refused_while_inflating() {
    let server = server(4, 4, |config| config.limits.max_message_bytes = 1 << 20);
    // 256 MiB of zeros travel as about 256 KiB of gzip; they must not be inflated whole.
    let bomb = v1::DetectRequest {
        image: Some(encoded(vec![0; 256 << 20])),
        ..Default::default()
    };
    let client = no_retries(&server).await;
    let mut raw = client
        .raw()
        .send_compressed(CompressionEncoding::Gzip)
        .max_encoding_message_size(usize::MAX);
    let started = Instant::now();
    let status = raw
        .detect(client.request(bomb))
        .await
        .expect_err("inflates past the limit");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("decompressing"),
        "{}",
        status.message()
    );
    assert_eq!(pushback(&status), Some("-1"));
    assert!(started.elapsed() < Duration::from_secs(30));
    detect(&client, 4).await.expect("the server serves on");
}

#[tokio::test]
async fn a_deadline_that_passes_while_the_message_arrives_is_deadline_exceeded() {
    // The headers arrive, the message never does: tonic is still reading it when the deadline
    // passes, and its own timer would answer CANCELLED.
    let server = server(1, 64, |_| {});
    for timeout_ms in [5, 20, 50] {
        let tcp = tokio::net::TcpStream::connect(server.addr)
            .await
            .expect("connect");
        let (h2, connection) = h2::client::handshake(tcp).await.expect("handshake");
        tokio::spawn(connection);
        let mut h2 = h2.ready().await.expect("ready");
        let request = http::Request::post(format!(
            "http://{}/polyhead.v1.Polyhead/Detect",
            server.addr
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", format!("{timeout_ms}m"))
        .body(())
        .expect("request");
        let (response, _open_body) = h2.send_request(request, false).expect("send");
        let response = response.await.expect("response");
        let status = response.headers().get("grpc-status").cloned();
        let message = response.headers().get("grpc-message").cloned();
        assert_eq!(
            status.as_ref().and_then(|s| s.to_str().ok()),
            Some("4"),
            "grpc-timeout {timeout_ms}m: DEADLINE_EXCEEDED is 4 ({message:?})"
        );
    }
}

/// Sends a Detect of `image` with `grpc-timeout: <timeout_ms>m` over a bare HTTP/2 connection
/// (no gRPC client, so no client-side timer races the server's answer) and returns the
/// `grpc-status` the server answered with.
async fn raw_detect_status(
    addr: std::net::SocketAddr,
    image: v1::Image,
    timeout_ms: u64,
) -> String {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (h2, connection) = h2::client::handshake(tcp).await.expect("handshake");
    tokio::spawn(connection);
    let mut h2 = h2.ready().await.expect("ready");
    let request = http::Request::post(format!("http://{addr}/polyhead.v1.Polyhead/Detect"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", format!("{timeout_ms}m"))
        .body(())
        .expect("request");
    let message = v1::DetectRequest {
        image: Some(image),
        ..Default::default()
    }
    .encode_to_vec();
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(&message);
    let (response, mut body) = h2.send_request(request, false).expect("send");
    body.send_data(frame.into(), true).expect("send body");
    let response = response.await.expect("response");
    let from_headers = response.headers().get("grpc-status").cloned();
    let status = match from_headers {
        Some(status) => status,
        None => {
            let mut body = response.into_body();
            while body.data().await.is_some() {}
            let trailers = body
                .trailers()
                .await
                .expect("trailers")
                .expect("some trailers");
            trailers.get("grpc-status").cloned().expect("grpc-status")
        }
    };
    status.to_str().expect("ascii").to_owned()
}

#[tokio::test]
async fn a_passed_deadline_is_deadline_exceeded_never_cancelled() {
    // tonic also times calls out from their `grpc-timeout`, answering CANCELLED; the server's
    // own deadline must always answer first.
    let server = server(1, 64, |_| {});
    let admission = Arc::clone(server.pipeline.admission());
    let held = admission.admit().await.expect("the only slot");
    for (seed, timeout_ms) in (0..12).zip([5, 10, 20, 40].into_iter().cycle()) {
        let status = raw_detect_status(server.addr, noise_image(5000 + seed), timeout_ms).await;
        assert_eq!(
            status, "4",
            "grpc-timeout {timeout_ms}m: DEADLINE_EXCEEDED is 4"
        );
    }
    drop(held);
    until_queued(&admission, 0).await;
}

#[tokio::test]
async fn decode_memory_limits_are_the_configured_ones() {
    // coffee.png is 600 x 400: 720,000 bytes as RGB. A 20-frame clip of 160 x 120 sampled at 8
    // frames holds 460,800.
    let server = server(4, 4, |config| {
        config.limits.max_image_decode_bytes = 500_000;
        config.limits.max_clip_frame_bytes = 400_000;
    });
    let client = no_retries(&server).await;
    let err = client
        .detect(
            encoded(crate::common::photo("coffee.png")),
            v1::DetectOptions::default(),
            "",
        )
        .await
        .expect_err("over the decode limit");
    assert_eq!(err.code(), Some(Code::InvalidArgument), "{err}");
    assert!(err.to_string().contains("the limit is 500000"), "{err}");

    let clip = crate::common::make_clip("testsrc=size=160x120:rate=10", 2.0, "mp4", &[]);
    let request = v1::RecognizeActionRequest {
        clip: Some(polyhead_client::video_clip(clip)),
        options: Some(v1::ActionOptions {
            num_frames: 8,
            ..Default::default()
        }),
        head: String::new(),
    };
    let err = client
        .recognize_action(request)
        .await
        .expect_err("over the frame memory limit");
    assert_eq!(err.code(), Some(Code::InvalidArgument), "{err}");
    assert!(err.to_string().contains("400000"), "{err}");
}

#[tokio::test]
async fn a_video_whose_decoder_keeps_too_many_frames_is_refused_in_both_decoders() {
    // 320 x 240 4:2:0 is about 115 KB a frame: 16 reference frames and 3 held back to reorder
    // take over 1 MB, one reference frame and none held back well under.
    let server = server(4, 4, |config| {
        config.limits.max_clip_decoder_bytes = 1_000_000;
    });
    let client = no_retries(&server).await;
    let source = "testsrc=size=320x240:rate=10";
    let encode = |refs, b_frames| {
        let args = [
            "-c:v", "libx264", "-pix_fmt", "yuv420p", "-refs", refs, "-bf", b_frames,
        ];
        crate::common::make_clip(source, 2.0, "mp4", &args)
    };
    let action = |clip| v1::RecognizeActionRequest {
        clip: Some(polyhead_client::video_clip(clip)),
        options: None,
        head: String::new(),
    };
    client
        .recognize_action(action(encode("1", "0")))
        .await
        .expect("one reference frame fits");
    let heavy = encode("16", "3");
    let err = client
        .recognize_action(action(heavy.clone()))
        .await
        .expect_err("16 reference frames do not");
    assert_eq!(err.code(), Some(Code::InvalidArgument), "{err}");
    assert!(err.to_string().contains("the limit is 1000000"), "{err}");

    // The window stream's decoder is held to the same limit.
    let status = windows_status(&client, heavy).await;
    assert_eq!(status.0, Some(Code::InvalidArgument), "{}", status.1);
    assert!(
        status.1.contains("reference and reordering frames"),
        "{}",
        status.1
    );
}

/// The status of a window stream over `video`: refused at once, or ended with an error.
async fn windows_status(client: &Client, video: Vec<u8>) -> (Option<Code>, String) {
    let options = crate::windows::window_options(8, 8);
    match client.recognize_windows(video, options, 1 << 20).await {
        Err(err) => (err.code(), err.to_string()),
        Ok(stream) => {
            let ended = crate::windows::collect(stream).await;
            let status = ended.error.expect("the stream is refused");
            (Some(status.code()), status.message().to_string())
        }
    }
}

#[tokio::test]
async fn decoding_memory_is_one_budget_over_all_calls() {
    const LIMIT: u64 = 4 << 20;
    let server = server(4, 4, |config| config.limits.max_decoding_bytes = LIMIT);
    let client = no_retries(&server).await;
    let memory = server.pipeline.decoding_memory();
    assert_eq!(memory.limit(), Some(LIMIT));
    // astronaut.png is 512 x 512 RGB: its decoded pixels take 768 KiB.
    let photo = || encoded(crate::common::photo("astronaut.png"));
    let detect = || client.detect(photo(), v1::DetectOptions::default(), "");
    let clip = crate::common::make_clip(
        "testsrc=size=320x240:rate=10",
        2.0,
        "mp4",
        &["-c:v", "libx264", "-pix_fmt", "yuv420p"],
    );
    let frames = crate::windows::png_frames(&clip);
    let action = |clip| v1::RecognizeActionRequest {
        clip: Some(clip),
        options: None,
        head: String::new(),
    };
    detect().await.expect("the photo fits");
    client
        .recognize_action(action(polyhead_client::video_clip(clip.clone())))
        .await
        .expect("the clip fits");
    assert_eq!(memory.held(), 0, "finished calls hold nothing");

    // Another call's decoding holds all but 128 KiB: less than one 320 x 240 RGB frame
    // (225 KiB).
    let other = memory.take(LIMIT - (128 << 10)).expect("the test's hold");
    let full = |err: &polyhead_client::ClientError| {
        assert_eq!(err.code(), Some(Code::ResourceExhausted), "{err}");
        let message = err.to_string();
        assert!(message.contains("--max-decoding-bytes"), "{message}");
        assert!(message.contains("retry later"), "{message}");
        let status = err.status().expect("a status");
        assert_eq!(pushback(status), Some("100"), "{status:?}");
    };
    full(&detect().await.expect_err("no room for the photo"));
    let err = client
        .recognize_action(action(polyhead_client::video_clip(clip.clone())))
        .await
        .expect_err("no room for the clip");
    full(&err);
    let err = client
        .recognize_action(action(polyhead_client::frames_clip(frames.clone(), 10.0)))
        .await
        .expect_err("no room for a frame");
    full(&err);
    let (code, message) = windows_status(&client, clip.clone()).await;
    assert_eq!(code, Some(Code::ResourceExhausted), "{message}");
    assert!(message.contains("--max-decoding-bytes"), "{message}");
    assert_eq!(
        memory.held(),
        LIMIT - (128 << 10),
        "refused calls hold nothing"
    );

    // Once the other call is done, the same calls succeed.
    drop(other);
    detect().await.expect("the photo fits again");
    client
        .recognize_action(action(polyhead_client::frames_clip(frames, 10.0)))
        .await
        .expect("the frames fit again");
    assert_eq!(memory.held(), 0);

    // An image that needs more than all of it can never be decoded here: INVALID_ARGUMENT.
    let mut png = Vec::new();
    image::RgbImage::new(1200, 1200)
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .expect("encode");
    let err = client
        .detect(encoded(png), v1::DetectOptions::default(), "")
        .await
        .expect_err("4.32 MB to decode");
    assert_eq!(err.code(), Some(Code::InvalidArgument), "{err}");
    assert!(
        err.to_string().contains("more than the 4194304 bytes"),
        "{err}"
    );
    assert_eq!(memory.held(), 0);
}

#[tokio::test]
async fn concurrent_decodes_are_served_or_refused_and_give_their_memory_back() {
    // A 1200 x 1200 RGB PNG holds 4.32 MB from decoding until preprocessed: room for four.
    const LIMIT: u64 = 18_000_000;
    let server = server(8, 8, |config| config.limits.max_decoding_bytes = LIMIT);
    let client = no_retries(&server).await;
    let memory = server.pipeline.decoding_memory().clone();
    let pixels = crate::common::noise_rgb(7, 1200, 1200);
    let mut png = Vec::new();
    image::RgbImage::from_raw(1200, 1200, pixels)
        .expect("pixels")
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .expect("encode");
    // Watches what the decodes hold from before the first call until the last is answered.
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watching = {
        let (memory, done) = (memory.clone(), Arc::clone(&done));
        std::thread::spawn(move || {
            let mut most = 0;
            while !done.load(std::sync::atomic::Ordering::Acquire) {
                most = most.max(memory.held());
                std::thread::yield_now();
            }
            most
        })
    };
    let calls: Vec<_> = (0..12)
        .map(|_| spawn_detect(&client, encoded(png.clone())))
        .collect();
    let (mut served, mut refused) = (0, 0);
    for call in calls {
        match call.await.expect("the call's task") {
            Ok(_) => served += 1,
            Err(err) => {
                assert_eq!(err.code(), Some(Code::ResourceExhausted), "{err}");
                assert!(err.to_string().contains("--max-decoding-bytes"), "{err}");
                refused += 1;
            }
        }
    }
    done.store(true, std::sync::atomic::Ordering::Release);
    let most = watching.join().expect("the watcher");
    // The first decode always finds room; which others overlap it depends on the scheduler.
    assert!(served >= 1, "{served} served, {refused} refused");
    assert!(most >= 4_320_000, "the decodes held at most {most} bytes");
    assert_eq!(memory.held(), 0, "every call gave its memory back");
}

#[tokio::test]
async fn masks_over_the_pixel_limit_are_invalid_argument() {
    let server = server(4, 4, |config| config.limits.max_mask_pixels = 100);
    let client = no_retries(&server).await;
    let options = |masks| v1::DetectOptions {
        score_threshold: Some(0.0),
        masks,
        ..Default::default()
    };
    let image = || encoded(crate::common::photo("coffee.png"));
    let plain = client
        .detect(image(), options(false), "")
        .await
        .expect("boxes only");
    let found = plain.detections.expect("detections").detections;
    assert!(!found.is_empty(), "every box scores at least 0");
    let err = client
        .detect(image(), options(true), "")
        .await
        .expect_err("masks over 100 pixels");
    assert_eq!(err.code(), Some(Code::InvalidArgument), "{err}");
    assert!(err.to_string().contains("--max-mask-pixels"), "{err}");
}

#[tokio::test]
async fn request_bytes_held_at_once_are_held_to_one_budget_over_all_calls() {
    use tokio_stream::StreamExt;
    let (server, admission, slot) = held_server(MIB as u64, MIB + MIB / 2).await;
    // An 800 KB image fits one message; two do not fit the budget.
    let image = || sized_noise_image(7, 520, 512);
    let client = no_retries(&server).await;
    let waiting = spawn_detect(&client, image());
    // Received in full and waiting for the slot, it still holds its bytes.
    until_queued(&admission, 1).await;
    let refused = client
        .detect(image(), v1::DetectOptions::default(), "")
        .await
        .expect_err("over the budget")
        .status()
        .cloned()
        .expect("a status");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("--max-receiving-bytes"),
        "{refused:?}"
    );
    assert_eq!(pushback(&refused), Some("100"));

    // So does a window upload (a clip of noise, about 820 KB, in one message).
    let noise = "nullsrc=size=176x128:rate=10,geq=random(1)*255:random(1)*255:random(1)*255";
    let clip = crate::common::make_clip(noise, 2.0, "mp4", &["-c:v", "mpeg4", "-q:v", "1"]);
    assert!((780_000..1_000_000).contains(&clip.len()), "{}", clip.len());
    let mut raw = generated_client(&server).await;
    let upload = |clip: Vec<u8>| {
        let options = v1::WindowOptions {
            window_frames: 8,
            ..Default::default()
        };
        tokio_stream::iter([v1::RecognizeActionWindowsRequest {
            options: Some(options),
            chunk: clip.into(),
        }])
    };
    let refused = raw
        .recognize_action_windows(upload(clip.clone()))
        .await
        .expect_err("over the budget");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert_eq!(pushback(&refused), Some("100"));

    // Once the waiting call is answered its bytes go back, and others are received again.
    drop(slot);
    waiting
        .await
        .expect("join")
        .expect("the waiting call is served");
    let responses = raw
        .recognize_action_windows(upload(clip))
        .await
        .expect("received")
        .into_inner();
    let responses = responses
        .collect::<Result<Vec<_>, _>>()
        .await
        .expect("answered");
    assert!(
        responses.last().is_some_and(|r| matches!(
            r.event,
            Some(v1::recognize_action_windows_response::Event::Summary(_))
        )),
        "the stream ends with its summary"
    );
}

#[tokio::test]
async fn a_compressed_request_holds_what_it_may_inflate_to_while_it_waits() {
    let (server, admission, slot) = held_server(MIB as u64, MIB + MIB / 2).await;
    // 18 KB on the wire, which a gzip message of the same size could inflate to 1 MiB: once
    // in, it holds 1 MiB and 18 KB of the 1.5 MiB.
    let image = || noise_image(11);
    let request = move || v1::DetectRequest {
        image: Some(image()),
        ..Default::default()
    };
    let client = no_retries(&server).await;
    let gzip = client
        .raw()
        .send_compressed(CompressionEncoding::Gzip)
        .accept_compressed(CompressionEncoding::Gzip);
    let waiting = {
        let (mut gzip, request) = (gzip.clone(), client.request(request()));
        tokio::spawn(async move { gzip.detect(request).await })
    };
    until_queued(&admission, 1).await;
    let refused = gzip
        .clone()
        .detect(client.request(request()))
        .await
        .expect_err("a second 1 MiB does not fit the budget");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused
            .message()
            .contains("a compressed message counts at the --max-message-bytes it may inflate to"),
        "{refused:?}"
    );
    assert_eq!(pushback(&refused), Some("100"));
    // The same request uncompressed holds what it sends, and fits.
    let plain = spawn_detect(&client, image());
    until_queued(&admission, 2).await;
    drop(slot);
    waiting
        .await
        .expect("join")
        .expect("the compressed call is served");
    plain
        .await
        .expect("join")
        .expect("the plain call is served");
    // Both answered, their bytes are back: a compressed call fits again.
    gzip.clone()
        .detect(client.request(request()))
        .await
        .expect("served");
}

#[tokio::test]
async fn a_compressed_upload_holds_at_most_its_video_while_it_waits() {
    use tokio_stream::StreamExt;
    let (server, admission, slot) = held_server(2 * MIB as u64, 2 * MIB + MIB / 2).await;
    let clip = crate::common::make_clip("testsrc=size=64x64:rate=10", 2.0, "mp4", &[]);
    let mut gzip = generated_client(&server)
        .await
        .send_compressed(CompressionEncoding::Gzip)
        .accept_compressed(CompressionEncoding::Gzip);
    // Three compressed chunks, which may inflate to 1 MiB each.
    let requests: Vec<_> = clip
        .chunks(clip.len() / 3 + 1)
        .enumerate()
        .map(|(i, chunk)| v1::RecognizeActionWindowsRequest {
            options: (i == 0).then(|| v1::WindowOptions {
                window_frames: 8,
                ..Default::default()
            }),
            chunk: chunk.to_vec().into(),
        })
        .collect();
    assert_eq!(requests.len(), 3);
    let upload = tokio::spawn(async move {
        let responses = gzip
            .recognize_action_windows(tokio_stream::iter(requests))
            .await?
            .into_inner();
        responses.collect::<Result<Vec<_>, _>>().await
    });
    until_queued(&admission, 1).await;
    // Uploaded and waiting for the slot, it holds its 2 MiB video and framing, not 3 MiB: the
    // 448 KiB left take a plain Detect but not a compressed one.
    let client = no_retries(&server).await;
    let image = || noise_image(13);
    let refused = client
        .raw()
        .send_compressed(CompressionEncoding::Gzip)
        .detect(client.request(v1::DetectRequest {
            image: Some(image()),
            ..Default::default()
        }))
        .await
        .expect_err("1 MiB more does not fit");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("compressed message counts"),
        "{refused:?}"
    );
    let plain = spawn_detect(&client, image());
    until_queued(&admission, 2).await;
    drop(slot);
    let responses = upload.await.expect("join").expect("the upload is served");
    assert!(
        responses.last().is_some_and(|r| matches!(
            r.event,
            Some(v1::recognize_action_windows_response::Event::Summary(_))
        )),
        "the stream ends with its summary"
    );
    plain
        .await
        .expect("join")
        .expect("the plain call is served");
}

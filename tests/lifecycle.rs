//! Health transitions, reflection and graceful drain on a server of the test's own, so its
//! shutdown does not disturb the shared one.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use polyhead_client::Client;
use polyhead_proto::v1;
use polyhead_server::{Config, Lifecycle, grpc};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::common::{encoded, photo, server};

struct OwnServer {
    addr: SocketAddr,
    lifecycle: Arc<Lifecycle>,
    stop: oneshot::Sender<()>,
    done: JoinHandle<Result<(), tonic::transport::Error>>,
}

/// A server with no pipeline yet: the state of a server whose models are loading.
async fn loading_server(config: &Config) -> OwnServer {
    let lifecycle = Lifecycle::new().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = oneshot::channel::<()>();
    let shutdown = async move {
        let _ = stopped.await;
    };
    let done = tokio::spawn(grpc::serve(
        Arc::clone(&lifecycle),
        config.serve_options(),
        listener,
        shutdown,
    ));
    OwnServer {
        addr,
        lifecycle,
        stop,
        done,
    }
}

async fn health(addr: SocketAddr, service: &str) -> ServingStatus {
    let mut client = HealthClient::new(channel(addr).await);
    let request = HealthCheckRequest {
        service: service.into(),
    };
    let status = client
        .check(request)
        .await
        .expect("health check")
        .into_inner()
        .status;
    ServingStatus::try_from(status).expect("known status")
}

async fn channel(addr: SocketAddr) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect")
}

/// The Open Inference Protocol's own probes: (live, ready).
async fn oip_probes(addr: SocketAddr) -> (bool, bool) {
    use polyhead_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
    use polyhead_proto::inference::{ServerLiveRequest, ServerReadyRequest};
    let mut client = GrpcInferenceServiceClient::new(channel(addr).await);
    let live = client
        .server_live(ServerLiveRequest {})
        .await
        .expect("live")
        .into_inner()
        .live;
    let ready = client
        .server_ready(ServerReadyRequest {})
        .await
        .expect("ready")
        .into_inner()
        .ready;
    (live, ready)
}

async fn client(addr: SocketAddr) -> Client {
    crate::common::connect(addr).await
}

/// Waits for a condition that other tasks make true.
async fn wait_until(mut condition: impl FnMut() -> bool) {
    let started = std::time::Instant::now();
    while !condition() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "condition never became true"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[tokio::test]
async fn health_follows_loading_ready_and_draining() {
    let config = Config::for_models(crate::common::models_dir());
    let own = loading_server(&config).await;
    for service in ["", "polyhead.v1.Polyhead"] {
        assert_eq!(
            health(own.addr, service).await,
            ServingStatus::NotServing,
            "'{service}' while loading"
        );
    }
    let err = client(own.addr)
        .await
        .list_models()
        .await
        .expect_err("not ready");
    assert_eq!(err.code(), Some(Code::Unavailable));
    assert_eq!(
        oip_probes(own.addr).await,
        (true, false),
        "live, not ready while loading"
    );
    own.lifecycle
        .set_ready(Arc::clone(&server().pipeline))
        .await;
    assert_eq!(health(own.addr, "").await, ServingStatus::Serving);
    assert_eq!(
        health(own.addr, "polyhead.v1.Polyhead").await,
        ServingStatus::Serving
    );
    client(own.addr).await.list_models().await.expect("ready");
    assert_eq!(oip_probes(own.addr).await, (true, true));
    own.lifecycle.start_draining().await;
    assert_eq!(health(own.addr, "").await, ServingStatus::NotServing);
    assert_eq!(
        oip_probes(own.addr).await,
        (true, false),
        "not ready while draining"
    );
    own.stop.send(()).expect("stop");
    own.done.await.expect("join").expect("clean stop");
}

/// A request that keeps the server busy for a while: segmenting a large raw image.
fn slow_segment() -> v1::Image {
    let (width, height) = (3000u32, 2000u32);
    let rgb = (0..width * height * 3).map(|i| (i % 251) as u8).collect();
    v1::Image {
        source: Some(v1::image::Source::Raw(v1::RawImage { width, height, rgb })),
    }
}

#[tokio::test]
async fn drain_answers_in_flight_calls_and_refuses_new_ones() {
    let config = Config::for_models(crate::common::models_dir());
    let own = loading_server(&config).await;
    own.lifecycle
        .set_ready(Arc::clone(&server().pipeline))
        .await;
    let early = client(own.addr).await;
    let calls: Vec<_> = (0..3)
        .map(|_| {
            let client = early.clone();
            tokio::spawn(
                async move { client.segment(slow_segment(), Default::default(), "").await },
            )
        })
        .collect();
    let lifecycle = Arc::clone(&own.lifecycle);
    wait_until(|| lifecycle.inflight() == 3).await;
    own.stop.send(()).expect("stop");
    wait_until(|| lifecycle.is_draining()).await;
    let refused = early
        .detect(encoded(photo("coffee.png")), Default::default(), "")
        .await;
    // Answered UNAVAILABLE by the draining server, or refused on the way by the connection it
    // sent a GOAWAY on and then by its closed listener: either way a refusal the client may
    // take elsewhere, never a cancellation.
    assert_eq!(
        refused.expect_err("draining").code(),
        Some(Code::Unavailable)
    );
    for call in calls {
        let response = call.await.expect("join").expect("in-flight call answered");
        assert_eq!(response.segmentation.expect("map").width, 3000);
    }
    own.done.await.expect("join").expect("clean stop");
    assert_eq!(own.lifecycle.inflight(), 0);
}

#[tokio::test]
async fn a_drain_closes_idle_connections_and_the_listener_while_calls_finish() {
    use tokio_stream::StreamExt;
    use v1::polyhead_client::PolyheadClient;
    let config = Config::for_models(crate::common::models_dir());
    let own = loading_server(&config).await;
    own.lifecycle
        .set_ready(Arc::clone(&server().pipeline))
        .await;
    // An idle HTTP/2 connection, opened before the drain.
    let tcp = tokio::net::TcpStream::connect(own.addr)
        .await
        .expect("connect");
    let (_requests, connection) = h2::client::handshake(tcp).await.expect("handshake");
    let idle = tokio::spawn(connection);
    // A call that stays in flight until the test ends its upload.
    let clip = crate::common::make_clip("testsrc=size=160x120:rate=10", 2.0, "mp4", &[]);
    let (half, rest) = clip.split_at(clip.len() / 2);
    let (upload, chunks) = tokio::sync::mpsc::channel(4);
    let message = |options, chunk: &[u8]| v1::RecognizeActionWindowsRequest {
        options,
        chunk: chunk.to_vec().into(),
    };
    let first = v1::WindowOptions {
        window_frames: 8,
        ..Default::default()
    };
    upload
        .send(message(Some(first), half))
        .await
        .expect("first part");
    let mut raw = PolyheadClient::new(channel(own.addr).await);
    let call = tokio::spawn(async move {
        let stream = tokio_stream::wrappers::ReceiverStream::new(chunks);
        let responses = raw.recognize_action_windows(stream).await?.into_inner();
        let responses: Vec<_> = responses.collect().await;
        responses.into_iter().collect::<Result<Vec<_>, _>>()
    });
    let lifecycle = Arc::clone(&own.lifecycle);
    wait_until(|| lifecycle.inflight() == 1).await;

    own.stop.send(()).expect("stop");
    // The idle connection gets a GOAWAY and is closed at once: its client's next call goes to
    // another replica instead of being refused here until the drain ends.
    tokio::time::timeout(Duration::from_secs(20), idle)
        .await
        .expect("the idle connection was closed while a call was in flight")
        .expect("join")
        .ok();
    let refused = tokio::net::TcpStream::connect(own.addr).await;
    assert!(refused.is_err(), "the listener is closed while draining");
    assert_eq!(own.lifecycle.inflight(), 1, "the call is still in flight");

    upload.send(message(None, rest)).await.expect("second part");
    drop(upload);
    let responses = call
        .await
        .expect("join")
        .expect("the in-flight call finishes during the drain");
    let windows = responses
        .iter()
        .filter(|r| {
            matches!(
                r.event,
                Some(v1::recognize_action_windows_response::Event::Window(_))
            )
        })
        .count();
    assert_eq!(windows, 2, "20 frames in windows of 8");
    own.done.await.expect("join").expect("clean stop");
    assert_eq!(own.lifecycle.inflight(), 0);
}

#[tokio::test]
async fn health_and_reflection_take_messages_of_a_few_kib_only() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;

    // Their calls are outside the receive budget, so their messages are held small instead.
    let own = loading_server(&Config::for_models(crate::common::models_dir())).await;
    let long = "x".repeat(grpc::EXEMPT_MESSAGE_BYTES);
    let too_large = |status: tonic::Status| {
        assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
        assert!(status.message().contains("too large"), "{status:?}");
    };
    let mut health_client = HealthClient::new(channel(own.addr).await);
    let request = HealthCheckRequest {
        service: long.clone(),
    };
    too_large(health_client.check(request).await.expect_err("too large"));
    let mut reflection = ServerReflectionClient::new(channel(own.addr).await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::FileContainingSymbol(long)),
    };
    // Refused, or the stream ends unanswered: tonic's reflection service ends its stream when
    // a request fails to decode. A symbol it merely does not know would get a response.
    match reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .map(tonic::Response::into_inner)
    {
        Err(status) => too_large(status),
        Ok(mut responses) => match responses.message().await {
            Err(status) => too_large(status),
            Ok(None) => {}
            Ok(Some(response)) => panic!("answered: {response:?}"),
        },
    }
    assert_eq!(
        health(own.addr, "").await,
        ServingStatus::NotServing,
        "a check of a few bytes is answered"
    );
    own.stop.send(()).expect("stop");
}

#[tokio::test]
async fn reflection_lists_the_services_and_can_be_switched_off() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    async fn list(addr: SocketAddr) -> Result<Vec<String>, tonic::Status> {
        let mut client = ServerReflectionClient::new(channel(addr).await);
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut responses = client
            .server_reflection_info(tokio_stream::iter([request]))
            .await?
            .into_inner();
        let response = responses.message().await?.expect("one response");
        match response.message_response {
            Some(MessageResponse::ListServicesResponse(list)) => {
                Ok(list.service.into_iter().map(|s| s.name).collect())
            }
            other => panic!("unexpected reflection response {other:?}"),
        }
    }

    let mut config = Config::for_models(crate::common::models_dir());
    let own = loading_server(&config).await;
    let services = list(own.addr).await.expect("reflection on");
    for name in ["polyhead.v1.Polyhead", "grpc.health.v1.Health"] {
        assert!(
            services.iter().any(|s| s == name),
            "{name} missing from {services:?}"
        );
    }
    own.stop.send(()).expect("stop");
    config.reflection = false;
    let off = loading_server(&config).await;
    assert_eq!(
        list(off.addr).await.expect_err("reflection off").code(),
        Code::Unimplemented
    );
    off.stop.send(()).expect("stop");
}

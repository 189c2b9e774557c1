//! RecognizeActionWindows streams that stop: a server that stops answering is held to the
//! deadline, one that goes silent is found out by keepalive, one that goes away is UNAVAILABLE.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use polyhead_client::{Client, ClientError, ClientOptions, WindowStream, v1};
use tonic::Code;

use crate::mock::{Received, serve, serve_on};
use crate::proxy::{Link, Proxy};
use crate::{args, polyhead, temp_file, text};

/// Streams a small clip to the mock's `head` and waits for the first window.
async fn first_window(
    addr: SocketAddr,
    head: &str,
    options: ClientOptions,
) -> anyhow::Result<WindowStream> {
    let client = Client::connect(&addr.to_string(), options).await?;
    let options = v1::WindowOptions {
        head: head.to_owned(),
        ..v1::WindowOptions::default()
    };
    let mut stream = client
        .stream_windows(vec![9u8; 3000], options, 1000)
        .await?;
    let first = stream.message().await?;
    assert!(first.is_some_and(|m| m.event.is_some()), "a window");
    Ok(stream)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_refused_for_now_is_uploaded_again_within_the_deadline() -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let received = Received::default();
    serve_on(listener, received.clone());
    let client = Client::connect(&addr.to_string(), ClientOptions::default()).await?;
    let options = v1::WindowOptions {
        head: "flaky 2 unavailable 10".to_owned(),
        ..v1::WindowOptions::default()
    };
    let mut stream = client
        .stream_windows(vec![9u8; 3000], options, 1000)
        .await?;
    let mut last = None;
    while let Some(message) = stream.message().await? {
        last = Some(message);
    }
    let Some(v1::recognize_action_windows_response::Event::Summary(summary)) =
        last.and_then(|m| m.event)
    else {
        panic!("the stream ended without its summary");
    };
    assert_eq!(summary.video_bytes, 3000, "the whole video, uploaded again");
    assert_eq!(
        received
            .window_calls
            .load(std::sync::atomic::Ordering::SeqCst),
        3,
        "two refusals, then the stream"
    );
    let deadlines = received.deadlines();
    assert_eq!(deadlines.len(), 3, "{deadlines:?}");
    assert!(
        deadlines.windows(2).all(|pair| pair[1] < pair[0]),
        "each attempt is sent what is left: {deadlines:?}"
    );

    // With retries off, the first refusal is the answer.
    let once = ClientOptions {
        max_retries: 0,
        ..ClientOptions::default()
    };
    let client = Client::connect(&addr.to_string(), once).await?;
    let options = v1::WindowOptions {
        head: "flaky 4 exhausted 10".to_owned(),
        ..v1::WindowOptions::default()
    };
    let refused = client
        .stream_windows(vec![9u8; 3000], options, 1000)
        .await
        .err();
    assert_eq!(
        refused.and_then(|e| e.code()),
        Some(Code::ResourceExhausted)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_stream_ends_at_the_deadline() -> anyhow::Result<()> {
    let addr = serve().await?;
    let options = ClientOptions {
        timeout: Duration::from_millis(800),
        ..ClientOptions::default()
    };
    let started = Instant::now();
    let mut stream = first_window(addr, "stall", options).await?;
    let err = stream.message().await.err();
    let took = started.elapsed();
    assert!(matches!(err, Some(ClientError::Timeout { .. })), "{err:?}");
    assert!(took < Duration::from_secs(5), "ended after {took:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_after_the_summary_ends_the_stream_as_answered() -> anyhow::Result<()> {
    let addr = serve().await?;
    let options = ClientOptions {
        timeout: Duration::from_millis(800),
        ..ClientOptions::default()
    };
    let mut stream = first_window(addr, "linger", options).await?;
    let mut events = Vec::new();
    while let Some(message) = stream.message().await? {
        events.push(message.event.expect("an event"));
    }
    assert!(
        matches!(
            events.as_slice(),
            [
                v1::recognize_action_windows_response::Event::Window(_),
                v1::recognize_action_windows_response::Event::Summary(_)
            ]
        ),
        "{events:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_finds_a_silent_server() -> anyhow::Result<()> {
    let proxy = Proxy::start(serve().await?).await?;
    let options = ClientOptions {
        timeout: Duration::from_secs(60),
        keep_alive: Duration::from_millis(200),
        ..ClientOptions::default()
    };
    let mut stream = first_window(proxy.addr, "stall", options).await?;
    proxy.set(Link::Frozen);
    let started = Instant::now();
    let err = stream.message().await.err();
    let took = started.elapsed();
    assert_eq!(
        err.as_ref().and_then(ClientError::code),
        Some(Code::Unavailable),
        "{err:?}"
    );
    assert!(took < Duration::from_secs(10), "noticed after {took:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_goes_away_mid_stream_is_unavailable() -> anyhow::Result<()> {
    let proxy = Proxy::start(serve().await?).await?;
    let mut stream = first_window(proxy.addr, "stall", ClientOptions::default()).await?;
    proxy.set(Link::Cut);
    let err = stream.message().await.err();
    assert_eq!(
        err.as_ref().and_then(ClientError::code),
        Some(Code::Unavailable),
        "{err:?}"
    );
    let message = err.map(|e| e.to_string()).unwrap_or_default();
    assert!(
        message.starts_with("server unavailable: connection failed"),
        "{message}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_ends_before_its_summary_is_an_error() -> anyhow::Result<()> {
    let addr = serve().await?;
    let mut stream = first_window(addr, "truncated", ClientOptions::default()).await?;
    let err = stream.message().await.err();
    assert_eq!(
        err.as_ref().and_then(ClientError::code),
        Some(Code::Internal)
    );

    let clip = temp_file("truncated.mp4", &[9u8; 3000])?;
    let clip = clip.to_string_lossy().into_owned();
    let rest = ["video", &clip, "--windows", "--head", "truncated"];
    let output = polyhead(args(addr, &rest)).await?;
    assert_eq!(output.status.code(), Some(1), "{}", text(&output.stderr));
    assert!(text(&output.stdout).contains("window    0"));
    assert_eq!(
        text(&output.stderr),
        "error: internal server error: the server ended the stream before its summary: the \
         windows received are not the whole result\n"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_holds_a_stream_to_its_timeout() -> anyhow::Result<()> {
    let addr = serve().await?;
    let clip = temp_file("stalled.mp4", &[9u8; 3000])?;
    let clip = clip.to_string_lossy().into_owned();
    let rest = [
        "--timeout",
        "1",
        "video",
        &clip,
        "--windows",
        "--head",
        "stall",
    ];
    let started = Instant::now();
    let output = polyhead(args(addr, &rest)).await?;
    let took = started.elapsed();
    assert_eq!(output.status.code(), Some(1), "{}", text(&output.stderr));
    assert!(text(&output.stdout).contains("window    0"));
    assert_eq!(
        text(&output.stderr),
        "error: request timed out after 1s (raise --timeout or POLYHEAD_TIMEOUT)\n"
    );
    assert!(took < Duration::from_secs(10), "ended after {took:?}");
    Ok(())
}

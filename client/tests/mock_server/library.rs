//! Library calls: deadlines, retries and the mapping of statuses to errors.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use polyhead_client::{Client, ClientError, ClientOptions, image_from_bytes, v1};
use tonic::Code;

use crate::mock::{MESSAGE_LIMIT, grpc_timeout, serve, serve_counting};

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
    let label = ok.detections.map(|d| d.detections[0].label.clone());
    let sent = label.as_deref().and_then(grpc_timeout);
    assert!(
        sent.is_some_and(
            |sent| sent <= Duration::from_millis(300) && sent > Duration::from_millis(100)
        ),
        "grpc-timeout header {label:?}: what is left of 300 ms when it is sent"
    );

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
async fn a_request_too_large_is_explained_and_not_retried() -> anyhow::Result<()> {
    let (client, calls) = counting_client(Duration::from_secs(5), 3).await?;
    let found = MESSAGE_LIMIT + 1000;
    let image = image_from_bytes(vec![0u8; found]);
    let err = client
        .detect(image, v1::DetectOptions::default(), "")
        .await
        .err();
    let Some(err) = err else {
        anyhow::bail!("an image over the limit was accepted");
    };
    assert!(err.is_request_too_large(), "{err:?}");
    assert_eq!(err.code(), Some(Code::ResourceExhausted));
    assert_eq!(
        err.to_string(),
        format!(
            "request too large: {found} bytes, over the server's limit of {MESSAGE_LIMIT} bytes \
             per message (its --max-message-bytes); send a smaller input"
        )
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1, "never retried");

    let busy = detect(&client, "busy").await.err();
    assert!(busy.is_some_and(|e| !e.is_request_too_large()));
    Ok(())
}

//! One deadline for a whole command: connecting, its retries and every call share `--timeout`
//! (a [`Deadline`] in the library), so a command that waited for the server to start sends its
//! calls only what is left, ends when it passes, and says so when it passed while connecting.
//!
//! The late servers keep their port closed for [`LATE`], which connecting has to wait out: what
//! a call is sent afterwards, and how long the command took, tell one budget from two.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use polyhead_client::{Client, ClientError, ClientOptions, ClientTls, Deadline};
use tonic::Code;

use crate::connect::{closed_port, late_server};
use crate::mock::Received;
use crate::{args, polyhead, temp_file, text};

/// How long a late server refuses connections: long next to the time the CLI takes to start,
/// which the tests allow half of it.
const LATE: Duration = Duration::from_secs(2);

/// A local address that refuses connections for `delay`, then accepts them and never answers,
/// neither HTTP/2 nor TLS: a server that hangs.
fn late_silent_server(delay: Duration) -> anyhow::Result<SocketAddr> {
    let (socket, addr) = closed_port()?;
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        let listener = socket.listen(64).expect("listen");
        let mut held = Vec::new();
        while let Ok((connection, _)) = listener.accept().await {
            held.push(connection);
        }
    });
    Ok(addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_get_what_connecting_left_of_the_deadline() -> anyhow::Result<()> {
    let budget = Duration::from_secs(20);
    let deadline = Deadline::after(budget);
    let received = Received::default();
    let addr = late_server(LATE, received.clone())?;
    let options = ClientOptions {
        timeout: budget,
        deadline: Some(deadline),
        max_retries: 100,
        ..ClientOptions::default()
    };
    let client = Client::connect(&addr.to_string(), options).await?;
    client.list_models().await?;
    let missing = client.get_model("nope").await.err();
    assert_eq!(missing.and_then(|e| e.code()), Some(Code::NotFound));

    let sent = received.deadlines();
    assert_eq!(sent.len(), 2, "{sent:?}");
    // The server listened LATE after the deadline was set: connecting took that much of it.
    assert!(sent[0] <= budget - LATE, "first call sent {sent:?}");
    assert!(sent[0] > Duration::ZERO);
    assert!(
        sent[1] <= sent[0],
        "the second call got a budget of its own: {sent:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_still_under_way_at_the_deadline_is_deadline_exceeded() -> anyhow::Result<()> {
    let addr = late_silent_server(Duration::ZERO)?;
    // Any CA turns TLS on; a server that never answers the handshake keeps connecting busy.
    let tls = ClientTls {
        ca_cert_pem: b"no certificate".to_vec(),
        client_identity: None,
        domain: None,
    };
    let options = ClientOptions {
        timeout: Duration::from_millis(300),
        tls: Some(tls),
        ..ClientOptions::default()
    };
    let started = Instant::now();
    let err = Client::connect(&addr.to_string(), options.clone())
        .await
        .err();
    let took = started.elapsed();
    let Some(err) = err else {
        anyhow::bail!("connected to a server that never answers");
    };
    assert!(matches!(err, ClientError::ConnectTimeout { .. }), "{err:?}");
    assert_eq!(err.code(), Some(Code::DeadlineExceeded));
    assert_eq!(
        err.to_string(),
        format!(
            "cannot connect to polyhead at https://{addr}: timed out after 0.3s (raise \
             --timeout or POLYHEAD_TIMEOUT)"
        )
    );
    // Well before the attempt's own connect timeout would have ended it.
    assert!(took < options.connect_timeout, "took {took:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_says_when_its_timeout_passed_while_connecting() -> anyhow::Result<()> {
    let addr = late_silent_server(Duration::ZERO)?;
    let ca = temp_file("any-ca.pem", b"no certificate")?;
    let ca = ca.to_string_lossy().into_owned();
    let output = polyhead(args(addr, &["--timeout", "1", "--tls-ca", &ca, "models"])).await?;
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(
        text(&output.stderr),
        format!(
            "error: cannot connect to polyhead at https://{addr}: timed out after 1s (raise \
             --timeout or POLYHEAD_TIMEOUT)\n"
        )
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cli_call_gets_what_connecting_left_of_the_timeout() -> anyhow::Result<()> {
    let budget = Duration::from_secs(4);
    let received = Received::default();
    let addr = late_server(LATE, received.clone())?;
    let image = temp_file("budget.jpg", b"jpeg")?;
    let image = image.to_string_lossy().into_owned();
    let rest = [
        "--timeout",
        "4",
        "--retries",
        "100",
        "detect",
        &image,
        "--head",
        "slow",
    ];
    let started = Instant::now();
    let output = polyhead(args(addr, &rest)).await?;
    let took = started.elapsed();
    assert_eq!(output.status.code(), Some(1), "{}", text(&output.stderr));
    assert_eq!(
        text(&output.stderr),
        "error: request timed out after 4s (raise --timeout or POLYHEAD_TIMEOUT)\n"
    );
    let sent = received.deadlines();
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert!(sent[0] <= budget - LATE / 2, "the call was sent {sent:?}");
    // Waiting for the server and then a whole --timeout for the call would take longer.
    assert!(took < LATE + budget, "took {took:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_retries_of_a_call_share_the_timeout() -> anyhow::Result<()> {
    let budget = Duration::from_secs(20);
    let received = Received::default();
    let addr = late_server(LATE, received.clone())?;
    let image = temp_file("retried.jpg", b"jpeg")?;
    let image = image.to_string_lossy().into_owned();
    let rest = [
        "--timeout",
        "20",
        "--retries",
        "100",
        "detect",
        &image,
        "--head",
        "flaky 2 exhausted 300",
    ];
    let output = polyhead(args(addr, &rest)).await?;
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    let sent = received.deadlines();
    assert_eq!(sent.len(), 3, "two refusals, then success: {sent:?}");
    assert!(
        sent[0] <= budget - LATE / 2,
        "the first call was sent {sent:?}"
    );
    let pushback = Duration::from_millis(300);
    assert!(
        sent.windows(2).all(|pair| pair[1] + pushback <= pair[0]),
        "each retry is sent what is left after the wait: {sent:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cli_stream_gets_what_connecting_left_of_the_timeout() -> anyhow::Result<()> {
    let budget = Duration::from_secs(4);
    let received = Received::default();
    let addr = late_server(LATE, received.clone())?;
    let clip = temp_file("late-stall.mp4", &[9u8; 3000])?;
    let clip = clip.to_string_lossy().into_owned();
    let rest = [
        "--timeout",
        "4",
        "--retries",
        "100",
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
        "error: request timed out after 4s (raise --timeout or POLYHEAD_TIMEOUT)\n"
    );
    let sent = received.deadlines();
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert!(sent[0] <= budget - LATE / 2, "the stream was sent {sent:?}");
    assert!(took < LATE + budget, "took {took:?}");
    Ok(())
}

/// A server that never speaks HTTP/2 ends the command in one timeout error, neither a hang nor
/// a connection error. (Connecting over plain TCP does not wait for the server's HTTP/2
/// settings, so here it is the call that times out; how long it was sent is not observable.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_never_answers_gets_one_timeout() -> anyhow::Result<()> {
    let budget = Duration::from_secs(3);
    let addr = late_silent_server(LATE)?;
    let rest = ["--timeout", "3", "--retries", "100", "models"];
    let started = Instant::now();
    let output = polyhead(args(addr, &rest)).await?;
    let took = started.elapsed();
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(
        text(&output.stderr),
        "error: request timed out after 3s (raise --timeout or POLYHEAD_TIMEOUT)\n"
    );
    assert!(took >= budget, "took {took:?}");
    assert!(took < 2 * (LATE + budget), "took {took:?}");
    Ok(())
}

//! Connecting: a server that is not there yet, one that never comes, TLS settings that cannot
//! be used, and the environment of a shell set up for the server.

use std::net::SocketAddr;
use std::time::Duration;

use polyhead_client::{Client, ClientError, ClientOptions, ClientTls};

use crate::mock::{Received, serve, serve_on};
use crate::{args, polyhead, polyhead_with, temp_file, text};

/// A local address nothing listens on, and a task that starts serving the mock on it after
/// `delay`, keeping what it receives in `received`: a server that is starting.
pub fn late_server(delay: Duration, received: Received) -> anyhow::Result<SocketAddr> {
    let (socket, addr) = closed_port()?;
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        serve_on(socket.listen(64).expect("listen"), received);
    });
    Ok(addr)
}

/// A socket bound to a local port but not listening yet: connecting to it is refused, and no
/// one else can take the port before it listens.
pub fn closed_port() -> anyhow::Result<(tokio::net::TcpSocket, SocketAddr)> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind("127.0.0.1:0".parse()?)?;
    let addr = socket.local_addr()?;
    Ok((socket, addr))
}

#[tokio::test]
async fn cli_reports_an_absent_server() -> anyhow::Result<()> {
    let (_closed, addr) = closed_port()?;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connecting_is_retried_until_the_server_listens() -> anyhow::Result<()> {
    let addr = late_server(Duration::from_millis(300), Received::default())?;
    let options = ClientOptions {
        timeout: Duration::from_secs(20),
        max_retries: 30,
        ..ClientOptions::default()
    };
    let client = Client::connect(&addr.to_string(), options).await?;
    assert_eq!(client.list_models().await?.model_set, "mock");

    let addr = late_server(Duration::from_millis(300), Received::default())?;
    let output = polyhead(args(addr, &["--retries", "30", "models"])).await?;
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    assert!(text(&output.stdout).contains("k400"));
    Ok(())
}

#[tokio::test]
async fn without_retries_a_refused_connection_fails_at_once() -> anyhow::Result<()> {
    let (_closed, addr) = closed_port()?;
    let options = ClientOptions {
        max_retries: 0,
        ..ClientOptions::default()
    };
    let err = Client::connect(&addr.to_string(), options).await.err();
    assert!(matches!(err, Some(ClientError::Connect { .. })), "{err:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_certificate_variables_are_not_the_cli_identity() -> anyhow::Result<()> {
    let addr = serve().await?;
    let cert = temp_file("server.crt", b"-----BEGIN CERTIFICATE-----\n")?;
    let key = temp_file("server.key", b"-----BEGIN PRIVATE KEY-----\n")?;
    let (cert, key) = (cert.to_string_lossy(), key.to_string_lossy());
    let server_env = [("POLYHEAD_TLS_CERT", &*cert), ("POLYHEAD_TLS_KEY", &*key)];
    let output = polyhead_with(args(addr, &["models"]), &server_env).await?;
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    assert!(text(&output.stdout).contains("k400"));

    let client_env = [
        ("POLYHEAD_CLIENT_CERT", &*cert),
        ("POLYHEAD_CLIENT_KEY", &*key),
    ];
    let output = polyhead_with(args(addr, &["models"]), &client_env).await?;
    assert_eq!(output.status.code(), Some(2), "the client's own are read");
    assert!(text(&output.stderr).contains("--tls-ca"));
    Ok(())
}

#[tokio::test]
async fn unusable_tls_settings_say_why() -> anyhow::Result<()> {
    let garbage = temp_file("garbage.pem", b"not a PEM file")?;
    let garbage = garbage.to_string_lossy().into_owned();
    let bad_key = [
        "models",
        "--tls-ca",
        &garbage,
        "--tls-cert",
        &garbage,
        "--tls-key",
        &garbage,
    ];
    let output = polyhead(args("127.0.0.1:1".parse()?, &bad_key)).await?;
    assert_eq!(output.status.code(), Some(1));
    let stderr = text(&output.stderr);
    assert!(
        stderr.starts_with("error: invalid TLS settings: ") && stderr.contains("private key"),
        "{stderr}"
    );
    assert!(!stderr.contains("transport error"), "{stderr}");

    let tls = ClientTls {
        ca_cert_pem: b"not a PEM file".to_vec(),
        client_identity: None,
        domain: Some("bad domain!".into()),
    };
    let options = ClientOptions {
        tls: Some(tls),
        ..ClientOptions::default()
    };
    let err = Client::connect("127.0.0.1:1", options).await.err();
    let Some(ClientError::Tls { .. }) = &err else {
        anyhow::bail!("not a TLS settings error: {err:?}");
    };
    let message = err.map(|e| e.to_string()).unwrap_or_default();
    assert!(message.contains("dns name"), "{message}");
    Ok(())
}

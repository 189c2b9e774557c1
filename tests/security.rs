//! TLS, mutual TLS and bearer tokens on servers of the tests' own, with certificates made at
//! test time: a CA, a server certificate for `localhost` and 127.0.0.1, and client certificates
//! signed by that CA and by another one.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use polyhead_client::{Client, ClientError, ClientOptions, ClientTls};
use polyhead_server::security::SecurityConfig;
use polyhead_server::{Config, Lifecycle, grpc};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, ExtendedKeyUsagePurpose, IsCa, KeyPair,
};
use tokio::sync::oneshot;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::common::server;

/// A certificate and its private key, in PEM.
struct Pem {
    cert: String,
    key: String,
}

/// A certificate authority that signs leaf certificates.
struct Authority(CertifiedIssuer<'static, KeyPair>);

impl Authority {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let key = KeyPair::generate().expect("CA key");
        Self(CertifiedIssuer::self_signed(params, key).expect("CA certificate"))
    }

    fn pem(&self) -> String {
        self.0.pem()
    }

    fn sign(&self, names: &[&str], usage: ExtendedKeyUsagePurpose) -> Pem {
        let names = names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>();
        let mut params = CertificateParams::new(names).expect("leaf params");
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &self.0).expect("leaf certificate");
        Pem {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }
}

/// Every certificate the tests use, written where a server can read them.
struct Pki {
    dir: tempfile::TempDir,
    ca: String,
    other_ca: String,
    client: Pem,
    stranger: Pem,
}

impl Pki {
    fn new() -> Self {
        let ca = Authority::new("polyhead test CA");
        let other = Authority::new("another CA");
        let server = ca.sign(
            &["localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let dir = tempfile::tempdir().expect("temp dir");
        for (name, text) in [
            ("ca.pem", ca.pem()),
            ("server.pem", server.cert.clone()),
            ("server.key", server.key.clone()),
            (
                "other-server.key",
                other.sign(&["x"], ExtendedKeyUsagePurpose::ServerAuth).key,
            ),
        ] {
            std::fs::write(dir.path().join(name), text).expect("write PEM");
        }
        Self {
            ca: ca.pem(),
            other_ca: other.pem(),
            client: ca.sign(&["client"], ExtendedKeyUsagePurpose::ClientAuth),
            stranger: other.sign(&["client"], ExtendedKeyUsagePurpose::ClientAuth),
            dir,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Serving TLS with the server certificate; clients must present one of ours with `mutual`.
    fn server_tls(&self, mutual: bool) -> SecurityConfig {
        SecurityConfig {
            tls_cert: Some(self.path("server.pem")),
            tls_key: Some(self.path("server.key")),
            tls_client_ca: mutual.then(|| self.path("ca.pem")),
            ..SecurityConfig::default()
        }
    }

    /// Client TLS trusting `ca`, presenting `identity`.
    fn client_tls(&self, ca: &str, identity: Option<&Pem>) -> ClientTls {
        ClientTls {
            ca_cert_pem: ca.as_bytes().to_vec(),
            client_identity: identity
                .map(|p| (p.cert.clone().into_bytes(), p.key.clone().into_bytes())),
            domain: None,
        }
    }
}

/// A ready server with `security`, stopped when dropped.
struct SecuredServer {
    addr: SocketAddr,
    _stop: oneshot::Sender<()>,
}

async fn start(security: &SecurityConfig) -> SecuredServer {
    let security = security.load().expect("valid security settings");
    let config = Config::for_models(crate::common::models_dir());
    let lifecycle = Lifecycle::new().await;
    lifecycle.set_ready(Arc::clone(&server().pipeline)).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = oneshot::channel::<()>();
    let shutdown = async move {
        let _ = stopped.await;
    };
    tokio::spawn(grpc::serve_secured(
        lifecycle,
        config.serve_options(),
        security,
        listener,
        shutdown,
    ));
    SecuredServer { addr, _stop: stop }
}

fn options(tls: Option<ClientTls>, token: Option<&str>) -> ClientOptions {
    ClientOptions {
        timeout: Duration::from_secs(10),
        tls,
        token: token.map(str::to_owned),
        ..ClientOptions::default()
    }
}

/// Lists the models: connecting and one call.
async fn call(addr: &str, options: ClientOptions) -> Result<(), ClientError> {
    Client::connect(addr, options).await?.list_models().await?;
    Ok(())
}

/// A call that must fail at the transport: no connection, or UNAVAILABLE; its message.
async fn refused_transport(addr: &str, options: ClientOptions) -> String {
    let err = call(addr, options).await.expect_err("refused");
    assert_eq!(err.code(), Some(Code::Unavailable), "{err}");
    err.to_string()
}

#[tokio::test]
async fn tokens_guard_every_call_but_health() {
    let pki = Pki::new();
    let tokens = pki.path("tokens");
    std::fs::write(&tokens, "alpha\nbeta\n").expect("write tokens");
    let own = start(&SecurityConfig {
        auth_token_file: Some(tokens),
        ..SecurityConfig::default()
    })
    .await;
    let addr = own.addr.to_string();
    for token in [None, Some("gamma"), Some("alph"), Some("alphaa")] {
        let err = call(&addr, options(None, token))
            .await
            .expect_err("refused");
        assert_eq!(err.code(), Some(Code::Unauthenticated), "{token:?}: {err}");
        assert_eq!(
            err.to_string(),
            "the server refused the credentials: missing or invalid bearer token"
        );
    }
    call(&addr, options(None, Some("beta")))
        .await
        .expect("valid token");
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let health = HealthClient::new(channel.clone())
        .check(HealthCheckRequest::default())
        .await
        .expect("health needs no token")
        .into_inner();
    assert_eq!(health.status, ServingStatus::Serving as i32);
    use polyhead_proto::inference::ServerLiveRequest;
    use polyhead_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
    let oip = GrpcInferenceServiceClient::new(channel)
        .server_live(ServerLiveRequest {})
        .await
        .expect_err("the inference protocol needs a token too");
    assert_eq!(oip.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn tls_serves_clients_that_trust_its_ca() {
    let pki = Pki::new();
    let own = start(&pki.server_tls(false)).await;
    let port = own.addr.port();
    refused_transport(&format!("http://127.0.0.1:{port}"), options(None, None)).await;
    let trusted = pki.client_tls(&pki.ca, None);
    call(
        &format!("127.0.0.1:{port}"),
        options(Some(trusted.clone()), None),
    )
    .await
    .expect("TLS by IP address");
    let by_name = ClientTls {
        domain: Some("localhost".into()),
        ..trusted
    };
    call(
        &format!("https://localhost:{port}"),
        options(Some(by_name), None),
    )
    .await
    .expect("TLS by name");
    let untrusted = pki.client_tls(&pki.other_ca, None);
    let err = refused_transport(&format!("127.0.0.1:{port}"), options(Some(untrusted), None)).await;
    assert!(
        err.contains("UnknownIssuer") && err.contains("--tls-ca"),
        "{err}"
    );
}

#[tokio::test]
async fn mutual_tls_requires_a_client_certificate_from_its_ca() {
    let pki = Pki::new();
    let own = start(&pki.server_tls(true)).await;
    let addr = format!("127.0.0.1:{}", own.addr.port());
    let err = refused_transport(&addr, options(Some(pki.client_tls(&pki.ca, None)), None)).await;
    assert!(err.contains("CertificateRequired"), "{err}");
    let stranger = pki.client_tls(&pki.ca, Some(&pki.stranger));
    let err = refused_transport(&addr, options(Some(stranger), None)).await;
    assert!(err.contains("UnknownCA"), "{err}");
    let client = pki.client_tls(&pki.ca, Some(&pki.client));
    call(&addr, options(Some(client), None))
        .await
        .expect("a client certificate from the CA");
}

#[tokio::test]
async fn mutual_tls_and_tokens_combine() {
    let pki = Pki::new();
    let own = start(&SecurityConfig {
        auth_token: Some("s3cret".into()),
        ..pki.server_tls(true)
    })
    .await;
    let addr = format!("127.0.0.1:{}", own.addr.port());
    let tls = pki.client_tls(&pki.ca, Some(&pki.client));
    let err = call(&addr, options(Some(tls.clone()), None))
        .await
        .expect_err("no token");
    assert_eq!(err.code(), Some(Code::Unauthenticated));
    call(&addr, options(Some(tls), Some("s3cret")))
        .await
        .expect("certificate and token");
}

#[tokio::test]
async fn bad_security_files_stop_the_server_by_name() {
    let pki = Pki::new();
    let missing = pki.path("missing.pem");
    let mismatched = SecurityConfig {
        tls_key: Some(pki.path("other-server.key")),
        ..pki.server_tls(false)
    };
    let unreadable = SecurityConfig {
        tls_client_ca: Some(missing.clone()),
        ..pki.server_tls(false)
    };
    for (security, names) in [
        (&unreadable, vec![missing.clone()]),
        (
            &mismatched,
            vec![pki.path("server.pem"), pki.path("other-server.key")],
        ),
    ] {
        let mut config = Config::for_models(crate::common::models_dir());
        config.security = security.clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let pipeline = Arc::clone(&server().pipeline);
        let err = polyhead_server::serve_loaded(&config, pipeline, listener, async {})
            .await
            .expect_err("refused to start")
            .to_string();
        for name in names {
            assert!(err.contains(&display(&name)), "{err}");
        }
    }
}

fn display(path: &Path) -> String {
    path.display().to_string()
}

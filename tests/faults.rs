//! Fault injection: an engine error or a panic in a head's session, in the backbone's session
//! or in a head's post-processing fails that request alone, with INTERNAL and its request id in
//! the message, and the next request on the same connection succeeds with the same results.
//!
//! Failpoints are process-wide and every test of this binary shares the process, so each test
//! here serves its own copy of the model set whose models carry a prefix of their own, and
//! configures only the failpoints named after those models: the shared server never meets one.

use std::net::SocketAddr;
use std::path::Path;

use polyhead_client::{Client, ClientError};
use polyhead_proto::v1;
use polyhead_server::Config;
use tempfile::TempDir;
use tonic::Code;

use crate::common::{connect, encoded, models_dir, photo, start_server};

/// A server of its own on a renamed copy of the model set, and one connection to it.
struct FaultServer {
    addr: SocketAddr,
    client: Client,
    prefix: &'static str,
    /// Holds the renamed model set for as long as the server runs.
    _models: TempDir,
}

impl FaultServer {
    /// Serves the model set with every model renamed `<prefix>-<name>`.
    async fn start(prefix: &'static str) -> Self {
        let models = renamed_set(prefix);
        let mut config = Config::for_models(models.path());
        // Off, so that every request runs the backbone and meets its failpoint.
        config.cache.cache_bytes = 0;
        let server = tokio::task::spawn_blocking(move || start_server(config))
            .await
            .expect("start the fault server");
        Self {
            addr: server.addr,
            client: connect(server.addr).await,
            prefix,
            _models: models,
        }
    }

    /// The served name of the model called `name` in the original set.
    fn model(&self, name: &str) -> String {
        format!("{}-{name}", self.prefix)
    }

    async fn detect(&self) -> Result<v1::DetectResponse, ClientError> {
        let image = encoded(photo("coffee.png"));
        self.client.detect(image, Default::default(), "").await
    }

    async fn analyze(&self) -> Result<v1::AnalyzeResponse, ClientError> {
        let image = encoded(photo("coffee.png"));
        let heads = vec![self.model("detection"), self.model("segmentation")];
        let options = Default::default();
        self.client
            .analyze(image, heads, options, Default::default())
            .await
    }
}

/// A copy of the model set (files linked, manifest rewritten) whose backbone and heads are
/// named `<prefix>-<name>`.
fn renamed_set(prefix: &str) -> TempDir {
    let source = models_dir();
    let dir = tempfile::tempdir().expect("tempdir");
    for entry in std::fs::read_dir(&source).expect("read the model set") {
        let entry = entry.expect("model set entry");
        if entry.file_name() != "polyhead.toml" {
            std::os::unix::fs::symlink(entry.path(), dir.path().join(entry.file_name()))
                .expect("link a model file");
        }
    }
    let text = std::fs::read_to_string(source.join("polyhead.toml")).expect("read the manifest");
    let mut manifest: toml::Table = text.parse().expect("parse the manifest");
    let backbone = manifest["backbone"].as_table_mut().expect("[backbone]");
    let name = backbone
        .get("name")
        .and_then(|n| n.as_str())
        .unwrap_or("backbone");
    let renamed = format!("{prefix}-{name}");
    backbone.insert("name".into(), renamed.into());
    let heads = manifest["heads"].as_array_mut().expect("[[heads]]");
    for head in heads {
        let head = head.as_table_mut().expect("a head is a table");
        let name = head["name"].as_str().expect("a head's name");
        let renamed = format!("{prefix}-{name}");
        head.insert("name".into(), renamed.into());
    }
    write(&dir.path().join("polyhead.toml"), &manifest.to_string());
    dir
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

/// Makes the next evaluation of `failpoint` do `action` (fail's syntax), then nothing.
fn inject_once(failpoint: &str, action: &str) {
    fail::cfg(failpoint, &format!("1*{action}"))
        .unwrap_or_else(|e| panic!("configure {failpoint}: {e}"));
}

/// Asserts the faulty call failed with INTERNAL, naming its request id and `cause`.
fn assert_internal<T: std::fmt::Debug>(result: Result<T, ClientError>, cause: &str) {
    let error = result.expect_err("the faulty call fails");
    let status = error
        .status()
        .unwrap_or_else(|| panic!("a status: {error}"));
    assert_eq!(status.code(), Code::Internal, "{}", status.message());
    let message = status.message();
    assert!(message.contains("request id"), "{message}");
    assert!(message.contains(cause), "'{message}' should say '{cause}'");
}

/// The faults of one model or stage: the failpoint, its action and what the status then says.
fn faults(failpoint: &str) -> [(String, &'static str, &'static str); 2] {
    [
        (
            failpoint.to_owned(),
            "return(injected run error)",
            "injected run error",
        ),
        (failpoint.to_owned(), "panic(injected panic)", "panicked"),
    ]
}

#[tokio::test]
async fn head_faults_fail_only_their_request() {
    let server = FaultServer::start("faulty-heads").await;
    let head = server.model("detection");
    let mut cases = faults(&format!("session-run/{head}")).to_vec();
    cases.push((
        format!("postprocess/{head}"),
        "panic(injected post-processing panic)",
        "panicked",
    ));
    detect_through_faults(&server, cases).await;
}

#[tokio::test]
async fn backbone_faults_fail_only_their_request() {
    let server = FaultServer::start("faulty-backbone").await;
    let backbone = server.model("backbone");
    let cases = faults(&format!("session-run/{backbone}")).to_vec();
    detect_through_faults(&server, cases).await;
}

/// For each fault, on the one connection: the faulty Detect is INTERNAL, the next one
/// returns what a Detect before any fault did.
async fn detect_through_faults(server: &FaultServer, cases: Vec<(String, &str, &str)>) {
    let baseline = server.detect().await.expect("the baseline detection");
    for (failpoint, action, cause) in cases {
        inject_once(&failpoint, action);
        assert_internal(server.detect().await, cause);
        let next = server
            .detect()
            .await
            .unwrap_or_else(|e| panic!("the call after {failpoint} {action}: {e}"));
        assert_eq!(next.detections, baseline.detections, "after {action}");
        fail::remove(&failpoint);
    }
}

#[tokio::test]
async fn analyze_with_one_faulty_head_is_internal() {
    let server = FaultServer::start("faulty-analyze").await;
    let baseline = server.analyze().await.expect("the baseline analysis");
    assert_eq!(baseline.results.len(), 2);
    let segmentation = server.model("segmentation");
    let detection = server.model("detection");
    let cases = [
        (
            format!("session-run/{segmentation}"),
            "return(injected run error)",
            "injected run error",
        ),
        (
            format!("postprocess/{detection}"),
            "panic(injected panic)",
            "panicked",
        ),
    ];
    for (failpoint, action, cause) in cases {
        inject_once(&failpoint, action);
        assert_internal(server.analyze().await, cause);
        let next = server
            .analyze()
            .await
            .unwrap_or_else(|e| panic!("the call after {failpoint} {action}: {e}"));
        assert_eq!(next.results, baseline.results, "after {action}");
        fail::remove(&failpoint);
    }
    connect(server.addr)
        .await
        .detect(encoded(photo("rocket.jpg")), Default::default(), "")
        .await
        .expect("the server keeps serving new connections");
}

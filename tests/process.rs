//! The real `polyhead-server` binary as a child process on free loopback ports, for the checks
//! that need a process of their own (the metrics recorder and the tracing subscriber are
//! process-wide), and the one helper that waits for a condition by polling it.

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tempfile::NamedTempFile;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::common::{models_dir, root};

/// How long the binary may take to load the models and report SERVING.
const START: Duration = Duration::from_secs(60);

/// How long the binary may take to drain, flush its traces and exit after SIGTERM.
const STOP: Duration = Duration::from_secs(30);

/// The pause between two looks at a condition.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// A running `polyhead-server`; dropping it kills the process, and a failing test prints its log.
pub struct ServerProcess {
    child: Child,
    pub addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    log: NamedTempFile,
}

impl ServerProcess {
    /// Starts the binary on the test model set, its feature cache off, with `env` added to its
    /// environment, and waits until its health service reports SERVING.
    pub async fn start(env: &[(&str, &str)]) -> Self {
        Self::start_without(env, &[]).await
    }

    /// [`ServerProcess::start`] with the variables `unset` removed from its environment.
    pub async fn start_without(env: &[(&str, &str)], unset: &[&str]) -> Self {
        let binary = binary();
        let (addr, metrics_addr) = (free_port(), free_port());
        let log = NamedTempFile::new().expect("a file for the server's log");
        let mut command = Command::new(&binary);
        command
            .current_dir(root())
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--metrics-listen")
            .arg(metrics_addr.to_string())
            .arg("--models")
            .arg(models_dir())
            .env("POLYHEAD_LOG", "info,ort=warn")
            // As on the shared server: every image request runs the backbone.
            .env("POLYHEAD_CACHE_BYTES", "0")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .envs(env.iter().copied());
        for name in unset {
            command.env_remove(name);
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(shared(log.as_file()))
            .stderr(shared(log.as_file()))
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", binary.display()));
        let mut server = Self {
            child,
            addr,
            metrics_addr,
            log,
        };
        server.wait_serving().await;
        server
    }

    async fn wait_serving(&mut self) {
        let addr = self.addr;
        poll("polyhead-server to report SERVING", START, async || {
            if let Some(status) = self.child.try_wait().expect("the server's status") {
                panic!("polyhead-server exited with {status} before serving");
            }
            (health(addr).await == Some(ServingStatus::Serving)).then_some(())
        })
        .await;
    }

    /// Sends SIGTERM and waits until the server has drained, flushed its telemetry and exited.
    pub async fn terminate(&mut self) -> ExitStatus {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -TERM {pid}");
        poll("polyhead-server to exit", STOP, async || {
            self.child.try_wait().expect("the server's status")
        })
        .await
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        // Only a test that failed before stopping the server leaves it running; nothing more can
        // be done here when killing or reaping it fails.
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.log.path())
                .unwrap_or_else(|e| format!("(unreadable: {e})"));
            eprintln!("polyhead-server log:\n{log}");
        }
    }
}

/// Asks `probe` again every few milliseconds until it answers; fails after `within`.
pub async fn poll<T>(what: &str, within: Duration, mut probe: impl AsyncFnMut() -> Option<T>) -> T {
    let started = Instant::now();
    loop {
        if let Some(answer) = probe().await {
            return answer;
        }
        assert!(started.elapsed() < within, "waited {within:?} for {what}");
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// `target/<profile>/polyhead-server`, beside the `deps/` folder that holds this test binary.
fn binary() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let name = format!("polyhead-server{}", std::env::consts::EXE_SUFFIX);
    let binary = exe
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join(name))
        .expect("the test binary lies in target/<profile>/deps");
    assert!(
        binary.is_file(),
        "{} is missing: build it first with `cargo build --release -p polyhead-server` \
         (`make test` does)",
        binary.display()
    );
    binary
}

/// A loopback address with a port that was free a moment ago.
fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free loopback port")
}

/// Another handle on `file`, sharing its write position, so that stdout and stderr interleave.
fn shared(file: &File) -> Stdio {
    Stdio::from(file.try_clone().expect("share the log file"))
}

/// The server's overall health, or `None` while it cannot be asked.
async fn health(addr: SocketAddr) -> Option<ServingStatus> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .ok()?;
    let request = HealthCheckRequest {
        service: String::new(),
    };
    let response = HealthClient::new(channel).check(request).await.ok()?;
    ServingStatus::try_from(response.into_inner().status).ok()
}

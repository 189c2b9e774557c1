//! The real `polyhead-server` binary as a child process on free loopback ports: started with
//! the benchmark's thread and cache settings, ready once its health service says SERVING,
//! scraped over its Prometheus endpoint, and stopped with SIGTERM.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

/// How long loading and warming up a model set may take.
const START: Duration = Duration::from_secs(300);

/// What the server is started with.
#[derive(Debug, Clone)]
pub struct ServerSpec {
    pub binary: PathBuf,
    pub models: PathBuf,
    pub intra_threads: usize,
    pub cache_bytes: u64,
    /// `--feature-placement`: `device` (the default) or `host`.
    pub placement: &'static str,
    /// `--intra-op-spinning`: ONNX Runtime threads spin while they wait.
    pub spinning: bool,
    /// Where its log goes.
    pub log: PathBuf,
}

/// A running server; dropping it kills the process.
pub struct Server {
    child: Child,
    pub addr: SocketAddr,
    metrics_addr: SocketAddr,
}

impl Server {
    /// Starts the server and waits until it reports SERVING. A port found free can be taken
    /// before the server binds it (by an outgoing connection's local port): the server is then
    /// started again on other ports, up to three times in all.
    pub async fn start(spec: &ServerSpec) -> Result<Self> {
        let mut attempt = 1;
        loop {
            match Self::start_once(spec).await {
                Err(e) if attempt < 3 && port_taken(&spec.log) => {
                    eprintln!("bench: {e}; starting it on other ports");
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    async fn start_once(spec: &ServerSpec) -> Result<Self> {
        let (addr, metrics_addr) = (free_port()?, free_port()?);
        let log =
            File::create(&spec.log).with_context(|| format!("create {}", spec.log.display()))?;
        let child = Command::new(&spec.binary)
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--metrics-listen")
            .arg(metrics_addr.to_string())
            .arg("--models")
            .arg(&spec.models)
            .arg("--intra-threads")
            .arg(spec.intra_threads.to_string())
            .arg("--cache-bytes")
            .arg(spec.cache_bytes.to_string())
            .arg("--feature-placement")
            .arg(spec.placement)
            .args(spec.spinning.then_some("--intra-op-spinning"))
            .env("POLYHEAD_LOG", "warn,ort=warn")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("start {}", spec.binary.display()))?;
        let mut server = Self {
            child,
            addr,
            metrics_addr,
        };
        server.wait_serving(&spec.log).await?;
        Ok(server)
    }

    async fn wait_serving(&mut self, log: &Path) -> Result<()> {
        let started = Instant::now();
        while started.elapsed() < START {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "polyhead-server exited with {status}; see {}",
                    log.display()
                );
            }
            if health(self.addr).await == Some(ServingStatus::Serving) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!(
            "polyhead-server not SERVING after {START:?}; see {}",
            log.display()
        )
    }

    /// The process id, for its memory figures.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `polyhead_backbone_passes_total` from the server's `/metrics` (0 if absent).
    pub fn backbone_passes(&self) -> Result<f64> {
        self.metric("polyhead_backbone_passes_total")
    }

    /// Metric `name` from the server's `/metrics`, summed over its label sets (0 if absent).
    pub fn metric(&self, name: &str) -> Result<f64> {
        let text = http_get(self.metrics_addr, "/metrics")?;
        Ok(metric_sum(&text, name))
    }

    /// Sends SIGTERM and waits for the process to exit (killing it after 30 s).
    pub async fn stop(mut self) -> Result<()> {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status()?;
        let started = Instant::now();
        while self.child.try_wait()?.is_none() {
            if started.elapsed() > Duration::from_secs(30) {
                self.child.kill()?;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Only an error path leaves the server running here; nothing more can be done if this fails.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether the server's log says a port it was given was in use.
fn port_taken(log: &Path) -> bool {
    std::fs::read_to_string(log).is_ok_and(|text| text.contains("Address already in use"))
}

/// A loopback address nobody listens on right now.
fn free_port() -> Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

async fn health(addr: SocketAddr) -> Option<ServingStatus> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .ok()?
        .connect()
        .await
        .ok()?;
    let request = HealthCheckRequest {
        service: String::new(),
    };
    let response = HealthClient::new(channel).check(request).await.ok()?;
    ServingStatus::try_from(response.into_inner().status).ok()
}

/// A plain HTTP/1.0 GET, enough for the Prometheus exposition endpoint.
fn http_get(addr: SocketAddr, path: &str) -> Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("a malformed HTTP response from /metrics")?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        bail!("GET {path}: {}", head.lines().next().unwrap_or_default());
    }
    Ok(body.to_owned())
}

/// The sum of every sample of metric `name` (all label sets) in Prometheus text format.
fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with([' ', '{']))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_a_metric_over_its_labels() {
        let text = "# TYPE polyhead_backbone_passes_total counter\n\
                    polyhead_backbone_passes_total 12\n\
                    polyhead_backbone_passes_total_other 99\n\
                    polyhead_x{a=\"b\"} 5\n\
                    polyhead_x{a=\"c\"} 2.5\n";
        assert_eq!(metric_sum(text, "polyhead_backbone_passes_total"), 12.0);
        assert_eq!(metric_sum(text, "polyhead_x"), 7.5);
        assert_eq!(metric_sum(text, "absent"), 0.0);
    }
}

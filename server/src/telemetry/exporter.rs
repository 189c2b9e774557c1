//! The Prometheus side: the process-wide recorder (installed once) and the small HTTP server that
//! answers `GET /metrics` with the text exposition format on its own port.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::{TcpListener, TcpStream};

use super::TelemetryError;
use super::metrics::{BATCH_SIZE_BUCKETS, LATENCY_BUCKETS, describe};

/// How often histogram samples are folded into their buckets between scrapes.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Pause after a failed `accept` (e.g. out of file descriptors) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The text exposition format's content type.
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The content type of the error answers.
const PLAIN: &str = "text/plain; charset=utf-8";

/// The process's Prometheus recorder, installed on the first call; later calls return the same
/// handle. Fails when another `metrics` recorder was installed first.
pub fn recorder() -> Result<PrometheusHandle, TelemetryError> {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    static INIT: Mutex<()> = Mutex::new(());
    let _serialised = INIT.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(handle) = HANDLE.get() {
        return Ok(handle.clone());
    }
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &LATENCY_BUCKETS)
        .and_then(|b| {
            b.set_buckets_for_metric(Matcher::Suffix("_size".into()), &BATCH_SIZE_BUCKETS)
        })
        .and_then(PrometheusBuilder::install_recorder)
        .map_err(|e| TelemetryError::Recorder(e.to_string()))?;
    describe();
    Ok(HANDLE.get_or_init(|| handle).clone())
}

/// Installs the recorder, binds `address` and serves `/metrics` there in the background.
/// Returns the bound address (useful when `address` has port 0).
pub(super) async fn start(address: SocketAddr) -> Result<SocketAddr, TelemetryError> {
    let handle = recorder()?;
    let listen_error = |source| TelemetryError::Listen { address, source };
    let listener = TcpListener::bind(address).await.map_err(listen_error)?;
    let bound = listener.local_addr().map_err(listen_error)?;
    tokio::spawn(serve_metrics(listener, handle));
    Ok(bound)
}

/// Serves `GET /metrics` from `handle` on `listener` until the task is dropped, and keeps the
/// histograms folded between scrapes.
pub async fn serve_metrics(listener: TcpListener, handle: PrometheusHandle) {
    let upkeep = handle.clone();
    let _upkeep = AbortOnDrop(tokio::spawn(async move {
        let mut ticks = tokio::time::interval(UPKEEP_INTERVAL);
        loop {
            ticks.tick().await;
            upkeep.run_upkeep();
        }
    }));
    loop {
        match listener.accept().await {
            Ok((stream, _)) => serve_connection(stream, handle.clone()),
            Err(e) => {
                tracing::warn!("metrics endpoint: accept failed: {e}");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

/// Stops a background task when its owner goes.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn serve_connection(stream: TcpStream, handle: PrometheusHandle) {
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let response = respond(&handle, request.method(), request.uri().path());
        async move { Ok::<_, Infallible>(response) }
    });
    tokio::spawn(async move {
        let connection = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(stream), service);
        if let Err(e) = connection.await {
            tracing::debug!("metrics endpoint: connection ended: {e}");
        }
    });
}

/// The answer to one request: the metrics, or why not.
fn respond(handle: &PrometheusHandle, method: &Method, path: &str) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match (method, path) {
        (&Method::GET | &Method::HEAD, "/metrics") => {
            (StatusCode::OK, CONTENT_TYPE, handle.render())
        }
        (_, "/metrics") => (StatusCode::METHOD_NOT_ALLOWED, PLAIN, "use GET\n".into()),
        _ => (
            StatusCode::NOT_FOUND,
            PLAIN,
            "metrics are at /metrics\n".into(),
        ),
    };
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("a static status and header: this is a bug")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handle() -> PrometheusHandle {
        PrometheusBuilder::new().build_recorder().handle()
    }

    #[test]
    fn only_get_metrics_is_answered() {
        let handle = handle();
        assert_eq!(
            respond(&handle, &Method::GET, "/metrics").status(),
            StatusCode::OK
        );
        assert_eq!(
            respond(&handle, &Method::POST, "/metrics").status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert_eq!(
            respond(&handle, &Method::GET, "/").status(),
            StatusCode::NOT_FOUND
        );
    }

    #[test]
    fn metrics_are_served_as_the_text_format() {
        let response = respond(&handle(), &Method::GET, "/metrics");
        let content_type = response.headers()[header::CONTENT_TYPE].to_str();
        assert_eq!(content_type.expect("ascii"), CONTENT_TYPE);
    }
}

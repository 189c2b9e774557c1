//! A tower layer around the whole gRPC server that counts and times every call of every
//! service: `grpc_server_started_total`, `grpc_server_handled_total{grpc_code}`,
//! `grpc_server_handling_seconds` and `polyhead_inflight_requests`.
//!
//! The status code is read where gRPC puts it: the `grpc-status` header of a trailers-only
//! response (every error, including those tonic produces itself, such as UNIMPLEMENTED) or the
//! trailers at the end of the body. A call whose response is dropped before it ends counts as
//! CANCELLED.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Instant;

use ::metrics::{SharedString, counter, histogram};
use http::{HeaderMap, Request, Response};
use http_body::{Body, Frame, SizeHint};
use tonic::Code;
use tower::{Layer, Service};

use super::metrics::{GRPC_HANDLED, GRPC_HANDLING, GRPC_STARTED, add_inflight};

/// Most distinct `(service, method)` label pairs; later ones are counted under [`OTHER`]. The
/// path of a call is whatever the caller sent, so without a bound unknown methods could grow the
/// series without end.
const MAX_METHODS: usize = 256;

/// The label of calls beyond [`MAX_METHODS`] and of paths that are not `/<service>/<method>`.
const OTHER: &str = "_other";

/// The layer that records the gRPC metrics of every call of the server it wraps.
pub fn grpc_metrics_layer() -> GrpcMetricsLayer {
    GrpcMetricsLayer::default()
}

/// See [`grpc_metrics_layer`].
#[derive(Debug, Clone, Default)]
pub struct GrpcMetricsLayer {
    methods: Arc<MethodLabels>,
}

impl<S> Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetrics {
            inner,
            methods: Arc::clone(&self.methods),
        }
    }
}

/// The service [`GrpcMetricsLayer`] wraps around the server.
#[derive(Debug, Clone)]
pub struct GrpcMetrics<S> {
    inner: S,
    methods: Arc<MethodLabels>,
}

impl<S, B, R> Service<Request<B>> for GrpcMetrics<S>
where
    S: Service<Request<B>, Response = Response<R>>,
{
    type Response = Response<MeteredBody<R>>;
    type Error = S::Error;
    type Future = MeteredFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let call = Call::start(self.methods.get(request.uri().path()));
        MeteredFuture {
            inner: self.inner.call(request),
            call: Some(call),
        }
    }
}

/// The `grpc_service` and `grpc_method` labels of one method.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Method {
    service: Arc<str>,
    method: Arc<str>,
}

/// Label pairs seen so far, bounded by [`MAX_METHODS`].
#[derive(Debug, Default)]
struct MethodLabels {
    seen: Mutex<HashMap<String, Method>>,
}

impl MethodLabels {
    /// The labels of the call to `path`.
    fn get(&self, path: &str) -> Method {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(method) = seen.get(path) {
            return method.clone();
        }
        let method = match split_path(path) {
            Some((service, method)) if seen.len() < MAX_METHODS => Method {
                service: service.into(),
                method: method.into(),
            },
            _ => return other(),
        };
        seen.insert(path.to_string(), method.clone());
        method
    }
}

fn other() -> Method {
    Method {
        service: OTHER.into(),
        method: OTHER.into(),
    }
}

/// `/<service>/<method>` split into its parts.
fn split_path(path: &str) -> Option<(&str, &str)> {
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    let valid = |s: &str| !s.is_empty() && !s.contains('/');
    (valid(service) && valid(method)).then_some((service, method))
}

/// One call being served; records its outcome when dropped, however it ends.
#[derive(Debug)]
struct Call {
    method: Method,
    started: Instant,
    code: Option<Code>,
}

impl Method {
    /// The `grpc_service` and `grpc_method` labels.
    fn labels(&self) -> [(&'static str, SharedString); 2] {
        [
            ("grpc_service", self.service.clone().into()),
            ("grpc_method", self.method.clone().into()),
        ]
    }
}

impl Call {
    fn start(method: Method) -> Self {
        counter!(GRPC_STARTED, &method.labels()).increment(1);
        add_inflight(method.method.clone().into(), 1.0);
        Self {
            method,
            started: Instant::now(),
            code: None,
        }
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        let code = code_label(self.code.unwrap_or(Code::Cancelled));
        let [service, method] = self.method.labels();
        let handled = [service.clone(), method.clone(), ("grpc_code", code.into())];
        counter!(GRPC_HANDLED, &handled).increment(1);
        histogram!(GRPC_HANDLING, &[service, method]).record(self.started.elapsed().as_secs_f64());
        add_inflight(self.method.method.clone().into(), -1.0);
    }
}

/// The status code a header map carries, if any.
fn grpc_status(headers: &HeaderMap) -> Option<Code> {
    headers
        .get("grpc-status")
        .map(|value| Code::from_bytes(value.as_bytes()))
}

/// The conventional label of a status code (as Go's `codes.Code.String()` spells it, which
/// existing gRPC dashboards expect).
pub(super) fn code_label(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "Canceled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`GrpcMetrics`]: hands the call over to the response body.
    pub struct MeteredFuture<F> {
        #[pin]
        inner: F,
        call: Option<Call>,
    }
}

impl<F, R, E> Future for MeteredFuture<F>
where
    F: Future<Output = Result<Response<R>, E>>,
{
    type Output = Result<Response<MeteredBody<R>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        let mut call = this.call.take();
        match result {
            Ok(response) => {
                if let Some(call) = call.as_mut() {
                    call.code = grpc_status(response.headers());
                }
                Poll::Ready(Ok(response.map(|inner| MeteredBody { inner, call })))
            }
            Err(error) => {
                if let Some(call) = call.as_mut() {
                    call.code = Some(Code::Unknown);
                }
                Poll::Ready(Err(error))
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// A response body that records its call when its trailers arrive, it ends, or it is dropped.
    pub struct MeteredBody<B> {
        #[pin]
        inner: B,
        call: Option<Call>,
    }
}

impl<B: Body> Body for MeteredBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        let status = match &frame {
            Some(Ok(frame)) => frame.trailers_ref().map(grpc_status),
            Some(Err(_)) => Some(Some(Code::Unknown)),
            None => Some(None),
        };
        if let Some(status) = status {
            if let Some(mut call) = this.call.take() {
                call.code = status.or(call.code).or(Some(Code::Unknown));
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_split_into_service_and_method() {
        assert_eq!(
            split_path("/polyhead.v1.Polyhead/Detect"),
            Some(("polyhead.v1.Polyhead", "Detect"))
        );
        assert_eq!(
            split_path("/grpc.health.v1.Health/Check"),
            Some(("grpc.health.v1.Health", "Check"))
        );
        assert_eq!(split_path("/Detect"), None);
        assert_eq!(split_path("polyhead.v1.Polyhead/Detect"), None);
        assert_eq!(split_path("/a/b/c"), None);
        assert_eq!(split_path("//Detect"), None);
    }

    #[test]
    fn method_labels_are_bounded() {
        let labels = MethodLabels::default();
        for i in 0..MAX_METHODS {
            assert_eq!(&*labels.get(&format!("/s/m{i}")).method, format!("m{i}"));
        }
        assert_eq!(labels.get("/s/one-too-many"), other());
        assert_eq!(
            &*labels.get("/s/m0").method,
            "m0",
            "known methods keep their labels"
        );
        assert_eq!(labels.get("/not-a-grpc-path"), other());
    }

    #[test]
    fn status_codes_read_from_headers() {
        let mut headers = HeaderMap::new();
        assert_eq!(grpc_status(&headers), None);
        headers.insert("grpc-status", "3".parse().expect("ascii"));
        assert_eq!(grpc_status(&headers), Some(Code::InvalidArgument));
        headers.insert("grpc-status", "12".parse().expect("ascii"));
        assert_eq!(grpc_status(&headers), Some(Code::Unimplemented));
    }

    #[test]
    fn code_labels_follow_the_go_spelling() {
        assert_eq!(code_label(Code::Ok), "OK");
        assert_eq!(code_label(Code::Cancelled), "Canceled");
        assert_eq!(code_label(Code::InvalidArgument), "InvalidArgument");
        assert_eq!(code_label(Code::ResourceExhausted), "ResourceExhausted");
    }
}

//! A tower layer around the whole gRPC server that counts and times every call of every
//! service: `grpc_server_started_total`, `grpc_server_handled_total{grpc_code}`,
//! `grpc_server_handling_seconds` and `polyhead_inflight_requests`.
//!
//! The `grpc_service` and `grpc_method` labels come from a table built once, up front, from the
//! descriptors of the services the server has: a call to any other path is counted under
//! [`OTHER`]. The layer runs before authentication, so the path is whatever an unauthenticated
//! caller sent; a table filled on first use would let made-up paths grow the series, or crowd
//! the real methods out of it.
//!
//! The status code is read where gRPC puts it: the `grpc-status` header of a trailers-only
//! response (every error, including those tonic produces itself, such as UNIMPLEMENTED) or the
//! trailers at the end of the body. A call whose response is dropped before it ends counts as
//! CANCELLED.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use ::metrics::{SharedString, counter, histogram};
use http::{HeaderMap, Request, Response};
use http_body::{Body, Frame, SizeHint};
use prost::Message as _;
use prost_types::FileDescriptorSet;
use tonic::Code;
use tower::{Layer, Service};

use super::metrics::{GRPC_HANDLED, GRPC_HANDLING, GRPC_STARTED, add_inflight};

/// The `grpc_service` and `grpc_method` labels of every call to a path that is not a method of
/// a known service.
const OTHER: &str = "_other";

/// The layer that records the gRPC metrics of every call of the server it wraps. Each method
/// of a service described in `descriptor_sets` (encoded `FileDescriptorSet`s) gets its own
/// labels; every other path is counted under `_other`. A set that does not decode is logged
/// and skipped.
pub fn grpc_metrics_layer(descriptor_sets: &[&[u8]]) -> GrpcMetricsLayer {
    GrpcMetricsLayer {
        methods: Arc::new(MethodLabels::new(descriptor_sets)),
    }
}

/// See [`grpc_metrics_layer`].
#[derive(Debug, Clone)]
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

/// The labels of every known method by its path, `/<package>.<Service>/<Method>`; fixed once
/// built, so callers cannot add to it.
#[derive(Debug)]
struct MethodLabels {
    known: HashMap<String, Method>,
    other: Method,
}

impl MethodLabels {
    /// The table of the methods of every service in `descriptor_sets`.
    fn new(descriptor_sets: &[&[u8]]) -> Self {
        let known = descriptor_sets
            .iter()
            .filter_map(|set| {
                FileDescriptorSet::decode(*set)
                    .map_err(|e| tracing::error!("gRPC metrics: bad descriptor set: {e}"))
                    .ok()
            })
            .flat_map(|set| methods(&set))
            .collect();
        let other = Method {
            service: OTHER.into(),
            method: OTHER.into(),
        };
        Self { known, other }
    }

    /// The labels of the call to `path`.
    fn get(&self, path: &str) -> Method {
        self.known.get(path).unwrap_or(&self.other).clone()
    }
}

/// Every method of every service in `set`, by path.
fn methods(set: &FileDescriptorSet) -> Vec<(String, Method)> {
    let mut methods = Vec::new();
    for file in &set.file {
        for service in &file.service {
            let name = match file.package() {
                "" => service.name().to_string(),
                package => format!("{package}.{}", service.name()),
            };
            let service_label: Arc<str> = name.as_str().into();
            for method in &service.method {
                let label = Method {
                    service: Arc::clone(&service_label),
                    method: method.name().into(),
                };
                methods.push((format!("/{name}/{}", method.name()), label));
            }
        }
    }
    methods
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

    /// The sets the server passes (see `crate::grpc`).
    fn served() -> MethodLabels {
        MethodLabels::new(&[
            polyhead_proto::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
        ])
    }

    fn labels(service: &str, method: &str) -> Method {
        Method {
            service: service.into(),
            method: method.into(),
        }
    }

    #[test]
    fn served_methods_get_their_own_labels() {
        let table = served();
        let cases = [
            ("polyhead.v1.Polyhead", "Detect"),
            ("polyhead.v1.Polyhead", "Analyze"),
            ("grpc.health.v1.Health", "Check"),
            ("grpc.health.v1.Health", "Watch"),
            ("inference.GRPCInferenceService", "ModelInfer"),
            (
                "grpc.reflection.v1.ServerReflection",
                "ServerReflectionInfo",
            ),
            (
                "grpc.reflection.v1alpha.ServerReflection",
                "ServerReflectionInfo",
            ),
        ];
        for (service, method) in cases {
            let path = format!("/{service}/{method}");
            assert_eq!(table.get(&path), labels(service, method), "{path}");
        }
    }

    #[test]
    fn made_up_paths_are_other_and_never_displace_served_ones() {
        let table = served();
        let other = labels(OTHER, OTHER);
        for i in 0..10_000 {
            assert_eq!(table.get(&format!("/s{i}/m{i}")), other);
        }
        for path in [
            "/polyhead.v1.Polyhead/NoSuchMethod",
            "/polyhead.v1.Polyhead/detect",
            "/polyhead.v1.Polyhead/Detect/",
            "/Detect",
            "polyhead.v1.Polyhead/Detect",
            "",
        ] {
            assert_eq!(table.get(path), other, "{path:?}");
        }
        let detect = table.get("/polyhead.v1.Polyhead/Detect");
        assert_eq!(detect, labels("polyhead.v1.Polyhead", "Detect"));
    }

    #[test]
    fn a_set_that_does_not_decode_is_skipped() {
        let table = MethodLabels::new(&[b"\xff", tonic_health::pb::FILE_DESCRIPTOR_SET]);
        let check = table.get("/grpc.health.v1.Health/Check");
        assert_eq!(check, labels("grpc.health.v1.Health", "Check"));
    }

    #[test]
    fn services_without_a_package_are_named_alone() {
        let set = FileDescriptorSet {
            file: vec![prost_types::FileDescriptorProto {
                service: vec![prost_types::ServiceDescriptorProto {
                    name: Some("Bare".into()),
                    method: vec![prost_types::MethodDescriptorProto {
                        name: Some("Call".into()),
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        let table = MethodLabels::new(&[&set.encode_to_vec()]);
        assert_eq!(table.get("/Bare/Call"), labels("Bare", "Call"));
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

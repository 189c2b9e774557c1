//! Admission at the edge of every service: a service whose models are still loading answers
//! UNAVAILABLE ([`Deferred`]); while draining, new calls answer UNAVAILABLE and in-flight ones
//! are counted so shutdown can wait for them ([`Deferred`], [`Admitted`]). Health and reflection
//! stay reachable throughout.

use std::convert::Infallible;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use tonic::Status;
use tonic::codegen::{BoxFuture, Service, http};
use tonic::server::NamedService;

use crate::lifecycle::{InflightGuard, Lifecycle};
use crate::pipeline::Pipeline;

type Body = tonic::body::Body;

/// Builds a service once the pipeline exists.
type Build<S> = Arc<dyn Fn(Arc<Pipeline>) -> S + Send + Sync>;

/// A service built on the first call after the models are ready, and gated by the lifecycle.
pub struct Deferred<S> {
    lifecycle: Arc<Lifecycle>,
    build: Build<S>,
    service: Arc<OnceLock<S>>,
}

impl<S> Clone for Deferred<S> {
    fn clone(&self) -> Self {
        Self {
            lifecycle: Arc::clone(&self.lifecycle),
            build: Arc::clone(&self.build),
            service: Arc::clone(&self.service),
        }
    }
}

impl<S> Deferred<S> {
    /// Gates the service `build` makes from the pipeline.
    pub fn new(
        lifecycle: Arc<Lifecycle>,
        build: impl Fn(Arc<Pipeline>) -> S + Send + Sync + 'static,
    ) -> Self {
        Self {
            lifecycle,
            build: Arc::new(build),
            service: Arc::new(OnceLock::new()),
        }
    }
}

impl<S: NamedService> NamedService for Deferred<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<http::Request<Body>> for Deferred<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let Some(pipeline) = self.lifecycle.pipeline() else {
            return refuse("the server is starting: models are loading");
        };
        let Some(guard) = self.lifecycle.enter() else {
            return refuse("the server is shutting down");
        };
        let service = self
            .service
            .get_or_init(|| (self.build)(Arc::clone(pipeline)))
            .clone();
        counted(service, request, guard)
    }
}

/// A service that answers from the start (it reads the lifecycle itself) and is only gated by
/// the drain: while draining, calls other than the `probes` get UNAVAILABLE; the others are
/// counted in flight.
#[derive(Clone)]
pub struct Admitted<S> {
    lifecycle: Arc<Lifecycle>,
    service: S,
    probes: &'static [&'static str],
}

impl<S> Admitted<S> {
    /// Gates `service`; the methods named in `probes` (e.g. `ServerReady`) always pass.
    pub fn new(lifecycle: Arc<Lifecycle>, service: S, probes: &'static [&'static str]) -> Self {
        Self {
            lifecycle,
            service,
            probes,
        }
    }
}

impl<S: NamedService> NamedService for Admitted<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<http::Request<Body>> for Admitted<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let method = request.uri().path().rsplit('/').next().unwrap_or_default();
        if self.probes.contains(&method) {
            let mut service = self.service.clone();
            return Box::pin(async move { service.call(request).await });
        }
        let Some(guard) = self.lifecycle.enter() else {
            return refuse("the server is shutting down");
        };
        counted(self.service.clone(), request, guard)
    }
}

/// Runs the call, keeping it counted in flight until
/// its response body has ended (a streaming response's last message and trailers included), so
/// that a drain waits for open streams too; a request message over the size limit is answered
/// as [`super::status::message_limits`] says.
fn counted<S>(
    mut service: S,
    request: http::Request<Body>,
    guard: InflightGuard,
) -> BoxFuture<http::Response<Body>, Infallible>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    Box::pin(async move {
        let response = service
            .call(request)
            .await
            .map(super::status::message_limits);
        Ok(response?.map(|body| {
            Body::new(Guarded {
                body,
                _guard: guard,
            })
        }))
    })
}

/// A response body that keeps its call counted in flight until it is dropped: hyper drops it
/// once it has ended, or when the client goes away.
struct Guarded {
    body: Body,
    _guard: InflightGuard,
}

impl http_body::Body for Guarded {
    type Data = tonic::codegen::Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

fn refuse(message: &'static str) -> BoxFuture<http::Response<Body>, Infallible> {
    Box::pin(async move { Ok(Status::unavailable(message).into_http()) })
}

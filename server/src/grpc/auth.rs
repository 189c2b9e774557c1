//! Bearer-token authentication: a tower layer around the whole server that answers
//! UNAUTHENTICATED to every call without an accepted `authorization: Bearer <token>`, except
//! health checks (probes carry no credentials). Tokens never reach logs, spans or errors.

use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::{Either, Ready, ready};
use http::{Request, Response};
use tower::{Layer, Service};

use crate::security::Tokens;

/// Path prefix of the calls that need no token.
const HEALTH_PREFIX: &str = "/grpc.health.v1.Health/";

/// What a refused call is told; it never says which part was wrong.
const REFUSED: &str = "missing or invalid bearer token";

/// The layer that checks bearer tokens; with no tokens it lets every call through.
#[derive(Debug, Clone, Default)]
pub struct AuthLayer {
    tokens: Option<Arc<Tokens>>,
}

impl AuthLayer {
    /// Checks calls against `tokens`; `None` turns authentication off.
    pub fn new(tokens: Option<Arc<Tokens>>) -> Self {
        Self { tokens }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Auth {
            inner,
            tokens: self.tokens.clone(),
        }
    }
}

/// The service [`AuthLayer`] wraps around the server.
#[derive(Debug, Clone)]
pub struct Auth<S> {
    inner: S,
    tokens: Option<Arc<Tokens>>,
}

impl<S, B, R> Service<Request<B>> for Auth<S>
where
    S: Service<Request<B>, Response = Response<R>>,
    R: Default,
{
    type Response = Response<R>;
    type Error = S::Error;
    type Future = Either<Ready<Result<Response<R>, S::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        if allowed(self.tokens.as_deref(), &request) {
            return Either::Right(self.inner.call(request));
        }
        tracing::debug!(path = request.uri().path(), "call refused: {REFUSED}");
        Either::Left(ready(Ok(
            tonic::Status::unauthenticated(REFUSED).into_http()
        )))
    }
}

/// Whether `request` may pass: no tokens configured, a health check, or an accepted token.
fn allowed<B>(tokens: Option<&Tokens>, request: &Request<B>) -> bool {
    let Some(tokens) = tokens else {
        return true;
    };
    if request.uri().path().starts_with(HEALTH_PREFIX) {
        return true;
    }
    request
        .headers()
        .get(http::header::AUTHORIZATION)
        .is_some_and(|value| tokens.accepts(value.as_bytes()))
}

//! Runs one call's work under its deadline (the caller's `grpc-timeout`, else the configured
//! default, capped at the configured maximum) inside a span carrying the request id, and maps
//! its error to a status.
//!
//! The deadline counts from the call's arrival, stamped by [`ArrivalLayer`] synchronously as
//! tonic hands the request over, before its body is read or its task is first polled. tonic also
//! enforces `grpc-timeout` from that moment, answering CANCELLED ("Timeout expired"); ending one
//! timer tick earlier makes the caller get DEADLINE_EXCEEDED, from the handler once the request
//! message has arrived, and from [`ArrivalLayer`] itself while it is still arriving.

use std::future::Future;
use std::time::{Duration, Instant};

use tonic::metadata::MetadataMap;
use tonic::{Extensions, Response, Status};
use tracing::Instrument;

use super::status;
use crate::config::Limits;
use crate::engine::EngineError;
use crate::error::Error;

/// Runs `work` for `rpc` under the deadline of `metadata`, or the default timeout of `limits`
/// when the call carries none. An error becomes its status through [`status::to_status`]; a
/// passed deadline is DEADLINE_EXCEEDED.
pub(super) async fn run<T, F>(
    metadata: &MetadataMap,
    extensions: &Extensions,
    rpc: &str,
    request_id: &str,
    limits: &Limits,
    work: F,
) -> Result<Response<T>, Status>
where
    F: Future<Output = Result<T, Error>>,
{
    let (deadline, timeout) = call_deadline(metadata, extensions, limits);
    let span = crate::telemetry::rpc_span(metadata, rpc, request_id);
    let work = crate::engine::within_deadline(deadline, work);
    let work = tokio::time::timeout_at(deadline.into(), work);
    match work.instrument(span).await {
        Ok(Ok(reply)) => Ok(Response::new(reply)),
        Ok(Err(error)) => Err(timeout.failed(rpc, error, request_id, limits)),
        Err(_) => Err(timeout.unfinished(rpc)),
    }
}

/// When the call must be answered (its arrival plus its timeout, less one timer tick), and the
/// timeout itself, both as [`ArrivalLayer`] stamped them; a call that did not pass through it
/// (in tests) arrives now, with the timeout of its `grpc-timeout` header and `limits`.
/// Streaming calls, whose work outlives the handler, end at this instant too.
pub(super) fn call_deadline(
    metadata: &MetadataMap,
    extensions: &Extensions,
    limits: &Limits,
) -> (Instant, CallTimeout) {
    let Arrival { at, timeout } = extensions
        .get::<Arrival>()
        .copied()
        .unwrap_or_else(|| Arrival {
            at: Instant::now(),
            timeout: CallTimeout::of(
                metadata.get("grpc-timeout").and_then(|v| v.to_str().ok()),
                limits.default_timeout(),
                limits.max_timeout(),
            ),
        });
    let after = timeout.timeout.saturating_sub(TIMER_TICK);
    // A deadline too far away to be represented (a maximum of centuries) is as good as none.
    let deadline = at
        .checked_add(after)
        .unwrap_or_else(|| at + Duration::from_secs(CENTURY_SECONDS));
    (deadline, timeout)
}

/// A hundred years, in seconds: a deadline that never comes.
const CENTURY_SECONDS: u64 = 100 * 365 * 24 * 3600;

/// A call's timeout: the caller's `grpc-timeout`, else the default, never longer than the
/// maximum (`--max-timeout-seconds`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct CallTimeout {
    /// The timeout the call runs under.
    pub(super) timeout: Duration,
    /// Whether the maximum cut the caller's (or the default) timeout short.
    capped: bool,
}

impl CallTimeout {
    /// The timeout of a call whose `grpc-timeout` header is `header`.
    fn of(header: Option<&str>, default: Duration, max: Duration) -> Self {
        let asked = header.and_then(parse_timeout);
        Self {
            timeout: asked.unwrap_or(default).min(max),
            capped: asked.is_some_and(|asked| asked > max),
        }
    }

    /// The status of `rpc`, which failed with `error`: a request whose deadline passed while
    /// it waited for a model says so as [`CallTimeout::unfinished`] does when the maximum set
    /// that deadline.
    pub(super) fn failed(
        &self,
        rpc: &str,
        error: Error,
        request_id: &str,
        limits: &Limits,
    ) -> Status {
        match error {
            Error::Engine(EngineError::Expired(_)) if self.capped => self.unfinished(rpc),
            error => status::to_status(error, request_id, limits),
        }
    }

    /// DEADLINE_EXCEEDED for `rpc`, whose work did not finish in time.
    pub(super) fn unfinished(&self, rpc: &str) -> Status {
        self.expired(format!(
            "{rpc} did not finish within its deadline of {:.3} s",
            self.timeout.as_secs_f64()
        ))
    }

    /// DEADLINE_EXCEEDED with `message`, which says that the server's maximum set the deadline
    /// when it did: a caller then knows that a longer timeout of its own would not help.
    fn expired(&self, message: String) -> Status {
        if self.capped {
            Status::deadline_exceeded(format!(
                "{message}, the most this server allows (--max-timeout-seconds); the caller's \
                 timeout was longer"
            ))
        } else {
            Status::deadline_exceeded(message)
        }
    }
}

/// The resolution of tokio's timers.
const TIMER_TICK: Duration = Duration::from_millis(1);

/// When a call arrived, before its body was read, and the timeout it arrived with.
#[derive(Debug, Clone, Copy)]
struct Arrival {
    at: Instant,
    timeout: CallTimeout,
}

/// Stamps every request with the moment it arrives and ends it with DEADLINE_EXCEEDED once its
/// deadline has passed (one timer tick early) if no response has started by then. The deadline
/// is the handler's: the caller's `grpc-timeout`, else the default, capped at the maximum. The
/// handler's own deadline covers calls whose message has arrived; this one covers the time
/// before, while tonic still reads and decodes the message, where otherwise tonic's own timer
/// would answer CANCELLED ("Timeout expired") and a call without a deadline could hold its
/// connection's stream, and the request bytes it has sent, for ever. Inside the metrics layer,
/// so that such calls are counted too.
#[derive(Debug, Clone, Copy)]
pub struct ArrivalLayer {
    default_timeout: Duration,
    max_timeout: Duration,
}

impl ArrivalLayer {
    /// Calls that carry no `grpc-timeout` get `default_timeout`; none gets more than
    /// `max_timeout`.
    pub fn new(default_timeout: Duration, max_timeout: Duration) -> Self {
        Self {
            default_timeout,
            max_timeout,
        }
    }
}

impl<S> tower::Layer<S> for ArrivalLayer {
    type Service = StampArrival<S>;

    fn layer(&self, inner: S) -> StampArrival<S> {
        StampArrival {
            inner,
            timeouts: *self,
        }
    }
}

/// See [`ArrivalLayer`].
#[derive(Debug, Clone)]
pub struct StampArrival<S> {
    inner: S,
    timeouts: ArrivalLayer,
}

impl<S, B, R> tower::Service<http::Request<B>> for StampArrival<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    R: Default,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = ArrivalFuture<S::Future>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let arrived = Instant::now();
        let timeout = CallTimeout::of(
            request
                .headers()
                .get("grpc-timeout")
                .and_then(|v| v.to_str().ok()),
            self.timeouts.default_timeout,
            self.timeouts.max_timeout,
        );
        request.extensions_mut().insert(Arrival {
            at: arrived,
            timeout,
        });
        // A deadline too far away to be represented (a maximum of centuries) is none here.
        let deadline = arrived
            .checked_add(timeout.timeout.saturating_sub(TIMER_TICK))
            .map(|at| (Box::pin(tokio::time::sleep_until(at.into())), timeout));
        ArrivalFuture {
            inner: self.inner.call(request),
            deadline,
        }
    }
}

pin_project_lite::pin_project! {
    /// The inner service's response, or DEADLINE_EXCEEDED once the call's deadline has passed.
    pub struct ArrivalFuture<F> {
        #[pin]
        inner: F,
        deadline: Option<(std::pin::Pin<Box<tokio::time::Sleep>>, CallTimeout)>,
    }
}

impl<F, R, E> Future for ArrivalFuture<F>
where
    F: Future<Output = Result<http::Response<R>, E>>,
    R: Default,
{
    type Output = F::Output;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let this = self.project();
        if let ready @ std::task::Poll::Ready(_) = this.inner.poll(cx) {
            return ready;
        }
        if let Some((sleep, timeout)) = this.deadline {
            std::task::ready!(sleep.as_mut().poll(cx));
            let status = timeout.expired(format!(
                "the call's deadline of {:.3} s passed before its request had arrived in full",
                timeout.timeout.as_secs_f64()
            ));
            return std::task::Poll::Ready(Ok(status.into_http()));
        }
        std::task::Poll::Pending
    }
}

/// The most digits a `grpc-timeout` value may have, as the gRPC protocol specifies; a longer
/// one is ignored, as tonic ignores it.
const TIMEOUT_DIGITS: usize = 8;

/// A `grpc-timeout` value (`<digits><H|M|S|m|u|n>`, at most [`TIMEOUT_DIGITS`] digits).
fn parse_timeout(value: &str) -> Option<Duration> {
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > TIMEOUT_DIGITS {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_header_parses() {
        assert_eq!(parse_timeout(""), None);
        assert_eq!(parse_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_timeout("xS"), None);
        assert_eq!(
            parse_timeout("99999999H"),
            Some(Duration::from_secs(99_999_999 * 3600))
        );
        for too_long in ["999999999S", "9999999999999999999S", "99999999999999H"] {
            assert_eq!(parse_timeout(too_long), None, "{too_long}");
        }
    }

    #[tokio::test]
    async fn arrival_layer_takes_any_timeout_header_without_panicking() {
        use tower::{Layer, Service, ServiceExt};
        let inner = tower::service_fn(|request: http::Request<()>| async move {
            let arrived = request.extensions().get::<Arrival>().is_some();
            Ok::<_, std::convert::Infallible>(http::Response::new(arrived))
        });
        let forever = Duration::from_secs(u64::MAX);
        let mut service = ArrivalLayer::new(forever, forever).layer(inner);
        for value in [
            "99999999H",
            "9999999999999999999S",
            "18446744073709551615n",
            "1x",
        ] {
            let request = http::Request::builder()
                .header("grpc-timeout", value)
                .body(())
                .expect("request");
            let response = service
                .ready()
                .await
                .expect("ready")
                .call(request)
                .await
                .expect("answered");
            assert!(*response.body(), "{value}: the arrival was stamped");
        }
    }

    #[tokio::test]
    async fn a_message_still_arriving_gets_the_default_deadline_or_the_maximum() {
        use tower::{Layer, ServiceExt};
        let never = tower::service_fn(|_: http::Request<()>| {
            std::future::pending::<Result<http::Response<()>, std::convert::Infallible>>()
        });
        let layer = ArrivalLayer::new(Duration::from_millis(50), Duration::from_millis(80));
        for header in [None, Some("2H")] {
            let mut request = http::Request::builder();
            if let Some(value) = header {
                request = request.header("grpc-timeout", value);
            }
            let request = request.body(()).expect("request");
            let response = layer.layer(never).oneshot(request).await.expect("answered");
            let status = Status::from_header_map(response.headers()).expect("a status");
            assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{header:?}");
            // Only the caller who asked for more than the maximum is told of it.
            assert_eq!(
                status.message().contains("--max-timeout-seconds"),
                header.is_some(),
                "{header:?}: {}",
                status.message()
            );
        }
    }

    #[test]
    fn deadlines_default_and_are_capped() {
        let mut limits = crate::config::Config::for_models("m").limits;
        limits.default_timeout_seconds = 7.0;
        limits.max_timeout_seconds = 30.0;
        let mut metadata = MetadataMap::new();
        let timeout =
            |metadata: &MetadataMap| call_deadline(metadata, &Extensions::new(), &limits).1;
        let secs = Duration::from_secs;
        assert_eq!(timeout(&metadata).timeout, secs(7));
        metadata.insert("grpc-timeout", "10S".parse().expect("ascii"));
        assert_eq!(timeout(&metadata).timeout, secs(10));
        assert!(
            !timeout(&metadata)
                .unfinished("Detect")
                .message()
                .contains("--max-timeout")
        );
        // A default longer than the maximum is the server's own doing, not the caller's.
        assert!(!CallTimeout::of(None, secs(60), secs(30)).capped);
        // Expired in a model's queue: the same note.
        let queued = Error::Engine(EngineError::Expired("backbone".into()));
        let status = timeout(&metadata).failed("Detect", queued, "r1", &limits);
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
        assert!(
            !status.message().contains("--max-timeout"),
            "{}",
            status.message()
        );
        metadata.insert("grpc-timeout", "2H".parse().expect("ascii"));
        assert_eq!(timeout(&metadata).timeout, secs(30));
        let queued = Error::Engine(EngineError::Expired("backbone".into()));
        let status = timeout(&metadata).failed("Detect", queued, "r1", &limits);
        assert!(
            status.message().contains("--max-timeout-seconds"),
            "{}",
            status.message()
        );
        assert_eq!(
            timeout(&metadata).unfinished("Detect").message(),
            "Detect did not finish within its deadline of 30.000 s, the most this server allows \
             (--max-timeout-seconds); the caller's timeout was longer"
        );
        // A maximum no instant can be that far from now (the command line refuses it, a
        // library caller may not) gives a deadline a century away.
        limits.default_timeout_seconds = 1.5e19;
        limits.max_timeout_seconds = 1.5e19;
        let (deadline, _) = call_deadline(&MetadataMap::new(), &Extensions::new(), &limits);
        assert!(deadline > Instant::now() + secs(CENTURY_SECONDS / 2));
    }

    #[tokio::test]
    async fn work_past_its_deadline_is_deadline_exceeded() {
        let mut metadata = MetadataMap::new();
        metadata.insert("grpc-timeout", "10m".parse().expect("ascii"));
        let never = std::future::pending::<Result<(), Error>>();
        let limits = crate::config::Config::for_models("m").limits;
        let status = run(&metadata, &Extensions::new(), "Slow", "r1", &limits, never)
            .await
            .expect_err("too slow");
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
        assert!(status.message().contains("Slow"), "{}", status.message());
    }
}

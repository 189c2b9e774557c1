//! One budget for the request bytes being received, over every call and connection.
//!
//! Each call's message limit bounds what one call may send, but not how many calls send at
//! once: a client with many connections and streams could make the server buffer their uploads
//! all together, and hold them all while their calls wait for a slot. Every request body draws
//! on one budget as its bytes arrive (as sent, gRPC framing included; a compressed call at the
//! most it may inflate to, below), and the call gives them back once it has been answered and its body
//! is gone: a unary call when its handler has its reply, a streaming call when its response
//! starts and its request stream has ended (a RecognizeActionWindows upload once the call is
//! admitted). So the budget bounds the request messages the server holds at once, whether they
//! are arriving, waiting for a slot or being served. A call cannot hold them for ever: its
//! deadline also runs while its message arrives. A compressed call (a `grpc-encoding` other
//! than `identity`) inflates after its bytes are counted, to at most the message limit, so from
//! its first byte it holds the most it may inflate to ([`Inflated`]): a gzip message of a few
//! KiB can take `--max-message-bytes` once decoded. A call whose
//! next bytes would go over the budget is refused with RESOURCE_EXHAUSTED and the configured
//! `grpc-retry-pushback-ms`, as the bytes are freed as soon as other calls' messages are in;
//! one that alone holds more than the whole budget is told it can never fit (pushback -1).
//! Health checks and reflection, whose messages are a few bytes, are not held to it: a probe
//! must get through while the server is busy.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::Status;
use tonic::codegen::{Service, http};
use tonic::metadata::{MetadataMap, MetadataValue};

use super::status::RETRY_PUSHBACK;

type Body = tonic::body::Body;

/// The path of the one call whose request is a stream of messages: an upload in chunks.
const UPLOAD_PATH: &str = "/polyhead.v1.Polyhead/RecognizeActionWindows";

/// What a compressed call holds from its first byte: the most its messages may inflate to, with
/// their gRPC framing.
#[derive(Debug, Clone, Copy)]
pub struct Inflated {
    /// A call of one message: `--max-message-bytes` and its framing.
    pub message: u64,
    /// A RecognizeActionWindows upload: `--max-video-bytes` over all its messages, and their
    /// framing.
    pub upload: u64,
}

impl Inflated {
    /// The limits on a message and on an upload's messages, each with `framing` bytes for their
    /// gRPC prefixes.
    pub fn new(max_message_bytes: u64, max_upload_bytes: u64, framing: u64) -> Self {
        Self {
            message: max_message_bytes.saturating_add(framing),
            upload: max_upload_bytes.saturating_add(framing),
        }
    }

    /// What a call to `path` with `headers` holds from its first byte: nothing more than it
    /// receives unless its messages are compressed.
    fn reserve(&self, path: &str, headers: &http::HeaderMap) -> usize {
        let compressed = headers
            .get("grpc-encoding")
            .is_some_and(|encoding| encoding.as_bytes() != b"identity");
        let bytes = match (compressed, path == UPLOAD_PATH) {
            (false, _) => 0,
            (true, false) => self.message,
            (true, true) => self.upload,
        };
        usize::try_from(bytes).unwrap_or(usize::MAX)
    }
}

/// The layer that holds every request body to the server's receive budget.
#[derive(Debug, Clone)]
pub struct ReceiveBudgetLayer {
    budget: Arc<Budget>,
    inflated: Inflated,
}

impl ReceiveBudgetLayer {
    /// A budget of `bytes` received at once, compressed calls held at `inflated`; refusals ask
    /// clients to wait `pushback_ms`.
    pub fn new(bytes: u64, inflated: Inflated, pushback_ms: u64) -> Self {
        let permits = usize::try_from(bytes)
            .unwrap_or(usize::MAX)
            .min(Semaphore::MAX_PERMITS);
        Self {
            budget: Arc::new(Budget {
                bytes: Arc::new(Semaphore::new(permits)),
                total: permits,
                pushback_ms,
            }),
            inflated,
        }
    }
}

impl<S> tower::Layer<S> for ReceiveBudgetLayer {
    type Service = ReceiveBudget<S>;

    fn layer(&self, inner: S) -> ReceiveBudget<S> {
        ReceiveBudget {
            inner,
            budget: Arc::clone(&self.budget),
            inflated: self.inflated,
        }
    }
}

#[derive(Debug)]
struct Budget {
    /// One permit per byte.
    bytes: Arc<Semaphore>,
    total: usize,
    pushback_ms: u64,
}

impl Budget {
    /// Takes `len` more bytes from the budget for a call that holds `held`; `reserved` is what
    /// a compressed call holds from its first byte (0 for others).
    fn take(
        &self,
        held: usize,
        len: usize,
        reserved: usize,
    ) -> Result<OwnedSemaphorePermit, Status> {
        if held.saturating_add(len) > self.total {
            return Err(refusal(
                -1,
                format!(
                    "the request is too large: the server holds at most {} bytes of requests \
                     at once (--max-receiving-bytes)",
                    self.total
                ),
            ));
        }
        u32::try_from(len)
            .ok()
            .and_then(|n| Arc::clone(&self.bytes).try_acquire_many_owned(n).ok())
            .ok_or_else(|| {
                let in_use = self.total - self.bytes.available_permits();
                let mut message = format!(
                    "the server holds {in_use} of the {} bytes of requests it may hold at once, \
                     received and not yet answered (--max-receiving-bytes)",
                    self.total
                );
                if reserved > 0 {
                    message += &format!(
                        "; a compressed request holds the {reserved} bytes it may inflate to"
                    );
                }
                refusal(i64::try_from(self.pushback_ms).unwrap_or(i64::MAX), message)
            })
    }
}

/// RESOURCE_EXHAUSTED with `message` and a `grpc-retry-pushback-ms` of `pushback_ms` (negative:
/// do not retry).
fn refusal(pushback_ms: i64, message: String) -> Status {
    let mut metadata = MetadataMap::new();
    metadata.insert(RETRY_PUSHBACK, MetadataValue::from(pushback_ms));
    Status::with_metadata(tonic::Code::ResourceExhausted, message, metadata)
}

/// Paths whose bodies are not held to the budget: the health and reflection services.
fn exempt(path: &str) -> bool {
    ["/grpc.health.v1.Health/", "/grpc.reflection."]
        .iter()
        .any(|prefix| path.starts_with(prefix))
}

/// See [`ReceiveBudgetLayer`].
#[derive(Debug, Clone)]
pub struct ReceiveBudget<S> {
    inner: S,
    budget: Arc<Budget>,
    inflated: Inflated,
}

/// The bytes one call holds, shared by its body and its response future.
type Held = Arc<Mutex<Option<OwnedSemaphorePermit>>>;

impl<S> Service<http::Request<Body>> for ReceiveBudget<S>
where
    S: Service<http::Request<Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Answering<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        if exempt(request.uri().path()) {
            return Answering {
                inner: self.inner.call(request),
                held: None,
            };
        }
        let budget = Arc::clone(&self.budget);
        let reserved = self
            .inflated
            .reserve(request.uri().path(), request.headers());
        let held = Held::default();
        let body_held = Arc::clone(&held);
        let request = request.map(|inner| {
            Body::new(Budgeted {
                inner,
                budget,
                held: body_held,
                reserved,
                received: 0,
            })
        });
        Answering {
            inner: self.inner.call(request),
            held: Some(held),
        }
    }
}

pin_project_lite::pin_project! {
    /// The inner service's answer; keeps the call's bytes held until it is ready.
    pub struct Answering<F> {
        #[pin]
        inner: F,
        held: Option<Held>,
    }
}

impl<F: Future> Future for Answering<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let answer = ready!(this.inner.poll(cx));
        *this.held = None;
        Poll::Ready(answer)
    }
}

/// A request body that holds the bytes it has delivered against the budget (at least
/// `reserved` once it has delivered any), with its call's response future: they go back when
/// both are gone.
struct Budgeted {
    inner: Body,
    budget: Arc<Budget>,
    held: Held,
    /// What the call holds from its first byte: the most a compressed call's messages may
    /// inflate to; 0 for others.
    reserved: usize,
    /// Bytes delivered so far.
    received: usize,
}

impl http_body::Body for Budgeted {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        let len = match &frame {
            Some(Ok(frame)) => frame.data_ref().map_or(0, Bytes::len),
            _ => 0,
        };
        if len > 0 {
            let this = &mut *self;
            this.received = this.received.saturating_add(len);
            let wanted = this.received.max(this.reserved);
            let mut held = this.held.lock().unwrap_or_else(PoisonError::into_inner);
            let holds = held.as_ref().map_or(0, OwnedSemaphorePermit::num_permits);
            if wanted > holds {
                let permit = match this.budget.take(holds, wanted - holds, this.reserved) {
                    Ok(permit) => permit,
                    Err(refusal) => return Poll::Ready(Some(Err(refusal))),
                };
                match &mut *held {
                    Some(held) => held.merge(permit),
                    none => *none = Some(permit),
                }
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
    use http_body_util::BodyExt;

    use super::*;

    fn body(chunks: &[usize]) -> Body {
        let frames = chunks
            .iter()
            .map(|&n| Ok::<_, Status>(Frame::data(Bytes::from(vec![7; n]))))
            .collect::<Vec<_>>();
        Body::new(http_body_util::StreamBody::new(futures_util::stream::iter(
            frames,
        )))
    }

    /// Compressed calls hold 50 bytes, compressed uploads 80 (45 and 75 and 5 for framing).
    const INFLATED: Inflated = Inflated {
        message: 50,
        upload: 80,
    };

    fn budgeted(budget: &Arc<Budget>, chunks: &[usize]) -> Budgeted {
        Budgeted {
            inner: body(chunks),
            budget: Arc::clone(budget),
            held: Held::default(),
            reserved: 0,
            received: 0,
        }
    }

    #[tokio::test]
    async fn bodies_hold_their_bytes_until_dropped_and_are_refused_past_the_budget() {
        let budget = ReceiveBudgetLayer::new(100, INFLATED, 250).budget;
        let mut first = budgeted(&budget, &[30, 30]);
        let mut second = budgeted(&budget, &[30, 30]);
        for body in [&mut first, &mut second] {
            let frame = body.frame().await.expect("a frame").expect("within budget");
            assert_eq!(frame.into_data().expect("data").len(), 30);
        }
        first.frame().await.expect("a frame").expect("90 of 100");
        assert_eq!(budget.bytes.available_permits(), 10);
        let refused = second
            .frame()
            .await
            .expect("a frame")
            .expect_err("120 of 100");
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(
            refused.message().contains("holds 90 of the 100 bytes"),
            "{refused:?}"
        );
        assert!(refused.message().contains("--max-receiving-bytes"));
        assert_eq!(pushback(&refused), "250");

        drop(first);
        assert_eq!(budget.bytes.available_permits(), 70, "the second keeps 30");
        let mut third = budgeted(&budget, &[70]);
        third
            .frame()
            .await
            .expect("a frame")
            .expect("70 of 70 free");
        assert!(third.frame().await.is_none(), "the body ends");
        drop((second, third));
        assert_eq!(budget.bytes.available_permits(), 100);
    }

    #[test]
    fn compressed_calls_reserve_what_their_messages_may_inflate_to() {
        let inflated = Inflated::new(45, 75, 5);
        assert_eq!(
            (inflated.message, inflated.upload),
            (INFLATED.message, INFLATED.upload)
        );
        let headers = |encoding: Option<&str>| {
            let mut headers = http::HeaderMap::new();
            if let Some(encoding) = encoding {
                headers.insert("grpc-encoding", encoding.parse().expect("header"));
            }
            headers
        };
        let detect = "/polyhead.v1.Polyhead/Detect";
        assert_eq!(INFLATED.reserve(detect, &headers(None)), 0);
        assert_eq!(INFLATED.reserve(detect, &headers(Some("identity"))), 0);
        assert_eq!(INFLATED.reserve(detect, &headers(Some("gzip"))), 50);
        assert_eq!(INFLATED.reserve(UPLOAD_PATH, &headers(Some("zstd"))), 80);
        assert_eq!(INFLATED.reserve(UPLOAD_PATH, &headers(None)), 0);
    }

    #[tokio::test]
    async fn a_compressed_body_holds_what_it_may_inflate_to_from_its_first_byte() {
        let budget = ReceiveBudgetLayer::new(100, INFLATED, 250).budget;
        let mut small = Budgeted {
            reserved: 50,
            ..budgeted(&budget, &[10, 10])
        };
        for _ in 0..2 {
            small.frame().await.expect("a frame").expect("50 of 100");
            assert_eq!(budget.bytes.available_permits(), 50);
        }
        // A body that outgrows its reserve holds what it has received.
        let mut outgrows = Budgeted {
            reserved: 30,
            ..budgeted(&budget, &[20, 20])
        };
        outgrows.frame().await.expect("a frame").expect("30 more");
        assert_eq!(budget.bytes.available_permits(), 20);
        outgrows.frame().await.expect("a frame").expect("40 in all");
        assert_eq!(budget.bytes.available_permits(), 10);
        let mut refused = Budgeted {
            reserved: 50,
            ..budgeted(&budget, &[1])
        };
        let refused = refused
            .frame()
            .await
            .expect("a frame")
            .expect_err("one byte that may become 50, with 10 free");
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(
            refused
                .message()
                .contains("a compressed request holds the 50 bytes it may inflate to"),
            "{refused:?}"
        );
        // The same byte uncompressed fits.
        let mut plain = budgeted(&budget, &[1]);
        plain.frame().await.expect("a frame").expect("1 of 10 free");
        drop((small, outgrows, plain));
        assert_eq!(budget.bytes.available_permits(), 100);
    }

    fn pushback(status: &Status) -> &str {
        let value = status.metadata().get(RETRY_PUSHBACK).expect("pushback");
        value.to_str().expect("ascii")
    }

    #[tokio::test]
    async fn a_body_larger_than_the_whole_budget_is_told_not_to_retry() {
        let budget = ReceiveBudgetLayer::new(100, INFLATED, 250).budget;
        let mut body = budgeted(&budget, &[60, 60]);
        body.frame().await.expect("a frame").expect("60 of 100");
        let refused = body
            .frame()
            .await
            .expect("a frame")
            .expect_err("120 in one call");
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(
            refused
                .message()
                .contains("too large: the server holds at most 100 bytes")
        );
        assert_eq!(pushback(&refused), "-1");
    }

    #[tokio::test]
    async fn a_call_holds_its_bytes_until_it_is_answered() {
        use tokio::sync::oneshot;
        use tower::{Layer, ServiceExt};
        let layer = ReceiveBudgetLayer::new(100, INFLATED, 250);
        let budget = Arc::clone(&layer.budget);
        let (read_tx, read_rx) = oneshot::channel::<()>();
        let (answer_tx, answer_rx) = oneshot::channel::<()>();
        let channels = Arc::new(std::sync::Mutex::new(Some((read_tx, answer_rx))));
        // Reads the message and drops the body (as tonic does for a unary call), then waits for
        // the test before it answers (as a call waiting for a slot, then served).
        let handler = tower::service_fn(move |request: http::Request<Body>| {
            let (read, answer) = channels.lock().expect("lock").take().expect("one call");
            async move {
                let len = request
                    .into_body()
                    .collect()
                    .await
                    .expect("read")
                    .to_bytes()
                    .len();
                read.send(()).expect("the test waits");
                answer.await.expect("answered");
                Ok::<_, std::convert::Infallible>(len)
            }
        });
        let request = http::Request::builder()
            .uri("/polyhead.v1.Polyhead/Detect")
            .body(body(&[40, 20]))
            .expect("request");
        let call = tokio::spawn(layer.layer(handler).oneshot(request));
        read_rx.await.expect("the message was read");
        assert_eq!(
            budget.bytes.available_permits(),
            40,
            "the body is gone, the call not answered"
        );
        answer_tx.send(()).expect("the call waits");
        assert_eq!(call.await.expect("join"), Ok(60));
        assert_eq!(
            budget.bytes.available_permits(),
            100,
            "given back once answered"
        );
    }

    #[tokio::test]
    async fn health_and_reflection_bodies_pass_outside_the_budget() {
        use tower::{Layer, ServiceExt};
        let layer = ReceiveBudgetLayer::new(10, INFLATED, 250);
        let read_all = tower::service_fn(|request: http::Request<Body>| async move {
            let read = request
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes().len());
            Ok::<_, std::convert::Infallible>(read.map_err(|s| s.code()))
        });
        let call = |path: &str| {
            let request = http::Request::builder()
                .uri(path)
                .body(body(&[30]))
                .expect("request");
            layer.layer(read_all).oneshot(request)
        };
        for path in [
            "/grpc.health.v1.Health/Check",
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        ] {
            assert_eq!(call(path).await.expect("answered"), Ok(30), "{path}");
        }
        let held = call("/polyhead.v1.Polyhead/Detect")
            .await
            .expect("answered");
        assert_eq!(held, Err(tonic::Code::ResourceExhausted));
    }
}

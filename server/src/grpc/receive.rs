//! One budget for the request bytes being received, over every call and connection.
//!
//! Each call's message limit bounds what one call may send, but not how many calls send at
//! once: a client with many connections and streams could make the server buffer their uploads
//! all together, and hold them all while their calls wait for a slot. Every request body draws
//! on one budget as its bytes arrive (as sent, gRPC framing included), and the call gives them
//! back once it has been answered and its body is gone: a unary call when its handler has its
//! reply, a streaming call when its response starts and its request stream has ended (a
//! RecognizeActionWindows upload once the call is admitted). So the budget bounds the request
//! messages the server holds at once, whether they are arriving, waiting for a slot or being
//! served. A call cannot hold them for ever: its deadline also runs while its message arrives.
//!
//! A compressed message (its gRPC prefix's flag set) is inflated once it has arrived whole,
//! after its bytes were counted, to as much as `--max-message-bytes`: a gzip message of a few
//! KiB can take all of it. So once a compressed message is in, its call also holds what it may
//! inflate to, up to the most the call may hold decoded ([`Inflated`]); a call that has sent
//! part of a message holds only what it has sent.
//!
//! A call whose next bytes would go over the budget is refused with RESOURCE_EXHAUSTED and the
//! configured `grpc-retry-pushback-ms`, as the bytes are freed as soon as other calls' messages
//! are in; one that alone holds more than the whole budget is told it can never fit (pushback
//! -1). Health checks and reflection, whose messages are a few bytes (their services decode at
//! most [`EXEMPT_MESSAGE_BYTES`]), are not held to it: a probe must get through while the server
//! is busy.

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

/// What a call's compressed messages count at once they have arrived: what they may inflate to.
#[derive(Debug, Clone, Copy)]
pub struct Inflated {
    /// One compressed message: `--max-message-bytes`.
    pub message: u64,
    /// The most a call of one message holds: `--max-message-bytes` and its framing.
    pub call: u64,
    /// The most a RecognizeActionWindows upload holds: its video, `--max-video-bytes` (one
    /// message's limit if larger), and the framing of its messages.
    pub upload: u64,
}

impl Inflated {
    /// The limits on a message and on an upload's messages, each with `framing` bytes for the
    /// gRPC prefixes.
    pub fn new(max_message_bytes: u64, max_upload_bytes: u64, framing: u64) -> Self {
        Self {
            message: max_message_bytes,
            call: max_message_bytes.saturating_add(framing),
            upload: max_upload_bytes
                .max(max_message_bytes)
                .saturating_add(framing),
        }
    }

    /// The most a call to `path` holds once its compressed messages are counted inflated.
    fn ceiling(&self, path: &str) -> usize {
        let bytes = if path == UPLOAD_PATH {
            self.upload
        } else {
            self.call
        };
        usize::try_from(bytes).unwrap_or(usize::MAX)
    }
}

/// Where a request body is in its gRPC messages: each is a 5-byte prefix (a compressed flag,
/// then the length, big-endian) and that many bytes.
#[derive(Debug, Default)]
struct Framing {
    /// The next message's prefix, as far as it has arrived.
    prefix: [u8; 5],
    prefix_len: usize,
    /// Bytes of the current message still to come.
    remaining: usize,
    /// Whether the current message is compressed.
    compressed: bool,
}

impl Framing {
    /// Reads the body's next `data`; answers how many compressed messages it completed.
    fn read(&mut self, mut data: &[u8]) -> usize {
        let mut completed = 0;
        while !data.is_empty() {
            if self.remaining > 0 {
                let n = self.remaining.min(data.len());
                self.remaining -= n;
                data = &data[n..];
                completed += usize::from(self.remaining == 0 && self.compressed);
                continue;
            }
            let n = (self.prefix.len() - self.prefix_len).min(data.len());
            self.prefix[self.prefix_len..self.prefix_len + n].copy_from_slice(&data[..n]);
            self.prefix_len += n;
            data = &data[n..];
            if self.prefix_len == self.prefix.len() {
                self.prefix_len = 0;
                self.compressed = self.prefix[0] == 1;
                let [_, length @ ..] = self.prefix;
                self.remaining = usize::try_from(u32::from_be_bytes(length)).unwrap_or(usize::MAX);
            }
        }
        completed
    }
}

/// The layer that holds every request body to the server's receive budget.
#[derive(Debug, Clone)]
pub struct ReceiveBudgetLayer {
    budget: Arc<Budget>,
    inflated: Inflated,
}

impl ReceiveBudgetLayer {
    /// A budget of `bytes` received at once, compressed messages held at `inflated`; refusals
    /// ask clients to wait `pushback_ms`.
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
    /// Takes `len` more bytes from the budget for a call that holds `held`; `inflating` when
    /// the call counts compressed messages at what they may inflate to.
    fn take(
        &self,
        held: usize,
        len: usize,
        inflating: bool,
    ) -> Result<OwnedSemaphorePermit, Status> {
        let compressed = if inflating {
            "; a compressed message counts at the --max-message-bytes it may inflate to"
        } else {
            ""
        };
        if held.saturating_add(len) > self.total {
            return Err(refusal(
                -1,
                format!(
                    "the request is too large: the server holds at most {} bytes of requests \
                     at once (--max-receiving-bytes){compressed}",
                    self.total
                ),
            ));
        }
        acquire(&self.bytes, len).ok_or_else(|| {
            let in_use = self.total - self.bytes.available_permits();
            let message = format!(
                "the server holds {in_use} of the {} bytes of requests it may hold at once, \
                 received and not yet answered (--max-receiving-bytes){compressed}",
                self.total
            );
            refusal(i64::try_from(self.pushback_ms).unwrap_or(i64::MAX), message)
        })
    }
}

/// `len` permits of `semaphore` (at least one), taken at once or not at all; more than a
/// `u32` of them in several takes.
fn acquire(semaphore: &Arc<Semaphore>, len: usize) -> Option<OwnedSemaphorePermit> {
    let mut taken: Option<OwnedSemaphorePermit> = None;
    let mut left = len;
    while left > 0 {
        let n = u32::try_from(left).unwrap_or(u32::MAX);
        let more = Arc::clone(semaphore).try_acquire_many_owned(n).ok()?;
        match &mut taken {
            Some(taken) => taken.merge(more),
            none => *none = Some(more),
        }
        left -= n as usize;
    }
    taken
}

/// RESOURCE_EXHAUSTED with `message` and a `grpc-retry-pushback-ms` of `pushback_ms` (negative:
/// do not retry).
fn refusal(pushback_ms: i64, message: String) -> Status {
    let mut metadata = MetadataMap::new();
    metadata.insert(RETRY_PUSHBACK, MetadataValue::from(pushback_ms));
    Status::with_metadata(tonic::Code::ResourceExhausted, message, metadata)
}

/// The largest request message the paths outside the budget take (their services' decoding
/// limit): a health check or reflection request is a name or two, and a call that sends part
/// of a larger one and stalls holds no more than this.
pub const EXEMPT_MESSAGE_BYTES: usize = 16 << 10;

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
        let (inflated, ceiling) = (
            usize::try_from(self.inflated.message).unwrap_or(usize::MAX),
            self.inflated.ceiling(request.uri().path()),
        );
        let held = Held::default();
        let body_held = Arc::clone(&held);
        let request = request.map(|inner| {
            Body::new(Budgeted {
                inner,
                budget,
                held: body_held,
                framing: Framing::default(),
                received: 0,
                inflating: 0,
                inflated,
                ceiling,
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

/// A request body that holds the bytes it has delivered against the budget, and what its
/// compressed messages may inflate to, with its call's response future: they go back when both
/// are gone.
struct Budgeted {
    inner: Body,
    budget: Arc<Budget>,
    held: Held,
    framing: Framing,
    /// Bytes delivered so far.
    received: usize,
    /// What the compressed messages delivered so far may inflate to.
    inflating: usize,
    /// What one compressed message may inflate to.
    inflated: usize,
    /// The most the call holds once its compressed messages count inflated.
    ceiling: usize,
}

impl http_body::Body for Budgeted {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        let data = match &frame {
            Some(Ok(frame)) => frame.data_ref().filter(|data| !data.is_empty()),
            _ => None,
        };
        if let Some(data) = data {
            let this = &mut *self;
            let completed = this.framing.read(data);
            this.received = this.received.saturating_add(data.len());
            this.inflating = this
                .inflating
                .saturating_add(completed.saturating_mul(this.inflated));
            let inflating = this.inflating > 0;
            let wanted = this.received.max(
                this.received
                    .saturating_add(this.inflating)
                    .min(this.ceiling),
            );
            let mut held = this.held.lock().unwrap_or_else(PoisonError::into_inner);
            let holds = held.as_ref().map_or(0, OwnedSemaphorePermit::num_permits);
            if wanted > holds {
                let permit = match this.budget.take(holds, wanted - holds, inflating) {
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

    /// A compressed message may inflate to 40 bytes; a call holds at most 50 once its
    /// compressed messages count inflated, an upload 80.
    const INFLATED: Inflated = Inflated {
        message: 40,
        call: 50,
        upload: 80,
    };

    fn budgeted(budget: &Arc<Budget>, chunks: &[usize]) -> Budgeted {
        Budgeted {
            inner: body(chunks),
            budget: Arc::clone(budget),
            held: Held::default(),
            framing: Framing::default(),
            received: 0,
            inflating: 0,
            inflated: 40,
            ceiling: 50,
        }
    }

    /// A body of `frames` on a call to `path`, as the layer makes it.
    fn framed(budget: &Arc<Budget>, path: &str, frames: Vec<Vec<u8>>) -> Budgeted {
        let frames = frames
            .into_iter()
            .map(|f| Ok::<_, Status>(Frame::data(Bytes::from(f))))
            .collect::<Vec<_>>();
        Budgeted {
            inner: Body::new(http_body_util::StreamBody::new(futures_util::stream::iter(
                frames,
            ))),
            ceiling: INFLATED.ceiling(path),
            ..budgeted(budget, &[])
        }
    }

    /// A gRPC message of `len` bytes, compressed or not.
    fn message(compressed: bool, len: u32) -> Vec<u8> {
        let mut message = vec![u8::from(compressed)];
        message.extend(len.to_be_bytes());
        message.extend(std::iter::repeat_n(7, len as usize));
        message
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
    fn the_upload_path_is_the_generated_services() {
        let service = polyhead_proto::v1::polyhead_server::SERVICE_NAME;
        assert_eq!(UPLOAD_PATH, format!("/{service}/RecognizeActionWindows"));
        let inflated = Inflated::new(40, 75, 5);
        assert_eq!(
            (inflated.message, inflated.call, inflated.upload),
            (40, 45, 80)
        );
        assert_eq!(Inflated::new(40, 10, 5).upload, 45, "one message at least");
        assert_eq!(INFLATED.ceiling("/polyhead.v1.Polyhead/Detect"), 50);
        assert_eq!(INFLATED.ceiling(UPLOAD_PATH), 80);
    }

    #[test]
    fn framing_counts_the_compressed_messages_it_completes_however_they_are_split() {
        let body = [
            message(true, 3),
            message(false, 4),
            message(true, 0),
            message(true, 2),
        ]
        .concat();
        for split in 1..=body.len() {
            let mut framing = Framing::default();
            let completed: Vec<usize> = body.chunks(split).map(|c| framing.read(c)).collect();
            assert_eq!(completed.iter().sum::<usize>(), 2, "split every {split}");
            // The first message is complete only with its last byte.
            let first_done = completed.iter().position(|&n| n > 0).expect("one done");
            assert_eq!(first_done, (5 + 3 - 1) / split, "split every {split}");
        }
    }

    #[tokio::test]
    async fn a_compressed_message_counts_at_what_it_may_inflate_to_once_it_is_in() {
        let budget = ReceiveBudgetLayer::new(100, INFLATED, 250).budget;
        let detect = "/polyhead.v1.Polyhead/Detect";
        let whole = message(true, 10);
        let mut first = framed(
            &budget,
            detect,
            vec![whole[..8].to_vec(), whole[8..].to_vec()],
        );
        first.frame().await.expect("a frame").expect("8 of 100");
        assert_eq!(budget.bytes.available_permits(), 92, "part of a message");
        first.frame().await.expect("a frame").expect("50 of 100");
        assert_eq!(
            budget.bytes.available_permits(),
            50,
            "15 received and 40 inflated, at most 50"
        );
        let mut second = framed(&budget, detect, vec![message(true, 10)]);
        second.frame().await.expect("a frame").expect("100 of 100");
        assert_eq!(budget.bytes.available_permits(), 0);
        drop(second);
        // Uncompressed, the same message holds what it sent.
        let mut plain = framed(&budget, detect, vec![message(false, 10)]);
        plain.frame().await.expect("a frame").expect("65 of 100");
        assert_eq!(budget.bytes.available_permits(), 35);
        let mut refused = framed(&budget, detect, vec![message(true, 10)]);
        let refused = refused
            .frame()
            .await
            .expect("a frame")
            .expect_err("15 that may become 50, with 35 free");
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(
            refused
                .message()
                .contains("a compressed message counts at the --max-message-bytes"),
            "{refused:?}"
        );
        assert_eq!(pushback(&refused), "250");
        drop((first, plain));
        assert_eq!(budget.bytes.available_permits(), 100);
    }

    #[tokio::test]
    async fn an_upload_of_compressed_chunks_holds_at_most_its_ceiling() {
        let budget = ReceiveBudgetLayer::new(100, INFLATED, 250).budget;
        let chunk = || message(true, 5);
        let mut upload = framed(&budget, UPLOAD_PATH, vec![chunk(), chunk(), chunk()]);
        let mut free = Vec::new();
        while let Some(frame) = upload.frame().await {
            frame.expect("within the budget");
            free.push(budget.bytes.available_permits());
        }
        // 10 received and 40 inflated; then 20 and 80; then 30 and 120, held at 80.
        assert_eq!(free, [50, 20, 20]);
        drop(upload);
        // The same chunks on a call of one message are held at that call's ceiling.
        let mut call = framed(
            &budget,
            "/polyhead.v1.Polyhead/Detect",
            vec![chunk(), chunk()],
        );
        call.frame().await.expect("a frame").expect("50");
        call.frame().await.expect("a frame").expect("still 50");
        assert_eq!(budget.bytes.available_permits(), 50);
    }

    #[test]
    fn more_than_a_u32_of_permits_is_taken_in_parts() {
        let semaphore = Arc::new(Semaphore::new(Semaphore::MAX_PERMITS));
        let len = u32::MAX as usize + 10;
        let taken = acquire(&semaphore, len).expect("available");
        assert_eq!(taken.num_permits(), len);
        assert_eq!(semaphore.available_permits(), Semaphore::MAX_PERMITS - len);
        let small = Arc::new(Semaphore::new(5));
        assert!(acquire(&small, 6).is_none());
        assert_eq!(small.available_permits(), 5, "nothing kept of a refusal");
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

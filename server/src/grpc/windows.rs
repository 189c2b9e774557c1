//! RecognizeActionWindows: receives the video upload (the settings first, then chunks, within
//! the video size limit), takes an admission slot, then streams the pipeline's window results
//! back until the video ends, the call's deadline passes or the client goes away. Errors end the
//! stream with the status [`super::status::to_status`] gives them.

use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use futures_util::{FutureExt, Stream, StreamExt};
use polyhead_proto::v1;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use super::{convert, deadline};
use crate::admission::Slot;
use crate::config::Limits;
use crate::error::Error;
use crate::manifest::{HeadKind, HeadParams};
use crate::media::video::FrameStep;
use crate::model_set::ModelSet;
use crate::pipeline::{
    ActionWindow, Actions, MAX_DECODED_FPS, Pipeline, WindowEvent, WindowPlan, WindowProgress,
    WindowRequest,
};

/// One message of the response stream, or the status that ends it.
type Item = Result<v1::RecognizeActionWindowsResponse, Status>;

/// The response stream: the results as they come, then the status that ends it, if any.
pub(super) type WindowStream = Pin<Box<dyn Stream<Item = Item> + Send>>;

const RPC: &str = "RecognizeActionWindows";

/// Results waiting to be sent to a slow reader before the windows stop being computed.
const RESPONSE_QUEUE: usize = 4;

/// One call, from its arrival to the end of its response stream.
struct Call {
    pipeline: Arc<Pipeline>,
    request_id: String,
    limits: Limits,
    deadline: Instant,
    timeout: deadline::CallTimeout,
}

impl Call {
    fn status(&self, error: Error) -> Status {
        self.timeout
            .failed(RPC, error, &self.request_id, &self.limits)
    }

    fn expired(&self) -> Status {
        self.timeout.unfinished(RPC)
    }
}

/// Receives the upload and admits the call within its deadline, then returns the response
/// stream that a task of its own fills.
pub(super) async fn serve(
    pipeline: Arc<Pipeline>,
    request: Request<Streaming<v1::RecognizeActionWindowsRequest>>,
    request_id: String,
) -> Result<Response<WindowStream>, Status> {
    let (metadata, extensions, mut incoming) = request.into_parts();
    let limits = pipeline.limits().clone();
    let (deadline, timeout) = deadline::call_deadline(&metadata, &extensions, &limits);
    let span = crate::telemetry::rpc_span(&metadata, RPC, &request_id);
    let call = Call {
        pipeline,
        request_id,
        limits,
        deadline,
        timeout,
    };
    let start = async {
        let request = receive(&call, &mut incoming).await?;
        let slot = call.pipeline.admission().admit().await;
        Ok::<_, Status>((request, slot.map_err(|e| call.status(e.into()))?))
    };
    let started = tokio::time::timeout_at(deadline.into(), start).instrument(span.clone());
    let (request, slot) = started.await.map_err(|_| call.expired())??;
    let (out, results) = mpsc::channel(RESPONSE_QUEUE);
    let (ending, ended) = oneshot::channel();
    tokio::spawn(respond(call, request, slot, out, ending).instrument(span));
    Ok(Response::new(response_stream(results, ended)))
}

/// The messages `results` receives, then the status `ended` receives, if one is sent before
/// its sender goes. The status waits for no room in the stream's queue: a reader that stops
/// taking messages cannot hold the task that ended the stream.
fn response_stream(
    results: mpsc::Receiver<Item>,
    ended: oneshot::Receiver<Status>,
) -> WindowStream {
    let last =
        futures_util::stream::once(ended).filter_map(|status| async move { status.ok().map(Err) });
    Box::pin(ReceiverStream::new(results).chain(last))
}

/// Reads the settings and every chunk until the client half-closes.
async fn receive(
    call: &Call,
    incoming: &mut Streaming<v1::RecognizeActionWindowsRequest>,
) -> Result<WindowRequest, Status> {
    let invalid = |m: &str| call.status(Error::InvalidArgument(m.to_string()));
    let first = incoming
        .message()
        .await?
        .ok_or_else(|| invalid("the request stream ended before its first message"))?;
    let options = first
        .options
        .ok_or_else(|| invalid("the first message must carry options"))?;
    let settings = settings(call.pipeline.models(), &call.limits, options);
    let (head, plan, step, top_k) = settings.map_err(|e| call.status(e))?;
    check_size(first.chunk.len(), &call.limits).map_err(|e| call.status(e))?;
    // A video in one message is kept as received; later chunks are appended as they come, so
    // the upload holds its bytes once, however many (or empty) messages carry them.
    let mut video = Upload::One(first.chunk);
    while let Some(next) = incoming.message().await? {
        check_size(video.len() + next.chunk.len(), &call.limits).map_err(|e| call.status(e))?;
        video.append(&next.chunk);
    }
    if video.len() == 0 {
        return Err(invalid("the video is empty: send it in chunk"));
    }
    let video = video.into_bytes();
    Ok(WindowRequest {
        video,
        head,
        plan,
        step,
        top_k,
    })
}

/// The video received so far.
enum Upload {
    /// All of it came in one message.
    One(Bytes),
    /// Several messages, appended.
    Joined(BytesMut),
}

impl Upload {
    fn len(&self) -> usize {
        match self {
            Self::One(bytes) => bytes.len(),
            Self::Joined(bytes) => bytes.len(),
        }
    }

    fn append(&mut self, chunk: &[u8]) {
        if chunk.is_empty() {
            return;
        }
        match self {
            Self::One(first) => {
                let mut joined = BytesMut::with_capacity(first.len() + chunk.len());
                joined.extend_from_slice(first);
                joined.extend_from_slice(chunk);
                *self = Self::Joined(joined);
            }
            Self::Joined(joined) => joined.extend_from_slice(chunk),
        }
    }

    fn into_bytes(self) -> Bytes {
        match self {
            Self::One(bytes) => bytes,
            Self::Joined(bytes) => bytes.freeze(),
        }
    }
}

/// Refuses an upload past the video size limit.
fn check_size(len: usize, limits: &Limits) -> Result<(), Error> {
    if len as u64 > limits.max_video_bytes {
        return Err(Error::InvalidArgument(format!(
            "the video is over {} bytes (--max-video-bytes)",
            limits.max_video_bytes
        )));
    }
    Ok(())
}

type Settings = (Arc<crate::model_set::Head>, WindowPlan, FrameStep, usize);

/// Validates the options against the head's parameters and the server's limits.
fn settings(
    models: &ModelSet,
    limits: &Limits,
    options: v1::WindowOptions,
) -> Result<Settings, Error> {
    let v1::WindowOptions {
        head,
        window_frames,
        window_stride,
        frame_step,
        sample_fps,
        top_k,
    } = options;
    let head = convert::head(models, &head, HeadKind::Action)?;
    let HeadParams::Action(params) = &head.params else {
        return Err(Error::Internal(format!(
            "head '{}' is not an action head",
            head.name()
        )));
    };
    let window_frames = params
        .clip_frames(window_frames, limits.max_frames, "window_frames")
        .map_err(Error::InvalidArgument)?;
    let action = v1::ActionOptions {
        num_frames: window_frames,
        frame_stride: 0,
        top_k,
    };
    let choice = convert::action_options(Some(action), params, limits)?;
    let length = choice.num_frames;
    let stride = if window_stride == 0 {
        length
    } else {
        window_stride as usize
    };
    let step = match (frame_step, sample_fps) {
        (_, fps) if !(fps.is_finite() && fps >= 0.0) => {
            return Err(Error::InvalidArgument(format!(
                "sample_fps is {fps}; it must be a positive number"
            )));
        }
        (_, fps) if f64::from(fps) > MAX_DECODED_FPS => {
            return Err(Error::InvalidArgument(format!(
                "sample_fps is {fps}; the most is {MAX_DECODED_FPS} (frame_step 1 samples every \
                 frame)"
            )));
        }
        (0, fps) if fps > 0.0 => FrameStep::Rate(f64::from(fps)),
        (n, 0.0) => FrameStep::Every(n.max(1) as usize),
        _ => {
            return Err(Error::InvalidArgument(
                "set frame_step or sample_fps, not both".into(),
            ));
        }
    };
    Ok((head, WindowPlan { length, stride }, step, choice.top_k))
}

/// Runs the windows in the call's slot and sends their results; ends the stream with the
/// error's status, or DEADLINE_EXCEEDED. Stops as soon as the client goes away.
async fn respond(
    call: Call,
    request: WindowRequest,
    slot: Slot,
    out: mpsc::Sender<Item>,
    ending: oneshot::Sender<Status>,
) {
    let video_bytes = request.video.len() as u64;
    let head = Arc::clone(&request.head);
    let (events, results) = mpsc::channel(1);
    let work =
        crate::engine::within_deadline(call.deadline, call.pipeline.run_windows(request, events));
    let to_message = |event| response(event, &head.labels, video_bytes);
    let end = forward(call.deadline, work, results, &out, to_message).await;
    // The work is over: the slot goes back now, whenever the reader takes what is left.
    drop(slot);
    let status = match end {
        End::Answered => return,
        End::Failed(error) => call.status(error),
        End::Expired => call.expired(),
    };
    let _ = ending.send(status);
}

/// How a window stream's work ended.
#[derive(Debug)]
enum End {
    /// Its summary was sent, or the client went away: nothing more to send.
    Answered,
    /// The work failed before its summary.
    Failed(Error),
    /// The deadline passed before the summary was sent.
    Expired,
}

/// Runs `work` until `deadline`, sending each of its events to `out` as it comes. Once the
/// summary is sent the stream has its answer: a deadline that passes while the work winds
/// down adds no status after it. A panic (a bug) fails the stream with INTERNAL rather than
/// ending it as if it had been answered.
async fn forward<M>(
    deadline: Instant,
    work: impl Future<Output = Result<(), Error>>,
    mut results: mpsc::Receiver<WindowEvent>,
    out: &mpsc::Sender<Result<M, Status>>,
    to_message: impl Fn(WindowEvent) -> M,
) -> End {
    let summarized = AtomicBool::new(false);
    let send = async {
        while let Some(event) = results.recv().await {
            let done = matches!(event, WindowEvent::Done(..));
            if out.send(Ok(to_message(event))).await.is_err() {
                return;
            }
            summarized.store(done, Ordering::Relaxed);
        }
    };
    let both = AssertUnwindSafe(async { tokio::join!(work, send).0 })
        .catch_unwind()
        .map(|ended| ended.unwrap_or_else(|_| Err(Error::panicked())));
    let outcome = tokio::select! {
        outcome = tokio::time::timeout_at(deadline.into(), both) => outcome,
        () = out.closed() => return End::Answered,
    };
    match outcome {
        Ok(Ok(())) => End::Answered,
        Ok(Err(error)) => End::Failed(error),
        Err(_) if summarized.load(Ordering::Relaxed) => End::Answered,
        Err(_) => End::Expired,
    }
}

/// A pipeline event as sent on the wire.
fn response(
    event: WindowEvent,
    labels: &[String],
    video_bytes: u64,
) -> v1::RecognizeActionWindowsResponse {
    use v1::recognize_action_windows_response::Event;
    let (event, progress) = match event {
        WindowEvent::Window(window, progress) => {
            (Event::Window(action_window(window, labels)), progress)
        }
        WindowEvent::Done(timings, progress) => {
            let summary = v1::WindowsSummary {
                windows: progress.windows_done as u32,
                frames_sampled: progress.frames_sampled as u64,
                video_bytes,
                timings: Some(convert::timings(timings)),
            };
            (Event::Summary(summary), progress)
        }
    };
    v1::RecognizeActionWindowsResponse {
        event: Some(event),
        progress: Some(window_progress(progress)),
    }
}

fn action_window(window: ActionWindow, labels: &[String]) -> v1::ActionWindow {
    let ActionWindow {
        index,
        first_frame,
        frame_timestamps,
        top,
        timings,
    } = window;
    let start_s = frame_timestamps.first().copied().unwrap_or_default();
    let end_s = frame_timestamps.last().copied().unwrap_or_default();
    let actions = convert::actions(
        Actions {
            top,
            frame_timestamps,
        },
        labels,
    );
    v1::ActionWindow {
        index: index as u32,
        first_frame: first_frame as u32,
        start_s,
        end_s,
        frame_timestamps: actions.frame_timestamps,
        top: actions.top,
        timings: Some(convert::timings(timings)),
    }
}

fn window_progress(p: WindowProgress) -> v1::WindowProgress {
    let WindowProgress {
        frames_sampled,
        windows_done,
        frames_estimated,
        windows_estimated,
        duration_s,
    } = p;
    v1::WindowProgress {
        frames_sampled: frames_sampled as u64,
        windows_done: windows_done as u32,
        frames_estimated: frames_estimated as u64,
        windows_estimated: windows_estimated as u32,
        duration_s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::Timings;
    use std::time::Duration;

    fn done() -> WindowEvent {
        WindowEvent::Done(Timings::default(), WindowProgress::default())
    }

    #[tokio::test]
    async fn the_ending_status_follows_the_queued_results_without_waiting_for_room() {
        let (out, results) = mpsc::channel(1);
        out.try_send(Ok(v1::RecognizeActionWindowsResponse::default()))
            .expect("room for one");
        let (ending, ended) = oneshot::channel();
        // The queue is full and nobody reads: the status is handed over at once.
        ending
            .send(Status::deadline_exceeded("late"))
            .expect("the stream holds its receiver");
        drop(out);
        let items: Vec<Item> = response_stream(results, ended).collect().await;
        assert_eq!(items.len(), 2);
        assert!(items[0].is_ok());
        let status = items[1].as_ref().expect_err("the ending status");
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded);

        // Answered: the stream ends after its messages, with no status of its own.
        let (out, results) = mpsc::channel(1);
        out.try_send(Ok(v1::RecognizeActionWindowsResponse::default()))
            .expect("room for one");
        let (ending, ended) = oneshot::channel::<Status>();
        drop((out, ending));
        let items: Vec<Item> = response_stream(results, ended).collect().await;
        assert_eq!(items.len(), 1);
        assert!(items[0].is_ok());
    }

    /// Runs [`forward`] on `work`, which gets the event sender; returns how it ended and
    /// whether each message sent was the summary.
    async fn forwarded<F>(
        deadline: Instant,
        work: impl FnOnce(mpsc::Sender<WindowEvent>) -> F,
    ) -> (End, Vec<bool>)
    where
        F: Future<Output = Result<(), Error>>,
    {
        let (events, results) = mpsc::channel(1);
        let (out, mut sent) = mpsc::channel(8);
        let to_message = |event| matches!(event, WindowEvent::Done(..));
        let end = forward(deadline, work(events), results, &out, to_message).await;
        drop(out);
        let mut messages = Vec::new();
        while let Some(message) = sent.recv().await {
            messages.push(message.expect("only messages are sent here"));
        }
        (end, messages)
    }

    #[tokio::test]
    async fn a_deadline_after_the_summary_adds_nothing_to_the_stream() {
        let deadline = Instant::now() + Duration::from_millis(200);
        let (end, sent) = forwarded(deadline, |events| async move {
            events.send(done()).await.expect("forwarded");
            // The work winds down past the deadline after its summary has gone out.
            tokio::time::sleep(Duration::from_secs(30)).await;
            Ok(())
        })
        .await;
        assert!(matches!(end, End::Answered), "{end:?}");
        assert_eq!(sent, [true]);
    }

    #[tokio::test]
    async fn a_deadline_before_the_summary_is_expired_and_errors_fail() {
        let deadline = Instant::now() + Duration::from_millis(200);
        let (end, sent) = forwarded(deadline, |_events| async {
            tokio::time::sleep(Duration::from_secs(30)).await;
            Ok(())
        })
        .await;
        assert!(matches!(end, End::Expired), "{end:?}");
        assert!(sent.is_empty());

        let (end, _) = forwarded(deadline, |_events| async {
            Err(Error::InvalidArgument("bad frame".into()))
        })
        .await;
        assert!(
            matches!(end, End::Failed(Error::InvalidArgument(_))),
            "{end:?}"
        );
    }

    #[tokio::test]
    async fn a_panic_fails_the_stream_rather_than_ending_it() {
        let deadline = Instant::now() + Duration::from_secs(30);
        let (end, sent) = forwarded(deadline, |_events| async {
            panic!("a bug in the window loop");
        })
        .await;
        assert!(
            matches!(&end, End::Failed(Error::Internal(m)) if m.contains("panicked")),
            "{end:?}"
        );
        assert!(sent.is_empty());
    }

    #[test]
    fn an_upload_holds_its_bytes_once_whatever_its_messages() {
        let one = Upload::One(Bytes::from_static(b"video"));
        let first = one.into_bytes();
        assert_eq!(&first[..], b"video");

        let mut upload = Upload::One(Bytes::from_static(b"ab"));
        for chunk in [&b""[..], b"cd", b"", b"", b"e"] {
            upload.append(chunk);
        }
        assert_eq!(upload.len(), 5);
        assert!(
            matches!(upload, Upload::Joined(_)),
            "several chunks are joined"
        );
        assert_eq!(&upload.into_bytes()[..], b"abcde");

        let mut empty_chunks = Upload::One(Bytes::from_static(b"whole"));
        for _ in 0..1000 {
            empty_chunks.append(b"");
        }
        assert!(
            matches!(empty_chunks, Upload::One(_)),
            "empty messages add nothing"
        );
    }
}

//! RecognizeActionWindows from the client's side: the chunked upload and [`WindowStream`], the
//! response stream held to the call's deadline with its failures classified like a unary call's.

use polyhead_proto::Bytes;
use polyhead_proto::v1;

use crate::deadline::Deadline;
use crate::error::{ClientError, Result};

/// The responses of a RecognizeActionWindows call, one per window as it completes, then the
/// summary; see [`crate::Client::stream_windows`].
///
/// tonic's deadline covers only the wait for the response headers; this stream also holds every
/// later message to the call's deadline, so that a server that stops answering cannot keep the
/// caller waiting past it.
#[derive(Debug)]
pub struct WindowStream {
    inner: tonic::Streaming<v1::RecognizeActionWindowsResponse>,
    deadline: Deadline,
    /// Whether the summary has arrived.
    summarized: bool,
}

impl WindowStream {
    /// Wraps `inner`, the responses of a call held to `deadline`.
    pub(crate) fn new(
        inner: tonic::Streaming<v1::RecognizeActionWindowsResponse>,
        deadline: Deadline,
    ) -> Self {
        Self {
            inner,
            deadline,
            summarized: false,
        }
    }

    /// The next response, or `None` once the server has ended the stream after its summary. A
    /// failure ends the stream: [`ClientError::Timeout`] when the deadline passes first, the
    /// classified status otherwise (a broken connection is UNAVAILABLE, see
    /// [`ClientError::code`]), and INTERNAL when the stream ends without a summary, its result
    /// incomplete. Once the summary has arrived the stream has its answer: a deadline that
    /// passes while its end is on the way ends it as if it had arrived.
    pub async fn message(&mut self) -> Result<Option<v1::RecognizeActionWindowsResponse>> {
        let after = self.deadline.budget();
        match tokio::time::timeout_at(self.deadline.tokio_instant(), self.inner.message()).await {
            Ok(Ok(None)) if !self.summarized => Err(ClientError::Status(tonic::Status::internal(
                "the server ended the stream before its summary: the windows received are not \
                 the whole result",
            ))),
            Ok(Ok(message)) => {
                self.summarized |= message.as_ref().is_some_and(is_summary);
                Ok(message)
            }
            Ok(Err(status)) => Err(ClientError::from_call(status, &self.deadline)),
            Err(_elapsed) if self.summarized => Ok(None),
            Err(_elapsed) => Err(ClientError::Timeout { after }),
        }
    }

    /// The raw response stream, no longer held to the deadline.
    pub fn into_inner(self) -> tonic::Streaming<v1::RecognizeActionWindowsResponse> {
        self.inner
    }
}

fn is_summary(message: &v1::RecognizeActionWindowsResponse) -> bool {
    matches!(
        message.event,
        Some(v1::recognize_action_windows_response::Event::Summary(_))
    )
}

/// The upload of a RecognizeActionWindows call: `options` and the first chunk, then the rest
/// of `video` in chunks of at most `chunk_bytes` (at least 1), each a view of `video`.
pub(crate) fn window_messages(
    video: Bytes,
    options: v1::WindowOptions,
    chunk_bytes: usize,
) -> Vec<v1::RecognizeActionWindowsRequest> {
    let chunk_bytes = chunk_bytes.max(1);
    let mut options = Some(options);
    let mut messages: Vec<_> = (0..video.len())
        .step_by(chunk_bytes)
        .map(|start| v1::RecognizeActionWindowsRequest {
            options: options.take(),
            chunk: video.slice(start..(start + chunk_bytes).min(video.len())),
        })
        .collect();
    if let Some(options) = options {
        messages.push(v1::RecognizeActionWindowsRequest {
            options: Some(options),
            chunk: Bytes::new(),
        });
    }
    messages
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_options_travel_with_the_first_chunk() {
        let video = Bytes::from(vec![1u8; 10]);
        let options = v1::WindowOptions {
            window_frames: 8,
            ..v1::WindowOptions::default()
        };
        let messages = window_messages(video, options.clone(), 4);
        let sizes: Vec<_> = messages.iter().map(|m| m.chunk.len()).collect();
        assert_eq!(sizes, [4, 4, 2]);
        assert_eq!(messages[0].options.as_ref(), Some(&options));
        assert!(messages[1..].iter().all(|m| m.options.is_none()));
        let empty = window_messages(Bytes::new(), options.clone(), 4);
        assert_eq!(empty.len(), 1);
        assert_eq!(empty[0].options.as_ref(), Some(&options));
    }
}

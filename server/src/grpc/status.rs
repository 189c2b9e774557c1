//! The one place where errors become gRPC statuses.

use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Code, Status};

use crate::config::Limits;
use crate::engine::EngineError;
use crate::error::Error;

/// The standard gRPC retry hint: how many milliseconds a client should wait before retrying.
pub(super) const RETRY_PUSHBACK: &str = "grpc-retry-pushback-ms";

/// The most characters of an error's message a status carries. Messages quote what the client
/// sent (a model's name, a tensor's shape), and a status travels in a header, which peers cap:
/// gRPC's C core takes 8 KiB of metadata by default, and tonic percent-encodes every byte that
/// is not printable ASCII.
const MAX_MESSAGE_CHARS: usize = 512;

/// Maps a request's error to its status. Server-side failures are logged with the request id,
/// which the caller also receives, so that the two can be matched. RESOURCE_EXHAUSTED carries
/// the configured retry hint, so that clients back off for as long as the server asks. A
/// message is cut at [`MAX_MESSAGE_CHARS`].
pub fn to_status(error: Error, request_id: &str, limits: &Limits) -> Status {
    let code = code(&error);
    let message = match code {
        Code::Internal => {
            tracing::error!(request_id, %error, "request failed");
            format!("{} (request id {request_id})", bounded(error.to_string()))
        }
        _ => bounded(error.to_string()),
    };
    let mut metadata = MetadataMap::new();
    if code == Code::ResourceExhausted {
        metadata.insert(
            RETRY_PUSHBACK,
            MetadataValue::from(limits.retry_pushback_ms),
        );
    }
    Status::with_metadata(code, message, metadata)
}

/// `message`, cut after [`MAX_MESSAGE_CHARS`] characters with an ellipsis.
fn bounded(mut message: String) -> String {
    if let Some((end, _)) = message.char_indices().nth(MAX_MESSAGE_CHARS) {
        message.truncate(end);
        message.push('…');
    }
    message
}

fn code(error: &Error) -> Code {
    match error {
        Error::InvalidArgument(_) => Code::InvalidArgument,
        Error::Media(e) if e.is_internal() => Code::Internal,
        // Decoding memory other calls hold for now: the same call may succeed later.
        Error::Media(e) if e.is_full() => Code::ResourceExhausted,
        // A limit breach is the request's fault too, and retrying it cannot succeed: it is
        // INVALID_ARGUMENT, not RESOURCE_EXHAUSTED (which clients treat as retryable).
        Error::Media(_) => Code::InvalidArgument,
        Error::NotFound(_) => Code::NotFound,
        Error::FailedPrecondition(_) => Code::FailedPrecondition,
        Error::Full(_) => Code::ResourceExhausted,
        Error::Engine(e) => engine_code(e),
        Error::Head(_) | Error::Internal(_) => Code::Internal,
    }
}

fn engine_code(error: &EngineError) -> Code {
    match error {
        EngineError::Overloaded { .. } => Code::ResourceExhausted,
        EngineError::Stopped(_) => Code::Unavailable,
        EngineError::Expired(_) => Code::DeadlineExceeded,
        EngineError::Library(_)
        | EngineError::Load { .. }
        | EngineError::Device(_)
        | EngineError::Run { .. } => Code::Internal,
    }
}

/// The start of tonic's refusal of a request message over `max_decoding_message_size`.
const TOO_LARGE: &str = "Error, decoded message length too large";
/// The start of tonic's refusal of a compressed message that inflates past the limit.
const INFLATES_TOO_LARGE: &str = "Error decompressing: size limit";

/// Answers a request message over the size limit the way gRPC's own implementations do:
/// RESOURCE_EXHAUSTED, not tonic's OUT_OF_RANGE, naming the limit's flag; a compressed message
/// that inflates past the limit (a gzip bomb) is refused the same way. Both carry a negative
/// `grpc-retry-pushback-ms`, which asks clients not to retry (gRPC retry design, A6): the same
/// message would be refused again. Any other response passes unchanged.
pub fn message_limits<B: Default>(response: http::Response<B>) -> http::Response<B> {
    let Some(status) = Status::from_header_map(response.headers()) else {
        return response;
    };
    let refused = match status.code() {
        Code::OutOfRange => status.message().starts_with(TOO_LARGE),
        Code::ResourceExhausted => status.message().starts_with(INFLATES_TOO_LARGE),
        _ => false,
    };
    if !refused {
        return response;
    }
    let mut metadata = MetadataMap::new();
    metadata.insert(RETRY_PUSHBACK, MetadataValue::from(-1));
    let message = format!(
        "the request message is too large (--max-message-bytes): {}",
        status.message()
    );
    Status::with_metadata(Code::ResourceExhausted, message, metadata).into_http()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn limits() -> Limits {
        Config::for_models("m").limits
    }

    fn overloaded() -> Error {
        Error::Engine(EngineError::Overloaded {
            model: "backbone".into(),
            capacity: 4,
        })
    }

    #[test]
    fn each_error_has_its_status() {
        let limits = limits();
        assert_eq!(
            to_status(overloaded(), "r1", &limits).code(),
            Code::ResourceExhausted
        );
        assert_eq!(
            to_status(Error::InvalidArgument("x".into()), "r1", &limits).code(),
            Code::InvalidArgument
        );
        assert_eq!(
            to_status(Error::NotFound("x".into()), "r1", &limits).code(),
            Code::NotFound
        );
        let stopped = Error::Engine(EngineError::Stopped("backbone".into()));
        assert_eq!(to_status(stopped, "r1", &limits).code(), Code::Unavailable);
    }

    #[test]
    fn long_messages_are_cut_and_keep_the_request_id() {
        let echoed = "é".repeat(1 << 20);
        let status = to_status(
            Error::NotFound(format!("no model named '{echoed}'")),
            "r1",
            &limits(),
        );
        assert_eq!(status.code(), Code::NotFound);
        assert_eq!(status.message().chars().count(), MAX_MESSAGE_CHARS + 1);
        assert!(status.message().starts_with("no model named 'éé"));
        assert!(status.message().ends_with('…'));
        let status = to_status(Error::Internal(echoed), "req-7", &limits());
        assert!(status.message().ends_with("… (request id req-7)"));
        let short = to_status(
            Error::NotFound("no model named 'x'".into()),
            "r1",
            &limits(),
        );
        assert_eq!(short.message(), "no model named 'x'");
    }

    #[test]
    fn internal_errors_carry_the_request_id() {
        let status = to_status(Error::Internal("boom".into()), "req-42", &limits());
        assert_eq!(status.code(), Code::Internal);
        assert!(status.message().contains("req-42"), "{}", status.message());
    }

    #[test]
    fn overload_carries_the_configured_retry_pushback() {
        let mut limits = limits();
        let pushback = |status: &Status| {
            status
                .metadata()
                .get(RETRY_PUSHBACK)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let default = to_status(overloaded(), "r1", &limits);
        assert_eq!(pushback(&default).as_deref(), Some("100"));
        limits.retry_pushback_ms = 250;
        let configured = to_status(overloaded(), "r1", &limits);
        assert_eq!(pushback(&configured).as_deref(), Some("250"));
        let stopped = Error::Engine(EngineError::Stopped("backbone".into()));
        assert_eq!(pushback(&to_status(stopped, "r1", &limits)), None);
        // Decoding memory full for now is retried after the same hint; more than all of it
        // never fits, and is the request's fault.
        let full = Error::Media(crate::media::MediaError::DecodingMemoryFull {
            needed: 10,
            others: 95,
            limit: 100,
        });
        let status = to_status(full, "r1", &limits);
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert_eq!(pushback(&status).as_deref(), Some("250"));
        let never = Error::Media(crate::media::MediaError::DecodingMemoryTooSmall {
            needed: 101,
            limit: 100,
        });
        let status = to_status(never, "r1", &limits);
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(pushback(&status), None);
    }

    fn trailers_only(status: Status) -> Status {
        let response: http::Response<()> = message_limits(status.into_http());
        Status::from_header_map(response.headers()).expect("a status")
    }

    #[test]
    fn oversized_messages_are_resource_exhausted_and_not_retried() {
        let too_large = Status::out_of_range(format!(
            "{TOO_LARGE}: found 70000000 bytes, the limit is: 67108864 bytes"
        ));
        let rewritten = trailers_only(too_large);
        assert_eq!(rewritten.code(), Code::ResourceExhausted);
        assert!(
            rewritten.message().contains("67108864"),
            "{}",
            rewritten.message()
        );
        assert!(rewritten.message().contains("--max-message-bytes"));
        let hint = rewritten.metadata().get(RETRY_PUSHBACK).expect("hint");
        assert_eq!(hint.to_str().ok(), Some("-1"));

        let bomb = Status::resource_exhausted(format!("{INFLATES_TOO_LARGE}, of 1 bytes"));
        assert_eq!(trailers_only(bomb).code(), Code::ResourceExhausted);

        let other = Status::out_of_range("page 9 of 3");
        let kept = trailers_only(other);
        assert_eq!(
            (kept.code(), kept.message()),
            (Code::OutOfRange, "page 9 of 3")
        );
        assert!(kept.metadata().get(RETRY_PUSHBACK).is_none());
    }
}

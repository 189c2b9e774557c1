//! The one place where errors become gRPC statuses.

use tonic::{Code, Status};

use crate::engine::EngineError;
use crate::error::Error;

/// Maps a request's error to its status. Server-side failures are logged with the request id,
/// which the caller also receives, so that the two can be matched.
pub fn to_status(error: Error, request_id: &str) -> Status {
    let code = code(&error);
    let message = match code {
        Code::Internal => {
            tracing::error!(request_id, %error, "request failed");
            format!("{error} (request id {request_id})")
        }
        _ => error.to_string(),
    };
    Status::new(code, message)
}

fn code(error: &Error) -> Code {
    match error {
        Error::InvalidArgument(_) => Code::InvalidArgument,
        // A limit breach is the request's fault too, and retrying it cannot succeed: it is
        // INVALID_ARGUMENT, not RESOURCE_EXHAUSTED (which clients treat as retryable).
        Error::Media(e) if e.is_internal() => Code::Internal,
        Error::Media(_) => Code::InvalidArgument,
        Error::NotFound(_) => Code::NotFound,
        Error::Engine(e) => engine_code(e),
        Error::Head(_) | Error::Internal(_) => Code::Internal,
    }
}

fn engine_code(error: &EngineError) -> Code {
    match error {
        EngineError::Overloaded { .. } => Code::ResourceExhausted,
        EngineError::Stopped(_) => Code::Unavailable,
        EngineError::Library(_)
        | EngineError::Load { .. }
        | EngineError::Device(_)
        | EngineError::Run { .. } => Code::Internal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_error_has_its_status() {
        let overloaded = Error::Engine(EngineError::Overloaded {
            model: "backbone".into(),
            capacity: 4,
        });
        assert_eq!(to_status(overloaded, "r1").code(), Code::ResourceExhausted);
        assert_eq!(
            to_status(Error::InvalidArgument("x".into()), "r1").code(),
            Code::InvalidArgument
        );
        assert_eq!(
            to_status(Error::NotFound("x".into()), "r1").code(),
            Code::NotFound
        );
        let stopped = Error::Engine(EngineError::Stopped("backbone".into()));
        assert_eq!(to_status(stopped, "r1").code(), Code::Unavailable);
    }

    #[test]
    fn internal_errors_carry_the_request_id() {
        let status = to_status(Error::Internal("boom".into()), "req-42");
        assert_eq!(status.code(), Code::Internal);
        assert!(status.message().contains("req-42"), "{}", status.message());
    }
}

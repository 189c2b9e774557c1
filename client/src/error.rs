//! The client's error type: one variant per way a call can fail, each with a one-line,
//! human-readable message.

use std::error::Error as StdError;
use std::io;
use std::path::PathBuf;
use std::time::Duration;

use tonic::Code;

/// Result of a client operation.
pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// Why a client operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server address cannot be used.
    #[error("invalid server address {addr:?}: {reason}")]
    InvalidAddress {
        /// The address as given.
        addr: String,
        /// What is wrong with it.
        reason: String,
    },
    /// No connection could be established.
    #[error(
        "cannot connect to polyhead at {addr}: {reason} ({hint})",
        reason = connect_reason(.source),
        hint = connect_hint(.source)
    )]
    Connect {
        /// The normalised address (`http://host:port`).
        addr: String,
        /// The transport error.
        source: tonic::transport::Error,
    },
    /// The call did not complete within the configured timeout.
    #[error("request timed out after {} (raise --timeout or POLYHEAD_TIMEOUT)", secs(*.after))]
    Timeout {
        /// The timeout that expired.
        after: Duration,
    },
    /// The server (or the transport) answered with a gRPC error status.
    #[error("{}", status_message(.0))]
    Status(#[from] tonic::Status),
    /// The bearer token cannot travel in a gRPC header.
    #[error("invalid token: a token is one or more visible ASCII characters, without spaces")]
    InvalidToken,
    /// A local file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
}

impl ClientError {
    /// The gRPC status code of the failure, when it has one.
    ///
    /// Connection failures report `UNAVAILABLE` and timeouts `DEADLINE_EXCEEDED`, as a gRPC
    /// status would; invalid addresses and local I/O errors have no code.
    pub fn code(&self) -> Option<Code> {
        match self {
            Self::Status(status) => Some(status.code()),
            Self::Connect { .. } => Some(Code::Unavailable),
            Self::Timeout { .. } => Some(Code::DeadlineExceeded),
            Self::InvalidAddress { .. } | Self::InvalidToken | Self::Io { .. } => None,
        }
    }

    /// The server's status, when the failure is a gRPC status.
    pub fn status(&self) -> Option<&tonic::Status> {
        match self {
            Self::Status(status) => Some(status),
            _ => None,
        }
    }

    /// Classifies a failed call: deadline expiries (reported by the server as
    /// `DEADLINE_EXCEEDED`, or by the channel as a cancelled "Timeout expired") become
    /// [`ClientError::Timeout`]; a connection that broke (a TLS handshake the server refused,
    /// say), which tonic reports as UNKNOWN "transport error", becomes UNAVAILABLE with the
    /// reason; everything else [`ClientError::Status`].
    pub(crate) fn from_call(status: tonic::Status, timeout: Duration) -> Self {
        let expired = status.code() == Code::DeadlineExceeded
            || (status.code() == Code::Cancelled && status.message() == "Timeout expired");
        if expired {
            return Self::Timeout { after: timeout };
        }
        match transport_failure(&status) {
            Some(reason) => Self::Status(tonic::Status::unavailable(format!(
                "connection failed: {reason}"
            ))),
            None => Self::Status(status),
        }
    }
}

/// Formats a duration as seconds without a useless fraction: `30s`, `2.5s`.
fn secs(duration: Duration) -> String {
    format!("{}s", duration.as_secs_f64())
}

/// The one-line message for a status, by code.
fn status_message(status: &tonic::Status) -> String {
    let message = one_line(status.message());
    let with = |prefix: &str| {
        if message.is_empty() {
            prefix.to_owned()
        } else {
            format!("{prefix}: {message}")
        }
    };
    match status.code() {
        Code::Ok => with("no error"),
        Code::Cancelled => with("request cancelled"),
        Code::Unknown => with("unknown server error"),
        Code::InvalidArgument => with("server rejected the request"),
        Code::DeadlineExceeded => with("request timed out"),
        Code::NotFound => with("not found"),
        Code::AlreadyExists => with("already exists"),
        Code::PermissionDenied => with("permission denied"),
        Code::ResourceExhausted => format!("{}; retry later", with("server is at capacity")),
        Code::FailedPrecondition => with("server cannot serve the request"),
        Code::Aborted => with("request aborted"),
        Code::OutOfRange if message.contains("message length too large") => format!(
            "message too large ({}); send a smaller input or raise the message size limit",
            message.trim_start_matches("Error, ")
        ),
        Code::OutOfRange => with("out of range"),
        Code::Unimplemented => with("server does not implement this call"),
        Code::Internal if message.starts_with("h2 protocol error") => {
            format!("{message} (is the address a polyhead gRPC server?)")
        }
        Code::Internal => with("internal server error"),
        Code::Unavailable => with("server unavailable"),
        Code::DataLoss => with("data loss"),
        Code::Unauthenticated => with("the server refused the credentials"),
    }
}

/// Collapses a possibly multi-line message into one line.
fn one_line(message: &str) -> String {
    message.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The most telling reason in a connection error's source chain.
fn connect_reason(error: &tonic::transport::Error) -> String {
    let mut current: Option<&(dyn StdError + 'static)> = Some(error);
    let mut innermost = error.to_string();
    while let Some(err) = current {
        if let Some(io) = err.downcast_ref::<io::Error>() {
            return io_reason(io);
        }
        innermost = err.to_string();
        current = err.source();
    }
    innermost
}

/// The reason of a call that failed in the transport rather than on the server.
fn transport_failure(status: &tonic::Status) -> Option<String> {
    if status.code() != Code::Unknown {
        return None;
    }
    let source = StdError::source(status)?;
    source
        .downcast_ref::<tonic::transport::Error>()
        .map(connect_reason)
}

/// What to check when a connection cannot be established: the TLS settings when the handshake
/// failed (rustls reports it as invalid data), the address otherwise.
fn connect_hint(error: &tonic::transport::Error) -> &'static str {
    let mut current: Option<&(dyn StdError + 'static)> = Some(error);
    while let Some(err) = current {
        if let Some(io) = err.downcast_ref::<io::Error>() {
            if io.kind() == io::ErrorKind::InvalidData {
                return "check that --tls-ca holds the CA that signed the server's certificate \
                        and that --tls-domain matches it";
            }
            break;
        }
        current = err.source();
    }
    "is the server running? set --server or POLYHEAD_SERVER"
}

/// A short lower-case reason for the common socket errors.
fn io_reason(error: &io::Error) -> String {
    match error.kind() {
        io::ErrorKind::ConnectionRefused => "connection refused".to_owned(),
        io::ErrorKind::TimedOut => "connection timed out".to_owned(),
        io::ErrorKind::ConnectionReset => "connection reset".to_owned(),
        io::ErrorKind::AddrNotAvailable => "address not available".to_owned(),
        _ => error.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(code: Code, text: &str) -> String {
        ClientError::Status(tonic::Status::new(code, text)).to_string()
    }

    #[test]
    fn status_messages_per_code() {
        assert_eq!(
            message(Code::InvalidArgument, "score_threshold must be in [0, 1]"),
            "server rejected the request: score_threshold must be in [0, 1]"
        );
        assert_eq!(
            message(Code::ResourceExhausted, "8 requests in flight"),
            "server is at capacity: 8 requests in flight; retry later"
        );
        assert_eq!(
            message(Code::Unavailable, "shutting down"),
            "server unavailable: shutting down"
        );
        assert_eq!(
            message(Code::NotFound, "no head named \"x\""),
            "not found: no head named \"x\""
        );
        assert_eq!(
            message(Code::Internal, "onnx runtime failed"),
            "internal server error: onnx runtime failed"
        );
        assert_eq!(
            message(Code::Internal, "h2 protocol error: http2 error"),
            "h2 protocol error: http2 error (is the address a polyhead gRPC server?)"
        );
        assert_eq!(
            message(Code::Unimplemented, ""),
            "server does not implement this call"
        );
        assert_eq!(
            message(Code::Unauthenticated, "missing or invalid bearer token"),
            "the server refused the credentials: missing or invalid bearer token"
        );
        assert_eq!(
            message(Code::DeadlineExceeded, "deadline passed"),
            "request timed out: deadline passed"
        );
    }

    #[test]
    fn multi_line_messages_become_one_line() {
        assert_eq!(
            message(Code::InvalidArgument, "bad image\n  caused by: truncated"),
            "server rejected the request: bad image caused by: truncated"
        );
    }

    #[test]
    fn oversized_messages_are_explained() {
        let text = "Error, decoded message length too large: found 70000000 bytes, the limit is: 67108864 bytes";
        assert_eq!(
            message(Code::OutOfRange, text),
            "message too large (decoded message length too large: found 70000000 bytes, the limit is: 67108864 bytes); send a smaller input or raise the message size limit"
        );
    }

    #[test]
    fn timeouts_are_classified() {
        let after = Duration::from_secs(30);
        let server = ClientError::from_call(tonic::Status::deadline_exceeded("late"), after);
        assert!(matches!(server, ClientError::Timeout { .. }));
        assert_eq!(
            server.to_string(),
            "request timed out after 30s (raise --timeout or POLYHEAD_TIMEOUT)"
        );
        let local = ClientError::from_call(tonic::Status::cancelled("Timeout expired"), after);
        assert_eq!(local.code(), Some(Code::DeadlineExceeded));
        let other = ClientError::from_call(tonic::Status::cancelled("client went away"), after);
        assert_eq!(other.code(), Some(Code::Cancelled));
        let fraction = ClientError::Timeout {
            after: Duration::from_millis(2500),
        };
        assert!(
            fraction
                .to_string()
                .starts_with("request timed out after 2.5s")
        );
    }

    #[test]
    fn codes() {
        let io = ClientError::Io {
            path: PathBuf::from("x.jpg"),
            source: io::Error::from(io::ErrorKind::NotFound),
        };
        assert_eq!(io.code(), None);
        assert!(io.to_string().starts_with("cannot read x.jpg: "));
        let status = ClientError::from(tonic::Status::not_found("no such head"));
        assert_eq!(status.code(), Some(Code::NotFound));
        assert_eq!(
            status.status().map(tonic::Status::message),
            Some("no such head")
        );
    }
}

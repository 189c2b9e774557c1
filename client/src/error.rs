//! The client's error type: one variant per way a call can fail, each with a one-line,
//! human-readable message.

use std::error::Error as StdError;
use std::io;
use std::path::PathBuf;
use std::time::Duration;

use tonic::Code;

use crate::deadline::Deadline;

/// How long before the client's deadline a server's DEADLINE_EXCEEDED may still be for it: the
/// server starts the call's clock when its headers arrive and fires a timer tick early.
const SERVER_EARLY: Duration = Duration::from_millis(20);

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
    /// The TLS settings cannot be used: a certificate or key that does not parse, a server
    /// name that is not a valid DNS name or IP address, ...
    #[error(
        "invalid TLS settings: {} (check --tls-ca, --tls-cert, --tls-key and --tls-domain)",
        causes(.source)
    )]
    Tls {
        /// The error, whose source chain says what is wrong.
        source: tonic::transport::Error,
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
    /// No connection was established before the deadline passed: that of connecting
    /// ([`crate::ClientOptions::timeout`]), or of the whole command
    /// ([`crate::ClientOptions::deadline`]).
    #[error(
        "cannot connect to polyhead at {addr}: timed out after {} (raise --timeout or \
         POLYHEAD_TIMEOUT)",
        secs(*.after)
    )]
    ConnectTimeout {
        /// The normalised address (`http://host:port`).
        addr: String,
        /// The budget that ran out.
        after: Duration,
    },
    /// The call did not complete within its deadline: the configured timeout, or what was left
    /// of the command's.
    #[error("request timed out after {} (raise --timeout or POLYHEAD_TIMEOUT)", secs(*.after))]
    Timeout {
        /// The budget that ran out: the call's timeout, or the command's.
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
            Self::Timeout { .. } | Self::ConnectTimeout { .. } => Some(Code::DeadlineExceeded),
            Self::InvalidAddress { .. }
            | Self::Tls { .. }
            | Self::InvalidToken
            | Self::Io { .. } => None,
        }
    }

    /// The server's status, when the failure is a gRPC status.
    pub fn status(&self) -> Option<&tonic::Status> {
        match self {
            Self::Status(status) => Some(status),
            _ => None,
        }
    }

    /// Whether the server refused the request message as larger than it accepts (its
    /// `--max-message-bytes`): RESOURCE_EXHAUSTED saying the message is too large. Sending the
    /// same message again cannot succeed; a smaller one, or the same input in chunks, may.
    pub fn is_request_too_large(&self) -> bool {
        self.status().is_some_and(request_too_large)
    }

    /// The server's limit on a request message, in bytes, when it refused one as too large and
    /// said what its limit is.
    pub fn server_message_limit(&self) -> Option<u64> {
        let status = self.status().filter(|status| request_too_large(status))?;
        message_sizes(status.message()).map(|(_, limit)| limit)
    }

    /// Whether trying again later may succeed: a refusal for now (UNAVAILABLE,
    /// RESOURCE_EXHAUSTED), except a request too large for the server and a connection whose
    /// TLS handshake failed, which fail the same way every time.
    pub(crate) fn is_transient(&self) -> bool {
        let refused_for_now = matches!(
            self.code(),
            Some(Code::Unavailable | Code::ResourceExhausted)
        );
        let for_good = match self {
            Self::Connect { source, .. } => handshake_failed(source),
            _ => self.is_request_too_large(),
        };
        refused_for_now && !for_good
    }

    /// Classifies a failed call held to `deadline`: its expiry (reported by the server as
    /// `DEADLINE_EXCEEDED` once it has passed, or by the channel as a cancelled "Timeout
    /// expired") becomes [`ClientError::Timeout`]. A `DEADLINE_EXCEEDED` while the deadline
    /// is still ahead keeps the server's message: the server ended the call at a deadline of
    /// its own (its `--max-timeout-seconds`), which a longer `--timeout` would not move. A
    /// connection that broke (a TLS handshake the server refused, a
    /// server that went away mid-stream, a keepalive ping left unanswered), which tonic reports
    /// as UNKNOWN "transport error", "h2 protocol error" or UNAVAILABLE "http2 error", becomes
    /// UNAVAILABLE "connection failed" with the reason; everything else [`ClientError::Status`].
    pub(crate) fn from_call(status: tonic::Status, deadline: &Deadline) -> Self {
        let expired = match status.code() {
            Code::DeadlineExceeded => deadline.remaining() < SERVER_EARLY,
            Code::Cancelled => status.message() == "Timeout expired",
            _ => false,
        };
        if expired {
            return Self::Timeout {
                after: deadline.budget(),
            };
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
        Code::ResourceExhausted if request_too_large(status) => too_large_message(&message),
        Code::ResourceExhausted if refused_for_good(status) => {
            format!(
                "{}; send a smaller input",
                with("request too large for the server")
            )
        }
        Code::ResourceExhausted => format!("{}; retry later", with("server is at capacity")),
        Code::FailedPrecondition => with("server cannot serve the request"),
        Code::Aborted => with("request aborted"),
        Code::OutOfRange if message.contains("message length too large") => format!(
            "message too large ({}): over what the client sends or takes in one message \
             (ClientOptions::max_message_bytes, 64 MiB by default); send a smaller input",
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

/// Whether `status` refuses a request message over the server's size limit: RESOURCE_EXHAUSTED
/// naming polyhead's `--max-message-bytes` (or with gRPC's "larger than max" message).
fn request_too_large(status: &tonic::Status) -> bool {
    status.code() == Code::ResourceExhausted
        && (status.message().contains("(--max-message-bytes)")
            || status.message().contains("larger than max"))
}

/// Whether the server asked never to send the request again (a negative
/// `grpc-retry-pushback-ms`, gRPC retry design A6): as sent, it can never be served, as when
/// it alone is more than the server holds of all requests at once.
fn refused_for_good(status: &tonic::Status) -> bool {
    status
        .metadata()
        .get(crate::retry::RETRY_PUSHBACK)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with('-'))
}

/// The message for a request over the server's size limit, with the sizes when the server's
/// message gives them (`found N bytes, the limit is: M bytes`).
fn too_large_message(message: &str) -> String {
    match message_sizes(message) {
        Some((found, limit)) => format!(
            "request too large: {found} bytes, over the server's limit of {limit} bytes per \
             message (its --max-message-bytes); send a smaller input"
        ),
        None => format!("request too large for the server: {message}; send a smaller input"),
    }
}

/// The sizes in tonic's refusal of a message over the limit: (found, limit).
fn message_sizes(message: &str) -> Option<(u64, u64)> {
    let (_, rest) = message.split_once("found ")?;
    let (found, rest) = rest.split_once(" bytes, the limit is: ")?;
    let limit = rest.split(' ').next()?;
    Some((found.parse().ok()?, limit.parse().ok()?))
}

/// The causes of an error, outermost first, joined with `: `; the error's own message is left
/// out when it has causes, as tonic's "transport error" says nothing they do not.
fn causes(error: &(dyn StdError + 'static)) -> String {
    let mut parts = Vec::new();
    let mut current = error.source();
    while let Some(cause) = current {
        parts.push(cause.to_string());
        current = cause.source();
    }
    if parts.is_empty() {
        return error.to_string();
    }
    parts.join(": ")
}

/// Collapses a possibly multi-line message into one line.
fn one_line(message: &str) -> String {
    message.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The most telling reason in a connection error's source chain.
fn connect_reason(error: &tonic::transport::Error) -> String {
    chain_reason(error)
}

/// The most telling reason in an error's source chain: its I/O error's, else the innermost
/// message. h2 holds the I/O error of a broken connection without exposing it as a source.
fn chain_reason(error: &(dyn StdError + 'static)) -> String {
    let mut current = Some(error);
    let mut innermost = error.to_string();
    while let Some(err) = current {
        let io = err
            .downcast_ref::<io::Error>()
            .or_else(|| err.downcast_ref::<h2::Error>().and_then(h2::Error::get_io));
        if let Some(io) = io {
            return io_reason(io);
        }
        innermost = err.to_string();
        current = err.source();
    }
    innermost
}

/// The reason of a call that failed in the transport rather than on the server: a status
/// tonic made up locally from the connection's error (UNKNOWN, or UNAVAILABLE for a keepalive
/// ping left unanswered), or a request the connection closed under before it was sent (a
/// draining server's GOAWAY), which tonic reports as CANCELLED. Only such statuses have a
/// source; the server's come without.
fn transport_failure(status: &tonic::Status) -> Option<String> {
    let source = StdError::source(status)?;
    match status.code() {
        Code::Unknown | Code::Unavailable => Some(chain_reason(source)),
        Code::Cancelled if never_sent(source) => {
            Some("connection closed before the request was sent".to_owned())
        }
        _ => None,
    }
}

/// Whether hyper cancelled the request before it was written: nothing reached the server, so
/// sending it again is safe.
fn never_sent(error: &(dyn StdError + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(err) = current {
        if err
            .downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_canceled)
        {
            return true;
        }
        current = err.source();
    }
    false
}

/// What to check when a connection cannot be established: the TLS settings when the handshake
/// failed, the address otherwise.
fn connect_hint(error: &tonic::transport::Error) -> &'static str {
    if handshake_failed(error) {
        return "check that --tls-ca holds the CA that signed the server's certificate and that \
                --tls-domain matches it";
    }
    "is the server running? set --server or POLYHEAD_SERVER"
}

/// Whether a connection failed in the TLS handshake (rustls reports it as invalid data).
fn handshake_failed(error: &tonic::transport::Error) -> bool {
    let mut current: Option<&(dyn StdError + 'static)> = Some(error);
    while let Some(err) = current {
        if let Some(io) = err.downcast_ref::<io::Error>() {
            return io.kind() == io::ErrorKind::InvalidData;
        }
        current = err.source();
    }
    false
}

/// A short lower-case reason for the common socket errors.
fn io_reason(error: &io::Error) -> String {
    match error.kind() {
        io::ErrorKind::ConnectionRefused => "connection refused".to_owned(),
        io::ErrorKind::TimedOut => "connection timed out".to_owned(),
        io::ErrorKind::ConnectionReset => "connection reset".to_owned(),
        // h2's word for a connection that closed under an open stream.
        io::ErrorKind::BrokenPipe | io::ErrorKind::UnexpectedEof => "connection lost".to_owned(),
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
            "message too large (decoded message length too large: found 70000000 bytes, the limit is: 67108864 bytes): over what the client sends or takes in one message (ClientOptions::max_message_bytes, 64 MiB by default); send a smaller input"
        );
    }

    #[test]
    fn timeouts_are_classified() {
        let passed = Deadline::passed(Duration::from_secs(30));
        let server = ClientError::from_call(tonic::Status::deadline_exceeded("late"), &passed);
        assert!(matches!(server, ClientError::Timeout { .. }));
        assert_eq!(
            server.to_string(),
            "request timed out after 30s (raise --timeout or POLYHEAD_TIMEOUT)"
        );
        let local = ClientError::from_call(tonic::Status::cancelled("Timeout expired"), &passed);
        assert_eq!(local.code(), Some(Code::DeadlineExceeded));
        let other = ClientError::from_call(tonic::Status::cancelled("client went away"), &passed);
        assert_eq!(other.code(), Some(Code::Cancelled));
        // The server's own, earlier deadline is not the client's timeout running out.
        let ahead = Deadline::after(Duration::from_secs(600));
        let capped = tonic::Status::deadline_exceeded(
            "Detect did not finish within its deadline of 300.000 s, the most this server allows \
             (--max-timeout-seconds); the caller's timeout was longer",
        );
        let server = ClientError::from_call(capped, &ahead);
        assert_eq!(server.code(), Some(Code::DeadlineExceeded));
        assert_eq!(
            server.to_string(),
            "request timed out: Detect did not finish within its deadline of 300.000 s, the most \
             this server allows (--max-timeout-seconds); the caller's timeout was longer"
        );
        let fraction = ClientError::Timeout {
            after: Duration::from_millis(2500),
        };
        assert!(
            fraction
                .to_string()
                .starts_with("request timed out after 2.5s")
        );
        let connecting = ClientError::ConnectTimeout {
            addr: "http://127.0.0.1:50051".into(),
            after: passed.budget(),
        };
        assert_eq!(connecting.code(), Some(Code::DeadlineExceeded));
        assert!(!connecting.is_transient(), "the deadline has passed");
        assert_eq!(
            connecting.to_string(),
            "cannot connect to polyhead at http://127.0.0.1:50051: timed out after 30s (raise \
             --timeout or POLYHEAD_TIMEOUT)"
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

    #[test]
    fn requests_over_the_server_limit_are_not_capacity() {
        let text = "the request message is too large (--max-message-bytes): Error, decoded message \
                    length too large: found 307215 bytes, the limit is: 262144 bytes";
        let err = ClientError::Status(tonic::Status::resource_exhausted(text));
        assert!(err.is_request_too_large());
        assert_eq!(err.server_message_limit(), Some(262144));
        assert!(!err.is_transient());
        assert_eq!(
            err.to_string(),
            "request too large: 307215 bytes, over the server's limit of 262144 bytes per \
             message (its --max-message-bytes); send a smaller input"
        );
        let bomb = "the request message is too large (--max-message-bytes): Error decompressing: \
                    size limit reached";
        assert_eq!(
            message(Code::ResourceExhausted, bomb),
            format!("request too large for the server: {bomb}; send a smaller input")
        );
        // More than the server holds of all requests at once: not the message limit (another
        // upload would not help), but never served as sent either.
        let held = "the request is too large: the server holds at most 1000 bytes of requests \
                    at once (--max-receiving-bytes)";
        let mut metadata = tonic::metadata::MetadataMap::new();
        metadata.insert("grpc-retry-pushback-ms", "-1".parse().expect("ascii"));
        let status = tonic::Status::with_metadata(Code::ResourceExhausted, held, metadata);
        let err = ClientError::Status(status);
        assert!(!err.is_request_too_large());
        assert_eq!(
            err.to_string(),
            format!("request too large for the server: {held}; send a smaller input")
        );
        let busy = ClientError::Status(tonic::Status::resource_exhausted("8 requests in flight"));
        assert!(!busy.is_request_too_large());
        assert_eq!(busy.server_message_limit(), None);
        assert!(busy.is_transient());
    }

    #[test]
    fn tls_errors_carry_their_cause() {
        let refused = tonic::transport::Endpoint::from_static("https://polyhead:443")
            .tls_config(tonic::transport::ClientTlsConfig::new().domain_name("bad domain!"));
        let Err(source) = refused else {
            panic!("an invalid server name was accepted");
        };
        let err = ClientError::Tls { source };
        assert_eq!(err.code(), None);
        let text = err.to_string();
        assert!(text.starts_with("invalid TLS settings: "), "{text}");
        assert!(!text.contains("transport error"), "{text}");
        assert!(text.len() > "invalid TLS settings: ".len() + 60, "{text}");
    }

    #[test]
    fn broken_connections_are_unavailable() {
        let mut status = tonic::Status::unknown("h2 protocol error: error reading a body");
        let lost = io::Error::new(io::ErrorKind::BrokenPipe, "stream closed");
        status.set_source(std::sync::Arc::new(lost));
        let deadline = Deadline::after(Duration::from_secs(1));
        let err = ClientError::from_call(status, &deadline);
        assert_eq!(err.code(), Some(Code::Unavailable));
        assert_eq!(
            err.to_string(),
            "server unavailable: connection failed: connection lost"
        );
        let sent = tonic::Status::unknown("the handler panicked");
        let err = ClientError::from_call(sent, &deadline);
        assert_eq!(err.code(), Some(Code::Unknown), "a server's status is kept");
    }
}

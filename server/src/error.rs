//! The error every request path returns. Layers below keep their own typed errors; this enum
//! gathers them so that `grpc::status` can map each case to exactly one gRPC status.

use crate::engine::EngineError;
use crate::heads::HeadError;
use crate::media::MediaError;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed or asks for something that does not exist.
    #[error("{0}")]
    InvalidArgument(String),
    /// The image or clip could not be decoded, or breaks a limit.
    #[error(transparent)]
    Media(#[from] MediaError),
    /// A named model does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The server's configuration does not allow what the request asks; the same request
    /// fails again until an operator changes it.
    #[error("{0}")]
    FailedPrecondition(String),
    /// Every request slot is busy and the admission queue is full.
    #[error(transparent)]
    Full(#[from] crate::admission::Full),
    /// The engine refused or failed the work.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// A head's outputs could not be post-processed.
    #[error("post-processing failed: {0}")]
    Head(#[from] HeadError),
    /// A bug: a task panicked or an invariant broke.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// Processing work panicked: a bug, never the client's input.
    pub fn panicked() -> Self {
        Self::Internal("a processing task panicked".into())
    }
}

impl From<tokio::task::JoinError> for Error {
    fn from(e: tokio::task::JoinError) -> Self {
        if e.is_panic() {
            Self::panicked()
        } else {
            Self::Internal("a processing task was cancelled".into())
        }
    }
}

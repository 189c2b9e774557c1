//! When and how long to wait before trying again: calls and connection attempts refused for now
//! (UNAVAILABLE, RESOURCE_EXHAUSTED) are retried with the server's pushback hint or jittered
//! exponential backoff, within a retry budget and an overall deadline: one call's, or a whole
//! command's.

use std::future::Future;
use std::time::Duration;

use tonic::metadata::AsciiMetadataValue;

use crate::deadline::Deadline;
use crate::error::{ClientError, Result};

/// The server's retry hint: how long to wait before the next attempt, in milliseconds.
pub(crate) const RETRY_PUSHBACK: &str = "grpc-retry-pushback-ms";

/// First backoff between attempts; it doubles after each retry up to [`MAX_BACKOFF`].
const INITIAL_BACKOFF: Duration = Duration::from_millis(50);

/// Longest backoff between attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Least time an attempt after a wait must have left: a retry that would start with less is
/// not made, and the server's last answer is returned rather than a bare timeout.
const MIN_ATTEMPT: Duration = Duration::from_millis(10);

/// How long to wait before the next attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wait {
    /// As long as the server's `grpc-retry-pushback-ms` hint asks: never less.
    Asked(Duration),
    /// The client's own jittered backoff, which may be cut short so that a last attempt starts
    /// before the deadline.
    Backoff(Duration),
}

/// Runs `attempt` until it succeeds, fails for good, has been retried `max_retries` times, or
/// the next attempt could not start with [`MIN_ATTEMPT`] left before `deadline`: a backoff
/// longer than what is left is cut short for one last attempt (a server that comes up just
/// before the deadline is still reached), a wait the server asked for is not. `attempt` gets
/// what remains of the deadline when it starts, its own deadline. The last failure is
/// returned.
pub(crate) async fn retrying<T, F, Fut>(
    deadline: Deadline,
    max_retries: u32,
    mut attempt: F,
) -> Result<T>
where
    F: FnMut(Duration) -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let mut retries = 0;
    loop {
        let error = match attempt(deadline.remaining()).await {
            Ok(value) => return Ok(value),
            Err(error) => error,
        };
        let left = deadline.remaining().saturating_sub(MIN_ATTEMPT);
        let wait = match retry_delay(&error, retries, max_retries) {
            Some(Wait::Asked(wait)) if wait < left => wait,
            Some(Wait::Backoff(wait)) if left >= MIN_ATTEMPT => wait.min(left),
            _ => return Err(error),
        };
        tokio::time::sleep(wait).await;
        retries += 1;
    }
}

/// How long to wait before retrying an attempt that failed with `error` after `retries`
/// retries, or `None` when it must not be retried: the failure is not transient (see
/// [`ClientError::is_transient`]; a timeout, in particular, is never retried), the retries are
/// spent, or the server's pushback hint is negative or malformed, which asks the client not to
/// retry (gRPC retry design, A6).
pub(crate) fn retry_delay(error: &ClientError, retries: u32, max_retries: u32) -> Option<Wait> {
    if !error.is_transient() || retries >= max_retries {
        return None;
    }
    match error
        .status()
        .and_then(|s| s.metadata().get(RETRY_PUSHBACK))
    {
        Some(hint) => pushback(hint).map(Wait::Asked),
        None => Some(Wait::Backoff(backoff(retries))),
    }
}

/// The wait a `grpc-retry-pushback-ms` value asks for; `None` unless it is a non-negative
/// decimal number of milliseconds.
fn pushback(hint: &AsciiMetadataValue) -> Option<Duration> {
    let millis = hint.to_str().ok()?;
    if millis.is_empty() || !millis.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    millis.parse().ok().map(Duration::from_millis)
}

/// Exponential backoff with full jitter: a random wait of up to 50 ms × 2^`retries`, at most
/// 2 s, so that clients refused together do not come back together.
fn backoff(retries: u32) -> Duration {
    let ceiling = INITIAL_BACKOFF
        .saturating_mul(2u32.saturating_pow(retries))
        .min(MAX_BACKOFF);
    ceiling.mul_f64(fastrand::f64())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    fn refused(code: Code, hint: Option<&'static str>) -> ClientError {
        let mut status = tonic::Status::new(code, "refused");
        if let Some(hint) = hint {
            status
                .metadata_mut()
                .insert(RETRY_PUSHBACK, AsciiMetadataValue::from_static(hint));
        }
        ClientError::Status(status)
    }

    #[test]
    fn only_unavailable_and_exhausted_are_retried() {
        assert!(retry_delay(&refused(Code::Unavailable, None), 0, 3).is_some());
        assert!(retry_delay(&refused(Code::ResourceExhausted, None), 2, 3).is_some());
        assert_eq!(
            retry_delay(&refused(Code::ResourceExhausted, None), 3, 3),
            None
        );
        assert_eq!(retry_delay(&refused(Code::Unavailable, None), 0, 0), None);
        for code in [Code::InvalidArgument, Code::Internal, Code::Cancelled] {
            assert_eq!(retry_delay(&refused(code, None), 0, 3), None, "{code:?}");
        }
        let timeout = ClientError::Timeout {
            after: Duration::from_secs(1),
        };
        assert_eq!(retry_delay(&timeout, 0, 3), None);
    }

    #[test]
    fn the_server_hint_is_honoured_exactly() {
        let exhausted = |hint| retry_delay(&refused(Code::ResourceExhausted, Some(hint)), 0, 3);
        assert_eq!(
            exhausted("30"),
            Some(Wait::Asked(Duration::from_millis(30)))
        );
        assert_eq!(exhausted("0"), Some(Wait::Asked(Duration::ZERO)));
        for bad in ["-1", "", "soon", "1.5", "+3", " 30"] {
            assert_eq!(exhausted(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_request_too_large_is_never_retried() {
        let status = tonic::Status::resource_exhausted(
            "the request message is too large (--max-message-bytes): Error, decoded message \
             length too large: found 300 bytes, the limit is: 200 bytes",
        );
        assert_eq!(retry_delay(&ClientError::Status(status), 0, 3), None);
    }

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        for retries in 0..40 {
            let ceiling = (INITIAL_BACKOFF * 2u32.saturating_pow(retries.min(20))).min(MAX_BACKOFF);
            let wait = backoff(retries);
            assert!(wait <= ceiling, "retry {retries}: {wait:?} > {ceiling:?}");
        }
        assert!(backoff(u32::MAX) <= MAX_BACKOFF);
    }

    #[tokio::test]
    async fn attempts_stop_at_the_deadline_with_the_last_error() {
        let deadline = Deadline::after(Duration::from_millis(150));
        let mut given = Vec::new();
        let result: Result<()> = retrying(deadline, 1000, |remaining| {
            given.push(remaining);
            std::future::ready(Err(refused(Code::Unavailable, Some("20"))))
        })
        .await;
        assert!(matches!(result, Err(ClientError::Status(_))));
        assert!((2..=8).contains(&given.len()), "{} attempts", given.len());
        assert!(given[0] <= Duration::from_millis(150));
        assert!(
            given
                .windows(2)
                .all(|pair| pair[1] + Duration::from_millis(20) <= pair[0]),
            "each attempt gets what is left after the waits: {given:?}"
        );
    }

    #[tokio::test]
    async fn a_backoff_past_the_deadline_is_cut_short_for_a_last_attempt() {
        // Backoffs of up to 2 s against 400 ms: attempts go on until just before the deadline.
        let deadline = Deadline::after(Duration::from_millis(400));
        let mut given = Vec::new();
        let result: Result<()> = retrying(deadline, 1000, |remaining| {
            given.push(remaining);
            std::future::ready(Err(refused(Code::Unavailable, None)))
        })
        .await;
        assert!(matches!(result, Err(ClientError::Status(_))));
        let last = *given.last().expect("attempts");
        assert!(
            last < 2 * MIN_ATTEMPT + Duration::from_millis(5),
            "the last attempt started with {last:?} left: {given:?}"
        );
    }

    #[tokio::test]
    async fn a_wait_that_leaves_no_time_for_an_attempt_returns_the_servers_answer() {
        let deadline = Deadline::after(Duration::from_secs(60));
        let mut attempts = 0;
        let result: Result<()> = retrying(deadline, 1000, |_| {
            attempts += 1;
            std::future::ready(Err(refused(Code::ResourceExhausted, Some("59995"))))
        })
        .await;
        let code = result.err().as_ref().and_then(ClientError::code);
        assert_eq!(code, Some(Code::ResourceExhausted));
        assert_eq!(attempts, 1);
    }
}

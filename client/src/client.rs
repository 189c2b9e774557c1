//! [`Client`]: a typed, deadline-aware wrapper over the generated `PolyheadClient` that retries
//! calls the server could not take (UNAVAILABLE, RESOURCE_EXHAUSTED) within the call's deadline.

use std::fmt;
use std::future::Future;
use std::time::{Duration, Instant};

use polyhead_proto::Bytes;
use polyhead_proto::v1::{self, polyhead_client::PolyheadClient};
use tonic::Code;
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::error::{ClientError, Result};

/// Default server address.
pub const DEFAULT_SERVER: &str = "127.0.0.1:50051";

/// Connection and call settings.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientOptions {
    /// Deadline of every call, sent to the server as `grpc-timeout` and enforced locally.
    pub timeout: Duration,
    /// How long establishing the connection may take.
    pub connect_timeout: Duration,
    /// Largest message sent or received, in bytes.
    pub max_message_bytes: usize,
    /// TLS settings; with them a bare `host:port` is reached over `https`.
    pub tls: Option<ClientTls>,
    /// Bearer token sent as `authorization: Bearer <token>` with every call.
    pub token: Option<String>,
    /// How many times a call refused with UNAVAILABLE or RESOURCE_EXHAUSTED is tried again
    /// (0: never), waiting as long as the server's `grpc-retry-pushback-ms` hint asks, else
    /// with jittered exponential backoff; retries never extend past `timeout`.
    pub max_retries: u32,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            max_message_bytes: 64 * 1024 * 1024,
            tls: None,
            token: None,
            max_retries: 3,
        }
    }
}

impl fmt::Debug for ClientOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientOptions")
            .field("timeout", &self.timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("tls", &self.tls)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("max_retries", &self.max_retries)
            .finish()
    }
}

/// How to reach a TLS server.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientTls {
    /// PEM certificates of the CA(s) the server's certificate must be signed by.
    pub ca_cert_pem: Vec<u8>,
    /// PEM certificate chain and private key presented to a server that asks for one
    /// (mutual TLS).
    pub client_identity: Option<(Vec<u8>, Vec<u8>)>,
    /// Name the server's certificate must carry; default: the host of the address.
    pub domain: Option<String>,
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTls")
            .field(
                "ca_cert_pem",
                &format_args!("{} bytes", self.ca_cert_pem.len()),
            )
            .field(
                "client_identity",
                &self.client_identity.as_ref().map(|_| "<redacted>"),
            )
            .field("domain", &self.domain)
            .finish()
    }
}

impl ClientTls {
    fn config(&self) -> ClientTlsConfig {
        let mut config =
            ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&self.ca_cert_pem));
        if let Some((cert, key)) = &self.client_identity {
            config = config.identity(Identity::from_pem(cert, key));
        }
        if let Some(domain) = &self.domain {
            config = config.domain_name(domain.clone());
        }
        config
    }
}

/// A connection to a polyhead server. Cheap to clone; clones share the connection.
#[derive(Debug, Clone)]
pub struct Client {
    inner: PolyheadClient<Channel>,
    addr: String,
    options: ClientOptions,
    authorization: Option<AsciiMetadataValue>,
}

/// Turns `host:port`, `http://host:port` or `https://host:port` into the URI the channel
/// connects to; a bare `host:port` becomes `http://host:port`.
///
/// Surrounding whitespace and a trailing `/` are dropped.
pub fn normalize_addr(addr: &str) -> Result<String> {
    parse_addr(addr, "http")
}

/// [`normalize_addr`] for a client with (`tls`) or without TLS settings: a bare `host:port`
/// takes the matching scheme, and a scheme that contradicts the settings is refused.
fn resolve_addr(addr: &str, tls: bool) -> Result<String> {
    let uri = parse_addr(addr, if tls { "https" } else { "http" })?;
    let reason = match (uri.starts_with("https://"), tls) {
        (true, false) => "https:// needs the CA certificate that signed the server's (--tls-ca)",
        (false, true) => "TLS settings were given; use https:// or a bare host:port",
        _ => return Ok(uri),
    };
    Err(ClientError::InvalidAddress {
        addr: addr.to_owned(),
        reason: reason.to_owned(),
    })
}

/// Parses an address, giving a bare `host:port` the scheme `default`.
fn parse_addr(addr: &str, default: &str) -> Result<String> {
    let invalid = |reason: &str| ClientError::InvalidAddress {
        addr: addr.to_owned(),
        reason: reason.to_owned(),
    };
    let trimmed = addr.trim();
    let (scheme, rest) = trimmed.split_once("://").unwrap_or((default, trimmed));
    if scheme != "http" && scheme != "https" {
        return Err(invalid(&format!("unsupported scheme {scheme:?}")));
    }
    let authority = rest.trim_end_matches('/');
    if authority.is_empty() {
        return Err(invalid("missing host"));
    }
    let uri = format!("{scheme}://{authority}");
    match uri.parse::<tonic::codegen::http::Uri>() {
        Ok(parsed) if parsed.host().is_some_and(|host| !host.is_empty()) => Ok(uri),
        Ok(_) => Err(invalid("missing host")),
        Err(err) => Err(invalid(&err.to_string())),
    }
}

impl Client {
    /// Connects to the server at `addr` (`host:port` or `http://host:port`).
    ///
    /// The connection is established eagerly, so an unreachable server fails here with
    /// [`ClientError::Connect`] rather than on the first call.
    pub async fn connect(addr: &str, options: ClientOptions) -> Result<Self> {
        let uri = resolve_addr(addr, options.tls.is_some())?;
        let invalid = |err: tonic::transport::Error| ClientError::InvalidAddress {
            addr: addr.to_owned(),
            reason: err.to_string(),
        };
        let mut endpoint = Endpoint::from_shared(uri.clone()).map_err(invalid)?;
        if let Some(tls) = &options.tls {
            endpoint = endpoint.tls_config(tls.config()).map_err(invalid)?;
        }
        // Checked before connecting, so a token that cannot be sent fails at once.
        authorization(options.token.as_deref())?;
        let channel = endpoint
            .connect_timeout(options.connect_timeout)
            .tcp_nodelay(true)
            .connect()
            .await
            .map_err(|source| ClientError::Connect {
                addr: uri.clone(),
                source,
            })?;
        Self::from_channel(channel, uri, options)
    }

    /// Wraps an existing channel; `addr` is only used in messages. Fails only on a token that
    /// cannot travel in a header.
    pub fn from_channel(
        channel: Channel,
        addr: impl Into<String>,
        options: ClientOptions,
    ) -> Result<Self> {
        let inner = PolyheadClient::new(channel)
            .max_decoding_message_size(options.max_message_bytes)
            .max_encoding_message_size(options.max_message_bytes);
        Ok(Self {
            inner,
            addr: addr.into(),
            authorization: authorization(options.token.as_deref())?,
            options,
        })
    }

    /// The normalised address this client talks to.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The options in effect.
    pub fn options(&self) -> &ClientOptions {
        &self.options
    }

    /// A client on the same connection with another call deadline.
    pub fn with_timeout(&self, timeout: Duration) -> Self {
        let mut client = self.clone();
        client.options.timeout = timeout;
        client
    }

    /// The generated client, for calls that need full control over the request; wrap their
    /// messages with [`Client::request`] to send the deadline and token.
    pub fn raw(&self) -> PolyheadClient<Channel> {
        self.inner.clone()
    }

    /// Runs the detection head `head` (empty: the only one) on `image`.
    pub async fn detect(
        &self,
        image: v1::Image,
        options: v1::DetectOptions,
        head: &str,
    ) -> Result<v1::DetectResponse> {
        let request = v1::DetectRequest {
            image: Some(image),
            options: Some(options),
            head: head.to_owned(),
        };
        self.call(request, |mut inner, request| async move {
            inner.detect(request).await
        })
        .await
    }

    /// Runs the segmentation head `head` (empty: the only one) on `image`.
    pub async fn segment(
        &self,
        image: v1::Image,
        options: v1::SegmentOptions,
        head: &str,
    ) -> Result<v1::SegmentResponse> {
        let request = v1::SegmentRequest {
            image: Some(image),
            options: Some(options),
            head: head.to_owned(),
        };
        self.call(request, |mut inner, request| async move {
            inner.segment(request).await
        })
        .await
    }

    /// Recognises the action in a clip; see [`crate::video_clip`] and [`crate::frames_clip`].
    pub async fn recognize_action(
        &self,
        request: v1::RecognizeActionRequest,
    ) -> Result<v1::RecognizeActionResponse> {
        self.call(request, |mut inner, request| async move {
            inner.recognize_action(request).await
        })
        .await
    }

    /// Recognises the action in an encoded video file.
    pub async fn recognize_video(
        &self,
        video: impl Into<Bytes>,
        options: v1::ActionOptions,
        head: &str,
    ) -> Result<v1::RecognizeActionResponse> {
        self.recognize_action(v1::RecognizeActionRequest {
            clip: Some(crate::video_clip(video)),
            options: Some(options),
            head: head.to_owned(),
        })
        .await
    }

    /// Recognises the action in a list of encoded frames played at `fps` (0: 1 frame/s).
    pub async fn recognize_frames(
        &self,
        frames: Vec<Vec<u8>>,
        fps: f32,
        options: v1::ActionOptions,
        head: &str,
    ) -> Result<v1::RecognizeActionResponse> {
        self.recognize_action(v1::RecognizeActionRequest {
            clip: Some(crate::frames_clip(frames, fps)),
            options: Some(options),
            head: head.to_owned(),
        })
        .await
    }

    /// Recognises actions in a long video window by window: sends `video` in chunks of at most
    /// `chunk_bytes` (the first with `options`) and returns the server's response stream, one
    /// message per window as it completes, then the summary. The call's deadline covers the
    /// whole stream; it is not retried.
    pub async fn recognize_windows(
        &self,
        video: impl Into<Bytes>,
        options: v1::WindowOptions,
        chunk_bytes: usize,
    ) -> Result<tonic::Streaming<v1::RecognizeActionWindowsResponse>> {
        let total = self.options.timeout;
        let request = self.request(tokio_stream::iter(window_messages(
            video.into(),
            options,
            chunk_bytes,
        )));
        let mut inner = self.inner.clone();
        match inner.recognize_action_windows(request).await {
            Ok(response) => Ok(response.into_inner()),
            Err(status) => Err(ClientError::from_call(status, total)),
        }
    }

    /// Runs several heads on `image` from one backbone pass.
    pub async fn analyze(
        &self,
        image: v1::Image,
        heads: Vec<String>,
        detect_options: v1::DetectOptions,
        segment_options: v1::SegmentOptions,
    ) -> Result<v1::AnalyzeResponse> {
        let request = v1::AnalyzeRequest {
            image: Some(image),
            heads,
            detect_options: Some(detect_options),
            segment_options: Some(segment_options),
        };
        self.call(request, |mut inner, request| async move {
            inner.analyze(request).await
        })
        .await
    }

    /// The loaded model set: backbone and heads.
    pub async fn list_models(&self) -> Result<v1::ListModelsResponse> {
        self.call(v1::ListModelsRequest {}, |mut inner, request| async move {
            inner.list_models(request).await
        })
        .await
    }

    /// One model (the backbone or a head) by name.
    pub async fn get_model(&self, name: &str) -> Result<v1::ModelInfo> {
        let request = v1::GetModelRequest {
            name: name.to_owned(),
        };
        self.call(request, |mut inner, request| async move {
            inner.get_model(request).await
        })
        .await
    }

    /// Runs the backbone on `image` and has the server keep its features under a handle; pass
    /// [`crate::handle_image`] of it to [`Client::detect`], [`Client::segment`] or
    /// [`Client::analyze`] until it expires.
    pub async fn extract_features(&self, image: v1::Image) -> Result<v1::ExtractFeaturesResponse> {
        let request = v1::ExtractFeaturesRequest { image: Some(image) };
        self.call(request, |mut inner, request| async move {
            inner.extract_features(request).await
        })
        .await
    }

    /// Wraps a message in a request carrying the call deadline and the bearer token.
    pub fn request<T>(&self, message: T) -> tonic::Request<T> {
        self.request_within(message, self.options.timeout)
    }

    /// Wraps a message in a request carrying the bearer token and the deadline `timeout`.
    fn request_within<T>(&self, message: T, timeout: Duration) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(timeout);
        if let Some(value) = &self.authorization {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        request
    }

    /// Sends `message` through `rpc`, trying again (see [`ClientOptions::max_retries`]) while
    /// the server refuses it for now and the call's overall deadline allows; each attempt's
    /// deadline is what remains of it. The last failure is returned.
    async fn call<M, T, F, Fut>(&self, message: M, rpc: F) -> Result<T>
    where
        M: Clone,
        F: Fn(PolyheadClient<Channel>, tonic::Request<M>) -> Fut,
        Fut: Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        let total = self.options.timeout;
        let started = Instant::now();
        let mut deadline = total;
        let mut retries = 0;
        loop {
            let request = self.request_within(message.clone(), deadline);
            let error = match rpc(self.inner.clone(), request).await {
                Ok(response) => return Ok(response.into_inner()),
                Err(status) => ClientError::from_call(status, total),
            };
            let wait = match retry_delay(&error, retries, self.options.max_retries) {
                Some(wait) if started.elapsed() + wait < total => wait,
                _ => return Err(error),
            };
            tokio::time::sleep(wait).await;
            deadline = total.saturating_sub(started.elapsed());
            retries += 1;
        }
    }
}

/// The upload of a RecognizeActionWindows call: `options` and the first chunk, then the rest
/// of `video` in chunks of at most `chunk_bytes` (at least 1), each a view of `video`.
fn window_messages(
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

/// The server's retry hint: how long to wait before the next attempt, in milliseconds.
const RETRY_PUSHBACK: &str = "grpc-retry-pushback-ms";

/// First backoff between attempts; it doubles after each retry up to [`MAX_BACKOFF`].
const INITIAL_BACKOFF: Duration = Duration::from_millis(50);

/// Longest backoff between attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// How long to wait before retrying a call that failed with `error` after `retries` retries, or
/// `None` when it must not be retried: its code is not UNAVAILABLE or RESOURCE_EXHAUSTED (a
/// timeout, in particular, is never retried), the retries are spent, or the server's pushback
/// hint is negative or malformed, which asks the client not to retry (gRPC retry design, A6).
fn retry_delay(error: &ClientError, retries: u32, max_retries: u32) -> Option<Duration> {
    let status = error.status()?;
    let retryable = matches!(status.code(), Code::Unavailable | Code::ResourceExhausted);
    if !retryable || retries >= max_retries {
        return None;
    }
    match status.metadata().get(RETRY_PUSHBACK) {
        Some(hint) => pushback(hint),
        None => Some(backoff(retries)),
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

/// The `authorization` value for `token`, marked sensitive so HTTP/2 never indexes it.
fn authorization(token: Option<&str>) -> Result<Option<AsciiMetadataValue>> {
    let Some(token) = token else {
        return Ok(None);
    };
    let token = token.trim();
    if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ClientError::InvalidToken);
    }
    let mut value = MetadataValue::try_from(format!("Bearer {token}"))
        .map_err(|_| ClientError::InvalidToken)?;
    value.set_sensitive(true);
    Ok(Some(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_normalised() {
        let ok = |addr: &str| normalize_addr(addr).ok();
        assert_eq!(
            ok("127.0.0.1:50051").as_deref(),
            Some("http://127.0.0.1:50051")
        );
        assert_eq!(
            ok("http://127.0.0.1:50051").as_deref(),
            Some("http://127.0.0.1:50051")
        );
        assert_eq!(
            ok(" localhost:9000/ ").as_deref(),
            Some("http://localhost:9000")
        );
        assert_eq!(ok("[::1]:50051").as_deref(), Some("http://[::1]:50051"));
        assert_eq!(ok("polyhead").as_deref(), Some("http://polyhead"));
    }

    #[test]
    fn bad_addresses_are_rejected() {
        for addr in ["", "  ", "http://", "https://", "ftp://host:1", "ho st:1"] {
            let err = normalize_addr(addr).err();
            assert!(
                matches!(err, Some(ClientError::InvalidAddress { .. })),
                "{addr:?} gave {err:?}"
            );
        }
    }

    #[test]
    fn tls_settings_pick_the_scheme() {
        assert_eq!(
            normalize_addr("https://host:1").ok().as_deref(),
            Some("https://host:1")
        );
        assert_eq!(
            resolve_addr("host:1", true).ok().as_deref(),
            Some("https://host:1")
        );
        let reason = |addr: &str, tls: bool| resolve_addr(addr, tls).err().map(|e| e.to_string());
        assert_eq!(
            reason("https://host:1", false).as_deref(),
            Some(
                "invalid server address \"https://host:1\": https:// needs the CA certificate \
                 that signed the server's (--tls-ca)"
            )
        );
        assert!(reason("http://host:1", true).is_some_and(|r| r.contains("use https://")));
    }

    #[test]
    fn tokens_are_sent_and_never_printed() {
        let value = authorization(Some("s3cret")).ok().flatten();
        assert_eq!(
            value.as_ref().and_then(|v| v.to_str().ok()),
            Some("Bearer s3cret")
        );
        assert!(value.is_some_and(|v| v.is_sensitive()));
        assert!(matches!(
            authorization(Some("caf\u{e9}")),
            Err(ClientError::InvalidToken)
        ));
        let options = ClientOptions {
            token: Some("s3cret".into()),
            ..ClientOptions::default()
        };
        assert!(!format!("{options:?}").contains("s3cret"));
    }

    #[test]
    fn default_options() {
        let options = ClientOptions::default();
        assert_eq!(options.timeout, Duration::from_secs(30));
        assert_eq!(options.connect_timeout, Duration::from_secs(5));
        assert_eq!(options.max_message_bytes, 64 << 20);
        assert_eq!(options.max_retries, 3);
    }

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
        assert_eq!(exhausted("30"), Some(Duration::from_millis(30)));
        assert_eq!(exhausted("0"), Some(Duration::ZERO));
        for bad in ["-1", "", "soon", "1.5", "+3", " 30"] {
            assert_eq!(exhausted(bad), None, "{bad:?}");
        }
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
    async fn refused_connections_name_the_address() {
        let Ok(listener) = std::net::TcpListener::bind("127.0.0.1:0") else {
            return;
        };
        let Ok(addr) = listener.local_addr() else {
            return;
        };
        drop(listener);
        let err = Client::connect(&addr.to_string(), ClientOptions::default())
            .await
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            err,
            Some(format!(
                "cannot connect to polyhead at http://{addr}: connection refused \
                 (is the server running? set --server or POLYHEAD_SERVER)"
            ))
        );
    }
}

//! [`Client`]: a typed, deadline-aware wrapper over the generated `PolyheadClient` that retries
//! connecting, and calls the server could not take (UNAVAILABLE, RESOURCE_EXHAUSTED), within
//! the call's deadline, or within one deadline for everything (a CLI command's).

use std::fmt;
use std::future::Future;
use std::time::Duration;

use polyhead_proto::Bytes;
use polyhead_proto::v1::{self, polyhead_client::PolyheadClient};
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::addr::resolve_addr;
use crate::deadline::Deadline;
use crate::error::{ClientError, Result};
use crate::retry::retrying;
use crate::windows::{WindowStream, window_messages};

/// Default server address.
pub const DEFAULT_SERVER: &str = "127.0.0.1:50051";

/// Connection and call settings.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientOptions {
    /// Deadline of every call, sent to the server as `grpc-timeout` and enforced locally; also
    /// how long [`Client::connect`] may keep retrying. `deadline` cuts both short.
    pub timeout: Duration,
    /// One deadline for everything done with these options: connecting with its retries, and
    /// every call with its retries, each sent what is left of it as its `grpc-timeout` when it
    /// comes before `timeout` does. The CLI sets it once per command from `--timeout`, so that
    /// connecting and the calls share that budget. `None`: each has `timeout` of its own.
    pub deadline: Option<Deadline>,
    /// How long one attempt at establishing the connection may take.
    pub connect_timeout: Duration,
    /// Interval of the HTTP/2 pings that check a connection nothing arrived on for that long,
    /// and how long the server has to answer one: a connection whose peer stopped answering (a
    /// server that went away without closing it) fails its calls, streams included, with
    /// UNAVAILABLE within twice this.
    pub keep_alive: Duration,
    /// Largest message sent or received, in bytes.
    pub max_message_bytes: usize,
    /// TLS settings; with them a bare `host:port` is reached over `https`.
    pub tls: Option<ClientTls>,
    /// Bearer token sent as `authorization: Bearer <token>` with every call.
    pub token: Option<String>,
    /// How many times a call refused with UNAVAILABLE or RESOURCE_EXHAUSTED, or a connection
    /// attempt that failed, is tried again (0: never), waiting as long as the server's
    /// `grpc-retry-pushback-ms` hint asks, else with jittered exponential backoff (cut short
    /// for a last attempt just before the deadline); retries never extend past `timeout` (or
    /// `deadline`).
    pub max_retries: u32,
}

impl ClientOptions {
    /// The deadline of a call, or of connecting, that starts now: `timeout` from now, or
    /// `deadline` when it comes first.
    fn deadline_from_now(&self) -> Deadline {
        Deadline::after(self.timeout).min(self.deadline)
    }
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(30),
            deadline: None,
            connect_timeout: Duration::from_secs(5),
            keep_alive: Duration::from_secs(20),
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
            .field("deadline", &self.deadline)
            .field("connect_timeout", &self.connect_timeout)
            .field("keep_alive", &self.keep_alive)
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

/// The endpoint for `uri` (normalised from `addr`) with the connection settings of `options`.
fn endpoint(addr: &str, uri: &str, options: &ClientOptions) -> Result<Endpoint> {
    let endpoint = Endpoint::from_shared(uri.to_owned())
        .map_err(|err| ClientError::InvalidAddress {
            addr: addr.to_owned(),
            reason: err.to_string(),
        })?
        .tcp_nodelay(true)
        .connect_timeout(options.connect_timeout)
        .http2_keep_alive_interval(options.keep_alive)
        .keep_alive_timeout(options.keep_alive)
        // hyper does not ping a connection whose only open stream is a response being received
        // (it counts it as idle), so a stalled window stream would never be checked without
        // this. polyhead's server (hyper, h2) answers pings without limiting them.
        .keep_alive_while_idle(true);
    match &options.tls {
        Some(tls) => endpoint
            .tls_config(tls.config())
            .map_err(|source| ClientError::Tls { source }),
        None => Ok(endpoint),
    }
}

impl Client {
    /// Connects to the server at `addr` (`host:port` or `http://host:port`).
    ///
    /// The connection is established eagerly, so an unreachable server fails here with
    /// [`ClientError::Connect`] rather than on the first call. A failed attempt is retried like
    /// a call refused with UNAVAILABLE (see [`ClientOptions::max_retries`]), within `timeout`
    /// (or `deadline`, when it comes first), so that a server that is starting or restarting is
    /// waited for; a failed TLS handshake is not retried. An attempt still under way when that
    /// passes fails with [`ClientError::ConnectTimeout`].
    pub async fn connect(addr: &str, options: ClientOptions) -> Result<Self> {
        let uri = resolve_addr(addr, options.tls.is_some())?;
        let endpoint = endpoint(addr, &uri, &options)?;
        // Checked before connecting, so a token that cannot be sent fails at once.
        authorization(options.token.as_deref())?;
        let deadline = options.deadline_from_now();
        let attempt = |_remaining| connect_once(&endpoint, &uri, deadline);
        let channel = retrying(deadline, options.max_retries, attempt).await?;
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

    /// A client on the same connection with another call deadline; [`ClientOptions::deadline`]
    /// still holds.
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
    /// whole stream, locally too, and its failures are classified like a unary call's. A call
    /// the server refuses for now (UNAVAILABLE, RESOURCE_EXHAUSTED) before admitting it, that
    /// is before its response starts, is sent again like a unary one, the whole video with it;
    /// a refusal inside a stream that has started (a model's full queue) is not.
    pub async fn stream_windows(
        &self,
        video: impl Into<Bytes>,
        options: v1::WindowOptions,
        chunk_bytes: usize,
    ) -> Result<WindowStream> {
        let deadline = self.options.deadline_from_now();
        let messages = window_messages(video.into(), options, chunk_bytes);
        let inner = self.open_windows(messages, deadline).await?;
        Ok(WindowStream::new(inner, deadline))
    }

    /// [`Client::stream_windows`], returning the raw response stream: its messages after the
    /// first wait only for the server, which ends the stream at the deadline it was sent, and
    /// its failures are the raw statuses.
    pub async fn recognize_windows(
        &self,
        video: impl Into<Bytes>,
        options: v1::WindowOptions,
        chunk_bytes: usize,
    ) -> Result<tonic::Streaming<v1::RecognizeActionWindowsResponse>> {
        let messages = window_messages(video.into(), options, chunk_bytes);
        self.open_windows(messages, self.options.deadline_from_now())
            .await
    }

    /// Starts a RecognizeActionWindows call that uploads `messages`, held to `deadline`, and
    /// uploads them again while the server refuses the call for now (see [`Client::attempts`]).
    async fn open_windows(
        &self,
        messages: Vec<v1::RecognizeActionWindowsRequest>,
        deadline: Deadline,
    ) -> Result<tonic::Streaming<v1::RecognizeActionWindowsResponse>> {
        self.attempts(deadline, move |mut inner, remaining| {
            let request = self.request_within(tokio_stream::iter(messages.clone()), remaining);
            async move { inner.recognize_action_windows(request).await }
        })
        .await
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

    /// Wraps a message in a request carrying the bearer token and the call deadline:
    /// [`ClientOptions::timeout`], or what is left of [`ClientOptions::deadline`] when less.
    /// Once that deadline has passed the request carries a zero timeout, which tonic's channel
    /// fails at once, locally, with CANCELLED ("Timeout expired"); the typed calls check first
    /// and answer [`ClientError::Timeout`].
    pub fn request<T>(&self, message: T) -> tonic::Request<T> {
        self.request_within(message, self.options.deadline_from_now().remaining())
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

    /// Sends `message` through `rpc`, with [`Client::attempts`]: each attempt's deadline, sent
    /// as its `grpc-timeout`, is what remains of the call's when it is sent.
    async fn call<M, T, F, Fut>(&self, message: M, rpc: F) -> Result<T>
    where
        M: Clone,
        F: Fn(PolyheadClient<Channel>, tonic::Request<M>) -> Fut,
        Fut: Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        self.attempts(self.options.deadline_from_now(), |inner, remaining| {
            rpc(inner, self.request_within(message.clone(), remaining))
        })
        .await
    }

    /// Makes the call `rpc` starts, given the channel and what remains of `deadline`, and makes
    /// it again (see [`ClientOptions::max_retries`]) while the server refuses it for now and
    /// the deadline allows; none is made once nothing remains. The last failure is returned.
    async fn attempts<T, F, Fut>(&self, deadline: Deadline, rpc: F) -> Result<T>
    where
        F: Fn(PolyheadClient<Channel>, Duration) -> Fut,
        Fut: Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        let after = deadline.budget();
        retrying(deadline, self.options.max_retries, |remaining| {
            let reply = (!remaining.is_zero()).then(|| rpc(self.inner.clone(), remaining));
            async move {
                let Some(reply) = reply else {
                    return Err(ClientError::Timeout { after });
                };
                match reply.await {
                    Ok(response) => Ok(response.into_inner()),
                    Err(status) => Err(ClientError::from_call(status, &deadline)),
                }
            }
        })
        .await
    }
}

/// One attempt at connecting to `uri` through `endpoint`, given up when `deadline` passes.
async fn connect_once(endpoint: &Endpoint, uri: &str, deadline: Deadline) -> Result<Channel> {
    let addr = uri.to_owned();
    match tokio::time::timeout_at(deadline.tokio_instant(), endpoint.connect()).await {
        Ok(Ok(channel)) => Ok(channel),
        Ok(Err(source)) => Err(ClientError::Connect { addr, source }),
        Err(_elapsed) => Err(ClientError::ConnectTimeout {
            addr,
            after: deadline.budget(),
        }),
    }
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
        assert_eq!(options.keep_alive, Duration::from_secs(20));
        assert_eq!(options.max_message_bytes, 64 << 20);
        assert_eq!(options.max_retries, 3);
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

//! polyhead server library: the model set, the shared-backbone pipeline and the gRPC services.
//!
//! One process loads one model set: a frozen backbone and the heads that consume its features.
//! Each image goes through the backbone once; every head a request names runs on those features.

pub mod admission;
pub mod config;
pub mod config_layers;
pub mod engine;
pub mod error;
pub mod geometry;
pub mod grpc;
pub mod heads;
pub mod heap;
pub mod lifecycle;
pub mod manifest;
pub mod media;
pub mod model_set;
pub mod pipeline;
pub mod security;
pub mod telemetry;

use std::future::Future;
use std::sync::Arc;

pub use config::Config;
pub use error::Error;
pub use lifecycle::Lifecycle;
pub use model_set::{LoadError, ModelSet};
pub use pipeline::Pipeline;

/// Loads the model set, warms it up and returns the pipeline ready to serve.
pub async fn load(config: &Config) -> Result<Arc<Pipeline>, StartError> {
    let cfg = config.clone();
    let models = tokio::task::spawn_blocking(move || ModelSet::load(&cfg))
        .await
        .map_err(|e| StartError::WarmUp(format!("loading panicked: {e}")))??;
    tracing::info!(
        model_set = %models.name,
        device = %models.device,
        heads = models.heads.len(),
        "model set loaded"
    );
    let pipeline = Pipeline::new(models, config.limits.clone(), &config.cache)
        .with_handles(&config.handles)
        .with_admission(&config.admission);
    let pipeline = Arc::new(pipeline);
    Pipeline::keep_tidy(&pipeline);
    let took = pipeline
        .warm_up()
        .await
        .map_err(|e| StartError::WarmUp(e.to_string()))?;
    tracing::info!(ms = took.as_millis() as u64, "warm-up done");
    // The warm-up's batches (a clip's frames) say nothing of the traffic to come.
    engine::arena::release_now();
    // Loading freed the models' parsed protobufs; the C heap would keep those pages.
    let released = heap::release_free_memory();
    tracing::debug!(released, "free heap memory returned to the system");
    Ok(pipeline)
}

/// Serves on `listener` at once (health NOT_SERVING, the API UNAVAILABLE), loads and warms up
/// the model set, then serves it until `shutdown` resolves and the drain completes. A model set
/// that fails to load stops the server with the error.
pub async fn run(
    config: &Config,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), StartError> {
    let security = config.security.load()?;
    let lifecycle = Lifecycle::new().await;
    tracing::info!(address = %listener.local_addr().map_err(StartError::Io)?, "listening");
    let server = serve_until_drained(Arc::clone(&lifecycle), config, security, listener, shutdown);
    tokio::pin!(server);
    let loading = async {
        let pipeline = load(config).await?;
        lifecycle.set_ready(pipeline).await;
        tracing::info!("ready");
        Ok::<_, StartError>(())
    };
    tokio::select! {
        stopped = &mut server => return stopped,
        loaded = loading => loaded?,
    }
    server.await
}

/// Serves an already loaded pipeline (ready at once) until `shutdown` resolves and the drain
/// completes.
pub async fn serve_loaded(
    config: &Config,
    pipeline: Arc<Pipeline>,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), StartError> {
    let security = config.security.load()?;
    let lifecycle = Lifecycle::new().await;
    lifecycle.set_ready(pipeline).await;
    serve_until_drained(lifecycle, config, security, listener, shutdown).await
}

/// Runs the gRPC server; once shutdown has started, stops it when the drain timeout has passed,
/// even if calls are still in flight then.
async fn serve_until_drained(
    lifecycle: Arc<Lifecycle>,
    config: &Config,
    security: security::Security,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), StartError> {
    let options = config.serve_options();
    let hard_stop = options.drain_timeout;
    let (started, started_rx) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async move {
        shutdown.await;
        let _ = started.send(());
    };
    let deadline = async move {
        match started_rx.await {
            Ok(()) => tokio::time::sleep(hard_stop).await,
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        served = grpc::serve_secured(lifecycle, options, security, listener, shutdown) => Ok(served?),
        () = deadline => {
            tracing::warn!("calls still in flight when the drain timeout passed; stopping");
            Ok(())
        }
    }
}

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("warm-up failed: {0}")]
    WarmUp(String),
    #[error(transparent)]
    Io(std::io::Error),
    #[error(transparent)]
    Security(#[from] security::SecurityError),
    #[error("server error: {0}")]
    Transport(#[from] tonic::transport::Error),
}

//! polyhead server library: the model set, the shared-backbone pipeline and the gRPC services.
//!
//! One process loads one model set: a frozen backbone and the heads that consume its features.
//! Each image goes through the backbone once; every head a request names runs on those features.

pub mod config;
pub mod engine;
pub mod error;
pub mod geometry;
pub mod grpc;
pub mod heads;
pub mod manifest;
pub mod media;
pub mod model_set;
pub mod pipeline;

use std::future::Future;
use std::sync::Arc;

pub use config::Config;
pub use error::Error;
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
    let pipeline = Arc::new(Pipeline::new(models, config.limits.clone()));
    let took = pipeline
        .warm_up()
        .await
        .map_err(|e| StartError::WarmUp(e.to_string()))?;
    tracing::info!(ms = took.as_millis() as u64, "warm-up done");
    Ok(pipeline)
}

/// Loads the model set and serves it on `listener` until `shutdown` resolves.
pub async fn run(
    config: &Config,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), StartError> {
    let pipeline = load(config).await?;
    tracing::info!(address = %listener.local_addr().map_err(StartError::Io)?, "serving");
    grpc::serve(pipeline, listener, shutdown).await?;
    Ok(())
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
    #[error("server error: {0}")]
    Transport(#[from] tonic::transport::Error),
}

//! The serving state over the process's life: loading (health NOT_SERVING, calls UNAVAILABLE),
//! ready (SERVING), draining (NOT_SERVING again, new calls UNAVAILABLE, in-flight calls finish).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use tonic_health::ServingStatus;
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::{HealthReporter, HealthService};

use crate::pipeline::Pipeline;

/// Names the health service reports: the whole server (`""`) and each API.
pub const HEALTH_SERVICES: &[&str] =
    &["", "polyhead.v1.Polyhead", "inference.GRPCInferenceService"];

/// Shared by the services, the drain layer and the start-up and shutdown sequences.
pub struct Lifecycle {
    pipeline: OnceLock<Arc<Pipeline>>,
    draining: AtomicBool,
    inflight: AtomicUsize,
    health: HealthReporter,
}

/// Counts one call as in flight until dropped.
pub struct InflightGuard(Arc<Lifecycle>);

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Lifecycle {
    /// A server that is still loading: every health name NOT_SERVING.
    pub async fn new() -> Arc<Self> {
        let health = HealthReporter::new();
        for name in HEALTH_SERVICES {
            health
                .set_service_status(*name, ServingStatus::NotServing)
                .await;
        }
        Arc::new(Self {
            pipeline: OnceLock::new(),
            draining: AtomicBool::new(false),
            inflight: AtomicUsize::new(0),
            health,
        })
    }

    /// The `grpc.health.v1.Health` service reporting this lifecycle.
    pub fn health_service(&self) -> HealthServer<HealthService> {
        HealthServer::new(HealthService::from_health_reporter(self.health.clone()))
            .max_decoding_message_size(crate::grpc::EXEMPT_MESSAGE_BYTES)
    }

    /// Models loaded and warmed up: calls are served and health says SERVING.
    pub async fn set_ready(&self, pipeline: Arc<Pipeline>) {
        if self.pipeline.set(pipeline).is_err() {
            tracing::warn!("the pipeline was already set; keeping the first");
        }
        if !self.is_draining() {
            self.set_health(ServingStatus::Serving).await;
            // A drain that started since the check has already said NOT_SERVING: say it again.
            if self.is_draining() {
                self.set_health(ServingStatus::NotServing).await;
            }
        }
    }

    /// The pipeline, once loaded.
    pub fn pipeline(&self) -> Option<&Arc<Pipeline>> {
        self.pipeline.get()
    }

    /// Stops taking calls: health flips to NOT_SERVING and new calls get UNAVAILABLE.
    pub async fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
        self.set_health(ServingStatus::NotServing).await;
    }

    /// Whether the server is draining.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Admits a call unless draining.
    pub fn enter(self: &Arc<Self>) -> Option<InflightGuard> {
        self.inflight.fetch_add(1, Ordering::AcqRel);
        let guard = InflightGuard(Arc::clone(self));
        (!self.is_draining()).then_some(guard)
    }

    /// Calls in flight now.
    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Acquire)
    }

    async fn set_health(&self, status: ServingStatus) {
        for name in HEALTH_SERVICES {
            self.health.set_service_status(*name, status).await;
        }
    }
}

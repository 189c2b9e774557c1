//! Request-level admission control: at most N requests run at once, at most Q more wait for a
//! slot in arrival order, and a request that finds both full is refused at once (the caller gets
//! RESOURCE_EXHAUSTED with a retry hint) instead of waiting without bound. A waiting request
//! whose deadline passes or whose caller goes away leaves the queue without ever running.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use clap::Args;
use serde::Serialize;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use crate::telemetry::metrics;

/// How many requests run and wait, and how many HTTP/2 streams one connection may open.
#[derive(Debug, Clone, Args, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct AdmissionConfig {
    /// Requests (Detect, Segment, Analyze, RecognizeAction, RecognizeActionWindows once its
    /// upload is complete, ExtractFeatures, ModelInfer) that run at once; more wait for a slot.
    #[arg(long, env = "POLYHEAD_MAX_CONCURRENT_REQUESTS", default_value_t = 32)]
    pub max_concurrent_requests: usize,

    /// Requests that may wait for a slot; a request arriving when this many wait is refused at
    /// once with RESOURCE_EXHAUSTED. 0: never wait.
    #[arg(long, env = "POLYHEAD_MAX_QUEUED_REQUESTS", default_value_t = 128)]
    pub max_queued_requests: usize,

    /// HTTP/2 streams (concurrent calls) one client connection may have open; the server
    /// advertises it in its SETTINGS and the client holds further calls back.
    #[arg(long, env = "POLYHEAD_MAX_CONCURRENT_STREAMS", default_value_t = 256)]
    pub max_concurrent_streams: u32,

    /// Bytes of requests the server holds at once, over every call and connection (as
    /// sent, gRPC framing included; a compressed message, once in, also counts at the
    /// --max-message-bytes it may inflate to, up to a call's limits); a call whose next bytes
    /// would go over is refused with RESOURCE_EXHAUSTED. A call holds what it
    /// has received until it has been answered (a RecognizeActionWindows upload until the call
    /// is admitted), so this bounds the request messages held at once, arriving, waiting for a
    /// slot or being served. Health checks and reflection are not counted. At least 64 KiB
    /// (for gRPC framing) more than --max-message-bytes and --max-video-bytes, which covers a
    /// video of --max-video-bytes streamed in chunks of 80 KiB or more: each chunk adds about
    /// 10 bytes of framing.
    #[arg(long, env = "POLYHEAD_MAX_RECEIVING_BYTES", default_value_t = 2 << 30)]
    pub max_receiving_bytes: u64,
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        Self {
            max_concurrent_requests: 32,
            max_queued_requests: 128,
            max_concurrent_streams: 256,
            max_receiving_bytes: 2 << 30,
        }
    }
}

/// Refusal of a request that found every slot busy and the queue full.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "the server is at capacity: {running} requests running and {queued} waiting \
     (--max-concurrent-requests, --max-queued-requests)"
)]
pub struct Full {
    pub running: usize,
    pub queued: usize,
}

/// The slots and the queue in front of them.
pub struct Admission {
    slots: Arc<Semaphore>,
    capacity: usize,
    max_queued: usize,
    queued: AtomicUsize,
    /// Requests that left the queue without a slot: their call was cancelled or timed out.
    dropped: AtomicU64,
    /// Woken whenever the running or queued count changes.
    changed: Notify,
}

/// A running request's slot, given back when dropped.
pub struct Slot {
    permit: Option<OwnedSemaphorePermit>,
    admission: Arc<Admission>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        drop(self.permit.take());
        self.admission.publish();
    }
}

/// Counts one request as waiting until dropped (admitted, expired or abandoned alike); one
/// dropped before it was admitted counts as dropped.
struct Waiting<'a> {
    admission: &'a Admission,
    admitted: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let admission = self.admission;
        if !self.admitted {
            admission.dropped.fetch_add(1, Ordering::Relaxed);
            metrics::record_dropped(DROPPED_QUEUE);
        }
        admission.queued.fetch_sub(1, Ordering::AcqRel);
        admission.publish();
    }
}

/// The `queue` label of requests that left the admission queue without a slot.
const DROPPED_QUEUE: &str = "admission";

impl Admission {
    /// Slots and a queue as `config` sets them (at least one slot).
    pub fn new(config: &AdmissionConfig) -> Arc<Self> {
        let capacity = config.max_concurrent_requests.max(1);
        let admission = Arc::new(Self {
            slots: Arc::new(Semaphore::new(capacity)),
            capacity,
            max_queued: config.max_queued_requests,
            queued: AtomicUsize::new(0),
            dropped: AtomicU64::new(0),
            changed: Notify::new(),
        });
        admission.publish();
        admission
    }

    /// Takes a free slot, or waits in the queue for one; refuses at once when the queue is
    /// full. Dropping the returned future leaves the queue.
    pub async fn admit(self: &Arc<Self>) -> Result<Slot, Full> {
        let permit = match Arc::clone(&self.slots).try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                let mut waiting = self.enqueue()?;
                let permit = Arc::clone(&self.slots)
                    .acquire_owned()
                    .await
                    .expect("the admission semaphore is never closed: this is a bug");
                waiting.admitted = true;
                drop(waiting);
                permit
            }
        };
        let slot = Slot {
            permit: Some(permit),
            admission: Arc::clone(self),
        };
        self.publish();
        Ok(slot)
    }

    /// Runs `work` in a slot (see [`Admission::admit`]).
    pub async fn run<T, E>(
        self: &Arc<Self>,
        work: impl Future<Output = Result<T, E>>,
    ) -> Result<T, E>
    where
        E: From<Full>,
    {
        let _slot = self.admit().await?;
        work.await
    }

    /// Requests holding a slot now.
    pub fn running(&self) -> usize {
        self.capacity - self.slots.available_permits()
    }

    /// Requests waiting for a slot now.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }

    /// Requests that have left the queue without a slot so far, because their call was
    /// cancelled or its deadline passed while they waited.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Waits until `condition(running, queued)` holds; it is checked now and after every change
    /// of either count. Operators see the same counts as gauges; tests wait on them.
    pub async fn wait_until(&self, condition: impl Fn(usize, usize) -> bool) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            // Registered before the check, so that a change between the two is not missed.
            changed.as_mut().enable();
            if condition(self.running(), self.queued()) {
                return;
            }
            changed.await;
        }
    }

    /// Joins the queue unless it is full.
    fn enqueue(&self) -> Result<Waiting<'_>, Full> {
        let joined = self
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |queued| {
                (queued < self.max_queued).then_some(queued + 1)
            });
        match joined {
            Ok(_) => {
                self.publish();
                Ok(Waiting {
                    admission: self,
                    admitted: false,
                })
            }
            Err(queued) => Err(Full {
                running: self.running(),
                queued,
            }),
        }
    }

    fn publish(&self) {
        metrics::set_admission(self.running(), self.queued());
        self.changed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn admission(slots: usize, queue: usize) -> Arc<Admission> {
        Admission::new(&AdmissionConfig {
            max_concurrent_requests: slots,
            max_queued_requests: queue,
            ..AdmissionConfig::default()
        })
    }

    #[tokio::test]
    async fn slots_then_queue_then_refusal() {
        let admission = admission(2, 1);
        let first = admission.admit().await.expect("slot 1");
        let _second = admission.admit().await.expect("slot 2");
        assert_eq!(admission.running(), 2);
        let waiter = {
            let admission = Arc::clone(&admission);
            tokio::spawn(async move { admission.admit().await.map(|_| ()) })
        };
        admission.wait_until(|_, queued| queued == 1).await;
        let refused = admission.admit().await.err().expect("queue full");
        assert_eq!((refused.running, refused.queued), (2, 1));
        drop(first);
        waiter
            .await
            .expect("join")
            .expect("admitted after a slot freed");
        assert_eq!(admission.queued(), 0);
        assert_eq!(admission.dropped(), 0, "admitted, not dropped");
    }

    #[tokio::test]
    async fn abandoned_waiters_leave_the_queue() {
        let admission = admission(1, 4);
        let held = admission.admit().await.expect("slot");
        let expired = tokio::time::timeout(Duration::from_millis(20), admission.admit()).await;
        assert!(expired.is_err(), "a full server makes the waiter wait");
        assert_eq!(admission.queued(), 0, "the expired waiter left the queue");
        assert_eq!(admission.dropped(), 1);
        drop(held);
        assert_eq!(admission.running(), 0);
        let _again = admission
            .admit()
            .await
            .expect("the freed slot is taken at once");
        assert_eq!(admission.running(), 1);
        assert_eq!(admission.dropped(), 1, "taken at once: never queued");
    }

    #[tokio::test]
    async fn zero_queue_refuses_as_soon_as_slots_are_busy() {
        let admission = admission(1, 0);
        let _held = admission.admit().await.expect("slot");
        assert!(admission.admit().await.is_err());
    }
}

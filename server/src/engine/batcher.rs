//! Dynamic batching in front of a session: the backbone's, and each per-image head's. The
//! thread that owns the session also serves its batcher's queue ([`BatchQueue`]): it collects
//! pending requests until they hold `max_batch` images or `max_delay` has passed since the first,
//! drops those whose caller has gone or whose call's deadline has passed, runs every group of
//! requests whose inputs have equal shapes and one item each (`[1, ...]`) as ONE batch, every
//! input concatenated along axis 0, and splits each output back per request along axis 0. A
//! request of several items (a clip's frames) runs on its own, unbatched. Batching where the
//! session runs costs a request one thread hand-off each way per stage, as an unbatched run
//! would.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use tracing::Span;

use super::{EngineError, FeatureMemory, NamedTensors, Run, Stage};
use crate::telemetry::metrics;

/// The batchers' settings, shared by the backbone and the per-image heads.
#[derive(Debug, Clone, Args, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BatchConfig {
    /// Most images one backbone (or head) run takes from concurrent requests; 1 turns batching
    /// off. A clip's frames, and a window's new frames, go through the backbone in runs of at
    /// most this many; a ModelInfer call on the backbone or an image head may send at most this
    /// many images.
    #[arg(
        long,
        env = "POLYHEAD_MAX_BATCH",
        default_value_t = 8,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub max_batch: u32,

    /// How long a batch waits for more images after its first request was queued (time it
    /// spent waiting for the previous run counts), in milliseconds. 0: no waiting; a batch
    /// takes what queued up while the model ran the previous one, so a lone request pays no
    /// delay and a busy model still batches. The model's thread waits with the batch: a
    /// ModelInfer call to the same model waits too.
    #[arg(long, env = "POLYHEAD_MAX_BATCH_DELAY_MS", default_value_t = 0)]
    pub max_batch_delay_ms: u64,
}

impl BatchConfig {
    /// How long a batch waits for more images.
    pub fn max_delay(&self) -> Duration {
        Duration::from_millis(self.max_batch_delay_ms)
    }
}

tokio::task_local! {
    /// When the current call must be answered, for the requests it sends to the batchers;
    /// `None` for work done on behalf of several calls.
    static CALL_DEADLINE: Option<Instant>;
}

/// Runs `work` as a call that must be answered by `deadline`: its requests still waiting in a
/// batcher's queue then are answered [`EngineError::Expired`] there, and never reach the
/// model. (The caller's own timer may fire a tick later than the deadline, by which time an
/// idle model thread would have taken the request.)
pub async fn within_deadline<F: Future>(deadline: Instant, work: F) -> F::Output {
    CALL_DEADLINE.scope(Some(deadline), work).await
}

/// Runs `work` on behalf of several calls (a single-flight computation that others wait for):
/// no one call's deadline drops its requests. The call that leads it still stops waiting at
/// its own deadline, and another takes the work over.
pub async fn for_several_calls<F: Future>(work: F) -> F::Output {
    CALL_DEADLINE.scope(None, work).await
}

/// What runs a batch: a session worker's thread, or a stand-in in tests.
pub trait BatchRunner {
    /// Runs `inputs` as one batch of `stage`, its spans children of `parent`.
    fn run(
        &mut self,
        stage: Stage,
        inputs: NamedTensors,
        parent: Span,
    ) -> impl Future<Output = Result<Run, EngineError>>;
}

/// A request waiting for its batch.
pub struct Pending {
    inputs: NamedTensors,
    enqueued: Instant,
    /// The caller's span, parent of the run's span when the request leads its batch.
    parent: Span,
    /// Open while the request waits; closed when its batch starts.
    queue_span: Span,
    /// When its call must be answered, if it runs under [`within_deadline`].
    deadline: Option<Instant>,
    reply: oneshot::Sender<Result<Run, EngineError>>,
}

impl Pending {
    /// The images the request holds (its batch dimension).
    fn images(&self) -> usize {
        self.inputs
            .first()
            .and_then(|(_, t)| t.shape().first().copied())
            .unwrap_or(1)
    }

    /// The shapes of its inputs, which a batch's requests share.
    fn shapes(&self) -> Vec<&[usize]> {
        self.inputs.iter().map(|(_, t)| t.shape()).collect()
    }
}

/// Runs and images the batcher has sent to its worker, and requests it dropped unrun.
#[derive(Default)]
struct Counts {
    runs: AtomicU64,
    images: AtomicU64,
    dropped: AtomicU64,
}

/// The handle to a batcher. Cheap to share; its queue closes when the last handle is dropped.
#[derive(Clone)]
pub struct Batcher {
    model: Arc<str>,
    queue: mpsc::Sender<Pending>,
    capacity: usize,
    counts: Arc<Counts>,
}

/// The receiving end of a batcher's queue, served by the thread that owns the session its
/// batches run on (see [`super::SessionWorker::spawn_batching`]).
pub struct BatchQueue {
    pending: mpsc::Receiver<Pending>,
    task: Task,
}

impl Batcher {
    /// A batcher for `model` whose runs are `stage` of the requests they serve, holding at most
    /// `capacity` waiting requests, and the queue its runner's thread serves. Batches are
    /// concatenated, and outputs split, in `memory` (on the device for features kept there).
    pub fn new(
        model: &str,
        stage: Stage,
        config: &BatchConfig,
        capacity: usize,
        memory: Arc<FeatureMemory>,
    ) -> (Self, BatchQueue) {
        let capacity = capacity.max(1);
        let (queue, pending) = mpsc::channel(capacity);
        let counts = Arc::new(Counts::default());
        let task = Task {
            model: model.to_string(),
            stage,
            max_images: config.max_batch.max(1) as usize,
            max_delay: config.max_delay(),
            counts: Arc::clone(&counts),
            memory,
        };
        let batcher = Self {
            model: model.into(),
            queue,
            capacity,
            counts,
        };
        (batcher, BatchQueue { pending, task })
    }

    /// Runs `inputs` (each `[N, ...]`) as a stage of the current request: a single image may
    /// share its run with concurrent ones. Fails at once with `Overloaded` when the queue is
    /// full. The outputs hold this request's items only, as an unbatched run's would.
    pub async fn run(&self, inputs: NamedTensors) -> Result<Run, EngineError> {
        let (reply, answer) = oneshot::channel();
        let pending = Pending {
            inputs,
            enqueued: Instant::now(),
            parent: Span::current(),
            queue_span: tracing::info_span!("queue", model = %self.model),
            deadline: CALL_DEADLINE.try_with(|deadline| *deadline).ok().flatten(),
            reply,
        };
        // Counted before sending so that the task's decrement never comes first.
        metrics::add_queue_depth(&self.model, 1.0);
        self.queue.try_send(pending).map_err(|e| {
            metrics::add_queue_depth(&self.model, -1.0);
            match e {
                mpsc::error::TrySendError::Full(_) => EngineError::Overloaded {
                    model: self.model.to_string(),
                    capacity: self.capacity,
                },
                mpsc::error::TrySendError::Closed(_) => {
                    EngineError::Stopped(self.model.to_string())
                }
            }
        })?;
        answer
            .await
            .map_err(|_| EngineError::Stopped(self.model.to_string()))?
    }

    /// Runs made so far; a batch is one run.
    pub fn runs(&self) -> u64 {
        self.counts.runs.load(Ordering::Relaxed)
    }

    /// Images run so far, over all runs.
    pub fn images(&self) -> u64 {
        self.counts.images.load(Ordering::Relaxed)
    }

    /// Requests dropped before they ran, because their caller had gone or their deadline had
    /// passed while they waited.
    pub fn dropped(&self) -> u64 {
        self.counts.dropped.load(Ordering::Relaxed)
    }
}

impl BatchQueue {
    /// The next waiting request; `None` once every [`Batcher`] handle is gone. Cancel-safe.
    pub async fn recv(&mut self) -> Option<Pending> {
        self.pending.recv().await
    }

    /// Runs `first` on `runner`, with the requests that join its batch, and answers each.
    pub async fn serve<R: BatchRunner>(&mut self, first: Pending, runner: &mut R) {
        let collected = self.task.collect(first, &mut self.pending).await;
        for group in group_by_shape(collected, Pending::shapes) {
            self.task.run_group(runner, group).await;
        }
    }
}

/// A batcher's state.
struct Task {
    model: String,
    stage: Stage,
    max_images: usize,
    max_delay: Duration,
    counts: Arc<Counts>,
    memory: Arc<FeatureMemory>,
}

impl Task {
    /// `first` and the requests that follow it until they hold `max_images` images or
    /// `max_delay` has passed since `first` was queued (it may have waited for an earlier run
    /// already); requests that may not run are dropped as they come, and nothing is waited for
    /// when `first` is. Requests already queued join at once; with no delay, nothing is waited
    /// for. (A timer would not do for a zero delay: tokio rounds deadlines up to its next
    /// millisecond tick, so even an elapsed one would hold the batch back by up to a
    /// millisecond.)
    async fn collect(&self, first: Pending, queue: &mut mpsc::Receiver<Pending>) -> Vec<Pending> {
        let deadline = tokio::time::Instant::from_std(first.enqueued) + self.max_delay;
        let Some(first) = self.take(first) else {
            return Vec::new();
        };
        let mut images = first.images();
        let mut batch = vec![first];
        while images < self.max_images {
            let next = match queue.try_recv() {
                Ok(next) => next,
                Err(mpsc::error::TryRecvError::Empty) if !self.max_delay.is_zero() => {
                    match tokio::time::timeout_at(deadline, queue.recv()).await {
                        Ok(Some(next)) => next,
                        Ok(None) | Err(_) => break,
                    }
                }
                Err(_) => break,
            };
            if let Some(next) = self.take(next) {
                images += next.images();
                batch.push(next);
            }
        }
        batch
    }

    /// Takes `pending` off the queue: `None` when it may not run (see [`Task::live`]).
    fn take(&self, pending: Pending) -> Option<Pending> {
        metrics::add_queue_depth(&self.model, -1.0);
        self.live(pending)
    }

    /// `pending` if it may still run: `None` when its caller has gone, or when its deadline has
    /// passed, which its caller is then told.
    fn live(&self, pending: Pending) -> Option<Pending> {
        if pending.reply.is_closed() {
            tracing::debug!(model = %self.model, "caller gone; request dropped before running");
            self.dropped();
            return None;
        }
        if pending
            .deadline
            .is_some_and(|deadline| Instant::now() >= deadline)
        {
            tracing::debug!(model = %self.model, "deadline passed; request dropped before running");
            self.dropped();
            let _ = pending
                .reply
                .send(Err(EngineError::Expired(self.model.clone())));
            return None;
        }
        Some(pending)
    }

    /// Counts one request dropped before it ran.
    fn dropped(&self) {
        self.counts.dropped.fetch_add(1, Ordering::Relaxed);
        metrics::record_dropped(&self.model);
    }

    /// Runs the live requests of `group` (equal shapes) as one batch and answers each.
    async fn run_group<R: BatchRunner>(&self, runner: &mut R, group: Vec<Pending>) {
        let live: Vec<Pending> = group.into_iter().filter_map(|p| self.live(p)).collect();
        let Some(parent) = live.first().map(|p| p.parent.clone()) else {
            return;
        };
        let started = Instant::now();
        let sizes: Vec<usize> = live.iter().map(Pending::images).collect();
        let mut inputs = Vec::with_capacity(live.len());
        let mut waiting = Vec::with_capacity(live.len());
        for pending in live {
            drop(pending.queue_span);
            drop(pending.parent);
            waiting.push((
                pending.reply,
                started.saturating_duration_since(pending.enqueued),
            ));
            inputs.push(pending.inputs);
        }
        let result = match self.memory.concat_named(inputs) {
            Ok(batch) => self.run_batch(runner, batch, parent, &sizes).await,
            Err(message) => {
                drop(parent);
                Err(EngineError::Run {
                    model: self.model.clone(),
                    message,
                })
            }
        };
        self.answer(waiting, result);
    }

    /// Runs one concatenated batch and splits its outputs per request, `sizes[i]` items each.
    async fn run_batch<R: BatchRunner>(
        &self,
        runner: &mut R,
        batch: NamedTensors,
        parent: Span,
        sizes: &[usize],
    ) -> Result<(Vec<NamedTensors>, Run), EngineError> {
        let images = sizes.iter().sum::<usize>() as u64;
        let run = runner.run(self.stage, batch, parent).await?;
        self.counts.runs.fetch_add(1, Ordering::Relaxed);
        self.counts.images.fetch_add(images, Ordering::Relaxed);
        if self.stage == Stage::Backbone {
            metrics::record_backbone_pass();
        }
        let parts = self
            .memory
            .split_named(&run.outputs, sizes)
            .map_err(|message| EngineError::Run {
                model: self.model.clone(),
                message,
            })?;
        Ok((parts, run))
    }

    /// Sends each waiting request its part of the run, or the run's error.
    fn answer(
        &self,
        waiting: Vec<(oneshot::Sender<Result<Run, EngineError>>, Duration)>,
        result: Result<(Vec<NamedTensors>, Run), EngineError>,
    ) {
        match result {
            Ok((parts, run)) => {
                for ((reply, waited), outputs) in waiting.into_iter().zip(parts) {
                    // A caller gone while the batch ran simply misses its result.
                    let _ = reply.send(Ok(Run {
                        outputs,
                        queued: waited + run.queued,
                        elapsed: run.elapsed,
                    }));
                }
            }
            Err(error) => {
                for (reply, _) in waiting {
                    let _ = reply.send(Err(error.clone()));
                }
            }
        }
    }
}

/// Splits `items` into runs in arrival order: single items (batch dimension 1) whose inputs have
/// equal shapes together, every item of several (a clip) alone.
fn group_by_shape<T>(items: Vec<T>, shapes: impl Fn(&T) -> Vec<&[usize]>) -> Vec<Vec<T>> {
    let mut groups: Vec<Vec<T>> = Vec::new();
    for item in items {
        let key = shapes(&item);
        let single = !key.is_empty() && key.iter().all(|s| s.first() == Some(&1));
        let joins = single
            .then(|| {
                groups
                    .iter()
                    .position(|g| g.first().map(&shapes).as_ref() == Some(&key))
            })
            .flatten();
        match joins {
            Some(i) => groups[i].push(item),
            None => groups.push(vec![item]),
        }
    }
    groups
}

#[cfg(test)]
mod tests;

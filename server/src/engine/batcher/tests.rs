//! The batcher against a stand-in runner that records every batch it is given.

use std::sync::Mutex;

use futures_util::FutureExt;
use futures_util::future::join_all;
use ndarray::{ArrayD, IxDyn};
use tokio::sync::watch;

use super::*;
use crate::engine::Tensor;
use ndarray::Axis;

/// A runner that records each batch's shape, waits for its gate, and answers `double` (the
/// input times two) and `sum` (each item's sum, `[N, 1]`).
#[derive(Clone)]
struct Fake {
    shapes: Arc<Mutex<Vec<Vec<usize>>>>,
    gate: watch::Receiver<bool>,
    started: mpsc::UnboundedSender<()>,
}

impl BatchRunner for Fake {
    fn run(
        &mut self,
        _stage: Stage,
        inputs: NamedTensors,
        _parent: Span,
    ) -> impl Future<Output = Result<Run, EngineError>> {
        let fake = self.clone();
        async move {
            let input = inputs[0].1.array().expect("a host array").to_owned();
            fake.shapes
                .lock()
                .expect("shapes")
                .push(input.shape().to_vec());
            let _ = fake.started.send(());
            let mut gate = fake.gate.clone();
            let _ = gate.wait_for(|open| *open).await;
            let double = input.mapv(|v| v * 2.0);
            let sum = input
                .sum_axis(Axis(3))
                .sum_axis(Axis(2))
                .sum_axis(Axis(1))
                .insert_axis(Axis(1));
            Ok(Run {
                outputs: vec![
                    ("double".into(), Tensor::from(double)),
                    ("sum".into(), Tensor::from(sum)),
                ],
                queued: Duration::ZERO,
                elapsed: Duration::from_millis(1),
            })
        }
    }
}

struct Setup {
    batcher: Batcher,
    shapes: Arc<Mutex<Vec<Vec<usize>>>>,
    gate: watch::Sender<bool>,
    started: mpsc::UnboundedReceiver<()>,
}

impl Setup {
    fn shapes(&self) -> Vec<Vec<usize>> {
        self.shapes.lock().expect("shapes").clone()
    }
}

/// A batcher of `max_batch` images and `delay_ms`, its runner's gate open when `open`.
fn setup(max_batch: u32, delay_ms: u64, capacity: usize, open: bool) -> Setup {
    let shapes = Arc::new(Mutex::new(Vec::new()));
    let (gate, gate_rx) = watch::channel(open);
    let (started_tx, started) = mpsc::unbounded_channel();
    let fake = Fake {
        shapes: Arc::clone(&shapes),
        gate: gate_rx,
        started: started_tx,
    };
    let config = BatchConfig {
        max_batch,
        max_batch_delay_ms: delay_ms,
    };
    let memory = Arc::new(FeatureMemory::host());
    let (batcher, queue) = Batcher::new("backbone", Stage::Backbone, &config, capacity, memory);
    serve_on_a_thread(queue, fake);
    Setup {
        batcher,
        shapes,
        gate,
        started,
    }
}

/// Serves `queue` with `runner` on a thread of its own, as a session worker does, until every
/// handle is gone.
fn serve_on_a_thread(mut queue: BatchQueue, mut runner: Fake) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a runtime");
    std::thread::spawn(move || {
        runtime.block_on(async move {
            while let Some(first) = queue.recv().await {
                queue.serve(first, &mut runner).await;
            }
        })
    });
}

/// `n` images of `side` x `side` pixels, every value `fill`.
fn input(n: usize, side: usize, fill: f32) -> ArrayD<f32> {
    ArrayD::from_elem(IxDyn(&[n, 1, side, side]), fill)
}

/// `input` as the runner's one named input.
fn named(input: ArrayD<f32>) -> NamedTensors {
    vec![("pixels".to_string(), Tensor::from(input))]
}

/// Checks that `run` is what an unbatched run of `input` would give.
fn assert_own(run: &Run, input: &ArrayD<f32>) {
    let double = run.outputs[0].1.array().expect("host");
    let sum = run.outputs[1].1.array().expect("host");
    assert_eq!(double, input.mapv(|v| v * 2.0));
    let n = input.shape()[0];
    assert_eq!(sum.shape(), [n, 1]);
    let per_item = input.len() as f32 / n as f32 * input[[0, 0, 0, 0]];
    assert!(sum.iter().all(|&s| s == per_item), "{sum:?}");
}

#[tokio::test]
async fn a_full_batch_runs_without_waiting_for_the_delay() {
    let setup = setup(4, 60_000, 16, true);
    let inputs: Vec<_> = (0..4).map(|i| input(1, 2, i as f32)).collect();
    let runs = join_all(inputs.iter().map(|i| setup.batcher.run(named(i.clone())))).await;
    assert_eq!(setup.shapes(), [[4, 1, 2, 2]]);
    for (run, input) in runs.iter().zip(&inputs) {
        assert_own(run.as_ref().expect("run"), input);
    }
    assert_eq!((setup.batcher.runs(), setup.batcher.images()), (1, 4));
}

#[tokio::test]
async fn requests_beyond_max_batch_go_in_the_next_batch() {
    let setup = setup(4, 200, 16, true);
    let inputs: Vec<_> = (0..5).map(|i| input(1, 2, i as f32)).collect();
    let runs = join_all(inputs.iter().map(|i| setup.batcher.run(named(i.clone())))).await;
    assert_eq!(setup.shapes(), [[4, 1, 2, 2], [1, 1, 2, 2]]);
    for (run, input) in runs.iter().zip(&inputs) {
        assert_own(run.as_ref().expect("run"), input);
    }
    assert_eq!((setup.batcher.runs(), setup.batcher.images()), (2, 5));
}

#[tokio::test]
async fn max_delay_flushes_a_partial_batch() {
    let setup = setup(8, 30, 16, true);
    let started = Instant::now();
    let runs = join_all((0..3).map(|i| setup.batcher.run(named(input(1, 2, i as f32))))).await;
    assert!(started.elapsed() >= Duration::from_millis(30));
    assert_eq!(setup.shapes(), [[3, 1, 2, 2]]);
    assert!(runs.iter().all(Result::is_ok));
    let run = runs[1].as_ref().expect("run");
    assert!(run.queued >= Duration::from_millis(25), "{:?}", run.queued);
}

#[tokio::test]
async fn with_max_batch_1_every_request_runs_alone() {
    let setup = setup(1, 60_000, 16, true);
    let runs = join_all((0..3).map(|i| setup.batcher.run(named(input(1, 2, i as f32))))).await;
    assert!(runs.iter().all(Result::is_ok));
    assert_eq!(setup.shapes(), [[1, 1, 2, 2]; 3]);
}

#[tokio::test]
async fn cancelled_requests_never_reach_the_runner() {
    let setup = setup(8, 100, 16, true);
    // Polled once, so queued, then dropped: its caller is gone before the batch runs.
    assert!(
        setup
            .batcher
            .run(named(input(1, 2, 1.0)))
            .now_or_never()
            .is_none()
    );
    let kept = input(1, 2, 2.0);
    let run = setup.batcher.run(named(kept.clone())).await.expect("run");
    assert_own(&run, &kept);
    assert_eq!(setup.shapes(), [[1, 1, 2, 2]]);
    assert!(
        setup
            .batcher
            .run(named(input(1, 2, 3.0)))
            .now_or_never()
            .is_none()
    );
    let last = setup
        .batcher
        .run(named(input(1, 2, 4.0)))
        .await
        .expect("run");
    assert_own(&last, &input(1, 2, 4.0));
    assert_eq!((setup.batcher.runs(), setup.batcher.images()), (2, 2));
    assert_eq!(
        setup.batcher.dropped(),
        2,
        "both cancelled requests were counted"
    );
}

#[tokio::test]
async fn requests_past_their_call_deadline_never_reach_the_runner() {
    let setup = setup(8, 0, 16, true);
    // A deadline that has passed by the time the model's thread takes the request, as when a
    // call's decoding ends just after its deadline and its timer has not fired yet.
    let passed = Instant::now();
    let expired = within_deadline(passed, setup.batcher.run(named(input(1, 2, 1.0)))).await;
    assert!(
        matches!(expired, Err(EngineError::Expired(ref model)) if model == "backbone"),
        "{expired:?}"
    );
    assert!(setup.shapes().is_empty(), "the runner never saw it");
    assert_eq!(setup.batcher.dropped(), 1);
    let later = Instant::now() + Duration::from_secs(60);
    let kept = input(1, 2, 2.0);
    let run = within_deadline(later, setup.batcher.run(named(kept.clone())))
        .await
        .expect("within its deadline");
    assert_own(&run, &kept);
    // Work for several calls runs whatever the deadline of the call that started it.
    let shared = input(1, 2, 3.0);
    let run = within_deadline(
        passed,
        for_several_calls(setup.batcher.run(named(shared.clone()))),
    )
    .await
    .expect("not held to one call's deadline");
    assert_own(&run, &shared);
    assert_eq!((setup.batcher.runs(), setup.batcher.images()), (2, 2));
}

#[tokio::test]
async fn different_shapes_and_clips_run_apart() {
    let setup = setup(8, 50, 16, true);
    let inputs = [
        input(1, 2, 1.0),
        input(1, 3, 2.0),
        input(1, 2, 3.0),
        input(2, 2, 4.0),
    ];
    let runs = join_all(inputs.iter().map(|i| setup.batcher.run(named(i.clone())))).await;
    assert_eq!(
        setup.shapes(),
        [[2, 1, 2, 2], [1, 1, 3, 3], [2, 1, 2, 2]],
        "the two 2x2 images together, the 3x3 image and the clip alone"
    );
    for (run, input) in runs.iter().zip(&inputs) {
        assert_own(run.as_ref().expect("run"), input);
    }
    assert_eq!((setup.batcher.runs(), setup.batcher.images()), (3, 5));
}

#[tokio::test]
async fn a_full_queue_refuses_at_once() {
    let mut setup = setup(1, 0, 1, false);
    let running = tokio::spawn({
        let batcher = setup.batcher.clone();
        async move { batcher.run(named(input(1, 2, 1.0))).await }
    });
    setup.started.recv().await.expect("the first run started");
    let mut waiting = Box::pin(setup.batcher.run(named(input(1, 2, 2.0))));
    assert!(futures_util::poll!(&mut waiting).is_pending());
    let refused = setup.batcher.run(named(input(1, 2, 3.0))).await;
    assert!(
        matches!(refused, Err(EngineError::Overloaded { capacity: 1, .. })),
        "{refused:?}"
    );
    setup.gate.send(true).expect("open the gate");
    assert!(running.await.expect("join").is_ok());
    assert!(waiting.await.is_ok());
    assert_eq!(setup.batcher.runs(), 2);
}

#[test]
fn grouping_keeps_arrival_order_and_never_batches_clips() {
    let shapes: Vec<Vec<usize>> = vec![
        vec![1, 3, 4, 4],
        vec![3, 3, 4, 4],
        vec![1, 3, 8, 4],
        vec![1, 3, 4, 4],
        vec![3, 3, 4, 4],
        vec![1, 3, 8, 4],
    ];
    let items: Vec<(usize, &[usize])> = shapes.iter().map(Vec::as_slice).enumerate().collect();
    let groups = group_by_shape(items, |(_, shape)| vec![*shape]);
    let ids: Vec<Vec<usize>> = groups
        .iter()
        .map(|g| g.iter().map(|(id, _)| *id).collect())
        .collect();
    assert_eq!(ids, [vec![0, 3], vec![1], vec![2, 5], vec![4]]);
}

#[test]
fn requests_of_several_inputs_batch_input_by_input() {
    let request = |fill: f32| {
        vec![
            ("a".to_string(), Tensor::from(input(1, 2, fill))),
            ("b".to_string(), Tensor::from(input(1, 3, -fill))),
        ]
    };
    let batch = FeatureMemory::host()
        .concat_named(vec![request(1.0), request(2.0)])
        .expect("concat");
    let names: Vec<&str> = batch.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["a", "b"]);
    assert_eq!(batch[0].1.shape(), [2, 1, 2, 2]);
    assert_eq!(batch[1].1.shape(), [2, 1, 3, 3]);
    assert_eq!(batch[1].1.array().expect("host")[[1, 0, 0, 0]], -2.0);
    let pending = [request(1.0), request(2.0), vec![request(3.0)[0].clone()]];
    let groups = group_by_shape(pending.to_vec(), |r| {
        r.iter().map(|(_, t)| t.shape()).collect()
    });
    assert_eq!(groups.len(), 2, "a request with other inputs runs apart");
}

#[test]
fn split_gives_each_request_its_items() {
    let batch =
        ArrayD::from_shape_vec(IxDyn(&[3, 2]), vec![0., 1., 2., 3., 4., 5.]).expect("shape");
    let outputs = vec![("out".to_string(), Tensor::from(batch))];
    let memory = FeatureMemory::host();
    let parts = memory.split_named(&outputs, &[1, 2]).expect("split");
    let values = |t: &Tensor| {
        t.array()
            .expect("host")
            .iter()
            .copied()
            .collect::<Vec<f32>>()
    };
    assert_eq!(values(&parts[0][0].1), [0., 1.]);
    assert_eq!(parts[1][0].1.shape(), [2, 2]);
    assert_eq!(values(&parts[1][0].1), [2., 3., 4., 5.]);
    let err = memory
        .split_named(&outputs, &[1, 1])
        .expect_err("3 items for 2 requests");
    assert!(err.contains("out"), "{err}");
    let whole = memory.split_named(&outputs, &[3]).expect("one request");
    match (&whole[0][0].1, &outputs[0].1) {
        (Tensor::Host(a), Tensor::Host(b)) => assert!(Arc::ptr_eq(a, b), "shared, not copied"),
        other => panic!("host arrays expected, got {other:?}"),
    }
}

#[test]
fn flags_default_to_8_images_and_no_delay() {
    use clap::Parser;
    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        batch: BatchConfig,
    }
    let flags = Flags::parse_from(["test"]);
    assert_eq!(flags.batch.max_batch, 8);
    assert_eq!(flags.batch.max_delay(), Duration::ZERO);
    assert!(Flags::try_parse_from(["test", "--max-batch", "0"]).is_err());
}

/// A task of `max_images` and `delay`.
fn task(max_images: usize, delay: Duration) -> Task {
    Task {
        model: "backbone".into(),
        stage: Stage::Backbone,
        max_images,
        max_delay: delay,
        counts: Arc::default(),
        memory: Arc::new(FeatureMemory::host()),
    }
}

/// A queued request of one image; its caller holds the receiver.
fn pending() -> (Pending, oneshot::Receiver<Result<Run, EngineError>>) {
    pending_since(Instant::now())
}

/// [`pending`], queued at `enqueued`.
fn pending_since(enqueued: Instant) -> (Pending, oneshot::Receiver<Result<Run, EngineError>>) {
    let (reply, answer) = oneshot::channel();
    let pending = Pending {
        inputs: named(input(1, 2, 1.0)),
        enqueued,
        parent: Span::none(),
        queue_span: Span::none(),
        deadline: None,
        reply,
    };
    (pending, answer)
}

/// Runs `future` on a runtime without a time driver, where any timer panics.
fn without_timers<F: Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime")
        .block_on(future)
}

// With no delay the batcher must not touch a timer: tokio rounds a deadline up to its next
// millisecond tick, so even an elapsed one would hold every lone request back.
#[test]
fn with_no_delay_a_lone_request_waits_on_no_timer() {
    let task = task(8, Duration::ZERO);
    let (_queue, mut pending_rx) = mpsc::channel(8);
    let (first, _answer) = pending();
    let batch = without_timers(task.collect(first, &mut pending_rx));
    assert_eq!(batch.len(), 1);
}

#[test]
fn with_no_delay_what_is_queued_joins_the_batch() {
    let task = task(3, Duration::ZERO);
    let (queue, mut pending_rx) = mpsc::channel(8);
    let answers: Vec<_> = (0..4)
        .map(|_| {
            let (next, answer) = pending();
            queue
                .try_send(next)
                .map_err(|_| "queue full")
                .expect("queued");
            answer
        })
        .collect();
    let (first, _answer) = pending();
    let batch = without_timers(task.collect(first, &mut pending_rx));
    // The first and two of the four queued fill the batch of 3; two stay queued.
    assert_eq!(batch.len(), 3);
    assert_eq!(pending_rx.len(), 2);
    drop(answers);
}

#[tokio::test]
async fn the_batch_delay_counts_from_when_the_first_request_was_queued() {
    // The first request waited out the whole delay behind an earlier run: its batch takes what
    // is queued and goes, rather than holding it for another minute.
    let delay = Duration::from_secs(60);
    let task = task(8, delay);
    let (_queue, mut pending_rx) = mpsc::channel(4);
    let long_ago = Instant::now()
        .checked_sub(delay + Duration::from_secs(1))
        .expect("a clock running for over a minute");
    let (first, _answer) = pending_since(long_ago);
    let batch = tokio::time::timeout(
        Duration::from_secs(10),
        task.collect(first, &mut pending_rx),
    )
    .await
    .expect("no further wait");
    assert_eq!(batch.len(), 1);
}

#[tokio::test]
async fn a_batch_whose_first_request_was_dropped_waits_for_nothing() {
    let task = task(8, Duration::from_secs(60));
    let (_queue, mut pending_rx) = mpsc::channel(4);
    let (first, answer) = pending();
    drop(answer);
    let batch = tokio::time::timeout(
        Duration::from_secs(10),
        task.collect(first, &mut pending_rx),
    )
    .await
    .expect("no wait for an empty batch");
    assert!(batch.is_empty());
    assert_eq!(task.counts.dropped.load(Ordering::Relaxed), 1);
}

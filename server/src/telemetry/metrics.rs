//! The metrics polyhead records, their names and label sets, in Prometheus conventions (base
//! units, `_total` counters). Without an installed recorder every call here is a no-op.

use std::time::Duration;

use ::metrics::{SharedString, Unit, counter, gauge, histogram};
use ::metrics::{describe_counter, describe_gauge, describe_histogram};

use crate::engine::arena::ArenaStats;
use crate::model_set::ModelSet;
use crate::pipeline::Timings;

/// gRPC calls started, by service and method.
pub const GRPC_STARTED: &str = "grpc_server_started_total";
/// gRPC calls finished, by service, method and status code.
pub const GRPC_HANDLED: &str = "grpc_server_handled_total";
/// gRPC call latency until the last byte of the response, by service and method.
pub const GRPC_HANDLING: &str = "grpc_server_handling_seconds";
/// gRPC calls being served now, by method.
pub const INFLIGHT: &str = "polyhead_inflight_requests";
/// Requests holding an admission slot now.
pub const REQUESTS_RUNNING: &str = "polyhead_requests_running";
/// Requests waiting for an admission slot now.
pub const REQUESTS_QUEUED: &str = "polyhead_requests_queued";
/// Latency of each stage of a request, by stage and head.
pub const STAGE: &str = "polyhead_stage_seconds";
/// Inputs per model run (the images batched into a backbone run, T for a clip of T frames), by
/// model.
pub const BATCH_SIZE: &str = "polyhead_batch_size";
/// Runs waiting in a model's queue, by model.
pub const QUEUE_DEPTH: &str = "polyhead_queue_depth";
/// Requests that left a queue without running, by queue (`admission` or a model's name).
pub const DROPPED: &str = "polyhead_requests_dropped_total";
/// Backbone runs.
pub const BACKBONE_PASSES: &str = "polyhead_backbone_passes_total";
/// Image lookups whose backbone features came from the feature cache.
pub const FEATURE_CACHE_HITS: &str = "polyhead_feature_cache_hits_total";
/// Image lookups that ran the backbone and cached its features.
pub const FEATURE_CACHE_MISSES: &str = "polyhead_feature_cache_misses_total";
/// Feature cache entries evicted to stay within the byte budget.
pub const FEATURE_CACHE_EVICTIONS: &str = "polyhead_feature_cache_evictions_total";
/// Bytes of feature tensors the feature cache holds.
pub const FEATURE_CACHE_BYTES: &str = "polyhead_feature_cache_bytes";
/// Entries the feature cache holds.
pub const FEATURE_CACHE_ENTRIES: &str = "polyhead_feature_cache_entries";
/// Bytes of backbone features copied from device (GPU) memory to the host.
pub const FEATURE_DEVICE_TO_HOST_BYTES: &str = "polyhead_feature_device_to_host_bytes_total";
/// Bytes ONNX Runtime's shared CPU arena holds (CPU runtime only).
pub const RUNTIME_ARENA_BYTES: &str = "polyhead_runtime_arena_bytes";
/// Bytes of the shared CPU arena in use by tensors (CPU runtime only).
pub const RUNTIME_ARENA_IN_USE_BYTES: &str = "polyhead_runtime_arena_in_use_bytes";
/// Bytes the decodes in progress hold of `--max-decoding-bytes`.
pub const DECODING_BYTES: &str = "polyhead_decoding_bytes";
/// Always 1; the labels describe each loaded model.
pub const MODEL_INFO: &str = "polyhead_model_info";

/// Histogram bucket bounds for latencies, in seconds: 1 ms to 1 min.
pub const LATENCY_BUCKETS: [f64; 15] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Histogram bucket bounds for batch sizes.
pub const BATCH_SIZE_BUCKETS: [f64; 8] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];

/// Registers the help text and unit of every metric with the installed recorder.
pub(super) fn describe() {
    describe_counter!(GRPC_STARTED, "gRPC calls started.");
    describe_counter!(GRPC_HANDLED, "gRPC calls finished, by status code.");
    describe_histogram!(
        GRPC_HANDLING,
        Unit::Seconds,
        "gRPC call latency, to the last response byte."
    );
    describe_gauge!(INFLIGHT, "gRPC calls being served now.");
    describe_gauge!(
        REQUESTS_RUNNING,
        "Requests holding one of the --max-concurrent-requests slots."
    );
    describe_gauge!(
        REQUESTS_QUEUED,
        "Requests waiting for a slot (at most --max-queued-requests)."
    );
    describe_histogram!(
        STAGE,
        Unit::Seconds,
        "Time a request spent in each stage, per head it ran; shared stages (decode, preprocess, \
         backbone, total) count once for each head of the request. `queue` is the wait for the \
         backbone plus the wait for the head."
    );
    describe_histogram!(
        BATCH_SIZE,
        "Inputs per model run: the images of concurrent requests batched into one backbone run, \
         T for a T-frame clip."
    );
    describe_gauge!(QUEUE_DEPTH, "Runs waiting in a model's queue.");
    describe_counter!(
        DROPPED,
        "Requests that left a queue without running because their call was cancelled or its \
         deadline passed while they waited: for an admission slot (queue=\"admission\") or for a \
         model (queue=<model>)."
    );
    describe_counter!(
        BACKBONE_PASSES,
        "Backbone runs; a batch shared by concurrent requests is one run."
    );
    describe_counter!(
        FEATURE_CACHE_HITS,
        "Image requests served backbone features from the cache (or from a run another request \
         made while they waited)."
    );
    describe_counter!(
        FEATURE_CACHE_MISSES,
        "Image requests that ran the backbone and cached its features."
    );
    describe_counter!(
        FEATURE_CACHE_EVICTIONS,
        "Feature cache entries evicted to stay within the byte budget."
    );
    describe_gauge!(
        FEATURE_CACHE_BYTES,
        Unit::Bytes,
        "Bytes of feature tensors in the feature cache."
    );
    describe_gauge!(FEATURE_CACHE_ENTRIES, "Entries in the feature cache.");
    describe_counter!(
        FEATURE_DEVICE_TO_HOST_BYTES,
        Unit::Bytes,
        "Bytes of backbone features copied from device (GPU) memory to the host: 0 while features \
         stay on the device (--feature-placement device), except those a client asks for \
         (ModelInfer on the backbone)."
    );
    describe_gauge!(
        RUNTIME_ARENA_BYTES,
        Unit::Bytes,
        "Bytes ONNX Runtime's CPU arena, shared by every model, holds: the weights, the \
         activations of the runs in progress and the free space kept for the next run."
    );
    describe_gauge!(
        RUNTIME_ARENA_IN_USE_BYTES,
        Unit::Bytes,
        "Bytes of ONNX Runtime's shared CPU arena in use by tensors."
    );
    describe_gauge!(
        DECODING_BYTES,
        Unit::Bytes,
        "Bytes the images and clips being decoded hold of the memory all decoding may hold at \
         once (--max-decoding-bytes)."
    );
    describe_gauge!(
        MODEL_INFO,
        "The loaded models; always 1. feature_memory: where backbone features are kept."
    );
}

/// Counts `bytes` of features copied from device memory to the host.
pub fn record_device_to_host(bytes: usize) {
    counter!(FEATURE_DEVICE_TO_HOST_BYTES).increment(bytes as u64);
}

/// One latency observation of a request's stage for one head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageSample {
    pub stage: &'static str,
    pub head: String,
    pub elapsed: Duration,
}

/// The stage observations one finished request makes: the whole breakdown for each head it ran.
pub fn stage_samples(t: &Timings) -> Vec<StageSample> {
    let mut samples = Vec::with_capacity(t.heads.len() * 7);
    for head in &t.heads {
        let stages = [
            ("decode", t.decode),
            ("preprocess", t.preprocess),
            ("queue", t.queue + head.queue),
            ("backbone", t.backbone),
            ("head", head.inference),
            ("postprocess", head.postprocess),
            ("total", t.total),
        ];
        samples.extend(stages.map(|(stage, elapsed)| StageSample {
            stage,
            head: head.head.clone(),
            elapsed,
        }));
    }
    samples
}

/// Records the stage latencies of a finished request.
pub fn record_request(timings: &Timings) {
    for sample in stage_samples(timings) {
        histogram!(STAGE, "stage" => sample.stage, "head" => sample.head)
            .record(sample.elapsed.as_secs_f64());
    }
}

/// Counts one backbone run.
pub fn record_backbone_pass() {
    counter!(BACKBONE_PASSES).increment(1);
}

/// Counts one feature cache lookup, a hit or a miss.
pub fn record_feature_cache_lookup(hit: bool) {
    let name = if hit {
        FEATURE_CACHE_HITS
    } else {
        FEATURE_CACHE_MISSES
    };
    counter!(name).increment(1);
}

/// Counts one feature cache entry evicted for space.
pub fn record_feature_cache_eviction() {
    counter!(FEATURE_CACHE_EVICTIONS).increment(1);
}

/// Publishes the feature cache's size.
pub fn set_feature_cache_size(bytes: u64, entries: u64) {
    gauge!(FEATURE_CACHE_BYTES).set(bytes as f64);
    gauge!(FEATURE_CACHE_ENTRIES).set(entries as f64);
}

/// Publishes what ONNX Runtime's shared CPU arena holds.
pub fn set_runtime_arena(stats: ArenaStats) {
    gauge!(RUNTIME_ARENA_BYTES).set(stats.allocated as f64);
    gauge!(RUNTIME_ARENA_IN_USE_BYTES).set(stats.in_use as f64);
}

/// Publishes the bytes the decodes in progress hold.
pub fn set_decoding_bytes(bytes: u64) {
    gauge!(DECODING_BYTES).set(bytes as f64);
}

/// Records the batch size of one run of `model`.
pub fn record_batch_size(model: &str, size: usize) {
    histogram!(BATCH_SIZE, "model" => model.to_string()).record(size as f64);
}

/// Moves the queue depth of `model` by `delta` runs.
pub fn add_queue_depth(model: &str, delta: f64) {
    gauge!(QUEUE_DEPTH, "model" => model.to_string()).increment(delta);
}

/// Counts one request that left `queue` (`admission` or a model's name) without running.
pub fn record_dropped(queue: &str) {
    counter!(DROPPED, "queue" => queue.to_string()).increment(1);
}

/// Publishes how many requests hold an admission slot and how many wait for one.
pub fn set_admission(running: usize, queued: usize) {
    gauge!(REQUESTS_RUNNING).set(running as f64);
    gauge!(REQUESTS_QUEUED).set(queued as f64);
}

/// Moves the number of calls of `rpc` being served by `delta`.
pub fn add_inflight(rpc: SharedString, delta: f64) {
    gauge!(INFLIGHT, "rpc" => rpc).increment(delta);
}

/// The `polyhead_model_info` labels of every model of the set: name, kind, version, provider.
pub fn model_info_labels(models: &ModelSet) -> Vec<[(&'static str, String); 5]> {
    let provider = models.device.to_string();
    let memory = models.memory.memory().to_string();
    let backbone = &models.backbone.spec;
    let row = |model: &str, kind: &str, version: &str| {
        [
            ("model", model.to_string()),
            ("kind", kind.to_string()),
            ("version", version.to_string()),
            ("execution_provider", provider.clone()),
            ("feature_memory", memory.clone()),
        ]
    };
    let mut rows = vec![row(&backbone.name, "backbone", &backbone.version)];
    for head in &models.heads {
        rows.push(row(head.name(), head.kind().as_str(), &head.spec.version));
    }
    rows
}

/// Publishes `polyhead_model_info` for every model of the set.
pub fn record_model_info(models: &ModelSet) {
    for labels in model_info_labels(models) {
        gauge!(MODEL_INFO, &labels).set(1.0);
    }
    // Exported from the start, so that a scrape shows 0 rather than nothing.
    counter!(FEATURE_DEVICE_TO_HOST_BYTES).increment(0);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::HeadTiming;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn head(name: &str, queue: u64, inference: u64, postprocess: u64) -> HeadTiming {
        HeadTiming {
            head: name.into(),
            queue: ms(queue),
            inference: ms(inference),
            postprocess: ms(postprocess),
        }
    }

    #[test]
    fn every_head_gets_the_whole_breakdown() {
        let timings = Timings {
            decode: ms(1),
            preprocess: ms(2),
            queue: ms(3),
            backbone: ms(4),
            heads: vec![head("detection", 5, 6, 7), head("segmentation", 0, 8, 9)],
            postprocess: ms(16),
            total: ms(40),
            backbone_passes: 1,
            backbone_images: 1,
            features_cached: false,
            feature_memory: None,
        };
        let samples = stage_samples(&timings);
        assert_eq!(samples.len(), 14);
        let find = |stage: &str, head: &str| {
            samples
                .iter()
                .find(|s| s.stage == stage && s.head == head)
                .map(|s| s.elapsed)
        };
        assert_eq!(find("queue", "detection"), Some(ms(8)));
        assert_eq!(find("queue", "segmentation"), Some(ms(3)));
        assert_eq!(find("head", "segmentation"), Some(ms(8)));
        assert_eq!(find("postprocess", "detection"), Some(ms(7)));
        assert_eq!(find("backbone", "segmentation"), Some(ms(4)));
        assert_eq!(find("total", "detection"), Some(ms(40)));
    }

    #[test]
    fn a_request_without_heads_records_nothing() {
        assert!(stage_samples(&Timings::default()).is_empty());
    }

    #[test]
    fn latency_buckets_rise_from_milliseconds_to_a_minute() {
        assert!(LATENCY_BUCKETS.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(LATENCY_BUCKETS[0], 0.001);
        assert_eq!(LATENCY_BUCKETS[LATENCY_BUCKETS.len() - 1], 60.0);
    }
}

//! What one variant measured: request latencies, throughput, backbone passes per request and the
//! peak resident memory of the process that did the work.

use std::time::Duration;

use serde::Serialize;

/// The raw observations of one timed loop.
#[derive(Debug, Default, Clone)]
pub struct Samples {
    /// Latency of every completed request.
    pub latencies: Vec<Duration>,
    /// Wall time from the start of the loop to the end of its last request.
    pub wall: Duration,
    /// Backbone passes the responses reported, summed.
    pub reported_passes: u64,
    /// Items each request carried (1 per image, T per clip): throughput is also given per item.
    pub items_per_request: u32,
    /// The stage timings the server reported, one per request (empty for in-process loops).
    pub stages: Vec<Stages>,
    /// The time each request spent in ONNX Runtime runs: its backbone and head runs as the
    /// server reported them, or the in-process sessions' runs timed around each call.
    pub model_runs: Vec<Duration>,
}

/// Where the server says one request's time went (its response's timings), in milliseconds.
#[derive(Debug, Default, Clone, Copy, PartialEq, Serialize)]
pub struct Stages {
    pub decode_ms: f64,
    pub preprocess_ms: f64,
    pub backbone_ms: f64,
    /// The heads' ONNX Runtime runs, summed.
    pub heads_ms: f64,
    /// Post-processing of the heads' outputs into the response, summed.
    pub postprocess_ms: f64,
    /// From the request's arrival to its response.
    pub total_ms: f64,
}

impl Stages {
    /// The request's ONNX Runtime runs: the backbone's and the heads' (summed).
    pub fn model_runs(&self) -> Duration {
        Duration::from_secs_f64((self.backbone_ms + self.heads_ms) / 1e3)
    }

    /// The median of every stage on its own (so the stages need not add up to `total_ms`).
    pub fn median(all: &[Stages]) -> Option<Stages> {
        if all.is_empty() {
            return None;
        }
        let median =
            |stage: fn(&Stages) -> f64| median(all.iter().map(stage).collect()).unwrap_or_default();
        Some(Stages {
            decode_ms: median(|s| s.decode_ms),
            preprocess_ms: median(|s| s.preprocess_ms),
            backbone_ms: median(|s| s.backbone_ms),
            heads_ms: median(|s| s.heads_ms),
            postprocess_ms: median(|s| s.postprocess_ms),
            total_ms: median(|s| s.total_ms),
        })
    }
}

impl Samples {
    /// Merges the samples of loops that ran at the same time (one per worker).
    pub fn merge(parts: Vec<Samples>, wall: Duration) -> Samples {
        let items_per_request = parts.first().map_or(1, |p| p.items_per_request);
        let mut merged = Samples {
            wall,
            items_per_request,
            ..Samples::default()
        };
        for part in parts {
            merged.latencies.extend(part.latencies);
            merged.reported_passes += part.reported_passes;
            merged.stages.extend(part.stages);
            merged.model_runs.extend(part.model_runs);
        }
        merged
    }
}

/// One row of the report.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// What ran, e.g. `grpc detect c=8`.
    pub variant: String,
    /// `raw`, `grpc` or `naive`.
    pub kind: &'static str,
    /// Requests in flight at once.
    pub concurrency: usize,
    pub requests: usize,
    pub seconds: f64,
    pub requests_per_s: f64,
    /// Frames (or images) per second: requests/s times the items each request carried.
    pub items_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub mean_ms: f64,
    /// Backbone runs per request: from the server's `polyhead_backbone_passes_total` when it was
    /// scraped (batched runs shared by concurrent requests count once), else from the responses.
    pub backbone_passes_per_request: Option<f64>,
    /// Peak resident memory (VmHWM) of the process that did the work, in MB.
    pub peak_rss_mb: Option<f64>,
    /// The p50 of each round's slice in order (of each block of consecutive requests, when the
    /// row was measured interleaved): shows whether the machine drifted during the run.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub round_p50_ms: Vec<f64>,
    /// The requests/s of each round's slice in order (of each block, as for `round_p50_ms`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub round_requests_per_s: Vec<f64>,
    /// For rows measured interleaved, the latency of each request in turn: the i-th of every
    /// interleaved row ran in the same turn, within a second of one another.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub turn_ms: Vec<f64>,
    /// For rows measured interleaved, the time each of those requests spent in ONNX Runtime
    /// runs (see [`Samples::model_runs`]); empty when not known for every turn.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub turn_model_ms: Vec<f64>,
    /// The median of each stage the server reported, for rows measured over gRPC.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_stages_p50: Option<Stages>,
}

impl Row {
    /// Summarises `samples`; passes and memory are filled in by the caller.
    pub fn new(
        variant: impl Into<String>,
        kind: &'static str,
        concurrency: usize,
        s: &Samples,
    ) -> Row {
        let mut sorted = s.latencies.clone();
        sorted.sort_unstable();
        let n = sorted.len();
        let seconds = s.wall.as_secs_f64().max(1e-9);
        let rps = n as f64 / seconds;
        let mean = sorted.iter().map(Duration::as_secs_f64).sum::<f64>() / n.max(1) as f64;
        Row {
            variant: variant.into(),
            kind,
            concurrency,
            requests: n,
            seconds,
            requests_per_s: rps,
            items_per_s: rps * f64::from(s.items_per_request.max(1)),
            p50_ms: percentile(&sorted, 0.50),
            p99_ms: percentile(&sorted, 0.99),
            mean_ms: mean * 1e3,
            backbone_passes_per_request: (n > 0).then(|| s.reported_passes as f64 / n as f64),
            peak_rss_mb: None,
            round_p50_ms: Vec::new(),
            round_requests_per_s: Vec::new(),
            turn_ms: Vec::new(),
            turn_model_ms: Vec::new(),
            server_stages_p50: Stages::median(&s.stages),
        }
    }
}

/// The median of `values` (the lower of the middle two of an even count); `None` when empty.
pub fn median(mut values: Vec<f64>) -> Option<f64> {
    values.sort_unstable_by(f64::total_cmp);
    values.get(values.len().checked_sub(1)? / 2).copied()
}

/// Resamplings behind [`median_interval`].
const RESAMPLINGS: usize = 2000;

/// The 95% bootstrap interval of the median of `values`: the 2.5th and 97.5th percentiles of
/// the medians of [`RESAMPLINGS`] resamplings with replacement (a fixed seed, so that a report
/// can be reproduced from its JSON); `None` when empty.
pub fn median_interval(values: &[f64]) -> Option<(f64, f64)> {
    if values.is_empty() {
        return None;
    }
    let mut rng = fastrand::Rng::with_seed(0x6d65_6469_616e);
    let mut resample = vec![0.0; values.len()];
    let mut medians: Vec<f64> = (0..RESAMPLINGS)
        .map(|_| {
            for v in &mut resample {
                *v = values[rng.usize(..values.len())];
            }
            let mid = (resample.len() - 1) / 2;
            *resample.select_nth_unstable_by(mid, f64::total_cmp).1
        })
        .collect();
    medians.sort_unstable_by(f64::total_cmp);
    let at = |q: f64| medians[((q * RESAMPLINGS as f64) as usize).min(RESAMPLINGS - 1)];
    Some((at(0.025), at(0.975)))
}

/// The p50 of `latencies`, in milliseconds.
pub fn p50(latencies: &[Duration]) -> f64 {
    let mut sorted = latencies.to_vec();
    sorted.sort_unstable();
    percentile(&sorted, 0.5)
}

/// The nearest-rank percentile `q` (0..=1) of sorted latencies, in milliseconds (0 when empty).
pub fn percentile(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1].as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: &[u64]) -> Vec<Duration> {
        v.iter().map(|&m| Duration::from_millis(m)).collect()
    }

    #[test]
    fn nearest_rank_percentiles() {
        let sorted = ms(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
        assert_eq!(percentile(&sorted, 0.5), 5.0);
        assert_eq!(percentile(&sorted, 0.99), 10.0);
        assert_eq!(percentile(&sorted, 0.0), 1.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }

    #[test]
    fn the_median_interval_narrows_with_more_values_and_holds_the_median() {
        // Noisy values around 2: one in three is far off, as a model run on a busy machine is.
        let noisy = |n: usize| -> Vec<f64> {
            (0..n)
                .map(|i| match i % 3 {
                    0 => 2.0 + (i % 7) as f64 * 0.1,
                    1 => 2.0 - (i % 5) as f64 * 0.1,
                    _ => 2.0 + (i % 11) as f64 * 5.0 - 25.0,
                })
                .collect()
        };
        let (few, many) = (noisy(60), noisy(1200));
        let (lo_few, hi_few) = median_interval(&few).expect("an interval");
        let (lo_many, hi_many) = median_interval(&many).expect("an interval");
        for (lo, hi, values) in [(lo_few, hi_few, &few), (lo_many, hi_many, &many)] {
            let m = median(values.clone()).expect("a median");
            assert!(lo <= m && m <= hi, "{lo} <= {m} <= {hi}");
        }
        assert!(hi_many - lo_many < hi_few - lo_few);
        assert_eq!(median_interval(&[3.0; 10]), Some((3.0, 3.0)));
        assert_eq!(median_interval(&[]), None);
    }

    #[test]
    fn rows_summarise_samples() {
        let samples = Samples {
            latencies: ms(&[10, 30, 20, 40]),
            wall: Duration::from_secs(2),
            reported_passes: 4,
            items_per_request: 16,
            ..Samples::default()
        };
        let row = Row::new("x", "raw", 1, &samples);
        assert_eq!(row.requests, 4);
        assert_eq!(row.requests_per_s, 2.0);
        assert_eq!(row.items_per_s, 32.0);
        assert_eq!(row.p50_ms, 20.0);
        assert_eq!(row.mean_ms, 25.0);
        assert_eq!(row.backbone_passes_per_request, Some(1.0));
        assert_eq!(row.server_stages_p50, None);
    }

    #[test]
    fn stage_medians_are_taken_stage_by_stage() {
        let stage = |decode_ms, total_ms| Stages {
            decode_ms,
            total_ms,
            ..Stages::default()
        };
        let all = [
            stage(1.0, 30.0),
            stage(3.0, 10.0),
            stage(2.0, 20.0),
            stage(9.0, 5.0),
        ];
        let median = Stages::median(&all).expect("a median");
        assert_eq!((median.decode_ms, median.total_ms), (2.0, 10.0));
        assert_eq!(Stages::median(&[]), None);
    }
}

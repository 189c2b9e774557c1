//! The targets the measured rows are held against, as ratios so that they carry over between
//! machines of the same shape.

use crate::report::{Report, Target};
use crate::stats::{Row, median, median_interval};

/// Variant names shared by the runner and the targets.
pub mod names {
    pub const RAW_DETECT: &str = "raw detect (backbone+detection)";
    /// Detect from the photo's bytes in process: what the server must do for a Detect, and so
    /// the limit for it (rows at each level of `--raw-threads`).
    pub const RAW_PHOTO: &str = "raw Detect from the photo's bytes";
    pub const RAW_PHOTO_DETECT: &str = "raw Detect from the photo's bytes c=1";
    pub const RAW_SHARED: &str = "raw backbone+detection+segmentation";
    pub const NAIVE_PAIR: &str = "naive reference_detection+segmentation";
    pub const RAW_FRAMES: &str = "raw backbone on the clip's frames";
    pub const GRPC_DETECT: &str = "grpc Detect";
    pub const GRPC_DETECT_C1: &str = "grpc Detect c=1";
    /// The c=1 Detect target's pair: the server's Detect and the Detect from the photo's bytes
    /// in process, interleaved with each other only, for many turns.
    pub const GRPC_DETECT_PAIR: &str = "grpc Detect c=1 (pair)";
    pub const RAW_PHOTO_DETECT_PAIR: &str = "raw Detect from the photo's bytes c=1 (pair)";
    /// The saturation target's pair: the server's Detect at its best level and the Detect from
    /// the photo's bytes at its best, alternating slice by slice with each other only.
    pub const GRPC_SATURATION_PAIR: &str = "grpc Detect at saturation (pair)";
    pub const RAW_PHOTO_SATURATION_PAIR: &str =
        "raw Detect from the photo's bytes at saturation (pair)";
    /// Rows of a server started with `--feature-placement host`.
    pub const GRPC_HOST: &str = "grpc, features on host,";
    /// Rows of a server started with `--intra-op-spinning`.
    pub const GRPC_SPINNING: &str = "grpc, spinning threads,";
    pub const GRPC_SEGMENT: &str = "grpc Segment c=1";
    pub const GRPC_ANALYZE: &str = "grpc Analyze(detection+segmentation) c=1";
    pub const GRPC_CLIP: &str = "grpc RecognizeAction clip c=1";
    pub const GRPC_WINDOWS: &str = "grpc RecognizeActionWindows";
    pub const SEGMENT_COLD: &str = "grpc Segment cold (new image) c=1";
    pub const SEGMENT_WARM: &str = "grpc Segment seen image (cached) c=1";
}

use names::*;

/// What the window target needs besides the rows: the rows' names and the frames each window
/// sent through the backbone in either mode.
pub struct WindowRows {
    pub overlapping: String,
    pub disjoint: String,
    pub stride: u32,
    pub frames: u32,
    /// Backbone images per window: overlapping / disjoint (the best reuse can do on this video).
    pub frame_bound: f64,
}

/// Evaluates every target against `report`'s rows.
pub fn evaluate(report: &Report, windows: Option<&WindowRows>, cache_bytes: u64) -> Vec<Target> {
    let p50 = |name: &str| report.row(name).map(|r| r.p50_ms);
    let detect_best = report.best(GRPC_DETECT);
    let raw_c1 = format!("{RAW_DETECT} c=1");
    let minus = |a: f64, b: f64| Some(a - b);
    let over = |a: f64, b: f64| ratio(Some(a), Some(b));
    let mut targets = vec![
        saturation_target(report),
        Target::new(
            "serving: Detect p50 at c=1 minus raw from the photo (ms)",
            paired(report, GRPC_DETECT_PAIR, RAW_PHOTO_DETECT_PAIR, minus),
            2.0,
            true,
            c1_note(report, &raw_c1),
        ),
        Target::new(
            "sharing: Analyze(det+seg) / Detect p50 at c=1",
            paired(report, GRPC_ANALYZE, GRPC_DETECT_C1, over),
            1.15,
            true,
            format!(
                "in-process: shared {} x, naive pair {} x raw detect",
                fmt(paired(report, &format!("{RAW_SHARED} c=1"), &raw_c1, over)),
                fmt(paired(report, &format!("{NAIVE_PAIR} c=1"), &raw_c1, over)),
            ),
        ),
        Target::new(
            "cache: Segment on a seen image / cold Segment p50",
            paired(report, SEGMENT_WARM, SEGMENT_COLD, over),
            0.2,
            true,
            String::new(),
        ),
        Target::new(
            "video: clip frames/s end to end / raw backbone frames/s",
            ratio(
                report.row(GRPC_CLIP).map(|r| r.items_per_s),
                report
                    .row(&format!("{RAW_FRAMES} c=1"))
                    .map(|r| r.items_per_s),
            ),
            0.9,
            false,
            String::new(),
        ),
    ];
    let detect_rps = detect_best.map(|r| r.requests_per_s);
    let best_rps = |prefix: &str| {
        report
            .best(&format!("{prefix} Detect"))
            .map(|r| r.requests_per_s)
    };
    targets.push(Target::new(
        "placement: Detect at saturation, runtime-memory / host features",
        ratio(detect_rps, best_rps(GRPC_HOST)),
        0.95,
        false,
        "features kept where the backbone wrote them (IoBinding) vs copied to host arrays".into(),
    ));
    targets.push(Target::new(
        "threads: Detect at saturation, sleeping / spinning ONNX Runtime threads",
        ratio(detect_rps, best_rps(GRPC_SPINNING)),
        0.95,
        false,
        format!(
            "Analyze / Detect p50 at c=1 with spinning threads: {}",
            fmt(ratio(
                p50(&format!("{GRPC_SPINNING} Analyze c=1")),
                p50(&format!("{GRPC_SPINNING} Detect c=1"))
            ))
        ),
    ));
    targets.push(window_target(report, windows));
    targets.push(memory_target(report, cache_bytes));
    targets
}

/// The server's Detect at saturation against the same work in process: its pair, alternating
/// slice by slice (see `--saturation-seconds`), when it ran; else the best levels of the
/// side-by-side rows. The note gives the pair's per-slice ratios, the side-by-side rows' ratio
/// and that against the sessions fed the preprocessed tensor, which skip the decoding and
/// preprocessing a server given images cannot skip.
fn saturation_target(report: &Report) -> Target {
    let rps = |row: Option<&Row>| row.map(|r| r.requests_per_s);
    let (detect, photo, tensor) = (
        report.best(GRPC_DETECT),
        report.best(RAW_PHOTO),
        report.best(RAW_DETECT),
    );
    let name = |row: Option<&Row>| row.map_or("-", |r| r.variant.as_str()).to_owned();
    let side_by_side = format!(
        "best: {} vs {}: {}; against the sessions fed the preprocessed tensor ({}): {}",
        name(detect),
        name(photo),
        fmt3(ratio(rps(detect), rps(photo))),
        name(tensor),
        fmt3(ratio(rps(detect), rps(tensor))),
    );
    let name = "serving: Detect at saturation / raw from the photo req/s";
    let (Some(grpc), Some(raw)) = (
        report.row(GRPC_SATURATION_PAIR),
        report.row(RAW_PHOTO_SATURATION_PAIR),
    ) else {
        return Target::new(
            name,
            ratio(rps(detect), rps(photo)),
            0.95,
            false,
            side_by_side,
        );
    };
    let slices: Vec<f64> = grpc
        .round_requests_per_s
        .iter()
        .zip(&raw.round_requests_per_s)
        .filter_map(|(&g, &r)| ratio(Some(g), Some(r)))
        .collect();
    let low = slices.iter().copied().reduce(f64::min);
    let high = slices.iter().copied().reduce(f64::max);
    Target::new(
        name,
        ratio(Some(grpc.requests_per_s), Some(raw.requests_per_s)),
        0.95,
        false,
        format!(
            "the pair: c={} vs {} threads over {} slices each, per slice {} (median; {} to {}); \
             in the side-by-side rows, {side_by_side}",
            grpc.concurrency,
            raw.concurrency,
            slices.len(),
            fmt3(median(slices.clone())),
            fmt3(low),
            fmt3(high),
        ),
    )
}

fn window_target(report: &Report, windows: Option<&WindowRows>) -> Target {
    let name = "video: per-window cost, stride s / stride T";
    let Some(w) = windows else {
        return Target::new(
            name,
            None,
            0.0,
            true,
            "RecognizeActionWindows not measured".into(),
        );
    };
    // items are windows, so windows/s; the cost of a window is its inverse.
    let per_window = |variant: &str| report.row(variant).map(|r| 1.0 / r.items_per_s.max(1e-12));
    let value = ratio(per_window(&w.overlapping), per_window(&w.disjoint));
    let s_over_t = f64::from(w.stride) / f64::from(w.frames.max(1));
    Target::new(
        name,
        value,
        1.2 * w.frame_bound,
        true,
        format!(
            "s/T = {s_over_t:.3}; on this video the frames per window give {:.3} (limit: 1.2x that)",
            w.frame_bound
        ),
    )
}

fn memory_target(report: &Report, cache_bytes: u64) -> Target {
    let budget_mb = (report.weights_bytes + cache_bytes) as f64 / (1024.0 * 1024.0);
    let peak = report
        .phases
        .iter()
        .find(|p| p.cache_bytes == cache_bytes)
        .and_then(|p| p.peak_rss_mb);
    Target::new(
        "memory: server peak RSS / (weights + cache budget)",
        peak.map(|p| p / budget_mb),
        1.3,
        true,
        format!("weights + cache = {budget_mb:.0} MB"),
    )
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

/// `f(a, b)` of two rows measured interleaved, request by request, and the median over their
/// turns: the two requests of a turn ran within a second of each other, so the machine's drift,
/// which moves a 2-second p50 by up to 40% here, weighs on both alike. From the rows' whole-run
/// p50s when they have no turns to pair.
fn paired(report: &Report, a: &str, b: &str, f: impl Fn(f64, f64) -> Option<f64>) -> Option<f64> {
    let (a, b) = (report.row(a)?, report.row(b)?);
    if a.turn_ms.is_empty() || a.turn_ms.len() != b.turn_ms.len() {
        return f(a.p50_ms, b.p50_ms);
    }
    median(
        a.turn_ms
            .iter()
            .zip(&b.turn_ms)
            .filter_map(|(&a, &b)| f(a, b))
            .collect(),
    )
}

/// How much longer `a`'s requests took than `b`'s outside their ONNX Runtime runs: the median,
/// over the turns of two interleaved rows, of (latency - model runs) of `a`'s request minus that
/// of `b`'s. The runs vary by far more than the work around them (on a shared 2-vCPU VM one
/// turn's two 90 ms Detects can differ by 20 ms), so this part of a difference between two rows
/// is known to a fraction of a millisecond in a hundred turns, where whole latencies are not.
/// A server's runs as it reports them include binding their inputs and outputs. `None` without
/// the runs of every turn.
fn paired_outside_runs(report: &Report, a: &str, b: &str) -> Option<f64> {
    median(turn_differences(report, a, b, outside_runs)?)
}

/// How much longer `a`'s model runs took than `b`'s, the median over their turns.
fn paired_runs(report: &Report, a: &str, b: &str) -> Option<f64> {
    median(turn_differences(report, a, b, model_runs)?)
}

/// `value(a) - value(b)`, turn by turn, of two interleaved rows, `value` giving a row's figure
/// per turn (`None` when the row lacks it); `None` unless both rows have the same turns.
fn turn_differences(
    report: &Report,
    a: &str,
    b: &str,
    value: fn(&Row) -> Option<Vec<f64>>,
) -> Option<Vec<f64>> {
    let (a, b) = (value(report.row(a)?)?, value(report.row(b)?)?);
    (!a.is_empty() && a.len() == b.len()).then(|| a.iter().zip(&b).map(|(a, b)| a - b).collect())
}

/// A row's latency per turn.
fn latencies(row: &Row) -> Option<Vec<f64>> {
    Some(row.turn_ms.clone())
}

/// A row's time in ONNX Runtime runs per turn; `None` unless known for every turn.
fn model_runs(row: &Row) -> Option<Vec<f64>> {
    (row.turn_model_ms.len() == row.turn_ms.len()).then(|| row.turn_model_ms.clone())
}

/// A row's latency outside its ONNX Runtime runs per turn; `None` unless its runs are known for
/// every turn.
fn outside_runs(row: &Row) -> Option<Vec<f64>> {
    let runs = model_runs(row)?;
    Some(row.turn_ms.iter().zip(&runs).map(|(l, r)| l - r).collect())
}

/// The c=1 Detect target's note, on its pair: the 95% interval of the median and the turns it
/// comes from, the difference outside the model runs and in them, the whole-run p50s; then the
/// same difference in the side-by-side turns and against the bare sessions, when those ran (not
/// with `--c1-detect-only`).
fn c1_note(report: &Report, raw_c1: &str) -> String {
    let minus = |a: f64, b: f64| Some(a - b);
    let p50 = |name: &str| report.row(name).map(|r| r.p50_ms);
    let model_p50 = |name: &str| {
        report
            .row(name)
            .and_then(|r| median(r.turn_model_ms.clone()))
    };
    let (grpc, photo) = (GRPC_DETECT_PAIR, RAW_PHOTO_DETECT_PAIR);
    let turns = turn_differences(report, grpc, photo, latencies).unwrap_or_default();
    let interval = median_interval(&turns)
        .map_or_else(|| "-".into(), |(lo, hi)| format!("{lo:.2} to {hi:.2}"));
    let mut note = format!(
        "95% interval {interval} ms over {} turns; outside the model runs: {} ms; the runs: {} \
         ms (p50s: {} ms in the server, {} ms in process); whole-run p50s: {} ms",
        turns.len(),
        fmt(paired_outside_runs(report, grpc, photo)),
        fmt(paired_runs(report, grpc, photo)),
        fmt(model_p50(grpc)),
        fmt(model_p50(photo)),
        fmt(diff(p50(grpc), p50(photo))),
    );
    if report.pair_processes > 1 {
        let each: Vec<String> = per_process(&turns, report.pair_processes)
            .into_iter()
            .map(fmt)
            .collect();
        note += &format!("; per pair of processes: {} ms", each.join(", "));
    }
    if let Some(side_by_side) = paired(report, GRPC_DETECT_C1, RAW_PHOTO_DETECT, minus) {
        note += &format!(
            "; in the side-by-side turns: {side_by_side:.2} ms, minus the sessions alone: {} \
             ms, of which the photo's decode, preprocess and post-processing in process: {} ms",
            fmt(paired(report, GRPC_DETECT_C1, raw_c1, minus)),
            fmt(paired(report, RAW_PHOTO_DETECT, raw_c1, minus)),
        );
    }
    note
}

/// The median of each process's turns, where turn `t` ran on process `t % processes`.
fn per_process(turns: &[f64], processes: usize) -> Vec<Option<f64>> {
    (0..processes)
        .map(|p| {
            median(
                turns
                    .iter()
                    .skip(p)
                    .step_by(processes.max(1))
                    .copied()
                    .collect(),
            )
        })
        .collect()
}

fn diff(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    Some(a? - b?)
}

fn fmt(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.2}"))
}

fn fmt3(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.3}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::{Row, Samples};

    fn row(name: &str, p50_ms: f64, turns: &[f64]) -> Row {
        let mut row = Row::new(name, "grpc", 1, &Samples::default());
        row.p50_ms = p50_ms;
        row.turn_ms = turns.to_vec();
        row
    }

    fn with_runs(mut row: Row, runs: &[f64]) -> Row {
        row.turn_model_ms = runs.to_vec();
        row
    }

    /// The target whose name contains `part`.
    fn named<'a>(targets: &'a [Target], part: &str) -> &'a Target {
        targets
            .iter()
            .find(|t| t.name.contains(part))
            .unwrap_or_else(|| panic!("no target named like {part:?}"))
    }

    fn report(rows: Vec<Row>) -> Report {
        Report {
            settings: serde_json::Value::Null,
            rows,
            phases: Vec::new(),
            weights_bytes: 0,
            targets: Vec::new(),
            unavailable: Vec::new(),
            wall_seconds: 0.0,
            pair_processes: 1,
        }
    }

    #[test]
    fn interleaved_rows_are_compared_turn_by_turn() {
        // The machine slowed down in the second turn; each turn's difference is 1-3 ms, while
        // the whole-run p50s differ by 9 ms.
        let report = report(vec![
            row("a", 100.0, &[92.0, 101.0, 95.0]),
            row("b", 91.0, &[90.0, 100.0, 92.0]),
            row("c", 50.0, &[]),
        ]);
        let minus = |a: f64, b: f64| Some(a - b);
        assert_eq!(paired(&report, "a", "b", minus), Some(2.0));
        assert_eq!(
            paired(&report, "a", "c", minus),
            Some(50.0),
            "no blocks to pair"
        );
        assert_eq!(paired(&report, "a", "missing", minus), None);
    }

    #[test]
    fn the_work_around_the_model_runs_is_compared_turn_by_turn() {
        // The runs swing by 20 ms between requests; around them, a spent 3, 2 and 4 ms and b
        // 1 ms each time.
        let report = report(vec![
            with_runs(row("a", 0.0, &[93.0, 112.0, 104.0]), &[90.0, 110.0, 100.0]),
            with_runs(row("b", 0.0, &[112.0, 92.0, 96.0]), &[111.0, 91.0, 95.0]),
            row("no runs", 0.0, &[95.0, 96.0, 97.0]),
            with_runs(row("short", 0.0, &[95.0, 96.0]), &[90.0, 91.0]),
        ]);
        assert_eq!(paired_outside_runs(&report, "a", "b"), Some(2.0));
        assert_eq!(paired_runs(&report, "a", "b"), Some(5.0));
        assert_eq!(paired_outside_runs(&report, "a", "no runs"), None);
        assert_eq!(paired_outside_runs(&report, "a", "short"), None);
        assert_eq!(paired_outside_runs(&report, "a", "missing"), None);
    }

    #[test]
    fn the_photo_detect_at_c1_is_a_level_of_the_saturation_limit() {
        assert_eq!(RAW_PHOTO_DETECT, format!("{RAW_PHOTO} c=1"));
    }

    #[test]
    fn saturation_takes_the_best_concurrency_level_never_the_c1_pair() {
        let rate = |name: &str, requests_per_s: f64| {
            let mut row = row(name, 0.0, &[]);
            row.requests_per_s = requests_per_s;
            row
        };
        // The pair ran at c=1 with nothing else on the machine: faster than any level here.
        // The sessions fed the preprocessed tensor skip the decoding the server must do.
        let report = report(vec![
            rate(&format!("{RAW_DETECT} c=1"), 10.0),
            rate(&format!("{RAW_DETECT} c=2"), 12.0),
            rate(RAW_PHOTO_DETECT, 8.0),
            rate(&format!("{RAW_PHOTO} c=2"), 10.0),
            rate(&format!("{GRPC_DETECT} c=1"), 7.0),
            rate(&format!("{GRPC_DETECT} c=4"), 9.0),
            rate(GRPC_DETECT_PAIR, 12.0),
            rate(RAW_PHOTO_DETECT_PAIR, 12.5),
        ]);
        let targets = evaluate(&report, None, 0);
        let saturation = named(&targets, "at saturation / raw");
        assert_eq!(saturation.value, Some(0.9));
        assert_eq!(
            saturation.note,
            format!(
                "best: {GRPC_DETECT} c=4 vs {RAW_PHOTO} c=2: 0.900; against the sessions fed the \
                 preprocessed tensor ({RAW_DETECT} c=2): 0.750"
            )
        );
    }

    #[test]
    fn saturation_is_held_to_its_pair_when_it_ran() {
        let rate = |name: &str, concurrency: usize, slices: &[f64]| {
            let mut row = row(name, 0.0, &[]);
            row.concurrency = concurrency;
            row.requests_per_s = slices.iter().sum::<f64>() / slices.len() as f64;
            row.round_requests_per_s = slices.to_vec();
            row
        };
        let report = report(vec![
            rate(&format!("{RAW_PHOTO} c=1"), 1, &[10.0]),
            rate(&format!("{GRPC_DETECT} c=4"), 4, &[8.0]),
            rate(GRPC_SATURATION_PAIR, 4, &[9.0, 9.9, 9.3, 9.6]),
            rate(RAW_PHOTO_SATURATION_PAIR, 1, &[10.0, 10.0, 10.0, 10.0]),
        ]);
        let targets = evaluate(&report, None, 0);
        let saturation = named(&targets, "at saturation / raw");
        assert!(
            (saturation.value.expect("a ratio") - 0.945).abs() < 1e-9,
            "{:?}",
            saturation.value
        );
        assert_eq!(saturation.pass, Some(false));
        assert!(
            saturation.note.starts_with(
                "the pair: c=4 vs 1 threads over 4 slices each, per slice 0.930 (median; 0.900 \
                 to 0.990); in the side-by-side rows, best: grpc Detect c=4 vs"
            ),
            "{}",
            saturation.note
        );
    }

    #[test]
    fn the_c1_target_is_held_against_its_pair_and_states_its_interval() {
        // The pair differs by 1-2 ms per turn; the side-by-side rows, with fewer turns, by 4-5.
        let grpc: Vec<f64> = (0..40).map(|i| 100.0 + f64::from(i % 5) + 1.0).collect();
        let photo: Vec<f64> = (0..40)
            .map(|i| 100.0 + f64::from(i % 5) - (i % 2) as f64)
            .collect();
        let report = report(vec![
            row(GRPC_DETECT_PAIR, 0.0, &grpc),
            row(RAW_PHOTO_DETECT_PAIR, 0.0, &photo),
            row(GRPC_DETECT_C1, 0.0, &[105.0, 104.0, 110.0]),
            row(RAW_PHOTO_DETECT, 0.0, &[100.0, 100.0, 105.0]),
        ]);
        let targets = evaluate(&report, None, 0);
        let c1 = named(&targets, "c=1 minus raw");
        assert_eq!(c1.value, Some(1.0));
        assert_eq!(c1.pass, Some(true));
        assert!(
            c1.note
                .starts_with("95% interval 1.00 to 2.00 ms over 40 turns"),
            "{}",
            c1.note
        );
        assert!(
            c1.note.contains("in the side-by-side turns: 5.00 ms"),
            "{}",
            c1.note
        );
        assert!(!c1.note.contains("per pair of processes"), "{}", c1.note);
    }

    #[test]
    fn the_c1_note_gives_each_pair_of_processes_its_median() {
        // Turns alternate between two pairs of processes: the first pair's differ by 1 ms, the
        // second's by 3.
        let grpc: Vec<f64> = (0..20)
            .map(|i| 100.0 + f64::from(1 + 2 * (i % 2)))
            .collect();
        let photo = vec![100.0; 20];
        let mut report = report(vec![
            row(GRPC_DETECT_PAIR, 0.0, &grpc),
            row(RAW_PHOTO_DETECT_PAIR, 0.0, &photo),
        ]);
        report.pair_processes = 2;
        let targets = evaluate(&report, None, 0);
        let c1 = named(&targets, "c=1 minus raw");
        assert!(
            c1.note.contains("per pair of processes: 1.00, 3.00 ms"),
            "{}",
            c1.note
        );
    }
}

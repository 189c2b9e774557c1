//! Variants measured side by side in rounds: every round runs each variant for its share of the
//! measured time, one after the other. A shared machine's speed drifts over minutes (other
//! tenants, the page cache, thermal state); measured in rounds, the drift weighs on every variant
//! alike and their ratios hold, where back-to-back blocks of seconds each would compare one
//! minute's machine with another's.
//!
//! Latency at concurrency 1 drifts faster than that: on a shared 2-core machine the p50 of one
//! 2-second slice can be 40% above the next one's. Variants marked [`Variant::interleaved`] are
//! therefore measured request by request in turn (one request of each, in a new order each
//! turn, then the next turn), so that a difference of a few milliseconds between two of them is
//! not drowned by that drift.

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::raw::Timing;
use crate::stats::{Row, Samples, p50};

/// What one slice of a variant measured.
pub struct Part {
    pub samples: Samples,
    /// Backbone passes the server counted during the slice; `None` for in-process variants,
    /// whose samples count their own.
    pub server_passes: Option<f64>,
}

/// One slice of a variant, running.
pub type Slice<'a> = Pin<Box<dyn Future<Output = Result<Part>> + Send + 'a>>;

/// One variant: its row's name and shape, and how to run a slice of it.
pub struct Variant<'a> {
    pub name: String,
    pub kind: &'static str,
    pub concurrency: usize,
    pub run: Box<dyn FnMut(Timing) -> Slice<'a> + Send + 'a>,
    /// Measured one request at a time, in turn with the other interleaved variants.
    pub interleaved: bool,
}

impl Variant<'_> {
    /// Marks the variant to be measured request by request, interleaved with the others so
    /// marked; only meaningful at concurrency 1.
    pub fn interleaved(mut self) -> Self {
        self.interleaved = self.concurrency == 1;
        self
    }
}

/// Which of `count` processes a slice of a variant spread over them runs on: every one, in turn,
/// for a warm-up; else the next, so that the `t`-th measured turn runs on process `t % count`.
#[derive(Debug)]
pub struct Rotation {
    count: usize,
    turn: usize,
}

impl Rotation {
    pub fn new(count: usize) -> Self {
        Self { count, turn: 0 }
    }

    /// The processes the slice of `timing` runs on (none when there are none).
    pub fn next(&mut self, timing: Timing) -> std::ops::Range<usize> {
        if self.count == 0 || !timing.warmup.is_zero() {
            return 0..self.count;
        }
        let at = self.turn % self.count;
        self.turn += 1;
        at..at + 1
    }
}

/// Measures every variant and answers their rows in the order given: first the interleaved ones
/// (see [`interleave`]), then the others in rounds (see [`measure`]).
pub async fn measure_all(
    variants: Vec<Variant<'_>>,
    timing: Timing,
    rounds: u32,
) -> Result<Vec<Row>> {
    let (interleaved, in_rounds): (Vec<_>, Vec<_>) = variants
        .into_iter()
        .enumerate()
        .partition(|(_, v)| v.interleaved);
    let (first, interleaved): (Vec<usize>, Vec<_>) = interleaved.into_iter().unzip();
    let (then, in_rounds): (Vec<usize>, Vec<_>) = in_rounds.into_iter().unzip();
    let mut rows: Vec<(usize, Row)> = first
        .into_iter()
        .zip(interleave(interleaved, timing, rounds).await?)
        .collect();
    rows.extend(
        then.into_iter()
            .zip(measure(in_rounds, timing, rounds).await?),
    );
    rows.sort_by_key(|(at, _)| *at);
    Ok(rows.into_iter().map(|(_, row)| row).collect())
}

/// Seeds the order of the interleaved variants' turns.
const TURN_ORDER_SEED: u64 = 0x706f_6c79;

/// Warms every variant up in turn, then runs one request of each in turn, over and over, for
/// about `timing.seconds` per variant (and at least `blocks` times), each turn in a shuffled
/// order. A row's per-round p50s are
/// those of `blocks` consecutive runs of its requests; its `turn_ms` holds each request's latency,
/// turn by turn, the same turns for every row, and its `turn_model_ms` the time each spent in
/// ONNX Runtime runs.
async fn interleave(
    mut variants: Vec<Variant<'_>>,
    timing: Timing,
    blocks: u32,
) -> Result<Vec<Row>> {
    if variants.is_empty() {
        return Ok(Vec::new());
    }
    let one = Timing {
        warmup: Duration::ZERO,
        seconds: Duration::ZERO,
    };
    for variant in &mut variants {
        eprintln!("bench: {} (warm-up, interleaved)", variant.name);
        (variant.run)(Timing {
            warmup: timing.warmup,
            ..one
        })
        .await?;
    }
    eprintln!("bench: {} variants interleaved", variants.len());
    let budget = timing.seconds * variants.len() as u32;
    let started = Instant::now();
    let mut parts: Vec<Vec<Part>> = variants.iter().map(|_| Vec::new()).collect();
    // Each turn in a new order (the same in every run), so that no variant always follows the
    // same neighbour and inherits what it leaves behind (caches, sleeping threads).
    let mut order: Vec<usize> = (0..variants.len()).collect();
    let mut rng = fastrand::Rng::with_seed(TURN_ORDER_SEED);
    while started.elapsed() < budget || parts[0].len() < blocks as usize {
        rng.shuffle(&mut order);
        for &i in &order {
            parts[i].push((variants[i].run)(one).await?);
        }
    }
    Ok(variants
        .iter()
        .zip(parts)
        .map(|(variant, parts)| {
            let turns = parts.iter().map(|p| p50(&p.samples.latencies)).collect();
            // Only when every turn's runs are known, so that turns stay aligned across rows.
            let model_turns = if parts.iter().all(|p| !p.samples.model_runs.is_empty()) {
                parts.iter().map(|p| p50(&p.samples.model_runs)).collect()
            } else {
                Vec::new()
            };
            Row {
                turn_ms: turns,
                turn_model_ms: model_turns,
                ..row(variant, parts, blocks)
            }
        })
        .collect())
}

/// Runs `rounds` rounds of every variant in turn, each slice `timing.seconds / rounds` long after
/// its warm-up (all of `timing.warmup` in the first round, a quarter of it in later ones, as the
/// other variants ran in between), and merges each variant's slices into its row.
pub async fn measure(
    mut variants: Vec<Variant<'_>>,
    timing: Timing,
    rounds: u32,
) -> Result<Vec<Row>> {
    let rounds = rounds.max(1);
    let mut parts: Vec<Vec<Part>> = variants.iter().map(|_| Vec::new()).collect();
    for round in 0..rounds {
        let slice = Timing {
            warmup: if round == 0 {
                timing.warmup
            } else {
                timing.warmup / 4
            },
            seconds: timing.seconds / rounds,
        };
        for (variant, parts) in variants.iter_mut().zip(&mut parts) {
            eprintln!("bench: {} (round {}/{rounds})", variant.name, round + 1);
            parts.push((variant.run)(slice).await?);
        }
    }
    Ok(variants
        .iter()
        .zip(parts)
        .map(|(variant, parts)| {
            let rounds = parts.len() as u32;
            row(variant, parts, rounds)
        })
        .collect())
}

/// The row of a variant's slices: their samples together over their summed wall time, with the
/// p50 of each of `blocks` runs of consecutive slices.
fn row(variant: &Variant<'_>, parts: Vec<Part>, blocks: u32) -> Row {
    let wall = parts.iter().map(|p| p.samples.wall).sum();
    let server_passes: Option<f64> = parts.iter().map(|p| p.server_passes).sum();
    let per_block = parts.len().div_ceil(blocks.max(1) as usize).max(1);
    let (round_p50_ms, round_requests_per_s) = parts
        .chunks(per_block)
        .map(|block| {
            let latencies: Vec<Duration> = block
                .iter()
                .flat_map(|p| p.samples.latencies.iter().copied())
                .collect();
            let wall: Duration = block.iter().map(|p| p.samples.wall).sum();
            let rate = latencies.len() as f64 / wall.as_secs_f64().max(1e-9);
            (p50(&latencies), rate)
        })
        .unzip();
    let merged = Samples::merge(parts.into_iter().map(|p| p.samples).collect(), wall);
    let mut row = Row::new(&variant.name, variant.kind, variant.concurrency, &merged);
    row.round_p50_ms = round_p50_ms;
    row.round_requests_per_s = round_requests_per_s;
    if let Some(passes) = server_passes
        && row.requests > 0
    {
        row.backbone_passes_per_request = Some(passes / row.requests as f64);
    }
    row
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_rotation_warms_every_process_and_measures_them_in_turn() {
        let warm = Timing {
            warmup: Duration::from_secs(2),
            seconds: Duration::ZERO,
        };
        let turn = Timing {
            warmup: Duration::ZERO,
            seconds: Duration::ZERO,
        };
        let mut rotation = Rotation::new(3);
        assert_eq!(rotation.next(warm), 0..3);
        let turns: Vec<_> = (0..5).map(|_| rotation.next(turn)).collect();
        assert_eq!(turns, [0..1, 1..2, 2..3, 0..1, 1..2]);
        assert_eq!(
            rotation.next(warm),
            0..3,
            "a warm-up does not move the turns"
        );
        assert_eq!(rotation.next(turn), 2..3);
        assert!(Rotation::new(0).next(turn).is_empty());
    }

    /// A variant whose requests take `ms` in its first slice, twice that in its second and so
    /// on, and that reports `passes` server passes per slice; it logs its slices' timings into
    /// `log`.
    fn fake(
        name: &str,
        ms: u64,
        passes: Option<f64>,
        log: Arc<Mutex<Vec<String>>>,
    ) -> Variant<'static> {
        let name = name.to_owned();
        let label = name.clone();
        let mut slice = 0;
        Variant {
            name,
            kind: "raw",
            concurrency: 1,
            interleaved: false,
            run: Box::new(move |timing| {
                log.lock()
                    .expect("log")
                    .push(format!("{label} {:?} {:?}", timing.warmup, timing.seconds));
                slice += 1;
                let ms = ms * slice;
                let samples = Samples {
                    latencies: vec![Duration::from_millis(ms); 4],
                    wall: Duration::from_millis(4 * ms),
                    reported_passes: 4,
                    items_per_request: 1,
                    stages: Vec::new(),
                    model_runs: vec![Duration::from_millis(ms / 2); 4],
                };
                Box::pin(std::future::ready(Ok(Part {
                    samples,
                    server_passes: passes,
                })))
            }),
        }
    }

    #[tokio::test]
    async fn rounds_alternate_the_variants_and_merge_their_slices() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let variants = vec![
            fake("a", 10, None, Arc::clone(&log)),
            fake("b", 20, Some(2.0), Arc::clone(&log)),
        ];
        let timing = Timing {
            warmup: Duration::from_millis(400),
            seconds: Duration::from_secs(3),
        };
        let rows = measure(variants, timing, 3).await.expect("measured");
        let order: Vec<String> = log.lock().expect("log").clone();
        assert_eq!(
            order,
            [
                "a 400ms 1s",
                "b 400ms 1s",
                "a 100ms 1s",
                "b 100ms 1s",
                "a 100ms 1s",
                "b 100ms 1s"
            ]
        );
        let (a, b) = (&rows[0], &rows[1]);
        assert_eq!((a.variant.as_str(), a.requests), ("a", 12));
        assert!((a.seconds - 0.24).abs() < 1e-9);
        assert_eq!(a.p50_ms, 20.0);
        assert_eq!(a.round_p50_ms, [10.0, 20.0, 30.0]);
        // Four requests of 10, 20 and 30 ms filled each slice.
        let rates = &a.round_requests_per_s;
        assert_eq!(rates.len(), 3);
        for (rate, want) in rates.iter().zip([100.0, 50.0, 100.0 / 3.0]) {
            assert!((rate - want).abs() < 1e-9, "{rates:?}");
        }
        // In-process rows count their own passes; server rows take the server's count.
        assert_eq!(a.backbone_passes_per_request, Some(1.0));
        assert_eq!((b.requests, b.p50_ms), (12, 40.0));
        assert_eq!(b.backbone_passes_per_request, Some(0.5));
    }

    #[tokio::test]
    async fn interleaved_variants_run_one_request_each_in_turn_before_the_rounds() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let variants = vec![
            fake("a", 10, None, Arc::clone(&log)).interleaved(),
            fake("b", 20, None, Arc::clone(&log)),
            fake("c", 30, Some(4.0), Arc::clone(&log)).interleaved(),
        ];
        // No measured time: the interleaved ones run the minimum of one request per block.
        let timing = Timing {
            warmup: Duration::from_millis(400),
            seconds: Duration::ZERO,
        };
        let rows = measure_all(variants, timing, 2).await.expect("measured");
        let order: Vec<String> = log.lock().expect("log").clone();
        assert_eq!(order[..2], ["a 400ms 0ns", "c 400ms 0ns"], "warm-ups first");
        // Then two turns of one request each, in either order.
        for turn in order[2..6].chunks(2) {
            let mut turn = turn.to_vec();
            turn.sort();
            assert_eq!(turn, ["a 0ns 0ns", "c 0ns 0ns"]);
        }
        assert_eq!(
            order[6..],
            ["b 400ms 0ns", "b 100ms 0ns"],
            "then the rounds"
        );
        let names: Vec<&str> = rows.iter().map(|r| r.variant.as_str()).collect();
        assert_eq!(names, ["a", "b", "c"]);
        // The warm-up's slice is not measured: a's slices took 20 and 30 ms.
        let (a, c) = (&rows[0], &rows[2]);
        assert_eq!(
            (a.requests, a.round_p50_ms.as_slice()),
            (8, &[20.0, 30.0][..])
        );
        assert_eq!(
            (c.requests, c.round_p50_ms.as_slice()),
            (8, &[60.0, 90.0][..])
        );
        assert_eq!(c.backbone_passes_per_request, Some(1.0));
        assert_eq!(rows[1].round_p50_ms, [20.0, 40.0]);
        // Turn by turn (each of a's slices gives 4 requests of equal time).
        assert_eq!(
            (a.turn_ms.as_slice(), c.turn_ms.as_slice()),
            (&[20.0, 30.0][..], &[60.0, 90.0][..])
        );
        assert_eq!(a.turn_model_ms, [10.0, 15.0], "the model runs of each turn");
        assert!(
            rows[1].turn_ms.is_empty() && rows[1].turn_model_ms.is_empty(),
            "measured in rounds, not in turns"
        );
    }

    #[tokio::test]
    async fn each_turn_takes_the_interleaved_variants_in_a_new_order() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let variants = ["a", "b", "c"]
            .into_iter()
            .map(|name| fake(name, 10, None, Arc::clone(&log)).interleaved())
            .collect();
        let timing = Timing {
            warmup: Duration::ZERO,
            seconds: Duration::ZERO,
        };
        measure_all(variants, timing, 12).await.expect("measured");
        let order: Vec<String> = log.lock().expect("log").clone();
        let turns: Vec<Vec<&str>> = order[3..]
            .chunks(3)
            .map(|turn| turn.iter().map(|e| &e[..1]).collect())
            .collect();
        assert_eq!(turns.len(), 12);
        for turn in &turns {
            let mut names = turn.clone();
            names.sort_unstable();
            assert_eq!(names, ["a", "b", "c"], "each variant once per turn");
        }
        let firsts: std::collections::HashSet<&str> = turns.iter().map(|t| t[0]).collect();
        assert_eq!(firsts.len(), 3, "every variant leads some turn: {turns:?}");
    }
}

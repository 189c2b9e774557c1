//! Variants measured side by side in rounds: every round runs each variant for its share of the
//! measured time, one after the other. A shared machine's speed drifts over minutes (other
//! tenants, the page cache, thermal state); measured in rounds, the drift weighs on every variant
//! alike and their ratios hold, where back-to-back blocks of seconds each would compare one
//! minute's machine with another's.

use std::future::Future;
use std::pin::Pin;

use anyhow::Result;

use crate::raw::Timing;
use crate::stats::{Row, Samples};

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
        .map(|(variant, parts)| row(variant, parts))
        .collect())
}

/// The row of a variant's slices: their samples together over their summed wall time.
fn row(variant: &Variant<'_>, parts: Vec<Part>) -> Row {
    let wall = parts.iter().map(|p| p.samples.wall).sum();
    let server_passes: Option<f64> = parts.iter().map(|p| p.server_passes).sum();
    let merged = Samples::merge(parts.into_iter().map(|p| p.samples).collect(), wall);
    let mut row = Row::new(&variant.name, variant.kind, variant.concurrency, &merged);
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

    /// A variant whose every request takes `ms` and reports `passes` server passes per slice;
    /// it logs its slices' timings into `log`.
    fn fake(
        name: &str,
        ms: u64,
        passes: Option<f64>,
        log: Arc<Mutex<Vec<String>>>,
    ) -> Variant<'static> {
        let name = name.to_owned();
        let label = name.clone();
        Variant {
            name,
            kind: "raw",
            concurrency: 1,
            run: Box::new(move |timing| {
                log.lock()
                    .expect("log")
                    .push(format!("{label} {:?} {:?}", timing.warmup, timing.seconds));
                let samples = Samples {
                    latencies: vec![Duration::from_millis(ms); 4],
                    wall: Duration::from_millis(4 * ms),
                    reported_passes: 4,
                    items_per_request: 1,
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
        assert!((a.seconds - 0.12).abs() < 1e-9);
        assert_eq!(a.p50_ms, 10.0);
        // In-process rows count their own passes; server rows take the server's count.
        assert_eq!(a.backbone_passes_per_request, Some(1.0));
        assert_eq!((b.requests, b.p50_ms), (12, 20.0));
        assert_eq!(b.backbone_passes_per_request, Some(0.5));
    }
}

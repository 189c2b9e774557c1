//! The benchmark's verdict: the table of rows, the ratios against each target with PASS/MISS,
//! and the JSON written next to it.

use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::stats::Row;

/// The server's memory after one phase.
#[derive(Debug, Clone, Serialize)]
pub struct Phase {
    pub name: String,
    pub cache_bytes: u64,
    /// Bytes the feature cache held when the peak was read.
    pub cache_held_bytes: Option<f64>,
    pub peak_rss_mb: Option<f64>,
}

/// One target: `value` compared with `limit` (`at_most` or at least).
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub name: String,
    pub value: Option<f64>,
    pub limit: f64,
    pub at_most: bool,
    /// `None` when a row it needs was not measured.
    pub pass: Option<bool>,
    pub note: String,
}

impl Target {
    pub fn new(name: &str, value: Option<f64>, limit: f64, at_most: bool, note: String) -> Self {
        let pass = value.map(|v| if at_most { v <= limit } else { v >= limit });
        Self {
            name: name.to_owned(),
            value,
            limit,
            at_most,
            pass,
            note,
        }
    }
}

/// Everything one run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub settings: serde_json::Value,
    pub rows: Vec<Row>,
    pub phases: Vec<Phase>,
    /// Bytes of the backbone and head ONNX files the server loads.
    pub weights_bytes: u64,
    pub targets: Vec<Target>,
    /// Rows that could not be measured, and why.
    pub unavailable: Vec<String>,
    pub wall_seconds: f64,
    /// Processes each side of the c=1 pair was spread over: turn `t` ran on the
    /// `t % pair_processes`-th of each.
    #[serde(skip)]
    pub pair_processes: usize,
}

impl Report {
    /// The row called `variant`.
    pub fn row(&self, variant: &str) -> Option<&Row> {
        self.rows.iter().find(|r| r.variant == variant)
    }

    /// The row with the most requests/s among the concurrency levels of `variant`: the rows
    /// named `<variant> c=<level>` (not the c=1 pair's, whose name goes on after the level).
    pub fn best(&self, variant: &str) -> Option<&Row> {
        self.rows
            .iter()
            .filter(|r| {
                r.variant
                    .strip_prefix(variant)
                    .and_then(|rest| rest.strip_prefix(" c="))
                    .is_some_and(|level| level.parse::<usize>().is_ok())
            })
            .max_by(|a, b| a.requests_per_s.total_cmp(&b.requests_per_s))
    }

    /// Prints the table and the targets.
    pub fn print(&self) {
        println!(
            "\n{:<44} {:>9} {:>10} {:>9} {:>9} {:>10} {:>9}",
            "variant", "req/s", "items/s", "p50 ms", "p99 ms", "passes/req", "RSS MB"
        );
        for r in &self.rows {
            println!(
                "{:<44} {:>9.2} {:>10.2} {:>9.2} {:>9.2} {:>10} {:>9}",
                r.variant,
                r.requests_per_s,
                r.items_per_s,
                r.p50_ms,
                r.p99_ms,
                opt(r.backbone_passes_per_request, 2),
                opt(r.peak_rss_mb, 0),
            );
        }
        self.print_stages();
        for p in &self.phases {
            let held = p
                .cache_held_bytes
                .map(|b| format!(", holding {:.0} MiB", b / (1024.0 * 1024.0)))
                .unwrap_or_default();
            println!(
                "server peak RSS after {} (cache budget {} MiB{held}): {} MB",
                p.name,
                p.cache_bytes >> 20,
                opt(p.peak_rss_mb, 0)
            );
        }
        println!("\n{:<58} {:>9} {:>10}  verdict", "target", "value", "limit");
        for t in &self.targets {
            let verdict = match t.pass {
                Some(true) => "PASS",
                Some(false) => "MISS",
                None => "n/a",
            };
            let limit = format!("{} {:.2}", if t.at_most { "<=" } else { ">=" }, t.limit);
            println!(
                "{:<58} {:>9} {:>10}  {verdict}  {}",
                t.name,
                opt(t.value, 3),
                limit,
                t.note
            );
        }
        for u in &self.unavailable {
            println!("not available: {u}");
        }
        println!("wall time: {:.0} s", self.wall_seconds);
    }

    /// Where the calls at concurrency 1 spent their time: the client's p50 beside the medians of
    /// the stages the server reported; their difference is the transport and the client.
    fn print_stages(&self) {
        let rows: Vec<_> = self
            .rows
            .iter()
            .filter(|r| r.concurrency == 1)
            .filter_map(|r| r.server_stages_p50.map(|s| (r, s)))
            .collect();
        if rows.is_empty() {
            return;
        }
        println!(
            "\n{:<44} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "at c=1, p50 ms", "client", "server", "decode", "prep", "backbone", "heads", "post"
        );
        for (r, s) in rows {
            println!(
                "{:<44} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
                r.variant,
                r.p50_ms,
                s.total_ms,
                s.decode_ms,
                s.preprocess_ms,
                s.backbone_ms,
                s.heads_ms,
                s.postprocess_ms
            );
        }
    }

    /// Writes the report as pretty JSON, creating the directory.
    pub fn write(&self, path: &Path) -> Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let json = serde_json::to_string_pretty(self)?;
        std::fs::write(path, json).with_context(|| format!("write {}", path.display()))
    }
}

fn opt(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "-".to_owned(), |v| format!("{v:.decimals$}"))
}

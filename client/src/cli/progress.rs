//! Progress display on stderr for long-running commands: a byte bar while reading input files,
//! a spinner while waiting for the server and a counter of streamed results. Shown when stderr,
//! where it is drawn, is a terminal, whatever stdout is (a file, a pipe, `--json`).

use std::fs::File;
use std::future::Future;
use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use polyhead_client::ClientError;

/// Read buffer size; also the granularity of the byte bar.
const CHUNK: usize = 1 << 20;

/// A progress display that may be hidden.
pub(crate) struct Progress {
    visible: bool,
}

impl Progress {
    /// A display shown only when stderr is a terminal.
    pub(crate) fn new() -> Self {
        Self {
            visible: std::io::stderr().is_terminal(),
        }
    }

    /// A display that draws nothing.
    #[cfg(test)]
    pub(crate) fn hidden() -> Self {
        Self { visible: false }
    }

    /// Reads `paths` whole, showing the bytes read so far.
    pub(crate) fn read_files(&self, paths: &[PathBuf]) -> Result<Vec<Vec<u8>>, ClientError> {
        let total = paths
            .iter()
            .map(|path| std::fs::metadata(path).map_or(0, |m| m.len()))
            .sum();
        let bar = self.bar(Some(total));
        bar.set_style(
            ProgressStyle::with_template(
                "{msg} [{bar:30}] {binary_bytes}/{binary_total_bytes} ({eta})",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_message("reading");
        let files = paths.iter().map(|path| read_counted(path, &bar)).collect();
        bar.finish_and_clear();
        files
    }

    /// Awaits `future` behind a spinner with `message` and the elapsed time.
    pub(crate) async fn wait<F: Future>(&self, message: String, future: F) -> F::Output {
        let spinner = self.bar(None);
        spinner.set_style(
            ProgressStyle::with_template("{spinner} {msg} {elapsed}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        spinner.set_message(message);
        spinner.enable_steady_tick(Duration::from_millis(100));
        let output = future.await;
        spinner.finish_and_clear();
        output
    }

    /// A counter of `unit` done, a spinner until [`Counter::update`] gives it a total.
    pub(crate) fn counter(&self, unit: &str) -> Counter {
        let bar = self.bar(None);
        let counter = Counter {
            bar,
            unit: unit.to_owned(),
        };
        counter.bar.set_style(counter.spinner_style());
        counter.bar.enable_steady_tick(Duration::from_millis(100));
        counter
    }

    /// A bar drawn on stderr, or a hidden one.
    fn bar(&self, len: Option<u64>) -> ProgressBar {
        let target = if self.visible {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        ProgressBar::with_draw_target(len, target)
    }
}

/// How many of some unit are done: a bar out of the estimated total while there is one, a
/// spinner with the count while the total is unknown.
pub(crate) struct Counter {
    bar: ProgressBar,
    unit: String,
}

impl Counter {
    /// Shows `done` out of `estimated`; an estimate of 0 means unknown.
    pub(crate) fn update(&self, done: u64, estimated: u64) {
        match (estimated, self.bar.length()) {
            (0, Some(_)) => {
                self.bar.unset_length();
                self.bar.set_style(self.spinner_style());
            }
            (0, None) => {}
            (total, known) => {
                if known.is_none() {
                    self.bar.set_style(self.bar_style());
                }
                self.bar.set_length(total.max(done));
            }
        }
        self.bar.set_position(done);
    }

    /// Runs `f` with the display cleared, for output that goes above it.
    pub(crate) fn suspend<R>(&self, f: impl FnOnce() -> R) -> R {
        self.bar.suspend(f)
    }

    /// Removes the display.
    pub(crate) fn finish(&self) {
        self.bar.finish_and_clear();
    }

    fn bar_style(&self) -> ProgressStyle {
        let unit = &self.unit;
        let template =
            format!("{{spinner}} [{{bar:30}}] {{pos}}/{{len}} {unit} {{elapsed}} ({{eta}})");
        ProgressStyle::with_template(&template)
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ")
    }

    fn spinner_style(&self) -> ProgressStyle {
        let template = format!("{{spinner}} {{pos}} {} {{elapsed}}", self.unit);
        ProgressStyle::with_template(&template).unwrap_or_else(|_| ProgressStyle::default_spinner())
    }
}

/// Reads a file in chunks, advancing `bar` by the bytes read.
fn read_counted(path: &Path, bar: &ProgressBar) -> Result<Vec<u8>, ClientError> {
    let io_error = |source| ClientError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(io_error)?;
    let mut data = Vec::new();
    let mut chunk = vec![0; CHUNK];
    loop {
        let n = match file.read(&mut chunk) {
            Ok(0) => return Ok(data),
            Ok(n) => n,
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(io_error(err)),
        };
        data.extend_from_slice(&chunk[..n]);
        bar.inc(n as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_files_in_order() -> Result<(), Box<dyn std::error::Error>> {
        let dir = std::env::temp_dir().join(format!("polyhead-progress-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let a = dir.join("a.bin");
        let b = dir.join("b.bin");
        std::fs::write(&a, vec![7u8; CHUNK + 3])?;
        std::fs::write(&b, b"xyz")?;
        let files = Progress::hidden().read_files(&[a, b]);
        std::fs::remove_dir_all(&dir)?;
        let files = files?;
        assert_eq!(files[0].len(), CHUNK + 3);
        assert_eq!(files[1], b"xyz");
        Ok(())
    }

    #[test]
    fn missing_files_are_named() {
        let missing = PathBuf::from("/nonexistent/clip.mp4");
        let err = Progress::hidden().read_files(&[missing]).err();
        let text = err.map(|e| e.to_string()).unwrap_or_default();
        assert!(
            text.starts_with("cannot read /nonexistent/clip.mp4: "),
            "{text}"
        );
    }

    #[test]
    fn an_unknown_total_counts_without_a_length() {
        let counter = Progress::hidden().counter("windows");
        counter.update(3, 0);
        assert_eq!(counter.bar.length(), None, "a spinner, not a full bar");
        assert_eq!(counter.bar.position(), 3);
        counter.update(4, 10);
        assert_eq!(counter.bar.length(), Some(10));
        counter.update(12, 10);
        assert_eq!(counter.bar.length(), Some(12), "never less than done");
        counter.update(13, 0);
        assert_eq!(counter.bar.length(), None);
        assert_eq!(counter.bar.position(), 13);
    }
}

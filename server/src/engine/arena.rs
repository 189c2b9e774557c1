//! ONNX Runtime's CPU memory arena, one for the whole process.
//!
//! By default every ONNX Runtime session has its own CPU arena: a best-fit allocator that grows
//! by regions of doubling size and never gives memory back. With a backbone and three heads that
//! is four arenas, each as large as the largest run its model ever made: one batch of eight
//! frames leaves the backbone's arena eight images' activations larger for the life of the
//! process.
//!
//! A CPU runtime registers one arena in the environment instead, which every session uses
//! (`session.use_env_allocators`): the models share its free space, and once no batch has run
//! for `--arena-release-seconds` a worker asks it to release the regions nothing uses any more
//! (`memory.enable_memory_arena_shrinkage`, see [`Release`]), so that the memory a burst of
//! batches needed goes back to the C heap, while batches under steady load keep reusing it. What
//! it holds is exported as `polyhead_runtime_arena_bytes`. Backbone outputs are not in it: they are written into
//! buffers of their exact size (see [`super::buffers`]).
#![allow(unsafe_code)]

use std::ffi::CStr;
use std::ptr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use ort::AsPointer;
use ort::environment::Environment;
use ort::memory::{Allocator, AllocatorType, MemoryInfo};
use ort::session::{RunOptions, Session};

use super::status::check;

/// The run option that makes ONNX Runtime release the free regions of the CPU arena once the
/// run is done.
const SHRINK_KEY: &str = "memory.enable_memory_arena_shrinkage";

/// Set once the shared arena is registered (sessions of a CPU runtime use it): how long after
/// the last batched run a single-input run releases the arena's free regions.
static REGISTERED: OnceLock<Duration> = OnceLock::new();

/// What the shared CPU arena holds, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArenaStats {
    /// Regions the arena took from the C heap.
    pub allocated: u64,
    /// Bytes of those regions in use by tensors (weights, activations, outputs).
    pub in_use: u64,
}

/// Registers the process's shared CPU arena in `env`, whose memory batches grew is released
/// `release` after the last batched run (see [`Release`]); once: later calls (more runtimes on
/// the process's one environment) find it registered.
pub(super) fn register(env: &Environment, release: Duration) -> Result<(), String> {
    static REGISTERING: Mutex<()> = Mutex::new(());
    let _serialised = REGISTERING
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if REGISTERED.get().is_some() {
        return Ok(());
    }
    let api = ort::api();
    let info = arena_memory()?;
    let mut config: *mut ort::sys::OrtArenaCfg = ptr::null_mut();
    // 0: no limit; -1: ONNX Runtime's defaults (regions of doubling size, whose untouched tails
    // cost no memory: 12 MB less at the peak with a full cache than regions of the exact size).
    // SAFETY: `config` is a valid out-pointer; the call only writes it.
    check(unsafe { (api.CreateArenaCfg)(0, -1, -1, -1, &mut config) })?;
    // SAFETY: `env`, `info` and `config` are live for the call, which copies what it keeps.
    let registered = check(unsafe {
        (api.CreateAndRegisterAllocator)(env.ptr().cast_mut(), info.ptr(), config)
    });
    // SAFETY: `config` came from CreateArenaCfg and is released once.
    unsafe { (api.ReleaseArenaCfg)(config) };
    registered?;
    let _ = REGISTERED.set(release);
    Ok(())
}

/// When a worker's runs release the arena's free regions: at the end of its first single-input
/// run once no batched run has started for `--arena-release-seconds`. Under load, batches
/// (a clip's runs, concurrent images) reuse the regions the largest of them grew; once the
/// burst is over, its memory goes back.
#[derive(Debug, Default)]
pub struct Release {
    /// When the last batched run since the last release started.
    last_batch: Option<Instant>,
    /// The [`release_now`] calls this worker has seen.
    seen_requests: u64,
}

/// Calls of [`release_now`] so far.
static RELEASE_REQUESTS: AtomicU64 = AtomicU64::new(0);

/// Asks every worker to release what batches grew the arena by at its next single-input run,
/// without waiting for `--arena-release-seconds`: after the warm-up, whose batches are no sign of
/// the traffic to come.
pub fn release_now() {
    RELEASE_REQUESTS.fetch_add(1, Ordering::Relaxed);
}

impl Release {
    /// The run options of a run of `batch` inputs: those that release the arena's free regions
    /// when the run ends, or `None` to keep them.
    pub fn options(&mut self, batch: usize) -> Option<&'static RunOptions> {
        let idle = self.idle(*REGISTERED.get()?, RELEASE_REQUESTS.load(Ordering::Relaxed));
        if !self.releases_after(batch, Instant::now(), idle) {
            return None;
        }
        static RELEASE: OnceLock<Option<RunOptions>> = OnceLock::new();
        RELEASE
            .get_or_init(|| {
                let mut options = RunOptions::new().ok()?;
                options.set(SHRINK_KEY, "cpu:0").ok()?;
                Some(options)
            })
            .as_ref()
    }

    /// The idle time this run waits for: `configured`, or none once after a [`release_now`]
    /// (`requests` is how many there have been).
    fn idle(&mut self, configured: Duration, requests: u64) -> Duration {
        if requests == self.seen_requests {
            return configured;
        }
        self.seen_requests = requests;
        Duration::ZERO
    }

    /// Whether a run of `batch` inputs starting `now` releases: a single-input run, `idle` or
    /// more after the last batched one.
    fn releases_after(&mut self, batch: usize, now: Instant, idle: Duration) -> bool {
        if batch > 1 {
            self.last_batch = Some(now);
            return false;
        }
        match self.last_batch {
            Some(last) if now.saturating_duration_since(last) >= idle => {
                self.last_batch = None;
                true
            }
            _ => false,
        }
    }
}

/// Reads what the shared CPU arena holds, through one session's view of it.
pub struct ArenaGauge(Allocator);

impl ArenaGauge {
    /// A gauge of the arena `session` allocates from; `None` unless the session uses the shared
    /// arena (a CPU runtime).
    pub fn new(session: &Session) -> Option<Self> {
        REGISTERED.get()?;
        Allocator::new(session, arena_memory().ok()?).ok().map(Self)
    }

    /// What the arena holds now.
    pub fn stats(&self) -> Option<ArenaStats> {
        let api = ort::api();
        let mut pairs: *mut ort::sys::OrtKeyValuePairs = ptr::null_mut();
        // SAFETY: the allocator is live for the call; `pairs` is a valid out-pointer.
        check(unsafe { (api.AllocatorGetStats)(self.0.ptr(), &mut pairs) }).ok()?;
        let pairs = ptr::NonNull::new(pairs)?;
        let read = |key: &CStr| {
            // SAFETY: `pairs` is live until released below; a value it returns is a C string it
            // owns, read before then.
            let value = unsafe {
                let value = (api.GetKeyValue)(pairs.as_ptr(), key.as_ptr());
                (!value.is_null()).then(|| CStr::from_ptr(value).to_string_lossy().into_owned())
            };
            value?.parse::<u64>().ok()
        };
        let stats = read(c"TotalAllocated")
            .zip(read(c"InUse"))
            .map(|(allocated, in_use)| ArenaStats { allocated, in_use });
        // SAFETY: released once, after its last use.
        unsafe { (api.ReleaseKeyValuePairs)(pairs.as_ptr()) };
        stats
    }
}

fn arena_memory() -> Result<MemoryInfo<'static>, String> {
    super::tensor::host_memory(AllocatorType::Arena)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_single_run_releases_once_batches_have_stopped_for_the_idle_time() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let idle = Duration::from_secs(10);
        let mut release = Release::default();
        // (start in ms, batch) -> released?
        let runs = [
            (0, 1, false),
            (100, 8, false),
            (200, 8, false),
            (5_000, 1, false),
            (10_199, 1, false),
            (10_200, 1, true),
            (10_300, 1, false),
            (11_000, 2, false),
            (30_000, 1, true),
            (40_000, 1, false),
        ];
        for (ms, batch, expected) in runs {
            assert_eq!(
                release.releases_after(batch, at(ms), idle),
                expected,
                "a run of {batch} at {ms} ms"
            );
        }
    }

    #[test]
    fn after_a_release_request_the_next_single_run_does_not_wait() {
        let now = Instant::now();
        let ten = Duration::from_secs(10);
        let mut release = Release::default();
        let mut run = |batch: usize, requests: u64| {
            let idle = release.idle(ten, requests);
            release.releases_after(batch, now, idle)
        };
        assert!(!run(2, 0), "the warm-up's batch");
        assert!(!run(1, 0), "ten seconds have not passed");
        assert!(run(1, 1), "asked to release: at once");
        assert!(!run(8, 1));
        assert!(!run(1, 1), "the request was served; back to waiting");
    }

    #[test]
    fn with_no_idle_time_the_first_single_run_after_batches_releases() {
        let now = Instant::now();
        let mut release = Release::default();
        let released: Vec<bool> = [1, 8, 3, 1, 1, 2, 1]
            .iter()
            .map(|&batch| release.releases_after(batch, now, Duration::ZERO))
            .collect();
        assert_eq!(released, [false, false, false, true, false, false, true]);
    }
}

//! The memory all decoding in the process may hold at once (`--max-decoding-bytes`).
//!
//! Each image and clip has limits of its own (pixels, decoder memory, sampled frames), but
//! concurrent calls each take theirs: 32 calls decoding 40-megapixel photos hold several
//! gigabytes together, which a container's memory limit answers by killing the process. Every
//! decode therefore holds its bytes in one shared [`DecodingMemory`] while it works: an image
//! from before its decoder allocates until it has been preprocessed, a clip from its first
//! decoded frame until its sampled frames have been preprocessed. A decode that would take the
//! total past the limit fails with [`MediaError::DecodingMemoryFull`] (RESOURCE_EXHAUSTED, to
//! retry once other calls are done); one that needs more than the whole limit by itself fails
//! with [`MediaError::DecodingMemoryTooSmall`] (a limit error).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::MediaError;

/// A process-wide budget of decoding memory, shared by clones; [`Default`] has no limit.
#[derive(Debug, Clone, Default)]
pub struct DecodingMemory(Option<Arc<Pool>>);

#[derive(Debug)]
struct Pool {
    limit: u64,
    held: AtomicU64,
}

impl DecodingMemory {
    /// A budget of `limit` bytes.
    pub fn new(limit: u64) -> Self {
        Self(Some(Arc::new(Pool {
            limit,
            held: AtomicU64::new(0),
        })))
    }

    /// Bytes the decodes in progress hold now.
    pub fn held(&self) -> u64 {
        self.0
            .as_ref()
            .map_or(0, |pool| pool.held.load(Ordering::Acquire))
    }

    /// The limit, when there is one.
    pub fn limit(&self) -> Option<u64> {
        self.0.as_ref().map(|pool| pool.limit)
    }

    /// A hold on nothing yet, for one decode to grow as it learns what it needs.
    pub fn hold(&self) -> Held {
        Held {
            pool: self.0.clone(),
            bytes: 0,
        }
    }

    /// A hold on `bytes` at once.
    pub fn take(&self, bytes: u64) -> Result<Held, MediaError> {
        let mut held = self.hold();
        held.resize(bytes)?;
        Ok(held)
    }
}

/// Budgets are equal when they are the same budget (or both unlimited).
impl PartialEq for DecodingMemory {
    fn eq(&self, other: &Self) -> bool {
        match (&self.0, &other.0) {
            (None, None) => true,
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

impl Eq for DecodingMemory {}

/// Bytes one decode holds of a [`DecodingMemory`], given back when dropped.
#[derive(Debug)]
pub struct Held {
    pool: Option<Arc<Pool>>,
    bytes: u64,
}

impl Held {
    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Holds `bytes` from now on: gives back what is no longer needed, or takes more if the
    /// budget has it. On failure the hold keeps what it had.
    pub fn resize(&mut self, bytes: u64) -> Result<(), MediaError> {
        let Some(pool) = &self.pool else {
            self.bytes = bytes;
            return Ok(());
        };
        if bytes <= self.bytes {
            let held = pool.held.fetch_sub(self.bytes - bytes, Ordering::AcqRel);
            publish(held - (self.bytes - bytes));
            self.bytes = bytes;
            return Ok(());
        }
        if bytes > pool.limit {
            return Err(MediaError::DecodingMemoryTooSmall {
                needed: bytes,
                limit: pool.limit,
            });
        }
        let more = bytes - self.bytes;
        let before = pool
            .held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                held.checked_add(more).filter(|&total| total <= pool.limit)
            })
            .map_err(|held| MediaError::DecodingMemoryFull {
                needed: bytes,
                others: held.saturating_sub(self.bytes),
                limit: pool.limit,
            })?;
        publish(before + more);
        self.bytes = bytes;
        Ok(())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        // Nothing to give back on an unlimited budget, or when nothing was taken.
        let _ = self.resize(0);
    }
}

/// Publishes the bytes all decodes hold (`polyhead_decoding_bytes`).
fn publish(held: u64) {
    crate::telemetry::metrics::set_decoding_bytes(held);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_add_up_to_the_limit_and_go_back_when_dropped() {
        let memory = DecodingMemory::new(100);
        let mut a = memory.take(60).expect("60 of 100");
        let b = memory.take(40).expect("40 more");
        assert_eq!(memory.held(), 100);
        match memory.take(1) {
            Err(MediaError::DecodingMemoryFull {
                needed: 1,
                others: 100,
                limit: 100,
            }) => {}
            other => panic!("{other:?}"),
        }
        // A hold that cannot grow keeps what it had.
        assert!(matches!(
            a.resize(61),
            Err(MediaError::DecodingMemoryFull { others: 40, .. })
        ));
        assert_eq!((a.bytes(), memory.held()), (60, 100));
        a.resize(10).expect("shrinking always succeeds");
        assert_eq!(memory.held(), 50);
        a.resize(60).expect("back to 60");
        drop(b);
        assert_eq!(memory.held(), 60);
        drop(a);
        assert_eq!(memory.held(), 0);
    }

    #[test]
    fn more_than_the_whole_limit_is_a_limit_error() {
        let memory = DecodingMemory::new(100);
        let err = memory.take(101).expect_err("over the limit");
        assert!(err.is_limit(), "{err}");
        assert!(err.to_string().contains("--max-decoding-bytes"), "{err}");
        assert_eq!(memory.held(), 0);
        let err = {
            let memory = DecodingMemory::new(100);
            let _held = memory.take(100).expect("all of it");
            memory.take(1).expect_err("full")
        };
        assert!(!err.is_limit() && err.is_full(), "{err}");
    }

    #[test]
    fn concurrent_holds_never_pass_the_limit() {
        let memory = DecodingMemory::new(1000);
        std::thread::scope(|scope| {
            for _ in 0..8 {
                let memory = memory.clone();
                scope.spawn(move || {
                    for i in 0..2000u64 {
                        if let Ok(mut held) = memory.take(100 + i % 200) {
                            assert!(memory.held() <= 1000);
                            let _ = held.resize(50 + i % 400);
                            assert!(memory.held() <= 1000);
                        }
                    }
                });
            }
        });
        assert_eq!(memory.held(), 0);
    }

    #[test]
    fn an_unlimited_budget_holds_anything_and_counts_nothing() {
        let memory = DecodingMemory::default();
        let held = memory.take(u64::MAX).expect("no limit");
        assert_eq!(
            (held.bytes(), memory.held(), memory.limit()),
            (u64::MAX, 0, None)
        );
        assert_eq!(memory, DecodingMemory::default());
        let bounded = DecodingMemory::new(1);
        assert_eq!(bounded, bounded.clone());
        assert_ne!(bounded, DecodingMemory::new(1));
    }
}

//! The memory all decoding in the process may hold at once (`--max-decoding-bytes`).
//!
//! Each image and clip has limits of its own (pixels, decoder memory, sampled frames), but
//! concurrent calls each take theirs: 32 calls decoding 40-megapixel photos hold several
//! gigabytes together, which a container's memory limit answers by killing the process. Every
//! decode therefore holds its bytes in one shared [`DecodingMemory`] while it works: an image
//! from before its decoder allocates until it has been preprocessed, a clip from its first
//! decoded frame until its sampled frames have been preprocessed, a window stream's decoder
//! while the stream decodes. A decode that would take the total past the limit fails with
//! [`MediaError::DecodingMemoryFull`] (RESOURCE_EXHAUSTED, to retry once other calls are done);
//! one that needs more than the whole limit by itself fails with
//! [`MediaError::DecodingMemoryTooSmall`] (a limit error: the limit caps one input too).

use std::sync::{Arc, Mutex, MutexGuard};

use super::MediaError;

/// A process-wide budget of decoding memory, shared by clones; [`Default`] has no limit.
#[derive(Debug, Clone, Default)]
pub struct DecodingMemory(Option<Arc<Pool>>);

#[derive(Debug)]
struct Pool {
    limit: u64,
    /// Bytes held; the gauge is set under the same lock, so that it never lags behind.
    held: Mutex<u64>,
}

impl Pool {
    fn held(&self) -> MutexGuard<'_, u64> {
        // A plain number: a panic elsewhere cannot leave it half-written.
        self.held
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl DecodingMemory {
    /// A budget of `limit` bytes.
    pub fn new(limit: u64) -> Self {
        Self(Some(Arc::new(Pool {
            limit,
            held: Mutex::new(0),
        })))
    }

    /// Bytes the decodes in progress hold now.
    pub fn held(&self) -> u64 {
        self.0.as_ref().map_or(0, |pool| *pool.held())
    }

    /// The limit, when there is one.
    pub fn limit(&self) -> Option<u64> {
        self.0.as_ref().map(|pool| pool.limit)
    }

    /// A hold on nothing yet, for one decode to grow as it learns what it needs.
    pub fn hold(&self) -> Hold {
        Hold {
            pool: self.0.clone(),
            bytes: 0,
        }
    }

    /// A hold on `bytes` at once.
    pub fn take(&self, bytes: u64) -> Result<Hold, MediaError> {
        let mut hold = self.hold();
        hold.resize(bytes)?;
        Ok(hold)
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
pub struct Hold {
    pool: Option<Arc<Pool>>,
    bytes: u64,
}

impl Hold {
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
        if bytes == self.bytes {
            return Ok(());
        }
        if bytes > pool.limit {
            return Err(MediaError::DecodingMemoryTooSmall {
                needed: bytes,
                limit: pool.limit,
            });
        }
        let mut held = pool.held();
        // The total always includes this hold's bytes, and never passes the limit.
        let others = *held - self.bytes;
        if others + bytes > pool.limit {
            return Err(MediaError::DecodingMemoryFull {
                needed: bytes,
                others,
                limit: pool.limit,
            });
        }
        *held = others + bytes;
        crate::telemetry::metrics::set_decoding_bytes(*held);
        self.bytes = bytes;
        Ok(())
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        // Shrinking always succeeds.
        let _ = self.resize(0);
    }
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

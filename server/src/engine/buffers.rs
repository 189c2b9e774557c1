//! Host buffers for backbone features under the CPU provider, recycled by size.
//!
//! Features kept in the feature cache or behind a feature handle live for minutes, while the
//! requests around them allocate and free megabytes each (message, decoded image, activations,
//! head outputs). In the C heap the two interleave: an evicted entry leaves a hole that a
//! request's buffer takes, and the next entry extends the heap instead, so a full cache under
//! steady traffic grew its process by a sixth of its budget beyond what it held. Feature buffers
//! come from this pool instead: a freed buffer waits for the next tensor of exactly its size (a
//! model's outputs come in a few sizes), and at most [`FREE_LIMIT_BYTES`] of free buffers are
//! kept.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};

/// Bytes of free buffers the pool keeps for reuse; beyond them a freed buffer goes back to the
/// C heap.
pub const FREE_LIMIT_BYTES: usize = 32 << 20;

/// The process's pool.
static POOL: LazyLock<Pool> = LazyLock::new(|| Pool::new(FREE_LIMIT_BYTES));

struct Pool {
    limit: usize,
    free: Mutex<Free>,
}

#[derive(Default)]
struct Free {
    /// Free buffers by length.
    buffers: HashMap<usize, Vec<Box<[f32]>>>,
    bytes: usize,
}

impl Pool {
    fn new(limit: usize) -> Self {
        Self {
            limit,
            free: Mutex::new(Free::default()),
        }
    }

    fn take(&self, len: usize) -> Box<[f32]> {
        let reused = {
            let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
            let buffer = free.buffers.get_mut(&len).and_then(Vec::pop);
            if buffer.is_some() {
                free.bytes -= len * size_of::<f32>();
            }
            buffer
        };
        reused.unwrap_or_else(|| vec![0.0; len].into_boxed_slice())
    }

    fn give(&self, buffer: Box<[f32]>) {
        let bytes = buffer.len() * size_of::<f32>();
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        if free.bytes + bytes <= self.limit {
            free.bytes += bytes;
            free.buffers.entry(buffer.len()).or_default().push(buffer);
        }
    }

    fn free_bytes(&self) -> usize {
        self.free.lock().unwrap_or_else(|p| p.into_inner()).bytes
    }
}

/// A buffer of `f32` from the pool, back in it when dropped. Its contents are whatever the last
/// user left: it is for outputs that are written whole.
#[derive(Debug)]
pub struct PooledBuffer {
    data: Option<Box<[f32]>>,
}

impl PooledBuffer {
    /// A buffer of `len` elements.
    pub fn new(len: usize) -> Self {
        Self {
            data: Some(POOL.take(len)),
        }
    }

    /// Its elements.
    pub fn as_mut_slice(&mut self) -> &mut [f32] {
        self.data.as_deref_mut().unwrap_or_default()
    }
}

impl Drop for PooledBuffer {
    fn drop(&mut self) {
        if let Some(buffer) = self.data.take() {
            POOL.give(buffer);
        }
    }
}

/// Bytes of free buffers the pool holds now.
pub fn free_bytes() -> usize {
    POOL.free_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_freed_buffer_is_reused_for_the_same_size_only() {
        let pool = Pool::new(1 << 20);
        let first = pool.take(1000);
        let address = first.as_ptr();
        pool.give(first);
        assert_eq!(pool.free_bytes(), 4000);
        let other = pool.take(999);
        assert_ne!(
            other.as_ptr(),
            address,
            "another size gets a buffer of its own"
        );
        assert_eq!(pool.free_bytes(), 4000);
        let again = pool.take(1000);
        assert_eq!(
            again.as_ptr(),
            address,
            "the same size reuses the free buffer"
        );
        assert_eq!(pool.free_bytes(), 0);
    }

    #[test]
    fn free_buffers_beyond_the_limit_go_back_to_the_heap() {
        let pool = Pool::new(10_000);
        let buffers: Vec<_> = (0..4).map(|_| pool.take(1000)).collect();
        for buffer in buffers {
            pool.give(buffer);
        }
        assert_eq!(
            pool.free_bytes(),
            8000,
            "two buffers of 4000 bytes fit under 10000"
        );
        assert_eq!(pool.take(1000).len(), 1000);
        assert_eq!(pool.free_bytes(), 4000);
    }
}

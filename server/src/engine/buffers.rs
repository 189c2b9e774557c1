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

use std::collections::{HashMap, VecDeque};
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
    /// The lengths of the free buffers, oldest first.
    order: VecDeque<usize>,
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
        let reused = self
            .free
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(len, Remove::Newest);
        reused.unwrap_or_else(|| vec![0.0; len].into_boxed_slice())
    }

    /// Keeps `buffer` for reuse, letting the oldest free buffers go to stay within the limit,
    /// so that the sizes in use now stay (a rare batch's buffers do not crowd out an image's).
    fn give(&self, buffer: Box<[f32]>) {
        let bytes = buffer.len() * size_of::<f32>();
        if bytes > self.limit {
            return;
        }
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        while free.bytes + bytes > self.limit {
            let Some(&oldest) = free.order.front() else {
                break;
            };
            drop(free.remove(oldest, Remove::Oldest));
        }
        free.bytes += bytes;
        free.order.push_back(buffer.len());
        free.buffers.entry(buffer.len()).or_default().push(buffer);
    }

    fn free_bytes(&self) -> usize {
        self.free.lock().unwrap_or_else(|p| p.into_inner()).bytes
    }
}

/// Which free buffer of a length [`Free::remove`] takes.
#[derive(Clone, Copy)]
enum Remove {
    /// The one freed last (reused: its pages are the likeliest to be resident and cached).
    Newest,
    /// The one freed first (let go).
    Oldest,
}

impl Free {
    /// Takes a free buffer of `len` elements out of the pool, if there is one.
    fn remove(&mut self, len: usize, which: Remove) -> Option<Box<[f32]>> {
        let buffers = self.buffers.get_mut(&len)?;
        let buffer = match which {
            Remove::Newest => buffers.pop()?,
            Remove::Oldest if buffers.is_empty() => return None,
            Remove::Oldest => buffers.remove(0),
        };
        let position = match which {
            Remove::Newest => self.order.iter().rposition(|&l| l == len),
            Remove::Oldest => self.order.iter().position(|&l| l == len),
        };
        if let Some(position) = position {
            self.order.remove(position);
        }
        self.bytes -= len * size_of::<f32>();
        Some(buffer)
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
    fn beyond_the_limit_the_oldest_free_buffers_go_back_to_the_heap() {
        let pool = Pool::new(10_000);
        pool.give(pool.take(2000));
        assert_eq!(pool.free_bytes(), 8000);
        let small: Vec<_> = (0..2).map(|_| pool.take(500)).collect();
        let addresses: Vec<_> = small.iter().map(|b| b.as_ptr()).collect();
        for buffer in small {
            pool.give(buffer);
        }
        // 8000 + 2000 fits; the second small buffer does not: the big one, oldest, goes.
        assert_eq!(pool.free_bytes(), 4000, "two buffers of 2000 bytes");
        assert_eq!(pool.take(2000).len(), 2000);
        assert_eq!(
            pool.free_bytes(),
            4000,
            "the big buffer was let go, not reused"
        );
        let reused = [pool.take(500), pool.take(500)];
        assert!(
            reused.iter().all(|b| addresses.contains(&b.as_ptr())),
            "both small ones were kept"
        );
        assert_eq!(pool.free_bytes(), 0);
        pool.give(vec![0.0; 5000].into_boxed_slice());
        assert_eq!(
            pool.free_bytes(),
            0,
            "a buffer larger than the limit is not kept"
        );
    }
}

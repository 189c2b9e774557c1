//! Returning the C heap's free memory to the operating system.
//!
//! ONNX Runtime parses a model's protobuf, builds the session's weights from it and frees the
//! parsed copy; glibc keeps most of those pages (they sit below live allocations, in several
//! per-thread arenas), so a freshly loaded server would hold about half its weights' size again
//! in free heap. `malloc_trim` hands such pages back.

/// Returns the free pages of every glibc malloc arena to the operating system (`malloc_trim`).
/// True when memory was released; always false where the C library is not glibc.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn release_free_memory() -> bool {
    // SAFETY: `malloc_trim` takes no pointers and is thread-safe: it locks each arena in turn.
    unsafe { libc::malloc_trim(0) != 0 }
}

/// Returns the free pages of every glibc malloc arena to the operating system (`malloc_trim`).
/// True when memory was released; always false where the C library is not glibc.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn release_free_memory() -> bool {
    false
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    use super::*;

    /// Resident memory of this process, in KiB.
    fn rss_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
        let line = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .expect("a VmRSS line");
        line.split_whitespace()
            .nth(1)
            .and_then(|kib| kib.parse().ok())
            .expect("VmRSS in kB")
    }

    #[test]
    fn free_heap_below_a_live_allocation_goes_back() {
        // 128 MiB in blocks below glibc's mmap threshold, on the heap; every other one is freed,
        // so that each freed block is a hole between two live ones, which free() cannot return.
        let blocks: Vec<Vec<u8>> = (0..2048).map(|i| vec![i as u8 | 1; 64 << 10]).collect();
        let held = rss_kib();
        let (keep, free): (Vec<_>, Vec<_>) = blocks
            .into_iter()
            .enumerate()
            .partition(|(i, _)| i % 2 == 0);
        drop(free);
        let before = rss_kib();
        assert!(release_free_memory());
        let after = rss_kib();
        assert!(keep.iter().all(|(i, block)| block[100] == *i as u8 | 1));
        // The 64 MiB of holes stay resident after freeing (free() returns only the heap's top);
        // trimming takes at least half of them back. Other tests run in parallel threads.
        let report =
            format!("RSS {held} KiB with the blocks, {before} KiB freed, {after} KiB trimmed");
        assert!(after + (32 << 10) < before, "{report}");
    }
}

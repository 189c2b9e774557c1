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
        // 128 MiB in blocks below glibc's mmap threshold, on the heap, with a small block that
        // stays live after every 64 of them, so that freeing the others leaves holes in the heap.
        let mut blocks = Vec::new();
        let mut keep = Vec::new();
        for i in 0..2048 {
            blocks.push(vec![i as u8 | 1; 64 << 10]);
            if i % 64 == 63 {
                keep.push(vec![7u8; 64]);
            }
        }
        let held = rss_kib();
        drop(blocks);
        let before = rss_kib();
        assert!(release_free_memory());
        let after = rss_kib();
        assert!(keep.iter().all(|k| k[63] == 7));
        // Freeing leaves at least a quarter of the 128 MiB resident in holes, whatever glibc
        // returns on its own; trimming takes it back. Other tests run in parallel threads.
        let report =
            format!("RSS {held} KiB with the blocks, {before} KiB freed, {after} KiB trimmed");
        assert!(after + (32 << 10) < before, "{report}");
    }
}

//! The C heap: how many malloc arenas it may keep, and returning its free memory to the
//! operating system.
//!
//! ONNX Runtime parses a model's protobuf, builds the session's weights from it and frees the
//! parsed copy; glibc keeps most of those pages (they sit below live allocations, in several
//! per-thread arenas), so a freshly loaded server would hold about half its weights' size again
//! in free heap. `malloc_trim` hands such pages back.

/// The server's cap on glibc malloc arenas, `--malloc-arenas` (see [`limit_arenas`]).
pub const DEFAULT_ARENAS: u32 = 2;

/// Caps the malloc arenas glibc creates at `arenas` (`mallopt(M_ARENA_MAX)`); 0 leaves glibc's
/// default, eight per core. glibc gives each thread that allocates an arena of its own, up to
/// that cap, and an arena keeps what is freed into it for its next allocations: with decoding
/// and post-processing on whichever thread serves a request (tokio hands a worker's core to
/// another thread at each `block_in_place`), every extra arena holds a few more megabytes of
/// decoding buffers the others cannot reuse. To take effect for every thread, call it before
/// starting threads. True when the cap was set; always false where the C library is not glibc.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn limit_arenas(arenas: u32) -> bool {
    let Ok(arenas) = libc::c_int::try_from(arenas) else {
        return false;
    };
    // SAFETY: `mallopt` takes no pointers; glibc serialises it against allocation.
    arenas > 0 && unsafe { libc::mallopt(libc::M_ARENA_MAX, arenas) == 1 }
}

/// Caps the malloc arenas glibc creates; a no-op answering false where the C library is not
/// glibc.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn limit_arenas(_arenas: u32) -> bool {
    false
}

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

    /// The malloc arenas (`<heap>` elements of `malloc_info`) the process has.
    #[allow(unsafe_code)]
    fn arenas() -> usize {
        let mut buffer: *mut libc::c_char = std::ptr::null_mut();
        let mut size: libc::size_t = 0;
        // SAFETY: `open_memstream` allocates `buffer`, which stays valid after `fclose` until
        // freed here; `malloc_info` writes its XML into the stream.
        let xml = unsafe {
            let stream = libc::open_memstream(&mut buffer, &mut size);
            assert!(!stream.is_null(), "open_memstream");
            assert_eq!(libc::malloc_info(0, stream), 0, "malloc_info");
            libc::fclose(stream);
            let xml = std::ffi::CStr::from_ptr(buffer)
                .to_string_lossy()
                .into_owned();
            libc::free(buffer.cast());
            xml
        };
        xml.matches("<heap nr=").count()
    }

    #[test]
    fn capped_arenas_are_shared_by_new_threads() {
        assert!(!limit_arenas(0), "0 leaves glibc's default");
        let before = arenas();
        assert!(limit_arenas(before as u32));
        // Threads that allocate at once would each get an arena of their own, up to eight per
        // core; under the cap they share the existing ones.
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(8));
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let barrier = std::sync::Arc::clone(&barrier);
                std::thread::spawn(move || {
                    barrier.wait();
                    let block = vec![i as u8; 256 << 10];
                    barrier.wait();
                    block[1000]
                })
            })
            .collect();
        for thread in threads {
            thread.join().expect("an allocating thread");
        }
        assert_eq!(arenas(), before);
        // Back to glibc's default for the other tests of this process.
        assert!(limit_arenas(
            8 * std::thread::available_parallelism().map_or(1, |n| n.get()) as u32
        ));
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

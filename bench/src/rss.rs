//! Resident memory from `/proc`: the peak (VmHWM) of a process, and resetting this process's
//! peak so that each in-process variant reports its own.

/// Peak resident memory of process `pid`, in MB (`None` where `/proc` cannot be read).
pub fn peak_mb(pid: u32) -> Option<f64> {
    status_kb(&format!("/proc/{pid}/status"), "VmHWM:").map(|kb| kb as f64 / 1024.0)
}

/// Peak resident memory of this process since the last [`reset_own_peak`], in MB.
pub fn own_peak_mb() -> Option<f64> {
    status_kb("/proc/self/status", "VmHWM:").map(|kb| kb as f64 / 1024.0)
}

/// Resets this process's VmHWM to its current RSS (`5` in `clear_refs`, Linux 4.0+). Memory the
/// allocator kept from earlier variants still counts; where the write is refused the peak simply
/// carries over.
pub fn reset_own_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn status_kb(path: &str, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(path).ok()?;
    parse_kb(&status, field)
}

fn parse_kb(status: &str, field: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(field))?;
    line[field.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_status_fields() {
        let status = "Name:\tx\nVmHWM:\t  123456 kB\nVmRSS:\t  1000 kB\n";
        assert_eq!(parse_kb(status, "VmHWM:"), Some(123_456));
        assert_eq!(parse_kb(status, "VmSwap:"), None);
        assert!(own_peak_mb().is_some_and(|mb| mb > 0.0));
    }
}

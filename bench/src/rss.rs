//! Resident memory from `/proc`: the peak (VmHWM) of a process.

/// Peak resident memory of process `pid`, in MB (`None` where `/proc` cannot be read).
pub fn peak_mb(pid: u32) -> Option<f64> {
    status_kb(&format!("/proc/{pid}/status"), "VmHWM:").map(|kb| kb as f64 / 1024.0)
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
        assert!(peak_mb(std::process::id()).is_some_and(|mb| mb > 0.0));
    }
}

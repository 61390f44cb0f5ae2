//! What the process's memory is made of, read when `/metrics` is scraped.
//!
//! RSS is what an operator's memory limit sees, but on its own it cannot say
//! whether a rise is live data (a cache, buffers) or memory the allocator
//! keeps after it was freed. So next to the resident set (from
//! `/proc/self/status`, Linux only) this carries the allocator's own counts
//! when the binary that installed the allocator supplies a reader (the
//! `sse-gateway` binary does for jemalloc, its default): bytes the program
//! holds, pages those sit in, pages resident including freed ones not yet
//! returned, and address space kept for reuse.

/// The allocator's own counts, in bytes. Only the binary knows which
/// allocator it installed, so it supplies the reader ([`HeapReader`]); the
/// library never guesses (jemalloc linked but not installed still counts a
/// few allocations of its own, which would describe the wrong heap).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HeapReading {
    /// Bytes the program holds.
    pub allocated: u64,
    /// Bytes in pages that hold allocations.
    pub active: u64,
    /// Resident bytes the allocator maps, freed pages not yet returned included.
    pub resident: u64,
    /// Address space returned to the kernel but kept mapped for reuse.
    pub retained: u64,
}

/// Reads the installed allocator's counts; `None` when it cannot now.
pub type HeapReader = fn() -> Option<HeapReading>;

/// The process's resident set in bytes (`VmRSS` of `/proc/self/status`);
/// `None` off Linux.
pub fn process_resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_vm_rss_kib(&status).map(|kib| kib.saturating_mul(1024))
}

/// The `VmRSS:` line's figure (kB) of a `/proc/<pid>/status` text.
fn parse_vm_rss_kib(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_resident_set_is_read_from_the_status_text() {
        let status = "Name:\tsse-gateway\nVmPeak:\t  90000 kB\nVmRSS:\t   61234 kB\nThreads:\t12\n";
        assert_eq!(parse_vm_rss_kib(status), Some(61_234));
        assert_eq!(parse_vm_rss_kib("Name:\tx\n"), None);
        assert_eq!(parse_vm_rss_kib("VmRSS:\tlots kB\n"), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn this_process_has_a_resident_set() {
        let bytes = process_resident_bytes().expect("Linux has /proc/self/status");
        assert!(
            bytes > 1 << 20,
            "a test binary holds more than 1 MiB: {bytes}"
        );
    }
}

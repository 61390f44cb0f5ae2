//! What the process's memory is made of, read when `/metrics` is scraped.
//!
//! RSS is what an operator's memory limit sees, but on its own it cannot say
//! whether a rise is live data (a cache, buffers) or memory the allocator
//! keeps after it was freed. So next to the resident set (from
//! `/proc/self/status`, Linux only) this reports, when the binary allocates
//! with jemalloc (the default `jemalloc` feature), jemalloc's own counts:
//! bytes the program holds (`allocated`), pages those sit in (`active`),
//! pages jemalloc has resident including freed-but-not-yet-returned ones
//! (`resident`) and address space it keeps unmapped for reuse (`retained`).

/// One reading; a field is `None` where this platform or build cannot say.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryReading {
    pub process_resident: Option<u64>,
    pub heap_allocated: Option<u64>,
    pub heap_active: Option<u64>,
    pub heap_resident: Option<u64>,
    pub heap_retained: Option<u64>,
}

/// Reads the process's memory now.
pub fn read() -> MemoryReading {
    let mut reading = MemoryReading {
        process_resident: process_resident_bytes(),
        ..MemoryReading::default()
    };
    heap(&mut reading);
    reading
}

/// `VmRSS` of `/proc/self/status`, in bytes.
fn process_resident_bytes() -> Option<u64> {
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

#[cfg(all(feature = "jemalloc", not(target_env = "msvc")))]
fn heap(reading: &mut MemoryReading) {
    use tikv_jemalloc_ctl::{epoch, stats};
    // jemalloc's statistics are a snapshot refreshed only when the epoch
    // advances; without this every scrape would repeat the first one.
    if epoch::advance().is_err() {
        return;
    }
    let allocated = stats::allocated::read().ok();
    // A library user that links this crate but allocates with another
    // allocator: jemalloc then holds nothing of the program's, and its
    // figures would describe an idle heap, not this process.
    if allocated.is_none_or(|bytes| bytes == 0) {
        return;
    }
    let as_u64 = |value: usize| u64::try_from(value).unwrap_or(u64::MAX);
    reading.heap_allocated = allocated.map(as_u64);
    reading.heap_active = stats::active::read().ok().map(as_u64);
    reading.heap_resident = stats::resident::read().ok().map(as_u64);
    reading.heap_retained = stats::retained::read().ok().map(as_u64);
}

#[cfg(not(all(feature = "jemalloc", not(target_env = "msvc"))))]
fn heap(_reading: &mut MemoryReading) {}

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
        let bytes = read()
            .process_resident
            .expect("Linux has /proc/self/status");
        assert!(
            bytes > 1 << 20,
            "a test binary holds more than 1 MiB: {bytes}"
        );
    }
}

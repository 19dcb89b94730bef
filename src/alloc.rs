//! Allocator settings for tensor workloads.
//!
//! glibc's defaults return freed memory to the kernel eagerly: every tensor above the (dynamic)
//! mmap threshold is a fresh `mmap` whose pages fault in one by one, and arenas of worker
//! threads are trimmed after frees. A training step allocates and frees the same sizes
//! thousands of times, so on the quickstart this cost 32 s of system time in a 57 s run. Fixed
//! thresholds keep blocks below 64 MiB in the heap and let up to 256 MiB of freed memory stay
//! mapped: the same run takes 36 s with 4.5 s of system time and the same results (measured
//! 2026-11-27, docs/performance.md). Larger tensors (an LLM's embedding) still come from mmap.

/// Applies the settings once per process; a no-op outside Linux/glibc. Safe to call often.
pub fn tune() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        {
            // An explicit GLIBC_TUNABLES setting from the user wins.
            if std::env::var_os("GLIBC_TUNABLES").is_none() {
                // SAFETY: mallopt only changes allocator parameters; called before heavy work.
                unsafe {
                    libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 20);
                    libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
                }
            }
        }
    });
}

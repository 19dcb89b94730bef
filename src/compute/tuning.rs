//! Process settings for tensor workloads: the allocator and candle's element-wise thread pool.
//!
//! ## Allocator
//!
//! glibc's defaults return freed memory to the kernel eagerly: every tensor above the (dynamic)
//! mmap threshold is a fresh `mmap` whose pages fault in one by one (each fault a zeroed page,
//! and each `munmap` a TLB shoot-down across cores), and arenas of worker threads are trimmed
//! after frees. A training step allocates and frees the same sizes thousands of times.
//!
//! - First fix (session of 2026-11-27): blocks below 64 MiB from the heap and up to 256 MiB of
//!   freed memory kept: the quickstart went from 57 s (32 s of system time) to 36 s.
//! - Larger tensors still came from mmap, and a Qwen2.5-0.5B step frees and re-allocates several
//!   (vocab × hidden) = 545 MB gradients of the tied embedding: half of its samples were page
//!   faults, zeroing and shoot-down interrupts. Now no block comes from mmap, and up to 2 GiB of
//!   freed heap stays mapped: that step went from 3.44–3.53 s to 2.57–2.60 s (interleaved runs,
//!   2 vCPUs, same binary); its peak RSS moved from 8.61 to 8.64–9.06 GB (fragmentation).
//!
//! The memory kept is memory the process already peaked at; it is returned at exit. glibc still
//! falls back to mmap when the heap cannot grow, so no allocation fails for this.

/// Applies the allocator settings once per process; a no-op outside Linux/glibc. Safe to call
/// often, from any thread.
pub fn allocator() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        {
            // An explicit GLIBC_TUNABLES setting from the user wins.
            if std::env::var_os("GLIBC_TUNABLES").is_none() {
                // SAFETY: mallopt only changes allocator parameters; called before heavy work.
                unsafe {
                    libc::mallopt(libc::M_MMAP_MAX, 0);
                    libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX);
                }
            }
        }
    });
}

/// Spin budget, in pause instructions, of candle's element-wise pool worker after each job.
///
/// candle 0.11 runs large element-wise ops (the adds of every gradient edge, the residual adds)
/// on its own pool (`candle-bp-*` threads) beside rayon's, which runs the GEMMs. After each job
/// a pool worker spins 25 000 times before it parks, and on a machine with as many threads as
/// cores that spin takes a core from the GEMM that follows. With 1000 the spike config's
/// backward pass went from 0.175 to 0.145–0.155 s (interleaved runs, 2 vCPUs, 2026-11-27); the
/// forward pass did not change.
pub const CANDLE_SPIN_LIMIT: &str = "1000";

/// Every setting above, for the start of `main`: besides [`allocator`] it sets
/// `CANDLE_BARRIER_POOL_SPIN_LIMIT` to [`CANDLE_SPIN_LIMIT`] unless the user set it. Setting an
/// environment variable is only sound while no other thread runs, hence a separate entry point
/// for binaries, called before anything else.
pub fn process() {
    allocator();
    const VAR: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";
    if std::env::var_os(VAR).is_none() {
        std::env::set_var(VAR, CANDLE_SPIN_LIMIT);
    }
}

//! The lowest layer: the compute device, the optimizer, process-wide tuning of the
//! allocator and thread pools, and the supervisor of user programs spoken to in JSON lines
//! ([`process`]: reward commands, environment programs, command tools). Everything above
//! (model, algorithms, rollout, training, serving, reward-model training) takes these from
//! here.
pub mod optim;
pub mod process;
pub mod tuning;

use candle_core::Device;

/// The compute device: the first CUDA GPU when built with `--features cuda` and one exists.
pub fn device() -> Device {
    #[cfg(feature = "cuda")]
    if let Ok(d) = Device::cuda_if_available(0) {
        return d;
    }
    Device::Cpu
}

/// Bytes this process can still allocate without swapping out others: `MemAvailable` plus
/// `SwapFree` from /proc/meminfo, capped by the cgroup (v2) limit minus its current use when
/// one is set. None where neither can be read (not Linux): sizes are then not checked
/// against the machine.
pub fn available_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let host = meminfo_available(&meminfo)?;
    let read = |p: &str| std::fs::read_to_string(p).ok();
    let cgroup = match (
        read("/sys/fs/cgroup/memory.max"),
        read("/sys/fs/cgroup/memory.current"),
    ) {
        (Some(max), Some(cur)) => cgroup_room(&max, &cur),
        _ => None,
    };
    Some(cgroup.map_or(host, |c| c.min(host)))
}

/// `MemAvailable` + `SwapFree` of a /proc/meminfo text, in bytes.
pub fn meminfo_available(meminfo: &str) -> Option<u64> {
    let kib = |key: &str| -> Option<u64> {
        let line = meminfo.lines().find(|l| l.starts_with(key))?;
        line[key.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()
    };
    let avail = kib("MemAvailable:")?;
    Some((avail + kib("SwapFree:").unwrap_or(0)) * 1024)
}

/// Room left under a cgroup v2 limit (`memory.max` is a byte count or `max`).
fn cgroup_room(max: &str, current: &str) -> Option<u64> {
    let max: u64 = max.trim().parse().ok()?;
    let current: u64 = current.trim().parse().ok()?;
    Some(max.saturating_sub(current))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn available_memory_reads_meminfo_and_the_cgroup_limit() {
        let text = "MemTotal:       16000000 kB\nMemFree:  100 kB\nMemAvailable:    8000000 kB\n\
                    SwapTotal: 0 kB\nSwapFree:        1000 kB\n";
        assert_eq!(meminfo_available(text), Some(8_001_000 * 1024));
        assert_eq!(meminfo_available("MemTotal: 1 kB\n"), None);
        assert_eq!(cgroup_room("max\n", "5\n"), None);
        assert_eq!(cgroup_room("1000\n", "400\n"), Some(600));
        assert_eq!(cgroup_room("1000\n", "4000\n"), Some(0));
        assert!(available_memory().is_some_and(|b| b > 0));
    }
}

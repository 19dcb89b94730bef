//! The lowest layer: the compute device, the optimizer, and process-wide tuning of the
//! allocator and thread pools. Everything above (model, algorithms, rollout, training,
//! serving, reward-model training) takes these from here.
pub mod optim;
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

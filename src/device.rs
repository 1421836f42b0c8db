//! Choosing the compute device: `auto` prefers CUDA, then Metal, then the CPU.

use anyhow::{Result, bail};
use candle_core::Device;
use clap::ValueEnum;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    Auto,
    Cpu,
    Cuda,
    Metal,
}

pub fn select(choice: DeviceChoice) -> Result<Device> {
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Cuda => {
            if !candle_core::utils::cuda_is_available() {
                bail!(
                    "--device cuda: this build has no CUDA support or no CUDA device is present (build with --features cuda)"
                );
            }
            Ok(Device::new_cuda(0)?)
        }
        DeviceChoice::Metal => {
            if !candle_core::utils::metal_is_available() {
                bail!(
                    "--device metal: this build has no Metal support (build with --features metal on macOS)"
                );
            }
            Ok(Device::new_metal(0)?)
        }
        DeviceChoice::Auto => {
            if candle_core::utils::cuda_is_available()
                && let Ok(d) = Device::new_cuda(0)
            {
                return Ok(d);
            }
            if candle_core::utils::metal_is_available()
                && let Ok(d) = Device::new_metal(0)
            {
                return Ok(d);
            }
            Ok(Device::Cpu)
        }
    }
}

pub fn describe(d: &Device) -> &'static str {
    match d {
        Device::Cpu => "cpu",
        Device::Cuda(_) => "cuda",
        Device::Metal(_) => "metal",
    }
}

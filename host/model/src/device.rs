//! Choosing the compute device from the workflow's `device = "auto" | "cpu" | "cuda"`, and the one
//! conversion of the workflow's `dtype` into candle's and safetensors' dtypes.
//!
//! CUDA support is compiled in only with the `cuda` cargo feature (a CUDA binary does not even start on a
//! machine without the driver), so the default build is CPU-only and says so when asked for CUDA.

use anyhow::{bail, Result};
use candle_core::Device;
use dusflow_core::spec::{DType as WorkflowDType, DeviceChoice};

/// Whether this binary was built with CUDA support.
pub const CUDA_COMPILED: bool = cfg!(feature = "cuda");

/// The device for `choice`: `auto` takes CUDA when compiled in and a GPU answers, else the CPU (logged).
pub fn select_device(choice: DeviceChoice) -> Result<Device> {
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Cuda => {
            if !CUDA_COMPILED {
                bail!(
                    "the workflow asks for device = \"cuda\", but this dus was built without CUDA support; \
                     rebuild with `--features cuda` (see scripts/build-cuda.sh) or set device = \"auto\" or \"cpu\""
                );
            }
            cuda_device().map_err(|e| anyhow::anyhow!("device = \"cuda\": no usable GPU: {e}"))
        }
        DeviceChoice::Auto => {
            if !CUDA_COMPILED {
                tracing::info!("device = auto: this build has no CUDA support, using the CPU");
                return Ok(Device::Cpu);
            }
            match cuda_device() {
                Ok(d) => Ok(d),
                Err(e) => {
                    tracing::info!("device = auto: no usable GPU ({e}), using the CPU");
                    Ok(Device::Cpu)
                }
            }
        }
    }
}

/// The candle dtype of a workflow `dtype` (`f32`, `bf16`, `f16`).
pub fn candle_dtype(dtype: WorkflowDType) -> candle_core::DType {
    match dtype {
        WorkflowDType::F32 => candle_core::DType::F32,
        WorkflowDType::Bf16 => candle_core::DType::BF16,
        WorkflowDType::F16 => candle_core::DType::F16,
    }
}

/// The safetensors dtype of a workflow `dtype`.
pub fn safetensors_dtype(dtype: WorkflowDType) -> safetensors::Dtype {
    match dtype {
        WorkflowDType::F32 => safetensors::Dtype::F32,
        WorkflowDType::Bf16 => safetensors::Dtype::BF16,
        WorkflowDType::F16 => safetensors::Dtype::F16,
    }
}

fn cuda_device() -> candle_core::Result<Device> {
    Device::new_cuda(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_is_always_available_and_cuda_without_support_is_a_clear_error() {
        assert!(select_device(DeviceChoice::Cpu).unwrap().is_cpu());
        if !CUDA_COMPILED {
            assert!(select_device(DeviceChoice::Auto).unwrap().is_cpu());
            let err = select_device(DeviceChoice::Cuda).unwrap_err().to_string();
            assert!(err.contains("built without CUDA support"), "{err}");
        }
    }
}

//! Command-line options shared by the tools that run a model.

use anyhow::Result;
use candle_core::{DType, Device};
use optune_kernels::Kernels;

/// `--device`, `--dtype`, `--threads`: flatten into a tool's clap struct.
#[derive(Clone, Debug, clap::Args)]
pub struct RuntimeArgs {
    /// cpu, cuda or cuda:N [default: cuda when built with the cuda feature and a GPU is
    /// visible, else cpu]
    #[arg(long, value_name = "DEVICE")]
    pub device: Option<String>,

    /// f32, bf16 or f16 [default: f32 on cpu, bf16 on cuda]
    #[arg(long, value_name = "DTYPE")]
    pub dtype: Option<String>,

    /// CPU threads for the matrix kernels [default: RAYON_NUM_THREADS or all cores]
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,

    /// fused: CPU f32 work takes optune's fused training ops and host decode kernels; generic:
    /// candle's generic ops everywhere, the op graph a CUDA device runs (for testing that graph
    /// on the CPU) [default: OPTUNE_KERNELS, else fused]
    #[arg(long, value_name = "KERNELS", value_parser = ["fused", "generic"])]
    pub kernels: Option<String>,
}

impl RuntimeArgs {
    /// Sets up the numeric runtime (see [`optune_kernels::runtime::init`]) and returns the device and dtype.
    pub fn init(&self) -> Result<(Device, DType)> {
        let kernels = match &self.kernels {
            Some(name) => Some(name.parse().map_err(anyhow::Error::msg)?),
            None => Kernels::from_env().map_err(anyhow::Error::msg)?,
        };
        optune_kernels::set_kernels(kernels.unwrap_or(Kernels::Fused));
        optune_kernels::runtime::init(self.threads)?;
        let device = crate::runtime::device(self.device.as_deref())?;
        let dtype = crate::runtime::dtype(self.dtype.as_deref(), &device)?;
        Ok((device, dtype))
    }
}

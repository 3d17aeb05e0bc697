//! Command-line options shared by the tools that run a model.

use anyhow::Result;
use candle_core::{DType, Device};
use optune_kernels::Kernels;

/// `--device`, `--dtype`, `--threads`, `--kernels`, `--tf32`: flatten into a tool's clap struct.
#[derive(Clone, Debug, clap::Args)]
pub struct RuntimeArgs {
    /// cpu, cuda or cuda:N [default: cuda when built with the cuda feature and a GPU is
    /// visible, else cpu]
    #[arg(long, value_name = "DEVICE")]
    pub device: Option<String>,

    /// f32, bf16 or f16 [default: f32 on cpu, bf16 on cuda]. On an x86-64 CPU with AVX2 or
    /// AVX512-BF16 (fused kernels), bf16 keeps tensors in f32 and runs the matrix products with
    /// bf16 operands and f32 sums (AVX512-BF16's instruction, else AVX2's f32 multiply-adds on
    /// the widened operands); elsewhere, and with --kernels generic, it computes in bf16 tensors
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

    /// true: f32 matrix products on a CUDA device use TF32 tensor cores (inputs rounded to a
    /// 10-bit mantissa, f32 accumulation: several times faster, as PyTorch's
    /// allow_tf32); false: full f32 products. No effect on the CPU [default: true]
    #[arg(long, value_name = "BOOL")]
    pub tf32: Option<bool>,
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
        let mut dtype = crate::runtime::dtype(self.dtype.as_deref(), &device)?;
        if dtype == DType::BF16
            && optune_kernels::autograd_path(&device, DType::F32) == optune_kernels::Path::Fused
            && optune_kernels::bf16_products_available()
        {
            // bf16 on the CPU's fused path: f32 tensors, matrix products with bf16 operands and
            // f32 sums (vdpbf16ps, or AVX2's FMAs). Everything but the products stays in f32,
            // where this CPU has no faster form, and no bf16 tensor needs converting on its way
            // through the f32 kernels.
            optune_kernels::set_f32_product_precision(optune_kernels::ProductPrecision::Bf16)
                .map_err(anyhow::Error::msg)?;
            dtype = DType::F32;
        }
        if device.is_cuda() {
            // candle's switch for cuBLAS's f32 compute type (process-wide, off by default). A
            // build without the cuda feature has candle's stub of it, which does nothing.
            candle_core::cuda::set_gemm_reduced_precision_f32(self.tf32.unwrap_or(true));
        }
        Ok((device, dtype))
    }
}

#[cfg(test)]
mod tests {
    use super::RuntimeArgs;
    use clap::{CommandFactory, Parser};

    #[derive(Parser)]
    struct Tool {
        #[command(flatten)]
        runtime: RuntimeArgs,
    }

    #[test]
    fn tf32_takes_true_or_false_and_its_help_says_the_cpu_ignores_it() {
        let tf32 = |args: &[&str]| {
            Tool::try_parse_from([&["tool"], args].concat())
                .map(|t| t.runtime.tf32)
                .map_err(|e| e.kind())
        };
        assert_eq!(tf32(&[]), Ok(None));
        assert_eq!(tf32(&["--tf32", "false"]), Ok(Some(false)));
        assert_eq!(tf32(&["--tf32", "true"]), Ok(Some(true)));
        assert!(tf32(&["--tf32", "maybe"]).is_err());
        let help = Tool::command().render_long_help().to_string();
        assert!(help.contains("No effect on the CPU"), "{help}");
    }
}

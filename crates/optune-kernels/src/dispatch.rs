//! Which form of an op runs: the process setting, and the one rule (`path`) that applies it to a
//! device and dtype.

use candle_core::{DType, Device, Tensor};
use std::sync::atomic::{AtomicU8, Ordering};

/// The process-wide choice: `fused` (the default) lets CPU f32/f64 work take the fused and host
/// kernels; `generic` runs candle's generic ops everywhere, which is exactly the op graph a CUDA
/// device runs, so the CPU tests can exercise it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernels {
    Fused,
    Generic,
}

impl Kernels {
    pub fn name(self) -> &'static str {
        match self {
            Kernels::Fused => "fused",
            Kernels::Generic => "generic",
        }
    }

    /// `OPTUNE_KERNELS` as set in the environment (`None` when unset or empty).
    pub fn from_env() -> Result<Option<Kernels>, String> {
        match std::env::var("OPTUNE_KERNELS") {
            Ok(v) if v.is_empty() => Ok(None),
            Ok(v) => v
                .parse()
                .map(Some)
                .map_err(|e| format!("OPTUNE_KERNELS: {e}")),
            Err(_) => Ok(None),
        }
    }
}

impl std::str::FromStr for Kernels {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "fused" => Ok(Kernels::Fused),
            "generic" => Ok(Kernels::Generic),
            other => Err(format!(
                "unknown kernels {other:?}: expected fused or generic"
            )),
        }
    }
}

const UNSET: u8 = 0;
static SETTING: AtomicU8 = AtomicU8::new(UNSET);

fn encode(k: Kernels) -> u8 {
    match k {
        Kernels::Fused => 1,
        Kernels::Generic => 2,
    }
}

/// Sets the choice for the whole process (a tool's `--kernels`; benches timing both).
pub fn set_kernels(k: Kernels) {
    SETTING.store(encode(k), Ordering::Relaxed);
}

/// The current choice: what [`set_kernels`] set, else `OPTUNE_KERNELS`, else fused.
///
/// # Panics
/// When `OPTUNE_KERNELS` holds neither `fused` nor `generic` and nothing was set: the tools check
/// the variable with [`Kernels::from_env`] first and report it as an error.
pub fn kernels() -> Kernels {
    match SETTING.load(Ordering::Relaxed) {
        1 => Kernels::Fused,
        2 => Kernels::Generic,
        _ => {
            let k = Kernels::from_env()
                .unwrap_or_else(|e| panic!("{e}"))
                .unwrap_or(Kernels::Fused);
            set_kernels(k);
            k
        }
    }
}

/// How an op runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// The fused autograd ops (training) or host kernels (decoding).
    Fused,
    /// candle's generic ops.
    Generic,
}

impl Path {
    pub fn name(self) -> &'static str {
        match self {
            Path::Fused => "fused",
            Path::Generic => "generic",
        }
    }
}

/// The rule, the only place it is written ([`autograd_path`] and [`decode_path`] apply it): the
/// fused forms run on the CPU, in a dtype they are written for (`written_for`: f32 and f64 for
/// the autograd ops, f32 for the host decode kernels, and bf16 for both on CPUs with bf16
/// products: AVX512-BF16, or AVX2 and FMA), unless the process chose generic kernels.
/// Everything else, CUDA included, takes the generic ops. Asked for every op of every pass, so
/// it allocates nothing.
fn path(device: &Device, dtype: DType, written_for: &[DType]) -> Path {
    let has_form = written_for.contains(&dtype)
        || (dtype == DType::BF16 && crate::matmul::bf16_products_available());
    if kernels() == Kernels::Fused && device.is_cpu() && has_form {
        Path::Fused
    } else {
        Path::Generic
    }
}

/// Where the fused autograd ops (training, scoring, log-probs) run: the CPU in f32, f64 and, on
/// CPUs with bf16 products ([`crate::bf16_products`]), bf16; elsewhere candle's generic bf16.
pub fn autograd_path(device: &Device, dtype: DType) -> Path {
    path(device, dtype, &[DType::F32, DType::F64])
}

/// Where the host decode kernels (generation's step) run: the CPU in f32 and, on CPUs with bf16
/// products, bf16 (bf16 products, everything else in f32).
pub fn decode_path(device: &Device, dtype: DType) -> Path {
    path(device, dtype, &[DType::F32])
}

/// [`autograd_path`] for an op's inputs: fused only when they share the first input's device
/// and dtype (the fused ops do not convert).
pub fn path_for(inputs: &[&Tensor]) -> Path {
    let Some(first) = inputs.first() else {
        return Path::Generic;
    };
    let alike = inputs
        .iter()
        .all(|t| t.dtype() == first.dtype() && t.device().same_device(first.device()));
    match autograd_path(first.device(), first.dtype()) {
        Path::Fused if alike => Path::Fused,
        _ => Path::Generic,
    }
}

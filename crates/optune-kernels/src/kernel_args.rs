//! Our CUDA kernels' argument lists (src/cuda/*.cu). Each kernel has one function that builds its
//! list from buffer addresses and sizes; its CUDA launch passes that list to the driver, and its
//! emulated tests pass the same list to the kernel compiled for the CPU
//! (`optune-cuda-emulator`), which checks each argument's size and kind against the kernel's
//! parameter. So the tests cover the list the GPU gets, not a copy of it.

use candle_core::{bail, Result};

/// One argument of a kernel launch, in the kernel's parameter order.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum KernelArg {
    /// A buffer's address: on the device for a CUDA launch, on the host for the emulator.
    Pointer(u64),
    /// An `int`.
    I32(i32),
    /// A `uint64_t`.
    U64(u64),
    /// A `float`.
    F32(f32),
}

impl KernelArg {
    /// `n` as an `int` argument; an error naming `what` when it does not fit.
    pub(crate) fn int(n: usize, what: &str) -> Result<KernelArg> {
        match i32::try_from(n) {
            Ok(n) => Ok(KernelArg::I32(n)),
            Err(_) => bail!("{what} {n} exceeds the kernel's int"),
        }
    }
}

/// The emulator's form of `args`.
#[cfg(test)]
pub(crate) fn emulated(args: &[KernelArg]) -> Vec<optune_cuda_emulator::Arg> {
    use optune_cuda_emulator::Arg;
    args.iter()
        .map(|arg| match *arg {
            KernelArg::Pointer(address) => Arg::Pointer(address),
            KernelArg::I32(v) => Arg::I32(v),
            KernelArg::U64(v) => Arg::U64(v),
            KernelArg::F32(v) => Arg::F32(v),
        })
        .collect()
}

#[cfg(feature = "cuda")]
pub(crate) mod cuda {
    use super::KernelArg;
    use candle_core::cuda_backend::cudarc::driver::{LaunchArgs, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::WrapErr;
    use candle_core::Result;

    /// A one-dimensional launch of `(blocks, threads)`.
    pub(crate) fn config((blocks, threads): (u32, u32)) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// Launches the kernel of `builder` (a fresh `builder()` of its function) on `config` with
    /// `args`.
    ///
    /// # Safety
    /// `args` must be the kernel's list (its `kernel_args`), over device buffers that hold what
    /// the kernel reads and writes for those arguments, and stay alive and unwritten by others
    /// until the launch is done (their cudarc guards held past this call).
    pub(crate) unsafe fn launch<'a>(
        mut builder: LaunchArgs<'a>,
        config: LaunchConfig,
        args: &'a [KernelArg],
    ) -> Result<()> {
        for arg in args {
            match arg {
                KernelArg::Pointer(address) => builder.arg(address),
                KernelArg::I32(v) => builder.arg(v),
                KernelArg::U64(v) => builder.arg(v),
                KernelArg::F32(v) => builder.arg(v),
            };
        }
        // SAFETY: the caller's contract above: the list is the kernel's, over buffers of the
        // sizes it reads and writes.
        unsafe { builder.launch(config) }.w()?;
        Ok(())
    }
}

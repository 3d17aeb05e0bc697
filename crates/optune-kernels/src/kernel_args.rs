//! Our CUDA kernels' argument lists (src/cuda/*.cu). Each kernel has one function that builds its
//! list from buffer addresses and sizes; its CUDA launch passes that list to the driver, and its
//! emulated tests pass the same list to the kernel compiled for the CPU
//! (`optune-cuda-emulator`), which checks each argument's size and kind against the kernel's
//! parameter. So the tests cover the list the GPU gets, not a copy of it.

use candle_core::{bail, DType, Result, Tensor};

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

/// Whether our kernels take tensors of `dtype`: the three [`cuda::launch_new`] instantiates each
/// kernel for (`_f32`, `_bf16`, `_f16`), which every CPU form reads too.
pub(crate) fn kernel_dtype(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::BF16 | DType::F16)
}

/// An error naming `op` unless `tensors` share one [`kernel_dtype`].
pub(crate) fn check_kernel_dtypes(op: &str, tensors: &[&Tensor]) -> Result<()> {
    let dtype = tensors[0].dtype();
    if !kernel_dtype(dtype) || tensors.iter().any(|t| t.dtype() != dtype) {
        let dtypes: Vec<DType> = tensors.iter().map(|t| t.dtype()).collect();
        bail!("{op}: dtypes {dtypes:?}, expected one of f32, bf16, f16");
    }
    Ok(())
}

/// Threads of a block of the elementwise kernels (THREADS in their sources).
const ELEMENTWISE_THREADS: u32 = 256;

/// The CUDA launch of an elementwise kernel over `n` elements: blocks of 256 threads striding
/// over them, at most 8 blocks per 65,535; `(blocks, threads)`.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))] // the CUDA launches and the emulated tests
pub(crate) fn elementwise_launch(n: usize) -> (u32, u32) {
    (
        (n.div_ceil(ELEMENTWISE_THREADS as usize).min(65_535 * 8) as u32).max(1),
        ELEMENTWISE_THREADS,
    )
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
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{
        DevicePtr, DevicePtrMut, DeviceRepr, LaunchArgs, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{bail, CudaStorage, DType, Layout, Result};

    /// One of our PTX modules: its name in candle's cache of custom modules, and its text.
    #[derive(Clone, Copy)]
    pub(crate) struct Module {
        pub(crate) name: &'static str,
        pub(crate) ptx: &'static str,
    }

    /// Launches `{kernel}_{f32,bf16,f16}` of `module`, by the inputs' dtype, on
    /// `(blocks, threads)`: the inputs (contiguous, of one dtype) and a fresh output of
    /// `out_len` elements of that dtype, with the argument list `args` makes of their addresses
    /// (the inputs', the output's). The kernel must write every element of its output.
    pub(crate) fn launch_new<const N: usize>(
        module: Module,
        kernel: &str,
        inputs: [(&CudaStorage, &Layout); N],
        out_len: usize,
        dims: (u32, u32),
        args: impl Fn([u64; N], u64) -> Result<Vec<KernelArg>>,
    ) -> Result<CudaStorage> {
        fn run<T: CudaDType + DeviceRepr, const N: usize>(
            module: Module,
            name: &str,
            inputs: [(&CudaStorage, &Layout); N],
            out_len: usize,
            dims: (u32, u32),
            args: impl Fn([u64; N], u64) -> Result<Vec<KernelArg>>,
        ) -> Result<CudaStorage> {
            let device = inputs[0].0.device().clone();
            let stream = device.cuda_stream();
            let views = inputs
                .iter()
                .map(|(s, l)| Ok(s.as_cuda_slice::<T>()?.slice(l.start_offset()..)))
                .collect::<Result<Vec<_>>>()?;
            // SAFETY: the kernel writes every element of its output (this function's contract).
            let mut out = unsafe { device.alloc::<T>(out_len)? };
            let func = device.get_or_load_custom_func(name, module.name, module.ptx)?;
            {
                // The guards order the launch after the buffers' last writes and record it.
                let pointers: Vec<_> = views.iter().map(|v| v.device_ptr(&stream)).collect();
                let addresses: [u64; N] = std::array::from_fn(|i| pointers[i].0);
                let (out_at, _out_guard) = out.device_ptr_mut(&stream);
                let args = args(addresses, out_at)?;
                // SAFETY: the list is the kernel's (built by its `*_args`), over the inputs
                // (contiguous, of the sizes the callers checked) and an output of the size the
                // launch writes; the guards live to the end of this block.
                unsafe { launch(func.builder(), config(dims), &args) }?;
            }
            Ok(CudaStorage::wrap_cuda_slice(out, device))
        }

        let name = |suffix: &str| format!("{kernel}_{suffix}");
        match inputs[0].0.dtype() {
            DType::F32 => run::<f32, N>(module, &name("f32"), inputs, out_len, dims, args),
            DType::BF16 => run::<half::bf16, N>(module, &name("bf16"), inputs, out_len, dims, args),
            DType::F16 => run::<half::f16, N>(module, &name("f16"), inputs, out_len, dims, args),
            other => bail!("{kernel}: {other:?} on CUDA"),
        }
    }

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

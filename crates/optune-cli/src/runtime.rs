//! The runtime flags' meanings, and what the tools report about the process.

use anyhow::Result;

/// The device named by `--device`: `cpu`, `cuda` or `cuda:N`. Without a name: the first GPU when
/// the binary was built with the `cuda` feature and one is visible, else the CPU. A GPU comes
/// prepared for many small kernels (`gpu::prepare`).
///
/// A GPU's work all goes to one stream of its own, whichever thread issues it: candle's
/// `Device::new_cuda` would take CUDA's per-thread default stream, a different stream for each
/// host thread, and generation runs its steps on rayon's workers (`generate`'s `on_worker`), so
/// two steps, or the KV cache's zeroing on the main thread and the first step, would be ordered
/// by nothing.
pub fn device(spec: Option<&str>) -> Result<candle_core::Device> {
    use candle_core::Device;
    let device = match spec {
        None if candle_core::utils::cuda_is_available() => match Device::new_cuda_with_stream(0) {
            Ok(gpu) => gpu,
            Err(e) => {
                eprintln!(
                    "a GPU is visible but could not be opened ({e}): running on the CPU \
                         (--device cuda makes this an error)"
                );
                Device::Cpu
            }
        },
        None | Some("cpu") => Device::Cpu,
        Some("cuda") => {
            Device::new_cuda_with_stream(0).map_err(|e| anyhow::anyhow!("--device cuda: {e}"))?
        }
        Some(other) => {
            let ordinal = other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse::<usize>().ok())
                .ok_or_else(|| {
                    anyhow::anyhow!("--device '{other}': expected cpu, cuda or cuda:N")
                })?;
            Device::new_cuda_with_stream(ordinal)
                .map_err(|e| anyhow::anyhow!("--device {other}: {e}"))?
        }
    };
    #[cfg(feature = "cuda")]
    if let Device::Cuda(gpu) = &device {
        gpu::prepare(gpu)?;
    }
    Ok(device)
}

/// The dtype named by `--dtype`; by default f32 on the CPU and bf16 on a GPU.
pub fn dtype(spec: Option<&str>, device: &candle_core::Device) -> Result<candle_core::DType> {
    dtype_on(spec, device.is_cuda())
}

/// [`dtype`] for a device that is a GPU or not (one that need not be here).
pub fn dtype_on(spec: Option<&str>, cuda: bool) -> Result<candle_core::DType> {
    use candle_core::DType;
    match spec {
        None if cuda => Ok(DType::BF16),
        None | Some("f32") => Ok(DType::F32),
        Some("bf16") => Ok(DType::BF16),
        Some("f16") => Ok(DType::F16),
        Some(other) => anyhow::bail!("--dtype '{other}': expected f32, bf16 or f16"),
    }
}

/// The arithmetic a run computes in, as a journal or training state records it: the dtype, and
/// what [`crate::RuntimeArgs::init`] set beside it (bf16 products of f32 tensors on a CPU with
/// bf16 products, `--dtype bf16` there; TF32 products of f32 on a GPU, `--tf32`). A run resumed in
/// another precision would mix two in one output, so it is refused.
pub fn precision(device: &candle_core::Device, dtype: candle_core::DType) -> String {
    let name = format!("{dtype:?}").to_lowercase();
    if dtype != candle_core::DType::F32 {
        return name;
    }
    let products = match device.is_cuda() {
        true => candle_core::cuda::gemm_reduced_precision_f32().then_some("tf32"),
        false => (optune_kernels::f32_product_precision()
            == optune_kernels::ProductPrecision::Bf16)
            .then_some("bf16"),
    };
    match products {
        Some(products) => format!("{name} ({products} products)"),
        None => name,
    }
}

/// The share of a GPU's free memory a tool sizes its batches from by default (opt-gen's KV cache,
/// opt-score's passes), as vLLM's gpu_memory_utilization does with the whole: the rest is left to
/// cuBLAS's workspaces, the allocator's rounding and what the estimates leave out.
pub const GPU_MEMORY_SHARE: f64 = 0.9;

/// Bytes the device can still give: the CPU's `MemAvailable` (Linux), a GPU's free memory as its
/// driver reports it; `None` when it cannot be read.
pub fn available_memory(device: &candle_core::Device) -> Option<f64> {
    if device.is_cpu() {
        return proc_kb("/proc/meminfo", "MemAvailable").map(|kb| kb * 1024.0);
    }
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(gpu) = device {
        return gpu::free_bytes(gpu).ok().map(|free| free as f64);
    }
    None
}

/// What a GPU is set up with before its first tensor: candle runs thousands of small kernels
/// per decode or training step on one stream, each with a fresh output buffer, so what each
/// allocation costs on the host is a large part of a step.
#[cfg(feature = "cuda")]
mod gpu {
    use anyhow::{Context, Result};
    use candle_core::cuda::cudarc::driver::{result, sys, CudaContext};
    use candle_core::CudaDevice;

    /// 1. No event tracking: cudarc creates and destroys two CUDA events with every buffer so
    ///    that buffers can cross streams safely; all of a device's work goes to its one stream
    ///    (see [`super::device`]), so the events order nothing.
    /// 2. The stream-ordered pool keeps what it has reserved: `cuMemAllocAsync`'s pool has a
    ///    release threshold of 0 by default, which hands every freed buffer back to the driver
    ///    at each synchronisation (once per decode step, once per training step), so that the
    ///    next step maps its memory again; PyTorch's caching allocator keeps it the same way.
    ///    [`free_bytes`] counts what the pool holds unused as free.
    pub(super) fn prepare(gpu: &CudaDevice) -> Result<()> {
        // SAFETY: called before this device has made any buffer, and every buffer of it is used
        // on its one stream only (the stream `device` made for it, which every thread's work
        // goes to), which is the condition cudarc states for turning the tracking off. The one
        // crossing, opt-wdpo --devices copying gradients and weights between its replicas'
        // devices, synchronises the stream that wrote a buffer before another reads it, and the
        // reading stream before the buffer is freed (opt-wdpo's train.rs).
        unsafe { gpu.disable_event_tracking() };
        let Some(pool) = memory_pool(gpu.cuda_stream().context())? else {
            return Ok(());
        };
        let mut keep_everything = u64::MAX;
        // SAFETY: the pool is the device's current one, and the release threshold attribute takes
        // a pointer to a u64 (cuuint64_t).
        unsafe {
            result::mem_pool::set_attribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut keep_everything as *mut u64).cast(),
            )
        }
        .context("setting the CUDA memory pool's release threshold")?;
        Ok(())
    }

    /// The pool `cuMemAllocAsync` draws the device's buffers from (its current one), with the
    /// context bound to this thread; `None` where the device has no stream-ordered allocator.
    fn memory_pool(context: &CudaContext) -> Result<Option<sys::CUmemoryPool>> {
        if !context.has_async_alloc() {
            return Ok(None);
        }
        context.bind_to_thread()?;
        // SAFETY: the device comes from a live context, bound to this thread above.
        Ok(Some(unsafe {
            result::device::get_mem_pool(context.cu_device())?
        }))
    }

    /// The device's free memory with the pool's unused reserve handed back first (finished
    /// work only: the stream is synchronised), so that a buffer freed after loading counts as
    /// free, as it will be to the next allocation.
    pub(super) fn free_bytes(gpu: &CudaDevice) -> Result<usize> {
        let stream = gpu.cuda_stream();
        stream.synchronize()?;
        let context = stream.context();
        if let Some(pool) = memory_pool(context)? {
            // SAFETY: the pool is the device's current one; trimming releases only memory no
            // allocation holds.
            unsafe { result::mem_pool::trim_to(pool, 0)? };
        }
        let (free, _total) = context.mem_get_info()?;
        Ok(free)
    }
}

/// The process's peak resident memory so far in MB (`VmHWM` of /proc/self/status, Linux); `None`
/// elsewhere. The tools print it in their summary line.
pub fn peak_rss_mb() -> Option<f64> {
    proc_kb("/proc/self/status", "VmHWM").map(|kb| kb / 1024.0)
}

/// The number of a `Field:   1234 kB` line of a /proc file (Linux); `None` elsewhere.
fn proc_kb(path: &str, field: &str) -> Option<f64> {
    let text = std::fs::read_to_string(path).ok()?;
    let line = text.lines().find(|l| {
        l.strip_prefix(field)
            .is_some_and(|rest| rest.starts_with(':'))
    })?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_os = "linux")]
    fn the_cpu_has_some_memory_available() {
        let bytes = available_memory(&candle_core::Device::Cpu).expect("MemAvailable on Linux");
        // At least what this test holds, at most the machine's memory.
        let block = vec![1u8; 16 << 20];
        let total = proc_kb("/proc/meminfo", "MemTotal").expect("MemTotal on Linux") * 1024.0;
        assert!(
            bytes > block.len() as f64 && bytes <= total,
            "{bytes} of {total}"
        );
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn peak_rss_counts_touched_memory() {
        let block = vec![1u8; 64 << 20];
        let peak = peak_rss_mb().expect("VmHWM on Linux");
        assert!(peak >= 64.0, "peak {peak} MB after touching 64 MB");
        assert_eq!(block.iter().map(|&b| b as usize).sum::<usize>(), 64 << 20);
    }
}

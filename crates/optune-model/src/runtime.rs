//! Process-wide numeric setup that every binary which generates or trains calls first.
//!
//! Denormal floats make x86 matrix kernels up to ~10× slower (measured: a SmolLM2-135M backward
//! went from 37.9 s to 4.7 s); gradients near zero produce many of them. Flush-to-zero and
//! denormals-are-zero are per-thread CPU flags, so they are set on the calling thread and on
//! every worker of rayon's global pool, which candle's matrix multiplications run on.

use anyhow::Result;

/// Sets FTZ/DAZ on this thread.
pub fn flush_denormals_on_this_thread() {
    #[cfg(target_arch = "x86_64")]
    unsafe {
        // MXCSR bit 15 = flush-to-zero, bit 6 = denormals-are-zero.
        let mut csr: u32 = 0;
        std::arch::asm!("stmxcsr [{}]", in(reg) &mut csr, options(nostack));
        csr |= 0x8040;
        std::arch::asm!("ldmxcsr [{}]", in(reg) &csr, options(nostack));
    }
    #[cfg(target_arch = "aarch64")]
    unsafe {
        // FPCR bit 24 = flush-to-zero.
        let mut fpcr: u64;
        std::arch::asm!("mrs {}, fpcr", out(reg) fpcr);
        fpcr |= 1 << 24;
        std::arch::asm!("msr fpcr, {}", in(reg) fpcr);
    }
}

/// Whether this thread flushes denormals (always false on other architectures).
pub fn denormals_flushed_on_this_thread() -> bool {
    #[cfg(target_arch = "x86_64")]
    unsafe {
        let mut csr: u32 = 0;
        std::arch::asm!("stmxcsr [{}]", in(reg) &mut csr, options(nostack));
        csr & 0x8040 == 0x8040
    }
    #[cfg(target_arch = "aarch64")]
    unsafe {
        let fpcr: u64;
        std::arch::asm!("mrs {}, fpcr", out(reg) fpcr);
        fpcr & (1 << 24) != 0
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    false
}

/// Initialises the numeric runtime: FTZ/DAZ here and on every rayon worker, with `threads`
/// workers (default: rayon's choice, i.e. `RAYON_NUM_THREADS` or the core count). Safe to call
/// more than once; only the first call builds the pool.
///
/// candle 0.11 runs its elementwise ops (above 64K elements) on a second pool of its own: plain
/// threads, sized by `CANDLE_NUM_THREADS` (else the core count, whatever `threads` says), that
/// spin-wait between ops. Matrix products and optune's fused kernels run on rayon's pool, so those
/// spinning workers only compete with rayon's for the cores: a DPO step of the 12.9M llama on 2
/// busy cores took 1.86–5.7 s with one such worker and 1.51–2.7 s without. Unless
/// `CANDLE_NUM_THREADS` is set, that pool therefore gets no workers (its ops run on the calling
/// thread); the workers it does get flush denormals too.
pub fn init(threads: Option<usize>) -> Result<()> {
    flush_denormals_on_this_thread();
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // Before anything else runs: candle reads it once, when it first needs the pool.
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    let mut builder =
        rayon::ThreadPoolBuilder::new().start_handler(|_| flush_denormals_on_this_thread());
    if let Some(n) = threads {
        builder = builder.num_threads(n);
    }
    // An error here means the global pool already exists: it was built by an earlier call.
    let _ = builder.build_global();
    candle_core::utils::barrier_pool().execute(|_| flush_denormals_on_this_thread());
    Ok(())
}

/// The device named by `--device`: `cpu`, `cuda` or `cuda:N`. Without a name: the first GPU when
/// the binary was built with the `cuda` feature and one is visible, else the CPU.
pub fn device(spec: Option<&str>) -> Result<candle_core::Device> {
    use candle_core::Device;
    match spec {
        None if candle_core::utils::cuda_is_available() => {
            Ok(Device::new_cuda(0).unwrap_or(Device::Cpu))
        }
        None | Some("cpu") => Ok(Device::Cpu),
        Some("cuda") => Device::new_cuda(0).map_err(|e| anyhow::anyhow!("--device cuda: {e}")),
        Some(other) => {
            let ordinal = other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse::<usize>().ok())
                .ok_or_else(|| {
                    anyhow::anyhow!("--device '{other}': expected cpu, cuda or cuda:N")
                })?;
            Device::new_cuda(ordinal).map_err(|e| anyhow::anyhow!("--device {other}: {e}"))
        }
    }
}

/// The dtype named by `--dtype`; by default f32 on the CPU and bf16 on a GPU.
pub fn dtype(spec: Option<&str>, device: &candle_core::Device) -> Result<candle_core::DType> {
    use candle_core::DType;
    match spec {
        None if device.is_cuda() => Ok(DType::BF16),
        None | Some("f32") => Ok(DType::F32),
        Some("bf16") => Ok(DType::BF16),
        Some("f16") => Ok(DType::F16),
        Some(other) => anyhow::bail!("--dtype '{other}': expected f32, bf16 or f16"),
    }
}

/// The process's peak resident memory so far in MB (`VmHWM` of /proc/self/status, Linux); `None`
/// elsewhere. The tools print it in their summary line.
pub fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace()
        .nth(1)?
        .parse::<f64>()
        .ok()
        .map(|kb| kb / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_os = "linux")]
    fn peak_rss_counts_touched_memory() {
        let block = vec![1u8; 64 << 20];
        let peak = peak_rss_mb().expect("VmHWM on Linux");
        assert!(peak >= 64.0, "peak {peak} MB after touching 64 MB");
        assert_eq!(block.iter().map(|&b| b as usize).sum::<usize>(), 64 << 20);
    }

    #[test]
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    fn every_rayon_worker_flushes_denormals() {
        init(Some(2)).unwrap();
        assert!(denormals_flushed_on_this_thread());
        let flags = rayon::broadcast(|_| denormals_flushed_on_this_thread());
        assert!(!flags.is_empty());
        assert!(flags.iter().all(|&f| f), "workers without FTZ: {flags:?}");
        // And the flag really changes arithmetic: a denormal product flushes to zero.
        let tiny = std::hint::black_box(1e-30f32);
        let flushed =
            rayon::broadcast(|_| std::hint::black_box(tiny) * std::hint::black_box(1e-10f32));
        assert!(flushed.iter().all(|&x| x == 0.0), "{flushed:?}");
        // candle's own elementwise pool: every thread that runs its work flushes too.
        let pool_flags = std::sync::Mutex::new(Vec::new());
        candle_core::utils::barrier_pool().execute(|_| {
            pool_flags
                .lock()
                .unwrap()
                .push(denormals_flushed_on_this_thread())
        });
        let pool_flags = pool_flags.into_inner().unwrap();
        assert!(
            !pool_flags.is_empty() && pool_flags.iter().all(|&f| f),
            "candle pool threads without FTZ: {pool_flags:?}"
        );
    }
}

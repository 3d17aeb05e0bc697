//! Process-wide numeric setup that every binary which generates or trains calls first.
//!
//! Denormal floats make x86 matrix kernels up to ~10× slower (measured: a SmolLM2-135M backward
//! went from 37.9 s to 4.7 s); gradients near zero produce many of them. Flush-to-zero and
//! denormals-are-zero are per-thread CPU flags, so they are set on the calling thread and on
//! every worker of rayon's global pool, which candle's matrix multiplications run on.

use anyhow::Result;

/// Sets FTZ/DAZ on this thread.
pub fn flush_denormals_on_this_thread() {
    // SAFETY: reads and writes this thread's MXCSR register only; setting FTZ/DAZ changes how
    // denormals round, nothing else.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        // MXCSR bit 15 = flush-to-zero, bit 6 = denormals-are-zero.
        let mut csr: u32 = 0;
        std::arch::asm!("stmxcsr [{}]", in(reg) &mut csr, options(nostack));
        csr |= 0x8040;
        std::arch::asm!("ldmxcsr [{}]", in(reg) &csr, options(nostack));
    }
    // SAFETY: as above, this thread's FPCR register.
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
    // SAFETY: only stores this thread's MXCSR register into a local.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        let mut csr: u32 = 0;
        std::arch::asm!("stmxcsr [{}]", in(reg) &mut csr, options(nostack));
        csr & 0x8040 == 0x8040
    }
    // SAFETY: only reads this thread's FPCR register into a local.
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
/// thread); the workers it does get flush denormals too. `RAYON_NUM_THREADS`, unless set, is set
/// to the pool's size, for candle's matrix products (below).
pub fn init(threads: Option<usize>) -> Result<()> {
    flush_denormals_on_this_thread();
    keep_freed_memory_for_reuse();
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
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        // candle's CPU matrix product asks for its thread count on every call: this variable,
        // else the physical core count, which the num_cpus crate finds by reading and parsing
        // /proc/cpuinfo each time (~0.4 ms of a 0.5 ms decode step of a 2-layer model on the
        // generic path). The pool's own size is the right count anyway.
        std::env::set_var(
            "RAYON_NUM_THREADS",
            rayon::current_num_threads().to_string(),
        );
    }
    candle_core::utils::barrier_pool().execute(|_| flush_denormals_on_this_thread());
    Ok(())
}

/// A training or decode step allocates and frees the same large buffers (activations, packed
/// operands, gradients) every time. glibc serves blocks above its mmap threshold (128 KiB, rising
/// to at most 32 MiB as it sees them freed) from fresh mappings and returns heap tops above its
/// trim threshold, so each step faults its buffers in again, zeroed by the kernel: ~12 % of a
/// SmolLM2 step's samples. The largest threshold glibc allows and no trimming keep them in the
/// heap instead; the peak RSS stays what the step needs.
fn keep_freed_memory_for_reuse() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before the tools allocate much.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

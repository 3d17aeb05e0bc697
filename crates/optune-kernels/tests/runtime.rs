//! The numeric runtime in a process of its own: rayon's global pool must be built by `init`
//! before anything else uses it, which a test binary shared with other tests cannot promise.

use optune_kernels::runtime::{denormals_flushed_on_this_thread, init};

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
    let flushed = rayon::broadcast(|_| std::hint::black_box(tiny) * std::hint::black_box(1e-10f32));
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

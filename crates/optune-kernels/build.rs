//! With the `cuda` feature: compiles this crate's own CUDA kernels (src/cuda/*.cu) to PTX with the
//! nvcc on PATH (or $NVCC), for the GPU architecture in $CUDA_COMPUTE_CAP (default 90: H100/H200),
//! as candle's own kernels are built (scripts/build-cuda.sh sets both). Without it: nothing.

use std::path::PathBuf;
use std::process::Command;

const KERNELS: [&str; 7] = [
    "cache_write",
    "cached_attention",
    "dropout",
    "forward_only",
    "norm_backward",
    "optimizer",
    "sampling",
];

fn main() {
    println!("cargo:rerun-if-env-changed=CARGO_FEATURE_CUDA");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=NVCC_CCBIN");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".to_string());
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".to_string());
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    // The storage-type helpers every kernel includes, and the KV cache's addressing.
    println!("cargo:rerun-if-changed=src/cuda/dtypes.cuh");
    println!("cargo:rerun-if-changed=src/cuda/kv_blocks.cuh");
    for kernel in KERNELS {
        let source = format!("src/cuda/{kernel}.cu");
        println!("cargo:rerun-if-changed={source}");
        let ptx = out.join(format!("{kernel}.ptx"));
        let mut command = Command::new(&nvcc);
        command
            .args(["--ptx", "-O3", "--use_fast_math", "-std=c++17"])
            .arg(format!("-arch=compute_{cap}"))
            .arg("-o")
            .arg(&ptx)
            .arg(&source);
        if let Ok(ccbin) = std::env::var("NVCC_CCBIN") {
            command.args(["-ccbin", &ccbin]);
        }
        let status = command.status().unwrap_or_else(|e| {
            panic!(
                "running {nvcc} for {source} (the cuda feature needs nvcc on PATH or $NVCC): {e}"
            )
        });
        assert!(status.success(), "{nvcc} failed on {source}");
    }
}

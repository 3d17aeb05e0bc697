//! Compiles the emulator (emulator/*.cpp) and, through it, the CUDA kernel sources of
//! optune-kernels (src/cuda/*.cu) with the host's C++ compiler, without contraction into fused
//! multiply-adds so that the kernels' IEEE intrinsics round as on the GPU.

fn main() {
    let kernels = "../optune-kernels/src/cuda";
    let sources = [
        "emulator",
        "selftest",
        "cache_write",
        "cached_attention",
        "dropout",
        "forward_only",
        "norm_backward",
        "sampling",
        "optimizer",
    ];
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .flag("-std=c++17")
        .include("emulator/include")
        .include("emulator")
        .include(kernels)
        // nvcc puts the CUDA runtime's declarations before every source, whatever it includes.
        .flag("-include")
        .flag("emulator/emulator.h")
        .flag("-ffp-contract=off")
        .warnings(true)
        // `#pragma unroll` is nvcc's; the kernels' signatures are shared by kinds that do not
        // read every scalar.
        .flag("-Wno-unknown-pragmas")
        .flag("-Wno-unused-parameter");
    for source in sources {
        build.file(format!("emulator/{source}.cpp"));
    }
    build.compile("optune_cuda_emulator");
    println!("cargo:rerun-if-changed=emulator");
    println!("cargo:rerun-if-changed={kernels}");
}

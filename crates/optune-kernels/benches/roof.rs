//! This machine's matrix-product roofs through our kernels: f32 by `gemm` (the fused ops' f32
//! products) and bf16 by [`optune_kernels::matmul_bf16`], on the shapes of a SmolLM2-135M
//! training step (~700 tokens: the projections, the MLP, the vocabulary head in chunks of 256
//! rows, each in its forward and both backward layouts). Prints GFLOP/s per shape and the
//! best; `--json FILE` also writes them for `scripts/bench/roof.py`, which times torch on the
//! same shapes in the same run (`make bench-roof`).
//!
//! `cargo bench -p optune-kernels --bench roof [-- --threads N] [--json FILE] [--shape M,N,K]...`
//! (`--shape`, repeated: those shapes instead, as the other benches measure their runs' roofs).

use optune_kernels::{bf16_products_available, matmul_bf16, Mat};
use std::time::Instant;

/// (name, m, n, k) of `[m, k] · [k, n]`.
const SHAPES: &[(&str, usize, usize, usize)] = &[
    ("q/o proj fwd", 704, 576, 576),
    ("mlp up fwd", 704, 1536, 576),
    ("mlp down fwd", 704, 576, 1536),
    ("mlp up dx", 704, 576, 1536),
    ("mlp up dW", 1536, 576, 704),
    ("head fwd (256 rows)", 256, 49152, 576),
    ("head dx (256 rows)", 256, 576, 49152),
    ("decode mlp up, batch 32", 32, 1536, 576),
    ("kernel alone, packing amortised", 96, 768, 8192),
];

fn seconds(mut f: impl FnMut()) -> f64 {
    f();
    let mut best = f64::INFINITY;
    let start = Instant::now();
    while start.elapsed().as_secs_f64() < 0.6 {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed().as_secs_f64());
    }
    best
}

fn gemm_f32(m: usize, n: usize, k: usize, a: &[f32], b: &[f32], c: &mut [f32]) {
    let threads = rayon::current_num_threads();
    // SAFETY: a, b, c hold m × k, k × n and m × n row-major floats.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            1,
            n as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(threads),
        )
    }
}

/// The value after `--name` on the command line.
fn option(name: &str) -> Option<String> {
    std::env::args().skip_while(|a| a != name).nth(1)
}

fn main() {
    let threads = option("--threads")
        .and_then(|t| t.parse().ok())
        .unwrap_or(2);
    let mut json = Vec::new();
    optune_kernels::runtime::init(Some(threads)).expect("thread pool");
    let bf16 = bf16_products_available();
    let args: Vec<String> = std::env::args().collect();
    let asked: Vec<(String, usize, usize, usize)> = args
        .windows(2)
        .filter(|w| w[0] == "--shape")
        .map(|w| {
            let dims: Vec<usize> = w[1]
                .split(',')
                .map(|d| d.parse().expect("--shape M,N,K: three integers"))
                .collect();
            let [m, n, k] = dims[..] else {
                panic!("--shape M,N,K: three integers, got {}", w[1])
            };
            (format!("{m}x{k} by {k}x{n}"), m, n, k)
        })
        .collect();
    let shapes: Vec<(String, usize, usize, usize)> = match asked.is_empty() {
        true => SHAPES
            .iter()
            .map(|&(name, m, n, k)| (name.to_string(), m, n, k))
            .collect(),
        false => asked,
    };
    let form = optune_kernels::bf16_products().map_or("none", |f| f.name());
    println!("threads={threads} bf16_products={form}");
    println!("| shape | m | n | k | f32 GFLOP/s | bf16 GFLOP/s | bf16 / f32 |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let (mut best32, mut best16) = (0f64, 0f64);
    for (name, m, n, k) in shapes {
        let a: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
            .collect();
        let b: Vec<f32> = (0..k * n)
            .map(|i| ((i * 104729) % 1000) as f32 / 1000.0 - 0.5)
            .collect();
        let a16: Vec<half::bf16> = a.iter().map(|&x| half::bf16::from_f32(x)).collect();
        let b16: Vec<half::bf16> = b.iter().map(|&x| half::bf16::from_f32(x)).collect();
        let mut c = vec![0f32; m * n];
        let flops = 2.0 * (m * n * k) as f64;
        let f32_rate = flops / seconds(|| gemm_f32(m, n, k, &a, &b, &mut c)) / 1e9;
        best32 = best32.max(f32_rate);
        let bf16_rate = if bf16 {
            let s = seconds(|| {
                matmul_bf16(
                    m,
                    n,
                    k,
                    &mut c,
                    false,
                    Mat::rows(&a16, k),
                    Mat::rows(&b16, n),
                )
            });
            flops / s / 1e9
        } else {
            f64::NAN
        };
        best16 = best16.max(bf16_rate);
        println!(
            "| {name} | {m} | {n} | {k} | {f32_rate:.0} | {bf16_rate:.0} | {:.2}× |",
            bf16_rate / f32_rate
        );
        json.push(format!(
            r#"{{"shape": "{name}", "m": {m}, "n": {n}, "k": {k}, "f32": {f32_rate:.1}, "bf16": {}}}"#,
            if bf16_rate.is_nan() { "null".into() } else { format!("{bf16_rate:.1}") }
        ));
    }
    println!("best: f32 {best32:.0} GFLOP/s, bf16 {best16:.0} GFLOP/s");
    if let Some(path) = option("--json") {
        std::fs::write(&path, json.join("\n") + "\n").expect("writing --json");
    }
}

//! One AdamW step over 135M f32 parameters (30 tensors of 4.5M elements, the size of
//! SmolLM2-135M): optune's fused in-place optimiser against `candle_nn::AdamW`, plus the cost of
//! clipping the gradients. Run with `cargo bench -p optune-train --bench optim`.

use std::time::{Duration, Instant};

use anyhow::Result;
use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};
use candle_nn::Optimizer as _;
use optune_train::optim::{clip_grad_norm, AdamW, Algorithm, Optimizer, ParamGroup};

const TENSORS: usize = 30;
const ELEMENTS_PER_TENSOR: usize = 4_500_000;
const LR: f64 = 1e-4;
const WEIGHT_DECAY: f64 = 0.01;

struct Timing {
    first: Duration,
    steady: Vec<Duration>,
}

impl Timing {
    fn median(&self) -> Duration {
        let mut sorted = self.steady.clone();
        sorted.sort();
        sorted[sorted.len() / 2]
    }
}

/// The first run is reported apart: it pays for allocating and faulting in the moment buffers.
fn time(steady_runs: usize, mut run: impl FnMut() -> Result<()>) -> Result<Timing> {
    let mut timed = || -> Result<Duration> {
        let start = Instant::now();
        run()?;
        Ok(start.elapsed())
    };
    let first = timed()?;
    let steady = (0..steady_runs).map(|_| timed()).collect::<Result<_>>()?;
    Ok(Timing { first, steady })
}

fn main() -> Result<()> {
    let device = Device::Cpu;
    let vars = (0..TENSORS)
        .map(|_| Var::randn(0f32, 0.02, ELEMENTS_PER_TENSOR, &device))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let mut grads = GradStore::default();
    for var in &vars {
        grads.insert(
            var.as_tensor(),
            Tensor::randn(0f32, 1e-3, ELEMENTS_PER_TENSOR, &device)?,
        );
    }
    let params = TENSORS * ELEMENTS_PER_TENSOR;
    println!(
        "AdamW step over {params} f32 parameters ({TENSORS} tensors x {ELEMENTS_PER_TENSOR}), {} rayon threads",
        rayon::current_num_threads()
    );

    let named = vars
        .iter()
        .enumerate()
        .map(|(i, var)| (format!("p{i}"), var.clone()))
        .collect();
    let groups = vec![ParamGroup {
        params: named,
        weight_decay: WEIGHT_DECAY,
    }];
    let mut ours = Optimizer::new(groups, Algorithm::AdamW(AdamW::default()), LR)?;
    let ours_timing = time(5, || ours.step(&grads))?;
    drop(ours);

    let clip_timing = time(5, || clip_grad_norm(&mut grads, &vars, 1e-3).map(drop))?;

    let config = candle_nn::ParamsAdamW {
        lr: LR,
        weight_decay: WEIGHT_DECAY,
        ..Default::default()
    };
    let mut candle = candle_nn::AdamW::new(vars.clone(), config)?;
    let candle_timing = time(2, || Ok(candle.step(&grads)?))?;

    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!("| what | first step (ms) | later steps, median (ms) | candle_nn::AdamW / this |");
    println!("|---|---:|---:|---:|");
    let rows = [
        ("candle_nn::AdamW", &candle_timing),
        ("optune AdamW (fused, in place)", &ours_timing),
        ("optune clip_grad_norm (scales in place)", &clip_timing),
    ];
    for (name, timing) in rows {
        println!(
            "| {name} | {:.1} | {:.1} | {:.1}x |",
            ms(timing.first),
            ms(timing.median()),
            ms(candle_timing.median()) / ms(timing.median())
        );
    }
    Ok(())
}

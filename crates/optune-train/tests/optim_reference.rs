//! Replays the torch trajectories in testdata/reference/optim.json (written by
//! scripts/reference/optim_reference.py) through optune's optimisers, schedules and clipping.
//! `f32` parameters take the fused CPU path; `f64` parameters the device path (moments in one
//! tensor, updated by the two in-place ops a GPU runs as kernels, on an f32 copy written back).

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use optune_train::optim::{clip_grad_norm, Algorithm, Decay, Optimizer, ParamGroup, Schedule};
use serde::Deserialize;

/// The committed reference values (their `generator` field names the script that made them).
fn reference_path() -> std::path::PathBuf {
    optune_testkit::workspace_root().join("testdata/reference/optim.json")
}

const TOLERANCE: f64 = 1e-6;

#[derive(Deserialize)]
struct Reference {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    algorithm: Algorithm,
    lr: f64,
    schedule: Option<ScheduleSpec>,
    max_grad_norm: Option<f64>,
    params: Vec<InitialParam>,
    steps: Vec<Step>,
}

#[derive(Deserialize)]
struct ScheduleSpec {
    decay: Decay,
    warmup_steps: u64,
    total_steps: u64,
}

#[derive(Deserialize)]
struct InitialParam {
    name: String,
    shape: Vec<usize>,
    weight_decay: f64,
    values: Vec<f64>,
}

#[derive(Deserialize)]
struct Step {
    lr: f64,
    grads: BTreeMap<String, Vec<f64>>,
    grad_norm: Option<f64>,
    params: BTreeMap<String, Vec<f64>>,
}

fn relative_error(actual: f64, expected: f64) -> f64 {
    if actual == expected {
        0.0
    } else {
        (actual - expected).abs() / expected.abs()
    }
}

/// Worst relative error over a replay of `case` with parameters of `dtype`.
fn replay(case: &Case, dtype: DType) -> f64 {
    let context = format!("{} ({dtype:?})", case.name);
    let device = Device::Cpu;
    // torch ran in f32: start from the same f32 values whatever the parameter dtype.
    let tensor = |values: &[f64], shape: &[usize]| {
        let values: Vec<f32> = values.iter().map(|&x| x as f32).collect();
        Tensor::from_vec(values, shape, &device)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    };
    let vars: Vec<(&InitialParam, Var)> = case
        .params
        .iter()
        .map(|p| (p, Var::from_tensor(&tensor(&p.values, &p.shape)).unwrap()))
        .collect();
    let groups = vars
        .iter()
        .map(|(p, var)| ParamGroup {
            params: vec![(p.name.clone(), var.clone())],
            weight_decay: p.weight_decay,
        })
        .collect();
    let mut optimizer = Optimizer::new(groups, case.algorithm, case.lr).unwrap();
    let schedule = case.schedule.as_ref().map(|s| Schedule {
        peak_lr: case.lr,
        warmup_steps: s.warmup_steps,
        total_steps: s.total_steps,
        decay: s.decay,
    });

    let mut worst = 0.0f64;
    for (index, step) in case.steps.iter().enumerate() {
        let lr = schedule.map_or(case.lr, |s| s.lr_at(optimizer.step_count()));
        assert!(
            relative_error(lr, step.lr) < 1e-12,
            "{context} step {index}: lr {lr}, torch {}",
            step.lr
        );
        optimizer.set_lr(lr);

        let mut grads = GradStore::default();
        for (p, var) in &vars {
            grads.insert(var.as_tensor(), tensor(&step.grads[&p.name], &p.shape));
        }
        if let Some(max_norm) = case.max_grad_norm {
            let norm =
                clip_grad_norm(&mut grads, vars.iter().map(|(_, var)| var), max_norm).unwrap();
            let expected = step.grad_norm.unwrap();
            let err = relative_error(norm.into(), expected);
            assert!(
                err <= TOLERANCE,
                "{context} step {index}: grad norm {norm}, torch {expected}"
            );
        }
        optimizer.step(&grads).unwrap();

        for (p, var) in &vars {
            let actual = var
                .flatten_all()
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            for (i, (&a, &e)) in actual.iter().zip(&step.params[&p.name]).enumerate() {
                // Both sides computed in f32; rounding to f32 also removes the last-bit noise of
                // serde_json's float parsing, so an error of 0 means bit-identical to torch.
                let err = relative_error(f64::from(a as f32), f64::from(e as f32));
                assert!(
                    err <= TOLERANCE,
                    "{context} step {index}: {}[{i}] = {a}, torch {e} (rel err {err:e})",
                    p.name
                );
                worst = worst.max(err);
            }
        }
    }
    worst
}

#[test]
fn optimizers_match_torch() {
    let text =
        std::fs::read_to_string(reference_path()).expect("reading testdata/reference/optim.json");
    let reference: Reference = serde_json::from_str(&text).unwrap();
    assert!(!reference.cases.is_empty());
    for case in &reference.cases {
        for dtype in [DType::F32, DType::F64] {
            let worst = replay(case, dtype);
            println!(
                "{} ({dtype:?}): worst relative error {worst:.2e}",
                case.name
            );
        }
    }
}

//! What the fused ops' tests share: deterministic inputs, finite differences, and the
//! comparison with the generic ops; and the tests across ops.

use super::*;
use candle_core::{Device, Var};
use rand::{Rng, SeedableRng};

/// The elements of `t`, as f32, in row-major order.
pub fn f32_elements(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Deterministic normal-ish values (uniform sums) `[shape]` in `dtype`.
pub fn values(shape: &[usize], seed: u64, scale: f64, dtype: DType) -> Tensor {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n)
        .map(|_| scale * (rng.random::<f64>() + rng.random::<f64>() - 1.0) * 1.7)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// [`finite_differences`] of `Σ w · op(inputs)` with fixed random weights `w` (drawn from
/// `seed`), so that every output element's gradient is checked.
pub fn weighted_finite_differences(
    inputs: &[Tensor],
    check: &[usize],
    seed: u64,
    op: impl Fn(&[Tensor]) -> Tensor,
) -> f64 {
    let w = values(op(inputs).dims(), seed, 1.0, DType::F64);
    finite_differences(inputs, check, |t| (op(t) * &w).unwrap().sum_all().unwrap())
}

/// Autograd gradients of `f(inputs)` (a scalar) for each input in `check`, against central
/// finite differences in f64 on every element. Returns the largest relative error.
pub fn finite_differences(
    inputs: &[Tensor],
    check: &[usize],
    f: impl Fn(&[Tensor]) -> Tensor,
) -> f64 {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let grads = f(&tensors).backward().unwrap();
    let mut worst = 0f64;
    for &i in check {
        let grad: Vec<f64> = grads
            .get(&tensors[i])
            .expect("a gradient")
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let original: Vec<f64> = inputs[i].flatten_all().unwrap().to_vec1().unwrap();
        for j in 0..original.len() {
            let at = |delta: f64| {
                let mut moved = inputs.to_vec();
                let mut v = original.clone();
                v[j] += delta;
                moved[i] = Tensor::from_vec(v, inputs[i].shape(), &Device::Cpu).unwrap();
                f(&moved).to_scalar::<f64>().unwrap()
            };
            let eps = 1e-6;
            let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
            let err = (grad[j] - numeric).abs() / numeric.abs().max(grad[j].abs()).max(1e-3);
            assert!(
                err < 1e-6,
                "input {i}[{j}]: autograd {} vs finite difference {numeric}",
                grad[j]
            );
            worst = worst.max(err);
        }
    }
    worst
}

/// Largest |a − b| / max(|b|, floor) over two tensors of one shape.
pub fn max_rel_diff(a: &Tensor, b: &Tensor, floor: f64) -> f64 {
    assert_eq!(a.dims(), b.dims());
    let a: Vec<f64> = a
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let b: Vec<f64> = b
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs() / y.abs().max(floor))
        .fold(0.0, f64::max)
}

/// Values and input gradients of `f(inputs)` reduced to a scalar by a fixed weighted sum.
fn values_and_grads(
    inputs: &[Tensor],
    f: &dyn Fn(&[Tensor]) -> Tensor,
) -> (Tensor, Vec<Option<Tensor>>) {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let out = f(&tensors);
    let weights = values(out.dims(), 99, 1.0, out.dtype());
    let grads = (&out * weights)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    (out, tensors.iter().map(|t| grads.get(t).cloned()).collect())
}

/// The fused op is as close to the truth (the generic ops in f64 on the same inputs) as the
/// generic ops are, within `slack`×, in value and every input's gradient (errors relative to
/// each tensor's largest magnitude): in f32, and in bf16 where the CPU has bf16 products.
pub fn compare_with_generic(
    inputs: &[Tensor],
    slack: f64,
    fused: impl Fn(&[Tensor]) -> Tensor,
    generic: impl Fn(&[Tensor]) -> Tensor,
) {
    compare_with_generic_in(DType::F32, inputs, slack, &fused, &generic);
    if crate::matmul::bf16_products_available() {
        compare_with_generic_in(DType::BF16, inputs, slack, &fused, &generic);
    }
}

fn compare_with_generic_in(
    dtype: DType,
    inputs: &[Tensor],
    slack: f64,
    fused: &impl Fn(&[Tensor]) -> Tensor,
    generic: &impl Fn(&[Tensor]) -> Tensor,
) {
    let cast: Vec<Tensor> = inputs.iter().map(|t| t.to_dtype(dtype).unwrap()).collect();
    let f64s: Vec<Tensor> = cast
        .iter()
        .map(|t| t.to_dtype(DType::F64).unwrap())
        .collect();
    let (truth, truth_grads) = values_and_grads(&f64s, generic);
    let (ours, our_grads) = values_and_grads(&cast, fused);
    let (theirs, their_grads) = values_and_grads(&cast, generic);
    let scale = |t: &Tensor| {
        t.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
            .max(1e-30)
    };
    let err = |a: &Tensor, truth: &Tensor| max_rel_diff(a, truth, scale(truth));
    let check = |what: String, a: &Tensor, b: &Tensor, truth: &Tensor| {
        let (ea, eb) = (err(a, truth), err(b, truth));
        assert!(
            ea <= slack * eb.max(1e-7),
            "{what}: fused {dtype:?} error {ea:e}, generic {dtype:?} error {eb:e}"
        );
    };
    check("values".into(), &ours, &theirs, &truth);
    for (i, truth) in truth_grads.iter().enumerate() {
        match (&our_grads[i], &their_grads[i], truth) {
            (Some(a), Some(b), Some(t)) => check(format!("gradient of input {i}"), a, b, t),
            (None, None, None) => {}
            (a, _, t) => panic!(
                "input {i}: fused has a gradient: {}, generic: {}",
                a.is_some(),
                t.is_some()
            ),
        }
    }
}

/// With the second input frozen (a plain tensor, as LoRA's base weights are), the op gives it
/// no gradient and the first input's gradient is the one the trainable case gives.
pub fn frozen_second_input_gets_no_gradient(
    x: &Tensor,
    w: &Tensor,
    f: impl Fn(&Tensor, &Tensor) -> Tensor,
) {
    let (xv, wv) = (Var::from_tensor(x).unwrap(), Var::from_tensor(w).unwrap());
    let both = f(xv.as_tensor(), wv.as_tensor())
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let frozen = f(xv.as_tensor(), w).sum_all().unwrap().backward().unwrap();
    assert!(frozen.get(w).is_none());
    let (a, b) = (
        both.get(xv.as_tensor()).unwrap(),
        frozen.get(xv.as_tensor()).unwrap(),
    );
    assert_eq!(
        a.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
        b.flatten_all().unwrap().to_vec1::<f64>().unwrap()
    );
    // Nothing to differentiate: no gradient at all.
    assert!(f(x, w)
        .sum_all()
        .unwrap()
        .backward()
        .unwrap()
        .get(x)
        .is_none());
}

#[test]
fn frozen_weights_get_no_gradient() {
    let x = values(&[2, 3, 5], 80, 1.0, DType::F64);
    let w = values(&[4, 5], 81, 1.0, DType::F64);
    frozen_second_input_gets_no_gradient(&x, &w, |x, w| linear(x, w).unwrap());
    let rows = values(&[7, 6], 82, 1.0, DType::F64);
    let head = values(&[11, 6], 83, 1.0, DType::F64);
    let targets = [0u32, 3, 10, 5, 5, 1, 9];
    frozen_second_input_gets_no_gradient(&rows, &head, |r, h| {
        token_logprobs(r, h, &targets, 3).unwrap()
    });
}

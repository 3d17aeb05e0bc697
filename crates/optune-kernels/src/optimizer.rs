//! One optimiser step of one parameter, element by element: the arithmetic that optune-train's
//! AdamW and RMSprop apply, defined once here for the CPU's fused pass and for the two in-place
//! ops that update a parameter where it lives ([`update_in_place`]; on CUDA two kernel launches,
//! src/cuda/optimizer.cu, instead of a dozen tensor ops each allocating a parameter-sized
//! temporary).
//!
//! Every line mirrors one torch tensor op in torch's order, in f32, so results match
//! `torch.optim` to rounding; the scalars come rounded from f64 as torch rounds Python floats.

use crate::kernel_args::KernelArg;
use crate::storage::{contiguous, contiguous_f32_mut};
use candle_core::{bail, CpuStorage, InplaceOp3, Layout, Result, Tensor};

/// The scalars of one parameter's update at one step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum StepRule {
    AdamW(AdamWStep),
    RmsProp(RmsPropStep),
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWStep {
    /// `1 - lr * wd`: decoupled weight decay (exactly 1 without decay).
    pub decay_factor: f32,
    /// `1 - beta1`, the `lerp` weight torch uses for the first moment.
    pub avg_weight: f32,
    pub beta2: f32,
    /// `1 - beta2`.
    pub sq_weight: f32,
    pub bias_correction2_sqrt: f32,
    pub eps: f32,
    /// `-lr / (1 - beta1^t)`.
    pub neg_step_size: f32,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RmsPropStep {
    pub weight_decay: f32,
    pub alpha: f32,
    /// `1 - alpha`.
    pub sq_weight: f32,
    pub eps: f32,
    /// With momentum, the second moment buffer is the momentum buffer.
    pub momentum: f32,
    pub neg_lr: f32,
}

impl StepRule {
    /// Moment buffers this rule keeps: 2 for AdamW (`exp_avg`, `exp_avg_sq`), 1 or 2 for
    /// RMSprop (`square_avg`, then `momentum_buffer` with momentum).
    pub fn buffers(&self) -> usize {
        match self {
            StepRule::AdamW(_) => 2,
            StepRule::RmsProp(s) if s.momentum != 0.0 => 2,
            StepRule::RmsProp(_) => 1,
        }
    }

    /// Updates the moments `m` (this element of each buffer, as many as
    /// [`StepRule::buffers`]) from parameter `p` (before its update) and gradient `g`.
    #[inline(always)]
    pub fn update_moments(&self, p: f32, g: f32, m: &mut [f32]) {
        match (self, m) {
            (StepRule::AdamW(s), [exp_avg, exp_avg_sq]) => s.moments(g, exp_avg, exp_avg_sq),
            (StepRule::RmsProp(s), [square_avg]) => {
                s.square_avg(p, g, square_avg);
            }
            (StepRule::RmsProp(s), [square_avg, buffer]) => {
                let g = s.square_avg(p, g, square_avg);
                s.momentum_buffer(g, *square_avg, buffer);
            }
            _ => unreachable!("moment buffers are checked against StepRule::buffers"),
        }
    }

    /// The parameter after the step, from its value before, the gradient and the moments
    /// already updated by [`StepRule::update_moments`].
    #[inline(always)]
    pub fn updated_param(&self, p: f32, g: f32, m: &[f32]) -> f32 {
        match (self, m) {
            (StepRule::AdamW(s), &[exp_avg, exp_avg_sq]) => s.param(p, exp_avg, exp_avg_sq),
            (StepRule::RmsProp(s), &[square_avg]) => s.param(p, g, square_avg),
            (StepRule::RmsProp(s), &[_, buffer]) => s.param_with_momentum(p, buffer),
            _ => unreachable!("moment buffers are checked against StepRule::buffers"),
        }
    }
}

impl AdamWStep {
    #[inline(always)]
    pub fn moments(&self, g: f32, exp_avg: &mut f32, exp_avg_sq: &mut f32) {
        *exp_avg = lerp(*exp_avg, g, self.avg_weight); // exp_avg.lerp_(grad, 1 - beta1)
        *exp_avg_sq = *exp_avg_sq * self.beta2 + self.sq_weight * g * g; // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, 1 - beta2)
    }

    #[inline(always)]
    pub fn param(&self, p: f32, exp_avg: f32, exp_avg_sq: f32) -> f32 {
        let decayed = p * self.decay_factor; // param.mul_(1 - lr * wd)
        let denom = exp_avg_sq.sqrt() / self.bias_correction2_sqrt + self.eps;
        decayed + self.neg_step_size * exp_avg / denom // param.addcdiv_(exp_avg, denom, -step_size)
    }
}

impl RmsPropStep {
    /// Updates `square_avg`; returns the gradient with weight decay.
    #[inline(always)]
    pub fn square_avg(&self, p: f32, g: f32, square_avg: &mut f32) -> f32 {
        let g = self.decayed_grad(p, g);
        *square_avg = *square_avg * self.alpha + self.sq_weight * g * g; // mul_(alpha).addcmul_(grad, grad, 1 - alpha)
        g
    }

    /// Updates the momentum buffer from the decayed gradient and the new `square_avg`.
    #[inline(always)]
    pub fn momentum_buffer(&self, g: f32, square_avg: f32, buffer: &mut f32) {
        let avg = square_avg.sqrt() + self.eps;
        *buffer = *buffer * self.momentum + g / avg; // buf.mul_(momentum).addcdiv_(grad, avg)
    }

    /// Without momentum: the parameter from its value before, the gradient and the new
    /// `square_avg`.
    #[inline(always)]
    pub fn param(&self, p: f32, g: f32, square_avg: f32) -> f32 {
        let avg = square_avg.sqrt() + self.eps;
        p + self.neg_lr * self.decayed_grad(p, g) / avg // param.addcdiv_(grad, avg, -lr)
    }

    /// With momentum: the parameter from its value before and the new momentum buffer.
    #[inline(always)]
    pub fn param_with_momentum(&self, p: f32, buffer: f32) -> f32 {
        p + self.neg_lr * buffer // param.add_(buf, alpha=-lr)
    }

    /// `grad.add(param, alpha=wd)`, skipped at 0 as in torch.
    #[inline(always)]
    fn decayed_grad(&self, p: f32, g: f32) -> f32 {
        if self.weight_decay != 0.0 {
            g + self.weight_decay * p
        } else {
            g
        }
    }
}

/// torch's `lerp`: the two-sided form keeps the result exact at both ends.
#[inline(always)]
fn lerp(start: f32, end: f32, weight: f32) -> f32 {
    if weight.abs() < 0.5 {
        start + weight * (end - start)
    } else {
        end - (end - start) * (1.0 - weight)
    }
}

/// One step of `rule` on an f32 parameter where it lives: `moments [buffers, n]` (f32, as
/// [`StepRule::buffers`]) updated in place from `param` and `grad` (f32, `n` elements each,
/// contiguous), then `param` in place. Two in-place ops, no temporaries.
pub fn update_in_place(
    rule: StepRule,
    param: &Tensor,
    grad: &Tensor,
    moments: &Tensor,
) -> Result<()> {
    let n = param.elem_count();
    if grad.elem_count() != n || moments.dims() != [rule.buffers(), n] {
        bail!(
            "optimizer step: parameter of {n} elements, gradient {:?}, moments {:?} for {} buffers",
            grad.dims(),
            moments.dims(),
            rule.buffers()
        );
    }
    for t in [param, grad, moments] {
        if t.dtype() != candle_core::DType::F32 || !t.is_contiguous() {
            bail!(
                "optimizer step: {:?} {:?} is not a contiguous f32 tensor",
                t.dtype(),
                t.dims()
            );
        }
    }
    let grad = grad.flatten_all()?;
    let param_flat = param.flatten_all()?;
    moments.inplace_op3(&param_flat, &grad, &Moments(rule))?;
    param_flat.inplace_op3(&grad, moments, &Param(rule))
}

/// In-place op on the moments `[buffers, n]`, reading the parameter and the gradient.
struct Moments(StepRule);
/// In-place op on the parameter, reading the gradient and the updated moments.
struct Param(StepRule);

/// Element `i` of each of the first `buffers` rows of `moments [buffers, n]`.
fn element_moments(moments: &[f32], n: usize, i: usize, buffers: usize) -> [f32; 2] {
    let mut m = [0f32; 2];
    for (b, slot) in m.iter_mut().enumerate().take(buffers) {
        *slot = moments[b * n + i];
    }
    m
}

impl InplaceOp3 for Moments {
    fn name(&self) -> &'static str {
        "optimizer-moments"
    }

    fn cpu_fwd(
        &self,
        moments: &mut CpuStorage,
        lm: &Layout,
        param: &CpuStorage,
        lp: &Layout,
        grad: &CpuStorage,
        lg: &Layout,
    ) -> Result<()> {
        let name = self.name();
        let param = contiguous::<f32>(param, lp, name, "parameter")?;
        let grad = contiguous::<f32>(grad, lg, name, "gradient")?;
        let n = param.len();
        let moments = contiguous_f32_mut(moments, lm, name, "moments")?;
        let buffers = self.0.buffers();
        for i in 0..n {
            let mut m = element_moments(moments, n, i, buffers);
            self.0.update_moments(param[i], grad[i], &mut m[..buffers]);
            for (b, &value) in m.iter().enumerate().take(buffers) {
                moments[b * n + i] = value;
            }
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        moments: &mut candle_core::CudaStorage,
        lm: &Layout,
        param: &candle_core::CudaStorage,
        lp: &Layout,
        grad: &candle_core::CudaStorage,
        lg: &Layout,
    ) -> Result<()> {
        cuda::launch(
            "optimizer_moments",
            self.0,
            moments,
            lm,
            param,
            lp,
            grad,
            lg,
        )
    }
}

impl InplaceOp3 for Param {
    fn name(&self) -> &'static str {
        "optimizer-param"
    }

    fn cpu_fwd(
        &self,
        param: &mut CpuStorage,
        lp: &Layout,
        grad: &CpuStorage,
        lg: &Layout,
        moments: &CpuStorage,
        lm: &Layout,
    ) -> Result<()> {
        let name = self.name();
        let grad = contiguous::<f32>(grad, lg, name, "gradient")?;
        let moments = contiguous::<f32>(moments, lm, name, "moments")?;
        let param = contiguous_f32_mut(param, lp, name, "parameter")?;
        let n = param.len();
        let buffers = self.0.buffers();
        for (i, p) in param.iter_mut().enumerate() {
            let m = element_moments(moments, n, i, buffers);
            *p = self.0.updated_param(*p, grad[i], &m[..buffers]);
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        param: &mut candle_core::CudaStorage,
        lp: &Layout,
        grad: &candle_core::CudaStorage,
        lg: &Layout,
        moments: &candle_core::CudaStorage,
        lm: &Layout,
    ) -> Result<()> {
        cuda::launch("optimizer_param", self.0, param, lp, grad, lg, moments, lm)
    }
}

/// The kernels' arguments (src/cuda/optimizer.cu, both kernels alike): the addresses of the
/// buffer written in place and of the two read (optimizer_moments: the moments, then the
/// parameter and the gradient; optimizer_param: the parameter, then the gradient and the
/// moments), the parameter's element count `n`, then `rule`'s kind (0 AdamW, 1 RMSprop, 2 RMSprop
/// with momentum) and its seven scalars. The CUDA launch and the emulated tests both pass this
/// list.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))] // the CUDA launch and the emulated tests
fn kernel_args([target, a, b]: [u64; 3], n: usize, rule: StepRule) -> Vec<KernelArg> {
    let (kind, scalars) = match rule {
        StepRule::AdamW(s) => (
            0,
            [
                s.decay_factor,
                s.avg_weight,
                s.beta2,
                s.sq_weight,
                s.bias_correction2_sqrt,
                s.eps,
                s.neg_step_size,
            ],
        ),
        StepRule::RmsProp(s) => (
            if s.momentum != 0.0 { 2 } else { 1 },
            [
                s.weight_decay,
                s.alpha,
                s.sq_weight,
                s.eps,
                s.momentum,
                s.neg_lr,
                0.0,
            ],
        ),
    };
    [target, a, b]
        .map(KernelArg::Pointer)
        .into_iter()
        .chain([KernelArg::U64(n as u64), KernelArg::I32(kind)])
        .chain(scalars.map(KernelArg::F32))
        .collect()
}

/// The kernels' launch over a parameter of `n` elements: blocks of 256 threads striding over the
/// elements, at most 8 blocks per 65,535 of them; `(blocks, threads)`.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))] // the CUDA launch and the emulated tests
fn launch_dims(n: usize) -> (u32, u32) {
    ((n.div_ceil(256).min(65_535 * 8) as u32).max(1), 256)
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::{kernel_args, launch_dims, StepRule};
    use crate::kernel_args::cuda::{config, launch as launch_kernel};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DevicePtrMut};
    use candle_core::{CudaStorage, Layout, Result};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/optimizer.ptx"));

    /// Launches `name` (optimizer_moments or optimizer_param) over the parameter's elements:
    /// `target` is written in place, `a` and `b` read, in the argument order of the kernel.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn launch(
        name: &str,
        rule: StepRule,
        target: &mut CudaStorage,
        lt: &Layout,
        a: &CudaStorage,
        la: &Layout,
        b: &CudaStorage,
        lb: &Layout,
    ) -> Result<()> {
        let device = target.device().clone();
        let stream = device.cuda_stream();
        // The parameter's element count: the moments hold `buffers` of it.
        let n = if name == "optimizer_moments" {
            la.shape().elem_count()
        } else {
            lt.shape().elem_count()
        };
        let target_slice = target.as_cuda_slice_mut::<f32>()?;
        let mut target_view = target_slice.slice_mut(lt.start_offset()..);
        let a = a.as_cuda_slice::<f32>()?.slice(la.start_offset()..);
        let b = b.as_cuda_slice::<f32>()?.slice(lb.start_offset()..);
        let func = device.get_or_load_custom_func(name, "optune_optimizer", PTX)?;
        // The guards order the launch after the buffers' last writes and record it.
        let (target_at, _target) = target_view.device_ptr_mut(&stream);
        let (a_at, _a) = a.device_ptr(&stream);
        let (b_at, _b) = b.device_ptr(&stream);
        let args = kernel_args([target_at, a_at, b_at], n, rule);
        // SAFETY: the list is the kernel's; the target and the two inputs are contiguous f32
        // buffers of n (parameter, gradient) or buffers·n (moments) elements, checked by
        // `update_in_place`; the kernel's grid-stride loop stays below n. The guards live to the
        // end of the function.
        unsafe { launch_kernel(func.builder(), config(launch_dims(n)), &args) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    pub(super) fn rules() -> Vec<StepRule> {
        let adamw = |decay_factor| {
            StepRule::AdamW(AdamWStep {
                decay_factor,
                avg_weight: 0.1,
                beta2: 0.999,
                sq_weight: 0.001,
                bias_correction2_sqrt: 0.0447,
                eps: 1e-8,
                neg_step_size: -0.01,
            })
        };
        let rmsprop = |weight_decay, momentum| {
            StepRule::RmsProp(RmsPropStep {
                weight_decay,
                alpha: 0.99,
                sq_weight: 0.01,
                eps: 1e-8,
                momentum,
                neg_lr: -0.01,
            })
        };
        vec![
            adamw(1.0),
            adamw(0.999),
            rmsprop(0.0, 0.0),
            rmsprop(0.01, 0.0),
            rmsprop(0.01, 0.9),
        ]
    }

    /// A parameter of `n` elements and two steps' gradients.
    pub(super) fn problem(n: usize) -> (Vec<f32>, Vec<Vec<f32>>) {
        let param: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.37).sin()).collect();
        let grads = (0..2)
            .map(|s| {
                (0..n)
                    .map(|i| ((i * 7 + s) as f32 * 0.11).cos() * 0.3)
                    .collect()
            })
            .collect();
        (param, grads)
    }

    /// `rule` over the gradients one element at a time (the CPU optimiser's fused pass):
    /// the parameter and the moments `[buffers, n]`, flat.
    pub(super) fn element_steps(
        rule: StepRule,
        param: &[f32],
        grads: &[Vec<f32>],
    ) -> (Vec<f32>, Vec<f32>) {
        let n = param.len();
        let (mut p, mut m) = (param.to_vec(), vec![vec![0f32; rule.buffers()]; n]);
        for g in grads {
            for i in 0..n {
                rule.update_moments(p[i], g[i], &mut m[i]);
                p[i] = rule.updated_param(p[i], g[i], &m[i]);
            }
        }
        let moments = (0..rule.buffers())
            .flat_map(|b| m.iter().map(move |mi| mi[b]))
            .collect();
        (p, moments)
    }

    /// The in-place ops give, to the bit, what the element functions give one element at a time
    /// (the CPU optimiser's fused pass), over two steps.
    #[test]
    fn the_in_place_ops_follow_the_element_rule() {
        let (param0, grads) = problem(37);
        for rule in rules() {
            let param = Tensor::new(param0.as_slice(), &Device::Cpu).unwrap();
            let moments =
                Tensor::zeros((rule.buffers(), 37), candle_core::DType::F32, &Device::Cpu).unwrap();
            for g in &grads {
                let grad = Tensor::new(g.as_slice(), &Device::Cpu).unwrap();
                update_in_place(rule, &param, &grad, &moments).unwrap();
            }
            let (p, m) = element_steps(rule, &param0, &grads);
            assert_eq!(param.to_vec1::<f32>().unwrap(), p, "{rule:?}");
            let got = moments.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(got, m, "{rule:?}");
        }
    }

    #[test]
    fn mismatched_buffers_are_refused() {
        let param = Tensor::zeros(4, candle_core::DType::F32, &Device::Cpu).unwrap();
        let moments = Tensor::zeros((1, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
        let err = update_in_place(rules()[0], &param, &param, &moments).unwrap_err();
        assert!(err.to_string().contains("for 2 buffers"), "{err}");
    }
}

/// The CUDA kernels (src/cuda/optimizer.cu), run by the emulator with the launch the CUDA path
/// makes, against the element rule.
#[cfg(test)]
mod emulated {
    use super::tests::{element_steps, problem, rules};
    use super::*;
    use crate::kernel_args::emulated;
    use optune_cuda_emulator::{in_both_placements, Launch};

    /// One of the kernels by the emulator, with `launch` and the CUDA path's argument list:
    /// `target` after it, updated from `a` and `b` over a parameter of `n` elements.
    fn kernel(
        name: &str,
        launch: Launch,
        rule: StepRule,
        n: usize,
        [target, a, b]: [&[f32]; 3],
    ) -> Vec<f32> {
        in_both_placements(name, |memory| {
            let target = memory.in_place(target);
            let (a, b) = (memory.input(a), memory.input(b));
            let args = kernel_args([target.address, a, b], n, rule);
            // SAFETY: the parameter and the gradient hold n elements, the moments buffers·n;
            // the kernels' grid-stride loops stay below n.
            unsafe { memory.launch(name, launch, &emulated(&args)) }?;
            Ok(memory.read(&target))
        })
        .unwrap()
    }

    /// `rule` over the gradients on the emulated kernels, launched as `launch`: the parameter
    /// and the moments `[buffers, n]`.
    fn kernel_steps(
        rule: StepRule,
        launch: Launch,
        param: &[f32],
        grads: &[Vec<f32>],
    ) -> (Vec<f32>, Vec<f32>) {
        let n = param.len();
        let (mut param, mut moments) = (param.to_vec(), vec![0f32; rule.buffers() * n]);
        for g in grads {
            moments = kernel("optimizer_moments", launch, rule, n, [&moments, &param, g]);
            param = kernel("optimizer_param", launch, rule, n, [&param, g, &moments]);
        }
        (param, moments)
    }

    #[test]
    fn the_cuda_kernels_follow_the_element_rule_to_the_bit() {
        // 1000 elements: a grid of 4 blocks, the last one partly idle; and the same elements
        // through 2 blocks, whose threads stride over the rest.
        let (blocks, threads) = launch_dims(1000);
        assert_eq!((blocks, threads), (4, 256));
        let (param, grads) = problem(1000);
        for rule in rules() {
            let want = element_steps(rule, &param, &grads);
            for launch in [
                Launch {
                    grid: blocks,
                    block: threads,
                },
                Launch {
                    grid: 2,
                    block: 256,
                },
            ] {
                let got = kernel_steps(rule, launch, &param, &grads);
                assert_eq!(got, want, "{rule:?} {launch:?}");
            }
        }
    }
}

//! Optimisers that update candle [`Var`]s in place, learning-rate schedules and gradient clipping.
//!
//! `candle_nn::AdamW` builds several new tensors per parameter per step (4.8 s per step at 135M
//! parameters on two cores). Here the update of one parameter is a single fused pass over
//! parameter, gradient and moment buffers, run as a candle in-place op on the parameter's own
//! storage: nothing is allocated per step on the CPU `f32` path. Parameters on other devices
//! keep their moments in one `[buffers, n]` f32 tensor there and take two in-place ops per step
//! ([`optune_kernels::optimizer::update_in_place`]: two kernel launches on CUDA); both paths
//! apply the same element arithmetic ([`optune_kernels::optimizer::StepRule`]).
//!
//! Semantics follow PyTorch 2.x, operation by operation in `f32`, so results match
//! `torch.optim` to rounding:
//! - [`AdamW`] is `torch.optim.AdamW`: bias-corrected moments, `eps` added outside the square
//!   root, decoupled weight decay `p *= 1 - lr * wd` applied before the Adam update.
//! - [`RmsProp`] is `torch.optim.RMSprop` with `centered = False` (the centered variant is not
//!   implemented): weight decay is the coupled L2 term `g += wd * p`, momentum optional.
//! - [`clip_grad_norm`] is `torch.nn.utils.clip_grad_norm_` with the L2 norm.
//! - [`Schedule`] is Hugging Face's `get_{constant,linear,cosine}_schedule_with_warmup`.
//!
//! The optimiser refuses to step when any of its parameters has no gradient: candle's fused ops
//! detach gradients silently, and skipping such a parameter (what torch and `candle_nn` do)
//! would hide that. [`missing_grads`] gives the same check to callers that want to report it
//! earlier.

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{
    CpuStorage, DType, Device, InplaceOp1, InplaceOp2, Layout, Storage, Tensor, Var,
};
use optune_kernels::optimizer::{update_in_place, AdamWStep, RmsPropStep, StepRule};
use optune_kernels::storage::{contiguous, contiguous_f32_mut};
use rayon::prelude::*;
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};

/// Elements per rayon task: large enough that scheduling costs nothing next to the arithmetic,
/// small enough that a 4.5M-element matrix splits into ~70 tasks for work stealing.
const CHUNK_LEN: usize = 1 << 16;

/// Key of the JSON header inside the safetensors metadata of a saved optimiser state.
const STATE_METADATA_KEY: &str = "optune.optimizer";
const STATE_FORMAT_VERSION: u32 = 1;

/// Hyperparameters of `torch.optim.AdamW` other than the learning rate and weight decay.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
}

impl Default for AdamW {
    /// torch's defaults.
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        }
    }
}

/// Hyperparameters of `torch.optim.RMSprop` (non-centered) other than the learning rate and
/// weight decay.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct RmsProp {
    pub alpha: f64,
    pub eps: f64,
    pub momentum: f64,
}

impl Default for RmsProp {
    /// torch's defaults.
    fn default() -> Self {
        Self {
            alpha: 0.99,
            eps: 1e-8,
            momentum: 0.0,
        }
    }
}

/// The update rule an [`Optimizer`] applies.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Algorithm {
    AdamW(AdamW),
    RmsProp(RmsProp),
}

/// The update rule by name, with torch's default hyperparameters ([`OptimizerKind::algorithm`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OptimizerKind {
    /// torch.optim.AdamW
    Adamw,
    /// torch.optim.RMSprop (not centered)
    Rmsprop,
}

impl OptimizerKind {
    pub fn algorithm(self) -> Algorithm {
        match self {
            OptimizerKind::Adamw => Algorithm::AdamW(AdamW::default()),
            OptimizerKind::Rmsprop => Algorithm::RmsProp(RmsProp::default()),
        }
    }
}

impl Algorithm {
    /// Per-parameter state buffers, named as in torch's optimiser state.
    fn buffer_names(&self) -> &'static [&'static str] {
        match self {
            Algorithm::AdamW(_) => &["exp_avg", "exp_avg_sq"],
            // As the f32 step rule counts it (StepRule::buffers).
            Algorithm::RmsProp(rms) if rms.momentum as f32 > 0.0 => {
                &["square_avg", "momentum_buffer"]
            }
            Algorithm::RmsProp(_) => &["square_avg"],
        }
    }

    /// The range checks torch makes in the optimisers' constructors.
    fn validate(&self) -> Result<()> {
        match *self {
            Algorithm::AdamW(AdamW { beta1, beta2, eps }) => {
                ensure!(
                    (0.0..1.0).contains(&beta1),
                    "AdamW beta1 must be in [0, 1), got {beta1}"
                );
                ensure!(
                    (0.0..1.0).contains(&beta2),
                    "AdamW beta2 must be in [0, 1), got {beta2}"
                );
                ensure!(
                    eps.is_finite() && eps >= 0.0,
                    "AdamW eps must be finite and >= 0, got {eps}"
                );
            }
            Algorithm::RmsProp(RmsProp {
                alpha,
                eps,
                momentum,
            }) => {
                ensure!(
                    (0.0..=1.0).contains(&alpha),
                    "RMSprop alpha must be in [0, 1], got {alpha}"
                );
                ensure!(
                    eps.is_finite() && eps >= 0.0,
                    "RMSprop eps must be finite and >= 0, got {eps}"
                );
                ensure!(
                    momentum.is_finite() && momentum >= 0.0,
                    "RMSprop momentum must be finite and >= 0, got {momentum}"
                );
            }
        }
        Ok(())
    }
}

/// Named parameters sharing one weight decay (torch's parameter group, without per-group lr).
#[derive(Clone, Debug)]
pub struct ParamGroup {
    pub params: Vec<(String, Var)>,
    pub weight_decay: f64,
}

/// Splits parameters by the usual rule: tensors of rank >= 2 (weight matrices, embeddings) get
/// `weight_decay`; rank 0 and 1 tensors (biases, norm gains) get none. Returns the decayed group
/// first. Move embeddings to the second group by hand if they should not decay either.
pub fn decay_groups(params: Vec<(String, Var)>, weight_decay: f64) -> Vec<ParamGroup> {
    let (decayed, exempt) = params.into_iter().partition(|(_, var)| var.rank() >= 2);
    vec![
        ParamGroup {
            params: decayed,
            weight_decay,
        },
        ParamGroup {
            params: exempt,
            weight_decay: 0.0,
        },
    ]
}

/// Names of the parameters that received no gradient in `grads`, in the order given.
pub fn missing_grads(grads: &GradStore, params: &[(String, Var)]) -> Vec<String> {
    params
        .iter()
        .filter(|(_, var)| grads.get(var.as_tensor()).is_none())
        .map(|(name, _)| name.clone())
        .collect()
}

/// Moment buffers of one parameter, in the order of [`Algorithm::buffer_names`].
enum Moments {
    /// CPU `f32` parameters: updated by the fused in-place kernel.
    Host(Vec<Vec<f32>>),
    /// Any other parameter: one `[buffers, n]` `f32` tensor on the parameter's device, updated in
    /// place by [`update_in_place`].
    Device(Tensor),
}

impl Moments {
    fn zeros(var: &Var, count: usize) -> Result<Self> {
        if updates_on_host(var) {
            // One zeroed allocation each (not clones of one), so the pages are faulted in lazily
            // by the first step rather than copied here.
            Ok(Moments::Host(
                (0..count).map(|_| vec![0.0; var.elem_count()]).collect(),
            ))
        } else {
            let shape = (count, var.elem_count());
            Ok(Moments::Device(Tensor::zeros(
                shape,
                DType::F32,
                var.device(),
            )?))
        }
    }

    fn from_host(var: &Var, buffers: Vec<Vec<f32>>) -> Result<Self> {
        if updates_on_host(var) {
            Ok(Moments::Host(buffers))
        } else {
            let shape = (buffers.len(), var.elem_count());
            let values = buffers.concat();
            Ok(Moments::Device(Tensor::from_vec(
                values,
                shape,
                var.device(),
            )?))
        }
    }
}

fn updates_on_host(var: &Var) -> bool {
    var.device().is_cpu() && var.dtype() == DType::F32 && var.is_contiguous()
}

struct Param {
    name: String,
    var: Var,
    weight_decay: f64,
    /// Allocated at the first step, as torch does, so that loading a saved state right after
    /// construction does not hold two copies of the moments.
    moments: Option<Moments>,
}

/// AdamW or RMSprop over a fixed set of named parameters, updating them in place.
pub struct Optimizer {
    params: Vec<Param>,
    algorithm: Algorithm,
    lr: f64,
    step: u64,
}

/// JSON header of a saved optimiser state.
#[derive(Serialize, Deserialize)]
struct SavedState {
    format: u32,
    algorithm: Algorithm,
    lr: f64,
    step: u64,
    weight_decay: BTreeMap<String, f64>,
}

impl Optimizer {
    /// Fails on an empty parameter list, a name or variable listed twice, or hyperparameters
    /// torch would reject.
    pub fn new(groups: Vec<ParamGroup>, algorithm: Algorithm, lr: f64) -> Result<Self> {
        algorithm.validate()?;
        check_lr(lr)?;
        let mut names = HashSet::new();
        let mut var_ids = HashSet::new();
        let mut params = Vec::new();
        for group in groups {
            let weight_decay = group.weight_decay;
            ensure!(
                weight_decay.is_finite() && weight_decay >= 0.0,
                "weight decay must be finite and >= 0, got {weight_decay}"
            );
            for (name, var) in group.params {
                ensure!(
                    names.insert(name.clone()),
                    "parameter {name} is listed twice"
                );
                ensure!(
                    var_ids.insert(var.id()),
                    "parameter {name}: its variable is listed twice"
                );
                params.push(Param {
                    name,
                    var,
                    weight_decay,
                    moments: None,
                });
            }
        }
        ensure!(!params.is_empty(), "the optimizer got no parameters");
        Ok(Self {
            params,
            algorithm,
            lr,
            step: 0,
        })
    }

    pub fn algorithm(&self) -> &Algorithm {
        &self.algorithm
    }

    pub fn lr(&self) -> f64 {
        self.lr
    }

    /// Sets the learning rate used by the next [`Optimizer::step`] (checked there).
    pub fn set_lr(&mut self, lr: f64) {
        self.lr = lr;
    }

    /// Number of steps taken, including those restored by [`Optimizer::load_state`].
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// The trainable variables, in the order they were given.
    pub fn vars(&self) -> impl Iterator<Item = &Var> {
        self.params.iter().map(|param| &param.var)
    }

    /// Applies one update to every parameter. Fails, before changing anything, when the learning
    /// rate is invalid or any parameter lacks a gradient or has one of the wrong shape.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        check_lr(self.lr)?;
        let mut param_grads = Vec::with_capacity(self.params.len());
        let mut missing = Vec::new();
        for param in &self.params {
            match grads.get(param.var.as_tensor()) {
                Some(grad) if grad.dims() == param.var.dims() => param_grads.push(grad),
                Some(grad) => bail!(
                    "gradient of {} has shape {:?}, the parameter {:?}",
                    param.name,
                    grad.dims(),
                    param.var.dims()
                ),
                None => missing.push(param.name.as_str()),
            }
        }
        ensure!(
            missing.is_empty(),
            "no gradient for trainable parameter(s) {} (detached by a fused op?)",
            missing.join(", ")
        );
        let step = self.step + 1;
        for (param, grad) in self.params.iter_mut().zip(param_grads) {
            let rule = step_rule(&self.algorithm, self.lr, step, param.weight_decay);
            param
                .update(rule, grad)
                .with_context(|| format!("updating {}", param.name))?;
        }
        self.step = step;
        Ok(())
    }

    /// Writes the moment buffers (`f32`, keyed `"{param}.{buffer}"` with torch's buffer names)
    /// and a JSON header (algorithm, lr, step count, per-parameter weight decay, stored in the
    /// safetensors metadata under `optune.optimizer`) to one safetensors file. The file is
    /// written beside `path` and renamed into place, so a crash never leaves a torn state.
    /// Moments on a device come to the host one buffer at a time, as they are written: a save
    /// holds one parameter's buffer on the host, not all of them (56 GB for a 7B's AdamW).
    pub fn save_state(&self, path: &Path) -> Result<()> {
        let header = SavedState {
            format: STATE_FORMAT_VERSION,
            algorithm: self.algorithm,
            lr: self.lr,
            step: self.step,
            weight_decay: self
                .params
                .iter()
                .map(|p| (p.name.clone(), p.weight_decay))
                .collect(),
        };
        let mut tensors = Vec::new();
        for param in &self.params {
            let Some(moments) = &param.moments else {
                continue;
            };
            let names = self.algorithm.buffer_names().iter();
            for (index, buffer_name) in names.enumerate() {
                let values = match moments {
                    Moments::Host(buffers) => MomentValues::Host(&buffers[index]),
                    Moments::Device(buffers) => MomentValues::DeviceRow(buffers, index),
                };
                let view = MomentView {
                    shape: param.var.dims(),
                    values,
                };
                tensors.push((format!("{}.{buffer_name}", param.name), view));
            }
        }
        let metadata = HashMap::from([(
            STATE_METADATA_KEY.to_string(),
            serde_json::to_string(&header)?,
        )]);
        optune_fs::write_safetensors_lazily(tensors, metadata, path)
            .context("saving the optimizer state")
    }

    /// Restores a state written by [`Optimizer::save_state`] for the same parameter names and
    /// shapes. Like torch's `load_state_dict`, the algorithm's hyperparameters, the learning
    /// rate, the step count and the weight decays all come from the file. On error the optimiser
    /// is left as it was.
    pub fn load_state(&mut self, path: &Path) -> Result<()> {
        let file = std::fs::File::open(path)
            .with_context(|| format!("reading optimizer state {}", path.display()))?;
        // Mapped, not read: the file's pages are read as each parameter's moments are restored
        // (and uploaded, on a device), so a 7B's 56 GB of moments are never on the heap at once.
        // SAFETY: the map is read-only and dropped before this returns; the state files are
        // written by renaming a finished file into place (`save_state`), never in place, so the
        // mapped file does not change under the map.
        let bytes = unsafe { memmap2::Mmap::map(&file) }
            .with_context(|| format!("mapping optimizer state {}", path.display()))?;
        let (_, metadata) = SafeTensors::read_metadata(&bytes)
            .with_context(|| format!("{} is not a safetensors file", path.display()))?;
        let header = metadata
            .metadata()
            .as_ref()
            .and_then(|entries| entries.get(STATE_METADATA_KEY))
            .with_context(|| format!("{} holds no optune optimizer state", path.display()))?;
        let saved: SavedState =
            serde_json::from_str(header).context("parsing the optimizer state header")?;
        ensure!(
            saved.format == STATE_FORMAT_VERSION,
            "optimizer state format {} is not supported (expected {STATE_FORMAT_VERSION})",
            saved.format
        );
        saved.algorithm.validate()?;
        check_lr(saved.lr)?;
        self.check_same_params(&saved.weight_decay)?;

        let file = SafeTensors::deserialize(&bytes)?;
        let buffer_names = saved.algorithm.buffer_names();
        let expected_tensors = if saved.step == 0 {
            0
        } else {
            self.params.len() * buffer_names.len()
        };
        ensure!(
            file.len() == expected_tensors,
            "optimizer state holds {} tensors, expected {expected_tensors}",
            file.len()
        );
        let mut restored = Vec::with_capacity(self.params.len());
        for param in &self.params {
            let weight_decay = saved
                .weight_decay
                .get(&param.name)
                .copied()
                .unwrap_or(f64::NAN);
            ensure!(
                weight_decay.is_finite() && weight_decay >= 0.0,
                "optimizer state has weight decay {weight_decay} for {}",
                param.name
            );
            if saved.step == 0 {
                restored.push((weight_decay, None));
                continue;
            }
            let mut buffers = Vec::with_capacity(buffer_names.len());
            for buffer_name in buffer_names {
                let key = format!("{}.{buffer_name}", param.name);
                let view = file
                    .tensor(&key)
                    .with_context(|| format!("optimizer state lacks {key}"))?;
                ensure!(
                    view.dtype() == Dtype::F32 && view.shape() == param.var.dims(),
                    "{key} is {:?} {:?}, expected F32 {:?}",
                    view.dtype(),
                    view.shape(),
                    param.var.dims()
                );
                buffers.push(f32_from_le_bytes(view.data()));
            }
            restored.push((weight_decay, Some(Moments::from_host(&param.var, buffers)?)));
        }

        for (param, (weight_decay, moments)) in self.params.iter_mut().zip(restored) {
            param.weight_decay = weight_decay;
            param.moments = moments;
        }
        self.algorithm = saved.algorithm;
        self.lr = saved.lr;
        self.step = saved.step;
        Ok(())
    }

    fn check_same_params(&self, saved: &BTreeMap<String, f64>) -> Result<()> {
        let ours: BTreeSet<&str> = self.params.iter().map(|p| p.name.as_str()).collect();
        let theirs: BTreeSet<&str> = saved.keys().map(String::as_str).collect();
        if ours == theirs {
            return Ok(());
        }
        let describe = |names: Vec<&&str>| {
            let shown: Vec<&str> = names.iter().take(5).map(|name| **name).collect();
            format!("{} ({})", names.len(), shown.join(", "))
        };
        bail!(
            "optimizer state is for other parameters: missing from the file {}, unknown to the optimizer {}",
            describe(ours.difference(&theirs).collect()),
            describe(theirs.difference(&ours).collect())
        )
    }
}

impl Param {
    fn update(&mut self, rule: StepRule, grad: &Tensor) -> Result<()> {
        let moments = match self.moments.take() {
            Some(moments) => moments,
            None => Moments::zeros(&self.var, rule.buffers())?,
        };
        let moments = self.moments.insert(moments);
        match moments {
            Moments::Host(buffers) => {
                let grad = grad.contiguous()?;
                let op = FusedUpdate {
                    rule,
                    moments: Cell::new(Some(buffers.as_mut_slice())),
                };
                self.var.as_tensor().inplace_op2(&grad, &op)?;
            }
            Moments::Device(buffers) => {
                let grad = grad.to_dtype(DType::F32)?.contiguous()?;
                let var = self.var.as_tensor();
                if var.dtype() == DType::F32 && var.is_contiguous() {
                    update_in_place(rule, var, &grad, buffers)?;
                } else {
                    // Another dtype or layout: the step on an f32 copy, written back.
                    let param = var.to_dtype(DType::F32)?.contiguous()?;
                    update_in_place(rule, &param, &grad, buffers)?;
                    self.var.set(&param.to_dtype(self.var.dtype())?)?;
                }
            }
        }
        Ok(())
    }
}

fn check_lr(lr: f64) -> Result<()> {
    ensure!(
        lr.is_finite() && lr >= 0.0,
        "learning rate must be finite and >= 0, got {lr}"
    );
    Ok(())
}

/// The scalars of one parameter's update at one step, rounded to `f32` from `f64` the way torch
/// rounds Python floats when it applies them to `f32` tensors. `step` counts from 1, as torch's
/// `state["step"]` after its increment.
fn step_rule(algorithm: &Algorithm, lr: f64, step: u64, weight_decay: f64) -> StepRule {
    match *algorithm {
        Algorithm::AdamW(AdamW { beta1, beta2, eps }) => {
            // torch computes these in Python floats: `beta ** step` is C `pow`, as is `** 0.5`.
            let step = step as f64;
            let bias_correction1 = 1.0 - beta1.powf(step);
            let bias_correction2 = 1.0 - beta2.powf(step);
            StepRule::AdamW(AdamWStep {
                decay_factor: (1.0 - lr * weight_decay) as f32,
                avg_weight: (1.0 - beta1) as f32,
                beta2: beta2 as f32,
                sq_weight: (1.0 - beta2) as f32,
                bias_correction2_sqrt: bias_correction2.powf(0.5) as f32,
                eps: eps as f32,
                neg_step_size: (-(lr / bias_correction1)) as f32,
            })
        }
        Algorithm::RmsProp(RmsProp {
            alpha,
            eps,
            momentum,
        }) => StepRule::RmsProp(RmsPropStep {
            weight_decay: weight_decay as f32,
            alpha: alpha as f32,
            sq_weight: (1.0 - alpha) as f32,
            eps: eps as f32,
            momentum: momentum as f32,
            neg_lr: (-lr) as f32,
        }),
    }
}

/// The fused update on the CPU, one pass over each chunk of the parameter and its buffers.
fn update_host(
    rule: StepRule,
    param: &mut [f32],
    grad: &[f32],
    moments: &mut [Vec<f32>],
) -> candle_core::Result<()> {
    let len = param.len();
    if grad.len() != len
        || moments.len() != rule.buffers()
        || moments.iter().any(|buffer| buffer.len() != len)
    {
        candle_core::bail!("parameter, gradient and moment buffers differ in length");
    }
    let chunks = param
        .par_chunks_mut(CHUNK_LEN)
        .zip(grad.par_chunks(CHUNK_LEN));
    // One loop per rule, so that each inner loop is branch-free.
    match (rule, moments) {
        (StepRule::AdamW(s), [exp_avg, exp_avg_sq]) => chunks
            .zip(exp_avg.par_chunks_mut(CHUNK_LEN))
            .zip(exp_avg_sq.par_chunks_mut(CHUNK_LEN))
            .for_each(|(((param, grad), exp_avg), exp_avg_sq)| {
                let elements = param.iter_mut().zip(grad).zip(exp_avg).zip(exp_avg_sq);
                for (((p, &g), m), v) in elements {
                    s.moments(g, m, v);
                    *p = s.param(*p, *m, *v);
                }
            }),
        (StepRule::RmsProp(s), [square_avg]) => chunks
            .zip(square_avg.par_chunks_mut(CHUNK_LEN))
            .for_each(|((param, grad), square_avg)| {
                for ((p, &g), sq) in param.iter_mut().zip(grad).zip(square_avg) {
                    s.square_avg(*p, g, sq);
                    *p = s.param(*p, g, *sq);
                }
            }),
        (StepRule::RmsProp(s), [square_avg, momentum_buffer]) => chunks
            .zip(square_avg.par_chunks_mut(CHUNK_LEN))
            .zip(momentum_buffer.par_chunks_mut(CHUNK_LEN))
            .for_each(|(((param, grad), square_avg), momentum_buffer)| {
                let elements = param
                    .iter_mut()
                    .zip(grad)
                    .zip(square_avg)
                    .zip(momentum_buffer);
                for (((p, &g), sq), b) in elements {
                    let g = s.square_avg(*p, g, sq);
                    s.momentum_buffer(g, *sq, b);
                    *p = s.param_with_momentum(*p, *b);
                }
            }),
        _ => candle_core::bail!("moment buffers do not match the optimizer algorithm"),
    }
    Ok(())
}

/// Candle in-place op: parameter (destination) and gradient (source) plus the moment buffers,
/// which the op borrows for the one call candle makes.
struct FusedUpdate<'a> {
    rule: StepRule,
    moments: Cell<Option<&'a mut [Vec<f32>]>>,
}

impl InplaceOp2 for FusedUpdate<'_> {
    fn name(&self) -> &'static str {
        "optune-fused-optimizer-update"
    }

    fn cpu_fwd(
        &self,
        param: &mut CpuStorage,
        param_layout: &Layout,
        grad: &CpuStorage,
        grad_layout: &Layout,
    ) -> candle_core::Result<()> {
        let Some(moments) = self.moments.take() else {
            candle_core::bail!("{} ran twice", InplaceOp2::name(self))
        };
        let name = InplaceOp2::name(self);
        let grad = contiguous::<f32>(grad, grad_layout, name, "gradient")?;
        let param = contiguous_f32_mut(param, param_layout, name, "parameter")?;
        update_host(self.rule, param, grad, moments)
    }
}

/// Candle in-place op multiplying a CPU `f32` tensor by a constant.
struct ScaleInPlace(f32);

impl InplaceOp1 for ScaleInPlace {
    fn name(&self) -> &'static str {
        "optune-scale-in-place"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let scale = self.0;
        contiguous_f32_mut(storage, layout, self.name(), "gradient")?
            .par_chunks_mut(CHUNK_LEN)
            .for_each(|chunk| chunk.iter_mut().for_each(|x| *x *= scale));
        Ok(())
    }
}

/// Clips gradients in place to a global L2 norm of at most `max_norm`, as
/// `torch.nn.utils.clip_grad_norm_`: every gradient is multiplied by
/// `min(1, max_norm / (norm + 1e-6))`. Returns the norm before clipping. Variables without a
/// gradient are skipped and a variable listed twice counts once. A non-finite norm is an error
/// (torch's `error_if_nonfinite=True`): scaling by it would poison every parameter.
pub fn clip_grad_norm<'a>(
    grads: &mut GradStore,
    vars: impl IntoIterator<Item = &'a Var>,
    max_norm: f64,
) -> Result<f32> {
    // Infinity: the norm, measured for the log, and no clipping (NaN fails the comparison).
    ensure!(
        max_norm > 0.0,
        "max_norm must be > 0 (infinity: no clipping), got {max_norm}"
    );
    let mut seen = HashSet::new();
    let mut with_grad = Vec::new();
    let mut sum_of_squares = 0.0f64;
    // Gradients off the host: each one's sum of squares stays on its device, and all of a
    // device's come back in one transfer, so each device synchronises once per step, not per
    // parameter (the gradients may lie on several: a data-parallel run's owners).
    let mut device_sums: Vec<(Device, Vec<Tensor>)> = Vec::new();
    for var in vars {
        if !seen.insert(var.id()) {
            continue;
        }
        if let Some(grad) = grads.get(var.as_tensor()) {
            match host_squared_l2_norm(grad) {
                Some(sum) => sum_of_squares += sum,
                None => {
                    let sum = optune_kernels::sum_all(&grad.to_dtype(DType::F32)?.sqr()?)?;
                    match device_sums
                        .iter_mut()
                        .find(|(d, _)| d.same_device(grad.device()))
                    {
                        Some((_, sums)) => sums.push(sum),
                        None => device_sums.push((grad.device().clone(), vec![sum])),
                    }
                }
            }
            with_grad.push(var.as_tensor());
        }
    }
    for (_, sums) in device_sums {
        let sums: Vec<f32> = Tensor::stack(&sums, 0)?.to_vec1()?;
        sum_of_squares += sums.iter().map(|&s| f64::from(s)).sum::<f64>();
    }
    // torch reduces in f32; accumulating in f64 agrees with it to rounding and stays accurate
    // over 10^8 elements.
    let total_norm = sum_of_squares.sqrt() as f32;
    ensure!(
        total_norm.is_finite(),
        "gradient norm is {total_norm}: refusing to clip"
    );
    // torch evaluates `max_norm / (total_norm + 1e-6)` as `reciprocal(total_norm + 1e-6) * max_norm`.
    let scale = (1.0 / (total_norm + 1e-6)) * max_norm as f32;
    if scale < 1.0 {
        for var in with_grad {
            scale_grad(grads, var, scale)?;
        }
    }
    Ok(total_norm)
}

/// The sum of squares of a contiguous f32 gradient on the host, in f64; `None` for others.
fn host_squared_l2_norm(grad: &Tensor) -> Option<f64> {
    let (storage, layout) = grad.storage_and_layout();
    let Storage::Cpu(storage @ CpuStorage::F32(_)) = &*storage else {
        return None;
    };
    let values = contiguous::<f32>(storage, layout, "clip_grad_norm", "gradient").ok()?;
    // Per-chunk sums added in chunk order: the result does not depend on how rayon schedules
    // the chunks, so a resumed run clips exactly like an uninterrupted one.
    let chunk_sums: Vec<f64> = values
        .par_chunks(CHUNK_LEN)
        .map(|chunk| chunk.iter().map(|&x| f64::from(x) * f64::from(x)).sum())
        .collect();
    Some(chunk_sums.iter().sum())
}

fn scale_grad(grads: &mut GradStore, var: &Tensor, scale: f32) -> Result<()> {
    let Some(grad) = grads.get(var) else {
        return Ok(());
    };
    if grad.device().is_cpu() && grad.dtype() == DType::F32 && grad.is_contiguous() {
        grad.inplace_op1(&ScaleInPlace(scale))?;
    } else {
        let scaled = grad.affine(scale.into(), 0.0)?;
        grads.insert(var, scaled);
    }
    Ok(())
}

/// Where one moment buffer lives: a host vector, or row `index` of a parameter's `[buffers, n]`
/// device tensor.
enum MomentValues<'a> {
    Host(&'a [f32]),
    DeviceRow(&'a Tensor, usize),
}

/// One moment buffer as safetensors writes it: converted to little-endian bytes, and copied from
/// its device, only when its bytes are asked for.
struct MomentView<'a> {
    shape: &'a [usize],
    values: MomentValues<'a>,
}

impl optune_fs::LazyTensor for MomentView<'_> {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }

    fn shape(&self) -> &[usize] {
        self.shape
    }

    fn bytes(&self) -> Result<Vec<u8>> {
        let le_bytes = |values: &[f32]| values.iter().flat_map(|x| x.to_le_bytes()).collect();
        Ok(match self.values {
            MomentValues::Host(values) => le_bytes(values),
            MomentValues::DeviceRow(buffers, index) => {
                le_bytes(&buffers.get(index)?.to_vec1::<f32>()?)
            }
        })
    }
}

fn f32_from_le_bytes(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// What happens to the learning rate after warmup.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Decay {
    /// `get_constant_schedule_with_warmup` (the DPO paper's schedule).
    Constant,
    /// `get_linear_schedule_with_warmup`.
    Linear,
    /// `get_cosine_schedule_with_warmup` with its default half cosine wave.
    Cosine,
}

/// Linear warmup from 0 to `peak_lr` over `warmup_steps`, then [`Decay`] reaching 0 at
/// `total_steps`, with the formulas of Hugging Face transformers' schedules (including their
/// behaviour past `total_steps`: linear stays at 0, cosine rises again).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    pub peak_lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
    pub decay: Decay,
}

impl Schedule {
    /// The learning rate for the optimiser step taken after `completed_steps` steps, i.e. what
    /// `LambdaLR` gives after `completed_steps` calls of `scheduler.step()`. Pass
    /// [`Optimizer::step_count`] before each step.
    pub fn lr_at(&self, completed_steps: u64) -> f64 {
        self.peak_lr * self.factor(completed_steps)
    }

    fn factor(&self, step: u64) -> f64 {
        let current = step as f64;
        if step < self.warmup_steps {
            return current / self.warmup_steps.max(1) as f64;
        }
        let decay_steps = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        match self.decay {
            Decay::Constant => 1.0,
            Decay::Linear => ((self.total_steps as f64 - current) / decay_steps).max(0.0),
            Decay::Cosine => {
                let progress = (step - self.warmup_steps) as f64 / decay_steps;
                // HF: `pi * num_cycles * 2.0 * progress` with num_cycles = 0.5; the factors of
                // 0.5 and 2.0 are exact, so this is the same float.
                (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn var(values: &[f32]) -> Var {
        Var::from_slice(values, values.len(), &Device::Cpu).unwrap()
    }

    fn grads_for(pairs: &[(&Var, &[f32])]) -> GradStore {
        let mut grads = GradStore::default();
        for (var, values) in pairs {
            let grad = Tensor::from_slice(values, values.len(), &Device::Cpu).unwrap();
            grads.insert(var.as_tensor(), grad);
        }
        grads
    }

    fn assert_close(actual: &[f32], expected: &[f64], rel: f64) {
        assert_eq!(actual.len(), expected.len());
        for (a, e) in actual.iter().zip(expected) {
            let err = (f64::from(*a) - e).abs() / e.abs().max(1e-12);
            assert!(
                err <= rel,
                "got {actual:?}, expected {expected:?} (rel err {err:e})"
            );
        }
    }

    fn single(name: &str, var: &Var, weight_decay: f64) -> Vec<ParamGroup> {
        vec![ParamGroup {
            params: vec![(name.to_string(), var.clone())],
            weight_decay,
        }]
    }

    /// One step from p = [1, -2, 0.5] with g = [0.1, -0.2, 0.3] and lr = 0.01: the new p.
    fn first_step_of_example(algorithm: Algorithm, weight_decay: f64) -> Vec<f32> {
        let p = var(&[1.0, -2.0, 0.5]);
        let mut opt = Optimizer::new(single("p", &p, weight_decay), algorithm, 0.01).unwrap();
        opt.step(&grads_for(&[(&p, &[0.1, -0.2, 0.3])])).unwrap();
        assert_eq!(opt.step_count(), 1);
        p.as_tensor().to_vec1::<f32>().unwrap()
    }

    #[test]
    fn adamw_first_step_by_hand() {
        // p = [1, -2, 0.5], g = [0.1, -0.2, 0.3], lr = 0.01, betas (0.9, 0.999), eps 1e-8, wd 0.1.
        // decay:  p * (1 - 0.01 * 0.1) = p * 0.999 = [0.999, -1.998, 0.4995]
        // m = 0.1 g = [0.01, -0.02, 0.03];  v = 0.001 g^2 = [1e-5, 4e-5, 9e-5]
        // bias corrections at t = 1: 1 - 0.9 = 0.1 and 1 - 0.999 = 0.001, so
        // step = lr / 0.1 = 0.1;  denom = sqrt(v) / sqrt(0.001) + eps = |g| + 1e-8
        // p -= 0.1 * m / denom = 0.01 g / (|g| + 1e-8):
        //   0.999  - 0.001 / 0.10000001 = 0.999  - 0.0099999990 = 0.9890000010
        //  -1.998  + 0.002 / 0.20000001 = -1.998 + 0.0099999995 = -1.9880000005
        //   0.4995 - 0.003 / 0.30000001 = 0.4995 - 0.0099999997 = 0.4895000003
        let got = first_step_of_example(Algorithm::AdamW(AdamW::default()), 0.1);
        assert_close(&got, &[0.9890000010, -1.9880000005, 0.4895000003], 1e-6);
    }

    #[test]
    fn rmsprop_first_step_by_hand() {
        // p = [1, -2, 0.5], g = [0.1, -0.2, 0.3], lr = 0.01, alpha 0.99, eps 1e-8, no decay.
        // square_avg = 0.01 g^2 = [1e-4, 4e-4, 9e-4];  avg = sqrt + eps = [0.01, 0.02, 0.03] + 1e-8
        // p -= lr * g / avg:
        //   1   - 0.001 / 0.01000001 = 1   - 0.0999999000 = 0.9000001000
        //  -2   + 0.002 / 0.02000001 = -2  + 0.0999999500 = -1.9000000500
        //   0.5 - 0.003 / 0.03000001 = 0.5 - 0.0999999667 = 0.4000000333
        let got = first_step_of_example(Algorithm::RmsProp(RmsProp::default()), 0.0);
        assert_close(&got, &[0.9000001000, -1.9000000500, 0.4000000333], 1e-6);
    }

    #[test]
    fn rmsprop_momentum_and_weight_decay_by_hand() {
        // Same p, g, lr and alpha; wd 0.1 (coupled), momentum 0.9.
        // g' = g + 0.1 p = [0.2, -0.4, 0.35];  square_avg = 0.01 g'^2 = [4e-4, 1.6e-3, 1.225e-3]
        // avg = 0.1 |g'| + 1e-8 = [0.02, 0.04, 0.035] + 1e-8
        // buf = 0.9 * 0 + g' / avg = sign(g') * 10 / (1 + 5e-7), 10 / (1 + 2.5e-7), 10 / (1 + 2.857e-7)
        //     = [9.999995, -9.9999975, 9.99999714]
        // p -= 0.01 buf = [0.90000005, -1.900000025, 0.4000000286]
        let rms = RmsProp {
            momentum: 0.9,
            ..RmsProp::default()
        };
        let got = first_step_of_example(Algorithm::RmsProp(rms), 0.1);
        assert_close(&got, &[0.90000005, -1.900000025, 0.4000000286], 1e-6);
    }

    #[test]
    fn device_path_matches_fused_path() {
        // f64 parameters on the CPU take the device path (the in-place ops a GPU runs, on an f32
        // copy); both must agree to rounding.
        let algorithms = [
            Algorithm::AdamW(AdamW::default()),
            Algorithm::RmsProp(RmsProp::default()),
            Algorithm::RmsProp(RmsProp {
                momentum: 0.9,
                ..RmsProp::default()
            }),
        ];
        for algorithm in algorithms {
            let fused = var(&[1.0, -2.0, 0.5]);
            let generic = Var::from_slice(&[1.0f64, -2.0, 0.5], 3, &Device::Cpu).unwrap();
            let mut fused_opt = Optimizer::new(single("p", &fused, 0.1), algorithm, 0.01).unwrap();
            let mut generic_opt =
                Optimizer::new(single("p", &generic, 0.1), algorithm, 0.01).unwrap();
            for step in 0..3 {
                let g = [0.1 + step as f32, -0.2, 0.3 * step as f32];
                fused_opt.step(&grads_for(&[(&fused, &g)])).unwrap();
                let mut grads = GradStore::default();
                let g64: Vec<f64> = g.iter().map(|&x| x.into()).collect();
                grads.insert(
                    generic.as_tensor(),
                    Tensor::new(g64.as_slice(), &Device::Cpu).unwrap(),
                );
                generic_opt.step(&grads).unwrap();
            }
            let expected = generic.as_tensor().to_vec1::<f64>().unwrap();
            assert_close(
                &fused.as_tensor().to_vec1::<f32>().unwrap(),
                &expected,
                1e-6,
            );
        }
    }

    #[test]
    fn step_refuses_missing_gradient_and_changes_nothing() {
        let a = var(&[1.0, 2.0]);
        let b = var(&[3.0]);
        let params = vec![("a".to_string(), a.clone()), ("b".to_string(), b.clone())];
        let grads = grads_for(&[(&a, &[0.5, 0.5])]);
        assert_eq!(missing_grads(&grads, &params), vec!["b".to_string()]);
        let groups = vec![ParamGroup {
            params,
            weight_decay: 0.0,
        }];
        let mut opt = Optimizer::new(groups, Algorithm::AdamW(AdamW::default()), 0.1).unwrap();
        let err = opt.step(&grads).unwrap_err().to_string();
        assert!(err.contains('b'), "{err}");
        assert_eq!(a.as_tensor().to_vec1::<f32>().unwrap(), vec![1.0, 2.0]);
        assert_eq!(opt.step_count(), 0);
    }

    #[test]
    fn rejects_bad_configuration() {
        let a = var(&[1.0]);
        let adamw = Algorithm::AdamW(AdamW::default());
        assert!(Optimizer::new(vec![], adamw, 0.1).is_err());
        assert!(Optimizer::new(single("a", &a, 0.0), adamw, f64::NAN).is_err());
        assert!(Optimizer::new(single("a", &a, -1.0), adamw, 0.1).is_err());
        let bad_beta = Algorithm::AdamW(AdamW {
            beta1: 1.0,
            ..AdamW::default()
        });
        assert!(Optimizer::new(single("a", &a, 0.0), bad_beta, 0.1).is_err());
        let twice = vec![ParamGroup {
            params: vec![("a".into(), a.clone()), ("b".into(), a.clone())],
            weight_decay: 0.0,
        }];
        assert!(Optimizer::new(twice, adamw, 0.1).is_err());
        let mut opt = Optimizer::new(single("a", &a, 0.0), adamw, 0.1).unwrap();
        opt.set_lr(-1.0);
        assert!(opt.step(&grads_for(&[(&a, &[1.0])])).is_err());
    }

    #[test]
    fn decay_groups_exempt_vectors() {
        let matrix = Var::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
        let bias = var(&[0.0, 0.0]);
        let groups = decay_groups(vec![("w".into(), matrix), ("b".into(), bias)], 0.01);
        assert_eq!(groups[0].weight_decay, 0.01);
        assert_eq!(groups[0].params[0].0, "w");
        assert_eq!(groups[1].weight_decay, 0.0);
        assert_eq!(groups[1].params[0].0, "b");
    }

    #[test]
    fn clip_grad_norm_scales_only_above_max() {
        // norm of [3, 4] and [12] is sqrt(9 + 16 + 144) = 13.
        let a = var(&[0.0, 0.0]);
        let b = var(&[0.0]);
        let mut grads = grads_for(&[(&a, &[3.0, 4.0]), (&b, &[12.0])]);
        let norm = clip_grad_norm(&mut grads, [&a, &b, &a], 26.0).unwrap();
        assert_eq!(norm, 13.0);
        assert_eq!(
            grads.get(&a).unwrap().to_vec1::<f32>().unwrap(),
            vec![3.0, 4.0]
        );
        // scale = 6.5 / (13 + 1e-6) = 0.49999996...
        let norm = clip_grad_norm(&mut grads, [&a, &b], 6.5).unwrap();
        assert_eq!(norm, 13.0);
        assert_close(
            &grads.get(&a).unwrap().to_vec1::<f32>().unwrap(),
            &[1.5, 2.0],
            1e-6,
        );
        assert_close(
            &grads.get(&b).unwrap().to_vec1::<f32>().unwrap(),
            &[6.0],
            1e-6,
        );
        assert!(clip_grad_norm(&mut grads, [&a], 0.0).is_err());
        let mut infinite = grads_for(&[(&a, &[f32::INFINITY, 0.0])]);
        assert!(clip_grad_norm(&mut infinite, [&a], 1.0).is_err());
    }

    /// Gradients that are not contiguous f32 host buffers (a GPU's, here f64 ones) take the
    /// batched path: one transfer for all of them, the same norm and scale.
    #[test]
    fn clip_grad_norm_of_device_side_gradients() {
        let a = Var::from_tensor(&Tensor::new(&[0.0f64, 0.0], &Device::Cpu).unwrap()).unwrap();
        let b = var(&[0.0]);
        let mut grads = GradStore::default();
        grads.insert(&a, Tensor::new(&[3.0f64, 4.0], &Device::Cpu).unwrap());
        grads.insert(&b, Tensor::new(&[12.0f32], &Device::Cpu).unwrap());
        let norm = clip_grad_norm(&mut grads, [&a, &b], 6.5).unwrap();
        assert_eq!(norm, 13.0);
        let scaled = grads.get(&a).unwrap().to_vec1::<f64>().unwrap();
        assert!(
            (scaled[0] - 1.5).abs() < 1e-6 && (scaled[1] - 2.0).abs() < 1e-6,
            "{scaled:?}"
        );
    }

    #[test]
    fn schedules_follow_the_hugging_face_formulas() {
        let schedule = |decay| Schedule {
            peak_lr: 1e-3,
            warmup_steps: 10,
            total_steps: 110,
            decay,
        };
        let linear = schedule(Decay::Linear);
        // warmup: step / 10; then (110 - step) / 100.
        for (step, expected) in [
            (0, 0.0),
            (5, 0.5),
            (10, 1.0),
            (60, 0.5),
            (100, 0.1),
            (110, 0.0),
            (200, 0.0),
        ] {
            assert!(
                (linear.lr_at(step) - 1e-3 * expected).abs() < 1e-15,
                "linear step {step}"
            );
        }
        let cosine = schedule(Decay::Cosine);
        // after warmup: 0.5 (1 + cos(pi (step - 10) / 100)).
        for (step, expected) in [
            (5, 0.5),
            (10, 1.0),
            (35, 0.5 * (1.0 + 0.5f64.sqrt())),
            (60, 0.5),
            (110, 0.0),
        ] {
            assert!(
                (cosine.lr_at(step) - 1e-3 * expected).abs() < 1e-15,
                "cosine step {step}"
            );
        }
        let constant = schedule(Decay::Constant);
        for (step, expected) in [(0, 0.0), (3, 0.3), (10, 1.0), (500, 1.0)] {
            assert!(
                (constant.lr_at(step) - 1e-3 * expected).abs() < 1e-15,
                "constant step {step}"
            );
        }
        let no_warmup = Schedule {
            warmup_steps: 0,
            ..linear
        };
        assert_eq!(no_warmup.lr_at(0), 1e-3);
    }

    /// Deterministic pseudo-gradients that differ per step and element.
    fn synthetic_grad(step: usize, len: usize, salt: f32) -> Vec<f32> {
        (0..len)
            .map(|i| ((step * 7 + i * 13) as f32 * 0.37 + salt).sin() * 0.1)
            .collect()
    }

    fn train(
        opt: &mut Optimizer,
        vars: &[Var],
        steps: std::ops::Range<usize>,
        schedule: &Schedule,
    ) {
        for step in steps {
            let mut grads = GradStore::default();
            for (k, v) in vars.iter().enumerate() {
                let g = synthetic_grad(step, v.elem_count(), k as f32);
                let g = Tensor::from_vec(g, v.shape(), &Device::Cpu)
                    .unwrap()
                    .to_dtype(v.dtype())
                    .unwrap();
                grads.insert(v.as_tensor(), g);
            }
            clip_grad_norm(&mut grads, vars.iter(), 0.05).unwrap();
            opt.set_lr(schedule.lr_at(opt.step_count()));
            opt.step(&grads).unwrap();
        }
    }

    fn fresh_model(dtype: DType) -> Vec<Var> {
        let w: Vec<f32> = (0..12).map(|i| (i as f32 * 0.3).cos()).collect();
        let b: Vec<f32> = (0..4).map(|i| i as f32 * 0.1 - 0.2).collect();
        [
            Tensor::from_vec(w, (3, 4), &Device::Cpu).unwrap(),
            Tensor::from_vec(b, 4, &Device::Cpu).unwrap(),
        ]
        .iter()
        .map(|t| Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap())
        .collect()
    }

    fn optimizer_for(vars: &[Var], algorithm: Algorithm) -> Optimizer {
        let named = vec![
            ("w".to_string(), vars[0].clone()),
            ("b".to_string(), vars[1].clone()),
        ];
        Optimizer::new(decay_groups(named, 0.1), algorithm, 1.0).unwrap()
    }

    fn bits(vars: &[Var]) -> Vec<u64> {
        vars.iter()
            .flat_map(|v| {
                v.flatten_all()
                    .unwrap()
                    .to_dtype(DType::F64)
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap()
            })
            .map(f64::to_bits)
            .collect()
    }

    #[test]
    fn resumed_run_equals_uninterrupted_bit_for_bit() {
        let schedule = Schedule {
            peak_lr: 1e-2,
            warmup_steps: 2,
            total_steps: 8,
            decay: Decay::Cosine,
        };
        let algorithms = [
            Algorithm::AdamW(AdamW {
                beta1: 0.8,
                beta2: 0.95,
                eps: 1e-6,
            }),
            Algorithm::RmsProp(RmsProp {
                momentum: 0.9,
                ..RmsProp::default()
            }),
        ];
        let dir = tempfile::tempdir().unwrap();
        for dtype in [DType::F32, DType::F64] {
            for algorithm in algorithms {
                let straight = fresh_model(dtype);
                let mut opt = optimizer_for(&straight, algorithm);
                train(&mut opt, &straight, 0..8, &schedule);

                let first_half = fresh_model(dtype);
                let mut opt = optimizer_for(&first_half, algorithm);
                train(&mut opt, &first_half, 0..4, &schedule);
                let path = dir.path().join("optimizer.safetensors");
                opt.save_state(&path).unwrap();

                // A new process: parameters restored from the model checkpoint, optimiser from
                // its state, created with different hyperparameters that the file overrides.
                let resumed: Vec<Var> = first_half
                    .iter()
                    .map(|v| Var::from_tensor(&v.copy().unwrap()).unwrap())
                    .collect();
                let mut opt = optimizer_for(&resumed, Algorithm::AdamW(AdamW::default()));
                opt.load_state(&path).unwrap();
                assert_eq!(opt.step_count(), 4);
                assert_eq!(opt.algorithm(), &algorithm);
                train(&mut opt, &resumed, 4..8, &schedule);
                assert_eq!(bits(&straight), bits(&resumed), "{algorithm:?} {dtype:?}");
            }
        }
    }

    #[test]
    fn load_state_rejects_other_parameters_and_keeps_state() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.safetensors");
        let a = var(&[1.0, 2.0]);
        let mut opt = Optimizer::new(
            single("a", &a, 0.0),
            Algorithm::AdamW(AdamW::default()),
            0.1,
        )
        .unwrap();
        opt.step(&grads_for(&[(&a, &[1.0, 1.0])])).unwrap();
        opt.save_state(&path).unwrap();

        let other = var(&[1.0, 2.0]);
        let mut renamed = Optimizer::new(
            single("z", &other, 0.0),
            Algorithm::AdamW(AdamW::default()),
            0.1,
        )
        .unwrap();
        let err = renamed.load_state(&path).unwrap_err().to_string();
        assert!(err.contains('z') && err.contains('a'), "{err}");
        assert_eq!(renamed.step_count(), 0);

        let wider = var(&[1.0, 2.0, 3.0]);
        let mut reshaped = Optimizer::new(
            single("a", &wider, 0.0),
            Algorithm::AdamW(AdamW::default()),
            0.1,
        )
        .unwrap();
        assert!(reshaped.load_state(&path).is_err());

        let not_state = dir.path().join("garbage.safetensors");
        std::fs::write(&not_state, b"not a safetensors file").unwrap();
        assert!(opt.load_state(&not_state).is_err());
        assert_eq!(opt.step_count(), 1);
    }
}

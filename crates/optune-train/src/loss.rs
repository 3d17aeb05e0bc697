//! Losses of `opt-wdpo`: the DPO family, SimPO, the NLL term of RPO and SFT, the wDPO pair
//! weights and HyPO's KL term.
//!
//! All losses are candle tensor ops, so `backward()` gives their gradients with respect to the
//! policy log-probs. Inputs are rank-1 tensors of per-sequence log-probs (`[batch]`, any float
//! dtype; `f32` in training, `f64` in the gradient tests).
//!
//! # DPO variants ([`dpo_losses`])
//!
//! The per-pair losses and implicit rewards are those of TRL's `DPOTrainer.dpo_loss` (TRL 0.25,
//! reverse-KL, with a reference model). With the logit `l = (πc − πr) − (refc − refr)`, `β` and
//! label smoothing `ε`:
//!
//! | [`DpoLoss`] | TRL `loss_type` | per-pair loss |
//! | --- | --- | --- |
//! | `Sigmoid` | `sigmoid` | `−logσ(βl)(1−ε) − logσ(−βl)ε` (DPO; cDPO when `ε > 0`) |
//! | `Ipo` | `ipo` | `(l − 1/(2β))²` |
//! | `Hinge` | `hinge` | `relu(1 − βl)` (SLiC) |
//! | `Robust` | `robust` | `(−logσ(βl)(1−ε) + logσ(−βl)ε)/(1−2ε)` (rDPO) |
//!
//! Like TRL, `Ipo` and `Hinge` ignore `ε` (TRL logs a warning; [`DpoLoss::uses_label_smoothing`]
//! lets a caller do the same or refuse).
//!
//! **IPO takes mean log-probs.** With `loss_type="ipo"` TRL divides every sequence's summed
//! log-prob by its number of completion tokens, for the policy *and* the reference, before
//! calling `dpo_loss`; its rewards are then also computed from those means. The caller must do
//! the same: pass per-token *average* log-probs to [`dpo_losses`] for [`DpoLoss::Ipo`], summed
//! log-probs for the other kinds. With summed log-probs the IPO target `1/(2β)` is on the wrong
//! scale and the squared loss grows with the length of the responses.
//!
//! `logσ` is computed as `x/2 − |x|/2 − ln(1 + e^{−|x|})`: stable for any `x` (the exponent is
//! never positive) and built only from ops candle can differentiate. The form
//! `min(x, 0) − ln(1 + e^{−|x|})` has the same value but a wrong gradient at exactly `x = 0`:
//! candle differentiates `|x|` at 0 as +1 and `min(x, 0)` as ½ (`−relu(−x)` as 1), giving 1
//! (or 1.5) instead of ½ — and `x = 0` is every pair on the first step, when policy and
//! reference are the same model. Here the kink of `|x|` enters only through `−a/2 − ln(1 + e^{−a})`, whose
//! derivative at `a = 0` is 0, so either convention gives the right gradient.
//!
//! # SimPO ([`simpo_losses`])
//!
//! SimPO (Meng et al. 2024, arXiv 2405.14734) needs no reference model: its implicit reward is
//! the policy's per-token *mean* log-prob scaled by `β`, and it asks the chosen reply to win by
//! a target margin `γ`. The per-pair loss is that of TRL's `CPOTrainer.cpo_loss` with
//! `loss_type="simpo"` (and `cpo_alpha = 0`, which TRL's SimPO setting implies): with
//! `l = (π̄c − π̄r) − γ/β` on mean log-probs `π̄`, `−logσ(βl)(1−ε) − logσ(−βl)ε`. Its rewards are
//! `β π̄c` and `β π̄r`.
//!
//! # The NLL term: RPO and SFT ([`chosen_nll`])
//!
//! RPO (Pang et al. 2024, arXiv 2404.19733; TRL's `rpo_alpha`) adds `α ×` the negative
//! log-likelihood of the chosen replies to the DPO loss, and SFT on the chosen replies (TRL's
//! `loss_type="sft"`; Best-of-N or rejection-sampling fine-tuning when the pairs come from
//! `opt-pairs`) is that NLL alone. TRL computes it as one cross-entropy over all chosen reply
//! tokens of the batch: `Σᵢ(−log π(yᵢ)) / Σᵢ nᵢ` with `nᵢ` reply tokens (EOS included), a
//! token-level mean, not the mean of per-reply means. [`chosen_nll`] weighs each reply's tokens
//! by its pair's weight, `Σᵢ wᵢ(−log π(yᵢ)) / Σᵢ nᵢ`, which is TRL's value when every weight is 1.
//! So RPO's batch loss is `weighted_mean(dpo) + α · chosen_nll` and SFT's is `chosen_nll`.
//! (TRL's cross-entropy ignores every label equal to 0, the id it fills masked positions with,
//! so a reply that really contains token 0 loses that token there; here every reply token
//! counts.)
//!
//! # wDPO weights ([`pair_weights`], [`weighted_mean`])
//!
//! OPTune (Chen et al. 2024, arXiv 2406.07657) multiplies each pair's loss by a weight that grows
//! with `β2 × reward_gap`, where the reward gap is the reward-model score of the chosen response
//! minus that of the rejected one, and says no more about its form. Every reading is available
//! ([`WeightForm`]): `exp(β2·gap)`, `1 + β2·gap`, `2·sigmoid(β2·gap)`, or no weight; each can be
//! rescaled to mean 1 within the batch ([`WeightNorm::Batch`]). The weights are constants: they
//! come from the reward model, not the policy, and are not differentiated.
//!
//! **Recommended default: `exp` with batch normalisation.** `exp(β2·gap)` is the natural reading
//! of "reward-weighted" (the Boltzmann weight of reward-weighted regression) and the only form
//! whose emphasis keeps growing with the gap (`sigmoid` saturates at 2×, so a pair with a far
//! larger gap weighs at most twice a tie; `linear` grows only in proportion). Normalising to mean
//! 1 within the batch turns the weights into `B · softmax(β2·gap)`: they move the batch's gradient
//! toward its most informative pairs but keep its total weight equal to plain DPO's, so the
//! effective learning rate, and the gradient norm that clipping sees, stay on the scale the
//! schedule was tuned for whatever `β2` and the reward model's scale. Without normalisation
//! large gaps break training: reward models are unnormalised (gaps of 5–20 are common), so at
//! `β2 = 1` a gap of 10 multiplies that pair's loss by e¹⁰ ≈ 22 000. The step is orders of
//! magnitude larger than the schedule intends, gradient clipping fires on every step so the
//! learning rate stops meaning anything, the step size swings from batch to batch with the
//! rewards in it, and beyond `β2·gap ≈ 88.7` the `f32` weight overflows to infinity
//! ([`pair_weights`] then returns an error rather than a NaN loss).
//!
//! # HyPO's KL term ([`loo_reinforce_kl`])
//!
//! HyPO (Song et al. 2024, arXiv 2406.01462) adds `λ · KL(π‖π_ref)` estimated on `k` fresh
//! samples per prompt from the current policy. [`loo_reinforce_kl`] returns a surrogate whose
//! gradient is the leave-one-out REINFORCE estimate of `∇KL`, and the KL estimate itself for
//! logging.

use std::fmt;
use std::str::FromStr;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

/// The DPO-family loss applied to each preference pair, named as TRL's `loss_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DpoLoss {
    /// DPO (Rafailov et al. 2023); with label smoothing, conservative DPO (cDPO).
    Sigmoid,
    /// IPO (Azar et al. 2023). Takes per-token mean log-probs, see the module documentation.
    Ipo,
    /// Hinge loss on the normalised likelihood (SLiC, Zhao et al. 2023).
    Hinge,
    /// Robust DPO (Chowdhury et al. 2024): unbiased under label noise of rate `ε`.
    Robust,
}

impl DpoLoss {
    pub const ALL: [DpoLoss; 4] = [
        DpoLoss::Sigmoid,
        DpoLoss::Ipo,
        DpoLoss::Hinge,
        DpoLoss::Robust,
    ];

    /// TRL's `loss_type` name.
    pub fn name(self) -> &'static str {
        match self {
            DpoLoss::Sigmoid => "sigmoid",
            DpoLoss::Ipo => "ipo",
            DpoLoss::Hinge => "hinge",
            DpoLoss::Robust => "robust",
        }
    }

    /// Whether the loss depends on the label smoothing `ε` (TRL ignores it for `ipo` and `hinge`).
    pub fn uses_label_smoothing(self) -> bool {
        matches!(self, DpoLoss::Sigmoid | DpoLoss::Robust)
    }

    /// Whether the loss expects per-token mean log-probs instead of summed ones.
    pub fn uses_mean_logps(self) -> bool {
        self == DpoLoss::Ipo
    }
}

impl fmt::Display for DpoLoss {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DpoLoss {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        match DpoLoss::ALL.into_iter().find(|kind| kind.name() == s) {
            Some(kind) => Ok(kind),
            None => bail!("unknown DPO loss {s:?}: expected sigmoid, ipo, hinge or robust"),
        }
    }
}

/// What a training run minimises: one of the pair losses of [`DpoLoss`], HyPO (the sigmoid
/// pair loss plus `λ · KL(π‖π_ref)` on fresh samples, see [`loo_reinforce_kl`]), SimPO, RPO or
/// SFT (see [`batch_loss`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum Objective {
    /// DPO; cDPO with label smoothing
    Sigmoid,
    /// IPO, on per-token mean log-probs
    Ipo,
    /// SLiC's hinge loss
    Hinge,
    /// Robust DPO under label noise of rate ε
    Robust,
    /// DPO plus λ·KL(π‖π_ref) estimated on fresh samples (leave-one-out REINFORCE)
    Hypo,
    /// SimPO: reference-free, length-normalised, target margin γ (TRL CPOTrainer "simpo")
    Simpo,
    /// RPO: DPO plus α × the NLL of the chosen reply (TRL rpo_alpha)
    Rpo,
    /// SFT on the chosen reply alone: its NLL (Best-of-N / rejection-sampling fine-tuning)
    Sft,
}

impl Objective {
    /// The DPO-family loss applied to each pair; `None` for the reference-free SimPO and SFT.
    pub fn pair_loss(self) -> Option<DpoLoss> {
        match self {
            Objective::Sigmoid | Objective::Hypo | Objective::Rpo => Some(DpoLoss::Sigmoid),
            Objective::Ipo => Some(DpoLoss::Ipo),
            Objective::Hinge => Some(DpoLoss::Hinge),
            Objective::Robust => Some(DpoLoss::Robust),
            Objective::Simpo | Objective::Sft => None,
        }
    }

    /// Whether the loss reads reference log-probs of the pairs.
    pub fn needs_reference(self) -> bool {
        self.pair_loss().is_some()
    }

    /// Whether the pair loss takes per-token mean log-probs (IPO, SimPO) instead of sums.
    pub fn uses_mean_logps(self) -> bool {
        match self.pair_loss() {
            Some(kind) => kind.uses_mean_logps(),
            None => self == Objective::Simpo,
        }
    }

    /// Whether the loss reads a pair only through the difference between its two sides, so that
    /// a pair whose chosen and rejected sequences are the same tokens adds a constant to it and
    /// nothing to the gradient. RPO and SFT also train on the chosen reply alone, and HyPO on
    /// fresh samples of the pair's prompt.
    pub fn only_compares_sides(self) -> bool {
        !matches!(self, Objective::Hypo | Objective::Rpo | Objective::Sft)
    }

    /// Whether training needs fresh samples from the policy (and so a reference model at hand).
    pub fn samples_online(self) -> bool {
        self == Objective::Hypo
    }
}

/// The constants of an [`Objective`]'s loss.
#[derive(Clone, Copy, Debug)]
pub struct ObjectiveParams {
    /// `β` of the DPO family and of SimPO.
    pub beta: f64,
    /// `ε` of sigmoid, robust and SimPO.
    pub label_smoothing: f64,
    /// SimPO's target margin `γ`.
    pub simpo_gamma: f64,
    /// RPO's NLL weight `α`.
    pub rpo_alpha: f64,
}

/// The log-probs of one batch of pairs that an objective reads, each `[batch]`.
pub struct BatchLogps<'a> {
    /// The policy's log-probs of the chosen and rejected replies: per-token means when
    /// [`Objective::uses_mean_logps`], else sums.
    pub chosen: &'a Tensor,
    pub rejected: &'a Tensor,
    /// The reference's log-probs of the same kind; needed when [`Objective::needs_reference`].
    pub reference: Option<(&'a Tensor, &'a Tensor)>,
    /// The policy's *summed* log-probs of the chosen replies and their lengths in tokens, for
    /// the NLL term.
    pub chosen_sums: &'a Tensor,
    pub chosen_tokens: &'a [usize],
}

/// The batch loss of `objective` with pair weights `weights`, and the per-pair results for the
/// metrics:
///
/// - DPO family (and HyPO's pair part): `weighted_mean(dpo_losses)`;
/// - SimPO: `weighted_mean(simpo_losses)`;
/// - RPO: `weighted_mean(sigmoid dpo_losses) + α · chosen_nll`;
/// - SFT: `chosen_nll`; its per-pair "losses" are each reply's per-token NLL and its rewards 0,
///   as TRL logs them for `loss_type="sft"`.
pub fn batch_loss(
    objective: Objective,
    params: &ObjectiveParams,
    logps: &BatchLogps,
    weights: &[f32],
) -> Result<(Tensor, PairLosses)> {
    if objective == Objective::Sft {
        let nll = chosen_nll(logps.chosen_sums, logps.chosen_tokens, weights)?;
        let tokens: Vec<f32> = logps.chosen_tokens.iter().map(|&n| n as f32).collect();
        let tokens = Tensor::from_slice(&tokens, tokens.len(), logps.chosen_sums.device())?
            .to_dtype(logps.chosen_sums.dtype())?;
        let zeros = logps.chosen_sums.zeros_like()?;
        let per_pair = PairLosses {
            losses: (logps.chosen_sums.neg()? / tokens)?.detach(),
            chosen_rewards: zeros.clone(),
            rejected_rewards: zeros,
        };
        return Ok((nll, per_pair));
    }
    let pairs = match objective.pair_loss() {
        Some(kind) => {
            let Some((ref_chosen, ref_rejected)) = logps.reference else {
                bail!("the {kind} loss needs reference log-probs");
            };
            dpo_losses(
                kind,
                params.beta,
                params.label_smoothing,
                logps.chosen,
                logps.rejected,
                ref_chosen,
                ref_rejected,
            )?
        }
        None => simpo_losses(
            params.beta,
            params.simpo_gamma,
            params.label_smoothing,
            logps.chosen,
            logps.rejected,
        )?,
    };
    let mut loss = weighted_mean(&pairs.losses, weights)?;
    if objective == Objective::Rpo {
        ensure!(
            params.rpo_alpha.is_finite() && params.rpo_alpha >= 0.0,
            "the RPO weight alpha must be finite and >= 0, got {}",
            params.rpo_alpha
        );
        let nll = chosen_nll(logps.chosen_sums, logps.chosen_tokens, weights)?;
        loss = (loss + (nll * params.rpo_alpha)?)?;
    }
    Ok((loss, pairs))
}

/// Per-pair results of [`dpo_losses`], each `[batch]`.
#[derive(Clone, Debug)]
pub struct PairLosses {
    /// The loss of each pair, differentiable with respect to the policy log-probs.
    pub losses: Tensor,
    /// `β (πc − refc)`, detached: TRL's `chosen_rewards`.
    pub chosen_rewards: Tensor,
    /// `β (πr − refr)`, detached: TRL's `rejected_rewards`.
    pub rejected_rewards: Tensor,
}

/// `log σ(x) = x/2 − |x|/2 − ln(1 + e^{−|x|})`, elementwise; see the module documentation for
/// why this form and not `min(x, 0) − …`.
pub fn log_sigmoid(x: &Tensor) -> Result<Tensor> {
    let abs = x.abs()?;
    let log_term = (abs.neg()?.exp()? + 1.0)?.log()?;
    Ok(((x - &abs)?.affine(0.5, 0.0)? - log_term)?)
}

/// `−logσ(z)(1−ε) − logσ(−z)ε`: DPO's and SimPO's loss of the scaled logit `z`.
fn smoothed_sigmoid_loss(z: &Tensor, eps: f64) -> Result<Tensor> {
    let pos = log_sigmoid(z)?;
    let neg = log_sigmoid(&z.neg()?)?;
    Ok((pos.affine(-(1.0 - eps), 0.0)? - neg.affine(eps, 0.0)?)?)
}

fn check_beta(beta: f64) -> Result<()> {
    ensure!(
        beta.is_finite() && beta > 0.0,
        "beta must be finite and > 0, got {beta}"
    );
    Ok(())
}

fn check_label_smoothing(eps: f64) -> Result<()> {
    ensure!(
        (0.0..=0.5).contains(&eps),
        "label smoothing must be in [0, 0.5], got {eps}"
    );
    Ok(())
}

fn check_logps(name: &str, t: &Tensor, like: &Tensor) -> Result<()> {
    ensure!(
        t.rank() == 1,
        "{name} must be a [batch] tensor, got shape {:?}",
        t.dims()
    );
    ensure!(
        t.dims() == like.dims(),
        "{name} has shape {:?}, policy_chosen has {:?}",
        t.dims(),
        like.dims()
    );
    ensure!(
        t.dtype() == like.dtype(),
        "{name} is {:?}, policy_chosen is {:?}",
        t.dtype(),
        like.dtype()
    );
    Ok(())
}

/// TRL's `DPOTrainer.dpo_loss` for `kind`: per-pair losses and detached implicit rewards.
///
/// All four inputs are `[batch]` log-probs of the same dtype; the gradient flows to the policy
/// ones (the reference ones may be plain constants). Pass summed log-probs, except for
/// [`DpoLoss::Ipo`], which takes per-token mean log-probs of both models (as TRL computes them for
/// `loss_type="ipo"`). `beta` must be finite and > 0. `label_smoothing` must be in `[0, 0.5]`
/// (`[0, 0.5)` for `Robust`, which divides by `1 − 2ε`); `Ipo` and `Hinge` ignore it, as TRL does.
pub fn dpo_losses(
    kind: DpoLoss,
    beta: f64,
    label_smoothing: f64,
    policy_chosen: &Tensor,
    policy_rejected: &Tensor,
    ref_chosen: &Tensor,
    ref_rejected: &Tensor,
) -> Result<PairLosses> {
    check_beta(beta)?;
    let eps = label_smoothing;
    check_label_smoothing(eps)?;
    ensure!(
        !(kind == DpoLoss::Robust && eps == 0.5),
        "the robust loss divides by 1 - 2 * label_smoothing: label smoothing must be < 0.5"
    );
    ensure!(
        policy_chosen.rank() == 1,
        "policy_chosen must be a [batch] tensor, got shape {:?}",
        policy_chosen.dims()
    );
    check_logps("policy_rejected", policy_rejected, policy_chosen)?;
    check_logps("ref_chosen", ref_chosen, policy_chosen)?;
    check_logps("ref_rejected", ref_rejected, policy_chosen)?;

    // The same association as TRL: (πc − πr) − (refc − refr).
    let logits = ((policy_chosen - policy_rejected)? - (ref_chosen - ref_rejected)?)?;
    let losses = match kind {
        DpoLoss::Sigmoid => smoothed_sigmoid_loss(&logits.affine(beta, 0.0)?, eps)?,
        DpoLoss::Robust => {
            let z = logits.affine(beta, 0.0)?;
            let pos = log_sigmoid(&z)?;
            let neg = log_sigmoid(&z.neg()?)?;
            (pos.affine(-(1.0 - eps), 0.0)? + neg.affine(eps, 0.0)?)?
                .affine(1.0 / (1.0 - 2.0 * eps), 0.0)?
        }
        DpoLoss::Ipo => logits.affine(1.0, -1.0 / (2.0 * beta))?.sqr()?,
        DpoLoss::Hinge => logits.affine(-beta, 1.0)?.relu()?,
    };
    let chosen_rewards = (policy_chosen - ref_chosen)?.affine(beta, 0.0)?.detach();
    let rejected_rewards = (policy_rejected - ref_rejected)?
        .affine(beta, 0.0)?
        .detach();
    Ok(PairLosses {
        losses,
        chosen_rewards,
        rejected_rewards,
    })
}

/// TRL's `CPOTrainer.cpo_loss` with `loss_type="simpo"`: per-pair SimPO losses and detached
/// rewards `β π̄`.
///
/// Takes the policy's per-token *mean* log-probs of the chosen and rejected replies (`[batch]`,
/// same dtype), as TRL computes them for SimPO; no reference. `beta` must be finite and > 0,
/// `gamma` (the target margin γ) finite, `label_smoothing` in `[0, 0.5]`.
pub fn simpo_losses(
    beta: f64,
    gamma: f64,
    label_smoothing: f64,
    policy_chosen_mean: &Tensor,
    policy_rejected_mean: &Tensor,
) -> Result<PairLosses> {
    check_beta(beta)?;
    ensure!(
        gamma.is_finite(),
        "the SimPO margin gamma must be finite, got {gamma}"
    );
    check_label_smoothing(label_smoothing)?;
    ensure!(
        policy_chosen_mean.rank() == 1,
        "policy_chosen must be a [batch] tensor, got shape {:?}",
        policy_chosen_mean.dims()
    );
    check_logps("policy_rejected", policy_rejected_mean, policy_chosen_mean)?;
    // TRL: logits = (πc − πr) − γ/β, then the sigmoid loss of β·logits.
    let logits = (policy_chosen_mean - policy_rejected_mean)?.affine(1.0, -gamma / beta)?;
    let losses = smoothed_sigmoid_loss(&logits.affine(beta, 0.0)?, label_smoothing)?;
    Ok(PairLosses {
        losses,
        chosen_rewards: policy_chosen_mean.affine(beta, 0.0)?.detach(),
        rejected_rewards: policy_rejected_mean.affine(beta, 0.0)?.detach(),
    })
}

/// The weighted NLL of the chosen replies, `Σᵢ wᵢ(−log π(yᵢ)) / Σᵢ nᵢ`: RPO's extra term and
/// SFT's loss (see the module documentation).
///
/// `chosen_logps` are the policy's *summed* log-probs of the chosen replies (`[batch]`,
/// differentiable), `chosen_tokens` their lengths in tokens (EOS included), `weights` the pair
/// weights (all 1: TRL's `nll_loss`).
pub fn chosen_nll(
    chosen_logps: &Tensor,
    chosen_tokens: &[usize],
    weights: &[f32],
) -> Result<Tensor> {
    ensure!(
        chosen_logps.rank() == 1,
        "chosen log-probs must be a [batch] tensor, got shape {:?}",
        chosen_logps.dims()
    );
    let n = chosen_logps.dim(0)?;
    ensure!(
        chosen_tokens.len() == n && weights.len() == n,
        "{} token counts and {} weights for {n} chosen log-probs",
        chosen_tokens.len(),
        weights.len()
    );
    let tokens: usize = chosen_tokens.iter().sum();
    ensure!(
        tokens > 0,
        "the chosen replies hold no tokens: no NLL to take"
    );
    let w =
        Tensor::from_slice(weights, n, chosen_logps.device())?.to_dtype(chosen_logps.dtype())?;
    Ok((chosen_logps * w)?
        .sum_all()?
        .affine(-1.0 / tokens as f64, 0.0)?)
}

/// How a pair's weight grows with `β2 × reward_gap` (`x` below).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum WeightForm {
    /// Every weight 1: plain DPO.
    None,
    /// `exp(x)`: unbounded, the recommended default (with `--weight-norm batch`).
    #[default]
    Exp,
    /// `1 + x`.
    Linear,
    /// `2·sigmoid(x)`: 1 at a zero gap, approaching 2.
    Sigmoid,
}

impl WeightForm {
    pub const ALL: [WeightForm; 4] = [
        WeightForm::None,
        WeightForm::Exp,
        WeightForm::Linear,
        WeightForm::Sigmoid,
    ];

    pub fn name(self) -> &'static str {
        match self {
            WeightForm::None => "none",
            WeightForm::Exp => "exp",
            WeightForm::Linear => "linear",
            WeightForm::Sigmoid => "sigmoid",
        }
    }
}

impl fmt::Display for WeightForm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for WeightForm {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        match WeightForm::ALL.into_iter().find(|form| form.name() == s) {
            Some(form) => Ok(form),
            None => bail!("unknown weight form {s:?}: expected none, exp, linear or sigmoid"),
        }
    }
}

/// Whether pair weights are rescaled after [`WeightForm`] is applied.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum WeightNorm {
    /// Divide by the batch's mean weight, so the weights average 1 (the recommended default).
    #[default]
    Batch,
    /// Use the weights as they are.
    None,
}

impl WeightNorm {
    pub fn name(self) -> &'static str {
        match self {
            WeightNorm::Batch => "batch",
            WeightNorm::None => "none",
        }
    }
}

impl fmt::Display for WeightNorm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for WeightNorm {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "batch" => Ok(WeightNorm::Batch),
            "none" => Ok(WeightNorm::None),
            _ => bail!("unknown weight normalisation {s:?}: expected batch or none"),
        }
    }
}

/// The wDPO weight of each pair from its reward gap (chosen score − rejected score).
///
/// Negative gaps are clamped to 0, giving the pair the weight of a tie. Pairs are built with
/// the higher-scored response as chosen, so a gap is ≥ 0 by construction; a negative one can
/// only come from outside data whose stored scores disagree with its labels (or from rounding).
/// Left negative it would give `exp` a weight below a tie's and `linear` a weight that can reach
/// 0 or go negative, which would silence the pair or train *toward* the rejected response; the
/// label, not the score, says which response is preferred, so the pair keeps the base weight.
///
/// With [`WeightNorm::Batch`] the weights are divided by their mean (for `exp` computed as
/// `B·softmax(β2·gap)`, which cannot overflow). Errors on a negative or non-finite `beta2`, a
/// NaN or infinite gap, or a weight that overflows `f32` (only possible with `WeightNorm::None`).
pub fn pair_weights(
    form: WeightForm,
    beta2: f64,
    reward_gaps: &[f32],
    norm: WeightNorm,
) -> Result<Vec<f32>> {
    ensure!(
        beta2.is_finite() && beta2 >= 0.0,
        "beta2 must be finite and >= 0, got {beta2}"
    );
    if let Some(i) = reward_gaps.iter().position(|g| !g.is_finite()) {
        bail!("reward gap {i} is {}", reward_gaps[i]);
    }
    let x: Vec<f64> = reward_gaps
        .iter()
        .map(|&g| beta2 * f64::from(g.max(0.0)))
        .collect();
    // For exp with batch normalisation, subtract the largest exponent first: the ratio to the
    // mean is unchanged and nothing overflows.
    let shift = match (form, norm) {
        (WeightForm::Exp, WeightNorm::Batch) => x.iter().copied().fold(0.0, f64::max),
        _ => 0.0,
    };
    let mut weights: Vec<f64> = x
        .iter()
        .map(|&x| match form {
            WeightForm::None => 1.0,
            WeightForm::Exp => (x - shift).exp(),
            WeightForm::Linear => 1.0 + x,
            WeightForm::Sigmoid => 2.0 / (1.0 + (-x).exp()),
        })
        .collect();
    normalise(&mut weights, norm);
    let weights: Vec<f32> = weights.into_iter().map(|w| w as f32).collect();
    if let Some(i) = weights.iter().position(|w| !w.is_finite()) {
        bail!(
            "the {form} weight of pair {i} (beta2 {beta2} x gap {}) overflows f32: lower --beta2 \
             or normalise the weights per batch",
            reward_gaps[i]
        );
    }
    Ok(weights)
}

/// Pair weights given as they are, from a column of the pairs (`opt-wdpo --weight-col`), with
/// the same normalisation as [`pair_weights`]. Each must be finite and ≥ 0. A batch whose
/// weights are all 0 keeps them at 0 under [`WeightNorm::Batch`] (there is no mean to rescale
/// to): it contributes nothing.
pub fn given_weights(values: &[f64], norm: WeightNorm) -> Result<Vec<f32>> {
    if let Some(i) = values.iter().position(|w| !(w.is_finite() && *w >= 0.0)) {
        bail!(
            "weight {i} is {}: weights must be finite and >= 0",
            values[i]
        );
    }
    let mut weights = values.to_vec();
    normalise(&mut weights, norm);
    let weights: Vec<f32> = weights.into_iter().map(|w| w as f32).collect();
    if let Some(i) = weights.iter().position(|w| !w.is_finite()) {
        bail!("weight {i} ({}) overflows f32", values[i]);
    }
    Ok(weights)
}

/// Divides the weights by their mean under [`WeightNorm::Batch`] (unless the mean is 0).
fn normalise(weights: &mut [f64], norm: WeightNorm) {
    if norm == WeightNorm::Batch && !weights.is_empty() {
        let mean = weights.iter().sum::<f64>() / weights.len() as f64;
        if mean > 0.0 {
            weights.iter_mut().for_each(|w| *w /= mean);
        }
    }
}

/// `Σ wᵢ·lossᵢ / batch`: the batch loss of wDPO (`weights` all 1 gives the plain mean).
pub fn weighted_mean(losses: &Tensor, weights: &[f32]) -> Result<Tensor> {
    ensure!(
        losses.rank() == 1,
        "losses must be a [batch] tensor, got shape {:?}",
        losses.dims()
    );
    let n = losses.dim(0)?;
    ensure!(n > 0, "weighted_mean of an empty batch");
    ensure!(
        weights.len() == n,
        "{} weights for {n} losses",
        weights.len()
    );
    let w = Tensor::from_slice(weights, n, losses.device())?.to_dtype(losses.dtype())?;
    Ok((losses * w)?.mean_all()?)
}

/// HyPO's reverse-KL term with the leave-one-out REINFORCE estimator.
///
/// `policy_logps` (`[prompts·k]`, differentiable) are the current policy's summed log-probs of
/// `k` samples per prompt drawn from that policy, prompt-major (prompt `p`'s samples at
/// `p·k .. p·k + k`); `ref_logps` are the reference model's log-probs of the same samples. With
/// the per-sample value `vᵢ = stop-grad(log π(yᵢ) − log π_ref(yᵢ))` and the baseline `bᵢ`, the
/// mean of the values of the other `k − 1` samples of the same prompt, returns
///
/// - the surrogate `mean((vᵢ − bᵢ) · log π(yᵢ))` over all `n = prompts·k` samples, whose
///   gradient `(1/n) Σ (vᵢ − bᵢ) ∇log π(yᵢ)` is an unbiased estimate of `∇KL(π‖π_ref)` (add
///   `λ ×` it to the DPO loss; its *value* means nothing, log the second result instead);
/// - the KL estimate `mean(vᵢ)`.
///
/// Why this is the gradient: `∇ E_π[log π − log π_ref] = E_π[(log π − log π_ref) ∇log π] +
/// E_π[∇log π]`. The second, pathwise term is `∇ Σ_y π(y) = ∇1 = 0` in expectation, so it is
/// dropped (keeping its sample value would only add variance). Subtracting `bᵢ` keeps the
/// estimate unbiased because `bᵢ` depends only on the other samples, independent of `yᵢ`, so
/// `E[bᵢ ∇log π(yᵢ)] = E[bᵢ] E[∇log π(yᵢ)] = 0`; it lowers the variance. Needs `k ≥ 2`.
pub fn loo_reinforce_kl(
    policy_logps: &Tensor,
    ref_logps: &[f32],
    k: usize,
) -> Result<(Tensor, f32)> {
    ensure!(
        k >= 2,
        "the leave-one-out KL estimate needs at least 2 samples per prompt, got k = {k}"
    );
    ensure!(
        policy_logps.rank() == 1,
        "policy_logps must be a [prompts * k] tensor, got shape {:?}",
        policy_logps.dims()
    );
    let n = policy_logps.dim(0)?;
    ensure!(
        n > 0 && n % k == 0,
        "{n} policy log-probs are not a positive multiple of k = {k}"
    );
    ensure!(
        ref_logps.len() == n,
        "{} reference log-probs for {n} policy log-probs",
        ref_logps.len()
    );
    let policy: Vec<f64> = policy_logps
        .detach()
        .to_dtype(DType::F64)?
        .to_vec1()
        .context("reading the policy log-probs")?;
    let values: Vec<f64> = policy
        .iter()
        .zip(ref_logps)
        .map(|(&p, &r)| p - f64::from(r))
        .collect();
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        bail!(
            "sample {i}: log pi - log pi_ref is not finite (policy {}, reference {})",
            policy[i],
            ref_logps[i]
        );
    }
    let mut advantages = Vec::with_capacity(n);
    for group in values.chunks(k) {
        let sum: f64 = group.iter().sum();
        advantages.extend(group.iter().map(|&v| v - (sum - v) / (k - 1) as f64));
    }
    let kl = values.iter().sum::<f64>() / n as f64;
    let advantages =
        Tensor::from_vec(advantages, n, policy_logps.device())?.to_dtype(policy_logps.dtype())?;
    let surrogate = (policy_logps * advantages)?.mean_all()?;
    Ok((surrogate, kl as f32))
}

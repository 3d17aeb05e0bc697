//! The losses of `opt-wdpo` (src/loss.rs): hand-computed values, TRL's own `dpo_loss`,
//! `cpo_loss` (SimPO) and RPO/SFT batch losses (testdata/reference/losses.json, written by
//! scripts/reference/loss_reference.py), gradients against finite differences, and the
//! leave-one-out REINFORCE KL estimator (exact per-sample gradient, and unbiasedness on a
//! categorical toy policy by Monte Carlo).

use std::f64::consts::LN_2;

use candle_core::{DType, Device, Tensor, Var};
use optune_testkit::assert_floats_close;
use optune_train::loss::{
    batch_loss, chosen_nll, dpo_losses, given_weights, log_sigmoid, loo_reinforce_kl, pair_weights,
    simpo_losses, weighted_mean, BatchLogps, DpoLoss, Objective, ObjectiveParams, PairLosses,
    WeightForm, WeightNorm,
};
use serde::Deserialize;

/// The committed reference values (their `generator` field names the script that made them).
fn reference_path() -> std::path::PathBuf {
    optune_testkit::workspace_root().join("testdata/reference/losses.json")
}

const TOLERANCE: f64 = 1e-5;

fn t32(values: &[f32]) -> Tensor {
    Tensor::new(values, &Device::Cpu).unwrap()
}

fn t64(values: &[f64]) -> Tensor {
    Tensor::new(values, &Device::Cpu).unwrap()
}

fn values(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64).unwrap().to_vec1().unwrap()
}

// ---------------------------------------------------------------------------------------------
// (a) Hand-computed values.
//
// Three pairs (policy chosen, policy rejected, ref chosen, ref rejected) and β = 0.5, ε = 0.1:
//   pair 0: (−10, −14, −11, −11): l = (−10 + 14) − (−11 + 11) = 4,  βl = 2
//   pair 1: (−20, −20, −20, −20): l = 0,                             βl = 0
//   pair 2: ( −6,  −5,  −5,  −6): l = (−6 + 5) − (−5 + 6) = −2,      βl = −1
// chosen rewards β(πc − refc) = 0.5·(1, 0, −1) = (0.5, 0, −0.5)
// rejected rewards β(πr − refr) = 0.5·(−3, 0, 1) = (−1.5, 0, 0.5)
//
// logσ(2) = −ln(1 + e⁻²) = −0.126928011, logσ(−2) = −2.126928011
// logσ(0) = −ln 2 = −0.693147181 (LN_2 below)
// logσ(−1) = −1.313261688, logσ(1) = −0.313261688
// ---------------------------------------------------------------------------------------------

const BETA: f64 = 0.5;
const EPS: f64 = 0.1;

fn hand_pairs(dtype: DType) -> [Tensor; 4] {
    [
        [-10.0, -20.0, -6.0],
        [-14.0, -20.0, -5.0],
        [-11.0, -20.0, -5.0],
        [-11.0, -20.0, -6.0],
    ]
    .map(|v| t64(&v).to_dtype(dtype).unwrap())
}

fn hand_losses(kind: DpoLoss, label_smoothing: f64) -> PairLosses {
    let [pc, pr, rc, rr] = hand_pairs(DType::F32);
    dpo_losses(kind, BETA, label_smoothing, &pc, &pr, &rc, &rr).unwrap()
}

#[test]
fn hand_computed_dpo_losses() {
    let expected: [(DpoLoss, [f64; 3]); 4] = [
        // sigmoid: −0.9·logσ(βl) − 0.1·logσ(−βl)
        //   βl = 2:  0.9·0.126928011 + 0.1·2.126928011 = 0.114235210 + 0.212692801 = 0.326928011
        //   βl = 0:  (0.9 + 0.1)·0.693147181 = 0.693147181
        //   βl = −1: 0.9·1.313261688 + 0.1·0.313261688 = 1.181935519 + 0.031326169 = 1.213261688
        (DpoLoss::Sigmoid, [0.326928011, LN_2, 1.213261688]),
        // ipo: (l − 1/(2β))² = (l − 1)²: (4 − 1)² = 9, (0 − 1)² = 1, (−2 − 1)² = 9
        (DpoLoss::Ipo, [9.0, 1.0, 9.0]),
        // hinge: relu(1 − βl): relu(−1) = 0, relu(1) = 1, relu(2) = 2
        (DpoLoss::Hinge, [0.0, 1.0, 2.0]),
        // robust: (−0.9·logσ(βl) + 0.1·logσ(−βl)) / 0.8
        //   βl = 2:  (0.114235210 − 0.212692801)/0.8 = −0.098457591/0.8 = −0.123071989
        //   βl = 0:  (0.9 − 0.1)·0.693147181/0.8 = 0.693147181
        //   βl = −1: (1.181935519 − 0.031326169)/0.8 = 1.150609350/0.8 = 1.438261688
        (DpoLoss::Robust, [-0.123071989, LN_2, 1.438261688]),
    ];
    for (kind, losses) in expected {
        let out = hand_losses(kind, EPS);
        assert_eq!(out.losses.dtype(), DType::F32);
        assert_floats_close(&values(&out.losses), &losses, TOLERANCE, kind.name());
        assert_floats_close(
            &values(&out.chosen_rewards),
            &[0.5, 0.0, -0.5],
            0.0,
            "chosen rewards",
        );
        assert_floats_close(
            &values(&out.rejected_rewards),
            &[-1.5, 0.0, 0.5],
            0.0,
            "rejected rewards",
        );
    }
    // ε = 0: sigmoid and robust are both plain DPO, −logσ(βl) = (0.126928011, 0.693147181, 1.313261688).
    for kind in [DpoLoss::Sigmoid, DpoLoss::Robust] {
        let out = hand_losses(kind, 0.0);
        assert_floats_close(
            &values(&out.losses),
            &[0.126928011, LN_2, 1.313261688],
            TOLERANCE,
            kind.name(),
        );
    }
    // ipo and hinge ignore ε, as TRL does.
    for kind in [DpoLoss::Ipo, DpoLoss::Hinge] {
        assert_eq!(
            values(&hand_losses(kind, 0.0).losses),
            values(&hand_losses(kind, 0.3).losses)
        );
    }
}

#[test]
fn log_sigmoid_is_stable() {
    // logσ(±200) and logσ(±1e30): no overflow, no NaN. logσ(−x) → −x.
    let x = t32(&[200.0, -200.0, 1e30, -1e30, 0.0]);
    let y = values(&log_sigmoid(&x).unwrap());
    assert_floats_close(&y, &[0.0, -200.0, 0.0, -1e30, -LN_2], 1e-7, "logsigmoid");
}

#[test]
fn hand_computed_weights() {
    // gaps (0, 1, 3), β2 = 0.5: x = β2·gap = (0, 0.5, 1.5); the gap −1 of the 4th call is clamped to 0.
    let gaps = [0.0f32, 1.0, 3.0];
    let cases: [(WeightForm, [f64; 3], [f64; 3]); 4] = [
        // none: (1, 1, 1), mean 1
        (WeightForm::None, [1.0; 3], [1.0; 3]),
        // exp: (1, e^0.5, e^1.5) = (1, 1.648721271, 4.481689070), mean 7.130410341/3 = 2.376803447
        //   normalised: (1/2.376803447, 1.648721271/2.376803447, 4.481689070/2.376803447)
        //             = (0.420733149, 0.693671693, 1.885595158)
        (
            WeightForm::Exp,
            [1.0, 1.648721271, 4.481689070],
            [0.420733149, 0.693671693, 1.885595158],
        ),
        // linear: (1, 1.5, 2.5), mean 5/3: normalised (0.6, 0.9, 1.5)
        (WeightForm::Linear, [1.0, 1.5, 2.5], [0.6, 0.9, 1.5]),
        // sigmoid: 2σ(x) = 2/(1 + e^−x) = (1, 2/(1 + 0.606530660), 2/(1 + 0.223130160))
        //        = (1, 1.244918662, 1.635148952), mean 3.880067614/3 = 1.293355871
        //   normalised: (0.773182402, 0.962549202, 1.264268395)
        (
            WeightForm::Sigmoid,
            [1.0, 1.244918662, 1.635148952],
            [0.773182402, 0.962549202, 1.264268395],
        ),
    ];
    for (form, raw, normalised) in cases {
        let w = |norm| -> Vec<f64> {
            pair_weights(form, 0.5, &gaps, norm)
                .unwrap()
                .into_iter()
                .map(f64::from)
                .collect()
        };
        assert_floats_close(&w(WeightNorm::None), &raw, 1e-6, &format!("{form} raw"));
        assert_floats_close(
            &w(WeightNorm::Batch),
            &normalised,
            1e-6,
            &format!("{form} batch"),
        );
        // A negative gap weighs as a tie: 1 unnormalised for every form.
        assert_eq!(
            pair_weights(form, 0.5, &[-1.0], WeightNorm::None).unwrap(),
            [1.0]
        );
        assert!(pair_weights(form, 0.5, &[], WeightNorm::Batch)
            .unwrap()
            .is_empty());
    }
    // β2 = 0: every form is 1.
    for form in WeightForm::ALL {
        assert_eq!(
            pair_weights(form, 0.0, &gaps, WeightNorm::None).unwrap(),
            [1.0; 3]
        );
    }
}

#[test]
fn weights_overflow_and_bad_input() {
    // e^100 overflows f32 unnormalised (an error, not an infinite loss) ...
    assert!(pair_weights(WeightForm::Exp, 1.0, &[100.0, 0.0], WeightNorm::None).is_err());
    // ... and is fine normalised: 2·softmax(100, 0) = (2/(1 + e^−100), 2e^−100/(1 + e^−100)).
    let w = pair_weights(WeightForm::Exp, 1.0, &[100.0, 0.0], WeightNorm::Batch).unwrap();
    assert_eq!(w[0], 2.0);
    assert!(w[1] >= 0.0 && w[1] < 1e-40);
    assert!(
        pair_weights(WeightForm::Exp, 1.0, &[1e4, 0.0], WeightNorm::Batch)
            .unwrap()
            .iter()
            .all(|w| w.is_finite())
    );
    assert!(pair_weights(WeightForm::Exp, -0.1, &[1.0], WeightNorm::None).is_err());
    assert!(pair_weights(WeightForm::Linear, f64::NAN, &[1.0], WeightNorm::None).is_err());
    assert!(pair_weights(WeightForm::Linear, 1.0, &[f32::NAN], WeightNorm::None).is_err());
    assert!(pair_weights(WeightForm::None, 1.0, &[f32::INFINITY], WeightNorm::None).is_err());
}

#[test]
fn hand_computed_weighted_mean() {
    // hinge losses (0, 1, 2) with the normalised linear weights (0.6, 0.9, 1.5):
    //   (0.6·0 + 0.9·1 + 1.5·2)/3 = 3.9/3 = 1.3
    let losses = hand_losses(DpoLoss::Hinge, 0.0).losses;
    let w = pair_weights(WeightForm::Linear, 0.5, &[0.0, 1.0, 3.0], WeightNorm::Batch).unwrap();
    let mean = weighted_mean(&losses, &w)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!((mean - 1.3).abs() < 1e-6, "{mean}");
    // Unit weights: the plain mean (0 + 1 + 2)/3 = 1.
    let mean = weighted_mean(&losses, &[1.0; 3])
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!((mean - 1.0).abs() < 1e-7, "{mean}");
    assert!(weighted_mean(&losses, &[1.0; 2]).is_err());
    assert!(weighted_mean(&t32(&[]), &[]).is_err());
}

#[test]
fn hand_computed_simpo() {
    // Mean log-probs (chosen, rejected): (−1, −2), (−1.5, −1.5), (−2, −1); β = 2, γ = 1, so
    // γ/β = 0.5 and l = (1 − 0.5, 0 − 0.5, −1 − 0.5) = (0.5, −0.5, −1.5), βl = (1, −1, −3).
    // ε = 0: −logσ(βl) = (0.313261688, 1.313261688, 3.048587351)   (ln(1 + e³) = 3.048587351)
    // ε = 0.1: 0.9·(…) + 0.1·(−logσ(−βl)) with −logσ(−βl) = (1.313261688, 0.313261688, 0.048587351):
    //   (0.281935519 + 0.131326169, 1.181935519 + 0.031326169, 2.743728616 + 0.004858735)
    //   = (0.413261688, 1.213261688, 2.748587351)
    let chosen = t32(&[-1.0, -1.5, -2.0]);
    let rejected = t32(&[-2.0, -1.5, -1.0]);
    let out = simpo_losses(2.0, 1.0, 0.0, &chosen, &rejected).unwrap();
    assert_floats_close(
        &values(&out.losses),
        &[0.313261688, 1.313261688, 3.048587351],
        TOLERANCE,
        "simpo",
    );
    // rewards β·π̄: 2·(−1, −1.5, −2) and 2·(−2, −1.5, −1)
    assert_floats_close(
        &values(&out.chosen_rewards),
        &[-2.0, -3.0, -4.0],
        0.0,
        "simpo chosen rewards",
    );
    assert_floats_close(
        &values(&out.rejected_rewards),
        &[-4.0, -3.0, -2.0],
        0.0,
        "simpo rejected rewards",
    );
    let smoothed = simpo_losses(2.0, 1.0, 0.1, &chosen, &rejected).unwrap();
    assert_floats_close(
        &values(&smoothed.losses),
        &[0.413261688, 1.213261688, 2.748587351],
        TOLERANCE,
        "simpo eps 0.1",
    );
    // γ = 0 is the sigmoid loss of β(π̄c − π̄r): βl = (2, 0, −2), −logσ = (0.126928011, ln 2, 2.126928011)
    let no_margin = simpo_losses(2.0, 0.0, 0.0, &chosen, &rejected).unwrap();
    assert_floats_close(
        &values(&no_margin.losses),
        &[0.126928011, LN_2, 2.126928011],
        TOLERANCE,
        "simpo gamma 0",
    );
    assert!(simpo_losses(0.0, 1.0, 0.0, &chosen, &rejected).is_err());
    assert!(simpo_losses(2.0, f64::NAN, 0.0, &chosen, &rejected).is_err());
    assert!(simpo_losses(2.0, 1.0, 0.7, &chosen, &rejected).is_err());
    assert!(simpo_losses(2.0, 1.0, 0.0, &chosen, &t32(&[1.0])).is_err());
}

#[test]
fn hand_computed_chosen_nll() {
    // Summed chosen log-probs (−10, −4, −6) over (5, 2, 3) tokens: 10 tokens in all.
    //   unit weights: (10 + 4 + 6)/10 = 2 (not the mean of per-reply means (2 + 2 + 2)/3 = 2 by
    //   coincidence, so also (−10, −2, −6): 18/10 = 1.8 against (2 + 1 + 2)/3 = 1.667)
    //   weights (0.5, 1, 1.5): (5 + 4 + 9)/10 = 1.8
    let sums = Var::from_tensor(&t64(&[-10.0, -4.0, -6.0])).unwrap();
    let nll = |sums: &Tensor, w: &[f32]| {
        chosen_nll(sums, &[5, 2, 3], w)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    assert!((nll(sums.as_tensor(), &[1.0; 3]) - 2.0).abs() < 1e-12);
    assert!((nll(&t64(&[-10.0, -2.0, -6.0]), &[1.0; 3]) - 1.8).abs() < 1e-12);
    assert!((nll(sums.as_tensor(), &[0.5, 1.0, 1.5]) - 1.8).abs() < 1e-12);
    // d/dsumᵢ = −wᵢ/10
    let loss = chosen_nll(sums.as_tensor(), &[5, 2, 3], &[0.5, 1.0, 1.5]).unwrap();
    let grad = values(loss.backward().unwrap().get(&sums).unwrap());
    assert_floats_close(&grad, &[-0.05, -0.1, -0.15], 1e-12, "nll gradient");
    assert!(chosen_nll(sums.as_tensor(), &[5, 2], &[1.0; 3]).is_err());
    assert!(chosen_nll(sums.as_tensor(), &[5, 2, 3], &[1.0; 2]).is_err());
    assert!(chosen_nll(sums.as_tensor(), &[0, 0, 0], &[1.0; 3]).is_err());
}

#[test]
fn batch_loss_combines_each_objective_with_the_weights() {
    // The hand pairs' sigmoid losses at β = 0.5, ε = 0: (0.126928011, ln 2, 1.313261688);
    // chosen sums (−10, −20, −6) over (5, 10, 3) tokens; weights (0.5, 1, 1.5).
    let [pc, pr, rc, rr] = hand_pairs(DType::F32);
    let w = [0.5f32, 1.0, 1.5];
    let tokens = [5, 10, 3];
    let params = ObjectiveParams {
        beta: BETA,
        label_smoothing: 0.0,
        simpo_gamma: 0.0,
        rpo_alpha: 0.5,
    };
    let logps = BatchLogps {
        chosen: &pc,
        rejected: &pr,
        reference: Some((&rc, &rr)),
        chosen_sums: &pc,
        chosen_tokens: &tokens,
    };
    let loss = |objective| scalar(&batch_loss(objective, &params, &logps, &w).unwrap().0);
    // DPO: (0.5·0.126928011 + 0.693147181 + 1.5·1.313261688)/3 = 2.726503719/3 = 0.908834573
    assert!((loss(Objective::Sigmoid) - 0.908834573).abs() < 1e-6);
    // NLL: (0.5·10 + 20 + 1.5·6)/18 = 34/18 = 1.888888889; RPO = DPO + 0.5·NLL = 1.853279017
    assert!((loss(Objective::Sft) - 34.0 / 18.0).abs() < 1e-6);
    assert!((loss(Objective::Rpo) - 1.853279017).abs() < 1e-6);
    // SimPO reads no reference (γ = 0, β = 0.5 on (πc − πr) = (4, 0, −1)):
    //   −logσ(2, 0, −0.5) = (0.126928011, ln 2, 0.974076984)
    //   weighted: (0.063464006 + 0.693147181 + 1.461115476)/3 = 0.739242221
    let reference_free = BatchLogps {
        reference: None,
        ..logps
    };
    let simpo = batch_loss(Objective::Simpo, &params, &reference_free, &w)
        .unwrap()
        .0;
    assert!((scalar(&simpo) - 0.739242221).abs() < 1e-6);
    assert!(batch_loss(Objective::Sigmoid, &params, &reference_free, &w).is_err());
    // SFT logs each reply's per-token NLL (2, 2, 2) and zero rewards.
    let (_, per_pair) = batch_loss(Objective::Sft, &params, &logps, &w).unwrap();
    assert_eq!(values(&per_pair.losses), [2.0, 2.0, 2.0]);
    assert_eq!(values(&per_pair.chosen_rewards), [0.0; 3]);
    assert!(!Objective::Simpo.needs_reference() && !Objective::Sft.needs_reference());
    assert!(Objective::Rpo.needs_reference() && Objective::Simpo.uses_mean_logps());
}

#[test]
fn given_weights_are_checked_and_normalised() {
    // (0, 1, 3): mean 4/3, normalised (0, 0.75, 2.25)
    assert_eq!(
        given_weights(&[0.0, 1.0, 3.0], WeightNorm::None).unwrap(),
        [0.0, 1.0, 3.0]
    );
    assert_eq!(
        given_weights(&[0.0, 1.0, 3.0], WeightNorm::Batch).unwrap(),
        [0.0, 0.75, 2.25]
    );
    // A batch of zeros stays zero: nothing to rescale.
    assert_eq!(
        given_weights(&[0.0, 0.0], WeightNorm::Batch).unwrap(),
        [0.0, 0.0]
    );
    for bad in [-1.0, f64::NAN, f64::INFINITY] {
        let err = given_weights(&[1.0, bad], WeightNorm::None)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("weight 1 is"), "{err}");
    }
    assert!(given_weights(&[1e300], WeightNorm::None).is_err());
}

#[test]
fn dpo_bad_input() {
    let [pc, pr, rc, rr] = hand_pairs(DType::F32);
    let call = |kind, beta, eps, rr: &Tensor| dpo_losses(kind, beta, eps, &pc, &pr, &rc, rr);
    assert!(call(DpoLoss::Sigmoid, 0.0, 0.0, &rr).is_err());
    assert!(call(DpoLoss::Sigmoid, f64::INFINITY, 0.0, &rr).is_err());
    assert!(call(DpoLoss::Sigmoid, 0.1, -0.1, &rr).is_err());
    assert!(call(DpoLoss::Sigmoid, 0.1, 0.6, &rr).is_err());
    assert!(call(DpoLoss::Sigmoid, 0.1, 0.5, &rr).is_ok());
    assert!(call(DpoLoss::Robust, 0.1, 0.5, &rr).is_err());
    assert!(call(DpoLoss::Sigmoid, 0.1, 0.0, &t32(&[1.0, 2.0])).is_err());
    assert!(call(
        DpoLoss::Sigmoid,
        0.1,
        0.0,
        &rr.to_dtype(DType::F64).unwrap()
    )
    .is_err());
}

#[test]
fn names_round_trip() {
    for kind in DpoLoss::ALL {
        assert_eq!(kind.to_string().parse::<DpoLoss>().unwrap(), kind);
        let json = serde_json::to_string(&kind).unwrap();
        assert_eq!(json, format!("\"{kind}\""));
    }
    for form in WeightForm::ALL {
        assert_eq!(form.to_string().parse::<WeightForm>().unwrap(), form);
    }
    for norm in [WeightNorm::Batch, WeightNorm::None] {
        assert_eq!(norm.to_string().parse::<WeightNorm>().unwrap(), norm);
    }
    assert!("dpo".parse::<DpoLoss>().is_err());
    assert_eq!(WeightForm::default(), WeightForm::Exp);
    assert_eq!(WeightNorm::default(), WeightNorm::Batch);
}

// ---------------------------------------------------------------------------------------------
// (b) TRL's DPOTrainer.dpo_loss.
// ---------------------------------------------------------------------------------------------

#[derive(Deserialize)]
struct Reference {
    trl: String,
    inputs: Inputs,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Inputs {
    summed: Logps,
    mean: Logps,
}

#[derive(Deserialize)]
struct Logps {
    policy_chosen: Vec<f32>,
    policy_rejected: Vec<f32>,
    ref_chosen: Vec<f32>,
    ref_rejected: Vec<f32>,
}

#[derive(Deserialize)]
struct Case {
    loss_type: DpoLoss,
    beta: f64,
    label_smoothing: f64,
    logps: String,
    losses: Vec<f64>,
    chosen_rewards: Vec<f64>,
    rejected_rewards: Vec<f64>,
}

/// Losses, chosen rewards and rejected rewards against TRL's.
fn assert_pair_losses(what: &str, out: &PairLosses, expected: [&[f64]; 3]) {
    let actual = [&out.losses, &out.chosen_rewards, &out.rejected_rewards];
    for (name, (t, e)) in ["losses", "chosen rewards", "rejected rewards"]
        .iter()
        .zip(actual.into_iter().zip(expected))
    {
        assert_floats_close(&values(t), e, TOLERANCE, &format!("{what} {name}"));
    }
}

#[derive(Deserialize)]
struct SimpoCase {
    beta: f64,
    simpo_gamma: f64,
    label_smoothing: f64,
    logps: String,
    losses: Vec<f64>,
    chosen_rewards: Vec<f64>,
    rejected_rewards: Vec<f64>,
}

/// One batch through TRL's DPOTrainer with an NLL term (RPO's `rpo_alpha`, or `loss_type="sft"`).
#[derive(Deserialize)]
struct NllCase {
    loss_type: String,
    rpo_alpha: Option<f64>,
    beta: f64,
    policy_chosen: Vec<f32>,
    policy_rejected: Vec<f32>,
    ref_chosen: Vec<f32>,
    ref_rejected: Vec<f32>,
    chosen_tokens: Vec<usize>,
    nll_loss: f64,
    loss: f64,
}

#[derive(Deserialize)]
struct MethodReference {
    trl: String,
    inputs: Inputs,
    simpo_cases: Vec<SimpoCase>,
    nll_cases: Vec<NllCase>,
}

fn method_reference() -> MethodReference {
    serde_json::from_str(&std::fs::read_to_string(reference_path()).unwrap()).unwrap()
}

#[test]
fn matches_trl_simpo_loss() {
    let reference = method_reference();
    assert_eq!(reference.simpo_cases.len(), 8);
    let logps = &reference.inputs.mean;
    for case in &reference.simpo_cases {
        assert_eq!(case.logps, "mean");
        let out = simpo_losses(
            case.beta,
            case.simpo_gamma,
            case.label_smoothing,
            &t32(&logps.policy_chosen),
            &t32(&logps.policy_rejected),
        )
        .unwrap();
        let what = format!(
            "TRL {} simpo beta {} gamma {} eps {}",
            reference.trl, case.beta, case.simpo_gamma, case.label_smoothing
        );
        assert_pair_losses(
            &what,
            &out,
            [&case.losses, &case.chosen_rewards, &case.rejected_rewards],
        );
    }
}

#[test]
fn matches_trl_rpo_and_sft_losses() {
    let reference = method_reference();
    let kinds: Vec<(&str, Option<f64>)> = reference
        .nll_cases
        .iter()
        .map(|c| (c.loss_type.as_str(), c.rpo_alpha))
        .collect();
    assert_eq!(
        kinds,
        [
            ("sigmoid", Some(1.0)),
            ("sigmoid", Some(0.5)),
            ("sft", None)
        ]
    );
    let params = |case: &NllCase| ObjectiveParams {
        beta: case.beta,
        label_smoothing: 0.0,
        simpo_gamma: 0.0,
        rpo_alpha: case.rpo_alpha.unwrap_or(0.0),
    };
    for case in &reference.nll_cases {
        let what = format!(
            "TRL {} {} rpo_alpha {:?}",
            reference.trl, case.loss_type, case.rpo_alpha
        );
        let unit = vec![1.0f32; case.chosen_tokens.len()];
        let [pc, pr, rc, rr] = [
            &case.policy_chosen,
            &case.policy_rejected,
            &case.ref_chosen,
            &case.ref_rejected,
        ]
        .map(|v| t32(v));
        let nll = chosen_nll(&pc, &case.chosen_tokens, &unit).unwrap();
        assert_floats_close(&[scalar(&nll)], &[case.nll_loss], TOLERANCE, &what);
        let objective = match case.rpo_alpha {
            Some(_) => Objective::Rpo,
            None => Objective::Sft,
        };
        let logps = BatchLogps {
            chosen: &pc,
            rejected: &pr,
            reference: Some((&rc, &rr)),
            chosen_sums: &pc,
            chosen_tokens: &case.chosen_tokens,
        };
        let (loss, _) = batch_loss(objective, &params(case), &logps, &unit).unwrap();
        assert_floats_close(&[scalar(&loss)], &[case.loss], TOLERANCE, &what);
    }
}

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar().unwrap()
}

#[test]
fn matches_trl_dpo_loss() {
    let reference: Reference =
        serde_json::from_str(&std::fs::read_to_string(reference_path()).unwrap()).unwrap();
    assert_eq!(reference.cases.len(), 16);
    for case in &reference.cases {
        let logps = match case.logps.as_str() {
            "summed" => &reference.inputs.summed,
            "mean" => &reference.inputs.mean,
            other => panic!("unknown logps {other}"),
        };
        assert_eq!(case.loss_type.uses_mean_logps(), case.logps == "mean");
        let out = dpo_losses(
            case.loss_type,
            case.beta,
            case.label_smoothing,
            &t32(&logps.policy_chosen),
            &t32(&logps.policy_rejected),
            &t32(&logps.ref_chosen),
            &t32(&logps.ref_rejected),
        )
        .unwrap();
        let what = format!(
            "TRL {} {} beta {} eps {}",
            reference.trl, case.loss_type, case.beta, case.label_smoothing
        );
        assert_pair_losses(
            &what,
            &out,
            [&case.losses, &case.chosen_rewards, &case.rejected_rewards],
        );
    }
}

// ---------------------------------------------------------------------------------------------
// (c) Gradients against central finite differences, in f64.
// ---------------------------------------------------------------------------------------------

/// The wDPO batch loss: `weighted_mean(dpo_losses(...))`.
fn weighted_dpo_loss(kind: DpoLoss, eps: f64, pc: &Tensor, pr: &Tensor, w: &[f32]) -> Tensor {
    let [_, _, rc, rr] = hand_pairs(DType::F64);
    let out = dpo_losses(kind, BETA, eps, pc, pr, &rc, &rr).unwrap();
    weighted_mean(&out.losses, w).unwrap()
}

#[test]
fn gradients_match_finite_differences() {
    let [pc0, pr0, ..] = hand_pairs(DType::F64);
    let (pc0, pr0) = (values(&pc0), values(&pr0));
    // βl = (2, 0, −1): no pair sits on the hinge's kink (βl = 1); pair 1 is at logit 0, where a
    // careless log-sigmoid has the wrong gradient.
    let w = pair_weights(WeightForm::Exp, 0.5, &[0.0, 1.0, 3.0], WeightNorm::Batch).unwrap();
    let h = 1e-5;
    for kind in DpoLoss::ALL {
        for eps in [0.0, 0.2] {
            let pc = Var::from_tensor(&t64(&pc0)).unwrap();
            let pr = Var::from_tensor(&t64(&pr0)).unwrap();
            let loss = weighted_dpo_loss(kind, eps, pc.as_tensor(), pr.as_tensor(), &w);
            let grads = loss.backward().unwrap();
            for (name, var, base, is_chosen) in
                [("chosen", &pc, &pc0, true), ("rejected", &pr, &pr0, false)]
            {
                let analytic = values(grads.get(var).unwrap());
                let numeric: Vec<f64> = (0..base.len())
                    .map(|i| {
                        let at = |delta: f64| {
                            let mut moved = base.clone();
                            moved[i] += delta;
                            let (c, r) = if is_chosen {
                                (t64(&moved), t64(&pr0))
                            } else {
                                (t64(&pc0), t64(&moved))
                            };
                            weighted_dpo_loss(kind, eps, &c, &r, &w)
                                .to_scalar::<f64>()
                                .unwrap()
                        };
                        (at(h) - at(-h)) / (2.0 * h)
                    })
                    .collect();
                assert_floats_close(
                    &analytic,
                    &numeric,
                    1e-7,
                    &format!("{kind} eps {eps} d/d{name}"),
                );
            }
        }
    }
    // The DPO gradient at logit 0 by hand: d/dπc [−logσ(β(πc − …))] = −β·σ(0) = −0.25, times
    // the pair's weight over the batch size.
    let pc = Var::from_tensor(&t64(&pc0)).unwrap();
    let loss = weighted_dpo_loss(DpoLoss::Sigmoid, 0.0, pc.as_tensor(), &t64(&pr0), &w);
    let g = values(loss.backward().unwrap().get(&pc).unwrap())[1];
    assert!((g - (-0.25 * f64::from(w[1]) / 3.0)).abs() < 1e-12, "{g}");
}

#[test]
fn simpo_gradient_matches_finite_differences() {
    // Mean log-probs with βl = 2·((π̄c − π̄r) − 0.25) = (0.5, 0, −1.5): pair 1 at logit 0.
    let chosen0 = [-1.0, -1.25, -2.0];
    let rejected0 = [-1.5, -1.5, -1.25];
    let w = [0.5f32, 1.0, 1.5];
    let loss = |c: &Tensor, r: &Tensor| {
        weighted_mean(&simpo_losses(2.0, 0.5, 0.2, c, r).unwrap().losses, &w).unwrap()
    };
    let var = Var::from_tensor(&t64(&chosen0)).unwrap();
    let analytic = values(
        loss(var.as_tensor(), &t64(&rejected0))
            .backward()
            .unwrap()
            .get(&var)
            .unwrap(),
    );
    let h = 1e-5;
    let numeric: Vec<f64> = (0..3)
        .map(|i| {
            let at = |delta: f64| {
                let mut moved = chosen0;
                moved[i] += delta;
                loss(&t64(&moved), &t64(&rejected0))
                    .to_scalar::<f64>()
                    .unwrap()
            };
            (at(h) - at(-h)) / (2.0 * h)
        })
        .collect();
    assert_floats_close(&analytic, &numeric, 1e-7, "simpo d/dchosen");
}

#[test]
fn rewards_are_detached() {
    let [pc0, pr, rc, rr] = hand_pairs(DType::F64);
    let pc = Var::from_tensor(&pc0).unwrap();
    let out = dpo_losses(DpoLoss::Sigmoid, BETA, 0.0, pc.as_tensor(), &pr, &rc, &rr).unwrap();
    let grads = out.chosen_rewards.sum_all().unwrap().backward().unwrap();
    assert!(grads.get(&pc).is_none());
}

// ---------------------------------------------------------------------------------------------
// (d) HyPO's leave-one-out REINFORCE KL estimator.
// ---------------------------------------------------------------------------------------------

#[test]
fn loo_gradient_per_sample() {
    // k = 4, 2 prompts, n = 8.
    // prompt 0: log π = (−1, −2, −3, −4), log π_ref = −1.5 → v = (0.5, −0.5, −1.5, −2.5), Σv = −4
    //   bᵢ = (Σv − vᵢ)/3 = (−1.5, −7/6, −5/6, −0.5)
    //   vᵢ − bᵢ = (2, 2/3, −2/3, −2)   (= 4/3·(vᵢ − mean v), mean v = −1)
    // prompt 1: log π = log π_ref + 0.3 for every sample → all vᵢ equal → vᵢ − bᵢ = 0
    // gradient wrt log π(yᵢ) = (vᵢ − bᵢ)/8; KL estimate = mean v = (−4 + 4·0.3)/8 = −0.35
    let policy = [-1.0, -2.0, -3.0, -4.0, -2.0, -5.0, -7.5, -1.25];
    let reference: Vec<f32> = [-1.5f32; 4]
        .into_iter()
        .chain(policy[4..].iter().map(|&p| (p - 0.3) as f32))
        .collect();
    let var = Var::from_tensor(&t64(&policy)).unwrap();
    let (surrogate, kl) = loo_reinforce_kl(var.as_tensor(), &reference, 4).unwrap();
    let grad = values(surrogate.backward().unwrap().get(&var).unwrap());
    let expected: Vec<f64> = [2.0, 2.0 / 3.0, -2.0 / 3.0, -2.0, 0.0, 0.0, 0.0, 0.0]
        .iter()
        .map(|a| a / 8.0)
        .collect();
    // Prompt 1's values carry the f32 rounding of its reference log-probs.
    assert_floats_close(&grad, &expected, 1e-7, "loo gradient");
    assert!((kl - -0.35).abs() < 1e-6, "{kl}");

    // f32 policy log-probs work the same.
    let (surrogate, kl32) =
        loo_reinforce_kl(&t64(&policy).to_dtype(DType::F32).unwrap(), &reference, 4).unwrap();
    assert_eq!(surrogate.dtype(), DType::F32);
    assert!((kl32 - kl).abs() < 1e-6);

    // k must be ≥ 2 and divide the sample count; the reference must match.
    assert!(loo_reinforce_kl(var.as_tensor(), &reference, 1).is_err());
    assert!(loo_reinforce_kl(var.as_tensor(), &reference, 3).is_err());
    assert!(loo_reinforce_kl(var.as_tensor(), &reference[..4], 4).is_err());
    assert!(loo_reinforce_kl(&t64(&[]), &[], 2).is_err());
}

/// SplitMix64: a fixed, dependency-free stream of uniforms in [0, 1).
struct SplitMix(u64);

impl SplitMix {
    fn uniform(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }

    fn categorical(&mut self, probs: &[f64]) -> u32 {
        let u = self.uniform();
        let mut cumulative = 0.0;
        for (i, p) in probs.iter().enumerate() {
            cumulative += p;
            if u < cumulative {
                return i as u32;
            }
        }
        probs.len() as u32 - 1
    }
}

#[test]
fn loo_estimate_is_unbiased_on_a_categorical_policy() {
    // π = softmax(θ) over 5 outcomes, π_ref = softmax(θ_ref). Exact:
    //   KL = Σ π (log π − log π_ref),  ∂KL/∂θⱼ = πⱼ (log πⱼ − log π_refⱼ − KL).
    let theta = [0.5, -1.0, 0.2, 1.5, -0.3];
    let theta_ref = [0.0, 0.3, -0.2, 0.1, 0.4];
    let log_softmax = |t: &[f64]| -> Vec<f64> {
        let lse = t.iter().map(|x| x.exp()).sum::<f64>().ln();
        t.iter().map(|x| x - lse).collect()
    };
    let (log_pi, log_ref) = (log_softmax(&theta), log_softmax(&theta_ref));
    let pi: Vec<f64> = log_pi.iter().map(|l| l.exp()).collect();
    let kl: f64 = (0..5).map(|j| pi[j] * (log_pi[j] - log_ref[j])).sum();
    let exact: Vec<f64> = (0..5)
        .map(|j| pi[j] * (log_pi[j] - log_ref[j] - kl))
        .collect();

    let (draws, prompts, k) = (2000, 4, 4);
    let mut rng = SplitMix(0x5EED);
    let mut sum = [0.0f64; 6];
    let mut sum_sq = [0.0f64; 6];
    for _ in 0..draws {
        let ids: Vec<u32> = (0..prompts * k).map(|_| rng.categorical(&pi)).collect();
        let reference: Vec<f32> = ids.iter().map(|&y| log_ref[y as usize] as f32).collect();
        let theta_var = Var::from_tensor(&t64(&theta)).unwrap();
        let t = theta_var.as_tensor();
        let log_probs = t
            .broadcast_sub(&t.exp().unwrap().sum_all().unwrap().log().unwrap())
            .unwrap();
        let ids = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap();
        let sample_logps = log_probs.index_select(&ids, 0).unwrap();
        let (surrogate, kl_estimate) = loo_reinforce_kl(&sample_logps, &reference, k).unwrap();
        let grad = values(surrogate.backward().unwrap().get(&theta_var).unwrap());
        for (j, g) in grad
            .iter()
            .chain([f64::from(kl_estimate)].iter())
            .enumerate()
        {
            sum[j] += g;
            sum_sq[j] += g * g;
        }
    }
    let n = draws as f64;
    for j in 0..6 {
        let mean = sum[j] / n;
        let std_error = ((sum_sq[j] / n - mean * mean) / (n - 1.0)).sqrt();
        let (what, target) = if j < 5 {
            (format!("dKL/dtheta[{j}]"), exact[j])
        } else {
            ("KL".to_string(), kl)
        };
        assert!(
            (mean - target).abs() <= 4.0 * std_error,
            "{what}: Monte-Carlo mean {mean} vs exact {target} (standard error {std_error})"
        );
        // The test has power: the standard error is small next to the gradient's scale.
        assert!(std_error < 0.05 * kl, "{what}: standard error {std_error}");
    }
}

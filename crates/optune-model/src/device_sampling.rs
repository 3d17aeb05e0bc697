//! Sampling where the logits are: tensor ops only, so that on a GPU the `[rows, vocab]` logits stay
//! on the device and each step copies back one token id and one log-probability per row.
//!
//! It draws from the distribution [`crate::generate::sample_token`] draws from (greedy, temperature,
//! top-k, top-p), by other means, since sorting a vocabulary is not a device op candle has (its
//! CUDA sort holds a row in 48 KiB of shared memory: 12,288 columns):
//! * the top-k and top-p cut-offs are thresholds on the logit, found per row by bisection: the
//!   lowest logit whose tokens at or above it number at least k, hold at least p of the mass.
//!   Tokens tied with the last one kept are all kept (the host sort keeps the lower ids), and
//!   tokens more than [`FLOOR_NATS`]·temperature below the top are never kept: each weighs under
//!   e^-40 of the top token, together under 1e-12 of the mass for any vocabulary up to 10^5.
//! * the draw is the inverse of the kept weights' cumulative sum in id order, at one uniform per
//!   row from the row's own seeded stream (the host sends those few bytes). The cumulative sum is
//!   two-level, blocks of [`DRAW_BLOCK`] ids, each a matrix product with a triangle of ones.
//!
//! The same seed repeats the same draws on the same device; the host sampler's draws differ (its
//! uniform walks the tokens in probability order).

use crate::generate::SamplingParams;
use candle_core::{DType, Device, Result, Tensor, D};
use optune_kernels::cuda_matmul::matmul;

/// Kept tokens lie at most this many nats (times the temperature) below the most likely one.
const FLOOR_NATS: f64 = 40.0;
/// Halvings of the bisection interval: `(FLOOR_NATS·T + 1) / 2^32` resolves any two f32 logits
/// of ordinary size.
const BISECTION_STEPS: usize = 32;
/// Ids per block of the two-level cumulative sum.
const DRAW_BLOCK: usize = 128;

/// Samples one token from each row of `logits [rows, vocab]` with `uniforms[row]` in `[0, 1)`
/// (unused when greedy), and returns each token with its untempered log-probability
/// `log softmax(logits)[token]`. Only `rows × 2` numbers cross to the host.
pub fn sample_rows(
    logits: &Tensor,
    params: &SamplingParams,
    uniforms: &[f64],
) -> Result<Vec<(u32, f64)>> {
    let (rows, vocab) = logits.dims2()?;
    if uniforms.len() != rows {
        candle_core::bail!("{} uniforms for {rows} rows", uniforms.len());
    }
    if rows == 0 {
        return Ok(Vec::new());
    }
    let device = logits.device();
    let logits = logits.to_dtype(DType::F32)?;
    // Logits less their row's maximum: every value ≤ 0, the most likely token(s) at 0.
    let shifted = logits.broadcast_sub(&logits.max_keepdim(D::Minus1)?)?;
    let log_z = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let token = if params.temperature <= 0.0 {
        shifted.argmax_keepdim(D::Minus1)?
    } else {
        let weights = (&shifted / params.temperature)?.exp()?;
        let kept = kept_weights(&shifted, &weights, params)?;
        let u = uniforms.iter().map(|&u| (u as f32).min(LARGEST_BELOW_ONE));
        let u = Tensor::from_iter(u, device)?.reshape((rows, 1))?;
        let drawn = draw(&kept, &u, vocab)?;
        // Rounding can leave the draw on a token of no weight (a zero right after the last kept
        // one): the most likely token, which every support holds, takes its place.
        let chosen_weight = kept.gather(&drawn, D::Minus1)?;
        chosen_weight
            .gt(0.0)?
            .where_cond(&drawn, &shifted.argmax_keepdim(D::Minus1)?)?
    };
    let logp = shifted.gather(&token, D::Minus1)?.sub(&log_z)?;
    let packed = Tensor::cat(&[token.to_dtype(DType::F32)?, logp], 1)?.to_vec2::<f32>()?;
    Ok(packed
        .into_iter()
        .map(|row| (row[0] as u32, row[1] as f64))
        .collect())
}

const LARGEST_BELOW_ONE: f32 = 1.0 - f32::EPSILON / 2.0;

/// `weights` where the token is in the top-k and top-p support, else 0.
fn kept_weights(shifted: &Tensor, weights: &Tensor, params: &SamplingParams) -> Result<Tensor> {
    let vocab = shifted.dim(D::Minus1)?;
    let top_k = params.top_k.filter(|&k| k > 0 && k < vocab);
    if top_k.is_none() && params.top_p >= 1.0 {
        return Ok(weights.clone());
    }
    let rows = shifted.dim(0)?;
    let floor = Tensor::full(
        (-FLOOR_NATS * params.temperature.max(1e-3)) as f32,
        (rows, 1),
        shifted.device(),
    )?;
    let zeros = weights.zeros_like()?;
    let at_or_above = |threshold: &Tensor| shifted.broadcast_ge(threshold);
    // `weights` of the tokens at or above `threshold`, 0 elsewhere.
    let kept_from = |threshold: &Tensor| at_or_above(threshold)?.where_cond(weights, &zeros);
    let mut threshold = floor;
    if let Some(k) = top_k {
        threshold = bisect(&threshold, |mid| {
            at_or_above(mid)?
                .to_dtype(DType::F32)?
                .sum_keepdim(D::Minus1)?
                .ge(k as f64)
        })?;
    }
    if params.top_p < 1.0 {
        // The nucleus is measured against the top-k tokens' mass, as on the host.
        let target = (kept_from(&threshold)?.sum_keepdim(D::Minus1)? * params.top_p)?;
        threshold = bisect(&threshold, |mid| {
            kept_from(mid)?.sum_keepdim(D::Minus1)?.ge(&target)
        })?;
    }
    kept_from(&threshold)
}

/// The highest threshold `t ∈ [low, 1]` per row (to the bisection's resolution) at which
/// `holds(t)` is still true, for a `holds` true at `low` and false at 1 (above every shifted logit)
/// and monotone in between. `low` and the result are `[rows, 1]`.
fn bisect(low: &Tensor, holds: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    let mut low = low.clone();
    let mut high = low.ones_like()?;
    for _ in 0..BISECTION_STEPS {
        let mid = ((&low + &high)? * 0.5)?;
        let ok = holds(&mid)?;
        low = ok.where_cond(&mid, &low)?;
        high = ok.where_cond(&high, &mid)?;
    }
    Ok(low)
}

/// The first id whose cumulative weight exceeds `u · total` per row: `[rows, 1]` u32.
fn draw(kept: &Tensor, u: &Tensor, vocab: usize) -> Result<Tensor> {
    let (rows, device) = (kept.dim(0)?, kept.device());
    let blocks = vocab.div_ceil(DRAW_BLOCK);
    let padded = if blocks * DRAW_BLOCK > vocab {
        let pad = Tensor::zeros((rows, blocks * DRAW_BLOCK - vocab), DType::F32, device)?;
        Tensor::cat(&[kept, &pad], 1)?
    } else {
        kept.clone()
    };
    // Inclusive running sums inside each block [rows, blocks, DRAW_BLOCK], then over the blocks'
    // totals [rows, blocks].
    let triangle =
        upper_triangle(DRAW_BLOCK, device)?.broadcast_as((rows, DRAW_BLOCK, DRAW_BLOCK))?;
    let within = matmul(&padded.reshape((rows, blocks, DRAW_BLOCK))?, &triangle)?;
    // Each block's last running sum, copied: as a view its rows lie DRAW_BLOCK apart, which
    // candle's CUDA matmul refuses.
    let block_totals = within
        .narrow(2, DRAW_BLOCK - 1, 1)?
        .squeeze(2)?
        .contiguous()?;
    let running = matmul(&block_totals, &upper_triangle(blocks, device)?)?;
    let target = running.narrow(1, blocks - 1, 1)?.mul(u)?;
    // The block holding the target, and the running sum before it (the same numbers, shifted).
    let block = count_at_or_below(&running, &target)?.clamp(0.0, (blocks - 1) as f64)?;
    let before = Tensor::cat(
        &[
            &Tensor::zeros((rows, 1), DType::F32, device)?,
            &running.narrow(1, 0, blocks - 1)?,
        ],
        1,
    )?;
    let block_ids = block.to_dtype(DType::U32)?;
    let rest = (&target - before.gather(&block_ids, 1)?)?;
    let in_block = within
        .gather(
            &block_ids
                .reshape((rows, 1, 1))?
                .broadcast_as((rows, 1, DRAW_BLOCK))?
                .contiguous()?,
            1,
        )?
        .squeeze(1)?;
    let offset = count_at_or_below(&in_block, &rest)?.clamp(0.0, (DRAW_BLOCK - 1) as f64)?;
    ((block * DRAW_BLOCK as f64)? + offset)?
        .clamp(0.0, (vocab - 1) as f64)?
        .to_dtype(DType::U32)
}

/// How many entries of each row of `sums [rows, n]` are ≤ that row's `limit [rows, 1]`, as f32.
fn count_at_or_below(sums: &Tensor, limit: &Tensor) -> Result<Tensor> {
    sums.broadcast_le(limit)?
        .to_dtype(DType::F32)?
        .sum_keepdim(D::Minus1)
}

/// `[n, n]` with ones on and above the diagonal: `x · it` is the running sum along x's rows.
fn upper_triangle(n: usize, device: &Device) -> Result<Tensor> {
    let ones: Vec<f32> = (0..n * n)
        .map(|i| if i / n <= i % n { 1.0 } else { 0.0 })
        .collect();
    Tensor::from_vec(ones, (n, n), device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generate::tests::params;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn logits(rows: &[Vec<f32>]) -> Tensor {
        let width = rows[0].len();
        Tensor::from_iter(rows.iter().flatten().copied(), &Device::Cpu)
            .unwrap()
            .reshape((rows.len(), width))
            .unwrap()
    }

    /// The support the host sampler keeps (the nucleus of `crate::generate::sample_token`), by
    /// sorting the row, and the same definition with ties at each cut-off kept whole: what the
    /// thresholds keep.
    fn supports(row: &[f32], p: &SamplingParams) -> (Vec<usize>, Vec<usize>) {
        let top = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let w = |t: usize| ((row[t] as f64 - top) / p.temperature).exp();
        let mut order: Vec<usize> = (0..row.len()).collect();
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
        let at_or_above =
            |cut: f32| -> Vec<usize> { order.iter().copied().filter(|&t| row[t] >= cut).collect() };
        let (mut host, mut tied) = (order.clone(), order.clone());
        if let Some(k) = p.top_k.filter(|&k| k < row.len()) {
            host.truncate(k);
            tied = at_or_above(row[order[k - 1]]);
        }
        let nucleus = |set: &mut Vec<usize>, whole_ties: bool| {
            let total: f64 = set.iter().map(|&t| w(t)).sum();
            let mut cumulative = 0.0;
            for i in 0..set.len() {
                cumulative += w(set[i]);
                if cumulative >= p.top_p * total {
                    let cut = row[set[i]];
                    let keep = match whole_ties {
                        true => set.iter().take_while(|&&t| row[t] >= cut).count(),
                        false => i + 1,
                    };
                    set.truncate(keep);
                    break;
                }
            }
        };
        nucleus(&mut host, false);
        nucleus(&mut tied, true);
        host.sort();
        tied.sort();
        (host, tied)
    }

    #[test]
    fn greedy_takes_the_argmax_and_reports_its_logprob() {
        let l = logits(&[vec![0.0, 2.0, 1.0], vec![5.0, -1.0, 4.0]]);
        let got = sample_rows(&l, &params(0.0, 1.0, None), &[0.3, 0.9]).unwrap();
        let z0 = (0f64.exp() + 2f64.exp() + 1f64.exp()).ln();
        let z1 = (5f64.exp() + (-1f64).exp() + 4f64.exp()).ln();
        assert_eq!((got[0].0, got[1].0), (1, 0));
        assert!((got[0].1 - (2.0 - z0)).abs() < 1e-6, "{:?}", got);
        assert!((got[1].1 - (5.0 - z1)).abs() < 1e-6, "{:?}", got);
    }

    /// Every token drawn lies in the host sampler's support, and over many draws every token of
    /// that support turns up, for peaked and flat rows, with ties, across the parameters.
    #[test]
    fn draws_stay_in_the_host_samplers_support() {
        let mut data = ChaCha8Rng::seed_from_u64(11);
        for case in 0..24 {
            let vocab = [7, 300, 1000][case % 3];
            let spread = [0.5, 4.0, 12.0][case % 3];
            let rows: Vec<Vec<f32>> = (0..3)
                .map(|_| {
                    (0..vocab)
                        .map(|_| ((data.random::<f64>() * spread * 4.0).round() / 4.0) as f32)
                        .collect()
                })
                .collect();
            let p = params(
                [0.7, 1.0, 1.5][case % 3],
                [0.5, 0.9, 1.0][case % 3],
                [None, Some(3), Some(40), None][case % 4],
            );
            let l = logits(&rows);
            let (hosts, supports): (Vec<_>, Vec<_>) = rows.iter().map(|r| supports(r, &p)).unzip();
            for (host, tied) in hosts.iter().zip(&supports) {
                assert!(host.iter().all(|t| tied.contains(t)), "case {case}");
            }
            let mut seen: Vec<Vec<bool>> = vec![vec![false; vocab]; 3];
            for draw in 0..400 {
                let u: Vec<f64> = (0..3).map(|_| data.random::<f64>()).collect();
                for (row, (token, logp)) in sample_rows(&l, &p, &u).unwrap().into_iter().enumerate()
                {
                    let t = token as usize;
                    assert!(
                        supports[row].contains(&t),
                        "case {case} draw {draw} row {row}: token {t} outside {:?}",
                        supports[row]
                    );
                    seen[row][t] = true;
                    let top = rows[row].iter().copied().fold(f32::MIN, f32::max) as f64;
                    let z = rows[row]
                        .iter()
                        .map(|&x| (x as f64 - top).exp())
                        .sum::<f64>()
                        .ln();
                    assert!((logp - (rows[row][t] as f64 - top - z)).abs() < 1e-5);
                }
            }
            for (row, support) in supports.iter().enumerate() {
                if support.len() <= 40 {
                    let missing: Vec<_> = support.iter().filter(|&&t| !seen[row][t]).collect();
                    // A token of the support with under 3 % of its mass may not turn up in 400.
                    let top = rows[row].iter().copied().fold(f32::MIN, f32::max) as f64;
                    let w = |t: usize| ((rows[row][t] as f64 - top) / p.temperature).exp();
                    let mass: f64 = support.iter().map(|&t| w(t)).sum();
                    for &&t in &missing {
                        assert!(
                            w(t) / mass < 0.03,
                            "case {case} row {row}: token {t} never drawn"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn draws_follow_the_distribution() {
        // Probabilities 1/4 and 3/4, across a block boundary of the running sum.
        let mut row = vec![-100.0f32; 300];
        row[5] = 0.0;
        row[200] = (3.0f32).ln();
        let l = logits(&[row]);
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let n = 4000;
        let ones = (0..n)
            .filter(|_| {
                let u = [rng.random::<f64>()];
                let (t, _) = sample_rows(&l, &params(1.0, 1.0, None), &u).unwrap()[0];
                assert!(t == 5 || t == 200, "{t}");
                t == 200
            })
            .count();
        let share = ones as f64 / n as f64;
        assert!((share - 0.75).abs() < 0.03, "{share}");
    }

    #[test]
    fn the_uniform_picks_the_token_by_running_weight_in_id_order() {
        // Four equal tokens: u in [i/4, (i+1)/4) draws the i-th.
        let l = logits(&[vec![1.0, 1.0, 1.0, 1.0]]);
        for (u, want) in [(0.0, 0), (0.26, 1), (0.6, 2), (0.999_999, 3)] {
            let got = sample_rows(&l, &params(1.0, 1.0, None), &[u]).unwrap()[0].0;
            assert_eq!(got, want, "u = {u}");
        }
    }
}

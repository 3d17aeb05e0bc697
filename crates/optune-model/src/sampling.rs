//! Choosing each next token: the sampling parameters, the host sampler the CPU's decode path uses
//! ([`sample_token`]), and the sampler where the logits are ([`sample_rows`]) for the tensor path.
//!
//! On a GPU the `[rows, vocab]` logits stay on the device and each step copies back one token id
//! and one log-probability per row. That sampler draws from the distribution [`sample_token`]
//! draws from (greedy, temperature, top-k, top-p, min-p) by other means, in one op
//! ([`optune_kernels::sample_rows`]: one kernel launch per step on a GPU, its CPU form on the
//! generic path): top-k, top-p and min-p become per-row thresholds on the logit (the first two
//! found by bisection; ties
//! at a cut-off kept whole, tokens more than [`optune_kernels::FLOOR_NATS`]·T below the top never
//! kept), and the token is the first id whose running kept weight passes `u · total`, at one
//! uniform `u` per row from the row's own seeded stream (the host sends those few bytes).
//!
//! The same seed repeats the same draws on the same device; the host sampler's draws differ (its
//! uniform walks the tokens in probability order).

use candle_core::{Result, Tensor};
use optune_kernels::Sampling;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

#[derive(Debug, Clone)]
pub struct SamplingParams {
    /// 0 means greedy decoding.
    pub temperature: f64,
    pub top_p: f64,
    pub top_k: Option<usize>,
    /// Keep only tokens whose tempered probability is at least this share of the most likely
    /// token's (applied after top-k and top-p, as transformers and vLLM do); 0 keeps every one.
    pub min_p: f64,
    pub max_new_tokens: usize,
}

/// Picks the next token from `logits` and returns it with its untempered log-probability.
///
/// Greedy (temperature 0) takes the argmax, ties to the lowest id. Otherwise the support is
/// the `top_k` most likely tokens (all without it), then the smallest prefix of them, by
/// descending probability, whose tempered mass reaches `top_p`, then those of it whose weight
/// `exp((logit − max) / temperature)` is at least `min_p`; a token is drawn from that support
/// in proportion to its weight. Only as much of the vocabulary as the prefix needs is sorted.
pub fn sample_token(logits: &[f32], params: &SamplingParams, rng: &mut ChaCha8Rng) -> (u32, f64) {
    let log_z = optune_kernels::host::log_sum_exp(logits);
    let logp = |t: usize| logits[t] as f64 - log_z;
    // Argmax, ties to the lowest id.
    let max = optune_kernels::host::max_f32(logits);
    let best = logits.iter().position(|&l| l == max).unwrap_or(0);
    if params.temperature <= 0.0 {
        return (best as u32, logp(best));
    }
    let inv_t = 1.0 / params.temperature;
    let top = logits[best] as f64;
    let weight =
        |t: usize| optune_kernels::host::exp_f32(((logits[t] as f64 - top) * inv_t) as f32) as f64;
    let vocab = logits.len();
    let top_k = params.top_k.filter(|&k| k > 0 && k < vocab);
    let by_probability = |a: &u32, b: &u32| {
        logits[*b as usize]
            .total_cmp(&logits[*a as usize])
            .then(a.cmp(b))
    };
    // Min-p's floor on the weight, which is the probability relative to the top token's.
    let min_p = params.min_p;
    let kept_weight = |t: usize| {
        let w = weight(t);
        if w >= min_p {
            w
        } else {
            0.0
        }
    };
    if top_k.is_none() && params.top_p >= 1.0 {
        // The whole vocabulary: draw in id order, no sorting needed.
        let weights: Vec<f64> = (0..vocab).map(kept_weight).collect();
        let total: f64 = weights.iter().sum();
        return draw(rng, &weights, total, |i| i, logp);
    }
    let mut order: Vec<u32> = (0..vocab as u32).collect();
    let cap = top_k.unwrap_or(vocab);
    // The mass the nucleus is measured against: the top-k tokens' or the whole vocabulary's.
    let total: f64 = match top_k {
        Some(k) => {
            order.select_nth_unstable_by(k - 1, by_probability);
            order.truncate(k);
            order.sort_unstable_by(by_probability);
            order.iter().map(|&t| weight(t as usize)).sum()
        }
        None => (0..vocab).map(weight).sum(),
    };
    // `order[..sorted]` is ranked; with top-k all of it already is.
    let mut sorted = if top_k.is_some() { cap } else { 0 };
    let mut keep = cap;
    if params.top_p < 1.0 {
        let mut cumulative = 0.0;
        let mut i = 0;
        keep = loop {
            if i == sorted {
                if sorted == cap {
                    break cap;
                }
                // Sort the next stretch of the ranking: 64 tokens, then 8× more each time.
                let want = (sorted.max(8) * 8).min(cap);
                if want < order.len() {
                    order[sorted..].select_nth_unstable_by(want - sorted - 1, by_probability);
                }
                order[sorted..want].sort_unstable_by(by_probability);
                sorted = want;
            }
            cumulative += weight(order[i] as usize) / total;
            i += 1;
            if cumulative >= params.top_p {
                break i;
            }
        };
    }
    let weights: Vec<f64> = order[..keep]
        .iter()
        .map(|&t| kept_weight(t as usize))
        .collect();
    let kept: f64 = weights.iter().sum();
    draw(rng, &weights, kept, |i| order[i] as usize, logp)
}

/// Draws index `i` with probability `weights[i] / total` and returns the token `token(i)`.
fn draw(
    rng: &mut ChaCha8Rng,
    weights: &[f64],
    total: f64,
    token: impl Fn(usize) -> usize,
    logp: impl Fn(usize) -> f64,
) -> (u32, f64) {
    let mut u = rng.random::<f64>() * total;
    for (i, w) in weights.iter().enumerate() {
        if u < *w {
            return (token(i) as u32, logp(token(i)));
        }
        u -= w;
    }
    // Rounding left u past the end: the last token with any weight.
    let last = weights
        .iter()
        .rposition(|w| *w > 0.0)
        .unwrap_or(weights.len() - 1);
    (token(last) as u32, logp(token(last)))
}

/// Samples one token from each row of `logits [rows, vocab]` with `uniforms[row]` in `[0, 1)`
/// (unused when greedy), and returns each token with its untempered log-probability
/// `log softmax(logits)[token]`. Only `rows × 2` numbers cross to the host.
pub fn sample_rows(
    logits: &Tensor,
    params: &SamplingParams,
    uniforms: &[f64],
) -> Result<Vec<(u32, f64)>> {
    let (rows, _) = logits.dims2()?;
    if uniforms.len() != rows {
        candle_core::bail!("{} uniforms for {rows} rows", uniforms.len());
    }
    if rows == 0 {
        return Ok(Vec::new());
    }
    let u = uniforms.iter().map(|&u| (u as f32).min(LARGEST_BELOW_ONE));
    let u = Tensor::from_iter(u, logits.device())?;
    let sampling = Sampling {
        temperature: params.temperature as f32,
        top_k: params.top_k.map_or(0, |k| k.min(u32::MAX as usize) as u32),
        top_p: params.top_p as f32,
        min_p: params.min_p as f32,
    };
    let picks = optune_kernels::sample_rows(logits, &u, sampling)?.to_vec2::<f32>()?;
    Ok(picks
        .into_iter()
        .map(|row| (row[0] as u32, row[1] as f64))
        .collect())
}

/// The largest f32 below 1: a uniform of 1.0 (f64 rounding up) would draw past the last token.
const LARGEST_BELOW_ONE: f32 = 1.0 - f32::EPSILON / 2.0;

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use rand::SeedableRng;

    /// Sampling parameters for one token.
    fn params(temperature: f64, top_p: f64, top_k: Option<usize>) -> SamplingParams {
        SamplingParams {
            temperature,
            top_p,
            top_k,
            min_p: 0.0,
            max_new_tokens: 1,
        }
    }

    #[test]
    fn greedy_picks_the_argmax_and_reports_its_logprob() {
        let logits = [0.0f32, 2.0, 1.0];
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let (t, lp) = sample_token(&logits, &params(0.0, 1.0, None), &mut rng);
        assert_eq!(t, 1);
        let z = (0f64.exp() + 2f64.exp() + 1f64.exp()).ln();
        // The exponentials are f32: a few 1e-8 of error.
        assert!((lp - (2.0 - z)).abs() < 1e-6, "{lp}");
    }

    #[test]
    fn top_p_and_top_k_restrict_the_support() {
        // Probabilities ∝ e^3, e^2, e^0, e^0: top-p 0.5 keeps only the first.
        let logits = [2.0f32, 3.0, 0.0, 0.0];
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for _ in 0..200 {
            assert_eq!(
                sample_token(&logits, &params(1.0, 0.5, None), &mut rng).0,
                1
            );
            let (t, _) = sample_token(&logits, &params(1.0, 1.0, Some(2)), &mut rng);
            assert!(t == 0 || t == 1);
        }
    }

    /// The nucleus by sorting the whole vocabulary, as the definition reads.
    fn sample_by_full_sort(logits: &[f32], params: &SamplingParams, rng: &mut ChaCha8Rng) -> u32 {
        let top = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let weight = |t: usize| {
            optune_kernels::host::exp_f32(((logits[t] as f64 - top) / params.temperature) as f32)
                as f64
        };
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        if let Some(k) = params.top_k {
            order.truncate(k);
        }
        let total: f64 = if params.top_k.is_some() {
            order.iter().map(|&t| weight(t)).sum()
        } else {
            (0..logits.len()).map(weight).sum()
        };
        let mut keep = order.len();
        let mut cumulative = 0.0;
        for (i, &t) in order.iter().enumerate() {
            cumulative += weight(t) / total;
            if cumulative >= params.top_p {
                keep = i + 1;
                break;
            }
        }
        order.truncate(keep);
        order.retain(|&t| weight(t) >= params.min_p);
        let weights: Vec<f64> = order.iter().map(|&t| weight(t)).collect();
        let kept: f64 = weights.iter().sum();
        draw(rng, &weights, kept, |i| order[i], |_| 0.0).0
    }

    #[test]
    fn partial_ranking_draws_what_a_full_sort_draws() {
        let mut data = ChaCha8Rng::seed_from_u64(42);
        for case in 0..60 {
            let vocab = [5, 300, 5000][case % 3];
            // Peaked and flat distributions, with ties.
            let spread = [0.5, 4.0, 12.0][case % 3];
            let logits: Vec<f32> = (0..vocab)
                .map(|_| ((data.random::<f64>() * spread * 4.0).round() / 4.0) as f32)
                .collect();
            let params = SamplingParams {
                min_p: [0.0, 0.0, 0.05, 0.3, 0.0][case % 5],
                ..params(
                    [0.7, 1.0, 1.5][case % 3],
                    [0.5, 0.9, 0.99, 1.0][case % 4],
                    [None, Some(3), Some(40)][case % 3],
                )
            };
            // Without a cut-off the sampler draws in id order, not by rank.
            if params.top_p >= 1.0 && params.top_k.is_none() {
                continue;
            }
            let (mut a, mut b) = (
                ChaCha8Rng::seed_from_u64(case as u64),
                ChaCha8Rng::seed_from_u64(case as u64),
            );
            for _ in 0..20 {
                assert_eq!(
                    sample_token(&logits, &params, &mut a).0,
                    sample_by_full_sort(&logits, &params, &mut b),
                    "case {case}"
                );
            }
        }
    }

    #[test]
    fn min_p_keeps_the_tokens_near_the_top_in_either_branch() {
        // Weights at T = 1 relative to the top (id 1): e^-1 = 0.37, 1, e^-3 = 0.05, e^-2 = 0.14.
        let logits = [2.0f32, 3.0, 0.0, 1.0];
        let support = |min_p: f64, temperature: f64, top_p: f64| {
            let p = SamplingParams {
                min_p,
                ..params(temperature, top_p, None)
            };
            let mut rng = ChaCha8Rng::seed_from_u64(3);
            let mut ids: Vec<u32> = (0..400)
                .map(|_| sample_token(&logits, &p, &mut rng).0)
                .collect();
            ids.sort();
            ids.dedup();
            ids
        };
        // In id order (no top-p) and by rank (top-p 0.999, which alone keeps all four).
        for top_p in [1.0, 0.999] {
            assert_eq!(support(0.1, 1.0, top_p), [0, 1, 3], "top-p {top_p}");
            assert_eq!(support(0.3, 1.0, top_p), [0, 1], "top-p {top_p}");
            assert_eq!(support(1.0, 1.0, top_p), [1], "top-p {top_p}");
            // At T = 2 the gaps halve: e^-1.5 = 0.22 for id 2.
            assert_eq!(support(0.2, 2.0, top_p), [0, 1, 2, 3], "top-p {top_p}");
            assert_eq!(support(0.0, 1.0, top_p), [0, 1, 2, 3], "top-p {top_p}");
        }
    }

    #[test]
    fn sampling_follows_the_distribution() {
        let logits = [0.0f32, (3.0f32).ln()];
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let ones = (0..20000)
            .filter(|_| sample_token(&logits, &params(1.0, 1.0, None), &mut rng).0 == 1)
            .count();
        let share = ones as f64 / 20000.0;
        assert!((share - 0.75).abs() < 0.015, "{share}");
    }

    fn logits(rows: &[Vec<f32>]) -> Tensor {
        let width = rows[0].len();
        Tensor::from_iter(rows.iter().flatten().copied(), &Device::Cpu)
            .unwrap()
            .reshape((rows.len(), width))
            .unwrap()
    }

    /// The support the host sampler keeps (the nucleus of [`sample_token`]), by
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
        host.retain(|&t| w(t) >= p.min_p);
        tied.retain(|&t| w(t) >= p.min_p);
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
            let p = SamplingParams {
                // No logit gap (quarter steps) lies on min-p's cut at these temperatures.
                min_p: [0.0, 0.05, 0.0, 0.2, 0.0][case % 5],
                ..params(
                    [0.7, 1.0, 1.5][case % 3],
                    [0.5, 0.9, 1.0][case % 3],
                    [None, Some(3), Some(40), None][case % 4],
                )
            };
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

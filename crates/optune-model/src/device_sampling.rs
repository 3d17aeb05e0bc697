//! Sampling where the logits are: on a GPU the `[rows, vocab]` logits stay on the device and
//! each step copies back one token id and one log-probability per row.
//!
//! It draws from the distribution [`crate::generate::sample_token`] draws from (greedy,
//! temperature, top-k, top-p) by other means, in one op ([`optune_kernels::sample_rows`]: one
//! kernel launch per step on a GPU, its CPU form on the generic path): top-k and top-p become
//! per-row thresholds on the logit found by bisection (ties at a cut-off kept whole, tokens more
//! than [`optune_kernels::FLOOR_NATS`]·T below the top never kept), and the token is the first id
//! whose running kept weight passes `u · total`, at one uniform `u` per row from the row's own
//! seeded stream (the host sends those few bytes).
//!
//! The same seed repeats the same draws on the same device; the host sampler's draws differ (its
//! uniform walks the tokens in probability order).

use crate::generate::SamplingParams;
use candle_core::{Result, Tensor};
use optune_kernels::Sampling;

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
    use crate::generate::tests::params;
    use candle_core::Device;
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

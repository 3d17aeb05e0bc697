//! Sampling one token from each row of logits where the logits are, as one op: on a GPU one
//! kernel launch per step (src/cuda/sampling.cu, one block per row), and only the chosen ids and
//! their log-probabilities cross to the host.
//!
//! It draws from the distribution a sorting sampler draws from (greedy, temperature, top-k,
//! top-p, min-p, applied in transformers' and vLLM's order), without sorting the vocabulary
//! (candle's CUDA sort holds a row in 48 KiB of shared memory: 12,288 columns):
//! * the top-k and top-p cut-offs are thresholds on the shifted logit `l − max(l)`, found per row
//!   by [`BISECTION_STEPS`] halvings of `[−FLOOR_NATS·T, 1]`: the highest threshold at which the
//!   tokens at or above it number at least k, then hold at least p of the top-k tokens' weight.
//!   Min-p then raises the threshold to `T·ln(min_p)`: a token is kept when its tempered
//!   probability is at least min_p times the top token's.
//!   Tokens tied with the last one kept are all kept, and tokens more than
//!   [`FLOOR_NATS`]·T below the top are never kept: each weighs under e^-40 of the top token,
//!   together under 1e-12 of the mass for any vocabulary up to 10^5.
//! * the draw is the first id whose running kept weight, in id order, exceeds `u · total` for the
//!   row's uniform `u`.
//!
//! The CPU form below is the specification: it computes every sum in the order the kernel does
//! (256 lanes, lane `t` summing ids `t, t + 256, …` in order, then the lanes' sums in lane order;
//! the draw's running weight over 256 contiguous chunks of ids), so the two devices differ only
//! by their `exp`'s last bits. The same uniform and logits repeat the same draw.

use crate::kernel_args::KernelArg;
use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Kept tokens lie at most this many nats (times the temperature) below the most likely one.
pub const FLOOR_NATS: f32 = 40.0;
/// Halvings of the threshold interval: `(FLOOR_NATS·T + 1) / 2^32` separates any two f32 logits
/// of ordinary size.
pub const BISECTION_STEPS: u32 = 32;
/// Lanes of the kernel's block, and of the CPU form's sums.
const LANES: usize = 256;

/// How a row's token is chosen: `temperature` 0 is greedy; `top_k` 0 or ≥ the vocabulary,
/// `top_p` ≥ 1 and `min_p` 0 keep every token.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampling {
    pub temperature: f32,
    pub top_k: u32,
    pub top_p: f32,
    pub min_p: f32,
}

/// One token from each row of `logits [rows, vocab]` (f32, bf16 or f16, read as f32) with
/// `uniforms [rows]` (f32 in `[0, 1)`, unused when greedy): `[rows, 2]` f32 of the token id and
/// its untempered log-probability `log softmax(logits)[token]`, on the logits' device.
pub fn sample_rows(logits: &Tensor, uniforms: &Tensor, sampling: Sampling) -> Result<Tensor> {
    let (rows, vocab) = logits.dims2()?;
    if uniforms.dims() != [rows] {
        bail!(
            "sample_rows: uniforms {:?} for {rows} rows",
            uniforms.dims()
        );
    }
    if rows == 0 || vocab == 0 {
        bail!("sample_rows: no logits ({rows} rows of {vocab})");
    }
    if vocab > 1 << 24 {
        bail!("sample_rows: {vocab} tokens: ids above 2^24 do not survive f32");
    }
    if !matches!(logits.dtype(), DType::F32 | DType::BF16 | DType::F16) {
        bail!("sample_rows: {:?} logits", logits.dtype());
    }
    // Read in their own dtype (as f32 values, exactly): no cast of the logits on the way.
    let logits = logits.contiguous()?;
    let uniforms = uniforms.to_dtype(DType::F32)?.contiguous()?;
    logits.apply_op2_no_bwd(&uniforms, &SampleRows(sampling))
}

struct SampleRows(Sampling);

/// The kernel's arguments (src/cuda/sampling.cu): the addresses of `logits [rows, vocab]`,
/// `uniforms [rows]` and `out [rows, 2]`, then the vocabulary, the sampling settings and the
/// search's floor and steps. The CUDA launch and the emulated tests both pass this list.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))] // the CUDA launch and the emulated tests
fn kernel_args(
    [logits, uniforms, out]: [u64; 3],
    vocab: usize,
    sampling: Sampling,
) -> Result<Vec<KernelArg>> {
    Ok(vec![
        KernelArg::Pointer(logits),
        KernelArg::Pointer(uniforms),
        KernelArg::Pointer(out),
        KernelArg::int(vocab, "vocab")?,
        KernelArg::F32(sampling.temperature),
        // A top_k of the vocabulary or more keeps every token, as the vocabulary itself does
        // (and fits the kernel's int).
        KernelArg::int((sampling.top_k as usize).min(vocab), "top_k")?,
        KernelArg::F32(sampling.top_p),
        KernelArg::F32(sampling.min_p_threshold()),
        KernelArg::F32(FLOOR_NATS),
        KernelArg::int(BISECTION_STEPS as usize, "steps")?,
    ])
}

/// The CUDA kernel's launch for `rows` rows: one block of [`LANES`] threads per row, as the
/// kernel's shared arrays assume; `(blocks, threads)`.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))] // the CUDA launch and the emulated tests
fn launch_dims(rows: usize) -> (u32, u32) {
    (rows as u32, LANES as u32)
}

/// `Σ f(i)` over `0..n` as the kernel sums: lane `t` adds `f(t), f(t + LANES), …` in order, then
/// the lanes' sums are added in lane order.
fn lane_sum(n: usize, f: impl Fn(usize) -> f32) -> f32 {
    (0..LANES.min(n))
        .map(|lane| (lane..n).step_by(LANES).fold(0f32, |acc, i| acc + f(i)))
        .fold(0f32, |acc, s| acc + s)
}

impl Sampling {
    /// The lowest shifted logit min-p keeps, `T·ln(min_p)` (−∞ without min-p): computed once
    /// here for both forms, so that they compare against the same number.
    fn min_p_threshold(&self) -> f32 {
        if self.min_p > 0.0 {
            self.temperature * self.min_p.ln()
        } else {
            f32::NEG_INFINITY
        }
    }

    /// The token and its log-probability for one row, with uniform `u`.
    fn row(&self, logits: &[f32], u: f32) -> (u32, f32) {
        let n = logits.len();
        let top = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        // Computed once here (the kernel recomputes them in every pass: the same numbers).
        let shifted: Vec<f32> = logits.iter().map(|&l| l - top).collect();
        let shifted = |i: usize| shifted[i];
        let log_z = lane_sum(n, |i| shifted(i).exp()).ln();
        let best = logits.iter().position(|&l| l == top).unwrap_or(0);
        let logp = |i: usize| shifted(i) - log_z;
        if self.temperature <= 0.0 {
            return (best as u32, logp(best));
        }
        let weights: Vec<f32> = (0..n)
            .map(|i| (shifted(i) / self.temperature).exp())
            .collect();
        let weight = |i: usize| weights[i];
        let mass_from = |t: f32| lane_sum(n, |i| if shifted(i) >= t { weight(i) } else { 0.0 });
        let mut threshold = -FLOOR_NATS * self.temperature.max(1e-3);
        if self.top_k > 0 && (self.top_k as usize) < n {
            let k = self.top_k as f32;
            threshold = bisect(threshold, |mid| {
                lane_sum(n, |i| if shifted(i) >= mid { 1.0 } else { 0.0 }) >= k
            });
        }
        if self.top_p < 1.0 {
            let target = mass_from(threshold) * self.top_p;
            threshold = bisect(threshold, |mid| mass_from(mid) >= target);
        }
        threshold = threshold.max(self.min_p_threshold());
        let kept = |i: usize| {
            if shifted(i) >= threshold {
                weight(i)
            } else {
                0.0
            }
        };
        // Contiguous chunks of ids, one per lane: each lane's kept weight, then the running sum
        // over the lanes in order finds the chunk, and a walk through it the id.
        let chunk = n.div_ceil(LANES);
        let chunks: Vec<f32> = (0..LANES)
            .map(|lane| (lane * chunk..((lane + 1) * chunk).min(n)).fold(0f32, |a, i| a + kept(i)))
            .collect();
        let total = chunks.iter().fold(0f32, |a, &s| a + s);
        let target = u * total;
        let mut before = 0f32;
        for (lane, &sum) in chunks.iter().enumerate() {
            if before + sum > target {
                let mut running = before;
                for i in lane * chunk..((lane + 1) * chunk).min(n) {
                    running += kept(i);
                    if running > target {
                        return (i as u32, logp(i));
                    }
                }
                break;
            }
            before += sum;
        }
        // Rounding put the target at or past the total: the most likely token, which every
        // support holds.
        (best as u32, logp(best))
    }
}

/// The highest threshold in `[low, 1]` (to [`BISECTION_STEPS`] halvings) at which `holds` is
/// still true, for `holds` true at `low` and false at 1 (above every shifted logit).
fn bisect(low: f32, holds: impl Fn(f32) -> bool) -> f32 {
    let (mut low, mut high) = (low, 1f32);
    for _ in 0..BISECTION_STEPS {
        let mid = (low + high) * 0.5;
        if holds(mid) {
            low = mid;
        } else {
            high = mid;
        }
    }
    low
}

impl CustomOp2 for SampleRows {
    fn name(&self) -> &'static str {
        "sample-rows"
    }

    fn cpu_fwd(
        &self,
        logits: &CpuStorage,
        ll: &Layout,
        uniforms: &CpuStorage,
        lu: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, vocab) = ll.shape().dims2()?;
        let uniforms = crate::storage::contiguous::<f32>(uniforms, lu, "sample_rows", "uniforms")?;
        // f32 logits are read in place; bf16 and f16 widened once, exactly.
        let logits = crate::storage::floats(logits, ll, "sample_rows", "logits")?;
        let picks: Vec<[f32; 2]> = logits
            .par_chunks(vocab)
            .zip(uniforms.par_iter())
            .map(|(row, &u)| {
                let (token, logp) = self.0.row(row, u);
                [token as f32, logp]
            })
            .collect();
        Ok((
            CpuStorage::F32(picks.into_iter().flatten().collect()),
            Shape::from((rows, 2)),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        logits: &candle_core::CudaStorage,
        ll: &Layout,
        uniforms: &candle_core::CudaStorage,
        lu: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::kernel_args::cuda::{config, launch as launch_kernel};
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DevicePtrMut, DeviceRepr};
        use candle_core::cuda_backend::CudaDType;
        use candle_core::CudaStorage;

        const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/sampling.ptx"));

        fn launch<T: CudaDType + DeviceRepr>(
            op: &SampleRows,
            name: &str,
            (logits, ll): (&CudaStorage, &Layout),
            (uniforms, lu): (&CudaStorage, &Layout),
        ) -> Result<CudaStorage> {
            let (rows, vocab) = ll.shape().dims2()?;
            let device = logits.device().clone();
            let stream = device.cuda_stream();
            let logits = logits.as_cuda_slice::<T>()?.slice(ll.start_offset()..);
            let uniforms = uniforms.as_cuda_slice::<f32>()?.slice(lu.start_offset()..);
            // SAFETY: the kernel writes both numbers of every row.
            let mut out = unsafe { device.alloc::<f32>(rows * 2)? };
            let func = device.get_or_load_custom_func(name, "optune_sampling", PTX)?;
            {
                // The guards order the launch after the buffers' last writes and record it.
                let (logits_at, _logits) = logits.device_ptr(&stream);
                let (uniforms_at, _uniforms) = uniforms.device_ptr(&stream);
                let (out_at, _out) = out.device_ptr_mut(&stream);
                let args = kernel_args([logits_at, uniforms_at, out_at], vocab, op.0)?;
                // SAFETY: the list is the kernel's; logits hold rows·vocab elements of T,
                // uniforms rows f32, out 2·rows f32 (shapes checked by `sample_rows`), and the
                // block is LANES threads as the kernel's shared arrays assume. The guards live to
                // the end of this block.
                unsafe { launch_kernel(func.builder(), config(launch_dims(rows)), &args) }?;
            }
            Ok(CudaStorage::wrap_cuda_slice(out, device))
        }

        let rows = ll.shape().dims2()?.0;
        let (l, u) = ((logits, ll), (uniforms, lu));
        let out = match logits.dtype() {
            DType::F32 => launch::<f32>(self, "sample_rows_f32", l, u)?,
            DType::BF16 => launch::<half::bf16>(self, "sample_rows_bf16", l, u)?,
            DType::F16 => launch::<half::f16>(self, "sample_rows_f16", l, u)?,
            other => bail!("sample_rows: {other:?} logits on CUDA"),
        };
        Ok((out, Shape::from((rows, 2))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_run_lane_by_lane_as_the_kernel_adds_them() {
        // 1e8 and -1e8 head lanes 0 and 1, whose other element (a 1) is lost to rounding there;
        // the 254 other lanes hold two ones each. In id order the large values cancel first and
        // all 510 ones count.
        let f = |i: usize| match i {
            0 => 1e8f32,
            1 => -1e8,
            _ => 1.0,
        };
        assert_eq!((0..512).fold(0f32, |a, i| a + f(i)), 510.0);
        assert_eq!(lane_sum(512, f), 508.0);
    }

    #[test]
    fn greedy_top_k_and_top_p_choose_within_their_support() {
        let sampling = |temperature, top_k, top_p| Sampling {
            temperature,
            top_k,
            top_p,
            min_p: 0.0,
        };
        // Weights at T = 1: 1, e^-1, e^-2, e^-3 (ids 2, 0, 3, 1).
        let row = [2.0f32, 0.0, 3.0, 1.0];
        let z = row
            .iter()
            .map(|&l| ((l - 3.0) as f64).exp())
            .sum::<f64>()
            .ln();
        let logp = |id: usize| ((row[id] - 3.0) as f64 - z) as f32;
        let (token, lp) = sampling(0.0, 0, 1.0).row(&row, 0.99);
        assert_eq!(token, 2);
        assert!((lp - logp(2)).abs() < 1e-6);
        // Top-2: ids 2 and 0; u just below 1 takes the later of them in id order, id 2.
        assert_eq!(sampling(1.0, 2, 1.0).row(&row, 0.999).0, 2);
        assert_eq!(sampling(1.0, 2, 1.0).row(&row, 0.0).0, 0);
        // Top-p 0.5: id 2 alone holds 1 / (1 + e^-1 + e^-2 + e^-3) = 0.64 of the mass.
        for u in [0.0, 0.5, 0.999] {
            assert_eq!(sampling(1.0, 0, 0.5).row(&row, u).0, 2);
        }
        // Everything: u = 0 takes id 0, the first with weight.
        let (token, lp) = sampling(1.0, 0, 1.0).row(&row, 0.0);
        assert_eq!(token, 0);
        assert!((lp - logp(0)).abs() < 1e-6);
        // Min-p 0.3 at T = 1 keeps ids 2 and 0 (e^-1 = 0.37 of the top's weight, e^-2 = 0.14
        // not); at T = 2 id 3 too (e^-1 at half the logit gap); 1 keeps only the top. After
        // top-k 2 it keeps the same two: the ratios to the top do not depend on the cut.
        let min_p = |temperature, top_k, min_p| Sampling {
            min_p,
            ..sampling(temperature, top_k, 1.0)
        };
        let support = |s: Sampling| -> Vec<u32> {
            let mut ids: Vec<u32> = (0..=100).map(|u| s.row(&row, u as f32 / 101.0).0).collect();
            ids.sort();
            ids.dedup();
            ids
        };
        assert_eq!(support(min_p(1.0, 0, 0.3)), [0, 2]);
        assert_eq!(support(min_p(2.0, 0, 0.3)), [0, 2, 3]);
        assert_eq!(support(min_p(1.0, 0, 1.0)), [2]);
        assert_eq!(support(min_p(1.0, 2, 0.3)), [0, 2]);
        assert_eq!(support(min_p(1.0, 0, 0.0)), [0, 1, 2, 3]);
    }
}

/// The CUDA kernel (src/cuda/sampling.cu), run by the emulator with the launch the CUDA path
/// makes: it draws the CPU form's tokens, with the same log-probabilities to the bit (both add
/// in the same order and call the same libm `expf`; on a GPU only `expf`'s last bits differ).
#[cfg(test)]
mod emulated {
    use super::*;
    use crate::kernel_args::emulated;
    use candle_core::Device;
    use optune_cuda_emulator::{in_both_placements, Element, Launch};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// Rows of logits: spread wide, tied at the top, nearly flat.
    fn rows(vocab: usize, rng: &mut ChaCha8Rng) -> Vec<f32> {
        let mut rows = Vec::new();
        rows.extend((0..vocab).map(|_| rng.random::<f32>() * 12.0 - 6.0));
        rows.extend((0..vocab).map(|i| {
            if i % 97 == 3 {
                5.0
            } else {
                rng.random::<f32>() * 4.0
            }
        }));
        rows.extend((0..vocab).map(|_| rng.random::<f32>() * 0.01));
        rows
    }

    /// The kernel by the emulator, with the CUDA path's launch and argument list.
    fn kernel_draws<T: Element>(
        logits: &[T],
        vocab: usize,
        uniforms: &[f32],
        sampling: Sampling,
    ) -> Vec<f32> {
        let (grid, block) = launch_dims(uniforms.len());
        let kernel = format!("sample_rows_{}", T::SUFFIX);
        in_both_placements(&kernel, |memory| {
            let (logits, uniforms_at) = (memory.input(logits), memory.input(uniforms));
            let out = memory.output::<f32>(2 * uniforms.len());
            let args = kernel_args([logits, uniforms_at, out.address], vocab, sampling)
                .map_err(|e| e.to_string())?;
            // SAFETY: logits hold rows·vocab elements, uniforms rows and out 2·rows, one block
            // per row.
            unsafe { memory.launch(&kernel, Launch { grid, block }, &emulated(&args)) }?;
            Ok(memory.read(&out))
        })
        .unwrap()
    }

    #[test]
    fn the_cuda_kernel_draws_the_cpu_forms_tokens() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let samplings = [
            (0.0, 0, 1.0, 0.0),
            (1.0, 0, 1.0, 0.0),
            (1.0, 0, 0.9, 0.0),
            (0.7, 50, 1.0, 0.0),
            (1.3, 5, 0.8, 0.0),
            (1.0, 0, 1.0, 0.05),
            (0.8, 40, 0.95, 0.2),
        ]
        .map(|(temperature, top_k, top_p, min_p)| Sampling {
            temperature,
            top_k,
            top_p,
            min_p,
        });
        // Fewer ids than lanes, a vocabulary that is no multiple of the lanes.
        for vocab in [100, 1000] {
            let logits = rows(vocab, &mut rng);
            let uniforms = [0.0, 0.37, 0.9999];
            let tensor = Tensor::from_vec(logits.clone(), (3, vocab), &Device::Cpu).unwrap();
            let u = Tensor::new(&uniforms, &Device::Cpu).unwrap();
            for sampling in samplings {
                for dtype in [DType::F32, DType::BF16, DType::F16] {
                    let tensor = tensor.to_dtype(dtype).unwrap();
                    let want: Vec<f32> = sample_rows(&tensor, &u, sampling)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap();
                    let got = match dtype {
                        DType::F32 => kernel_draws(&logits, vocab, &uniforms, sampling),
                        DType::BF16 => {
                            let l: Vec<half::bf16> =
                                tensor.flatten_all().unwrap().to_vec1().unwrap();
                            kernel_draws(&l, vocab, &uniforms, sampling)
                        }
                        _ => {
                            let l: Vec<half::f16> =
                                tensor.flatten_all().unwrap().to_vec1().unwrap();
                            kernel_draws(&l, vocab, &uniforms, sampling)
                        }
                    };
                    assert_eq!(got, want, "vocab {vocab}, {sampling:?}, {dtype:?}");
                }
            }
        }
    }

    #[test]
    fn a_top_k_past_the_vocabulary_keeps_every_token_on_the_gpu_too() {
        // The CPU form takes any u32; the kernel's int gets the vocabulary instead.
        let sampling = Sampling {
            temperature: 1.0,
            top_k: u32::MAX,
            top_p: 1.0,
            min_p: 0.0,
        };
        let args = kernel_args([0; 3], 32_000, sampling).unwrap();
        assert_eq!(args[5], KernelArg::I32(32_000));
    }
}

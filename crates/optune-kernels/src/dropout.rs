//! Dropout whose mask is a function of each element's place in a counter-based stream, so that it
//! is drawn where the tensor lives (one kernel on CUDA, src/cuda/dropout.cu), never stored, and
//! drawn again, the same, by the backward pass and by a recomputed forward pass.
//!
//! Element `i` (row-major) of a call at stream position `position` under the stream's `key` is
//! kept when the high 32 bits of SplitMix64's output function applied to
//! `key + (position + i) · 0x9E3779B97F4A7C15` are below `keep · 2³²`, and is then scaled by
//! `1 / keep` in f32 and rounded once to the tensor's dtype; a dropped element is +0. SplitMix64
//! is the counter-based generator that seeds xoshiro: each output is a fixed mix of its counter, so
//! any element's bits are computed on their own, in any order, on any device. The CPU form below
//! is the specification; the emulated tests hold the CUDA kernel to it, bit for bit. On a GPU the
//! kernels are built with `--use_fast_math`, which flushes subnormal values to zero, as the tools
//! set the CPU to do (flush-to-zero and denormals-are-zero); f64, for gradient checks, has a CPU
//! form only.

use crate::kernel_args::KernelArg;
use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, WithDType};
use half::{bf16, f16};
use rayon::prelude::*;

/// SplitMix64's increment (the golden ratio in 64 bits).
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;
/// Below this many elements the CPU form runs on the calling thread.
const PARALLEL_ELEMENTS: usize = 1 << 16;

/// SplitMix64's output function.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The key of the stream seeded by `seed`: SplitMix64's first output for it, so that nearby
/// seeds give unrelated streams.
pub fn dropout_key(seed: u64) -> u64 {
    mix(seed.wrapping_add(GOLDEN))
}

/// The 32 bits that decide element `counter` of the stream `key`.
fn bits(key: u64, counter: u64) -> u32 {
    (mix(key.wrapping_add(counter.wrapping_mul(GOLDEN))) >> 32) as u32
}

/// The mask of one dropout call: elements `position ..` of the stream `key`, each kept with
/// probability `1 − p`. [`dropout`] applies it as an op of its own; [`crate::lora_linear`] applies
/// it inside its adapter's product, drawing it again in the backward pass instead of keeping the
/// dropped-out input.
#[derive(Clone, Copy, Debug)]
pub struct DropoutMask {
    key: u64,
    position: u64,
    /// `keep · 2³²`: an element whose bits are below it is kept.
    threshold: u64,
    /// The keep probability `1 − p`.
    keep: f64,
    /// `1 / keep`.
    scale: f32,
}

impl DropoutMask {
    /// The mask of elements `position .. ` of the stream `key` ([`dropout_key`]) for dropout
    /// probability `p` in `[0, 1)`.
    pub fn new(key: u64, position: u64, p: f32) -> Result<Self> {
        if !(0.0..1.0).contains(&p) {
            bail!("dropout: p {p} is not in [0, 1)");
        }
        let keep = 1.0 - f64::from(p);
        Ok(Self {
            key,
            position,
            threshold: (keep * 4_294_967_296.0).round() as u64,
            keep,
            scale: (1.0 / keep) as f32,
        })
    }

    fn keeps(&self, i: usize) -> bool {
        u64::from(bits(self.key, self.position.wrapping_add(i as u64))) < self.threshold
    }

    /// `x` through `scaled` (a kept element) or +0, computed in `widen`'s type and rounded
    /// once by `narrow`.
    fn apply<T: Copy + Send + Sync, W>(
        &self,
        x: &[T],
        widen: impl Fn(T) -> W + Sync,
        scaled: impl Fn(W) -> W + Sync,
        narrow: impl Fn(W) -> T + Sync,
        zero: W,
    ) -> Vec<T>
    where
        W: Copy + Send + Sync,
    {
        map_elements(x, |i, v| match self.keeps(i) {
            true => narrow(scaled(widen(v))),
            false => narrow(zero),
        })
    }

    /// Element `i` of a call, `v`, through the mask as [`dropout`] takes an f32 or f64 value: an
    /// f32 scaled in f32 (the product of two f32 is exact in f64, so rounding it once gives the
    /// f32 product), an f64 in f64; a dropped one is +0.
    fn float_element<T: WithDType>(&self, i: usize, v: T) -> T {
        debug_assert!(matches!(T::DTYPE, DType::F32 | DType::F64));
        let scale = match T::DTYPE {
            DType::F64 => 1.0 / self.keep,
            _ => f64::from(self.scale),
        };
        match self.keeps(i) {
            true => T::from_f64(v.to_f64() * scale),
            false => T::from_f64(0.0),
        }
    }

    /// The mask applied to f32 or f64 values, as [`dropout`] applies it.
    pub(crate) fn apply_float<T: WithDType>(&self, x: &[T]) -> Vec<T> {
        map_elements(x, |i, v| self.float_element(i, v))
    }

    /// `sum += mask(x)`, elementwise, for f32 or f64 values.
    pub(crate) fn add_applied_float<T: WithDType>(&self, sum: &mut [T], x: &[T]) {
        let one = |(i, (s, &v)): (usize, (&mut T, &T))| *s += self.float_element(i, v);
        match x.len() < PARALLEL_ELEMENTS {
            true => sum.iter_mut().zip(x).enumerate().for_each(one),
            false => sum
                .par_iter_mut()
                .zip(x.par_iter())
                .enumerate()
                .for_each(one),
        }
    }
}

/// `one(i, x[i])` for every element `i`, on rayon's pool for a large call.
fn map_elements<T: Copy + Send + Sync>(x: &[T], one: impl Fn(usize, T) -> T + Sync) -> Vec<T> {
    match x.len() < PARALLEL_ELEMENTS {
        true => x.iter().enumerate().map(|(i, &v)| one(i, v)).collect(),
        false => x.par_iter().enumerate().map(|(i, &v)| one(i, v)).collect(),
    }
}

/// `x` with each element kept with probability `1 − p` and scaled by `1 / (1 − p)`, or zero, by
/// `mask` (elements `position .. position + x.elem_count()` of its stream). Differentiable: the
/// gradient goes through the same mask. f32, bf16 or f16, on the CPU and on CUDA.
pub fn dropout(x: &Tensor, mask: DropoutMask) -> Result<Tensor> {
    if !matches!(
        x.dtype(),
        DType::F32 | DType::BF16 | DType::F16 | DType::F64
    ) {
        bail!("dropout: {:?}, expected f32, bf16, f16 or f64", x.dtype());
    }
    x.contiguous()?.apply_op1(Dropout(mask))
}

/// [`dropout`]'s values without an autograd node: what a node that draws the mask again in its
/// backward pass (the generic LoRA adapter's, [`crate::ops::generic::lora_linear`]) and the
/// dropout op's own backward apply.
pub(crate) fn dropped_without_graph(x: &Tensor, mask: DropoutMask) -> Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&Dropout(mask))
}

struct Dropout(DropoutMask);

impl CustomOp1 for Dropout {
    fn name(&self) -> &'static str {
        "dropout"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            bail!("dropout: a non-contiguous input");
        };
        let mask = &self.0;
        let scaled = |v: f32| v * mask.scale;
        let out = match storage {
            CpuStorage::F32(x) => CpuStorage::F32(mask.apply_float(&x[start..end])),
            CpuStorage::BF16(x) => CpuStorage::BF16(mask.apply(
                &x[start..end],
                bf16::to_f32,
                scaled,
                bf16::from_f32,
                0.0,
            )),
            CpuStorage::F16(x) => {
                CpuStorage::F16(mask.apply(&x[start..end], f16::to_f32, scaled, f16::from_f32, 0.0))
            }
            // For gradient checks (no CUDA kernel): scaled in f64.
            CpuStorage::F64(x) => CpuStorage::F64(mask.apply_float(&x[start..end])),
            _ => bail!("dropout: expected f32, bf16, f16 or f64"),
        };
        Ok((out, layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::kernel_args::cuda::{launch_new, Module};
        if !layout.is_contiguous() {
            bail!("dropout: a non-contiguous input");
        }
        const MODULE: Module = Module {
            name: "optune_dropout",
            ptx: include_str!(concat!(env!("OUT_DIR"), "/dropout.ptx")),
        };
        let n = layout.shape().elem_count();
        let out = launch_new(
            MODULE,
            "dropout",
            [(x, layout)],
            n,
            crate::kernel_args::elementwise_launch(n),
            |[x], out| Ok(dropout_args([x, out], n, &self.0)),
        )?;
        Ok((out, layout.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _out: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        // The element order is the forward's: both are row-major over one shape.
        Ok(Some(dropped_without_graph(grad, self.0)?))
    }
}

/// The kernel's arguments (src/cuda/dropout.cu) over `n` elements: the addresses of `x` and
/// `out`, then the count and the mask. The CUDA launch and the emulated tests both pass this
/// list.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))] // the CUDA launch and the emulated tests
fn dropout_args([x, out]: [u64; 2], n: usize, mask: &DropoutMask) -> Vec<KernelArg> {
    vec![
        KernelArg::Pointer(x),
        KernelArg::Pointer(out),
        KernelArg::U64(n as u64),
        KernelArg::U64(mask.key),
        KernelArg::U64(mask.position),
        KernelArg::U64(mask.threshold),
        KernelArg::F32(mask.scale),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::tests::f32_elements;
    use crate::kernel_args::{elementwise_launch, emulated};
    use candle_core::{Device, Var};
    use optune_cuda_emulator::{in_both_placements, Element, Launch};

    fn mask_at(key: u64, position: u64, p: f32) -> DropoutMask {
        DropoutMask::new(key, position, p).unwrap()
    }

    /// `n` values in ±2, none zero.
    fn input(n: usize, dtype: DType) -> Tensor {
        let v: Vec<f32> = (0..n)
            .map(|i| ((i * 7919 % 1000) as f32 / 250.0 - 2.0).max(0.001))
            .collect();
        Tensor::from_vec(v, n, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }

    #[test]
    fn keeps_one_minus_p_scaled_and_repeats_with_its_key_and_position() {
        let x = Tensor::ones((200, 500), DType::F32, &Device::Cpu).unwrap();
        let key = dropout_key(7);
        let a = f32_elements(&dropout(&x, mask_at(key, 0, 0.25)).unwrap());
        let kept = a.iter().filter(|&&v| v != 0.0).count() as f64 / a.len() as f64;
        // 100,000 draws: the kept fraction's standard deviation is 0.0014.
        assert!((kept - 0.75).abs() < 0.007, "kept {kept}");
        assert!(a.iter().all(|&v| v == 0.0 || v == (1.0f64 / 0.75) as f32));
        assert_eq!(
            a,
            f32_elements(&dropout(&x, mask_at(key, 0, 0.25)).unwrap())
        );
        assert_ne!(
            a,
            f32_elements(&dropout(&x, mask_at(dropout_key(8), 0, 0.25)).unwrap())
        );
        assert_ne!(
            a,
            f32_elements(&dropout(&x, mask_at(key, 1, 0.25)).unwrap())
        );
        // f64 (gradient checks) takes the same mask, scaled in f64.
        let x64 = x.to_dtype(DType::F64).unwrap();
        let b: Vec<f64> = dropout(&x64, mask_at(key, 0, 0.25))
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(a.iter().zip(&b).all(|(&a, &b)| (a == 0.0) == (b == 0.0)));
        assert!(b.iter().all(|&v| v == 0.0 || v == 1.0 / 0.75));
        assert!(DropoutMask::new(key, 0, 1.0).is_err() && DropoutMask::new(key, 0, -0.1).is_err());
    }

    /// What makes the mask counter-based: a call's mask is its slice of a longer call's, so a
    /// pass's masks do not depend on how it is cut into calls, and one call can be made again.
    #[test]
    fn a_call_is_its_slice_of_the_stream() {
        let x = Tensor::ones(3000, DType::F32, &Device::Cpu).unwrap();
        let key = dropout_key(3);
        let whole = f32_elements(&dropout(&x, mask_at(key, 1000, 0.5)).unwrap());
        let part =
            f32_elements(&dropout(&x.narrow(0, 0, 700).unwrap(), mask_at(key, 1700, 0.5)).unwrap());
        assert_eq!(part, whole[700..1400]);
        // Neighbouring elements are not correlated: as many changes between them as a fair coin
        // makes (2999 pairs, standard deviation 27).
        let changes = whole
            .windows(2)
            .filter(|w| (w[0] == 0.0) != (w[1] == 0.0))
            .count();
        assert!((changes as f64 - 1499.5).abs() < 140.0, "{changes} changes");
    }

    /// The gradient goes through the forward's mask, in every dtype; the scale is applied in f32
    /// and rounded once.
    #[test]
    fn the_gradient_takes_the_same_mask() {
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let x = input(1000, dtype);
            let out = dropout(&x, mask_at(dropout_key(1), 5, 0.3)).unwrap();
            let (x_values, out_values) = (f32_elements(&x), f32_elements(&out));
            for (v, o) in x_values.iter().zip(&out_values) {
                let scaled = match dtype {
                    DType::F32 => v * (1.0f64 / 0.7) as f32,
                    DType::BF16 => bf16::from_f32(v * (1.0f64 / 0.7) as f32).to_f32(),
                    _ => f16::from_f32(v * (1.0f64 / 0.7) as f32).to_f32(),
                };
                assert!(*o == 0.0 || *o == scaled, "{dtype:?}: {v} became {o}");
            }
            let var = Var::from_tensor(&x).unwrap();
            let y = dropout(var.as_tensor(), mask_at(dropout_key(1), 5, 0.3)).unwrap();
            let grads = y.sum_all().unwrap().backward().unwrap();
            let grad = f32_elements(grads.get(var.as_tensor()).unwrap());
            for (g, o) in grad.iter().zip(&out_values) {
                assert_eq!(
                    *g == 0.0,
                    *o == 0.0,
                    "{dtype:?}: the gradient's mask differs"
                );
            }
        }
    }

    /// The kernel by the emulator, with the CUDA path's launch and argument list (and one block
    /// striding over all), on `x`.
    fn kernel<T: Element + candle_core::WithDType>(
        x: &Tensor,
        mask: &DropoutMask,
    ) -> Vec<Vec<f32>> {
        let x: Vec<T> = x.to_vec1().unwrap();
        let n = x.len();
        let kernel = format!("dropout_{}", T::SUFFIX);
        let (grid, block) = elementwise_launch(n);
        [
            Launch { grid, block },
            Launch {
                grid: 1,
                block: 256,
            },
        ]
        .iter()
        .map(|&launch| {
            let out = in_both_placements(&kernel, |memory| {
                let input = memory.input(&x);
                let out = memory.output::<T>(n);
                let args = dropout_args([input, out.address], n, mask);
                // SAFETY: x and out hold n elements, as the kernel reads and writes them.
                unsafe { memory.launch(&kernel, launch, &emulated(&args)) }?;
                Ok(memory.read(&out))
            })
            .unwrap();
            out.into_iter().map(|v| v.to_f64() as f32).collect()
        })
        .collect()
    }

    /// The CUDA kernel (src/cuda/dropout.cu), run by the emulator, against the CPU form, to the
    /// bit: a count that is no multiple of a block, a position past 2³² (the counter's 64 bits).
    #[test]
    fn the_cuda_kernel_matches_the_cpu_form() {
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let x = input(1000, dtype);
            let mask = DropoutMask::new(dropout_key(11), (1u64 << 33) + 17, 0.1).unwrap();
            let want = f32_elements(&x.apply_op1_no_bwd(&Dropout(mask)).unwrap());
            let got = match dtype {
                DType::F32 => kernel::<f32>(&x, &mask),
                DType::BF16 => kernel::<bf16>(&x, &mask),
                _ => kernel::<f16>(&x, &mask),
            };
            for launch in got {
                assert_eq!(launch, want, "{dtype:?}");
            }
        }
    }
}

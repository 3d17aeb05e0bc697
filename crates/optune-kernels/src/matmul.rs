//! Matrix operands, and the bf16 matrix product of the fused ops: [`matmul_bf16`] rounds its
//! operands to bf16 and sums their products in f32. On AVX512-BF16 it runs on `vdpbf16ps`, which
//! does twice the multiply-adds of an f32 FMA per instruction; on AVX2 + FMA each bf16 pair is
//! widened to f32 (exact) and summed by two FMAs, at 0.8× `gemm`'s f32 rate on this project's
//! Zen 3 machine, reading operands half the size (see [`Bf16Products`]). (f32/f64 products go
//! through `gemm` in `fused/`.)
//!
//! Why not AMX: the development and CI machines are AMD EPYC (Zen 3 with AVX2, Zen 4 with
//! AVX512-BF16); their kernels offer no tile state (`arch_prctl(ARCH_GET_XCOMP_SUPP)` = 0xe7, no
//! XTILEDATA), so an AMX kernel could neither run nor be tested here.

use half::bf16;
use rayon::prelude::*;
use std::sync::OnceLock;

/// A matrix operand: element `(i, j)` at `ptr[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub struct Mat<T> {
    pub ptr: *const T,
    pub rs: usize,
    pub cs: usize,
}

// SAFETY: a Mat is a read-only view of a slice the caller borrows for the whole product; sharing
// it between the product's tasks is sharing `&[T]`.
unsafe impl<T: Sync> Send for Mat<T> {}
// SAFETY: as above.
unsafe impl<T: Sync> Sync for Mat<T> {}

impl<T> Mat<T> {
    /// `data` as an `[rows, cols]` row-major matrix.
    pub fn rows(data: &[T], cols: usize) -> Self {
        Self {
            ptr: data.as_ptr(),
            rs: cols,
            cs: 1,
        }
    }
    /// The same operand read as elements of type `U`.
    ///
    /// # Safety
    /// `T` and `U` are the same type.
    pub(crate) unsafe fn cast<U>(self) -> Mat<U> {
        Mat {
            ptr: self.ptr.cast(),
            rs: self.rs,
            cs: self.cs,
        }
    }

    /// The transpose of `data` seen as `[cols, rows]` row-major, i.e. `dataᵀ`.
    pub fn transposed(data: &[T], cols: usize) -> Self {
        Self {
            ptr: data.as_ptr(),
            rs: 1,
            cs: cols,
        }
    }
}

/// An element a bf16 product reads: bf16 as it is, f32 rounded to the nearest bf16 (ties to
/// even), which is exact for f32 values that came from bf16.
pub trait Bf16Source: Copy + Send + Sync + 'static {
    fn bf16_bits(self) -> u16;

    /// `out[i]` = the lane of `src[2i]` (low half) and `src[2i + 1]`, for the whole pairs of
    /// `src`.
    fn pack_pairs(src: &[Self], out: &mut [u32]) {
        pack_pairs_from(0, src, out)
    }

    /// `out[i]` = the lane of `low[i]` (low half) and `high[i]` (zero without `high`).
    fn pack_side_by_side(low: &[Self], high: Option<&[Self]>, out: &mut [u32]) {
        pack_side_by_side_from(0, low, high, out)
    }
}

/// [`Bf16Source::pack_pairs`] one lane at a time, from lane `first` on.
fn pack_pairs_from<T: Bf16Source>(first: usize, src: &[T], out: &mut [u32]) {
    for (lane, two) in out[first..]
        .iter_mut()
        .zip(src[2 * first..].chunks_exact(2))
    {
        *lane = two[0].bf16_bits() as u32 | (two[1].bf16_bits() as u32) << 16;
    }
}

/// [`Bf16Source::pack_side_by_side`] one lane at a time, from lane `first` on.
fn pack_side_by_side_from<T: Bf16Source>(
    first: usize,
    low: &[T],
    high: Option<&[T]>,
    out: &mut [u32],
) {
    for (i, lane) in out.iter_mut().enumerate().skip(first) {
        let hi = high.map_or(0, |h| h[i].bf16_bits() as u32);
        *lane = low[i].bf16_bits() as u32 | hi << 16;
    }
}

impl Bf16Source for bf16 {
    fn bf16_bits(self) -> u16 {
        self.to_bits()
    }
}

impl Bf16Source for f32 {
    fn bf16_bits(self) -> u16 {
        bf16::from_f32(self).to_bits()
    }

    /// 32 floats at a time by `vcvtne2ps2bf16` (round to nearest even, as `bf16::from_f32`, but
    /// denormal inputs flush to zero); 16 at a time by integer rounding on AVX2.
    fn pack_pairs(src: &[f32], out: &mut [u32]) {
        let done = match bf16_products() {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the CPU has AVX512F and AVX512-BF16.
            Some(Bf16Products::Native) => unsafe { pack_pairs_avx512(src, out) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the CPU has AVX2 and FMA.
            Some(Bf16Products::Emulated) => unsafe { pack_pairs_avx2(src, out) },
            _ => 0,
        };
        pack_pairs_from(done, src, out)
    }

    /// 16 lanes at a time by `vcvtneps2bf16` and a zero-extension; 8 at a time on AVX2.
    fn pack_side_by_side(low: &[f32], high: Option<&[f32]>, out: &mut [u32]) {
        let done = match bf16_products() {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the CPU has AVX512F and AVX512-BF16.
            Some(Bf16Products::Native) => unsafe { pack_side_by_side_avx512(low, high, out) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the CPU has AVX2 and FMA.
            Some(Bf16Products::Emulated) => unsafe { pack_side_by_side_avx2(low, high, out) },
            _ => 0,
        };
        pack_side_by_side_from(done, low, high, out)
    }
}

/// 8 floats rounded to bf16 as `bf16::from_f32` rounds them (nearest, ties to even; a NaN stays
/// a quiet NaN), each in the high half of its 32-bit lane, the low half zero.
///
/// # Safety
/// The CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn round_to_bf16_avx2(floats: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    let bits = _mm256_castps_si256(floats);
    // bits + 0x7fff + (the bit that becomes the last kept one): ties go to the even neighbour.
    let odd = _mm256_and_si256(_mm256_srli_epi32::<16>(bits), _mm256_set1_epi32(1));
    let rounded = _mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7fff)), odd);
    let nan = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_UNORD_Q>(floats, floats));
    let quiet = _mm256_or_si256(bits, _mm256_set1_epi32(0x0040_0000));
    let high = _mm256_set1_epi32(0xffff_0000u32 as i32);
    _mm256_and_si256(_mm256_blendv_epi8(rounded, quiet, nan), high)
}

/// [`Bf16Source::pack_pairs`] for f32, 8 lanes (16 floats) at a time; returns the lanes written.
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn pack_pairs_avx2(src: &[f32], out: &mut [u32]) -> usize {
    use std::arch::x86_64::*;
    let whole = ((src.len() / 2).min(out.len()) / 8) * 8;
    for start in (0..whole).step_by(8) {
        let first = _mm256_srli_epi32::<16>(round_to_bf16_avx2(_mm256_loadu_ps(
            src.as_ptr().add(2 * start),
        )));
        let second = _mm256_srli_epi32::<16>(round_to_bf16_avx2(_mm256_loadu_ps(
            src.as_ptr().add(2 * start + 8),
        )));
        // packus interleaves the two by 128-bit halves (floats 0-3, 8-11 | 4-7, 12-15); the
        // permute puts the four runs in order, so lane i holds floats 2i (low) and 2i + 1.
        let halves = _mm256_packus_epi32(first, second);
        let pairs = _mm256_permute4x64_epi64::<0b11_01_10_00>(halves);
        _mm256_storeu_si256(out.as_mut_ptr().add(start).cast(), pairs);
    }
    whole
}

/// [`Bf16Source::pack_side_by_side`] for f32, 8 lanes at a time; returns the lanes written.
///
/// # Safety
/// The CPU has AVX2 and FMA; `high`, when given, is as long as `low`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn pack_side_by_side_avx2(low: &[f32], high: Option<&[f32]>, out: &mut [u32]) -> usize {
    use std::arch::x86_64::*;
    debug_assert!(high.is_none_or(|h| h.len() >= low.len()));
    let whole = (out.len().min(low.len()) / 8) * 8;
    for start in (0..whole).step_by(8) {
        let mut lanes =
            _mm256_srli_epi32::<16>(round_to_bf16_avx2(_mm256_loadu_ps(low.as_ptr().add(start))));
        if let Some(high) = high {
            let high = round_to_bf16_avx2(_mm256_loadu_ps(high.as_ptr().add(start)));
            lanes = _mm256_or_si256(lanes, high);
        }
        _mm256_storeu_si256(out.as_mut_ptr().add(start).cast(), lanes);
    }
    whole
}

/// [`Bf16Source::pack_side_by_side`] for f32, 16 lanes at a time and the last few under a
/// mask (a tile of 8 lhs rows is all last few); returns the lanes written.
///
/// # Safety
/// The CPU has AVX512F and AVX512-BF16; `high`, when given, is as long as `low`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn pack_side_by_side_avx512(low: &[f32], high: Option<&[f32]>, out: &mut [u32]) -> usize {
    use std::arch::x86_64::*;
    debug_assert!(high.is_none_or(|h| h.len() >= low.len()));
    // The masked-off floats are neither read (no fault) nor stored.
    let widened = |src: *const f32, mask: __mmask16| {
        let floats = _mm512_maskz_loadu_ps(mask, src);
        let bf16 = std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(floats));
        _mm512_cvtepu16_epi32(bf16)
    };
    let len = out.len().min(low.len());
    for start in (0..len).step_by(16) {
        let mask = lane_mask(len - start);
        let mut lanes = widened(low.as_ptr().add(start), mask);
        if let Some(high) = high {
            let high = widened(high.as_ptr().add(start), mask);
            lanes = _mm512_or_si512(lanes, _mm512_slli_epi32::<16>(high));
        }
        _mm512_mask_storeu_epi32(out.as_mut_ptr().add(start).cast(), mask, lanes);
    }
    len
}

/// [`Bf16Source::pack_pairs`] for f32, 32 floats at a time and the last few under a mask;
/// returns the lanes written (every whole pair's).
///
/// # Safety
/// The CPU has AVX512F and AVX512-BF16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn pack_pairs_avx512(src: &[f32], out: &mut [u32]) -> usize {
    use std::arch::x86_64::*;
    let lanes = (src.len() / 2).min(out.len());
    for start in (0..lanes).step_by(16) {
        // Lanes start.. hold floats 2·start..; the low 16 of those come first.
        let floats = 2 * (lanes - start);
        let lo = _mm512_maskz_loadu_ps(lane_mask(floats), src.as_ptr().add(2 * start));
        let hi = _mm512_maskz_loadu_ps(
            lane_mask(floats.saturating_sub(16)),
            src.as_ptr().add(2 * start + 16),
        );
        // The low 16 bf16 come from the second operand: x[0..32] in order, i.e. 16 pairs.
        let pairs = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo));
        _mm512_mask_storeu_epi32(
            out.as_mut_ptr().add(start).cast(),
            lane_mask(lanes - start),
            pairs,
        );
    }
    lanes
}

/// The mask of the first `min(count, 16)` of 16 lanes.
#[cfg(target_arch = "x86_64")]
fn lane_mask(count: usize) -> u16 {
    if count >= 16 {
        u16::MAX
    } else {
        (1u16 << count) - 1
    }
}

/// How this CPU runs bf16 products ([`matmul_bf16`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bf16Products {
    /// AVX512-BF16's `vdpbf16ps`: two bf16 multiply-adds per f32 lane and instruction.
    Native,
    /// AVX2 + FMA: each lane's bf16 pair widened to f32 (exact) and summed by two FMAs, the odd
    /// element's product first. A product of two bf16 is exact in f32, so each FMA rounds only
    /// its sum, and the kernel reads operands half the size of f32's. Its results
    /// may differ from `vdpbf16ps`'s in the last bits (the order and rounding of that
    /// instruction's two sums, and its flushing of denormals, are the hardware's).
    Emulated,
}

impl Bf16Products {
    pub fn name(self) -> &'static str {
        match self {
            Bf16Products::Native => "avx512-bf16",
            Bf16Products::Emulated => "avx2 (emulated)",
        }
    }
}

/// How this CPU runs [`matmul_bf16`]: natively on AVX512-BF16, emulated on AVX2 + FMA, else not
/// at all.
pub fn bf16_products() -> Option<Bf16Products> {
    static FORM: OnceLock<Option<Bf16Products>> = OnceLock::new();
    *FORM.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512bf16")
            {
                return Some(Bf16Products::Native);
            }
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                return Some(Bf16Products::Emulated);
            }
        }
        None
    })
}

/// Whether this CPU runs [`matmul_bf16`] (AVX512-BF16, or AVX2 and FMA).
pub fn bf16_products_available() -> bool {
    bf16_products().is_some()
}

/// How the fused ops' and the decode step's f32 matrix products run, process-wide: in f32, or
/// with both operands rounded to bf16 and f32 sums ([`matmul_bf16`]); PyTorch calls the latter
/// float32 matmul precision "medium". `--dtype bf16` on the CPU sets it (see optune-cli).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProductPrecision {
    F32,
    Bf16,
}

static BF16_PRODUCTS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Sets the precision of f32 products for the whole process; bf16 needs
/// [`bf16_products_available`] (else an error names the missing instructions).
pub fn set_f32_product_precision(precision: ProductPrecision) -> Result<(), String> {
    let bf16 = precision == ProductPrecision::Bf16;
    if bf16 && !bf16_products_available() {
        return Err("bf16 products need a CPU with AVX512-BF16, or AVX2 and FMA".into());
    }
    BF16_PRODUCTS.store(bf16, std::sync::atomic::Ordering::Relaxed);
    Ok(())
}

/// The precision set by [`set_f32_product_precision`] (f32 unless set).
pub fn f32_product_precision() -> ProductPrecision {
    if BF16_PRODUCTS.load(std::sync::atomic::Ordering::Relaxed) {
        ProductPrecision::Bf16
    } else {
        ProductPrecision::F32
    }
}

/// Rows of a micro-tile of the product.
const MR: usize = 8;
/// 16-lane vectors per micro-tile row.
const NV: usize = 3;
/// Columns of a micro-tile: 48 divides the widths of the models we train (576, 1536, 49152, …).
const NR: usize = 16 * NV;
/// The most `k` per block: a block of packed `rhs` is at most `KC × NC` bf16, 2.3 MiB.
const KC: usize = 768;

/// `k` per block for a product over `k`: as few blocks as [`KC`] allows, of equal even sizes
/// (576 is one block, 1536 two), so that few accumulator tiles go back to memory between blocks.
/// It depends on `k` alone, which keeps each element's summation order independent of the batch.
fn k_block(k: usize) -> usize {
    let blocks = k.div_ceil(KC).max(1);
    (k.div_ceil(blocks).div_ceil(2) * 2).min(KC)
}
/// Columns per block of packed `rhs` (a multiple of [`NR`]).
const NC: usize = 16 * NR;
/// Rows of `lhs` one task packs and runs against its columns (a multiple of [`MR`]).
const MC: usize = 12 * MR;

/// `dst [m, n] = (accumulate ? dst : 0) + lhs [m, k] · rhs [k, n]`: operands rounded to bf16,
/// products summed in f32 (see [`Bf16Products`]), on rayon's pool. [`PackedRhs`] and
/// [`matmul_bf16_packed`] do the same with `rhs` packed once for several products.
///
/// # Panics
/// When the CPU runs no bf16 products ([`bf16_products_available`] says so first), or `dst` is
/// shorter than `m × n`.
#[allow(clippy::too_many_arguments)]
pub fn matmul_bf16<A: Bf16Source, B: Bf16Source>(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    accumulate: bool,
    lhs: Mat<A>,
    rhs: Mat<B>,
) {
    matmul_bf16_packed(m, dst, accumulate, lhs, &PackedRhs::new(k, n, rhs))
}

/// The right operand `[k, n]` of bf16 products, packed: blocks of `k_block(k)` × `NC`, each as
/// panels of `NR` columns, each panel `[pair][NR]` lanes of two bf16 (the even `k` in the low
/// half, as `vdpbf16ps` multiplies them); the padding is zero. Packing costs about as much as
/// reading `rhs` once; a weight reused by several products (the vocabulary head's chunks, a
/// decode step's layers) is packed once.
pub struct PackedRhs {
    k: usize,
    n: usize,
    /// Block `(kb, nb)` at `kb * n_blocks + nb`.
    blocks: Vec<Vec<u32>>,
}

impl PackedRhs {
    pub fn new<B: Bf16Source>(k: usize, n: usize, rhs: Mat<B>) -> Self {
        // rhs lines are its columns (`cs` apart), `rs` apart along k.
        let lines = Lines {
            ptr: rhs.ptr,
            line_stride: rhs.cs,
            k_stride: rhs.rs,
        };
        let mut blocks = Vec::new();
        let kb = k_block(k);
        for k0 in (0..k).step_by(kb) {
            let kc = kb.min(k - k0);
            let pairs = kc.div_ceil(2);
            for n0 in (0..n).step_by(NC) {
                let panels = NC.min(n - n0).div_ceil(NR);
                let mut block = vec![0u32; panels * pairs * NR];
                block
                    .par_chunks_mut(pairs * NR)
                    .enumerate()
                    .for_each(move |(p, panel)| {
                        let first = n0 + p * NR;
                        // SAFETY: columns first.. (those < n) and rows k0..k0 + kc lie inside the
                        // k × n operand; the panel holds NR lanes for each of `pairs` pairs.
                        unsafe { lines.pack(first, NR, n, k0, kc, panel, 1, NR) }
                    });
                blocks.push(block);
            }
        }
        Self { k, n, blocks }
    }

    pub fn k(&self) -> usize {
        self.k
    }

    pub fn n(&self) -> usize {
        self.n
    }
}

/// [`matmul_bf16`] with `rhs` packed: `dst [m, n] = (accumulate ? dst : 0) + lhs [m, k] · rhs`.
///
/// Every element is summed over `k` in one fixed order (blocks of `k_block(k)`, then pairs), whatever
/// `m`, `n` and the thread count, so a row's result does not depend on the other rows.
///
/// # Panics
/// As [`matmul_bf16`].
pub fn matmul_bf16_packed<A: Bf16Source>(
    m: usize,
    dst: &mut [f32],
    accumulate: bool,
    lhs: Mat<A>,
    rhs: &PackedRhs,
) {
    let form = bf16_products().expect("matmul_bf16 needs a CPU with AVX512-BF16, or AVX2 and FMA");
    matmul_bf16_packed_by(form, m, dst, accumulate, lhs, rhs)
}

/// [`matmul_bf16_packed`] by `form`'s kernel (the tests run the emulated one on any CPU that has
/// AVX2 and FMA).
fn matmul_bf16_packed_by<A: Bf16Source>(
    form: Bf16Products,
    m: usize,
    dst: &mut [f32],
    accumulate: bool,
    lhs: Mat<A>,
    rhs: &PackedRhs,
) {
    let (k, n) = (rhs.k, rhs.n);
    assert!(dst.len() >= m * n);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst[..m * n].fill(0.0);
        }
        return;
    }
    let threads = rayon::current_num_threads().max(1);
    let out = SharedOut(dst.as_mut_ptr());
    let mut packed_lhs = Vec::new();
    // The emulated kernel's lhs: the packed tiles widened to f32, once per k block (not once per
    // rhs panel a tile meets).
    let mut widened_lhs = Vec::new();
    let m_tiles = m.div_ceil(MR);
    // lhs lines are its rows (`rs` apart), `cs` apart along k.
    let lhs_lines = Lines {
        ptr: lhs.ptr,
        line_stride: lhs.rs,
        k_stride: lhs.cs,
    };
    let mut blocks = rhs.blocks.iter();
    let kb = k_block(k);
    for k0 in (0..k).step_by(kb) {
        let kc = kb.min(k - k0);
        let pairs = kc.div_ceil(2);
        // Later k blocks add to what the first wrote.
        let add = accumulate || k0 > 0;
        packed_lhs.resize(m_tiles * MR * pairs, 0u32);
        packed_lhs
            .par_chunks_mut(MR * pairs)
            .enumerate()
            .for_each(move |(t, tile)| {
                // SAFETY: rows t·MR.. (those < m) and columns k0..k0 + kc lie inside the m × k
                // operand; the tile holds `pairs` lanes for each of MR rows.
                unsafe { lhs_lines.pack(t * MR, MR, m, k0, kc, tile, pairs, 1) }
            });
        if form == Bf16Products::Emulated {
            widened_lhs.resize(packed_lhs.len() * 2, 0f32);
            widened_lhs
                .par_chunks_mut(MR * 2 * pairs)
                .zip(packed_lhs.par_chunks(MR * pairs))
                .for_each(|(floats, lanes)| {
                    for (two, &lane) in floats.chunks_exact_mut(2).zip(lanes) {
                        // A bf16 is the high half of its f32: exact.
                        two[0] = f32::from_bits(lane << 16);
                        two[1] = f32::from_bits(lane & 0xffff_0000);
                    }
                });
        }
        for n0 in (0..n).step_by(NC) {
            let packed_rhs = blocks.next().expect("one packed block per (k, n) block");
            let panels = NC.min(n - n0).div_ceil(NR);
            let m_blocks = m.div_ceil(MC);
            // Enough tasks that the threads finish together: column groups when `m` is small
            // (decoding), and when a few row blocks would leave a thread idle at the end.
            let groups = (8 * threads).div_ceil(m_blocks).clamp(1, panels);
            let per_group = panels.div_ceil(groups);
            let (packed_lhs, widened_lhs) = (&packed_lhs, &widened_lhs);
            (0..m_blocks * groups).into_par_iter().for_each(|task| {
                let (mb, g) = (task / groups, task % groups);
                let tiles = (mb * MC / MR)..((mb + 1) * MC / MR).min(m_tiles);
                for p in (g * per_group)..((g + 1) * per_group).min(panels) {
                    let col = n0 + p * NR;
                    let cols = NR.min(n - col);
                    let rhs_panel = &packed_rhs[p * pairs * NR..(p + 1) * pairs * NR];
                    for t in tiles.clone() {
                        let row = t * MR;
                        let rows = MR.min(m - row);
                        let lhs_tile = match form {
                            Bf16Products::Native => {
                                LhsTile::Pairs(&packed_lhs[t * MR * pairs..(t + 1) * MR * pairs])
                            }
                            Bf16Products::Emulated => LhsTile::Widened(
                                &widened_lhs[t * MR * 2 * pairs..(t + 1) * MR * 2 * pairs],
                            ),
                        };
                        // SAFETY: the tasks write disjoint blocks of dst (rows of `mb`, columns
                        // of `g`'s panels), each inside m × n; the packed tiles hold `pairs`
                        // pairs of MR rows / NR columns; the CPU runs `form` (the callers
                        // check).
                        unsafe {
                            micro_tile(
                                pairs,
                                lhs_tile,
                                rhs_panel,
                                out.at(row * n + col),
                                n,
                                rows,
                                cols,
                                add,
                            )
                        }
                    }
                }
            });
        }
    }
}

/// The destination shared by the tasks of [`matmul_bf16`], each of which writes its own block.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
// SAFETY: the tasks holding copies write disjoint elements, and the owning call waits for them.
unsafe impl Send for SharedOut {}
// SAFETY: as above.
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// # Safety
    /// `offset` lies inside the destination.
    unsafe fn at(self, offset: usize) -> *mut f32 {
        self.0.add(offset)
    }
}

/// An operand seen as lines along `k` (the rows of `lhs`, the columns of `rhs`), for packing.
#[derive(Clone, Copy)]
struct Lines<T> {
    ptr: *const T,
    line_stride: usize,
    k_stride: usize,
}

// SAFETY: as for Mat, a read-only view of data the product's caller borrows throughout.
unsafe impl<T: Sync> Send for Lines<T> {}
// SAFETY: as above.
unsafe impl<T: Sync> Sync for Lines<T> {}

impl<T: Bf16Source> Lines<T> {
    /// Packs lines `first..first + count` over `k0..k0 + kc` as bf16 pairs, the even `k` in the
    /// low half of the 32-bit lane `vdpbf16ps` multiplies pairwise: the lane of (line `l`, pair
    /// `p`) at `out[l · line_step + p · pair_step]`. Lines from `total` on, and the odd element
    /// past `kc`, are zero. Reads run along whichever of the two strides is 1 (a transposed
    /// operand's lines are read across), a vector at a time.
    ///
    /// # Safety
    /// Lines `first..min(first + count, total)` hold `k0 + kc` elements; `out` holds every lane.
    #[allow(clippy::too_many_arguments)]
    unsafe fn pack(
        self,
        first: usize,
        count: usize,
        total: usize,
        k0: usize,
        kc: usize,
        out: &mut [u32],
        line_step: usize,
        pair_step: usize,
    ) {
        let pairs = kc.div_ceil(2);
        let at = |line: usize, k: usize| -> u32 {
            if line < total && k < kc {
                (*self
                    .ptr
                    .add(line * self.line_stride + (k0 + k) * self.k_stride))
                .bf16_bits() as u32
            } else {
                0
            }
        };
        let lane = |l: usize, p: usize| at(first + l, 2 * p) | at(first + l, 2 * p + 1) << 16;
        if self.k_stride == 1 {
            // Each line's elements are contiguous: convert them a block at a time.
            let mut lanes = [0u32; KC / 2];
            for l in 0..count.min(total.saturating_sub(first)) {
                let line = std::slice::from_raw_parts(
                    self.ptr.add((first + l) * self.line_stride + k0),
                    kc,
                );
                T::pack_pairs(line, &mut lanes[..kc / 2]);
                if kc % 2 == 1 {
                    lanes[kc / 2] = line[kc - 1].bf16_bits() as u32;
                }
                for (p, &v) in lanes[..pairs].iter().enumerate() {
                    out[l * line_step + p * pair_step] = v;
                }
            }
            for l in total.saturating_sub(first).min(count)..count {
                for p in 0..pairs {
                    out[l * line_step + p * pair_step] = 0;
                }
            }
        } else if self.line_stride == 1 && count <= NR {
            // The lines are adjacent: each pair of k is two runs of adjacent elements.
            let live = count.min(total.saturating_sub(first));
            let mut lanes = [0u32; NR];
            let run = |k: usize| {
                std::slice::from_raw_parts(self.ptr.add(first + (k0 + k) * self.k_stride), live)
            };
            for p in 0..pairs {
                let high = (2 * p + 1 < kc).then(|| run(2 * p + 1));
                T::pack_side_by_side(run(2 * p), high, &mut lanes[..live]);
                for (l, &v) in lanes[..live].iter().enumerate() {
                    out[l * line_step + p * pair_step] = v;
                }
                for l in live..count {
                    out[l * line_step + p * pair_step] = 0;
                }
            }
        } else {
            for l in 0..count {
                for p in 0..pairs {
                    out[l * line_step + p * pair_step] = lane(l, p);
                }
            }
        }
    }
}

/// One MR-row tile of the packed lhs, in the form its kernel reads.
#[derive(Clone, Copy)]
enum LhsTile<'a> {
    /// `[MR][pairs]` lanes of two bf16, as `vdpbf16ps` multiplies them ([`Bf16Products::Native`]).
    Pairs(&'a [u32]),
    /// `[MR][2 · pairs]` floats, each lane's two bf16 widened to f32, the even `k` first
    /// ([`Bf16Products::Emulated`]).
    Widened(&'a [f32]),
}

/// `c [rows, cols] (+)= lhs_tile · rhs_panel` over `pairs` k-pairs, for one MR × NR micro-tile
/// (`rows ≤ MR`, `cols ≤ NR`), by the kernel of the tile's form; a partial tile goes through a
/// buffer of the whole tile's size, so the kernels' vector loads and stores stay in bounds, and
/// its padding lanes are computed and dropped.
///
/// # Safety
/// The CPU runs the tile's form; `c` points at `rows` rows of `cols` writable floats, `ldc`
/// apart; the tiles hold `pairs` pairs of MR rows and `pairs × NR` lanes.
#[allow(clippy::too_many_arguments)]
unsafe fn micro_tile(
    pairs: usize,
    lhs_tile: LhsTile,
    rhs_panel: &[u32],
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    add: bool,
) {
    debug_assert!(rhs_panel.len() >= pairs * NR);
    let full = rows == MR && cols == NR;
    let mut edge = [0f32; MR * NR];
    let (base, ld) = if full {
        (c, ldc)
    } else {
        if add {
            for r in 0..rows {
                std::ptr::copy_nonoverlapping(c.add(r * ldc), edge.as_mut_ptr().add(r * NR), cols);
            }
        }
        (edge.as_mut_ptr(), NR)
    };
    match lhs_tile {
        #[cfg(target_arch = "x86_64")]
        LhsTile::Pairs(lanes) => whole_tile_avx512(pairs, lanes, rhs_panel, base, ld, add),
        // A decoding step's one or two rows take the narrower tile, which computes no padding.
        #[cfg(target_arch = "x86_64")]
        LhsTile::Widened(floats) if rows <= 2 => {
            whole_tile_avx2::<2, 3>(pairs, floats, rhs_panel, base, ld, rows, add)
        }
        #[cfg(target_arch = "x86_64")]
        LhsTile::Widened(floats) => {
            whole_tile_avx2::<4, 2>(pairs, floats, rhs_panel, base, ld, rows, add)
        }
        #[cfg(not(target_arch = "x86_64"))]
        _ => unreachable!("bf16 products run on x86-64 only"),
    }
    if !full {
        for r in 0..rows {
            std::ptr::copy_nonoverlapping(edge.as_ptr().add(r * NR), c.add(r * ldc), cols);
        }
    }
}

/// [`micro_tile`]'s MR × NR tile on `vdpbf16ps`, every row computed.
///
/// # Safety
/// The CPU has AVX512F and AVX512-BF16; `c` points at MR rows of NR writable floats, `ldc`
/// apart; the tiles hold `pairs × MR` and `pairs × NR` lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn whole_tile_avx512(
    pairs: usize,
    lhs_tile: &[u32],
    rhs_panel: &[u32],
    c: *mut f32,
    ldc: usize,
    add: bool,
) {
    use std::arch::x86_64::*;
    debug_assert!(lhs_tile.len() >= MR * pairs);
    let mut acc = [[_mm512_setzero_ps(); NV]; MR];
    if add {
        for (r, row) in acc.iter_mut().enumerate() {
            for (v, lane) in row.iter_mut().enumerate() {
                *lane = _mm512_loadu_ps(c.add(r * ldc + 16 * v));
            }
        }
    }
    let (a, b) = (lhs_tile.as_ptr(), rhs_panel.as_ptr());
    // The lhs tile is [MR][pairs]: each row's pairs contiguous (cheap to pack), 8 streams read.
    for p in 0..pairs {
        let mut bv = [_mm512_setzero_ps(); NV];
        for (v, lane) in bv.iter_mut().enumerate() {
            *lane = _mm512_castsi512_ps(_mm512_loadu_si512(b.add(p * NR + 16 * v).cast()));
        }
        for (r, row) in acc.iter_mut().enumerate() {
            let av = _mm512_castsi512_ps(_mm512_set1_epi32(*a.add(r * pairs + p) as i32));
            for (v, lane) in row.iter_mut().enumerate() {
                // SAFETY (transmutes): __m512 and __m512bh are the same 64 bytes; the lanes hold
                // bf16 pairs.
                *lane = _mm512_dpbf16_ps(
                    *lane,
                    std::mem::transmute::<__m512, __m512bh>(av),
                    std::mem::transmute::<__m512, __m512bh>(bv[v]),
                );
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        for (v, lane) in row.iter().enumerate() {
            _mm512_storeu_ps(c.add(r * ldc + 16 * v), *lane);
        }
    }
}

/// [`micro_tile`]'s MR × NR tile on AVX2 + FMA ([`Bf16Products::Emulated`]), from the widened
/// lhs tile ([`LhsTile::Widened`]): register tiles of `R` rows × `V` vectors of 8 sums, each
/// pair as two FMAs (the odd `k` first). With R = 4, V = 2 the sums, each row's two widened lhs values
/// and one rhs vector's two halves fill 18 registers of 16, and the compiler reloads the lhs
/// values from the widened copy; it measured 0.8× gemm's f32 rate here, against 0.6× for
/// R = 2, V = 3 and 0.5× for R = 4, V = 3 (an rhs vector is widened once for R rows, so more
/// rows take fewer shifts and masks per FMA, until the sums spill). Rows from `rows` on
/// (padding, dropped by the caller) are skipped a register tile at a time, so a decoding step of
/// one row does not pay for eight.
///
/// # Safety
/// The CPU has AVX2 and FMA; `c` points at MR rows of NR writable floats, `ldc` apart; the tiles
/// hold `MR × 2 · pairs` floats and `pairs × NR` lanes; R divides MR and V divides NR / 8.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn whole_tile_avx2<const R: usize, const V: usize>(
    pairs: usize,
    widened: &[f32],
    rhs_panel: &[u32],
    c: *mut f32,
    ldc: usize,
    rows: usize,
    add: bool,
) {
    use std::arch::x86_64::*;
    debug_assert!(widened.len() >= MR * 2 * pairs);
    let live = rows.div_ceil(R) * R;
    // Row r's k-th element at a[r * 2 * pairs + k].
    let a = widened.as_ptr();
    let high = _mm256_set1_epi32(0xffff_0000u32 as i32);
    let b = rhs_panel.as_ptr();
    for r0 in (0..live).step_by(R) {
        for v0 in (0..NR / 8).step_by(V) {
            let mut acc = [[_mm256_setzero_ps(); V]; R];
            if add {
                for (r, row) in acc.iter_mut().enumerate() {
                    for (v, lane) in row.iter_mut().enumerate() {
                        *lane = _mm256_loadu_ps(c.add((r0 + r) * ldc + 8 * (v0 + v)));
                    }
                }
            }
            for p in 0..pairs {
                let mut even = [_mm256_setzero_ps(); R];
                let mut odd = [_mm256_setzero_ps(); R];
                for r in 0..R {
                    let at = (r0 + r) * 2 * pairs + 2 * p;
                    // SAFETY: r0 + r < live ≤ MR and p < pairs: inside the tile's floats.
                    even[r] = _mm256_set1_ps(*a.add(at));
                    odd[r] = _mm256_set1_ps(*a.add(at + 1));
                }
                for v in 0..V {
                    let lanes = _mm256_loadu_si256(b.add(p * NR + 8 * (v0 + v)).cast());
                    let b_even = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(lanes));
                    let b_odd = _mm256_castsi256_ps(_mm256_and_si256(lanes, high));
                    for ((row, odd), even) in acc.iter_mut().zip(&odd).zip(&even) {
                        row[v] = _mm256_fmadd_ps(*odd, b_odd, row[v]);
                        row[v] = _mm256_fmadd_ps(*even, b_even, row[v]);
                    }
                }
            }
            for (r, row) in acc.iter().enumerate() {
                for (v, lane) in row.iter().enumerate() {
                    _mm256_storeu_ps(c.add((r0 + r) * ldc + 8 * (v0 + v)), *lane);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..len)
            .map(|_| bf16::from_f32(rng.random_range(-1.0f32..1.0)).to_f32())
            .collect()
    }

    /// The product in f64 of bf16-exact operands: what the kernels sum in f32.
    fn reference(m: usize, n: usize, k: usize, a: Mat<f32>, b: Mat<f32>) -> Vec<f64> {
        let mut out = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0f64;
                for l in 0..k {
                    // SAFETY: inside the test's m × k and k × n buffers.
                    let (x, y) = unsafe {
                        (
                            *a.ptr.add(i * a.rs + l * a.cs),
                            *b.ptr.add(l * b.rs + j * b.cs),
                        )
                    };
                    s += x as f64 * y as f64;
                }
                out[i * n + j] = s;
            }
        }
        out
    }

    fn check(m: usize, n: usize, k: usize, transposed: bool) {
        let a = values(m * k, 1 + m as u64);
        let b = values(k * n, 2 + n as u64);
        let (lhs, rhs) = if transposed {
            // lhs given as [k, m] and rhs as [n, k], read transposed.
            (Mat::transposed(&a, m), Mat::transposed(&b, k))
        } else {
            (Mat::rows(&a, k), Mat::rows(&b, n))
        };
        let want = reference(m, n, k, lhs, rhs);
        let mut got = vec![0.5f32; m * n];
        matmul_bf16(m, n, k, &mut got, true, lhs, rhs);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            let tol = 1e-5 * (k as f64).sqrt() * 4.0;
            assert!(
                (*g as f64 - 0.5 - w).abs() <= tol,
                "{m}x{n}x{k} transposed={transposed}: element {i}: {g} vs {}",
                w + 0.5
            );
        }
        // The bf16 operands give the same product as their f32 copies.
        let a16: Vec<bf16> = a.iter().map(|&x| bf16::from_f32(x)).collect();
        let mut from_bf16 = vec![0f32; m * n];
        let lhs16 = if transposed {
            Mat::transposed(&a16, m)
        } else {
            Mat::rows(&a16, k)
        };
        matmul_bf16(m, n, k, &mut from_bf16, false, lhs16, rhs);
        let mut from_f32 = vec![0f32; m * n];
        matmul_bf16(m, n, k, &mut from_f32, false, lhs, rhs);
        assert_eq!(from_bf16, from_f32);
    }

    #[test]
    fn products_match_f64_on_edges_blocks_and_transposes() {
        if !bf16_products_available() {
            eprintln!("skipped: this CPU runs no bf16 products");
            return;
        }
        for &(m, n, k) in &[
            (1, 1, 1),
            (3, 5, 7),
            (8, 48, 2),
            (17, 97, 33),
            (100, 50, 1100),
            (2, 800, 64),
        ] {
            check(m, n, k, false);
            check(m, n, k, true);
        }
    }

    #[test]
    fn a_row_does_not_depend_on_the_other_rows() {
        if !bf16_products_available() {
            eprintln!("skipped: this CPU runs no bf16 products");
            return;
        }
        let (m, n, k) = (130, 200, 1300);
        let a = values(m * k, 7);
        let b = values(k * n, 8);
        let mut all = vec![0f32; m * n];
        matmul_bf16(m, n, k, &mut all, false, Mat::rows(&a, k), Mat::rows(&b, n));
        for row in [0, 9, 129] {
            let mut one = vec![0f32; n];
            matmul_bf16(
                1,
                n,
                k,
                &mut one,
                false,
                Mat::rows(&a[row * k..], k),
                Mat::rows(&b, n),
            );
            assert_eq!(one, all[row * n..(row + 1) * n], "row {row}");
        }
    }

    fn avx2_and_fma() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    /// The emulated kernel's sum for one element, from its definition: from `init`, each pair
    /// (2i, 2i + 1) of k as two fused multiply-adds in f32, the odd element's first.
    fn emulated_element(init: f32, a: &[f32], b: &[f32]) -> f32 {
        let mut acc = init;
        for (x, y) in a.chunks(2).zip(b.chunks(2)) {
            if x.len() == 2 {
                acc = x[1].mul_add(y[1], acc);
            }
            acc = x[0].mul_add(y[0], acc);
        }
        acc
    }

    /// On any CPU with AVX2 and FMA (those with AVX512-BF16 too), the emulated kernel gives its
    /// definition's sums to the bit, whatever the tile edges, k blocks (k over 768), transposes
    /// and number of rows, for lhs rows of one to nine (a decoding step's few rows skip the
    /// tile's padding rows).
    #[test]
    fn emulated_products_are_their_definition_to_the_bit() {
        if !avx2_and_fma() {
            eprintln!("skipped: this CPU has no AVX2 and FMA");
            return;
        }
        for &(m, n, k) in &[
            (1, 1, 1),
            (1, 50, 7),
            (2, 48, 2),
            (3, 97, 33),
            (9, 100, 1601),
            (17, 5, 768),
        ] {
            for transposed in [false, true] {
                let a = values(m * k, 3 + k as u64);
                let b = values(k * n, 4 + n as u64);
                let init = values(m * n, 5);
                let (lhs, rhs) = if transposed {
                    (Mat::transposed(&a, m), Mat::transposed(&b, k))
                } else {
                    (Mat::rows(&a, k), Mat::rows(&b, n))
                };
                let mut got = init.clone();
                let packed = PackedRhs::new(k, n, rhs);
                matmul_bf16_packed_by(Bf16Products::Emulated, m, &mut got, true, lhs, &packed);
                for i in 0..m {
                    // SAFETY: inside the test's m × k and k × n buffers.
                    let row: Vec<f32> = (0..k)
                        .map(|l| unsafe { *lhs.ptr.add(i * lhs.rs + l * lhs.cs) })
                        .collect();
                    for j in 0..n {
                        // SAFETY: as above.
                        let col: Vec<f32> = (0..k)
                            .map(|l| unsafe { *rhs.ptr.add(l * rhs.rs + j * rhs.cs) })
                            .collect();
                        let want = emulated_element(init[i * n + j], &row, &col);
                        assert_eq!(
                            got[i * n + j].to_bits(),
                            want.to_bits(),
                            "{m}x{n}x{k} transposed={transposed}: ({i}, {j})"
                        );
                    }
                }
            }
        }
    }

    /// The AVX2 packers round as `bf16::from_f32` does: ties to even, NaNs quiet, infinities and
    /// the largest floats, denormals and signed zeros, on whole vectors and the tails after them.
    #[test]
    fn avx2_packing_rounds_as_bf16_from_f32() {
        if !avx2_and_fma() {
            eprintln!("skipped: this CPU has no AVX2 and FMA");
            return;
        }
        let mut floats = vec![
            1.0,
            -0.0,
            0.0,
            f32::from_bits(0x3f80_8000), // a tie, rounded down to the even 0x3f80
            f32::from_bits(0x3f81_8000), // a tie, rounded up to the even 0x3f82
            f32::from_bits(0x3f80_8001),
            f32::from_bits(0x3f80_7fff),
            f32::MAX,
            f32::MIN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::from_bits(0x7f80_0001), // a signalling NaN
            f32::from_bits(0xffc1_2345),
            f32::from_bits(0x0000_0001),
            f32::from_bits(0x807f_ffff),
            1e-40,
            -3.4e38,
        ];
        floats.extend(values(61, 9).iter().map(|x| x * 1.000_123));
        let expected = |x: f32| bf16::from_f32(x).to_bits() as u32;
        let mut pairs = vec![0u32; floats.len() / 2];
        // SAFETY: the CPU has AVX2 and FMA (checked above).
        let done = unsafe { pack_pairs_avx2(&floats, &mut pairs) };
        assert_eq!(done, 32);
        pack_pairs_from(done, &floats, &mut pairs);
        for (i, lane) in pairs.iter().enumerate() {
            let want = expected(floats[2 * i]) | expected(floats[2 * i + 1]) << 16;
            assert_eq!(
                *lane,
                want,
                "pair {i}: {} {}",
                floats[2 * i],
                floats[2 * i + 1]
            );
        }
        let (low, high) = floats.split_at(floats.len() / 2);
        for high in [None, Some(high)] {
            let mut lanes = vec![0u32; low.len()];
            // SAFETY: as above; `high` is as long as `low`.
            let done = unsafe { pack_side_by_side_avx2(low, high, &mut lanes) };
            assert_eq!(done, 32);
            pack_side_by_side_from(done, low, high, &mut lanes);
            for (i, lane) in lanes.iter().enumerate() {
                let want = expected(low[i]) | high.map_or(0, |h| expected(h[i]) << 16);
                assert_eq!(*lane, want, "lane {i}");
            }
        }
    }
}

//! The host forms of the ops: CPU kernels of the f32 decode step on plain slices (linear layers,
//! attention over each sequence's own cached keys, RMS norm, rotary embedding, SiLU) and the
//! sampler's reductions.
//!
//! Deterministic by construction. Every output element is produced by one fixed sequence of
//! floating-point operations on its own inputs only — not on how many rows share the batch, not
//! on how the work is split between threads, not on which instruction set runs it:
//! * a dot product keeps 16 partial sums (lane `j` accumulates elements `j, j+16, j+32, …` with
//!   fused multiply-adds; a tail shorter than 16 is zero-padded) folded by a fixed pairwise tree
//!   (`lane j + lane j+8`, then `+4`, `+2`, `+1`). AVX-512, AVX2+FMA and the portable code all
//!   implement exactly these 16 lanes, so they agree to the bit;
//! * attention reads only the sequence's own keys (no padding to the batch's longest sequence,
//!   no mask), so a sequence's softmax sums never see another sequence's length;
//! * every other reduction (RMS norm, softmax sums) uses the same 16-lane scheme in plain code.
//!
//! Threads split linear layers by output column and attention by (sequence, KV head); each
//! element is computed whole by one thread.

pub use crate::simd::exp_f32;
use crate::simd::{isa, Isa};
use rayon::prelude::*;

/// 16 f32 lanes.
trait Lanes: Copy {
    unsafe fn zero() -> Self;
    /// Loads 16 floats from `p`.
    unsafe fn load(p: *const f32) -> Self;
    /// `self + a·b`, fused (one rounding), lane by lane.
    unsafe fn fma(self, a: Self, b: Self) -> Self;
    /// `((v[j] + v[j+8]) + (… +4)) + …`: the fixed pairwise tree.
    unsafe fn sum(self) -> f32;

    /// Loads `n < 16` floats, the other lanes zero.
    #[inline(always)]
    unsafe fn load_padded(p: *const f32, n: usize) -> Self {
        let mut buf = [0f32; 16];
        std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), n);
        Self::load(buf.as_ptr())
    }
}

/// The reference implementation of the 16 lanes.
#[derive(Clone, Copy)]
struct Portable([f32; 16]);

impl Lanes for Portable {
    #[inline(always)]
    unsafe fn zero() -> Self {
        Portable([0.0; 16])
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        Portable(std::ptr::read_unaligned(p as *const [f32; 16]))
    }
    #[inline(always)]
    unsafe fn fma(self, a: Self, b: Self) -> Self {
        let mut out = self.0;
        for ((o, a), b) in out.iter_mut().zip(a.0).zip(b.0) {
            *o = a.mul_add(b, *o);
        }
        Portable(out)
    }
    #[inline(always)]
    unsafe fn sum(self) -> f32 {
        tree16(&self.0)
    }
}

/// The fixed pairwise fold of 16 partial sums.
#[inline(always)]
fn tree16(v: &[f32; 16]) -> f32 {
    let mut t = [0f32; 8];
    for j in 0..8 {
        t[j] = v[j] + v[j + 8];
    }
    let u = [t[0] + t[4], t[1] + t[5], t[2] + t[6], t[3] + t[7]];
    let w = [u[0] + u[2], u[1] + u[3]];
    w[0] + w[1]
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Lanes;
    use std::arch::x86_64::*;

    /// Lanes 4..7 of 8 → one 4-lane fold, then 2, then 1 (shared by both x86 paths).
    #[inline(always)]
    unsafe fn fold8(t: __m256) -> f32 {
        let u = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps::<1>(t));
        let w = _mm_add_ps(u, _mm_movehl_ps(u, u));
        _mm_cvtss_f32(_mm_add_ss(w, _mm_shuffle_ps::<0b01>(w, w)))
    }

    #[derive(Clone, Copy)]
    pub(super) struct Avx512(__m512);

    impl Lanes for Avx512 {
        #[inline(always)]
        unsafe fn zero() -> Self {
            Avx512(_mm512_setzero_ps())
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            Avx512(_mm512_loadu_ps(p))
        }
        #[inline(always)]
        unsafe fn fma(self, a: Self, b: Self) -> Self {
            Avx512(_mm512_fmadd_ps(a.0, b.0, self.0))
        }
        #[inline(always)]
        unsafe fn sum(self) -> f32 {
            let lo = _mm512_castps512_ps256(self.0);
            let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(self.0)));
            fold8(_mm256_add_ps(lo, hi))
        }
    }

    /// Lanes 0..7 and 8..15.
    #[derive(Clone, Copy)]
    pub(super) struct Avx2(__m256, __m256);

    impl Lanes for Avx2 {
        #[inline(always)]
        unsafe fn zero() -> Self {
            Avx2(_mm256_setzero_ps(), _mm256_setzero_ps())
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            Avx2(_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)))
        }
        #[inline(always)]
        unsafe fn fma(self, a: Self, b: Self) -> Self {
            Avx2(
                _mm256_fmadd_ps(a.0, b.0, self.0),
                _mm256_fmadd_ps(a.1, b.1, self.1),
            )
        }
        #[inline(always)]
        unsafe fn sum(self) -> f32 {
            fold8(_mm256_add_ps(self.0, self.1))
        }
    }
}

/// `out[r·ldo + o] = dot(x[r·k..], w[o·k..]) (+ bias[o])` for an `R × O` tile.
// `r` and `o` each index an array and a pointer offset in the same nest: the index form reads as
// the tile's matrix, iterators over one of them would not.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
unsafe fn tile<L: Lanes, const R: usize, const O: usize>(
    x: *const f32,
    w: *const f32,
    k: usize,
    bias: Option<*const f32>,
    out: *mut f32,
    ldo: usize,
    next: *const f32,
) {
    let mut acc = [[L::zero(); O]; R];
    let chunks = k / 16;
    for c in 0..chunks {
        let off = c * 16;
        if !next.is_null() {
            for o in 0..O {
                prefetch(next.add(o * k + off));
            }
        }
        let mut xs = [L::zero(); R];
        for r in 0..R {
            xs[r] = L::load(x.add(r * k + off));
        }
        for o in 0..O {
            let wv = L::load(w.add(o * k + off));
            for r in 0..R {
                acc[r][o] = acc[r][o].fma(xs[r], wv);
            }
        }
    }
    let rest = k % 16;
    if rest != 0 {
        let off = chunks * 16;
        let mut xs = [L::zero(); R];
        for r in 0..R {
            xs[r] = L::load_padded(x.add(r * k + off), rest);
        }
        for o in 0..O {
            let wv = L::load_padded(w.add(o * k + off), rest);
            for r in 0..R {
                acc[r][o] = acc[r][o].fma(xs[r], wv);
            }
        }
    }
    for r in 0..R {
        for o in 0..O {
            let mut s = acc[r][o].sum();
            if let Some(b) = bias {
                s += *b.add(o);
            }
            *out.add(r * ldo + o) = s;
        }
    }
}

macro_rules! tile_dispatch {
    ($L:ty, $rw:expr, $ow:expr, $args:tt; $(($r:literal, $o:literal)),*) => {
        match ($rw, $ow) {
            $(($r, $o) => tile::<$L, $r, $o> $args,)*
            _ => unreachable!("tile {}x{}", $rw, $ow),
        }
    };
}

/// Columns `c0..c1` of `out [rows, ldo] = x [rows, k] · w[c0..c1]ᵀ (+ bias)`, in tiles of at most
/// `RT × OT`. `w` and `bias` point at column 0.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn columns<L: Lanes, const RT: usize, const OT: usize>(
    x: *const f32,
    rows: usize,
    k: usize,
    w: *const f32,
    bias: Option<*const f32>,
    out: *mut f32,
    ldo: usize,
    c0: usize,
    c1: usize,
) {
    let mut o = c0;
    while o < c1 {
        let ow = OT.min(c1 - o);
        // The first row tile fetches the next column tile's weights as it goes (measured: +10–40 %
        // on weights streamed from memory, batch 1 included).
        let next = if o + ow < c1 {
            w.add((o + ow) * k)
        } else {
            std::ptr::null()
        };
        let mut r = 0;
        while r < rows {
            let rw = RT.min(rows - r);
            let (xa, wa, ba, oa) = (
                x.add(r * k),
                w.add(o * k),
                bias.map(|b| b.add(o)),
                out.add(r * ldo + o),
            );
            let pf = if r == 0 { next } else { std::ptr::null() };
            tile_dispatch!(L, rw, ow, (xa, wa, k, ba, oa, ldo, pf);
                (1, 1), (1, 2), (1, 3), (1, 4), (1, 5), (1, 6),
                (2, 1), (2, 2), (2, 3), (2, 4), (2, 5), (2, 6),
                (3, 1), (3, 2), (3, 3), (3, 4), (3, 5), (3, 6),
                (4, 1), (4, 2), (4, 3), (4, 4), (4, 5), (4, 6));
            r += rw;
        }
        o += ow;
    }
}

#[inline(always)]
unsafe fn prefetch(p: *const f32) {
    #[cfg(target_arch = "x86_64")]
    std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p as *const i8);
}

/// [`columns`] for `isa`: its lanes and tile shape, compiled with its instruction set.
#[allow(clippy::too_many_arguments)]
unsafe fn columns_with(
    isa: Isa,
    x: *const f32,
    rows: usize,
    k: usize,
    w: *const f32,
    bias: Option<*const f32>,
    out: *mut f32,
    ldo: usize,
    c0: usize,
    c1: usize,
) {
    #[cfg(target_arch = "x86_64")]
    macro_rules! compiled_for {
        ($features:literal, $lanes:ty, $rt:literal, $ot:literal) => {{
            #[target_feature(enable = $features)]
            #[allow(clippy::too_many_arguments)]
            unsafe fn run(
                x: *const f32,
                rows: usize,
                k: usize,
                w: *const f32,
                bias: Option<*const f32>,
                out: *mut f32,
                ldo: usize,
                c0: usize,
                c1: usize,
            ) {
                columns::<$lanes, $rt, $ot>(x, rows, k, w, bias, out, ldo, c0, c1)
            }
            run(x, rows, k, w, bias, out, ldo, c0, c1)
        }};
    }
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => compiled_for!("avx512f", x86::Avx512, 4, 6),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => compiled_for!("avx2,fma", x86::Avx2, 2, 2),
        Isa::Portable => columns::<Portable, 1, 4>(x, rows, k, w, bias, out, ldo, c0, c1),
    }
}

/// A pointer that rayon tasks may share; each task writes a disjoint part.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}
impl SharedMut {
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Below this many multiply-adds a linear layer runs on the calling thread.
const PARALLEL_WORK: usize = 1 << 17;

/// Input bytes per row block of a linear layer (prompts fed whole have many rows): a block stays
/// in L2 while the weights stream past it once.
const ROW_BLOCK_BYTES: usize = 1 << 20;

/// `out [rows, n] = x [rows, k] · wᵀ (+ bias)` with `w [n, k]` row-major (the Hugging Face
/// layout of a linear layer's weight). Each element is a `Lanes` dot product, so a row's
/// result does not depend on `rows`, on the thread count or on the instruction set.
pub fn linear(x: &[f32], rows: usize, w: &[f32], bias: Option<&[f32]>, out: &mut [f32]) {
    linear_many(x, rows, &mut [Product { w, bias, out }])
}

#[cfg(test)]
fn linear_with(isa: Isa, x: &[f32], rows: usize, w: &[f32], bias: Option<&[f32]>, out: &mut [f32]) {
    linear_many_with(isa, x, rows, &mut [Product { w, bias, out }])
}

/// One weight matrix applied to a shared input by [`linear_many`].
pub struct Product<'a> {
    pub w: &'a [f32],
    pub bias: Option<&'a [f32]>,
    pub out: &'a mut [f32],
}

/// Several [`linear`] layers on the same input (q, k and v; gate and up) in one parallel region,
/// so the threads meet once instead of once per matrix.
pub fn linear_many(x: &[f32], rows: usize, products: &mut [Product]) {
    linear_many_with(isa(), x, rows, products)
}

fn linear_many_with(isa: Isa, x: &[f32], rows: usize, products: &mut [Product]) {
    if rows == 0 {
        return;
    }
    let k = x.len() / rows;
    assert!(
        k > 0 && x.len() == rows * k,
        "linear: x {} rows {rows}",
        x.len()
    );
    let threads = rayon::current_num_threads();
    let total: usize = products.iter().map(|p| p.w.len()).sum::<usize>() * rows;
    let parallel = threads > 1 && total >= PARALLEL_WORK;
    // Tasks: (product, row block, columns). Row blocks keep a long prompt's rows in L2 while a
    // weight tile sweeps them; columns are split into about four tasks per thread overall.
    let block = (ROW_BLOCK_BYTES / (4 * k)).clamp(16, 1024) / 4 * 4;
    let row_blocks: Vec<(usize, usize)> = (0..rows)
        .step_by(block)
        .map(|r| (r, (r + block).min(rows)))
        .collect();
    // (product, row block, columns), the blocks and columns as half-open ranges.
    type Task = (usize, (usize, usize), (usize, usize));
    let mut tasks: Vec<Task> = Vec::new();
    for (i, p) in products.iter().enumerate() {
        assert!(
            p.w.len() % k == 0,
            "linear: w {} is not a multiple of k {k}",
            p.w.len()
        );
        let n = p.w.len() / k;
        assert_eq!(p.out.len(), rows * n, "linear: output size");
        if let Some(b) = p.bias {
            assert_eq!(b.len(), n, "linear: bias size");
        }
        let share = if parallel {
            (threads * 4 * p.w.len() * rows).div_ceil(total * row_blocks.len())
        } else {
            1
        };
        // Whole 6-column tiles.
        let chunk = n.div_ceil(share.max(1)).div_ceil(6).max(1) * 6;
        for &block in &row_blocks {
            for c0 in (0..n).step_by(chunk) {
                tasks.push((i, block, (c0, (c0 + chunk).min(n))));
            }
        }
    }
    struct Raw {
        w: *const f32,
        bias: Option<*const f32>,
        out: SharedMut,
        n: usize,
    }
    unsafe impl Send for Raw {}
    unsafe impl Sync for Raw {}
    let raw: Vec<Raw> = products
        .iter_mut()
        .map(|p| Raw {
            w: p.w.as_ptr(),
            bias: p.bias.map(<[f32]>::as_ptr),
            out: SharedMut(p.out.as_mut_ptr()),
            n: p.w.len() / k,
        })
        .collect();
    let xp = x.as_ptr() as usize;
    // SAFETY: tasks write disjoint blocks (rows r0..r1, columns c0..c1) of their product's
    // output, and read `x` and the weights, which outlive the tasks, within their lengths.
    let run = |&(i, (r0, r1), (c0, c1)): &Task| unsafe {
        let p = &raw[i];
        let x = (xp as *const f32).add(r0 * k);
        columns_with(
            isa,
            x,
            r1 - r0,
            k,
            p.w,
            p.bias,
            p.out.get().add(r0 * p.n),
            p.n,
            c0,
            c1,
        )
    };
    if parallel && tasks.len() > 1 {
        tasks.par_iter().for_each(run);
    } else {
        tasks.iter().for_each(run);
    }
}

/// Where one layer's keys and values of every slot live: `[slots, kv_heads, capacity, head_dim]`.
pub struct LayerCache<'a> {
    pub keys: &'a [f32],
    pub values: &'a [f32],
    pub kv_heads: usize,
    pub capacity: usize,
}

/// One decoding sequence: its cache slot and the position of its new token (already written to
/// the cache), plus the first position its attention window reaches.
#[derive(Clone, Copy)]
pub struct Query {
    pub slot: usize,
    pub first: usize,
    pub position: usize,
}

/// Attention of each query row over its own cached positions `first..=position`.
/// `q [rows, heads·d]` → `out [rows, heads·d]` for `(heads, d, scale)`; the query heads sharing a
/// KV head are computed together. Scores are `(q·scale)·k` dot products (`scale` is
/// `1/sqrt(d)` but for Gemma 3's `query_pre_attn_scalar`), the softmax is `exp(s − max) / Σ`,
/// and the output is `Σ_t p_t·v_t` accumulated in position order.
pub fn attention(
    q: &[f32],
    queries: &[Query],
    (heads, d, scale): (usize, usize, f32),
    cache: &LayerCache,
    out: &mut [f32],
) {
    let rows = queries.len();
    let kvh = cache.kv_heads;
    let group = heads / kvh;
    assert_eq!(q.len(), rows * heads * d);
    assert_eq!(out.len(), rows * heads * d);
    let isa = isa();
    let out_ptr = SharedMut(out.as_mut_ptr());
    let task = |t: usize| {
        let (row, h) = (t / kvh, t % kvh);
        let query = queries[row];
        let base = (query.slot * kvh + h) * cache.capacity * d;
        let keys = &cache.keys[base + query.first * d..base + (query.position + 1) * d];
        let values = &cache.values[base + query.first * d..base + (query.position + 1) * d];
        let qs: Vec<f32> = q[(row * heads + h * group) * d..(row * heads + (h + 1) * group) * d]
            .iter()
            .map(|v| v * scale)
            .collect();
        // SAFETY: each task owns row `row`, heads h·group .. (h+1)·group of `out` (tasks are
        // distinct (row, h) pairs), inside `out`'s rows·heads·d elements (asserted above).
        let dst = unsafe {
            std::slice::from_raw_parts_mut(
                out_ptr.get().add((row * heads + h * group) * d),
                group * d,
            )
        };
        // SAFETY: `isa` is what this CPU supports (`isa()`), and the slices have the lengths
        // attend_group reads: group·d query and output values, whole positions of keys/values.
        unsafe { attend_group(isa, &qs, group, keys, values, d, dst) };
    };
    let tasks = rows * kvh;
    let span: usize = queries.iter().map(|q| q.position + 1 - q.first).sum();
    if rayon::current_num_threads() <= 1 || span * heads * d < PARALLEL_WORK / 2 {
        (0..tasks).for_each(task);
    } else {
        (0..tasks).into_par_iter().for_each(task);
    }
}

unsafe fn attend_group(
    isa: Isa,
    qs: &[f32],
    group: usize,
    keys: &[f32],
    values: &[f32],
    d: usize,
    out: &mut [f32],
) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => attend_group_avx512(qs, group, keys, values, d, out),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => attend_group_avx2(qs, group, keys, values, d, out),
        Isa::Portable => attend_group_portable(qs, group, keys, values, d, out),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn attend_group_avx512(
    qs: &[f32],
    group: usize,
    keys: &[f32],
    values: &[f32],
    d: usize,
    out: &mut [f32],
) {
    attend_group_impl(Isa::Avx512, qs, group, keys, values, d, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_group_avx2(
    qs: &[f32],
    group: usize,
    keys: &[f32],
    values: &[f32],
    d: usize,
    out: &mut [f32],
) {
    attend_group_impl(Isa::Avx2, qs, group, keys, values, d, out)
}

unsafe fn attend_group_portable(
    qs: &[f32],
    group: usize,
    keys: &[f32],
    values: &[f32],
    d: usize,
    out: &mut [f32],
) {
    attend_group_impl(Isa::Portable, qs, group, keys, values, d, out)
}

#[inline(always)]
unsafe fn attend_group_impl(
    isa: Isa,
    qs: &[f32],
    group: usize,
    keys: &[f32],
    values: &[f32],
    d: usize,
    out: &mut [f32],
) {
    let len = keys.len() / d;
    let mut scores = vec![0f32; group * len];
    columns_with(
        isa,
        qs.as_ptr(),
        group,
        d,
        keys.as_ptr(),
        None,
        scores.as_mut_ptr(),
        len,
        0,
        len,
    );
    for g in 0..group {
        let s = &mut scores[g * len..(g + 1) * len];
        let max = max_f32(s);
        for v in s.iter_mut() {
            *v = exp_f32(*v - max);
        }
        let total = sum16(s);
        for v in s.iter_mut() {
            *v /= total;
        }
        let o = &mut out[g * d..(g + 1) * d];
        o.fill(0.0);
        for (t, p) in s.iter().enumerate() {
            let v = &values[t * d..(t + 1) * d];
            for j in 0..d {
                o[j] = p.mul_add(v[j], o[j]);
            }
        }
    }
}

/// Sum in 16 interleaved partial sums folded by the fixed tree.
#[inline(always)]
pub fn sum16(v: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let mut chunks = v.chunks_exact(16);
    for c in &mut chunks {
        for j in 0..16 {
            acc[j] += c[j];
        }
    }
    for (j, x) in chunks.remainder().iter().enumerate() {
        acc[j] += x;
    }
    tree16(&acc)
}

// `ln Σ exp(v)`: the exponentials of `v − max` in f32 ([`exp_f32`]) summed in f64 in 8
// interleaved partial sums folded pairwise; the same bits on every instruction set.
crate::simd::with_widest_isa!(pub log_sum_exp => log_sum_exp_impl; (v: &[f32]) -> f64);

#[inline(always)]
fn log_sum_exp_impl(v: &[f32]) -> f64 {
    let max = max_f32(v);
    let mut acc = [0f64; 16];
    let mut chunks = v.chunks_exact(16);
    for c in &mut chunks {
        for j in 0..16 {
            acc[j] += exp_f32(c[j] - max) as f64;
        }
    }
    for (j, l) in chunks.remainder().iter().enumerate() {
        acc[j] += exp_f32(l - max) as f64;
    }
    let mut width = 8;
    while width > 0 {
        for j in 0..width {
            acc[j] += acc[j + width];
        }
        width /= 2;
    }
    max as f64 + acc[0].ln()
}

/// The largest value (NaNs ignored), in 16 lanes so that it vectorises.
#[inline(always)]
pub fn max_f32(v: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 16];
    let mut chunks = v.chunks_exact(16);
    for c in &mut chunks {
        for j in 0..16 {
            acc[j] = if c[j] > acc[j] { c[j] } else { acc[j] };
        }
    }
    for (j, x) in chunks.remainder().iter().enumerate() {
        acc[j] = if *x > acc[j] { *x } else { acc[j] };
    }
    acc.iter()
        .copied()
        .fold(f32::NEG_INFINITY, |m, x| if x > m { x } else { m })
}

/// `x · (1/√(mean(x²) + eps)) · weight`, row by row.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f64, out: &mut [f32]) {
    let h = weight.len();
    for (row, dst) in x.chunks_exact(h).zip(out.chunks_exact_mut(h)) {
        let mut acc = [0f32; 16];
        let mut chunks = row.chunks_exact(16);
        for c in &mut chunks {
            for j in 0..16 {
                acc[j] += c[j] * c[j];
            }
        }
        for (j, v) in chunks.remainder().iter().enumerate() {
            acc[j] += v * v;
        }
        let mean = tree16(&acc) * (1.0 / h as f64) as f32;
        let inv = 1.0 / (mean + eps as f32).sqrt();
        for ((d, v), w) in dst.iter_mut().zip(row).zip(weight) {
            *d = (v * inv) * w;
        }
    }
}

/// Cosines and sines `[rows, head_dim/2]` of the angles `position · inv_freq`, times `scale`
/// (YaRN's attention factor, else 1), computed in f32 as transformers computes them: the
/// tables of every path.
pub fn rotary_tables(positions: &[usize], inv_freq: &[f32], scale: f32) -> (Vec<f32>, Vec<f32>) {
    let mut cos = Vec::with_capacity(positions.len() * inv_freq.len());
    let mut sin = Vec::with_capacity(positions.len() * inv_freq.len());
    for &pos in positions {
        for f in inv_freq {
            let angle = pos as f32 * f;
            cos.push(angle.cos() * scale);
            sin.push(angle.sin() * scale);
        }
    }
    (cos, sin)
}

/// Rotary embedding in the rotate-half layout on `x [rows, heads·d]`, with the row's tables from
/// [`rotary_tables`].
pub fn rotary(x: &mut [f32], heads: usize, head_dim: usize, cos: &[f32], sin: &[f32]) {
    let half = head_dim / 2;
    for ((row, cos), sin) in x
        .chunks_exact_mut(heads * head_dim)
        .zip(cos.chunks_exact(half))
        .zip(sin.chunks_exact(half))
    {
        for head in row.chunks_exact_mut(head_dim) {
            let (a, b) = head.split_at_mut(half);
            for i in 0..half {
                let (x1, x2) = (a[i], b[i]);
                a[i] = x1 * cos[i] + (-x2) * sin[i];
                b[i] = x2 * cos[i] + x1 * sin[i];
            }
        }
    }
}

/// `silu(gate) · up`, in place in `gate`.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    for (g, u) in gate.iter_mut().zip(up) {
        *g = (*g / (1.0 + exp_f32(-*g))) * u;
    }
}

/// `gelu(gate) · up` with GELU's tanh approximation (`0.5·g·(1 + tanh(√(2/π)·g·(1 + 0.044715·g²)))`,
/// PyTorch's `gelu(approximate="tanh")`), in place in `gate`: the GELU in the order candle's f32
/// op computes it, so that this path and the tensor path round alike.
pub fn gelu_tanh_mul(gate: &mut [f32], up: &[f32]) {
    const SQRT_TWO_OVER_PI: f32 = 0.797_884_6;
    for (g, u) in gate.iter_mut().zip(up) {
        let x = *g;
        let activated = 0.5 * x * (1.0 + (SQRT_TWO_OVER_PI * x * (1.0 + 0.044715 * x * x)).tanh());
        *g = activated * u;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn isas() -> Vec<Isa> {
        let mut out = vec![Isa::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                out.push(Isa::Avx2);
            }
            if std::is_x86_feature_detected!("avx512f") {
                out.push(Isa::Avx512);
            }
        }
        out
    }

    #[test]
    fn linear_is_close_to_f64_and_bitwise_independent_of_rows_and_isa() {
        // Build rayon's pool the way the binaries do (with flush-to-zero on every worker), before
        // the kernels use it.
        crate::runtime::init(None).unwrap();
        for (k, n) in [(64, 37), (100, 13), (256, 300), (7, 5)] {
            let w = data(n * k, 1);
            let bias = data(n, 2);
            let rows = 70; // more than one row block
            let x = data(rows * k, 3);
            let mut reference = vec![0f32; rows * n];
            linear_with(Isa::Portable, &x, rows, &w, Some(&bias), &mut reference);
            for r in 0..rows {
                for o in 0..n {
                    let exact: f64 = (0..k)
                        .map(|i| x[r * k + i] as f64 * w[o * k + i] as f64)
                        .sum::<f64>()
                        + bias[o] as f64;
                    assert!(
                        (reference[r * n + o] as f64 - exact).abs() < 1e-4,
                        "{k}x{n}"
                    );
                }
            }
            for isa in isas() {
                let mut all = vec![0f32; rows * n];
                linear_with(isa, &x, rows, &w, Some(&bias), &mut all);
                assert_eq!(all, reference, "{isa:?} {k}x{n}");
                // Each row alone gives the same bits.
                for r in 0..rows {
                    let mut one = vec![0f32; n];
                    linear_with(isa, &x[r * k..(r + 1) * k], 1, &w, Some(&bias), &mut one);
                    assert_eq!(one, reference[r * n..(r + 1) * n], "{isa:?} row {r}");
                }
            }
        }
    }

    #[test]
    fn attention_matches_a_direct_softmax() {
        crate::runtime::init(None).unwrap();
        let (heads, kvh, d, cap) = (4, 2, 16, 10);
        let keys = data(3 * kvh * cap * d, 4);
        let values = data(3 * kvh * cap * d, 5);
        let cache = LayerCache {
            keys: &keys,
            values: &values,
            kv_heads: kvh,
            capacity: cap,
        };
        let queries = [
            Query {
                slot: 2,
                first: 0,
                position: 6,
            },
            Query {
                slot: 0,
                first: 3,
                position: 9,
            },
        ];
        let q = data(2 * heads * d, 6);
        let mut out = vec![0f32; 2 * heads * d];
        let scale = 1.0 / (d as f32).sqrt();
        attention(&q, &queries, (heads, d, scale), &cache, &mut out);
        for (row, query) in queries.iter().enumerate() {
            for h in 0..heads {
                let kv = h / (heads / kvh);
                let base = (query.slot * kvh + kv) * cap * d;
                let qv = &q[(row * heads + h) * d..][..d];
                let scores: Vec<f64> = (query.first..=query.position)
                    .map(|t| {
                        (0..d)
                            .map(|j| qv[j] as f64 * keys[base + t * d + j] as f64)
                            .sum::<f64>()
                            / (d as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::MIN, f64::max);
                let z: f64 = scores.iter().map(|s| (s - max).exp()).sum();
                for j in 0..d {
                    let exact: f64 = scores
                        .iter()
                        .enumerate()
                        .map(|(i, s)| {
                            (s - max).exp() / z * values[base + (query.first + i) * d + j] as f64
                        })
                        .sum();
                    assert!((out[(row * heads + h) * d + j] as f64 - exact).abs() < 1e-5);
                }
            }
        }
    }
}

//! This project's CUDA kernels (optune-kernels' src/cuda/*.cu), compiled for the CPU with a small
//! emulation of the CUDA runtime (emulator/), and run thread by thread: each block's threads are
//! fibers that run in turn up to their next `__syncthreads` or warp shuffle. A test can then hand
//! a kernel the launch geometry and the buffers the CUDA launch would, and compare its output with
//! the op's CPU form, without a GPU.
//!
//! What this checks: the kernel's indexing, its barriers and reductions, its handling of edge
//! cases (idle slots, partial chunks, head widths that are not a multiple of 32), and the launch
//! geometry. What it cannot: timing, memory coalescing, races between blocks, the GPU's
//! approximate `__expf`, or the cudarc argument marshalling (compared against the PTX signatures
//! by `scripts/build-cuda.sh check`).
//!
//! A launch that a GPU would refuse (no blocks, more than 1024 threads) or that could never finish
//! (a barrier some threads cannot reach) is an `Err` naming the kernel and the block. Every buffer
//! a kernel gets is a copy that ends where an inaccessible page begins: a read or write past its
//! end ends the process at once with a report naming the kernel, block and thread, as an illegal
//! address ends a GPU run.

use std::ffi::{c_char, c_int, CStr};

/// A one-dimensional launch: `grid` blocks of `block` threads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Launch {
    pub grid: u32,
    pub block: u32,
}

/// A storage type the kernels are instantiated for: f32, bf16 and f16.
pub trait Element: Copy + sealed::Sealed {
    #[doc(hidden)]
    const CACHED_ATTENTION: CachedAttentionFn<Self>;
    #[doc(hidden)]
    const SAMPLE_ROWS: SampleRowsFn<Self>;
    #[doc(hidden)]
    const ADD_RMS_NORM: AddRmsNormFn<Self>;
    #[doc(hidden)]
    const SILU_MUL: SiluMulFn<Self>;
    #[doc(hidden)]
    const CACHE_WRITE: CacheWriteFn<Self>;
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::bf16 {}
    impl Sealed for half::f16 {}
}

#[doc(hidden)]
pub type CachedAttentionFn<T> = unsafe extern "C" fn(
    u32,
    u32,
    *const T,
    *const T,
    *const T,
    *const T,
    *const T,
    *mut T,
    *const u32,
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    f32,
) -> c_int;

#[doc(hidden)]
pub type SampleRowsFn<T> = unsafe extern "C" fn(
    u32,
    u32,
    *const T,
    *const f32,
    *mut f32,
    c_int,
    f32,
    c_int,
    f32,
    f32,
    c_int,
) -> c_int;

#[doc(hidden)]
pub type AddRmsNormFn<T> = unsafe extern "C" fn(
    u32,
    u32,
    *const T,
    *const T,
    *const T,
    *mut T,
    c_int,
    c_int,
    f32,
) -> c_int;

#[doc(hidden)]
pub type SiluMulFn<T> = unsafe extern "C" fn(u32, u32, *const T, *mut T, u64, c_int) -> c_int;

#[doc(hidden)]
pub type CacheWriteFn<T> = unsafe extern "C" fn(
    u32,
    u32,
    *mut T,
    *const T,
    *const T,
    *const T,
    *const u32,
    u64,
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
) -> c_int;

type OptimizerFn = unsafe extern "C" fn(
    u32,
    u32,
    *mut f32,
    *const f32,
    *const f32,
    u64,
    c_int,
    f32,
    f32,
    f32,
    f32,
    f32,
    f32,
    f32,
) -> c_int;

extern "C" {
    fn optune_emu_last_error() -> *const c_char;
    fn optune_emu_guarded_alloc(bytes: usize) -> *mut std::ffi::c_void;
    fn optune_emu_guarded_free(data: *mut std::ffi::c_void, bytes: usize);
    fn optune_emu_optimizer_moments(
        grid: u32,
        block: u32,
        moments: *mut f32,
        param: *const f32,
        grad: *const f32,
        n: u64,
        kind: c_int,
        s0: f32,
        s1: f32,
        s2: f32,
        s3: f32,
        s4: f32,
        s5: f32,
        s6: f32,
    ) -> c_int;
    fn optune_emu_optimizer_param(
        grid: u32,
        block: u32,
        param: *mut f32,
        grad: *const f32,
        moments: *const f32,
        n: u64,
        kind: c_int,
        s0: f32,
        s1: f32,
        s2: f32,
        s3: f32,
        s4: f32,
        s5: f32,
        s6: f32,
    ) -> c_int;
}

/// The entry points of the kernels instantiated per storage type, and their `Element` impl.
macro_rules! element {
    (
        $t:ty,
        $cached_attention:ident,
        $sample_rows:ident,
        $add_rms_norm:ident,
        $silu_mul:ident,
        $cache_write:ident
    ) => {
        extern "C" {
            fn $cached_attention(
                grid: u32,
                block: u32,
                q: *const $t,
                cos: *const $t,
                sin: *const $t,
                keys: *const $t,
                values: *const $t,
                out: *mut $t,
                spans: *const u32,
                heads: c_int,
                kv_heads: c_int,
                capacity: c_int,
                head_dim: c_int,
                row_width: c_int,
                scale: f32,
            ) -> c_int;
            fn $sample_rows(
                grid: u32,
                block: u32,
                logits: *const $t,
                uniforms: *const f32,
                out: *mut f32,
                vocab: c_int,
                temperature: f32,
                top_k: c_int,
                top_p: f32,
                floor_nats: f32,
                steps: c_int,
            ) -> c_int;
            fn $add_rms_norm(
                grid: u32,
                block: u32,
                x: *const $t,
                delta: *const $t,
                weight: *const $t,
                out: *mut $t,
                rows: c_int,
                hidden: c_int,
                eps: f32,
            ) -> c_int;
            fn $silu_mul(
                grid: u32,
                block: u32,
                gate_up: *const $t,
                out: *mut $t,
                n: u64,
                width: c_int,
            ) -> c_int;
            fn $cache_write(
                grid: u32,
                block: u32,
                store: *mut $t,
                rows: *const $t,
                cos: *const $t,
                sin: *const $t,
                spans: *const u32,
                tokens: u64,
                slots: c_int,
                kv_heads: c_int,
                capacity: c_int,
                head_dim: c_int,
                row_width: c_int,
                k_at: c_int,
                v_at: c_int,
            ) -> c_int;
        }
        impl Element for $t {
            const CACHED_ATTENTION: CachedAttentionFn<Self> = $cached_attention;
            const SAMPLE_ROWS: SampleRowsFn<Self> = $sample_rows;
            const ADD_RMS_NORM: AddRmsNormFn<Self> = $add_rms_norm;
            const SILU_MUL: SiluMulFn<Self> = $silu_mul;
            const CACHE_WRITE: CacheWriteFn<Self> = $cache_write;
        }
    };
}

element!(
    f32,
    optune_emu_cached_attention_f32,
    optune_emu_sample_rows_f32,
    optune_emu_add_rms_norm_f32,
    optune_emu_silu_mul_f32,
    optune_emu_cache_write_rotated_f32
);
element!(
    half::bf16,
    optune_emu_cached_attention_bf16,
    optune_emu_sample_rows_bf16,
    optune_emu_add_rms_norm_bf16,
    optune_emu_silu_mul_bf16,
    optune_emu_cache_write_rotated_bf16
);
element!(
    half::f16,
    optune_emu_cached_attention_f16,
    optune_emu_sample_rows_f16,
    optune_emu_add_rms_norm_f16,
    optune_emu_silu_mul_f16,
    optune_emu_cache_write_rotated_f16
);

/// The emulator's verdict on a launch: `Ok` when every block ran to its end.
fn verdict(code: c_int) -> Result<(), String> {
    if code == 0 {
        return Ok(());
    }
    // SAFETY: the emulator returns a pointer to its thread-local, NUL-terminated message, valid
    // until the next launch on this thread.
    Err(unsafe { CStr::from_ptr(optune_emu_last_error()) }
        .to_string_lossy()
        .into_owned())
}

/// A kernel's copy of a buffer, ending where an inaccessible page begins: a kernel that reads or
/// writes past the end stops the process with a report naming the kernel, block and thread (as
/// an illegal address stops a GPU run) instead of reading a neighbour's data.
struct Guarded<T: Copy> {
    data: *mut T,
    len: usize,
}

impl<T: Copy> Guarded<T> {
    fn new(values: &[T]) -> Self {
        let bytes = std::mem::size_of_val(values);
        // SAFETY: a plain allocation; a null result is checked.
        let data = unsafe { optune_emu_guarded_alloc(bytes) } as *mut T;
        assert!(!data.is_null(), "mapping a guarded buffer of {bytes} bytes");
        // SAFETY: `data` holds `bytes` writable bytes, aligned for T (they end on a page
        // boundary and `bytes` is a multiple of T's power-of-two size), apart from `values`.
        unsafe { std::ptr::copy_nonoverlapping(values.as_ptr(), data, values.len()) };
        Self {
            data,
            len: values.len(),
        }
    }

    fn ptr(&self) -> *const T {
        self.data
    }

    fn ptr_mut(&mut self) -> *mut T {
        self.data
    }

    fn to_vec(&self) -> Vec<T> {
        // SAFETY: `data` holds `len` initialised values (copied in by `new`, then written by a
        // kernel of matching element type).
        unsafe { std::slice::from_raw_parts(self.data, self.len) }.to_vec()
    }
}

impl<T: Copy> Drop for Guarded<T> {
    fn drop(&mut self) {
        // SAFETY: the mapping `new` made for these bytes, released once.
        unsafe { optune_emu_guarded_free(self.data.cast(), self.len * std::mem::size_of::<T>()) }
    }
}

fn int(n: usize, what: &str) -> c_int {
    c_int::try_from(n).unwrap_or_else(|_| panic!("{what} {n} does not fit the kernel's int"))
}

/// The sizes of the cache attention kernel's arguments (see src/cuda/cached_attention.cu):
/// the queries as the first `heads·head_dim` columns of `rows [queries, row_width]`,
/// `cos`/`sin [queries, head_dim/2]`, `keys`/`values [slots, kv_heads, capacity, head_dim]`.
#[derive(Clone, Copy, Debug)]
pub struct AttentionDims {
    pub queries: usize,
    pub row_width: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub slots: usize,
    pub kv_heads: usize,
    pub capacity: usize,
}

/// Runs `cached_attention_{f32,bf16,f16}`; returns `out [queries, heads, head_dim]`.
pub fn cached_attention<T: Element + Default>(
    launch: Launch,
    dims: AttentionDims,
    rows: &[T],
    (cos, sin): (&[T], &[T]),
    (keys, values): (&[T], &[T]),
    spans: &[u32],
    scale: f32,
) -> Result<Vec<T>, String> {
    let AttentionDims {
        queries,
        row_width,
        heads,
        head_dim,
        slots,
        kv_heads,
        capacity,
    } = dims;
    assert!(row_width >= heads * head_dim, "rows");
    assert_eq!(rows.len(), queries * row_width, "rows");
    assert_eq!(cos.len(), queries * head_dim / 2, "cos");
    assert_eq!(sin.len(), cos.len(), "sin");
    assert_eq!(keys.len(), slots * kv_heads * capacity * head_dim, "keys");
    assert_eq!(values.len(), keys.len(), "values");
    assert_eq!(spans.len(), 3 * queries, "spans");
    for span in spans.chunks_exact(3) {
        // The kernel reads what the spans name: keep it inside the buffers.
        let (slot, first, last) = (span[0] as usize, span[1] as usize, span[2] as usize);
        assert!(
            last < first || (slot < slots && last < capacity),
            "span {span:?} outside the cache"
        );
    }
    let mut out = Guarded::new(&vec![T::default(); queries * heads * head_dim]);
    // SAFETY: the buffers hold the element counts the kernel reads and writes for these sizes
    // (checked above, spans included); the emulator runs the launch to its end before returning,
    // and the guarded copies live to the end of the statement.
    let code = unsafe {
        T::CACHED_ATTENTION(
            launch.grid,
            launch.block,
            Guarded::new(rows).ptr(),
            Guarded::new(cos).ptr(),
            Guarded::new(sin).ptr(),
            Guarded::new(keys).ptr(),
            Guarded::new(values).ptr(),
            out.ptr_mut(),
            Guarded::new(spans).ptr(),
            int(heads, "heads"),
            int(kv_heads, "kv_heads"),
            int(capacity, "capacity"),
            int(head_dim, "head_dim"),
            int(row_width, "row_width"),
            scale,
        )
    };
    verdict(code).map(|()| out.to_vec())
}

/// The sampler's scalar arguments (see src/cuda/sampling.cu).
#[derive(Clone, Copy, Debug)]
pub struct SampleArgs {
    pub temperature: f32,
    pub top_k: u32,
    pub top_p: f32,
    pub floor_nats: f32,
    pub steps: u32,
}

/// Runs `sample_rows_{f32,bf16,f16}` over `logits [rows, vocab]`; returns `[rows, 2]` of (token
/// id, log-probability).
pub fn sample_rows<T: Element>(
    launch: Launch,
    logits: &[T],
    vocab: usize,
    uniforms: &[f32],
    args: SampleArgs,
) -> Result<Vec<f32>, String> {
    let rows = uniforms.len();
    assert_eq!(logits.len(), rows * vocab, "logits");
    assert!(launch.grid as usize <= rows, "one block per row at most");
    let mut out = Guarded::new(&vec![0f32; 2 * rows]);
    // SAFETY: logits hold rows·vocab elements, uniforms rows and out 2·rows; each block reads
    // and writes its own row only, and no more blocks than rows are launched (checked above).
    let code = unsafe {
        T::SAMPLE_ROWS(
            launch.grid,
            launch.block,
            Guarded::new(logits).ptr(),
            Guarded::new(uniforms).ptr(),
            out.ptr_mut(),
            int(vocab, "vocab"),
            args.temperature,
            int(args.top_k as usize, "top_k"),
            args.top_p,
            args.floor_nats,
            int(args.steps as usize, "steps"),
        )
    };
    verdict(code).map(|()| out.to_vec())
}

/// Runs `add_rms_norm_{f32,bf16,f16}` over `x`, `delta [rows, weight.len()]`; returns `[2, rows,
/// hidden]`: the sums, then the normalised rows.
pub fn add_rms_norm<T: Element + Default>(
    launch: Launch,
    x: &[T],
    delta: &[T],
    weight: &[T],
    eps: f32,
) -> Result<Vec<T>, String> {
    let hidden = weight.len();
    assert!(hidden > 0 && x.len().is_multiple_of(hidden), "x");
    assert_eq!(delta.len(), x.len(), "delta");
    let rows = x.len() / hidden;
    assert!(launch.grid as usize <= rows, "one block per row at most");
    let mut out = Guarded::new(&vec![T::default(); 2 * x.len()]);
    // SAFETY: x and delta hold rows·hidden elements, weight hidden, out 2·rows·hidden; each block
    // reads and writes its own row, and no more blocks than rows are launched (checked above).
    let code = unsafe {
        T::ADD_RMS_NORM(
            launch.grid,
            launch.block,
            Guarded::new(x).ptr(),
            Guarded::new(delta).ptr(),
            Guarded::new(weight).ptr(),
            out.ptr_mut(),
            int(rows, "rows"),
            int(hidden, "hidden"),
            eps,
        )
    };
    verdict(code).map(|()| out.to_vec())
}

/// Runs `silu_mul_{f32,bf16,f16}` over rows `[rows, 2·width]` of the gate's then the up
/// projection's columns; returns `silu(gate) · up`, `[rows, width]`.
pub fn silu_mul<T: Element + Default>(
    launch: Launch,
    gate_up: &[T],
    width: usize,
) -> Result<Vec<T>, String> {
    assert!(
        width > 0 && gate_up.len().is_multiple_of(2 * width),
        "gate_up"
    );
    let n = gate_up.len() / 2;
    let mut out = Guarded::new(&vec![T::default(); n]);
    // SAFETY: gate_up holds 2n elements, out n; the kernel's grid-stride loop stays below n.
    let code = unsafe {
        T::SILU_MUL(
            launch.grid,
            launch.block,
            Guarded::new(gate_up).ptr(),
            out.ptr_mut(),
            n as u64,
            int(width, "width"),
        )
    };
    verdict(code).map(|()| out.to_vec())
}

/// The sizes of the cache write kernel's store (see src/cuda/cache_write.cu): `[2, slots,
/// kv_heads, capacity, head_dim]`.
#[derive(Clone, Copy, Debug)]
pub struct StoreDims {
    pub slots: usize,
    pub kv_heads: usize,
    pub capacity: usize,
    pub head_dim: usize,
}

/// Runs `cache_write_rotated_{f32,bf16,f16}` on `store` in place: token `i`'s key (rotated) and
/// value, `kv_heads·head_dim` columns of `rows [tokens, row_width]` from columns `k_at` and
/// `v_at`, go to the slot and position `spans[i]` names.
pub fn cache_write_rotated<T: Element>(
    launch: Launch,
    dims: StoreDims,
    store: &mut [T],
    (rows, row_width, k_at, v_at): (&[T], usize, usize, usize),
    (cos, sin): (&[T], &[T]),
    spans: &[u32],
) -> Result<(), String> {
    let StoreDims {
        slots,
        kv_heads,
        capacity,
        head_dim,
    } = dims;
    let tokens = spans.len() / 3;
    let width = kv_heads * head_dim;
    assert_eq!(store.len(), 2 * slots * width * capacity, "store");
    assert_eq!(rows.len(), tokens * row_width, "rows");
    assert!(
        k_at + width <= row_width && v_at + width <= row_width,
        "columns"
    );
    assert_eq!(cos.len(), tokens * head_dim / 2, "cos");
    assert_eq!(sin.len(), cos.len(), "sin");
    for span in spans.chunks_exact(3) {
        assert!(
            (span[0] as usize) < slots && (span[2] as usize) < capacity,
            "span {span:?} outside the store"
        );
    }
    let mut guarded_store = Guarded::new(store);
    // SAFETY: the buffers hold what the kernel reads and writes for these sizes, the columns and
    // the spans' slots and positions included (checked above); the launch runs to its end before
    // returning.
    let code = unsafe {
        T::CACHE_WRITE(
            launch.grid,
            launch.block,
            guarded_store.ptr_mut(),
            Guarded::new(rows).ptr(),
            Guarded::new(cos).ptr(),
            Guarded::new(sin).ptr(),
            Guarded::new(spans).ptr(),
            tokens as u64,
            int(slots, "slots"),
            int(kv_heads, "kv_heads"),
            int(capacity, "capacity"),
            int(head_dim, "head_dim"),
            int(row_width, "row_width"),
            int(k_at, "k_at"),
            int(v_at, "v_at"),
        )
    };
    store.copy_from_slice(&guarded_store.to_vec());
    verdict(code)
}

/// Which optimiser kernel to run and its arguments after the buffers: the kind and the seven
/// scalars (see src/cuda/optimizer.cu).
#[derive(Clone, Copy, Debug)]
pub struct OptimizerArgs {
    pub kind: i32,
    pub scalars: [f32; 7],
}

fn optimizer(
    kernel: OptimizerFn,
    launch: Launch,
    target: &mut [f32],
    a: &[f32],
    b: &[f32],
    n: usize,
    args: OptimizerArgs,
) -> Result<(), String> {
    let s = args.scalars;
    let mut guarded = Guarded::new(target);
    // SAFETY: the callers check the buffers against n; the kernel's grid-stride loop stays
    // below n (and below buffers·n for the moments, whose rows are n apart). The guarded copies
    // live to the end of the statement.
    let code = unsafe {
        kernel(
            launch.grid,
            launch.block,
            guarded.ptr_mut(),
            Guarded::new(a).ptr(),
            Guarded::new(b).ptr(),
            n as u64,
            args.kind,
            s[0],
            s[1],
            s[2],
            s[3],
            s[4],
            s[5],
            s[6],
        )
    };
    target.copy_from_slice(&guarded.to_vec());
    verdict(code)
}

/// The gradient holds n elements, the moments one buffer (kind 1) or two of n.
fn check_sizes(n: usize, grad: &[f32], moments: &[f32], args: OptimizerArgs) {
    assert_eq!(grad.len(), n, "grad");
    let buffers = if args.kind == 1 { 1 } else { 2 };
    assert_eq!(moments.len(), buffers * n, "moments of kind {}", args.kind);
}

/// Runs `optimizer_moments`: updates `moments [buffers, n]` from `param [n]` and `grad [n]`.
pub fn optimizer_moments(
    launch: Launch,
    moments: &mut [f32],
    param: &[f32],
    grad: &[f32],
    args: OptimizerArgs,
) -> Result<(), String> {
    let n = param.len();
    check_sizes(n, grad, moments, args);
    optimizer(
        optune_emu_optimizer_moments,
        launch,
        moments,
        param,
        grad,
        n,
        args,
    )
}

/// Runs `optimizer_param`: updates `param [n]` from `grad [n]` and `moments [buffers, n]`.
pub fn optimizer_param(
    launch: Launch,
    param: &mut [f32],
    grad: &[f32],
    moments: &[f32],
    args: OptimizerArgs,
) -> Result<(), String> {
    let n = param.len();
    check_sizes(n, grad, moments, args);
    optimizer(
        optune_emu_optimizer_param,
        launch,
        param,
        grad,
        moments,
        n,
        args,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The emulator itself: launches a GPU refuses are refused, by name.
    #[test]
    fn launches_over_no_blocks_are_refused() {
        let err = sample_rows::<f32>(
            Launch {
                grid: 0,
                block: 256,
            },
            &[],
            4,
            &[],
            SampleArgs {
                temperature: 0.0,
                top_k: 0,
                top_p: 1.0,
                floor_nats: 40.0,
                steps: 32,
            },
        )
        .unwrap_err();
        assert!(
            err.contains("sample_rows_f32") && err.contains("no blocks"),
            "{err}"
        );
    }

    extern "C" {
        fn optune_emu_selftest_block_sum(
            grid: u32,
            block: u32,
            x: *const f32,
            out: *mut f32,
        ) -> c_int;
        fn optune_emu_selftest_warp_sum(
            grid: u32,
            block: u32,
            x: *const f32,
            out: *mut f32,
        ) -> c_int;
        fn optune_emu_selftest_diverged_shuffle(grid: u32, block: u32, out: *mut f32) -> c_int;
        fn optune_emu_selftest_read_past_the_end(
            grid: u32,
            block: u32,
            x: *const f32,
            out: *mut f32,
            n: c_int,
        ) -> c_int;
    }

    /// Shared memory and __syncthreads: a tree reduction per block, over several blocks (each
    /// block reuses the same static shared array, as blocks run one after another).
    #[test]
    fn block_barriers_order_shared_memory() {
        let (grid, block) = (3usize, 256usize);
        let x: Vec<f32> = (0..grid * block).map(|i| (i % 7) as f32).collect();
        let mut out = vec![0f32; grid];
        // SAFETY: x holds grid·block elements, out grid.
        let code = unsafe {
            optune_emu_selftest_block_sum(grid as u32, block as u32, x.as_ptr(), out.as_mut_ptr())
        };
        verdict(code).unwrap();
        let want: Vec<f32> = x.chunks(block).map(|c| c.iter().sum()).collect();
        assert_eq!(out, want);
    }

    /// Warp shuffles: every lane of each warp ends with its warp's total.
    #[test]
    fn shuffles_exchange_within_a_warp() {
        let x: Vec<f32> = (0..64).map(|i| i as f32).collect();
        let mut out = vec![0f32; 64];
        // SAFETY: x and out hold one element per thread of the block.
        let code = unsafe { optune_emu_selftest_warp_sum(1, 64, x.as_ptr(), out.as_mut_ptr()) };
        verdict(code).unwrap();
        let warp = |w: usize| (32 * w..32 * (w + 1)).map(|i| i as f32).sum::<f32>();
        assert_eq!(out[..32], [warp(0); 32]);
        assert_eq!(out[32..], [warp(1); 32]);
    }

    /// A shuffle half its warp never reaches would hang (or worse) on a GPU: an error here.
    #[test]
    fn a_barrier_some_threads_cannot_reach_is_reported() {
        let mut out = vec![0f32; 32];
        // SAFETY: out holds one element per thread of the block.
        let code = unsafe { optune_emu_selftest_diverged_shuffle(1, 32, out.as_mut_ptr()) };
        let err = verdict(code).unwrap_err();
        assert!(
            err.contains("selftest_diverged_shuffle") && err.contains("16 wait at __syncthreads"),
            "{err}"
        );
    }

    /// A read past a buffer's end stops the process with a report naming the kernel (on a GPU:
    /// an illegal address) instead of reading a neighbour's data. The read runs in a child
    /// process: this test binary again, with `CHILD` set.
    #[test]
    fn a_read_past_the_end_is_reported() {
        const CHILD: &str = "OPTUNE_EMULATOR_READ_PAST_THE_END";
        if std::env::var_os(CHILD).is_some() {
            let x = Guarded::new(&[1f32; 32]);
            let mut out = Guarded::new(&[0f32; 32]);
            // SAFETY: none: the kernel reads past x's end on purpose, which ends this process.
            let code =
                unsafe { optune_emu_selftest_read_past_the_end(1, 32, x.ptr(), out.ptr_mut(), 32) };
            println!("the read past the end went unnoticed (launch returned {code})");
            return;
        }
        let child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "tests::a_read_past_the_end_is_reported",
                "--nocapture",
            ])
            .env(CHILD, "1")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&child.stderr);
        assert!(!child.status.success(), "the child finished: {stderr}");
        assert!(
            stderr.contains("selftest_read_past_the_end, block (0, 0, 0), thread (0, 0, 0)")
                && stderr.contains("outside its buffers"),
            "{stderr}"
        );
    }
}

//! A forward pass's new keys and values written into a layer's KV cache in place, the keys turned
//! by their rotary angle on the way: one op (on CUDA one kernel, src/cuda/cache_write.cu) where
//! the differentiable forms take three (the keys' rotary kernel and a scatter each for keys and
//! values). Generation only: it has no gradient.
//!
//! The CPU form below is the specification: the rotation in f32 from the stored values, rounded
//! once to the cache's dtype.

use crate::kernel_args::KernelArg;
use crate::token_tables::{Addressing, HostTables, TokenTables};
use candle_core::{bail, CpuStorage, InplaceOp2, Layout, Result, Tensor, WithDType};

/// Threads of a block of the CUDA kernel.
const THREADS: u32 = 256;

/// Writes each new token's key (turned by its rotary angles) and value at its slot and position
/// (`tables`: its span's `(slot, first, last)`, the position being `last`) of `store [2, blocks,
/// kv_heads, block, d]` (keys, then values; the position found through the tables' block table,
/// or unpaged `[2, slots, kv_heads, capacity, d]`). The keys and values are `kv_heads·d` columns of
/// `rows` (`[.., row_width]`, a row per token: the projections' output) from columns `k_at` and
/// `v_at`; all of the store's dtype.
pub fn write_rotated(
    store: &Tensor,
    rows: &Tensor,
    (k_at, v_at): (usize, usize),
    tables: &TokenTables,
) -> Result<()> {
    let &[two, _, kv_heads, _, d] = store.dims() else {
        bail!(
            "cache_write: store {:?}, expected [2, blocks, kv_heads, block, d]",
            store.dims()
        );
    };
    let tokens = tables.tokens();
    let width = kv_heads * d;
    let row_width = rows.dim(candle_core::D::Minus1)?;
    if two != 2
        || 2 * tables.half() != d
        || rows.elem_count() != tokens * row_width
        || k_at + width > row_width
        || v_at + width > row_width
    {
        bail!(
            "cache_write: store {:?}, rows {:?} (keys at {k_at}, values at {v_at}) for {tokens} \
             tokens of {} angles",
            store.dims(),
            rows.dims(),
            tables.half()
        );
    }
    if tokens == 0 {
        bail!("cache_write: no tokens (a CUDA launch over no blocks fails)");
    }
    let dtype = store.dtype();
    if rows.dtype() != dtype || tables.dtype() != dtype || !crate::kernel_args::kernel_dtype(dtype)
    {
        bail!(
            "cache_write: store {dtype:?} with rows {:?}, angles {:?}",
            rows.dtype(),
            tables.dtype()
        );
    }
    if !store.is_contiguous() {
        bail!("cache_write: the store must be contiguous");
    }
    // Every token's slot and position inside the cache (a GPU's kernel would write elsewhere).
    let (blocks, block) = (store.dims()[1], store.dims()[3]);
    tables.addressing("cache_write", blocks, block)?;
    let op = CacheWrite {
        tables,
        columns: (row_width, k_at, v_at),
    };
    store.inplace_op2(&rows.contiguous()?, &op)
}

struct CacheWrite<'a> {
    tables: &'a TokenTables,
    /// `(row_width, k_at, v_at)`: where the keys and values are in a row.
    columns: (usize, usize, usize),
}

/// The store's sizes: `(blocks, kv_heads, block, d)`.
fn store_dims(l: &Layout) -> Result<(usize, usize, usize, usize)> {
    let &[_, blocks, kv_heads, block, d] = l.dims() else {
        bail!("cache_write: store {:?}", l.dims());
    };
    Ok((blocks, kv_heads, block, d))
}

/// The sizes the kernel's arguments carry: `tokens` rows of `row_width` columns, each token's
/// keys from column `k_at` and values from `v_at`, into a store `[2, blocks, kv_heads, block,
/// head_dim]` whose block table has rows of `table_width` (1 without one).
#[derive(Clone, Copy, Debug)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))] // the CUDA launch and the emulated tests
struct WriteDims {
    tokens: usize,
    blocks: usize,
    table_width: usize,
    kv_heads: usize,
    block: usize,
    head_dim: usize,
    row_width: usize,
    k_at: usize,
    v_at: usize,
}

/// The kernel's arguments (src/cuda/cache_write.cu): the addresses of the store, the rows, the
/// angles `cos`, `sin [tokens, head_dim/2]`, the spans `[tokens, 3]` and the block table
/// `[slots, table_width]` (0, a null pointer, unpaged), then the sizes. The CUDA launch and the
/// emulated tests both pass this list.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))] // the CUDA launch and the emulated tests
fn kernel_args(
    [store, rows, cos, sin, spans, table]: [u64; 6],
    dims: &WriteDims,
) -> Result<Vec<KernelArg>> {
    Ok(vec![
        KernelArg::Pointer(store),
        KernelArg::Pointer(rows),
        KernelArg::Pointer(cos),
        KernelArg::Pointer(sin),
        KernelArg::Pointer(spans),
        KernelArg::Pointer(table),
        KernelArg::U64(dims.tokens as u64),
        KernelArg::int(dims.blocks, "blocks")?,
        KernelArg::int(dims.table_width, "table_width")?,
        KernelArg::int(dims.kv_heads, "kv_heads")?,
        KernelArg::int(dims.block, "block")?,
        KernelArg::int(dims.head_dim, "head_dim")?,
        KernelArg::int(dims.row_width, "row_width")?,
        KernelArg::int(dims.k_at, "k_at")?,
        KernelArg::int(dims.v_at, "v_at")?,
    ])
}

/// The CUDA launch over `pairs` (token, KV head, channel pair) threads: blocks of [`THREADS`]
/// striding over them, at most 8 blocks per 65,535; `(blocks, threads)`.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))] // the CUDA launch and the emulated tests
fn launch_dims(pairs: usize) -> (u32, u32) {
    (
        (pairs.div_ceil(THREADS as usize).min(65_535 * 8) as u32).max(1),
        THREADS,
    )
}

/// The CPU form on slices of one dtype; the spans are checked against the store (`addressing`).
fn write<T: WithDType>(
    store: &mut [T],
    rows: &[T],
    (row_width, k_at, v_at): (usize, usize, usize),
    (HostTables { cos, sin, spans }, addressing): (HostTables, Addressing),
    (blocks, kv_heads, block, d): (usize, usize, usize, usize),
) -> Result<()> {
    let half = d / 2;
    let values = blocks * kv_heads * block * d;
    let f = |x: T| x.to_f64() as f32;
    for (token, span) in spans.chunks_exact(3).enumerate() {
        let (block_id, row) = addressing.at(span[0] as usize, span[2] as usize);
        for head in 0..kv_heads {
            let from = token * row_width + head * d;
            let (k, v) = (&rows[from + k_at..][..d], &rows[from + v_at..][..d]);
            let to = ((block_id * kv_heads + head) * block + row) * d;
            for c in 0..half {
                let (k1, k2) = (f(k[c]), f(k[c + half]));
                let (cs, sn) = (cos[token * half + c], sin[token * half + c]);
                store[to + c] = T::from_f64((k1 * cs - k2 * sn) as f64);
                store[to + c + half] = T::from_f64((k1 * sn + k2 * cs) as f64);
            }
            store[values + to..values + to + d].copy_from_slice(v);
        }
    }
    Ok(())
}

impl InplaceOp2 for CacheWrite<'_> {
    fn name(&self) -> &'static str {
        "cache-write"
    }

    fn cpu_fwd(
        &self,
        store: &mut CpuStorage,
        ls: &Layout,
        rows: &CpuStorage,
        lr: &Layout,
    ) -> Result<()> {
        fn run<T: WithDType>(
            op: &CacheWrite,
            store: &mut [T],
            ls: &Layout,
            (rows, lr): (&CpuStorage, &Layout),
        ) -> Result<()> {
            let rows = crate::storage::contiguous::<T>(rows, lr, "cache_write", "rows")?;
            let tables = op.tables.host("cache_write")?;
            let dims = store_dims(ls)?;
            let addressing = op.tables.addressing("cache_write", dims.0, dims.2)?;
            let store = &mut store[ls.start_offset()..];
            write(store, rows, op.columns, (tables, addressing), dims)
        }
        let rows = (rows, lr);
        match store {
            CpuStorage::F32(s) => run(self, s, ls, rows),
            CpuStorage::BF16(s) => run(self, s, ls, rows),
            CpuStorage::F16(s) => run(self, s, ls, rows),
            other => bail!(
                "cache_write: a {:?} store",
                candle_core::backend::BackendStorage::dtype(other)
            ),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        store: &mut candle_core::CudaStorage,
        ls: &Layout,
        rows: &candle_core::CudaStorage,
        lr: &Layout,
    ) -> Result<()> {
        use crate::kernel_args::cuda::{config, launch as launch_kernel};
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DevicePtrMut, DeviceRepr};
        use candle_core::cuda_backend::CudaDType;
        use candle_core::{CudaStorage, DType};

        const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/cache_write.ptx"));

        fn launch<T: CudaDType + DeviceRepr>(
            op: &CacheWrite,
            name: &str,
            (store, ls): (&mut CudaStorage, &Layout),
            (rows, lr): (&CudaStorage, &Layout),
        ) -> Result<()> {
            let device = store.device().clone();
            let stream = device.cuda_stream();
            let (blocks, kv_heads, block, head_dim) = store_dims(ls)?;
            let (row_width, k_at, v_at) = op.columns;
            let dims = WriteDims {
                tokens: op.tables.tokens(),
                blocks,
                table_width: op.tables.block_table().map_or(1, |t| t.width()),
                kv_heads,
                block,
                head_dim,
                row_width,
                k_at,
                v_at,
            };
            let rows = rows.as_cuda_slice::<T>()?.slice(lr.start_offset()..);
            let mut target = store
                .as_cuda_slice_mut::<T>()?
                .slice_mut(ls.start_offset()..);
            let func = device.get_or_load_custom_func(name, "optune_cache_write", PTX)?;
            let dims_of_launch = launch_dims(dims.tokens * kv_heads * head_dim / 2);
            op.tables.on_device::<T, _>("cache_write", |tables| {
                // The guards order the launch after the buffers' last writes and record it.
                let (store_at, _store) = target.device_ptr_mut(&stream);
                let (rows_at, _rows) = rows.device_ptr(&stream);
                let (cos_at, _cos) = tables.cos.device_ptr(&stream);
                let (sin_at, _sin) = tables.sin.device_ptr(&stream);
                let (spans_at, _spans) = tables.spans.device_ptr(&stream);
                let table = tables.block_table.as_ref().map(|t| t.device_ptr(&stream));
                let table_at = table.as_ref().map_or(0, |(at, _)| *at);
                let buffers = [store_at, rows_at, cos_at, sin_at, spans_at, table_at];
                let args = kernel_args(buffers, &dims)?;
                // SAFETY: the list is the kernel's; the rows hold tokens·row_width elements with
                // the keys and values inside each row, cos and sin tokens·d/2, spans 3·tokens
                // (checked by `write_rotated` and `TokenTables::new`), the store
                // 2·blocks·kv_heads·block·d, the block table slots·table_width entries; every
                // token's slot, position and block are inside them (`TokenTables::addressing`,
                // called by `write_rotated`). The guards live to the end of the closure.
                unsafe { launch_kernel(func.builder(), config(dims_of_launch), &args) }
            })
        }

        // Sizes beyond the kernel's int are refused by `kernel_args`, before the launch.
        let (s, r) = ((store, ls), (rows, lr));
        match s.0.dtype() {
            DType::F32 => launch::<f32>(self, "cache_write_rotated_f32", s, r),
            DType::BF16 => launch::<half::bf16>(self, "cache_write_rotated_bf16", s, r),
            DType::F16 => launch::<half::f16>(self, "cache_write_rotated_f16", s, r),
            other => bail!("cache_write: a {other:?} store on CUDA"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel_args::emulated;
    use candle_core::{DType, Device};
    use optune_cuda_emulator::{in_both_placements, Element, Launch};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    const DTYPES: [DType; 3] = [DType::F32, DType::BF16, DType::F16];

    struct Case {
        slots: usize,
        kv_heads: usize,
        capacity: usize,
        d: usize,
        /// Each token's (slot, position).
        tokens: Vec<(u32, u32)>,
        /// A paged store: `capacity` positions per block, this many blocks, and the block table
        /// `[slots, width]`.
        paged: Option<(usize, Vec<u32>)>,
    }

    impl Case {
        /// Blocks of the store, and entries per slot of its table.
        fn blocks(&self) -> (usize, usize) {
            match &self.paged {
                Some((blocks, table)) => (*blocks, table.len() / self.slots),
                None => (self.slots, 1),
            }
        }

        /// Where slot `slot`'s position `position` is: (block, row).
        fn at(&self, slot: u32, position: u32) -> (usize, usize) {
            let (slot, position) = (slot as usize, position as usize);
            match &self.paged {
                Some((_, table)) => {
                    let width = table.len() / self.slots;
                    let block = table[slot * width + position / self.capacity];
                    (block as usize, position % self.capacity)
                }
                None => (slot, position),
            }
        }

        fn tables(&self, cos: &Tensor, sin: &Tensor) -> TokenTables {
            let tables = TokenTables::new(cos, sin, &self.spans()).unwrap();
            match &self.paged {
                Some((_, table)) => {
                    let width = table.len() / self.slots;
                    let blocks = crate::BlockTable::new(
                        std::sync::Arc::new(table.clone()),
                        width,
                        &Device::Cpu,
                    )
                    .unwrap();
                    tables.with_blocks(blocks).unwrap()
                }
                None => tables,
            }
        }

        fn spans(&self) -> Vec<u32> {
            self.tokens.iter().flat_map(|&(s, p)| [s, 0, p]).collect()
        }

        /// k, v `[1, tokens, kv_heads·d]`, cos, sin `[1, tokens, d/2]`, in `dtype`.
        fn parts(&self, dtype: DType, seed: u64) -> [Tensor; 4] {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let n = self.tokens.len();
            let mut random = |shape: &[usize]| {
                let count: usize = shape.iter().product();
                let data: Vec<f32> = (0..count)
                    .map(|_| rng.random::<f32>() * 2.0 - 1.0)
                    .collect();
                Tensor::from_vec(data, shape, &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap()
            };
            let width = self.kv_heads * self.d;
            [
                random(&[1, n, width]),
                random(&[1, n, width]),
                random(&[1, n, self.d / 2]),
                random(&[1, n, self.d / 2]),
            ]
        }

        /// Rows as a stacked projection gives them: queries' columns (here noise), then k, then
        /// v; with k, v, cos, sin.
        fn inputs(&self, dtype: DType, seed: u64) -> (Tensor, [Tensor; 4]) {
            let [k, v, cos, sin] = self.parts(dtype, seed);
            let queries = self.parts(dtype, seed + 100)[0].clone();
            let rows = Tensor::cat(&[&queries, &k, &v], 2).unwrap();
            (rows, [k, v, cos, sin])
        }

        /// Where k and v start in a row of [`Case::inputs`].
        fn columns(&self) -> (usize, usize) {
            (self.kv_heads * self.d, 2 * self.kv_heads * self.d)
        }

        fn store(&self, dtype: DType) -> Tensor {
            let shape = (2, self.blocks().0, self.kv_heads, self.capacity, self.d);
            Tensor::zeros(shape, dtype, &Device::Cpu).unwrap()
        }
    }

    fn cases() -> Vec<Case> {
        vec![
            // A decode step: one token on each of three slots.
            Case {
                slots: 3,
                kv_heads: 2,
                capacity: 8,
                d: 8,
                // Slot 2's position 7 ends the store: a write past it faults in the emulator.
                tokens: vec![(0, 5), (2, 7), (1, 0)],
                paged: None,
            },
            // A packed prefill: a prompt of 4 on slot 1 beside a decoding token on slot 0.
            Case {
                slots: 2,
                kv_heads: 1,
                capacity: 6,
                d: 16,
                tokens: vec![(1, 0), (1, 1), (1, 2), (1, 3), (0, 4)],
                paged: None,
            },
            // Paged, blocks of 2 positions out of order: a prompt of 5 on slot 1 across three
            // blocks (the last one ends the store) beside decoding tokens of slots 0 and 2.
            Case {
                slots: 3,
                kv_heads: 2,
                capacity: 2,
                d: 8,
                tokens: vec![(0, 3), (1, 0), (1, 1), (1, 2), (1, 3), (1, 4), (2, 1)],
                paged: Some((7, vec![5, 0, 9, 4, 2, 6, 3, 9, 9])),
            },
        ]
    }

    /// The keys land rotated as the rotary embedding turns them, the values as they are, each at
    /// its slot and position; nothing else of the store changes.
    #[test]
    fn keys_land_rotated_and_values_as_they_are() {
        for case in cases() {
            for dtype in DTYPES {
                let (rows, [k, v, cos, sin]) = case.inputs(dtype, 1);
                let store = case.store(dtype);
                let tables = case.tables(&cos, &sin);
                write_rotated(&store, &rows, case.columns(), &tables).unwrap();
                let heads_k = crate::ops::generic::rotary_heads(&k, &cos, &sin, case.kv_heads)
                    .unwrap() // [1, kv_heads, tokens, d]
                    .to_dtype(DType::F32)
                    .unwrap();
                let v = v
                    .reshape((case.tokens.len(), case.kv_heads, case.d))
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap();
                let store = store.to_dtype(DType::F32).unwrap();
                let mut written = 0f32;
                for (i, &(slot, position)) in case.tokens.iter().enumerate() {
                    let (block, row) = case.at(slot, position);
                    for head in 0..case.kv_heads {
                        let at = |kind: usize| -> Vec<f32> {
                            store
                                .get(kind)
                                .unwrap()
                                .get(block)
                                .unwrap()
                                .get(head)
                                .unwrap()
                                .get(row)
                                .unwrap()
                                .to_vec1()
                                .unwrap()
                        };
                        let want_k: Vec<f32> = heads_k
                            .get(0)
                            .unwrap()
                            .get(head)
                            .unwrap()
                            .get(i)
                            .unwrap()
                            .to_vec1()
                            .unwrap();
                        let want_v: Vec<f32> =
                            v.get(i).unwrap().get(head).unwrap().to_vec1().unwrap();
                        // candle's rotary rounds each product in half dtypes; this rounds once.
                        let tolerance = if dtype == DType::F32 { 1e-6 } else { 2e-2 };
                        for (got, want) in at(0).iter().zip(&want_k) {
                            assert!(
                                (got - want).abs() <= tolerance,
                                "{dtype:?} key {got} vs {want}"
                            );
                        }
                        assert_eq!(at(1), want_v, "{dtype:?} value");
                        written += 2.0 * case.d as f32;
                    }
                }
                // Every other element is still zero.
                let nonzero = store
                    .ne(0f32)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap()
                    .sum_all()
                    .unwrap();
                assert!(nonzero.to_scalar::<f32>().unwrap() <= written);
            }
        }
    }

    #[test]
    fn a_token_outside_the_cache_is_refused() {
        let case = Case {
            slots: 2,
            kv_heads: 1,
            capacity: 4,
            d: 4,
            tokens: vec![(0, 4)],
            paged: None,
        };
        let (rows, [_, _, cos, sin]) = case.inputs(DType::F32, 2);
        let store = case.store(DType::F32);
        let tables = case.tables(&cos, &sin);
        let err = write_rotated(&store, &rows, case.columns(), &tables).unwrap_err();
        assert!(err.to_string().contains("position 4 of slot 0"), "{err}");
        // Paged: a block the store does not have.
        let case = Case {
            slots: 1,
            kv_heads: 1,
            capacity: 2,
            d: 4,
            tokens: vec![(0, 3)],
            paged: Some((2, vec![0, 2])),
        };
        let (rows, [_, _, cos, sin]) = case.inputs(DType::F32, 2);
        let store = case.store(DType::F32);
        let tables = case.tables(&cos, &sin);
        let err = write_rotated(&store, &rows, case.columns(), &tables).unwrap_err();
        assert!(err.to_string().contains("reads block 2"), "{err}");
    }

    fn flat<T: candle_core::WithDType>(t: &Tensor) -> Vec<T> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    /// The kernel by the emulator on the case's store, with `launch` and the CUDA path's
    /// argument list: the store it leaves.
    fn kernel_store<T: Element + candle_core::WithDType>(
        case: &Case,
        (rows, cos, sin): (&Tensor, &Tensor, &Tensor),
        launch: Launch,
    ) -> Vec<f32> {
        let store: Vec<T> = flat(&case.store(T::DTYPE));
        let (k_at, v_at) = case.columns();
        let (blocks, table_width) = case.blocks();
        let dims = WriteDims {
            tokens: case.tokens.len(),
            blocks,
            table_width,
            kv_heads: case.kv_heads,
            block: case.capacity,
            head_dim: case.d,
            row_width: rows.dim(2).unwrap(),
            k_at,
            v_at,
        };
        let inputs = [rows, cos, sin].map(flat::<T>);
        let kernel = format!("cache_write_rotated_{}", T::SUFFIX);
        let written = in_both_placements(&kernel, |memory| {
            let store = memory.in_place(&store);
            let [rows, cos, sin] = inputs.each_ref().map(|x| memory.input(x));
            let spans = memory.input(&case.spans());
            let table = match &case.paged {
                Some((_, table)) => memory.input(table),
                None => 0,
            };
            let args = kernel_args([store.address, rows, cos, sin, spans, table], &dims)
                .map_err(|e| e.to_string())?;
            // SAFETY: the buffers hold what the kernel reads and writes for these sizes, and the
            // spans name slots and positions inside the store.
            unsafe { memory.launch(&kernel, launch, &emulated(&args)) }?;
            Ok(memory.read(&store))
        })
        .unwrap();
        written.into_iter().map(|x| x.to_f64() as f32).collect()
    }

    /// The CUDA kernel (src/cuda/cache_write.cu), run by the emulator with the CUDA path's launch
    /// and with one block striding over everything, writes the CPU form's store to the bit.
    #[test]
    fn the_cuda_kernel_writes_the_cpu_forms_store() {
        for case in cases() {
            for dtype in DTYPES {
                let (rows, [_, _, cos, sin]) = case.inputs(dtype, 3);
                let store = case.store(dtype);
                let tables = case.tables(&cos, &sin);
                write_rotated(&store, &rows, case.columns(), &tables).unwrap();
                let inputs = (&rows, &cos, &sin);
                let want: Vec<f32> = flat(&store.to_dtype(DType::F32).unwrap());
                let (grid, block) = launch_dims(case.tokens.len() * case.kv_heads * case.d / 2);
                for launch in [Launch { grid, block }, Launch { grid: 1, block: 32 }] {
                    let got = match dtype {
                        DType::F32 => kernel_store::<f32>(&case, inputs, launch),
                        DType::BF16 => kernel_store::<half::bf16>(&case, inputs, launch),
                        _ => kernel_store::<half::f16>(&case, inputs, launch),
                    };
                    assert_eq!(got, want, "{dtype:?} {launch:?}");
                }
            }
        }
    }
}

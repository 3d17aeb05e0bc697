//! Attention of queries over a KV cache, each query over its own slot's cached positions
//! `first..=last`, read in place: the decode step (one query per slot) and the prefill of packed
//! prompt chunks (many queries per slot, each up to its own position) run the same op.
//!
//! What the masked forms cost instead: at decode every slot reads as many keys as the longest
//! and the values are copied per layer per step; at prefill every prompt of a step is padded to
//! the longest, the slots' keys are gathered into a copy, and a `[prompts, 1, t, keys]` mask is
//! made on the host. Here each query reads its own span once. On CUDA the kernel is
//! src/cuda/cached_attention.cu (online softmax in f32, one block per query and group of query
//! heads sharing a KV head, or per chunk of its span when the blocks are too few to fill the GPU;
//! prompts in tiles: see [`shape_for`]); on the CPU the host decode kernel
//! [`crate::host::attention`], in f32.

use crate::kernel_args::KernelArg;
use crate::token_tables::{HostTables, TokenTables};
use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

/// The queries, each the first `heads·d` columns of its row of `rows` (`[.., row_width]`: the
/// projections as they come, q first, not yet rotated), turned by their rotary angles and
/// attending over `keys`, `values [blocks, kv_heads, block, d]` (a KV cache, the queries' own
/// positions already written; unpaged `[slots, kv_heads, capacity, d]`, else found through the
/// tables' block table), each over its span's `first..=last` positions of its slot (`tables`, a
/// row per query): `[queries, heads, d]`. A query with `last < first` (an idle slot)
/// gets zeros. The query heads of a group share their KV head; scores are `(q · k) · scale`; the
/// rotation, the softmax and the weighted sum of values are in f32 whatever the dtype.
pub fn cached_attention(
    rows: &Tensor,
    heads: usize,
    tables: &TokenTables,
    keys: &Tensor,
    values: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let (blocks, kv_heads, block, d) = keys.dims4()?;
    let queries = tables.tokens();
    // On every device: a GPU's kernels would read another slot's keys, or past the cache.
    tables.addressing("cached_attention", blocks, block)?;
    let row_width = rows.dim(candle_core::D::Minus1)?;
    if rows.elem_count() != queries * row_width
        || heads * d > row_width
        || !heads.is_multiple_of(kv_heads)
        || 2 * tables.half() != d
        || values.dims() != keys.dims()
    {
        bail!(
            "cached_attention: rows {:?} for {queries} queries of {heads} heads with {} angles \
             each against keys {:?} and values {:?}: whole groups of heads within each row",
            rows.dims(),
            tables.half(),
            keys.dims(),
            values.dims()
        );
    }
    if [tables.dtype(), keys.dtype(), values.dtype()]
        .iter()
        .any(|&t| t != rows.dtype())
    {
        bail!(
            "cached_attention: rows {:?} with angles {:?}, cache {:?}",
            rows.dtype(),
            tables.dtype(),
            keys.dtype()
        );
    }
    let op = CachedAttention {
        tables,
        heads,
        scale,
    };
    rows.contiguous()?
        .reshape((queries, row_width))?
        .apply_op3_no_bwd(&keys.contiguous()?, &values.contiguous()?, &op)
}

struct CachedAttention<'a> {
    tables: &'a TokenTables,
    heads: usize,
    scale: f64,
}

/// How the attention kernels are launched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))] // the CUDA launch and the emulated tests
enum AttentionShape {
    /// One block per `group` query heads of a KV head writes their outputs
    /// (cached_attention_[g2_|g4_|wide_]*).
    Whole { group: usize },
    /// `count` blocks per `group` query heads, each over `chunk` positions of the span, write
    /// partial results (cached_attention_split_*) that a second launch merges
    /// (cached_attention_merge_*).
    Chunks {
        count: usize,
        chunk: usize,
        group: usize,
    },
    /// One block per tile of prompt tokens and head (cached_attention_tiled_*), the tiles of
    /// more than one token of [`crate::token_tables::query_tiles`]; then the pass's other tokens
    /// as `Whole { group }` over their list.
    Tiles { group: usize },
}

/// Positions a block's warps take per round (the kernel's WARPS · IN_FLIGHT): chunks are whole
/// rounds.
const ROUND: usize = 16;
/// Blocks of 4 warps per streaming multiprocessor a launch aims for: 16 warps, each with up to
/// 8 rows of keys and values loading, enough to keep an SM's share of the memory busy.
const BLOCKS_PER_PROCESSOR: usize = 4;
/// The fewest positions worth a block of their own (4 rounds).
const MIN_CHUNK: usize = 64;
/// The widest head the narrow kernels take (4 channels a lane), and the widest any takes (8).
const NARROW_HEAD: usize = 128;
/// The most query heads a per-token block attends for (the g4_ kernels).
const MOST_HEADS_PER_BLOCK: usize = 4;
/// The widest head the tiled kernel takes (its shared arrays).
const TILE_HEAD: usize = 128;
#[cfg_attr(not(feature = "cuda"), allow(dead_code))] // the CUDA launch
const WIDEST_HEAD: usize = 256;
/// Threads of a merging block (the kernel's MERGE_THREADS).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
const MERGE_THREADS: u32 = 128;

/// What `OPTUNE_ATTENTION` asks of [`shape_for`] instead of its own choice, for measuring one
/// launch against another on the same GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))] // the CUDA launch and the emulated tests
enum ForcedShape {
    /// `whole`: one block per query head everywhere, prompts included (no tiles, no split, no
    /// heads sharing a block): the launch of before 2026-12-01.
    Whole,
    /// `split:N`: a decode step's spans in N chunks (`split:1`: unsplit, the heads still grouped);
    /// prompts still tiled.
    Split(usize),
}

/// The one place the launch's shape is chosen, for `queries` queries of `heads` query heads
/// `head_dim` wide over `kv_heads` KV heads, whose longest span is `longest` positions, on a GPU
/// of `processors` SMs.
///
/// A pass with prompt tokens (`prompt_tiles`: some tile holds more than one) runs the tiled
/// kernel over them when the heads fit it ([`TILE_HEAD`]): a prompt chunk's tokens share each
/// key and value they load, where the per-token kernels read them once per token. Its other
/// tokens (decoding sequences') go to the per-token kernels, unsplit.
///
/// Otherwise (decoding tokens alone) the per-token kernels, each block attending for as many
/// query heads of one KV head as [`heads_per_block`] allows, so that they share its keys and
/// values (a GQA model's query heads would each read them, from L2 at best: 4× for Mistral-7B,
/// 8× for TinyLlama). Unsplit when those blocks alone make [`BLOCKS_PER_PROCESSOR`] per SM (a
/// decode step of ~16 sequences or more on a 7B without GQA) or no span is longer than
/// [`MIN_CHUNK`]: a split costs a second launch and a pass over the partial results. Else each
/// span is cut into as many chunks as make up that many blocks, none shorter than [`MIN_CHUNK`]:
/// a decode step at batch 1 on a 7B (32 query heads) after a 1,900-token prompt runs 15 blocks
/// per head of 128 positions on an H200 (132 SMs) instead of one block walking all 1,900.
/// `forced` overrides the choice (see [`ForcedShape`]); chunks never go below [`ROUND`]
/// positions.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))] // the CUDA launch and the emulated tests
fn shape_for(
    prompt_tiles: bool,
    head_dim: usize,
    (queries, heads, kv_heads): (usize, usize, usize),
    longest: usize,
    processors: usize,
    forced: Option<ForcedShape>,
) -> AttentionShape {
    let group = heads_per_block(heads, kv_heads, head_dim);
    let blocks = queries * heads / group;
    let wanted = match forced {
        Some(ForcedShape::Whole) => return AttentionShape::Whole { group: 1 },
        _ if prompt_tiles && head_dim <= TILE_HEAD => return AttentionShape::Tiles { group },
        Some(ForcedShape::Split(count)) => count,
        None => {
            (processors * BLOCKS_PER_PROCESSOR / blocks.max(1)).min(longest.div_ceil(MIN_CHUNK))
        }
    };
    if wanted <= 1 || longest <= ROUND {
        return AttentionShape::Whole { group };
    }
    let chunk = longest.div_ceil(wanted).next_multiple_of(ROUND);
    AttentionShape::Chunks {
        count: longest.div_ceil(chunk),
        chunk,
        group,
    }
}

/// How many query heads of one KV head a per-token block attends for: the most of 4, 2 and 1
/// that divides the heads of a KV head, for heads up to [`NARROW_HEAD`] channels (a wider head
/// takes twice the registers per head already); 1 without GQA.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))] // the CUDA launch and the emulated tests
fn heads_per_block(heads: usize, kv_heads: usize, head_dim: usize) -> usize {
    let per_kv_head = heads / kv_heads.max(1);
    if head_dim > NARROW_HEAD {
        return 1;
    }
    (1..=MOST_HEADS_PER_BLOCK)
        .rev()
        .find(|&group| group.is_power_of_two() && per_kv_head.is_multiple_of(group))
        .unwrap_or(1)
}

/// `OPTUNE_ATTENTION` (GPU only): unset or `auto` leaves the launch to [`shape_for`]; `whole`
/// or `split:N` force it (see [`ForcedShape`]). Read once.
#[cfg(feature = "cuda")]
fn forced_shape() -> Result<Option<ForcedShape>> {
    static FORCED: std::sync::OnceLock<std::result::Result<Option<ForcedShape>, String>> =
        std::sync::OnceLock::new();
    FORCED
        .get_or_init(|| parse_forced_shape(&std::env::var("OPTUNE_ATTENTION").unwrap_or_default()))
        .clone()
        .map_err(candle_core::Error::msg)
}

/// The value of `OPTUNE_ATTENTION`: empty or `auto` (none), `whole`, `split:N` with N ≥ 1.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))] // the CUDA launch and the tests
fn parse_forced_shape(value: &str) -> std::result::Result<Option<ForcedShape>, String> {
    let count = value.strip_prefix("split:").map(str::parse::<usize>);
    match (value, count) {
        ("" | "auto", _) => Ok(None),
        ("whole", _) => Ok(Some(ForcedShape::Whole)),
        (_, Some(Ok(count))) if count >= 1 => Ok(Some(ForcedShape::Split(count))),
        _ => Err(format!(
            "OPTUNE_ATTENTION={value}: expected auto, whole or split:N (N chunks per span of a \
             decode step, 1 or more)"
        )),
    }
}

/// The attention kernel for heads `head_dim` wide, launched as `shape`, of the storage type
/// `suffix` (`f32`, `bf16`, `f16`); the merging kernel is `cached_attention_merge_{suffix}`.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))] // the CUDA launch and the emulated tests
fn attention_kernel(shape: AttentionShape, head_dim: usize, suffix: &str) -> Result<String> {
    // The block counts of `launch_dims` assume the group the kernel takes.
    let form = |group| match (head_dim > NARROW_HEAD, group) {
        (true, 1) => Ok("wide_".to_string()),
        (false, 1) => Ok(String::new()),
        (false, 2 | 4) => Ok(format!("g{group}_")),
        _ => Err(candle_core::Error::msg(format!(
            "cached_attention: no kernel for {group} heads of {head_dim} channels to a block"
        ))),
    };
    Ok(match shape {
        AttentionShape::Whole { group } => format!("cached_attention_{}{suffix}", form(group)?),
        AttentionShape::Chunks { group, .. } => {
            format!("cached_attention_split_{}{suffix}", form(group)?)
        }
        AttentionShape::Tiles { .. } => format!("cached_attention_tiled_{suffix}"),
    })
}

/// The list an attention launch reads (its kernel's `tokens` or `tiles` argument).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))] // the CUDA launch and the emulated tests
enum LaunchList {
    /// None (a null pointer): the per-token kernel attends for every query of the pass.
    AllQueries,
    /// The pass's prompt tiles, `[tiles, 2]` ([`TokenTables`]' `prompt_tiles`).
    PromptTiles,
    /// The pass's other tokens, `[n]` (`lone_tokens`).
    LoneTokens,
}

/// One kernel launch of the op: `shape` over `items` (queries or tiles) read from `list`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))] // the CUDA launch and the emulated tests
struct AttentionLaunch {
    shape: AttentionShape,
    items: usize,
    list: LaunchList,
}

/// The attention launches that make the output of a pass of `queries` queries launched as
/// `shape`, with `tiles` prompt tiles and `lone` other tokens (the token tables' lists): tiled,
/// the prompt tiles, then the other tokens by the per-token kernel grouped alike; else one
/// launch over every query (split, the merging launch follows it). Launches over nothing are left
/// out. The CUDA launch and the emulated tests both follow this plan.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))] // the CUDA launch and the emulated tests
fn attention_launches(
    shape: AttentionShape,
    queries: usize,
    tiles: usize,
    lone: usize,
) -> Vec<AttentionLaunch> {
    let launch = |shape, items, list| AttentionLaunch { shape, items, list };
    let launches = match shape {
        AttentionShape::Tiles { group } => vec![
            launch(shape, tiles, LaunchList::PromptTiles),
            launch(
                AttentionShape::Whole { group },
                lone,
                LaunchList::LoneTokens,
            ),
        ],
        AttentionShape::Whole { .. } | AttentionShape::Chunks { .. } => {
            vec![launch(shape, queries, LaunchList::AllQueries)]
        }
    };
    launches.into_iter().filter(|l| l.items > 0).collect()
}

/// The attention kernel's launch for `items` queries of `dims` launched as `shape` (tiles, for
/// [`AttentionShape::Tiles`]): one block of 4 warps per (query, group of heads, chunk) or
/// (tile, head), the heads adjacent (see the kernels); `(blocks, threads)`.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))] // the CUDA launch and the emulated tests
fn launch_dims(shape: AttentionShape, dims: &AttentionDims, items: usize) -> (u32, u32) {
    let blocks = match shape {
        AttentionShape::Whole { group } => items * dims.heads / group,
        AttentionShape::Chunks { count, group, .. } => items * dims.heads / group * count,
        AttentionShape::Tiles { .. } => items * dims.heads,
    };
    (blocks as u32, 4 * 32)
}

/// The sizes of the kernel's buffers: the queries as the first `heads·head_dim` columns of
/// `rows [queries, row_width]`, `keys`/`values [blocks, kv_heads, block, head_dim]` and their
/// block table's rows of `table_width` (1 unpaged).
#[derive(Clone, Copy, Debug)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))] // the CUDA launch and the emulated tests
struct AttentionDims {
    queries: usize,
    row_width: usize,
    heads: usize,
    head_dim: usize,
    kv_heads: usize,
    table_width: usize,
    block: usize,
}

/// The attention kernels' arguments (src/cuda/cached_attention.cu): the addresses of the rows,
/// the angles `cos`, `sin [queries, head_dim/2]`, the keys, the values, the output (`out
/// [queries, heads, head_dim]`, or split the f32 partial results `[queries, heads, count,
/// head_dim + 2]`), the spans `[queries, 3]`, `list`'s: tiled the tiles `[tiles, 2]`, else the
/// queries to attend for (`[n]`; none, a null pointer, for all of them), and the block table
/// (`[slots, table_width]`; a null pointer unpaged); then the sizes, the split (not tiled) and
/// the scale. The CUDA launch and the emulated tests both pass this list.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))] // the CUDA launch and the emulated tests
fn kernel_args(
    buffers: [u64; 7],
    (list, table): (Option<u64>, Option<u64>),
    dims: &AttentionDims,
    shape: AttentionShape,
    scale: f32,
) -> Result<Vec<KernelArg>> {
    let list = match (shape, list) {
        (AttentionShape::Tiles { .. }, None) => {
            bail!("cached_attention: a tiled launch without its tiles")
        }
        (_, list) => list.unwrap_or(0),
    };
    let mut args = buffers.map(KernelArg::Pointer).to_vec();
    args.push(KernelArg::Pointer(list));
    args.push(KernelArg::Pointer(table.unwrap_or(0)));
    for (size, what) in [
        (dims.heads, "heads"),
        (dims.kv_heads, "kv_heads"),
        (dims.table_width, "table_width"),
        (dims.block, "block"),
        (dims.head_dim, "head_dim"),
        (dims.row_width, "row_width"),
    ] {
        args.push(KernelArg::int(size, what)?);
    }
    // Unsplit, one chunk holds any span of the cache.
    match shape {
        AttentionShape::Whole { .. } => args.extend([
            KernelArg::int(1, "splits")?,
            KernelArg::int(dims.table_width * dims.block, "chunk")?,
        ]),
        AttentionShape::Chunks { count, chunk, .. } => args.extend([
            KernelArg::int(count, "splits")?,
            KernelArg::int(chunk, "chunk")?,
        ]),
        AttentionShape::Tiles { .. } => {}
    }
    args.push(KernelArg::F32(scale));
    Ok(args)
}

/// The merging kernel's arguments: the partial results' and the output's addresses, the count of
/// chunks per span and the head width.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))] // the CUDA launch and the emulated tests
fn merge_args([partial, out]: [u64; 2], count: usize, head_dim: usize) -> Result<Vec<KernelArg>> {
    Ok(vec![
        KernelArg::Pointer(partial),
        KernelArg::Pointer(out),
        KernelArg::int(count, "splits")?,
        KernelArg::int(head_dim, "head_dim")?,
    ])
}

/// The positions of a paged cache's slots that a pass's spans read, copied slot-major: the keys
/// and values `[slots read, kv_heads, capacity, d]`, `capacity` the most any reads.
struct GatheredSlots {
    keys: Vec<f32>,
    values: Vec<f32>,
    capacity: usize,
    /// A slot's index among the slots read.
    index: std::collections::HashMap<usize, usize>,
}

fn gathered_slots(
    keys: &[f32],
    values: &[f32],
    spans: &[u32],
    addressing: crate::token_tables::Addressing,
    (kv_heads, d): (usize, usize),
) -> GatheredSlots {
    // Each slot read, in order of appearance, with the positions it needs (0..=its last).
    let mut read: Vec<(usize, usize)> = Vec::new();
    let mut index = std::collections::HashMap::new();
    for span in spans.chunks_exact(3) {
        let [slot, first, last] = [0, 1, 2].map(|i| span[i] as usize);
        if first > last {
            continue;
        }
        let at = *index.entry(slot).or_insert_with(|| {
            read.push((slot, 0));
            read.len() - 1
        });
        read[at].1 = read[at].1.max(last + 1);
    }
    let capacity = read.iter().map(|&(_, len)| len).max().unwrap_or(0);
    let size = read.len() * kv_heads * capacity * d;
    let (mut gathered_keys, mut gathered_values) = (vec![0f32; size], vec![0f32; size]);
    for (at, &(slot, len)) in read.iter().enumerate() {
        for position in 0..len {
            let (block, row) = addressing.at(slot, position);
            for head in 0..kv_heads {
                let from = ((block * kv_heads + head) * addressing.block + row) * d;
                let to = ((at * kv_heads + head) * capacity + position) * d;
                gathered_keys[to..to + d].copy_from_slice(&keys[from..from + d]);
                gathered_values[to..to + d].copy_from_slice(&values[from..from + d]);
            }
        }
    }
    GatheredSlots {
        keys: gathered_keys,
        values: gathered_values,
        capacity,
        index,
    }
}

/// Channel `c` of a head `x [d]` turned by the angles `cos`, `sin [d/2]` (rotate-half layout),
/// in f32 as the kernel turns it.
fn turned(x: &[f32], cos: &[f32], sin: &[f32], c: usize) -> f32 {
    let half = x.len() / 2;
    if c < half {
        x[c] * cos[c] - x[c + half] * sin[c]
    } else {
        x[c - half] * sin[c - half] + x[c] * cos[c - half]
    }
}

impl CustomOp3 for CachedAttention<'_> {
    fn name(&self) -> &'static str {
        "cached-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        lq: &Layout,
        k: &CpuStorage,
        lk: &Layout,
        v: &CpuStorage,
        lv: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (queries, row_width) = lq.shape().dims2()?;
        let (blocks, kv_heads, block, d) = lk.shape().dims4()?;
        let heads = self.heads;
        let read = |s, l, what| crate::storage::floats(s, l, "cached_attention", what);
        let (q_all, keys, values) = (
            read(q, lq, "q")?,
            read(k, lk, "keys")?,
            read(v, lv, "values")?,
        );
        let HostTables { cos, sin, spans } = self.tables.host("cached_attention")?;
        let addressing = self.tables.addressing("cached_attention", blocks, block)?;
        // The host kernel reads each slot's positions in one run: a paged cache's are gathered
        // slot by slot first, the slots renumbered in order of appearance.
        let paged = addressing
            .table
            .is_some()
            .then(|| gathered_slots(&keys, &values, spans, addressing, (kv_heads, d)));
        let (keys, values, capacity) = match &paged {
            Some(g) => (&g.keys[..], &g.values[..], g.capacity),
            None => (&keys[..], &values[..], block),
        };
        // The host kernel takes the live queries only, as rows [heads·d], and scales by 1/√d
        // itself (the model's scale, for which this factor is 1).
        let rescale = (self.scale * (d as f64).sqrt()) as f32;
        let half = d / 2;
        let mut live = Vec::new();
        let mut host_queries = Vec::new();
        let mut rows = Vec::new();
        for query in 0..queries {
            let [slot, first, last] = [0, 1, 2].map(|i| spans[3 * query + i] as usize);
            if last < first {
                continue;
            }
            live.push(query);
            host_queries.push(crate::host::Query {
                slot: paged.as_ref().map_or(slot, |g| g.index[&slot]),
                first,
                position: last,
            });
            let angles = query * half..(query + 1) * half;
            let (cos, sin) = (&cos[angles.clone()], &sin[angles]);
            for head in 0..heads {
                let x = &q_all[query * row_width + head * d..][..d];
                rows.extend((0..d).map(|c| turned(x, cos, sin, c) * rescale));
            }
        }
        let mut attended = vec![0f32; rows.len()];
        let cache = crate::host::LayerCache {
            keys,
            values,
            kv_heads,
            capacity,
        };
        let scale = 1.0 / (d as f32).sqrt();
        crate::host::attention(
            &rows,
            &host_queries,
            (heads, d, scale),
            &cache,
            &mut attended,
        );
        let mut out = vec![0f32; queries * heads * d];
        for (&query, row) in live.iter().zip(attended.chunks_exact(heads * d)) {
            out[query * heads * d..(query + 1) * heads * d].copy_from_slice(row);
        }
        Ok((
            crate::storage::stored_like(out, q),
            Shape::from((queries, heads, d)),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        q: &candle_core::CudaStorage,
        lq: &Layout,
        k: &candle_core::CudaStorage,
        lk: &Layout,
        v: &candle_core::CudaStorage,
        lv: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::kernel_args::cuda::{config, launch as launch_kernel};
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute;
        use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DevicePtrMut, DeviceRepr};
        use candle_core::cuda_backend::CudaDType;
        use candle_core::{CudaStorage, DType};

        const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/cached_attention.ptx"));

        fn launch<T: CudaDType + DeviceRepr>(
            op: &CachedAttention,
            suffix: &str,
            (q, lq): (&CudaStorage, &Layout),
            (k, lk): (&CudaStorage, &Layout),
            (v, lv): (&CudaStorage, &Layout),
        ) -> Result<CudaStorage> {
            let device = q.device().clone();
            let stream = device.cuda_stream();
            let (queries, row_width) = lq.shape().dims2()?;
            let (_, kv_heads, block, head_dim) = lk.shape().dims4()?;
            let dims = AttentionDims {
                queries,
                row_width,
                heads: op.heads,
                head_dim,
                kv_heads,
                table_width: op.tables.block_table().map_or(1, |t| t.width()),
                block,
            };
            let query_heads = dims.queries * dims.heads;
            let processors = stream
                .context()
                .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
                .map_err(|e| candle_core::Error::Cuda(Box::new(e)))?;
            let shape = shape_for(
                op.tables.has_prompt_tiles(),
                head_dim,
                (queries, op.heads, kv_heads),
                op.tables.longest_span(),
                processors.max(1) as usize,
                forced_shape()?,
            );
            let q = q.as_cuda_slice::<T>()?.slice(lq.start_offset()..);
            let k = k.as_cuda_slice::<T>()?.slice(lk.start_offset()..);
            let v = v.as_cuda_slice::<T>()?.slice(lv.start_offset()..);
            // SAFETY: every element is written: by the per-token kernel whole, by the merging one
            // split, by the tiled kernel and the per-token one (its other tokens) tiled; idle
            // queries get zeros.
            let mut out = unsafe { device.alloc::<T>(query_heads * head_dim)? };
            // SAFETY: the split kernel writes every chunk's record in full (an empty chunk's too).
            let mut partial = match shape {
                AttentionShape::Chunks { count, .. } => {
                    Some(unsafe { device.alloc::<f32>(query_heads * count * (head_dim + 2))? })
                }
                AttentionShape::Whole { .. } | AttentionShape::Tiles { .. } => None,
            };
            let module = "optune_cached_attention";
            let scale = op.scale as f32;
            op.tables.on_device::<T, _>("cached_attention", |tables| {
                // The guards order the launches after the buffers' last writes and record them.
                let (q_at, _q) = q.device_ptr(&stream);
                let (cos_at, _cos) = tables.cos.device_ptr(&stream);
                let (sin_at, _sin) = tables.sin.device_ptr(&stream);
                let (k_at, _k) = k.device_ptr(&stream);
                let (v_at, _v) = v.device_ptr(&stream);
                let (spans_at, _spans) = tables.spans.device_ptr(&stream);
                let (out_at, _out) = out.device_ptr_mut(&stream);
                let partial = partial.as_mut().map(|p| p.device_ptr_mut(&stream));
                let tiles = tables
                    .prompt_tiles
                    .as_ref()
                    .map(|t| (t.len() / 2, t.device_ptr(&stream)));
                let lone = tables
                    .lone_tokens
                    .as_ref()
                    .map(|t| (t.len(), t.device_ptr(&stream)));
                let table = tables.block_table.as_ref().map(|t| t.device_ptr(&stream));
                let table_at = table.as_ref().map(|(at, _)| *at);
                let length = |list: &Option<(usize, _)>| list.as_ref().map_or(0, |(n, _)| *n);
                let plan = attention_launches(shape, queries, length(&tiles), length(&lone));
                for launch in plan {
                    let list = match launch.list {
                        LaunchList::AllQueries => None,
                        LaunchList::PromptTiles => tiles.as_ref().map(|(_, (at, _))| *at),
                        LaunchList::LoneTokens => lone.as_ref().map(|(_, (at, _))| *at),
                    };
                    let written_at = match launch.shape {
                        AttentionShape::Chunks { .. } => partial.as_ref().map(|(at, _)| *at),
                        _ => Some(out_at),
                    }
                    .ok_or_else(|| {
                        candle_core::Error::msg("cached_attention: no partial buffer")
                    })?;
                    let buffers = [q_at, cos_at, sin_at, k_at, v_at, written_at, spans_at];
                    let args = kernel_args(buffers, (list, table_at), &dims, launch.shape, scale)?;
                    let kernel = attention_kernel(launch.shape, head_dim, suffix)?;
                    let attend = device.get_or_load_custom_func(&kernel, module, PTX)?;
                    let grid = launch_dims(launch.shape, &dims, launch.items);
                    // SAFETY: the list is the kernel's; the buffers hold queries·row_width
                    // (the rows, each with its query's heads·d columns first), queries·heads·d
                    // (out) or queries·heads·count·(d+2) (partial, f32), queries·d/2 (cos,
                    // sin), blocks·kv_heads·block·d (k, v), 3·queries (spans), 2·tiles (tiles)
                    // or n (a list of queries) elements, each naming queries of the pass,
                    // checked by `cached_attention` and `TokenTables::new`, and the block table
                    // slots·table_width; every slot, position and block the spans read is inside
                    // them (`TokenTables::addressing`). The guards live to the end of the
                    // closure.
                    unsafe { launch_kernel(attend.builder(), config(grid), &args) }?;
                    if let AttentionShape::Chunks { count, .. } = launch.shape {
                        let merge = device.get_or_load_custom_func(
                            &format!("cached_attention_merge_{suffix}"),
                            module,
                            PTX,
                        )?;
                        let args = merge_args([written_at, out_at], count, head_dim)?;
                        let grid = (query_heads as u32, MERGE_THREADS);
                        // SAFETY: the merging kernel's list; partial holds the query_heads·count
                        // records of d+2 the launch above wrote, out query_heads·d elements.
                        unsafe { launch_kernel(merge.builder(), config(grid), &args) }?;
                    }
                }
                Ok(())
            })?;
            Ok(CudaStorage::wrap_cuda_slice(out, device))
        }

        let queries = lq.shape().dims2()?.0;
        let (heads, d) = (self.heads, lk.shape().dims4()?.3);
        if d > WIDEST_HEAD {
            bail!("cached_attention: head width {d} above the kernel's {WIDEST_HEAD}");
        }
        if queries == 0 {
            bail!("cached_attention: no queries (a CUDA launch over no blocks fails)");
        }
        // The grid (at most `longest_span / ROUND` chunks per query head); the sizes passed as
        // ints are checked by `kernel_args`.
        let most_blocks = queries * heads * self.tables.longest_span().div_ceil(ROUND).max(1);
        if most_blocks > i32::MAX as usize {
            bail!("cached_attention: {queries} queries of {heads} heads exceed a grid");
        }
        let (q, k, v) = ((q, lq), (k, lk), (v, lv));
        let out = match q.0.dtype() {
            DType::F32 => launch::<f32>(self, "f32", q, k, v)?,
            DType::BF16 => launch::<half::bf16>(self, "bf16", q, k, v)?,
            DType::F16 => launch::<half::f16>(self, "f16", q, k, v)?,
            other => bail!("cached_attention: {other:?} on CUDA"),
        };
        Ok((out, Shape::from((queries, heads, d))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    pub(super) fn random(shape: &[usize], rng: &mut ChaCha8Rng) -> Tensor {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect();
        Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
    }

    pub(super) fn flat_spans(spans: &[(u32, u32, u32)]) -> Vec<u32> {
        spans.iter().flat_map(|&(s, a, b)| [s, a, b]).collect()
    }

    /// One query `q [heads, d]` over its slot's positions `first..=last` by the masked generic
    /// attention (the form the tensor paths used before): `[heads, d]`.
    fn masked(q: &Tensor, k: &Tensor, v: &Tensor, (slot, first, last): (u32, u32, u32)) -> Tensor {
        let (heads, d) = q.dims2().unwrap();
        let keys = last as usize + 1;
        let mask: Vec<f32> = (0..keys)
            .map(|p| if p >= first as usize { 0.0 } else { -1e9 })
            .collect();
        let mask = Tensor::from_vec(mask, (1, 1, 1, keys), &Device::Cpu)
            .unwrap()
            .to_dtype(q.dtype())
            .unwrap();
        let slot_of = |t: &Tensor| t.narrow(0, slot as usize, 1).unwrap().narrow(2, 0, keys);
        crate::ops::generic::attention(
            &q.reshape((1, heads, 1, d)).unwrap(),
            &slot_of(k).unwrap(),
            &slot_of(v).unwrap(),
            &mask,
            0.35,
        )
        .unwrap()
        .reshape((heads, d))
        .unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// Rotary angles `[batch, steps, d/2]`, varied per query.
    pub(super) fn angles(batch: usize, steps: usize, d: usize) -> (Tensor, Tensor) {
        let theta: Vec<f32> = (0..batch * steps * d / 2)
            .map(|i| (i as f32 * 0.37).sin() * 3.0)
            .collect();
        let theta = Tensor::from_vec(theta, (batch, steps, d / 2), &Device::Cpu).unwrap();
        (theta.cos().unwrap(), theta.sin().unwrap())
    }

    /// Each query of the projections `q [batch, steps, heads·d]`, turned by [`angles`], against
    /// the masked form over the rotary embedding's output, in f32 and bf16.
    fn check_against_masked(q: &Tensor, k: &Tensor, v: &Tensor, spans: &[(u32, u32, u32)]) {
        let (batch, steps, width) = q.dims3().unwrap();
        let d = k.dim(3).unwrap();
        let heads = width / d;
        let (cos, sin) = angles(batch, steps, d);
        for dtype in [DType::F32, DType::BF16] {
            let [q, k, v, cos, sin] = [q, k, v, &cos, &sin].map(|t| t.to_dtype(dtype).unwrap());
            // The queries' columns first in rows that hold more (as a stacked q/k/v projection's).
            let rows = Tensor::cat(&[&q, &q.affine(0.5, 1.0).unwrap()], 2).unwrap();
            let tables = TokenTables::new(&cos, &sin, &flat_spans(spans)).unwrap();
            let got = cached_attention(&rows, heads, &tables, &k, &v, 0.35)
                .unwrap()
                .reshape((batch, steps, heads, d))
                .unwrap();
            assert_eq!(got.dtype(), dtype);
            // [batch, heads, steps, d], rotated (in f32: the kernel turns in f32).
            let rotated = crate::ops::generic::rotary_heads(
                &q.to_dtype(DType::F32).unwrap(),
                &cos.to_dtype(DType::F32).unwrap(),
                &sin.to_dtype(DType::F32).unwrap(),
                heads,
            )
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
            for (query, &span) in spans.iter().enumerate() {
                let (b, s) = (query / steps, query % steps);
                let one = rotated
                    .get(b)
                    .unwrap()
                    .narrow(1, s, 1)
                    .unwrap()
                    .squeeze(1)
                    .unwrap();
                let want = masked(&one, &k, &v, span);
                let diff = max_diff(&got.get(b).unwrap().get(s).unwrap(), &want);
                let tolerance = if dtype == DType::F32 { 1e-6 } else { 1e-2 };
                assert!(diff < tolerance, "{dtype:?} query {query}: {diff}");
            }
        }
    }

    #[test]
    fn one_query_per_slot_attends_over_its_own_span_as_the_masked_form_does() {
        // The decode step's layout: [slots, 1, heads·d], query s on slot s.
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let (slots, heads, kv_heads, capacity, d) = (4, 6, 2, 20, 8);
        let q = random(&[slots, 1, heads * d], &mut rng);
        let k = random(&[slots, kv_heads, capacity, d], &mut rng);
        let v = random(&[slots, kv_heads, capacity, d], &mut rng);
        // Whole prefixes, a sliding window, a single position.
        check_against_masked(&q, &k, &v, &[(0, 0, 13), (1, 0, 2), (2, 9, 17), (3, 5, 5)]);
    }

    #[test]
    fn packed_queries_each_attend_over_their_slot_up_to_their_position() {
        // A packed prefill's layout: [1, tokens, heads·d], tokens of three prompt chunks on
        // slots 2, 0 and 1 (the second after 4 positions its slot held), one windowed.
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let (slots, heads, kv_heads, capacity, d) = (3, 4, 2, 16, 8);
        let spans: Vec<(u32, u32, u32)> = [(2, 0, 0), (2, 0, 1), (2, 0, 2)]
            .into_iter()
            .chain((4..9).map(|p| (0, 0, p)))
            .chain((0..3).map(|p| (1, p.max(1) - 1, p)))
            .collect();
        let q = random(&[1, spans.len(), heads * d], &mut rng);
        let k = random(&[slots, kv_heads, capacity, d], &mut rng);
        let v = random(&[slots, kv_heads, capacity, d], &mut rng);
        check_against_masked(&q, &k, &v, &spans);
    }

    #[test]
    fn an_idle_query_gets_zeros_and_a_span_past_the_cache_is_refused() {
        let mut rng = ChaCha8Rng::seed_from_u64(6);
        let q = random(&[2, 1, 2 * 4], &mut rng);
        let k = random(&[2, 1, 5, 4], &mut rng);
        let (cos, sin) = angles(2, 1, 4);
        let tables =
            |spans: &[(u32, u32, u32)]| TokenTables::new(&cos, &sin, &flat_spans(spans)).unwrap();
        let out = cached_attention(&q, 2, &tables(&[(0, 1, 0), (1, 0, 3)]), &k, &k, 1.0).unwrap();
        let idle: Vec<f32> = out
            .get(0)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(idle.iter().all(|&x| x == 0.0));
        for (spans, what) in [
            ([(0, 0, 5), (1, 0, 3)], "reads position 5 of slot 0"),
            ([(0, 0, 2), (2, 0, 3)], "reads position 3 of slot 2"),
        ] {
            let err = cached_attention(&q, 2, &tables(&spans), &k, &k, 1.0).unwrap_err();
            assert!(err.to_string().contains(what), "{err}");
        }
    }
}

/// The CUDA kernels (src/cuda/cached_attention.cu), run by the emulator with the launches the
/// CUDA path makes, against the CPU form: decode and packed prefill layouts, grouped heads, idle
/// slots, windows, head widths that do not fill the last 32 channels, unsplit and split.
#[cfg(test)]
mod emulated {
    use super::*;
    use crate::kernel_args::emulated;
    use candle_core::{DType, Device};
    use optune_cuda_emulator::{in_both_placements, Element, Launch};
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    /// The kernels by the emulator, with the CUDA path's launches and argument lists.
    fn kernel<T: Element + candle_core::WithDType>(
        dims: AttentionDims,
        shape: AttentionShape,
        [rows, cos, sin, k, v]: [&Tensor; 5],
        (spans, table): (&[u32], Option<&[u32]>),
        scale: f32,
    ) -> Vec<f32> {
        let flat = |t: &Tensor| -> Vec<T> { t.flatten_all().unwrap().to_vec1().unwrap() };
        let inputs = [rows, cos, sin, k, v].map(flat);
        let query_heads = dims.queries * dims.heads;
        let (tiles, lone) = crate::token_tables::tiles_and_lone_tokens(spans);
        let merge_kernel = format!("cached_attention_merge_{}", T::SUFFIX);
        let first_kernel = attention_kernel(shape, dims.head_dim, T::SUFFIX).unwrap();
        let out = in_both_placements(&first_kernel, |memory| {
            let [rows, cos, sin, k, v] = inputs.each_ref().map(|x| memory.input(x));
            let spans = memory.input(spans);
            let table = table.map(|t| memory.input(t));
            let out = memory.output::<T>(query_heads * dims.head_dim);
            let tiles_at = (!tiles.is_empty()).then(|| memory.input(&tiles));
            let lone_at = (!lone.is_empty()).then(|| memory.input(&lone));
            // The CUDA path's plan; a pass without prompt tiles (which the CUDA path never tiles)
            // is all lone tokens.
            for launch in attention_launches(shape, dims.queries, tiles.len() / 2, lone.len()) {
                let list = match launch.list {
                    LaunchList::AllQueries => None,
                    LaunchList::PromptTiles => tiles_at,
                    LaunchList::LoneTokens => lone_at,
                };
                let partial = match launch.shape {
                    AttentionShape::Chunks { count, .. } => Some((
                        count,
                        memory.output::<f32>(query_heads * count * (dims.head_dim + 2)),
                    )),
                    _ => None,
                };
                let written = partial.as_ref().map_or(out.address, |(_, p)| p.address);
                let buffers = [rows, cos, sin, k, v, written, spans];
                let args = kernel_args(buffers, (list, table), &dims, launch.shape, scale)
                    .map_err(|e| e.to_string())?;
                let (grid, block) = launch_dims(launch.shape, &dims, launch.items);
                let kernel = attention_kernel(launch.shape, dims.head_dim, T::SUFFIX)
                    .map_err(|e| e.to_string())?;
                // SAFETY: the buffers hold what the kernel reads and writes for these sizes: the
                // tensors are shaped by `dims`, the spans stay inside the cache, and the tiles or
                // the list name queries of the pass (or no list: all of them).
                unsafe { memory.launch(&kernel, Launch { grid, block }, &emulated(&args)) }?;
                if let Some((count, partial)) = partial {
                    let args = merge_args([partial.address, out.address], count, dims.head_dim)
                        .map_err(|e| e.to_string())?;
                    let merge = Launch {
                        grid: query_heads as u32,
                        block: MERGE_THREADS,
                    };
                    // SAFETY: partial holds the records written above, out the output.
                    unsafe { memory.launch(&merge_kernel, merge, &emulated(&args)) }?;
                }
            }
            Ok(memory.read(&out))
        })
        .unwrap();
        out.into_iter().map(|x| x.to_f64() as f32).collect()
    }

    /// The cache `[slots, kv_heads, capacity, d]` paged in blocks of `block` positions, the
    /// blocks shuffled among `extra` more than the slots need: the store `[blocks, kv_heads,
    /// block, d]` and the block table `[slots, width]`.
    fn paged(cache: &Tensor, block: usize, extra: usize, seed: u64) -> (Tensor, Vec<u32>) {
        let (slots, kv_heads, capacity, d) = cache.dims4().unwrap();
        let width = capacity.div_ceil(block);
        let blocks = slots * width + extra;
        let mut order: Vec<u32> = (0..blocks as u32).collect();
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        for i in (1..blocks).rev() {
            order.swap(i, rand::Rng::random_range(&mut rng, 0..=i));
        }
        let table = order[..slots * width].to_vec();
        let padded = cache
            .pad_with_zeros(2, 0, width * block - capacity)
            .unwrap()
            .reshape((slots, kv_heads, width, block, d))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((slots * width, kv_heads, block, d))
            .unwrap();
        let mut store =
            Tensor::zeros((blocks, kv_heads, block, d), cache.dtype(), cache.device()).unwrap();
        let at = Tensor::new(table.as_slice(), cache.device()).unwrap();
        store = store.index_add(&at, &padded, 0).unwrap();
        (store, table)
    }

    /// `spans` over a cache of `slots × capacity`, queries the first columns of rows
    /// `[queries, row_width]`, by the kernels tiled (heads up to [`TILE_HEAD`]), whole and cut in
    /// each of `splits` (count, chunk), the last two with one query head to a block and with
    /// every larger group of heads the head width and the heads of a KV head allow; each with
    /// the cache as it is and paged (blocks of 8 positions, shuffled), where the CPU form gives
    /// the same bits.
    fn check(
        dims: AttentionDims,
        slots: usize,
        spans: &[(u32, u32, u32)],
        splits: &[(usize, usize)],
        seed: u64,
    ) {
        let most = heads_per_block(dims.heads, dims.kv_heads, dims.head_dim);
        let groups = (0..).map(|k| 1 << k).take_while(|&group| group <= most);
        // Tiled, the other tokens take the largest group (the list is read alike by all).
        let tiled = (dims.head_dim <= TILE_HEAD).then_some(AttentionShape::Tiles { group: most });
        let shapes: Vec<AttentionShape> = tiled
            .into_iter()
            .chain(groups.flat_map(|group| {
                let chunks = splits
                    .iter()
                    .map(move |&(count, chunk)| AttentionShape::Chunks {
                        count,
                        chunk,
                        group,
                    });
                [AttentionShape::Whole { group }].into_iter().chain(chunks)
            }))
            .collect();
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut random = |shape: &[usize]| super::tests::random(shape, &mut rng);
        let q = random(&[dims.queries, dims.row_width]);
        let cache = [slots, dims.kv_heads, dims.block, dims.head_dim];
        let (k, v) = (random(&cache), random(&cache));
        let (cos, sin) = super::tests::angles(1, dims.queries, dims.head_dim);
        let flat_spans = super::tests::flat_spans(spans);
        let scale = 1.0 / (dims.head_dim as f32).sqrt();
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let [q, cos, sin, k, v] = [&q, &cos, &sin, &k, &v].map(|t| t.to_dtype(dtype).unwrap());
            let tables = TokenTables::new(&cos, &sin, &flat_spans).unwrap();
            let cpu_form = |tables: &TokenTables, k: &Tensor, v: &Tensor| -> Vec<f32> {
                cached_attention(&q, dims.heads, tables, k, v, scale as f64)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            };
            let want = cpu_form(&tables, &k, &v);
            let block = 8;
            let ((paged_k, table), (paged_v, _)) =
                (paged(&k, block, 3, seed), paged(&v, block, 3, seed));
            let width = table.len() / slots;
            let blocks =
                crate::BlockTable::new(std::sync::Arc::new(table.clone()), width, &Device::Cpu)
                    .unwrap();
            let paged_tables = TokenTables::new(&cos, &sin, &flat_spans)
                .unwrap()
                .with_blocks(blocks)
                .unwrap();
            assert_eq!(
                cpu_form(&paged_tables, &paged_k, &paged_v),
                want,
                "{dtype:?} paged"
            );
            let paged_dims = AttentionDims {
                table_width: width,
                block,
                ..dims
            };
            let runs = [
                (dims, [&q, &cos, &sin, &k, &v], None),
                (
                    paged_dims,
                    [&q, &cos, &sin, &paged_k, &paged_v],
                    Some(table.as_slice()),
                ),
            ];
            for (&shape, (dims, tensors, table)) in shapes
                .iter()
                .flat_map(|shape| runs.iter().map(move |run| (shape, run)))
            {
                let (dims, lists) = (*dims, (flat_spans.as_slice(), *table));
                let got = match dtype {
                    DType::F32 => kernel::<f32>(dims, shape, *tensors, lists, scale),
                    DType::BF16 => kernel::<half::bf16>(dims, shape, *tensors, lists, scale),
                    _ => kernel::<half::f16>(dims, shape, *tensors, lists, scale),
                };
                // f32: the kernel's online softmax over 4 warps (and chunks) against the CPU's
                // sums; bf16 and f16: both round their f32 result once, so a rounding step apart
                // at most.
                let tolerance = if dtype == DType::F32 { 2e-6 } else { 8e-3 };
                let worst = got
                    .iter()
                    .zip(&want)
                    .map(|(g, w)| (g - w).abs())
                    .fold(0f32, f32::max);
                assert!(
                    worst <= tolerance,
                    "{dims:?} {shape:?} {dtype:?}: off by {worst}"
                );
                // Idle queries are zeros on both.
                let width = dims.heads * dims.head_dim;
                for (query, &(_, first, last)) in spans.iter().enumerate() {
                    if last < first {
                        assert!(got[query * width..(query + 1) * width]
                            .iter()
                            .all(|&x| x == 0.0));
                    }
                }
            }
        }
    }

    #[test]
    fn a_decode_step_matches_the_cpu_form_whole_tiled_and_split() {
        // Five slots, one query each: whole prefixes, a window, one position, an idle slot; four
        // query heads per KV head, 128 channels (the narrow kernels' widest), as Mistral-7B:
        // blocks of one, two and four heads. Split in chunks of 16 (the longest span in 3, the
        // short ones' later chunks empty) and of 32.
        let dims = AttentionDims {
            queries: 5,
            row_width: (8 + 2 * 2) * 128,
            heads: 8,
            head_dim: 128,
            kv_heads: 2,
            table_width: 1,
            block: 40,
        };
        // The last slot's last position ends the cache: a read past it faults in the emulator.
        let spans = [(0, 0, 39), (1, 0, 2), (4, 17, 39), (3, 6, 6), (2, 1, 0)];
        check(dims, 5, &spans, &[(3, 16), (2, 32)], 21);
    }

    #[test]
    fn eight_query_heads_to_a_kv_head_take_blocks_of_four() {
        // TinyLlama's grouping (32 query heads, 4 KV heads) in small: 16 query heads, 2 KV
        // heads, head width 64 (lanes 0..31 hold two channels each); two blocks per KV head.
        let dims = AttentionDims {
            queries: 3,
            row_width: 16 * 64 + 2 * 2 * 64,
            heads: 16,
            head_dim: 64,
            kv_heads: 2,
            table_width: 1,
            block: 24,
        };
        assert_eq!(heads_per_block(16, 2, 64), 4);
        let spans = [(0, 0, 23), (2, 4, 9), (1, 0, 0)];
        check(dims, 3, &spans, &[(2, 16)], 24);
    }

    #[test]
    fn a_packed_prefill_matches_the_cpu_form_whole_and_tiled() {
        // One row of 31 tokens: a 5-token prompt on slot 2, 20 tokens continuing slot 0 after 37
        // cached positions (two tiles, 16 and 4, whose spans take two and three blocks of 32
        // keys), 3 tokens of a windowed prompt on slot 3, 3 decode tokens; two query heads per
        // KV head; head width 80 leaves 16 lanes idle in the last pass over the channels.
        let spans: Vec<(u32, u32, u32)> = (0..5)
            .map(|p| (2, 0, p))
            .chain((37..57).map(|p| (0, 0, p)))
            .chain((30..33).map(|p| (3, p - 9, p)))
            .chain([(1, 0, 20), (4, 0, 7), (5, 2, 59)])
            .collect();
        let dims = AttentionDims {
            queries: spans.len(),
            row_width: 4 * 80 + 2 * 2 * 80,
            heads: 4,
            head_dim: 80,
            kv_heads: 2,
            table_width: 1,
            block: 60,
        };
        check(dims, 6, &spans, &[], 22);
    }

    #[test]
    fn the_widest_head_matches_the_cpu_form_whole_and_split() {
        // Head width 256, the wide kernels' limit (8 channels a lane); a span of 67 positions in
        // 5 chunks, the last holding 3.
        let dims = AttentionDims {
            queries: 4,
            row_width: 3 * 256,
            heads: 2,
            head_dim: 256,
            kv_heads: 1,
            table_width: 1,
            block: 70,
        };
        let spans = [(1, 0, 66), (1, 0, 8), (0, 0, 0), (0, 3, 2)];
        check(dims, 2, &spans, &[(5, 16)], 23);
    }

    #[test]
    fn the_shape_is_chosen_by_the_tokens_and_how_few_blocks_the_query_heads_make() {
        // An H200 (132 SMs); a 7B's 32 query heads of 128 channels per sequence; decode steps.
        let h200 = |queries, longest| shape_for(false, 128, (queries, 32, 32), longest, 132, None);
        let whole = AttentionShape::Whole { group: 1 };
        let chunks = |count, chunk, group| AttentionShape::Chunks {
            count,
            chunk,
            group,
        };
        // Batch 1 after a 1,900-token prompt: 15 chunks of 128 (480 blocks), not 32 blocks.
        assert_eq!(h200(1, 1900), chunks(15, 128, 1));
        // A short span: at most one chunk per 64 positions.
        assert_eq!(h200(1, 130), chunks(3, 48, 1));
        // Too short to split, or enough query heads already (batch 16: 512 blocks).
        assert_eq!(h200(1, 64), whole);
        assert_eq!(h200(16, 1900), whole);
        // GQA: Mistral-7B (32 query heads, 8 KV heads) takes blocks of 4 heads, so batch 16
        // makes 128 blocks and is split in 4 (512 blocks); batch 64, 512 blocks, is not.
        let mistral = |queries| shape_for(false, 128, (queries, 32, 8), 1900, 132, None);
        assert_eq!(mistral(16), chunks(4, 480, 4));
        assert_eq!(mistral(64), AttentionShape::Whole { group: 4 });
        // Heads per block: the most of 4, 2, 1 that divides a KV head's; 1 past 128 channels.
        for (heads, kv_heads, head_dim, group) in [
            (32, 4, 64, 4),
            (32, 8, 128, 4),
            (12, 2, 128, 2),
            (9, 3, 64, 1),
            (32, 32, 128, 1),
            (16, 8, 256, 1),
        ] {
            assert_eq!(heads_per_block(heads, kv_heads, head_dim), group);
        }
        // Forced: as many chunks as asked, none under 16 positions; 1 is unsplit; `whole` is
        // one head to a block, unsplit.
        let forced = |count| {
            shape_for(
                false,
                128,
                (16, 32, 32),
                100,
                132,
                Some(ForcedShape::Split(count)),
            )
        };
        assert_eq!(forced(1), whole);
        assert_eq!(forced(4), chunks(4, 32, 1));
        assert_eq!(forced(50), chunks(7, 16, 1));
        assert_eq!(
            shape_for(false, 128, (1, 32, 8), 1900, 132, Some(ForcedShape::Whole)),
            whole
        );
        // OPTUNE_ATTENTION's values.
        assert_eq!(parse_forced_shape(""), Ok(None));
        assert_eq!(parse_forced_shape("auto"), Ok(None));
        assert_eq!(parse_forced_shape("whole"), Ok(Some(ForcedShape::Whole)));
        assert_eq!(
            parse_forced_shape("split:4"),
            Ok(Some(ForcedShape::Split(4)))
        );
        for bad in ["split:0", "split:", "split:x", "tiles", "Whole"] {
            let err = parse_forced_shape(bad).unwrap_err();
            assert!(err.contains("expected auto, whole or split:N"), "{err}");
        }
        // A pass with a prompt chunk: tiled when the heads fit the tiles, unless forced whole.
        // The pass's decoding tokens then go to the per-token blocks of as many heads as allowed.
        assert_eq!(
            shape_for(true, 128, (2048, 32, 32), 2048, 132, None),
            AttentionShape::Tiles { group: 1 }
        );
        assert_eq!(
            shape_for(true, 64, (1, 32, 4), 1900, 132, Some(ForcedShape::Split(4))),
            AttentionShape::Tiles { group: 4 }
        );
        assert_eq!(
            shape_for(true, 64, (2048, 32, 4), 2048, 132, Some(ForcedShape::Whole)),
            whole
        );
        assert_eq!(shape_for(true, 256, (2048, 8, 8), 2048, 132, None), whole);
    }

    #[test]
    fn the_launch_plan_covers_every_query_once_and_refuses_what_no_kernel_takes() {
        let launch = |shape, items, list| AttentionLaunch { shape, items, list };
        // A pass that prefills: its 3 prompt tiles, then its 5 other tokens grouped; none left.
        let tiled = AttentionShape::Tiles { group: 4 };
        assert_eq!(
            attention_launches(tiled, 40, 3, 5),
            [
                launch(tiled, 3, LaunchList::PromptTiles),
                launch(
                    AttentionShape::Whole { group: 4 },
                    5,
                    LaunchList::LoneTokens
                ),
            ]
        );
        assert_eq!(
            attention_launches(tiled, 32, 2, 0),
            [launch(tiled, 2, LaunchList::PromptTiles)]
        );
        let split = AttentionShape::Chunks {
            count: 3,
            chunk: 64,
            group: 2,
        };
        assert_eq!(
            attention_launches(split, 7, 0, 0),
            [launch(split, 7, LaunchList::AllQueries)]
        );
        // A wide head takes one head to a block only; a tiled launch takes its tiles.
        let err = attention_kernel(AttentionShape::Whole { group: 2 }, 256, "bf16").unwrap_err();
        assert!(
            err.to_string().contains("no kernel for 2 heads of 256"),
            "{err}"
        );
        assert_eq!(
            attention_kernel(AttentionShape::Whole { group: 4 }, 128, "bf16").unwrap(),
            "cached_attention_g4_bf16"
        );
        let dims = AttentionDims {
            queries: 2,
            row_width: 64,
            heads: 2,
            head_dim: 32,
            kv_heads: 1,
            table_width: 1,
            block: 8,
        };
        let err = kernel_args([1; 7], (None, None), &dims, tiled, 1.0).unwrap_err();
        assert!(err.to_string().contains("without its tiles"), "{err}");
        let whole = AttentionShape::Whole { group: 2 };
        let args = kernel_args([1; 7], (None, None), &dims, whole, 1.0).unwrap();
        assert_eq!(args[7..9], [KernelArg::Pointer(0), KernelArg::Pointer(0)]);
    }
}

//! What the KV-cache ops ([`crate::cache_write`], [`crate::cached_attention`]) take besides their
//! operands, a row per new token of a forward pass: its rotary angles and its span, and, for a
//! paged cache, where each slot's positions are ([`BlockTable`]). A pass makes it once and every
//! layer's ops read it; on the CPU its elements are read out of the tensors
//! once, by the first op that needs them. On a GPU, a pass that holds prompt tokens also lists
//! them in tiles (see [`query_tiles`]) for the tiled attention, and its other tokens for the
//! per-token attention.

use candle_core::{bail, DType, Device, Result, Storage, Tensor};
use std::sync::{Arc, OnceLock};

/// Where the positions of a paged KV cache's slots are. The cache holds blocks of `block`
/// positions (a layer's store `[2, blocks, kv_heads, block, d]`); slot `s`'s position `p` is row
/// `p % block` of block `table[s · width + p / block]`. Entries past a slot's written positions
/// are never read. Without a table the ops take block `s` as slot `s`'s whole span (the store
/// `[2, slots, kv_heads, capacity, d]`).
#[derive(Clone)]
pub struct BlockTable {
    /// `[slots, width]` u32, on the cache's device.
    table: Tensor,
    /// The same, on the host: the CPU forms and the bounds checks read it.
    host: Arc<Vec<u32>>,
    width: usize,
}

impl BlockTable {
    /// `host`: `[slots, width]` block indices, flat; uploaded to `device`.
    pub fn new(host: Arc<Vec<u32>>, width: usize, device: &Device) -> Result<Self> {
        if width == 0 || host.is_empty() || !host.len().is_multiple_of(width) {
            bail!(
                "block table: {} entries in rows of {width}: whole rows, at least one",
                host.len()
            );
        }
        let table = Tensor::from_slice(host.as_slice(), (host.len() / width, width), device)?;
        Ok(Self { table, host, width })
    }

    /// The table on its device with `rows` of it brought up to `host`: one upload and one
    /// scatter for all of them, instead of the whole table's upload, for the few slots a step
    /// (re)fills.
    pub fn with_rows(&self, host: Arc<Vec<u32>>, rows: &[usize]) -> Result<Self> {
        let width = self.width;
        if host.len() != self.host.len() || rows.iter().any(|&r| r >= self.slots()) {
            bail!(
                "block table: {} entries replace {}, rows {rows:?} of {}",
                host.len(),
                self.host.len(),
                self.slots()
            );
        }
        if !rows.is_empty() {
            // [2, rows, width]: the rows' entries, then each row's index as often.
            let mut upload = Vec::with_capacity(2 * rows.len() * width);
            for &row in rows {
                upload.extend_from_slice(&host[row * width..(row + 1) * width]);
            }
            for &row in rows {
                upload.extend(std::iter::repeat_n(row as u32, width));
            }
            let both = Tensor::from_vec(upload, (2, rows.len(), width), self.table.device())?;
            self.table.scatter_set(&both.get(1)?, &both.get(0)?, 0)?;
        }
        Ok(Self {
            table: self.table.clone(),
            host,
            width,
        })
    }

    pub fn slots(&self) -> usize {
        self.host.len() / self.width
    }

    /// Entries per slot.
    pub fn width(&self) -> usize {
        self.width
    }

    pub(crate) fn host(&self) -> &[u32] {
        &self.host
    }
}

/// How the KV-cache ops find a slot's position `p` in a store `[2, blocks, kv_heads, block, d]`
/// (`blocks`, `block` read off the store): through `table` (paged) or as block `slot`.
#[derive(Clone, Copy)]
pub(crate) struct Addressing<'a> {
    pub table: Option<&'a [u32]>,
    pub width: usize,
    pub block: usize,
}

impl Addressing<'_> {
    /// The block that holds slot `slot`'s position `position`, and the row within it.
    pub fn at(&self, slot: usize, position: usize) -> (usize, usize) {
        match self.table {
            Some(table) => (
                table[slot * self.width + position / self.block] as usize,
                position % self.block,
            ),
            None => (slot, position),
        }
    }

    /// Positions a slot may hold.
    pub fn positions(&self) -> usize {
        self.width * self.block
    }
}

pub struct TokenTables {
    cos: Tensor,
    sin: Tensor,
    spans: Tensor,
    /// The spans as given, `[tokens, 3]` flat.
    host_spans: Vec<u32>,
    /// The most positions any token attends over, found once for every layer's launches.
    longest_span: usize,
    /// The tiles of [`query_tiles`] that hold more than one token, `[tiles, 2]`, on a GPU when
    /// there are any (a prompt chunk is in the pass); none in a pass of decoding tokens alone, nor
    /// on the CPU.
    prompt_tiles: Option<Tensor>,
    /// With `prompt_tiles`, the pass's other tokens (decoding sequences', idle slots'), `[n]`,
    /// when there are any.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))] // the CUDA launch
    lone_tokens: Option<Tensor>,
    /// The angles widened to f32, read out of `cos` and `sin` by the first CPU op that needs
    /// them.
    host_angles: OnceLock<[Vec<f32>; 2]>,
    /// Where a paged cache's positions are; `None`: block `s` is slot `s`'s.
    blocks: Option<BlockTable>,
    /// The store sizes `(blocks, block)` every span was checked against, by the first op (the
    /// layers' stores are alike: one walk of the spans per pass).
    checked: OnceLock<(usize, usize)>,
}

/// The tables' elements on the CPU, the angles widened to f32 (exactly).
#[derive(Clone, Copy)]
pub(crate) struct HostTables<'a> {
    pub cos: &'a [f32],
    pub sin: &'a [f32],
    pub spans: &'a [u32],
}

impl TokenTables {
    /// `cos`, `sin`: token `i`'s rotary angles (rotate-half layout), rows of `[.., d/2]` of one
    /// float dtype; `spans`: token `i`'s `(slot, first, last)` positions at `3i..3i+3`,
    /// inclusive, the last being its own (where its key and value are written). The spans go to
    /// the angles' device; their host copy is kept (the GPU's launches are sized by them).
    pub fn new(cos: &Tensor, sin: &Tensor, spans: &[u32]) -> Result<Self> {
        let tokens = spans.len() / 3;
        let half = cos.dim(candle_core::D::Minus1)?;
        if spans.len() != 3 * tokens
            || cos.elem_count() != tokens * half
            || sin.dims() != cos.dims()
            || sin.dtype() != cos.dtype()
        {
            bail!(
                "token tables: cos {:?} {:?}, sin {:?} {:?}, {} span values: a row each per token",
                cos.dims(),
                cos.dtype(),
                sin.dims(),
                sin.dtype(),
                spans.len()
            );
        }
        // Only the GPU's attention reads them (the CPU's host kernel walks each token's span).
        let (tiles, lone) = match cos.device().is_cuda() {
            true => tiles_and_lone_tokens(spans),
            false => Default::default(),
        };
        let upload = |values: &[u32], shape: &[usize]| match values.is_empty() {
            true => Ok(None),
            false => Tensor::from_slice(values, shape, cos.device()).map(Some),
        };
        let prompt_tiles = upload(&tiles, &[tiles.len() / 2, 2])?;
        let lone_tokens = match prompt_tiles {
            Some(_) => upload(&lone, &[lone.len()])?,
            None => None,
        };
        Ok(Self {
            cos: cos.contiguous()?,
            sin: sin.contiguous()?,
            spans: Tensor::from_slice(spans, (tokens, 3), cos.device())?,
            host_spans: spans.to_vec(),
            longest_span: spans
                .chunks_exact(3)
                .map(|span| (span[2] as usize + 1).saturating_sub(span[1] as usize))
                .max()
                .unwrap_or(0),
            prompt_tiles,
            lone_tokens,
            host_angles: OnceLock::new(),
            blocks: None,
            checked: OnceLock::new(),
        })
    }

    /// These tables for a paged cache: the ops find each slot's positions through `blocks`.
    pub fn with_blocks(mut self, blocks: BlockTable) -> Result<Self> {
        if !blocks.table.device().same_device(self.cos.device()) {
            bail!("token tables: the block table is not on the angles' device");
        }
        self.blocks = Some(blocks);
        Ok(self)
    }

    /// How the ops address a store of `block` positions per block (its dim 3) and `blocks`
    /// blocks (its dim 1), checked against every span: each token's slot has a row of the table
    /// (or a block of its own, unpaged), and each position it reads is inside its slot's
    /// positions and names a block of the store. `op` names the op in the error.
    pub(crate) fn addressing(
        &self,
        op: &str,
        blocks: usize,
        block: usize,
    ) -> Result<Addressing<'_>> {
        let addressing = match &self.blocks {
            Some(table) => Addressing {
                table: Some(table.host()),
                width: table.width(),
                block,
            },
            None => Addressing {
                table: None,
                width: 1,
                block,
            },
        };
        if self.checked.get() == Some(&(blocks, block)) {
            return Ok(addressing);
        }
        let slots = match &self.blocks {
            Some(table) => table.slots(),
            None => blocks,
        };
        for (token, span) in self.host_spans.chunks_exact(3).enumerate() {
            let [slot, first, last] = [0, 1, 2].map(|i| span[i] as usize);
            if first > last {
                continue;
            }
            if slot >= slots || last >= addressing.positions() {
                bail!(
                    "{op}: token {token} reads position {last} of slot {slot}, outside the \
                     cache's {slots} slots of {} positions",
                    addressing.positions()
                );
            }
            if let Some(table) = addressing.table {
                let row = &table[slot * addressing.width..][..last / block + 1];
                if let Some(bad) = row.iter().find(|&&b| b as usize >= blocks) {
                    bail!(
                        "{op}: token {token} of slot {slot} reads block {bad}, outside the \
                         cache's {blocks} blocks"
                    );
                }
            }
        }
        let _ = self.checked.set((blocks, block));
        Ok(addressing)
    }

    /// The block table, when the cache is paged.
    #[cfg(feature = "cuda")]
    pub(crate) fn block_table(&self) -> Option<&BlockTable> {
        self.blocks.as_ref()
    }

    pub fn tokens(&self) -> usize {
        self.spans.dims()[0]
    }

    /// Angles per token: half the head width.
    pub fn half(&self) -> usize {
        self.cos.elem_count() / self.tokens().max(1)
    }

    pub fn dtype(&self) -> DType {
        self.cos.dtype()
    }

    /// Whether the pass holds prompt tokens in tiles of more than one, on a GPU (see
    /// `query_tiles`).
    pub fn has_prompt_tiles(&self) -> bool {
        self.prompt_tiles.is_some()
    }

    /// The most positions any token attends over (`last - first + 1`; 0 when every span is
    /// empty).
    pub fn longest_span(&self) -> usize {
        self.longest_span
    }

    /// The elements on the CPU (CPU tensors only); `op` names the op in the error.
    pub(crate) fn host(&self, op: &str) -> Result<HostTables<'_>> {
        let [cos, sin] = match self.host_angles.get() {
            Some(angles) => angles,
            None => {
                let floats = |t: &Tensor, what| -> Result<Vec<f32>> {
                    let (storage, layout) = t.storage_and_layout();
                    match &*storage {
                        Storage::Cpu(s) => {
                            Ok(crate::storage::floats(s, layout, op, what)?.into_owned())
                        }
                        _ => bail!("{op}: the {what} are not on the CPU"),
                    }
                };
                let angles = [floats(&self.cos, "cosines")?, floats(&self.sin, "sines")?];
                self.host_angles.get_or_init(|| angles)
            }
        };
        Ok(HostTables {
            cos,
            sin,
            spans: &self.host_spans,
        })
    }

    /// `f` of the tables' device slices (GPU tensors only, the angles of dtype `T`), held for the
    /// length of the call; `op` names the op in the error.
    #[cfg(feature = "cuda")]
    pub(crate) fn on_device<T, R>(
        &self,
        op: &str,
        f: impl FnOnce(DeviceTables<'_, T>) -> Result<R>,
    ) -> Result<R>
    where
        T: candle_core::cuda_backend::CudaDType,
    {
        let (cos_storage, cos_layout) = self.cos.storage_and_layout();
        let (sin_storage, sin_layout) = self.sin.storage_and_layout();
        let (spans_storage, spans_layout) = self.spans.storage_and_layout();
        let tiles_guard = self.prompt_tiles.as_ref().map(|t| t.storage_and_layout());
        let lone_guard = self.lone_tokens.as_ref().map(|t| t.storage_and_layout());
        let table_guard = self.blocks.as_ref().map(|t| t.table.storage_and_layout());
        let (Storage::Cuda(cos), Storage::Cuda(sin), Storage::Cuda(spans)) =
            (&*cos_storage, &*sin_storage, &*spans_storage)
        else {
            bail!("{op}: the rotary angles or the spans are not on the GPU");
        };
        /// A list's device slice, when the tables hold that list.
        fn list<'a>(
            op: &str,
            guard: &'a Option<(candle_core::StorageRef<'_>, &candle_core::Layout)>,
            what: &str,
        ) -> Result<Option<candle_core::cuda_backend::cudarc::driver::CudaView<'a, u32>>> {
            match guard {
                None => Ok(None),
                Some((storage, layout)) => match &**storage {
                    Storage::Cuda(list) => Ok(Some(
                        list.as_cuda_slice::<u32>()?.slice(layout.start_offset()..),
                    )),
                    _ => bail!("{op}: the {what} are not on the GPU"),
                },
            }
        }
        f(DeviceTables {
            cos: cos.as_cuda_slice::<T>()?.slice(cos_layout.start_offset()..),
            sin: sin.as_cuda_slice::<T>()?.slice(sin_layout.start_offset()..),
            spans: spans
                .as_cuda_slice::<u32>()?
                .slice(spans_layout.start_offset()..),
            prompt_tiles: list(op, &tiles_guard, "prompt tiles")?,
            lone_tokens: list(op, &lone_guard, "lone tokens")?,
            block_table: list(op, &table_guard, "block table")?,
        })
    }
}

/// The tables' device slices, for a kernel launch.
#[cfg(feature = "cuda")]
pub(crate) struct DeviceTables<'a, T> {
    pub cos: candle_core::cuda_backend::cudarc::driver::CudaView<'a, T>,
    pub sin: candle_core::cuda_backend::cudarc::driver::CudaView<'a, T>,
    pub spans: candle_core::cuda_backend::cudarc::driver::CudaView<'a, u32>,
    pub prompt_tiles: Option<candle_core::cuda_backend::cudarc::driver::CudaView<'a, u32>>,
    pub lone_tokens: Option<candle_core::cuda_backend::cudarc::driver::CudaView<'a, u32>>,
    /// A paged cache's block table, `[slots, width]`.
    pub block_table: Option<candle_core::cuda_backend::cudarc::driver::CudaView<'a, u32>>,
}

/// Tokens per tile (the tiled kernel's TILE_QUERIES).
pub(crate) const TILE_QUERIES: usize = 16;

/// The tokens of a pass, in order, as tiles `(first token, count)` flat: up to [`TILE_QUERIES`]
/// consecutive tokens of one slot, each at the position after the one before (a prompt chunk's
/// tokens, which attend over nearly the same positions); a token of an empty span (an idle slot)
/// is a tile of its own.
pub(crate) fn query_tiles(spans: &[u32]) -> Vec<u32> {
    let mut tiles: Vec<u32> = Vec::new();
    let mut previous: Option<&[u32]> = None;
    for (token, span) in spans.chunks_exact(3).enumerate() {
        let follows = match (previous, tiles.last()) {
            (Some(before), Some(&count)) => {
                count < TILE_QUERIES as u32
                    && span[0] == before[0]
                    && span[1] <= span[2]
                    && before[1] <= before[2]
                    && span[2] == before[2] + 1
            }
            _ => false,
        };
        match follows {
            true => *tiles.last_mut().expect("a tile to extend") += 1,
            false => tiles.extend([token as u32, 1]),
        }
        previous = Some(span);
    }
    tiles
}

/// [`query_tiles`] of the spans parted: the tiles of more than one token (flat `(first token,
/// count)` pairs; the tiled attention kernel's) and the tokens of the others, in order (the
/// per-token kernel's).
pub(crate) fn tiles_and_lone_tokens(spans: &[u32]) -> (Vec<u32>, Vec<u32>) {
    let mut tiles = Vec::new();
    let mut lone = Vec::new();
    for tile in query_tiles(spans).chunks_exact(2) {
        match tile[1] {
            1 => lone.push(tile[0]),
            _ => tiles.extend_from_slice(tile),
        }
    }
    (tiles, lone)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows brought up to date on the device equal the host's; the others stay.
    #[test]
    fn a_block_tables_changed_rows_reach_its_device_copy() {
        let host: Vec<u32> = (0..12).collect();
        let table = BlockTable::new(Arc::new(host.clone()), 3, &Device::Cpu).unwrap();
        let mut changed = host.clone();
        changed[3..6].copy_from_slice(&[40, 41, 42]);
        changed[9..12].copy_from_slice(&[90, 91, 92]);
        changed[0] = 77; // not sent: row 0 is not named
        let table = table.with_rows(Arc::new(changed), &[3, 1]).unwrap();
        let device: Vec<u32> = table.table.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(device, [0, 1, 2, 40, 41, 42, 6, 7, 8, 90, 91, 92]);
        assert!(table.with_rows(Arc::new(host), &[4]).is_err());
    }

    #[test]
    fn consecutive_tokens_of_a_slot_share_tiles_of_up_to_sixteen() {
        // 20 prompt tokens on slot 2 from position 5 (windowed from the 12th), 2 on slot 0, a
        // decoding token of slot 1, an idle slot, a token of slot 0 at a position that does not
        // follow.
        let mut spans: Vec<[u32; 3]> = (5..25).map(|p| [2, p.max(16) - 11, p]).collect();
        spans.extend([[0, 0, 3], [0, 0, 4], [1, 0, 9], [3, 1, 0], [0, 0, 7]]);
        let flat: Vec<u32> = spans.concat();
        assert_eq!(
            query_tiles(&flat),
            [0, 16, 16, 4, 20, 2, 22, 1, 23, 1, 24, 1]
        );
        assert_eq!(
            tiles_and_lone_tokens(&flat),
            (vec![0, 16, 16, 4, 20, 2], vec![22, 23, 24])
        );
    }
}

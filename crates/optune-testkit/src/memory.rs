//! Memory tests: a heap that counts its live bytes and their high-water mark, and a model whose
//! weights outweigh everything else a process holds.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The system allocator, counting the bytes live on the heap and their high-water mark (the
/// process RSS cannot show what a call holds: the allocator keeps freed pages for reuse). A test
/// file installs it with `#[global_allocator] static A: CountingAllocator = CountingAllocator;`
/// and should hold a single test, since the counts are the whole process's.
pub struct CountingAllocator;

static HEAP_NOW: AtomicUsize = AtomicUsize::new(0);
static HEAP_PEAK: AtomicUsize = AtomicUsize::new(0);

impl CountingAllocator {
    fn grew(by: usize) {
        let now = HEAP_NOW.fetch_add(by, Ordering::Relaxed) + by;
        HEAP_PEAK.fetch_max(now, Ordering::Relaxed);
    }

    /// Heap bytes live now.
    pub fn live() -> usize {
        HEAP_NOW.load(Ordering::Relaxed)
    }

    /// Starts a new high-water mark at the heap's current size; returns that size.
    pub fn reset_peak() -> usize {
        let now = Self::live();
        HEAP_PEAK.store(now, Ordering::Relaxed);
        now
    }

    /// The heap's high-water mark since the last [`CountingAllocator::reset_peak`].
    pub fn peak() -> usize {
        HEAP_PEAK.load(Ordering::Relaxed)
    }
}

// SAFETY: every call is the system allocator's, with the same arguments; only counters are added.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            Self::grew(layout.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            Self::grew(layout.size());
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        unsafe { System.dealloc(p, layout) };
        HEAP_NOW.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let q = unsafe { System.realloc(p, layout, new_size) };
        if !q.is_null() {
            HEAP_NOW.fetch_sub(layout.size(), Ordering::Relaxed);
            Self::grew(new_size);
        }
        q
    }
}

/// Writes to `dir` a copy of `testdata/models/tiny-llama` (its tokenizer, vocabulary of 512 and
/// float32 config) widened to `hidden` × `intermediate` with `layers` layers and random f32
/// weights (norms 1), so its weights dwarf the tokenizer and the binary. `shapes` gives every
/// weight's name and shape for the config text it is passed (optune_model's
/// `llama_weight_shapes`). Returns the bytes of the weights.
pub fn write_wide_llama(
    dir: &Path,
    hidden: usize,
    intermediate: usize,
    layers: usize,
    shapes: impl FnOnce(&str) -> Vec<(String, Vec<usize>)>,
) -> usize {
    let tiny = crate::workspace_root().join("testdata/models/tiny-llama");
    std::fs::create_dir_all(dir).unwrap();
    for entry in std::fs::read_dir(&tiny).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tiny.join("config.json")).unwrap()).unwrap();
    let heads = config["num_attention_heads"].as_u64().unwrap() as usize;
    config["hidden_size"] = hidden.into();
    config["intermediate_size"] = intermediate.into();
    config["num_hidden_layers"] = layers.into();
    config["head_dim"] = (hidden / heads).into();
    let config_text = serde_json::to_string_pretty(&config).unwrap();
    std::fs::write(dir.join("config.json"), &config_text).unwrap();

    let shapes = shapes(&config_text);
    let mut header = serde_json::Map::new();
    let mut offset = 0;
    for (name, shape) in &shapes {
        let bytes = 4 * shape.iter().product::<usize>();
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut header = serde_json::to_vec(&header).unwrap();
    header.resize(header.len().div_ceil(8) * 8, b' ');
    let file = std::fs::File::create(dir.join("model.safetensors")).unwrap();
    let mut out = std::io::BufWriter::new(file);
    out.write_all(&(header.len() as u64).to_le_bytes()).unwrap();
    out.write_all(&header).unwrap();
    // SplitMix64, uniform in ±0.05.
    let mut state = 0x5eed_u64;
    for (_, shape) in &shapes {
        for _ in 0..shape.iter().product::<usize>() {
            let value = if shape.len() == 1 {
                1.0f32
            } else {
                state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
                let mut z = state;
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                z ^= z >> 31;
                ((z >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1
            };
            out.write_all(&value.to_le_bytes()).unwrap();
        }
    }
    out.flush().unwrap();
    offset
}

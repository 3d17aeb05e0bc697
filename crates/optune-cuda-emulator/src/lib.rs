//! This project's CUDA kernels (optune-kernels' src/cuda/*.cu), compiled for the CPU with a small
//! emulation of the CUDA runtime (emulator/), and run thread by thread: each block's threads are
//! fibers that run in turn up to their next `__syncthreads` or warp shuffle. A test hands a kernel
//! the launch geometry and the argument list the CUDA launch makes (the same function builds
//! both) over copies of its buffers, and compares its output with the op's CPU form, without a
//! GPU.
//!
//! What this checks:
//! - the kernel's indexing, barriers and reductions, its edge cases (idle slots, partial chunks,
//!   head widths that are not a multiple of 32) and the launch geometry;
//! - the argument list, as the driver reads it: the arguments arrive as cuLaunchKernel's
//!   kernelParams do, a pointer to each one's bytes, and each must have the size and kind
//!   (pointer, signed or unsigned integer, float) of the kernel's parameter, in number and order;
//! - memory: every launch runs twice, on copies of its buffers placed against an inaccessible page
//!   after their end and then against one before their start, so a read or write outside a buffer
//!   ends the process at once with a report naming the kernel, block and thread, as an illegal
//!   address ends a GPU run;
//! - outputs written in full: the two runs fill their output buffers with different bytes (zeros,
//!   then all ones) and must agree, so an element the kernel never writes (on a GPU: whatever the
//!   allocation held) is an error;
//! - races: the second run resumes a block's threads, and runs the blocks, in the reverse order,
//!   so a result that depends on the order a GPU happens to pick (a missing `__syncthreads`, a
//!   block reading what another writes) makes the runs differ.
//!
//! A launch that a GPU would refuse (no blocks, more than 1024 threads) or that could never finish
//! (a barrier some threads cannot reach) is an error naming the kernel and the block. What this
//! cannot check: timing, memory coalescing, blocks running at the same time (they run one after
//! another here), the GPU's approximate `__expf`.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::marker::PhantomData;

/// A one-dimensional launch: `grid` blocks of `block` threads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Launch {
    pub grid: u32,
    pub block: u32,
}

/// A kernel argument as a CUDA launch passes it: a buffer's address (from [`Memory`]) or a
/// scalar of the parameter's type.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Arg {
    Pointer(u64),
    I32(i32),
    U64(u64),
    F32(f32),
}

/// A value every bit pattern of which is valid and that has no padding: what buffers hold.
pub trait Plain: Copy + sealed::Sealed {}

/// A storage type the kernels are instantiated for, by its kernels' name suffix.
pub trait Element: Plain {
    /// `f32`, `bf16` or `f16`: `cached_attention_bf16` is the bf16 instantiation.
    const SUFFIX: &'static str;
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for u32 {}
    impl Sealed for half::bf16 {}
    impl Sealed for half::f16 {}
}

impl Plain for f32 {}
impl Plain for u32 {}
impl Plain for half::bf16 {}
impl Plain for half::f16 {}
impl Element for f32 {
    const SUFFIX: &'static str = "f32";
}
impl Element for half::bf16 {
    const SUFFIX: &'static str = "bf16";
}
impl Element for half::f16 {
    const SUFFIX: &'static str = "f16";
}

/// An argument as the C entry points take it (EmulatedArgument in emulator/kernels.h).
#[repr(C)]
struct Argument {
    bytes: *const c_void,
    size: usize,
    kind: c_char,
}

type Entry = unsafe extern "C" fn(u32, u32, c_int, *const Argument, c_int) -> c_int;

/// The kernels' C entry points (`optune_emu_{kernel}`, see emulator/kernels.h), by kernel name.
macro_rules! entries {
    ($($kernel:ident),* $(,)?) => {
        extern "C" {
            $(
                #[link_name = concat!("optune_emu_", stringify!($kernel))]
                fn $kernel(
                    grid: u32,
                    block: u32,
                    reversed: c_int,
                    arguments: *const Argument,
                    count: c_int,
                ) -> c_int;
            )*
        }

        fn entry(kernel: &str) -> Option<Entry> {
            match kernel {
                $(stringify!($kernel) => Some($kernel as Entry),)*
                _ => None,
            }
        }
    };
}

entries!(
    dropout_f32,
    dropout_bf16,
    dropout_f16,
    cached_attention_f32,
    cached_attention_g2_f32,
    cached_attention_g4_f32,
    cached_attention_wide_f32,
    cached_attention_bf16,
    cached_attention_g2_bf16,
    cached_attention_g4_bf16,
    cached_attention_wide_bf16,
    cached_attention_f16,
    cached_attention_g2_f16,
    cached_attention_g4_f16,
    cached_attention_wide_f16,
    cached_attention_split_f32,
    cached_attention_split_g2_f32,
    cached_attention_split_g4_f32,
    cached_attention_split_wide_f32,
    cached_attention_split_bf16,
    cached_attention_split_g2_bf16,
    cached_attention_split_g4_bf16,
    cached_attention_split_wide_bf16,
    cached_attention_split_f16,
    cached_attention_split_g2_f16,
    cached_attention_split_g4_f16,
    cached_attention_split_wide_f16,
    cached_attention_merge_f32,
    cached_attention_merge_bf16,
    cached_attention_merge_f16,
    cached_attention_tiled_f32,
    cached_attention_tiled_bf16,
    cached_attention_tiled_f16,
    sample_rows_f32,
    sample_rows_bf16,
    sample_rows_f16,
    add_rms_norm_f32,
    add_rms_norm_bf16,
    add_rms_norm_f16,
    silu_mul_f32,
    silu_mul_bf16,
    silu_mul_f16,
    head_rms_norm_f32,
    head_rms_norm_bf16,
    head_rms_norm_f16,
    rms_norm_backward_f32,
    rms_norm_backward_bf16,
    rms_norm_backward_f16,
    cache_write_rotated_f32,
    cache_write_rotated_bf16,
    cache_write_rotated_f16,
    optimizer_moments,
    optimizer_param,
    selftest_block_sum,
    selftest_warp_sum,
    selftest_warp_broadcast,
    selftest_diverged_shuffle,
    selftest_write_all_but_last,
    selftest_read_at_offset,
    selftest_missing_barrier,
);

extern "C" {
    fn optune_emu_last_error() -> *const c_char;
    fn optune_emu_guarded_alloc(bytes: usize, at_start: c_int) -> *mut c_void;
    fn optune_emu_guarded_free(data: *mut c_void, bytes: usize, at_start: c_int);
}

/// Where a run's buffers sit between their two inaccessible guard pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Placement {
    /// Ending where the trailing guard begins: an access past a buffer's end faults.
    AgainstEnd,
    /// Starting where the leading guard ends: an access before a buffer's start faults.
    AgainstStart,
}

impl Placement {
    /// The byte every output buffer is filled with before the launch.
    fn fill(self) -> u8 {
        match self {
            Placement::AgainstEnd => 0,
            Placement::AgainstStart => 0xFF,
        }
    }

    fn at_start(self) -> c_int {
        c_int::from(self == Placement::AgainstStart)
    }
}

/// The buffers of one run of a launch, each in its own mapping between two inaccessible pages
/// (see [`in_both_placements`]); unmapped when the memory is dropped.
pub struct Memory {
    placement: Placement,
    regions: Vec<(*mut u8, usize)>,
}

/// A buffer of [`Memory`] the kernel writes: its address for an [`Arg::Pointer`], and what
/// [`Memory::read`] reads back.
#[derive(Clone, Copy, Debug)]
pub struct Buffer<T> {
    pub address: u64,
    len: usize,
    region: usize,
    element: PhantomData<T>,
}

impl Memory {
    fn new(placement: Placement) -> Self {
        Self {
            placement,
            regions: Vec::new(),
        }
    }

    fn map<T: Plain>(&mut self, len: usize) -> (*mut T, usize) {
        let bytes = std::mem::size_of::<T>() * len;
        // SAFETY: a plain allocation; a null result is checked.
        let data = unsafe { optune_emu_guarded_alloc(bytes, self.placement.at_start()) };
        assert!(!data.is_null(), "mapping a guarded buffer of {bytes} bytes");
        self.regions.push((data.cast(), bytes));
        // The mapping is page-aligned, so `data` is aligned for T either way: at the start of a
        // page, or `bytes` (a multiple of T's power-of-two size) before the end of one.
        (data.cast(), self.regions.len() - 1)
    }

    /// Runs `kernel` (an instantiation's name, as `cached_attention_bf16`) over `launch` with
    /// `args`, in the kernel's parameter order, to its end. In the second run of
    /// [`in_both_placements`] the blocks run last first and each block's threads are resumed last
    /// first, so a result that depends on the order a GPU happens to run them in (a race: a
    /// missing `__syncthreads`, a block reading what another writes) makes the runs differ.
    ///
    /// # Safety
    /// Every [`Arg::Pointer`] must point into a buffer of this memory (checked: an error
    /// otherwise) that holds what the kernel reads and writes there for these arguments, or be
    /// 0, a null pointer, for a kernel that takes an optional buffer (and must then not read
    /// it). An access just past either end of a buffer is caught (the process ends with a
    /// report) in one of the two runs of [`in_both_placements`]; one further away may touch
    /// other memory.
    pub unsafe fn launch(&self, kernel: &str, launch: Launch, args: &[Arg]) -> Result<(), String> {
        let Some(entry) = entry(kernel) else {
            return Err(format!("{kernel}: no such emulated kernel"));
        };
        for (i, arg) in args.iter().enumerate() {
            if let Arg::Pointer(address @ 1..) = *arg {
                let inside = self.regions.iter().any(|&(data, bytes)| {
                    (data as u64..=data as u64 + bytes as u64).contains(&address)
                });
                if !inside {
                    return Err(format!(
                        "{kernel}: argument {i} ({address:#x}) points into none of this memory's \
                         buffers"
                    ));
                }
            }
        }
        let arguments: Vec<Argument> = args
            .iter()
            .map(|arg| {
                let (bytes, size, kind): (*const c_void, usize, u8) = match arg {
                    Arg::Pointer(address) => (std::ptr::from_ref(address).cast(), 8, b'p'),
                    Arg::I32(v) => (std::ptr::from_ref(v).cast(), 4, b'i'),
                    Arg::U64(v) => (std::ptr::from_ref(v).cast(), 8, b'u'),
                    Arg::F32(v) => (std::ptr::from_ref(v).cast(), 4, b'f'),
                };
                Argument {
                    bytes,
                    size,
                    kind: kind as c_char,
                }
            })
            .collect();
        let count = c_int::try_from(arguments.len()).map_err(|_| "too many arguments")?;
        let reversed = c_int::from(self.placement == Placement::AgainstStart);
        // SAFETY: `arguments` points at `count` entries, each at the bytes of a value of `args`,
        // which outlive the call; the buffers behind the pointers are the caller's to vouch for.
        let code = unsafe {
            entry(
                launch.grid,
                launch.block,
                reversed,
                arguments.as_ptr(),
                count,
            )
        };
        if code == 0 {
            return Ok(());
        }
        // SAFETY: the emulator returns a pointer to its thread-local, NUL-terminated message,
        // valid until the next launch on this thread.
        Err(unsafe { CStr::from_ptr(optune_emu_last_error()) }
            .to_string_lossy()
            .into_owned())
    }

    /// A copy of `values` that the kernel reads: its address.
    pub fn input<T: Plain>(&mut self, values: &[T]) -> u64 {
        self.in_place(values).address
    }

    /// A copy of `values` that the kernel updates.
    pub fn in_place<T: Plain>(&mut self, values: &[T]) -> Buffer<T> {
        let (data, region) = self.map::<T>(values.len());
        // SAFETY: the new mapping holds `values.len()` writable elements.
        unsafe { std::ptr::copy_nonoverlapping(values.as_ptr(), data, values.len()) };
        Buffer {
            address: data as u64,
            len: values.len(),
            region,
            element: PhantomData,
        }
    }

    /// `len` elements that the kernel must write in full. Their bytes start as zeros in one run
    /// and as all ones (NaN in every float type) in the other, so an element left unwritten makes
    /// the runs differ.
    pub fn output<T: Plain>(&mut self, len: usize) -> Buffer<T> {
        let (data, region) = self.map::<T>(len);
        // SAFETY: the new mapping holds `len` writable elements; a Plain type takes any bytes.
        unsafe { std::ptr::write_bytes(data, self.placement.fill(), len) };
        Buffer {
            address: data as u64,
            len,
            region,
            element: PhantomData,
        }
    }

    /// The elements of `buffer`, as the kernel left them.
    pub fn read<T: Plain>(&self, buffer: &Buffer<T>) -> Vec<T> {
        assert_eq!(
            self.regions[buffer.region].0 as u64, buffer.address,
            "a buffer of another memory"
        );
        // SAFETY: the buffer's mapping is live (it is this memory's) and holds `len` initialised
        // elements (copied in or filled, then written by the kernel).
        unsafe { std::slice::from_raw_parts(buffer.address as *const T, buffer.len) }.to_vec()
    }
}

impl Drop for Memory {
    fn drop(&mut self) {
        for &(data, bytes) in &self.regions {
            // SAFETY: a mapping `map` made for these bytes and this placement, released once.
            unsafe { optune_emu_guarded_free(data.cast(), bytes, self.placement.at_start()) }
        }
    }
}

/// Runs `run` twice, on a fresh [`Memory`] each time: its buffers placed against their trailing
/// guard pages, then against their leading ones, so that a read or write past either end of any
/// buffer is caught. The two runs must return the same bytes: they differ when the kernel leaves
/// an output element unwritten (the runs fill outputs differently), when its result depends on
/// the order its blocks and threads run in (the second run reverses it), or on where its buffers
/// are. `kernel` names the launch in the error.
pub fn in_both_placements<T: Plain>(
    kernel: &str,
    run: impl Fn(&mut Memory) -> Result<Vec<T>, String>,
) -> Result<Vec<T>, String> {
    let against_end = run(&mut Memory::new(Placement::AgainstEnd))?;
    let against_start = run(&mut Memory::new(Placement::AgainstStart))?;
    if bytes(&against_end) != bytes(&against_start) {
        let first = against_end
            .iter()
            .zip(&against_start)
            .position(|(a, b)| bytes(std::slice::from_ref(a)) != bytes(std::slice::from_ref(b)))
            .map_or("in length".to_string(), |i| format!("at element {i}"));
        return Err(format!(
            "{kernel}: two runs differ {first} of the output: an element the kernel does not \
             write (the output started as zeros in one run, as all ones in the other), or one \
             that depends on the order of the blocks or threads (a race; the second run reversed \
             it)"
        ));
    }
    Ok(against_end)
}

/// The bytes of `values`.
fn bytes<T: Plain>(values: &[T]) -> &[u8] {
    // SAFETY: a Plain type has no padding: every byte is initialised.
    unsafe { std::slice::from_raw_parts(values.as_ptr().cast(), std::mem::size_of_val(values)) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one_block(block: u32) -> Launch {
        Launch { grid: 1, block }
    }

    /// Launches a GPU refuses are refused, by name.
    #[test]
    fn launches_over_no_blocks_are_refused() {
        let err = in_both_placements("selftest_write_all_but_last", |memory| {
            let out = memory.output::<f32>(1);
            let launch = Launch { grid: 0, block: 1 };
            // SAFETY: no block runs.
            unsafe {
                memory.launch(
                    "selftest_write_all_but_last",
                    launch,
                    &[Arg::Pointer(out.address)],
                )
            }?;
            Ok(memory.read(&out))
        })
        .unwrap_err();
        assert!(
            err.contains("selftest_write_all_but_last") && err.contains("no blocks"),
            "{err}"
        );
    }

    /// An argument list the driver would misread is refused before the launch: too few
    /// arguments, an int where the kernel takes a pointer, an f32 where it takes an int.
    #[test]
    fn argument_lists_that_do_not_match_the_kernel_are_refused() {
        let mut memory = Memory::new(Placement::AgainstEnd);
        let (x, out) = (memory.input(&[1f32; 32]), memory.output::<f32>(32));
        let cases = [
            (
                vec![Arg::Pointer(x), Arg::Pointer(out.address)],
                "2 arguments for 3 parameters",
            ),
            (
                vec![Arg::Pointer(x), Arg::U64(out.address), Arg::I32(0)],
                "argument 1 is 8 bytes of kind 'u' for a parameter of 8 bytes of kind 'p'",
            ),
            (
                vec![Arg::Pointer(x), Arg::Pointer(out.address), Arg::F32(0.0)],
                "argument 2 is 4 bytes of kind 'f' for a parameter of 4 bytes of kind 'i'",
            ),
        ];
        for (args, want) in cases {
            // SAFETY: refused before it runs; the right list would read x and write out, 32 each.
            let err = unsafe { memory.launch("selftest_read_at_offset", one_block(32), &args) }
                .unwrap_err();
            assert!(err.contains(want), "{err}");
        }
        let stray = [Arg::Pointer(x), Arg::Pointer(0xdead_0000), Arg::I32(0)];
        // SAFETY: refused before it runs: the second pointer is none of this memory's.
        let err = unsafe { memory.launch("selftest_read_at_offset", one_block(32), &stray) };
        assert!(err
            .unwrap_err()
            .contains("argument 1 (0xdead0000) points into none"));
        let ok = [Arg::Pointer(x), Arg::Pointer(out.address), Arg::I32(0)];
        // SAFETY: thread t reads x[t] and writes out[t], for 32 threads.
        unsafe { memory.launch("selftest_read_at_offset", one_block(32), &ok) }.unwrap();
        assert_eq!(memory.read(&out), [1f32; 32]);
    }

    /// Shared memory and __syncthreads: a tree reduction per block, over several blocks (each
    /// block reuses the same static shared array, as blocks run one after another).
    #[test]
    fn block_barriers_order_shared_memory() {
        let (grid, block) = (3usize, 256usize);
        let x: Vec<f32> = (0..grid * block).map(|i| (i % 7) as f32).collect();
        let sums = in_both_placements("selftest_block_sum", |memory| {
            let (input, out) = (memory.input(&x), memory.output::<f32>(grid));
            let args = [Arg::Pointer(input), Arg::Pointer(out.address)];
            let launch = Launch {
                grid: grid as u32,
                block: block as u32,
            };
            // SAFETY: x holds grid·block elements, out grid.
            unsafe { memory.launch("selftest_block_sum", launch, &args) }?;
            Ok(memory.read(&out))
        })
        .unwrap();
        let want: Vec<f32> = x.chunks(block).map(|c| c.iter().sum()).collect();
        assert_eq!(sums, want);
    }

    /// Warp shuffles: every lane of each warp ends with its warp's total.
    #[test]
    fn shuffles_exchange_within_a_warp() {
        let x: Vec<f32> = (0..64).map(|i| i as f32).collect();
        let run = |kernel: &str| {
            in_both_placements(kernel, |memory| {
                let (input, out) = (memory.input(&x), memory.output::<f32>(64));
                let args = [Arg::Pointer(input), Arg::Pointer(out.address)];
                // SAFETY: x and out hold one element per thread of the block.
                unsafe { memory.launch(kernel, one_block(64), &args) }?;
                Ok(memory.read(&out))
            })
            .unwrap()
        };
        // Butterfly sums: every lane of a warp ends with the warp's sum.
        let sums = run("selftest_warp_sum");
        let warp = |w: usize| (32 * w..32 * (w + 1)).map(|i| i as f32).sum::<f32>();
        assert_eq!(sums[..32], [warp(0); 32]);
        assert_eq!(sums[32..], [warp(1); 32]);
        // A broadcast from a named lane: lane l reads lane (7 l + 3) mod 32 of its own warp.
        let read: Vec<f32> = (0..64)
            .map(|t| (t / 32 * 32 + (7 * (t % 32) + 3) % 32) as f32)
            .collect();
        assert_eq!(run("selftest_warp_broadcast"), read);
    }

    /// A shuffle half its warp never reaches would hang (or worse) on a GPU: an error here.
    #[test]
    fn a_barrier_some_threads_cannot_reach_is_reported() {
        let mut memory = Memory::new(Placement::AgainstEnd);
        let out = memory.output::<f32>(32);
        // SAFETY: out holds one element per thread of the block.
        let err = unsafe {
            memory.launch(
                "selftest_diverged_shuffle",
                one_block(32),
                &[Arg::Pointer(out.address)],
            )
        }
        .unwrap_err();
        assert!(
            err.contains("selftest_diverged_shuffle") && err.contains("16 wait at __syncthreads"),
            "{err}"
        );
    }

    /// An output element a kernel never writes is an error: the two runs start their outputs
    /// from different bytes.
    #[test]
    fn an_unwritten_output_element_is_reported() {
        let run = |block: u32| {
            in_both_placements("selftest_write_all_but_last", |memory| {
                let out = memory.output::<f32>(32);
                // SAFETY: out holds 32 elements; thread t writes out[t] for t < block - 1 ≤ 32.
                unsafe {
                    memory.launch(
                        "selftest_write_all_but_last",
                        one_block(block),
                        &[Arg::Pointer(out.address)],
                    )
                }?;
                Ok(memory.read(&out))
            })
        };
        assert_eq!(run(33).unwrap(), [1f32; 32]);
        let err = run(32).unwrap_err();
        assert!(
            err.contains("at element 31 ") && err.contains("does not write"),
            "{err}"
        );
    }

    /// A race between a block's threads is an error: the second run resumes them in the reverse
    /// order, so a read of shared memory with no barrier after its write gives other values.
    #[test]
    fn a_race_between_threads_is_reported() {
        let x: Vec<f32> = (1..=64).map(|i| i as f32).collect();
        let err = in_both_placements("selftest_missing_barrier", |memory| {
            let (input, out) = (memory.input(&x), memory.output::<f32>(64));
            let args = [Arg::Pointer(input), Arg::Pointer(out.address)];
            // SAFETY: x and out hold one element per thread of the block.
            unsafe { memory.launch("selftest_missing_barrier", one_block(64), &args) }?;
            Ok(memory.read(&out))
        })
        .unwrap_err();
        assert!(
            err.contains("selftest_missing_barrier") && err.contains("a race"),
            "{err}"
        );
    }

    /// A read outside a buffer stops the process with a report naming the kernel (on a GPU: an
    /// illegal address) instead of reading a neighbour's data: one past the end of a buffer
    /// placed against its trailing guard page, one before the start of a buffer placed against its
    /// leading one. Each read runs in a child process: this test binary again, with `CHILD` set
    /// to the case.
    #[test]
    fn reads_outside_a_buffer_are_reported() {
        const CHILD: &str = "OPTUNE_EMULATOR_READ_OUTSIDE";
        let cases = [
            ("past-the-end", 32, Placement::AgainstEnd),
            ("before-the-start", -1, Placement::AgainstStart),
        ];
        if let Some(case) = std::env::var_os(CHILD) {
            let (_, offset, placement) = cases.into_iter().find(|c| case == c.0).unwrap();
            let mut memory = Memory::new(placement);
            let (x, out) = (memory.input(&[1f32; 32]), memory.output::<f32>(32));
            let args = [Arg::Pointer(x), Arg::Pointer(out.address), Arg::I32(offset)];
            // SAFETY: none: the kernel reads outside x on purpose, which ends this process.
            let result = unsafe { memory.launch("selftest_read_at_offset", one_block(32), &args) };
            println!("the read went unnoticed ({result:?})");
            return;
        }
        for (case, _, _) in cases {
            let child = std::process::Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "tests::reads_outside_a_buffer_are_reported",
                    "--nocapture",
                ])
                .env(CHILD, case)
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&child.stderr);
            assert!(
                !child.status.success(),
                "{case}: the child finished: {stderr}"
            );
            assert!(
                stderr.contains("selftest_read_at_offset, block (0, 0, 0), thread (0, 0, 0)")
                    && stderr.contains("outside its buffers"),
                "{case}: {stderr}"
            );
        }
    }
}

//! A linear layer with an optional LoRA adapter.

use candle_core::{Device, Result, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// The random stream of LoRA dropout, shared by a model's adapters and seeded by the caller, so a
/// run with a fixed seed draws the same masks on every device (candle's CPU RNG cannot be seeded,
/// and its CUDA RNG, curand, draws other numbers than any CPU stream would).
///
/// The masks are drawn on the host, but not adapter by adapter: [`draw_dropout_masks`] draws a
/// whole forward pass's keep flags (one byte each) into one buffer and copies it to the device
/// once, and each adapter then takes its slice in the order the pass visits them. The flags come
/// from the stream in the same order as when each adapter drew its own, so the masks are the
/// same as before that change; the price is one byte per masked element held during the pass.
#[derive(Clone)]
pub struct DropoutStream(Arc<Mutex<StreamState>>);

struct StreamState {
    rng: ChaCha8Rng,
    /// Keep flags drawn ahead for the current pass (u8 0/1 `[n]` on the device), and how many
    /// of them the adapters have taken.
    ahead: Option<(Tensor, usize)>,
}

impl DropoutStream {
    pub fn new(seed: u64) -> Self {
        Self(Arc::new(Mutex::new(StreamState {
            rng: ChaCha8Rng::seed_from_u64(seed),
            ahead: None,
        })))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, StreamState> {
        self.0.lock().expect("dropout stream lock")
    }

    /// How far the stream has been drawn (ChaCha's word position): a training state keeps it,
    /// so that a resumed run draws the masks the uninterrupted run would have drawn. Flags drawn
    /// ahead count as drawn; a state is saved between steps, when none are left over.
    pub fn position(&self) -> u128 {
        self.lock().rng.get_word_pos()
    }

    /// Moves the stream to `position` (from [`DropoutStream::position`]).
    pub fn set_position(&self, position: u128) {
        let mut state = self.lock();
        state.rng.set_word_pos(position);
        state.ahead = None;
    }

    /// Where the stream stands now, flags drawn ahead included, to come back to with
    /// [`DropoutPlace::restore`]: a block run again for its gradients (activation
    /// recomputation) must draw the masks its first run drew.
    pub(crate) fn place(&self) -> DropoutPlace {
        let state = self.lock();
        DropoutPlace {
            stream: self.clone(),
            position: state.rng.get_word_pos(),
            ahead: state.ahead.clone(),
        }
    }

    /// `count` keep flags (1 with probability `keep`) from the stream, on `device`: one copy.
    fn keep_flags(
        rng: &mut ChaCha8Rng,
        count: usize,
        keep: f32,
        device: &Device,
    ) -> Result<Tensor> {
        let flags: Vec<u8> = (0..count)
            .map(|_| u8::from(rng.random::<f32>() < keep))
            .collect();
        Tensor::from_vec(flags, count, device)
    }

    /// Draws `count` flags ahead (replacing any left over), for the adapters of one pass.
    fn draw_ahead(&self, count: usize, keep: f32, device: &Device) -> Result<()> {
        let mut state = self.lock();
        let flags = Self::keep_flags(&mut state.rng, count, keep, device)?;
        state.ahead = Some((flags, 0));
        Ok(())
    }

    /// Inverted dropout: each element kept with probability `1 − p` and scaled by `1 / (1 − p)`.
    /// The flags are the next ones drawn ahead, or drawn now when none are (a pass that
    /// [`draw_dropout_masks`] did not plan).
    fn apply(&self, x: &Tensor, p: f32) -> Result<Tensor> {
        let keep = 1.0 - p;
        let count = x.elem_count();
        let flags = {
            let mut state = self.lock();
            match state.ahead.take() {
                Some((ahead, taken)) if taken + count <= ahead.elem_count() => {
                    let flags = ahead.narrow(0, taken, count)?;
                    if taken + count < ahead.elem_count() {
                        state.ahead = Some((ahead, taken + count));
                    }
                    flags
                }
                _ => Self::keep_flags(&mut state.rng, count, keep, x.device())?,
            }
        };
        let mask = flags
            .reshape(x.shape())?
            .to_dtype(x.dtype())?
            .affine(f64::from(1.0 / keep), 0.0)?;
        x * mask
    }
}

/// A [`DropoutStream`]'s state at one moment ([`DropoutStream::place`]).
pub(crate) struct DropoutPlace {
    stream: DropoutStream,
    position: u128,
    ahead: Option<(Tensor, usize)>,
}

impl DropoutPlace {
    /// Puts the stream back where it stood: the masks drawn next are the ones drawn then.
    pub(crate) fn restore(&self) {
        let mut state = self.stream.lock();
        state.rng.set_word_pos(self.position);
        state.ahead = self.ahead.clone();
    }
}

/// The distinct dropout streams of `linears` whose adapters drop out now (training, `p > 0`).
pub(crate) fn active_dropout_streams<'a>(
    linears: impl IntoIterator<Item = &'a Linear>,
) -> Vec<DropoutStream> {
    let mut streams: Vec<DropoutStream> = Vec::new();
    for lora in linears.into_iter().filter_map(|l| l.lora.as_ref()) {
        let stream = &lora.dropout_stream;
        if lora.drops_out() && !streams.iter().any(|s| Arc::ptr_eq(&s.0, &stream.0)) {
            streams.push(stream.clone());
        }
    }
    streams
}

/// Draws the dropout masks of one forward pass over `rows` rows through `linears` (in the order
/// the pass runs them) in one go: one host buffer, one copy to the device. Nothing when no
/// adapter drops out. The adapters of one model share one stream and one `p`
/// ([`crate::lora::attach_lora`]); adapters on another stream draw their own masks as they run,
/// and so do all when the shared stream's adapters differ in `p`.
pub fn draw_dropout_masks<'a>(
    linears: impl IntoIterator<Item = &'a Linear>,
    rows: usize,
    device: &Device,
) -> Result<()> {
    let mut planned: Option<(&DropoutStream, f32, usize)> = None;
    for lora in linears.into_iter().filter_map(|l| l.lora.as_ref()) {
        if !lora.drops_out() {
            continue;
        }
        let (stream, p, count) = planned.get_or_insert((&lora.dropout_stream, lora.dropout, 0));
        if !Arc::ptr_eq(&stream.0, &lora.dropout_stream.0) {
            continue;
        }
        if *p != lora.dropout {
            return Ok(());
        }
        *count += rows * lora.a.dim(1)?;
    }
    match planned {
        Some((stream, p, count)) => stream.draw_ahead(count, 1.0 - p, device),
        None => Ok(()),
    }
}

/// Low-rank adapter `Δy = scale · dropout(x) Aᵀ Bᵀ` (PEFT's layout: `A: [r, in]`, `B: [out, r]`).
#[derive(Clone)]
pub struct LoraAdapter {
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f64,
    pub dropout: f32,
    /// Shared by every adapter of one model, so the reference (adapters off) needs no second copy.
    pub enabled: Arc<AtomicBool>,
    /// Dropout is applied only while training.
    pub training: Arc<AtomicBool>,
    pub dropout_stream: DropoutStream,
}

impl LoraAdapter {
    /// Whether the adapter applies dropout now: on, training, with `p > 0`.
    fn drops_out(&self) -> bool {
        self.dropout > 0.0
            && self.enabled.load(Ordering::Relaxed)
            && self.training.load(Ordering::Relaxed)
    }
}

/// A LoRA adapter's operands in one forward pass: `b` is scaled already, `input` is the
/// dropped-out copy of the layer's input (`None`: the input itself).
struct Adapter {
    input: Option<Tensor>,
    a: Tensor,
    b: Tensor,
}

#[derive(Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub lora: Option<LoraAdapter>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight,
            bias,
            lora: None,
        }
    }

    /// `x [.., in] → [.., out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match self.adapter(x)? {
            // The adapter reads the layer's own input: one op for the base and the adapter.
            Some(Adapter { input: None, a, b }) => {
                optune_kernels::lora_linear(x, &self.weight, &a, &b)?
            }
            Some(Adapter {
                input: Some(dropped),
                a,
                b,
            }) => {
                let delta = optune_kernels::linear(&optune_kernels::linear(&dropped, &a)?, &b)?;
                (optune_kernels::linear(x, &self.weight)? + delta)?
            }
            None => optune_kernels::linear(x, &self.weight)?,
        };
        match &self.bias {
            Some(bias) => y.broadcast_add(bias),
            None => Ok(y),
        }
    }

    /// The LoRA adapter's operands for `x [.., in]`: `scale · dropout(x) Aᵀ Bᵀ` is its
    /// contribution; `None` without an adapter or with adapters switched off.
    fn adapter(&self, x: &Tensor) -> Result<Option<Adapter>> {
        let Some(lora) = &self.lora else {
            return Ok(None);
        };
        if !lora.enabled.load(Ordering::Relaxed) {
            return Ok(None);
        }
        // No reshapes: each node on a [rows, width] tensor costs candle's backward a zeroed
        // gradient and an add of that size (the products take `[.., in]` as they come).
        let input = if lora.drops_out() {
            Some(lora.dropout_stream.apply(x, lora.dropout)?)
        } else {
            None
        };
        // The adapters are f32 master weights; they compute in the input's dtype (bf16 on a GPU),
        // and the cast passes their gradients back in f32. The scale goes on B (out × rank), not
        // on the [rows, out] product: one small multiply instead of a large one.
        let (a, b) = (
            lora.a.to_dtype(x.dtype())?,
            (&lora.b * lora.scale)?.to_dtype(x.dtype())?,
        );
        // Every path's products compute only the gradients wanted (no input gradient for the
        // first layer's adapters, whose input is frozen).
        Ok(Some(Adapter { input, a, b }))
    }

    /// The weight with the adapter folded in, for saving a merged checkpoint. Computed outside
    /// autograd: from the adapter variables themselves, the merged weight would record its ops
    /// and keep every intermediate (B·A, its scaled and cast copies) alive as long as it lives,
    /// about 12 bytes per adapted weight element for the whole save.
    pub fn merged_weight(&self) -> Result<Tensor> {
        match &self.lora {
            Some(lora) => {
                let delta = (lora.b.detach().matmul(&lora.a.detach())? * lora.scale)?;
                self.weight
                    .detach()
                    .add(&delta.to_dtype(self.weight.dtype())?)
            }
            None => Ok(self.weight.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropout_keeps_one_minus_p_scaled_and_repeats_with_the_seed() {
        let x = Tensor::ones((200, 50), candle_core::DType::F32, &Device::Cpu).unwrap();
        let masked = |seed| {
            DropoutStream::new(seed)
                .apply(&x, 0.25)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let a = masked(7);
        let kept = a.iter().filter(|&&v| v != 0.0).count() as f64 / a.len() as f64;
        // 10000 draws: the kept fraction's standard deviation is 0.0043.
        assert!((kept - 0.75).abs() < 0.02, "kept {kept}");
        assert!(a.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.75).abs() < 1e-6));
        assert_eq!(a, masked(7));
        assert_ne!(a, masked(8));
    }

    /// Adapters sharing one stream, as `attach_lora` makes them: `[rows, in]` inputs of widths
    /// `widths`, training with dropout `p`.
    fn adapters(widths: &[usize], p: f32, stream: &DropoutStream) -> Vec<Linear> {
        let on = Arc::new(AtomicBool::new(true));
        widths
            .iter()
            .map(|&width| {
                let mut linear = Linear::new(
                    Tensor::zeros((3, width), candle_core::DType::F32, &Device::Cpu).unwrap(),
                    None,
                );
                linear.lora = Some(LoraAdapter {
                    a: Tensor::ones((2, width), candle_core::DType::F32, &Device::Cpu).unwrap(),
                    b: Tensor::ones((3, 2), candle_core::DType::F32, &Device::Cpu).unwrap(),
                    scale: 1.0,
                    dropout: p,
                    enabled: on.clone(),
                    training: on.clone(),
                    dropout_stream: stream.clone(),
                });
                linear
            })
            .collect()
    }

    #[test]
    fn masks_drawn_ahead_for_a_pass_are_the_masks_drawn_adapter_by_adapter() {
        let widths = [5, 7, 5, 11];
        let rows = 6;
        let outputs = |ahead: bool| {
            let stream = DropoutStream::new(9);
            let linears = adapters(&widths, 0.3, &stream);
            if ahead {
                draw_dropout_masks(&linears, rows, &Device::Cpu).unwrap();
            }
            let out: Vec<Vec<f32>> = linears
                .iter()
                .map(|l| {
                    let x = Tensor::ones(
                        (rows, l.weight.dim(1).unwrap()),
                        candle_core::DType::F32,
                        &Device::Cpu,
                    )
                    .unwrap();
                    l.forward(&x)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap()
                })
                .collect();
            let left_over = stream.lock().ahead.is_some();
            (out, stream.position(), left_over)
        };
        let (drawn_ahead, position, left_over) = outputs(true);
        assert_eq!((drawn_ahead.clone(), position), {
            let (each, position, _) = outputs(false);
            (each, position)
        });
        assert!(!left_over, "the pass took every flag drawn ahead");
        // Dropout did something: the outputs differ between rows.
        assert!(drawn_ahead[3].windows(2).any(|w| w[0] != w[1]));
    }

    #[test]
    fn a_stream_moved_to_a_saved_position_draws_the_same_masks() {
        let x = Tensor::ones((10, 10), candle_core::DType::F32, &Device::Cpu).unwrap();
        let mask = |stream: &DropoutStream| {
            stream
                .apply(&x, 0.5)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let stream = DropoutStream::new(3);
        mask(&stream);
        let position = stream.position();
        let next = mask(&stream);
        let resumed = DropoutStream::new(3);
        resumed.set_position(position);
        assert_eq!(mask(&resumed), next);
    }

    /// The merged weight of a trained adapter is plain data: it records no autograd op, so it
    /// keeps none of the merge's intermediates alive (nor reaches the adapter's variables), and
    /// it is W + scale·B·A in the base weight's dtype.
    #[test]
    fn a_merged_weight_is_computed_outside_autograd() {
        let dev = Device::Cpu;
        let a = candle_core::Var::from_tensor(
            &Tensor::new(&[[1f32, 2.], [3., 4.], [5., 6.]], &dev)
                .unwrap()
                .t()
                .unwrap()
                .contiguous()
                .unwrap(),
        )
        .unwrap();
        let b = candle_core::Var::from_tensor(&Tensor::new(&[[1f32, 0.], [0., 1.]], &dev).unwrap())
            .unwrap();
        let on = Arc::new(AtomicBool::new(true));
        let mut linear = Linear::new(
            Tensor::ones((2, 3), candle_core::DType::BF16, &dev).unwrap(),
            None,
        );
        linear.lora = Some(LoraAdapter {
            a: a.as_tensor().clone(),
            b: b.as_tensor().clone(),
            scale: 0.5,
            dropout: 0.0,
            enabled: on.clone(),
            training: on,
            dropout_stream: DropoutStream::new(0),
        });
        let merged = linear.merged_weight().unwrap();
        assert_eq!(merged.dtype(), candle_core::DType::BF16);
        let values: Vec<Vec<f32>> = merged
            .to_dtype(candle_core::DType::F32)
            .unwrap()
            .to_vec2()
            .unwrap();
        assert_eq!(values, [[1.5, 2.5, 3.5], [2.0, 3.0, 4.0]]);
        let grads = merged.sum_all().unwrap().backward().unwrap();
        assert!(
            grads.get(a.as_tensor()).is_none() && grads.get(b.as_tensor()).is_none(),
            "the merged weight still holds the graph back to the adapters"
        );
    }
}

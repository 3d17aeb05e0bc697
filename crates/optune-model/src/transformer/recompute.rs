//! Activation recomputation (gradient checkpointing) on the training path. The forward pass keeps
//! the stream that enters each block and lets the rest of the block's graph go; the backward pass
//! runs the blocks again, last to first, each from its kept input, and propagates through that one
//! block at a time. What stays alive is one or two hidden states per block (the stream and the
//! MLP output the next norm adds) and one block's graph, instead of every block's graph; the price
//! is a second forward pass of the blocks. The gradients are the ones the whole graph gives: the
//! blocks run the same ops on the same inputs, with the dropout masks of their first run.

use super::{MaskedPass, PaddedBatch, Residual, Transformer};
use crate::linear::{active_dropout_streams, DropoutPlace, DropoutStream};
use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, TensorId, Var};
use optune_kernels::ops;

/// A forward pass run by [`Transformer::hidden_states_recomputed`]: what its backward pass needs
/// to run the blocks again.
pub struct RecomputedPass<'m> {
    model: &'m Transformer,
    input_ids: Tensor,
    pass: MaskedPass,
    /// Per block, the stream that entered it (no graph) and where the dropout streams stood.
    inputs: Vec<(Residual, Vec<DropoutPlace>)>,
    /// The last block's output as leaf variables: the loss's graph starts here.
    top: Residual,
}

impl Transformer {
    /// [`Transformer::hidden_states`], keeping only each block's input for the backward pass:
    /// the gradients of a loss built on the returned states come from [`recomputed_backward`] with this
    /// pass, which runs the blocks again.
    pub fn hidden_states_recomputed(
        &self,
        batch: &PaddedBatch,
    ) -> Result<(Tensor, RecomputedPass<'_>)> {
        let pass = self.masked_pass(batch)?;
        let streams = self.active_dropout_streams();
        let mut stream = Residual::new(self.embed(&batch.input_ids)?.detach());
        let mut inputs = Vec::with_capacity(self.layers.len());
        for block in &self.layers {
            let places = streams.iter().map(DropoutStream::place).collect();
            // The block's graph lives until its output is detached below.
            let output = pass.through(block, &self.config, stream.clone())?;
            inputs.push((stream, places));
            stream = output.detached();
        }
        let top = stream.as_variables()?;
        let eps = self.config.rms_norm_eps;
        let (_, normed) = top.add_norm(&self.norm, eps, ops::Pass::Differentiable)?;
        let recomputed = RecomputedPass {
            model: self,
            input_ids: batch.input_ids.clone(),
            pass,
            inputs,
            top,
        };
        Ok((normed, recomputed))
    }

    fn active_dropout_streams(&self) -> Vec<DropoutStream> {
        let linears = self.layers.iter().flat_map(|b| b.linears().map(|(_, l)| l));
        active_dropout_streams(linears)
    }
}

/// The gradients of `loss`, as `loss.backward()` gives them for a graph built whole, where the
/// states of `passes` are among what it was built from; with no passes, `loss.backward()`'s.
/// [`detached`] either way.
pub fn recomputed_backward(loss: &Tensor, passes: Vec<RecomputedPass>) -> Result<GradStore> {
    let mut grads = detached(loss.backward()?);
    for pass in passes {
        pass.backward_into(&mut grads)?;
    }
    Ok(grads)
}

/// `grads` without the graphs they were computed through. candle detaches the gradient it
/// propagates, not the sums it leaves at the leaves: a weight's gradient can still hold the ops
/// (and so the activations) that made it, which would keep every recomputed block's activations
/// alive until the step ends.
fn detached(grads: GradStore) -> GradStore {
    let ids: Vec<TensorId> = grads.get_ids().copied().collect();
    let mut grads = grads;
    for id in ids {
        let grad = grads.get_id(id).map(Tensor::detach);
        if let Some(grad) = grad {
            grads.insert_id(id, grad);
        }
    }
    grads
}

impl RecomputedPass<'_> {
    /// Takes the gradient at the top of the blocks out of `grads` and adds in the gradients of
    /// every weight below it, one block at a time.
    fn backward_into(self, grads: &mut GradStore) -> Result<()> {
        let Some(mut upstream) = self.top.take_grads(grads) else {
            // The loss does not read this pass.
            return Ok(());
        };
        let model = self.model;
        let streams = model.active_dropout_streams();
        let now: Vec<DropoutPlace> = streams.iter().map(DropoutStream::place).collect();
        // Frozen embeddings (LoRA) need no gradient at the first block's input.
        let embedding_trained = model.embed_tokens.track_op();
        let blocks = model.layers.iter().zip(self.inputs).enumerate().rev();
        for (index, (block, (input, places))) in blocks {
            places.iter().for_each(DropoutPlace::restore);
            let wants_input = index > 0 || embedding_trained;
            let input = match wants_input {
                true => input.as_variables()?,
                false => input,
            };
            let output = self.pass.through(block, &model.config, input.clone())?;
            let mut partial = detached(output.weighted_sum(&upstream)?.backward()?);
            let below = match wants_input {
                true => Some(input.take_grads(&mut partial).ok_or_else(|| {
                    candle_core::Error::Msg(format!("block {index}: no gradient at its input"))
                })?),
                false => None,
            };
            grads.extend(partial)?;
            if let Some(below) = below {
                upstream = below;
            }
        }
        if embedding_trained {
            let embedded = model.embed(&self.input_ids)?;
            let partial = detached((embedded * upstream.x)?.sum_all()?.backward()?);
            grads.extend(partial)?;
        }
        now.iter().for_each(DropoutPlace::restore);
        Ok(())
    }
}

impl Residual {
    /// The same tensors without their graph.
    fn detached(&self) -> Self {
        Self {
            x: self.x.detach(),
            pending: self.pending.as_ref().map(Tensor::detach),
        }
    }

    /// Copies as leaf variables, whose gradients a backward pass then reports.
    fn as_variables(&self) -> Result<Self> {
        let leaf =
            |t: &Tensor| Ok::<_, candle_core::Error>(Var::from_tensor(t)?.as_tensor().clone());
        Ok(Self {
            x: leaf(&self.x)?,
            pending: self.pending.as_ref().map(leaf).transpose()?,
        })
    }

    /// The gradients of these tensors, taken out of `grads` ([`detached`]: kept with their
    /// graph, which reads the weights they went through, a backward pass through the next
    /// block's `Σ output·gradient` would reach those weights a second time).
    fn take_grads(&self, grads: &mut GradStore) -> Option<Self> {
        let x = grads.remove(&self.x)?;
        let pending = self.pending.as_ref().and_then(|p| grads.remove(p));
        Some(Self { x, pending })
    }

    /// `Σ x·gx + Σ pending·gp`: its gradient with respect to the stream is `upstream` itself.
    fn weighted_sum(&self, upstream: &Self) -> Result<Tensor> {
        let sum = (&self.x * &upstream.x)?.sum_all()?;
        match (&self.pending, &upstream.pending) {
            (Some(pending), Some(grad)) => sum + (pending * grad)?.sum_all()?,
            (None, None) => Ok(sum),
            _ => candle_core::bail!("a block's output and its gradient differ in parts"),
        }
    }
}

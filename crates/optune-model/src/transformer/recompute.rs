//! Activation recomputation (gradient checkpointing) on the training path. The forward pass keeps
//! the stream that enters each block and lets the rest of the block's graph go; the backward pass
//! runs the blocks again, last to first, each from its kept input, and propagates through that one
//! block at a time. What stays alive is two hidden states per block (the stream and the MLP
//! output the next norm adds) and one block's graph, instead of every block's graph; the price is
//! a second forward pass of the blocks. The gradients are the ones the whole graph gives: the
//! blocks run the same ops on the same inputs, with the dropout masks of their first run.

use super::{MaskedPass, PaddedBatch, Residual, Transformer};
use crate::linear::{active_dropout_streams, DropoutPlace, DropoutStream};
use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};
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
        let (_, normed) = top.add_norm(&*self.final_norm()?, eps, ops::Pass::Differentiable)?;
        let normed = self.head_input(normed)?;
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

/// The gradients of `loss` for `variables`, as `loss.backward()` gives them for a graph built
/// whole, where the states of `passes` are among what it was built from (with no passes,
/// `loss.backward()`'s). Only the variables' gradients are kept, each without its graph: candle
/// leaves a gradient for every operand of every op in its store, tracked or not (a constant mask,
/// the other factor of a product), and the sums it leaves at the leaves keep the ops, and so the
/// activations, that made them. The passes' blocks run again with the model's adapters as they
/// are now: leave them as the forward pass had them (on or off, training or not).
pub fn recomputed_backward(
    loss: &Tensor,
    passes: Vec<RecomputedPass>,
    variables: &[&Tensor],
) -> Result<GradStore> {
    let mut whole = loss.backward()?;
    let tops: Vec<Option<Residual>> = passes
        .iter()
        .map(|p| p.top.take_grads(&mut whole))
        .collect();
    let mut grads = kept(whole, variables);
    for (pass, top) in passes.into_iter().zip(tops) {
        // None: the loss does not read this pass.
        if let Some(top) = top {
            pass.backward_into(top, &mut grads, variables)?;
        }
    }
    Ok(grads)
}

/// The gradients of `variables` in `grads`, detached; nothing else.
fn kept(grads: GradStore, variables: &[&Tensor]) -> GradStore {
    let mut kept = GradStore::default();
    for variable in variables {
        if let Some(grad) = grads.get(variable) {
            kept.insert(variable, grad.detach());
        }
    }
    kept
}

impl RecomputedPass<'_> {
    /// From the gradient at the top of the blocks, adds into `grads` the gradients of the
    /// `variables` below it, one block at a time.
    fn backward_into(
        self,
        mut upstream: Residual,
        grads: &mut GradStore,
        variables: &[&Tensor],
    ) -> Result<()> {
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
            let mut partial = output.weighted_sum(&upstream)?.backward()?;
            let below = match wants_input {
                true => Some(input.take_grads(&mut partial).ok_or_else(|| {
                    candle_core::Error::Msg(format!("block {index}: no gradient at its input"))
                })?),
                false => None,
            };
            grads.extend(kept(partial, variables))?;
            if let Some(below) = below {
                upstream = below;
            }
        }
        if embedding_trained {
            let embedded = model.embed(&self.input_ids)?;
            let partial = ops::sum_all(&(embedded * upstream.x)?)?.backward()?;
            grads.extend(kept(partial, variables))?;
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

    /// The gradients of these tensors, taken out of `grads`, detached (with their graph, which
    /// reads the weights they went through, a backward pass through the next block's
    /// `Σ output·gradient` would reach those weights a second time).
    fn take_grads(&self, grads: &mut GradStore) -> Option<Self> {
        let x = grads.remove(&self.x)?.detach();
        let pending = self.pending.as_ref().and_then(|p| grads.remove(p));
        Some(Self {
            x,
            pending: pending.as_ref().map(Tensor::detach),
        })
    }

    /// `Σ x·gx + Σ pending·gp`: its gradient with respect to the stream is `upstream` itself.
    fn weighted_sum(&self, upstream: &Self) -> Result<Tensor> {
        let sum = ops::sum_all(&(&self.x * &upstream.x)?)?;
        match (&self.pending, &upstream.pending) {
            (Some(pending), Some(grad)) => sum + ops::sum_all(&(pending * grad)?)?,
            (None, None) => Ok(sum),
            _ => candle_core::bail!("a block's output and its gradient differ in parts"),
        }
    }
}

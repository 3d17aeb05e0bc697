//! The training loop: micro-batches of pairs, gradient accumulation, clipping, the optimiser and
//! learning-rate schedule, and the per-step metrics log.

use crate::data::{epoch_batches, TrainPair};
use crate::metrics::{MetricsLog, StepMetrics};
use crate::policy::{Policy, SideLogps};
use crate::state::{self, Interrupts, Position, Saved};
use crate::Args;
use anyhow::{bail, Result};
use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};
use optune_kernels::{GradBuffers, Path};
use optune_model::Transformer;
use optune_resume::Fingerprint;
use optune_train::loss::{batch_loss, given_weights, pair_weights, BatchLogps, ObjectiveParams};
use optune_train::optim::{clip_grad_norm, decay_groups, missing_grads, Optimizer, Schedule};
use std::time::Instant;

/// What a finished run reports.
pub struct Trained {
    pub steps: u64,
    /// The step a resumed run started from (0: from the start).
    pub resumed_from: u64,
    pub tokens: usize,
    pub seconds: f64,
    pub log: MetricsLog,
}

/// Trains `policy` on `pairs` (reference log-probs filled in when the loss reads them) for
/// `--epochs`, or for `--max-steps` optimiser steps over as many epochs as that takes, from the
/// start or from `resumed`, keeping a state every --save-steps steps and when SIGTERM/SIGINT
/// arrives (then ending with an error once it is written).
pub fn train(
    args: &Args,
    policy: &mut Policy,
    pairs: &[TrainPair],
    reference: Option<&Transformer>,
    device: &Device,
    fingerprint: &Fingerprint,
    resumed: Option<Saved>,
) -> Result<Trained> {
    policy.set_training(true);
    let mut trainer = Trainer::new(args, policy, reference, device, pairs.len())?;
    let mut start = Position {
        step: 0,
        epoch: 0,
        batch: 0,
        micro: 0,
    };
    if let Some(saved) = resumed {
        saved.restore(&args.output, trainer.policy, &mut trainer.optimizer)?;
        trainer.policy.refresh_compute_weights()?;
        start = saved.position;
        trainer.micro = start.micro;
        trainer.tokens = saved.tokens;
        trainer.log.restore(saved.metrics)?;
        trainer.progress.set_position(start.step);
    }
    let total_steps = trainer.schedule.total_steps;
    let interrupts = Interrupts::register()?;
    let started = Instant::now();
    let epochs = if args.max_steps.is_some() {
        usize::MAX
    } else {
        args.epochs
    };
    'epochs: for epoch in start.epoch..epochs {
        let batches = epoch_batches(pairs, args.batch_size, args.seed, epoch);
        let last_batch = batches.len() - 1;
        let first = if epoch == start.epoch { start.batch } else { 0 };
        for (b, batch) in batches.iter().enumerate().skip(first) {
            let batch_pairs: Vec<&TrainPair> = batch.iter().map(|&i| &pairs[i]).collect();
            trainer.micro_batch(&batch_pairs, epoch, b)?;
            // Every epoch's micro-batches in groups of --grad-accum, the last group maybe
            // shorter, as the schedule counts them.
            if !((b + 1).is_multiple_of(args.grad_accum) || b == last_batch) {
                continue;
            }
            trainer.optimizer_step(epoch)?;
            let step = trainer.optimizer.step_count();
            if step == total_steps {
                // The checkpoint follows at once.
                if args.max_steps.is_some() {
                    break 'epochs;
                }
                continue;
            }
            let (epoch, batch) = if b == last_batch {
                (epoch + 1, 0)
            } else {
                (epoch, b + 1)
            };
            let position = Position {
                step,
                epoch,
                batch,
                micro: trainer.micro,
            };
            let signal = interrupts.received();
            let scheduled = args.save_steps > 0 && step.is_multiple_of(args.save_steps);
            if signal.is_some() || scheduled {
                state::save(
                    &args.output,
                    fingerprint,
                    position,
                    trainer.tokens,
                    trainer.policy,
                    &trainer.optimizer,
                    pairs,
                    trainer.log.rows(),
                )?;
            }
            if let Some(signal) = signal {
                trainer.progress.finish_and_clear();
                bail!(
                    "{signal}: stopped after step {step} of {total_steps}; the training state is in {}: \
                     run the same command again to continue",
                    state::dir_of(&args.output).display()
                );
            }
        }
    }
    trainer.policy.set_training(false);
    trainer.progress.finish_and_clear();
    Ok(Trained {
        steps: trainer.optimizer.step_count(),
        resumed_from: start.step,
        tokens: trainer.tokens,
        seconds: started.elapsed().as_secs_f64(),
        log: trainer.log,
    })
}

struct Trainer<'a> {
    args: &'a Args,
    policy: &'a mut Policy,
    reference: Option<&'a Transformer>,
    device: &'a Device,
    optimizer: Optimizer,
    schedule: Schedule,
    /// Gradients summed over the micro-batches of the current optimiser step, but for those
    /// the fused ops sum in `grad_buffers`.
    accumulated: Option<GradStore>,
    grad_buffers: GradBuffers,
    micro: usize,
    tokens: usize,
    step_metrics: StepMetrics,
    step_started: Instant,
    log: MetricsLog,
    progress: indicatif::ProgressBar,
}

impl<'a> Trainer<'a> {
    fn new(
        args: &'a Args,
        policy: &'a mut Policy,
        reference: Option<&'a Transformer>,
        device: &'a Device,
        pairs: usize,
    ) -> Result<Self> {
        let steps_per_epoch = pairs.div_ceil(args.batch_size).div_ceil(args.grad_accum);
        let total_steps = args
            .max_steps
            .unwrap_or((steps_per_epoch * args.epochs) as u64);
        let schedule = Schedule {
            peak_lr: args.lr,
            warmup_steps: (args.warmup_ratio * total_steps as f64).ceil() as u64,
            total_steps,
            decay: args.schedule,
        };
        let optimizer = Optimizer::new(
            decay_groups(policy.trainable.clone(), args.weight_decay),
            args.optimizer.algorithm(),
            schedule.lr_at(0),
        )?;
        // The fused ops write the gradients of the weights they read into buffers of their own.
        let fused = optune_kernels::autograd_path(device, policy.model.dtype()) == Path::Fused;
        let weights = policy.trainable.iter().map(|(_, v)| v.as_tensor());
        let grad_buffers = GradBuffers::register(weights.filter(|_| fused))?;
        let progress = indicatif::ProgressBar::new(total_steps).with_style(
            indicatif::ProgressStyle::with_template(
                "opt-wdpo {bar:30} {pos}/{len} steps  {msg}  eta {eta}",
            )
            .expect("valid"),
        );
        Ok(Self {
            args,
            policy,
            reference,
            device,
            optimizer,
            schedule,
            accumulated: None,
            grad_buffers,
            micro: 0,
            tokens: 0,
            step_metrics: StepMetrics::default(),
            step_started: Instant::now(),
            log: MetricsLog::new(args.metrics.as_deref())?,
            progress,
        })
    }

    /// Forward and backward of one micro-batch; its gradients join the step's sum.
    fn micro_batch(&mut self, batch: &[&TrainPair], epoch: usize, index: usize) -> Result<()> {
        // The micro-batch's graph (its activations) is gone once `gradients` returns, before
        // the sum allocates.
        let grads = self.gradients(batch, epoch, index)?;
        self.accumulate(grads)
    }

    /// The gradients of one micro-batch's loss; its metrics join the step's.
    fn gradients(&mut self, batch: &[&TrainPair], epoch: usize, index: usize) -> Result<GradStore> {
        let args = self.args;
        let recompute = args.gradient_checkpointing;
        let (logps, pass) =
            SideLogps::of(&self.policy.model, batch, self.policy.pad_id, recompute)?;
        let mut passes: Vec<_> = pass.into_iter().collect();
        let means = args.loss.uses_mean_logps();
        let (chosen, rejected) = logps.sides(means);
        // The reference values are sums; a loss on per-token means divides them by the
        // response's length, as the policy's means are divided (in f32).
        let reference = |chosen_side: bool| -> Result<Tensor> {
            let values: Vec<f32> = batch
                .iter()
                .map(|p| {
                    let (c, r) = p
                        .ref_logps
                        .expect("reference log-probs are filled before training");
                    let (sum, side) = if chosen_side {
                        (c, &p.chosen)
                    } else {
                        (r, &p.rejected)
                    };
                    if means {
                        sum / side.response.len().max(1) as f32
                    } else {
                        sum
                    }
                })
                .collect();
            Ok(Tensor::new(values.as_slice(), self.device)?)
        };
        let reference = if args.loss.needs_reference() {
            Some((reference(true)?, reference(false)?))
        } else {
            None
        };
        let weights = if args.weight_col.is_some() {
            let given: Vec<f64> = batch
                .iter()
                .map(|p| p.given_weight.expect("read with --weight-col"))
                .collect();
            given_weights(&given, args.weight_norm)?
        } else {
            let gaps: Vec<f32> = batch.iter().map(|p| p.reward_gap).collect();
            pair_weights(args.weight, args.beta2, &gaps, args.weight_norm)?
        };
        let chosen_tokens: Vec<usize> = batch.iter().map(|p| p.chosen.response.len()).collect();
        let params = ObjectiveParams {
            beta: args.beta,
            label_smoothing: args.label_smoothing,
            simpo_gamma: args.simpo_gamma,
            rpo_alpha: args.rpo_alpha,
        };
        let batch_logps = BatchLogps {
            chosen,
            rejected,
            reference: reference.as_ref().map(|(c, r)| (c, r)),
            chosen_sums: &logps.chosen,
            chosen_tokens: &chosen_tokens,
        };
        let (mut loss, losses) = batch_loss(args.loss, &params, &batch_logps, &weights)?;
        let mut kl = None;
        if args.loss.samples_online() {
            let (surrogate, estimate, pass) =
                crate::hypo::kl_term(args, self.policy, self.reference, batch, epoch, index)?;
            loss = (loss + (surrogate * args.kl_coef)?)?;
            kl = Some(estimate);
            passes.extend(pass);
        }
        let loss = (loss / args.grad_accum as f64)?;
        // Only the trained weights' gradients, detached: a gradient kept with its graph would
        // keep the micro-batch's activations alive until the optimiser step.
        let trained: Vec<&Tensor> = self
            .policy
            .trainable
            .iter()
            .map(|(_, v)| v.as_tensor())
            .collect();
        let grads = optune_model::recomputed_backward(&loss, passes, &trained)?;
        self.step_metrics.add_batch(
            &losses,
            chosen,
            rejected,
            &weights,
            loss.to_scalar::<f32>()? * args.grad_accum as f32,
            kl,
            logps.tokens,
        )?;
        self.tokens += logps.tokens;
        self.micro += 1;
        Ok(grads)
    }

    fn accumulate(&mut self, grads: GradStore) -> Result<()> {
        let trainable = &self.policy.trainable;
        let mut missing = missing_grads(&grads, trainable);
        let buffers = &self.grad_buffers;
        missing.retain(|name| {
            let var = trainable.iter().find(|(n, _)| n == name).map(|(_, v)| v);
            !var.is_some_and(|v| buffers.written(v.as_tensor()))
        });
        if !missing.is_empty() {
            bail!(
                "no gradient reached {} trainable weights (first: {}): a detached op in the forward pass",
                missing.len(),
                missing[0]
            );
        }
        self.accumulated = Some(match self.accumulated.take() {
            None => grads,
            Some(mut sum) => {
                for var in trainable.iter().map(|(_, v)| v.as_tensor()) {
                    let total = match (sum.get(var), grads.get(var)) {
                        (Some(a), Some(b)) => (a + b)?,
                        (None, Some(b)) => b.clone(),
                        (_, None) => continue,
                    };
                    sum.insert(var, total);
                }
                sum
            }
        });
        Ok(())
    }

    /// Clips the summed gradients, steps the optimiser at the scheduled rate, logs the step.
    fn optimizer_step(&mut self, epoch: usize) -> Result<()> {
        let mut grads = self.accumulated.take().expect("a micro-batch ran");
        self.grad_buffers.drain_into(&mut grads)?;
        let max_norm = if self.args.max_grad_norm > 0.0 {
            self.args.max_grad_norm
        } else {
            f64::INFINITY
        };
        let vars = self.policy.trainable.iter().map(|(_, v): &(String, Var)| v);
        let grad_norm = clip_grad_norm(&mut grads, vars, max_norm)?;
        let lr = self.schedule.lr_at(self.optimizer.step_count());
        self.optimizer.set_lr(lr);
        self.optimizer.step(&grads)?;
        self.policy.refresh_compute_weights()?;
        let row = std::mem::take(&mut self.step_metrics).finish(
            self.optimizer.step_count(),
            epoch,
            grad_norm,
            lr,
            self.step_started.elapsed().as_secs_f64(),
        );
        self.progress
            .set_message(format!("loss {:.4} margin {:.3}", row.loss, row.margin));
        self.log.push(row)?;
        self.progress.inc(1);
        self.step_started = Instant::now();
        Ok(())
    }
}

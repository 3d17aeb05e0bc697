//! The training loop: micro-batches of pairs, gradient accumulation, clipping, the optimiser and
//! learning-rate schedule, and the per-step metrics log. With `--devices`, one replica of the
//! policy per device (data parallel): each optimiser step's micro-batches are dealt out to the
//! replicas, which run them at once, each on a thread of its own. Each trained weight has an
//! owner among the replicas ([`crate::parallel::owners`]): its device holds the weight's
//! optimiser moments (and, in bf16/f16 full fine-tuning, its f32 master), adds the replicas'
//! gradients of it after each micro-batch they run, steps it and sends it to the others. So
//! the optimiser's state is dealt out over the devices, as DeepSpeed's ZeRO stage 1 deals it,
//! while every replica holds the whole model in its compute dtype.

use crate::data::{epoch_batches, TrainPair};
use crate::metrics::{MetricsLog, StepMetrics};
use crate::policy::{Policy, SideLogps};
use crate::state::{self, Interrupts, Position, Saved};
use crate::Args;
use anyhow::{bail, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};
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
/// arrives (then ending with an error once it is written). `workers`: the other replicas of
/// `--devices` (none on one device), each a policy loaded as `policy` was and the reference model
/// it holds through training, if any.
#[allow(clippy::too_many_arguments)]
pub fn train(
    args: &Args,
    policy: &mut Policy,
    pairs: &[TrainPair],
    reference: Option<&Transformer>,
    workers: &mut [(Policy, Option<Transformer>)],
    fingerprint: &Fingerprint,
    resumed: Option<Saved>,
) -> Result<Trained> {
    let mut replicas = vec![Replica::new(policy, reference)?];
    for (policy, reference) in workers.iter_mut() {
        replicas.push(Replica::new(policy, reference.as_ref())?);
    }
    let mut trainer = Trainer::new(args, replicas, pairs.len())?;
    let mut start = Position {
        step: 0,
        epoch: 0,
        batch: 0,
        micro: 0,
    };
    if let Some(saved) = resumed {
        let policies: Vec<&Policy> = trainer.replicas.iter().map(|r| &*r.policy).collect();
        saved.restore(&args.output, &policies, &mut trainer.optimizer)?;
        start = saved.position;
        trainer.micro = start.micro;
        trainer.tokens = saved.tokens;
        trainer.log.restore(saved.metrics)?;
        trainer.progress.set_position(start.step);
    }
    // The weights as their owners loaded or restored them.
    send_weights(&mut trainer.replicas, &trainer.owners)?;
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
        // Every epoch's micro-batches in groups of --grad-accum per replica, the last group
        // maybe shorter, as the schedule counts them.
        let group_len = args.grad_accum * trainer.replicas.len();
        let mut group: Vec<(usize, Vec<&TrainPair>)> = Vec::with_capacity(group_len);
        for (b, batch) in batches.iter().enumerate().skip(first) {
            group.push((b, batch.iter().map(|&i| &pairs[i]).collect()));
            if !((b + 1).is_multiple_of(group_len) || b == last_batch) {
                continue;
            }
            trainer.run_group(&group, epoch)?;
            group.clear();
            let epochs_done = epoch as f64 + (b + 1) as f64 / batches.len() as f64;
            trainer.optimizer_step(epochs_done)?;
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
                let policies: Vec<&Policy> = trainer.replicas.iter().map(|r| &*r.policy).collect();
                state::save(
                    &args.output,
                    fingerprint,
                    position,
                    trainer.tokens,
                    &policies,
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
    for replica in &trainer.replicas {
        replica.policy.set_training(false);
    }
    trainer.progress.finish_and_clear();
    Ok(Trained {
        steps: trainer.optimizer.step_count(),
        resumed_from: start.step,
        tokens: trainer.tokens,
        seconds: started.elapsed().as_secs_f64(),
        log: trainer.log,
    })
}

/// One copy of the policy on one device, and what it sums over the current optimiser step.
struct Replica<'a> {
    policy: &'a mut Policy,
    reference: Option<&'a Transformer>,
    /// Gradients summed over the replica's micro-batches since they last went to the owners (a
    /// step's when it is the only replica, one micro-batch's otherwise), but for those the fused
    /// ops sum in `grad_buffers`.
    accumulated: Option<GradStore>,
    grad_buffers: GradBuffers,
    metrics: StepMetrics,
    tokens: usize,
}

/// A micro-batch of a group, where it stands in the run.
struct MicroBatch<'g> {
    /// Micro-batches run since the start before this one: fixes its LoRA dropout masks.
    micro: usize,
    /// Its index in the epoch: fixes HyPO's samples.
    index: usize,
    pairs: &'g [&'g TrainPair],
}

/// Where a micro-batch's LoRA dropout masks start in the dropout stream: each micro-batch has a
/// stretch of its own (2^40 elements, far more than one takes), so that its masks depend on its
/// place in the run only, whichever replica runs it and whatever ran before.
const DROPOUT_ELEMENTS_PER_MICRO_BATCH: u64 = 1 << 40;

impl<'a> Replica<'a> {
    fn new(policy: &'a mut Policy, reference: Option<&'a Transformer>) -> Result<Self> {
        policy.set_training(true);
        // The fused ops write the gradients of the weights they read into buffers of their own.
        let model = &policy.model;
        let fused = optune_kernels::autograd_path(model.device(), model.dtype()) == Path::Fused;
        let weights = policy.trainable.iter().map(|(_, v)| v.as_tensor());
        let grad_buffers = GradBuffers::register(weights.filter(|_| fused))?;
        Ok(Self {
            policy,
            reference,
            accumulated: None,
            grad_buffers,
            metrics: StepMetrics::default(),
            tokens: 0,
        })
    }

    /// The device the replica's policy lives on.
    fn device(&self) -> &Device {
        self.policy.model.device()
    }

    /// Forward and backward of each of `batches`; their gradients join the replica's sum.
    /// `share`: the step's loss is the mean over this many micro-batches (all replicas').
    fn run(
        &mut self,
        args: &Args,
        batches: &[MicroBatch],
        epoch: usize,
        share: usize,
    ) -> Result<()> {
        for batch in batches {
            // The micro-batch's graph (its activations) is gone once `gradients` returns,
            // before the sum allocates.
            let grads = self.gradients(args, batch, epoch, share)?;
            self.accumulate(grads)?;
        }
        // Another replica's stream reads these sums next, and a GPU's streams order nothing
        // between them (optune_cli::runtime turns cudarc's events off): done before it does.
        self.device().synchronize()?;
        Ok(())
    }

    /// The gradients of one micro-batch's loss; its metrics join the replica's.
    fn gradients(
        &mut self,
        args: &Args,
        micro_batch: &MicroBatch,
        epoch: usize,
        share: usize,
    ) -> Result<GradStore> {
        let batch = micro_batch.pairs;
        let dropout_start = micro_batch.micro as u64 * DROPOUT_ELEMENTS_PER_MICRO_BATCH;
        if let Some(lora) = &self.policy.lora {
            lora.dropout_stream.set_position(dropout_start);
        }
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
            Ok(Tensor::new(values.as_slice(), self.device())?)
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
            let (surrogate, estimate, pass) = crate::hypo::kl_term(
                args,
                self.policy,
                self.reference,
                batch,
                epoch,
                micro_batch.index,
            )?;
            loss = (loss + (surrogate * args.kl_coef)?)?;
            kl = Some(estimate);
            passes.extend(pass);
        }
        let loss = (loss / share as f64)?;
        // Only the trained weights' gradients, detached: a gradient kept with its graph would
        // keep the micro-batch's activations alive until the optimiser step.
        let trained: Vec<&Tensor> = self
            .policy
            .trainable
            .iter()
            .map(|(_, v)| v.as_tensor())
            .collect();
        let grads = optune_model::recomputed_backward(&loss, passes, &trained)?;
        if let Some(lora) = &self.policy.lora {
            let taken = lora.dropout_stream.position() - dropout_start;
            if taken >= DROPOUT_ELEMENTS_PER_MICRO_BATCH {
                bail!(
                    "a micro-batch took {taken} LoRA dropout mask elements, past its stretch of \
                     {DROPOUT_ELEMENTS_PER_MICRO_BATCH} of the stream: lower --batch-size or \
                     --max-length"
                );
            }
        }
        self.metrics.add_batch(
            &losses,
            chosen,
            rejected,
            &weights,
            loss.to_scalar::<f32>()? * share as f32,
            kl,
            logps.tokens,
        )?;
        self.tokens += logps.tokens;
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

    /// The replica's summed gradients (none when it ran no micro-batch), the fused ops' buffers
    /// included; the next sum starts from nothing.
    fn take_gradients(&mut self) -> Result<Option<GradStore>> {
        let Some(mut grads) = self.accumulated.take() else {
            return Ok(None);
        };
        self.grad_buffers.drain_into(&mut grads)?;
        Ok(Some(grads))
    }
}

struct Trainer<'a> {
    args: &'a Args,
    replicas: Vec<Replica<'a>>,
    /// The replica owning each trained weight, in the order of the policies' `trainable`.
    owners: Vec<usize>,
    /// Over each weight's owner's variable: the moments live on the owner's device.
    optimizer: Optimizer,
    /// The current step's gradients so far, each weight's summed on its owner's device and keyed
    /// by the owner's variable.
    sums: Option<GradStore>,
    schedule: Schedule,
    micro: usize,
    tokens: usize,
    step_started: Instant,
    log: MetricsLog,
    progress: indicatif::ProgressBar,
}

impl<'a> Trainer<'a> {
    fn new(args: &'a Args, replicas: Vec<Replica<'a>>, pairs: usize) -> Result<Self> {
        let steps_per_epoch = pairs
            .div_ceil(args.batch_size)
            .div_ceil(args.grad_accum * replicas.len());
        let total_steps = args
            .max_steps
            .unwrap_or((steps_per_epoch * args.epochs) as u64);
        let schedule = Schedule {
            peak_lr: args.lr,
            warmup_steps: (args.warmup_ratio * total_steps as f64).ceil() as u64,
            total_steps,
            decay: args.schedule,
        };
        let owners = replicas[0].policy.owners.clone();
        let names = |replica: &Replica| -> Vec<String> {
            let trainable = replica.policy.trainable.iter();
            trainable.map(|(name, _)| name.clone()).collect()
        };
        for replica in &replicas[1..] {
            anyhow::ensure!(
                replica.policy.owners == owners && names(replica) == names(&replicas[0]),
                "the replicas of --devices list their trained weights or owners differently"
            );
        }
        let owned = owners
            .iter()
            .enumerate()
            .map(|(k, &owner)| replicas[owner].policy.trainable[k].clone())
            .collect();
        let optimizer = Optimizer::new(
            decay_groups(owned, args.weight_decay),
            args.optimizer.algorithm(),
            schedule.lr_at(0),
        )?;
        let progress = indicatif::ProgressBar::new(total_steps).with_style(
            indicatif::ProgressStyle::with_template(
                "opt-wdpo {bar:30} {pos}/{len} steps  {msg}  eta {eta}",
            )
            .expect("valid"),
        );
        Ok(Self {
            args,
            replicas,
            owners,
            optimizer,
            sums: None,
            schedule,
            micro: 0,
            tokens: 0,
            step_started: Instant::now(),
            log: MetricsLog::new(args.metrics.as_deref())?,
            progress,
        })
    }

    /// Runs one optimiser step's micro-batches (`(index in the epoch, pairs)`), dealt out in turn
    /// to the replicas, which run theirs at once; their gradients wait in each replica.
    fn run_group(&mut self, group: &[(usize, Vec<&TrainPair>)], epoch: usize) -> Result<()> {
        let args = self.args;
        let count = self.replicas.len();
        let share = args.grad_accum * count;
        let first_micro = self.micro;
        let shares: Vec<Vec<MicroBatch>> = (0..count)
            .map(|replica| {
                group
                    .iter()
                    .enumerate()
                    .filter(|(k, _)| k % count == replica)
                    .map(|(k, (index, pairs))| MicroBatch {
                        micro: first_micro + k,
                        index: *index,
                        pairs,
                    })
                    .collect()
            })
            .collect();
        // Several replicas send their gradients to the owners after every micro-batch each runs
        // (a round): a replica never holds a sum of its own (in bf16/f16 full fine-tuning, f32
        // gradients of the weights others own), and the owners add the micro-batches in the
        // order one device adds them. Alone, the replica sums all of a step's itself.
        let rounds = match count {
            1 => 1,
            _ => shares[0].len(),
        };
        for round in 0..rounds {
            let results = crate::parallel::on_each(&mut self.replicas, |r, replica| {
                let batches = match count {
                    1 => &shares[r][..],
                    _ => shares[r].get(round..round + 1).unwrap_or_default(),
                };
                replica.run(args, batches, epoch, share)
            });
            results.into_iter().collect::<Result<Vec<()>>>()?;
            let mut stores = Vec::with_capacity(count);
            for replica in &mut self.replicas {
                stores.push(replica.take_gradients()?);
            }
            let sums = self.sums.take();
            self.sums = Some(reduce_to_owners(
                &self.replicas,
                &self.owners,
                &stores,
                sums,
            )?);
        }
        self.micro += group.len();
        Ok(())
    }

    /// Clips the step's gradient sums (each on its owner's device), steps the optimiser at the
    /// scheduled rate, sends each new weight from its owner to the other replicas, logs the
    /// step. `epochs_done`: by the end of this step, for the log.
    fn optimizer_step(&mut self, epochs_done: f64) -> Result<()> {
        let mut metrics = StepMetrics::default();
        for replica in &mut self.replicas {
            metrics.merge(std::mem::take(&mut replica.metrics));
            self.tokens += std::mem::take(&mut replica.tokens);
        }
        let mut sums = self.sums.take().expect("a micro-batch ran");
        let max_norm = if self.args.max_grad_norm > 0.0 {
            self.args.max_grad_norm
        } else {
            f64::INFINITY
        };
        let owned = (self.owners.iter().enumerate())
            .map(|(k, &owner)| &self.replicas[owner].policy.trainable[k].1);
        let grad_norm = clip_grad_norm(&mut sums, owned, max_norm)?;
        let lr = self.schedule.lr_at(self.optimizer.step_count());
        self.optimizer.set_lr(lr);
        self.optimizer.step(&sums)?;
        // Before the casts sent to the other replicas take memory of their own.
        drop(sums);
        send_weights(&mut self.replicas, &self.owners)?;
        let row = metrics.finish(
            self.optimizer.step_count(),
            epochs_done,
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

/// `running` (the step's sums so far, if any) with each trained weight's gradients in `stores`
/// (each replica's, in replica order, as one device adds its micro-batches) added, on the
/// weight's owner's device and keyed by the owner's variable. The stores' gradients may be freed
/// once this returns.
fn reduce_to_owners(
    replicas: &[Replica],
    owners: &[usize],
    stores: &[Option<GradStore>],
    running: Option<GradStore>,
) -> Result<GradStore> {
    let mut sums = running.unwrap_or_default();
    for (k, &owner) in owners.iter().enumerate() {
        let device = replicas[owner].device();
        let owner_var = replicas[owner].policy.trainable[k].1.as_tensor();
        // Out of the store, so that the new sum replaces it at once (on the owner's stream,
        // which made both).
        let mut total = sums.remove(owner_var);
        for (replica, store) in replicas.iter().zip(stores) {
            let var = replica.policy.trainable[k].1.as_tensor();
            let Some(grad) = store.as_ref().and_then(|store| store.get(var)) else {
                continue;
            };
            // f32 as the owner's master is (a compute-dtype weight's gradient comes as is).
            let grad = grad.to_device(device)?.to_dtype(DType::F32)?;
            total = Some(match total {
                Some(sum) => (sum + grad)?,
                None => grad,
            });
        }
        if let Some(total) = total {
            sums.insert(owner_var, total);
        }
    }
    // The copies above read each replica's gradients on the owners' streams: done before those
    // are freed on their own.
    for replica in replicas {
        replica.device().synchronize()?;
    }
    Ok(sums)
}

/// Copies each trained weight from its owner (`owners`, by weight) into the other replicas (cast
/// once to their compute dtype where they train the compute weight of another's master), and
/// renews every replica's compute weights: at the start, and after each optimiser step.
fn send_weights(replicas: &mut [Replica], owners: &[usize]) -> Result<()> {
    if replicas.len() > 1 {
        // (weight, the value the others take: the owner's, or its cast)
        let mut sent = Vec::with_capacity(owners.len());
        for (k, &owner) in owners.iter().enumerate() {
            let master = replicas[owner].policy.trainable[k].1.as_tensor();
            let alike =
                (replicas.iter()).all(|r| r.policy.trainable[k].1.dtype() == master.dtype());
            let value = match alike {
                true => master.clone(),
                false => master.to_dtype(replicas[0].policy.model.dtype())?,
            };
            sent.push((k, owner, value));
        }
        // The optimiser's writes and the casts, on the owners' streams, before other streams
        // read them.
        for replica in replicas.iter() {
            replica.device().synchronize()?;
        }
        for (k, owner, value) in &sent {
            for (r, replica) in replicas.iter().enumerate() {
                if r != *owner {
                    let var = &replica.policy.trainable[*k].1;
                    var.set(&value.to_device(replica.device())?.to_dtype(var.dtype())?)?;
                }
            }
        }
        // The copies read the casts on the other streams: done before the casts are freed on
        // the owners' (and their memory taken again by the casts of the refresh below).
        for replica in replicas.iter() {
            replica.device().synchronize()?;
        }
        drop(sent);
    }
    for replica in replicas.iter_mut() {
        replica.policy.refresh_compute_weights()?;
    }
    Ok(())
}

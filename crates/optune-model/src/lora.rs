//! LoRA adapters on the attention/MLP projections, and their PEFT-format files.
//!
//! Phi-3's checkpoints fuse q/k/v into `qkv_proj` and gate/up into `gate_up_proj`
//! (`optune_checkpoint::layout`), which PEFT adapts as one module each. Here each part keeps
//! its own adapter (the targets `qkv_proj` and `gate_up_proj` name the parts), and the PEFT files
//! stack them into the fused module's: `A` the parts' `A` one above the other (rank r per part),
//! `B` block-diagonal, with `rank_pattern` and `alpha_pattern` giving that module r and α times
//! the parts, so its scale α/r and its product are the parts' to the bit.

use crate::linear::{DropoutStream, LoraAdapter};
use crate::transformer::Transformer;
use anyhow::{bail, Result};
use candle_core::{DType, Tensor, Var};
use optune_checkpoint::layout::Layout;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(Debug, Clone)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    pub dropout: f32,
    /// Module names such as `q_proj`, `v_proj`; matched against the last part of each linear.
    pub targets: Vec<String>,
}

impl LoraConfig {
    /// The targets on a model stored as `layout` says: on Phi-3, `qkv_proj` and `gate_up_proj`
    /// stand for their parts, which the model adapts one by one.
    fn resolved(&self, layout: &Layout) -> LoraConfig {
        let mut targets: Vec<String> = Vec::new();
        for target in &self.targets {
            let parts: Vec<String> = (layout.fused().iter())
                .find(|f| f.name.ends_with(&format!(".{target}.weight")))
                .map(|f| f.parts.iter().map(|(part, _)| module_of(part)).collect())
                .unwrap_or_else(|| vec![target.clone()]);
            for part in parts {
                if !targets.contains(&part) {
                    targets.push(part);
                }
            }
        }
        LoraConfig {
            targets,
            ..self.clone()
        }
    }

    /// The target a linear layer's name matches (by its last part), if any.
    fn target_of(&self, linear: &str) -> Option<&String> {
        self.targets
            .iter()
            .find(|t| linear.ends_with(&format!(".{t}")))
    }

    /// Refuses a target that no linear layer matched.
    fn check_matched(&self, matched: &std::collections::BTreeSet<&String>) -> Result<()> {
        if let Some(missing) = self.targets.iter().find(|t| !matched.contains(t)) {
            bail!("--lora-targets '{missing}' matches no linear layer (expected q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj; on phi3 also qkv_proj, gate_up_proj)");
        }
        Ok(())
    }

    /// The adapters [`attach_lora`] makes on a model of `config`, from the config alone: the
    /// PEFT name and shape of A (`[rank, in]`) and B (`[out, rank]`) of each linear layer a
    /// target matches, in the order of the checkpoint's name tree; refused as `attach_lora`
    /// refuses.
    pub fn adapter_weight_shapes(
        &self,
        config: &crate::ModelConfig,
    ) -> Result<Vec<(String, Vec<usize>)>> {
        let this = self.resolved(&Layout::of(config));
        let mut matched = std::collections::BTreeSet::new();
        let mut shapes = Vec::new();
        for (name, shape) in crate::llama_weight_shapes(config) {
            let linear = name
                .strip_suffix(".weight")
                .filter(|_| name.starts_with("model.layers."));
            if let (Some(linear), [out, inp]) = (linear, &shape[..]) {
                if let Some(target) = this.target_of(linear) {
                    matched.insert(target);
                    shapes.push((format!("{linear}.lora_A.weight"), vec![this.rank, *inp]));
                    shapes.push((format!("{linear}.lora_B.weight"), vec![*out, this.rank]));
                }
            }
        }
        this.check_matched(&matched)?;
        Ok(shapes)
    }

    /// The count of the weights in [`LoraConfig::adapter_weight_shapes`].
    pub fn adapter_weight_count(&self, config: &crate::ModelConfig) -> Result<usize> {
        let shapes = self.adapter_weight_shapes(config)?;
        Ok(shapes
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum())
    }
}

/// The last part of a weight's name, the module a target names: `q_proj` for
/// `model.layers.0.self_attn.q_proj.weight`.
fn module_of(weight: &str) -> String {
    let linear = weight.strip_suffix(".weight").unwrap_or(weight);
    linear.rsplit('.').next().unwrap_or(linear).to_string()
}

/// The adapters attached to a model: their trainable variables and the switches they share.
pub struct LoraAdapters {
    /// The config as attached: on Phi-3 with the fused modules' parts as targets.
    pub config: LoraConfig,
    /// How the model's checkpoints store its weights (Phi-3's fused projections, reordered
    /// query and key rows), which the PEFT files follow.
    layout: Layout,
    /// `(PEFT weight name, variable)`, e.g. `model.layers.0.self_attn.q_proj.lora_A.weight`.
    pub vars: Vec<(String, Var)>,
    enabled: Arc<AtomicBool>,
    training: Arc<AtomicBool>,
    /// The dropout masks' random stream, shared by every adapter.
    pub dropout_stream: DropoutStream,
}

impl LoraAdapters {
    /// Turns the adapters off to evaluate the base model (the reference) without a second copy.
    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::Relaxed);
    }

    /// Dropout applies only while training.
    pub fn set_training(&self, on: bool) {
        self.training.store(on, Ordering::Relaxed);
    }

    /// Writes `adapter_config.json` + `adapter_model.safetensors` as the peft library expects.
    pub fn write_peft(&self, dir: &Path, base_model: &str) -> Result<()> {
        let (tensors, stacked) = self.peft_tensors()?;
        let mut targets: Vec<String> = Vec::new();
        for target in &self.config.targets {
            let module = (stacked.iter())
                .find(|(_, (parts, _))| parts.contains(target))
                .map_or(target, |(module, _)| module);
            if !targets.contains(module) {
                targets.push(module.clone());
            }
        }
        // Each stacked module has the parts' rank and alpha times their count: the same scale.
        let (mut rank_pattern, mut alpha_pattern) =
            (serde_json::Map::new(), serde_json::Map::new());
        for (module, (_, parts)) in &stacked {
            let rank = self.config.rank * parts;
            rank_pattern.insert(module.clone(), serde_json::json!(rank));
            alpha_pattern.insert(
                module.clone(),
                serde_json::json!(self.config.alpha * *parts as f64),
            );
        }
        let config = serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": self.config.rank,
            "lora_alpha": self.config.alpha,
            "lora_dropout": self.config.dropout,
            "target_modules": targets,
            "rank_pattern": rank_pattern,
            "alpha_pattern": alpha_pattern,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "use_rslora": false,
            "use_dora": false,
            "modules_to_save": null,
        });
        std::fs::write(
            dir.join("adapter_config.json"),
            serde_json::to_vec_pretty(&config)?,
        )?;
        let tensors: Vec<(String, Tensor)> = (tensors.into_iter())
            .map(|(name, tensor)| (format!("base_model.model.{name}"), tensor))
            .collect();
        optune_checkpoint::write_safetensors(&tensors, &dir.join("adapter_model.safetensors"))
    }

    /// The adapters as PEFT names them, in f32: each fused module's parts stacked into one
    /// adapter (the module doc says how), the others as they are; and for each fused module
    /// adapted, its targets among the parts and their count (the same in every layer).
    #[allow(clippy::type_complexity)]
    fn peft_tensors(
        &self,
    ) -> Result<(
        Vec<(String, Tensor)>,
        std::collections::BTreeMap<String, (Vec<String>, usize)>,
    )> {
        // B's rows follow its weight's, which the checkpoint may store in another order.
        let stored = |linear: &str, matrix: &str, var: &Var| -> Result<Tensor> {
            let t = var.as_tensor().to_dtype(DType::F32)?;
            match matrix {
                "B" => self
                    .layout
                    .rows_to_checkpoint(&format!("{linear}.weight"), &t),
                _ => Ok(t),
            }
        };
        let adapter = |linear: &str, matrix: &str| -> Result<Option<Tensor>> {
            let name = format!("{linear}.lora_{matrix}.weight");
            (self.vars.iter().find(|(n, _)| *n == name))
                .map(|(_, var)| stored(linear, matrix, var))
                .transpose()
        };
        let rank = self.config.rank;
        let mut stacked = std::collections::BTreeMap::new();
        let mut done = std::collections::HashSet::new();
        let mut tensors = Vec::new();
        for fused in self.layout.fused() {
            let mut parts = Vec::new();
            for (part, rows) in &fused.parts {
                let linear = part.strip_suffix(".weight").unwrap_or(part);
                let pair = match (adapter(linear, "A")?, adapter(linear, "B")?) {
                    (Some(a), Some(b)) => Some((a, b)),
                    _ => None,
                };
                parts.push((linear.to_string(), *rows, pair));
            }
            // A fused module none of whose parts is adapted has no adapter.
            let Some((a0, _)) = parts.iter().find_map(|(_, _, pair)| pair.as_ref()) else {
                continue;
            };
            let count = parts.iter().filter(|(_, _, pair)| pair.is_some()).count();
            let device = a0.device().clone();
            let (mut a_rows, mut b_rows, mut column) = (Vec::new(), Vec::new(), 0);
            for (linear, rows, pair) in &parts {
                let block = match pair {
                    Some((a, b)) => {
                        a_rows.push(a.clone());
                        done.insert(linear.clone());
                        let left = Tensor::zeros((*rows, column * rank), DType::F32, &device)?;
                        let right = Tensor::zeros(
                            (*rows, (count - 1 - column) * rank),
                            DType::F32,
                            &device,
                        )?;
                        column += 1;
                        Tensor::cat(&[&left, b, &right], 1)?
                    }
                    None => Tensor::zeros((*rows, count * rank), DType::F32, &device)?,
                };
                b_rows.push(block);
            }
            let linear = fused.name.strip_suffix(".weight").unwrap_or(&fused.name);
            tensors.push((format!("{linear}.lora_A.weight"), Tensor::cat(&a_rows, 0)?));
            tensors.push((format!("{linear}.lora_B.weight"), Tensor::cat(&b_rows, 0)?));
            let targets: Vec<String> = (parts.iter())
                .filter(|(_, _, pair)| pair.is_some())
                .map(|(linear, _, _)| module_of(linear))
                .collect();
            let module = module_of(&fused.name);
            match stacked.get(&module) {
                Some(seen) if *seen != (targets.clone(), count) => {
                    bail!("{module}: adapted parts differ between layers ({seen:?}, {targets:?})")
                }
                _ => {
                    stacked.insert(module, (targets, count));
                }
            }
        }
        for (name, var) in &self.vars {
            let mut parts = name.rsplitn(3, '.');
            let (_, matrix, linear) = (parts.next(), parts.next(), parts.next().unwrap_or(name));
            let matrix = matrix.unwrap_or_default().trim_start_matches("lora_");
            if !done.contains(linear) {
                tensors.push((name.clone(), stored(linear, matrix, var)?));
            }
        }
        Ok((tensors, stacked))
    }
}

/// Attaches fresh adapters to every linear whose module name ends with one of the targets:
/// `A` drawn uniformly in ±1/√in (PEFT's Kaiming-uniform default), `B` zero, so the adapted model
/// starts equal to the base. `seed` also seeds the dropout masks. The adapters are f32 whatever
/// the model's dtype (master weights for mixed precision; optimiser moments follow them).
pub fn attach_lora(
    model: &mut Transformer,
    config: &LoraConfig,
    seed: u64,
) -> Result<LoraAdapters> {
    if config.rank == 0 {
        bail!("--lora-rank must be at least 1");
    }
    let layout = Layout::of(model.config());
    let config = &config.resolved(&layout);
    let enabled = Arc::new(AtomicBool::new(true));
    let training = Arc::new(AtomicBool::new(false));
    // Its own stream ("dropout" in ASCII), apart from the one that drew `A`.
    let dropout_stream = DropoutStream::new(seed ^ 0x64_726f_706f_7574);
    let device = model.device().clone();
    let dtype = DType::F32;
    let mut rng_state = seed ^ 0x5eed_1a7a;
    let mut uniform = move || {
        // SplitMix64 → [0, 1): reproducible and independent of candle's device RNG.
        rng_state = rng_state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = rng_state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    };
    let mut vars = Vec::new();
    let mut matched = std::collections::BTreeSet::new();
    for (name, linear) in model.linears_mut() {
        let Some(target) = config.target_of(&name) else {
            continue;
        };
        matched.insert(target);
        let (out, inp) = linear.weight.dims2()?;
        let bound = 1.0 / (inp as f64).sqrt();
        let a: Vec<f32> = (0..config.rank * inp)
            .map(|_| ((uniform() * 2.0 - 1.0) * bound) as f32)
            .collect();
        let a =
            Var::from_tensor(&Tensor::from_vec(a, (config.rank, inp), &device)?.to_dtype(dtype)?)?;
        let b = Var::zeros((out, config.rank), dtype, &device)?;
        linear.lora = Some(LoraAdapter {
            a: a.as_tensor().clone(),
            b: b.as_tensor().clone(),
            scale: config.alpha / config.rank as f64,
            dropout: config.dropout,
            enabled: enabled.clone(),
            training: training.clone(),
            dropout_stream: dropout_stream.clone(),
        });
        vars.push((format!("{name}.lora_A.weight"), a));
        vars.push((format!("{name}.lora_B.weight"), b));
    }
    config.check_matched(&matched)?;
    Ok(LoraAdapters {
        config: config.clone(),
        layout,
        vars,
        enabled,
        training,
        dropout_stream,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use std::collections::HashMap;

    /// On Phi-3 the PEFT adapter of a fused module computes what its parts' adapters compute:
    /// `(α'/r')·x·Aᵀ·Bᵀ` with the stacked `A`, the block-diagonal `B` and the config's rank and
    /// alpha patterns equals the parts' `(α/r)·x·A_pᵀ·B_pᵀ` stacked, zero for a part left out;
    /// under a partial rotation, with the query and key outputs back in the stored order.
    #[test]
    fn phi3_adapters_stack_into_the_fused_modules() {
        for partial in [1.0, 0.5] {
            fused_adapters_compute_their_parts(partial);
        }
    }

    fn fused_adapters_compute_their_parts(partial: f64) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = optune_testkit::copy_model("tiny-phi3", tmp.path());
        optune_testkit::edit_json(&dir.join("config.json"), |config| {
            config["partial_rotary_factor"] = serde_json::json!(partial);
        });
        let (mut model, _, _) = crate::load_model(&dir, DType::F32, &Device::Cpu).unwrap();
        // The model's order of each head's query and key channels: stored channel of each.
        let d = model.config().head_dim();
        let order = optune_checkpoint::layout::head_order(model.config())
            .unwrap_or_else(|| (0..d).collect());
        let config = LoraConfig {
            rank: 2,
            alpha: 6.0,
            dropout: 0.0,
            targets: vec!["qkv_proj".into(), "up_proj".into()],
        };
        let adapters = attach_lora(&mut model, &config, 7).unwrap();
        // B starts at zero: give every adapter values of its own.
        for (i, (_, var)) in adapters.vars.iter().enumerate() {
            let noise = Tensor::randn(0f32, 1.0, var.dims(), &Device::Cpu).unwrap();
            var.set(&(noise + i as f64).unwrap()).unwrap();
        }
        let out = tempfile::tempdir().unwrap();
        adapters.write_peft(out.path(), "tiny-phi3").unwrap();
        let saved = candle_core::safetensors::load(
            out.path().join("adapter_model.safetensors"),
            &Device::Cpu,
        )
        .unwrap();
        let peft: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.path().join("adapter_config.json")).unwrap())
                .unwrap();
        assert_eq!(
            peft["target_modules"],
            serde_json::json!(["qkv_proj", "gate_up_proj"])
        );
        let ours: HashMap<&str, &Var> =
            adapters.vars.iter().map(|(n, v)| (n.as_str(), v)).collect();
        let x = Tensor::randn(0f32, 1.0, (3, 64), &Device::Cpu).unwrap();
        let delta = |a: &Tensor, b: &Tensor, scale: f64| {
            (x.matmul(&a.t().unwrap())
                .unwrap()
                .matmul(&b.t().unwrap())
                .unwrap()
                * scale)
                .unwrap()
        };
        let p = "model.layers.1";
        for (module, parts) in [
            (
                "self_attn.qkv_proj",
                vec![
                    ("self_attn.q_proj", 64),
                    ("self_attn.k_proj", 32),
                    ("self_attn.v_proj", 32),
                ],
            ),
            (
                "mlp.gate_up_proj",
                vec![("mlp.gate_proj", 128), ("mlp.up_proj", 128)],
            ),
        ] {
            let short = module.rsplit('.').next().unwrap();
            let scale = peft["alpha_pattern"][short].as_f64().unwrap()
                / peft["rank_pattern"][short].as_f64().unwrap();
            assert_eq!(scale, 3.0, "{module}");
            let name =
                |m: &str, matrix: &str| format!("base_model.model.{p}.{m}.lora_{matrix}.weight");
            let fused = delta(
                &saved[&name(module, "A")],
                &saved[&name(module, "B")],
                scale,
            );
            let stacked: Vec<Tensor> = parts
                .iter()
                .map(|(part, rows)| {
                    let a = ours.get(format!("{p}.{part}.lora_A.weight").as_str());
                    let b = ours.get(format!("{p}.{part}.lora_B.weight").as_str());
                    let held = match (a, b) {
                        (Some(a), Some(b)) => delta(a.as_tensor(), b.as_tensor(), 3.0),
                        _ => Tensor::zeros((3, *rows), DType::F32, &Device::Cpu).unwrap(),
                    };
                    if !part.ends_with("q_proj") && !part.ends_with("k_proj") {
                        return held;
                    }
                    // Output channel `h·d + order[j]` of the checkpoint is the model's `h·d + j`.
                    let mut stored_at = vec![0u32; *rows];
                    for (i, slot) in stored_at.iter_mut().enumerate() {
                        let (head, channel) = (i / d, i % d);
                        let j = order.iter().position(|&o| o == channel).unwrap();
                        *slot = (head * d + j) as u32;
                    }
                    let index = Tensor::new(stored_at, &Device::Cpu).unwrap();
                    held.index_select(&index, 1).unwrap()
                })
                .collect();
            let stacked = Tensor::cat(&stacked, 1).unwrap();
            let largest =
                |t: Tensor| -> f32 { t.abs().unwrap().max_all().unwrap().to_scalar().unwrap() };
            let gap = largest((fused - &stacked).unwrap());
            let size = largest(stacked);
            assert!(
                size > 1.0 && gap <= 1e-5 * size,
                "{module} (partial {partial}): {gap} of {size}"
            );
        }
    }
}

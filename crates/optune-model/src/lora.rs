//! LoRA adapters on the attention/MLP projections, and their PEFT-format files.

use crate::linear::{DropoutStream, LoraAdapter};
use crate::transformer::Transformer;
use anyhow::{bail, Result};
use candle_core::{DType, Tensor, Var};
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
    /// The target a linear layer's name matches (by its last part), if any.
    fn target_of(&self, linear: &str) -> Option<&String> {
        self.targets
            .iter()
            .find(|t| linear.ends_with(&format!(".{t}")))
    }

    /// Refuses a target that no linear layer matched.
    fn check_matched(&self, matched: &std::collections::BTreeSet<&String>) -> Result<()> {
        if let Some(missing) = self.targets.iter().find(|t| !matched.contains(t)) {
            bail!("--lora-targets '{missing}' matches no linear layer (expected q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)");
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
        let mut matched = std::collections::BTreeSet::new();
        let mut shapes = Vec::new();
        for (name, shape) in crate::llama_weight_shapes(config) {
            let linear = name
                .strip_suffix(".weight")
                .filter(|_| name.starts_with("model.layers."));
            if let (Some(linear), [out, inp]) = (linear, &shape[..]) {
                if let Some(target) = self.target_of(linear) {
                    matched.insert(target);
                    shapes.push((format!("{linear}.lora_A.weight"), vec![self.rank, *inp]));
                    shapes.push((format!("{linear}.lora_B.weight"), vec![*out, self.rank]));
                }
            }
        }
        self.check_matched(&matched)?;
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

/// The adapters attached to a model: their trainable variables and the switches they share.
pub struct LoraAdapters {
    pub config: LoraConfig,
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
        let config = serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": self.config.rank,
            "lora_alpha": self.config.alpha,
            "lora_dropout": self.config.dropout,
            "target_modules": self.config.targets,
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
        let tensors: Vec<(String, Tensor)> = self
            .vars
            .iter()
            .map(|(name, var)| {
                Ok((
                    format!("base_model.model.{name}"),
                    var.as_tensor().to_dtype(DType::F32)?,
                ))
            })
            .collect::<Result<_>>()?;
        optune_checkpoint::write_safetensors(&tensors, &dir.join("adapter_model.safetensors"))
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
        vars,
        enabled,
        training,
        dropout_stream,
    })
}

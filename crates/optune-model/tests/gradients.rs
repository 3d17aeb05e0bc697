//! Every weight kind gets a correct gradient: autograd against central finite differences in f64.
//! (candle's fused kernels silently detach gradients; this proves our forward avoids them.)

mod common;

use candle_core::{DType, Device, Tensor, Var};
use optune_model::{sequence_logprobs, Checkpoint, TokenizedPair, Transformer};
use std::collections::HashMap;

fn model_with_vars(name: &str) -> (Transformer, Vec<(String, Var)>) {
    let dir = optune_testkit::workspace_root()
        .join("testdata/models")
        .join(name);
    let ckpt = Checkpoint::read(&dir, &Device::Cpu).unwrap();
    let mut vars = Vec::new();
    let mut tensors = HashMap::new();
    for (n, t) in ckpt.tensors {
        let var = Var::from_tensor(&t.to_dtype(DType::F64).unwrap()).unwrap();
        tensors.insert(n.clone(), var.as_tensor().clone());
        vars.push((n, var));
    }
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let model =
        Transformer::from_weights(&ckpt.meta.config, tensors, DType::F64, &Device::Cpu).unwrap();
    (model, vars)
}

fn loss(model: &Transformer, pairs: &[TokenizedPair]) -> Tensor {
    // Unequal weights so that a gradient summed over the wrong rows would show.
    let logps = sequence_logprobs(model, pairs, 3).unwrap();
    let w = Tensor::new(&[1.0f64, -0.7, 0.4], &Device::Cpu).unwrap();
    (logps.sums * w).unwrap().sum_all().unwrap()
}

fn check(name: &str, kinds: &[&str]) {
    let (model, vars) = model_with_vars(name);
    let pairs = common::pairs();
    let grads = loss(&model, &pairs).backward().unwrap();
    let missing: Vec<&String> = vars
        .iter()
        .filter(|(_, v)| grads.get(v.as_tensor()).is_none())
        .map(|(n, _)| n)
        .collect();
    assert!(
        missing.is_empty(),
        "{name}: variables without gradient: {missing:?}"
    );
    for kind in kinds {
        let (pname, var) = vars
            .iter()
            .find(|(n, _)| n.contains(kind))
            .unwrap_or_else(|| panic!("{name}: no weight like {kind}"));
        let grad: Vec<f64> = grads
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let original: Vec<f64> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        let n = original.len();
        // A handful of spread-out elements, including the first and the last.
        for &i in &[0, n / 3, n / 2 + 1, n - 1] {
            let eps = 1e-5;
            let at = |delta: f64| {
                let mut v = original.clone();
                v[i] += delta;
                var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                loss(&model, &pairs).to_scalar::<f64>().unwrap()
            };
            let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
            var.set(&Tensor::from_vec(original.clone(), var.shape(), &Device::Cpu).unwrap())
                .unwrap();
            let err = (grad[i] - numeric).abs() / numeric.abs().max(grad[i].abs()).max(1e-3);
            assert!(
                err < 1e-5,
                "{name} {pname}[{i}]: autograd {} vs finite difference {numeric} (rel err {err:e})",
                grad[i]
            );
        }
    }
}

#[test]
fn llama_tied_embeddings_norms_attention_mlp() {
    check(
        "tiny-llama",
        &[
            "embed_tokens",
            "layers.0.input_layernorm",
            "q_proj.weight",
            "k_proj.weight",
            "v_proj.weight",
            "o_proj.weight",
            "post_attention_layernorm",
            "gate_proj",
            "up_proj",
            "down_proj",
            "model.norm",
        ],
    );
}

#[test]
fn qwen2_biases_and_untied_head() {
    check(
        "tiny-qwen2",
        &[
            "lm_head",
            "q_proj.bias",
            "k_proj.bias",
            "v_proj.bias",
            "embed_tokens",
        ],
    );
}

#[test]
fn qwen3_head_norms_and_wide_heads() {
    check(
        "tiny-qwen3",
        &[
            "layers.0.self_attn.q_norm",
            "layers.1.self_attn.k_norm",
            "q_proj.weight",
            "k_proj.weight",
            "o_proj.weight",
            "embed_tokens",
        ],
    );
}

#[test]
fn olmo2_norms_after_the_sublayers_and_of_whole_projections() {
    check(
        "tiny-olmo2",
        &[
            "layers.0.self_attn.q_norm",
            "layers.1.self_attn.k_norm",
            "layers.0.post_attention_layernorm",
            "layers.1.post_feedforward_layernorm",
            "q_proj.weight",
            "down_proj.weight",
            "embed_tokens",
        ],
    );
}

#[test]
fn olmo3_sliding_and_full_layers() {
    check(
        "tiny-olmo3",
        &[
            "layers.0.self_attn.q_proj.weight",
            "layers.0.self_attn.k_norm",
            "layers.1.self_attn.k_proj.weight",
            "embed_tokens",
        ],
    );
}

#[test]
fn exaone4_head_norms_after_the_sublayers_and_a_full_layer_without_rotation() {
    check(
        "tiny-exaone4",
        &[
            "layers.0.self_attn.q_norm",
            "layers.1.self_attn.k_norm",
            "layers.1.self_attn.q_proj.weight",
            "layers.0.post_feedforward_layernorm",
        ],
    );
}

#[test]
fn gemma3_offset_norms_scaled_embedding_and_gelu_gate() {
    check(
        "tiny-gemma3",
        &[
            "embed_tokens",
            "layers.0.input_layernorm",
            "layers.0.post_attention_layernorm",
            "layers.1.pre_feedforward_layernorm",
            "layers.1.post_feedforward_layernorm",
            "layers.0.self_attn.q_norm",
            "gate_proj",
            "model.norm",
        ],
    );
}

#[test]
fn granite_multipliers() {
    check(
        "tiny-granite",
        &[
            "embed_tokens",
            "layers.0.self_attn.q_proj.weight",
            "layers.1.mlp.down_proj.weight",
            "model.norm",
        ],
    );
}

#[test]
fn mistral_sliding_window() {
    check(
        "tiny-mistral",
        &[
            "layers.1.self_attn.q_proj.weight",
            "layers.0.self_attn.k_proj.weight",
            "lm_head",
        ],
    );
}

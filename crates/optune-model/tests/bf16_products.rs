//! The decode step under bf16 products (`--dtype bf16` on a CPU with bf16 products). Its own test
//! binary: the product precision is process-wide and would reach the other tests' threads.

use candle_core::{DType, Device, Var};
use optune_kernels::{bf16_products_available, set_f32_product_precision, ProductPrecision};
use optune_model::generate::{generate, stream_seed, GenerationRequest, SamplingParams, Stopping};
use optune_model::{load_model, Transformer};
use std::collections::HashMap;

fn tiny_llama() -> Transformer {
    let dir = optune_testkit::workspace_root().join("testdata/models/tiny-llama");
    load_model(&dir, DType::F32, &Device::Cpu).unwrap().0
}

fn greedy(model: &Transformer) -> Vec<Vec<u32>> {
    let requests: Vec<GenerationRequest> = [vec![1, 40, 41, 42, 43], vec![1, 300, 301]]
        .into_iter()
        .enumerate()
        .map(|(i, prompt_ids)| GenerationRequest {
            prompt_ids,
            seed: stream_seed(3, &format!("p{i}"), 0),
        })
        .collect();
    let params = SamplingParams {
        temperature: 0.0,
        top_p: 1.0,
        top_k: None,
        min_p: 0.0,
        max_new_tokens: 12,
    };
    generate(model, &requests, &params, Stopping::eos(&[]), 2, |_, _| {})
        .unwrap()
        .generations
        .into_iter()
        .map(|g| g.tokens)
        .collect()
}

/// Full fine-tuning updates its weights in place (same tensor ids): a decode step after the
/// update must read the new weights, not a packing of the old ones (HyPO samples mid-training).
#[test]
fn decoding_reads_variables_updated_in_place() {
    if !bf16_products_available() {
        eprintln!("skipped: this CPU runs no bf16 products");
        return;
    }
    set_f32_product_precision(ProductPrecision::Bf16).unwrap();
    let mut model = tiny_llama();
    let mut vars: HashMap<String, Var> = HashMap::new();
    model
        .map_weights(&mut |name, t| {
            let var = Var::from_tensor(t)?;
            vars.insert(name.to_string(), var.clone());
            Ok(var.as_tensor().clone())
        })
        .unwrap();
    let before = greedy(&model);
    // Scale every projection in place, as an optimiser step would change them.
    for (name, var) in &vars {
        if name.ends_with("proj.weight") {
            var.set(&(var.as_tensor() * 1.5).unwrap()).unwrap();
        }
    }
    let after = greedy(&model);
    let fresh = {
        let mut m = tiny_llama();
        m.map_weights(&mut |name, t| match vars.get(name) {
            Some(v) => Ok(v.as_tensor().copy()?),
            None => Ok(t.clone()),
        })
        .unwrap();
        greedy(&m)
    };
    assert_eq!(after, fresh, "decoding after an in-place update");
    assert_ne!(
        before, after,
        "the update changed nothing: the test cannot tell stale weights"
    );
}

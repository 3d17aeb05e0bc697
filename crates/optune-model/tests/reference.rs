//! Our model against values produced by Hugging Face transformers
//! (`scripts/reference/make_testdata.py`, outputs committed under `testdata/reference/`).

use candle_core::{DType, Device, Tensor};
use optune_model::tokenizer::{ChatMessage, Prompt};
use optune_model::{
    load_model, packed_sequence_scores, sequence_logprobs, sequence_scores, KvCache, PaddedBatch,
    TokenizedPair,
};
use serde_json::Value;
use std::path::PathBuf;

fn testdata() -> PathBuf {
    optune_testkit::workspace_root().join("testdata")
}

fn reference(name: &str) -> Value {
    let path = testdata().join("reference").join(format!("{name}.json"));
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn messages(v: &Value) -> Vec<ChatMessage> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|m| ChatMessage::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
        .collect()
}

fn prompt_of(case: &Value) -> Prompt {
    match case.get("messages") {
        Some(m) if !m.is_null() => Prompt::Messages(messages(m)),
        _ => Prompt::Text(case["prompt"].as_str().unwrap().to_string()),
    }
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn assert_close(ours: f64, theirs: f64, rel: f64, what: &str) {
    let tol = rel * theirs.abs().max(1.0);
    assert!(
        (ours - theirs).abs() <= tol,
        "{what}: ours {ours} vs transformers {theirs} (tol {tol})"
    );
}

fn check_causal_model(name: &str) {
    let reference = reference(name);
    let (model, tokenizer, meta) = load_model(
        &testdata().join("models").join(name),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let cases = reference["cases"].as_array().unwrap();
    let mut pairs = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let prompt = prompt_of(case);
        let text = tokenizer.render_prompt(&prompt).unwrap();
        assert_eq!(
            text,
            case["prompt_text"].as_str().unwrap(),
            "{name} case {i}: rendered prompt"
        );
        let (prompt_ids, response_ids) = tokenizer
            .encode_pair(&prompt, case["response"].as_str().unwrap())
            .unwrap();
        assert_eq!(
            prompt_ids,
            ids(&case["prompt_ids"]),
            "{name} case {i}: prompt ids"
        );
        assert_eq!(
            response_ids,
            ids(&case["response_ids"]),
            "{name} case {i}: response ids"
        );
        pairs.push(TokenizedPair {
            prompt: prompt_ids,
            response: response_ids,
        });
    }
    // Training path: one right-padded batch of unequal lengths.
    let pad = reference["pad_token_id"].as_u64().unwrap() as u32;
    let logps = sequence_logprobs(&model, &pairs, pad).unwrap();
    let sums: Vec<f32> = logps.sums.to_vec1().unwrap();
    let means: Vec<f32> = logps.means().unwrap().to_vec1().unwrap();
    for (i, case) in cases.iter().enumerate() {
        assert_close(
            sums[i] as f64,
            case["sum_logp"].as_f64().unwrap(),
            1e-4,
            &format!("{name} case {i} sum"),
        );
        assert_close(
            means[i] as f64,
            case["mean_logp"].as_f64().unwrap(),
            1e-4,
            &format!("{name} case {i} mean"),
        );
    }
    // Raw logits at two positions of case 0.
    let sample = &reference["logits_sample"];
    let case = sample["case"].as_u64().unwrap() as usize;
    let seq: Vec<u32> = pairs[case]
        .prompt
        .iter()
        .chain(&pairs[case].response)
        .copied()
        .collect();
    let batch = PaddedBatch::right_padded(&[seq], pad, &Device::Cpu).unwrap();
    let hidden = model.hidden_states(&batch).unwrap().squeeze(0).unwrap();
    for key in ["last_prompt_position", "last_response_position"] {
        let pos = sample[key].as_u64().unwrap() as usize;
        let logits: Vec<f32> = model
            .head_logits(&hidden.narrow(0, pos, 1).unwrap())
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1()
            .unwrap();
        let expected = floats(&sample[format!("{key}_logits").as_str()]);
        for (v, (a, b)) in logits.iter().zip(&expected).enumerate() {
            assert_close(*a as f64, *b, 1e-4, &format!("{name} {key} logit {v}"));
        }
    }
    // Inference path: prefill the prompt, then feed the response token by token through the
    // KV cache, in a batch of all cases at once (slots of different lengths).
    let mut cache = KvCache::new(&model, pairs.len(), 256).unwrap();
    let mut per_token: Vec<Vec<f64>> = vec![Vec::new(); pairs.len()];
    for (slot, pair) in pairs.iter().enumerate() {
        let logits = model.prefill(&pair.prompt, &mut cache, slot).unwrap();
        per_token[slot].push(logprob(&logits, pair.response[0]));
    }
    let longest = pairs.iter().map(|p| p.response.len()).max().unwrap();
    for step in 1..longest {
        let feed: Vec<Option<u32>> = pairs
            .iter()
            .map(|p| (step < p.response.len()).then(|| p.response[step - 1]))
            .collect();
        let logits = model.decode_step(&feed, &mut cache).unwrap();
        for (slot, pair) in pairs.iter().enumerate() {
            if step < pair.response.len() {
                per_token[slot].push(logprob(&logits.get(slot).unwrap(), pair.response[step]));
            }
        }
    }
    for (i, case) in cases.iter().enumerate() {
        for (t, (ours, theirs)) in per_token[i]
            .iter()
            .zip(floats(&case["token_logps"]))
            .enumerate()
        {
            assert_close(
                *ours,
                theirs,
                1e-4,
                &format!("{name} case {i} cached token {t}"),
            );
        }
    }
    let eos = reference["eos_token_id"].as_u64().unwrap() as u32;
    assert!(
        meta.eos_token_ids.contains(&eos),
        "{name}: generation stops at {:?}, not at {eos}",
        meta.eos_token_ids
    );
}

fn logprob(logits: &Tensor, token: u32) -> f64 {
    let v: Vec<f32> = logits.to_vec1().unwrap();
    let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let z = max + v.iter().map(|&l| (l as f64 - max).exp()).sum::<f64>().ln();
    v[token as usize] as f64 - z
}

#[test]
fn llama_matches_transformers() {
    check_causal_model("tiny-llama");
}

#[test]
fn mistral_matches_transformers() {
    check_causal_model("tiny-mistral");
}

#[test]
fn qwen2_matches_transformers() {
    check_causal_model("tiny-qwen2");
}

#[test]
fn qwen3_matches_transformers() {
    check_causal_model("tiny-qwen3");
}

#[test]
fn phi3_matches_transformers() {
    check_causal_model("tiny-phi3");
}

#[test]
fn smollm3_matches_transformers() {
    check_causal_model("tiny-smollm3");
}

#[test]
fn olmo2_matches_transformers() {
    check_causal_model("tiny-olmo2");
}

#[test]
fn olmo3_matches_transformers() {
    check_causal_model("tiny-olmo3");
}

#[test]
fn exaone4_matches_transformers() {
    check_causal_model("tiny-exaone4");
}

#[test]
fn gemma3_matches_transformers() {
    check_causal_model("tiny-gemma3");
}

#[test]
fn granite_matches_transformers() {
    check_causal_model("tiny-granite");
}

fn check_reward_model(name: &str) {
    let reference = reference(name);
    let (model, tokenizer, _) = load_model(
        &testdata().join("models").join(name),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let mut sequences = Vec::new();
    for case in reference["cases"].as_array().unwrap() {
        let mut conversation = match prompt_of(case) {
            Prompt::Messages(m) => m,
            Prompt::Text(t) => vec![ChatMessage::new("user", t)],
        };
        conversation.push(ChatMessage::new(
            "assistant",
            case["response"].as_str().unwrap(),
        ));
        let text = tokenizer.apply_chat_template(&conversation, false).unwrap();
        assert_eq!(text, case["text"].as_str().unwrap());
        let tokens = tokenizer.encode(&text).unwrap();
        assert_eq!(tokens, ids(&case["input_ids"]));
        sequences.push(tokens);
    }
    let pad = reference["pad_token_id"].as_u64().unwrap() as u32;
    let scores: Vec<f32> = sequence_scores(&model, &sequences, pad)
        .unwrap()
        .to_vec1()
        .unwrap();
    // Packed through a KV cache: whole, and fed in pieces of 5 tokens.
    let tokens: Vec<&[u32]> = sequences.iter().map(Vec::as_slice).collect();
    let whole = packed_sequence_scores(&model, &tokens, usize::MAX).unwrap();
    let pieces = packed_sequence_scores(&model, &tokens, 5).unwrap();
    // The host kernels (the CPU's fused path) compute every row on its own.
    if !optune_testkit::generic_kernels() {
        assert_eq!(
            whole, pieces,
            "{name}: pieces of 5 tokens against whole sequences"
        );
    }
    for (i, case) in reference["cases"].as_array().unwrap().iter().enumerate() {
        let expected = case["score"].as_f64().unwrap();
        for (form, score) in [
            ("padded", scores[i]),
            ("packed", whole[i]),
            ("in pieces", pieces[i]),
        ] {
            assert_close(
                score as f64,
                expected,
                1e-4,
                &format!("{name} case {i} score, {form}"),
            );
        }
    }
}

#[test]
fn reward_models_match_transformers() {
    for name in optune_testkit::REWARD_MODELS {
        check_reward_model(name);
    }
}

#[test]
fn chat_templates_render_like_transformers() {
    let reference = reference("chat_templates");
    let mut checked = 0;
    let groups = [&reference["models"], &reference["extra_templates"]];
    for group in groups {
        for (name, entry) in group.as_object().unwrap() {
            let config = serde_json::json!({
                "chat_template": entry["chat_template"],
                "bos_token": entry["bos_token"], "eos_token": entry["eos_token"],
            });
            let tokenizer_json =
                std::fs::read_to_string(testdata().join("models/tiny-llama/tokenizer.json"))
                    .unwrap();
            let tokenizer =
                optune_model::ChatTokenizer::from_parts(&tokenizer_json, &config).unwrap();
            for case in entry["cases"].as_array().unwrap() {
                let msgs = messages(&case["messages"]);
                let rendered = tokenizer
                    .apply_chat_template(&msgs, case["add_generation_prompt"].as_bool().unwrap());
                match case.get("rendered").and_then(Value::as_str) {
                    Some(expected) => {
                        assert_eq!(rendered.unwrap(), expected, "{name} / {}", case["name"])
                    }
                    None => assert!(
                        rendered.is_err(),
                        "{name} / {}: transformers raised, we rendered",
                        case["name"]
                    ),
                }
                checked += 1;
            }
        }
    }
    assert!(checked >= 10, "only {checked} template cases");
}

/// Variables beside the messages (`--chat-template-kwargs`, transformers'
/// `apply_chat_template(**kwargs)`): Qwen3's `enable_thinking`, on and off, against transformers;
/// and the refusals of names the rendering sets itself and of variables without a template.
#[test]
fn template_variables_render_like_transformers() {
    let reference = reference("chat_templates");
    let dir = testdata().join("models/tiny-qwen3");
    let mut checked = 0;
    for case in reference["template_variables"]["tiny-qwen3"]
        .as_array()
        .unwrap()
    {
        let mut tokenizer = optune_model::ChatTokenizer::from_dir(&dir).unwrap();
        let variables = case["variables"].as_object().unwrap().clone();
        tokenizer.set_template_variables(variables).unwrap();
        let rendered = tokenizer
            .apply_chat_template(
                &messages(&case["messages"]),
                case["add_generation_prompt"].as_bool().unwrap(),
            )
            .unwrap();
        let expected = case["rendered"].as_str().unwrap();
        assert_eq!(rendered, expected, "{} {}", case["name"], case["variables"]);
        checked += expected.contains("<think>") as usize;
    }
    assert!(checked >= 6, "only {checked} renderings open a think block");

    let variables = |json: Value| json.as_object().unwrap().clone();
    let mut tokenizer = optune_model::ChatTokenizer::from_dir(&dir).unwrap();
    let clash = tokenizer
        .set_template_variables(variables(serde_json::json!({"eos_token": "x"})))
        .unwrap_err();
    assert!(format!("{clash}").contains("'eos_token'"), "{clash}");
    let mut untemplated =
        optune_model::ChatTokenizer::from_dir(&testdata().join("models/tiny-llama-base")).unwrap();
    let unread = untemplated
        .set_template_variables(variables(serde_json::json!({"enable_thinking": false})))
        .unwrap_err();
    assert!(format!("{unread}").contains("no chat_template"), "{unread}");
}

/// The untemplated tiny-llama-base (`scripts/reference/make_base_testdata.py`): raw-text prompts
/// tokenised as transformers' `tokenizer(prompt)` does, BOS first, give its log-probs in training
/// and through the KV cache.
#[test]
fn untemplated_base_model_matches_transformers() {
    check_causal_model("tiny-llama-base");
}

/// Which special tokens `tokenizer(text)` adds for a tokenizer class, its add_bos_token /
/// add_eos_token and tokenizer.json's post-processor, against transformers.
#[test]
fn raw_text_gets_the_special_tokens_transformers_adds() {
    let reference = reference("tiny-llama-base");
    let read = |model: &str, file: &str| -> Value {
        let path = testdata().join("models").join(model).join(file);
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    };
    let with_bos = read("tiny-llama-base", "tokenizer.json");
    let byte_level = read("tiny-llama", "tokenizer.json");
    let texts = reference["variant_texts"].as_array().unwrap();
    let variants = reference["tokenizer_variants"].as_array().unwrap();
    for variant in variants {
        let tokenizer_json = match variant["post_processor"].as_str().unwrap() {
            "bos" => &with_bos,
            "bytelevel" => &byte_level,
            other => panic!("unknown post-processor {other}"),
        };
        let mut config = read("tiny-llama-base", "tokenizer_config.json");
        config["tokenizer_class"] = variant["tokenizer_class"].clone();
        for (key, value) in variant["config"].as_object().unwrap() {
            config[key] = value.clone();
        }
        let tokenizer =
            optune_model::ChatTokenizer::from_parts(&tokenizer_json.to_string(), &config).unwrap();
        for (text, expected) in texts.iter().zip(variant["ids"].as_array().unwrap()) {
            let prompt = Prompt::Text(text.as_str().unwrap().to_string());
            assert_eq!(
                tokenizer.encode_prompt(&prompt).unwrap(),
                ids(expected),
                "{} with the {} post-processor and {}",
                variant["tokenizer_class"],
                variant["post_processor"],
                variant["config"]
            );
        }
    }
    assert_eq!(variants.len(), 9);
}

/// Every `rope_scaling` form's inverse frequencies and attention factor against transformers'
/// `ROPE_INIT_FUNCTIONS` (`scripts/reference/make_rope_scaling_testdata.py`).
#[test]
fn rope_scaling_frequencies_match_transformers() {
    let reference = reference("rope_scaling");
    for case in reference["frequencies"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let config = optune_model::ModelConfig::from_json_str(&case["config"].to_string()).unwrap();
        let ours = optune_model::rope::rotary_frequencies(&config);
        let theirs = floats(&case["inv_freq"]);
        // Under a partial rotation transformers gives the rotated pairs' frequencies; the pairs
        // after them hold passed-through channels here, with frequency 0.
        assert_eq!(
            ours.inverse.len(),
            config.head_dim() / 2,
            "{name}: channel pairs"
        );
        assert!(
            ours.inverse[theirs.len()..].iter().all(|f| *f == 0.0),
            "{name}: {:?}",
            ours.inverse
        );
        for (i, (a, b)) in ours.inverse.iter().zip(&theirs).enumerate() {
            // transformers computes them in f32.
            assert!(
                (a - b).abs() <= 1e-6 * b.abs(),
                "{name} frequency {i}: ours {a} vs transformers {b}"
            );
        }
        assert_close(
            ours.attention_factor,
            case["attention_factor"].as_f64().unwrap(),
            1e-12,
            &format!("{name} attention factor"),
        );
    }
}

/// Test models under another `rope_scaling` (a copy of the model directory with the config's
/// scaling replaced) give transformers' per-token log-probs on the training path and through
/// the KV cache: YaRN and linear scaling on sequences longer than the context they stretch (the
/// YaRN model's longer one past `max_position_embeddings`, into the positions YaRN adds),
/// Phi-3's LongRoPE up to its original context, and Phi-4-mini's rotation of part of each head
/// (with LongRoPE over those channels).
#[test]
fn rope_scaled_models_match_transformers() {
    let reference = reference("rope_scaling");
    for case in reference["models"].as_array().unwrap() {
        let name = case["model"].as_str().unwrap();
        let label = format!("{name} {}", case["label"].as_str().unwrap());
        let tmp = tempfile::tempdir().unwrap();
        let dir = optune_testkit::copy_model(name, tmp.path());
        optune_testkit::edit_json(&dir.join("config.json"), |config| {
            for (key, value) in case["config"].as_object().unwrap() {
                config[key] = value.clone();
            }
        });
        let (model, _, _) = load_model(&dir, DType::F32, &Device::Cpu).unwrap();
        let sequences: Vec<Vec<u32>> = case["sequences"]
            .as_array()
            .unwrap()
            .iter()
            .map(ids)
            .collect();
        let expected: Vec<Vec<f64>> = case["token_logps"]
            .as_array()
            .unwrap()
            .iter()
            .map(floats)
            .collect();
        let longest = sequences.iter().map(Vec::len).max().unwrap();
        assert!(longest <= model.max_positions(), "{label}: positions");

        // Training path: the first token as the prompt, the rest as the response.
        let pairs: Vec<TokenizedPair> = sequences
            .iter()
            .map(|s| TokenizedPair {
                prompt: s[..1].to_vec(),
                response: s[1..].to_vec(),
            })
            .collect();
        let pad = case["pad_token_id"].as_u64().unwrap() as u32;
        let sums: Vec<f32> = sequence_logprobs(&model, &pairs, pad)
            .unwrap()
            .sums
            .to_vec1()
            .unwrap();
        for (i, sum) in sums.iter().enumerate() {
            let theirs: f64 = expected[i].iter().sum();
            assert_close(
                *sum as f64,
                theirs,
                1e-5,
                &format!("{label} sequence {i} sum"),
            );
        }

        // Inference path: an 8-token prefill, then token by token through the cache.
        let prefix = 8;
        let mut cache = KvCache::new(&model, sequences.len(), longest).unwrap();
        let mut per_token: Vec<Vec<f64>> = vec![Vec::new(); sequences.len()];
        for (slot, seq) in sequences.iter().enumerate() {
            let logits = model.prefill(&seq[..prefix], &mut cache, slot).unwrap();
            per_token[slot].push(logprob(&logits, seq[prefix]));
        }
        for step in prefix + 1..longest {
            let feed: Vec<Option<u32>> = sequences
                .iter()
                .map(|s| (step < s.len()).then(|| s[step - 1]))
                .collect();
            let logits = model.decode_step(&feed, &mut cache).unwrap();
            for (slot, seq) in sequences.iter().enumerate() {
                if step < seq.len() {
                    per_token[slot].push(logprob(&logits.get(slot).unwrap(), seq[step]));
                }
            }
        }
        for (i, ours) in per_token.iter().enumerate() {
            let theirs = &expected[i][prefix - 1..];
            assert_eq!(ours.len(), theirs.len(), "{label} sequence {i}: tokens");
            for (t, (a, b)) in ours.iter().zip(theirs).enumerate() {
                assert_close(
                    *a,
                    *b,
                    1e-4,
                    &format!("{label} sequence {i} cached token {t}"),
                );
            }
        }
    }
}

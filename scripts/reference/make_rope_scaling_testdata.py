#!/usr/bin/env python3
"""Rotary scaling forms (rope_scaling) as transformers computes them, for the Rust tests.

Run by hand after make_testdata.py (never from CI):

    python scripts/reference/make_rope_scaling_testdata.py

Writes testdata/reference/rope_scaling.json:
    frequencies   for each config below, the inverse frequencies and the attention factor that
                  transformers' ROPE_INIT_FUNCTIONS give (the tables' scale: YaRN's, else 1);
    models        tiny-qwen3, tiny-llama and tiny-phi3 (testdata/models) loaded with another
                  rope_scaling (config fields in "config"; the weights as they are), and for two
                  token sequences each, the log-probs of every token after the first under one
                  right-padded batch. For YaRN and linear scaling one sequence runs past the
                  original context the scaling stretches; the YaRN model's longer one runs past
                  max_position_embeddings (256) into the positions YaRN adds (original 64 x
                  factor 8 = 512). LongRoPE (Phi-3.5's form) stays within its original context
                  (64 of 256 positions), where transformers uses the short factors.

The script asserts that every scaled model's log-probs differ from the unscaled model's (by
more than 1e-3 on the longer sequence), so a test that ignored the scaling would fail.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

REPO = Path(__file__).resolve().parents[2]
MODELS = REPO / "testdata" / "models"
OUT = REPO / "testdata" / "reference" / "rope_scaling.json"

# LongRoPE factors per channel pair (head_dim 16: eight), rising like Phi-3.5's.
SHORT = [1.0, 1.0, 1.05, 1.1, 1.3, 1.6, 2.2, 3.0]
LONG = [1.0, 1.2, 1.5, 2.0, 3.0, 4.5, 7.0, 10.0]

# Configs whose frequencies are compared: head_dim 64 over theta 1e6 (Qwen-like) and head_dim 16
# over 5e5, so the YaRN ramp lands inside the channels in some and at their edges in others.
FREQUENCY_CASES = [
    ("linear", 64, 1e6, 4096, {"rope_type": "linear", "factor": 4.0}),
    ("dynamic", 64, 1e6, 4096, {"rope_type": "dynamic", "factor": 2.0}),
    (
        "llama3",
        64,
        5e5,
        131072,
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    ),
    (
        "yarn-qwen3",
        128,
        1e6,
        40960,
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
    ),
    ("yarn-no-original", 64, 1e4, 4096, {"rope_type": "yarn", "factor": 2.0}),
    (
        "yarn-mscale",
        64,
        1e4,
        4096,
        {"rope_type": "yarn", "factor": 40.0, "mscale": 1.0, "mscale_all_dim": 0.707,
         "original_max_position_embeddings": 4096, "beta_fast": 32.0, "beta_slow": 1.0},
    ),
    (
        "yarn-untruncated",
        16,
        5e5,
        256,
        {"rope_type": "yarn", "factor": 8.0, "attention_factor": 1.3, "beta_fast": 16.0,
         "beta_slow": 2.0, "truncate": False, "original_max_position_embeddings": 32},
    ),
    ("yarn-type-key", 64, 1e4, 4096, {"type": "yarn", "factor": 3.0}),
    (
        "longrope-factor",
        16,
        1e4,
        4096,
        {"rope_type": "longrope", "factor": 8.0, "short_factor": SHORT, "long_factor": LONG},
    ),
    (
        "partial-yarn",
        16,
        1e4,
        4096,
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024},
        0.5,
    ),
    (
        "longrope-attention-factor",
        16,
        1e4,
        4096,
        {"rope_type": "longrope", "attention_factor": 1.25, "short_factor": SHORT,
         "long_factor": LONG},
    ),
]

MODEL_CASES = [
    (
        "tiny-qwen3",
        "yarn",
        {"rope_scaling": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64}},
        [300, 90],
    ),
    ("tiny-llama", "linear", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, [200, 70]),
    (
        "tiny-phi3",
        "longrope",
        # Phi-3.5-mini's layout: the original context at the top level, the stretch (4 here)
        # from it and max_position_embeddings.
        {"rope_scaling": {"type": "longrope", "short_factor": SHORT, "long_factor": LONG},
         "original_max_position_embeddings": 64},
        [64, 40],
    ),
    (
        "tiny-phi3",
        "partial rotary",
        # Half of each 16-channel head rotated.
        {"partial_rotary_factor": 0.5},
        [120, 50],
    ),
    (
        "tiny-phi3",
        "partial rotary longrope",
        # Phi-4-mini's layout: three quarters of each head rotated, LongRoPE over those channels.
        {"partial_rotary_factor": 0.75,
         "rope_scaling": {"type": "longrope", "short_factor": SHORT[:6], "long_factor": LONG[:6]},
         "original_max_position_embeddings": 64},
        [64, 30],
    ),
]


def frequency_case(name, head_dim, theta, max_positions, scaling, partial=1.0):
    # LlamaConfig has no original_max_position_embeddings, so LongRoPE's stretch is `factor`.
    config = transformers.LlamaConfig(
        hidden_size=head_dim * 4,
        num_attention_heads=4,
        head_dim=head_dim,
        rope_theta=theta,
        max_position_embeddings=max_positions,
        rope_scaling=dict(scaling),
    )
    config.partial_rotary_factor = partial
    rope_type = scaling.get("rope_type", scaling.get("type"))
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
    return {
        "name": name,
        "config": {
            "model_type": "llama",
            "vocab_size": 4,
            "hidden_size": head_dim * 4,
            "intermediate_size": 8,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "head_dim": head_dim,
            "rope_theta": theta,
            "max_position_embeddings": max_positions,
            "rope_scaling": scaling,
            "partial_rotary_factor": partial,
        },
        "inv_freq": [float(f) for f in inv_freq.tolist()],
        "attention_factor": float(attention_factor),
    }


def token_logps(model, sequences, pad):
    longest = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), longest), pad, dtype=torch.long)
    mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
    logps = F.log_softmax(logits, dim=-1)
    out = []
    for row, seq in enumerate(sequences):
        out.append([float(logps[row, t - 1, seq[t]]) for t in range(1, len(seq))])
    return out


def model_case(name, label, overrides, lengths, seed):
    path = MODELS / name
    generator = torch.Generator().manual_seed(seed)
    sequences = [
        torch.randint(4, 512, (n,), generator=generator).tolist() for n in lengths
    ]
    plain = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    pad = plain.config.pad_token_id
    config = AutoConfig.from_pretrained(path)
    for key, value in overrides.items():
        setattr(config, key, value)
    scaled = AutoModelForCausalLM.from_pretrained(
        path, config=config, torch_dtype=torch.float32
    ).eval()
    ours = token_logps(scaled, sequences, pad)
    # Positions past max_position_embeddings are fine for transformers; the unscaled model is
    # compared on the positions both take.
    limit = plain.config.max_position_embeddings
    theirs = token_logps(plain, [s[:limit] for s in sequences], pad)
    longest = max(range(len(sequences)), key=lambda i: lengths[i])
    gap = max(abs(a - b) for a, b in zip(ours[longest], theirs[longest]))
    assert gap > 1e-3, f"{name} {label}: the scaling changes the log-probs by only {gap}"
    print(f"{name} {label}: largest change from the unscaled model {gap:.4f}")
    return {
        "model": name,
        "label": label,
        "config": overrides,
        "pad_token_id": pad,
        "sequences": sequences,
        "token_logps": ours,
    }


def main():
    frequencies = [frequency_case(*case) for case in FREQUENCY_CASES]
    models = [model_case(*case, seed=i) for i, case in enumerate(MODEL_CASES)]
    reference = {
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "note": (
            "made by scripts/reference/make_rope_scaling_testdata.py: inverse frequencies and "
            "attention factors from transformers' ROPE_INIT_FUNCTIONS; per-token log-probs "
            "(token t given tokens before it, t >= 1) of the test models under another "
            "rope_scaling, one right-padded batch, float32"
        ),
        "frequencies": frequencies,
        "models": models,
    }
    OUT.write_text(json.dumps(reference, indent=1) + "\n")
    print(f"wrote {OUT.relative_to(REPO)}")


if __name__ == "__main__":
    main()

"""Checks that transformers (and peft) load checkpoints written by opt-wdpo and compute the same
log-probs as optune. Run by hand (needs torch, transformers, peft):

    python scripts/reference/check_wdpo_checkpoint.py OPT_BIN_DIR CHECKPOINT PAIRS.jsonl [BASE_MODEL]

OPT_BIN_DIR holds the opt-wdpo binary. optune's log-probs come from
`opt-wdpo --policy CHECKPOINT --lr 0 --precompute-ref` (which writes ref_chosen_logp and
ref_rejected_logp computed by our model into a copy of the pairs). transformers' come from
AutoModelForCausalLM on CHECKPOINT, and, when CHECKPOINT/adapter exists and BASE_MODEL is given,
from BASE_MODEL with the PEFT adapter applied by peft. Tokenisation follows TRL: the templated
prompt tokenised alone, the response tokenised alone plus EOS.

Figures of 2026-11-23 (transformers 4.57.6, torch 2.15.0, peft 0.21.2), 4 pairs, tiny testdata
models trained for 6 steps (`opt-wdpo --lr 1e-3 --epochs 3 --batch-size 2`, and for LoRA
`--lora-rank 4 --lora-targets q_proj,v_proj,up_proj --lr 1e-2 --save-adapter`):
full fine-tune of tiny-llama: max |Δ| 1.9e-05 over 8 sequences (summed log-probs of -60 to -110);
LoRA on tiny-qwen2, merged checkpoint: 1.4e-05; tiny-qwen2 + the PEFT adapter loaded by peft:
1.6e-05.

Figures of 2026-12-04 (same versions), tiny-phi3, whose checkpoints and PEFT adapters store the
projections fused (qkv_proj, gate_up_proj), 5 pairs from testdata/shards/scored.jsonl through
opt-pairs with each prompt as a one-message `messages` list, 9 steps (`--epochs 3 --batch-size
2`): full fine-tune (`--lr 1e-3`): 1.9e-05 over 10 sequences; LoRA `--lora-targets
qkv_proj,o_proj,gate_up_proj --lora-rank 4 --lr 1e-2 --save-adapter`: merged 3.7e-05, tiny-phi3
+ the PEFT adapter (rank_pattern qkv_proj 12, gate_up_proj 8) 3.7e-05; LoRA `--lora-targets
q_proj,v_proj,up_proj` (fused adapters with zero rows for k, v and gate): merged 1.8e-05,
PEFT 3.4e-05. A copy of tiny-phi3 made like Phi-4-mini (partial_rotary_factor 0.75, LongRoPE
over the 12 rotated channels of each head with six short factors, original context 128), whose
query and key rows optune holds reordered: full fine-tune 2.7e-05; LoRA on qkv_proj, o_proj and
gate_up_proj: merged 3.6e-05, PEFT 2.6e-05.

Figures of 2026-12-04, a later session (same versions), the same 5 pairs trained from their
raw-text prompts and checked with them as one-message lists, 9 steps: tiny-olmo2 (norms after
the sublayers, q and k norms over whole projections): full fine-tune 1.2e-05; LoRA `--lora-targets
q_proj,k_proj,o_proj,up_proj,down_proj --lora-rank 4 --lr 1e-2 --save-adapter`: merged 2.0e-05,
PEFT 2.0e-05. tiny-olmo3 (a sliding layer turned by the plain rotation, a full one by YaRN):
full 3.4e-05; the same LoRA: merged 2.0e-05, PEFT 3.1e-05. tiny-exaone4 (norms after the
sublayers and of each query and key head, a full layer without a rotary embedding): full
2.0e-05; the same LoRA: merged 3.1e-05, PEFT 3.1e-05. tiny-gemma3 (norms before and after the
sublayers scaling by 1 + weight, a scaled embedding, a GELU gate): full 4.4e-05; the same LoRA:
merged 3.5e-05, PEFT 6.6e-05. tiny-granite (four multipliers): full 3.1e-05; the same LoRA:
merged 1.7e-05, PEFT 2.6e-05.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile

import pyarrow.json as pj
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def our_logps(bin_dir, checkpoint, pairs):
    with tempfile.TemporaryDirectory() as tmp:
        copy = os.path.join(tmp, "pairs.jsonl")
        shutil.copy(pairs, copy)
        subprocess.run([os.path.join(bin_dir, "opt-wdpo"), "--policy", checkpoint, copy, "-o",
                        os.path.join(tmp, "out"), "--lr", "0", "--precompute-ref"], check=True)
        table = pj.read_json(copy).to_pylist()
    return [(r["ref_chosen_logp"], r["ref_rejected_logp"]) for r in table]


def their_logps(model, tokenizer, pairs):
    out = []
    rows = [json.loads(line) for line in open(pairs)]
    for row in rows:
        prompt = tokenizer.apply_chat_template(row["messages"], tokenize=False, add_generation_prompt=True)
        prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
        sides = []
        for key in ("chosen", "rejected"):
            response_ids = tokenizer(row[key], add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
            ids = torch.tensor([prompt_ids + response_ids])
            with torch.no_grad():
                logits = model(ids).logits[0].float()
            logp = torch.log_softmax(logits[len(prompt_ids) - 1:-1], -1)
            sides.append(logp.gather(1, torch.tensor(response_ids)[:, None]).sum().item())
        out.append(tuple(sides))
    return out


def compare(name, ours, theirs):
    diff = max(abs(a - b) for o, t in zip(ours, theirs) for a, b in zip(o, t))
    print(f"{name}: max |ours - transformers| = {diff:.2e} over {2 * len(ours)} sequences")
    return diff


def main():
    bin_dir, checkpoint, pairs = sys.argv[1:4]
    base = sys.argv[4] if len(sys.argv) > 4 else None
    ours = our_logps(bin_dir, checkpoint, pairs)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, torch_dtype=torch.float32, attn_implementation="eager")
    worst = compare("merged checkpoint", ours, their_logps(model, tokenizer, pairs))
    adapter = os.path.join(checkpoint, "adapter")
    if base and os.path.isdir(adapter):
        from peft import PeftModel
        base_model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32, attn_implementation="eager")
        peft_model = PeftModel.from_pretrained(base_model, adapter)
        worst = max(worst, compare("base + PEFT adapter", ours, their_logps(peft_model, tokenizer, pairs)))
    sys.exit(0 if worst < 1e-3 else 1)


if __name__ == "__main__":
    main()

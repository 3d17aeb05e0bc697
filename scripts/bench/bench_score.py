#!/usr/bin/env python3
"""Reward-scoring benchmark: `opt-score --rm` against Hugging Face transformers on the CPU.

Run through `make bench-score` (scripts/bench/bench_score.sh), which provides a Python with torch
and transformers and builds the tools. By hand:

    python scripts/bench/bench_score.py --opt-score target/release/opt-score --work runs/bench/score

What it does, on each model (--models) and dtype (--dtypes, default f32,bf16):
  * makes a reward model of it: transformers' LlamaForSequenceClassification with num_labels 1
    over the model's weights and a score head drawn with torch's seed 0, saved with the model's
    tokenizer and chat template;
  * writes --rows responses (a prompt of bench_gen's PROMPTS as one user message, a response of
    10-160 words drawn with a fixed seed from a fixed word list), the same file for both sides;
  * runs `opt-score --rm DIR --threads T --dtype D` and reads its summary (`tokens`, `model_s`:
    the model's passes, tokenising and loading excluded, its first pass and its journal's writes
    included), and its rewards;
  * runs transformers in a fresh process: the same conversations rendered with the tokenizer's
    chat template, longest first in right-padded batches of --peer-batch with their attention
    mask (what a TRL or OpenRLHF scoring loop does), under torch.inference_mode, the loop timed
    after one warm-up batch, once with torch's OpenMP threads spinning (OMP_WAIT_POLICY=ACTIVE)
    and once sleeping (PASSIVE), the better compared;
  * repeats the rounds (each side once per dtype per round) and prints medians: tokens/s of each
    side, the ratio, and the largest difference of the rewards from transformers' in the same
    dtype (both sides' f32 should agree to ~1e-6).

Both sides use the same number of threads. What bf16 means: transformers holds bf16 weights and
computes in bf16; opt-score --dtype bf16 on an x86-64 CPU with AVX512-BF16 or AVX2 keeps f32
tensors and runs the products with bf16 operands and f32 sums, and elsewhere runs candle's bf16
tensors (its summary says `kernels=generic` then).

Models: the random llama of bench_gen (12.9M parameters, 8.2M of them the tied embedding; the
tokenizer of testdata/models/tiny-llama) and, when OPTUNE_SMOLLM2_DIR names its converted
directory, SmolLM2-135M-Instruct.
"""

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gen import PROMPTS, bench_models, dtype_list, end_of_run, loadavg, torch_dtype  # noqa: E402

WORDS = ("the a river light stone quiet morning city window garden music small old bright "
         "people story walk green water slowly evening road house friend warm rain open "
         "because after under through always never often together").split()


def make_reward_model(causal: Path, path: Path, dtype=None) -> None:
    """A sequence-classification reward model over `causal`'s weights (in `dtype`, default f32),
    its score head drawn with torch's seed 0, saved with `causal`'s tokenizer under `path`; kept
    across runs."""
    if (path / "config.json").exists():
        return
    import shutil
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(causal)
    model = AutoModelForSequenceClassification.from_pretrained(causal, num_labels=1, dtype=dtype or torch.float32)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
            else tokenizer.eos_token_id
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def conversation_ids(tokenizer, messages, response) -> list:
    """The token ids of `messages` answered by `response` as `opt-score --rm` reads them: the
    chat template rendered as text, encoded without added special tokens."""
    text = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}], tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def padded_rewards(model, ids, batch: int, device: str):
    """(rewards, seconds) of a transformers sequence-classification `model` over the token `ids`:
    longest first in right-padded batches of `batch` with their attention mask (what a TRL or
    OpenRLHF scoring loop does), under inference_mode, the loop timed after one warm-up batch."""
    import torch

    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    batches = [order[b:b + batch] for b in range(0, len(order), batch)]
    pad = model.config.pad_token_id
    rewards = [0.0] * len(ids)

    def sync():
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()

    def forward(rows):
        width = max(len(ids[i]) for i in rows)
        x = torch.tensor([ids[i] + [pad] * (width - len(ids[i])) for i in rows], device=device)
        mask = torch.tensor([[1] * len(ids[i]) + [0] * (width - len(ids[i])) for i in rows], device=device)
        for i, reward in zip(rows, model(input_ids=x, attention_mask=mask).logits[:, 0].float().tolist()):
            rewards[i] = reward

    with torch.inference_mode():
        forward(batches[-1])
        sync()
        start = time.perf_counter()
        for rows in batches:
            forward(rows)
        sync()
        seconds = time.perf_counter() - start
    return rewards, seconds


def synthetic_responses(count: int, most_words: int) -> list:
    """`count` rows of a responses shard, the same on every run: a prompt of bench_gen's PROMPTS
    as one user message, answered by 10 to `most_words` words drawn with a fixed seed from
    WORDS."""
    rng = random.Random(0)
    rows = []
    for i in range(count):
        words = [rng.choice(WORDS) for _ in range(rng.randint(10, most_words))]
        rows.append({"prompt_id": f"s{i:04d}", "sample": 0,
                     "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                     "response": " ".join(words).capitalize() + "."})
    return rows


def peer_main(argv) -> None:
    """`bench_score.py peer ...`: one timed transformers run, printed as JSON."""
    ap = argparse.ArgumentParser(prog="bench_score.py peer")
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--responses", type=Path, required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--dtype", required=True)
    args = ap.parse_args(argv)
    import torch
    import transformers
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForSequenceClassification.from_pretrained(
        args.model, dtype=torch_dtype(args.dtype), attn_implementation="sdpa").eval()
    rows = [json.loads(line) for line in args.responses.read_text().splitlines()]
    ids = [conversation_ids(tokenizer, row["messages"], row["response"]) for row in rows]
    scores, elapsed = padded_rewards(model, ids, args.batch, "cpu")
    tokens = sum(len(x) for x in ids)
    print(json.dumps({"tok_per_s": tokens / elapsed, "tokens": tokens, "scores": scores,
                      "torch": torch.__version__, "transformers": transformers.__version__}))


def run_peer(model: Path, responses: Path, threads: int, batch: int, dtype: str, policy: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "peer", "--model", str(model), "--responses",
           str(responses), "--threads", str(threads), "--batch", str(batch), "--dtype", dtype]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_WAIT_POLICY": policy})
    if proc.returncode != 0:
        sys.exit(f"transformers run failed ({proc.returncode}):\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_ours(opt_score: Path, model: Path, responses: Path, out: Path, threads: int, dtype: str) -> dict:
    # A journal left by a killed run would be resumed, and its rows not timed.
    Path(f"{out}.journal").unlink(missing_ok=True)
    cmd = [str(opt_score), str(responses), "--rm", str(model), "-o", str(out), "--threads", str(threads),
           "--dtype", dtype]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"opt-score failed ({proc.returncode}):\n{proc.stderr}")
    summary = proc.stderr.strip().splitlines()[-1]
    fields = dict(kv.split("=", 1) for kv in summary.split()[1:] if "=" in kv)
    assert fields["resumed"] == "0", summary
    tokens = int(fields["tokens"])
    scores = [json.loads(line)["reward"] for line in out.read_text().splitlines()]
    return {"tok_per_s": tokens / float(fields["model_s"]), "tokens": tokens, "scores": scores,
            "kernels": fields["kernels"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--opt-score", type=Path, required=True, help="the opt-score binary")
    ap.add_argument("--work", type=Path, default=Path(__file__).resolve().parents[2] / "runs/bench/score",
                    help="scratch directory")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, default=96, help="responses scored per run")
    ap.add_argument("--peer-batch", type=int, default=16, help="transformers' batch size")
    ap.add_argument("--dtypes", type=dtype_list, default="f32,bf16")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--models", default="random,smollm2", help="which models (smollm2 needs OPTUNE_SMOLLM2_DIR)")
    ap.add_argument("--peer-policies", default="ACTIVE,PASSIVE", help="OMP_WAIT_POLICY values to run transformers with")
    ap.add_argument("--json", type=Path, help="also write the raw figures here")
    args = ap.parse_args()

    policies = args.peer_policies.split(",")
    responses = args.work / f"responses-{args.rows}.jsonl"
    args.work.mkdir(parents=True, exist_ok=True)
    responses.write_text("".join(json.dumps(row) + "\n" for row in synthetic_responses(args.rows, 160)))
    print(f"# threads {args.threads}, {args.rows} responses, transformers in batches of {args.peer_batch}, "
          f"{' and '.join(args.dtypes)}, {args.repeats} repeats (medians); transformers with OMP_WAIT_POLICY in "
          f"{policies}, the better one compared")
    print(f"# load average at start: {loadavg()}")
    rows, raw, versions = [], [], None
    for label, causal in bench_models(args.work, args.models, 32000):
        model = args.work / f"rm-{causal.name}"
        make_reward_model(causal, model)
        runs = {dtype: {"ours": [], "peer": {p: [] for p in policies}} for dtype in args.dtypes}
        for r in range(args.repeats):
            line = f"  {label} repeat {r + 1}:"
            for dtype in args.dtypes:
                ours = run_ours(args.opt_score, model, responses, args.work / "out.jsonl", args.threads, dtype)
                runs[dtype]["ours"].append(ours)
                line += f" {dtype}: ours {ours['tok_per_s']:.1f} tok/s ({ours['kernels']})"
                for policy in policies:
                    peer = run_peer(model, responses, args.threads, args.peer_batch, dtype, policy)
                    assert peer["tokens"] == ours["tokens"], (peer["tokens"], ours["tokens"])
                    versions = f"torch {peer['torch']}, transformers {peer['transformers']}"
                    runs[dtype]["peer"][policy].append(peer)
                    line += f", transformers {policy} {peer['tok_per_s']:.1f}"
                line += ";"
            print(f"{line}  (load {loadavg()})", file=sys.stderr)
        for dtype, fig in runs.items():
            best = max(policies, key=lambda p: statistics.median(x["tok_per_s"] for x in fig["peer"][p]))
            ours_scores, peer_scores = fig["ours"][-1]["scores"], fig["peer"][best][-1]["scores"]
            rows.append({
                "label": label, "dtype": dtype, "best": best, "tokens": fig["ours"][-1]["tokens"],
                "kernels": fig["ours"][-1]["kernels"],
                "ours": statistics.median(x["tok_per_s"] for x in fig["ours"]),
                "peer": statistics.median(x["tok_per_s"] for x in fig["peer"][best]),
                "diff": max(abs(a - b) for a, b in zip(ours_scores, peer_scores)),
            })
            raw.append({"model": label, "dtype": dtype,
                        "ours_tok_per_s": [x["tok_per_s"] for x in fig["ours"]],
                        "peer_tok_per_s": {p: [x["tok_per_s"] for x in fig["peer"][p]] for p in policies}})
    print(f"# {versions}")
    print()
    print("| reward model | dtype | tokens | opt-score tok/s | transformers tok/s | ratio | max \\|Δ reward\\| |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['label']} | {row['dtype']} ({row['kernels']}) | {row['tokens']} | {row['ours']:.1f} | "
              f"{row['peer']:.1f} ({row['best']}) | {row['ours'] / row['peer']:.2f}x | {row['diff']:.1e} |")
    end_of_run(args.json, {"rows": raw, "versions": versions})


if __name__ == "__main__":
    if sys.argv[1:2] == ["peer"]:
        peer_main(sys.argv[2:])
    else:
        main()

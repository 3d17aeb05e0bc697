#!/usr/bin/env python3
"""Training benchmark: a DPO step of opt-wdpo against TRL's DPOTrainer on the CPU.

Run through `make bench-train` (scripts/bench/bench_train.sh), which provides a Python with torch,
transformers and trl and builds opt-wdpo. By hand:

    python scripts/bench/bench_train.py --opt-wdpo target/release/opt-wdpo --work runs/bench/train

What it does, on each model:
  * writes the same preference pairs twice: as an optune pairs shard (JSONL with messages, chosen,
    rejected) and, for TRL, with the prompt already rendered by the chat template, so both sides
    train on the same token ids (the token counts are printed to show it);
  * runs TRL's DPOTrainer (sigmoid loss, beta 0.1, precompute_ref_log_probs=True so no reference
    model is held, AdamW, full fine-tuning, f32, per_device_train_batch_size = the pairs per step)
    in a subprocess with torch.set_num_threads(T), and times every optimiser step from one
    `on_step_end` callback to the next (data collation, forward, backward, clipping, optimiser);
  * runs opt-wdpo on the same model and pairs (same batch, full fine-tuning, AdamW, --threads T,
    reference log-probs computed before training) and reads each step's `seconds` from its
    metrics.csv (the same span: batch preparation to the end of the optimiser update);
  * drops the first --warmup steps of each run, takes the median of the rest, alternates the two
    sides for --repeats rounds, and prints the median seconds per step, tokens/s, peak RSS
    (/usr/bin/time -v for opt-wdpo, getrusage for the TRL process: both include model loading and
    the reference pass) and the ratio ours / TRL (below 1: opt-wdpo is faster);
  * `--compare NAME=PATH` times further opt-wdpo builds (an older commit's, say) in the same rounds;
  * `--lora-rank R` trains LoRA adapters (alpha 2R, q/k/v/o) on both sides instead of every weight
    (TRL through peft; its reference is then the model with the adapters off, as ours).

Models: a deterministic random llama of ~12.9M parameters (bench_gen.py's: hidden 256, 6 layers,
8 heads, 4 KV heads, intermediate 768, vocab 32000 with tokenizer files from
testdata/models/tiny-llama), 8 pairs of ~130 tokens per side; and, when OPTUNE_SMOLLM2_DIR points to
a converted SmolLM2-135M(-Instruct) Hugging Face directory, that model with 2 pairs of ~128 tokens.
"""

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gen import RANDOM_LLAMA, SMOLLM2, bench_models, loadavg  # noqa: E402  (the same models)
import roof  # noqa: E402  (the roofs every figure is reported against)

WORDS = (
    "the a river stone light garden window quiet morning city train north paper music green old "
    "small bright cold warm story letter road market bread coffee winter summer friend school "
    "night song table chair mountain forest cloud rain wind field house door happy slow fast "
    "little open long short blue red yellow white black early late always never often because "
    "after before under over between through around walk read write sing cook build find keep"
).split()


# The projections that get adapters with --lora-rank (opt-wdpo's default targets).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def sentence(rng: random.Random, words: int) -> str:
    text = " ".join(rng.choice(WORDS) for _ in range(words))
    return text[0].upper() + text[1:] + "."


def make_pairs(tokenizer, count: int, total_tokens: int, seed: int = 0):
    """`count` pairs whose prompt + response (+ EOS) come to about `total_tokens` tokens per side.

    Returns (optune rows, TRL rows, token ids per side as [(prompt, chosen, rejected)]).
    """
    rng = random.Random(seed)
    ours, theirs, lengths = [], [], []
    count_ids = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])
    for i in range(count):
        question = sentence(rng, 6 + i % 4) + " Please answer."
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
        )
        prompt_len = count_ids(rendered)
        target = total_tokens + (i % 5) - 2  # ~total_tokens, a little spread as real pairs have
        sides = []
        for _ in range(2):
            words = []
            while prompt_len + count_ids(" ".join(words)) + 1 < target:
                words.append(rng.choice(WORDS))
            sides.append(" ".join(words))
        chosen, rejected = sides
        ours.append({
            "prompt_id": f"p{i}",
            "messages": [{"role": "user", "content": question}],
            "chosen": chosen,
            "rejected": rejected,
        })
        theirs.append({"prompt": rendered, "chosen": chosen, "rejected": rejected})
        lengths.append((prompt_len, count_ids(chosen) + 1, count_ids(rejected) + 1))
    return ours, theirs, lengths


def write_jsonl(path: Path, rows) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def trl_worker(args) -> None:
    """One TRL DPOTrainer run in this process; writes step times, tokens and peak RSS as JSON."""
    import inspect
    import math
    import resource

    import torch

    torch.set_num_threads(args.threads)
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    rows = [json.loads(line) for line in open(args.pairs)]
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    bf16 = bool(args.bf16)

    class StepClock(TrainerCallback):
        def __init__(self):
            self.ends = []

        def on_train_begin(self, *a, **k):
            self.ends.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            self.ends.append(time.perf_counter())

    clock = StepClock()
    settings = dict(
        output_dir=str(args.out.parent / "trl-out"),
        per_device_train_batch_size=args.batch,
        max_steps=args.steps,
        learning_rate=1e-5,
        lr_scheduler_type="linear",
        warmup_ratio=0.1,
        max_grad_norm=1.0,
        beta=0.1,
        loss_type="sigmoid",
        precompute_ref_log_probs=True,
        max_length=1024,
        max_prompt_length=512,
        use_cpu=True,
        bf16=bf16,
        fp16=False,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    # TRL 1.x dropped warmup_ratio (warmup_steps instead) and max_prompt_length.
    accepted = inspect.signature(DPOConfig.__init__).parameters
    if "warmup_ratio" not in accepted:
        settings["warmup_steps"] = math.ceil(settings.pop("warmup_ratio") * args.steps)
    config = DPOConfig(**{k: v for k, v in settings.items() if k in accepted})
    peft_config = None
    if args.lora_rank:
        from peft import LoraConfig

        peft_config = LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, lora_dropout=0.0,
                                 target_modules=list(LORA_TARGETS), task_type="CAUSAL_LM")
    trainer = DPOTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[clock],
        peft_config=peft_config,
    )
    trainer.train()
    data = trainer.train_dataset
    # TRL 0.x names the token columns *_input_ids, TRL 1.x *_ids.
    suffix = "_input_ids" if "prompt_input_ids" in data.column_names else "_ids"
    tokens = sum(
        2 * len(p) + len(c) + len(r)
        for p, c, r in zip(data["prompt" + suffix], data["chosen" + suffix], data["rejected" + suffix])
    )
    steps = [b - a for a, b in zip(clock.ends, clock.ends[1:])]
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    args.out.write_text(json.dumps({"step_seconds": steps, "tokens_per_step": tokens * args.batch // len(rows),
                                    "peak_rss_mb": rss_kb / 1024}))


def run_trl(model_dir: Path, pairs: Path, work: Path, threads: int, batch: int, steps: int, lora_rank: int,
            bf16: bool):
    out = work / "trl-result.json"
    out.unlink(missing_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               TOKENIZERS_PARALLELISM="false", HF_DATASETS_DISABLE_PROGRESS_BARS="1")
    cmd = [sys.executable, __file__, "trl-worker", "--model", str(model_dir), "--pairs", str(pairs),
           "--threads", str(threads), "--batch", str(batch), "--steps", str(steps), "--out", str(out),
           "--lora-rank", str(lora_rank), "--bf16", str(int(bf16))]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"TRL run failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


def run_ours(opt_wdpo: Path, model_dir: Path, pairs: Path, work: Path, threads: int, batch: int, steps: int,
             pair_count: int, lora_rank: int, bf16: bool):
    out = work / "wdpo-out"
    metrics = work / "wdpo-metrics.csv"
    epochs = steps * batch // pair_count
    cmd = ["/usr/bin/time", "-v", str(opt_wdpo), "--policy", str(model_dir), str(pairs), "-o", str(out),
           "--metrics", str(metrics), "--batch-size", str(batch), "--epochs", str(epochs), "--lr", "1e-5",
           "--loss", "sigmoid", "--beta", "0.1", "--weight", "none", "--optimizer", "adamw",
           "--threads", str(threads), "--dtype", "bf16" if bf16 else "f32"]
    if lora_rank:
        cmd += ["--lora-rank", str(lora_rank), "--lora-alpha", str(2 * lora_rank), "--lora-targets", ",".join(LORA_TARGETS)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"opt-wdpo failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    summary = [l for l in proc.stderr.splitlines() if l.startswith("opt-wdpo:")][-1]
    fields = dict(kv.split("=", 1) for kv in summary.split()[1:] if "=" in kv)
    lines = metrics.read_text().splitlines()
    header = lines[0].split(",")
    col = header.index("seconds")
    steps_s = [float(l.split(",")[col]) for l in lines[1:]]
    tokens = int(fields["tokens"]) // max(1, len(steps_s))
    return {"step_seconds": steps_s, "tokens_per_step": tokens,
            "peak_rss_mb": int(rss.group(1)) / 1024 if rss else float("nan")}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "trl-worker":
        ap = argparse.ArgumentParser()
        ap.add_argument("cmd")
        for name in ["--model", "--pairs", "--out"]:
            ap.add_argument(name, type=Path, required=True)
        for name in ["--threads", "--batch", "--steps", "--lora-rank", "--bf16"]:
            ap.add_argument(name, type=int, required=True)
        trl_worker(ap.parse_args())
        return

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--opt-wdpo", type=Path, required=True, help="the opt-wdpo binary")
    ap.add_argument("--work", type=Path, default=Path("runs/bench/train"), help="scratch directory")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=12, help="optimiser steps per run")
    ap.add_argument("--warmup", type=int, default=2, help="leading steps of each run left out")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=32000, help="vocabulary of the random llama")
    ap.add_argument("--models", default="random,smollm2", help="which models (smollm2 needs OPTUNE_SMOLLM2_DIR)")
    ap.add_argument("--sides", default="ours,trl",
                    help="which trainers to run: ours, trl, and either with -bf16 (opt-wdpo --dtype bf16; TRL bf16=True)")
    ap.add_argument("--smollm2-pairs", type=int, default=2, help="pairs per step on SmolLM2")
    ap.add_argument("--compare", action="append", default=[], metavar="NAME=PATH",
                    help="also time another opt-wdpo build (e.g. an older commit's) in the same rounds")
    ap.add_argument("--json", type=Path, help="also write the raw figures here")
    ap.add_argument("--lora-rank", type=int, default=0,
                    help="train LoRA adapters of this rank (alpha 2r, q/k/v/o, TRL through peft) instead of every weight")
    args = ap.parse_args()
    if args.steps <= args.warmup:
        sys.exit("--steps must exceed --warmup")

    from transformers import AutoTokenizer

    # (pairs per step, tokens per side, steps) of each model.
    shapes = {RANDOM_LLAMA: (8, 130, args.steps),
              SMOLLM2: (args.smollm2_pairs, 128, max(args.warmup + 3, args.steps // 2))}
    models = [(label, path, *shapes[label]) for label, path in bench_models(args.work, args.models, args.vocab)]
    sides = args.sides.split(",")
    builds = {"ours": args.opt_wdpo}
    for spec in args.compare:
        name, _, path = spec.partition("=")
        if not path or name in ("ours", "trl") or name.endswith("-bf16"):
            sys.exit(f"--compare {spec}: expected NAME=PATH with a NAME other than ours and trl")
        builds[name] = Path(path)
        sides.append(name)

    import torch
    import transformers
    import trl

    tuning = f"LoRA r{args.lora_rank} alpha {2 * args.lora_rank} on {'/'.join(LORA_TARGETS)}" if args.lora_rank else "full fine-tuning"
    print(f"# torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}; "
          f"{args.threads} threads, {tuning}, AdamW, sigmoid DPO, reference log-probs precomputed; "
          f"median over {args.repeats} repeats of each run's median step after {args.warmup} warm-up steps")
    print(f"# load average at start: {loadavg()}")
    table, raw = [], []
    for label, model_dir, batch, per_side, steps in models:
        work = args.work / re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")
        work.mkdir(parents=True, exist_ok=True)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        ours_rows, trl_rows, lengths = make_pairs(tokenizer, batch, per_side)
        write_jsonl(work / "pairs.jsonl", ours_rows)
        write_jsonl(work / "pairs-trl.jsonl", trl_rows)
        tokens = sum(2 * p + c + r for p, c, r in lengths)
        print(f"# {label}: {batch} pairs per step, {tokens} tokens per step "
              f"(prompt+response per side {min(p + c for p, c, _ in lengths)}-{max(p + c for p, c, _ in lengths)})")
        results = {side: [] for side in sides}
        for r in range(args.repeats):
            for side in sides:
                base, bf16 = side.removesuffix("-bf16"), side.endswith("-bf16")
                if base == "trl":
                    res = run_trl(model_dir, work / "pairs-trl.jsonl", work, args.threads, batch, steps, args.lora_rank,
                                  bf16)
                else:
                    res = run_ours(builds[base], model_dir, work / "pairs.jsonl", work, args.threads, batch, steps,
                                   batch, args.lora_rank, bf16)
                res["median_s"] = statistics.median(res["step_seconds"][args.warmup:])
                res["load"] = loadavg()
                results[side].append(res)
                print(f"  {label} repeat {r + 1} {side}: {res['median_s']:.3f} s/step, "
                      f"{res['tokens_per_step']} tokens/step, peak RSS {res['peak_rss_mb']:.0f} MB, "
                      f"steps {' '.join(f'{s:.2f}' for s in res['step_seconds'])} (load {res['load']})",
                      file=sys.stderr)
        # The roof, in this run: the best product rate ours or torch's reach on the step's two
        # largest shapes (every token of the step x hidden x intermediate, and x vocabulary: the
        # head), per dtype; the step's product work from config.json.
        config = json.loads((Path(model_dir) / "config.json").read_text())
        sequences = [p + c for p, c, _ in lengths] + [p + r for p, _, r in lengths]
        step_flops = roof.train_step_flops(config, sequences, lora=args.lora_rank > 0)
        roofs = roof.matmul_roofs([(tokens, width, config["hidden_size"])
                                   for width in (config["intermediate_size"], config["vocab_size"])], args.threads)
        print(f"# {label}: {step_flops / 1e9:.0f} GFLOP of products per step; roof (the best of ours and "
              f"torch's on {tokens}x{config['hidden_size']} by x{config['intermediate_size']} and "
              f"x{config['vocab_size']}): f32 {roofs['f32']:.0f}, bf16 {roofs['bf16']:.0f} GFLOP/s")
        summary = {}
        for side, runs in results.items():
            s = statistics.median(x["median_s"] for x in runs)
            gflops = step_flops / s / 1e9
            summary[side] = {
                "s_per_step": s,
                "tokens_per_step": runs[0]["tokens_per_step"],
                "tokens_per_s": runs[0]["tokens_per_step"] / s,
                "peak_rss_mb": max(x["peak_rss_mb"] for x in runs),
                "gflops": gflops,
                "of_roof": gflops / roofs["bf16" if side.endswith("-bf16") else "f32"],
                "roof_gflops": roofs,
            }
        table.append((label, batch, summary))
        raw.append({"model": label, "pairs_per_step": batch, "runs": results, "summary": summary})

    print()
    print("| model | pairs/step | trainer | tokens/step | s/step | tokens/s | GFLOP/s | of its dtype's roof | peak RSS MB |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    def name(side: str) -> str:
        base, bf16 = side.removesuffix("-bf16"), " bf16" if side.endswith("-bf16") else ""
        return {"ours": "opt-wdpo", "trl": "TRL DPOTrainer"}.get(base, f"opt-wdpo ({base})") + bf16
    for label, batch, summary in table:
        for side, s in summary.items():
            print(f"| {label} | {batch} | {name(side)} | {s['tokens_per_step']} | {s['s_per_step']:.3f} | "
                  f"{s['tokens_per_s']:.0f} | {s['gflops']:.0f} | {s['of_roof']:.2f} | {s['peak_rss_mb']:.0f} |")
    print()
    for label, _, summary in table:
        peers = [s for s in summary if s.startswith("trl")]
        for side in (s for s in summary if not s.startswith("trl")):
            for peer in peers:
                ratio = summary[side]["s_per_step"] / summary[peer]["s_per_step"]
                print(f"{label}: {name(side)} / {name(peer)} seconds per step = {ratio:.2f}x")
    print(f"# load average at end: {loadavg()}")
    if args.json:
        args.json.write_text(json.dumps({"models": raw, "loadavg_end": loadavg()}, indent=1))


if __name__ == "__main__":
    main()

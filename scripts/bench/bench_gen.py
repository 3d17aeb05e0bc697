#!/usr/bin/env python3
"""Generation benchmark: opt-gen against Hugging Face transformers' `generate` on the CPU.

Run through `make bench-gen` (scripts/bench/bench_gen.sh), which provides a Python with torch and
transformers and builds opt-gen. By hand:

    python scripts/bench/bench_gen.py --opt-gen target/release/opt-gen --work runs/bench/gen

What it does, on each model, batch size (--batches, default 1,16,32; batch 1 runs 4 prompts one at
a time, batch B runs B prompts together) and dtype (--dtypes, default f32,bf16):
  * writes the prompts (raw text, rendered by each side with the model's chat template);
  * runs opt-gen greedy (--temperature 0 --ignore-eos --max-new-tokens 128 --threads T
    --dtype D) and reads its stderr summary (`tok_per_s`: new tokens over the generation time,
    prompts + decoding + sampling, model loading excluded; `gen_cpu_s`: CPU seconds of all its
    threads meanwhile);
  * runs transformers `model.generate(do_sample=False, max_new_tokens=128, min_new_tokens=128)`
    on the same prompts (left-padded batch) with the model loaded in D (torch.float32 or
    torch.bfloat16), timed around the call after one warm-up call, in a fresh process per run,
    once with torch's OpenMP threads spinning while they wait (OMP_WAIT_POLICY=ACTIVE, the
    default) and once sleeping (PASSIVE): the first is faster on an idle machine, the second when
    other processes compete for the cores; the table compares with the better of the two;
  * in each round runs every side once, dtype after dtype (opt-gen f32, transformers f32,
    opt-gen bf16, transformers bf16), repeats the rounds, and prints one row per dtype with
    medians: tokens/s, the ratio opt-gen / transformers, on bf16 rows opt-gen bf16 / opt-gen f32
    (the same rounds), CPU milliseconds per token (all threads), which says more than the wall
    clock on a busy machine, and each side's fractions of the roofs (below).

Both sides use the same number of threads (torch.set_num_threads / opt-gen --threads). What bf16
means: transformers holds bf16 weights and computes in bf16. opt-gen --dtype bf16 on an x86-64
CPU keeps f32 tensors and runs the matrix products with bf16 operands and f32 sums, on
AVX512-BF16's instruction or else AVX2's f32 multiply-adds (docs/perf.md, "bf16 on this CPU");
the decode step multiplies by bf16-packed copies of every linear weight and of the head, packed
once and kept across steps. With OPTUNE_KERNELS=generic it runs candle's bf16 tensors.

Roofs, measured in the same run: torch's copy bandwidth and the best product rate ours or torch's
reach on a [256, hidden] x [hidden, intermediate] product, per dtype. The bandwidth fraction counts
the linear weights and the head streamed once per decode step (tokens/s / batch x weights x bytes,
4 bytes a weight in f32, 2 in bf16: opt-gen's bf16-packed copies, transformers' bf16 tensors;
attention's cache, norms and the embedding lookup left out); the compute fraction counts 2 x
weights flops per token over the product roof of the row's dtype.

Run time: the defaults (both dtypes, batches 1,16,32, both models) take roughly three times as long
as f32 alone at batches 1,16 (an estimate from docs/perf.md's f32 figures, not timed);
`--dtypes f32`, `--batches 1,16` or `--peer-policies ACTIVE` shorten it.

Models: a deterministic random llama of ~12.9M parameters (created here with
transformers: hidden 256, 6 layers, 8 heads, 4 KV heads, intermediate 768, vocab 32000 of which
8.2M in the tied embedding; tokenizer files from testdata/models/tiny-llama, whose 512 tokens
cover the prompts) and, when OPTUNE_SMOLLM2_DIR points to a converted Hugging Face directory,
SmolLM2-135M-Instruct.
"""

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import roof  # noqa: E402  (the roofs every figure is reported against)


REPO = Path(__file__).resolve().parents[2]

PROMPTS = [
    "Write one sentence about the sea.",
    "What is the capital of France?",
    "List three colours.",
    "Explain why the sky is blue in two sentences.",
    "Give me a short poem about autumn leaves falling in the park.",
    "Name a fruit.",
    "What is two plus two?",
    "Describe a cat to someone who has never seen one.",
    "Tell me a fact about the moon.",
    "How do plants make their food?",
    "Write a haiku about winter.",
    "Why do we sleep?",
    "Suggest a name for a small boat.",
    "What is the boiling point of water at sea level, and why does it change on a mountain?",
    "Say hello in French.",
    "Summarise the story of the three little pigs.",
]


def make_random_llama(path: Path, vocab: int) -> None:
    """A ~12.9M-parameter random llama (8.2M of it the tied 32000 x 256 embedding)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    if (path / "model.safetensors").exists():
        return
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config).eval()
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=3).save_pretrained(tmp)
    for name in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]:
        shutil.copy(REPO / "testdata/models/tiny-llama" / name, tmp / name)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


DTYPES = ("f32", "bf16")
# Bytes a weight the decode step streams, per dtype (bf16: opt-gen's packed copies, torch's tensors).
WEIGHT_BYTES = {"f32": 4, "bf16": 2}


def torch_dtype(name: str):
    import torch
    return {"f32": torch.float32, "bf16": torch.bfloat16}[name]


class Peer:
    """transformers on one model, kept loaded across repeats."""

    def __init__(self, model_dir: Path, threads: int, dtype: str):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(threads)
        self.torch = torch
        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.tok.padding_side = "left"
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype(dtype)).eval()

    def encode(self, prompts):
        out = []
        for p in prompts:
            ids = self.tok.apply_chat_template(
                [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True
            )
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
            out.append(list(ids))
        return out

    def generate(self, batch_ids, new_tokens: int):
        """(wall, CPU) seconds of one `generate` call on a left-padded batch."""
        torch = self.torch
        width = max(len(x) for x in batch_ids)
        pad = self.tok.pad_token_id
        ids = torch.tensor([[pad] * (width - len(x)) + x for x in batch_ids])
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in batch_ids])
        with torch.inference_mode():
            cpu = cpu_seconds()
            start = time.perf_counter()
            out = self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=False,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                pad_token_id=pad,
            )
            elapsed = time.perf_counter() - start
            cpu = cpu_seconds() - cpu
        assert out.shape[1] - width == new_tokens, out.shape
        return elapsed, cpu

    def run(self, token_ids, batch: int, new_tokens: int):
        """(tokens/s, CPU ms per token) over all prompts, `batch` at a time."""
        elapsed = cpu = 0.0
        for i in range(0, len(token_ids), batch):
            e, c = self.generate(token_ids[i : i + batch], new_tokens)
            elapsed += e
            cpu += c
        tokens = len(token_ids) * new_tokens
        return tokens / elapsed, 1000 * cpu / tokens


def cpu_seconds() -> float:
    """User + system CPU time of this process, every thread included."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peer_main(argv) -> None:
    """`bench_gen.py peer ...`: one timed transformers run, printed as JSON."""
    ap = argparse.ArgumentParser(prog="bench_gen.py peer")
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--prompts", type=int, required=True, help="how many of PROMPTS (cycled)")
    ap.add_argument("--new-tokens", type=int, required=True)
    ap.add_argument("--dtype", choices=DTYPES, required=True)
    args = ap.parse_args(argv)
    import torch
    import transformers

    peer = Peer(args.model, args.threads, args.dtype)
    ids_all = peer.encode(PROMPTS)
    ids = [ids_all[i % len(PROMPTS)] for i in range(args.prompts)]
    # Warm-up (first-call allocations, kernel selection).
    peer.generate(ids[:2], 8)
    tps, cpu_ms = peer.run(ids, args.batch, args.new_tokens)
    print(json.dumps({"tok_per_s": tps, "cpu_ms_per_token": cpu_ms, "torch": torch.__version__,
                      "transformers": transformers.__version__}))


def run_peer(model_dir: Path, batch: int, count: int, threads: int, new_tokens: int, dtype: str, policy: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "peer", "--model", str(model_dir), "--threads", str(threads),
           "--batch", str(batch), "--prompts", str(count), "--new-tokens", str(new_tokens), "--dtype", dtype]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_WAIT_POLICY": policy})
    if proc.returncode != 0:
        sys.exit(f"transformers run failed ({proc.returncode}):\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_ours(opt_gen: Path, model_dir: Path, prompts_file: Path, out: Path, batch: int, threads: int, new_tokens: int,
             dtype: str):
    cmd = [
        str(opt_gen), "--model", str(model_dir), str(prompts_file), "-o", str(out),
        "--n", "1", "--temperature", "0", "--ignore-eos", "--max-new-tokens", str(new_tokens),
        "--batch-size", str(batch), "--threads", str(threads), "--dtype", dtype,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"opt-gen failed ({proc.returncode}):\n{proc.stderr}")
    summary = [l for l in proc.stderr.splitlines() if l.startswith("opt-gen:")][-1]
    fields = dict(kv.split("=", 1) for kv in summary.split()[1:])
    tokens = int(fields["new_tokens"])
    # tok_per_s is new_tokens / gen_s before gen_s is rounded to centiseconds.
    cpu_ms = 1000 * float(fields["gen_cpu_s"]) / tokens if "gen_cpu_s" in fields else float("nan")
    return float(fields["tok_per_s"]), cpu_ms, tokens


RANDOM_LLAMA = "random llama 12.9M"
SMOLLM2 = "SmolLM2-135M"


def bench_models(work: Path, wanted: str, vocab: int) -> list:
    """(label, directory) of the models named in `wanted` ("random,smollm2"): the random llama,
    made in `work`, and SmolLM2-135M from $OPTUNE_SMOLLM2_DIR when that is set."""
    work.mkdir(parents=True, exist_ok=True)
    models = []
    names = wanted.split(",")
    if "random" in names:
        path = work / f"random-llama-v{vocab}"
        make_random_llama(path, vocab)
        models.append((RANDOM_LLAMA, path))
    if "smollm2" in names:
        smol = os.environ.get("OPTUNE_SMOLLM2_DIR")
        if smol:
            models.append((SMOLLM2, Path(smol)))
        else:
            print(f"({SMOLLM2} skipped: set OPTUNE_SMOLLM2_DIR to its converted directory)", file=sys.stderr)
    return models


def loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def end_of_run(json_path, figures: dict) -> None:
    """What every bench ends with: the load average, and the raw `figures` written to
    `json_path` (--json) when one is given."""
    print()
    print(f"# load average at end: {loadavg()}")
    if json_path:
        json_path.write_text(json.dumps({**figures, "loadavg_end": loadavg()}, indent=1))


def dtype_list(text: str) -> list:
    """`--dtypes`: a comma-separated subset of DTYPES, in the order given."""
    names = text.split(",")
    unknown = [n for n in names if n not in DTYPES]
    if unknown or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"{text!r}: want distinct names from {', '.join(DTYPES)}")
    return names


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--opt-gen", type=Path, required=True, help="the opt-gen binary")
    ap.add_argument("--work", type=Path, default=REPO / "runs/bench/gen", help="scratch directory")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batches", default="1,16,32", help="comma-separated batch sizes")
    ap.add_argument("--dtypes", type=dtype_list, default="f32,bf16",
                    help="dtypes to run both sides in (opt-gen --dtype, transformers torch_dtype): f32, bf16 or both")
    ap.add_argument("--prompts-batch1", type=int, default=4, help="prompts run one at a time")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=32000, help="vocabulary of the random llama")
    ap.add_argument("--models", default="random,smollm2", help="which models (smollm2 needs OPTUNE_SMOLLM2_DIR)")
    ap.add_argument("--json", type=Path, help="also write the raw figures here")
    ap.add_argument("--baseline", type=Path,
                    help="another opt-gen binary (e.g. an earlier version) to time alongside, in each dtype")
    ap.add_argument("--peer-policies", default="ACTIVE,PASSIVE", help="OMP_WAIT_POLICY values to run transformers with")
    args = ap.parse_args()

    models = bench_models(args.work, args.models, args.vocab)

    policies = args.peer_policies.split(",")
    print(f"# threads {args.threads}, {args.new_tokens} new tokens, greedy, {' and '.join(args.dtypes)}, "
          f"{args.repeats} repeats (medians); transformers with OMP_WAIT_POLICY in {policies}, the better one compared")
    print(f"# load average at start: {loadavg()}")
    rows, raw, versions = [], [], None
    for label, model_dir in models:
        for batch in [int(b) for b in args.batches.split(",")]:
            count = args.prompts_batch1 if batch == 1 else batch
            prompts_file = args.work / f"prompts-{count}.jsonl"
            with open(prompts_file, "w") as f:
                for i in range(count):
                    f.write(json.dumps({"prompt_id": f"b{i:03d}", "prompt": PROMPTS[i % len(PROMPTS)]}) + "\n")
            runs = {dtype: {"ours": [], "ours_cpu_ms_per_token": [], "baseline": [],
                            "transformers": {p: {"tok_per_s": [], "cpu_ms_per_token": []} for p in policies}}
                    for dtype in args.dtypes}
            for r in range(args.repeats):
                line = f"  {label} batch {batch} repeat {r + 1}:"
                for dtype in args.dtypes:
                    fig = runs[dtype]
                    line += f" {dtype}:"
                    if args.baseline:
                        tps, _, _ = run_ours(args.baseline, model_dir, prompts_file, args.work / "out.jsonl", batch,
                                             args.threads, args.new_tokens, dtype)
                        fig["baseline"].append(tps)
                        line += f" baseline {tps:.1f},"
                    tps, cpu_ms, tokens = run_ours(args.opt_gen, model_dir, prompts_file, args.work / "out.jsonl",
                                                   batch, args.threads, args.new_tokens, dtype)
                    assert tokens == count * args.new_tokens, (tokens, count)
                    fig["ours"].append(tps)
                    fig["ours_cpu_ms_per_token"].append(cpu_ms)
                    line += f" ours {tps:.1f} tok/s ({cpu_ms:.2f} CPU ms/tok)"
                    for policy in policies:
                        result = run_peer(model_dir, batch, count, args.threads, args.new_tokens, dtype, policy)
                        versions = f"torch {result['torch']}, transformers {result['transformers']}"
                        fig["transformers"][policy]["tok_per_s"].append(result["tok_per_s"])
                        fig["transformers"][policy]["cpu_ms_per_token"].append(result["cpu_ms_per_token"])
                        line += f", transformers {policy} {result['tok_per_s']:.1f} ({result['cpu_ms_per_token']:.2f})"
                    line += ";"
                print(f"{line}  (load {loadavg()})", file=sys.stderr)
            for dtype, fig in runs.items():
                peer = fig["transformers"]
                best = max(policies, key=lambda p: statistics.median(peer[p]["tok_per_s"]))
                rows.append({
                    "label": label, "batch": batch, "prompts": count, "dtype": dtype, "best": best,
                    "ours": statistics.median(fig["ours"]),
                    "peer": statistics.median(peer[best]["tok_per_s"]),
                    "ours_cpu": statistics.median(fig["ours_cpu_ms_per_token"]),
                    "peer_cpu": statistics.median(peer[best]["cpu_ms_per_token"]),
                    "baseline": statistics.median(fig["baseline"]) if fig["baseline"] else None,
                    # bf16 against f32 of the same rounds, when both ran.
                    "ours_of_f32": (statistics.median(fig["ours"]) / statistics.median(runs["f32"]["ours"])
                                    if dtype != "f32" and "f32" in runs else None),
                })
                raw.append({"model": label, "batch": batch, "prompts": count, "dtype": dtype, **fig})

    # The roofs, in this run: torch's copy bandwidth (what streaming the weights once per decode
    # step can reach) and, per dtype, the best product rate ours or torch's reach on a
    # [256, hidden] x [hidden, intermediate] shape.
    bandwidth = roof.copy_bandwidth_gbs(args.threads)
    configs = {label: json.loads((Path(model_dir) / "config.json").read_text()) for label, model_dir in models}
    compute = {label: roof.matmul_roofs([(256, c["intermediate_size"], c["hidden_size"])], args.threads)
               for label, c in configs.items()}
    print(f"# {versions}")
    print(f"# roofs (torch, {args.threads} threads): copy bandwidth {bandwidth:.1f} GB/s; products "
          + "; ".join(f"{label} " + ", ".join(f"{dtype} {g[dtype]:.0f}" for dtype in args.dtypes) + " GFLOP/s"
                      for label, g in compute.items()))
    print("# bandwidth fraction: linear weights and head streamed once per decode step, "
          + ", ".join(f"{WEIGHT_BYTES[dtype]} bytes a weight in {dtype}" for dtype in args.dtypes)
          + "; compute fraction: 2 x weights flops per token over the row's dtype's product roof")
    print()

    def fractions(label: str, batch: int, dtype: str, tok_s: float) -> str:
        """A tok/s figure as fractions of the two roofs: the weights' bytes streamed per step
        over the copy bandwidth, and the products' work per token over the dtype's product rate."""
        weights = roof.linear_params(configs[label])
        streamed = weights * WEIGHT_BYTES[dtype] * tok_s / batch / 1e9
        work = 2.0 * weights * tok_s / 1e9
        return f"{streamed / bandwidth:.2f} / {work / compute[label][dtype]:.2f}"

    both = set(args.dtypes) == set(DTYPES)  # the bf16 / f32 column, when both ran
    extra = " baseline tok/s | baseline ratio |" if args.baseline else ""
    print("| model | batch | prompts | dtype | opt-gen tok/s | transformers tok/s | ratio |"
          + (" opt-gen bf16 / f32 |" if both else "")
          + " opt-gen CPU ms/tok | transformers CPU ms/tok"
          f" | opt-gen of bandwidth / compute roof | transformers of bandwidth / compute roof |{extra}")
    print("|---|---:|---:|---|---:|---:|---:|" + ("---:|" if both else "") + "---:|---:|---:|---:|"
          + ("---:|---:|" if args.baseline else ""))
    for row in rows:
        o, t, b, label, batch, dtype = row["ours"], row["peer"], row["baseline"], row["label"], row["batch"], row["dtype"]
        own = f" {row['ours_of_f32']:.2f}x |" if row["ours_of_f32"] is not None else " |"
        tail = f" {b:.1f} | {b / t:.2f}x |" if b is not None else ""
        print(f"| {label} | {batch} | {row['prompts']} | {dtype} | {o:.1f} | {t:.1f} ({row['best']}) | {o / t:.2f}x |"
              + (own if both else "")
              + f" {row['ours_cpu']:.2f} | {row['peer_cpu']:.2f}"
              f" | {fractions(label, batch, dtype, o)} | {fractions(label, batch, dtype, t)} |{tail}")
    end_of_run(args.json, {"rows": raw, "versions": versions})


if __name__ == "__main__":
    if sys.argv[1:2] == ["peer"]:
        peer_main(sys.argv[2:])
    else:
        main()

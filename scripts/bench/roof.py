"""This machine's matrix-product roofs, ours and torch's, in one run (`make bench-roof`).

Runs `cargo bench -p optune-kernels --bench roof` (f32 products by `gemm`, bf16 products by
optune's bf16 kernel, on AVX512-BF16 or else AVX2's emulation, on the shapes of a SmolLM2-135M
training step and a decode step), then times torch's f32 and bf16 matmul on the same shapes with
the same thread count, and prints one table: GFLOP/s of each, and ours as a fraction of torch's.

    python scripts/bench/roof.py [--threads N]

Also the roofs the other benches report their figures against (imported by bench_train.py and
bench_gen.py): the best matrix-product rate ours or torch's reach on the run's main shapes, torch's
copy bandwidth, and the product work of a training step and of a decode step counted from the
model's config.json.
"""
import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path


def best_seconds(f, budget: float = 0.6) -> float:
    f()
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < budget:
        t = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t)
    return best


# ---------------------------------------------------------------------------------------------
# Roofs for the other benches (bench_train.py, bench_gen.py): measured with torch in their own
# run, and the matrix-product work of a training step or a decode step, counted from config.json.
# ---------------------------------------------------------------------------------------------

def ours_matmul_gflops(shapes: list, threads: int) -> list:
    """Our kernels' GFLOP/s on each (m, n, k) (none: the bench's own SmolLM2 shapes): `cargo bench
    --bench roof -- --shape ...`; rows with "shape", "m", "n", "k", "f32" and "bf16" (None without
    bf16 products)."""
    repo = Path(__file__).resolve().parents[2]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "roof.jsonl"
        shape_args = [a for m, n, k in shapes for a in ("--shape", f"{m},{n},{k}")]
        subprocess.run(["cargo", "bench", "-q", "-p", "optune-kernels", "--bench", "roof", "--",
                        "--threads", str(threads), "--json", str(out), *shape_args], cwd=repo, check=True,
                       stdout=subprocess.DEVNULL)
        return [json.loads(line) for line in out.read_text().splitlines()]


def torch_matmul_gflops(m: int, n: int, k: int, dtype: str, threads: int) -> float:
    """torch's best GFLOP/s for an [m, k] x [k, n] product in `dtype` ("f32" or "bf16")."""
    import torch
    torch.set_num_threads(threads)
    t = {"f32": torch.float32, "bf16": torch.bfloat16}[dtype]
    a, b = torch.randn(m, k, dtype=t), torch.randn(k, n, dtype=t)
    return 2.0 * m * n * k / best_seconds(lambda: a @ b) / 1e9


def matmul_roofs(shapes: list, threads: int) -> dict:
    """The product roof per dtype: the best rate our kernels or torch reach on any of `shapes`
    (m, n, k), in this run."""
    ours = ours_matmul_gflops(shapes, threads)
    return {dtype: max([torch_matmul_gflops(m, n, k, dtype, threads) for m, n, k in shapes]
                       + [row[dtype] for row in ours if row[dtype] is not None])
            for dtype in ("f32", "bf16")}


def copy_bandwidth_gbs(threads: int, megabytes: int = 256) -> float:
    """torch's best copy rate, bytes read + written per second / 1e9, over a buffer far larger
    than the caches: what streaming the weights once per decode step can reach."""
    import torch
    torch.set_num_threads(threads)
    src = torch.ones(megabytes << 18, dtype=torch.float32)
    dst = torch.empty_like(src)
    return 2.0 * src.numel() * 4 / best_seconds(lambda: dst.copy_(src)) / 1e9


def linear_params(config: dict) -> int:
    """Weights one token's forward pass multiplies by: every layer's projections and the head."""
    h, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    d = config.get("head_dim") or h // heads
    kv = config.get("num_key_value_heads", heads)
    per_layer = h * heads * d * 2 + h * kv * d * 2 + 3 * h * inter
    return layers * per_layer + config["vocab_size"] * h


def forward_flops(config: dict, lengths: list) -> float:
    """Multiply-add work (x2) of one forward pass over sequences of `lengths` tokens: the linear
    layers and head on every token, and attention's two products over the full square (as the
    padded, masked implementations on both sides compute it)."""
    heads = config["num_attention_heads"]
    d = config.get("head_dim") or config["hidden_size"] // heads
    attention = sum(4.0 * L * L * heads * d for L in lengths) * config["num_hidden_layers"]
    return 2.0 * linear_params(config) * sum(lengths) + attention


def train_step_flops(config: dict, lengths: list, lora: bool) -> float:
    """A DPO step's product work with the reference precomputed: forward plus backward, the
    backward twice the forward for full fine-tuning (input and weight gradients), once for LoRA
    (input gradients only; the adapters' own products are left out, under 3 % at rank 16)."""
    return forward_flops(config, lengths) * (2.0 if lora else 3.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    ours = ours_matmul_gflops([], args.threads)

    import torch
    torch.set_num_threads(args.threads)
    print(f"# torch {torch.__version__}, {args.threads} threads, load average {os.getloadavg()}")
    print("| shape | m | n | k | ours f32 | torch f32 | ours/torch | ours bf16 | torch bf16 | ours/torch |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in ours:
        m, n, k = row["m"], row["n"], row["k"]
        rates = {dtype: torch_matmul_gflops(m, n, k, dtype, args.threads) for dtype in ("f32", "bf16")}
        bf16 = row["bf16"]
        print(f"| {row['shape']} | {m} | {n} | {k} | {row['f32']:.0f} | {rates['f32']:.0f} | "
              f"{row['f32'] / rates['f32']:.2f} | {bf16 or float('nan'):.0f} | "
              f"{rates['bf16']:.0f} | {(bf16 or float('nan')) / rates['bf16']:.2f} |")
    print(f"# load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    sys.exit(main())

"""This machine's matrix-product roofs, ours and torch's, in one run (`make bench-roof`).

Runs `cargo bench -p optune-kernels --bench roof` (f32 products by `gemm`, bf16 products by
optune's AVX512-BF16 kernel, on the shapes of a SmolLM2-135M training step and a decode step),
then times torch's f32 and bf16 matmul on the same shapes with the same thread count, and prints
one table: GFLOP/s of each, and ours as a fraction of torch's.

    python scripts/bench/roof.py [--threads N]
"""
import argparse
import json
import os
import subprocess
import sys
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    repo = Path(__file__).resolve().parents[2]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "roof.jsonl"
        subprocess.run(["cargo", "bench", "-q", "-p", "optune-kernels", "--bench", "roof", "--",
                        "--threads", str(args.threads), "--json", str(out)], cwd=repo, check=True,
                       stdout=subprocess.DEVNULL)
        ours = [json.loads(line) for line in out.read_text().splitlines()]

    import torch
    torch.set_num_threads(args.threads)
    print(f"# torch {torch.__version__}, {args.threads} threads, load average {os.getloadavg()}")
    print("| shape | m | n | k | ours f32 | torch f32 | ours/torch | ours bf16 | torch bf16 | ours/torch |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in ours:
        m, n, k = row["m"], row["n"], row["k"]
        flops = 2.0 * m * n * k
        rates = {}
        for dtype in (torch.float32, torch.bfloat16):
            a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
            rates[dtype] = flops / best_seconds(lambda: a @ b) / 1e9
        bf16 = row["bf16"]
        print(f"| {row['shape']} | {m} | {n} | {k} | {row['f32']:.0f} | {rates[torch.float32]:.0f} | "
              f"{row['f32'] / rates[torch.float32]:.2f} | {bf16 or float('nan'):.0f} | "
              f"{rates[torch.bfloat16]:.0f} | {(bf16 or float('nan')) / rates[torch.bfloat16]:.2f} |")
    print(f"# load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env bash
# Training benchmark: a DPO step of opt-wdpo against TRL's DPOTrainer on the CPU (`make bench-train`).
#
# Environment:
#   OPTUNE_BENCH_PYTHON  a Python that already has torch, transformers and trl; without it a throwaway
#                        virtual environment is made in $OPTUNE_BENCH_DIR/venv-train (CPU torch from
#                        download.pytorch.org, transformers 4.57 and trl 0.25 from PyPI) and reused by
#                        later runs
#   OPTUNE_BENCH_DIR     scratch directory [runs/bench]; delete it to throw everything away
#   OPTUNE_SMOLLM2_DIR   a SmolLM2-135M-Instruct Hugging Face directory (opt-convert's output) to
#                        benchmark as well
#   CARGO_TARGET_DIR     where cargo builds opt-wdpo [target]
# Extra arguments go to bench_train.py (--repeats N, --steps N, --threads N, --models ..., --json F).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$repo"
bench_dir="${OPTUNE_BENCH_DIR:-$repo/runs/bench}"
mkdir -p "$bench_dir"
imports='import torch, transformers, trl, datasets'

if [[ -n "${OPTUNE_BENCH_PYTHON:-}" ]]; then
    python="$OPTUNE_BENCH_PYTHON"
else
    venv="$bench_dir/venv-train"
    if [[ ! -x "$venv/bin/python" ]] || ! "$venv/bin/python" -c "$imports" 2>/dev/null; then
        echo "bench-train: creating a virtual environment with torch (CPU), transformers and trl in $venv" >&2
        python3 -m venv "$venv"
        "$venv/bin/python" -m pip install --quiet --upgrade pip
        "$venv/bin/python" -m pip install --quiet torch --index-url "${OPTUNE_BENCH_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
        "$venv/bin/python" -m pip install --quiet 'transformers>=4.57,<4.58' 'trl>=0.25,<0.26' datasets safetensors
    fi
    python="$venv/bin/python"
fi
"$python" -c "$imports" || {
    echo "bench-train: $python cannot import torch, transformers, trl and datasets" >&2
    exit 1
}

target="${CARGO_TARGET_DIR:-$repo/target}"
CARGO_TARGET_DIR="$target" cargo build --release --quiet -p opt-wdpo
exec "$python" "$repo/scripts/bench/bench_train.py" --opt-wdpo "$target/release/opt-wdpo" \
    --work "$bench_dir/train" "$@"

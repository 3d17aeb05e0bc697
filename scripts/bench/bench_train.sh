#!/usr/bin/env bash
# Training benchmark: a DPO step of opt-wdpo against TRL's DPOTrainer on the CPU (`make bench-train`).
#
# Environment:
#   OPTUNE_BENCH_PYTHON  a Python that already has torch, transformers, trl and peft; without it a throwaway
#                        virtual environment is made in $OPTUNE_BENCH_DIR/venv-train (CPU torch from
#                        download.pytorch.org, transformers 4.57 and trl 0.25 from PyPI) and reused by
#                        later runs
#   OPTUNE_BENCH_DIR     scratch directory [runs/bench]; delete it to throw everything away
#   OPTUNE_SMOLLM2_DIR   a SmolLM2-135M-Instruct Hugging Face directory (opt-convert's output) to
#                        benchmark as well
#   CARGO_TARGET_DIR     where cargo builds opt-wdpo [target]
# Extra arguments go to bench_train.py (--repeats N, --steps N, --threads N, --models ..., --json F).
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/python_env.sh"
cd "$repo"
python="$(bench_python venv-train 'torch, transformers, trl, datasets, peft' 'transformers>=4.57,<4.58' 'trl>=0.25,<0.26' datasets safetensors peft)"

bench_build
exec "$python" "$repo/scripts/bench/bench_train.py" --opt-wdpo "$target/release/opt-wdpo" \
    --work "$bench_dir/train" "$@"

#!/usr/bin/env bash
# Generation benchmark: opt-gen against Hugging Face transformers on the CPU (`make bench-gen`).
#
# Environment:
#   OPTUNE_BENCH_PYTHON  a Python that already has torch and transformers; without it a throwaway
#                        virtual environment is made in $OPTUNE_BENCH_DIR/venv (CPU torch from
#                        download.pytorch.org, transformers from PyPI) and reused by later runs
#   OPTUNE_BENCH_DIR     scratch directory [runs/bench]; delete it to throw everything away
#   OPTUNE_SMOLLM2_DIR   a SmolLM2-135M-Instruct Hugging Face directory (opt-convert's output) to
#                        benchmark as well
#   CARGO_TARGET_DIR     where cargo builds opt-gen [target]
# Extra arguments go to bench_gen.py (--repeats N, --batches 1,16,32, --dtypes f32,bf16, --threads N,
# --models ...).
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/python_env.sh"
cd "$repo"
python="$(bench_python venv 'torch, transformers' 'transformers>=4.57' safetensors)"

bench_build
exec "$python" "$repo/scripts/bench/bench_gen.py" --opt-gen "$target/release/opt-gen" \
    --work "$bench_dir/gen" "$@"
